//! Control-plane cost: a full sync of N Services x 10 endpoints into the real BPF maps (from
//! objects in memory, from manifests, from the fake API server), the latency of one change
//! under that load (from the event reaching lb, from a file replaced, from an API change), the
//! daemon's memory, and the same sync work for iptables-restore and nft.

use std::collections::BTreeMap;
use std::collections::BTreeSet;
use std::io::Write as _;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use lb_common::{PROTOCOL_TCP, ServiceKey, ServiceValue};
use lb_userspace::convert::{self, ClusterObjects, ProxyConfig};
use lb_userspace::dataplane::datapath::{Capacity, Datapath};
use lb_userspace::dataplane::maps::BpfMaps;
use lb_userspace::dataplane::reconcile::Reconciler;
use lb_userspace::source::cluster::ClusterStore;
use lb_userspace::source::manifests::ManifestObjects;
use lb_userspace::source::{Object, ObjectChange};
use lb_userspace::state::pipeline::{OnInvalid, Pipeline};
use serde::Serialize;

use super::rules::{self, BenchService};
use super::{cluster_ip, synthetic_endpoint};
use crate::apiserver::FakeApiServer;
use crate::playground::Playground;
use crate::{NetNs, PrivateBpfFs, unique};

pub const ENDPOINTS_PER_SERVICE: usize = 10;
/// Services per manifest file (the changed one has a file of its own).
pub const SERVICES_PER_FILE: usize = 1_000;

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
    /// Where the change starts and what is timed.
    pub source: &'static str,
    pub changes: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
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
    /// Resident memory once synced and after the changes.
    pub rss_mib: f64,
    /// The most it was resident at any time (VmHWM).
    pub peak_rss_mib: f64,
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

fn latency(services: usize, source: &'static str, mut latencies: Vec<Duration>) -> ChangeLatency {
    latencies.sort_unstable();
    let at = |p: f64| ms(latencies[((latencies.len() - 1) as f64 * p).round() as usize]);
    ChangeLatency {
        services,
        source,
        changes: latencies.len(),
        p50_ms: at(0.5),
        p99_ms: at(0.99),
        max_ms: at(1.0),
    }
}

/// N Services, each with one TCP port and 10 ready endpoints of its own.
pub fn objects(services: usize) -> ClusterObjects {
    let mut objects = ClusterObjects::default();
    for i in 0..services {
        objects.services.push(service(i));
        objects.endpoint_slices.push(slice(i, ENDPOINTS_PER_SERVICE));
    }
    objects
}

fn meta(name: String, labels: Option<BTreeMap<String, String>>) -> ObjectMeta {
    ObjectMeta { name: Some(name), namespace: Some("bench".into()), labels, ..Default::default() }
}

fn service(i: usize) -> Service {
    Service {
        metadata: meta(format!("svc-{i}"), None),
        spec: Some(ServiceSpec {
            cluster_ip: Some(cluster_ip(i).to_string()),
            ports: Some(vec![ServicePort { name: Some("http".into()), port: 80, ..Default::default() }]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Service `i`'s slice with its first `endpoints` endpoints.
fn slice(i: usize, endpoints: usize) -> EndpointSlice {
    let name = format!("svc-{i}");
    let labels = BTreeMap::from([(convert::SERVICE_NAME_LABEL.to_string(), name.clone())]);
    EndpointSlice {
        metadata: meta(format!("{name}-x"), Some(labels)),
        address_type: "IPv4".into(),
        ports: Some(vec![EndpointPort { name: Some("http".into()), port: Some(8080), ..Default::default() }]),
        endpoints: (0..endpoints)
            .map(|j| Endpoint {
                addresses: vec![synthetic_endpoint(i * ENDPOINTS_PER_SERVICE + j).to_string()],
                conditions: Some(EndpointConditions { ready: Some(true), ..Default::default() }),
                ..Default::default()
            })
            .collect(),
    }
}

fn yaml_of(services: impl Iterator<Item = usize>, endpoints: usize) -> Result<String> {
    // k8s-openapi writes apiVersion and kind itself.
    let mut out = String::new();
    for i in services {
        out += "---\n";
        out += &serde_yaml_ng::to_string(&service(i))?;
        out += "---\n";
        out += &serde_yaml_ng::to_string(&slice(i, endpoints))?;
    }
    Ok(out)
}

/// The Services as manifest files of `SERVICES_PER_FILE` each; Service 0 (the one the change
/// benchmarks edit) has a file of its own, `changed.yaml`.
pub fn manifest_files(services: usize) -> Result<Vec<(String, String)>> {
    let mut files = vec![("changed.yaml".to_string(), yaml_of(0..1.min(services), ENDPOINTS_PER_SERVICE)?)];
    let mut start = 1;
    while start < services {
        let end = (start + SERVICES_PER_FILE).min(services);
        files.push((format!("services-{start:06}.yaml"), yaml_of(start..end, ENDPOINTS_PER_SERVICE)?));
        start = end;
    }
    Ok(files)
}

fn fresh_datapath(services: usize) -> Result<(Datapath, PrivateBpfFs, std::path::PathBuf)> {
    let bpffs = PrivateBpfFs::new()?;
    let dir = bpffs.path().join("lb");
    let datapath = Datapath::load_with(&dir, &capacity(services))?;
    Ok((datapath, bpffs, dir))
}

/// Converts what the pipeline took in and reconciles it all; returns (convert, reconcile).
fn full_sync(pipeline: &mut Pipeline, reconciler: &mut Reconciler<BpfMaps>) -> Result<(Duration, Duration)> {
    let start = Instant::now();
    let changes = pipeline.take_changes();
    anyhow::ensure!(
        changes.errors.is_empty(),
        "conversion errors: {:?}",
        &changes.errors[..changes.errors.len().min(3)]
    );
    let converted = start.elapsed();
    let report = reconciler.reconcile(pipeline.table().desired());
    anyhow::ensure!(
        report.errors.is_empty(),
        "reconcile errors: {:?}",
        &report.errors[..report.errors.len().min(3)]
    );
    Ok((converted, start.elapsed() - converted))
}

/// The objects as upserts, moved (not copied): a source hands its objects over the same way.
fn upserts(objects: ClusterObjects) -> impl Iterator<Item = ObjectChange> {
    objects
        .services
        .into_iter()
        .map(|s| Object::Service(Box::new(s)))
        .chain(objects.endpoint_slices.into_iter().map(|s| Object::EndpointSlice(Box::new(s))))
        .map(ObjectChange::Upsert)
}

/// Full sync from objects in memory, then `changes` single changes (an EndpointSlice losing
/// or regaining an endpoint), each taken in, converted and reconciled as `lb run` does: from
/// the event reaching lb to the map written.
pub fn sync_and_changes(services: usize, changes: usize) -> Result<(SyncTime, ChangeLatency)> {
    let objects = objects(services);
    let (mut datapath, _bpffs, _dir) = fresh_datapath(services)?;
    let mut reconciler = Reconciler::restore(BpfMaps::from_ebpf(datapath.ebpf_mut())?)?;
    let mut pipeline = Pipeline::new(ProxyConfig::default(), OnInvalid::Drop);
    let start = Instant::now();
    let heap_objects = super::heap::live_mib();
    for change in upserts(objects) {
        pipeline.apply(change)?;
    }
    let applied = start.elapsed();
    let heap_taken = super::heap::live_mib();
    let (convert, reconcile) = full_sync(&mut pipeline, &mut reconciler)?;
    let heap_synced = super::heap::live_mib();
    eprintln!(
        "bench: {services} Services from objects: taken in {applied:.2?}, converted {convert:.2?}, programmed {reconcile:.2?}; \
         live heap {heap_objects:.0} MiB with the objects, {heap_taken:.0} MiB taken in (the pipeline's records), \
         {heap_synced:.0} MiB synced (+ desired and programmed state)"
    );
    let full = SyncTime {
        services,
        source: "objects in memory",
        read_ms: 0.0,
        convert_ms: ms(applied + convert),
        reconcile_ms: ms(reconcile),
        total_ms: ms(applied + convert + reconcile),
    };
    let mut latencies = Vec::with_capacity(changes);
    for change in 0..changes {
        let i = (change * 7919) % services;
        // Each timed change takes an endpoint away; it is given back untimed, so every change
        // starts from ten endpoints.
        let event =
            ObjectChange::Upsert(Object::EndpointSlice(Box::new(slice(i, ENDPOINTS_PER_SERVICE - 1))));
        let start = Instant::now();
        pipeline.apply(event)?;
        let changed = pipeline.take_changes();
        let report = reconciler.reconcile_frontends(pipeline.table().desired(), &changed.frontends);
        latencies.push(start.elapsed());
        anyhow::ensure!(report.errors.is_empty() && report.programmed == 1, "change {change}: {report:?}");
        pipeline
            .apply(ObjectChange::Upsert(Object::EndpointSlice(Box::new(slice(i, ENDPOINTS_PER_SERVICE)))))?;
        let changed = pipeline.take_changes();
        let report = reconciler.reconcile_frontends(pipeline.table().desired(), &changed.frontends);
        anyhow::ensure!(report.errors.is_empty() && report.programmed == 1, "restoring {change}: {report:?}");
    }
    Ok((full, latency(services, "event reaching lb -> map written (objects)", latencies)))
}

/// Full sync from a manifest directory: read, convert, reconcile.
pub fn sync_from_manifests(services: usize, files: &[(String, String)]) -> Result<SyncTime> {
    let dir = std::env::temp_dir().join(unique("benchm"));
    std::fs::create_dir_all(&dir)?;
    for (name, text) in files {
        std::fs::write(dir.join(name), text)?;
    }
    let (mut datapath, _bpffs, _bpf_dir) = fresh_datapath(services)?;
    let mut reconciler = Reconciler::restore(BpfMaps::from_ebpf(datapath.ebpf_mut())?)?;
    let start = Instant::now();
    let mut objects = ManifestObjects::new(&dir, None, None);
    let loaded = objects.reload_all();
    anyhow::ensure!(loaded.errors.is_empty(), "manifest errors: {}", loaded.errors[0]);
    let read = start.elapsed();
    let mut pipeline = Pipeline::new(ProxyConfig::default(), OnInvalid::KeepLast);
    for change in loaded.changes {
        pipeline.apply(change)?;
    }
    let applied = start.elapsed() - read;
    let (convert, reconcile) = full_sync(&mut pipeline, &mut reconciler)?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(SyncTime {
        services,
        source: "manifests",
        read_ms: ms(read),
        convert_ms: ms(applied + convert),
        reconcile_ms: ms(reconcile),
        total_ms: ms(read + applied + convert + reconcile),
    })
}

/// The backend count of Service `i`'s ClusterIP entry in the pinned maps.
fn backend_count(
    services: &aya::maps::HashMap<aya::maps::MapData, ServiceKey, ServiceValue>,
    i: usize,
) -> Option<u16> {
    services.get(&ServiceKey::new(cluster_ip(i), 80, PROTOCOL_TCP, 0), 0).ok().map(|v| v.backend_count)
}

fn pinned_services(
    bpf_dir: &std::path::Path,
) -> Result<aya::maps::HashMap<aya::maps::MapData, ServiceKey, ServiceValue>> {
    let data = aya::maps::MapData::from_pin(bpf_dir.join(lb_common::map_names::SERVICES))?;
    Ok(aya::maps::HashMap::try_from(aya::maps::Map::HashMap(data))?)
}

/// Polls the pinned map until Service `i` has `count` backends; returns when it did.
fn wait_for_count(
    services: &aya::maps::HashMap<aya::maps::MapData, ServiceKey, ServiceValue>,
    i: usize,
    count: u16,
    bound: Duration,
) -> Result<Instant> {
    let start = Instant::now();
    loop {
        if backend_count(services, i) == Some(count) {
            return Ok(Instant::now());
        }
        anyhow::ensure!(start.elapsed() < bound, "Service {i} did not get {count} backends within {bound:?}");
        std::hint::spin_loop();
    }
}

/// Full sync from the fake API server through lb's kube-rs watchers, the same pipeline and
/// reconciler as `lb run`; then `changes` EndpointSlice changes made at the API server, each
/// timed from the change until the pinned map shows it.
pub fn api_server(
    services: usize,
    objects: &ClusterObjects,
    changes: usize,
) -> Result<(SyncTime, ChangeLatency)> {
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
    let (_datapath, _bpffs, bpf_dir) = fresh_datapath(services)?;
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
    let (synced_tx, synced_rx) = std::sync::mpsc::channel::<Result<(Duration, Duration, Duration)>>();
    let start = Instant::now();
    let maps_dir = bpf_dir.clone();
    runtime.spawn(async move {
        let run = async {
            let client = lb_userspace::source::kube::client(Some(&kubeconfig)).await?;
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
            lb_userspace::source::kube::spawn_watchers(client, &ProxyConfig::default(), tx);
            let mut reconciler = Reconciler::restore(BpfMaps::from_pins(&maps_dir)?)?;
            let mut store = ClusterStore::default();
            let mut pipeline = Pipeline::new(ProxyConfig::default(), OnInvalid::Drop);
            let mut synced = false;
            while let Some(event) = rx.recv().await {
                for change in store.apply(event) {
                    let _ = pipeline.apply(change);
                }
                if !synced && store.ready(Default::default()) {
                    let read = start.elapsed();
                    let (convert, reconcile) = full_sync(&mut pipeline, &mut reconciler)?;
                    synced = true;
                    let _ = synced_tx.send(Ok((read, convert, reconcile)));
                } else if synced && pipeline.has_pending() {
                    let changed = pipeline.take_changes();
                    reconciler.reconcile_frontends(pipeline.table().desired(), &changed.frontends);
                }
            }
            anyhow::Ok(())
        };
        if let Err(error) = run.await {
            let _ = synced_tx.send(Err(error));
        }
    });
    let (read, convert, reconcile) = synced_rx
        .recv_timeout(Duration::from_secs(600))
        .context("the watchers did not list everything within 600 s")??;
    let full = SyncTime {
        services,
        source: "API server (list + watch)",
        read_ms: ms(read),
        convert_ms: ms(convert),
        reconcile_ms: ms(reconcile),
        total_ms: ms(read + convert + reconcile),
    };
    let pinned = pinned_services(&bpf_dir)?;
    let mut latencies = Vec::with_capacity(changes);
    for change in 0..changes {
        let i = (change * 7919) % services;
        for endpoints in [ENDPOINTS_PER_SERVICE - 1, ENDPOINTS_PER_SERVICE] {
            std::thread::sleep(CHANGE_SPACING);
            let start = Instant::now();
            server.apply(serde_json::to_value(slice(i, endpoints))?);
            let done = wait_for_count(&pinned, i, endpoints as u16, Duration::from_secs(30))?;
            latencies.push(done - start);
        }
    }
    drop(runtime);
    let _ = std::fs::remove_dir_all(&dir);
    Ok((
        full,
        latency(services, "API change -> map written (fake API server, watch; 25 ms apart)", latencies),
    ))
}

/// The pause before each timed change in the daemon and API server measurements.
const CHANGE_SPACING: Duration = Duration::from_millis(25);

/// `lb run` itself on a manifest directory: how long it takes to sync at start, how long a
/// file replaced (atomically, as `kubectl` tools and editors that rename do) takes to reach
/// the maps, and its memory.
pub fn daemon(
    services: usize,
    files: &[(String, String)],
    changes: usize,
) -> Result<(Memory, ChangeLatency)> {
    let mut pg = Playground::new(&unique("mem"), &[])?;
    for (name, text) in files {
        pg.write_manifest(name, text)?;
    }
    let capacity = capacity(services);
    let manifests = pg.manifests.clone();
    let args: Vec<std::ffi::OsString> = vec![
        "--manifests".into(),
        manifests.clone().into_os_string(),
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
    let synced = format!("synced frontends={services} ");
    while !pg.lb_log().contains(&synced) {
        anyhow::ensure!(
            start.elapsed() < Duration::from_secs(600),
            "lb did not sync within 600 s:\n{}",
            pg.lb_log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let startup_sync = start.elapsed();
    let pinned = pinned_services(&pg.bpf_dir)?;
    let mut latencies = Vec::with_capacity(changes);
    for _ in 0..changes {
        for endpoints in [ENDPOINTS_PER_SERVICE - 1, ENDPOINTS_PER_SERVICE] {
            // One change at a time, as an operator makes them: spaced past lb's sync pacing
            // (--min-sync-period, 10 ms), which would otherwise be what this measures.
            std::thread::sleep(CHANGE_SPACING);
            let text = yaml_of(0..1, endpoints)?;
            let temporary = manifests.join(".changed.yaml.tmp");
            std::fs::write(&temporary, text)?;
            let start = Instant::now();
            std::fs::rename(&temporary, manifests.join("changed.yaml"))?;
            let done = wait_for_count(&pinned, 0, endpoints as u16, Duration::from_secs(30))?;
            latencies.push(done - start);
        }
    }
    let pid = pg.lb_pid().context("lb pid")?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib = |field: &str| -> Result<f64> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .with_context(|| field.to_string())
    };
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
    let memory = Memory {
        services,
        rss_mib: kib("VmRSS:")? / 1024.0,
        peak_rss_mib: kib("VmHWM:")? / 1024.0,
        map_mib: map_bytes / 1048576.0,
        startup_sync_ms: ms(startup_sync),
    };
    pg.stop_lb()?;
    Ok((
        memory,
        latency(services, "file replaced -> map written (lb run, manifests; 25 ms apart)", latencies),
    ))
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
