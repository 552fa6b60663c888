//! Passive outlier detection: a circuit breaker per backend, fed by the outcome of every
//! request sent to it.
//!
//! Closed → (N consecutive failures) → Open for `base_ejection × times ejected` (capped at
//! `max_ejection`) → HalfOpen: one probe request → success closes, failure opens again.
//! The multiplier is forgotten once the backend has stayed closed for `max_ejection`.
//! Evidence that the backend is back (a passing active health check, its sidecar restarted and
//! listening) ends an ejection early: Open → HalfOpen at once.
//! Time is passed in, so every transition is tested with a fake clock.

use std::time::{Duration, Instant};

use crate::config::raw::{RawFailureKind, RawOutlier};
use crate::config::Errors;
use crate::metrics::Outcome;

/// Compiles `pools.<name>.outlier` (at YAML path `at`); `None` when detection is turned off.
pub fn compile(o: &RawOutlier, at: &str, errors: &mut Errors) -> Option<OutlierPolicy> {
    let consecutive_failures = o.consecutive_failures.unwrap_or(5);
    if consecutive_failures == 0 {
        errors.push(
            format!("{at}.consecutive_failures"),
            "must be > 0 (got 0); use `enabled: false` to turn detection off",
        );
    }
    let base_ejection = o.base_ejection.map_or(Duration::from_secs(10), |d| d.0);
    let max_ejection = o.max_ejection.map_or(Duration::from_secs(300), |d| d.0);
    if base_ejection.is_zero() {
        errors.push(format!("{at}.base_ejection"), "must be > 0 (got 0s)");
    }
    if max_ejection < base_ejection {
        errors.push(
            format!("{at}.max_ejection"),
            "must be at least base_ejection",
        );
    }
    let max_ejected_percent = o.max_ejected_percent.unwrap_or(50);
    if max_ejected_percent > 100 {
        errors.push(
            format!("{at}.max_ejected_percent"),
            format!("must be 0 to 100 (got {max_ejected_percent})"),
        );
    }
    let kinds = o.count.clone().unwrap_or_else(|| {
        vec![
            RawFailureKind::ConnectErrors,
            RawFailureKind::Timeouts,
            RawFailureKind::Http5xx,
        ]
    });
    let count = FailureKinds {
        connect_errors: kinds.contains(&RawFailureKind::ConnectErrors),
        timeouts: kinds.contains(&RawFailureKind::Timeouts),
        http_5xx: kinds.contains(&RawFailureKind::Http5xx),
    };
    o.enabled.unwrap_or(true).then_some(OutlierPolicy {
        consecutive_failures,
        base_ejection,
        max_ejection,
        max_ejected_percent,
        count,
    })
}

/// `pools.*.outlier`, compiled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutlierPolicy {
    /// Failures in a row that open the breaker.
    pub consecutive_failures: u32,
    /// First ejection length; the n-th is n times this.
    pub base_ejection: Duration,
    /// Longest ejection.
    pub max_ejection: Duration,
    /// At most this share of the pool is ejected at once (at least one backend when > 0).
    pub max_ejected_percent: u8,
    /// Which outcomes count as failures.
    pub count: FailureKinds,
}

/// Which upstream outcomes count against a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FailureKinds {
    /// Refused or unreachable connections.
    pub connect_errors: bool,
    /// Connect, read or write timeouts.
    pub timeouts: bool,
    /// 5xx responses.
    pub http_5xx: bool,
}

impl FailureKinds {
    fn counts(self, outcome: Outcome) -> bool {
        match outcome {
            Outcome::Ok => false,
            Outcome::ConnectError => self.connect_errors,
            Outcome::Timeout => self.timeouts,
            Outcome::Http5xx => self.http_5xx,
            // Resets and protocol errors after connecting are always failures.
            Outcome::Error => true,
        }
    }
}

impl OutlierPolicy {
    /// How many of `backends` may be ejected at the same time.
    pub fn ejection_cap(&self, backends: usize) -> usize {
        if self.max_ejected_percent == 0 {
            0
        } else {
            (backends * usize::from(self.max_ejected_percent) / 100).max(1)
        }
    }
}

/// Where a breaker stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    /// Taking traffic.
    Closed,
    /// Ejected until the instant given.
    Open { until: Instant },
    /// Ejection over: one probe request decides. `probing` while it is in flight.
    HalfOpen { probing: bool },
}

impl BreakerState {
    /// The label used in `/status`.
    pub fn name(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open { .. } => "open",
            BreakerState::HalfOpen { .. } => "half_open",
        }
    }
}

/// What the breaker lets a request do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Send it.
    Yes,
    /// Send it as the half-open probe; its outcome closes or re-opens the breaker.
    Probe,
    /// Do not send it to this backend.
    No,
}

/// A transition worth logging and counting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    /// Opened for this long.
    Ejected(Duration),
    /// The probe succeeded.
    Closed,
}

/// One backend's breaker.
#[derive(Debug, Clone)]
pub struct Breaker {
    state: BreakerState,
    failures: u32,
    times_ejected: u32,
    closed_since: Option<Instant>,
}

impl Default for Breaker {
    fn default() -> Self {
        Self {
            state: BreakerState::Closed,
            failures: 0,
            times_ejected: 0,
            closed_since: None,
        }
    }
}

impl Breaker {
    /// The state at `now` (an ejection that has run out reads as half-open).
    pub fn state(&self, now: Instant) -> BreakerState {
        match self.state {
            BreakerState::Open { until } if now >= until => {
                BreakerState::HalfOpen { probing: false }
            }
            state => state,
        }
    }

    /// Whether a balancer may consider this backend at `now`.
    pub fn usable(&self, now: Instant) -> bool {
        matches!(
            self.state(now),
            BreakerState::Closed | BreakerState::HalfOpen { probing: false }
        )
    }

    /// Whether it is ejected (open) at `now`, for the ejection cap and the metrics.
    pub fn is_ejected(&self, now: Instant) -> bool {
        !matches!(self.state(now), BreakerState::Closed)
    }

    /// Admits a request chosen for this backend.
    pub fn admit(&mut self, now: Instant) -> Admission {
        match self.state(now) {
            BreakerState::Closed => Admission::Yes,
            BreakerState::HalfOpen { probing: false } => {
                self.state = BreakerState::HalfOpen { probing: true };
                Admission::Probe
            }
            BreakerState::Open { .. } | BreakerState::HalfOpen { probing: true } => Admission::No,
        }
    }

    /// Records the outcome of a request. `may_eject` is false when the pool is at its
    /// ejection cap.
    pub fn on_result(
        &mut self,
        now: Instant,
        outcome: Outcome,
        policy: &OutlierPolicy,
        may_eject: bool,
    ) -> Option<Transition> {
        let failed = policy.count.counts(outcome);
        match self.state(now) {
            BreakerState::Closed => {
                if !failed {
                    self.failures = 0;
                    if self
                        .closed_since
                        .is_some_and(|since| now.duration_since(since) >= policy.max_ejection)
                    {
                        self.times_ejected = 0;
                    }
                    return None;
                }
                self.failures += 1;
                (self.failures >= policy.consecutive_failures && may_eject)
                    .then(|| self.eject(now, policy))
            }
            BreakerState::HalfOpen { .. } if failed => Some(self.eject(now, policy)),
            BreakerState::HalfOpen { .. } => {
                self.state = BreakerState::Closed;
                self.failures = 0;
                self.closed_since = Some(now);
                Some(Transition::Closed)
            }
            // A request sent before the ejection finished late: it changes nothing.
            BreakerState::Open { .. } => None,
        }
    }

    /// Ends an ejection early, because there is outside evidence the backend is back: the
    /// next request is the half-open probe. True if it was open.
    pub fn end_ejection(&mut self, now: Instant) -> bool {
        let open = matches!(self.state, BreakerState::Open { until } if now < until);
        if open {
            self.state = BreakerState::Open { until: now };
        }
        open
    }

    /// A probe that ended with no outcome (the client went away): let another probe go.
    pub fn probe_abandoned(&mut self) {
        if self.state == (BreakerState::HalfOpen { probing: true }) {
            self.state = BreakerState::HalfOpen { probing: false };
        }
    }

    fn eject(&mut self, now: Instant, policy: &OutlierPolicy) -> Transition {
        self.times_ejected = self.times_ejected.saturating_add(1);
        let length = policy
            .base_ejection
            .saturating_mul(self.times_ejected)
            .min(policy.max_ejection);
        self.state = BreakerState::Open {
            until: now + length,
        };
        self.failures = 0;
        Transition::Ejected(length)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> OutlierPolicy {
        OutlierPolicy {
            consecutive_failures: 3,
            base_ejection: Duration::from_secs(10),
            max_ejection: Duration::from_secs(25),
            max_ejected_percent: 50,
            count: FailureKinds {
                connect_errors: true,
                timeouts: true,
                http_5xx: true,
            },
        }
    }

    fn fail(b: &mut Breaker, now: Instant, n: u32) -> Option<Transition> {
        (0..n).fold(None, |_, _| {
            b.on_result(now, Outcome::Http5xx, &policy(), true)
        })
    }

    #[test]
    fn trips_after_consecutive_failures_only() {
        let t0 = Instant::now();
        let mut b = Breaker::default();
        assert_eq!(fail(&mut b, t0, 2), None);
        assert_eq!(
            b.on_result(t0, Outcome::Ok, &policy(), true),
            None,
            "a success resets"
        );
        assert_eq!(fail(&mut b, t0, 2), None);
        assert_eq!(
            fail(&mut b, t0, 1),
            Some(Transition::Ejected(Duration::from_secs(10)))
        );
        assert!(!b.usable(t0));
        assert_eq!(b.admit(t0), Admission::No);
    }

    #[test]
    fn half_open_lets_one_probe_through_then_closes_or_reopens() {
        let t0 = Instant::now();
        let mut b = Breaker::default();
        fail(&mut b, t0, 3);
        let t1 = t0 + Duration::from_secs(10);
        assert_eq!(b.state(t1), BreakerState::HalfOpen { probing: false });
        assert!(b.usable(t1));
        assert_eq!(b.admit(t1), Admission::Probe);
        assert_eq!(b.admit(t1), Admission::No, "only one probe at a time");
        assert!(!b.usable(t1));

        // Probe fails: ejected again, twice as long.
        assert_eq!(
            b.on_result(t1, Outcome::ConnectError, &policy(), true),
            Some(Transition::Ejected(Duration::from_secs(20)))
        );
        let t2 = t1 + Duration::from_secs(20);
        assert_eq!(b.admit(t2), Admission::Probe);
        assert_eq!(
            b.on_result(t2, Outcome::Ok, &policy(), true),
            Some(Transition::Closed)
        );
        assert_eq!(b.state(t2), BreakerState::Closed);
        assert_eq!(b.admit(t2), Admission::Yes);
    }

    #[test]
    fn ejection_grows_to_the_cap_and_the_multiplier_decays() {
        let mut now = Instant::now();
        let mut b = Breaker::default();
        let mut lengths = Vec::new();
        for _ in 0..4 {
            if let Some(Transition::Ejected(d)) = fail(&mut b, now, 3) {
                lengths.push(d.as_secs());
                now += d;
            }
            assert_eq!(b.admit(now), Admission::Probe);
            b.on_result(now, Outcome::Ok, &policy(), true);
        }
        assert_eq!(lengths, [10, 20, 25, 25]);
        // Closed for max_ejection: the next ejection is short again.
        now += Duration::from_secs(25);
        b.on_result(now, Outcome::Ok, &policy(), true);
        assert_eq!(
            fail(&mut b, now, 3),
            Some(Transition::Ejected(Duration::from_secs(10)))
        );
    }

    #[test]
    fn the_cap_and_the_counted_kinds_are_respected() {
        let t0 = Instant::now();
        let mut b = Breaker::default();
        for _ in 0..10 {
            assert_eq!(b.on_result(t0, Outcome::Http5xx, &policy(), false), None);
        }
        assert!(b.usable(t0), "at the ejection cap nothing is ejected");

        let mut only_connect = policy();
        only_connect.count = FailureKinds {
            connect_errors: true,
            timeouts: false,
            http_5xx: false,
        };
        let mut b = Breaker::default();
        for _ in 0..10 {
            assert_eq!(b.on_result(t0, Outcome::Http5xx, &only_connect, true), None);
        }
        assert!(b
            .on_result(t0, Outcome::ConnectError, &only_connect, true)
            .is_none());
        assert!(b
            .on_result(t0, Outcome::ConnectError, &only_connect, true)
            .is_none());
        assert!(b
            .on_result(t0, Outcome::ConnectError, &only_connect, true)
            .is_some());
    }

    #[test]
    fn ejection_cap() {
        let p = policy();
        assert_eq!(p.ejection_cap(3), 1);
        assert_eq!(p.ejection_cap(10), 5);
        assert_eq!(p.ejection_cap(1), 1);
        let none = OutlierPolicy {
            max_ejected_percent: 0,
            ..policy()
        };
        assert_eq!(none.ejection_cap(10), 0);
    }

    #[test]
    fn an_abandoned_probe_frees_the_slot() {
        let t0 = Instant::now();
        let mut b = Breaker::default();
        fail(&mut b, t0, 3);
        let t1 = t0 + Duration::from_secs(10);
        assert_eq!(b.admit(t1), Admission::Probe);
        b.probe_abandoned();
        assert_eq!(b.admit(t1), Admission::Probe);
    }

    #[test]
    fn outside_evidence_ends_an_ejection_early() {
        let t0 = Instant::now();
        let mut b = Breaker::default();
        assert!(!b.end_ejection(t0), "nothing to end while closed");
        assert_eq!(
            fail(&mut b, t0, 3),
            Some(Transition::Ejected(Duration::from_secs(10)))
        );
        let t1 = t0 + Duration::from_secs(1);
        assert!(b.end_ejection(t1));
        assert_eq!(b.state(t1), BreakerState::HalfOpen { probing: false });
        assert_eq!(b.admit(t1), Admission::Probe);
        assert!(!b.end_ejection(t1), "a probe in flight is left alone");
        assert_eq!(
            b.on_result(t1, Outcome::Ok, &policy(), true),
            Some(Transition::Closed)
        );
    }
}
