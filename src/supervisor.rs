//! Sidecar supervision: one child process per configured address, restarted with backoff when
//! it exits, its output logged under its name, and stopped when the proxy stops.
//!
//! Children get `--exit-on-stdin-eof` and a pipe for stdin, so they also exit when the proxy
//! dies without a chance to stop them (SIGKILL, crash).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use prometheus::IntCounter;
use serde::Serialize;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::Command;
use tokio::sync::Notify;

use crate::metrics::Metrics;
use crate::snapshot::Sidecar;

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
    processes: Vec<Arc<Process>>,
    stopping: AtomicBool,
    stop_requested: Notify,
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
    /// Plans one process per address of every sidecar; nothing starts until [`Self::run`].
    /// `on_back` hears of each restarted child once it listens again.
    pub fn new(sidecars: &[Sidecar], metrics: &Metrics, on_back: OnBack) -> Self {
        let processes = sidecars
            .iter()
            .flat_map(|s| {
                s.addresses.iter().map(|address| {
                    Arc::new(Process {
                        sidecar: s.clone(),
                        address: *address,
                        pid: AtomicU32::new(0),
                        restarts: metrics.sidecar_restarts(&s.name, &address.to_string()),
                    })
                })
            })
            .collect();
        Self {
            processes,
            stopping: AtomicBool::new(false),
            stop_requested: Notify::new(),
            running: Mutex::new(0),
            exited: Condvar::new(),
            on_back,
        }
    }

    /// Starts every child and keeps them running until [`Self::stop`].
    pub async fn run(self: Arc<Self>) {
        let tasks: Vec<_> = self
            .processes
            .iter()
            .map(|p| tokio::spawn(self.clone().keep_running(p.clone())))
            .collect();
        for task in tasks {
            let _ = task.await;
        }
    }

    async fn keep_running(self: Arc<Self>, process: Arc<Process>) {
        let name = &process.sidecar.name;
        let mut backoff = MIN_BACKOFF;
        let mut first = true;
        while !self.stopping.load(Ordering::Acquire) {
            if !first {
                process.restarts.inc();
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = self.stop_requested.notified() => break,
                }
                if self.stopping.load(Ordering::Acquire) {
                    break;
                }
            }
            let restarted = !first;
            first = false;
            let started = Instant::now();
            match self.run_once(&process, restarted).await {
                Ok(status) if self.stopping.load(Ordering::Acquire) => {
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
    }

    async fn run_once(
        &self,
        process: &Process,
        restarted: bool,
    ) -> std::io::Result<std::process::ExitStatus> {
        let program = resolve(&process.sidecar.command).ok_or_else(|| {
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
        self.stop_requested.notify_waiters();
        for process in &self.processes {
            let pid = process.pid.load(Ordering::Acquire);
            if pid != 0 {
                let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
            }
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

    /// Every child's pid and restart count.
    pub fn status(&self) -> Vec<ProcessStatus> {
        self.processes
            .iter()
            .map(|p| ProcessStatus {
                sidecar: p.sidecar.name.clone(),
                address: p.address.to_string(),
                pid: Some(p.pid.load(Ordering::Acquire)).filter(|pid| *pid != 0),
                restarts: p.restarts.get(),
            })
            .collect()
    }

    fn lock_running(&self) -> std::sync::MutexGuard<'_, usize> {
        self.running.lock().unwrap_or_else(|p| p.into_inner())
    }
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

/// How to start a sidecar.
#[derive(Debug, PartialEq, Eq)]
pub struct Program {
    /// The executable.
    pub path: PathBuf,
    /// For a service built into `kingdom-edge` itself, the subcommand that runs it.
    pub builtin: Option<&'static str>,
}

/// Finds a sidecar: a path as given; else a binary of that name next to our own executable,
/// else on PATH; else, for `kingdom-content` and `kingdom-api`, the copy of the service built
/// into this binary (so `cargo run` works before the sidecar binaries are built).
pub fn resolve(command: &str) -> Option<Program> {
    if command.contains('/') {
        return Some(Program {
            path: PathBuf::from(command),
            builtin: None,
        });
    }
    let exe = std::env::current_exe().ok();
    let beside = exe
        .as_ref()
        .and_then(|exe| exe.parent().map(|dir| dir.join(command)));
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>())
        .map(|dir| dir.join(command));
    if let Some(path) = beside.into_iter().chain(on_path).find(|p| is_executable(p)) {
        return Some(Program {
            path,
            builtin: None,
        });
    }
    let builtin = match command {
        "kingdom-content" => "content",
        "kingdom-api" => "api",
        _ => return None,
    };
    exe.map(|path| Program {
        path,
        builtin: Some(builtin),
    })
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

async fn relay(stream: impl AsyncRead + Unpin, sidecar: String, address: SocketAddr) {
    let mut lines = BufReader::new(stream).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        tracing::info!(target: "sidecar", sidecar = %sidecar, address = %address, "{line}");
    }
}

#[cfg(test)]
mod tests {

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

    use super::*;

    #[test]
    fn resolves_paths_and_path_lookups() {
        let found = |command| resolve(command).map(|p| (p.path, p.builtin));
        assert_eq!(found("/bin/true"), Some((PathBuf::from("/bin/true"), None)));
        assert!(found("sh").is_some_and(|(p, b)| p.ends_with("sh") && b.is_none()));
        assert_eq!(found("no-such-binary-kingdom"), None);
        // Built into kingdom-edge, when no binary of that name is installed.
        assert!(found("kingdom-api").is_some());
    }
}
