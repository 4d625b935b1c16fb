//! The data plane's maps. All but the counters are pinned by name under lb's bpffs directory, so
//! `lb services` can read them and a restarted daemon finds the flows and IDs it left.

use aya_ebpf::{
    bindings::BPF_F_INNER_MAP,
    btf_maps::{Array as BtfArray, ArrayOfMaps, HashMap as BtfHashMap},
    macros::{btf_map, map},
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, PerCpuHashMap, ProgramArray},
};
use lb_common::{
    AffinityKey, AffinityKey6, AffinityValue, Backend, Backend6, ConntrackEntry, ConntrackEntry6,
    ConntrackEntryOf, DatapathConfig, DatapathConfig6, FlowKey, FlowKey6, FragmentKey, FragmentValue,
    MAP_NO_PREALLOC, ServiceKey, ServiceKey6, ServiceMeta, ServiceTraffic, ServiceValue, SocketFrontend,
    SocketKey, SourceRangeKey, SourceRangeKey6, capacity, counters, stats,
};

/// Frontends (slot 0) and their backend slots (1..=count). Written only by userspace.
#[map]
pub static LB_SERVICES: HashMap<ServiceKey, ServiceValue> = HashMap::pinned(capacity::SERVICES, 0);

/// Backend ID -> backend address. Written only by userspace, before any slot points at it.
#[map]
pub static LB_BACKENDS: HashMap<u32, Backend> = HashMap::pinned(capacity::BACKENDS, 0);

/// A packet's 5-tuple -> the addresses it leaves with and the flow's state, for both directions
/// of every tracked flow. Written by the data path on a flow's first packet and on its state
/// changes; removed by userspace's collector once the flow has ended or stayed idle too long.
/// A plain hash, not an LRU: when full, new flows are refused (and counted) rather than a live
/// flow evicted.
#[map]
pub static LB_CONNTRACK: HashMap<FlowKey, ConntrackEntry> = HashMap::pinned(capacity::CONNTRACK, 0);

/// While a start moves the conntrack map into one of another size (`lb-userspace`'s `layout`),
/// slot 0 holds the map the previous programs tracked flows in: a flow they opened just before
/// their link switched is still found there, and moved into `LB_CONNTRACK`, until userspace has
/// carried every entry over. Empty otherwise. Not pinned: it belongs to this load.
#[btf_map]
pub static LB_CONNTRACK_PREVIOUS: ArrayOfMaps<BtfHashMap<FlowKey, ConntrackEntry, 1>, 1> = ArrayOfMaps::new();

/// The IPv6 family's frontends, backends, flows, source ranges and affinities: the same as their
/// IPv4 counterparts above, with IPv6 addresses. Backend IDs are one space across both families.
/// The hash maps are not preallocated (`MAP_NO_PREALLOC`): an IPv4-only node does not pay for them.
#[map]
pub static LB_SERVICES6: HashMap<ServiceKey6, ServiceValue> =
    HashMap::pinned(capacity::SERVICES, MAP_NO_PREALLOC);

#[map]
pub static LB_BACKENDS6: HashMap<u32, Backend6> = HashMap::pinned(capacity::BACKENDS, MAP_NO_PREALLOC);

#[map]
pub static LB_CONNTRACK6: HashMap<FlowKey6, ConntrackEntry6> =
    HashMap::pinned(capacity::CONNTRACK, MAP_NO_PREALLOC);

/// `LB_CONNTRACK_PREVIOUS` for `LB_CONNTRACK6`. The inner template's flags are the map's: the
/// kernel takes only an inner map that matches them (its size may differ).
#[btf_map]
pub static LB_CONNTRACK6_PREVIOUS: ArrayOfMaps<
    BtfHashMap<FlowKey6, ConntrackEntry6, 1, { MAP_NO_PREALLOC as usize }>,
    1,
> = ArrayOfMaps::new();

#[map]
pub static LB_SOURCE_RANGES6: LpmTrie<SourceRangeKey6, u8> = LpmTrie::pinned(capacity::SOURCE_RANGES, 0);

#[map]
pub static LB_AFFINITY6: LruHashMap<AffinityKey6, AffinityValue> = LruHashMap::pinned(capacity::AFFINITY, 0);

/// The TC programs' IPv6 halves (`lb_common::tail_calls`), filled by userspace before any
/// program is attached. Pinned: a program array loses its entries when no file refers to it,
/// and the programs must keep working while lb restarts.
#[map]
pub static LB_PROGRAMS: ProgramArray = ProgramArray::pinned(lb_common::tail_calls::COUNT, 0);

/// The XDP program's IPv6 parts (`lb_common::xdp_tail_calls`), filled by userspace before the
/// XDP program is attached. Not pinned: while no lb holds it the slots are empty, and the XDP
/// programs then leave IPv6 to TC, which does all of XDP's work anyway.
#[map]
pub static LB_XDP_PROGRAMS: ProgramArray =
    ProgramArray::with_max_entries(lb_common::xdp_tail_calls::COUNT, 0);

/// One entry: the IPv6 family's node-wide settings (its source-NAT address).
#[map]
pub static LB_CONFIG6: Array<DatapathConfig6> = Array::pinned(1, 0);

/// Service ID -> name and type, for `lb services`. Never read here; declared in this object so
/// it is created and pinned with the others.
#[map]
pub static LB_SERVICE_META: HashMap<u32, ServiceMeta> = HashMap::pinned(capacity::SERVICE_META, 0);

/// (service ID, client range) -> 1, for frontends flagged `SOURCE_RANGES`. Written only by
/// userspace, before the service entry that sets the flag.
#[map]
pub static LB_SOURCE_RANGES: LpmTrie<SourceRangeKey, u8> = LpmTrie::pinned(capacity::SOURCE_RANGES, 0);

/// One entry: node-wide settings (the source-NAT address and ports, the Maglev table size).
#[map]
pub static LB_CONFIG: Array<DatapathConfig> = Array::pinned(1, 0);

/// (socket, backend) -> the frontend it stands for, for the node's own sockets translated at
/// connect/sendmsg. LRU: closed sockets age out.
#[map]
pub static LB_SOCKETS: LruHashMap<SocketKey, SocketFrontend> = LruHashMap::pinned(capacity::SOCKETS, 0);

/// `LB_FRAGMENTS` for IPv6.
#[map]
pub static LB_FRAGMENTS6: LruHashMap<lb_common::FragmentKey6, lb_common::FragmentValue6> =
    LruHashMap::pinned(capacity::FRAGMENTS, 0);

/// `LB_SOCKETS` for the node's IPv6 sockets.
#[map]
pub static LB_SOCKETS6: LruHashMap<lb_common::SocketKey6, lb_common::SocketFrontend6> =
    LruHashMap::pinned(capacity::SOCKETS, 0);

/// (client, frontend) -> the backend of the client's last new connection, for frontends with
/// `sessionAffinity: ClientIP`. LRU: under pressure, the oldest affinity is forgotten (its
/// client's next connection is simply balanced anew).
#[map]
pub static LB_AFFINITY: LruHashMap<AffinityKey, AffinityValue> = LruHashMap::pinned(capacity::AFFINITY, 0);

/// A datagram's (source, destination, protocol, IP ID) -> the addresses its first fragment was
/// rewritten to, so its later fragments (which carry no ports) follow. LRU: incomplete
/// datagrams age out.
#[map]
pub static LB_FRAGMENTS: LruHashMap<FragmentKey, FragmentValue> = LruHashMap::pinned(capacity::FRAGMENTS, 0);

/// Maglev lookup tables: table ID -> an array of `DatapathConfig::maglev_table_size` backend
/// IDs. Tables are created and filled by userspace (`BPF_F_INNER_MAP`: their size is set at
/// run time); a frontend names its table in its service entry.
#[btf_map]
pub static LB_MAGLEV: ArrayOfMaps<
    BtfArray<u32, 1, { BPF_F_INNER_MAP as usize }>,
    { capacity::MAGLEV_TABLES as usize },
> = ArrayOfMaps::new();

/// The conntrack collector's statistics (`lb_common::stats`), written by userspace; declared
/// here so it is created and pinned with the others.
#[map]
pub static LB_STATS: Array<u64> = Array::pinned(stats::COUNT, 0);

/// One entry: CLOCK_MONOTONIC nanoseconds, published by userspace every `CLOCK_TICK_NS`. Flows
/// are stamped with it: reading it costs a fraction of a clock read on every packet.
#[map]
pub static LB_CLOCK: Array<u64> = Array::pinned(1, 0);

/// The layout record (`lb_common::layout`), written by userspace; declared here so it is
/// created and pinned with the others.
#[map]
pub static LB_LAYOUT: Array<u32> = Array::pinned(lb_common::layout::RECORDS, 0);

/// Where `reject` builds a reply's headers: the BPF stack has no room for IPv6's.
pub struct RejectScratch {
    pub macs: [u8; 12],
    pub swapped: [u8; 12],
    pub incoming: [u8; 20],
    pub tcp: [u8; 20],
    pub icmp: [u8; 8],
    pub ipv4: [u8; 20],
    pub ipv6: [u8; 40],
    /// The quoted packet of an ICMP error (IPv4 uses its first 28 bytes).
    pub quote: [u8; 48],
}

/// One `RejectScratch` per CPU. Not pinned: scratch space of this load.
#[map]
pub static LB_REJECT_SCRATCH: PerCpuArray<RejectScratch> = PerCpuArray::with_max_entries(1, 0);

/// The IPv6 path's flow, key and new entries, kept here rather than on the BPF stack, which has
/// no room for them beside the rest of the path.
pub struct Scratch6 {
    pub flow: crate::parse::Ipv6Flow,
    pub key: FlowKey6,
    pub track: crate::conntrack::TrackSpace<lb_common::In6>,
}

/// One `Scratch6` per CPU (a program run is never interrupted on its CPU by another that uses
/// it: TC runs in softirq context or with it disabled). Not pinned: scratch space of this load.
#[map]
pub static LB_SCRATCH6: PerCpuArray<Scratch6> = PerCpuArray::with_max_entries(1, 0);

/// This CPU's `Scratch6`.
#[inline(always)]
pub fn scratch6() -> Option<&'static mut Scratch6> {
    // SAFETY: this CPU's value, used by one program run at a time (see `LB_SCRATCH6`).
    LB_SCRATCH6.get_ptr_mut(0).map(|scratch| unsafe { &mut *scratch })
}

/// Per-CPU packet counters, indexed by `lb_common::counters`.
#[map]
pub static LB_COUNTERS: PerCpuArray<u64> = PerCpuArray::pinned(counters::COUNT, 0);

#[inline(always)]
pub fn count(counter: u32) {
    if let Some(slot) = LB_COUNTERS.get_ptr_mut(counter) {
        // SAFETY: per-CPU slot, and BPF programs are not preempted on a CPU while running.
        unsafe { *slot += 1 };
    }
}

/// The node-wide settings (userspace writes them before attaching any program).
#[inline(always)]
pub fn config() -> Option<&'static DatapathConfig> {
    LB_CONFIG.get(0)
}

/// Service ID -> what was translated for the frontend (`lb_common::ServiceTraffic`), per CPU,
/// for `lb stats` and the metrics. An entry is created by a frontend's first new flow and
/// removed by userspace with the frontend; a tracked flow only adds to an entry that exists, so
/// a removed frontend's late packets do not bring it back.
#[map]
pub static LB_SERVICE_TRAFFIC: PerCpuHashMap<u32, ServiceTraffic> =
    PerCpuHashMap::pinned(capacity::SERVICE_META, 0);

/// Set at load time (`lb run --service-traffic-counters=false` clears it): whether frontends'
/// traffic is counted. Read-only data the verifier knows, so at 0 the counting is not even in
/// the program.
#[unsafe(no_mangle)]
static LB_COUNT_SERVICE_TRAFFIC: u32 = 1;

#[inline(always)]
fn counting_traffic() -> bool {
    // SAFETY: a plain read of a global; volatile so the compiler keeps the load-time value.
    unsafe { core::ptr::read_volatile(&LB_COUNT_SERVICE_TRAFFIC) != 0 }
}

/// Counts a translated packet of `entry`'s flow (`bytes` long) for its frontend.
#[inline(always)]
pub fn count_traffic<A: Copy>(entry: &ConntrackEntryOf<A>, bytes: u32, new_flow: bool) {
    if !counting_traffic() {
        return;
    }
    let id = entry.service_id;
    let mut traffic = LB_SERVICE_TRAFFIC.get_ptr_mut(&id);
    if traffic.is_none() && new_flow {
        // BPF_NOEXIST: another CPU may have created it meanwhile; either way it exists after.
        let _ = LB_SERVICE_TRAFFIC.insert(&id, &ServiceTraffic::default(), 1);
        traffic = LB_SERVICE_TRAFFIC.get_ptr_mut(&id);
    }
    let Some(traffic) = traffic else { return };
    // SAFETY: this CPU's value, and BPF programs are not preempted on a CPU while running.
    let traffic = unsafe { &mut *traffic };
    if entry.is_reply() {
        traffic.reply_packets += 1;
        traffic.reply_bytes += u64::from(bytes);
    } else {
        traffic.packets += 1;
        traffic.bytes += u64::from(bytes);
    }
    if new_flow {
        traffic.new_flows += 1;
    }
}

/// Counts a new flow whose packet is not translated here (a socket of the node's own, or a
/// flow XDP tracked and left to TC).
#[inline(always)]
pub fn count_new_flow(service_id: u32) {
    if !counting_traffic() {
        return;
    }
    let mut traffic = LB_SERVICE_TRAFFIC.get_ptr_mut(&service_id);
    if traffic.is_none() {
        let _ = LB_SERVICE_TRAFFIC.insert(&service_id, &ServiceTraffic::default(), 1);
        traffic = LB_SERVICE_TRAFFIC.get_ptr_mut(&service_id);
    }
    if let Some(traffic) = traffic {
        // SAFETY: as in `count_traffic`.
        unsafe { (*traffic).new_flows += 1 };
    }
}
