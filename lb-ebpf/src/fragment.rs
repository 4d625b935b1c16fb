//! IP fragments. Only a datagram's first fragment carries the ports that pick its flow; its
//! later fragments carry only (source, destination, protocol, IP ID). When a first fragment is
//! translated, the addresses it was rewritten to are remembered under that key, and the later
//! fragments get the same addresses. A later fragment that arrives before its first one, or
//! after its record aged out (Linux's reassembly time, or the LRU map's room), is passed
//! untouched and counted; the last fragment removes the record, so a later datagram that
//! reuses the IP ID never meets it.

use aya_ebpf::programs::TcContext;
use lb_common::{
    ConntrackEntry, ConntrackEntry6, FRAGMENT_TIMEOUT_NS, FragmentKey, FragmentKey6, FragmentValue,
    FragmentValue6, In6, counters,
};

use crate::{
    conntrack,
    family::Family,
    maps::{LB_FRAGMENTS, LB_FRAGMENTS6, count},
    parse::{Fragment, Ipv4Flow, Ipv6Flow},
    route,
    verdict::Verdict,
};

#[inline(always)]
fn key(flow: &Ipv4Flow) -> FragmentKey {
    FragmentKey {
        src_address: flow.src_address,
        dst_address: flow.dst_address,
        // IPv4's identification is 16 bits.
        id: flow.ip_id as u16,
        protocol: flow.protocol,
        _pad: 0,
    }
}

/// Records how a first fragment was translated, for the fragments that follow it.
#[inline(always)]
pub fn remember(flow: &Ipv4Flow, entry: &ConntrackEntry) {
    let value = FragmentValue {
        src_address: entry.src_address,
        dst_address: entry.dst_address,
        flags: entry.flags,
        _pad: 0,
        _pad1: 0,
        created_ns: conntrack::now(),
    };
    if LB_FRAGMENTS.insert(&key(flow), &value, 0).is_err() {
        count(counters::FRAGMENT_TRACK_FAILED);
    }
}

/// Translates a later fragment like its first one; `route` lets it be sent to its next hop
/// when its flow's packets are (ingress only).
#[inline(always)]
pub fn translate_later(ctx: &TcContext, flow: &Ipv4Flow, route: bool) -> Result<Verdict, Verdict> {
    let key = key(flow);
    // SAFETY: copied out at once.
    let Some(value) = (unsafe { LB_FRAGMENTS.get(&key) }).copied() else {
        return Ok(Verdict::pass(counters::PASS_FRAGMENT));
    };
    if conntrack::now().wrapping_sub(value.created_ns) > FRAGMENT_TIMEOUT_NS {
        let _ = LB_FRAGMENTS.remove(&key);
        return Ok(Verdict::pass(counters::PASS_FRAGMENT));
    }
    if flow.fragment == Fragment::Last {
        let _ = LB_FRAGMENTS.remove(&key);
    }
    // No L4 header here: only the addresses and the IP header checksum change (the first
    // fragment's L4 checksum already covers the whole datagram's new pseudo-header).
    u32::rewrite_addresses(ctx, flow, value.src_address, value.dst_address)?;
    if !route {
        return Ok(Verdict::pass(counters::FRAGMENT_TRANSLATED));
    }
    Ok(route::if_flagged(
        ctx,
        flow,
        value.flags,
        value.src_address,
        value.dst_address,
        counters::FRAGMENT_TRANSLATED,
    ))
}

#[inline(always)]
fn key6(flow: &Ipv6Flow) -> FragmentKey6 {
    FragmentKey6 {
        src_address: flow.src_address,
        dst_address: flow.dst_address,
        id: flow.ip_id,
        protocol: flow.protocol,
        _pad: 0,
        _pad1: 0,
    }
}

/// `remember` for IPv6.
#[inline(never)]
pub fn remember6(flow: &Ipv6Flow, entry: &ConntrackEntry6) {
    let value = FragmentValue6 {
        src_address: entry.src_address,
        dst_address: entry.dst_address,
        flags: entry.flags,
        _pad: 0,
        _pad1: 0,
        created_ns: conntrack::now(),
    };
    if LB_FRAGMENTS6.insert(&key6(flow), &value, 0).is_err() {
        count(counters::FRAGMENT_TRACK_FAILED);
    }
}

/// `translate_later` for IPv6 (no header checksum: only the addresses change).
#[inline(never)]
pub fn translate_later6(ctx: &TcContext, flow: &Ipv6Flow, route: bool) -> Result<Verdict, Verdict> {
    let key = key6(flow);
    let Some(value) = LB_FRAGMENTS6.get_ptr(&key) else {
        return Ok(Verdict::pass(counters::PASS_FRAGMENT));
    };
    // SAFETY: a pointer into the map's value, valid for this program run; read before the
    // record may be removed below.
    let (src, dst, flags, created_ns) =
        unsafe { ((*value).src_address, (*value).dst_address, (*value).flags, (*value).created_ns) };
    if conntrack::now().wrapping_sub(created_ns) > FRAGMENT_TIMEOUT_NS {
        let _ = LB_FRAGMENTS6.remove(&key);
        return Ok(Verdict::pass(counters::PASS_FRAGMENT));
    }
    if flow.fragment == Fragment::Last {
        let _ = LB_FRAGMENTS6.remove(&key);
    }
    In6::rewrite_addresses(ctx, flow, src, dst)?;
    if !route {
        return Ok(Verdict::pass(counters::FRAGMENT_TRANSLATED));
    }
    Ok(route::if_flagged(ctx, flow, flags, src, dst, counters::FRAGMENT_TRANSLATED))
}
