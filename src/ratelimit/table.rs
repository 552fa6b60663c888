//! A bounded table of per-key state, sharded so that no lock is global: a request locks one
//! of [`SHARDS`] small maps for a few instructions. Keys are 64-bit hashes of the client's
//! key (its value never stays in memory, however long). At `capacity`, a new key evicts
//! the entry of its shard nearest to idle among a few sampled, so a flood of new keys
//! pushes out fresh buckets, not the spent bucket of a client being limited;
//! [`Table::sweep`] drops the idle ones.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};

/// Shards per table.
pub const SHARDS: usize = 64;

/// The smallest capacity a policy may ask for: 16 keys per shard, so that a sample finds
/// one nearer to idle than a limited client's.
pub const MIN_CAPACITY: usize = 16 * SHARDS;

/// Entries sampled to choose the one a new key evicts.
const EVICTION_SAMPLE: usize = 8;

/// Per-key state that can tell when it is as good as absent.
pub trait Idle {
    /// When (nanoseconds) keeping this entry stops changing anything.
    fn idle_at(&self) -> u64;

    /// Whether keeping this entry changes nothing at `now` (nanoseconds).
    fn is_idle(&self, now: u64) -> bool {
        self.idle_at() <= now
    }

    /// How much losing this entry would matter, when a new key needs its place: the lowest
    /// of a sample is evicted. By default, the entry nearest to idle.
    fn keep_rank(&self) -> u64 {
        self.idle_at()
    }
}

/// A bounded, sharded map from key hashes to `V`.
pub struct Table<V> {
    shards: Box<[Mutex<HashMap<u64, V>>]>,
    per_shard: usize,
    len: AtomicUsize,
    evicted: AtomicUsize,
}

impl<V: Idle> Table<V> {
    /// A table holding at most `capacity` keys, rounded down to a multiple of [`SHARDS`]
    /// (at least one key per shard).
    pub fn new(capacity: usize) -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            per_shard: (capacity / SHARDS).max(1),
            len: AtomicUsize::new(0),
            evicted: AtomicUsize::new(0),
        }
    }

    /// Runs `f` on the entry of `key` (`None` if absent), storing what it returns (`None`
    /// removes the entry). Makes room at capacity by evicting another key of the shard.
    pub fn update<T>(&self, key: u64, f: impl FnOnce(Option<&V>) -> (T, Option<V>)) -> T {
        let mut shard = self.shard(key);
        let (out, next) = f(shard.get(&key));
        match next {
            Some(value) => {
                if !shard.contains_key(&key) {
                    if shard.len() >= self.per_shard {
                        // Full of keys in use: one goes (an attack of many keys must not
                        // grow memory; the evicted key starts afresh), the one nearest to
                        // idle of a sample, whose loss matters least.
                        let victim = shard
                            .iter()
                            .take(EVICTION_SAMPLE)
                            .min_by_key(|(_, value)| value.keep_rank())
                            .map(|(key, _)| *key);
                        if let Some(victim) = victim {
                            shard.remove(&victim);
                            self.len.fetch_sub(1, Ordering::Relaxed);
                            self.evicted.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    self.len.fetch_add(1, Ordering::Relaxed);
                }
                shard.insert(key, value);
            }
            None => {
                if shard.remove(&key).is_some() {
                    self.len.fetch_sub(1, Ordering::Relaxed);
                }
            }
        }
        out
    }

    /// Drops every entry that is idle at `now`, one shard at a time.
    pub fn sweep(&self, now: u64) {
        for shard in self.shards.iter() {
            let mut shard = lock(shard);
            let before = shard.len();
            shard.retain(|_, value| !value.is_idle(now));
            self.len.fetch_sub(before - shard.len(), Ordering::Relaxed);
        }
    }

    /// Keys held now.
    pub fn len(&self) -> usize {
        self.len.load(Ordering::Relaxed)
    }

    /// Whether no key is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Keys evicted at capacity so far.
    pub fn evicted(&self) -> usize {
        self.evicted.load(Ordering::Relaxed)
    }

    fn shard(&self, key: u64) -> MutexGuard<'_, HashMap<u64, V>> {
        // The low bits pick the map's bucket; the high ones pick the shard.
        lock(&self.shards[(key >> 58) as usize % SHARDS])
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    impl Idle for u64 {
        fn idle_at(&self) -> u64 {
            *self
        }
    }

    fn hash(i: u64) -> u64 {
        // Spread like real hashes: a cheap mixer.
        let mut x = i.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        x ^= x >> 29;
        x.wrapping_mul(0xBF58_476D_1CE4_E5B9)
    }

    #[test]
    fn a_million_distinct_keys_never_hold_more_than_the_capacity() {
        let table: Table<u64> = Table::new(10_000);
        for i in 0..1_000_000u64 {
            table.update(hash(i), |_| ((), Some(u64::MAX)));
        }
        let held: usize = table.shards.iter().map(|s| lock(s).len()).sum();
        assert_eq!(held, table.len());
        assert!(held <= 10_000, "{held} keys held");
        assert!(held >= 9_000, "the table is used: {held}");
        assert_eq!(table.evicted(), 1_000_000 - held);
    }

    #[test]
    fn a_flood_of_new_keys_evicts_fresh_entries_not_a_spent_one() {
        // 16 keys per shard; the limited client's entry stays busy for long.
        let table: Table<u64> = Table::new(16 * SHARDS);
        let limited = hash(u64::MAX);
        table.update(limited, |_| ((), Some(1_000_000)));
        for i in 0..100_000u64 {
            table.update(hash(i), |_| ((), Some(10 + i % 7)));
        }
        assert!(table.evicted() > 90_000);
        assert_eq!(
            table.update(limited, |v| (v.copied(), v.copied())),
            Some(1_000_000),
            "the spent bucket survived the flood"
        );
    }

    #[test]
    fn sweeping_drops_idle_entries_only() {
        let table: Table<u64> = Table::new(100);
        table.update(1, |_| ((), Some(10)));
        table.update(2, |_| ((), Some(30)));
        table.sweep(20);
        assert_eq!(table.len(), 1);
        assert_eq!(table.update(2, |v| (v.copied(), v.copied())), Some(30));
        assert_eq!(table.update(1, |v| (v.copied(), None)), None);
        table.update(2, |_| ((), None));
        assert!(table.is_empty());
    }
}
