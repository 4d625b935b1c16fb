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
    start_load_of(pg, stop, &[true, true, false, false])
}

/// `start_load` with these kinds of loops per target (true: a persistent connection).
fn start_load_of(
    pg: &Playground,
    stop: Arc<AtomicBool>,
    kinds: &[bool],
) -> Vec<std::thread::JoinHandle<Seen>> {
    let targets = [SocketAddrV4::new(VIP, 80), SocketAddrV4::new(NODE_IP, NODE_PORT)];
    let mut handles = Vec::new();
    for target in targets {
        for &persistent in kinds {
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
    joined(handles)
}

fn joined(handles: Vec<std::thread::JoinHandle<Seen>>) -> Seen {
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
    // On a failure, what the data path counted (a drop reason, say) next to lb's log.
    let counters = || {
        let out = std::process::Command::new(tests::lb_binary())
            .args(["counters", "--bpf-dir"])
            .arg(&pg.bpf_dir)
            .output()
            .map(|out| String::from_utf8_lossy(&out.stdout).into_owned())
            .unwrap_or_default();
        out.lines().filter(|line| !line.trim_end().ends_with(" 0")).collect::<Vec<_>>().join("\n")
    };
    assert!(seen.failures.is_empty(), "failed: {:?}\n{}\n{}", seen.failures, counters(), pg.lb_log());
    assert!(seen.slowest < STALL, "an operation stalled {:?}\n{}\n{}", seen.slowest, counters(), pg.lb_log());
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
    // The first sync of the new lb changed nothing (the pinned maps held it all), and says so
    // at info: without this line only /healthz would tell that it happened.
    pg.wait_for_log(" synced ", Duration::from_secs(10)).unwrap();
    let log = pg.lb_log();
    let synced = log.lines().find(|line| line.contains(" synced ")).unwrap();
    assert!(synced.contains("INFO") && synced.contains("programmed=0"), "{log}");
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

/// Starts lb as `start_lb` does, with these flags added.
fn start_lb_adding(pg: &mut Playground, flags: &[&str]) {
    let manifests = pg.manifests.clone();
    let mut args: Vec<&std::ffi::OsStr> = vec!["--manifests".as_ref(), manifests.as_os_str()];
    args.extend(flags.iter().map(|flag| std::ffi::OsStr::new(*flag)));
    pg.start_lb_with(&args).unwrap();
}

/// The layout record's entries (`lb_common::layout`).
fn layout_record(pg: &Playground) -> Vec<u32> {
    let data = aya::maps::MapData::from_pin(pg.bpf_dir.join(lb_common::map_names::LAYOUT)).unwrap();
    let array: aya::maps::Array<_, u32> = aya::maps::Array::try_from(aya::maps::Map::Array(data)).unwrap();
    (0..lb_common::layout::RECORDS).map(|index| array.get(&index, 0).unwrap()).collect()
}

fn migrating_pins(pg: &Playground) -> Vec<String> {
    std::fs::read_dir(&pg.bpf_dir)
        .unwrap()
        .filter_map(|entry| entry.unwrap().file_name().into_string().ok())
        .filter(|name| name.ends_with(lb_common::layout::MIGRATING_SUFFIX))
        .collect()
}

fn conntrack_entries(pg: &Playground) -> Vec<(lb_common::FlowKey, lb_common::ConntrackEntry)> {
    let data = aya::maps::MapData::from_pin(pg.bpf_dir.join(lb_common::map_names::CONNTRACK)).unwrap();
    let map: aya::maps::HashMap<_, lb_common::FlowKey, lb_common::ConntrackEntry> =
        aya::maps::HashMap::try_from(aya::maps::Map::HashMap(data)).unwrap();
    map.iter().map(Result::unwrap).collect()
}

/// A start with other map sizes (`--max-*`) moves the maps into new ones while traffic runs:
/// tracked flows and Services are carried over, nothing notices. Then a start that finds a
/// layout it does not know is refused and leaves the running data path as it is.
#[test]
fn a_start_with_other_map_sizes_migrates_the_maps_unnoticed() {
    let (mut pg, stop) = playground();
    assert_eq!(layout_record(&pg), vec![lb_common::layout::VERSION, 0, 0, 0]);
    let conntrack = pg.bpf_dir.join(lb_common::map_names::CONNTRACK);
    let before = lb_userspace::dataplane::datapath::pinned_shape(&conntrack).unwrap();
    let seen = through_a_restart(&mut pg, |pg| {
        kill(pg, nix::sys::signal::Signal::SIGKILL);
        let _ = pg.stop_lb();
        start_lb_adding(pg, &["--max-flows", "300000", "--max-backends", "70000"]);
        pg.wait_for_log("migrated maps in place", Duration::from_secs(20)).unwrap();
    });
    assert_unnoticed(&seen, &pg);
    let log = pg.lb_log();
    assert!(log.contains("migrating maps"), "{log}");
    assert!(log.contains("looked up in the old one"), "{log}");
    let after = lb_userspace::dataplane::datapath::pinned_shape(&conntrack).unwrap();
    assert_eq!((before.max_entries, after.max_entries), (lb_common::capacity::CONNTRACK, 300_000));
    let backends =
        lb_userspace::dataplane::datapath::pinned_shape(&pg.bpf_dir.join(lb_common::map_names::BACKENDS));
    assert_eq!(backends.unwrap().max_entries, 70_000);
    assert!(migrating_pins(&pg).is_empty(), "{:?}", migrating_pins(&pg));
    assert_eq!(layout_record(&pg), vec![lb_common::layout::VERSION, 0, 0, 0]);
    // The flows the load keeps open came across: both entries of each, for both frontends.
    assert!(conntrack_entries(&pg).len() >= 8, "{:?}", conntrack_entries(&pg).len());

    // Starts this build must refuse leave the data path serving as it was: a size too small
    // for the flows tracked, then a layout from a build newer than this one.
    let programs = ingress_programs(&pg, "lbc0");
    kill(&pg, nix::sys::signal::Signal::SIGKILL);
    let _ = pg.stop_lb();
    let stop_load = Arc::new(AtomicBool::new(false));
    let handles = start_load(&pg, stop_load.clone());
    start_lb_adding(&mut pg, &["--max-flows", "4", "--max-backends", "70000"]);
    pg.wait_for_log("start with --max-flows", Duration::from_secs(10)).unwrap();
    assert!(!pg.stop_lb().unwrap_or(false), "lb refused to start");
    let record = aya::maps::MapData::from_pin(pg.bpf_dir.join(lb_common::map_names::LAYOUT)).unwrap();
    let mut record: aya::maps::Array<_, u32> =
        aya::maps::Array::try_from(aya::maps::Map::Array(record)).unwrap();
    record.set(lb_common::layout::PINNED, 99, 0).unwrap();
    start_lb_adding(&mut pg, &["--max-flows", "300000", "--max-backends", "70000"]);
    pg.wait_for_log("newer than this lb's", Duration::from_secs(10)).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    stop_load.store(true, Ordering::Relaxed);
    let seen = joined(handles);
    assert!(!pg.stop_lb().unwrap_or(false), "lb refused to start");
    assert_unnoticed(&seen, &pg);
    assert_eq!(ingress_programs(&pg, "lbc0"), programs, "the links still run the programs they ran");
    assert_eq!(layout_record(&pg)[0], 99, "the record is left as it was");
    assert_eq!(lb_userspace::dataplane::datapath::pinned_shape(&conntrack).unwrap().max_entries, 300_000);
    assert!(migrating_pins(&pg).is_empty(), "{:?}", migrating_pins(&pg));
    stop.store(true, Ordering::Relaxed);
}

/// Raw bpf(2) calls to write maps the way a build of layout 0 did.
mod layout_0 {
    use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
    use std::path::Path;

    use aya::maps::{Array, HashMap, Map, MapData};
    use lb_common::{ConntrackEntry, DatapathConfig, FlowKey, ServiceKey, ServiceValue, map_names};

    fn bpf(command: i64, attr: &mut [u64; 16]) -> std::io::Result<i64> {
        // SAFETY: bpf(2) with a zero-padded attribute buffer larger than the command reads.
        let rc = unsafe { nix::libc::syscall(nix::libc::SYS_bpf, command, attr.as_mut_ptr(), 128usize) };
        if rc < 0 { Err(std::io::Error::last_os_error()) } else { Ok(rc) }
    }

    /// Creates a map and pins it over `name` (the old map lives on while programs use it).
    fn replace(dir: &Path, name: &str, map_type: u32, key: u32, value: u32, entries: u32) -> OwnedFd {
        let mut attr = [0u64; 16];
        attr[0] = u64::from(map_type) | (u64::from(key) << 32);
        attr[1] = u64::from(value) | (u64::from(entries) << 32);
        let fd = bpf(0, &mut attr).expect("BPF_MAP_CREATE");
        // SAFETY: the kernel just returned this descriptor.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        let temporary = dir.join(format!("{name}-v0"));
        lb_userspace::dataplane::links::pin(fd.as_fd(), &temporary).unwrap();
        std::fs::rename(&temporary, dir.join(name)).unwrap();
        fd
    }

    /// A map pinned where a start migrating the services map pins the new one, that no
    /// program uses.
    pub fn stale_migration(dir: &Path) {
        let name = format!("{}{}", map_names::SERVICES, lb_common::layout::MIGRATING_SUFFIX);
        let _unused = replace(dir, &name, 1, 12, 20, 16);
    }

    fn update(map: &OwnedFd, key: &[u8], value: &[u8]) {
        let mut attr = [0u64; 16];
        attr[0] = map.as_raw_fd() as u64;
        attr[1] = key.as_ptr() as u64;
        attr[2] = value.as_ptr() as u64;
        bpf(2, &mut attr).expect("BPF_MAP_UPDATE_ELEM");
    }

    fn hash_map<K: aya::Pod, V: aya::Pod>(dir: &Path, name: &str) -> HashMap<MapData, K, V> {
        let data = MapData::from_pin(dir.join(name)).unwrap();
        HashMap::try_from(Map::HashMap(data)).unwrap()
    }

    /// Rewrites the pins under `dir` as layout 0 had them: services, flows and settings in
    /// their old form, no record, none of the maps that came later.
    pub fn downgrade(dir: &Path) {
        let services: HashMap<_, ServiceKey, ServiceValue> = hash_map(dir, map_names::SERVICES);
        let services: Vec<_> = services.iter().map(Result::unwrap).collect();
        let flows: HashMap<_, FlowKey, ConntrackEntry> = hash_map(dir, map_names::CONNTRACK);
        let flows: Vec<_> = flows.iter().map(Result::unwrap).collect();
        let config = MapData::from_pin(dir.join(map_names::CONFIG)).unwrap();
        let config: Array<_, DatapathConfig> = Array::try_from(Map::Array(config)).unwrap();
        let config = config.get(&0, 0).unwrap();

        let map = replace(dir, map_names::SERVICES, 1, 12, 12, lb_common::capacity::SERVICES);
        for (key, value) in &services {
            let old = [
                &value.backend_id.to_ne_bytes()[..],
                &value.service_id.to_ne_bytes(),
                &value.backend_count.to_ne_bytes(),
                &value.flags.to_ne_bytes(),
            ]
            .concat();
            update(&map, bytemuck::bytes_of(key), &old);
        }
        // An LRU hash in layout 0.
        let map = replace(dir, map_names::CONNTRACK, 9, 16, 24, lb_common::capacity::CONNTRACK);
        for (key, entry) in &flows {
            let flags = u32::from(
                entry.flags & (lb_common::conntrack_flags::REPLY | lb_common::conntrack_flags::ROUTE),
            );
            let old = [
                &entry.src_address.to_ne_bytes()[..],
                &entry.dst_address.to_ne_bytes(),
                &entry.src_port.to_ne_bytes(),
                &entry.dst_port.to_ne_bytes(),
                &entry.backend_id.to_ne_bytes(),
                &entry.service_id.to_ne_bytes(),
                &flags.to_ne_bytes(),
            ]
            .concat();
            update(&map, bytemuck::bytes_of(key), &old);
        }
        let map = replace(dir, map_names::CONFIG, 2, 4, 16, 1);
        let old = [
            &config.netns_cookie.to_ne_bytes()[..],
            &config.snat_address.to_ne_bytes(),
            &config.snat_port_min.to_ne_bytes(),
            &config.snat_port_max.to_ne_bytes(),
        ]
        .concat();
        update(&map, &0u32.to_ne_bytes(), &old);
        // Layout 0 had 25 counters.
        replace(dir, map_names::COUNTERS, 6, 4, 8, 25);
        for name in [
            map_names::AFFINITY,
            map_names::FRAGMENTS,
            map_names::MAGLEV,
            map_names::STATS,
            map_names::CLOCK,
            map_names::LAYOUT,
            map_names::SERVICES6,
            map_names::BACKENDS6,
            map_names::CONNTRACK6,
            map_names::SOURCE_RANGES6,
            map_names::AFFINITY6,
            map_names::CONFIG6,
            map_names::SOCKETS6,
            map_names::FRAGMENTS6,
            map_names::PROGRAMS,
        ] {
            std::fs::remove_file(dir.join(name)).unwrap();
        }
    }
}

/// A start over maps of layout 0 (a build from before the record) converts their entries:
/// the persistent connections those flows belong to keep going through the switch, and new
/// connections work after it.
#[test]
fn a_start_converts_the_maps_of_an_older_layout() {
    let (mut pg, stop) = playground();
    // Only persistent connections while the old maps are rewritten: a connection opened then
    // would be tracked in maps that are no longer pinned, which no migration can see.
    let stop_load = Arc::new(AtomicBool::new(false));
    let handles = start_load_of(&pg, stop_load.clone(), &[true, true]);
    std::thread::sleep(Duration::from_secs(1));
    kill(&pg, nix::sys::signal::Signal::SIGKILL);
    let _ = pg.stop_lb();
    // The per-Service traffic map stays pinned: counters only, replaced whatever layout the
    // others have, it must not make the pins look like a mix of layouts.
    layout_0::downgrade(&pg.bpf_dir);
    // And the leftover of a migration a start did not get to switch to: dropped.
    layout_0::stale_migration(&pg.bpf_dir);
    pg.start_lb().unwrap();
    pg.wait_for_log("migrated maps in place", Duration::from_secs(20)).unwrap();
    std::thread::sleep(Duration::from_secs(1));
    // The four connections' flows, in this layout: open TCP flows, both directions.
    let flows = conntrack_entries(&pg);
    let open =
        flows.iter().filter(|(_, entry)| entry.state == lb_common::conntrack_state::TCP_ESTABLISHED).count();
    assert!(open >= 8, "{flows:?}");
    stop_load.store(true, Ordering::Relaxed);
    let seen = joined(handles);
    eprintln!("{} exchanges, slowest {:?}", seen.operations, seen.slowest);
    assert!(seen.operations > 200, "too little load to tell: {seen:?}");
    assert!(seen.failures.is_empty(), "failed: {:?}\n{}", seen.failures, pg.lb_log());
    assert!(seen.slowest < STALL, "an exchange stalled {:?}\n{}", seen.slowest, pg.lb_log());
    let log = pg.lb_log();
    assert!(log.contains("from_layout=0"), "{log}");
    assert!(log.contains("a previous start did not finish"), "{log}");
    assert_eq!(layout_record(&pg), vec![lb_common::layout::VERSION, 0, 0, 0]);
    assert!(migrating_pins(&pg).is_empty(), "{:?}", migrating_pins(&pg));
    // And new connections, through the converted Services.
    let seen = through_a_restart(&mut pg, |_| {});
    assert_unnoticed(&seen, &pg);
    stop.store(true, Ordering::Relaxed);
}

/// A start of a build whose programs differ (`--test-program-variant`): each link swaps to
/// the new code in place, unnoticed; and back again.
#[test]
fn a_start_of_different_programs_swaps_them_in_place() {
    let (mut pg, stop) = playground();
    let packets_counted = |pg: &Playground| -> u64 {
        let data = aya::maps::MapData::from_pin(pg.bpf_dir.join(lb_common::map_names::COUNTERS)).unwrap();
        let counters: aya::maps::PerCpuArray<_, u64> =
            aya::maps::PerCpuArray::try_from(aya::maps::Map::PerCpuArray(data)).unwrap();
        counters.get(&lb_common::counters::PACKETS, 0).unwrap().iter().sum()
    };
    let translated_size = |id: u32| {
        aya::programs::loaded_programs()
            .filter_map(Result::ok)
            .find(|program| program.id() == id)
            .and_then(|program| program.size_translated())
            .unwrap()
    };
    let default = ingress_programs(&pg, "lbc0");
    // Read now: the program is gone once its link runs another.
    let default_size = translated_size(default[0].1);
    let seen = through_a_restart(&mut pg, |pg| {
        assert!(pg.stop_lb().unwrap());
        start_lb_adding(pg, &["--test-program-variant", "1"]);
        pg.wait_for_log("took over the links", Duration::from_secs(10)).unwrap();
    });
    assert_unnoticed(&seen, &pg);
    let variant = ingress_programs(&pg, "lbc0");
    assert_eq!(variant.len(), 1, "{variant:?}");
    assert_ne!(variant[0].1, default[0].1);
    assert_ne!(translated_size(variant[0].1), default_size, "the code differs");
    // Only the variant counts packets in that slot: its code runs on the traffic.
    let counted = packets_counted(&pg);
    assert!(counted > 500, "{counted}");

    let seen = through_a_restart(&mut pg, |pg| {
        assert!(pg.stop_lb().unwrap());
        pg.start_lb().unwrap();
        pg.wait_for_log("took over the links", Duration::from_secs(10)).unwrap();
    });
    assert_unnoticed(&seen, &pg);
    // The first sync of the new lb changed nothing (the pinned maps held it all), and says so
    // at info: without this line only /healthz would tell that it happened.
    pg.wait_for_log(" synced ", Duration::from_secs(10)).unwrap();
    let log = pg.lb_log();
    let synced = log.lines().find(|line| line.contains(" synced ")).unwrap();
    assert!(synced.contains("INFO") && synced.contains("programmed=0"), "{log}");
    let back = ingress_programs(&pg, "lbc0");
    assert_eq!(translated_size(back[0].1), default_size);
    let counted_after = packets_counted(&pg);
    // The variant ran until its link switched; nothing counts there since.
    std::thread::sleep(Duration::from_millis(300));
    let _ = pg
        .client
        .run(|| loadgen::tcp_rr(SocketAddr::V4(SocketAddrV4::new(VIP, 80)), 1, Duration::from_millis(200)));
    assert_eq!(packets_counted(&pg), counted_after);
    stop.store(true, Ordering::Relaxed);
}
