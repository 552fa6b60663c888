//! The admin listener: liveness, readiness, Prometheus metrics and a JSON status document.
//! Bound to loopback in the shipped configs.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use futures::future::join_all;
use serde_json::{json, Value};
use std::sync::atomic::Ordering as AtomicOrdering;
use std::time::Instant;

use crate::metrics::Metrics;
use crate::snapshot::{ConfigStore, Snapshot};
use crate::supervisor::Supervisor;

/// How long readiness waits for a backend to accept a TCP connection.
const PROBE_TIMEOUT: Duration = Duration::from_millis(500);

/// What the admin handlers read.
#[derive(Clone)]
pub struct AdminState {
    /// The live config.
    pub store: Arc<ConfigStore>,
    /// Every metric family.
    pub metrics: Arc<Metrics>,
    /// Sidecar processes.
    pub supervisor: Arc<Supervisor>,
    /// Set once SIGTERM arrives: readiness fails so balancers in front stop sending traffic.
    pub draining: Arc<AtomicBool>,
}

/// The admin API.
pub fn app(state: AdminState) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .route("/status", get(status))
        .fallback(not_found)
        .with_state(state)
}

async fn not_found(uri: axum::http::Uri) -> Response {
    let body =
        json!({ "error": "not_found", "message": format!("no admin endpoint {}", uri.path()) });
    (StatusCode::NOT_FOUND, Json(body)).into_response()
}

async fn health() -> Json<Value> {
    Json(json!({ "status": "ok" }))
}

/// 200 once the config is loaded, the proxy is not draining, and every pool a route uses has
/// a backend that passes its health checks (or, without checks, accepts a TCP connection);
/// otherwise 503 naming what is missing. Pools no route uses cannot fail a request, so they
/// do not count.
async fn ready(State(state): State<AdminState>) -> Response {
    if state.draining.load(Ordering::Acquire) {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "ready": false, "reason": "draining" })),
        )
            .into_response();
    }
    let snapshot = state.store.load();
    let routed = snapshot.pools.iter().filter(|p| snapshot.is_routed(p));
    let checks = routed.map(|pool| async move {
        let reachable = if pool.health.is_some() {
            // The pool's own checks know better than a bare connect.
            pool.backends
                .iter()
                .filter(|b| b.state.health().healthy)
                .count()
        } else {
            let probes = pool.backends.iter().map(|b| reachable(b.address));
            join_all(probes).await.into_iter().filter(|ok| *ok).count()
        };
        (pool.name.clone(), reachable)
    });
    let results = join_all(checks).await;
    let unreachable: Vec<&str> = results
        .iter()
        .filter(|(_, n)| *n == 0)
        .map(|(name, _)| name.as_str())
        .collect();
    let pools: serde_json::Map<String, Value> = results
        .iter()
        .map(|(name, n)| (name.clone(), json!({ "reachable_backends": n })))
        .collect();
    let code = if unreachable.is_empty() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = json!({
        "ready": unreachable.is_empty(),
        "config_version": snapshot.version,
        "unreachable_pools": unreachable,
        "pools": pools,
    });
    (code, Json(body)).into_response()
}

async fn reachable(address: SocketAddr) -> bool {
    matches!(
        tokio::time::timeout(PROBE_TIMEOUT, tokio::net::TcpStream::connect(address)).await,
        Ok(Ok(_))
    )
}

async fn metrics(State(state): State<AdminState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(),
    )
        .into_response()
}

async fn status(State(state): State<AdminState>) -> Json<Value> {
    let snapshot = state.store.load();
    let mut doc = describe(&snapshot);
    doc["draining"] = json!(state.draining.load(Ordering::Acquire));
    doc["in_flight"] = json!(state.metrics.in_flight.get());
    doc["sidecars"] = json!(state.supervisor.status());
    Json(doc)
}

/// The config part of `/status`, with each backend's live state.
pub fn describe(snapshot: &Snapshot) -> Value {
    let now = Instant::now();
    json!({
        "config": { "version": snapshot.version, "digest": snapshot.digest },
        "listeners": snapshot.listeners.iter().map(|l| json!({
            "name": l.name,
            "address": l.address.to_string(),
            "tls": l.tls.is_some(),
            "http2": l.tls.as_ref().is_some_and(|t| t.http2),
        })).collect::<Vec<_>>(),
        "routes": snapshot.router.routes().iter().map(|r| json!({
            "name": r.name,
            "host": r.host.to_config_string(),
            "path_prefix": r.path_prefix,
            "methods": r.methods.iter().map(|m| m.as_str()).collect::<Vec<_>>(),
            "pool": r.pool.name,
        })).collect::<Vec<_>>(),
        "pools": snapshot.pools.iter().map(|p| json!({
            "name": p.name,
            "balance": p.balance,
            "health_checks": p.health.is_some(),
            "outlier_detection": p.outlier.is_some(),
            "in_flight": p.state.in_flight.load(AtomicOrdering::Relaxed),
            "backends": p.backends.iter().enumerate().map(|(id, b)| {
                let available = p.available(id, now);
                let health = b.state.health().clone();
                json!({
                    "address": b.label,
                    "weight": b.weight,
                    "available": available,
                    "healthy": health.healthy,
                    "last_probe": health.last_probe,
                    "breaker": b.state.breaker().state(now).name(),
                    "in_flight": b.state.in_flight.load(AtomicOrdering::Relaxed),
                })
            }).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
    })
}

/// Serves the admin API on an already-bound listener until the process exits. It stays up
/// while the proxy drains, so `/ready` can report the drain.
pub async fn serve(listener: std::net::TcpListener, state: AdminState) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!("admin listener: {e}");
            return;
        }
    };
    if let Err(e) = axum::serve(listener, app(state)).await {
        tracing::error!("admin listener stopped: {e}");
    }
}
