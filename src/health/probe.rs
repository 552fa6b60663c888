//! One active probe: a TCP connect, or an HTTP/1.1 `GET` whose status must be expected.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::{HealthPolicy, Probe};

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
    use crate::health::test_policy as policy;

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
