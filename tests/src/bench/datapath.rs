//! The data-path comparison: client ns -> node ns -> pod ns, with the node translating through
//! lb, kube-proxy's iptables rules or its nftables rules, or not at all (`direct`: the client
//! talks to a pod IP). Modes are interleaved round by round on the same topology, with the
//! node's conntrack flushed between them, and the measured Service is the last of N.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::Serialize;

use super::controlplane::timed_load;
use super::loadgen::{self, Stats};
use super::rules::{self, BenchService};
use super::{Plan, cluster_ip, synthetic_endpoint};
use lb_userspace::dataplane::maps::BpfMaps;
use lb_userspace::dataplane::maps::SlotKey;

use crate::playground::Playground;
use crate::unique;

const POD_A: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 11);
const POD_B: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 12);
const ECHO: u16 = 8080;
const SINK: u16 = 9000;
const UDP_ECHO: u16 = 5353;

pub const MODES: [&str; 4] = ["direct", "lb", "iptables", "nftables"];
pub const WORKLOADS: [&str; 4] = ["tcp_rr", "tcp_crr", "udp_rr", "tcp_bulk"];

/// One (N, mode, workload) cell: medians over rounds, and the spread of the rate.
#[derive(Clone, Debug, Serialize)]
pub struct Cell {
    pub services: usize,
    pub mode: &'static str,
    pub workload: &'static str,
    pub rate: f64,
    pub rate_min: f64,
    pub rate_max: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub errors: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct Skipped {
    pub services: usize,
    pub mode: &'static str,
    pub reason: String,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct DatapathResults {
    pub cells: Vec<Cell>,
    pub skipped: Vec<Skipped>,
    /// Rule load times for the data-path rule sets (N Services x 2 endpoints).
    pub rule_load_ms: Vec<(usize, &'static str, f64)>,
}

/// The measured Service (last of N) has the real pods; the others have synthetic endpoints.
fn services(n: usize) -> Vec<BenchService> {
    let mut out = Vec::with_capacity(n + 2);
    for i in 0..n.saturating_sub(1) {
        out.push(BenchService {
            name: format!("bench/svc-{i}:http"),
            cluster_ip: cluster_ip(i),
            protocol: "tcp",
            port: 80,
            endpoints: vec![(synthetic_endpoint(2 * i), ECHO), (synthetic_endpoint(2 * i + 1), ECHO)],
        });
    }
    let vip = cluster_ip(n - 1);
    for (protocol, port, target) in [("tcp", 80, ECHO), ("tcp", SINK, SINK), ("udp", 53, UDP_ECHO)] {
        out.push(BenchService {
            name: format!("bench/measured:{port}"),
            cluster_ip: vip,
            protocol,
            port,
            endpoints: vec![(POD_A, target), (POD_B, target)],
        });
    }
    out
}

/// lb's manifests for the same Services: one Service + EndpointSlice per ClusterIP.
fn manifest(services: &[BenchService]) -> String {
    let mut by_ip: BTreeMap<Ipv4Addr, Vec<&BenchService>> = BTreeMap::new();
    for service in services {
        by_ip.entry(service.cluster_ip).or_default().push(service);
    }
    let mut out = String::new();
    for (index, (ip, ports)) in by_ip.iter().enumerate() {
        let name = format!("s{index}");
        let service_ports: Vec<String> = ports
            .iter()
            .map(|p| {
                format!("{{name: p{}, port: {}, protocol: {}}}", p.port, p.port, p.protocol.to_uppercase())
            })
            .collect();
        let slice_ports: Vec<String> = ports
            .iter()
            .map(|p| {
                format!(
                    "{{name: p{}, port: {}, protocol: {}}}",
                    p.port,
                    p.endpoints[0].1,
                    p.protocol.to_uppercase()
                )
            })
            .collect();
        let endpoints: Vec<String> =
            ports[0].endpoints.iter().map(|(ip, _)| format!("{{addresses: [\"{ip}\"]}}")).collect();
        out += &format!(
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: bench}}\nspec: {{clusterIP: {ip}, ports: [{}]}}\n\
             ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {name}-x, namespace: bench, labels: {{kubernetes.io/service-name: {name}}}}}\naddressType: IPv4\nports: [{}]\nendpoints: [{}]\n",
            service_ports.join(", "),
            slice_ports.join(", "),
            endpoints.join(", ")
        );
    }
    out
}

fn run_command(program: &str, args: &[&str], input: Option<&str>) -> Result<Duration> {
    use std::io::Write;
    let start = Instant::now();
    let mut child = std::process::Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {program} (cargo xtask bench installs it)"))?;
    if let Some(input) = input {
        child.stdin.take().context("stdin")?.write_all(input.as_bytes())?;
    }
    drop(child.stdin.take());
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("{program} {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(start.elapsed())
}

fn in_node<'a>(pg: &'a Playground, program: &'a str, args: &[&'a str]) -> Vec<&'a str> {
    let mut full = vec!["netns", "exec", pg.node.name.as_str(), program];
    full.extend_from_slice(args);
    full
}

fn workloads(
    pg: &Playground,
    target: Ipv4Addr,
    ports: (u16, u16, u16),
    duration: Duration,
) -> Result<Vec<Stats>> {
    let (echo, sink, udp) = ports;
    pg.client.run(move || -> Result<Vec<Stats>> {
        let at = |port| SocketAddr::V4(SocketAddrV4::new(target, port));
        let step = |name: &str| eprintln!("bench:     {name}");
        step("tcp_rr");
        let rr = loadgen::tcp_rr(at(echo), 4, duration)?;
        step("tcp_crr");
        let crr = loadgen::tcp_crr(at(echo), 4, duration)?;
        step("udp_rr");
        let udp_rr = loadgen::udp_rr(at(udp), 4, duration)?;
        step("tcp_bulk");
        let bulk = loadgen::tcp_bulk(at(sink), duration)?;
        Ok(vec![rr, crr, udp_rr, bulk])
    })?
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    values[values.len() / 2]
}

pub fn measure(plan: &Plan) -> Result<DatapathResults> {
    let mut pg = Playground::new(&unique("bench"), &[("pod-a", POD_A), ("pod-b", POD_B)])?;
    let stop = Arc::new(AtomicBool::new(false));
    for pod in &pg.pods {
        let echo = pod.ns.run(|| std::net::TcpListener::bind(("0.0.0.0", ECHO)))??;
        loadgen::serve_echo(echo, stop.clone())?;
        let sink = pod.ns.run(|| std::net::TcpListener::bind(("0.0.0.0", SINK)))??;
        loadgen::serve_sink(sink, stop.clone())?;
        let udp = pod.ns.run(|| std::net::UdpSocket::bind(("0.0.0.0", UDP_ECHO)))??;
        loadgen::serve_udp_echo(udp, stop.clone())?;
    }
    pg.client.sysctl("net.ipv4.ip_local_port_range", "1024 65000")?;
    pg.client.sysctl("net.ipv4.tcp_tw_reuse", "1")?;

    let mut results = DatapathResults::default();
    let mut too_slow = std::collections::BTreeSet::new();
    for &n in &plan.datapath_sizes {
        eprintln!("bench: data path with {n} Services");
        let services = services(n);
        let vip = cluster_ip(n - 1);
        pg.write_manifest("services.yaml", &manifest(&services))?;
        // Time each kube-proxy rule set's load once per N. The nftables table stays loaded,
        // unhooked (it registers no hook until its base chain exists); the iptables nat table
        // registers hooks even when empty, so it is loaded only while its mode runs.
        let iptables_rules = rules::iptables_restore(&services, true);
        let mut available: Vec<&'static str> = vec!["direct", "lb"];
        for (mode, program, args, text) in [
            ("iptables", "iptables-restore", vec![], iptables_rules.clone()),
            ("nftables", "nft", vec!["-f", "-"], rules::nft_ruleset(&services)),
        ]
        .into_iter()
        .filter(|_| plan.kube_proxy_modes)
        {
            if too_slow.contains(mode) {
                results.skipped.push(Skipped {
                    services: n,
                    mode,
                    reason: format!(
                        "rule load was over the {} s bound at a smaller size",
                        plan.rule_load_bound.as_secs()
                    ),
                });
                continue;
            }
            eprintln!("bench:   loading {mode} rules ({} bytes)", text.len());
            match timed_load(&pg.node, program, &args, &text, plan.rule_load_bound)? {
                Some(took) => {
                    results.rule_load_ms.push((n, mode, took.as_secs_f64() * 1000.0));
                    available.push(mode);
                    if mode == "iptables" {
                        run_command("ip", &in_node(&pg, "nft", &["delete", "table", "ip", "nat"]), None)?;
                    }
                }
                None => {
                    too_slow.insert(mode);
                    results.skipped.push(Skipped {
                        services: n,
                        mode,
                        reason: format!("rule load took over the {} s bound", plan.rule_load_bound.as_secs()),
                    });
                }
            }
        }
        let mut samples: BTreeMap<(&str, usize), Vec<Stats>> = BTreeMap::new();
        for round in 0..plan.rounds {
            // Rotate the order so no mode always runs first (warm caches) or last.
            let mut order = available.clone();
            let shift = round % order.len();
            order.rotate_left(shift);
            for mode in order {
                eprintln!("bench:   round {} of {}: {mode}", round + 1, plan.rounds);
                activate(&mut pg, mode, n, vip, &iptables_rules, true)?;
                let target = if mode == "direct" { POD_A } else { vip };
                let ports = if mode == "direct" { (ECHO, SINK, UDP_ECHO) } else { (80, SINK, 53) };
                let stats = workloads(&pg, target, ports, plan.workload_duration).with_context(|| {
                    let log = if mode == "lb" { pg.lb_log() } else { String::new() };
                    format!("{mode} with {n} Services\n{log}")
                })?;
                activate(&mut pg, mode, n, vip, &iptables_rules, false)?;
                for (index, stat) in stats.into_iter().enumerate() {
                    samples.entry((mode, index)).or_default().push(stat);
                }
            }
        }
        for ((mode, index), runs) in samples {
            let mut rates: Vec<f64> = runs.iter().map(|s| s.rate).collect();
            let (min, max) = rates.iter().fold((f64::MAX, 0.0f64), |(lo, hi), r| (lo.min(*r), hi.max(*r)));
            results.cells.push(Cell {
                services: n,
                mode,
                workload: WORKLOADS[index],
                rate: median(&mut rates),
                rate_min: min,
                rate_max: max,
                p50_us: median(&mut runs.iter().map(|s| s.p50_us).collect::<Vec<_>>()),
                p99_us: median(&mut runs.iter().map(|s| s.p99_us).collect::<Vec<_>>()),
                errors: runs.iter().map(|s| s.errors).sum(),
            });
        }
        // Remove this N's rules before the next.
        let _ = run_command("ip", &in_node(&pg, "nft", &["delete", "table", "ip", "kube-proxy"]), None);
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    Ok(results)
}

/// CPU time (user + system, in clock ticks) a process has used.
fn cpu_ticks(pid: u32) -> Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let fields: Vec<&str> = stat.rsplit_once(')').context("stat format")?.1.split_whitespace().collect();
    Ok(fields[11].parse::<u64>()? + fields[12].parse::<u64>()?)
}

/// Waits until `pid` uses no CPU for half a second.
fn wait_until_idle(pid: u32, timeout: Duration) -> Result<()> {
    let start = Instant::now();
    let mut last = cpu_ticks(pid)?;
    while start.elapsed() < timeout {
        std::thread::sleep(Duration::from_millis(500));
        let now = cpu_ticks(pid)?;
        if now == last {
            return Ok(());
        }
        last = now;
    }
    bail!("lb was still busy after {timeout:?}")
}

/// Switches the node to `mode` (or back off it), flushing conntrack first so no mode sees
/// another's flows.
fn activate(
    pg: &mut Playground,
    mode: &str,
    n: usize,
    vip: Ipv4Addr,
    iptables_rules: &str,
    on: bool,
) -> Result<()> {
    if on {
        let _ = run_command("ip", &in_node(pg, "conntrack", &["-F"]), None);
    }
    match (mode, on) {
        ("direct", _) => {}
        ("lb", true) => {
            let manifests = pg.manifests.clone();
            let (slots, backends) = ((4 * n + 4096).to_string(), (3 * n + 4096).to_string());
            let frontends = (n + 4096).to_string();
            pg.start_lb_with(&[
                "--manifests".as_ref(),
                manifests.as_os_str(),
                "--max-service-slots".as_ref(),
                slots.as_ref(),
                "--max-backends".as_ref(),
                backends.as_ref(),
                "--max-frontends".as_ref(),
                frontends.as_ref(),
            ])?;
            // The maps stay pinned across restarts, so they alone do not show that this lb is
            // attached: wait for its first sync, then for the measured frontend.
            let deadline = Duration::from_secs(if n > 10_000 { 600 } else { 60 });
            pg.wait_for_log(" synced ", deadline)?;
            // One key, not a dump: at 100 000 Services a dump takes seconds.
            let maps = BpfMaps::from_pins(&pg.bpf_dir)?;
            let entry = maps.service(&SlotKey::new(vip, 80, lb_common::PROTOCOL_TCP, 0))?;
            if entry.is_none_or(|value| value.backend_count != 2) {
                bail!("after its sync, lb has {entry:?} for the measured Service\n{}", pg.lb_log());
            }
            // After its first sync lb prunes the maps (seconds of CPU at 100 000 Services):
            // measure the data path, not that, on a machine whose cores the workload shares.
            wait_until_idle(pg.lb_pid().context("lb pid")?, deadline)?;
        }
        ("lb", false) => {
            if !pg.stop_lb()? {
                bail!("lb did not exit cleanly:\n{}", pg.lb_log());
            }
        }
        ("iptables", true) => {
            run_command("ip", &in_node(pg, "iptables-restore", &[]), Some(iptables_rules))?;
        }
        ("iptables", false) => {
            // iptables-nft keeps its tables as nftables tables: deleting it removes the hooks.
            run_command("ip", &in_node(pg, "nft", &["delete", "table", "ip", "nat"]), None)?;
        }
        ("nftables", on) => {
            run_command("ip", &in_node(pg, "nft", &["-f", "-"]), Some(&rules::nft_hook(on)))?;
        }
        (other, _) => bail!("unknown mode {other}"),
    }
    Ok(())
}
