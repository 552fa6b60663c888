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
//!
//! Every child's pipes are also in the upgrade hand-off table: a successor process adopts
//! the children (relays their output, holds their stdin open, stops or restarts them as its
//! config says), so an upgrade does not restart the sidecars. Once this process has handed
//! them over it neither restarts nor stops them.

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

use super::upgrade::{HandedOver, Handoff, SidecarKey};
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
/// How long a child a reload removed or replaced has to exit after its SIGTERM before it
/// gets a SIGKILL (its replacement waits for the address).
const KILL_AFTER: Duration = Duration::from_secs(10);

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
    /// The upgrade hand-off table the children's pipes are kept in.
    handoff: OnceLock<Handoff>,
    /// Children an old process handed over, until the first reconciliation adopts them.
    handed: Mutex<Vec<HandedOver>>,
    /// Set once the children were handed to a successor: they are its to run now.
    handed_over: AtomicBool,
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
    /// A child an old process handed over, run (to its end) before any child of our own.
    adopted: Mutex<Option<HandedOver>>,
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
    /// A reload removed or replaced it; it is on its way out.
    pub retiring: bool,
}

impl Supervisor {
    /// A supervisor with nothing to run yet; `on_back` hears of each restarted child once it
    /// listens again.
    pub fn new(metrics: Arc<Metrics>, on_back: OnBack) -> Self {
        Self {
            processes: Mutex::default(),
            retiring: Mutex::default(),
            runtime: OnceLock::new(),
            handoff: OnceLock::new(),
            handed: Mutex::default(),
            handed_over: AtomicBool::new(false),
            metrics,
            stopping: AtomicBool::new(false),
            running: Mutex::new(0),
            exited: Condvar::new(),
            on_back,
        }
    }

    /// Keeps the children's pipes in `handoff`, and adopts the children it holds from an
    /// old process. Called once, before [`Self::start`].
    pub fn use_handoff(&self, handoff: Handoff) {
        *lock(&self.handed) = handoff.handed_over();
        let _ = self.handoff.set(handoff);
    }

    /// The children are a successor's now: stop supervising them, and never stop them.
    pub fn hand_over(&self) {
        self.handed_over.store(true, Ordering::Release);
        for process in lock(&self.processes).values() {
            process.wake.notify_waiters();
        }
    }

    /// Runs the children on the calling runtime from now on; reconciliations before this do
    /// nothing (the first one after it starts the children).
    pub fn run_here(&self) {
        let _ = self.runtime.set(tokio::runtime::Handle::current());
    }

    /// Makes the running processes those of `sidecars`: starts what is new, stops what is
    /// gone, restarts what changed. Returns at once; the processes follow.
    pub fn reconcile(self: &Arc<Self>, sidecars: &[Sidecar]) {
        let Some(runtime) = self.runtime.get() else {
            return;
        };
        if self.stopping.load(Ordering::Acquire) || self.handed_over.load(Ordering::Acquire) {
            return;
        }
        let mut handed = std::mem::take(&mut *lock(&self.handed));
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
                runtime.spawn(kill_if_stuck(process.clone()));
                retiring.push(process.clone());
                let named = |(a, s): &&(SocketAddr, &Sidecar)| {
                    a == address && s.name == process.sidecar.name
                };
                if !wanted.iter().any(|w| named(&w)) {
                    self.metrics
                        .retire_sidecar(&process.sidecar.name, &address.to_string());
                }
            }
            keep
        });
        for (address, sidecar) in wanted {
            if processes.contains_key(&address) {
                continue;
            }
            // A child handed over for this address, started the same way, is adopted.
            let fingerprint = sidecar.fingerprint();
            let adopted = handed
                .iter()
                .position(|h| h.key.address == address && h.key.fingerprint == fingerprint)
                .map(|i| handed.swap_remove(i));
            let restarts = self
                .metrics
                .sidecar_restarts(&sidecar.name, &address.to_string());
            let process = self.process(sidecar, address, adopted, restarts);
            processes.insert(address, process.clone());
            runtime.spawn(self.clone().keep_running(process));
        }
        // Handed-over children the config no longer wants as they are: stopped, and a
        // replacement at the same address waits for them to exit.
        for child in handed {
            let sidecar = Sidecar {
                name: "handed-over".into(),
                command: String::new(),
                addresses: vec![child.key.address],
                args: Vec::new(),
                env: Default::default(),
            };
            // Its name is unknown: it counts restarts nowhere.
            let restarts = IntCounter::new("kingdom_edge_detached", "not exported")
                .expect("static metric definition");
            let process = self.process(&sidecar, child.key.address, Some(child), restarts);
            process.retired.store(true, Ordering::SeqCst);
            retiring.push(process.clone());
            runtime.spawn(kill_if_stuck(process.clone()));
            runtime.spawn(self.clone().keep_running(process));
        }
    }

    fn process(
        &self,
        sidecar: &Sidecar,
        address: SocketAddr,
        adopted: Option<HandedOver>,
        restarts: IntCounter,
    ) -> Arc<Process> {
        Arc::new(Process {
            sidecar: sidecar.clone(),
            address,
            pid: AtomicU32::new(0),
            restarts,
            retired: AtomicBool::new(false),
            adopted: Mutex::new(adopted),
            wake: Notify::new(),
            finished: watch::Sender::new(false),
        })
    }

    async fn keep_running(self: Arc<Self>, process: Arc<Process>) {
        let name = &process.sidecar.name;
        let mut backoff = MIN_BACKOFF;
        let mut first = true;
        let adopted = lock(&process.adopted).take();
        match adopted {
            Some(child) => {
                self.run_adopted(&process, child).await;
                first = false;
            }
            // A replaced process still holds the address until it exits.
            None => self.predecessors_gone(&process).await,
        }
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
        // Not killed when its handle is dropped: after an upgrade it outlives this process.
        // It exits when told to, and when every holder of its stdin is gone.
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
            .spawn()?;
        let pid = child.id().unwrap_or(0);
        // SeqCst with `retired` (see `Process::retire`): one of the two sides sees the other.
        process.pid.store(pid, Ordering::SeqCst);
        *self.lock_running() += 1;
        tracing::info!(sidecar = %process.sidecar.name, address = %process.address, pid, program = %program.path.display(), builtin = program.builtin.is_some(), "sidecar started");
        let key = SidecarKey {
            address: process.address,
            pid,
            fingerprint: process.sidecar.fingerprint(),
        };
        let _stdin = child.stdin.take();
        if let (Some(handoff), Some(stdin), Some(out), Some(err)) =
            (self.handoff.get(), &_stdin, &child.stdout, &child.stderr)
        {
            if let Err(e) = handoff.add_sidecar(&key, [stdin, out, err]) {
                tracing::warn!(sidecar = %process.sidecar.name, address = %process.address, "an upgrade will restart this sidecar: {e}");
            }
        }
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
        if let Some(handoff) = self.handoff.get() {
            handoff.remove_sidecar(&key);
        }
        process.pid.store(0, Ordering::Release);
        *self.lock_running() -= 1;
        self.exited.notify_all();
        status
    }

    /// Runs a child an old process handed over until it exits (its output ends): relays
    /// its output, and stops it first if the config does not want it as it is.
    async fn run_adopted(&self, process: &Process, child: HandedOver) {
        let HandedOver {
            key,
            stdout,
            stderr,
        } = child;
        process.pid.store(key.pid, Ordering::Release);
        *self.lock_running() += 1;
        tracing::info!(sidecar = %process.sidecar.name, address = %process.address, pid = key.pid, "sidecar adopted from the previous process");
        if !process.wanted(self) {
            process.terminate();
        }
        let (name, address) = (process.sidecar.name.clone(), process.address);
        match (
            tokio::net::unix::pipe::Receiver::from_owned_fd(stdout),
            tokio::net::unix::pipe::Receiver::from_owned_fd(stderr),
        ) {
            (Ok(out), Ok(err)) => {
                tokio::spawn(relay(err, name.clone(), address));
                // Its output ends when it exits (or closes it): then wait for the process
                // itself to be gone, whoever reaps it.
                relay(out, name, address).await;
                while kill(Pid::from_raw(key.pid as i32), None).is_ok() {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
            (Err(e), _) | (_, Err(e)) => {
                tracing::error!(sidecar = %name, %address, pid = key.pid, "cannot follow the adopted sidecar, stopping it: {e}");
                process.terminate();
            }
        }
        tracing::info!(sidecar = %process.sidecar.name, address = %process.address, pid = key.pid, "adopted sidecar exited");
        if let Some(handoff) = self.handoff.get() {
            handoff.remove_sidecar(&key);
        }
        process.pid.store(0, Ordering::Release);
        *self.lock_running() -= 1;
        self.exited.notify_all();
    }

    /// Stops restarting children and sends each a SIGTERM (unless they were handed to a
    /// successor). Returns at once.
    pub fn stop(&self) {
        if self.handed_over.load(Ordering::SeqCst) {
            return;
        }
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

    /// Every child's pid and restart count, by address; those on their way out too.
    pub fn status(&self) -> Vec<ProcessStatus> {
        let processes = lock(&self.processes);
        let retiring = lock(&self.retiring);
        let running = retiring.iter().filter(|p| !*p.finished.borrow());
        let mut status: Vec<ProcessStatus> = processes
            .values()
            .chain(running)
            .map(|p| ProcessStatus {
                sidecar: p.sidecar.name.clone(),
                address: p.address.to_string(),
                pid: Some(p.pid.load(Ordering::Acquire)).filter(|pid| *pid != 0),
                restarts: p.restarts.get(),
                retiring: p.retired.load(Ordering::Acquire),
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
    /// Whether it should (still) run, and be run by this process.
    fn wanted(&self, supervisor: &Supervisor) -> bool {
        !self.retired.load(Ordering::SeqCst)
            && !supervisor.stopping.load(Ordering::SeqCst)
            && !supervisor.handed_over.load(Ordering::SeqCst)
    }

    /// Stops it for good: a reload removed or replaced it.
    fn retire(&self) {
        // SeqCst with `pid` (see `run_once`): a child starting now either sees this, or
        // has its pid seen here.
        self.retired.store(true, Ordering::SeqCst);
        self.wake.notify_waiters();
        self.terminate();
    }

    /// Sends the running child, if any, a SIGTERM.
    fn terminate(&self) {
        self.signal(Signal::SIGTERM);
    }

    fn signal(&self, signal: Signal) {
        let pid = self.pid.load(Ordering::SeqCst);
        if pid != 0 {
            let _ = kill(Pid::from_raw(pid as i32), signal);
        }
    }
}

/// SIGKILLs a retired process's child if it has not exited [`KILL_AFTER`] after its
/// SIGTERM: a replacement is waiting for its address.
async fn kill_if_stuck(process: Arc<Process>) {
    let mut finished = process.finished.subscribe();
    let exited = tokio::time::timeout(KILL_AFTER, finished.wait_for(|done| *done)).await;
    if exited.is_err() {
        tracing::warn!(sidecar = %process.sidecar.name, address = %process.address, "sidecar ignored SIGTERM for {KILL_AFTER:?}: killing it");
        process.signal(Signal::SIGKILL);
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
