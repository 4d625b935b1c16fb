//! Property tests: arbitrary sequences of Services, EndpointSlices and Nodes, valid or not,
//! through conversion and the reconciler. Nothing panics, every object that fails its checks is
//! reported and passed over, and after every step the maps pass the audit: what every reader
//! relies on always, and nothing left unused once the sync succeeded.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use lb_userspace::convert::{ClusterObjects, LbAlgorithm, ProxyConfig, desired_state};
use lb_userspace::dataplane::audit;
use lb_userspace::dataplane::maps::{InMemoryMaps, ServiceMaps};
use lb_userspace::dataplane::reconcile::Reconciler;
use proptest::prelude::*;
use serde_json::{Value, json};

/// One change to the cluster.
#[derive(Clone, Debug)]
enum Step {
    Service { index: u8, service: Value },
    Slice { index: u8, slice: Value },
    DeleteService(u8),
    DeleteSlice(u8),
    Node(Value),
}

fn address() -> impl Strategy<Value = String> {
    prop_oneof![
        40 => (1u8..4, 1u8..6).prop_map(|(a, b)| format!("10.244.{a}.{b}")),
        1 => Just("not-an-ip".to_string()),
        1 => Just("fd00::1".to_string()),
        3 => Just("10.0.0.1".to_string()),
    ]
}

fn port_number() -> impl Strategy<Value = i32> {
    prop_oneof![40 => 1i32..3, 1 => Just(0), 1 => Just(70000)]
}

fn service(index: u8) -> impl Strategy<Value = Value> {
    let kind = prop_oneof![Just("ClusterIP"), Just("NodePort"), Just("LoadBalancer"), Just("ExternalName")];
    let cluster_ip = prop_oneof![
        30 => (0u8..4).prop_map(|i| json!(format!("10.96.0.{}", 10 + i))),
        2 => Just(json!("None")),
        1 => Just(json!("bogus")),
    ];
    let ports = prop::collection::vec(
        (
            port_number(),
            prop_oneof![8 => Just("TCP"), 3 => Just("UDP"), 1 => Just("SCTP")],
            prop::option::of(30000i32..30003),
        ),
        1..3,
    );
    let labels = prop_oneof![
        6 => Just(json!({})),
        1 => Just(json!({"service.kubernetes.io/headless": ""})),
        1 => Just(json!({"service.kubernetes.io/service-proxy-name": "other"})),
        1 => Just(json!({"service.kubernetes.io/service-proxy-name": "lb"})),
    ];
    let affinity = prop_oneof![
        3 => Just(json!(null)),
        1 => (prop_oneof![1 => Just(0i32), 8 => Just(10), 1 => Just(100_000)]).prop_map(|t| json!({"clientIP": {"timeoutSeconds": t}})),
    ];
    let ranges =
        prop_oneof![10 => Just(json!([])), 3 => Just(json!(["10.0.0.0/8"])), 1 => Just(json!(["garbage"]))];
    (kind, cluster_ip, ports, labels, any::<bool>(), any::<bool>(), affinity, ranges, 0u8..3).prop_map(
        move |(kind, cluster_ip, ports, labels, local, internal_local, affinity, ranges, lb_ip)| {
            let ports: Vec<Value> = ports
                .iter()
                .enumerate()
                .map(|(i, (port, protocol, node_port))| {
                    json!({"name": format!("p{i}"), "port": 80 + port, "targetPort": 8080 + port,
                           "protocol": protocol, "nodePort": node_port})
                })
                .collect();
            let mut spec = json!({
                "type": kind, "clusterIP": cluster_ip, "ports": ports,
                "externalTrafficPolicy": if local { "Local" } else { "Cluster" },
                "internalTrafficPolicy": if internal_local { "Local" } else { "Cluster" },
                "loadBalancerSourceRanges": ranges,
                "externalIPs": [format!("192.0.2.{lb_ip}")],
            });
            if !affinity.is_null() {
                spec["sessionAffinity"] = json!("ClientIP");
                spec["sessionAffinityConfig"] = affinity;
            }
            json!({
                "apiVersion": "v1", "kind": "Service",
                "metadata": {"name": format!("s{index}"), "namespace": "default", "labels": labels},
                "spec": spec,
                "status": {"loadBalancer": {"ingress": [{"ip": format!("198.51.100.{lb_ip}")}]}},
            })
        },
    )
}

fn slice(index: u8) -> impl Strategy<Value = Value> {
    let mostly = || prop_oneof![3 => Just(true), 1 => Just(false)];
    let endpoint = (address(), mostly(), any::<bool>(), any::<bool>(), prop::option::of(0u8..3)).prop_map(
        |(ip, ready, serving, terminating, node)| {
            let mut endpoint = json!({"addresses": [ip],
                "conditions": {"ready": ready, "serving": serving, "terminating": terminating}});
            if let Some(node) = node {
                endpoint["nodeName"] = json!(format!("node-{node}"));
                endpoint["hints"] = json!({"forZones": [{"name": format!("zone-{node}")}],
                                           "forNodes": [{"name": format!("node-{node}")}]});
            }
            endpoint
        },
    );
    let headless = prop_oneof![7 => Just(false), 1 => Just(true)];
    let protocol = prop_oneof![3 => Just("TCP"), 1 => Just("UDP")];
    (0u8..5, prop::collection::vec(endpoint, 0..5), prop::collection::vec((port_number(), protocol), 1..3), headless)
        .prop_map(move |(service, endpoints, ports, headless)| {
            let ports: Vec<Value> = ports
                .iter()
                .enumerate()
                .map(|(i, (port, protocol))| json!({"name": format!("p{i}"), "port": 8080 + port, "protocol": protocol}))
                .collect();
            let mut labels = json!({"kubernetes.io/service-name": format!("s{service}")});
            if headless {
                labels["service.kubernetes.io/headless"] = json!("");
            }
            json!({
                "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                "metadata": {"name": format!("slice{index}"), "namespace": "default", "labels": labels},
                "addressType": "IPv4", "ports": ports, "endpoints": endpoints,
            })
        })
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        4 => (0u8..5).prop_flat_map(|index| service(index).prop_map(move |service| Step::Service { index, service })),
        5 => (0u8..6).prop_flat_map(|index| slice(index).prop_map(move |slice| Step::Slice { index, slice })),
        1 => (0u8..5).prop_map(Step::DeleteService),
        1 => (0u8..6).prop_map(Step::DeleteSlice),
        1 => (0u8..3).prop_map(|zone| Step::Node(json!({"apiVersion": "v1", "kind": "Node",
                "metadata": {"name": "node-0", "labels": {"topology.kubernetes.io/zone": format!("zone-{zone}")}}}))),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_objects_never_break_the_maps(
        steps in prop::collection::vec(step(), 1..40),
        proxy_name in prop::option::of(Just("lb".to_string())),
        maglev in any::<bool>(),
    ) {
        let config = ProxyConfig {
            node_name: Some("node-0".into()),
            service_proxy_name: proxy_name,
            node_addresses: vec!["192.168.50.1".parse().unwrap()],
            lb_algorithm: if maglev { LbAlgorithm::Maglev } else { LbAlgorithm::Random },
            ..ProxyConfig::default()
        };
        let mut services: BTreeMap<u8, Service> = BTreeMap::new();
        let mut slices: BTreeMap<u8, EndpointSlice> = BTreeMap::new();
        let mut nodes: Vec<Node> = Vec::new();
        // A small table keeps Maglev cheap here; its own tests use the default size.
        let mut reconciler = Reconciler::restore_with(InMemoryMaps::default(), 1021).unwrap();
        for step in steps {
            match step {
                Step::Service { index, service } => {
                    services.insert(index, serde_json::from_value(service).unwrap());
                }
                Step::Slice { index, slice } => {
                    slices.insert(index, serde_json::from_value(slice).unwrap());
                }
                Step::DeleteService(index) => {
                    services.remove(&index);
                }
                Step::DeleteSlice(index) => {
                    slices.remove(&index);
                }
                Step::Node(node) => nodes = vec![serde_json::from_value(node).unwrap()],
            }
            let objects = ClusterObjects {
                services: services.values().cloned().collect(),
                endpoint_slices: slices.values().cloned().collect(),
                nodes: nodes.clone(),
                ..ClusterObjects::default()
            };
            let (desired, _errors) = desired_state(&objects, &config);
            let report = reconciler.reconcile(&desired);
            let snapshot = reconciler.maps().snapshot_with_maglev().unwrap();
            prop_assert!(report.errors.is_empty(), "{:?}", report.errors);
            let violations = audit::settled(&snapshot);
            prop_assert!(violations.is_empty(), "{:#?}", violations);
            // The maps hold exactly the desired frontends.
            let entries = snapshot.services.keys().filter(|k| k.backend_slot == 0).count();
            prop_assert_eq!(entries, desired.frontends.len());
        }
    }
}
