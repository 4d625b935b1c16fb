//! Makes the service maps hold the desired state, with ordered, idempotent writes:
//!
//! - backends are written before any slot points at them, and deleted only once no slot does;
//! - a frontend's slots are written before its service entry (slot 0) announces their count,
//!   and surplus slots are deleted only after the entry stopped counting them; so the data path
//!   never sees a half-written service;
//! - the in-memory record of what is programmed changes only after a write succeeded, so a
//!   failed reconcile is simply retried by the next one.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

use lb_common::{Backend, ServiceKey, ServiceMeta, ServiceValue};

use crate::maps::{MapsError, MapsSnapshot, ServiceMaps};
use crate::model::{DesiredState, Frontend, FrontendType, L4Addr, Protocol, ServicePortName};

#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error("programming frontend {frontend} ({service}): {source}")]
    Program {
        frontend: L4Addr,
        service: String,
        #[source]
        source: Box<MapsError>,
    },
    #[error("removing frontend {frontend}: {source}")]
    Remove {
        frontend: L4Addr,
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
    TooManyBackends { frontend: L4Addr, service: String, count: usize, max: usize },
    #[error("no free {what} ID left")]
    IdsExhausted { what: &'static str },
    #[error("pruning stale map entries: {0}")]
    Prune(#[source] Box<MapsError>),
}

/// What one reconcile did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ReconcileReport {
    pub programmed: usize,
    pub removed: usize,
    pub unchanged: usize,
    pub errors: Vec<String>,
}

/// Hands out small integer IDs, reusing released ones.
#[derive(Debug, Default)]
struct IdAllocator {
    next: u32,
    free: BTreeSet<u32>,
}

impl IdAllocator {
    fn allocate(&mut self, what: &'static str) -> Result<u32, ReconcileError> {
        if let Some(id) = self.free.pop_first() {
            return Ok(id);
        }
        self.next = self.next.max(1);
        let id = self.next;
        self.next = self.next.checked_add(1).ok_or(ReconcileError::IdsExhausted { what })?;
        Ok(id)
    }

    fn release(&mut self, id: u32) {
        self.free.insert(id);
    }

    /// Rebuilds the allocator from IDs found in use.
    fn from_used(used: impl IntoIterator<Item = u32>) -> Self {
        let used: BTreeSet<u32> = used.into_iter().collect();
        let next = used.last().map_or(1, |max| max + 1);
        let free = (1..next).filter(|id| !used.contains(id)).collect();
        Self { next, free }
    }
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
    pub source_ranges: BTreeSet<Ipv4Net>,
}

/// The frontends and backends a snapshot of the maps holds, as the reconciler records them.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ProgrammedState {
    pub frontends: BTreeMap<L4Addr, ProgrammedFrontend>,
    pub backends: BTreeMap<u32, L4Addr>,
}

fn frontend_of(key: &ServiceKey) -> Option<L4Addr> {
    Some(L4Addr { ip: key.address(), port: key.port(), protocol: Protocol::from_number(key.protocol)? })
}

fn backend_addr(backend: &Backend) -> Option<L4Addr> {
    Some(L4Addr {
        ip: backend.address(),
        port: backend.port(),
        protocol: Protocol::from_number(backend.protocol)?,
    })
}

impl ProgrammedState {
    /// Reads what the maps hold. Slots after a gap are left out (and so pruned later).
    pub fn from_snapshot(snapshot: &MapsSnapshot) -> Self {
        let mut frontends: BTreeMap<L4Addr, ProgrammedFrontend> = BTreeMap::new();
        let mut slots: BTreeMap<L4Addr, BTreeMap<u16, u32>> = BTreeMap::new();
        for (key, value) in &snapshot.services {
            let Some(frontend) = frontend_of(key) else { continue };
            let entry = frontends.entry(frontend).or_insert_with(|| ProgrammedFrontend {
                service_id: value.service_id,
                slots: Vec::new(),
                count: None,
                flags: 0,
                meta: None,
                source_ranges: BTreeSet::new(),
            });
            if key.backend_slot == 0 {
                entry.service_id = value.service_id;
                entry.count = Some(value.backend_count);
                entry.flags = value.flags;
            } else {
                slots.entry(frontend).or_default().insert(key.backend_slot, value.backend_id);
            }
        }
        for (frontend, entry) in &mut frontends {
            let found = slots.remove(frontend).unwrap_or_default();
            entry.slots = (1u16..).map_while(|slot| found.get(&slot).copied()).collect();
            entry.meta = snapshot.service_meta.get(&entry.service_id).and_then(|meta| {
                Some((FrontendType::from_code(meta.frontend_type)?, meta.name().to_string()))
            });
            entry.source_ranges = snapshot
                .source_ranges
                .range((entry.service_id, Ipv4Net::default())..)
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
    /// Backends may be unused without a write of ours: after a re-read, or a failed release.
    release_pending: bool,
}

fn service_key(frontend: &L4Addr, slot: u16) -> ServiceKey {
    ServiceKey::new(frontend.ip, frontend.port, frontend.protocol.number(), slot)
}

/// Most backends one frontend can have: slots are numbered 1..=u16::MAX.
pub const MAX_BACKENDS_PER_FRONTEND: usize = u16::MAX as usize;

impl<M: ServiceMaps> Reconciler<M> {
    /// Starts from what the maps already hold, so a restarted daemon keeps every ID and the
    /// data path is not disturbed.
    pub fn restore(maps: M) -> Result<Self, MapsError> {
        let mut reconciler = Self {
            maps,
            state: ProgrammedState::default(),
            backend_ids: BTreeMap::new(),
            service_id_allocator: IdAllocator::default(),
            backend_id_allocator: IdAllocator::default(),
            release_pending: true,
        };
        reconciler.refresh_from_maps()?;
        Ok(reconciler)
    }

    /// Forgets the in-memory record and re-reads what the maps hold, so that the next
    /// reconcile repairs entries changed or removed behind our back (a full resync).
    pub fn refresh_from_maps(&mut self) -> Result<(), MapsError> {
        let state = ProgrammedState::from_snapshot(&self.maps.snapshot()?);
        self.backend_ids = state.backends.iter().map(|(id, addr)| (*addr, *id)).collect();
        self.service_id_allocator = IdAllocator::from_used(state.frontends.values().map(|f| f.service_id));
        self.backend_id_allocator = IdAllocator::from_used(state.backends.keys().copied());
        self.state = state;
        self.release_pending = true;
        Ok(())
    }

    pub fn maps(&self) -> &M {
        &self.maps
    }

    pub fn state(&self) -> &ProgrammedState {
        &self.state
    }

    /// Programs `desired`, removes what it no longer has, and releases unused backends.
    /// Failures are reported per frontend; the others are still programmed.
    pub fn reconcile(&mut self, desired: &DesiredState) -> ReconcileReport {
        let mut report = ReconcileReport::default();
        for frontend in desired.frontends.values() {
            match self.program_frontend(frontend) {
                Ok(true) => report.programmed += 1,
                Ok(false) => report.unchanged += 1,
                Err(error) => report.errors.push(error.to_string()),
            }
        }
        let stale: Vec<L4Addr> = self
            .state
            .frontends
            .keys()
            .filter(|addr| !desired.frontends.contains_key(addr))
            .copied()
            .collect();
        for frontend in stale {
            match self.remove_frontend(frontend) {
                Ok(()) => report.removed += 1,
                Err(error) => report.errors.push(error.to_string()),
            }
        }
        // Backends can only have lost their last user if something was written (or an
        // earlier release failed); skipping the scan keeps an idle sync cheap.
        if report.programmed + report.removed > 0 || !report.errors.is_empty() || self.release_pending {
            self.release_pending = false;
            if let Err(error) = self.release_unused_backends() {
                self.release_pending = true;
                report.errors.push(error.to_string());
            }
        }
        report
    }

    /// The backend's ID, writing the backend to the map first if it is new.
    fn backend_id(
        &mut self,
        backend: L4Addr,
        map_error: impl FnOnce(MapsError) -> ReconcileError,
    ) -> Result<u32, ReconcileError> {
        if let Some(id) = self.backend_ids.get(&backend) {
            return Ok(*id);
        }
        let id = self.backend_id_allocator.allocate("backend")?;
        let written =
            self.maps.update_backend(id, Backend::new(backend.ip, backend.port, backend.protocol.number()));
        if let Err(error) = written {
            self.backend_id_allocator.release(id);
            return Err(map_error(error));
        }
        self.backend_ids.insert(backend, id);
        self.state.backends.insert(id, backend);
        Ok(id)
    }

    /// Returns whether anything was written.
    /// Whether the maps already hold `frontend` exactly. The common case of a sync, so it
    /// allocates nothing.
    fn is_programmed(&self, frontend: &Frontend, count: u16) -> bool {
        let Some(current) = self.state.frontends.get(&frontend.address) else { return false };
        current.count == Some(count)
            && current.flags == frontend.policy.flags()
            && current.source_ranges.len() == frontend.policy.source_ranges.len()
            && frontend.policy.source_ranges.iter().all(|range| current.source_ranges.contains(range))
            && current.slots.len() == frontend.backends.len()
            && current.meta.as_ref().is_some_and(|(frontend_type, name)| {
                *frontend_type == frontend.frontend_type && names_service_port(name, &frontend.service)
            })
            && frontend
                .backends
                .iter()
                .zip(&current.slots)
                .all(|(backend, slot)| self.backend_ids.get(backend) == Some(slot))
    }

    fn program_frontend(&mut self, frontend: &Frontend) -> Result<bool, ReconcileError> {
        let addr = frontend.address;
        let count = frontend.backends.len();
        if count <= MAX_BACKENDS_PER_FRONTEND && self.is_programmed(frontend, count as u16) {
            return Ok(false);
        }
        let service = frontend.service.to_string();
        if count > MAX_BACKENDS_PER_FRONTEND {
            return Err(ReconcileError::TooManyBackends {
                frontend: addr,
                service,
                count,
                max: MAX_BACKENDS_PER_FRONTEND,
            });
        }
        let count = count as u16;
        let meta = (frontend.frontend_type, service.clone());
        let program_error = |source| ReconcileError::Program {
            frontend: addr,
            service: service.clone(),
            source: Box::new(source),
        };

        if self.is_programmed(frontend, count) {
            return Ok(false);
        }

        let mut ids = Vec::with_capacity(frontend.backends.len());
        for backend in &frontend.backends {
            ids.push(self.backend_id(*backend, program_error)?);
        }
        if !self.state.frontends.contains_key(&addr) {
            let service_id = self.service_id_allocator.allocate("service")?;
            self.state.frontends.insert(
                addr,
                ProgrammedFrontend {
                    service_id,
                    slots: Vec::new(),
                    count: None,
                    flags: 0,
                    meta: None,
                    source_ranges: BTreeSet::new(),
                },
            );
        }
        let programmed = self.state.frontends.get_mut(&addr).expect("inserted above");
        let service_id = programmed.service_id;

        if programmed.meta.as_ref() != Some(&meta) {
            self.maps
                .update_service_meta(service_id, ServiceMeta::new(frontend.frontend_type.code(), &service))
                .map_err(program_error)?;
            programmed.meta = Some(meta);
        }
        for (index, id) in ids.iter().enumerate() {
            if programmed.slots.get(index) == Some(id) {
                continue;
            }
            let slot = index as u16 + 1;
            self.maps
                .update_service(service_key(&addr, slot), ServiceValue::backend_slot(service_id, *id))
                .map_err(program_error)?;
            match programmed.slots.get_mut(index) {
                Some(written) => *written = *id,
                None => programmed.slots.push(*id),
            }
        }
        // New source ranges before the entry that may turn their check on.
        let wanted_ranges: BTreeSet<Ipv4Net> = frontend.policy.source_ranges.iter().copied().collect();
        for range in wanted_ranges.difference(&programmed.source_ranges.clone()) {
            self.maps.update_source_range(service_id, *range).map_err(program_error)?;
            programmed.source_ranges.insert(*range);
        }
        let flags = frontend.policy.flags();
        if programmed.count != Some(count) || programmed.flags != flags {
            self.maps
                .update_service(
                    service_key(&addr, 0),
                    ServiceValue::service_entry(service_id, count).with_flags(flags),
                )
                .map_err(program_error)?;
            programmed.count = Some(count);
            programmed.flags = flags;
        }
        while programmed.slots.len() > usize::from(count) {
            let slot = programmed.slots.len() as u16;
            self.maps.delete_service(service_key(&addr, slot)).map_err(program_error)?;
            programmed.slots.pop();
        }
        // Ranges no longer wanted go after the entry: if it still checks ranges, it checks the
        // new set.
        for range in programmed.source_ranges.clone().difference(&wanted_ranges) {
            self.maps.delete_source_range(service_id, *range).map_err(program_error)?;
            programmed.source_ranges.remove(range);
        }
        Ok(true)
    }

    fn remove_frontend(&mut self, addr: L4Addr) -> Result<(), ReconcileError> {
        let remove_error = |source| ReconcileError::Remove { frontend: addr, source: Box::new(source) };
        let Some(programmed) = self.state.frontends.get_mut(&addr) else { return Ok(()) };
        // The service entry goes first: from then on no new flow picks a slot.
        if programmed.count.is_some() {
            self.maps.delete_service(service_key(&addr, 0)).map_err(remove_error)?;
            programmed.count = None;
        }
        while !programmed.slots.is_empty() {
            let slot = programmed.slots.len() as u16;
            self.maps.delete_service(service_key(&addr, slot)).map_err(remove_error)?;
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
        self.state.frontends.remove(&addr);
        self.service_id_allocator.release(service_id);
        Ok(())
    }

    fn release_unused_backends(&mut self) -> Result<(), ReconcileError> {
        let referenced: BTreeSet<u32> =
            self.state.frontends.values().flat_map(|f| f.slots.iter().copied()).collect();
        let unused: Vec<(u32, L4Addr)> = self
            .state
            .backends
            .iter()
            .filter(|(id, _)| !referenced.contains(id))
            .map(|(id, addr)| (*id, *addr))
            .collect();
        for (id, backend) in unused {
            self.maps
                .delete_backend(id)
                .map_err(|source| ReconcileError::ReleaseBackend { backend, source: Box::new(source) })?;
            self.state.backends.remove(&id);
            self.backend_ids.remove(&backend);
            self.backend_id_allocator.release(id);
        }
        Ok(())
    }

    /// Deletes map entries the reconciler does not account for: slots past a gap, entries of
    /// unknown protocols, metadata of no frontend. Returns how many were deleted.
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
        let wanted_ranges: BTreeSet<(u32, Ipv4Net)> = self
            .state
            .frontends
            .values()
            .flat_map(|f| f.source_ranges.iter().map(|range| (f.service_id, *range)))
            .collect();
        for (id, range) in snapshot.source_ranges.difference(&wanted_ranges) {
            self.maps.delete_source_range(*id, *range).map_err(prune_error)?;
            deleted += 1;
        }
        for id in snapshot.backends.keys().filter(|id| !self.state.backends.contains_key(id)) {
            self.maps.delete_backend(*id).map_err(prune_error)?;
            deleted += 1;
        }
        Ok(deleted)
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
    let addr = |ip: Ipv4Addr, port: u16, protocol: u8| {
        let protocol = Protocol::from_number(protocol).map_or(format!("proto{protocol}"), |p| p.to_string());
        format!("{ip}:{port}/{protocol}")
    };
    for (key, value) in &snapshot.services {
        let frontend = addr(key.address(), key.port(), key.protocol);
        if key.backend_slot == 0 {
            out += &format!(
                "service {frontend} slot 0: service_id={} backend_count={}{}\n",
                value.service_id,
                value.backend_count,
                match value.flags {
                    0 => String::new(),
                    flags => format!(" flags={}", flag_names(flags)),
                }
            );
        } else {
            out += &format!(
                "service {frontend} slot {}: service_id={} backend_id={}\n",
                key.backend_slot, value.service_id, value.backend_id
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
