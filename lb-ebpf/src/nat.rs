//! Address and port rewriting with incremental checksum updates (RFC 1624) done by the kernel's
//! csum helpers, which also keep `skb->csum` right for CHECKSUM_COMPLETE and CHECKSUM_PARTIAL
//! packets.

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    programs::TcContext,
};
use lb_common::{ConntrackEntry, PROTOCOL_UDP, counters};

use crate::{
    parse::{
        IPV4_CHECKSUM_OFFSET, IPV4_DST_OFFSET, IPV4_SRC_OFFSET, Ipv4Flow, L4_DST_PORT_OFFSET,
        L4_SRC_PORT_OFFSET,
    },
    verdict::Verdict,
};

/// Which end of the packet to rewrite.
#[derive(Clone, Copy)]
pub enum Side {
    Source,
    Destination,
}

/// Rewrites one end's address and port (both network byte order) and fixes the IPv4 header
/// checksum and the TCP/UDP checksum, whose pseudo-header covers the address.
#[inline(always)]
pub fn rewrite(
    ctx: &TcContext,
    flow: &Ipv4Flow,
    side: Side,
    new_address: u32,
    new_port: u16,
) -> Result<(), Verdict> {
    let (old_address, old_port, address_offset, port_offset) = match side {
        Side::Source => (flow.src_address, flow.src_port, IPV4_SRC_OFFSET, L4_SRC_PORT_OFFSET),
        Side::Destination => (flow.dst_address, flow.dst_port, IPV4_DST_OFFSET, L4_DST_PORT_OFFSET),
    };
    // A UDP checksum of 0 means "none": MARK_MANGLED_0 leaves it 0, and writes 0xffff where an
    // update would produce 0.
    let udp_flag = if flow.protocol == PROTOCOL_UDP { u64::from(BPF_F_MARK_MANGLED_0) } else { 0 };
    let l4_checksum = flow.l4_checksum_offset();
    let failed = |_| Verdict::drop(counters::DROP_REWRITE_FAILED);

    if old_address != new_address {
        ctx.l4_csum_replace(
            l4_checksum,
            u64::from(old_address),
            u64::from(new_address),
            u64::from(BPF_F_PSEUDO_HDR) | udp_flag | 4,
        )
        .map_err(failed)?;
        ctx.l3_csum_replace(
            flow.l3_offset + IPV4_CHECKSUM_OFFSET,
            u64::from(old_address),
            u64::from(new_address),
            4,
        )
        .map_err(failed)?;
        ctx.store(flow.l3_offset + address_offset, &new_address, 0).map_err(failed)?;
    }
    if old_port != new_port {
        ctx.l4_csum_replace(l4_checksum, u64::from(old_port), u64::from(new_port), udp_flag | 2)
            .map_err(failed)?;
        ctx.store(flow.l4_offset + port_offset, &new_port, 0).map_err(failed)?;
    }
    Ok(())
}

/// Rewrites the packet to the addresses a conntrack entry holds (`rewrite` leaves alone what
/// does not change).
#[inline(always)]
pub fn rewrite_to(ctx: &TcContext, flow: &Ipv4Flow, entry: &ConntrackEntry) -> Result<(), Verdict> {
    rewrite(ctx, flow, Side::Source, entry.src_address, entry.src_port)?;
    rewrite(ctx, flow, Side::Destination, entry.dst_address, entry.dst_port)
}
