//! A new flow to a frontend: source ranges, what to do without backends, the backend, source
//! NAT, and the conntrack entries. Shared by the TC and XDP programs; each turns the decision
//! into its own verdict.

use aya_ebpf::{EbpfContext, maps::lpm_trie::Key};
use aya_log_ebpf::error;
use lb_common::{
    FlowKeyOf, ServiceKeyOf, ServiceValue, SourceRangeKeyOf, backend_flags, counters, scope, service_flags,
};

use crate::{
    conntrack::{self, NewFlowEntry, TrackSpace},
    family::Family,
    parse::Flow,
    select::{self, Inconsistent},
};

/// Where a packet's source is, which decides the view of an external frontend it gets.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// A pod or the node: inside the cluster. An `externalTrafficPolicy: Local` frontend gives
    /// it every endpoint, as kube-proxy does.
    InCluster,
    /// Arrived on an uplink: Local policies apply.
    External,
    /// XDP on an uplink: like `External`, and only external frontends are its business.
    ExternalXdp,
}

pub enum NewFlow {
    /// No frontend here (or, for XDP, not an external one).
    NotService,
    /// A frontend without backends whose client must be told (TCP RST / ICMP unreachable).
    Reject,
    /// Dropped; the counter says why.
    Drop(u32),
    /// Backend chosen and the flow tracked: rewrite the packet as the client direction's entry
    /// (left in the `TrackSpace`) says.
    Tracked,
}

/// The service entry of the frontend at `address:port/protocol` as `source` sees it, with its
/// key. A frontend with two scopes gives in-cluster sources its internal one.
#[inline(always)]
pub fn frontend<A: Family>(
    address: A,
    port: u16,
    protocol: u8,
    source: Source,
) -> Option<(ServiceKeyOf<A>, ServiceValue)> {
    let key = ServiceKeyOf { address, port, backend_slot: 0, protocol, scope: scope::EXTERNAL, _pad: 0 };
    // SAFETY (map reads): values are copied out at once.
    let service = *unsafe { A::services().get(key) }?;
    if source == Source::InCluster && service.flags & service_flags::TWO_SCOPES != 0 {
        let internal = ServiceKeyOf { scope: scope::INTERNAL, ..key };
        if let Some(value) = unsafe { A::services().get(internal) } {
            return Some((internal, *value));
        }
    }
    Some((key, service))
}

#[inline(always)]
pub fn new_flow<C: EbpfContext, A: Family>(
    ctx: &C,
    flow: &Flow<A>,
    key: &FlowKeyOf<A>,
    source: Source,
    space: &mut TrackSpace<A>,
) -> NewFlow {
    let Some((service_key, service)) = frontend(flow.dst_address, flow.dst_port, flow.protocol, source)
    else {
        return NewFlow::NotService;
    };
    if source == Source::ExternalXdp && service.flags & service_flags::EXTERNAL == 0 {
        return NewFlow::NotService;
    }
    if service.flags & service_flags::SOURCE_RANGES != 0 {
        let range_key = Key::new(
            SourceRangeKeyOf::<A>::prefix_len(A::BITS),
            SourceRangeKeyOf { service_id: service.service_id.to_be(), address: flow.src_address },
        );
        if A::source_ranges().get(range_key).is_none() {
            return NewFlow::Drop(counters::DROP_SOURCE_RANGE);
        }
    }
    if service.backend_count == 0 {
        if service.flags & service_flags::DROP_WHEN_EMPTY != 0 {
            return NewFlow::Drop(counters::DROP_NO_LOCAL_BACKEND);
        }
        return NewFlow::Reject;
    }
    let hash =
        select::flow_hash(flow.src_address, flow.dst_address, flow.src_port, flow.dst_port, flow.protocol);
    let (backend_id, backend) = match select::choose(&service_key, &service, hash, flow.src_address) {
        Ok(chosen) => chosen,
        // Only a controller bug (or a torn update) gets here: worth a log line, off the fast path.
        Err(what) => {
            let what = match what {
                Inconsistent::Slot => "slot",
                Inconsistent::Backend => "backend",
            };
            error!(ctx, "service {}: {} missing", service.service_id, what);
            return NewFlow::Drop(counters::DROP_SERVICE_INCONSISTENT);
        }
    };

    // Source NAT for external traffic under Cluster policy, and for hairpin: a pod reaching
    // itself through the Service would otherwise get a packet from its own address. Never to
    // a host-network backend: its replies leave through this node anyway, and a packet from a
    // node address to a node address would be a martian.
    let host_backend = backend.flags & backend_flags::HOST != 0;
    let wants_snat = service.flags & service_flags::SNAT != 0 || flow.src_address == backend.address;
    let snat_address = if wants_snat && !host_backend {
        match A::snat_address() {
            Some(address) => Some(address),
            None => return NewFlow::Drop(counters::DROP_SNAT_FAILED),
        }
    } else {
        None
    };
    let new = NewFlowEntry {
        service_id: service.service_id,
        backend_id,
        backend: &backend,
        snat_address,
        route_replies: service.flags & service_flags::NODE_ADDRESS != 0,
        tcp_flags: flow.tcp_flags,
        hash,
        now: conntrack::now(),
    };
    match A::track(key, &new, space) {
        Ok(()) => NewFlow::Tracked,
        Err(verdict) => NewFlow::Drop(verdict.counter),
    }
}
