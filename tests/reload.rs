//! Reloading the config while the proxy serves: under load, with tunnels and HTTP/2
//! connections open, with a broken file, through each trigger, keeping the state of what did
//! not change, holding back what needs a restart, and replacing certificates.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{addr, free_ports, metric, wait_for, Edge};
use nix::sys::signal::Signal;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A config with one pool `app`, routed from `/`, over `backends` (address and weight), and
/// the extra pool keys in `extra`.
fn config(p: &[u16], backends: &[(SocketAddr, u32)], extra: &str) -> String {
    let list: Vec<String> = backends
        .iter()
        .map(|(a, w)| format!("{{ address: {a}, weight: {w} }}"))
        .collect();
    format!(
        "listeners: [{{ name: public, address: 127.0.0.1:{} }}]\nadmin: {{ address: 127.0.0.1:{} }}\npools:\n  app:\n    backends: [{}]\n{extra}routes: [{{ name: app, match: {{ path_prefix: / }}, pool: app }}]\n",
        p[0],
        p[1],
        list.join(", ")
    )
}

/// Which upstream answered `n` sequential `GET /ok`s.
async fn distribution(edge: &Edge, n: usize) -> HashMap<String, usize> {
    let client = common::client();
    let mut seen = HashMap::new();
    for _ in 0..n {
        let response = client.get(edge.url("/ok")).send().await.unwrap();
        assert_eq!(response.status(), 200);
        let name = response.headers()["x-upstream"]
            .to_str()
            .unwrap()
            .to_string();
        *seen.entry(name).or_default() += 1;
    }
    seen
}

#[tokio::test]
async fn twenty_reloads_under_load_fail_no_request_and_the_new_weights_apply() {
    let a = common::fake_upstream("a").await;
    let b = common::fake_upstream("b").await;
    let c = common::fake_upstream("c").await;
    let p = free_ports(2);
    let edge = Edge::start_ready(&config(&p, &[(a, 1), (b, 1)], ""), addr(p[0]), addr(p[1])).await;

    let stop = Arc::new(AtomicBool::new(false));
    let (sent, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let mut load = Vec::new();
    for _ in 0..4 {
        let (stop, sent, failed) = (stop.clone(), sent.clone(), failed.clone());
        let url = edge.url("/ok");
        load.push(tokio::spawn(async move {
            let client = common::client();
            while !stop.load(Ordering::Relaxed) {
                let ok = match client.get(&url).send().await {
                    Ok(response) => response.status() == 200 && response.text().await.is_ok(),
                    Err(_) => false,
                };
                sent.fetch_add(1, Ordering::Relaxed);
                if !ok {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }

    // Weights change, backends come and go; every reload lands while requests flow.
    let shapes: [&[(SocketAddr, u32)]; 4] = [
        &[(a, 2), (b, 1), (c, 1)],
        &[(a, 1), (c, 3)],
        &[(b, 2), (c, 1)],
        &[(a, 1), (b, 1)],
    ];
    for i in 0..20 {
        let before = sent.load(Ordering::Relaxed);
        wait_for("requests between reloads", || {
            let now = sent.load(Ordering::Relaxed);
            std::future::ready((now >= before + 25).then_some(()))
        })
        .await;
        edge.rewrite(&config(&p, shapes[i % 4], ""));
        let (code, report) = edge.reload().await;
        assert_eq!(code, 200, "{report}");
        assert_eq!(report["result"], "ok");
    }
    stop.store(true, Ordering::Relaxed);
    for task in load {
        task.await.unwrap();
    }
    let (sent, failed) = (sent.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    assert_eq!(
        failed, 0,
        "{failed} of {sent} requests failed across 20 reloads"
    );
    assert!(sent >= 500, "only {sent} requests were sent");

    edge.rewrite(&config(&p, &[(a, 3), (c, 1)], ""));
    assert_eq!(edge.reload().await.0, 200);
    let seen = distribution(&edge, 400).await;
    assert_eq!(seen.get("a"), Some(&300), "{seen:?}");
    assert_eq!(seen.get("c"), Some(&100), "{seen:?}");
    assert_eq!(
        seen.get("b"),
        None,
        "a removed backend gets nothing: {seen:?}"
    );
}

async fn echo(stream: &mut tokio::net::TcpStream, message: &[u8]) {
    stream.write_all(message).await.unwrap();
    let mut back = vec![0u8; message.len()];
    tokio::time::timeout(common::DEADLINE, stream.read_exact(&mut back))
        .await
        .expect("the echo")
        .expect("the tunnel is open");
    assert_eq!(back, message);
}

#[tokio::test]
async fn a_websocket_tunnel_and_an_http2_connection_outlive_reloads() {
    let ws = common::websocket_echo_upstream().await;
    let other = common::fake_upstream("other").await;
    let p = free_ports(2);
    let yaml = |backend: SocketAddr| {
        format!(
            "listeners: [{{ name: public, address: 127.0.0.1:{}, h2c: true }}]\nadmin: {{ address: 127.0.0.1:{} }}\npools:\n  ws: {{ backends: [{{ address: {backend} }}] }}\n  app: {{ backends: [{{ address: {other} }}] }}\nroutes:\n  - {{ name: ws, match: {{ path_prefix: /ws }}, pool: ws }}\n  - {{ name: app, match: {{ path_prefix: / }}, pool: app }}\n",
            p[0], p[1]
        )
    };
    let mut edge = Edge::start_ready(&yaml(ws), addr(p[0]), addr(p[1])).await;
    let mut tunnel = common::open_websocket(edge.proxy, "/ws").await;
    echo(&mut tunnel, b"before the reload").await;

    // One HTTP/2 connection (prior knowledge), used before and after the reloads.
    let tcp = tokio::net::TcpStream::connect(edge.proxy).await.unwrap();
    let (h2, connection) = h2::client::handshake(tcp).await.unwrap();
    let connection = tokio::spawn(connection);
    let get = |mut h2: h2::client::SendRequest<bytes::Bytes>| async move {
        h2 = h2.ready().await.unwrap();
        let request = http::Request::get("http://edge.test/ok").body(()).unwrap();
        let (response, _) = h2.send_request(request, true).unwrap();
        let response = response.await.expect("the HTTP/2 connection is open");
        assert_eq!(response.status(), 200);
        h2
    };
    let h2 = get(h2).await;

    // The tunnel's backend is even removed from its pool: the tunnel stays with it.
    let elsewhere = common::websocket_echo_upstream().await;
    edge.apply(&yaml(elsewhere)).await;
    edge.signal(Signal::SIGHUP);
    edge.wait_metric(r#"kingdom_edge_config_reloads_total{result="ok"}"#, 2.0)
        .await;
    echo(&mut tunnel, b"after two reloads").await;
    let h2 = get(h2).await;
    drop(h2);
    assert!(
        !connection.is_finished(),
        "the HTTP/2 connection was not closed"
    );
    // A new tunnel goes to the new backend, and works too.
    echo(
        &mut common::open_websocket(edge.proxy, "/ws").await,
        b"a new tunnel",
    )
    .await;
    assert!(
        edge.try_wait().is_none(),
        "SIGHUP reloads and never ends the process"
    );
}

#[tokio::test]
async fn a_broken_file_changes_nothing_and_says_why() {
    let a = common::fake_upstream("a").await;
    let p = free_ports(2);
    let good = config(&p, &[(a, 1)], "");
    let edge = Edge::start_ready(&good, addr(p[0]), addr(p[1])).await;
    let before = edge.status().await;

    // A route to a pool that does not exist, on line 6.
    let broken = good.replace("pool: app }]", "pool: apii }]");
    edge.rewrite(&broken);
    edge.wait_metric(r#"kingdom_edge_config_reloads_total{result="error"}"#, 1.0)
        .await;
    let status = edge.status().await;
    assert_eq!(
        status["config"], before["config"],
        "the old config is in force"
    );
    let report = &status["last_reload"];
    assert_eq!(report["result"], "error");
    assert_eq!(report["trigger"], "file");
    assert_eq!(report["errors"][0]["path"], "routes[0].pool");
    assert_eq!(report["errors"][0]["line"], 6);
    assert!(
        report["errors"][0]["message"]
            .as_str()
            .unwrap()
            .contains("no pool named `apii`"),
        "{report}"
    );
    let served = common::client().get(edge.url("/ok")).send().await.unwrap();
    assert_eq!(served.status(), 200, "the old config keeps serving");

    // Asked explicitly, the admin API answers with the errors.
    let (code, report) = edge.reload().await;
    assert_eq!(code, 422, "{report}");
    assert_eq!(report["result"], "error");
    assert_eq!(report["version"], 1);
    assert_eq!(report["errors"][0]["path"], "routes[0].pool");
    let metrics = edge.metrics().await;
    assert_eq!(
        metric(
            &metrics,
            r#"kingdom_edge_config_reloads_total{result="error"}"#
        ),
        2.0
    );
    assert_eq!(
        metric(
            &metrics,
            r#"kingdom_edge_config_reloads_total{result="ok"}"#
        ),
        0.0
    );
    assert!(edge.stderr().contains("config reload refused"));

    // Fixed, it applies.
    assert_eq!(edge.apply(&good.replace("weight: 1", "weight: 2")).await, 2);
}

/// Waits past the watcher's debounce and checks that exactly one reload happened, and it
/// applied: a second, or a refused half-written file, would show in the counters.
async fn assert_exactly_one_reload(edge: &Edge) {
    // Proving that nothing more happens needs a pause: several debounce windows.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let metrics = edge.metrics().await;
    assert_eq!(
        metric(
            &metrics,
            r#"kingdom_edge_config_reloads_total{result="ok"}"#
        ),
        1.0
    );
    assert_eq!(
        metric(
            &metrics,
            r#"kingdom_edge_config_reloads_total{result="error"}"#
        ),
        0.0
    );
}

#[tokio::test]
async fn saving_by_rename_triggers_exactly_one_reload() {
    let a = common::fake_upstream("a").await;
    let p = free_ports(2);
    let edge = Edge::start_ready(&config(&p, &[(a, 1)], ""), addr(p[0]), addr(p[1])).await;
    // An editor's way: a swap file written, then renamed over the original.
    let version = edge.apply(&config(&p, &[(a, 5)], "")).await;
    assert_eq!(version, 2);
    assert_exactly_one_reload(&edge).await;
    let status = edge.status().await;
    assert_eq!(status["last_reload"]["trigger"], "file");
    assert_eq!(
        status["last_reload"]["changes"]["weights_changed"][0],
        format!("app/{a}")
    );
    let log = edge.stderr();
    assert!(
        log.contains(&format!("config reloaded: weights changed 1 (app/{a})")),
        "one line says what changed: {log}"
    );
    // Touching the file without changing it reloads nothing.
    let text = std::fs::read_to_string(edge.config_path()).unwrap();
    edge.rewrite(&text);
    assert_exactly_one_reload(&edge).await;
}

#[tokio::test]
async fn a_configmap_symlink_swap_triggers_exactly_one_reload() {
    let a = common::fake_upstream("a").await;
    let p = free_ports(2);
    // Kubernetes mounts a ConfigMap as `edge.yaml -> ..data/edge.yaml`, `..data -> ..v1`, and
    // updates it by writing `..v2` and renaming a new `..data` symlink over the old one.
    let dir = tempfile::tempdir().unwrap();
    let mount = dir.path().to_path_buf();
    let version = |name: &str, yaml: &str| {
        std::fs::create_dir(mount.join(name)).unwrap();
        std::fs::write(mount.join(name).join("edge.yaml"), yaml).unwrap();
    };
    version("..v1", &config(&p, &[(a, 1)], ""));
    std::os::unix::fs::symlink("..v1", mount.join("..data")).unwrap();
    std::os::unix::fs::symlink("..data/edge.yaml", mount.join("edge.yaml")).unwrap();
    let config_path = mount.join("edge.yaml");
    let edge = Edge::start_at(
        &common::bin("kingdom-edge"),
        dir,
        &config_path,
        &[],
        addr(p[0]),
        addr(p[1]),
    )
    .await;
    edge.wait_ready().await;

    let next = config(&p, &[(a, 7)], "");
    version("..v2", &next);
    std::os::unix::fs::symlink("..v2", mount.join("..data_tmp")).unwrap();
    std::fs::rename(mount.join("..data_tmp"), mount.join("..data")).unwrap();
    std::fs::remove_dir_all(mount.join("..v1")).unwrap();
    assert_eq!(
        edge.wait_digest(&kingdom_edge::snapshot::digest_of(&next))
            .await,
        2
    );
    assert_exactly_one_reload(&edge).await;
}

/// The value of a backend's field in `/status`.
fn backend_field(
    status: &serde_json::Value,
    address: SocketAddr,
    field: &str,
) -> serde_json::Value {
    status["pools"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["backends"].as_array().unwrap())
        .find(|b| b["address"] == address.to_string())
        .map_or(serde_json::Value::Null, |b| b[field].clone())
}

#[tokio::test]
async fn a_reload_keeps_breakers_and_pins_checks_new_backends_first_and_retires_old_series() {
    let a = common::toggle_upstream("a").await;
    let b = common::toggle_upstream("b").await;
    let c = common::toggle_upstream("c").await;
    let d = common::toggle_upstream("d").await;
    let p = free_ports(2);
    let policies = "    health_check: { path: /healthz, interval: 200ms, rise: 1, fall: 1 }\n    outlier: { consecutive_failures: 2, base_ejection: 60s, max_ejection: 60s, max_ejected_percent: 100 }\n    sticky: { cookie: kd, secret: a-sticky-secret-for-tests }\n    retries: { attempts: 0 }\n";
    let three = [(a.addr, 1), (b.addr, 1), (c.addr, 1)];
    let edge = Edge::start_ready(&config(&p, &three, policies), addr(p[0]), addr(p[1])).await;
    let client = common::client();

    // b fails requests (not its checks) until its breaker opens.
    b.failing_requests.store(true, Ordering::SeqCst);
    wait_for("b's breaker to open", || {
        let (request, status) = (client.get(edge.url("/ok")).send(), edge.status());
        async move {
            let _ = request.await;
            (backend_field(&status.await, b.addr, "breaker") == "open").then_some(())
        }
    })
    .await;
    b.failing_requests.store(false, Ordering::SeqCst);

    // A client pinned to c.
    let cookie = wait_for("a pin to c", || {
        let request = client.get(edge.url("/ok")).send();
        async move {
            let response = request.await.ok()?;
            if response.headers()["x-upstream"] != "c" {
                return None;
            }
            let set = response.headers().get("set-cookie")?.to_str().ok()?;
            Some(set.split(';').next()?.to_string())
        }
    })
    .await;

    // The reload changes a's weight and adds d, whose checks fail at first.
    d.failing.store(true, Ordering::SeqCst);
    let four = [(a.addr, 2), (b.addr, 1), (c.addr, 1), (d.addr, 1)];
    assert_eq!(edge.apply(&config(&p, &four, policies)).await, 2);
    let status = edge.status().await;
    assert_eq!(
        backend_field(&status, b.addr, "breaker"),
        "open",
        "the breaker survives"
    );
    for _ in 0..20 {
        let response = client
            .get(edge.url("/ok"))
            .header("cookie", &cookie)
            .send()
            .await
            .unwrap();
        assert_eq!(response.headers()["x-upstream"], "c", "the pin survives");
        assert!(
            response.headers().get("set-cookie").is_none(),
            "and needs no new cookie"
        );
    }
    wait_for("d to be probed", || {
        std::future::ready((d.hits.load(Ordering::SeqCst) >= 2).then_some(()))
    })
    .await;
    assert_eq!(
        backend_field(&edge.status().await, d.addr, "healthy"),
        false
    );
    let before = d.hits.load(Ordering::SeqCst);
    let seen = distribution(&edge, 40).await;
    assert_eq!(
        seen.get("d"),
        None,
        "an unchecked new backend takes no traffic: {seen:?}"
    );
    assert!(
        d.hits.load(Ordering::SeqCst) - before < 5,
        "only its checks reached d"
    );
    d.failing.store(false, Ordering::SeqCst);
    wait_for("d to pass its checks and take traffic", || {
        let request = client.get(edge.url("/ok")).send();
        async move {
            let response = request.await.ok()?;
            (response.headers()["x-upstream"] == "d").then_some(())
        }
    })
    .await;

    // Removing a retires its series once no request holds it.
    let metrics = edge.metrics().await;
    assert!(metrics.contains(&format!("backend=\"{}\"", a.addr)));
    let without_a = [(b.addr, 1), (c.addr, 1), (d.addr, 1)];
    edge.apply(&config(&p, &without_a, policies)).await;
    wait_for("a's series to be retired", || {
        let metrics = edge.metrics();
        let gone = format!("backend=\"{}\"", a.addr);
        async move { (!metrics.await.contains(&gone)).then_some(()) }
    })
    .await;
    let status = edge.status().await;
    assert_eq!(
        backend_field(&status, a.addr, "address"),
        serde_json::Value::Null
    );
    assert_eq!(
        status["last_reload"]["changes"]["backends_removed"][0],
        format!("app/{}", a.addr)
    );
}

#[tokio::test]
async fn removing_a_pools_checks_makes_its_backends_eligible_and_new_intervals_apply() {
    let a = common::toggle_upstream("a").await;
    let p = free_ports(2);
    let checked = "    health_check: { path: /healthz, interval: 100ms, rise: 1, fall: 1 }\n    panic: fail_closed\n";
    let edge =
        Edge::start_ready(&config(&p, &[(a.addr, 1)], checked), addr(p[0]), addr(p[1])).await;
    a.failing.store(true, Ordering::SeqCst);
    wait_for("a to fail its checks", || {
        let status = edge.status();
        async move { (backend_field(&status.await, a.addr, "healthy") == false).then_some(()) }
    })
    .await;
    let refused = common::client().get(edge.url("/ok")).send().await.unwrap();
    assert_eq!(refused.status(), 503, "fail_closed with no healthy backend");

    // A longer interval applies at once: the probes slow down.
    let slow = checked.replace("100ms", "1h");
    edge.apply(&config(&p, &[(a.addr, 1)], &slow)).await;
    let hits = a.hits.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(
        a.hits.load(Ordering::SeqCst) <= hits + 1,
        "probes every 100ms would have hit a about 6 times"
    );

    // Without checks, a is trusted again: its requests go through.
    a.failing.store(false, Ordering::SeqCst);
    edge.apply(&config(&p, &[(a.addr, 1)], "    panic: fail_closed\n"))
        .await;
    let served = common::client().get(edge.url("/ok")).send().await.unwrap();
    assert_eq!(served.status(), 200);
    assert_eq!(backend_field(&edge.status().await, a.addr, "healthy"), true);
}

#[tokio::test]
async fn settings_that_need_a_restart_are_held_back_and_the_rest_applies() {
    let a = common::fake_upstream("a").await;
    let b = common::fake_upstream("b").await;
    let p = free_ports(3);
    let edge = Edge::start_ready(&config(&p, &[(a, 1)], ""), addr(p[0]), addr(p[1])).await;
    let moved = config(&p, &[(a, 1), (b, 1)], "")
        .replace(
            &format!("127.0.0.1:{}", p[0]),
            &format!("127.0.0.1:{}", p[2]),
        )
        .replacen("listeners:", "server: { threads: 3 }\nlisteners:", 1);
    edge.rewrite(&moved);
    let (code, report) = edge.reload().await;
    assert_eq!(code, 200, "{report}");
    let held: Vec<&str> = report["needs_restart"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["key"].as_str().unwrap())
        .collect();
    assert!(held.contains(&"listeners[0].address"), "{report}");
    assert!(held.contains(&"server.threads"), "{report}");
    assert_eq!(report["changes"]["backends_added"][0], format!("app/{b}"));
    // The listener stays where it was; the new backend serves.
    let seen = distribution(&edge, 10).await;
    assert_eq!(seen.get("b"), Some(&5), "{seen:?}");
    assert!(tokio::net::TcpStream::connect(addr(p[2])).await.is_err());
    let status = edge.status().await;
    assert_eq!(
        status["listeners"][0]["address"],
        format!("127.0.0.1:{}", p[0])
    );
}

#[tokio::test]
async fn certificates_reload_when_their_files_change() {
    let a = common::fake_upstream("a").await;
    let p = free_ports(3);
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display();
    let old = common::self_signed(dir.path(), "edge", &["old.test"]);
    let yaml = format!(
        "listeners:\n  - {{ name: public, address: 127.0.0.1:{} }}\n  - {{ name: tls, address: 127.0.0.1:{}, tls: {{ certificates: [{{ cert: {d}/edge.crt, key: {d}/edge.key }}] }} }}\nadmin: {{ address: 127.0.0.1:{} }}\npools: {{ app: {{ backends: [{{ address: {a} }}] }} }}\nroutes: [{{ name: app, match: {{ path_prefix: / }}, pool: app }}]\n",
        p[0], p[1], p[2]
    );
    let edge = Edge::start_ready(&yaml, addr(p[0]), addr(p[2])).await;
    let new_dir = tempfile::tempdir().unwrap();
    let new = common::self_signed(new_dir.path(), "edge", &["new.test"]);
    // A fresh client each time: a new handshake sees the certificate served now.
    let fetch = |host: &'static str| {
        let client = reqwest::Client::builder()
            .no_proxy()
            .use_rustls_tls()
            .add_root_certificate(reqwest::Certificate::from_pem(old.as_bytes()).unwrap())
            .add_root_certificate(reqwest::Certificate::from_pem(new.as_bytes()).unwrap())
            .resolve(host, addr(p[1]))
            .timeout(Duration::from_secs(20))
            .build()
            .unwrap();
        let url = format!("https://{host}:{}/ok", p[1]);
        async move { client.get(url).send().await.map(|r| r.status().as_u16()) }
    };
    assert_eq!(fetch("old.test").await.unwrap(), 200);
    assert!(
        fetch("new.test").await.is_err(),
        "old.test's certificate does not cover new.test"
    );

    // Renamed into place, key first, as certbot's deploy hooks and cert-manager do.
    for file in ["edge.key", "edge.crt"] {
        std::fs::copy(new_dir.path().join(file), dir.path().join(".staged")).unwrap();
        std::fs::rename(dir.path().join(".staged"), dir.path().join(file)).unwrap();
    }
    wait_for("the new certificate to be served", || {
        let attempt = fetch("new.test");
        async move { attempt.await.ok().filter(|s| *s == 200) }
    })
    .await;
    let status = edge.status().await;
    assert_eq!(
        status["last_reload"]["result"], "ok",
        "{}",
        status["last_reload"]
    );
    assert_eq!(status["last_reload"]["trigger"], "file");
}

/// The sidecar processes `/status` lists: address and pid.
async fn sidecars(edge: &Edge) -> HashMap<String, Option<u64>> {
    let status = edge.status().await;
    status["sidecars"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["address"].as_str().unwrap().to_string(),
                s["pid"].as_u64(),
            )
        })
        .collect()
}

#[tokio::test]
async fn sidecars_follow_the_config_added_removed_and_changed() {
    let p = free_ports(4);
    let (x, y) = (addr(p[2]), addr(p[3]));
    let yaml = |sidecars: &str| {
        format!(
            "listeners: [{{ name: public, address: 127.0.0.1:{} }}]\nadmin: {{ address: 127.0.0.1:{} }}\nsidecars:\n{sidecars}pools: {{ api: {{ backends: [{{ address: {x} }}] }} }}\nroutes: [{{ name: api, match: {{ path_prefix: / }}, pool: api }}]\n",
            p[0], p[1]
        )
    };
    let env = "env: { KINGDOM_API_SECRET: integration-test-secret }";
    let one = format!("  - {{ name: api, command: kingdom-api, addresses: [{x}], {env} }}\n");
    let edge = Edge::start_ready(&yaml(&one), addr(p[0]), addr(p[1])).await;
    let running = |address: SocketAddr| async move {
        let response = common::client()
            .get(format!("http://{address}/healthz"))
            .send()
            .await
            .ok()?;
        Some(response.headers().get("x-instance")?.to_str().ok()? == address.to_string())
    };
    wait_for(
        "x to run",
        || async move { running(x).await.filter(|r| *r) },
    )
    .await;
    let first_x = sidecars(&edge).await[&x.to_string()];

    // Added: y starts; x is left alone.
    let two = format!("  - {{ name: api, command: kingdom-api, addresses: [{x}, {y}], {env} }}\n");
    edge.apply(&yaml(&two)).await;
    wait_for(
        "y to run",
        || async move { running(y).await.filter(|r| *r) },
    )
    .await;
    assert_eq!(
        sidecars(&edge).await[&x.to_string()],
        first_x,
        "x kept running"
    );

    // Changed (new arguments): x is restarted; y is removed and stops.
    let changed = format!(
        "  - {{ name: api, command: kingdom-api, addresses: [{x}], args: [--latency, 1ms], {env} }}\n"
    );
    edge.apply(&yaml(&changed)).await;
    wait_for("y to stop", || async move {
        tokio::net::TcpStream::connect(y)
            .await
            .is_err()
            .then_some(())
    })
    .await;
    wait_for("x to be restarted", || {
        let edge = &edge;
        async move {
            let pid = sidecars(edge).await.get(&x.to_string()).copied()??;
            (Some(pid) != first_x && running(x).await == Some(true)).then_some(())
        }
    })
    .await;
    let listed = sidecars(&edge).await;
    assert_eq!(listed.len(), 1, "{listed:?}");
    let metrics = edge.metrics().await;
    assert!(
        !metrics.contains(&format!("address=\"{y}\"")),
        "y's series are retired"
    );
    let changes = edge.status().await["last_reload"]["changes"].clone();
    assert_eq!(changes["sidecars_removed"][0], format!("api/{y}"));
    assert_eq!(changes["sidecars_changed"][0], format!("api/{x}"));
}

#[tokio::test]
async fn the_access_log_follows_its_output() {
    let a = common::fake_upstream("a").await;
    let p = free_ports(2);
    let base = config(&p, &[(a, 1)], "");
    let edge = Edge::start_ready(
        &format!("{base}access_log: {{ output: off }}\n"),
        addr(p[0]),
        addr(p[1]),
    )
    .await;
    let file = edge.dir.path().join("access.log");
    let client = common::client();
    client.get(edge.url("/ok?before")).send().await.unwrap();
    edge.apply(&format!(
        "{base}access_log: {{ output: {} }}\n",
        file.display()
    ))
    .await;
    client.get(edge.url("/ok?during")).send().await.unwrap();
    wait_for("the line in the new file", || {
        let text = std::fs::read_to_string(&file).unwrap_or_default();
        std::future::ready(text.contains("\"query\":\"during\"").then_some(()))
    })
    .await;
    edge.apply(&format!("{base}access_log: {{ output: off }}\n"))
        .await;
    client.get(edge.url("/ok?after")).send().await.unwrap();
    // The line for ?after would be written within a batch window; proving it is not needs a
    // pause.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(
        !text.contains("before") && !text.contains("after"),
        "{text}"
    );
    assert_eq!(text.lines().count(), 1, "{text}");
}

#[tokio::test]
async fn a_backend_removed_and_added_back_at_once_is_checked_again() {
    let a = common::toggle_upstream("a").await;
    let b = common::toggle_upstream("b").await;
    let p = free_ports(2);
    let checked = "    health_check: { path: /healthz, interval: 100ms, rise: 1, fall: 1 }\n";
    let both = config(&p, &[(a.addr, 1), (b.addr, 1)], checked);
    let edge = Edge::start_ready(&both, addr(p[0]), addr(p[1])).await;
    // Two reloads back to back: a goes and comes back before anything settles.
    edge.rewrite(&config(&p, &[(b.addr, 1)], checked));
    assert_eq!(edge.reload().await.0, 200);
    edge.rewrite(&both.replace("weight: 1 }, {", "weight: 2 }, {"));
    assert_eq!(edge.reload().await.0, 200);
    wait_for("a to take traffic again", || {
        let request = common::client().get(edge.url("/ok")).send();
        async move { (request.await.ok()?.headers()["x-upstream"] == "a").then_some(()) }
    })
    .await;
    // Its checks run: when it fails them, it is taken out.
    a.failing.store(true, Ordering::SeqCst);
    wait_for("a's checks to see it fail", || {
        let status = edge.status();
        async move { (backend_field(&status.await, a.addr, "healthy") == false).then_some(()) }
    })
    .await;
}

#[tokio::test]
async fn a_moved_admin_listener_keeps_its_token_until_a_restart() {
    let a = common::fake_upstream("a").await;
    let p = free_ports(3);
    let token = "an-admin-token-for-the-tests";
    let with_token = config(&p, &[(a, 1)], "").replace(
        &format!("admin: {{ address: 127.0.0.1:{} }}", p[1]),
        &format!(
            "admin: {{ address: 127.0.0.1:{}, token_env: KINGDOM_ADMIN_TOKEN }}",
            p[1]
        ),
    );
    let edge = Edge::start_env(
        &with_token,
        &[("KINGDOM_ADMIN_TOKEN", token)],
        addr(p[0]),
        addr(p[1]),
    )
    .await;
    // Moved, and without a token (loopback allows that): the listener that runs is the
    // old one, and it keeps asking for the token.
    let moved = config(&p, &[(a, 2)], "").replace(
        &format!("admin: {{ address: 127.0.0.1:{} }}", p[1]),
        &format!("admin: {{ address: 127.0.0.1:{} }}", p[2]),
    );
    edge.rewrite(&moved);
    let (code, report) = edge.post("/reload", Some(token)).await;
    assert_eq!(code, 200, "{report}");
    let held: Vec<&str> = report["needs_restart"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["key"].as_str().unwrap())
        .collect();
    assert_eq!(held, ["admin.address", "admin.token_env"], "{report}");
    assert_eq!(edge.post("/reload", None).await.0, 401);
    assert_eq!(edge.post("/reload", Some(token)).await.0, 200);
}

#[tokio::test]
async fn a_longer_shutdown_timeout_applies_to_the_next_drain() {
    let a = common::toggle_upstream("a").await;
    let p = free_ports(2);
    let short = config(&p, &[(a.addr, 1)], "").replacen(
        "listeners:",
        "server: { shutdown_timeout: 1s }\nlisteners:",
        1,
    );
    let mut edge = Edge::start_ready(&short, addr(p[0]), addr(p[1])).await;
    edge.apply(&short.replace("shutdown_timeout: 1s", "shutdown_timeout: 20s"))
        .await;
    a.close();
    let held = tokio::spawn(common::client().get(edge.url("/ok")).send());
    wait_for("the request to reach a", || {
        std::future::ready((a.hits.load(Ordering::SeqCst) >= 1).then_some(()))
    })
    .await;
    edge.signal(Signal::SIGTERM);
    // Past the timeout the process started with: the drain is still waiting.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(
        edge.try_wait().is_none(),
        "the drain waits up to the new 20s"
    );
    a.open();
    assert_eq!(held.await.unwrap().unwrap().status(), 200);
    assert!(edge.wait_exit().await.success());
}
