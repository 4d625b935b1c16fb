//! The data plane's maps. All but the counters are pinned by name under lb's bpffs directory, so
//! `lb services` can read them and a restarted daemon finds the flows and IDs it left.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray},
};
use lb_common::{
    Backend, ConntrackEntry, DatapathConfig, FlowKey, ServiceKey, ServiceMeta, ServiceValue, SocketFrontend,
    SocketKey, SourceRangeKey, capacity, counters,
};

/// Frontends (slot 0) and their backend slots (1..=count). Written only by userspace.
#[map]
pub static LB_SERVICES: HashMap<ServiceKey, ServiceValue> = HashMap::pinned(capacity::SERVICES, 0);

/// Backend ID -> backend address. Written only by userspace, before any slot points at it.
#[map]
pub static LB_BACKENDS: HashMap<u32, Backend> = HashMap::pinned(capacity::BACKENDS, 0);

/// A packet's 5-tuple -> the addresses it leaves with, for both directions of every tracked
/// flow. Written by the data path on a flow's first packet.
#[map]
pub static LB_CONNTRACK: LruHashMap<FlowKey, ConntrackEntry> = LruHashMap::pinned(capacity::CONNTRACK, 0);

/// Service ID -> name and type, for `lb services`. Never read here; declared in this object so
/// it is created and pinned with the others.
#[map]
pub static LB_SERVICE_META: HashMap<u32, ServiceMeta> = HashMap::pinned(capacity::SERVICE_META, 0);

/// (service ID, client range) -> 1, for frontends flagged `SOURCE_RANGES`. Written only by
/// userspace, before the service entry that sets the flag.
#[map]
pub static LB_SOURCE_RANGES: LpmTrie<SourceRangeKey, u8> = LpmTrie::pinned(capacity::SOURCE_RANGES, 0);

/// One entry: node-wide settings (the source-NAT address and ports).
#[map]
pub static LB_CONFIG: Array<DatapathConfig> = Array::pinned(1, 0);

/// (socket, backend) -> the frontend it stands for, for the node's own sockets translated at
/// connect/sendmsg. LRU: closed sockets age out.
#[map]
pub static LB_SOCKETS: LruHashMap<SocketKey, SocketFrontend> = LruHashMap::pinned(capacity::SOCKETS, 0);

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
