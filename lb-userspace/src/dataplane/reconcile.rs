//! Makes the service maps hold the desired state, with ordered, idempotent writes:
//!
//! - backends are written before any slot points at them, and deleted only once no slot does;
//! - a frontend's slots are written before its service entry (slot 0) announces their count,
//!   and surplus slots are deleted only after the entry stopped counting them; so the data path
//!   never sees a half-written service;
//! - a frontend's Maglev table is whole before its service entry names it, and is removed only
//!   after no entry does;
//! - the in-memory record of what is programmed changes only after a write succeeded, so a
//!   failed reconcile is simply retried by the next one.
//!
//! Service and backend IDs are never reused within a run (nor across restarts, which continue
//! after the highest ID any map or flow still holds): a conntrack entry or an affinity record
//! naming an ID can never be taken for a later frontend or backend that got the same number.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::time::{Duration, Instant};

use ipnet::IpNet;

use lb_common::{ServiceMeta, ServiceValue, backend_flags};

use crate::dataplane::maglev::{self, MaglevBackend};
use crate::dataplane::maps::{BackendValue, MapsError, MapsSnapshot, ServiceMaps, SlotKey};
use crate::model::{
    DesiredState, Frontend, FrontendKey, FrontendType, IpFamily, L4Addr, Protocol, Scope, ServicePortName,
};

#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error("programming frontend {frontend} of Service {service}: {source}")]
    Program {
        frontend: FrontendKey,
        service: String,
        #[source]
        source: Box<MapsError>,
    },
    #[error("removing frontend {frontend}: {source}")]
    Remove {
        frontend: FrontendKey,
        #[source]
        source: Box<MapsError>,
    },
    #[error("updating backend {backend}: {source}")]
    UpdateBackend {
        backend: L4Addr,
        #[source]
        source: Box<MapsError>,
    },
    #[error("releasing backend {backend}: {source}")]
    ReleaseBackend {
        backend: L4Addr,
        #[source]
        source: Box<MapsError>,
    },
    #[error("frontend {frontend} ({service}) has {count} backends; a frontend holds at most {max}")]
    TooManyBackends { frontend: FrontendKey, service: String, count: usize, max: usize },
    #[error("no free {what} ID left")]
    IdsExhausted { what: &'static str },
    #[error("removing Maglev table {table}: {source}")]
    RemoveMaglevTable {
        table: u32,
        #[source]
        source: Box<MapsError>,
    },
    #[error("pruning stale map entries: {0}")]
    Prune(#[source] Box<MapsError>),
}

/// What one reconcile did.
#[derive(Debug, Default)]
pub struct ReconcileReport {
    pub programmed: usize,
    pub removed: usize,
    pub unchanged: usize,
    /// Frontends refused now (a full map, say), by this reconcile or an earlier one (whose
    /// errors it reported); they are tried again once others are removed.
    pub refused: usize,
    pub errors: Vec<ReconcileError>,
}

/// Hands out IDs in increasing order, never one twice: flows and affinity records may still
/// name a released ID, and must never be taken for a later holder of the same number.
#[derive(Debug, Default)]
struct IdAllocator {
    next: u32,
}

impl IdAllocator {
    fn allocate(&mut self, what: &'static str) -> Result<u32, ReconcileError> {
        self.next = self.next.max(1);
        let id = self.next;
        self.next = self.next.checked_add(1).ok_or(ReconcileError::IdsExhausted { what })?;
        Ok(id)
    }

    /// Allocates only above `used` from now on.
    fn reserve(&mut self, used: u32) {
        self.next = self.next.max(used.saturating_add(1));
    }
}

/// Maglev table indexes: handed out round-robin, so an index just freed is not reused while a
/// packet that read the old service entry may still look it up.
#[derive(Debug, Default)]
struct TableIndexes {
    last: u32,
}

impl TableIndexes {
    /// A free index: no table in `in_use`, and none an entry still names (a table this lb did
    /// not keep at restore, of another size, say).
    fn allocate(&mut self, in_use: &BTreeMap<u32, MaglevTable>, named: &BTreeSet<u32>) -> Option<u32> {
        let count = lb_common::capacity::MAGLEV_TABLES;
        (1..count)
            .map(|step| (self.last + step - 1) % (count - 1) + 1)
            .find(|index| !in_use.contains_key(index) && !named.contains(index))
            .inspect(|index| self.last = *index)
    }
}

/// A Maglev table in the maps: shared by every frontend with the same backends (a Service
/// port's NodePort addresses, LoadBalancer IPs and externalIPs usually are).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MaglevTable {
    /// The backend IDs it is filled from, sorted.
    pub backends: Vec<u32>,
    /// The backend ID at each position, as written.
    pub positions: Vec<u32>,
    /// Frontends whose service entry names it.
    pub users: usize,
}

/// A frontend as it is in the maps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProgrammedFrontend {
    pub service_id: u32,
    /// Backend ID at slots 1..=len, as written; may run past `count` while a shrink is pending.
    pub slots: Vec<u32>,
    /// The service entry's backend count; `None` while the entry is not written.
    pub count: Option<u16>,
    /// The service entry's `service_flags`.
    pub flags: u16,
    pub meta: Option<(FrontendType, String)>,
    /// Source ranges in the source-ranges map under this frontend's service ID.
    pub source_ranges: BTreeSet<IpNet>,
    /// The service entry's session-affinity timeout (seconds, 0 for none).
    pub affinity_timeout: u32,
    /// The service entry's Maglev table (0 for none).
    pub maglev_table: u32,
    /// When the entry's count went below its slots; they are deleted after the grace period.
    pub shrunk_at: Option<Instant>,
}

impl ProgrammedFrontend {
    fn new(service_id: u32) -> Self {
        Self {
            service_id,
            slots: Vec::new(),
            count: None,
            flags: 0,
            meta: None,
            source_ranges: BTreeSet::new(),
            affinity_timeout: 0,
            maglev_table: 0,
            shrunk_at: None,
        }
    }
}

/// The frontends and backends a snapshot of the maps holds, as the reconciler records them.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ProgrammedState {
    pub frontends: BTreeMap<FrontendKey, ProgrammedFrontend>,
    pub backends: BTreeMap<u32, L4Addr>,
}

/// The backends a frontend's slots within its entry's count use (every slot while the entry is
/// not written: a slot past the count is on its way out).
fn live_slots(frontend: &ProgrammedFrontend) -> impl Iterator<Item = u32> + '_ {
    frontend.slots.iter().take(frontend.count.map_or(usize::MAX, usize::from)).copied()
}

pub fn frontend_of(key: &SlotKey) -> Option<FrontendKey> {
    Some(FrontendKey {
        address: L4Addr {
            ip: key.address(),
            port: key.port(),
            protocol: Protocol::from_number(key.protocol)?,
        },
        scope: Scope::from_code(key.scope)?,
    })
}

fn backend_addr(backend: &BackendValue) -> Option<L4Addr> {
    Some(L4Addr {
        ip: backend.address(),
        port: backend.port(),
        protocol: Protocol::from_number(backend.protocol)?,
    })
}

impl ProgrammedState {
    /// Reads what the maps hold. Slots after a gap are left out (and so pruned later).
    pub fn from_snapshot(snapshot: &MapsSnapshot) -> Self {
        let mut frontends: BTreeMap<FrontendKey, ProgrammedFrontend> = BTreeMap::new();
        let mut slots: BTreeMap<FrontendKey, BTreeMap<u16, u32>> = BTreeMap::new();
        for (key, value) in &snapshot.services {
            let Some(frontend) = frontend_of(key) else { continue };
            let entry =
                frontends.entry(frontend).or_insert_with(|| ProgrammedFrontend::new(value.service_id));
            if key.backend_slot == 0 {
                entry.service_id = value.service_id;
                entry.count = Some(value.backend_count);
                entry.flags = value.flags;
                entry.affinity_timeout = value.affinity_timeout;
                entry.maglev_table = value.maglev_table;
            } else {
                slots.entry(frontend).or_default().insert(key.backend_slot, value.backend_id);
            }
        }
        for (frontend, entry) in &mut frontends {
            let found = slots.remove(frontend).unwrap_or_default();
            entry.slots = (1u16..).map_while(|slot| found.get(&slot).copied()).collect();
            // Slots past the count (a shrink in progress when they were read) go after the grace.
            if entry.slots.len() > usize::from(entry.count.unwrap_or(0)) {
                entry.shrunk_at = Some(Instant::now());
            }
            entry.meta = snapshot.service_meta.get(&entry.service_id).and_then(|meta| {
                Some((FrontendType::from_code(meta.frontend_type)?, meta.name().to_string()))
            });
            entry.source_ranges = snapshot
                .source_ranges
                .range((entry.service_id, IpNet::default())..)
                .take_while(|(id, _)| *id == entry.service_id)
                .map(|(_, range)| *range)
                .collect();
        }
        let backends = snapshot
            .backends
            .iter()
            .filter_map(|(id, backend)| Some((*id, backend_addr(backend)?)))
            .collect();
        Self { frontends, backends }
    }
}

pub struct Reconciler<M: ServiceMaps> {
    maps: M,
    state: ProgrammedState,
    backend_ids: BTreeMap<L4Addr, u32>,
    service_id_allocator: IdAllocator,
    backend_id_allocator: IdAllocator,
    /// How many live slots (within their entry's count) and Maglev tables use each backend:
    /// freeing one never scans every slot.
    backend_users: HashMap<u32, u32>,
    /// Frontends whose slots run past their count, waiting for the grace period.
    shrinking: BTreeSet<FrontendKey>,
    /// Frontends the last reconcile could not program: tried again once others are removed.
    refused: BTreeSet<FrontendKey>,
    /// The node's own addresses: backends there are host-network endpoints.
    host_addresses: BTreeSet<IpAddr>,
    /// Positions of every Maglev table this reconciler writes.
    maglev_size: u32,
    maglev_tables: BTreeMap<u32, MaglevTable>,
    table_indexes: TableIndexes,
    /// Said once that every Maglev table is in use.
    warned_tables_exhausted: bool,
    /// Backends no slot uses, since when (`set_backend_grace`).
    unused_since: BTreeMap<u32, Instant>,
    backend_grace: Duration,
}

fn service_key(frontend: &FrontendKey, slot: u16) -> SlotKey {
    let address = &frontend.address;
    SlotKey::scoped(address.ip, address.port, address.protocol.number(), frontend.scope.code(), slot)
}

/// Most backends one frontend can have: slots are numbered 1..=u16::MAX.
pub const MAX_BACKENDS_PER_FRONTEND: usize = u16::MAX as usize;

impl<M: ServiceMaps> Reconciler<M> {
    /// Starts from what the maps already hold, so a restarted daemon keeps every ID, flow and
    /// Maglev table, and the data path is not disturbed.
    pub fn restore(maps: M) -> Result<Self, MapsError> {
        Self::restore_with(maps, maglev::DEFAULT_TABLE_SIZE)
    }

    /// `restore`, with Maglev tables of `maglev_size` positions (a prime).
    pub fn restore_with(maps: M, maglev_size: u32) -> Result<Self, MapsError> {
        let mut reconciler = Self {
            maps,
            state: ProgrammedState::default(),
            backend_ids: BTreeMap::new(),
            service_id_allocator: IdAllocator::default(),
            backend_id_allocator: IdAllocator::default(),
            backend_users: HashMap::new(),
            shrinking: BTreeSet::new(),
            refused: BTreeSet::new(),
            host_addresses: BTreeSet::new(),
            maglev_size,
            maglev_tables: BTreeMap::new(),
            table_indexes: TableIndexes::default(),
            warned_tables_exhausted: false,
            unused_since: BTreeMap::new(),
            backend_grace: Duration::ZERO,
        };
        let snapshot = reconciler.maps.snapshot_with_maglev()?;
        reconciler.take_state(ProgrammedState::from_snapshot(&snapshot));
        // Tables as the maps hold them; one of another size (the flag changed) or not filled from
        // one backend set is not kept: its frontends get a new one.
        let mut tables: BTreeMap<u32, MaglevTable> = BTreeMap::new();
        for frontend in reconciler.state.frontends.values() {
            let Some(positions) = snapshot.maglev.get(&frontend.maglev_table) else { continue };
            let mut backends: Vec<u32> = positions.clone();
            backends.sort_unstable();
            backends.dedup();
            tables
                .entry(frontend.maglev_table)
                .or_insert_with(|| MaglevTable { backends, positions: positions.clone(), users: 0 })
                .users += 1;
        }
        tables.retain(|_, table| table.positions.len() == maglev_size as usize);
        reconciler.maglev_tables = tables;
        reconciler.recount();
        Ok(reconciler)
    }

    /// Forgets the in-memory record of the service maps and re-reads them, so that the next
    /// reconcile repairs entries changed or removed behind our back (a full resync). Maglev
    /// tables are trusted as recorded: reading one back costs a system call per position.
    pub fn refresh_from_maps(&mut self) -> Result<(), MapsError> {
        let state = ProgrammedState::from_snapshot(&self.maps.snapshot()?);
        self.take_state(state);
        Ok(())
    }

    fn take_state(&mut self, state: ProgrammedState) {
        self.backend_ids = state.backends.iter().map(|(id, addr)| (*addr, *id)).collect();
        self.service_id_allocator.reserve(state.frontends.values().map(|f| f.service_id).max().unwrap_or(0));
        self.backend_id_allocator.reserve(state.backends.keys().copied().max().unwrap_or(0));
        self.state = state;
        self.recount();
    }

    /// Counts every backend's users and finds the shrinking frontends from scratch (after the
    /// record was read from the maps).
    fn recount(&mut self) {
        self.backend_users.clear();
        for frontend in self.state.frontends.values() {
            for id in live_slots(frontend) {
                *self.backend_users.entry(id).or_default() += 1;
            }
        }
        for table in self.maglev_tables.values() {
            for id in &table.backends {
                *self.backend_users.entry(*id).or_default() += 1;
            }
        }
        let now = Instant::now();
        self.unused_since.retain(|id, _| !self.backend_users.contains_key(id));
        for id in self.state.backends.keys().filter(|id| !self.backend_users.contains_key(id)) {
            self.unused_since.entry(*id).or_insert(now);
        }
        self.shrinking =
            self.state.frontends.iter().filter(|(_, f)| f.shrunk_at.is_some()).map(|(key, _)| *key).collect();
    }

    /// The backends a frontend's live slots use.
    fn users_of(&self, key: &FrontendKey) -> Vec<u32> {
        self.state.frontends.get(key).map(|f| live_slots(f).collect()).unwrap_or_default()
    }

    /// Moves backend users: `taken` gain one each, `released` lose one; a backend left with
    /// none starts its grace period.
    fn tally(&mut self, released: &[u32], taken: &[u32]) {
        for id in taken {
            let users = self.backend_users.entry(*id).or_default();
            if *users == 0 {
                self.unused_since.remove(id);
            }
            *users += 1;
        }
        let now = Instant::now();
        for id in released {
            let Some(users) = self.backend_users.get_mut(id) else { continue };
            *users -= 1;
            if *users == 0 {
                self.backend_users.remove(id);
                if self.state.backends.contains_key(id) {
                    self.unused_since.insert(*id, now);
                }
            }
        }
    }

    /// IDs that flows or affinity records still name (found by the conntrack collector at
    /// start): new IDs are allocated above them.
    pub fn reserve_ids(&mut self, max_service_id: u32, max_backend_id: u32) {
        self.service_id_allocator.reserve(max_service_id);
        self.backend_id_allocator.reserve(max_backend_id);
    }

    /// The node's own addresses: backends at one of them are host-network endpoints (flagged
    /// for the data path). Rewrites the backends whose flag changes.
    pub fn set_host_addresses(&mut self, addresses: BTreeSet<IpAddr>) -> Vec<ReconcileError> {
        let mut errors = Vec::new();
        let changed: Vec<(u32, L4Addr)> = self
            .state
            .backends
            .iter()
            .filter(|(_, backend)| {
                addresses.contains(&backend.ip) != self.host_addresses.contains(&backend.ip)
            })
            .map(|(id, backend)| (*id, *backend))
            .collect();
        self.host_addresses = addresses;
        for (id, backend) in changed {
            if let Err(error) = self.maps.update_backend(id, self.backend_value(backend)) {
                errors.push(ReconcileError::UpdateBackend { backend, source: Box::new(error) });
            }
        }
        errors
    }

    fn backend_value(&self, backend: L4Addr) -> BackendValue {
        let flags = if self.host_addresses.contains(&backend.ip) { backend_flags::HOST } else { 0 };
        BackendValue::new(backend.ip, backend.port, backend.protocol.number()).with_flags(flags)
    }

    pub fn maps(&self) -> &M {
        &self.maps
    }

    /// The maps, to change behind the reconciler's back (tests inject failures so).
    #[cfg(any(test, feature = "testing"))]
    pub fn maps_mut(&mut self) -> &mut M {
        &mut self.maps
    }

    pub fn state(&self) -> &ProgrammedState {
        &self.state
    }

    pub fn maglev_tables(&self) -> &BTreeMap<u32, MaglevTable> {
        &self.maglev_tables
    }

    /// Programs `desired`, removes what it no longer has, and releases unused backends.
    /// Failures are reported per frontend; the others are still programmed.
    pub fn reconcile(&mut self, desired: &DesiredState) -> ReconcileReport {
        let mut keys: BTreeSet<FrontendKey> = desired.frontends.keys().copied().collect();
        keys.extend(self.state.frontends.keys().copied());
        self.reconcile_frontends(desired, &keys)
    }

    /// `reconcile`, for these frontends only: those a change touched. Each is programmed as
    /// `desired` has it, or removed if it has none. Frontends refused before get another try
    /// once removals made room.
    pub fn reconcile_frontends(
        &mut self,
        desired: &DesiredState,
        keys: &BTreeSet<FrontendKey>,
    ) -> ReconcileReport {
        let mut report = ReconcileReport::default();
        let mut refused: Vec<(FrontendKey, ReconcileError)> = Vec::new();
        for key in keys {
            let Some(frontend) = desired.frontends.get(key) else { continue };
            match self.program_frontend(frontend) {
                Ok(programmed) => {
                    self.refused.remove(key);
                    if programmed {
                        report.programmed += 1;
                    } else {
                        report.unchanged += 1;
                    }
                }
                Err(error) => refused.push((*key, error)),
            }
        }
        for key in keys.iter().filter(|key| !desired.frontends.contains_key(key)) {
            self.refused.remove(key);
            if !self.state.frontends.contains_key(key) {
                continue;
            }
            match self.remove_frontend(*key) {
                Ok(()) => report.removed += 1,
                Err(error) => report.errors.push(error),
            }
        }
        // What was refused (a full map, say) gets another try once removals made room.
        let earlier: Vec<FrontendKey> =
            self.refused.iter().filter(|key| !keys.contains(key)).copied().collect();
        if report.removed > 0 {
            let retry: Vec<FrontendKey> = refused.drain(..).map(|(key, _)| key).chain(earlier).collect();
            for key in retry {
                let Some(frontend) = desired.frontends.get(&key) else { continue };
                match self.program_frontend(frontend) {
                    Ok(_) => {
                        report.programmed += 1;
                        self.refused.remove(&key);
                    }
                    Err(error) => refused.push((key, error)),
                }
            }
        }
        for (key, _) in &refused {
            self.refused.insert(*key);
        }
        // Every frontend refused now, whether this reconcile or an earlier one tried it.
        report.refused = self.refused.len();
        report.errors.extend(refused.into_iter().map(|(_, error)| error));
        if let Err(error) = self.release_surplus_slots().and_then(|()| self.release_unused_backends()) {
            report.errors.push(error);
        }
        report
    }

    /// Whether slots past a lowered count or unused backends wait for their grace period: a
    /// reconcile after it deletes them.
    pub fn release_waiting(&self) -> bool {
        !self.shrinking.is_empty() || !self.unused_since.is_empty()
    }

    /// The backend's ID, writing the backend to the map first if it is new.
    /// The IDs of `backends`; new ones get an ID and are written (in one batch) first.
    fn backend_ids_for(
        &mut self,
        backends: &[L4Addr],
        map_error: impl FnOnce(MapsError) -> ReconcileError,
    ) -> Result<Vec<u32>, ReconcileError> {
        let mut ids = Vec::with_capacity(backends.len());
        let mut new: Vec<(L4Addr, u32)> = Vec::new();
        for backend in backends {
            let id = match self.backend_ids.get(backend) {
                Some(id) => *id,
                None => {
                    let id = self.backend_id_allocator.allocate("backend")?;
                    new.push((*backend, id));
                    id
                }
            };
            ids.push(id);
        }
        let writes: Vec<(u32, BackendValue)> =
            new.iter().map(|(backend, id)| (*id, self.backend_value(*backend))).collect();
        let result = self.maps.update_backends(&writes);
        let done = result.as_ref().map_or_else(|(done, _)| *done, |()| writes.len());
        let now = Instant::now();
        for (backend, id) in new.into_iter().take(done) {
            self.backend_ids.insert(backend, id);
            self.state.backends.insert(id, backend);
            // Unused until a slot takes it (and released after the grace if none does).
            self.unused_since.insert(id, now);
        }
        result.map_err(|(_, error)| map_error(error))?;
        Ok(ids)
    }

    /// Whether the maps already hold `frontend` exactly. The common case of a sync, so it
    /// allocates nothing.
    fn is_programmed(&self, frontend: &Frontend, count: u16) -> bool {
        let Some(current) = self.state.frontends.get(&frontend.key()) else { return false };
        current.count == Some(count)
            && current.flags == frontend.policy.flags()
            && current.affinity_timeout == frontend.policy.affinity_timeout
            && self.maglev_matches(current.maglev_table, frontend, &current.slots)
            && current.source_ranges.len() == frontend.policy.source_ranges.len()
            && frontend.policy.source_ranges.iter().all(|range| current.source_ranges.contains(range))
            && current.slots.len() >= frontend.backends.len()
            && current.meta.as_ref().is_some_and(|(frontend_type, name)| {
                *frontend_type == frontend.frontend_type && names_service_port(name, &frontend.service)
            })
            && frontend
                .backends
                .iter()
                .zip(&current.slots)
                .all(|(backend, slot)| self.backend_ids.get(backend) == Some(slot))
    }

    /// Whether `table` is the Maglev table `frontend` wants, given slots equal to its backends.
    fn maglev_matches(&self, table: u32, frontend: &Frontend, slots: &[u32]) -> bool {
        if !frontend.policy.maglev || frontend.backends.is_empty() {
            return table == 0;
        }
        if table == 0 && self.maglev_tables_exhausted() {
            return true; // hashing over the slots until a table frees up (the next resync)
        }
        self.maglev_tables.get(&table).is_some_and(|t| {
            t.backends.len() == slots.len() && {
                let mut sorted = slots.to_vec();
                sorted.sort_unstable();
                t.backends == sorted
            }
        })
    }

    /// Programs one frontend, keeping the backends' user counts.
    fn program_frontend(&mut self, frontend: &Frontend) -> Result<bool, ReconcileError> {
        let key = frontend.key();
        let before = self.users_of(&key);
        let result = self.write_frontend(frontend);
        let after = self.users_of(&key);
        if before != after {
            self.tally(&before, &after);
        }
        if self.state.frontends.get(&key).is_some_and(|f| f.shrunk_at.is_some()) {
            self.shrinking.insert(key);
        }
        result
    }

    fn write_frontend(&mut self, frontend: &Frontend) -> Result<bool, ReconcileError> {
        let key = frontend.key();
        let count = frontend.backends.len();
        if count <= MAX_BACKENDS_PER_FRONTEND && self.is_programmed(frontend, count as u16) {
            return Ok(false);
        }
        let service = frontend.service.to_string();
        if count > MAX_BACKENDS_PER_FRONTEND {
            return Err(ReconcileError::TooManyBackends {
                frontend: key,
                service,
                count,
                max: MAX_BACKENDS_PER_FRONTEND,
            });
        }
        let count = count as u16;
        // Unknown (a new frontend, or one a resync marked for rewriting) counts as lowered.
        let lowered =
            self.state.frontends.get(&key).and_then(|f| f.count).is_none_or(|before| before > count);
        let meta = (frontend.frontend_type, service.clone());
        let program_error = |source| ReconcileError::Program {
            frontend: key,
            service: service.clone(),
            source: Box::new(source),
        };

        let ids = self.backend_ids_for(&frontend.backends, program_error)?;
        if !self.state.frontends.contains_key(&key) {
            let service_id = self.service_id_allocator.allocate("service")?;
            self.state.frontends.insert(key, ProgrammedFrontend::new(service_id));
        }
        let service_id = self.state.frontends[&key].service_id;

        if self.state.frontends[&key].meta.as_ref() != Some(&meta) {
            self.maps
                .update_service_meta(service_id, ServiceMeta::new(frontend.frontend_type.code(), &service))
                .map_err(program_error)?;
            self.state.frontends.get_mut(&key).expect("inserted above").meta = Some(meta);
        }
        // The Maglev table, whole, before the entry may name it.
        let old_table = self.state.frontends[&key].maglev_table;
        let table = if frontend.policy.maglev && !ids.is_empty() {
            self.maglev_table_for(old_table, &ids).map_err(program_error)?
        } else {
            0
        };

        let programmed = self.state.frontends.get_mut(&key).expect("inserted above");
        let maps = &mut self.maps;
        let wanted_ranges: BTreeSet<IpNet> = frontend.policy.source_ranges.iter().copied().collect();
        let flags = frontend.policy.flags();
        let affinity_timeout = frontend.policy.affinity_timeout;
        // Slots, new source ranges (before the entry that may turn their check on), then the
        // entry. Until the entry names a new table, a failure gives the table back.
        let written = (|| -> Result<(), MapsError> {
            // The slots that differ, in one batch; the record takes those written.
            let changed: Vec<usize> =
                (0..ids.len()).filter(|index| programmed.slots.get(*index) != Some(&ids[*index])).collect();
            let writes: Vec<(SlotKey, ServiceValue)> = changed
                .iter()
                .map(|index| {
                    (
                        service_key(&key, *index as u16 + 1),
                        ServiceValue::backend_slot(service_id, ids[*index]),
                    )
                })
                .collect();
            let result = maps.update_services(&writes);
            let done = result.as_ref().map_or_else(|(done, _)| *done, |()| writes.len());
            for index in changed.into_iter().take(done) {
                match programmed.slots.get_mut(index) {
                    Some(written) => *written = ids[index],
                    None => programmed.slots.push(ids[index]),
                }
            }
            result.map_err(|(_, error)| error)?;
            for range in wanted_ranges.difference(&programmed.source_ranges.clone()) {
                maps.update_source_range(service_id, *range)?;
                programmed.source_ranges.insert(*range);
            }
            if programmed.count != Some(count)
                || programmed.flags != flags
                || programmed.affinity_timeout != affinity_timeout
                || programmed.maglev_table != table
            {
                let entry = ServiceValue {
                    affinity_timeout,
                    maglev_table: table,
                    ..ServiceValue::service_entry(service_id, count).with_flags(flags)
                };
                maps.update_service(service_key(&key, 0), entry)?;
                programmed.count = Some(count);
                programmed.flags = flags;
                programmed.affinity_timeout = affinity_timeout;
                programmed.maglev_table = table;
            }
            Ok(())
        })();
        if let Err(error) = written {
            if table != old_table && table != 0 {
                self.release_maglev_table(table);
            }
            return Err(program_error(error));
        }
        // The old table once the entry no longer names it.
        if old_table != table && old_table != 0 {
            self.release_maglev_table(old_table);
        }
        let programmed = self.state.frontends.get_mut(&key).expect("inserted above");
        // Slots past the new count go after the grace period (`release_surplus_slots`): a
        // reader that took the old count just before it changed still finds its slot. The
        // period runs from the latest lowering, not the first of several.
        if programmed.slots.len() > usize::from(count) && (lowered || programmed.shrunk_at.is_none()) {
            programmed.shrunk_at = Some(Instant::now());
        }
        // Ranges no longer wanted go after the entry: if it still checks ranges, it checks the
        // new set.
        for range in programmed.source_ranges.clone().difference(&wanted_ranges) {
            self.maps.delete_source_range(service_id, *range).map_err(program_error)?;
            programmed.source_ranges.remove(range);
        }
        Ok(true)
    }

    /// The Maglev table filled from `ids` that a frontend now naming `current` (0: none) should
    /// name, with its user count already taken. In order of preference: the table it has, if it
    /// already holds these backends; a table another frontend shares with these backends; its own
    /// table updated in place (only the positions that change); a new table.
    fn maglev_table_for(&mut self, current: u32, ids: &[u32]) -> Result<u32, MapsError> {
        let mut wanted: Vec<u32> = ids.to_vec();
        wanted.sort_unstable();
        if let Some(table) = self.maglev_tables.get(&current)
            && table.backends == wanted
        {
            return Ok(current);
        }
        if let Some((index, table)) = self.maglev_tables.iter_mut().find(|(_, t)| t.backends == wanted) {
            table.users += 1;
            return Ok(*index);
        }
        let positions = self.maglev_positions(&wanted);
        if let Some(table) = self.maglev_tables.get_mut(&current)
            && table.users == 1
        {
            let changed = maglev::changed_positions(&table.positions, &positions);
            self.maps.write_maglev_positions(current, &changed)?;
            let old = std::mem::replace(table, MaglevTable { backends: wanted.clone(), positions, users: 1 });
            self.tally(&old.backends, &wanted);
            return Ok(current);
        }
        let named: BTreeSet<u32> = self.state.frontends.values().map(|f| f.maglev_table).collect();
        let Some(index) = self.table_indexes.allocate(&self.maglev_tables, &named) else {
            // Every table in use: new flows hash over the slots instead (still correct, only
            // not consistent across nodes and backend changes).
            if !self.warned_tables_exhausted {
                self.warned_tables_exhausted = true;
                tracing::warn!(
                    tables = lb_common::capacity::MAGLEV_TABLES - 1,
                    "every Maglev table is in use: frontends without one hash over their backends"
                );
            }
            return Ok(0);
        };
        self.maps.create_maglev_table(index, &positions)?;
        self.tally(&[], &wanted);
        self.maglev_tables.insert(index, MaglevTable { backends: wanted, positions, users: 1 });
        Ok(index)
    }

    fn maglev_tables_exhausted(&self) -> bool {
        self.maglev_tables.len() >= (lb_common::capacity::MAGLEV_TABLES - 1) as usize
    }

    /// The backend ID at each position of the table for these backend IDs (sorted).
    fn maglev_positions(&self, ids: &[u32]) -> Vec<u32> {
        let mut backends: Vec<(MaglevBackend, u32)> = ids
            .iter()
            .filter_map(|id| {
                self.state.backends.get(id).map(|b| (MaglevBackend { address: b.ip, port: b.port }, *id))
            })
            .collect();
        // Sorted by what is the same on every node, so every node fills the same table.
        backends.sort();
        let order: Vec<MaglevBackend> = backends.iter().map(|(backend, _)| *backend).collect();
        maglev::populate(&order, self.maglev_size)
            .into_iter()
            .map(|index| backends[index as usize].1)
            .collect()
    }

    /// One user fewer for a table; the last one removes it.
    fn release_maglev_table(&mut self, index: u32) {
        let Some(table) = self.maglev_tables.get_mut(&index) else { return };
        table.users = table.users.saturating_sub(1);
        if table.users > 0 {
            return;
        }
        match self.maps.delete_maglev_table(index) {
            Ok(()) => {
                if let Some(table) = self.maglev_tables.remove(&index) {
                    self.tally(&table.backends, &[]);
                }
            }
            // Kept in the record with no user: the next prune removes it.
            Err(error) => {
                tracing::warn!(
                    "{}",
                    ReconcileError::RemoveMaglevTable { table: index, source: Box::new(error) }
                )
            }
        }
    }

    /// Removes one frontend, keeping the backends' user counts.
    fn remove_frontend(&mut self, key: FrontendKey) -> Result<(), ReconcileError> {
        let before = self.users_of(&key);
        let result = self.delete_frontend(key);
        let after = self.users_of(&key);
        if before != after {
            self.tally(&before, &after);
        }
        if !self.state.frontends.contains_key(&key) {
            self.shrinking.remove(&key);
        }
        result
    }

    fn delete_frontend(&mut self, key: FrontendKey) -> Result<(), ReconcileError> {
        let remove_error = |source| ReconcileError::Remove { frontend: key, source: Box::new(source) };
        let Some(programmed) = self.state.frontends.get_mut(&key) else { return Ok(()) };
        // The service entry goes first: from then on no new flow picks a slot.
        if programmed.count.is_some() {
            self.maps.delete_service(service_key(&key, 0)).map_err(remove_error)?;
            programmed.count = None;
        }
        // Its table is given back only once everything of the frontend is gone, so a retry
        // after a failed delete still gives it back.
        let table = programmed.maglev_table;
        while !programmed.slots.is_empty() {
            let slot = programmed.slots.len() as u16;
            self.maps.delete_service(service_key(&key, slot)).map_err(remove_error)?;
            programmed.slots.pop();
        }
        let service_id = programmed.service_id;
        for range in std::mem::take(&mut programmed.source_ranges) {
            if let Err(error) = self.maps.delete_source_range(service_id, range) {
                programmed.source_ranges.insert(range);
                return Err(remove_error(error));
            }
        }
        self.maps.delete_service_meta(service_id).map_err(remove_error)?;
        self.state.frontends.remove(&key);
        if table != 0 {
            self.release_maglev_table(table);
        }
        Ok(())
    }

    /// Deletes the slots past each entry's count once the count has been lowered for the grace
    /// period.
    fn release_surplus_slots(&mut self) -> Result<(), ReconcileError> {
        let now = Instant::now();
        let keys: Vec<FrontendKey> = self.shrinking.iter().copied().collect();
        for key in keys {
            let Some(programmed) = self.state.frontends.get_mut(&key) else {
                self.shrinking.remove(&key);
                continue;
            };
            let Some(shrunk_at) = programmed.shrunk_at else {
                self.shrinking.remove(&key);
                continue;
            };
            if now.duration_since(shrunk_at) < self.backend_grace {
                continue;
            }
            let count = usize::from(programmed.count.unwrap_or(0));
            while programmed.slots.len() > count {
                let slot = programmed.slots.len() as u16;
                self.maps
                    .delete_service(service_key(&key, slot))
                    .map_err(|source| ReconcileError::Remove { frontend: key, source: Box::new(source) })?;
                programmed.slots.pop();
            }
            programmed.shrunk_at = None;
            self.shrinking.remove(&key);
        }
        Ok(())
    }

    /// Deletes backends no slot or Maglev table uses any more, once they have been unused for
    /// the grace period.
    fn release_unused_backends(&mut self) -> Result<(), ReconcileError> {
        let now = Instant::now();
        let due: Vec<u32> = self
            .unused_since
            .iter()
            .filter(|(_, since)| now.duration_since(**since) >= self.backend_grace)
            .map(|(id, _)| *id)
            .collect();
        for id in due {
            let Some(backend) =
                self.state.backends.get(&id).copied().filter(|_| !self.backend_users.contains_key(&id))
            else {
                self.unused_since.remove(&id);
                continue;
            };
            self.maps
                .delete_backend(id, IpFamily::of(&backend.ip))
                .map_err(|source| ReconcileError::ReleaseBackend { backend, source: Box::new(source) })?;
            self.state.backends.remove(&id);
            self.backend_ids.remove(&backend);
            self.unused_since.remove(&id);
        }
        Ok(())
    }

    /// How long a backend no slot uses, and a slot past its entry's count, stay in the map
    /// before they are deleted. A reader that took a count or a slot just before it changed
    /// (the data path between two lookups, or a dump of the maps, which is not atomic) still
    /// finds the slot and its backend; and a backend that comes back soon (an endpoint
    /// flapping) keeps its ID.
    pub fn set_backend_grace(&mut self, grace: Duration) {
        self.backend_grace = grace;
    }

    /// Deletes map entries the reconciler does not account for: slots past a gap, entries of
    /// unknown protocols or scopes, metadata of no frontend, Maglev tables no entry names.
    /// Returns how many were deleted.
    pub fn prune(&mut self) -> Result<usize, ReconcileError> {
        let snapshot = self.maps.snapshot().map_err(prune_error)?;
        let mut deleted = 0;
        for key in snapshot.services.keys() {
            let known =
                frontend_of(key).and_then(|addr| self.state.frontends.get(&addr)).is_some_and(|programmed| {
                    match key.backend_slot {
                        0 => programmed.count.is_some(),
                        slot => usize::from(slot) <= programmed.slots.len(),
                    }
                });
            if !known {
                self.maps.delete_service(*key).map_err(prune_error)?;
                deleted += 1;
            }
        }
        let service_ids: BTreeSet<u32> = self.state.frontends.values().map(|f| f.service_id).collect();
        for id in snapshot.service_meta.keys().filter(|id| !service_ids.contains(id)) {
            self.maps.delete_service_meta(*id).map_err(prune_error)?;
            deleted += 1;
        }
        let wanted_ranges: BTreeSet<(u32, IpNet)> = self
            .state
            .frontends
            .values()
            .flat_map(|f| f.source_ranges.iter().map(|range| (f.service_id, *range)))
            .collect();
        for (id, range) in snapshot.source_ranges.difference(&wanted_ranges) {
            self.maps.delete_source_range(*id, *range).map_err(prune_error)?;
            deleted += 1;
        }
        for (id, backend) in snapshot.backends.iter().filter(|(id, _)| !self.state.backends.contains_key(id))
        {
            self.maps.delete_backend(*id, IpFamily::of(&backend.ip)).map_err(prune_error)?;
            deleted += 1;
        }
        deleted += self.prune_maglev_tables()?;
        Ok(deleted)
    }

    /// Deletes Maglev tables no frontend names and none is recorded for.
    fn prune_maglev_tables(&mut self) -> Result<usize, ReconcileError> {
        let mut deleted = 0;
        let named: BTreeSet<u32> = self.state.frontends.values().map(|f| f.maglev_table).collect();
        let unused: Vec<u32> = self
            .maglev_tables
            .iter()
            .filter(|(index, table)| table.users == 0 && !named.contains(index))
            .map(|(index, _)| *index)
            .collect();
        for index in unused {
            if let Some(table) = self.maglev_tables.remove(&index) {
                self.tally(&table.backends, &[]);
            }
        }
        for index in self.maps.maglev_tables().map_err(prune_error)? {
            if !self.maglev_tables.contains_key(&index) {
                self.maps.delete_maglev_table(index).map_err(prune_error)?;
                deleted += 1;
            }
        }
        Ok(deleted)
    }
}

/// A full resync in steps: the maps as a snapshot read them (away from the event loop)
/// compared with the record, a chunk at a time, so a resync at 100 000 Services never holds
/// a change up for long. What differs is written again as the record and the desired state
/// have it; what the record does not account for is deleted.
///
/// The snapshot may be older than writes made while the steps run: comparing it with the
/// record only ever rewrites what the record says (the same write again) or deletes what the
/// record no longer has (deleted already): never an entry written since.
pub struct Repair {
    snapshot: MapsSnapshot,
    phase: RepairPhase,
    cursor: usize,
    backends: Vec<u32>,
    frontends: Vec<FrontendKey>,
    services: Vec<SlotKey>,
    metas: Vec<u32>,
    /// Service IDs of the frontends recorded when the repair started.
    service_ids: std::collections::HashSet<u32>,
    stale_backends: Vec<(u32, IpFamily)>,
    /// Entries written again.
    pub repaired: usize,
    /// Entries deleted that the record does not account for.
    pub deleted: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RepairPhase {
    Backends,
    Frontends,
    Services,
    Metas,
    Rest,
    Done,
}

/// Entries compared per step.
const REPAIR_CHUNK: usize = 4096;

impl Repair {
    pub fn is_done(&self) -> bool {
        self.phase == RepairPhase::Done
    }
}

impl<M: ServiceMaps> Reconciler<M> {
    /// Starts a repair against a snapshot of the maps (see `Repair`).
    pub fn start_repair(&self, snapshot: MapsSnapshot) -> Repair {
        Repair {
            phase: RepairPhase::Backends,
            cursor: 0,
            backends: self.state.backends.keys().copied().collect(),
            frontends: self.state.frontends.keys().copied().collect(),
            services: snapshot.services.keys().copied().collect(),
            metas: snapshot.service_meta.keys().copied().collect(),
            service_ids: self.state.frontends.values().map(|f| f.service_id).collect(),
            stale_backends: snapshot.backends.iter().map(|(id, b)| (*id, IpFamily::of(&b.ip))).collect(),
            snapshot,
            repaired: 0,
            deleted: 0,
        }
    }

    /// One step of a repair: at most `REPAIR_CHUNK` entries compared. Returns whether it is
    /// done.
    pub fn repair_step(
        &mut self,
        repair: &mut Repair,
        desired: &DesiredState,
    ) -> Result<bool, ReconcileError> {
        let start = repair.cursor;
        let take = |len: usize| start..(start + REPAIR_CHUNK).min(len);
        match repair.phase {
            RepairPhase::Backends => {
                for index in take(repair.backends.len()) {
                    let id = repair.backends[index];
                    let Some(backend) = self.state.backends.get(&id).copied() else { continue };
                    let value = self.backend_value(backend);
                    if repair.snapshot.backends.get(&id) != Some(&value) {
                        self.maps.update_backend(id, value).map_err(prune_error)?;
                        repair.repaired += 1;
                    }
                }
                advance(repair, repair.backends.len(), RepairPhase::Frontends);
            }
            RepairPhase::Frontends => {
                for index in take(repair.frontends.len()) {
                    let key = repair.frontends[index];
                    if !self.mark_differences(&key, &repair.snapshot) {
                        continue;
                    }
                    repair.repaired += 1;
                    let result = match desired.frontends.get(&key) {
                        Some(frontend) => self.program_frontend(frontend).map(|_| ()),
                        None => self.remove_frontend(key),
                    };
                    if let Err(error) = result {
                        tracing::warn!("repairing frontend {key}: {error}");
                    }
                }
                advance(repair, repair.frontends.len(), RepairPhase::Services);
            }
            RepairPhase::Services => {
                for index in take(repair.services.len()) {
                    let key = repair.services[index];
                    if !self.accounts_for(&key) {
                        self.maps.delete_service(key).map_err(prune_error)?;
                        repair.deleted += 1;
                    }
                }
                advance(repair, repair.services.len(), RepairPhase::Metas);
            }
            RepairPhase::Metas => {
                for index in take(repair.metas.len()) {
                    let id = repair.metas[index];
                    if !repair.service_ids.contains(&id) {
                        self.maps.delete_service_meta(id).map_err(prune_error)?;
                        repair.deleted += 1;
                    }
                }
                advance(repair, repair.metas.len(), RepairPhase::Rest);
            }
            RepairPhase::Rest => {
                for index in take(repair.stale_backends.len()) {
                    let (id, family) = repair.stale_backends[index];
                    if !self.state.backends.contains_key(&id) {
                        self.maps.delete_backend(id, family).map_err(prune_error)?;
                        repair.deleted += 1;
                    }
                }
                advance(repair, repair.stale_backends.len(), RepairPhase::Done);
                if repair.phase == RepairPhase::Done {
                    let wanted: BTreeSet<(u32, IpNet)> = self
                        .state
                        .frontends
                        .values()
                        .flat_map(|f| f.source_ranges.iter().map(|range| (f.service_id, *range)))
                        .collect();
                    for (id, range) in repair.snapshot.source_ranges.difference(&wanted) {
                        self.maps.delete_source_range(*id, *range).map_err(prune_error)?;
                        repair.deleted += 1;
                    }
                    repair.deleted += self.prune_maglev_tables()?;
                }
            }
            RepairPhase::Done => {}
        }
        Ok(repair.is_done())
    }

    /// Whether the record accounts for a services-map entry.
    fn accounts_for(&self, key: &SlotKey) -> bool {
        frontend_of(key).and_then(|addr| self.state.frontends.get(&addr)).is_some_and(|programmed| match key
            .backend_slot
        {
            0 => programmed.count.is_some(),
            slot => usize::from(slot) <= programmed.slots.len(),
        })
    }

    /// Compares one frontend's record with the snapshot and marks in the record what the maps
    /// do not hold as recorded (a slot as backend 0, the entry or metadata as unwritten, the
    /// source ranges as found), so programming it writes them again. Returns whether anything
    /// differed.
    fn mark_differences(&mut self, key: &FrontendKey, snapshot: &MapsSnapshot) -> bool {
        let Some(programmed) = self.state.frontends.get(key) else { return false };
        let id = programmed.service_id;
        let entry_ok = match programmed.count {
            Some(count) => {
                let expected = ServiceValue {
                    affinity_timeout: programmed.affinity_timeout,
                    maglev_table: programmed.maglev_table,
                    ..ServiceValue::service_entry(id, count).with_flags(programmed.flags)
                };
                snapshot.services.get(&service_key(key, 0)) == Some(&expected)
            }
            None => true,
        };
        let slots_ok: Vec<bool> = programmed
            .slots
            .iter()
            .enumerate()
            .map(|(index, backend)| {
                snapshot.services.get(&service_key(key, index as u16 + 1))
                    == Some(&ServiceValue::backend_slot(id, *backend))
            })
            .collect();
        let meta_ok = programmed.meta.as_ref().is_none_or(|(frontend_type, name)| {
            snapshot.service_meta.get(&id) == Some(&ServiceMeta::new(frontend_type.code(), name))
        });
        let ranges: BTreeSet<IpNet> = snapshot
            .source_ranges
            .range((id, IpNet::default())..)
            .take_while(|(range_id, _)| *range_id == id)
            .map(|(_, range)| *range)
            .collect();
        let ranges_ok = ranges == programmed.source_ranges;
        if entry_ok && meta_ok && ranges_ok && slots_ok.iter().all(|ok| *ok) {
            return false;
        }
        let programmed = self.state.frontends.get_mut(key).expect("looked up above");
        if !entry_ok {
            programmed.count = None;
        }
        for (slot, ok) in programmed.slots.iter_mut().zip(&slots_ok) {
            if !ok {
                *slot = 0; // no backend has ID 0: the slot is written again
            }
        }
        if !meta_ok {
            programmed.meta = None;
        }
        programmed.source_ranges = ranges;
        true
    }
}

fn advance(repair: &mut Repair, len: usize, next: RepairPhase) {
    repair.cursor += REPAIR_CHUNK;
    if repair.cursor >= len {
        repair.cursor = 0;
        repair.phase = next;
    }
}

/// `name` == `service.to_string()`, without building the string.
fn names_service_port(name: &str, service: &ServicePortName) -> bool {
    let Some(rest) = name.strip_prefix(service.namespace.as_str()).and_then(|r| r.strip_prefix('/')) else {
        return false;
    };
    let Some(rest) = rest.strip_prefix(service.name.as_str()) else { return false };
    if service.port.is_empty() {
        rest.is_empty()
    } else {
        rest.strip_prefix(':') == Some(service.port.as_str())
    }
}

fn prune_error(source: MapsError) -> ReconcileError {
    ReconcileError::Prune(Box::new(source))
}

/// One line per map entry, sorted: the golden-test view of the maps.
pub fn render_snapshot(snapshot: &MapsSnapshot) -> String {
    let mut out = String::new();
    let addr = |ip: IpAddr, port: u16, protocol: u8| {
        let protocol = Protocol::from_number(protocol).map_or(format!("proto{protocol}"), |p| p.to_string());
        format!("{}/{protocol}", std::net::SocketAddr::new(ip, port))
    };
    for (key, value) in &snapshot.services {
        let frontend = addr(key.address(), key.port(), key.protocol);
        if key.backend_slot == 0 {
            out += &format!(
                "service {frontend}{} slot 0: service_id={} backend_count={}{}{}{}\n",
                if key.scope == lb_common::scope::INTERNAL { " (in-cluster)" } else { "" },
                value.service_id,
                value.backend_count,
                match value.flags {
                    0 => String::new(),
                    flags => format!(" flags={}", flag_names(flags)),
                },
                match value.affinity_timeout {
                    0 => String::new(),
                    seconds => format!(" affinity={seconds}s"),
                },
                match value.maglev_table {
                    0 => String::new(),
                    table => format!(" maglev_table={table}"),
                }
            );
        } else {
            out += &format!(
                "service {frontend}{} slot {}: service_id={} backend_id={}\n",
                if key.scope == lb_common::scope::INTERNAL { " (in-cluster)" } else { "" },
                key.backend_slot,
                value.service_id,
                value.backend_id
            );
        }
    }
    for (id, backend) in &snapshot.backends {
        out += &format!("backend {id}: {}\n", addr(backend.address(), backend.port(), backend.protocol));
    }
    for (id, meta) in &snapshot.service_meta {
        let kind = FrontendType::from_code(meta.frontend_type)
            .map_or(format!("type{}", meta.frontend_type), |t| t.to_string());
        out += &format!("meta {id}: {kind} {}\n", meta.name());
    }
    for (id, range) in &snapshot.source_ranges {
        out += &format!("source range {id}: {range}\n");
    }
    for (table, positions) in &snapshot.maglev {
        let mut owned: BTreeMap<u32, usize> = BTreeMap::new();
        positions.iter().for_each(|backend| *owned.entry(*backend).or_default() += 1);
        let owned: Vec<String> = owned.iter().map(|(backend, count)| format!("{backend}x{count}")).collect();
        out += &format!(
            "maglev table {table}: {} positions: backend_id x positions {}\n",
            positions.len(),
            owned.join(" ")
        );
    }
    out
}

/// `service_flags` as names joined by `|`, for display.
pub fn flag_names(flags: u16) -> String {
    use lb_common::service_flags::*;
    let names: Vec<&str> = [
        (SNAT, "snat"),
        (SOURCE_RANGES, "source-ranges"),
        (DROP_WHEN_EMPTY, "drop-when-empty"),
        (LOCAL_POLICY, "local"),
        (NODE_ADDRESS, "node-address"),
        (EXTERNAL, "external"),
        (TWO_SCOPES, "two-scopes"),
    ]
    .iter()
    .filter(|(bit, _)| flags & bit != 0)
    .map(|(_, name)| *name)
    .collect();
    names.join("|")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_port_names_match_their_display_form_only() {
        let named = ServicePortName { namespace: "ns".into(), name: "web".into(), port: "http".into() };
        let unnamed = ServicePortName { port: String::new(), ..named.clone() };
        for service in [&named, &unnamed] {
            assert!(names_service_port(&service.to_string(), service));
        }
        for other in
            ["ns/web", "ns/web:https", "ns/webb:http", "ns/web:http:", "nsx/web:http", "ns:web:http", ""]
        {
            assert!(!names_service_port(other, &named), "{other}");
        }
        assert!(!names_service_port("ns/web:http", &unnamed));
    }
}
