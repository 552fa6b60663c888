//! `GET /status`: the config in force, the last reload, and every listener, route, pool and
//! backend with its live state and request rate.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::Json;
use serde_json::{json, Value};

use super::AdminState;
use crate::snapshot::Snapshot;
use crate::upstream::Pool;

/// How far back request rates look.
const RATE_WINDOW: Duration = Duration::from_secs(10);
/// How often request counts are sampled.
const SAMPLE_EVERY: Duration = Duration::from_secs(1);

/// Requests answered per route and attempts per backend, sampled over the last
/// [`RATE_WINDOW`], for requests-per-second figures.
#[derive(Default)]
pub struct Rates {
    samples: Mutex<VecDeque<Sample>>,
}

struct Sample {
    at: Instant,
    /// By route name, and by `pool/address`.
    counts: HashMap<String, u64>,
}

impl Rates {
    /// Records the counts of `snapshot` now.
    fn sample(&self, snapshot: &Snapshot, at: Instant) {
        let mut counts = HashMap::new();
        for route in snapshot.router.routes() {
            counts.insert(route_key(&route.name), route.metrics.total());
        }
        for pool in &snapshot.pools {
            for backend in &pool.backends {
                counts.insert(
                    backend_key(&pool.name, &backend.label),
                    backend.state.metrics.total(),
                );
            }
        }
        let mut samples = self.samples.lock().unwrap_or_else(|p| p.into_inner());
        samples.push_back(Sample { at, counts });
        while samples
            .front()
            .is_some_and(|s| at.duration_since(s.at) > RATE_WINDOW)
        {
            samples.pop_front();
        }
    }

    /// Per second over the window, for `key`; 0 until two samples hold it.
    fn per_second(&self, key: &str) -> f64 {
        let samples = self.samples.lock().unwrap_or_else(|p| p.into_inner());
        let holding = |s: &Sample| Some((s.at, *s.counts.get(key)?));
        let (Some((first_at, first)), Some((last_at, last))) = (
            samples.iter().find_map(holding),
            samples.iter().rev().find_map(holding),
        ) else {
            return 0.0;
        };
        let seconds = last_at.duration_since(first_at).as_secs_f64();
        if seconds <= 0.0 {
            return 0.0;
        }
        // Counters only grow for one key; a reset (route removed and added again) reads 0.
        (last.saturating_sub(first)) as f64 / seconds
    }
}

fn route_key(route: &str) -> String {
    format!("route {route}")
}

fn backend_key(pool: &str, backend: &str) -> String {
    format!("backend {pool}/{backend}")
}

/// Samples request counts every second, for as long as the admin API runs.
pub async fn sample_rates(state: AdminState) {
    let mut every = tokio::time::interval(SAMPLE_EVERY);
    loop {
        every.tick().await;
        state.rates.sample(&state.store.load(), Instant::now());
    }
}

/// `GET /status`.
pub async fn status(State(state): State<AdminState>) -> Json<Value> {
    let snapshot = state.store.load();
    let mut doc = describe(&snapshot, Some(&state.rates));
    doc["last_reload"] = json!(state.store.last_reload().map(|r| (*r).clone()));
    doc["uptime_seconds"] = json!(state.started.elapsed().as_secs());
    doc["pid"] = json!(std::process::id());
    doc["draining"] = json!(state.draining.load(Ordering::Acquire));
    doc["in_flight"] = json!(state.metrics.in_flight.get());
    doc["sidecars"] = state.control.sidecars();
    Json(doc)
}

/// The config part of `/status`, with each backend's live state (and request rates, when
/// `rates` are kept).
pub fn describe(snapshot: &Snapshot, rates: Option<&Rates>) -> Value {
    let now = Instant::now();
    let rate = |key: String| rates.map_or(0.0, |r| round(r.per_second(&key)));
    json!({
        "config": { "version": snapshot.version, "digest": snapshot.digest },
        "listeners": snapshot.listeners.iter().map(|l| json!({
            "name": l.name,
            "address": l.address.to_string(),
            "tls": l.tls.is_some(),
            "http2": l.tls.as_ref().is_some_and(|t| t.http2),
            "h2c": l.h2c,
        })).collect::<Vec<_>>(),
        "routes": snapshot.router.routes().iter().map(|r| json!({
            "name": r.name,
            "host": r.host.to_config_string(),
            "path_prefix": r.path_prefix,
            "methods": r.methods.iter().map(|m| m.as_str()).collect::<Vec<_>>(),
            "pool": snapshot.pool(r.pool).name,
            "requests_per_second": rate(route_key(&r.name)),
        })).collect::<Vec<_>>(),
        "pools": snapshot.pools.iter().map(|p| json!({
            "name": p.name,
            "balance": p.balance,
            "health_checks": p.health.is_some(),
            "outlier_detection": p.outlier.is_some(),
            "in_flight": p.state.in_flight.load(Ordering::Relaxed),
            "backends": (0..p.backends.len()).map(|id| backend(p, id, now, rates)).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
    })
}

/// One backend's entry in `/status` (and the drain endpoints' answer).
pub fn backend(pool: &Pool, id: usize, now: Instant, rates: Option<&Rates>) -> Value {
    let b = &pool.backends[id];
    let health = b.state.health().clone();
    let in_flight = b.state.in_flight.load(Ordering::Acquire);
    let drain = match (b.state.is_drained(), in_flight) {
        (false, _) => "active",
        (true, 0) => "drained",
        (true, _) => "draining",
    };
    let rate = rates.map_or(0.0, |r| {
        round(r.per_second(&backend_key(&pool.name, &b.label)))
    });
    json!({
        "pool": pool.name,
        "address": b.label,
        "weight": b.weight,
        "available": pool.available(id, now),
        "healthy": health.healthy,
        "last_probe": health.last_probe,
        "breaker": b.state.breaker().state(now).name(),
        "in_flight": in_flight,
        "drain": drain,
        "requests_per_second": rate,
    })
}

fn round(rate: f64) -> f64 {
    (rate * 100.0).round() / 100.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_are_counted_over_the_window() {
        let rates = Rates::default();
        let t0 = Instant::now();
        let push = |at: Instant, n: u64| {
            let mut counts = HashMap::new();
            counts.insert("route a".to_string(), n);
            rates
                .samples
                .lock()
                .unwrap()
                .push_back(Sample { at, counts });
        };
        assert_eq!(rates.per_second("route a"), 0.0);
        push(t0, 100);
        assert_eq!(rates.per_second("route a"), 0.0, "one sample is no rate");
        push(t0 + Duration::from_secs(2), 140);
        assert_eq!(rates.per_second("route a"), 20.0);
        assert_eq!(rates.per_second("route b"), 0.0);
    }
}
