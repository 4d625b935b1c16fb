//! kube-proxy's health endpoints on its port (10256): `/healthz` (readiness: healthy and this
//! node not being deleted) and `/livez` (liveness: healthy), answering with the same JSON.

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

use crate::daemon::sync::HealthState;

pub type SharedHealth = Arc<Mutex<HealthState>>;

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Report {
    last_updated: String,
    current_time: String,
    node_eligible: bool,
    /// lb's own: the source (the API server) is unreachable, so what the data path serves may
    /// be stale; since when. It stays healthy: the data path still serves.
    #[serde(skip_serializing_if = "Option::is_none")]
    source_stale_since: Option<String>,
}

fn rfc3339(time: Option<SystemTime>) -> String {
    time.and_then(|t| Timestamp::try_from(t).ok()).map(|t| t.to_string()).unwrap_or_default()
}

fn report(health: &SharedHealth, need_eligible: bool) -> (StatusCode, Json<Report>) {
    let health = health.lock().expect("health lock");
    let now = SystemTime::now();
    let ok = health.healthy(now) && (!need_eligible || health.node_eligible);
    let status = if ok { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    let body = Report {
        last_updated: rfc3339(health.last_updated),
        current_time: rfc3339(Some(now)),
        node_eligible: health.node_eligible,
        source_stale_since: health.source_stale_since.map(|since| rfc3339(Some(since))),
    };
    (status, Json(body))
}

pub fn router(health: SharedHealth) -> Router {
    Router::new()
        .route("/healthz", get(|State(h): State<SharedHealth>| async move { report(&h, true) }))
        .route("/livez", get(|State(h): State<SharedHealth>| async move { report(&h, false) }))
        .with_state(health)
}

/// Binds now (so a taken port is a startup error) and serves in the background.
pub async fn serve(address: SocketAddr, health: SharedHealth) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(address)
        .await
        .map_err(|e| anyhow::anyhow!("binding the health server to {address}: {e}"))?;
    tokio::spawn(async move {
        if let Err(error) = axum::serve(listener, router(health)).await {
            tracing::error!(%error, "health server stopped");
        }
    });
    Ok(())
}
