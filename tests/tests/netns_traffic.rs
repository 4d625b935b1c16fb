//! Real traffic through lb: client ns -> node ns (lb attached) -> two backend pods, with real
//! TCP and UDP servers, lb started as its own process on a manifest directory.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::Duration;

use tests::playground::{CLIENT_IP, Playground};
use tests::{require_root, unique};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const POD_A: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 11);
const POD_B: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 12);

const SERVICE: &str = "apiVersion: v1
kind: Service
metadata: {name: echo, namespace: default}
spec:
  clusterIP: 10.96.0.10
  ports:
    - {name: http, port: 80, targetPort: http}
    - {name: dns, port: 53, targetPort: 5353, protocol: UDP}
";

fn slice(pods: &[Ipv4Addr]) -> String {
    let endpoints: String = pods
        .iter()
        .map(|ip| format!("  - addresses: [\"{ip}\"]\n    conditions: {{ready: true}}\n"))
        .collect();
    format!(
        "apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: echo-abcde
  namespace: default
  labels: {{kubernetes.io/service-name: echo}}
addressType: IPv4
ports:
  - {{name: http, port: 8080, protocol: TCP}}
  - {{name: dns, port: 5353, protocol: UDP}}
endpoints:
{endpoints}"
    )
}

fn tcp_backend_count(snapshot: &lb_userspace::dataplane::maps::MapsSnapshot) -> Option<u16> {
    snapshot
        .services
        .iter()
        .find(|(k, _)| k.backend_slot == 0 && k.address() == VIP && k.port() == 80)
        .map(|(_, v)| v.backend_count)
}

/// A playground with these pods serving HTTP on 8080 and UDP on 5353, the echo Service and
/// its slice written, and lb started and synced.
fn echo_playground(pods: &[(&str, Ipv4Addr)]) -> Playground {
    require_root();
    let mut pg = Playground::new(&unique("t"), pods).unwrap();
    pg.serve_http(8080).unwrap();
    pg.serve_udp(5353).unwrap();
    pg.write_manifest("echo.yaml", SERVICE).unwrap();
    let ips: Vec<Ipv4Addr> = pods.iter().map(|(_, ip)| *ip).collect();
    pg.write_manifest("echo-slice.yaml", &slice(&ips)).unwrap();
    pg.start_lb().unwrap();
    let count = pods.len() as u16;
    pg.wait_for_maps(Duration::from_secs(10), |s| tcp_backend_count(s) == Some(count)).unwrap();
    pg
}

#[test]
fn cluster_ip_traffic_through_lb() {
    let mut pg = echo_playground(&[("pod-a", POD_A), ("pod-b", POD_B)]);

    // 100 TCP connections: all succeed, both pods answer, the client only ever talks to the
    // ClusterIP, and the pods see the client's own address.
    let target = SocketAddrV4::new(VIP, 80);
    let answers = pg.http_requests(target, 100).unwrap();
    let mut per_pod: BTreeMap<String, usize> = BTreeMap::new();
    for answer in &answers {
        let answer = answer.as_ref().unwrap_or_else(|e| panic!("request failed: {e}\n{}", pg.lb_log()));
        assert_eq!(answer.peer, SocketAddr::V4(target));
        assert_eq!(answer.client_seen, CLIENT_IP.to_string());
        *per_pod.entry(answer.pod.clone()).or_default() += 1;
    }
    assert_eq!(per_pod.values().sum::<usize>(), 100);
    assert!(
        per_pod.get("pod-a").is_some_and(|n| *n > 0) && per_pod.get("pod-b").is_some_and(|n| *n > 0),
        "{per_pod:?}"
    );

    // UDP request/response, answered from the ClusterIP.
    let (answer, from) = pg.udp_request(SocketAddrV4::new(VIP, 53)).unwrap();
    assert!(answer == "pod-a" || answer == "pod-b", "{answer}");
    assert_eq!(from, SocketAddr::V4(SocketAddrV4::new(VIP, 53)));

    // Drop pod-b from the EndpointSlice: within a second no new connection reaches it.
    pg.write_manifest("echo-slice.yaml", &slice(&[POD_A])).unwrap();
    let took = pg.wait_for_maps(Duration::from_secs(1), |s| tcp_backend_count(s) == Some(1)).unwrap();
    eprintln!("endpoint removal reached the maps in {took:?}");
    let answers = pg.http_requests(target, 30).unwrap();
    for answer in answers {
        assert_eq!(answer.unwrap().pod, "pod-a");
    }

    // Idle means idle: no re-sync without a change (lb's own reads must not wake it up).
    let syncs = || pg.lb_log().matches("synced").count();
    let before = syncs();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(syncs(), before, "lb re-synced with no change:\n{}", pg.lb_log());

    let table = pg.services_table().unwrap();
    assert!(table.contains("default/echo:http") && table.contains("10.96.0.10:80/TCP"), "{table}");
    assert!(table.contains("10.244.1.11:8080") && !table.contains("10.244.2.12:8080"), "{table}");
    assert!(pg.stop_lb().unwrap(), "lb exits cleanly on SIGTERM:\n{}", pg.lb_log());
}

#[test]
fn bad_manifest_is_reported_and_other_services_keep_working() {
    require_root();
    let mut pg = Playground::new(&unique("t"), &[("pod-a", POD_A)]).unwrap();
    pg.serve_http(8080).unwrap();
    pg.write_manifest("echo.yaml", SERVICE).unwrap();
    pg.write_manifest("echo-slice.yaml", &slice(&[POD_A])).unwrap();
    pg.write_manifest("broken.yaml", "apiVersion: v1\nkind: Service\nmetadata: {name: broken}\nspec:\n  clusterIP: 10.96.0.999\n  ports: [{port: 80}]\n").unwrap();
    pg.start_lb().unwrap();
    pg.wait_for_maps(Duration::from_secs(10), |s| tcp_backend_count(s) == Some(1)).unwrap();
    let answers = pg.http_requests(SocketAddrV4::new(VIP, 80), 5).unwrap();
    assert!(answers.iter().all(|a| a.as_ref().is_ok_and(|a| a.pod == "pod-a")), "{answers:?}");
    let log = pg.lb_log();
    assert!(
        log.contains("broken.yaml") && log.contains("Service default/broken") && log.contains("10.96.0.999"),
        "{log}"
    );
    assert!(pg.stop_lb().unwrap());
}

#[test]
fn a_missing_interface_is_a_clear_error() {
    require_root();
    let mut pg = Playground::new(&unique("t"), &[]).unwrap();
    pg.write_manifest("echo.yaml", SERVICE).unwrap();
    let out = std::process::Command::new(tests::lb_binary())
        .args(["run", "--healthz-bind-address", "", "--cgroup-path", "", "--interfaces", "nosuchif0"])
        .arg("--manifests")
        .arg(&pg.manifests)
        .arg("--bpf-dir")
        .arg(&pg.bpf_dir)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("interface nosuchif0 does not exist"), "{stderr}");
    assert!(pg.stop_lb().unwrap());
}

#[test]
fn interfaces_that_appear_later_are_attached_and_vanished_ones_forgotten() {
    let mut pg = echo_playground(&[("pod-a", POD_A)]);

    // A pod created after lb started: its veth matches `lbp*`. Its replies are only translated
    // back if lb attached to that veth, so answers from it prove the attachment.
    let pod_c = Ipv4Addr::new(10, 244, 3, 13);
    pg.add_pod("pod-c", pod_c).unwrap().serve_http(8080).unwrap();
    pg.write_manifest("echo-slice.yaml", &slice(&[POD_A, pod_c])).unwrap();
    pg.wait_for_maps(Duration::from_secs(2), |s| tcp_backend_count(s) == Some(2)).unwrap();
    let answers = pg.http_requests(SocketAddrV4::new(VIP, 80), 40).unwrap();
    let pods: std::collections::BTreeSet<String> =
        answers.into_iter().map(|a| a.unwrap_or_else(|e| panic!("{e}\n{}", pg.lb_log())).pod).collect();
    assert!(pods.contains("pod-c"), "{pods:?}\n{}", pg.lb_log());
    assert!(pg.lb_log().contains("attached to ingress and egress interface=lbp1"), "{}", pg.lb_log());
    assert!(!pg.lb_log().contains("ERROR"), "{}", pg.lb_log());

    pg.remove_pod("pod-c");
    let forgot = |log: String| {
        log.lines().any(|l| l.contains("forgot its attachment") && l.contains("interface=lbp1"))
    };
    let start = std::time::Instant::now();
    while !forgot(pg.lb_log()) && start.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(forgot(pg.lb_log()), "{}", pg.lb_log());
    assert!(pg.stop_lb().unwrap());
}

#[test]
fn the_periodic_resync_repairs_and_prunes_the_maps() {
    use lb_common::ServiceValue;
    use lb_userspace::dataplane::maps::{BpfMaps, ServiceMaps, SlotKey};
    require_root();
    let mut pg = Playground::new(&unique("t"), &[("pod-a", POD_A)]).unwrap();
    pg.serve_http(8080).unwrap();
    pg.write_manifest("echo.yaml", SERVICE).unwrap();
    pg.write_manifest("echo-slice.yaml", &slice(&[POD_A])).unwrap();
    let manifests = pg.manifests.clone();
    pg.start_lb_with(&[
        "--manifests".as_ref(),
        manifests.as_os_str(),
        "--sync-period".as_ref(),
        "500ms".as_ref(),
    ])
    .unwrap();
    pg.wait_for_maps(Duration::from_secs(10), |s| tcp_backend_count(s) == Some(1)).unwrap();

    // Behind lb's back: the service entry disappears and a stray frontend appears.
    let mut maps = BpfMaps::from_pins(&pg.bpf_dir).unwrap();
    maps.delete_service(SlotKey::new(VIP, 80, 6, 0)).unwrap();
    let stray = SlotKey::new(Ipv4Addr::new(10, 96, 9, 9), 80, 6, 0);
    maps.update_service(stray, ServiceValue::service_entry(999, 0)).unwrap();
    assert_eq!(tcp_backend_count(&pg.snapshot()), None);

    pg.wait_for_maps(Duration::from_secs(3), |s| {
        tcp_backend_count(s) == Some(1) && !s.services.contains_key(&stray)
    })
    .unwrap();
    let answers = pg.http_requests(SocketAddrV4::new(VIP, 80), 3).unwrap();
    assert!(answers.iter().all(|a| a.as_ref().is_ok_and(|a| a.pod == "pod-a")), "{answers:?}");
    assert!(pg.stop_lb().unwrap());
}

#[test]
fn fragmentation_needed_from_a_pod_reaches_the_client_about_the_cluster_ip() {
    let pg = echo_playground(&[("pod-a", POD_A)]);

    // A connected UDP socket to the ClusterIP, with one exchange so lb tracks the flow.
    let client = pg
        .client
        .run(|| {
            let socket = std::net::UdpSocket::bind((CLIENT_IP, 0)).unwrap();
            socket.connect((VIP, 53)).unwrap();
            socket.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            socket.send(b"ping").unwrap();
            let mut buffer = [0u8; 64];
            socket.recv(&mut buffer).expect("answer through the ClusterIP");
            socket
        })
        .unwrap();
    assert_eq!(tests::path_mtu(&client), 1500);
    let client_port = client.local_addr().unwrap().port();

    // The pod reports "fragmentation needed, MTU 1200" about the datagram it received
    // (client -> pod:5353), as a router or the pod's own stack would.
    let received = tests::packet::PacketSpec::udp((CLIENT_IP, client_port), (POD_A, 5353)).build();
    let frame = tests::packet::icmp_error(POD_A, CLIENT_IP, 3, 4, [0, 0, 0x04, 0xb0], &received);
    let icmp = frame[tests::packet::ETH_LEN + 20..].to_vec();
    pg.pods[0]
        .ns
        .run(move || {
            let socket = socket2::Socket::new(
                socket2::Domain::IPV4,
                socket2::Type::RAW,
                Some(socket2::Protocol::ICMPV4),
            )
            .unwrap();
            socket.send_to(&icmp, &SocketAddrV4::new(CLIENT_IP, 0).into()).unwrap();
        })
        .unwrap();

    // Only a translated error (about client -> ClusterIP) finds the client's socket.
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    while tests::path_mtu(&client) != 1200 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(tests::path_mtu(&client), 1200, "lb log:\n{}", pg.lb_log());
    let counters = std::process::Command::new(tests::lb_binary())
        .args(["counters", "--bpf-dir"])
        .arg(&pg.bpf_dir)
        .output()
        .unwrap();
    let counters = String::from_utf8_lossy(&counters.stdout);
    assert!(
        counters.lines().any(|l| l.starts_with("icmp_error_translated") && !l.trim_end().ends_with(" 0")),
        "{counters}"
    );
}

#[test]
fn the_nodes_own_connections_to_a_cluster_ip_are_balanced_at_the_socket() {
    let mut pg = echo_playground(&[("pod-a", POD_A), ("pod-b", POD_B)]);
    // This process joins the cgroup lb's socket programs sit on; its threads in the node
    // namespace are then the node's own traffic, which no interface of lb ever sees.
    pg.cgroup.enter().unwrap();

    let target = SocketAddrV4::new(VIP, 80);
    let answers = pg
        .node
        .run(move || {
            (0..20)
                .map(|_| tests::playground::http_get(target).map_err(|e| e.to_string()))
                .collect::<Vec<_>>()
        })
        .unwrap();
    let mut pods = std::collections::BTreeSet::new();
    for answer in answers {
        let answer = answer.unwrap_or_else(|e| panic!("{e}\n{}", pg.lb_log()));
        assert_eq!(answer.peer, SocketAddr::V4(target), "getpeername reports the ClusterIP");
        pods.insert(answer.pod);
    }
    assert_eq!(pods.len(), 2, "both pods answer: {pods:?}");

    // UDP without connect: each datagram is sent to a backend, the answer comes from the
    // ClusterIP.
    let (answer, from) = pg
        .node
        .run(|| {
            let socket = std::net::UdpSocket::bind(("0.0.0.0", 0)).unwrap();
            socket.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            socket.send_to(b"ping", (VIP, 53)).unwrap();
            let mut buffer = [0u8; 64];
            let (len, from) = socket.recv_from(&mut buffer).expect("UDP answer");
            (String::from_utf8_lossy(&buffer[..len]).into_owned(), from)
        })
        .unwrap();
    assert!(answer.starts_with("pod-"), "{answer}");
    assert_eq!(from, SocketAddr::V4(SocketAddrV4::new(VIP, 53)));

    // A Service without endpoints is refused at connect, as kube-proxy's REJECT refuses it.
    pg.write_manifest(
        "empty.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: empty}\nspec:\n  clusterIP: 10.96.0.11\n  ports: [{port: 80}]\n",
    )
    .unwrap();
    pg.wait_for_maps(Duration::from_secs(10), |s| {
        s.services.keys().any(|k| k.backend_slot == 0 && k.address() == Ipv4Addr::new(10, 96, 0, 11))
    })
    .unwrap();
    let refused = pg
        .node
        .run(|| {
            std::net::TcpStream::connect_timeout(
                &(Ipv4Addr::new(10, 96, 0, 11), 80).into(),
                Duration::from_secs(2),
            )
        })
        .unwrap()
        .expect_err("no endpoints: refused");
    assert_eq!(refused.kind(), std::io::ErrorKind::ConnectionRefused, "{refused}");

    // A process outside the cgroup (the client namespace is not the node's) is not touched:
    // its connection still works through the TC program.
    assert!(pg.http_requests(target, 1).unwrap()[0].is_ok());
}

/// A Service that does not fit (the services map sized by --max-service-slots) is refused
/// alone, named in the log with the flag to raise and counted; the others are served, and it
/// is served as soon as room appears.
#[test]
fn a_service_that_does_not_fit_is_refused_alone_until_room_appears() {
    require_root();
    let mut pg = Playground::new(&unique("t"), &[("pod-a", POD_A), ("pod-b", POD_B)]).unwrap();
    pg.serve_http(8080).unwrap();
    let service = |name: &str, vip: Ipv4Addr, pods: &[Ipv4Addr]| {
        let endpoints: Vec<String> = pods.iter().map(|ip| format!("{{addresses: [\"{ip}\"]}}")).collect();
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\nspec: {{clusterIP: {vip}, ports: [{{port: 80, targetPort: 8080}}]}}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {name}-1, labels: {{kubernetes.io/service-name: {name}}}}}\naddressType: IPv4\nports: [{{port: 8080}}]\nendpoints: [{}]\n",
            endpoints.join(", ")
        )
    };
    let (a, b, c) = (Ipv4Addr::new(10, 96, 1, 1), Ipv4Addr::new(10, 96, 1, 2), Ipv4Addr::new(10, 96, 1, 3));
    pg.write_manifest("a.yaml", &service("a", a, &[POD_A])).unwrap();
    pg.write_manifest("b.yaml", &service("b", b, &[POD_A, POD_B])).unwrap();
    pg.write_manifest("c.yaml", &service("c", c, &[POD_A, POD_B])).unwrap();
    let manifests = pg.manifests.clone();
    // Room for a (2 entries) and b (3), not c (3 more).
    pg.start_lb_with(&[
        "--manifests".as_ref(),
        manifests.as_os_str(),
        "--max-service-slots".as_ref(),
        "7".as_ref(),
    ])
    .unwrap();
    pg.wait_for_log("Service default/c", Duration::from_secs(10)).unwrap();
    assert!(pg.lb_log().contains("--max-service-slots"), "{}", pg.lb_log());
    for vip in [a, b] {
        let answers = pg.http_requests(SocketAddrV4::new(vip, 80), 3).unwrap();
        assert!(answers.iter().all(Result::is_ok), "{vip}: {answers:?}");
    }
    assert!(pg.http_requests(SocketAddrV4::new(c, 80), 1).unwrap()[0].is_err(), "c was refused");
    let counters = std::process::Command::new(tests::lb_binary())
        .args(["counters", "--bpf-dir"])
        .arg(&pg.bpf_dir)
        .output()
        .unwrap();
    let counters = String::from_utf8_lossy(&counters.stdout).into_owned();
    assert!(
        counters.lines().any(|l| l.starts_with("frontends_refused") && l.trim_end().ends_with(" 1")),
        "{counters}"
    );

    // b goes: c fits, and is served.
    std::fs::remove_file(pg.manifests.join("b.yaml")).unwrap();
    pg.wait_for_maps(Duration::from_secs(5), |s| {
        s.services.keys().any(|k| k.backend_slot == 0 && k.address() == c)
    })
    .unwrap();
    let answers = pg.http_requests(SocketAddrV4::new(c, 80), 3).unwrap();
    assert!(answers.iter().all(Result::is_ok), "{answers:?}");
    assert!(pg.stop_lb().unwrap());
}

/// A flood of malformed objects (YAML that does not parse, objects that fail their checks,
/// random bytes) written while traffic runs: the daemon keeps serving, and reports them.
#[test]
fn a_flood_of_malformed_objects_does_not_disturb_traffic() {
    let mut pg = echo_playground(&[("pod-a", POD_A), ("pod-b", POD_B)]);
    let bad = [
        "apiVersion: v1\nkind: Service\nmetadata: {name: bad1}\nspec: {clusterIP: 10.96.0.999, ports: [{port: 80}]}\n",
        "apiVersion: v1\nkind: Service\nmetadata: {name: bad2}\nspec: {clusterIP: 10.96.0.30, ports: [{port: 0}]}\n",
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: bad3, labels: {kubernetes.io/service-name: echo}}\naddressType: IPv4\nendpoints: [{addresses: [\"300.1.2.3\"]}]\n",
        "apiVersion: v1\nkind: Service\nmetadata: {name: bad4}\nspec: {clusterIP: 10.96.0.31, ports: [{port: 80}], sessionAffinity: Sometimes}\n",
        "{{{{ not: [yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: echo}\nspec: [this, is, not, a, spec]\n",
    ];
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (dir, writer_stop) = (pg.manifests.clone(), stop.clone());
    let writer = std::thread::spawn(move || {
        let mut written = 0u64;
        let mut seed = 0x1234_5678u64;
        while !writer_stop.load(std::sync::atomic::Ordering::Relaxed) {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
            let text = if seed.is_multiple_of(4) {
                (0..64).map(|i| ((seed >> (i % 56)) as u8 % 94 + 32) as char).collect::<String>()
            } else {
                bad[(seed >> 33) as usize % bad.len()].to_string()
            };
            let file = format!("bad-{}.yaml", written % 8);
            tests::playground::write_manifest(&dir, &file, &text).unwrap();
            written += 1;
            std::thread::sleep(Duration::from_millis(2));
        }
        written
    });
    let start = std::time::Instant::now();
    let mut requests = 0;
    while start.elapsed() < Duration::from_secs(5) {
        for answer in pg.http_requests(SocketAddrV4::new(VIP, 80), 10).unwrap() {
            answer.unwrap_or_else(|e| panic!("a request failed during the flood: {e}\n{}", pg.lb_log()));
            requests += 1;
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let written = writer.join().unwrap();
    eprintln!("{requests} requests answered while {written} malformed files were written");
    assert!(written > 500 && requests > 100);
    let log = pg.lb_log();
    assert!(log.contains("bad1") && log.contains("10.96.0.999"), "the bad objects are reported");
    assert!(pg.stop_lb().unwrap(), "lb still runs and exits cleanly:\n{}", pg.lb_log());
}
