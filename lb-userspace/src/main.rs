//! The `lb` command.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use lb_userspace::convert::{EndpointsSource, LbAlgorithm, ProxyConfig};
use lb_userspace::daemon::{preflight, run};
use lb_userspace::dataplane::conntrack::{self, PinnedFlowTables, Timeouts};
use lb_userspace::dataplane::maps::{BpfMaps, ServiceMaps};
use lb_userspace::dataplane::node_addresses::NodeAddressConfig;
use lb_userspace::dataplane::reconcile::ProgrammedState;
use lb_userspace::dataplane::{datapath, explain, status};
use lb_userspace::model::Protocol;

const DEFAULT_BPF_DIR: &str = "/sys/fs/bpf/lb";

#[derive(Parser)]
#[command(
    name = "lb",
    version,
    about = "A kube-proxy replacement whose data plane is eBPF",
    after_help = "Exit codes: 0 done, 1 failed, 2 bad flags or configuration, 3 not root (or missing \
                  capabilities), 4 the kernel or node lacks a feature (BPF, bpffs, cgroup v2), 5 another lb \
                  runs with the same --bpf-dir.\nLogging: RUST_LOG (or LB_LOG) sets the level, as \
                  `info` or `lb_userspace=debug`."
)]
struct Cli {
    /// Log lines as text or as JSON objects (one per line).
    #[arg(long, global = true, value_enum, default_value = "text")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
#[expect(clippy::large_enum_variant, reason = "parsed once at start")]
enum Command {
    /// Load the data path and keep it in sync with Services and their endpoints.
    Run(RunArgs),
    /// Show the frontends and backends programmed in the pinned maps.
    Services {
        /// Output format (`table` shows up to three backends a frontend, `wide` every one).
        #[arg(long, short = 'o', value_enum, default_value = "table")]
        output: OutputFormat,
        /// Where the running (or stopped) lb pinned its maps: its `lb run --bpf-dir`.
        #[arg(long, default_value = DEFAULT_BPF_DIR)]
        bpf_dir: PathBuf,
    },
    /// Show each Service's programmed endpoints as `kubectl get endpoints` does; with --watch,
    /// a line each time a Service's endpoints change in the maps.
    Endpoints {
        /// Only this Service (`namespace/name`).
        service: Option<String>,
        /// After the list, print a line whenever a Service's programmed endpoints change.
        #[arg(long, short = 'w')]
        watch: bool,
        /// How often --watch reads the maps.
        #[arg(long, default_value = "500ms", value_parser = humantime::parse_duration)]
        watch_interval: Duration,
        /// Output format (`wide` lists every endpoint; `json` one object per line with --watch).
        #[arg(long, short = 'o', value_enum, default_value = "table")]
        output: OutputFormat,
        /// Where the running (or stopped) lb pinned its maps: its `lb run --bpf-dir`.
        #[arg(long, default_value = DEFAULT_BPF_DIR)]
        bpf_dir: PathBuf,
    },
    /// Show per-Service traffic (new flows, packets and bytes each way) and the data path's
    /// verdict and drop counters.
    Stats {
        /// Output format.
        #[arg(long, short = 'o', value_enum, default_value = "table")]
        output: OutputFormat,
        /// Where the running (or stopped) lb pinned its maps: its `lb run --bpf-dir`.
        #[arg(long, default_value = DEFAULT_BPF_DIR)]
        bpf_dir: PathBuf,
    },
    /// Where a packet goes and why: the frontend it matches, the eligible endpoints, the backend
    /// its flow gets (tracked flow, affinity, Maglev position or hash slot) and the packet after
    /// translation.
    Explain {
        /// The packet's source, `IP:PORT` (`[IPv6]:PORT` for IPv6).
        source: std::net::SocketAddr,
        /// Its destination, `IP:PORT/PROTO` (`/TCP` when left out).
        destination: String,
        /// The packet arrives on an external interface (Local external policies apply).
        #[arg(long)]
        external: bool,
        /// Read the objects from this directory too, to say why the endpoints that get no new
        /// flows get none (not ready, terminating, another node under a Local policy, topology).
        #[arg(long)]
        manifests: Option<PathBuf>,
        /// This node's name, if not the host name (for Local policies, with --manifests).
        #[arg(long)]
        hostname_override: Option<String>,
        /// Output format.
        #[arg(long, short = 'o', value_enum, default_value = "table")]
        output: OutputFormat,
        /// Where the running (or stopped) lb pinned its maps: its `lb run --bpf-dir`.
        #[arg(long, default_value = DEFAULT_BPF_DIR)]
        bpf_dir: PathBuf,
    },
    /// Print a shell completion script (`lb completions bash > /etc/bash_completion.d/lb`).
    Completions { shell: clap_complete::Shell },
    /// Show the data path's packet counters and the conntrack collector's statistics.
    Counters {
        /// Output format.
        #[arg(long, short = 'o', value_enum, default_value = "table")]
        output: OutputFormat,
        /// Where the running (or stopped) lb pinned its maps: its `lb run --bpf-dir`.
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
        /// Where the running (or stopped) lb pinned its maps: its `lb run --bpf-dir`.
        #[arg(long, default_value = DEFAULT_BPF_DIR)]
        bpf_dir: PathBuf,
    },
    /// Detach lb's programs and remove its pinned links and maps: what stays in the kernel
    /// while no lb runs (run after stopping lb to leave nothing behind).
    Cleanup {
        /// Where the running (or stopped) lb pinned its maps: its `lb run --bpf-dir`.
        #[arg(long, default_value = DEFAULT_BPF_DIR)]
        bpf_dir: PathBuf,
    },
}

#[derive(clap::Args)]
struct RunArgs {
    /// A kube-proxy configuration file (KubeProxyConfiguration, or the kube-proxy ConfigMap
    /// holding one): the settings that mean something to lb are taken, the others named in a
    /// warning; flags given on the command line win over it.
    #[arg(long)]
    config: Option<PathBuf>,
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
    nodeport_addresses: Vec<ipnet::IpNet>,
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
    /// Address for /metrics (Prometheus) and /proxyMode (kube-proxy's flag and default); empty
    /// to disable.
    #[arg(long, default_value = "127.0.0.1:10249")]
    metrics_bind_address: String,
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
    /// Manifests mode: where Services without a clusterIP get one (the API server's flag):
    /// one CIDR, or an IPv4 and an IPv6 one separated by a comma for dual-stack Services (the
    /// first is the single-stack default).
    #[arg(long, default_value = "10.96.0.0/12", value_parser = cluster_ip_ranges)]
    service_cluster_ip_range: ClusterIpRanges,
    /// Manifests mode: where lb remembers the ClusterIPs it allocated.
    #[arg(long, default_value = "/var/lib/lb")]
    state_dir: PathBuf,
    /// Count each frontend's packets, bytes and new flows in the data path (lb stats and the
    /// lb_service_* metrics). It costs about 30 ns per translated packet; false takes the
    /// counting out of the programs.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    service_traffic_counters: bool,
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

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum OutputFormat {
    Table,
    /// The table with every column in full.
    Wide,
    Json,
}

/// `--service-cluster-ip-range`'s CIDRs, the primary first.
#[derive(Clone, Debug)]
struct ClusterIpRanges(Vec<ipnet::IpNet>);

fn cluster_ip_ranges(value: &str) -> Result<ClusterIpRanges, String> {
    lb_userspace::source::cluster_ip::parse_ranges(value).map(ClusterIpRanges).map_err(|e| e.to_string())
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

/// Applies a KubeProxyConfiguration under the flags: a setting of the file is taken where the
/// command line did not give the flag.
fn apply_config(args: &mut RunArgs, matches: &clap::ArgMatches, log_format: &mut LogFormat) -> Result<()> {
    let Some(path) = args.config.clone() else { return Ok(()) };
    let file = lb_userspace::daemon::config::read(&path).map_err(|error| usage_error(error.to_string()))?;
    let from_flag = |id: &str| matches.value_source(id) == Some(clap::parser::ValueSource::CommandLine);
    macro_rules! take {
        ($field:ident) => {
            if let Some(value) = file.$field.clone()
                && !from_flag(stringify!($field))
            {
                args.$field = value.into();
            }
        };
    }
    take!(hostname_override);
    take!(healthz_bind_address);
    take!(metrics_bind_address);
    take!(nodeport_addresses);
    take!(min_sync_period);
    take!(sync_period);
    take!(conntrack_tcp_timeout_established);
    take!(conntrack_tcp_timeout_close_wait);
    take!(conntrack_udp_timeout);
    take!(conntrack_udp_timeout_stream);
    if let Some(kubeconfig) = file.kubeconfig.clone()
        && args.manifests.is_none()
        && !from_flag("kubeconfig")
    {
        args.kubeconfig = Some(kubeconfig);
    }
    if file.log_format.as_deref() == Some("json") && !from_flag("log_format") {
        *log_format = LogFormat::Json;
    }
    if !file.ignored.is_empty() {
        tracing::warn!(
            config = %path.display(),
            ignored = %file.ignored.join(", "),
            "kube-proxy settings without a meaning for lb are ignored"
        );
    }
    Ok(())
}

/// An error in the flags or configuration (exit code 2).
fn usage_error(message: String) -> anyhow::Error {
    preflight::StartupError { code: preflight::exit_code::USAGE, message }.into()
}

/// The checks before the kernel is touched, each with its own message and exit code; the lock
/// on --bpf-dir they return is held for the daemon's life.
fn preflight_checks(options: &run::RunOptions) -> Result<nix::fcntl::Flock<std::fs::File>> {
    preflight::check_privileges()?;
    preflight::check_bpf_syscall()?;
    preflight::check_kernel_features(preflight::kernel_has)?;
    preflight::check_bpffs(&options.bpf_dir)?;
    if let Some(path) = &options.cgroup_path {
        preflight::check_cgroup(path)?;
    }
    Ok(preflight::lock_bpf_dir(&options.bpf_dir)?)
}

fn run_options(args: RunArgs) -> Result<run::RunOptions> {
    let source = match args.manifests {
        Some(dir) => run::SourceOptions::Manifests {
            dir,
            cluster_ip_ranges: args.service_cluster_ip_range.0,
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
    let metrics_bind_address = match args.metrics_bind_address.as_str() {
        "" => None,
        address => Some(address.parse().with_context(|| format!("--metrics-bind-address {address:?}"))?),
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
        metrics_bind_address,
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
        service_traffic_counters: args.service_traffic_counters,
        xdp: match args.xdp {
            XdpArg::Native => datapath::XdpAttach::Native,
            XdpArg::Generic => datapath::XdpAttach::Generic,
            XdpArg::Off => datapath::XdpAttach::Off,
        },
    })
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("LB_LOG")
        .or_else(|_| tracing_subscriber::EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| "info".into());
    let logs = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Text => logs.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => logs.json().flatten_event(true).init(),
    }
}

fn main() -> std::process::ExitCode {
    let matches = Cli::command().get_matches();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(error) => error.exit(),
    };
    let mut log_format = cli.log_format;
    let result = match cli.command {
        Command::Run(mut args) => {
            let run_matches = matches.subcommand_matches("run").expect("the run subcommand");
            // The configuration file may set the log format: read it before logging starts,
            // and log its warnings after.
            let config = args.config.clone();
            let config_result = config
                .as_ref()
                .map(|path| lb_userspace::daemon::config::read(path).map(|file| file.log_format));
            if let Some(Ok(Some(format))) = &config_result
                && format == "json"
                && run_matches.value_source("log_format") != Some(clap::parser::ValueSource::CommandLine)
                && matches.value_source("log_format") != Some(clap::parser::ValueSource::CommandLine)
            {
                log_format = LogFormat::Json;
            }
            init_logging(log_format);
            apply_config(&mut args, run_matches, &mut log_format).and_then(|()| run_daemon(args))
        }
        command => {
            init_logging(log_format);
            inspect(command)
        }
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            let code = error
                .downcast_ref::<preflight::StartupError>()
                .map_or(preflight::exit_code::FAILED, |startup| startup.code);
            eprintln!("error: {error:#}");
            std::process::ExitCode::from(code)
        }
    }
}

fn run_daemon(args: RunArgs) -> Result<()> {
    let options = run_options(args).map_err(|error| usage_error(format!("{error:#}")))?;
    let _lock = preflight_checks(&options)?;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(run::run(options))
}

/// The commands that read what lb left in the kernel.
fn inspect(command: Command) -> Result<()> {
    match command {
        Command::Run(_) => unreachable!("handled by main"),
        Command::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "lb", &mut std::io::stdout());
            Ok(())
        }
        Command::Services { output, bpf_dir } => {
            let snapshot = BpfMaps::from_pins(&bpf_dir)?.snapshot()?;
            match output {
                OutputFormat::Json => {
                    println!("{}", serde_json::to_string_pretty(&status::services_rows(&snapshot))?)
                }
                OutputFormat::Table => print!("{}", status::services_table(&snapshot, false)),
                OutputFormat::Wide => print!("{}", status::services_table(&snapshot, true)),
            }
            Ok(())
        }
        Command::Endpoints { service, watch, watch_interval, output, bpf_dir } => {
            endpoints(service.as_deref(), watch, watch_interval, output, &bpf_dir)
        }
        Command::Stats { output, bpf_dir } => stats(output, &bpf_dir),
        Command::Explain { source, destination, external, manifests, hostname_override, output, bpf_dir } => {
            let query = parse_query(source, &destination, external)?;
            let node = node_name(hostname_override);
            explain(&query, manifests.as_deref(), node.as_deref(), output, &bpf_dir)
        }
        Command::Counters { output, bpf_dir } => {
            let (counters, collector) = (datapath::read_counters(&bpf_dir)?, datapath::read_stats(&bpf_dir)?);
            match output {
                OutputFormat::Json => {
                    println!(
                        "{}",
                        serde_json::to_string_pretty(&status::counters_json(&counters, &collector))?
                    )
                }
                OutputFormat::Table | OutputFormat::Wide => {
                    print!("{}", status::counters_text(&counters, &collector))
                }
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
            let mut rows =
                tables.flows(&names, conntrack::monotonic_ns()).context("reading the conntrack table")?;
            if let Some(wanted) = &service {
                rows.retain(|row| {
                    row.service.as_deref().is_some_and(|name| {
                        name == wanted
                            || name.strip_prefix(wanted.as_str()).is_some_and(|rest| rest.starts_with(':'))
                    })
                });
            }
            match output {
                OutputFormat::Table | OutputFormat::Wide => print!("{}", conntrack::flows_table(&rows)),
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

fn parse_query(source: std::net::SocketAddr, destination: &str, external: bool) -> Result<explain::Query> {
    let (address, protocol) = destination.split_once('/').unwrap_or((destination, "TCP"));
    let protocol = Protocol::from_kubernetes(Some(&protocol.to_uppercase()))
        .ok_or_else(|| usage_error(format!("{destination:?}: the protocol must be TCP, UDP or SCTP")))?;
    let parsed: std::net::SocketAddr = address.parse().map_err(|_| {
        usage_error(format!(
            "{destination:?} is not IP:PORT/PROTO (like 10.96.0.10:80/TCP or [fd00:10:96::a]:80/TCP)"
        ))
    })?;
    if parsed.is_ipv4() != source.is_ipv4() {
        return Err(usage_error(format!("{source} and {parsed} are not of the same address family")));
    }
    let destination = parsed;
    Ok(explain::Query { source, destination, protocol, external })
}

fn explain(
    query: &explain::Query,
    manifests: Option<&std::path::Path>,
    node_name: Option<&str>,
    output: OutputFormat,
    bpf_dir: &std::path::Path,
) -> Result<()> {
    let (snapshot, facts) = explain::read_pinned(bpf_dir, query)?;
    let mut explanation = explain::explain(query, &snapshot, &facts);
    if let (Some(frontend), Some(dir)) = (&explanation.frontend, manifests) {
        explanation.not_eligible =
            excluded_from_objects(dir, frontend, &explanation.eligible, node_name, query.protocol)?;
    }
    match output {
        OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&explanation)?),
        OutputFormat::Table | OutputFormat::Wide => print!("{}", explain::render(&explanation)),
    }
    Ok(())
}

/// The Service port's endpoints that the objects in `dir` list but the maps give no new flows,
/// with the reason.
fn excluded_from_objects(
    dir: &std::path::Path,
    frontend: &explain::FrontendMatch,
    eligible: &[String],
    node_name: Option<&str>,
    protocol: Protocol,
) -> Result<Vec<(String, String)>> {
    use lb_userspace::source::{Object, ObjectChange};
    let loaded = lb_userspace::source::manifests::ManifestObjects::new(dir, None, None).reload_all();
    let (service, port_name) = frontend.service.split_once(':').unwrap_or((frontend.service.as_str(), ""));
    let (namespace, name) = service.split_once('/').unwrap_or(("default", service));
    let mut slices = Vec::new();
    for change in loaded.changes {
        if let ObjectChange::Upsert(Object::EndpointSlice(slice)) = change
            && let Ok(Some(parsed)) = lb_userspace::convert::parse_slice(&slice)
            && parsed.namespace == namespace
            && parsed.service_name == name
        {
            slices.push(parsed);
        }
    }
    let slices: Vec<_> = slices.iter().collect();
    let endpoints = lb_userspace::convert::endpoints_of_port(port_name, protocol, &slices);
    let local = frontend.policy.starts_with("Local");
    Ok(explain::excluded_endpoints(&endpoints, eligible, local, node_name))
}

fn stats(output: OutputFormat, bpf_dir: &std::path::Path) -> Result<()> {
    let counters = datapath::read_counters(bpf_dir)?;
    let traffic = datapath::read_service_traffic(bpf_dir)?;
    let names = BpfMaps::from_pins(bpf_dir)?.service_names(traffic.keys().copied())?;
    let mut by_service: std::collections::BTreeMap<(String, String), status::ServiceStats> =
        Default::default();
    for (id, counts) in traffic {
        let Some((kind, name)) = names.get(&id) else { continue };
        let kind =
            lb_userspace::model::FrontendType::from_code(*kind).map_or("?".to_string(), |k| k.to_string());
        let row = by_service.entry((name.clone(), kind.clone())).or_insert_with(|| status::ServiceStats {
            service: name.clone(),
            frontend_type: kind,
            ..Default::default()
        });
        row.new_flows += counts.new_flows;
        row.packets += counts.packets;
        row.bytes += counts.bytes;
        row.reply_packets += counts.reply_packets;
        row.reply_bytes += counts.reply_bytes;
    }
    let services: Vec<status::ServiceStats> = by_service.into_values().collect();
    match output {
        OutputFormat::Json => {
            println!("{}", serde_json::to_string_pretty(&status::stats_json(&services, &counters))?)
        }
        OutputFormat::Table | OutputFormat::Wide => print!("{}", status::stats_table(&services, &counters)),
    }
    Ok(())
}

fn endpoints(
    wanted: Option<&str>,
    watch: bool,
    interval: Duration,
    output: OutputFormat,
    bpf_dir: &std::path::Path,
) -> Result<()> {
    let wide = output == OutputFormat::Wide;
    let read = || -> Result<std::collections::BTreeMap<String, status::ServiceEndpoints>> {
        let snapshot = BpfMaps::from_pins(bpf_dir)?.snapshot()?;
        let mut services = status::service_endpoints(&ProgrammedState::from_snapshot(&snapshot));
        if let Some(wanted) = wanted {
            services.retain(|name, _| name == wanted);
        }
        Ok(services)
    };
    let mut last = read()?;
    if let Some(wanted) = wanted
        && last.is_empty()
        && !watch
    {
        anyhow::bail!("no Service {wanted} in the maps under {}", bpf_dir.display());
    }
    let all_namespaces = wanted.is_none();
    let json = output == OutputFormat::Json;
    if json {
        print!("{}", status::watch_lines(&Default::default(), &last, all_namespaces, wide, true));
    } else {
        print!("{}", status::endpoints_table(last.values(), all_namespaces, wide));
    }
    if !watch {
        return Ok(());
    }
    use std::io::Write as _;
    loop {
        std::io::stdout().flush()?;
        std::thread::sleep(interval);
        let now = read()?;
        print!("{}", status::watch_lines(&last, &now, all_namespaces, wide, json));
        last = now;
    }
}
