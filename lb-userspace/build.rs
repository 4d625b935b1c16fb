//! Builds lb-ebpf for the BPF target (nightly + bpf-linker, installed by `cargo xtask setup`) and
//! leaves the object in OUT_DIR as `lb`, where `datapath.rs` embeds it.
//!
//! This runs the same cargo command as aya-build 0.2's `build_ebpf`, but quietly: aya-build
//! forwards every line the inner cargo prints as `cargo:warning=`, so each build showed dozens of
//! `warning: ... Compiling core` lines. Here a successful build prints only real compiler
//! warnings, and a failed one returns the compiler's output in its error.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, Result, bail};

const EBPF_PACKAGE: &str = "lb-ebpf";
/// lb-ebpf's `[[bin]]` name, and the file name `datapath.rs` includes from OUT_DIR.
const EBPF_BIN: &str = "lb";
const SETUP_HINT: &str =
    "run `cargo xtask setup` to install the nightly toolchain's rust-src component and bpf-linker";

fn main() -> Result<()> {
    // The programs are built from lb-ebpf and the types it shares with lb-userspace.
    println!("cargo:rerun-if-changed=../lb-ebpf");
    println!("cargo:rerun-if-changed=../lb-common/src");

    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").context("OUT_DIR is not set")?);
    let bpf_target = match std::env::var("CARGO_CFG_TARGET_ENDIAN").as_deref() {
        Ok("big") => "bpfeb-unknown-none",
        _ => "bpfel-unknown-none",
    };
    // aya-ebpf reads the architecture whose kernel structs (pt_regs, ...) it should use from here.
    let target_arch = std::env::var("CARGO_CFG_TARGET_ARCH").context("CARGO_CFG_TARGET_ARCH is not set")?;
    // Debug info is what bpf-linker turns into the BTF the kernel and aya read.
    let rustflags =
        [&format!("--cfg=bpf_target_arch=\"{target_arch}\""), "-Cdebuginfo=2", "-Clink-arg=--btf"];
    // Its own target dir: this cargo runs while the outer one holds the lock on the workspace's.
    let target_dir = out_dir.join("ebpf-target");

    let mut cargo = Command::new("rustup");
    cargo
        .args(["run", "nightly", "cargo", "build", "--quiet", "--release"])
        .args(["--package", EBPF_PACKAGE, "--bin", EBPF_BIN, "--target", bpf_target])
        // No precompiled core exists for the BPF targets.
        .args(["-Z", "build-std=core"])
        .arg("--target-dir")
        .arg(&target_dir)
        .env("CARGO_ENCODED_RUSTFLAGS", rustflags.join("\x1f"))
        // Set by the outer (stable) cargo; they would make the inner one use stable rustc.
        .env_remove("RUSTC")
        .env_remove("RUSTC_WORKSPACE_WRAPPER");
    let output =
        cargo.output().with_context(|| format!("starting the eBPF build ({cargo:?}); {SETUP_HINT}"))?;
    let diagnostics = String::from_utf8_lossy(&output.stderr);
    if !output.status.success() {
        bail!(
            "building {EBPF_PACKAGE} for {bpf_target} failed ({}); {SETUP_HINT}:\n{diagnostics}",
            output.status
        );
    }
    // With --quiet, whatever is left on stderr is a compiler warning worth showing.
    for line in diagnostics.lines() {
        println!("cargo:warning={line}");
    }

    let object = target_dir.join(bpf_target).join("release").join(EBPF_BIN);
    let embedded = out_dir.join(EBPF_BIN);
    std::fs::copy(&object, &embedded)
        .with_context(|| format!("copying the eBPF object {} to {}", object.display(), embedded.display()))?;
    Ok(())
}
