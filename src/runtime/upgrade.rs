//! Zero-downtime binary upgrade, on Pingora's hand-off of listening sockets.
//!
//! `SIGUSR2` (as in nginx) makes the running process start its successor: the binary at the
//! path it was started from, re-read from disk, with `run --upgrade --from <pid>` and the same
//! config file and upgrade socket. The successor loads and checks everything it can first
//! (config, certificates, its backends' health); then it listens on the upgrade socket and
//! itself sends the old process `SIGQUIT`. The old process sends every listening socket (the
//! admin API's too) and the pipes of its sidecars over that socket, and waits for the
//! successor to confirm that it serves (a byte back on the same connection, vendored
//! pingora-core patch 10). Only then does it give anything up: it keeps accepting for a few
//! seconds with `Connection: close` on every answer, drains its requests and exits without
//! stopping the sidecars, which the successor has adopted, so the sidecar pools never go down.
//! If the successor fails at any point before it confirms, the old process logs why and
//! keeps serving as before.
//!
//! `kingdom-edge run --upgrade` without `--from` takes over from the process whose pid is in
//! `server.pid_file`.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, IntoRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use pingora::server::ListenFds;

/// How long a successor waits for its upgrade socket to appear before it gives up signalling.
const SOCKET_WAIT: Duration = Duration::from_secs(10);

/// One of a sidecar process's pipes, as handed over: `stdin` (held open so the child keeps
/// running), `stdout` and `stderr` (relayed to the log; `stdout` closing means it exited).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pipe {
    Stdin,
    Stdout,
    Stderr,
}

impl Pipe {
    const ALL: [Pipe; 3] = [Pipe::Stdin, Pipe::Stdout, Pipe::Stderr];

    fn name(self) -> &'static str {
        match self {
            Pipe::Stdin => "stdin",
            Pipe::Stdout => "stdout",
            Pipe::Stderr => "stderr",
        }
    }
}

/// A running sidecar process as the hand-off table knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SidecarKey {
    /// Where it listens.
    pub address: SocketAddr,
    /// Its process id.
    pub pid: u32,
    /// What it was started with (`Sidecar::fingerprint`), so a successor whose config
    /// changed it restarts it rather than adopting it.
    pub fingerprint: String,
}

impl SidecarKey {
    /// The table key of one of its pipes: `sidecar|ADDRESS|PID|FINGERPRINT|PIPE`, no spaces
    /// (the table joins keys with spaces).
    fn key(&self, pipe: Pipe) -> String {
        format!(
            "sidecar|{}|{}|{}|{}",
            self.address,
            self.pid,
            self.fingerprint,
            pipe.name()
        )
    }

    fn parse(key: &str) -> Option<(SidecarKey, Pipe)> {
        let mut parts = key.split('|');
        if parts.next()? != "sidecar" {
            return None;
        }
        let address = parts.next()?.parse().ok()?;
        let pid = parts.next()?.parse().ok()?;
        let fingerprint = parts.next()?.to_string();
        let pipe = match parts.next()? {
            "stdin" => Pipe::Stdin,
            "stdout" => Pipe::Stdout,
            "stderr" => Pipe::Stderr,
            _ => return None,
        };
        parts.next().is_none().then_some((
            SidecarKey {
                address,
                pid,
                fingerprint,
            },
            pipe,
        ))
    }
}

/// Whether a hand-off key is a sidecar's pipe.
pub fn is_sidecar_key(key: &str) -> bool {
    SidecarKey::parse(key).is_some()
}

/// The hand-off table (Pingora's listening fds), shared by everything that puts descriptors
/// in it.
#[derive(Clone)]
pub struct Handoff(ListenFds);

impl Handoff {
    /// The table of a server, after its bootstrap.
    pub fn new(table: ListenFds) -> Self {
        Self(table)
    }

    /// The admin listener: the one the old process handed over, or a new one bound to
    /// `address`. Either way it is in the table, for the next upgrade.
    pub fn admin_listener(&self, address: SocketAddr) -> io::Result<std::net::TcpListener> {
        let key = address.to_string();
        let mut table = self.0.lock();
        let socket = match table.take(&key) {
            Some(inherited) => inherited,
            None => OwnedFd::from(std::net::TcpListener::bind(address)?),
        };
        let listener = std::net::TcpListener::from(socket.try_clone()?);
        listener.set_nonblocking(true)?;
        table.add(key, socket.into_raw_fd());
        Ok(listener)
    }

    /// Puts copies of a child's pipes in the table, so an upgrade hands them over.
    pub fn add_sidecar(&self, key: &SidecarKey, pipes: [&dyn AsFd; 3]) -> io::Result<()> {
        let copies: Vec<OwnedFd> = pipes
            .iter()
            .map(|p| p.as_fd().try_clone_to_owned())
            .collect::<io::Result<_>>()?;
        let mut table = self.0.lock();
        for (pipe, copy) in Pipe::ALL.into_iter().zip(copies) {
            table.add(key.key(pipe), copy.into_raw_fd());
        }
        Ok(())
    }

    /// Takes a child's pipes out of the table (it exited); dropping them closes them.
    pub fn remove_sidecar(&self, key: &SidecarKey) {
        let mut table = self.0.lock();
        for pipe in Pipe::ALL {
            drop(table.take(&key.key(pipe)));
        }
    }

    /// The sidecar processes the old process handed over, with copies of their pipes (the
    /// table keeps its own, for the next upgrade).
    pub fn handed_over(&self) -> Vec<HandedOver> {
        let table = self.0.lock();
        let mut found: Vec<SidecarKey> = table
            .keys()
            .filter_map(|k| SidecarKey::parse(k))
            .map(|(key, _)| key)
            .collect();
        found.sort_by_key(|k| (k.address, k.pid));
        found.dedup();
        drop(table);
        found
            .into_iter()
            .filter_map(|key| {
                let pipe = |pipe: Pipe| self.copy(&key.key(pipe));
                Some(HandedOver {
                    stdout: pipe(Pipe::Stdout)?,
                    stderr: pipe(Pipe::Stderr)?,
                    key,
                })
            })
            .collect()
    }

    /// Every key in the table, for the hand-off service to claim.
    pub fn keys(&self) -> Vec<String> {
        self.0.lock().keys().cloned().collect()
    }

    fn copy(&self, key: &str) -> Option<OwnedFd> {
        let mut table = self.0.lock();
        let owned = table.take(key)?;
        let copy = owned.try_clone().ok();
        table.add(key.to_string(), owned.into_raw_fd());
        copy
    }
}

/// A sidecar process the old process handed over.
#[derive(Debug)]
pub struct HandedOver {
    /// Which process it is.
    pub key: SidecarKey,
    /// Its output, to relay; end of file when it exits.
    pub stdout: OwnedFd,
    /// Its error output, to relay.
    pub stderr: OwnedFd,
}

/// Takes over from the process `from`: removes a stale upgrade socket, then, on a thread,
/// waits for this process to listen on it (Pingora's bootstrap binds it) and sends `from`
/// `SIGQUIT`, which makes it send its sockets.
pub fn signal_when_listening(socket: &Path, from: Pid) -> io::Result<()> {
    match std::fs::remove_file(socket) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let socket = socket.to_path_buf();
    std::thread::Builder::new()
        .name("upgrade".into())
        .spawn(move || {
            let deadline = Instant::now() + SOCKET_WAIT;
            while !socket.exists() {
                if Instant::now() > deadline {
                    tracing::error!(socket = %socket.display(), "upgrade: never listened on the upgrade socket; the old process keeps serving");
                    return;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            tracing::info!(pid = from.as_raw(), "upgrade: asking the old process for its sockets");
            if let Err(e) = kill(from, Signal::SIGQUIT) {
                tracing::error!(pid = from.as_raw(), "upgrade: cannot signal the old process: {e}");
            }
        })?;
    Ok(())
}

/// What a successor is started with.
pub struct Successor {
    /// The binary, as its path is now (a symlink is followed when it starts).
    pub exe: PathBuf,
    /// The config file, absolute.
    pub config: PathBuf,
    /// The upgrade socket this process will send its sockets to.
    pub socket: PathBuf,
    /// Set while a successor is on its way (and for good once it took over): a second
    /// `SIGUSR2` is ignored.
    pub busy: Arc<AtomicBool>,
}

/// Starts the successor of this process: `exe run -c config --upgrade --from <our pid>
/// --upgrade-socket <socket>`, with our environment and standard streams. A thread reaps it
/// if it exits (an upgrade that failed: this process keeps serving, and may try again).
pub fn start_successor(successor: &Successor) -> io::Result<u32> {
    let mut child = Command::new(&successor.exe)
        .arg("run")
        .arg("-c")
        .arg(&successor.config)
        .arg("--upgrade")
        .arg("--from")
        .arg(std::process::id().to_string())
        .arg("--upgrade-socket")
        .arg(&successor.socket)
        .spawn()?;
    let pid = child.id();
    let busy = successor.busy.clone();
    std::thread::Builder::new()
        .name("successor".into())
        .spawn(move || {
            match child.wait() {
                Ok(status) => {
                    tracing::error!(pid, %status, "upgrade failed: the new process exited")
                }
                Err(e) => tracing::error!(pid, "upgrade: cannot wait for the new process: {e}"),
            }
            busy.store(false, Ordering::SeqCst);
        })?;
    Ok(pid)
}

/// Starts a successor on `SIGUSR2`, one at a time, for as long as the process runs.
pub async fn upgrade_on_sigusr2(successor: Successor) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut usr2 = match signal(SignalKind::user_defined2()) {
        Ok(usr2) => usr2,
        Err(e) => {
            tracing::error!("cannot handle SIGUSR2, upgrade with `run --upgrade`: {e}");
            return;
        }
    };
    let exe = successor.exe.display().to_string();
    while usr2.recv().await.is_some() {
        if successor.busy.swap(true, Ordering::SeqCst) {
            tracing::warn!("SIGUSR2 ignored: an upgrade is already under way, or done");
            continue;
        }
        match start_successor(&successor) {
            Ok(pid) => tracing::info!(pid, %exe, "SIGUSR2: started the new process"),
            Err(e) => {
                successor.busy.store(false, Ordering::SeqCst);
                tracing::error!(%exe, "SIGUSR2: cannot start the new process: {e}")
            }
        }
    }
}

/// The path this binary was started by, for a successor to run: `argv[0]` made absolute
/// when it names a path (so a symlink switched to a new release is followed), else the
/// executable itself.
pub fn own_path() -> io::Result<PathBuf> {
    match std::env::args_os().next().map(PathBuf::from) {
        Some(argv0) if argv0.components().count() > 1 => std::path::absolute(argv0),
        _ => std::env::current_exe(),
    }
}

/// The process to take over from: a pid above 1, not this process, running the same
/// program (its name, as the kernel has it, is ours), so a stale pid file never makes us
/// signal a stranger.
pub fn predecessor(pid: i32) -> Result<Pid, String> {
    if pid <= 1 || pid == std::process::id() as i32 {
        return Err(format!("{pid} is not a process to take over from"));
    }
    let name = |of: &str| std::fs::read_to_string(format!("/proc/{of}/comm")).ok();
    match (name(&pid.to_string()), name("self")) {
        (None, _) => Err(format!("no process {pid} is running")),
        (Some(theirs), Some(ours)) if theirs != ours => Err(format!(
            "process {pid} is `{}`, not kingdom-edge",
            theirs.trim()
        )),
        _ => Ok(Pid::from_raw(pid)),
    }
}

/// The pid in `pid_file`.
pub fn pid_in(pid_file: &Path) -> Result<i32, String> {
    let text = std::fs::read_to_string(pid_file)
        .map_err(|e| format!("cannot read {}: {e}", pid_file.display()))?;
    text.trim()
        .parse::<i32>()
        .map_err(|_| format!("no pid in {}", pid_file.display()))
}

/// Writes this process's pid to `path` (replacing it whole).
pub fn write_pid_file(path: &Path) -> io::Result<()> {
    let staged = path.with_extension("pid.new");
    std::fs::write(&staged, format!("{}\n", std::process::id()))?;
    std::fs::rename(&staged, path)
}

/// Removes `path` if it still names this process (a successor may have replaced it).
pub fn remove_pid_file(path: &Path) {
    let ours = std::fs::read_to_string(path)
        .ok()
        .is_some_and(|text| text.trim() == std::process::id().to_string());
    if ours {
        let _ = std::fs::remove_file(path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sidecar_keys_round_trip_and_hold_no_space() {
        let key = SidecarKey {
            address: "[::1]:9101".parse().unwrap(),
            pid: 4242,
            fingerprint: "0a1b2c3d4e5f".into(),
        };
        for pipe in Pipe::ALL {
            let text = key.key(pipe);
            assert!(!text.contains(char::is_whitespace), "{text}");
            assert_eq!(SidecarKey::parse(&text), Some((key.clone(), pipe)));
        }
        assert_eq!(SidecarKey::parse("127.0.0.1:8080"), None, "a listener");
        assert_eq!(SidecarKey::parse("sidecar|x|1|f|stdin"), None);
        assert_eq!(
            SidecarKey::parse("sidecar|127.0.0.1:1|1|f|stdin|more"),
            None
        );
    }
}
