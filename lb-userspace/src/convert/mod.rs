//! Pure conversion from Kubernetes objects to the desired state, with kube-proxy's meaning:
//! a frontend per Service port and per address clients use for it (each ClusterIP; each node
//! address on the port's nodePort; each externalIP; each LoadBalancer ingress IP). Its backends
//! are the endpoints of the Service's EndpointSlices (joined by the `kubernetes.io/service-name`
//! label; or its v1 Endpoints) whose port has the Service port's name and protocol, chosen by
//! `topology::choose` under the traffic policy that applies to the frontend.
//!
//! Every check on an object happens here, so both sources (manifests and the API server)
//! reject the same objects with the same words.

pub mod topology;

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use k8s_openapi::api::core::v1::{Endpoints, Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::model::{
    DesiredState, Frontend, FrontendKey, FrontendPolicy, FrontendType, HealthCheck, L4Addr, ObjectError,
    Protocol, Scope, ServicePortName,
};
use crate::source::namespace_of;
use topology::{Endpoint, EndpointConditions, NodeContext, PortPolicy};

/// The label that joins an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// Services (and their endpoints) with this label are handled by another proxy.
pub const SERVICE_PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";
/// Set on headless Services' endpoints; kube-proxy skips objects carrying it.
pub const HEADLESS_LABEL: &str = "service.kubernetes.io/headless";
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";
const TOPOLOGY_MODE_ANNOTATION: &str = "service.kubernetes.io/topology-mode";
const TOPOLOGY_HINTS_ANNOTATION: &str = "service.kubernetes.io/topology-aware-hints";

/// Where endpoints come from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum EndpointsSource {
    #[default]
    EndpointSlices,
    /// v1 Endpoints, for clusters and tools that only publish those.
    Endpoints,
}

/// How this proxy instance is configured; the same for every object.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProxyConfig {
    /// This node's name (`--hostname-override`, else the host name).
    pub node_name: Option<String>,
    /// `--service-proxy-name`: Services labelled with this proxy name are ours too.
    pub service_proxy_name: Option<String>,
    pub endpoints_source: EndpointsSource,
    /// The node addresses NodePort frontends listen on (kube-proxy's `--nodeport-addresses`
    /// applied to the node's interfaces); the run loop refreshes them.
    pub node_addresses: Vec<IpAddr>,
    /// How new flows to external frontends pick a backend (`--lb-algorithm`).
    pub lb_algorithm: LbAlgorithm,
}

/// How new flows pick a backend.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LbAlgorithm {
    /// Maglev consistent hashing for external frontends (NodePort, LoadBalancer, externalIP):
    /// every node picks the same backend for the same flow, and a change to the backend set
    /// moves only the flows it must. ClusterIPs hash over their slots: their clients are on
    /// this node, and a table each would cost 64 KiB per Service.
    #[default]
    Maglev,
    /// A hash of the flow over the frontend's slots, for every frontend.
    Random,
}

/// kube-proxy's `sessionAffinityConfig.clientIP.timeoutSeconds` default (3 hours) and bounds.
pub const DEFAULT_AFFINITY_TIMEOUT: u32 = 10_800;
const MAX_AFFINITY_TIMEOUT: i32 = 86_400;

/// A whole set of objects, for a conversion from scratch (`desired_state`). Endpoints from
/// Pods, in manifests mode, come as the EndpointSlices `source::pods` makes of them.
#[derive(Clone, Debug, Default)]
pub struct ClusterObjects {
    pub services: Vec<Service>,
    pub endpoint_slices: Vec<EndpointSlice>,
    pub endpoints: Vec<Endpoints>,
    pub nodes: Vec<Node>,
}

/// What lb reads of its own Node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeRecord {
    /// `topology.kubernetes.io/zone`.
    pub zone: Option<String>,
    /// Neither being deleted nor tainted for deletion by the cluster autoscaler: kube-proxy's
    /// `/healthz` fails otherwise, so load balancers stop sending new traffic.
    pub eligible: bool,
}

pub fn parse_node(node: &Node) -> NodeRecord {
    let tainted = node
        .spec
        .as_ref()
        .and_then(|s| s.taints.as_ref())
        .is_some_and(|t| t.iter().any(|t| t.key == "ToBeDeletedByClusterAutoscaler"));
    NodeRecord {
        zone: node.metadata.labels.as_ref().and_then(|l| l.get(ZONE_LABEL)).cloned(),
        eligible: node.metadata.deletion_timestamp.is_none() && !tainted,
    }
}

/// The parts of a Service that frontends are made of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceFrontends {
    pub namespace: String,
    pub name: String,
    /// Either family or both (`spec.clusterIPs` of a dual-stack Service).
    pub cluster_ips: Vec<IpAddr>,
    pub ports: Vec<ServicePortSpec>,
    /// Endpoint choice for ClusterIP traffic (`internalTrafficPolicy`, topology).
    pub policy: PortPolicy,
    /// `spec.externalIPs`.
    pub external_ips: Vec<IpAddr>,
    /// `status.loadBalancer.ingress[].ip` of a LoadBalancer Service (not those with ipMode
    /// Proxy, whose load balancer sends traffic to the nodes, not to the IP).
    pub load_balancer_ips: Vec<IpAddr>,
    /// `spec.externalTrafficPolicy: Local`.
    pub external_local: bool,
    /// `spec.loadBalancerSourceRanges`.
    pub source_ranges: Vec<ipnet::IpNet>,
    /// `spec.healthCheckNodePort` (LoadBalancer with Local external policy).
    pub health_check_node_port: Option<u16>,
    /// `sessionAffinity: ClientIP`'s timeout in seconds; 0 without affinity.
    pub affinity_timeout: u32,
    /// Ports (or an SCTP port's NodePort frontends) lb does not serve, and why: reported as a
    /// warning on the Service.
    pub unsupported: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePortSpec {
    /// Empty when unnamed (only allowed for a Service's single port).
    pub name: String,
    pub port: u16,
    pub protocol: Protocol,
    /// The port's nodePort, for NodePort and LoadBalancer Services.
    pub node_port: Option<u16>,
}

/// The endpoints one EndpointSlice (or one v1 Endpoints subset) offers a Service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SliceEndpoints {
    pub namespace: String,
    pub service_name: String,
    pub ports: Vec<SlicePort>,
    pub endpoints: Vec<EndpointState>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlicePort {
    pub name: String,
    pub port: u16,
    pub protocol: Protocol,
}

/// One endpoint's address (the first of its addresses, as kube-proxy uses) and conditions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointState {
    pub ip: IpAddr,
    pub conditions: EndpointConditions,
}

fn port_number(value: i32) -> Option<u16> {
    u16::try_from(value).ok().filter(|port| *port != 0)
}

fn object_error(kind: &'static str, namespace: &str, name: &str) -> impl Fn(String) -> ObjectError + use<> {
    let (namespace, name) = (namespace.to_string(), name.to_string());
    move |problem| ObjectError { kind, namespace: namespace.clone(), name: name.clone(), problem }
}

/// Checks a Service and extracts what its frontends need. `Ok(None)`: valid, but a Service
/// lb does not translate (headless, ExternalName, no ClusterIP yet).
/// Why a port with a protocol lb does not translate is not served.
fn unsupported_port(name: &str, number: u16, protocol: Option<&str>) -> String {
    let protocol = protocol.unwrap_or("TCP");
    format!("port {name:?} ({number}/{protocol}) is not served: lb translates TCP, UDP and SCTP")
}

/// Why lb changes no SCTP port, for the messages of the SCTP ports it does not serve.
const SCTP_PORTS_KEPT: &str = "lb does not change SCTP ports: SCTP's CRC32c checksum covers them, and \
                               recomputing it over the whole packet is more than lb's data path does";

/// What of an SCTP Service port lb can serve. Its frontends are served where the backends
/// listen on the frontend's own port (addresses may change: the CRC32c covers no pseudo-header):
/// a numeric targetPort other than the port rules out the whole port, a nodePort other than
/// the port rules out the NodePort frontends. `Err`: not served at all, and why.
fn sctp_port(
    name: &str,
    number: u16,
    target_port: Option<&IntOrString>,
    node_port: &mut Option<u16>,
    unsupported: &mut Vec<String>,
) -> Result<(), String> {
    if let Some(IntOrString::Int(target)) = target_port
        && *target != i32::from(number)
    {
        return Err(format!(
            "port {name:?} ({number}/SCTP) is not served: its targetPort {target} is another port, and \
             {SCTP_PORTS_KEPT}"
        ));
    }
    if let Some(node) = node_port.take_if(|node| *node != number) {
        unsupported.push(format!(
            "port {name:?} ({number}/SCTP) is served on its ClusterIP, external and load-balancer \
             IPs, not on its nodePort {node}: that would change the port, and {SCTP_PORTS_KEPT}"
        ));
    }
    Ok(())
}

pub fn parse_service(service: &Service) -> Result<Option<ServiceFrontends>, ObjectError> {
    let namespace = namespace_of(service.metadata.namespace.as_ref());
    let name = service.metadata.name.clone().unwrap_or_default();
    let error = object_error("Service", &namespace, &name);
    if name.is_empty() {
        return Err(error("metadata.name is missing".into()));
    }
    let Some(spec) = service.spec.as_ref() else {
        return Err(error("spec is missing".into()));
    };
    if spec.type_.as_deref() == Some("ExternalName") {
        return Ok(None);
    }
    let mut addresses: Vec<&String> = spec.cluster_ips.iter().flatten().collect();
    if addresses.is_empty() {
        addresses.extend(spec.cluster_ip.iter());
    }
    if addresses.iter().any(|ip| ip.as_str() == "None") {
        return Ok(None); // headless: clients resolve pod IPs, nothing to translate
    }
    if addresses.is_empty() || addresses.iter().all(|ip| ip.is_empty()) {
        // The API server always sets one; in manifests mode the allocator fills it in first.
        tracing::debug!(%namespace, %name, "no clusterIP yet; no frontend");
        return Ok(None);
    }
    let mut cluster_ips = Vec::new();
    for address in addresses {
        match address.parse::<IpAddr>() {
            Ok(ip) => cluster_ips.push(ip),
            Err(_) => return Err(error(format!("spec.clusterIP {address:?} is not an IP address"))),
        }
    }
    let service_type = spec.type_.as_deref().unwrap_or("ClusterIP");
    let has_node_ports = matches!(service_type, "NodePort" | "LoadBalancer");
    let mut ports = Vec::new();
    let mut unsupported = Vec::new();
    for port in spec.ports.iter().flatten() {
        let port_name = port.name.clone().unwrap_or_default();
        let Some(number) = port_number(port.port) else {
            return Err(error(format!("port {port_name:?}: {} is not a port number (1-65535)", port.port)));
        };
        let node_port = match port.node_port.filter(|_| has_node_ports) {
            None => None,
            Some(value) => Some(port_number(value).ok_or_else(|| {
                error(format!("port {port_name:?}: nodePort {value} is not a port number (1-65535)"))
            })?),
        };
        let Some(protocol) = Protocol::from_kubernetes(port.protocol.as_deref()) else {
            unsupported.push(unsupported_port(&port_name, number, port.protocol.as_deref()));
            continue;
        };
        let mut node_port = node_port;
        if protocol == Protocol::Sctp
            && let Err(why) =
                sctp_port(&port_name, number, port.target_port.as_ref(), &mut node_port, &mut unsupported)
        {
            unsupported.push(why);
            continue;
        }
        ports.push(ServicePortSpec { name: port_name, port: number, protocol, node_port });
    }
    if cluster_ips.is_empty() {
        return Ok(None);
    }
    let mut external_ips = Vec::new();
    for address in spec.external_ips.iter().flatten() {
        match address.parse::<IpAddr>() {
            Ok(ip) => external_ips.push(ip),
            Err(_) => return Err(error(format!("spec.externalIPs: {address:?} is not an IP address"))),
        }
    }
    let mut load_balancer_ips = Vec::new();
    let ingress =
        service.status.as_ref().and_then(|s| s.load_balancer.as_ref()).and_then(|lb| lb.ingress.as_ref());
    for entry in ingress.into_iter().flatten().filter(|_| service_type == "LoadBalancer") {
        let (Some(address), false) = (entry.ip.as_ref(), entry.ip_mode.as_deref() == Some("Proxy")) else {
            continue;
        };
        match address.parse::<IpAddr>() {
            Ok(ip) => load_balancer_ips.push(ip),
            Err(_) => {
                return Err(error(format!("status.loadBalancer.ingress: {address:?} is not an IP address")));
            }
        }
    }
    let mut source_ranges = Vec::new();
    for range in spec.load_balancer_source_ranges.iter().flatten() {
        match range.trim().parse::<ipnet::IpNet>() {
            Ok(net) => source_ranges.push(net.trunc()),
            Err(_) => return Err(error(format!("spec.loadBalancerSourceRanges: {range:?} is not a CIDR"))),
        }
    }
    let external_local = spec.external_traffic_policy.as_deref() == Some("Local");
    let health_check_node_port = spec
        .health_check_node_port
        .filter(|_| service_type == "LoadBalancer" && external_local)
        .map(|value| {
            port_number(value)
                .ok_or_else(|| error(format!("healthCheckNodePort {value} is not a port number")))
        })
        .transpose()?;
    let affinity_timeout = match spec.session_affinity.as_deref() {
        None | Some("None") => 0,
        Some("ClientIP") => {
            let timeout = spec
                .session_affinity_config
                .as_ref()
                .and_then(|c| c.client_ip.as_ref())
                .and_then(|c| c.timeout_seconds);
            match timeout {
                None => DEFAULT_AFFINITY_TIMEOUT,
                Some(seconds) if (1..=MAX_AFFINITY_TIMEOUT).contains(&seconds) => seconds as u32,
                Some(seconds) => {
                    return Err(error(format!(
                        "sessionAffinityConfig.clientIP.timeoutSeconds {seconds} is outside 1-{MAX_AFFINITY_TIMEOUT}"
                    )));
                }
            }
        }
        Some(other) => return Err(error(format!("sessionAffinity {other:?} is neither None nor ClientIP"))),
    };
    let annotations = service.metadata.annotations.as_ref();
    let topology_mode = annotations
        .and_then(|a| a.get(TOPOLOGY_MODE_ANNOTATION).or_else(|| a.get(TOPOLOGY_HINTS_ANNOTATION)))
        .map(String::as_str);
    let policy = PortPolicy {
        internal_local: spec.internal_traffic_policy.as_deref() == Some("Local"),
        topology_aware: spec.traffic_distribution.is_some() || matches!(topology_mode, Some("Auto" | "auto")),
    };
    Ok(Some(ServiceFrontends {
        namespace,
        name,
        cluster_ips,
        ports,
        policy,
        external_ips,
        load_balancer_ips,
        external_local,
        source_ranges,
        health_check_node_port,
        affinity_timeout,
        unsupported,
    }))
}

/// kube-proxy's label filters: Services of another proxy, or marked headless, are not ours;
/// kube-proxy applies them to Services and to their EndpointSlices alike (one informer factory
/// with one label selector), and so does lb, to v1 Endpoints too.
pub fn is_proxied_here(service: &Service, config: &ProxyConfig) -> bool {
    labels_proxied_here(service.metadata.labels.as_ref(), config)
}

/// `is_proxied_here` for any object's labels.
pub fn labels_proxied_here(labels: Option<&BTreeMap<String, String>>, config: &ProxyConfig) -> bool {
    if labels.is_some_and(|l| l.contains_key(HEADLESS_LABEL)) {
        return false;
    }
    match labels.and_then(|l| l.get(SERVICE_PROXY_NAME_LABEL)) {
        None => true,
        Some(proxy) => config.service_proxy_name.as_deref() == Some(proxy.as_str()),
    }
}

/// The label selector lb watches Services, EndpointSlices and Endpoints with: kube-proxy's
/// (`!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless`), so the API
/// server filters, and an object that gains one of the labels leaves lb's view at once (the
/// watch reports it deleted). With `--service-proxy-name`, objects labelled with that name are
/// lb's too: a selector cannot say "absent or equal", so that label is filtered here instead.
pub fn label_selector(config: &ProxyConfig) -> String {
    match config.service_proxy_name {
        None => format!("!{SERVICE_PROXY_NAME_LABEL},!{HEADLESS_LABEL}"),
        Some(_) => format!("!{HEADLESS_LABEL}"),
    }
}

fn parse_ports<'a>(
    ports: impl Iterator<Item = (Option<&'a String>, Option<i32>, Option<&'a String>)>,
    error: &impl Fn(String) -> ObjectError,
) -> Result<Vec<SlicePort>, ObjectError> {
    let mut parsed = Vec::new();
    for (name, number, protocol) in ports {
        let name = name.cloned().unwrap_or_default();
        let Some(number) = number else { continue }; // "all ports": nothing to translate to
        let Some(number) = port_number(number) else {
            return Err(error(format!("port {name:?}: {number} is not a port number (1-65535)")));
        };
        let Some(protocol) = Protocol::from_kubernetes(protocol.map(String::as_str)) else { continue };
        parsed.push(SlicePort { name, port: number, protocol });
    }
    Ok(parsed)
}

/// An endpoint address of a slice whose `addressType` is `family` (`IPv4` or `IPv6`).
fn parse_endpoint_address(
    address: &str,
    family: &str,
    error: &impl Fn(String) -> ObjectError,
) -> Result<IpAddr, ObjectError> {
    match address.parse::<IpAddr>() {
        Ok(ip) if ip.is_ipv4() == (family == "IPv4") => Ok(ip),
        _ => Err(error(format!("endpoint address {address:?} is not an {family} address"))),
    }
}

/// Checks an EndpointSlice and extracts its endpoints. `Ok(None)`: valid, but of addressType
/// FQDN, which is not translated.
pub fn parse_slice(slice: &EndpointSlice) -> Result<Option<SliceEndpoints>, ObjectError> {
    let namespace = namespace_of(slice.metadata.namespace.as_ref());
    let name = slice.metadata.name.clone().unwrap_or_default();
    let error = object_error("EndpointSlice", &namespace, &name);
    if name.is_empty() {
        return Err(error("metadata.name is missing".into()));
    }
    let service_name = slice
        .metadata
        .labels
        .as_ref()
        .and_then(|labels| labels.get(SERVICE_NAME_LABEL))
        .cloned()
        .ok_or_else(|| error(format!("label {SERVICE_NAME_LABEL} is missing")))?;
    let family = slice.address_type.as_str();
    if !matches!(family, "IPv4" | "IPv6") {
        return Ok(None);
    }
    let ports = parse_ports(
        slice.ports.iter().flatten().map(|p| (p.name.as_ref(), p.port, p.protocol.as_ref())),
        &error,
    )?;
    let mut endpoints = Vec::new();
    for endpoint in &slice.endpoints {
        let mut first = None;
        for address in &endpoint.addresses {
            let ip = parse_endpoint_address(address, family, &error)?;
            first.get_or_insert(ip);
        }
        let Some(ip) = first else { continue };
        let conditions = endpoint.conditions.as_ref();
        // Unset ready/serving mean "unknown", which consumers are told to read as true.
        endpoints.push(EndpointState {
            ip,
            conditions: EndpointConditions {
                ready: conditions.and_then(|c| c.ready).unwrap_or(true),
                serving: conditions.and_then(|c| c.serving).unwrap_or(true),
                terminating: conditions.and_then(|c| c.terminating).unwrap_or(false),
                node_name: endpoint.node_name.clone(),
                zone_hints: endpoint
                    .hints
                    .iter()
                    .flat_map(|h| h.for_zones.iter().flatten())
                    .map(|zone| zone.name.clone())
                    .collect(),
                node_hints: endpoint
                    .hints
                    .iter()
                    .flat_map(|h| h.for_nodes.iter().flatten())
                    .map(|node| node.name.clone())
                    .collect(),
            },
        });
    }
    Ok(Some(SliceEndpoints { namespace, service_name, ports, endpoints }))
}

/// Checks v1 Endpoints and turns each subset into the same form as a slice.
pub fn parse_endpoints(endpoints: &Endpoints) -> Result<Vec<SliceEndpoints>, ObjectError> {
    let namespace = namespace_of(endpoints.metadata.namespace.as_ref());
    let name = endpoints.metadata.name.clone().unwrap_or_default();
    let error = object_error("Endpoints", &namespace, &name);
    if name.is_empty() {
        return Err(error("metadata.name is missing".into()));
    }
    let mut slices = Vec::new();
    for subset in endpoints.subsets.iter().flatten() {
        let ports = parse_ports(
            subset.ports.iter().flatten().map(|p| (p.name.as_ref(), Some(p.port), p.protocol.as_ref())),
            &error,
        )?;
        let mut states = Vec::new();
        let ready = subset.addresses.iter().flatten().map(|a| (a, true));
        let not_ready = subset.not_ready_addresses.iter().flatten().map(|a| (a, false));
        for (address, is_ready) in ready.chain(not_ready) {
            let Ok(ip) = address.ip.parse::<IpAddr>() else {
                return Err(error(format!("endpoint address {:?} is not an IP address", address.ip)));
            };
            states.push(EndpointState {
                ip,
                conditions: EndpointConditions {
                    ready: is_ready,
                    serving: is_ready,
                    node_name: address.node_name.clone(),
                    ..Default::default()
                },
            });
        }
        slices.push(SliceEndpoints {
            namespace: namespace.clone(),
            service_name: name.clone(),
            ports,
            endpoints: states,
        });
    }
    Ok(slices)
}

/// The endpoints of one Service port that the given slices (already joined to the Service)
/// list. An endpoint listed by several slices counts once (the first listing wins).
fn port_endpoints(port: &ServicePortSpec, slices: &[&SliceEndpoints]) -> Vec<Endpoint> {
    endpoints_of_port(&port.name, port.protocol, slices)
}

/// The endpoints that slices joined to a Service list for its port `name` (`""` for a single
/// unnamed port); an endpoint listed twice counts once.
pub fn endpoints_of_port(name: &str, protocol: Protocol, slices: &[&SliceEndpoints]) -> Vec<Endpoint> {
    // kube-proxy matches slice ports to Service ports by name and takes the number from the
    // slice, where the EndpointSlice controller resolved numeric and named targetPorts.
    let mut seen = BTreeSet::new();
    let mut endpoints = Vec::new();
    for slice in slices {
        for slice_port in slice.ports.iter().filter(|p| p.name == name && p.protocol == protocol) {
            for state in &slice.endpoints {
                let addr = L4Addr { ip: state.ip, port: slice_port.port, protocol: slice_port.protocol };
                if seen.insert(addr) {
                    endpoints.push(Endpoint { addr, conditions: state.conditions.clone() });
                }
            }
        }
    }
    endpoints
}

/// Backends under one traffic policy, and the frontend policy that goes with them.
fn choose_backends(
    endpoints: &[Endpoint],
    policy: PortPolicy,
    local: bool,
    node: &NodeContext,
) -> (Vec<L4Addr>, bool) {
    let mut backends = topology::choose(endpoints, PortPolicy { internal_local: local, ..policy }, node);
    backends.sort();
    // kube-proxy drops (rather than rejects) when a Local policy leaves nothing although the
    // Service has endpoints elsewhere.
    let drop_when_empty = local
        && backends.is_empty()
        && !topology::choose(endpoints, PortPolicy { internal_local: false, ..policy }, node).is_empty();
    (backends, drop_when_empty)
}

/// The frontends of one Service, with the backends the given slices (already joined to this
/// Service) provide for each port.
pub fn service_frontends(
    service: &ServiceFrontends,
    slices: &[&SliceEndpoints],
    node: &NodeContext,
    node_addresses: &[IpAddr],
    lb_algorithm: LbAlgorithm,
) -> Vec<Frontend> {
    let mut frontends = Vec::new();
    // Each family on its own, as kube-proxy runs a proxier per family: a frontend's backends,
    // node addresses and source ranges are those of its family, and a family the Service has
    // no ClusterIP of has no frontends (kube-proxy's proxier of that family skips the Service).
    for (port, ipv4) in service.ports.iter().flat_map(|port| [(port, true), (port, false)]) {
        let same_family = |ip: &IpAddr| ip.is_ipv4() == ipv4;
        if !service.cluster_ips.iter().any(same_family) {
            continue;
        }
        let endpoints: Vec<Endpoint> =
            port_endpoints(port, slices).into_iter().filter(|e| same_family(&e.addr.ip)).collect();
        let name = ServicePortName {
            namespace: service.namespace.clone(),
            name: service.name.clone(),
            port: port.name.clone(),
        };
        let mut serving: Vec<L4Addr> =
            endpoints.iter().filter(|e| e.conditions.ready || e.conditions.serving).map(|e| e.addr).collect();
        serving.sort();
        serving.dedup();
        let mut listed: Vec<L4Addr> = endpoints.iter().map(|e| e.addr).collect();
        listed.sort();
        listed.dedup();
        let internal = choose_backends(&endpoints, service.policy, service.policy.internal_local, node);
        let external = choose_backends(&endpoints, service.policy, service.external_local, node);
        // In-cluster sources of a Local-policy external frontend get every endpoint (kube-proxy
        // short-circuits pods and the node to the Cluster-policy endpoints).
        let in_cluster =
            service.external_local.then(|| choose_backends(&endpoints, service.policy, false, node).0);
        let mut add = |ip: IpAddr, number: u16, frontend_type: FrontendType| {
            let external_type = frontend_type.is_external();
            let (local, (mut backends, drop_when_empty)) = if external_type {
                (service.external_local, external.clone())
            } else {
                (service.policy.internal_local, internal.clone())
            };
            // SCTP keeps its ports (`sctp_port`): with a named targetPort, only the endpoints
            // where it is the frontend's port can serve.
            let same_port = |backend: &L4Addr| port.protocol != Protocol::Sctp || backend.port == number;
            backends.retain(same_port);
            let source_ranges = if frontend_type == FrontendType::LoadBalancer {
                // Ranges of the other family only: none applies, so any source may connect.
                service.source_ranges.iter().filter(|net| same_family(&net.addr())).copied().collect()
            } else {
                Vec::new()
            };
            let policy = FrontendPolicy {
                local,
                snat: external_type && !local,
                drop_when_empty,
                source_ranges,
                node_address: frontend_type == FrontendType::NodePort,
                external: external_type,
                two_scopes: external_type && in_cluster.is_some(),
                affinity_timeout: service.affinity_timeout,
                maglev: external_type && lb_algorithm == LbAlgorithm::Maglev,
            };
            let address = L4Addr { ip, port: number, protocol: port.protocol };
            let internal_policy = FrontendPolicy {
                local: false,
                snat: false,
                drop_when_empty: false,
                source_ranges: Vec::new(),
                two_scopes: false,
                ..policy.clone()
            };
            frontends.push(Frontend {
                address,
                scope: Scope::External,
                frontend_type,
                policy,
                service: name.clone(),
                backends,
                serving: serving.clone(),
                listed: listed.clone(),
            });
            if external_type && let Some(all) = &in_cluster {
                frontends.push(Frontend {
                    address,
                    scope: Scope::Internal,
                    frontend_type,
                    policy: internal_policy,
                    service: name.clone(),
                    backends: all.iter().copied().filter(same_port).collect(),
                    serving: serving.clone(),
                    listed: listed.clone(),
                });
            }
        };
        for ip in service.cluster_ips.iter().filter(|ip| same_family(ip)) {
            add(*ip, port.port, FrontendType::ClusterIp);
        }
        if let Some(node_port) = port.node_port {
            for ip in node_addresses.iter().filter(|ip| same_family(ip)) {
                add(*ip, node_port, FrontendType::NodePort);
            }
        }
        for ip in service.external_ips.iter().filter(|ip| same_family(ip)) {
            add(*ip, port.port, FrontendType::ExternalIp);
        }
        for ip in service.load_balancer_ips.iter().filter(|ip| same_family(ip)) {
            add(*ip, port.port, FrontendType::LoadBalancer);
        }
    }
    frontends
}

/// How many ready endpoints of a Service are on this node, for its health check: distinct
/// addresses of the family that has most (a dual-stack Pod is one endpoint, not two).
pub fn local_endpoint_count(slices: &[&SliceEndpoints], node: &NodeContext) -> usize {
    let mut local: [BTreeSet<IpAddr>; 2] = Default::default();
    for endpoint in slices.iter().flat_map(|slice| &slice.endpoints) {
        if endpoint.conditions.ready && topology::is_local(&endpoint.conditions, node) {
            local[usize::from(endpoint.ip.is_ipv6())].insert(endpoint.ip);
        }
    }
    local[0].len().max(local[1].len())
}

/// The desired state for a set of objects. Objects that fail their checks are left out and
/// reported; they never stop the others from being translated.
pub fn desired_state(objects: &ClusterObjects, config: &ProxyConfig) -> (DesiredState, Vec<ObjectError>) {
    let mut errors = Vec::new();
    let mut slices_by_service: BTreeMap<(String, String), Vec<SliceEndpoints>> = BTreeMap::new();
    let mut add = |slice: SliceEndpoints| {
        slices_by_service
            .entry((slice.namespace.clone(), slice.service_name.clone()))
            .or_default()
            .push(slice)
    };
    match config.endpoints_source {
        EndpointsSource::EndpointSlices => {
            // Slices sorted by name, so "the first listing wins" does not depend on arrival order.
            let mut sorted: Vec<&EndpointSlice> = objects.endpoint_slices.iter().collect();
            sorted.sort_by(|a, b| {
                (&a.metadata.namespace, &a.metadata.name).cmp(&(&b.metadata.namespace, &b.metadata.name))
            });
            for slice in
                sorted.into_iter().filter(|s| labels_proxied_here(s.metadata.labels.as_ref(), config))
            {
                match parse_slice(slice) {
                    Ok(Some(parsed)) => add(parsed),
                    Ok(None) => {}
                    Err(error) => errors.push(error),
                }
            }
        }
        EndpointsSource::Endpoints => {
            let mut sorted: Vec<&Endpoints> = objects.endpoints.iter().collect();
            sorted.sort_by(|a, b| {
                (&a.metadata.namespace, &a.metadata.name).cmp(&(&b.metadata.namespace, &b.metadata.name))
            });
            for endpoints in
                sorted.into_iter().filter(|e| labels_proxied_here(e.metadata.labels.as_ref(), config))
            {
                match parse_endpoints(endpoints) {
                    Ok(subsets) => subsets.into_iter().for_each(&mut add),
                    Err(error) => errors.push(error),
                }
            }
        }
    }
    let node = config
        .node_name
        .as_deref()
        .and_then(|name| objects.nodes.iter().find(|n| n.metadata.name.as_deref() == Some(name)));
    let node_context = NodeContext {
        node_name: config.node_name.as_deref(),
        zone: node.and_then(|n| n.metadata.labels.as_ref()?.get(ZONE_LABEL)).map(String::as_str),
    };

    let mut parsed_services = Vec::new();
    for service in objects.services.iter().filter(|s| is_proxied_here(s, config)) {
        match parse_service(service) {
            Ok(Some(parsed)) => parsed_services.push(parsed),
            Ok(None) => {}
            Err(error) => errors.push(error),
        }
    }
    // Deterministic winner when two Services claim the same frontend: the first by name.
    parsed_services.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));

    let mut state = DesiredState::default();
    for service in &parsed_services {
        let key = (service.namespace.clone(), service.name.clone());
        let slices: Vec<&SliceEndpoints> = slices_by_service.get(&key).into_iter().flatten().collect();
        if let Some(port) = service.health_check_node_port {
            let check = HealthCheck {
                namespace: service.namespace.clone(),
                name: service.name.clone(),
                local_endpoints: local_endpoint_count(&slices, &node_context),
            };
            if let Some(owner) = state.health_checks.get(&port) {
                errors.push(ObjectError {
                    kind: "Service",
                    namespace: service.namespace.clone(),
                    name: service.name.clone(),
                    problem: format!(
                        "healthCheckNodePort {port} is already used by Service {}/{}; ignored",
                        owner.namespace, owner.name
                    ),
                });
            } else {
                state.health_checks.insert(port, check);
            }
        }
        for frontend in
            service_frontends(service, &slices, &node_context, &config.node_addresses, config.lb_algorithm)
        {
            // A frontend's scopes stand or fall together: its external entry (always first)
            // decides whom the address belongs to.
            let owner_key = FrontendKey { address: frontend.address, scope: Scope::External };
            if let Some(owner) = state.frontends.get(&owner_key)
                && (frontend.scope == Scope::External || owner.service != frontend.service)
            {
                if frontend.scope == Scope::Internal {
                    continue;
                }
                errors.push(ObjectError {
                    kind: "Service",
                    namespace: service.namespace.clone(),
                    name: service.name.clone(),
                    problem: format!(
                        "frontend {} is already used by Service {}/{}; ignored",
                        frontend.address, owner.service.namespace, owner.service.name
                    ),
                });
                continue;
            }
            state.frontends.insert(frontend.key(), frontend);
        }
    }
    (state, errors)
}
