//! Flow tracking. One map holds both directions of every translated flow, keyed by the 5-tuple
//! a packet arrives with, so a packet of a tracked flow costs one lookup. Each entry carries
//! the flow's state, and the data path keeps the two entries' states alike when they change
//! (SYN-ACK, FIN, RST: a second lookup, once per change, never per packet). Userspace's
//! collector removes flows that ended or idled past their timeout, and marks or removes those
//! whose backend left its frontend.
//!
//! The state is what keeps a flow from capturing connections that are not its own: once a
//! flow has ended, a SYN on its tuple starts a new flow, and a SYN-ACK matching its reply entry
//! (a client reaching the pod directly from a port the old flow used) passes untouched.

use aya_ebpf::helpers::bpf_ktime_get_coarse_ns;
use lb_common::{
    BackendOf, ConntrackEntryOf, FlowKeyOf, conntrack_flags as cf, conntrack_state as cs, counters,
};

use crate::{
    family::Family,
    headers::{PROTOCOL_SCTP, PROTOCOL_TCP, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
    maps::{LB_CLOCK, LB_CONFIG, count},
    parse::Flow,
    verdict::Verdict,
};

/// The time flows are stamped with: the clock userspace publishes (CLOCK_MONOTONIC, a
/// `CLOCK_TICK_NS` step), or, before it has published anything, the kernel's coarse clock
/// (same base). Userspace compares the stamps with its own CLOCK_MONOTONIC.
#[inline(always)]
pub fn now() -> u64 {
    match LB_CLOCK.get(0) {
        Some(published) if *published != 0 => *published,
        // SAFETY: plain helper call.
        _ => unsafe { bpf_ktime_get_coarse_ns() },
    }
}

/// `last_seen_ns` is rewritten only when it is older than this (about a second): a flow's
/// packets do not all write the entry.
const REFRESH_NS: u64 = 1 << 30;

/// Linux's BPF_NOEXIST and BPF_ANY.
const BPF_ANY: u64 = 0;
const BPF_NOEXIST: u64 = 1;
/// What the map update helper returns for a key taken (BPF_NOEXIST) and for a full map.
const EEXIST: i32 = -17;
const E2BIG: i32 = -7;
/// Source ports tried for a source-NATed flow before giving up.
const SNAT_PORT_TRIES: u32 = 8;

/// The flow as the packet carries it (client -> frontend, or backend -> client for a reply).
#[inline(always)]
pub fn packet_key<A: Family>(flow: &Flow<A>) -> FlowKeyOf<A> {
    FlowKeyOf {
        src_address: flow.src_address,
        dst_address: flow.dst_address,
        src_port: flow.src_port,
        dst_port: flow.dst_port,
        protocol: flow.protocol,
        _pad0: 0,
        _pad1: 0,
    }
}

#[inline(always)]
pub fn lookup<A: Family>(key: &FlowKeyOf<A>) -> Option<*mut ConntrackEntryOf<A>> {
    A::conntrack().get_ptr_mut(key).or_else(|| carry_over(key))
}

/// A flow the previous programs tracked in the map a start is migrating from: moved into this
/// map on its first packet here. Outside a migration, one lookup in an empty array.
#[inline(always)]
fn carry_over<A: Family>(key: &FlowKeyOf<A>) -> Option<*mut ConntrackEntryOf<A>> {
    let previous = A::previous_flow(key)?;
    // SAFETY: copied out at once from a pointer into the previous map's value.
    let entry = unsafe { *previous };
    let _ = A::conntrack().insert(key, &entry, BPF_NOEXIST);
    A::conntrack().get_ptr_mut(key)
}

/// Whether a live flow in the map a start is migrating from holds this tuple.
#[inline(always)]
fn held_by_previous<A: Family>(key: &FlowKeyOf<A>) -> bool {
    // SAFETY: one field read from a pointer into the previous map's value.
    A::previous_flow(key).is_some_and(|entry| unsafe { (*entry).state } != cs::TCP_CLOSED)
}

/// What to do with a packet whose 5-tuple has an entry.
pub enum Tracked<A> {
    /// Rewrite it as the entry says. A pointer into the map, not a copy (a copy costs stack,
    /// which IPv6 has none to spare of): the fields a rewrite reads (addresses, ports, IDs,
    /// the REPLY and ROUTE flags) never change once the entry is written.
    Translate(*const ConntrackEntryOf<A>),
    /// A new connection on the tuple of an ended flow: track it as the new flow it is.
    Reopen,
    /// A new connection that is not this flow's: pass it untouched.
    NotOurs,
    /// The flow's backend is gone: answer the client with a RST.
    Reset,
}

/// Sets the state (and adds `flags`) on an entry and on its flow's other entry. The other
/// entry is found by reversing this one's rewrite, and changed only if it points back at `key`:
/// a reply tuple (a source-NAT port) may already belong to a newer flow.
#[inline(always)]
fn set_state<A: Family>(key: &FlowKeyOf<A>, entry: &mut ConntrackEntryOf<A>, state: u8, flags: u16) {
    entry.state = state;
    entry.flags |= flags;
    if let Some(peer) = A::conntrack().get_ptr_mut(&entry.peer_key(key.protocol)) {
        // SAFETY: a pointer into the map's value; concurrent writers only set the same fields
        // to values of the same transition.
        let peer = unsafe { &mut *peer };
        if peer.peer_key(key.protocol) == *key {
            peer.state = state;
            peer.flags |= flags;
        }
    }
}

/// A TCP packet with SYN, FIN or RST, or a reply still in SYN_SENT: the flow's state moves.
/// `Some` ends processing with that outcome; `None` translates as usual.
#[inline(never)]
fn tcp_transition<A: Family>(
    key: &FlowKeyOf<A>,
    entry: &mut ConntrackEntryOf<A>,
    tcp_flags: u8,
) -> Option<Tracked<A>> {
    let reply = entry.is_reply();
    if tcp_flags & TCP_SYN != 0 {
        if !reply {
            // The client's SYN: a retransmission while the flow is new, else a new connection
            // on this tuple (the old flow ended, or its backend is gone).
            if tcp_flags & TCP_ACK == 0
                && (entry.state != cs::TCP_SYN_SENT || entry.flags & cf::BACKEND_GONE != 0)
            {
                // The old flow is over: its reply entry must not take the new flow's (or
                // anyone's) packets while it waits for the collector.
                set_state(key, entry, cs::TCP_CLOSED, 0);
                return Some(Tracked::Reopen);
            }
            return None;
        }
        // From the backend, a SYN-ACK belongs to the flow unless the flow has ended (a late
        // retransmission while closing is still its own).
        if tcp_flags & TCP_ACK == 0 || entry.state == cs::TCP_CLOSED {
            if entry.state == cs::TCP_CLOSED {
                // A connection that is not this flow's (a client reaching the pod directly from
                // a port the flow used): the old entry must not take its later packets either.
                let _ = A::conntrack().remove(key);
            }
            return Some(Tracked::NotOurs);
        }
        if entry.state == cs::TCP_SYN_SENT {
            set_state(key, entry, cs::TCP_ESTABLISHED, 0);
        }
        return None;
    }
    if tcp_flags & TCP_RST != 0 {
        set_state(key, entry, cs::TCP_CLOSED, 0);
        return None;
    }
    if tcp_flags & TCP_FIN != 0 {
        let fin = if reply { cf::FIN_BACKEND } else { cf::FIN_CLIENT };
        let both = cf::FIN_CLIENT | cf::FIN_BACKEND;
        let state = if (entry.flags | fin) & both == both { cs::TCP_CLOSED } else { cs::TCP_CLOSING };
        if entry.state != cs::TCP_CLOSED {
            set_state(key, entry, state, fin);
        }
        return None;
    }
    // A reply without SYN while SYN_SENT: the SYN-ACK was not seen (lb started in between).
    set_state(key, entry, cs::TCP_ESTABLISHED, 0);
    None
}

/// Moves a tracked flow along with this packet and says what to do with it.
#[inline(always)]
pub fn on_packet<A: Family>(
    key: &FlowKeyOf<A>,
    entry: *mut ConntrackEntryOf<A>,
    tcp_flags: u8,
    now: u64,
) -> Tracked<A> {
    // SAFETY: a pointer into the map's value, valid for this program run.
    let entry = unsafe { &mut *entry };
    if key.protocol == PROTOCOL_TCP {
        let moves = tcp_flags & (TCP_SYN | TCP_FIN | TCP_RST) != 0
            || (entry.state == cs::TCP_SYN_SENT && entry.is_reply());
        if moves && let Some(outcome) = tcp_transition(key, entry, tcp_flags) {
            return outcome;
        }
        if entry.flags & cf::BACKEND_GONE != 0 && !entry.is_reply() {
            set_state(key, entry, cs::TCP_CLOSED, 0);
            return Tracked::Reset;
        }
    } else if entry.state == cs::UDP_ONE_WAY && entry.is_reply() {
        set_state(key, entry, cs::UDP_REPLIED, 0);
    }
    if now.wrapping_sub(entry.last_seen_ns) > REFRESH_NS {
        entry.last_seen_ns = now;
    }
    Tracked::Translate(entry)
}

/// The state a flow starts in, from its first packet.
#[inline(always)]
fn initial_state(protocol: u8, tcp_flags: u8) -> (u8, u16) {
    if protocol != PROTOCOL_TCP {
        return (cs::UDP_ONE_WAY, 0);
    }
    if tcp_flags & TCP_RST != 0 {
        (cs::TCP_CLOSED, 0)
    } else if tcp_flags & TCP_SYN != 0 && tcp_flags & TCP_ACK == 0 {
        (cs::TCP_SYN_SENT, 0)
    } else if tcp_flags & TCP_FIN != 0 {
        (cs::TCP_CLOSING, cf::FIN_CLIENT)
    } else {
        // Picked up mid-stream (its entries were lost): it is established.
        (cs::TCP_ESTABLISHED, 0)
    }
}

/// A new flow's choice, for `track`.
pub struct NewFlowEntry<'a, A> {
    pub service_id: u32,
    pub backend_id: u32,
    pub backend: &'a BackendOf<A>,
    /// Source NAT to this node address (network byte order).
    pub snat_address: Option<A>,
    /// Replies leave with a node address as their source: route them (NodePort).
    pub route_replies: bool,
    pub tcp_flags: u8,
    /// The flow's hash (source ports for source NAT are tried from it).
    pub hash: u32,
    /// The flows' clock (`now`).
    pub now: u64,
}

/// Where `track` builds a new flow's entries: on the caller's stack for IPv4, in a per-CPU
/// scratch map for IPv6 (whose entries do not fit its stack).
pub struct TrackSpace<A> {
    /// The client direction's entry, which the packet is then rewritten by.
    pub forward: ConntrackEntryOf<A>,
    pub reply: ConntrackEntryOf<A>,
    pub reply_key: FlowKeyOf<A>,
}

impl TrackSpace<u32> {
    #[inline(always)]
    pub fn zeroed() -> Self {
        Self {
            forward: bytemuck::Zeroable::zeroed(),
            reply: bytemuck::Zeroable::zeroed(),
            reply_key: bytemuck::Zeroable::zeroed(),
        }
    }
}

/// Records a new flow in both directions, leaving the client direction's entry in
/// `space.forward`. With
/// `snat_address`, the flow's source becomes that address and a free port, so the reply comes
/// back through this node. The reply entry goes in first (once the forward entry exists, a
/// reply may come back at any time); a reply tuple held by another live flow gets this flow a
/// new source port, as netfilter resolves such clashes (SCTP keeps its port, or is dropped).
/// A full table refuses the flow.
#[inline(always)]
pub fn track<A: Family>(
    key: &FlowKeyOf<A>,
    new: &NewFlowEntry<A>,
    space: &mut TrackSpace<A>,
) -> Result<(), Verdict> {
    let (hash, now) = (new.hash, new.now);
    let (state, state_flags) = initial_state(key.protocol, new.tcp_flags);
    let route = if new.route_replies || new.snat_address.is_some() { cf::ROUTE } else { 0 };
    let TrackSpace { forward, reply, reply_key } = space;
    *forward = ConntrackEntryOf {
        src_address: key.src_address,
        dst_address: new.backend.address,
        src_port: key.src_port,
        dst_port: new.backend.port,
        backend_id: new.backend_id,
        service_id: new.service_id,
        flags: state_flags,
        state,
        _pad: 0,
        last_seen_ns: now,
        created_ns: now,
    };
    *reply = ConntrackEntryOf {
        src_address: key.dst_address,
        dst_address: key.src_address,
        src_port: key.dst_port,
        dst_port: key.src_port,
        flags: cf::REPLY | route | state_flags,
        ..*forward
    };
    *reply_key = FlowKeyOf {
        src_address: new.backend.address,
        dst_address: key.src_address,
        src_port: new.backend.port,
        dst_port: key.src_port,
        protocol: key.protocol,
        _pad0: 0,
        _pad1: 0,
    };
    let full = Verdict::drop(counters::DROP_CONNTRACK_FULL);
    match new.snat_address {
        None => match A::conntrack().insert(&*reply_key, &*reply, BPF_NOEXIST) {
            Ok(()) => {}
            Err(E2BIG) => return Err(full),
            Err(EEXIST) if reply_tuple_free(reply_key, key) => {
                if A::conntrack().insert(&*reply_key, &*reply, BPF_ANY).is_err() {
                    count(counters::CONNTRACK_INSERT_FAILED);
                }
            }
            Err(EEXIST) => {
                // Another live flow from this client port reaches the same backend (through
                // another frontend): give this one a port of its own on the client's address.
                let port = claim_port(reply_key, key.src_address, source_port(key, hash), reply)?;
                forward.src_port = port;
                count(counters::CONNTRACK_SNAT);
            }
            Err(_) => count(counters::CONNTRACK_INSERT_FAILED),
        },
        Some(address) => {
            let port = claim_port(reply_key, address, source_port(key, hash), reply)?;
            forward.src_address = address;
            forward.src_port = port;
            forward.flags |= cf::ROUTE | cf::SNAT;
            count(counters::CONNTRACK_SNAT);
        }
    }
    match A::conntrack().insert(key, &*forward, BPF_ANY) {
        Ok(()) => {
            share_with_previous(key, forward, reply_key, reply);
            Ok(())
        }
        Err(E2BIG) => {
            let _ = A::conntrack().remove(&*reply_key);
            Err(full)
        }
        Err(_) => {
            count(counters::CONNTRACK_INSERT_FAILED);
            Ok(())
        }
    }
}

/// During a migration the links switch to the new programs one at a time, and a program not
/// switched yet reads only the previous map: a new flow goes there too, so its packets on the
/// interfaces not switched yet (a reply, say) are translated. Best effort: a full or taken
/// slot there loses only what the migration would have lost anyway. Outside a migration, one
/// lookup in an empty array.
#[inline(always)]
fn share_with_previous<A: Family>(
    key: &FlowKeyOf<A>,
    forward: &ConntrackEntryOf<A>,
    reply_key: &FlowKeyOf<A>,
    reply: &ConntrackEntryOf<A>,
) {
    A::offer_to_previous(reply_key, reply);
    A::offer_to_previous(key, forward);
}

/// Whether a taken reply tuple may be overwritten: it is the reply entry of this same flow (a
/// new connection on its tuple), or of a flow that has ended.
#[inline(always)]
fn reply_tuple_free<A: Family>(reply_key: &FlowKeyOf<A>, forward_key: &FlowKeyOf<A>) -> bool {
    // SAFETY: copied out at once.
    let Some(existing) = (unsafe { A::conntrack().get(reply_key) }).copied() else { return true };
    existing.state == cs::TCP_CLOSED || existing.peer_key(reply_key.protocol) == *forward_key
}

/// Whether the entry at `key` belongs to a flow that has ended (or is gone).
#[inline(always)]
fn ended<A: Family>(key: &FlowKeyOf<A>) -> bool {
    // SAFETY: copied out at once.
    (unsafe { A::conntrack().get(key) }).is_none_or(|existing| existing.state == cs::TCP_CLOSED)
}

/// Which source ports a flow that needs a port of its own may take.
#[derive(Clone, Copy)]
enum SourcePort {
    /// Any in the configured range, tried from this hash.
    FromRange(u32),
    /// Only the client's own (network byte order): SCTP, whose CRC32c covers the ports.
    Kept(u16),
}

#[inline(always)]
fn source_port<A>(key: &FlowKeyOf<A>, hash: u32) -> SourcePort {
    if key.protocol == PROTOCOL_SCTP { SourcePort::Kept(key.src_port) } else { SourcePort::FromRange(hash) }
}

/// Claims a source port on `address` for a flow by inserting its reply entry where no other
/// flow's is; returns the port (network byte order). Ports of flows that have not been removed
/// yet are never taken: a port is reused only once the collector removed its flow.
#[inline(always)]
fn claim_port<A: Family>(
    reply_key: &mut FlowKeyOf<A>,
    address: A,
    ports: SourcePort,
    reply: &ConntrackEntryOf<A>,
) -> Result<u16, Verdict> {
    let failed = || Verdict::drop(counters::DROP_SNAT_FAILED);
    let config = LB_CONFIG.get(0).ok_or_else(failed)?;
    let (min, max) = (u32::from(config.snat_port_min), u32::from(config.snat_port_max));
    if max < min {
        return Err(failed());
    }
    let span = max - min + 1;
    let (hash, tries) = match ports {
        SourcePort::FromRange(hash) => (hash, SNAT_PORT_TRIES),
        SourcePort::Kept(_) => (0, 1),
    };
    reply_key.dst_address = address;
    for attempt in 0..tries {
        let port = match ports {
            SourcePort::FromRange(_) => {
                (min + (hash.wrapping_add(attempt.wrapping_mul(0x9e37_79b9)) % span)) as u16
            }
            SourcePort::Kept(port) => u16::from_be(port),
        };
        reply_key.dst_port = port.to_be();
        // The previous programs' flows are not all carried over yet: their ports are taken.
        if held_by_previous(reply_key) {
            continue;
        }
        match A::conntrack().insert(&*reply_key, reply, BPF_NOEXIST) {
            Ok(()) => return Ok(port.to_be()),
            Err(E2BIG) => return Err(Verdict::drop(counters::DROP_CONNTRACK_FULL)),
            // The port's flow has ended: it is free again, as netfilter reuses a port whose
            // connection is in TIME_WAIT or CLOSE.
            Err(EEXIST) if ended(reply_key) => {
                if A::conntrack().insert(&*reply_key, reply, BPF_ANY).is_ok() {
                    return Ok(port.to_be());
                }
            }
            Err(_) => {}
        }
    }
    Err(failed())
}
