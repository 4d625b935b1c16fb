//! Helpers for lb's root-only tests: packets, a private bpffs, and network namespaces that are
//! joined only to each other (never to the root namespace) and removed on drop.

pub mod apiserver;
pub mod bench;
pub mod fixture;
pub mod packet;
pub mod playground;
pub mod sctp;
pub mod two_nodes;

use std::fs::File;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::sched::{CloneFlags, setns};

/// Fails the test, with the reason, when it cannot run: these tests need root.
pub fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test loads BPF programs and creates network namespaces: run it as root (cargo xtask test)"
    );
}

/// A unique prefix for names this test process creates (namespaces, directories).
pub fn unique(tag: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!("lbt{}{}{}", std::process::id(), tag, NEXT.fetch_add(1, Ordering::Relaxed))
}

/// A private bpffs instance mounted on a fresh temporary directory: pins made by a test live
/// there and vanish with the unmount, so nothing is left under /sys/fs/bpf.
pub struct PrivateBpfFs {
    path: PathBuf,
}

impl PrivateBpfFs {
    pub fn new() -> Result<Self> {
        let path = std::env::temp_dir().join(unique("bpffs"));
        std::fs::create_dir_all(&path)?;
        mount(Some("bpf"), &path, Some("bpf"), MsFlags::empty(), None::<&str>)
            .with_context(|| format!("mounting bpffs on {}", path.display()))?;
        Ok(Self { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for PrivateBpfFs {
    fn drop(&mut self) {
        let _ = umount2(&self.path, MntFlags::MNT_DETACH);
        if !self.path.as_os_str().is_empty() {
            let _ = std::fs::remove_dir(&self.path);
        }
    }
}

/// A cgroup (v2) this test creates for lb's socket programs, so they are never attached to a
/// cgroup of the machine's own; removed on drop. `enter` moves this test process into it (and
/// drop moves it back), so its sockets in the node namespace are the node's own traffic.
pub struct TestCgroup {
    /// Empty without a cgroup v2 mount: lb then runs without socket programs, and only the
    /// tests of those fail (in `enter`).
    path: PathBuf,
    /// Where this process was before `enter`.
    left: Option<PathBuf>,
}

impl TestCgroup {
    pub fn new() -> Result<Self> {
        let Some(mount) = lb_userspace::dataplane::datapath::cgroup2_mount() else {
            return Ok(Self { path: PathBuf::new(), left: None });
        };
        let path = mount.join(unique("cg"));
        std::fs::create_dir(&path).with_context(|| format!("creating cgroup {}", path.display()))?;
        Ok(Self { path, left: None })
    }

    /// For `lb run --cgroup-path` (empty: no socket programs).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Moves this whole test process into the cgroup until drop.
    pub fn enter(&mut self) -> Result<()> {
        let mount = lb_userspace::dataplane::datapath::cgroup2_mount()
            .context("this machine has no cgroup v2 mount, which lb's socket programs need")?;
        let own = std::fs::read_to_string("/proc/self/cgroup")?;
        let relative = own.lines().find_map(|l| l.strip_prefix("0::")).context("no cgroup v2 entry")?;
        self.left = Some(mount.join(relative.trim_start_matches('/')));
        std::fs::write(self.path.join("cgroup.procs"), std::process::id().to_string())
            .context("entering the test cgroup")
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        if let Some(left) = &self.left {
            let _ = std::fs::write(left.join("cgroup.procs"), std::process::id().to_string());
        }
        let _ = std::fs::remove_dir(&self.path);
    }
}

pub fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip").args(args).output().context("running ip (iproute2)")?;
    if !out.status.success() {
        bail!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// A network namespace created by this test and deleted (by its recorded name) on drop.
pub struct NetNs {
    pub name: String,
}

impl NetNs {
    pub fn new(name: String) -> Result<Self> {
        ip(&["netns", "add", &name])?;
        let ns = Self { name };
        ns.exec(&["ip", "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// Runs a command inside the namespace.
    pub fn exec(&self, args: &[&str]) -> Result<()> {
        let mut full = vec!["netns", "exec", &self.name];
        full.extend_from_slice(args);
        ip(&full)
    }

    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        let path = PathBuf::from("/proc/sys").join(key.replace('.', "/"));
        let value = value.to_string();
        self.run(move || std::fs::write(&path, value).with_context(|| format!("writing {}", path.display())))?
    }

    /// Runs `f` on a thread that has joined the namespace. Sockets created there stay in the
    /// namespace wherever they are used afterwards.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
        let file = File::open(self.path()).with_context(|| format!("opening {}", self.path().display()))?;
        std::thread::spawn(move || -> Result<T> {
            setns(file.as_fd(), CloneFlags::CLONE_NEWNET).context("setns")?;
            Ok(f())
        })
        .join()
        .map_err(|_| anyhow::anyhow!("thread in namespace panicked"))?
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.name]);
    }
}

/// Joins two namespaces with a veth pair and gives each end an address (CIDR notation).
/// The path MTU the kernel holds for a connected UDP socket (`IP_MTU`, or `IPV6_MTU` for an
/// IPv6 socket).
pub fn path_mtu(socket: &std::net::UdpSocket) -> i32 {
    use std::os::fd::AsRawFd;
    let (level, name) = if socket.local_addr().expect("a bound socket").is_ipv6() {
        (nix::libc::IPPROTO_IPV6, nix::libc::IPV6_MTU)
    } else {
        (nix::libc::IPPROTO_IP, nix::libc::IP_MTU)
    };
    let mut mtu: nix::libc::c_int = 0;
    let mut len = std::mem::size_of::<nix::libc::c_int>() as nix::libc::socklen_t;
    // SAFETY: getsockopt into a properly sized integer.
    let rc = unsafe {
        nix::libc::getsockopt(
            socket.as_raw_fd(),
            level,
            name,
            (&mut mtu as *mut nix::libc::c_int).cast(),
            &mut len,
        )
    };
    assert_eq!(rc, 0, "getsockopt(path MTU): {}", std::io::Error::last_os_error());
    mtu
}

pub fn veth(a: &NetNs, a_if: &str, a_addr: &str, b: &NetNs, b_if: &str, b_addr: &str) -> Result<()> {
    ip(&[
        "link", "add", "name", a_if, "netns", &a.name, "type", "veth", "peer", "name", b_if, "netns", &b.name,
    ])?;
    for (ns, interface, addr) in [(a, a_if, a_addr), (b, b_if, b_addr)] {
        // No duplicate address detection, so the link-local address is usable at once: a
        // router sends neighbour solicitations for forwarded packets from it, and sends none
        // while it is tentative (the first forwarded IPv6 packets would wait a second or two).
        ns.sysctl(&format!("net.ipv6.conf.{interface}.accept_dad"), "0")?;
        ns.exec(&["ip", "addr", "add", addr, "dev", interface])?;
        ns.exec(&["ip", "link", "set", interface, "up"])?;
    }
    Ok(())
}

/// Starts `lb` with `args` inside `ns` (it joins the namespace between fork and exec), its
/// output going to `log`, with debug logging from lb's own crate.
pub fn spawn_lb_in(ns: &NetNs, args: &[&std::ffi::OsStr], log: &Path) -> Result<std::process::Child> {
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    let netns = File::open(ns.path())?;
    let log = File::create(log)?;
    let mut command = Command::new(lb_binary());
    command
        .args(args)
        .env("LB_LOG", "info,lb_userspace=debug")
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    let fd = netns.as_raw_fd();
    // SAFETY: setns is a single syscall, safe between fork and exec; `netns` outlives spawn.
    unsafe {
        command.pre_exec(move || {
            if nix::libc::setns(fd, nix::libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    command.spawn().with_context(|| format!("starting {}", lb_binary().display()))
}

/// The `lb` binary cargo built beside this executable (`target/<profile>/lb`, whether this is
/// a binary there or a test in `deps/`), or `LB_BIN` when set.
pub fn lb_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("LB_BIN") {
        return PathBuf::from(path);
    }
    let exe = std::env::current_exe().expect("current_exe");
    let dir = exe.parent().expect("executable has a directory");
    let beside = dir.join("lb");
    if beside.is_file() || dir.file_name().is_none_or(|name| name != "deps") {
        return beside;
    }
    dir.parent().unwrap_or(dir).join("lb")
}
