//! Changes to Kubernetes objects in, the desired state table's inputs out: each object is
//! checked and converted once, when it arrives, and only its own record in the table changes.

use std::net::IpAddr;
use std::time::SystemTime;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use crate::convert::{
    self, EndpointsSource, NodeRecord, ProxyConfig, is_proxied_here, labels_proxied_here, parse_endpoints,
    parse_service, parse_slice,
};
use crate::model::{IpFamily, ObjectError};
use crate::source::{Object, ObjectChange};
use crate::state::{ChangeCounts, Changes, DesiredTable, EndpointsOrigin, TableConfig};

/// What an object that fails its checks does to the version already in the table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnInvalid {
    /// It goes: the API server's objects are what the cluster says, and lb cannot use this one.
    Drop,
    /// It stays: a manifest edited into something invalid is refused, as the API server would
    /// refuse the update, and its last good version stays in force.
    KeepLast,
}

pub struct Pipeline {
    table: DesiredTable,
    config: ProxyConfig,
    on_invalid: OnInvalid,
    node: Option<NodeRecord>,
    /// Service and endpoints changes since `take_change_counts`, as kube-proxy counts them.
    counts: ChangeCounts,
    /// What is taken in but not served in full (a Service's SCTP ports), since `take_warnings`.
    warnings: Vec<ObjectError>,
    /// Endpoints changes whose trigger time is earlier are not timed.
    started: SystemTime,
    /// This node's Node object was deleted (and not created again).
    node_deleted: bool,
}

impl Pipeline {
    pub fn new(config: ProxyConfig, on_invalid: OnInvalid) -> Self {
        let table = DesiredTable::new(TableConfig {
            node_name: config.node_name.clone(),
            lb_algorithm: config.lb_algorithm,
        });
        let mut pipeline = Self {
            table,
            config,
            on_invalid,
            node: None,
            counts: ChangeCounts::default(),
            warnings: Vec::new(),
            started: SystemTime::now(),
            node_deleted: false,
        };
        let addresses = pipeline.config.node_addresses.clone();
        pipeline.table.set_node_addresses(addresses);
        pipeline
    }

    pub fn table(&self) -> &DesiredTable {
        &self.table
    }

    /// Converts what changed since the last call (see `DesiredTable::take_changes`).
    pub fn take_changes(&mut self) -> Changes {
        self.table.take_changes()
    }

    /// Objects taken in but not served in full, since the last call (each reported when it
    /// changes).
    pub fn take_warnings(&mut self) -> Vec<ObjectError> {
        std::mem::take(&mut self.warnings)
    }

    /// The changes counted since the last call.
    pub fn take_change_counts(&mut self) -> ChangeCounts {
        std::mem::take(&mut self.counts)
    }

    /// An endpoints object's change trigger time, once the change it carries is taken in.
    fn note_trigger_time(&mut self, changed: bool, metadata: &ObjectMeta, family: IpFamily) {
        // A change from before lb started is not one it was late programming (kube-proxy
        // counts only trigger times after its tracker started).
        if changed
            && let Some(time) = trigger_time(metadata)
            && time > self.started
        {
            self.counts.trigger_times.push((family, time));
        }
    }

    pub fn has_pending(&self) -> bool {
        self.table.has_pending()
    }

    /// The node addresses NodePort frontends listen on.
    pub fn set_node_addresses(&mut self, addresses: Vec<IpAddr>) {
        self.config.node_addresses = addresses.clone();
        self.table.set_node_addresses(addresses);
    }

    /// Whether this node may get new traffic from load balancers (see `NodeRecord`).
    pub fn node_eligible(&self) -> bool {
        // A deleted Node is not one to send traffic to; none seen yet (manifests mode, or before
        // the list) is.
        !self.node_deleted && self.node.as_ref().is_none_or(|node| node.eligible)
    }

    /// Takes in one change. An object that fails its checks is reported and treated as
    /// `OnInvalid` says; the others are never affected by it.
    pub fn apply(&mut self, change: ObjectChange) -> Result<(), ObjectError> {
        match change {
            ObjectChange::Upsert(Object::Service(service)) => {
                let name = (
                    crate::source::namespace_of(service.metadata.namespace.as_ref()),
                    service.metadata.name.clone().unwrap_or_default(),
                );
                if !is_proxied_here(&service, &self.config) {
                    self.counts.services += u64::from(self.table.set_service(name, None));
                    return Ok(());
                }
                match parse_service(&service) {
                    Ok(spec) => {
                        let unsupported = spec.as_ref().map(|s| s.unsupported.join("; ")).unwrap_or_default();
                        let changed = self.table.set_service(name.clone(), spec);
                        self.counts.services += u64::from(changed);
                        if changed && !unsupported.is_empty() {
                            let (namespace, name) = name;
                            self.warnings.push(ObjectError {
                                kind: "Service",
                                namespace,
                                name,
                                problem: unsupported,
                            });
                        }
                    }
                    Err(error) => {
                        if self.on_invalid == OnInvalid::Drop {
                            self.counts.services += u64::from(self.table.set_service(name, None));
                        }
                        return Err(error);
                    }
                }
            }
            ObjectChange::Delete(("Service", namespace, name)) => {
                self.counts.services += u64::from(self.table.set_service((namespace, name), None))
            }
            ObjectChange::Upsert(Object::EndpointSlice(slice)) => {
                if self.config.endpoints_source != EndpointsSource::EndpointSlices {
                    return Ok(());
                }
                let origin = EndpointsOrigin {
                    kind: "EndpointSlice",
                    namespace: crate::source::namespace_of(slice.metadata.namespace.as_ref()),
                    name: slice.metadata.name.clone().unwrap_or_default(),
                };
                if !labels_proxied_here(slice.metadata.labels.as_ref(), &self.config) {
                    self.counts.endpoints += u64::from(self.table.set_endpoints(origin, None));
                    return Ok(());
                }
                match parse_slice(&slice) {
                    Ok(parsed) => {
                        let endpoints =
                            parsed.map(|set| ((set.namespace.clone(), set.service_name.clone()), vec![set]));
                        let changed = self.table.set_endpoints(origin, endpoints);
                        self.counts.endpoints += u64::from(changed);
                        let family = if slice.address_type == "IPv6" { IpFamily::V6 } else { IpFamily::V4 };
                        self.note_trigger_time(changed, &slice.metadata, family);
                    }
                    Err(error) => {
                        if self.on_invalid == OnInvalid::Drop {
                            self.counts.endpoints += u64::from(self.table.set_endpoints(origin, None));
                        }
                        return Err(error);
                    }
                }
            }
            ObjectChange::Delete(("EndpointSlice", namespace, name)) => {
                self.counts.endpoints += u64::from(
                    self.table
                        .set_endpoints(EndpointsOrigin { kind: "EndpointSlice", namespace, name }, None),
                );
            }
            ObjectChange::Upsert(Object::Endpoints(endpoints)) => {
                if self.config.endpoints_source != EndpointsSource::Endpoints {
                    return Ok(());
                }
                let service = (
                    crate::source::namespace_of(endpoints.metadata.namespace.as_ref()),
                    endpoints.metadata.name.clone().unwrap_or_default(),
                );
                let origin = EndpointsOrigin {
                    kind: "Endpoints",
                    namespace: service.0.clone(),
                    name: service.1.clone(),
                };
                if !labels_proxied_here(endpoints.metadata.labels.as_ref(), &self.config) {
                    self.counts.endpoints += u64::from(self.table.set_endpoints(origin, None));
                    return Ok(());
                }
                match parse_endpoints(&endpoints) {
                    Ok(sets) => {
                        let family = sets
                            .iter()
                            .flat_map(|set| &set.endpoints)
                            .next()
                            .map_or(IpFamily::V4, |endpoint| IpFamily::of(&endpoint.ip));
                        let sets = (!sets.is_empty()).then_some((service, sets));
                        let changed = self.table.set_endpoints(origin, sets);
                        self.counts.endpoints += u64::from(changed);
                        self.note_trigger_time(changed, &endpoints.metadata, family);
                    }
                    Err(error) => {
                        if self.on_invalid == OnInvalid::Drop {
                            self.counts.endpoints += u64::from(self.table.set_endpoints(origin, None));
                        }
                        return Err(error);
                    }
                }
            }
            ObjectChange::Delete(("Endpoints", namespace, name)) => {
                self.counts.endpoints += u64::from(
                    self.table.set_endpoints(EndpointsOrigin { kind: "Endpoints", namespace, name }, None),
                );
            }
            ObjectChange::Upsert(Object::Node(node)) => {
                if node.metadata.name.is_some() && node.metadata.name == self.config.node_name {
                    let record = convert::parse_node(&node);
                    self.table.set_zone(record.zone.clone());
                    self.node = Some(record);
                    self.node_deleted = false;
                }
            }
            ObjectChange::Delete(("Node", _, name)) => {
                if Some(&name) == self.config.node_name.as_ref() {
                    self.node = None;
                    self.node_deleted = true;
                    self.table.set_zone(None);
                }
            }
            // Pods reach the table as the EndpointSlices `source::pods` makes of them.
            ObjectChange::Upsert(Object::Pod(_)) | ObjectChange::Delete(_) => {}
        }
        Ok(())
    }
}

/// The annotation the endpoints controllers set to when the change behind an endpoints object's
/// latest update happened (kube-proxy's network programming latency starts there).
const TRIGGER_TIME_ANNOTATION: &str = "endpoints.kubernetes.io/last-change-trigger-time";

fn trigger_time(metadata: &ObjectMeta) -> Option<SystemTime> {
    let value = metadata.annotations.as_ref()?.get(TRIGGER_TIME_ANNOTATION)?;
    let timestamp: k8s_openapi::jiff::Timestamp = value.parse().ok()?;
    Some(SystemTime::from(timestamp))
}
