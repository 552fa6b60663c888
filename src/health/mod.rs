//! Active health checks: HTTP (path, expected statuses, Host header) or TCP connect, every
//! `interval` with ±10% jitter, with `rise`/`fall` thresholds. A backend of a pool with
//! checks starts unhealthy and takes no traffic until its first check passes.
//!
//! This module is the policy (`compile`), the per-backend state machine ([`Health`]) and
//! one probe ([`probe`]); the tasks that probe every backend belong to the runtime.

mod probe;

use std::ops::RangeInclusive;
use std::time::Duration;

use crate::config::raw::{RawHealthCheck, RawProbeKind};
use crate::config::Errors;

pub use probe::{jittered, probe};

/// `pools.*.health_check`, compiled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthPolicy {
    /// What a probe does.
    pub probe: Probe,
    /// Time between probes (±10% jitter).
    pub interval: Duration,
    /// Longest a probe may take.
    pub timeout: Duration,
    /// Passing probes in a row that make an unhealthy backend healthy.
    pub rise: u32,
    /// Failing probes in a row that make a healthy backend unhealthy.
    pub fall: u32,
}

/// Probe interval for a backend that has not passed a check yet (when `interval` is longer).
pub const FIRST_PASS_INTERVAL: Duration = Duration::from_millis(250);

/// One probe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// Connect, then close.
    Tcp,
    /// `GET path` over HTTP/1.1; passes when the status is in one of the ranges.
    Http {
        path: String,
        host: Option<String>,
        statuses: Vec<RangeInclusive<u16>>,
    },
}

/// A backend's health as the checks see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Health {
    /// Whether it may take traffic.
    pub healthy: bool,
    passes: u32,
    failures: u32,
    /// What the last probe said (`"200"`, `"connect: Connection refused"`), if any ran.
    pub last_probe: Option<String>,
    /// Whether any probe has passed yet.
    pub ever_passed: bool,
}

impl Health {
    /// A backend before its first probe: unhealthy if checks are configured, else healthy.
    pub fn new(checked: bool) -> Self {
        Self {
            healthy: !checked,
            passes: 0,
            failures: 0,
            last_probe: None,
            ever_passed: false,
        }
    }

    /// The pool's checks were turned off: the backend is trusted, as one never checked is.
    pub fn trust(&mut self) {
        self.healthy = true;
        self.passes = 0;
        self.failures = 0;
    }

    /// Records a probe result; returns the new health when it changed.
    pub fn on_probe(
        &mut self,
        policy: &HealthPolicy,
        passed: bool,
        detail: String,
    ) -> Option<bool> {
        self.last_probe = Some(detail);
        if passed {
            self.passes += 1;
            self.failures = 0;
            // The very first pass admits a new backend at once; later recoveries need `rise`.
            let threshold = if self.ever_passed { policy.rise } else { 1 };
            self.ever_passed = true;
            if !self.healthy && self.passes >= threshold {
                self.healthy = true;
                return Some(true);
            }
        } else {
            self.failures += 1;
            self.passes = 0;
            if self.healthy && self.failures >= policy.fall {
                self.healthy = false;
                return Some(false);
            }
        }
        None
    }
}

/// Compiles `pools.<name>.health_check` at YAML path `path`; `None` when it has errors.
pub fn compile(raw: &RawHealthCheck, path: &str, errors: &mut Errors) -> Option<HealthPolicy> {
    let start = errors.len();
    let interval = raw.interval.map_or(Duration::from_secs(2), |d| d.0);
    let timeout = raw.timeout.map_or(Duration::from_secs(1), |d| d.0);
    for (key, value) in [("interval", interval), ("timeout", timeout)] {
        if value.is_zero() {
            errors.push(format!("{path}.{key}"), "must be > 0 (got 0s)");
        }
    }
    let (rise, fall) = (raw.rise.unwrap_or(2), raw.fall.unwrap_or(3));
    for (key, value) in [("rise", rise), ("fall", fall)] {
        if value == 0 {
            errors.push(format!("{path}.{key}"), "must be > 0 (got 0)");
        }
    }
    let probe = match raw.kind.unwrap_or(RawProbeKind::Http) {
        RawProbeKind::Tcp => {
            for (key, set) in [
                ("path", raw.path.is_some()),
                ("host", raw.host.is_some()),
                ("expected_statuses", raw.expected_statuses.is_some()),
            ] {
                if set {
                    errors.push(format!("{path}.{key}"), "only used with `type: http`");
                }
            }
            Probe::Tcp
        }
        RawProbeKind::Http => {
            let check_path = raw.path.clone().unwrap_or_else(|| "/healthz".to_string());
            if !check_path.starts_with('/') || !is_request_token(&check_path) {
                errors.push(
                    format!("{path}.path"),
                    format!("must start with `/` and hold no spaces or control characters (got {check_path:?})"),
                );
            }
            if let Some(host) = raw
                .host
                .as_deref()
                .filter(|h| h.is_empty() || !is_request_token(h))
            {
                errors.push(
                    format!("{path}.host"),
                    format!(
                        "must be a host name without spaces or control characters (got {host:?})"
                    ),
                );
            }
            let mut statuses = Vec::new();
            for (i, value) in raw.expected_statuses.iter().flatten().enumerate() {
                match status_range(value) {
                    Some(range) => statuses.push(range),
                    None => errors.push(
                        format!("{path}.expected_statuses[{i}]"),
                        "must be a status (200), a range (\"200-399\") or a class (\"2xx\")",
                    ),
                }
            }
            if statuses.is_empty() {
                statuses.push(200..=399);
            }
            Probe::Http {
                path: check_path,
                host: raw.host.clone(),
                statuses,
            }
        }
    };
    (errors.len() == start).then_some(HealthPolicy {
        probe,
        interval,
        timeout,
        rise,
        fall,
    })
}

/// Text that can go into a request line or header as is: visible ASCII only.
fn is_request_token(text: &str) -> bool {
    text.bytes().all(|b| b.is_ascii_graphic())
}

fn status_range(value: &serde_yaml::Value) -> Option<RangeInclusive<u16>> {
    let valid = |r: RangeInclusive<u16>| {
        (100 <= *r.start() && r.start() <= r.end() && *r.end() <= 599).then_some(r)
    };
    if let Some(n) = value.as_u64() {
        let n = u16::try_from(n).ok()?;
        return valid(n..=n);
    }
    let text = value.as_str()?;
    if let Some(class) = text.strip_suffix("xx") {
        let digit: u16 = class.parse().ok().filter(|d| (1..=5).contains(d))?;
        return valid(digit * 100..=digit * 100 + 99);
    }
    let (low, high) = text.split_once('-')?;
    valid(low.trim().parse().ok()?..=high.trim().parse().ok()?)
}

/// A policy for tests: every 2 s, 500 ms timeout, rise 2, fall 3.
#[cfg(test)]
pub(crate) fn test_policy(probe: Probe) -> HealthPolicy {
    HealthPolicy {
        probe,
        interval: Duration::from_secs(2),
        timeout: Duration::from_millis(500),
        rise: 2,
        fall: 3,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_pass_admits_then_rise_and_fall_apply() {
        let p = test_policy(Probe::Tcp);
        let mut h = Health::new(true);
        assert!(!h.healthy);
        assert_eq!(h.on_probe(&p, false, "refused".into()), None);
        assert_eq!(
            h.on_probe(&p, true, "ok".into()),
            Some(true),
            "first pass admits at once"
        );
        assert_eq!(h.on_probe(&p, false, "x".into()), None);
        assert_eq!(h.on_probe(&p, false, "x".into()), None);
        assert_eq!(h.on_probe(&p, false, "x".into()), Some(false), "fall = 3");
        assert_eq!(h.on_probe(&p, true, "ok".into()), None);
        assert_eq!(h.on_probe(&p, true, "ok".into()), Some(true), "rise = 2");
        assert_eq!(h.last_probe.as_deref(), Some("ok"));
        assert!(Health::new(false).healthy, "no checks: trusted");
        h.on_probe(&p, false, "x".into());
        h.on_probe(&p, false, "x".into());
        h.on_probe(&p, false, "x".into());
        assert!(!h.healthy);
        h.trust();
        assert!(h.healthy, "checks removed: trusted again");
    }
}
