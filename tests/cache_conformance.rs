//! The response cache against a suite nobody here wrote: `http-cache-tests` (the npm package
//! behind cache-tests.fyi, pinned in `tests/conformance/package-lock.json`). Its origin
//! server is the upstream of a cached route, its command-line client sends every request
//! through the proxy, and the suite grades each test itself (`tests/conformance/results.mjs`
//! uses its own `lib/display.mjs`). Needs Node.js and npm; the package is installed under
//! `target/` on first use.
//!
//! The test fails when a required test about `no-store`, `private`, `Authorization`, `Vary`
//! or invalidation fails, or when fewer required tests pass than [`REQUIRED_PASSES`]. It
//! prints the tally by kind beside nginx's and Varnish's as published in the package.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use common::{addr, free_ports, Edge};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

/// The package version `package-lock.json` pins.
const VERSION: &str = "0.4.5";

/// Required tests the proxy passes (152 or 153: the retry budget decides whether a 5xx is
/// asked again, which the suite marks as a retry), less a margin of 2 for a test that paces
/// itself with pauses on a busy machine. README "Conformance" quotes the full tally.
const REQUIRED_PASSES: usize = 150;

/// What the suite's tests are about that must never fail (matched against suite and test ids).
const NEVER_FAIL: &[&str] = &["no-store", "private", "auth", "vary", "invalidat"];

/// One test's result as the suite grades it.
#[derive(serde::Deserialize)]
struct Graded {
    suite: String,
    id: String,
    kind: String,
    result: String,
}

fn conformance_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/conformance")
}

/// Installs the pinned package under `target/` unless that version is there already, and
/// returns its directory.
async fn install() -> PathBuf {
    let root = Path::new(env!("CARGO_TARGET_TMPDIR")).join("http-cache-tests");
    let package = root.join("node_modules/http-cache-tests");
    let installed = std::fs::read_to_string(package.join("package.json"))
        .ok()
        .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok())
        .is_some_and(|manifest| manifest["version"] == VERSION);
    if installed {
        return package;
    }
    std::fs::create_dir_all(&root).unwrap();
    for file in ["package.json", "package-lock.json"] {
        std::fs::copy(conformance_dir().join(file), root.join(file)).unwrap();
    }
    let run = Command::new("npm")
        .args([
            "ci",
            "--omit=dev",
            "--no-audit",
            "--no-fund",
            "--ignore-scripts",
        ])
        .current_dir(&root)
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(300), run)
        .await
        .expect("npm ci took over 5 minutes")
        .expect("npm is needed for the conformance suite (Debian: apt-get install nodejs npm)");
    assert!(
        out.status.success(),
        "npm ci failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    package
}

/// Starts the suite's origin on a loopback ephemeral port; returns it and its port.
async fn origin(package: &Path) -> (tokio::process::Child, u16) {
    let mut child = Command::new("node")
        .arg(conformance_dir().join("origin.mjs"))
        .arg(package)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("node is needed for the conformance suite (Debian: apt-get install nodejs)");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await
        .expect("the suite's origin did not start in 30 s")
        .unwrap()
        .expect("the suite's origin exited");
    // The origin logs on stdout as it goes: keep draining it so it never blocks.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    (child, first.trim().parse().expect("a port number"))
}

/// Runs `node <args>` in `dir` with `env`, bounded; returns its stdout.
async fn node(dir: &Path, args: &[&Path], env: &[(&str, &str)]) -> String {
    let mut command = Command::new("node");
    command
        .arg("--no-warnings")
        .args(args)
        .current_dir(dir)
        .kill_on_drop(true);
    for (key, value) in env {
        command.env(key, value);
    }
    let out = tokio::time::timeout(Duration::from_secs(300), command.output())
        .await
        .expect("node took over 5 minutes")
        .unwrap();
    assert!(
        out.status.success(),
        "node {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The suite's grading of a results file.
async fn grade(package: &Path, results: &Path) -> Vec<Graded> {
    let script = conformance_dir().join("results.mjs");
    node(package, &[&script, package, results], &[])
        .await
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect()
}

/// `kind → result → count`.
fn tally(graded: &[Graded]) -> BTreeMap<&str, BTreeMap<&str, usize>> {
    let mut tally: BTreeMap<&str, BTreeMap<&str, usize>> = BTreeMap::new();
    for test in graded {
        *tally
            .entry(&test.kind)
            .or_default()
            .entry(&test.result)
            .or_default() += 1;
    }
    tally
}

#[tokio::test(flavor = "multi_thread")]
async fn the_http_cache_tests_suite_through_the_proxy() {
    let package = install().await;
    let (_origin, origin_port) = origin(&package).await;

    let p = free_ports(2);
    let yaml = format!(
        "listeners: [{{ name: public, address: 127.0.0.1:{} }}]\n\
         admin: {{ address: 127.0.0.1:{} }}\n\
         cache: {{ memory: 64MiB, max_object: 8MiB }}\n\
         pools: {{ origin: {{ backends: [{{ address: 127.0.0.1:{origin_port} }}] }} }}\n\
         routes: [{{ name: suite, match: {{ path_prefix: / }}, pool: origin, cache: {{}} }}]\n",
        p[0], p[1]
    );
    let edge = Edge::start_ready(&yaml, addr(p[0]), addr(p[1])).await;

    // The client takes its settings from npm's environment (cli.mjs); an empty id runs all.
    let base = format!("http://{}", edge.proxy);
    let cli = package.join("cli.mjs");
    let json = node(
        &package,
        &[&cli],
        &[("npm_config_base", &base), ("npm_package_config_id", "")],
    )
    .await;
    // Kept for reading: `npm run cli --id=<test>` in the package shows one test's exchange.
    let results = package.join("../../results.json");
    std::fs::write(&results, &json).unwrap();
    let graded = grade(&package, &results).await;
    assert!(graded.len() > 300, "{} tests graded", graded.len());

    // Side by side with the results the package publishes for other caches.
    let ours = tally(&graded);
    eprintln!("kingdom-edge: {ours:?}");
    for name in ["nginx", "varnish"] {
        let published = grade(&package, &package.join(format!("results/{name}.json"))).await;
        eprintln!("{name} (published by the suite): {:?}", tally(&published));
    }
    for test in &graded {
        if !matches!(test.result.as_str(), "pass" | "yes" | "dependency_fail") {
            eprintln!(
                "  {} {}/{}: {}",
                test.kind, test.suite, test.id, test.result
            );
        }
    }

    let broken: Vec<&str> = graded
        .iter()
        .filter(|t| t.kind == "required" && t.result != "pass")
        .filter(|t| {
            let about = format!("{} {}", t.suite, t.id);
            NEVER_FAIL.iter().any(|topic| about.contains(topic))
        })
        .map(|t| t.id.as_str())
        .collect();
    assert!(broken.is_empty(), "must never fail: {broken:?}");
    let passed = ours["required"].get("pass").copied().unwrap_or(0);
    assert!(
        passed >= REQUIRED_PASSES,
        "{passed} required tests passed, fewer than {REQUIRED_PASSES}"
    );
}
