//! XDP on the external interfaces: NodePort, LoadBalancer and externalIP traffic is translated
//! and sent back out before the stack sees it, where its next hop is out the same interface
//! (a backend on another node, or the reply to an external client). Everything else is passed
//! untouched to the TC program on the same interface, which handles every case: packets for a
//! local pod (redirecting into a veth is not something every driver's XDP can do), ClusterIP
//! traffic, rejects, IP options, fragments, no route or no neighbour yet. A new flow tracked
//! here and then passed is translated by TC from the conntrack entry.

use core::mem::size_of;

use aya_ebpf::{
    bindings::{BPF_FIB_LKUP_RET_SUCCESS, xdp_action},
    macros::xdp,
    programs::XdpContext,
};
use lb_common::{ConntrackEntry, counters};

use crate::{
    conntrack::{self, TrackSpace, Tracked},
    csum,
    flow::{self, NewFlow, Source},
    headers::*,
    maps::{self, count},
    parse::{Fragment, Ipv4Flow},
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
    // The whole L4 header must be readable: its checksum is updated in place.
    at::<[u8; TCP_MIN_HEADER_LEN]>(ctx, l4_offset).filter(|_| protocol == PROTOCOL_TCP).or(at::<
        [u8; UDP_HEADER_LEN],
    >(
        ctx, l4_offset,
    )
    .map(|p| p.cast()))?;
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
    let Some(flow) = parse(ctx) else { return xdp_action::XDP_PASS };
    let key = conntrack::packet_key(&flow);
    let mut new_flow = false;
    let mut space = TrackSpace::zeroed();
    let entry = match conntrack::lookup(&key) {
        // What is not a plain translation (a reopened flow, a reset, a packet that is not the
        // flow's) is left to TC, which finds the state this call left and does the rest.
        Some(entry) => match conntrack::on_packet(&key, entry, flow.tcp_flags, conntrack::now()) {
            // SAFETY: a pointer into the map's value, valid for this program run.
            Tracked::Translate(entry) => unsafe { *entry },
            Tracked::Reopen | Tracked::NotOurs | Tracked::Reset => return xdp_action::XDP_PASS,
        },
        None => match flow::new_flow(ctx, &flow, &key, Source::ExternalXdp, &mut space) {
            NewFlow::Tracked => {
                new_flow = true;
                space.forward
            }
            NewFlow::Drop(counter) => {
                count(counter);
                return xdp_action::XDP_DROP;
            }
            NewFlow::NotService | NewFlow::Reject => return xdp_action::XDP_PASS,
        },
    };
    match send_back(ctx, &flow, &entry) {
        Some(()) => {
            count(counters::XDP_TX);
            maps::count_traffic(&entry, (ctx.data_end() - ctx.data()) as u32, new_flow);
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
