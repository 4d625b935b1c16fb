//! In manifests mode there is no EndpointSlice controller, so lb does its job: a Service with a
//! selector gets endpoints from the Pods (in its namespace) whose labels match, with the
//! controller's rules: the Pod's IP, ready from its Ready condition, terminating once it has a
//! deletionTimestamp, and named targetPorts resolved against its containers' ports.

use std::net::{IpAddr, Ipv4Addr};

use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::convert::topology::EndpointConditions;
use crate::convert::{EndpointState, SliceEndpoints, SlicePort, namespace_of};
use crate::model::Protocol;

fn selects(service: &Service, pod: &Pod) -> bool {
    let Some(selector) = service.spec.as_ref().and_then(|s| s.selector.as_ref()).filter(|s| !s.is_empty())
    else {
        return false; // no selector: endpoints are managed by hand
    };
    let labels = pod.metadata.labels.as_ref();
    namespace_of(pod.metadata.namespace.as_ref()) == namespace_of(service.metadata.namespace.as_ref())
        && selector.iter().all(|(key, value)| labels.and_then(|l| l.get(key)) == Some(value))
}

fn pod_ipv4(pod: &Pod) -> Option<Ipv4Addr> {
    let status = pod.status.as_ref()?;
    let ips = status.pod_ips.iter().flatten().map(|ip| ip.ip.as_str());
    status.pod_ip.as_deref().into_iter().chain(ips).find_map(|ip| match ip.parse() {
        Ok(IpAddr::V4(ip)) => Some(ip),
        _ => None,
    })
}

/// The port a Service port's targetPort means on this Pod, if it has it.
fn target_port(pod: &Pod, target: Option<&IntOrString>, port: i32, protocol: Protocol) -> Option<u16> {
    let number = match target {
        None => port,
        Some(IntOrString::Int(number)) => *number,
        Some(IntOrString::String(name)) => {
            pod.spec
                .as_ref()?
                .containers
                .iter()
                .flat_map(|c| c.ports.iter().flatten())
                .find(|p| {
                    p.name.as_deref() == Some(name.as_str())
                        && Protocol::from_kubernetes(p.protocol.as_deref()) == Some(protocol)
                })?
                .container_port
        }
    };
    u16::try_from(number).ok().filter(|n| *n != 0)
}

/// The endpoints the EndpointSlice controller would publish for `service`, one entry per Pod
/// (each Pod can resolve named ports differently).
pub fn endpoints_from_pods(service: &Service, pods: &[Pod]) -> Vec<SliceEndpoints> {
    let namespace = namespace_of(service.metadata.namespace.as_ref());
    let service_name = service.metadata.name.clone().unwrap_or_default();
    let service_ports = service.spec.as_ref().and_then(|s| s.ports.as_ref());
    let mut slices = Vec::new();
    for pod in pods.iter().filter(|pod| selects(service, pod)) {
        let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
        if matches!(phase, Some("Succeeded" | "Failed")) {
            continue; // finished pods serve nothing
        }
        let Some(ip) = pod_ipv4(pod) else { continue }; // not scheduled or no IPv4 yet
        let ready_condition = pod
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .and_then(|c| c.iter().find(|c| c.type_ == "Ready"))
            .is_some_and(|c| c.status == "True");
        let terminating = pod.metadata.deletion_timestamp.is_some();
        let ports = service_ports
            .into_iter()
            .flatten()
            .filter_map(|port| {
                let protocol = Protocol::from_kubernetes(port.protocol.as_deref())?;
                let number = target_port(pod, port.target_port.as_ref(), port.port, protocol)?;
                Some(SlicePort { name: port.name.clone().unwrap_or_default(), port: number, protocol })
            })
            .collect();
        slices.push(SliceEndpoints {
            namespace: namespace.clone(),
            service_name: service_name.clone(),
            ports,
            endpoints: vec![EndpointState {
                ip,
                conditions: EndpointConditions {
                    ready: ready_condition && !terminating,
                    serving: ready_condition,
                    terminating,
                    node_name: pod.spec.as_ref().and_then(|s| s.node_name.clone()),
                    zone_hints: Vec::new(),
                    node_hints: Vec::new(),
                },
            }],
        });
    }
    slices
}
