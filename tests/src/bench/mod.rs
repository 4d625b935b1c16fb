//! `cargo xtask bench`: lb against no load balancer and against kube-proxy's iptables and
//! nftables rule layouts, on the same machine in the same run. Everything runs in network
//! namespaces joined only to each other.

pub mod controlplane;
pub mod datapath;
pub mod heap;
pub mod loadgen;
pub mod plots;
pub mod program;
pub mod report;
pub mod rules;
pub mod traffic_cost;

use std::net::Ipv4Addr;
use std::time::Duration;

/// How much to measure.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Plan {
    pub quick: bool,
    /// Service counts for the data-path comparison.
    pub datapath_sizes: Vec<usize>,
    pub rounds: usize,
    pub workload_duration: Duration,
    /// Single test runs per program-cost fixture.
    pub program_runs: usize,
    /// Service counts (x 10 endpoints) for the control-plane measurements.
    pub sync_sizes: Vec<usize>,
    /// A mode whose rules take longer than this to load is skipped at that size.
    pub rule_load_bound: Duration,
    /// Measure kube-proxy's rule layouts too (off only when investigating lb alone).
    pub kube_proxy_modes: bool,
}

impl Plan {
    pub fn quick() -> Self {
        Self {
            quick: true,
            datapath_sizes: vec![1, 1_000],
            rounds: 2,
            workload_duration: Duration::from_secs(1),
            program_runs: 3_000,
            sync_sizes: vec![1_000, 10_000],
            rule_load_bound: Duration::from_secs(60),
            kube_proxy_modes: true,
        }
    }

    pub fn full() -> Self {
        Self {
            quick: false,
            datapath_sizes: vec![1, 1_000, 10_000, 100_000],
            rounds: 3,
            workload_duration: Duration::from_secs(3),
            program_runs: 20_000,
            sync_sizes: vec![1_000, 10_000, 100_000],
            rule_load_bound: Duration::from_secs(120),
            kube_proxy_modes: true,
        }
    }
}

/// The i-th benchmark ClusterIP (10.96.0.0/12 holds a million).
pub fn cluster_ip(index: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 1)) + index as u32)
}

/// The i-th synthetic endpoint address, outside the playground's pods.
pub fn synthetic_endpoint(index: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 128, 0, 1)) + index as u32)
}
