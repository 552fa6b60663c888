//! Overload shedding by priority (`server.overload`, `routes[].priority`). Past
//! `shed_bulk_at` requests in flight (over all listeners, this one included), requests of
//! `bulk` routes get 503; past `shed_standard_at`, `standard` ones too; past `max_in_flight`,
//! every request, `high` ones included. Each threshold is optional; a lower priority is
//! always shed no later than a higher one.

use std::time::Duration;

use crate::config::raw::{RawOverload, RawPriority};
use crate::config::Errors;

/// How much a route's requests matter when the proxy is overloaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Priority {
    /// Shed last, only at the hard cap (login, health).
    High,
    /// The default.
    Standard,
    /// Shed first (batch work).
    Bulk,
}

impl Priority {
    /// `routes[].priority`, compiled (default `standard`).
    pub fn compile(raw: Option<RawPriority>) -> Self {
        match raw {
            Some(RawPriority::High) => Priority::High,
            None | Some(RawPriority::Standard) => Priority::Standard,
            Some(RawPriority::Bulk) => Priority::Bulk,
        }
    }

    /// Its place in [`crate::metrics::PRIORITIES`], the labels of
    /// `kingdom_edge_shed_total`.
    pub fn index(self) -> usize {
        match self {
            Priority::High => 0,
            Priority::Standard => 1,
            Priority::Bulk => 2,
        }
    }
}

/// `server.overload`, compiled: the in-flight count above which each priority is shed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Overload {
    bulk: Option<u64>,
    standard: Option<u64>,
    high: Option<u64>,
    /// `retry-after` of a shed request.
    pub retry_after: Duration,
}

impl Overload {
    /// Compiles `server.overload` (at YAML path `at`); no section sheds nothing.
    pub fn compile(raw: Option<&RawOverload>, at: &str, errors: &mut Errors) -> Self {
        let Some(raw) = raw else {
            return Self {
                retry_after: Duration::from_secs(1),
                ..Self::default()
            };
        };
        let mut thresholds = Vec::new();
        for (key, value) in [
            ("shed_bulk_at", raw.shed_bulk_at),
            ("shed_standard_at", raw.shed_standard_at),
            ("max_in_flight", raw.max_in_flight),
        ] {
            if value == Some(0) {
                errors.push(format!("{at}.{key}"), "must be > 0 (got 0)");
            }
            if let Some(value) = value {
                if let Some((before, lower)) = thresholds.last() {
                    if value < *lower {
                        errors.push(
                            format!("{at}.{key}"),
                            format!("must be at least {before} ({lower}): a higher priority is shed later"),
                        );
                    }
                }
                thresholds.push((key, value));
            }
        }
        let retry_after = raw.retry_after.map_or(Duration::from_secs(1), |d| d.0);
        if retry_after < Duration::from_secs(1) {
            errors.push(format!("{at}.retry_after"), "must be at least 1s");
        }
        let cap = raw.max_in_flight;
        let standard = min(raw.shed_standard_at, cap);
        Self {
            bulk: min(raw.shed_bulk_at, standard),
            standard,
            high: cap,
            retry_after,
        }
    }

    /// Whether a request of `priority` is shed with `in_flight` requests in progress (it
    /// among them).
    pub fn sheds(&self, priority: Priority, in_flight: u64) -> bool {
        let threshold = match priority {
            Priority::Bulk => self.bulk,
            Priority::Standard => self.standard,
            Priority::High => self.high,
        };
        threshold.is_some_and(|at| in_flight > at)
    }
}

/// The smaller of two optional thresholds.
fn min(a: Option<u64>, b: Option<u64>) -> Option<u64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn overload(yaml: &str) -> (Overload, Vec<String>) {
        let raw: RawOverload = serde_yaml::from_str(yaml).unwrap();
        let mut errors = Errors::default();
        let overload = Overload::compile(Some(&raw), "server.overload", &mut errors);
        (overload, errors.rendered())
    }

    #[test]
    fn bulk_goes_first_then_standard_then_everything_at_the_cap() {
        let (o, errors) =
            overload("{ shed_bulk_at: 100, shed_standard_at: 200, max_in_flight: 300 }");
        assert!(errors.is_empty());
        let shed = |n| [Priority::Bulk, Priority::Standard, Priority::High].map(|p| o.sheds(p, n));
        assert_eq!(shed(100), [false, false, false]);
        assert_eq!(shed(101), [true, false, false]);
        assert_eq!(shed(201), [true, true, false]);
        assert_eq!(shed(301), [true, true, true]);
        assert_eq!(o.retry_after, Duration::from_secs(1));
    }

    #[test]
    fn each_priority_has_its_metric_label() {
        for (priority, written) in [
            (Priority::High, "high"),
            (Priority::Standard, "standard"),
            (Priority::Bulk, "bulk"),
        ] {
            let raw: RawPriority = serde_yaml::from_str(written).unwrap();
            assert_eq!(Priority::compile(Some(raw)), priority);
            assert_eq!(crate::metrics::PRIORITIES[priority.index()], written);
        }
        assert_eq!(Priority::compile(None), Priority::Standard);
    }

    #[test]
    fn an_unset_threshold_follows_the_next_one_up() {
        let (o, _) = overload("{ max_in_flight: 50 }");
        assert!(o.sheds(Priority::Bulk, 51) && o.sheds(Priority::Standard, 51));
        assert!(!o.sheds(Priority::Bulk, 50));
        let (o, _) = overload("{ shed_bulk_at: 10 }");
        assert!(o.sheds(Priority::Bulk, 11) && !o.sheds(Priority::Standard, 1_000_000));
        let none = Overload::compile(None, "server.overload", &mut Errors::default());
        assert!(!none.sheds(Priority::Bulk, u64::MAX));
        let (_, errors) = overload("{ shed_bulk_at: 300, shed_standard_at: 200, retry_after: 0s }");
        assert_eq!(
            errors,
            [
                "server.overload.shed_standard_at: must be at least shed_bulk_at (300): a higher priority is shed later",
                "server.overload.retry_after: must be at least 1s"
            ]
        );
    }
}
