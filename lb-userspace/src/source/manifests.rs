//! The cluster-less source: Kubernetes objects read from a directory of YAML (multi-document
//! files, `.yaml`/`.yml`/`.json`), re-read file by file as the watcher reports them changed.
//!
//! Each object is remembered by a hash of its text, not kept: a reload hands on only the objects
//! whose text changed. When two files define the same object, the first file by name wins.
//! Like an API server that refuses a bad update, a file or object that fails to parse is
//! reported (naming the file and the object) and its last good version stays in force.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::{Endpoints, Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde::Deserialize;

use crate::source::{Object, ObjectChange, ObjectKey, namespace_of};

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("reading manifest directory {dir}: {source}")]
    ReadDir {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{file}: reading: {source}")]
    ReadFile {
        file: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{file}: document {document}: invalid YAML: {source}")]
    Yaml {
        file: PathBuf,
        document: usize,
        #[source]
        source: serde_yaml_ng::Error,
    },
    #[error("{file}: {kind} {object}: {message}")]
    Object { file: PathBuf, kind: String, object: String, message: String },
}

/// One object a file defines: its identity and the hash of its text.
type Defined = (ObjectKey, u64);

/// What each file defines, and which version of each object is in force.
#[derive(Debug, Default, Clone)]
pub struct ManifestStore {
    files: BTreeMap<PathBuf, Vec<Defined>>,
    /// The files that define each object.
    defined_in: HashMap<ObjectKey, BTreeSet<PathBuf>>,
    /// The version in force of each object: its file and hash.
    in_force: HashMap<ObjectKey, (PathBuf, u64)>,
}

/// What a reload found: the objects that changed, and the problems (each naming its file).
#[derive(Debug, Default)]
pub struct Reload {
    pub changes: Vec<ObjectChange>,
    pub errors: Vec<ManifestError>,
}

#[derive(Deserialize)]
struct TypeMeta {
    #[serde(rename = "apiVersion", default)]
    api_version: String,
    #[serde(default)]
    kind: String,
    #[serde(default)]
    metadata: Option<NameMeta>,
}

#[derive(Deserialize, Default)]
struct NameMeta {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    namespace: Option<String>,
}

fn is_manifest(path: &Path) -> bool {
    matches!(path.extension().and_then(|e| e.to_str()), Some("yaml" | "yml" | "json"))
}

/// Parses one document into an object lb reads. `Ok(None)`: a kind lb does not read.
fn parse_document(file: &Path, value: serde_yaml_ng::Value) -> Result<Option<Object>, ManifestError> {
    let meta: TypeMeta = serde_yaml_ng::from_value(value.clone()).map_err(|error| ManifestError::Object {
        file: file.to_path_buf(),
        kind: "object".into(),
        object: "?".into(),
        message: format!("not a Kubernetes object: {error}"),
    })?;
    let names = meta.metadata.unwrap_or_default();
    let object_error = |message: String| ManifestError::Object {
        file: file.to_path_buf(),
        kind: meta.kind.clone(),
        object: format!(
            "{}/{}",
            names.namespace.as_deref().unwrap_or("default"),
            names.name.as_deref().unwrap_or("<no name>")
        ),
        message,
    };
    let parse = |value| -> Result<Object, ManifestError> {
        Ok(match meta.kind.as_str() {
            "Service" => Object::Service(Box::new(
                serde_yaml_ng::from_value::<Service>(value).map_err(|e| object_error(e.to_string()))?,
            )),
            "EndpointSlice" => Object::EndpointSlice(Box::new(
                serde_yaml_ng::from_value::<EndpointSlice>(value).map_err(|e| object_error(e.to_string()))?,
            )),
            "Endpoints" => Object::Endpoints(Box::new(
                serde_yaml_ng::from_value::<Endpoints>(value).map_err(|e| object_error(e.to_string()))?,
            )),
            "Pod" => Object::Pod(Box::new(
                serde_yaml_ng::from_value::<Pod>(value).map_err(|e| object_error(e.to_string()))?,
            )),
            _ => Object::Node(Box::new(
                serde_yaml_ng::from_value::<Node>(value).map_err(|e| object_error(e.to_string()))?,
            )),
        })
    };
    match (meta.api_version.as_str(), meta.kind.as_str()) {
        ("v1", "Service" | "Endpoints" | "Pod" | "Node") | ("discovery.k8s.io/v1", "EndpointSlice") => {
            parse(value).map(Some)
        }
        (api_version, kind) => {
            tracing::debug!(file = %file.display(), api_version, kind, "kind not read by lb; skipped");
            Ok(None)
        }
    }
}

/// The objects of one manifest file, each with the hash of its text, and the problems with
/// objects that fail (with their identity, when it could be read). `Err`: the file as a
/// whole is not YAML.
pub fn parse_manifest(file: &Path, text: &str) -> Result<(Vec<Object>, Vec<ManifestError>), ManifestError> {
    let (objects, errors) = parse_with_hashes(file, text)?;
    Ok((
        objects.into_iter().map(|(object, _)| object).collect(),
        errors.into_iter().map(|(_, e)| e).collect(),
    ))
}

type Parsed = (Vec<(Object, u64)>, Vec<(Option<ObjectKey>, ManifestError)>);

fn parse_with_hashes(file: &Path, text: &str) -> Result<Parsed, ManifestError> {
    let mut objects = Vec::new();
    let mut errors = Vec::new();
    for (index, document) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let value = serde_yaml_ng::Value::deserialize(document).map_err(|source| ManifestError::Yaml {
            file: file.to_path_buf(),
            document: index + 1,
            source,
        })?;
        if value.is_null() {
            continue; // empty document, e.g. a trailing `---`
        }
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        value.hash(&mut hasher);
        let hash = hasher.finish();
        let key = key_of(&value);
        match parse_document(file, value) {
            Ok(Some(object)) => objects.push((object, hash)),
            Ok(None) => {}
            Err(error) => errors.push((key, error)),
        }
    }
    Ok((objects, errors))
}

/// An object's identity from its text, for one that does not parse as its kind.
fn key_of(value: &serde_yaml_ng::Value) -> Option<ObjectKey> {
    let meta: TypeMeta = serde_yaml_ng::from_value(value.clone()).ok()?;
    let names = meta.metadata?;
    let kind: &'static str = match meta.kind.as_str() {
        "Service" => "Service",
        "EndpointSlice" => "EndpointSlice",
        "Endpoints" => "Endpoints",
        "Pod" => "Pod",
        "Node" => "Node",
        _ => return None,
    };
    let namespace = if kind == "Node" { String::new() } else { namespace_of(names.namespace.as_ref()) };
    Some((kind, namespace, names.name?))
}

impl ManifestStore {
    /// Reads every manifest in `dir`, as at start or after the watcher lost track of events:
    /// files that vanished are forgotten, the others re-read.
    pub fn reload_all(&mut self, dir: &Path) -> Result<Reload, ManifestError> {
        let mut changes = Vec::new();
        let errors = self.reload_all_into(dir, &mut |change, _| changes.push(change))?;
        Ok(Reload { changes, errors })
    }

    /// `reload_all`, handing each change on as soon as its file is read (with the file it
    /// comes from), so the whole directory's objects are never in memory at once.
    pub fn reload_all_into(
        &mut self,
        dir: &Path,
        sink: &mut dyn FnMut(ObjectChange, &Path),
    ) -> Result<Vec<ManifestError>, ManifestError> {
        let read_dir_error = |source| ManifestError::ReadDir { dir: dir.to_path_buf(), source };
        let mut paths: BTreeSet<PathBuf> = std::fs::read_dir(dir)
            .map_err(read_dir_error)?
            .filter_map(|entry| entry.ok().map(|e| e.path()))
            .filter(|path| path.is_file() && is_manifest(path))
            .collect();
        paths.extend(self.files.keys().cloned());
        Ok(self.reload_files_into(paths, sink))
    }

    /// Re-reads these files (changed, created or removed). A file that cannot be read or
    /// parsed keeps its objects; an object that fails keeps its previous version.
    pub fn reload_files(&mut self, paths: impl IntoIterator<Item = PathBuf>) -> Reload {
        let mut changes = Vec::new();
        let errors = self.reload_files_into(paths, &mut |change, _| changes.push(change));
        Reload { changes, errors }
    }

    /// `reload_files`, handing each change on as soon as its file is read.
    pub fn reload_files_into(
        &mut self,
        paths: impl IntoIterator<Item = PathBuf>,
        sink: &mut dyn FnMut(ObjectChange, &Path),
    ) -> Vec<ManifestError> {
        let mut errors = Vec::new();
        for path in paths.into_iter().collect::<BTreeSet<_>>() {
            self.reload_file(path, sink, &mut errors);
        }
        errors
    }

    fn reload_file(
        &mut self,
        path: PathBuf,
        sink: &mut dyn FnMut(ObjectChange, &Path),
        errors: &mut Vec<ManifestError>,
    ) {
        let previous = self.files.get(&path).cloned().unwrap_or_default();
        let mut parsed: HashMap<ObjectKey, Object> = HashMap::new();
        let defined: Vec<Defined> = if !(path.is_file() && is_manifest(&path)) {
            Vec::new()
        } else {
            let result = std::fs::read_to_string(&path)
                .map_err(|source| ManifestError::ReadFile { file: path.clone(), source })
                .and_then(|text| parse_with_hashes(&path, &text));
            let (objects, object_errors) = match result {
                Ok(parsed) => parsed,
                Err(error) => {
                    errors.push(error);
                    return; // the file keeps what it defined
                }
            };
            let mut defined: Vec<Defined> = Vec::new();
            for (object, hash) in objects {
                let key = object.key();
                if parsed.contains_key(&key) {
                    errors.push(ManifestError::Object {
                        file: path.clone(),
                        kind: key.0.to_string(),
                        object: format!("{}/{}", key.1, key.2),
                        message: "defined twice in this file; the first is used".into(),
                    });
                    continue;
                }
                defined.push((key.clone(), hash));
                parsed.insert(key, object);
            }
            // An object that fails keeps the version this file had.
            for (key, error) in object_errors {
                if let Some(key) = key
                    && !parsed.contains_key(&key)
                    && let Some(kept) = previous.iter().find(|(k, _)| *k == key)
                {
                    tracing::warn!(kind = key.0, namespace = %key.1, name = %key.2, "keeping the last good version of the object");
                    defined.push(kept.clone());
                }
                errors.push(error);
            }
            defined
        };
        let mut affected: BTreeSet<ObjectKey> = BTreeSet::new();
        for (key, _) in &previous {
            if let Some(files) = self.defined_in.get_mut(key) {
                files.remove(&path);
                if files.is_empty() {
                    self.defined_in.remove(key);
                }
            }
            affected.insert(key.clone());
        }
        for (key, _) in &defined {
            self.defined_in.entry(key.clone()).or_default().insert(path.clone());
            affected.insert(key.clone());
        }
        if defined.is_empty() && !path.is_file() {
            self.files.remove(&path);
        } else {
            self.files.insert(path.clone(), defined);
        }
        for key in affected {
            let wanted = self.defined_in.get(&key).and_then(|files| files.first()).and_then(|file| {
                let hash = self.files.get(file)?.iter().find(|(k, _)| *k == key)?.1;
                Some((file.clone(), hash))
            });
            if wanted.as_ref() == self.in_force.get(&key) {
                continue;
            }
            match wanted {
                None => {
                    self.in_force.remove(&key);
                    sink(ObjectChange::Delete(key), &path);
                }
                Some((file, hash)) => {
                    let object = match parsed.remove(&key).filter(|_| file == path) {
                        Some(object) => Some(object),
                        // In force from another file (the file that won went away).
                        None => read_object(&file, &key),
                    };
                    self.in_force.insert(key, (file.clone(), hash));
                    // None: kept from before, as it last parsed: nothing to hand on.
                    if let Some(object) = object {
                        sink(ObjectChange::Upsert(object), &file);
                    }
                }
            }
        }
    }

    /// The file the version in force of an object comes from.
    pub fn file_of(&self, key: &ObjectKey) -> Option<&Path> {
        self.in_force.get(key).map(|(file, _)| file.as_path())
    }

    /// How many objects are in force.
    pub fn len(&self) -> usize {
        self.in_force.len()
    }

    pub fn is_empty(&self) -> bool {
        self.in_force.is_empty()
    }
}

/// One object of a file, read again.
fn read_object(file: &Path, key: &ObjectKey) -> Option<Object> {
    let text = std::fs::read_to_string(file).ok()?;
    let (objects, _) = parse_with_hashes(file, &text).ok()?;
    objects.into_iter().map(|(object, _)| object).find(|object| object.key() == *key)
}

/// Every object of a set of manifest texts, as a from-scratch conversion reads them: the
/// first definition of an object wins.
pub fn objects_in(texts: &[(PathBuf, String)]) -> (Vec<Object>, Vec<ManifestError>) {
    let mut objects: BTreeMap<ObjectKey, Object> = BTreeMap::new();
    let mut errors = Vec::new();
    for (file, text) in texts {
        match parse_with_hashes(file, text) {
            Ok((parsed, object_errors)) => {
                for (object, _) in parsed {
                    objects.entry(object.key()).or_insert(object);
                }
                errors.extend(object_errors.into_iter().map(|(_, e)| e));
            }
            Err(error) => errors.push(error),
        }
    }
    (objects.into_values().collect(), errors)
}

/// What the manifest watcher reports.
#[derive(Debug)]
pub enum WatchEvent {
    /// These files changed (created, written, renamed or removed).
    Files(Vec<PathBuf>),
    /// Events were lost (an inotify queue overflow, say): the whole directory is read again.
    Rescan,
}

/// The directory's objects, with what the cluster's controllers would add (ClusterIPs,
/// endpoints from Pods), as changes: manifests mode's source without its watcher.
pub struct ManifestObjects {
    dir: PathBuf,
    store: ManifestStore,
    /// None: Services keep the clusterIP their manifest gives (or have none).
    allocator: Option<crate::source::cluster_ip::ClusterIpAllocator>,
    /// Where allocations are saved (none: not saved).
    state_file: Option<PathBuf>,
    pods: crate::source::pods::PodEndpoints,
    /// Services left out until the address they ask for (or any) is free.
    waiting: BTreeMap<(String, String), Box<Service>>,
}

/// What a read of the directory changed, and the problems found (each naming its file or
/// object).
#[derive(Debug, Default)]
pub struct Loaded {
    pub changes: Vec<ObjectChange>,
    pub errors: Vec<SourceError>,
}

/// A problem manifests mode's source found.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    /// A Service that cannot have the ClusterIP it asks for.
    #[error(transparent)]
    ClusterIp(#[from] crate::model::ObjectError),
    #[error(transparent)]
    State(#[from] crate::source::cluster_ip::StateError),
}

impl ManifestObjects {
    pub fn new(
        dir: &Path,
        allocator: Option<crate::source::cluster_ip::ClusterIpAllocator>,
        state_file: Option<PathBuf>,
    ) -> Self {
        Self {
            dir: dir.to_path_buf(),
            store: ManifestStore::default(),
            allocator,
            state_file,
            pods: Default::default(),
            waiting: BTreeMap::new(),
        }
    }

    /// Reads the whole directory (at start, or after events were lost).
    pub fn reload_all(&mut self) -> Loaded {
        let mut changes = Vec::new();
        let errors = self.reload_all_into(&mut |change, _| changes.push(change));
        Loaded { changes, errors }
    }

    /// `reload_all`, handing each change on (with the file it comes from) as its file is read.
    pub fn reload_all_into(&mut self, sink: &mut dyn FnMut(ObjectChange, &Path)) -> Vec<SourceError> {
        let mut batch = Batch::default();
        let mut store = std::mem::take(&mut self.store);
        let result = store.reload_all_into(&self.dir.clone(), &mut |change, file| {
            self.take(change, file, &mut batch, sink)
        });
        self.store = store;
        match result {
            Ok(errors) => batch.errors.extend(errors.into_iter().map(SourceError::from)),
            // The directory itself is unreadable: keep serving what is programmed.
            Err(error) => batch.errors.push(error.into()),
        }
        self.finish(batch, sink)
    }

    /// Re-reads these files of the directory.
    pub fn reload_files(&mut self, files: impl IntoIterator<Item = PathBuf>) -> Loaded {
        let mut changes = Vec::new();
        let errors = self.reload_files_into(files, &mut |change, _| changes.push(change));
        Loaded { changes, errors }
    }

    /// `reload_files`, handing each change on as its file is read.
    pub fn reload_files_into(
        &mut self,
        files: impl IntoIterator<Item = PathBuf>,
        sink: &mut dyn FnMut(ObjectChange, &Path),
    ) -> Vec<SourceError> {
        let files: Vec<PathBuf> =
            files.into_iter().filter(|p| p.parent() == Some(self.dir.as_path())).collect();
        let mut batch = Batch::default();
        let mut store = std::mem::take(&mut self.store);
        let errors =
            store.reload_files_into(files, &mut |change, file| self.take(change, file, &mut batch, sink));
        self.store = store;
        batch.errors.extend(errors.into_iter().map(SourceError::from));
        self.finish(batch, sink)
    }

    /// One change from the files: a Service gets its ClusterIP (one that needs an address
    /// allocated waits for the end of the batch, so an allocation never takes an address a
    /// manifest read later asks for), and the slices of Pods it touches follow it.
    fn take(
        &mut self,
        change: ObjectChange,
        file: &Path,
        batch: &mut Batch,
        sink: &mut dyn FnMut(ObjectChange, &Path),
    ) {
        let change = match change {
            ObjectChange::Upsert(Object::Service(service)) => {
                let name = crate::source::cluster_ip::name_of(&service);
                batch.deferred.remove(&name);
                let allocated = self.allocator.as_ref().is_some_and(|a| a.assigned().contains_key(&name));
                if self.allocator.is_some()
                    && !allocated
                    && !crate::source::cluster_ip::asks_for_address(&service)
                {
                    batch.deferred.insert(name, (service, file.to_path_buf()));
                    return;
                }
                self.admit(service, &mut batch.errors)
            }
            ObjectChange::Delete(key) if key.0 == "Service" => {
                let name = (key.1.clone(), key.2.clone());
                batch.deferred.remove(&name);
                self.waiting.remove(&name);
                batch.released |= self.allocator.as_mut().is_some_and(|a| a.release(&name));
                ObjectChange::Delete(key)
            }
            other => other,
        };
        for derived in self.pods.on_change(&change) {
            sink(derived, file);
        }
        sink(change, file);
    }

    /// The end of a batch: Services waiting for an allocated address get one, and a freed
    /// address may be what a waiting Service asks for.
    fn finish(&mut self, mut batch: Batch, sink: &mut dyn FnMut(ObjectChange, &Path)) -> Vec<SourceError> {
        for (_, (service, file)) in std::mem::take(&mut batch.deferred) {
            let change = self.admit(service, &mut batch.errors);
            for derived in self.pods.on_change(&change) {
                sink(derived, &file);
            }
            sink(change, &file);
        }
        if batch.released {
            let waiting: Vec<Box<Service>> = std::mem::take(&mut self.waiting).into_values().collect();
            for service in waiting {
                let change = self.admit(service, &mut batch.errors);
                if matches!(change, ObjectChange::Upsert(_)) {
                    let file = self.store.file_of(&change.key()).map(Path::to_path_buf).unwrap_or_default();
                    for derived in self.pods.on_change(&change) {
                        sink(derived, &file);
                    }
                    sink(change, &file);
                }
            }
        }
        if let Some(allocator) = self.allocator.as_mut()
            && allocator.take_changed()
            && let Some(state_file) = &self.state_file
            && let Err(error) = allocator.save(state_file)
        {
            batch.errors.push(error.into());
        }
        batch.errors
    }

    /// A Service with its ClusterIP, or its removal while it cannot have one.
    fn admit(&mut self, mut service: Box<Service>, errors: &mut Vec<SourceError>) -> ObjectChange {
        use crate::source::cluster_ip::Admission;
        let name = crate::source::cluster_ip::name_of(&service);
        let Some(allocator) = self.allocator.as_mut() else {
            return ObjectChange::Upsert(Object::Service(service));
        };
        match allocator.admit(&mut service) {
            Admission::Admitted => {
                self.waiting.remove(&name);
                ObjectChange::Upsert(Object::Service(service))
            }
            Admission::Kept(error) => {
                errors.push(error.into());
                ObjectChange::Upsert(Object::Service(service))
            }
            Admission::Rejected(error) => {
                errors.push(error.into());
                self.waiting.insert(name.clone(), service);
                ObjectChange::Delete(("Service", name.0, name.1))
            }
        }
    }

    /// The file an object's version in force comes from.
    pub fn file_of(&self, key: &ObjectKey) -> Option<&Path> {
        self.store.file_of(key)
    }
}

/// What one read of files gathers besides the changes it hands on.
#[derive(Default)]
struct Batch {
    /// Services that need an address allocated, with their file: admitted at the end.
    deferred: BTreeMap<(String, String), (Box<Service>, PathBuf)>,
    /// Whether a Service that had an address went.
    released: bool,
    errors: Vec<SourceError>,
}

/// Manifests mode's source: `ManifestObjects`, re-read as the watcher reports files changed.
pub struct ManifestSource {
    objects: ManifestObjects,
    events: tokio::sync::mpsc::UnboundedReceiver<WatchEvent>,
    /// Events taken but not handled yet.
    pending: Vec<WatchEvent>,
    _watcher: notify::RecommendedWatcher,
}

impl ManifestSource {
    /// Watches `dir` and reads it whole, handing every object on to `sink` (with its file) as
    /// its file is read.
    pub fn start(
        dir: &Path,
        cluster_ip_ranges: &[ipnet::IpNet],
        state_file: &Path,
        sink: &mut dyn FnMut(ObjectChange, &Path),
    ) -> anyhow::Result<Self> {
        use anyhow::Context;
        use notify::Watcher;
        if !dir.is_dir() {
            anyhow::bail!("manifest directory {} does not exist or is not a directory", dir.display());
        }
        let (tx, events) = tokio::sync::mpsc::unbounded_channel();
        let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
            use notify::event::{AccessKind, AccessMode, EventKind, ModifyKind};
            let event = match event {
                // A file written (new or in place) is read once it is closed, never half-written;
                // a file renamed into place (how tools replace files atomically) or removed, at
                // once. Other accesses (our own reads among them) and attribute changes say nothing.
                Ok(event)
                    if matches!(
                        event.kind,
                        EventKind::Create(notify::event::CreateKind::File)
                            | EventKind::Modify(ModifyKind::Data(_) | ModifyKind::Metadata(_))
                    ) || matches!(event.kind, EventKind::Access(kind) if kind != AccessKind::Close(AccessMode::Write)) =>
                {
                    return;
                }
                Ok(event) if event.need_rescan() || event.paths.is_empty() => WatchEvent::Rescan,
                Ok(event) => WatchEvent::Files(event.paths),
                Err(_) => WatchEvent::Rescan,
            };
            let _ = tx.send(event);
        })
        .context("starting the manifest watcher")?;
        watcher
            .watch(dir, notify::RecursiveMode::NonRecursive)
            .with_context(|| format!("watching {}", dir.display()))?;
        let allocator = crate::source::cluster_ip::ClusterIpAllocator::load(cluster_ip_ranges, state_file)?;
        let mut objects = ManifestObjects::new(dir, Some(allocator), Some(state_file.to_path_buf()));
        for error in objects.reload_all_into(sink) {
            tracing::error!("{error}");
        }
        Ok(Self { objects, events, pending: Vec::new(), _watcher: watcher })
    }

    /// Waits for the next change to the directory; returns what it changed.
    pub async fn changed(&mut self) -> anyhow::Result<Vec<ObjectChange>> {
        use anyhow::Context;
        // Cancel-safe: an event taken is kept until its changes are handed on.
        if self.pending.is_empty() {
            let first = self.events.recv().await.context("manifest watcher stopped")?;
            self.pending.push(first);
        }
        // What else has arrived is read in the same pass; longer bursts are coalesced by the
        // sync pacing (`--min-sync-period`).
        let mut files: BTreeSet<PathBuf> = BTreeSet::new();
        let mut rescan = false;
        let taken = std::mem::take(&mut self.pending);
        for event in taken.into_iter().chain(std::iter::from_fn(|| self.events.try_recv().ok())) {
            match event {
                WatchEvent::Files(paths) => files.extend(paths),
                WatchEvent::Rescan => rescan = true,
            }
        }
        let loaded = if rescan { self.objects.reload_all() } else { self.objects.reload_files(files) };
        Ok(logged(loaded))
    }

    /// The file an object's version in force comes from.
    pub fn file_of(&self, key: &ObjectKey) -> Option<&Path> {
        self.objects.file_of(key)
    }
}

fn logged(loaded: Loaded) -> Vec<ObjectChange> {
    for error in &loaded.errors {
        tracing::error!("{error}");
    }
    loaded.changes
}
