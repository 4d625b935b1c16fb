//! Checks `lb run` makes before it touches the kernel, each failing with a message that says what
//! to do and an exit code of its own (the README lists them).

use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};

/// `lb`'s exit codes.
pub mod exit_code {
    /// A failure while running (or a start-up failure not listed below).
    pub const FAILED: u8 = 1;
    /// Bad flags or configuration (clap uses 2 as well).
    pub const USAGE: u8 = 2;
    /// Not root, or missing the capabilities lb needs.
    pub const NOT_PERMITTED: u8 = 3;
    /// The kernel or the node lacks something lb needs: BPF, a bpffs mount, cgroup v2.
    pub const MISSING_FEATURE: u8 = 4;
    /// Another lb runs with the same --bpf-dir.
    pub const ALREADY_RUNNING: u8 = 5;
}

#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct StartupError {
    pub code: u8,
    pub message: String,
}

fn fail(code: u8, message: String) -> StartupError {
    StartupError { code, message }
}

/// Capability numbers (linux/capability.h).
const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

/// The effective capability set, from /proc/self/status.
fn effective_capabilities() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let hex = status.lines().find_map(|line| line.strip_prefix("CapEff:"))?.trim();
    u64::from_str_radix(hex, 16).ok()
}

/// Root, or CAP_BPF + CAP_PERFMON (or CAP_SYS_ADMIN, which covers both) + CAP_NET_ADMIN.
pub fn check_privileges() -> Result<(), StartupError> {
    let Some(caps) = effective_capabilities() else { return Ok(()) };
    let has = |cap: u32| caps & (1 << cap) != 0;
    let mut missing = Vec::new();
    if !has(CAP_SYS_ADMIN) {
        if !has(CAP_BPF) {
            missing.push("CAP_BPF");
        }
        if !has(CAP_PERFMON) {
            missing.push("CAP_PERFMON");
        }
    }
    if !has(CAP_NET_ADMIN) {
        missing.push("CAP_NET_ADMIN");
    }
    if missing.is_empty() {
        return Ok(());
    }
    Err(fail(
        exit_code::NOT_PERMITTED,
        format!(
            "lb run loads BPF programs and attaches them to interfaces: run it as root, or with the \
             capabilities CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN (missing here: {})",
            missing.join(", ")
        ),
    ))
}

/// The bpf(2) system call exists (a kernel built with CONFIG_BPF_SYSCALL).
pub fn check_bpf_syscall() -> Result<(), StartupError> {
    // BPF_PROG_GET_NEXT_ID from 0: answers ENOENT or an ID where BPF exists, ENOSYS where not.
    const BPF_PROG_GET_NEXT_ID: i64 = 11;
    let mut attr = [0u64; 16];
    match crate::dataplane::links::bpf(BPF_PROG_GET_NEXT_ID as _, &mut attr) {
        Err(error) if error.raw_os_error() == Some(libc::ENOSYS) => Err(fail(
            exit_code::MISSING_FEATURE,
            "this kernel has no bpf() system call (CONFIG_BPF_SYSCALL): lb needs a kernel with BPF".into(),
        )),
        _ => Ok(()),
    }
}

/// The closest existing directory at or above `path`.
fn existing_ancestor(path: &Path) -> PathBuf {
    let mut current = path.to_path_buf();
    while !current.exists() {
        match current.parent() {
            Some(parent) if parent != current => current = parent.to_path_buf(),
            _ => break,
        }
    }
    current
}

/// `--bpf-dir` is on a BPF filesystem (or will be created on one).
pub fn check_bpffs(bpf_dir: &Path) -> Result<(), StartupError> {
    let at = existing_ancestor(bpf_dir);
    let on_bpffs =
        nix::sys::statfs::statfs(&at).is_ok_and(|fs| fs.filesystem_type() == nix::sys::statfs::BPF_FS_MAGIC);
    if on_bpffs {
        return Ok(());
    }
    Err(fail(
        exit_code::MISSING_FEATURE,
        format!(
            "--bpf-dir {} is not on a BPF filesystem ({} is not bpffs): mount one with \
             `mount -t bpf bpf /sys/fs/bpf`, or pass a --bpf-dir under a bpffs mount",
            bpf_dir.display(),
            at.display()
        ),
    ))
}

/// `--cgroup-path` is a cgroup v2 directory.
pub fn check_cgroup(path: &Path) -> Result<(), StartupError> {
    use nix::sys::statfs::{CGROUP_SUPER_MAGIC, CGROUP2_SUPER_MAGIC, statfs};
    let mounted = crate::dataplane::datapath::cgroup2_mount()
        .map_or("no cgroup v2 mount was found".to_string(), |m| {
            format!("cgroup v2 is mounted at {}", m.display())
        });
    match statfs(path) {
        Ok(fs) if fs.filesystem_type() == CGROUP2_SUPER_MAGIC => Ok(()),
        Ok(fs) => {
            let what = if fs.filesystem_type() == CGROUP_SUPER_MAGIC {
                "a cgroup v1 directory"
            } else {
                "not a cgroup directory"
            };
            Err(fail(
                exit_code::MISSING_FEATURE,
                format!(
                    "--cgroup-path {} is {what}: the socket programs attach to a cgroup v2 directory ({mounted}; \
                     pass --cgroup-path \"\" to run without socket load balancing)",
                    path.display()
                ),
            ))
        }
        Err(error) => Err(fail(
            exit_code::MISSING_FEATURE,
            format!("--cgroup-path {}: {error} ({mounted})", path.display()),
        )),
    }
}

/// Takes `--bpf-dir` for this process (creating it): a second lb on the same maps would fight
/// the first over every entry. The lock is held while the returned file is.
pub fn lock_bpf_dir(bpf_dir: &Path) -> Result<Flock<std::fs::File>, StartupError> {
    std::fs::create_dir_all(bpf_dir).map_err(|error| {
        fail(exit_code::FAILED, format!("creating --bpf-dir {}: {error}", bpf_dir.display()))
    })?;
    let dir = std::fs::File::open(bpf_dir).map_err(|error| {
        fail(exit_code::FAILED, format!("opening --bpf-dir {}: {error}", bpf_dir.display()))
    })?;
    match Flock::lock(dir, FlockArg::LockExclusiveNonblock) {
        Ok(lock) => Ok(lock),
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => Err(fail(
            exit_code::ALREADY_RUNNING,
            format!(
                "another lb is running with --bpf-dir {}: stop it first (one lb per node), or give this one \
                 another --bpf-dir",
                bpf_dir.display()
            ),
        )),
        Err((_, error)) => {
            Err(fail(exit_code::FAILED, format!("locking --bpf-dir {}: {error}", bpf_dir.display())))
        }
    }
}
