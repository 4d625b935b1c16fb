//! Loading the eBPF object, pinning its maps and attaching its programs.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use aya::maps::{Array, MapData, MapType, PerCpuArray};
use aya::programs::tc::SchedClassifierLinkId;
use aya::programs::xdp::XdpLinkId;
use aya::programs::{CgroupAttachMode, CgroupSockAddr, SchedClassifier, TcAttachType, Xdp, XdpMode, tc};
use aya::{Ebpf, EbpfLoader};
use lb_common::{DatapathConfig, counters, map_names};

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
pub const SOCKET_PROGRAMS: [&str; 4] = ["lb_connect4", "lb_sendmsg4", "lb_recvmsg4", "lb_getpeername4"];

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
    #[error("reading counters: {0}")]
    Counters(#[source] aya::maps::MapError),
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

/// One interface's TC attachments.
struct TcAttachment {
    /// The interface's index when attached: a new index under the same name is a new interface.
    index: u32,
    /// The ingress program attached there.
    ingress_program: &'static str,
    ingress: SchedClassifierLinkId,
    egress: SchedClassifierLinkId,
}

/// The loaded eBPF object with its maps pinned under a directory.
pub struct Datapath {
    ebpf: Ebpf,
    /// Interface name -> its attachments.
    attached: BTreeMap<String, TcAttachment>,
    /// Interface name -> the XDP program's link there.
    xdp_attached: BTreeMap<String, XdpLinkId>,
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

impl Datapath {
    /// Loads the object, reusing maps already pinned in `bpf_dir` (so a restart keeps its flows)
    /// and pinning new ones there.
    pub fn load(bpf_dir: &Path) -> Result<Self, DatapathError> {
        Self::load_with(bpf_dir, &Capacity::default())
    }

    /// `load`, with map sizes other than the defaults.
    pub fn load_with(bpf_dir: &Path, capacity: &Capacity) -> Result<Self, DatapathError> {
        let parent = bpf_dir.parent().unwrap_or(Path::new("/"));
        if !is_bpffs(bpf_dir) && !is_bpffs(parent) {
            return Err(DatapathError::NotBpfFs { dir: bpf_dir.to_path_buf() });
        }
        std::fs::create_dir_all(bpf_dir)
            .map_err(|source| DatapathError::CreateDir { dir: bpf_dir.to_path_buf(), source })?;
        for (name, shape) in expected_shapes(capacity) {
            unpin_if_reshaped(bpf_dir, name, shape);
        }
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(bpf_dir)
            // A BTF map-of-maps carries no pinning of its own: pin it by path like the others.
            .map_pin_path(map_names::MAGLEV, bpf_dir.join(map_names::MAGLEV))
            .map_max_entries(map_names::SERVICES, capacity.service_slots)
            .map_max_entries(map_names::SERVICE_META, capacity.frontends)
            .map_max_entries(map_names::BACKENDS, capacity.backends)
            .map_max_entries(map_names::CONNTRACK, capacity.flows)
            .load(EBPF_OBJECT)
            .map_err(DatapathError::Load)?;
        for name in TC_PROGRAMS {
            let program: &mut SchedClassifier = ebpf
                .program_mut(name)
                .and_then(|p| p.try_into().ok())
                .ok_or(DatapathError::MissingProgram { name })?;
            program.load().map_err(|source| DatapathError::LoadProgram { name, source })?;
        }
        Ok(Self { ebpf, attached: BTreeMap::new(), xdp_attached: BTreeMap::new() })
    }

    pub fn ebpf_mut(&mut self) -> &mut Ebpf {
        &mut self.ebpf
    }

    /// Attaches to `interface` (TCX on kernels >= 6.6, clsact otherwise): the ingress program
    /// for in-cluster or for external sources, and the egress program.
    pub fn attach(&mut self, interface: &str, external: bool) -> Result<(), DatapathError> {
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
        let ingress = self.attach_tc(ingress_program, interface, TcAttachType::Ingress)?;
        let egress = match self.attach_tc(EGRESS_PROGRAM, interface, TcAttachType::Egress) {
            Ok(link) => link,
            Err(error) => {
                if let Some(program) = self.classifier(ingress_program) {
                    let _ = program.detach(ingress);
                }
                return Err(error);
            }
        };
        self.attached.insert(interface.to_string(), TcAttachment { index, ingress_program, ingress, egress });
        Ok(())
    }

    fn attach_tc(
        &mut self,
        name: &'static str,
        interface: &str,
        direction: TcAttachType,
    ) -> Result<SchedClassifierLinkId, DatapathError> {
        let program = self.classifier(name).ok_or(DatapathError::MissingProgram { name })?;
        program.attach(interface, direction).map_err(|source| DatapathError::Attach {
            name,
            interface: interface.to_string(),
            direction: if direction == TcAttachType::Ingress { "ingress" } else { "egress" },
            source: Box::new(source),
        })
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
        // Fails harmlessly when the interface, and so the attachment, is already gone.
        if let Some(program) = self.classifier(attachment.ingress_program) {
            let _ = program.detach(attachment.ingress);
        }
        if let Some(program) = self.classifier(EGRESS_PROGRAM) {
            let _ = program.detach(attachment.egress);
        }
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

    /// Attaches the XDP program to an external interface. On failure the TC program, attached
    /// there too, still handles all of its traffic.
    pub fn attach_xdp(&mut self, interface: &str, attach: XdpAttach) -> Result<(), DatapathError> {
        let (mode, name) = match attach {
            XdpAttach::Off => return Ok(()),
            XdpAttach::Native => (XdpMode::Driver, "native"),
            XdpAttach::Generic => (XdpMode::Skb, "generic"),
        };
        let program: &mut Xdp = self
            .ebpf
            .program_mut(XDP_PROGRAM)
            .and_then(|p| p.try_into().ok())
            .ok_or(DatapathError::MissingProgram { name: XDP_PROGRAM })?;
        if program.fd().is_err() {
            program.load().map_err(|source| DatapathError::LoadProgram { name: XDP_PROGRAM, source })?;
        }
        let link = program.attach(interface, mode).map_err(|source| DatapathError::AttachXdp {
            name: XDP_PROGRAM,
            interface: interface.to_string(),
            mode: name,
            source: Box::new(source),
        })?;
        self.xdp_attached.insert(interface.to_string(), link);
        Ok(())
    }

    /// Loads the socket programs and attaches them to the cgroup at `cgroup_path`: the node's
    /// own connections to frontends (host processes in that cgroup) are translated there. They
    /// translate only sockets in the namespace whose cookie `set_config` wrote.
    pub fn attach_sockets(&mut self, cgroup_path: &Path) -> Result<(), DatapathError> {
        let cgroup = std::fs::File::open(cgroup_path)
            .map_err(|source| DatapathError::Cgroup { path: cgroup_path.to_path_buf(), source })?;
        for name in SOCKET_PROGRAMS {
            let program: &mut CgroupSockAddr = self
                .ebpf
                .program_mut(name)
                .and_then(|p| p.try_into().ok())
                .ok_or(DatapathError::MissingProgram { name })?;
            program.load().map_err(|source| DatapathError::LoadProgram { name, source })?;
            program.attach(&cgroup, CgroupAttachMode::Single).map_err(|source| {
                DatapathError::AttachCgroup { name, path: cgroup_path.to_path_buf(), source }
            })?;
        }
        Ok(())
    }

    /// Names of the interfaces the program is attached to.
    pub fn attached(&self) -> impl Iterator<Item = &str> {
        self.attached.keys().map(String::as_str)
    }

    /// Detaches from every interface. Dropping the `Datapath` does the same.
    pub fn detach_all(&mut self) {
        let xdp_attached = std::mem::take(&mut self.xdp_attached);
        if let Some(program) = self.ebpf.program_mut(XDP_PROGRAM).and_then(|p| <&mut Xdp>::try_from(p).ok()) {
            for (interface, link) in xdp_attached {
                if let Err(error) = program.detach(link) {
                    tracing::warn!(%interface, %error, "detaching XDP");
                }
            }
        }
        let attached = std::mem::take(&mut self.attached);
        for (interface, attachment) in attached {
            for (name, link) in
                [(attachment.ingress_program, attachment.ingress), (EGRESS_PROGRAM, attachment.egress)]
            {
                let Some(program) = self.classifier(name) else { continue };
                if let Err(error) = program.detach(link) {
                    tracing::warn!(%interface, %error, program = name, "detaching");
                }
            }
        }
    }
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

/// The conntrack collector's statistics pinned under `bpf_dir`, by name.
pub fn read_gc_stats(bpf_dir: &Path) -> Result<Vec<(&'static str, u64)>, DatapathError> {
    use lb_common::gc_stats;
    let data = MapData::from_pin(bpf_dir.join(map_names::CONNTRACK_GC)).map_err(DatapathError::Counters)?;
    let map = aya::maps::Map::from_map_data(data).map_err(DatapathError::Counters)?;
    let array: Array<MapData, u64> = Array::try_from(map).map_err(DatapathError::Counters)?;
    (0..gc_stats::COUNT)
        .map(|index| {
            Ok((gc_stats::NAMES[index as usize], array.get(&index, 0).map_err(DatapathError::Counters)?))
        })
        .collect()
}

/// What a pinned map must be for this build to reuse it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MapShape {
    pub map_type: MapType,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
}

/// The shape of each pinned map, as this build and `capacity` want it.
pub fn expected_shapes(capacity: &Capacity) -> [(&'static str, MapShape); 13] {
    use core::mem::size_of;
    use lb_common::*;
    let shape = |map_type, key: usize, value: usize, max_entries| MapShape {
        map_type,
        key_size: key as u32,
        value_size: value as u32,
        max_entries,
    };
    [
        (
            map_names::SERVICES,
            shape(MapType::Hash, size_of::<ServiceKey>(), size_of::<ServiceValue>(), capacity.service_slots),
        ),
        (map_names::BACKENDS, shape(MapType::Hash, 4, size_of::<Backend>(), capacity.backends)),
        (
            map_names::CONNTRACK,
            shape(MapType::Hash, size_of::<FlowKey>(), size_of::<ConntrackEntry>(), capacity.flows),
        ),
        (map_names::SERVICE_META, shape(MapType::Hash, 4, size_of::<ServiceMeta>(), capacity.frontends)),
        // LPM keys carry a 4-byte prefix length before the data.
        (
            map_names::SOURCE_RANGES,
            shape(MapType::LpmTrie, 4 + size_of::<SourceRangeKey>(), 1, lb_common::capacity::SOURCE_RANGES),
        ),
        (map_names::CONFIG, shape(MapType::Array, 4, size_of::<DatapathConfig>(), 1)),
        (
            map_names::SOCKETS,
            shape(
                MapType::LruHash,
                size_of::<SocketKey>(),
                size_of::<SocketFrontend>(),
                lb_common::capacity::SOCKETS,
            ),
        ),
        (map_names::COUNTERS, shape(MapType::PerCpuArray, 4, 8, counters::COUNT)),
        (
            map_names::AFFINITY,
            shape(
                MapType::LruHash,
                size_of::<AffinityKey>(),
                size_of::<AffinityValue>(),
                lb_common::capacity::AFFINITY,
            ),
        ),
        (
            map_names::FRAGMENTS,
            shape(
                MapType::LruHash,
                size_of::<FragmentKey>(),
                size_of::<FragmentValue>(),
                lb_common::capacity::FRAGMENTS,
            ),
        ),
        // Values are inner map IDs (file descriptors when written).
        (map_names::MAGLEV, shape(MapType::ArrayOfMaps, 4, 4, lb_common::capacity::MAGLEV_TABLES)),
        (map_names::CONNTRACK_GC, shape(MapType::Array, 4, 8, gc_stats::COUNT)),
        (map_names::CLOCK, shape(MapType::Array, 4, 8, 1)),
    ]
}

/// The shape of the map pinned at `path`, if there is one.
pub fn pinned_shape(path: &Path) -> Option<MapShape> {
    let info = MapData::from_pin(path).ok()?.info().ok()?;
    Some(MapShape {
        map_type: info.map_type().ok()?,
        key_size: info.key_size(),
        value_size: info.value_size(),
        max_entries: info.max_entries(),
    })
}

/// A pinned map is reused as it is, whatever this build or the flags ask for. When its shape
/// differs (a --max-* flag changed, or an older lb left a map whose entries have another
/// layout, count or type), the pin is removed so the map is created anew: the reconciler fills
/// the service maps again at once; tracked flows and counts of that map are lost.
fn unpin_if_reshaped(bpf_dir: &Path, name: &str, wanted: MapShape) {
    let path = bpf_dir.join(name);
    let Some(current) = pinned_shape(&path) else { return };
    if current != wanted {
        tracing::info!(map = name, ?current, ?wanted, "map shape changed: creating the map anew");
        if let Err(error) = std::fs::remove_file(&path) {
            tracing::warn!(map = name, %error, "removing the old pin; the old map stays");
        }
    }
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
