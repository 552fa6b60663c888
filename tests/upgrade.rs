//! Zero-downtime binary upgrade: the new process takes the listening sockets and the
//! sidecars over, the old one drains and exits, and no request fails.

mod common;

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{addr, free_ports, wait_for, Edge};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;

/// The process that took over, stopped (SIGINT, which stops its sidecars too) when the test
/// ends, however it ends.
struct Successor(u32);

impl Drop for Successor {
    fn drop(&mut self) {
        let pid = Pid::from_raw(self.0 as i32);
        if kill(pid, Signal::SIGINT).is_err() {
            return;
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while kill(pid, None).is_ok() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = kill(pid, Signal::SIGKILL);
    }
}

/// A proxy with a sidecar pool (`/v1`, two kingdom-api processes) and a plain pool (`/`),
/// its upgrade socket and pid file in `dir`.
fn config(p: &[u16], dir: &Path, app: std::net::SocketAddr) -> String {
    let d = dir.display();
    format!(
        r#"
server: {{ upgrade_socket: {d}/upgrade.sock, pid_file: {d}/edge.pid, shutdown_timeout: 10s }}
listeners: [{{ name: public, address: 127.0.0.1:{proxy} }}]
admin: {{ address: 127.0.0.1:{admin} }}
sidecars:
  - name: api
    command: kingdom-api
    addresses: [127.0.0.1:{a1}, 127.0.0.1:{a2}]
    env: {{ KINGDOM_API_SECRET: integration-test-secret }}
pools:
  api:
    backends: [{{ address: 127.0.0.1:{a1} }}, {{ address: 127.0.0.1:{a2} }}]
    health_check: {{ path: /healthz, interval: 200ms }}
    panic: fail_closed     # a new process in panic mode would answer 503
  app: {{ backends: [{{ address: {app} }}] }}
routes:
  - {{ name: api, match: {{ path_prefix: /v1 }}, pool: api }}
  - {{ name: app, match: {{ path_prefix: / }}, pool: app }}
"#,
        proxy = p[0],
        admin = p[1],
        a1 = p[2],
        a2 = p[3],
    )
}

/// Starts the proxy for [`config`], with systemd's notification socket pointed at a socket
/// the test reads.
async fn start(p: &[u16]) -> (Edge, Arc<Mutex<Vec<String>>>) {
    let app = common::fake_upstream("app").await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("edge.yaml");
    std::fs::write(&path, config(p, dir.path(), app)).unwrap();
    let socket = dir.path().join("notify.sock");
    let notify = UnixDatagram::bind(&socket).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let notes = Arc::new(Mutex::new(Vec::new()));
    let heard = notes.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 512];
        loop {
            match notify.recv(&mut buf) {
                Ok(n) => heard
                    .lock()
                    .unwrap()
                    .push(String::from_utf8_lossy(&buf[..n]).into_owned()),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if Arc::strong_count(&heard) == 1 {
                        return;
                    }
                }
                Err(_) => return,
            }
        }
    });
    let socket = socket.display().to_string();
    let edge = Edge::start_at(
        &common::bin("kingdom-edge"),
        dir,
        &path,
        &[("NOTIFY_SOCKET", socket.as_str())],
        addr(p[0]),
        addr(p[1]),
    )
    .await;
    edge.wait_ready().await;
    (edge, notes)
}

/// Sidecar pids by address, from `/status`.
fn sidecar_pids(status: &Value) -> Vec<(String, u64)> {
    let mut pids: Vec<(String, u64)> = status["sidecars"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["address"].as_str().unwrap().to_string(),
                s["pid"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    pids.sort();
    pids
}

/// Waits until the admin API is served by a process other than `old`; returns its pid.
async fn new_pid(edge: &Edge, old: u32) -> u32 {
    let url = format!("http://{}/status", edge.admin);
    wait_for("the new process to serve the admin API", || {
        let status = common::get_json_opt(url.clone());
        async move {
            let pid = status.await?["pid"].as_u64()? as u32;
            (pid != old).then_some(pid)
        }
    })
    .await
}

#[tokio::test]
async fn an_upgrade_under_load_fails_no_request_and_keeps_the_sidecars_running() {
    let p = free_ports(4);
    let (mut edge, notes) = start(&p).await;
    let old = edge.pid();
    wait_for("every api sidecar to take traffic", || {
        let status = edge.status();
        async move {
            let status = status.await;
            let pools = status["pools"].as_array()?;
            let api = pools.iter().find(|p| p["name"] == "api")?;
            let healthy = api["backends"]
                .as_array()?
                .iter()
                .all(|b| b["healthy"] == true);
            healthy.then_some(())
        }
    })
    .await;
    let sidecars_before = sidecar_pids(&edge.status().await);
    assert!(sidecars_before.iter().all(|(_, pid)| *pid > 0));
    wait_for("systemd to hear the old process is ready", || {
        let heard = notes.lock().unwrap().clone();
        std::future::ready(
            heard
                .contains(&format!("READY=1\nMAINPID={old}"))
                .then_some(()),
        )
    })
    .await;

    let stop = Arc::new(AtomicBool::new(false));
    let (sent, failures) = (
        Arc::new(AtomicUsize::new(0)),
        Arc::new(Mutex::new(Vec::new())),
    );
    let mut load = Vec::new();
    for i in 0..4 {
        let (stop, sent, failures) = (stop.clone(), sent.clone(), failures.clone());
        let url = edge.url(if i % 2 == 0 { "/v1/echo" } else { "/ok" });
        load.push(tokio::spawn(async move {
            let client = common::client();
            while !stop.load(Ordering::Relaxed) {
                let outcome = match client.get(&url).send().await {
                    Ok(r) if r.status() == 200 => {
                        r.bytes().await.map(|_| ()).map_err(|e| e.to_string())
                    }
                    Ok(r) => Err(format!("status {}", r.status())),
                    Err(e) => Err(format!("{e:?}")),
                };
                sent.fetch_add(1, Ordering::Relaxed);
                if let Err(why) = outcome {
                    failures.lock().unwrap().push(format!("{url}: {why}"));
                }
            }
        }));
    }
    let more = |than: usize| {
        let sent = sent.clone();
        move || std::future::ready((sent.load(Ordering::Relaxed) > than).then_some(()))
    };
    wait_for("load before the upgrade", more(200)).await;

    edge.signal(Signal::SIGUSR2);
    let new = new_pid(&edge, old).await;
    let _successor = Successor(new);
    assert!(
        edge.wait_exit().await.success(),
        "the old process drained and exited"
    );
    let after = sent.load(Ordering::Relaxed);
    wait_for("load after the old process exited", more(after + 200)).await;
    stop.store(true, Ordering::Relaxed);
    for task in load {
        task.await.unwrap();
    }
    let failures = failures.lock().unwrap().clone();
    let sent = sent.load(Ordering::Relaxed);
    assert!(
        failures.is_empty(),
        "{} of {sent} failed: {failures:?}",
        failures.len()
    );

    let status = edge.status().await;
    assert_eq!(status["pid"], new);
    assert_eq!(
        sidecar_pids(&status),
        sidecars_before,
        "the sidecars were adopted, not restarted"
    );
    let pid_file = std::fs::read_to_string(edge.dir.path().join("edge.pid")).unwrap();
    assert_eq!(pid_file.trim(), new.to_string());
    wait_for("systemd to hear the new process is the main one", || {
        let heard = notes.lock().unwrap().clone();
        std::future::ready(
            heard
                .contains(&format!("READY=1\nMAINPID={new}"))
                .then_some(()),
        )
    })
    .await;
    let log = edge.stderr();
    assert!(
        log.contains("sidecar adopted from the previous process"),
        "{log}"
    );
    // systemd must not hear that the unit stops: it lives on in the new process.
    let heard = notes.lock().unwrap().clone();
    assert!(!heard.iter().any(|n| n.contains("STOPPING")), "{heard:?}");
}

#[tokio::test]
async fn a_new_process_that_fails_after_taking_the_sockets_leaves_the_old_one_serving() {
    let p = free_ports(5);
    let (edge, _notes) = start(&p).await;
    let old = edge.pid();
    // The new config adds a listener on a port another process holds: the new process
    // receives the sockets, cannot bind it, and exits without confirming.
    let taken = std::net::TcpListener::bind(("127.0.0.1", p[4])).unwrap();
    let good = std::fs::read_to_string(edge.config_path()).unwrap();
    let blocked = good.replace(
        "listeners: [",
        &format!(
            "listeners: [{{ name: extra, address: 127.0.0.1:{} }}, ",
            p[4]
        ),
    );
    std::fs::write(edge.config_path(), blocked).unwrap();
    edge.signal(Signal::SIGUSR2);
    wait_for("the aborted upgrade to be logged", || {
        std::future::ready(edge.stderr().contains("upgrade aborted").then_some(()))
    })
    .await;
    drop(taken);
    let log = edge.stderr();
    assert!(
        log.contains("cannot listen on"),
        "the new process said why: {log}"
    );
    assert!(!log.contains("handing the sockets"), "{log}");
    // Everything still works in the old process, the admin API included.
    for path in ["/ok", "/v1/echo"] {
        let response = common::client().get(edge.url(path)).send().await.unwrap();
        assert_eq!(response.status(), 200, "{path}");
    }
    let status = edge.status().await;
    assert_eq!(status["pid"], old);
    assert_eq!(status["draining"], false);
    // And a later upgrade, with a config that works, goes through.
    std::fs::write(edge.config_path(), good).unwrap();
    let mut edge = edge;
    edge.signal(Signal::SIGUSR2);
    let new = new_pid(&edge, old).await;
    let _successor = Successor(new);
    assert!(edge.wait_exit().await.success());
}

#[tokio::test]
async fn a_new_process_that_cannot_start_leaves_the_old_one_serving() {
    let p = free_ports(4);
    let (edge, _notes) = start(&p).await;
    let old = edge.pid();
    let good = std::fs::read_to_string(edge.config_path()).unwrap();
    std::fs::write(edge.config_path(), good.replace("pool: app", "pool: nope")).unwrap();
    edge.signal(Signal::SIGUSR2);
    wait_for("the failed upgrade to be logged", || {
        std::future::ready(edge.stderr().contains("upgrade failed").then_some(()))
    })
    .await;
    let response = common::client().get(edge.url("/ok")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(edge.status().await["pid"], old);
    assert!(
        !edge.stderr().contains("handing the sockets"),
        "the old process never gave its sockets away"
    );
}

#[tokio::test]
async fn run_upgrade_takes_over_from_the_pid_file() {
    let p = free_ports(4);
    let (mut edge, _notes) = start(&p).await;
    let old = edge.pid();
    let mut successor = std::process::Command::new(common::bin("kingdom-edge"))
        .args(["run", "--upgrade", "-c"])
        .arg(edge.config_path())
        .current_dir(edge.dir.path())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(edge.dir.path().join("successor.log")).unwrap())
        .spawn()
        .unwrap();
    let guard = Successor(successor.id());
    assert_eq!(new_pid(&edge, old).await, successor.id());
    assert!(edge.wait_exit().await.success());
    let response = common::client()
        .get(edge.url("/v1/echo"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    drop(guard);
    let _ = successor.wait();
}
