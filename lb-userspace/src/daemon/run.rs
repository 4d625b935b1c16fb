//! `lb run`: load the data path, then keep the maps equal to what the source says: a directory
//! of manifests or the API server, through the same conversion and the same reconciler.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result};
use k8s_openapi::api::core::v1::Node;
use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;

use crate::convert::{self, ClusterObjects, EndpointsSource, ProxyConfig};
use crate::daemon::health::{self, SharedHealth};
use crate::daemon::health_check::HealthCheckServers;
use crate::daemon::sync::{HealthState, SyncRunner};
use crate::dataplane::conntrack::{self, AffinityPolicy, Collector, FlowPolicy, PinnedFlowTables, Timeouts};
use crate::dataplane::datapath::{self, Capacity, Datapath};
use crate::dataplane::interfaces::{InterfaceSelector, LinkEvents};
use crate::dataplane::maps::BpfMaps;
use crate::dataplane::node_addresses::{NodeAddressConfig, NodeAddresses};
use crate::dataplane::reconcile::Reconciler;
use crate::model::{DesiredState, HealthCheck};
use crate::source::cluster::{ClusterEvent, ClusterStore};
use crate::source::cluster_ip::ClusterIpAllocator;
use crate::source::kube as kube_source;
use crate::source::manifests::ManifestStore;
use lb_common::DatapathConfig;

pub enum SourceOptions {
    /// A directory of Kubernetes YAML, watched for changes. Services without a clusterIP get
    /// one from `cluster_ip_range`, remembered in `state_file`.
    Manifests { dir: PathBuf, cluster_ip_range: ipnet::Ipv4Net, state_file: PathBuf },
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
}

/// How long an unused backend stays in the map (see `Reconciler::set_backend_grace`).
const BACKEND_GRACE: Duration = Duration::from_secs(2);

/// How long to wait after a file event for the rest of a burst (an editor's write + rename).
const MANIFEST_COALESCE: Duration = Duration::from_millis(20);

enum Source {
    Manifests {
        dir: PathBuf,
        store: ManifestStore,
        allocator: ClusterIpAllocator,
        state_file: PathBuf,
        events: mpsc::UnboundedReceiver<()>,
        _watcher: notify::RecommendedWatcher,
    },
    Kubernetes {
        store: ClusterStore,
        events: mpsc::UnboundedReceiver<ClusterEvent>,
        endpoints_source: EndpointsSource,
        status: Arc<kube_source::WatchStatus>,
    },
}

impl Source {
    async fn start(options: &RunOptions) -> Result<Self> {
        match &options.source {
            SourceOptions::Manifests { dir, cluster_ip_range, state_file } => {
                if !dir.is_dir() {
                    anyhow::bail!(
                        "manifest directory {} does not exist or is not a directory",
                        dir.display()
                    );
                }
                let (tx, events) = mpsc::unbounded_channel();
                let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
                    // Our own reads raise access events; only changes to the directory's files count.
                    let changed = match event {
                        Ok(event) => !matches!(event.kind, notify::EventKind::Access(_)),
                        Err(_) => true, // e.g. an inotify queue overflow: re-read to be safe
                    };
                    if changed {
                        let _ = tx.send(());
                    }
                })
                .context("starting the manifest watcher")?;
                watcher
                    .watch(dir, RecursiveMode::NonRecursive)
                    .with_context(|| format!("watching {}", dir.display()))?;
                let allocator = ClusterIpAllocator::load(*cluster_ip_range, state_file)?;
                let mut store = ManifestStore::default();
                reload_manifests(&mut store, dir);
                Ok(Source::Manifests {
                    dir: dir.clone(),
                    store,
                    allocator,
                    state_file: state_file.clone(),
                    events,
                    _watcher: watcher,
                })
            }
            SourceOptions::Kubernetes { kubeconfig } => {
                let client = kube_source::client(kubeconfig.as_deref()).await?;
                let (tx, events) = mpsc::unbounded_channel();
                let status = kube_source::spawn_watchers(client, &options.proxy, tx);
                Ok(Source::Kubernetes {
                    store: ClusterStore::default(),
                    events,
                    endpoints_source: options.proxy.endpoints_source,
                    status,
                })
            }
        }
    }

    /// Since when the source has been unreachable, if it is.
    fn stale_since(&self) -> Option<SystemTime> {
        match self {
            Source::Manifests { .. } => None,
            Source::Kubernetes { status, .. } => status.stale_since(),
        }
    }

    /// Whether the source has a complete picture to sync from.
    fn ready(&self) -> bool {
        match self {
            Source::Manifests { .. } => true,
            Source::Kubernetes { store, endpoints_source, .. } => store.ready(*endpoints_source),
        }
    }

    /// The objects to convert. Manifests mode also gives Services their ClusterIPs here.
    fn objects(&mut self) -> ClusterObjects {
        match self {
            Source::Manifests { store, allocator, state_file, .. } => {
                let mut objects = store.cluster_objects();
                let before = allocator.assigned().clone();
                for error in allocator.assign(&mut objects.services) {
                    tracing::error!("{error}");
                }
                if *allocator.assigned() != before
                    && let Err(error) = allocator.save(state_file)
                {
                    tracing::error!("{error}");
                }
                objects
            }
            Source::Kubernetes { store, .. } => store.objects(),
        }
    }

    /// Waits for the next visible change and takes it in.
    async fn changed(&mut self) -> Result<()> {
        match self {
            Source::Manifests { dir, store, events, .. } => {
                events.recv().await.context("manifest watcher stopped")?;
                tokio::time::sleep(MANIFEST_COALESCE).await;
                while events.try_recv().is_ok() {}
                reload_manifests(store, dir);
                Ok(())
            }
            Source::Kubernetes { store, events, .. } => loop {
                let event = events.recv().await.context("watchers stopped")?;
                if store.apply(event) {
                    return Ok(());
                }
            },
        }
    }
}

fn reload_manifests(store: &mut ManifestStore, dir: &std::path::Path) {
    match store.reload(dir) {
        Ok(errors) => errors.iter().for_each(|error| tracing::error!("{error}")),
        // The directory itself is unreadable: keep serving what is programmed.
        Err(error) => tracing::error!("{error}; keeping the current state"),
    }
}

/// A node being deleted (or drained by the cluster autoscaler) should get no new traffic from
/// load balancers: kube-proxy reports it in `/healthz`.
fn node_eligible(objects: &ClusterObjects, config: &ProxyConfig) -> bool {
    let Some(node) = config
        .node_name
        .as_deref()
        .and_then(|name| objects.nodes.iter().find(|n| n.metadata.name.as_deref() == Some(name)))
    else {
        return true;
    };
    let tainted = |node: &Node| {
        node.spec
            .as_ref()
            .and_then(|s| s.taints.as_ref())
            .is_some_and(|t| t.iter().any(|t| t.key == "ToBeDeletedByClusterAutoscaler"))
    };
    node.metadata.deletion_timestamp.is_none() && !tainted(node)
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
    config: &mut ProxyConfig,
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
    if current.as_ref().is_none_or(|current| current.all != addresses.all) {
        for error in reconciler.set_host_addresses(addresses.all.iter().copied().collect()) {
            tracing::error!("{error}");
        }
    }
    config.node_addresses = addresses.nodeport.clone();
    *current = Some(addresses);
}

/// What the conntrack collector needs to know of the frontends: by address, the backends
/// flows may keep; by service ID, what affinity records may keep.
fn flow_policy(desired: &DesiredState, reconciler: &Reconciler<BpfMaps>) -> FlowPolicy {
    let programmed = &reconciler.state().frontends;
    let mut policy = FlowPolicy { made_ns: conntrack::monotonic_ns(), ..Default::default() };
    let address = |backend: &crate::model::L4Addr| (u32::from(backend.ip).to_be(), backend.port.to_be());
    for (key, frontend) in &desired.frontends {
        let protocol = frontend.address.protocol;
        let at = (u32::from(frontend.address.ip).to_be(), frontend.address.port.to_be(), protocol.number());
        let flows = policy.frontends.entry(at).or_default();
        flows.serving.extend(frontend.serving.iter().filter(|b| b.protocol == protocol).map(address));
        flows.listed.extend(frontend.listed.iter().filter(|b| b.protocol == protocol).map(address));
        if let Some(programmed) = programmed.get(key) {
            let affinity = AffinityPolicy {
                backend_ids: programmed.slots.iter().copied().collect(),
                timeout: frontend.policy.affinity_timeout,
            };
            policy.affinity.insert(programmed.service_id, affinity);
        }
    }
    policy
}

/// Converts and reconciles; returns the health-check node ports the state asks for.
fn sync(
    source: &mut Source,
    config: &ProxyConfig,
    reconciler: &mut Reconciler<BpfMaps>,
    health: &SharedHealth,
    collector: &Collector,
    stats: &mut conntrack::Stats,
) -> BTreeMap<u16, HealthCheck> {
    let started = Instant::now();
    let objects = source.objects();
    let (desired, errors) = convert::desired_state(&objects, config);
    errors.iter().for_each(|error| tracing::error!("{error}"));
    let report = reconciler.reconcile(&desired);
    report.errors.iter().for_each(|error| tracing::error!("{error}"));
    let changed = report.programmed + report.removed + report.errors.len() > 0;
    stats.set(lb_common::stats::FRONTENDS_REFUSED, report.refused as u64);
    // Flows of backends that left (or of frontends that went) are ended soon after.
    collector.update(flow_policy(&desired, reconciler));
    macro_rules! synced {
        ($level:ident) => {
            tracing::$level!(
                frontends = desired.frontends.len(),
                programmed = report.programmed,
                removed = report.removed,
                unchanged = report.unchanged,
                errors = report.errors.len(),
                elapsed_us = started.elapsed().as_micros() as u64,
                "synced"
            )
        };
    }
    if changed {
        synced!(info)
    } else {
        synced!(debug)
    }

    let mut health = health.lock().expect("health lock");
    health.node_eligible = node_eligible(&objects, config);
    if report.errors.is_empty() {
        health.last_updated = Some(SystemTime::now());
        health.oldest_pending = None;
    }
    desired.health_checks
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
    let mut source = Source::start(&options).await?;

    let interfaces: Vec<String> =
        options.interfaces.iter().chain(&options.node_addresses.external_interfaces).cloned().collect();
    let selector = InterfaceSelector::parse(&interfaces)?;
    let mut link_events = LinkEvents::subscribe()?;
    let mut datapath = Datapath::load_variant(&options.bpf_dir, &options.capacity, options.program_variant)?;
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
    attach_selected(&mut datapath, &selector, &is_external);
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
    let mut proxy = options.proxy.clone();
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
        conntrack::max_ids(&flow_tables).context("reading the pinned conntrack table")?;
    reconciler.reserve_ids(max_service_id, max_backend_id);
    reconciler.set_backend_grace(BACKEND_GRACE);
    let collector =
        Collector::spawn(flow_tables, options.conntrack_timeouts, options.conntrack_gc_interval, clock_since);
    let mut stats = conntrack::Stats::open(&options.bpf_dir)?;
    refresh_node_addresses(
        &options.node_addresses,
        &mut addresses,
        &mut proxy,
        &mut datapath,
        &settings,
        &mut reconciler,
    );
    let health: SharedHealth = Arc::new(Mutex::new(HealthState::new(2 * options.sync_period)));
    if let Some(address) = options.healthz_bind_address {
        health::serve(address, health.clone()).await?;
    }

    let mut health_checks = HealthCheckServers::default();
    let mut runner = SyncRunner::new(options.min_sync_period, Instant::now());
    runner.queue(Instant::now());
    let mut synced_once = false;
    let mut resync = tokio::time::interval(options.sync_period);
    resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    resync.tick().await; // the first tick is immediate

    // How /healthz learns that the source is unreachable (the data path then serves a state
    // that may be stale).
    let mut source_check = tokio::time::interval(Duration::from_secs(1));
    source_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        let next_sync = if source.ready() { runner.next_sync(Instant::now()) } else { None };
        let sync_due = async {
            match next_sync {
                Some(at) => tokio::time::sleep_until(at.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            changed = source.changed() => {
                changed?;
                runner.queue(Instant::now());
                health.lock().expect("health lock").oldest_pending.get_or_insert_with(SystemTime::now);
            }
            () = sync_due => {
                refresh_node_addresses(&options.node_addresses, &mut addresses, &mut proxy, &mut datapath, &settings, &mut reconciler);
                let checks = sync(&mut source, &proxy, &mut reconciler, &health, &collector, &mut stats);
                health_checks.sync(&checks).await;
                runner.synced(Instant::now());
                if !synced_once {
                    synced_once = true;
                    prune(&mut reconciler);
                }
            }
            _ = source_check.tick() => {
                health.lock().expect("health lock").source_stale_since = source.stale_since();
            }
            _ = resync.tick(), if source.ready() => {
                // Full resync: re-read the maps so entries changed behind our back are repaired.
                if let Err(error) = reconciler.refresh_from_maps() {
                    tracing::warn!("{error}");
                }
                refresh_node_addresses(&options.node_addresses, &mut addresses, &mut proxy, &mut datapath, &settings, &mut reconciler);
                let checks = sync(&mut source, &proxy, &mut reconciler, &health, &collector, &mut stats);
                health_checks.sync(&checks).await;
                prune(&mut reconciler);
            }
            changed = link_events.changed() => {
                changed?;
                attach_selected(&mut datapath, &selector, &is_external);
                // An interface (and its addresses) came or went: NodePort frontends may change.
                let before = proxy.node_addresses.clone();
                refresh_node_addresses(&options.node_addresses, &mut addresses, &mut proxy, &mut datapath, &settings, &mut reconciler);
                if proxy.node_addresses != before {
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

/// Attaches to every selected interface present now and forgets vanished ones; a failure on
/// one interface is logged and does not stop the others.
fn attach_selected(
    datapath: &mut Datapath,
    selector: &InterfaceSelector,
    is_external: &impl Fn(&str) -> bool,
) {
    match selector.selected() {
        Ok(selected) => {
            for error in datapath.sync_interfaces(&selected, is_external) {
                tracing::error!("{error}");
            }
        }
        Err(error) => tracing::error!("{error}"),
    }
}

fn prune(reconciler: &mut Reconciler<BpfMaps>) {
    match reconciler.prune() {
        Ok(0) => {}
        Ok(deleted) => tracing::info!(deleted, "pruned map entries nobody wants"),
        Err(error) => tracing::warn!("{error}"),
    }
}
