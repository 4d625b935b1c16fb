//! `cargo xtask bench [--quick]`: see tests::bench. Writes bench/results/<date>.md and .json.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, Result, bail};
use tests::bench::report::{Machine, Report};
use tests::bench::{Plan, controlplane, datapath, plots, program, traffic_cost};

fn output(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).lines().next().unwrap_or_default().trim().to_string())
        .unwrap_or_default()
}

fn machine() -> Machine {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    Machine {
        date: output("date", &["-u", "+%Y-%m-%d"]),
        kernel: output("uname", &["-r"]),
        cpu: cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .map_or("?".into(), |l| l.trim_start_matches([' ', '\t', ':']).to_string()),
        cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
        memory_gib: meminfo
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            .map_or(0.0, |kib| kib / 1048576.0),
        iptables: output("iptables", &["--version"]),
        nft: output("nft", &["--version"]),
    }
}

#[global_allocator]
static HEAP: tests::bench::heap::Counting = tests::bench::heap::Counting;

const USAGE: &str = "\
lb-bench [--quick] [--only datapath|program|traffic|controlplane|sync] [--sizes N,..] [--sync-sizes N,..]
         [--lb-only] [--workloads tcp_rr,..] [--out DIR]
Measures lb (as root, in network namespaces) and writes <out>/<date>.{md,json} and plots.";

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--help" || a == "-h") {
        println!("{USAGE}");
        return Ok(());
    }
    if !nix::unistd::geteuid().is_root() {
        bail!("the benchmark loads BPF programs and creates network namespaces: run it as root");
    }
    let mut plan = if args.iter().any(|a| a == "--quick") { Plan::quick() } else { Plan::full() };
    // For investigating one part: `--only datapath|program|traffic|controlplane`, `--sizes 1,1000`,
    // `--lb-only`; `--only traffic --workloads tcp_rr` prints that workload's cost as JSON.
    let only = args.iter().position(|a| a == "--only").and_then(|i| args.get(i + 1)).cloned();
    if let Some(sizes) = args.iter().position(|a| a == "--sizes").and_then(|i| args.get(i + 1)) {
        plan.datapath_sizes = sizes.split(',').map(str::parse).collect::<Result<_, _>>()?;
    }
    // `--sync-sizes 1000,10000`: the control plane's Service counts.
    if let Some(sizes) = args.iter().position(|a| a == "--sync-sizes").and_then(|i| args.get(i + 1)) {
        plan.sync_sizes = sizes.split(',').map(str::parse).collect::<Result<_, _>>()?;
    }
    // `--lb-only`: direct and lb, without kube-proxy's rule layouts.
    plan.kube_proxy_modes = !args.iter().any(|a| a == "--lb-only");
    let wants = |part: &str| only.as_deref().is_none_or(|o| o == part);
    let out_dir = args
        .iter()
        .position(|a| a == "--out")
        .and_then(|i| args.get(i + 1))
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../bench/results"));

    if only.as_deref() == Some("traffic") {
        // `--workloads tcp_rr,udp_rr`: only those.
        let workloads: Vec<String> = args
            .iter()
            .position(|a| a == "--workloads")
            .and_then(|i| args.get(i + 1))
            .map(|list| list.split(',').map(str::to_string).collect())
            .unwrap_or_default();
        if !workloads.is_empty() {
            let results = traffic_cost::measure(plan.rounds, plan.workload_duration, &workloads)?;
            println!("{}", serde_json::to_string_pretty(&results)?);
            return Ok(());
        }
    }
    let program_cost = if wants("program") {
        eprintln!("bench: program cost ({} runs per fixture)", plan.program_runs);
        program::measure(plan.program_runs)?
    } else {
        Vec::new()
    };

    let mut sync = Vec::new();
    let mut change_latency = Vec::new();
    let mut rule_loads = Vec::new();
    let mut memory = Vec::new();
    let mut too_slow = std::collections::BTreeSet::new();
    // `--only sync`: the in-process sync and changes alone (for profiling).
    let sync_only = only.as_deref() == Some("sync");
    for &n in plan.sync_sizes.iter().filter(|_| wants("controlplane") || sync_only) {
        eprintln!("bench: control plane with {n} Services x 10 endpoints");
        let (full, change) = controlplane::sync_and_changes(n, 1_000)?;
        sync.push(full);
        change_latency.push(change);
        if sync_only {
            continue;
        }
        let files = controlplane::manifest_files(n)?;
        sync.push(controlplane::sync_from_manifests(n, &files)?);
        let (daemon_memory, file_change) = controlplane::daemon(n, &files, 100).context("lb run")?;
        memory.push(daemon_memory);
        change_latency.push(file_change);
        drop(files);
        let objects = controlplane::objects(n);
        let (full, api_change) = controlplane::api_server(n, &objects, 50)?;
        sync.push(full);
        change_latency.push(api_change);
        if plan.kube_proxy_modes {
            rule_loads.extend(controlplane::rule_loads(n, &objects, plan.rule_load_bound, &mut too_slow)?);
        }
    }

    let traffic_cost = if wants("traffic") {
        eprintln!("bench: program cost under real traffic, and direct rounds against one running lb");
        traffic_cost::measure(plan.rounds, plan.workload_duration, &[])?
    } else {
        Default::default()
    };
    let datapath = if wants("datapath") { datapath::measure(&plan)? } else { Default::default() };
    let report = Report {
        machine: machine(),
        plan,
        program_cost,
        traffic_cost,
        datapath,
        sync,
        change_latency,
        rule_loads,
        memory,
    };

    std::fs::create_dir_all(&out_dir)?;
    let stem = format!("{}{}", report.machine.date, if report.plan.quick { "-quick" } else { "" });
    let markdown = report.markdown();
    std::fs::write(out_dir.join(format!("{stem}.md")), &markdown)?;
    std::fs::write(out_dir.join(format!("{stem}.json")), serde_json::to_string_pretty(&report)?)?;
    plots::write(&report, &out_dir, &stem).context("plots")?;
    println!("{markdown}");
    eprintln!("bench: wrote {}/{stem}.md, .json and -*.png", out_dir.display());
    Ok(())
}
