//! ICMP errors about a translated flow (fragmentation needed, unreachable, time exceeded)
//! carry the offending packet's headers as the sender saw them, after translation. They are
//! turned back into what the receiver sent, so it can match them to its socket: path MTU
//! discovery then works through a ClusterIP.

use aya_ebpf::{bindings::BPF_F_PSEUDO_HDR, programs::TcContext};
use lb_common::{
    ConntrackEntry, ConntrackEntry6, FlowKey, FlowKey6, In6, PROTOCOL_SCTP, PROTOCOL_TCP, PROTOCOL_UDP,
    counters,
};

use crate::{
    csum,
    headers::{
        ICMP_CHECKSUM_OFFSET, ICMP_DEST_UNREACHABLE, ICMP_HEADER_LEN, ICMP_PARAMETER_PROBLEM,
        ICMP_TIME_EXCEEDED, IPV4_CHECKSUM_OFFSET, IPV4_DST_OFFSET,
        IPV4_MIN_HEADER_LEN as INNER_IPV4_HEADER_LEN, IPV4_PROTOCOL_OFFSET, IPV4_SRC_OFFSET,
        IPV4_VERSION_IHL_PLAIN,
    },
    maps::{LB_CONNTRACK, LB_CONNTRACK6},
    parse::{Ipv4Flow, Ipv6Flow, read},
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
    if !matches!(protocol, PROTOCOL_TCP | PROTOCOL_UDP | PROTOCOL_SCTP) {
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

/// `translate_error` for ICMPv6 (destination unreachable, packet too big, time exceeded,
/// parameter problem), whose checksum covers the whole message and a pseudo-header: every
/// address and port changed, outer or quoted, goes into it. The quote must be a plain IPv6
/// header followed by TCP or UDP (senders quote the packet as it left them, and lb's flows
/// carry no extension headers it would have to walk).
#[inline(always)]
pub fn translate_error6(ctx: &TcContext, flow: &Ipv6Flow) -> Option<Result<*const ConntrackEntry6, Verdict>> {
    use crate::headers::{
        ICMPV6_CHECKSUM_OFFSET, ICMPV6_DEST_UNREACHABLE, ICMPV6_ERROR_MIN_LEN, ICMPV6_HEADER_LEN,
        ICMPV6_PACKET_TOO_BIG, ICMPV6_PARAMETER_PROBLEM, ICMPV6_TIME_EXCEEDED, IPV6_DST_OFFSET,
        IPV6_HEADER_LEN, IPV6_NEXT_HEADER_OFFSET, IPV6_SRC_OFFSET,
    };
    let l4 = flow.l4();
    let needed = l4 + ICMPV6_ERROR_MIN_LEN;
    if ctx.data_end() - ctx.data() < needed && ctx.len() as usize >= needed {
        let _ = ctx.pull_data(needed as u32);
    }
    // Type and code together: a one-byte read's bounds check compiles into a form the verifier
    // does not take.
    let [icmp_type, _code]: [u8; 2] = read(ctx, l4)?;
    if !matches!(
        icmp_type,
        ICMPV6_DEST_UNREACHABLE | ICMPV6_PACKET_TOO_BIG | ICMPV6_TIME_EXCEEDED | ICMPV6_PARAMETER_PROBLEM
    ) {
        return None;
    }
    let inner = l4 + ICMPV6_HEADER_LEN;
    let protocol: u8 = read(ctx, inner + IPV6_NEXT_HEADER_OFFSET)?;
    if !matches!(protocol, PROTOCOL_TCP | PROTOCOL_UDP | PROTOCOL_SCTP) {
        return None;
    }
    let src: In6 = read(ctx, inner + IPV6_SRC_OFFSET)?;
    let dst: In6 = read(ctx, inner + IPV6_DST_OFFSET)?;
    let ports = inner + IPV6_HEADER_LEN;
    let src_port: u16 = read(ctx, ports)?;
    let dst_port: u16 = read(ctx, ports + 2)?;
    // The direction back to the quoted packet's sender (see `translate_error`).
    let key = FlowKey6 {
        src_address: dst,
        dst_address: src,
        src_port: dst_port,
        dst_port: src_port,
        protocol,
        _pad0: 0,
        _pad1: 0,
    };
    let entry = LB_CONNTRACK6.get_ptr(&key)?;
    // SAFETY: a pointer into the map's value, valid for this program run.
    let to = unsafe { &*entry };
    let failed = |_| Verdict::drop(counters::DROP_REWRITE_FAILED);
    let mut quoted_diff = 0;
    for (offset, old, new) in
        [(inner + IPV6_SRC_OFFSET, src, to.dst_address), (inner + IPV6_DST_OFFSET, dst, to.src_address)]
    {
        if old != new {
            quoted_diff = csum::add32(quoted_diff, crate::family::diff16(old, new));
            if let Err(verdict) = crate::nat::write(ctx, offset, new) {
                return Some(Err(verdict));
            }
        }
    }
    for (offset, old, new) in [(ports, src_port, to.dst_port), (ports + 2, dst_port, to.src_port)] {
        if old != new {
            quoted_diff = csum::add32(quoted_diff, csum::diff2(old, new));
            if let Err(verdict) = crate::nat::write(ctx, offset, new) {
                return Some(Err(verdict));
            }
        }
    }
    // The outer header: to the flow's client side; from the frontend if the quoted packet's
    // receiver (the backend) sent the error itself.
    let new_src = if flow.src_address == dst { to.src_address } else { flow.src_address };
    let outer_diff =
        match <In6 as crate::family::Family>::rewrite_addresses(ctx, flow, new_src, to.dst_address) {
            Ok(diff) => diff,
            Err(verdict) => return Some(Err(verdict)),
        };
    let checksum = l4 + ICMPV6_CHECKSUM_OFFSET;
    // Size 0 in the flags: the value is a checksum difference.
    if outer_diff != 0
        && let Err(error) =
            ctx.l4_csum_replace(checksum, 0, u64::from(outer_diff), u64::from(BPF_F_PSEUDO_HDR))
    {
        return Some(Err(failed(error)));
    }
    if quoted_diff != 0
        && let Err(error) = ctx.l4_csum_replace(checksum, 0, u64::from(quoted_diff), 0)
    {
        return Some(Err(failed(error)));
    }
    Some(Ok(entry))
}
