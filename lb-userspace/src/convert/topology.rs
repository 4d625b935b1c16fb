//! Which of a Service port's endpoints get traffic, chosen as kube-proxy chooses them
//! (kubernetes pkg/proxy/topology.go): ready endpoints; if there are none, endpoints that are
//! still serving while terminating; topology hints only when every ready endpoint carries one;
//! `internalTrafficPolicy: Local` keeps only this node's endpoints.

use crate::model::L4Addr;

/// An endpoint's conditions and placement: what the choice looks at.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EndpointConditions {
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    pub node_name: Option<String>,
    pub zone_hints: Vec<String>,
    /// `hints.forNodes` (set for `trafficDistribution: PreferSameNode`).
    pub node_hints: Vec<String>,
}

/// An endpoint of one Service port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    pub addr: L4Addr,
    pub conditions: EndpointConditions,
}

/// The Service-level inputs of the choice.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PortPolicy {
    /// `spec.internalTrafficPolicy: Local`.
    pub internal_local: bool,
    /// Topology-aware routing asked for: `service.kubernetes.io/topology-mode: Auto` (or the
    /// older `topology-aware-hints` annotation), or `spec.trafficDistribution` set.
    pub topology_aware: bool,
}

/// Where this proxy runs.
#[derive(Clone, Copy, Debug, Default)]
pub struct NodeContext<'a> {
    pub node_name: Option<&'a str>,
    /// The Node's `topology.kubernetes.io/zone` label.
    pub zone: Option<&'a str>,
}

pub fn is_local(endpoint: &EndpointConditions, node: &NodeContext) -> bool {
    node.node_name.is_some() && endpoint.node_name.as_deref() == node.node_name
}

/// Which hints the choice follows (kube-proxy's `topologyModeFromHints`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TopologyMode {
    /// Every ready endpoint.
    None,
    /// Ready endpoints hinted for this node (`trafficDistribution: PreferSameNode`).
    SameNode,
    /// Ready endpoints hinted for this node's zone.
    SameZone,
}

/// Hints are used only when asked for, every ready endpoint has hints of the kind and at least
/// one is hinted for this node (or zone); otherwise traffic could be sent nowhere. Node hints
/// win over zone hints, which PreferSameNode also sets for proxies that do not know node hints.
fn topology_mode(endpoints: &[Endpoint], policy: PortPolicy, node: &NodeContext) -> TopologyMode {
    if !policy.topology_aware {
        return TopologyMode::None;
    }
    let ready = || endpoints.iter().map(|e| &e.conditions).filter(|e| e.ready);
    if let Some(name) = node.node_name
        && ready().all(|e| !e.node_hints.is_empty())
        && ready().any(|e| e.node_hints.iter().any(|hint| hint == name))
    {
        return TopologyMode::SameNode;
    }
    let Some(zone) = node.zone.filter(|z| !z.is_empty()) else { return TopologyMode::None };
    let mut has_endpoint_for_zone = false;
    for endpoint in ready() {
        if endpoint.zone_hints.is_empty() {
            return TopologyMode::None;
        }
        has_endpoint_for_zone |= endpoint.zone_hints.iter().any(|hint| hint == zone);
    }
    if has_endpoint_for_zone { TopologyMode::SameZone } else { TopologyMode::None }
}

fn pick(endpoints: &[Endpoint], keep: impl Fn(&EndpointConditions) -> bool) -> Vec<L4Addr> {
    endpoints.iter().filter(|e| keep(&e.conditions)).map(|e| e.addr).collect()
}

/// The endpoints traffic to the frontend may go to. Empty means "reject".
pub fn choose(endpoints: &[Endpoint], policy: PortPolicy, node: &NodeContext) -> Vec<L4Addr> {
    if policy.internal_local {
        let local = pick(endpoints, |e| e.ready && is_local(e, node));
        if !local.is_empty() {
            return local;
        }
        return pick(endpoints, |e| is_local(e, node) && e.serving && e.terminating);
    }
    let mode = topology_mode(endpoints, policy, node);
    let (zone, name) = (node.zone.unwrap_or_default(), node.node_name.unwrap_or_default());
    let cluster = pick(endpoints, |e| {
        e.ready
            && match mode {
                TopologyMode::None => true,
                TopologyMode::SameNode => e.node_hints.iter().any(|h| h == name),
                TopologyMode::SameZone => e.zone_hints.iter().any(|h| h == zone),
            }
    });
    if !cluster.is_empty() {
        return cluster;
    }
    // No ready endpoint anywhere (topology was already ruled out if its zone had none).
    pick(endpoints, |e| e.serving && e.terminating)
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::model::Protocol;

    /// Shorthand: name, conditions "R" ready, "S" serving, "T" terminating, node, zone hints.
    fn ep(last: u8, conditions: &str, node: &str, hints: &[&str]) -> Endpoint {
        Endpoint {
            addr: L4Addr { ip: Ipv4Addr::new(10, 0, 0, last).into(), port: 80, protocol: Protocol::Tcp },
            conditions: EndpointConditions {
                ready: conditions.contains('R'),
                serving: conditions.contains('S'),
                terminating: conditions.contains('T'),
                node_name: (!node.is_empty()).then(|| node.to_string()),
                zone_hints: hints.iter().map(|h| h.to_string()).collect(),
                node_hints: Vec::new(),
            },
        }
    }

    /// `ep`, with `hints.forNodes` too (as PreferSameNode sets them, beside zone hints).
    fn ep_nodes(last: u8, node: &str, node_hints: &[&str], zone_hints: &[&str]) -> Endpoint {
        let mut endpoint = ep(last, "RS", node, zone_hints);
        endpoint.conditions.node_hints = node_hints.iter().map(|h| h.to_string()).collect();
        endpoint
    }

    fn ips(chosen: Vec<L4Addr>) -> Vec<u8> {
        chosen
            .iter()
            .map(|a| match a.ip {
                std::net::IpAddr::V4(ip) => ip.octets()[3],
                std::net::IpAddr::V6(ip) => ip.octets()[15],
            })
            .collect()
    }

    const CLUSTER: PortPolicy = PortPolicy { internal_local: false, topology_aware: false };
    const HINTS: PortPolicy = PortPolicy { internal_local: false, topology_aware: true };
    const LOCAL: PortPolicy = PortPolicy { internal_local: true, topology_aware: false };

    #[test]
    fn kube_proxy_cases() {
        let node_a_zone_a = NodeContext { node_name: Some("node-a"), zone: Some("zone-a") };
        let no_zone = NodeContext { node_name: Some("node-a"), zone: None };
        #[rustfmt::skip]
        type Case<'a> = (&'a str, Vec<Endpoint>, PortPolicy, NodeContext<'a>, Vec<u8>);
        let cases: Vec<Case> = vec![
            (
                "ready endpoints only",
                vec![ep(1, "RS", "node-a", &[]), ep(2, "", "node-b", &[]), ep(3, "RS", "node-b", &[])],
                CLUSTER,
                node_a_zone_a,
                vec![1, 3],
            ),
            (
                "no ready endpoint: serving and terminating ones",
                vec![ep(1, "ST", "node-a", &[]), ep(2, "T", "node-b", &[]), ep(3, "", "node-b", &[])],
                CLUSTER,
                node_a_zone_a,
                vec![1],
            ),
            (
                "ready ones win over serving-terminating ones",
                vec![ep(1, "ST", "node-a", &[]), ep(2, "RS", "node-b", &[])],
                CLUSTER,
                node_a_zone_a,
                vec![2],
            ),
            (
                "nothing usable: reject",
                vec![ep(1, "", "node-a", &[]), ep(2, "T", "node-b", &[])],
                CLUSTER,
                node_a_zone_a,
                vec![],
            ),
            (
                "hints used when every ready endpoint has one",
                vec![
                    ep(1, "RS", "node-a", &["zone-a"]),
                    ep(2, "RS", "node-b", &["zone-b"]),
                    ep(3, "RS", "node-c", &["zone-a"]),
                ],
                HINTS,
                node_a_zone_a,
                vec![1, 3],
            ),
            (
                "hints ignored when one ready endpoint has none",
                vec![ep(1, "RS", "node-a", &["zone-a"]), ep(2, "RS", "node-b", &[])],
                HINTS,
                node_a_zone_a,
                vec![1, 2],
            ),
            (
                "hints ignored when none is for this zone",
                vec![ep(1, "RS", "node-a", &["zone-b"]), ep(2, "RS", "node-b", &["zone-c"])],
                HINTS,
                node_a_zone_a,
                vec![1, 2],
            ),
            (
                "hints ignored when the node has no zone",
                vec![ep(1, "RS", "node-a", &["zone-a"]), ep(2, "RS", "node-b", &["zone-b"])],
                HINTS,
                no_zone,
                vec![1, 2],
            ),
            (
                "hints ignored when the Service did not ask for them",
                vec![ep(1, "RS", "node-a", &["zone-a"]), ep(2, "RS", "node-b", &["zone-b"])],
                CLUSTER,
                node_a_zone_a,
                vec![1, 2],
            ),
            (
                "not-ready endpoints without hints do not stop hints",
                vec![
                    ep(1, "RS", "node-a", &["zone-a"]),
                    ep(2, "RS", "node-b", &["zone-b"]),
                    ep(3, "", "node-c", &[]),
                ],
                HINTS,
                node_a_zone_a,
                vec![1],
            ),
            (
                "PreferSameNode: endpoints hinted for this node",
                vec![
                    ep_nodes(1, "node-a", &["node-a"], &["zone-a"]),
                    ep_nodes(2, "node-b", &["node-b"], &["zone-a"]),
                    ep_nodes(3, "node-a", &["node-a"], &["zone-a"]),
                ],
                HINTS,
                node_a_zone_a,
                vec![1, 3],
            ),
            (
                "PreferSameNode: none for this node falls back to the zone hints",
                vec![
                    ep_nodes(1, "node-b", &["node-b"], &["zone-a"]),
                    ep_nodes(2, "node-c", &["node-c"], &["zone-b"]),
                ],
                HINTS,
                node_a_zone_a,
                vec![1],
            ),
            (
                "PreferSameNode: node hints ignored when one ready endpoint has none",
                vec![ep_nodes(1, "node-a", &["node-a"], &[]), ep(2, "RS", "node-b", &[])],
                HINTS,
                node_a_zone_a,
                vec![1, 2],
            ),
            (
                "internalTrafficPolicy Local: this node's ready endpoints",
                vec![ep(1, "RS", "node-a", &[]), ep(2, "RS", "node-b", &[]), ep(3, "RS", "node-a", &[])],
                LOCAL,
                node_a_zone_a,
                vec![1, 3],
            ),
            (
                "Local: no ready local endpoint, serving-terminating local ones",
                vec![ep(1, "ST", "node-a", &[]), ep(2, "RS", "node-b", &[])],
                LOCAL,
                node_a_zone_a,
                vec![1],
            ),
            (
                "Local: no local endpoint at all rejects, even with remote ones",
                vec![ep(1, "RS", "node-b", &[])],
                LOCAL,
                node_a_zone_a,
                vec![],
            ),
            (
                "Local: unknown node name means nothing is local",
                vec![ep(1, "RS", "node-a", &[])],
                LOCAL,
                NodeContext { node_name: None, zone: None },
                vec![],
            ),
        ];
        for (name, endpoints, policy, node, want) in cases {
            assert_eq!(ips(choose(&endpoints, policy, &node)), want, "{name}");
        }
    }
}
