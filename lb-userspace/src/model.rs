//! The desired state: what the data path should translate, free of Kubernetes types and of map
//! layout. Conversion produces it; the reconciler programs it.

use std::collections::BTreeMap;
use std::fmt;
use std::net::Ipv4Addr;

use lb_common::{PROTOCOL_TCP, PROTOCOL_UDP};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    /// Kubernetes' spelling; `None` for protocols lb does not translate (SCTP).
    pub fn from_kubernetes(protocol: Option<&str>) -> Option<Self> {
        match protocol.unwrap_or("TCP") {
            "TCP" => Some(Self::Tcp),
            "UDP" => Some(Self::Udp),
            _ => None,
        }
    }

    pub fn number(self) -> u8 {
        match self {
            Self::Tcp => PROTOCOL_TCP,
            Self::Udp => PROTOCOL_UDP,
        }
    }

    pub fn from_number(number: u8) -> Option<Self> {
        match number {
            PROTOCOL_TCP => Some(Self::Tcp),
            PROTOCOL_UDP => Some(Self::Udp),
            _ => None,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Tcp => "TCP",
            Self::Udp => "UDP",
        })
    }
}

/// An address:port/protocol that clients send to, or that a backend listens on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct L4Addr {
    pub ip: Ipv4Addr,
    pub port: u16,
    pub protocol: Protocol,
}

impl fmt::Display for L4Addr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}/{}", self.ip, self.port, self.protocol)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FrontendType {
    ClusterIp,
}

impl FrontendType {
    pub fn code(self) -> u32 {
        match self {
            Self::ClusterIp => lb_common::frontend_type::CLUSTER_IP,
        }
    }

    pub fn from_code(code: u32) -> Option<Self> {
        match code {
            lb_common::frontend_type::CLUSTER_IP => Some(Self::ClusterIp),
            _ => None,
        }
    }
}

impl fmt::Display for FrontendType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::ClusterIp => "ClusterIP",
        })
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
    pub frontend_type: FrontendType,
    pub service: ServicePortName,
    /// Sorted and without duplicates, so equal sets compare equal.
    pub backends: Vec<L4Addr>,
}

/// Everything the data path should translate, by frontend address.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DesiredState {
    pub frontends: BTreeMap<L4Addr, Frontend>,
}
