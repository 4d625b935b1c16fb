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

/// Something of the kernel's that lb's programs use.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum KernelFeature {
    Program(aya::programs::ProgramType),
    Map(aya::maps::MapType),
    Helper(aya::programs::ProgramType, aya::sys::BpfHelper),
}

/// What lb's programs need of the kernel: the feature, its name, the Linux version that
/// brought it, and what lb uses it for.
pub fn kernel_features() -> Vec<(KernelFeature, &'static str, &'static str, &'static str)> {
    use KernelFeature::{Helper, Map, Program};
    use aya::maps::MapType;
    use aya::programs::ProgramType;
    use aya::sys::BpfHelper;
    vec![
        (Program(ProgramType::SchedClassifier), "TC (sched_cls) programs", "4.1", "translating packets"),
        (Program(ProgramType::Xdp), "XDP programs", "4.8", "translating packets on external interfaces"),
        (
            Program(ProgramType::CgroupSockAddr),
            "cgroup socket-address programs",
            "4.17",
            "the node's own connections to Services",
        ),
        (Map(MapType::Hash), "hash maps", "3.19", "services, backends and conntrack"),
        (Map(MapType::LruHash), "LRU hash maps", "4.10", "session affinity, fragments and sockets"),
        (Map(MapType::PerCpuArray), "per-CPU arrays", "4.6", "counters"),
        (Map(MapType::PerCpuHash), "per-CPU hash maps", "4.6", "per-Service traffic counters"),
        (Map(MapType::LpmTrie), "LPM tries", "4.11", "loadBalancerSourceRanges"),
        (Map(MapType::ArrayOfMaps), "arrays of maps", "4.12", "Maglev tables and map migration"),
        (Map(MapType::ProgramArray), "program arrays", "4.2", "tail calls to the IPv6 programs"),
        (
            Helper(ProgramType::SchedClassifier, BpfHelper::BPF_FUNC_fib_lookup),
            "the bpf_fib_lookup helper",
            "4.18",
            "routing source-NATed packets",
        ),
        (
            Helper(ProgramType::SchedClassifier, BpfHelper::BPF_FUNC_redirect_neigh),
            "the bpf_redirect_neigh helper",
            "5.10",
            "sending source-NATed packets to their next hop",
        ),
        (
            Helper(ProgramType::SchedClassifier, BpfHelper::BPF_FUNC_ktime_get_coarse_ns),
            "the bpf_ktime_get_coarse_ns helper",
            "5.11",
            "stamping flows",
        ),
        (
            Helper(ProgramType::CgroupSockAddr, BpfHelper::BPF_FUNC_get_netns_cookie),
            "the bpf_get_netns_cookie helper in socket programs",
            "5.7",
            "telling the node's sockets from pods'",
        ),
        (
            Helper(ProgramType::CgroupSockAddr, BpfHelper::BPF_FUNC_set_retval),
            "the bpf_set_retval helper",
            "5.18",
            "refusing connections to Services without endpoints",
        ),
    ]
}

/// Whether this kernel has `feature` (an error from the probe counts as missing).
pub fn kernel_has(feature: KernelFeature) -> bool {
    match feature {
        KernelFeature::Program(program) => aya::sys::is_program_supported(program).unwrap_or(false),
        KernelFeature::Map(map) => aya::sys::is_map_supported(map).unwrap_or(false),
        KernelFeature::Helper(program, helper) => {
            aya::sys::is_helper_supported(program, helper).unwrap_or(false)
        }
    }
}

/// Every feature lb's programs need is there (`has` says whether one is): else an error naming
/// each missing one, the Linux version that brought it and what lb needs it for.
pub fn check_kernel_features(has: impl Fn(KernelFeature) -> bool) -> Result<(), StartupError> {
    let missing: Vec<String> = kernel_features()
        .into_iter()
        .filter(|(feature, ..)| !has(*feature))
        .map(|(_, name, since, used_for)| format!("{name} (Linux {since}; for {used_for})"))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    Err(fail(
        exit_code::MISSING_FEATURE,
        format!(
            "this kernel lacks what lb's programs need: {}. lb needs Linux 5.18 or later, built with BPF \
             (CONFIG_BPF_SYSCALL, CONFIG_NET_CLS_BPF, CONFIG_CGROUP_BPF)",
            missing.join("; ")
        ),
    ))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_kernel_feature_is_named_with_its_version_and_use() {
        use aya::programs::ProgramType;
        let without_set_retval = |feature| {
            !matches!(
                feature,
                KernelFeature::Helper(ProgramType::CgroupSockAddr, aya::sys::BpfHelper::BPF_FUNC_set_retval)
            )
        };
        let error = check_kernel_features(without_set_retval).unwrap_err();
        assert_eq!(error.code, exit_code::MISSING_FEATURE);
        assert!(
            error.message.starts_with(
                "this kernel lacks what lb's programs need: the bpf_set_retval helper (Linux 5.18; for \
                 refusing connections to Services without endpoints). lb needs Linux 5.18"
            ),
            "{}",
            error.message
        );
        let without_tc_or_lpm = |feature| {
            !matches!(
                feature,
                KernelFeature::Program(ProgramType::SchedClassifier)
                    | KernelFeature::Map(aya::maps::MapType::LpmTrie)
            )
        };
        let message = check_kernel_features(without_tc_or_lpm).unwrap_err().message;
        assert!(
            message.contains("TC (sched_cls) programs (Linux 4.1; for translating packets); LPM tries (Linux 4.11; for loadBalancerSourceRanges)"),
            "{message}"
        );
        assert!(check_kernel_features(|_| true).is_ok());
    }
}
