//! Pinned BPF links: what keeps lb's programs attached while no lb runs.
//!
//! Every attachment (TCX ingress and egress per interface, XDP per uplink, the cgroup socket
//! programs) is a BPF link pinned under `<bpf-dir>/links/`, so a crash, a SIGTERM or an upgrade
//! leaves translation working with the last programmed maps. A starting lb adopts the pins:
//! it swaps its own build's program into each link with one BPF_LINK_UPDATE (the kernel
//! replaces the program atomically: no packet sees no program), and forgets the links of
//! interfaces that are gone. `lb cleanup` unpins them, which detaches the programs.
//!
//! aya pins links and updates TC and XDP ones, but has no call to open a pinned link of any
//! type, read its target, or update a cgroup link; those few system calls are made here.

use std::ffi::CString;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

/// The directory under the pin directory that holds the links.
pub const LINKS_DIR: &str = "links";

const BPF_OBJ_PIN: nix::libc::c_long = 6;
const BPF_OBJ_GET: nix::libc::c_long = 7;
const BPF_LINK_CREATE: nix::libc::c_long = 28;
const BPF_OBJ_GET_INFO_BY_FD: nix::libc::c_long = 15;
const BPF_LINK_UPDATE: nix::libc::c_long = 29;

pub(crate) fn bpf(command: nix::libc::c_long, attr: &mut [u64; 16]) -> std::io::Result<i64> {
    // SAFETY: the bpf(2) system call with a zero-padded attribute buffer larger than any
    // attribute struct these commands read; pointers in it outlive the call.
    let rc = unsafe {
        nix::libc::syscall(nix::libc::SYS_bpf, command, attr.as_mut_ptr(), std::mem::size_of_val(attr))
    };
    if rc < 0 { Err(std::io::Error::last_os_error()) } else { Ok(rc) }
}

fn c_path(path: &Path) -> std::io::Result<CString> {
    use std::os::unix::ffi::OsStrExt;
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))
}

/// Opens a pinned BPF object (here, a link).
pub fn open_pinned(path: &Path) -> std::io::Result<OwnedFd> {
    let path = c_path(path)?;
    let mut attr = [0u64; 16];
    attr[0] = path.as_ptr() as u64; // pathname; bpf_fd and file_flags 0
    let fd = bpf(BPF_OBJ_GET, &mut attr)?;
    // SAFETY: the kernel just returned this descriptor to us.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Pins a BPF object (here, a link) at `path`, on a bpffs.
pub fn pin(object: BorrowedFd<'_>, path: &Path) -> std::io::Result<()> {
    let path = c_path(path)?;
    let mut attr = [0u64; 16];
    attr[0] = path.as_ptr() as u64;
    attr[1] = object.as_raw_fd() as u64; // bpf_fd; file_flags 0
    bpf(BPF_OBJ_PIN, &mut attr).map(|_| ())
}

/// A BPF link attaching a cgroup program (`attach_type`, an `enum bpf_attach_type`) to a cgroup.
pub fn create_cgroup_link(
    program: BorrowedFd<'_>,
    cgroup: BorrowedFd<'_>,
    attach_type: u32,
) -> std::io::Result<OwnedFd> {
    let mut attr = [0u64; 16];
    attr[0] = program.as_raw_fd() as u64 | ((cgroup.as_raw_fd() as u64) << 32); // prog_fd, target_fd
    attr[1] = u64::from(attach_type); // attach_type; flags 0
    let fd = bpf(BPF_LINK_CREATE, &mut attr)?;
    // SAFETY: the kernel just returned this descriptor to us.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// What the kernel says of a link.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinkTarget {
    /// `bpf_link_type`.
    pub link_type: u32,
    pub program_id: u32,
    /// TCX and XDP links: the interface (0 once the interface is gone).
    pub ifindex: u32,
    /// Cgroup links: the cgroup's ID.
    pub cgroup_id: u64,
}

pub const LINK_TYPE_CGROUP: u32 = 3;
pub const LINK_TYPE_XDP: u32 = 6;
pub const LINK_TYPE_TCX: u32 = 11;

/// BPF_OBJ_GET_INFO_BY_FD on a link.
pub fn link_target(link: BorrowedFd<'_>) -> std::io::Result<LinkTarget> {
    // struct bpf_link_info: type, id, prog_id, then (8-aligned) a union whose xdp and tcx
    // members start with the ifindex.
    let mut info = [0u32; 32];
    let mut attr = [0u64; 16];
    attr[0] = link.as_raw_fd() as u64 | ((std::mem::size_of_val(&info) as u64) << 32); // bpf_fd, info_len
    attr[1] = info.as_mut_ptr() as u64;
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    let link_type = info[0];
    let ifindex = if link_type == LINK_TYPE_XDP || link_type == LINK_TYPE_TCX { info[4] } else { 0 };
    let cgroup_id =
        if link_type == LINK_TYPE_CGROUP { u64::from(info[4]) | (u64::from(info[5]) << 32) } else { 0 };
    Ok(LinkTarget { link_type, program_id: info[2], ifindex, cgroup_id })
}

/// Atomically replaces the program of a link.
pub fn update_program(link: BorrowedFd<'_>, program: BorrowedFd<'_>) -> std::io::Result<()> {
    let mut attr = [0u64; 16];
    attr[0] = link.as_raw_fd() as u64 | ((program.as_raw_fd() as u64) << 32); // link_fd, new_prog_fd
    bpf(BPF_LINK_UPDATE, &mut attr).map(|_| ())
}

/// What a pinned link attaches, as its pin's name says.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Attachment {
    /// TCX on an interface (by index: a recreated interface is another one).
    TcIngress {
        ifindex: u32,
    },
    TcEgress {
        ifindex: u32,
    },
    Xdp {
        ifindex: u32,
    },
    /// A socket program on the cgroup `--cgroup-path` names.
    Socket {
        program: String,
    },
}

impl Attachment {
    pub fn pin_name(&self) -> String {
        match self {
            Self::TcIngress { ifindex } => format!("tc-ingress-{ifindex}"),
            Self::TcEgress { ifindex } => format!("tc-egress-{ifindex}"),
            Self::Xdp { ifindex } => format!("xdp-{ifindex}"),
            Self::Socket { program } => format!("socket-{program}"),
        }
    }

    pub fn from_pin_name(name: &str) -> Option<Self> {
        let index = |rest: &str| rest.parse::<u32>().ok();
        if let Some(rest) = name.strip_prefix("tc-ingress-") {
            return Some(Self::TcIngress { ifindex: index(rest)? });
        }
        if let Some(rest) = name.strip_prefix("tc-egress-") {
            return Some(Self::TcEgress { ifindex: index(rest)? });
        }
        if let Some(rest) = name.strip_prefix("xdp-") {
            return Some(Self::Xdp { ifindex: index(rest)? });
        }
        name.strip_prefix("socket-").map(|program| Self::Socket { program: program.to_string() })
    }

    pub fn ifindex(&self) -> Option<u32> {
        match self {
            Self::TcIngress { ifindex } | Self::TcEgress { ifindex } | Self::Xdp { ifindex } => {
                Some(*ifindex)
            }
            Self::Socket { .. } => None,
        }
    }
}

/// The links pinned under `bpf_dir`, by what they attach.
pub fn pinned(bpf_dir: &Path) -> Vec<(Attachment, PathBuf)> {
    let Ok(entries) = std::fs::read_dir(bpf_dir.join(LINKS_DIR)) else { return Vec::new() };
    let mut links: Vec<(Attachment, PathBuf)> = entries
        .filter_map(Result::ok)
        .filter_map(|entry| Some((Attachment::from_pin_name(entry.file_name().to_str()?)?, entry.path())))
        .collect();
    links.sort();
    links
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pin_names_round_trip() {
        for attachment in [
            Attachment::TcIngress { ifindex: 7 },
            Attachment::TcEgress { ifindex: 12 },
            Attachment::Xdp { ifindex: 3 },
            Attachment::Socket { program: "lb_connect4".into() },
        ] {
            assert_eq!(Attachment::from_pin_name(&attachment.pin_name()), Some(attachment));
        }
        assert_eq!(Attachment::from_pin_name("tc-ingress-x"), None);
        assert_eq!(Attachment::from_pin_name("LB_SERVICES"), None);
    }
}
