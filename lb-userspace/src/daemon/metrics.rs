//! Prometheus metrics on kube-proxy's metrics port (`--metrics-bind-address`, 127.0.0.1:10249 by
//! default): kube-proxy's own `kubeproxy_*` metrics with its names, buckets and meaning, so
//! existing dashboards and alerts keep working, and lb's own `lb_*` metrics for what kube-proxy
//! has no metric for. The `lb_*` ones are read when scraped: the data path's counters from the
//! pinned maps (in a thread of their own), the maps' occupancy from the event loop.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::encoding::text::{encode_eof, encode_registry};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets, linear_buckets};
use prometheus_client::registry::Registry;
use tokio::sync::{mpsc, oneshot};

use crate::dataplane::conntrack::TableUsage;
use crate::dataplane::datapath::{self, Capacity};
use crate::dataplane::maps::BpfMaps;
use crate::model::{DesiredState, FrontendKey, FrontendType, IpFamily, ServicePortName};
use crate::state::ChangeCounts;

/// What `/proxyMode` answers (kube-proxy answers `iptables`, `ipvs` or `nftables`).
pub const PROXY_MODE: &str = "ebpf";

type Labels = Vec<(String, String)>;

/// A histogram per `ip_family`, each with the same buckets.
type FamilyHistograms = Family<Labels, Histogram, fn() -> Histogram>;
type TimestampGauges = Family<Labels, Gauge<f64, std::sync::atomic::AtomicU64>>;

/// kube-proxy's metrics, updated by the event loop as it syncs. As in kube-proxy v1.36, the
/// sync and programming series carry `ip_family`: a dual-stack kube-proxy runs a proxier per
/// family, while lb's one sync programs both families, so each sync is recorded under both
/// (as `/healthz` reports both families healthy from one sync).
pub struct KubeProxyMetrics {
    registry: Registry,
    sync_duration: FamilyHistograms,
    sync_full_duration: FamilyHistograms,
    sync_partial_duration: FamilyHistograms,
    network_programming: FamilyHistograms,
    last_synced: TimestampGauges,
    last_queued: TimestampGauges,
    endpoint_changes: Counter,
    endpoint_changes_pending: Gauge,
    service_changes: Counter,
    service_changes_pending: Gauge,
    no_local_endpoints: Family<Labels, Gauge>,
    pub healthz: Family<Labels, Counter>,
    pub livez: Family<Labels, Counter>,
}

fn seconds_since_epoch(time: SystemTime) -> f64 {
    time.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_secs_f64()
}

const FAMILIES: [IpFamily; 2] = [IpFamily::V4, IpFamily::V6];

fn family_label(family: IpFamily) -> Labels {
    vec![("ip_family".to_string(), family.to_string())]
}

/// kube-proxy's sync buckets: 1 ms doubling to 16 s.
fn sync_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 15))
}

/// kube-proxy's network programming buckets: 0, then 0.25 s to 5 min.
fn programming_histogram() -> Histogram {
    Histogram::new(
        std::iter::once(0.0)
            .chain(linear_buckets(0.25, 0.25, 2))
            .chain(linear_buckets(1.0, 1.0, 59))
            .chain(linear_buckets(60.0, 5.0, 12))
            .chain(linear_buckets(120.0, 30.0, 7)),
    )
}

impl Default for KubeProxyMetrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let histograms = |constructor: fn() -> Histogram| FamilyHistograms::new_with_constructor(constructor);
        let metrics = Self {
            registry: Registry::default(),
            sync_duration: histograms(sync_histogram),
            sync_full_duration: histograms(sync_histogram),
            sync_partial_duration: histograms(sync_histogram),
            network_programming: histograms(programming_histogram),
            last_synced: Family::default(),
            last_queued: Family::default(),
            endpoint_changes: Counter::default(),
            endpoint_changes_pending: Gauge::default(),
            service_changes: Counter::default(),
            service_changes_pending: Gauge::default(),
            no_local_endpoints: Family::default(),
            healthz: Family::default(),
            livez: Family::default(),
        };
        // Counters get their `_total` suffix from the registry.
        registry.register(
            "kubeproxy_sync_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds",
            metrics.sync_duration.clone(),
        );
        registry.register(
            "kubeproxy_sync_full_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds for full resyncs",
            metrics.sync_full_duration.clone(),
        );
        registry.register(
            "kubeproxy_sync_partial_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds for partial resyncs",
            metrics.sync_partial_duration.clone(),
        );
        registry.register(
            "kubeproxy_network_programming_duration_seconds",
            "In Cluster Network Programming Latency in seconds",
            metrics.network_programming.clone(),
        );
        registry.register(
            "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
            "The last time proxy rules were successfully synced",
            metrics.last_synced.clone(),
        );
        registry.register(
            "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds",
            "The last time a sync of proxy rules was queued",
            metrics.last_queued.clone(),
        );
        registry.register(
            "kubeproxy_sync_proxy_rules_endpoint_changes",
            "Cumulative proxy rules Endpoint changes",
            metrics.endpoint_changes.clone(),
        );
        registry.register(
            "kubeproxy_sync_proxy_rules_endpoint_changes_pending",
            "Pending proxy rules Endpoint changes",
            metrics.endpoint_changes_pending.clone(),
        );
        registry.register(
            "kubeproxy_sync_proxy_rules_service_changes",
            "Cumulative proxy rules Service changes",
            metrics.service_changes.clone(),
        );
        registry.register(
            "kubeproxy_sync_proxy_rules_service_changes_pending",
            "Pending proxy rules Service changes",
            metrics.service_changes_pending.clone(),
        );
        // A gauge whose name ends in `_total`, as kube-proxy names it.
        registry.register(
            "kubeproxy_sync_proxy_rules_no_local_endpoints_total",
            "Number of services with a Local traffic policy and no endpoints",
            metrics.no_local_endpoints.clone(),
        );
        registry.register(
            "kubeproxy_proxy_healthz",
            "Cumulative proxy healthz HTTP status",
            metrics.healthz.clone(),
        );
        registry.register(
            "kubeproxy_proxy_livez",
            "Cumulative proxy livez HTTP status",
            metrics.livez.clone(),
        );
        Self { registry, ..metrics }
    }
}

impl KubeProxyMetrics {
    /// Changes were taken in and a sync queued.
    pub fn queued(&self, counts: &ChangeCounts, now: SystemTime) {
        self.service_changes.inc_by(counts.services);
        self.endpoint_changes.inc_by(counts.endpoints);
        self.service_changes_pending.inc_by(counts.services as i64);
        self.endpoint_changes_pending.inc_by(counts.endpoints as i64);
        if counts.services + counts.endpoints == 0 {
            // Nothing queued (a Node update, an object that did not change).
            return;
        }
        for family in FAMILIES {
            self.last_queued.get_or_create(&family_label(family)).set(seconds_since_epoch(now));
        }
    }

    /// A sync ended (`full`: it looked at every frontend, as the first one does); `trigger_times`
    /// are those of the endpoints changes it programmed, by the changed object's family.
    pub fn synced(
        &self,
        elapsed: Duration,
        succeeded: bool,
        full: bool,
        trigger_times: &[(IpFamily, SystemTime)],
        now: SystemTime,
    ) {
        let kind = if full { &self.sync_full_duration } else { &self.sync_partial_duration };
        for family in FAMILIES {
            let label = family_label(family);
            self.sync_duration.get_or_create(&label).observe(elapsed.as_secs_f64());
            kind.get_or_create(&label).observe(elapsed.as_secs_f64());
            if succeeded {
                self.last_synced.get_or_create(&label).set(seconds_since_epoch(now));
            }
        }
        self.service_changes_pending.set(0);
        self.endpoint_changes_pending.set(0);
        if succeeded {
            for (family, trigger) in trigger_times {
                // A trigger time ahead of this node's clock (skew) counts as no delay.
                let latency = now.duration_since(*trigger).unwrap_or_default();
                self.network_programming.get_or_create(&family_label(*family)).observe(latency.as_secs_f64());
            }
        }
    }

    /// Service ports with a Local traffic policy and no endpoint on this node, by family and
    /// policy (`internal`, `external`).
    pub fn set_no_local_endpoints(&self, counts: &BTreeMap<(IpFamily, &'static str), usize>) {
        for family in FAMILIES {
            for policy in ["internal", "external"] {
                let mut labels = family_label(family);
                labels.push(("traffic_policy".to_string(), policy.to_string()));
                let count = counts.get(&(family, policy)).copied().unwrap_or(0);
                self.no_local_endpoints.get_or_create(&labels).set(count as i64);
            }
        }
    }

    pub fn count_health_answer(family: &Family<Labels, Counter>, status: StatusCode) {
        family.get_or_create(&vec![("code".to_string(), status.as_u16().to_string())]).inc();
    }
}

/// How full the maps are, as the reconciler knows them (reading a hash map's size from the
/// kernel would mean walking it).
#[derive(Debug, Clone, Copy, Default)]
pub struct MapUsage {
    pub service_entries: usize,
    pub service_entries6: usize,
    pub frontends: usize,
    pub backends: usize,
    pub backends6: usize,
}

/// A scrape's question to the event loop.
pub type UsageRequest = oneshot::Sender<MapUsage>;

#[derive(Clone)]
pub struct MetricsState {
    pub kube_proxy: Arc<KubeProxyMetrics>,
    bpf_dir: PathBuf,
    capacity: Capacity,
    usage: mpsc::Sender<UsageRequest>,
    /// The conntrack and affinity maps, as the collector's last pass counted them.
    flow_tables: TableUsage,
}

/// The standard `process_*` metrics (kube-proxy's dashboards chart its CPU and memory with them),
/// from /proc.
fn register_process_metrics(registry: &mut Registry) {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else { return };
    // Fields after the command name (which may hold spaces), from field 3 (state) on.
    let Some(fields) = stat.rsplit_once(')').map(|(_, rest)| rest.split_whitespace().collect::<Vec<_>>())
    else {
        return;
    };
    let field = |n: usize| fields.get(n - 3).and_then(|f| f.parse::<f64>().ok()).unwrap_or(0.0);
    // SAFETY: sysconf only reads a configuration value.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(1) as f64;
    let boot_time = std::fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("btime ")?.trim().parse::<f64>().ok()))
        .unwrap_or(0.0);
    let open_fds = std::fs::read_dir("/proc/self/fd").map(|d| d.count()).unwrap_or(0);
    let gauge = |value: f64| {
        let gauge = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        gauge.set(value);
        gauge
    };
    let cpu = prometheus_client::metrics::counter::Counter::<f64, std::sync::atomic::AtomicU64>::default();
    cpu.inc_by((field(14) + field(15)) / ticks);
    registry.register("process_cpu_seconds", "Total user and system CPU time spent in seconds", cpu);
    registry.register(
        "process_resident_memory_bytes",
        "Resident memory size in bytes",
        gauge(field(24) * page),
    );
    registry.register("process_virtual_memory_bytes", "Virtual memory size in bytes", gauge(field(23)));
    registry.register(
        "process_start_time_seconds",
        "Start time of the process since unix epoch in seconds",
        gauge(boot_time + field(22) / ticks),
    );
    registry.register("process_open_fds", "Number of open file descriptors", gauge(open_fds as f64));
}

/// `lb_*` metrics as of now.
async fn lb_registry(state: &MetricsState) -> Registry {
    let mut registry = Registry::default();
    register_process_metrics(&mut registry);
    let (reply, answer) = oneshot::channel();
    let usage = match state.usage.send(reply).await {
        Ok(()) => answer.await.ok(),
        Err(_) => None,
    };
    let bpf_dir = state.bpf_dir.clone();
    let read = tokio::task::spawn_blocking(move || read_datapath(&bpf_dir)).await;
    let datapath = match read {
        Ok(Ok(datapath)) => Some(datapath),
        Ok(Err(error)) => {
            tracing::warn!("metrics: reading the data path's counters: {error}");
            None
        }
        Err(error) => {
            tracing::warn!("metrics: reading the data path's counters: {error}");
            None
        }
    };

    if let Some(usage) = usage {
        let entries = Family::<Labels, Gauge>::default();
        let capacity = Family::<Labels, Gauge>::default();
        let map = |name: &str| vec![("map".to_string(), name.to_string())];
        for (name, used, size) in [
            (lb_common::map_names::SERVICES, usage.service_entries, state.capacity.service_slots),
            (lb_common::map_names::SERVICE_META, usage.frontends, state.capacity.frontends),
            (lb_common::map_names::BACKENDS, usage.backends, state.capacity.backends),
            // The IPv6 maps, sized by the same flags.
            (lb_common::map_names::SERVICES6, usage.service_entries6, state.capacity.service_slots),
            (lb_common::map_names::BACKENDS6, usage.backends6, state.capacity.backends),
        ] {
            entries.get_or_create(&map(name)).set(used as i64);
            capacity.get_or_create(&map(name)).set(i64::from(size));
        }
        // Each family's conntrack and affinity maps (none before the collector's first pass).
        let flow_tables = state.flow_tables.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
        for (name, used, size) in flow_tables {
            entries.get_or_create(&map(name)).set(used as i64);
            capacity.get_or_create(&map(name)).set(i64::from(size));
        }
        registry.register("lb_map_entries", "Entries in each of lb's BPF maps", entries);
        registry.register(
            "lb_map_capacity",
            "Capacity of each of lb's BPF maps (its --max-* flag)",
            capacity,
        );
    }

    if let Some(datapath) = datapath {
        let verdicts = Family::<Labels, Counter>::default();
        let drops = Family::<Labels, Counter>::default();
        for (name, value) in &datapath.counters {
            if *name == "packets" {
                continue;
            }
            verdicts.get_or_create(&vec![("counter".to_string(), name.to_string())]).inc_by(*value);
            if let Some(reason) = name.strip_prefix("drop_") {
                drops.get_or_create(&vec![("reason".to_string(), reason.to_string())]).inc_by(*value);
            }
        }
        registry.register(
            "lb_datapath_events",
            "Packets by verdict and data-path events, by counter (lb counters names them)",
            verdicts,
        );
        registry.register("lb_datapath_drops", "Packets the data path dropped, by reason", drops);
        let packets = Family::<Labels, Counter>::default();
        let bytes = Family::<Labels, Counter>::default();
        let flows = Family::<Labels, Counter>::default();
        for ((service, kind), traffic) in &datapath.services {
            let labels = |direction: Option<&str>| {
                let mut labels =
                    vec![("service".to_string(), service.clone()), ("type".to_string(), kind.clone())];
                if let Some(direction) = direction {
                    labels.push(("direction".to_string(), direction.to_string()));
                }
                labels
            };
            packets.get_or_create(&labels(Some("request"))).inc_by(traffic.packets);
            packets.get_or_create(&labels(Some("reply"))).inc_by(traffic.reply_packets);
            bytes.get_or_create(&labels(Some("request"))).inc_by(traffic.bytes);
            bytes.get_or_create(&labels(Some("reply"))).inc_by(traffic.reply_bytes);
            flows.get_or_create(&labels(None)).inc_by(traffic.new_flows);
        }
        registry.register(
            "lb_service_packets",
            "Packets translated for a Service port's frontends of one type, by direction",
            packets,
        );
        registry.register(
            "lb_service_bytes",
            "Bytes (whole frames) translated for a Service port's frontends of one type, by direction",
            bytes,
        );
        registry.register(
            "lb_service_new_flows",
            "Flows given a backend by a Service port's frontends of one type (connections, UDP flows)",
            flows,
        );
    }
    registry
}

/// What the pinned maps say, for one scrape.
struct DatapathReading {
    counters: Vec<(&'static str, u64)>,
    /// (Service port, frontend type) -> traffic, summed over the frontends of that type.
    services: BTreeMap<(String, String), lb_common::ServiceTraffic>,
}

fn read_datapath(bpf_dir: &std::path::Path) -> anyhow::Result<DatapathReading> {
    let counters = datapath::read_counters(bpf_dir)?;
    let traffic = datapath::read_service_traffic(bpf_dir)?;
    let mut services: BTreeMap<(String, String), lb_common::ServiceTraffic> = BTreeMap::new();
    if !traffic.is_empty() {
        let names = BpfMaps::from_pins(bpf_dir)?.service_names(traffic.keys().copied())?;
        for (id, counts) in traffic {
            // A frontend removed since its last packet has no name left: its series ends.
            let Some((kind, name)) = names.get(&id) else { continue };
            let kind = FrontendType::from_code(*kind).map_or_else(|| "?".to_string(), |k| k.to_string());
            services.entry((name.clone(), kind)).or_default().add(&counts);
        }
    }
    Ok(DatapathReading { counters, services })
}

async fn scrape(State(state): State<MetricsState>) -> impl IntoResponse {
    let lb = lb_registry(&state).await;
    let mut text = String::new();
    let encoded = encode_registry(&mut text, &state.kube_proxy.registry)
        .and_then(|()| encode_registry(&mut text, &lb))
        .and_then(|()| encode_eof(&mut text));
    match encoded {
        Ok(()) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")],
            text,
        ),
        Err(_) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [(header::CONTENT_TYPE, "text/plain")],
            "encoding the metrics failed\n".to_string(),
        ),
    }
}

pub fn router(state: MetricsState) -> Router {
    Router::new()
        .route("/metrics", get(scrape))
        .route("/proxyMode", get(|| async { PROXY_MODE }))
        .with_state(state)
}

/// Binds now (a taken port is a start-up error) and serves in the background. The returned
/// receiver carries the scrapes' questions about map usage, which the event loop answers.
pub async fn serve(
    address: SocketAddr,
    kube_proxy: Arc<KubeProxyMetrics>,
    bpf_dir: PathBuf,
    capacity: Capacity,
    flow_tables: TableUsage,
) -> anyhow::Result<mpsc::Receiver<UsageRequest>> {
    let listener = tokio::net::TcpListener::bind(address).await.map_err(|e| {
        anyhow::anyhow!("binding the metrics server to {address} (--metrics-bind-address): {e}")
    })?;
    let (usage, requests) = mpsc::channel(4);
    let state = MetricsState { kube_proxy, bpf_dir, capacity, usage, flow_tables };
    tokio::spawn(async move {
        if let Err(error) = axum::serve(listener, router(state)).await {
            tracing::error!(%error, "metrics server stopped");
        }
    });
    Ok(requests)
}

/// The frontends with a Local traffic policy and no endpoint on this node (while the Service
/// has endpoints elsewhere), kept up to date a sync's frontends at a time.
#[derive(Debug, Default)]
pub struct NoLocalEndpoints {
    /// Frontend -> its Service port, and whether its policy is the external one.
    frontends: BTreeMap<FrontendKey, (ServicePortName, bool)>,
}

impl NoLocalEndpoints {
    /// Looks again at `keys` (every frontend on a first sync).
    pub fn update<'a>(&mut self, desired: &DesiredState, keys: impl IntoIterator<Item = &'a FrontendKey>) {
        for key in keys {
            self.frontends.remove(key);
            if let Some(frontend) = desired.frontends.get(key)
                && frontend.policy.local
                && frontend.policy.drop_when_empty
                && frontend.backends.is_empty()
            {
                let external = frontend.frontend_type.is_external();
                self.frontends.insert(*key, (frontend.service.clone(), external));
            }
        }
    }

    /// Distinct Service ports by family and policy (`internal`, `external`), as kube-proxy
    /// counts them.
    pub fn counts(&self) -> BTreeMap<(IpFamily, &'static str), usize> {
        let mut ports: BTreeMap<(IpFamily, &'static str), std::collections::BTreeSet<&ServicePortName>> =
            BTreeMap::new();
        for (key, (service, is_external)) in &self.frontends {
            let policy = if *is_external { "external" } else { "internal" };
            ports.entry((IpFamily::of(&key.address.ip), policy)).or_default().insert(service);
        }
        ports.into_iter().map(|(key, services)| (key, services.len())).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// kube-proxy v1.36's names, types and labels, as a scraper reads them.
    #[test]
    fn kube_proxy_series_are_exposed_as_kube_proxy_exposes_them() {
        let metrics = KubeProxyMetrics::default();
        let now = SystemTime::now();
        let counts = ChangeCounts {
            services: 1,
            endpoints: 2,
            trigger_times: vec![(IpFamily::V6, now - Duration::from_secs(2))],
        };
        metrics.queued(&counts, now);
        metrics.synced(Duration::from_millis(3), true, true, &counts.trigger_times, now);
        metrics.set_no_local_endpoints(&BTreeMap::from([((IpFamily::V4, "external"), 2)]));
        let mut text = String::new();
        encode_registry(&mut text, &metrics.registry).unwrap();
        for line in [
            "# TYPE kubeproxy_sync_proxy_rules_no_local_endpoints_total gauge",
            "kubeproxy_sync_proxy_rules_no_local_endpoints_total{ip_family=\"IPv4\",traffic_policy=\"external\"} 2",
            "kubeproxy_sync_proxy_rules_no_local_endpoints_total{ip_family=\"IPv6\",traffic_policy=\"internal\"} 0",
            "kubeproxy_sync_full_proxy_rules_duration_seconds_count{ip_family=\"IPv6\"} 1",
            "kubeproxy_sync_proxy_rules_duration_seconds_bucket{le=\"0.004\",ip_family=\"IPv4\"} 1",
            "kubeproxy_network_programming_duration_seconds_count{ip_family=\"IPv6\"} 1",
            "kubeproxy_network_programming_duration_seconds_bucket{le=\"0.0\",ip_family=\"IPv6\"} 0",
            "# TYPE kubeproxy_sync_proxy_rules_endpoint_changes counter",
            "kubeproxy_sync_proxy_rules_endpoint_changes_total 2",
        ] {
            assert!(text.lines().any(|l| l == line), "{line:?} missing from:\n{text}");
        }
        assert!(!text.contains("kubeproxy_network_programming_duration_seconds_count{ip_family=\"IPv4\"}"));
        assert!(!text.contains("kubeproxy_sync_partial_proxy_rules_duration_seconds_count"));
    }
}
