//! Access to the data path's service maps behind a trait, with the real BPF maps and an
//! in-memory implementation, so the reconciler is the same code in tests without root.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::path::Path;

use aya::maps::lpm_trie::{Key as LpmKey, LpmTrie};
use aya::maps::{Array, ArrayOfMaps, HashMap as BpfHashMap, Map, MapData, MapError, PerCpuHashMap};
use ipnet::Ipv4Net;
use lb_common::{Backend, ServiceKey, ServiceMeta, ServiceTraffic, ServiceValue, SourceRangeKey, map_names};

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
    #[error("map {map} is full: {remedy}")]
    Full { map: &'static str, remedy: &'static str },
    /// From `in_memory::InMemoryMaps`, for tests.
    #[cfg(any(test, feature = "testing"))]
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
    /// Maglev tables by index: the backend ID at each position. Only `snapshot_with_maglev`
    /// fills it (reading a table costs a system call per position).
    pub maglev: BTreeMap<u32, Vec<u32>>,
}

/// The writes the reconciler makes. Deleting a missing key is not an error, so every
/// operation can be repeated.
pub trait ServiceMaps {
    fn update_backend(&mut self, id: u32, backend: Backend) -> Result<(), MapsError>;
    fn delete_backend(&mut self, id: u32) -> Result<(), MapsError>;
    fn update_service(&mut self, key: ServiceKey, value: ServiceValue) -> Result<(), MapsError>;
    fn delete_service(&mut self, key: ServiceKey) -> Result<(), MapsError>;
    /// Writes backends in order (one call where the kernel batches). On failure: how many
    /// were written, and why the next was not.
    fn update_backends(&mut self, entries: &[(u32, Backend)]) -> Result<(), (usize, MapsError)> {
        for (written, (id, backend)) in entries.iter().enumerate() {
            self.update_backend(*id, *backend).map_err(|error| (written, error))?;
        }
        Ok(())
    }
    /// Writes services-map entries in order, as `update_backends` does.
    fn update_services(&mut self, entries: &[(ServiceKey, ServiceValue)]) -> Result<(), (usize, MapsError)> {
        for (written, (key, value)) in entries.iter().enumerate() {
            self.update_service(*key, *value).map_err(|error| (written, error))?;
        }
        Ok(())
    }
    fn update_service_meta(&mut self, id: u32, meta: ServiceMeta) -> Result<(), MapsError>;
    fn delete_service_meta(&mut self, id: u32) -> Result<(), MapsError>;
    fn update_source_range(&mut self, service_id: u32, range: Ipv4Net) -> Result<(), MapsError>;
    fn delete_source_range(&mut self, service_id: u32, range: Ipv4Net) -> Result<(), MapsError>;
    /// Creates Maglev table `table` holding `positions` (a backend ID each), in place of any it
    /// had: the table is filled before it is put in the map.
    fn create_maglev_table(&mut self, table: u32, positions: &[u32]) -> Result<(), MapsError>;
    /// Writes (position, backend ID) pairs into Maglev table `table`.
    fn write_maglev_positions(&mut self, table: u32, positions: &[(u32, u32)]) -> Result<(), MapsError>;
    fn delete_maglev_table(&mut self, table: u32) -> Result<(), MapsError>;
    /// Indexes of the Maglev tables present.
    fn maglev_tables(&self) -> Result<BTreeSet<u32>, MapsError>;
    /// Every map but the Maglev tables' contents.
    fn snapshot(&self) -> Result<MapsSnapshot, MapsError>;
    /// `snapshot`, with the Maglev tables' contents.
    fn snapshot_with_maglev(&self) -> Result<MapsSnapshot, MapsError>;
}

/// The kernel's maps, as loaded by `datapath` or opened from their pins.
pub struct BpfMaps {
    services: BpfHashMap<MapData, ServiceKey, ServiceValue>,
    backends: BpfHashMap<MapData, u32, Backend>,
    service_meta: BpfHashMap<MapData, u32, ServiceMeta>,
    source_ranges: LpmTrie<MapData, SourceRangeKey, u8>,
    maglev: ArrayOfMaps<MapData, Array<MapData, u32>>,
    /// The Maglev map's descriptor again, for the one call aya lacks (emptying a slot).
    maglev_fd: std::os::fd::OwnedFd,
    /// Tables written since these handles were opened, by index (saves reopening one per write).
    maglev_open: BTreeMap<u32, Array<MapData, u32>>,
    /// The services and backends maps' descriptors again, for batched updates (aya has none).
    services_fd: std::os::fd::OwnedFd,
    backends_fd: std::os::fd::OwnedFd,
    /// The kernel refused a batched update as unknown: write one entry per call.
    no_batches: bool,
    /// Each frontend's traffic counters, removed with its metadata; absent in maps pinned by an
    /// lb from before them.
    traffic: Option<PerCpuHashMap<MapData, u32, ServiceTraffic>>,
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

/// A second descriptor of a map, for the calls aya lacks.
fn second_fd(data: &MapData, name: &'static str) -> Result<std::os::fd::OwnedFd, MapsError> {
    use std::os::fd::AsFd;
    data.fd().as_fd().try_clone_to_owned().map_err(|io_error| MapsError::Bpf {
        operation: "open",
        map: name,
        source: MapError::SyscallError(aya::sys::SyscallError { call: "dup", io_error }),
    })
}

/// `second_fd` of a hash map.
fn hash_map_fd(map: &Map, name: &'static str) -> Result<std::os::fd::OwnedFd, MapsError> {
    match map {
        Map::HashMap(data) => second_fd(data, name),
        _ => Err(MapsError::Bpf {
            operation: "open",
            map: name,
            source: MapError::InvalidMapType { map_type: 0 },
        }),
    }
}

/// BPF_MAP_UPDATE_BATCH: `entries` written in order in one call (kernel 5.6+). On failure, how
/// many were written and the error of the next.
fn update_batch<K: Copy, V: Copy>(
    map: &std::os::fd::OwnedFd,
    entries: &[(K, V)],
) -> Result<(), (usize, std::io::Error)> {
    use std::os::fd::AsRawFd;
    const BPF_MAP_UPDATE_BATCH: nix::libc::c_long = 26;
    // Keys and values each in one array, as the kernel reads them (the types are #[repr(C)]
    // without padding, the map's key and value sizes).
    let keys: Vec<K> = entries.iter().map(|(key, _)| *key).collect();
    let values: Vec<V> = entries.iter().map(|(_, value)| *value).collect();
    let mut attr = [0u64; 16];
    // in_batch and out_batch 0; elem_flags and flags 0.
    attr[2] = keys.as_ptr() as u64;
    attr[3] = values.as_ptr() as u64;
    attr[4] = entries.len() as u64 | ((map.as_raw_fd() as u64) << 32); // count, map_fd
    match crate::dataplane::links::bpf(BPF_MAP_UPDATE_BATCH, &mut attr) {
        Ok(_) => Ok(()),
        // The kernel writes back how many entries it processed.
        Err(error) => Err((attr[4] as u32 as usize, error)),
    }
}

/// The kernel's own "operation not supported" errno (ENOTSUPP), which libc does not name.
const KERNEL_ENOTSUPP: i32 = 524;

impl BpfMaps {
    /// Writes `entries` with batched updates where the kernel has them, else one per call.
    fn update_many<K: aya::Pod, V: aya::Pod>(
        &mut self,
        which: &'static str,
        entries: &[(K, V)],
        one: impl Fn(&mut Self, K, V) -> Result<(), MapsError>,
    ) -> Result<(), (usize, MapsError)> {
        if entries.len() > 1 && !self.no_batches {
            let fd = if which == map_names::SERVICES { &self.services_fd } else { &self.backends_fd };
            match update_batch(fd, entries) {
                Ok(()) => return Ok(()),
                Err((0, error))
                    if matches!(
                        error.raw_os_error(),
                        Some(nix::libc::EINVAL | nix::libc::EOPNOTSUPP | KERNEL_ENOTSUPP)
                    ) =>
                {
                    // A kernel without batched updates of this map type.
                    self.no_batches = true;
                }
                Err((written, io_error)) => {
                    let source = MapError::SyscallError(aya::sys::SyscallError {
                        call: "bpf_map_update_batch",
                        io_error,
                    });
                    return Err((written, bpf_error("update", which)(source)));
                }
            }
        }
        for (written, (key, value)) in entries.iter().enumerate() {
            one(self, *key, *value).map_err(|error| (written, error))?;
        }
        Ok(())
    }
}

fn lpm_trie(map: Map) -> Result<LpmTrie<MapData, SourceRangeKey, u8>, MapsError> {
    LpmTrie::try_from(map).map_err(|source| MapsError::Bpf {
        operation: "open",
        map: map_names::SOURCE_RANGES,
        source,
    })
}

type MaglevMap = (ArrayOfMaps<MapData, Array<MapData, u32>>, std::os::fd::OwnedFd);

fn array_of_maps(map: Map) -> Result<MaglevMap, MapsError> {
    let open_error = |source| MapsError::Bpf { operation: "open", map: map_names::MAGLEV, source };
    let fd = match &map {
        Map::ArrayOfMaps(data) => second_fd(data, map_names::MAGLEV)?,
        _ => return Err(open_error(MapError::InvalidMapType { map_type: 0 })),
    };
    Ok((ArrayOfMaps::try_from(map).map_err(open_error)?, fd))
}

/// BPF_F_INNER_MAP: inner maps of a map-of-maps may differ from its template in size.
const BPF_F_INNER_MAP: u32 = 1 << 12;

/// BPF_MAP_DELETE_ELEM on an array of maps (which empties the slot): aya has no call for it.
fn delete_array_of_maps_slot(map: &std::os::fd::OwnedFd, index: u32) -> Result<(), MapError> {
    use std::os::fd::AsRawFd;
    const BPF_MAP_DELETE_ELEM: nix::libc::c_long = 3;
    let mut attr = [0u64; 16];
    attr[0] = map.as_raw_fd() as u64; // map_fd
    attr[1] = &index as *const u32 as u64; // key; value and flags 0
    match crate::dataplane::links::bpf(BPF_MAP_DELETE_ELEM, &mut attr) {
        Ok(_) => Ok(()),
        Err(error) if error.raw_os_error() == Some(nix::libc::ENOENT) => Err(MapError::KeyNotFound),
        Err(error) => Err(MapError::SyscallError(aya::sys::SyscallError {
            call: "bpf_map_delete_elem",
            io_error: error,
        })),
    }
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
        let (maglev, maglev_fd) = array_of_maps(take(map_names::MAGLEV)?)?;
        let services = take(map_names::SERVICES)?;
        let backends = take(map_names::BACKENDS)?;
        Ok(Self {
            services_fd: hash_map_fd(&services, map_names::SERVICES)?,
            backends_fd: hash_map_fd(&backends, map_names::BACKENDS)?,
            services: hash_map(services, map_names::SERVICES)?,
            backends: hash_map(backends, map_names::BACKENDS)?,
            service_meta: hash_map(take(map_names::SERVICE_META)?, map_names::SERVICE_META)?,
            source_ranges: lpm_trie(take(map_names::SOURCE_RANGES)?)?,
            maglev,
            maglev_fd,
            maglev_open: BTreeMap::new(),
            no_batches: false,
            traffic: ebpf
                .take_map(map_names::SERVICE_TRAFFIC)
                .and_then(|map| PerCpuHashMap::try_from(map).ok()),
        })
    }

    /// Opens the maps a running (or previous) lb pinned under `dir`.
    pub fn from_pins(dir: &Path) -> Result<Self, MapsError> {
        let (maglev, maglev_fd) = array_of_maps(pinned(dir, map_names::MAGLEV)?)?;
        let services = pinned(dir, map_names::SERVICES)?;
        let backends = pinned(dir, map_names::BACKENDS)?;
        Ok(Self {
            services_fd: hash_map_fd(&services, map_names::SERVICES)?,
            backends_fd: hash_map_fd(&backends, map_names::BACKENDS)?,
            services: hash_map(services, map_names::SERVICES)?,
            backends: hash_map(backends, map_names::BACKENDS)?,
            service_meta: hash_map(pinned(dir, map_names::SERVICE_META)?, map_names::SERVICE_META)?,
            source_ranges: lpm_trie(pinned(dir, map_names::SOURCE_RANGES)?)?,
            maglev,
            maglev_fd,
            maglev_open: BTreeMap::new(),
            no_batches: false,
            traffic: pinned(dir, map_names::SERVICE_TRAFFIC)
                .ok()
                .and_then(|map| PerCpuHashMap::try_from(map).ok()),
        })
    }

    /// The frontend type and name of each of `ids` that has metadata (one lookup each: for the
    /// few frontends a reader asks about, not a dump).
    pub fn service_names(
        &self,
        ids: impl IntoIterator<Item = u32>,
    ) -> Result<BTreeMap<u32, (u32, String)>, MapsError> {
        let mut names = BTreeMap::new();
        for id in ids {
            match self.service_meta.get(&id, 0) {
                Ok(meta) => {
                    names.insert(id, (meta.frontend_type, meta.name().to_string()));
                }
                Err(MapError::KeyNotFound) => {}
                Err(error) => return Err(bpf_error("read", map_names::SERVICE_META)(error)),
            }
        }
        Ok(names)
    }

    /// Maglev table `table`, if present.
    fn maglev_table(&self, table: u32) -> Result<Option<Array<MapData, u32>>, MapsError> {
        match self.maglev.get(&table, 0) {
            Ok(array) => Ok(Some(array)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(MapError::SyscallError(error))
                if error.io_error.raw_os_error() == Some(nix::libc::ENOENT) =>
            {
                Ok(None)
            }
            Err(source) => Err(bpf_error("look up", map_names::MAGLEV)(source)),
        }
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
    move |source| {
        let full = matches!(&source, MapError::SyscallError(error)
            if matches!(error.io_error.raw_os_error(), Some(nix::libc::E2BIG | nix::libc::ENOSPC)));
        if full && operation == "update" {
            return MapsError::Full { map, remedy: remedy(map) };
        }
        MapsError::Bpf { operation, map, source }
    }
}

/// What to do about a full map: the flag that sizes it.
pub(crate) fn remedy(map: &'static str) -> &'static str {
    match map {
        map_names::SERVICES => "raise --max-service-slots (frontends x (1 + their backends))",
        map_names::BACKENDS => "raise --max-backends (distinct endpoint address:port pairs)",
        map_names::SERVICE_META => "raise --max-frontends (Service ports x their addresses)",
        _ => "its size is fixed in this build",
    }
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

    fn update_backends(&mut self, entries: &[(u32, Backend)]) -> Result<(), (usize, MapsError)> {
        self.update_many(map_names::BACKENDS, entries, |maps, id, backend| maps.update_backend(id, backend))
    }

    fn update_services(&mut self, entries: &[(ServiceKey, ServiceValue)]) -> Result<(), (usize, MapsError)> {
        self.update_many(map_names::SERVICES, entries, |maps, key, value| maps.update_service(key, value))
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
        if let Some(traffic) = &mut self.traffic {
            ignore_missing(traffic.remove(&id)).map_err(bpf_error("delete", map_names::SERVICE_TRAFFIC))?;
        }
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

    fn create_maglev_table(&mut self, table: u32, positions: &[u32]) -> Result<(), MapsError> {
        // Inner maps of another size than the template need BPF_F_INNER_MAP, on both.
        let mut array = Array::<MapData, u32>::create(positions.len() as u32, BPF_F_INNER_MAP)
            .map_err(bpf_error("create a table for", map_names::MAGLEV))?;
        for (position, backend) in positions.iter().enumerate() {
            array
                .set(position as u32, backend, 0)
                .map_err(bpf_error("fill a new table of", map_names::MAGLEV))?;
        }
        self.maglev.set(table, &array, 0).map_err(bpf_error("insert a table into", map_names::MAGLEV))?;
        self.maglev_open.insert(table, array);
        Ok(())
    }

    fn write_maglev_positions(&mut self, table: u32, positions: &[(u32, u32)]) -> Result<(), MapsError> {
        if !self.maglev_open.contains_key(&table) {
            let array = self.maglev_table(table)?.ok_or(MapsError::Bpf {
                operation: "write positions to a missing table of",
                map: map_names::MAGLEV,
                source: MapError::KeyNotFound,
            })?;
            self.maglev_open.insert(table, array);
        }
        let array = self.maglev_open.get_mut(&table).expect("opened above");
        for (position, backend) in positions {
            array.set(*position, backend, 0).map_err(bpf_error("update a table of", map_names::MAGLEV))?;
        }
        Ok(())
    }

    fn delete_maglev_table(&mut self, table: u32) -> Result<(), MapsError> {
        self.maglev_open.remove(&table);
        ignore_missing(delete_array_of_maps_slot(&self.maglev_fd, table))
            .map_err(bpf_error("delete a table of", map_names::MAGLEV))
    }

    fn maglev_tables(&self) -> Result<BTreeSet<u32>, MapsError> {
        let mut tables = BTreeSet::new();
        for index in 1..self.maglev.len() {
            if self.maglev_table(index)?.is_some() {
                tables.insert(index);
            }
        }
        Ok(tables)
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
            maglev: BTreeMap::new(),
        })
    }

    fn snapshot_with_maglev(&self) -> Result<MapsSnapshot, MapsError> {
        let mut snapshot = self.snapshot()?;
        for table in self.maglev_tables()? {
            let Some(array) = self.maglev_table(table)? else { continue };
            let contents: Result<Vec<u32>, MapError> = array.iter().collect();
            snapshot.maglev.insert(table, contents.map_err(bpf_error("read a table of", map_names::MAGLEV))?);
        }
        Ok(snapshot)
    }
}
