//! Upstream pools: their backends, balancer and timeouts, compiled from `pools:`.

use std::net::SocketAddr;
use std::time::Duration;

use crate::balance::{BackendId, Balancer, SmoothWeightedRoundRobin};
use crate::config::raw::{RawBalance, RawPool};
use crate::config::Errors;
use crate::metrics::{BackendMetrics, Metrics};

/// Upper bound for a backend weight, as in nginx (weights are relative, not capacities).
pub const MAX_WEIGHT: u32 = 1000;

/// A pool of interchangeable upstream backends.
pub struct Pool {
    /// The key under `pools:`.
    pub name: String,
    /// In the order the config lists them; a [`BackendId`] indexes this.
    pub backends: Vec<Backend>,
    /// The configured algorithm, for status output.
    pub balance: &'static str,
    balancer: Box<dyn Balancer>,
    /// Per-attempt timeouts.
    pub timeouts: Timeouts,
}

/// One upstream address in a pool.
pub struct Backend {
    /// Where requests go.
    pub address: SocketAddr,
    /// The address as text, used as a label and in logs.
    pub label: String,
    /// Relative share of requests.
    pub weight: u32,
    /// Upstream outcome counters for this backend.
    pub metrics: BackendMetrics,
}

/// Timeouts for one upstream attempt.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// TCP connect.
    pub connect: Duration,
    /// Between reads of the response.
    pub read: Duration,
    /// Between writes of the request.
    pub write: Duration,
    /// Idle time before a pooled keep-alive connection is closed.
    pub idle: Duration,
}

impl Pool {
    /// Chooses a backend for one request, or `None` when the pool has none usable.
    pub fn select(&self) -> Option<BackendId> {
        self.balancer.select(&|_| true)
    }

    /// The backend with this id.
    pub fn backend(&self, id: BackendId) -> Option<&Backend> {
        self.backends.get(id)
    }
}

/// Compiles `pools.<name>`. Errors go to `errors` under `path`.
pub fn compile(
    name: &str,
    raw: &RawPool,
    path: &str,
    metrics: &Metrics,
    errors: &mut Errors,
) -> Option<Pool> {
    let start = errors.len();
    if raw.backends.is_empty() {
        errors.push(
            format!("{path}.backends"),
            "a pool needs at least one backend",
        );
    }
    let mut backends: Vec<Backend> = Vec::with_capacity(raw.backends.len());
    for (i, backend) in raw.backends.iter().enumerate() {
        let at = format!("{path}.backends[{i}]");
        let Some(address) = errors.address(&format!("{at}.address"), &backend.address) else {
            continue;
        };
        if backends.iter().any(|b| b.address == address) {
            errors.push(
                format!("{at}.address"),
                format!("duplicate backend {address} in pool `{name}`"),
            );
            continue;
        }
        let weight = backend.weight.unwrap_or(1);
        if !(1..=MAX_WEIGHT).contains(&weight) {
            errors.push(
                format!("{at}.weight"),
                format!("must be between 1 and {MAX_WEIGHT} (got {weight})"),
            );
            continue;
        }
        let label = address.to_string();
        backends.push(Backend {
            metrics: metrics.backend(name, &label),
            address,
            label,
            weight,
        });
    }

    let t = &raw.timeouts;
    let timeouts = Timeouts {
        connect: t.connect.map_or(Duration::from_secs(1), |d| d.0),
        read: t.read.map_or(Duration::from_secs(30), |d| d.0),
        write: t.write.map_or(Duration::from_secs(30), |d| d.0),
        idle: t.idle.map_or(Duration::from_secs(60), |d| d.0),
    };
    for (key, value) in [
        ("connect", timeouts.connect),
        ("read", timeouts.read),
        ("write", timeouts.write),
    ] {
        if value.is_zero() {
            errors.push(format!("{path}.timeouts.{key}"), "must be > 0 (got 0s)");
        }
    }

    if errors.len() > start {
        return None;
    }
    let weights: Vec<u32> = backends.iter().map(|b| b.weight).collect();
    let (balance, balancer): (&'static str, Box<dyn Balancer>) =
        match raw.balance.unwrap_or(RawBalance::WeightedRoundRobin) {
            RawBalance::WeightedRoundRobin => (
                "weighted_round_robin",
                Box::new(SmoothWeightedRoundRobin::new(&weights)),
            ),
        };
    Some(Pool {
        name: name.to_string(),
        backends,
        balance,
        balancer,
        timeouts,
    })
}
