//! lb's data path. The TC ingress program, attached to every interface that carries Service
//! traffic, translates a client's packets to a frontend into packets to a backend pod, and the
//! backend's replies back to the frontend. Beside it: an XDP program for the external
//! interfaces (`xdp`) and cgroup socket programs for the node's own connections (`socket`).
#![no_std]
#![no_main]

mod conntrack;
mod csum;
mod flow;
mod icmp;
mod maps;
mod nat;
mod parse;
mod reject;
mod route;
mod select;
mod socket;
mod verdict;
mod xdp;

use aya_ebpf::{macros::classifier, programs::TcContext};
use lb_common::{ConntrackEntry, FlowKey, conntrack_flags, counters};

use crate::{flow::NewFlow, maps::count, parse::Ipv4Flow, verdict::Verdict};

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
    match flow::new_flow(ctx, flow, key, false) {
        NewFlow::NotService => Ok(Verdict::pass(counters::PASS_NOT_SERVICE)),
        NewFlow::Reject => reject::reject(ctx, flow),
        NewFlow::Drop(counter) => Ok(Verdict::drop(counter)),
        NewFlow::Tracked(entry) => translate(ctx, flow, &entry, counters::FORWARD_NEW_FLOW),
    }
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
