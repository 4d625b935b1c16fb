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
    pub lb_ns: f64,
    pub empty_ns: f64,
    pub ratio: f64,
    /// Packets both programs ran on, summed over rounds.
    pub lb_runs: u64,
    pub empty_runs: u64,
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
/// node's interfaces' ingress, queried in the node namespace.
fn stats_of(pg: &Playground, name: &'static str) -> Result<(u64, u64)> {
    pg.node.run(move || -> Result<(u64, u64)> {
        let mut seen = std::collections::BTreeSet::new();
        let (mut time, mut count) = (0u64, 0u64);
        for interface in NODE_INTERFACES {
            let (_, programs) = SchedClassifier::query_tcx(interface, TcAttachType::Ingress)
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
/// first on every node interface, so it runs on every packet lb's program sees.
fn attach_empty_program(pg: &Playground) -> Result<aya::Ebpf> {
    let pins = pg.bpf_dir.with_file_name("bench-empty");
    std::fs::create_dir_all(&pins)?;
    pg.node.run(move || -> Result<aya::Ebpf> {
        let mut ebpf = aya::EbpfLoader::new()
            .default_map_pin_directory(&pins)
            .load(lb_userspace::datapath::EBPF_OBJECT)
            .context("loading the eBPF object for the empty program")?;
        let program: &mut SchedClassifier = ebpf.program_mut("lb_noop").context("lb_noop")?.try_into()?;
        program.load()?;
        for interface in NODE_INTERFACES {
            program
                .attach_with_options(
                    interface,
                    TcAttachType::Ingress,
                    TcAttachOptions::TcxOrder(LinkOrder::first()),
                )
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

pub fn measure(rounds: usize, duration: Duration) -> Result<TrafficCostResults> {
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
    let _empty = attach_empty_program(&pg)?;
    // Statistics are collected while this descriptor is open (and only then).
    let _stats = aya::sys::enable_stats(aya::sys::Stats::RunTime).context("BPF_ENABLE_STATS")?;

    let mut results = TrafficCostResults::default();
    let mut totals = vec![(0u64, 0u64, 0u64, 0u64); WORKLOADS.len()];
    for round in 0..rounds {
        for (index, (name, _, workload, port, target_port)) in WORKLOADS.iter().enumerate() {
            eprintln!("bench:   cost round {} of {rounds}: {name} through the ClusterIP", round + 1);
            let (lb_before, empty_before) = (stats_of(&pg, "lb_ingress")?, stats_of(&pg, "lb_noop")?);
            let stats =
                run_workload(&pg, *workload, SocketAddr::V4(SocketAddrV4::new(VIP, *port)), duration)?;
            let (lb_after, empty_after) = (stats_of(&pg, "lb_ingress")?, stats_of(&pg, "lb_noop")?);
            if stats.errors > 0 && stats.rate == 0.0 {
                bail!("{name} through lb failed\n{}", pg.lb_log());
            }
            let total = &mut totals[index];
            total.0 += lb_after.0 - lb_before.0;
            total.1 += lb_after.1 - lb_before.1;
            total.2 += empty_after.0 - empty_before.0;
            total.3 += empty_after.1 - empty_before.1;

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
    for ((name, packets, ..), (lb_time, lb_runs, empty_time, empty_runs)) in WORKLOADS.iter().zip(totals) {
        let lb_ns = lb_time as f64 / lb_runs.max(1) as f64;
        let empty_ns = empty_time as f64 / empty_runs.max(1) as f64;
        results.costs.push(TrafficCost {
            workload: name,
            packets,
            lb_ns,
            empty_ns,
            ratio: lb_ns / empty_ns.max(1.0),
            lb_runs,
            empty_runs,
        });
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    Ok(results)
}
