//! A new flow to a frontend: source ranges, what to do without backends, the backend, source
//! NAT, and the conntrack entries. Shared by the TC and XDP programs; each turns the decision
//! into its own verdict.

use aya_ebpf::{EbpfContext, maps::lpm_trie::Key};
use aya_log_ebpf::error;
use lb_common::{ConntrackEntry, FlowKey, ServiceKey, SourceRangeKey, counters, service_flags};

use crate::{
    conntrack,
    maps::{LB_BACKENDS, LB_CONFIG, LB_SERVICES, LB_SOURCE_RANGES},
    parse::Ipv4Flow,
    select,
};

pub enum NewFlow {
    /// No frontend here (or, with `external_only`, not an external one).
    NotService,
    /// A frontend without backends whose client must be told (TCP RST / ICMP unreachable).
    Reject,
    /// Dropped; the counter says why.
    Drop(u32),
    /// Backend chosen and the flow tracked: rewrite the packet as the entry says.
    Tracked(ConntrackEntry),
}

#[inline(always)]
pub fn new_flow<C: EbpfContext>(ctx: &C, flow: &Ipv4Flow, key: &FlowKey, external_only: bool) -> NewFlow {
    let service_key = ServiceKey {
        address: flow.dst_address,
        port: flow.dst_port,
        backend_slot: 0,
        protocol: flow.protocol,
        scope: 0,
        _pad: [0; 2],
    };
    // SAFETY (all map reads below): values are copied out at once.
    let Some(service) = (unsafe { LB_SERVICES.get(service_key) }).copied() else {
        return NewFlow::NotService;
    };
    if external_only && service.flags & service_flags::EXTERNAL == 0 {
        return NewFlow::NotService;
    }
    if service.flags & service_flags::SOURCE_RANGES != 0 {
        let range_key = Key::new(
            SourceRangeKey::prefix_len(32),
            SourceRangeKey { service_id: service.service_id.to_be(), address: flow.src_address },
        );
        if LB_SOURCE_RANGES.get(range_key).is_none() {
            return NewFlow::Drop(counters::DROP_SOURCE_RANGE);
        }
    }
    if service.backend_count == 0 {
        if service.flags & service_flags::DROP_WHEN_EMPTY != 0 {
            return NewFlow::Drop(counters::DROP_NO_LOCAL_BACKEND);
        }
        return NewFlow::Reject;
    }
    let hash = select::flow_hash(flow);
    let slot_key = service_key.with_slot(select::backend_slot(hash, service.backend_count));
    // Only a controller bug (or a torn update) gets here: worth a log line, off the fast path.
    let inconsistent = |what: &str| {
        error!(ctx, "service {} slot {}: {} missing", service.service_id, slot_key.backend_slot, what);
        NewFlow::Drop(counters::DROP_SERVICE_INCONSISTENT)
    };
    let Some(slot) = (unsafe { LB_SERVICES.get(slot_key) }).copied() else { return inconsistent("slot") };
    let Some(backend) = (unsafe { LB_BACKENDS.get(slot.backend_id) }).copied() else {
        return inconsistent("backend");
    };

    // Source NAT for external traffic under Cluster policy, and for hairpin: a pod reaching
    // itself through the Service would otherwise get a packet from its own address.
    let snat_address = if service.flags & service_flags::SNAT != 0 || flow.src_address == backend.address {
        match LB_CONFIG.get(0).map(|config| config.snat_address) {
            Some(address) if address != 0 => Some(address),
            _ => return NewFlow::Drop(counters::DROP_SNAT_FAILED),
        }
    } else {
        None
    };
    let route_replies = service.flags & service_flags::NODE_ADDRESS != 0;
    match conntrack::track(
        key,
        hash,
        service.service_id,
        slot.backend_id,
        &backend,
        snat_address,
        route_replies,
    ) {
        Ok(entry) => NewFlow::Tracked(entry),
        Err(verdict) => NewFlow::Drop(verdict.counter),
    }
}
