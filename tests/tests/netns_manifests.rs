//! Manifests mode standing in for the control plane: Pods selected by a Service's labels become
//! its endpoints, a Service without a clusterIP gets one that survives a restart of lb, and a
//! clusterIP another Service holds is rejected with both named.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::time::Duration;

use lb_userspace::dataplane::maps::MapsSnapshot;
use tests::playground::Playground;
use tests::{require_root, unique};

const POD_A: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 31);
const POD_B: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 32);

fn pod(name: &str, ip: Ipv4Addr, ready: bool) -> String {
    tests::playground::pod_manifest(name, "shop", ip, ready)
}

const SERVICE: &str = "apiVersion: v1
kind: Service
metadata: {name: shop}
spec:
  selector: {app: shop}
  ports: [{name: http, port: 80, targetPort: http}]
";

/// The frontend lb programmed for port 80, with its backend count.
fn frontend(snapshot: &MapsSnapshot) -> Option<(std::net::IpAddr, u16)> {
    snapshot
        .services
        .iter()
        .find(|(k, _)| k.backend_slot == 0 && k.port() == 80)
        .map(|(k, v)| (k.address(), v.backend_count))
}

#[test]
fn pods_become_endpoints_and_the_allocated_cluster_ip_survives_a_restart() {
    require_root();
    let mut pg = Playground::new(&unique("m"), &[("pod-a", POD_A), ("pod-b", POD_B)]).unwrap();
    pg.serve_http(8080).unwrap();
    pg.write_manifest("shop.yaml", SERVICE).unwrap();
    pg.write_manifest(
        "pods.yaml",
        &format!("{}---\n{}", pod("shop-a", POD_A, true), pod("shop-b", POD_B, true)),
    )
    .unwrap();
    pg.start_lb().unwrap();
    pg.wait_for_maps(Duration::from_secs(10), |s| frontend(s).is_some_and(|(_, n)| n == 2)).unwrap();
    let (cluster_ip, _) = frontend(&pg.snapshot()).unwrap();
    assert_eq!(cluster_ip, Ipv4Addr::new(10, 96, 0, 1), "first address of the default range");
    let answers = pg.http_requests(std::net::SocketAddr::new(cluster_ip, 80), 40).unwrap();
    let pods: BTreeSet<String> = answers.into_iter().map(|a| a.unwrap().pod).collect();
    assert_eq!(pods.into_iter().collect::<Vec<_>>(), ["pod-a", "pod-b"]);

    // A Pod turning not-ready leaves the endpoints.
    pg.write_manifest(
        "pods.yaml",
        &format!("{}---\n{}", pod("shop-a", POD_A, true), pod("shop-b", POD_B, false)),
    )
    .unwrap();
    pg.wait_for_maps(Duration::from_secs(2), |s| frontend(s).is_some_and(|(_, n)| n == 1)).unwrap();

    // Another Service asking for the same address is rejected, naming both.
    pg.write_manifest(
        "squatter.yaml",
        &format!("apiVersion: v1\nkind: Service\nmetadata: {{name: squatter}}\nspec: {{clusterIP: {cluster_ip}, ports: [{{port: 80}}]}}\n"),
    )
    .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    let rejected =
        "Service default/squatter: spec.clusterIP 10.96.0.1 is already used by Service default/shop";
    while !pg.lb_log().contains(rejected) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(pg.lb_log().contains(rejected), "{}", pg.lb_log());

    // Restart lb with a Service added that sorts first: the allocation is remembered, so shop
    // keeps its address instead of being renumbered.
    assert!(pg.stop_lb().unwrap());
    pg.write_manifest(
        "aaa.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: aaa}\nspec: {ports: [{port: 81}]}\n",
    )
    .unwrap();
    pg.start_lb().unwrap();
    pg.wait_for_maps(Duration::from_secs(10), |s| {
        s.services.keys().any(|k| k.backend_slot == 0 && k.port() == 81)
    })
    .unwrap();
    let table = pg.services_table().unwrap();
    assert!(table.contains("default/shop:http") && table.contains("10.96.0.1:80/TCP"), "{table}");
    assert!(table.contains("default/aaa") && table.contains("10.96.0.2:81/TCP"), "{table}");
    assert!(pg.stop_lb().unwrap());
}
