//! State that outlives config snapshots: each backend's health, breaker, in-flight count,
//! availability time and drain flag; each pool's in-flight count and retry budget; each
//! route's and pool's counters. Keyed by stable ids (pool name, pool and backend address,
//! route name), so a reload that keeps a backend keeps its state.
//!
//! A compiled snapshot holds detached state of its own; `snapshot::activate` swaps in the
//! shared objects from here (creating what is new). What a reload removed stays as long as
//! an older snapshot, or a request still in flight on one, holds it; [`LiveState::reap`]
//! then drops it and retires its metric series.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use crate::health::Health;
use crate::metrics::{BackendMetrics, Metrics, PoolMetrics, RouteMetrics};
use crate::outlier::Breaker;
use crate::retry::{RetryBudget, RetryPolicy};

/// Every backend's, pool's and route's live state, with the metric families they count in.
pub struct LiveState {
    metrics: Arc<Metrics>,
    backends: Mutex<HashMap<(String, SocketAddr), Arc<BackendState>>>,
    pools: Mutex<HashMap<String, Arc<PoolState>>>,
    routes: Mutex<HashMap<String, Arc<RouteMetrics>>>,
}

/// One backend's live state.
pub struct BackendState {
    /// Requests in flight to this backend.
    pub in_flight: AtomicU64,
    health: Mutex<Health>,
    breaker: Mutex<Breaker>,
    /// When it last became available (for slow start); `None` while unavailable.
    available_since: Mutex<Option<Instant>>,
    /// Drained by an operator: takes no new requests until undrained.
    drained: AtomicBool,
    /// Outcome counters and state gauges.
    pub metrics: BackendMetrics,
}

/// One pool's live state.
pub struct PoolState {
    /// Requests in progress in the pool (for `limits.max_in_flight` and the retry budget).
    pub in_flight: AtomicU64,
    /// Retries in progress.
    pub retry_budget: RetryBudget,
    /// Pool counters.
    pub metrics: PoolMetrics,
}

/// What [`LiveState::reap`] dropped.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Reaped {
    /// Backends whose state and series were dropped.
    pub backends: usize,
    /// Pools likewise.
    pub pools: usize,
    /// Routes whose series were retired.
    pub routes: usize,
}

impl PoolState {
    /// State of a pool no registry knows, for a snapshot that was never activated.
    pub fn detached() -> Self {
        Self::with_metrics(PoolMetrics::detached())
    }

    fn with_metrics(metrics: PoolMetrics) -> Self {
        Self {
            in_flight: AtomicU64::new(0),
            retry_budget: RetryBudget::default(),
            metrics,
        }
    }

    /// Counts a request in the pool until the guard drops; `None` (counting nothing) when
    /// `max_in_flight` requests are already in progress.
    pub fn start(self: &Arc<Self>, max_in_flight: Option<u64>) -> Option<PoolRequest> {
        let admitted = self
            .in_flight
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                max_in_flight.is_none_or(|max| n < max).then_some(n + 1)
            })
            .is_ok();
        admitted.then(|| PoolRequest {
            pool: self.clone(),
            retries: 0,
        })
    }
}

/// One request in a pool, and the retries it holds in the pool's budget.
pub struct PoolRequest {
    pool: Arc<PoolState>,
    retries: u64,
}

impl PoolRequest {
    /// Takes a retry from the pool's budget, if it has room; the pool has `backends`.
    pub fn try_retry(&mut self, policy: &RetryPolicy, backends: usize) -> bool {
        let active = self.pool.in_flight.load(Ordering::Acquire);
        let granted = self.pool.retry_budget.try_acquire(policy, active, backends);
        self.retries += u64::from(granted);
        granted
    }
}

impl Drop for PoolRequest {
    fn drop(&mut self) {
        self.pool.in_flight.fetch_sub(1, Ordering::AcqRel);
        self.pool.retry_budget.release(self.retries);
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // State behind these locks stays consistent between statements; a panic elsewhere
    // must not take the proxy down with it.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl LiveState {
    /// Empty state counting into `metrics`.
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self {
            metrics,
            backends: Mutex::default(),
            pools: Mutex::default(),
            routes: Mutex::default(),
        }
    }

    /// The metric families this state counts in.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The state of `address` in `pool`, created on first use. A backend of a pool with
    /// health checks starts unhealthy; one without starts healthy. Either starts at full
    /// weight: slow start is for a backend that was seen down and came back.
    pub fn backend(&self, pool: &str, address: SocketAddr, checked: bool) -> Arc<BackendState> {
        lock(&self.backends)
            .entry((pool.to_string(), address))
            .or_insert_with(|| {
                let metrics = self.metrics.backend(pool, &address.to_string());
                Arc::new(BackendState::with_metrics(checked, metrics))
            })
            .clone()
    }

    /// The state of `pool`, created on first use.
    pub fn pool(&self, pool: &str) -> Arc<PoolState> {
        lock(&self.pools)
            .entry(pool.to_string())
            .or_insert_with(|| Arc::new(PoolState::with_metrics(self.metrics.pool(pool))))
            .clone()
    }

    /// The counters of `route`, created on first use.
    pub fn route(&self, route: &str) -> Arc<RouteMetrics> {
        lock(&self.routes)
            .entry(route.to_string())
            .or_insert_with(|| Arc::new(self.metrics.route(route)))
            .clone()
    }

    /// Drops the state no snapshot holds any more (nor a request in flight on one), and
    /// retires its metric series. Safe at any time: a snapshot takes its state from here
    /// under the same lock, so anything it holds has a second reference.
    pub fn reap(&self) -> Reaped {
        let metrics = &self.metrics;
        Reaped {
            backends: reap(&self.backends, |(pool, address), _| {
                metrics.retire_backend(pool, &address.to_string())
            }),
            pools: reap(&self.pools, |pool, _| metrics.retire_pool(pool)),
            routes: reap(&self.routes, |_, route| metrics.retire_route(route)),
        }
    }
}

/// Drops the entries of `map` that nothing else holds, calling `retire` for each; returns
/// how many.
fn reap<K, V>(map: &Mutex<HashMap<K, Arc<V>>>, mut retire: impl FnMut(&K, &V)) -> usize {
    let mut reaped = 0;
    lock(map).retain(|key, value| {
        let held = Arc::strong_count(value) > 1;
        if !held {
            retire(key, value);
            reaped += 1;
        }
        held
    });
    reaped
}

impl BackendState {
    /// State of a backend no registry knows, for a snapshot that was never activated.
    pub fn detached(checked: bool) -> Self {
        Self::with_metrics(checked, BackendMetrics::detached())
    }

    fn with_metrics(checked: bool, metrics: BackendMetrics) -> Self {
        metrics.healthy.set(i64::from(!checked));
        Self {
            in_flight: AtomicU64::new(0),
            available_since: Mutex::new(None),
            health: Mutex::new(Health::new(checked)),
            breaker: Mutex::new(Breaker::default()),
            drained: AtomicBool::new(false),
            metrics,
        }
    }

    /// The health-check view.
    pub fn health(&self) -> MutexGuard<'_, Health> {
        lock(&self.health)
    }

    /// Its pool's checks were turned off: trusted again, as a backend never checked is.
    pub fn trust(&self) {
        let mut health = self.health();
        if !health.healthy {
            health.trust();
            self.metrics.healthy.set(1);
            // Like a first pass: a backend never seen up joins at full weight.
            if health.ever_passed {
                self.set_available(true, Instant::now());
            }
        }
    }

    /// The circuit breaker.
    pub fn breaker(&self) -> MutexGuard<'_, Breaker> {
        lock(&self.breaker)
    }

    /// When it last came back after being unavailable, for slow start (`None`: full weight).
    pub fn available_since(&self) -> Option<Instant> {
        *lock(&self.available_since)
    }

    /// Marks it available from `now` (health passed, or breaker closed) or unavailable.
    pub fn set_available(&self, available: bool, now: Instant) {
        *lock(&self.available_since) = available.then_some(now);
    }

    /// Whether an operator drained it: it takes no new requests.
    pub fn is_drained(&self) -> bool {
        self.drained.load(Ordering::Acquire)
    }

    /// Drains it (`true`) or puts it back (`false`); returns whether that changed anything.
    pub fn set_drained(&self, drained: bool) -> bool {
        self.drained.swap(drained, Ordering::AcqRel) != drained
    }

    /// Counts one request in flight until the guard drops.
    pub fn start_request(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
    }
}

/// One request in flight to a backend; drops on every path, errors and aborts included.
pub struct InFlight(Arc<BackendState>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn live() -> LiveState {
        LiveState::new(Arc::new(Metrics::new()))
    }

    #[test]
    fn state_is_shared_by_key_and_counts_in_flight() {
        let live = live();
        let addr: SocketAddr = "127.0.0.1:9101".parse().unwrap();
        let a = live.backend("content", addr, true);
        let b = live.backend("content", addr, false);
        assert!(Arc::ptr_eq(&a, &b), "same pool/address, same state");
        assert!(!a.health().healthy, "checked backends start unhealthy");
        assert_eq!(a.available_since(), None);
        let other = live.backend("api", addr, false);
        assert!(!Arc::ptr_eq(&a, &other));
        assert_eq!(other.available_since(), None, "no ramp at start");

        let pool = live.pool("content");
        let first = pool.start(Some(2)).unwrap();
        let second = pool.start(Some(2)).unwrap();
        assert!(pool.start(Some(2)).is_none(), "max_in_flight reached");
        drop(first);
        assert!(pool.start(Some(2)).is_some());
        drop(second);
        assert_eq!(pool.in_flight.load(Ordering::Relaxed), 0);

        let g1 = a.start_request();
        let g2 = a.start_request();
        assert_eq!(a.in_flight.load(Ordering::Relaxed), 2);
        drop((g1, g2));
        assert_eq!(a.in_flight.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn reaping_waits_for_the_last_holder_then_retires_the_series() {
        let live = live();
        let addr: SocketAddr = "127.0.0.1:9101".parse().unwrap();
        let state = live.backend("content", addr, false);
        state.metrics.record(crate::metrics::Outcome::Ok);
        let route = live.route("gone");
        route.observe(200, 0.01);
        let in_flight = state.start_request();
        drop(state);
        assert_eq!(
            live.reap().backends,
            0,
            "a request in flight still holds it"
        );
        drop(in_flight);
        drop(route);
        let reaped = live.reap();
        assert_eq!((reaped.backends, reaped.routes), (1, 1));
        let text = live.metrics().render();
        assert!(!text.contains("127.0.0.1:9101"), "{text}");
        assert!(!text.contains("gone"), "{text}");
        let again = live.backend("content", addr, true);
        assert!(
            !again.health().healthy,
            "a backend added again starts afresh"
        );
    }

    #[test]
    fn drain_and_trust() {
        let state = BackendState::detached(true);
        assert!(state.set_drained(true));
        assert!(!state.set_drained(true), "already drained");
        assert!(state.is_drained());
        assert!(!state.health().healthy);
        state.trust();
        assert!(state.health().healthy);
        assert_eq!(state.metrics.healthy.get(), 1);
    }
}
