//! IP fragments. Only a datagram's first fragment carries the ports that pick its flow; its
//! later fragments carry only (source, destination, protocol, IP ID). When a first fragment is
//! translated, the addresses it was rewritten to are remembered under that key, and the later
//! fragments get the same addresses. A later fragment that arrives before its first one, or
//! after its record aged out (Linux's reassembly time, or the LRU map's room), is passed
//! untouched and counted; the last fragment removes the record, so a later datagram that
//! reuses the IP ID never meets it.

use aya_ebpf::programs::TcContext;
use lb_common::{ConntrackEntry, FRAGMENT_TIMEOUT_NS, FragmentKey, FragmentValue, counters};

use crate::{
    conntrack,
    family::Family,
    maps::{LB_FRAGMENTS, count},
    parse::{Fragment, Ipv4Flow},
    route,
    verdict::Verdict,
};

#[inline(always)]
fn key(flow: &Ipv4Flow) -> FragmentKey {
    FragmentKey {
        src_address: flow.src_address,
        dst_address: flow.dst_address,
        id: flow.ip_id,
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
