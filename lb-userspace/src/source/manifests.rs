//! The cluster-less source: Services and EndpointSlices read from a directory of Kubernetes YAML
//! (multi-document files, `.yaml`/`.yml`/`.json`).
//!
//! Like an API server that refuses a bad update, a file or object that fails to parse or
//! validate is reported (naming the file and the object) and its last good version stays in
//! force; nothing else is affected.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::{Endpoints, Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde::Deserialize;

use crate::convert::{self, ClusterObjects, namespace_of};

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

/// A Kubernetes object lb reads, by kind.
#[derive(Debug, Clone, PartialEq)]
pub enum Object {
    Service(Box<Service>),
    EndpointSlice(Box<EndpointSlice>),
    Endpoints(Box<Endpoints>),
    Node(Box<Node>),
    Pod(Box<Pod>),
}

/// Identity of an object across reloads: kind, namespace, name.
pub type ObjectKey = (&'static str, String, String);

impl Object {
    pub fn key(&self) -> ObjectKey {
        let (kind, metadata) = match self {
            Object::Service(o) => ("Service", &o.metadata),
            Object::EndpointSlice(o) => ("EndpointSlice", &o.metadata),
            Object::Endpoints(o) => ("Endpoints", &o.metadata),
            Object::Node(o) => ("Node", &o.metadata),
            Object::Pod(o) => ("Pod", &o.metadata),
        };
        (kind, namespace_of(metadata.namespace.as_ref()), metadata.name.clone().unwrap_or_default())
    }
}

/// The objects each file contributes, as last loaded successfully.
#[derive(Debug, Default, Clone)]
pub struct ManifestStore {
    files: BTreeMap<PathBuf, Vec<Object>>,
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
    let object = match (meta.api_version.as_str(), meta.kind.as_str()) {
        ("v1", "Service") => {
            let service: Service =
                serde_yaml_ng::from_value(value).map_err(|e| object_error(e.to_string()))?;
            convert::parse_service(&service).map_err(|e| object_error(e.problem))?;
            Object::Service(Box::new(service))
        }
        ("discovery.k8s.io/v1", "EndpointSlice") => {
            let slice: EndpointSlice =
                serde_yaml_ng::from_value(value).map_err(|e| object_error(e.to_string()))?;
            convert::parse_slice(&slice).map_err(|e| object_error(e.problem))?;
            Object::EndpointSlice(Box::new(slice))
        }
        ("v1", "Endpoints") => {
            let endpoints: Endpoints =
                serde_yaml_ng::from_value(value).map_err(|e| object_error(e.to_string()))?;
            convert::parse_endpoints(&endpoints).map_err(|e| object_error(e.problem))?;
            Object::Endpoints(Box::new(endpoints))
        }
        ("v1", "Pod") => {
            let pod: Pod = serde_yaml_ng::from_value(value).map_err(|e| object_error(e.to_string()))?;
            Object::Pod(Box::new(pod))
        }
        ("v1", "Node") => {
            let node: Node = serde_yaml_ng::from_value(value).map_err(|e| object_error(e.to_string()))?;
            Object::Node(Box::new(node))
        }
        (api_version, kind) => {
            tracing::debug!(file = %file.display(), api_version, kind, "kind not read by lb; skipped");
            return Ok(None);
        }
    };
    Ok(Some(object))
}

/// Parses one manifest file's documents. Objects that fail are reported and left out; `Err`
/// means the file as a whole is not YAML.
pub fn parse_manifest(file: &Path, text: &str) -> Result<(Vec<Object>, Vec<ManifestError>), ManifestError> {
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
        match parse_document(file, value) {
            Ok(Some(object)) => objects.push(object),
            Ok(None) => {}
            Err(error) => errors.push(error),
        }
    }
    Ok((objects, errors))
}

impl ManifestStore {
    /// Re-reads every manifest in `dir`. A file that cannot be read or parsed keeps its previous
    /// objects; an object that fails keeps its previous version from the same file. Returns the
    /// problems found, each naming its file and object.
    pub fn reload(&mut self, dir: &Path) -> Result<Vec<ManifestError>, ManifestError> {
        let read_dir_error = |source| ManifestError::ReadDir { dir: dir.to_path_buf(), source };
        let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(read_dir_error)?
            .filter_map(|entry| entry.ok().map(|e| e.path()))
            .filter(|path| path.is_file() && is_manifest(path))
            .collect();
        paths.sort();

        let mut errors = Vec::new();
        let mut files = BTreeMap::new();
        for path in paths {
            let previous = self.files.remove(&path).unwrap_or_default();
            let parsed = std::fs::read_to_string(&path)
                .map_err(|source| ManifestError::ReadFile { file: path.clone(), source })
                .and_then(|text| parse_manifest(&path, &text));
            let objects = match parsed {
                Ok((mut objects, object_errors)) => {
                    if !object_errors.is_empty() {
                        keep_previous_versions(&mut objects, &object_errors, previous);
                        errors.extend(object_errors);
                    }
                    objects
                }
                Err(error) => {
                    errors.push(error);
                    previous
                }
            };
            files.insert(path, objects);
        }
        self.files = files;
        Ok(errors)
    }

    pub fn objects(&self) -> impl Iterator<Item = &Object> {
        self.files.values().flatten()
    }

    /// Every object, by kind, for conversion.
    pub fn cluster_objects(&self) -> ClusterObjects {
        objects_by_kind(self.objects().cloned())
    }
}

/// For each object that failed this time, keep the version the file had before, if any.
fn keep_previous_versions(objects: &mut Vec<Object>, errors: &[ManifestError], previous: Vec<Object>) {
    let failed: Vec<(String, String)> = errors
        .iter()
        .filter_map(|error| match error {
            ManifestError::Object { kind, object, .. } => Some((kind.clone(), object.clone())),
            _ => None,
        })
        .collect();
    for object in previous {
        let (kind, namespace, name) = object.key();
        let id = (kind.to_string(), format!("{namespace}/{name}"));
        let still_present = objects.iter().any(|o| o.key() == object.key());
        if failed.contains(&id) && !still_present {
            tracing::warn!(kind, %namespace, %name, "keeping the last good version of the object");
            objects.push(object);
        }
    }
}

/// Sorts objects into the lists conversion reads.
pub fn objects_by_kind(objects: impl IntoIterator<Item = Object>) -> ClusterObjects {
    let mut sorted = ClusterObjects::default();
    for object in objects {
        match object {
            Object::Service(o) => sorted.services.push(*o),
            Object::EndpointSlice(o) => sorted.endpoint_slices.push(*o),
            Object::Endpoints(o) => sorted.endpoints.push(*o),
            Object::Node(o) => sorted.nodes.push(*o),
            Object::Pod(o) => sorted.pods.push(*o),
        }
    }
    sorted
}
