//! Header parsing: Ethernet -> IPv4 -> TCP/UDP ports, with every length checked against the
//! packet before a field is trusted. Headers are read in place (direct packet access); when
//! they are not all in the skb's linear part, they are pulled in once first.

use core::mem::size_of;

use aya_ebpf::programs::TcContext;
use lb_common::{PROTOCOL_TCP, PROTOCOL_UDP, counters};

use crate::verdict::Verdict;

pub const ETH_HEADER_LEN: usize = 14;
const ETH_TYPE_OFFSET: usize = 12;
const ETH_P_IP: u16 = 0x0800;
const IPV4_MIN_HEADER_LEN: usize = 20;
const IPV4_MAX_HEADER_LEN: usize = 60;
/// Fragment offset mask and more-fragments flag in the IPv4 flags/fragment field.
const IPV4_FRAGMENT_MASK: u16 = 0x3fff;

const IPV4_TOTAL_LEN_OFFSET: usize = 2;
const IPV4_FRAGMENT_OFFSET: usize = 6;
const IPV4_PROTOCOL_OFFSET: usize = 9;
pub const IPV4_CHECKSUM_OFFSET: usize = 10;
pub const IPV4_SRC_OFFSET: usize = 12;
pub const IPV4_DST_OFFSET: usize = 16;
pub const L4_SRC_PORT_OFFSET: usize = 0;
pub const L4_DST_PORT_OFFSET: usize = 2;
const TCP_CHECKSUM_OFFSET: usize = 16;
const TCP_MIN_HEADER_LEN: usize = 20;
const UDP_CHECKSUM_OFFSET: usize = 6;
const UDP_HEADER_LEN: usize = 8;
pub const PROTOCOL_ICMP: u8 = 1;
/// An ICMP error header and the quoted IPv4 header and ports it must carry to be translated.
const ICMP_ERROR_MIN_LEN: usize = 8 + 20 + 4;
/// Enough linear bytes for the longest headers lb reads: Ethernet, IPv4 with options, TCP.
const MAX_HEADERS_LEN: usize = ETH_HEADER_LEN + IPV4_MAX_HEADER_LEN + TCP_MIN_HEADER_LEN;

/// An IPv4 TCP or UDP packet's addressing, as found in its headers. Addresses and ports are
/// in network byte order, as on the wire and as in the map keys.
pub struct Ipv4Flow {
    pub l3_offset: usize,
    pub l4_offset: usize,
    pub protocol: u8,
    pub src_address: u32,
    pub dst_address: u32,
    pub src_port: u16,
    pub dst_port: u16,
}

impl Ipv4Flow {
    /// Offset of the L4 checksum field.
    pub fn l4_checksum_offset(&self) -> usize {
        self.l4_offset + if self.protocol == PROTOCOL_TCP { TCP_CHECKSUM_OFFSET } else { UDP_CHECKSUM_OFFSET }
    }
}

/// Reads a `T` at `offset`, or `None` past the linear data. The caller's check against
/// `data_end` is what the verifier needs to see.
#[inline(always)]
fn read<T: Copy>(ctx: &TcContext, offset: usize) -> Option<T> {
    let start = ctx.data();
    if start + offset + size_of::<T>() > ctx.data_end() {
        return None;
    }
    // SAFETY: bounds checked above; packet data has no alignment guarantee.
    Some(unsafe { core::ptr::read_unaligned((start + offset) as *const T) })
}

/// Parses an Ethernet frame. `Err` carries the verdict for packets lb leaves alone.
#[inline(always)]
pub fn parse_ipv4_flow(ctx: &TcContext) -> Result<Ipv4Flow, Verdict> {
    let packet_len = ctx.len() as usize;
    let linear_len = ctx.data_end() - ctx.data();
    if linear_len < MAX_HEADERS_LEN && linear_len < packet_len {
        // Headers in paged data (GRO, some drivers): make them linear. Failure leaves the
        // packet as it was; the reads below then find it short.
        let _ = ctx.pull_data(MAX_HEADERS_LEN.min(packet_len) as u32);
    }
    let truncated = || Verdict::pass(counters::PASS_TRUNCATED);

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
    // Only the first fragment has ports, so no fragment can be translated on its own.
    let fragment = u16::from_be(read::<u16>(ctx, l3_offset + IPV4_FRAGMENT_OFFSET).ok_or_else(truncated)?);
    if fragment & IPV4_FRAGMENT_MASK != 0 {
        return Err(Verdict::pass(counters::PASS_FRAGMENT));
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
    let l4_offset = l3_offset + header_len;
    if protocol == PROTOCOL_ICMP {
        // ICMP has no ports; `icmp` reads what it needs.
        return Ok(Ipv4Flow {
            l3_offset,
            l4_offset,
            protocol,
            src_address: read::<u32>(ctx, l3_offset + IPV4_SRC_OFFSET).ok_or_else(truncated)?,
            dst_address: read::<u32>(ctx, l3_offset + IPV4_DST_OFFSET).ok_or_else(truncated)?,
            src_port: 0,
            dst_port: 0,
        });
    }
    Ok(Ipv4Flow {
        l3_offset,
        l4_offset,
        protocol,
        src_address: read::<u32>(ctx, l3_offset + IPV4_SRC_OFFSET).ok_or_else(truncated)?,
        dst_address: read::<u32>(ctx, l3_offset + IPV4_DST_OFFSET).ok_or_else(truncated)?,
        src_port: read::<u16>(ctx, l4_offset + L4_SRC_PORT_OFFSET).ok_or_else(truncated)?,
        dst_port: read::<u16>(ctx, l4_offset + L4_DST_PORT_OFFSET).ok_or_else(truncated)?,
    })
}
