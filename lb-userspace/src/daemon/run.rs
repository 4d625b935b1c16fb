//! `lb run`: load the data path, then keep the maps equal to what the source says: a directory
//! of manifests or the API server, through the same conversion and the same reconciler.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result};
use tokio::sync::mpsc;

use crate::convert::{EndpointsSource, ProxyConfig};
use crate::daemon::events::{self, ServiceEvents};
use crate::daemon::health::{self, SharedHealth};
use crate::daemon::health_check::HealthCheckServers;
use crate::daemon::metrics::{self, KubeProxyMetrics, MapUsage, NoLocalEndpoints};
use crate::daemon::sync::{HealthState, SyncRunner};
use crate::dataplane::conntrack::{
    self, AffinityPolicy, Collector, FlowPolicy, FrontendFlows, PinnedFlowTables, PolicyChange, Timeouts,
};
use crate::dataplane::datapath::{self, Capacity, Datapath};
use crate::dataplane::interfaces::{InterfaceSelector, LinkEvents};
use crate::dataplane::maps::{BpfMaps, MapsError, MapsSnapshot, ServiceMaps};
use crate::dataplane::node_addresses::{NodeAddressConfig, NodeAddresses};
use crate::dataplane::reconcile::{Reconciler, Repair};
use crate::model::{DesiredState, FrontendKey, L4Addr, Scope};
use crate::source::cluster::{ClusterEvent, ClusterStore};
use crate::source::kube as kube_source;
use crate::source::manifests::ManifestSource;
use crate::source::{ObjectChange, ObjectKey};
use crate::state::pipeline::{OnInvalid, Pipeline};
use lb_common::DatapathConfig;

pub enum SourceOptions {
    /// A directory of Kubernetes YAML, watched for changes. Services without a clusterIP get
    /// one from `cluster_ip_range`, remembered in `state_file`.
    Manifests { dir: PathBuf, cluster_ip_ranges: Vec<ipnet::IpNet>, state_file: PathBuf },
    /// The API server, through this kubeconfig or the in-cluster service account.
    Kubernetes { kubeconfig: Option<PathBuf> },
}

pub struct RunOptions {
    pub source: SourceOptions,
    pub interfaces: Vec<String>,
    pub bpf_dir: PathBuf,
    pub proxy: ProxyConfig,
    pub capacity: Capacity,
    /// kube-proxy's `--min-sync-period`: the least time between syncs once a burst is used up.
    pub min_sync_period: Duration,
    /// Full resync (maps re-read, repaired and pruned) this often; health times out at twice it.
    pub sync_period: Duration,
    /// Where `/healthz` and `/livez` are served; `None` disables them.
    pub healthz_bind_address: Option<SocketAddr>,
    /// Where `/metrics` and `/proxyMode` are served; `None` disables them.
    pub metrics_bind_address: Option<SocketAddr>,
    /// Which node addresses take NodePort traffic and which one source-NAT uses.
    pub node_addresses: NodeAddressConfig,
    /// How the XDP program goes on the external interfaces.
    pub xdp: datapath::XdpAttach,
    /// The cgroup whose processes' sockets are load-balanced at connect/sendmsg (the node's
    /// own traffic); `None` leaves them alone.
    pub cgroup_path: Option<PathBuf>,
    /// How long flows may stay idle, by state.
    pub conntrack_timeouts: Timeouts,
    /// How often the conntrack collector passes over the table when nothing asks it sooner.
    pub conntrack_gc_interval: Duration,
    /// Positions in each Maglev table (a prime).
    pub maglev_table_size: u32,
    /// Tests only: which variant of the programs to load (0: the default).
    pub program_variant: u32,
    /// Whether the data path counts each frontend's packets, bytes and new flows.
    pub service_traffic_counters: bool,
}

/// How long an unused backend stays in the map (see `Reconciler::set_backend_grace`).
const BACKEND_GRACE: Duration = Duration::from_secs(2);

enum Source {
    Manifests(ManifestSource),
    Kubernetes {
        store: ClusterStore,
        events: mpsc::UnboundedReceiver<ClusterEvent>,
        endpoints_source: EndpointsSource,
        status: Arc<kube_source::WatchStatus>,
        client: kube::Client,
    },
}

impl Source {
    /// Starts the source; what it has at once (a directory's objects) goes to `pipeline`.
    async fn start(options: &RunOptions, pipeline: &mut Pipeline) -> Result<Self> {
        match &options.source {
            SourceOptions::Manifests { dir, cluster_ip_ranges, state_file } => {
                let mut sink = |change, file: &std::path::Path| {
                    let _ = take_one(pipeline, change, || Some(file.display().to_string()));
                };
                let source = ManifestSource::start(dir, cluster_ip_ranges, state_file, &mut sink)?;
                Ok(Source::Manifests(source))
            }
            SourceOptions::Kubernetes { kubeconfig } => {
                let client = kube_source::client(kubeconfig.as_deref()).await?;
                let (tx, events) = mpsc::unbounded_channel();
                let status = kube_source::spawn_watchers(client.clone(), &options.proxy, tx);
                Ok(Source::Kubernetes {
                    store: ClusterStore::default(),
                    events,
                    endpoints_source: options.proxy.endpoints_source,
                    status,
                    client,
                })
            }
        }
    }

    /// Since when the source has been unreachable, if it is.
    fn stale_since(&self) -> Option<SystemTime> {
        match self {
            Source::Manifests(_) => None,
            Source::Kubernetes { status, .. } => status.stale_since(),
        }
    }

    /// Whether the source has a complete picture to sync from.
    fn ready(&self) -> bool {
        match self {
            Source::Manifests(_) => true,
            Source::Kubernetes { store, endpoints_source, .. } => store.ready(*endpoints_source),
        }
    }

    /// Waits for the next changes.
    async fn changed(&mut self) -> Result<Vec<ObjectChange>> {
        match self {
            Source::Manifests(source) => source.changed().await,
            Source::Kubernetes { store, events, .. } => {
                let event = events.recv().await.context("watchers stopped")?;
                let mut changes = store.apply(event);
                // Take what else has arrived: one sync for a burst.
                while changes.len() < 4096
                    && let Ok(event) = events.try_recv()
                {
                    changes.extend(store.apply(event));
                }
                Ok(changes)
            }
        }
    }

    /// Where an object comes from, for its error messages.
    fn origin(&self, key: &ObjectKey) -> Option<String> {
        match self {
            Source::Manifests(source) => source.file_of(key).map(|file| file.display().to_string()),
            Source::Kubernetes { .. } => None,
        }
    }
}

/// What the data path's settings are made of, besides the node's addresses.
struct DatapathSettings {
    netns_cookie: u64,
    maglev_table_size: u32,
}

/// Re-reads the node's addresses; when the source-NAT address changed, tells the data path;
/// when the node's addresses changed, tells the reconciler (host-network backends).
fn refresh_node_addresses(
    options: &NodeAddressConfig,
    current: &mut Option<NodeAddresses>,
    pipeline: &mut Pipeline,
    datapath: &mut Datapath,
    settings: &DatapathSettings,
    reconciler: &mut Reconciler<BpfMaps>,
) {
    let addresses = options.read();
    if current.as_ref() == Some(&addresses) {
        return;
    }
    if current.as_ref().is_none_or(|current| current.snat != addresses.snat) {
        let snat_address = addresses.snat.map_or(0, |ip| u32::from(ip).to_be());
        let config = DatapathConfig {
            netns_cookie: settings.netns_cookie,
            snat_address,
            snat_port_min: lb_common::SNAT_PORT_MIN,
            snat_port_max: lb_common::SNAT_PORT_MAX,
            maglev_table_size: settings.maglev_table_size,
            _pad: 0,
        };
        match datapath.set_config(config) {
            Ok(()) => {
                tracing::info!(snat_address = ?addresses.snat, nodeport_addresses = ?addresses.nodeport, "node addresses")
            }
            Err(error) => tracing::error!("{error}"),
        }
        if addresses.snat.is_none() {
            tracing::warn!(
                "the node has no address to source-NAT with: external Cluster-policy and hairpin flows are dropped"
            );
        }
    }
    if current.as_ref().is_none_or(|current| current.snat6 != addresses.snat6) {
        let snat_address = addresses.snat6.map_or(lb_common::In6::default(), lb_common::In6::from);
        match datapath.set_config6(lb_common::DatapathConfig6 { snat_address }) {
            Ok(()) => tracing::info!(snat_address6 = ?addresses.snat6, "node IPv6 source-NAT address"),
            Err(error) => tracing::error!("{error}"),
        }
    }
    if current.as_ref().is_none_or(|current| current.all != addresses.all) {
        for error in reconciler.set_host_addresses(addresses.all.iter().copied().collect()) {
            tracing::error!("{error}");
        }
    }
    pipeline.set_node_addresses(addresses.nodeport.clone());
    *current = Some(addresses);
}

/// What the conntrack collector needs to know of every frontend: by address, the backends
/// flows may keep; by service ID, what affinity records may keep.
fn flow_policy(desired: &DesiredState, reconciler: &Reconciler<BpfMaps>) -> FlowPolicy {
    let mut policy = FlowPolicy { made_ns: conntrack::monotonic_ns(), ..Default::default() };
    let addresses: BTreeSet<L4Addr> = desired.frontends.keys().map(|key| key.address).collect();
    for address in addresses {
        if let Some(flows) = address_flows(desired, address) {
            policy.frontends.insert(flow_address(address), flows);
        }
    }
    for key in desired.frontends.keys() {
        if let Some((id, affinity)) = affinity_policy(desired, reconciler, key) {
            policy.affinity.insert(id, affinity);
        }
    }
    policy
}

fn flow_address(address: L4Addr) -> conntrack::FrontendAddress {
    (address.ip, address.port.to_be(), address.protocol.number())
}

/// Every scope's backends at one frontend address: a flow is judged by the address it was sent
/// to.
fn address_flows(desired: &DesiredState, address: L4Addr) -> Option<FrontendFlows> {
    let scopes =
        FrontendKey { address, scope: Scope::External }..=FrontendKey { address, scope: Scope::Internal };
    let wire = |backend: &L4Addr| (backend.ip, backend.port.to_be());
    let mut flows: Option<FrontendFlows> = None;
    for frontend in desired.frontends.range(scopes).map(|(_, frontend)| frontend) {
        let flows = flows.get_or_insert_with(FrontendFlows::default);
        let protocol = address.protocol;
        flows.serving.extend(frontend.serving.iter().filter(|b| b.protocol == protocol).map(wire));
        flows.listed.extend(frontend.listed.iter().filter(|b| b.protocol == protocol).map(wire));
    }
    flows
}

fn affinity_policy(
    desired: &DesiredState,
    reconciler: &Reconciler<BpfMaps>,
    key: &FrontendKey,
) -> Option<(u32, AffinityPolicy)> {
    let frontend = desired.frontends.get(key)?;
    // Without affinity a frontend has no records to keep (the collector removes any it finds).
    if frontend.policy.affinity_timeout == 0 {
        return None;
    }
    let programmed = reconciler.state().frontends.get(key)?;
    let affinity = AffinityPolicy {
        backend_ids: programmed.slots.iter().copied().collect(),
        timeout: frontend.policy.affinity_timeout,
    };
    Some((programmed.service_id, affinity))
}

/// The collector's policy changes after a sync touched `keys`, whose service IDs were
/// `old_ids` before it.
fn policy_changes(
    desired: &DesiredState,
    reconciler: &Reconciler<BpfMaps>,
    keys: &BTreeSet<FrontendKey>,
    old_ids: &[Option<u32>],
) -> Vec<PolicyChange> {
    let addresses: BTreeSet<L4Addr> = keys.iter().map(|key| key.address).collect();
    let mut changes: Vec<PolicyChange> = addresses
        .into_iter()
        .map(|address| PolicyChange::Frontend(flow_address(address), address_flows(desired, address)))
        .collect();
    for (key, old_id) in keys.iter().zip(old_ids) {
        let now = affinity_policy(desired, reconciler, key);
        if let Some(old_id) = old_id
            && now.as_ref().is_none_or(|(id, _)| id != old_id)
        {
            changes.push(PolicyChange::Affinity(*old_id, None));
        }
        if let Some((id, affinity)) = now {
            changes.push(PolicyChange::Affinity(id, Some(affinity)));
        }
    }
    changes
}

/// Error lines the loop would repeat (a frontend refused at every sync while its map is full, a
/// conflict reported at each change of its Services): each distinct line is logged at most once
/// a minute, with how many were held back since.
#[derive(Default)]
pub struct RepeatedErrors {
    logged: std::collections::HashMap<String, (Instant, u64)>,
}

impl RepeatedErrors {
    const EVERY: Duration = Duration::from_secs(60);

    pub fn error(&mut self, line: String) {
        match self.admit(&line, Instant::now()) {
            Some(0) => tracing::error!("{line}"),
            Some(held) => tracing::error!(repeated = held, "{line}"),
            None => {}
        }
    }

    /// Whether `line` is logged now, and how many times it was held back before.
    fn admit(&mut self, line: &str, now: Instant) -> Option<u64> {
        self.logged.retain(|_, (at, _)| now.duration_since(*at) < 2 * Self::EVERY);
        match self.logged.get_mut(line) {
            Some((at, held)) if now.duration_since(*at) < Self::EVERY => {
                *held += 1;
                None
            }
            Some((at, held)) => {
                let repeated = *held;
                (*at, *held) = (now, 0);
                Some(repeated)
            }
            None => {
                self.logged.insert(line.to_string(), (now, 0));
                Some(0)
            }
        }
    }
}

/// What a sync needs besides the pipeline and the reconciler.
struct SyncContext<'a> {
    health: &'a SharedHealth,
    collector: &'a Collector,
    stats: &'a mut conntrack::Stats,
    metrics: &'a KubeProxyMetrics,
    no_local: &'a mut NoLocalEndpoints,
    /// Kubernetes Events on what cannot be programmed (with the API server as the source).
    events: Option<&'a mut ServiceEvents>,
    errors: &'a mut RepeatedErrors,
    /// Trigger times of the endpoints changes this sync programs, by family.
    trigger_times: Vec<(crate::model::IpFamily, SystemTime)>,
}

/// Converts what changed and programs it. The first sync reconciles everything (the maps may
/// hold what a previous run left); later ones only the frontends a change touched. Returns
/// whether the health-check node ports changed.
fn sync(
    pipeline: &mut Pipeline,
    reconciler: &mut Reconciler<BpfMaps>,
    context: &mut SyncContext,
    first: bool,
) -> bool {
    let started = Instant::now();
    // Counted before the first sync too: a directory's objects arrive before the loop runs.
    let counts = pipeline.take_change_counts();
    context.metrics.queued(&counts, SystemTime::now());
    context.trigger_times.extend(counts.trigger_times);
    for warning in pipeline.take_warnings() {
        tracing::warn!("{warning}");
        if let Some(events) = context.events.as_deref_mut() {
            events.object_error(&warning, events::reason::UNSUPPORTED);
        }
    }
    let changes = pipeline.take_changes();
    for error in &changes.errors {
        context.errors.error(error.to_string());
        if let Some(events) = context.events.as_deref_mut() {
            events.object_error(error, events::reason::CONFLICT);
        }
    }
    let desired = pipeline.table().desired();
    context.collector.maps_changing();
    let report = if first {
        let report = reconciler.reconcile(desired);
        context.collector.replace(flow_policy(desired, reconciler));
        report
    } else {
        let old_ids: Vec<Option<u32>> = changes
            .frontends
            .iter()
            .map(|key| reconciler.state().frontends.get(key).map(|f| f.service_id))
            .collect();
        let report = reconciler.reconcile_frontends(desired, &changes.frontends);
        // Flows of backends that left (or of frontends that went) are ended soon after.
        context.collector.update(policy_changes(desired, reconciler, &changes.frontends, &old_ids));
        report
    };
    for error in &report.errors {
        context.errors.error(error.to_string());
        if let Some(events) = context.events.as_deref_mut() {
            events.reconcile_error(error);
        }
    }
    let changed = report.programmed + report.removed + report.errors.len() > 0;
    context.stats.set(lb_common::stats::FRONTENDS_REFUSED, report.refused as u64);
    macro_rules! synced {
        ($level:ident) => {
            tracing::$level!(
                frontends = desired.frontends.len(),
                services = changes.services,
                programmed = report.programmed,
                removed = report.removed,
                unchanged = report.unchanged,
                errors = report.errors.len(),
                elapsed_us = started.elapsed().as_micros() as u64,
                "synced"
            )
        };
    }
    if changed || first {
        synced!(info)
    } else {
        synced!(debug)
    }

    if first {
        context.no_local.update(desired, desired.frontends.keys());
    } else {
        context.no_local.update(desired, &changes.frontends);
    }
    context.metrics.set_no_local_endpoints(&context.no_local.counts());
    let now = SystemTime::now();
    context.metrics.synced(started.elapsed(), report.errors.is_empty(), first, &context.trigger_times, now);
    context.trigger_times.clear();

    let mut health = context.health.lock().expect("health lock");
    health.node_eligible = pipeline.node_eligible();
    if report.errors.is_empty() {
        health.last_updated = Some(now);
        health.oldest_pending = None;
    }
    changes.health_checks || first
}

/// Forwards the data path's aya-log records (rare: they report inconsistencies) to our log.
fn forward_datapath_logs(ebpf: &mut aya::Ebpf) {
    let logger = match aya_log::EbpfLogger::init(ebpf) {
        Ok(logger) => logger,
        Err(error) => return tracing::warn!(%error, "data-path log records will not be shown"),
    };
    // SAFETY: the logger owns its ring buffer's descriptor and keeps it open while registered.
    let registered =
        unsafe { tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE) };
    let mut logger = match registered {
        Ok(logger) => logger,
        Err(error) => return tracing::warn!(%error, "data-path log records will not be shown"),
    };
    tokio::spawn(async move {
        while let Ok(mut guard) = logger.readable_mut().await {
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    });
}

pub async fn run(options: RunOptions) -> Result<()> {
    let on_invalid = match options.source {
        // A manifest edited into something invalid keeps its last good version in force.
        SourceOptions::Manifests { .. } => OnInvalid::KeepLast,
        SourceOptions::Kubernetes { .. } => OnInvalid::Drop,
    };
    let mut pipeline = Pipeline::new(options.proxy.clone(), on_invalid);
    let mut source = Source::start(&options, &mut pipeline).await?;

    let interfaces: Vec<String> =
        options.interfaces.iter().chain(&options.node_addresses.external_interfaces).cloned().collect();
    let selector = InterfaceSelector::parse(&interfaces)?;
    let mut link_events = LinkEvents::subscribe()?;
    let mut datapath = Datapath::load_variant(
        &options.bpf_dir,
        &options.capacity,
        options.program_variant,
        options.service_traffic_counters,
    )?;
    // Flows are stamped with the time published here, from before any program is attached.
    let clock_since = conntrack::publish_clock(&datapath.map_pin(lb_common::map_names::CLOCK))?;
    let external = options.node_addresses.external_interfaces.clone();
    let is_external = move |name: &str| external.iter().any(|e| e == name);
    // A previous lb's links (pinned, still attached) get this build's programs before anything
    // else: traffic never meets a moment without a program.
    let selected = selector.selected().unwrap_or_default();
    let adopted = datapath.adopt(&datapath::AdoptOptions {
        selected: &selected,
        is_external: &is_external,
        xdp: options.xdp,
        cgroup_path: options.cgroup_path.as_deref(),
    })?;
    if adopted != datapath::Adopted::default() {
        tracing::info!(
            updated = adopted.updated,
            released = adopted.released,
            "took over the links a previous lb left attached"
        );
    }
    // Every link runs this build's programs now (those attached from here on are new): a migration of the maps can end.
    if let Some(finished) = datapath.finish_migration()? {
        tracing::info!(
            maps = finished.maps,
            caught_up = finished.caught_up,
            "migrated maps in place: the old ones are gone"
        );
    }
    // Interfaces named literally must exist at start: a typo is an error, not a silent no-op.
    for interface in selector.literals() {
        datapath.attach(interface, is_external(interface))?;
        tracing::info!(%interface, "attached to ingress and egress");
    }
    let mut repeated_errors = RepeatedErrors::default();
    attach_selected(&mut datapath, &selector, &is_external, &mut repeated_errors);
    if datapath.attached().next().is_none() {
        tracing::warn!(interfaces = ?options.interfaces, "no interface matches yet; waiting for one to appear");
    }
    for interface in &options.node_addresses.external_interfaces {
        match datapath.attach_xdp(interface, options.xdp) {
            Ok(()) if options.xdp != datapath::XdpAttach::Off => {
                tracing::info!(%interface, mode = ?options.xdp, "XDP attached")
            }
            Ok(()) => {}
            Err(error) => tracing::warn!("{error}; TC handles this interface's traffic alone"),
        }
    }
    if let Some(path) = &options.cgroup_path {
        datapath.attach_sockets(path)?;
        tracing::info!(cgroup = %path.display(), "socket load balancing for the node's own connections");
    }
    forward_datapath_logs(datapath.ebpf_mut());
    let mut addresses = None;
    // The socket programs translate only sockets of this namespace: the node's own.
    let settings = DatapathSettings {
        netns_cookie: match &options.cgroup_path {
            None => 0,
            Some(_) => datapath::netns_cookie().context("reading this network namespace's cookie")?,
        },
        maglev_table_size: options.maglev_table_size,
    };
    let maps = BpfMaps::from_ebpf(datapath.ebpf_mut())?;
    let mut reconciler =
        Reconciler::restore_with(maps, options.maglev_table_size).context("reading the pinned maps")?;
    // IDs that surviving flows still name are never handed out again.
    let flow_tables = PinnedFlowTables::open(&options.bpf_dir)?;
    let (max_service_id, max_backend_id) =
        flow_tables.max_ids().context("reading the pinned conntrack table")?;
    reconciler.reserve_ids(max_service_id, max_backend_id);
    reconciler.set_backend_grace(BACKEND_GRACE);
    let flow_table_usage = flow_tables.usage();
    let collector =
        Collector::spawn(flow_tables, options.conntrack_timeouts, options.conntrack_gc_interval, clock_since);
    let mut stats = conntrack::Stats::open(&options.bpf_dir)?;
    refresh_node_addresses(
        &options.node_addresses,
        &mut addresses,
        &mut pipeline,
        &mut datapath,
        &settings,
        &mut reconciler,
    );
    let health: SharedHealth = Arc::new(Mutex::new(HealthState::new(2 * options.sync_period)));
    let kube_proxy_metrics = Arc::new(KubeProxyMetrics::default());
    if let Some(address) = options.healthz_bind_address {
        health::serve(address, health.clone(), kube_proxy_metrics.clone()).await?;
    }
    let mut usage_requests = match options.metrics_bind_address {
        Some(address) => Some(
            metrics::serve(
                address,
                kube_proxy_metrics.clone(),
                options.bpf_dir.clone(),
                options.capacity,
                flow_table_usage,
            )
            .await?,
        ),
        None => None,
    };
    let mut no_local = NoLocalEndpoints::default();
    let mut service_events = match &source {
        Source::Kubernetes { client, .. } => {
            Some(ServiceEvents::start(client.clone(), options.proxy.node_name.clone()))
        }
        Source::Manifests(_) => None,
    };
    let mut trigger_times = Vec::new();

    let mut health_checks = HealthCheckServers::default();
    let mut runner = SyncRunner::new(options.min_sync_period, Instant::now());
    runner.queue(Instant::now());
    let mut synced_once = false;
    let mut resync = tokio::time::interval(options.sync_period);
    resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    resync.tick().await; // the first tick is immediate
    // A full resync: the maps are read in a thread of their own, then compared with the record
    // a chunk at a time between other work.
    let mut snapshot: Option<tokio::task::JoinHandle<Result<MapsSnapshot, MapsError>>> = None;
    let mut repair: Option<Repair> = None;
    // When slots past a lowered count or unused backends are due for deletion.
    let mut release_at: Option<Instant> = None;

    // How /healthz learns that the source is unreachable (the data path then serves a state
    // that may be stale).
    let mut source_check = tokio::time::interval(Duration::from_secs(1));
    source_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        let ready = source.ready();
        let next_sync = if ready && (pipeline.has_pending() || !synced_once) {
            runner.next_sync(Instant::now())
        } else {
            None
        };
        let sync_due = async {
            match next_sync {
                // Due now: not through the timer, which would round up to its next millisecond.
                Some(at) if at <= Instant::now() => {}
                Some(at) => tokio::time::sleep_until(at.into()).await,
                None => std::future::pending().await,
            }
        };
        let release_due = async {
            match release_at {
                Some(at) => tokio::time::sleep_until(at.into()).await,
                None => std::future::pending().await,
            }
        };
        let resync_idle = snapshot.is_none() && repair.is_none();
        let usage_asked = async {
            match usage_requests.as_mut() {
                Some(requests) => requests.recv().await,
                None => std::future::pending().await,
            }
        };
        let snapshot_done = async {
            match snapshot.as_mut() {
                Some(task) => task.await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            // Changes first: a repair step or a resync never delays one for long.
            biased;
            changes = source.changed() => {
                take_in(&mut pipeline, &source, changes?, service_events.as_mut());
                // A Node change (a ToBeDeletedByClusterAutoscaler taint) reaches /healthz at
                // once, whether or not it changes what is programmed.
                health.lock().expect("health lock").node_eligible = pipeline.node_eligible();
                let counts = pipeline.take_change_counts();
                kube_proxy_metrics.queued(&counts, SystemTime::now());
                trigger_times.extend(counts.trigger_times);
                if pipeline.has_pending() {
                    runner.queue(Instant::now());
                    health.lock().expect("health lock").oldest_pending.get_or_insert_with(SystemTime::now);
                }
            }
            () = sync_due => {
                refresh_node_addresses(&options.node_addresses, &mut addresses, &mut pipeline, &mut datapath, &settings, &mut reconciler);
                let mut context = SyncContext {
                    health: &health,
                    collector: &collector,
                    stats: &mut stats,
                    metrics: &kube_proxy_metrics,
                    no_local: &mut no_local,
                    trigger_times: std::mem::take(&mut trigger_times),
                    events: service_events.as_mut(),
                    errors: &mut repeated_errors,
                };
                if sync(&mut pipeline, &mut reconciler, &mut context, !synced_once) {
                    health_checks.sync(&pipeline.table().desired().health_checks).await;
                }
                runner.synced(Instant::now());
                if !synced_once {
                    synced_once = true;
                    return_freed_memory();
                    // What a previous run left that nobody wants goes in a resync started now,
                    // read away from this loop (at 100 000 Services a dump takes seconds).
                    if snapshot.is_none() && repair.is_none() {
                        snapshot = Some(start_snapshot(&options.bpf_dir));
                    }
                }
                if reconciler.release_waiting() {
                    release_at.get_or_insert(Instant::now() + BACKEND_GRACE);
                }
            }
            () = release_due => {
                release_at = None;
                let report = reconciler.reconcile_frontends(pipeline.table().desired(), &BTreeSet::new());
                report.errors.iter().for_each(|error| repeated_errors.error(error.to_string()));
                if reconciler.release_waiting() {
                    release_at = Some(Instant::now() + BACKEND_GRACE / 4);
                }
            }
            Some(reply) = usage_asked => {
                let _ = reply.send(map_usage(&reconciler));
            }
            _ = source_check.tick() => {
                health.lock().expect("health lock").source_stale_since = source.stale_since();
            }
            _ = resync.tick(), if synced_once && resync_idle => {
                // Repair what was changed behind our back: read the maps away from this loop.
                snapshot = Some(start_snapshot(&options.bpf_dir));
            }
            done = snapshot_done => {
                snapshot = None;
                match done {
                    Ok(Ok(maps)) => repair = Some(reconciler.start_repair(maps)),
                    Ok(Err(error)) => tracing::warn!("reading the maps for a resync: {error}"),
                    Err(error) => tracing::warn!("reading the maps for a resync: {error}"),
                }
                refresh_node_addresses(&options.node_addresses, &mut addresses, &mut pipeline, &mut datapath, &settings, &mut reconciler);
            }
            () = std::future::ready(()), if repair.is_some() => {
                let step = repair.as_mut().expect("checked by the guard");
                match reconciler.repair_step(step, pipeline.table().desired()) {
                    Ok(false) => {}
                    Ok(true) => {
                        let step = repair.take().expect("checked by the guard");
                        if step.repaired + step.deleted > 0 {
                            tracing::info!(repaired = step.repaired, deleted = step.deleted, "resync repaired map entries changed behind lb's back");
                        }
                        drop(step);
                        return_freed_memory();
                        if reconciler.release_waiting() {
                            release_at.get_or_insert(Instant::now() + BACKEND_GRACE);
                        }
                    }
                    Err(error) => {
                        repair = None;
                        tracing::warn!("{error}");
                    }
                }
                tokio::task::yield_now().await;
            }
            changed = link_events.changed() => {
                changed?;
                attach_selected(&mut datapath, &selector, &is_external, &mut repeated_errors);
                // An interface (and its addresses) came or went: NodePort frontends may change.
                refresh_node_addresses(&options.node_addresses, &mut addresses, &mut pipeline, &mut datapath, &settings, &mut reconciler);
                if pipeline.has_pending() {
                    runner.queue(Instant::now());
                }
            }
            _ = tokio::signal::ctrl_c() => break,
            _ = sigterm.recv() => break,
        }
    }
    // The programs stay attached (their links are pinned) and keep translating with the last
    // programmed maps until the next lb takes them over, or `lb cleanup` removes them.
    tracing::info!("shutting down: the data path stays in place for the next start (lb cleanup removes it)");
    drop(datapath);
    Ok(())
}

/// Takes changes into the pipeline; an object it cannot use is reported with where it came from.
fn take_in(
    pipeline: &mut Pipeline,
    source: &Source,
    changes: Vec<ObjectChange>,
    mut events: Option<&mut ServiceEvents>,
) {
    for change in changes {
        let key = change.key();
        if let Some(events) = events.as_deref_mut() {
            events.note_object(&change);
        }
        if let Some(error) = take_one(pipeline, change, || source.origin(&key))
            && let Some(events) = events.as_deref_mut()
        {
            events.object_error(&error, events::reason::INVALID);
        }
    }
}

/// Takes one change; returns the error an object it cannot use gave (after logging it).
fn take_one(
    pipeline: &mut Pipeline,
    change: ObjectChange,
    origin: impl FnOnce() -> Option<String>,
) -> Option<crate::model::ObjectError> {
    let error = pipeline.apply(change).err()?;
    match origin() {
        Some(origin) => tracing::error!("{origin}: {error}"),
        None => tracing::error!("{error}"),
    }
    Some(error)
}

/// Attaches to every selected interface present now and forgets vanished ones; a failure on
/// one interface is logged and does not stop the others.
fn attach_selected(
    datapath: &mut Datapath,
    selector: &InterfaceSelector,
    is_external: &impl Fn(&str) -> bool,
    errors: &mut RepeatedErrors,
) {
    // Through `errors`: a link that keeps flapping would log the same failure each time.
    match selector.selected() {
        Ok(selected) => {
            for error in datapath.sync_interfaces(&selected, is_external) {
                errors.error(error.to_string());
            }
        }
        Err(error) => errors.error(error.to_string()),
    }
}

/// Gives the memory a big transient (the first sync's input, a resync's copy of the maps) freed
/// back to the system; glibc's allocator would otherwise keep it, and RSS with it.
fn return_freed_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only releases free memory of the allocator's own heaps.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Reads the pinned maps in a thread of its own, for a resync.
fn start_snapshot(bpf_dir: &std::path::Path) -> tokio::task::JoinHandle<Result<MapsSnapshot, MapsError>> {
    let bpf_dir = bpf_dir.to_path_buf();
    tokio::task::spawn_blocking(move || BpfMaps::from_pins(&bpf_dir)?.snapshot())
}

/// How full the maps are, from what the reconciler wrote (a scrape asks; at 100 000 frontends
/// the count takes about a millisecond).
fn map_usage(reconciler: &Reconciler<BpfMaps>) -> MapUsage {
    let state = reconciler.state();
    let mut usage = MapUsage { frontends: state.frontends.len(), ..Default::default() };
    for (key, frontend) in &state.frontends {
        let entries =
            if key.address.ip.is_ipv4() { &mut usage.service_entries } else { &mut usage.service_entries6 };
        *entries += 1 + frontend.slots.len();
    }
    for backend in state.backends.values() {
        *if backend.ip.is_ipv4() { &mut usage.backends } else { &mut usage.backends6 } += 1;
    }
    usage
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_repeated_error_is_logged_once_a_minute_with_the_count_held_back() {
        let mut errors = RepeatedErrors::default();
        let start = Instant::now();
        let at = |seconds: u64| start + Duration::from_secs(seconds);
        assert_eq!(errors.admit("map full", at(0)), Some(0));
        assert_eq!(errors.admit("map full", at(1)), None);
        assert_eq!(errors.admit("another", at(1)), Some(0), "each line on its own");
        assert_eq!(errors.admit("map full", at(30)), None);
        assert_eq!(errors.admit("map full", at(61)), Some(2));
        assert_eq!(errors.admit("map full", at(62)), None);
        // Quiet for long enough: forgotten, then logged as new.
        assert_eq!(errors.admit("map full", at(300)), Some(0));
    }
}
