//! Flow tracking: one LRU map holds both directions of every translated flow, keyed by the
//! 5-tuple a packet arrives with, so any packet of a tracked flow costs one lookup.

use lb_common::{Backend, ConntrackEntry, FlowKey, conntrack_flags, counters};

use crate::{
    maps::{LB_BACKENDS, LB_CONNTRACK, count},
    parse::Ipv4Flow,
};

/// The flow as the packet carries it (client -> frontend, or backend -> client for a reply).
#[inline(always)]
pub fn packet_key(flow: &Ipv4Flow) -> FlowKey {
    FlowKey {
        src_address: flow.src_address,
        dst_address: flow.dst_address,
        src_port: flow.src_port,
        dst_port: flow.dst_port,
        protocol: flow.protocol,
        _pad: [0; 3],
    }
}

/// The packet's conntrack entry. A client-direction entry whose backend has been removed is
/// ignored, so the flow picks a new backend (and overwrites both entries).
#[inline(always)]
pub fn lookup(key: &FlowKey) -> Option<ConntrackEntry> {
    // SAFETY: the value is copied out at once; LRU entries may be reused after that.
    let entry = *unsafe { LB_CONNTRACK.get(key) }?;
    // SAFETY: only the presence of the key is used.
    if !entry.is_reply() && unsafe { LB_BACKENDS.get(entry.backend_id) }.is_none() {
        count(counters::CONNTRACK_BACKEND_GONE);
        return None;
    }
    Some(entry)
}

/// Records a new flow in both directions. Failure is counted, not fatal: the packet is still
/// translated, later packets just pick again (and land on the same backend unless the set
/// changed).
#[inline(always)]
pub fn track(key: &FlowKey, service_id: u32, backend_id: u32, backend: &Backend) -> ConntrackEntry {
    let forward = ConntrackEntry {
        src_address: key.src_address,
        dst_address: backend.address,
        src_port: key.src_port,
        dst_port: backend.port,
        backend_id,
        service_id,
        flags: 0,
    };
    let reply_key = FlowKey {
        src_address: backend.address,
        dst_address: key.src_address,
        src_port: backend.port,
        dst_port: key.src_port,
        protocol: key.protocol,
        _pad: [0; 3],
    };
    let reply = ConntrackEntry {
        src_address: key.dst_address,
        dst_address: key.src_address,
        src_port: key.dst_port,
        dst_port: key.src_port,
        backend_id,
        service_id,
        flags: conntrack_flags::REPLY,
    };
    // The reply entry first: once the forward entry exists, a reply may come back at any time.
    if LB_CONNTRACK.insert(&reply_key, &reply, 0).is_err() || LB_CONNTRACK.insert(key, &forward, 0).is_err() {
        count(counters::CONNTRACK_INSERT_FAILED);
    }
    forward
}
