//! In manifests mode there is no EndpointSlice controller, so lb does its job: a Service with a
//! selector gets an EndpointSlice per Pod (in its namespace) whose labels match, with the
//! controller's rules: the Pod's IP, ready from its Ready condition, terminating once it has a
//! deletionTimestamp, and named targetPorts resolved against its containers' ports (one slice
//! per Pod, since each Pod may resolve them differently).
//!
//! It keeps what it needs of each Service and Pod, and on a change makes the slices of only
//! the Services and Pods it touches. Its slices are named `lb_pods_<service>_<pod>` (and
//! `..._ipv6` for a dual-stack Pod's IPv6 address, as the controller makes a slice per family):
//! a name no real object can have (`_` is not allowed in Kubernetes names).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;

use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::model::IpFamily;
use crate::source::{Object, ObjectChange, ObjectKey, namespace_of};

/// What a selector-based Service needs for its endpoints.
#[derive(Debug, Clone, PartialEq)]
struct Selecting {
    selector: BTreeMap<String, String>,
    /// (name, port, targetPort, protocol) of each Service port.
    ports: Vec<(String, i32, Option<IntOrString>, String)>,
}

/// What a Pod contributes.
#[derive(Debug, Clone, PartialEq)]
struct PodRecord {
    labels: BTreeMap<String, String>,
    /// The Pod's first address of each family; none when not scheduled, without an IP yet,
    /// or finished (Succeeded/Failed): no endpoint.
    ips: Vec<IpAddr>,
    ready: bool,
    terminating: bool,
    node_name: Option<String>,
    /// (name, number, protocol) of each container port.
    container_ports: Vec<(String, i32, String)>,
}

fn protocol_or_tcp(protocol: Option<&String>) -> String {
    protocol.cloned().unwrap_or_else(|| "TCP".to_string())
}

impl PodRecord {
    fn of(pod: &Pod) -> Self {
        let status = pod.status.as_ref();
        let finished = matches!(status.and_then(|s| s.phase.as_deref()), Some("Succeeded" | "Failed"));
        let mut ips: Vec<IpAddr> = Vec::new();
        if let Some(status) = status.filter(|_| !finished) {
            let listed = status.pod_ips.iter().flatten().map(|ip| ip.ip.as_str());
            for ip in
                status.pod_ip.as_deref().into_iter().chain(listed).filter_map(|ip| ip.parse::<IpAddr>().ok())
            {
                if !ips.iter().any(|known: &IpAddr| known.is_ipv4() == ip.is_ipv4()) {
                    ips.push(ip);
                }
            }
        }
        let ready = status
            .and_then(|s| s.conditions.as_ref())
            .and_then(|c| c.iter().find(|c| c.type_ == "Ready"))
            .is_some_and(|c| c.status == "True");
        let container_ports = pod
            .spec
            .iter()
            .flat_map(|spec| &spec.containers)
            .flat_map(|c| c.ports.iter().flatten())
            .filter_map(|p| Some((p.name.clone()?, p.container_port, protocol_or_tcp(p.protocol.as_ref()))))
            .collect();
        Self {
            labels: pod.metadata.labels.clone().unwrap_or_default(),
            ips,
            ready,
            terminating: pod.metadata.deletion_timestamp.is_some(),
            node_name: pod.spec.as_ref().and_then(|s| s.node_name.clone()),
            container_ports,
        }
    }

    fn selected_by(&self, service: &Selecting) -> bool {
        service.selector.iter().all(|(key, value)| self.labels.get(key) == Some(value))
    }

    /// The port a Service port's targetPort means on this Pod, if it has it.
    fn target_port(&self, target: Option<&IntOrString>, port: i32, protocol: &str) -> Option<i32> {
        let number = match target {
            None => port,
            Some(IntOrString::Int(number)) => *number,
            Some(IntOrString::String(name)) => {
                self.container_ports.iter().find(|(n, _, p)| n == name && p == protocol)?.1
            }
        };
        u16::try_from(number).ok().filter(|n| *n != 0).map(i32::from)
    }
}

type Name = (String, String);

/// The slices lb makes of Pods, kept up to date with the Services and Pods it is shown.
#[derive(Debug, Default)]
pub struct PodEndpoints {
    services: HashMap<Name, Selecting>,
    /// Services with a selector, by namespace.
    services_in: HashMap<String, BTreeSet<String>>,
    pods: HashMap<Name, PodRecord>,
    pods_in: HashMap<String, BTreeSet<String>>,
    /// Pods each Service has a slice for, and of which family.
    made: HashMap<Name, BTreeSet<(String, IpFamily)>>,
}

fn slice_name(service: &str, pod: &str, family: IpFamily) -> String {
    match family {
        IpFamily::V4 => format!("lb_pods_{service}_{pod}"),
        IpFamily::V6 => format!("lb_pods_{service}_{pod}_ipv6"),
    }
}

fn slice_of(
    namespace: &str,
    service: &str,
    selecting: &Selecting,
    pod_name: &str,
    pod: &PodRecord,
    family: IpFamily,
) -> Option<EndpointSlice> {
    let ip = pod.ips.iter().find(|ip| IpFamily::of(ip) == family)?;
    let ports = selecting
        .ports
        .iter()
        .filter_map(|(name, port, target, protocol)| {
            let number = pod.target_port(target.as_ref(), *port, protocol)?;
            Some(EndpointPort {
                name: Some(name.clone()),
                port: Some(number),
                protocol: Some(protocol.clone()),
                ..Default::default()
            })
        })
        .collect();
    Some(EndpointSlice {
        metadata: ObjectMeta {
            name: Some(slice_name(service, pod_name, family)),
            namespace: Some(namespace.to_string()),
            labels: Some(BTreeMap::from([(
                crate::convert::SERVICE_NAME_LABEL.to_string(),
                service.to_string(),
            )])),
            ..Default::default()
        },
        address_type: family.to_string(),
        ports: Some(ports),
        endpoints: vec![Endpoint {
            addresses: vec![ip.to_string()],
            conditions: Some(EndpointConditions {
                ready: Some(pod.ready && !pod.terminating),
                serving: Some(pod.ready),
                terminating: Some(pod.terminating),
            }),
            node_name: pod.node_name.clone(),
            ..Default::default()
        }],
    })
}

impl PodEndpoints {
    /// Takes in a change to a Service or a Pod; returns the changes to the slices made of
    /// Pods. Other kinds change nothing.
    pub fn on_change(&mut self, change: &ObjectChange) -> Vec<ObjectChange> {
        match change {
            ObjectChange::Upsert(Object::Service(service)) => {
                self.set_service(service_name(service), selecting(service))
            }
            ObjectChange::Delete(("Service", namespace, name)) => {
                self.set_service((namespace.clone(), name.clone()), None)
            }
            ObjectChange::Upsert(Object::Pod(pod)) => {
                let name = (
                    namespace_of(pod.metadata.namespace.as_ref()),
                    pod.metadata.name.clone().unwrap_or_default(),
                );
                self.set_pod(name, Some(PodRecord::of(pod)))
            }
            ObjectChange::Delete(("Pod", namespace, name)) => {
                self.set_pod((namespace.clone(), name.clone()), None)
            }
            _ => Vec::new(),
        }
    }

    fn set_service(&mut self, name: Name, selecting: Option<Selecting>) -> Vec<ObjectChange> {
        if self.services.get(&name) == selecting.as_ref() {
            return Vec::new();
        }
        match &selecting {
            Some(s) => {
                self.services.insert(name.clone(), s.clone());
                self.services_in.entry(name.0.clone()).or_default().insert(name.1.clone());
            }
            None => {
                self.services.remove(&name);
                if let Some(names) = self.services_in.get_mut(&name.0) {
                    names.remove(&name.1);
                }
            }
        }
        let pods: Vec<String> = self.pods_in.get(&name.0).into_iter().flatten().cloned().collect();
        let mut changes = Vec::new();
        for pod in pods {
            changes.extend(self.remake(&name, &pod));
        }
        // Slices of Pods that are gone from the namespace's list.
        let stale: BTreeSet<String> =
            self.made.get(&name).into_iter().flatten().map(|(pod, _)| pod.clone()).collect();
        for pod in stale {
            changes.extend(self.remake(&name, &pod));
        }
        changes
    }

    fn set_pod(&mut self, name: Name, record: Option<PodRecord>) -> Vec<ObjectChange> {
        let old = match &record {
            Some(record) => self.pods.insert(name.clone(), record.clone()),
            None => self.pods.remove(&name),
        };
        if old == record {
            return Vec::new();
        }
        match &record {
            Some(_) => {
                self.pods_in.entry(name.0.clone()).or_default().insert(name.1.clone());
            }
            None => {
                if let Some(pods) = self.pods_in.get_mut(&name.0) {
                    pods.remove(&name.1);
                }
            }
        }
        let services: Vec<Name> = self
            .services_in
            .get(&name.0)
            .into_iter()
            .flatten()
            .map(|service| (name.0.clone(), service.clone()))
            .filter(|service| {
                let selecting = &self.services[service];
                old.as_ref().is_some_and(|p| p.selected_by(selecting))
                    || record.as_ref().is_some_and(|p| p.selected_by(selecting))
            })
            .collect();
        services.iter().flat_map(|service| self.remake(service, &name.1)).collect()
    }

    /// The slices (one per family) of one Service for one Pod, made again: for each, an
    /// upsert, a delete, or nothing.
    fn remake(&mut self, service: &Name, pod_name: &str) -> Vec<ObjectChange> {
        let mut changes = Vec::new();
        for family in [IpFamily::V4, IpFamily::V6] {
            let slice =
                match (self.services.get(service), self.pods.get(&(service.0.clone(), pod_name.to_string())))
                {
                    (Some(selecting), Some(pod)) if pod.selected_by(selecting) => {
                        slice_of(&service.0, &service.1, selecting, pod_name, pod, family)
                    }
                    _ => None,
                };
            let made = self.made.entry(service.clone()).or_default();
            let made_key = (pod_name.to_string(), family);
            match slice {
                Some(slice) => {
                    made.insert(made_key);
                    changes.push(ObjectChange::Upsert(Object::EndpointSlice(Box::new(slice))));
                }
                None => {
                    let had = made.remove(&made_key);
                    if made.is_empty() {
                        self.made.remove(service);
                    }
                    if had {
                        let key: ObjectKey =
                            ("EndpointSlice", service.0.clone(), slice_name(&service.1, pod_name, family));
                        changes.push(ObjectChange::Delete(key));
                    }
                }
            }
        }
        changes
    }
}

fn service_name(service: &Service) -> Name {
    (namespace_of(service.metadata.namespace.as_ref()), service.metadata.name.clone().unwrap_or_default())
}

/// What a Service selects Pods by, if it does (no selector: endpoints are managed by hand).
fn selecting(service: &Service) -> Option<Selecting> {
    let spec = service.spec.as_ref()?;
    let selector = spec.selector.clone().filter(|s| !s.is_empty())?;
    let ports = spec
        .ports
        .iter()
        .flatten()
        .map(|p| {
            (
                p.name.clone().unwrap_or_default(),
                p.port,
                p.target_port.clone(),
                protocol_or_tcp(p.protocol.as_ref()),
            )
        })
        .collect();
    Some(Selecting { selector, ports })
}

/// Every slice a whole set of Services and Pods gives, for a conversion from scratch.
pub fn slices_of(objects: &[Object]) -> Vec<EndpointSlice> {
    let mut controller = PodEndpoints::default();
    let mut slices: BTreeMap<ObjectKey, EndpointSlice> = BTreeMap::new();
    for object in objects {
        for change in controller.on_change(&ObjectChange::Upsert(object.clone())) {
            match change {
                ObjectChange::Upsert(Object::EndpointSlice(slice)) => {
                    slices.insert(Object::EndpointSlice(slice.clone()).key(), *slice);
                }
                ObjectChange::Delete(key) => {
                    slices.remove(&key);
                }
                _ => {}
            }
        }
    }
    slices.into_values().collect()
}
