//! Program cost under real traffic: the kernel's own run-time statistics (BPF_ENABLE_STATS:
//! run_time_ns / run_cnt per program) for lb's TC programs while a workload runs through them,
//! beside an empty TC program attached first on the same interfaces in the same run, so both
//! see exactly the same packets.
//!
//! The rounds also alternate direct connections to a pod with connections through the
//! ClusterIP against one running lb: a flow state that outlives its flow, or captures
//! connections that are not lb's, shows up as failed direct rounds.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use aya::programs::{LinkOrder, SchedClassifier, TcAttachType, tc::TcAttachOptions};
use serde::Serialize;

use super::loadgen::{self, Stats};
use crate::playground::Playground;
use crate::unique;

const POD_A: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 11);
const POD_B: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 12);
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const ECHO: u16 = 8080;
const UDP_ECHO: u16 = 5353;
/// The node's interfaces in the playground: the client's side and the two pods'.
const NODE_INTERFACES: [&str; 3] = ["lbc0", "lbp0", "lbp1"];

const SERVICE: &str = "apiVersion: v1
kind: Service
metadata: {name: echo, namespace: bench}
spec:
  clusterIP: 10.96.0.10
  ports:
    - {name: tcp, port: 80, targetPort: 8080}
    - {name: udp, port: 53, targetPort: 5353, protocol: UDP}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: echo-x, namespace: bench, labels: {kubernetes.io/service-name: echo}}
addressType: IPv4
ports:
  - {name: tcp, port: 8080, protocol: TCP}
  - {name: udp, port: 5353, protocol: UDP}
endpoints:
  - addresses: [10.244.1.11]
  - addresses: [10.244.2.12]
";

/// One workload through the ClusterIP: nanoseconds per packet of each program.
#[derive(Clone, Debug, Serialize)]
pub struct TrafficCost {
    pub workload: &'static str,
    /// What the packets mostly are, for the reader.
    pub packets: &'static str,
    /// lb_ingress, and the empty program on the same packets.
    pub lb_ns: f64,
    pub empty_ns: f64,
    pub ratio: f64,
    /// Packets both programs ran on, summed over rounds.
    pub lb_runs: u64,
    pub empty_runs: u64,
    /// lb_egress (every packet leaving the node's interfaces pays it), and the empty program
    /// on the same egress packets.
    pub egress_ns: f64,
    pub egress_empty_ns: f64,
}

/// A direct round (client to pod IP, no Service) run after lb had carried traffic.
#[derive(Clone, Debug, Serialize)]
pub struct DirectRound {
    pub round: usize,
    pub workload: &'static str,
    pub rate: f64,
    pub errors: u64,
    /// Why the round stopped early, if it did.
    pub failure: Option<String>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct TrafficCostResults {
    pub costs: Vec<TrafficCost>,
    pub direct_rounds: Vec<DirectRound>,
}

/// Cumulative (run time ns, run count) of the programs with this name attached to the
/// node's interfaces (`direction`), queried in the node namespace.
fn stats_of(pg: &Playground, name: &'static str, direction: TcAttachType) -> Result<(u64, u64)> {
    pg.node.run(move || -> Result<(u64, u64)> {
        let mut seen = std::collections::BTreeSet::new();
        let (mut time, mut count) = (0u64, 0u64);
        for interface in NODE_INTERFACES {
            let (_, programs) = SchedClassifier::query_tcx(interface, direction)
                .with_context(|| format!("querying {interface}'s TCX programs"))?;
            for info in programs.iter().filter(|info| info.name_as_str() == Some(name)) {
                // One program attached to several interfaces: count it once.
                if seen.insert(info.id()) {
                    time += info.run_time().as_nanos() as u64;
                    count += info.run_count();
                }
            }
        }
        Ok((time, count))
    })?
}

/// Loads the empty program from lb's object (its maps pinned apart from lb's) and attaches it
/// first on every node interface in `direction`, so it runs on every packet lb's program there
/// sees. One instance per direction: the kernel keeps statistics per program.
fn attach_empty_program(pg: &Playground, direction: TcAttachType) -> Result<aya::Ebpf> {
    let pins = pg.bpf_dir.with_file_name(format!("bench-empty-{direction:?}"));
    std::fs::create_dir_all(&pins)?;
    pg.node.run(move || -> Result<aya::Ebpf> {
        let mut ebpf = aya::EbpfLoader::new()
            .default_map_pin_directory(&pins)
            .map_pin_path(lb_common::map_names::MAGLEV, pins.join(lb_common::map_names::MAGLEV))
            .load(lb_userspace::dataplane::datapath::EBPF_OBJECT)
            .context("loading the eBPF object for the empty program")?;
        let program: &mut SchedClassifier = ebpf.program_mut("lb_noop").context("lb_noop")?.try_into()?;
        program.load()?;
        for interface in NODE_INTERFACES {
            program
                .attach_with_options(interface, direction, TcAttachOptions::TcxOrder(LinkOrder::first()))
                .with_context(|| format!("attaching lb_noop to {interface}"))?;
        }
        Ok(ebpf)
    })?
}

type Workload = fn(SocketAddr, Duration) -> Result<Stats>;

const WORKLOADS: [(&str, &str, Workload, u16, u16); 3] = [
    ("tcp_rr", "established flows", |at, d| loadgen::tcp_rr(at, 4, d), 80, ECHO),
    ("tcp_crr", "new connections", |at, d| loadgen::tcp_crr(at, 4, d), 80, ECHO),
    ("udp_rr", "tracked UDP", |at, d| loadgen::udp_rr(at, 4, d), 53, UDP_ECHO),
];

fn run_workload(
    pg: &Playground,
    workload: Workload,
    target: SocketAddr,
    duration: Duration,
) -> Result<Stats> {
    pg.client.run(move || workload(target, duration))?
}

/// Runs `rounds` rounds of every workload (or only those named in `only`), each for
/// `duration`, through the ClusterIP and then directly.
pub fn measure(rounds: usize, duration: Duration, only: &[String]) -> Result<TrafficCostResults> {
    let mut pg = Playground::new(&unique("cost"), &[("pod-a", POD_A), ("pod-b", POD_B)])?;
    let stop = Arc::new(AtomicBool::new(false));
    for pod in &pg.pods {
        loadgen::serve_echo(pod.ns.run(|| std::net::TcpListener::bind(("0.0.0.0", ECHO)))??, stop.clone())?;
        loadgen::serve_udp_echo(
            pod.ns.run(|| std::net::UdpSocket::bind(("0.0.0.0", UDP_ECHO)))??,
            stop.clone(),
        )?;
    }
    pg.client.sysctl("net.ipv4.ip_local_port_range", "1024 65000")?;
    pg.write_manifest("echo.yaml", SERVICE)?;
    pg.start_lb()?;
    pg.wait_for_log(" synced ", Duration::from_secs(30))?;
    let _empty =
        [attach_empty_program(&pg, TcAttachType::Ingress)?, attach_empty_program(&pg, TcAttachType::Egress)?];
    // Statistics are collected while this descriptor is open (and only then).
    let _stats = aya::sys::enable_stats(aya::sys::Stats::RunTime).context("BPF_ENABLE_STATS")?;

    let mut results = TrafficCostResults::default();
    // Per workload: (run time, runs) of lb_ingress, of the empty program on ingress, of
    // lb_egress and of the empty program on egress.
    let mut totals = vec![[(0u64, 0u64); 4]; WORKLOADS.len()];
    let programs = [
        ("lb_ingress", TcAttachType::Ingress),
        ("lb_noop", TcAttachType::Ingress),
        ("lb_egress", TcAttachType::Egress),
        ("lb_noop", TcAttachType::Egress),
    ];
    for round in 0..rounds {
        for (index, (name, _, workload, port, target_port)) in WORKLOADS.iter().enumerate() {
            if !only.is_empty() && !only.iter().any(|wanted| wanted == name) {
                continue;
            }
            eprintln!("bench:   cost round {} of {rounds}: {name} through the ClusterIP", round + 1);
            let before: Vec<(u64, u64)> = programs
                .iter()
                .map(|(program, direction)| stats_of(&pg, program, *direction))
                .collect::<Result<_>>()?;
            let stats =
                run_workload(&pg, *workload, SocketAddr::V4(SocketAddrV4::new(VIP, *port)), duration)?;
            let after: Vec<(u64, u64)> = programs
                .iter()
                .map(|(program, direction)| stats_of(&pg, program, *direction))
                .collect::<Result<_>>()?;
            if stats.errors > 0 && stats.rate == 0.0 {
                bail!("{name} through lb failed\n{}", pg.lb_log());
            }
            for (total, (after, before)) in totals[index].iter_mut().zip(after.iter().zip(&before)) {
                total.0 += after.0 - before.0;
                total.1 += after.1 - before.1;
            }

            // Straight after: the same client to a pod directly, with lb still holding the
            // flows it just tracked.
            eprintln!("bench:   cost round {} of {rounds}: {name} direct", round + 1);
            let direct = run_workload(
                &pg,
                *workload,
                SocketAddr::V4(SocketAddrV4::new(POD_A, *target_port)),
                duration,
            );
            let (rate, errors, failure) = match direct {
                Ok(stats) => (stats.rate, stats.errors, None),
                // A connection that could not even be set up ends the round.
                Err(error) => (0.0, 1, Some(error.to_string())),
            };
            results.direct_rounds.push(DirectRound {
                round: round + 1,
                workload: name,
                rate,
                errors,
                failure,
            });
        }
    }
    let per_run = |(time, runs): (u64, u64)| time as f64 / runs.max(1) as f64;
    for ((name, packets, ..), [lb, empty, egress, egress_empty]) in WORKLOADS.iter().zip(totals) {
        if lb.1 == 0 {
            continue;
        }
        results.costs.push(TrafficCost {
            workload: name,
            packets,
            lb_ns: per_run(lb),
            empty_ns: per_run(empty),
            ratio: per_run(lb) / per_run(empty).max(1.0),
            lb_runs: lb.1,
            empty_runs: empty.1,
            egress_ns: per_run(egress),
            egress_empty_ns: per_run(egress_empty),
        });
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    Ok(results)
}
