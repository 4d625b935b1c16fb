//! Project tasks: `cargo xtask setup | build | test | demo`.

mod setup;

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
}

fn main() -> Result<()> {
    match Cli::parse().task {
        Task::Setup => setup::setup(),
    }
}

/// Runs a command with inherited stdio and fails if it does not exit 0.
pub fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("starting {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}
