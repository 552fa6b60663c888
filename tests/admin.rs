//! The admin API: its token, drain, the status document and the status page.

mod common;

use std::net::SocketAddr;
use std::process::Command;
use std::sync::atomic::Ordering;

use common::{addr, free_ports, metric, wait_for, Edge};
use serde_json::Value;

const TOKEN: &str = "an-admin-token-for-the-tests";

fn yaml(p: &[u16], backends: &[SocketAddr], pool_extra: &str, admin_extra: &str) -> String {
    let list: Vec<String> = backends
        .iter()
        .map(|a| format!("{{ address: {a} }}"))
        .collect();
    format!(
        "listeners: [{{ name: public, address: 127.0.0.1:{} }}]\nadmin: {{ address: 127.0.0.1:{}{admin_extra} }}\npools:\n  app:\n    backends: [{}]\n{pool_extra}routes: [{{ name: app, match: {{ path_prefix: / }}, pool: app }}]\n",
        p[0],
        p[1],
        list.join(", ")
    )
}

#[tokio::test]
async fn posts_need_the_token_and_reads_stay_open() {
    let a = common::fake_upstream("a").await;
    let p = free_ports(2);
    let config = yaml(&p, &[a], "", ", token_env: KINGDOM_ADMIN_TOKEN");
    let edge = Edge::start_env(
        &config,
        &[("KINGDOM_ADMIN_TOKEN", TOKEN)],
        addr(p[0]),
        addr(p[1]),
    )
    .await;
    let (code, body) = edge.post("/reload", None).await;
    assert_eq!(code, 401, "{body}");
    assert_eq!(body["error"], "unauthorized");
    let (code, _) = edge.post("/reload", Some("not-the-token-at-all")).await;
    assert_eq!(code, 401);
    let (code, _) = edge
        .post(&format!("/pools/app/backends/{a}/drain"), Some(&TOKEN[1..]))
        .await;
    assert_eq!(code, 401, "a drain needs the token too");
    let response = common::client()
        .post(format!("http://{}/reload", edge.admin))
        .header("authorization", TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401, "the token without `Bearer`");
    assert!(response.headers()["www-authenticate"]
        .to_str()
        .unwrap()
        .starts_with("Bearer"));
    let metrics = edge.metrics().await;
    assert_eq!(
        metric(&metrics, "kingdom_edge_admin_auth_failures_total"),
        4.0
    );
    assert_eq!(
        metric(
            &metrics,
            r#"kingdom_edge_config_reloads_total{result="ok"}"#
        ),
        0.0,
        "nothing was reloaded"
    );
    let status = edge.status().await;
    assert_eq!(status["pools"][0]["backends"][0]["drain"], "active");

    let (code, body) = edge.post("/reload", Some(TOKEN)).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["version"], 2);
    for path in ["/health", "/ready", "/metrics", "/status", "/"] {
        let response = common::client()
            .get(format!("http://{}{path}", edge.admin))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "GET {path} needs no token");
    }
}

#[test]
fn an_admin_api_reachable_from_other_hosts_without_a_token_refuses_to_start() {
    let p = free_ports(3);
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("edge.yaml");
    let text = yaml(&p, &[addr(p[2])], "", "").replace(
        &format!("address: 127.0.0.1:{} }}", p[1]),
        &format!("address: 0.0.0.0:{} }}", p[1]),
    );
    std::fs::write(&config, text).unwrap();
    let out = Command::new(common::bin("kingdom-edge"))
        .arg("-c")
        .arg(&config)
        .env_remove("KINGDOM_ADMIN_TOKEN")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        said.contains(&format!(
            "edge.yaml:2: admin.address: 0.0.0.0:{} is reachable from other hosts: set `admin.token_env`",
            p[1]
        )),
        "{said}"
    );
    assert!(
        std::net::TcpListener::bind(("0.0.0.0", p[1])).is_ok(),
        "nothing was bound"
    );
}

/// `GET /pools/app/backends/<address>`.
async fn backend(edge: &Edge, address: SocketAddr) -> Value {
    common::get_json(&format!(
        "http://{}/pools/app/backends/{address}",
        edge.admin
    ))
    .await
}

#[tokio::test]
async fn a_drain_lets_requests_in_flight_finish_then_reports_the_backend_empty() {
    let a = common::toggle_upstream("a").await;
    let b = common::toggle_upstream("b").await;
    let p = free_ports(2);
    let sticky = "    sticky: { cookie: kd, secret: a-sticky-secret-for-tests }\n";
    let config = yaml(&p, &[a.addr, b.addr], sticky, "");
    let edge = Edge::start_ready(&config, addr(p[0]), addr(p[1])).await;
    let client = common::client();

    // A client pinned to a, and one request held at a.
    let pin = wait_for("a pin to a", || {
        let request = client.get(edge.url("/ok")).send();
        async move {
            let response = request.await.ok()?;
            (response.headers()["x-upstream"] == "a").then_some(())?;
            let set = response.headers().get("set-cookie")?.to_str().ok()?;
            Some(set.split(';').next()?.to_string())
        }
    })
    .await;
    a.close();
    let held = tokio::spawn({
        let request = client.get(edge.url("/ok")).header("cookie", &pin).send();
        async move { request.await.map(|r| r.status().as_u16()) }
    });
    wait_for("the request to reach a", || {
        let backend = backend(&edge, a.addr);
        async move { (backend.await["in_flight"] == 1).then_some(()) }
    })
    .await;

    let (code, drained) = edge
        .post(&format!("/pools/app/backends/{}/drain", a.addr), None)
        .await;
    assert_eq!(code, 200, "{drained}");
    assert_eq!(drained["drain"], "draining");
    assert_eq!(drained["in_flight"], 1);
    assert_eq!(drained["available"], false);

    // New requests, pinned or not, go elsewhere; the pinned client gets a new pin.
    let hits = a.hits.load(Ordering::SeqCst);
    for _ in 0..10 {
        let response = client.get(edge.url("/ok")).send().await.unwrap();
        assert_eq!(response.headers()["x-upstream"], "b");
    }
    let repinned = client
        .get(edge.url("/ok"))
        .header("cookie", &pin)
        .send()
        .await
        .unwrap();
    assert_eq!(repinned.headers()["x-upstream"], "b");
    assert!(
        repinned.headers().get("set-cookie").is_some(),
        "the client is re-pinned with a new cookie"
    );
    assert_eq!(a.hits.load(Ordering::SeqCst), hits, "nothing new reached a");

    // A reload that keeps a keeps it drained.
    edge.apply(&config.replace("backends: [{ address:", "backends: [{ weight: 2, address:"))
        .await;
    assert_eq!(backend(&edge, a.addr).await["drain"], "draining");

    // The request in flight finishes, and then the drain reports a empty.
    a.open();
    assert_eq!(held.await.unwrap().unwrap(), 200);
    let (code, drained) = edge
        .post(
            &format!("/pools/app/backends/{}/drain?wait=20s", a.addr),
            None,
        )
        .await;
    assert_eq!(code, 200);
    assert_eq!(drained["drain"], "drained");
    assert_eq!(drained["in_flight"], 0);

    let (code, undrained) = edge
        .post(&format!("/pools/app/backends/{}/undrain", a.addr), None)
        .await;
    assert_eq!(code, 200);
    assert_eq!(undrained["drain"], "active");
    wait_for("a to take requests again", || {
        let request = client.get(edge.url("/ok")).send();
        async move { (request.await.ok()?.headers()["x-upstream"] == "a").then_some(()) }
    })
    .await;

    let (code, missing) = edge
        .post("/pools/app/backends/127.0.0.1:1/drain", None)
        .await;
    assert_eq!(
        (code, missing["error"].as_str()),
        (404, Some("no_such_backend"))
    );
    let (code, _) = edge
        .post(&format!("/pools/nope/backends/{}/drain", a.addr), None)
        .await;
    assert_eq!(code, 404);
    let (code, _) = edge
        .post(
            &format!("/pools/app/backends/{}/drain?wait=soon", a.addr),
            None,
        )
        .await;
    assert_eq!(code, 400);
}

#[tokio::test]
async fn status_shows_pools_routes_rates_and_the_last_reload() {
    let a = common::fake_upstream("a").await;
    let p = free_ports(2);
    let edge = Edge::start_ready(&yaml(&p, &[a], "", ""), addr(p[0]), addr(p[1])).await;
    let client = common::client();
    let status = wait_for("request rates", || {
        let (requests, status) = (
            futures::future::join_all((0..20).map(|_| client.get(edge.url("/ok")).send())),
            edge.status(),
        );
        async move {
            requests.await;
            let status = status.await;
            let rate = status["routes"][0]["requests_per_second"].as_f64()?;
            (rate > 0.0).then_some(status)
        }
    })
    .await;
    assert!(
        status["pools"][0]["backends"][0]["requests_per_second"]
            .as_f64()
            .unwrap()
            > 0.0
    );
    assert_eq!(status["config"]["version"], 1);
    assert!(status["config"]["digest"].as_str().unwrap().len() == 12);
    assert!(status["uptime_seconds"].is_u64());
    assert_eq!(status["listeners"][0]["name"], "public");
    assert_eq!(status["routes"][0]["pool"], "app");
    let backend = &status["pools"][0]["backends"][0];
    for field in [
        "healthy",
        "breaker",
        "in_flight",
        "weight",
        "drain",
        "available",
    ] {
        assert!(!backend[field].is_null(), "{field}: {backend}");
    }
    assert_eq!(status["last_reload"], Value::Null);
    edge.reload().await;
    let status = edge.status().await;
    assert_eq!(status["last_reload"]["result"], "ok");
    assert_eq!(status["last_reload"]["trigger"], "admin");
    assert_eq!(status["last_reload"]["version"], 2);
}

/// Chromium's headless options for a closed network and a fresh profile.
fn chromium(profile: &std::path::Path) -> Command {
    let binary = ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .into_iter()
        .find(|b| std::path::Path::new(b).exists())
        .expect("the status page test needs Chromium: apt-get install chromium (.ci/run does)");
    let mut command = Command::new(binary);
    command.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--virtual-time-budget=5000",
        "--window-size=1200,1000",
    ]);
    command.arg(format!("--user-data-dir={}", profile.display()));
    command
}

#[tokio::test]
async fn the_status_page_renders_every_pool_in_a_browser() {
    let a = common::fake_upstream("a").await;
    let b = common::fake_upstream("b").await;
    let p = free_ports(2);
    let config = format!(
        "listeners: [{{ name: public, address: 127.0.0.1:{} }}]\nadmin: {{ address: 127.0.0.1:{} }}\npools:\n  app: {{ backends: [{{ address: {a} }}] }}\n  search: {{ backends: [{{ address: {b} }}] }}\nroutes:\n  - {{ name: search, match: {{ path_prefix: /search }}, pool: search }}\n  - {{ name: app, match: {{ path_prefix: / }}, pool: app }}\n",
        p[0], p[1]
    );
    let edge = Edge::start_ready(&config, addr(p[0]), addr(p[1])).await;
    let profile = tempfile::tempdir().unwrap();
    let url = format!("http://{}/", edge.admin);
    let page = tokio::task::spawn_blocking({
        let (profile, url) = (profile.path().to_path_buf(), url.clone());
        move || {
            chromium(&profile)
                .arg("--dump-dom")
                .arg(url)
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    let dom = String::from_utf8_lossy(&page.stdout);
    assert!(
        dom.contains("data-loaded=\"true\""),
        "the script ran and read /status: {dom}"
    );
    for pool in ["app", "search"] {
        assert!(
            dom.contains(&format!("data-pool=\"{pool}\"")),
            "pool {pool}: {dom}"
        );
    }
    assert!(
        dom.contains(&a.to_string()) && dom.contains(&b.to_string()),
        "{dom}"
    );

    let artifact = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("status-page.png");
    let _ = std::fs::remove_file(&artifact);
    let shot = tokio::task::spawn_blocking({
        let (profile, artifact) = (profile.path().to_path_buf(), artifact.clone());
        move || {
            chromium(&profile)
                .arg(format!("--screenshot={}", artifact.display()))
                .arg(url)
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    let png = std::fs::read(&artifact).unwrap_or_else(|e| {
        panic!(
            "no screenshot ({e}): {}",
            String::from_utf8_lossy(&shot.stderr)
        )
    });
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "{} bytes",
        png.len()
    );
}
