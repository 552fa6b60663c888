//! Assembles the running proxy from the first snapshot: Pingora listeners, admin API, sidecar
//! supervisor, health checks, reload triggers, drain watcher.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use nix::sys::signal::Signal;
use pingora::apps::HttpServerOptions;
use pingora::listeners::{L4BufferSettings, ListenerConfig, DEFAULT_L4_WRITE_BUFFER_SIZE};
use pingora::server::configuration::{Opt, ServerConf};
use pingora::server::{ListenFds, RunArgs, Server, ShutdownWatch};
use pingora::services::Service;

use super::reload::Reloader;
use super::shutdown::{Drain, Signals};
use super::supervisor::Supervisor;
use super::upgrade::{self, Handoff};
use super::{health_checks, load, notify, watch, StartError};
use crate::access_log::AccessLog;
use crate::admin::{self, AdminState, Control};
use crate::config::{self, process_env};
use crate::live::LiveState;
use crate::metrics::Metrics;
use crate::proxy::EdgeProxy;
use crate::snapshot::{self, ConfigStore, ReloadReport, ServerSettings, Trigger};
use crate::tls::{self, CertificateStore};

/// How long Pingora waits after a graceful shutdown starts before it stops its runtimes: the
/// drain watcher ends the process long before, within `server.shutdown_timeout`.
const GRACE_BACKSTOP: Duration = Duration::from_secs(24 * 3600);

/// How often state that no snapshot holds any more is dropped (see `LiveState::reap`), and
/// idle rate-limit buckets with it (`LiveState::sweep`).
const REAP_EVERY: Duration = Duration::from_secs(1);

/// How [`run`] starts.
#[derive(Debug, Default, Clone)]
pub struct RunOptions {
    /// Take the listening sockets and sidecars over from a running process (`--upgrade`).
    pub upgrade: bool,
    /// That process's pid (`--from`); without it, the pid in `server.pid_file`.
    pub from: Option<i32>,
    /// The unix socket that process sends its sockets to (`--upgrade-socket`); without it,
    /// `server.upgrade_socket`.
    pub upgrade_socket: Option<PathBuf>,
}

/// Runs the proxy until a signal stops it. Does not return on success: SIGTERM drains and
/// exits, SIGINT exits at once, SIGQUIT hands everything to a successor and drains.
pub fn run(path: &Path, options: RunOptions) -> Result<std::convert::Infallible, StartError> {
    // Until their tasks handle them, these signals must not end the process (their default).
    ignore_until_handled(&[Signal::SIGHUP, Signal::SIGUSR1, Signal::SIGUSR2]);
    // A successor is started from the binary's path as it is now (SIGUSR2), with the same
    // config file wherever the working directory is.
    let exe = upgrade::own_path().map_err(|e| StartError::Upgrade(e.to_string()))?;
    let path = &std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let text = config::read(path).map_err(StartError::Config)?;
    let mut snapshot = load(&text, &process_env).map_err(StartError::Config)?;

    let mut certificates = HashMap::new();
    let mut tls_settings = Vec::new();
    let mut errors = Vec::new();
    for listener in &snapshot.listeners {
        let Some(settings) = &listener.tls else {
            tls_settings.push(None);
            continue;
        };
        let store = match tls::load_all(settings) {
            Ok(certs) => Arc::new(CertificateStore::new(certs)),
            Err(e) => {
                errors.extend(e);
                continue;
            }
        };
        match tls::listener_settings(settings, store.clone()) {
            Ok(pingora_tls) => tls_settings.push(Some(pingora_tls)),
            Err(e) => errors.extend(e),
        }
        certificates.insert(listener.name.clone(), store);
    }
    if !errors.is_empty() {
        return Err(StartError::Config(config::locate_in(&text, errors)));
    }

    let predecessor = match (options.upgrade, options.from, &snapshot.server.pid_file) {
        (false, _, _) => None,
        (true, Some(pid), _) => Some(pid),
        (true, None, Some(pid_file)) => {
            Some(upgrade::pid_in(pid_file).map_err(StartError::Upgrade)?)
        }
        (true, None, None) => {
            return Err(StartError::Upgrade(
                "give the old process with --from PID, or set server.pid_file".into(),
            ))
        }
    };
    let predecessor = predecessor
        .map(upgrade::predecessor)
        .transpose()
        .map_err(StartError::Upgrade)?;
    let upgrade_socket = options
        .upgrade_socket
        .clone()
        .unwrap_or_else(|| snapshot.server.upgrade_socket.clone());
    if predecessor.is_none() {
        // Bind-check every address now, so a port in use is one clear error before anything
        // starts. (An upgrade takes the sockets over instead.)
        for listener in &snapshot.listeners {
            bind(listener.address, &format!("listener {}", listener.name))?;
        }
        if let Some(admin) = &snapshot.admin {
            bind(admin.address, "admin")?;
        }
    }

    let metrics = Arc::new(Metrics::new());
    let live = Arc::new(LiveState::new(metrics.clone()));
    snapshot::activate(&mut snapshot, &live);
    let access_log = Arc::new(
        AccessLog::open(&snapshot.access_log, metrics.clone()).map_err(StartError::AccessLog)?,
    );
    let store = Arc::new(ConfigStore::new(snapshot));
    snapshot::in_force(&store.load(), &live);
    metrics.config_version.set(1);
    let snapshot = store.load();
    let supervisor = Arc::new(Supervisor::new(metrics.clone(), {
        let store = store.clone();
        Box::new(move |address| {
            let now = std::time::Instant::now();
            for pool in &store.load().pools {
                pool.end_ejection(address, now);
            }
        })
    }));
    let reloader = Arc::new(Reloader::new(
        path.to_path_buf(),
        &text,
        store.clone(),
        live.clone(),
        access_log.clone(),
        supervisor.clone(),
        certificates,
    ));
    let draining = Arc::new(AtomicBool::new(false));

    let mut conf = ServerConf {
        threads: snapshot.server.threads,
        // Pingora's own grace period is only the backstop: the drain watcher exits when the
        // requests are done or `shutdown_timeout` (as a reload may have changed it) is over.
        grace_period_seconds: Some(GRACE_BACKSTOP.as_secs()),
        graceful_shutdown_timeout_seconds: Some(1),
        upgrade_sock: upgrade_socket.display().to_string(),
        ..ServerConf::default()
    };
    conf.daemon = false;
    let opt = Opt {
        upgrade: predecessor.is_some(),
        ..Opt::default()
    };
    let mut server = Server::new_with_opt_and_conf(Some(opt), conf);
    if let Some(old) = predecessor {
        // Health first: traffic arrives as soon as the sockets do.
        let probes = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| StartError::Upgrade(e.to_string()))?;
        probes.block_on(health_checks::probe_all_once(&snapshot));
        drop(probes);
        upgrade::signal_when_listening(&upgrade_socket, old)
            .map_err(|e| StartError::Upgrade(e.to_string()))?;
        tracing::info!(pid = old.as_raw(), socket = %upgrade_socket.display(), "upgrade: taking over");
    }
    // In an upgrade, this receives the old process's sockets and sidecar pipes.
    server.bootstrap();
    let handoff = Handoff::new(server.listen_fds());
    // What the old process waits for before it gives anything up: sent once this process
    // serves. Failing before that (here, a listener address another process holds) leaves
    // the old process serving.
    let upgrade_ack = server.take_upgrade_ack();
    if predecessor.is_some() {
        let inherited = handoff.keys();
        for listener in &snapshot.listeners {
            if !inherited.contains(&listener.address.to_string()) {
                bind(listener.address, &format!("listener {}", listener.name))?;
            }
        }
    }
    let admin_listener = match &snapshot.admin {
        Some(admin) => {
            Some(
                handoff
                    .admin_listener(admin.address)
                    .map_err(|source| StartError::Bind {
                        address: admin.address,
                        what: "admin".into(),
                        source,
                    })?,
            )
        }
        None => None,
    };
    supervisor.use_handoff(handoff.clone());
    // What rides the hand-off besides the listeners (the admin socket, sidecar pipes) is
    // claimed, so Pingora does not close it; an inherited socket the config no longer names
    // (a removed listener, a moved admin API) is not, so it is closed rather than left to
    // swallow connections.
    let admin_key = snapshot.admin.as_ref().map(|a| a.address.to_string());
    let claimed = handoff
        .keys()
        .into_iter()
        .filter(|key| upgrade::is_sidecar_key(key) || Some(key) == admin_key.as_ref())
        .collect();

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

    // The cache outlives every snapshot: made once, from the config the process starts with.
    let cache = Arc::new(crate::cache::Cache::new(snapshot.cache));
    for (listener, tls) in snapshot.listeners.iter().zip(tls_settings) {
        let proxy = EdgeProxy::new(
            store.clone(),
            metrics.clone(),
            access_log.clone(),
            listener.name.clone(),
            tls.is_some(),
            draining.clone(),
            cache.clone(),
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

    // Everything besides the listeners runs as tasks of one service, on one runtime thread:
    // each Pingora service would bring a runtime of its own.
    let mut background = Background::new(claimed);
    background.task({
        let (supervisor, store) = (supervisor.clone(), store.clone());
        move || {
            // The runtime first, then the sidecars of the config in force: a reload in
            // between either reconciles here already or is seen in `store`.
            supervisor.run_here();
            supervisor.reconcile(&store.load().sidecars);
            Box::pin(std::future::ready(()))
        }
    });
    background.task({
        let access_log = access_log.clone();
        move || Box::pin(reopen_on_sigusr1(access_log))
    });
    background.task({
        let store = store.clone();
        move || Box::pin(health_checks::run(store))
    });
    background.task({
        let reloader = reloader.clone();
        let pid_file = snapshot.server.pid_file.clone();
        move || {
            // The services are up: confirm to the old process (in an upgrade), then tell
            // systemd and the pid file who serves.
            if let Some(ack) = upgrade_ack {
                match ack.confirm() {
                    Ok(()) => tracing::info!("upgrade: this process serves; the old one drains"),
                    Err(e) => tracing::error!("upgrade: cannot confirm to the old process: {e}"),
                }
            }
            if let Some(pid_file) = &pid_file {
                if let Err(e) = upgrade::write_pid_file(pid_file) {
                    tracing::error!(pid_file = %pid_file.display(), "cannot write the pid file: {e}");
                }
            }
            notify::ready();
            Box::pin(watch::reload_on_triggers(reloader))
        }
    });
    background.task({
        let successor = upgrade::Successor {
            exe,
            config: path.to_path_buf(),
            socket: upgrade_socket,
            busy: Default::default(),
        };
        move || Box::pin(upgrade::upgrade_on_sigusr2(successor))
    });
    background.task({
        let live = live.clone();
        let (cache, metrics) = (cache.clone(), metrics.clone());
        move || {
            let (cache, metrics) = (cache.clone(), metrics.clone());
            Box::pin(async move {
                let mut every = tokio::time::interval(REAP_EVERY);
                loop {
                    every.tick().await;
                    live.reap();
                    live.sweep(crate::ratelimit::nanos(std::time::Instant::now()));
                    cache.report(&metrics);
                }
            })
        }
    });
    let (handing_over, mut handed_over) = tokio::sync::watch::channel(false);
    if let Some(listener) = admin_listener {
        let state = AdminState {
            store: store.clone(),
            metrics: metrics.clone(),
            control: Arc::new(RuntimeControl {
                reloader: reloader.clone(),
                supervisor: supervisor.clone(),
            }),
            draining: draining.clone(),
            started: std::time::Instant::now(),
            rates: Default::default(),
            cache: cache.clone(),
        };
        background.task(move || {
            // After a hand-off the socket is the successor's to serve.
            let stop = async move {
                let _ = handed_over.wait_for(|handed| *handed).await;
            };
            Box::pin(admin::serve(listener, state, stop))
        });
    }
    server.add_service(background);

    let signals = Signals {
        store: store.clone(),
        draining: draining.clone(),
    };
    let drain = Drain {
        handing_over,
        pid_file: snapshot.server.pid_file.clone(),
        in_flight: metrics.in_flight.clone(),
        store: store.clone(),
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

/// Ignores `signals`, whose default is to end the process, until their tasks handle them (a
/// logrotate SIGUSR1 or a reload's SIGHUP during start-up must not kill it).
fn ignore_until_handled(signals: &[Signal]) {
    use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet};
    let ignore = SigAction::new(SigHandler::SigIgn, SaFlags::empty(), SigSet::empty());
    for signal in signals {
        // SAFETY: installing SIG_IGN runs no code in a handler, so nothing can be unsound.
        if let Err(e) = unsafe { sigaction(*signal, &ignore) } {
            tracing::warn!("cannot ignore {signal} during start-up: {e}");
        }
    }
}

/// What the admin API may ask of the runtime.
struct RuntimeControl {
    reloader: Arc<Reloader>,
    supervisor: Arc<Supervisor>,
}

#[async_trait]
impl Control for RuntimeControl {
    async fn reload(&self) -> Arc<ReloadReport> {
        self.reloader.reload(Trigger::Admin).await
    }

    fn sidecars(&self) -> serde_json::Value {
        serde_json::json!(self.supervisor.status())
    }
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

/// Everything but the listeners: tasks started on the service's one runtime thread, which
/// run until the process exits. The service also claims what the upgrade hand-off table
/// holds besides the listeners (the admin socket, sidecar pipes), so Pingora does not close
/// it as a stale inherited socket.
struct Background {
    /// Behind a lock only because a service must be `Sync`.
    tasks: std::sync::Mutex<Vec<Box<dyn FnOnce() -> BoxFuture + Send>>>,
    claimed: Vec<String>,
}

impl Background {
    fn new(claimed: Vec<String>) -> Self {
        Self {
            tasks: Default::default(),
            claimed,
        }
    }

    /// Adds a task; `start` runs on the runtime and gives the future to spawn.
    fn task(&mut self, start: impl FnOnce() -> BoxFuture + Send + 'static) {
        if let Ok(tasks) = self.tasks.get_mut() {
            tasks.push(Box::new(start));
        }
    }
}

#[async_trait]
impl Service for Background {
    async fn start_service(
        &mut self,
        _fds: Option<ListenFds>,
        _shutdown: ShutdownWatch,
        _listeners_per_fd: usize,
    ) {
        let tasks = std::mem::take(self.tasks.get_mut().unwrap_or_else(|p| p.into_inner()));
        for start in tasks {
            tokio::spawn(start());
        }
        // The tasks outlive the shutdown broadcast (the admin API reports the drain).
        std::future::pending::<()>().await;
    }

    fn name(&self) -> &str {
        "background"
    }

    fn threads(&self) -> Option<usize> {
        Some(1)
    }

    fn listen_addresses(&self) -> Option<Vec<String>> {
        Some(self.claimed.clone())
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
