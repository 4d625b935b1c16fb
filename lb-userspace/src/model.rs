//! The desired state: what the data path should translate, free of Kubernetes types and of map
//! layout. Conversion produces it; the reconciler programs it.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

use lb_common::{PROTOCOL_SCTP, PROTOCOL_TCP, PROTOCOL_UDP};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    Tcp,
    Udp,
    /// Served without port translation (see `convert`'s SCTP rules).
    Sctp,
}

impl Protocol {
    /// Kubernetes' spelling; `None` for a protocol Kubernetes does not have.
    pub fn from_kubernetes(protocol: Option<&str>) -> Option<Self> {
        match protocol.unwrap_or("TCP") {
            "TCP" => Some(Self::Tcp),
            "UDP" => Some(Self::Udp),
            "SCTP" => Some(Self::Sctp),
            _ => None,
        }
    }

    pub fn number(self) -> u8 {
        match self {
            Self::Tcp => PROTOCOL_TCP,
            Self::Udp => PROTOCOL_UDP,
            Self::Sctp => PROTOCOL_SCTP,
        }
    }

    pub fn from_number(number: u8) -> Option<Self> {
        match number {
            PROTOCOL_TCP => Some(Self::Tcp),
            PROTOCOL_UDP => Some(Self::Udp),
            PROTOCOL_SCTP => Some(Self::Sctp),
            _ => None,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Tcp => "TCP",
            Self::Udp => "UDP",
            Self::Sctp => "SCTP",
        })
    }
}

/// An address family: each has maps of its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum IpFamily {
    V4,
    V6,
}

impl IpFamily {
    pub fn of(ip: &IpAddr) -> Self {
        match ip {
            IpAddr::V4(_) => Self::V4,
            IpAddr::V6(_) => Self::V6,
        }
    }
}

impl fmt::Display for IpFamily {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Kubernetes' spelling (`ipFamilies`, `addressType`).
        f.write_str(match self {
            Self::V4 => "IPv4",
            Self::V6 => "IPv6",
        })
    }
}

/// An address:port/protocol that clients send to, or that a backend listens on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct L4Addr {
    /// Either family: a frontend and its backends are always of the same one.
    pub ip: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
}

impl fmt::Display for L4Addr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // `[::1]:80/TCP`, as a socket address is written.
        write!(f, "{}/{}", std::net::SocketAddr::new(self.ip, self.port), self.protocol)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FrontendType {
    ClusterIp,
    NodePort,
    LoadBalancer,
    ExternalIp,
}

impl FrontendType {
    pub fn code(self) -> u32 {
        use lb_common::frontend_type::*;
        match self {
            Self::ClusterIp => CLUSTER_IP,
            Self::NodePort => NODE_PORT,
            Self::LoadBalancer => LOAD_BALANCER,
            Self::ExternalIp => EXTERNAL_IP,
        }
    }

    pub fn from_code(code: u32) -> Option<Self> {
        use lb_common::frontend_type::*;
        match code {
            CLUSTER_IP => Some(Self::ClusterIp),
            NODE_PORT => Some(Self::NodePort),
            LOAD_BALANCER => Some(Self::LoadBalancer),
            EXTERNAL_IP => Some(Self::ExternalIp),
            _ => None,
        }
    }

    /// Whether traffic to this frontend comes from outside the cluster, so
    /// `externalTrafficPolicy` (not `internalTrafficPolicy`) applies.
    pub fn is_external(self) -> bool {
        self != Self::ClusterIp
    }
}

impl fmt::Display for FrontendType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::ClusterIp => "ClusterIP",
            Self::NodePort => "NodePort",
            Self::LoadBalancer => "LoadBalancer",
            Self::ExternalIp => "ExternalIP",
        })
    }
}

/// Which sources a frontend's entry serves. Every frontend has an external entry; an external
/// frontend under `externalTrafficPolicy: Local` also has an internal one, with every
/// endpoint, which sources inside the cluster (pods, the node) get instead, as kube-proxy
/// sends them to every endpoint.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Scope {
    #[default]
    External,
    Internal,
}

impl Scope {
    /// `lb_common::scope`.
    pub fn code(self) -> u8 {
        match self {
            Self::External => lb_common::scope::EXTERNAL,
            Self::Internal => lb_common::scope::INTERNAL,
        }
    }

    pub fn from_code(code: u8) -> Option<Self> {
        match code {
            lb_common::scope::EXTERNAL => Some(Self::External),
            lb_common::scope::INTERNAL => Some(Self::Internal),
            _ => None,
        }
    }
}

/// A frontend's identity in the maps: its address and scope.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FrontendKey {
    pub address: L4Addr,
    pub scope: Scope,
}

impl From<L4Addr> for FrontendKey {
    fn from(address: L4Addr) -> Self {
        Self { address, scope: Scope::External }
    }
}

impl fmt::Display for FrontendKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.scope {
            Scope::External => write!(f, "{}", self.address),
            Scope::Internal => write!(f, "{} (in-cluster)", self.address),
        }
    }
}

/// How the data path treats a frontend's new flows, beyond picking a backend.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FrontendPolicy {
    /// The traffic policy that applies is Local (only this node's endpoints).
    pub local: bool,
    /// Source-NAT new flows to the node's address (external traffic, Cluster policy).
    pub snat: bool,
    /// With no backends, drop instead of rejecting: the Service has endpoints, none of them
    /// allowed here by a Local policy.
    pub drop_when_empty: bool,
    /// `loadBalancerSourceRanges` (LoadBalancer frontends only); empty means any source.
    pub source_ranges: Vec<ipnet::IpNet>,
    /// The frontend address is one of the node's own (NodePort).
    pub node_address: bool,
    /// Not a ClusterIP: traffic from outside the cluster.
    pub external: bool,
    /// An internal-scope entry exists beside this one for in-cluster sources.
    pub two_scopes: bool,
    /// `sessionAffinity: ClientIP`'s timeout in seconds; 0 without affinity.
    pub affinity_timeout: u32,
    /// New flows pick their backend from a Maglev table (consistent hashing) instead of a
    /// hash over the slots.
    pub maglev: bool,
}

impl FrontendPolicy {
    /// The service entry's `service_flags`.
    pub fn flags(&self) -> u16 {
        use lb_common::service_flags::*;
        let mut flags = 0;
        for (set, flag) in [
            (self.snat, SNAT),
            (!self.source_ranges.is_empty(), SOURCE_RANGES),
            (self.drop_when_empty, DROP_WHEN_EMPTY),
            (self.local, LOCAL_POLICY),
            (self.node_address, NODE_ADDRESS),
            (self.external, EXTERNAL),
            (self.two_scopes, TWO_SCOPES),
        ] {
            if set {
                flags |= flag;
            }
        }
        flags
    }
}

/// A Service port by name, as kube-proxy names them: `namespace/name:port-name`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServicePortName {
    pub namespace: String,
    pub name: String,
    /// Empty for a Service's single unnamed port.
    pub port: String,
}

impl fmt::Display for ServicePortName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)?;
        if !self.port.is_empty() {
            write!(f, ":{}", self.port)?;
        }
        Ok(())
    }
}

/// One address clients reach a Service port on, and the backends behind it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frontend {
    pub address: L4Addr,
    pub scope: Scope,
    pub frontend_type: FrontendType,
    pub policy: FrontendPolicy,
    pub service: ServicePortName,
    /// Where new flows go. Sorted and without duplicates, so equal sets compare equal.
    pub backends: Vec<L4Addr>,
    /// What existing flows may keep, whatever policy or topology says about new flows. Every
    /// endpoint of the Service port that is still serving (ready, or terminating and serving):
    /// UDP flows to any other backend are ended, as kube-proxy clears them. Sorted, no
    /// duplicates.
    pub serving: Vec<L4Addr>,
    /// Every endpoint the Service port lists, whatever its conditions: a TCP flow is reset only
    /// when its backend is no longer listed (a pod failing readiness while it drains keeps its
    /// connections). Sorted, no duplicates.
    pub listed: Vec<L4Addr>,
}

impl Frontend {
    pub fn key(&self) -> FrontendKey {
        FrontendKey { address: self.address, scope: self.scope }
    }
}

/// Everything the data path should translate, by frontend, and the health-check node ports
/// this node answers.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DesiredState {
    pub frontends: BTreeMap<FrontendKey, Frontend>,
    /// healthCheckNodePort -> what to report there.
    pub health_checks: BTreeMap<u16, HealthCheck>,
}

/// A LoadBalancer Service with Local external policy asks each node, on its
/// healthCheckNodePort, whether the node has endpoints for it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthCheck {
    pub namespace: String,
    pub name: String,
    /// This node's distinct ready endpoint addresses of the Service.
    pub local_endpoints: usize,
}

/// An object that cannot be used, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind} {namespace}/{name}: {problem}")]
pub struct ObjectError {
    pub kind: &'static str,
    pub namespace: String,
    pub name: String,
    pub problem: String,
}
