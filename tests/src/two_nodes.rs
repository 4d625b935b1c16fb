//! Two nodes, each running its own lb with its own pods, and an external client, all on one
//! LAN (a bridge in a namespace of its own). Nothing links to the root namespace.
//!
//! ```text
//!  client ns  eth0 192.168.50.100/24 (+ .101)  ─┐
//!  node1 ns   uplink 192.168.50.1/24           ─┼─ lan ns: bridge br0
//!  node2 ns   uplink 192.168.50.2/24           ─┘
//!  node<N>:   lbp<i> 10.244.<N>.1/32 ── pod ns eth0 10.244.<N>.<host>/32
//!             route 10.244.<other>.0/24 via 192.168.50.<other>
//! ```
//!
//! The client has no route to pod addresses: it reaches pods only through node addresses,
//! LoadBalancer IPs and externalIPs, which it routes to node1 as a cloud load balancer or a
//! router would.
//!
//! A dual-stack pair (`TwoNodes::dual_stack`) has IPv6 beside: the LAN fd00:50::/64 (client
//! ::100 and ::101, node N ::N), pods fd00:244:N::<host>, gateways fd00:244:N::1.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use lb_userspace::dataplane::maps::{BpfMaps, MapsSnapshot, ServiceMaps};

use crate::playground::{HttpAnswer, http_exchange, http_get, http_server};
use crate::{NetNs, PrivateBpfFs, TestCgroup, lb_binary, spawn_lb_in, veth};

pub const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 50, 100);
/// A second client address, for source-range checks.
pub const OTHER_CLIENT_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 50, 101);

pub fn node_ip(node: usize) -> Ipv4Addr {
    Ipv4Addr::new(192, 168, 50, node as u8)
}

pub fn pod_ip(node: usize, host: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 244, node as u8, host)
}

pub const CLIENT_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x50, 0, 0, 0, 0, 0, 0x100);
pub const OTHER_CLIENT_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x50, 0, 0, 0, 0, 0, 0x101);

pub fn node_ip6(node: usize) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x50, 0, 0, 0, 0, 0, node as u16)
}

pub fn pod_ip6(node: usize, host: u8) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x244, node as u16, 0, 0, 0, 0, u16::from(host))
}

pub struct PodNs {
    pub name: String,
    pub node: usize,
    pub ip: Ipv4Addr,
    /// In a dual-stack pair.
    pub ip6: Option<Ipv6Addr>,
    pub ns: NetNs,
}

pub struct Node {
    pub index: usize,
    pub ns: NetNs,
    pub bpf_dir: PathBuf,
    pub log: PathBuf,
    lb: Option<Child>,
    /// The cgroup this node's lb attaches its socket programs to.
    pub cgroup: TestCgroup,
    _bpffs: PrivateBpfFs,
}

pub struct TwoNodes {
    pub client: NetNs,
    pub nodes: Vec<Node>,
    pub pods: Vec<PodNs>,
    pub manifests: PathBuf,
    /// `--xdp` for both lbs: "off" unless a test sets it, so the TC path is what is tested.
    pub xdp: &'static str,
    dual_stack: bool,
    work_dir: PathBuf,
    stop: Arc<AtomicBool>,
    _lan: NetNs,
}

impl TwoNodes {
    /// The namespaces and links; `pods` are (name, node 1 or 2, host part of the address).
    pub fn new(prefix: &str, pods: &[(&str, usize, u8)]) -> Result<Self> {
        Self::create(prefix, pods, false)
    }

    /// `new`, with IPv6 addresses and routes beside the IPv4 ones (see the module's comment).
    pub fn dual_stack(prefix: &str, pods: &[(&str, usize, u8)]) -> Result<Self> {
        Self::create(prefix, pods, true)
    }

    fn create(prefix: &str, pods: &[(&str, usize, u8)], dual_stack: bool) -> Result<Self> {
        let work_dir = std::env::temp_dir().join(prefix);
        std::fs::create_dir_all(work_dir.join("manifests"))?;
        let lan = NetNs::new(format!("{prefix}-lan"))?;
        lan.exec(&["ip", "link", "add", "br0", "type", "bridge"])?;
        lan.exec(&["ip", "link", "set", "br0", "up"])?;
        let client = NetNs::new(format!("{prefix}-client"))?;
        veth(&client, "eth0", &format!("{CLIENT_IP}/24"), &lan, "lan-client", "0.0.0.0/32")?;
        client.exec(&["ip", "addr", "add", &format!("{OTHER_CLIENT_IP}/24"), "dev", "eth0"])?;
        if dual_stack {
            client.exec(&["ip", "addr", "add", &format!("{CLIENT_IP6}/64"), "dev", "eth0", "nodad"])?;
            // Deprecated, so source address selection keeps to CLIENT_IP6 (as IPv4's does to
            // the primary address); a socket bound to it still uses it.
            let other = format!("{OTHER_CLIENT_IP6}/64");
            client.exec(&["ip", "addr", "add", &other, "dev", "eth0", "nodad", "preferred_lft", "0"])?;
        }
        lan.exec(&["ip", "addr", "flush", "dev", "lan-client"])?;
        lan.exec(&["ip", "link", "set", "lan-client", "master", "br0"])?;

        let mut nodes = Vec::new();
        for index in 1..=2 {
            let ns = NetNs::new(format!("{prefix}-node{index}"))?;
            ns.sysctl("net.ipv4.ip_forward", "1")?;
            for scope in ["all", "default"] {
                ns.sysctl(&format!("net.ipv4.conf.{scope}.rp_filter"), "0")?;
            }
            let lan_side = format!("lan-node{index}");
            veth(&ns, "uplink", &format!("{}/24", node_ip(index)), &lan, &lan_side, "0.0.0.0/32")?;
            lan.exec(&["ip", "addr", "flush", "dev", &lan_side])?;
            lan.exec(&["ip", "link", "set", &lan_side, "master", "br0"])?;
            let other = 3 - index;
            ns.exec(&[
                "ip",
                "route",
                "add",
                &format!("10.244.{other}.0/24"),
                "via",
                &node_ip(other).to_string(),
            ])?;
            if dual_stack {
                ns.sysctl("net.ipv6.conf.all.forwarding", "1")?;
                ns.exec(&[
                    "ip",
                    "addr",
                    "add",
                    &format!("{}/64", node_ip6(index)),
                    "dev",
                    "uplink",
                    "nodad",
                ])?;
                let other_pods = format!("fd00:244:{other}::/64");
                ns.exec(&["ip", "-6", "route", "add", &other_pods, "via", &node_ip6(other).to_string()])?;
            }
            let bpffs = PrivateBpfFs::new()?;
            nodes.push(Node {
                index,
                ns,
                bpf_dir: bpffs.path().join("lb"),
                log: work_dir.join(format!("lb-node{index}.log")),
                lb: None,
                cgroup: TestCgroup::new()?,
                _bpffs: bpffs,
            });
        }
        let mut pod_namespaces = Vec::new();
        for (i, (name, node, host)) in pods.iter().enumerate() {
            let ip = pod_ip(*node, *host);
            let ns = NetNs::new(format!("{prefix}-p{i}"))?;
            let gateway = format!("10.244.{node}.1");
            let node_ns = &nodes[node - 1].ns;
            let node_if = format!("lbp{i}");
            veth(&ns, "eth0", &format!("{ip}/32"), node_ns, &node_if, &format!("{gateway}/32"))?;
            node_ns.exec(&["ip", "route", "add", &format!("{ip}/32"), "dev", &node_if])?;
            ns.exec(&["ip", "route", "add", &gateway, "dev", "eth0"])?;
            ns.exec(&["ip", "route", "add", "default", "via", &gateway])?;
            let ip6 = dual_stack.then(|| pod_ip6(*node, *host));
            if let Some(ip6) = ip6 {
                let gateway = pod_ip6(*node, 1).to_string();
                ns.exec(&["ip", "addr", "add", &format!("{ip6}/128"), "dev", "eth0", "nodad"])?;
                node_ns.exec(&["ip", "addr", "add", &format!("{gateway}/128"), "dev", &node_if, "nodad"])?;
                node_ns.exec(&["ip", "-6", "route", "add", &format!("{ip6}/128"), "dev", &node_if])?;
                ns.exec(&["ip", "-6", "route", "add", &gateway, "dev", "eth0"])?;
                ns.exec(&["ip", "-6", "route", "add", "default", "via", &gateway])?;
            }
            pod_namespaces.push(PodNs { name: name.to_string(), node: *node, ip, ip6, ns });
        }
        Ok(Self {
            client,
            nodes,
            pods: pod_namespaces,
            manifests: work_dir.join("manifests"),
            xdp: "off",
            dual_stack,
            work_dir,
            stop: Arc::new(AtomicBool::new(false)),
            _lan: lan,
        })
    }

    /// Routes `address` from the client to node `node`, as a load balancer or router would.
    pub fn route_to_node(&self, address: impl Into<IpAddr>, node: usize) -> Result<()> {
        match address.into() {
            IpAddr::V4(address) => self.client.exec(&[
                "ip",
                "route",
                "add",
                &format!("{address}/32"),
                "via",
                &node_ip(node).to_string(),
            ]),
            IpAddr::V6(address) => self.client.exec(&[
                "ip",
                "-6",
                "route",
                "add",
                &format!("{address}/128"),
                "via",
                &node_ip6(node).to_string(),
            ]),
        }
    }

    /// An HTTP server in every pod, answering with its name and the caller's address (of
    /// either family in a dual-stack pair).
    pub fn serve_http(&self, port: u16) -> Result<()> {
        let any = if self.dual_stack { "::" } else { "0.0.0.0" };
        for pod in &self.pods {
            let listener = pod.ns.run(move || TcpListener::bind((any, port)))??;
            listener.set_nonblocking(true)?;
            let (name, stop) = (pod.name.clone(), self.stop.clone());
            std::thread::spawn(move || http_server(listener, name, stop));
        }
        Ok(())
    }

    pub fn write_manifest(&self, file: &str, text: &str) -> Result<()> {
        crate::playground::write_manifest(&self.manifests, file, text)
    }

    /// Starts lb on both nodes, on their pods' veths and their uplink.
    pub fn start_lb(&mut self) -> Result<()> {
        for node in &mut self.nodes {
            let mut owned: Vec<std::ffi::OsString> = [
                "run",
                "--interfaces",
                "lbp*",
                "--external-interfaces",
                "uplink",
                "--nodeport-addresses",
                if self.dual_stack { "192.168.50.0/24,fd00:50::/64" } else { "192.168.50.0/24" },
                "--xdp",
                self.xdp,
                "--healthz-bind-address",
                "",
            ]
            .iter()
            .map(Into::into)
            .collect();
            if self.dual_stack {
                owned.extend(["--service-cluster-ip-range".into(), "10.96.0.0/12,fd00:10:96::/112".into()]);
            }
            for (flag, value) in [
                ("--manifests", self.manifests.clone().into_os_string()),
                ("--hostname-override", format!("node{}", node.index).into()),
                ("--bpf-dir", node.bpf_dir.clone().into_os_string()),
                ("--cgroup-path", node.cgroup.path().into()),
                ("--state-dir", self.work_dir.join(format!("state{}", node.index)).into_os_string()),
            ] {
                owned.extend([flag.into(), value]);
            }
            let args: Vec<&std::ffi::OsStr> = owned.iter().map(|a| a.as_os_str()).collect();
            node.lb = Some(spawn_lb_in(&node.ns, &args, &node.log)?);
        }
        Ok(())
    }

    /// Waits until `ready` holds for node `node`'s maps.
    pub fn wait_for_maps(
        &self,
        node: usize,
        timeout: Duration,
        ready: impl Fn(&MapsSnapshot) -> bool,
    ) -> Result<()> {
        let start = Instant::now();
        let dir = &self.nodes[node - 1].bpf_dir;
        while start.elapsed() < timeout {
            let snapshot = BpfMaps::from_pins(dir).and_then(|m| m.snapshot()).unwrap_or_default();
            if ready(&snapshot) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        bail!("node{node}'s maps did not get ready within {timeout:?}; log:\n{}", self.log(node))
    }

    /// `lb counters` for node `node`, by name.
    pub fn counters(&self, node: usize) -> Result<std::collections::BTreeMap<String, u64>> {
        let out = Command::new(lb_binary())
            .args(["counters", "--bpf-dir"])
            .arg(&self.nodes[node - 1].bpf_dir)
            .output()?;
        if !out.status.success() {
            bail!("lb counters: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8(out.stdout)?
            .lines()
            .filter_map(|line| {
                let mut words = line.split_whitespace();
                Some((words.next()?.to_string(), words.next()?.parse().ok()?))
            })
            .collect())
    }

    pub fn log(&self, node: usize) -> String {
        std::fs::read_to_string(&self.nodes[node - 1].log).unwrap_or_default()
    }

    /// `lb services` for node `node`.
    pub fn services_table(&self, node: usize) -> Result<String> {
        let out = Command::new(lb_binary())
            .args(["services", "--bpf-dir"])
            .arg(&self.nodes[node - 1].bpf_dir)
            .output()?;
        if !out.status.success() {
            bail!("lb services: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8(out.stdout)?)
    }

    /// `count` HTTP requests from `ns`, each on a new connection, from `source` if given.
    pub fn http_from(
        ns: &NetNs,
        source: Option<IpAddr>,
        target: impl Into<SocketAddr>,
        count: usize,
    ) -> Result<Vec<Result<HttpAnswer, String>>> {
        let target = target.into();
        ns.run(move || {
            (0..count).map(|_| http_get_from(source, target).map_err(|e| format!("{e:#}"))).collect()
        })
    }
}

/// `http_get`, optionally bound to a source address first.
fn http_get_from(source: Option<IpAddr>, target: SocketAddr) -> Result<HttpAnswer> {
    match source {
        None => http_get(target),
        Some(source) => {
            let domain = if source.is_ipv4() { socket2::Domain::IPV4 } else { socket2::Domain::IPV6 };
            let socket = socket2::Socket::new(domain, socket2::Type::STREAM, None)?;
            socket.bind(&SocketAddr::new(source, 0).into())?;
            socket.connect_timeout(&target.into(), Duration::from_secs(2))?;
            http_exchange(socket.into())
        }
    }
}

impl Drop for TwoNodes {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            if let Some(mut child) = node.lb.take() {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(child.id() as i32),
                    nix::sys::signal::Signal::SIGTERM,
                );
                let deadline = Instant::now() + Duration::from_secs(5);
                while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(10));
                }
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        self.stop.store(true, Ordering::Relaxed);
        let _ = std::fs::remove_dir_all(&self.work_dir);
    }
}
