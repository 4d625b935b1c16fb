//! The API-server source: kube-rs watchers on Services, EndpointSlices (or v1 Endpoints) and
//! this node's Node, forwarding their events to the controller. The watchers re-list after
//! errors and 410 Gone with backoff; meanwhile the data path keeps serving the last good state.

use std::path::Path;
use std::time::{Duration, Instant};

use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::{Endpoints, Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client, Config};
use tokio::sync::mpsc::UnboundedSender;

use crate::cluster::ClusterEvent;
use crate::convert::{self, EndpointsSource, ProxyConfig};

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
    Client::try_from(config).map_err(|e| anyhow::anyhow!("creating the Kubernetes client: {e}"))
}

/// Forwards one watcher's events; errors are logged (at most every 10 s per kind) while the
/// watcher backs off and re-lists.
async fn forward<K>(
    kind: &'static str,
    stream: impl Stream<Item = Result<Event<K>, watcher::Error>>,
    events: UnboundedSender<ClusterEvent>,
    wrap: fn(Event<K>) -> ClusterEvent,
) {
    let mut stream = std::pin::pin!(stream);
    let mut last_logged: Option<Instant> = None;
    while let Some(item) = stream.next().await {
        match item {
            Ok(event) => {
                if events.send(wrap(event)).is_err() {
                    return; // the controller stopped
                }
            }
            Err(error) => {
                if last_logged.is_none_or(|at| at.elapsed() > Duration::from_secs(10)) {
                    tracing::warn!(kind, %error, "watch failed; retrying with backoff, serving the last good state");
                    last_logged = Some(Instant::now());
                }
            }
        }
    }
}

/// Starts the watchers; their events arrive on `events`. Services and their endpoints are
/// watched with kube-proxy's label selector (`convert::label_selector`).
pub fn spawn_watchers(client: Client, config: &ProxyConfig, events: UnboundedSender<ClusterEvent>) {
    let watch = watcher::Config::default;
    let selector = convert::label_selector(config);
    let labelled = || watch().labels(&selector);
    let services: Api<Service> = Api::all(client.clone());
    tokio::spawn(forward(
        "Service",
        watcher::watcher(services, labelled()).default_backoff(),
        events.clone(),
        ClusterEvent::Service,
    ));
    match config.endpoints_source {
        EndpointsSource::EndpointSlices => {
            let slices: Api<EndpointSlice> = Api::all(client.clone());
            tokio::spawn(forward(
                "EndpointSlice",
                watcher::watcher(slices, labelled()).default_backoff(),
                events.clone(),
                ClusterEvent::EndpointSlice,
            ));
        }
        EndpointsSource::Endpoints => {
            let endpoints: Api<Endpoints> = Api::all(client.clone());
            tokio::spawn(forward(
                "Endpoints",
                watcher::watcher(endpoints, labelled()).default_backoff(),
                events.clone(),
                ClusterEvent::Endpoints,
            ));
        }
    }
    let nodes: Api<Node> = Api::all(client);
    let node_watch = match &config.node_name {
        Some(name) => watch().fields(&format!("metadata.name={name}")),
        None => watch(),
    };
    tokio::spawn(forward(
        "Node",
        watcher::watcher(nodes, node_watch).default_backoff(),
        events,
        ClusterEvent::Node,
    ));
}
