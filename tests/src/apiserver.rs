//! A small Kubernetes API server for tests: list and watch of Services, EndpointSlices,
//! Endpoints and Nodes over the real wire protocol (JSON lists with resourceVersions, chunked
//! watch streams of ADDED/MODIFIED/DELETED, BOOKMARK events, `410 Gone` for a compacted
//! resourceVersion, connections the server drops), so the real kube-rs client can be pointed
//! at it through a kubeconfig. Events (`events.k8s.io/v1`) posted or patched are kept for the
//! test to read.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Query, State};
use axum::http::{Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use futures::channel::mpsc;
use serde_json::{Value, json};
use tokio::sync::broadcast;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    Service,
    EndpointSlice,
    Endpoints,
    Node,
}

impl Kind {
    fn from_path(path: &str) -> Option<Self> {
        match path {
            "/api/v1/services" => Some(Kind::Service),
            "/apis/discovery.k8s.io/v1/endpointslices" => Some(Kind::EndpointSlice),
            "/api/v1/endpoints" => Some(Kind::Endpoints),
            "/api/v1/nodes" => Some(Kind::Node),
            _ => None,
        }
    }

    fn api_version(self) -> &'static str {
        match self {
            Kind::EndpointSlice => "discovery.k8s.io/v1",
            _ => "v1",
        }
    }

    fn name(self) -> &'static str {
        match self {
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::Endpoints => "Endpoints",
            Kind::Node => "Node",
        }
    }

    /// The kind of a manifest object (`apiVersion` + `kind`).
    pub fn of(object: &Value) -> Option<Self> {
        match (object["apiVersion"].as_str()?, object["kind"].as_str()?) {
            ("v1", "Service") => Some(Kind::Service),
            ("discovery.k8s.io/v1", "EndpointSlice") => Some(Kind::EndpointSlice),
            ("v1", "Endpoints") => Some(Kind::Endpoints),
            ("v1", "Node") => Some(Kind::Node),
            _ => None,
        }
    }
}

type Key = (Kind, String, String);

#[derive(Clone, Debug)]
struct WatchEvent {
    resource_version: u64,
    kind: Kind,
    type_: &'static str,
    object: Value,
    /// The object before a MODIFIED event: a watch with a label selector sees an object that
    /// stops (or starts) matching as DELETED (or ADDED), as the real API server sends it.
    previous: Option<Value>,
}

#[derive(Default)]
struct Store {
    resource_version: u64,
    /// Watches from a resourceVersion below this get 410 Gone.
    compacted: u64,
    objects: BTreeMap<Key, Value>,
    log: Vec<WatchEvent>,
    lists: BTreeMap<Kind, usize>,
    watches: BTreeMap<Kind, usize>,
    /// Events as created, then as last patched, by namespace and name.
    recorded_events: BTreeMap<(String, String), Value>,
}

#[derive(Clone, Debug)]
enum Broadcast {
    Event(WatchEvent),
    DropWatches,
}

#[derive(Clone)]
struct Shared {
    store: Arc<Mutex<Store>>,
    events: broadcast::Sender<Broadcast>,
    /// While set, every request fails with 503, as an API server that crashed behind a load
    /// balancer answers.
    down: Arc<std::sync::atomic::AtomicBool>,
}

/// A running fake API server; stops when dropped.
pub struct FakeApiServer {
    pub address: SocketAddr,
    shared: Shared,
    _runtime: Option<tokio::runtime::Runtime>,
}

fn key_of(kind: Kind, object: &Value) -> Key {
    let metadata = &object["metadata"];
    let namespace = match kind {
        Kind::Node => String::new(),
        _ => metadata["namespace"].as_str().unwrap_or("default").to_string(),
    };
    (kind, namespace, metadata["name"].as_str().unwrap_or_default().to_string())
}

impl FakeApiServer {
    /// Serves on `listener` (which may belong to another network namespace) from a runtime of
    /// its own.
    pub fn start(listener: std::net::TcpListener) -> anyhow::Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
        let mut server = runtime.block_on(async { Self::serve(listener) })?;
        server._runtime = Some(runtime);
        Ok(server)
    }

    /// Serves on `listener` from the current tokio runtime.
    pub fn serve(listener: std::net::TcpListener) -> anyhow::Result<Self> {
        listener.set_nonblocking(true)?;
        let address = listener.local_addr()?;
        let listener = tokio::net::TcpListener::from_std(listener)?;
        let (events, _) = broadcast::channel(4096);
        let shared = Shared {
            store: Arc::new(Mutex::new(Store::default())),
            events,
            down: Arc::new(std::sync::atomic::AtomicBool::new(false)),
        };
        let app = Router::new().fallback(handle).with_state(shared.clone());
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Self { address, shared, _runtime: None })
    }

    /// Writes a kubeconfig pointing at this server into `dir`.
    pub fn write_kubeconfig(&self, dir: &Path) -> anyhow::Result<PathBuf> {
        let path = dir.join("kubeconfig");
        std::fs::write(
            &path,
            format!(
                "apiVersion: v1
kind: Config
clusters: [{{name: fake, cluster: {{server: \"http://{}\"}}}}]
users: [{{name: fake, user: {{token: test-token}}}}]
contexts: [{{name: fake, context: {{cluster: fake, user: fake}}}}]
current-context: fake
",
                self.address
            ),
        )?;
        Ok(path)
    }

    fn record(
        &self,
        store: &mut Store,
        kind: Kind,
        type_: &'static str,
        object: Value,
        previous: Option<Value>,
    ) {
        let event = WatchEvent { resource_version: store.resource_version, kind, type_, object, previous };
        store.log.push(event.clone());
        let _ = self.shared.events.send(Broadcast::Event(event));
    }

    /// Creates or replaces an object (given as a manifest) and sends ADDED or MODIFIED.
    pub fn apply(&self, mut object: Value) {
        let kind = Kind::of(&object).expect("a Service, EndpointSlice, Endpoints or Node");
        let mut store = self.shared.store.lock().unwrap();
        store.resource_version += 1;
        let key = key_of(kind, &object);
        object["metadata"]["resourceVersion"] = json!(store.resource_version.to_string());
        if kind != Kind::Node && object["metadata"]["namespace"].is_null() {
            object["metadata"]["namespace"] = json!("default");
        }
        // As the real server: a UID when the object is created, kept by its updates.
        let uid = match store.objects.get(&key) {
            Some(existing) => existing["metadata"]["uid"].clone(),
            None => json!(format!("00000000-0000-4000-8000-{:012x}", store.resource_version)),
        };
        object["metadata"]["uid"] = uid;
        let previous = store.objects.insert(key, object.clone());
        let type_ = if previous.is_some() { "MODIFIED" } else { "ADDED" };
        self.record(&mut store, kind, type_, object, previous);
    }

    /// An object as the server holds it now.
    pub fn object(&self, kind: Kind, namespace: &str, name: &str) -> Option<Value> {
        let namespace = if kind == Kind::Node { String::new() } else { namespace.to_string() };
        self.shared.store.lock().unwrap().objects.get(&(kind, namespace, name.to_string())).cloned()
    }

    /// Applies every document of a YAML manifest.
    pub fn apply_yaml(&self, yaml: &str) {
        for document in serde_yaml_ng::Deserializer::from_str(yaml) {
            let value: Value = serde::Deserialize::deserialize(document).expect("YAML");
            if !value.is_null() {
                self.apply(value);
            }
        }
    }

    /// Deletes an object and sends DELETED.
    pub fn delete(&self, kind: Kind, namespace: &str, name: &str) {
        let mut store = self.shared.store.lock().unwrap();
        let key =
            (kind, if kind == Kind::Node { String::new() } else { namespace.to_string() }, name.to_string());
        if let Some(mut object) = store.objects.remove(&key) {
            store.resource_version += 1;
            object["metadata"]["resourceVersion"] = json!(store.resource_version.to_string());
            self.record(&mut store, kind, "DELETED", object, None);
        }
    }

    /// Deletes an object as if its DELETED event had been compacted away before any watcher
    /// saw it, then drops every watch: watchers come back with a too old resourceVersion, get
    /// 410 Gone, and must re-list to notice.
    pub fn delete_unseen(&self, kind: Kind, namespace: &str, name: &str) {
        {
            let mut store = self.shared.store.lock().unwrap();
            let key = (kind, namespace.to_string(), name.to_string());
            store.objects.remove(&key);
            store.resource_version += 1;
            store.compacted = store.resource_version + 1;
            store.log.clear();
        }
        self.drop_watches();
    }

    /// Takes the server down (every request fails with 503, open watches end) or brings it
    /// back.
    pub fn set_down(&self, down: bool) {
        self.shared.down.store(down, std::sync::atomic::Ordering::SeqCst);
        if down {
            self.drop_watches();
        }
    }

    /// Closes every open watch connection, as an API server restart or a load balancer would.
    pub fn drop_watches(&self) {
        let _ = self.shared.events.send(Broadcast::DropWatches);
    }

    /// How many list and watch requests each kind has had.
    /// The events lb recorded, as last written.
    pub fn recorded_events(&self) -> Vec<Value> {
        self.shared.store.lock().unwrap().recorded_events.values().cloned().collect()
    }

    pub fn requests(&self, kind: Kind) -> (usize, usize) {
        let store = self.shared.store.lock().unwrap();
        (store.lists.get(&kind).copied().unwrap_or(0), store.watches.get(&kind).copied().unwrap_or(0))
    }
}

fn matches_field_selector(object: &Value, selector: Option<&String>) -> bool {
    let Some(selector) = selector.filter(|s| !s.is_empty()) else { return true };
    selector.split(',').all(|term| match term.split_once('=') {
        Some(("metadata.name", name)) => {
            object["metadata"]["name"].as_str() == Some(name.trim_start_matches('='))
        }
        Some(("metadata.namespace", ns)) => {
            object["metadata"]["namespace"].as_str() == Some(ns.trim_start_matches('='))
        }
        _ => true,
    })
}

/// A label selector's requirements, as the API server takes them: `key`, `!key`, `key=value`,
/// `key==value` and `key!=value`, comma separated (set-based `in`/`notin` are not served).
fn matches_label_selector(object: &Value, selector: Option<&String>) -> bool {
    let Some(selector) = selector.filter(|s| !s.is_empty()) else { return true };
    let labels = &object["metadata"]["labels"];
    selector.split(',').map(str::trim).all(|requirement| {
        if let Some(key) = requirement.strip_prefix('!') {
            labels[key].is_null()
        } else if let Some((key, value)) = requirement.split_once("!=") {
            labels[key].as_str() != Some(value)
        } else if let Some((key, value)) = requirement.split_once('=') {
            labels[key].as_str() == Some(value.trim_start_matches('='))
        } else {
            !labels[requirement].is_null()
        }
    })
}

fn with_type(kind: Kind, mut object: Value) -> Value {
    object["apiVersion"] = json!(kind.api_version());
    object["kind"] = json!(kind.name());
    object
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code})
}

fn line(value: &Value) -> Result<Bytes, Infallible> {
    let mut text = value.to_string();
    text.push('\n');
    Ok(Bytes::from(text))
}

/// `POST /apis/events.k8s.io/v1/namespaces/NS/events` and `PATCH .../events/NAME` (a merge
/// patch of an event series): kept, and answered with the event.
fn record_event(shared: &Shared, method: &Method, path: &str, body: &Bytes) -> Option<Response> {
    let rest = path.strip_prefix("/apis/events.k8s.io/v1/namespaces/")?;
    let (namespace, rest) = rest.split_once('/')?;
    let rest = rest.strip_prefix("events")?;
    let Ok(event) = serde_json::from_slice::<Value>(body) else {
        return Some(
            (StatusCode::BAD_REQUEST, axum::Json(status(400, "BadRequest", "not JSON"))).into_response(),
        );
    };
    let mut store = shared.store.lock().unwrap();
    let name = match (method, rest.strip_prefix('/')) {
        (&Method::POST, None) => event["metadata"]["name"].as_str().unwrap_or_default().to_string(),
        (&Method::PATCH, Some(name)) => name.to_string(),
        _ => return None,
    };
    let key = (namespace.to_string(), name);
    let merged = match (store.recorded_events.remove(&key), method) {
        (Some(mut old), &Method::PATCH) => {
            if let (Some(old), Some(new)) = (old.as_object_mut(), event.as_object()) {
                old.extend(new.clone());
            }
            old
        }
        _ => event,
    };
    store.recorded_events.insert(key, merged.clone());
    Some((StatusCode::CREATED, axum::Json(merged)).into_response())
}

async fn handle(
    State(shared): State<Shared>,
    method: Method,
    uri: Uri,
    Query(query): Query<BTreeMap<String, String>>,
    body: Bytes,
) -> Response {
    if shared.down.load(std::sync::atomic::Ordering::SeqCst) {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(status(503, "ServiceUnavailable", "the API server is down")),
        )
            .into_response();
    }
    if uri.path() == "/version" {
        return axum::Json(json!({
            "major": "1", "minor": "36", "gitVersion": "v1.36.0-fake", "gitCommit": "fake",
            "gitTreeState": "clean", "buildDate": "2026-01-01T00:00:00Z", "goVersion": "go1.25",
            "compiler": "gc", "platform": "linux/amd64"
        }))
        .into_response();
    }
    if let Some(response) = record_event(&shared, &method, uri.path(), &body) {
        return response;
    }
    let Some(kind) = Kind::from_path(uri.path()) else {
        return (
            StatusCode::NOT_FOUND,
            axum::Json(status(404, "NotFound", "not served by the fake API server")),
        )
            .into_response();
    };
    let field_selector = query.get("fieldSelector");
    let label_selector = query.get("labelSelector");
    let is_watch = matches!(query.get("watch").map(String::as_str), Some("true" | "1"));
    if !is_watch {
        let mut store = shared.store.lock().unwrap();
        *store.lists.entry(kind).or_default() += 1;
        let items: Vec<Value> = store
            .objects
            .iter()
            .filter(|((k, _, _), o)| {
                *k == kind
                    && matches_field_selector(o, field_selector)
                    && matches_label_selector(o, label_selector)
            })
            .map(|(_, o)| with_type(kind, o.clone()))
            .collect();
        let list = json!({
            "apiVersion": kind.api_version(),
            "kind": format!("{}List", kind.name()),
            "metadata": {"resourceVersion": store.resource_version.to_string()},
            "items": items,
        });
        return axum::Json(list).into_response();
    }

    let from: u64 = query.get("resourceVersion").and_then(|rv| rv.parse().ok()).unwrap_or(0);
    let bookmarks = matches!(query.get("allowWatchBookmarks").map(String::as_str), Some("true" | "1"));
    let timeout = query.get("timeoutSeconds").and_then(|t| t.parse().ok()).map(Duration::from_secs);
    let (tx, rx) = mpsc::unbounded::<Result<Bytes, Infallible>>();
    let mut subscription = shared.events.subscribe();
    let (backlog, current) = {
        let mut store = shared.store.lock().unwrap();
        *store.watches.entry(kind).or_default() += 1;
        if from != 0 && from < store.compacted {
            let gone = json!({"type": "ERROR", "object": status(410, "Expired", "too old resource version")});
            let _ = tx.unbounded_send(line(&gone));
            return Response::new(Body::from_stream(rx));
        }
        let backlog: Vec<WatchEvent> =
            store.log.iter().filter(|e| e.kind == kind && e.resource_version > from).cloned().collect();
        (backlog, store.resource_version)
    };
    let (fields, labels) = (field_selector.cloned(), label_selector.cloned());
    tokio::spawn(async move {
        let matches = |object: &Value| {
            matches_field_selector(object, fields.as_ref()) && matches_label_selector(object, labels.as_ref())
        };
        let send = |event: &WatchEvent| {
            let now = matches(&event.object);
            let before = event.previous.as_ref().is_some_and(&matches);
            let type_ = match (event.type_, before, now) {
                ("MODIFIED", true, true) => "MODIFIED",
                ("MODIFIED", false, true) => "ADDED",
                ("MODIFIED", true, false) => "DELETED",
                (type_, _, true) if type_ != "MODIFIED" => type_,
                _ => return true,
            };
            let body = json!({"type": type_, "object": with_type(event.kind, event.object.clone())});
            tx.unbounded_send(line(&body)).is_ok()
        };
        let mut last_sent = from.max(current);
        for event in &backlog {
            if !send(event) {
                return;
            }
        }
        let deadline = tokio::time::Instant::now() + timeout.unwrap_or(Duration::from_secs(300));
        let mut bookmark_timer = tokio::time::interval(Duration::from_millis(200));
        loop {
            tokio::select! {
                received = subscription.recv() => match received {
                    Ok(Broadcast::Event(event)) if event.kind == kind && event.resource_version > from => {
                        last_sent = last_sent.max(event.resource_version);
                        if !send(&event) { return; }
                    }
                    Ok(Broadcast::Event(_)) => {}
                    Ok(Broadcast::DropWatches) | Err(_) => return, // ends the response: a dropped connection
                },
                _ = bookmark_timer.tick(), if bookmarks => {
                    let bookmark = json!({"type": "BOOKMARK", "object": {
                        "apiVersion": kind.api_version(), "kind": kind.name(),
                        "metadata": {"resourceVersion": last_sent.to_string()}}});
                    if tx.unbounded_send(line(&bookmark)).is_err() { return; }
                }
                _ = tokio::time::sleep_until(deadline) => return,
            }
        }
    });
    Response::new(Body::from_stream(rx))
}
