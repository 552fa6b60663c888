//! End to end: the real `kingdom-edge` with its real sidecars (or small fake upstreams) on
//! ephemeral loopback ports, driven over HTTP.

mod common;

use std::collections::HashMap;

use common::{addr, client, free_ports, Edge};
use serde_json::Value;

/// Proxy + admin + two api sidecars (3:1) + one content sidecar.
async fn sidecar_edge() -> Edge {
    let p = free_ports(5);
    let yaml = format!(
        r#"
server: {{ threads: 2, shutdown_timeout: 30s }}
listeners: [{{ name: public, address: 127.0.0.1:{proxy} }}]
admin: {{ address: 127.0.0.1:{admin} }}
sidecars:
  - {{ name: api, command: kingdom-api, addresses: [127.0.0.1:{a1}, 127.0.0.1:{a2}], env: {{ KINGDOM_API_SECRET: integration-test-secret }} }}
  - {{ name: content, command: kingdom-content, addresses: [127.0.0.1:{c1}] }}
pools:
  api: {{ backends: [{{ address: 127.0.0.1:{a1}, weight: 3 }}, {{ address: 127.0.0.1:{a2}, weight: 1 }}] }}
  content: {{ backends: [{{ address: 127.0.0.1:{c1} }}] }}
routes:
  - {{ name: content-generate, match: {{ path_prefix: /v1/content/generate, methods: [POST] }}, pool: content }}
  - {{ name: content, match: {{ path_prefix: /v1/content }}, pool: content }}
  - {{ name: api, match: {{ path_prefix: /v1 }}, pool: api }}
"#,
        proxy = p[0],
        admin = p[1],
        a1 = p[2],
        a2 = p[3],
        c1 = p[4]
    );
    Edge::start_ready(&yaml, addr(p[0]), addr(p[1])).await
}

#[tokio::test]
async fn routes_by_prefix_and_method_and_splits_by_weight() {
    let edge = sidecar_edge().await;
    let http = client();

    let templates = common::get_json(&edge.url("/v1/content/templates")).await;
    assert_eq!(templates["templates"].as_array().unwrap().len(), 6);

    let mut seen: HashMap<String, usize> = HashMap::new();
    for _ in 0..400 {
        let response = http.get(edge.url("/v1/echo")).send().await.unwrap();
        assert_eq!(response.status(), 200);
        let instance = response.headers()["x-instance"]
            .to_str()
            .unwrap()
            .to_string();
        *seen.entry(instance).or_default() += 1;
    }
    let status = edge.status().await;
    let api: Vec<String> = status["pools"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "api")
        .unwrap()["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["address"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(seen.get(&api[0]), Some(&300), "{seen:?}");
    assert_eq!(seen.get(&api[1]), Some(&100), "{seen:?}");

    // POST /v1/content/generate goes to the content pool, GET of the same path falls through
    // to the `content` route (and the content service answers 405 for GET on it).
    let generated = http
        .post(edge.url("/v1/content/generate"))
        .json(&serde_json::json!({ "type": "email", "topic": "launch" }))
        .send()
        .await
        .unwrap();
    assert_eq!(generated.status(), 200);
    assert_eq!(generated.headers()["cache-control"], "no-store");
    let get_generate = http
        .get(edge.url("/v1/content/generate"))
        .send()
        .await
        .unwrap();
    assert_eq!(get_generate.status(), 405);

    let metrics = edge.metrics().await;
    assert!(
        metrics.contains(r#"kingdom_edge_requests_total{code="200",route="api"} 400"#),
        "{metrics}"
    );
    // Every one of the 400 is in the route's latency histogram.
    assert!(
        common::metric(
            &metrics,
            r#"kingdom_edge_request_duration_seconds_count{route="api"}"#
        ) >= 400.0,
        "{metrics}"
    );
    assert!(metrics.contains(&format!(
        r#"kingdom_edge_upstream_requests_total{{backend="{}",outcome="ok",pool="api"}} 300"#,
        api[0]
    )));
    // The gauge drops once each request's log phase is done, just after its response.
    common::wait_for("in-flight to return to 0", || {
        let metrics = edge.metrics();
        async move {
            metrics
                .await
                .contains("kingdom_edge_in_flight 0")
                .then_some(())
        }
    })
    .await;
}

#[tokio::test]
async fn unknown_paths_get_a_json_404_with_the_request_id() {
    let edge = sidecar_edge().await;
    let response = client()
        .get(edge.url("/nowhere"))
        .header("x-request-id", "trace-123")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 404);
    assert_eq!(response.headers()["x-request-id"], "trace-123");
    assert_eq!(response.headers()["content-type"], "application/json");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"], "no_route");
    assert_eq!(body["request_id"], "trace-123");
    // Counted when the request is logged, just after its answer is sent.
    edge.wait_metric(
        r#"kingdom_edge_rejected_total{reason="no_route",route="-"}"#,
        1.0,
    )
    .await;

    // The connection stays usable: two 404s, then a routed request, on one connection.
    let mut stream = tokio::net::TcpStream::connect(edge.proxy).await.unwrap();
    for (path, status) in [("/a", "404"), ("/b", "404"), ("/v1/echo", "200")] {
        let answer = common::ask_on(
            &mut stream,
            &format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n"),
        )
        .await;
        assert!(
            answer.starts_with(&format!("HTTP/1.1 {status}")),
            "{answer}"
        );
    }
}

#[tokio::test]
async fn a_503_that_keeps_its_connection_open_serves_the_next_request_on_it() {
    // Every backend down and `fail_closed`: the 503 comes from choosing a backend.
    let dead = addr(free_ports(1)[0]);
    let (yaml, proxy, admin) = common::pool_config(
        &[dead],
        &["panic: fail_closed", "health_check: { path: /healthz }"],
    );
    let edge = Edge::start(&yaml, proxy, admin).await;
    let mut stream = tokio::net::TcpStream::connect(edge.proxy).await.unwrap();
    for _ in 0..3 {
        let answer = common::ask_on(&mut stream, "GET /ok HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
        assert!(
            answer.to_ascii_lowercase().contains("no_healthy_backend"),
            "{answer}"
        );
    }
}

#[tokio::test]
async fn forwards_client_identity_and_request_id_and_strips_hop_by_hop() {
    let edge = sidecar_edge().await;
    let http = client();

    let response = http
        .get(edge.url("/v1/echo?x=1"))
        .header("x-request-id", "abc-123")
        .header("x-forwarded-for", "203.0.113.50")
        .header("connection", "keep-alive, x-secret")
        .header("x-secret", "hop")
        .header("keep-alive", "timeout=5")
        .header("te", "trailers")
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["x-request-id"], "abc-123");
    let echo: Value = response.json().await.unwrap();
    let header = |name: &str| echo["headers"][name][0].as_str().map(str::to_string);
    assert_eq!(echo["path"], "/v1/echo");
    assert_eq!(echo["query"], "x=1");
    // 127.0.0.1 is not a trusted proxy in this config: the incoming chain is discarded.
    assert_eq!(header("x-forwarded-for").as_deref(), Some("127.0.0.1"));
    assert_eq!(header("x-forwarded-proto").as_deref(), Some("http"));
    assert_eq!(header("x-forwarded-host"), Some(edge.proxy.to_string()));
    assert_eq!(header("x-request-id").as_deref(), Some("abc-123"));
    for hop in ["x-secret", "keep-alive", "te"] {
        assert_eq!(header(hop), None, "{hop} must not reach the upstream");
    }

    // An unusable incoming id is replaced by a generated one, the same up and down.
    let response = http
        .get(edge.url("/v1/echo"))
        .header("x-request-id", "has spaces and \"quotes\"")
        .send()
        .await
        .unwrap();
    let returned = response.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_string();
    assert_eq!(returned.len(), 32);
    let echo: Value = response.json().await.unwrap();
    assert_eq!(echo["headers"]["x-request-id"][0], returned.as_str());
}

#[tokio::test]
async fn upstream_failures_are_json_502_and_504() {
    let (slow, accepted) = common::fake_upstream_counting("slow").await;
    let p = free_ports(3);
    let dead = p[2]; // nothing listens there
    let yaml = format!(
        r#"
listeners: [{{ name: public, address: 127.0.0.1:{proxy} }}]
admin: {{ address: 127.0.0.1:{admin} }}
pools:
  dead: {{ backends: [{{ address: 127.0.0.1:{dead} }}] }}
  slow: {{ backends: [{{ address: {slow} }}], timeouts: {{ read: 300ms }} }}
routes:
  - {{ name: dead, match: {{ path_prefix: /dead }}, pool: dead }}
  - {{ name: upload, match: {{ path_prefix: /upload }}, pool: slow, max_body: 1KiB }}
  - {{ name: slow, match: {{ path_prefix: / }}, pool: slow }}
access_log: {{ output: access.log }}
"#,
        proxy = p[0],
        admin = p[1],
    );
    let edge = Edge::start(&yaml, addr(p[0]), addr(p[1])).await;
    let http = client();

    let response = http.get(edge.url("/dead/x")).send().await.unwrap();
    assert_eq!(response.status(), 502);
    let id = response.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_string();
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"], "upstream_error");
    assert_eq!(body["request_id"], id.as_str());

    let response = http.get(edge.url("/slow?ms=5000")).send().await.unwrap();
    assert_eq!(response.status(), 504);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"], "upstream_timeout");

    // Sequential requests reuse one upstream keep-alive connection.
    let before = accepted.load(std::sync::atomic::Ordering::SeqCst);
    for _ in 0..10 {
        let response = http.get(edge.url("/ok")).send().await.unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(response.headers()["x-upstream"], "slow");
    }
    let opened = accepted.load(std::sync::atomic::Ordering::SeqCst) - before;
    assert_eq!(
        opened, 1,
        "10 sequential requests opened {opened} upstream connections"
    );

    // Bodies over the route's max_body: declared (Content-Length) and streamed (chunked).
    let small = http
        .post(edge.url("/upload"))
        .body(vec![b'x'; 1024])
        .send()
        .await
        .unwrap();
    assert_eq!(small.status(), 200);
    assert_eq!(small.text().await.unwrap(), "1024");
    let declared = http
        .post(edge.url("/upload"))
        .body(vec![b'x'; 1025])
        .send()
        .await
        .unwrap();
    assert_eq!(declared.status(), 413);
    let body: Value = declared.json().await.unwrap();
    assert_eq!(body["error"], "body_too_large");
    let chunks = futures::stream::iter(
        (0..8).map(|_| Ok::<_, std::io::Error>(bytes::Bytes::from(vec![b'x'; 512]))),
    );
    let streamed = http
        .post(edge.url("/upload"))
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await
        .unwrap();
    assert_eq!(streamed.status(), 413);

    let ready = http
        .get(format!("http://{}/ready", edge.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(
        ready.status(),
        503,
        "the dead pool has no reachable backend"
    );
    let ready: Value = ready.json().await.unwrap();
    assert_eq!(ready["unreachable_pools"], serde_json::json!(["dead"]));

    // Both failures were retried twice (the default), on the pools' only backend.
    let metrics = edge.metrics().await;
    assert!(
        metrics.contains(r#"outcome="connect_error",pool="dead"} 3"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"outcome="timeout",pool="slow"} 3"#),
        "{metrics}"
    );
    assert!(metrics.contains(r#"kingdom_edge_retries_total{pool="dead"} 2"#));
    assert!(metrics.contains(r#"kingdom_edge_requests_total{code="413",route="upload"} 2"#));

    // access_log.output names a file (relative to the working directory).
    let log = edge.dir.path().join("access.log");
    common::wait_for("the access log file to hold the 504", || {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        std::future::ready(text.contains(r#""error":"upstream_timeout""#).then_some(()))
    })
    .await;
    assert!(!edge.stdout().contains("request_id"), "nothing on stdout");
}

#[tokio::test]
async fn access_log_has_one_json_line_per_request() {
    let edge = sidecar_edge().await;
    let http = client();
    http.get(edge.url("/v1/echo?page=2&q=a%20b"))
        .header("x-request-id", "log-me")
        .send()
        .await
        .unwrap();
    let line: Value = common::wait_for("the access-log line", || {
        let found = edge
            .stdout()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .find(|l| l["request_id"] == "log-me");
        std::future::ready(found)
    })
    .await;
    assert_eq!(line["method"], "GET");
    assert_eq!(line["path"], "/v1/echo");
    assert_eq!(line["query"], "page=2&q=a%20b");
    assert_eq!(line["status"], 200);
    assert_eq!(line["route"], "api");
    assert_eq!(line["pool"], "api");
    assert_eq!(line["attempts"], 1);
    assert_eq!(line["client"], "127.0.0.1");
    assert!(line["backend"].as_str().unwrap().starts_with("127.0.0.1:"));
    assert!(line["bytes_out"].as_u64().unwrap() > 0);
    assert!(line["duration_ms"].as_f64().is_some());
    assert!(line["time"].as_str().unwrap().ends_with('Z'));
}

#[tokio::test]
async fn malformed_requests_get_400_and_the_connection_is_closed() {
    let upstream = common::fake_upstream("never").await;
    let p = free_ports(2);
    let yaml = format!(
        r#"
listeners: [{{ name: public, address: 127.0.0.1:{} }}]
admin: {{ address: 127.0.0.1:{} }}
pools: {{ app: {{ backends: [{{ address: {upstream} }}] }} }}
routes: [{{ name: app, match: {{ path_prefix: / }}, pool: app }}]
"#,
        p[0], p[1]
    );
    let edge = Edge::start(&yaml, addr(p[0]), addr(p[1])).await;
    let cases: &[&[u8]] = &[
        b"POST /ok HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
        b"GET /ok/../admin HTTP/1.1\r\nHost: a\r\n\r\n",
        b"GET /ok/%2e%2E/admin HTTP/1.1\r\nHost: a\r\n\r\n",
        b"THIS IS NOT HTTP\r\n\r\n",
        b"GET /ok HTTP/1.1\r\nHost: a\r\nBad Header Name: x\r\n\r\n",
    ];
    for request in cases {
        let answer = common::raw_exchange(edge.proxy, request).await;
        assert!(
            answer.starts_with("HTTP/1.1 400"),
            "{:?} got {answer:?}",
            String::from_utf8_lossy(request)
        );
        // Even a request that does not parse gets the JSON error, and no `Server`.
        let (head, body) = answer.split_once("\r\n\r\n").unwrap();
        assert!(!head.to_ascii_lowercase().contains("server:"), "{head}");
        let body: Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{answer}: {e}"));
        assert_eq!(body["error"], "bad_request");
        assert!(body["request_id"].as_str().is_some_and(|id| !id.is_empty()));
    }
    let answer =
        common::raw_exchange(edge.proxy, b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n").await;
    assert!(answer.starts_with("HTTP/1.1 405"), "{answer}");
    assert!(
        answer.contains(r#""error":"method_not_allowed""#),
        "{answer}"
    );
    // Content-Length with Transfer-Encoding: framed by the encoding, and the connection is
    // closed after the answer, so bytes smuggled behind the body are never read as a request.
    let answer = common::raw_exchange(
        edge.proxy,
        b"POST /upload HTTP/1.1\r\nHost: a\r\nContent-Length: 40\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        answer.ends_with("\r\n\r\n0"),
        "the body was empty: {answer}"
    );
    assert_eq!(answer.matches("HTTP/1.1 ").count(), 1, "{answer}");

    // The proxy still serves well-formed requests.
    let answer = common::raw_exchange(
        edge.proxy,
        b"GET /ok HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");

    // Every refusal counts, those before any route is known too.
    let metrics = edge.metrics().await;
    assert!(
        common::metric(
            &metrics,
            r#"kingdom_edge_rejected_total{reason="bad_request",route="-"}"#
        ) >= 1.0,
        "{metrics}"
    );
}
