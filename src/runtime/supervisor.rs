//! Sidecar supervision: one child process per configured address, restarted with backoff when
//! it exits, its output logged under its name, and stopped when the proxy stops.
//!
//! Children get `--exit-on-stdin-eof` and a pipe for stdin, so they also exit when the proxy
//! dies without a chance to stop them (SIGKILL, crash).
//!
//! [`Supervisor::reconcile`] follows the config: a sidecar address that is new starts a
//! process, one that is gone stops its process, and one whose command, arguments or
//! environment changed is restarted (the new process starts once the old one has exited, as
//! both need the address).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use prometheus::IntCounter;
use serde::Serialize;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::Command;
use tokio::sync::{watch, Notify};

use crate::metrics::Metrics;
use crate::sidecar::launch::{self, Sidecar};

/// First restart delay; doubles on each quick exit up to [`MAX_BACKOFF`].
const MIN_BACKOFF: Duration = Duration::from_millis(100);
/// Longest restart delay.
const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// A child that ran this long is considered healthy again: the next restart is quick.
const STABLE_AFTER: Duration = Duration::from_secs(10);
/// How long a restarted child has to start listening before nobody is told it is back.
const LISTEN_WAIT: Duration = Duration::from_secs(30);

/// Told the address of a restarted child as soon as it accepts connections again.
pub type OnBack = Box<dyn Fn(SocketAddr) + Send + Sync>;

/// Supervises every sidecar process.
pub struct Supervisor {
    /// The processes the config asks for, by address.
    processes: Mutex<HashMap<SocketAddr, Arc<Process>>>,
    /// Processes a reload removed or replaced, until their last child has exited.
    retiring: Mutex<Vec<Arc<Process>>>,
    /// The runtime the children are spawned and awaited on (the supervisor's service).
    runtime: OnceLock<tokio::runtime::Handle>,
    metrics: Arc<Metrics>,
    stopping: AtomicBool,
    running: Mutex<usize>,
    exited: Condvar,
    on_back: OnBack,
}

/// One supervised child: a sidecar at one address.
struct Process {
    sidecar: Sidecar,
    address: SocketAddr,
    pid: AtomicU32,
    restarts: IntCounter,
    /// Set when a reload removed or replaced it: it is stopped and not restarted.
    retired: AtomicBool,
    wake: Notify,
    /// True once its last child has exited and it will start no other.
    finished: watch::Sender<bool>,
}

/// A child's state, for `/status`.
#[derive(Debug, Serialize)]
pub struct ProcessStatus {
    pub sidecar: String,
    pub address: String,
    /// `None` while it is not running (between a crash and its restart).
    pub pid: Option<u32>,
    pub restarts: u64,
}

impl Supervisor {
    /// A supervisor with nothing to run yet; `on_back` hears of each restarted child once it
    /// listens again.
    pub fn new(metrics: Arc<Metrics>, on_back: OnBack) -> Self {
        Self {
            processes: Mutex::default(),
            retiring: Mutex::default(),
            runtime: OnceLock::new(),
            metrics,
            stopping: AtomicBool::new(false),
            running: Mutex::new(0),
            exited: Condvar::new(),
            on_back,
        }
    }

    /// Starts the children of `sidecars` on the calling runtime, where later
    /// reconciliations start theirs too.
    pub fn start(self: &Arc<Self>, sidecars: &[Sidecar]) {
        let _ = self.runtime.set(tokio::runtime::Handle::current());
        self.reconcile(sidecars);
    }

    /// Makes the running processes those of `sidecars`: starts what is new, stops what is
    /// gone, restarts what changed. Returns at once; the processes follow.
    pub fn reconcile(self: &Arc<Self>, sidecars: &[Sidecar]) {
        let Some(runtime) = self.runtime.get() else {
            return;
        };
        if self.stopping.load(Ordering::Acquire) {
            return;
        }
        let wanted: Vec<(SocketAddr, &Sidecar)> = sidecars
            .iter()
            .flat_map(|s| s.addresses.iter().map(move |a| (*a, s)))
            .collect();
        let mut processes = lock(&self.processes);
        let mut retiring = lock(&self.retiring);
        retiring.retain(|p| !*p.finished.borrow());
        processes.retain(|address, process| {
            let keep = wanted
                .iter()
                .any(|(a, s)| a == address && s.same_process(&process.sidecar));
            if !keep {
                process.retire();
                retiring.push(process.clone());
                if !wanted.iter().any(|(a, _)| a == address) {
                    self.metrics
                        .retire_sidecar(&process.sidecar.name, &address.to_string());
                }
            }
            keep
        });
        drop(retiring);
        for (address, sidecar) in wanted {
            if processes.contains_key(&address) {
                continue;
            }
            let process = Arc::new(Process {
                sidecar: sidecar.clone(),
                address,
                pid: AtomicU32::new(0),
                restarts: self
                    .metrics
                    .sidecar_restarts(&sidecar.name, &address.to_string()),
                retired: AtomicBool::new(false),
                wake: Notify::new(),
                finished: watch::Sender::new(false),
            });
            processes.insert(address, process.clone());
            runtime.spawn(self.clone().keep_running(process));
        }
    }

    async fn keep_running(self: Arc<Self>, process: Arc<Process>) {
        // A replaced process still holds the address until it exits.
        self.predecessors_gone(&process).await;
        let name = &process.sidecar.name;
        let mut backoff = MIN_BACKOFF;
        let mut first = true;
        while process.wanted(&self) {
            if !first {
                process.restarts.inc();
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = process.wake.notified() => {}
                }
                if !process.wanted(&self) {
                    break;
                }
            }
            let restarted = !first;
            first = false;
            let started = Instant::now();
            match self.run_once(&process, restarted).await {
                Ok(status) if !process.wanted(&self) => {
                    tracing::info!(sidecar = %name, address = %process.address, %status, "sidecar stopped")
                }
                Ok(status) => {
                    tracing::warn!(sidecar = %name, address = %process.address, %status, "sidecar exited")
                }
                Err(e) => {
                    tracing::error!(sidecar = %name, address = %process.address, "cannot start sidecar: {e}")
                }
            }
            backoff = next_backoff(backoff, started.elapsed());
        }
        process.finished.send_replace(true);
    }

    /// Waits until no earlier process of `address` (one a reload replaced) still runs.
    async fn predecessors_gone(&self, process: &Process) {
        let earlier: Vec<watch::Receiver<bool>> = lock(&self.retiring)
            .iter()
            .filter(|p| p.address == process.address)
            .map(|p| p.finished.subscribe())
            .collect();
        for mut finished in earlier {
            let _ = finished.wait_for(|done| *done).await;
        }
    }

    async fn run_once(
        &self,
        process: &Process,
        restarted: bool,
    ) -> std::io::Result<std::process::ExitStatus> {
        let program = launch::resolve(&process.sidecar.command).ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!(
                    "`{}` is neither next to the kingdom-edge binary nor on PATH",
                    process.sidecar.command
                ),
            )
        })?;
        let mut child = Command::new(&program.path)
            .args(program.builtin)
            .arg("--listen")
            .arg(process.address.to_string())
            .arg("--exit-on-stdin-eof")
            .args(&process.sidecar.args)
            .envs(&process.sidecar.env)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()?;
        let _stdin = child.stdin.take();
        let pid = child.id().unwrap_or(0);
        process.pid.store(pid, Ordering::Release);
        *self.lock_running() += 1;
        tracing::info!(sidecar = %process.sidecar.name, address = %process.address, pid, program = %program.path.display(), builtin = program.builtin.is_some(), "sidecar started");
        if let Some(out) = child.stdout.take() {
            tokio::spawn(relay(out, process.sidecar.name.clone(), process.address));
        }
        if let Some(err) = child.stderr.take() {
            tokio::spawn(relay(err, process.sidecar.name.clone(), process.address));
        }
        // Retired while it started: stop it now (the retirement found no pid to signal).
        if !process.wanted(self) {
            process.terminate();
        }
        let wait = child.wait();
        tokio::pin!(wait);
        let mut exited = None;
        if restarted {
            // Tell whoever ejected the old process that the new one is up, as soon as it is.
            tokio::select! {
                status = &mut wait => exited = Some(status),
                listening = listening_within(process.address, LISTEN_WAIT) => {
                    if listening {
                        (self.on_back)(process.address);
                    }
                }
            }
        }
        let status = match exited {
            Some(status) => status,
            None => wait.await,
        };
        process.pid.store(0, Ordering::Release);
        *self.lock_running() -= 1;
        self.exited.notify_all();
        status
    }

    /// Stops restarting children and sends each a SIGTERM. Returns at once.
    pub fn stop(&self) {
        self.stopping.store(true, Ordering::Release);
        for process in lock(&self.processes).values() {
            process.wake.notify_waiters();
            process.terminate();
        }
        for process in lock(&self.retiring).iter() {
            process.terminate();
        }
    }

    /// Blocks until every child has exited or `timeout` passes; true if all exited.
    pub fn wait_stopped(&self, timeout: Duration) -> bool {
        let guard = self.lock_running();
        let (count, _) = self
            .exited
            .wait_timeout_while(guard, timeout, |running| *running > 0)
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        *count == 0
    }

    /// Every child's pid and restart count, by address.
    pub fn status(&self) -> Vec<ProcessStatus> {
        let processes = lock(&self.processes);
        let mut status: Vec<ProcessStatus> = processes
            .values()
            .map(|p| ProcessStatus {
                sidecar: p.sidecar.name.clone(),
                address: p.address.to_string(),
                pid: Some(p.pid.load(Ordering::Acquire)).filter(|pid| *pid != 0),
                restarts: p.restarts.get(),
            })
            .collect();
        status.sort_by(|a, b| (&a.sidecar, &a.address).cmp(&(&b.sidecar, &b.address)));
        status
    }

    fn lock_running(&self) -> MutexGuard<'_, usize> {
        lock(&self.running)
    }
}

impl Process {
    /// Whether it should (still) run.
    fn wanted(&self, supervisor: &Supervisor) -> bool {
        !self.retired.load(Ordering::Acquire) && !supervisor.stopping.load(Ordering::Acquire)
    }

    /// Stops it for good: a reload removed or replaced it.
    fn retire(&self) {
        self.retired.store(true, Ordering::Release);
        self.wake.notify_waiters();
        self.terminate();
    }

    /// Sends the running child, if any, a SIGTERM.
    fn terminate(&self) {
        let pid = self.pid.load(Ordering::Acquire);
        if pid != 0 {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The delay before the next restart, after a child that ran for `ran` was restarted after
/// `backoff`: doubling while it keeps exiting quickly, back to the minimum after a stable run.
fn next_backoff(backoff: Duration, ran: Duration) -> Duration {
    if ran >= STABLE_AFTER {
        MIN_BACKOFF
    } else {
        (backoff * 2).min(MAX_BACKOFF)
    }
}

/// Whether `address` accepts a TCP connection within `wait`, trying every 20 ms.
async fn listening_within(address: SocketAddr, wait: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + wait;
    while tokio::time::Instant::now() < deadline {
        let attempt = tokio::time::timeout(
            Duration::from_millis(250),
            tokio::net::TcpStream::connect(address),
        );
        if let Ok(Ok(_)) = attempt.await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

async fn relay(stream: impl AsyncRead + Unpin, sidecar: String, address: SocketAddr) {
    let mut lines = BufReader::new(stream).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        tracing::info!(target: "sidecar", sidecar = %sidecar, address = %address, "{line}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restarts_back_off_while_a_child_keeps_crashing() {
        let quick = Duration::from_millis(5);
        let mut backoff = MIN_BACKOFF;
        let mut delays = Vec::new();
        for _ in 0..9 {
            backoff = next_backoff(backoff, quick);
            delays.push(backoff.as_millis());
        }
        assert_eq!(
            delays,
            [200, 400, 800, 1600, 3200, 6400, 10_000, 10_000, 10_000]
        );
        assert_eq!(next_backoff(MAX_BACKOFF, STABLE_AFTER), MIN_BACKOFF);
    }
}
