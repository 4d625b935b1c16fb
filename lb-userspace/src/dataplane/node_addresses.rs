//! The node's own addresses: where NodePort frontends listen (kube-proxy's
//! `--nodeport-addresses`) and which address source-NATed flows leave with.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;

/// Which node addresses lb uses, from the command line.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeAddressConfig {
    /// `--nodeport-addresses`: only addresses in these ranges take NodePort traffic; empty
    /// means every non-loopback address.
    pub nodeport_ranges: Vec<IpNet>,
    /// `--external-interfaces`: the node's uplinks; the first address found on them is the
    /// source-NAT address of its family.
    pub external_interfaces: Vec<String>,
}

/// The addresses in use, read from the interfaces.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeAddresses {
    pub nodeport: Vec<IpAddr>,
    pub snat: Option<Ipv4Addr>,
    /// The IPv6 flows' source-NAT address.
    pub snat6: Option<Ipv6Addr>,
    /// Every non-loopback address of the node: endpoints there are in its host network.
    pub all: Vec<IpAddr>,
}

/// An address that can take traffic from elsewhere: not loopback, unspecified or (IPv6)
/// link-local, which is only meaningful with its interface.
fn usable(ip: &IpAddr) -> bool {
    !ip.is_loopback() && !ip.is_unspecified() && !matches!(ip, IpAddr::V6(v6) if v6.is_unicast_link_local())
}

impl NodeAddressConfig {
    /// Picks from (interface, address) pairs, in the order the kernel lists them.
    pub fn choose(&self, interface_addresses: &[(String, IpAddr)]) -> NodeAddresses {
        let mut nodeport: Vec<IpAddr> = interface_addresses
            .iter()
            .map(|(_, ip)| *ip)
            .filter(usable)
            .filter(|ip| {
                self.nodeport_ranges.is_empty() || self.nodeport_ranges.iter().any(|r| r.contains(ip))
            })
            .collect();
        nodeport.sort();
        nodeport.dedup();
        let snat_of = |ipv4: bool| {
            let candidate = |ip: &IpAddr| usable(ip) && ip.is_ipv4() == ipv4;
            let on_uplink = self.external_interfaces.iter().find_map(|uplink| {
                interface_addresses
                    .iter()
                    .find(|(name, ip)| name == uplink && candidate(ip))
                    .map(|(_, ip)| *ip)
            });
            // Without a named uplink, any address of the node will do: replies to it come back
            // here.
            on_uplink.or_else(|| interface_addresses.iter().map(|(_, ip)| *ip).find(candidate))
        };
        let snat = match snat_of(true) {
            Some(IpAddr::V4(ip)) => Some(ip),
            _ => None,
        };
        let snat6 = match snat_of(false) {
            Some(IpAddr::V6(ip)) => Some(ip),
            _ => None,
        };
        let mut all: Vec<IpAddr> = interface_addresses.iter().map(|(_, ip)| *ip).filter(usable).collect();
        all.sort();
        all.dedup();
        NodeAddresses { nodeport, snat, snat6, all }
    }

    /// `choose` over the interfaces of the network namespace lb runs in.
    pub fn read(&self) -> NodeAddresses {
        self.choose(&interface_addresses())
    }
}

/// Every IPv4 and IPv6 address on the namespace's interfaces, with its interface's name.
pub fn interface_addresses() -> Vec<(String, IpAddr)> {
    let Ok(addresses) = nix::ifaddrs::getifaddrs() else {
        tracing::warn!("could not list the node's addresses");
        return Vec::new();
    };
    addresses
        .filter_map(|entry| {
            let address = entry.address?;
            let ip = match (address.as_sockaddr_in(), address.as_sockaddr_in6()) {
                (Some(v4), _) => IpAddr::V4(v4.ip()),
                (_, Some(v6)) => IpAddr::V6(v6.ip()),
                _ => return None,
            };
            Some((entry.interface_name, ip))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs() -> Vec<(String, IpAddr)> {
        [
            ("lo", "127.0.0.1"),
            ("lo", "::1"),
            ("lbp0", "10.244.1.1"),
            ("lbp0", "fe80::1"),
            ("uplink", "192.168.50.1"),
            ("uplink", "192.168.50.9"),
            ("uplink", "fd00:50::1"),
        ]
        .iter()
        .map(|(name, ip)| (name.to_string(), ip.parse().unwrap()))
        .collect()
    }

    #[test]
    fn every_non_loopback_address_takes_node_ports_by_default() {
        let chosen = NodeAddressConfig::default().choose(&pairs());
        let want: Vec<IpAddr> =
            ["10.244.1.1", "192.168.50.1", "192.168.50.9", "fd00:50::1"].map(|a| a.parse().unwrap()).into();
        assert_eq!(chosen.nodeport, want);
        assert_eq!(chosen.snat, Some("10.244.1.1".parse().unwrap()));
        // Link-local addresses are left out: they mean nothing without their interface.
        assert_eq!(chosen.snat6, Some("fd00:50::1".parse().unwrap()));
    }

    #[test]
    fn ranges_filter_node_ports_and_the_uplink_gives_the_snat_address() {
        let config = NodeAddressConfig {
            nodeport_ranges: vec!["192.168.50.0/28".parse().unwrap(), "fd00:50::/64".parse().unwrap()],
            external_interfaces: vec!["missing".into(), "uplink".into()],
        };
        let chosen = config.choose(&pairs());
        let want: Vec<IpAddr> =
            ["192.168.50.1", "192.168.50.9", "fd00:50::1"].map(|a| a.parse().unwrap()).into();
        assert_eq!(chosen.nodeport, want);
        assert_eq!(chosen.snat, Some("192.168.50.1".parse().unwrap()));
    }
}
