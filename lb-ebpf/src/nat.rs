//! Address and port rewriting. Addresses, ports and the IPv4 header checksum are written in
//! place (direct packet access: no helper call, no copy of an unshared skb). The TCP/UDP
//! checksum is left to the kernel's `l4_csum_replace`, which alone knows how the skb carries it
//! (a full checksum, or CHECKSUM_PARTIAL's pseudo-header sum that only address changes touch)
//! and keeps `skb->csum` right for CHECKSUM_COMPLETE: one call for the addresses, one for the
//! ports, each with the combined difference (RFC 1624).

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    programs::TcContext,
};
use lb_common::{ConntrackEntryOf, PROTOCOL_SCTP, PROTOCOL_UDP, counters};

use crate::{
    csum,
    family::Family,
    headers::{L4_DST_PORT_OFFSET, L4_SRC_PORT_OFFSET},
    parse::{Flow, at},
    verdict::Verdict,
};

#[inline(always)]
pub fn write<T>(ctx: &TcContext, offset: usize, value: T) -> Result<(), Verdict> {
    let pointer = at::<T>(ctx, offset).ok_or(Verdict::drop(counters::DROP_REWRITE_FAILED))?;
    // SAFETY: bounds checked by `at`; packet data has no alignment guarantee.
    unsafe { core::ptr::write_unaligned(pointer, value) };
    Ok(())
}

/// Rewrites the packet to the addresses a conntrack entry holds: addresses, ports, and the
/// checksums.
#[inline(always)]
pub fn rewrite<A: Family>(ctx: &TcContext, flow: &Flow<A>, to: &ConntrackEntryOf<A>) -> Result<(), Verdict> {
    let failed = |_| Verdict::drop(counters::DROP_REWRITE_FAILED);
    if flow.protocol == PROTOCOL_SCTP {
        return rewrite_sctp(ctx, flow, to);
    }
    let address_diff = A::rewrite_addresses(ctx, flow, to.src_address, to.dst_address)?;
    let mut port_diff = 0;
    let mut ports_changed = false;
    if flow.src_port != to.src_port {
        port_diff = csum::add32(port_diff, csum::diff2(flow.src_port, to.src_port));
        write(ctx, flow.l4() + L4_SRC_PORT_OFFSET, to.src_port)?;
        ports_changed = true;
    }
    if flow.dst_port != to.dst_port {
        port_diff = csum::add32(port_diff, csum::diff2(flow.dst_port, to.dst_port));
        write(ctx, flow.l4() + L4_DST_PORT_OFFSET, to.dst_port)?;
        ports_changed = true;
    }
    // A UDP checksum of 0 means "none": MARK_MANGLED_0 leaves it 0, and writes 0xffff where an
    // update would produce 0.
    let udp_flag = if flow.protocol == PROTOCOL_UDP { u64::from(BPF_F_MARK_MANGLED_0) } else { 0 };
    let l4_checksum = flow.l4_checksum_offset();
    let addresses_changed = flow.src_address != to.src_address || flow.dst_address != to.dst_address;
    // Size 0 in the flags: `to` is a checksum difference, not a value.
    if addresses_changed {
        ctx.l4_csum_replace(l4_checksum, 0, u64::from(address_diff), u64::from(BPF_F_PSEUDO_HDR) | udp_flag)
            .map_err(failed)?;
    }
    if ports_changed {
        ctx.l4_csum_replace(l4_checksum, 0, u64::from(port_diff), udp_flag).map_err(failed)?;
    }
    Ok(())
}

/// SCTP: addresses only. Its CRC32c covers no pseudo-header, so new addresses leave it valid;
/// it does cover the ports, which lb therefore never changes (the controller serves no SCTP
/// frontend whose backends listen on another port, and source NAT keeps an SCTP client's port).
#[inline(never)]
fn rewrite_sctp<A: Family>(ctx: &TcContext, flow: &Flow<A>, to: &ConntrackEntryOf<A>) -> Result<(), Verdict> {
    if flow.src_port != to.src_port || flow.dst_port != to.dst_port {
        return Err(Verdict::drop(counters::DROP_SCTP_PORT_REWRITE));
    }
    A::rewrite_addresses(ctx, flow, to.src_address, to.dst_address).map(|_| ())
}
