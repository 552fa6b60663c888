//! Progressive slow-down (`slow_down:`): after `after` requests from one key within `per`,
//! each further request waits `delay_step × (n − after)` (at most `max_delay`) before it is
//! forwarded, where `n` is its number in the window. The window starts with the key's first
//! request and lasts `per`; then the count starts again. A delayed request is answered
//! normally, and the wait holds no thread (the request's task sleeps).

use std::sync::Arc;
use std::time::Duration;

use prometheus::IntCounter;

use super::key::KeySource;
use super::table::{Idle, Table};
use super::{fingerprint, DEFAULT_IPV6_PREFIX};
use crate::config::raw::RawSlowDown;
use crate::config::Errors;

/// One `slow_down:` policy, compiled.
pub struct SlowDown {
    /// Its name under `slow_down:`.
    pub name: String,
    /// What it counts by.
    pub key: KeySource,
    /// Requests in a window that pass without delay.
    pub after: u32,
    /// The window.
    pub per: Duration,
    /// The delay added per request beyond `after`.
    pub delay_step: Duration,
    /// The longest delay.
    pub max_delay: Duration,
    /// IPv6 clients share a count per this many leading bits.
    pub ipv6_prefix: u8,
    /// Most keys its table holds.
    pub max_keys: usize,
    /// A digest of the definition: a reload that keeps it keeps the counts.
    pub fingerprint: u64,
    /// The counts (a table of its own until the snapshot is activated).
    pub counts: Arc<Counts>,
}

/// One key's window: how many requests it has seen, and when it ends (nanoseconds; past
/// it the entry is as good as absent).
#[derive(Debug, Clone, Copy)]
pub struct Window {
    count: u64,
    end: u64,
    /// Whether its key is being slowed down (past `after`).
    slowed: bool,
}

impl Idle for Window {
    fn idle_at(&self) -> u64 {
        self.end
    }

    fn keep_rank(&self) -> u64 {
        // A flood of new keys evicts windows still under `after` (the nearest to their end
        // first) before any of a client being slowed down, whose window is the oldest.
        match self.slowed {
            true => u64::MAX,
            false => self.end,
        }
    }
}

/// The in-memory counts of one policy.
pub struct Counts {
    table: Table<Window>,
    /// `kingdom_edge_slowed_down_total{policy}`: requests delayed.
    pub slowed: IntCounter,
}

impl Counts {
    /// A store for at most `max_keys` keys, counting delayed requests in `slowed`.
    pub fn new(max_keys: usize, slowed: IntCounter) -> Self {
        Self {
            table: Table::new(max_keys),
            slowed,
        }
    }

    /// Drops windows that have ended.
    pub fn sweep(&self, now: u64) {
        self.table.sweep(now);
    }
}

/// The delay of the `n`-th request of a window.
pub fn delay(n: u64, after: u64, step: Duration, max: Duration) -> Duration {
    match n.checked_sub(after) {
        None | Some(0) => Duration::ZERO,
        Some(beyond) => step
            .checked_mul(u32::try_from(beyond).unwrap_or(u32::MAX))
            .unwrap_or(max)
            .min(max),
    }
}

impl SlowDown {
    /// Counts a request keyed `key` at `now` (nanoseconds); how long it must wait.
    pub fn hit(&self, key: u64, now: u64) -> Duration {
        let per = self.per.as_nanos() as u64;
        let after = u64::from(self.after);
        let n = self.counts.table.update(key, |window| {
            let (count, end) = match window {
                Some(w) if now < w.end => (w.count + 1, w.end),
                _ => (1, now.saturating_add(per)),
            };
            let slowed = count > after;
            (count, Some(Window { count, end, slowed }))
        });
        let wait = delay(n, after, self.delay_step, self.max_delay);
        if !wait.is_zero() {
            self.counts.slowed.inc();
        }
        wait
    }
}

/// Compiles `slow_down.<name>` at YAML path `path`.
pub fn compile(name: &str, raw: &RawSlowDown, path: &str, errors: &mut Errors) -> Option<SlowDown> {
    let start = errors.len();
    let key = KeySource::compile(&raw.key, &format!("{path}.key"), errors);
    if raw.per.0 < Duration::from_secs(1) {
        errors.push(
            format!("{path}.per"),
            format!("must be at least 1s (got {:?})", raw.per.0),
        );
    }
    if raw.delay_step.0.is_zero() {
        errors.push(format!("{path}.delay_step"), "must be > 0 (got 0s)");
    }
    if raw.max_delay.0 < raw.delay_step.0 {
        errors.push(format!("{path}.max_delay"), "must be at least delay_step");
    }
    if raw.max_delay.0 > Duration::from_secs(60) {
        errors.push(
            format!("{path}.max_delay"),
            format!(
                "must be at most 60s (got {:?}): a longer wait only holds connections",
                raw.max_delay.0
            ),
        );
    }
    let ipv6_prefix = raw.ipv6_prefix.unwrap_or(DEFAULT_IPV6_PREFIX);
    if !(1..=128).contains(&ipv6_prefix) {
        errors.push(
            format!("{path}.ipv6_prefix"),
            format!("must be 1 to 128 (got {ipv6_prefix})"),
        );
    }
    let max_keys = super::max_keys(raw.max_keys, path, errors);
    let key = key?;
    if errors.len() > start {
        return None;
    }
    Some(SlowDown {
        name: name.to_string(),
        key,
        after: raw.after,
        per: raw.per.0,
        delay_step: raw.delay_step.0,
        max_delay: raw.max_delay.0,
        ipv6_prefix,
        max_keys,
        fingerprint: fingerprint(&format!("{raw:?}")),
        counts: Arc::new(Counts::new(
            max_keys,
            IntCounter::new("kingdom_edge_detached", "not exported")
                .expect("static metric definition"),
        )),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    #[test]
    fn the_delay_grows_by_a_step_per_request_beyond_after_up_to_the_cap() {
        let ms = Duration::from_millis;
        let delays: Vec<u128> = (1..=8)
            .map(|n| delay(n, 3, ms(100), ms(350)).as_millis())
            .collect();
        assert_eq!(delays, [0, 0, 0, 100, 200, 300, 350, 350]);
        assert_eq!(delay(u64::MAX, 0, ms(100), ms(2000)), ms(2000));
    }

    #[test]
    fn a_window_counts_from_the_first_request_and_starts_again_after_per() {
        let raw: RawSlowDown = serde_yaml::from_str(
            "{ key: client_ip, after: 2, per: 10s, delay_step: 100ms, max_delay: 1s }",
        )
        .unwrap();
        let mut errors = Errors::default();
        let policy = compile("api", &raw, "slow_down.api", &mut errors).unwrap();
        let waits: Vec<u128> = [0, 1, 2, 3, 9]
            .iter()
            .map(|t| policy.hit(42, t * S).as_millis())
            .collect();
        assert_eq!(waits, [0, 0, 100, 200, 300]);
        assert_eq!(policy.hit(42, 10 * S), Duration::ZERO, "a new window");
        assert_eq!(policy.hit(7, 10 * S), Duration::ZERO, "another key");
        assert_eq!(policy.counts.slowed.get(), 3);
        let bad: RawSlowDown = serde_yaml::from_str(
            "{ key: client_ip, after: 2, per: 10s, delay_step: 0s, max_delay: 2m }",
        )
        .unwrap();
        assert!(compile("x", &bad, "slow_down.x", &mut errors).is_none());
        assert_eq!(
            errors.rendered(),
            [
                "slow_down.x.delay_step: must be > 0 (got 0s)",
                "slow_down.x.max_delay: must be at most 60s (got 120s): a longer wait only holds connections"
            ]
        );
    }

    #[test]
    fn a_flood_of_new_keys_does_not_reset_a_slowed_client() {
        let raw: RawSlowDown = serde_yaml::from_str(
            "{ key: client_ip, after: 2, per: 600s, delay_step: 1s, max_delay: 3s, max_keys: 1024 }",
        )
        .unwrap();
        let policy = compile("api", &raw, "slow_down.api", &mut Errors::default()).unwrap();
        let victim = u64::MAX;
        for _ in 0..4 {
            policy.hit(victim, 0);
        }
        // Its window is the oldest of all: 100,000 new keys come after it.
        for i in 0..100_000u64 {
            policy.hit(i.wrapping_mul(0x9E37_79B9_7F4A_7C15), S + i);
        }
        assert_eq!(policy.hit(victim, 2 * S), Duration::from_secs(3));
    }
}
