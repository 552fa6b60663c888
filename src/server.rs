//! Assembles the running proxy from a snapshot: Pingora listeners, admin API, sidecar
//! supervisor, drain watcher.

use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use pingora::apps::HttpServerOptions;
use pingora::listeners::{L4BufferSettings, ListenerConfig, DEFAULT_L4_WRITE_BUFFER_SIZE};
use pingora::server::configuration::ServerConf;
use pingora::server::Server;
use pingora::server::{RunArgs, ShutdownWatch};
use pingora::services::background::{background_service, BackgroundService};

use crate::access_log::AccessLog;
use crate::admin::{self, AdminState};
use crate::config::raw::RawConfig;
use crate::config::{self, CompileContext, ConfigError};
use crate::health;
use crate::live::LiveState;
use crate::metrics::Metrics;
use crate::preflight;
use crate::proxy::EdgeProxy;
use crate::shutdown::{Drain, Signals};
use crate::snapshot::{ConfigStore, ServerSettings, Snapshot};
use crate::supervisor::Supervisor;
use crate::tls;

/// Why the proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The config file is invalid; each error names its YAML path.
    #[error("invalid config")]
    Config(Vec<ConfigError>),
    /// A socket could not be bound.
    #[error("cannot listen on {address} ({what}): {source}")]
    Bind {
        address: SocketAddr,
        what: String,
        source: std::io::Error,
    },
    /// The access log could not be opened.
    #[error("{0}")]
    AccessLog(std::io::Error),
}

/// Loads and fully validates a config file, including what it needs from the machine
/// (certificates, files, sidecar commands and secrets), without starting anything. This is
/// what `kingdom-edge check` runs.
pub fn check(path: &Path) -> Result<Snapshot, Vec<ConfigError>> {
    let (metrics, live) = (Metrics::new(), LiveState::default());
    load_verified(path, &CompileContext::new(&metrics, &live))
}

/// Compiles the file and runs the preflight checks, reporting every error of both in one
/// pass, in file order.
fn load_verified(path: &Path, cx: &CompileContext) -> Result<Snapshot, Vec<ConfigError>> {
    let text = config::read(path)?;
    let compiled = config::parse(&text, cx);
    let machine = match serde_yaml::from_str::<RawConfig>(&text) {
        Ok(raw) => config::locate_in(&text, preflight::verify(&raw, cx.env)),
        // The parse error is already among the compile errors.
        Err(_) => Vec::new(),
    };
    match compiled {
        Ok(snapshot) if machine.is_empty() => Ok(snapshot),
        Ok(_) => Err(machine),
        Err(mut errors) => {
            errors.extend(machine);
            errors.sort_by_key(|e| e.line.unwrap_or(usize::MAX));
            Err(errors)
        }
    }
}

/// Runs the proxy until a signal stops it. Does not return on success: SIGTERM drains and
/// exits, SIGINT exits at once.
pub fn run(path: &Path) -> Result<std::convert::Infallible, StartError> {
    let metrics = Arc::new(Metrics::new());
    let live = Arc::new(LiveState::default());
    let snapshot =
        load_verified(path, &CompileContext::new(&metrics, &live)).map_err(StartError::Config)?;

    let mut tls_settings = Vec::new();
    let mut errors = Vec::new();
    for listener in &snapshot.listeners {
        match listener.tls.as_ref().map(tls::listener_settings) {
            Some(Ok(settings)) => tls_settings.push(Some(settings)),
            Some(Err(e)) => errors.extend(e),
            None => tls_settings.push(None),
        }
    }
    if !errors.is_empty() {
        return Err(StartError::Config(config::locate(path, errors)));
    }

    // Bind-check every address now, so a port in use is one clear error before anything starts.
    for listener in &snapshot.listeners {
        bind(listener.address, &format!("listener {}", listener.name))?;
    }
    let admin_listener = match &snapshot.admin {
        Some(admin) => Some(bind(admin.address, "admin")?),
        None => None,
    };

    let access_log = Arc::new(
        AccessLog::open(&snapshot.access_log, metrics.clone()).map_err(StartError::AccessLog)?,
    );
    let store = Arc::new(ConfigStore::new(snapshot));
    let snapshot = store.load();
    let supervisor = Arc::new(Supervisor::new(&snapshot.sidecars, &metrics, {
        let store = store.clone();
        Box::new(move |address| {
            let now = std::time::Instant::now();
            for pool in &store.load().pools {
                pool.end_ejection(address, now);
            }
        })
    }));
    let draining = Arc::new(AtomicBool::new(false));
    let shutdown_timeout = snapshot.server.shutdown_timeout;

    let mut conf = ServerConf {
        threads: snapshot.server.threads,
        // Pingora's own grace period is only the backstop: the drain watcher exits earlier.
        grace_period_seconds: Some(shutdown_timeout.as_secs() + 1),
        graceful_shutdown_timeout_seconds: Some(1),
        ..ServerConf::default()
    };
    conf.daemon = false;
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();

    let banner: Vec<String> = snapshot
        .listeners
        .iter()
        .map(|l| {
            let scheme = if l.tls.is_some() { "https" } else { "http" };
            format!("{scheme}://{}", l.address)
        })
        .collect();
    let admin_banner = snapshot
        .admin
        .as_ref()
        .map(|a| format!("http://{}", a.address));

    for (listener, tls) in snapshot.listeners.iter().zip(tls_settings) {
        let proxy = EdgeProxy::new(
            store.clone(),
            metrics.clone(),
            access_log.clone(),
            listener.name.clone(),
            tls.is_some(),
            draining.clone(),
        );
        let mut service = pingora::proxy::http_proxy_service_with_name(
            &server.configuration,
            proxy,
            &format!("listener {}", listener.name),
        );
        if let Some(app) = service.app_logic_mut() {
            app.server_options = Some(client_options(&snapshot.server, listener.h2c));
        }
        let address = listener.address.to_string();
        // No L4 read buffer: reads go straight to the socket (the HTTP layer has its own
        // header buffer, rustls its record buffer), so an idle connection holds no 64 KiB
        // buffer. The write buffer (one MSS) is held only while it holds bytes.
        let buffers = L4BufferSettings::new(0, DEFAULT_L4_WRITE_BUFFER_SIZE);
        let config = match tls {
            Some(settings) => ListenerConfig::tcp(&address).tls(settings),
            None => ListenerConfig::tcp(&address),
        };
        service.add_listener(config.l4_buffer(buffers));
        server.add_service(service);
    }

    server.add_service(background_service(
        "sidecars",
        Task(Box::new({
            let supervisor = supervisor.clone();
            move || Box::pin(supervisor.clone().run())
        })),
    ));
    server.add_service(background_service(
        "access-log rotation",
        Task(Box::new({
            let access_log = access_log.clone();
            move || Box::pin(reopen_on_sigusr1(access_log.clone()))
        })),
    ));
    server.add_service(background_service(
        "health checks",
        Task(Box::new({
            let store = store.clone();
            move || Box::pin(health::run(store.clone()))
        })),
    ));
    if let Some(listener) = admin_listener {
        let state = AdminState {
            store: store.clone(),
            metrics: metrics.clone(),
            supervisor: supervisor.clone(),
            draining: draining.clone(),
        };
        server.add_service(background_service(
            "admin",
            Task(Box::new(move || {
                let listener = listener.try_clone();
                let state = state.clone();
                Box::pin(async move {
                    match listener {
                        Ok(listener) => admin::serve(listener, state).await,
                        Err(e) => tracing::error!("admin listener: {e}"),
                    }
                })
            })),
        ));
    }

    let signals = Signals {
        delay: snapshot.server.shutdown_delay,
        draining: draining.clone(),
    };
    let drain = Drain {
        in_flight: metrics.in_flight.clone(),
        timeout: shutdown_timeout,
        supervisor,
        draining,
        access_log,
    };
    let phases = server.watch_execution_phase();

    tracing::info!(
        config = %path.display(),
        version = snapshot.version,
        digest = %snapshot.digest,
        "kingdom-edge proxy on {}{}",
        banner.join(", "),
        admin_banner.map(|a| format!(", admin on {a}")).unwrap_or_default()
    );
    drop(snapshot);

    // SIGTERM ends in the drain watcher. SIGINT (quick shutdown) returns from `run`: Pingora
    // has already dropped the supervisor's tasks, which kills the children; make sure of it.
    let (supervisor, access_log) = (drain.supervisor.clone(), drain.access_log.clone());
    drain.watch(phases);
    server.run(RunArgs {
        shutdown_signal: Box::new(signals),
    });
    supervisor.stop();
    access_log.flush(Duration::from_secs(1));
    std::process::exit(0)
}

/// Reopens the access log on every `SIGUSR1` (as nginx does), for log rotation.
async fn reopen_on_sigusr1(access_log: Arc<AccessLog>) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut usr1 = match signal(SignalKind::user_defined1()) {
        Ok(usr1) => usr1,
        Err(e) => {
            tracing::error!(
                "cannot handle SIGUSR1, the access log is reopened only when moved: {e}"
            );
            return;
        }
    };
    while usr1.recv().await.is_some() {
        access_log.reopen();
    }
}

fn bind(address: SocketAddr, what: &str) -> Result<TcpListener, StartError> {
    let listener = TcpListener::bind(address).map_err(|source| StartError::Bind {
        address,
        what: what.to_string(),
        source,
    })?;
    listener
        .set_nonblocking(true)
        .map_err(|source| StartError::Bind {
            address,
            what: what.to_string(),
            source,
        })?;
    Ok(listener)
}

type BoxFuture = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// A background task for Pingora's server: started once, runs until the process exits.
struct Task(Box<dyn Fn() -> BoxFuture + Send + Sync>);

#[async_trait]
impl BackgroundService for Task {
    async fn start(&self, _shutdown: ShutdownWatch) {
        (self.0)().await;
    }
}

/// What Pingora holds a client to while it reads requests: the timeouts of
/// `server.*_timeout`, and a cap on the bytes of a request head while it is read (every
/// route's limits fit under it; past it the answer is 431).
fn client_options(server: &ServerSettings, h2c: bool) -> HttpServerOptions {
    let timeouts = server.client_timeouts;
    let limits = server.hygiene.ceiling;
    let mut options = HttpServerOptions::default();
    options.h2c = h2c;
    options.keepalive_timeout = Some(timeouts.keepalive);
    options.h2_idle_timeout = Some(timeouts.keepalive);
    options.request_header_timeout = Some(timeouts.header);
    options.tls_handshake_timeout = Some(timeouts.tls_handshake);
    // The request line and every field, with room for the method, version and line ends.
    options.max_request_header_size = Some(limits.request_line + limits.headers + 1024);
    options
}
