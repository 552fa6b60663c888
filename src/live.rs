//! State that outlives config snapshots: each backend's health, breaker, in-flight count and
//! availability time, and each pool's in-flight count and retry budget. Keyed by stable ids
//! (`pool` and `pool/address`), so a snapshot built again for the same backend finds the
//! same state.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use prometheus::IntGauge;

use crate::health::Health;
use crate::metrics::Metrics;
use crate::outlier::Breaker;
use crate::retry::{RetryBudget, RetryPolicy};

/// Every backend's and pool's live state.
#[derive(Default)]
pub struct LiveState {
    backends: Mutex<HashMap<String, Arc<BackendState>>>,
    pools: Mutex<HashMap<String, Arc<PoolState>>>,
}

/// One backend's live state.
pub struct BackendState {
    /// Requests in flight to this backend.
    pub in_flight: AtomicU64,
    health: Mutex<Health>,
    breaker: Mutex<Breaker>,
    /// When it last became available (for slow start); `None` while unavailable.
    available_since: Mutex<Option<Instant>>,
    /// `kingdom_edge_backend_healthy{pool,backend}`.
    pub healthy_gauge: IntGauge,
    /// `kingdom_edge_backend_ejected{pool,backend}`.
    pub ejected_gauge: IntGauge,
}

/// One pool's live state.
#[derive(Default)]
pub struct PoolState {
    /// Requests in progress in the pool (for `limits.max_in_flight` and the retry budget).
    pub in_flight: AtomicU64,
    /// Retries in progress.
    pub retry_budget: RetryBudget,
}

impl PoolState {
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
    /// The state of `address` in `pool`, created on first use. A backend of a pool with
    /// health checks starts unhealthy; one without starts healthy. Either starts at full
    /// weight: slow start is for a backend that was seen down and came back.
    pub fn backend(
        &self,
        pool: &str,
        address: SocketAddr,
        checked: bool,
        metrics: &Metrics,
    ) -> Arc<BackendState> {
        let label = address.to_string();
        lock(&self.backends)
            .entry(format!("{pool}/{label}"))
            .or_insert_with(|| {
                let health = Health::new(checked);
                let state = BackendState {
                    in_flight: AtomicU64::new(0),
                    available_since: Mutex::new(None),
                    health: Mutex::new(health),
                    breaker: Mutex::new(Breaker::default()),
                    healthy_gauge: metrics.backend_healthy(pool, &label),
                    ejected_gauge: metrics.backend_ejected(pool, &label),
                };
                state.healthy_gauge.set(i64::from(!checked));
                Arc::new(state)
            })
            .clone()
    }

    /// The state of `pool`, created on first use.
    pub fn pool(&self, pool: &str) -> Arc<PoolState> {
        lock(&self.pools)
            .entry(pool.to_string())
            .or_default()
            .clone()
    }
}

impl BackendState {
    /// The health-check view.
    pub fn health(&self) -> MutexGuard<'_, Health> {
        lock(&self.health)
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

    #[test]
    fn state_is_shared_by_key_and_counts_in_flight() {
        let live = LiveState::default();
        let metrics = Metrics::new();
        let addr: SocketAddr = "127.0.0.1:9101".parse().unwrap();
        let a = live.backend("content", addr, true, &metrics);
        let b = live.backend("content", addr, false, &metrics);
        assert!(Arc::ptr_eq(&a, &b), "same pool/address, same state");
        assert!(!a.health().healthy, "checked backends start unhealthy");
        assert_eq!(a.available_since(), None);
        let other = live.backend("api", addr, false, &metrics);
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
}
