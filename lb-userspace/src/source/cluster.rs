//! The API-server source's view of the cluster: watcher events turned into changes.
//!
//! A (re-)list's objects go on as they arrive (each is the newest version of its object);
//! when the list completes (`InitDone`), objects it did not list are reported gone: those
//! deleted while a watch was down, without trusting that a Delete event was seen. Only names
//! are kept here, so a list of 100 000 objects is never held in memory.

use std::collections::BTreeSet;

use k8s_openapi::api::core::v1::{Endpoints, Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::ResourceExt;
use kube::runtime::watcher::Event;

use crate::convert::EndpointsSource;
use crate::source::{Object, ObjectChange, ObjectKey};

/// A watcher event of one of the kinds lb reads.
#[derive(Debug)]
#[expect(clippy::large_enum_variant, reason = "each event is moved once, through a channel")]
pub enum ClusterEvent {
    Service(Event<Service>),
    EndpointSlice(Event<EndpointSlice>),
    Endpoints(Event<Endpoints>),
    Node(Event<Node>),
}

/// The objects of one kind the source has reported, by key.
#[derive(Debug, Default)]
pub struct KindStore {
    present: BTreeSet<ObjectKey>,
    /// Objects a list in progress has listed so far.
    relisting: Option<BTreeSet<ObjectKey>>,
    listed: bool,
}

impl KindStore {
    /// Applies an event; returns the changes it makes visible.
    pub fn apply<K: ResourceExt>(
        &mut self,
        event: Event<K>,
        wrap: impl Fn(K) -> Object,
    ) -> Vec<ObjectChange> {
        match event {
            Event::Init => {
                self.relisting = Some(BTreeSet::new());
                Vec::new()
            }
            Event::InitApply(object) => {
                let object = wrap(object);
                let key = object.key();
                self.relisting.get_or_insert_with(BTreeSet::new).insert(key.clone());
                self.present.insert(key);
                vec![ObjectChange::Upsert(object)]
            }
            Event::InitDone => {
                let listed = self.relisting.take().unwrap_or_default();
                let changes: Vec<ObjectChange> = self
                    .present
                    .iter()
                    .filter(|key| !listed.contains(*key))
                    .map(|key| ObjectChange::Delete(key.clone()))
                    .collect();
                self.present = listed;
                self.listed = true;
                changes
            }
            Event::Apply(object) => {
                let object = wrap(object);
                self.present.insert(object.key());
                vec![ObjectChange::Upsert(object)]
            }
            Event::Delete(object) => {
                let key = wrap(object).key();
                if self.present.remove(&key) { vec![ObjectChange::Delete(key)] } else { Vec::new() }
            }
        }
    }

    /// Whether a first complete list has arrived.
    pub fn listed(&self) -> bool {
        self.listed
    }

    pub fn len(&self) -> usize {
        self.present.len()
    }

    pub fn is_empty(&self) -> bool {
        self.present.is_empty()
    }
}

#[derive(Debug, Default)]
pub struct ClusterStore {
    pub services: KindStore,
    pub endpoint_slices: KindStore,
    pub endpoints: KindStore,
    pub nodes: KindStore,
}

impl ClusterStore {
    /// Applies an event; returns the changes it makes visible.
    pub fn apply(&mut self, event: ClusterEvent) -> Vec<ObjectChange> {
        match event {
            ClusterEvent::Service(e) => self.services.apply(e, |o| Object::Service(Box::new(o))),
            ClusterEvent::EndpointSlice(e) => {
                self.endpoint_slices.apply(e, |o| Object::EndpointSlice(Box::new(o)))
            }
            ClusterEvent::Endpoints(e) => self.endpoints.apply(e, |o| Object::Endpoints(Box::new(o))),
            ClusterEvent::Node(e) => self.nodes.apply(e, |o| Object::Node(Box::new(o))),
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

    fn apply(store: &mut KindStore, event: Event<Service>) -> Vec<String> {
        store
            .apply(event, |o| Object::Service(Box::new(o)))
            .into_iter()
            .map(|change| match change {
                ObjectChange::Upsert(object) => format!("+{}", object.key().2),
                ObjectChange::Delete(key) => format!("-{}", key.2),
            })
            .collect()
    }

    #[test]
    fn a_relist_replaces_everything_and_needs_no_delete_events() {
        let mut store = KindStore::default();
        assert!(!store.listed());
        apply(&mut store, Event::Init);
        assert_eq!(apply(&mut store, Event::InitApply(service("a"))), ["+a"]);
        assert_eq!(apply(&mut store, Event::InitApply(service("b"))), ["+b"]);
        assert!(!store.listed(), "not listed before the list completes");
        assert!(apply(&mut store, Event::InitDone).is_empty());
        assert!(store.listed());

        // The watch drops; "a" is deleted meanwhile; the re-list brings only "b" and "c".
        apply(&mut store, Event::Init);
        assert_eq!(apply(&mut store, Event::InitApply(service("b"))), ["+b"]);
        assert_eq!(apply(&mut store, Event::InitApply(service("c"))), ["+c"]);
        assert_eq!(apply(&mut store, Event::InitDone), ["-a"], "what the list left out is gone");

        assert_eq!(apply(&mut store, Event::Delete(service("b"))), ["-b"]);
        assert!(
            apply(&mut store, Event::Delete(service("b"))).is_empty(),
            "a repeated delete changes nothing"
        );
        assert_eq!(apply(&mut store, Event::Apply(service("d"))), ["+d"]);
        assert_eq!(store.len(), 2);
    }
}
