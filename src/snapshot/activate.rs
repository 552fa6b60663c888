//! `activate`: binds a compiled snapshot to the live state that outlives snapshots.

use super::Snapshot;
use crate::live::LiveState;
use crate::metrics::NO_ROUTE;

/// Binds `snapshot` to `live`, before it is published: every pool, backend and route takes
/// the state kept under its stable id (pool name; pool and backend address; route name),
/// created for what is new. What this snapshot no longer holds stays with the snapshots (and
/// requests in flight) that still use it, until [`LiveState::reap`] retires it and its
/// metric series.
///
/// A backend of a pool whose health checks were removed is trusted again; one of a pool
/// that gained checks keeps its state until the checks say otherwise.
pub fn activate(snapshot: &mut Snapshot, live: &LiveState) {
    for pool in &mut snapshot.pools {
        pool.state = live.pool(&pool.name);
        let checked = pool.health.is_some();
        for backend in &mut pool.backends {
            backend.state = live.backend(&pool.name, backend.address, checked);
            if !checked {
                backend.state.trust();
            }
        }
    }
    for route in snapshot.router.routes_mut() {
        route.metrics = live.route(&route.name);
    }
    snapshot.unrouted = live.route(NO_ROUTE);
}
