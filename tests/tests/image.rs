//! lb's container image, built and run on this machine without pulling anything:
//! `cargo xtask image` writes a static (musl) lb into an OCI archive with no base image, and
//! podman loads it and runs `lb --version` in it. Fails, never skips, when either step fails.
//!
//! Root: podman runs containers as root here, and the test mounts. `cargo xtask image` installs
//! podman (Debian's) when missing. The first run is a musl release build of lb (minutes); later
//! runs rebuild only what changed.
//!
//! Nothing is left on the machine: podman runs in a private mount namespace with tmpfs over
//! every place it keeps state (images and containers under /var/lib/containers, /run, and caches
//! and locks that podman 4.3 writes to fixed paths whatever its flags say), so all of it is gone
//! when the namespace ends with the test.

use std::path::PathBuf;
use std::process::{Command, Output};

use nix::mount::{MsFlags, mount};
use nix::sched::{CloneFlags, unshare};
use nix::sys::statfs::{CGROUP2_SUPER_MAGIC, TMPFS_MAGIC, statfs};

const VERSION: &str = env!("CARGO_PKG_VERSION");
/// The name `podman load` gives the image (deploy/daemonset.yaml runs `lb:VERSION`).
const LOADED_NAME: &str = concat!("localhost/lb:", env!("CARGO_PKG_VERSION"));

#[test]
fn the_image_builds_without_a_registry_and_runs_lb() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "podman runs the image as root here: run as root (cargo xtask test)"
    );
    let out = TempDir::new();
    let workspace = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let build = Command::new(cargo)
        .args(["xtask", "image", "--out"])
        .arg(&out.0)
        .current_dir(&workspace)
        .status()
        .expect("starting `cargo xtask image`");
    assert!(build.success(), "`cargo xtask image` failed: {build}");
    let archive = out.0.join(format!("lb-{VERSION}.oci.tar"));
    assert!(archive.is_file(), "`cargo xtask image` wrote no {}", archive.display());

    let (load, run) = in_private_mounts(|| {
        let load = podman().args(["load", "-i"]).arg(&archive).output().expect("starting podman load");
        (load, run_in_container(&["--version"]))
    });
    assert!(load.status.success(), "podman load -i {}: {}", archive.display(), stderr(&load));
    assert!(run.status.success(), "podman run {LOADED_NAME} --version: {}", stderr(&run));
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert_eq!(stdout.trim(), format!("lb {VERSION}"), "{}", stderr(&run));
}

/// `podman run` of the loaded image with no network, removed when it exits.
fn run_in_container(args: &[&str]) -> Output {
    let mut cmd = podman();
    cmd.args(["run", "--rm", "--network", "none", "--pull", "never"])
        // The container gets no cgroup of its own: none to create, none to leave behind.
        .arg("--cgroups=disabled")
        // Podman's defaults (nofile 1048576, nproc 32768) can be above this machine's hard limits,
        // which root cannot raise without CAP_SYS_RESOURCE; lb --version needs few of either.
        .args(["--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024"])
        .arg(LOADED_NAME)
        .args(args);
    cmd.output().expect("starting podman run")
}

/// podman with private storage and state (inside `in_private_mounts`); `cargo xtask image`
/// installs it when missing.
fn podman() -> Command {
    let mut cmd = Command::new("podman");
    cmd.args([
        // Plain directories: works on any filesystem, mounts nothing.
        "--storage-driver",
        "vfs",
        // No systemd to ask for cgroups on this VM.
        "--cgroup-manager",
        "cgroupfs",
        "--events-backend",
        "none",
        // Else it locks /etc/cni/net.d even for --network none.
        "--network-config-dir",
        "/run/lb-image-test/networks",
    ]);
    cmd
}

/// Runs `f` on a thread of its own in a private mount namespace, with a tmpfs over each place
/// podman writes to; the namespace and its tmpfs end with the thread and its children.
fn in_private_mounts<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                unshare(CloneFlags::CLONE_NEWNS).expect("unshare(CLONE_NEWNS)");
                // Our mounts must not propagate back to the machine's namespace.
                mount(None::<&str>, "/", None::<&str>, MsFlags::MS_REC | MsFlags::MS_PRIVATE, None::<&str>)
                    .expect("making / private");
                let mut state_dirs = vec!["/run", "/var/lib", "/var/tmp", "/var/cache"];
                // crun 1.8 refuses a hybrid cgroup layout (v1 controllers, cgroup2 with controllers
                // at /sys/fs/cgroup/unified); without cgroups (--cgroups=disabled) it needs none.
                let unified = "/sys/fs/cgroup/unified";
                if statfs("/sys/fs/cgroup").is_ok_and(|fs| fs.filesystem_type() == TMPFS_MAGIC)
                    && statfs(unified).is_ok_and(|fs| fs.filesystem_type() == CGROUP2_SUPER_MAGIC)
                {
                    state_dirs.push(unified);
                }
                for dir in state_dirs {
                    mount(Some("lb-image-test"), dir, Some("tmpfs"), MsFlags::empty(), None::<&str>)
                        .unwrap_or_else(|err| panic!("mounting a tmpfs on {dir}: {err}"));
                }
                f()
            })
            .join()
            .expect("the thread running podman panicked")
    })
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// A temporary directory for the image files, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        let path = std::env::temp_dir().join(format!("lb-image-test-{}", std::process::id()));
        std::fs::create_dir_all(&path).expect("creating the image test's directory");
        TempDir(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
