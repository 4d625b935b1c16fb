//! The conntrack table from userspace: the collector that ends flows, and the listing behind
//! `lb conntrack`.
//!
//! The data path records flows and moves their TCP state; it never removes a live one (the
//! table is a plain hash: full means new flows are refused and counted). The collector, on its
//! own thread, passes over the table every `--conntrack-gc-interval` and soon after a change to
//! the Services, and for each flow (both its entries at once):
//!
//! - removes it once it has been idle longer than its state allows (kube-proxy's and the
//!   kernel's timeouts, as flags); an ended TCP flow (both FINs, or a RST) goes after 10 s;
//! - when its backend is no longer a serving endpoint of its frontend (removed, or the frontend
//!   itself removed): removes a UDP flow at once, so the client's next datagram picks a live
//!   backend (kube-proxy's stale UDP cleanup); marks a TCP flow so that the client's next
//!   packet is answered with a RST rather than silently moved to another pod mid-stream;
//! - removes session-affinity records that expired or whose backend left the frontend.
//!
//! A flow to a backend that is terminating but still serving keeps going.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use aya::maps::{Array, HashMap as BpfHashMap, Map, MapData, MapError};
use lb_common::{
    AffinityKeyOf, AffinityValue, ConntrackEntryOf, FlowKeyOf, In6, PROTOCOL_TCP, conntrack_flags as cf,
    conntrack_state as cs, map_names, stats,
};

use crate::dataplane::maps::FamilyAddress;

/// How long a flow may stay idle, by state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    /// TCP, the client's SYN seen and nothing back (the kernel's syn_sent).
    pub tcp_syn_sent: Duration,
    /// TCP, established (kube-proxy's `--conntrack-tcp-timeout-established`).
    pub tcp_established: Duration,
    /// TCP, one side closed (kube-proxy's `--conntrack-tcp-timeout-close-wait`); also flows
    /// whose backend is gone, which wait for the client's next packet to answer it with a RST.
    pub tcp_closing: Duration,
    /// TCP, both sides closed or reset (the kernel's close): ended flows' tuples are free for
    /// new flows at once, this only bounds how long their entries linger.
    pub tcp_closed: Duration,
    /// UDP, only the client has sent (the kernel's udp timeout).
    pub udp: Duration,
    /// UDP, both sides have sent (the kernel's udp_stream timeout).
    pub udp_stream: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            tcp_syn_sent: Duration::from_secs(120),
            tcp_established: Duration::from_secs(24 * 3600),
            tcp_closing: Duration::from_secs(3600),
            tcp_closed: Duration::from_secs(10),
            udp: Duration::from_secs(30),
            udp_stream: Duration::from_secs(120),
        }
    }
}

impl Timeouts {
    fn for_state(&self, state: u8, backend_gone: bool) -> Duration {
        let timeout = match state {
            cs::TCP_SYN_SENT => self.tcp_syn_sent,
            cs::TCP_ESTABLISHED => self.tcp_established,
            cs::TCP_CLOSING => self.tcp_closing,
            cs::TCP_CLOSED => self.tcp_closed,
            cs::UDP_REPLIED => self.udp_stream,
            _ => self.udp,
        };
        if backend_gone { timeout.min(self.tcp_closing) } else { timeout }
    }
}

/// What flows to one frontend may keep.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FrontendFlows {
    /// Backends (address, port in network byte order as in the entries) that are still
    /// serving endpoints: UDP flows to any other are ended.
    pub serving: HashSet<(IpAddr, u16)>,
    /// Backends the Service still lists, whatever their conditions: TCP flows to any other are
    /// reset.
    pub listed: HashSet<(IpAddr, u16)>,
}

/// What affinity records of one frontend (by service ID) may keep.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AffinityPolicy {
    /// Backend IDs new flows may go to: a record naming another one is stale.
    pub backend_ids: HashSet<u32>,
    /// Session-affinity timeout in seconds (0: none).
    pub timeout: u32,
}

/// A frontend as flows carry it: address, port (network byte order) and protocol.
pub type FrontendAddress = (IpAddr, u16, u8);

/// What the collector judges flows by, made by the run loop after each sync.
#[derive(Clone, Debug, Default)]
pub struct FlowPolicy {
    /// By frontend address, every scope's backends together: a flow is judged by the address
    /// it was sent to, so a frontend whose entry changed (a scope added or removed, a new
    /// service ID) does not end flows whose backend still serves there.
    pub frontends: HashMap<FrontendAddress, FrontendFlows>,
    /// By service ID, for the affinity records.
    pub affinity: HashMap<u32, AffinityPolicy>,
    /// When this policy was made (CLOCK_MONOTONIC ns): a flow tracked after it may go to a
    /// backend it does not know yet, and is not judged by it.
    pub made_ns: u64,
}

impl PartialEq for FlowPolicy {
    /// Equal when they would judge alike, whenever made.
    fn eq(&self, other: &Self) -> bool {
        self.frontends == other.frontends && self.affinity == other.affinity
    }
}

impl FlowPolicy {
    /// Whether a flow to `frontend` whose backend is `backend` may go on.
    fn keeps(&self, frontend: FrontendAddress, backend: (IpAddr, u16)) -> bool {
        self.frontends.get(&frontend).is_some_and(|f| {
            if frontend.2 == PROTOCOL_TCP {
                f.listed.contains(&backend)
            } else {
                f.serving.contains(&backend)
            }
        })
    }
}

/// What one pass did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PassReport {
    /// Conntrack entries the pass found.
    pub entries: u64,
    /// Session-affinity records the pass found.
    pub affinity_entries: u64,
    /// Flows to a backend the policy does not keep, too new to be judged by it (they may go
    /// to a backend it does not know yet): judged by a pass soon after.
    pub unjudged: u64,
    pub expired: u64,
    pub backend_gone_removed: u64,
    pub backend_gone_marked: u64,
    pub affinity_removed: u64,
    /// The highest service and backend IDs any entry or record names.
    pub max_service_id: u32,
    pub max_backend_id: u32,
}

impl PassReport {
    /// Adds another family's pass.
    fn add(&mut self, other: &PassReport) {
        self.entries += other.entries;
        self.affinity_entries += other.affinity_entries;
        self.unjudged += other.unjudged;
        self.expired += other.expired;
        self.backend_gone_removed += other.backend_gone_removed;
        self.backend_gone_marked += other.backend_gone_marked;
        self.affinity_removed += other.affinity_removed;
        self.max_service_id = self.max_service_id.max(other.max_service_id);
        self.max_backend_id = self.max_backend_id.max(other.max_backend_id);
    }
}

/// A family's conntrack entries, by key.
pub type FlowEntries<A> = Vec<(FlowKeyOf<A>, ConntrackEntryOf<A>)>;

/// One family's tables the collector works on (addresses `A`: `u32` or `In6`), behind a trait
/// so its decisions are tested without root.
pub trait FlowTables<A: FamilyAddress> {
    fn conntrack(&self) -> Result<FlowEntries<A>, MapError>;
    /// One entry as it is now.
    fn flow_entry(&self, key: &FlowKeyOf<A>) -> Result<Option<ConntrackEntryOf<A>>, MapError>;
    fn remove_flow_entry(&mut self, key: &FlowKeyOf<A>) -> Result<(), MapError>;
    fn update_flow_entry(&mut self, key: &FlowKeyOf<A>, entry: &ConntrackEntryOf<A>) -> Result<(), MapError>;
    fn affinity(&self) -> Result<Vec<(AffinityKeyOf<A>, AffinityValue)>, MapError>;
    fn remove_affinity(&mut self, key: &AffinityKeyOf<A>) -> Result<(), MapError>;
}

/// The data path's clock: CLOCK_MONOTONIC, which `bpf_ktime_get_coarse_ns` reads too.
pub fn monotonic_ns() -> u64 {
    let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).expect("CLOCK_MONOTONIC");
    now.tv_sec() as u64 * 1_000_000_000 + now.tv_nsec() as u64
}

fn ignore_missing(result: Result<(), MapError>) -> Result<(), MapError> {
    match result {
        Err(MapError::KeyNotFound) => Ok(()),
        Err(MapError::SyscallError(error)) if error.io_error.raw_os_error() == Some(nix::libc::ENOENT) => {
            Ok(())
        }
        other => other,
    }
}

/// One pass over the tables at time `now` (monotonic nanoseconds). Activity before `since`
/// (when this lb started publishing the clock) counts as activity at `since`: while no lb ran,
/// the published clock stood still, so older stamps say nothing about idleness.
pub fn collect<A: FamilyAddress + std::hash::Hash + Eq>(
    tables: &mut impl FlowTables<A>,
    policy: &FlowPolicy,
    timeouts: &Timeouts,
    now: u64,
    since: u64,
) -> Result<PassReport, MapError> {
    let entries: HashMap<FlowKeyOf<A>, ConntrackEntryOf<A>> = tables.conntrack()?.into_iter().collect();
    let mut report = PassReport { entries: entries.len() as u64, ..Default::default() };
    let mut done: HashSet<FlowKeyOf<A>> = HashSet::new();
    for (key, entry) in &entries {
        report.max_service_id = report.max_service_id.max(entry.service_id);
        report.max_backend_id = report.max_backend_id.max(entry.backend_id);
        if done.contains(key) {
            continue;
        }
        // A flow is its client-side entry and the reply entry that points back at it; an entry
        // whose other half is gone is a flow of its own.
        let peer_key = entry.peer_key(key.protocol);
        let peer = entries.get(&peer_key).filter(|peer| peer.peer_key(key.protocol) == *key);
        if entry.is_reply() && peer.is_some() {
            continue; // handled with its client-side entry
        }
        done.insert(*key);
        let mut flow: Vec<(FlowKeyOf<A>, ConntrackEntryOf<A>)> = vec![(*key, *entry)];
        if let Some(peer) = peer {
            done.insert(peer_key);
            flow.push((peer_key, *peer));
        }
        // The frontend the client sent to and the backend: from the client side's key and
        // entry, or, for a lone reply entry, from what it rewrites and where it comes from.
        let (frontend, backend) = if entry.is_reply() {
            ((entry.src_address.ip(), entry.src_port, key.protocol), (key.src_address.ip(), key.src_port))
        } else {
            ((key.dst_address.ip(), key.dst_port, key.protocol), (entry.dst_address.ip(), entry.dst_port))
        };
        let last_seen = flow.iter().map(|(_, e)| e.last_seen_ns).max().unwrap_or(0).max(since);
        let idle = Duration::from_nanos(now.saturating_sub(last_seen));
        // A flow tracked after the policy was made (the published clock lags by up to a tick)
        // may go to a backend the policy does not know yet.
        let newer = entry.created_ns.saturating_add(2 * lb_common::CLOCK_TICK_NS) > policy.made_ns;
        let kept = policy.keeps(frontend, backend);
        if newer && !kept {
            report.unjudged += 1;
        }
        let gone = !newer && !kept;
        let marked = entry.flags & cf::BACKEND_GONE != 0;

        if gone && key.protocol != PROTOCOL_TCP {
            if remove_flow(tables, &flow, false)? {
                report.backend_gone_removed += 1;
            }
        } else if idle > timeouts.for_state(entry.state, marked) {
            if remove_flow(tables, &flow, true)? {
                report.expired += 1;
            }
        } else if gone && !marked && entry.state != cs::TCP_CLOSED && mark_gone(tables, &flow)? {
            report.backend_gone_marked += 1;
        }
    }
    let records = tables.affinity()?;
    report.affinity_entries = records.len() as u64;
    for (key, record) in records {
        report.max_service_id = report.max_service_id.max(key.service_id);
        report.max_backend_id = report.max_backend_id.max(record.backend_id);
        let stale = match policy.affinity.get(&key.service_id) {
            None => true,
            Some(frontend) => {
                let timeout = u64::from(frontend.timeout) * 1_000_000_000;
                frontend.timeout == 0
                    || now.saturating_sub(record.last_used_ns.max(since)) >= timeout
                    || !frontend.backend_ids.contains(&record.backend_id)
            }
        };
        if stale {
            ignore_missing(tables.remove_affinity(&key))?;
            report.affinity_removed += 1;
        }
    }
    Ok(report)
}

/// Whether an entry is still the one a pass read: the same flow (a new one on its tuple has
/// another creation time), and, when `idle` is asked, no packet since.
fn unchanged<A: FamilyAddress>(
    tables: &impl FlowTables<A>,
    key: &FlowKeyOf<A>,
    read: &ConntrackEntryOf<A>,
    idle: bool,
) -> Result<bool, MapError> {
    Ok(tables.flow_entry(key)?.is_some_and(|now| {
        now.created_ns == read.created_ns && (!idle || now.last_seen_ns == read.last_seen_ns)
    }))
}

/// Removes a flow's entries, the client side first: from then on its next packet starts a new
/// flow, which writes its own reply entry. Each entry is read again first and left alone if
/// it changed since the pass read it (a new flow on its tuple, or, for an idle flow, a packet).
/// Returns whether anything was removed.
fn remove_flow<A: FamilyAddress>(
    tables: &mut impl FlowTables<A>,
    flow: &[(FlowKeyOf<A>, ConntrackEntryOf<A>)],
    idle: bool,
) -> Result<bool, MapError> {
    let mut ordered: Vec<&(FlowKeyOf<A>, ConntrackEntryOf<A>)> = flow.iter().collect();
    ordered.sort_by_key(|(_, entry)| entry.is_reply());
    let mut removed = false;
    for (key, read) in ordered {
        if !unchanged(tables, key, read, idle)? {
            continue;
        }
        ignore_missing(tables.remove_flow_entry(key))?;
        removed = true;
    }
    Ok(removed)
}

/// Marks a TCP flow whose backend is gone, on the entries as they are now (their state may
/// have moved since the pass read them). Returns whether anything was marked.
fn mark_gone<A: FamilyAddress>(
    tables: &mut impl FlowTables<A>,
    flow: &[(FlowKeyOf<A>, ConntrackEntryOf<A>)],
) -> Result<bool, MapError> {
    let mut marked = false;
    for (key, read) in flow {
        let Some(now) = tables.flow_entry(key)?.filter(|now| now.created_ns == read.created_ns) else {
            continue;
        };
        ignore_missing(
            tables.update_flow_entry(key, &ConntrackEntryOf { flags: now.flags | cf::BACKEND_GONE, ..now }),
        )?;
        marked = true;
    }
    Ok(marked)
}

/// One family's pinned conntrack and affinity maps.
pub struct FamilyFlowTables<A> {
    conntrack: BpfHashMap<MapData, FlowKeyOf<A>, ConntrackEntryOf<A>>,
    /// The conntrack and affinity maps' names and sizes.
    names: (&'static str, &'static str),
    capacity: u32,
    affinity_capacity: u32,
    affinity: BpfHashMap<MapData, AffinityKeyOf<A>, AffinityValue>,
}

/// Entries and capacity of each conntrack and affinity map as the collector's last pass found
/// them, by map name: what the metrics show of tables only a full walk can count.
pub type TableUsage = Arc<std::sync::Mutex<Vec<(&'static str, u64, u32)>>>;

/// The pinned tables, opened by path.
pub struct PinnedFlowTables {
    pub v4: FamilyFlowTables<u32>,
    /// Absent in maps pinned by an lb from before IPv6.
    pub v6: Option<FamilyFlowTables<In6>>,
    stats: Array<MapData, u64>,
    usage: TableUsage,
}

#[derive(Debug, thiserror::Error)]
pub enum FlowTablesError {
    #[error("opening pinned map {path}: {source} (is lb running with this --bpf-dir?)")]
    Open {
        path: PathBuf,
        #[source]
        source: MapError,
    },
    #[error("{operation} in map {map}: {source}")]
    Map {
        operation: &'static str,
        map: &'static str,
        #[source]
        source: MapError,
    },
}

fn open_pinned(dir: &Path, name: &str) -> Result<MapData, FlowTablesError> {
    let path = dir.join(name);
    MapData::from_pin(&path).map_err(|source| FlowTablesError::Open { path, source })
}

fn map(data: MapData, dir: &Path, name: &str) -> Result<Map, FlowTablesError> {
    Map::from_map_data(data).map_err(|source| FlowTablesError::Open { path: dir.join(name), source })
}

impl<A> FamilyFlowTables<A>
where
    FlowKeyOf<A>: aya::Pod,
    ConntrackEntryOf<A>: aya::Pod,
    AffinityKeyOf<A>: aya::Pod,
{
    fn open(
        bpf_dir: &Path,
        conntrack: &'static str,
        affinity: &'static str,
    ) -> Result<Self, FlowTablesError> {
        let wrong = |map: &'static str| move |source| FlowTablesError::Map { operation: "open", map, source };
        let data = open_pinned(bpf_dir, conntrack)?;
        let capacity = data.info().map(|info| info.max_entries()).unwrap_or(0);
        let affinity_data = open_pinned(bpf_dir, affinity)?;
        let affinity_capacity = affinity_data.info().map(|info| info.max_entries()).unwrap_or(0);
        Ok(Self {
            conntrack: BpfHashMap::try_from(map(data, bpf_dir, conntrack)?).map_err(wrong(conntrack))?,
            names: (conntrack, affinity),
            capacity,
            affinity_capacity,
            affinity: BpfHashMap::try_from(map(affinity_data, bpf_dir, affinity)?)
                .map_err(wrong(affinity))?,
        })
    }

    /// This family's maps as a pass found them: (name, entries, capacity).
    fn usage(&self, report: &PassReport) -> [(&'static str, u64, u32); 2] {
        [
            (self.names.0, report.entries, self.capacity),
            (self.names.1, report.affinity_entries, self.affinity_capacity),
        ]
    }

    /// One client's affinity record for one frontend.
    pub fn affinity_record(&self, key: &AffinityKeyOf<A>) -> Result<Option<AffinityValue>, MapError> {
        match self.affinity.get(key, 0) {
            Ok(value) => Ok(Some(value)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(error) => Err(error),
        }
    }
}

impl PinnedFlowTables {
    pub fn open(bpf_dir: &Path) -> Result<Self, FlowTablesError> {
        let wrong = |map: &'static str| move |source| FlowTablesError::Map { operation: "open", map, source };
        let v6 = if bpf_dir.join(map_names::CONNTRACK6).exists() {
            Some(FamilyFlowTables::open(bpf_dir, map_names::CONNTRACK6, map_names::AFFINITY6)?)
        } else {
            None
        };
        Ok(Self {
            v4: FamilyFlowTables::open(bpf_dir, map_names::CONNTRACK, map_names::AFFINITY)?,
            v6,
            stats: Array::try_from(map(open_pinned(bpf_dir, map_names::STATS)?, bpf_dir, map_names::STATS)?)
                .map_err(wrong(map_names::STATS))?,
            usage: TableUsage::default(),
        })
    }

    /// Where each pass leaves the tables' usage.
    pub fn usage(&self) -> TableUsage {
        self.usage.clone()
    }

    /// One pass over both families' tables.
    pub fn collect(
        &mut self,
        policy: &FlowPolicy,
        timeouts: &Timeouts,
        now: u64,
        since: u64,
    ) -> Result<PassReport, MapError> {
        let mut report = collect(&mut self.v4, policy, timeouts, now, since)?;
        let mut usage = self.v4.usage(&report).to_vec();
        if let Some(v6) = &mut self.v6 {
            let report6 = collect(v6, policy, timeouts, now, since)?;
            usage.extend(v6.usage(&report6));
            report.add(&report6);
        }
        *self.usage.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = usage;
        Ok(report)
    }

    /// The highest service and backend IDs either family's flows and records name.
    pub fn max_ids(&self) -> Result<(u32, u32), MapError> {
        let (mut service, mut backend) = max_ids(&self.v4)?;
        if let Some(v6) = &self.v6 {
            let (service6, backend6) = max_ids(v6)?;
            service = service.max(service6);
            backend = backend.max(backend6);
        }
        Ok((service, backend))
    }

    /// Both families' live flows, oldest first.
    pub fn flows(&self, service_names: &BTreeMap<u32, String>, now: u64) -> Result<Vec<FlowRow>, MapError> {
        let mut rows = flow_rows(&self.v4, service_names, now)?;
        if let Some(v6) = &self.v6 {
            rows.extend(flow_rows(v6, service_names, now)?);
        }
        rows.sort_by(|a, b| a.0.cmp(&b.0).then_with(|| a.1.client.cmp(&b.1.client)));
        Ok(rows.into_iter().map(|(_, row)| row).collect())
    }

    /// Adds a pass to the statistics `lb counters` shows.
    fn record(&mut self, report: &PassReport, took: Duration) {
        let capacity = self.v4.capacity + self.v6.as_ref().map_or(0, |v6| v6.capacity);
        let mut add = |index: u32, value: u64, replace: bool| {
            let old = self.stats.get(&index, 0).unwrap_or(0);
            let _ = self.stats.set(index, if replace { value } else { old + value }, 0);
        };
        add(stats::ENTRIES, report.entries, true);
        add(stats::CAPACITY, u64::from(capacity), true);
        add(stats::EXPIRED, report.expired, false);
        add(stats::BACKEND_GONE_REMOVED, report.backend_gone_removed, false);
        add(stats::BACKEND_GONE_MARKED, report.backend_gone_marked, false);
        add(stats::AFFINITY_REMOVED, report.affinity_removed, false);
        add(stats::PASSES, 1, false);
        add(stats::LAST_PASS_US, took.as_micros() as u64, true);
    }
}

impl<A: FamilyAddress> FlowTables<A> for FamilyFlowTables<A>
where
    FlowKeyOf<A>: aya::Pod,
    ConntrackEntryOf<A>: aya::Pod,
    AffinityKeyOf<A>: aya::Pod,
{
    fn conntrack(&self) -> Result<FlowEntries<A>, MapError> {
        // Entries removed while iterating are skipped, not errors.
        let mut entries = Vec::new();
        for key in self.conntrack.keys() {
            let key = key?;
            match self.conntrack.get(&key, 0) {
                Ok(entry) => entries.push((key, entry)),
                Err(MapError::KeyNotFound) => {}
                Err(error) => return Err(error),
            }
        }
        Ok(entries)
    }

    fn flow_entry(&self, key: &FlowKeyOf<A>) -> Result<Option<ConntrackEntryOf<A>>, MapError> {
        match self.conntrack.get(key, 0) {
            Ok(entry) => Ok(Some(entry)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(error) => Err(error),
        }
    }

    fn remove_flow_entry(&mut self, key: &FlowKeyOf<A>) -> Result<(), MapError> {
        self.conntrack.remove(key)
    }

    fn update_flow_entry(&mut self, key: &FlowKeyOf<A>, entry: &ConntrackEntryOf<A>) -> Result<(), MapError> {
        // Only an entry that is still there: a flow removed meanwhile stays removed.
        const BPF_EXIST: u64 = 2;
        self.conntrack.insert(key, entry, BPF_EXIST)
    }

    fn affinity(&self) -> Result<Vec<(AffinityKeyOf<A>, AffinityValue)>, MapError> {
        self.affinity.iter().collect()
    }

    fn remove_affinity(&mut self, key: &AffinityKeyOf<A>) -> Result<(), MapError> {
        self.affinity.remove(key)
    }
}

/// The highest service and backend IDs the flows and affinity records name: a restarted lb
/// allocates above them, so no old flow can be taken for a new frontend or backend.
pub fn max_ids<A: FamilyAddress>(tables: &impl FlowTables<A>) -> Result<(u32, u32), MapError> {
    let (mut service, mut backend) = (0, 0);
    for (_, entry) in tables.conntrack()? {
        service = service.max(entry.service_id);
        backend = backend.max(entry.backend_id);
    }
    for (key, record) in tables.affinity()? {
        service = service.max(key.service_id);
        backend = backend.max(record.backend_id);
    }
    Ok((service, backend))
}

/// The control plane's statistics array (`map_names::STATS`), for the run loop's own numbers.
pub struct Stats {
    array: Array<MapData, u64>,
}

impl Stats {
    pub fn open(bpf_dir: &Path) -> Result<Self, FlowTablesError> {
        let wrong = |source| FlowTablesError::Map { operation: "open", map: map_names::STATS, source };
        let array = Array::try_from(map(open_pinned(bpf_dir, map_names::STATS)?, bpf_dir, map_names::STATS)?)
            .map_err(wrong)?;
        Ok(Self { array })
    }

    /// Sets one statistic (`lb_common::stats`); a failure is logged, never fatal.
    pub fn set(&mut self, index: u32, value: u64) {
        if let Err(error) = self.array.set(index, value, 0) {
            tracing::warn!(%error, "writing a statistic for lb counters");
        }
    }
}

/// Least time between two passes that changes to the Services ask for: under churn, one pass
/// every second takes them all in.
const TRIGGERED_PASS_GAP: Duration = Duration::from_secs(1);

/// The run loop's handle on the collector thread.
pub struct Collector {
    messages: mpsc::Sender<PolicyMessage>,
    /// When the run loop last started writing the maps (CLOCK_MONOTONIC ns).
    maps_writing: Arc<AtomicU64>,
}

/// A change to the flows' policy: one frontend address's flows, or one service ID's
/// affinity records (`None`: it has none any more).
#[derive(Clone, Debug, PartialEq)]
pub enum PolicyChange {
    Frontend(FrontendAddress, Option<FrontendFlows>),
    Affinity(u32, Option<AffinityPolicy>),
}

enum PolicyMessage {
    Replace(FlowPolicy),
    Change(Vec<PolicyChange>, u64),
}

impl Collector {
    /// Starts the collector on `tables`, passing every `interval` and when the policy
    /// changes. It makes no pass before the first `replace`: until the first sync, every flow
    /// would look orphaned.
    pub fn spawn(mut tables: PinnedFlowTables, timeouts: Timeouts, interval: Duration, since: u64) -> Self {
        let (messages, received) = mpsc::channel::<PolicyMessage>();
        let maps_writing = Arc::new(AtomicU64::new(0));
        let writing = maps_writing.clone();
        std::thread::Builder::new()
            .name("conntrack-gc".into())
            .spawn(move || {
                let mut policy: Option<FlowPolicy> = None;
                let mut next_periodic = Instant::now() + interval;
                let mut last_pass: Option<Instant> = None;
                let mut pending = false;
                loop {
                    let now = Instant::now();
                    let mut deadline = next_periodic;
                    if pending {
                        deadline = deadline.min(last_pass.map_or(now, |at| at + TRIGGERED_PASS_GAP));
                    }
                    match received.recv_timeout(deadline.saturating_duration_since(now)) {
                        Ok(PolicyMessage::Replace(new)) => {
                            if policy.as_ref() != Some(&new) {
                                policy = Some(new);
                                pending = true;
                            }
                            continue;
                        }
                        Ok(PolicyMessage::Change(changes, made_ns)) => {
                            if let Some(policy) = policy.as_mut() {
                                pending |= policy.apply(changes, made_ns);
                            }
                            continue;
                        }
                        Err(mpsc::RecvTimeoutError::Timeout) => {}
                        Err(mpsc::RecvTimeoutError::Disconnected) => return,
                    }
                    let Some(policy) = policy.as_mut() else {
                        next_periodic = Instant::now() + interval;
                        continue;
                    };
                    // Nothing written since the policy came: it holds for every flow tracked
                    // until now (a write starting after this load is later than `now`).
                    let maps_written = writing.load(Ordering::SeqCst);
                    let now_ns = monotonic_ns();
                    if maps_written <= policy.made_ns {
                        policy.made_ns = now_ns;
                    }
                    let started = Instant::now();
                    let mut unjudged = false;
                    match tables.collect(policy, &timeouts, now_ns, since) {
                        Ok(report) => {
                            unjudged = report.unjudged > 0;
                            let took = started.elapsed();
                            tables.record(&report, took);
                            let changed =
                                report.expired + report.backend_gone_removed + report.backend_gone_marked;
                            if changed + report.affinity_removed > 0 {
                                tracing::debug!(?report, took_us = took.as_micros() as u64, "conntrack pass");
                            }
                            if report.backend_gone_removed + report.backend_gone_marked > 0 {
                                tracing::info!(
                                    udp_removed = report.backend_gone_removed,
                                    tcp_to_reset = report.backend_gone_marked,
                                    "flows whose backend is no longer an endpoint"
                                );
                            }
                        }
                        Err(error) => {
                            tracing::warn!(%error, "conntrack pass failed; retrying at the next one")
                        }
                    }
                    last_pass = Some(Instant::now());
                    pending = unjudged;
                    next_periodic = Instant::now() + interval;
                }
            })
            .expect("starting the conntrack collector thread");
        Self { messages, maps_writing }
    }

    /// The run loop is about to write the maps: until the policy that follows arrives, flows
    /// tracked from now on are not judged by the current one.
    pub fn maps_changing(&self) {
        self.maps_writing.store(monotonic_ns(), Ordering::SeqCst);
    }

    /// The whole policy (after the first sync, say). A change asks for a pass soon.
    pub fn replace(&self, policy: FlowPolicy) {
        let _ = self.messages.send(PolicyMessage::Replace(policy));
    }

    /// Changes to the policy (after a sync that touched these frontends). A change (an
    /// endpoint or a frontend went away, say) asks for a pass soon.
    pub fn update(&self, changes: Vec<PolicyChange>) {
        if !changes.is_empty() {
            let _ = self.messages.send(PolicyMessage::Change(changes, monotonic_ns()));
        }
    }
}

impl FlowPolicy {
    /// Applies changes made at `made_ns`; returns whether the policy changed.
    fn apply(&mut self, changes: Vec<PolicyChange>, made_ns: u64) -> bool {
        let mut changed = false;
        for change in changes {
            changed |= match change {
                PolicyChange::Frontend(address, Some(flows)) => {
                    self.frontends.insert(address, flows.clone()) != Some(flows)
                }
                PolicyChange::Frontend(address, None) => self.frontends.remove(&address).is_some(),
                PolicyChange::Affinity(id, Some(affinity)) => {
                    self.affinity.insert(id, affinity.clone()) != Some(affinity)
                }
                PolicyChange::Affinity(id, None) => self.affinity.remove(&id).is_some(),
            };
        }
        // The policy matches the maps as of `made_ns`, changed or not.
        self.made_ns = self.made_ns.max(made_ns);
        changed
    }
}

/// Publishes CLOCK_MONOTONIC into the clock map every `CLOCK_TICK_NS`, from a thread of its
/// own, until the process exits. Returns the first time published.
pub fn publish_clock(clock_pin: &Path) -> Result<u64, FlowTablesError> {
    let wrong = |source| FlowTablesError::Map { operation: "open", map: map_names::CLOCK, source };
    let data = MapData::from_pin(clock_pin)
        .map_err(|source| FlowTablesError::Open { path: clock_pin.to_path_buf(), source })?;
    let data = Map::from_map_data(data)
        .map_err(|source| FlowTablesError::Open { path: clock_pin.to_path_buf(), source })?;
    let mut clock: Array<MapData, u64> = Array::try_from(data).map_err(wrong)?;
    let first = monotonic_ns();
    clock.set(0, first, 0).map_err(|source| FlowTablesError::Map {
        operation: "write",
        map: map_names::CLOCK,
        source,
    })?;
    std::thread::Builder::new()
        .name("lb-clock".into())
        .spawn(move || {
            loop {
                std::thread::sleep(Duration::from_nanos(lb_common::CLOCK_TICK_NS));
                if let Err(error) = clock.set(0, monotonic_ns(), 0) {
                    tracing::warn!(%error, "publishing the clock for the data path");
                }
            }
        })
        .expect("starting the clock thread");
    Ok(first)
}

/// One flow as `lb conntrack` lists it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct FlowRow {
    pub protocol: &'static str,
    pub client: String,
    pub frontend: String,
    pub backend: String,
    /// The source address the backend sees, when lb source-NATed the flow.
    pub snat: Option<String>,
    pub state: &'static str,
    pub backend_gone: bool,
    pub age_seconds: u64,
    pub idle_seconds: u64,
    /// `namespace/name:port` of the frontend's Service, if its metadata is there.
    pub service: Option<String>,
}

/// The live flows (client-side entries, with their reply entry's activity), each with when it
/// was tracked.
fn flow_rows<A: FamilyAddress + std::hash::Hash + Eq>(
    tables: &impl FlowTables<A>,
    service_names: &BTreeMap<u32, String>,
    now: u64,
) -> Result<Vec<(u64, FlowRow)>, MapError> {
    let entries: HashMap<FlowKeyOf<A>, ConntrackEntryOf<A>> = tables.conntrack()?.into_iter().collect();
    let address = |ip: A, port: u16| SocketAddr::new(ip.ip(), u16::from_be(port)).to_string();
    let mut rows: Vec<(u64, FlowRow)> = Vec::new();
    for (key, entry) in entries.iter().filter(|(_, entry)| !entry.is_reply()) {
        let reply = entries.get(&entry.peer_key(key.protocol));
        let last_seen = reply.map_or(entry.last_seen_ns, |reply| reply.last_seen_ns.max(entry.last_seen_ns));
        let row = FlowRow {
            protocol: match key.protocol {
                PROTOCOL_TCP => "TCP",
                lb_common::PROTOCOL_UDP => "UDP",
                lb_common::PROTOCOL_SCTP => "SCTP",
                _ => "?",
            },
            client: address(key.src_address, key.src_port),
            frontend: address(key.dst_address, key.dst_port),
            backend: address(entry.dst_address, entry.dst_port),
            snat: (entry.flags & cf::SNAT != 0 || entry.src_port != key.src_port)
                .then(|| address(entry.src_address, entry.src_port)),
            state: cs::name(entry.state),
            backend_gone: entry.flags & cf::BACKEND_GONE != 0,
            age_seconds: now.saturating_sub(entry.created_ns) / 1_000_000_000,
            idle_seconds: now.saturating_sub(last_seen) / 1_000_000_000,
            service: service_names.get(&entry.service_id).cloned(),
        };
        rows.push((entry.created_ns, row));
    }
    Ok(rows)
}

/// `lb conntrack`'s table.
pub fn flows_table(rows: &[FlowRow]) -> String {
    use std::fmt::Write as _;
    let mut table = vec![[
        "PROTO".to_string(),
        "CLIENT".into(),
        "FRONTEND".into(),
        "BACKEND".into(),
        "SNAT".into(),
        "STATE".into(),
        "AGE".into(),
        "IDLE".into(),
        "SERVICE".into(),
    ]];
    for row in rows {
        let state =
            if row.backend_gone { format!("{} (backend gone)", row.state) } else { row.state.to_string() };
        table.push([
            row.protocol.to_string(),
            row.client.clone(),
            row.frontend.clone(),
            row.backend.clone(),
            row.snat.clone().unwrap_or_else(|| "-".into()),
            state,
            format!("{}s", row.age_seconds),
            format!("{}s", row.idle_seconds),
            row.service.clone().unwrap_or_else(|| "?".into()),
        ]);
    }
    let widths: Vec<usize> =
        (0..9).map(|col| table.iter().map(|r| r[col].len()).max().unwrap_or(0)).collect();
    let mut out = String::new();
    for row in &table {
        let cells: Vec<String> =
            row.iter().zip(&widths).map(|(cell, width)| format!("{cell:width$}")).collect();
        let _ = writeln!(out, "{}", cells.join("  ").trim_end());
    }
    out
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use lb_common::{AffinityKey, ConntrackEntry, FlowKey};

    use super::*;

    /// Tables in memory.
    #[derive(Default)]
    struct Memory {
        conntrack: BTreeMap<(u32, u32, u16, u16, u8), ConntrackEntry>,
        affinity: BTreeMap<(u32, u32), AffinityValue>,
    }

    fn k(key: &FlowKey) -> (u32, u32, u16, u16, u8) {
        (key.src_address, key.dst_address, key.src_port, key.dst_port, key.protocol)
    }

    impl FlowTables<u32> for Memory {
        fn conntrack(&self) -> Result<Vec<(FlowKey, ConntrackEntry)>, MapError> {
            Ok(self
                .conntrack
                .iter()
                .map(|((src, dst, sport, dport, protocol), entry)| {
                    (
                        FlowKey {
                            src_address: *src,
                            dst_address: *dst,
                            src_port: *sport,
                            dst_port: *dport,
                            protocol: *protocol,
                            _pad0: 0,
                            _pad1: 0,
                        },
                        *entry,
                    )
                })
                .collect())
        }
        fn flow_entry(&self, key: &FlowKey) -> Result<Option<ConntrackEntry>, MapError> {
            Ok(self.conntrack.get(&k(key)).copied())
        }
        fn remove_flow_entry(&mut self, key: &FlowKey) -> Result<(), MapError> {
            self.conntrack.remove(&k(key)).map(|_| ()).ok_or(MapError::KeyNotFound)
        }
        fn update_flow_entry(&mut self, key: &FlowKey, entry: &ConntrackEntry) -> Result<(), MapError> {
            self.conntrack.insert(k(key), *entry);
            Ok(())
        }
        fn affinity(&self) -> Result<Vec<(AffinityKey, AffinityValue)>, MapError> {
            Ok(self
                .affinity
                .iter()
                .map(|((client, service), value)| {
                    (AffinityKey { client_address: *client, service_id: *service }, *value)
                })
                .collect())
        }
        fn remove_affinity(&mut self, key: &AffinityKey) -> Result<(), MapError> {
            self.affinity.remove(&(key.client_address, key.service_id));
            Ok(())
        }
    }

    const SECOND: u64 = 1_000_000_000;
    const CLIENT: (Ipv4Addr, u16) = (Ipv4Addr::new(10, 0, 0, 2), 40000);
    const VIP: (Ipv4Addr, u16) = (Ipv4Addr::new(10, 96, 0, 10), 80);
    const POD: (Ipv4Addr, u16) = (Ipv4Addr::new(10, 244, 1, 11), 8080);

    fn be((ip, port): (Ipv4Addr, u16)) -> (u32, u16) {
        (u32::from(ip).to_be(), port.to_be())
    }

    /// As the policy names a backend or frontend: the address, the port in network order.
    fn policy_address((ip, port): (Ipv4Addr, u16)) -> (IpAddr, u16) {
        (IpAddr::V4(ip), port.to_be())
    }

    /// A flow client -> VIP -> POD as the data path writes it.
    fn add_flow(memory: &mut Memory, protocol: u8, client_port: u16, state: u8, last_seen: u64) {
        let client = (CLIENT.0, client_port);
        let (client_be, pod_be, vip_be) = (be(client), be(POD), be(VIP));
        let forward = ConntrackEntry {
            src_address: client_be.0,
            dst_address: pod_be.0,
            src_port: client_be.1,
            dst_port: pod_be.1,
            backend_id: 7,
            service_id: 3,
            flags: 0,
            state,
            _pad: 0,
            last_seen_ns: last_seen,
            created_ns: last_seen,
        };
        let reply = ConntrackEntry {
            src_address: vip_be.0,
            dst_address: client_be.0,
            src_port: vip_be.1,
            dst_port: client_be.1,
            flags: cf::REPLY,
            ..forward
        };
        memory.conntrack.insert(k(&FlowKey::new(client, VIP, protocol)), forward);
        memory.conntrack.insert(k(&FlowKey::new(POD, client, protocol)), reply);
    }

    /// The policy for the test flows' frontend (VIP:80, both protocols): `serving` says
    /// whether the pod still serves, `listed` whether the Service still lists it.
    fn policy_with(serving: bool, listed: bool, affinity_timeout: u32) -> FlowPolicy {
        let set = |yes: bool| if yes { [policy_address(POD)].into_iter().collect() } else { HashSet::new() };
        let mut frontends = HashMap::new();
        for protocol in [PROTOCOL_TCP, lb_common::PROTOCOL_UDP] {
            let (ip, port) = policy_address(VIP);
            frontends
                .insert((ip, port, protocol), FrontendFlows { serving: set(serving), listed: set(listed) });
        }
        let backend_ids = if serving { [7].into_iter().collect() } else { HashSet::new() };
        let affinity = [(3, AffinityPolicy { backend_ids, timeout: affinity_timeout })].into_iter().collect();
        FlowPolicy { frontends, affinity, made_ns: u64::MAX / 2 }
    }

    fn policy(serving: bool, affinity_timeout: u32) -> FlowPolicy {
        policy_with(serving, serving, affinity_timeout)
    }

    #[test]
    fn flows_expire_by_state_and_both_entries_go_together() {
        let timeouts = Timeouts::default();
        let mut memory = Memory::default();
        let now = 100_000 * SECOND;
        add_flow(&mut memory, PROTOCOL_TCP, 1, cs::TCP_ESTABLISHED, now - 3600 * SECOND);
        add_flow(&mut memory, PROTOCOL_TCP, 2, cs::TCP_CLOSED, now - 11 * SECOND);
        add_flow(&mut memory, PROTOCOL_TCP, 3, cs::TCP_CLOSED, now - 5 * SECOND);
        add_flow(&mut memory, PROTOCOL_TCP, 4, cs::TCP_SYN_SENT, now - 121 * SECOND);
        add_flow(&mut memory, PROTOCOL_TCP, 5, cs::TCP_CLOSING, now - 3601 * SECOND);
        add_flow(&mut memory, lb_common::PROTOCOL_UDP, 6, cs::UDP_ONE_WAY, now - 31 * SECOND);
        add_flow(&mut memory, lb_common::PROTOCOL_UDP, 7, cs::UDP_REPLIED, now - 31 * SECOND);
        let report = collect(&mut memory, &policy(true, 0), &timeouts, now, 0).unwrap();
        assert_eq!((report.entries, report.expired), (14, 4));
        let left: Vec<u16> = memory
            .conntrack
            .iter()
            .filter(|(_, e)| !e.is_reply())
            .map(|((_, _, port, _, _), _)| u16::from_be(*port))
            .collect();
        assert_eq!(left, vec![1, 3, 7], "established, recently closed, and a UDP stream stay");
        assert_eq!(memory.conntrack.len(), 6, "each kept flow keeps both entries");
        assert_eq!((report.max_service_id, report.max_backend_id), (3, 7));
    }

    #[test]
    fn a_removed_backend_ends_udp_flows_at_once_and_marks_tcp_flows_for_a_reset() {
        let mut memory = Memory::default();
        let now = 1_000 * SECOND;
        add_flow(&mut memory, PROTOCOL_TCP, 1, cs::TCP_ESTABLISHED, now);
        add_flow(&mut memory, lb_common::PROTOCOL_UDP, 2, cs::UDP_REPLIED, now);
        add_flow(&mut memory, PROTOCOL_TCP, 3, cs::TCP_CLOSED, now);
        let report = collect(&mut memory, &policy(false, 0), &Timeouts::default(), now, 0).unwrap();
        assert_eq!((report.backend_gone_removed, report.backend_gone_marked), (1, 1));
        let tcp: Vec<&ConntrackEntry> =
            memory.conntrack.values().filter(|e| e.state == cs::TCP_ESTABLISHED).collect();
        assert_eq!(tcp.len(), 2);
        assert!(tcp.iter().all(|e| e.flags & cf::BACKEND_GONE != 0), "both entries marked");
        assert!(memory.conntrack.values().all(|e| e.state != cs::UDP_REPLIED), "the UDP flow is gone");
        // A second pass does not count the marked flow again.
        let again = collect(&mut memory, &policy(false, 0), &Timeouts::default(), now, 0).unwrap();
        assert_eq!((again.backend_gone_removed, again.backend_gone_marked), (0, 0));
        // With the backend serving (terminating but serving, say), nothing is touched.
        let mut kept = Memory::default();
        add_flow(&mut kept, lb_common::PROTOCOL_UDP, 2, cs::UDP_REPLIED, now);
        let report = collect(&mut kept, &policy(true, 0), &Timeouts::default(), now, 0).unwrap();
        assert_eq!((report.backend_gone_removed, kept.conntrack.len()), (0, 2));
    }

    /// A pod that fails readiness (still listed, no longer serving) keeps its TCP flows, so a
    /// draining pod finishes its requests; its UDP flows move on, as kube-proxy moves them.
    #[test]
    fn a_listed_but_not_serving_backend_keeps_tcp_flows_and_loses_udp_ones() {
        let mut memory = Memory::default();
        let now = 1_000 * SECOND;
        add_flow(&mut memory, PROTOCOL_TCP, 1, cs::TCP_ESTABLISHED, now);
        add_flow(&mut memory, lb_common::PROTOCOL_UDP, 2, cs::UDP_REPLIED, now);
        let report =
            collect(&mut memory, &policy_with(false, true, 0), &Timeouts::default(), now, 0).unwrap();
        assert_eq!((report.backend_gone_removed, report.backend_gone_marked), (1, 0));
        assert!(memory.conntrack.values().all(|e| e.flags & cf::BACKEND_GONE == 0));
    }

    /// Flows tracked after the policy was made may go to backends it does not know yet (a pod
    /// that just joined): they are not judged by it.
    #[test]
    fn flows_newer_than_the_policy_are_not_judged_by_it() {
        let mut memory = Memory::default();
        let now = 1_000 * SECOND;
        add_flow(&mut memory, PROTOCOL_TCP, 1, cs::TCP_ESTABLISHED, now);
        let mut old = policy(false, 0);
        old.made_ns = now - SECOND;
        let report = collect(&mut memory, &old, &Timeouts::default(), now, 0).unwrap();
        assert_eq!((report.backend_gone_removed, report.backend_gone_marked), (0, 0));
        old.made_ns = now + SECOND;
        let report = collect(&mut memory, &old, &Timeouts::default(), now, 0).unwrap();
        assert_eq!(report.backend_gone_marked, 1);
    }

    /// The pass acts on entries as they are when it acts: a flow that got a packet since it was
    /// read is not expired, and a new flow on the same tuple is not removed for the old one.
    #[test]
    fn the_collector_leaves_alone_what_changed_since_it_read_it() {
        let timeouts = Timeouts::default();
        let mut memory = Memory::default();
        let now = 100 * SECOND;
        add_flow(&mut memory, lb_common::PROTOCOL_UDP, 1, cs::UDP_ONE_WAY, now - 40 * SECOND);
        let read = memory.conntrack().unwrap();
        // A packet arrives between the read and the removal.
        for (key, entry) in &read {
            let fresh = ConntrackEntry { last_seen_ns: now, ..*entry };
            memory.update_flow_entry(key, &fresh).unwrap();
        }
        for (key, entry) in &read {
            assert!(!remove_flow(&mut memory, &[(*key, *entry)], true).unwrap());
        }
        assert_eq!(memory.conntrack.len(), 2);
        // A new flow on the tuple (another creation time) is not the one to remove.
        for (key, entry) in &read {
            let reopened = ConntrackEntry { created_ns: now, last_seen_ns: entry.last_seen_ns, ..*entry };
            memory.update_flow_entry(key, &reopened).unwrap();
            assert!(!remove_flow(&mut memory, &[(*key, *entry)], false).unwrap());
        }
        assert_eq!(memory.conntrack.len(), 2);
        let _ = timeouts;
    }

    #[test]
    fn affinity_records_go_when_expired_or_their_backend_left() {
        let mut memory = Memory::default();
        let now = 1_000 * SECOND;
        let client: u32 = u32::from(CLIENT.0).to_be();
        memory
            .affinity
            .insert((client, 3), AffinityValue { backend_id: 7, _pad: 0, last_used_ns: now - 5 * SECOND });
        memory.affinity.insert(
            (client + 1u32, 3),
            AffinityValue { backend_id: 7, _pad: 0, last_used_ns: now - 11 * SECOND },
        );
        memory
            .affinity
            .insert((client + 2u32, 3), AffinityValue { backend_id: 8, _pad: 0, last_used_ns: now });
        memory
            .affinity
            .insert((client + 3u32, 9), AffinityValue { backend_id: 7, _pad: 0, last_used_ns: now });
        let report = collect(&mut memory, &policy(true, 10), &Timeouts::default(), now, 0).unwrap();
        assert_eq!(report.affinity_removed, 3);
        assert_eq!(memory.affinity.keys().copied().collect::<Vec<_>>(), vec![(client, 3)]);
    }

    #[test]
    fn the_listing_shows_each_flow_once_with_its_service() {
        let mut memory = Memory::default();
        add_flow(&mut memory, PROTOCOL_TCP, 40000, cs::TCP_ESTABLISHED, 5 * SECOND);
        let names: BTreeMap<u32, String> = [(3, "default/echo:http".to_string())].into_iter().collect();
        let rows: Vec<FlowRow> =
            flow_rows(&memory, &names, 65 * SECOND).unwrap().into_iter().map(|(_, row)| row).collect();
        assert_eq!(rows.len(), 1);
        assert_eq!(
            (rows[0].client.as_str(), rows[0].frontend.as_str(), rows[0].backend.as_str()),
            ("10.0.0.2:40000", "10.96.0.10:80", "10.244.1.11:8080")
        );
        assert_eq!((rows[0].state, rows[0].age_seconds, rows[0].idle_seconds), ("ESTABLISHED", 60, 60));
        let table = flows_table(&rows);
        assert!(table.starts_with("PROTO") && table.contains("default/echo:http"), "{table}");
    }
}
