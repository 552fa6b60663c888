//! Retries: when, how long to wait, and how many a pool can afford.
//!
//! The budget follows Envoy's: retries in progress may not exceed `budget_percent` of the
//! pool's requests in progress, with a floor so a quiet pool can still retry. A failing pool
//! therefore sees at most a few percent more traffic, never a multiple of it. The floor is
//! also never below one backend's share of the requests in progress, so losing a single
//! backend of a small pool (a third of the traffic of three) costs no client a failure.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::config::raw::RawRetries;
use crate::config::Errors;

/// Compiles `pools.<name>.retries` (at YAML path `at`).
pub fn compile(r: &RawRetries, at: &str, errors: &mut Errors) -> RetryPolicy {
    let policy = RetryPolicy {
        attempts: r.attempts.unwrap_or(2),
        backoff_base: r.backoff.base.map_or(Duration::from_millis(25), |d| d.0),
        backoff_max: r.backoff.max.map_or(Duration::from_millis(250), |d| d.0),
        budget_percent: r.budget_percent.unwrap_or(20),
        min_concurrency: r.min_concurrency.unwrap_or(3),
    };
    if policy.attempts > 10 {
        errors.push(
            format!("{at}.attempts"),
            format!("must be 0 to 10 (got {})", policy.attempts),
        );
    }
    if policy.backoff_max < policy.backoff_base {
        errors.push(format!("{at}.backoff.max"), "must be at least backoff.base");
    }
    if policy.budget_percent > 100 {
        errors.push(
            format!("{at}.budget_percent"),
            format!("must be 0 to 100 (got {})", policy.budget_percent),
        );
    }
    policy
}

/// `pools.*.retries`, compiled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Retries after the first attempt (0 disables retries).
    pub attempts: u32,
    /// First backoff ceiling; doubles per retry.
    pub backoff_base: Duration,
    /// Largest backoff ceiling.
    pub backoff_max: Duration,
    /// Retries in progress may be at most this percent of requests in progress.
    pub budget_percent: u32,
    /// ...but this many are always allowed.
    pub min_concurrency: u32,
}

impl RetryPolicy {
    /// The wait before retry number `retry` (1-based): full jitter, uniformly random between
    /// zero and `min(max, base × 2^(retry-1))`. `random` is in [0, 1).
    pub fn backoff(&self, retry: u32, random: f64) -> Duration {
        let ceiling = self
            .backoff_base
            .saturating_mul(1u32 << retry.saturating_sub(1).min(20))
            .min(self.backoff_max);
        ceiling.mul_f64(random.clamp(0.0, 1.0))
    }
}

/// A pool's count of retries in progress; requests in progress are counted by the pool.
#[derive(Debug, Default)]
pub struct RetryBudget {
    retrying: AtomicU64,
}

impl RetryBudget {
    /// Takes a place for one more retry if fewer than the budget allows are in progress,
    /// given `active` requests in progress over `backends` backends. Each success needs a
    /// [`Self::release`].
    pub fn try_acquire(&self, policy: &RetryPolicy, active: u64, backends: usize) -> bool {
        // A single backend has no other to retry on: its share would be everything.
        let one_backends_share = match backends {
            0 | 1 => 0,
            n => active.div_ceil(n as u64),
        };
        let allowed = (active * u64::from(policy.budget_percent) / 100)
            .max(u64::from(policy.min_concurrency))
            .max(one_backends_share);
        self.retrying
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < allowed).then_some(n + 1)
            })
            .is_ok()
    }

    /// Gives back `n` places when their request ends.
    pub fn release(&self, n: u64) {
        self.retrying.fetch_sub(n, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RetryPolicy {
        RetryPolicy {
            attempts: 2,
            backoff_base: Duration::from_millis(25),
            backoff_max: Duration::from_millis(250),
            budget_percent: 20,
            min_concurrency: 3,
        }
    }

    #[test]
    fn backoff_is_full_jitter_under_a_doubling_capped_ceiling() {
        let p = policy();
        let ms = |retry, r| p.backoff(retry, r).as_millis();
        assert_eq!(
            [
                ms(1, 0.999),
                ms(2, 0.999),
                ms(3, 0.999),
                ms(4, 0.999),
                ms(5, 0.999)
            ],
            [24, 49, 99, 199, 249]
        );
        assert_eq!(ms(9, 0.999), 249, "capped at max");
        assert_eq!(ms(3, 0.0), 0);
        assert_eq!(ms(3, 0.5), 50);
        assert_eq!(ms(40, 0.5), 125, "no overflow for large retry numbers");
    }

    #[test]
    fn budget_has_a_floor_then_a_share_of_active_requests() {
        let budget = RetryBudget::default();
        let p = policy();
        // Little traffic: the floor of 3 applies.
        let granted = (0..5).filter(|_| budget.try_acquire(&p, 1, 10)).count();
        assert_eq!(granted, 3);
        budget.release(3);

        // 100 requests in progress: 20% may be retries.
        let granted = (0..50).filter(|_| budget.try_acquire(&p, 100, 10)).count();
        assert_eq!(granted, 20);
        assert!(!budget.try_acquire(&p, 100, 10));
        budget.release(1);
        assert!(
            budget.try_acquire(&p, 100, 10),
            "places return when requests end"
        );
        budget.release(20);

        // Three backends: one backend's share (a third) may always retry.
        let granted = (0..50).filter(|_| budget.try_acquire(&p, 100, 3)).count();
        assert_eq!(granted, 34);
        budget.release(34);
        let granted = (0..50).filter(|_| budget.try_acquire(&p, 12, 3)).count();
        assert_eq!(granted, 4);
        budget.release(4);
        // One backend: only the percentage and the floor.
        let granted = (0..50).filter(|_| budget.try_acquire(&p, 100, 1)).count();
        assert_eq!(granted, 20);
    }
}
