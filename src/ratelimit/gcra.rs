//! GCRA, the generic cell rate algorithm (a leaky bucket kept as one number per key: the
//! theoretical arrival time, TAT, of the next request at the sustained rate).
//!
//! With `limit` per `per`, requests are due one every `T = per / limit`; `burst` of them may
//! come at once (tolerance `τ = (burst − 1) × T`). A request at `now` is admitted when
//! `TAT − τ ≤ now`, and then `TAT = max(TAT, now) + T`. This is a token bucket of `burst`
//! tokens refilled one every `T`, with exact arithmetic. Its two guarantees:
//! - with `burst ≥ limit` (the policies' default is `burst = limit`), a client that sends at
//!   most `limit` requests in any window of `per` is never refused;
//! - at most `limit + burst − 1` requests pass in any window of `per`, and `limit` per `per`
//!   sustained. With `burst: 1`, requests are spaced at least `T` apart and at most `limit`
//!   pass in any window of `per`.
//!
//! Time is nanoseconds on a monotonic clock, passed in.

/// One policy's rate, in nanoseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gcra {
    /// `T`: one request every this long, sustained.
    pub interval: u64,
    /// `τ`: how far ahead of the sustained rate a burst may run.
    pub tolerance: u64,
}

/// What the bucket says of one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Admitted.
    Allow {
        /// Requests that would still be admitted right now.
        remaining: u64,
        /// Nanoseconds until the bucket is full again (nothing of it used).
        reset: u64,
    },
    /// Refused.
    Deny {
        /// Nanoseconds until a request would be admitted.
        retry_after: u64,
        /// Nanoseconds until the bucket is full again.
        reset: u64,
    },
}

impl Gcra {
    /// `limit` requests per `per` nanoseconds, `burst` at once (`limit`, `burst` ≥ 1).
    pub fn new(limit: u64, per: u64, burst: u64) -> Self {
        let interval = (per / limit.max(1)).max(1);
        Self {
            interval,
            tolerance: interval.saturating_mul(burst.max(1) - 1),
        }
    }

    /// Decides a request at `now` on a bucket whose TAT is `tat` (`None`: unused). Returns
    /// the verdict and the bucket's new TAT (unchanged when refused).
    pub fn decide(&self, tat: Option<u64>, now: u64) -> (Verdict, Option<u64>) {
        let tat = tat.unwrap_or(now).max(now);
        let allow_at = tat.saturating_sub(self.tolerance);
        if now < allow_at {
            let verdict = Verdict::Deny {
                retry_after: allow_at - now,
                reset: tat - now,
            };
            return (verdict, Some(tat));
        }
        let next = tat + self.interval;
        // The next request is admitted while the TAT is within τ of now; each adds T.
        let ahead = next - now;
        let remaining = match (self.tolerance + self.interval).checked_sub(ahead) {
            Some(room) => room / self.interval,
            None => 0,
        };
        let verdict = Verdict::Allow {
            remaining,
            reset: ahead,
        };
        (verdict, Some(next))
    }

    /// What [`Gcra::decide`] would say, changing nothing: for a request it would admit,
    /// `remaining` and `reset` describe the bucket as it stands, the request not counted.
    pub fn peek(&self, tat: Option<u64>, now: u64) -> Verdict {
        match self.decide(tat, now).0 {
            // Admitted, the request adds exactly one `T` (see `decide`).
            Verdict::Allow { remaining, reset } => Verdict::Allow {
                remaining: remaining + 1,
                reset: reset - self.interval,
            },
            deny => deny,
        }
    }

    /// Whether a bucket with this TAT is as good as unused at `now` (it can be dropped).
    pub fn is_idle(tat: u64, now: u64) -> bool {
        tat <= now
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    /// Runs requests at `times` (seconds) through one bucket; which were admitted.
    fn run(gcra: Gcra, times: &[f64]) -> Vec<bool> {
        let mut tat = None;
        times
            .iter()
            .map(|t| {
                let (verdict, next) = gcra.decide(tat, (t * S as f64) as u64);
                tat = next;
                matches!(verdict, Verdict::Allow { .. })
            })
            .collect()
    }

    #[test]
    fn without_a_burst_at_most_limit_pass_in_any_window() {
        // 5 per 15 minutes: one every 180 s.
        let gcra = Gcra::new(5, 900 * S, 1);
        assert_eq!(
            run(gcra, &[0.0, 1.0, 179.999, 180.0]),
            [true, false, false, true]
        );
        let spaced: Vec<f64> = (0..6).map(|i| i as f64 * 180.0).collect();
        assert_eq!(run(gcra, &spaced), [true; 6], "one every 180 s, for ever");
        // However a client spaces them, no 15-minute window ever holds a sixth.
        let times: Vec<f64> = (0..2000).map(|i| i as f64 * 1.7).collect();
        assert_eq!(most_in_a_window(&admitted(gcra, &times), 900.0), 5);
    }

    /// Admission times (seconds) of a client sending at `times`.
    fn admitted(gcra: Gcra, times: &[f64]) -> Vec<f64> {
        times
            .iter()
            .zip(run(gcra, times))
            .filter_map(|(t, ok)| ok.then_some(*t))
            .collect()
    }

    /// The most admissions in any window of `per` seconds.
    fn most_in_a_window(admitted: &[f64], per: f64) -> usize {
        admitted
            .iter()
            .map(|start| {
                admitted
                    .iter()
                    .filter(|t| **t >= *start && **t < start + per)
                    .count()
            })
            .max()
            .unwrap_or(0)
    }

    #[test]
    fn with_burst_equal_to_limit_a_client_within_the_limit_is_never_refused() {
        // 5 per 15 minutes, 5 at once: a client that never sends a sixth request within
        // 900 s of five others passes every time, however it bunches them.
        let gcra = Gcra::new(5, 900 * S, 5);
        let patterns: [&[f64]; 4] = [
            &[0.0, 0.0, 0.0, 0.0, 0.0, 900.0, 900.0, 900.0, 900.0, 900.0],
            &[
                0.0, 899.0, 899.0, 899.0, 899.0, 1799.0, 1799.0, 1799.0, 1799.0, 1799.0,
            ],
            &[10.0, 20.0, 30.0, 930.0, 931.0, 932.0, 1810.0],
            &[
                0.0, 300.0, 300.0, 600.0, 600.0, 900.0, 1200.0, 1200.0, 1500.0, 1500.0,
            ],
        ];
        for times in patterns {
            assert!(most_in_a_window(times, 900.0) <= 5, "{times:?}");
            assert_eq!(run(gcra, times), vec![true; times.len()], "{times:?}");
        }
        // After five at once, the sixth is due T = 180 s later, to the nanosecond.
        let five_then = |t: u64| {
            let mut tat = None;
            for _ in 0..5 {
                tat = gcra.decide(tat, 0).1;
            }
            matches!(gcra.decide(tat, t).0, Verdict::Allow { .. })
        };
        assert!(!five_then(180 * S - 1));
        assert!(five_then(180 * S), "one is back after T = 180 s");
        // An attacker sending all the time gets `limit + burst - 1` in its first window and
        // `limit` per window after that.
        let flood: Vec<f64> = (0..3600).map(|i| i as f64).collect();
        let passed = admitted(gcra, &flood);
        assert_eq!(most_in_a_window(&passed, 900.0), 9);
        assert_eq!(passed.len(), 5 + 3599 / 180);
    }

    #[test]
    fn a_burst_passes_at_once_then_the_rate_applies() {
        let gcra = Gcra::new(5, 900 * S, 5);
        let burst = run(gcra, &[0.0, 0.0, 0.0, 0.0, 0.0, 0.0]);
        assert_eq!(burst, [true, true, true, true, true, false]);
        assert_eq!(
            run(gcra, &[0.0, 0.0, 0.0, 0.0, 0.0, 179.0, 180.0, 181.0, 360.0]),
            [true, true, true, true, true, false, true, false, true]
        );
    }

    #[test]
    fn remaining_reset_and_retry_after_are_exact() {
        let gcra = Gcra::new(5, 900 * S, 5);
        let (first, tat) = gcra.decide(None, 0);
        assert_eq!(
            first,
            Verdict::Allow {
                remaining: 4,
                reset: 180 * S
            }
        );
        let mut tat = tat;
        for left in (0..4).rev() {
            let (verdict, next) = gcra.decide(tat, 0);
            tat = next;
            assert!(matches!(verdict, Verdict::Allow { remaining, .. } if remaining == left));
        }
        let (denied, unchanged) = gcra.decide(tat, 10 * S);
        assert_eq!(unchanged, tat, "a refusal does not use the bucket");
        assert_eq!(
            denied,
            Verdict::Deny {
                retry_after: 170 * S,
                reset: 890 * S
            }
        );
        let strict = Gcra::new(5, 900 * S, 1);
        assert_eq!(
            strict.decide(None, 0).0,
            Verdict::Allow {
                remaining: 0,
                reset: 180 * S
            }
        );
        assert!(Gcra::is_idle(5, 5) && !Gcra::is_idle(6, 5));
    }

    #[test]
    fn a_peek_describes_the_bucket_before_the_request() {
        let gcra = Gcra::new(5, 900 * S, 5);
        assert_eq!(
            gcra.peek(None, 0),
            Verdict::Allow {
                remaining: 5,
                reset: 0
            },
            "unused: full"
        );
        let mut tat = None;
        for now in [0, 0, 10 * S, 10 * S] {
            let peeked = gcra.peek(tat, now);
            let (decided, next) = gcra.decide(tat, now);
            let (
                Verdict::Allow { remaining, reset },
                Verdict::Allow {
                    remaining: after,
                    reset: reset_after,
                },
            ) = (peeked, decided)
            else {
                panic!("{peeked:?} {decided:?}");
            };
            assert_eq!((after + 1, reset_after), (remaining, reset + gcra.interval));
            tat = next;
        }
        tat = Some(tat.unwrap() + 180 * S);
        let (refused, _) = gcra.decide(tat, 10 * S);
        assert!(matches!(refused, Verdict::Deny { .. }));
        assert_eq!(gcra.peek(tat, 10 * S), refused, "a refusal is a refusal");
    }
}
