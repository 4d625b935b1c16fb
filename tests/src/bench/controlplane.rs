//! Control-plane cost: a full sync of N Services x 10 endpoints into the real BPF maps (from
//! objects in memory, from manifests, from the fake API server), the latency of one change
//! under that load, the daemon's memory, and the same sync work for iptables-restore and nft.

use std::collections::BTreeMap;
use std::collections::BTreeSet;
use std::io::Write as _;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use lb_userspace::convert::{self, ClusterObjects, ProxyConfig};
use lb_userspace::dataplane::datapath::{Capacity, Datapath};
use lb_userspace::dataplane::maps::BpfMaps;
use lb_userspace::dataplane::reconcile::Reconciler;
use lb_userspace::source::cluster::ClusterStore;
use lb_userspace::source::manifests::ManifestStore;
use serde::Serialize;

use super::rules::{self, BenchService};
use super::{cluster_ip, synthetic_endpoint};
use crate::apiserver::FakeApiServer;
use crate::playground::Playground;
use crate::{NetNs, PrivateBpfFs, unique};

pub const ENDPOINTS_PER_SERVICE: usize = 10;

#[derive(Clone, Debug, Serialize)]
pub struct SyncTime {
    pub services: usize,
    pub source: &'static str,
    /// Reading the source until it is complete (parse, list/watch); 0 for objects in memory.
    pub read_ms: f64,
    pub convert_ms: f64,
    pub reconcile_ms: f64,
    pub total_ms: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct ChangeLatency {
    pub services: usize,
    pub changes: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct RuleLoad {
    pub services: usize,
    pub mode: &'static str,
    /// `None` when skipped.
    pub ms: Option<f64>,
    pub note: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct Memory {
    pub services: usize,
    pub rss_mib: f64,
    pub map_mib: f64,
    pub startup_sync_ms: f64,
}

fn capacity(services: usize) -> Capacity {
    Capacity {
        service_slots: (services * (ENDPOINTS_PER_SERVICE + 1) + 4096) as u32,
        frontends: (services + 4096) as u32,
        backends: (services * ENDPOINTS_PER_SERVICE + 4096) as u32,
        flows: 65_536,
    }
}

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

/// N Services, each with one TCP port and 10 ready endpoints of its own.
pub fn objects(services: usize) -> ClusterObjects {
    let mut objects = ClusterObjects::default();
    for i in 0..services {
        let name = format!("svc-{i}");
        let meta = |name: String, labels: Option<BTreeMap<String, String>>| ObjectMeta {
            name: Some(name),
            namespace: Some("bench".into()),
            labels,
            ..Default::default()
        };
        objects.services.push(Service {
            metadata: meta(name.clone(), None),
            spec: Some(ServiceSpec {
                cluster_ip: Some(cluster_ip(i).to_string()),
                ports: Some(vec![ServicePort { name: Some("http".into()), port: 80, ..Default::default() }]),
                ..Default::default()
            }),
            ..Default::default()
        });
        let labels = BTreeMap::from([(convert::SERVICE_NAME_LABEL.to_string(), name.clone())]);
        objects.endpoint_slices.push(EndpointSlice {
            metadata: meta(format!("{name}-x"), Some(labels)),
            address_type: "IPv4".into(),
            ports: Some(vec![EndpointPort {
                name: Some("http".into()),
                port: Some(8080),
                ..Default::default()
            }]),
            endpoints: (0..ENDPOINTS_PER_SERVICE)
                .map(|j| Endpoint {
                    addresses: vec![synthetic_endpoint(i * ENDPOINTS_PER_SERVICE + j).to_string()],
                    conditions: Some(EndpointConditions { ready: Some(true), ..Default::default() }),
                    ..Default::default()
                })
                .collect(),
        });
    }
    objects
}

/// The same objects as one multi-document YAML manifest.
pub fn manifest(objects: &ClusterObjects) -> Result<String> {
    // k8s-openapi writes apiVersion and kind itself.
    let mut out = String::new();
    for service in &objects.services {
        out += "---\n";
        out += &serde_yaml_ng::to_string(service)?;
    }
    for slice in &objects.endpoint_slices {
        out += "---\n";
        out += &serde_yaml_ng::to_string(slice)?;
    }
    Ok(out)
}

fn fresh_reconciler(services: usize) -> Result<(Reconciler<BpfMaps>, Datapath, PrivateBpfFs)> {
    let bpffs = PrivateBpfFs::new()?;
    let mut datapath = Datapath::load_with(&bpffs.path().join("lb"), &capacity(services))?;
    let reconciler = Reconciler::restore(BpfMaps::from_ebpf(datapath.ebpf_mut())?)?;
    Ok((reconciler, datapath, bpffs))
}

/// Converts and reconciles; returns (convert, reconcile) times.
fn sync(reconciler: &mut Reconciler<BpfMaps>, objects: &ClusterObjects) -> Result<(Duration, Duration)> {
    let start = Instant::now();
    let (desired, errors) = convert::desired_state(objects, &ProxyConfig::default());
    anyhow::ensure!(errors.is_empty(), "conversion errors: {:?}", &errors[..errors.len().min(3)]);
    let converted = start.elapsed();
    let report = reconciler.reconcile(&desired);
    anyhow::ensure!(
        report.errors.is_empty(),
        "reconcile errors: {:?}",
        &report.errors[..report.errors.len().min(3)]
    );
    Ok((converted, start.elapsed() - converted))
}

/// Full sync from objects in memory, then `changes` single changes (an endpoint flipping
/// readiness), each converted and reconciled as lb does after a change.
pub fn sync_and_changes(services: usize, changes: usize) -> Result<(SyncTime, ChangeLatency)> {
    let mut objects = objects(services);
    let (mut reconciler, _datapath, _bpffs) = fresh_reconciler(services)?;
    let (convert, reconcile) = sync(&mut reconciler, &objects)?;
    let full = SyncTime {
        services,
        source: "objects in memory",
        read_ms: 0.0,
        convert_ms: ms(convert),
        reconcile_ms: ms(reconcile),
        total_ms: ms(convert + reconcile),
    };
    let mut latencies = Vec::with_capacity(changes);
    for change in 0..changes {
        let slice = &mut objects.endpoint_slices[(change * 7919) % services];
        let conditions = slice.endpoints[0].conditions.get_or_insert_with(Default::default);
        conditions.ready = Some(!conditions.ready.unwrap_or(true));
        let (convert, reconcile) = sync(&mut reconciler, &objects)?;
        latencies.push(convert + reconcile);
    }
    latencies.sort_unstable();
    let at = |p: f64| ms(latencies[((latencies.len() - 1) as f64 * p).round() as usize]);
    Ok((full, ChangeLatency { services, changes, p50_ms: at(0.5), p99_ms: at(0.99) }))
}

/// Full sync from a manifest directory: parse, convert, reconcile.
pub fn sync_from_manifests(services: usize, manifest_text: &str) -> Result<SyncTime> {
    let dir = std::env::temp_dir().join(unique("benchm"));
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("services.yaml"), manifest_text)?;
    let (mut reconciler, _datapath, _bpffs) = fresh_reconciler(services)?;
    let start = Instant::now();
    let mut store = ManifestStore::default();
    let errors = store.reload(&dir)?;
    anyhow::ensure!(errors.is_empty(), "manifest errors: {}", errors[0]);
    let objects = store.cluster_objects();
    let read = start.elapsed();
    let (convert, reconcile) = sync(&mut reconciler, &objects)?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(SyncTime {
        services,
        source: "manifests",
        read_ms: ms(read),
        convert_ms: ms(convert),
        reconcile_ms: ms(reconcile),
        total_ms: ms(read + convert + reconcile),
    })
}

/// Full sync from the fake API server through lb's kube-rs watchers.
pub fn sync_from_api_server(services: usize, objects: &ClusterObjects) -> Result<SyncTime> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let server = FakeApiServer::start(listener)?;
    for service in &objects.services {
        server.apply(serde_json::to_value(service)?);
    }
    for slice in &objects.endpoint_slices {
        server.apply(serde_json::to_value(slice)?);
    }
    let dir = std::env::temp_dir().join(unique("benchk"));
    std::fs::create_dir_all(&dir)?;
    let kubeconfig = server.write_kubeconfig(&dir)?;
    let (mut reconciler, _datapath, _bpffs) = fresh_reconciler(services)?;
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
    let store = Arc::new(Mutex::new(ClusterStore::default()));
    let start = Instant::now();
    let feed = store.clone();
    runtime.spawn(async move {
        let Ok(client) = lb_userspace::source::kube::client(Some(&kubeconfig)).await else { return };
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        lb_userspace::source::kube::spawn_watchers(client, &ProxyConfig::default(), tx);
        while let Some(event) = rx.recv().await {
            feed.lock().unwrap().apply(event);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(300);
    let listed = loop {
        {
            let store = store.lock().unwrap();
            if store.ready(Default::default()) {
                break store.objects();
            }
        }
        anyhow::ensure!(Instant::now() < deadline, "the watchers did not list everything within 300 s");
        std::thread::sleep(Duration::from_millis(5));
    };
    let read = start.elapsed();
    let (convert, reconcile) = sync(&mut reconciler, &listed)?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(SyncTime {
        services,
        source: "API server (list + watch)",
        read_ms: ms(read),
        convert_ms: ms(convert),
        reconcile_ms: ms(reconcile),
        total_ms: ms(read + convert + reconcile),
    })
}

/// Runs `program args` in `ns` with `input` on stdin; `None` if it outlived `bound`.
/// Runs `program` in `ns` with `input` on stdin; its run time, or `None` once it passes
/// `bound` (it is then killed).
pub fn timed_load(
    ns: &NetNs,
    program: &str,
    args: &[&str],
    input: &str,
    bound: Duration,
) -> Result<Option<Duration>> {
    let mut child = Command::new("ip")
        .args(["netns", "exec", &ns.name, program])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {program} (cargo xtask bench installs it)"))?;
    let start = Instant::now();
    // Both pipes on threads of their own, so a chatty program never blocks on a full pipe.
    let mut stdin = child.stdin.take().context("stdin")?;
    let input = input.to_string();
    std::thread::spawn(move || {
        let _ = stdin.write_all(input.as_bytes());
    });
    let mut stderr_pipe = child.stderr.take().context("stderr")?;
    let stderr = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = std::io::Read::read_to_string(&mut stderr_pipe, &mut text);
        text
    });
    loop {
        if let Some(status) = child.try_wait()? {
            let stderr = stderr.join().unwrap_or_default();
            anyhow::ensure!(status.success(), "{program} failed: {}", stderr.trim());
            return Ok(Some(start.elapsed()));
        }
        if start.elapsed() > bound {
            let _ = child.kill();
            let _ = child.wait();
            return Ok(None);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// kube-proxy's rules for the same Services, loaded with one iptables-restore and one nft -f
/// call each, in a namespace of their own.
/// A mode in `too_slow` (over the bound at a smaller size) is not tried again: rule loads grow
/// faster than linearly, so it would only spend the bound once more.
pub fn rule_loads(
    services: usize,
    objects: &ClusterObjects,
    bound: Duration,
    too_slow: &mut BTreeSet<&'static str>,
) -> Result<Vec<RuleLoad>> {
    let bench: Vec<BenchService> = objects
        .services
        .iter()
        .zip(&objects.endpoint_slices)
        .map(|(service, slice)| BenchService {
            name: format!("bench/{}:http", service.metadata.name.as_deref().unwrap_or_default()),
            cluster_ip: service.spec.as_ref().and_then(|s| s.cluster_ip.as_ref()).unwrap().parse().unwrap(),
            protocol: "tcp",
            port: 80,
            endpoints: slice.endpoints.iter().map(|e| (e.addresses[0].parse().unwrap(), 8080)).collect(),
        })
        .collect();
    let ns = NetNs::new(unique("rules"))?;
    let mut loads = Vec::new();
    for (mode, program, args, text) in [
        ("iptables", "iptables-restore", vec!["--noflush"], rules::iptables_restore(&bench, true)),
        ("nftables", "nft", vec!["-f", "-"], rules::nft_ruleset(&bench)),
    ] {
        if too_slow.contains(mode) {
            loads.push(RuleLoad {
                services,
                mode,
                ms: None,
                note: format!("skipped: over {} s at a smaller size", bound.as_secs()),
            });
            continue;
        }
        let took = timed_load(&ns, program, &args, &text, bound)?;
        if took.is_none() {
            too_slow.insert(mode);
        }
        loads.push(RuleLoad {
            services,
            mode,
            ms: took.map(ms),
            note: match took {
                Some(_) => String::new(),
                None => format!("skipped: loading took over {} s", bound.as_secs()),
            },
        });
    }
    Ok(loads)
}

/// lb's resident memory and map memory once it has synced `services` from manifests.
pub fn daemon_memory(services: usize, manifest_text: &str) -> Result<Memory> {
    let mut pg = Playground::new(&unique("mem"), &[])?;
    pg.write_manifest("services.yaml", manifest_text)?;
    let capacity = capacity(services);
    let manifests = pg.manifests.clone();
    let args: Vec<std::ffi::OsString> = vec![
        "--manifests".into(),
        manifests.into_os_string(),
        "--max-service-slots".into(),
        capacity.service_slots.to_string().into(),
        "--max-backends".into(),
        capacity.backends.to_string().into(),
        "--max-frontends".into(),
        capacity.frontends.to_string().into(),
        "--healthz-bind-address".into(),
        "".into(),
    ];
    let refs: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_os_str()).collect();
    let start = Instant::now();
    pg.start_lb_with(&refs)?;
    let synced = format!("synced frontends={services} programmed={services}");
    while !pg.lb_log().contains(&synced) {
        anyhow::ensure!(
            start.elapsed() < Duration::from_secs(600),
            "lb did not sync within 600 s:\n{}",
            pg.lb_log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let startup_sync = start.elapsed();
    let pid = pg.lb_pid().context("lb pid")?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let rss_kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("VmRSS")?;
    let mut map_bytes = 0.0;
    for entry in std::fs::read_dir(format!("/proc/{pid}/fdinfo"))? {
        let info = std::fs::read_to_string(entry?.path()).unwrap_or_default();
        if info.contains("map_type:") {
            map_bytes += info
                .lines()
                .find_map(|l| l.strip_prefix("memlock:"))
                .and_then(|v| v.trim().parse::<f64>().ok())
                .unwrap_or(0.0);
        }
    }
    pg.stop_lb()?;
    Ok(Memory {
        services,
        rss_mib: rss_kib / 1024.0,
        map_mib: map_bytes / 1048576.0,
        startup_sync_ms: ms(startup_sync),
    })
}
