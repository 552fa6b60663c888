//! Documented behaviours end to end, one test each: panic modes, health-check kinds and
//! statuses, the ejection cap, retries turned off, consistent hashing, slow start with each
//! balancer, connect timeouts, backoff, and stop timeouts.

mod common;

use std::sync::atomic::Ordering;

use common::{client, wait_for, Edge};
use nix::sys::signal::Signal;
use serde_json::Value;

fn backends(status: &Value) -> &Vec<Value> {
    status["pools"][0]["backends"].as_array().unwrap()
}

/// Waits until `/status` shows `n` backends with `healthy` equal to `healthy`.
async fn wait_healthy(edge: &Edge, n: usize, healthy: bool) {
    wait_for(&format!("{n} backends with healthy={healthy}"), || {
        let status = edge.status();
        async move {
            let status = status.await;
            let count = backends(&status)
                .iter()
                .filter(|b| b["healthy"] == healthy && b["last_probe"] != Value::Null)
                .count();
            (count == n).then_some(())
        }
    })
    .await;
}

#[tokio::test]
async fn panic_fail_open_still_serves_and_fail_closed_answers_503() {
    // The checks probe a path the upstreams do not have: every backend is unhealthy, though
    // they answer real requests.
    let a = common::toggle_upstream("a").await;
    let b = common::toggle_upstream("b").await;
    let check = "health_check: { path: /missing, interval: 100ms }";
    let (yaml, proxy, admin) = common::pool_config(&[a.addr, b.addr], &[check, "panic: fail_open"]);
    let open = Edge::start(&yaml, proxy, admin).await;
    wait_healthy(&open, 2, false).await;
    let response = client().get(open.url("/ok")).send().await.unwrap();
    assert_eq!(
        response.status(),
        200,
        "fail_open spreads over every backend"
    );

    let (yaml, proxy, admin) =
        common::pool_config(&[a.addr, b.addr], &[check, "panic: fail_closed"]);
    let closed = Edge::start(&yaml, proxy, admin).await;
    wait_healthy(&closed, 2, false).await;
    let before = a.hits.load(Ordering::SeqCst) + b.hits.load(Ordering::SeqCst);
    let response = client().get(closed.url("/ok")).send().await.unwrap();
    assert_eq!(response.status(), 503);
    assert_eq!(response.headers()["retry-after"], "1");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"], "no_healthy_backend");
    let after = a.hits.load(Ordering::SeqCst) + b.hits.load(Ordering::SeqCst);
    assert_eq!(before, after, "nothing was sent upstream");
}

#[tokio::test]
async fn health_checks_honour_kind_statuses_rise_and_fall() {
    let up = common::toggle_upstream("up").await;
    // A TCP probe passes whatever the HTTP answer.
    up.failing.store(true, Ordering::SeqCst);
    let tcp = common::edge_for_pool(
        &[up.addr],
        &["health_check: { type: tcp, interval: 100ms }"],
    )
    .await;
    wait_healthy(&tcp, 1, true).await;
    assert_eq!(backends(&tcp.status().await)[0]["last_probe"], "connected");

    // `expected_statuses` decides what an HTTP probe accepts: 503 passes here.
    let lenient = common::edge_for_pool(
        &[up.addr],
        &["health_check: { path: /healthz, interval: 100ms, expected_statuses: [200, \"5xx\"] }"],
    )
    .await;
    wait_healthy(&lenient, 1, true).await;
    // Their probes stop: only the next proxy's reach the upstream from here on.
    drop((tcp, lenient));

    // `host` sets the probe's Host header.
    let hosted = common::edge_for_pool(
        &[up.addr],
        &["health_check: { path: /healthz, interval: 100ms, host: health.internal, expected_statuses: [\"5xx\"] }"],
    )
    .await;
    wait_healthy(&hosted, 1, true).await;
    assert_eq!(
        up.health_host.lock().unwrap().as_deref(),
        Some("health.internal")
    );
    drop(hosted);

    // Default statuses, rise 2 / fall 2: fails, then recovers.
    up.failing.store(false, Ordering::SeqCst);
    let strict = common::edge_for_pool(
        &[up.addr],
        &["health_check: { path: /healthz, interval: 100ms, rise: 2, fall: 2 }"],
    )
    .await;
    wait_healthy(&strict, 1, true).await;
    up.failing.store(true, Ordering::SeqCst);
    wait_healthy(&strict, 1, false).await;
    assert_eq!(backends(&strict.status().await)[0]["last_probe"], "503");
    up.failing.store(false, Ordering::SeqCst);
    wait_healthy(&strict, 1, true).await;
    let response = client().get(strict.url("/ok")).send().await.unwrap();
    assert_eq!(response.status(), 200);
}

/// Two upstreams that answer 503, behind a pool with the `extra` keys.
async fn failing_pair(extra: &[&str]) -> (common::Toggle, common::Toggle, Edge) {
    let a = common::toggle_upstream("a").await;
    let b = common::toggle_upstream("b").await;
    a.failing.store(true, Ordering::SeqCst);
    b.failing.store(true, Ordering::SeqCst);
    let edge = common::edge_for_pool(&[a.addr, b.addr], extra).await;
    (a, b, edge)
}

#[tokio::test]
async fn max_ejected_percent_keeps_part_of_the_pool_in_rotation() {
    let (_a, _b, edge) = failing_pair(&[
        "outlier: { consecutive_failures: 1, base_ejection: 5m, max_ejected_percent: 50 }",
        "retries: { attempts: 0 }",
    ])
    .await;
    let http = client();
    for _ in 0..10 {
        let response = http.get(edge.url("/ok")).send().await.unwrap();
        assert_eq!(response.status(), 503, "the upstream's answer");
    }
    let status = edge.status().await;
    let open = backends(&status)
        .iter()
        .filter(|b| b["breaker"] != "closed")
        .count();
    assert_eq!(open, 1, "half of two backends may be ejected: {status}");
}

#[tokio::test]
async fn retries_off_sends_each_request_once() {
    let (a, b, edge) =
        failing_pair(&["outlier: { enabled: false }", "retries: { attempts: 0 }"]).await;
    let response = client().get(edge.url("/ok")).send().await.unwrap();
    assert_eq!(response.status(), 503);
    let hits = a.hits.load(Ordering::SeqCst) + b.hits.load(Ordering::SeqCst);
    assert_eq!(hits, 1);
    let metrics = edge.metrics().await;
    assert_eq!(
        common::metric(&metrics, r#"kingdom_edge_retries_total{pool="app"}"#),
        0.0
    );
}

/// Sends `GET /ok` as `x-user: user-<user>`; returns the name of the upstream that answered.
async fn answered_by(http: &reqwest::Client, edge: &Edge, user: usize) -> String {
    let response = http
        .get(edge.url("/ok"))
        .header("x-user", format!("user-{user}"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    response.headers()["x-upstream"]
        .to_str()
        .unwrap()
        .to_string()
}

#[tokio::test]
async fn consistent_hashing_keeps_keys_and_moves_only_a_dead_owners_keys_and_back() {
    let upstreams = [
        common::toggle_upstream("a").await,
        common::toggle_upstream("b").await,
        common::toggle_upstream("c").await,
    ];
    let addrs: Vec<_> = upstreams.iter().map(|u| u.addr).collect();
    let edge = common::edge_for_pool(
        &addrs,
        &[
            "balance: consistent_hash",
            "hash_key: { header: x-user }",
            "health_check: { path: /healthz, interval: 100ms, rise: 1, fall: 1 }",
        ],
    )
    .await;
    wait_healthy(&edge, 3, true).await;
    let http = client();
    let owners = || async {
        let mut owners = Vec::new();
        for user in 0..30 {
            owners.push(answered_by(&http, &edge, user).await);
        }
        owners
    };
    let before = owners().await;
    assert_eq!(before, owners().await, "keys stay put");
    let victim = before[0].clone();
    let index = ["a", "b", "c"].iter().position(|n| *n == victim).unwrap();
    upstreams[index].failing.store(true, Ordering::SeqCst);
    wait_healthy(&edge, 1, false).await;
    let during = owners().await;
    for (x, y) in before.iter().zip(&during) {
        if *x == victim {
            assert_ne!(*y, victim);
        } else {
            assert_eq!(x, y, "a live owner's key moved");
        }
    }
    upstreams[index].failing.store(false, Ordering::SeqCst);
    wait_healthy(&edge, 3, true).await;
    assert_eq!(owners().await, before, "keys come back to their owner");
}

#[tokio::test]
async fn shutdown_timeout_ends_a_drain_with_a_request_still_in_flight() {
    let held = common::toggle_upstream("held").await;
    let p = common::free_ports(2);
    let yaml = format!(
        r#"
server: {{ shutdown_timeout: 1s }}
listeners: [{{ name: public, address: 127.0.0.1:{} }}]
admin: {{ address: 127.0.0.1:{} }}
pools: {{ held: {{ backends: [{{ address: {} }}] }} }}
routes: [{{ name: held, match: {{ path_prefix: / }}, pool: held }}]
"#,
        p[0], p[1], held.addr
    );
    let mut edge = Edge::start(&yaml, common::addr(p[0]), common::addr(p[1])).await;
    held.close();
    let request = tokio::spawn(client().get(edge.url("/ok")).send());
    wait_for("the request to be in flight", || {
        let status = edge.status();
        async move { (status.await["in_flight"] == 1).then_some(()) }
    })
    .await;
    edge.signal(Signal::SIGTERM);
    // The upstream never answers: the drain gives up after shutdown_timeout and exits.
    assert!(edge.wait_exit().await.success());
    assert!(
        request.await.unwrap().is_err(),
        "the held request was cut off"
    );
    assert!(
        edge.stderr()
            .contains("shutdown_timeout reached with requests still in flight"),
        "{}",
        edge.stderr()
    );
}

#[tokio::test]
async fn sidecars_exit_when_the_proxy_is_killed() {
    let p = common::free_ports(3);
    let api = format!("127.0.0.1:{}", p[2]);
    let yaml = format!(
        r#"
listeners: [{{ name: public, address: 127.0.0.1:{} }}]
admin: {{ address: 127.0.0.1:{} }}
sidecars:
  - {{ name: api, command: kingdom-api, addresses: [{api}], env: {{ KINGDOM_API_SECRET: integration-test-secret }} }}
pools: {{ api: {{ backends: [{{ address: {api} }}] }} }}
routes: [{{ name: api, match: {{ path_prefix: / }}, pool: api }}]
"#,
        p[0], p[1]
    );
    let mut edge = Edge::start_ready(&yaml, common::addr(p[0]), common::addr(p[1])).await;
    let status = edge.status().await;
    let sidecar = status["sidecars"][0]["pid"].as_i64().unwrap() as i32;
    edge.signal(Signal::SIGKILL);
    edge.wait_exit().await;
    // No chance to stop it: the sidecar notices its stdin closing and exits by itself.
    wait_for("the orphaned sidecar to exit", || {
        std::future::ready(exited(sidecar).then_some(()))
    })
    .await;
}

/// Whether process `pid` is gone or a zombie (exited, waiting for whoever adopted it).
fn exited(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name.
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with(['Z', 'X'])),
        Err(_) => true,
    }
}

#[tokio::test]
async fn least_connections_steers_away_from_a_backend_holding_a_request() {
    let fast = common::toggle_upstream("fast").await;
    let slow = common::toggle_upstream("slow").await;
    let edge =
        common::edge_for_pool(&[fast.addr, slow.addr], &["balance: least_connections"]).await;
    let http = client();
    slow.close();
    let hits = || fast.hits.load(Ordering::SeqCst) + slow.hits.load(Ordering::SeqCst);
    let mut held = Vec::new();
    // One request at a time: idle backends tie, so the first requests go either way, until
    // one is held by the slow backend; from then on it has more in flight, and none follow.
    for sent in 1..=30 {
        let request = tokio::spawn(http.get(edge.url("/ok")).send());
        wait_for("the request to arrive", || {
            std::future::ready((hits() == sent).then_some(()))
        })
        .await;
        if slow.hits.load(Ordering::SeqCst) > held.len() {
            held.push(request);
        } else {
            assert_eq!(request.await.unwrap().unwrap().status(), 200);
        }
    }
    assert_eq!(held.len(), 1, "only one request went to the busy backend");
    slow.open();
    for request in held {
        assert_eq!(request.await.unwrap().unwrap().status(), 200);
    }
}

#[tokio::test]
async fn idle_upstream_connections_are_closed_after_timeouts_idle() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // A keep-alive upstream that counts the connections closed on it.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = listener.local_addr().unwrap();
    let closed = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = closed.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let counter = counter.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let mut served = false;
                loop {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(_) => {
                            served = true;
                            let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                            if stream.write_all(answer).await.is_err() {
                                break;
                            }
                        }
                    }
                }
                // Readiness probes connect and leave without a request: not counted.
                if served {
                    counter.fetch_add(1, Ordering::SeqCst);
                }
            });
        }
    });
    let edge = common::edge_for_pool(&[upstream], &["timeouts: { idle: 200ms }"]).await;
    let response = client().get(edge.url("/x")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    // The pooled connection is closed by the proxy once idle (the default would be 60 s).
    wait_for("the idle upstream connection to be closed", || {
        std::future::ready((closed.load(Ordering::SeqCst) >= 1).then_some(()))
    })
    .await;
}

/// Takes backend `b` of a two-backend pool down and back up through its health checks, then
/// sends `count` requests one at a time (each with its own `x-user`) and returns how many
/// `b` answered.
async fn share_after_recovery(balance: &str, slow_start: Option<&str>, count: usize) -> usize {
    let a = common::toggle_upstream("a").await;
    let b = common::toggle_upstream("b").await;
    let balance = format!("balance: {balance}");
    let ramp = slow_start.map(|d| format!("slow_start: {d}"));
    let mut extra = vec![
        balance.as_str(),
        "health_check: { path: /healthz, interval: 100ms, rise: 1, fall: 1 }",
    ];
    extra.extend(ramp.as_deref());
    if balance.ends_with("consistent_hash") {
        extra.push("hash_key: { header: x-user }");
    }
    let edge = common::edge_for_pool(&[a.addr, b.addr], &extra).await;
    wait_healthy(&edge, 2, true).await;
    b.failing.store(true, Ordering::SeqCst);
    wait_healthy(&edge, 1, false).await;
    b.failing.store(false, Ordering::SeqCst);
    wait_healthy(&edge, 2, true).await;
    let http = client();
    let mut from_b = 0;
    for user in 0..count {
        from_b += usize::from(answered_by(&http, &edge, user).await == "b");
    }
    from_b
}

#[tokio::test]
async fn slow_start_ramps_a_recovered_backend_with_every_balancer() {
    // With a 10-minute window the recovered backend stays near its initial 10% of the weight
    // for the whole test: about 9% of the requests (a full share is 50%). It must get some,
    // or least connections' starvation is back, and well under half, or the ramp is ignored.
    const COUNT: usize = 400;
    for balance in [
        "weighted_round_robin",
        "least_connections",
        "consistent_hash",
    ] {
        let ramped = share_after_recovery(balance, Some("10m"), COUNT).await;
        assert!(
            (1..=COUNT / 4).contains(&ramped),
            "{balance}: the recovering backend answered {ramped} of {COUNT}"
        );
        // The control: without slow start the same recovery gets a full share at once.
        let full = share_after_recovery(balance, None, COUNT).await;
        assert!(
            full > COUNT / 3,
            "{balance}: without slow start it answered only {full} of {COUNT}"
        );
    }
}

/// A listener whose accept queue is full: connections to it are never established (the
/// kernel drops their SYNs), so a connect hangs until the connector gives up.
async fn blackhole() -> (tokio::net::TcpListener, Vec<tokio::net::TcpStream>) {
    use std::time::Duration;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(common::addr(0)).unwrap();
    let listener = socket.listen(0).unwrap();
    let address = listener.local_addr().unwrap();
    let mut queued = Vec::new();
    loop {
        let connect = tokio::net::TcpStream::connect(address);
        match tokio::time::timeout(Duration::from_millis(300), connect).await {
            Ok(stream) => queued.push(stream.unwrap()),
            Err(_) => return (listener, queued),
        }
        assert!(queued.len() < 16, "the accept queue never filled");
    }
}

#[tokio::test]
async fn a_connect_timeout_answers_504_and_counts_a_timeout() {
    let (hole, _queued) = blackhole().await;
    let address = hole.local_addr().unwrap();
    let (yaml, proxy, admin) = common::pool_config(
        &[address],
        &["timeouts: { connect: 200ms }", "retries: { attempts: 0 }"],
    );
    let edge = Edge::start(&yaml, proxy, admin).await;
    let response = client().get(edge.url("/ok")).send().await.unwrap();
    assert_eq!(response.status(), 504);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"], "upstream_timeout");
    let series = format!(
        "kingdom_edge_upstream_requests_total{{backend=\"{address}\",outcome=\"timeout\",pool=\"app\"}}"
    );
    assert_eq!(common::metric(&edge.metrics().await, &series), 1.0);
}

#[tokio::test]
async fn a_retry_waits_out_its_backoff_and_no_wait_outlasts_timeouts_total() {
    // A backoff drawn from [0, 1000h) is longer than the 1s total with near certainty
    // (one chance in 3.6 million otherwise): the first attempt's 503 is followed by a wait
    // the deadline cuts short, and no second attempt.
    let up = common::toggle_upstream("up").await;
    up.failing.store(true, Ordering::SeqCst);
    let edge = common::edge_for_pool(
        &[up.addr],
        &[
            "retries: { attempts: 2, backoff: { base: 1000h, max: 1000h } }",
            "timeouts: { total: 1s }",
        ],
    )
    .await;
    let before = up.hits.load(Ordering::SeqCst);
    let response = client().get(edge.url("/ok")).send().await.unwrap();
    assert_eq!(response.status(), 504);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"], "upstream_timeout");
    assert_eq!(up.hits.load(Ordering::SeqCst) - before, 1, "one attempt");
    let retries = "kingdom_edge_retries_total{pool=\"app\"}";
    assert_eq!(common::metric(&edge.metrics().await, retries), 1.0);
}
