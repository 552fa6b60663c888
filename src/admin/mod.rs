//! The admin listener: liveness, readiness, Prometheus metrics, the status document and page,
//! and the operations an operator runs on a live proxy (reload, drain). Bound to loopback
//! unless a bearer token guards it; every POST needs the token when one is configured.

mod auth;
mod page;
mod status;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::future::join_all;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::config::units::parse_duration;
use crate::metrics::Metrics;
use crate::snapshot::{ConfigStore, ReloadReport};
use crate::upstream::Pool;

pub use status::{describe, Rates};

/// How long readiness waits for a backend to accept a TCP connection.
const PROBE_TIMEOUT: Duration = Duration::from_millis(500);
/// The longest `?wait=` a drain may ask for.
const MAX_DRAIN_WAIT: Duration = Duration::from_secs(600);

/// What the admin API asks of the runtime, which sits above it.
#[async_trait]
pub trait Control: Send + Sync {
    /// Reloads the config file and says what happened.
    async fn reload(&self) -> Arc<ReloadReport>;
    /// The sidecar processes, for `/status`.
    fn sidecars(&self) -> Value;
}

/// What the admin handlers read.
#[derive(Clone)]
pub struct AdminState {
    /// The live config.
    pub store: Arc<ConfigStore>,
    /// Every metric family.
    pub metrics: Arc<Metrics>,
    /// Reloads and sidecars.
    pub control: Arc<dyn Control>,
    /// Set once SIGTERM arrives: readiness fails so balancers in front stop sending traffic.
    pub draining: Arc<AtomicBool>,
    /// When the process started.
    pub started: Instant,
    /// Request rates, sampled every second.
    pub rates: Arc<Rates>,
    /// The response cache, for purges.
    pub cache: Arc<crate::cache::Cache>,
}

/// The admin API.
pub fn app(state: AdminState) -> Router {
    Router::new()
        .route("/", get(page::page))
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .route("/status", get(status::status))
        .route("/reload", post(reload))
        .route("/cache/purge", post(purge))
        .route("/pools/{pool}/backends/{address}", get(backend))
        .route("/pools/{pool}/backends/{address}/drain", post(drain))
        .route("/pools/{pool}/backends/{address}/undrain", post(undrain))
        .fallback(not_found)
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::require_token,
        ))
        .with_state(state)
}

/// The JSON error every admin failure answers with.
fn error(status: StatusCode, code: &str, message: impl Into<String>) -> Response {
    let body = json!({ "error": code, "message": message.into() });
    (status, Json(body)).into_response()
}

async fn not_found(uri: axum::http::Uri) -> Response {
    error(
        StatusCode::NOT_FOUND,
        "not_found",
        format!("no admin endpoint {}", uri.path()),
    )
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

/// `POST /reload`: 200 with the new version and digest, or 422 with every error (the
/// config in force keeps serving).
async fn reload(State(state): State<AdminState>) -> Response {
    let report = state.control.reload().await;
    let code = if report.result == "ok" {
        StatusCode::OK
    } else {
        StatusCode::UNPROCESSABLE_ENTITY
    };
    (code, Json(json!(*report))).into_response()
}

/// What `POST /cache/purge` removes: one URL or every URL under a prefix.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Purge {
    /// `scheme://host/path`: every query string and variant of it.
    url: Option<String>,
    /// Every URL that starts with this.
    prefix: Option<String>,
}

/// `POST /cache/purge` with `{"url": "http://host/path"}` or `{"prefix": "http://host/"}`:
/// removes the stored responses, and says how many.
async fn purge(State(state): State<AdminState>, body: axum::body::Bytes) -> Response {
    let purge: Purge = match serde_json::from_slice(&body) {
        Ok(purge) => purge,
        Err(e) => return error(StatusCode::BAD_REQUEST, "bad_request", e.to_string()),
    };
    let (target, whole) = match (purge.url, purge.prefix) {
        (Some(url), None) => (url, true),
        (None, Some(prefix)) => (prefix, false),
        _ => {
            return error(
                StatusCode::BAD_REQUEST,
                "bad_request",
                "give either `url` or `prefix`",
            )
        }
    };
    // Stored URLs are `scheme://host/path` (scheme and host in lower case): a target in
    // another form could only ever match nothing.
    let Some(target) = crate::cache::policy::purge_url(&target) else {
        let which = if whole { "url" } else { "prefix" };
        let message = format!("`{which}` must be scheme://host[:port]/path");
        return error(StatusCode::BAD_REQUEST, "bad_request", message);
    };
    let purged = match whole {
        true => state.cache.purge_url(&target),
        false => state
            .cache
            .purge_where(|stored| stored.starts_with(&target)),
    };
    tracing::info!(purged, "cache purged by the admin API");
    Json(json!({ "purged": purged })).into_response()
}

#[derive(Deserialize)]
struct DrainQuery {
    /// How long to wait for the backend's requests in flight to finish, e.g. `30s`.
    wait: Option<String>,
}

/// `GET /pools/{pool}/backends/{address}`: the backend's state, drain included.
async fn backend(
    State(state): State<AdminState>,
    Path((pool, address)): Path<(String, String)>,
) -> Response {
    let snapshot = state.store.load();
    match find_backend(&snapshot.pools, &pool, &address) {
        Ok((pool, id)) => Json(status::backend(pool, id, Instant::now(), None)).into_response(),
        Err(missing) => missing.into_response(),
    }
}

/// `POST /pools/{pool}/backends/{address}/drain[?wait=30s]`: the backend takes no new
/// requests (sticky clients re-pin) while those in flight finish. With `wait`, answers once
/// none is left in flight or the wait is over; `"drain"` says which (`drained` or
/// `draining`).
async fn drain(
    State(state): State<AdminState>,
    Path((pool, address)): Path<(String, String)>,
    Query(query): Query<DrainQuery>,
) -> Response {
    let wait = match query.wait.as_deref().map(parse_duration) {
        None => Duration::ZERO,
        Some(Ok(wait)) if wait <= MAX_DRAIN_WAIT => wait,
        Some(Ok(_)) => {
            return error(
                StatusCode::BAD_REQUEST,
                "bad_request",
                format!("wait is at most {MAX_DRAIN_WAIT:?}"),
            )
        }
        Some(Err(e)) => return error(StatusCode::BAD_REQUEST, "bad_request", e),
    };
    let snapshot = state.store.load();
    let (found, id) = match find_backend(&snapshot.pools, &pool, &address) {
        Ok(found) => found,
        Err(missing) => return missing.into_response(),
    };
    let backend = found.backends[id].state.clone();
    if backend.set_drained(true) {
        tracing::info!(pool = %pool, backend = %address, "backend drained by the admin API");
    }
    let deadline = tokio::time::Instant::now() + wait;
    while backend.in_flight.load(Ordering::Acquire) > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Json(status::backend(found, id, Instant::now(), None)).into_response()
}

/// `POST /pools/{pool}/backends/{address}/undrain`: the backend takes requests again.
async fn undrain(
    State(state): State<AdminState>,
    Path((pool, address)): Path<(String, String)>,
) -> Response {
    let snapshot = state.store.load();
    match find_backend(&snapshot.pools, &pool, &address) {
        Ok((found, id)) => {
            if found.backends[id].state.set_drained(false) {
                tracing::info!(pool = %pool, backend = %address, "backend undrained by the admin API");
            }
            Json(status::backend(found, id, Instant::now(), None)).into_response()
        }
        Err(missing) => missing.into_response(),
    }
}

/// A pool or backend named in a path that does not exist: its error code and message.
struct NotFound(&'static str, String);

impl IntoResponse for NotFound {
    fn into_response(self) -> Response {
        error(StatusCode::NOT_FOUND, self.0, self.1)
    }
}

/// The pool and backend id named in a path.
fn find_backend<'a>(
    pools: &'a [Pool],
    pool: &str,
    address: &str,
) -> Result<(&'a Pool, usize), NotFound> {
    let Some(found) = pools.iter().find(|p| p.name == pool) else {
        return Err(NotFound("no_such_pool", format!("no pool named `{pool}`")));
    };
    let id = address
        .parse::<SocketAddr>()
        .ok()
        .and_then(|a| found.backends.iter().position(|b| b.address == a));
    match id {
        Some(id) => Ok((found, id)),
        None => Err(NotFound(
            "no_such_backend",
            format!("pool `{pool}` has no backend {address}"),
        )),
    }
}

/// Serves the admin API on an already-bound listener until `stop` completes (the socket went
/// to a successor) or the process exits. It stays up while the proxy drains, so `/ready` can
/// report the drain.
pub async fn serve(
    listener: std::net::TcpListener,
    state: AdminState,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!("admin listener: {e}");
            return;
        }
    };
    tokio::spawn(status::sample_rates(state.clone()));
    if let Err(e) = axum::serve(listener, app(state))
        .with_graceful_shutdown(stop)
        .await
    {
        tracing::error!("admin listener stopped: {e}");
    }
}
