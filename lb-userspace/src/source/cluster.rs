//! The API-server source's view of the cluster: one store per kind, fed by watcher events.
//!
//! Each (re-)list replaces its kind wholesale when it completes (`InitDone`): objects deleted
//! while a watch was down disappear then, without trusting that a Delete event was seen.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Endpoints, Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::ResourceExt;
use kube::runtime::watcher::Event;

use crate::convert::{ClusterObjects, EndpointsSource};

/// A watcher event of one of the kinds lb reads.
#[derive(Debug)]
#[expect(clippy::large_enum_variant, reason = "each event is moved once, through a channel")]
pub enum ClusterEvent {
    Service(Event<Service>),
    EndpointSlice(Event<EndpointSlice>),
    Endpoints(Event<Endpoints>),
    Node(Event<Node>),
}

type ObjectName = (String, String);

/// Objects of one kind, by namespace and name.
#[derive(Debug)]
pub struct KindStore<K> {
    objects: BTreeMap<ObjectName, K>,
    /// Objects of a list in progress, swapped in when it completes.
    relisting: Option<BTreeMap<ObjectName, K>>,
    listed: bool,
}

impl<K> Default for KindStore<K> {
    fn default() -> Self {
        Self { objects: BTreeMap::new(), relisting: None, listed: false }
    }
}

fn name_of<K: ResourceExt>(object: &K) -> ObjectName {
    (object.namespace().unwrap_or_default(), object.name_any())
}

impl<K: ResourceExt + Clone> KindStore<K> {
    /// Applies an event; returns whether the visible objects changed.
    pub fn apply(&mut self, event: Event<K>) -> bool {
        match event {
            Event::Init => {
                self.relisting = Some(BTreeMap::new());
                false
            }
            Event::InitApply(object) => {
                self.relisting.get_or_insert_with(BTreeMap::new).insert(name_of(&object), object);
                false
            }
            Event::InitDone => {
                self.objects = self.relisting.take().unwrap_or_default();
                self.listed = true;
                true
            }
            Event::Apply(object) => {
                self.objects.insert(name_of(&object), object);
                true
            }
            Event::Delete(object) => self.objects.remove(&name_of(&object)).is_some(),
        }
    }

    /// Whether a first complete list has arrived.
    pub fn listed(&self) -> bool {
        self.listed
    }

    pub fn objects(&self) -> impl Iterator<Item = &K> {
        self.objects.values()
    }
}

#[derive(Debug, Default)]
pub struct ClusterStore {
    pub services: KindStore<Service>,
    pub endpoint_slices: KindStore<EndpointSlice>,
    pub endpoints: KindStore<Endpoints>,
    pub nodes: KindStore<Node>,
}

impl ClusterStore {
    /// Applies an event; returns whether anything visible changed.
    pub fn apply(&mut self, event: ClusterEvent) -> bool {
        match event {
            ClusterEvent::Service(e) => self.services.apply(e),
            ClusterEvent::EndpointSlice(e) => self.endpoint_slices.apply(e),
            ClusterEvent::Endpoints(e) => self.endpoints.apply(e),
            ClusterEvent::Node(e) => self.nodes.apply(e),
        }
    }

    /// Whether every kind the controller needs has been listed once: syncing from half a first
    /// list would delete every Service not listed yet.
    pub fn ready(&self, endpoints_source: EndpointsSource) -> bool {
        let endpoints_listed = match endpoints_source {
            EndpointsSource::EndpointSlices => self.endpoint_slices.listed(),
            EndpointsSource::Endpoints => self.endpoints.listed(),
        };
        self.services.listed() && endpoints_listed && self.nodes.listed()
    }

    pub fn objects(&self) -> ClusterObjects {
        ClusterObjects {
            services: self.services.objects().cloned().collect(),
            endpoint_slices: self.endpoint_slices.objects().cloned().collect(),
            endpoints: self.endpoints.objects().cloned().collect(),
            nodes: self.nodes.objects().cloned().collect(),
            pods: Vec::new(), // the EndpointSlice controller turns Pods into endpoints
        }
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    use super::*;

    fn service(name: &str) -> Service {
        Service {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("default".into()),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    fn names(store: &KindStore<Service>) -> Vec<String> {
        store.objects().map(|s| s.name_any()).collect()
    }

    #[test]
    fn a_relist_replaces_everything_and_needs_no_delete_events() {
        let mut store = KindStore::default();
        assert!(!store.listed());
        store.apply(Event::Init);
        store.apply(Event::InitApply(service("a")));
        store.apply(Event::InitApply(service("b")));
        assert!(names(&store).is_empty(), "nothing visible before the list completes");
        assert!(store.apply(Event::InitDone));
        assert!(store.listed());
        assert_eq!(names(&store), ["a", "b"]);

        // The watch drops; "a" is deleted meanwhile; the re-list brings only "b" and "c".
        store.apply(Event::Init);
        store.apply(Event::InitApply(service("b")));
        store.apply(Event::InitApply(service("c")));
        assert_eq!(names(&store), ["a", "b"], "the old state serves until the list completes");
        store.apply(Event::InitDone);
        assert_eq!(names(&store), ["b", "c"]);

        assert!(store.apply(Event::Delete(service("b"))));
        assert!(!store.apply(Event::Delete(service("b"))), "a repeated delete changes nothing");
        assert!(store.apply(Event::Apply(service("d"))));
        assert_eq!(names(&store), ["c", "d"]);
    }
}
