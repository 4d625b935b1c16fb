//! ClusterIP allocation for manifests mode, where no API server assigns them: a Service without
//! a clusterIP gets a free one from `--service-cluster-ip-range` (one range, or an IPv4 and an
//! IPv6 one separated by a comma, as the API server takes them), of each family it asks for
//! (`ipFamilies`, `ipFamilyPolicy`), kept across restarts in a state file. As the API server
//! would, it rejects an explicit clusterIP outside its family's range or already held by another
//! Service, and refuses to change a Service's clusterIP in place.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use ipnet::IpNet;
use k8s_openapi::api::core::v1::Service;

use crate::model::{IpFamily, ObjectError};
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

/// `--service-cluster-ip-range` is one CIDR, or one of each family.
#[derive(Debug, thiserror::Error)]
#[error("--service-cluster-ip-range: {0}")]
pub struct RangeError(String);

/// Parses `--service-cluster-ip-range`: `CIDR` or `CIDR,CIDR` of two families.
pub fn parse_ranges(text: &str) -> Result<Vec<IpNet>, RangeError> {
    let ranges = text
        .split(',')
        .map(|part| part.trim().parse::<IpNet>().map(|net| net.trunc()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| RangeError(format!("{text:?} is not a CIDR or two CIDRs separated by a comma")))?;
    match ranges.as_slice() {
        [_] => Ok(ranges),
        [a, b] if a.addr().is_ipv4() != b.addr().is_ipv4() => Ok(ranges),
        _ => Err(RangeError(format!("{text:?}: give one range, or one IPv4 and one IPv6 range"))),
    }
}

/// One family's range and who holds which of its addresses.
#[derive(Debug, Clone)]
struct Pool {
    range: IpNet,
    /// Who holds each address: every check is a lookup.
    holders: BTreeMap<IpAddr, ServiceName>,
    /// Where the search for a free address starts: after the last one handed out, so handing
    /// out the whole range is one pass over it.
    cursor: u128,
}

impl Pool {
    fn family(&self) -> IpFamily {
        IpFamily::of(&self.range.addr())
    }

    /// A free address: the first after the last one handed out (skipping the network address,
    /// and an IPv4 range's broadcast one, as the API server does), wrapping around once. Ranges
    /// larger than 2^20 addresses are searched from their start only so far.
    fn free_address(&mut self) -> Option<IpAddr> {
        let (network, bits) = match self.range {
            IpNet::V4(net) => (u128::from(u32::from(net.network())), 32 - u32::from(net.prefix_len())),
            IpNet::V6(net) => (u128::from(net.network()), 128 - u32::from(net.prefix_len())),
        };
        let size = if bits >= 127 { u128::MAX } else { 1u128 << bits };
        let ipv4 = self.range.addr().is_ipv4();
        let first = if size > 2 { network + 1 } else { network };
        let end = if size > 2 && ipv4 { network + size - 2 } else { network + (size - 1) };
        let span = end - first + 1;
        for step in 0..span.min(1 << 20) {
            let candidate = first + (self.cursor + step) % span;
            let ip = if ipv4 {
                IpAddr::V4(std::net::Ipv4Addr::from(candidate as u32))
            } else {
                IpAddr::V6(std::net::Ipv6Addr::from(candidate))
            };
            if !self.holders.contains_key(&ip) {
                self.cursor = (candidate - first + 1) % span;
                return Some(ip);
            }
        }
        None
    }
}

#[derive(Debug, Clone)]
pub struct ClusterIpAllocator {
    /// One per family, the primary (the default for single-stack Services) first.
    pools: Vec<Pool>,
    /// Service -> its ClusterIPs (one per family), for every Service that has them.
    assigned: BTreeMap<ServiceName, Vec<IpAddr>>,
    /// Whether allocations changed since `take_changed`.
    changed: bool,
}

pub fn name_of(service: &Service) -> ServiceName {
    (namespace_of(service.metadata.namespace.as_ref()), service.metadata.name.clone().unwrap_or_default())
}

/// The clusterIPs a manifest asks for: empty when it leaves them to the allocator, `None` when
/// the Service takes none (headless, ExternalName).
fn requested(service: &Service) -> Option<Vec<&str>> {
    let spec = service.spec.as_ref()?;
    if spec.type_.as_deref() == Some("ExternalName") {
        return None;
    }
    let mut ips: Vec<&str> = spec.cluster_ips.iter().flatten().map(String::as_str).collect();
    if ips.is_empty() {
        ips.extend(spec.cluster_ip.as_deref());
    }
    ips.retain(|ip| !ip.is_empty());
    if ips.contains(&"None") {
        return None;
    }
    Some(ips)
}

/// Whether the Service asks for an address of its own choosing.
pub fn asks_for_address(service: &Service) -> bool {
    requested(service).is_some_and(|ips| !ips.is_empty())
}

fn set_cluster_ips(service: &mut Service, ips: &[IpAddr]) {
    if let Some(spec) = service.spec.as_mut() {
        spec.cluster_ip = ips.first().map(ToString::to_string);
        spec.cluster_ips = Some(ips.iter().map(ToString::to_string).collect());
        spec.ip_families = Some(ips.iter().map(|ip| IpFamily::of(ip).to_string()).collect());
    }
}

/// What became of a Service given to `admit`.
#[derive(Debug, PartialEq, Eq)]
pub enum Admission {
    /// It has its addresses (filled in when allocated).
    Admitted,
    /// It keeps the addresses it had, not the ones it asks for now.
    Kept(ObjectError),
    /// It cannot have the addresses it asks for, or none is free: left out until that changes.
    Rejected(ObjectError),
}

impl ClusterIpAllocator {
    /// An allocator over one range.
    pub fn new(range: impl Into<IpNet>) -> Self {
        Self::with_ranges(&[range.into()])
    }

    /// An allocator over one range, or one of each family (`parse_ranges`), the first primary.
    pub fn with_ranges(ranges: &[IpNet]) -> Self {
        let pools = ranges
            .iter()
            .map(|range| Pool { range: range.trunc(), holders: BTreeMap::new(), cursor: 0 })
            .collect();
        Self { pools, assigned: BTreeMap::new(), changed: false }
    }

    pub fn assigned(&self) -> &BTreeMap<ServiceName, Vec<IpAddr>> {
        &self.assigned
    }

    fn ranges(&self) -> String {
        self.pools.iter().map(|pool| pool.range.to_string()).collect::<Vec<_>>().join(",")
    }

    fn pool(&mut self, family: IpFamily) -> Option<&mut Pool> {
        self.pools.iter_mut().find(|pool| pool.family() == family)
    }

    fn hold(&mut self, name: ServiceName, ips: Vec<IpAddr>) {
        for ip in &ips {
            if let Some(pool) = self.pool(IpFamily::of(ip)) {
                pool.holders.insert(*ip, name.clone());
            }
        }
        if self.assigned.insert(name, ips.clone()).as_ref() != Some(&ips) {
            self.changed = true;
        }
    }

    /// Whether allocations changed since the last call (so they need saving).
    pub fn take_changed(&mut self) -> bool {
        std::mem::take(&mut self.changed)
    }

    /// The families a Service asks for, in order: `ipFamilies` (else those of its explicit
    /// addresses), completed or cut by `ipFamilyPolicy` and the ranges there are; the primary
    /// range's family by default.
    fn families(&self, service: &Service, explicit: &[IpAddr]) -> Result<Vec<IpFamily>, String> {
        let spec = service.spec.as_ref();
        let mut families: Vec<IpFamily> = Vec::new();
        for family in spec.and_then(|s| s.ip_families.as_ref()).into_iter().flatten() {
            let family = match family.as_str() {
                "IPv4" => IpFamily::V4,
                "IPv6" => IpFamily::V6,
                other => return Err(format!("ipFamilies: {other:?} is neither IPv4 nor IPv6")),
            };
            if !families.contains(&family) {
                families.push(family);
            }
        }
        if families.is_empty() {
            for family in explicit.iter().map(IpFamily::of) {
                if !families.contains(&family) {
                    families.push(family);
                }
            }
        }
        let available: Vec<IpFamily> = self.pools.iter().map(Pool::family).collect();
        match spec.and_then(|s| s.ip_family_policy.as_deref()).unwrap_or("SingleStack") {
            "SingleStack" => {
                families.truncate(1);
                if families.is_empty() {
                    families.extend(available.first());
                }
            }
            policy @ ("PreferDualStack" | "RequireDualStack") => {
                families.extend(available.iter().filter(|f| !families.contains(f)).collect::<Vec<_>>());
                if policy == "PreferDualStack" {
                    families.retain(|family| available.contains(family));
                } else if available.len() < 2 {
                    return Err(format!(
                        "ipFamilyPolicy RequireDualStack needs an IPv4 and an IPv6 --service-cluster-ip-range; there is {}",
                        self.ranges()
                    ));
                }
            }
            other => {
                return Err(format!(
                    "ipFamilyPolicy {other:?} is not SingleStack, PreferDualStack or RequireDualStack"
                ));
            }
        }
        if let Some(missing) = families.iter().find(|family| !available.contains(family)) {
            return Err(format!(
                "ipFamilies asks for {missing}, and --service-cluster-ip-range has no {missing} range ({})",
                self.ranges()
            ));
        }
        Ok(families)
    }

    /// Gives a Service its ClusterIPs: those it asks for if it may have them, else those it was
    /// given before, else free ones of each family it asks for (filled into the object).
    pub fn admit(&mut self, service: &mut Service) -> Admission {
        let name = name_of(service);
        let error = |problem: String| ObjectError {
            kind: "Service",
            namespace: name.0.clone(),
            name: name.1.clone(),
            problem,
        };
        let Some(asked) = requested(service) else {
            self.release(&name);
            return Admission::Admitted;
        };
        let mut explicit = Vec::new();
        for ip in &asked {
            match ip.parse::<IpAddr>() {
                Ok(ip) => explicit.push(ip),
                Err(_) => return Admission::Admitted, // conversion reports addresses that do not parse
            }
        }
        if explicit.is_empty()
            && let Some(previous) = self.assigned.get(&name).cloned()
        {
            set_cluster_ips(service, &previous);
            return Admission::Admitted;
        }
        if let Some(previous) = self.assigned.get(&name).cloned()
            && explicit.iter().any(|ip| !previous.contains(ip))
        {
            set_cluster_ips(service, &previous);
            let show = |ips: &[IpAddr]| ips.iter().map(ToString::to_string).collect::<Vec<_>>().join(",");
            return Admission::Kept(error(format!(
                "spec.clusterIPs cannot change from {} to {}; delete the Service to give it others; keeping {}",
                show(&previous),
                show(&explicit),
                show(&previous)
            )));
        }
        for ip in &explicit {
            let family = IpFamily::of(ip);
            let ranges = self.ranges();
            let Some(pool) = self.pool(family) else {
                if explicit.len() == 1 && self.pools.len() == 1 {
                    return Admission::Rejected(error(format!(
                        "spec.clusterIP {ip} is outside --service-cluster-ip-range {ranges}"
                    )));
                }
                return Admission::Rejected(error(format!(
                    "spec.clusterIPs: {ip} is {family} and --service-cluster-ip-range has no {family} range ({ranges})"
                )));
            };
            if !pool.range.contains(ip) {
                return Admission::Rejected(error(format!(
                    "spec.clusterIP {ip} is outside --service-cluster-ip-range {ranges}"
                )));
            }
            if let Some(owner) = pool.holders.get(ip).filter(|owner| **owner != name) {
                return Admission::Rejected(error(format!(
                    "spec.clusterIP {ip} is already used by Service {}/{}",
                    owner.0, owner.1
                )));
            }
        }
        let families = match self.families(service, &explicit) {
            Ok(families) => families,
            Err(problem) => return Admission::Rejected(error(problem)),
        };
        // Explicit addresses first, in their order; then one of each family still missing.
        let mut ips = explicit.clone();
        for family in families {
            if ips.iter().any(|ip| IpFamily::of(ip) == family) {
                continue;
            }
            let ranges = self.ranges();
            let Some(ip) = self.pool(family).and_then(Pool::free_address) else {
                return Admission::Rejected(error(format!(
                    "no free {family} ClusterIP left in --service-cluster-ip-range {ranges}"
                )));
            };
            ips.push(ip);
        }
        self.hold(name, ips.clone());
        if ips != explicit {
            set_cluster_ips(service, &ips);
        }
        Admission::Admitted
    }

    /// Forgets a Service that is gone: its addresses are free again. Returns whether it held
    /// any.
    pub fn release(&mut self, name: &ServiceName) -> bool {
        match self.assigned.remove(name) {
            Some(ips) => {
                for ip in ips {
                    if let Some(pool) = self.pool(IpFamily::of(&ip)) {
                        pool.holders.remove(&ip);
                    }
                }
                self.changed = true;
                true
            }
            None => false,
        }
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

    /// Loads allocations saved by `save`; a missing file means none yet. Files of earlier lb
    /// versions (one address per Service) load too.
    pub fn load(ranges: &[IpNet], path: &Path) -> Result<Self, StateError> {
        #[derive(serde::Deserialize)]
        #[serde(untagged)]
        enum Saved {
            One(IpAddr),
            Several(Vec<IpAddr>),
        }
        let mut allocator = Self::with_ranges(ranges);
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(allocator),
            Err(error) => return Err(StateError::Read { path: path.into(), message: error.to_string() }),
        };
        let saved: BTreeMap<String, Saved> = serde_json::from_str(&text)
            .map_err(|e| StateError::Read { path: path.into(), message: e.to_string() })?;
        for (name, ips) in saved {
            let ips = match ips {
                Saved::One(ip) => vec![ip],
                Saved::Several(ips) => ips,
            };
            if let Some((namespace, name)) = name.split_once('/') {
                allocator.hold((namespace.to_string(), name.to_string()), ips);
            }
        }
        Ok(allocator)
    }

    /// Saves the allocations (write to a temporary file, then rename: never half a file).
    pub fn save(&self, path: &Path) -> Result<(), StateError> {
        let saved: BTreeMap<String, &Vec<IpAddr>> = self
            .assigned
            .iter()
            .map(|((namespace, name), ips)| (format!("{namespace}/{name}"), ips))
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

    fn range() -> IpNet {
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
        let mut allocator = ClusterIpAllocator::new("10.96.0.0/30".parse::<IpNet>().unwrap()); // 2 hosts
        let mut services = vec![service("a", None), service("b", None), service("c", None)];
        let errors = allocator.assign(&mut services);
        assert!(errors[0].to_string().contains("no free IPv4 ClusterIP"), "{errors:?}");
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
        let loaded = ClusterIpAllocator::load(&[range()], &path).unwrap();
        assert_eq!(loaded.assigned(), allocator.assigned());
        assert!(
            ClusterIpAllocator::load(&[range()], &dir.path().join("missing.json"))
                .unwrap()
                .assigned()
                .is_empty()
        );
    }

    fn dual(name: &str, families: &[&str], policy: &str) -> Service {
        let mut service = service(name, None);
        let spec = service.spec.as_mut().unwrap();
        spec.ip_families = Some(families.iter().map(|f| f.to_string()).collect());
        spec.ip_family_policy = Some(policy.into());
        service
    }

    fn cluster_ips(service: &Service) -> Vec<String> {
        service.spec.as_ref().unwrap().cluster_ips.clone().unwrap_or_default()
    }

    #[test]
    fn a_range_of_each_family_gives_dual_stack_services_one_address_of_each() {
        let ranges = parse_ranges("10.96.0.0/29, fd00:10:96::/120").unwrap();
        let mut allocator = ClusterIpAllocator::with_ranges(&ranges);
        let mut services = vec![
            dual("both", &[], "RequireDualStack"),
            dual("six-first", &["IPv6"], "PreferDualStack"),
            dual("six", &["IPv6"], "SingleStack"),
            service("four", None),
        ];
        assert!(allocator.assign(&mut services).is_empty());
        let got: Vec<(String, Vec<String>)> =
            services.iter().map(|s| (s.metadata.name.clone().unwrap(), cluster_ips(s))).collect();
        assert_eq!(
            got,
            [
                ("both".to_string(), vec!["10.96.0.1".to_string(), "fd00:10:96::1".to_string()]),
                ("four".to_string(), vec!["10.96.0.2".to_string()]),
                ("six".to_string(), vec!["fd00:10:96::2".to_string()]),
                ("six-first".to_string(), vec!["fd00:10:96::3".to_string(), "10.96.0.3".to_string()]),
            ]
        );
        let families = services[3].spec.as_ref().unwrap().ip_families.clone().unwrap();
        assert_eq!(families, ["IPv6", "IPv4"]);
    }

    #[test]
    fn families_without_a_range_are_refused_by_name() {
        let mut allocator = ClusterIpAllocator::new(range());
        let mut services = vec![
            dual("both", &[], "RequireDualStack"),
            dual("prefer", &[], "PreferDualStack"),
            dual("six", &["IPv6"], "SingleStack"),
            service("explicit-six", Some("fd00::1")),
        ];
        let errors: Vec<String> = allocator.assign(&mut services).iter().map(|e| e.to_string()).collect();
        assert_eq!(
            errors,
            [
                "Service default/explicit-six: spec.clusterIP fd00::1 is outside --service-cluster-ip-range 10.96.0.0/29",
                "Service default/both: ipFamilyPolicy RequireDualStack needs an IPv4 and an IPv6 --service-cluster-ip-range; there is 10.96.0.0/29",
                "Service default/six: ipFamilies asks for IPv6, and --service-cluster-ip-range has no IPv6 range (10.96.0.0/29)",
            ]
        );
        // PreferDualStack settles for the one family there is.
        assert_eq!(services.len(), 1);
        assert_eq!(cluster_ips(&services[0]), ["10.96.0.1"]);
        assert!(parse_ranges("10.96.0.0/12,10.97.0.0/16").is_err(), "two ranges of one family");
    }

    #[test]
    fn state_files_of_one_address_per_service_still_load() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cluster-ips.json");
        std::fs::write(&path, r#"{"default/a": "10.96.0.1"}"#).unwrap();
        let loaded = ClusterIpAllocator::load(&[range()], &path).unwrap();
        let a = ("default".to_string(), "a".to_string());
        assert_eq!(loaded.assigned()[&a], vec!["10.96.0.1".parse::<IpAddr>().unwrap()]);
    }
}
