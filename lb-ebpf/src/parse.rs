//! Header parsing for the TC programs: Ethernet -> IPv4 -> TCP/UDP ports and TCP flags, with
//! every length checked against the packet before a field is trusted. Headers are read in place
//! (direct packet access); only when they are not in the skb's linear part are they pulled in,
//! since pulling a cloned skb (TCP's are) copies it.

use core::mem::size_of;

use aya_ebpf::programs::TcContext;
use lb_common::counters;

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

/// An IPv4 packet's addressing, as found in its headers. Addresses and ports are in network
/// byte order, as on the wire and as in the map keys. A later fragment has no ports (0).
pub struct Ipv4Flow {
    pub l3_offset: usize,
    pub l4_offset: usize,
    pub protocol: u8,
    pub src_address: u32,
    pub dst_address: u32,
    pub src_port: u16,
    pub dst_port: u16,
    /// TCP only: the flags byte (SYN, ACK, FIN, RST...); 0 otherwise.
    pub tcp_flags: u8,
    pub fragment: Fragment,
    /// The IPv4 identification field, network byte order (meaningful for fragments).
    pub ip_id: u16,
}

impl Ipv4Flow {
    /// Offset of the L4 checksum field.
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
        u16::from_be(read::<u16>(ctx, ETH_TYPE_OFFSET).ok_or(Verdict::pass(counters::PASS_NOT_IPV4))?);
    if ether_type != ETH_P_IP {
        return Err(Verdict::pass(counters::PASS_NOT_IPV4));
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
    if protocol != PROTOCOL_TCP && protocol != PROTOCOL_UDP && protocol != PROTOCOL_ICMP {
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
        ip_id,
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
