//! Edge protection over HTTP: bearer tokens verified at the edge, rate limits and their
//! headers, slow-down, overload shedding, route validation, security headers and CORS.

mod common;

use std::time::{SystemTime, UNIX_EPOCH};

use common::{addr, client, free_ports, Edge};
use kingdom_edge::token::{Claims, TokenKey};
use serde_json::{json, Value};

const SECRET: &str = "integration-test-secret";

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A proxy in front of one kingdom-api sidecar, with `routes` (YAML list entries, each
/// `- { ... }` on its own line, pool `api`) and the extra top-level `sections`.
async fn api_edge(routes: &str, sections: &str) -> Edge {
    let p = free_ports(3);
    let yaml = format!(
        "listeners: [{{ name: public, address: 127.0.0.1:{} }}]\nadmin: {{ address: 127.0.0.1:{} }}\nsidecars:\n  - {{ name: api, command: kingdom-api, addresses: [127.0.0.1:{api}], env: {{ KINGDOM_API_SECRET: {SECRET} }} }}\npools:\n  api: {{ backends: [{{ address: 127.0.0.1:{api} }}] }}\ntokens: {{ secret: {SECRET} }}\n{sections}routes:\n{routes}",
        p[0],
        p[1],
        api = p[2],
    );
    Edge::start_ready(&yaml, addr(p[0]), addr(p[1])).await
}

/// A token kingdom-api would issue for `user`, valid from `iat` to `exp`.
fn token(user: &str, iat: u64, exp: u64) -> String {
    TokenKey::new(SECRET.as_bytes()).unwrap().sign(&Claims {
        sub: user.into(),
        iat,
        exp,
    })
}

#[tokio::test]
async fn tokens_are_verified_at_the_edge_and_only_their_subject_reaches_the_upstream() {
    let edge = api_edge(
        "  - { name: login, match: { path_prefix: /v1/auth }, pool: api }\n  - { name: open, match: { host: open.test, path_prefix: /v1/echo }, pool: api }\n  - { name: private, match: { path_prefix: /v1/echo }, pool: api, auth: required }\n  - { name: maybe, match: { path_prefix: /v1/analytics }, pool: api, auth: optional }\n",
        "",
    )
    .await;
    let http = client();
    // A token issued by kingdom-api through the edge.
    let issued: Value = http
        .post(edge.url("/v1/auth/token"))
        .json(&json!({ "user_id": "ada" }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let good = issued["token"].as_str().unwrap().to_string();
    let echo = |token: Option<&str>| {
        let mut request = http
            .get(edge.url("/v1/echo"))
            .header("x-user-id", "mallory")
            .header("x_user_id", "mallory");
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        request.send()
    };

    let response = echo(Some(&good)).await.unwrap();
    assert_eq!(response.status(), 200);
    let seen: Value = response.json().await.unwrap();
    assert_eq!(seen["headers"]["x-user-id"], json!(["ada"]), "{seen}");
    assert!(seen["headers"].get("x_user_id").is_none(), "{seen}");

    // Two credentials: which would the upstream read? Neither; the request is invalid.
    let two = http
        .get(edge.url("/v1/echo"))
        .header("authorization", format!("Bearer {good}"))
        .header("authorization", "Bearer not-a-token")
        .send()
        .await
        .unwrap();
    assert_eq!(two.status(), 400);
    assert!(two.headers()["www-authenticate"]
        .to_str()
        .unwrap()
        .contains("invalid_request"));

    let missing = echo(None).await.unwrap();
    assert_eq!(missing.status(), 401);
    assert_eq!(
        missing.headers()["www-authenticate"],
        "Bearer realm=\"kingdom-edge\""
    );
    let body: Value = missing.json().await.unwrap();
    assert_eq!(body["error"], "unauthorized");
    let now = unix_now();
    let bad = [
        format!("{good}x"),
        token("ada", now - 7200, now - 3600),
        TokenKey::new(b"another-secret-of-16-bytes")
            .unwrap()
            .sign(&Claims {
                sub: "ada".into(),
                iat: now,
                exp: now + 60,
            }),
        "not-a-token".to_string(),
    ];
    for token in &bad {
        let refused = echo(Some(token)).await.unwrap();
        assert_eq!(refused.status(), 401, "{token}");
        assert!(refused.headers()["www-authenticate"]
            .to_str()
            .unwrap()
            .contains("invalid_token"));
    }
    // Within the clock skew (30 s by default), a token just expired still passes.
    let just_expired = token("ada", now - 60, now - 5);
    assert_eq!(echo(Some(&just_expired)).await.unwrap().status(), 200);

    // Optional: no token is fine, a bad one is not.
    let summary = edge.url("/v1/analytics/summary?days=1");
    assert_eq!(http.get(&summary).send().await.unwrap().status(), 200);
    let refused = http
        .get(&summary)
        .bearer_auth(&bad[0])
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 401);

    // A route without `auth` never forwards a client's `x-user-id` either.
    let open: Value = http
        .get(edge.url("/v1/echo"))
        .header("host", "open.test")
        .header("x-user-id", "mallory")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(open["headers"].get("x-user-id").is_none(), "{open}");

    assert_rejected(&edge, "private", "unauthorized", 5.0).await;
}

/// Checks `kingdom_edge_rejected_total{route,reason}` (counted when a request is logged,
/// just after its answer: waits for it to reach `count`, then checks it is no more).
async fn assert_rejected(edge: &Edge, route: &str, reason: &str, count: f64) {
    let series = format!(r#"kingdom_edge_rejected_total{{reason="{reason}",route="{route}"}}"#);
    edge.wait_metric(&series, count).await;
    assert_eq!(
        common::metric(&edge.metrics().await, &series),
        count,
        "{series}"
    );
}

/// A proxy in front of one fake upstream `a` (routes `/`), with `sections` (top-level YAML)
/// and `route_extra` added to the route.
async fn limited_edge(sections: &str, route_extra: &str) -> (Edge, String) {
    let routes = format!("  - {{ name: open, match: {{ path_prefix: /public }}, pool: app }}\n  - {{ name: app, match: {{ path_prefix: / }}, pool: app{route_extra} }}\n");
    app_edge("127.0.0.1", "", sections, &routes).await
}

/// A proxy listening on `bind` (an IP address) with the listener's `extra` keys, in front of
/// one fake upstream `a` (pool `app`), with `sections` (top-level YAML) and `routes` (list
/// entries, one per line); and its config.
async fn app_edge(bind: &str, extra: &str, sections: &str, routes: &str) -> (Edge, String) {
    let a = common::fake_upstream("a").await;
    edge_for(a, bind, extra, sections, routes).await
}

/// [`app_edge`], in front of the upstream at `upstream`.
async fn edge_for(
    upstream: std::net::SocketAddr,
    bind: &str,
    extra: &str,
    sections: &str,
    routes: &str,
) -> (Edge, String) {
    let p = free_ports(2);
    let yaml = format!(
        "listeners: [{{ name: public, address: '{bind}:{}'{extra} }}]\nadmin: {{ address: 127.0.0.1:{} }}\npools: {{ app: {{ backends: [{{ address: {upstream} }}] }} }}\n{sections}routes:\n{routes}",
        p[0], p[1]
    );
    (Edge::start_ready(&yaml, addr(p[0]), addr(p[1])).await, yaml)
}

fn header<'a>(response: &'a reqwest::Response, name: &str) -> Option<&'a str> {
    response.headers().get(name).map(|v| v.to_str().unwrap())
}

/// Checks that `response` says to retry when the next request is due, `due` seconds after
/// the instant `first` (just before the policy's first request): that less what has gone
/// since, rounded up to the second.
fn assert_retry_after(response: &reqwest::Response, due: u64, first: std::time::Instant) {
    let retry_after: u64 = header(response, "retry-after").unwrap().parse().unwrap();
    let gone = first.elapsed().as_secs_f64();
    let earliest = (due as f64 - gone).ceil().max(1.0) as u64;
    assert!(
        (earliest..=due).contains(&retry_after),
        "retry-after {retry_after}, due {due} s after a start {gone} s ago"
    );
}

#[tokio::test]
async fn a_rate_limit_answers_429_with_exact_retry_after_and_ratelimit_headers() {
    let (edge, _) = limited_edge(
        "rate_limits:\n  burst3: { key: client_ip, limit: 3, per: 60s, burst: 3 }\n",
        ", rate_limit: [burst3]",
    )
    .await;
    let http = client();
    let first = std::time::Instant::now();
    for remaining in [2, 1, 0] {
        let ok = http.get(edge.url("/ok")).send().await.unwrap();
        assert_eq!(ok.status(), 200);
        assert_eq!(header(&ok, "ratelimit-policy"), Some("\"burst3\";q=3;w=60"));
        let status = header(&ok, "ratelimit").unwrap();
        assert!(
            status.starts_with(&format!("\"burst3\";r={remaining};t=")),
            "{status}"
        );
    }
    let limited = http
        .get(edge.url("/ok"))
        .header("x-request-id", "limited-1")
        .send()
        .await
        .unwrap();
    assert_eq!(limited.status(), 429);
    // Three requests at once use the burst; the next is due 20 s after the first.
    assert_retry_after(&limited, 20, first);
    assert_eq!(
        header(&limited, "ratelimit-policy"),
        Some("\"burst3\";q=3;w=60")
    );
    assert!(header(&limited, "ratelimit")
        .unwrap()
        .starts_with("\"burst3\";r=0;t="));
    let body: Value = limited.json().await.unwrap();
    assert_eq!(body["error"], "rate_limited");
    assert_eq!(body["request_id"], "limited-1");
    // Another route is not limited, and says nothing of limits.
    let other = http.get(edge.url("/public/ok")).send().await.unwrap();
    assert_eq!(other.status(), 404, "the upstream has no /public/ok");
    assert_eq!(header(&other, "ratelimit"), None);

    let metrics = edge.metrics().await;
    let value = |series| common::metric(&metrics, series);
    assert_eq!(
        value(r#"kingdom_edge_rate_limited_total{policy="burst3",route="app"}"#),
        1.0
    );
    assert_eq!(
        value(r#"kingdom_edge_rejected_total{reason="rate_limited",route="app"}"#),
        1.0
    );
}

#[tokio::test]
async fn shadow_mode_counts_without_refusing() {
    let (edge, _) = limited_edge(
        "rate_limits:\n  trial: { key: client_ip, limit: 1, per: 60s, mode: shadow }\n",
        ", rate_limit: [trial]",
    )
    .await;
    let http = client();
    for _ in 0..4 {
        let ok = http.get(edge.url("/ok")).send().await.unwrap();
        assert_eq!(ok.status(), 200);
        assert_eq!(
            header(&ok, "ratelimit"),
            None,
            "shadow policies stay out of the headers"
        );
    }
    edge.wait_metric(
        r#"kingdom_edge_rate_limit_shadow_total{policy="trial",route="app"}"#,
        3.0,
    )
    .await;
    assert!(edge
        .stderr()
        .contains("rate limit in shadow mode would refuse requests"));
}

#[tokio::test]
async fn forwarded_addresses_count_only_from_trusted_proxies() {
    let limit = "rate_limits:\n  one: { key: client_ip, limit: 1, per: 60s }\n";
    for (trusted, separate) in [
        ("server: { trusted_proxies: [127.0.0.1] }\n", true),
        ("", false),
    ] {
        let (edge, _) = limited_edge(&format!("{trusted}{limit}"), ", rate_limit: [one]").await;
        let http = client();
        let from = |client: &str| {
            http.get(edge.url("/ok"))
                .header("x-forwarded-for", client)
                .send()
        };
        assert_eq!(from("198.51.100.1").await.unwrap().status(), 200);
        let second = from("198.51.100.2").await.unwrap().status();
        if separate {
            assert_eq!(
                second, 200,
                "behind a trusted proxy, each client has its own budget"
            );
            assert_eq!(from("198.51.100.1").await.unwrap().status(), 429);
        } else {
            assert_eq!(second, 429, "an untrusted peer cannot pick its budget");
        }
    }
}

#[tokio::test]
async fn buckets_survive_a_reload_that_keeps_their_policy() {
    let limit = "rate_limits:\n  one: { key: client_ip, limit: 1, per: 1h }\n";
    let (edge, yaml) = limited_edge(limit, ", rate_limit: [one]").await;
    let http = client();
    assert_eq!(
        http.get(edge.url("/ok")).send().await.unwrap().status(),
        200
    );
    assert_eq!(
        http.get(edge.url("/ok")).send().await.unwrap().status(),
        429
    );
    // A reload that changes something else keeps the bucket.
    edge.apply(&yaml.replace("name: open", "name: open2")).await;
    assert_eq!(
        http.get(edge.url("/ok")).send().await.unwrap().status(),
        429
    );
    // A new definition starts new buckets.
    edge.apply(&yaml.replace("limit: 1,", "limit: 2,")).await;
    assert_eq!(
        http.get(edge.url("/ok")).send().await.unwrap().status(),
        200
    );
}

#[tokio::test]
async fn slow_down_delays_requests_beyond_after_by_a_growing_step() {
    let (edge, _) = limited_edge(
        "slow_down:\n  gentle: { key: client_ip, after: 2, per: 1h, delay_step: 300ms, max_delay: 600ms }\n",
        ", slow_down: gentle",
    )
    .await;
    let http = client();
    let mut waits = Vec::new();
    for _ in 0..5 {
        let started = std::time::Instant::now();
        let response = http.get(edge.url("/ok")).send().await.unwrap();
        assert_eq!(
            response.status(),
            200,
            "delayed requests are answered normally"
        );
        waits.push(started.elapsed());
    }
    // The third waits at least 300 ms, the fourth 600 ms, the fifth is capped at 600 ms.
    let ms = std::time::Duration::from_millis;
    assert!(
        waits[2] >= ms(300) && waits[3] >= ms(600) && waits[4] >= ms(600),
        "{waits:?}"
    );
    let metrics = edge.metrics().await;
    assert_eq!(
        common::metric(
            &metrics,
            r#"kingdom_edge_slowed_down_total{policy="gentle"}"#
        ),
        3.0
    );
}

#[tokio::test]
async fn a_user_keyed_limit_counts_each_token_subject_and_falls_back_to_the_address() {
    let edge = api_edge(
        "  - { name: events, match: { path_prefix: /v1/echo }, pool: api, auth: optional, rate_limit: [per_user] }\n",
        "rate_limits:\n  per_user: { key: user, limit: 1, per: 1h }\n",
    )
    .await;
    let http = client();
    let now = unix_now();
    let (ada, bob) = (token("ada", now, now + 600), token("bob", now, now + 600));
    let get = |token: Option<&str>| {
        let mut request = http.get(edge.url("/v1/echo"));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        request.send()
    };
    assert_eq!(get(Some(&ada)).await.unwrap().status(), 200);
    assert_eq!(get(Some(&ada)).await.unwrap().status(), 429);
    assert_eq!(
        get(Some(&bob)).await.unwrap().status(),
        200,
        "bob has his own budget"
    );
    assert_eq!(
        get(None).await.unwrap().status(),
        200,
        "no token: the address's budget"
    );
    assert_eq!(
        get(None).await.unwrap().status(),
        429,
        "which is not unlimited"
    );
}

#[tokio::test]
async fn a_route_answers_405_with_allow_415_and_413_before_its_upstream() {
    let (edge, _) = limited_edge(
        "",
        ", methods: [GET, POST], content_types: [application/json, 'text/*'], max_body: 16B",
    )
    .await;
    let http = client();
    let deleted = http.delete(edge.url("/ok")).send().await.unwrap();
    assert_eq!(deleted.status(), 405);
    assert_eq!(header(&deleted, "allow"), Some("GET, HEAD, POST"));
    let body: Value = deleted.json().await.unwrap();
    assert_eq!(body["error"], "method_not_allowed");

    let upload = |content_type: Option<&'static str>, body: &'static str| {
        let mut request = http.post(edge.url("/upload")).body(body);
        if let Some(content_type) = content_type {
            request = request.header("content-type", content_type);
        }
        request.send()
    };
    let xml = upload(Some("application/xml"), "<a/>").await.unwrap();
    assert_eq!(xml.status(), 415);
    assert_eq!(upload(None, "{}").await.unwrap().status(), 415, "no type");
    let json = upload(Some("application/json; charset=utf-8"), "{\"a\":1}")
        .await
        .unwrap();
    assert_eq!(json.status(), 200);
    assert_eq!(
        json.text().await.unwrap(),
        "7",
        "the upstream read the body"
    );
    let text = upload(Some("text/plain"), "hello").await.unwrap();
    assert_eq!(text.status(), 200);
    let large = upload(Some("application/json"), "{\"a\":\"0123456789\"}")
        .await
        .unwrap();
    assert_eq!(large.status(), 413, "max_body still holds");
    // A GET without a body has no media type to check.
    assert_eq!(
        http.get(edge.url("/ok")).send().await.unwrap().status(),
        200
    );

    let metrics = edge.metrics().await;
    for (reason, count) in [
        ("method_not_allowed", 1.0),
        ("unsupported_media_type", 2.0),
        ("body_too_large", 1.0),
    ] {
        let series = format!(r#"kingdom_edge_rejected_total{{reason="{reason}",route="app"}}"#);
        assert_eq!(common::metric(&metrics, &series), count, "{series}");
    }
}

/// Sends `POST /upload` over HTTP/2 with prior knowledge, its body in a DATA frame after a
/// HEADERS frame with no `content-length`; the answer's status.
async fn h2_post_without_length(proxy: std::net::SocketAddr, content_type: Option<&str>) -> u16 {
    let tcp = tokio::net::TcpStream::connect(proxy).await.unwrap();
    let (mut h2, connection) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(connection);
    let mut request = http::Request::post(format!("http://{proxy}/upload"));
    if let Some(content_type) = content_type {
        request = request.header("content-type", content_type);
    }
    let (response, mut body) = h2.send_request(request.body(()).unwrap(), false).unwrap();
    body.send_data(bytes::Bytes::from_static(b"{}"), true)
        .unwrap();
    response.await.unwrap().status().as_u16()
}

#[tokio::test]
async fn validation_sees_http2_bodies_head_and_repeated_content_types_and_options_asterisk() {
    let routes =
        "  - { name: app, pool: app, methods: [GET, POST], content_types: [application/json] }\n";
    let (edge, _) = app_edge("127.0.0.1", ", h2c: true", "", routes).await;
    // An HTTP/2 body needs no content-length; its media type is checked all the same.
    assert_eq!(h2_post_without_length(edge.proxy, None).await, 415);
    assert_eq!(
        h2_post_without_length(edge.proxy, Some("text/html")).await,
        415
    );
    assert_eq!(
        h2_post_without_length(edge.proxy, Some("application/json")).await,
        200
    );
    let http = client();
    // HEAD is GET without the body: a route that takes GET takes HEAD.
    let head = http.head(edge.url("/ok")).send().await.unwrap();
    assert_eq!(head.status(), 200);
    // Two media types: which one would the upstream read? Neither.
    let two = http
        .post(edge.url("/upload"))
        .header("content-type", "application/json")
        .header("content-type", "text/html")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(two.status(), 400);
    // The edge's answer to `OPTIONS *` carries its headers like any other.
    let asterisk = common::raw_exchange(
        edge.proxy,
        b"OPTIONS * HTTP/1.1\r\nHost: edge.test\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(asterisk.starts_with("HTTP/1.1 200"), "{asterisk}");
    let lower = asterisk.to_ascii_lowercase();
    assert!(
        lower.contains("x-content-type-options: nosniff"),
        "{asterisk}"
    );
    assert!(lower.contains("x-request-id: "), "{asterisk}");
    assert_rejected(&edge, "app", "unsupported_media_type", 2.0).await;
}

#[tokio::test]
async fn a_preflight_is_judged_by_the_route_of_the_request_it_announces() {
    // `strict` serves only POST /ok, for one origin; `plain` GET /public, leaving CORS to its
    // upstream; `loose` everything else, for any origin.
    let routes = "  - { name: strict, match: { path_prefix: /ok, methods: [POST] }, pool: app, cors: { origins: ['https://app.test'], methods: [POST] } }\n  - { name: plain, match: { path_prefix: /public, methods: [GET] }, pool: app, methods: [GET] }\n  - { name: loose, pool: app, cors: { origins: ['*'], methods: [GET, POST, DELETE] } }\n";
    let (edge, _) = app_edge("127.0.0.1", "", "", routes).await;
    let http = client();
    let preflight_to = |path: &'static str, origin: &'static str, method: &'static str| {
        http.request(reqwest::Method::OPTIONS, edge.url(path))
            .header("origin", origin)
            .header("access-control-request-method", method)
            .send()
    };
    let preflight = |origin, method| preflight_to("/ok", origin, method);
    // The POST would go to `strict`: so does its preflight, whose rules deny this origin.
    let denied = preflight("https://evil.test", "POST").await.unwrap();
    assert_eq!(denied.status(), 403);
    assert_eq!(header(&denied, "access-control-allow-origin"), None);
    let allowed = preflight("https://app.test", "POST").await.unwrap();
    assert_eq!(allowed.status(), 204);
    assert_eq!(
        header(&allowed, "access-control-allow-origin"),
        Some("https://app.test")
    );
    // A DELETE would go to `loose`, which allows any origin.
    let loose = preflight("https://evil.test", "DELETE").await.unwrap();
    assert_eq!(loose.status(), 204);
    assert_eq!(header(&loose, "access-control-allow-origin"), Some("*"));
    // A GET /public would go to `plain`, which answers no preflight: this one is an OPTIONS
    // request like any other, and `loose` takes it.
    let plain = preflight_to("/public", "https://evil.test", "GET")
        .await
        .unwrap();
    assert_eq!(plain.status(), 204);
    assert_eq!(header(&plain, "access-control-allow-origin"), Some("*"));
}

#[tokio::test]
async fn a_request_released_by_the_slow_down_is_shed_if_the_load_grew_meanwhile() {
    let upstream = common::toggle_upstream("gated").await;
    let sections = "server:\n  overload: { shed_standard_at: 2 }\nslow_down:\n  hold: { key: client_ip, after: 1, per: 1h, delay_step: 2s, max_delay: 2s }\n";
    let routes = "  - { name: held, match: { path_prefix: /ok, methods: [POST] }, pool: app, slow_down: hold }\n  - { name: app, pool: app }\n";
    let (edge, _) = edge_for(upstream.addr, "127.0.0.1", "", sections, routes).await;
    let hits = || upstream.hits.load(std::sync::atomic::Ordering::SeqCst);
    let reached = |at: usize| {
        common::wait_for("a request to reach the upstream", move || async move {
            (hits() >= at).then_some(())
        })
    };
    upstream.close();
    let http = client();
    // One request in flight, held at the upstream (the first POST is not slowed down).
    let first = tokio::spawn(http.post(edge.url("/ok")).send());
    reached(1).await;
    // The second is admitted (2 in flight, not past 2) and held back for 2 s.
    let slowed = tokio::spawn(http.post(edge.url("/ok")).send());
    edge.wait_metric("kingdom_edge_slow_down_waiting", 1.0)
        .await;
    // Meanwhile another request is admitted: the waiting one does not count.
    let other = tokio::spawn(http.get(edge.url("/ok")).send());
    reached(2).await;
    // Released, the slowed request finds 3 in flight: shed, not forwarded.
    let slowed = slowed.await.unwrap().unwrap();
    assert_eq!(slowed.status(), 503);
    assert_eq!(header(&slowed, "retry-after"), Some("1"));
    assert_eq!(hits(), 2);
    upstream.open();
    assert_eq!(first.await.unwrap().unwrap().status(), 200);
    assert_eq!(other.await.unwrap().unwrap().status(), 200);
    let metrics = edge.metrics().await;
    assert_eq!(
        common::metric(&metrics, r#"kingdom_edge_shed_total{priority="standard"}"#),
        1.0
    );
}

#[tokio::test]
async fn a_client_that_leaves_while_slowed_down_is_not_forwarded() {
    let upstream = common::toggle_upstream("slowed").await;
    let sections = "server:\n  overload: { shed_standard_at: 1 }\nslow_down:\n  hold: { key: client_ip, after: 1, per: 1h, delay_step: 60s, max_delay: 60s }\n";
    let routes = "  - { name: held, match: { path_prefix: /ok, methods: [POST] }, pool: app, slow_down: hold }\n  - { name: app, pool: app }\n";
    let (edge, _) = edge_for(upstream.addr, "127.0.0.1", "", sections, routes).await;
    let hits = || upstream.hits.load(std::sync::atomic::Ordering::SeqCst);
    let post = |http: reqwest::Client| http.post(edge.url("/ok")).send();
    assert_eq!(post(client()).await.unwrap().status(), 200);
    assert_eq!(hits(), 1);
    // The second is held back for a minute (longer than any wait here); its client gives up.
    let waiting = r#"kingdom_edge_slow_down_waiting"#;
    let held = tokio::spawn(post(client()));
    edge.wait_metric(waiting, 1.0).await;
    // Held back, it is not load: another request is not shed past `shed_standard_at: 1`.
    let other = client().get(edge.url("/ok")).send().await.unwrap();
    assert_eq!(other.status(), 200);
    held.abort();
    // Logged as nginx does (499) once the edge sees the client gone, long before the minute.
    edge.wait_metric(
        r#"kingdom_edge_requests_total{code="499",route="held"}"#,
        1.0,
    )
    .await;
    let metrics = edge.metrics().await;
    assert_eq!(common::metric(&metrics, waiting), 0.0);
    assert_eq!(
        hits(),
        2,
        "the abandoned request never reached the upstream"
    );
}

#[tokio::test]
async fn ipv4_clients_of_a_dual_stack_listener_have_their_own_budgets() {
    let limit = "rate_limits:\n  one: { key: client_ip, limit: 1, per: 1h }\n";
    let routes = "  - { name: app, pool: app, rate_limit: [one] }\n";
    let (edge, _) = app_edge("[::]", "", limit, routes).await;
    let from = |local: [u8; 4]| {
        reqwest::Client::builder()
            .no_proxy()
            .local_address(std::net::IpAddr::from(local))
            .build()
            .unwrap()
            .get(edge.url("/ok"))
            .send()
    };
    // Over IPv4 a `[::]` socket sees `::ffff:127.0.0.1`: still one budget per address, not
    // one for every IPv4 client in `::ffff:0:0/64`.
    assert_eq!(from([127, 0, 0, 1]).await.unwrap().status(), 200);
    assert_eq!(from([127, 0, 0, 2]).await.unwrap().status(), 200);
    assert_eq!(from([127, 0, 0, 1]).await.unwrap().status(), 429);
}

#[tokio::test]
async fn overload_sheds_bulk_first_then_standard_and_high_only_at_the_cap() {
    let upstream = common::toggle_upstream("held").await;
    let sections = "server:\n  overload: { shed_bulk_at: 2, shed_standard_at: 3, max_in_flight: 4, retry_after: 5s }\nrate_limits:\n  once: { key: client_ip, limit: 1, per: 1h }\n";
    let routes = "  - { name: login, match: { host: high.test }, pool: app, priority: high }\n  - { name: batch, match: { host: bulk.test }, pool: app, priority: bulk, rate_limit: [once] }\n  - { name: api, pool: app }\n";
    let (edge, _) = edge_for(upstream.addr, "127.0.0.1", "", sections, routes).await;
    let http = client();
    let get = |host: &'static str| http.get(edge.url("/ok")).header("host", host).send();
    let hits = || upstream.hits.load(std::sync::atomic::Ordering::SeqCst);
    upstream.close();
    // Holds requests at the upstream; each is in flight until the gate opens.
    let mut held = Vec::new();
    let mut hold = |host: &'static str, at: usize| {
        held.push(tokio::spawn(get(host)));
        common::wait_for("the request to reach the upstream", move || async move {
            (hits() >= at).then_some(())
        })
    };
    hold("api.test", 1).await;
    hold("api.test", 2).await;
    // Two in flight: a third bulk request is past `shed_bulk_at`, a standard one is not.
    let shed = get("bulk.test").await.unwrap();
    assert_eq!(shed.status(), 503);
    assert_eq!(header(&shed, "retry-after"), Some("5"));
    // Its rate limit was asked, not charged: the whole budget is left.
    assert_eq!(header(&shed, "ratelimit"), Some("\"once\";r=1;t=0"));
    let body: Value = shed.json().await.unwrap();
    assert_eq!(body["error"], "overloaded");
    hold("api.test", 3).await;
    // Three in flight: standard is shed too, high is not.
    assert_eq!(get("api.test").await.unwrap().status(), 503);
    assert_eq!(get("bulk.test").await.unwrap().status(), 503);
    hold("high.test", 4).await;
    // Four: everything is shed.
    assert_eq!(get("high.test").await.unwrap().status(), 503);
    assert_eq!(hits(), 4, "shed requests never reached the upstream");

    upstream.open();
    for request in held {
        assert_eq!(request.await.unwrap().unwrap().status(), 200);
    }
    // The load is gone: bulk passes again, on a budget of one that the sheds did not spend.
    assert_eq!(get("bulk.test").await.unwrap().status(), 200);
    assert_eq!(get("bulk.test").await.unwrap().status(), 429);

    let metrics = edge.metrics().await;
    let value = |series: &str| common::metric(&metrics, series);
    assert_eq!(value(r#"kingdom_edge_shed_total{priority="bulk"}"#), 2.0);
    assert_eq!(
        value(r#"kingdom_edge_shed_total{priority="standard"}"#),
        1.0
    );
    assert_eq!(value(r#"kingdom_edge_shed_total{priority="high"}"#), 1.0);
    assert_eq!(
        value(r#"kingdom_edge_rejected_total{reason="overloaded",route="batch"}"#),
        2.0
    );
}

#[tokio::test]
async fn cors_preflights_are_answered_at_the_edge_and_responses_decorated_per_origin() {
    let (edge, _) = limited_edge(
        "",
        ", methods: [GET, POST], cors: { origins: ['https://kingdomstudios.app', 'https://*.kingdomstudios.app'], methods: [GET, POST], headers: [authorization, content-type], expose_headers: [x-request-id], credentials: true, max_age: 10m }, security_headers: { content_security_policy: \"default-src 'none'\" }",
    )
    .await;
    let http = client();
    let preflight = |origin: &str, method: &str| {
        http.request(reqwest::Method::OPTIONS, edge.url("/ok"))
            .header("origin", origin)
            .header("access-control-request-method", method)
            .header("access-control-request-headers", "Authorization")
            .send()
    };
    // Allowed: answered here (the upstream has no OPTIONS, and `methods` has none either:
    // a preflight is not the request it asks about).
    let allowed = preflight("https://eu.kingdomstudios.app", "POST")
        .await
        .unwrap();
    assert_eq!(allowed.status(), 204);
    for (name, value) in [
        (
            "access-control-allow-origin",
            "https://eu.kingdomstudios.app",
        ),
        ("access-control-allow-methods", "GET, HEAD, POST"),
        ("access-control-allow-headers", "authorization"),
        ("access-control-allow-credentials", "true"),
        ("access-control-max-age", "600"),
        ("x-content-type-options", "nosniff"),
    ] {
        assert_eq!(header(&allowed, name), Some(value), "{name}");
    }
    assert!(header(&allowed, "x-request-id").is_some());

    // Denied: another origin, a method not allowed.
    for (origin, method) in [
        ("https://kingdomstudios.app.evil.example", "POST"),
        ("https://kingdomstudios.app", "DELETE"),
    ] {
        let denied = preflight(origin, method).await.unwrap();
        assert_eq!(denied.status(), 403, "{origin} {method}");
        assert!(
            denied
                .headers()
                .keys()
                .all(|name| !name.as_str().starts_with("access-control-")),
            "{:?}",
            denied.headers()
        );
        let body: Value = denied.json().await.unwrap();
        assert_eq!(body["error"], "cors_preflight_denied");
    }

    // Actual requests: CORS headers for an allowed origin only; security headers for all.
    let from = |origin: &'static str| http.get(edge.url("/ok")).header("origin", origin).send();
    let ok = from("https://kingdomstudios.app").await.unwrap();
    assert_eq!(ok.status(), 200);
    assert_eq!(
        header(&ok, "access-control-allow-origin"),
        Some("https://kingdomstudios.app")
    );
    assert_eq!(
        header(&ok, "access-control-allow-credentials"),
        Some("true")
    );
    assert_eq!(
        header(&ok, "access-control-expose-headers"),
        Some("x-request-id")
    );
    assert_eq!(header(&ok, "vary"), Some("origin"));
    assert_eq!(
        header(&ok, "content-security-policy"),
        Some("default-src 'none'")
    );
    assert_eq!(header(&ok, "x-frame-options"), Some("DENY"));
    let other = from("https://evil.example").await.unwrap();
    assert_eq!(other.status(), 200);
    assert_eq!(header(&other, "access-control-allow-origin"), None);
    assert_eq!(header(&other, "vary"), Some("origin"));
    // The edge's own answers are decorated like the upstream's.
    let refused = http
        .delete(edge.url("/ok"))
        .header("origin", "https://eu.kingdomstudios.app")
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 405);
    assert_eq!(
        header(&refused, "access-control-allow-origin"),
        Some("https://eu.kingdomstudios.app")
    );
    assert_eq!(header(&refused, "x-content-type-options"), Some("nosniff"));

    let metrics = edge.metrics().await;
    assert_eq!(
        common::metric(
            &metrics,
            r#"kingdom_edge_rejected_total{reason="cors_preflight_denied",route="app"}"#
        ),
        2.0
    );
}

/// `conf/edge.yaml` as shipped, with each loopback port moved to a free one.
fn shipped_config_on_free_ports() -> (String, std::net::SocketAddr, std::net::SocketAddr) {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("conf/edge.yaml");
    let mut yaml = std::fs::read_to_string(path).unwrap();
    let mut ports: Vec<u16> = Vec::new();
    for found in yaml.match_indices("127.0.0.1:") {
        let digits: String = yaml[found.0 + 10..]
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        let port: u16 = digits.parse().unwrap();
        if !ports.contains(&port) {
            ports.push(port);
        }
    }
    let free = free_ports(ports.len());
    for (old, new) in ports.iter().zip(&free) {
        yaml = yaml.replace(&format!("127.0.0.1:{old}"), &format!("127.0.0.1:{new}"));
    }
    let moved = |old: u16| addr(free[ports.iter().position(|p| *p == old).unwrap()]);
    (yaml, moved(8080), moved(9090))
}

#[tokio::test]
async fn the_default_config_enforces_the_platforms_limits_with_exact_headers() {
    let (yaml, proxy, admin) = shipped_config_on_free_ports();
    let edge = Edge::start_ready(&yaml, proxy, admin).await;
    let http = client();

    // Login: 5 in any 15 minutes per client, all at once if it likes; the sixth is due
    // 180 s (15 min / 5) after the first.
    let login = || {
        http.post(edge.url("/v1/auth/token"))
            .json(&json!({ "user_id": "ada" }))
            .send()
    };
    let mut token = String::new();
    let first = std::time::Instant::now();
    for remaining in (0..5).rev() {
        let ok = login().await.unwrap();
        assert_eq!(ok.status(), 200);
        assert_eq!(header(&ok, "ratelimit-policy"), Some("\"auth\";q=5;w=900"));
        let status = header(&ok, "ratelimit").unwrap().to_string();
        assert!(
            status.starts_with(&format!("\"auth\";r={remaining};t=")),
            "{status}"
        );
        let issued: Value = ok.json().await.unwrap();
        token = issued["token"].as_str().unwrap().to_string();
    }
    let limited = login().await.unwrap();
    assert_eq!(limited.status(), 429);
    assert_retry_after(&limited, 180, first);
    assert_eq!(header(&limited, "x-content-type-options"), Some("nosniff"));

    // Generation: 50 in 5 minutes per user; another user, or no token (the client's
    // address), has a budget of its own.
    let generate = |token: Option<&str>| {
        let mut request = http
            .post(edge.url("/v1/content/generate"))
            .json(&json!({ "type": "blog_post", "topic": "limits" }));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        request.send()
    };
    let first = std::time::Instant::now();
    for i in 0..50 {
        let answer = generate(Some(&token)).await.unwrap();
        assert_eq!(answer.status(), 200, "request {i}");
        assert_eq!(
            header(&answer, "ratelimit-policy"),
            Some("\"generate\";q=50;w=300")
        );
    }
    let limited = generate(Some(&token)).await.unwrap();
    assert_eq!(limited.status(), 429);
    // The 51st is due 6 s (5 min / 50) after the first.
    assert_retry_after(&limited, 6, first);
    assert_eq!(generate(None).await.unwrap().status(), 200);
    assert_eq!(
        generate(Some("forged.token")).await.unwrap().status(),
        401,
        "a token must be valid to name a user"
    );

    // The API: 1,000 per 15 minutes, slowed down past 500; answers carry the policy.
    let api = http.get(edge.url("/v1/echo")).send().await.unwrap();
    assert_eq!(api.status(), 200);
    assert_eq!(
        header(&api, "ratelimit-policy"),
        Some("\"api\";q=1000;w=900")
    );
    assert_eq!(
        header(&api, "content-security-policy"),
        Some("default-src 'none'; frame-ancestors 'none'")
    );

    // Only POST with JSON reaches login.
    let get = http.get(edge.url("/v1/auth/token")).send().await.unwrap();
    assert_eq!(get.status(), 405);
    assert_eq!(header(&get, "allow"), Some("POST"));
    let form = http
        .post(edge.url("/v1/auth/token"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body("user_id=ada")
        .send()
        .await
        .unwrap();
    assert_eq!(form.status(), 415);

    // A browser on a regional front end may log in; one elsewhere may not.
    let preflight = |origin: &'static str| {
        http.request(reqwest::Method::OPTIONS, edge.url("/v1/auth/token"))
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header("access-control-request-headers", "content-type")
            .send()
    };
    let eu = preflight("https://eu.kingdomstudios.app").await.unwrap();
    assert_eq!(eu.status(), 204);
    assert_eq!(
        header(&eu, "access-control-allow-origin"),
        Some("https://eu.kingdomstudios.app")
    );
    assert_eq!(
        preflight("https://evil.example").await.unwrap().status(),
        403
    );

    // The content pool's cacheable GETs are cached: the templates come from the cache the
    // second time, from the content service once.
    let templates = || http.get(edge.url("/v1/content/templates")).send();
    let first = templates().await.unwrap();
    assert_eq!(
        header(&first, "cache-status"),
        Some("kingdom-edge; fwd=miss; stored")
    );
    let instance = header(&first, "x-instance").map(str::to_string);
    let again = templates().await.unwrap();
    assert!(header(&again, "cache-status")
        .unwrap()
        .starts_with("kingdom-edge; hit; ttl="));
    assert_eq!(header(&again, "x-instance").map(str::to_string), instance);
}
