//! `cargo xtask demo`: three alpaca-prod pods behind a ClusterIP, in network namespaces joined
//! only to each other. Shows requests spread over the pods, removes a pod, shows the new set
//! take effect, and cleans up everything it made.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde_yaml_ng::Value;
use tests::playground::Playground;

const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 80);
const REQUESTS: usize = 30;

fn main() -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("the demo creates network namespaces and loads BPF programs: run it as root");
    }
    let example = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/alpaca-prod.yaml");
    let manifest =
        std::fs::read_to_string(&example).with_context(|| format!("reading {}", example.display()))?;
    let pods = pods_in(&manifest)?;
    let pod_refs: Vec<(&str, Ipv4Addr)> = pods.iter().map(|(n, ip)| (n.as_str(), *ip)).collect();

    println!("== Building a node with {} alpaca-prod pods and a client, in network namespaces", pods.len());
    let mut pg = Playground::new(&format!("lb-demo-{}", std::process::id()), &pod_refs)?;
    pg.serve_http(8080)?;
    pg.write_manifest("alpaca-prod.yaml", &manifest)?;
    println!("   manifests: {}  (copied from examples/alpaca-prod.yaml)", pg.manifests.display());

    println!("\n== Starting lb on the node: lb run --manifests ... --interfaces lbc0,lbp0,...");
    pg.start_lb()?;
    pg.wait_for_maps(Duration::from_secs(10), |s| backend_count(s) == Some(pods.len() as u16))?;
    println!("\n$ lb services\n{}", pg.services_table()?);
    println!("$ lb endpoints default/alpaca-prod\n{}", lb(&pg, &["endpoints", "default/alpaca-prod"])?);
    let manifests = pg.manifests.display().to_string();
    let explain = ["explain", "10.0.0.2:40000", "10.96.0.80:80/TCP", "--manifests", manifests.as_str()];
    println!("$ lb explain 10.0.0.2:40000 10.96.0.80:80/TCP --manifests ...\n{}", lb(&pg, &explain)?);

    let target = SocketAddrV4::new(CLUSTER_IP, 80);
    println!("== {REQUESTS} HTTP requests from the client pod to http://{target}/");
    print_spread(&pg, target)?;

    let (removed, _) = pods.last().context("no pods in the example")?.clone();
    // What an operator watching the Service sees, as with kubectl get endpoints --watch.
    let mut watch = std::process::Command::new(tests::lb_binary())
        .args(["endpoints", "default/alpaca-prod", "--watch", "--bpf-dir"])
        .arg(&pg.bpf_dir)
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    let watch_output = watch.stdout.take().context("watch output")?;
    let lines = std::thread::spawn(move || {
        use std::io::BufRead;
        std::io::BufReader::new(watch_output).lines().map_while(Result::ok).collect::<Vec<_>>()
    });
    std::thread::sleep(Duration::from_millis(300));
    println!("\n== Pod {removed} goes away: its endpoint leaves the EndpointSlice");
    pg.write_manifest("alpaca-prod.yaml", &without_endpoint(&manifest, &removed)?)?;
    let took =
        pg.wait_for_maps(Duration::from_secs(2), |s| backend_count(s) == Some(pods.len() as u16 - 1))?;
    pg.remove_pod(&removed);
    println!("   lb reprogrammed the maps {:.1} ms after the file changed", took.as_secs_f64() * 1000.0);
    std::thread::sleep(Duration::from_millis(1200));
    watch.kill()?;
    watch.wait()?;
    println!("\n$ lb endpoints default/alpaca-prod --watch");
    for line in lines.join().map_err(|_| anyhow::anyhow!("the watch reader panicked"))? {
        println!("{line}");
    }
    println!("\n$ lb services\n{}", pg.services_table()?);
    println!("== {REQUESTS} more requests to http://{target}/");
    print_spread(&pg, target)?;

    println!("\n== Cleaning up: stopping lb, removing namespaces and pinned maps");
    if !pg.stop_lb()? {
        bail!("lb did not exit cleanly:\n{}", pg.lb_log());
    }
    drop(pg);
    println!("   done: nothing left behind");
    Ok(())
}

fn backend_count(snapshot: &lb_userspace::dataplane::maps::MapsSnapshot) -> Option<u16> {
    snapshot
        .services
        .iter()
        .find(|(k, _)| k.backend_slot == 0 && k.address() == CLUSTER_IP)
        .map(|(_, v)| v.backend_count)
}

fn print_spread(pg: &Playground, target: SocketAddrV4) -> Result<()> {
    let mut per_pod: BTreeMap<String, usize> = BTreeMap::new();
    for answer in pg.http_requests(target, REQUESTS)? {
        let answer = answer.map_err(|e| anyhow::anyhow!("request failed: {e}\n{}", pg.lb_log()))?;
        *per_pod.entry(answer.pod).or_default() += 1;
    }
    for (pod, count) in per_pod {
        println!("   {pod:32} {count:3} {}", "#".repeat(count));
    }
    Ok(())
}

/// (pod name, address) of every endpoint in the manifest's EndpointSlices.
fn pods_in(manifest: &str) -> Result<Vec<(String, Ipv4Addr)>> {
    let mut pods = Vec::new();
    for document in serde_yaml_ng::Deserializer::from_str(manifest) {
        let value = <Value as serde::Deserialize>::deserialize(document)?;
        if value["kind"].as_str() != Some("EndpointSlice") {
            continue;
        }
        for endpoint in value["endpoints"].as_sequence().into_iter().flatten() {
            let ip = endpoint["addresses"][0].as_str().context("endpoint without address")?.parse()?;
            let name = endpoint["targetRef"]["name"].as_str().unwrap_or("pod").to_string();
            pods.push((name, ip));
        }
    }
    Ok(pods)
}

/// The manifest with the named pod's endpoint removed from its EndpointSlice.
fn without_endpoint(manifest: &str, pod: &str) -> Result<String> {
    let mut out = String::new();
    for document in serde_yaml_ng::Deserializer::from_str(manifest) {
        let mut value = <Value as serde::Deserialize>::deserialize(document)?;
        if let Some(endpoints) = value.get_mut("endpoints").and_then(Value::as_sequence_mut) {
            endpoints.retain(|e| e["targetRef"]["name"].as_str() != Some(pod));
        }
        out += "---\n";
        out += &serde_yaml_ng::to_string(&value)?;
    }
    Ok(out)
}

/// Runs an `lb` inspection command on the playground's maps.
fn lb(pg: &Playground, args: &[&str]) -> Result<String> {
    let out = std::process::Command::new(tests::lb_binary())
        .args(args)
        .arg("--bpf-dir")
        .arg(&pg.bpf_dir)
        .output()?;
    if !out.status.success() {
        bail!("lb {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8(out.stdout)?)
}
