//! Active health checks: HTTP (path, expected statuses, Host header) or TCP connect, every
//! `interval` with ±10% jitter, with `rise`/`fall` thresholds. A backend of a pool with
//! checks starts unhealthy and takes no traffic until its first check passes.

use std::net::SocketAddr;
use std::ops::RangeInclusive;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::snapshot::ConfigStore;

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

/// Probes every backend of every pool that has checks, for as long as the process runs.
/// Each result is applied to the pool in the snapshot current at that moment.
pub async fn run(store: Arc<ConfigStore>) {
    let snapshot = store.load();
    let mut tasks = Vec::new();
    for pool in &snapshot.pools {
        let Some(policy) = pool.health.clone() else {
            continue;
        };
        for backend in &pool.backends {
            let task = check_forever(
                store.clone(),
                pool.name.clone(),
                backend.address,
                policy.clone(),
            );
            tasks.push(tokio::spawn(task));
        }
    }
    for task in tasks {
        let _ = task.await;
    }
}

async fn check_forever(
    store: Arc<ConfigStore>,
    pool: String,
    address: SocketAddr,
    policy: HealthPolicy,
) {
    loop {
        let (passed, detail) = probe(&policy, address).await;
        let snapshot = store.load();
        let Some(current) = snapshot.pools.iter().find(|p| p.name == pool) else {
            return;
        };
        let Some(id) = current.backends.iter().position(|b| b.address == address) else {
            return;
        };
        current.record_probe(id, Instant::now(), passed, detail);
        // Like HAProxy's `fastinter`: a backend that has never passed is probed often, so a
        // starting process joins as soon as it listens.
        let joined = current.backends[id].state.health().ever_passed;
        let wait = if joined {
            policy.interval
        } else {
            policy.interval.min(FIRST_PASS_INTERVAL)
        };
        tokio::time::sleep(jittered(wait, fastrand::f64())).await;
    }
}

/// Runs one probe against `address`: whether it passed, and what it saw.
pub async fn probe(policy: &HealthPolicy, address: SocketAddr) -> (bool, String) {
    match tokio::time::timeout(policy.timeout, run_probe(&policy.probe, address)).await {
        Ok(Ok(status)) => match (&policy.probe, status) {
            (Probe::Tcp, _) => (true, "connected".to_string()),
            (Probe::Http { statuses, .. }, Some(code)) => {
                (statuses.iter().any(|r| r.contains(&code)), code.to_string())
            }
            (Probe::Http { .. }, None) => (false, "no HTTP status line".to_string()),
        },
        Ok(Err(e)) => (false, e.to_string()),
        Err(_) => (false, format!("timed out after {:?}", policy.timeout)),
    }
}

async fn run_probe(probe: &Probe, address: SocketAddr) -> std::io::Result<Option<u16>> {
    let mut stream = TcpStream::connect(address)
        .await
        .map_err(|e| std::io::Error::new(e.kind(), format!("connect: {e}")))?;
    let Probe::Http { path, host, .. } = probe else {
        return Ok(None);
    };
    let host = host.clone().unwrap_or_else(|| address.to_string());
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: kingdom-edge-health-check\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await?;
    let mut head = Vec::with_capacity(64);
    let mut buf = [0u8; 256];
    while !head.contains(&b'\n') && head.len() < 1024 {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    Ok(parse_status(&head))
}

/// The status code of an HTTP/1.x status line.
fn parse_status(head: &[u8]) -> Option<u16> {
    let line = head.split(|b| *b == b'\n').next()?;
    let line = std::str::from_utf8(line).ok()?;
    let mut words = line.split_whitespace();
    let version = words.next()?;
    if !version.starts_with("HTTP/1.") {
        return None;
    }
    words.next()?.parse().ok()
}

/// The wait before the next probe: `interval` ±10%, `random` in [0, 1).
pub fn jittered(interval: Duration, random: f64) -> Duration {
    interval.mul_f64(0.9 + 0.2 * random.clamp(0.0, 1.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(probe: Probe) -> HealthPolicy {
        HealthPolicy {
            probe,
            interval: Duration::from_secs(2),
            timeout: Duration::from_millis(500),
            rise: 2,
            fall: 3,
        }
    }

    #[test]
    fn first_pass_admits_then_rise_and_fall_apply() {
        let p = policy(Probe::Tcp);
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
    }

    #[test]
    fn parses_status_lines() {
        assert_eq!(parse_status(b"HTTP/1.1 200 OK\r\n"), Some(200));
        assert_eq!(
            parse_status(b"HTTP/1.0 503 Service Unavailable\r\nx"),
            Some(503)
        );
        assert_eq!(parse_status(b"SSH-2.0-OpenSSH\r\n"), None);
        assert_eq!(parse_status(b""), None);
    }

    #[test]
    fn jitter_stays_within_ten_percent() {
        let i = Duration::from_secs(10);
        assert_eq!(jittered(i, 0.0), Duration::from_secs(9));
        assert_eq!(jittered(i, 0.5), Duration::from_secs(10));
        assert!(jittered(i, 0.999) < Duration::from_secs(11));
    }

    #[tokio::test]
    async fn probes_real_sockets() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let mut buf = [0u8; 512];
                let n = s.read(&mut buf).await.unwrap_or(0);
                let ok = String::from_utf8_lossy(&buf[..n]).starts_with("GET /healthz ");
                let line: &[u8] = if ok {
                    b"HTTP/1.1 204 No Content\r\n\r\n"
                } else {
                    b"HTTP/1.1 404 Not Found\r\n\r\n"
                };
                let _ = s.write_all(line).await;
            }
        });
        let http = |path: &str| {
            policy(Probe::Http {
                path: path.into(),
                host: None,
                statuses: vec![200..=299],
            })
        };
        assert_eq!(
            probe(&http("/healthz"), address).await,
            (true, "204".into())
        );
        assert_eq!(probe(&http("/other"), address).await, (false, "404".into()));
        assert!(probe(&policy(Probe::Tcp), address).await.0);

        let closed = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let (ok, detail) = probe(&policy(Probe::Tcp), closed).await;
        assert!(!ok);
        assert!(detail.starts_with("connect:"), "{detail}");
    }
}
