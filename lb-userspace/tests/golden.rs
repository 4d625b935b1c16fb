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
use lb_userspace::dataplane::{conntrack, explain, status};
use lb_userspace::model::{DesiredState, Protocol};
use lb_userspace::source::cluster_ip::ClusterIpAllocator;
use lb_userspace::source::manifests::ManifestObjects;
use lb_userspace::state::pipeline::{OnInvalid, Pipeline};
use std::collections::BTreeMap;

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

/// A case's YAML through the source, pipeline and reconciler: the errors and warnings (as
/// golden lines), the reconciler holding the programmed maps, and the desired state.
fn program_case(yaml: &Path) -> (String, Reconciler<InMemoryMaps>, DesiredState) {
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
    let desired = pipeline.table().desired().clone();
    let mut out = String::new();
    for error in &errors {
        out += &format!("error: {error}\n");
    }
    for warning in &warnings {
        out += &format!("warning: {warning}\n");
    }
    let mut reconciler = Reconciler::restore(InMemoryMaps::default()).unwrap();
    let report = reconciler.reconcile(&desired);
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    (out, reconciler, desired)
}

fn render_case(yaml: &Path) -> String {
    let (mut out, reconciler, desired) = program_case(yaml);
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
    out += &status::services_table(snapshot, false);
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

/// Compares `got` with the golden file (or, with `UPDATE_GOLDEN`, rewrites it): the mismatch.
fn against_golden(golden: &Path, got: &str) -> Option<String> {
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(golden, got).unwrap();
        return None;
    }
    let want = std::fs::read_to_string(golden)
        .unwrap_or_else(|_| panic!("{} missing: run with UPDATE_GOLDEN=1", golden.display()));
    (got != want).then(|| format!("{}:\n--- want\n{want}--- got\n{got}", golden.display()))
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
    let mismatches: Vec<String> = cases
        .iter()
        .filter_map(|case| against_golden(&case.with_extension("golden"), &render_case(case)))
        .collect();
    assert!(mismatches.is_empty(), "{}", mismatches.join("\n"));
}

fn pretty(value: &impl serde::Serialize) -> String {
    serde_json::to_string_pretty(value).unwrap() + "\n"
}

/// Every output of the CLI (each command, each `-o`, `--watch`'s lines) over the maps of
/// `testdata/cli/session.yaml`; what the maps do not hold (traffic, tracked flows, affinity,
/// counters) is given as the commands would read it.
#[test]
fn cli_session() {
    let case = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/testdata/cli/session.yaml");
    let (errors, mut reconciler, desired) = program_case(&case);
    assert!(errors.is_empty(), "{errors}");
    let snapshot = reconciler.maps().contents.clone();
    let mut out = String::new();
    let mut command = |line: &str, printed: String| out += &format!("$ {line}\n{printed}\n");

    command("lb services", status::services_table(&snapshot, false));
    command("lb services -o wide", status::services_table(&snapshot, true));
    command("lb services -o json", pretty(&status::services_rows(&snapshot)));

    let endpoints_of = |snapshot: &MapsSnapshot, only: Option<&str>| {
        let mut services = status::service_endpoints(&ProgrammedState::from_snapshot(snapshot));
        services.retain(|name, _| only.is_none_or(|only| name == only));
        services
    };
    let all = endpoints_of(&snapshot, None);
    command("lb endpoints", status::endpoints_table(all.values(), true, false));
    command("lb endpoints -o wide", status::endpoints_table(all.values(), true, true));
    command("lb endpoints -o json", status::watch_lines(&BTreeMap::new(), &all, true, false, true));
    let demo = Some("default/alpaca-prod");
    let first = endpoints_of(&snapshot, demo);
    command("lb endpoints default/alpaca-prod", status::endpoints_table(first.values(), false, false));
    // --watch while node-b's pods go and come back, then the Service is deleted and created
    // again.
    let mut watch = status::endpoints_table(first.values(), false, false);
    let mut watch_json = status::watch_lines(&BTreeMap::new(), &first, false, false, true);
    let mut without_node_b = desired.clone();
    for frontend in without_node_b.frontends.values_mut().filter(|f| f.service.name == "alpaca-prod") {
        frontend.backends.retain(|b| b.ip.to_string().starts_with("10.244.1."));
    }
    let mut removed = desired.clone();
    removed.frontends.retain(|_, f| f.service.name != "alpaca-prod");
    let mut last = first;
    for step in [&without_node_b, &desired, &removed, &desired] {
        assert!(reconciler.reconcile(step).errors.is_empty());
        let now = endpoints_of(&reconciler.maps().contents, demo);
        watch += &status::watch_lines(&last, &now, false, false, false);
        watch_json += &status::watch_lines(&last, &now, false, false, true);
        last = now;
    }
    command("lb endpoints default/alpaca-prod --watch", watch);
    command("lb endpoints default/alpaca-prod --watch -o json", watch_json);

    let facts = explain::FlowFacts {
        maglev_table_size: lb_userspace::dataplane::maglev::DEFAULT_TABLE_SIZE,
        snat_address: Some("192.168.50.1".parse().unwrap()),
        ..Default::default()
    };
    let query = |source: &str, destination: &str, external: bool| explain::Query {
        source: source.parse().unwrap(),
        destination: destination.parse().unwrap(),
        protocol: Protocol::Tcp,
        external,
    };
    let mut explain_command = |line: &str, query: explain::Query, facts: &explain::FlowFacts, json: bool| {
        let explanation = explain::explain(&query, &snapshot, facts);
        command(line, if json { pretty(&explanation) } else { explain::render(&explanation) });
    };
    let new_flow = query("10.0.0.2:40000", "10.96.0.80:80", false);
    explain_command("lb explain 10.0.0.2:40000 10.96.0.80:80/TCP", new_flow, &facts, false);
    explain_command("lb explain 10.0.0.2:40000 10.96.0.80:80/TCP -o json", new_flow, &facts, true);
    let tracked = |destination: &str, state: u8, flags: u16, reply: bool, source: &str| explain::FlowFacts {
        tracked: Some(explain::TrackedFlow {
            source: source.parse().unwrap(),
            destination: destination.parse().unwrap(),
            reply,
            state,
            flags,
        }),
        ..facts.clone()
    };
    use lb_common::{conntrack_flags, conntrack_state};
    explain_command(
        "lb explain 10.0.0.2:40000 10.96.0.80:80/TCP    # the flow is tracked",
        new_flow,
        &tracked("10.244.2.13:8080", conntrack_state::TCP_ESTABLISHED, 0, false, "10.0.0.2:40000"),
        false,
    );
    explain_command(
        "lb explain 10.0.0.2:40000 10.96.0.80:80/TCP    # its backend is gone",
        new_flow,
        &tracked(
            "10.244.2.13:8080",
            conntrack_state::TCP_ESTABLISHED,
            conntrack_flags::BACKEND_GONE,
            false,
            "10.0.0.2:40000",
        ),
        false,
    );
    explain_command(
        "lb explain 10.244.2.13:8080 10.0.0.2:40000/TCP    # its reply",
        query("10.244.2.13:8080", "10.0.0.2:40000", false),
        &tracked(
            "10.0.0.2:40000",
            conntrack_state::TCP_ESTABLISHED,
            conntrack_flags::REPLY,
            true,
            "10.96.0.80:80",
        ),
        false,
    );
    let shop_backend =
        snapshot.backends.iter().find(|(_, b)| b.ip.to_string() == "10.244.2.22").map(|(id, _)| *id).unwrap();
    let affinity = explain::FlowFacts {
        affinity: Some((lb_common::AffinityValue { backend_id: shop_backend, _pad: 0, last_used_ns: 0 }, 42)),
        ..facts.clone()
    };
    explain_command(
        "lb explain 198.51.100.7:50000 192.0.2.10:443/TCP --external",
        query("198.51.100.7:50000", "192.0.2.10:443", true),
        &affinity,
        false,
    );
    explain_command(
        "lb explain 203.0.113.5:50000 192.0.2.10:443/TCP --external",
        query("203.0.113.5:50000", "192.0.2.10:443", true),
        &facts,
        false,
    );
    explain_command(
        "lb explain 10.0.0.2:40000 10.96.0.80:80/TCP    # a flow from this port reaches its backend through another frontend",
        new_flow,
        &explain::FlowFacts { reply_tuple_taken: true, ..facts.clone() },
        false,
    );
    explain_command(
        "lb explain 10.0.0.2:40000 10.96.0.99:80/TCP",
        query("10.0.0.2:40000", "10.96.0.99:80", false),
        &facts,
        false,
    );

    // What the per-CPU counters would hold after some traffic.
    let services = [
        status::ServiceStats {
            service: "default/alpaca-prod:http".into(),
            frontend_type: "ClusterIP".into(),
            new_flows: 25,
            packets: 150,
            bytes: 10_350,
            reply_packets: 125,
            reply_bytes: 38_975,
        },
        status::ServiceStats {
            service: "store/shop:https".into(),
            frontend_type: "LoadBalancer".into(),
            new_flows: 3,
            packets: 30,
            bytes: 4_200,
            reply_packets: 27,
            reply_bytes: 90_000,
        },
    ];
    let counters: Vec<(&str, u64)> =
        lb_common::counters::NAMES.iter().enumerate().map(|(i, name)| (*name, (i as u64 * 7) % 5)).collect();
    let collector: Vec<(&str, u64)> =
        lb_common::stats::NAMES.iter().enumerate().map(|(i, name)| (*name, i as u64 * 3)).collect();
    command("lb stats", status::stats_table(&services, &counters));
    command("lb stats -o json", pretty(&status::stats_json(&services, &counters)));
    command("lb counters", status::counters_text(&counters, &collector));
    command("lb counters -o json", pretty(&status::counters_json(&counters, &collector)));

    let flows = [
        conntrack::FlowRow {
            protocol: "TCP",
            client: "10.0.0.2:40000".into(),
            frontend: "10.96.0.80:80".into(),
            backend: "10.244.2.13:8080".into(),
            snat: None,
            state: "ESTABLISHED",
            backend_gone: false,
            age_seconds: 75,
            idle_seconds: 2,
            service: Some("default/alpaca-prod:http".into()),
        },
        conntrack::FlowRow {
            protocol: "TCP",
            client: "198.51.100.7:50000".into(),
            frontend: "192.0.2.10:443".into(),
            backend: "10.244.2.22:8443".into(),
            snat: Some("192.168.50.1:61000".into()),
            state: "CLOSING",
            backend_gone: true,
            age_seconds: 3_600,
            idle_seconds: 40,
            service: Some("store/shop:https".into()),
        },
    ];
    command("lb conntrack", conntrack::flows_table(&flows));
    command("lb conntrack -o json", pretty(&flows));

    let golden = case.with_extension("golden");
    if let Some(mismatch) = against_golden(&golden, &out) {
        panic!("{mismatch}");
    }
}
