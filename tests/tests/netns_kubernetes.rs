//! End to end with the API server: Services and EndpointSlices created through the (fake) API
//! server reach the kernel, and an endpoint turning not-ready stops new connections to it. lb
//! runs in the node namespace, where the API server also listens (on its loopback).

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4, TcpStream};
use std::time::{Duration, Instant};

use lb_userspace::dataplane::maps::MapsSnapshot;
use tests::apiserver::{FakeApiServer, Kind};
use tests::playground::Playground;
use tests::{require_root, unique};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 20);
const POD_A: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 21);
const POD_B: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 22);

fn slice(b_ready: bool) -> String {
    format!(
        "apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: web-x1, labels: {{kubernetes.io/service-name: web}}}}
addressType: IPv4
ports: [{{name: http, port: 8080}}]
endpoints:
- {{addresses: [\"{POD_A}\"], conditions: {{ready: true}}, nodeName: node-1}}
- {{addresses: [\"{POD_B}\"], conditions: {{ready: {b_ready}, serving: {b_ready}}}, nodeName: node-1}}
"
    )
}

fn backend_count(snapshot: &MapsSnapshot) -> Option<u16> {
    snapshot
        .services
        .iter()
        .find(|(k, _)| k.backend_slot == 0 && k.address() == VIP)
        .map(|(_, v)| v.backend_count)
}

/// GET on the node's loopback (lb's health port), from inside the node namespace.
fn http_get_in_node(pg: &Playground, path: &'static str) -> (u16, String) {
    pg.node
        .run(move || {
            let mut stream = TcpStream::connect(("127.0.0.1", 10256)).expect("health port");
            write!(stream, "GET {path} HTTP/1.0\r\nHost: lb\r\n\r\n").unwrap();
            let mut response = String::new();
            stream.read_to_string(&mut response).unwrap();
            let code = response.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
            (code, response.split("\r\n\r\n").nth(1).unwrap_or_default().to_string())
        })
        .unwrap()
}

/// lb's log says which API server it cannot reach, and that it keeps trying.
fn assert_logged_retrying(pg: &Playground, server: &FakeApiServer) {
    let server_url = format!("http://{}", server.address);
    assert!(
        pg.lb_log()
            .lines()
            .any(|l| l.contains("cannot watch the API server; retrying") && l.contains(&server_url)),
        "{}",
        pg.lb_log()
    );
}

#[test]
fn services_from_the_api_server_reach_the_kernel() {
    require_root();
    let mut pg = Playground::new(&unique("k"), &[("pod-a", POD_A), ("pod-b", POD_B)]).unwrap();
    pg.serve_http(8080).unwrap();
    let listener = pg.node.run(|| std::net::TcpListener::bind("127.0.0.1:0")).unwrap().unwrap();
    let server = FakeApiServer::start(listener).unwrap();
    let kubeconfig = server.write_kubeconfig(pg.work_dir()).unwrap();
    pg.start_lb_with(&[
        "--kubeconfig".as_ref(),
        kubeconfig.as_os_str(),
        "--hostname-override".as_ref(),
        "node-1".as_ref(),
    ])
    .unwrap();

    server.apply_yaml(&format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: web}}\nspec: {{clusterIP: {VIP}, ports: [{{name: http, port: 80, targetPort: 8080}}]}}\n"
    ));
    server.apply_yaml(&slice(true));
    pg.wait_for_maps(Duration::from_secs(10), |s| backend_count(s) == Some(2)).unwrap();
    let answers = pg.http_requests(SocketAddrV4::new(VIP, 80), 40).unwrap();
    let pods: std::collections::BTreeSet<String> =
        answers.into_iter().map(|a| a.unwrap_or_else(|e| panic!("{e}\n{}", pg.lb_log())).pod).collect();
    assert_eq!(pods.into_iter().collect::<Vec<_>>(), ["pod-a", "pod-b"]);

    // Let the sync runner's burst refill, so this measures an idle node.
    std::thread::sleep(Duration::from_millis(1200));
    let changed_at = Instant::now();
    server.apply_yaml(&slice(false));
    let took = pg.wait_for_maps(Duration::from_secs(2), |s| backend_count(s) == Some(1)).unwrap();
    eprintln!(
        "not-ready endpoint left the maps {took:?} after the API change ({:?} wall)",
        changed_at.elapsed()
    );
    for answer in pg.http_requests(SocketAddrV4::new(VIP, 80), 20).unwrap() {
        assert_eq!(answer.unwrap().pod, "pod-a", "no new connection reaches the not-ready pod");
    }
    let table = pg.services_table().unwrap();
    assert!(table.contains("default/web:http") && !table.contains(&POD_B.to_string()), "{table}");

    let (code, body) = http_get_in_node(&pg, "/healthz");
    assert_eq!(code, 200, "{body}");
    let report: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(report["nodeEligible"], true);
    assert!(report["lastUpdated"].as_str().is_some_and(|t| !t.is_empty()), "{body}");
    assert_eq!(http_get_in_node(&pg, "/livez").0, 200);

    // A node the cluster autoscaler is removing (its taint), or whose Node is deleted: /healthz
    // says 503 with nodeEligible false so load balancers drain it, /livez stays 200; the taint
    // taken off, it is eligible again. No Service changes on the way.
    let node = |taints: &str| {
        format!("apiVersion: v1\nkind: Node\nmetadata: {{name: node-1}}\nspec: {{taints: [{taints}]}}\n")
    };
    let eligible = |want: bool| {
        let start = Instant::now();
        loop {
            let (code, body) = http_get_in_node(&pg, "/healthz");
            let report: serde_json::Value = serde_json::from_str(&body).unwrap();
            if report["nodeEligible"] == want {
                assert_eq!(code, if want { 200 } else { 503 }, "{body}");
                assert_eq!(report["healthy"], true, "{body}");
                assert_eq!(http_get_in_node(&pg, "/livez").0, 200);
                return;
            }
            assert!(start.elapsed() < Duration::from_secs(5), "nodeEligible is not {want}: {body}");
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    server.apply_yaml(&node("{key: ToBeDeletedByClusterAutoscaler, value: \"1\", effect: NoSchedule}"));
    eligible(false);
    server.apply_yaml(&node(""));
    eligible(true);
    server.delete(Kind::Node, "", "node-1");
    eligible(false);
    server.apply_yaml(&node(""));
    eligible(true);

    // Kubernetes' e2e "should implement service.kubernetes.io/headless": the label on a working
    // Service (and, copied by the EndpointSlice controller, on its slice) stops it being served;
    // connections to its ClusterIP fail at once. Without the label it is served again.
    let web = |labels: &str| {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: web, labels: {{{labels}}}}}\nspec: {{clusterIP: {VIP}, ports: [{{name: http, port: 80, targetPort: 8080}}]}}\n"
        )
    };
    server.apply_yaml(&web("service.kubernetes.io/headless: \"\""));
    server.apply_yaml(&slice(false).replace(
        "labels: {kubernetes.io/service-name: web}",
        "labels: {kubernetes.io/service-name: web, service.kubernetes.io/headless: \"\"}",
    ));
    pg.wait_for_maps(Duration::from_secs(2), |s| backend_count(s).is_none()).unwrap();
    let refused = pg.http_requests(SocketAddrV4::new(VIP, 80), 1).unwrap();
    assert!(refused[0].is_err(), "the ClusterIP of a Service labelled headless still answers: {refused:?}");
    server.apply_yaml(&web(""));
    server.apply_yaml(&slice(false));
    pg.wait_for_maps(Duration::from_secs(2), |s| backend_count(s) == Some(1)).unwrap();
    assert_eq!(pg.http_requests(SocketAddrV4::new(VIP, 80), 1).unwrap()[0].as_ref().unwrap().pod, "pod-a");

    // What lb cannot program is told on the object, as a Kubernetes Event: a Service asking for
    // web's ClusterIP, and one with a field lb cannot use.
    server.apply_yaml(&format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: squatter}}\nspec: {{clusterIP: {VIP}, ports: [{{port: 80}}]}}\n"
    ));
    server.apply_yaml(
        "apiVersion: v1\nkind: Service\nmetadata: {name: broken}\nspec: {clusterIP: 10.96.0.300, ports: [{port: 80}]}\n",
    );
    server.apply_yaml(
        "apiVersion: v1\nkind: Service\nmetadata: {name: signalling}\nspec: {clusterIP: 10.96.0.77, ports: [{name: m3ua, port: 2905, targetPort: 3905, protocol: SCTP}]}\n",
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    // The conflict is told on the Service that lost the address (lb keeps one owner per address).
    let event = |names: &[&str], reason: &str| {
        server
            .recorded_events()
            .into_iter()
            .find(|e| names.iter().any(|name| e["regarding"]["name"] == *name) && e["reason"] == reason)
    };
    while (event(&["squatter", "web"], "LbFrontendConflict").is_none()
        || event(&["broken"], "LbInvalidObject").is_none()
        || event(&["signalling"], "LbUnsupportedPort").is_none())
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(20));
    }
    let conflict = event(&["squatter", "web"], "LbFrontendConflict")
        .unwrap_or_else(|| panic!("no conflict event: {:?}\n{}", server.recorded_events(), pg.lb_log()));
    assert_eq!(conflict["type"], "Warning");
    assert_eq!(conflict["regarding"]["kind"], "Service");
    // `kubectl describe service` lists the events whose reference has the Service's UID.
    let holder = conflict["regarding"]["name"].as_str().unwrap().to_string();
    let uid =
        server.object(Kind::Service, "default", &holder).expect("the Service")["metadata"]["uid"].clone();
    assert!(uid.is_string(), "{uid}");
    assert_eq!(conflict["regarding"]["uid"], uid, "{conflict}");
    assert_eq!(conflict["reportingController"], "lb");
    let note = conflict["note"].as_str().unwrap();
    assert!(note.contains("is already used by Service default/"), "{conflict}");
    let invalid = event(&["broken"], "LbInvalidObject").expect("an event on the invalid Service");
    let sctp = event(&["signalling"], "LbUnsupportedPort").expect("an event on the SCTP Service");
    assert!(
        sctp["note"]
            .as_str()
            .unwrap()
            .contains("(2905/SCTP) is not served: its targetPort 3905 is another port"),
        "{sctp}"
    );
    assert!(invalid["note"].as_str().unwrap().contains("10.96.0.300"), "{invalid}");
    // The same problem again within a minute is not reported again.
    let count = server.recorded_events().len();
    server.apply_yaml(
        "apiVersion: v1\nkind: Service\nmetadata: {name: broken, labels: {again: \"1\"}}\nspec: {clusterIP: 10.96.0.300, ports: [{port: 80}]}\n",
    );
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(server.recorded_events().len(), count, "{:?}", server.recorded_events());
    assert!(pg.stop_lb().unwrap(), "{}", pg.lb_log());
}

/// The API server going away and coming back: traffic keeps flowing meanwhile, `/healthz` says
/// the state may be stale (and stays healthy: the data path serves), and a change made right
/// after the API server returns is in the maps within 5 s.
#[test]
fn a_change_after_the_api_server_returns_reaches_the_maps_within_seconds() {
    require_root();
    let mut pg = Playground::new(&unique("k"), &[("pod-a", POD_A), ("pod-b", POD_B)]).unwrap();
    pg.serve_http(8080).unwrap();
    let listener = pg.node.run(|| std::net::TcpListener::bind("127.0.0.1:0")).unwrap().unwrap();
    let server = FakeApiServer::start(listener).unwrap();
    let kubeconfig = server.write_kubeconfig(pg.work_dir()).unwrap();
    pg.start_lb_with(&[
        "--kubeconfig".as_ref(),
        kubeconfig.as_os_str(),
        "--hostname-override".as_ref(),
        "node-1".as_ref(),
        // Room for web's one frontend only: a second Service's does not fit.
        "--max-frontends".as_ref(),
        "1".as_ref(),
    ])
    .unwrap();
    server.apply_yaml(&format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: web}}\nspec: {{clusterIP: {VIP}, ports: [{{name: http, port: 80, targetPort: 8080}}]}}\n"
    ));
    server.apply_yaml(&slice(false));
    pg.wait_for_maps(Duration::from_secs(10), |s| backend_count(s) == Some(1)).unwrap();
    // A full map is told on the Service that did not fit, naming the flag to raise.
    server.apply_yaml(
        "apiVersion: v1\nkind: Service\nmetadata: {name: overflow}\nspec: {clusterIP: 10.96.0.99, ports: [{port: 80}]}\n",
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    let full = loop {
        let found = server
            .recorded_events()
            .into_iter()
            .find(|e| e["regarding"]["name"] == "overflow" && e["reason"] == "LbMapFull");
        if let Some(event) = found {
            break event;
        }
        assert!(
            Instant::now() < deadline,
            "no LbMapFull event: {:?}\n{}",
            server.recorded_events(),
            pg.lb_log()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(full["note"].as_str().unwrap().contains("--max-frontends"), "{full}");
    assert_eq!(full["type"], "Warning");

    server.set_down(true);
    std::thread::sleep(Duration::from_secs(4)); // long enough for the watches' backoff to grow
    let answers = pg.http_requests(SocketAddrV4::new(VIP, 80), 5).unwrap();
    assert!(answers.iter().all(Result::is_ok), "traffic while the API server is down: {answers:?}");
    let (code, body) = http_get_in_node(&pg, "/healthz");
    assert_eq!(code, 200, "the data path serves: healthy ({body})");
    let report: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(report["sourceStaleSince"].as_str().is_some_and(|t| !t.is_empty()), "{body}\n{}", pg.lb_log());
    assert_logged_retrying(&pg, &server);

    server.set_down(false);
    let back = Instant::now();
    server.apply_yaml(&slice(true));
    let took = pg.wait_for_maps(Duration::from_secs(5), |s| backend_count(s) == Some(2)).unwrap();
    eprintln!("a change made as the API server came back reached the maps after {:?}", back.elapsed());
    assert!(took < Duration::from_secs(5));
    // Every watch is back within its longest retry delay (2 s) and a health refresh.
    let start = Instant::now();
    while http_get_in_node(&pg, "/healthz").1.contains("sourceStaleSince") {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "/healthz still says the state is stale\n{}",
            pg.lb_log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(pg.stop_lb().unwrap(), "{}", pg.lb_log());
}

/// An API server that cannot be reached when lb starts: lb keeps trying, says where, and stays
/// live and healthy (kube-proxy queues nothing before its first sync), so a liveness probe does
/// not restart it in a loop; once the server answers, the first sync happens.
#[test]
fn an_api_server_unreachable_at_start_is_waited_for_without_failing_the_probes() {
    require_root();
    let mut pg = Playground::new(&unique("ku"), &[("pod-a", POD_A)]).unwrap();
    pg.serve_http(8080).unwrap();
    let listener = pg.node.run(|| std::net::TcpListener::bind("127.0.0.1:0")).unwrap().unwrap();
    let server = FakeApiServer::start(listener).unwrap();
    let kubeconfig = server.write_kubeconfig(pg.work_dir()).unwrap();
    server.apply_yaml(&format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: web}}\nspec: {{clusterIP: {VIP}, ports: [{{name: http, port: 80, targetPort: 8080}}]}}\n"
    ));
    server.apply_yaml(&slice(false));
    server.set_down(true);
    // A short sync period: a change pending for twice as long makes lb unhealthy.
    pg.start_lb_with(&[
        "--kubeconfig".as_ref(),
        kubeconfig.as_os_str(),
        "--hostname-override".as_ref(),
        "node-1".as_ref(),
        "--sync-period".as_ref(),
        "1s".as_ref(),
    ])
    .unwrap();
    // Once lb has found the server unreachable, longer than twice the sync period.
    pg.wait_for_log("cannot watch the API server; retrying", Duration::from_secs(20)).unwrap();
    std::thread::sleep(Duration::from_secs(3));
    for path in ["/livez", "/healthz"] {
        let (code, body) = http_get_in_node(&pg, path);
        assert_eq!(code, 200, "{path} while the API server is unreachable at start: {body}\n{}", pg.lb_log());
        let report: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert!(report["sourceStaleSince"].is_string(), "{body}\n{}", pg.lb_log());
    }
    assert_logged_retrying(&pg, &server);
    server.set_down(false);
    pg.wait_for_maps(Duration::from_secs(10), |s| backend_count(s) == Some(1)).unwrap();
    let (code, body) = http_get_in_node(&pg, "/healthz");
    assert_eq!(code, 200, "{body}");
    assert!(pg.stop_lb().unwrap(), "{}", pg.lb_log());
}
