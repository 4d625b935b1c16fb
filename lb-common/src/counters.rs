//! Indexes into the per-CPU counters array: one per verdict and per drop or pass-over reason.
//! Every packet a TC program sees bumps exactly one verdict counter (`PASS_*`, `FORWARD_*`,
//! `REPLY_*`, `DROP_*`, `RESET_*`, `EGRESS_*`); the `CONNTRACK_*`, `AFFINITY_*` and `FRAGMENT_*`
//! event counters come on top of that, and the `SOCKET_*` ones count the socket programs' work,
//! not packets.

/// Packets seen: not counted by the data path (one map update per packet fewer), but summed
/// from the verdict counters by `derive_packets`.
pub const PACKETS: u32 = 0;
/// Neither IPv4 nor IPv6 (ARP, VLAN-tagged, ...): passed untouched.
pub const PASS_NOT_IP: u32 = 1;
/// IP but neither TCP nor UDP (nor an ICMP error about a tracked flow): passed untouched.
pub const PASS_OTHER_PROTOCOL: u32 = 2;
/// TCP/UDP to no frontend and not a reply of a tracked flow: passed untouched.
pub const PASS_NOT_SERVICE: u32 = 3;
/// First packet of a flow to a frontend: backend chosen, flow tracked, destination rewritten.
pub const FORWARD_NEW_FLOW: u32 = 4;
/// Later packet of a tracked flow: destination rewritten to the flow's backend.
pub const FORWARD_TRACKED_FLOW: u32 = 5;
/// Reply of a tracked flow: source rewritten back to the frontend.
pub const REPLY_REVERSE_NAT: u32 = 6;
/// A later fragment of a datagram whose first fragment lb did not translate (or has not
/// seen yet): passed untouched.
pub const PASS_FRAGMENT: u32 = 7;
/// IP header that is not what it claims (bad version, IHL < 5, total length shorter than the
/// header, an IPv6 jumbogram): passed untouched for the stack to reject.
pub const PASS_MALFORMED: u32 = 8;
/// Packet shorter than the headers it announces: passed untouched.
pub const PASS_TRUNCATED: u32 = 9;
/// Frontend with no usable endpoints: the client was sent a TCP RST or an ICMP port
/// unreachable, as kube-proxy rejects.
pub const REJECT_NO_BACKEND: u32 = 10;
/// Service entry whose backend slot or backend is missing (a bug or a torn update): dropped.
pub const DROP_SERVICE_INCONSISTENT: u32 = 11;
/// A packet rewrite helper failed: dropped rather than sent half-rewritten.
pub const DROP_REWRITE_FAILED: u32 = 12;
/// A new flow's entries could not be written for a reason other than a full table: translated
/// anyway (an event).
pub const CONNTRACK_INSERT_FAILED: u32 = 13;
/// The conntrack table is full: the new flow was dropped (its client retries), so no live
/// flow is ever evicted to make room.
pub const DROP_CONNTRACK_FULL: u32 = 14;
/// Source outside the frontend's loadBalancerSourceRanges: dropped.
pub const DROP_SOURCE_RANGE: u32 = 15;
/// No local endpoint under a Local traffic policy while the Service has endpoints elsewhere:
/// dropped, as kube-proxy does.
pub const DROP_NO_LOCAL_BACKEND: u32 = 16;
/// A new flow needed source NAT but the node's address is unknown or no source port was
/// free: dropped.
pub const DROP_SNAT_FAILED: u32 = 17;
/// No reject could be built (the packet is itself a RST, has IP options, or a helper failed):
/// dropped.
pub const DROP_REJECT_FAILED: u32 = 18;
/// Source NAT applied to a new flow (external traffic under Cluster policy, or hairpin): an
/// event on top of the flow's verdict.
pub const CONNTRACK_SNAT: u32 = 19;
/// ICMP error about a tracked flow: its quoted packet and addresses translated back.
pub const ICMP_ERROR_TRANSLATED: u32 = 20;
/// A socket of the node's own connected (or sent) to a frontend, given a backend instead
/// (socket programs; not a packet).
pub const SOCKET_TRANSLATED: u32 = 21;
/// A socket of the node's own refused: the frontend has no usable endpoint (socket programs;
/// not a packet).
pub const SOCKET_REFUSED: u32 = 22;
/// XDP translated a packet and sent it back out the interface it came in on (a remote
/// backend, or a reply to an external client), before the stack saw it. The packet's verdict:
/// the TC program never sees it.
pub const XDP_TX: u32 = 23;
/// XDP left a packet to the TC program (its next hop is another interface, or it is not
/// XDP's to handle): an event on top of TC's verdict.
pub const XDP_PASS: u32 = 24;
/// A packet of a TCP flow whose backend stopped being an endpoint: answered with a RST.
pub const RESET_BACKEND_GONE: u32 = 25;
/// A SYN-ACK matched the reply entry of a flow that had ended: a new connection that is not
/// lb's (a client reaching the pod directly from a port an old Service flow used). Passed
/// untouched, and the stale entry removed.
pub const PASS_ENDED_FLOW: u32 = 26;
/// A SYN on the tuple of an ended flow: tracked as the new flow it is (an event).
pub const CONNTRACK_REOPENED: u32 = 27;
/// A later fragment rewritten like its datagram's first fragment.
pub const FRAGMENT_TRANSLATED: u32 = 28;
/// A first fragment's translation could not be recorded for its later fragments (an event).
pub const FRAGMENT_TRACK_FAILED: u32 = 29;
/// A new flow went to the backend its client's session affinity names (an event).
pub const AFFINITY_HIT: u32 = 30;
/// Egress: a reply from a socket of the node's (an endpoint in the host network) rewritten
/// back to its frontend.
pub const EGRESS_REVERSE_NAT: u32 = 31;
/// Egress: anything else, passed untouched.
pub const EGRESS_PASS: u32 = 32;
/// IPv6 whose extension headers lb does not pass over to the ports: a routing header with
/// segments left (the destination is not the final one), AH or ESP, or a chain longer than
/// the programs walk. Passed untouched.
pub const PASS_IPV6_EXTENSION: u32 = 33;
/// An SCTP packet whose translation would change a port: dropped, since SCTP's CRC32c covers
/// the ports and lb does not recompute it. The controller programs no such frontend, so this
/// counts only what slips past it.
pub const DROP_SCTP_PORT_REWRITE: u32 = 34;

pub const COUNT: u32 = 35;

/// Names in index order, for display.
pub const NAMES: [&str; COUNT as usize] = [
    "packets",
    "pass_not_ip",
    "pass_other_protocol",
    "pass_not_service",
    "forward_new_flow",
    "forward_tracked_flow",
    "reply_reverse_nat",
    "pass_fragment",
    "pass_malformed",
    "pass_truncated",
    "reject_no_backend",
    "drop_service_inconsistent",
    "drop_rewrite_failed",
    "conntrack_insert_failed",
    "drop_conntrack_full",
    "drop_source_range",
    "drop_no_local_backend",
    "drop_snat_failed",
    "drop_reject_failed",
    "conntrack_snat",
    "icmp_error_translated",
    "socket_translated",
    "socket_refused",
    "xdp_tx",
    "xdp_pass",
    "reset_backend_gone",
    "pass_ended_flow",
    "conntrack_reopened",
    "fragment_translated",
    "fragment_track_failed",
    "affinity_hit",
    "egress_reverse_nat",
    "egress_pass",
    "pass_ipv6_extension",
    "drop_sctp_port_rewrite",
];

/// Whether the counter at `index` is a verdict (exactly one per packet).
pub const fn is_verdict(index: u32) -> bool {
    !matches!(
        index,
        PACKETS
            | CONNTRACK_INSERT_FAILED
            | CONNTRACK_SNAT
            | SOCKET_TRANSLATED
            | SOCKET_REFUSED
            | XDP_PASS
            | CONNTRACK_REOPENED
            | FRAGMENT_TRACK_FAILED
            | AFFINITY_HIT
    ) && index < COUNT
}

/// Fills in `PACKETS` from the verdict counters of a full set of values, indexed as above.
pub fn derive_packets(values: &mut [u64]) {
    let packets = (0..values.len() as u32).filter(|i| is_verdict(*i)).map(|i| values[i as usize]).sum();
    if let Some(slot) = values.get_mut(PACKETS as usize) {
        *slot = packets;
    }
}
