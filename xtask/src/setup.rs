//! `cargo xtask setup`: installs what building the eBPF programs needs, and nothing by hand.
//!
//! - the nightly toolchain with `rust-src` (the eBPF crate is built with `-Z build-std=core`);
//! - `bpf-linker`, built against the nightly rustc's own LLVM shared library so that the bitcode
//!   rustc emits and the LLVM that links it are the same version.
//!
//! Every step checks first and does nothing when already done, so this is cheap to run before
//! every build, test and demo.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::run;

/// bpf-linker release known to work with aya-ebpf 0.2 and LLVM 22.
const BPF_LINKER_VERSION: &str = "0.13.0";
const NIGHTLY: &str = "nightly";

pub fn setup() -> Result<()> {
    ensure_nightly_with_rust_src()?;
    ensure_bpf_linker()?;
    Ok(())
}

fn ensure_nightly_with_rust_src() -> Result<()> {
    let toolchains = output(Command::new("rustup").args(["toolchain", "list"]))?;
    if !toolchains.lines().any(|line| line.starts_with(NIGHTLY)) {
        eprintln!("setup: installing the {NIGHTLY} toolchain (needed to build the eBPF programs)");
        run(Command::new("rustup").args(["toolchain", "install", NIGHTLY, "--profile", "minimal"]))?;
    }
    let components =
        output(Command::new("rustup").args(["component", "list", "--installed", "--toolchain", NIGHTLY]))?;
    if !components.lines().any(|line| line.starts_with("rust-src")) {
        eprintln!("setup: adding rust-src to {NIGHTLY} (the eBPF crate builds core from source)");
        run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", NIGHTLY]))?;
    }
    Ok(())
}

/// Where cargo installs binaries: `$CARGO_HOME/bin`, default `~/.cargo/bin`.
pub fn cargo_bin_dir() -> Result<PathBuf> {
    let home = match std::env::var_os("CARGO_HOME") {
        Some(home) => PathBuf::from(home),
        None => PathBuf::from(std::env::var_os("HOME").context("neither CARGO_HOME nor HOME is set")?)
            .join(".cargo"),
    };
    Ok(home.join("bin"))
}

/// The nightly rustc's LLVM: its library directory and the `LLVM-22-rust-...` library name.
struct RustcLlvm {
    lib_dir: PathBuf,
    dylib: String,
    major: String,
}

fn rustc_llvm() -> Result<RustcLlvm> {
    let sysroot = output(Command::new("rustc").args([&format!("+{NIGHTLY}"), "--print", "sysroot"]))?;
    let lib_dir = Path::new(sysroot.trim()).join("lib");
    let version = output(Command::new("rustc").args([&format!("+{NIGHTLY}"), "-vV"]))?;
    let llvm_version = version
        .lines()
        .find_map(|line| line.strip_prefix("LLVM version: "))
        .context("`rustc +nightly -vV` printed no LLVM version")?;
    let major = llvm_version.split('.').next().unwrap_or_default().to_string();
    let prefix = format!("libLLVM-{major}-rust-");
    let dylib = std::fs::read_dir(&lib_dir)
        .with_context(|| format!("reading {}", lib_dir.display()))?
        .filter_map(|entry| entry.ok())
        .filter_map(|entry| entry.file_name().into_string().ok())
        .find_map(|name| {
            let stem = name.strip_prefix("lib")?.strip_suffix(".so")?;
            name.starts_with(&prefix).then(|| stem.to_string())
        })
        .with_context(|| format!("no {prefix}*.so in {}", lib_dir.display()))?;
    Ok(RustcLlvm { lib_dir, dylib, major })
}

fn ensure_bpf_linker() -> Result<()> {
    let llvm = rustc_llvm()?;
    let linker = cargo_bin_dir()?.join("bpf-linker");
    // A bpf-linker built against another rustc's LLVM fails to start once that library is gone,
    // so "it runs and reports our version" is the test, not "the file exists".
    if let Ok(out) = Command::new(&linker).arg("--version").output() {
        let reported = String::from_utf8_lossy(&out.stdout);
        if out.status.success() && reported.contains(BPF_LINKER_VERSION) {
            return Ok(());
        }
    }
    eprintln!(
        "setup: building bpf-linker {BPF_LINKER_VERSION} against rustc's LLVM {} ({}); this takes about a minute",
        llvm.major, llvm.dylib
    );
    let lib_dir = llvm.lib_dir.display();
    let rustflags = format!("-L {lib_dir} -l dylib={} -C link-arg=-Wl,-rpath,{lib_dir}", llvm.dylib);
    run(Command::new("cargo")
        .args([
            "install",
            "bpf-linker",
            "--locked",
            "--force",
            "--version",
            BPF_LINKER_VERSION,
            "--no-default-features",
            "--features",
            &format!("llvm-{},no-llvm-linking", llvm.major),
        ])
        .env("RUSTFLAGS", rustflags))?;
    let out = Command::new(&linker)
        .arg("--version")
        .output()
        .with_context(|| format!("running {}", linker.display()))?;
    if !out.status.success() {
        bail!("bpf-linker was installed at {} but does not run", linker.display());
    }
    Ok(())
}

fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8(out.stdout)?)
}

/// Installs Debian packages whose command is missing (`command`, `package` pairs): the tools
/// the benchmark compares lb with, musl-gcc and podman for the image.
pub fn ensure_debian_packages(wanted: &[(&str, &str)]) -> Result<()> {
    let missing: Vec<&str> = wanted
        .iter()
        .filter(|(command, _)| {
            !Command::new("sh")
                .args(["-c", &format!("command -v {command}")])
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .map(|(_, package)| *package)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("setup: installing {} (apt-get)", missing.join(" "));
    run(Command::new("apt-get").args(["update", "-qq"]))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}
