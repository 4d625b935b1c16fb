//! The deploy/ manifests are valid Kubernetes objects (each parses as its k8s-openapi type and
//! loses nothing in a round trip, so a misspelt field fails) and say what the design requires.

use std::path::PathBuf;

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

fn documents() -> Vec<(String, Value)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    let mut documents = Vec::new();
    for file in files.iter().filter(|f| f.extension().is_some_and(|e| e == "yaml")) {
        let text = std::fs::read_to_string(file).unwrap();
        for document in serde_yaml_ng::Deserializer::from_str(&text) {
            let value: Value = Value::deserialize(document).unwrap();
            if !value.is_null() {
                documents.push((file.display().to_string(), value));
            }
        }
    }
    documents
}

/// Parses as `T` and checks that serializing it back gives the same document.
fn typed<T: DeserializeOwned + serde::Serialize>(file: &str, value: &Value) -> T {
    let object: T = serde_json::from_value(value.clone()).unwrap_or_else(|e| panic!("{file}: {e}"));
    let round_trip = serde_json::to_value(&object).unwrap();
    assert_eq!(&round_trip, value, "{file}: a field was dropped or changed in the round trip");
    object
}

fn find<'a>(documents: &'a [(String, Value)], kind: &str) -> &'a (String, Value) {
    documents.iter().find(|(_, v)| v["kind"] == kind).unwrap_or_else(|| panic!("no {kind} in deploy/"))
}

#[test]
fn manifests_parse_and_say_what_lb_needs() {
    let documents = documents();
    assert_eq!(documents.len(), 5, "Namespace, ServiceAccount, ClusterRole, ClusterRoleBinding, DaemonSet");
    let (file, value) = find(&documents, "Namespace");
    let namespace: Namespace = typed(file, value);
    let (file, value) = find(&documents, "ServiceAccount");
    let account: ServiceAccount = typed(file, value);
    assert_eq!(account.metadata.namespace, namespace.metadata.name);

    let (file, value) = find(&documents, "ClusterRole");
    let role: ClusterRole = typed(file, value);
    let mut grants: Vec<String> = Vec::new();
    for rule in role.rules.unwrap() {
        for group in rule.api_groups.unwrap_or_default() {
            for resource in rule.resources.clone().unwrap_or_default() {
                grants.push(format!("{group}/{resource}: {}", rule.verbs.join(",")));
            }
        }
    }
    grants.sort();
    assert_eq!(
        grants,
        [
            "/endpoints: get,list,watch",
            "/events: create,patch",
            "/nodes: get,list,watch",
            "/services: get,list,watch",
            "discovery.k8s.io/endpointslices: get,list,watch",
            "events.k8s.io/events: create,patch",
        ],
        "least privilege: exactly these grants"
    );
    let (file, value) = find(&documents, "ClusterRoleBinding");
    let binding: ClusterRoleBinding = typed(file, value);
    assert_eq!(binding.role_ref.name, role.metadata.name.unwrap());
    let subject = &binding.subjects.unwrap()[0];
    assert_eq!(
        (subject.name.as_str(), subject.namespace.as_deref()),
        ("lb", namespace.metadata.name.as_deref())
    );

    let (file, value) = find(&documents, "DaemonSet");
    let daemonset: DaemonSet = typed(file, value);
    let pod = daemonset.spec.unwrap().template.spec.unwrap();
    assert_eq!(pod.host_network, Some(true));
    assert_eq!(pod.priority_class_name.as_deref(), Some("system-node-critical"));
    assert_eq!(pod.service_account_name.as_deref(), Some("lb"));
    let container = &pod.containers[0];
    let security = container.security_context.as_ref().unwrap();
    assert_ne!(security.privileged, Some(true), "capabilities, not a privileged container");
    let added = security.capabilities.as_ref().unwrap().add.clone().unwrap();
    for needed in ["BPF", "NET_ADMIN"] {
        assert!(added.iter().any(|c| c == needed), "{needed} missing from {added:?}");
    }
    let probe_path = |probe: &Option<k8s_openapi::api::core::v1::Probe>| {
        let get = probe.as_ref().unwrap().http_get.as_ref().unwrap();
        (get.path.clone().unwrap(), serde_json::to_value(&get.port).unwrap())
    };
    assert_eq!(probe_path(&container.liveness_probe), ("/livez".into(), Value::from(10256)));
    assert_eq!(probe_path(&container.readiness_probe), ("/healthz".into(), Value::from(10256)));
    let host_paths: Vec<String> =
        pod.volumes.unwrap().into_iter().filter_map(|v| Some(v.host_path?.path)).collect();
    assert_eq!(host_paths, ["/sys/fs/bpf", "/sys/fs/cgroup"]);
    let args = container.args.clone().unwrap();
    assert_eq!(args[0], "run");
    for needed in ["--hostname-override=$(NODE_NAME)", "--cgroup-path=/host/cgroup"] {
        assert!(args.iter().any(|a| a == needed), "{needed} missing from {args:?}");
    }
    let mounts = container.volume_mounts.clone().unwrap();
    assert!(mounts.iter().any(|m| m.mount_path == "/host/cgroup"), "{mounts:?}");
}
