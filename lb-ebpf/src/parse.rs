//! Header parsing for the TC programs: Ethernet -> IPv4 or IPv6 (and its extension headers) ->
//! TCP/UDP/SCTP ports and TCP flags, with
//! every length checked against the packet before a field is trusted. Headers are read in place
//! (direct packet access); only when they are not in the skb's linear part are they pulled in,
//! since pulling a cloned skb (TCP's are) copies it.

use core::mem::size_of;

use aya_ebpf::programs::TcContext;
use lb_common::{In6, counters};

use crate::headers::*;
use crate::verdict::Verdict;

/// Where a packet stands in its datagram's fragmentation.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Fragment {
    /// A whole datagram.
    No,
    /// The first of several fragments: it carries the ports.
    First,
    /// A later fragment: no L4 header, translated like its datagram's first fragment.
    Later,
    /// The last fragment (a later one without more-fragments): after it, the datagram's record
    /// is of no more use.
    Last,
}

impl Fragment {
    /// Whether this fragment carries no L4 header.
    pub fn is_later(self) -> bool {
        matches!(self, Fragment::Later | Fragment::Last)
    }
}

/// A packet's addressing, as found in its headers. Addresses and ports are in network byte
/// order, as on the wire and as in the map keys. A later fragment has no ports (0).
pub struct Flow<A> {
    pub l3_offset: usize,
    pub l4_offset: usize,
    /// The L4 protocol (IPv6: the last next-header).
    pub protocol: u8,
    pub src_address: A,
    pub dst_address: A,
    pub src_port: u16,
    pub dst_port: u16,
    /// TCP only: the flags byte (SYN, ACK, FIN, RST...); 0 otherwise.
    pub tcp_flags: u8,
    pub fragment: Fragment,
    /// The fragment's identification, network byte order: IPv4's 16-bit field (in the low
    /// half as read), or IPv6's fragment header's 32 bits.
    pub ip_id: u32,
}

pub type Ipv4Flow = Flow<u32>;
pub type Ipv6Flow = Flow<In6>;

impl Ipv6Flow {
    /// A flow to parse into.
    #[inline(always)]
    pub fn empty() -> Self {
        Self {
            l3_offset: 0,
            l4_offset: 0,
            protocol: 0,
            src_address: In6::default(),
            dst_address: In6::default(),
            src_port: 0,
            dst_port: 0,
            tcp_flags: 0,
            fragment: Fragment::No,
            ip_id: 0,
        }
    }
}

/// Bounds every header offset can be masked to. A flow kept in a map (IPv6's scratch) comes
/// back to the verifier as unknown numbers, which it refuses as packet offsets; masked, they
/// are bounded. Real offsets are far below it (Ethernet, IPv6 and four extension headers of
/// at most 2 KiB each).
const OFFSET_MASK: usize = 0x3fff;

impl<A> Flow<A> {
    /// `l3_offset`, bounded for direct packet access.
    #[inline(always)]
    pub fn l3(&self) -> usize {
        self.l3_offset & OFFSET_MASK
    }

    /// `l4_offset`, bounded for direct packet access.
    #[inline(always)]
    pub fn l4(&self) -> usize {
        self.l4_offset & OFFSET_MASK
    }

    /// Offset of the L4 checksum field (TCP and UDP; SCTP's CRC32c is never updated).
    pub fn l4_checksum_offset(&self) -> usize {
        self.l4_offset + if self.protocol == PROTOCOL_TCP { TCP_CHECKSUM_OFFSET } else { UDP_CHECKSUM_OFFSET }
    }
}

/// Reads a `T` at `offset`, or `None` past the linear data. The check against `data_end` is
/// what the verifier needs to see.
#[inline(always)]
pub fn read<T: Copy>(ctx: &TcContext, offset: usize) -> Option<T> {
    let start = ctx.data();
    if start + offset + size_of::<T>() > ctx.data_end() {
        return None;
    }
    // SAFETY: bounds checked above; packet data has no alignment guarantee.
    Some(unsafe { core::ptr::read_unaligned((start + offset) as *const T) })
}

/// A pointer to a `T` at `offset` in the linear data, bounds checked, for writing in place.
#[inline(always)]
pub fn at<T>(ctx: &TcContext, offset: usize) -> Option<*mut T> {
    let start = ctx.data();
    (start + offset + size_of::<T>() <= ctx.data_end()).then_some((start + offset) as *mut T)
}

/// The frame's EtherType (host byte order).
#[inline(always)]
pub fn ether_type(ctx: &TcContext) -> Option<u16> {
    read::<u16>(ctx, ETH_TYPE_OFFSET).map(u16::from_be)
}

/// Parses an Ethernet frame. `Err` carries the verdict for packets lb leaves alone.
#[inline(always)]
pub fn parse_ipv4_flow(ctx: &TcContext) -> Result<Ipv4Flow, Verdict> {
    let packet_len = ctx.len() as usize;
    let truncated = || Verdict::pass(counters::PASS_TRUNCATED);
    if ctx.data_end() - ctx.data() < COMMON_HEADERS_LEN && packet_len > ctx.data_end() - ctx.data() {
        // Headers in paged data (GRO, some drivers): make them linear. Failure leaves the
        // packet as it was; the reads below then find it short.
        let _ = ctx.pull_data(MAX_HEADERS_LEN.min(packet_len) as u32);
    }

    let ether_type =
        u16::from_be(read::<u16>(ctx, ETH_TYPE_OFFSET).ok_or(Verdict::pass(counters::PASS_NOT_IP))?);
    if ether_type != ETH_P_IP {
        return Err(Verdict::pass(counters::PASS_NOT_IP));
    }
    let l3_offset = ETH_HEADER_LEN;
    let version_ihl = read::<u8>(ctx, l3_offset).ok_or_else(truncated)?;
    let header_len = usize::from(version_ihl & 0x0f) * 4;
    if version_ihl >> 4 != 4 || header_len < IPV4_MIN_HEADER_LEN {
        return Err(Verdict::pass(counters::PASS_MALFORMED));
    }
    let total_len =
        usize::from(u16::from_be(read::<u16>(ctx, l3_offset + IPV4_TOTAL_LEN_OFFSET).ok_or_else(truncated)?));
    if total_len < header_len {
        return Err(Verdict::pass(counters::PASS_MALFORMED));
    }
    if packet_len < l3_offset + total_len {
        return Err(truncated());
    }
    let protocol = read::<u8>(ctx, l3_offset + IPV4_PROTOCOL_OFFSET).ok_or_else(truncated)?;
    if !matches!(protocol, PROTOCOL_TCP | PROTOCOL_UDP | PROTOCOL_SCTP | PROTOCOL_ICMP) {
        return Err(Verdict::pass(counters::PASS_OTHER_PROTOCOL));
    }
    let fragment_word =
        u16::from_be(read::<u16>(ctx, l3_offset + IPV4_FRAGMENT_OFFSET).ok_or_else(truncated)?);
    let fragment = if fragment_word & IPV4_FRAGMENT_OFFSET_MASK != 0 {
        if fragment_word & IPV4_MORE_FRAGMENTS != 0 { Fragment::Later } else { Fragment::Last }
    } else if fragment_word & IPV4_MORE_FRAGMENTS != 0 {
        Fragment::First
    } else {
        Fragment::No
    };
    let ip_id = read::<u16>(ctx, l3_offset + IPV4_ID_OFFSET).ok_or_else(truncated)?;
    let src_address = read::<u32>(ctx, l3_offset + IPV4_SRC_OFFSET).ok_or_else(truncated)?;
    let dst_address = read::<u32>(ctx, l3_offset + IPV4_DST_OFFSET).ok_or_else(truncated)?;
    let l4_offset = l3_offset + header_len;
    let mut flow = Ipv4Flow {
        l3_offset,
        l4_offset,
        protocol,
        src_address,
        dst_address,
        src_port: 0,
        dst_port: 0,
        tcp_flags: 0,
        fragment,
        ip_id: u32::from(ip_id),
    };
    if fragment.is_later() {
        if protocol == PROTOCOL_ICMP {
            return Err(Verdict::pass(counters::PASS_FRAGMENT));
        }
        return Ok(flow);
    }
    let l4_min_len = match protocol {
        PROTOCOL_TCP => TCP_MIN_HEADER_LEN,
        PROTOCOL_UDP => UDP_HEADER_LEN,
        PROTOCOL_SCTP => SCTP_COMMON_HEADER_LEN,
        _ => ICMP_ERROR_MIN_LEN,
    };
    if total_len < header_len + l4_min_len {
        // A short ICMP message is no error lb translates; leave it to the stack.
        let counter =
            if protocol == PROTOCOL_ICMP { counters::PASS_OTHER_PROTOCOL } else { counters::PASS_TRUNCATED };
        return Err(Verdict::pass(counter));
    }
    if protocol == PROTOCOL_ICMP {
        // ICMP has no ports; `icmp` reads what it needs.
        return if fragment == Fragment::No { Ok(flow) } else { Err(Verdict::pass(counters::PASS_FRAGMENT)) };
    }
    if ctx.data_end() - ctx.data() < l4_offset + l4_min_len {
        // IP options pushed the L4 header past the linear part.
        let _ = ctx.pull_data(MAX_HEADERS_LEN.min(packet_len) as u32);
    }
    flow.src_port = read::<u16>(ctx, l4_offset + L4_SRC_PORT_OFFSET).ok_or_else(truncated)?;
    flow.dst_port = read::<u16>(ctx, l4_offset + L4_DST_PORT_OFFSET).ok_or_else(truncated)?;
    if protocol == PROTOCOL_TCP {
        flow.tcp_flags = read::<u8>(ctx, l4_offset + TCP_FLAGS_OFFSET).ok_or_else(truncated)?;
    }
    Ok(flow)
}

/// Parses an Ethernet frame carrying IPv6 into `flow`, walking the extension headers lb can pass
/// over (hop-by-hop and destination options, a routing header with no segments left, a
/// fragment header) to the TCP/UDP header. `Err` carries the verdict for packets lb leaves
/// alone. (Filled in place: a returned IPv6 flow would be copied through the BPF stack.)
#[inline(always)]
pub fn parse_ipv6_flow(ctx: &TcContext, flow: &mut Ipv6Flow) -> Result<(), Verdict> {
    let packet_len = ctx.len() as usize;
    let truncated = || Verdict::pass(counters::PASS_TRUNCATED);
    if ctx.data_end() - ctx.data() < COMMON_HEADERS_LEN6 && packet_len > ctx.data_end() - ctx.data() {
        let _ = ctx.pull_data(COMMON_HEADERS_LEN6.min(packet_len) as u32);
    }
    let ether_type =
        u16::from_be(read::<u16>(ctx, ETH_TYPE_OFFSET).ok_or(Verdict::pass(counters::PASS_NOT_IP))?);
    if ether_type != ETH_P_IPV6 {
        return Err(Verdict::pass(counters::PASS_NOT_IP));
    }
    let l3_offset = ETH_HEADER_LEN;
    let version = read::<u8>(ctx, l3_offset).ok_or_else(truncated)? >> 4;
    let payload_len = usize::from(u16::from_be(
        read::<u16>(ctx, l3_offset + IPV6_PAYLOAD_LEN_OFFSET).ok_or_else(truncated)?,
    ));
    // A payload length of 0 is a jumbogram's (RFC 2675): not on the links lb serves.
    if version != 6 || payload_len == 0 {
        return Err(Verdict::pass(counters::PASS_MALFORMED));
    }
    if packet_len < l3_offset + IPV6_HEADER_LEN + payload_len {
        return Err(truncated());
    }
    flow.src_address = read::<In6>(ctx, l3_offset + IPV6_SRC_OFFSET).ok_or_else(truncated)?;
    flow.dst_address = read::<In6>(ctx, l3_offset + IPV6_DST_OFFSET).ok_or_else(truncated)?;
    let end = l3_offset + IPV6_HEADER_LEN + payload_len;
    let mut protocol = read::<u8>(ctx, l3_offset + IPV6_NEXT_HEADER_OFFSET).ok_or_else(truncated)?;
    let mut l4_offset = l3_offset + IPV6_HEADER_LEN;
    let mut fragment = Fragment::No;
    let mut walked = 0;
    while walked < IPV6_MAX_EXTENSION_HEADERS {
        if !matches!(protocol, IPV6_HOP_BY_HOP | IPV6_ROUTING | IPV6_DEST_OPTIONS | IPV6_FRAGMENT) {
            break;
        }
        if ctx.data_end() - ctx.data() < l4_offset + 8 && packet_len >= l4_offset + 8 {
            let _ = ctx.pull_data((l4_offset + 8) as u32);
        }
        let [next, length] = read::<[u8; 2]>(ctx, l4_offset).ok_or_else(truncated)?;
        let header_len = if protocol == IPV6_FRAGMENT {
            let word =
                u16::from_be(read::<u16>(ctx, l4_offset + IPV6_FRAGMENT_WORD_OFFSET).ok_or_else(truncated)?);
            flow.ip_id = read::<u32>(ctx, l4_offset + IPV6_FRAGMENT_ID_OFFSET).ok_or_else(truncated)?;
            fragment = if word & IPV6_FRAGMENT_OFFSET_MASK != 0 {
                if word & IPV6_MORE_FRAGMENTS != 0 { Fragment::Later } else { Fragment::Last }
            } else if word & IPV6_MORE_FRAGMENTS != 0 {
                Fragment::First
            } else {
                // An atomic fragment (RFC 6946): a whole datagram.
                Fragment::No
            };
            IPV6_FRAGMENT_HEADER_LEN
        } else {
            if protocol == IPV6_ROUTING
                && read::<u8>(ctx, l4_offset + IPV6_ROUTING_SEGMENTS_LEFT_OFFSET).ok_or_else(truncated)? != 0
            {
                // Not yet at its final destination: the address lb would match is a waypoint's.
                return Err(Verdict::pass(counters::PASS_IPV6_EXTENSION));
            }
            (usize::from(length) + 1) * 8
        };
        protocol = next;
        l4_offset += header_len;
        walked += 1;
    }
    if matches!(
        protocol,
        IPV6_HOP_BY_HOP | IPV6_ROUTING | IPV6_DEST_OPTIONS | IPV6_FRAGMENT | IPV6_ESP | IPV6_AUTH
    ) {
        return Err(Verdict::pass(counters::PASS_IPV6_EXTENSION));
    }
    if !matches!(protocol, PROTOCOL_TCP | PROTOCOL_UDP | PROTOCOL_SCTP | PROTOCOL_ICMPV6) {
        return Err(Verdict::pass(counters::PASS_OTHER_PROTOCOL));
    }
    flow.l3_offset = l3_offset;
    flow.l4_offset = l4_offset;
    flow.protocol = protocol;
    flow.fragment = fragment;
    if fragment.is_later() {
        // No L4 header: translated as its datagram's first fragment was (`fragment`).
        return Ok(());
    }
    if protocol == PROTOCOL_ICMPV6 {
        // No ports: an error about a translated flow is translated back (`icmp`).
        return Ok(());
    }
    let l4_min_len = match protocol {
        PROTOCOL_TCP => TCP_MIN_HEADER_LEN,
        PROTOCOL_UDP => UDP_HEADER_LEN,
        _ => SCTP_COMMON_HEADER_LEN,
    };
    if end < l4_offset + l4_min_len {
        return Err(truncated());
    }
    if ctx.data_end() - ctx.data() < l4_offset + l4_min_len {
        let _ = ctx.pull_data((l4_offset + l4_min_len) as u32);
    }
    flow.src_port = read::<u16>(ctx, l4_offset + L4_SRC_PORT_OFFSET).ok_or_else(truncated)?;
    flow.dst_port = read::<u16>(ctx, l4_offset + L4_DST_PORT_OFFSET).ok_or_else(truncated)?;
    if protocol == PROTOCOL_TCP {
        flow.tcp_flags = read::<u8>(ctx, l4_offset + TCP_FLAGS_OFFSET).ok_or_else(truncated)?;
    }
    Ok(())
}
