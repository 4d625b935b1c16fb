//! Property tests: arbitrary sequences of Services, EndpointSlices, Pods, Nodes and node
//! addresses, valid or not, added, edited and deleted. Each change goes through the source's
//! Pod controller, the pipeline and an incremental reconcile, as in `lb run`. Nothing panics,
//! and after every step:
//! - the incremental desired state equals a conversion from scratch of the same objects;
//! - the maps equal those a fresh reconciler makes of that from-scratch state (IDs aside);
//! - the maps pass the audit: what every reader relies on always, and nothing left unused.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use k8s_openapi::api::core::v1::{Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use lb_userspace::convert::{ClusterObjects, LbAlgorithm, ProxyConfig, desired_state};
use lb_userspace::dataplane::audit;
use lb_userspace::dataplane::in_memory::InMemoryMaps;
use lb_userspace::dataplane::maps::SlotKey;
use lb_userspace::dataplane::maps::{MapsSnapshot, ServiceMaps};
use lb_userspace::dataplane::reconcile::Reconciler;
use lb_userspace::source::pods::{PodEndpoints, slices_of};
use lb_userspace::source::{Object, ObjectChange};
use lb_userspace::state::pipeline::{OnInvalid, Pipeline};
use proptest::prelude::*;
use serde_json::{Value, json};

/// One change to the cluster.
#[derive(Clone, Debug)]
enum Step {
    Service { index: u8, service: Value },
    Slice { index: u8, slice: Value },
    Pod { index: u8, pod: Value },
    DeleteService(u8),
    DeleteSlice(u8),
    DeletePod(u8),
    Node(Value),
    NodeAddresses(Vec<IpAddr>),
}

fn address() -> impl Strategy<Value = String> {
    prop_oneof![
        40 => (1u8..4, 1u8..6).prop_map(|(a, b)| format!("10.244.{a}.{b}")),
        12 => (1u8..4, 1u8..6).prop_map(|(a, b)| format!("fd00:10:244:{a}::{b}")),
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
    // spec.clusterIPs: one family, both (either first), or none.
    let cluster_ip = prop_oneof![
        20 => (0u8..4).prop_map(|i| json!([format!("10.96.0.{}", 10 + i)])),
        6 => (0u8..4).prop_map(|i| json!([format!("fd00:10:96::{:x}", 0x10 + i)])),
        6 => (0u8..4, any::<bool>()).prop_map(|(i, v6_first)| {
            let (v4, v6) = (format!("10.96.0.{}", 10 + i), format!("fd00:10:96::{:x}", 0x10 + i));
            if v6_first { json!([v6, v4]) } else { json!([v4, v6]) }
        }),
        2 => Just(json!(["None"])),
        1 => Just(json!(["bogus"])),
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
    let ranges = prop_oneof![10 => Just(json!([])), 3 => Just(json!(["10.0.0.0/8"])), 2 => Just(json!(["fd00::/8"])),
            1 => Just(json!(["garbage"]))];
    let selector =
        prop_oneof![2 => Just(json!(null)), 1 => Just(json!({"app": "a"})), 1 => Just(json!({"app": "b"}))];
    (kind, cluster_ip, ports, labels, any::<bool>(), any::<bool>(), affinity, ranges, 0u8..3, selector)
        .prop_map(
            move |(
                kind,
                cluster_ip,
                ports,
                labels,
                local,
                internal_local,
                affinity,
                ranges,
                lb_ip,
                selector,
            )| {
                let ports: Vec<Value> = ports
                    .iter()
                    .enumerate()
                    .map(|(i, (port, protocol, node_port))| {
                        json!({"name": format!("p{i}"), "port": 80 + port, "targetPort": 8080 + port,
                           "protocol": protocol, "nodePort": node_port})
                    })
                    .collect();
                let mut spec = json!({
                    "type": kind, "clusterIP": cluster_ip[0], "clusterIPs": cluster_ip, "ports": ports,
                    "externalTrafficPolicy": if local { "Local" } else { "Cluster" },
                    "internalTrafficPolicy": if internal_local { "Local" } else { "Cluster" },
                    "loadBalancerSourceRanges": ranges,
                    "externalIPs": [format!("192.0.2.{lb_ip}")],
                });
                if !affinity.is_null() {
                    spec["sessionAffinity"] = json!("ClientIP");
                    spec["sessionAffinityConfig"] = affinity;
                }
                if !selector.is_null() {
                    spec["selector"] = selector;
                }
                json!({
                    "apiVersion": "v1", "kind": "Service",
                    "metadata": {"name": format!("s{index}"), "namespace": "default", "labels": labels},
                    "spec": spec,
                    "status": {"loadBalancer": {"ingress": [{"ip": format!("198.51.100.{lb_ip}")},
                                                            {"ip": format!("2001:db8::{lb_ip}")}]}},
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
    let family = prop_oneof![3 => Just("IPv4"), 2 => Just("IPv6")];
    (0u8..5, prop::collection::vec(endpoint, 0..5), prop::collection::vec((port_number(), protocol), 1..3), headless, family)
        .prop_map(move |(service, endpoints, ports, headless, family)| {
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
                "addressType": family, "ports": ports, "endpoints": endpoints,
            })
        })
}

fn pod(index: u8) -> impl Strategy<Value = Value> {
    let app = prop_oneof![Just("a"), Just("b")];
    let ip = prop_oneof![6 => (1u8..4, 1u8..6).prop_map(|(a, b)| json!(format!("10.244.{a}.{b}"))), 1 => Just(json!(null))];
    let phase = prop_oneof![6 => Just("Running"), 1 => Just("Succeeded")];
    (app, ip, any::<bool>(), phase, any::<bool>(), prop::option::of(0u8..3)).prop_map(
        move |(app, ip, ready, phase, deleting, node)| {
            let mut pod = json!({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": format!("pod{index}"), "namespace": "default", "labels": {"app": app}},
                "spec": {"containers": [{"name": "c", "ports": [{"name": "p0", "containerPort": 9090}]}]},
                "status": {"phase": phase, "podIP": ip,
                           "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}]},
            });
            if let Some(node) = node {
                pod["spec"]["nodeName"] = json!(format!("node-{node}"));
            }
            if !ip.is_null() {
                // Dual-stack: an IPv6 address beside.
                pod["status"]["podIPs"] =
                    json!([{"ip": ip}, {"ip": format!("fd00:10:244::{:x}", index + 1)}]);
            }
            if deleting {
                pod["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
            }
            pod
        },
    )
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        4 => (0u8..5).prop_flat_map(|index| service(index).prop_map(move |service| Step::Service { index, service })),
        5 => (0u8..6).prop_flat_map(|index| slice(index).prop_map(move |slice| Step::Slice { index, slice })),
        3 => (0u8..5).prop_flat_map(|index| pod(index).prop_map(move |pod| Step::Pod { index, pod })),
        1 => (0u8..5).prop_map(Step::DeleteService),
        1 => (0u8..6).prop_map(Step::DeleteSlice),
        1 => (0u8..5).prop_map(Step::DeletePod),
        1 => (0u8..3).prop_map(|zone| Step::Node(json!({"apiVersion": "v1", "kind": "Node",
                "metadata": {"name": "node-0", "labels": {"topology.kubernetes.io/zone": format!("zone-{zone}")}}}))),
        1 => prop::collection::vec(
                prop_oneof![
                    (1u8..3).prop_map(|i| IpAddr::V4(Ipv4Addr::new(192, 168, 50, i))),
                    (1u16..3).prop_map(|i| IpAddr::V6(Ipv6Addr::new(0xfd00, 0x50, 0, 0, 0, 0, 0, i))),
                ],
                0..4,
            )
            .prop_map(|mut addresses| { addresses.sort(); addresses.dedup(); Step::NodeAddresses(addresses) }),
    ]
}

/// The maps with IDs replaced by what they stand for: two reconcilers that program the same
/// state in a different order give the same lines.
fn canonical(snapshot: &MapsSnapshot) -> Vec<String> {
    let backend = |id: &u32| {
        snapshot.backends.get(id).map_or(format!("missing backend {id}"), |b| {
            format!("{}:{}/{} flags={}", b.address(), b.port(), b.protocol, b.flags)
        })
    };
    let frontend =
        |key: &SlotKey| format!("{}:{}/{} scope={}", key.address(), key.port(), key.protocol, key.scope);
    let mut lines = Vec::new();
    for (key, value) in &snapshot.services {
        if key.backend_slot == 0 {
            let table = snapshot
                .maglev
                .get(&value.maglev_table)
                .map(|positions| positions.iter().map(backend).collect::<Vec<_>>().join(","));
            let meta = snapshot
                .service_meta
                .get(&value.service_id)
                .map(|m| format!("{} {}", m.frontend_type, m.name()));
            let ranges: Vec<String> = snapshot
                .source_ranges
                .iter()
                .filter(|(id, _)| *id == value.service_id)
                .map(|(_, range)| range.to_string())
                .collect();
            lines.push(format!(
                "{} count={} flags={} affinity={} maglev={:?} meta={:?} ranges={ranges:?}",
                frontend(key),
                value.backend_count,
                value.flags,
                value.affinity_timeout,
                table,
                meta
            ));
        } else {
            lines.push(format!(
                "{} slot {} -> {}",
                frontend(key),
                key.backend_slot,
                backend(&value.backend_id)
            ));
        }
    }
    lines.sort();
    lines
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_objects_never_break_the_maps(
        steps in prop::collection::vec(step(), 1..40),
        proxy_name in prop::option::of(Just("lb".to_string())),
        maglev in any::<bool>(),
    ) {
        let mut config = ProxyConfig {
            node_name: Some("node-0".into()),
            service_proxy_name: proxy_name,
            node_addresses: vec!["192.168.50.1".parse().unwrap()],
            lb_algorithm: if maglev { LbAlgorithm::Maglev } else { LbAlgorithm::Random },
            ..ProxyConfig::default()
        };
        let mut services: BTreeMap<u8, Service> = BTreeMap::new();
        let mut slices: BTreeMap<u8, EndpointSlice> = BTreeMap::new();
        let mut pods: BTreeMap<u8, Pod> = BTreeMap::new();
        let mut nodes: Vec<Node> = Vec::new();
        let mut pipeline = Pipeline::new(config.clone(), OnInvalid::Drop);
        let mut pod_endpoints = PodEndpoints::default();
        // A small table keeps Maglev cheap here; its own tests use the default size.
        let mut reconciler = Reconciler::restore_with(InMemoryMaps::default(), 1021).unwrap();
        for step in steps {
            let mut changes: Vec<ObjectChange> = Vec::new();
            let key = |kind: &'static str, name: String| ObjectChange::Delete((kind, "default".into(), name));
            match step {
                Step::Service { index, service } => {
                    let service: Service = serde_json::from_value(service).unwrap();
                    services.insert(index, service.clone());
                    changes.push(ObjectChange::Upsert(Object::Service(Box::new(service))));
                }
                Step::Slice { index, slice } => {
                    let slice: EndpointSlice = serde_json::from_value(slice).unwrap();
                    slices.insert(index, slice.clone());
                    changes.push(ObjectChange::Upsert(Object::EndpointSlice(Box::new(slice))));
                }
                Step::Pod { index, pod } => {
                    let pod: Pod = serde_json::from_value(pod).unwrap();
                    pods.insert(index, pod.clone());
                    changes.push(ObjectChange::Upsert(Object::Pod(Box::new(pod))));
                }
                Step::DeleteService(index) => {
                    services.remove(&index);
                    changes.push(key("Service", format!("s{index}")));
                }
                Step::DeleteSlice(index) => {
                    slices.remove(&index);
                    changes.push(key("EndpointSlice", format!("slice{index}")));
                }
                Step::DeletePod(index) => {
                    pods.remove(&index);
                    changes.push(key("Pod", format!("pod{index}")));
                }
                Step::Node(node) => {
                    let node: Node = serde_json::from_value(node).unwrap();
                    nodes = vec![node.clone()];
                    changes.push(ObjectChange::Upsert(Object::Node(Box::new(node))));
                }
                Step::NodeAddresses(addresses) => {
                    config.node_addresses = addresses.clone();
                    pipeline.set_node_addresses(addresses);
                }
            }
            // Incremental, as `lb run` does it.
            for change in changes {
                let derived = pod_endpoints.on_change(&change);
                for change in derived.into_iter().chain([change]) {
                    let _ = pipeline.apply(change);
                }
            }
            let changed = pipeline.take_changes();
            let report = reconciler.reconcile_frontends(pipeline.table().desired(), &changed.frontends);
            prop_assert!(report.errors.is_empty(), "{:?}", report.errors);

            // From scratch.
            let mut all: Vec<Object> = services.values().map(|s| Object::Service(Box::new(s.clone()))).collect();
            all.extend(pods.values().map(|p| Object::Pod(Box::new(p.clone()))));
            let objects = ClusterObjects {
                services: services.values().cloned().collect(),
                endpoint_slices: slices.values().cloned().chain(slices_of(&all)).collect(),
                nodes: nodes.clone(),
                ..ClusterObjects::default()
            };
            let (desired, _errors) = desired_state(&objects, &config);
            prop_assert_eq!(pipeline.table().desired(), &desired);
            let mut fresh = Reconciler::restore_with(InMemoryMaps::default(), 1021).unwrap();
            fresh.reconcile(&desired);

            let snapshot = reconciler.maps().snapshot_with_maglev().unwrap();
            let expected = fresh.maps().snapshot_with_maglev().unwrap();
            prop_assert_eq!(canonical(&snapshot), canonical(&expected));
            let violations = audit::settled(&snapshot);
            prop_assert!(violations.is_empty(), "{:#?}", violations);
        }
    }
}
