//! Health-check node ports: for each LoadBalancer Service with `externalTrafficPolicy: Local`,
//! lb answers on the Service's healthCheckNodePort as kube-proxy does, so the cloud load
//! balancer sends traffic only to nodes that have endpoints: 200 with the local endpoint count
//! when there are some, 503 when there are none.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddrV6};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use tokio::task::JoinHandle;

use crate::model::HealthCheck;

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ServiceName<'a> {
    namespace: &'a str,
    name: &'a str,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Answer<'a> {
    service: ServiceName<'a>,
    local_endpoints: usize,
    service_proxy_healthy: bool,
}

type SharedCheck = Arc<Mutex<HealthCheck>>;

fn answer(check: &HealthCheck) -> Response {
    let body = Answer {
        service: ServiceName { namespace: &check.namespace, name: &check.name },
        local_endpoints: check.local_endpoints,
        service_proxy_healthy: true,
    };
    let status = if check.local_endpoints > 0 { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    let mut response = (status, axum::Json(body)).into_response();
    let headers = response.headers_mut();
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    if let Ok(weight) = HeaderValue::from_str(&check.local_endpoints.to_string()) {
        headers.insert("X-Load-Balancing-Endpoint-Weight", weight);
    }
    response
}

/// A listener on `port` of every node address of both families, as a load balancer of either
/// family probes: IPv6's unspecified address with IPV6_V6ONLY off (IPv4 probes arrive
/// v4-mapped), or IPv4's alone on a node without IPv6.
fn listen_on_both_families(port: u16) -> std::io::Result<tokio::net::TcpListener> {
    use nix::sys::socket::{
        AddressFamily, Backlog, SockFlag, SockType, SockaddrIn6, bind, listen, setsockopt, socket, sockopt,
    };
    use std::os::fd::AsRawFd;
    let flags = SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK;
    let listener = match socket(AddressFamily::Inet6, SockType::Stream, flags, None) {
        Ok(fd) => {
            setsockopt(&fd, sockopt::Ipv6V6Only, &false)?;
            setsockopt(&fd, sockopt::ReuseAddr, &true)?;
            bind(fd.as_raw_fd(), &SockaddrIn6::from(SocketAddrV6::new(Ipv6Addr::UNSPECIFIED, port, 0, 0)))?;
            listen(&fd, Backlog::new(128).expect("a valid backlog"))?;
            std::net::TcpListener::from(fd)
        }
        Err(nix::errno::Errno::EAFNOSUPPORT) => {
            let listener = std::net::TcpListener::bind((Ipv4Addr::UNSPECIFIED, port))?;
            listener.set_nonblocking(true)?;
            listener
        }
        Err(error) => return Err(error.into()),
    };
    tokio::net::TcpListener::from_std(listener)
}

struct Server {
    check: SharedCheck,
    task: JoinHandle<()>,
}

/// The health-check servers running now, one per port.
#[derive(Default)]
pub struct HealthCheckServers {
    servers: BTreeMap<u16, Server>,
}

impl HealthCheckServers {
    /// Serves exactly `wanted`: updates the answers of running servers, starts new ones and
    /// stops those no longer wanted. A port that cannot be bound is logged and retried on the
    /// next sync.
    pub async fn sync(&mut self, wanted: &BTreeMap<u16, HealthCheck>) {
        self.servers.retain(|port, server| {
            let keep = wanted.contains_key(port);
            if !keep {
                server.task.abort();
                tracing::info!(port, "health-check node port closed");
            }
            keep
        });
        for (&port, check) in wanted {
            if let Some(server) = self.servers.get(&port) {
                *server.check.lock().expect("health-check lock") = check.clone();
                continue;
            }
            let listener = match listen_on_both_families(port) {
                Ok(listener) => listener,
                Err(error) => {
                    tracing::error!(port, %error, service = %format!("{}/{}", check.namespace, check.name), "binding a health-check node port");
                    continue;
                }
            };
            let shared: SharedCheck = Arc::new(Mutex::new(check.clone()));
            let router = Router::new()
                .fallback(|State(check): State<SharedCheck>| async move {
                    answer(&check.lock().expect("health-check lock"))
                })
                .with_state(shared.clone());
            let task = tokio::spawn(async move {
                if let Err(error) = axum::serve(listener, router).await {
                    tracing::error!(port, %error, "health-check server stopped");
                }
            });
            tracing::info!(port, service = %format!("{}/{}", check.namespace, check.name), "health-check node port open");
            self.servers.insert(port, Server { check: shared, task });
        }
    }
}

impl Drop for HealthCheckServers {
    fn drop(&mut self) {
        for server in self.servers.values() {
            server.task.abort();
        }
    }
}
