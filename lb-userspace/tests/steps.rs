//! Step-wise golden tests: a script of changes to a manifest directory, with the maps expected
//! after each step, through the same source, pipeline and incremental reconcile as `lb run`.
//!
//! Each `steps/<case>.txtar` has an optional first line `# config: ...` (as the golden tests),
//! free text, then sections:
//! - `-- file: NAME --` writes the lines that follow as the directory's file NAME;
//! - `-- remove: NAME --` removes it;
//! - `-- node-addresses --` sets the node addresses NodePorts listen on (the line that follows,
//!   comma-separated; empty for none);
//! - `-- expect --` takes in the changed files and checks the maps (rendered as in the golden
//!   tests) against the lines that follow.
//!
//! `UPDATE_GOLDEN=1` rewrites the expected sections (review the diff before committing).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use lb_userspace::convert::ProxyConfig;
use lb_userspace::dataplane::audit;
use lb_userspace::dataplane::in_memory::InMemoryMaps;
use lb_userspace::dataplane::maps::ServiceMaps;
use lb_userspace::dataplane::reconcile::{Reconciler, render_snapshot};
use lb_userspace::source::cluster_ip::ClusterIpAllocator;
use lb_userspace::source::manifests::ManifestObjects;
use lb_userspace::state::pipeline::{OnInvalid, Pipeline};

fn config_of(text: &str) -> (ProxyConfig, Option<ClusterIpAllocator>) {
    let mut config = ProxyConfig::default();
    let mut allocator = None;
    let Some(line) = text.lines().next().and_then(|l| l.strip_prefix("# config:")) else {
        return (config, allocator);
    };
    for setting in line.split_whitespace() {
        match setting.split_once('=') {
            Some(("node", name)) => config.node_name = Some(name.into()),
            Some(("node-addresses", list)) => {
                config.node_addresses = list.split(',').map(|ip| ip.parse().unwrap()).collect()
            }
            Some(("cluster-ip-range", range)) => {
                allocator = Some(ClusterIpAllocator::with_ranges(
                    &lb_userspace::source::cluster_ip::parse_ranges(range).unwrap(),
                ))
            }
            _ => panic!("unknown config {setting:?}"),
        }
    }
    (config, allocator)
}

enum Section {
    File(String),
    Remove(String),
    NodeAddresses,
    Expect,
}

fn section_of(line: &str) -> Option<Section> {
    let inner = line.strip_prefix("-- ")?.strip_suffix(" --")?;
    Some(match inner.split_once(": ") {
        Some(("file", name)) => Section::File(name.to_string()),
        Some(("remove", name)) => Section::Remove(name.to_string()),
        _ if inner == "node-addresses" => Section::NodeAddresses,
        _ if inner == "expect" => Section::Expect,
        _ => panic!("unknown section {line:?}"),
    })
}

/// Runs a script; returns it with each `expect` section as the maps were (and the mismatches).
fn run(script: &Path) -> (String, Vec<String>) {
    let text = std::fs::read_to_string(script).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (config, allocator) = config_of(&text);
    let mut objects = ManifestObjects::new(dir.path(), allocator, None);
    let mut pipeline = Pipeline::new(config, OnInvalid::KeepLast);
    let mut reconciler = Reconciler::restore(InMemoryMaps::default()).unwrap();
    let mut changed: BTreeSet<PathBuf> = BTreeSet::new();
    let mut out = String::new();
    let mut mismatches = Vec::new();

    // Sections with their bodies.
    let mut sections: Vec<(Option<Section>, String, Vec<String>)> = vec![(None, String::new(), Vec::new())];
    for line in text.lines() {
        match section_of(line) {
            Some(section) => sections.push((Some(section), line.to_string(), Vec::new())),
            None => sections.last_mut().unwrap().2.push(line.to_string()),
        }
    }
    for (step, (section, header, body)) in sections.into_iter().enumerate() {
        if !header.is_empty() {
            out += &header;
            out += "\n";
        }
        match section {
            None => body.iter().for_each(|line| out += &format!("{line}\n")),
            Some(Section::File(name)) => {
                std::fs::write(dir.path().join(&name), body.join("\n") + "\n").unwrap();
                changed.insert(dir.path().join(name));
                body.iter().for_each(|line| out += &format!("{line}\n"));
            }
            Some(Section::Remove(name)) => {
                std::fs::remove_file(dir.path().join(&name)).unwrap();
                changed.insert(dir.path().join(name));
                body.iter().for_each(|line| out += &format!("{line}\n"));
            }
            Some(Section::NodeAddresses) => {
                let addresses = body.first().map(String::as_str).unwrap_or_default();
                pipeline.set_node_addresses(
                    addresses.split(',').filter(|a| !a.is_empty()).map(|ip| ip.parse().unwrap()).collect(),
                );
                body.iter().for_each(|line| out += &format!("{line}\n"));
            }
            Some(Section::Expect) => {
                let loaded = objects.reload_files(std::mem::take(&mut changed));
                let mut got = String::new();
                for error in &loaded.errors {
                    got += &format!(
                        "error: {}\n",
                        error.to_string().replace(&dir.path().display().to_string(), "dir")
                    );
                }
                for change in loaded.changes {
                    if let Err(error) = pipeline.apply(change) {
                        got += &format!("error: {error}\n");
                    }
                }
                let changes = pipeline.take_changes();
                for error in &changes.errors {
                    got += &format!("error: {error}\n");
                }
                let report = reconciler.reconcile_frontends(pipeline.table().desired(), &changes.frontends);
                assert!(report.errors.is_empty(), "step {step}: {:?}", report.errors);
                let snapshot = reconciler.maps().snapshot_with_maglev().unwrap();
                let violations = audit::settled(&snapshot);
                assert!(violations.is_empty(), "step {step}: {violations:#?}");
                got += &render_snapshot(&snapshot);
                for (port, check) in &pipeline.table().desired().health_checks {
                    got += &format!(
                        "health check {port}: {}/{} local_endpoints={}\n",
                        check.namespace, check.name, check.local_endpoints
                    );
                }
                let want: String = body.iter().filter(|l| !l.is_empty()).map(|l| format!("{l}\n")).collect();
                if got != want {
                    mismatches
                        .push(format!("{} step {step}:\n--- want\n{want}--- got\n{got}", script.display()));
                }
                out += &got;
                out += "\n";
            }
        }
    }
    (out, mismatches)
}

#[test]
fn step_wise_cases() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/steps");
    let mut cases: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "txtar"))
        .collect();
    cases.sort();
    assert!(cases.len() >= 4, "{cases:?}");
    let update = std::env::var_os("UPDATE_GOLDEN").is_some();
    let mut mismatches = Vec::new();
    for case in cases {
        let (out, found) = run(&case);
        if update {
            std::fs::write(&case, out).unwrap();
        } else {
            mismatches.extend(found);
        }
    }
    assert!(mismatches.is_empty(), "{}", mismatches.join("\n"));
}
