//! Indexes into the per-CPU counters array: one per verdict and per drop or pass-over reason.
//! Every packet the program sees bumps exactly one verdict counter (`PASS_*`, `FORWARD_*`,
//! `REPLY_*`, `DROP_*`); the `CONNTRACK_*` counters are events on top of that.

/// Packets seen: not counted by the data path (one map update per packet fewer), but summed
/// from the verdict counters by `packets`.
pub const PACKETS: u32 = 0;
/// Not IPv4 (ARP, IPv6, VLAN-tagged, ...): passed untouched.
pub const PASS_NOT_IPV4: u32 = 1;
/// IPv4 but neither TCP nor UDP: passed untouched.
pub const PASS_OTHER_PROTOCOL: u32 = 2;
/// TCP/UDP to no frontend and not a reply of a tracked flow: passed untouched.
pub const PASS_NOT_SERVICE: u32 = 3;
/// First packet of a flow to a frontend: backend chosen, flow tracked, destination rewritten.
pub const FORWARD_NEW_FLOW: u32 = 4;
/// Later packet of a tracked flow: destination rewritten to the flow's backend.
pub const FORWARD_TRACKED_FLOW: u32 = 5;
/// Reply of a tracked flow: source rewritten back to the frontend.
pub const REPLY_REVERSE_NAT: u32 = 6;
/// IPv4 fragment: not translated (ports are only in the first fragment), passed untouched.
pub const PASS_FRAGMENT: u32 = 7;
/// IPv4 header that is not what it claims (bad version, IHL < 5, total length shorter than the
/// header): passed untouched for the stack to reject.
pub const PASS_MALFORMED: u32 = 8;
/// Packet shorter than the headers it announces: passed untouched.
pub const PASS_TRUNCATED: u32 = 9;
/// Frontend with no usable endpoints: dropped.
pub const DROP_NO_BACKEND: u32 = 10;
/// Service entry whose backend slot or backend is missing (a bug or a torn update): dropped.
pub const DROP_SERVICE_INCONSISTENT: u32 = 11;
/// A packet rewrite helper failed: dropped rather than sent half-rewritten.
pub const DROP_REWRITE_FAILED: u32 = 12;
/// The flow could not be recorded (map full and not LRU-evictable): translated anyway.
pub const CONNTRACK_INSERT_FAILED: u32 = 13;
/// A tracked flow's backend was removed: the flow was given a new backend.
pub const CONNTRACK_BACKEND_GONE: u32 = 14;

pub const COUNT: u32 = 15;

/// Names in index order, for display.
pub const NAMES: [&str; COUNT as usize] = [
    "packets",
    "pass_not_ipv4",
    "pass_other_protocol",
    "pass_not_service",
    "forward_new_flow",
    "forward_tracked_flow",
    "reply_reverse_nat",
    "pass_fragment",
    "pass_malformed",
    "pass_truncated",
    "drop_no_backend",
    "drop_service_inconsistent",
    "drop_rewrite_failed",
    "conntrack_insert_failed",
    "conntrack_backend_gone",
];

/// Whether the counter at `index` is a verdict (exactly one per packet).
pub const fn is_verdict(index: u32) -> bool {
    index != PACKETS && index != CONNTRACK_INSERT_FAILED && index != CONNTRACK_BACKEND_GONE && index < COUNT
}

/// Fills in `PACKETS` from the verdict counters of a full set of values, indexed as above.
pub fn derive_packets(values: &mut [u64]) {
    let packets = (0..values.len() as u32).filter(|i| is_verdict(*i)).map(|i| values[i as usize]).sum();
    if let Some(slot) = values.get_mut(PACKETS as usize) {
        *slot = packets;
    }
}
