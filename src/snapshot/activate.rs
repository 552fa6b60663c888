//! `activate`: binds a compiled snapshot to the live state that outlives snapshots.

use super::Snapshot;
use crate::live::{InForce, LiveState};
use crate::metrics::NO_ROUTE;

/// Binds `snapshot` to `live`, before it is published: every pool, backend and route takes
/// the state kept under its stable id (pool name; pool and backend address; route name),
/// created for what is new. What this snapshot no longer holds stays with the snapshots (and
/// requests in flight) that still use it, until [`LiveState::reap`] retires it and its
/// metric series. A rate limit or slow-down policy defined as before keeps its buckets.
///
/// A backend of a pool whose health checks were removed is trusted again; one of a pool
/// that gained checks keeps its state until the checks say otherwise. A pool whose outlier
/// detection was turned off has no backend ejected.
pub fn activate(snapshot: &mut Snapshot, live: &LiveState) {
    for pool in &mut snapshot.pools {
        pool.state = live.pool(&pool.name);
        let checked = pool.health.is_some();
        for backend in &mut pool.backends {
            backend.state = live.backend(&pool.name, backend.address, checked);
            if !checked {
                backend.state.trust();
            }
            if pool.outlier.is_none() {
                backend.state.close_breaker();
            }
        }
    }
    for policy in &mut snapshot.rate_limits {
        policy.store = live.buckets(&policy.name, policy.fingerprint, policy.max_keys);
    }
    for policy in &mut snapshot.slow_downs {
        policy.counts = live.counts(&policy.name, policy.fingerprint, policy.max_keys);
    }
    let policy_names: Vec<String> = snapshot
        .rate_limits
        .iter()
        .map(|p| p.name.clone())
        .collect();
    for route in snapshot.router.routes_mut() {
        route.metrics = live.route(&route.name);
        for limit in &mut route.rate_limits {
            (limit.limited, limit.shadowed) = live
                .metrics()
                .rate_limited(&route.metrics, &policy_names[limit.policy]);
        }
    }
    snapshot.unrouted = live.route(NO_ROUTE);
}

/// Tells `live` what the snapshot just published holds, so what it no longer holds can be
/// retired once idle.
pub fn in_force(snapshot: &Snapshot, live: &LiveState) {
    let mut in_force = InForce::default();
    for pool in &snapshot.pools {
        in_force.pools.insert(pool.name.clone());
        for backend in &pool.backends {
            in_force
                .backends
                .insert((pool.name.clone(), backend.address));
        }
    }
    for route in snapshot.router.routes() {
        in_force.routes.insert(route.name.clone());
    }
    in_force.routes.insert(NO_ROUTE.to_string());
    live.set_in_force(in_force);
}
