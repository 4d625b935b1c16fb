//! The `lb` command.

use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use lb_userspace::{
    datapath,
    maps::{BpfMaps, ServiceMaps},
    run, status,
};

const DEFAULT_BPF_DIR: &str = "/sys/fs/bpf/lb";

#[derive(Parser)]
#[command(name = "lb", version, about = "A kube-proxy replacement whose data plane is eBPF")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Load the data path and keep it in sync with Services and EndpointSlices.
    Run {
        /// Directory of Kubernetes YAML (Services, EndpointSlices) to read and watch.
        #[arg(long)]
        manifests: PathBuf,
        /// Interfaces to translate traffic on (their ingress), comma separated.
        #[arg(long, value_delimiter = ',', required = true)]
        interfaces: Vec<String>,
        /// Where the maps are pinned (on a bpffs mount).
        #[arg(long, default_value = DEFAULT_BPF_DIR)]
        bpf_dir: PathBuf,
    },
    /// Show the frontends and backends programmed in the pinned maps.
    Services {
        #[arg(long, default_value = DEFAULT_BPF_DIR)]
        bpf_dir: PathBuf,
    },
    /// Show the data path's packet counters.
    Counters {
        #[arg(long, default_value = DEFAULT_BPF_DIR)]
        bpf_dir: PathBuf,
    },
    /// Remove the pinned maps (run after stopping lb to leave nothing behind).
    Cleanup {
        #[arg(long, default_value = DEFAULT_BPF_DIR)]
        bpf_dir: PathBuf,
    },
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("LB_LOG").unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    match Cli::parse().command {
        Command::Run { manifests, interfaces, bpf_dir } => {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            runtime.block_on(run::run(run::RunOptions { manifests, interfaces, bpf_dir }))
        }
        Command::Services { bpf_dir } => {
            let snapshot = BpfMaps::from_pins(&bpf_dir)?.snapshot()?;
            print!("{}", status::services_table(&snapshot));
            Ok(())
        }
        Command::Counters { bpf_dir } => {
            for (name, value) in datapath::read_counters(&bpf_dir)? {
                println!("{name:28} {value}");
            }
            Ok(())
        }
        Command::Cleanup { bpf_dir } => {
            for name in lb_common::map_names::PINNED {
                let path = bpf_dir.join(name);
                match std::fs::remove_file(&path) {
                    Ok(()) => {}
                    Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
                    Err(error) => return Err(error).with_context(|| format!("removing {}", path.display())),
                }
            }
            match std::fs::remove_dir(&bpf_dir) {
                Err(error) if error.kind() != std::io::ErrorKind::NotFound => {
                    Err(error).with_context(|| format!("removing {}", bpf_dir.display()))
                }
                _ => Ok(()),
            }
        }
    }
}
