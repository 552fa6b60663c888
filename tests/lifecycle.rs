//! Process lifecycle: sidecar restart after SIGKILL, SIGTERM draining, `check`.

mod common;

use std::path::Path;
use std::process::Command;

use common::{addr, client, free_ports, wait_for, Edge};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;

fn sidecar_pid(status: &Value, address: &str) -> Option<i32> {
    status["sidecars"]
        .as_array()?
        .iter()
        .find(|s| s["address"] == address)?["pid"]
        .as_i64()
        .map(|p| p as i32)
}

fn breaker<'a>(status: &'a Value, address: &str) -> &'a Value {
    let backends = status["pools"][0]["backends"].as_array().unwrap();
    &backends.iter().find(|b| b["address"] == address).unwrap()["breaker"]
}

#[tokio::test]
async fn a_killed_sidecar_is_restarted_and_readmitted_as_soon_as_it_listens() {
    let other = common::fake_upstream("other").await;
    let p = free_ports(3);
    let api = format!("127.0.0.1:{}", p[2]);
    let yaml = format!(
        r#"
listeners: [{{ name: public, address: 127.0.0.1:{proxy} }}]
admin: {{ address: 127.0.0.1:{admin} }}
sidecars:
  - {{ name: api, command: kingdom-api, addresses: [{api}], env: {{ KINGDOM_API_SECRET: integration-test-secret }} }}
pools:
  api:
    backends: [{{ address: {api} }}, {{ address: {other} }}]
    outlier: {{ consecutive_failures: 1, base_ejection: 5m }}
routes: [{{ name: api, match: {{ path_prefix: / }}, pool: api }}]
"#,
        proxy = p[0],
        admin = p[1],
    );
    let edge = Edge::start_ready(&yaml, addr(p[0]), addr(p[1])).await;
    let http = client();
    assert_eq!(
        http.get(edge.url("/v1/echo"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );

    let first = sidecar_pid(&edge.status().await, &api).expect("the sidecar runs");
    kill(Pid::from_raw(first), Signal::SIGKILL).unwrap();
    // Traffic finds it dead and ejects it, for five minutes.
    wait_for("the dead sidecar to be ejected", || {
        let (request, status) = (http.get(edge.url("/v1/echo")).send(), edge.status());
        let api = api.clone();
        async move {
            let _ = request.await;
            (breaker(&status.await, &api) != "closed").then_some(())
        }
    })
    .await;

    let second = wait_for("a new sidecar process", || {
        let status = edge.status();
        let api = api.clone();
        async move { sidecar_pid(&status.await, &api).filter(|pid| *pid != first) }
    })
    .await;
    assert_ne!(first, second);
    // Its restart, once it listens, ends the ejection: the next request to it closes the
    // breaker, long before the five minutes are up.
    wait_for("the restarted sidecar to be readmitted", || {
        let (request, status) = (http.get(edge.url("/v1/echo")).send(), edge.status());
        let api = api.clone();
        async move {
            let response = request.await.ok().filter(|r| r.status() == 200)?;
            let readmitted = breaker(&status.await, &api) == "closed";
            (readmitted
                && response
                    .headers()
                    .get("x-instance")
                    .is_some_and(|v| v == api.as_str()))
            .then_some(())
        }
    })
    .await;
    let status = edge.status().await;
    assert_eq!(status["sidecars"][0]["restarts"], 1);
    assert!(edge.metrics().await.contains(&format!(
        r#"kingdom_edge_sidecar_restarts_total{{address="{api}",sidecar="api"}} 1"#
    )));
}

#[tokio::test]
async fn sigterm_drains_in_flight_requests_then_exits() {
    let slow_upstream = common::toggle_upstream("slow").await;
    let slow = slow_upstream.addr;
    let p = free_ports(3);
    let api = format!("127.0.0.1:{}", p[2]);
    let yaml = format!(
        r#"
server: {{ shutdown_timeout: 60s }}
listeners: [{{ name: public, address: 127.0.0.1:{proxy} }}]
admin: {{ address: 127.0.0.1:{admin} }}
sidecars:
  - {{ name: api, command: kingdom-api, addresses: [{api}], env: {{ KINGDOM_API_SECRET: integration-test-secret }} }}
pools:
  slow: {{ backends: [{{ address: {slow} }}] }}
  api: {{ backends: [{{ address: {api} }}] }}
routes:
  - {{ name: slow, match: {{ path_prefix: /ok }}, pool: slow }}
  - {{ name: api, match: {{ path_prefix: /v1 }}, pool: api }}
"#,
        proxy = p[0],
        admin = p[1],
    );
    let mut edge = Edge::start_ready(&yaml, addr(p[0]), addr(p[1])).await;
    let sidecar = sidecar_pid(&edge.status().await, &api).unwrap();

    let http = client();
    // Held at the upstream until the drain has been observed.
    slow_upstream.close();
    let in_flight = tokio::spawn(http.get(edge.url("/ok")).send());
    wait_for("the slow request to be in flight", || {
        let status = edge.status();
        async move { (status.await["in_flight"] == 1).then_some(()) }
    })
    .await;

    edge.signal(Signal::SIGTERM);

    // New connections are refused while the slow request is still running.
    let proxy = edge.proxy;
    wait_for("the listener to close", || async move {
        tokio::net::TcpStream::connect(proxy)
            .await
            .err()
            .map(|_| ())
    })
    .await;
    assert!(
        !in_flight.is_finished(),
        "the slow request should still be running"
    );
    let ready = http
        .get(format!("http://{}/ready", edge.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 503, "readiness fails while draining");

    slow_upstream.open();
    let response = in_flight
        .await
        .unwrap()
        .expect("the in-flight request completes");
    assert_eq!(response.status(), 200);
    assert_eq!(response.text().await.unwrap(), "slow");

    // The process exits once idle, long before the 60s shutdown_timeout, and stops its sidecar.
    let status = edge.wait_exit().await;
    assert!(status.success(), "{status}");
    wait_for("the sidecar to exit", || {
        std::future::ready(kill(Pid::from_raw(sidecar), None).err().map(|_| ()))
    })
    .await;
}

#[tokio::test]
async fn sigterm_on_an_idle_proxy_exits_at_once() {
    let mut edge = edge_with_server("{ shutdown_timeout: 60s }").await;
    // Leave an idle keep-alive connection open: it must not hold the exit back.
    let http = client();
    assert_eq!(
        http.get(edge.url("/ok")).send().await.unwrap().status(),
        200
    );
    edge.signal(Signal::SIGTERM);
    // wait_exit's deadline (30s) is half the configured shutdown_timeout.
    assert!(edge.wait_exit().await.success());
}

/// A proxy in front of one fake upstream, with the given `server:` settings.
async fn edge_with_server(server: &str) -> Edge {
    let p = free_ports(2);
    let upstream = common::fake_upstream("up").await;
    let yaml = format!(
        r#"
server: {server}
listeners: [{{ name: public, address: 127.0.0.1:{} }}]
admin: {{ address: 127.0.0.1:{} }}
pools: {{ up: {{ backends: [{{ address: {upstream} }}] }} }}
routes: [{{ name: up, match: {{ path_prefix: / }}, pool: up }}]
"#,
        p[0], p[1]
    );
    Edge::start(&yaml, addr(p[0]), addr(p[1])).await
}

#[tokio::test]
async fn sigterm_starts_a_lame_duck_period_that_still_serves_with_connection_close() {
    let mut edge = edge_with_server("{ shutdown_delay: 60s, shutdown_timeout: 60s }").await;
    let http = client();
    let before = http.get(edge.url("/ok")).send().await.unwrap();
    assert_ne!(
        before.headers().get("connection").map(|v| v.as_bytes()),
        Some(&b"close"[..])
    );

    edge.signal(Signal::SIGTERM);
    edge.wait_ready_status(503).await;
    // Not ready, but new connections are still accepted and answered, each told to close.
    for _ in 0..3 {
        let answer =
            common::raw_exchange(edge.proxy, b"GET /ok HTTP/1.1\r\nHost: edge.test\r\n\r\n").await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(
            answer.to_ascii_lowercase().contains("connection: close"),
            "{answer}"
        );
    }
    // A keep-alive connection from before the signal is told to close too.
    let response = http.get(edge.url("/ok")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["connection"], "close");
    assert!(edge.try_wait().is_none(), "still in the lame-duck period");

    // SIGINT ends it at once.
    edge.signal(Signal::SIGINT);
    edge.wait_exit().await;
}

#[tokio::test]
async fn sigterm_under_load_fails_no_request() {
    let mut edge = edge_with_server("{ shutdown_delay: 2s, shutdown_timeout: 30s }").await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Clients that, like a load balancer's, stop sending once /ready fails.
    let balancer = {
        let (stop, url) = (stop.clone(), format!("http://{}/ready", edge.admin));
        tokio::spawn(async move {
            let http = client();
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                if let Ok(r) = http.get(&url).send().await {
                    if r.status() == 503 {
                        stop.store(true, std::sync::atomic::Ordering::SeqCst);
                    }
                }
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
        })
    };
    let mut clients = Vec::new();
    for _ in 0..4 {
        let (stop, url) = (stop.clone(), edge.url("/ok"));
        clients.push(tokio::spawn(async move {
            let http = client();
            let (mut ok, mut failed) = (0, Vec::new());
            for _ in 0..100_000 {
                if stop.load(std::sync::atomic::Ordering::SeqCst) {
                    break;
                }
                match http.get(&url).send().await {
                    Ok(r) if r.status() == 200 => ok += 1,
                    Ok(r) => failed.push(r.status().to_string()),
                    Err(e) => failed.push(format!("{e:?}")),
                }
            }
            (ok, failed)
        }));
    }
    wait_for("some load", || {
        let metrics = edge.metrics();
        async move {
            metrics
                .await
                .contains(r#"code="200",route="up"} 1"#)
                .then_some(())
        }
    })
    .await;
    edge.signal(Signal::SIGTERM);
    let mut served = 0;
    for client in clients {
        let (ok, failed) = client.await.unwrap();
        assert!(failed.is_empty(), "failed requests: {failed:?}");
        served += ok;
    }
    balancer.await.unwrap();
    assert!(served > 0);
    assert!(edge.wait_exit().await.success());
}

fn check(yaml: &str) -> (bool, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = common::write_file(dir.path(), "edge.yaml", yaml);
    let out = Command::new(common::bin("kingdom-edge"))
        .arg("check")
        .arg("-c")
        .arg(&path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).replace(&path.display().to_string(), "FILE");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr,
    )
}

#[tokio::test]
async fn unknown_admin_paths_get_a_json_404() {
    let edge = edge_with_server("{}").await;
    let response = client()
        .get(format!("http://{}/nope", edge.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 404);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"], "not_found");
}

#[tokio::test]
async fn a_pool_no_route_uses_does_not_fail_readiness_and_check_warns_about_it() {
    let upstream = common::fake_upstream("up").await;
    // A port nothing listens on (bound, then released).
    let dead = addr(free_ports(1)[0]);
    let p = free_ports(2);
    let yaml = format!(
        r#"
listeners: [{{ name: public, address: 127.0.0.1:{} }}]
admin: {{ address: 127.0.0.1:{} }}
pools:
  up: {{ backends: [{{ address: {upstream} }}] }}
  sessions: {{ backends: [{{ address: {dead} }}] }}
routes: [{{ name: up, match: {{ path_prefix: / }}, pool: up }}]
"#,
        p[0], p[1]
    );
    let (ok, _, stderr) = check(&yaml);
    assert!(ok, "{stderr}");
    assert!(
        stderr.contains("warning: pools.sessions: no route uses this pool"),
        "{stderr}"
    );
    let edge = Edge::start(&yaml, addr(p[0]), addr(p[1])).await;
    edge.wait_ready().await;
    let ready = common::get_json(&format!("http://{}/ready", edge.admin)).await;
    assert!(ready["pools"].get("sessions").is_none(), "{ready}");
}

#[test]
fn check_accepts_the_default_config_and_names_path_and_line_of_errors() {
    let default = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("conf/edge.yaml"),
    )
    .unwrap();
    let (ok, stdout, stderr) = check(&default);
    assert!(ok, "{stderr}");
    assert!(
        stdout.contains("listener public on 127.0.0.1:8080 (http)"),
        "{stdout}"
    );
    assert!(stdout.contains("admin on 127.0.0.1:9090"), "{stdout}");

    let broken = "\
listeners: [{ name: public, address: 127.0.0.1:8080 }]
pools:
  api:
    backends: [{ address: 127.0.0.1:9201, weight: 3 }]
routes:
  - { name: api, pool: apii }
";
    let (ok, _, stderr) = check(broken);
    assert!(!ok);
    assert_eq!(
        stderr,
        "FILE:6: routes[0].pool: no pool named `apii` under `pools:`\nFILE: 1 error(s)\n"
    );

    let (ok, _, stderr) = check("listeners: [{ name: a, address: 127.0.0.1:1, colour: red }]\n");
    assert!(!ok);
    assert!(
        stderr.starts_with("FILE:1: listeners[0]: unknown field `colour`"),
        "{stderr}"
    );
}

#[test]
fn check_reads_tls_certificates() {
    let yaml = "\
listeners:
  - name: tls
    address: 127.0.0.1:8443
    tls: { certificates: [{ cert: /nonexistent/edge.crt, key: /nonexistent/edge.key }] }
pools: { api: { backends: [{ address: 127.0.0.1:9201 }] } }
routes: [{ name: api, pool: api }]
";
    let (ok, _, stderr) = check(yaml);
    assert!(!ok);
    assert!(
        stderr.starts_with(
            "FILE:4: listeners[0].tls.certificates[0]: cannot read /nonexistent/edge.crt"
        ),
        "{stderr}"
    );
}

/// `kingdom-edge check` on a shipped config as it is, in `dir`, with only `env` set.
fn check_shipped(file: &str, dir: &Path, env: &[(&str, &str)]) -> (bool, String) {
    let config = Path::new(env!("CARGO_MANIFEST_DIR")).join(file);
    let out = Command::new(common::bin("kingdom-edge"))
        .args(["check", "-c"])
        .arg(&config)
        .current_dir(dir)
        .env_clear()
        .envs(env.iter().copied())
        .output()
        .unwrap();
    let said =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), said)
}

#[test]
fn shipped_configs_pass_check_with_only_their_documented_environment() {
    let empty = tempfile::tempdir().unwrap();
    let secrets = [
        ("KINGDOM_API_SECRET", "a-secret-of-at-least-16-bytes"),
        ("KINGDOM_STICKY_SECRET", "another-secret-of-16-bytes"),
        ("KINGDOM_ADMIN_TOKEN", "an-admin-token-of-16-bytes"),
    ];
    let (ok, said) = check_shipped("conf/edge.yaml", empty.path(), &[]);
    assert!(ok, "{said}");
    let (ok, said) = check_shipped("conf/container.yaml", empty.path(), &secrets);
    assert!(ok, "{said}");
    // production.yaml reads its certificates from tls/ in the working directory.
    let etc = tempfile::tempdir().unwrap();
    let tls = etc.path().join("tls");
    std::fs::create_dir(&tls).unwrap();
    common::self_signed(&tls, "edge", &["edge.kingdomstudios.app"]);
    common::self_signed(&tls, "api", &["api.kingdomstudios.app"]);
    let (ok, said) = check_shipped("conf/production.yaml", etc.path(), &secrets);
    assert!(ok, "{said}");

    // Each documented variable is needed: without it, check names what is missing.
    let (ok, said) = check_shipped("conf/container.yaml", empty.path(), &secrets[1..]);
    assert!(!ok);
    assert!(
        said.contains("sidecars[1].env: kingdom-api signs tokens with $KINGDOM_API_SECRET"),
        "{said}"
    );
    let (ok, said) = check_shipped(
        "conf/container.yaml",
        empty.path(),
        &[secrets[0], secrets[2]],
    );
    assert!(!ok);
    assert!(said.contains("KINGDOM_STICKY_SECRET"), "{said}");
    let (ok, said) = check_shipped("conf/container.yaml", empty.path(), &secrets[..2]);
    assert!(!ok);
    assert!(
        said.contains("admin.token_env: environment variable `KINGDOM_ADMIN_TOKEN` is not set"),
        "{said}"
    );
    // And every error is reported in one pass: missing certificates and a missing secret.
    let (ok, said) = check_shipped("conf/production.yaml", empty.path(), &secrets[1..]);
    assert!(!ok);
    assert!(
        said.contains("listeners[1].tls.certificates[0]: cannot read"),
        "{said}"
    );
    assert!(said.contains("$KINGDOM_API_SECRET"), "{said}");
}

#[tokio::test]
async fn sidecars_built_into_the_proxy_run_when_no_sidecar_binary_is_installed() {
    // `cargo run` builds only kingdom-edge: copy it somewhere with no sidecar binaries beside it.
    let lonely = tempfile::tempdir().unwrap();
    let binary = lonely.path().join("kingdom-edge");
    std::fs::copy(common::bin("kingdom-edge"), &binary).unwrap();
    let p = free_ports(4);
    let yaml = format!(
        r#"
listeners: [{{ name: public, address: 127.0.0.1:{proxy} }}]
admin: {{ address: 127.0.0.1:{admin} }}
sidecars:
  - {{ name: api, command: kingdom-api, addresses: [127.0.0.1:{api}], env: {{ KINGDOM_API_SECRET: integration-test-secret }} }}
  - {{ name: content, command: kingdom-content, addresses: [127.0.0.1:{content}] }}
pools:
  api: {{ backends: [{{ address: 127.0.0.1:{api} }}] }}
  content: {{ backends: [{{ address: 127.0.0.1:{content} }}] }}
routes:
  - {{ name: content, match: {{ path_prefix: /v1/content }}, pool: content }}
  - {{ name: api, match: {{ path_prefix: /v1 }}, pool: api }}
"#,
        proxy = p[0],
        admin = p[1],
        api = p[2],
        content = p[3],
    );
    // PATH is left as it is: the test environment has no kingdom-* binaries on it.
    let edge = Edge::start_binary(&binary, &yaml, addr(p[0]), addr(p[1])).await;
    edge.wait_ready().await;
    let http = client();
    let echo = http.get(edge.url("/v1/echo")).send().await.unwrap();
    assert_eq!(echo.status(), 200);
    assert_eq!(
        echo.headers()["x-instance"],
        format!("127.0.0.1:{}", p[2]).as_str()
    );
    let templates = common::get_json(&edge.url("/v1/content/templates")).await;
    assert_eq!(templates["templates"].as_array().unwrap().len(), 6);
    assert_eq!(
        edge.stderr().matches("builtin=true").count(),
        2,
        "both ran built in"
    );
}
