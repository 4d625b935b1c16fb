//! Golden tests: Kubernetes YAML in, map contents (and reported errors) out.
//!
//! Each `testdata/<case>.yaml` is read as the only file of a manifest directory, through the
//! same source, pipeline and reconciler as `lb run` (in-memory maps); the result must equal
//! `testdata/<case>.golden`: the maps' contents, then what the CLI prints of them (`lb services`,
//! `lb endpoints`, and `lb explain` of a new flow from an in-cluster client to each frontend).
//! `UPDATE_GOLDEN=1` rewrites the golden files (review the diff before committing).

use std::path::{Path, PathBuf};

use lb_userspace::convert::{EndpointsSource, ProxyConfig};
use lb_userspace::dataplane::in_memory::InMemoryMaps;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use lb_userspace::dataplane::maps::MapsSnapshot;
use lb_userspace::dataplane::reconcile::{ProgrammedState, Reconciler, render_snapshot};
use lb_userspace::dataplane::{explain, status};
use lb_userspace::model::Protocol;
use lb_userspace::source::cluster_ip::ClusterIpAllocator;
use lb_userspace::source::manifests::ManifestObjects;
use lb_userspace::state::pipeline::{OnInvalid, Pipeline};

/// A case's configuration, from an optional first line `# config: node=NAME
/// service-proxy-name=NAME endpoints-api=endpoints cluster-ip-range=CIDR
/// node-addresses=IP,IP` (cluster-ip-range runs the manifests-mode ClusterIP allocator;
/// node-addresses are where NodePorts listen).
fn config_of(text: &str) -> (ProxyConfig, Option<ClusterIpAllocator>) {
    let mut config = ProxyConfig::default();
    let mut allocator = None;
    let Some(line) = text.lines().next().and_then(|l| l.strip_prefix("# config:")) else {
        return (config, allocator);
    };
    for setting in line.split_whitespace() {
        match setting.split_once('=') {
            Some(("node", name)) => config.node_name = Some(name.into()),
            Some(("service-proxy-name", name)) => config.service_proxy_name = Some(name.into()),
            Some(("endpoints-api", "endpoints")) => config.endpoints_source = EndpointsSource::Endpoints,
            Some(("node-addresses", list)) => {
                config.node_addresses = list.split(',').map(|ip| ip.parse().unwrap()).collect()
            }
            Some(("cluster-ip-range", range)) => {
                allocator = Some(ClusterIpAllocator::with_ranges(
                    &lb_userspace::source::cluster_ip::parse_ranges(range).unwrap(),
                ))
            }
            _ => panic!("unknown golden config {setting:?}"),
        }
    }
    (config, allocator)
}

fn render_case(yaml: &Path) -> String {
    let text = std::fs::read_to_string(yaml).unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join(yaml.file_name().unwrap()), &text).unwrap();
    // Errors name the file as it is in the repository.
    let label = |message: String| message.replace(&dir.path().display().to_string(), "testdata");
    let (config, allocator) = config_of(&text);
    let mut objects = ManifestObjects::new(dir.path(), allocator, None);
    let loaded = objects.reload_all();
    let mut errors: Vec<String> = loaded.errors.iter().map(|e| label(e.to_string())).collect();
    let mut pipeline = Pipeline::new(config, OnInvalid::KeepLast);
    for change in loaded.changes {
        let key = change.key();
        if let Err(error) = pipeline.apply(change) {
            let file = objects.file_of(&key).map(|f| f.display().to_string()).unwrap_or_default();
            errors.push(label(format!("{file}: {error}")));
        }
    }
    let warnings = pipeline.take_warnings();
    let changes = pipeline.take_changes();
    errors.extend(changes.errors.iter().map(ToString::to_string));
    let desired = pipeline.table().desired();
    let mut out = String::new();
    for error in &errors {
        out += &format!("error: {error}\n");
    }
    for warning in &warnings {
        out += &format!("warning: {warning}\n");
    }
    let mut reconciler = Reconciler::restore(InMemoryMaps::default()).unwrap();
    let report = reconciler.reconcile(desired);
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    out += &render_snapshot(&reconciler.maps().contents);
    for (port, check) in &desired.health_checks {
        out += &format!(
            "health check {port}: {}/{} local_endpoints={}\n",
            check.namespace, check.name, check.local_endpoints
        );
    }
    out + &render_cli(&reconciler.maps().contents)
}

/// What `lb services`, `lb endpoints` and `lb explain` print for these maps.
fn render_cli(snapshot: &MapsSnapshot) -> String {
    let mut out = String::from("\n$ lb services\n");
    out += &status::services_table(snapshot);
    out += "\n$ lb endpoints\n";
    let endpoints = status::service_endpoints(&ProgrammedState::from_snapshot(snapshot));
    out += &status::endpoints_table(endpoints.values(), true, false);
    for key in
        snapshot.services.keys().filter(|k| k.backend_slot == 0 && k.scope == lb_common::scope::EXTERNAL)
    {
        let Some(protocol) = Protocol::from_number(key.protocol) else { continue };
        let (client, snat_address) = match key.address() {
            IpAddr::V4(_) => (SocketAddr::from((Ipv4Addr::new(10, 0, 0, 2), 40000)), "192.168.0.1"),
            IpAddr::V6(_) => {
                (SocketAddr::from((Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 2), 40000)), "fd00::1")
            }
        };
        let facts = explain::FlowFacts {
            maglev_table_size: lb_userspace::dataplane::maglev::DEFAULT_TABLE_SIZE,
            snat_address: Some(snat_address.parse().unwrap()),
            ..Default::default()
        };
        let destination = SocketAddr::new(key.address(), key.port());
        let query = explain::Query { source: client, destination, protocol, external: false };
        out += &format!("\n$ lb explain {client} {destination}/{protocol}\n");
        out += &explain::render(&explain::explain(&query, snapshot, &facts));
    }
    out
}

#[test]
fn golden_cases() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/testdata");
    let mut cases: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    cases.sort();
    assert!(!cases.is_empty());
    let update = std::env::var_os("UPDATE_GOLDEN").is_some();
    let mut mismatches = Vec::new();
    for case in cases {
        let got = render_case(&case);
        let golden = case.with_extension("golden");
        if update {
            std::fs::write(&golden, &got).unwrap();
            continue;
        }
        let want = std::fs::read_to_string(&golden)
            .unwrap_or_else(|_| panic!("{} missing: run with UPDATE_GOLDEN=1", golden.display()));
        if got != want {
            mismatches.push(format!("{}:\n--- want\n{want}--- got\n{got}", case.display()));
        }
    }
    assert!(mismatches.is_empty(), "{}", mismatches.join("\n"));
}
