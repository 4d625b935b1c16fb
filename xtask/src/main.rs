//! Project tasks: `cargo xtask setup | build | image | test | demo | bench`.
//!
//! xtask depends on none of lb's crates: it has to run before the eBPF toolchain exists.

mod image;
mod setup;

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "lb's project tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install the nightly rust-src component and bpf-linker if missing.
    Setup,
    /// Build lb (the eBPF programs are built and embedded by lb-userspace's build script).
    Build {
        #[arg(long)]
        release: bool,
    },
    /// Build lb's container image without a registry: a static (musl) lb in an image with no
    /// base, written as an OCI layout and an oci-archive tarball (`podman load -i`).
    Image {
        /// Where to write lb-VERSION.oci/ and lb-VERSION.oci.tar [default: target/image].
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Run every test: unit and golden tests, then (as root) BPF_PROG_TEST_RUN packet fixtures,
    /// network-namespace traffic tests and the container image (built and run with podman).
    Test,
    /// Run the demo: alpaca-prod pods behind a ClusterIP in network namespaces (root).
    Demo,
    /// Benchmark lb against no load balancer and kube-proxy's iptables and nftables rules
    /// (root); writes bench/results/<date>.md and .json.
    Bench {
        /// A few minutes: fewer sizes, rounds and samples.
        #[arg(long)]
        quick: bool,
    },
}

fn main() -> Result<()> {
    match Cli::parse().task {
        Task::Setup => setup::setup(),
        Task::Build { release } => {
            setup::setup()?;
            let mut cmd = cargo(&["build", "--package", "lb-userspace", "--bins"]);
            if release {
                cmd.arg("--release");
            }
            run(&mut cmd)
        }
        Task::Image { out } => image::image(&out.unwrap_or_else(|| workspace_root().join("target/image"))),
        Task::Test => test(),
        Task::Bench { quick } => {
            setup::setup()?;
            require_root("the benchmark creates network namespaces and loads BPF programs")?;
            setup::ensure_debian_packages(&[
                ("iptables-restore", "iptables"),
                ("nft", "nftables"),
                ("conntrack", "conntrack"),
                ("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf", "fonts-dejavu-core"),
            ])?;
            run(&mut cargo(&[
                "build",
                "--release",
                "--package",
                "lb-userspace",
                "--package",
                "tests",
                "--bins",
            ]))?;
            let mut bench =
                cargo(&["run", "--release", "--quiet", "--package", "tests", "--bin", "lb-bench", "--"]);
            if quick {
                bench.arg("--quick");
            }
            run(&mut bench)
        }
        Task::Demo => {
            setup::setup()?;
            require_root("the demo creates network namespaces and loads BPF programs")?;
            run(&mut cargo(&["build", "--package", "lb-userspace", "--package", "tests", "--bins"]))?;
            run(&mut cargo(&["run", "--quiet", "--package", "tests", "--bin", "lb-demo"]))
        }
    }
}

fn test() -> Result<()> {
    setup::setup()?;
    let mut totals = TestTotals::default();
    // First, so that the build checked for warning lines is the one that builds the eBPF
    // programs (a later one would find them built). The netns tests also start this `lb`
    // binary, which `cargo test -p tests` alone does not build.
    let clean_build = run_without_warnings(&mut cargo(&["build", "--package", "lb-userspace", "--bins"]));
    eprintln!("xtask: unit, golden and reconciler tests (no root needed)");
    let unprivileged = run_tests(&mut cargo(&["test"]), &mut totals);
    let privileged = clean_build
        .and_then(|()| require_root("the data-path tests load BPF programs and create network namespaces"))
        .and_then(|()| {
            eprintln!("xtask: packet fixtures and network-namespace tests (root, one at a time)");
            run_tests(&mut cargo(&["test", "--package", "tests", "--", "--test-threads=1"]), &mut totals)
        });
    // One closing line for the whole run (cargo's own last line is often an empty doc-test run).
    println!("xtask: {} passed, {} failed", totals.passed, totals.failed);
    unprivileged.and(privileged)
}

#[derive(Default)]
struct TestTotals {
    passed: u64,
    failed: u64,
}

/// Runs `cargo test`, echoing its output and adding up its `test result:` lines.
fn run_tests(cmd: &mut Command, totals: &mut TestTotals) -> Result<()> {
    use std::io::{BufRead, BufReader};
    let mut child =
        cmd.stdout(std::process::Stdio::piped()).spawn().with_context(|| format!("starting {cmd:?}"))?;
    let stdout = child.stdout.take().context("cargo test stdout")?;
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        println!("{line}");
        if let Some(summary) = line.strip_prefix("test result: ") {
            let count = |word: &str| {
                summary
                    .split(';')
                    .find_map(|part| {
                        part.trim()
                            .trim_start_matches("ok. ")
                            .trim_start_matches("FAILED. ")
                            .strip_suffix(word)
                    })
                    .and_then(|n| n.trim().parse::<u64>().ok())
                    .unwrap_or(0)
            };
            totals.passed += count("passed");
            totals.failed += count("failed");
        }
    }
    let status = child.wait()?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}

fn require_root(why: &str) -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("{why}: run as root");
    }
    Ok(())
}

fn cargo(args: &[&str]) -> Command {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.args(args);
    // Run from the workspace root whatever the caller's directory.
    cmd.current_dir(workspace_root());
    cmd
}

fn workspace_root() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

/// Runs a build, echoing what it prints, and fails if it fails or prints a `warning:` line:
/// the build a newcomer sees is clean (in CI's clean checkout this covers the eBPF build too).
fn run_without_warnings(cmd: &mut Command) -> Result<()> {
    use std::io::{BufRead, BufReader};
    let mut child =
        cmd.stderr(std::process::Stdio::piped()).spawn().with_context(|| format!("starting {cmd:?}"))?;
    let stderr = child.stderr.take().context("build stderr")?;
    let mut warnings = Vec::new();
    for line in BufReader::new(stderr).lines() {
        let line = line?;
        eprintln!("{line}");
        if line.trim_start().starts_with("warning") {
            warnings.push(line);
        }
    }
    let status = child.wait()?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    if !warnings.is_empty() {
        bail!(
            "the build printed {} warning line(s); it must be clean:\n{}",
            warnings.len(),
            warnings.join("\n")
        );
    }
    Ok(())
}

/// Runs a command with inherited stdio and fails if it does not exit 0.
pub fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("starting {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}
