//! The node's own addresses: where NodePort frontends listen (kube-proxy's
//! `--nodeport-addresses`) and which address source-NATed flows leave with.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

/// Which node addresses lb uses, from the command line.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeAddressConfig {
    /// `--nodeport-addresses`: only addresses in these ranges take NodePort traffic; empty
    /// means every non-loopback address.
    pub nodeport_ranges: Vec<Ipv4Net>,
    /// `--external-interfaces`: the node's uplinks; the first address found on them is the
    /// source-NAT address.
    pub external_interfaces: Vec<String>,
}

/// The addresses in use, read from the interfaces.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeAddresses {
    pub nodeport: Vec<Ipv4Addr>,
    pub snat: Option<Ipv4Addr>,
    /// Every non-loopback address of the node: endpoints there are in its host network.
    pub all: Vec<Ipv4Addr>,
}

impl NodeAddressConfig {
    /// Picks from (interface, address) pairs, in the order the kernel lists them.
    pub fn choose(&self, interface_addresses: &[(String, Ipv4Addr)]) -> NodeAddresses {
        let usable = |ip: &Ipv4Addr| !ip.is_loopback() && !ip.is_unspecified();
        let mut nodeport: Vec<Ipv4Addr> = interface_addresses
            .iter()
            .map(|(_, ip)| *ip)
            .filter(usable)
            .filter(|ip| {
                self.nodeport_ranges.is_empty() || self.nodeport_ranges.iter().any(|r| r.contains(ip))
            })
            .collect();
        nodeport.sort();
        nodeport.dedup();
        let on_uplink = self.external_interfaces.iter().find_map(|uplink| {
            interface_addresses.iter().find(|(name, ip)| name == uplink && usable(ip)).map(|(_, ip)| *ip)
        });
        // Without a named uplink, any address of the node will do: replies to it come back here.
        let snat = on_uplink.or_else(|| interface_addresses.iter().map(|(_, ip)| *ip).find(usable));
        let mut all: Vec<Ipv4Addr> = interface_addresses.iter().map(|(_, ip)| *ip).filter(usable).collect();
        all.sort();
        all.dedup();
        NodeAddresses { nodeport, snat, all }
    }

    /// `choose` over the interfaces of the network namespace lb runs in.
    pub fn read(&self) -> NodeAddresses {
        self.choose(&interface_addresses())
    }
}

/// Every IPv4 address on the namespace's interfaces, with its interface's name.
pub fn interface_addresses() -> Vec<(String, Ipv4Addr)> {
    let Ok(addresses) = nix::ifaddrs::getifaddrs() else {
        tracing::warn!("could not list the node's addresses");
        return Vec::new();
    };
    addresses
        .filter_map(|entry| {
            let ip = entry.address?.as_sockaddr_in()?.ip();
            Some((entry.interface_name, ip))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs() -> Vec<(String, Ipv4Addr)> {
        [("lo", "127.0.0.1"), ("lbp0", "10.244.1.1"), ("uplink", "192.168.50.1"), ("uplink", "192.168.50.9")]
            .iter()
            .map(|(name, ip)| (name.to_string(), ip.parse().unwrap()))
            .collect()
    }

    #[test]
    fn every_non_loopback_address_takes_node_ports_by_default() {
        let chosen = NodeAddressConfig::default().choose(&pairs());
        let want: Vec<Ipv4Addr> =
            ["10.244.1.1", "192.168.50.1", "192.168.50.9"].map(|a| a.parse().unwrap()).into();
        assert_eq!(chosen.nodeport, want);
        assert_eq!(chosen.snat, Some("10.244.1.1".parse().unwrap()));
    }

    #[test]
    fn ranges_filter_node_ports_and_the_uplink_gives_the_snat_address() {
        let config = NodeAddressConfig {
            nodeport_ranges: vec!["192.168.50.0/28".parse().unwrap()],
            external_interfaces: vec!["missing".into(), "uplink".into()],
        };
        let chosen = config.choose(&pairs());
        let want: Vec<Ipv4Addr> = ["192.168.50.1", "192.168.50.9"].map(|a| a.parse().unwrap()).into();
        assert_eq!(chosen.nodeport, want);
        assert_eq!(chosen.snat, Some("192.168.50.1".parse().unwrap()));
    }
}
