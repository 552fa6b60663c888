//! The response cache (pingora-cache): what a route caches ([`policy`]), where responses are
//! kept ([`storage`]), and the process-wide machinery pingora needs for the life of the
//! process ([`Cache`]).
//!
//! The storage, its eviction manager and the lock that coalesces misses belong to the
//! runtime, not to a config snapshot: what is cached survives reloads, and `cache.memory`,
//! `cache.max_object` and `cache.lock_timeout` take effect at the next restart.

pub mod collapse;
pub mod policy;
pub mod storage;

use std::time::Duration;

use pingora::cache::eviction::lru::Manager;
use pingora::cache::eviction::{CacheEntryKeyRef, EvictionManager};
use pingora::cache::key::CompactCacheKey;
use pingora::cache::lock::{CacheKeyLockImpl, CacheLock};
use pingora::cache::predictor::Predictor;

use crate::config::raw::RawCache;
use crate::config::Errors;
use storage::MemoryStorage;

/// Shards of the eviction manager's LRU (and of the uncacheable keys' memory).
const LRU_SHARDS: usize = 16;

/// Keys remembered as not storable, at most.
const UNCACHEABLE_KEYS: usize = 16_384;

/// `cache` (top level), compiled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    /// Bytes of responses kept at most (bodies, headers and bookkeeping).
    pub memory: usize,
    /// Largest body kept; larger responses stream through.
    pub max_object: usize,
    /// How long a request waits for another's fetch of the same key before fetching itself.
    pub lock_timeout: Duration,
}

impl Settings {
    /// Compiles `cache` (at YAML path `at`); no section gives the defaults.
    pub fn compile(raw: Option<&RawCache>, at: &str, errors: &mut Errors) -> Self {
        let raw_default = RawCache::default();
        let raw = raw.unwrap_or(&raw_default);
        let memory = raw.memory.map_or(256 << 20, |s| s.0 as usize);
        let max_object = raw.max_object.map_or(8 << 20, |s| s.0 as usize);
        let lock_timeout = raw.lock_timeout.map_or(Duration::from_secs(5), |d| d.0);
        if memory < 1 << 20 {
            errors.push(format!("{at}.memory"), "must be at least 1MiB");
        }
        if max_object == 0 || max_object > memory / 4 {
            errors.push(
                format!("{at}.max_object"),
                "must be above 0 and at most a quarter of cache.memory",
            );
        }
        if lock_timeout < Duration::from_millis(100) || lock_timeout > Duration::from_secs(60) {
            errors.push(format!("{at}.lock_timeout"), "must be from 100ms to 60s");
        }
        Self {
            memory,
            max_object,
            lock_timeout,
        }
    }
}

/// The cache of the process: storage, eviction and the miss lock, for as long as it runs.
pub struct Cache {
    /// Where responses are kept.
    pub storage: &'static MemoryStorage,
    /// Keeps `storage` within `memory`, least recently used out first.
    pub eviction: &'static Manager<LRU_SHARDS>,
    /// One fetch per key at a time; the other requests wait for it.
    pub lock: &'static CacheKeyLockImpl,
    /// Keys whose last answer could not be stored: their requests go straight upstream,
    /// neither locked nor waiting (hit-for-pass), until an answer can be stored again.
    pub predictor: &'static Predictor<LRU_SHARDS>,
    /// Requests in flight that identical ones may share (`coalesce_uncacheable`).
    pub collapser: &'static collapse::Collapser,
    /// As configured at start.
    pub settings: Settings,
}

impl Cache {
    /// The cache for `settings`. Its parts live as long as the process (pingora wants them
    /// `'static`); a process makes one.
    pub fn new(settings: Settings) -> Self {
        // An estimate of the objects held (16 KiB each), to size the LRU's maps up front; the
        // manager takes it per shard.
        let objects = (settings.memory / (16 << 10)).max(1024) / LRU_SHARDS;
        let lock: Box<CacheKeyLockImpl> = CacheLock::new_boxed(settings.lock_timeout);
        Self {
            storage: Box::leak(Box::new(MemoryStorage::new(settings.max_object))),
            eviction: Box::leak(Box::new(Manager::with_capacity(settings.memory, objects))),
            lock: Box::leak(lock),
            // A HEAD's own answer is never stored, which says nothing of its GET's.
            predictor: Box::leak(Box::new(Predictor::new(
                UNCACHEABLE_KEYS / LRU_SHARDS,
                Some(|reason| reason == policy::HEAD_REASON),
            ))),
            collapser: Box::leak(Box::default()),
            settings,
        }
    }

    /// Puts what the cache holds, and its evictions since the last report, in `metrics`.
    pub fn report(&self, metrics: &crate::metrics::Metrics) {
        metrics.cache_bytes.set(self.storage.bytes() as i64);
        metrics.cache_objects.set(self.storage.objects() as i64);
        let evicted = self.eviction.evicted_items() as u64;
        let reported = metrics.cache_evictions.get();
        metrics
            .cache_evictions
            .inc_by(evicted.saturating_sub(reported));
    }

    /// Removes the stored responses of `url` (every query and variant of it); how many.
    pub fn purge_url(&self, url: &str) -> usize {
        self.forget(self.storage.purge_url(url))
    }

    /// Removes every stored response whose URL `matches` (all its variants); how many.
    pub fn purge_where(&self, matches: impl Fn(&str) -> bool) -> usize {
        self.forget(self.storage.purge_where(matches))
    }

    /// Drops the `removed` entries from the eviction manager too; how many.
    fn forget(&self, removed: Vec<CompactCacheKey>) -> usize {
        for key in &removed {
            self.eviction
                .remove(CacheEntryKeyRef::from_entry_id(key, None));
        }
        removed.len()
    }
}
