//! A node with pods and a client, all in network namespaces this process creates and joined
//! only to each other:
//!
//! ```text
//!  client ns            node ns (lb attached to every veth's ingress)           pod ns (one per pod)
//!  eth0 10.0.0.2/24 --- lbc0 10.0.0.1/24
//!                       lbp0 10.244.0.1/32, route <pod ip>/32 ----------------- eth0 <pod ip>/32
//!                       lbp1 ...                                                 (default via 10.244.0.1)
//! ```
//!
//! A dual-stack playground (`Playground::dual_stack`) adds IPv6 beside: the client fd00::2/64,
//! the node fd00::1/64 on lbc0 and fd00:10:244::1 on each pod link, each pod
//! fd00:10:244::<third octet>:<fourth octet> of its IPv4 address.
//!
//! There is no link to the root namespace: the ClusterIP exists only as something lb
//! translates, and every address lives inside these namespaces.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use lb_userspace::dataplane::maps::{BpfMaps, MapsSnapshot, ServiceMaps};

use crate::{NetNs, PrivateBpfFs, TestCgroup, lb_binary, spawn_lb_in, veth};

pub const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);
const NODE_CLIENT_SIDE: &str = "10.0.0.1/24";
const NODE_POD_GATEWAY: &str = "10.244.0.1";
pub const CLIENT_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 2);
const NODE_CLIENT_SIDE6: &str = "fd00::1/64";
const NODE_POD_GATEWAY6: &str = "fd00:10:244::1";

/// A dual-stack pod's IPv6 address: fd00:10:244::<third octet>:<fourth octet> of its IPv4 one.
pub fn pod_ipv6(ip: Ipv4Addr) -> Ipv6Addr {
    let [_, _, third, fourth] = ip.octets();
    Ipv6Addr::new(0xfd00, 0x10, 0x244, 0, 0, 0, u16::from(third), u16::from(fourth))
}

pub struct Pod {
    pub name: String,
    pub ip: Ipv4Addr,
    /// In a dual-stack playground.
    pub ip6: Option<Ipv6Addr>,
    pub ns: NetNs,
    stop: Arc<AtomicBool>,
}

pub struct Playground {
    pub client: NetNs,
    pub node: NetNs,
    pub pods: Vec<Pod>,
    /// Manifest directory lb watches.
    pub manifests: PathBuf,
    pub bpf_dir: PathBuf,
    pub lb_log: PathBuf,
    lb: Option<Child>,
    work_dir: PathBuf,
    prefix: String,
    next_pod: usize,
    dual_stack: bool,
    /// The cgroup lb's socket programs attach to (never one of the machine's own).
    pub cgroup: TestCgroup,
    _bpffs: PrivateBpfFs,
}

impl Pod {
    /// The address servers bind: IPv6's unspecified one takes both families when the pod has
    /// IPv6 (IPv4 peers then show as ::ffff:a.b.c.d).
    fn any_address(&self) -> &'static str {
        if self.ip6.is_some() { "::" } else { "0.0.0.0" }
    }

    /// Starts an HTTP server on `port` answering with the pod's name and the caller's address.
    pub fn serve_http(&self, port: u16) -> Result<()> {
        let any = self.any_address();
        let listener = self.ns.run(move || TcpListener::bind((any, port)))??;
        listener.set_nonblocking(true)?;
        let (name, stop) = (self.name.clone(), self.stop.clone());
        std::thread::spawn(move || http_server(listener, name, stop));
        Ok(())
    }
}

impl Playground {
    /// Creates the namespaces and links; `prefix` names everything this playground creates.
    pub fn new(prefix: &str, pods: &[(&str, Ipv4Addr)]) -> Result<Self> {
        Self::create(prefix, pods, false)
    }

    /// `new`, with IPv6 addresses and routes beside the IPv4 ones (see the module's comment).
    pub fn dual_stack(prefix: &str, pods: &[(&str, Ipv4Addr)]) -> Result<Self> {
        Self::create(prefix, pods, true)
    }

    fn create(prefix: &str, pods: &[(&str, Ipv4Addr)], dual_stack: bool) -> Result<Self> {
        let work_dir = std::env::temp_dir().join(prefix);
        std::fs::create_dir_all(work_dir.join("manifests"))?;
        let bpffs = PrivateBpfFs::new()?;
        let client = NetNs::new(format!("{prefix}-client"))?;
        let node = NetNs::new(format!("{prefix}-node"))?;
        node.sysctl("net.ipv4.ip_forward", "1")?;
        for scope in ["all", "default"] {
            node.sysctl(&format!("net.ipv4.conf.{scope}.rp_filter"), "0")?;
        }
        veth(&client, "eth0", &format!("{CLIENT_IP}/24"), &node, "lbc0", NODE_CLIENT_SIDE)?;
        client.exec(&["ip", "route", "add", "default", "via", "10.0.0.1"])?;
        if dual_stack {
            node.sysctl("net.ipv6.conf.all.forwarding", "1")?;
            // nodad: usable at once, not after duplicate address detection.
            client.exec(&["ip", "addr", "add", &format!("{CLIENT_IP6}/64"), "dev", "eth0", "nodad"])?;
            node.exec(&["ip", "addr", "add", NODE_CLIENT_SIDE6, "dev", "lbc0", "nodad"])?;
            client.exec(&["ip", "-6", "route", "add", "default", "via", "fd00::1"])?;
        }
        let mut playground = Self {
            client,
            node,
            pods: Vec::new(),
            manifests: work_dir.join("manifests"),
            bpf_dir: bpffs.path().join("lb"),
            lb_log: work_dir.join("lb.log"),
            lb: None,
            work_dir,
            prefix: prefix.to_string(),
            next_pod: 0,
            dual_stack,
            cgroup: TestCgroup::new()?,
            _bpffs: bpffs,
        };
        for (name, ip) in pods {
            playground.add_pod(name, *ip)?;
        }
        Ok(playground)
    }

    /// Creates a pod: its namespace, a veth to the node (`lbp<N>` on the node side) and routes.
    pub fn add_pod(&mut self, name: &str, ip: Ipv4Addr) -> Result<&Pod> {
        let index = self.next_pod;
        self.next_pod += 1;
        let ns = NetNs::new(format!("{}-p{index}", self.prefix))?;
        let node_if = format!("lbp{index}");
        veth(&ns, "eth0", &format!("{ip}/32"), &self.node, &node_if, &format!("{NODE_POD_GATEWAY}/32"))?;
        self.node.exec(&["ip", "route", "add", &format!("{ip}/32"), "dev", &node_if])?;
        ns.exec(&["ip", "route", "add", NODE_POD_GATEWAY, "dev", "eth0"])?;
        ns.exec(&["ip", "route", "add", "default", "via", NODE_POD_GATEWAY])?;
        let ip6 = self.dual_stack.then(|| pod_ipv6(ip));
        if let Some(ip6) = ip6 {
            ns.exec(&["ip", "addr", "add", &format!("{ip6}/128"), "dev", "eth0", "nodad"])?;
            self.node.exec(&[
                "ip",
                "addr",
                "add",
                &format!("{NODE_POD_GATEWAY6}/128"),
                "dev",
                &node_if,
                "nodad",
            ])?;
            self.node.exec(&["ip", "-6", "route", "add", &format!("{ip6}/128"), "dev", &node_if])?;
            ns.exec(&["ip", "-6", "route", "add", NODE_POD_GATEWAY6, "dev", "eth0"])?;
            ns.exec(&["ip", "-6", "route", "add", "default", "via", NODE_POD_GATEWAY6])?;
        }
        let stop = Arc::new(AtomicBool::new(false));
        self.pods.push(Pod { name: name.to_string(), ip, ip6, ns, stop });
        Ok(self.pods.last().expect("just pushed"))
    }

    /// Starts an HTTP server (answering with the pod's name) on `port` in every pod.
    pub fn serve_http(&self, port: u16) -> Result<()> {
        self.pods.iter().try_for_each(|pod| pod.serve_http(port))
    }

    /// Starts a UDP server (answering with the pod's name) on `port` in every pod.
    pub fn serve_udp(&self, port: u16) -> Result<()> {
        for pod in &self.pods {
            let any = pod.any_address();
            let socket = pod.ns.run(move || UdpSocket::bind((any, port)))??;
            socket.set_read_timeout(Some(Duration::from_millis(50)))?;
            let (name, stop) = (pod.name.clone(), pod.stop.clone());
            std::thread::spawn(move || udp_server(socket, name, stop));
        }
        Ok(())
    }

    /// Starts an SCTP responder (`crate::sctp::respond`, raw sockets) for `port` in every pod,
    /// of each family the pod has.
    pub fn serve_sctp(&self, port: u16) -> Result<()> {
        for pod in &self.pods {
            for ipv6 in [false, true].into_iter().filter(|ipv6| !ipv6 || pod.ip6.is_some()) {
                let socket = pod.ns.run(move || crate::sctp::raw_socket(ipv6))??;
                let (name, stop) = (pod.name.clone(), pod.stop.clone());
                std::thread::spawn(move || crate::sctp::respond(socket, port, name, stop));
            }
        }
        Ok(())
    }

    pub fn write_manifest(&self, file: &str, text: &str) -> Result<()> {
        write_manifest(&self.manifests, file, text)
    }

    /// Starts `lb run --manifests` inside the node namespace on every node-side interface.
    pub fn start_lb(&mut self) -> Result<()> {
        let manifests = self.manifests.clone();
        self.start_lb_with(&["--manifests".as_ref(), manifests.as_os_str()])
    }

    /// Starts `lb run` with these source arguments inside the node namespace, on every
    /// node-side interface.
    pub fn start_lb_with(&mut self, source_args: &[&std::ffi::OsStr]) -> Result<()> {
        let state = self.work_dir.join("state");
        let mut args: Vec<&std::ffi::OsStr> = vec!["run".as_ref()];
        args.extend_from_slice(source_args);
        args.extend([
            // The client side by name, the pods' side by pattern: pods added later are attached.
            "--interfaces".as_ref(),
            "lbc0,lbp*".as_ref(),
            "--bpf-dir".as_ref(),
            self.bpf_dir.as_os_str(),
            "--cgroup-path".as_ref(),
            self.cgroup.path().as_os_str(),
            "--state-dir".as_ref(),
            state.as_os_str(),
        ]);
        self.lb = Some(spawn_lb_in(&self.node, &args, &self.lb_log)?);
        Ok(())
    }

    /// Stops lb with SIGTERM and waits for it; returns its exit status' success.
    pub fn stop_lb(&mut self) -> Result<bool> {
        let Some(mut child) = self.lb.take() else { return Ok(true) };
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )?;
        // A sync in progress finishes first (seconds at 100 000 Services); Kubernetes gives a
        // pod 30 s after SIGTERM by default.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok(status.success());
            }
            if Instant::now() > deadline {
                child.kill()?;
                child.wait()?;
                bail!("lb did not exit within 30 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The running lb's process ID.
    pub fn lb_pid(&self) -> Option<u32> {
        self.lb.as_ref().map(Child::id)
    }

    pub fn lb_log(&self) -> String {
        std::fs::read_to_string(&self.lb_log).unwrap_or_default()
    }

    /// What lb has programmed, read from its pinned maps (empty until they exist).
    pub fn snapshot(&self) -> MapsSnapshot {
        BpfMaps::from_pins(&self.bpf_dir).and_then(|m| m.snapshot()).unwrap_or_default()
    }

    /// Polls until `ready` holds for the programmed maps; returns how long it took.
    pub fn wait_for_maps(
        &self,
        timeout: Duration,
        ready: impl Fn(&MapsSnapshot) -> bool,
    ) -> Result<Duration> {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if ready(&self.snapshot()) {
                return Ok(start.elapsed());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        bail!("maps did not reach the expected state within {timeout:?}; lb log:\n{}", self.lb_log())
    }

    /// Polls lb's log until a line contains `needle`. Unlike the maps, which stay pinned, the
    /// log is new for each start: this is how to know a restarted lb is attached and synced.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> Result<Duration> {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if self.lb_log().contains(needle) {
                return Ok(start.elapsed());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        bail!("lb did not log {needle:?} within {timeout:?}; log:\n{}", self.lb_log())
    }

    /// `lb services` output for this playground's maps.
    pub fn services_table(&self) -> Result<String> {
        let out = Command::new(lb_binary()).args(["services", "--bpf-dir"]).arg(&self.bpf_dir).output()?;
        if !out.status.success() {
            bail!("lb services: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8(out.stdout)?)
    }

    /// Makes `count` HTTP requests from the client, each on a new connection. Returns each
    /// answer (pod name and the client address the pod saw); stops at the first failure,
    /// which is the last element.
    pub fn http_requests(
        &self,
        target: impl Into<SocketAddr>,
        count: usize,
    ) -> Result<Vec<Result<HttpAnswer, String>>> {
        let target = target.into();
        self.client.run(move || {
            let mut answers = Vec::with_capacity(count);
            for _ in 0..count {
                let answer = http_get(target).map_err(|e| e.to_string());
                let failed = answer.is_err();
                answers.push(answer);
                if failed {
                    break;
                }
            }
            answers
        })
    }

    /// One UDP request from the client; returns the answer and who it came from.
    pub fn udp_request(&self, target: impl Into<SocketAddr>) -> Result<(String, SocketAddr)> {
        let target = target.into();
        self.client.run(move || -> Result<(String, SocketAddr)> {
            let any = if target.is_ipv4() { "0.0.0.0" } else { "::" };
            let socket = UdpSocket::bind((any, 0))?;
            socket.set_read_timeout(Some(Duration::from_secs(2)))?;
            socket.send_to(b"ping", target)?;
            let mut buf = [0u8; 256];
            let (len, from) = socket.recv_from(&mut buf).context("no UDP answer within 2 s")?;
            Ok((String::from_utf8_lossy(&buf[..len]).into_owned(), from))
        })?
    }

    /// Stops one pod's servers and deletes its namespace (a pod going away).
    pub fn remove_pod(&mut self, name: &str) {
        if let Some(index) = self.pods.iter().position(|p| p.name == name) {
            let pod = self.pods.remove(index);
            pod.stop.store(true, Ordering::Relaxed);
        }
    }

    pub fn work_dir(&self) -> &Path {
        &self.work_dir
    }
}

impl Drop for Playground {
    fn drop(&mut self) {
        let _ = self.stop_lb();
        for pod in &self.pods {
            pod.stop.store(true, Ordering::Relaxed);
        }
        let _ = std::fs::remove_dir_all(&self.work_dir);
        // Namespaces and the private bpffs are removed by their own Drop.
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpAnswer {
    pub pod: String,
    /// The source address the pod saw.
    pub client_seen: String,
    /// The address the client's socket is connected to.
    pub peer: SocketAddr,
}

/// A Pod manifest (app label `app`, serving container port 8080 named `http`) with `ip` and its
/// Ready condition in its status, as the manifests source reads pods.
pub fn pod_manifest(name: &str, app: &str, ip: std::net::Ipv4Addr, ready: bool) -> String {
    format!(
        "apiVersion: v1
kind: Pod
metadata: {{name: {name}, labels: {{app: {app}}}}}
spec:
  containers: [{{name: web, image: {app}, ports: [{{name: http, containerPort: 8080}}]}}]
status:
  podIP: {ip}
  conditions: [{{type: Ready, status: \"{}\"}}]
",
        if ready { "True" } else { "False" }
    )
}

/// `pod_manifest` (app `web`, ready) for a dual-stack pod: `ip` and its `pod_ipv6` twin.
pub fn dual_stack_pod_manifest(name: &str, ip: Ipv4Addr) -> String {
    format!(
        "apiVersion: v1
kind: Pod
metadata: {{name: {name}, labels: {{app: web}}}}
spec:
  containers: [{{name: web, image: web, ports: [{{name: http, containerPort: 8080}}]}}]
status:
  podIP: {ip}
  podIPs: [{{ip: {ip}}}, {{ip: \"{}\"}}]
  conditions: [{{type: Ready, status: \"True\"}}]
",
        pod_ipv6(ip)
    )
}

/// Writes `dir/file` by a rename, as editors and kubectl-like tools do: lb never reads half a
/// file.
pub fn write_manifest(dir: &Path, file: &str, text: &str) -> Result<()> {
    let tmp = dir.join(format!(".{file}.tmp"));
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, dir.join(file))?;
    Ok(())
}

pub fn http_get(target: impl Into<SocketAddr>) -> Result<HttpAnswer> {
    http_exchange(TcpStream::connect_timeout(&target.into(), Duration::from_secs(2))?)
}

/// One HTTP/1.0 request on a connected stream, and the test server's answer.
pub fn http_exchange(mut stream: TcpStream) -> Result<HttpAnswer> {
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    let peer = stream.peer_addr()?;
    stream.write_all(b"GET / HTTP/1.0\r\nHost: lb\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let body = response.split("\r\n\r\n").nth(1).context("no HTTP body")?;
    let mut words = body.split_whitespace();
    let pod = words.next().context("empty body")?.to_string();
    let client_seen = words.next().unwrap_or_default().to_string();
    Ok(HttpAnswer { pod, client_seen, peer })
}

pub fn http_server(listener: TcpListener, name: String, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((mut stream, peer)) => {
                let _ = stream.set_nonblocking(false);
                let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
                let mut request = [0u8; 1024];
                let _ = stream.read(&mut request);
                // An IPv4 peer of a dual-stack listener shows as ::ffff:a.b.c.d: told as IPv4.
                let body = format!("{name} {}\n", peer.ip().to_canonical());
                let _ = write!(
                    stream,
                    "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                );
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(2))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(2)),
        }
    }
}

fn udp_server(socket: UdpSocket, name: String, stop: Arc<AtomicBool>) {
    let mut buf = [0u8; 1500];
    while !stop.load(Ordering::Relaxed) {
        if let Ok((_, from)) = socket.recv_from(&mut buf) {
            let _ = socket.send_to(name.as_bytes(), from);
        }
    }
}
