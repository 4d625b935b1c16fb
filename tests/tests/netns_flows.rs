//! Flows over their whole life, with real traffic through lb in network namespaces: flow state
//! that ends with its flow and never captures connections that are not lb's, endpoints in the
//! node's own host network, session affinity, endpoint removal, fragments.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{TcpStream, UdpSocket};

use lb_userspace::dataplane::conntrack::FlowRow;
use tests::bench::loadgen;
use tests::playground::{CLIENT_IP, Playground};
use tests::{lb_binary, require_root, unique};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const POD_A: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 11);
const POD_B: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 12);
const POD_C: Ipv4Addr = Ipv4Addr::new(10, 244, 3, 13);
/// The node's address on the client's side (see `tests::playground`).
const NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
const ECHO_PORT: u16 = 8080;

/// A Service `echo` on VIP:80 (TCP) and VIP:53 (UDP) to port 8080/5353 of `endpoints`, with
/// `spec_extra` added to its spec (indented two spaces).
fn echo_service(endpoints: &[Ipv4Addr], spec_extra: &str) -> String {
    let ready: Vec<(Ipv4Addr, &str)> = endpoints.iter().map(|ip| (*ip, "{ready: true}")).collect();
    echo_service_with(&ready, spec_extra)
}

/// `echo_service`, each endpoint with its own conditions (`{ready: true}`, say).
fn echo_service_with(endpoints: &[(Ipv4Addr, &str)], spec_extra: &str) -> String {
    let endpoints: String = endpoints
        .iter()
        .map(|(ip, conditions)| format!("  - addresses: [\"{ip}\"]\n    conditions: {conditions}\n"))
        .collect();
    format!(
        "apiVersion: v1
kind: Service
metadata: {{name: echo, namespace: default}}
spec:
  clusterIP: {VIP}
  ports:
    - {{name: tcp, port: 80, targetPort: {ECHO_PORT}}}
    - {{name: udp, port: 53, targetPort: 5353, protocol: UDP}}
{spec_extra}---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: echo-abcde
  namespace: default
  labels: {{kubernetes.io/service-name: echo}}
addressType: IPv4
ports:
  - {{name: tcp, port: {ECHO_PORT}, protocol: TCP}}
  - {{name: udp, port: 5353, protocol: UDP}}
endpoints:
{endpoints}"
    )
}

fn backend_count(snapshot: &lb_userspace::dataplane::maps::MapsSnapshot) -> Option<u16> {
    snapshot
        .services
        .iter()
        .find(|(k, _)| k.backend_slot == 0 && k.address() == VIP && k.port() == 80)
        .map(|(_, v)| v.backend_count)
}

/// A playground whose pods run the load generator's echo servers (TCP 8080, UDP 5353), with
/// the client's ephemeral ports spread wide (so ports are reused as on a busy client), the
/// echo Service written and lb started and synced.
fn echo_playground(pods: &[(&str, Ipv4Addr)], manifest: &str) -> (Playground, Arc<AtomicBool>) {
    echo_playground_with(pods, manifest, &[])
}

/// `echo_playground`, with more `lb run` flags.
fn echo_playground_with(
    pods: &[(&str, Ipv4Addr)],
    manifest: &str,
    lb_flags: &[&str],
) -> (Playground, Arc<AtomicBool>) {
    require_root();
    let mut pg = Playground::new(&unique("f"), pods).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    for pod in &pg.pods {
        let listener = pod.ns.run(|| TcpListener::bind(("0.0.0.0", ECHO_PORT))).unwrap().unwrap();
        loadgen::serve_echo(listener, stop.clone()).unwrap();
        let socket = pod.ns.run(|| std::net::UdpSocket::bind(("0.0.0.0", 5353))).unwrap().unwrap();
        loadgen::serve_udp_echo(socket, stop.clone()).unwrap();
    }
    pg.client.sysctl("net.ipv4.ip_local_port_range", "1024 65000").unwrap();
    pg.write_manifest("echo.yaml", manifest).unwrap();
    let manifests = pg.manifests.clone();
    let mut args: Vec<&std::ffi::OsStr> = vec!["--manifests".as_ref(), manifests.as_os_str()];
    args.extend(lb_flags.iter().map(std::ffi::OsStr::new));
    pg.start_lb_with(&args).unwrap();
    pg.wait_for_maps(Duration::from_secs(10), |s| backend_count(s).is_some()).unwrap();
    (pg, stop)
}

fn crr(pg: &Playground, target: SocketAddrV4, duration: Duration) -> loadgen::Stats {
    pg.client
        .run(move || loadgen::tcp_crr(SocketAddr::V4(target), 4, duration))
        .unwrap()
        .unwrap_or_else(|e| panic!("connect/request/close to {target}: {e}\n{}", pg.lb_log()))
}

/// The first bug of "Connections over their whole life": the reply entries of ended
/// ClusterIP flows (pod:port -> client:port) used to match the pod's SYN-ACK to a later direct
/// connection from the same client port and rewrite its source to the ClusterIP, so the
/// client never saw it. A pod reaching a peer both through a Service and directly lost its
/// direct connections.
#[test]
fn ended_flows_do_not_capture_later_direct_connections() {
    let (pg, stop) =
        echo_playground(&[("pod-a", POD_A), ("pod-b", POD_B)], &echo_service(&[POD_A, POD_B], ""));
    let direct = SocketAddrV4::new(POD_A, ECHO_PORT);
    let before = crr(&pg, direct, Duration::from_secs(1));
    assert!(before.rate > 100.0 && before.errors == 0, "direct, before any Service traffic: {before:?}");

    // Enough connections through the ClusterIP that the client's ports wrap around.
    let through_lb = crr(&pg, SocketAddrV4::new(VIP, 80), Duration::from_secs(4));
    assert!(through_lb.rate > 100.0 && through_lb.errors == 0, "through the ClusterIP: {through_lb:?}");

    let after = crr(&pg, direct, Duration::from_secs(2));
    eprintln!("direct before: {before:?}\nthrough lb: {through_lb:?}\ndirect after: {after:?}");
    assert_eq!(after.errors, 0, "direct connections failed after Service traffic\n{}", pg.lb_log());
    assert!(after.rate > before.rate / 3.0, "direct connections slowed down: {after:?} vs {before:?}");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
}

/// The second bug: an endpoint in the node's own host network (a server listening in the
/// node's namespace, as the API server behind `kubernetes.default`, or a hostNetwork pod). Its
/// reply leaves through an interface's egress and must be translated back there.
#[test]
fn an_endpoint_in_the_nodes_host_network_answers_through_the_cluster_ip() {
    let (mut pg, stop) = echo_playground(&[("pod-a", POD_A)], &echo_service(&[NODE_IP], ""));
    let listener = pg.node.run(|| TcpListener::bind(("0.0.0.0", ECHO_PORT))).unwrap().unwrap();
    listener.set_nonblocking(true).unwrap();
    let name_stop = stop.clone();
    std::thread::spawn(move || tests::playground::http_server(listener, "node".into(), name_stop));

    // From the client, through the node's client-side interface.
    let answers = pg.http_requests(SocketAddrV4::new(VIP, 80), 20).unwrap();
    for answer in &answers {
        let answer =
            answer.as_ref().unwrap_or_else(|e| panic!("client -> ClusterIP -> node: {e}\n{}", pg.lb_log()));
        assert_eq!(answer.pod, "node");
        assert_eq!(answer.peer, SocketAddr::V4(SocketAddrV4::new(VIP, 80)));
        assert_eq!(answer.client_seen, CLIENT_IP.to_string());
    }
    assert_eq!(answers.len(), 20);

    // From a pod, through its own veth.
    let target = SocketAddrV4::new(VIP, 80);
    let from_pod = pg.pods[0]
        .ns
        .run(move || {
            (0..10)
                .map(|_| tests::playground::http_get(target).map_err(|e| e.to_string()))
                .collect::<Vec<_>>()
        })
        .unwrap();
    for answer in from_pod {
        let answer = answer.unwrap_or_else(|e| panic!("pod -> ClusterIP -> node: {e}\n{}", pg.lb_log()));
        assert_eq!(answer.pod, "node");
        assert_eq!(answer.peer, SocketAddr::V4(target));
        assert_eq!(answer.client_seen, POD_A.to_string());
    }

    // Many connections in a row: none stalls.
    let load = crr(&pg, target, Duration::from_secs(1));
    assert!(load.errors == 0 && load.rate > 100.0, "{load:?}");

    // From the node itself: its own sockets are translated at connect, over loopback.
    pg.cgroup.enter().unwrap();
    let from_node =
        pg.node.run(move || tests::playground::http_get(target).map_err(|e| e.to_string())).unwrap();
    let answer = from_node.unwrap_or_else(|e| panic!("node -> ClusterIP -> node: {e}\n{}", pg.lb_log()));
    assert_eq!((answer.pod.as_str(), answer.peer), ("node", SocketAddr::V4(target)));
    assert!(pg.stop_lb().unwrap());
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
}

/// `lb conntrack -o json` for the playground's maps.
fn flows(pg: &Playground) -> Vec<FlowRow> {
    let out = std::process::Command::new(lb_binary())
        .args(["conntrack", "-o", "json", "--bpf-dir"])
        .arg(&pg.bpf_dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "lb conntrack: {}", String::from_utf8_lossy(&out.stderr));
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    rows.into_iter()
        .map(|row| FlowRow {
            protocol: if row["protocol"] == "TCP" { "TCP" } else { "UDP" },
            client: row["client"].as_str().unwrap().to_string(),
            frontend: row["frontend"].as_str().unwrap().to_string(),
            backend: row["backend"].as_str().unwrap().to_string(),
            snat: row["snat"].as_str().map(str::to_string),
            state: "",
            backend_gone: row["backend_gone"].as_bool().unwrap(),
            age_seconds: row["age_seconds"].as_u64().unwrap(),
            idle_seconds: row["idle_seconds"].as_u64().unwrap(),
            service: row["service"].as_str().map(str::to_string),
        })
        .collect()
}

/// The backend (pod address) `lb conntrack` shows for the client-side socket `local`.
fn backend_of(pg: &Playground, local: SocketAddr) -> Ipv4Addr {
    let row = flows(pg)
        .into_iter()
        .find(|row| row.client == local.to_string())
        .unwrap_or_else(|| panic!("no flow from {local} in lb conntrack"));
    assert_eq!(row.service.as_deref(), Some("default/echo:tcp"), "{row:?}");
    row.backend.split(':').next().unwrap().parse().unwrap()
}

/// One echo exchange on a persistent connection.
fn echo(stream: &mut TcpStream) -> std::io::Result<()> {
    let mut buffer = [7u8; loadgen::MESSAGE];
    stream.write_all(&buffer)?;
    stream.read_exact(&mut buffer)
}

/// A removed endpoint: its TCP flows are answered with a RST at the client's next packet
/// (not moved to another pod mid-stream), its UDP flows are ended at once so the client moves
/// on; a terminating endpoint that still serves keeps its flows.
#[test]
fn a_removed_endpoints_flows_end_and_a_terminating_ones_go_on() {
    let (mut pg, stop) =
        echo_playground(&[("pod-a", POD_A), ("pod-b", POD_B)], &echo_service(&[POD_A, POD_B], ""));
    let target = SocketAddrV4::new(VIP, 80);
    // Persistent connections until both pods have one.
    let mut connections: Vec<(TcpStream, Ipv4Addr)> = Vec::new();
    while connections.iter().map(|(_, pod)| *pod).collect::<BTreeSet<_>>().len() < 2 {
        let mut stream = pg
            .client
            .run(move || TcpStream::connect_timeout(&target.into(), Duration::from_secs(2)))
            .unwrap()
            .unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        echo(&mut stream).unwrap();
        let pod = backend_of(&pg, stream.local_addr().unwrap());
        connections.push((stream, pod));
        assert!(connections.len() < 40, "every connection went to one pod");
    }
    // pod-b turns terminating but serving: its flows go on.
    let terminating = "{ready: false, serving: true, terminating: true}";
    pg.write_manifest("echo.yaml", &echo_service_with(&[(POD_A, "{ready: true}"), (POD_B, terminating)], ""))
        .unwrap();
    pg.wait_for_maps(Duration::from_secs(5), |s| backend_count(s) == Some(1)).unwrap();
    std::thread::sleep(Duration::from_millis(1500)); // a collector pass has run
    for (stream, pod) in &mut connections {
        echo(stream).unwrap_or_else(|e| panic!("a flow to terminating {pod} broke: {e}\n{}", pg.lb_log()));
    }

    // pod-b leaves the Service (the pod still runs): its flows end with a RST.
    pg.write_manifest("echo.yaml", &echo_service(&[POD_A], "")).unwrap();
    let started = std::time::Instant::now();
    for (stream, pod) in &mut connections {
        if *pod == POD_A {
            echo(stream).unwrap();
            continue;
        }
        let error = loop {
            if let Err(error) = echo(stream) {
                break error;
            }
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "the flow to removed {pod} still works\n{}",
                pg.lb_log()
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        assert_eq!(error.kind(), std::io::ErrorKind::ConnectionReset, "{error}");
    }
    eprintln!("reset {:?} after the endpoint's removal", started.elapsed());
    let counters = std::process::Command::new(lb_binary())
        .args(["counters", "--bpf-dir"])
        .arg(&pg.bpf_dir)
        .output()
        .unwrap();
    let counters = String::from_utf8_lossy(&counters.stdout).into_owned();
    assert!(
        counters.lines().any(|l| l.starts_with("reset_backend_gone") && !l.ends_with(" 0")),
        "{counters}"
    );
    pg.remove_pod("pod-b");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
}

/// kube-proxy's stale UDP cleanup: a client that keeps its socket (and so its 5-tuple) moves
/// to a live endpoint as soon as its own is removed, although that pod still answers.
#[test]
fn udp_clients_move_on_when_their_endpoint_is_removed() {
    let (pg, stop) =
        echo_playground(&[("pod-a", POD_A), ("pod-b", POD_B)], &echo_service(&[POD_A, POD_B], ""));
    // A Service whose UDP servers answer with their pod's name.
    pg.serve_udp(5454).unwrap();
    let names = Ipv4Addr::new(10, 96, 0, 21);
    let service = |pods: &[Ipv4Addr]| {
        let endpoints: Vec<String> = pods.iter().map(|ip| format!("{{addresses: [{ip}]}}")).collect();
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: names}}\nspec:\n  clusterIP: {names}\n  ports: [{{port: 54, targetPort: 5454, protocol: UDP}}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: names-1, labels: {{kubernetes.io/service-name: names}}}}\naddressType: IPv4\nports: [{{port: 5454, protocol: UDP}}]\nendpoints: [{}]\n",
            endpoints.join(", ")
        )
    };
    pg.write_manifest("names.yaml", &service(&[POD_A, POD_B])).unwrap();
    pg.wait_for_maps(Duration::from_secs(5), |s| {
        s.services.iter().any(|(k, v)| k.address() == names && k.backend_slot == 0 && v.backend_count == 2)
    })
    .unwrap();
    let socket = pg.client.run(|| UdpSocket::bind(("0.0.0.0", 0))).unwrap().unwrap();
    socket.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
    let ask = |socket: &UdpSocket| -> Option<String> {
        socket.send_to(b"ping", (names, 54)).ok()?;
        let mut buffer = [0u8; 64];
        let (len, from) = socket.recv_from(&mut buffer).ok()?;
        assert_eq!(from, SocketAddr::V4(SocketAddrV4::new(names, 54)));
        Some(String::from_utf8_lossy(&buffer[..len]).into_owned())
    };
    let first = ask(&socket).expect("an answer");
    for _ in 0..5 {
        assert_eq!(ask(&socket).as_deref(), Some(first.as_str()), "one flow, one pod");
    }
    let (stays, leaves) = if first == "pod-a" { (POD_B, "pod-a") } else { (POD_A, "pod-b") };
    pg.write_manifest("names.yaml", &service(&[stays])).unwrap();
    let started = std::time::Instant::now();
    loop {
        match ask(&socket) {
            Some(pod) if pod != leaves => break,
            _ => {}
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the UDP flow stayed on {leaves}\n{}",
            pg.lb_log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!("the UDP client moved on {:?} after its endpoint's removal", started.elapsed());
    // The collector logs its pass once the pass is over, which may be just after the datagram
    // that found the flow gone.
    pg.wait_for_log("flows whose backend is no longer an endpoint", Duration::from_secs(2)).unwrap();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
}

/// sessionAffinity ClientIP: every connection from one client goes to one pod within the
/// timeout (kube-proxy's window slides with each new connection), a new choice after it;
/// the node's own connections (socket programs) too.
#[test]
fn session_affinity_sticks_within_its_timeout() {
    let affinity = "  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 1}}\n";
    let pods = [("pod-a", POD_A), ("pod-b", POD_B), ("pod-c", POD_C)];
    let (mut pg, stop) = echo_playground(&[], &echo_service(&[POD_A, POD_B, POD_C], affinity));
    for (name, ip) in pods {
        pg.add_pod(name, ip).unwrap().serve_http(ECHO_PORT).unwrap();
    }
    pg.wait_for_log("attached to ingress and egress interface=lbp2", Duration::from_secs(5)).unwrap();
    let target = SocketAddrV4::new(VIP, 80);
    let pods_seen = |pg: &Playground, count: usize| -> BTreeSet<String> {
        pg.http_requests(target, count)
            .unwrap()
            .into_iter()
            .map(|a| a.unwrap_or_else(|e| panic!("{e}\n{}", pg.lb_log())).pod)
            .collect()
    };
    // Within the timeout (each connection renews it): one pod.
    for _ in 0..3 {
        let seen = pods_seen(&pg, 15);
        assert_eq!(seen.len(), 1, "{seen:?}");
        std::thread::sleep(Duration::from_millis(500));
    }
    // After it: new choices (three pods: the same one every round is a 1-in-3 chance).
    let mut chosen = BTreeSet::new();
    for _ in 0..8 {
        chosen.extend(pods_seen(&pg, 1));
        std::thread::sleep(Duration::from_millis(1300));
    }
    assert!(chosen.len() > 1, "the same pod after every timeout: {chosen:?}");

    // The node's own connections, at the socket.
    pg.cgroup.enter().unwrap();
    let from_node: BTreeSet<String> = pg
        .node
        .run(move || (0..10).map(|_| tests::playground::http_get(target).unwrap().pod).collect())
        .unwrap();
    assert_eq!(from_node.len(), 1, "{from_node:?}");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
}

/// A datagram larger than the path's MTU goes through the ClusterIP as fragments, both ways
/// (Kubernetes' e2e "should be able to handle large requests: udp").
#[test]
fn a_fragmented_udp_datagram_crosses_the_cluster_ip_both_ways() {
    let (pg, stop) = echo_playground(&[("pod-a", POD_A)], &echo_service(&[POD_A], ""));
    // A large-datagram echo server on the pod (the load generator's is for small ones).
    let server = pg.pods[0].ns.run(|| UdpSocket::bind(("0.0.0.0", 6000))).unwrap().unwrap();
    server.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
    let server_stop = stop.clone();
    std::thread::spawn(move || {
        let mut buffer = vec![0u8; 65536];
        while !server_stop.load(std::sync::atomic::Ordering::Relaxed) {
            if let Ok((len, from)) = server.recv_from(&mut buffer) {
                let _ = server.send_to(&buffer[..len], from);
            }
        }
    });
    pg.write_manifest(
        "big.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: big}\nspec:\n  clusterIP: 10.96.0.20\n  ports: [{port: 90, targetPort: 6000, protocol: UDP}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: big-1, labels: {kubernetes.io/service-name: big}}\naddressType: IPv4\nports: [{port: 6000, protocol: UDP}]\nendpoints: [{addresses: [10.244.1.11]}]\n",
    )
    .unwrap();
    let big = Ipv4Addr::new(10, 96, 0, 20);
    pg.wait_for_maps(Duration::from_secs(5), |s| s.services.keys().any(|k| k.address() == big)).unwrap();
    let message: Vec<u8> = (0..4000u32).map(|i| (i % 251) as u8).collect();
    let sent = message.clone();
    let answer = pg
        .client
        .run(move || -> std::io::Result<(Vec<u8>, SocketAddr)> {
            let socket = UdpSocket::bind(("0.0.0.0", 0))?;
            socket.set_read_timeout(Some(Duration::from_secs(2)))?;
            socket.send_to(&sent, (big, 90))?;
            let mut buffer = vec![0u8; 65536];
            let (len, from) = socket.recv_from(&mut buffer)?;
            buffer.truncate(len);
            Ok((buffer, from))
        })
        .unwrap()
        .unwrap_or_else(|e| panic!("no answer to a 4000-byte datagram: {e}\n{}", pg.lb_log()));
    assert_eq!(answer.1, SocketAddr::V4(SocketAddrV4::new(big, 90)));
    assert_eq!(answer.0, message);
    let counters = std::process::Command::new(lb_binary())
        .args(["counters", "--bpf-dir"])
        .arg(&pg.bpf_dir)
        .output()
        .unwrap();
    let counters = String::from_utf8_lossy(&counters.stdout).into_owned();
    assert!(
        counters.lines().any(|l| l.starts_with("fragment_translated") && !l.ends_with(" 0")),
        "{counters}"
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
}

/// Flows end: a hairpin UDP flow (source-NATed to the node) expires after its timeout, and the
/// same client tuple then gets the same source-NAT port again. `lb conntrack` lists the flows.
#[test]
fn an_idle_flow_expires_and_its_source_nat_port_is_reused() {
    let flags = [
        "--conntrack-udp-timeout",
        "1s",
        "--conntrack-udp-timeout-stream",
        "1s",
        "--conntrack-gc-interval",
        "200ms",
    ];
    let (pg, stop) = echo_playground_with(&[("pod-a", POD_A)], &echo_service(&[POD_A], ""), &flags);
    // pod-a reaching itself through the ClusterIP: hairpin, source-NATed.
    let socket = pg.pods[0].ns.run(|| UdpSocket::bind(("0.0.0.0", 45000))).unwrap().unwrap();
    socket.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let exchange = |socket: &UdpSocket| {
        socket.send_to(&[1u8; 16], (VIP, 53)).unwrap();
        let mut buffer = [0u8; 64];
        socket.recv_from(&mut buffer).unwrap_or_else(|e| panic!("hairpin UDP: {e}\n{}", pg.lb_log()));
    };
    exchange(&socket);
    let mine = |pg: &Playground| flows(pg).into_iter().find(|row| row.client == format!("{POD_A}:45000"));
    let flow = mine(&pg).expect("the hairpin flow is listed");
    assert_eq!((flow.frontend.as_str(), flow.backend.as_str()), ("10.96.0.10:53", "10.244.1.11:5353"));
    let port = flow.snat.clone().expect("source-NATed");
    let started = std::time::Instant::now();
    while mine(&pg).is_some() {
        assert!(started.elapsed() < Duration::from_secs(5), "the idle flow never expired");
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!("expired after {:?} idle", started.elapsed());
    exchange(&socket);
    assert_eq!(mine(&pg).expect("a new flow").snat, Some(port), "the ended flow's port is used again");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
}
