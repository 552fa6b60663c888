//! Faults from either side of the proxy: an upstream that dies after it started answering
//! must never have its response spliced with another attempt's, and a client that gives up
//! is the client's outcome, never the backend's.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::{addr, free_ports, Edge, Framing, Misbehaviour};
use serde_json::Value;

/// A proxy with one pool `app` of `backends` routed from `/`, that retries twice, logs to
/// `access.log`, and has the extra `listeners` and pool keys given.
async fn edge(backends: &[SocketAddr], listeners: &str, extra: &str) -> Edge {
    let p = free_ports(2);
    let list: Vec<String> = backends
        .iter()
        .map(|a| format!("{{ address: {a} }}"))
        .collect();
    let yaml = format!(
        r#"
listeners:
  - {{ name: public, address: 127.0.0.1:{proxy} }}
{listeners}
admin: {{ address: 127.0.0.1:{admin} }}
access_log: {{ output: access.log }}
pools:
  app:
    backends: [{list}]
    retries: {{ attempts: 2, backoff: {{ base: 1ms, max: 1ms }} }}
    {extra}
routes: [{{ name: app, match: {{ path_prefix: / }}, pool: app }}]
"#,
        proxy = p[0],
        admin = p[1],
        list = list.join(", "),
    );
    Edge::start_ready(&yaml, addr(p[0]), addr(p[1])).await
}

/// The access-log lines once there are `n` of them.
async fn access_lines(edge: &Edge, n: usize) -> Vec<Value> {
    let path = edge.dir.path().join("access.log");
    common::wait_for(&format!("{n} access-log lines"), || {
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let lines: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).expect("every access-log line is JSON"))
            .collect();
        std::future::ready((lines.len() >= n).then_some(lines))
    })
    .await
}

async fn assert_truncated_not_spliced(framing: Framing) {
    let (a, a_hits) = common::misbehaving_upstream(Misbehaviour::Die(b'a', framing)).await;
    let (b, b_hits) = common::misbehaving_upstream(Misbehaviour::Die(b'b', framing)).await;
    let edge = edge(&[a, b], "", "outlier: { enabled: false }").await;

    let answer =
        common::raw_exchange_bytes(edge.proxy, b"GET /file HTTP/1.1\r\nHost: edge.test\r\n\r\n")
            .await;
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    let head_end = text.find("\r\n\r\n").unwrap() + 4;
    let body = &answer[head_end..];
    let from_a = body.iter().filter(|&&c| c == b'a').count();
    let from_b = body.iter().filter(|&&c| c == b'b').count();
    assert!(
        (from_a == 21 && from_b == 0) || (from_a == 0 && from_b == 21),
        "one backend's part, never both: {text:?}"
    );
    match framing {
        Framing::Length => assert!(body.len() < 100, "{text:?}"),
        Framing::Chunked => assert!(
            !text.ends_with("0\r\n\r\n"),
            "a truncated chunked body must not be terminated: {text:?}"
        ),
    }
    assert_eq!(
        a_hits.load(Ordering::SeqCst) + b_hits.load(Ordering::SeqCst),
        1,
        "a response that has started is never retried"
    );

    let line = &access_lines(&edge, 1).await[0];
    assert_eq!(line["status"], 200, "{line}");
    assert_eq!(line["error"], "upstream_truncated", "{line}");
    assert_eq!(line["attempts"], 1, "{line}");
    let metrics = edge.metrics().await;
    assert_eq!(
        common::metric(
            &metrics,
            r#"kingdom_edge_responses_truncated_total{route="app"}"#
        ),
        1.0,
        "{metrics}"
    );
    assert_eq!(
        common::metric(&metrics, r#"kingdom_edge_retries_total{pool="app"}"#),
        0.0
    );
    // The backend that broke off is blamed for it, though its header looked fine.
    let failures: f64 = [a, b]
        .iter()
        .map(|backend| {
            let series = format!(
                r#"kingdom_edge_upstream_requests_total{{backend="{backend}",outcome="error",pool="app"}}"#
            );
            common::metric(&metrics, &series)
        })
        .sum();
    assert_eq!(failures, 1.0, "{metrics}");
}

#[tokio::test]
async fn an_upstream_dying_mid_body_truncates_the_response_with_content_length() {
    assert_truncated_not_spliced(Framing::Length).await;
}

#[tokio::test]
async fn an_upstream_dying_mid_body_truncates_the_chunked_response() {
    assert_truncated_not_spliced(Framing::Chunked).await;
}

#[tokio::test]
async fn an_upstream_dying_mid_body_resets_the_http2_stream() {
    let certs = tempfile::tempdir().unwrap();
    let pem = common::self_signed(certs.path(), "edge", &["edge.test"]);
    let (a, a_hits) = common::misbehaving_upstream(Misbehaviour::Die(b'a', Framing::Length)).await;
    let (b, b_hits) = common::misbehaving_upstream(Misbehaviour::Die(b'b', Framing::Chunked)).await;
    let tls = addr(free_ports(1)[0]);
    let d = certs.path().display();
    let listener = format!(
        "  - {{ name: tls, address: {tls}, tls: {{ certificates: [{{ cert: {d}/edge.crt, key: {d}/edge.key }}], http2: true }} }}"
    );
    let edge = edge(&[a, b], &listener, "outlier: { enabled: false }").await;
    let client = reqwest::Client::builder()
        .no_proxy()
        .use_rustls_tls()
        .add_root_certificate(reqwest::Certificate::from_pem(pem.as_bytes()).unwrap())
        .resolve("edge.test", tls)
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap();

    // Both framings upstream, alternately: neither may end the stream as if complete.
    for round in 0..2 {
        let response = client
            .get(format!("https://edge.test:{}/file", tls.port()))
            .send()
            .await
            .unwrap();
        assert_eq!(response.version(), reqwest::Version::HTTP_2);
        assert_eq!(response.status(), 200);
        let body = response.bytes().await;
        assert!(
            body.is_err(),
            "round {round}: the stream must be reset, not ended: {body:?}"
        );
    }
    assert_eq!(
        a_hits.load(Ordering::SeqCst) + b_hits.load(Ordering::SeqCst),
        2,
        "never retried"
    );
    let lines = access_lines(&edge, 2).await;
    assert!(
        lines.iter().all(|l| l["error"] == "upstream_truncated"),
        "{lines:?}"
    );
}

#[tokio::test]
async fn clients_giving_up_never_eject_a_backend_or_cause_retries() {
    let slow = common::toggle_upstream("slow").await;
    slow.close();
    let edge = edge(
        &[slow.addr],
        "",
        "outlier: { consecutive_failures: 3, base_ejection: 60s }",
    )
    .await;

    // Twelve impatient clients, each gone before the backend answers (it holds them all).
    let impatient = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_millis(200))
        .build()
        .unwrap();
    let mut clients = Vec::new();
    for _ in 0..12 {
        clients.push(tokio::spawn(impatient.get(edge.url("/ok")).send()));
    }
    for client in clients {
        assert!(client.await.unwrap().is_err(), "the client timed out");
    }
    let lines = access_lines(&edge, 12).await;
    for line in &lines {
        assert_eq!(line["status"], 499, "{line}");
        assert_eq!(line["error"], "client_aborted", "{line}");
        assert_eq!(line["attempts"], 1, "{line}");
    }
    assert_eq!(
        slow.hits.load(Ordering::SeqCst),
        12,
        "an aborted request is never sent again"
    );

    let status = common::wait_for("the aborted requests to leave the pool", || {
        let status = edge.status();
        async move {
            let status = status.await;
            let pool = &status["pools"][0];
            (pool["in_flight"] == 0 && pool["backends"][0]["in_flight"] == 0).then_some(status)
        }
    })
    .await;
    let backend = &status["pools"][0]["backends"][0];
    assert_eq!(backend["breaker"], "closed", "{status}");
    let metrics = edge.metrics().await;
    assert_eq!(
        common::metric(
            &metrics,
            r#"kingdom_edge_requests_total{code="499",route="app"}"#
        ),
        12.0,
        "{metrics}"
    );
    assert_eq!(
        common::metric(&metrics, r#"kingdom_edge_retries_total{pool="app"}"#),
        0.0
    );

    // The backend still takes traffic.
    slow.open();
    let response = common::client().get(edge.url("/ok")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-upstream"], "slow");
}

#[tokio::test]
async fn timeouts_total_cuts_off_a_trickling_body() {
    // 1,000 bytes at one per 200 ms would take over three minutes; each read is quick.
    let (trickle, _) = common::misbehaving_upstream(Misbehaviour::Trickle).await;
    let edge = edge(&[trickle], "", "timeouts: { read: 5s, total: 1s }").await;
    let answer =
        common::raw_exchange(edge.proxy, b"GET /slow HTTP/1.1\r\nHost: edge.test\r\n\r\n").await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let line = &access_lines(&edge, 1).await[0];
    assert_eq!(line["error"], "upstream_truncated", "{line}");
    assert!(line["bytes_out"].as_u64().unwrap() < 1000, "{line}");
}

#[tokio::test]
async fn timeouts_total_cuts_off_a_body_that_stalls_whatever_the_read_timeout() {
    // The read timeout is ten minutes and never fires: the deadline alone ends the exchange.
    let (stall, hits) = common::misbehaving_upstream(Misbehaviour::Stall).await;
    let edge = edge(&[stall], "", "timeouts: { read: 10m, total: 1s }").await;
    let answer = common::raw_exchange(
        edge.proxy,
        b"GET /stall HTTP/1.1\r\nHost: edge.test\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        answer.ends_with(&"s".repeat(21)),
        "short of its length: {answer}"
    );
    let line = &access_lines(&edge, 1).await[0];
    assert_eq!(line["error"], "upstream_truncated", "{line}");
    assert_eq!(hits.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn timeouts_total_caps_retries_of_a_hung_upstream() {
    // Without the cap: three attempts of a ten-minute read timeout.
    let (hung, hits) = common::misbehaving_upstream(Misbehaviour::Hang).await;
    let edge = edge(&[hung], "", "timeouts: { read: 10m, total: 1s }").await;
    let response = common::client()
        .get(edge.url("/hang"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 504);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"], "upstream_timeout");
    assert_eq!(hits.load(Ordering::SeqCst), 1, "no time left to retry");
}

#[tokio::test]
async fn a_write_timeout_ends_the_exchange_without_waiting_for_the_read_timeout() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // The upstream reads the header of the upload and then nothing.
    let (hung, _) = common::misbehaving_upstream(Misbehaviour::Hang).await;
    let edge = edge(&[hung], "", "timeouts: { write: 300ms, read: 10m }").await;
    let size = 64 << 20;
    let mut stream = tokio::net::TcpStream::connect(edge.proxy).await.unwrap();
    let head =
        format!("POST /upload HTTP/1.1\r\nHost: edge.test\r\nContent-Length: {size}\r\n\r\n");
    stream.write_all(head.as_bytes()).await.unwrap();
    let (mut reader, mut writer) = stream.into_split();
    let upload = tokio::spawn(async move {
        let chunk = vec![b'u'; 64 << 10];
        for _ in 0..size / chunk.len() {
            if writer.write_all(&chunk).await.is_err() {
                return;
            }
        }
    });
    let mut answer = Vec::new();
    let read = tokio::time::timeout(common::DEADLINE, async {
        let mut buf = [0u8; 4096];
        while !answer.windows(4).any(|w| w == b"\r\n\r\n") {
            match reader.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => answer.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    assert!(read.is_ok(), "the client is still waiting");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 504"), "{answer}");
    upload.abort();
}

#[tokio::test]
async fn bodies_over_max_body_never_count_against_a_backend() {
    let a = common::toggle_upstream("a").await;
    let b = common::toggle_upstream("b").await;
    let p = free_ports(2);
    let yaml = format!(
        r#"
listeners: [{{ name: public, address: 127.0.0.1:{} }}]
admin: {{ address: 127.0.0.1:{} }}
pools:
  app:
    backends: [{{ address: {} }}, {{ address: {} }}]
    outlier: {{ consecutive_failures: 1, base_ejection: 5m }}
routes: [{{ name: app, match: {{ path_prefix: / }}, pool: app, max_body: 1KiB }}]
"#,
        p[0], p[1], a.addr, b.addr
    );
    let edge = Edge::start_ready(&yaml, addr(p[0]), addr(p[1])).await;
    let http = common::client();
    for _ in 0..4 {
        // Chunked, so the limit is found only while the body streams to an upstream.
        let chunks = futures::stream::iter(
            (0..8).map(|_| Ok::<_, std::io::Error>(bytes::Bytes::from(vec![b'x'; 512]))),
        );
        let response = http
            .put(edge.url("/ok"))
            .body(reqwest::Body::wrap_stream(chunks))
            .send()
            .await;
        if let Ok(response) = response {
            assert_eq!(response.status(), 413);
        }
    }
    let status = edge.status().await;
    for backend in status["pools"][0]["backends"].as_array().unwrap() {
        assert_eq!(backend["breaker"], "closed", "{status}");
    }
    let metrics = edge.metrics().await;
    assert_eq!(
        common::metric(&metrics, r#"kingdom_edge_retries_total{pool="app"}"#),
        0.0
    );
    assert_eq!(
        common::metric(
            &metrics,
            r#"kingdom_edge_requests_total{code="413",route="app"}"#
        ),
        4.0,
        "{metrics}"
    );
}
