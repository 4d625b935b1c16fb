//! IPv6 and dual-stack Services through lb with real traffic: a dual-stack playground (client,
//! node and pods with both families, see `tests::playground`), lb on a manifest directory with
//! dual-stack Pods, so its own EndpointSlice controller makes a slice per family.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use lb_userspace::dataplane::maps::MapsSnapshot;
use tests::playground::{CLIENT_IP6, Playground, dual_stack_pod_manifest, pod_ipv6};
use tests::{require_root, unique};

const VIP4: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 50);
const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x96, 0, 0, 0, 0, 0x50);
const EMPTY6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x96, 0, 0, 0, 0, 0x60);
const POD_A: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 11);
const POD_B: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 12);
/// The node's address on the client's link.
const NODE6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 1);

const SERVICES: &str = "apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  type: NodePort
  ipFamilyPolicy: RequireDualStack
  ipFamilies: [IPv4, IPv6]
  clusterIP: 10.96.0.50
  clusterIPs: [10.96.0.50, \"fd00:10:96::50\"]
  selector: {app: web}
  ports:
    - {name: http, port: 80, targetPort: http, nodePort: 30080}
    - {name: dns, port: 53, targetPort: 5353, protocol: UDP, nodePort: 30053}
---
apiVersion: v1
kind: Service
metadata: {name: empty, namespace: default}
spec:
  ipFamilies: [IPv6]
  clusterIP: \"fd00:10:96::60\"
  ports:
    - {port: 80}
";

/// The backend count of the frontend at `ip`:`port`, if programmed.
fn backend_count(snapshot: &MapsSnapshot, ip: IpAddr, port: u16, protocol: u8) -> Option<u16> {
    snapshot
        .services
        .iter()
        .find(|(k, _)| k.backend_slot == 0 && k.ip == ip && k.port == port && k.protocol == protocol)
        .map(|(_, v)| v.backend_count)
}

/// Starts lb on the playground's manifests, with `extra` flags.
fn start_lb(pg: &mut Playground, extra: &[&str]) {
    // A range of each family, as a dual-stack API server has (explicit ClusterIPs must be in
    // their family's range).
    let manifests = pg.manifests.clone();
    let mut args: Vec<&std::ffi::OsStr> = vec![
        "--manifests".as_ref(),
        manifests.as_os_str(),
        "--service-cluster-ip-range".as_ref(),
        "10.96.0.0/12,fd00:10:96::/112".as_ref(),
    ];
    args.extend(extra.iter().map(std::ffi::OsStr::new));
    pg.start_lb_with(&args).unwrap();
}

/// One datagram to `target` on `socket` and the answer's text (the pod's name), if one came.
fn udp_ask(socket: &UdpSocket, target: SocketAddr) -> Option<String> {
    socket.send_to(b"ping", target).ok()?;
    let mut buf = [0u8; 64];
    let (len, from) = socket.recv_from(&mut buf).ok()?;
    assert_eq!(from, target);
    Some(String::from_utf8_lossy(&buf[..len]).into_owned())
}

fn playground() -> Playground {
    require_root();
    let mut pg = Playground::dual_stack(&unique("v6"), &[("web-a", POD_A), ("web-b", POD_B)]).unwrap();
    pg.serve_http(8080).unwrap();
    pg.serve_udp(5353).unwrap();
    pg.write_manifest("services.yaml", SERVICES).unwrap();
    pg.write_manifest("web-a.yaml", &dual_stack_pod_manifest("web-a", POD_A)).unwrap();
    pg.write_manifest("web-b.yaml", &dual_stack_pod_manifest("web-b", POD_B)).unwrap();
    start_lb(&mut pg, &[]);
    pg.wait_for_maps(Duration::from_secs(10), |s| {
        backend_count(s, VIP6.into(), 80, lb_common::PROTOCOL_TCP) == Some(2)
            && backend_count(s, VIP6.into(), 53, lb_common::PROTOCOL_UDP) == Some(2)
            && backend_count(s, VIP4.into(), 80, lb_common::PROTOCOL_TCP) == Some(2)
            && backend_count(s, EMPTY6.into(), 80, lb_common::PROTOCOL_TCP) == Some(0)
            && backend_count(s, NODE6.into(), 30080, lb_common::PROTOCOL_TCP) == Some(2)
    })
    .unwrap();
    pg
}

#[test]
fn a_dual_stack_service_is_reached_over_both_families() {
    let pg = playground();
    let snapshot = pg.snapshot();
    // Each family's frontend has only that family's backends.
    for (key, value) in snapshot.services.iter().filter(|(k, _)| k.backend_slot > 0) {
        let backend = snapshot.backends[&value.backend_id];
        assert_eq!(key.ip.is_ipv4(), backend.ip.is_ipv4(), "{key:?} -> {backend:?}");
    }

    // Over IPv6: every connection succeeds, both pods answer, the client talks to the ClusterIP
    // only and the pods see the client's own address (a ClusterIP is not source-NATed).
    let answers = pg.http_requests(SocketAddr::new(VIP6.into(), 80), 40).unwrap();
    let mut per_pod: BTreeMap<String, usize> = BTreeMap::new();
    for answer in &answers {
        let answer = answer.as_ref().unwrap_or_else(|e| panic!("request failed: {e}\n{}", pg.lb_log()));
        *per_pod.entry(answer.pod.clone()).or_default() += 1;
        assert_eq!(answer.peer, SocketAddr::new(VIP6.into(), 80));
        assert_eq!(answer.client_seen, CLIENT_IP6.to_string());
    }
    assert_eq!(answers.len(), 40);
    assert_eq!(per_pod.len(), 2, "both pods should answer over IPv6: {per_pod:?}");

    // Over IPv4, the same Service.
    let answers = pg.http_requests(SocketAddr::new(VIP4.into(), 80), 10).unwrap();
    assert!(answers.iter().all(Result::is_ok), "{answers:?}\n{}", pg.lb_log());

    // UDP over IPv6: the answer comes back from the ClusterIP.
    let (pod, from) = pg.udp_request(SocketAddr::new(VIP6.into(), 53)).unwrap();
    assert!(pod.starts_with("web-"), "{pod}");
    assert_eq!(from, SocketAddr::new(VIP6.into(), 53));

    // `lb services` lists the IPv6 frontends as socket addresses.
    let table = pg.services_table().unwrap();
    assert!(table.contains("[fd00:10:96::50]:80/TCP"), "{table}");
    assert!(table.contains(&format!("[{}]:8080", pod_ipv6(POD_A))), "{table}");
}

#[test]
fn an_ipv6_service_without_endpoints_refuses_connections() {
    let pg = playground();
    let started = Instant::now();
    let answer = pg.client.run(|| tests::playground::http_get(SocketAddr::new(EMPTY6.into(), 80))).unwrap();
    let error = answer.expect_err("a Service without endpoints must not answer");
    let refused = error.downcast_ref::<std::io::Error>().map(std::io::Error::kind);
    assert_eq!(refused, Some(std::io::ErrorKind::ConnectionRefused), "{error:#}");
    // A RST, not a timeout.
    assert!(started.elapsed() < Duration::from_secs(1), "took {:?}", started.elapsed());
}

#[test]
fn an_ipv6_udp_flow_to_a_removed_endpoint_moves_to_a_live_one() {
    let mut pg = playground();
    let target = SocketAddr::new(VIP6.into(), 53);
    // One client socket throughout: the same flow.
    let socket = pg.client.run(|| UdpSocket::bind(("::", 0))).unwrap().unwrap();
    socket.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
    let ask = |socket: &UdpSocket| udp_ask(socket, target);
    let first = ask(&socket).unwrap_or_else(|| panic!("no UDP answer\n{}", pg.lb_log()));
    assert_eq!(ask(&socket).as_deref(), Some(first.as_str()), "a flow keeps its backend");

    // The pod that answered goes away: its manifest and its namespace.
    std::fs::remove_file(pg.manifests.join(format!("{first}.yaml"))).unwrap();
    pg.remove_pod(&first);
    pg.wait_for_maps(Duration::from_secs(10), |s| {
        backend_count(s, VIP6.into(), 53, lb_common::PROTOCOL_UDP) == Some(1)
    })
    .unwrap();

    // The collector ends the flow to the removed backend, so a datagram soon picks the other.
    // (The removed pod's server may still answer for a moment: its namespace lives until its
    // thread lets go of the socket.)
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match ask(&socket) {
            Some(pod) if pod != first => break,
            _ if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            _ => panic!("the flow never moved off the removed pod\n{}", pg.lb_log()),
        }
    }
}

#[test]
fn an_ipv6_node_port_source_nats_and_routes_replies_back() {
    let pg = playground();
    let target = SocketAddr::new(NODE6.into(), 30080);
    let answers = pg.http_requests(target, 20).unwrap();
    let mut per_pod: BTreeMap<String, usize> = BTreeMap::new();
    for answer in &answers {
        let answer = answer.as_ref().unwrap_or_else(|e| panic!("request failed: {e}\n{}", pg.lb_log()));
        *per_pod.entry(answer.pod.clone()).or_default() += 1;
        assert_eq!(answer.peer, target);
        // Cluster policy: the pod sees one of the node's own IPv6 addresses, not the client.
        let seen: Ipv6Addr = answer.client_seen.parse().unwrap();
        assert_ne!(seen, CLIENT_IP6);
        let node_pod_side: Ipv6Addr = "fd00:10:244::1".parse().unwrap();
        assert!(seen == NODE6 || seen == node_pod_side, "{seen} is not one of the node's addresses");
    }
    assert_eq!(answers.len(), 20);
    assert_eq!(per_pod.len(), 2, "both pods should answer: {per_pod:?}");
}

/// The node's own sockets (lb's namespace) reach an IPv6 ClusterIP through the socket
/// programs: connect and sendmsg go to a backend, getpeername and recvmsg report the frontend.
#[test]
fn the_node_reaches_an_ipv6_cluster_ip_through_its_sockets() {
    let mut pg = playground();
    // Into the cgroup lb's socket programs are attached to, until the playground goes.
    pg.cgroup.enter().unwrap();
    let target = SocketAddr::new(VIP6.into(), 80);
    let answers: Vec<_> =
        pg.node.run(move || (0..10).map(|_| tests::playground::http_get(target)).collect()).unwrap();
    for answer in answers {
        let answer = answer.unwrap_or_else(|e| panic!("request from the node failed: {e}\n{}", pg.lb_log()));
        assert!(answer.pod.starts_with("web-"), "{answer:?}");
        assert_eq!(answer.peer, target, "getpeername reports the ClusterIP");
    }
    let udp = SocketAddr::new(VIP6.into(), 53);
    let (pod, from) = pg
        .node
        .run(move || -> std::io::Result<(String, SocketAddr)> {
            let socket = UdpSocket::bind(("::", 0))?;
            socket.set_read_timeout(Some(Duration::from_secs(2)))?;
            socket.send_to(b"ping", udp)?;
            let mut buf = [0u8; 64];
            let (len, from) = socket.recv_from(&mut buf)?;
            Ok((String::from_utf8_lossy(&buf[..len]).into_owned(), from))
        })
        .unwrap()
        .unwrap();
    assert!(pod.starts_with("web-"), "{pod}");
    assert_eq!(from, udp, "recvmsg reports the ClusterIP");
    // A Service without endpoints refuses the connect, as kube-proxy's REJECT does.
    let empty = SocketAddr::new(EMPTY6.into(), 80);
    let refused =
        pg.node.run(move || std::net::TcpStream::connect_timeout(&empty, Duration::from_secs(2))).unwrap();
    assert_eq!(refused.map(|_| ()).unwrap_err().kind(), std::io::ErrorKind::ConnectionRefused);
}

/// Path MTU discovery through an IPv6 ClusterIP: a pod's "packet too big" about the datagram it
/// received reaches the client about the datagram it sent, and its socket's path MTU drops.
#[test]
fn packet_too_big_from_a_pod_reaches_the_client_about_the_cluster_ip() {
    let pg = playground();
    let client = pg
        .client
        .run(|| {
            let socket = UdpSocket::bind((CLIENT_IP6, 0)).unwrap();
            socket.connect((VIP6, 53)).unwrap();
            socket.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            socket.send(b"ping").unwrap();
            let mut buffer = [0u8; 64];
            let (len, _) = socket.recv_from(&mut buffer).expect("answer through the ClusterIP");
            (socket, String::from_utf8_lossy(&buffer[..len]).into_owned())
        })
        .unwrap();
    let (client, pod) = client;
    assert_eq!(tests::path_mtu(&client), 1500);
    let client_port = client.local_addr().unwrap().port();
    let index = pg.pods.iter().position(|p| p.name == pod).expect("the pod that answered");
    let pod_ip = pg.pods[index].ip6.unwrap();

    // What the pod received (client -> pod:5353), quoted in its "packet too big, MTU 1280"; the
    // kernel fills in the ICMPv6 checksum of a raw ICMPv6 socket.
    let received = tests::packet::Packet6Spec::udp((CLIENT_IP6, client_port), (pod_ip, 5353));
    let frame = tests::packet::icmpv6_error(pod_ip, CLIENT_IP6, 2, 0, 1280, &received);
    let icmp = frame[tests::packet::ETH_LEN + 40..].to_vec();
    pg.pods[index]
        .ns
        .run(move || {
            let socket = socket2::Socket::new(
                socket2::Domain::IPV6,
                socket2::Type::RAW,
                Some(socket2::Protocol::ICMPV6),
            )
            .unwrap();
            socket.send_to(&icmp, &SocketAddr::new(CLIENT_IP6.into(), 0).into()).unwrap();
        })
        .unwrap();

    // Only a translated error (about client -> ClusterIP) finds the client's socket.
    let deadline = Instant::now() + Duration::from_secs(2);
    while tests::path_mtu(&client) != 1280 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(tests::path_mtu(&client), 1280, "lb log:\n{}", pg.lb_log());
}

/// A UDP datagram larger than the link MTU leaves the client in fragments; every fragment must
/// reach the same backend, translated, for the pod to reassemble and answer it.
#[test]
fn a_fragmented_ipv6_datagram_reaches_its_backend() {
    let pg = playground();
    let target = SocketAddr::new(VIP6.into(), 53);
    let answer = pg
        .client
        .run(move || -> std::io::Result<(String, SocketAddr)> {
            let socket = UdpSocket::bind(("::", 0))?;
            socket.set_read_timeout(Some(Duration::from_secs(2)))?;
            socket.send_to(&[b'x'; 4000], target)?;
            let mut buf = [0u8; 64];
            let (len, from) = socket.recv_from(&mut buf)?;
            Ok((String::from_utf8_lossy(&buf[..len]).into_owned(), from))
        })
        .unwrap();
    let (pod, from) =
        answer.unwrap_or_else(|e| panic!("no answer to a fragmented datagram: {e}\n{}", pg.lb_log()));
    assert!(pod.starts_with("web-"), "{pod}");
    assert_eq!(from, target);
}

/// A start with other map sizes migrates the IPv6 maps as well (the `--max-*` flags size both
/// families'), and an IPv6 flow keeps its backend across it.
#[test]
fn a_start_with_other_map_sizes_migrates_the_ipv6_maps_and_their_flows() {
    let mut pg = playground();
    let target = SocketAddr::new(VIP6.into(), 53);
    let socket = pg.client.run(|| UdpSocket::bind(("::", 0))).unwrap().unwrap();
    socket.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    let first = udp_ask(&socket, target).unwrap_or_else(|| panic!("no UDP answer\n{}", pg.lb_log()));

    // SIGTERM: the data path keeps serving while no lb runs.
    assert!(pg.stop_lb().unwrap(), "{}", pg.lb_log());
    start_lb(&mut pg, &["--max-flows", "300000", "--max-backends", "70000"]);
    pg.wait_for_log("migrated maps in place", Duration::from_secs(20)).unwrap();
    let size = |name: &str| {
        lb_userspace::dataplane::datapath::pinned_shape(&pg.bpf_dir.join(name)).unwrap().max_entries
    };
    assert_eq!(size(lb_common::map_names::CONNTRACK6), 300_000);
    assert_eq!(size(lb_common::map_names::BACKENDS6), 70_000);
    assert_eq!(size(lb_common::map_names::CONNTRACK), 300_000);
    for _ in 0..5 {
        assert_eq!(udp_ask(&socket, target).as_deref(), Some(first.as_str()), "the flow keeps its backend");
    }
    let log = pg.lb_log();
    assert!(log.contains("looked up in the old one"), "{log}");
}
