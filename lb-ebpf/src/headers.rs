//! Header layouts and protocol numbers: every offset the programs read or write, in one place.
//! L3 offsets are from the start of the IP header, L4 offsets from the start of the
//! TCP/UDP/ICMP header.

pub use lb_common::{PROTOCOL_ICMP, PROTOCOL_ICMPV6, PROTOCOL_SCTP, PROTOCOL_TCP, PROTOCOL_UDP};

pub const ETH_HEADER_LEN: usize = 14;
pub const ETH_TYPE_OFFSET: usize = 12;
/// Destination then source MAC: the first 12 bytes of the frame.
pub const ETH_MACS_LEN: usize = 12;
pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;

pub const IPV4_MIN_HEADER_LEN: usize = 20;
pub const IPV4_MAX_HEADER_LEN: usize = 60;
/// Version 4, IHL 5: a header without options.
pub const IPV4_VERSION_IHL_PLAIN: u8 = 0x45;
pub const IPV4_TOTAL_LEN_OFFSET: usize = 2;
pub const IPV4_ID_OFFSET: usize = 4;
pub const IPV4_FRAGMENT_OFFSET: usize = 6;
pub const IPV4_TTL_OFFSET: usize = 8;
pub const IPV4_PROTOCOL_OFFSET: usize = 9;
pub const IPV4_CHECKSUM_OFFSET: usize = 10;
pub const IPV4_SRC_OFFSET: usize = 12;
pub const IPV4_DST_OFFSET: usize = 16;
/// Fragment offset field (in 8-byte units) of the flags/fragment word.
pub const IPV4_FRAGMENT_OFFSET_MASK: u16 = 0x1fff;
/// More-fragments flag of the flags/fragment word.
pub const IPV4_MORE_FRAGMENTS: u16 = 0x2000;
pub const IPV4_DONT_FRAGMENT: u8 = 0x40;
pub const DEFAULT_TTL: u8 = 64;

pub const IPV6_HEADER_LEN: usize = 40;
pub const IPV6_PAYLOAD_LEN_OFFSET: usize = 4;
pub const IPV6_NEXT_HEADER_OFFSET: usize = 6;
pub const IPV6_HOP_LIMIT_OFFSET: usize = 7;
pub const IPV6_SRC_OFFSET: usize = 8;
pub const IPV6_DST_OFFSET: usize = 24;
/// Extension headers (RFC 8200 4.1) and their layout: next header, then length.
pub const IPV6_HOP_BY_HOP: u8 = 0;
pub const IPV6_ROUTING: u8 = 43;
pub const IPV6_FRAGMENT: u8 = 44;
pub const IPV6_ESP: u8 = 50;
pub const IPV6_AUTH: u8 = 51;
pub const IPV6_DEST_OPTIONS: u8 = 60;
/// A routing header's segments-left byte.
pub const IPV6_ROUTING_SEGMENTS_LEFT_OFFSET: usize = 3;
pub const IPV6_FRAGMENT_HEADER_LEN: usize = 8;
/// The fragment header's offset/flags word.
pub const IPV6_FRAGMENT_WORD_OFFSET: usize = 2;
pub const IPV6_FRAGMENT_ID_OFFSET: usize = 4;
pub const IPV6_FRAGMENT_OFFSET_MASK: u16 = 0xfff8;
pub const IPV6_MORE_FRAGMENTS: u16 = 1;
/// Extension headers walked before giving up on reaching the ports.
pub const IPV6_MAX_EXTENSION_HEADERS: usize = 4;

pub const L4_SRC_PORT_OFFSET: usize = 0;
pub const L4_DST_PORT_OFFSET: usize = 2;
pub const TCP_SEQ_OFFSET: usize = 4;
pub const TCP_ACK_OFFSET: usize = 8;
pub const TCP_DATA_OFFSET_OFFSET: usize = 12;
pub const TCP_FLAGS_OFFSET: usize = 13;
pub const TCP_CHECKSUM_OFFSET: usize = 16;
pub const TCP_MIN_HEADER_LEN: usize = 20;
pub const UDP_CHECKSUM_OFFSET: usize = 6;
pub const UDP_HEADER_LEN: usize = 8;
/// SCTP's common header: ports, verification tag, CRC32c.
pub const SCTP_COMMON_HEADER_LEN: usize = 12;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

pub const ICMP_HEADER_LEN: usize = 8;
pub const ICMP_CHECKSUM_OFFSET: usize = 2;
pub const ICMP_DEST_UNREACHABLE: u8 = 3;
pub const ICMP_PORT_UNREACHABLE: u8 = 3;
pub const ICMP_TIME_EXCEEDED: u8 = 11;
pub const ICMP_PARAMETER_PROBLEM: u8 = 12;
/// An ICMP error header and the quoted IPv4 header and ports it must carry to be translated.
pub const ICMP_ERROR_MIN_LEN: usize = ICMP_HEADER_LEN + IPV4_MIN_HEADER_LEN + 4;
/// What an ICMP error quotes of the offending packet: its IP header and 8 bytes after it.
pub const ICMP_QUOTE_LEN: usize = IPV4_MIN_HEADER_LEN + 8;

/// Linear bytes that hold Ethernet, a plain IPv4 header and a TCP header: what a packet
/// without IP options needs for everything lb reads.
pub const COMMON_HEADERS_LEN: usize = ETH_HEADER_LEN + IPV4_MIN_HEADER_LEN + TCP_MIN_HEADER_LEN;
/// The same with the longest IPv4 header.
pub const MAX_HEADERS_LEN: usize = ETH_HEADER_LEN + IPV4_MAX_HEADER_LEN + TCP_MIN_HEADER_LEN;
/// Ethernet, an IPv6 header and a TCP header.
pub const COMMON_HEADERS_LEN6: usize = ETH_HEADER_LEN + IPV6_HEADER_LEN + TCP_MIN_HEADER_LEN;

pub const ICMPV6_DEST_UNREACHABLE: u8 = 1;
pub const ICMPV6_PACKET_TOO_BIG: u8 = 2;
pub const ICMPV6_TIME_EXCEEDED: u8 = 3;
pub const ICMPV6_PARAMETER_PROBLEM: u8 = 4;
pub const ICMPV6_PORT_UNREACHABLE: u8 = 4;
pub const ICMPV6_HEADER_LEN: usize = 8;
pub const ICMPV6_CHECKSUM_OFFSET: usize = 2;
/// An ICMPv6 error header and the quoted IPv6 header and ports it must carry to be translated.
pub const ICMPV6_ERROR_MIN_LEN: usize = ICMPV6_HEADER_LEN + IPV6_HEADER_LEN + 4;
/// What an ICMPv6 error quotes of a rejected packet here: its IPv6 header and 8 bytes after it
/// (RFC 4443 allows as much as fits the minimum MTU; the ports are what matter).
pub const ICMPV6_QUOTE_LEN: usize = IPV6_HEADER_LEN + 8;
