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
mod family;
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
use lb_common::{ConntrackEntryOf, FlowKeyOf, counters, tail_calls};

use crate::{
    conntrack::{TrackSpace, Tracked},
    family::Family,
    flow::{NewFlow, Source},
    headers::{ETH_P_IPV6, PROTOCOL_ICMP},
    maps::{Scratch6, count},
    parse::{Flow, Fragment, Ipv4Flow, Ipv6Flow},
    verdict::Verdict,
};

/// Ingress of the pods' interfaces: sources here are inside the cluster.
#[classifier]
pub fn lb_ingress(ctx: TcContext) -> i32 {
    ipv6_in(&ctx, tail_calls::INGRESS6);
    finish(try_lb_ingress(&ctx, Source::InCluster))
}

/// Ingress of the node's uplinks (`--external-interfaces`): sources here are outside the
/// cluster, so `externalTrafficPolicy: Local` applies to them.
#[classifier]
pub fn lb_ingress_external(ctx: TcContext) -> i32 {
    ipv6_in(&ctx, tail_calls::INGRESS6_EXTERNAL);
    finish(try_lb_ingress(&ctx, Source::External))
}

/// Egress of the same interfaces: replies from sockets of the node's own (endpoints in the host
/// network) are translated back here, since they never cross an ingress lb sits on.
#[classifier]
pub fn lb_egress(ctx: TcContext) -> i32 {
    ipv6_in(&ctx, tail_calls::EGRESS6);
    finish(try_lb_egress(&ctx))
}

/// The IPv6 halves of the programs above, tail-called by them (`ipv6_in`): a program of its
/// own gives IPv6, whose addresses, keys and entries are four times IPv4's, a BPF stack of its
/// own, and keeps the IPv4 path as it was (one EtherType test more).
#[classifier]
pub fn lb_ingress6(ctx: TcContext) -> i32 {
    finish(ingress_ipv6(&ctx, Source::InCluster))
}

#[classifier]
pub fn lb_ingress6_external(ctx: TcContext) -> i32 {
    finish(ingress_ipv6(&ctx, Source::External))
}

#[classifier]
pub fn lb_egress6(ctx: TcContext) -> i32 {
    finish(egress_ipv6(&ctx))
}

/// Continues an IPv6 packet in the program at `slot` of the programs map; returns only if it
/// is not IPv6, or if the slot is empty (userspace fills it before attaching anything, so the
/// packet then goes on as a non-IP one would: untouched).
#[inline(always)]
fn ipv6_in(ctx: &TcContext, slot: u32) {
    if parse::ether_type(ctx) == Some(ETH_P_IPV6) {
        // SAFETY: the slots hold TC programs of this object, which take the same context.
        unsafe { maps::LB_PROGRAMS.tail_call(ctx, slot) };
    }
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
    ingress_flow(ctx, &flow, source)
}

/// IPv6: parsing (`parse6`), then a tracked flow's packet (`tracked6`) or a new flow's
/// (`new_flow6`), each a function of its own called in turn from here. Even in a program of
/// its own, IPv6's path does not fit one BPF stack frame, and the kernel allows a chain of
/// frames 512 bytes together: sibling calls, with the flow, its key and its new entries in a
/// per-CPU scratch map (`Scratch6`), keep each chain short. (Their results stay plain: BTF
/// cannot describe an enum whose tag follows its data.)
#[inline(always)]
fn ingress_ipv6(ctx: &TcContext, source: Source) -> Result<Verdict, Verdict> {
    let scratch = maps::scratch6().ok_or(Verdict::drop(counters::DROP_REWRITE_FAILED))?;
    parse6(ctx, scratch)?;
    if scratch.flow.fragment.is_later() {
        return fragment::translate_later6(ctx, &scratch.flow, true);
    }
    if scratch.flow.protocol == headers::PROTOCOL_ICMPV6 {
        return icmp6(ctx, scratch);
    }
    if let Some(verdict) = tracked6(ctx, scratch) {
        return verdict;
    }
    new_flow6(ctx, scratch, source)
}

/// Parses the packet into `scratch.flow`, and its key into `scratch.key`.
#[inline(never)]
fn parse6(ctx: &TcContext, scratch: &mut Scratch6) -> Result<(), Verdict> {
    scratch.flow = Ipv6Flow::empty();
    parse::parse_ipv6_flow(ctx, &mut scratch.flow)?;
    scratch.key = conntrack::packet_key(&scratch.flow);
    Ok(())
}

/// An ICMPv6 packet: an error about a tracked flow is translated back, anything else passed.
#[inline(never)]
fn icmp6(ctx: &TcContext, scratch: &mut Scratch6) -> Result<Verdict, Verdict> {
    match icmp::translate_error6(ctx, &scratch.flow) {
        None => Ok(Verdict::pass(counters::PASS_OTHER_PROTOCOL)),
        Some(Err(verdict)) => Err(verdict),
        Some(Ok(entry)) => {
            // SAFETY: a pointer into the map's value, valid for this program run.
            let entry = unsafe { &*entry };
            Ok(route_if_needed(ctx, &scratch.flow, entry, counters::ICMP_ERROR_TRANSLATED))
        }
    }
}

#[inline(never)]
fn tracked6(ctx: &TcContext, scratch: &mut Scratch6) -> Option<Result<Verdict, Verdict>> {
    tracked_flow(ctx, &scratch.flow, &scratch.key)
}

#[inline(never)]
fn new_flow6(ctx: &TcContext, scratch: &mut Scratch6, source: Source) -> Result<Verdict, Verdict> {
    forward_new_flow(ctx, &scratch.flow, &scratch.key, source, &mut scratch.track)
}

/// An IPv4 TCP or UDP packet: a tracked flow's, or a new flow's to a frontend.
#[inline(always)]
fn ingress_flow(ctx: &TcContext, flow: &Ipv4Flow, source: Source) -> Result<Verdict, Verdict> {
    let key = conntrack::packet_key(flow);
    if let Some(verdict) = tracked_flow(ctx, flow, &key) {
        return verdict;
    }
    forward_new_flow(ctx, flow, &key, source, &mut TrackSpace::zeroed())
}

/// The verdict for a packet of a tracked flow; `None` when it starts a new flow (untracked, or
/// a new connection on an ended flow's tuple).
#[inline(always)]
fn tracked_flow<A: Family>(
    ctx: &TcContext,
    flow: &Flow<A>,
    key: &FlowKeyOf<A>,
) -> Option<Result<Verdict, Verdict>> {
    let entry = conntrack::lookup(key)?;
    Some(match conntrack::on_packet(key, entry, flow.tcp_flags, conntrack::now()) {
        Tracked::Translate(entry) => {
            // SAFETY: a pointer into the map's value, valid for this program run.
            let entry = unsafe { &*entry };
            let counter =
                if entry.is_reply() { counters::REPLY_REVERSE_NAT } else { counters::FORWARD_TRACKED_FLOW };
            translate(ctx, flow, entry, counter)
        }
        Tracked::Reopen => {
            count(counters::CONNTRACK_REOPENED);
            return None;
        }
        Tracked::NotOurs => Ok(Verdict::pass(counters::PASS_ENDED_FLOW)),
        Tracked::Reset => A::reject(ctx, flow, counters::RESET_BACKEND_GONE),
    })
}

#[inline(always)]
fn forward_new_flow<A: Family>(
    ctx: &TcContext,
    flow: &Flow<A>,
    key: &FlowKeyOf<A>,
    source: Source,
    space: &mut TrackSpace<A>,
) -> Result<Verdict, Verdict> {
    match flow::new_flow(ctx, flow, key, source, space) {
        NewFlow::NotService => Ok(Verdict::pass(counters::PASS_NOT_SERVICE)),
        NewFlow::Reject => A::reject(ctx, flow, counters::REJECT_NO_BACKEND),
        NewFlow::Drop(counter) => Ok(Verdict::drop(counter)),
        NewFlow::Tracked => translate(ctx, flow, &space.forward, counters::FORWARD_NEW_FLOW),
    }
}

/// Rewrites the packet as `entry` says and sends it on: to its next hop directly when its
/// source became a node address, else through the stack.
#[inline(always)]
fn translate<A: Family>(
    ctx: &TcContext,
    flow: &Flow<A>,
    entry: &ConntrackEntryOf<A>,
    counter: u32,
) -> Result<Verdict, Verdict> {
    nat::rewrite(ctx, flow, entry)?;
    if flow.fragment == Fragment::First {
        A::remember_fragment(flow, entry);
    }
    maps::count_traffic(entry, ctx.len(), counter == counters::FORWARD_NEW_FLOW);
    Ok(route_if_needed(ctx, flow, entry, counter))
}

#[inline(always)]
fn route_if_needed<A: Family>(
    ctx: &TcContext,
    flow: &Flow<A>,
    entry: &ConntrackEntryOf<A>,
    counter: u32,
) -> Verdict {
    A::route(ctx, flow, entry, counter)
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
    egress_flow(ctx, &flow)
}

/// Egress of IPv6: as for IPv4, only packets with a socket, or plain SYN-ACKs (SYN cookies).
#[inline(always)]
fn egress_ipv6(ctx: &TcContext) -> Result<Verdict, Verdict> {
    let pass = Verdict::pass(counters::EGRESS_PASS);
    // SAFETY: reads a field of the context the program was given.
    if unsafe { (*ctx.skb.skb).__bindgen_anon_2.sk }.is_null() && !is_plain_syn_ack6(ctx) {
        return Ok(pass);
    }
    let Some(scratch) = maps::scratch6() else { return Ok(pass) };
    if parse6(ctx, scratch).is_err() {
        return Ok(pass);
    }
    if scratch.flow.fragment.is_later() {
        return fragment::translate_later6(ctx, &scratch.flow, false).map(|verdict| {
            if verdict.counter == counters::FRAGMENT_TRANSLATED {
                Verdict::pass(counters::EGRESS_REVERSE_NAT)
            } else {
                pass
            }
        });
    }
    egress_flow6(ctx, scratch)
}

#[inline(never)]
fn egress_flow6(ctx: &TcContext, scratch: &mut Scratch6) -> Result<Verdict, Verdict> {
    egress_flow(ctx, &scratch.flow)
}

/// Egress of a TCP or UDP packet of either family: a host-network endpoint's reply, or not lb's.
#[inline(always)]
fn egress_flow<A: Family>(ctx: &TcContext, flow: &Flow<A>) -> Result<Verdict, Verdict> {
    let pass = Verdict::pass(counters::EGRESS_PASS);
    let key = conntrack::packet_key(flow);
    let Some(entry) = conntrack::lookup(&key) else { return Ok(pass) };
    // SAFETY: a pointer into the map's value, valid for this program run.
    if !unsafe { &*entry }.is_reply() {
        return Ok(pass);
    }
    match conntrack::on_packet(&key, entry, flow.tcp_flags, conntrack::now()) {
        Tracked::Translate(entry) => {
            // SAFETY: a pointer into the map's value, valid for this program run.
            let entry = unsafe { &*entry };
            nat::rewrite(ctx, flow, entry)?;
            if flow.fragment == Fragment::First {
                A::remember_fragment(flow, entry);
            }
            maps::count_traffic(entry, ctx.len(), false);
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

/// `is_plain_syn_ack` for IPv6: TCP right after the IPv6 header.
#[inline(always)]
fn is_plain_syn_ack6(ctx: &TcContext) -> bool {
    use headers::*;
    let next_header = parse::read::<u8>(ctx, ETH_HEADER_LEN + IPV6_NEXT_HEADER_OFFSET);
    let flags = parse::read::<u8>(ctx, ETH_HEADER_LEN + IPV6_HEADER_LEN + TCP_FLAGS_OFFSET);
    next_header == Some(PROTOCOL_TCP)
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
