//! The access log under trouble: a full disk loses lines visibly and never tears one, log
//! rotation by rename or SIGUSR1 moves writing to the new file, `off` writes nothing.

mod common;

use std::path::Path;

use common::{addr, client, free_ports, wait_for, Edge};
use nix::sys::signal::Signal;
use serde_json::Value;

async fn edge_logging_to(output: &str) -> Edge {
    let p = free_ports(2);
    let upstream = common::fake_upstream("up").await;
    let yaml = format!(
        r#"
listeners: [{{ name: public, address: 127.0.0.1:{} }}]
admin: {{ address: 127.0.0.1:{} }}
access_log: {{ output: "{output}" }}
pools: {{ up: {{ backends: [{{ address: {upstream} }}] }} }}
routes: [{{ name: up, match: {{ path_prefix: / }}, pool: up }}]
"#,
        p[0], p[1]
    );
    Edge::start(&yaml, addr(p[0]), addr(p[1])).await
}

async fn get(edge: &Edge, n: usize) {
    let http = client();
    for _ in 0..n {
        assert_eq!(
            http.get(edge.url("/ok")).send().await.unwrap().status(),
            200
        );
    }
}

/// The lines of `path`, each of which must be JSON.
fn json_lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("torn line {l:?}: {e}")))
        .collect()
}

async fn wait_lines(path: &Path, n: usize) {
    wait_for(&format!("{n} lines in {}", path.display()), || {
        std::future::ready((json_lines(path).len() >= n).then_some(()))
    })
    .await;
}

#[tokio::test]
async fn lines_lost_to_a_full_disk_are_counted_and_reported() {
    let edge = edge_logging_to("/dev/full").await;
    get(&edge, 25).await;
    let dropped = wait_for("25 dropped lines", || {
        let metrics = edge.metrics();
        async move {
            let n = common::metric(&metrics.await, "kingdom_edge_access_log_dropped_total");
            (n >= 25.0).then_some(n)
        }
    })
    .await;
    assert_eq!(dropped, 25.0);
    let stderr = edge.stderr();
    assert!(
        stderr.contains("access log write failed, lines lost"),
        "{stderr}"
    );
    // Reported once, not once per line.
    assert!(
        stderr.matches("access log write failed").count() < 5,
        "{stderr}"
    );
}

#[tokio::test]
async fn rotation_by_rename_and_by_sigusr1_moves_writing_to_a_new_file() {
    let edge = edge_logging_to("access.log").await;
    let dir = edge.dir.path();
    let (log, first, second) = (
        dir.join("access.log"),
        dir.join("access.log.1"),
        dir.join("access.log.2"),
    );
    get(&edge, 3).await;
    wait_lines(&log, 3).await;

    // logrotate's default: rename, and the writer notices on its own.
    std::fs::rename(&log, &first).unwrap();
    wait_for("a new access.log", || {
        let edge = &edge;
        let log = log.clone();
        async move {
            get(edge, 1).await;
            (!json_lines(&log).is_empty()).then_some(())
        }
    })
    .await;
    let rotated = json_lines(&first).len();
    assert!(rotated >= 3, "the old file keeps its lines");

    // Rename, then SIGUSR1 as nginx's rotation scripts send it: the process keeps running.
    std::fs::rename(&log, &second).unwrap();
    edge.signal(Signal::SIGUSR1);
    get(&edge, 2).await;
    wait_lines(&log, 2).await;
    assert_eq!(
        json_lines(&first).len(),
        rotated,
        "nothing more goes to the first file"
    );
    assert!(
        edge.status().await["in_flight"].is_number(),
        "still running"
    );
}

#[tokio::test]
async fn access_log_off_writes_nothing() {
    let edge = edge_logging_to("off").await;
    get(&edge, 3).await;
    // Counted when the request is logged (or would be), just after its answer is sent.
    edge.wait_metric(r#"kingdom_edge_requests_total{code="200",route="up"}"#, 3.0)
        .await;
    assert!(!edge.stdout().contains("request_id"), "{}", edge.stdout());
    assert!(!edge.dir.path().join("off").exists());
}
