//! What an operator sees of a running lb, after real traffic: the Prometheus metrics (kube-proxy's
//! and lb's own), `/proxyMode`, kube-proxy's `/healthz` and `/livez` JSON, and the CLI reading the
//! pinned maps (`lb stats`, `lb endpoints [--watch]`, `lb explain`). Then the start-up checks:
//! each failure gives its message and exit code.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use tests::playground::{CLIENT_IP, Playground, http_exchange};
use tests::{lb_binary, require_root, unique};

const POD_A: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 41);
const POD_B: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 42);
/// A pod that is listed but not ready (no namespace: it never gets traffic).
const POD_SLOW: Ipv4Addr = Ipv4Addr::new(10, 244, 3, 43);
const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 7, 7);
const VIP: SocketAddrV4 = SocketAddrV4::new(CLUSTER_IP, 80);

fn pod(name: &str, ip: Ipv4Addr, ready: bool) -> String {
    tests::playground::pod_manifest(name, "web", ip, ready)
}

fn pods(ready: &[bool; 2]) -> String {
    format!(
        "{}---\n{}---\n{}",
        pod("web-a", POD_A, ready[0]),
        pod("web-b", POD_B, ready[1]),
        pod("web-slow", POD_SLOW, false)
    )
}

const SERVICE: &str = "apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  clusterIP: 10.96.7.7
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: http}]
";

/// A Service whose EndpointSlice carries the trigger-time annotation, as the API server's
/// controllers write it: kube-proxy's network programming latency starts there.
fn annotated(trigger: &str, endpoints: &[Ipv4Addr]) -> String {
    let endpoints: Vec<String> = endpoints
        .iter()
        .map(|ip| format!("{{addresses: [\"{ip}\"], conditions: {{ready: true}}}}"))
        .collect();
    let endpoints = endpoints.join(", ");
    format!(
        "apiVersion: v1
kind: Service
metadata: {{name: annotated, namespace: default}}
spec: {{clusterIP: 10.96.7.8, ports: [{{name: http, port: 80}}]}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: annotated-1
  namespace: default
  labels: {{kubernetes.io/service-name: annotated}}
  annotations: {{endpoints.kubernetes.io/last-change-trigger-time: \"{trigger}\"}}
addressType: IPv4
ports: [{{name: http, port: 8080, protocol: TCP}}]
endpoints: [{endpoints}]
"
    )
}

/// An HTTP GET to lb's own servers in the node namespace: (status code, body).
fn get(pg: &Playground, address: &str, path: &str) -> (u16, String) {
    let (address, path) = (address.to_string(), path.to_string());
    pg.node
        .run(move || {
            let mut stream = TcpStream::connect(&address).expect("connecting to lb's server");
            stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            write!(stream, "GET {path} HTTP/1.0\r\nHost: lb\r\n\r\n").unwrap();
            let mut response = String::new();
            stream.read_to_string(&mut response).unwrap();
            let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
            let code = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
            if path.ends_with("z") {
                // The health answers' headers, as kube-proxy's.
                let head = head.to_ascii_lowercase();
                assert!(
                    head.contains("content-type: application/json")
                        && head.contains("x-content-type-options: nosniff"),
                    "{head}"
                );
            }
            (code, body.to_string())
        })
        .unwrap()
}

/// The value of the sample named exactly `series` (name and labels as exposed).
fn sample(metrics: &str, series: &str) -> Option<f64> {
    metrics.lines().find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
}

fn lb(args: &[&str], pg: &Playground) -> String {
    let out = Command::new(lb_binary()).args(args).arg("--bpf-dir").arg(&pg.bpf_dir).output().unwrap();
    assert!(out.status.success(), "lb {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// Connects from the client at `port` and makes one request: the pod that answered.
fn request_from_port(pg: &Playground, port: u16) -> String {
    pg.client
        .run(move || {
            let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
            socket.set_reuse_address(true).unwrap();
            socket.bind(&SocketAddrV4::new(CLIENT_IP, port).into()).unwrap();
            socket.connect_timeout(&VIP.into(), Duration::from_secs(2)).unwrap();
            http_exchange(socket.into()).unwrap().pod
        })
        .unwrap()
}

#[test]
fn metrics_health_and_the_cli_tell_what_the_data_path_did() {
    require_root();
    let mut pg = Playground::new(&unique("op"), &[("pod-a", POD_A), ("pod-b", POD_B)]).unwrap();
    pg.serve_http(8080).unwrap();
    pg.write_manifest("web.yaml", SERVICE).unwrap();
    pg.write_manifest("pods.yaml", &pods(&[true, true])).unwrap();
    let trigger = k8s_openapi::jiff::Timestamp::try_from(SystemTime::now() - Duration::from_secs(3)).unwrap();
    // A change from before lb starts: not one lb was late programming (not timed).
    pg.write_manifest("annotated.yaml", &annotated(&trigger.to_string(), &[POD_A])).unwrap();
    // kube-proxy's configuration file: its metrics address is taken, its health address loses
    // to the flag, settings lb has no use for are named, and the log is JSON.
    let config = pg.work_dir().join("kube-proxy.conf");
    std::fs::write(
        &config,
        "apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
mode: ipvs
clusterCIDR: 10.244.0.0/16
metricsBindAddress: 127.0.0.1:10259
healthzBindAddress: 0.0.0.0:10266
logging: {format: json}
",
    )
    .unwrap();
    let manifests = pg.manifests.clone();
    pg.start_lb_with(&[
        "--manifests".as_ref(),
        manifests.as_os_str(),
        "--config".as_ref(),
        config.as_os_str(),
        "--healthz-bind-address".as_ref(),
        "127.0.0.1:10256".as_ref(),
    ])
    .unwrap();
    pg.wait_for_maps(Duration::from_secs(10), |s| {
        s.services
            .iter()
            .any(|(k, v)| k.address() == CLUSTER_IP && k.backend_slot == 0 && v.backend_count == 2)
    })
    .unwrap();
    // A change made now: timed from its trigger time to the maps.
    let trigger = k8s_openapi::jiff::Timestamp::try_from(SystemTime::now()).unwrap();
    pg.write_manifest("annotated.yaml", &annotated(&trigger.to_string(), &[POD_A, POD_B])).unwrap();
    pg.wait_for_maps(Duration::from_secs(10), |s| {
        s.services.iter().any(|(k, v)| {
            k.address() == Ipv4Addr::new(10, 96, 7, 8) && k.backend_slot == 0 && v.backend_count == 2
        })
    })
    .unwrap();

    // Real traffic: every connection a new flow of default/web:http.
    const CONNECTIONS: usize = 25;
    let answers = pg.http_requests(VIP, CONNECTIONS).unwrap();
    assert!(answers.iter().all(Result::is_ok), "{answers:?}");

    let (code, metrics) = get(&pg, "127.0.0.1:10259", "/metrics");
    assert_eq!(code, 200, "{metrics}");
    let web = "service=\"default/web:http\",type=\"ClusterIP\"";
    assert_eq!(
        sample(&metrics, &format!("lb_service_new_flows_total{{{web}}}")),
        Some(CONNECTIONS as f64),
        "{metrics}"
    );
    // Each HTTP/1.0 exchange is at least SYN, ACK, request, FIN each way.
    let requests =
        sample(&metrics, &format!("lb_service_packets_total{{{web},direction=\"request\"}}")).unwrap();
    let replies =
        sample(&metrics, &format!("lb_service_packets_total{{{web},direction=\"reply\"}}")).unwrap();
    assert!(
        requests >= 4.0 * CONNECTIONS as f64 && replies >= 3.0 * CONNECTIONS as f64,
        "{requests} {replies}"
    );
    assert!(sample(&metrics, &format!("lb_service_bytes_total{{{web},direction=\"reply\"}}")).unwrap() > 0.0);
    assert_eq!(
        sample(&metrics, "lb_datapath_events_total{counter=\"forward_new_flow\"}"),
        Some(CONNECTIONS as f64)
    );
    assert_eq!(sample(&metrics, "lb_datapath_drops_total{reason=\"conntrack_full\"}"), Some(0.0));
    assert_eq!(sample(&metrics, "lb_map_entries{map=\"LB_SERVICE_META\"}"), Some(2.0), "two ClusterIPs");
    assert!(sample(&metrics, "lb_map_capacity{map=\"LB_SERVICES\"}").unwrap() > 0.0);
    // The flow tables, per family, as the collector's passes count them.
    for map in ["LB_CONNTRACK", "LB_CONNTRACK6", "LB_AFFINITY", "LB_AFFINITY6"] {
        let capacity = format!("lb_map_capacity{{map=\"{map}\"}}");
        let waited = Instant::now();
        while sample(&get(&pg, "127.0.0.1:10259", "/metrics").1, &capacity).is_none() {
            assert!(waited.elapsed() < Duration::from_secs(15), "no {capacity} after the collector's passes");
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    let (_, metrics) = get(&pg, "127.0.0.1:10259", "/metrics");
    assert_eq!(
        sample(&metrics, "lb_map_entries{map=\"LB_CONNTRACK6\"}"),
        Some(0.0),
        "no IPv6 flow: {metrics}"
    );
    assert!(sample(&metrics, "lb_map_capacity{map=\"LB_CONNTRACK\"}").unwrap() >= 1024.0);
    // kube-proxy's: a sync ran, changes were counted, the annotated slice's latency observed.
    // kube-proxy v1.36's series, with their ip_family: one sync programs both families, so
    // both carry it.
    for family in ["IPv4", "IPv6"] {
        let with = |name: &str| format!("{name}{{ip_family=\"{family}\"}}");
        assert!(sample(&metrics, &with("kubeproxy_sync_proxy_rules_duration_seconds_count")).unwrap() >= 1.0);
        assert_eq!(
            sample(&metrics, &with("kubeproxy_sync_full_proxy_rules_duration_seconds_count")),
            Some(1.0),
            "the first sync is the full one: {metrics}"
        );
        assert!(
            sample(&metrics, &with("kubeproxy_sync_proxy_rules_last_timestamp_seconds")).unwrap() > 1.7e9
        );
        assert!(
            sample(&metrics, &with("kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds")).unwrap()
                > 1.7e9
        );
        assert_eq!(
            sample(
                &metrics,
                &format!(
                    "kubeproxy_sync_proxy_rules_no_local_endpoints_total{{ip_family=\"{family}\",traffic_policy=\"internal\"}}"
                )
            ),
            Some(0.0),
            "{metrics}"
        );
    }
    assert!(sample(&metrics, "kubeproxy_sync_proxy_rules_service_changes_total").unwrap() >= 2.0);
    assert!(sample(&metrics, "kubeproxy_sync_proxy_rules_endpoint_changes_total").unwrap() >= 2.0);
    // Only the change made after the start was timed; the slice is IPv4, so under IPv4.
    assert_eq!(
        sample(&metrics, "kubeproxy_network_programming_duration_seconds_count{ip_family=\"IPv4\"}"),
        Some(1.0),
        "{metrics}"
    );
    assert_eq!(
        sample(&metrics, "kubeproxy_network_programming_duration_seconds_count{ip_family=\"IPv6\"}"),
        None
    );
    let latency =
        sample(&metrics, "kubeproxy_network_programming_duration_seconds_sum{ip_family=\"IPv4\"}").unwrap();
    assert!((0.0..10.0).contains(&latency), "from the trigger time to the maps: {latency}");
    assert_eq!(get(&pg, "127.0.0.1:10259", "/proxyMode"), (200, "ebpf".to_string()));
    // The process metrics kube-proxy's dashboards chart.
    assert!(sample(&metrics, "process_resident_memory_bytes").unwrap() > 1e6, "{metrics}");
    assert!(sample(&metrics, "process_cpu_seconds_total").unwrap() > 0.0);
    assert!(sample(&metrics, "process_start_time_seconds").unwrap() > 1.7e9);

    // kube-proxy v1.36's health JSON.
    let (code, body) = get(&pg, "127.0.0.1:10256", "/healthz");
    assert_eq!(code, 200, "{body}");
    let health: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(health["healthy"], true, "{body}");
    assert_eq!(health["nodeEligible"], true, "{body}");
    assert_eq!(health["status"]["IPv4"]["healthy"], true, "{body}");
    assert_eq!(health["status"]["IPv6"], health["status"]["IPv4"], "one sync programs both: {body}");
    for field in ["lastUpdated", "currentTime"] {
        let time: k8s_openapi::jiff::Timestamp = health[field].as_str().unwrap().parse().unwrap();
        assert!(time.as_second() > 1_700_000_000, "{field}: {body}");
    }
    assert!(
        health["status"]["IPv4"]["lastUpdated"]
            .as_str()
            .unwrap()
            .parse::<k8s_openapi::jiff::Timestamp>()
            .is_ok()
    );
    let (code, body) = get(&pg, "127.0.0.1:10256", "/livez");
    let live: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        (code, &live["healthy"], live.get("nodeEligible")),
        (200, &serde_json::json!(true), None),
        "{body}"
    );
    let (_, metrics) = get(&pg, "127.0.0.1:10259", "/metrics");
    assert_eq!(sample(&metrics, "kubeproxy_proxy_healthz_total{code=\"200\"}"), Some(1.0), "{metrics}");
    assert_eq!(sample(&metrics, "kubeproxy_proxy_livez_total{code=\"200\"}"), Some(1.0));

    // lb stats: the same connections, read from the pinned maps.
    let stats: serde_json::Value = serde_json::from_str(&lb(&["stats", "-o", "json"], &pg)).unwrap();
    let row =
        stats["services"].as_array().unwrap().iter().find(|s| s["service"] == "default/web:http").unwrap();
    assert_eq!(row["new_flows"], CONNECTIONS as u64, "{stats}");
    assert_eq!(stats["counters"]["forward_new_flow"], CONNECTIONS as u64);
    let table = lb(&["stats"], &pg);
    assert!(
        table.starts_with("SERVICE ") && table.contains("default/web:http") && table.contains("COUNTER "),
        "{table}"
    );

    // lb endpoints, as kubectl get endpoints prints them (its tab writer: cells at least 10
    // wide, 3 spaces of padding).
    let ready_pair = format!("{POD_A}:8080,{POD_B}:8080");
    let width = ready_pair.len() + 3;
    assert_eq!(
        lb(&["endpoints", "default/web"], &pg),
        format!("NAME      {:width$}AGE\nweb       {ready_pair:width$}<unknown>\n", "ENDPOINTS"),
    );
    let all = lb(&["endpoints"], &pg);
    assert!(
        all.starts_with("NAMESPACE   NAME ")
            && all.contains(&format!("default     annotated   {POD_A}:8080,{POD_B}:8080 ")),
        "{all}"
    );

    // --watch: a line when the endpoints go, and one when they come back.
    let mut watch = Command::new(lb_binary())
        .args(["endpoints", "default/web", "--watch", "--watch-interval", "50ms", "--bpf-dir"])
        .arg(&pg.bpf_dir)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(watch.stdout.take().unwrap()).lines();
    assert!(lines.next().unwrap().unwrap().starts_with("NAME "));
    assert!(lines.next().unwrap().unwrap().starts_with("web "));
    pg.write_manifest("pods.yaml", &pods(&[false, false])).unwrap();
    assert_eq!(lines.next().unwrap().unwrap(), "web       <none>    <unknown>");
    pg.write_manifest("pods.yaml", &pods(&[true, true])).unwrap();
    assert_eq!(lines.next().unwrap().unwrap(), format!("web       {ready_pair}   <unknown>"));
    watch.kill().unwrap();
    watch.wait().unwrap();
    // Those two changes were synced one frontend at a time: partial syncs.
    let (_, metrics) = get(&pg, "127.0.0.1:10259", "/metrics");
    for family in ["IPv4", "IPv6"] {
        let partial =
            format!("kubeproxy_sync_partial_proxy_rules_duration_seconds_count{{ip_family=\"{family}\"}}");
        assert!(sample(&metrics, &partial).unwrap() >= 2.0, "{metrics}");
    }

    // lb explain: a new flow from a chosen port gets the backend explain names, and once the
    // flow exists explain says it is tracked.
    let manifests = pg.manifests.display().to_string();
    let port = 40123;
    let query = [format!("{CLIENT_IP}:{port}"), format!("{VIP}/TCP")];
    let args = |extra: &[&str]| {
        let mut args = vec!["explain", &query[0], &query[1], "--manifests", &manifests, "-o", "json"];
        args.extend_from_slice(extra);
        args.into_iter().map(String::from).collect::<Vec<_>>()
    };
    let explain = |extra: &[&str]| -> serde_json::Value {
        let args = args(extra);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        serde_json::from_str(&lb(&args, &pg)).unwrap()
    };
    let before = explain(&[]);
    assert_eq!(before["frontend"]["service"], "default/web:http", "{before}");
    assert!(before["chosenBy"].as_str().unwrap().starts_with("hash: the flow's hash"), "{before}");
    assert_eq!(before["eligible"].as_array().unwrap().len(), 2);
    assert_eq!(
        before["notEligible"],
        serde_json::json!([[format!("{POD_SLOW}:8080"), "not ready"]]),
        "{before}"
    );
    let backend = before["backend"].as_str().unwrap().to_string();
    let answered_by = request_from_port(&pg, port);
    let expected_pod = if backend == format!("{POD_A}:8080") { "pod-a" } else { "pod-b" };
    assert_eq!(answered_by, expected_pod, "explain said {backend}");
    assert_eq!(before["translated"], format!("{CLIENT_IP}:{port} -> {backend}/TCP"));
    let after = explain(&[]);
    assert!(after["chosenBy"].as_str().unwrap().starts_with("the flow is tracked"), "{after}");
    assert_eq!(after["backend"], backend);
    let text = lb(&["explain", &query[0], &query[1]], &pg);
    assert!(text.contains("Frontend    10.96.7.7:80/TCP ClusterIP of default/web:http"), "{text}");
    let nowhere = lb(&["explain", &query[0], "10.96.99.99:80/TCP"], &pg);
    assert!(nowhere.contains("no frontend at this address"), "{nowhere}");
    assert!(pg.stop_lb().unwrap(), "lb exits cleanly:\n{}", pg.lb_log());
    let log = pg.lb_log();
    let lines: Vec<serde_json::Value> = log
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}")))
        .collect();
    let ignored =
        lines.iter().find(|l| l["message"] == "kube-proxy settings without a meaning for lb are ignored");
    assert_eq!(ignored.map(|l| l["ignored"].as_str().unwrap()), Some("mode, clusterCIDR"), "{log}");
    assert!(lines.iter().any(|l| l["message"] == "synced" && l["level"] == "INFO"), "{log}");
}

/// Starts `lb run` with `args` in the node namespace and waits for it to exit: (code, stderr).
fn failed_start(pg: &Playground, args: &[String], uid: Option<u32>) -> (i32, String) {
    use std::os::unix::process::CommandExt;
    let mut command = match uid {
        // nsenter needs root: an unprivileged lb stops at its first check, before it touches
        // the kernel or any network.
        Some(uid) => {
            let mut command = Command::new(lb_binary());
            command.uid(uid).gid(uid);
            command
        }
        None => {
            let mut command = Command::new("nsenter");
            command.arg(format!("--net={}", pg.node.path().display())).arg("--").arg(lb_binary());
            command
        }
    };
    command.arg("run").args(args).stdout(Stdio::null()).stderr(Stdio::piped());
    let mut child = command.spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut stderr = String::new();
            child.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
            return (status.code().unwrap_or(-1), stderr);
        }
        if Instant::now() > deadline {
            child.kill().unwrap();
            panic!("lb run {args:?} did not exit");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn start_up_failures_say_what_to_do() {
    require_root();
    let mut pg = Playground::new(&unique("sf"), &[]).unwrap();
    let manifests = pg.manifests.display().to_string();
    let bpf_dir = pg.bpf_dir.display().to_string();
    let cgroup = pg.cgroup.path().display().to_string();
    let base = [
        "--manifests",
        &manifests,
        "--interfaces",
        "lbc0",
        "--healthz-bind-address",
        "",
        "--metrics-bind-address",
        "",
    ];
    let with = |extra: &[&str]| base.iter().chain(extra).map(|s| s.to_string()).collect::<Vec<String>>();

    // Not on bpffs.
    let not_bpffs = std::env::temp_dir().join(unique("not-bpffs"));
    let (code, stderr) = failed_start(
        &pg,
        &with(&["--bpf-dir", &not_bpffs.display().to_string(), "--cgroup-path", &cgroup]),
        None,
    );
    assert_eq!(code, 4, "{stderr}");
    assert!(
        stderr.contains("is not on a BPF filesystem") && stderr.contains("mount -t bpf bpf /sys/fs/bpf"),
        "{stderr}"
    );

    // A cgroup path that is not a cgroup v2 directory (the case that used to end in EBADF).
    let (code, stderr) = failed_start(&pg, &with(&["--bpf-dir", &bpf_dir, "--cgroup-path", "/tmp"]), None);
    assert_eq!(code, 4, "{stderr}");
    assert!(
        stderr.contains("--cgroup-path /tmp is not a cgroup directory") && stderr.contains("cgroup v2"),
        "{stderr}"
    );

    // Not root.
    let (code, stderr) =
        failed_start(&pg, &with(&["--bpf-dir", &bpf_dir, "--cgroup-path", &cgroup]), Some(65534));
    assert_eq!(code, 3, "{stderr}");
    assert!(
        stderr.contains("run it as root, or with the capabilities CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN"),
        "{stderr}"
    );

    // A configuration field kube-proxy does not have.
    let config = pg.work_dir().join("kube-proxy.conf");
    std::fs::write(
        &config,
        "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\nminSyncPeriode: 1s\n",
    )
    .unwrap();
    let config = config.display().to_string();
    let (code, stderr) = failed_start(&pg, &with(&["--bpf-dir", &bpf_dir, "--config", &config]), None);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("unknown field \"minSyncPeriode\""), "{stderr}");

    // A second lb on the same pins.
    pg.start_lb().unwrap();
    pg.wait_for_log("synced", Duration::from_secs(10)).unwrap();
    let (code, stderr) = failed_start(&pg, &with(&["--bpf-dir", &bpf_dir, "--cgroup-path", &cgroup]), None);
    assert_eq!(code, 5, "{stderr}");
    assert!(stderr.contains("another lb is running with --bpf-dir"), "{stderr}");
    assert!(pg.stop_lb().unwrap());
}

#[test]
fn traffic_counters_can_be_left_out_of_the_programs() {
    require_root();
    let mut pg = Playground::new(&unique("tc"), &[("pod-a", POD_A)]).unwrap();
    pg.serve_http(8080).unwrap();
    pg.write_manifest("web.yaml", SERVICE).unwrap();
    pg.write_manifest("pods.yaml", &pod("web-a", POD_A, true)).unwrap();
    let manifests = pg.manifests.clone();
    pg.start_lb_with(&[
        "--manifests".as_ref(),
        manifests.as_os_str(),
        "--service-traffic-counters=false".as_ref(),
    ])
    .unwrap();
    pg.wait_for_maps(Duration::from_secs(10), |s| {
        s.services
            .iter()
            .any(|(k, v)| k.address() == CLUSTER_IP && k.backend_slot == 0 && v.backend_count == 1)
    })
    .unwrap();
    let answers = pg.http_requests(VIP, 5).unwrap();
    assert!(answers.iter().all(Result::is_ok), "{answers:?}");
    let stats: serde_json::Value = serde_json::from_str(&lb(&["stats", "-o", "json"], &pg)).unwrap();
    assert_eq!(stats["services"], serde_json::json!([]), "{stats}");
    assert_eq!(stats["counters"]["forward_new_flow"], 5, "the verdict counters still count");
    assert!(pg.stop_lb().unwrap());
}
