//! Churn: endpoints added, removed and flipped ready / not ready / terminating at about two
//! hundred changes a second for a minute, under a connect/request/close load. Every connection
//! succeeds and reaches a pod that was ready in the Service shortly before it started, and a
//! reader of the maps never sees a slot pointing at a missing backend.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lb_userspace::dataplane::maps::{BpfMaps, ServiceMaps};
use tests::playground::{Playground, http_get, write_manifest};
use tests::{require_root, unique};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 40);
const PODS: [(&str, Ipv4Addr); 5] = [
    ("pod-a", Ipv4Addr::new(10, 244, 1, 11)),
    ("pod-b", Ipv4Addr::new(10, 244, 2, 12)),
    ("pod-c", Ipv4Addr::new(10, 244, 3, 13)),
    ("pod-d", Ipv4Addr::new(10, 244, 4, 14)),
    ("pod-e", Ipv4Addr::new(10, 244, 5, 15)),
];
/// pod-a and pod-b stay ready; the others churn.
const STABLE: usize = 2;
const CHURN: Duration = Duration::from_secs(60);
/// How long after a pod stops being ready a new connection may still reach it: lb's sync
/// (--min-sync-period 100ms) and the file watcher's coalescing.
const PROPAGATION: Duration = Duration::from_secs(2);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Ready,
    NotReady,
    Terminating,
    Absent,
}

fn manifest(states: &[State]) -> String {
    let mut endpoints = String::new();
    for ((_, ip), state) in PODS.iter().zip(states) {
        let conditions = match state {
            State::Ready => "{ready: true}",
            State::NotReady => "{ready: false, serving: false}",
            State::Terminating => "{ready: false, serving: true, terminating: true}",
            State::Absent => continue,
        };
        endpoints += &format!("  - addresses: [\"{ip}\"]\n    conditions: {conditions}\n");
    }
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: churn}}\nspec: {{clusterIP: {VIP}, ports: [{{port: 80, targetPort: 8080}}]}}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: churn-1, labels: {{kubernetes.io/service-name: churn}}}}\naddressType: IPv4\nports: [{{port: 8080}}]\nendpoints:\n{endpoints}"
    )
}

/// When each pod was ready: (from, until) intervals.
type History = BTreeMap<String, Vec<(Instant, Option<Instant>)>>;

#[test]
fn connections_survive_endpoint_churn() {
    require_root();
    let mut pg = Playground::new(&unique("c"), &PODS).unwrap();
    pg.serve_http(8080).unwrap();
    let mut states = vec![State::Ready; PODS.len()];
    pg.write_manifest("churn.yaml", &manifest(&states)).unwrap();
    let manifests = pg.manifests.clone();
    pg.start_lb_with(&[
        "--manifests".as_ref(),
        manifests.as_os_str(),
        "--min-sync-period".as_ref(),
        "100ms".as_ref(),
    ])
    .unwrap();
    pg.wait_for_maps(Duration::from_secs(10), |s| {
        s.services.iter().any(|(k, v)| k.backend_slot == 0 && k.address() == VIP && v.backend_count == 5)
    })
    .unwrap();

    let started = Instant::now();
    let history: Arc<Mutex<History>> = Arc::new(Mutex::new(
        PODS.iter().map(|(name, _)| (name.to_string(), vec![(started - PROPAGATION, None)])).collect(),
    ));
    let stop = Arc::new(AtomicBool::new(false));

    // The churn: a change every 5 ms. A pod leaves the slice only after it has been not ready
    // or terminating for 1.5 s, as a pod that is shut down does (so no connection of its is
    // alive when its endpoint goes).
    let churner = {
        let (history, stop, dir) = (history.clone(), stop.clone(), manifests.clone());
        std::thread::spawn(move || {
            let mut seed = 0x5eed_u64;
            let mut since = vec![Instant::now(); PODS.len()];
            let mut changes = 0u64;
            while !stop.load(Ordering::Relaxed) {
                seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                let pod = STABLE + (seed >> 33) as usize % (PODS.len() - STABLE);
                let settled = since[pod].elapsed() > Duration::from_millis(1500);
                let next = match (states[pod], (seed >> 40) % 2) {
                    (State::Absent, _) => State::Ready,
                    (State::Ready, 0) => State::NotReady,
                    (State::Ready, _) => State::Terminating,
                    (State::NotReady | State::Terminating, 0) if settled => State::Absent,
                    (State::NotReady | State::Terminating, _) => State::Ready,
                };
                if next != states[pod] {
                    let now = Instant::now();
                    let mut history = history.lock().unwrap();
                    let intervals = history.get_mut(PODS[pod].0).unwrap();
                    if next == State::Ready {
                        intervals.push((now, None));
                    } else if states[pod] == State::Ready {
                        intervals.last_mut().unwrap().1 = Some(now);
                    }
                    states[pod] = next;
                    since[pod] = now;
                    write_manifest(&dir, "churn.yaml", &manifest(&states)).unwrap();
                    changes += 1;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            changes
        })
    };

    // A reader of the maps, as the data path or `lb services` reads them mid-update.
    let auditor = {
        let (stop, dir) = (stop.clone(), pg.bpf_dir.clone());
        std::thread::spawn(move || {
            let maps = BpfMaps::from_pins(&dir).unwrap();
            let (mut reads, mut violations) = (0u64, Vec::new());
            while !stop.load(Ordering::Relaxed) {
                if let Ok(snapshot) = maps.snapshot() {
                    violations.extend(lb_userspace::dataplane::audit::always(&snapshot));
                    reads += 1;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            (reads, violations)
        })
    };

    // The load: connect, request, close, from four threads, each answer naming its pod.
    let target = SocketAddrV4::new(VIP, 80);
    let load: Vec<_> = (0..4)
        .map(|_| {
            let stop = stop.clone();
            pg.client
                .run(move || {
                    std::thread::spawn(move || {
                        let mut answers = Vec::new();
                        while !stop.load(Ordering::Relaxed) {
                            let begun = Instant::now();
                            answers.push((begun, http_get(target).map(|a| a.pod).map_err(|e| e.to_string())));
                        }
                        answers
                    })
                })
                .unwrap()
        })
        .collect();

    std::thread::sleep(CHURN);
    stop.store(true, Ordering::Relaxed);
    let changes = churner.join().unwrap();
    let (reads, violations) = auditor.join().unwrap();
    let answers: Vec<(Instant, Result<String, String>)> =
        load.into_iter().flat_map(|h| h.join().unwrap()).collect();
    let history = history.lock().unwrap();
    eprintln!("{changes} endpoint changes, {} connections, {reads} reads of the maps", answers.len());
    assert!(changes > 5_000, "too little churn: {changes}");
    assert!(answers.len() > 1_000, "too little load: {}", answers.len());
    assert!(violations.is_empty(), "readers saw: {violations:#?}");

    for (begun, answer) in &answers {
        let pod = answer.as_ref().unwrap_or_else(|e| panic!("a connection failed: {e}\n{}", pg.lb_log()));
        // Ready at some time in the PROPAGATION before the connection began, or since.
        let was_ready = history[pod]
            .iter()
            .any(|(from, until)| *from <= *begun && until.is_none_or(|until| until + PROPAGATION >= *begun));
        assert!(
            was_ready,
            "{pod} answered a connection begun while it had not been ready for {PROPAGATION:?}"
        );
    }
    assert!(pg.stop_lb().unwrap());
}
