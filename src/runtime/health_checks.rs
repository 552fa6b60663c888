//! The active health-check tasks: one per backend of every pool with checks, following the
//! config. After each reload, a backend that is new gets a task (and takes no traffic until
//! its first probe passes), one that is gone, or whose pool dropped its checks, loses its
//! task, and a changed interval, path or threshold applies from the next probe.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::task::JoinHandle;

use crate::health::{self, HealthPolicy, FIRST_PASS_INTERVAL};
use crate::snapshot::{ConfigStore, Snapshot};

/// Keeps one probing task per checked backend of the snapshot in force, for as long as the
/// process runs.
pub async fn run(store: Arc<ConfigStore>) {
    let mut versions = store.subscribe();
    let mut tasks: HashMap<(String, SocketAddr), JoinHandle<()>> = HashMap::new();
    loop {
        let snapshot = store.load();
        let mut wanted = Vec::new();
        for pool in snapshot.pools.iter().filter(|p| p.health.is_some()) {
            for backend in &pool.backends {
                wanted.push((pool.name.clone(), backend.address));
            }
        }
        tasks.retain(|key, task| {
            // (A task only ends by panicking: then it is started again.)
            let keep = wanted.contains(key) && !task.is_finished();
            if !keep {
                task.abort();
            }
            keep
        });
        for key in wanted {
            let (pool, address) = (key.0.clone(), key.1);
            tasks
                .entry(key)
                .or_insert_with(|| tokio::spawn(check_forever(store.clone(), pool, address)));
        }
        drop(snapshot);
        if versions.changed().await.is_err() {
            return;
        }
    }
}

/// Probes every checked backend of `snapshot` once, all at the same time, and records what
/// each saw: a process that takes over from another (an upgrade) serves from its first
/// request with its backends' health known, not in panic mode.
pub async fn probe_all_once(snapshot: &Snapshot) {
    let probes = snapshot.pools.iter().flat_map(|pool| {
        pool.health.iter().flat_map(move |policy| {
            pool.backends
                .iter()
                .enumerate()
                .map(move |(id, backend)| async move {
                    let (passed, detail) = health::probe(policy, backend.address).await;
                    pool.record_probe(id, Instant::now(), passed, detail);
                })
        })
    });
    futures::future::join_all(probes).await;
}

/// Probes `address` of `pool` for as long as the task runs: [`run`] aborts it when a reload
/// removes the backend or its pool's checks (it never ends by itself, so a backend removed
/// and added back by two quick reloads cannot be left without one). Each probe uses the
/// policy in force when it starts, and its result goes to the pool in force when it ends.
async fn check_forever(store: Arc<ConfigStore>, pool: String, address: SocketAddr) {
    let mut versions = store.subscribe();
    loop {
        let Some(policy) = policy_of(&store, &pool, address) else {
            // Gone in the config in force: wait for the next one (or the abort).
            if versions.changed().await.is_err() {
                return;
            }
            continue;
        };
        let started = tokio::time::Instant::now();
        let (passed, detail) = health::probe(&policy, address).await;
        let snapshot = store.load();
        let current = snapshot.find_pool(&pool);
        let id = current.and_then(|p| p.backends.iter().position(|b| b.address == address));
        if let (Some(current), Some(id)) = (current, id) {
            current.record_probe(id, Instant::now(), passed, detail);
        }
        drop(snapshot);
        // The next probe is due one interval after this one started; a reload that changes
        // the interval moves it.
        let random = fastrand::f64();
        while let Some(policy) = policy_of(&store, &pool, address) {
            let due = started + health::jittered(wait(&store, &pool, address, &policy), random);
            tokio::select! {
                _ = tokio::time::sleep_until(due) => break,
                changed = versions.changed() => {
                    if changed.is_err() {
                        return;
                    }
                }
            }
        }
    }
}

/// The health policy of `address` in `pool` now; `None` when either is gone or unchecked.
fn policy_of(store: &ConfigStore, pool: &str, address: SocketAddr) -> Option<HealthPolicy> {
    let snapshot = store.load();
    let pool = snapshot.find_pool(pool)?;
    pool.backends.iter().find(|b| b.address == address)?;
    pool.health.clone()
}

/// Time between probes: the interval, or, like HAProxy's `fastinter`, much less for a
/// backend that has never passed, so a starting process joins as soon as it listens.
fn wait(store: &ConfigStore, pool: &str, address: SocketAddr, policy: &HealthPolicy) -> Duration {
    let snapshot = store.load();
    let joined = snapshot
        .find_pool(pool)
        .and_then(|p| p.backends.iter().find(|b| b.address == address))
        .is_some_and(|b| b.state.health().ever_passed);
    if joined {
        policy.interval
    } else {
        policy.interval.min(FIRST_PASS_INTERVAL)
    }
}
