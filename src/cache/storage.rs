//! The response cache's storage: complete responses in memory, for pingora-cache.
//!
//! An object is visible only once its whole body has been written: a miss handler buffers
//! the body and stores the object when pingora finishes it, so a response whose upstream
//! died mid-body (the handler dropped unfinished) is never served. An object larger than
//! `max_object` is not kept (the response streams through). Objects live in
//! [`SHARDS`] maps, each behind its own lock held for a map operation only; a hit shares the
//! stored body (reference counted), and a range is a slice of it, with no copy.
//!
//! What is kept is bounded in bytes by pingora's eviction manager, which is told each
//! object's [`weight`] when it is stored and purges through [`Storage::purge`]; this store
//! counts what it holds so the bound can be checked.

use std::any::Any;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::SystemTime;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use pingora::cache::key::{CacheHashKey, CompactCacheKey, HashBinary};
use pingora::cache::storage::{
    HandleHit, HandleMiss, HitHandler, MissFinishType, MissHandler, PurgeOutcome, PurgeTarget,
};
use pingora::cache::trace::SpanHandle;
use pingora::cache::{CacheKey, CacheMeta, PurgeType, Storage};
use pingora::http::ResponseHeader;
use pingora::{Error, ErrorType, Result};

/// Maps per store.
pub const SHARDS: usize = 16;

/// Bytes an object costs beyond its body and header: the map entry and the object itself.
const OVERHEAD: usize = 128;

/// A stored response's `CacheMeta`, kept as it is: a hit rebuilds the meta from it with a
/// clone of the header, instead of `CacheMeta::deserialize`, which decompresses (zstd) and
/// parses the header anew each time. (What is not kept: the first creation time and the
/// provenance of an entry since revalidated, which only pingora-cache's invalidation by
/// time reads, unused here.)
struct StoredMeta {
    fresh_until: SystemTime,
    /// When it was stored or last revalidated: what its age counts from.
    updated: SystemTime,
    stale_while_revalidate: u32,
    stale_if_error: u32,
    variance: Option<HashBinary>,
    epoch_override: Option<SystemTime>,
    header: ResponseHeader,
    /// What the header weighs against `cache.memory`.
    header_bytes: usize,
}

impl StoredMeta {
    fn of(meta: &CacheMeta) -> Self {
        let header = meta.response_header().clone();
        // The header as written on the wire, about: each field's name, value and `: \r\n`.
        let header_bytes = 16
            + header
                .headers
                .iter()
                .map(|(name, value)| name.as_str().len() + value.len() + 4)
                .sum::<usize>();
        Self {
            fresh_until: meta.fresh_until(),
            updated: meta.updated(),
            stale_while_revalidate: meta.stale_while_revalidate_sec(),
            stale_if_error: meta.stale_if_error_sec(),
            variance: meta.variance(),
            epoch_override: meta.epoch_override(),
            header,
            header_bytes,
        }
    }

    fn meta(&self) -> CacheMeta {
        let mut meta = CacheMeta::new(
            self.fresh_until,
            self.updated,
            self.stale_while_revalidate,
            self.stale_if_error,
            self.header.clone(),
        );
        if let Some(variance) = self.variance {
            meta.set_variance(variance);
        }
        if let Some(epoch) = self.epoch_override {
            meta.set_epoch_override(epoch);
        }
        meta
    }
}

/// One stored response.
struct Object {
    meta: StoredMeta,
    body: Bytes,
    /// The primary key's text (the URL), for purges by prefix.
    url: Box<str>,
    /// Its key, as the eviction manager knows it.
    key: CompactCacheKey,
}

impl Object {
    fn weight(&self) -> usize {
        self.body.len() + self.meta.header_bytes + OVERHEAD
    }
}

/// One shard: objects by their combined (primary and variance) hash.
type Shard = RwLock<HashMap<HashBinary, Arc<Object>>>;

/// One shard of the URL index: the keys stored under each URL.
type UrlShard = Mutex<HashMap<Box<str>, Vec<HashBinary>>>;

/// Complete responses in memory.
pub struct MemoryStorage {
    shards: Box<[Shard]>,
    /// The keys stored under each URL (all its queries and variants), so that a change to
    /// one URL finds them without a scan: sharded like the objects, by a hash of the URL.
    urls: Box<[UrlShard]>,
    /// Largest body kept, in bytes.
    max_object: usize,
    bytes: AtomicUsize,
    objects: AtomicUsize,
}

impl MemoryStorage {
    /// A store keeping bodies of at most `max_object` bytes.
    pub fn new(max_object: usize) -> Self {
        Self {
            shards: (0..SHARDS).map(|_| RwLock::default()).collect(),
            urls: (0..SHARDS).map(|_| Mutex::default()).collect(),
            max_object,
            bytes: AtomicUsize::new(0),
            objects: AtomicUsize::new(0),
        }
    }

    /// Bytes held (bodies, headers and bookkeeping, as weighed for eviction).
    pub fn bytes(&self) -> usize {
        self.bytes.load(Ordering::Relaxed)
    }

    /// Objects held.
    pub fn objects(&self) -> usize {
        self.objects.load(Ordering::Relaxed)
    }

    /// Removes every object whose URL `matches`, all variants included; returns the keys
    /// removed (for the eviction manager to forget).
    pub fn purge_where(&self, matches: impl Fn(&str) -> bool) -> Vec<CompactCacheKey> {
        let mut removed = Vec::new();
        for shard in self.shards.iter() {
            let mut shard = write(shard);
            shard.retain(|_, object| {
                if !matches(&object.url) {
                    return true;
                }
                self.forget(object);
                removed.push(object.key.clone());
                false
            });
        }
        removed
    }

    /// Removes every object stored under `url` (all its queries and variants); returns the
    /// keys removed. Costs the URL's objects, not the store's.
    pub fn purge_url(&self, url: &str) -> Vec<CompactCacheKey> {
        let keys = lock(self.url_shard(url)).remove(url).unwrap_or_default();
        let mut removed = Vec::new();
        for combined in keys {
            let object = write(self.shard(&combined)).remove(&combined);
            if let Some(object) = object {
                self.forget_counts(&object);
                removed.push(object.key.clone());
            }
        }
        removed
    }

    fn url_shard(&self, url: &str) -> &UrlShard {
        let hash = pingora::cache::key::hash_key(url);
        &self.urls[usize::from(hash[0]) % SHARDS]
    }

    fn shard(&self, combined: &HashBinary) -> &Shard {
        // Blake2 output: any byte is as good as any other.
        &self.shards[usize::from(combined[0]) % SHARDS]
    }

    /// Stores `object` under `combined`, replacing (and uncounting) what was there.
    fn insert(&self, combined: HashBinary, object: Object) {
        let weight = object.weight();
        {
            let mut urls = lock(self.url_shard(&object.url));
            let keys = urls.entry(object.url.clone()).or_default();
            if !keys.contains(&combined) {
                keys.push(combined);
            }
        }
        let old = write(self.shard(&combined)).insert(combined, Arc::new(object));
        self.bytes.fetch_add(weight, Ordering::Relaxed);
        self.objects.fetch_add(1, Ordering::Relaxed);
        if let Some(old) = old {
            // Replaced under the same key: the index already holds it.
            self.forget_counts(&old);
        }
    }

    fn remove(&self, combined: &HashBinary) -> bool {
        let removed = write(self.shard(combined)).remove(combined);
        removed.inspect(|object| self.forget(object)).is_some()
    }

    /// Uncounts a removed object and drops it from the URL index.
    fn forget(&self, object: &Object) {
        self.forget_counts(object);
        let combined = object.key.combined_bin();
        let mut urls = lock(self.url_shard(&object.url));
        if let Some(keys) = urls.get_mut(&object.url) {
            keys.retain(|k| *k != combined);
            if keys.is_empty() {
                urls.remove(&object.url);
            }
        }
    }

    fn forget_counts(&self, object: &Object) {
        self.bytes.fetch_sub(object.weight(), Ordering::Relaxed);
        self.objects.fetch_sub(1, Ordering::Relaxed);
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

fn read<T>(lock: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(|p| p.into_inner())
}

fn write<T>(lock: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(|p| p.into_inner())
}

#[async_trait]
impl Storage for MemoryStorage {
    async fn lookup(
        &'static self,
        key: &CacheKey,
        _trace: &SpanHandle,
    ) -> Result<Option<(CacheMeta, HitHandler)>> {
        let combined = key.combined_bin();
        let Some(object) = read(self.shard(&combined)).get(&combined).cloned() else {
            return Ok(None);
        };
        let meta = object.meta.meta();
        let hit = Hit {
            body: object.body.clone(),
            start: 0,
            end: object.body.len(),
            done: false,
        };
        Ok(Some((meta, Box::new(hit))))
    }

    async fn get_miss_handler(
        &'static self,
        key: &CacheKey,
        meta: &CacheMeta,
        _trace: &SpanHandle,
    ) -> Result<MissHandler> {
        Ok(Box::new(Miss {
            storage: self,
            combined: key.combined_bin(),
            key: key.to_compact(),
            url: String::from_utf8_lossy(key.primary_key()).into(),
            meta: StoredMeta::of(meta),
            body: BytesMut::new(),
            too_large: false,
        }))
    }

    async fn purge(
        &'static self,
        target: PurgeTarget<'_>,
        _purge_type: PurgeType,
        _trace: &SpanHandle,
    ) -> Result<PurgeOutcome> {
        Ok(match self.remove(&target.key().combined_bin()) {
            true => PurgeOutcome::Purged(None),
            false => PurgeOutcome::NotFound,
        })
    }

    async fn update_meta(
        &'static self,
        key: &CacheKey,
        meta: &CacheMeta,
        _trace: &SpanHandle,
    ) -> Result<bool> {
        let combined = key.combined_bin();
        let Some(object) = read(self.shard(&combined)).get(&combined).cloned() else {
            return Ok(false);
        };
        self.insert(
            combined,
            Object {
                meta: StoredMeta::of(meta),
                body: object.body.clone(),
                url: object.url.clone(),
                key: object.key.clone(),
            },
        );
        Ok(true)
    }

    fn as_any(&self) -> &(dyn Any + Send + Sync + 'static) {
        self
    }
}

/// A hit: the stored body, or the part of it a range asked for.
struct Hit {
    body: Bytes,
    start: usize,
    end: usize,
    done: bool,
}

#[async_trait]
impl HandleHit for Hit {
    async fn read_body(&mut self) -> Result<Option<Bytes>> {
        if std::mem::replace(&mut self.done, true) {
            return Ok(None);
        }
        Ok(Some(self.body.slice(self.start..self.end)))
    }

    async fn finish(
        self: Box<Self>,
        _storage: &'static (dyn Storage + Sync),
        _key: &CacheKey,
        _trace: &SpanHandle,
    ) -> Result<()> {
        Ok(())
    }

    fn can_seek(&self) -> bool {
        true
    }

    fn seek(&mut self, start: usize, end: Option<usize>) -> Result<()> {
        if start >= self.body.len() {
            return Error::e_explain(
                ErrorType::InternalError,
                format!("range start {start} past the body ({})", self.body.len()),
            );
        }
        self.start = start;
        self.end = end.map_or(self.body.len(), |end| end.min(self.body.len()));
        // One handler may serve several ranges.
        self.done = false;
        Ok(())
    }

    fn get_eviction_weight(&self) -> usize {
        self.body.len()
    }

    fn as_any(&self) -> &(dyn Any + Send + Sync) {
        self
    }

    fn as_any_mut(&mut self) -> &mut (dyn Any + Send + Sync) {
        self
    }
}

/// A response being stored: kept aside until it is complete.
struct Miss {
    storage: &'static MemoryStorage,
    combined: HashBinary,
    key: CompactCacheKey,
    url: Box<str>,
    meta: StoredMeta,
    body: BytesMut,
    too_large: bool,
}

#[async_trait]
impl HandleMiss for Miss {
    async fn write_body(&mut self, data: Bytes, _eof: bool) -> Result<()> {
        if self.too_large || self.body.len() + data.len() > self.storage.max_object {
            // The response goes on to the client; it is just not kept.
            self.too_large = true;
            self.body = BytesMut::new();
            return Ok(());
        }
        self.body.extend_from_slice(&data);
        Ok(())
    }

    async fn finish(self: Box<Self>) -> Result<MissFinishType> {
        if self.too_large {
            return Error::e_explain(
                ErrorType::InternalError,
                "the response is larger than cache.max_object",
            );
        }
        let object = Object {
            meta: self.meta,
            body: self.body.freeze(),
            url: self.url,
            key: self.key,
        };
        let weight = object.weight();
        self.storage.insert(self.combined, object);
        Ok(MissFinishType::Created(weight))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pingora::cache::eviction::lru::Manager;
    use pingora::cache::eviction::{CacheEntryKey, EvictionManager};
    use std::time::Duration;

    fn leak<T>(value: T) -> &'static T {
        Box::leak(Box::new(value))
    }

    fn meta() -> CacheMeta {
        let mut header = ResponseHeader::build(200, None).unwrap();
        header.insert_header("cache-control", "max-age=60").unwrap();
        let now = SystemTime::now();
        CacheMeta::new(now + Duration::from_secs(60), now, 0, 0, header)
    }

    fn span() -> SpanHandle {
        pingora::cache::trace::Span::inactive().handle()
    }

    async fn body_of(store: &'static MemoryStorage, key: &CacheKey) -> Option<Vec<u8>> {
        let (_, mut hit) = store.lookup(key, &span()).await.unwrap()?;
        let mut body = Vec::new();
        while let Some(chunk) = hit.read_body().await.unwrap() {
            body.extend_from_slice(&chunk);
        }
        Some(body)
    }

    /// Writes `chunks` as one response for `key`, finishing it if `complete`.
    async fn put(
        store: &'static MemoryStorage,
        key: &CacheKey,
        chunks: &[&[u8]],
        complete: bool,
    ) -> Option<usize> {
        let mut miss = store.get_miss_handler(key, &meta(), &span()).await.unwrap();
        for (i, chunk) in chunks.iter().enumerate() {
            let eof = complete && i + 1 == chunks.len();
            miss.write_body(Bytes::copy_from_slice(chunk), eof)
                .await
                .unwrap();
        }
        if !complete {
            return None;
        }
        match miss.finish().await {
            Ok(MissFinishType::Created(size)) => Some(size),
            _ => None,
        }
    }

    #[tokio::test]
    async fn only_complete_responses_are_served() {
        let store = leak(MemoryStorage::new(1024));
        let key = CacheKey::new("http://a/x", "");
        // The upstream died mid-body: the handler is dropped unfinished.
        put(store, &key, &[b"half of"], false).await;
        assert!(store.lookup(&key, &span()).await.unwrap().is_none());
        assert_eq!((store.objects(), store.bytes()), (0, 0));
        let weight = put(store, &key, &[b"hello ".as_slice(), b"world"], true)
            .await
            .unwrap();
        assert_eq!(body_of(store, &key).await.unwrap(), b"hello world");
        assert_eq!((store.objects(), store.bytes()), (1, weight));
        // A range is a slice of the stored body.
        let (_, mut hit) = store.lookup(&key, &span()).await.unwrap().unwrap();
        hit.seek(6, Some(8)).unwrap();
        assert_eq!(hit.read_body().await.unwrap().unwrap(), "wo");
        assert!(hit.read_body().await.unwrap().is_none());
        assert!(hit.seek(11, None).is_err());
    }

    #[tokio::test]
    async fn a_body_over_max_object_is_not_kept() {
        let store = leak(MemoryStorage::new(8));
        let key = CacheKey::new("http://a/big", "");
        assert_eq!(
            put(store, &key, &[b"12345".as_slice(), b"6789"], true).await,
            None
        );
        assert!(store.lookup(&key, &span()).await.unwrap().is_none());
        assert_eq!(
            put(store, &key, &[b"1234".as_slice(), b"5678"], true)
                .await
                .map(|_| ()),
            Some(())
        );
    }

    #[tokio::test]
    async fn variants_and_generations_are_counted_once_and_purged_by_url() {
        let store = leak(MemoryStorage::new(1024));
        let plain = CacheKey::new("http://a/page", "");
        let mut gzip = CacheKey::new("http://a/page", "");
        gzip.set_variance_key(pingora::cache::key::hash_key("gzip"));
        let other = CacheKey::new("http://a/pages", "");
        put(store, &plain, &[b"one"], true).await;
        put(store, &gzip, &[b"two"], true).await;
        let third = put(store, &other, &[b"three"], true).await.unwrap();
        // A new generation replaces the old one, and its bytes.
        put(store, &plain, &[b"ONE"], true).await;
        assert_eq!(store.objects(), 3);
        assert_eq!(body_of(store, &plain).await.unwrap(), b"ONE");
        assert_eq!(body_of(store, &gzip).await.unwrap(), b"two");
        let removed = store.purge_where(|url| url == "http://a/page");
        assert_eq!(removed.len(), 2, "both variants");
        assert!(body_of(store, &gzip).await.is_none());
        assert_eq!((store.objects(), store.bytes()), (1, third));
        // What the eviction manager is told back names the object it tracks.
        let target = PurgeTarget::Active(&removed[0]);
        let outcome = store.purge(target, PurgeType::Invalidation, &span()).await;
        assert_eq!(outcome.unwrap(), PurgeOutcome::NotFound);
        let key = other.to_compact();
        let outcome = store
            .purge(PurgeTarget::Active(&key), PurgeType::Invalidation, &span())
            .await;
        assert_eq!(outcome.unwrap(), PurgeOutcome::Purged(None));
        assert_eq!((store.objects(), store.bytes()), (0, 0));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn eviction_keeps_the_bytes_under_the_bound_under_concurrent_writers() {
        const LIMIT: usize = 64 * 1024;
        let store = leak(MemoryStorage::new(4096));
        let lru = leak(Manager::<4>::with_capacity(LIMIT, 1024));
        let mut writers = Vec::new();
        for writer in 0..8 {
            writers.push(tokio::spawn(async move {
                for i in 0..200 {
                    let key = CacheKey::new(format!("http://a/{writer}/{i}"), "");
                    let size = put(store, &key, &[&[7u8; 1000]], true).await.unwrap();
                    let entry = CacheEntryKey::key_only(key.to_compact());
                    let until = SystemTime::now() + Duration::from_secs(60);
                    for evicted in lru.admit(entry, size, until) {
                        let target = PurgeTarget::Exact(&evicted);
                        store
                            .purge(target, PurgeType::Eviction, &span())
                            .await
                            .unwrap();
                    }
                }
            }));
        }
        for writer in writers {
            writer.await.unwrap();
        }
        let held = store.bytes();
        assert!(held <= LIMIT, "{held} bytes held, the bound is {LIMIT}");
        assert!(held > LIMIT / 2, "the cache is used: {held}");
        assert_eq!(held, lru.total_size(), "the store and the manager agree");
        assert_eq!(store.objects(), lru.total_items());
    }

    #[tokio::test]
    async fn a_url_is_purged_through_its_index_with_every_variant() {
        let store = leak(MemoryStorage::new(1024));
        let key = |url: &str, variance: Option<&str>| {
            let mut key = CacheKey::new(url, "");
            if let Some(v) = variance {
                key.set_variance_key(pingora::cache::key::hash_key(v));
            }
            // Distinct primaries (two queries) under one URL, as `policy::key` makes them.
            key.set_primary_bin_override(pingora::cache::key::hash_key(format!(
                "{url}{variance:?}"
            )));
            key
        };
        put(store, &key("http://a/x", None), &[b"1"], true).await;
        put(store, &key("http://a/x", Some("gzip")), &[b"2"], true).await;
        put(store, &key("http://a/x", Some("gzip")), &[b"2b"], true).await;
        put(store, &key("http://a/y", None), &[b"3"], true).await;
        assert_eq!(store.objects(), 3);
        assert_eq!(store.purge_url("http://a/x").len(), 2);
        assert_eq!(
            store.purge_url("http://a/x").len(),
            0,
            "the index let go of them"
        );
        assert_eq!(store.objects(), 1);
        assert_eq!(store.purge_where(|_| true).len(), 1);
        assert_eq!(store.purge_url("http://a/y").len(), 0);
        assert_eq!((store.objects(), store.bytes()), (0, 0));
    }
}
