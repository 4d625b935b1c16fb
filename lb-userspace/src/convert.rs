//! Pure conversion from Kubernetes objects to the desired state, with kube-proxy's meaning:
//! a frontend per ClusterIP x Service port, backends from the EndpointSlices labelled with the
//! Service's name whose port has the Service port's name and protocol.
//!
//! Every check on an object happens here, so both sources (manifests and, later, the API
//! server) reject the same objects with the same words.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;

use crate::model::{DesiredState, Frontend, FrontendType, L4Addr, Protocol, ServicePortName};

/// The label that joins an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// An object that cannot be used, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind} {namespace}/{name}: {problem}")]
pub struct ObjectError {
    pub kind: &'static str,
    pub namespace: String,
    pub name: String,
    pub problem: String,
}

/// `namespace` as kubectl fills it in when a manifest leaves it out.
pub fn namespace_of(namespace: Option<&String>) -> String {
    namespace.cloned().unwrap_or_else(|| "default".to_string())
}

/// The parts of a Service that frontends are made of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceFrontends {
    pub namespace: String,
    pub name: String,
    pub cluster_ips: Vec<Ipv4Addr>,
    pub ports: Vec<ServicePortSpec>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePortSpec {
    /// Empty when unnamed (only allowed for a Service's single port).
    pub name: String,
    pub port: u16,
    pub protocol: Protocol,
}

/// The parts of an EndpointSlice that backends are made of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SliceEndpoints {
    pub namespace: String,
    pub service_name: String,
    pub ports: Vec<SlicePort>,
    /// Ready endpoints' addresses (the first of each endpoint's addresses, as kube-proxy uses).
    pub ready: Vec<Ipv4Addr>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlicePort {
    pub name: String,
    pub port: u16,
    pub protocol: Protocol,
}

fn port_number(value: i32) -> Option<u16> {
    u16::try_from(value).ok().filter(|port| *port != 0)
}

/// Checks a Service and extracts what its frontends need. `Ok(None)`: valid, but a Service
/// lb does not translate (headless, ExternalName, no IPv4 ClusterIP).
pub fn parse_service(service: &Service) -> Result<Option<ServiceFrontends>, ObjectError> {
    let namespace = namespace_of(service.metadata.namespace.as_ref());
    let name = service.metadata.name.clone().unwrap_or_default();
    let error = |problem: String| ObjectError {
        kind: "Service",
        namespace: namespace.clone(),
        name: name.clone(),
        problem,
    };
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
        return Err(error("spec.clusterIP is not set (lb does not allocate ClusterIPs yet)".into()));
    }
    let mut cluster_ips = Vec::new();
    for address in addresses {
        match address.parse::<IpAddr>() {
            Ok(IpAddr::V4(ip)) => cluster_ips.push(ip),
            Ok(IpAddr::V6(_)) => tracing::debug!(%namespace, %name, %address, "IPv6 ClusterIP skipped"),
            Err(_) => return Err(error(format!("spec.clusterIP {address:?} is not an IP address"))),
        }
    }
    let mut ports = Vec::new();
    for port in spec.ports.iter().flatten() {
        let port_name = port.name.clone().unwrap_or_default();
        let Some(number) = port_number(port.port) else {
            return Err(error(format!("port {port_name:?}: {} is not a port number (1-65535)", port.port)));
        };
        let Some(protocol) = Protocol::from_kubernetes(port.protocol.as_deref()) else {
            tracing::debug!(%namespace, %name, port = %port_name, protocol = ?port.protocol, "protocol not translated; port skipped");
            continue;
        };
        ports.push(ServicePortSpec { name: port_name, port: number, protocol });
    }
    if cluster_ips.is_empty() {
        return Ok(None);
    }
    Ok(Some(ServiceFrontends { namespace, name, cluster_ips, ports }))
}

/// Checks an EndpointSlice and extracts its ready endpoints. `Ok(None)`: valid, but not IPv4.
pub fn parse_slice(slice: &EndpointSlice) -> Result<Option<SliceEndpoints>, ObjectError> {
    let namespace = namespace_of(slice.metadata.namespace.as_ref());
    let name = slice.metadata.name.clone().unwrap_or_default();
    let error = |problem: String| ObjectError {
        kind: "EndpointSlice",
        namespace: namespace.clone(),
        name: name.clone(),
        problem,
    };
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
    if slice.address_type != "IPv4" {
        return Ok(None);
    }
    let mut ports = Vec::new();
    for port in slice.ports.iter().flatten() {
        let port_name = port.name.clone().unwrap_or_default();
        let Some(number) = port.port else { continue }; // "all ports": nothing to translate to
        let Some(number) = port_number(number) else {
            return Err(error(format!("port {port_name:?}: {number} is not a port number (1-65535)")));
        };
        let Some(protocol) = Protocol::from_kubernetes(port.protocol.as_deref()) else {
            continue;
        };
        ports.push(SlicePort { name: port_name, port: number, protocol });
    }
    let mut ready = Vec::new();
    for endpoint in &slice.endpoints {
        let mut addresses = Vec::with_capacity(endpoint.addresses.len());
        for address in &endpoint.addresses {
            let ip = address
                .parse::<Ipv4Addr>()
                .map_err(|_| error(format!("endpoint address {address:?} is not an IPv4 address")))?;
            addresses.push(ip);
        }
        // An unset condition means "unknown", which consumers are told to read as ready.
        let is_ready = endpoint.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true);
        if let (true, Some(first)) = (is_ready, addresses.first()) {
            ready.push(*first);
        }
    }
    Ok(Some(SliceEndpoints { namespace, service_name, ports, ready }))
}

/// The frontends of one Service, with the backends the given slices (already joined to this
/// Service) provide for each port.
pub fn service_frontends(service: &ServiceFrontends, slices: &[&SliceEndpoints]) -> Vec<Frontend> {
    let mut frontends = Vec::new();
    for port in &service.ports {
        // kube-proxy matches slice ports to Service ports by name and takes the number from the
        // slice, where the EndpointSlice controller resolved numeric and named targetPorts.
        let backends: BTreeSet<L4Addr> = slices
            .iter()
            .flat_map(|slice| {
                slice.ports.iter().filter(|p| p.name == port.name && p.protocol == port.protocol).flat_map(
                    |p| slice.ready.iter().map(|ip| L4Addr { ip: *ip, port: p.port, protocol: p.protocol }),
                )
            })
            .collect();
        for ip in &service.cluster_ips {
            frontends.push(Frontend {
                address: L4Addr { ip: *ip, port: port.port, protocol: port.protocol },
                frontend_type: FrontendType::ClusterIp,
                service: ServicePortName {
                    namespace: service.namespace.clone(),
                    name: service.name.clone(),
                    port: port.name.clone(),
                },
                backends: backends.iter().copied().collect(),
            });
        }
    }
    frontends
}

/// The desired state for a set of objects. Objects that fail their checks are left out and
/// reported; they never stop the others from being translated.
pub fn desired_state(services: &[Service], slices: &[EndpointSlice]) -> (DesiredState, Vec<ObjectError>) {
    let mut errors = Vec::new();
    let mut slices_by_service: BTreeMap<(String, String), Vec<SliceEndpoints>> = BTreeMap::new();
    for slice in slices {
        match parse_slice(slice) {
            Ok(Some(parsed)) => slices_by_service
                .entry((parsed.namespace.clone(), parsed.service_name.clone()))
                .or_default()
                .push(parsed),
            Ok(None) => {}
            Err(error) => errors.push(error),
        }
    }
    let mut parsed_services = Vec::new();
    for service in services {
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
        for frontend in service_frontends(service, &slices) {
            if let Some(owner) = state.frontends.get(&frontend.address) {
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
            state.frontends.insert(frontend.address, frontend);
        }
    }
    (state, errors)
}
