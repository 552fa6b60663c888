//! Upstream failure handling end to end: backends that die or fail are worked around without
//! the client noticing, ejected, and readmitted; sticky sessions; what is never retried.

mod common;

use std::sync::atomic::Ordering;

use common::{client, wait_for, ApiProcess};
use serde_json::Value;

fn backend<'a>(status: &'a Value, pool: &str, address: &str) -> &'a Value {
    status["pools"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == pool)
        .unwrap()["backends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["address"] == address)
        .unwrap()
}

/// Sends `GET /ok` until the upstream named `name` answers one, then waits for the outcome
/// of that request (recorded once its response is complete) to close the breaker.
async fn wait_readmitted(edge: &common::Edge, name: &str, address: &str) {
    wait_served_by(edge, name).await;
    wait_for(&format!("{name}'s breaker to close"), || {
        let status = edge.status();
        async move { (backend(&status.await, "app", address)["breaker"] == "closed").then_some(()) }
    })
    .await;
}

/// Sends `GET /ok` until the upstream named `name` answers one.
async fn wait_served_by(edge: &common::Edge, name: &str) {
    let http = client();
    wait_for(&format!("{name} to serve again"), || {
        let request = http.get(edge.url("/ok")).send();
        async move {
            let response = request.await.ok()?;
            (response.headers()["x-upstream"] == name).then_some(())
        }
    })
    .await;
}

#[tokio::test]
async fn killing_a_backend_mid_stream_loses_no_request() {
    let mut apis = [
        ApiProcess::start().await,
        ApiProcess::start().await,
        ApiProcess::start().await,
    ];
    let addrs: Vec<_> = apis.iter().map(|a| a.addr).collect();
    let edge = common::edge_for_pool(
        &addrs,
        &[
            "outlier: { consecutive_failures: 3, base_ejection: 60s }",
            "retries: { attempts: 2 }",
        ],
    )
    .await;
    let http = client();
    let victim = apis[1].addr.to_string();

    // Twelve clients in parallel, 40 GETs each; the victim dies after the first third.
    let mut streams = Vec::new();
    for _ in 0..12 {
        let (http, url) = (http.clone(), edge.url("/v1/echo"));
        streams.push(tokio::spawn(async move {
            let mut statuses = Vec::new();
            for _ in 0..40 {
                statuses.push(
                    http.get(&url)
                        .send()
                        .await
                        .map(|r| r.status().as_u16())
                        .unwrap_or(0),
                );
            }
            statuses
        }));
    }
    wait_for("a third of the traffic", || {
        let metrics = edge.metrics();
        async move {
            let text = metrics.await;
            let served: u64 = text
                .lines()
                .filter(|l| l.starts_with("kingdom_edge_requests_total"))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
                .sum();
            (served >= 160).then_some(())
        }
    })
    .await;
    apis[1].kill();

    let mut failures = 0;
    for stream in streams {
        failures += stream.await.unwrap().iter().filter(|s| **s != 200).count();
    }
    assert_eq!(failures, 0, "clients saw failures");
    let status = edge.status().await;
    assert_eq!(
        backend(&status, "app", &victim)["breaker"],
        "open",
        "{status}"
    );
    let metrics = edge.metrics().await;
    assert!(
        metrics.contains(&format!(
            r#"kingdom_edge_backend_ejected{{backend="{victim}",pool="app"}} 1"#
        )),
        "{metrics}"
    );
    assert!(
        common::metric(&metrics, r#"kingdom_edge_retries_total{pool="app"}"#) > 0.0,
        "the victim's failures were retried"
    );
}

#[tokio::test]
async fn a_failing_backend_is_ejected_then_readmitted_through_half_open() {
    let good = common::toggle_upstream("good").await;
    let flaky = common::toggle_upstream("flaky").await;
    let edge = common::edge_for_pool(
        &[good.addr, flaky.addr],
        &["outlier: { consecutive_failures: 3, base_ejection: 5s }"],
    )
    .await;
    let http = client();
    flaky.failing.store(true, Ordering::SeqCst);

    // Its 503s are retried on the good backend: the client only sees 200s.
    for _ in 0..20 {
        let response = http.get(edge.url("/ok")).send().await.unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(response.headers()["x-upstream"], "good");
    }
    let status = edge.status().await;
    assert_eq!(
        backend(&status, "app", &flaky.addr.to_string())["breaker"],
        "open"
    );
    let hits_while_ejected = flaky.hits.load(Ordering::SeqCst);
    assert_eq!(hits_while_ejected, 3, "ejected after exactly 3 failures");

    // Recovered: after the ejection, one probe gets through, succeeds, and it is back.
    flaky.failing.store(false, Ordering::SeqCst);
    let flaky_label = flaky.addr.to_string();
    wait_readmitted(&edge, "flaky", &flaky_label).await;
}

#[tokio::test]
async fn post_is_not_retried_once_the_upstream_has_it() {
    let a = common::toggle_upstream("a").await;
    let b = common::toggle_upstream("b").await;
    a.failing.store(true, Ordering::SeqCst);
    b.failing.store(true, Ordering::SeqCst);
    let edge = common::edge_for_pool(&[a.addr, b.addr], &["outlier: { enabled: false }"]).await;
    let http = client();
    let hits = || a.hits.load(Ordering::SeqCst) + b.hits.load(Ordering::SeqCst);

    let response = http
        .post(edge.url("/ok"))
        .body("order")
        .send()
        .await
        .unwrap();
    assert_eq!(
        response.status(),
        503,
        "the upstream's answer, passed through"
    );
    assert_eq!(
        hits(),
        1,
        "a POST that reached an upstream is never sent again"
    );

    // The same failure on a GET is retried (once per extra attempt, on the other backend).
    let before = hits();
    let response = http.get(edge.url("/ok")).send().await.unwrap();
    assert_eq!(response.status(), 503);
    assert_eq!(hits() - before, 3, "first try plus two retries");
}

fn cookie_of(response: &reqwest::Response, name: &str) -> Option<String> {
    response
        .headers()
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find(|c| c.starts_with(&format!("{name}=")))
        .map(|c| c.split(';').next().unwrap().to_string())
}

/// `n` api processes behind a pool with the `extra` keys.
async fn sticky_edge(n: usize, extra: &[&str]) -> (Vec<ApiProcess>, common::Edge) {
    let mut apis = Vec::new();
    for _ in 0..n {
        apis.push(ApiProcess::start().await);
    }
    let addrs: Vec<_> = apis.iter().map(|a| a.addr).collect();
    let edge = common::edge_for_pool(&addrs, extra).await;
    (apis, edge)
}

/// A first request: its response, the backend it was pinned to, and the `kd_api` cookie.
async fn pin(edge: &common::Edge) -> (reqwest::Response, String, String) {
    let first = client().get(edge.url("/v1/echo")).send().await.unwrap();
    let pinned = first.headers()["x-instance"].to_str().unwrap().to_string();
    let cookie = cookie_of(&first, "kd_api").expect("a sticky cookie");
    (first, pinned, cookie)
}

#[tokio::test]
async fn sticky_sessions_stay_then_move_with_a_new_cookie_and_ignore_forgeries() {
    let (mut apis, edge) = sticky_edge(
        3,
        &[
            "sticky: { cookie: kd_api, ttl: 30m, secret: integration-sticky-secret }",
            "outlier: { consecutive_failures: 1, base_ejection: 60s }",
        ],
    )
    .await;
    let http = client();
    let (first, pinned, cookie) = pin(&edge).await;
    let raw = first.headers()["set-cookie"].to_str().unwrap().to_string();
    assert!(
        raw.contains("HttpOnly") && raw.contains("Path=/") && raw.contains("SameSite=Lax"),
        "{raw}"
    );
    assert!(!raw.contains("Secure"), "no Secure on a plain listener");

    for _ in 0..20 {
        let response = http
            .get(edge.url("/v1/echo"))
            .header("cookie", &cookie)
            .send()
            .await
            .unwrap();
        assert_eq!(response.headers()["x-instance"], pinned.as_str());
    }

    // A tampered cookie is ignored (and counted), never trusted.
    let other = apis
        .iter()
        .map(|a| a.addr.to_string())
        .find(|a| *a != pinned)
        .unwrap();
    let forged = {
        use base64::Engine;
        let value = cookie.split_once('=').unwrap().1;
        let (_, rest) = value.split_once('.').unwrap();
        let name = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&other);
        format!("kd_api={name}.{rest}")
    };
    let response = http
        .get(edge.url("/v1/echo"))
        .header("cookie", &forged)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(edge
        .metrics()
        .await
        .contains(r#"kingdom_edge_sticky_invalid_total{pool="app",reason="bad_signature"} 1"#));

    // The pinned backend dies: the session moves, with a new cookie naming its new home.
    let victim = apis
        .iter()
        .position(|a| a.addr.to_string() == pinned)
        .unwrap();
    apis[victim].kill();
    let moved = http
        .get(edge.url("/v1/echo"))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(moved.status(), 200);
    let new_home = moved.headers()["x-instance"].to_str().unwrap().to_string();
    assert_ne!(new_home, pinned);
    let new_cookie = cookie_of(&moved, "kd_api").unwrap();
    assert_ne!(new_cookie, cookie);
    for _ in 0..10 {
        let response = http
            .get(edge.url("/v1/echo"))
            .header("cookie", &new_cookie)
            .send()
            .await
            .unwrap();
        assert_eq!(response.headers()["x-instance"], new_home.as_str());
    }
}

#[tokio::test]
async fn max_in_flight_answers_503_at_once() {
    let slow = common::toggle_upstream("slow").await;
    let edge = common::edge_for_pool(&[slow.addr], &["limits: { max_in_flight: 1 }"]).await;
    let http = client();
    // The first request is held at the upstream until the second has been refused.
    slow.close();
    let first = tokio::spawn(http.get(edge.url("/ok")).send());
    wait_for("the first request to be in flight", || {
        let status = edge.status();
        async move { (status.await["pools"][0]["in_flight"] == 1).then_some(()) }
    })
    .await;
    let second = http.get(edge.url("/ok")).send().await.unwrap();
    assert_eq!(second.status(), 503);
    assert_eq!(second.headers()["retry-after"], "1");
    let body: Value = second.json().await.unwrap();
    assert_eq!(body["error"], "pool_saturated");
    slow.open();
    assert_eq!(first.await.unwrap().unwrap().status(), 200);
    assert_eq!(
        http.get(edge.url("/ok")).send().await.unwrap().status(),
        200
    );
    assert!(edge
        .metrics()
        .await
        .contains(r#"kingdom_edge_pool_rejected_total{pool="app",reason="max_in_flight"} 1"#));
}

#[tokio::test]
async fn health_checks_gate_traffic_and_show_in_status_and_metrics() {
    let up = common::toggle_upstream("up").await;
    let down = common::toggle_upstream("down").await;
    down.failing.store(true, Ordering::SeqCst);
    let edge = common::edge_for_pool(
        &[up.addr, down.addr],
        &["health_check: { path: /healthz, interval: 100ms, timeout: 500ms }"],
    )
    .await;
    let (up_label, down_label) = (up.addr.to_string(), down.addr.to_string());
    wait_for("the first health probes", || {
        let status = edge.status();
        let (u, d) = (up_label.clone(), down_label.clone());
        async move {
            let s = status.await;
            let ok = backend(&s, "app", &u)["healthy"] == true
                && backend(&s, "app", &d)["last_probe"] == "503";
            ok.then_some(())
        }
    })
    .await;
    let status = edge.status().await;
    assert_eq!(backend(&status, "app", &down_label)["healthy"], false);
    let metrics = edge.metrics().await;
    assert!(metrics.contains(&format!(
        r#"kingdom_edge_backend_healthy{{backend="{up_label}",pool="app"}} 1"#
    )));
    assert!(metrics.contains(&format!(
        r#"kingdom_edge_backend_healthy{{backend="{down_label}",pool="app"}} 0"#
    )));

    let http = client();
    for _ in 0..10 {
        let response = http.get(edge.url("/ok")).send().await.unwrap();
        assert_eq!(
            response.headers()["x-upstream"],
            "up",
            "unhealthy backends get no traffic"
        );
    }
    assert!(down.hits.load(Ordering::SeqCst) > 0, "its probes reach it");
}

#[tokio::test]
async fn health_checks_seeing_a_backend_back_up_end_its_ejection_early() {
    let good = common::toggle_upstream("good").await;
    let flaky = common::toggle_upstream("flaky").await;
    let edge = common::edge_for_pool(
        &[good.addr, flaky.addr],
        &[
            "outlier: { consecutive_failures: 2, base_ejection: 5m }",
            "health_check: { path: /healthz, interval: 100ms, rise: 1, fall: 1 }",
        ],
    )
    .await;
    let http = client();
    let flaky_label = flaky.addr.to_string();
    wait_for("both backends healthy", || {
        let status = edge.status();
        async move {
            let s = status.await;
            let healthy = s["pools"][0]["backends"]
                .as_array()?
                .iter()
                .all(|b| b["healthy"] == true);
            healthy.then_some(())
        }
    })
    .await;

    // Its requests fail until it is ejected, while its checks still pass.
    flaky.failing_requests.store(true, Ordering::SeqCst);
    wait_for("the flaky backend to be ejected", || {
        let (request, status) = (http.get(edge.url("/ok")).send(), edge.status());
        let label = flaky_label.clone();
        async move {
            let _ = request.await;
            (backend(&status.await, "app", &label)["breaker"] == "open").then_some(())
        }
    })
    .await;
    // Passing checks alone do not end the ejection; the checks seeing it down and back up do.
    flaky.failing.store(true, Ordering::SeqCst);
    wait_for("the flaky backend to be unhealthy", || {
        let status = edge.status();
        let label = flaky_label.clone();
        async move { (backend(&status.await, "app", &label)["healthy"] == false).then_some(()) }
    })
    .await;
    assert_eq!(
        backend(&edge.status().await, "app", &flaky_label)["breaker"],
        "open"
    );
    flaky.failing.store(false, Ordering::SeqCst);
    flaky.failing_requests.store(false, Ordering::SeqCst);
    wait_readmitted(&edge, "flaky", &flaky_label).await;
}

#[tokio::test]
async fn strict_stickiness_answers_503_when_the_pinned_backend_dies_and_never_re_pins() {
    let (mut apis, edge) = sticky_edge(
        2,
        &[
            "sticky: { cookie: kd_api, secret: integration-sticky-secret, strict: true }",
            "outlier: { consecutive_failures: 5 }",
        ],
    )
    .await;
    let http = client();
    let (_, pinned, cookie) = pin(&edge).await;
    let victim = apis
        .iter()
        .position(|a| a.addr.to_string() == pinned)
        .unwrap();
    apis[victim].kill();

    // Not yet ejected (5 failures needed): the first attempt fails, and so does every retry.
    for _ in 0..3 {
        let response = http
            .get(edge.url("/v1/echo"))
            .header("cookie", &cookie)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 503);
        assert!(cookie_of(&response, "kd_api").is_none(), "never re-pinned");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"], "sticky_backend_unavailable");
    }
    // Without a pin the pool still serves.
    let response = http.get(edge.url("/v1/echo")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_ne!(response.headers()["x-instance"], pinned.as_str());
}

#[tokio::test]
async fn sticky_cookies_are_sent_only_when_the_pin_changes_and_never_on_errors_or_shared_responses()
{
    let a = common::fake_upstream("a").await;
    let b = common::fake_upstream("b").await;
    let edge = common::edge_for_pool(
        &[a, b],
        &["sticky: { cookie: kd, ttl: 30m, secret: integration-sticky-secret }"],
    )
    .await;
    let http = client();
    let get = |path: &'static str, cookie: Option<String>| {
        let mut request = http.get(edge.url(path));
        if let Some(cookie) = cookie {
            request = request.header("cookie", cookie);
        }
        request.send()
    };
    // No cookie on an error or a publicly cacheable answer, even for a new client.
    let missing = get("/nope", None).await.unwrap();
    assert_eq!(missing.status(), 404);
    assert!(cookie_of(&missing, "kd").is_none());
    let shared = get("/public", None).await.unwrap();
    assert_eq!(shared.status(), 200);
    assert!(cookie_of(&shared, "kd").is_none());

    // A new client is pinned; while the cookie is fresh, it is not sent again.
    let first = get("/ok", None).await.unwrap();
    let cookie = cookie_of(&first, "kd").expect("pinned");
    for _ in 0..5 {
        let response = get("/ok", Some(cookie.clone())).await.unwrap();
        assert_eq!(
            response.headers()["x-upstream"],
            first.headers()["x-upstream"]
        );
        assert!(
            cookie_of(&response, "kd").is_none(),
            "the pin did not change"
        );
    }
}
