//! Header layouts and protocol numbers: every offset the programs read or write, in one place.
//! L3 offsets are from the start of the IPv4 header, L4 offsets from the start of the
//! TCP/UDP/ICMP header.

pub use lb_common::{PROTOCOL_ICMP, PROTOCOL_TCP, PROTOCOL_UDP};

pub const ETH_HEADER_LEN: usize = 14;
pub const ETH_TYPE_OFFSET: usize = 12;
/// Destination then source MAC: the first 12 bytes of the frame.
pub const ETH_MACS_LEN: usize = 12;
pub const ETH_P_IP: u16 = 0x0800;

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
