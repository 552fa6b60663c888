//! Graceful shutdown that ends when the work does.
//!
//! SIGTERM first starts a lame-duck period (`server.shutdown_delay`): `/ready` answers 503 and
//! HTTP/1 responses say `Connection: close` while the listeners still accept, so a load
//! balancer has time to stop sending and clients move off their keep-alive connections. Then
//! Pingora closes the listeners, sends HTTP/2 clients `GOAWAY` and sleeps a fixed grace
//! period; the drain watcher exits the process as soon as no request is in flight (or
//! `server.shutdown_timeout` passes), after stopping the sidecars.
//!
//! `SIGQUIT` hands the sockets to a successor (see `upgrade`): once the successor confirms it
//! serves, the same drain follows, with `Connection: close` from then on, and the sidecars
//! left running for the successor. Without the confirmation nothing changes.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use pingora::server::{ExecutionPhase, ShutdownSignal, ShutdownSignalWatch};
use prometheus::IntGauge;
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::sync::broadcast::{self, error::RecvError};

use super::supervisor::Supervisor;
use crate::access_log::AccessLog;
use crate::snapshot::ConfigStore;

/// How often the drain checks the in-flight count.
const POLL: Duration = Duration::from_millis(10);
/// How long sidecars get to exit after their SIGTERM.
const SIDECAR_GRACE: Duration = Duration::from_secs(5);

/// The process's stop signals, with a lame-duck period before a graceful stop:
/// `SIGTERM` graceful stop, `SIGINT` immediate stop (also during the lame-duck period),
/// `SIGQUIT` Pingora's graceful upgrade.
pub struct Signals {
    /// The config in force: its `server.shutdown_delay` is the lame-duck period.
    pub store: Arc<ConfigStore>,
    /// Set at SIGTERM, for `/ready` and `Connection: close`.
    pub draining: Arc<AtomicBool>,
}

#[async_trait]
impl ShutdownSignalWatch for Signals {
    async fn recv(&self) -> ShutdownSignal {
        let mut quit = listen(SignalKind::quit());
        let mut terminate = listen(SignalKind::terminate());
        let mut interrupt = listen(SignalKind::interrupt());
        tokio::select! {
            _ = next(&mut quit) => ShutdownSignal::GracefulUpgrade,
            _ = next(&mut interrupt) => ShutdownSignal::FastShutdown,
            _ = next(&mut terminate) => {
                self.draining.store(true, Ordering::Release);
                let delay = self.store.load().server.shutdown_delay;
                tracing::info!(
                    "SIGTERM: not ready; listeners keep accepting for {delay:?}, then drain"
                );
                tokio::select! {
                    _ = tokio::time::sleep(delay) => ShutdownSignal::GracefulTerminate,
                    _ = next(&mut interrupt) => ShutdownSignal::FastShutdown,
                    _ = next(&mut quit) => ShutdownSignal::GracefulUpgrade,
                }
            }
        }
    }
}

fn listen(kind: SignalKind) -> Option<Signal> {
    signal(kind)
        .inspect_err(|e| tracing::error!("cannot handle signal {kind:?}: {e}"))
        .ok()
}

/// The next delivery of `signal`; never, if it could not be registered.
async fn next(signal: &mut Option<Signal>) {
    match signal {
        Some(signal) => {
            signal.recv().await;
        }
        None => std::future::pending().await,
    }
}

/// What a drain needs to watch and stop.
pub struct Drain {
    /// Told when the sockets go to a successor: the admin API stops accepting.
    pub handing_over: tokio::sync::watch::Sender<bool>,
    /// Removed at exit if it still names this process.
    pub pid_file: Option<std::path::PathBuf>,
    /// Requests in progress.
    pub in_flight: IntGauge,
    /// The config in force: its `server.shutdown_timeout` is the longest wait for them.
    pub store: Arc<ConfigStore>,
    /// Sidecars to stop once requests are done.
    pub supervisor: Arc<Supervisor>,
    /// Set when the drain starts, for `/ready`.
    pub draining: Arc<AtomicBool>,
    /// Flushed before exit.
    pub access_log: Arc<AccessLog>,
}

impl Drain {
    /// Watches Pingora's execution phases on a thread of its own; on the graceful grace
    /// period it drains and exits the process.
    pub fn watch(self, mut phases: broadcast::Receiver<ExecutionPhase>) {
        let spawned = thread::Builder::new()
            .name("drain".into())
            .spawn(move || loop {
                match phases.blocking_recv() {
                    // The new process confirmed it serves: it takes everything over.
                    Ok(ExecutionPhase::GracefulUpgradeCloseTimeout) => self.hand_over(),
                    Ok(ExecutionPhase::GracefulUpgradeAborted) => {
                        tracing::error!("upgrade aborted: the new process did not take over; this process keeps serving")
                    }
                    Ok(ExecutionPhase::ShutdownGracePeriod) => self.drain_and_exit(),
                    Ok(_) | Err(RecvError::Lagged(_)) => continue,
                    Err(RecvError::Closed) => return,
                }
            });
        if let Err(e) = spawned {
            tracing::error!(
                "cannot start the drain watcher, SIGTERM will wait the full grace period: {e}"
            );
        }
    }

    /// The sockets (and the sidecars' pipes) go to a successor: answers close their
    /// connections so clients move to it, the admin API leaves its socket to it, and the
    /// sidecars are its to run.
    fn hand_over(&self) {
        tracing::info!("upgrade: handing the sockets and sidecars to the new process");
        self.draining.store(true, Ordering::Release);
        self.handing_over.send_replace(true);
        self.supervisor.hand_over();
    }

    fn drain_and_exit(&self) -> ! {
        self.draining.store(true, Ordering::Release);
        // After a hand-over the unit lives on in the new process: telling systemd this
        // one stops would make it stop the unit.
        if !*self.handing_over.borrow() {
            super::notify::notify("STOPPING=1");
        }
        let deadline = Instant::now() + self.store.load().server.shutdown_timeout;
        tracing::info!(in_flight = self.in_flight.get(), "draining");
        while self.in_flight.get() > 0 && Instant::now() < deadline {
            thread::sleep(POLL);
        }
        let left = self.in_flight.get();
        if left > 0 {
            tracing::warn!(
                in_flight = left,
                "shutdown_timeout reached with requests still in flight"
            );
        }
        if !*self.handing_over.borrow() {
            self.supervisor.stop();
            if !self.supervisor.wait_stopped(SIDECAR_GRACE) {
                tracing::warn!("some sidecars did not exit within {SIDECAR_GRACE:?}");
            }
        }
        if let Some(pid_file) = &self.pid_file {
            super::upgrade::remove_pid_file(pid_file);
        }
        self.access_log.flush(Duration::from_secs(1));
        tracing::info!("stopped");
        std::process::exit(0)
    }
}
