//! lb's API-server source (the real kube-rs client, through a kubeconfig) against the fake API
//! server: adds, edits, deletes, re-list after 410 Gone, dropped watches, multi-slice Services,
//! duplicate endpoints, label filters, v1 Endpoints and the Node's zone.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lb_userspace::convert::{EndpointsSource, ProxyConfig};
use lb_userspace::model::DesiredState;
use lb_userspace::source::cluster::ClusterStore;
use lb_userspace::source::kube as kube_source;
use lb_userspace::state::pipeline::{OnInvalid, Pipeline};

/// What the watchers feed, as `lb run` holds it: the store of names and the pipeline.
struct Fed {
    store: ClusterStore,
    pipeline: Pipeline,
}
use tests::apiserver::{FakeApiServer, Kind};

struct Watching {
    server: FakeApiServer,
    store: Arc<Mutex<Fed>>,
    config: ProxyConfig,
    _runtime: tokio::runtime::Runtime,
    _dir: std::path::PathBuf,
}

impl Watching {
    fn start(config: ProxyConfig) -> Self {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let server = FakeApiServer::start(listener).unwrap();
        let dir = std::env::temp_dir().join(tests::unique("kube"));
        std::fs::create_dir_all(&dir).unwrap();
        let kubeconfig = server.write_kubeconfig(&dir).unwrap();
        let runtime =
            tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let store = Arc::new(Mutex::new(Fed {
            store: ClusterStore::default(),
            pipeline: Pipeline::new(config.clone(), OnInvalid::Drop),
        }));
        let (feed, watch_config) = (store.clone(), config.clone());
        runtime.spawn(async move {
            let client = kube_source::client(Some(&kubeconfig)).await.expect("client from kubeconfig");
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
            kube_source::spawn_watchers(client, &watch_config, tx);
            while let Some(event) = rx.recv().await {
                let mut fed = feed.lock().unwrap();
                for change in fed.store.apply(event) {
                    let _ = fed.pipeline.apply(change);
                }
            }
        });
        Self { server, store, config, _runtime: runtime, _dir: dir }
    }

    fn desired(&self) -> Option<DesiredState> {
        let mut fed = self.store.lock().unwrap();
        if !fed.store.ready(self.config.endpoints_source) {
            return None;
        }
        fed.pipeline.take_changes();
        Some(fed.pipeline.table().desired().clone())
    }

    /// Waits until the desired state satisfies `ready`; panics with what it saw otherwise.
    fn wait_for(&self, what: &str, ready: impl Fn(&DesiredState) -> bool) -> DesiredState {
        let start = Instant::now();
        let mut last = None;
        while start.elapsed() < Duration::from_secs(15) {
            if let Some(state) = self.desired() {
                if ready(&state) {
                    return state;
                }
                last = Some(state);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("{what}: not reached; last desired state: {last:#?}");
    }
}

impl Drop for Watching {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self._dir);
    }
}

/// Backends of the frontend at `ip:80/TCP`, as strings; `None` if there is no such frontend.
fn backends(state: &DesiredState, ip: &str) -> Option<Vec<String>> {
    state
        .frontends
        .values()
        .find(|f| f.address.ip.to_string() == ip && f.address.port == 80)
        .map(|f| f.backends.iter().map(|b| b.to_string()).collect())
}

fn service(name: &str, ip: &str, labels: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, labels: {{{labels}}}}}\nspec: {{clusterIP: {ip}, ports: [{{name: http, port: 80}}]}}\n"
    )
}

fn slice(name: &str, service: &str, ips: &[&str]) -> String {
    let endpoints: String = ips.iter().map(|ip| format!("  - addresses: [\"{ip}\"]\n")).collect();
    format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}\n  labels: {{kubernetes.io/service-name: {service}}}\naddressType: IPv4\nports: [{{name: http, port: 8080}}]\nendpoints:\n{endpoints}"
    )
}

#[test]
fn adds_edits_and_deletes_reach_the_desired_state() {
    let w = Watching::start(ProxyConfig::default());
    w.wait_for("initial empty list", |s| s.frontends.is_empty());
    w.server.apply_yaml(&service("web", "10.96.0.10", ""));
    w.server.apply_yaml(&slice("web-1", "web", &["10.244.0.1", "10.244.0.2"]));
    w.wait_for("added", |s| backends(s, "10.96.0.10").is_some_and(|b| b.len() == 2));
    w.server.apply_yaml(&slice("web-1", "web", &["10.244.0.2"]));
    w.wait_for("edited", |s| backends(s, "10.96.0.10") == Some(vec!["10.244.0.2:8080/TCP".into()]));
    w.server.delete(Kind::EndpointSlice, "default", "web-1");
    w.wait_for("slice deleted", |s| backends(s, "10.96.0.10") == Some(vec![]));
    w.server.delete(Kind::Service, "default", "web");
    w.wait_for("service deleted", |s| s.frontends.is_empty());
}

#[test]
fn slices_of_a_service_merge_and_duplicates_count_once() {
    let w = Watching::start(ProxyConfig::default());
    w.server.apply_yaml(&service("web", "10.96.0.10", ""));
    w.server.apply_yaml(&slice("web-a", "web", &["10.244.0.1", "10.244.0.2"]));
    w.server.apply_yaml(&slice("web-b", "web", &["10.244.0.2", "10.244.0.3"]));
    let state = w.wait_for("merged", |s| backends(s, "10.96.0.10").is_some_and(|b| b.len() == 3));
    assert_eq!(
        backends(&state, "10.96.0.10").unwrap(),
        ["10.244.0.1:8080/TCP", "10.244.0.2:8080/TCP", "10.244.0.3:8080/TCP"]
    );
}

#[test]
fn label_filters_skip_other_proxies_and_headless() {
    let w = Watching::start(ProxyConfig { service_proxy_name: Some("lb".into()), ..Default::default() });
    w.server.apply_yaml(&service("plain", "10.96.0.1", ""));
    w.server.apply_yaml(&service("ours", "10.96.0.2", "service.kubernetes.io/service-proxy-name: lb"));
    w.server.apply_yaml(&service("theirs", "10.96.0.3", "service.kubernetes.io/service-proxy-name: other"));
    w.server.apply_yaml(&service("headless-marked", "10.96.0.4", "service.kubernetes.io/headless: \"\""));
    let state = w.wait_for("two served", |s| s.frontends.len() == 2);
    assert!(backends(&state, "10.96.0.1").is_some() && backends(&state, "10.96.0.2").is_some());
}

#[test]
fn a_deletion_lost_to_compaction_is_found_by_the_relist_after_410() {
    let w = Watching::start(ProxyConfig::default());
    w.server.apply_yaml(&service("keep", "10.96.0.1", ""));
    w.server.apply_yaml(&service("gone", "10.96.0.2", ""));
    w.wait_for("both", |s| s.frontends.len() == 2);
    let (lists_before, _) = w.server.requests(Kind::Service);
    w.server.delete_unseen(Kind::Service, "default", "gone");
    let state = w.wait_for("relisted without 'gone'", |s| s.frontends.len() == 1);
    assert!(backends(&state, "10.96.0.1").is_some());
    assert!(w.server.requests(Kind::Service).0 > lists_before, "the watcher re-listed");
}

#[test]
fn dropped_watches_resume_without_losing_events() {
    let w = Watching::start(ProxyConfig::default());
    w.server.apply_yaml(&service("web", "10.96.0.10", ""));
    w.wait_for("added", |s| s.frontends.len() == 1);
    let (lists_before, watches_before) = w.server.requests(Kind::Service);
    w.server.drop_watches();
    w.server.apply_yaml(&service("second", "10.96.0.11", ""));
    w.wait_for("change after the drop", |s| s.frontends.len() == 2);
    let (lists, watches) = w.server.requests(Kind::Service);
    assert!(watches > watches_before, "the watcher re-watched");
    assert_eq!(lists, lists_before, "resuming from its resourceVersion needed no re-list");
}

#[test]
fn v1_endpoints_are_read_with_endpoints_api() {
    let w =
        Watching::start(ProxyConfig { endpoints_source: EndpointsSource::Endpoints, ..Default::default() });
    w.server.apply_yaml(&service("web", "10.96.0.10", ""));
    w.server.apply_yaml(&slice("web-1", "web", &["10.244.9.9"])); // not read in this mode
    w.server.apply_yaml(
        "apiVersion: v1\nkind: Endpoints\nmetadata: {name: web}\nsubsets:\n- addresses: [{ip: 10.244.0.1}]\n  notReadyAddresses: [{ip: 10.244.0.2}]\n  ports: [{name: http, port: 8080}]\n",
    );
    let state = w.wait_for("from Endpoints", |s| backends(s, "10.96.0.10").is_some_and(|b| !b.is_empty()));
    assert_eq!(backends(&state, "10.96.0.10").unwrap(), ["10.244.0.1:8080/TCP"]);
}

#[test]
fn the_nodes_zone_selects_hinted_endpoints() {
    let w = Watching::start(ProxyConfig { node_name: Some("node-a".into()), ..Default::default() });
    for (node, zone) in [("node-a", "zone-a"), ("node-b", "zone-b")] {
        w.server.apply_yaml(&format!(
            "apiVersion: v1\nkind: Node\nmetadata: {{name: {node}, labels: {{topology.kubernetes.io/zone: {zone}}}}}\n"
        ));
    }
    w.server.apply_yaml(
        "apiVersion: v1\nkind: Service\nmetadata: {name: web, annotations: {service.kubernetes.io/topology-mode: Auto}}\nspec: {clusterIP: 10.96.0.10, ports: [{name: http, port: 80}]}\n",
    );
    w.server.apply_yaml(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: web-1, labels: {kubernetes.io/service-name: web}}\naddressType: IPv4\nports: [{name: http, port: 8080}]\nendpoints:\n- {addresses: [10.244.0.1], hints: {forZones: [{name: zone-a}]}}\n- {addresses: [10.244.0.2], hints: {forZones: [{name: zone-b}]}}\n",
    );
    let state = w.wait_for("zone-a only", |s| backends(s, "10.96.0.10").is_some_and(|b| b.len() == 1));
    assert_eq!(backends(&state, "10.96.0.10").unwrap(), ["10.244.0.1:8080/TCP"]);
    assert_eq!(w.store.lock().unwrap().store.nodes.len(), 1, "only this node is watched");
}

/// An EndpointSlice with extra labels (the EndpointSlice controller copies a Service's labels
/// onto its slices).
fn labelled_slice(name: &str, service: &str, ips: &[&str], labels: &str) -> String {
    slice(name, service, ips).replacen(
        &format!("labels: {{kubernetes.io/service-name: {service}}}"),
        &format!("labels: {{kubernetes.io/service-name: {service}{labels}}}"),
        1,
    )
}

/// How many Services and EndpointSlices lb's store holds: with kube-proxy's label selector on
/// the watches, what the API server filters out never reaches it.
fn stored(w: &Watching) -> (usize, usize) {
    let fed = w.store.lock().unwrap();
    (fed.store.services.len(), fed.store.endpoint_slices.len())
}

/// Kubernetes' e2e "should implement service.kubernetes.io/headless" and the service-proxy-name
/// filter: a working Service (and its slice) that gains one of kube-proxy's labels stops being
/// served at once, and is served again when the label goes.
#[test]
fn a_service_that_gains_kube_proxys_labels_leaves_and_comes_back() {
    let w = Watching::start(ProxyConfig::default());
    let served = |w: &Watching, what: &str| {
        w.wait_for(what, |s| backends(s, "10.96.0.10").is_some_and(|b| b.len() == 1));
        assert_eq!(stored(w), (1, 1));
    };
    w.server.apply_yaml(&service("web", "10.96.0.10", ""));
    w.server.apply_yaml(&labelled_slice("web-1", "web", &["10.244.0.1"], ""));
    served(&w, "served");
    for label in ["service.kubernetes.io/headless: \"\"", "service.kubernetes.io/service-proxy-name: other"] {
        w.server.apply_yaml(&service("web", "10.96.0.10", label));
        w.server.apply_yaml(&labelled_slice("web-1", "web", &["10.244.0.1"], &format!(", {label}")));
        w.wait_for(label, |s| backends(s, "10.96.0.10").is_none());
        let start = Instant::now();
        while stored(&w) != (0, 0) && start.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(stored(&w), (0, 0), "{label}: the API server's selector keeps the objects away");
        w.server.apply_yaml(&service("web", "10.96.0.10", ""));
        w.server.apply_yaml(&labelled_slice("web-1", "web", &["10.244.0.1"], ""));
        served(&w, "label removed");
    }
}

/// With `--service-proxy-name lb`, Services (and slices) labelled for lb are served too; one
/// relabelled for another proxy leaves, and comes back when labelled for lb again.
#[test]
fn a_service_proxy_name_of_lbs_own_is_served() {
    let w = Watching::start(ProxyConfig { service_proxy_name: Some("lb".into()), ..Default::default() });
    let ours = "service.kubernetes.io/service-proxy-name: lb";
    let theirs = "service.kubernetes.io/service-proxy-name: other";
    for (label, served) in
        [(ours, true), (theirs, false), (ours, true), ("service.kubernetes.io/headless: \"\"", false)]
    {
        w.server.apply_yaml(&service("web", "10.96.0.10", label));
        w.server.apply_yaml(&labelled_slice("web-1", "web", &["10.244.0.1"], &format!(", {label}")));
        w.wait_for(label, |s| backends(s, "10.96.0.10").is_some_and(|b| b.len() == 1) == served);
    }
}
