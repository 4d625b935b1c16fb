//! External traffic across two nodes, each running lb: NodePort, LoadBalancer IPs and
//! externalIPs under both external traffic policies, source ranges, rejection of Services
//! without endpoints, hairpin, and ClusterIP traffic to a pod on the other node. Everything
//! runs in namespaces joined only to each other (see `tests::two_nodes`).

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddrV4, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use tests::require_root;
use tests::two_nodes::{CLIENT_IP, OTHER_CLIENT_IP, TwoNodes, node_ip};

const HTTP: u16 = 8080;
const LB_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 60, 10);
const RANGED_LB_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 60, 11);
const EXTERNAL_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 70, 10);
const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 50);
const SELF_CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 53);

fn pod(name: &str, app: &str, node: usize, ip: Ipv4Addr) -> String {
    format!(
        "apiVersion: v1
kind: Pod
metadata: {{name: {name}, labels: {{app: {app}, all: web}}}}
spec:
  nodeName: node{node}
  containers: [{{name: web, image: web}}]
status:
  podIP: {ip}
  conditions: [{{type: Ready, status: \"True\"}}]
"
    )
}

fn service(name: &str, spec: &str, status: &str) -> String {
    format!("apiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\nspec:\n{spec}{status}")
}

/// Every Service of the test: which pods back it and how clients reach it.
fn manifests() -> String {
    let port = |extra: &str| format!("  ports: [{{name: http, port: 80, targetPort: {HTTP}{extra}}}]\n");
    [
        pod("pod-a", "a", 1, Ipv4Addr::new(10, 244, 1, 11)),
        pod("pod-b", "b", 2, Ipv4Addr::new(10, 244, 2, 11)),
        service(
            "web",
            &format!(
                "  type: NodePort\n  clusterIP: {CLUSTER_IP}\n  selector: {{all: web}}\n  externalIPs: [{EXTERNAL_IP}]\n{}",
                port(", nodePort: 30080")
            ),
            "",
        ),
        service(
            "web-local",
            &format!(
                "  type: LoadBalancer\n  clusterIP: 10.96.0.51\n  externalTrafficPolicy: Local\n  healthCheckNodePort: 30200\n  selector: {{all: web}}\n{}",
                port(", nodePort: 30081")
            ),
            &format!("status: {{loadBalancer: {{ingress: [{{ip: {LB_IP}}}]}}}}\n"),
        ),
        service(
            "only-b",
            &format!(
                "  type: LoadBalancer\n  clusterIP: 10.96.0.52\n  externalTrafficPolicy: Local\n  healthCheckNodePort: 30201\n  selector: {{app: b}}\n{}",
                port(", nodePort: 30082")
            ),
            "",
        ),
        service(
            "ranged",
            &format!(
                "  type: LoadBalancer\n  clusterIP: 10.96.0.54\n  loadBalancerSourceRanges: [{CLIENT_IP}/32]\n  selector: {{all: web}}\n{}",
                port(", nodePort: 30084")
            ),
            &format!("status: {{loadBalancer: {{ingress: [{{ip: {RANGED_LB_IP}}}]}}}}\n"),
        ),
        service(
            "self",
            &format!("  clusterIP: {SELF_CLUSTER_IP}\n  selector: {{app: a}}\n{}", port("")),
            "",
        ),
        service(
            "empty",
            "  type: NodePort\n  clusterIP: 10.96.0.55\n  selector: {app: nobody}\n  ports: [{name: http, port: 80, nodePort: 30090}, {name: dns, port: 53, protocol: UDP, nodePort: 30090}]\n",
            "",
        ),
    ]
    .join("---\n")
}

fn started() -> TwoNodes {
    started_with_xdp("off")
}

fn started_with_xdp(xdp: &'static str) -> TwoNodes {
    require_root();
    let mut nodes = TwoNodes::new(&tests::unique("ext"), &[("pod-a", 1, 11), ("pod-b", 2, 11)]).unwrap();
    nodes.xdp = xdp;
    nodes.serve_http(HTTP).unwrap();
    for address in [LB_IP, RANGED_LB_IP, EXTERNAL_IP] {
        nodes.route_to_node(address, 1).unwrap();
    }
    nodes.write_manifest("all.yaml", &manifests()).unwrap();
    nodes.start_lb().unwrap();
    for node in [1, 2] {
        // Every Service programmed: the empty one's NodePort frontends exist last by name.
        nodes
            .wait_for_maps(node, Duration::from_secs(10), |s| {
                s.services.keys().any(|k| k.backend_slot == 0 && k.port() == 30090)
                    && s.services.keys().any(|k| k.backend_slot == 0 && k.address() == LB_IP)
            })
            .unwrap();
    }
    nodes
}

/// (pod, address the pod saw) for `count` connections from the client to `target`.
fn answers(
    nodes: &TwoNodes,
    source: Option<Ipv4Addr>,
    target: SocketAddrV4,
    count: usize,
) -> BTreeSet<(String, String)> {
    let answers = TwoNodes::http_from(&nodes.client, source, target, count).unwrap();
    answers
        .into_iter()
        .map(|answer| {
            let answer = answer.unwrap_or_else(|e| panic!("{target}: {e}\nnode1:\n{}", nodes.log(1)));
            assert_eq!(answer.peer, target.into(), "the client's peer is the address it dialled");
            (answer.pod, answer.client_seen)
        })
        .collect()
}

fn set(pairs: &[(&str, Ipv4Addr)]) -> BTreeSet<(String, String)> {
    pairs.iter().map(|(pod, ip)| (pod.to_string(), ip.to_string())).collect()
}

#[test]
fn node_port_and_external_ip_under_cluster_policy_reach_every_pod_source_natted() {
    let nodes = started();
    // Cluster policy: both pods, local and remote, and each sees the node's address (kube-proxy
    // masquerades external traffic under Cluster policy, so replies come back through it).
    for node in [1, 2] {
        let seen = answers(&nodes, None, SocketAddrV4::new(node_ip(node), 30080), 40);
        assert_eq!(
            seen,
            set(&[("pod-a", node_ip(node)), ("pod-b", node_ip(node))]),
            "NodePort on node{node}"
        );
    }
    let seen = answers(&nodes, None, SocketAddrV4::new(EXTERNAL_IP, 80), 40);
    assert_eq!(seen, set(&[("pod-a", node_ip(1)), ("pod-b", node_ip(1))]), "externalIP");

    let table = nodes.services_table(1).unwrap();
    for row in [
        ("default/web:http", "NodePort", "Cluster+SNAT maglev", "192.168.50.1:30080/TCP"),
        ("default/web:http", "ExternalIP", "Cluster+SNAT maglev", "192.168.70.10:80/TCP"),
        ("default/web:http", "ClusterIP", "Cluster", "10.96.0.50:80/TCP"),
        ("default/web-local:http", "LoadBalancer", "Local maglev", "192.168.60.10:80/TCP"),
        ("default/web-local:http", "LoadBalancer", "Cluster maglev", "192.168.60.10:80/TCP (in-cluster)"),
        (
            "default/ranged:http",
            "LoadBalancer",
            "Cluster+SNAT maglev from 192.168.50.100/32",
            "192.168.60.11:80/TCP",
        ),
    ] {
        let found = table.lines().any(|line| {
            let cells: Vec<&str> = line.split("  ").map(str::trim).filter(|c| !c.is_empty()).collect();
            cells.len() >= 4 && (cells[0], cells[1], cells[2], cells[3]) == row
        });
        assert!(found, "{row:?} missing from:\n{table}");
    }
}

#[test]
fn local_policy_keeps_the_client_address_and_drops_where_no_local_endpoint() {
    let nodes = started();
    // LoadBalancer IP routed to node1, Local policy: node1's pod only, client address kept.
    let seen = answers(&nodes, None, SocketAddrV4::new(LB_IP, 80), 20);
    assert_eq!(seen, set(&[("pod-a", CLIENT_IP)]));
    // NodePort of the same Service on node2: node2's pod only.
    let seen = answers(&nodes, None, SocketAddrV4::new(node_ip(2), 30081), 20);
    assert_eq!(seen, set(&[("pod-b", CLIENT_IP)]));

    // only-b's one pod is on node2: there it answers; on node1 the SYN is dropped, not
    // rejected (the Service has endpoints, just none there), so the connect times out.
    let seen = answers(&nodes, None, SocketAddrV4::new(node_ip(2), 30082), 5);
    assert_eq!(seen, set(&[("pod-b", CLIENT_IP)]));
    let target = SocketAddrV4::new(node_ip(1), 30082);
    let error = nodes
        .client
        .run(move || TcpStream::connect_timeout(&target.into(), Duration::from_millis(500)).map(|_| ()))
        .unwrap()
        .expect_err("no local endpoint on node1: dropped");
    assert_eq!(error.kind(), std::io::ErrorKind::TimedOut, "{error}");
    let table = nodes.services_table(1).unwrap();
    assert!(
        table.lines().any(|l| l.contains("192.168.50.1:30082/TCP") && l.contains("<none here: dropped>")),
        "{table}"
    );
}

#[test]
fn source_ranges_admit_only_listed_clients() {
    let nodes = started();
    let target = SocketAddrV4::new(RANGED_LB_IP, 80);
    let seen = answers(&nodes, Some(CLIENT_IP), target, 10);
    assert!(!seen.is_empty());
    let refused = TwoNodes::http_from(&nodes.client, Some(OTHER_CLIENT_IP), target, 1).unwrap();
    let error = refused[0].as_ref().expect_err("a source outside the ranges is dropped");
    assert!(error.contains("timed out"), "{error}");
}

#[test]
fn a_service_without_endpoints_is_refused_at_once() {
    let nodes = started();
    let (tcp, udp) = nodes
        .client
        .run(move || {
            let target = SocketAddrV4::new(node_ip(1), 30090);
            let started = Instant::now();
            let tcp = TcpStream::connect_timeout(&target.into(), Duration::from_secs(2)).map(|_| ());
            let tcp = (tcp, started.elapsed());
            // A connected UDP socket learns of an ICMP port unreachable as ECONNREFUSED.
            let socket = UdpSocket::bind((CLIENT_IP, 0)).unwrap();
            socket.connect(target).unwrap();
            socket.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            socket.send(b"query").unwrap();
            let mut buffer = [0u8; 64];
            (tcp, socket.recv(&mut buffer).map(|_| ()))
        })
        .unwrap();
    let (tcp, took) = tcp;
    assert_eq!(tcp.expect_err("TCP refused").kind(), std::io::ErrorKind::ConnectionRefused);
    assert!(took < Duration::from_secs(1), "a RST, not a timeout: {took:?}");
    assert_eq!(udp.expect_err("UDP refused").kind(), std::io::ErrorKind::ConnectionRefused);
}

#[test]
fn pods_reach_a_cluster_ip_across_nodes_and_through_their_own_service() {
    let nodes = started();
    let pod_a = &nodes.pods[0].ns;
    // From pod-a, the ClusterIP spreads over both pods. pod-b sees pod-a's own address (its
    // replies cross back through node1's uplink, where lb turns them back into the
    // ClusterIP's); pod-a reaching itself is hairpin, source-NATed to node1's address.
    let seen: BTreeSet<(String, String)> =
        TwoNodes::http_from(pod_a, None, SocketAddrV4::new(CLUSTER_IP, 80), 40)
            .unwrap()
            .into_iter()
            .map(|answer| {
                let answer = answer.unwrap_or_else(|e| panic!("{e}\nnode1:\n{}", nodes.log(1)));
                assert_eq!(answer.peer, SocketAddrV4::new(CLUSTER_IP, 80).into());
                (answer.pod, answer.client_seen)
            })
            .collect();
    assert_eq!(seen, set(&[("pod-a", node_ip(1)), ("pod-b", Ipv4Addr::new(10, 244, 1, 11))]));

    // Hairpin: pod-a through a Service whose only endpoint is itself. It sees the node's
    // source-NAT address, so its reply goes back through lb.
    let answers = TwoNodes::http_from(pod_a, None, SocketAddrV4::new(SELF_CLUSTER_IP, 80), 5).unwrap();
    for answer in answers {
        let answer = answer.unwrap_or_else(|e| panic!("hairpin: {e}\nnode1:\n{}", nodes.log(1)));
        assert_eq!((answer.pod.as_str(), answer.client_seen.as_str()), ("pod-a", "192.168.50.1"));
    }
}

/// One HTTP/1.0 GET from the client: status code and body.
fn http_get_raw(nodes: &TwoNodes, target: SocketAddrV4) -> (u16, String) {
    nodes
        .client
        .run(move || {
            use std::io::{Read, Write};
            let mut stream = TcpStream::connect_timeout(&target.into(), Duration::from_secs(2)).unwrap();
            stream.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            stream.write_all(b"GET /healthz HTTP/1.0\r\nHost: lb\r\n\r\n").unwrap();
            let mut response = String::new();
            stream.read_to_string(&mut response).unwrap();
            let status = response.split_whitespace().nth(1).unwrap().parse().unwrap();
            (status, response.split("\r\n\r\n").nth(1).unwrap_or_default().to_string())
        })
        .unwrap()
}

#[test]
fn health_check_node_ports_report_local_endpoints() {
    let nodes = started();
    let expect = |node: usize, port: u16, status: u16, service: &str, local: usize| {
        let (got_status, body) = http_get_raw(&nodes, SocketAddrV4::new(node_ip(node), port));
        let json: serde_json::Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
        assert_eq!(got_status, status, "node{node}:{port} {body}");
        assert_eq!(json["service"]["namespace"], "default");
        assert_eq!(json["service"]["name"], service);
        assert_eq!(json["localEndpoints"], local, "node{node}:{port}");
    };
    expect(1, 30200, 200, "web-local", 1);
    expect(2, 30200, 200, "web-local", 1);
    // only-b's pod runs on node2: node1 tells the load balancer to stay away.
    expect(1, 30201, 503, "only-b", 0);
    expect(2, 30201, 200, "only-b", 1);
}

#[test]
fn the_nodes_own_processes_reach_node_ports_at_the_socket() {
    let mut nodes = started();
    nodes.nodes[0].cgroup.enter().unwrap();
    let target = SocketAddrV4::new(node_ip(1), 30080);
    let seen: BTreeSet<String> = TwoNodes::http_from(&nodes.nodes[0].ns, None, target, 30)
        .unwrap()
        .into_iter()
        .map(|answer| {
            let answer = answer.unwrap_or_else(|e| panic!("{e}\nnode1:\n{}", nodes.log(1)));
            assert_eq!(answer.peer, target.into(), "getpeername reports the NodePort");
            answer.pod
        })
        .collect();
    assert_eq!(seen, BTreeSet::from(["pod-a".to_string(), "pod-b".to_string()]));
}

#[test]
fn xdp_forwards_node_port_traffic_for_remote_pods_and_tc_does_the_rest() {
    let nodes = started_with_xdp("generic");
    assert!(nodes.log(1).contains("XDP attached"), "{}", nodes.log(1));
    let before = nodes.counters(1).unwrap();
    // Cluster policy: pod-b's traffic goes back out node1's uplink from XDP (both ways);
    // pod-a's is left to TC. Both work, source-NATed to node1.
    let seen = answers(&nodes, None, SocketAddrV4::new(node_ip(1), 30080), 40);
    assert_eq!(seen, set(&[("pod-a", node_ip(1)), ("pod-b", node_ip(1))]));
    // Local policy on node1: its own pod only, through TC after XDP passes it.
    let seen = answers(&nodes, None, SocketAddrV4::new(LB_IP, 80), 10);
    assert_eq!(seen, set(&[("pod-a", CLIENT_IP)]));
    let after = nodes.counters(1).unwrap();
    let moved = |name: &str| after[name] - before[name];
    assert!(moved("xdp_tx") > 0, "XDP sent nothing back out: {after:?}");
    assert!(moved("xdp_pass") > 0, "XDP passed nothing to TC: {after:?}");
}

/// kube-proxy sends in-cluster traffic to a Local-policy LoadBalancer IP or NodePort to every
/// endpoint: a pod is not an external client. From pod-a on node1, web-local's LoadBalancer IP
/// reaches both pods (pod-b keeps seeing pod-a's own address), and only-b's NodePort on node1,
/// which has no local endpoint there, reaches pod-b instead of being dropped.
#[test]
fn pods_reach_every_endpoint_of_a_local_policy_frontend() {
    let nodes = started();
    let pod_a = &nodes.pods[0].ns;
    let seen = |target: SocketAddrV4, count: usize| -> BTreeSet<(String, String)> {
        TwoNodes::http_from(pod_a, None, target, count)
            .unwrap()
            .into_iter()
            .map(|answer| {
                let answer = answer.unwrap_or_else(|e| panic!("{target}: {e}\nnode1:\n{}", nodes.log(1)));
                assert_eq!(answer.peer, target.into());
                (answer.pod, answer.client_seen)
            })
            .collect()
    };
    let pod_a_ip = Ipv4Addr::new(10, 244, 1, 11);
    let lb = seen(SocketAddrV4::new(LB_IP, 80), 40);
    assert_eq!(lb, set(&[("pod-a", node_ip(1)), ("pod-b", pod_a_ip)]), "hairpin to itself is source-NATed");
    let node_port = seen(SocketAddrV4::new(node_ip(1), 30082), 5);
    assert_eq!(node_port, set(&[("pod-b", pod_a_ip)]));
    // The external client still gets node1's endpoint only.
    assert_eq!(answers(&nodes, None, SocketAddrV4::new(LB_IP, 80), 10), set(&[("pod-a", CLIENT_IP)]));
}
