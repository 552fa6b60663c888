//! Rate limits and slow-down: named policies in `rate_limits:` and `slow_down:`, attached to
//! routes.
//!
//! A rate limit is a GCRA bucket per key ([`gcra`]): `limit` per `per`, `burst` at once
//! (default `limit`: a client that sends at most `limit` in any window of `per` is never
//! refused; `burst: 1` spaces requests `per / limit` apart, at most `limit` in any window).
//! Over it, the request gets 429 with `retry-after`; in `mode: shadow` it is only
//! counted and logged. Buckets live in a [`BucketStore`]: here an in-memory, sharded,
//! bounded table per policy ([`Buckets`]), kept across reloads that leave the policy's
//! definition as it was (see `live`). A shared store (Redis) can take the same trait.

pub mod gcra;
pub mod key;
pub mod slowdown;
pub mod table;

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use prometheus::IntGauge;

use crate::config::raw::{RawLimitMode, RawRateLimit};
use crate::config::Errors;
use gcra::{Gcra, Verdict};
use key::KeySource;
use table::{Idle, Table};

/// Keys a policy's table holds at most unless `max_keys` says otherwise.
pub const DEFAULT_MAX_KEYS: usize = 100_000;
/// IPv6 clients share a budget per this many leading bits unless `ipv6_prefix` says
/// otherwise.
pub const DEFAULT_IPV6_PREFIX: u8 = 64;

/// `max_keys` at YAML path `path`.max_keys (default [`DEFAULT_MAX_KEYS`]): at least
/// [`table::MIN_CAPACITY`], so that each shard keeps enough keys to evict an unused one
/// rather than a limited client's spent bucket.
fn max_keys(raw: Option<usize>, path: &str, errors: &mut Errors) -> usize {
    let max_keys = raw.unwrap_or(DEFAULT_MAX_KEYS);
    if max_keys < table::MIN_CAPACITY {
        errors.push(
            format!("{path}.max_keys"),
            format!("must be at least {} (got {max_keys})", table::MIN_CAPACITY),
        );
    }
    max_keys
}

/// Nanoseconds on the monotonic clock the buckets count in.
pub fn nanos(at: Instant) -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    let epoch = *EPOCH.get_or_init(|| at);
    at.saturating_duration_since(epoch).as_nanos() as u64
}

/// Whether a policy refuses or only counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Over the limit: 429.
    Enforce,
    /// Over the limit: counted and logged, the request goes through.
    Shadow,
}

/// One `rate_limits:` policy, compiled.
pub struct RateLimit {
    /// Its name under `rate_limits:`: a label, and the name in the RateLimit headers.
    pub name: String,
    /// What it counts by.
    pub key: KeySource,
    /// Requests per `per`.
    pub limit: u32,
    /// The window.
    pub per: Duration,
    /// Requests that may come at once.
    pub burst: u32,
    /// Refuse or only count.
    pub mode: Mode,
    /// IPv6 clients share a budget per this many leading bits.
    pub ipv6_prefix: u8,
    /// Most keys its table holds.
    pub max_keys: usize,
    /// The rate, in nanoseconds.
    pub gcra: Gcra,
    /// A digest of the definition: a reload that keeps it keeps the buckets.
    pub fingerprint: u64,
    /// The buckets (a table of its own until the snapshot is activated).
    pub store: std::sync::Arc<dyn BucketStore>,
    /// `"name";q=limit;w=seconds`, for `ratelimit-policy`.
    pub policy_item: String,
    shadow_logged: AtomicU64,
}

/// Where a policy's buckets are kept.
pub trait BucketStore: Send + Sync {
    /// Decides a request of `key` at `now` (nanoseconds) with `gcra`, and, if `record`,
    /// counts an admitted one (without, it tells what the bucket says: [`Gcra::peek`]).
    fn check(&self, key: u64, now: u64, gcra: &Gcra, record: bool) -> Verdict;
    /// Drops buckets that are as good as unused at `now`, and reports how many are held.
    fn sweep(&self, now: u64);
}

/// A bucket: the theoretical arrival time of the key's next request.
#[derive(Debug, Clone, Copy)]
pub struct Tat(u64);

impl Idle for Tat {
    fn idle_at(&self) -> u64 {
        // `Gcra::is_idle`: a bucket is as good as unused once its TAT has passed.
        self.0
    }
}

/// The in-memory bucket store of one policy: sharded, bounded, its key count exported.
pub struct Buckets {
    table: Table<Tat>,
    /// `kingdom_edge_rate_limit_keys{policy}`.
    pub keys: IntGauge,
}

impl Buckets {
    /// A store for at most `max_keys` keys, reporting its size to `keys`.
    pub fn new(max_keys: usize, keys: IntGauge) -> Self {
        Self {
            table: Table::new(max_keys),
            keys,
        }
    }

    /// Keys held now.
    pub fn len(&self) -> usize {
        self.table.len()
    }

    /// Whether no key is held.
    pub fn is_empty(&self) -> bool {
        self.table.is_empty()
    }
}

impl BucketStore for Buckets {
    fn check(&self, key: u64, now: u64, gcra: &Gcra, record: bool) -> Verdict {
        self.table.update(key, |tat| match record {
            true => {
                let (verdict, next) = gcra.decide(tat.map(|t| t.0), now);
                (verdict, next.map(Tat))
            }
            false => (gcra.peek(tat.map(|t| t.0), now), tat.copied()),
        })
    }

    fn sweep(&self, now: u64) {
        self.table.sweep(now);
        self.keys.set(self.table.len() as i64);
    }
}

/// What one policy said of one request, for the answer and the headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    /// The verdict.
    pub verdict: Verdict,
    /// Whether the policy refuses (enforcing, and over the limit).
    pub refused: bool,
}

impl RateLimit {
    /// Decides the request keyed `key` at `now` (nanoseconds), counting it if admitted.
    pub fn check(&self, key: u64, now: u64) -> Outcome {
        self.decide(key, now, true)
    }

    /// What [`RateLimit::check`] would decide, counting nothing (an admitted request's
    /// verdict describes the bucket as it stands).
    pub fn peek(&self, key: u64, now: u64) -> Outcome {
        self.decide(key, now, false)
    }

    fn decide(&self, key: u64, now: u64, record: bool) -> Outcome {
        let verdict = self.store.check(key, now, &self.gcra, record);
        let over = matches!(verdict, Verdict::Deny { .. });
        Outcome {
            verdict,
            refused: over && self.mode == Mode::Enforce,
        }
    }

    /// Whether a shadow hit at `now` should be logged: at most one line a second per policy.
    pub fn log_shadow_hit(&self, now: u64) -> bool {
        let second = now / 1_000_000_000 + 1;
        self.shadow_logged.swap(second, Ordering::Relaxed) != second
    }

    /// `"name";r=remaining;t=reset`, for `ratelimit`.
    pub fn status_item(&self, verdict: &Verdict) -> String {
        let (remaining, reset) = match *verdict {
            Verdict::Allow { remaining, reset } => (remaining, reset),
            Verdict::Deny { reset, .. } => (0, reset),
        };
        format!("\"{}\";r={remaining};t={}", self.name, seconds_up(reset))
    }
}

/// Whole seconds, rounded up: a client waiting this long is never early.
pub fn seconds_up(nanos: u64) -> u64 {
    nanos.div_ceil(1_000_000_000)
}

/// Compiles `rate_limits.<name>` at YAML path `path`; the store is a table of its own until
/// the snapshot is activated.
pub fn compile(
    name: &str,
    raw: &RawRateLimit,
    path: &str,
    errors: &mut Errors,
) -> Option<RateLimit> {
    let start = errors.len();
    if !valid_name(name) {
        errors.push(
            path,
            format!("`{name}` is not a policy name (A-Z a-z 0-9 _ - .): it goes into the RateLimit headers"),
        );
    }
    let key = KeySource::compile(&raw.key, &format!("{path}.key"), errors);
    if raw.limit == 0 {
        errors.push(format!("{path}.limit"), "must be > 0 (got 0)");
    }
    let per = raw.per.0;
    if per < Duration::from_secs(1) {
        errors.push(
            format!("{path}.per"),
            format!("must be at least 1s (got {per:?})"),
        );
    } else if per.subsec_nanos() != 0 {
        errors.push(
            format!("{path}.per"),
            format!("must be whole seconds (got {per:?}): the RateLimit headers count in seconds"),
        );
    }
    let burst = raw.burst.unwrap_or(raw.limit);
    if burst == 0 {
        errors.push(format!("{path}.burst"), "must be > 0 (got 0)");
    }
    let ipv6_prefix = raw.ipv6_prefix.unwrap_or(DEFAULT_IPV6_PREFIX);
    if !(1..=128).contains(&ipv6_prefix) {
        errors.push(
            format!("{path}.ipv6_prefix"),
            format!("must be 1 to 128 (got {ipv6_prefix})"),
        );
    }
    let max_keys = max_keys(raw.max_keys, path, errors);
    let key = key?;
    if errors.len() > start {
        return None;
    }
    let mut policy_item = String::new();
    let _ = write!(
        policy_item,
        "\"{name}\";q={};w={}",
        raw.limit,
        per.as_secs()
    );
    Some(RateLimit {
        name: name.to_string(),
        key,
        limit: raw.limit,
        per,
        burst,
        mode: match raw.mode {
            None | Some(RawLimitMode::Enforce) => Mode::Enforce,
            Some(RawLimitMode::Shadow) => Mode::Shadow,
        },
        ipv6_prefix,
        max_keys,
        gcra: Gcra::new(
            u64::from(raw.limit),
            per.as_nanos() as u64,
            u64::from(burst),
        ),
        fingerprint: fingerprint(&format!("{raw:?}")),
        store: std::sync::Arc::new(Buckets::new(max_keys, detached_gauge())),
        policy_item,
        shadow_logged: AtomicU64::new(0),
    })
}

/// Names that can stand quoted in a structured header.
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
}

/// A digest of a policy's definition.
pub fn fingerprint(definition: &str) -> u64 {
    use std::hash::{DefaultHasher, Hash, Hasher};
    let mut hasher = DefaultHasher::new();
    definition.hash(&mut hasher);
    hasher.finish()
}

fn detached_gauge() -> IntGauge {
    IntGauge::new("kingdom_edge_detached", "not exported").expect("static metric definition")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(yaml: &str) -> RawRateLimit {
        serde_yaml::from_str(yaml).unwrap()
    }

    #[test]
    fn compiles_with_documented_defaults_and_exact_errors() {
        let mut errors = Errors::default();
        let policy = compile(
            "auth",
            &raw("{ key: client_ip, limit: 5, per: 15m }"),
            "rate_limits.auth",
            &mut errors,
        )
        .unwrap();
        assert!(errors.is_empty());
        assert_eq!(
            (policy.burst, policy.mode, policy.ipv6_prefix),
            (5, Mode::Enforce, 64)
        );
        assert_eq!(policy.max_keys, DEFAULT_MAX_KEYS);
        assert_eq!(policy.policy_item, "\"auth\";q=5;w=900");
        assert_eq!(policy.gcra.interval, 180_000_000_000);
        let bad = raw("{ key: ip, limit: 0, per: 0s, burst: 0, ipv6_prefix: 129, max_keys: 0 }");
        assert!(compile("a b", &bad, "rate_limits.x", &mut errors).is_none());
        let got = errors.rendered();
        assert_eq!(got.len(), 7, "{got:?}");
        assert!(got
            .iter()
            .any(|e| e.starts_with("rate_limits.x.key: `ip` is not a key")));
        let mut errors = Errors::default();
        let fraction = raw("{ key: client_ip, limit: 3, per: 1500ms }");
        assert!(compile("y", &fraction, "rate_limits.y", &mut errors).is_none());
        assert_eq!(
            errors.rendered(),
            ["rate_limits.y.per: must be whole seconds (got 1.5s): the RateLimit headers count in seconds"]
        );
    }

    #[test]
    fn the_headers_say_what_the_bucket_says() {
        let mut errors = Errors::default();
        let policy = compile(
            "api",
            &raw("{ key: client_ip, limit: 2, per: 10s, burst: 2 }"),
            "p",
            &mut errors,
        )
        .unwrap();
        let first = policy.check(7, 0);
        assert!(!first.refused);
        assert_eq!(policy.status_item(&first.verdict), "\"api\";r=1;t=5");
        // A peek tells the bucket as it stands, and counts nothing.
        for _ in 0..3 {
            let peeked = policy.peek(7, 0);
            assert_eq!(policy.status_item(&peeked.verdict), "\"api\";r=1;t=5");
        }
        policy.peek(8, 0);
        let unpeeked = policy.check(8, 0);
        assert_eq!(policy.status_item(&unpeeked.verdict), "\"api\";r=1;t=5");
        policy.check(7, 0);
        let third = policy.check(7, 1_000_000_000);
        assert!(third.refused);
        assert!(
            matches!(third.verdict, Verdict::Deny { retry_after, .. } if seconds_up(retry_after) == 4)
        );
        assert_eq!(policy.status_item(&third.verdict), "\"api\";r=0;t=9");
        let shadow = compile(
            "s",
            &raw("{ key: client_ip, limit: 1, per: 10s, mode: shadow }"),
            "p",
            &mut errors,
        )
        .unwrap();
        shadow.check(1, 0);
        let over = shadow.check(1, 0);
        assert!(!over.refused && matches!(over.verdict, Verdict::Deny { .. }));
        assert!(shadow.log_shadow_hit(0));
        assert!(!shadow.log_shadow_hit(500_000_000), "once a second");
        assert!(shadow.log_shadow_hit(1_000_000_000));
    }
}
