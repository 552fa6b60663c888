//! State that outlives config snapshots: each backend's health, breaker, in-flight count,
//! availability time and drain flag; each pool's in-flight count and retry budget; each
//! route's and pool's counters. Keyed by stable ids (pool name, pool and backend address,
//! route name), so a reload that keeps a backend keeps its state.
//!
//! A compiled snapshot holds detached state of its own; `snapshot::activate` swaps in the
//! shared objects from here (creating what is new). What a reload removed loses its metric
//! series once nothing is in flight to it, and its state once no snapshot holds it
//! ([`LiveState::reap`]); added again, it starts afresh.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use crate::health::Health;
use crate::metrics::{BackendMetrics, Metrics, PoolMetrics, RouteMetrics};
use crate::outlier::Breaker;
use crate::ratelimit::slowdown::Counts;
use crate::ratelimit::Buckets;
use crate::retry::{RetryBudget, RetryPolicy};

/// Every backend's, pool's and route's live state, with the metric families they count in.
pub struct LiveState {
    metrics: Arc<Metrics>,
    backends: Mutex<HashMap<BackendKey, Arc<BackendState>>>,
    pools: Mutex<HashMap<String, Arc<PoolState>>>,
    routes: Mutex<HashMap<String, Arc<RouteMetrics>>>,
    /// Rate-limit buckets, by policy name and definition: a reload that keeps a policy as
    /// it was keeps its buckets; one that changes it starts new ones.
    buckets: Mutex<HashMap<(String, u64), Arc<Buckets>>>,
    /// Slow-down counts, likewise.
    counts: Mutex<HashMap<(String, u64), Arc<Counts>>>,
    /// What the snapshot in force holds; `None` until one is published.
    in_force: Mutex<Option<InForce>>,
}

/// A backend's stable id: its pool's name and its address.
pub type BackendKey = (String, SocketAddr);

/// The ids the snapshot in force holds: everything else is on its way out.
#[derive(Debug, Default)]
pub struct InForce {
    /// Backends, by pool name and address.
    pub backends: HashSet<BackendKey>,
    /// Pools, by name.
    pub pools: HashSet<String>,
    /// Routes, by name (and the unrouted label).
    pub routes: HashSet<String>,
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
    /// Its metric series were removed: a reload removed it and nothing was in flight.
    retired: AtomicBool,
    /// Outcome counters and state gauges.
    pub metrics: BackendMetrics,
}

/// One pool's live state.
pub struct PoolState {
    /// Requests in progress in the pool (for `limits.max_in_flight` and the retry budget).
    pub in_flight: AtomicU64,
    /// Retries in progress.
    pub retry_budget: RetryBudget,
    /// Its metric series were removed: a reload removed it and nothing was in flight.
    retired: AtomicBool,
    /// Pool counters.
    pub metrics: PoolMetrics,
}

/// What [`LiveState::reap`] retired.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Reaped {
    /// Backends whose series were removed.
    pub backends: usize,
    /// Pools likewise.
    pub pools: usize,
    /// Routes likewise.
    pub routes: usize,
    /// Rate-limit and slow-down tables dropped.
    pub policies: usize,
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
            retired: AtomicBool::new(false),
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
            buckets: Mutex::default(),
            counts: Mutex::default(),
            in_force: Mutex::default(),
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
        let mut backends = lock(&self.backends);
        let state = backends
            .entry((pool.to_string(), address))
            .or_insert_with(|| self.new_backend(pool, address, checked));
        if state.retired.load(Ordering::Acquire) {
            // Removed, and back: afresh, with series again.
            *state = self.new_backend(pool, address, checked);
        }
        state.clone()
    }

    fn new_backend(&self, pool: &str, address: SocketAddr, checked: bool) -> Arc<BackendState> {
        let metrics = self.metrics.backend(pool, &address.to_string());
        Arc::new(BackendState::with_metrics(checked, metrics))
    }

    /// The state of `pool`, created on first use.
    pub fn pool(&self, pool: &str) -> Arc<PoolState> {
        let mut pools = lock(&self.pools);
        let fresh = || Arc::new(PoolState::with_metrics(self.metrics.pool(pool)));
        let state = pools.entry(pool.to_string()).or_insert_with(fresh);
        if state.retired.load(Ordering::Acquire) {
            *state = fresh();
        }
        state.clone()
    }

    /// The counters of `route`, created on first use.
    pub fn route(&self, route: &str) -> Arc<RouteMetrics> {
        let mut routes = lock(&self.routes);
        let fresh = || Arc::new(self.metrics.route(route));
        let metrics = routes.entry(route.to_string()).or_insert_with(fresh);
        if metrics.is_retired() {
            *metrics = fresh();
        }
        metrics.clone()
    }

    /// The buckets of rate limit `policy` as defined now (`fingerprint`), for at most
    /// `max_keys` keys; created on first use.
    pub fn buckets(&self, policy: &str, fingerprint: u64, max_keys: usize) -> Arc<Buckets> {
        lock(&self.buckets)
            .entry((policy.to_string(), fingerprint))
            .or_insert_with(|| {
                Arc::new(Buckets::new(max_keys, self.metrics.rate_limit_keys(policy)))
            })
            .clone()
    }

    /// The counts of slow-down `policy` as defined now; created on first use.
    pub fn counts(&self, policy: &str, fingerprint: u64, max_keys: usize) -> Arc<Counts> {
        lock(&self.counts)
            .entry((policy.to_string(), fingerprint))
            .or_insert_with(|| Arc::new(Counts::new(max_keys, self.metrics.slowed_down(policy))))
            .clone()
    }

    /// Drops the rate-limit buckets and slow-down windows that are as good as unused at
    /// `now` (nanoseconds, `ratelimit::nanos`), and updates the key counts.
    pub fn sweep(&self, now: u64) {
        let buckets: Vec<Arc<Buckets>> = lock(&self.buckets).values().cloned().collect();
        for table in buckets {
            crate::ratelimit::BucketStore::sweep(&*table, now);
        }
        let counts: Vec<Arc<Counts>> = lock(&self.counts).values().cloned().collect();
        for table in counts {
            table.sweep(now);
        }
    }

    /// Records what the snapshot just published holds; the rest is retired by
    /// [`Self::reap`].
    pub fn set_in_force(&self, in_force: InForce) {
        *lock(&self.in_force) = Some(in_force);
    }

    /// Retires the metric series of what the snapshot in force no longer holds, once
    /// nothing is in flight to it (a long request on an older snapshot does not keep a
    /// removed backend in `/metrics`), and drops the state no snapshot holds any more. Safe
    /// at any time: a snapshot takes its state from here under the same lock, so anything
    /// it holds has a second reference.
    pub fn reap(&self) -> Reaped {
        let metrics = &self.metrics;
        let in_force = lock(&self.in_force);
        let gone = |wanted: bool| in_force.is_some() && !wanted;
        Reaped {
            backends: reap(&self.backends, |key, state, held| {
                let idle = state.in_flight.load(Ordering::Acquire) == 0;
                let out = gone(in_force.as_ref().is_some_and(|f| f.backends.contains(key)));
                retire_once(&state.retired, (out && idle) || !held, || {
                    metrics.retire_backend(&key.0, &key.1.to_string())
                })
            }),
            pools: reap(&self.pools, |name, state, held| {
                let idle = state.in_flight.load(Ordering::Acquire) == 0;
                let out = gone(in_force.as_ref().is_some_and(|f| f.pools.contains(name)));
                retire_once(&state.retired, (out && idle) || !held, || {
                    metrics.retire_pool(name)
                })
            }),
            // A route has nothing in flight to wait for: counts a request on an older
            // snapshot makes after this go nowhere.
            policies: reap_policies(&self.buckets, &self.metrics, false)
                + reap_policies(&self.counts, &self.metrics, true),
            routes: reap(&self.routes, |name, route, held| {
                let out = gone(in_force.as_ref().is_some_and(|f| f.routes.contains(name)));
                let due = (out || !held) && !route.is_retired();
                if due {
                    metrics.retire_route(route);
                }
                due
            }),
        }
    }
}

/// Goes through `map`: `retire(key, value, held)` removes an entry's series when it is due
/// (always when nothing but the map holds it) and says whether it did; an entry nothing
/// else holds is then dropped. Returns how many were retired.
fn reap<K, V>(
    map: &Mutex<HashMap<K, Arc<V>>>,
    mut retire: impl FnMut(&K, &V, bool) -> bool,
) -> usize {
    let mut retired = 0;
    lock(map).retain(|key, value| {
        let held = Arc::strong_count(value) > 1;
        retired += usize::from(retire(key, value, held));
        held
    });
    retired
}

/// Drops the policy tables no snapshot holds; a policy's series go with its last table.
fn reap_policies<V>(
    map: &Mutex<HashMap<(String, u64), Arc<V>>>,
    metrics: &Metrics,
    slow_down: bool,
) -> usize {
    let mut map = lock(map);
    let before = map.len();
    let gone: Vec<String> = map
        .iter()
        .filter(|(_, table)| Arc::strong_count(table) == 1)
        .map(|((name, _), _)| name.clone())
        .collect();
    map.retain(|_, table| Arc::strong_count(table) > 1);
    for name in gone {
        if !map.keys().any(|(n, _)| *n == name) {
            metrics.retire_policy(&name, slow_down);
        }
    }
    before - map.len()
}

/// Runs `retire` once: when `due`, or when the entry is about to be dropped, whichever
/// comes first. Returns whether it ran now.
fn retire_once(flag: &AtomicBool, due: bool, retire: impl FnOnce()) -> bool {
    if due && !flag.swap(true, Ordering::AcqRel) {
        retire();
        return true;
    }
    false
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
            retired: AtomicBool::new(false),
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

    /// Its pool's outlier detection was turned off: no ejection stands.
    pub fn close_breaker(&self) {
        *self.breaker() = Breaker::default();
        self.metrics.ejected.set(0);
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
    fn a_removed_backend_loses_its_series_once_idle_even_while_an_old_snapshot_holds_it() {
        let live = live();
        let (x, y): (SocketAddr, SocketAddr) = (
            "127.0.0.1:1".parse().unwrap(),
            "127.0.0.1:2".parse().unwrap(),
        );
        let old_x = live.backend("p", x, false);
        let _y = live.backend("p", y, false);
        let mut in_force = InForce::default();
        in_force.backends.insert(("p".into(), y));
        live.set_in_force(in_force);
        let request = old_x.start_request();
        assert_eq!(live.reap().backends, 0, "a request is still in flight to x");
        assert!(live.metrics().render().contains("127.0.0.1:1"));
        drop(request);
        assert_eq!(live.reap().backends, 1);
        let text = live.metrics().render();
        assert!(!text.contains("127.0.0.1:1\""), "{text}");
        assert!(text.contains("127.0.0.1:2"), "y stays");
        assert_eq!(live.reap().backends, 0, "retired once");
        // Added back while the old snapshot still holds the retired state: afresh.
        let new_x = live.backend("p", x, false);
        assert!(!Arc::ptr_eq(&old_x, &new_x));
        assert!(live.metrics().render().contains("127.0.0.1:1"));
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
