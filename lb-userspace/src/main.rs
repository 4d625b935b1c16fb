//! The `lb` command.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use lb_userspace::convert::{EndpointsSource, LbAlgorithm, ProxyConfig};
use lb_userspace::daemon::run;
use lb_userspace::dataplane::conntrack::{self, PinnedFlowTables, Timeouts};
use lb_userspace::dataplane::maps::{BpfMaps, ServiceMaps};
use lb_userspace::dataplane::node_addresses::NodeAddressConfig;
use lb_userspace::dataplane::{datapath, status};

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
    /// Show the data path's packet counters and the conntrack collector's statistics.
    Counters {
        #[arg(long, default_value = DEFAULT_BPF_DIR)]
        bpf_dir: PathBuf,
    },
    /// List the tracked flows: client, frontend, backend, protocol, state, age.
    Conntrack {
        /// Only flows of this Service (`namespace/name`, or `namespace/name:port`).
        #[arg(long)]
        service: Option<String>,
        /// Output format.
        #[arg(long, short = 'o', value_enum, default_value = "table")]
        output: OutputFormat,
        #[arg(long, default_value = DEFAULT_BPF_DIR)]
        bpf_dir: PathBuf,
    },
    /// Detach lb's programs and remove its pinned links and maps: what stays in the kernel
    /// while no lb runs (run after stopping lb to leave nothing behind).
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
    /// Least time between syncs once a burst of two is used up (kube-proxy's flag and
    /// meaning). kube-proxy defaults to 1s because its sync rewrites every rule; lb's costs
    /// what the change touches (microseconds), so its default only coalesces bursts.
    #[arg(long, default_value = "10ms", value_parser = humantime::parse_duration)]
    min_sync_period: Duration,
    /// How often to re-read, repair and prune the maps (read away from the event loop,
    /// compared a chunk at a time); health fails after twice this.
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
    /// Size of the conntrack map: two entries per tracked flow. A full table refuses new flows
    /// (counted as drop_conntrack_full) and never evicts a live one.
    #[arg(long, default_value_t = lb_common::capacity::CONNTRACK)]
    max_flows: u32,
    /// Idle timeout of established TCP flows (kube-proxy's flag and default).
    #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
    conntrack_tcp_timeout_established: Duration,
    /// Idle timeout of TCP flows one side has closed (kube-proxy's flag and default); also how
    /// long a flow whose backend is gone waits for its client's next packet, answered by a RST.
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    conntrack_tcp_timeout_close_wait: Duration,
    /// Idle timeout of UDP flows whose backend never answered (the kernel's default).
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    conntrack_udp_timeout: Duration,
    /// Idle timeout of UDP flows with traffic both ways (the kernel's default).
    #[arg(long, default_value = "120s", value_parser = humantime::parse_duration)]
    conntrack_udp_timeout_stream: Duration,
    /// How often the conntrack collector passes over the table (it also passes within a second
    /// of a change to the Services).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    conntrack_gc_interval: Duration,
    /// How new flows pick a backend: `maglev` (consistent hashing for NodePort, LoadBalancer
    /// and externalIP frontends; ClusterIPs hash over their backends) or `random` (hash over
    /// the backends everywhere).
    #[arg(long, value_enum, default_value = "maglev")]
    lb_algorithm: LbAlgorithmArg,
    /// Positions in each Maglev table: a prime, about 100 times the largest backend count for
    /// an even spread; each table costs 4 bytes per position (64 KiB at the default).
    #[arg(long, default_value_t = lb_userspace::dataplane::maglev::DEFAULT_TABLE_SIZE, value_parser = prime_table_size)]
    maglev_table_size: u32,
    /// Manifests mode: where Services without a clusterIP get one (the API server's flag).
    #[arg(long, default_value = "10.96.0.0/12")]
    service_cluster_ip_range: ipnet::Ipv4Net,
    /// Manifests mode: where lb remembers the ClusterIPs it allocated.
    #[arg(long, default_value = "/var/lib/lb")]
    state_dir: PathBuf,
    /// Tests only: load programs whose code differs from the default build's (1), to test an
    /// upgrade that swaps programs in place.
    #[arg(long, default_value_t = 0, hide = true)]
    test_program_variant: u32,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum XdpArg {
    Native,
    Generic,
    Off,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LbAlgorithmArg {
    Maglev,
    Random,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum OutputFormat {
    Table,
    Json,
}

fn prime_table_size(value: &str) -> Result<u32, String> {
    let size: u32 = value.parse().map_err(|e| format!("{value:?} is not a number: {e}"))?;
    if !(3..=(1 << 20)).contains(&size) || !lb_userspace::dataplane::maglev::is_prime(size) {
        return Err(format!("{size} is not a prime between 3 and 1048576 (try 16381, 65521 or 1021)"));
    }
    Ok(size)
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
            lb_algorithm: match args.lb_algorithm {
                LbAlgorithmArg::Maglev => LbAlgorithm::Maglev,
                LbAlgorithmArg::Random => LbAlgorithm::Random,
            },
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
        conntrack_timeouts: Timeouts {
            tcp_established: args.conntrack_tcp_timeout_established,
            tcp_closing: args.conntrack_tcp_timeout_close_wait,
            udp: args.conntrack_udp_timeout,
            udp_stream: args.conntrack_udp_timeout_stream,
            ..Timeouts::default()
        },
        conntrack_gc_interval: args.conntrack_gc_interval,
        maglev_table_size: args.maglev_table_size,
        program_variant: args.test_program_variant,
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
                println!("{name:36} {value}");
            }
            for (name, value) in datapath::read_stats(&bpf_dir)? {
                println!("{name:36} {value}");
            }
            Ok(())
        }
        Command::Conntrack { service, output, bpf_dir } => {
            let tables = PinnedFlowTables::open(&bpf_dir)?;
            let names: std::collections::BTreeMap<u32, String> = BpfMaps::from_pins(&bpf_dir)?
                .snapshot()?
                .service_meta
                .iter()
                .map(|(id, meta)| (*id, meta.name().to_string()))
                .collect();
            let mut rows = conntrack::flows(&tables, &names, conntrack::monotonic_ns())
                .context("reading the conntrack table")?;
            if let Some(wanted) = &service {
                rows.retain(|row| {
                    row.service.as_deref().is_some_and(|name| {
                        name == wanted
                            || name.strip_prefix(wanted.as_str()).is_some_and(|rest| rest.starts_with(':'))
                    })
                });
            }
            match output {
                OutputFormat::Table => print!("{}", conntrack::flows_table(&rows)),
                OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&rows)?),
            }
            Ok(())
        }
        Command::Cleanup { bpf_dir } => {
            // Links first: once no program is attached, no one reads the maps being removed.
            let links = datapath::remove_links(&bpf_dir)
                .with_context(|| format!("removing the links pinned under {}", bpf_dir.display()))?;
            if links > 0 {
                tracing::info!(links, "detached lb's programs");
            }
            // With the maps of a migration a start did not finish.
            let migrating = |name: &str| format!("{name}{}", lb_common::layout::MIGRATING_SUFFIX);
            for name in lb_common::map_names::PINNED {
                for path in [bpf_dir.join(name), bpf_dir.join(migrating(name))] {
                    match std::fs::remove_file(&path) {
                        Ok(()) => {}
                        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
                        Err(error) => {
                            return Err(error).with_context(|| format!("removing {}", path.display()));
                        }
                    }
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
