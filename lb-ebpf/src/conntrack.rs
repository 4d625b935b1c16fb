//! Flow tracking: one LRU map holds both directions of every translated flow, keyed by the
//! 5-tuple a packet arrives with, so any packet of a tracked flow costs one lookup.

use lb_common::{Backend, ConntrackEntry, FlowKey, conntrack_flags, counters};

use crate::{
    maps::{LB_BACKENDS, LB_CONFIG, LB_CONNTRACK, count},
    parse::Ipv4Flow,
    verdict::Verdict,
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

/// Linux's BPF_NOEXIST: insert only if the key is free.
const BPF_NOEXIST: u64 = 1;
/// Source ports tried for a source-NATed flow before giving up.
const SNAT_PORT_TRIES: u32 = 8;

/// Records a new flow in both directions and returns the client direction's entry. With
/// `snat_address`, the flow's source becomes that address and a free port, so the reply comes
/// back through this node. Failure to record is counted, not fatal: the packet is still
/// translated, later packets just pick again (and land on the same backend unless the set
/// changed). Only a source-NAT flow without a free port is refused: its reply could not be
/// told apart.
#[inline(always)]
pub fn track(
    key: &FlowKey,
    hash: u32,
    service_id: u32,
    backend_id: u32,
    backend: &Backend,
    snat_address: Option<u32>,
    route_replies: bool,
) -> Result<ConntrackEntry, Verdict> {
    let mut forward = ConntrackEntry {
        src_address: key.src_address,
        dst_address: backend.address,
        src_port: key.src_port,
        dst_port: backend.port,
        backend_id,
        service_id,
        flags: 0,
    };
    let route = if route_replies || snat_address.is_some() { conntrack_flags::ROUTE } else { 0 };
    let reply = ConntrackEntry {
        src_address: key.dst_address,
        dst_address: key.src_address,
        src_port: key.dst_port,
        dst_port: key.src_port,
        backend_id,
        service_id,
        flags: conntrack_flags::REPLY | route,
    };
    let mut reply_key = FlowKey {
        src_address: backend.address,
        dst_address: key.src_address,
        src_port: backend.port,
        dst_port: key.src_port,
        protocol: key.protocol,
        _pad: [0; 3],
    };
    // The reply entry first: once the forward entry exists, a reply may come back at any time.
    match snat_address {
        None => {
            if LB_CONNTRACK.insert(&reply_key, &reply, 0).is_err() {
                count(counters::CONNTRACK_INSERT_FAILED);
            }
        }
        Some(address) => {
            let port = snat_port(&mut reply_key, address, hash, &reply)?;
            forward.src_address = address;
            forward.src_port = port;
            forward.flags = conntrack_flags::ROUTE;
            count(counters::CONNTRACK_SNAT);
        }
    }
    if LB_CONNTRACK.insert(key, &forward, 0).is_err() {
        count(counters::CONNTRACK_INSERT_FAILED);
    }
    Ok(forward)
}

/// Claims a source port on `address` for a flow by inserting its reply entry where no other
/// flow's is; returns the port (network byte order).
#[inline(always)]
fn snat_port(
    reply_key: &mut FlowKey,
    address: u32,
    hash: u32,
    reply: &ConntrackEntry,
) -> Result<u16, Verdict> {
    let failed = || Verdict::drop(counters::DROP_SNAT_FAILED);
    let config = LB_CONFIG.get(0).ok_or_else(failed)?;
    let (min, max) = (u32::from(config.snat_port_min), u32::from(config.snat_port_max));
    if max < min {
        return Err(failed());
    }
    let span = max - min + 1;
    reply_key.dst_address = address;
    for attempt in 0..SNAT_PORT_TRIES {
        let port = (min + (hash.wrapping_add(attempt.wrapping_mul(0x9e37_79b9)) % span)) as u16;
        reply_key.dst_port = port.to_be();
        if LB_CONNTRACK.insert(&*reply_key, reply, BPF_NOEXIST).is_ok() {
            return Ok(port.to_be());
        }
    }
    Err(failed())
}
