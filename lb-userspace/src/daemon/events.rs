//! Kubernetes Events on the objects lb cannot program (a Service whose address another one
//! holds, a field lb cannot use, a full map, an SCTP port), through kube-rs' recorder, so `kubectl describe`
//! shows why. Each (object, reason) is reported at most once a minute; the recorder itself
//! folds repeats into an event series. Publishing happens in a task of its own: the event loop
//! never waits on the API server.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use tokio::sync::mpsc;

use crate::dataplane::reconcile::ReconcileError;
use crate::model::ObjectError;
use crate::source::{Object, ObjectChange, ObjectKey};

/// The same (object, reason) again within this is not reported.
const REPEAT_AFTER: Duration = Duration::from_secs(60);

/// Why an object is not (fully) programmed, as the event's reason.
pub mod reason {
    /// The object fails lb's checks (a field it cannot use).
    pub const INVALID: &str = "LbInvalidObject";
    /// Another Service holds one of its frontend addresses or its health-check port.
    pub const CONFLICT: &str = "LbFrontendConflict";
    /// A map is full: the frontend waits for room (the note names the flag to raise).
    pub const MAP_FULL: &str = "LbMapFull";
    /// A frontend has more endpoints than a frontend can hold.
    pub const TOO_MANY_BACKENDS: &str = "LbTooManyBackends";
    /// Another failure while programming it.
    pub const PROGRAM_FAILED: &str = "LbProgramFailed";
    /// Served in part: a port with a protocol lb does not translate (SCTP).
    pub const UNSUPPORTED: &str = "LbUnsupportedPort";
}

struct Report {
    kind: &'static str,
    namespace: String,
    name: String,
    /// `kubectl describe` lists the events whose reference carries the object's UID.
    uid: Option<String>,
    reason: &'static str,
    note: String,
}

pub struct ServiceEvents {
    reports: mpsc::UnboundedSender<Report>,
    reported: HashMap<(&'static str, String, String, &'static str), Instant>,
    /// The UID of each object the source gave, for the events' references.
    uids: HashMap<ObjectKey, String>,
}

impl ServiceEvents {
    /// Starts the publishing task; events name `node` as the reporting instance.
    pub fn start(client: kube::Client, node: Option<String>) -> Self {
        let reporter = Reporter { controller: "lb".into(), instance: node };
        let recorder = Recorder::new(client, reporter);
        let (reports, mut queue) = mpsc::unbounded_channel::<Report>();
        tokio::spawn(async move {
            while let Some(report) = queue.recv().await {
                let (api_version, kind) = match report.kind {
                    "EndpointSlice" => ("discovery.k8s.io/v1", "EndpointSlice"),
                    "Endpoints" => ("v1", "Endpoints"),
                    _ => ("v1", "Service"),
                };
                let reference = ObjectReference {
                    api_version: Some(api_version.into()),
                    kind: Some(kind.into()),
                    namespace: Some(report.namespace.clone()),
                    name: Some(report.name.clone()),
                    uid: report.uid.clone(),
                    ..Default::default()
                };
                let event = Event {
                    type_: EventType::Warning,
                    reason: report.reason.into(),
                    note: Some(report.note.chars().take(1024).collect()),
                    action: "Program".into(),
                    secondary: None,
                };
                if let Err(error) = recorder.publish(&event, &reference).await {
                    tracing::debug!(%error, object = %format!("{}/{}", report.namespace, report.name), "could not record an event");
                }
            }
        });
        Self { reports, reported: HashMap::new(), uids: HashMap::new() }
    }

    /// Keeps the UID of an object the source gave (and forgets a deleted one's).
    pub fn note_object(&mut self, change: &ObjectChange) {
        match change {
            // Only the kinds events are told on (not Pods or Nodes: memory would grow with
            // the cluster for nothing).
            ObjectChange::Upsert(
                object @ (Object::Service(_) | Object::EndpointSlice(_) | Object::Endpoints(_)),
            ) => {
                if let Some(uid) = object.uid() {
                    self.uids.insert(object.key(), uid.to_string());
                }
            }
            ObjectChange::Upsert(_) => {}
            ObjectChange::Delete(key) => {
                self.uids.remove(key);
            }
        }
    }

    fn report(
        &mut self,
        kind: &'static str,
        namespace: &str,
        name: &str,
        reason: &'static str,
        note: String,
    ) {
        let key = (kind, namespace.to_string(), name.to_string(), reason);
        let now = Instant::now();
        if self.reported.get(&key).is_some_and(|at| now.duration_since(*at) < REPEAT_AFTER) {
            return;
        }
        self.reported.retain(|_, at| now.duration_since(*at) < REPEAT_AFTER);
        self.reported.insert(key, now);
        let uid = self.uids.get(&(kind, namespace.to_string(), name.to_string())).cloned();
        let _ = self.reports.send(Report {
            kind,
            namespace: namespace.to_string(),
            name: name.to_string(),
            uid,
            reason,
            note,
        });
    }

    /// An object the pipeline refused, or a conflict it found.
    pub fn object_error(&mut self, error: &ObjectError, reason: &'static str) {
        self.report(error.kind, &error.namespace, &error.name, reason, error.problem.clone());
    }

    /// A frontend the reconciler could not program, on its Service.
    pub fn reconcile_error(&mut self, error: &ReconcileError) {
        let (service, reason) = match error {
            ReconcileError::Program { service, source, .. } => {
                let reason = if matches!(**source, crate::dataplane::maps::MapsError::Full { .. }) {
                    reason::MAP_FULL
                } else {
                    reason::PROGRAM_FAILED
                };
                (service, reason)
            }
            ReconcileError::TooManyBackends { service, .. } => (service, reason::TOO_MANY_BACKENDS),
            _ => return,
        };
        // `namespace/name:port`
        let service = service.split_once(':').map_or(service.as_str(), |(service, _)| service);
        let Some((namespace, name)) = service.split_once('/') else { return };
        self.report("Service", namespace, name, reason, error.to_string());
    }
}
