//! Access to the data path's service maps behind a trait, with the real BPF maps and an
//! in-memory implementation, so the reconciler is the same code in tests without root.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;

use aya::maps::lpm_trie::{Key as LpmKey, LpmTrie};
use aya::maps::{Array, ArrayOfMaps, HashMap as BpfHashMap, Map, MapData, MapError, PerCpuHashMap};
use ipnet::IpNet;
use lb_common::{
    BackendOf, In6, ServiceKeyOf, ServiceMeta, ServiceTraffic, ServiceValue, SourceRangeKeyOf, map_names,
};

use crate::model::IpFamily;

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
    /// An entry of the other address family than the map's (the reconciler never makes one).
    #[error("an entry of the other address family cannot go in map {map}")]
    WrongFamily { map: &'static str },
    /// From `in_memory::InMemoryMaps`, for tests.
    #[cfg(any(test, feature = "testing"))]
    #[error("{operation}: injected failure")]
    Injected { operation: &'static str },
}

/// A services-map key of either family, as the control plane handles it (host byte order); it
/// becomes the family's `ServiceKeyOf` only at the map boundary.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SlotKey {
    pub ip: IpAddr,
    pub port: u16,
    /// `PROTOCOL_TCP` or `PROTOCOL_UDP`.
    pub protocol: u8,
    /// `lb_common::scope`.
    pub scope: u8,
    /// 0 for the service entry, 1..=count for backend slots.
    pub backend_slot: u16,
}

impl SlotKey {
    /// An external-scope key.
    pub fn new(ip: impl Into<IpAddr>, port: u16, protocol: u8, backend_slot: u16) -> Self {
        Self::scoped(ip, port, protocol, lb_common::scope::EXTERNAL, backend_slot)
    }

    pub fn scoped(ip: impl Into<IpAddr>, port: u16, protocol: u8, scope: u8, backend_slot: u16) -> Self {
        Self { ip: ip.into(), port, protocol, scope, backend_slot }
    }

    pub fn address(&self) -> IpAddr {
        self.ip
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The same frontend at another slot.
    pub fn with_slot(&self, backend_slot: u16) -> Self {
        Self { backend_slot, ..*self }
    }
}

impl<A: FamilyAddress> From<ServiceKeyOf<A>> for SlotKey {
    fn from(key: ServiceKeyOf<A>) -> Self {
        Self {
            ip: key.address.ip(),
            port: key.port(),
            protocol: key.protocol,
            scope: key.scope,
            backend_slot: key.backend_slot,
        }
    }
}

/// A backends-map value of either family, in host form.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackendValue {
    pub ip: IpAddr,
    pub port: u16,
    /// `PROTOCOL_TCP` or `PROTOCOL_UDP`.
    pub protocol: u8,
    /// `lb_common::backend_flags`.
    pub flags: u8,
}

impl BackendValue {
    pub fn new(ip: impl Into<IpAddr>, port: u16, protocol: u8) -> Self {
        Self { ip: ip.into(), port, protocol, flags: 0 }
    }

    pub fn with_flags(self, flags: u8) -> Self {
        Self { flags, ..self }
    }

    pub fn address(&self) -> IpAddr {
        self.ip
    }

    pub fn port(&self) -> u16 {
        self.port
    }
}

impl<A: FamilyAddress> From<BackendOf<A>> for BackendValue {
    fn from(backend: BackendOf<A>) -> Self {
        Self {
            ip: backend.address.ip(),
            port: backend.port(),
            protocol: backend.protocol,
            flags: backend.flags,
        }
    }
}

/// An address family's map address type (`u32` or `In6`), with the names of its maps.
pub trait FamilyAddress: lb_common::Address + Ord + 'static {
    const SERVICES: &'static str;
    const BACKENDS: &'static str;
    const SOURCE_RANGES: &'static str;
    /// The address in map form, if of this family.
    fn from_ip(ip: IpAddr) -> Option<Self>;
    fn ip(self) -> IpAddr;
}

impl FamilyAddress for u32 {
    const SERVICES: &'static str = map_names::SERVICES;
    const BACKENDS: &'static str = map_names::BACKENDS;
    const SOURCE_RANGES: &'static str = map_names::SOURCE_RANGES;

    fn from_ip(ip: IpAddr) -> Option<Self> {
        match ip {
            IpAddr::V4(ip) => Some(u32::from(ip).to_be()),
            IpAddr::V6(_) => None,
        }
    }

    fn ip(self) -> IpAddr {
        IpAddr::V4(Ipv4Addr::from(u32::from_be(self)))
    }
}

impl FamilyAddress for In6 {
    const SERVICES: &'static str = map_names::SERVICES6;
    const BACKENDS: &'static str = map_names::BACKENDS6;
    const SOURCE_RANGES: &'static str = map_names::SOURCE_RANGES6;

    fn from_ip(ip: IpAddr) -> Option<Self> {
        match ip {
            IpAddr::V6(ip) => Some(In6::from(ip)),
            IpAddr::V4(_) => None,
        }
    }

    fn ip(self) -> IpAddr {
        IpAddr::V6(Ipv6Addr::from(self))
    }
}

/// Full contents of the service maps, both families'.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MapsSnapshot {
    pub services: BTreeMap<SlotKey, ServiceValue>,
    /// One ID space for both families' backends maps.
    pub backends: BTreeMap<u32, BackendValue>,
    pub service_meta: BTreeMap<u32, ServiceMeta>,
    /// (service ID, allowed client range) of frontends with source ranges.
    pub source_ranges: BTreeSet<(u32, IpNet)>,
    /// Maglev tables by index: the backend ID at each position. Only `snapshot_with_maglev`
    /// fills it (reading a table costs a system call per position).
    pub maglev: BTreeMap<u32, Vec<u32>>,
}

/// The writes the reconciler makes. Deleting a missing key is not an error, so every
/// operation can be repeated. Keys and values of either family go to that family's maps.
pub trait ServiceMaps {
    fn update_backend(&mut self, id: u32, backend: BackendValue) -> Result<(), MapsError>;
    /// Deletes backend `id` from the backends map of `family`.
    fn delete_backend(&mut self, id: u32, family: IpFamily) -> Result<(), MapsError>;
    fn update_service(&mut self, key: SlotKey, value: ServiceValue) -> Result<(), MapsError>;
    fn delete_service(&mut self, key: SlotKey) -> Result<(), MapsError>;
    /// Writes backends in order (one call where the kernel batches). On failure: how many
    /// were written, and why the next was not.
    fn update_backends(&mut self, entries: &[(u32, BackendValue)]) -> Result<(), (usize, MapsError)> {
        for (written, (id, backend)) in entries.iter().enumerate() {
            self.update_backend(*id, *backend).map_err(|error| (written, error))?;
        }
        Ok(())
    }
    /// Writes services-map entries in order, as `update_backends` does.
    fn update_services(&mut self, entries: &[(SlotKey, ServiceValue)]) -> Result<(), (usize, MapsError)> {
        for (written, (key, value)) in entries.iter().enumerate() {
            self.update_service(*key, *value).map_err(|error| (written, error))?;
        }
        Ok(())
    }
    fn update_service_meta(&mut self, id: u32, meta: ServiceMeta) -> Result<(), MapsError>;
    fn delete_service_meta(&mut self, id: u32) -> Result<(), MapsError>;
    fn update_source_range(&mut self, service_id: u32, range: IpNet) -> Result<(), MapsError>;
    fn delete_source_range(&mut self, service_id: u32, range: IpNet) -> Result<(), MapsError>;
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

/// One family's services, backends and source-ranges maps.
struct FamilyMaps<A> {
    services: BpfHashMap<MapData, ServiceKeyOf<A>, ServiceValue>,
    backends: BpfHashMap<MapData, u32, BackendOf<A>>,
    source_ranges: LpmTrie<MapData, SourceRangeKeyOf<A>, u8>,
    /// The services and backends maps' descriptors again, for batched updates (aya has none).
    services_fd: std::os::fd::OwnedFd,
    backends_fd: std::os::fd::OwnedFd,
}

/// The kernel's maps, as loaded by `datapath` or opened from their pins.
pub struct BpfMaps {
    v4: FamilyMaps<u32>,
    /// Absent in maps pinned by an lb from before IPv6: their snapshots have no IPv6 entries
    /// and IPv6 writes fail.
    v6: Option<FamilyMaps<In6>>,
    service_meta: BpfHashMap<MapData, u32, ServiceMeta>,
    maglev: ArrayOfMaps<MapData, Array<MapData, u32>>,
    /// The Maglev map's descriptor again, for the one call aya lacks (emptying a slot).
    maglev_fd: std::os::fd::OwnedFd,
    /// Tables written since these handles were opened, by index (saves reopening one per write).
    maglev_open: BTreeMap<u32, Array<MapData, u32>>,
    /// The kernel refused a batched update as unknown: write one entry per call.
    no_batches: bool,
    /// Each frontend's traffic counters, removed with its metadata; absent in maps pinned by an
    /// lb from before them.
    traffic: Option<PerCpuHashMap<MapData, u32, ServiceTraffic>>,
}

fn source_range_key<A: FamilyAddress>(service_id: u32, range: IpNet) -> Option<LpmKey<SourceRangeKeyOf<A>>>
where
    SourceRangeKeyOf<A>: aya::Pod,
{
    Some(LpmKey::new(
        SourceRangeKeyOf::<A>::prefix_len(range.prefix_len()),
        SourceRangeKeyOf { service_id: service_id.to_be(), address: A::from_ip(range.network())? },
    ))
}

fn service_key<A: FamilyAddress>(key: &SlotKey) -> Option<ServiceKeyOf<A>> {
    Some(ServiceKeyOf {
        address: A::from_ip(key.ip)?,
        port: key.port.to_be(),
        backend_slot: key.backend_slot,
        protocol: key.protocol,
        scope: key.scope,
        _pad: 0,
    })
}

fn backend_of<A: FamilyAddress>(backend: &BackendValue) -> Option<BackendOf<A>> {
    Some(BackendOf {
        address: A::from_ip(backend.ip)?,
        port: backend.port.to_be(),
        protocol: backend.protocol,
        flags: backend.flags,
    })
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

/// Writes `entries` to the map behind `fd` with one batched update where the kernel has them
/// (`Ok(true)`), or says to write one per call (`Ok(false)`, and `no_batches` set).
fn try_batch<K: Copy, V: Copy>(
    fd: &std::os::fd::OwnedFd,
    which: &'static str,
    entries: &[(K, V)],
    no_batches: &mut bool,
) -> Result<bool, (usize, MapsError)> {
    if entries.len() <= 1 || *no_batches {
        return Ok(false);
    }
    match update_batch(fd, entries) {
        Ok(()) => Ok(true),
        Err((0, error))
            if matches!(
                error.raw_os_error(),
                Some(nix::libc::EINVAL | nix::libc::EOPNOTSUPP | KERNEL_ENOTSUPP)
            ) =>
        {
            // A kernel without batched updates of this map type.
            *no_batches = true;
            Ok(false)
        }
        Err((written, io_error)) => {
            let source =
                MapError::SyscallError(aya::sys::SyscallError { call: "bpf_map_update_batch", io_error });
            Err((written, bpf_error("update", which)(source)))
        }
    }
}

fn wrong_family(map: &'static str) -> MapsError {
    MapsError::WrongFamily { map }
}

impl<A: FamilyAddress> FamilyMaps<A>
where
    ServiceKeyOf<A>: aya::Pod + Ord,
    BackendOf<A>: aya::Pod,
    SourceRangeKeyOf<A>: aya::Pod,
{
    fn open(mut take: impl FnMut(&'static str) -> Result<Map, MapsError>) -> Result<Self, MapsError> {
        let services = take(A::SERVICES)?;
        let backends = take(A::BACKENDS)?;
        let source_ranges = take(A::SOURCE_RANGES)?;
        Ok(Self {
            services_fd: hash_map_fd(&services, A::SERVICES)?,
            backends_fd: hash_map_fd(&backends, A::BACKENDS)?,
            services: hash_map(services, A::SERVICES)?,
            backends: hash_map(backends, A::BACKENDS)?,
            source_ranges: LpmTrie::try_from(source_ranges).map_err(|source| MapsError::Bpf {
                operation: "open",
                map: A::SOURCE_RANGES,
                source,
            })?,
        })
    }

    fn update_backend(&mut self, id: u32, backend: &BackendValue) -> Result<(), MapsError> {
        let value = backend_of::<A>(backend).ok_or_else(|| wrong_family(A::BACKENDS))?;
        self.backends.insert(id, value, 0).map_err(bpf_error("update", A::BACKENDS))
    }

    fn delete_backend(&mut self, id: u32) -> Result<(), MapsError> {
        ignore_missing(self.backends.remove(&id)).map_err(bpf_error("delete", A::BACKENDS))
    }

    fn update_backends(
        &mut self,
        entries: &[(u32, BackendValue)],
        no_batches: &mut bool,
    ) -> Result<(), (usize, MapsError)> {
        let converted: Vec<(u32, BackendOf<A>)> = entries
            .iter()
            .enumerate()
            .map(|(i, (id, backend))| {
                Ok((*id, backend_of::<A>(backend).ok_or((i, wrong_family(A::BACKENDS)))?))
            })
            .collect::<Result<_, _>>()?;
        if try_batch(&self.backends_fd, A::BACKENDS, &converted, no_batches)? {
            return Ok(());
        }
        for (written, (id, backend)) in converted.iter().enumerate() {
            self.backends
                .insert(*id, *backend, 0)
                .map_err(|e| (written, bpf_error("update", A::BACKENDS)(e)))?;
        }
        Ok(())
    }

    fn update_service(&mut self, key: &SlotKey, value: ServiceValue) -> Result<(), MapsError> {
        let key = service_key::<A>(key).ok_or_else(|| wrong_family(A::SERVICES))?;
        self.services.insert(key, value, 0).map_err(bpf_error("update", A::SERVICES))
    }

    fn delete_service(&mut self, key: &SlotKey) -> Result<(), MapsError> {
        let key = service_key::<A>(key).ok_or_else(|| wrong_family(A::SERVICES))?;
        ignore_missing(self.services.remove(&key)).map_err(bpf_error("delete", A::SERVICES))
    }

    fn update_services(
        &mut self,
        entries: &[(SlotKey, ServiceValue)],
        no_batches: &mut bool,
    ) -> Result<(), (usize, MapsError)> {
        let converted: Vec<(ServiceKeyOf<A>, ServiceValue)> = entries
            .iter()
            .enumerate()
            .map(|(i, (key, value))| {
                Ok((service_key::<A>(key).ok_or((i, wrong_family(A::SERVICES)))?, *value))
            })
            .collect::<Result<_, _>>()?;
        if try_batch(&self.services_fd, A::SERVICES, &converted, no_batches)? {
            return Ok(());
        }
        for (written, (key, value)) in converted.iter().enumerate() {
            self.services
                .insert(*key, *value, 0)
                .map_err(|e| (written, bpf_error("update", A::SERVICES)(e)))?;
        }
        Ok(())
    }

    fn update_source_range(&mut self, service_id: u32, range: IpNet) -> Result<(), MapsError> {
        let key = source_range_key::<A>(service_id, range).ok_or_else(|| wrong_family(A::SOURCE_RANGES))?;
        self.source_ranges.insert(&key, 1, 0).map_err(bpf_error("update", A::SOURCE_RANGES))
    }

    fn delete_source_range(&mut self, service_id: u32, range: IpNet) -> Result<(), MapsError> {
        let key = source_range_key::<A>(service_id, range).ok_or_else(|| wrong_family(A::SOURCE_RANGES))?;
        ignore_missing(self.source_ranges.remove(&key)).map_err(bpf_error("delete", A::SOURCE_RANGES))
    }

    fn service(&self, key: &SlotKey) -> Result<Option<ServiceValue>, MapsError> {
        let Some(key) = service_key::<A>(key) else { return Ok(None) };
        match self.services.get(&key, 0) {
            Ok(value) => Ok(Some(value)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(source) => Err(bpf_error("look up", A::SERVICES)(source)),
        }
    }

    /// Adds this family's entries to `snapshot`.
    fn dump_into(&self, snapshot: &mut MapsSnapshot) -> Result<(), MapsError> {
        for entry in self.services.iter() {
            let (key, value) = entry.map_err(bpf_error("iterate", A::SERVICES))?;
            snapshot.services.insert(key.into(), value);
        }
        for entry in self.backends.iter() {
            let (id, backend) = entry.map_err(bpf_error("iterate", A::BACKENDS))?;
            snapshot.backends.insert(id, backend.into());
        }
        for key in self.source_ranges.keys() {
            let key = key.map_err(bpf_error("iterate", A::SOURCE_RANGES))?;
            let data = key.data();
            let bits = key.prefix_len().saturating_sub(32) as u8;
            if let Ok(range) = IpNet::new(data.address.ip(), bits) {
                snapshot.source_ranges.insert((u32::from_be(data.service_id), range));
            }
        }
        Ok(())
    }
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

// The raw bpf(2) calls below lay out `union bpf_attr` as u64 words, packing two u32 fields
// into one the way a little-endian machine reads them.
#[cfg(target_endian = "big")]
compile_error!("maps.rs packs bpf_attr for little-endian machines");

/// The inner map at `index` of the array of maps behind `outer`, opened by its ID (aya's typed
/// inner map does not hand out its descriptor, which a batched read needs).
fn inner_map(outer: &std::os::fd::OwnedFd, index: u32) -> Result<Option<MapData>, MapError> {
    use std::os::fd::AsRawFd;
    const BPF_MAP_LOOKUP_ELEM: nix::libc::c_long = 1;
    let mut id = 0u32;
    let mut attr = [0u64; 16];
    attr[0] = outer.as_raw_fd() as u64; // map_fd
    attr[1] = &index as *const u32 as u64; // key
    attr[2] = &mut id as *mut u32 as u64; // value: the inner map's ID
    match crate::dataplane::links::bpf(BPF_MAP_LOOKUP_ELEM, &mut attr) {
        // A table swapped out in between is as good as none.
        Ok(_) => match MapData::from_id(id) {
            Ok(data) => Ok(Some(data)),
            Err(MapError::SyscallError(error))
                if error.io_error.raw_os_error() == Some(nix::libc::ENOENT) =>
            {
                Ok(None)
            }
            Err(error) => Err(error),
        },
        Err(error) if error.raw_os_error() == Some(nix::libc::ENOENT) => Ok(None),
        Err(error) => Err(MapError::SyscallError(aya::sys::SyscallError {
            call: "bpf_map_lookup_elem",
            io_error: error,
        })),
    }
}

/// A whole array of u32 in one BPF_MAP_LOOKUP_BATCH (kernel 5.6+), in index order; `None`
/// where the kernel has no batched lookups.
fn lookup_array_batch(array: &MapData, len: u32) -> Result<Option<Vec<u32>>, MapError> {
    use std::os::fd::{AsFd, AsRawFd};
    const BPF_MAP_LOOKUP_BATCH: nix::libc::c_long = 24;
    let mut keys = vec![0u32; len as usize];
    let mut values = vec![0u32; len as usize];
    let mut next = 0u32;
    let mut attr = [0u64; 16];
    // in_batch 0: from the start.
    attr[1] = &mut next as *mut u32 as u64; // out_batch
    attr[2] = keys.as_mut_ptr() as u64;
    attr[3] = values.as_mut_ptr() as u64;
    attr[4] = u64::from(len) | ((array.fd().as_fd().as_raw_fd() as u64) << 32); // count, map_fd
    match crate::dataplane::links::bpf(BPF_MAP_LOOKUP_BATCH, &mut attr) {
        // ENOENT: the end of the array was reached, with `count` entries read.
        Ok(_) => {}
        Err(error) if error.raw_os_error() == Some(nix::libc::ENOENT) => {}
        Err(error)
            if matches!(
                error.raw_os_error(),
                Some(nix::libc::EINVAL | nix::libc::EOPNOTSUPP | KERNEL_ENOTSUPP)
            ) =>
        {
            return Ok(None);
        }
        Err(error) => {
            return Err(MapError::SyscallError(aya::sys::SyscallError {
                call: "bpf_map_lookup_batch",
                io_error: error,
            }));
        }
    }
    let read = attr[4] as u32;
    let in_order = keys.iter().enumerate().all(|(index, key)| *key == index as u32);
    Ok((read == len && in_order).then_some(values))
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
        Ok(Self {
            v4: FamilyMaps::open(&mut take)?,
            v6: Some(FamilyMaps::open(&mut take)?),
            service_meta: hash_map(take(map_names::SERVICE_META)?, map_names::SERVICE_META)?,
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
        let v6 = if dir.join(map_names::SERVICES6).exists() {
            Some(FamilyMaps::open(|name| pinned(dir, name))?)
        } else {
            None
        };
        Ok(Self {
            v4: FamilyMaps::open(|name| pinned(dir, name))?,
            v6,
            service_meta: hash_map(pinned(dir, map_names::SERVICE_META)?, map_names::SERVICE_META)?,
            maglev,
            maglev_fd,
            maglev_open: BTreeMap::new(),
            no_batches: false,
            traffic: pinned(dir, map_names::SERVICE_TRAFFIC)
                .ok()
                .and_then(|map| PerCpuHashMap::try_from(map).ok()),
        })
    }

    fn v6(&mut self) -> Result<&mut FamilyMaps<In6>, MapsError> {
        self.v6.as_mut().ok_or(MapsError::Missing { map: map_names::SERVICES6 })
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

    /// One Maglev table's backend IDs by position (`None`: no such table), read in one batched
    /// call where the kernel has them (a table holds 16 381 positions by default).
    pub fn maglev_contents(&self, table: u32) -> Result<Option<Vec<u32>>, MapsError> {
        let read_error = |source| bpf_error("read a table of", map_names::MAGLEV)(source);
        let Some(inner) = inner_map(&self.maglev_fd, table).map_err(read_error)? else { return Ok(None) };
        let len = inner.info().map_err(read_error)?.max_entries();
        if let Some(contents) = lookup_array_batch(&inner, len).map_err(read_error)? {
            return Ok(Some(contents));
        }
        let Some(array) = self.maglev_table(table)? else { return Ok(None) };
        Ok(Some(array.iter().collect::<Result<Vec<u32>, MapError>>().map_err(read_error)?))
    }

    /// One services-map entry, without dumping the map.
    pub fn service(&self, key: &SlotKey) -> Result<Option<ServiceValue>, MapsError> {
        match (key.ip, &self.v6) {
            (IpAddr::V4(_), _) => self.v4.service(key),
            (IpAddr::V6(_), Some(v6)) => v6.service(key),
            (IpAddr::V6(_), None) => Ok(None),
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
        map_names::SERVICES | map_names::SERVICES6 => {
            "raise --max-service-slots (frontends x (1 + their backends))"
        }
        map_names::BACKENDS | map_names::BACKENDS6 => {
            "raise --max-backends (distinct endpoint address:port pairs)"
        }
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

/// Splits `entries` into runs of one family, in order, each written by `write`; a failure
/// counts the entries of the earlier runs as written.
fn by_family_runs<T: Copy>(
    entries: &[T],
    ip: impl Fn(&T) -> IpAddr,
    mut write: impl FnMut(IpFamily, &[T]) -> Result<(), (usize, MapsError)>,
) -> Result<(), (usize, MapsError)> {
    let mut start = 0;
    while start < entries.len() {
        let family = IpFamily::of(&ip(&entries[start]));
        let len = entries[start..].iter().take_while(|entry| IpFamily::of(&ip(entry)) == family).count();
        write(family, &entries[start..start + len]).map_err(|(written, error)| (start + written, error))?;
        start += len;
    }
    Ok(())
}

impl ServiceMaps for BpfMaps {
    fn update_backend(&mut self, id: u32, backend: BackendValue) -> Result<(), MapsError> {
        match backend.ip {
            IpAddr::V4(_) => self.v4.update_backend(id, &backend),
            IpAddr::V6(_) => self.v6()?.update_backend(id, &backend),
        }
    }

    fn delete_backend(&mut self, id: u32, family: IpFamily) -> Result<(), MapsError> {
        match family {
            IpFamily::V4 => self.v4.delete_backend(id),
            IpFamily::V6 => self.v6()?.delete_backend(id),
        }
    }

    fn update_backends(&mut self, entries: &[(u32, BackendValue)]) -> Result<(), (usize, MapsError)> {
        let Self { v4, v6, no_batches, .. } = self;
        by_family_runs(
            entries,
            |(_, backend)| backend.ip,
            |family, run| match family {
                IpFamily::V4 => v4.update_backends(run, no_batches),
                IpFamily::V6 => match v6 {
                    Some(v6) => v6.update_backends(run, no_batches),
                    None => Err((0, MapsError::Missing { map: map_names::BACKENDS6 })),
                },
            },
        )
    }

    fn update_services(&mut self, entries: &[(SlotKey, ServiceValue)]) -> Result<(), (usize, MapsError)> {
        let Self { v4, v6, no_batches, .. } = self;
        by_family_runs(
            entries,
            |(key, _)| key.ip,
            |family, run| match family {
                IpFamily::V4 => v4.update_services(run, no_batches),
                IpFamily::V6 => match v6 {
                    Some(v6) => v6.update_services(run, no_batches),
                    None => Err((0, MapsError::Missing { map: map_names::SERVICES6 })),
                },
            },
        )
    }

    fn update_service(&mut self, key: SlotKey, value: ServiceValue) -> Result<(), MapsError> {
        match key.ip {
            IpAddr::V4(_) => self.v4.update_service(&key, value),
            IpAddr::V6(_) => self.v6()?.update_service(&key, value),
        }
    }

    fn delete_service(&mut self, key: SlotKey) -> Result<(), MapsError> {
        match key.ip {
            IpAddr::V4(_) => self.v4.delete_service(&key),
            IpAddr::V6(_) => self.v6()?.delete_service(&key),
        }
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

    fn update_source_range(&mut self, service_id: u32, range: IpNet) -> Result<(), MapsError> {
        match range {
            IpNet::V4(_) => self.v4.update_source_range(service_id, range),
            IpNet::V6(_) => self.v6()?.update_source_range(service_id, range),
        }
    }

    fn delete_source_range(&mut self, service_id: u32, range: IpNet) -> Result<(), MapsError> {
        match range {
            IpNet::V4(_) => self.v4.delete_source_range(service_id, range),
            IpNet::V6(_) => self.v6()?.delete_source_range(service_id, range),
        }
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
        let mut snapshot = MapsSnapshot {
            service_meta: dump(&self.service_meta, map_names::SERVICE_META)?,
            ..Default::default()
        };
        self.v4.dump_into(&mut snapshot)?;
        if let Some(v6) = &self.v6 {
            v6.dump_into(&mut snapshot)?;
        }
        Ok(snapshot)
    }

    fn snapshot_with_maglev(&self) -> Result<MapsSnapshot, MapsError> {
        let mut snapshot = self.snapshot()?;
        for table in self.maglev_tables()? {
            if let Some(contents) = self.maglev_contents(table)? {
                snapshot.maglev.insert(table, contents);
            }
        }
        Ok(snapshot)
    }
}
