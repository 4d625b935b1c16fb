//! The desired state table: what the data path should hold, kept up to date one Service at a
//! time.
//!
//! Inputs arrive already converted: a Service's frontend spec, the endpoints one object lists
//! for a Service, this node's zone, the node's addresses. Each names the Services it affects;
//! only those are converted into frontends again (`take_changes`), and only the frontends
//! that changed are handed on, so a change costs what it touches, not what the cluster holds.
//!
//! Two Services may claim the same frontend address: the first by namespace and name owns
//! it, as a conversion of every Service in name order would decide; when the owner lets go,
//! the next claimant takes it over.

pub mod pipeline;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;

use crate::convert::topology::NodeContext;
use crate::convert::{LbAlgorithm, ServiceFrontends, SliceEndpoints, service_frontends};
use crate::model::{DesiredState, Frontend, FrontendKey, HealthCheck, L4Addr, ObjectError, Scope};

/// A Service's namespace and name.
pub type ServiceName = (String, String);

/// The object a set of endpoints comes from. Sorted, they give the order in which an
/// endpoint listed twice is taken from its first listing.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EndpointsOrigin {
    /// "EndpointSlice" or "Endpoints".
    pub kind: &'static str,
    pub namespace: String,
    pub name: String,
}

/// What the table's conversion needs to know of this proxy.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TableConfig {
    /// This node's name: endpoints there are local.
    pub node_name: Option<String>,
    pub lb_algorithm: LbAlgorithm,
}

/// A set kept as a sorted vector: almost every one holds a single element, where a BTreeSet
/// would allocate a whole node (hundreds of bytes, times 100 000 Services).
#[derive(Debug)]
struct SortedSet<T>(Vec<T>);

impl<T> Default for SortedSet<T> {
    fn default() -> Self {
        Self(Vec::new())
    }
}

impl<T: Ord> SortedSet<T> {
    fn insert(&mut self, value: T) {
        if let Err(at) = self.0.binary_search(&value) {
            self.0.insert(at, value);
        }
    }

    fn remove(&mut self, value: &T) {
        if let Ok(at) = self.0.binary_search(value) {
            self.0.remove(at);
        }
    }

    fn first(&self) -> Option<&T> {
        self.0.first()
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn iter(&self) -> std::slice::Iter<'_, T> {
        self.0.iter()
    }
}

/// What the table knows of one Service.
#[derive(Debug, Default)]
struct ServiceEntry {
    /// The Service's frontend spec; `None` once it is gone (or not translated), while
    /// endpoints may still name it.
    spec: Option<Arc<ServiceFrontends>>,
    /// Origins of the endpoints listed for it, in listing order.
    endpoints: SortedSet<EndpointsOrigin>,
    /// Frontend addresses it claims (those of its external-scope frontends), owned or not.
    claims: Vec<L4Addr>,
    /// The healthCheckNodePort it claims.
    health_check: Option<u16>,
}

impl ServiceEntry {
    fn is_empty(&self) -> bool {
        self.spec.is_none()
            && self.endpoints.is_empty()
            && self.claims.is_empty()
            && self.health_check.is_none()
    }
}

/// What `take_changes` changed.
#[derive(Debug, Default, PartialEq)]
pub struct Changes {
    /// Frontends added, changed or removed in `desired()`.
    pub frontends: BTreeSet<FrontendKey>,
    /// Whether `desired().health_checks` changed.
    pub health_checks: bool,
    /// Services converted again.
    pub services: usize,
    /// Conflicts found: a frontend address or health-check port another Service owns.
    pub errors: Vec<ObjectError>,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        self.frontends.is_empty() && !self.health_checks && self.errors.is_empty()
    }
}

/// Changes taken in since the last sync, as kube-proxy's change trackers count them.
#[derive(Debug, Default, Clone)]
pub struct ChangeCounts {
    pub services: u64,
    pub endpoints: u64,
    /// The `endpoints.kubernetes.io/last-change-trigger-time` of each endpoints object that
    /// changed: when the change that led to it happened (a pod became ready, say), with the
    /// object's address family.
    pub trigger_times: Vec<(crate::model::IpFamily, std::time::SystemTime)>,
}

/// The desired state, and what it is made from.
#[derive(Debug, Default)]
pub struct DesiredTable {
    config: TableConfig,
    zone: Option<String>,
    node_addresses: Vec<IpAddr>,
    services: HashMap<ServiceName, ServiceEntry>,
    endpoints: HashMap<EndpointsOrigin, (ServiceName, Arc<Vec<SliceEndpoints>>)>,
    /// Services with node ports: what a change of the node's addresses touches.
    with_node_ports: HashSet<ServiceName>,
    /// Claimants of each frontend address, the owner first.
    owners: HashMap<L4Addr, SortedSet<ServiceName>>,
    /// Claimants of each health-check node port, the owner first.
    health_owners: BTreeMap<u16, SortedSet<ServiceName>>,
    desired: DesiredState,
    dirty: BTreeSet<ServiceName>,
    health_checks_changed: bool,
}

impl DesiredTable {
    pub fn new(config: TableConfig) -> Self {
        Self { config, ..Self::default() }
    }

    /// The desired state as of the last `take_changes`.
    pub fn desired(&self) -> &DesiredState {
        &self.desired
    }

    /// Whether inputs changed since the last `take_changes`.
    pub fn has_pending(&self) -> bool {
        !self.dirty.is_empty() || self.health_checks_changed
    }

    /// A Service's frontend spec (`None`: gone, or not translated).
    /// Returns whether anything changed.
    pub fn set_service(&mut self, name: ServiceName, spec: Option<ServiceFrontends>) -> bool {
        let entry = self.services.entry(name.clone()).or_default();
        let spec = spec.map(Arc::new);
        if entry.spec == spec {
            return false;
        }
        let node_ports = spec.as_ref().is_some_and(|s| s.ports.iter().any(|p| p.node_port.is_some()));
        entry.spec = spec;
        if node_ports {
            self.with_node_ports.insert(name.clone());
        } else {
            self.with_node_ports.remove(&name);
        }
        self.dirty.insert(name);
        true
    }

    /// The endpoints one object lists (an EndpointSlice: one set; v1 Endpoints: one per
    /// subset), for the Service they name; `None` once the object is gone. Returns whether
    /// anything changed.
    pub fn set_endpoints(
        &mut self,
        origin: EndpointsOrigin,
        endpoints: Option<(ServiceName, Vec<SliceEndpoints>)>,
    ) -> bool {
        let previous = self.endpoints.remove(&origin);
        if let Some((service, old)) = &previous
            && let Some((new_service, new)) = &endpoints
            && service == new_service
            && old.as_slice() == new.as_slice()
        {
            self.endpoints.insert(origin, previous.expect("matched above"));
            return false;
        }
        let changed = previous.is_some() || endpoints.is_some();
        if let Some((service, _)) = previous {
            if let Some(entry) = self.services.get_mut(&service) {
                entry.endpoints.remove(&origin);
            }
            self.dirty.insert(service);
        }
        if let Some((service, sets)) = endpoints {
            self.services.entry(service.clone()).or_default().endpoints.insert(origin.clone());
            self.endpoints.insert(origin, (service.clone(), Arc::new(sets)));
            self.dirty.insert(service);
        }
        changed
    }

    /// This node's `topology.kubernetes.io/zone`: topology hints are read against it.
    pub fn set_zone(&mut self, zone: Option<String>) {
        if self.zone != zone {
            self.zone = zone;
            self.dirty.extend(self.services.keys().cloned());
        }
    }

    /// The node addresses NodePort frontends listen on.
    pub fn set_node_addresses(&mut self, addresses: Vec<IpAddr>) {
        if self.node_addresses != addresses {
            self.node_addresses = addresses;
            self.dirty.extend(self.with_node_ports.iter().cloned());
        }
    }

    pub fn node_addresses(&self) -> &[IpAddr] {
        &self.node_addresses
    }

    /// Converts every Service an input touched since the last call and updates the desired
    /// state; returns what changed.
    pub fn take_changes(&mut self) -> Changes {
        let mut changes =
            Changes { health_checks: std::mem::take(&mut self.health_checks_changed), ..Default::default() };
        while let Some(name) = self.dirty.pop_first() {
            changes.services += 1;
            self.convert(&name, &mut changes);
        }
        changes.health_checks |= std::mem::take(&mut self.health_checks_changed);
        changes
    }

    /// Converts one Service again and installs what it owns.
    fn convert(&mut self, name: &ServiceName, changes: &mut Changes) {
        let Some(entry) = self.services.get(name) else { return };
        let node = NodeContext { node_name: self.config.node_name.as_deref(), zone: self.zone.as_deref() };
        let (frontends, health_check) = match &entry.spec {
            None => (Vec::new(), None),
            Some(spec) => {
                let sets: Vec<&SliceEndpoints> = entry
                    .endpoints
                    .iter()
                    .filter_map(|origin| self.endpoints.get(origin))
                    .flat_map(|(_, sets)| sets.iter())
                    .collect();
                let frontends =
                    service_frontends(spec, &sets, &node, &self.node_addresses, self.config.lb_algorithm);
                let health_check = spec.health_check_node_port.map(|port| {
                    (
                        port,
                        HealthCheck {
                            namespace: name.0.clone(),
                            name: name.1.clone(),
                            local_endpoints: crate::convert::local_endpoint_count(&sets, &node),
                        },
                    )
                });
                (frontends, health_check)
            }
        };

        // By address, in conversion order: the external scope decides who owns an address; a
        // Service claiming one address twice keeps its first frontend there.
        let mut by_address: BTreeMap<L4Addr, Vec<Frontend>> = BTreeMap::new();
        let mut order: Vec<L4Addr> = Vec::new();
        for frontend in frontends {
            let address = frontend.address;
            match (frontend.scope, by_address.get_mut(&address)) {
                (Scope::External, None) => {
                    order.push(address);
                    by_address.insert(address, vec![frontend]);
                }
                (Scope::External, Some(_)) => changes.errors.push(conflict(name, &address.to_string(), name)),
                // The in-cluster scope follows its address's external one (the same Service
                // port's; of two, the later).
                (Scope::Internal, Some(at)) if at[0].service == frontend.service => {
                    at.retain(|f| f.scope != Scope::Internal);
                    at.push(frontend);
                }
                (Scope::Internal, _) => {}
            }
        }

        let entry = self.services.get_mut(name).expect("looked up above");
        let old_claims = std::mem::replace(&mut entry.claims, order.clone());
        let old_health_check =
            std::mem::replace(&mut entry.health_check, health_check.as_ref().map(|(p, _)| *p));
        let remove_entry = entry.is_empty();

        for address in old_claims.iter().filter(|a| !by_address.contains_key(a)) {
            self.release(name, *address, changes);
        }
        for address in order {
            let frontends = by_address.remove(&address).expect("grouped above");
            let claimants = self.owners.entry(address).or_default();
            let previous_owner = claimants.first().cloned();
            claimants.insert(name.clone());
            let owner = claimants.first().expect("just inserted").clone();
            if owner != *name {
                changes.errors.push(conflict(name, &address.to_string(), &owner));
                continue;
            }
            if let Some(previous) = previous_owner.filter(|p| p != name) {
                changes.errors.push(conflict(&previous, &address.to_string(), name));
            }
            self.install(address, frontends, changes);
        }

        if let Some(port) =
            old_health_check.filter(|port| Some(*port) != health_check.as_ref().map(|(p, _)| *p))
        {
            self.release_health_check(name, port);
        }
        if let Some((port, check)) = health_check {
            let claimants = self.health_owners.entry(port).or_default();
            claimants.insert(name.clone());
            if claimants.first() == Some(name) {
                if self.desired.health_checks.get(&port) != Some(&check) {
                    self.desired.health_checks.insert(port, check);
                    self.health_checks_changed = true;
                }
            } else {
                let owner = claimants.first().expect("just inserted").clone();
                changes.errors.push(health_check_conflict(name, port, &owner));
            }
        }
        if remove_entry {
            self.services.remove(name);
        }
    }

    /// Puts an owner's frontends at `address` (both scopes) into the desired state.
    fn install(&mut self, address: L4Addr, frontends: Vec<Frontend>, changes: &mut Changes) {
        for scope in [Scope::External, Scope::Internal] {
            let key = FrontendKey { address, scope };
            match frontends.iter().find(|f| f.scope == scope) {
                Some(frontend) => {
                    if self.desired.frontends.get(&key) != Some(frontend) {
                        self.desired.frontends.insert(key, frontend.clone());
                        changes.frontends.insert(key);
                    }
                }
                None => {
                    if self.desired.frontends.remove(&key).is_some() {
                        changes.frontends.insert(key);
                    }
                }
            }
        }
    }

    /// `name` no longer claims `address`: if it owned it, the next claimant takes it over.
    fn release(&mut self, name: &ServiceName, address: L4Addr, changes: &mut Changes) {
        let Some(claimants) = self.owners.get_mut(&address) else { return };
        let was_owner = claimants.first() == Some(name);
        claimants.remove(name);
        let next = claimants.first().cloned();
        if claimants.is_empty() {
            self.owners.remove(&address);
        }
        if !was_owner {
            return;
        }
        for scope in [Scope::External, Scope::Internal] {
            if self.desired.frontends.remove(&FrontendKey { address, scope }).is_some() {
                changes.frontends.insert(FrontendKey { address, scope });
            }
        }
        if let Some(next) = next {
            self.dirty.insert(next);
        }
    }

    fn release_health_check(&mut self, name: &ServiceName, port: u16) {
        let Some(claimants) = self.health_owners.get_mut(&port) else { return };
        let was_owner = claimants.first() == Some(name);
        claimants.remove(name);
        let next = claimants.first().cloned();
        if claimants.is_empty() {
            self.health_owners.remove(&port);
        }
        if was_owner {
            self.desired.health_checks.remove(&port);
            self.health_checks_changed = true;
            if let Some(next) = next {
                self.dirty.insert(next);
            }
        }
    }

    /// Every Service the table knows (with a spec).
    pub fn services(&self) -> impl Iterator<Item = (&ServiceName, &ServiceFrontends)> {
        self.services.iter().filter_map(|(name, entry)| Some((name, entry.spec.as_deref()?)))
    }
}

fn conflict(name: &ServiceName, frontend: &str, owner: &ServiceName) -> ObjectError {
    ObjectError {
        kind: "Service",
        namespace: name.0.clone(),
        name: name.1.clone(),
        problem: format!("frontend {frontend} is already used by Service {}/{}; ignored", owner.0, owner.1),
    }
}

fn health_check_conflict(name: &ServiceName, port: u16, owner: &ServiceName) -> ObjectError {
    ObjectError {
        kind: "Service",
        namespace: name.0.clone(),
        name: name.1.clone(),
        problem: format!(
            "healthCheckNodePort {port} is already used by Service {}/{}; ignored",
            owner.0, owner.1
        ),
    }
}
