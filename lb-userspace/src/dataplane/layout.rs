//! The layout of the pinned maps across lb builds, and how a start moves a previous build's maps
//! into its own without a moment of lost flows or services.
//!
//! The layout record (`LB_LAYOUT`) says which layout the pinned maps' entries have. A start
//! whose layout or map sizes (`--max-*`) differ migrates each map that must change:
//!
//! 1. `prepare`: decide, from the pins alone, what must move. A layout this build cannot read
//!    (newer, or a shape no layout has) or a size too small for what the maps hold is refused
//!    here, before anything is touched: the running data path keeps serving.
//! 2. The object is loaded with each moving map created anew and pinned as
//!    `<name>-migrating`; the others are reused as they are.
//! 3. `copy`: every entry of the old map is converted into the new one. The old programs still
//!    run on the old maps meanwhile.
//! 4. The links get this build's programs (`Datapath::adopt`): one atomic switch per link,
//!    from the old maps to the new.
//! 5. `finish`: what the old programs wrote between 3 and 4 (flows opened or closing) is carried
//!    over, the new pins replace the old ones (`rename`), and the record says this layout.
//!
//! A start interrupted between 4 and 5 leaves `-migrating` pins that the links' programs use:
//! the next start makes them the maps. Interrupted before 4, they are unused and removed.

use std::collections::{BTreeSet, HashSet};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use aya::maps::{MapData, MapType};
use bytemuck::{Pod, Zeroable};
use lb_common::{
    ConntrackEntry, ConntrackEntryOf, DatapathConfig, In6, ServiceValue, conntrack_flags, conntrack_state,
    map_names,
};

use crate::dataplane::datapath::Capacity;
use crate::dataplane::links;

/// This build's layout.
pub const CURRENT: u32 = lb_common::layout::VERSION;

#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    #[error(
        "the maps under {dir} have layout {found}, newer than this lb's ({CURRENT}): run an lb at least as new as \
         the one that pinned them; or remove them with `lb cleanup`, which also stops Service traffic until lb \
         programs it again and drops every tracked flow"
    )]
    Newer { dir: PathBuf, found: u32 },
    #[error(
        "map {path} has a shape no lb layout has ({shape}): it was not pinned by lb, or by a build this one does \
         not know; the running data path was left as it is. Run the lb that pinned it, or `lb cleanup` (stops \
         Service traffic until lb programs it again and drops every tracked flow)"
    )]
    Unknown { path: PathBuf, shape: MapShape },
    #[error(
        "the maps under {dir} carry no layout record and mix the maps of different lb layouts ({maps}): they \
         were not pinned by one lb build; the running data path was left as it is. Run `lb cleanup` (stops \
         Service traffic until lb programs it again and drops every tracked flow)"
    )]
    Mixed { dir: PathBuf, maps: String },
    #[error(
        "map {map} holds {entries} entries, more than {flag} {max_entries} leaves room for: start with {flag} \
         {entries} or more (the running data path was left as it is)"
    )]
    TooSmall { map: &'static str, entries: usize, max_entries: u32, flag: &'static str },
    #[error("{operation} {path}: {source}")]
    Io {
        operation: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn io_error(operation: &'static str, path: &Path) -> impl FnOnce(io::Error) -> LayoutError + use<> {
    let path = path.to_path_buf();
    move |source| LayoutError::Io { operation, path, source }
}

/// What a pinned map is: its type, key and value sizes, and entries.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MapShape {
    pub map_type: MapType,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
}

impl std::fmt::Display for MapShape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:?}, key {} B, value {} B, {} entries",
            self.map_type, self.key_size, self.value_size, self.max_entries
        )
    }
}

impl MapShape {
    fn is_array(&self) -> bool {
        matches!(self.map_type, MapType::Array | MapType::PerCpuArray | MapType::ArrayOfMaps)
    }

    fn is_lru(&self) -> bool {
        matches!(self.map_type, MapType::LruHash | MapType::LruPerCpuHash)
    }
}

/// The shape of each pinned map, as this build and `capacity` want it.
pub fn expected_shapes(capacity: &Capacity) -> [(&'static str, MapShape); 24] {
    use core::mem::size_of;
    use lb_common::*;
    let shape = |map_type, key: usize, value: usize, max_entries| MapShape {
        map_type,
        key_size: key as u32,
        value_size: value as u32,
        max_entries,
    };
    [
        (
            map_names::SERVICES,
            shape(MapType::Hash, size_of::<ServiceKey>(), size_of::<ServiceValue>(), capacity.service_slots),
        ),
        (map_names::BACKENDS, shape(MapType::Hash, 4, size_of::<Backend>(), capacity.backends)),
        (
            map_names::CONNTRACK,
            shape(MapType::Hash, size_of::<FlowKey>(), size_of::<ConntrackEntry>(), capacity.flows),
        ),
        (map_names::SERVICE_META, shape(MapType::Hash, 4, size_of::<ServiceMeta>(), capacity.frontends)),
        // LPM keys carry a 4-byte prefix length before the data.
        (
            map_names::SOURCE_RANGES,
            shape(MapType::LpmTrie, 4 + size_of::<SourceRangeKey>(), 1, lb_common::capacity::SOURCE_RANGES),
        ),
        (map_names::CONFIG, shape(MapType::Array, 4, size_of::<DatapathConfig>(), 1)),
        (
            map_names::SOCKETS,
            shape(
                MapType::LruHash,
                size_of::<SocketKey>(),
                size_of::<SocketFrontend>(),
                lb_common::capacity::SOCKETS,
            ),
        ),
        (map_names::COUNTERS, shape(MapType::PerCpuArray, 4, 8, counters::COUNT)),
        (
            map_names::AFFINITY,
            shape(
                MapType::LruHash,
                size_of::<AffinityKey>(),
                size_of::<AffinityValue>(),
                lb_common::capacity::AFFINITY,
            ),
        ),
        (
            map_names::FRAGMENTS,
            shape(
                MapType::LruHash,
                size_of::<FragmentKey>(),
                size_of::<FragmentValue>(),
                lb_common::capacity::FRAGMENTS,
            ),
        ),
        // Values are inner map IDs (file descriptors when written).
        (map_names::MAGLEV, shape(MapType::ArrayOfMaps, 4, 4, lb_common::capacity::MAGLEV_TABLES)),
        (map_names::STATS, shape(MapType::Array, 4, 8, stats::COUNT)),
        (map_names::CLOCK, shape(MapType::Array, 4, 8, 1)),
        (map_names::LAYOUT, shape(MapType::Array, 4, 4, lb_common::layout::RECORDS)),
        (
            map_names::SERVICE_TRAFFIC,
            shape(MapType::PerCpuHash, 4, size_of::<ServiceTraffic>(), capacity.frontends),
        ),
        // The IPv6 family's maps: the `--max-*` flags size each family's alike.
        (
            map_names::SERVICES6,
            shape(MapType::Hash, size_of::<ServiceKey6>(), size_of::<ServiceValue>(), capacity.service_slots),
        ),
        (map_names::BACKENDS6, shape(MapType::Hash, 4, size_of::<Backend6>(), capacity.backends)),
        (
            map_names::CONNTRACK6,
            shape(MapType::Hash, size_of::<FlowKey6>(), size_of::<ConntrackEntry6>(), capacity.flows),
        ),
        (
            map_names::SOURCE_RANGES6,
            shape(MapType::LpmTrie, 4 + size_of::<SourceRangeKey6>(), 1, lb_common::capacity::SOURCE_RANGES),
        ),
        (
            map_names::AFFINITY6,
            shape(
                MapType::LruHash,
                size_of::<AffinityKey6>(),
                size_of::<AffinityValue>(),
                lb_common::capacity::AFFINITY,
            ),
        ),
        (
            map_names::FRAGMENTS6,
            shape(
                MapType::LruHash,
                size_of::<FragmentKey6>(),
                size_of::<FragmentValue6>(),
                lb_common::capacity::FRAGMENTS,
            ),
        ),
        (
            map_names::SOCKETS6,
            shape(
                MapType::LruHash,
                size_of::<SocketKey6>(),
                size_of::<SocketFrontend6>(),
                lb_common::capacity::SOCKETS,
            ),
        ),
        (map_names::CONFIG6, shape(MapType::Array, 4, size_of::<DatapathConfig6>(), 1)),
        (map_names::PROGRAMS, shape(MapType::ProgramArray, 4, 4, tail_calls::COUNT)),
    ]
}

/// The shape of the map pinned at `path`, if there is one.
pub fn pinned_shape(path: &Path) -> Option<MapShape> {
    let info = MapData::from_pin(path).ok()?.info().ok()?;
    Some(MapShape {
        map_type: info.map_type().ok()?,
        key_size: info.key_size(),
        value_size: info.value_size(),
        max_entries: info.max_entries(),
    })
}

/// The flag that sizes a map, for maps whose size is the operator's.
fn size_flag(map: &str) -> Option<&'static str> {
    match map {
        map_names::SERVICES | map_names::SERVICES6 => Some("--max-service-slots"),
        map_names::BACKENDS | map_names::BACKENDS6 => Some("--max-backends"),
        map_names::SERVICE_META => Some("--max-frontends"),
        map_names::CONNTRACK | map_names::CONNTRACK6 => Some("--max-flows"),
        _ => None,
    }
}

/// Maps the data path writes: what the old programs wrote while the new maps were filled is
/// carried over after the switch.
const WRITTEN_BY_DATA_PATH: [&str; 8] = [
    map_names::CONNTRACK,
    map_names::AFFINITY,
    map_names::FRAGMENTS,
    map_names::SOCKETS,
    map_names::CONNTRACK6,
    map_names::AFFINITY6,
    map_names::FRAGMENTS6,
    map_names::SOCKETS6,
];

/// Layout 0: builds from before the layout record (and before conntrack states, affinity,
/// Maglev, fragments). Their types, frozen here: only migration reads them.
mod v0 {
    use super::*;

    /// Map name, type, key and value size.
    pub const FORMS: [Form; 8] = [
        (map_names::SERVICES, MapType::Hash, 12, 12),
        (map_names::BACKENDS, MapType::Hash, 4, 8),
        (map_names::CONNTRACK, MapType::LruHash, 16, 24),
        (map_names::SERVICE_META, MapType::Hash, 4, 256),
        (map_names::SOURCE_RANGES, MapType::LpmTrie, 12, 1),
        (map_names::CONFIG, MapType::Array, 4, 16),
        (map_names::SOCKETS, MapType::LruHash, 16, 8),
        (map_names::COUNTERS, MapType::PerCpuArray, 4, 8),
    ];

    #[repr(C)]
    #[derive(Clone, Copy, Debug, Pod, Zeroable)]
    pub struct ServiceValue {
        pub backend_id: u32,
        pub service_id: u32,
        pub backend_count: u16,
        /// The same bits as layout 1's `service_flags`, which only added `TWO_SCOPES`.
        pub flags: u16,
    }

    #[repr(C)]
    #[derive(Clone, Copy, Debug, Pod, Zeroable)]
    pub struct ConntrackEntry {
        pub src_address: u32,
        pub dst_address: u32,
        pub src_port: u16,
        pub dst_port: u16,
        pub backend_id: u32,
        pub service_id: u32,
        /// `REPLY` (1) and `ROUTE` (2), the same bits as layout 1's.
        pub flags: u32,
    }

    #[repr(C)]
    #[derive(Clone, Copy, Debug, Pod, Zeroable)]
    pub struct DatapathConfig {
        pub netns_cookie: u64,
        pub snat_address: u32,
        pub snat_port_min: u16,
        pub snat_port_max: u16,
    }
}

/// A map of a layout: name, type, key and value size (sizes may change without a new layout).
type Form = (&'static str, MapType, u32, u32);

/// Whether the map `name` pinned with `shape` is the map `form` describes.
fn fits(form: &Form, name: &str, shape: &MapShape) -> bool {
    form.0 == name && (shape.map_type, shape.key_size, shape.value_size) == (form.1, form.2, form.3)
}

/// Every map of `version`.
fn forms(version: u32) -> Option<Vec<Form>> {
    match version {
        CURRENT => Some(
            expected_shapes(&Capacity::default())
                .iter()
                .map(|(name, shape)| (*name, shape.map_type, shape.key_size, shape.value_size))
                .collect(),
        ),
        0 => Some(v0::FORMS.to_vec()),
        _ => None,
    }
}

/// Whether entries of `map` in layout `from` are this build's entries unchanged.
fn unchanged(from: u32, map: &str) -> bool {
    // The record's own shape never changes.
    from == CURRENT
        || map == map_names::LAYOUT
        || (from == 0
            && [map_names::BACKENDS, map_names::SERVICE_META, map_names::SOURCE_RANGES, map_names::SOCKETS]
                .contains(&map))
}

/// One entry of `map` in layout `from`, in this build's layout; `None`: not carried over.
/// `now_ns` is the data path's clock, for flows from a layout without timestamps.
pub fn convert_entry(
    from: u32,
    map: &str,
    key: &[u8],
    value: &[u8],
    now_ns: u64,
) -> Option<(Vec<u8>, Vec<u8>)> {
    if unchanged(from, map) {
        return Some((key.to_vec(), value.to_vec()));
    }
    if from != 0 {
        return None;
    }
    let converted: Vec<u8> = match map {
        map_names::SERVICES => {
            let old: v0::ServiceValue = bytemuck::try_pod_read_unaligned(value).ok()?;
            bytemuck::bytes_of(&ServiceValue {
                backend_id: old.backend_id,
                service_id: old.service_id,
                backend_count: old.backend_count,
                flags: old.flags,
                affinity_timeout: 0,
                maglev_table: 0,
            })
            .to_vec()
        }
        map_names::CONNTRACK => {
            let flow: lb_common::FlowKey = bytemuck::try_pod_read_unaligned(key).ok()?;
            let old: v0::ConntrackEntry = bytemuck::try_pod_read_unaligned(value).ok()?;
            let mut flags = (old.flags & u32::from(conntrack_flags::REPLY | conntrack_flags::ROUTE)) as u16;
            // Layout 0 did not say; a client's entry whose source is rewritten was source-NATed.
            if flags & conntrack_flags::REPLY == 0 && old.src_address != flow.src_address {
                flags |= conntrack_flags::SNAT;
            }
            // Layout 0 tracked no state: a flow it kept is taken as open and answered, with the
            // idle timeouts of open flows counted from now.
            let state = if flow.protocol == lb_common::PROTOCOL_TCP {
                conntrack_state::TCP_ESTABLISHED
            } else {
                conntrack_state::UDP_REPLIED
            };
            bytemuck::bytes_of(&ConntrackEntry {
                src_address: old.src_address,
                dst_address: old.dst_address,
                src_port: old.src_port,
                dst_port: old.dst_port,
                backend_id: old.backend_id,
                service_id: old.service_id,
                flags,
                state,
                _pad: 0,
                last_seen_ns: now_ns,
                created_ns: now_ns,
            })
            .to_vec()
        }
        map_names::CONFIG => {
            let old: v0::DatapathConfig = bytemuck::try_pod_read_unaligned(value).ok()?;
            bytemuck::bytes_of(&DatapathConfig {
                netns_cookie: old.netns_cookie,
                snat_address: old.snat_address,
                snat_port_min: old.snat_port_min,
                snat_port_max: old.snat_port_max,
                maglev_table_size: lb_common::MAGLEV_TABLE_SIZE,
                _pad: 0,
            })
            .to_vec()
        }
        // Counter indexes moved: layout 0's counts start again from zero.
        _ => return None,
    };
    Some((key.to_vec(), converted))
}

/// A flow's entry after the switch, from what the old programs last wrote (`old`, converted)
/// and what the new ones have written since (`new`).
pub fn merge_flow<A: Copy>(old: &ConntrackEntryOf<A>, new: &ConntrackEntryOf<A>) -> ConntrackEntryOf<A> {
    if old.created_ns > new.created_ns {
        // The old programs started a new flow on this tuple after the copy: theirs is the flow.
        return ConntrackEntryOf { last_seen_ns: old.last_seen_ns.max(new.last_seen_ns), ..*old };
    }
    if new.created_ns > old.created_ns {
        return *new;
    }
    // The same flow: a FIN or RST either side saw counts, and states only move forward.
    let fins = conntrack_flags::FIN_CLIENT | conntrack_flags::FIN_BACKEND;
    ConntrackEntryOf {
        flags: new.flags | (old.flags & fins),
        state: old.state.max(new.state),
        last_seen_ns: old.last_seen_ns.max(new.last_seen_ns),
        ..*new
    }
}

/// The raw bpf(2) map calls migration needs: it moves entries whose sizes are only known at
/// run time, which aya's typed maps cannot.
struct RawMap {
    fd: OwnedFd,
    path: PathBuf,
    shape: MapShape,
    /// Bytes of a value as the system calls read and write it (per CPU for per-CPU maps).
    value_len: usize,
}

const BPF_MAP_LOOKUP_ELEM: nix::libc::c_long = 1;
const BPF_MAP_UPDATE_ELEM: nix::libc::c_long = 2;
const BPF_MAP_GET_NEXT_KEY: nix::libc::c_long = 4;
const BPF_MAP_DELETE_ELEM: nix::libc::c_long = 3;
const BPF_MAP_GET_FD_BY_ID: nix::libc::c_long = 14;
const BPF_ANY: u64 = 0;
const BPF_NOEXIST: u64 = 1;

impl RawMap {
    fn open(path: &Path) -> Result<Self, LayoutError> {
        let shape = pinned_shape(path).ok_or_else(|| LayoutError::Io {
            operation: "reading the map pinned at",
            path: path.to_path_buf(),
            source: io::Error::from(io::ErrorKind::NotFound),
        })?;
        let fd = links::open_pinned(path).map_err(io_error("opening the map pinned at", path))?;
        let value_len = if matches!(
            shape.map_type,
            MapType::PerCpuArray | MapType::PerCpuHash | MapType::LruPerCpuHash
        ) {
            let cpus = aya::util::nr_cpus().map_err(|(_, source)| LayoutError::Io {
                operation: "counting the possible CPUs for",
                path: path.to_path_buf(),
                source,
            })?;
            (shape.value_size as usize).next_multiple_of(8) * cpus
        } else {
            shape.value_size as usize
        };
        Ok(Self { fd, path: path.to_path_buf(), shape, value_len })
    }

    fn call(&self, command: nix::libc::c_long, key: u64, value: u64, flags: u64) -> io::Result<()> {
        let mut attr = [0u64; 16];
        attr[0] = self.fd.as_raw_fd() as u64; // map_fd
        attr[1] = key;
        attr[2] = value; // value, or next_key
        attr[3] = flags;
        links::bpf(command, &mut attr).map(|_| ())
    }

    /// Every key, read once each (a key deleted under the walk restarts it at the first key,
    /// so the walk is bounded and deduplicated).
    fn keys(&self) -> io::Result<Vec<Vec<u8>>> {
        let mut seen: HashSet<Vec<u8>> = HashSet::new();
        let mut keys = Vec::new();
        let mut current: Option<Vec<u8>> = None;
        let bound = 2 * self.shape.max_entries as usize + 1024;
        for _ in 0..bound {
            let mut next = vec![0u8; self.shape.key_size as usize];
            let key_ptr = current.as_ref().map_or(0, |key| key.as_ptr() as u64);
            match self.call(BPF_MAP_GET_NEXT_KEY, key_ptr, next.as_mut_ptr() as u64, 0) {
                Ok(()) => {}
                Err(error) if error.raw_os_error() == Some(nix::libc::ENOENT) => return Ok(keys),
                Err(error) => return Err(error),
            }
            if seen.insert(next.clone()) {
                keys.push(next.clone());
            }
            current = Some(next);
        }
        Ok(keys)
    }

    fn get(&self, key: &[u8]) -> io::Result<Option<Vec<u8>>> {
        let mut value = vec![0u8; self.value_len];
        match self.call(BPF_MAP_LOOKUP_ELEM, key.as_ptr() as u64, value.as_mut_ptr() as u64, 0) {
            Ok(()) => Ok(Some(value)),
            Err(error) if error.raw_os_error() == Some(nix::libc::ENOENT) => Ok(None),
            Err(error) => Err(error),
        }
    }

    /// Writes an entry; `false` when `only_new` and the key is there already.
    fn put(&self, key: &[u8], value: &[u8], only_new: bool) -> io::Result<bool> {
        let flags = if only_new { BPF_NOEXIST } else { BPF_ANY };
        if self.shape.map_type == MapType::ArrayOfMaps {
            // Read as an inner map's ID, written as a descriptor of it.
            let id = u32::from_ne_bytes(value.try_into().map_err(|_| io::ErrorKind::InvalidData)?);
            let mut attr = [0u64; 16];
            attr[0] = u64::from(id); // map_id
            let inner = links::bpf(BPF_MAP_GET_FD_BY_ID, &mut attr)?;
            // SAFETY: the kernel just returned this descriptor to us.
            let inner = unsafe { OwnedFd::from_raw_fd(inner as i32) };
            let fd = (inner.as_raw_fd() as u32).to_ne_bytes();
            return self
                .call(BPF_MAP_UPDATE_ELEM, key.as_ptr() as u64, fd.as_ptr() as u64, flags)
                .map(|()| true);
        }
        match self.call(BPF_MAP_UPDATE_ELEM, key.as_ptr() as u64, value.as_ptr() as u64, flags) {
            Ok(()) => Ok(true),
            Err(error) if only_new && error.raw_os_error() == Some(nix::libc::EEXIST) => Ok(false),
            Err(error) => Err(error),
        }
    }

    fn id(&self) -> Option<u32> {
        MapData::from_pin(&self.path).ok()?.info().ok().map(|info| info.id())
    }
}

/// One map that moves to a new map.
#[derive(Clone, Debug, PartialEq)]
pub struct Move {
    pub name: &'static str,
    pub from: MapShape,
    pub to: MapShape,
}

/// What a start must do to the pinned maps: nothing, or move some of them.
#[derive(Clone, Debug, PartialEq)]
pub struct Migration {
    /// The layout the pinned maps have (`CURRENT` for a fresh directory).
    pub from: u32,
    /// Whether the record must be written (fresh directory, or pins of a build before it).
    pub record: bool,
    pub moves: Vec<Move>,
    /// Maps of the old layout that this one no longer has: unpinned when done.
    pub obsolete: Vec<&'static str>,
}

/// What `finish` carried over and replaced.
#[derive(Debug, Default)]
pub struct Finished {
    pub maps: usize,
    pub caught_up: usize,
}

impl Migration {
    /// Where the map `name` is pinned while this start runs.
    pub fn pin_path(&self, dir: &Path, name: &str) -> PathBuf {
        if self.moves.iter().any(|m| m.name == name) { migrating_pin(dir, name) } else { dir.join(name) }
    }
}

fn migrating_pin(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}{}", lb_common::layout::MIGRATING_SUFFIX))
}

fn read_record(dir: &Path) -> Result<[u32; lb_common::layout::RECORDS as usize], LayoutError> {
    let mut record = [0u32; lb_common::layout::RECORDS as usize];
    let path = dir.join(map_names::LAYOUT);
    if pinned_shape(&path).is_none() {
        return Ok(record);
    }
    let map = RawMap::open(&path)?;
    for (index, slot) in record.iter_mut().enumerate() {
        if let Some(value) = map.get(&(index as u32).to_ne_bytes()).map_err(io_error("reading", &path))? {
            *slot = u32::from_ne_bytes(value[..4].try_into().expect("4-byte value"));
        }
    }
    Ok(record)
}

fn write_record(dir: &Path, index: u32, version: u32) -> Result<(), LayoutError> {
    let path = dir.join(map_names::LAYOUT);
    let map = RawMap::open(&path)?;
    map.put(&index.to_ne_bytes(), &version.to_ne_bytes(), false).map_err(io_error("writing", &path))?;
    Ok(())
}

/// IDs of the maps the programs of lb's pinned links use.
fn live_map_ids(dir: &Path) -> HashSet<u32> {
    let programs: HashSet<u32> = links::pinned(dir)
        .iter()
        .filter_map(|(_, path)| {
            let link = links::open_pinned(path).ok()?;
            links::link_target(link.as_fd()).ok()
        })
        .map(|target| target.program_id)
        .collect();
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .filter(|program| programs.contains(&program.id()))
        .filter_map(|program| program.map_ids().ok().flatten())
        .flatten()
        .collect()
}

/// Settles a migration a previous start left half done: maps it switched the links to become
/// the maps; maps it had not switched to are dropped.
fn settle_interrupted(dir: &Path) -> Result<(), LayoutError> {
    let names: Vec<&str> =
        every_name().into_iter().filter(|name| migrating_pin(dir, name).exists()).collect();
    if names.is_empty() {
        return Ok(());
    }
    let live = live_map_ids(dir);
    let switched = names.iter().any(|name| {
        RawMap::open(&migrating_pin(dir, name))
            .ok()
            .and_then(|map| map.id())
            .is_some_and(|id| live.contains(&id))
    });
    let record = read_record(dir)?;
    for name in &names {
        let pin = migrating_pin(dir, name);
        if switched {
            std::fs::rename(&pin, dir.join(name)).map_err(io_error("renaming", &pin))?;
        } else {
            std::fs::remove_file(&pin).map_err(io_error("removing", &pin))?;
        }
    }
    if pinned_shape(&dir.join(map_names::LAYOUT)).is_some() {
        if switched && record[lb_common::layout::MIGRATING as usize] != 0 {
            write_record(dir, lb_common::layout::PINNED, record[lb_common::layout::MIGRATING as usize])?;
        }
        write_record(dir, lb_common::layout::MIGRATING, 0)?;
    }
    if switched {
        tracing::warn!(
            maps = ?names,
            "a previous start switched the data path to migrated maps and stopped before finishing: they are now \
             the maps (flows opened during its switch may have been lost)"
        );
    } else {
        tracing::info!(maps = ?names, "removed the maps of a migration a previous start did not finish");
    }
    Ok(())
}

/// Maps that hold only counters: one of another shape is replaced (its counts start over), not
/// migrated, so it says nothing about the layout of the others.
const REPLACED_NOT_MIGRATED: [&str; 1] = [map_names::SERVICE_TRAFFIC];

/// Names of every map of every layout this build knows, but the counters-only ones.
fn every_name() -> BTreeSet<&'static str> {
    [CURRENT, 0]
        .into_iter()
        .flat_map(|version| forms(version).unwrap_or_default())
        .map(|form| form.0)
        .filter(|name| !REPLACED_NOT_MIGRATED.contains(name))
        .collect()
}

/// The layout of pins that carry no record: the newest whose every map matches.
fn infer(dir: &Path) -> Result<Option<u32>, LayoutError> {
    let pinned: Vec<(&str, MapShape)> =
        every_name().into_iter().filter_map(|name| Some((name, pinned_shape(&dir.join(name))?))).collect();
    if pinned.is_empty() || pinned.iter().all(|(name, _)| *name == map_names::LAYOUT) {
        return Ok(None);
    }
    'versions: for version in [CURRENT, 0] {
        let forms = forms(version).unwrap_or_default();
        for (name, shape) in &pinned {
            if !forms.iter().any(|form| fits(form, name, shape)) && *name != map_names::LAYOUT {
                continue 'versions;
            }
        }
        return Ok(Some(version));
    }
    // No layout fits: name the first map that fits none, or else say that they are a mix.
    let fits_none = pinned.iter().find(|(name, shape)| {
        ![CURRENT, 0]
            .iter()
            .any(|version| forms(*version).unwrap_or_default().iter().any(|form| fits(form, name, shape)))
    });
    match fits_none {
        Some((name, shape)) => Err(LayoutError::Unknown { path: dir.join(name), shape: *shape }),
        None => Err(LayoutError::Mixed {
            dir: dir.to_path_buf(),
            maps: pinned
                .iter()
                .map(|(name, shape)| format!("{name}: {shape}"))
                .collect::<Vec<_>>()
                .join(", "),
        }),
    }
}

/// Step 1: what must move, decided from the pins; refuses what this build cannot migrate.
/// Touches nothing but the leftovers of an interrupted migration.
pub fn prepare(dir: &Path, capacity: &Capacity) -> Result<Migration, LayoutError> {
    settle_interrupted(dir)?;
    let record = read_record(dir)?;
    let recorded = record[lb_common::layout::PINNED as usize];
    let (from, record_missing) = match recorded {
        0 => match infer(dir)? {
            None => (CURRENT, true),
            Some(version) => (version, true),
        },
        version => (version, false),
    };
    let Some(old_forms) = forms(from) else {
        return Err(LayoutError::Newer { dir: dir.to_path_buf(), found: from });
    };
    let mut moves = Vec::new();
    for (name, wanted) in expected_shapes(capacity) {
        let path = dir.join(name);
        let Some(current) = pinned_shape(&path) else { continue };
        if REPLACED_NOT_MIGRATED.contains(&name) {
            // Counters, not state: a map of another shape is replaced (its counts start over)
            // instead of migrated. Unpinning leaves it to the programs that use it until their
            // links switch.
            if current != wanted {
                std::fs::remove_file(&path).map_err(io_error("removing", &path))?;
            }
            continue;
        }
        if !old_forms.iter().any(|form| fits(form, name, &current)) && name != map_names::LAYOUT {
            return Err(LayoutError::Unknown { path, shape: current });
        }
        if current == wanted && unchanged(from, name) {
            continue;
        }
        if name == map_names::LAYOUT {
            return Err(LayoutError::Unknown { path, shape: current });
        }
        if !wanted.is_array() && !wanted.is_lru() && convert_keeps_entries(from, name) {
            let entries = RawMap::open(&path)?.keys().map_err(io_error("reading the keys of", &path))?.len();
            if entries > wanted.max_entries as usize {
                return Err(LayoutError::TooSmall {
                    map: name,
                    entries,
                    max_entries: wanted.max_entries,
                    flag: size_flag(name).unwrap_or("this build's size"),
                });
            }
        }
        moves.push(Move { name, from: current, to: wanted });
    }
    let current_names: Vec<&str> = expected_shapes(capacity).iter().map(|(name, _)| *name).collect();
    let obsolete = old_forms
        .iter()
        .map(|form| form.0)
        .filter(|name| !current_names.contains(name) && dir.join(name).exists())
        .collect();
    Ok(Migration { from, record: record_missing || from != CURRENT, moves, obsolete })
}

fn convert_keeps_entries(from: u32, map: &str) -> bool {
    unchanged(from, map) || (from == 0 && [map_names::SERVICES, map_names::CONNTRACK].contains(&map))
}

/// Step 3, after the object was loaded with the moving maps at their `-migrating` pins: every
/// entry converted into the new maps. On error the new maps are dropped and the old ones stay
/// in use.
pub fn copy(dir: &Path, migration: &Migration, now_ns: u64) -> Result<usize, LayoutError> {
    let result = (|| {
        let mut copied = 0;
        for moved in &migration.moves {
            copied += copy_map(dir, migration.from, moved, now_ns, false)?;
        }
        if !migration.moves.is_empty() {
            write_record(dir, lb_common::layout::MIGRATING, CURRENT)?;
        }
        Ok(copied)
    })();
    if result.is_err() {
        abandon(dir, migration);
    }
    result
}

/// Drops the new maps of a migration that did not get to its switch.
pub fn abandon(dir: &Path, migration: &Migration) {
    for moved in &migration.moves {
        let _ = std::fs::remove_file(migrating_pin(dir, moved.name));
    }
    let _ = write_record(dir, lb_common::layout::MIGRATING, 0);
}

/// Copies `moved`'s entries from its old map to its new one; with `catch_up`, only what the
/// new map lacks (flows are merged). Returns the entries written.
fn copy_map(dir: &Path, from: u32, moved: &Move, now_ns: u64, catch_up: bool) -> Result<usize, LayoutError> {
    let old_path = dir.join(moved.name);
    let new_path = migrating_pin(dir, moved.name);
    let old = RawMap::open(&old_path)?;
    let new = RawMap::open(&new_path)?;
    let mut written = 0;
    for key in old.keys().map_err(io_error("reading the keys of", &old_path))? {
        let Some(value) = old.get(&key).map_err(io_error("reading", &old_path))? else { continue };
        // Arrays hold every index: those past the new size are not carried.
        if moved.to.is_array()
            && u32::from_ne_bytes(key[..4].try_into().expect("4-byte key")) >= moved.to.max_entries
        {
            continue;
        }
        let Some((key, value)) = convert_entry(from, moved.name, &key, &value, now_ns) else { continue };
        if value.len() != new.value_len || key.len() != new.shape.key_size as usize {
            continue;
        }
        let wrote = if !catch_up {
            new.put(&key, &value, false)
        } else if moved.name == map_names::CONNTRACK {
            catch_up_flow::<u32>(&new, &key, &value)
        } else if moved.name == map_names::CONNTRACK6 {
            catch_up_flow::<In6>(&new, &key, &value)
        } else {
            new.put(&key, &value, true)
        };
        match wrote {
            Ok(true) => written += 1,
            Ok(false) => {}
            // A full LRU map evicts; a full hash map was refused in `prepare`, unless the old
            // programs added flows since: those beyond the new size are not carried.
            Err(error) if error.raw_os_error() == Some(nix::libc::E2BIG) => {
                tracing::warn!(map = moved.name, "the new map is full: later entries were not carried over");
                break;
            }
            Err(error) => return Err(io_error("writing", &new_path)(error)),
        }
    }
    Ok(written)
}

fn catch_up_flow<A: lb_common::Address>(new: &RawMap, key: &[u8], old_value: &[u8]) -> io::Result<bool>
where
    ConntrackEntryOf<A>: bytemuck::Pod,
{
    if new.put(key, old_value, true)? {
        return Ok(true);
    }
    let Some(new_value) = new.get(key)? else { return new.put(key, old_value, false) };
    let (Ok(old), Ok(current)) = (
        bytemuck::try_pod_read_unaligned::<ConntrackEntryOf<A>>(old_value),
        bytemuck::try_pod_read_unaligned::<ConntrackEntryOf<A>>(&new_value),
    ) else {
        return Ok(false);
    };
    let merged = merge_flow(&old, &current);
    if merged == current {
        return Ok(false);
    }
    new.put(key, bytemuck::bytes_of(&merged), false)
}

/// Step 3 too: when the conntrack map moves to a map of the same form (a new size), the new
/// programs are given the old map (`previous`, the programs' LB_CONNTRACK_PREVIOUS) to find
/// the flows the old programs open until their links switch, which no copy can catch in time.
/// Returns whether they were.
pub fn offer_previous_flows(
    dir: &Path,
    migration: &Migration,
    previous: &[(&'static str, BorrowedFd<'_>)],
) -> Result<bool, LayoutError> {
    let mut offered = false;
    for (conntrack, previous) in previous {
        let Some(moved) = migration.moves.iter().find(|moved| moved.name == *conntrack) else { continue };
        if !unchanged(migration.from, moved.name)
            || (moved.from.map_type, moved.from.key_size, moved.from.value_size)
                != (moved.to.map_type, moved.to.key_size, moved.to.value_size)
        {
            continue;
        }
        let path = dir.join(moved.name);
        let old = links::open_pinned(&path).map_err(io_error("opening the map pinned at", &path))?;
        let key = 0u32.to_ne_bytes();
        let value = (old.as_raw_fd() as u32).to_ne_bytes();
        let mut attr = [0u64; 16];
        attr[0] = previous.as_raw_fd() as u64;
        attr[1] = key.as_ptr() as u64;
        attr[2] = value.as_ptr() as u64;
        links::bpf(BPF_MAP_UPDATE_ELEM, &mut attr)
            .map_err(io_error("offering the new programs the flows of", &path))?;
        offered = true;
    }
    Ok(offered)
}

/// Step 5, once the links run this build's programs: carries over what the old programs wrote
/// since the copy, takes the old conntrack map away from the new programs (`previous`), puts
/// the new maps in place of the old pins, and records this layout.
pub fn finish(
    dir: &Path,
    migration: &Migration,
    now_ns: u64,
    previous: &[(&'static str, BorrowedFd<'_>)],
) -> Result<Finished, LayoutError> {
    let mut finished = Finished::default();
    for moved in &migration.moves {
        if WRITTEN_BY_DATA_PATH.contains(&moved.name) {
            finished.caught_up += copy_map(dir, migration.from, moved, now_ns, true)?;
        }
    }
    for (conntrack, previous) in previous {
        let key = 0u32.to_ne_bytes();
        let mut attr = [0u64; 16];
        attr[0] = previous.as_raw_fd() as u64;
        attr[1] = key.as_ptr() as u64;
        match links::bpf(BPF_MAP_DELETE_ELEM, &mut attr) {
            Err(error) if error.raw_os_error() != Some(nix::libc::ENOENT) => {
                return Err(io_error(
                    "taking the old flows away from the new programs",
                    &dir.join(conntrack),
                )(error));
            }
            _ => {}
        }
    }
    for moved in &migration.moves {
        let pin = migrating_pin(dir, moved.name);
        std::fs::rename(&pin, dir.join(moved.name)).map_err(io_error("renaming", &pin))?;
        finished.maps += 1;
    }
    for name in &migration.obsolete {
        let path = dir.join(name);
        std::fs::remove_file(&path).map_err(io_error("removing", &path))?;
    }
    if migration.record || !migration.moves.is_empty() {
        write_record(dir, lb_common::layout::PINNED, CURRENT)?;
    }
    if !migration.moves.is_empty() {
        write_record(dir, lb_common::layout::MIGRATING, 0)?;
    }
    Ok(finished)
}

#[cfg(test)]
mod tests {
    use super::*;
    use lb_common::{FlowKey, PROTOCOL_TCP, PROTOCOL_UDP};
    use std::net::Ipv4Addr;

    #[test]
    fn layout_0_services_keep_their_slots_and_flags() {
        let old = v0::ServiceValue { backend_id: 0, service_id: 7, backend_count: 3, flags: 0b10_0001 };
        let (_, value) =
            convert_entry(0, map_names::SERVICES, &[0; 12], bytemuck::bytes_of(&old), 5).unwrap();
        let new: ServiceValue = bytemuck::pod_read_unaligned(&value);
        assert_eq!(new, ServiceValue::service_entry(7, 3).with_flags(0b10_0001));
    }

    #[test]
    fn layout_0_flows_become_open_flows_seen_now() {
        let client = (Ipv4Addr::new(10, 0, 0, 2), 40_000);
        let key = FlowKey::new(client, (Ipv4Addr::new(10, 96, 0, 1), 80), PROTOCOL_TCP);
        // Source-NATed: the entry rewrites the source to the node's address.
        let old = v0::ConntrackEntry {
            src_address: u32::from(Ipv4Addr::new(10, 0, 0, 1)).to_be(),
            dst_address: u32::from(Ipv4Addr::new(10, 244, 1, 5)).to_be(),
            src_port: 61_000u16.to_be(),
            dst_port: 8080u16.to_be(),
            backend_id: 4,
            service_id: 2,
            flags: 2, // ROUTE
        };
        let (new_key, value) =
            convert_entry(0, map_names::CONNTRACK, bytemuck::bytes_of(&key), bytemuck::bytes_of(&old), 99)
                .unwrap();
        assert_eq!(new_key, bytemuck::bytes_of(&key));
        let new: ConntrackEntry = bytemuck::pod_read_unaligned(&value);
        assert_eq!((new.backend_id, new.service_id), (4, 2));
        assert_eq!(
            (new.src_address, new.dst_address, new.src_port, new.dst_port),
            (old.src_address, old.dst_address, old.src_port, old.dst_port)
        );
        assert_eq!(new.flags, conntrack_flags::ROUTE | conntrack_flags::SNAT);
        assert_eq!(new.state, conntrack_state::TCP_ESTABLISHED);
        assert_eq!((new.last_seen_ns, new.created_ns), (99, 99));

        let udp = FlowKey::new(client, (Ipv4Addr::new(10, 96, 0, 1), 53), PROTOCOL_UDP);
        let reply = v0::ConntrackEntry { flags: 1, src_address: udp.dst_address, ..old };
        let (_, value) =
            convert_entry(0, map_names::CONNTRACK, bytemuck::bytes_of(&udp), bytemuck::bytes_of(&reply), 1)
                .unwrap();
        let new: ConntrackEntry = bytemuck::pod_read_unaligned(&value);
        assert_eq!((new.flags, new.state), (conntrack_flags::REPLY, conntrack_state::UDP_REPLIED));
    }

    #[test]
    fn layout_0_config_gets_the_default_maglev_size_and_counters_restart() {
        let old = v0::DatapathConfig {
            netns_cookie: 9,
            snat_address: 1,
            snat_port_min: 61_000,
            snat_port_max: 65_535,
        };
        let (_, value) = convert_entry(0, map_names::CONFIG, &[0; 4], bytemuck::bytes_of(&old), 0).unwrap();
        let new: DatapathConfig = bytemuck::pod_read_unaligned(&value);
        assert_eq!((new.netns_cookie, new.snat_address, new.snat_port_max), (9, 1, 65_535));
        assert_eq!(new.maglev_table_size, lb_common::MAGLEV_TABLE_SIZE);
        assert_eq!(convert_entry(0, map_names::COUNTERS, &[0; 4], &[1; 16], 0), None);
        // Maps whose entries did not change are copied as they are.
        assert_eq!(
            convert_entry(0, map_names::BACKENDS, &[1; 4], &[2; 8], 0),
            Some((vec![1; 4], vec![2; 8]))
        );
        assert_eq!(
            convert_entry(CURRENT, map_names::CONNTRACK, &[1; 16], &[2; 40], 0),
            Some((vec![1; 16], vec![2; 40]))
        );
    }

    #[test]
    fn layout_0_forms_are_its_types() {
        assert_eq!(core::mem::size_of::<v0::ServiceValue>(), 12);
        assert_eq!(core::mem::size_of::<v0::ConntrackEntry>(), 24);
        assert_eq!(core::mem::size_of::<v0::DatapathConfig>(), 16);
        // Only the maps whose entries changed are converted; the rest keep this build's form.
        let current = forms(CURRENT).unwrap();
        for (name, map_type, key, value) in v0::FORMS {
            let now = current.iter().find(|form| form.0 == name).unwrap();
            if unchanged(0, name) {
                assert_eq!((now.1, now.2, now.3), (map_type, key, value), "{name}");
            }
        }
    }

    #[test]
    fn a_flow_merged_after_the_switch_keeps_what_either_side_saw() {
        let base = ConntrackEntry {
            src_address: 1,
            dst_address: 2,
            src_port: 3,
            dst_port: 4,
            backend_id: 5,
            service_id: 6,
            flags: 0,
            state: conntrack_state::TCP_ESTABLISHED,
            _pad: 0,
            last_seen_ns: 10,
            created_ns: 1,
        };
        // The old programs saw the client's FIN; the new ones a later packet.
        let old = ConntrackEntry {
            flags: conntrack_flags::FIN_CLIENT,
            state: conntrack_state::TCP_CLOSING,
            ..base
        };
        let new = ConntrackEntry { last_seen_ns: 20, ..base };
        let merged = merge_flow(&old, &new);
        assert_eq!(
            (merged.flags, merged.state, merged.last_seen_ns),
            (conntrack_flags::FIN_CLIENT, conntrack_state::TCP_CLOSING, 20)
        );
        // A flow the new programs started on the tuple since is theirs alone.
        let reopened =
            ConntrackEntry { backend_id: 9, state: conntrack_state::TCP_SYN_SENT, created_ns: 30, ..base };
        assert_eq!(merge_flow(&old, &reopened), reopened);
        // And one the old programs started after the copy is theirs.
        let old_reopened = ConntrackEntry { backend_id: 8, created_ns: 5, last_seen_ns: 6, ..base };
        assert_eq!(merge_flow(&old_reopened, &new).backend_id, 8);
        assert_eq!(merge_flow(&old_reopened, &new).last_seen_ns, 20);
    }
}
