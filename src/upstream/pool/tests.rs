//! Pool behaviour over time, with a fake clock: health gating, ejection and its cap, panic
//! modes, sticky pins, retry exclusion, slow start.

use std::time::{Duration, Instant};

use super::*;
use crate::config::raw::RawConfig;

struct Fixture {
    pool: Pool,
    t0: Instant,
}

fn pool(yaml: &str) -> Fixture {
    let text = format!("listeners: []\npools:\n  p:\n{yaml}\nroutes: []\n");
    let raw: RawConfig = serde_yaml::from_str(&text).unwrap();
    let t0 = Instant::now();
    let env = |_: &str| Some("a-sticky-secret-for-tests".to_string());
    let mut errors = Errors::default();
    let pool = compile("p", &raw.pools["p"], "pools.p", &env, &mut errors);
    assert!(errors.is_empty(), "{errors:?}");
    Fixture {
        pool: pool.unwrap(),
        t0,
    }
}

const THREE: &str =
    "    backends: [{ address: 127.0.0.1:1 }, { address: 127.0.0.1:2 }, { address: 127.0.0.1:3 }]";

fn picks(f: &Fixture, now: Instant, n: usize) -> Vec<BackendId> {
    (0..n)
        .map(|_| f.pool.choose(now, None, None, &[]).unwrap().id)
        .collect()
}

#[test]
fn five_failures_eject_a_backend_until_a_probe_succeeds() {
    let f = pool(THREE);
    for _ in 0..5 {
        f.pool.record(1, f.t0, Outcome::ConnectError);
    }
    assert!(
        !picks(&f, f.t0, 30).contains(&1),
        "ejected backend gets nothing"
    );
    assert_eq!(f.pool.backends[1].state.metrics.ejected.get(), 1);

    // After base_ejection (10s) exactly one request probes it.
    let t1 = f.t0 + Duration::from_secs(10);
    let mut probes = 0;
    for _ in 0..30 {
        let choice = f.pool.choose(t1, None, None, &[]).unwrap();
        probes += usize::from(choice.probe);
        assert!(choice.id != 1 || choice.probe);
    }
    assert_eq!(probes, 1);
    f.pool.record(1, t1, Outcome::Ok);
    assert_eq!(f.pool.backends[1].state.metrics.ejected.get(), 0);
    assert!(picks(&f, t1, 30).contains(&1), "readmitted");
}

#[test]
fn the_ejection_cap_keeps_part_of_the_pool() {
    let f = pool(THREE);
    for id in 0..3 {
        for _ in 0..5 {
            f.pool.record(id, f.t0, Outcome::Http5xx);
        }
    }
    // 50% of 3 backends: one may be ejected.
    let ejected = (0..3).filter(|id| !f.pool.available(*id, f.t0)).count();
    assert_eq!(ejected, 1);
}

#[test]
fn health_checks_gate_traffic_and_new_backends_wait_for_their_first_pass() {
    let f = pool(&format!(
        "{THREE}\n    health_check: {{ path: /healthz, rise: 2, fall: 2 }}"
    ));
    assert_eq!(f.pool.backends[0].state.metrics.healthy.get(), 0);
    // Nobody has passed a check yet: panic mode (fail_open by default) spreads over all.
    let mut first = picks(&f, f.t0, 3);
    first.sort();
    assert_eq!(first, [0, 1, 2]);
    f.pool.record_probe(0, f.t0, true, "200".into());
    f.pool.record_probe(2, f.t0, true, "200".into());
    assert!(picks(&f, f.t0, 20).iter().all(|id| *id != 1));
    f.pool.record_probe(0, f.t0, false, "503".into());
    f.pool.record_probe(0, f.t0, false, "503".into());
    assert!(picks(&f, f.t0, 20).iter().all(|id| *id == 2));
    assert_eq!(
        f.pool.backends[0].state.health().last_probe.as_deref(),
        Some("503")
    );
}

#[test]
fn fail_closed_refuses_when_nothing_is_available() {
    let f = pool(&format!(
        "{THREE}\n    health_check: {{ type: tcp }}\n    panic: fail_closed"
    ));
    assert_eq!(
        f.pool.choose(f.t0, None, None, &[]),
        Err(Unavailable::FailClosed)
    );
    f.pool.record_probe(1, f.t0, true, "connected".into());
    assert_eq!(f.pool.choose(f.t0, None, None, &[]).map(|c| c.id), Ok(1));
}

#[test]
fn retries_go_to_backends_not_tried_yet() {
    let f = pool(THREE);
    let first = f.pool.choose(f.t0, None, None, &[]).unwrap().id;
    let second = f.pool.choose(f.t0, None, None, &[first]).unwrap().id;
    assert_ne!(first, second);
    let third = f
        .pool
        .choose(f.t0, None, None, &[first, second])
        .unwrap()
        .id;
    assert!(third != first && third != second);
}

#[test]
fn sticky_pins_hold_until_the_backend_is_unusable() {
    let f = pool(&format!(
        "{THREE}\n    sticky: {{ cookie: kd, secret_env: ANY }}\n    outlier: {{ consecutive_failures: 1 }}"
    ));
    for _ in 0..10 {
        assert_eq!(f.pool.choose(f.t0, Some(2), None, &[]).unwrap().id, 2);
    }
    f.pool.record(2, f.t0, Outcome::ConnectError);
    let moved = f.pool.choose(f.t0, Some(2), None, &[]).unwrap().id;
    assert_ne!(moved, 2, "re-pinned elsewhere");

    let strict = pool(&format!(
        "{THREE}\n    sticky: {{ cookie: kd, secret_env: ANY, strict: true }}\n    outlier: {{ consecutive_failures: 1 }}"
    ));
    // A retry after the pin failed (not yet ejected) stays strict.
    assert_eq!(
        strict.pool.choose(strict.t0, Some(2), None, &[2]),
        Err(Unavailable::StickyStrict)
    );
    strict.pool.record(2, strict.t0, Outcome::ConnectError);
    assert_eq!(
        strict.pool.choose(strict.t0, Some(2), None, &[]),
        Err(Unavailable::StickyStrict)
    );
}

#[test]
fn once_every_backend_was_tried_any_may_be_tried_again() {
    let f = pool(THREE);
    assert!(f.pool.choose(f.t0, None, None, &[0, 1, 2]).is_ok());
}

#[test]
fn slow_start_ramps_a_readmitted_backend() {
    let f = pool(&format!(
        "{THREE}\n    slow_start: 30s\n    outlier: {{ consecutive_failures: 1 }}"
    ));
    // Backends known from the start have full weight; one that comes back ramps.
    let t1 = f.t0 + Duration::from_secs(30);
    f.pool.record(0, t1, Outcome::ConnectError);
    let t2 = t1 + Duration::from_secs(10);
    assert!(f.pool.choose(t2, Some(0), None, &[]).unwrap().probe);
    f.pool.record(0, t2, Outcome::Ok);
    // Just readmitted: about a tenth of the share of the others.
    let share = picks(&f, t2, 210).iter().filter(|id| **id == 0).count();
    assert!((5..=15).contains(&share), "{share} of 210");
    let later = picks(&f, t2 + Duration::from_secs(30), 300);
    let full = later.iter().filter(|id| **id == 0).count();
    assert!((99..=101).contains(&full), "{full} of 300");
}

#[test]
fn consistent_hash_pools_keep_keys_on_their_backend() {
    let f = pool(&format!(
        "{THREE}\n    balance: consistent_hash\n    hash_key: {{ header: x-user }}"
    ));
    let owner = f.pool.choose(f.t0, None, Some(b"alice"), &[]).unwrap().id;
    for _ in 0..20 {
        assert_eq!(
            f.pool.choose(f.t0, None, Some(b"alice"), &[]).unwrap().id,
            owner
        );
    }
    assert_eq!(
        f.pool.hash_key,
        Some(HashKey::Header(HeaderName::from_static("x-user")))
    );
    assert_eq!(
        pool(THREE).pool.hash_key,
        None,
        "only hashing pools have a key"
    );
}

#[test]
fn least_connections_prefers_idle_backends() {
    let f = pool(&format!("{THREE}\n    balance: least_connections"));
    let busy: Vec<_> = (0..5)
        .map(|_| f.pool.backends[0].state.start_request())
        .collect();
    let busy2: Vec<_> = (0..5)
        .map(|_| f.pool.backends[2].state.start_request())
        .collect();
    assert!(picks(&f, f.t0, 10).iter().all(|id| *id == 1));
    drop((busy, busy2));
}

#[test]
fn policy_errors_name_their_path() {
    let cases = [
        ("    health_check: { interval: 0s }", "pools.p.health_check.interval: must be > 0 (got 0s)"),
        ("    health_check: { type: tcp, path: /x }", "pools.p.health_check.path: only used with `type: http`"),
        ("    health_check: { path: \"/a b\" }", "pools.p.health_check.path: must start with `/` and hold no spaces or control characters (got \"/a b\")"),
        ("    health_check: { host: \"a\\r\\nX-Evil: 1\" }", "pools.p.health_check.host: must be a host name without spaces or control characters (got \"a\\r\\nX-Evil: 1\")"),
        ("    health_check: { expected_statuses: [\"999xx\"] }", "pools.p.health_check.expected_statuses[0]: must be a status (200), a range (\"200-399\") or a class (\"2xx\")"),
        ("    health_check: { expected_statuses: [\"600-700\"] }", "pools.p.health_check.expected_statuses[0]: must be a status (200), a range (\"200-399\") or a class (\"2xx\")"),
        ("    outlier: { max_ejected_percent: 150 }", "pools.p.outlier.max_ejected_percent: must be 0 to 100 (got 150)"),
        ("    retries: { attempts: 50 }", "pools.p.retries.attempts: must be 0 to 10 (got 50)"),
        ("    limits: { max_in_flight: 0 }", "pools.p.limits.max_in_flight: must be > 0 (got 0)"),
        ("    hash_key: path", "pools.p.hash_key: only used with `balance: consistent_hash`"),
        ("    sticky: { cookie: kd }", "pools.p.sticky: needs `secret_env` (or `secret`) to sign its cookies"),
        ("    sticky: { cookie: kd, secret: short }", "pools.p.sticky.secret: the secret must be at least 16 bytes"),
        ("    sticky: { cookie: \"k d\", secret: a-long-enough-secret }", "pools.p.sticky.cookie: `k d` is not a cookie name (A-Z a-z 0-9 _ - .)"),
    ];
    for (extra, want) in cases {
        let text = format!("listeners: []\npools:\n  p:\n{THREE}\n{extra}\nroutes: []\n");
        let raw: RawConfig = serde_yaml::from_str(&text).unwrap();
        let env = |_: &str| None;
        let mut errors = Errors::default();
        assert!(
            compile("p", &raw.pools["p"], "pools.p", &env, &mut errors).is_none(),
            "{extra}"
        );
        assert_eq!(errors.rendered(), [want], "{extra}");
    }
}

#[test]
fn slow_start_ramps_a_backend_its_checks_saw_recover() {
    let f = pool(&format!(
        "{THREE}\n    slow_start: 10m\n    health_check: {{ path: /healthz, rise: 1, fall: 1 }}"
    ));
    let t1 = f.t0 + Duration::from_secs(600);
    for id in 0..3 {
        f.pool.record_probe(id, t1, true, "200".into());
    }
    f.pool.record_probe(0, t1, false, "503".into());
    f.pool.record_probe(0, t1, true, "200".into());
    let share = picks(&f, t1, 210).iter().filter(|id| **id == 0).count();
    assert!((5..=15).contains(&share), "{share} of 210");
}

#[test]
fn a_drained_backend_gets_no_new_requests_even_in_panic_mode() {
    let f = pool(THREE);
    f.pool.backends[1].state.set_drained(true);
    assert!(!picks(&f, f.t0, 30).contains(&1));
    assert!(!f.pool.available(1, f.t0));
    // Every other backend ejected: fail_open spreads over what is left, never the drained one.
    for id in [0, 2] {
        for _ in 0..5 {
            f.pool.record(id, f.t0, Outcome::ConnectError);
        }
    }
    for _ in 0..10 {
        assert_ne!(f.pool.choose(f.t0, None, None, &[]).map(|c| c.id), Ok(1));
    }
    // A pin to the drained backend re-pins.
    let choice = f.pool.choose(f.t0, Some(1), None, &[]).unwrap();
    assert_ne!(choice.id, 1);
    for b in &f.pool.backends {
        b.state.set_drained(true);
    }
    assert_eq!(
        f.pool.choose(f.t0, None, None, &[]),
        Err(Unavailable::FailClosed),
        "a wholly drained pool answers 503"
    );
}
