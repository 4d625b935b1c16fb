//! ICMP errors about a translated flow (fragmentation needed, unreachable, time exceeded)
//! carry the offending packet's headers as the sender saw them, after translation. They are
//! turned back into what the receiver sent, so it can match them to its socket: path MTU
//! discovery then works through a ClusterIP.

use aya_ebpf::programs::TcContext;
use lb_common::{ConntrackEntry, FlowKey, PROTOCOL_TCP, PROTOCOL_UDP, counters};

use crate::{
    headers::{
        ICMP_CHECKSUM_OFFSET, ICMP_DEST_UNREACHABLE, ICMP_HEADER_LEN, ICMP_PARAMETER_PROBLEM,
        ICMP_TIME_EXCEEDED, IPV4_CHECKSUM_OFFSET, IPV4_DST_OFFSET,
        IPV4_MIN_HEADER_LEN as INNER_IPV4_HEADER_LEN, IPV4_PROTOCOL_OFFSET, IPV4_SRC_OFFSET,
        IPV4_VERSION_IHL_PLAIN,
    },
    maps::LB_CONNTRACK,
    parse::Ipv4Flow,
    verdict::Verdict,
};

/// The ICMP error's quoted packet, as found.
struct Quoted {
    offset: usize,
    protocol: u8,
    src_address: u32,
    dst_address: u32,
    src_port: u16,
    dst_port: u16,
}

#[inline(always)]
fn quoted(ctx: &TcContext, flow: &Ipv4Flow) -> Option<Quoted> {
    let icmp_type: u8 = ctx.load(flow.l4_offset).ok()?;
    if !matches!(icmp_type, ICMP_DEST_UNREACHABLE | ICMP_TIME_EXCEEDED | ICMP_PARAMETER_PROBLEM) {
        return None;
    }
    let offset = flow.l4_offset + ICMP_HEADER_LEN;
    // Quoted options would move the ports; senders do not use them towards Services.
    if ctx.load::<u8>(offset).ok()? != IPV4_VERSION_IHL_PLAIN {
        return None;
    }
    let protocol: u8 = ctx.load(offset + IPV4_PROTOCOL_OFFSET).ok()?;
    if protocol != PROTOCOL_TCP && protocol != PROTOCOL_UDP {
        return None;
    }
    Some(Quoted {
        offset,
        protocol,
        src_address: ctx.load(offset + IPV4_SRC_OFFSET).ok()?,
        dst_address: ctx.load(offset + IPV4_DST_OFFSET).ok()?,
        src_port: ctx.load(offset + INNER_IPV4_HEADER_LEN).ok()?,
        dst_port: ctx.load(offset + INNER_IPV4_HEADER_LEN + 2).ok()?,
    })
}

/// Translates an ICMP error about a tracked flow and returns the entry it was translated by;
/// `None` for any other ICMP packet.
///
/// The quoted packet went from A to B, so the error travels towards A. The conntrack entry for
/// B -> A says how that direction is rewritten (to S -> D): the quote becomes D -> S, the
/// error is addressed to D, and if B itself sent it, it comes from S.
#[inline(always)]
pub fn translate_error(ctx: &TcContext, flow: &Ipv4Flow) -> Option<Result<ConntrackEntry, Verdict>> {
    let inner = quoted(ctx, flow)?;
    let key = FlowKey {
        src_address: inner.dst_address,
        dst_address: inner.src_address,
        src_port: inner.dst_port,
        dst_port: inner.src_port,
        protocol: inner.protocol,
        _pad0: 0,
        _pad1: 0,
    };
    // SAFETY: copied out at once.
    let entry = unsafe { LB_CONNTRACK.get(&key) }.copied()?;
    Some(rewrite(ctx, flow, &inner, &entry).map(|()| entry))
}

#[inline(always)]
fn rewrite(ctx: &TcContext, flow: &Ipv4Flow, inner: &Quoted, entry: &ConntrackEntry) -> Result<(), Verdict> {
    let failed = |_| Verdict::drop(counters::DROP_REWRITE_FAILED);
    let icmp_checksum = flow.l4_offset + ICMP_CHECKSUM_OFFSET;
    // Quoted addresses: the quoted header's own checksum absorbs the change, so the quote
    // still sums to the same and the ICMP checksum needs no update for them.
    for (offset, old, new) in [
        (inner.offset + IPV4_SRC_OFFSET, inner.src_address, entry.dst_address),
        (inner.offset + IPV4_DST_OFFSET, inner.dst_address, entry.src_address),
    ] {
        if old != new {
            ctx.l3_csum_replace(inner.offset + IPV4_CHECKSUM_OFFSET, u64::from(old), u64::from(new), 4)
                .map_err(failed)?;
            ctx.store(offset, &new, 0).map_err(failed)?;
        }
    }
    // Quoted ports are covered by the ICMP checksum only (the quoted L4 checksum, if any, is
    // left as it was: receivers do not check it).
    for (offset, old, new) in [
        (inner.offset + INNER_IPV4_HEADER_LEN, inner.src_port, entry.dst_port),
        (inner.offset + INNER_IPV4_HEADER_LEN + 2, inner.dst_port, entry.src_port),
    ] {
        if old != new {
            ctx.l4_csum_replace(icmp_checksum, u64::from(old), u64::from(new), 2).map_err(failed)?;
            ctx.store(offset, &new, 0).map_err(failed)?;
        }
    }
    // The outer header: ICMP has no pseudo-header, so only the IP checksum changes.
    let new_src = if flow.src_address == inner.dst_address { entry.src_address } else { flow.src_address };
    for (offset, old, new) in [
        (flow.l3_offset + IPV4_SRC_OFFSET, flow.src_address, new_src),
        (flow.l3_offset + IPV4_DST_OFFSET, flow.dst_address, entry.dst_address),
    ] {
        if old != new {
            ctx.l3_csum_replace(flow.l3_offset + IPV4_CHECKSUM_OFFSET, u64::from(old), u64::from(new), 4)
                .map_err(failed)?;
            ctx.store(offset, &new, 0).map_err(failed)?;
        }
    }
    Ok(())
}
