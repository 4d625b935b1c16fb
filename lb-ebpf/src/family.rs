//! What differs between IPv4 and IPv6 for the flow logic that is written once: each family's
//! maps, where its addresses sit in the header, how they are rewritten and routed. Conntrack,
//! backend selection and NAT are generic over `Family` and compiled once per family, so an IPv4
//! packet runs IPv4's copy and pays nothing for IPv6.

use aya_ebpf::{
    bindings::bpf_fib_lookup as FibLookup,
    maps::{HashMap, LpmTrie, LruHashMap},
    programs::TcContext,
};
use lb_common::{
    AffinityKeyOf, AffinityValue, BackendOf, ConntrackEntryOf, FlowKeyOf, In6, ServiceKeyOf, ServiceValue,
    SourceRangeKeyOf, conntrack_flags, counters,
};

use crate::{
    conntrack::{self, NewFlowEntry, TrackSpace},
    csum, fragment,
    headers::{
        IPV4_CHECKSUM_OFFSET, IPV4_DST_OFFSET, IPV4_MIN_HEADER_LEN, IPV4_SRC_OFFSET, IPV4_TTL_OFFSET,
        IPV6_DST_OFFSET, IPV6_HEADER_LEN, IPV6_HOP_LIMIT_OFFSET, IPV6_SRC_OFFSET,
    },
    maps::{
        LB_AFFINITY, LB_AFFINITY6, LB_BACKENDS, LB_BACKENDS6, LB_CONFIG, LB_CONFIG6, LB_CONNTRACK,
        LB_CONNTRACK_PREVIOUS, LB_CONNTRACK6, LB_CONNTRACK6_PREVIOUS, LB_SERVICES, LB_SERVICES6,
        LB_SOURCE_RANGES, LB_SOURCE_RANGES6, RejectScratch,
    },
    nat::write,
    parse::{Flow, read},
    reject, route,
    verdict::Verdict,
};

const AF_INET: u8 = 2;
/// `bpf_map_update_elem`'s flag: only where the key has no entry.
const BPF_NOEXIST: u64 = 1;
const AF_INET6: u8 = 10;

pub trait Family: lb_common::Address {
    /// Bits in an address: a source-range key's prefix for one address.
    const BITS: u8;
    /// The IP header without options or extension headers.
    const HEADER_LEN: usize;

    fn services() -> &'static HashMap<ServiceKeyOf<Self>, ServiceValue>;
    fn backends() -> &'static HashMap<u32, BackendOf<Self>>;
    fn conntrack() -> &'static HashMap<FlowKeyOf<Self>, ConntrackEntryOf<Self>>;
    /// The entry for `key` in the map a start is migrating flows from (see `maps`).
    fn previous_flow(key: &FlowKeyOf<Self>) -> Option<*mut ConntrackEntryOf<Self>>;
    /// Adds a flow's entry to the map a start is migrating flows from, while it does, unless
    /// that map has one for `key` (`conntrack::share_with_previous`).
    fn offer_to_previous(key: &FlowKeyOf<Self>, entry: &ConntrackEntryOf<Self>);
    fn affinity() -> &'static LruHashMap<AffinityKeyOf<Self>, AffinityValue>;
    fn source_ranges() -> &'static LpmTrie<SourceRangeKeyOf<Self>, u8>;
    /// The node address source-NATed flows leave with, if the node has one.
    fn snat_address() -> Option<Self>;

    /// Rewrites the packet's source and destination (and the IPv4 header checksum). Returns the
    /// checksum difference for the L4 pseudo-header.
    fn rewrite_addresses(ctx: &TcContext, flow: &Flow<Self>, src: Self, dst: Self) -> Result<u32, Verdict>;

    /// Counts the hop this node is on the path (TTL or hop limit), for a packet it forwards
    /// itself; `None` when the stack must handle it (the count would reach 0).
    fn forward_hop(ctx: &TcContext, flow: &Flow<Self>) -> Option<()>;

    /// Fills a FIB lookup's family and addresses.
    fn fib_addresses(params: &mut FibLookup, src: Self, dst: Self);

    /// Rewrites the packet, in place, into its client's rejection (`reject`).
    fn write_reject(ctx: &TcContext, flow: &Flow<Self>, scratch: &mut RejectScratch) -> Result<(), Verdict>;

    /// Records how a first fragment was translated, for the fragments that follow it.
    fn remember_fragment(flow: &Flow<Self>, entry: &ConntrackEntryOf<Self>);

    // The steps below are the same code for both families, called through the family so that
    // IPv6 can run each in a function (a BPF stack frame) of its own: its keys and entries
    // are too large for one frame. IPv4 keeps them inline, as before.

    /// `reject::reject`.
    fn reject(ctx: &TcContext, flow: &Flow<Self>, counter: u32) -> Result<Verdict, Verdict>;

    /// `route::if_flagged` for a packet rewritten as `entry` says.
    fn route(ctx: &TcContext, flow: &Flow<Self>, entry: &ConntrackEntryOf<Self>, counter: u32) -> Verdict;

    /// `conntrack::track`.
    fn track(
        key: &FlowKeyOf<Self>,
        new: &NewFlowEntry<Self>,
        space: &mut TrackSpace<Self>,
    ) -> Result<(), Verdict>;
}

impl Family for u32 {
    const BITS: u8 = 32;
    const HEADER_LEN: usize = IPV4_MIN_HEADER_LEN;

    #[inline(always)]
    fn write_reject(ctx: &TcContext, flow: &Flow<Self>, scratch: &mut RejectScratch) -> Result<(), Verdict> {
        reject::write_reject(ctx, flow, scratch)
    }

    #[inline(always)]
    fn remember_fragment(flow: &Flow<Self>, entry: &ConntrackEntryOf<Self>) {
        fragment::remember(flow, entry);
    }

    #[inline(always)]
    fn reject(ctx: &TcContext, flow: &Flow<Self>, counter: u32) -> Result<Verdict, Verdict> {
        reject::reject(ctx, flow, counter)
    }

    #[inline(always)]
    fn route(ctx: &TcContext, flow: &Flow<Self>, entry: &ConntrackEntryOf<Self>, counter: u32) -> Verdict {
        route::if_flagged(ctx, flow, entry.flags, entry.src_address, entry.dst_address, counter)
    }

    #[inline(always)]
    fn track(
        key: &FlowKeyOf<Self>,
        new: &NewFlowEntry<Self>,
        space: &mut TrackSpace<Self>,
    ) -> Result<(), Verdict> {
        conntrack::track(key, new, space)
    }

    #[inline(always)]
    fn services() -> &'static HashMap<ServiceKeyOf<Self>, ServiceValue> {
        &LB_SERVICES
    }

    #[inline(always)]
    fn backends() -> &'static HashMap<u32, BackendOf<Self>> {
        &LB_BACKENDS
    }

    #[inline(always)]
    fn conntrack() -> &'static HashMap<FlowKeyOf<Self>, ConntrackEntryOf<Self>> {
        &LB_CONNTRACK
    }

    #[inline(always)]
    fn previous_flow(key: &FlowKeyOf<Self>) -> Option<*mut ConntrackEntryOf<Self>> {
        LB_CONNTRACK_PREVIOUS.get_value_ptr_mut(0, key)
    }

    #[inline(always)]
    fn offer_to_previous(key: &FlowKeyOf<Self>, entry: &ConntrackEntryOf<Self>) {
        if let Some(previous) = LB_CONNTRACK_PREVIOUS.get(0) {
            let _ = previous.insert(key, entry, BPF_NOEXIST);
        }
    }

    #[inline(always)]
    fn affinity() -> &'static LruHashMap<AffinityKeyOf<Self>, AffinityValue> {
        &LB_AFFINITY
    }

    #[inline(always)]
    fn source_ranges() -> &'static LpmTrie<SourceRangeKeyOf<Self>, u8> {
        &LB_SOURCE_RANGES
    }

    #[inline(always)]
    fn snat_address() -> Option<Self> {
        LB_CONFIG.get(0).map(|config| config.snat_address).filter(|address| *address != 0)
    }

    #[inline(always)]
    fn rewrite_addresses(ctx: &TcContext, flow: &Flow<Self>, src: Self, dst: Self) -> Result<u32, Verdict> {
        if flow.src_address == src && flow.dst_address == dst {
            return Ok(0);
        }
        let failed = Verdict::drop(counters::DROP_REWRITE_FAILED);
        let diff = csum::add32(csum::diff4(flow.src_address, src), csum::diff4(flow.dst_address, dst));
        let check_offset = flow.l3_offset + IPV4_CHECKSUM_OFFSET;
        let check = read::<u16>(ctx, check_offset).ok_or(failed)?;
        write(ctx, check_offset, csum::apply_diff(check, diff))?;
        write(ctx, flow.l3_offset + IPV4_SRC_OFFSET, src)?;
        write(ctx, flow.l3_offset + IPV4_DST_OFFSET, dst)?;
        Ok(diff)
    }

    #[inline(always)]
    fn forward_hop(ctx: &TcContext, flow: &Flow<Self>) -> Option<()> {
        let ttl_word: u16 = ctx.load(flow.l3_offset + IPV4_TTL_OFFSET).ok()?;
        let [ttl, protocol] = ttl_word.to_ne_bytes();
        if ttl <= 1 {
            return None;
        }
        let new_word = u16::from_ne_bytes([ttl - 1, protocol]);
        ctx.l3_csum_replace(
            flow.l3_offset + IPV4_CHECKSUM_OFFSET,
            u64::from(ttl_word),
            u64::from(new_word),
            2,
        )
        .ok()?;
        ctx.store(flow.l3_offset + IPV4_TTL_OFFSET, &new_word, 0).ok()
    }

    #[inline(always)]
    fn fib_addresses(params: &mut FibLookup, src: Self, dst: Self) {
        params.family = AF_INET;
        params.__bindgen_anon_3.ipv4_src = src;
        params.__bindgen_anon_4.ipv4_dst = dst;
    }
}

impl Family for In6 {
    const BITS: u8 = 128;
    const HEADER_LEN: usize = IPV6_HEADER_LEN;

    #[inline(always)]
    fn write_reject(ctx: &TcContext, flow: &Flow<Self>, scratch: &mut RejectScratch) -> Result<(), Verdict> {
        reject::write_reject6(ctx, flow, scratch)
    }

    #[inline(always)]
    fn remember_fragment(flow: &Flow<Self>, entry: &ConntrackEntryOf<Self>) {
        fragment::remember6(flow, entry);
    }

    #[inline(always)]
    fn reject(ctx: &TcContext, flow: &Flow<Self>, counter: u32) -> Result<Verdict, Verdict> {
        reject6(ctx, flow, counter)
    }

    #[inline(always)]
    fn route(ctx: &TcContext, flow: &Flow<Self>, entry: &ConntrackEntryOf<Self>, counter: u32) -> Verdict {
        if entry.flags & conntrack_flags::ROUTE == 0 {
            return Verdict::pass(counter);
        }
        route6(ctx, flow, entry, counter)
    }

    #[inline(always)]
    fn track(
        key: &FlowKeyOf<Self>,
        new: &NewFlowEntry<Self>,
        space: &mut TrackSpace<Self>,
    ) -> Result<(), Verdict> {
        track6(key, new, space)
    }

    #[inline(always)]
    fn services() -> &'static HashMap<ServiceKeyOf<Self>, ServiceValue> {
        &LB_SERVICES6
    }

    #[inline(always)]
    fn backends() -> &'static HashMap<u32, BackendOf<Self>> {
        &LB_BACKENDS6
    }

    #[inline(always)]
    fn conntrack() -> &'static HashMap<FlowKeyOf<Self>, ConntrackEntryOf<Self>> {
        &LB_CONNTRACK6
    }

    #[inline(always)]
    fn previous_flow(key: &FlowKeyOf<Self>) -> Option<*mut ConntrackEntryOf<Self>> {
        LB_CONNTRACK6_PREVIOUS.get_value_ptr_mut(0, key)
    }

    #[inline(always)]
    fn offer_to_previous(key: &FlowKeyOf<Self>, entry: &ConntrackEntryOf<Self>) {
        if let Some(previous) = LB_CONNTRACK6_PREVIOUS.get(0) {
            let _ = previous.insert(key, entry, BPF_NOEXIST);
        }
    }

    #[inline(always)]
    fn affinity() -> &'static LruHashMap<AffinityKeyOf<Self>, AffinityValue> {
        &LB_AFFINITY6
    }

    #[inline(always)]
    fn source_ranges() -> &'static LpmTrie<SourceRangeKeyOf<Self>, u8> {
        &LB_SOURCE_RANGES6
    }

    #[inline(always)]
    fn snat_address() -> Option<Self> {
        LB_CONFIG6.get(0).map(|config| config.snat_address).filter(|address| *address != In6::default())
    }

    #[inline(always)]
    fn rewrite_addresses(ctx: &TcContext, flow: &Flow<Self>, src: Self, dst: Self) -> Result<u32, Verdict> {
        // No header checksum in IPv6: only the pseudo-header's difference, for L4.
        let mut diff = 0;
        if flow.src_address != src {
            diff = csum::add32(diff, diff16(flow.src_address, src));
            write(ctx, flow.l3() + IPV6_SRC_OFFSET, src)?;
        }
        if flow.dst_address != dst {
            diff = csum::add32(diff, diff16(flow.dst_address, dst));
            write(ctx, flow.l3() + IPV6_DST_OFFSET, dst)?;
        }
        Ok(diff)
    }

    #[inline(always)]
    fn forward_hop(ctx: &TcContext, flow: &Flow<Self>) -> Option<()> {
        let hop_limit: u8 = ctx.load(flow.l3_offset + IPV6_HOP_LIMIT_OFFSET).ok()?;
        if hop_limit <= 1 {
            return None;
        }
        ctx.store(flow.l3_offset + IPV6_HOP_LIMIT_OFFSET, &(hop_limit - 1), 0).ok()
    }

    #[inline(always)]
    fn fib_addresses(params: &mut FibLookup, src: Self, dst: Self) {
        params.family = AF_INET6;
        params.__bindgen_anon_3.ipv6_src = src.words;
        params.__bindgen_anon_4.ipv6_dst = dst.words;
    }
}

#[inline(never)]
fn reject6(ctx: &TcContext, flow: &Flow<In6>, counter: u32) -> Result<Verdict, Verdict> {
    reject::reject(ctx, flow, counter)
}

#[inline(never)]
fn route6(ctx: &TcContext, flow: &Flow<In6>, entry: &ConntrackEntryOf<In6>, counter: u32) -> Verdict {
    route::if_flagged(ctx, flow, entry.flags, entry.src_address, entry.dst_address, counter)
}

#[inline(never)]
fn track6(key: &FlowKeyOf<In6>, new: &NewFlowEntry<In6>, space: &mut TrackSpace<In6>) -> Result<(), Verdict> {
    conntrack::track(key, new, space)
}

/// The checksum difference of a 16-byte address changing from `from` to `to`.
#[inline(always)]
pub fn diff16(from: In6, to: In6) -> u32 {
    let mut diff = 0;
    let mut i = 0;
    while i < 4 {
        diff = csum::add32(diff, csum::diff4(from.words[i], to.words[i]));
        i += 1;
    }
    diff
}
