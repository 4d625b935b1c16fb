//! XDP on the external interfaces: NodePort, LoadBalancer and externalIP traffic is translated
//! and sent back out before the stack sees it, where its next hop is out the same interface
//! (a backend on another node, or the reply to an external client). Everything else is passed
//! untouched to the TC program on the same interface, which handles every case: packets for a
//! local pod (redirecting into a veth is not something every driver's XDP can do), ClusterIP
//! traffic, rejects, IP options, fragments, no route or no neighbour yet. A new flow tracked
//! here and then passed is translated by TC from the conntrack entry. IPv6 runs in programs of
//! its own (`lb_xdp6`, and `lb_xdp6_new_flow` for new flows), which `lb_xdp` tail-calls.

use core::mem::size_of;

use aya_ebpf::{
    bindings::{BPF_FIB_LKUP_RET_SUCCESS, xdp_action},
    macros::xdp,
    programs::XdpContext,
};
use lb_common::{ConntrackEntry, ConntrackEntry6, ConntrackEntryOf, FlowKeyOf, counters, xdp_tail_calls};

use crate::{
    conntrack::{self, TrackSpace, Tracked},
    csum,
    family::Family,
    flow::{self, NewFlow, Source},
    headers::*,
    maps::{self, Scratch6, count},
    parse::{Flow, Fragment, Ipv4Flow, Ipv6Flow},
    route,
};

const IPV4_HEADER_LEN: usize = IPV4_MIN_HEADER_LEN;

#[xdp]
pub fn lb_xdp(ctx: XdpContext) -> u32 {
    let action = try_lb_xdp(&ctx);
    if action == xdp_action::XDP_PASS {
        count(counters::XDP_PASS);
    }
    action
}

/// A bounds-checked pointer to a `T` at `offset`.
#[inline(always)]
fn at<T>(ctx: &XdpContext, offset: usize) -> Option<*mut T> {
    let start = ctx.data();
    (start + offset + size_of::<T>() <= ctx.data_end()).then_some((start + offset) as *mut T)
}

#[inline(always)]
fn read<T: Copy>(ctx: &XdpContext, offset: usize) -> Option<T> {
    // SAFETY: bounds checked by `at`; packet data has no alignment guarantee.
    at::<T>(ctx, offset).map(|p| unsafe { core::ptr::read_unaligned(p) })
}

#[inline(always)]
fn write<T>(ctx: &XdpContext, offset: usize, value: T) -> Option<()> {
    // SAFETY: bounds checked by `at`.
    at::<T>(ctx, offset).map(|p| unsafe { core::ptr::write_unaligned(p, value) })
}

/// Only plain packets: IPv4 without options or fragmentation, TCP or UDP with its header in
/// the frame. Anything else is TC's.
#[inline(always)]
fn parse(ctx: &XdpContext) -> Option<Ipv4Flow> {
    if u16::from_be(read::<u16>(ctx, ETH_TYPE_OFFSET)?) != ETH_P_IP
        || read::<u8>(ctx, ETH_HEADER_LEN)? != IPV4_VERSION_IHL_PLAIN
    {
        return None;
    }
    let total_len = usize::from(u16::from_be(read::<u16>(ctx, ETH_HEADER_LEN + IPV4_TOTAL_LEN_OFFSET)?));
    let protocol = read::<u8>(ctx, ETH_HEADER_LEN + IPV4_PROTOCOL_OFFSET)?;
    let l4_len = match protocol {
        PROTOCOL_TCP => TCP_MIN_HEADER_LEN,
        PROTOCOL_UDP => UDP_HEADER_LEN,
        _ => return None,
    };
    let fragment = u16::from_be(read::<u16>(ctx, ETH_HEADER_LEN + IPV4_FRAGMENT_OFFSET)?);
    if fragment & (IPV4_FRAGMENT_OFFSET_MASK | IPV4_MORE_FRAGMENTS) != 0
        || total_len < IPV4_HEADER_LEN + l4_len
    {
        return None;
    }
    if ctx.data_end() - ctx.data() < ETH_HEADER_LEN + total_len {
        return None;
    }
    let l4_offset = ETH_HEADER_LEN + IPV4_HEADER_LEN;
    l4_header_readable(ctx, l4_offset, protocol)?;
    let tcp_flags = if protocol == PROTOCOL_TCP { read::<u8>(ctx, l4_offset + TCP_FLAGS_OFFSET)? } else { 0 };
    Some(Ipv4Flow {
        l3_offset: ETH_HEADER_LEN,
        l4_offset,
        protocol,
        src_address: read(ctx, ETH_HEADER_LEN + IPV4_SRC_OFFSET)?,
        dst_address: read(ctx, ETH_HEADER_LEN + IPV4_DST_OFFSET)?,
        src_port: read(ctx, l4_offset + L4_SRC_PORT_OFFSET)?,
        dst_port: read(ctx, l4_offset + L4_DST_PORT_OFFSET)?,
        tcp_flags,
        fragment: Fragment::No,
        ip_id: 0,
    })
}

#[inline(always)]
fn try_lb_xdp(ctx: &XdpContext) -> u32 {
    if read::<u16>(ctx, ETH_TYPE_OFFSET) == Some(ETH_P_IPV6.to_be()) {
        // SAFETY: the slot holds an XDP program of this object, which takes the same context.
        // An empty slot (userspace fills it before attaching) returns here: TC does the work.
        unsafe { maps::LB_XDP_PROGRAMS.tail_call(ctx, xdp_tail_calls::IPV6) };
        return xdp_action::XDP_PASS;
    }
    let Some(flow) = parse(ctx) else { return xdp_action::XDP_PASS };
    let key = conntrack::packet_key(&flow);
    translate(ctx, &flow, &key, &mut TrackSpace::zeroed(), |entry| send_back(ctx, &flow, entry))
}

/// The IPv6 half of `lb_xdp`, tail-called by it (`LB_XDP_PROGRAMS`): a program of its own, so
/// IPv6's keys and entries (in the per-CPU scratch, as TC's IPv6 programs keep them) get a BPF
/// stack of their own and IPv4 pays one EtherType test for it. It sends back the packets of
/// tracked flows, and tail-calls `lb_xdp6_new_flow` for a flow's first packet.
#[xdp]
pub fn lb_xdp6(ctx: XdpContext) -> u32 {
    let action = try_lb_xdp6(&ctx);
    if action == xdp_action::XDP_PASS {
        count(counters::XDP_PASS);
    }
    action
}

#[inline(always)]
fn try_lb_xdp6(ctx: &XdpContext) -> u32 {
    let Some(scratch) = maps::scratch6() else { return xdp_action::XDP_PASS };
    if parse6(ctx, &mut scratch.flow).is_none() {
        return xdp_action::XDP_PASS;
    }
    scratch.key = conntrack::packet_key(&scratch.flow);
    let Scratch6 { flow, key, track } = scratch;
    match tracked_entry(flow, key, track) {
        Some(Ok(())) => send_back_or_pass(ctx, &track.forward, false, |entry| send_back6(ctx, flow, entry)),
        Some(Err(action)) => action,
        None => {
            // A new flow: in a program of its own (`lb_xdp6_new_flow`), whose BPF stack the
            // choice of a backend and the tracking need. The scratch keeps the parsed packet
            // (the tail call runs on this CPU, uninterrupted). An empty slot leaves it to TC.
            // SAFETY: the slot holds an XDP program of this object, which takes the same context.
            unsafe { maps::LB_XDP_PROGRAMS.tail_call(ctx, xdp_tail_calls::NEW_FLOW6) };
            xdp_action::XDP_PASS
        }
    }
}

/// A new IPv6 flow to an external frontend, tail-called by `lb_xdp6` with the packet parsed
/// into the scratch: its backend chosen and the flow tracked, then sent back out as
/// `lb_xdp6` sends a tracked flow's packets, or passed to TC.
#[xdp]
pub fn lb_xdp6_new_flow(ctx: XdpContext) -> u32 {
    let action = try_new_flow6(&ctx);
    if action == xdp_action::XDP_PASS {
        count(counters::XDP_PASS);
    }
    action
}

#[inline(always)]
fn try_new_flow6(ctx: &XdpContext) -> u32 {
    let Some(scratch) = maps::scratch6() else { return xdp_action::XDP_PASS };
    let Scratch6 { flow, key, track } = scratch;
    match new_entry(ctx, flow, key, track) {
        Ok(()) => send_back_or_pass(ctx, &track.forward, true, |entry| send_back6(ctx, flow, entry)),
        Err(action) => action,
    }
}

/// A parsed packet of either family, translated if `send_back` can send it out where it came
/// in (XDP_TX); otherwise XDP_PASS to TC.
#[inline(always)]
fn translate<A: Family>(
    ctx: &XdpContext,
    flow: &Flow<A>,
    key: &FlowKeyOf<A>,
    space: &mut TrackSpace<A>,
    send_back: impl FnOnce(&ConntrackEntryOf<A>) -> Option<()>,
) -> u32 {
    match flow_entry(ctx, flow, key, space) {
        Ok(new_flow) => send_back_or_pass(ctx, &space.forward, new_flow, send_back),
        Err(action) => action,
    }
}

/// The packet's flow entry, left in `space.forward`: the tracked one (`Ok(false)`), or a new
/// flow's (`Ok(true)`); `Err` with the action for packets XDP leaves alone or drops.
#[inline(always)]
fn flow_entry<A: Family>(
    ctx: &XdpContext,
    flow: &Flow<A>,
    key: &FlowKeyOf<A>,
    space: &mut TrackSpace<A>,
) -> Result<bool, u32> {
    match tracked_entry(flow, key, space) {
        Some(result) => result.map(|()| false),
        None => new_entry(ctx, flow, key, space).map(|()| true),
    }
}

/// A tracked flow's entry, copied to `space.forward`; `None` for an untracked flow.
#[inline(always)]
fn tracked_entry<A: Family>(
    flow: &Flow<A>,
    key: &FlowKeyOf<A>,
    space: &mut TrackSpace<A>,
) -> Option<Result<(), u32>> {
    let entry = conntrack::lookup(key)?;
    Some(match conntrack::on_packet(key, entry, flow.tcp_flags, conntrack::now()) {
        Tracked::Translate(entry) => {
            // SAFETY: a pointer into the map's value, valid for this program run.
            space.forward = unsafe { *entry };
            Ok(())
        }
        // What is not a plain translation (a reopened flow, a reset, a packet that is not the
        // flow's) is left to TC, which finds the state this call left and does the rest.
        Tracked::Reopen | Tracked::NotOurs | Tracked::Reset => Err(xdp_action::XDP_PASS),
    })
}

/// A new flow to an external frontend, tracked, its entry in `space.forward`.
#[inline(always)]
fn new_entry<A: Family>(
    ctx: &XdpContext,
    flow: &Flow<A>,
    key: &FlowKeyOf<A>,
    space: &mut TrackSpace<A>,
) -> Result<(), u32> {
    match flow::new_flow(ctx, flow, key, Source::ExternalXdp, space) {
        NewFlow::Tracked => Ok(()),
        NewFlow::Drop(counter) => {
            count(counter);
            Err(xdp_action::XDP_DROP)
        }
        NewFlow::NotService | NewFlow::Reject => Err(xdp_action::XDP_PASS),
    }
}

/// XDP_TX with `entry`'s translation when `send_back` made it, else XDP_PASS to TC.
#[inline(always)]
fn send_back_or_pass<A: Copy>(
    ctx: &XdpContext,
    entry: &ConntrackEntryOf<A>,
    new_flow: bool,
    send_back: impl FnOnce(&ConntrackEntryOf<A>) -> Option<()>,
) -> u32 {
    match send_back(entry) {
        Some(()) => {
            count(counters::XDP_TX);
            maps::count_traffic(entry, (ctx.data_end() - ctx.data()) as u32, new_flow);
            xdp_action::XDP_TX
        }
        None => {
            // TC translates this packet, and finds the flow tracked already: count it here.
            if new_flow {
                maps::count_new_flow(entry.service_id);
            }
            xdp_action::XDP_PASS
        }
    }
}

/// The L4 header must be readable in full: its checksum is updated in place.
#[inline(always)]
fn l4_header_readable(ctx: &XdpContext, l4_offset: usize, protocol: u8) -> Option<()> {
    at::<[u8; TCP_MIN_HEADER_LEN]>(ctx, l4_offset).filter(|_| protocol == PROTOCOL_TCP).or(at::<
        [u8; UDP_HEADER_LEN],
    >(
        ctx, l4_offset,
    )
    .map(|p| p.cast()))?;
    Some(())
}

/// Only plain IPv6 packets: TCP or UDP right after the fixed header (extension headers and
/// fragments are TC's), with the L4 header in the frame.
#[inline(always)]
fn parse6(ctx: &XdpContext, flow: &mut Ipv6Flow) -> Option<()> {
    // Two bytes: a one-byte read's bounds check takes a form the verifier refuses here.
    let [version, _] = read::<[u8; 2]>(ctx, ETH_HEADER_LEN)?;
    let [protocol, _hop_limit] = read::<[u8; 2]>(ctx, ETH_HEADER_LEN + IPV6_NEXT_HEADER_OFFSET)?;
    if version >> 4 != 6 {
        return None;
    }
    let l4_len = match protocol {
        PROTOCOL_TCP => TCP_MIN_HEADER_LEN,
        PROTOCOL_UDP => UDP_HEADER_LEN,
        _ => return None,
    };
    let payload_len = usize::from(u16::from_be(read::<u16>(ctx, ETH_HEADER_LEN + IPV6_PAYLOAD_LEN_OFFSET)?));
    if payload_len < l4_len || ctx.data_end() - ctx.data() < ETH_HEADER_LEN + IPV6_HEADER_LEN + payload_len {
        return None;
    }
    let l4_offset = ETH_HEADER_LEN + IPV6_HEADER_LEN;
    l4_header_readable(ctx, l4_offset, protocol)?;
    flow.tcp_flags =
        if protocol == PROTOCOL_TCP { read::<u8>(ctx, l4_offset + TCP_FLAGS_OFFSET)? } else { 0 };
    flow.l3_offset = ETH_HEADER_LEN;
    flow.l4_offset = l4_offset;
    flow.protocol = protocol;
    flow.src_address = read(ctx, ETH_HEADER_LEN + IPV6_SRC_OFFSET)?;
    flow.dst_address = read(ctx, ETH_HEADER_LEN + IPV6_DST_OFFSET)?;
    flow.src_port = read(ctx, l4_offset + L4_SRC_PORT_OFFSET)?;
    flow.dst_port = read(ctx, l4_offset + L4_DST_PORT_OFFSET)?;
    flow.fragment = Fragment::No;
    flow.ip_id = 0;
    Some(())
}

/// `send_back` for IPv6: hop limit instead of TTL, and no header checksum.
#[inline(always)]
fn send_back6(ctx: &XdpContext, flow: &Ipv6Flow, entry: &ConntrackEntry6) -> Option<()> {
    let hop_word: u16 = read(ctx, ETH_HEADER_LEN + IPV6_NEXT_HEADER_OFFSET)?;
    let [next_header, hop_limit] = hop_word.to_ne_bytes();
    if hop_limit <= 1 {
        return None;
    }
    // SAFETY: reads a field of the context the program was given.
    let ingress = unsafe { (*ctx.ctx).ingress_ifindex };
    let (result, params) =
        route::fib_lookup(ctx.ctx.cast(), ingress, flow.protocol, entry.src_address, entry.dst_address);
    if result != BPF_FIB_LKUP_RET_SUCCESS || params.ifindex != ingress {
        return None;
    }
    // Masked: the flow comes from the scratch map, and the verifier needs bounded offsets.
    let l4 = flow.l4();
    let l4_check_offset =
        l4 + if flow.protocol == PROTOCOL_TCP { TCP_CHECKSUM_OFFSET } else { UDP_CHECKSUM_OFFSET };
    let mut l4_check: u16 = read(ctx, l4_check_offset)?;
    // The pseudo-header's addresses, a word at a time, and the ports.
    for i in 0..4 {
        l4_check = csum::replace4(l4_check, flow.src_address.words[i], entry.src_address.words[i]);
        l4_check = csum::replace4(l4_check, flow.dst_address.words[i], entry.dst_address.words[i]);
    }
    for (from, to) in [(flow.src_port, entry.src_port), (flow.dst_port, entry.dst_port)] {
        l4_check = csum::replace2(l4_check, from, to);
    }
    if flow.protocol == PROTOCOL_UDP && l4_check == 0 {
        l4_check = 0xffff;
    }
    write(ctx, ETH_HEADER_LEN + IPV6_NEXT_HEADER_OFFSET, u16::from_ne_bytes([next_header, hop_limit - 1]))?;
    write(ctx, ETH_HEADER_LEN + IPV6_SRC_OFFSET, entry.src_address)?;
    write(ctx, ETH_HEADER_LEN + IPV6_DST_OFFSET, entry.dst_address)?;
    write(ctx, l4 + L4_SRC_PORT_OFFSET, entry.src_port)?;
    write(ctx, l4 + L4_DST_PORT_OFFSET, entry.dst_port)?;
    write(ctx, l4_check_offset, l4_check)?;
    write(ctx, 0, params.dmac)?;
    write(ctx, 6, params.smac)?;
    Some(())
}

/// Translates and readdresses the frame for XDP_TX when the translated packet's next hop is
/// out the interface it came in on; `None` (packet untouched) otherwise.
#[inline(always)]
fn send_back(ctx: &XdpContext, flow: &Ipv4Flow, entry: &ConntrackEntry) -> Option<()> {
    let ttl_word: u16 = read(ctx, ETH_HEADER_LEN + IPV4_TTL_OFFSET)?;
    let [ttl, protocol] = ttl_word.to_ne_bytes();
    if ttl <= 1 {
        return None;
    }
    // SAFETY: reads a field of the context the program was given.
    let ingress = unsafe { (*ctx.ctx).ingress_ifindex };
    let (result, params) =
        route::fib_lookup(ctx.ctx.cast(), ingress, flow.protocol, entry.src_address, entry.dst_address);
    if result != BPF_FIB_LKUP_RET_SUCCESS || params.ifindex != ingress {
        return None;
    }
    rewrite(ctx, flow, entry, ttl_word, u16::from_ne_bytes([ttl - 1, protocol]))?;
    write(ctx, 0, params.dmac)?;
    write(ctx, 6, params.smac)?;
    Some(())
}

/// Addresses, ports and TTL, with the IP and L4 checksums updated to match.
#[inline(always)]
fn rewrite(
    ctx: &XdpContext,
    flow: &Ipv4Flow,
    entry: &ConntrackEntry,
    ttl_word: u16,
    new_ttl_word: u16,
) -> Option<()> {
    let ip_check_offset = ETH_HEADER_LEN + IPV4_CHECKSUM_OFFSET;
    let l4_check_offset = flow.l4_checksum_offset();
    let mut ip_check: u16 = read(ctx, ip_check_offset)?;
    let mut l4_check: u16 = read(ctx, l4_check_offset)?;
    // UDP's 0 means "no checksum": it stays 0.
    let l4_checked = flow.protocol == PROTOCOL_TCP || l4_check != 0;

    ip_check = csum::replace2(ip_check, ttl_word, new_ttl_word);
    for (from, to) in [(flow.src_address, entry.src_address), (flow.dst_address, entry.dst_address)] {
        ip_check = csum::replace4(ip_check, from, to);
        l4_check = csum::replace4(l4_check, from, to);
    }
    for (from, to) in [(flow.src_port, entry.src_port), (flow.dst_port, entry.dst_port)] {
        l4_check = csum::replace2(l4_check, from, to);
    }
    if flow.protocol == PROTOCOL_UDP && l4_check == 0 {
        l4_check = 0xffff;
    }
    write(ctx, ETH_HEADER_LEN + IPV4_TTL_OFFSET, new_ttl_word)?;
    write(ctx, ip_check_offset, ip_check)?;
    write(ctx, ETH_HEADER_LEN + IPV4_SRC_OFFSET, entry.src_address)?;
    write(ctx, ETH_HEADER_LEN + IPV4_DST_OFFSET, entry.dst_address)?;
    write(ctx, flow.l4_offset + L4_SRC_PORT_OFFSET, entry.src_port)?;
    write(ctx, flow.l4_offset + L4_DST_PORT_OFFSET, entry.dst_port)?;
    if l4_checked {
        write(ctx, l4_check_offset, l4_check)?;
    }
    Some(())
}
