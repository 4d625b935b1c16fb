//! The BPF_PROG_TEST_RUN harness of the packet fixtures: the real data path loaded into a
//! private bpffs and an empty network namespace of the test's own, its maps programmed by the
//! real reconciler, and packets run through a program with their verdict, output and counters
//! checked.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;

use aya::maps::{HashMap, MapData, PerCpuArray};
use aya::programs::{SchedClassifier, TestRun, TestRunOptions, Xdp};
use lb_common::{ConntrackEntry, DatapathConfig, DatapathConfig6, FlowKey, counters, map_names};
use lb_userspace::dataplane::datapath::{
    Capacity, Datapath, INGRESS_EXTERNAL_PROGRAM, INGRESS_PROGRAM, XDP_PROGRAM,
};
use lb_userspace::dataplane::explain;
use lb_userspace::dataplane::maps::BpfMaps;
use lb_userspace::dataplane::reconcile::Reconciler;
use lb_userspace::model::{
    DesiredState, Frontend, FrontendPolicy, FrontendType, L4Addr, Protocol, ServicePortName,
};

use crate::{NetNs, PrivateBpfFs, packet, require_root};

pub const PASS: u32 = -1i32 as u32; // TC_ACT_UNSPEC: continue (TCX_NEXT)
pub const DROP: u32 = 2; // TC_ACT_SHOT
pub const REDIRECT: u32 = 7; // TC_ACT_REDIRECT

pub const CLIENT: (Ipv4Addr, u16) = (Ipv4Addr::new(10, 0, 1, 2), 40000);
pub const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);

/// The IPv4 address of a model address the IPv4 fixtures made.
pub fn ipv4(ip: std::net::IpAddr) -> Ipv4Addr {
    match ip {
        std::net::IpAddr::V4(ip) => ip,
        std::net::IpAddr::V6(ip) => panic!("{ip} is not an IPv4 fixture address"),
    }
}

pub fn backend(last: u8, port: u16, protocol: Protocol) -> L4Addr {
    L4Addr { ip: Ipv4Addr::new(10, 244, 1, last).into(), port, protocol }
}

pub fn frontend(port: u16, protocol: Protocol, backends: Vec<L4Addr>) -> Frontend {
    Frontend {
        address: L4Addr { ip: VIP.into(), port, protocol },
        scope: Default::default(),
        frontend_type: FrontendType::ClusterIp,
        policy: FrontendPolicy::default(),
        service: ServicePortName {
            namespace: "default".into(),
            name: "web".into(),
            port: format!("p{port}"),
        },
        serving: backends.clone(),
        listed: backends.clone(),
        backends,
    }
}

/// XDP's actions, as the program returns them.
pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;

/// An interface's MAC address, from this thread's namespace (sysfs shows the mounter's).
pub fn mac_of(interface: &str) -> [u8; 6] {
    nix::ifaddrs::getifaddrs()
        .unwrap()
        .filter(|entry| entry.interface_name == interface)
        .find_map(|entry| entry.address?.as_link_addr()?.addr())
        .expect("interface has a MAC address")
}

pub struct Harness {
    pub datapath: Datapath,
    pub reconciler: Reconciler<BpfMaps>,
    /// The program `run` and `expect` use (`lb_ingress` unless changed).
    pub program: &'static str,
    /// Packets whose outcome was held against what `lb explain` said of them.
    pub explained: usize,
    config: DatapathConfig,
    bpffs: PrivateBpfFs,
    _netns: NetNs,
}

impl Default for Harness {
    fn default() -> Self {
        Self::new()
    }
}

impl Harness {
    pub fn new() -> Self {
        Self::with_capacity(&Capacity::default())
    }

    /// A harness whose maps have these sizes.
    pub fn with_capacity(capacity: &Capacity) -> Self {
        require_root();
        // Test runs happen in the caller's namespace, whose routes the data path's FIB
        // lookups see: an empty namespace of our own (forwarding off) makes them predictable.
        let netns = NetNs::new(crate::unique("prog")).expect("netns");
        let file = std::fs::File::open(netns.path()).expect("netns file");
        nix::sched::setns(std::os::fd::AsFd::as_fd(&file), nix::sched::CloneFlags::CLONE_NEWNET)
            .expect("joining the test's netns");
        let bpffs = PrivateBpfFs::new().expect("private bpffs");
        let mut datapath = Datapath::load_with(&bpffs.path().join("lb"), capacity).expect("load datapath");
        let maps = BpfMaps::from_ebpf(datapath.ebpf_mut()).expect("service maps");
        let reconciler = Reconciler::restore(maps).expect("restore");
        let config = DatapathConfig {
            snat_port_min: lb_common::SNAT_PORT_MIN,
            snat_port_max: lb_common::SNAT_PORT_MAX,
            maglev_table_size: lb_common::MAGLEV_TABLE_SIZE,
            ..Default::default()
        };
        let mut harness = Self {
            datapath,
            reconciler,
            program: INGRESS_PROGRAM,
            explained: 0,
            config,
            bpffs,
            _netns: netns,
        };
        harness.write_config();
        harness
    }

    /// Where the maps are pinned.
    pub fn bpf_dir(&self) -> PathBuf {
        self.bpffs.path().join("lb")
    }

    fn write_config(&mut self) {
        self.datapath.set_config(self.config).expect("datapath config");
    }

    pub fn program(&mut self, frontends: Vec<Frontend>) {
        let desired = DesiredState {
            frontends: frontends.into_iter().map(|f| (f.key(), f)).collect(),
            ..Default::default()
        };
        let report = self.reconciler.reconcile(&desired);
        assert!(report.errors.is_empty(), "{:?}", report.errors);
    }

    /// Runs a packet through `program`: its verdict and output frame. A packet `lb explain` can
    /// be asked about (see `explained_by`) is asked about first, and what explain said is held
    /// against what the program then did.
    pub fn run(&mut self, input: &[u8]) -> (u32, Vec<u8>) {
        let explained = self.explain(input);
        let before = explained.is_some().then(|| self.counters());
        let (verdict, output) = self.run_program(input);
        if let (Some((flow, explanation)), Some(before)) = (explained, before) {
            let moved = moved_counters(&before, &self.counters());
            let snat_ports = self.config.snat_port_min..=self.config.snat_port_max;
            explained_by(&flow, &explanation, &moved, &output, snat_ports);
            self.explained += 1;
        }
        (verdict, output)
    }

    /// What `lb explain` says of `input`'s flow, from the pinned maps as the CLI reads them:
    /// for a TC ingress program and a well-formed TCP, UDP or SCTP packet (not a SYN of a
    /// tracked flow, which explain does not describe: it may reopen the flow).
    fn explain(&self, input: &[u8]) -> Option<(packet::FrameFlow, explain::Explanation)> {
        let external = match self.program {
            INGRESS_PROGRAM => false,
            INGRESS_EXTERNAL_PROGRAM => true,
            _ => return None,
        };
        let flow = packet::flow_of(input)?;
        let query = explain::Query {
            source: flow.source,
            destination: flow.destination,
            protocol: Protocol::from_number(flow.protocol)?,
            external,
        };
        let (snapshot, facts) = explain::read_pinned(&self.bpf_dir(), &query).expect("lb explain's reads");
        if facts.tracked.is_some() && flow.tcp_flags & packet::TCP_SYN != 0 {
            return None;
        }
        Some((flow, explain::explain(&query, &snapshot, &facts)))
    }

    fn run_program(&mut self, input: &[u8]) -> (u32, Vec<u8>) {
        let program: &mut SchedClassifier =
            self.datapath.ebpf_mut().program_mut(self.program).unwrap().try_into().unwrap();
        let mut out = vec![0u8; input.len() + 512];
        let result = program
            .test_run(TestRunOptions { data_in: Some(input), data_out: Some(&mut out), ..Default::default() })
            .expect("BPF_PROG_TEST_RUN");
        out.truncate(result.data_size_out as usize);
        (result.return_value, out)
    }

    pub fn counters(&mut self) -> Vec<u64> {
        let map = self.datapath.ebpf_mut().map(map_names::COUNTERS).unwrap();
        let array = PerCpuArray::<&MapData, u64>::try_from(map).unwrap();
        let mut values: Vec<u64> =
            (0..counters::COUNT).map(|i| array.get(&i, 0).unwrap().iter().sum()).collect();
        counters::derive_packets(&mut values);
        values
    }

    /// Runs a packet and checks verdict, output bytes and that exactly `counter` moved
    /// (besides the packet counter).
    pub fn expect(&mut self, what: &str, input: &[u8], verdict: u32, output: &[u8], counter: u32) {
        self.expect_counters(what, input, verdict, output, &[counter]);
    }

    /// `expect`, for packets that also move event counters (`CONNTRACK_*`).
    pub fn expect_counters(&mut self, what: &str, input: &[u8], verdict: u32, output: &[u8], moved: &[u32]) {
        let before = self.counters();
        let (got_verdict, got_output) = self.run(input);
        let after = self.counters();
        assert_eq!(got_verdict, verdict, "{what}: verdict");
        assert_eq!(got_output, output, "{what}: output packet");
        let got = moved_counters(&before, &after);
        let mut want: Vec<&str> = moved.iter().map(|c| counters::NAMES[*c as usize]).collect();
        want.sort_by_key(|name| counters::NAMES.iter().position(|n| n == name));
        assert_eq!(got, want, "{what}: counters that moved");
        assert_eq!(after[0], before[0] + 1, "{what}: packet counter");
    }

    /// Runs the XDP program on `input` as if it arrived on `ingress` (an interface index):
    /// its action and output frame.
    pub fn run_xdp(&mut self, ingress: u32, input: &[u8]) -> (u32, Vec<u8>) {
        let program: &mut Xdp =
            self.datapath.ebpf_mut().program_mut(XDP_PROGRAM).unwrap().try_into().unwrap();
        // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index, egress_ifindex.
        let mut ctx = [0u8; 24];
        ctx[4..8].copy_from_slice(&(input.len() as u32).to_ne_bytes());
        ctx[12..16].copy_from_slice(&ingress.to_ne_bytes());
        let mut out = vec![0u8; 512];
        let result = program
            .test_run(TestRunOptions {
                data_in: Some(input),
                data_out: Some(&mut out),
                ctx_in: Some(&ctx),
                ..Default::default()
            })
            .expect("BPF_PROG_TEST_RUN (XDP)");
        out.truncate(result.data_size_out as usize);
        (result.return_value, out)
    }

    pub fn set_snat_address6(&mut self, address: Ipv6Addr) {
        self.datapath
            .set_config6(DatapathConfig6 { snat_address: address.into() })
            .expect("IPv6 datapath config");
    }

    pub fn set_snat_address(&mut self, address: Ipv4Addr) {
        self.config.snat_address = u32::from(address).to_be();
        self.write_config();
    }

    /// Source NAT uses only these ports (inclusive).
    pub fn set_snat_ports(&mut self, min: u16, max: u16) {
        (self.config.snat_port_min, self.config.snat_port_max) = (min, max);
        self.write_config();
    }

    pub fn conntrack(&mut self) -> HashMap<&mut MapData, FlowKey, ConntrackEntry> {
        HashMap::try_from(self.datapath.ebpf_mut().map_mut(map_names::CONNTRACK).unwrap()).unwrap()
    }
}

/// The counters (by name, the packet counter aside) that differ between two readings.
fn moved_counters(before: &[u64], after: &[u64]) -> Vec<&'static str> {
    (1..counters::COUNT as usize).filter(|i| after[*i] != before[*i]).map(|i| counters::NAMES[i]).collect()
}

/// Outcomes `lb explain` cannot foresee from the maps and the 5-tuple, each with the verdict it
/// gives instead: the conntrack table being full (explain does not count it), every
/// source-NAT port being taken, and a reject or reset that cannot be built (the packet is
/// itself a RST, or carries IP options).
const UNFORESEEN: [(&str, &str); 4] = [
    ("drop_conntrack_full", "forward_new_flow"),
    ("drop_snat_failed", "forward_new_flow"),
    ("drop_reject_failed", "reject_no_backend"),
    ("drop_reject_failed", "reset_backend_gone"),
];

/// Checks that the program did what `lb explain` said of the packet: the verdict counter it
/// named moved, and the packet left with the addresses and ports explain gave.
fn explained_by(
    flow: &packet::FrameFlow,
    explanation: &explain::Explanation,
    moved: &[&str],
    output: &[u8],
    snat_ports: std::ops::RangeInclusive<u16>,
) {
    let said = || format!("lb explain said of {flow:?}:\n{}", explain::render(explanation));
    if !moved.contains(&explanation.counter) {
        let unforeseen = UNFORESEEN
            .iter()
            .any(|(outcome, instead)| moved.contains(outcome) && explanation.counter == *instead);
        assert!(unforeseen, "the program counted {moved:?}; {}", said());
        return;
    }
    let Some(translated) = &explanation.translated else { return };
    let out = packet::flow_of(output).unwrap_or_else(|| panic!("no flow in the output packet; {}", said()));
    let source = if translated.contains(explain::FREE_PORT) {
        // A port of the flow's own: not the client's (its reply tuple was taken), and for
        // source NAT one of the configured range.
        let port = out.source.port();
        if out.source.ip() == flow.source.ip() {
            assert_ne!(port, flow.source.port(), "{}", said());
        } else {
            assert!(snat_ports.contains(&port), "source-NAT port {port} outside {snat_ports:?}; {}", said());
        }
        explain::address_and_port(out.source.ip(), explain::FREE_PORT)
    } else {
        out.source.to_string()
    };
    let protocol = Protocol::from_number(out.protocol).unwrap();
    assert_eq!(*translated, format!("{source} -> {}/{protocol}", out.destination), "{}", said());
}
