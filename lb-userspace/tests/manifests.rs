//! The manifest directory as a source: reloads, and what happens to bad files and objects.

use std::path::Path;

use lb_userspace::convert::ProxyConfig;
use lb_userspace::source::manifests::{Loaded, ManifestObjects, ManifestStore};
use lb_userspace::state::pipeline::{OnInvalid, Pipeline};

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

/// A manifest directory through the source and the pipeline, as `lb run` reads it.
struct Directory {
    objects: ManifestObjects,
    pipeline: Pipeline,
}

impl Directory {
    fn new(dir: &Path) -> Self {
        Self {
            objects: ManifestObjects::new(dir, None, None),
            pipeline: Pipeline::new(ProxyConfig::default(), OnInvalid::KeepLast),
        }
    }

    /// Takes in what a read found; returns the problems, each naming its file.
    fn take(&mut self, loaded: Loaded) -> Vec<String> {
        let mut errors: Vec<String> = loaded.errors.iter().map(ToString::to_string).collect();
        for change in loaded.changes {
            let key = change.key();
            if let Err(error) = self.pipeline.apply(change) {
                let file = self.objects.file_of(&key).map(|f| f.display().to_string()).unwrap_or_default();
                errors.push(format!("{file}: {error}"));
            }
        }
        errors
    }

    fn reload(&mut self) -> Vec<String> {
        let loaded = self.objects.reload_all();
        self.take(loaded)
    }

    fn reload_file(&mut self, dir: &Path, name: &str) -> Vec<String> {
        let loaded = self.objects.reload_files([dir.join(name)]);
        self.take(loaded)
    }

    fn backends(&mut self) -> Vec<String> {
        self.pipeline.take_changes();
        let desired = self.pipeline.table().desired();
        desired.frontends.values().flat_map(|f| f.backends.iter().map(|b| b.to_string())).collect()
    }
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
    let mut directory = Directory::new(dir.path());
    assert!(directory.reload().is_empty());
    assert_eq!(directory.backends(), ["10.244.1.1:8080/TCP", "10.244.1.2:8080/TCP"]);

    // File by file, as the watcher reports them.
    write(dir.path(), "slice.yaml", &slice(&["10.244.1.2"]));
    directory.reload_file(dir.path(), "slice.yaml");
    assert_eq!(directory.backends(), ["10.244.1.2:8080/TCP"]);

    std::fs::remove_file(dir.path().join("slice.yaml")).unwrap();
    directory.reload_file(dir.path(), "slice.yaml");
    assert!(directory.backends().is_empty());
    std::fs::remove_file(dir.path().join("svc.yaml")).unwrap();
    directory.reload_file(dir.path(), "svc.yaml");
    assert!(directory.pipeline.table().services().next().is_none());

    // Or the whole directory at once, after lost events.
    write(dir.path(), "svc.yaml", SERVICE);
    write(dir.path(), "slice.yaml", &slice(&["10.244.1.5"]));
    assert!(directory.reload().is_empty());
    assert_eq!(directory.backends(), ["10.244.1.5:8080/TCP"]);
}

#[test]
fn only_objects_whose_text_changed_are_handed_on() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "svc.yaml", SERVICE);
    write(dir.path(), "slice.yaml", &slice(&["10.244.1.1"]));
    let mut store = ManifestStore::default();
    assert_eq!(store.reload_all(dir.path()).unwrap().changes.len(), 2);
    // Rewritten unchanged, and read again whole: nothing to hand on.
    write(dir.path(), "slice.yaml", &slice(&["10.244.1.1"]));
    assert!(store.reload_all(dir.path()).unwrap().changes.is_empty());
    write(dir.path(), "slice.yaml", &slice(&["10.244.1.2"]));
    let reload = store.reload_files([dir.path().join("slice.yaml")]);
    assert_eq!(reload.changes.len(), 1);
    // An object defined in two files: the first file by name wins, the other takes over when
    // it goes.
    write(dir.path(), "a-svc.yaml", &SERVICE.replace("10.96.0.10", "10.96.0.11"));
    let reload = store.reload_files([dir.path().join("a-svc.yaml")]);
    assert_eq!(reload.changes.len(), 1, "a-svc.yaml now wins");
    std::fs::remove_file(dir.path().join("a-svc.yaml")).unwrap();
    let reload = store.reload_files([dir.path().join("a-svc.yaml")]);
    assert_eq!(reload.changes.len(), 1, "svc.yaml's version is back");
    assert_eq!(store.file_of(&reload.changes[0].key()), Some(dir.path().join("svc.yaml").as_path()));
}

#[test]
fn a_broken_file_keeps_its_last_good_objects_and_the_error_names_it() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "svc.yaml", SERVICE);
    write(dir.path(), "slice.yaml", &slice(&["10.244.1.1"]));
    let mut directory = Directory::new(dir.path());
    directory.reload();

    // Not YAML at all: the whole file keeps its previous objects.
    write(dir.path(), "slice.yaml", "endpoints: [unclosed");
    let errors = directory.reload_file(dir.path(), "slice.yaml");
    assert_eq!(errors.len(), 1);
    assert!(errors[0].contains("slice.yaml") && errors[0].contains("invalid YAML"), "{errors:?}");
    assert_eq!(directory.backends(), ["10.244.1.1:8080/TCP"]);

    // A bad address in an otherwise valid slice: that object keeps its previous version.
    write(dir.path(), "slice.yaml", &slice(&["10.244.1.300"]));
    let errors = directory.reload_file(dir.path(), "slice.yaml");
    assert!(
        errors[0].contains("slice.yaml")
            && errors[0].contains("EndpointSlice default/web-1")
            && errors[0].contains("10.244.1.300"),
        "{errors:?}"
    );
    assert_eq!(directory.backends(), ["10.244.1.1:8080/TCP"]);

    // Fixed: the new version takes over.
    write(dir.path(), "slice.yaml", &slice(&["10.244.1.3"]));
    assert!(directory.reload_file(dir.path(), "slice.yaml").is_empty());
    assert_eq!(directory.backends(), ["10.244.1.3:8080/TCP"]);
}

#[test]
fn a_missing_directory_is_an_error_naming_it() {
    let mut store = ManifestStore::default();
    let error = store.reload_all(Path::new("/nonexistent/lb-manifests")).unwrap_err();
    assert!(error.to_string().contains("/nonexistent/lb-manifests"), "{error}");
}
