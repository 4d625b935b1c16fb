//! ClusterIP allocation for manifests mode, where no API server assigns them: a Service without
//! a clusterIP gets a free one from `--service-cluster-ip-range`, kept across restarts in a
//! state file. As the API server would, it rejects an explicit clusterIP outside the range or
//! already held by another Service, and refuses to change a Service's clusterIP in place.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use ipnet::Ipv4Net;
use k8s_openapi::api::core::v1::Service;

use crate::model::ObjectError;
use crate::source::namespace_of;

type ServiceName = (String, String);

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("reading ClusterIP allocations from {path}: {message}")]
    Read { path: PathBuf, message: String },
    #[error("writing ClusterIP allocations to {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

#[derive(Debug, Clone)]
pub struct ClusterIpAllocator {
    range: Ipv4Net,
    /// Service -> its ClusterIP, for every Service that has one.
    assigned: BTreeMap<ServiceName, Ipv4Addr>,
    /// Who holds each address: every check is a lookup.
    holders: BTreeMap<Ipv4Addr, ServiceName>,
    /// Where the search for a free address starts: after the last one handed out, so handing
    /// out the whole range is one pass over it.
    cursor: u32,
    /// Whether allocations changed since `take_changed`.
    changed: bool,
}

pub fn name_of(service: &Service) -> ServiceName {
    (namespace_of(service.metadata.namespace.as_ref()), service.metadata.name.clone().unwrap_or_default())
}

/// The clusterIP a manifest asks for: `Some("")` when it leaves it to the allocator, `None`
/// when the Service takes none (headless, ExternalName).
fn requested(service: &Service) -> Option<&str> {
    let spec = service.spec.as_ref()?;
    if spec.type_.as_deref() == Some("ExternalName") {
        return None;
    }
    let ip = spec.cluster_ip.as_deref().or_else(|| spec.cluster_ips.as_ref()?.first().map(String::as_str));
    match ip {
        Some("None") => None,
        Some(ip) => Some(ip),
        None => Some(""),
    }
}

/// Whether the Service asks for an address of its own choosing.
pub fn asks_for_address(service: &Service) -> bool {
    requested(service).is_some_and(|ip| !ip.is_empty())
}

fn set_cluster_ip(service: &mut Service, ip: Ipv4Addr) {
    if let Some(spec) = service.spec.as_mut() {
        spec.cluster_ip = Some(ip.to_string());
        spec.cluster_ips = Some(vec![ip.to_string()]);
    }
}

/// What became of a Service given to `admit`.
#[derive(Debug, PartialEq, Eq)]
pub enum Admission {
    /// It has its address (filled in when allocated).
    Admitted,
    /// It keeps the address it had, not the one it asks for now.
    Kept(ObjectError),
    /// It cannot have the address it asks for, or none is free: left out until that changes.
    Rejected(ObjectError),
}

impl ClusterIpAllocator {
    pub fn new(range: Ipv4Net) -> Self {
        Self { range, assigned: BTreeMap::new(), holders: BTreeMap::new(), cursor: 0, changed: false }
    }

    pub fn assigned(&self) -> &BTreeMap<ServiceName, Ipv4Addr> {
        &self.assigned
    }

    fn hold(&mut self, name: ServiceName, ip: Ipv4Addr) {
        self.holders.insert(ip, name.clone());
        if self.assigned.insert(name, ip) != Some(ip) {
            self.changed = true;
        }
    }

    /// Whether allocations changed since the last call (so they need saving).
    pub fn take_changed(&mut self) -> bool {
        std::mem::take(&mut self.changed)
    }

    /// Gives a Service its ClusterIP: the one it asks for if it may have it, else the one it
    /// was given before, else a free one (filled into the object).
    pub fn admit(&mut self, service: &mut Service) -> Admission {
        let name = name_of(service);
        let error = |problem: String| ObjectError {
            kind: "Service",
            namespace: name.0.clone(),
            name: name.1.clone(),
            problem,
        };
        match requested(service) {
            None => {
                self.release(&name);
                Admission::Admitted
            }
            Some("") => {
                let families = service.spec.as_ref().and_then(|spec| spec.ip_families.as_ref());
                if families.and_then(|f| f.first()).is_some_and(|family| family == "IPv6") {
                    return Admission::Rejected(error(
                        "ipFamilies asks for an IPv6 ClusterIP, and manifests mode allocates IPv4 ones \
                         only: give spec.clusterIP (or spec.clusterIPs for dual-stack)"
                            .into(),
                    ));
                }
                if let Some(ip) = self.assigned.get(&name).copied() {
                    set_cluster_ip(service, ip);
                    return Admission::Admitted;
                }
                match self.free_address() {
                    Some(ip) => {
                        self.hold(name, ip);
                        set_cluster_ip(service, ip);
                        Admission::Admitted
                    }
                    None => Admission::Rejected(error(format!(
                        "no free ClusterIP left in --service-cluster-ip-range {}",
                        self.range
                    ))),
                }
            }
            Some(ip) => {
                let Ok(ip) = ip.parse::<Ipv4Addr>() else {
                    return Admission::Admitted; // conversion reports addresses that do not parse
                };
                if let Some(previous) = self.assigned.get(&name).copied().filter(|previous| *previous != ip) {
                    set_cluster_ip(service, previous);
                    return Admission::Kept(error(format!(
                        "spec.clusterIP cannot change from {previous} to {ip}; delete the Service to give it another; keeping {previous}"
                    )));
                }
                if !self.range.contains(&ip) {
                    return Admission::Rejected(error(format!(
                        "spec.clusterIP {ip} is outside --service-cluster-ip-range {}",
                        self.range
                    )));
                }
                if let Some(owner) = self.holders.get(&ip).filter(|owner| **owner != name) {
                    return Admission::Rejected(error(format!(
                        "spec.clusterIP {ip} is already used by Service {}/{}",
                        owner.0, owner.1
                    )));
                }
                self.hold(name, ip);
                Admission::Admitted
            }
        }
    }

    /// Forgets a Service that is gone: its address is free again. Returns whether it held one.
    pub fn release(&mut self, name: &ServiceName) -> bool {
        match self.assigned.remove(name) {
            Some(ip) => {
                self.holders.remove(&ip);
                self.changed = true;
                true
            }
            None => false,
        }
    }

    /// A free address: the first after the last one handed out (skipping the network address,
    /// as the API server does), wrapping around once.
    fn free_address(&mut self) -> Option<Ipv4Addr> {
        let network = u32::from(self.range.network());
        let size = 1u64 << (32 - self.range.prefix_len());
        let last = network as u64 + size - 1;
        // Hosts only: not the network address, nor the broadcast one (as `hosts()` gives).
        let (first, end) = if size > 2 { (network as u64 + 1, last - 1) } else { (network as u64, last) };
        let span = end - first + 1;
        for step in 0..span {
            let candidate = first + (u64::from(self.cursor) + step) % span;
            let ip = Ipv4Addr::from(candidate as u32);
            if !self.holders.contains_key(&ip) {
                self.cursor = ((candidate - first + 1) % span) as u32;
                return Some(ip);
            }
        }
        None
    }

    /// Gives a whole set of Services their ClusterIPs, explicit addresses first (so an
    /// allocation never takes one a manifest asks for), and forgets Services that are not in
    /// the set. Rejected Services are reported and left out of `services`.
    pub fn assign(&mut self, services: &mut Vec<Service>) -> Vec<ObjectError> {
        let present: BTreeSet<ServiceName> = services.iter().map(name_of).collect();
        let gone: Vec<ServiceName> =
            self.assigned.keys().filter(|name| !present.contains(*name)).cloned().collect();
        gone.iter().for_each(|name| {
            self.release(name);
        });
        services.sort_by_key(|service| (!asks_for_address(service), name_of(service)));
        let mut errors = Vec::new();
        services.retain_mut(|service| match self.admit(service) {
            Admission::Admitted => true,
            Admission::Kept(error) => {
                errors.push(error);
                true
            }
            Admission::Rejected(error) => {
                errors.push(error);
                false
            }
        });
        services.sort_by_key(name_of);
        errors
    }

    /// Loads allocations saved by `save`; a missing file means none yet.
    pub fn load(range: Ipv4Net, path: &Path) -> Result<Self, StateError> {
        let mut allocator = Self::new(range);
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(allocator),
            Err(error) => return Err(StateError::Read { path: path.into(), message: error.to_string() }),
        };
        let saved: BTreeMap<String, Ipv4Addr> = serde_json::from_str(&text)
            .map_err(|e| StateError::Read { path: path.into(), message: e.to_string() })?;
        for (name, ip) in saved {
            if let Some((namespace, name)) = name.split_once('/') {
                allocator.hold((namespace.to_string(), name.to_string()), ip);
            }
        }
        Ok(allocator)
    }

    /// Saves the allocations (write to a temporary file, then rename: never half a file).
    pub fn save(&self, path: &Path) -> Result<(), StateError> {
        let saved: BTreeMap<String, Ipv4Addr> = self
            .assigned
            .iter()
            .map(|((namespace, name), ip)| (format!("{namespace}/{name}"), *ip))
            .collect();
        let text = serde_json::to_string_pretty(&saved).expect("a map of strings serializes");
        let write = |source| StateError::Write { path: path.into(), source };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(write)?;
        }
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, text).map_err(write)?;
        std::fs::rename(&tmp, path).map_err(write)
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::ServiceSpec;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    use super::*;

    fn service(name: &str, cluster_ip: Option<&str>) -> Service {
        Service {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("default".into()),
                ..Default::default()
            },
            spec: Some(ServiceSpec { cluster_ip: cluster_ip.map(String::from), ..Default::default() }),
            ..Default::default()
        }
    }

    fn ips(services: &[Service]) -> Vec<(String, String)> {
        services
            .iter()
            .map(|s| {
                (
                    s.metadata.name.clone().unwrap(),
                    s.spec.as_ref().unwrap().cluster_ip.clone().unwrap_or_default(),
                )
            })
            .collect()
    }

    fn range() -> Ipv4Net {
        "10.96.0.0/29".parse().unwrap()
    }

    #[test]
    fn allocates_skipping_explicit_addresses_and_keeps_them() {
        let mut allocator = ClusterIpAllocator::new(range());
        let mut services =
            vec![service("b", None), service("a", Some("10.96.0.1")), service("h", Some("None"))];
        assert!(allocator.assign(&mut services).is_empty());
        assert_eq!(
            ips(&services),
            [("a".into(), "10.96.0.1".into()), ("b".into(), "10.96.0.2".into()), ("h".into(), "None".into())]
        );
        // Same objects again (say after a restart with the saved state): same answers.
        let mut again = vec![service("a", Some("10.96.0.1")), service("b", None), service("c", None)];
        assert!(allocator.assign(&mut again).is_empty());
        assert_eq!(ips(&again)[1], ("b".into(), "10.96.0.2".into()));
        assert_eq!(ips(&again)[2], ("c".into(), "10.96.0.3".into()));
    }

    #[test]
    fn rejects_out_of_range_taken_and_changed_addresses() {
        let mut allocator = ClusterIpAllocator::new(range());
        let mut services = vec![
            service("a", Some("10.96.0.3")),
            service("b", Some("10.96.0.3")),
            service("c", Some("10.97.0.1")),
        ];
        let errors: Vec<String> = allocator.assign(&mut services).iter().map(|e| e.to_string()).collect();
        assert_eq!(
            errors,
            [
                "Service default/b: spec.clusterIP 10.96.0.3 is already used by Service default/a",
                "Service default/c: spec.clusterIP 10.97.0.1 is outside --service-cluster-ip-range 10.96.0.0/29",
            ]
        );
        assert_eq!(ips(&services), [("a".into(), "10.96.0.3".into())]);

        let mut changed = vec![service("a", Some("10.96.0.4"))];
        let errors = allocator.assign(&mut changed);
        assert!(errors[0].to_string().contains("cannot change from 10.96.0.3 to 10.96.0.4"), "{errors:?}");
        assert_eq!(ips(&changed), [("a".into(), "10.96.0.3".into())], "the old address stays");
    }

    #[test]
    fn a_full_range_is_an_error_and_deleted_services_free_their_address() {
        let mut allocator = ClusterIpAllocator::new("10.96.0.0/30".parse().unwrap()); // 2 hosts
        let mut services = vec![service("a", None), service("b", None), service("c", None)];
        let errors = allocator.assign(&mut services);
        assert!(errors[0].to_string().contains("no free ClusterIP"), "{errors:?}");
        let mut fewer = vec![service("b", None), service("c", None)];
        assert!(allocator.assign(&mut fewer).is_empty(), "a's address was freed");
    }

    #[test]
    fn state_survives_a_save_and_load() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state/cluster-ips.json");
        let mut allocator = ClusterIpAllocator::new(range());
        allocator.assign(&mut vec![service("a", None), service("b", None)]);
        allocator.save(&path).unwrap();
        let loaded = ClusterIpAllocator::load(range(), &path).unwrap();
        assert_eq!(loaded.assigned(), allocator.assigned());
        assert!(
            ClusterIpAllocator::load(range(), &dir.path().join("missing.json"))
                .unwrap()
                .assigned()
                .is_empty()
        );
    }
}
