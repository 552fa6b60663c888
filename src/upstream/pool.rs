//! Upstream pools, compiled from `pools:`: backends, balancer, timeouts, and the resilience
//! policies (health checks, outlier detection, panic mode, limits, retries, slow start,
//! sticky sessions). Backend choice and outcome bookkeeping live here; the policies' state
//! machines live in their own modules.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::HeaderName;

use crate::balance::{
    BackendId, BackendView, Balancer, ConsistentHash, LeastConnections, SmoothWeightedRoundRobin,
};
use crate::config::raw::{RawBalance, RawHashKey, RawHashSource, RawPanic, RawPool};
use crate::config::{Env, Errors};
use crate::health::{self, HealthPolicy};
use crate::live::{BackendState, PoolState};
use crate::metrics::Outcome;
use crate::outlier::{self, Admission, OutlierPolicy, Transition};
use crate::retry::{self, RetryPolicy};
use crate::slow_start;
use crate::sticky::{self, StickyPolicy};

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
    /// What the balancer hashes; `Some` exactly for `consistent_hash` pools.
    pub hash_key: Option<HashKey>,
    /// Per-attempt timeouts.
    pub timeouts: Timeouts,
    /// Active checks; `None` trusts the backends.
    pub health: Option<HealthPolicy>,
    /// Passive outlier detection; `None` when turned off.
    pub outlier: Option<OutlierPolicy>,
    /// What happens when no backend is available.
    pub panic: PanicMode,
    /// Most requests in flight to the pool.
    pub max_in_flight: Option<u64>,
    /// When and how much to retry.
    pub retries: RetryPolicy,
    /// Weight ramp for joining or recovering backends.
    pub slow_start: Option<Duration>,
    /// Sticky sessions.
    pub sticky: Option<StickyPolicy>,
    /// A digest of the pool's settings other than its backends, to tell a reload that
    /// changed its policies.
    pub fingerprint: u64,
    /// Live state (in flight, retry budget, counters), shared with the other snapshots of
    /// this pool once activated.
    pub state: Arc<PoolState>,
}

/// One upstream address in a pool.
pub struct Backend {
    /// Where requests go.
    pub address: SocketAddr,
    /// The address as text, used as a label, in logs and in sticky cookies.
    pub label: String,
    /// Configured relative share of requests.
    pub weight: u32,
    /// Health, breaker, in-flight count, drain, counters: shared with the other snapshots
    /// that hold this backend once activated.
    pub state: Arc<BackendState>,
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
    /// The whole exchange, retries included (not for upgraded connections).
    pub total: Option<Duration>,
}

/// What `consistent_hash` hashes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HashKey {
    /// The client address (after `trusted_proxies`).
    ClientIp,
    /// The request path.
    Path,
    /// A request header's value.
    Header(HeaderName),
    /// A cookie's value.
    Cookie(String),
}

/// What a pool does when none of its backends is available.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PanicMode {
    /// Spread requests over every backend anyway.
    FailOpen,
    /// Answer 503 with `retry-after`.
    FailClosed,
}

/// Why a pool could not give a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unavailable {
    /// Every backend was already tried for this request.
    Exhausted,
    /// No backend is available and the pool fails closed.
    FailClosed,
    /// The sticky pin is unusable and the pool's stickiness is strict.
    StickyStrict,
}

/// The backend chosen for one attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Choice {
    /// Which backend.
    pub id: BackendId,
    /// This attempt is the half-open probe of the backend's breaker.
    pub probe: bool,
}

struct View<'a> {
    pool: &'a Pool,
    now: Instant,
    tried: &'a [BackendId],
    /// Chosen during this call but refused by their breaker.
    refused: &'a [BackendId],
    /// Panic mode: health and ejection are ignored.
    everyone: bool,
}

impl BackendView for View<'_> {
    fn len(&self) -> usize {
        self.pool.backends.len()
    }

    fn usable(&self, id: BackendId) -> bool {
        !self.tried.contains(&id)
            && !self.refused.contains(&id)
            && !self.pool.backends[id].state.is_drained()
            && (self.everyone || self.pool.available(id, self.now))
    }

    fn weight(&self, id: BackendId) -> u32 {
        let b = &self.pool.backends[id];
        slow_start::effective_weight(
            b.weight,
            b.state.available_since(),
            self.pool.slow_start,
            self.now,
        )
    }

    fn full_weight(&self, id: BackendId) -> u32 {
        self.pool.backends[id]
            .weight
            .saturating_mul(crate::balance::WEIGHT_SCALE)
    }

    fn in_flight(&self, id: BackendId) -> u64 {
        self.pool.backends[id]
            .state
            .in_flight
            .load(Ordering::Relaxed)
    }
}

impl Pool {
    /// The backend with this id.
    pub fn backend(&self, id: BackendId) -> Option<&Backend> {
        self.backends.get(id)
    }

    /// The backend whose address is `label`.
    pub fn find(&self, label: &str) -> Option<BackendId> {
        self.backends.iter().position(|b| b.label == label)
    }

    /// Healthy (or unchecked), not ejected and not drained.
    pub fn available(&self, id: BackendId, now: Instant) -> bool {
        let state = &self.backends[id].state;
        !state.is_drained()
            && state.health().healthy
            && (self.outlier.is_none() || state.breaker().usable(now))
    }

    /// Chooses a backend for one attempt: the sticky `pin` if usable, else the balancer's
    /// pick among available backends not yet `tried` (any of them once every backend has
    /// been tried); when none is available, the panic mode decides. A strict pin is the only
    /// choice: unusable or already tried (it failed this request), the answer is
    /// [`Unavailable::StickyStrict`]. The chosen backend's breaker admits the request
    /// (possibly as its probe).
    pub fn choose(
        &self,
        now: Instant,
        pin: Option<BackendId>,
        key: Option<&[u8]>,
        tried: &[BackendId],
    ) -> Result<Choice, Unavailable> {
        if let Some(pin) = pin {
            if !tried.contains(&pin) && self.available(pin, now) {
                if let Some(choice) = self.admit(pin, now) {
                    return Ok(choice);
                }
            }
            if self.sticky.as_ref().is_some_and(|s| s.strict) {
                return Err(Unavailable::StickyStrict);
            }
        }
        // Each attempt goes to a backend not tried yet, unless every one has been (a resend
        // on a stale connection may list one twice).
        let distinct = (0..self.backends.len())
            .filter(|id| tried.contains(id))
            .count();
        let tried = if distinct < self.backends.len() {
            tried
        } else {
            &[]
        };
        // A breaker may refuse between the view and the admission (another request took the
        // probe): try the next choice, at most once per backend. `refused` stays empty, and
        // unallocated, on the common path.
        let mut refused: Vec<BackendId> = Vec::new();
        for _ in 0..self.backends.len() {
            let view = View {
                pool: self,
                now,
                tried,
                refused: &refused,
                everyone: false,
            };
            let Some(id) = self.balancer.select(&view, key) else {
                break;
            };
            if let Some(choice) = self.admit(id, now) {
                return Ok(choice);
            }
            refused.push(id);
        }
        if (0..self.backends.len()).any(|id| self.available(id, now) && !tried.contains(&id)) {
            // Some backend is available but refused just now; do not panic over a race.
            return Err(Unavailable::Exhausted);
        }
        if tried.len() >= self.backends.len() {
            return Err(Unavailable::Exhausted);
        }
        if self.backends.iter().all(|b| b.state.is_drained()) {
            // Operators drained the whole pool: no panic mode overrides that.
            return Err(Unavailable::FailClosed);
        }
        match self.panic {
            PanicMode::FailClosed => Err(Unavailable::FailClosed),
            PanicMode::FailOpen => {
                let view = View {
                    pool: self,
                    now,
                    tried,
                    refused: &[],
                    everyone: true,
                };
                self.balancer
                    .select(&view, key)
                    .map(|id| Choice { id, probe: false })
                    .ok_or(Unavailable::Exhausted)
            }
        }
    }

    fn admit(&self, id: BackendId, now: Instant) -> Option<Choice> {
        if self.outlier.is_none() {
            return Some(Choice { id, probe: false });
        }
        match self.backends[id].state.breaker().admit(now) {
            Admission::Yes => Some(Choice { id, probe: false }),
            Admission::Probe => Some(Choice { id, probe: true }),
            Admission::No => None,
        }
    }

    /// Records the outcome of one attempt: metrics, and the backend's breaker.
    pub fn record(&self, id: BackendId, now: Instant, outcome: Outcome) {
        let Some(backend) = self.backends.get(id) else {
            return;
        };
        backend.state.metrics.record(outcome);
        let Some(policy) = &self.outlier else { return };
        let may_eject =
            outcome == Outcome::Ok || self.ejected(now) < policy.ejection_cap(self.backends.len());
        let transition = backend
            .state
            .breaker()
            .on_result(now, outcome, policy, may_eject);
        match transition {
            Some(Transition::Ejected(length)) => {
                backend.state.metrics.ejected.set(1);
                backend.state.set_available(false, now);
                tracing::warn!(pool = %self.name, backend = %backend.label, ?length, outcome = outcome.as_str(), "backend ejected");
            }
            Some(Transition::Closed) => {
                backend.state.metrics.ejected.set(0);
                backend.state.set_available(true, now);
                tracing::info!(pool = %self.name, backend = %backend.label, "backend readmitted");
            }
            None => {}
        }
    }

    /// Ends the ejection of the backend at `address`, if it is ejected: there is evidence it
    /// is back, so its next request is the half-open probe.
    pub fn end_ejection(&self, address: std::net::SocketAddr, now: Instant) {
        for backend in self.backends.iter().filter(|b| b.address == address) {
            if backend.state.breaker().end_ejection(now) {
                tracing::info!(pool = %self.name, backend = %backend.label, "ejection ended early: backend is back");
            }
        }
    }

    /// A half-open probe that ended without an outcome.
    pub fn abandon_probe(&self, id: BackendId) {
        if let Some(backend) = self.backends.get(id) {
            backend.state.breaker().probe_abandoned();
        }
    }

    /// Records an active health probe of backend `id`.
    pub fn record_probe(&self, id: BackendId, now: Instant, passed: bool, detail: String) {
        let (Some(backend), Some(policy)) = (self.backends.get(id), &self.health) else {
            return;
        };
        let (changed, first_pass) = {
            let mut health = backend.state.health();
            let first_pass = passed && !health.ever_passed;
            (health.on_probe(policy, passed, detail.clone()), first_pass)
        };
        if changed == Some(true) {
            // The checks saw it down and back up: it was restarted or recovered, so an
            // ejection from while it was down ends now. (A backend that keeps passing its
            // checks while failing requests stays ejected.)
            self.end_ejection(backend.address, now);
        }
        if let Some(healthy) = changed {
            backend.state.metrics.healthy.set(i64::from(healthy));
            // The first pass admits a backend at full weight: it was never seen down.
            if !first_pass {
                backend.state.set_available(healthy, now);
            }
            if healthy {
                tracing::info!(pool = %self.name, backend = %backend.label, %detail, "backend healthy");
            } else {
                tracing::warn!(pool = %self.name, backend = %backend.label, %detail, "backend unhealthy");
            }
        }
    }

    fn ejected(&self, now: Instant) -> usize {
        self.backends
            .iter()
            .filter(|b| b.state.breaker().is_ejected(now))
            .count()
    }
}

/// Compiles `pools.<name>`, with detached state (see `snapshot::activate`). Errors go to
/// `errors` under `path`; `env` gives the sticky secret.
pub fn compile(
    name: &str,
    raw: &RawPool,
    path: &str,
    env: Env,
    errors: &mut Errors,
) -> Option<Pool> {
    let start = errors.len();
    if raw.backends.is_empty() {
        errors.push(
            format!("{path}.backends"),
            "a pool needs at least one backend",
        );
    }
    let health = raw
        .health_check
        .as_ref()
        .and_then(|h| health::compile(h, &format!("{path}.health_check"), errors));
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
            state: Arc::new(BackendState::detached(health.is_some())),
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
        total: t.total.map(|d| d.0),
    };
    for (key, value) in [
        ("connect", timeouts.connect),
        ("read", timeouts.read),
        ("write", timeouts.write),
        ("total", timeouts.total.unwrap_or(Duration::MAX)),
    ] {
        nonzero(errors, &format!("{path}.timeouts.{key}"), value);
    }

    let outlier = outlier::compile(&raw.outlier, &format!("{path}.outlier"), errors);
    let retries = retry::compile(&raw.retries, &format!("{path}.retries"), errors);
    let sticky = raw
        .sticky
        .as_ref()
        .and_then(|s| sticky::compile(s, &format!("{path}.sticky"), env, errors));
    if let Some(0) = raw.limits.max_in_flight {
        errors.push(
            format!("{path}.limits.max_in_flight"),
            "must be > 0 (got 0)",
        );
    }
    if let Some(d) = raw.slow_start {
        nonzero(errors, &format!("{path}.slow_start"), d.0);
    }
    let hash_key = match &raw.hash_key {
        None | Some(RawHashKey::Named(RawHashSource::ClientIp)) => HashKey::ClientIp,
        Some(RawHashKey::Named(RawHashSource::Path)) => HashKey::Path,
        Some(RawHashKey::Cookie { cookie }) => HashKey::Cookie(cookie.clone()),
        Some(RawHashKey::Header { header }) => match HeaderName::from_bytes(header.as_bytes()) {
            Ok(h) => HashKey::Header(h),
            Err(_) => {
                errors.push(
                    format!("{path}.hash_key.header"),
                    format!("`{header}` is not a header name"),
                );
                HashKey::ClientIp
            }
        },
    };
    let balance = raw.balance.unwrap_or(RawBalance::WeightedRoundRobin);
    if raw.hash_key.is_some() && balance != RawBalance::ConsistentHash {
        errors.push(
            format!("{path}.hash_key"),
            "only used with `balance: consistent_hash`",
        );
    }

    if errors.len() > start {
        return None;
    }
    let (balance, balancer): (&'static str, Box<dyn Balancer>) = match balance {
        RawBalance::WeightedRoundRobin => (
            "weighted_round_robin",
            Box::new(SmoothWeightedRoundRobin::new(backends.len())),
        ),
        RawBalance::LeastConnections => ("least_connections", Box::new(LeastConnections)),
        RawBalance::ConsistentHash => {
            let ring: Vec<(SocketAddr, u32)> =
                backends.iter().map(|b| (b.address, b.weight)).collect();
            ("consistent_hash", Box::new(ConsistentHash::new(&ring)))
        }
    };
    Some(Pool {
        name: name.to_string(),
        backends,
        balance,
        balancer,
        hash_key: (balance == "consistent_hash").then_some(hash_key),
        timeouts,
        health,
        outlier,
        panic: match raw.panic {
            None | Some(RawPanic::FailOpen) => PanicMode::FailOpen,
            Some(RawPanic::FailClosed) => PanicMode::FailClosed,
        },
        max_in_flight: raw.limits.max_in_flight,
        retries,
        slow_start: raw.slow_start.map(|d| d.0),
        sticky,
        fingerprint: fingerprint(raw),
        state: Arc::new(PoolState::detached()),
    })
}

/// A digest of everything in `raw` but its backends.
fn fingerprint(raw: &RawPool) -> u64 {
    use std::hash::{DefaultHasher, Hash, Hasher};
    let settings = format!(
        "{:?}",
        (
            &raw.balance,
            &raw.hash_key,
            &raw.timeouts,
            &raw.health_check,
            &raw.outlier,
            &raw.panic,
            &raw.limits,
            &raw.retries,
            &raw.slow_start,
            &raw.sticky,
        )
    );
    let mut hasher = DefaultHasher::new();
    settings.hash(&mut hasher);
    hasher.finish()
}

fn nonzero(errors: &mut Errors, path: &str, value: Duration) {
    if value.is_zero() {
        errors.push(path, "must be > 0 (got 0s)");
    }
}

#[cfg(test)]
mod tests;
