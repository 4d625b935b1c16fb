//! Flows over their whole life, with real traffic through lb in network namespaces: flow state
//! that ends with its flow and never captures connections that are not lb's, endpoints in the
//! node's own host network, session affinity, endpoint removal, fragments.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use tests::bench::loadgen;
use tests::playground::{CLIENT_IP, Playground};
use tests::{require_root, unique};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const POD_A: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 11);
const POD_B: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 12);
/// The node's address on the client's side (see `tests::playground`).
const NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
const ECHO_PORT: u16 = 8080;

/// A Service `echo` on VIP:80 (TCP) and VIP:53 (UDP) to port 8080/5353 of `endpoints`, with
/// `spec_extra` added to its spec (indented two spaces).
fn echo_service(endpoints: &[Ipv4Addr], spec_extra: &str) -> String {
    let endpoints: String = endpoints
        .iter()
        .map(|ip| format!("  - addresses: [\"{ip}\"]\n    conditions: {{ready: true}}\n"))
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

fn backend_count(snapshot: &lb_userspace::maps::MapsSnapshot) -> Option<u16> {
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
    pg.start_lb().unwrap();
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
    assert!(pg.stop_lb().unwrap());
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
}
