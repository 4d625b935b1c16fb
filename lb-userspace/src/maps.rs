//! Access to the data path's service maps behind a trait, with the real BPF maps and an
//! in-memory implementation, so the reconciler is the same code in tests without root.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::path::Path;

use aya::maps::lpm_trie::{Key as LpmKey, LpmTrie};
use aya::maps::{HashMap as BpfHashMap, Map, MapData, MapError};
use ipnet::Ipv4Net;
use lb_common::{Backend, ServiceKey, ServiceMeta, ServiceValue, SourceRangeKey, map_names};

#[derive(Debug, thiserror::Error)]
pub enum MapsError {
    #[error("{operation} in map {map}: {source}")]
    Bpf {
        operation: &'static str,
        map: &'static str,
        #[source]
        source: MapError,
    },
    #[error("opening pinned map {path}: {source} (is lb running with this --bpf-dir?)")]
    OpenPinned {
        path: String,
        #[source]
        source: MapError,
    },
    #[error("map {map} is missing from the eBPF object")]
    Missing { map: &'static str },
    #[error("{operation}: injected failure")]
    Injected { operation: &'static str },
}

/// Full contents of the service maps.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MapsSnapshot {
    pub services: BTreeMap<ServiceKey, ServiceValue>,
    pub backends: BTreeMap<u32, Backend>,
    pub service_meta: BTreeMap<u32, ServiceMeta>,
    /// (service ID, allowed client range) of frontends with source ranges.
    pub source_ranges: BTreeSet<(u32, Ipv4Net)>,
}

/// The writes the reconciler makes. Deleting a missing key is not an error, so every
/// operation can be repeated.
pub trait ServiceMaps {
    fn update_backend(&mut self, id: u32, backend: Backend) -> Result<(), MapsError>;
    fn delete_backend(&mut self, id: u32) -> Result<(), MapsError>;
    fn update_service(&mut self, key: ServiceKey, value: ServiceValue) -> Result<(), MapsError>;
    fn delete_service(&mut self, key: ServiceKey) -> Result<(), MapsError>;
    fn update_service_meta(&mut self, id: u32, meta: ServiceMeta) -> Result<(), MapsError>;
    fn delete_service_meta(&mut self, id: u32) -> Result<(), MapsError>;
    fn update_source_range(&mut self, service_id: u32, range: Ipv4Net) -> Result<(), MapsError>;
    fn delete_source_range(&mut self, service_id: u32, range: Ipv4Net) -> Result<(), MapsError>;
    fn snapshot(&self) -> Result<MapsSnapshot, MapsError>;
}

/// Maps in memory, with optional failure injection for the reconciler's error paths.
#[derive(Clone, Debug, Default)]
pub struct InMemoryMaps {
    pub contents: MapsSnapshot,
    /// Number of writes to let through before every write fails; `None` never fails.
    pub fail_after_writes: Option<usize>,
    /// Every successful write, in order, for tests of write ordering.
    pub log: Vec<String>,
}

impl InMemoryMaps {
    fn write(&mut self, operation: &'static str, what: String) -> Result<(), MapsError> {
        match &mut self.fail_after_writes {
            Some(0) => return Err(MapsError::Injected { operation }),
            Some(left) => *left -= 1,
            None => {}
        }
        self.log.push(format!("{operation} {what}"));
        Ok(())
    }
}

fn slot_name(key: &ServiceKey) -> String {
    format!("{}:{}/{} slot {}", key.address(), key.port(), key.protocol, key.backend_slot)
}

impl ServiceMaps for InMemoryMaps {
    fn update_backend(&mut self, id: u32, backend: Backend) -> Result<(), MapsError> {
        self.write("update backend", id.to_string())?;
        self.contents.backends.insert(id, backend);
        Ok(())
    }

    fn delete_backend(&mut self, id: u32) -> Result<(), MapsError> {
        self.write("delete backend", id.to_string())?;
        self.contents.backends.remove(&id);
        Ok(())
    }

    fn update_service(&mut self, key: ServiceKey, value: ServiceValue) -> Result<(), MapsError> {
        self.write("update service", slot_name(&key))?;
        self.contents.services.insert(key, value);
        Ok(())
    }

    fn delete_service(&mut self, key: ServiceKey) -> Result<(), MapsError> {
        self.write("delete service", slot_name(&key))?;
        self.contents.services.remove(&key);
        Ok(())
    }

    fn update_service_meta(&mut self, id: u32, meta: ServiceMeta) -> Result<(), MapsError> {
        self.write("update service meta", id.to_string())?;
        self.contents.service_meta.insert(id, meta);
        Ok(())
    }

    fn delete_service_meta(&mut self, id: u32) -> Result<(), MapsError> {
        self.write("delete service meta", id.to_string())?;
        self.contents.service_meta.remove(&id);
        Ok(())
    }

    fn update_source_range(&mut self, service_id: u32, range: Ipv4Net) -> Result<(), MapsError> {
        self.write("update source range", format!("{service_id} {range}"))?;
        self.contents.source_ranges.insert((service_id, range));
        Ok(())
    }

    fn delete_source_range(&mut self, service_id: u32, range: Ipv4Net) -> Result<(), MapsError> {
        self.write("delete source range", format!("{service_id} {range}"))?;
        self.contents.source_ranges.remove(&(service_id, range));
        Ok(())
    }

    fn snapshot(&self) -> Result<MapsSnapshot, MapsError> {
        Ok(self.contents.clone())
    }
}

/// The kernel's maps, as loaded by `datapath` or opened from their pins.
pub struct BpfMaps {
    services: BpfHashMap<MapData, ServiceKey, ServiceValue>,
    backends: BpfHashMap<MapData, u32, Backend>,
    service_meta: BpfHashMap<MapData, u32, ServiceMeta>,
    source_ranges: LpmTrie<MapData, SourceRangeKey, u8>,
}

fn source_range_key(service_id: u32, range: Ipv4Net) -> LpmKey<SourceRangeKey> {
    LpmKey::new(
        SourceRangeKey::prefix_len(range.prefix_len()),
        SourceRangeKey { service_id: service_id.to_be(), address: u32::from(range.network()).to_be() },
    )
}

fn hash_map<K: aya::Pod, V: aya::Pod>(
    map: Map,
    name: &'static str,
) -> Result<BpfHashMap<MapData, K, V>, MapsError> {
    BpfHashMap::try_from(map).map_err(|source| MapsError::Bpf { operation: "open", map: name, source })
}

fn lpm_trie(map: Map) -> Result<LpmTrie<MapData, SourceRangeKey, u8>, MapsError> {
    LpmTrie::try_from(map).map_err(|source| MapsError::Bpf {
        operation: "open",
        map: map_names::SOURCE_RANGES,
        source,
    })
}

fn pinned(dir: &Path, name: &'static str) -> Result<Map, MapsError> {
    let path = dir.join(name);
    let open_error = |source| MapsError::OpenPinned { path: path.display().to_string(), source };
    let data = MapData::from_pin(&path).map_err(open_error)?;
    Map::from_map_data(data).map_err(open_error)
}

fn ignore_missing(result: Result<(), MapError>) -> Result<(), MapError> {
    match result {
        Err(MapError::KeyNotFound) => Ok(()),
        other => other,
    }
}

impl BpfMaps {
    /// Takes the service maps out of a loaded eBPF object.
    pub fn from_ebpf(ebpf: &mut aya::Ebpf) -> Result<Self, MapsError> {
        let mut take = |name: &'static str| ebpf.take_map(name).ok_or(MapsError::Missing { map: name });
        Ok(Self {
            services: hash_map(take(map_names::SERVICES)?, map_names::SERVICES)?,
            backends: hash_map(take(map_names::BACKENDS)?, map_names::BACKENDS)?,
            service_meta: hash_map(take(map_names::SERVICE_META)?, map_names::SERVICE_META)?,
            source_ranges: lpm_trie(take(map_names::SOURCE_RANGES)?)?,
        })
    }

    /// Opens the maps a running (or previous) lb pinned under `dir`.
    pub fn from_pins(dir: &Path) -> Result<Self, MapsError> {
        Ok(Self {
            services: hash_map(pinned(dir, map_names::SERVICES)?, map_names::SERVICES)?,
            backends: hash_map(pinned(dir, map_names::BACKENDS)?, map_names::BACKENDS)?,
            service_meta: hash_map(pinned(dir, map_names::SERVICE_META)?, map_names::SERVICE_META)?,
            source_ranges: lpm_trie(pinned(dir, map_names::SOURCE_RANGES)?)?,
        })
    }

    /// One services-map entry, without dumping the map.
    pub fn service(&self, key: &ServiceKey) -> Result<Option<ServiceValue>, MapsError> {
        match self.services.get(key, 0) {
            Ok(value) => Ok(Some(value)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(source) => Err(bpf_error("look up", map_names::SERVICES)(source)),
        }
    }
}

fn bpf_error(operation: &'static str, map: &'static str) -> impl FnOnce(MapError) -> MapsError {
    move |source| MapsError::Bpf { operation, map, source }
}

fn dump<K, V>(map: &BpfHashMap<MapData, K, V>, name: &'static str) -> Result<BTreeMap<K, V>, MapsError>
where
    K: aya::Pod + Ord,
    V: aya::Pod,
{
    map.iter().map(|entry| entry.map_err(bpf_error("iterate", name))).collect()
}

impl ServiceMaps for BpfMaps {
    fn update_backend(&mut self, id: u32, backend: Backend) -> Result<(), MapsError> {
        self.backends.insert(id, backend, 0).map_err(bpf_error("update", map_names::BACKENDS))
    }

    fn delete_backend(&mut self, id: u32) -> Result<(), MapsError> {
        ignore_missing(self.backends.remove(&id)).map_err(bpf_error("delete", map_names::BACKENDS))
    }

    fn update_service(&mut self, key: ServiceKey, value: ServiceValue) -> Result<(), MapsError> {
        self.services.insert(key, value, 0).map_err(bpf_error("update", map_names::SERVICES))
    }

    fn delete_service(&mut self, key: ServiceKey) -> Result<(), MapsError> {
        ignore_missing(self.services.remove(&key)).map_err(bpf_error("delete", map_names::SERVICES))
    }

    fn update_service_meta(&mut self, id: u32, meta: ServiceMeta) -> Result<(), MapsError> {
        self.service_meta.insert(id, meta, 0).map_err(bpf_error("update", map_names::SERVICE_META))
    }

    fn delete_service_meta(&mut self, id: u32) -> Result<(), MapsError> {
        ignore_missing(self.service_meta.remove(&id)).map_err(bpf_error("delete", map_names::SERVICE_META))
    }

    fn update_source_range(&mut self, service_id: u32, range: Ipv4Net) -> Result<(), MapsError> {
        self.source_ranges
            .insert(&source_range_key(service_id, range), 1, 0)
            .map_err(bpf_error("update", map_names::SOURCE_RANGES))
    }

    fn delete_source_range(&mut self, service_id: u32, range: Ipv4Net) -> Result<(), MapsError> {
        ignore_missing(self.source_ranges.remove(&source_range_key(service_id, range)))
            .map_err(bpf_error("delete", map_names::SOURCE_RANGES))
    }

    fn snapshot(&self) -> Result<MapsSnapshot, MapsError> {
        let mut source_ranges = BTreeSet::new();
        for key in self.source_ranges.keys() {
            let key = key.map_err(bpf_error("iterate", map_names::SOURCE_RANGES))?;
            let data = key.data();
            let bits = key.prefix_len().saturating_sub(32).min(32) as u8;
            let network = Ipv4Addr::from(u32::from_be(data.address));
            if let Ok(range) = Ipv4Net::new(network, bits) {
                source_ranges.insert((u32::from_be(data.service_id), range));
            }
        }
        Ok(MapsSnapshot {
            services: dump(&self.services, map_names::SERVICES)?,
            backends: dump(&self.backends, map_names::BACKENDS)?,
            service_meta: dump(&self.service_meta, map_names::SERVICE_META)?,
            source_ranges,
        })
    }
}
