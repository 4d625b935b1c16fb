//! Types shared by lb's eBPF programs and its userspace controller.
//!
//! Every type here is a BPF map key or value: `#[repr(C)]`, no implicit padding (bytemuck's `Pod`
//! derive refuses to compile otherwise), no `bool` or enum fields. Each field states its byte
//! order. Addresses and ports are kept in network byte order because that is how the data path
//! reads them from packets; the constructors below are the one place where userspace converts.
#![no_std]

use core::net::Ipv4Addr;

use bytemuck::{Pod, Zeroable};

pub mod counters;

/// IANA protocol numbers, as in the IPv4 header's protocol field.
pub const PROTOCOL_TCP: u8 = 6;
pub const PROTOCOL_UDP: u8 = 17;

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
    /// Every pinned map, for tools that inspect or remove them.
    pub const PINNED: [&str; 8] =
        [SERVICES, BACKENDS, CONNTRACK, SERVICE_META, SOURCE_RANGES, CONFIG, SOCKETS, COUNTERS];
}

/// Default map capacities; userspace may raise them at load time.
pub mod capacity {
    /// Service entries plus backend slots (one per backend per frontend).
    pub const SERVICES: u32 = 262_144;
    pub const BACKENDS: u32 = 131_072;
    /// Conntrack entries, two per tracked flow; the LRU evicts the least recently used beyond
    /// this.
    pub const CONNTRACK: u32 = 524_288;
    pub const SERVICE_META: u32 = 65_536;
    /// loadBalancerSourceRanges entries over all frontends.
    pub const SOURCE_RANGES: u32 = 16_384;
    /// The node's own sockets connected to a backend through a frontend (LRU).
    pub const SOCKETS: u32 = 65_536;
}

/// Key of the services map.
///
/// Slot 0 holds the service entry (how many backend slots the frontend has); slots 1..=count
/// each hold one backend ID. Keeping the frontend and its slots in one map means a lookup of the
/// frontend and of the chosen slot are the same operation with a different `backend_slot`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Pod, Zeroable)]
pub struct ServiceKey {
    /// Frontend IPv4 address, network byte order.
    pub address: u32,
    /// Frontend port, network byte order.
    pub port: u16,
    /// 0 for the service entry, 1..=count for backend slots; host byte order.
    pub backend_slot: u16,
    /// `PROTOCOL_TCP` or `PROTOCOL_UDP`.
    pub protocol: u8,
    /// Reserved for frontend scopes (internal/external traffic); always 0.
    pub scope: u8,
    pub _pad: [u8; 2],
}

impl ServiceKey {
    pub fn new(address: Ipv4Addr, port: u16, protocol: u8, backend_slot: u16) -> Self {
        Self {
            address: u32::from(address).to_be(),
            port: port.to_be(),
            backend_slot,
            protocol,
            scope: 0,
            _pad: [0; 2],
        }
    }

    pub fn address(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from_be(self.address))
    }

    pub fn port(&self) -> u16 {
        u16::from_be(self.port)
    }

    /// The same frontend at another slot.
    pub fn with_slot(&self, backend_slot: u16) -> Self {
        Self { backend_slot, ..*self }
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
}

impl ServiceValue {
    pub fn service_entry(service_id: u32, backend_count: u16) -> Self {
        Self { backend_id: 0, service_id, backend_count, flags: 0 }
    }

    pub fn with_flags(self, flags: u16) -> Self {
        Self { flags, ..self }
    }

    pub fn backend_slot(service_id: u32, backend_id: u32) -> Self {
        Self { backend_id, service_id, backend_count: 0, flags: 0 }
    }
}

/// Value of the backends map, keyed by backend ID (`u32`, host byte order).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Pod, Zeroable)]
pub struct Backend {
    /// Pod IPv4 address, network byte order.
    pub address: u32,
    /// Target port, network byte order.
    pub port: u16,
    /// `PROTOCOL_TCP` or `PROTOCOL_UDP`.
    pub protocol: u8,
    /// Reserved for backend state (terminating, ...); always 0.
    pub flags: u8,
}

impl Backend {
    pub fn new(address: Ipv4Addr, port: u16, protocol: u8) -> Self {
        Self { address: u32::from(address).to_be(), port: port.to_be(), protocol, flags: 0 }
    }

    pub fn address(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from_be(self.address))
    }

    pub fn port(&self) -> u16 {
        u16::from_be(self.port)
    }
}

/// A flow's 5-tuple as seen on the wire: key of the conntrack and reverse-NAT maps.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct FlowKey {
    /// Network byte order.
    pub src_address: u32,
    /// Network byte order.
    pub dst_address: u32,
    /// Network byte order.
    pub src_port: u16,
    /// Network byte order.
    pub dst_port: u16,
    pub protocol: u8,
    pub _pad: [u8; 3],
}

impl FlowKey {
    pub fn new(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), protocol: u8) -> Self {
        Self {
            src_address: u32::from(src.0).to_be(),
            dst_address: u32::from(dst.0).to_be(),
            src_port: src.1.to_be(),
            dst_port: dst.1.to_be(),
            protocol,
            _pad: [0; 3],
        }
    }
}

/// Value of the conntrack map, keyed by a packet's 5-tuple as it arrives (`FlowKey`). A
/// translated flow has two entries: the client's direction (client -> frontend) and the reply's
/// (backend -> client). Each holds the addresses its packets leave with, so one lookup both
/// recognises a packet and says how to rewrite it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct ConntrackEntry {
    /// Source address to write, network byte order (the packet's own when unchanged).
    pub src_address: u32,
    /// Destination address to write, network byte order.
    pub dst_address: u32,
    /// Source port to write, network byte order.
    pub src_port: u16,
    /// Destination port to write, network byte order.
    pub dst_port: u16,
    /// The backend's ID. On the client's direction, the flow is given a new backend once this
    /// ID leaves the backends map. Host byte order.
    pub backend_id: u32,
    /// The frontend's ID. Host byte order.
    pub service_id: u32,
    /// `conntrack_flags::*`. Host byte order.
    pub flags: u32,
}

impl ConntrackEntry {
    pub fn is_reply(&self) -> bool {
        self.flags & conntrack_flags::REPLY != 0
    }
}

/// Bits of `ConntrackEntry::flags`.
pub mod conntrack_flags {
    /// The entry is for the reply direction (backend -> client).
    pub const REPLY: u32 = 1;
    /// After rewriting, send the packet to its next hop (FIB lookup and redirect) instead of
    /// through the stack, which would drop it: its new source is one of the node's addresses.
    pub const ROUTE: u32 = 1 << 1;
}

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
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Pod, Zeroable)]
pub struct SourceRangeKey {
    /// The frontend's service ID, network byte order (LPM tries match bytes from the first).
    pub service_id: u32,
    /// Client address (or range base), network byte order.
    pub address: u32,
}

impl SourceRangeKey {
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

#[cfg(feature = "user")]
mod user {
    use super::*;

    // SAFETY: each type is #[repr(C)] and bytemuck::Pod, which proves it has no padding and
    // that every bit pattern is valid.
    unsafe impl aya::Pod for ServiceKey {}
    unsafe impl aya::Pod for ServiceValue {}
    unsafe impl aya::Pod for Backend {}
    unsafe impl aya::Pod for FlowKey {}
    unsafe impl aya::Pod for ConntrackEntry {}
    unsafe impl aya::Pod for ServiceMeta {}
    unsafe impl aya::Pod for SourceRangeKey {}
    unsafe impl aya::Pod for DatapathConfig {}
    unsafe impl aya::Pod for SocketKey {}
    unsafe impl aya::Pod for SocketFrontend {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_are_what_the_kernel_side_expects() {
        assert_eq!(core::mem::size_of::<ServiceKey>(), 12);
        assert_eq!(core::mem::size_of::<ServiceValue>(), 12);
        assert_eq!(core::mem::size_of::<Backend>(), 8);
        assert_eq!(core::mem::size_of::<FlowKey>(), 16);
        assert_eq!(core::mem::size_of::<ConntrackEntry>(), 24);
        assert_eq!(core::mem::size_of::<ServiceMeta>(), 256);
        assert_eq!(core::mem::size_of::<SourceRangeKey>(), 8);
        assert_eq!(core::mem::size_of::<DatapathConfig>(), 16);
        assert_eq!(core::mem::size_of::<SocketKey>(), 16);
        assert_eq!(core::mem::size_of::<SocketFrontend>(), 8);
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
    fn service_meta_truncates_on_a_char_boundary() {
        let long = "é".repeat(200);
        let meta = ServiceMeta::new(frontend_type::CLUSTER_IP, &long);
        assert!(meta.name().len() <= SERVICE_NAME_MAX);
        assert!(meta.name().chars().all(|c| c == 'é'));
        assert_eq!(ServiceMeta::new(1, "default/web:http").name(), "default/web:http");
    }
}
