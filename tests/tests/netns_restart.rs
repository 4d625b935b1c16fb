//! Hitless restart: Service traffic does not notice lb stopping, crashing or starting again.
//! Persistent TCP connections and a connect/request/close load run through a ClusterIP and a
//! NodePort while lb is killed (SIGKILL) or stopped (SIGTERM) and started again; no connection
//! may fail or stall (a stall of 200 ms would mean a lost SYN or segment waiting for its
//! retransmission). `lb cleanup` then leaves nothing behind.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use aya::programs::{SchedClassifier, TcAttachType};
use tests::bench::loadgen;
use tests::playground::Playground;
use tests::{lb_binary, require_root, unique};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
const NODE_PORT: u16 = 30080;
const POD_A: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 11);
const POD_B: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 12);
const POD_C: Ipv4Addr = Ipv4Addr::new(10, 244, 3, 13);
const ECHO_PORT: u16 = 8080;
/// Longer than any round trip here, shorter than TCP's first retransmission (200 ms minimum).
const STALL: Duration = Duration::from_millis(200);

fn manifest(pods: &[Ipv4Addr]) -> String {
    let endpoints: String = pods
        .iter()
        .map(|ip| format!("  - addresses: [\"{ip}\"]\n    conditions: {{ready: true}}\n"))
        .collect();
    format!(
        "apiVersion: v1
kind: Service
metadata: {{name: echo, namespace: default}}
spec:
  type: NodePort
  clusterIP: {VIP}
  ports: [{{name: tcp, port: 80, targetPort: {ECHO_PORT}, nodePort: {NODE_PORT}}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: echo-1, namespace: default, labels: {{kubernetes.io/service-name: echo}}}}
addressType: IPv4
ports: [{{name: tcp, port: {ECHO_PORT}, protocol: TCP}}]
endpoints:
{endpoints}"
    )
}

fn backend_count(pg: &Playground) -> Option<u16> {
    pg.snapshot()
        .services
        .iter()
        .find(|(k, _)| k.backend_slot == 0 && k.address() == VIP)
        .map(|(_, v)| v.backend_count)
}

fn playground() -> (Playground, Arc<AtomicBool>) {
    require_root();
    let mut pg =
        Playground::new(&unique("r"), &[("pod-a", POD_A), ("pod-b", POD_B), ("pod-c", POD_C)]).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    for pod in &pg.pods {
        let listener = pod.ns.run(|| TcpListener::bind(("0.0.0.0", ECHO_PORT))).unwrap().unwrap();
        loadgen::serve_echo(listener, stop.clone()).unwrap();
    }
    pg.client.sysctl("net.ipv4.ip_local_port_range", "20000 60000").unwrap();
    pg.write_manifest("echo.yaml", &manifest(&[POD_A, POD_B])).unwrap();
    pg.start_lb().unwrap();
    pg.wait_for_log(" synced ", Duration::from_secs(10)).unwrap();
    (pg, stop)
}

/// What the load saw: operations done, failures, and the slowest operation.
#[derive(Debug, Default)]
struct Seen {
    operations: u64,
    failures: Vec<String>,
    slowest: Duration,
}

/// Runs, from the client, persistent connections (request/response) and connect/request/close
/// loops against both the ClusterIP and the NodePort until `stop`.
fn start_load(pg: &Playground, stop: Arc<AtomicBool>) -> Vec<std::thread::JoinHandle<Seen>> {
    let targets = [SocketAddrV4::new(VIP, 80), SocketAddrV4::new(NODE_IP, NODE_PORT)];
    let mut handles = Vec::new();
    for target in targets {
        for persistent in [true, true, false, false] {
            let stop = stop.clone();
            let handle = pg
                .client
                .run(move || {
                    // Threads keep the namespace of the thread that starts them.
                    std::thread::spawn(move || load(SocketAddr::V4(target), persistent, &stop))
                })
                .unwrap();
            handles.push(handle);
        }
    }
    handles
}

fn load(target: SocketAddr, persistent: bool, stop: &AtomicBool) -> Seen {
    let mut seen = Seen::default();
    let connect = || -> std::io::Result<TcpStream> {
        let stream = TcpStream::connect_timeout(&target, Duration::from_secs(3))?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(Duration::from_secs(3)))?;
        Ok(stream)
    };
    let exchange = |stream: &mut TcpStream| -> std::io::Result<()> {
        let mut buffer = [5u8; loadgen::MESSAGE];
        stream.write_all(&buffer)?;
        stream.read_exact(&mut buffer)
    };
    let mut stream = None;
    while !stop.load(Ordering::Relaxed) {
        let started = Instant::now();
        let result = if persistent {
            match stream.as_mut() {
                Some(stream) => exchange(stream),
                None => connect().and_then(|mut fresh| {
                    let result = exchange(&mut fresh);
                    stream = Some(fresh);
                    result
                }),
            }
        } else {
            connect().and_then(|mut fresh| exchange(&mut fresh))
        };
        let took = started.elapsed();
        seen.operations += 1;
        seen.slowest = seen.slowest.max(took);
        if let Err(error) = result {
            seen.failures
                .push(format!("{target} ({}): {error}", if persistent { "persistent" } else { "new" }));
            stream = None;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    seen
}

/// Runs the load for `before`, does `restart`, then keeps the load for `after`; returns what
/// the load saw in all.
fn through_a_restart(pg: &mut Playground, restart: impl FnOnce(&mut Playground)) -> Seen {
    let stop = Arc::new(AtomicBool::new(false));
    let handles = start_load(pg, stop.clone());
    std::thread::sleep(Duration::from_secs(1));
    restart(pg);
    std::thread::sleep(Duration::from_secs(2));
    stop.store(true, Ordering::Relaxed);
    let mut all = Seen::default();
    for handle in handles {
        let seen = handle.join().unwrap();
        all.operations += seen.operations;
        all.failures.extend(seen.failures);
        all.slowest = all.slowest.max(seen.slowest);
    }
    all
}

fn assert_unnoticed(seen: &Seen, pg: &Playground) {
    eprintln!("{} operations, slowest {:?}", seen.operations, seen.slowest);
    assert!(seen.operations > 500, "too little load to tell: {seen:?}");
    assert!(seen.failures.is_empty(), "failed: {:?}\n{}", seen.failures, pg.lb_log());
    assert!(seen.slowest < STALL, "an operation stalled {:?}\n{}", seen.slowest, pg.lb_log());
}

/// The programs attached to an interface of the node (TCX ingress), by name.
fn ingress_programs(pg: &Playground, interface: &'static str) -> Vec<(String, u32)> {
    pg.node
        .run(move || {
            let (_, programs) = SchedClassifier::query_tcx(interface, TcAttachType::Ingress).unwrap();
            programs.iter().map(|p| (p.name_as_str().unwrap_or("?").to_string(), p.id())).collect::<Vec<_>>()
        })
        .unwrap()
}

fn kill(pg: &Playground, signal: nix::sys::signal::Signal) {
    let pid = nix::unistd::Pid::from_raw(pg.lb_pid().expect("lb runs") as i32);
    nix::sys::signal::kill(pid, signal).unwrap();
}

#[test]
fn sigkill_then_start_is_not_noticed() {
    let (mut pg, stop) = playground();
    let before = ingress_programs(&pg, "lbc0");
    let seen = through_a_restart(&mut pg, |pg| {
        kill(pg, nix::sys::signal::Signal::SIGKILL);
        let _ = pg.stop_lb(); // reaps the killed process
        // No lb runs: the pinned links keep translating.
        std::thread::sleep(Duration::from_millis(500));
        pg.start_lb().unwrap();
        pg.wait_for_log("took over the links", Duration::from_secs(10)).unwrap();
    });
    assert_unnoticed(&seen, &pg);
    // The new lb's own program now runs in the same link (a new program ID, one attachment).
    let after = ingress_programs(&pg, "lbc0");
    assert_eq!(after.len(), 1, "{after:?}");
    assert_eq!((before[0].0.as_str(), after[0].0.as_str()), ("lb_ingress", "lb_ingress"));
    assert_ne!(before[0].1, after[0].1, "the program was replaced in place");
    stop.store(true, Ordering::Relaxed);
}

#[test]
fn sigterm_then_start_with_a_change_made_while_down() {
    let (mut pg, stop) = playground();
    let seen = through_a_restart(&mut pg, |pg| {
        assert!(pg.stop_lb().unwrap(), "lb exits cleanly on SIGTERM");
        // While no lb runs, a third pod joins the Service.
        pg.write_manifest("echo.yaml", &manifest(&[POD_A, POD_B, POD_C])).unwrap();
        std::thread::sleep(Duration::from_millis(500));
        pg.start_lb().unwrap();
        pg.wait_for_log(" synced ", Duration::from_secs(10)).unwrap();
    });
    assert_unnoticed(&seen, &pg);
    assert_eq!(backend_count(&pg), Some(3), "the change made while lb was down is in force");
    stop.store(true, Ordering::Relaxed);
}

/// `lb cleanup` after lb stopped: the programs are detached, and nothing of lb's is left in
/// its pin directory.
#[test]
fn cleanup_removes_the_data_path_and_leaves_nothing() {
    let (mut pg, stop) = playground();
    assert!(pg.stop_lb().unwrap());
    // Still translating after lb stopped.
    let answer = pg
        .client
        .run(|| loadgen::tcp_rr(SocketAddr::V4(SocketAddrV4::new(VIP, 80)), 1, Duration::from_millis(200)));
    assert!(answer.unwrap().unwrap().rate > 0.0);
    let out = std::process::Command::new(lb_binary())
        .args(["cleanup", "--bpf-dir"])
        .arg(&pg.bpf_dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "lb cleanup: {}", String::from_utf8_lossy(&out.stderr));
    assert!(!pg.bpf_dir.exists(), "{:?}", std::fs::read_dir(&pg.bpf_dir).map(|d| d.count()));
    for interface in ["lbc0", "lbp0", "lbp1"] {
        assert!(ingress_programs(&pg, interface).is_empty(), "{interface} still has a program");
    }
    stop.store(true, Ordering::Relaxed);
}

/// Only root may open what lb pins: the pin directory is 0700, every map and link pin 0600.
#[test]
fn pins_are_for_root_only() {
    use std::os::unix::fs::PermissionsExt;
    let (pg, stop) = playground();
    let mode = |path: &std::path::Path| std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&pg.bpf_dir), 0o700);
    let links = pg.bpf_dir.join("links");
    assert_eq!(mode(&links), 0o700);
    let mut pins = 0;
    for dir in [&pg.bpf_dir, &links] {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_file() {
                assert_eq!(mode(&path), 0o600, "{}", path.display());
                pins += 1;
            }
        }
    }
    assert!(pins >= 13 + 6, "maps and links pinned: {pins}");
    stop.store(true, Ordering::Relaxed);
}
