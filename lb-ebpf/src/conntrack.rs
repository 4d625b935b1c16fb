//! Flow tracking: the conntrack map pins a client's flow to its backend, and the reverse-NAT
//! map lets the reply find the frontend it has to appear to come from.

use lb_common::{Backend, ConntrackEntry, FlowKey, ReverseNatEntry, counters};

use crate::{
    maps::{LB_BACKENDS, LB_CONNTRACK, LB_REVERSE_NAT, count},
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

/// A tracked flow's entry, if its backend still exists.
#[inline(always)]
pub fn lookup_forward(key: &FlowKey) -> Option<ConntrackEntry> {
    // SAFETY: the value is copied out at once; LRU entries may be reused after that.
    let entry = *unsafe { LB_CONNTRACK.get(key) }?;
    // SAFETY: only the presence of the key is used.
    if unsafe { LB_BACKENDS.get(entry.backend_id) }.is_none() {
        count(counters::CONNTRACK_BACKEND_GONE);
        return None;
    }
    Some(entry)
}

#[inline(always)]
pub fn lookup_reply(key: &FlowKey) -> Option<ReverseNatEntry> {
    // SAFETY: copied out at once.
    unsafe { LB_REVERSE_NAT.get(key) }.copied()
}

/// Records a new flow in both directions. Failure is counted, not fatal: the packet is still
/// translated, later packets just pick again (and land on the same backend unless the set
/// changed).
#[inline(always)]
pub fn track(key: &FlowKey, service_id: u32, backend_id: u32, backend: &Backend) {
    let forward = ConntrackEntry {
        backend_address: backend.address,
        backend_port: backend.port,
        _pad: 0,
        backend_id,
        service_id,
    };
    let reply_key = FlowKey {
        src_address: backend.address,
        dst_address: key.src_address,
        src_port: backend.port,
        dst_port: key.src_port,
        protocol: key.protocol,
        _pad: [0; 3],
    };
    let reverse = ReverseNatEntry {
        frontend_address: key.dst_address,
        frontend_port: key.dst_port,
        _pad: 0,
        service_id,
    };
    if LB_REVERSE_NAT.insert(reply_key, reverse, 0).is_err() || LB_CONNTRACK.insert(key, forward, 0).is_err()
    {
        count(counters::CONNTRACK_INSERT_FAILED);
    }
}
