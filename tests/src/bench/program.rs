//! Program cost: lb_ingress's time per packet through BPF_PROG_TEST_RUN on each fixture, beside
//! the empty program's (lb_noop) on the same packet.
//!
//! A repeated test run works on one skb, so after the first rewrite every repeat would see a
//! packet to a pod. Each sample is therefore one run on a fresh packet (the kernel's own
//! timing of it), the median over many; the new-flow fixture forgets its flow before each run.

use std::net::Ipv4Addr;

use anyhow::{Context, Result};
use aya::maps::{HashMap, MapData};
use aya::programs::{SchedClassifier, TestRun, TestRunOptions};
use lb_common::{ConntrackEntry, FlowKey, map_names};
use lb_userspace::dataplane::datapath::{Datapath, INGRESS_PROGRAM};
use lb_userspace::dataplane::maps::BpfMaps;
use lb_userspace::dataplane::reconcile::Reconciler;
use lb_userspace::model::{DesiredState, Frontend, FrontendType, L4Addr, Protocol, ServicePortName};
use serde::Serialize;

use crate::PrivateBpfFs;
use crate::packet::{PacketSpec, TCP};

#[derive(Clone, Debug, Serialize)]
pub struct ProgramCost {
    pub fixture: &'static str,
    pub lb_ns: f64,
    pub empty_ns: f64,
    pub ratio: f64,
}

const CLIENT: (Ipv4Addr, u16) = (Ipv4Addr::new(10, 0, 0, 2), 40000);
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const POD: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 11);

fn run_once(datapath: &mut Datapath, program: &str, packet: &[u8]) -> Result<u64> {
    let program: &mut SchedClassifier =
        datapath.ebpf_mut().program_mut(program).context("program")?.try_into()?;
    let mut out = vec![0u8; packet.len() + 64];
    let result = program.test_run(TestRunOptions {
        data_in: Some(packet),
        data_out: Some(&mut out),
        ..Default::default()
    })?;
    Ok(result.duration.as_nanos() as u64)
}

fn median(mut samples: Vec<u64>) -> f64 {
    samples.sort_unstable();
    samples[samples.len() / 2] as f64
}

pub fn measure(runs: usize) -> Result<Vec<ProgramCost>> {
    let bpffs = PrivateBpfFs::new()?;
    let mut datapath = Datapath::load(&bpffs.path().join("lb"))?;
    let noop: &mut SchedClassifier =
        datapath.ebpf_mut().program_mut("lb_noop").context("lb_noop")?.try_into()?;
    noop.load()?;
    let maps = BpfMaps::from_ebpf(datapath.ebpf_mut())?;
    let mut reconciler = Reconciler::restore(maps)?;
    let mut desired = DesiredState::default();
    for (port, target, protocol) in [(80, 8080, Protocol::Tcp), (53, 5353, Protocol::Udp)] {
        let address = L4Addr { ip: VIP.into(), port, protocol };
        desired.frontends.insert(
            address.into(),
            Frontend {
                address,
                scope: Default::default(),
                frontend_type: FrontendType::ClusterIp,
                policy: Default::default(),
                service: ServicePortName {
                    namespace: "bench".into(),
                    name: "web".into(),
                    port: port.to_string(),
                },
                backends: vec![L4Addr { ip: POD.into(), port: target, protocol }],
                serving: vec![L4Addr { ip: POD.into(), port: target, protocol }],
                listed: vec![L4Addr { ip: POD.into(), port: target, protocol }],
            },
        );
    }
    anyhow::ensure!(reconciler.reconcile(&desired).errors.is_empty(), "programming the bench frontends");

    let syn = PacketSpec::tcp(CLIENT, (VIP, 80), 0x02).build();
    let ack = PacketSpec::tcp(CLIENT, (VIP, 80), 0x10).build();
    let reply = PacketSpec::tcp((POD, 8080), CLIENT, 0x12).build();
    let other = PacketSpec::tcp(CLIENT, (Ipv4Addr::new(10, 0, 9, 9), 80), 0x10).build();
    let udp = PacketSpec::udp(CLIENT, (VIP, 53)).build();
    let flow = FlowKey::new(CLIENT, (VIP, 80), TCP);
    let reply_key = FlowKey::new((POD, 8080), CLIENT, TCP);

    let mut results = Vec::new();
    let fixtures: [(&'static str, &[u8], bool); 5] = [
        ("new TCP flow (SYN to a ClusterIP)", &syn, true),
        ("tracked flow (ACK to a ClusterIP)", &ack, false),
        ("reply (pod to client)", &reply, false),
        ("not a service", &other, false),
        ("UDP to a ClusterIP, tracked", &udp, false),
    ];
    // Prime conntrack for the tracked fixtures.
    run_once(&mut datapath, INGRESS_PROGRAM, &syn)?;
    run_once(&mut datapath, INGRESS_PROGRAM, &udp)?;
    for (fixture, packet, forget_flow) in fixtures {
        let mut lb = Vec::with_capacity(runs);
        let mut empty = Vec::with_capacity(runs);
        for _ in 0..runs {
            if forget_flow {
                let ebpf = datapath.ebpf_mut();
                let mut conntrack: HashMap<&mut MapData, FlowKey, ConntrackEntry> =
                    HashMap::try_from(ebpf.map_mut(map_names::CONNTRACK).context("conntrack")?)?;
                let _ = conntrack.remove(&flow);
                let _ = conntrack.remove(&reply_key);
            }
            lb.push(run_once(&mut datapath, INGRESS_PROGRAM, packet)?);
            empty.push(run_once(&mut datapath, "lb_noop", packet)?);
        }
        let (lb_ns, empty_ns) = (median(lb), median(empty));
        results.push(ProgramCost { fixture, lb_ns, empty_ns, ratio: lb_ns / empty_ns.max(1.0) });
    }
    Ok(results)
}
