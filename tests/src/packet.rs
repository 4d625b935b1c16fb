//! A small builder for Ethernet/IPv4 and Ethernet/IPv6 test packets carrying TCP, UDP or SCTP,
//! with correct checksums, and checks that recompute checksums from scratch.

use std::net::{Ipv4Addr, Ipv6Addr};

pub const ETH_LEN: usize = 14;
pub const TCP: u8 = 6;
pub const UDP: u8 = 17;
pub const SCTP: u8 = 132;
/// TCP's SYN flag.
pub const TCP_SYN: u8 = 0x02;

/// SCTP's checksum: CRC32c over the packet with the checksum field zeroed, stored little-endian
/// (RFC 9260, appendix A).
pub fn sctp_checksum(sctp: &[u8]) -> [u8; 4] {
    let mut zeroed = sctp.to_vec();
    zeroed[8..12].fill(0);
    crc::Crc::<u32>::new(&crc::CRC_32_ISCSI).checksum(&zeroed).to_le_bytes()
}

/// Whether an SCTP packet's CRC32c is right.
pub fn sctp_checksum_valid(sctp: &[u8]) -> bool {
    sctp.len() >= 12 && sctp[8..12] == sctp_checksum(sctp)
}

/// An SCTP INIT chunk (RFC 9260, 3.3.2) with `initiate_tag`: what a client's first packet of
/// an association carries.
pub fn sctp_init_chunk(initiate_tag: u32) -> Vec<u8> {
    let mut chunk = vec![1, 0, 0, 20];
    chunk.extend_from_slice(&initiate_tag.to_be_bytes());
    chunk.extend_from_slice(&65535u32.to_be_bytes()); // advertised receiver window
    chunk.extend_from_slice(&[0, 10, 0, 10]); // outbound, inbound streams
    chunk.extend_from_slice(&initiate_tag.to_be_bytes()); // initial TSN
    chunk
}

/// The Internet checksum's ones' complement sum, folded to 16 bits (not inverted).
fn ones_complement_sum(data: &[u8], initial: u32) -> u16 {
    let mut sum = initial;
    for chunk in data.chunks(2) {
        let word = u16::from_be_bytes([chunk[0], *chunk.get(1).unwrap_or(&0)]);
        sum += u32::from(word);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

fn pseudo_header_sum(src: Ipv4Addr, dst: Ipv4Addr, protocol: u8, l4_len: usize) -> u32 {
    let s = src.octets();
    let d = dst.octets();
    [
        u16::from_be_bytes([s[0], s[1]]),
        u16::from_be_bytes([s[2], s[3]]),
        u16::from_be_bytes([d[0], d[1]]),
        u16::from_be_bytes([d[2], d[3]]),
    ]
    .iter()
    .map(|w| u32::from(*w))
    .sum::<u32>()
        + u32::from(protocol)
        + l4_len as u32
}

#[derive(Clone, Debug)]
pub struct PacketSpec {
    pub src: (Ipv4Addr, u16),
    pub dst: (Ipv4Addr, u16),
    pub protocol: u8,
    /// TCP flags byte (SYN = 0x02, ACK = 0x10).
    pub tcp_flags: u8,
    pub payload: Vec<u8>,
    /// Raw IPv4 options (a multiple of 4 bytes).
    pub ip_options: Vec<u8>,
    /// Flags + fragment offset field, host order (0x2000 = more fragments).
    pub fragment: u16,
    /// Leave the UDP checksum at 0 ("no checksum").
    pub udp_zero_checksum: bool,
    pub ttl: u8,
    /// Ethernet destination and source; `ethernet_header`'s by default.
    pub macs: Option<([u8; 6], [u8; 6])>,
}

impl PacketSpec {
    pub fn tcp(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), tcp_flags: u8) -> Self {
        Self {
            src,
            dst,
            protocol: TCP,
            tcp_flags,
            payload: b"hello".to_vec(),
            ip_options: Vec::new(),
            fragment: 0,
            udp_zero_checksum: false,
            ttl: 64,
            macs: None,
        }
    }

    pub fn udp(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16)) -> Self {
        Self { protocol: UDP, tcp_flags: 0, ..Self::tcp(src, dst, 0) }
    }

    /// An SCTP packet carrying an INIT chunk.
    pub fn sctp(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16)) -> Self {
        Self { protocol: SCTP, payload: sctp_init_chunk(0x1122_3344), ..Self::tcp(src, dst, 0) }
    }

    /// The same packet with other addresses: what a correct rewrite produces.
    pub fn with_src(&self, src: (Ipv4Addr, u16)) -> Self {
        Self { src, ..self.clone() }
    }

    pub fn with_dst(&self, dst: (Ipv4Addr, u16)) -> Self {
        Self { dst, ..self.clone() }
    }

    pub fn build(&self) -> Vec<u8> {
        let pseudo = |len| pseudo_header_sum(self.src.0, self.dst.0, self.protocol, len);
        let l4 = l4_segment(
            (self.src.1, self.dst.1),
            self.protocol,
            self.tcp_flags,
            &self.payload,
            !(self.protocol == UDP && self.udp_zero_checksum),
            pseudo,
        );

        let header_len = 20 + self.ip_options.len();
        let mut ip = Vec::with_capacity(header_len);
        ip.push(0x40 | (header_len / 4) as u8);
        ip.push(0);
        ip.extend_from_slice(&((header_len + l4.len()) as u16).to_be_bytes());
        ip.extend_from_slice(&0x1234u16.to_be_bytes()); // id
        ip.extend_from_slice(&self.fragment.to_be_bytes());
        ip.push(self.ttl);
        ip.push(self.protocol);
        ip.extend_from_slice(&[0, 0]);
        ip.extend_from_slice(&self.src.0.octets());
        ip.extend_from_slice(&self.dst.0.octets());
        ip.extend_from_slice(&self.ip_options);
        let sum = !ones_complement_sum(&ip, 0);
        ip[10..12].copy_from_slice(&sum.to_be_bytes());

        let mut frame = ethernet_header(0x0800);
        if let Some((dst, src)) = self.macs {
            frame[..6].copy_from_slice(&dst);
            frame[6..12].copy_from_slice(&src);
        }
        frame.extend_from_slice(&ip);
        frame.extend_from_slice(&l4);
        frame
    }
}

/// A TCP or UDP segment (ports, then TCP seq 0x01020304, ack 0, or the UDP length) carrying
/// `payload`, checksummed over `pseudo(length)` (its pseudo-header's sum) when `checksum`; or
/// an SCTP packet (ports, verification tag 0x0a0b0c0d, CRC32c) whose chunks are `payload`.
fn l4_segment(
    ports: (u16, u16),
    protocol: u8,
    tcp_flags: u8,
    payload: &[u8],
    checksum: bool,
    pseudo: impl Fn(usize) -> u32,
) -> Vec<u8> {
    let mut l4 = Vec::new();
    l4.extend_from_slice(&ports.0.to_be_bytes());
    l4.extend_from_slice(&ports.1.to_be_bytes());
    let checksum_at;
    if protocol == SCTP {
        l4.extend_from_slice(&0x0a0b_0c0du32.to_be_bytes()); // verification tag
        l4.extend_from_slice(&[0, 0, 0, 0]);
        l4.extend_from_slice(payload);
        if checksum {
            let crc = sctp_checksum(&l4);
            l4[8..12].copy_from_slice(&crc);
        }
        return l4;
    }
    if protocol == TCP {
        l4.extend_from_slice(&0x0102_0304u32.to_be_bytes()); // seq
        l4.extend_from_slice(&0u32.to_be_bytes()); // ack
        l4.push(5 << 4); // data offset
        l4.push(tcp_flags);
        l4.extend_from_slice(&64240u16.to_be_bytes()); // window
        checksum_at = l4.len();
        l4.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent
    } else {
        l4.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
        checksum_at = l4.len();
        l4.extend_from_slice(&[0, 0]);
    }
    l4.extend_from_slice(payload);
    if checksum {
        let sum = !ones_complement_sum(&l4, pseudo(l4.len()));
        // UDP sends a computed 0 as 0xffff; 0 means "no checksum".
        let sum = if protocol == UDP && sum == 0 { 0xffff } else { sum };
        l4[checksum_at..checksum_at + 2].copy_from_slice(&sum.to_be_bytes());
    }
    l4
}

impl PacketSpec {
    /// The datagram cut in two IP fragments: the first carries the L4 header and payload up to
    /// `first_len` bytes of L4 data (a multiple of 8), the second the rest. The L4 checksum
    /// covers the whole datagram, as a sender computes it before fragmenting.
    pub fn fragments(&self, first_len: usize) -> (Vec<u8>, Vec<u8>) {
        assert_eq!(first_len % 8, 0, "fragment boundaries are multiples of 8 bytes");
        let whole = Self { fragment: 0, ..self.clone() }.build();
        let l4 = &whole[ETH_LEN + 20..];
        let fragment = |data: &[u8], flags_offset: u16| {
            let mut ip = whole[ETH_LEN..ETH_LEN + 20].to_vec();
            ip[2..4].copy_from_slice(&((20 + data.len()) as u16).to_be_bytes());
            ip[6..8].copy_from_slice(&flags_offset.to_be_bytes());
            ip[10..12].copy_from_slice(&[0, 0]);
            let sum = !ones_complement_sum(&ip, 0);
            ip[10..12].copy_from_slice(&sum.to_be_bytes());
            let mut frame = whole[..ETH_LEN].to_vec();
            frame.extend_from_slice(&ip);
            frame.extend_from_slice(data);
            frame
        };
        (fragment(&l4[..first_len], 0x2000), fragment(&l4[first_len..], (first_len / 8) as u16))
    }
}

/// Whether the two fragments of `fragments` reassemble into a datagram whose IP header and L4
/// checksum are valid (the IP header checksum of each fragment is checked too).
pub fn fragments_valid(first: &[u8], later: &[u8]) -> bool {
    let header_ok = |frame: &[u8]| ones_complement_sum(&frame[ETH_LEN..ETH_LEN + 20], 0) == 0xffff;
    if !header_ok(first) || !header_ok(later) {
        return false;
    }
    let mut whole = first.to_vec();
    whole.extend_from_slice(&later[ETH_LEN + 20..]);
    let total = (whole.len() - ETH_LEN) as u16;
    whole[ETH_LEN + 2..ETH_LEN + 4].copy_from_slice(&total.to_be_bytes());
    whole[ETH_LEN + 6..ETH_LEN + 8].copy_from_slice(&[0, 0]);
    whole[ETH_LEN + 10..ETH_LEN + 12].copy_from_slice(&[0, 0]);
    let sum = !ones_complement_sum(&whole[ETH_LEN..ETH_LEN + 20], 0);
    whole[ETH_LEN + 10..ETH_LEN + 12].copy_from_slice(&sum.to_be_bytes());
    checksums_valid(&whole)
}

/// The IPv4 header of a reply lb builds itself (a RST or an ICMP error) from `from` to `to`.
fn reply_ip_header(from: Ipv4Addr, to: Ipv4Addr, protocol: u8, total_len: usize) -> Vec<u8> {
    let mut ip = vec![0x45, 0];
    ip.extend_from_slice(&(total_len as u16).to_be_bytes());
    ip.extend_from_slice(&[0, 0, 0x40, 0, 64, protocol, 0, 0]); // id 0, DF, ttl 64
    ip.extend_from_slice(&from.octets());
    ip.extend_from_slice(&to.octets());
    let sum = !ones_complement_sum(&ip, 0);
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
    ip
}

/// The Ethernet header of a frame sent back where `ethernet_header`'s frames came from.
fn swapped_ethernet_header() -> Vec<u8> {
    let forward = ethernet_header(0x0800);
    let mut frame = forward[6..12].to_vec();
    frame.extend_from_slice(&forward[0..6]);
    frame.extend_from_slice(&forward[12..14]);
    frame
}

/// The RST (RFC 9293) a closed port answers `segment` with, as the client receives it.
pub fn tcp_reset_for(segment: &PacketSpec) -> Vec<u8> {
    let mut tcp = Vec::new();
    tcp.extend_from_slice(&segment.dst.1.to_be_bytes());
    tcp.extend_from_slice(&segment.src.1.to_be_bytes());
    let (seq, ack, flags) = if segment.tcp_flags & 0x10 != 0 {
        (0u32, 0u32, 0x04u8) // their ACK number would be the seq; `build` sends ack 0
    } else {
        let length = segment.payload.len() as u32 + u32::from(segment.tcp_flags & 0x02 != 0);
        (0, 0x0102_0304u32 + length, 0x14)
    };
    tcp.extend_from_slice(&seq.to_be_bytes());
    tcp.extend_from_slice(&ack.to_be_bytes());
    tcp.extend_from_slice(&[5 << 4, flags, 0, 0, 0, 0, 0, 0]);
    let sum = !ones_complement_sum(&tcp, pseudo_header_sum(segment.dst.0, segment.src.0, TCP, tcp.len()));
    tcp[16..18].copy_from_slice(&sum.to_be_bytes());
    let mut frame = swapped_ethernet_header();
    frame.extend_from_slice(&reply_ip_header(segment.dst.0, segment.src.0, TCP, 20 + tcp.len()));
    frame.extend_from_slice(&tcp);
    frame
}

/// The ICMP port unreachable (RFC 792) answering `datagram`: its IP header and 8 bytes quoted.
pub fn icmp_port_unreachable_for(datagram: &PacketSpec) -> Vec<u8> {
    let original = datagram.build();
    let mut icmp = vec![3, 3, 0, 0, 0, 0, 0, 0];
    icmp.extend_from_slice(&original[ETH_LEN..ETH_LEN + 28]);
    let sum = !ones_complement_sum(&icmp, 0);
    icmp[2..4].copy_from_slice(&sum.to_be_bytes());
    let mut frame = swapped_ethernet_header();
    frame.extend_from_slice(&reply_ip_header(datagram.dst.0, datagram.src.0, 1, 20 + icmp.len()));
    frame.extend_from_slice(&icmp);
    frame
}

/// An ICMP error (`kind`, `code`, the 4 bytes after the checksum) from `from` to `to`, quoting
/// the IP header and first 8 bytes of `quoted` (an Ethernet frame).
pub fn icmp_error(from: Ipv4Addr, to: Ipv4Addr, kind: u8, code: u8, rest: [u8; 4], quoted: &[u8]) -> Vec<u8> {
    let mut icmp = vec![kind, code, 0, 0];
    icmp.extend_from_slice(&rest);
    icmp.extend_from_slice(&quoted[ETH_LEN..ETH_LEN + 28]);
    let sum = !ones_complement_sum(&icmp, 0);
    icmp[2..4].copy_from_slice(&sum.to_be_bytes());
    let mut ip = vec![0x45, 0];
    ip.extend_from_slice(&((20 + icmp.len()) as u16).to_be_bytes());
    ip.extend_from_slice(&[0x56, 0x78, 0, 0, 64, 1, 0, 0]);
    ip.extend_from_slice(&from.octets());
    ip.extend_from_slice(&to.octets());
    let sum = !ones_complement_sum(&ip, 0);
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
    let mut frame = ethernet_header(0x0800);
    frame.extend_from_slice(&ip);
    frame.extend_from_slice(&icmp);
    frame
}

/// Whether an ICMP frame's IP and ICMP checksums are valid.
pub fn icmp_checksums_valid(frame: &[u8]) -> bool {
    let ip = &frame[ETH_LEN..];
    ones_complement_sum(&ip[..20], 0) == 0xffff && ones_complement_sum(&ip[20..], 0) == 0xffff
}

/// IPv6 extension header types (RFC 8200).
pub const HOP_BY_HOP: u8 = 0;
pub const ROUTING: u8 = 43;
pub const FRAGMENT: u8 = 44;
pub const DEST_OPTIONS: u8 = 60;
pub const ICMPV6: u8 = 58;

fn pseudo_header_sum6(src: Ipv6Addr, dst: Ipv6Addr, next_header: u8, l4_len: usize) -> u32 {
    let words = |a: Ipv6Addr| a.segments().into_iter().map(u32::from).sum::<u32>();
    words(src) + words(dst) + (l4_len as u32 >> 16) + (l4_len as u32 & 0xffff) + u32::from(next_header)
}

/// An Ethernet/IPv6 test packet, with extension headers before its TCP or UDP header.
#[derive(Clone, Debug)]
pub struct Packet6Spec {
    pub src: (Ipv6Addr, u16),
    pub dst: (Ipv6Addr, u16),
    pub protocol: u8,
    pub tcp_flags: u8,
    pub payload: Vec<u8>,
    /// Extension headers in order: each its type and its bytes (a multiple of 8; the first,
    /// next-header, byte is filled in by `build`).
    pub extensions: Vec<(u8, Vec<u8>)>,
    pub hop_limit: u8,
}

impl Packet6Spec {
    pub fn tcp(src: (Ipv6Addr, u16), dst: (Ipv6Addr, u16), tcp_flags: u8) -> Self {
        Self {
            src,
            dst,
            protocol: TCP,
            tcp_flags,
            payload: b"hello".to_vec(),
            extensions: Vec::new(),
            hop_limit: 64,
        }
    }

    pub fn udp(src: (Ipv6Addr, u16), dst: (Ipv6Addr, u16)) -> Self {
        Self { protocol: UDP, ..Self::tcp(src, dst, 0) }
    }

    /// An SCTP packet carrying an INIT chunk.
    pub fn sctp(src: (Ipv6Addr, u16), dst: (Ipv6Addr, u16)) -> Self {
        Self { protocol: SCTP, payload: sctp_init_chunk(0x1122_3344), ..Self::tcp(src, dst, 0) }
    }

    pub fn with_src(&self, src: (Ipv6Addr, u16)) -> Self {
        Self { src, ..self.clone() }
    }

    pub fn with_dst(&self, dst: (Ipv6Addr, u16)) -> Self {
        Self { dst, ..self.clone() }
    }

    /// The same packet behind an extension header of `kind` (options padded to 8 bytes, or a
    /// routing header with `segments_left`, or a fragment header with `fragment_word`).
    pub fn with_extension(&self, kind: u8, word: u16) -> Self {
        let mut header = vec![0u8; 8];
        match kind {
            ROUTING => header[3] = word as u8,
            FRAGMENT => header[2..4].copy_from_slice(&word.to_be_bytes()),
            _ => header[2..4].copy_from_slice(&[1, 4]), // a PadN option filling the header
        }
        let mut spec = self.clone();
        spec.extensions.push((kind, header));
        spec
    }

    pub fn build(&self) -> Vec<u8> {
        let pseudo = |len| pseudo_header_sum6(self.src.0, self.dst.0, self.protocol, len);
        let l4 =
            l4_segment((self.src.1, self.dst.1), self.protocol, self.tcp_flags, &self.payload, true, pseudo);
        let mut chain = Vec::new();
        for (i, (_, header)) in self.extensions.iter().enumerate() {
            let next = self.extensions.get(i + 1).map_or(self.protocol, |(kind, _)| *kind);
            let mut header = header.clone();
            header[0] = next;
            chain.extend_from_slice(&header);
        }
        let first = self.extensions.first().map_or(self.protocol, |(kind, _)| *kind);
        let mut frame = ethernet_header(0x86dd);
        frame.extend_from_slice(&ipv6_header(
            self.src.0,
            self.dst.0,
            first,
            chain.len() + l4.len(),
            self.hop_limit,
        ));
        frame.extend_from_slice(&chain);
        frame.extend_from_slice(&l4);
        frame
    }
}

fn ipv6_header(src: Ipv6Addr, dst: Ipv6Addr, next_header: u8, payload_len: usize, hop_limit: u8) -> Vec<u8> {
    let mut ip = vec![0x60, 0, 0, 0];
    ip.extend_from_slice(&(payload_len as u16).to_be_bytes());
    ip.push(next_header);
    ip.push(hop_limit);
    ip.extend_from_slice(&src.octets());
    ip.extend_from_slice(&dst.octets());
    ip
}

/// Whether an Ethernet/IPv6 frame's TCP/UDP (or ICMPv6) checksum is valid, past its extension
/// headers.
pub fn checksums_valid6(frame: &[u8]) -> bool {
    let Some(ip) = frame.get(ETH_LEN..).filter(|ip| ip.len() >= 40) else { return false };
    let payload_len = usize::from(u16::from_be_bytes([ip[4], ip[5]]));
    let Some(payload) = ip.get(40..40 + payload_len) else { return false };
    let (mut next, mut at) = (ip[6], 0);
    while matches!(next, HOP_BY_HOP | ROUTING | DEST_OPTIONS | FRAGMENT) {
        let len = if next == FRAGMENT { 8 } else { (usize::from(payload[at + 1]) + 1) * 8 };
        next = payload[at];
        at += len;
    }
    let src = Ipv6Addr::from(<[u8; 16]>::try_from(&ip[8..24]).unwrap());
    let dst = Ipv6Addr::from(<[u8; 16]>::try_from(&ip[24..40]).unwrap());
    let l4 = &payload[at..];
    if next == SCTP {
        return sctp_checksum_valid(l4);
    }
    ones_complement_sum(l4, pseudo_header_sum6(src, dst, next, l4.len())) == 0xffff
}

/// The Ethernet header of an IPv6 frame sent back where `ethernet_header`'s frames came from.
fn swapped_ethernet_header6() -> Vec<u8> {
    let mut frame = swapped_ethernet_header();
    frame[12..14].copy_from_slice(&0x86ddu16.to_be_bytes());
    frame
}

/// The RST a closed port answers an IPv6 `segment` with, as the client receives it.
pub fn tcp_reset_for6(segment: &Packet6Spec) -> Vec<u8> {
    let length = segment.payload.len() as u32 + u32::from(segment.tcp_flags & 0x02 != 0);
    let mut tcp = Vec::new();
    tcp.extend_from_slice(&segment.dst.1.to_be_bytes());
    tcp.extend_from_slice(&segment.src.1.to_be_bytes());
    tcp.extend_from_slice(&0u32.to_be_bytes());
    tcp.extend_from_slice(&(0x0102_0304u32 + length).to_be_bytes());
    tcp.extend_from_slice(&[5 << 4, 0x14, 0, 0, 0, 0, 0, 0]);
    let sum = !ones_complement_sum(&tcp, pseudo_header_sum6(segment.dst.0, segment.src.0, TCP, tcp.len()));
    tcp[16..18].copy_from_slice(&sum.to_be_bytes());
    let mut frame = swapped_ethernet_header6();
    frame.extend_from_slice(&ipv6_header(segment.dst.0, segment.src.0, TCP, tcp.len(), 64));
    frame.extend_from_slice(&tcp);
    frame
}

/// An ICMPv6 error (`icmp_type`, `code`, and the 32-bit word after the checksum: the MTU of a
/// packet too big) from `from` to `to`, quoting `quoted`'s IPv6 header and the 8 bytes after it.
pub fn icmpv6_error(
    from: Ipv6Addr,
    to: Ipv6Addr,
    icmp_type: u8,
    code: u8,
    word: u32,
    quoted: &Packet6Spec,
) -> Vec<u8> {
    let original = quoted.build();
    let mut icmp = vec![icmp_type, code, 0, 0];
    icmp.extend_from_slice(&word.to_be_bytes());
    icmp.extend_from_slice(&original[ETH_LEN..ETH_LEN + 48]);
    let sum = !ones_complement_sum(&icmp, pseudo_header_sum6(from, to, ICMPV6, icmp.len()));
    icmp[2..4].copy_from_slice(&sum.to_be_bytes());
    let mut frame = ethernet_header(0x86dd);
    frame.extend_from_slice(&ipv6_header(from, to, ICMPV6, icmp.len(), 64));
    frame.extend_from_slice(&icmp);
    frame
}

/// The ICMPv6 port unreachable (RFC 4443) answering an IPv6 `datagram`: its IPv6 header and
/// 8 bytes quoted.
pub fn icmpv6_port_unreachable_for(datagram: &Packet6Spec) -> Vec<u8> {
    let mut frame = icmpv6_error(datagram.dst.0, datagram.src.0, 1, 4, 0, datagram);
    // Sent back where the datagram came from.
    frame[..ETH_LEN].copy_from_slice(&swapped_ethernet_header6());
    frame
}

pub fn ethernet_header(ether_type: u16) -> Vec<u8> {
    let mut frame = vec![0x02, 0, 0, 0, 0, 0x02, 0x02, 0, 0, 0, 0, 0x01];
    frame.extend_from_slice(&ether_type.to_be_bytes());
    frame
}

/// Whether an Ethernet/IPv4 frame's IP header checksum and TCP/UDP checksum (or SCTP CRC32c)
/// are both valid.
pub fn checksums_valid(frame: &[u8]) -> bool {
    let Some(ip) = frame.get(ETH_LEN..).filter(|ip| ip.len() >= 20) else { return false };
    let header_len = usize::from(ip[0] & 0x0f) * 4;
    if header_len < 20 || ip.len() < header_len || ones_complement_sum(&ip[..header_len], 0) != 0xffff {
        return false;
    }
    let total_len = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    let Some(l4) = ip.get(header_len..total_len) else { return false };
    let protocol = ip[9];
    if protocol == UDP && l4[6..8] == [0, 0] {
        return true;
    }
    if protocol == SCTP {
        return sctp_checksum_valid(l4);
    }
    let src = Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]);
    let dst = Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]);
    ones_complement_sum(l4, pseudo_header_sum(src, dst, protocol, l4.len())) == 0xffff
}

/// The flow a well-formed frame carries: what `lb explain` is asked about it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameFlow {
    pub source: std::net::SocketAddr,
    pub destination: std::net::SocketAddr,
    /// The IP protocol number (TCP, UDP or SCTP).
    pub protocol: u8,
    /// TCP's flags; 0 for the others.
    pub tcp_flags: u8,
}

/// The ports and flags of `l4` (TCP, UDP or SCTP), if its header is whole.
fn transport(protocol: u8, l4: &[u8]) -> Option<(u16, u16, u8)> {
    let header_len = match protocol {
        TCP => 20,
        UDP => 8,
        SCTP => 12,
        _ => return None,
    };
    if l4.len() < header_len {
        return None;
    }
    let flags = if protocol == TCP { l4[13] } else { 0 };
    Some((u16::from_be_bytes([l4[0], l4[1]]), u16::from_be_bytes([l4[2], l4[3]]), flags))
}

/// The flow of an Ethernet frame carrying IPv4 (options allowed) or IPv6 (no extension
/// headers) and a whole TCP, UDP or SCTP header, whose IP lengths match the frame; `None` for
/// anything else (fragments, ICMP, malformed or truncated packets).
pub fn flow_of(frame: &[u8]) -> Option<FrameFlow> {
    use std::net::SocketAddr;
    let ether_type = u16::from_be_bytes([*frame.get(12)?, *frame.get(13)?]);
    let ip = frame.get(ETH_LEN..)?;
    match ether_type {
        0x0800 => {
            let header_len = usize::from(*ip.first()? & 0x0f) * 4;
            let total_len = usize::from(u16::from_be_bytes([*ip.get(2)?, *ip.get(3)?]));
            let fragment = u16::from_be_bytes([*ip.get(6)?, *ip.get(7)?]) & 0x3fff;
            if ip[0] >> 4 != 4
                || header_len < 20
                || ip.len() < header_len
                || total_len != ip.len()
                || fragment != 0
            {
                return None;
            }
            let (src, dst) = (
                Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]),
                Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]),
            );
            let (src_port, dst_port, tcp_flags) = transport(ip[9], ip.get(header_len..total_len)?)?;
            Some(FrameFlow {
                source: SocketAddr::from((src, src_port)),
                destination: SocketAddr::from((dst, dst_port)),
                protocol: ip[9],
                tcp_flags,
            })
        }
        0x86dd => {
            let header = ip.get(..40)?;
            let payload_len = usize::from(u16::from_be_bytes([header[4], header[5]]));
            if header[0] >> 4 != 6 || payload_len + 40 != ip.len() {
                return None;
            }
            let address = |at: usize| Ipv6Addr::from(<[u8; 16]>::try_from(&header[at..at + 16]).unwrap());
            let (src_port, dst_port, tcp_flags) = transport(header[6], &ip[40..])?;
            Some(FrameFlow {
                source: SocketAddr::from((address(8), src_port)),
                destination: SocketAddr::from((address(24), dst_port)),
                protocol: header[6],
                tcp_flags,
            })
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_packets_have_valid_checksums() {
        let a = (Ipv4Addr::new(10, 0, 1, 2), 40000);
        let b = (Ipv4Addr::new(10, 96, 0, 10), 80);
        assert!(checksums_valid(&PacketSpec::tcp(a, b, 0x02).build()));
        assert!(checksums_valid(&PacketSpec::udp(a, b).build()));
        let mut broken = PacketSpec::tcp(a, b, 0x02).build();
        broken[ETH_LEN + 16] ^= 1;
        assert!(!checksums_valid(&broken));
        let a6 = ("fd00::2".parse().unwrap(), 40000);
        let b6 = ("fd00:96::10".parse().unwrap(), 80);
        assert!(checksums_valid6(&Packet6Spec::tcp(a6, b6, 0x02).build()));
        assert!(checksums_valid6(&Packet6Spec::udp(a6, b6).with_extension(HOP_BY_HOP, 0).build()));
        let mut broken = Packet6Spec::udp(a6, b6).build();
        broken[ETH_LEN + 8] ^= 1;
        assert!(!checksums_valid6(&broken));
        // SCTP's CRC32c covers the ports but no addresses.
        let init = PacketSpec::sctp(a, b).build();
        assert!(checksums_valid(&init));
        assert!(checksums_valid(&PacketSpec::sctp(a, (Ipv4Addr::new(10, 244, 1, 1), b.1)).build()));
        let mut other_address = init.clone();
        other_address[ETH_LEN + 19] ^= 1;
        assert!(!checksums_valid(&other_address), "the IPv4 header checksum no longer matches");
        assert!(sctp_checksum_valid(&other_address[ETH_LEN + 20..]), "the CRC32c still does");
        let mut other_port = init;
        other_port[ETH_LEN + 20 + 3] ^= 1;
        assert!(!sctp_checksum_valid(&other_port[ETH_LEN + 20..]));
        assert!(checksums_valid6(&Packet6Spec::sctp(a6, b6).build()));
    }

    #[test]
    fn the_sctp_checksum_is_crc32c() {
        // RFC 3720's CRC32c check value (B.4): 32 bytes of zeros give 0x8a9136aa.
        assert_eq!(crc::Crc::<u32>::new(&crc::CRC_32_ISCSI).checksum(&[0u8; 32]), 0x8a91_36aa);
    }
}
