//! The manifest directory as a source: reloads, and what happens to bad files and objects.

use std::path::Path;

use lb_userspace::convert;
use lb_userspace::source::manifests::ManifestStore;

const SERVICE: &str = "apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  clusterIP: 10.96.0.10
  ports: [{name: http, port: 80}]
";

fn slice(addresses: &[&str]) -> String {
    let endpoints: Vec<String> = addresses.iter().map(|a| format!("  - addresses: [\"{a}\"]\n")).collect();
    format!(
        "apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-1
  labels: {{kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{{name: http, port: 8080}}]
endpoints:
{}",
        endpoints.concat()
    )
}

fn backends(store: &ManifestStore) -> Vec<String> {
    let (state, _) = convert::desired_state(&store.cluster_objects(), &convert::ProxyConfig::default());
    state.frontends.values().flat_map(|f| f.backends.iter().map(|b| b.to_string())).collect()
}

fn write(dir: &Path, name: &str, text: &str) {
    std::fs::write(dir.join(name), text).unwrap();
}

#[test]
fn edits_additions_and_deletions_are_picked_up() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "svc.yaml", SERVICE);
    write(dir.path(), "slice.yaml", &slice(&["10.244.1.1", "10.244.1.2"]));
    write(dir.path(), "notes.txt", "not a manifest");
    let mut store = ManifestStore::default();
    assert!(store.reload(dir.path()).unwrap().is_empty());
    assert_eq!(backends(&store), ["10.244.1.1:8080/TCP", "10.244.1.2:8080/TCP"]);

    write(dir.path(), "slice.yaml", &slice(&["10.244.1.2"]));
    store.reload(dir.path()).unwrap();
    assert_eq!(backends(&store), ["10.244.1.2:8080/TCP"]);

    std::fs::remove_file(dir.path().join("slice.yaml")).unwrap();
    store.reload(dir.path()).unwrap();
    assert!(backends(&store).is_empty());
    std::fs::remove_file(dir.path().join("svc.yaml")).unwrap();
    store.reload(dir.path()).unwrap();
    assert_eq!(store.objects().count(), 0);
}

#[test]
fn a_broken_file_keeps_its_last_good_objects_and_the_error_names_it() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "svc.yaml", SERVICE);
    write(dir.path(), "slice.yaml", &slice(&["10.244.1.1"]));
    let mut store = ManifestStore::default();
    store.reload(dir.path()).unwrap();

    // Not YAML at all: the whole file keeps its previous objects.
    write(dir.path(), "slice.yaml", "endpoints: [unclosed");
    let errors = store.reload(dir.path()).unwrap();
    assert_eq!(errors.len(), 1);
    let message = errors[0].to_string();
    assert!(message.contains("slice.yaml") && message.contains("invalid YAML"), "{message}");
    assert_eq!(backends(&store), ["10.244.1.1:8080/TCP"]);

    // A bad address in an otherwise valid slice: that object keeps its previous version.
    write(dir.path(), "slice.yaml", &slice(&["10.244.1.300"]));
    let errors = store.reload(dir.path()).unwrap();
    let message = errors[0].to_string();
    assert!(
        message.contains("slice.yaml")
            && message.contains("EndpointSlice default/web-1")
            && message.contains("10.244.1.300"),
        "{message}"
    );
    assert_eq!(backends(&store), ["10.244.1.1:8080/TCP"]);

    // Fixed: the new version takes over.
    write(dir.path(), "slice.yaml", &slice(&["10.244.1.3"]));
    assert!(store.reload(dir.path()).unwrap().is_empty());
    assert_eq!(backends(&store), ["10.244.1.3:8080/TCP"]);
}

#[test]
fn a_missing_directory_is_an_error_naming_it() {
    let mut store = ManifestStore::default();
    let error = store.reload(Path::new("/nonexistent/lb-manifests")).unwrap_err();
    assert!(error.to_string().contains("/nonexistent/lb-manifests"), "{error}");
}
