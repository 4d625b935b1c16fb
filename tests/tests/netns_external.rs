//! External traffic across two nodes, each running lb: NodePort, LoadBalancer IPs and
//! externalIPs under both external traffic policies, source ranges, rejection of Services
//! without endpoints, hairpin, and ClusterIP traffic to a pod on the other node, over IPv4
//! and IPv6 (the Services are dual-stack, and each test runs its checks once per family
//! where the behaviour is the same). Everything runs in namespaces joined only to each other
//! (see `tests::two_nodes`).

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use tests::require_root;
use tests::two_nodes::{
    CLIENT_IP, CLIENT_IP6, OTHER_CLIENT_IP, OTHER_CLIENT_IP6, TwoNodes, node_ip, node_ip6, pod_ip, pod_ip6,
};

const HTTP: u16 = 8080;
const LB_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 60, 10);
const EXTERNAL_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 70, 10);

/// One family's addresses: the client's, the nodes', the pods' and the Services'.
struct Family {
    name: &'static str,
    client: IpAddr,
    other_client: IpAddr,
    nodes: [IpAddr; 2],
    pod_a: IpAddr,
    lb_ip: IpAddr,
    ranged_lb_ip: IpAddr,
    external_ip: IpAddr,
    cluster_ip: IpAddr,
    self_cluster_ip: IpAddr,
}

impl Family {
    fn node(&self, node: usize) -> IpAddr {
        self.nodes[node - 1]
    }
}

fn ipv4() -> Family {
    Family {
        name: "IPv4",
        client: CLIENT_IP.into(),
        other_client: OTHER_CLIENT_IP.into(),
        nodes: [node_ip(1).into(), node_ip(2).into()],
        pod_a: pod_ip(1, 11).into(),
        lb_ip: LB_IP.into(),
        ranged_lb_ip: Ipv4Addr::new(192, 168, 60, 11).into(),
        external_ip: EXTERNAL_IP.into(),
        cluster_ip: Ipv4Addr::new(10, 96, 0, 50).into(),
        self_cluster_ip: Ipv4Addr::new(10, 96, 0, 53).into(),
    }
}

fn ipv6() -> Family {
    let address = |text: &str| -> IpAddr { text.parse::<Ipv6Addr>().unwrap().into() };
    Family {
        name: "IPv6",
        client: CLIENT_IP6.into(),
        other_client: OTHER_CLIENT_IP6.into(),
        nodes: [node_ip6(1).into(), node_ip6(2).into()],
        pod_a: pod_ip6(1, 11).into(),
        lb_ip: address("fd00:60::10"),
        ranged_lb_ip: address("fd00:60::11"),
        external_ip: address("fd00:70::10"),
        cluster_ip: address("fd00:10:96::50"),
        self_cluster_ip: address("fd00:10:96::53"),
    }
}

fn families() -> [Family; 2] {
    [ipv4(), ipv6()]
}

fn pod(name: &str, app: &str, node: usize, host: u8) -> String {
    let (ip, ip6) = (pod_ip(node, host), pod_ip6(node, host));
    format!(
        "apiVersion: v1
kind: Pod
metadata: {{name: {name}, labels: {{app: {app}, all: web}}}}
spec:
  nodeName: node{node}
  containers: [{{name: web, image: web}}]
status:
  podIP: {ip}
  podIPs: [{{ip: {ip}}}, {{ip: \"{ip6}\"}}]
  conditions: [{{type: Ready, status: \"True\"}}]
"
    )
}

/// A dual-stack Service: its ClusterIPs are 10.96.0.<n> and fd00:10:96::<n>.
fn service(name: &str, n: u8, spec: &str, status: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\nspec:\n  ipFamilyPolicy: RequireDualStack\n  ipFamilies: [IPv4, IPv6]\n  clusterIPs: [10.96.0.{n}, \"fd00:10:96::{n}\"]\n{spec}{status}"
    )
}

/// A LoadBalancer status with one ingress IP per family.
fn ingress(family4: &Family, family6: &Family, pick: impl Fn(&Family) -> IpAddr) -> String {
    format!(
        "status: {{loadBalancer: {{ingress: [{{ip: {}}}, {{ip: \"{}\"}}]}}}}\n",
        pick(family4),
        pick(family6)
    )
}

/// Every Service of the test: which pods back it and how clients reach it.
fn manifests() -> String {
    let (v4, v6) = (ipv4(), ipv6());
    let port = |extra: &str| format!("  ports: [{{name: http, port: 80, targetPort: {HTTP}{extra}}}]\n");
    [
        pod("pod-a", "a", 1, 11),
        pod("pod-b", "b", 2, 11),
        service(
            "web",
            50,
            &format!(
                "  type: NodePort\n  selector: {{all: web}}\n  externalIPs: [{}, \"{}\"]\n{}",
                v4.external_ip,
                v6.external_ip,
                port(", nodePort: 30080")
            ),
            "",
        ),
        service(
            "web-local",
            51,
            &format!(
                "  type: LoadBalancer\n  externalTrafficPolicy: Local\n  healthCheckNodePort: 30200\n  selector: {{all: web}}\n{}",
                port(", nodePort: 30081")
            ),
            &ingress(&v4, &v6, |f| f.lb_ip),
        ),
        service(
            "only-b",
            52,
            &format!(
                "  type: LoadBalancer\n  externalTrafficPolicy: Local\n  healthCheckNodePort: 30201\n  selector: {{app: b}}\n{}",
                port(", nodePort: 30082")
            ),
            "",
        ),
        service(
            "ranged",
            54,
            &format!(
                "  type: LoadBalancer\n  loadBalancerSourceRanges: [{}/32, \"{}/128\"]\n  selector: {{all: web}}\n{}",
                v4.client,
                v6.client,
                port(", nodePort: 30084")
            ),
            &ingress(&v4, &v6, |f| f.ranged_lb_ip),
        ),
        service("self", 53, &format!("  selector: {{app: a}}\n{}", port("")), ""),
        service(
            "empty",
            55,
            "  type: NodePort\n  selector: {app: nobody}\n  ports: [{name: http, port: 80, nodePort: 30090}, {name: dns, port: 53, protocol: UDP, nodePort: 30090}]\n",
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
    let mut nodes =
        TwoNodes::dual_stack(&tests::unique("ext"), &[("pod-a", 1, 11), ("pod-b", 2, 11)]).unwrap();
    nodes.xdp = xdp;
    nodes.serve_http(HTTP).unwrap();
    for family in families() {
        for address in [family.lb_ip, family.ranged_lb_ip, family.external_ip] {
            nodes.route_to_node(address, 1).unwrap();
        }
    }
    nodes.write_manifest("all.yaml", &manifests()).unwrap();
    nodes.start_lb().unwrap();
    for node in [1, 2] {
        // Every Service programmed: the empty one's NodePort frontends exist last by name.
        nodes
            .wait_for_maps(node, Duration::from_secs(10), |s| {
                families().iter().all(|family| {
                    s.services
                        .keys()
                        .any(|k| k.backend_slot == 0 && k.port() == 30090 && k.address() == family.node(node))
                        && s.services.keys().any(|k| k.backend_slot == 0 && k.address() == family.lb_ip)
                })
            })
            .unwrap();
    }
    nodes
}

/// (pod, address the pod saw) for `count` connections from `from` (the client unless given)
/// to `target`, each checked to have reached the address dialled.
fn answers_from(
    nodes: &TwoNodes,
    from: Option<&tests::NetNs>,
    source: Option<IpAddr>,
    target: SocketAddr,
    count: usize,
) -> BTreeSet<(String, String)> {
    let answers = TwoNodes::http_from(from.unwrap_or(&nodes.client), source, target, count).unwrap();
    answers
        .into_iter()
        .map(|answer| {
            let answer = answer.unwrap_or_else(|e| panic!("{target}: {e}\nnode1:\n{}", nodes.log(1)));
            assert_eq!(answer.peer, target, "the client's peer is the address it dialled");
            (answer.pod, answer.client_seen)
        })
        .collect()
}

fn answers(
    nodes: &TwoNodes,
    source: Option<IpAddr>,
    target: SocketAddr,
    count: usize,
) -> BTreeSet<(String, String)> {
    answers_from(nodes, None, source, target, count)
}

fn set(pairs: &[(&str, IpAddr)]) -> BTreeSet<(String, String)> {
    pairs.iter().map(|(pod, ip)| (pod.to_string(), ip.to_string())).collect()
}

#[test]
fn node_port_and_external_ip_under_cluster_policy_reach_every_pod_source_natted() {
    let nodes = started();
    for family in families() {
        // Cluster policy: both pods, local and remote, and each sees the node's address
        // (kube-proxy masquerades external traffic under Cluster policy, so replies come back
        // through it).
        for node in [1, 2] {
            let seen = answers(&nodes, None, SocketAddr::new(family.node(node), 30080), 40);
            let node_address = family.node(node);
            assert_eq!(
                seen,
                set(&[("pod-a", node_address), ("pod-b", node_address)]),
                "{} NodePort on node{node}",
                family.name
            );
        }
        let seen = answers(&nodes, None, SocketAddr::new(family.external_ip, 80), 40);
        assert_eq!(
            seen,
            set(&[("pod-a", family.node(1)), ("pod-b", family.node(1))]),
            "{} externalIP",
            family.name
        );
    }

    let table = nodes.services_table(1).unwrap();
    for row in [
        ("default/web:http", "NodePort", "Cluster+SNAT maglev", "192.168.50.1:30080/TCP"),
        ("default/web:http", "NodePort", "Cluster+SNAT maglev", "[fd00:50::1]:30080/TCP"),
        ("default/web:http", "ExternalIP", "Cluster+SNAT maglev", "192.168.70.10:80/TCP"),
        ("default/web:http", "ClusterIP", "Cluster", "10.96.0.50:80/TCP"),
        ("default/web:http", "ClusterIP", "Cluster", "[fd00:10:96::50]:80/TCP"),
        ("default/web-local:http", "LoadBalancer", "Local maglev", "192.168.60.10:80/TCP"),
        ("default/web-local:http", "LoadBalancer", "Local maglev", "[fd00:60::10]:80/TCP"),
        ("default/web-local:http", "LoadBalancer", "Cluster maglev", "192.168.60.10:80/TCP (in-cluster)"),
        (
            "default/ranged:http",
            "LoadBalancer",
            "Cluster+SNAT maglev from 192.168.50.100/32",
            "192.168.60.11:80/TCP",
        ),
        (
            "default/ranged:http",
            "LoadBalancer",
            "Cluster+SNAT maglev from fd00:50::100/128",
            "[fd00:60::11]:80/TCP",
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
    for family in families() {
        // LoadBalancer IP routed to node1, Local policy: node1's pod only, client address kept.
        let seen = answers(&nodes, None, SocketAddr::new(family.lb_ip, 80), 20);
        assert_eq!(seen, set(&[("pod-a", family.client)]), "{}", family.name);
        // NodePort of the same Service on node2: node2's pod only.
        let seen = answers(&nodes, None, SocketAddr::new(family.node(2), 30081), 20);
        assert_eq!(seen, set(&[("pod-b", family.client)]), "{}", family.name);

        // only-b's one pod is on node2: there it answers; on node1 the SYN is dropped, not
        // rejected (the Service has endpoints, just none there), so the connect times out.
        let seen = answers(&nodes, None, SocketAddr::new(family.node(2), 30082), 5);
        assert_eq!(seen, set(&[("pod-b", family.client)]), "{}", family.name);
        let target = SocketAddr::new(family.node(1), 30082);
        let error = nodes
            .client
            .run(move || TcpStream::connect_timeout(&target, Duration::from_millis(500)).map(|_| ()))
            .unwrap()
            .expect_err("no local endpoint on node1: dropped");
        assert_eq!(error.kind(), std::io::ErrorKind::TimedOut, "{target}: {error}");
    }
    let table = nodes.services_table(1).unwrap();
    for frontend in ["192.168.50.1:30082/TCP", "[fd00:50::1]:30082/TCP"] {
        assert!(
            table.lines().any(|l| l.contains(frontend) && l.contains("<none here: dropped>")),
            "{frontend}: {table}"
        );
    }
}

#[test]
fn source_ranges_admit_only_listed_clients() {
    let nodes = started();
    for family in families() {
        let target = SocketAddr::new(family.ranged_lb_ip, 80);
        let seen = answers(&nodes, Some(family.client), target, 10);
        assert!(!seen.is_empty());
        let refused = TwoNodes::http_from(&nodes.client, Some(family.other_client), target, 1).unwrap();
        let error = refused[0].as_ref().expect_err("a source outside the ranges is dropped");
        assert!(error.contains("timed out"), "{}: {error}", family.name);
    }
}

#[test]
fn a_service_without_endpoints_is_refused_at_once() {
    let nodes = started();
    for family in families() {
        let client = family.client;
        let target = SocketAddr::new(family.node(1), 30090);
        let (tcp, udp) = nodes
            .client
            .run(move || {
                let started = Instant::now();
                let tcp = TcpStream::connect_timeout(&target, Duration::from_secs(2)).map(|_| ());
                let tcp = (tcp, started.elapsed());
                // A connected UDP socket learns of an ICMP port unreachable as ECONNREFUSED.
                let socket = UdpSocket::bind((client, 0)).unwrap();
                socket.connect(target).unwrap();
                socket.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
                socket.send(b"query").unwrap();
                let mut buffer = [0u8; 64];
                (tcp, socket.recv(&mut buffer).map(|_| ()))
            })
            .unwrap();
        let (tcp, took) = tcp;
        assert_eq!(tcp.expect_err("TCP refused").kind(), std::io::ErrorKind::ConnectionRefused, "{target}");
        assert!(took < Duration::from_secs(1), "a RST, not a timeout: {took:?}");
        assert_eq!(udp.expect_err("UDP refused").kind(), std::io::ErrorKind::ConnectionRefused, "{target}");
    }
}

#[test]
fn pods_reach_a_cluster_ip_across_nodes_and_through_their_own_service() {
    let nodes = started();
    let pod_a = &nodes.pods[0].ns;
    for family in families() {
        // From pod-a, the ClusterIP spreads over both pods. pod-b sees pod-a's own address (its
        // replies cross back through node1's uplink, where lb turns them back into the
        // ClusterIP's); pod-a reaching itself is hairpin, source-NATed to node1's address.
        let seen = answers_from(&nodes, Some(pod_a), None, SocketAddr::new(family.cluster_ip, 80), 40);
        assert_eq!(seen, set(&[("pod-a", family.node(1)), ("pod-b", family.pod_a)]), "{}", family.name);

        // Hairpin: pod-a through a Service whose only endpoint is itself. It sees the node's
        // source-NAT address, so its reply goes back through lb.
        let seen = answers_from(&nodes, Some(pod_a), None, SocketAddr::new(family.self_cluster_ip, 80), 5);
        assert_eq!(seen, set(&[("pod-a", family.node(1))]), "{} hairpin", family.name);
    }
}

/// One HTTP/1.0 GET from the client: status code and body.
fn http_get_raw(nodes: &TwoNodes, target: SocketAddr) -> (u16, String) {
    nodes
        .client
        .run(move || {
            use std::io::{Read, Write};
            let mut stream = TcpStream::connect_timeout(&target, Duration::from_secs(2)).unwrap();
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
    // On each of the node's addresses, as a load balancer of either family probes it; a
    // dual-stack Pod is one local endpoint.
    let expect = |node: usize, port: u16, status: u16, service: &str, local: usize| {
        for family in families() {
            let (got_status, body) = http_get_raw(&nodes, SocketAddr::new(family.node(node), port));
            let json: serde_json::Value =
                serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
            assert_eq!(got_status, status, "node{node}:{port} {} {body}", family.name);
            assert_eq!(json["service"]["namespace"], "default");
            assert_eq!(json["service"]["name"], service);
            assert_eq!(json["localEndpoints"], local, "node{node}:{port} {}", family.name);
        }
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
    for family in families() {
        let target = SocketAddr::new(family.node(1), 30080);
        let seen: BTreeSet<String> = TwoNodes::http_from(&nodes.nodes[0].ns, None, target, 30)
            .unwrap()
            .into_iter()
            .map(|answer| {
                let answer = answer.unwrap_or_else(|e| panic!("{e}\nnode1:\n{}", nodes.log(1)));
                assert_eq!(answer.peer, target, "getpeername reports the NodePort");
                answer.pod
            })
            .collect();
        assert_eq!(seen, BTreeSet::from(["pod-a".to_string(), "pod-b".to_string()]), "{}", family.name);
    }
}

#[test]
fn xdp_forwards_node_port_traffic_for_remote_pods_and_tc_does_the_rest() {
    let nodes = started_with_xdp("generic");
    assert!(nodes.log(1).contains("XDP attached"), "{}", nodes.log(1));
    let before = nodes.counters(1).unwrap();
    let v4 = ipv4();
    // Cluster policy: pod-b's traffic goes back out node1's uplink from XDP (both ways);
    // pod-a's is left to TC. Both work, source-NATed to node1.
    let seen = answers(&nodes, None, SocketAddr::new(v4.node(1), 30080), 40);
    assert_eq!(seen, set(&[("pod-a", v4.node(1)), ("pod-b", v4.node(1))]));
    // Local policy on node1: its own pod only, through TC after XDP passes it.
    let seen = answers(&nodes, None, SocketAddr::new(v4.lb_ip, 80), 10);
    assert_eq!(seen, set(&[("pod-a", v4.client)]));
    let after = nodes.counters(1).unwrap();
    let moved = |name: &str| after[name] - before[name];
    assert!(moved("xdp_tx") > 0, "XDP sent nothing back out: {after:?}");
    assert!(moved("xdp_pass") > 0, "XDP passed nothing to TC: {after:?}");

    // IPv6, through the XDP program's IPv6 parts: pod-b's flows XDP sends back out.
    let v6 = ipv6();
    let seen = answers(&nodes, None, SocketAddr::new(v6.node(1), 30080), 40);
    assert_eq!(seen, set(&[("pod-a", v6.node(1)), ("pod-b", v6.node(1))]));
    let seen = answers(&nodes, None, SocketAddr::new(v6.lb_ip, 80), 10);
    assert_eq!(seen, set(&[("pod-a", v6.client)]));
    let after6 = nodes.counters(1).unwrap();
    assert!(after6["xdp_tx"] > after["xdp_tx"], "XDP sent no IPv6 packet back out: {after6:?}");
}

/// kube-proxy sends in-cluster traffic to a Local-policy LoadBalancer IP or NodePort to every
/// endpoint: a pod is not an external client. From pod-a on node1, web-local's LoadBalancer IP
/// reaches both pods (pod-b keeps seeing pod-a's own address), and only-b's NodePort on node1,
/// which has no local endpoint there, reaches pod-b instead of being dropped.
#[test]
fn pods_reach_every_endpoint_of_a_local_policy_frontend() {
    let nodes = started();
    let pod_a = &nodes.pods[0].ns;
    for family in families() {
        let lb = answers_from(&nodes, Some(pod_a), None, SocketAddr::new(family.lb_ip, 80), 40);
        assert_eq!(
            lb,
            set(&[("pod-a", family.node(1)), ("pod-b", family.pod_a)]),
            "{}: hairpin to itself is source-NATed",
            family.name
        );
        let node_port = answers_from(&nodes, Some(pod_a), None, SocketAddr::new(family.node(1), 30082), 5);
        assert_eq!(node_port, set(&[("pod-b", family.pod_a)]), "{}", family.name);
        // The external client still gets node1's endpoint only.
        let external = answers(&nodes, None, SocketAddr::new(family.lb_ip, 80), 10);
        assert_eq!(external, set(&[("pod-a", family.client)]), "{}", family.name);
    }
}
