//! lb's data path. The TC ingress programs, attached to every interface that carries Service
//! traffic, translate a client's packets to a frontend into packets to a backend, and the
//! backend's replies back to the frontend. `lb_ingress` sits on the pods' (and other in-cluster)
//! interfaces, `lb_ingress_external` on the node's uplinks: they differ only in whether a source
//! counts as inside the cluster. `lb_egress` translates the replies of endpoints in the node's
//! own host network. Beside them: an XDP program for the external interfaces (`xdp`) and cgroup
//! socket programs for the node's own connections (`socket`).
#![no_std]
#![no_main]

mod conntrack;
mod csum;
mod flow;
mod fragment;
mod headers;
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
use lb_common::{ConntrackEntry, FlowKey, counters};

use crate::{
    conntrack::Tracked,
    flow::{NewFlow, Source},
    headers::PROTOCOL_ICMP,
    maps::count,
    parse::{Fragment, Ipv4Flow},
    verdict::Verdict,
};

/// Ingress of the pods' interfaces: sources here are inside the cluster.
#[classifier]
pub fn lb_ingress(ctx: TcContext) -> i32 {
    finish(try_lb_ingress(&ctx, Source::InCluster))
}

/// Ingress of the node's uplinks (`--external-interfaces`): sources here are outside the
/// cluster, so `externalTrafficPolicy: Local` applies to them.
#[classifier]
pub fn lb_ingress_external(ctx: TcContext) -> i32 {
    finish(try_lb_ingress(&ctx, Source::External))
}

/// Egress of the same interfaces: replies from sockets of the node's own (endpoints in the host
/// network) are translated back here, since they never cross an ingress lb sits on.
#[classifier]
pub fn lb_egress(ctx: TcContext) -> i32 {
    finish(try_lb_egress(&ctx))
}

/// Does nothing: the baseline that `cargo xtask bench` compares lb_ingress's cost with.
#[classifier]
pub fn lb_noop(_ctx: TcContext) -> i32 {
    verdict::TC_PASS
}

/// Set at load time (`lb run --test-program-variant`) to run programs whose code differs from
/// the default build's, so that tests can watch an upgrade swap code in place. Variant 1 also
/// counts every packet in the `PACKETS` slot, which the data path otherwise leaves to
/// userspace. The value is read-only data the verifier knows: it removes the branch at 0.
#[unsafe(no_mangle)]
static LB_PROGRAM_VARIANT: u32 = 0;

#[inline(always)]
fn finish(result: Result<Verdict, Verdict>) -> i32 {
    let verdict = match result {
        Ok(verdict) | Err(verdict) => verdict,
    };
    // SAFETY: a plain read of a global; volatile so the compiler keeps the load-time value.
    if unsafe { core::ptr::read_volatile(&LB_PROGRAM_VARIANT) } != 0 {
        count(counters::PACKETS);
    }
    count(verdict.counter);
    verdict.action
}

/// `Err` ends processing early; it carries a verdict just like `Ok`.
#[inline(always)]
fn try_lb_ingress(ctx: &TcContext, source: Source) -> Result<Verdict, Verdict> {
    let flow = parse::parse_ipv4_flow(ctx)?;
    if flow.protocol == PROTOCOL_ICMP {
        return match icmp::translate_error(ctx, &flow) {
            None => Ok(Verdict::pass(counters::PASS_OTHER_PROTOCOL)),
            Some(Err(verdict)) => Err(verdict),
            Some(Ok(entry)) => Ok(route_if_needed(ctx, &flow, &entry, counters::ICMP_ERROR_TRANSLATED)),
        };
    }
    if flow.fragment.is_later() {
        return fragment::translate_later(ctx, &flow, true);
    }
    let key = conntrack::packet_key(&flow);
    if let Some(entry) = conntrack::lookup(&key) {
        return match conntrack::on_packet(&key, entry, flow.tcp_flags, conntrack::now()) {
            Tracked::Translate(entry) => {
                let counter = if entry.is_reply() {
                    counters::REPLY_REVERSE_NAT
                } else {
                    counters::FORWARD_TRACKED_FLOW
                };
                translate(ctx, &flow, &entry, counter)
            }
            Tracked::Reopen => {
                count(counters::CONNTRACK_REOPENED);
                forward_new_flow(ctx, &flow, &key, source)
            }
            Tracked::NotOurs => Ok(Verdict::pass(counters::PASS_ENDED_FLOW)),
            Tracked::Reset => reject::reject(ctx, &flow, counters::RESET_BACKEND_GONE),
        };
    }
    forward_new_flow(ctx, &flow, &key, source)
}

#[inline(always)]
fn forward_new_flow(
    ctx: &TcContext,
    flow: &Ipv4Flow,
    key: &FlowKey,
    source: Source,
) -> Result<Verdict, Verdict> {
    match flow::new_flow(ctx, flow, key, source) {
        NewFlow::NotService => Ok(Verdict::pass(counters::PASS_NOT_SERVICE)),
        NewFlow::Reject => reject::reject(ctx, flow, counters::REJECT_NO_BACKEND),
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
    nat::rewrite(ctx, flow, entry)?;
    if flow.fragment == Fragment::First {
        fragment::remember(flow, entry);
    }
    maps::count_traffic(entry, ctx.len(), counter == counters::FORWARD_NEW_FLOW);
    Ok(route_if_needed(ctx, flow, entry, counter))
}

#[inline(always)]
fn route_if_needed(ctx: &TcContext, flow: &Ipv4Flow, entry: &ConntrackEntry, counter: u32) -> Verdict {
    route::if_flagged(ctx, flow, entry.flags, entry.src_address, entry.dst_address, counter)
}

/// Egress: only packets of the node's own sockets (and SYN-ACKs sent as SYN cookies, which have
/// none) can be replies of a host-network endpoint; forwarded packets (pods' traffic, flows lb
/// already translated) carry no socket and leave at the cost of a few checks.
#[inline(always)]
fn try_lb_egress(ctx: &TcContext) -> Result<Verdict, Verdict> {
    let pass = Verdict::pass(counters::EGRESS_PASS);
    // SAFETY: reads a field of the context the program was given.
    if unsafe { (*ctx.skb.skb).__bindgen_anon_2.sk }.is_null() && !is_plain_syn_ack(ctx) {
        return Ok(pass);
    }
    let Ok(flow) = parse::parse_ipv4_flow(ctx) else { return Ok(pass) };
    if flow.protocol == PROTOCOL_ICMP {
        // The node's own ICMP errors about a translated flow (port unreachable, say).
        return match icmp::translate_error(ctx, &flow) {
            None => Ok(pass),
            Some(Err(verdict)) => Err(verdict),
            Some(Ok(_)) => Ok(Verdict::pass(counters::EGRESS_REVERSE_NAT)),
        };
    }
    if flow.fragment.is_later() {
        return fragment::translate_later(ctx, &flow, false).map(|verdict| {
            if verdict.counter == counters::FRAGMENT_TRANSLATED {
                Verdict::pass(counters::EGRESS_REVERSE_NAT)
            } else {
                pass
            }
        });
    }
    let key = conntrack::packet_key(&flow);
    let Some(entry) = conntrack::lookup(&key) else { return Ok(pass) };
    // SAFETY: a pointer into the map's value, valid for this program run.
    if !unsafe { &*entry }.is_reply() {
        return Ok(pass);
    }
    match conntrack::on_packet(&key, entry, flow.tcp_flags, conntrack::now()) {
        Tracked::Translate(entry) => {
            nat::rewrite(ctx, &flow, &entry)?;
            if flow.fragment == Fragment::First {
                fragment::remember(&flow, &entry);
            }
            maps::count_traffic(&entry, ctx.len(), false);
            // Already leaving through the right interface: no routing of its own.
            Ok(Verdict::pass(counters::EGRESS_REVERSE_NAT))
        }
        Tracked::Reopen | Tracked::NotOurs | Tracked::Reset => Ok(pass),
    }
}

/// Whether the packet is a TCP SYN-ACK in a plain IPv4 header. The node answers with a SYN-ACK
/// that carries no socket when it sends SYN cookies (its SYN queue is full), so on egress such
/// a packet is looked at although it has no socket.
#[inline(always)]
fn is_plain_syn_ack(ctx: &TcContext) -> bool {
    use headers::*;
    let version_ihl = parse::read::<u8>(ctx, ETH_HEADER_LEN);
    let protocol = parse::read::<u8>(ctx, ETH_HEADER_LEN + IPV4_PROTOCOL_OFFSET);
    let flags = parse::read::<u8>(ctx, ETH_HEADER_LEN + IPV4_MIN_HEADER_LEN + TCP_FLAGS_OFFSET);
    version_ihl == Some(IPV4_VERSION_IHL_PLAIN)
        && protocol == Some(PROTOCOL_TCP)
        && flags.is_some_and(|flags| flags & (TCP_SYN | TCP_ACK) == TCP_SYN | TCP_ACK)
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
