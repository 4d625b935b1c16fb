//! lb's TC ingress program. Attached to every interface that carries Service traffic, it
//! translates a client's packets to a frontend (ClusterIP:port) into packets to a backend pod,
//! and the backend's replies back to the frontend.
#![no_std]
#![no_main]

mod conntrack;
mod maps;
mod nat;
mod parse;
mod select;
mod verdict;

use aya_ebpf::{macros::classifier, programs::TcContext};
use aya_log_ebpf::error;
use lb_common::{ServiceKey, counters};

use crate::{
    maps::{LB_BACKENDS, LB_SERVICES, count},
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
    let key = conntrack::packet_key(&flow);

    if let Some(entry) = conntrack::lookup(&key) {
        nat::rewrite_to(ctx, &flow, &entry)?;
        let counter =
            if entry.is_reply() { counters::REPLY_REVERSE_NAT } else { counters::FORWARD_TRACKED_FLOW };
        return Ok(Verdict::pass(counter));
    }
    forward_new_flow(ctx, &flow, &key)
}

#[inline(always)]
fn forward_new_flow(ctx: &TcContext, flow: &Ipv4Flow, key: &lb_common::FlowKey) -> Result<Verdict, Verdict> {
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
    if service.backend_count == 0 {
        return Ok(Verdict::drop(counters::DROP_NO_BACKEND));
    }
    let slot_key = service_key.with_slot(select::backend_slot(flow, service.backend_count));
    // Only a controller bug (or a torn update) gets here: worth a log line, off the fast path.
    let inconsistent = |what: &str| {
        error!(ctx, "service {} slot {}: {} missing", service.service_id, slot_key.backend_slot, what);
        Verdict::drop(counters::DROP_SERVICE_INCONSISTENT)
    };
    let slot = unsafe { LB_SERVICES.get(slot_key) }.copied().ok_or_else(|| inconsistent("slot"))?;
    let backend =
        unsafe { LB_BACKENDS.get(slot.backend_id) }.copied().ok_or_else(|| inconsistent("backend"))?;

    let entry = conntrack::track(key, service.service_id, slot.backend_id, &backend);
    nat::rewrite_to(ctx, flow, &entry)?;
    Ok(Verdict::pass(counters::FORWARD_NEW_FLOW))
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
