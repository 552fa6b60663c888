//! Test harness: the real binaries on ephemeral loopback ports, small fake upstreams, and
//! deadline-bounded waits.

#![allow(dead_code)]

use std::future::Future;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// How long anything in a test may take to become true.
pub const DEADLINE: Duration = Duration::from_secs(30);

/// `127.0.0.1:port`.
pub fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// GET `url` and parse the body as JSON.
pub async fn get_json(url: &str) -> serde_json::Value {
    client()
        .get(url)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// `n` distinct free loopback ports, for configs that name their ports. They are taken below
/// the kernel's ephemeral range, so no outgoing connection (of any test) can take one between
/// this check and the proxy binding it, and never handed out twice in one test process.
pub fn free_ports(n: usize) -> Vec<u16> {
    use std::collections::HashSet;
    use std::sync::Mutex;
    static HANDED_OUT: Mutex<Option<HashSet<u16>>> = Mutex::new(None);
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let (low, high) = (10_000u16, ephemeral_low.max(10_001));
    let mut handed = HANDED_OUT.lock().unwrap();
    let handed = handed.get_or_insert_with(HashSet::new);
    let mut ports = Vec::new();
    while ports.len() < n {
        let port = fastrand::u16(low..high);
        if !handed.contains(&port) && TcpListener::bind(("127.0.0.1", port)).is_ok() {
            handed.insert(port);
            ports.push(port);
        }
    }
    ports
}

/// Polls `check` until it returns `Some`, or panics after [`DEADLINE`] naming `what`.
pub async fn wait_for<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + DEADLINE;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A plain HTTP client that ignores proxy environment variables.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap()
}

/// A running `kingdom-edge` with its config in a temporary directory.
pub struct Edge {
    child: Option<Child>,
    /// The first listener.
    pub proxy: SocketAddr,
    /// The admin listener.
    pub admin: SocketAddr,
    /// Holds the config, access log and stderr.
    pub dir: tempfile::TempDir,
}

/// The path of a binary built by this package.
pub fn bin(name: &str) -> PathBuf {
    match name {
        "kingdom-edge" => PathBuf::from(env!("CARGO_BIN_EXE_kingdom-edge")),
        "kingdom-api" => PathBuf::from(env!("CARGO_BIN_EXE_kingdom-api")),
        "kingdom-content" => PathBuf::from(env!("CARGO_BIN_EXE_kingdom-content")),
        other => panic!("unknown binary {other}"),
    }
}

impl Edge {
    /// Writes `yaml` and starts the proxy; waits until the admin API answers `/health`.
    /// `proxy` and `admin` must be the addresses the YAML gives.
    pub async fn start(yaml: &str, proxy: SocketAddr, admin: SocketAddr) -> Edge {
        Edge::start_binary(&bin("kingdom-edge"), yaml, proxy, admin).await
    }

    /// [`Edge::start`] with extra environment variables.
    pub async fn start_env(
        yaml: &str,
        env: &[(&str, &str)],
        proxy: SocketAddr,
        admin: SocketAddr,
    ) -> Edge {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("edge.yaml");
        std::fs::write(&config, yaml).unwrap();
        Edge::start_at(&bin("kingdom-edge"), dir, &config, env, proxy, admin).await
    }

    /// [`Edge::start`] with a given `kingdom-edge` executable.
    pub async fn start_binary(
        binary: &Path,
        yaml: &str,
        proxy: SocketAddr,
        admin: SocketAddr,
    ) -> Edge {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("edge.yaml");
        std::fs::write(&config, yaml).unwrap();
        Edge::start_at(binary, dir, &config, &[], proxy, admin).await
    }

    /// Starts `binary` with the config at `config` (laid out in `dir` by the caller) and the
    /// extra environment `env`; waits until the admin API answers `/health`.
    pub async fn start_at(
        binary: &Path,
        dir: tempfile::TempDir,
        config: &Path,
        env: &[(&str, &str)],
        proxy: SocketAddr,
        admin: SocketAddr,
    ) -> Edge {
        let child = Command::new(binary)
            .arg("-c")
            .arg(config)
            .envs(env.iter().copied())
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(dir.path().join("stdout.log")).unwrap())
            .stderr(std::fs::File::create(dir.path().join("stderr.log")).unwrap())
            .spawn()
            .expect("start kingdom-edge");
        let mut edge = Edge {
            child: Some(child),
            proxy,
            admin,
            dir,
        };
        let http = client();
        let url = format!("http://{admin}/health");
        let mut exited = None;
        wait_for("the admin API to answer /health", || {
            if let Some(status) = edge.try_wait() {
                exited = Some(status);
                return std::future::ready(Some(false)).left_future();
            }
            let req = http.get(&url).send();
            async move { req.await.ok().filter(|r| r.status() == 200).map(|_| true) }.right_future()
        })
        .await;
        if let Some(status) = exited {
            panic!("kingdom-edge exited early ({status}):\n{}", edge.stderr());
        }
        wait_for("the proxy listener to accept connections", || async move {
            tokio::net::TcpStream::connect(proxy).await.ok().map(|_| ())
        })
        .await;
        edge
    }

    /// Like [`Edge::start`], then waits until every backend of every pool accepts connections.
    pub async fn start_ready(yaml: &str, proxy: SocketAddr, admin: SocketAddr) -> Edge {
        let edge = Edge::start(yaml, proxy, admin).await;
        edge.wait_ready().await;
        let status = edge.status().await;
        for pool in status["pools"].as_array().unwrap() {
            for backend in pool["backends"].as_array().unwrap() {
                let address: SocketAddr = backend["address"].as_str().unwrap().parse().unwrap();
                wait_for(
                    &format!("backend {address} to accept connections"),
                    || async move {
                        tokio::net::TcpStream::connect(address)
                            .await
                            .ok()
                            .map(|_| ())
                    },
                )
                .await;
            }
        }
        edge
    }

    /// Waits until `/ready` answers 200.
    pub async fn wait_ready(&self) {
        self.wait_ready_status(200).await;
    }

    /// Waits until `/ready` answers `status`.
    pub async fn wait_ready_status(&self, status: u16) {
        let http = client();
        let url = format!("http://{}/ready", self.admin);
        wait_for(&format!("/ready to answer {status}"), || {
            let req = http.get(&url).send();
            async move { req.await.ok().filter(|r| r.status() == status).map(|_| ()) }
        })
        .await;
    }

    /// `http://<proxy><path>`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.proxy)
    }

    /// `GET /status` as JSON.
    pub async fn status(&self) -> serde_json::Value {
        get_json(&format!("http://{}/status", self.admin)).await
    }

    /// `GET /metrics` as text.
    pub async fn metrics(&self) -> String {
        client()
            .get(format!("http://{}/metrics", self.admin))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Sends a signal to the proxy process.
    pub fn signal(&self, signal: Signal) {
        kill(Pid::from_raw(self.pid() as i32), signal).unwrap();
    }

    /// The exit status, if it has exited.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child.as_mut()?.try_wait().ok().flatten()
    }

    /// Waits (bounded) for the process to exit.
    pub async fn wait_exit(&mut self) -> ExitStatus {
        let mut status = None;
        wait_for("kingdom-edge to exit", || {
            status = status.or_else(|| self.try_wait());
            std::future::ready(status.map(|_| ()))
        })
        .await;
        status.unwrap()
    }

    /// What the proxy wrote to stdout (the access log with the default output).
    pub fn stdout(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stdout.log")).unwrap_or_default()
    }

    /// What the proxy logged.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stderr.log")).unwrap_or_default()
    }

    /// The config file's path.
    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("edge.yaml")
    }

    /// Replaces the config file as editors do: writes a new file and renames it over the old
    /// one, so the proxy never reads half a file.
    pub fn rewrite(&self, yaml: &str) {
        let staged = self.dir.path().join(".edge.yaml.swp");
        std::fs::write(&staged, yaml).unwrap();
        std::fs::rename(&staged, self.config_path()).unwrap();
    }

    /// Replaces the config file and waits until the proxy serves it (the file watch reloads
    /// it); returns the new config version.
    pub async fn apply(&self, yaml: &str) -> u64 {
        self.rewrite(yaml);
        self.wait_digest(&kingdom_edge::snapshot::digest_of(yaml))
            .await
    }

    /// Waits until the config in force has `digest`; returns its version.
    pub async fn wait_digest(&self, digest: &str) -> u64 {
        let url = format!("http://{}/status", self.admin);
        wait_for(&format!("config {digest} to be in force"), || {
            let status = get_json_opt(url.clone());
            async move {
                let status = status.await?;
                (status["config"]["digest"] == digest)
                    .then(|| status["config"]["version"].as_u64())?
            }
        })
        .await
    }

    /// Waits until the Prometheus series `series` reaches `at_least`.
    pub async fn wait_metric(&self, series: &str, at_least: f64) {
        wait_for(&format!("{series} to reach {at_least}"), || {
            let metrics = self.metrics();
            async move { (metric(&metrics.await, series) >= at_least).then_some(()) }
        })
        .await
    }

    /// `POST <path>` on the admin API with an optional bearer token: status and JSON body.
    pub async fn post(&self, path: &str, token: Option<&str>) -> (u16, serde_json::Value) {
        let mut request = client().post(format!("http://{}{path}", self.admin));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or_default())
    }

    /// `POST /reload` (no token).
    pub async fn reload(&self) -> (u16, serde_json::Value) {
        self.post("/reload", None).await
    }
}

/// GET `url` as JSON, `None` on any failure.
pub async fn get_json_opt(url: String) -> Option<serde_json::Value> {
    client().get(url).send().await.ok()?.json().await.ok()
}

impl Drop for Edge {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            if child.try_wait().ok().flatten().is_none() {
                // SIGINT: quick exit, sidecars stopped too.
                let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGINT);
                let deadline = Instant::now() + Duration::from_secs(10);
                while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(20));
                }
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        if std::thread::panicking() {
            eprintln!("--- kingdom-edge stderr ---\n{}", self.stderr());
        }
    }
}

use futures::FutureExt;

/// A fake upstream: `GET /slow?ms=N` answers after N ms, `GET /ok` at once, `GET /public`
/// with `cache-control: public`, all with `x-upstream: <name>` (anything else is a 404); `POST /upload` reads the whole body and answers its length.
pub async fn fake_upstream(name: &'static str) -> SocketAddr {
    fake_upstream_counting(name).await.0
}

/// [`fake_upstream`], plus a count of the TCP connections it has accepted.
pub async fn fake_upstream_counting(
    name: &'static str,
) -> (SocketAddr, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use axum::extract::Query;
    use axum::routing::{get, post};
    use axum::serve::ListenerExt;
    use std::collections::HashMap;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    let accepted = Arc::new(AtomicUsize::new(0));
    let app = axum::Router::new()
        .route(
            "/upload",
            post(|body: axum::body::Bytes| async move { body.len().to_string() }),
        )
        .route(
            "/ok",
            get(move || async move { ([("x-upstream", name)], "ok") }),
        )
        .route(
            "/public",
            get(move || async move {
                (
                    [
                        ("x-upstream", name),
                        ("cache-control", "public, max-age=60"),
                    ],
                    "shared",
                )
            }),
        )
        .route(
            "/slow",
            get(move |Query(q): Query<HashMap<String, u64>>| async move {
                tokio::time::sleep(Duration::from_millis(q.get("ms").copied().unwrap_or(1000)))
                    .await;
                ([("x-upstream", name)], "slow ok")
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let counter = accepted.clone();
    let listener = listener.tap_io(move |_| {
        counter.fetch_add(1, Ordering::SeqCst);
    });
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (addr, accepted)
}

/// A path to a fixture-like temporary file with `content`.
pub fn write_file(dir: &Path, name: &str, content: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, content).unwrap();
    path
}

/// A fake upstream whose answers can be switched, and which counts what it received.
pub struct Toggle {
    /// Where it listens.
    pub addr: SocketAddr,
    /// While true, every answer is 503.
    pub failing: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// While true, requests other than `/healthz` are answered 503.
    pub failing_requests: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// Requests received.
    pub hits: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    /// Each answer waits this many milliseconds first.
    pub delay_ms: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// The `Host` of the last `/healthz` request.
    pub health_host: std::sync::Arc<std::sync::Mutex<Option<String>>>,
    /// While closed, answers wait (requests are still counted as they arrive).
    pub gate: std::sync::Arc<tokio::sync::watch::Sender<bool>>,
}

impl Toggle {
    /// Holds every answer until [`Self::open`].
    pub fn close(&self) {
        self.gate.send_replace(false);
    }

    /// Lets held and later answers go.
    pub fn open(&self) {
        self.gate.send_replace(true);
    }
}

/// Starts a [`Toggle`] upstream: `GET /ok` and `POST /ok` answer 200 with `x-upstream: <name>`
/// (503 while failing); `GET /healthz` answers likewise.
pub async fn toggle_upstream(name: &'static str) -> Toggle {
    use axum::http::StatusCode;
    use axum::routing::get;
    use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
    use std::sync::Arc;
    let failing = Arc::new(AtomicBool::new(false));
    let failing_requests = Arc::new(AtomicBool::new(false));
    let hits = Arc::new(AtomicUsize::new(0));
    let delay_ms = Arc::new(AtomicU64::new(0));
    let gate = Arc::new(tokio::sync::watch::Sender::new(true));
    let (f, h, d, g) = (
        failing.clone(),
        hits.clone(),
        delay_ms.clone(),
        gate.clone(),
    );
    let fr = failing_requests.clone();
    let health_host = Arc::new(std::sync::Mutex::new(None));
    let hh = health_host.clone();
    let answer = move |uri: axum::http::Uri, headers: axum::http::HeaderMap| {
        let (f, h, d) = (f.clone(), h.clone(), d.clone());
        let requests_fail = fr.load(Ordering::SeqCst) && uri.path() != "/healthz";
        if uri.path() == "/healthz" {
            let host = headers.get("host").and_then(|v| v.to_str().ok());
            *hh.lock().unwrap() = host.map(str::to_string);
        }
        let mut open = g.subscribe();
        async move {
            h.fetch_add(1, Ordering::SeqCst);
            let _ = open.wait_for(|open| *open).await;
            let delay = d.load(Ordering::SeqCst);
            if delay > 0 {
                tokio::time::sleep(Duration::from_millis(delay)).await;
            }
            let status = if f.load(Ordering::SeqCst) || requests_fail {
                StatusCode::SERVICE_UNAVAILABLE
            } else {
                StatusCode::OK
            };
            (status, [("x-upstream", name)], name)
        }
    };
    let app = axum::Router::new()
        .route("/ok", get(answer.clone()).post(answer.clone()))
        .route("/healthz", get(answer));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Toggle {
        addr,
        failing,
        failing_requests,
        health_host,
        hits,
        delay_ms,
        gate,
    }
}

/// A standalone `kingdom-api` process (not supervised by the proxy), killed on drop.
pub struct ApiProcess {
    child: Child,
    /// Where it listens.
    pub addr: SocketAddr,
}

impl ApiProcess {
    /// Starts `kingdom-api --listen <free port>` and waits until its own `/healthz` answers
    /// (`x-instance` names its address, so nothing else that took the port is mistaken for
    /// it). A port taken between choosing and binding makes the process exit: then it tries
    /// another.
    pub async fn start() -> ApiProcess {
        for _ in 0..5 {
            let addr = addr(free_ports(1)[0]);
            let mut child = Command::new(bin("kingdom-api"))
                .arg("--listen")
                .arg(addr.to_string())
                .env("KINGDOM_API_SECRET", "integration-test-secret")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            let http = client();
            let url = format!("http://{addr}/healthz");
            let mut exited = false;
            wait_for("kingdom-api to answer /healthz", || {
                exited = exited || child.try_wait().ok().flatten().is_some();
                let request = http.get(&url).send();
                let (me, exited) = (addr.to_string(), exited);
                async move {
                    if exited {
                        return Some(());
                    }
                    let response = request.await.ok()?;
                    let identity = response.headers().get("x-instance")?;
                    (identity.to_str().ok()? == me).then_some(())
                }
            })
            .await;
            if !exited {
                return ApiProcess { child, addr };
            }
            let _ = child.wait();
        }
        panic!("kingdom-api could not bind a free port five times");
    }

    /// SIGKILL, and reap.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ApiProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Starts the proxy in front of one pool `app`, routed from `/`, with these backends and the
/// extra pool keys in `extra` (YAML flow-mapping entries such as `limits: { max_in_flight: 1 }`,
/// one per line). Waits until every backend accepts connections.
pub async fn edge_for_pool(backends: &[SocketAddr], extra: &[&str]) -> Edge {
    let (yaml, proxy, admin) = pool_config(backends, extra);
    Edge::start_ready(&yaml, proxy, admin).await
}

/// [`edge_for_pool`]'s config, and its proxy and admin addresses, for a test that starts it
/// itself.
pub fn pool_config(backends: &[SocketAddr], extra: &[&str]) -> (String, SocketAddr, SocketAddr) {
    let p = free_ports(2);
    let list: Vec<String> = backends
        .iter()
        .map(|a| format!("{{ address: {a} }}"))
        .collect();
    let extra: String = extra.iter().map(|line| format!("    {line}\n")).collect();
    let yaml = format!(
        "listeners: [{{ name: public, address: 127.0.0.1:{} }}]\nadmin: {{ address: 127.0.0.1:{} }}\npools:\n  app:\n    backends: [{}]\n{extra}routes: [{{ name: app, match: {{ path_prefix: / }}, pool: app }}]\n",
        p[0],
        p[1],
        list.join(", ")
    );
    (yaml, addr(p[0]), addr(p[1]))
}

/// Sends raw bytes and returns everything the proxy answers before closing (bounded).
pub async fn raw_exchange(proxy: SocketAddr, request: &[u8]) -> String {
    String::from_utf8_lossy(&raw_exchange_bytes(proxy, request).await).into_owned()
}

/// [`raw_exchange`], as bytes.
pub async fn raw_exchange_bytes(proxy: SocketAddr, request: &[u8]) -> Vec<u8> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(proxy).await.unwrap();
    stream.write_all(request).await.unwrap();
    let mut out = Vec::new();
    let read = tokio::time::timeout(DEADLINE, stream.read_to_end(&mut out)).await;
    assert!(read.is_ok(), "the proxy kept the connection open");
    out
}

/// A self-signed certificate for `hosts`, written as `<name>.crt` and `<name>.key` in `dir`;
/// returns the certificate's PEM.
pub fn self_signed(dir: &Path, name: &str, hosts: &[&str]) -> String {
    let generated =
        rcgen::generate_simple_self_signed(hosts.iter().map(|h| h.to_string()).collect::<Vec<_>>())
            .unwrap();
    let pem = generated.cert.pem();
    write_file(dir, &format!("{name}.crt"), &pem);
    write_file(
        dir,
        &format!("{name}.key"),
        &generated.key_pair.serialize_pem(),
    );
    pem
}

/// How a [`misbehaving_upstream`] frames the body it never finishes.
#[derive(Debug, Clone, Copy)]
pub enum Framing {
    /// `Content-Length: 100`.
    Length,
    /// `Transfer-Encoding: chunked`, a 100-byte chunk cut off after 21 bytes.
    Chunked,
}

/// What a [`misbehaving_upstream`] does after reading a request's header.
#[derive(Debug, Clone, Copy)]
pub enum Misbehaviour {
    /// Dies mid-response: a 200 promising 100 bytes of the given fill, 21 of them, then the
    /// connection closes.
    Die(u8, Framing),
    /// [`Misbehaviour::Die`] (length-framed) in an answer a cache may store
    /// (`cache-control: max-age=60`).
    DieCacheable(u8),
    /// Answers nothing, reads nothing more, holds the connection for two minutes.
    Hang,
    /// Promises 1,000 bytes, then sends one every 200 ms.
    Trickle,
    /// A 200 promising 100 bytes, 21 of them, then silence for two minutes.
    Stall,
}

/// An upstream that misbehaves on every request as told; counts the requests it received.
pub async fn misbehaving_upstream(
    how: Misbehaviour,
) -> (SocketAddr, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let hits = std::sync::Arc::new(AtomicUsize::new(0));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let counter = hits.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let counter = counter.clone();
            tokio::spawn(async move {
                let mut request = Vec::new();
                let mut buf = [0u8; 1024];
                while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => request.extend_from_slice(&buf[..n]),
                    }
                }
                counter.fetch_add(1, Ordering::SeqCst);
                match how {
                    Misbehaviour::Die(..) | Misbehaviour::DieCacheable(_) => {
                        let (fill, head): (u8, &[u8]) = match how {
                            Misbehaviour::Die(fill, Framing::Length) => {
                                (fill, b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n")
                            }
                            Misbehaviour::Die(fill, Framing::Chunked) => (
                                fill,
                                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n64\r\n",
                            ),
                            Misbehaviour::DieCacheable(fill) => (
                                fill,
                                b"HTTP/1.1 200 OK\r\ncache-control: max-age=60\r\ncontent-length: 100\r\n\r\n",
                            ),
                            _ => unreachable!("matched above"),
                        };
                        let mut answer = head.to_vec();
                        answer.extend_from_slice(&[fill; 21]);
                        let _ = stream.write_all(&answer).await;
                        let _ = stream.flush().await;
                        // Let the part reach the proxy before the close does.
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    Misbehaviour::Hang => tokio::time::sleep(Duration::from_secs(120)).await,
                    Misbehaviour::Stall => {
                        let head = b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n";
                        let _ = stream.write_all(head).await;
                        let _ = stream.write_all(&[b's'; 21]).await;
                        tokio::time::sleep(Duration::from_secs(120)).await;
                    }
                    Misbehaviour::Trickle => {
                        let head = b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n";
                        if stream.write_all(head).await.is_err() {
                            return;
                        }
                        for _ in 0..1000 {
                            tokio::time::sleep(Duration::from_millis(200)).await;
                            if stream.write_all(b"x").await.is_err() {
                                return;
                            }
                        }
                    }
                }
            });
        }
    });
    (addr, hits)
}

/// The value of the Prometheus series `series` (name and labels as rendered) in `text`, 0 when
/// absent.
pub fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0.0)
}

/// An upstream that accepts WebSocket handshakes and echoes the bytes that follow each.
pub async fn websocket_echo_upstream() -> SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut request = Vec::new();
                let mut buf = [0u8; 1024];
                while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                    let n = stream.read(&mut buf).await.unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    request.extend_from_slice(&buf[..n]);
                }
                let text = String::from_utf8_lossy(&request).to_ascii_lowercase();
                if !text.contains("upgrade: websocket") {
                    let _ = stream
                        .write_all(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n")
                        .await;
                    return;
                }
                let _ = stream
                    .write_all(
                        b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: Upgrade\r\nsec-websocket-accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n",
                    )
                    .await;
                loop {
                    let n = stream.read(&mut buf).await.unwrap_or(0);
                    if n == 0 || stream.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    address
}

/// Sends `request` on `stream` and reads one whole answer (its `Content-Length` body); panics
/// if the proxy closes the connection first.
pub async fn ask_on(stream: &mut tokio::net::TcpStream, request: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    let complete = |a: &[u8]| {
        let text = String::from_utf8_lossy(a).to_ascii_lowercase();
        let Some((head, body)) = text.split_once("\r\n\r\n") else {
            return false;
        };
        let length = head.lines().find_map(|l| {
            l.strip_prefix("content-length: ")?
                .trim()
                .parse::<usize>()
                .ok()
        });
        length.is_some_and(|n| body.len() >= n)
    };
    while !complete(&answer) {
        let read = tokio::time::timeout(DEADLINE, stream.read(&mut buf)).await;
        let n = read.expect("the proxy answers").unwrap_or(0);
        assert!(n > 0, "closed after {:?}", String::from_utf8_lossy(&answer));
        answer.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&answer).into_owned()
}

/// Opens a WebSocket tunnel through the proxy at `path`: the upgrade request, then its
/// `101` answer.
pub async fn open_websocket(proxy: SocketAddr, path: &str) -> tokio::net::TcpStream {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(proxy).await.unwrap();
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: edge.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tokio::time::timeout(DEADLINE, stream.read(&mut buf))
            .await
            .expect("the handshake answer")
            .unwrap();
        assert!(n > 0, "connection closed during the handshake: {head:?}");
        head.extend_from_slice(&buf[..n]);
    }
    let head = String::from_utf8_lossy(&head);
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    stream
}
