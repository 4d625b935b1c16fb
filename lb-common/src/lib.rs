//! Types shared by lb's eBPF programs and its userspace controller.
//!
//! Every type here is a BPF map key or value: `#[repr(C)]`, no implicit padding (bytemuck's `Pod`
//! derive refuses to compile otherwise), no `bool` or enum fields. Each field states its byte
//! order. Addresses and ports are kept in network byte order because that is how the data path
//! reads them from packets; the constructors below are the one place where userspace converts.
#![no_std]

use core::net::{Ipv4Addr, Ipv6Addr};

use bytemuck::{Pod, Zeroable};

pub mod counters;

/// IANA protocol numbers, as in the IPv4 header's protocol field.
pub const PROTOCOL_ICMP: u8 = 1;
pub const PROTOCOL_TCP: u8 = 6;
pub const PROTOCOL_UDP: u8 = 17;
/// ICMPv6, as in the IPv6 next-header field.
pub const PROTOCOL_ICMPV6: u8 = 58;
/// SCTP: translated without changing its ports, since its CRC32c covers them (and, unlike
/// TCP's and UDP's checksums, no pseudo-header, so addresses may change freely).
pub const PROTOCOL_SCTP: u8 = 132;

/// An IPv6 address as the maps hold it: its 16 bytes in network byte order, kept as four
/// 32-bit words so the data path reads, compares and hashes it a word at a time (a byte-array
/// comparison would become a `bcmp` call, which BPF has not).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialOrd, Ord, Pod, Zeroable)]
pub struct In6 {
    pub words: [u32; 4],
}

impl PartialEq for In6 {
    #[inline(always)]
    fn eq(&self, other: &Self) -> bool {
        // Word by word: see the type's comment.
        self.words[0] == other.words[0]
            && self.words[1] == other.words[1]
            && self.words[2] == other.words[2]
            && self.words[3] == other.words[3]
    }
}

impl Eq for In6 {}

impl core::hash::Hash for In6 {
    fn hash<H: core::hash::Hasher>(&self, state: &mut H) {
        // The words `eq` compares.
        self.words.hash(state);
    }
}

impl From<Ipv6Addr> for In6 {
    fn from(address: Ipv6Addr) -> Self {
        let octets = address.octets();
        let word = |i: usize| u32::from_ne_bytes([octets[i], octets[i + 1], octets[i + 2], octets[i + 3]]);
        Self { words: [word(0), word(4), word(8), word(12)] }
    }
}

impl From<In6> for Ipv6Addr {
    fn from(address: In6) -> Self {
        let mut octets = [0u8; 16];
        for (i, word) in address.words.iter().enumerate() {
            octets[i * 4..i * 4 + 4].copy_from_slice(&word.to_ne_bytes());
        }
        Ipv6Addr::from(octets)
    }
}

/// An address as the maps hold it, in network byte order: `u32` for IPv4, `In6` for IPv6.
/// Map types are generic over it (`FlowKeyOf<A>`, ...), named per family by aliases
/// (`FlowKey`, `FlowKey6`), so each family has maps of its own and an IPv4 lookup never pays
/// for IPv6's longer keys.
pub trait Address: Copy + PartialEq + Default + 'static {
    /// Mixes the address into a running hash, a 32-bit word at a time.
    fn mix_into(&self, hash: u32) -> u32;
}

impl Address for u32 {
    #[inline(always)]
    fn mix_into(&self, hash: u32) -> u32 {
        mix(hash ^ *self)
    }
}

impl Address for In6 {
    #[inline(always)]
    fn mix_into(&self, hash: u32) -> u32 {
        let hash = mix(hash ^ self.words[0]);
        let hash = mix(hash ^ self.words[1]);
        let hash = mix(hash ^ self.words[2]);
        mix(hash ^ self.words[3])
    }
}

/// `unsafe impl Zeroable + Pod` for each instantiation of a generic map type, with a check at
/// compile time that it has no padding: its size must be the sum of its fields' (bytemuck's
/// derive cannot check a generic struct, so this does it per instantiation).
macro_rules! pod_instances {
    ($($ty:ty = $($field:ty),+;)+) => {$(
        const _: () = assert!(core::mem::size_of::<$ty>() == 0 $(+ core::mem::size_of::<$field>())+);
        // SAFETY: #[repr(C)], every field Pod, and no padding (checked above).
        unsafe impl Zeroable for $ty {}
        // SAFETY: as above.
        unsafe impl Pod for $ty {}
    )+};
}

/// Map names in the eBPF object, which are also the file names they are pinned under.
pub mod map_names {
    pub const SERVICES: &str = "LB_SERVICES";
    pub const BACKENDS: &str = "LB_BACKENDS";
    pub const CONNTRACK: &str = "LB_CONNTRACK";
    pub const SERVICE_META: &str = "LB_SERVICE_META";
    pub const SOURCE_RANGES: &str = "LB_SOURCE_RANGES";
    pub const CONFIG: &str = "LB_CONFIG";
    pub const SOCKETS: &str = "LB_SOCKETS";
    pub const COUNTERS: &str = "LB_COUNTERS";
    pub const AFFINITY: &str = "LB_AFFINITY";
    pub const FRAGMENTS: &str = "LB_FRAGMENTS";
    pub const MAGLEV: &str = "LB_MAGLEV";
    pub const STATS: &str = "LB_STATS";
    pub const CLOCK: &str = "LB_CLOCK";
    pub const LAYOUT: &str = "LB_LAYOUT";
    pub const SERVICE_TRAFFIC: &str = "LB_SERVICE_TRAFFIC";
    /// The IPv6 family's frontends, backends and flows (`ServiceKey6`, `Backend6`, `FlowKey6`).
    pub const SERVICES6: &str = "LB_SERVICES6";
    pub const BACKENDS6: &str = "LB_BACKENDS6";
    pub const CONNTRACK6: &str = "LB_CONNTRACK6";
    pub const SOURCE_RANGES6: &str = "LB_SOURCE_RANGES6";
    pub const AFFINITY6: &str = "LB_AFFINITY6";
    pub const CONFIG6: &str = "LB_CONFIG6";
    /// IPv6 fragments: how a datagram's first fragment was translated (`FragmentKey6`).
    pub const FRAGMENTS6: &str = "LB_FRAGMENTS6";
    /// The node's IPv6 sockets translated at connect/sendmsg (`SocketKey6`).
    pub const SOCKETS6: &str = "LB_SOCKETS6";
    /// The TC programs' IPv6 halves, which they tail-call (`tail_calls`).
    pub const PROGRAMS: &str = "LB_PROGRAMS";
    /// Not pinned: the XDP program's IPv6 parts, which it tail-calls (`xdp_tail_calls`).
    pub const XDP_PROGRAMS: &str = "LB_XDP_PROGRAMS";
    /// Not pinned: the conntrack map a migration moves flows from (see lb-ebpf's maps).
    pub const CONNTRACK_PREVIOUS: &str = "LB_CONNTRACK_PREVIOUS";
    /// Not pinned: IPv6's `CONNTRACK_PREVIOUS`.
    pub const CONNTRACK6_PREVIOUS: &str = "LB_CONNTRACK6_PREVIOUS";
    /// Every pinned map, for tools that inspect or remove them.
    pub const PINNED: [&str; 24] = [
        SERVICES,
        BACKENDS,
        CONNTRACK,
        SERVICE_META,
        SOURCE_RANGES,
        CONFIG,
        SOCKETS,
        COUNTERS,
        AFFINITY,
        FRAGMENTS,
        MAGLEV,
        STATS,
        CLOCK,
        LAYOUT,
        SERVICE_TRAFFIC,
        SERVICES6,
        BACKENDS6,
        CONNTRACK6,
        SOURCE_RANGES6,
        AFFINITY6,
        CONFIG6,
        SOCKETS6,
        FRAGMENTS6,
        PROGRAMS,
    ];
}

/// The layout record (`map_names::LAYOUT`): which layout the pinned maps' entries have, so a
/// later build knows how to read them, converts them into maps of its own layout, or refuses
/// what it cannot read. The record's own shape (an array of `RECORDS` u32) never changes.
pub mod layout {
    /// This build's layout: bumped whenever a pinned map's key, value, type or meaning changes.
    /// Version 0 is the layout of builds from before the record existed.
    pub const VERSION: u32 = 1;
    /// Index of the version of the maps pinned under their own names (0: not recorded).
    pub const PINNED: u32 = 0;
    /// Index of the version of maps pinned as `<name>-migrating` while a start migrates them
    /// (0: no migration under way).
    pub const MIGRATING: u32 = 1;
    /// Entries in the record; the others are reserved.
    pub const RECORDS: u32 = 4;
    /// Suffix of the pins of maps being migrated into (bpffs refuses names with a dot).
    pub const MIGRATING_SUFFIX: &str = "-migrating";
}

/// Slots of the programs map (`map_names::PROGRAMS`): each TC program tail-calls its IPv6 half
/// there, so IPv6 runs on a BPF stack of its own and IPv4 pays nothing for it.
pub mod tail_calls {
    pub const INGRESS6: u32 = 0;
    pub const INGRESS6_EXTERNAL: u32 = 1;
    pub const EGRESS6: u32 = 2;
    pub const COUNT: u32 = 3;
    /// The program in each slot, by name in the eBPF object.
    pub const PROGRAMS: [(u32, &str); COUNT as usize] =
        [(INGRESS6, "lb_ingress6"), (INGRESS6_EXTERNAL, "lb_ingress6_external"), (EGRESS6, "lb_egress6")];
}

/// Slots of the XDP programs map (`map_names::XDP_PROGRAMS`): the XDP program tail-calls its
/// IPv6 half, which tail-calls its new-flow part, each for a BPF stack of its own.
pub mod xdp_tail_calls {
    pub const IPV6: u32 = 0;
    pub const NEW_FLOW6: u32 = 1;
    pub const COUNT: u32 = 2;
    /// The program in each slot, by name in the eBPF object.
    pub const PROGRAMS: [(u32, &str); COUNT as usize] = [(IPV6, "lb_xdp6"), (NEW_FLOW6, "lb_xdp6_new_flow")];
}

/// How often userspace publishes the time in the clock map (`map_names::CLOCK`), in
/// nanoseconds: the data path stamps flows with it instead of reading a clock per packet.
pub const CLOCK_TICK_NS: u64 = 250_000_000;

/// Default map capacities; userspace may raise them at load time.
pub mod capacity {
    /// Service entries plus backend slots (one per backend per frontend).
    pub const SERVICES: u32 = 262_144;
    pub const BACKENDS: u32 = 131_072;
    /// Conntrack entries, two per tracked flow. Not an LRU: a full table refuses new flows
    /// (counted) and never evicts a live one; the collector removes ended flows.
    pub const CONNTRACK: u32 = 524_288;
    pub const SERVICE_META: u32 = 65_536;
    /// loadBalancerSourceRanges entries over all frontends.
    pub const SOURCE_RANGES: u32 = 16_384;
    /// The node's own sockets connected to a backend through a frontend (LRU).
    pub const SOCKETS: u32 = 65_536;
    /// Session-affinity records (client, frontend) -> backend (LRU).
    pub const AFFINITY: u32 = 65_536;
    /// Datagrams whose first fragment was translated and whose later fragments are awaited
    /// (LRU: a datagram whose fragments never come ages out).
    pub const FRAGMENTS: u32 = 8_192;
    /// Maglev lookup tables (one per external Service port).
    pub const MAGLEV_TABLES: u32 = 4_096;
}

/// BPF_F_NO_PREALLOC: the IPv6 family's hash maps take memory as entries are added, so a node
/// that serves no IPv6 does not pay for their full capacity up front.
pub const MAP_NO_PREALLOC: u32 = 1;

/// Maglev lookup table positions: a prime, as Maglev needs, with about 160 positions per
/// backend for a Service of 100 (Cilium's default).
pub const MAGLEV_TABLE_SIZE: u32 = 16_381;

/// murmur3's 32-bit finalizer: cheap, and spreads nearby ports over all slots.
#[inline(always)]
pub fn mix(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^= h >> 16;
    h
}

/// A flow's hash, from its 5-tuple as the client sent it (addresses and ports in network byte
/// order, as on the wire), so every node computes the same one: the data path picks a slot or
/// a Maglev position with it, and userspace's Maglev tests use the same function.
#[inline(always)]
pub fn flow_hash<A: Address>(
    src_address: A,
    dst_address: A,
    src_port: u16,
    dst_port: u16,
    protocol: u8,
) -> u32 {
    let ports = (u32::from(src_port) << 16) | u32::from(dst_port);
    let mut h = src_address.mix_into(0x9e37_79b9);
    h = dst_address.mix_into(h);
    h = mix(h ^ ports);
    mix(h ^ u32::from(protocol))
}

/// Frontend scopes: which view of a frontend a source gets. Most frontends have only the
/// external scope; an external frontend under `externalTrafficPolicy: Local` also has an
/// internal one, with every endpoint, for sources inside the cluster (kube-proxy sends pods
/// and the node itself to all endpoints there).
pub mod scope {
    pub const EXTERNAL: u8 = 0;
    pub const INTERNAL: u8 = 1;
}

/// Key of the services map.
///
/// Slot 0 holds the service entry (how many backend slots the frontend has); slots 1..=count
/// each hold one backend ID. Keeping the frontend and its slots in one map means a lookup of the
/// frontend and of the chosen slot are the same operation with a different `backend_slot`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKeyOf<A> {
    /// Frontend address, network byte order.
    pub address: A,
    /// Frontend port, network byte order.
    pub port: u16,
    /// 0 for the service entry, 1..=count for backend slots; host byte order.
    pub backend_slot: u16,
    /// `PROTOCOL_TCP` or `PROTOCOL_UDP`.
    pub protocol: u8,
    /// `scope::EXTERNAL` (every frontend) or `scope::INTERNAL`.
    pub scope: u8,
    pub _pad: u16,
}

/// An IPv4 frontend's key (`map_names::SERVICES`).
pub type ServiceKey = ServiceKeyOf<u32>;
/// An IPv6 frontend's key (`map_names::SERVICES6`).
pub type ServiceKey6 = ServiceKeyOf<In6>;

pod_instances! {
    ServiceKey = u32, u16, u16, u8, u8, u16;
    ServiceKey6 = In6, u16, u16, u8, u8, u16;
}

impl<A: Copy> ServiceKeyOf<A> {
    pub fn port(&self) -> u16 {
        u16::from_be(self.port)
    }

    /// The same frontend at another slot.
    pub fn with_slot(&self, backend_slot: u16) -> Self {
        Self { backend_slot, ..*self }
    }
}

impl ServiceKey6 {
    pub fn scoped(address: Ipv6Addr, port: u16, protocol: u8, scope: u8, backend_slot: u16) -> Self {
        Self { address: In6::from(address), port: port.to_be(), backend_slot, protocol, scope, _pad: 0 }
    }

    pub fn address(&self) -> Ipv6Addr {
        Ipv6Addr::from(self.address)
    }
}

impl ServiceKey {
    pub fn new(address: Ipv4Addr, port: u16, protocol: u8, backend_slot: u16) -> Self {
        Self::scoped(address, port, protocol, scope::EXTERNAL, backend_slot)
    }

    pub fn scoped(address: Ipv4Addr, port: u16, protocol: u8, scope: u8, backend_slot: u16) -> Self {
        Self {
            address: u32::from(address).to_be(),
            port: port.to_be(),
            backend_slot,
            protocol,
            scope,
            _pad: 0,
        }
    }

    pub fn address(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from_be(self.address))
    }
}

/// Value of the services map. Which fields mean something depends on the key's slot.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct ServiceValue {
    /// Slot > 0: the backend's ID in the backends map. Slot 0: 0. Host byte order.
    pub backend_id: u32,
    /// The frontend's ID (also the key of its metadata). Host byte order.
    pub service_id: u32,
    /// Slot 0: number of backend slots; 0 means "no endpoints: reject". Host byte order.
    pub backend_count: u16,
    /// Slot 0: `service_flags::*`; slots > 0: 0. Host byte order.
    pub flags: u16,
    /// Slot 0: `sessionAffinity: ClientIP`'s timeout in seconds; 0 without affinity. Host
    /// byte order.
    pub affinity_timeout: u32,
    /// Slot 0: the Maglev table new flows pick their backend from (an index of the Maglev
    /// map); 0 picks a slot by hash. Host byte order.
    pub maglev_table: u32,
}

/// Bits of a service entry's `ServiceValue::flags`: how the data path treats the frontend.
pub mod service_flags {
    /// Rewrite a new flow's source to the node's address (`DatapathConfig::snat_address`), so
    /// the reply comes back through this node: external traffic under
    /// `externalTrafficPolicy: Cluster`, as kube-proxy masquerades it.
    pub const SNAT: u16 = 1;
    /// Only sources in the frontend's `loadBalancerSourceRanges` (the source-ranges map) may
    /// connect; others are dropped.
    pub const SOURCE_RANGES: u16 = 1 << 1;
    /// With no backends, drop instead of rejecting: the Service has endpoints, just none on this
    /// node that a Local traffic policy allows.
    pub const DROP_WHEN_EMPTY: u16 = 1 << 2;
    /// The frontend's traffic policy is Local (for display; the control plane already chose
    /// only local backends).
    pub const LOCAL_POLICY: u16 = 1 << 3;
    /// The frontend address is one of the node's own (NodePort): replies leave with it as
    /// their source, so they are routed by the data path (`conntrack_flags::ROUTE`).
    pub const NODE_ADDRESS: u16 = 1 << 4;
    /// Not a ClusterIP: NodePort, LoadBalancer or externalIP traffic, which the XDP program
    /// on the external interfaces takes on.
    pub const EXTERNAL: u16 = 1 << 5;
    /// The frontend also has an internal scope (`scope::INTERNAL`) for sources inside the
    /// cluster: pods and the node.
    pub const TWO_SCOPES: u16 = 1 << 6;
}

impl ServiceValue {
    pub fn service_entry(service_id: u32, backend_count: u16) -> Self {
        Self { backend_id: 0, service_id, backend_count, flags: 0, affinity_timeout: 0, maglev_table: 0 }
    }

    pub fn with_flags(self, flags: u16) -> Self {
        Self { flags, ..self }
    }

    pub fn backend_slot(service_id: u32, backend_id: u32) -> Self {
        Self { backend_id, ..Self::service_entry(service_id, 0) }
    }
}

/// Value of the backends maps, keyed by backend ID (`u32`, host byte order; one ID space for
/// both families' maps).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackendOf<A> {
    /// Pod address, network byte order.
    pub address: A,
    /// Target port, network byte order.
    pub port: u16,
    /// `PROTOCOL_TCP` or `PROTOCOL_UDP`.
    pub protocol: u8,
    /// `backend_flags::*`.
    pub flags: u8,
}

/// Bits of `Backend::flags`.
pub mod backend_flags {
    /// The backend is one of the node's own addresses (a host-network endpoint): flows to it
    /// are never source-NATed (their replies leave through this node anyway), and its replies
    /// are translated back on egress (`lb_egress`).
    pub const HOST: u8 = 1;
}

pub type Backend = BackendOf<u32>;
pub type Backend6 = BackendOf<In6>;

pod_instances! {
    Backend = u32, u16, u8, u8;
    Backend6 = In6, u16, u8, u8;
}

impl<A> BackendOf<A> {
    pub fn with_flags(self, flags: u8) -> Self {
        Self { flags, ..self }
    }

    pub fn port(&self) -> u16 {
        u16::from_be(self.port)
    }
}

impl Backend {
    pub fn new(address: Ipv4Addr, port: u16, protocol: u8) -> Self {
        Self { address: u32::from(address).to_be(), port: port.to_be(), protocol, flags: 0 }
    }

    pub fn address(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from_be(self.address))
    }
}

impl Backend6 {
    pub fn new(address: Ipv6Addr, port: u16, protocol: u8) -> Self {
        Self { address: In6::from(address), port: port.to_be(), protocol, flags: 0 }
    }

    pub fn address(&self) -> Ipv6Addr {
        Ipv6Addr::from(self.address)
    }
}

/// A flow's 5-tuple as seen on the wire: key of the conntrack and reverse-NAT maps.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FlowKeyOf<A> {
    /// Network byte order.
    pub src_address: A,
    /// Network byte order.
    pub dst_address: A,
    /// Network byte order.
    pub src_port: u16,
    /// Network byte order.
    pub dst_port: u16,
    pub protocol: u8,
    // Scalar padding: an array here makes the compiler zero it with a memset call in eBPF.
    pub _pad0: u8,
    pub _pad1: u16,
}

pub type FlowKey = FlowKeyOf<u32>;
pub type FlowKey6 = FlowKeyOf<In6>;

pod_instances! {
    FlowKey = u32, u32, u16, u16, u8, u8, u16;
    FlowKey6 = In6, In6, u16, u16, u8, u8, u16;
}

impl FlowKey6 {
    pub fn new(src: (Ipv6Addr, u16), dst: (Ipv6Addr, u16), protocol: u8) -> Self {
        Self {
            src_address: In6::from(src.0),
            dst_address: In6::from(dst.0),
            src_port: src.1.to_be(),
            dst_port: dst.1.to_be(),
            protocol,
            _pad0: 0,
            _pad1: 0,
        }
    }

    pub fn src(&self) -> (Ipv6Addr, u16) {
        (Ipv6Addr::from(self.src_address), u16::from_be(self.src_port))
    }

    pub fn dst(&self) -> (Ipv6Addr, u16) {
        (Ipv6Addr::from(self.dst_address), u16::from_be(self.dst_port))
    }
}

impl FlowKey {
    pub fn new(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), protocol: u8) -> Self {
        Self {
            src_address: u32::from(src.0).to_be(),
            dst_address: u32::from(dst.0).to_be(),
            src_port: src.1.to_be(),
            dst_port: dst.1.to_be(),
            protocol,
            _pad0: 0,
            _pad1: 0,
        }
    }

    pub fn src(&self) -> (Ipv4Addr, u16) {
        (Ipv4Addr::from(u32::from_be(self.src_address)), u16::from_be(self.src_port))
    }

    pub fn dst(&self) -> (Ipv4Addr, u16) {
        (Ipv4Addr::from(u32::from_be(self.dst_address)), u16::from_be(self.dst_port))
    }
}

/// Value of the conntrack map, keyed by a packet's 5-tuple as it arrives (`FlowKey`). A
/// translated flow has two entries: the client's direction (client -> frontend) and the reply's
/// (backend -> client). Each holds the addresses its packets leave with, so one lookup both
/// recognises a packet and says how to rewrite it. Reversing those addresses gives the other
/// entry's key (`peer_key`), which the data path uses only when the flow's state changes (SYN-ACK,
/// FIN, RST) to keep both entries' state alike.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConntrackEntryOf<A> {
    /// Source address to write, network byte order (the packet's own when unchanged).
    pub src_address: A,
    /// Destination address to write, network byte order.
    pub dst_address: A,
    /// Source port to write, network byte order.
    pub src_port: u16,
    /// Destination port to write, network byte order.
    pub dst_port: u16,
    /// The backend's ID. IDs are not reused until the collector has passed over every flow
    /// that may hold them, so it never stands for a later backend. Host byte order.
    pub backend_id: u32,
    /// The frontend's ID (per frontend address and scope). Host byte order.
    pub service_id: u32,
    /// `conntrack_flags::*`. Host byte order.
    pub flags: u16,
    /// `conntrack_state::*`.
    pub state: u8,
    pub _pad: u8,
    /// When a packet of this direction was last seen: CLOCK_MONOTONIC nanoseconds (coarse),
    /// refreshed at most about once a second. Host byte order.
    pub last_seen_ns: u64,
    /// When the flow was tracked, same clock. Host byte order.
    pub created_ns: u64,
}

pub type ConntrackEntry = ConntrackEntryOf<u32>;
pub type ConntrackEntry6 = ConntrackEntryOf<In6>;

pod_instances! {
    ConntrackEntry = u32, u32, u16, u16, u32, u32, u16, u8, u8, u64, u64;
    ConntrackEntry6 = In6, In6, u16, u16, u32, u32, u16, u8, u8, u64, u64;
}

impl<A: Copy> ConntrackEntryOf<A> {
    #[inline(always)]
    pub fn is_reply(&self) -> bool {
        self.flags & conntrack_flags::REPLY != 0
    }

    /// The key of the flow's other direction: this entry's rewritten addresses, reversed.
    #[inline(always)]
    pub fn peer_key(&self, protocol: u8) -> FlowKeyOf<A> {
        FlowKeyOf {
            src_address: self.dst_address,
            dst_address: self.src_address,
            src_port: self.dst_port,
            dst_port: self.src_port,
            protocol,
            _pad0: 0,
            _pad1: 0,
        }
    }
}

/// Bits of `ConntrackEntry::flags`.
pub mod conntrack_flags {
    /// The entry is for the reply direction (backend -> client).
    pub const REPLY: u16 = 1;
    /// After rewriting, send the packet to its next hop (FIB lookup and redirect) instead of
    /// through the stack, which would drop it: its new source is one of the node's addresses.
    pub const ROUTE: u16 = 1 << 1;
    /// Set by the collector on both entries of a TCP flow whose backend is no longer an
    /// endpoint of its frontend: the client's next packet is answered with a RST instead of
    /// going to a pod that is gone (or moving mid-stream to another one).
    pub const BACKEND_GONE: u16 = 1 << 2;
    /// The flow's source was rewritten to the node's address (for display).
    pub const SNAT: u16 = 1 << 3;
    /// TCP: the client sent a FIN.
    pub const FIN_CLIENT: u16 = 1 << 4;
    /// TCP: the backend sent a FIN.
    pub const FIN_BACKEND: u16 = 1 << 5;
}

/// Values of `ConntrackEntry::state`: where a flow is in its life, which decides how long it
/// may stay idle before the collector removes it.
pub mod conntrack_state {
    /// TCP: the client's SYN was seen, nothing from the backend yet.
    pub const TCP_SYN_SENT: u8 = 1;
    /// TCP: the backend answered.
    pub const TCP_ESTABLISHED: u8 = 2;
    /// TCP: one side sent a FIN; the other may still send (half-closed).
    pub const TCP_CLOSING: u8 = 3;
    /// TCP: both sides sent a FIN, or either a RST: the flow has ended. A SYN on its tuple
    /// starts a new flow, and a SYN-ACK on its reply tuple is not this flow's.
    pub const TCP_CLOSED: u8 = 4;
    /// UDP (and other datagrams): only the client has sent.
    pub const UDP_ONE_WAY: u8 = 5;
    /// UDP: the backend has answered.
    pub const UDP_REPLIED: u8 = 6;

    pub const fn name(state: u8) -> &'static str {
        match state {
            TCP_SYN_SENT => "SYN_SENT",
            TCP_ESTABLISHED => "ESTABLISHED",
            TCP_CLOSING => "CLOSING",
            TCP_CLOSED => "CLOSED",
            UDP_ONE_WAY => "UNREPLIED",
            UDP_REPLIED => "REPLIED",
            _ => "?",
        }
    }
}

/// Key of the session-affinity map: a client and the frontend it reached.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AffinityKeyOf<A> {
    /// The client's address, network byte order; unspecified (0) for the node's own sockets.
    pub client_address: A,
    /// The frontend's ID. Host byte order.
    pub service_id: u32,
}

pub type AffinityKey = AffinityKeyOf<u32>;
pub type AffinityKey6 = AffinityKeyOf<In6>;

pod_instances! {
    AffinityKey = u32, u32;
    AffinityKey6 = In6, u32;
}

/// Value of the session-affinity map: where the client's last new connection went.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct AffinityValue {
    /// Host byte order.
    pub backend_id: u32,
    pub _pad: u32,
    /// CLOCK_MONOTONIC nanoseconds (coarse) of the client's last new connection: affinity
    /// holds for the frontend's timeout after it (kube-proxy's sliding window). Host byte order.
    pub last_used_ns: u64,
}

/// Key of the fragments map: one datagram, as its fragments carry it (RFC 791: source,
/// destination, protocol and identification).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct FragmentKey {
    /// Network byte order.
    pub src_address: u32,
    /// Network byte order.
    pub dst_address: u32,
    /// The IPv4 identification field, network byte order.
    pub id: u16,
    pub protocol: u8,
    pub _pad: u8,
}

/// Value of the fragments map: the addresses the first fragment was rewritten to, which the
/// datagram's later fragments (they have no ports) get too.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct FragmentValue {
    /// Network byte order.
    pub src_address: u32,
    /// Network byte order.
    pub dst_address: u32,
    /// The flow's `conntrack_flags` (`ROUTE` matters here). Host byte order.
    pub flags: u16,
    pub _pad: u16,
    pub _pad1: u32,
    /// When the first fragment went through (the flows' clock): a record older than a
    /// datagram's reassembly time is another datagram's. Host byte order.
    pub created_ns: u64,
}

/// How long a first fragment's translation holds for its later fragments: Linux's reassembly
/// timeout (`ipfrag_time`).
pub const FRAGMENT_TIMEOUT_NS: u64 = 30_000_000_000;

/// Frontend types, as stored in `ServiceMeta::frontend_type`.
pub mod frontend_type {
    pub const CLUSTER_IP: u32 = 1;
    pub const NODE_PORT: u32 = 2;
    pub const LOAD_BALANCER: u32 = 3;
    pub const EXTERNAL_IP: u32 = 4;
}

/// Data of a source-ranges LPM key: a frontend's service ID, then a client address. The key's
/// prefix length is 32 (the ID) plus the range's prefix length, so one trie holds every
/// frontend's ranges.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SourceRangeKeyOf<A> {
    /// The frontend's service ID, network byte order (LPM tries match bytes from the first).
    pub service_id: u32,
    /// Client address (or range base), network byte order.
    pub address: A,
}

pub type SourceRangeKey = SourceRangeKeyOf<u32>;
pub type SourceRangeKey6 = SourceRangeKeyOf<In6>;

pod_instances! {
    SourceRangeKey = u32, u32;
    SourceRangeKey6 = u32, In6;
}

impl<A> SourceRangeKeyOf<A> {
    /// Prefix length of an LPM key for a range of `range_bits` leading bits.
    pub const fn prefix_len(range_bits: u8) -> u32 {
        32 + range_bits as u32
    }
}

/// Node-wide settings of the data path: the one entry of the config array.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct DatapathConfig {
    /// Cookie of the network namespace lb serves: the socket programs translate only sockets
    /// there (the node's own), never a pod's. 0 turns them off. Host byte order.
    pub netns_cookie: u64,
    /// The node address that source-NATed flows leave with; 0 when unknown (such flows are then
    /// dropped and counted). Network byte order.
    pub snat_address: u32,
    /// First and last source port for source NAT (inclusive), host byte order. Kept above
    /// Linux's ephemeral range so they do not collide with the node's own connections.
    pub snat_port_min: u16,
    pub snat_port_max: u16,
    /// Positions in each Maglev table (the inner maps' size). Host byte order.
    pub maglev_table_size: u32,
    pub _pad: u32,
}

/// The IPv6 family's node-wide settings: the one entry of `map_names::CONFIG6`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct DatapathConfig6 {
    /// The node address that source-NATed IPv6 flows leave with; unspecified (::) when the
    /// node has none (such flows are then dropped and counted). Network byte order.
    pub snat_address: In6,
}

/// Key of the socket map: a socket connected (or sending) to a backend in place of a frontend.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct SocketKey {
    /// The socket's cookie (`bpf_get_socket_cookie`). Host byte order.
    pub cookie: u64,
    /// The backend's address, network byte order.
    pub backend_address: u32,
    /// The backend's port, network byte order.
    pub backend_port: u16,
    pub _pad: u16,
}

/// Value of the socket map: the frontend the application asked for, which `getpeername` and
/// `recvmsg` report in place of the backend.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct SocketFrontend {
    /// Network byte order.
    pub address: u32,
    /// Network byte order.
    pub port: u16,
    pub _pad: u16,
}

/// `FragmentKey` for IPv6: the fragment header's 32-bit identification.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct FragmentKey6 {
    /// Network byte order.
    pub src_address: In6,
    /// Network byte order.
    pub dst_address: In6,
    /// The fragment header's identification, network byte order.
    pub id: u32,
    pub protocol: u8,
    pub _pad: u8,
    pub _pad1: u16,
}

/// `FragmentValue` for IPv6.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct FragmentValue6 {
    /// Network byte order.
    pub src_address: In6,
    /// Network byte order.
    pub dst_address: In6,
    /// The flow's `conntrack_flags`. Host byte order.
    pub flags: u16,
    pub _pad: u16,
    pub _pad1: u32,
    /// When the first fragment went through (the flows' clock). Host byte order.
    pub created_ns: u64,
}

/// `SocketKey` for an IPv6 socket (`map_names::SOCKETS6`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct SocketKey6 {
    /// The socket's cookie. Host byte order.
    pub cookie: u64,
    /// The backend's address, network byte order.
    pub backend_address: In6,
    /// The backend's port, network byte order.
    pub backend_port: u16,
    pub _pad: u16,
    pub _pad2: u32,
}

/// `SocketFrontend` for an IPv6 socket.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct SocketFrontend6 {
    /// Network byte order.
    pub address: In6,
    /// Network byte order.
    pub port: u16,
    pub _pad: u16,
}

/// Source ports lb uses for source NAT by default: above Linux's ephemeral range (32768-60999).
pub const SNAT_PORT_MIN: u16 = 61_000;
pub const SNAT_PORT_MAX: u16 = 65_535;

/// Longest `namespace/name:port-name` a `ServiceMeta` holds (63 + 1 + 63 + 1 + 15 fits).
pub const SERVICE_NAME_MAX: usize = 248;

/// Value of the service-metadata map, keyed by service ID (`u32`, host byte order). The data
/// path never reads it: it lets `lb services` name what the pinned maps hold without the daemon.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct ServiceMeta {
    /// One of `frontend_type::*`. Host byte order.
    pub frontend_type: u32,
    /// Bytes of `name` in use. Host byte order.
    pub name_len: u32,
    /// UTF-8 `namespace/name:port-name`, zero padded.
    pub name: [u8; SERVICE_NAME_MAX],
}

impl ServiceMeta {
    /// Truncates names longer than `SERVICE_NAME_MAX` (Kubernetes names never are).
    pub fn new(frontend_type: u32, name: &str) -> Self {
        let mut meta = Self { frontend_type, name_len: 0, name: [0; SERVICE_NAME_MAX] };
        let mut len = name.len().min(SERVICE_NAME_MAX);
        while !name.is_char_boundary(len) {
            len -= 1;
        }
        meta.name[..len].copy_from_slice(&name.as_bytes()[..len]);
        meta.name_len = len as u32;
        meta
    }

    pub fn name(&self) -> &str {
        let len = (self.name_len as usize).min(SERVICE_NAME_MAX);
        core::str::from_utf8(&self.name[..len]).unwrap_or("<invalid name>")
    }
}

/// Value of the per-CPU service-traffic map (`map_names::SERVICE_TRAFFIC`), keyed by service ID
/// (`u32`, host byte order): what the data path translated for one frontend, summed over CPUs
/// when read. Bytes are whole frames as the program saw them. Host byte order throughout.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct ServiceTraffic {
    /// Packets from clients, translated to a backend.
    pub packets: u64,
    pub bytes: u64,
    /// Replies from backends, translated back to the frontend.
    pub reply_packets: u64,
    pub reply_bytes: u64,
    /// Flows given a backend: new connections and UDP flows, through the packet programs or
    /// the node's own sockets.
    pub new_flows: u64,
}

impl ServiceTraffic {
    pub fn add(&mut self, other: &ServiceTraffic) {
        self.packets = self.packets.wrapping_add(other.packets);
        self.bytes = self.bytes.wrapping_add(other.bytes);
        self.reply_packets = self.reply_packets.wrapping_add(other.reply_packets);
        self.reply_bytes = self.reply_bytes.wrapping_add(other.reply_bytes);
        self.new_flows = self.new_flows.wrapping_add(other.new_flows);
    }
}

#[cfg(feature = "user")]
mod user {
    use super::*;

    // SAFETY: each type is #[repr(C)] and bytemuck::Pod, which proves it has no padding and
    // that every bit pattern is valid.
    unsafe impl aya::Pod for ServiceKey {}
    unsafe impl aya::Pod for ServiceKey6 {}
    unsafe impl aya::Pod for ServiceValue {}
    unsafe impl aya::Pod for Backend {}
    unsafe impl aya::Pod for Backend6 {}
    unsafe impl aya::Pod for FlowKey {}
    unsafe impl aya::Pod for FlowKey6 {}
    unsafe impl aya::Pod for ConntrackEntry {}
    unsafe impl aya::Pod for ConntrackEntry6 {}
    unsafe impl aya::Pod for SourceRangeKey6 {}
    unsafe impl aya::Pod for DatapathConfig6 {}
    unsafe impl aya::Pod for AffinityKey6 {}
    unsafe impl aya::Pod for ServiceMeta {}
    unsafe impl aya::Pod for SourceRangeKey {}
    unsafe impl aya::Pod for DatapathConfig {}
    unsafe impl aya::Pod for SocketKey {}
    unsafe impl aya::Pod for SocketFrontend {}
    unsafe impl aya::Pod for SocketKey6 {}
    unsafe impl aya::Pod for FragmentKey6 {}
    unsafe impl aya::Pod for FragmentValue6 {}
    unsafe impl aya::Pod for SocketFrontend6 {}
    unsafe impl aya::Pod for AffinityKey {}
    unsafe impl aya::Pod for AffinityValue {}
    unsafe impl aya::Pod for FragmentKey {}
    unsafe impl aya::Pod for FragmentValue {}
    unsafe impl aya::Pod for ServiceTraffic {}
}

/// Indexes of the control plane's statistics array (`map_names::STATS`): written by lb run
/// (the conntrack collector after each pass, the reconciler after each sync), read by
/// `lb counters` while lb runs and after it stopped.
pub mod stats {
    /// Conntrack entries found by the last pass.
    pub const ENTRIES: u32 = 0;
    /// The conntrack map's capacity.
    pub const CAPACITY: u32 = 1;
    /// Entries removed because their flow had ended or stayed idle past its timeout (total).
    pub const EXPIRED: u32 = 2;
    /// UDP entries removed because their backend stopped being an endpoint (total).
    pub const BACKEND_GONE_REMOVED: u32 = 3;
    /// TCP flows marked to be reset because their backend stopped being an endpoint (total).
    pub const BACKEND_GONE_MARKED: u32 = 4;
    /// Affinity records removed: expired, or their backend left the frontend (total).
    pub const AFFINITY_REMOVED: u32 = 5;
    /// Passes completed.
    pub const PASSES: u32 = 6;
    /// How long the last pass took, microseconds.
    pub const LAST_PASS_US: u32 = 7;
    /// Frontends the last sync could not program (a map full, say): the rest were programmed.
    pub const FRONTENDS_REFUSED: u32 = 8;
    pub const COUNT: u32 = 9;
    pub const NAMES: [&str; COUNT as usize] = [
        "conntrack_entries",
        "conntrack_capacity",
        "conntrack_expired_total",
        "conntrack_backend_gone_removed_total",
        "conntrack_backend_gone_reset_total",
        "affinity_removed_total",
        "conntrack_gc_passes_total",
        "conntrack_gc_last_pass_us",
        "frontends_refused",
    ];
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_are_what_the_kernel_side_expects() {
        assert_eq!(core::mem::size_of::<ServiceKey>(), 12);
        assert_eq!(core::mem::size_of::<ServiceValue>(), 20);
        assert_eq!(core::mem::size_of::<Backend>(), 8);
        assert_eq!(core::mem::size_of::<FlowKey>(), 16);
        assert_eq!(core::mem::size_of::<ConntrackEntry>(), 40);
        assert_eq!(core::mem::size_of::<ServiceMeta>(), 256);
        assert_eq!(core::mem::size_of::<SourceRangeKey>(), 8);
        assert_eq!(core::mem::size_of::<DatapathConfig>(), 24);
        assert_eq!(core::mem::size_of::<AffinityKey>(), 8);
        assert_eq!(core::mem::size_of::<AffinityValue>(), 16);
        assert_eq!(core::mem::size_of::<FragmentKey>(), 12);
        assert_eq!(core::mem::size_of::<FragmentValue>(), 24);
        assert_eq!(core::mem::size_of::<SocketKey>(), 16);
        assert_eq!(core::mem::size_of::<SocketFrontend>(), 8);
        assert_eq!(core::mem::size_of::<ServiceKey6>(), 24);
        assert_eq!(core::mem::size_of::<Backend6>(), 20);
        assert_eq!(core::mem::size_of::<FlowKey6>(), 40);
        assert_eq!(core::mem::size_of::<ConntrackEntry6>(), 64);
        assert_eq!(core::mem::size_of::<AffinityKey6>(), 20);
        assert_eq!(core::mem::size_of::<SourceRangeKey6>(), 20);
    }

    #[test]
    fn ipv6_addresses_keep_network_byte_order() {
        let address: Ipv6Addr = "fd00:10:96::1".parse().unwrap();
        let key = ServiceKey6::scoped(address, 80, PROTOCOL_TCP, scope::EXTERNAL, 0);
        assert_eq!(
            bytemuck::bytes_of(&key)[..18],
            [0xfd, 0, 0, 0x10, 0, 0x96, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 80]
        );
        assert_eq!(key.address(), address);
        assert_eq!(Ipv6Addr::from(In6::from(address)), address);
        // The IPv4 hash is the one it always was: flows keep their slots across an upgrade.
        assert_eq!(flow_hash(1u32, 2u32, 3, 4, 6), {
            let mut h = mix(1 ^ 0x9e37_79b9);
            h = mix(h ^ 2);
            h = mix(h ^ ((3 << 16) | 4));
            mix(h ^ 6)
        });
    }

    #[test]
    fn constructors_store_network_byte_order() {
        let key = ServiceKey::new(Ipv4Addr::new(10, 96, 0, 1), 80, PROTOCOL_TCP, 0);
        assert_eq!(bytemuck::bytes_of(&key)[..6], [10, 96, 0, 1, 0, 80]);
        assert_eq!(key.address(), Ipv4Addr::new(10, 96, 0, 1));
        assert_eq!(key.port(), 80);
        let backend = Backend::new(Ipv4Addr::new(10, 244, 1, 2), 8080, PROTOCOL_UDP);
        assert_eq!(bytemuck::bytes_of(&backend), [10, 244, 1, 2, 0x1f, 0x90, 17, 0]);
    }

    #[test]
    fn an_entrys_peer_key_is_the_other_direction() {
        let client: (Ipv4Addr, u16) = (Ipv4Addr::new(10, 0, 0, 2), 40000);
        let (vip, pod): ((Ipv4Addr, u16), (Ipv4Addr, u16)) =
            ((Ipv4Addr::new(10, 96, 0, 1), 80), (Ipv4Addr::new(10, 244, 1, 2), 8080));
        let forward = ConntrackEntry {
            src_address: u32::from(client.0).to_be(),
            dst_address: u32::from(pod.0).to_be(),
            src_port: client.1.to_be(),
            dst_port: pod.1.to_be(),
            ..Zeroable::zeroed()
        };
        assert_eq!(forward.peer_key(PROTOCOL_TCP), FlowKey::new(pod, client, PROTOCOL_TCP));
        let reply = ConntrackEntry {
            src_address: u32::from(vip.0).to_be(),
            dst_address: u32::from(client.0).to_be(),
            src_port: vip.1.to_be(),
            dst_port: client.1.to_be(),
            ..Zeroable::zeroed()
        };
        assert_eq!(reply.peer_key(PROTOCOL_TCP), FlowKey::new(client, vip, PROTOCOL_TCP));
    }

    #[test]
    fn service_meta_truncates_on_a_char_boundary() {
        let long = "é".repeat(200);
        let meta = ServiceMeta::new(frontend_type::CLUSTER_IP, &long);
        assert!(meta.name().len() <= SERVICE_NAME_MAX);
        assert!(meta.name().chars().all(|c| c == 'é'));
        assert_eq!(ServiceMeta::new(1, "default/web:http").name(), "default/web:http");
    }
}
