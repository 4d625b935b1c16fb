//! The `lb` command.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use lb_userspace::convert::{EndpointsSource, ProxyConfig};
use lb_userspace::node_addresses::NodeAddressConfig;
use lb_userspace::{
    datapath,
    maps::{BpfMaps, ServiceMaps},
    run, status,
};

const DEFAULT_BPF_DIR: &str = "/sys/fs/bpf/lb";

#[derive(Parser)]
#[command(name = "lb", version, about = "A kube-proxy replacement whose data plane is eBPF")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
#[expect(clippy::large_enum_variant, reason = "parsed once at start")]
enum Command {
    /// Load the data path and keep it in sync with Services and their endpoints.
    Run(RunArgs),
    /// Show the frontends and backends programmed in the pinned maps.
    Services {
        #[arg(long, default_value = DEFAULT_BPF_DIR)]
        bpf_dir: PathBuf,
    },
    /// Show the data path's packet counters.
    Counters {
        #[arg(long, default_value = DEFAULT_BPF_DIR)]
        bpf_dir: PathBuf,
    },
    /// Remove the pinned maps (run after stopping lb to leave nothing behind).
    Cleanup {
        #[arg(long, default_value = DEFAULT_BPF_DIR)]
        bpf_dir: PathBuf,
    },
}

#[derive(clap::Args)]
struct RunArgs {
    /// Read Services, EndpointSlices, Endpoints and Nodes from this directory of Kubernetes YAML
    /// (and watch it) instead of the API server.
    #[arg(long, conflicts_with = "kubeconfig")]
    manifests: Option<PathBuf>,
    /// Kubeconfig for the API server; without it (and without --manifests) lb uses the
    /// in-cluster service account.
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// Interfaces to translate traffic on (their ingress), comma separated: names, which must
    /// exist, and glob patterns (`veth*,cali*,eth0`), attached as matching interfaces appear.
    #[arg(long, value_delimiter = ',', required = true)]
    interfaces: Vec<String>,
    /// The node's uplinks, comma separated (they must exist): attached like --interfaces, and
    /// the first address on them is what external Cluster-policy traffic is source-NATed to.
    #[arg(long, value_delimiter = ',')]
    external_interfaces: Vec<String>,
    /// How the XDP program is attached to the external interfaces: in the driver (native), in
    /// the stack's generic hook, or not at all. Where it cannot attach, TC does all the work.
    #[arg(long, value_enum, default_value = "native")]
    xdp: XdpArg,
    /// Node addresses that take NodePort traffic, as CIDRs, comma separated (kube-proxy's
    /// flag); by default every non-loopback address of the node.
    #[arg(long, value_delimiter = ',')]
    nodeport_addresses: Vec<ipnet::Ipv4Net>,
    /// The cgroup (v2) whose processes' connections to frontends are load-balanced at the
    /// socket (the node's own traffic: host processes, hostNetwork pods); by default the root
    /// of the cgroup v2 mount. Empty turns socket load balancing off.
    #[arg(long)]
    cgroup_path: Option<String>,
    /// Where the maps are pinned (on a bpffs mount).
    #[arg(long, default_value = DEFAULT_BPF_DIR)]
    bpf_dir: PathBuf,
    /// This node's name, if not the host name (for Local traffic policies and topology).
    #[arg(long)]
    hostname_override: Option<String>,
    /// Also handle Services labelled service.kubernetes.io/service-proxy-name=<this>.
    #[arg(long)]
    service_proxy_name: Option<String>,
    /// Where endpoints come from: EndpointSlices, or v1 Endpoints for clusters and tools
    /// that only publish those.
    #[arg(long, value_enum, default_value = "endpointslices")]
    endpoints_api: EndpointsApi,
    /// Least time between syncs once a burst of two is used up (kube-proxy's flag).
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    min_sync_period: Duration,
    /// How often to re-read, repair and prune the maps; health fails after twice this.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    sync_period: Duration,
    /// Address for /healthz and /livez (kube-proxy's port); empty to disable.
    #[arg(long, default_value = "0.0.0.0:10256")]
    healthz_bind_address: String,
    /// Size of the services map: frontends x (1 + their backends).
    #[arg(long, default_value_t = lb_common::capacity::SERVICES)]
    max_service_slots: u32,
    /// Most frontends (Service ports x their addresses); each has a metadata entry.
    #[arg(long, default_value_t = lb_common::capacity::SERVICE_META)]
    max_frontends: u32,
    /// Size of the backends map: distinct pod address:port pairs.
    #[arg(long, default_value_t = lb_common::capacity::BACKENDS)]
    max_backends: u32,
    /// Size of the conntrack map: two entries per tracked flow (least recently used entries
    /// are evicted beyond it).
    #[arg(long, default_value_t = lb_common::capacity::CONNTRACK)]
    max_flows: u32,
    /// Manifests mode: where Services without a clusterIP get one (the API server's flag).
    #[arg(long, default_value = "10.96.0.0/12")]
    service_cluster_ip_range: ipnet::Ipv4Net,
    /// Manifests mode: where lb remembers the ClusterIPs it allocated.
    #[arg(long, default_value = "/var/lib/lb")]
    state_dir: PathBuf,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum XdpArg {
    Native,
    Generic,
    Off,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum EndpointsApi {
    Endpointslices,
    Endpoints,
}

fn node_name(hostname_override: Option<String>) -> Option<String> {
    let name =
        hostname_override.or_else(|| nix::unistd::gethostname().ok().and_then(|h| h.into_string().ok()))?;
    // kube-proxy lower-cases the host name: node names are lower case.
    Some(name.trim().to_lowercase()).filter(|n| !n.is_empty())
}

fn run_options(args: RunArgs) -> Result<run::RunOptions> {
    let source = match args.manifests {
        Some(dir) => run::SourceOptions::Manifests {
            dir,
            cluster_ip_range: args.service_cluster_ip_range,
            state_file: args.state_dir.join("cluster-ips.json"),
        },
        None => run::SourceOptions::Kubernetes { kubeconfig: args.kubeconfig },
    };
    let cgroup_path = match args.cgroup_path {
        Some(path) if path.is_empty() => None,
        Some(path) => Some(PathBuf::from(path)),
        None => {
            let mount = datapath::cgroup2_mount();
            if mount.is_none() {
                tracing::warn!(
                    "no cgroup v2 mount: the node's own connections to Services are not load-balanced"
                );
            }
            mount
        }
    };
    let healthz_bind_address = match args.healthz_bind_address.as_str() {
        "" => None,
        address => Some(address.parse().with_context(|| format!("--healthz-bind-address {address:?}"))?),
    };
    Ok(run::RunOptions {
        source,
        interfaces: args.interfaces,
        bpf_dir: args.bpf_dir,
        proxy: ProxyConfig {
            node_name: node_name(args.hostname_override),
            service_proxy_name: args.service_proxy_name,
            endpoints_source: match args.endpoints_api {
                EndpointsApi::Endpointslices => EndpointsSource::EndpointSlices,
                EndpointsApi::Endpoints => EndpointsSource::Endpoints,
            },
            node_addresses: Vec::new(),
        },
        capacity: datapath::Capacity {
            service_slots: args.max_service_slots,
            frontends: args.max_frontends,
            backends: args.max_backends,
            flows: args.max_flows,
        },
        min_sync_period: args.min_sync_period,
        sync_period: args.sync_period,
        healthz_bind_address,
        node_addresses: NodeAddressConfig {
            nodeport_ranges: args.nodeport_addresses,
            external_interfaces: args.external_interfaces,
        },
        cgroup_path,
        xdp: match args.xdp {
            XdpArg::Native => datapath::XdpAttach::Native,
            XdpArg::Generic => datapath::XdpAttach::Generic,
            XdpArg::Off => datapath::XdpAttach::Off,
        },
    })
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("LB_LOG").unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    match Cli::parse().command {
        Command::Run(args) => {
            let options = run_options(args)?;
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            runtime.block_on(run::run(options))
        }
        Command::Services { bpf_dir } => {
            let snapshot = BpfMaps::from_pins(&bpf_dir)?.snapshot()?;
            print!("{}", status::services_table(&snapshot));
            Ok(())
        }
        Command::Counters { bpf_dir } => {
            for (name, value) in datapath::read_counters(&bpf_dir)? {
                println!("{name:28} {value}");
            }
            Ok(())
        }
        Command::Cleanup { bpf_dir } => {
            for name in lb_common::map_names::PINNED {
                let path = bpf_dir.join(name);
                match std::fs::remove_file(&path) {
                    Ok(()) => {}
                    Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
                    Err(error) => return Err(error).with_context(|| format!("removing {}", path.display())),
                }
            }
            match std::fs::remove_dir(&bpf_dir) {
                Err(error) if error.kind() != std::io::ErrorKind::NotFound => {
                    Err(error).with_context(|| format!("removing {}", bpf_dir.display()))
                }
                _ => Ok(()),
            }
        }
    }
}
