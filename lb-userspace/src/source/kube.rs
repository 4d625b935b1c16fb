//! The API-server source: kube-rs watchers on Services, EndpointSlices (or v1 Endpoints) and
//! this node's Node, forwarding their events to the controller. The watchers re-list after
//! errors and 410 Gone with backoff; meanwhile the data path keeps serving the last good state.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::{Endpoints, Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client, Config};
use tokio::sync::mpsc::UnboundedSender;

use crate::convert::{self, EndpointsSource, ProxyConfig};
use crate::source::cluster::ClusterEvent;

/// A client from `kubeconfig`, or the in-cluster service account when there is none.
pub async fn client(kubeconfig: Option<&Path>) -> anyhow::Result<Client> {
    let config = match kubeconfig {
        Some(path) => {
            let kubeconfig = Kubeconfig::read_from(path)
                .map_err(|e| anyhow::anyhow!("reading kubeconfig {}: {e}", path.display()))?;
            Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
                .await
                .map_err(|e| anyhow::anyhow!("kubeconfig {}: {e}", path.display()))?
        }
        None => Config::incluster().map_err(|e| {
            anyhow::anyhow!(
                "no --kubeconfig and not running in a cluster ({e}); pass --kubeconfig or --manifests"
            )
        })?,
    };
    // The watchers retry on their own schedule (`ReconnectBackoff`) and report failures to
    // /healthz; the client's own retries would hide both.
    let mut config = config;
    config.default_retry = false;
    let server = config.cluster_url.to_string();
    tracing::info!(%server, "reading Services and endpoints from the API server");
    let _ = API_SERVER.set(server);
    Client::try_from(config).map_err(|e| anyhow::anyhow!("creating the Kubernetes client: {e}"))
}

/// Whether the watches are working: since when each failing kind has failed.
#[derive(Debug, Default)]
pub struct WatchStatus {
    failing: Mutex<BTreeMap<&'static str, SystemTime>>,
}

impl WatchStatus {
    fn failed(&self, kind: &'static str) {
        self.failing.lock().expect("watch status lock").entry(kind).or_insert_with(SystemTime::now);
    }

    fn working(&self, kind: &'static str) {
        self.failing.lock().expect("watch status lock").remove(kind);
    }

    /// The API server answers again: the watches resume on their own (a resumed watch with
    /// nothing new to say yields no event, so this is how their recovery is seen).
    fn reachable(&self) {
        let mut failing = self.failing.lock().expect("watch status lock");
        if let Some(since) = failing.values().min() {
            let down = since.elapsed().unwrap_or_default();
            tracing::info!(down_ms = down.as_millis() as u64, "the API server answers again");
            failing.clear();
        }
    }

    /// Since when some watch has been failing (the data path then serves the state it last
    /// got); `None` while all work.
    pub fn stale_since(&self) -> Option<SystemTime> {
        self.failing.lock().expect("watch status lock").values().min().copied()
    }
}

/// The watchers' retry delays: from 200 ms, doubling, at most 2 s, with a fifth of jitter. An
/// API server that comes back is seen within about 2 s (kube-rs' default waits up to 30 s),
/// and one that stays down gets a request every 2 s or so from each of lb's few watches.
#[derive(Debug, Clone)]
pub struct ReconnectBackoff {
    next: Duration,
}

impl ReconnectBackoff {
    const FIRST: Duration = Duration::from_millis(200);
    const MAX: Duration = Duration::from_secs(2);
}

impl Default for ReconnectBackoff {
    fn default() -> Self {
        Self { next: Self::FIRST }
    }
}

impl Iterator for ReconnectBackoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        let delay = self.next;
        self.next = (self.next * 2).min(Self::MAX);
        // Jitter from the clock's low bits: enough to keep the watches of many nodes apart.
        let nanos =
            SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().subsec_nanos();
        let fraction = f64::from(nanos % 1000) / 1000.0; // 0..1
        Some(delay.mul_f64(0.9 + 0.2 * fraction))
    }
}

impl kube::runtime::utils::Backoff for ReconnectBackoff {
    fn reset(&mut self) {
        self.next = Self::FIRST;
    }
}

/// The API server's address, for the messages of failing watches.
static API_SERVER: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// Forwards one watcher's events; errors are logged (at most every 10 s per kind) while the
/// watcher backs off and re-lists.
async fn forward<K>(
    kind: &'static str,
    stream: impl Stream<Item = Result<Event<K>, watcher::Error>>,
    events: UnboundedSender<ClusterEvent>,
    wrap: fn(Event<K>) -> ClusterEvent,
    status: Arc<WatchStatus>,
) {
    let mut stream = std::pin::pin!(stream);
    let mut last_logged: Option<Instant> = None;
    while let Some(item) = stream.next().await {
        match item {
            Ok(event) => {
                status.working(kind);
                if events.send(wrap(event)).is_err() {
                    return; // the controller stopped
                }
            }
            Err(error) => {
                status.failed(kind);
                if last_logged.is_none_or(|at| at.elapsed() > Duration::from_secs(10)) {
                    let server = API_SERVER.get().map_or("?", String::as_str);
                    tracing::warn!(
                        kind,
                        %error,
                        server,
                        "cannot watch the API server; retrying, serving the last good state"
                    );
                    last_logged = Some(Instant::now());
                }
            }
        }
    }
}

/// Starts the watchers; their events arrive on `events`. Services and their endpoints are
/// watched with kube-proxy's label selector (`convert::label_selector`). Returns whether they
/// work, for `/healthz`.
pub fn spawn_watchers(
    client: Client,
    config: &ProxyConfig,
    events: UnboundedSender<ClusterEvent>,
) -> Arc<WatchStatus> {
    let status = Arc::new(WatchStatus::default());
    let watch = watcher::Config::default;
    let selector = convert::label_selector(config);
    let labelled = || watch().labels(&selector);
    let services: Api<Service> = Api::all(client.clone());
    tokio::spawn(forward(
        "Service",
        watcher::watcher(services, labelled()).backoff(ReconnectBackoff::default()),
        events.clone(),
        ClusterEvent::Service,
        status.clone(),
    ));
    match config.endpoints_source {
        EndpointsSource::EndpointSlices => {
            let slices: Api<EndpointSlice> = Api::all(client.clone());
            tokio::spawn(forward(
                "EndpointSlice",
                watcher::watcher(slices, labelled()).backoff(ReconnectBackoff::default()),
                events.clone(),
                ClusterEvent::EndpointSlice,
                status.clone(),
            ));
        }
        EndpointsSource::Endpoints => {
            let endpoints: Api<Endpoints> = Api::all(client.clone());
            tokio::spawn(forward(
                "Endpoints",
                watcher::watcher(endpoints, labelled()).backoff(ReconnectBackoff::default()),
                events.clone(),
                ClusterEvent::Endpoints,
                status.clone(),
            ));
        }
    }
    // While a watch fails, ask the API server for its version every 2 s: the first answer
    // means it is back.
    let (probe, probed) = (client.clone(), status.clone());
    tokio::spawn(async move {
        let mut every = tokio::time::interval(ReconnectBackoff::MAX);
        loop {
            every.tick().await;
            if probed.stale_since().is_some() && probe.apiserver_version().await.is_ok() {
                probed.reachable();
            }
        }
    });
    let nodes: Api<Node> = Api::all(client);
    let node_watch = match &config.node_name {
        Some(name) => watch().fields(&format!("metadata.name={name}")),
        None => watch(),
    };
    tokio::spawn(forward(
        "Node",
        watcher::watcher(nodes, node_watch).backoff(ReconnectBackoff::default()),
        events,
        ClusterEvent::Node,
        status.clone(),
    ));
    status
}
