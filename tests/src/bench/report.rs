//! The benchmark report: JSON with every number, and markdown with the headline tables, each
//! mode as a ratio to `direct`, the noise seen, and each target met or missed.

use std::fmt::Write as _;

use serde::Serialize;

use super::Plan;
use super::controlplane::{ChangeLatency, Memory, RuleLoad, SyncTime};
use super::datapath::{Cell, DatapathResults, MODES, WORKLOADS};
use super::program::ProgramCost;
use super::traffic_cost::TrafficCostResults;

#[derive(Debug, Serialize)]
pub struct Machine {
    pub date: String,
    pub kernel: String,
    pub cpu: String,
    pub cores: usize,
    pub memory_gib: f64,
    pub iptables: String,
    pub nft: String,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub machine: Machine,
    pub plan: Plan,
    pub program_cost: Vec<ProgramCost>,
    /// Per-packet cost under real traffic, and direct rounds against the same running lb.
    pub traffic_cost: TrafficCostResults,
    pub datapath: DatapathResults,
    pub sync: Vec<SyncTime>,
    pub change_latency: Vec<ChangeLatency>,
    pub rule_loads: Vec<RuleLoad>,
    pub memory: Vec<Memory>,
}

fn unit(workload: &str) -> &'static str {
    match workload {
        "tcp_rr" => "transactions/s",
        "tcp_crr" => "connections/s",
        "udp_rr" => "transactions/s",
        _ => "Gbit/s",
    }
}

fn show_rate(workload: &str, rate: f64) -> String {
    if workload == "tcp_bulk" { format!("{:.2}", rate * 8.0 / 1e9) } else { format!("{rate:.0}") }
}

impl Report {
    fn cell(&self, services: usize, mode: &str, workload: &str) -> Option<&Cell> {
        self.datapath
            .cells
            .iter()
            .find(|c| c.services == services && c.mode == mode && c.workload == workload)
    }

    fn ratio(&self, services: usize, mode: &str, other: &str, workload: &str) -> Option<f64> {
        let a = self.cell(services, mode, workload)?;
        let b = self.cell(services, other, workload)?;
        Some(a.rate / b.rate)
    }

    pub fn markdown(&self) -> String {
        let m = &self.machine;
        let mut out = String::new();
        let _ = writeln!(out, "# lb benchmark, {}\n", m.date);
        let _ = writeln!(
            out,
            "Machine: {} ({} cores, {:.0} GiB), kernel {}. Rule tools: {}, {}. Plan: {}; {} rounds of {} s per workload, medians shown with the min-max spread of the rate.\n",
            m.cpu,
            m.cores,
            m.memory_gib,
            m.kernel,
            m.iptables,
            m.nft,
            if self.plan.quick { "quick" } else { "full" },
            self.plan.rounds,
            self.plan.workload_duration.as_secs_f64()
        );
        out += "Everything ran in network namespaces on this one machine: client ns -> node ns (lb, or kube-proxy's rules) -> pod ns. With 2 cores, the client, both pods and the node share them, so absolute numbers are low and noisy; the ratios within a round are the point.\n\n";

        out += "## Data path\n\n";
        for workload in WORKLOADS {
            let _ = writeln!(out, "### {workload} ({})\n", unit(workload));
            out += "| Services | mode | rate (min-max) | vs direct | p50 us | p99 us | errors |\n|---:|---|---:|---:|---:|---:|---:|\n";
            for &n in &self.plan.datapath_sizes {
                for mode in MODES {
                    let Some(cell) = self.cell(n, mode, workload) else { continue };
                    let vs =
                        self.ratio(n, mode, "direct", workload).map_or("-".into(), |r| format!("{r:.3}x"));
                    let _ = writeln!(
                        out,
                        "| {n} | {mode} | {} ({}-{}) | {vs} | {:.1} | {:.1} | {} |",
                        show_rate(workload, cell.rate),
                        show_rate(workload, cell.rate_min),
                        show_rate(workload, cell.rate_max),
                        cell.p50_us,
                        cell.p99_us,
                        cell.errors
                    );
                }
            }
            out += "\n";
        }
        if !self.datapath.skipped.is_empty() {
            out += "Skipped:\n\n";
            for skip in &self.datapath.skipped {
                let _ = writeln!(out, "- {} at {} Services: {}", skip.mode, skip.services, skip.reason);
            }
            out += "\n";
        }

        out += "## Program cost (BPF_PROG_TEST_RUN, median of single runs)\n\n| fixture | lb_ingress ns | empty program ns | ratio |\n|---|---:|---:|---:|\n";
        for cost in &self.program_cost {
            let _ = writeln!(
                out,
                "| {} | {:.0} | {:.0} | {:.2}x |",
                cost.fixture, cost.lb_ns, cost.empty_ns, cost.ratio
            );
        }
        out += "\n## Program cost under real traffic (the kernel's BPF run-time statistics)\n\n";
        out += "Through the ClusterIP, with the empty program attached first on the same interfaces (its time is mostly the statistics' own clock reads). Ingress: lb_ingress; egress: lb_egress, which every packet leaving the node's interfaces meets.\n\n";
        out += "| workload | packets | lb_ingress ns | empty ns | ratio | lb_egress ns | empty (egress) ns |\n|---|---|---:|---:|---:|---:|---:|\n";
        for cost in &self.traffic_cost.costs {
            let _ = writeln!(
                out,
                "| {} | {} | {:.0} | {:.0} | {:.2}x | {:.0} | {:.0} |",
                cost.workload,
                cost.packets,
                cost.lb_ns,
                cost.empty_ns,
                cost.ratio,
                cost.egress_ns,
                cost.egress_empty_ns
            );
        }
        out += "\nDirect connections (client to a pod, no Service) right after each round through the ClusterIP, against the same running lb: flow state that outlived its flow, or took connections that are not lb's, would show as errors here.\n\n| round | workload | rate | errors |\n|---:|---|---:|---:|\n";
        for round in &self.traffic_cost.direct_rounds {
            let errors = match &round.failure {
                Some(failure) => format!("{} ({failure})", round.errors),
                None => round.errors.to_string(),
            };
            let _ = writeln!(out, "| {} | {} | {:.0} | {errors} |", round.round, round.workload, round.rate);
        }
        out += "\n## Control plane\n\n| Services x 10 endpoints | source | read ms | convert ms | reconcile ms | total ms |\n|---:|---|---:|---:|---:|---:|\n";
        for sync in &self.sync {
            let _ = writeln!(
                out,
                "| {} | {} | {:.0} | {:.0} | {:.0} | {:.0} |",
                sync.services, sync.source, sync.read_ms, sync.convert_ms, sync.reconcile_ms, sync.total_ms
            );
        }
        out += "\n| Services | one change, timed | p50 ms | p99 ms | max ms | changes |\n|---:|---|---:|---:|---:|---:|\n";
        for change in &self.change_latency {
            let _ = writeln!(
                out,
                "| {} | {} | {:.3} | {:.3} | {:.3} | {} |",
                change.services, change.source, change.p50_ms, change.p99_ms, change.max_ms, change.changes
            );
        }
        out += "\n| Services x 10 endpoints | kube-proxy mode | load ms (one call) |\n|---:|---|---:|\n";
        for load in &self.rule_loads {
            let shown = load.ms.map_or(load.note.clone(), |ms| format!("{ms:.0}"));
            let _ = writeln!(out, "| {} | {} | {shown} |", load.services, load.mode);
        }
        out += "\n| Services x 10 endpoints | lb RSS MiB | peak RSS MiB | map memory MiB | start to synced ms |\n|---:|---:|---:|---:|---:|\n";
        for memory in &self.memory {
            let _ = writeln!(
                out,
                "| {} | {:.1} | {:.1} | {:.1} | {:.0} |",
                memory.services, memory.rss_mib, memory.peak_rss_mib, memory.map_mib, memory.startup_sync_ms
            );
        }
        out += "\n## Targets\n\n";
        out += &self.targets();
        out
    }

    /// Each target of the benchmark issue, with the measured value (or why there is none).
    pub fn targets(&self) -> String {
        let mut out = String::from("| target | measured | met |\n|---|---|---|\n");
        let mut row =
            |target: &str, measured: Option<f64>, show: &dyn Fn(f64) -> String, met: &dyn Fn(f64) -> bool| {
                let (value, ok) = match measured {
                    Some(v) => (show(v), if met(v) { "yes" } else { "no" }),
                    None => ("not measured in this run".to_string(), "-"),
                };
                let _ = writeln!(out, "| {target} | {value} | {ok} |");
            };
        let sizes = &self.plan.datapath_sizes;
        let smallest = sizes.first().copied().unwrap_or(1);
        let largest = sizes.last().copied().unwrap_or(1);
        let x = |v: f64| format!("{v:.3}x");
        row(
            "lb >= 0.97x direct, request/response",
            self.ratio(smallest, "lb", "direct", "tcp_rr"),
            &x,
            &|v| v >= 0.97,
        );
        row(
            "lb >= 0.95x direct, new connections",
            self.ratio(smallest, "lb", "direct", "tcp_crr"),
            &x,
            &|v| v >= 0.95,
        );
        let flat = self
            .cell(largest, "lb", "tcp_crr")
            .zip(self.cell(smallest, "lb", "tcp_crr"))
            .map(|(a, b)| a.rate / b.rate);
        row(
            &format!("lb at {largest} Services within 3% of lb at {smallest} (new connections)"),
            flat,
            &x,
            &|v| v >= 0.97,
        );
        let at = if sizes.contains(&10_000) { 10_000 } else { largest };
        row(
            &format!("lb >= 2x iptables, new connections at {at}"),
            self.ratio(at, "lb", "iptables", "tcp_crr"),
            &x,
            &|v| v >= 2.0,
        );
        row(
            &format!("lb >= 1.1x nftables, new connections at {at}"),
            self.ratio(at, "lb", "nftables", "tcp_crr"),
            &x,
            &|v| v >= 1.1,
        );
        let tracked = self.program_cost.iter().find(|c| c.fixture.starts_with("tracked")).map(|c| c.ratio);
        row("established-flow program cost <= 2x the empty program's (test runs)", tracked, &x, &|v| {
            v <= 2.0
        });
        let established = self.traffic_cost.costs.iter().find(|c| c.workload == "tcp_rr").map(|c| c.ratio);
        row("established-flow cost under real traffic <= 3x the empty program's", established, &x, &|v| {
            v <= 3.0
        });
        let direct_errors: Option<f64> = (!self.traffic_cost.direct_rounds.is_empty())
            .then(|| self.traffic_cost.direct_rounds.iter().map(|r| r.errors as f64).sum());
        row(
            "direct connections after Service traffic: no errors",
            direct_errors,
            &|v| format!("{v:.0} errors"),
            &|v| v == 0.0,
        );
        let biggest_sync =
            self.sync.iter().filter(|s| s.source == "objects in memory").max_by_key(|s| s.services);
        row(
            &format!("full sync of {} Services x 10 < 5 s", biggest_sync.map_or(0, |s| s.services)),
            biggest_sync.map(|s| s.total_ms),
            &|v| format!("{:.2} s", v / 1000.0),
            &|v| v < 5000.0,
        );
        let change =
            self.change_latency.iter().filter(|c| c.source.contains("(objects)")).max_by_key(|c| c.services);
        row(
            &format!("one change, event to map, < 5 ms p99 ({} Services)", change.map_or(0, |c| c.services)),
            change.map(|c| c.p99_ms),
            &|v| format!("{v:.3} ms"),
            &|v| v < 5.0,
        );
        let biggest_api =
            self.sync.iter().filter(|s| s.source.starts_with("API server")).max_by_key(|s| s.services);
        row(
            &format!(
                "full sync from the API server of {} Services x 10 < 15 s",
                biggest_api.map_or(0, |s| s.services)
            ),
            biggest_api.map(|s| s.total_ms),
            &|v| format!("{:.2} s", v / 1000.0),
            &|v| v < 15_000.0,
        );
        let memory = self.memory.iter().max_by_key(|m| m.services);
        row(
            &format!("daemon RSS < 256 MiB ({} Services, peak)", memory.map_or(0, |m| m.services)),
            memory.map(|m| m.peak_rss_mib),
            &|v| format!("{v:.0} MiB"),
            &|v| v < 256.0,
        );
        out
    }
}
