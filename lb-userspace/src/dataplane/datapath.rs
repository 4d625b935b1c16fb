//! Loading the eBPF object, pinning its maps and attaching its programs.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use aya::maps::{Array, MapData, PerCpuArray, PerCpuHashMap};
use aya::programs::links::FdLink;
use aya::programs::tc::SchedClassifierLink;
use aya::programs::{CgroupSockAddr, SchedClassifier, TcAttachType, Xdp, XdpMode, tc};
use std::os::fd::AsFd;

use crate::{dataplane::layout, dataplane::links};
use aya::{Ebpf, EbpfLoader};
use lb_common::{DatapathConfig, ServiceTraffic, counters, map_names};

/// The eBPF object built from lb-ebpf by build.rs.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb"));

/// The TC ingress program for the pods' (in-cluster) interfaces.
pub const INGRESS_PROGRAM: &str = "lb_ingress";
/// The TC ingress program for the node's uplinks (`--external-interfaces`).
pub const INGRESS_EXTERNAL_PROGRAM: &str = "lb_ingress_external";
/// The TC egress program (replies of host-network endpoints), on every interface lb attaches to.
pub const EGRESS_PROGRAM: &str = "lb_egress";
/// Every TC program lb attaches.
const TC_PROGRAMS: [&str; 3] = [INGRESS_PROGRAM, INGRESS_EXTERNAL_PROGRAM, EGRESS_PROGRAM];
/// The XDP program for the external interfaces.
pub const XDP_PROGRAM: &str = "lb_xdp";
/// The cgroup socket programs (socket-level load balancing for the node's own traffic).
pub const SOCKET_PROGRAMS: [&str; 8] = [
    "lb_connect4",
    "lb_sendmsg4",
    "lb_recvmsg4",
    "lb_getpeername4",
    "lb_connect6",
    "lb_sendmsg6",
    "lb_recvmsg6",
    "lb_getpeername6",
];

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error(
        "{dir} is not on a BPF filesystem: mount one with `mount -t bpf bpf /sys/fs/bpf` or pass --bpf-dir under a bpffs mount"
    )]
    NotBpfFs { dir: PathBuf },
    #[error("creating {dir}: {source}")]
    CreateDir {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("loading the eBPF object (needs root, or CAP_BPF and CAP_NET_ADMIN): {0}")]
    Load(#[source] aya::EbpfError),
    #[error("program {name} is missing from the eBPF object")]
    MissingProgram { name: &'static str },
    #[error("map {name} is missing from the eBPF object")]
    MissingMap { name: &'static str },
    #[error("loading program {name} into the kernel (needs root, or CAP_BPF and CAP_NET_ADMIN): {source}")]
    LoadProgram {
        name: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("interface {interface} does not exist")]
    NoSuchInterface { interface: String },
    #[error("attaching {name} to {interface} {direction}: {source}")]
    Attach {
        name: &'static str,
        interface: String,
        direction: &'static str,
        #[source]
        source: Box<aya::programs::ProgramError>,
    },
    #[error("opening cgroup {path} for the socket programs: {source}")]
    Cgroup {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("attaching {name} to cgroup {path}: {source}")]
    AttachCgroup {
        name: &'static str,
        path: PathBuf,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("attaching {name} to {interface} in {mode} mode: {source}")]
    AttachXdp {
        name: &'static str,
        interface: String,
        mode: &'static str,
        #[source]
        source: Box<aya::programs::ProgramError>,
    },
    #[error("{operation} {path}: {source}")]
    Link {
        operation: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("reading counters: {0}")]
    Counters(#[source] aya::maps::MapError),
    #[error(transparent)]
    Layout(#[from] layout::LayoutError),
    #[error("filling {map} with the IPv6 programs: {source}")]
    ProgramSlots {
        map: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("writing the data path's settings to {map}: {source}")]
    Config {
        map: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
}

fn is_bpffs(path: &Path) -> bool {
    nix::sys::statfs::statfs(path).is_ok_and(|fs| fs.filesystem_type() == nix::sys::statfs::BPF_FS_MAGIC)
}

/// Map sizes.
#[derive(Clone, Debug)]
pub struct Capacity {
    /// Service entries plus backend slots: frontends x (1 + backends each).
    pub service_slots: u32,
    /// Frontends (each has one metadata entry).
    pub frontends: u32,
    pub backends: u32,
    /// Conntrack entries: two per tracked flow, one for each direction.
    pub flows: u32,
}

impl Default for Capacity {
    fn default() -> Self {
        Self {
            service_slots: lb_common::capacity::SERVICES,
            frontends: lb_common::capacity::SERVICE_META,
            backends: lb_common::capacity::BACKENDS,
            flows: lb_common::capacity::CONNTRACK,
        }
    }
}

/// An attachment lb holds: a link pinned under `<bpf-dir>/links` (it outlives lb), or, where
/// the kernel has no TCX (before 6.6), a netlink TC filter owned by this process.
enum Held {
    Pinned(PathBuf),
    Owned(SchedClassifierLink),
}

impl Held {
    /// Detaches: removing a pin drops the last reference to its link.
    fn release(self) {
        match self {
            Held::Pinned(path) => {
                if let Err(error) = std::fs::remove_file(&path) {
                    tracing::warn!(pin = %path.display(), %error, "removing a link's pin");
                }
            }
            Held::Owned(link) => drop(link),
        }
    }
}

/// One interface's TC attachments.
struct TcAttachment {
    /// The interface's index when attached: a new index under the same name is a new interface.
    index: u32,
    ingress: Held,
    egress: Held,
}

/// The loaded eBPF object with its maps pinned under a directory, and its attachments.
pub struct Datapath {
    ebpf: Ebpf,
    bpf_dir: PathBuf,
    /// Interface name -> its attachments.
    attached: BTreeMap<String, TcAttachment>,
    /// Interface name -> the XDP program's pinned link there.
    xdp_attached: BTreeMap<String, PathBuf>,
    /// Whether the socket programs are attached (their links pinned).
    sockets_attached: bool,
    /// The layout migration this start makes, until `finish_migration`.
    migration: Option<layout::Migration>,
}

/// How the XDP program is attached to the external interfaces (`--xdp`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum XdpAttach {
    /// In the driver, before any skb exists.
    #[default]
    Native,
    /// In the stack's generic hook: works on any device, for less gain.
    Generic,
    Off,
}

/// What adopting a previous lb's links found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Adopted {
    /// Links that now run this build's programs.
    pub updated: usize,
    /// Links of interfaces that are gone (or no longer selected), cgroups no longer wanted, or
    /// XDP turned off: released.
    pub released: usize,
}

/// What `Datapath::adopt` needs to know of this run's configuration.
pub struct AdoptOptions<'a> {
    /// Interfaces selected now: name -> index.
    pub selected: &'a BTreeMap<String, u32>,
    pub is_external: &'a dyn Fn(&str) -> bool,
    pub xdp: XdpAttach,
    pub cgroup_path: Option<&'a Path>,
}

/// BPF attach types of the cgroup socket programs (`enum bpf_attach_type`).
const SOCKET_ATTACH_TYPES: [(&str, u32); 8] = [
    ("lb_connect4", 10),
    ("lb_sendmsg4", 14),
    ("lb_recvmsg4", 19),
    ("lb_getpeername4", 29),
    ("lb_connect6", 11),
    ("lb_sendmsg6", 15),
    ("lb_recvmsg6", 20),
    ("lb_getpeername6", 30),
];

fn links_error(operation: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> DatapathError + use<> {
    let path = path.to_path_buf();
    move |source| DatapathError::Link { operation, path, source }
}

impl Datapath {
    /// Loads the object, reusing maps already pinned in `bpf_dir` (so a restart keeps its flows)
    /// and pinning new ones there.
    pub fn load(bpf_dir: &Path) -> Result<Self, DatapathError> {
        Self::load_with(bpf_dir, &Capacity::default())
    }

    /// `load`, with map sizes other than the defaults.
    pub fn load_with(bpf_dir: &Path, capacity: &Capacity) -> Result<Self, DatapathError> {
        Self::load_variant(bpf_dir, capacity, 0, true)
    }

    /// `load_with`, running the programs of `program_variant` (0: the default; see
    /// `LB_PROGRAM_VARIANT` in lb-ebpf), counting each frontend's traffic or not
    /// (`service_traffic`: about 30 ns a packet, measured in `bench/results`). Maps pinned by a build of another layout, or with
    /// other sizes, are migrated (see `layout`): call `finish_migration` once every link runs
    /// this build's programs.
    pub fn load_variant(
        bpf_dir: &Path,
        capacity: &Capacity,
        program_variant: u32,
        service_traffic: bool,
    ) -> Result<Self, DatapathError> {
        let parent = bpf_dir.parent().unwrap_or(Path::new("/"));
        if !is_bpffs(bpf_dir) && !is_bpffs(parent) {
            return Err(DatapathError::NotBpfFs { dir: bpf_dir.to_path_buf() });
        }
        std::fs::create_dir_all(bpf_dir.join(links::LINKS_DIR))
            .map_err(|source| DatapathError::CreateDir { dir: bpf_dir.to_path_buf(), source })?;
        // Only root may open the pins: a map or link opened is a map read or written, a program
        // detached.
        for dir in [bpf_dir.to_path_buf(), bpf_dir.join(links::LINKS_DIR)] {
            restrict(&dir, 0o700)?;
        }
        // Refused here (a layout this build cannot read, a size too small for what the maps
        // hold), nothing is touched: the running data path keeps serving.
        let migration = layout::prepare(bpf_dir, capacity)?;
        if !migration.moves.is_empty() {
            let maps: Vec<String> = migration
                .moves
                .iter()
                .map(|moved| format!("{} ({} -> {})", moved.name, moved.from, moved.to))
                .collect();
            tracing::info!(
                from_layout = migration.from,
                ?maps,
                "migrating maps to this build's layout and sizes"
            );
        }
        let count_service_traffic = u32::from(service_traffic);
        let mut loader = EbpfLoader::new();
        loader
            .default_map_pin_directory(bpf_dir)
            // A BTF map-of-maps carries no pinning of its own: pin it by path like the others.
            .map_pin_path(map_names::MAGLEV, migration.pin_path(bpf_dir, map_names::MAGLEV))
            .map_max_entries(map_names::SERVICES, capacity.service_slots)
            .map_max_entries(map_names::SERVICE_META, capacity.frontends)
            .map_max_entries(map_names::BACKENDS, capacity.backends)
            .map_max_entries(map_names::CONNTRACK, capacity.flows)
            .map_max_entries(map_names::SERVICES6, capacity.service_slots)
            .map_max_entries(map_names::BACKENDS6, capacity.backends)
            .map_max_entries(map_names::CONNTRACK6, capacity.flows)
            .map_max_entries(map_names::SERVICE_TRAFFIC, capacity.frontends)
            .override_global("LB_PROGRAM_VARIANT", &program_variant, true)
            .override_global("LB_COUNT_SERVICE_TRAFFIC", &count_service_traffic, true);
        for moved in &migration.moves {
            loader.map_pin_path(moved.name, migration.pin_path(bpf_dir, moved.name));
        }
        let mut ebpf = match loader.load(EBPF_OBJECT) {
            Ok(ebpf) => ebpf,
            Err(error) => {
                layout::abandon(bpf_dir, &migration);
                return Err(DatapathError::Load(error));
            }
        };
        for name in map_names::PINNED {
            restrict(&migration.pin_path(bpf_dir, name), 0o600)?;
        }
        let copied = layout::copy(bpf_dir, &migration, crate::dataplane::conntrack::monotonic_ns())?;
        if !migration.moves.is_empty() {
            tracing::info!(entries = copied, "copied the entries into the new maps");
        }
        let previous = previous_flows_fds(&ebpf)?;
        let previous: Vec<_> = previous.iter().map(|(name, fd)| (*name, fd.as_fd())).collect();
        match layout::offer_previous_flows(bpf_dir, &migration, &previous) {
            Ok(true) => tracing::info!(
                "until the migration ends, flows missing from the new conntrack map are looked up in the old one"
            ),
            Ok(false) => {}
            Err(error) => {
                layout::abandon(bpf_dir, &migration);
                return Err(error.into());
            }
        }
        // Every program now: a previous lb's links get them before anything else happens. The
        // IPv6 halves first, into the programs map the others tail-call (pinned: a previous
        // lb's programs, still attached, then reach these).
        fill_program_slots(
            &mut ebpf,
            map_names::PROGRAMS,
            &lb_common::tail_calls::PROGRAMS,
            |program, name| {
                let program: &mut SchedClassifier =
                    program.try_into().map_err(|_| DatapathError::MissingProgram { name })?;
                program.load().map_err(|source| DatapathError::LoadProgram { name, source })?;
                program_fd(program.fd(), name)
            },
        )?;
        for name in TC_PROGRAMS {
            let program: &mut SchedClassifier = ebpf
                .program_mut(name)
                .and_then(|p| p.try_into().ok())
                .ok_or(DatapathError::MissingProgram { name })?;
            program.load().map_err(|source| DatapathError::LoadProgram { name, source })?;
        }
        // XDP's IPv6 parts, into the slots the XDP programs tail-call (a map of this load
        // only: see lb-ebpf's `LB_XDP_PROGRAMS`).
        fill_program_slots(
            &mut ebpf,
            map_names::XDP_PROGRAMS,
            &lb_common::xdp_tail_calls::PROGRAMS,
            |program, name| {
                let program: &mut Xdp =
                    program.try_into().map_err(|_| DatapathError::MissingProgram { name })?;
                program.load().map_err(|source| DatapathError::LoadProgram { name, source })?;
                program_fd(program.fd(), name)
            },
        )?;
        let xdp: &mut Xdp = ebpf
            .program_mut(XDP_PROGRAM)
            .and_then(|p| p.try_into().ok())
            .ok_or(DatapathError::MissingProgram { name: XDP_PROGRAM })?;
        xdp.load().map_err(|source| DatapathError::LoadProgram { name: XDP_PROGRAM, source })?;
        for name in SOCKET_PROGRAMS {
            let program: &mut CgroupSockAddr = ebpf
                .program_mut(name)
                .and_then(|p| p.try_into().ok())
                .ok_or(DatapathError::MissingProgram { name })?;
            program.load().map_err(|source| DatapathError::LoadProgram { name, source })?;
        }
        let mut datapath = Self {
            ebpf,
            bpf_dir: bpf_dir.to_path_buf(),
            attached: BTreeMap::new(),
            xdp_attached: BTreeMap::new(),
            sockets_attached: false,
            migration: Some(migration),
        };
        if datapath.migration.as_ref().is_some_and(|m| m.moves.is_empty()) {
            datapath.finish_migration()?;
        }
        Ok(datapath)
    }

    /// Where the map `name` is pinned now (its `-migrating` pin until `finish_migration`).
    pub fn map_pin(&self, name: &str) -> PathBuf {
        match &self.migration {
            Some(migration) => migration.pin_path(&self.bpf_dir, name),
            None => self.bpf_dir.join(name),
        }
    }

    /// Ends a migration once the links run this build's programs: carries over what the old
    /// programs wrote meanwhile and puts the new maps in the old ones' place.
    pub fn finish_migration(&mut self) -> Result<Option<layout::Finished>, DatapathError> {
        let Some(migration) = self.migration.take() else { return Ok(None) };
        let previous = previous_flows_fds(&self.ebpf)?;
        let previous: Vec<_> = previous.iter().map(|(name, fd)| (*name, fd.as_fd())).collect();
        let finished = layout::finish(
            &self.bpf_dir,
            &migration,
            crate::dataplane::conntrack::monotonic_ns(),
            &previous,
        )?;
        Ok((!migration.moves.is_empty()).then_some(finished))
    }

    pub fn ebpf_mut(&mut self) -> &mut Ebpf {
        &mut self.ebpf
    }

    fn pin_path(&self, attachment: &links::Attachment) -> PathBuf {
        self.bpf_dir.join(links::LINKS_DIR).join(attachment.pin_name())
    }

    fn program_fd(&self, name: &'static str) -> Result<std::os::fd::OwnedFd, DatapathError> {
        let program = self.ebpf.program(name).ok_or(DatapathError::MissingProgram { name })?;
        let fd = program.fd().map_err(|source| DatapathError::LoadProgram { name, source })?;
        fd.as_fd().try_clone_to_owned().map_err(links_error("duplicating the descriptor of", Path::new(name)))
    }

    /// Takes over the links a previous lb pinned: each one still wanted gets this build's
    /// program (one atomic BPF_LINK_UPDATE: no packet meets no program), the others are
    /// released. Attachments not found here are made by `attach`, `attach_xdp` and
    /// `attach_sockets` as usual.
    pub fn adopt(&mut self, options: &AdoptOptions) -> Result<Adopted, DatapathError> {
        let mut adopted = Adopted::default();
        let name_of: BTreeMap<u32, &String> =
            options.selected.iter().map(|(name, index)| (*index, name)).collect();
        let mut ingress: BTreeMap<String, (u32, PathBuf)> = BTreeMap::new();
        let mut egress: BTreeMap<String, PathBuf> = BTreeMap::new();
        let mut sockets = 0;
        for (attachment, path) in links::pinned(&self.bpf_dir) {
            let link = links::open_pinned(&path).map_err(links_error("opening the pinned link", &path))?;
            let target =
                links::link_target(link.as_fd()).map_err(links_error("reading the pinned link", &path))?;
            // The program this link should run now, if it should still exist.
            let wanted: Option<&'static str> = match &attachment {
                links::Attachment::TcIngress { ifindex } | links::Attachment::TcEgress { ifindex } => {
                    match name_of.get(ifindex).filter(|_| target.ifindex == *ifindex) {
                        None => None,
                        Some(name) if matches!(attachment, links::Attachment::TcEgress { .. }) => {
                            egress.insert((*name).clone(), path.clone());
                            Some(EGRESS_PROGRAM)
                        }
                        Some(name) => {
                            let program = if (options.is_external)(name) {
                                INGRESS_EXTERNAL_PROGRAM
                            } else {
                                INGRESS_PROGRAM
                            };
                            ingress.insert((*name).clone(), (*ifindex, path.clone()));
                            Some(program)
                        }
                    }
                }
                links::Attachment::Xdp { ifindex } => name_of
                    .get(ifindex)
                    .filter(|name| {
                        target.ifindex == *ifindex
                            && (options.is_external)(name)
                            && options.xdp != XdpAttach::Off
                    })
                    .map(|name| {
                        self.xdp_attached.insert((*name).clone(), path.clone());
                        XDP_PROGRAM
                    }),
                links::Attachment::Socket { program } => {
                    let same_cgroup =
                        options.cgroup_path.and_then(cgroup_id).is_some_and(|id| id == target.cgroup_id);
                    SOCKET_PROGRAMS
                        .iter()
                        .copied()
                        .find(|name| name == program)
                        .filter(|_| same_cgroup)
                        .inspect(|_| sockets += 1)
                }
            };
            match wanted {
                Some(program) => {
                    let fd = self.program_fd(program)?;
                    links::update_program(link.as_fd(), fd.as_fd())
                        .map_err(links_error("giving this build's program to the pinned link", &path))?;
                    adopted.updated += 1;
                }
                None => {
                    Held::Pinned(path).release();
                    adopted.released += 1;
                }
            }
        }
        // An interface's two links go together: if one is missing, attach both anew.
        for (name, (index, ingress_pin)) in ingress {
            match egress.remove(&name) {
                Some(egress_pin) => {
                    let attachment = TcAttachment {
                        index,
                        ingress: Held::Pinned(ingress_pin),
                        egress: Held::Pinned(egress_pin),
                    };
                    self.attached.insert(name, attachment);
                }
                None => Held::Pinned(ingress_pin).release(),
            }
        }
        egress.into_values().for_each(|pin| Held::Pinned(pin).release());
        if sockets == SOCKET_PROGRAMS.len() {
            self.sockets_attached = true;
        }
        Ok(adopted)
    }

    /// Attaches to `interface` (TCX on kernels >= 6.6, clsact otherwise): the ingress program
    /// for in-cluster or for external sources, and the egress program. With TCX the links are
    /// pinned, so they outlive this process.
    pub fn attach(&mut self, interface: &str, external: bool) -> Result<(), DatapathError> {
        if self.attached.contains_key(interface) {
            return Ok(());
        }
        let Ok(index) = nix::net::if_::if_nametoindex(interface) else {
            return Err(DatapathError::NoSuchInterface { interface: interface.to_string() });
        };
        let tcx = aya::util::KernelVersion::current()
            .is_ok_and(|version| version >= aya::util::KernelVersion::new(6, 6, 0));
        if !tcx {
            // Netlink attachment needs the clsact qdisc; it may exist already.
            let _ = tc::qdisc_add_clsact(interface);
        }
        let ingress_program = if external { INGRESS_EXTERNAL_PROGRAM } else { INGRESS_PROGRAM };
        let ingress = self.attach_tc(
            ingress_program,
            interface,
            TcAttachType::Ingress,
            links::Attachment::TcIngress { ifindex: index },
        )?;
        let egress = match self.attach_tc(
            EGRESS_PROGRAM,
            interface,
            TcAttachType::Egress,
            links::Attachment::TcEgress { ifindex: index },
        ) {
            Ok(link) => link,
            Err(error) => {
                ingress.release();
                return Err(error);
            }
        };
        self.attached.insert(interface.to_string(), TcAttachment { index, ingress, egress });
        Ok(())
    }

    fn attach_tc(
        &mut self,
        name: &'static str,
        interface: &str,
        direction: TcAttachType,
        attachment: links::Attachment,
    ) -> Result<Held, DatapathError> {
        let path = self.pin_path(&attachment);
        // A pin left by a start that failed half-way: replace it.
        let _ = std::fs::remove_file(&path);
        let program = self.classifier(name).ok_or(DatapathError::MissingProgram { name })?;
        let attach_error = |source| DatapathError::Attach {
            name,
            interface: interface.to_string(),
            direction: if direction == TcAttachType::Ingress { "ingress" } else { "egress" },
            source: Box::new(source),
        };
        let id = program.attach(interface, direction).map_err(attach_error)?;
        let link = program.take_link(id).map_err(attach_error)?;
        match FdLink::try_from(link) {
            Ok(fd_link) => {
                fd_link.pin(&path).map_err(|error| DatapathError::Link {
                    operation: "pinning",
                    path: path.clone(),
                    source: std::io::Error::other(error.to_string()),
                })?;
                restrict(&path, 0o600)?;
                Ok(Held::Pinned(path))
            }
            // A netlink filter (no TCX): it cannot be pinned, and stays ours.
            Err(_) => {
                let id = program.attach(interface, direction).map_err(attach_error)?;
                Ok(Held::Owned(program.take_link(id).map_err(attach_error)?))
            }
        }
    }

    /// Makes the attached set equal to `selected` (name -> index, as listed now): attaches to
    /// new interfaces and to ones that came back under a new index, forgets vanished ones
    /// (the kernel dropped their attachment with them). `is_external` tells which get the
    /// external ingress program. Returns the attach failures; the other interfaces are handled
    /// regardless.
    pub fn sync_interfaces(
        &mut self,
        selected: &BTreeMap<String, u32>,
        is_external: impl Fn(&str) -> bool,
    ) -> Vec<DatapathError> {
        let gone: Vec<String> = self
            .attached
            .iter()
            .filter(|(name, attachment)| selected.get(*name) != Some(&attachment.index))
            .map(|(name, _)| name.clone())
            .collect();
        for name in gone {
            self.forget(&name);
        }
        let mut failures = Vec::new();
        let new: Vec<&String> = selected.keys().filter(|name| !self.attached.contains_key(*name)).collect();
        for name in new {
            match self.attach(name, is_external(name)) {
                Ok(()) => tracing::info!(interface = %name, "attached to ingress and egress"),
                Err(error) => failures.push(error),
            }
        }
        failures
    }

    fn forget(&mut self, interface: &str) {
        let Some(attachment) = self.attached.remove(interface) else { return };
        // Harmless when the interface, and so the attachment, is already gone.
        attachment.ingress.release();
        attachment.egress.release();
        tracing::info!(%interface, "interface gone or replaced; forgot its attachment");
    }

    fn classifier(&mut self, name: &str) -> Option<&mut SchedClassifier> {
        self.ebpf.program_mut(name)?.try_into().ok()
    }

    /// Writes the node-wide settings (the source-NAT address and ports, the Maglev table size).
    pub fn set_config(&mut self, config: DatapathConfig) -> Result<(), DatapathError> {
        let config_error = |source| DatapathError::Config { map: map_names::CONFIG, source };
        let map = self
            .ebpf
            .map_mut(map_names::CONFIG)
            .ok_or(DatapathError::MissingMap { name: map_names::CONFIG })?;
        let mut array: Array<&mut MapData, DatapathConfig> = Array::try_from(map).map_err(config_error)?;
        array.set(0, config, 0).map_err(config_error)
    }

    /// Writes the IPv6 family's node-wide settings (its source-NAT address).
    pub fn set_config6(&mut self, config: lb_common::DatapathConfig6) -> Result<(), DatapathError> {
        let config_error = |source| DatapathError::Config { map: map_names::CONFIG6, source };
        let map = self
            .ebpf
            .map_mut(map_names::CONFIG6)
            .ok_or(DatapathError::MissingMap { name: map_names::CONFIG6 })?;
        let mut array: Array<&mut MapData, lb_common::DatapathConfig6> =
            Array::try_from(map).map_err(config_error)?;
        array.set(0, config, 0).map_err(config_error)
    }

    /// Whether the XDP program is attached to `interface` (by this lb or an adopted link).
    pub fn has_xdp(&self, interface: &str) -> bool {
        self.xdp_attached.contains_key(interface)
    }

    /// Attaches the XDP program to an external interface, its link pinned. On failure the TC
    /// program, attached there too, still handles all of its traffic.
    pub fn attach_xdp(&mut self, interface: &str, attach: XdpAttach) -> Result<(), DatapathError> {
        let (mode, mode_name) = match attach {
            XdpAttach::Off => return Ok(()),
            XdpAttach::Native => (XdpMode::Driver, "native"),
            XdpAttach::Generic => (XdpMode::Skb, "generic"),
        };
        if self.has_xdp(interface) {
            return Ok(());
        }
        let Ok(index) = nix::net::if_::if_nametoindex(interface) else {
            return Err(DatapathError::NoSuchInterface { interface: interface.to_string() });
        };
        let path = self.pin_path(&links::Attachment::Xdp { ifindex: index });
        let _ = std::fs::remove_file(&path);
        let program: &mut Xdp = self
            .ebpf
            .program_mut(XDP_PROGRAM)
            .and_then(|p| p.try_into().ok())
            .ok_or(DatapathError::MissingProgram { name: XDP_PROGRAM })?;
        let attach_error = |source| DatapathError::AttachXdp {
            name: XDP_PROGRAM,
            interface: interface.to_string(),
            mode: mode_name,
            source: Box::new(source),
        };
        let id = program.attach(interface, mode).map_err(attach_error)?;
        let link = program.take_link(id).map_err(attach_error)?;
        let fd_link = FdLink::try_from(link).map_err(|error| DatapathError::Link {
            operation: "pinning (the XDP attachment is not a BPF link)",
            path: path.clone(),
            source: std::io::Error::other(error.to_string()),
        })?;
        fd_link.pin(&path).map_err(|error| DatapathError::Link {
            operation: "pinning",
            path: path.clone(),
            source: std::io::Error::other(error.to_string()),
        })?;
        restrict(&path, 0o600)?;
        self.xdp_attached.insert(interface.to_string(), path);
        Ok(())
    }

    /// Attaches the socket programs to the cgroup at `cgroup_path`, their links pinned: the
    /// node's own connections to frontends (host processes in that cgroup) are translated
    /// there. They translate only sockets in the namespace whose cookie `set_config` wrote.
    pub fn attach_sockets(&mut self, cgroup_path: &Path) -> Result<(), DatapathError> {
        if self.sockets_attached {
            return Ok(());
        }
        let cgroup = std::fs::File::open(cgroup_path)
            .map_err(|source| DatapathError::Cgroup { path: cgroup_path.to_path_buf(), source })?;
        for (name, attach_type) in SOCKET_ATTACH_TYPES {
            let path = self.pin_path(&links::Attachment::Socket { program: name.to_string() });
            let _ = std::fs::remove_file(&path);
            let program = self.program_fd(name)?;
            let link = links::create_cgroup_link(program.as_fd(), cgroup.as_fd(), attach_type).map_err(
                |source| DatapathError::AttachCgroup {
                    name,
                    path: cgroup_path.to_path_buf(),
                    source: aya::programs::ProgramError::SyscallError(aya::sys::SyscallError {
                        call: "bpf_link_create",
                        io_error: source,
                    }),
                },
            )?;
            links::pin(link.as_fd(), &path).map_err(links_error("pinning", &path))?;
            restrict(&path, 0o600)?;
        }
        self.sockets_attached = true;
        Ok(())
    }

    /// Names of the interfaces the TC programs are attached to.
    pub fn attached(&self) -> impl Iterator<Item = &str> {
        self.attached.keys().map(String::as_str)
    }
}

/// Sets a pin's or a pin directory's mode.
fn restrict(path: &Path, mode: u32) -> Result<(), DatapathError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(|source| {
        DatapathError::Link { operation: "restricting the permissions of", path: path.to_path_buf(), source }
    })
}

/// The cgroup ID of a cgroup v2 directory: its inode number.
fn cgroup_id(path: &Path) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|metadata| metadata.ino())
}

/// Detaches everything a previous lb left attached under `bpf_dir` (by removing the links'
/// pins), before its maps are removed: no program is left reading a half-removed map.
/// Returns how many links were removed.
pub fn remove_links(bpf_dir: &Path) -> std::io::Result<usize> {
    let pins = links::pinned(bpf_dir);
    for (_, path) in &pins {
        std::fs::remove_file(path)?;
    }
    match std::fs::remove_dir(bpf_dir.join(links::LINKS_DIR)) {
        Err(error) if error.kind() != std::io::ErrorKind::NotFound => return Err(error),
        _ => {}
    }
    Ok(pins.len())
}

/// Sums the per-CPU counters pinned under `bpf_dir`, by name.
pub fn read_counters(bpf_dir: &Path) -> Result<Vec<(&'static str, u64)>, DatapathError> {
    let data = MapData::from_pin(bpf_dir.join(map_names::COUNTERS)).map_err(DatapathError::Counters)?;
    let map = aya::maps::Map::from_map_data(data).map_err(DatapathError::Counters)?;
    let array: PerCpuArray<MapData, u64> = PerCpuArray::try_from(map).map_err(DatapathError::Counters)?;
    let mut values = Vec::with_capacity(counters::NAMES.len());
    for index in 0..counters::COUNT {
        values.push(array.get(&index, 0).map_err(DatapathError::Counters)?.iter().sum());
    }
    counters::derive_packets(&mut values);
    Ok(counters::NAMES.iter().copied().zip(values).collect())
}

/// Each frontend's traffic (`lb_common::ServiceTraffic`) pinned under `bpf_dir`, summed over
/// CPUs, by service ID. Empty when the map is not pinned (maps of an lb from before it).
pub fn read_service_traffic(bpf_dir: &Path) -> Result<BTreeMap<u32, ServiceTraffic>, DatapathError> {
    let path = bpf_dir.join(map_names::SERVICE_TRAFFIC);
    if !path.exists() {
        return Ok(BTreeMap::new());
    }
    let data = MapData::from_pin(&path).map_err(DatapathError::Counters)?;
    let map = aya::maps::Map::from_map_data(data).map_err(DatapathError::Counters)?;
    let traffic: PerCpuHashMap<MapData, u32, ServiceTraffic> =
        PerCpuHashMap::try_from(map).map_err(DatapathError::Counters)?;
    let mut sums = BTreeMap::new();
    for entry in traffic.iter() {
        // A frontend removed during the walk ends it early (its key is gone): what was read stands.
        let Ok((id, per_cpu)) = entry else { break };
        let sum: &mut ServiceTraffic = sums.entry(id).or_default();
        for value in per_cpu.iter() {
            sum.add(value);
        }
    }
    Ok(sums)
}

/// The data path's settings pinned under `bpf_dir`.
pub fn read_config(bpf_dir: &Path) -> Result<DatapathConfig, DatapathError> {
    let data = MapData::from_pin(bpf_dir.join(map_names::CONFIG)).map_err(DatapathError::Counters)?;
    let map = aya::maps::Map::from_map_data(data).map_err(DatapathError::Counters)?;
    let array: Array<MapData, DatapathConfig> = Array::try_from(map).map_err(DatapathError::Counters)?;
    array.get(&0, 0).map_err(DatapathError::Counters)
}

/// The IPv6 family's settings pinned under `bpf_dir`.
pub fn read_config6(bpf_dir: &Path) -> Result<lb_common::DatapathConfig6, DatapathError> {
    let data = MapData::from_pin(bpf_dir.join(map_names::CONFIG6)).map_err(DatapathError::Counters)?;
    let map = aya::maps::Map::from_map_data(data).map_err(DatapathError::Counters)?;
    let array: Array<MapData, lb_common::DatapathConfig6> =
        Array::try_from(map).map_err(DatapathError::Counters)?;
    array.get(&0, 0).map_err(DatapathError::Counters)
}

/// The conntrack collector's statistics pinned under `bpf_dir`, by name.
pub fn read_stats(bpf_dir: &Path) -> Result<Vec<(&'static str, u64)>, DatapathError> {
    use lb_common::stats;
    let data = MapData::from_pin(bpf_dir.join(map_names::STATS)).map_err(DatapathError::Counters)?;
    let map = aya::maps::Map::from_map_data(data).map_err(DatapathError::Counters)?;
    let array: Array<MapData, u64> = Array::try_from(map).map_err(DatapathError::Counters)?;
    (0..stats::COUNT)
        .map(|index| {
            Ok((stats::NAMES[index as usize], array.get(&index, 0).map_err(DatapathError::Counters)?))
        })
        .collect()
}

pub use crate::dataplane::layout::{MapShape, expected_shapes, pinned_shape};

/// Loads `programs` (`load` loads one and returns its descriptor) and puts each in its slot of
/// the program array `map`, which other programs tail-call.
fn fill_program_slots(
    ebpf: &mut Ebpf,
    map: &'static str,
    programs: &[(u32, &'static str)],
    load: impl Fn(&mut aya::programs::Program, &'static str) -> Result<aya::programs::ProgramFd, DatapathError>,
) -> Result<(), DatapathError> {
    let mut loaded = Vec::new();
    for &(slot, name) in programs {
        let program = ebpf.program_mut(name).ok_or(DatapathError::MissingProgram { name })?;
        loaded.push((slot, load(program, name)?));
    }
    let mut slots: aya::maps::ProgramArray<&mut aya::maps::MapData> = ebpf
        .map_mut(map)
        .ok_or(DatapathError::MissingMap { name: map })?
        .try_into()
        .map_err(|source| DatapathError::ProgramSlots { map, source })?;
    for (slot, fd) in &loaded {
        slots.set(*slot, fd, 0).map_err(|source| DatapathError::ProgramSlots { map, source })?;
    }
    Ok(())
}

/// A loaded program's descriptor, owned.
fn program_fd(
    fd: Result<&aya::programs::ProgramFd, aya::programs::ProgramError>,
    name: &'static str,
) -> Result<aya::programs::ProgramFd, DatapathError> {
    fd.and_then(|fd| fd.try_clone().map_err(Into::into))
        .map_err(|source| DatapathError::LoadProgram { name, source })
}

/// Each family's conntrack map, with the programs' map that offers them its previous one
/// (LB_CONNTRACK_PREVIOUS, LB_CONNTRACK6_PREVIOUS; see `layout::offer_previous_flows`).
fn previous_flows_fds(ebpf: &Ebpf) -> Result<[(&'static str, std::os::fd::OwnedFd); 2], DatapathError> {
    let fd = |name: &'static str| match ebpf.map(name) {
        Some(aya::maps::Map::ArrayOfMaps(data)) => data
            .fd()
            .as_fd()
            .try_clone_to_owned()
            .map_err(links_error("duplicating the descriptor of", Path::new(name))),
        _ => Err(DatapathError::MissingMap { name }),
    };
    Ok([
        (map_names::CONNTRACK, fd(map_names::CONNTRACK_PREVIOUS)?),
        (map_names::CONNTRACK6, fd(map_names::CONNTRACK6_PREVIOUS)?),
    ])
}

/// The cookie of the network namespace this thread is in (`SO_NETNS_COOKIE`).
pub fn netns_cookie() -> std::io::Result<u64> {
    use std::os::fd::AsRawFd;
    let socket = std::net::UdpSocket::bind("127.0.0.1:0")?;
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as nix::libc::socklen_t;
    // SAFETY: getsockopt into a properly sized integer.
    let rc = unsafe {
        nix::libc::getsockopt(
            socket.as_raw_fd(),
            nix::libc::SOL_SOCKET,
            nix::libc::SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(cookie)
}

/// Where cgroup v2 is mounted: `/sys/fs/cgroup`, or `/sys/fs/cgroup/unified` on hybrid hosts.
pub fn cgroup2_mount() -> Option<PathBuf> {
    ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"].into_iter().map(PathBuf::from).find(|path| {
        nix::sys::statfs::statfs(path)
            .is_ok_and(|fs| fs.filesystem_type() == nix::sys::statfs::CGROUP2_SUPER_MAGIC)
    })
}
