//! kube-proxy's health endpoints on its port (10256): `/healthz` (readiness: healthy and this
//! node not being deleted) and `/livez` (liveness: healthy), answering with kube-proxy's JSON
//! (as of v1.36: `healthy`, and a `status` per IP family; lb programs both in one sync, as a
//! dual-stack kube-proxy's two proxiers report them).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use axum::Json;
use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use k8s_openapi::jiff::Timestamp;
use serde::Serialize;

use crate::daemon::metrics::KubeProxyMetrics;
use crate::daemon::sync::HealthState;

pub type SharedHealth = Arc<Mutex<HealthState>>;

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Report {
    /// Now while healthy (kube-proxy's compatibility rule), else when the maps last matched.
    last_updated: String,
    current_time: String,
    /// `/healthz` only.
    #[serde(skip_serializing_if = "Option::is_none")]
    node_eligible: Option<bool>,
    healthy: bool,
    /// Per IP family lb programs: when its maps last matched the source, and whether it is
    /// healthy. Absent before the first sync, as in kube-proxy.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    status: BTreeMap<&'static str, FamilyHealth>,
    /// lb's own: the source (the API server) is unreachable, so what the data path serves may
    /// be stale; since when. It stays healthy: the data path still serves.
    #[serde(skip_serializing_if = "Option::is_none")]
    source_stale_since: Option<String>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct FamilyHealth {
    last_updated: String,
    healthy: bool,
}

/// RFC 3339 with nanoseconds, as Go writes a time; a time never set is Go's zero time.
fn rfc3339(time: Option<SystemTime>) -> String {
    time.and_then(|t| Timestamp::try_from(t).ok())
        .map_or_else(|| "0001-01-01T00:00:00Z".to_string(), |t| t.to_string())
}

/// Which endpoint answers.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Probe {
    Healthz,
    Livez,
}

fn report(
    state: &HealthServer,
    probe: Probe,
) -> (StatusCode, [(axum::http::header::HeaderName, &'static str); 1], Json<Report>) {
    let health = state.health.lock().expect("health lock");
    let now = SystemTime::now();
    let healthy = health.healthy(now);
    let ok = healthy && (probe == Probe::Livez || health.node_eligible);
    let code = if ok { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    let mut status = BTreeMap::new();
    if health.last_updated.is_some() {
        for family in ["IPv4", "IPv6"] {
            status.insert(family, FamilyHealth { last_updated: rfc3339(health.last_updated), healthy });
        }
    }
    let body = Report {
        last_updated: rfc3339(if ok { Some(now) } else { health.last_updated }),
        current_time: rfc3339(Some(now)),
        node_eligible: (probe == Probe::Healthz).then_some(health.node_eligible),
        healthy,
        status,
        source_stale_since: health.source_stale_since.map(|since| rfc3339(Some(since))),
    };
    let answers = match probe {
        Probe::Healthz => &state.metrics.healthz,
        Probe::Livez => &state.metrics.livez,
    };
    KubeProxyMetrics::count_health_answer(answers, code);
    // As kube-proxy answers (its JSON is never to be sniffed as anything else).
    (code, [(axum::http::header::X_CONTENT_TYPE_OPTIONS, "nosniff")], Json(body))
}

#[derive(Clone)]
struct HealthServer {
    health: SharedHealth,
    metrics: Arc<KubeProxyMetrics>,
}

pub fn router(health: SharedHealth, metrics: Arc<KubeProxyMetrics>) -> Router {
    Router::new()
        .route("/healthz", get(|State(s): State<HealthServer>| async move { report(&s, Probe::Healthz) }))
        .route("/livez", get(|State(s): State<HealthServer>| async move { report(&s, Probe::Livez) }))
        .with_state(HealthServer { health, metrics })
}

/// Binds now (so a taken port is a startup error) and serves in the background.
pub async fn serve(
    address: SocketAddr,
    health: SharedHealth,
    metrics: Arc<KubeProxyMetrics>,
) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(address)
        .await
        .map_err(|e| anyhow::anyhow!("binding the health server to {address}: {e}"))?;
    tokio::spawn(async move {
        if let Err(error) = axum::serve(listener, router(health, metrics)).await {
            tracing::error!(%error, "health server stopped");
        }
    });
    Ok(())
}
