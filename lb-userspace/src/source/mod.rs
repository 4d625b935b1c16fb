//! Where the objects come from: the API server (`kube`, with `cluster` turning its watch
//! events into changes), a directory of manifests (`manifests`), and, in manifests mode, what a
//! cluster's controllers would add: endpoints from Pods (`pods`) and ClusterIPs
//! (`cluster_ip`). Every source hands on the same thing: changes to Kubernetes objects.

pub mod cluster;
pub mod cluster_ip;
pub mod kube;
pub mod manifests;
pub mod pods;

use k8s_openapi::api::core::v1::{Endpoints, Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;

/// `namespace` as kubectl fills it in when a manifest leaves it out.
pub fn namespace_of(namespace: Option<&String>) -> String {
    namespace.cloned().unwrap_or_else(|| "default".to_string())
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

/// Identity of an object: kind, namespace ("" for Nodes), name.
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
        let namespace =
            if kind == "Node" { String::new() } else { namespace_of(metadata.namespace.as_ref()) };
        (kind, namespace, metadata.name.clone().unwrap_or_default())
    }

    /// The object's UID, when the API server gave it one.
    pub fn uid(&self) -> Option<&str> {
        let metadata = match self {
            Object::Service(o) => &o.metadata,
            Object::EndpointSlice(o) => &o.metadata,
            Object::Endpoints(o) => &o.metadata,
            Object::Node(o) => &o.metadata,
            Object::Pod(o) => &o.metadata,
        };
        metadata.uid.as_deref()
    }
}

/// What a source tells: an object is new or changed, or gone.
#[derive(Debug, Clone, PartialEq)]
pub enum ObjectChange {
    Upsert(Object),
    Delete(ObjectKey),
}

impl ObjectChange {
    pub fn key(&self) -> ObjectKey {
        match self {
            ObjectChange::Upsert(object) => object.key(),
            ObjectChange::Delete(key) => key.clone(),
        }
    }
}
