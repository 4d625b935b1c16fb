//! lb's TC ingress program. Attached to every interface that carries Service traffic, it
//! translates a client's packets to a frontend (ClusterIP:port) into packets to a backend pod,
//! and the backend's replies back to the frontend.
#![no_std]
#![no_main]

mod conntrack;
mod icmp;
mod maps;
mod nat;
mod parse;
mod reject;
mod route;
mod select;
mod socket;
mod verdict;

use aya_ebpf::{macros::classifier, maps::lpm_trie::Key, programs::TcContext};
use aya_log_ebpf::error;
use lb_common::{
    ConntrackEntry, FlowKey, ServiceKey, SourceRangeKey, conntrack_flags, counters, service_flags,
};

use crate::{
    maps::{LB_BACKENDS, LB_CONFIG, LB_SERVICES, LB_SOURCE_RANGES, count},
    parse::Ipv4Flow,
    verdict::Verdict,
};

#[classifier]
pub fn lb_ingress(ctx: TcContext) -> i32 {
    let verdict = match try_lb_ingress(&ctx) {
        Ok(verdict) | Err(verdict) => verdict,
    };
    count(verdict.counter);
    verdict.action
}

/// Does nothing: the baseline that `cargo xtask bench` compares lb_ingress's cost with.
#[classifier]
pub fn lb_noop(_ctx: TcContext) -> i32 {
    verdict::TC_PASS
}

/// `Err` ends processing early; it carries a verdict just like `Ok`.
#[inline(always)]
fn try_lb_ingress(ctx: &TcContext) -> Result<Verdict, Verdict> {
    let flow = parse::parse_ipv4_flow(ctx)?;
    if flow.protocol == parse::PROTOCOL_ICMP {
        return match icmp::translate_error(ctx, &flow) {
            None => Ok(Verdict::pass(counters::PASS_OTHER_PROTOCOL)),
            Some(Err(verdict)) => Err(verdict),
            Some(Ok((verdict, entry))) => Ok(route_if_needed(ctx, &flow, &entry, verdict.counter)),
        };
    }
    let key = conntrack::packet_key(&flow);

    if let Some(entry) = conntrack::lookup(&key) {
        let counter =
            if entry.is_reply() { counters::REPLY_REVERSE_NAT } else { counters::FORWARD_TRACKED_FLOW };
        return translate(ctx, &flow, &entry, counter);
    }
    forward_new_flow(ctx, &flow, &key)
}

#[inline(always)]
fn forward_new_flow(ctx: &TcContext, flow: &Ipv4Flow, key: &FlowKey) -> Result<Verdict, Verdict> {
    let service_key = ServiceKey {
        address: flow.dst_address,
        port: flow.dst_port,
        backend_slot: 0,
        protocol: flow.protocol,
        scope: 0,
        _pad: [0; 2],
    };
    // SAFETY (all map reads below): values are copied out at once.
    let Some(service) = (unsafe { LB_SERVICES.get(service_key) }).copied() else {
        return Ok(Verdict::pass(counters::PASS_NOT_SERVICE));
    };
    if service.flags & service_flags::SOURCE_RANGES != 0 {
        let range_key = Key::new(
            SourceRangeKey::prefix_len(32),
            SourceRangeKey { service_id: service.service_id.to_be(), address: flow.src_address },
        );
        if LB_SOURCE_RANGES.get(range_key).is_none() {
            return Ok(Verdict::drop(counters::DROP_SOURCE_RANGE));
        }
    }
    if service.backend_count == 0 {
        if service.flags & service_flags::DROP_WHEN_EMPTY != 0 {
            return Ok(Verdict::drop(counters::DROP_NO_LOCAL_BACKEND));
        }
        return reject::reject(ctx, flow);
    }
    let hash = select::flow_hash(flow);
    let slot_key = service_key.with_slot(select::backend_slot(hash, service.backend_count));
    // Only a controller bug (or a torn update) gets here: worth a log line, off the fast path.
    let inconsistent = |what: &str| {
        error!(ctx, "service {} slot {}: {} missing", service.service_id, slot_key.backend_slot, what);
        Verdict::drop(counters::DROP_SERVICE_INCONSISTENT)
    };
    let slot = unsafe { LB_SERVICES.get(slot_key) }.copied().ok_or_else(|| inconsistent("slot"))?;
    let backend =
        unsafe { LB_BACKENDS.get(slot.backend_id) }.copied().ok_or_else(|| inconsistent("backend"))?;

    // Source NAT for external traffic under Cluster policy, and for hairpin: a pod reaching
    // itself through the Service would otherwise get a packet from its own address.
    let snat_address = if service.flags & service_flags::SNAT != 0 || flow.src_address == backend.address {
        match LB_CONFIG.get(0).map(|config| config.snat_address) {
            Some(address) if address != 0 => Some(address),
            _ => return Ok(Verdict::drop(counters::DROP_SNAT_FAILED)),
        }
    } else {
        None
    };
    let route_replies = service.flags & service_flags::NODE_ADDRESS != 0;
    let entry = conntrack::track(
        key,
        hash,
        service.service_id,
        slot.backend_id,
        &backend,
        snat_address,
        route_replies,
    )?;
    translate(ctx, flow, &entry, counters::FORWARD_NEW_FLOW)
}

/// Rewrites the packet as `entry` says and sends it on: to its next hop directly when its
/// source became a node address, else through the stack.
#[inline(always)]
fn translate(
    ctx: &TcContext,
    flow: &Ipv4Flow,
    entry: &ConntrackEntry,
    counter: u32,
) -> Result<Verdict, Verdict> {
    nat::rewrite_to(ctx, flow, entry)?;
    Ok(route_if_needed(ctx, flow, entry, counter))
}

#[inline(always)]
fn route_if_needed(ctx: &TcContext, flow: &Ipv4Flow, entry: &ConntrackEntry, counter: u32) -> Verdict {
    if entry.flags & conntrack_flags::ROUTE != 0
        && let Some(action) = route::to_next_hop(ctx, flow, entry.src_address, entry.dst_address)
    {
        return Verdict { action, counter };
    }
    Verdict::pass(counter)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any path that could reach here, so it is never taken.
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
