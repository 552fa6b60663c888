//! The running process: loading and checking a config file, assembling Pingora's server
//! (listeners, admin API, background work), reloading, supervising sidecars, health checks,
//! shutdown and upgrade. The one layer that does I/O on the config's behalf.

mod health_checks;
mod notify;
pub mod preflight;
mod reload;
mod server;
mod shutdown;
mod supervisor;
mod upgrade;
mod watch;

use std::net::SocketAddr;
use std::path::Path;

pub use reload::Reloader;
pub use server::{run, RunOptions};
pub use supervisor::ProcessStatus;

use crate::config::{self, ConfigError, Env};
use crate::snapshot::{self, Snapshot};

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
    /// `--upgrade` without a process to take over from.
    #[error("--upgrade: {0}")]
    Upgrade(String),
}

/// Loads and fully validates a config file, including what it needs from the machine
/// (certificates, files, sidecar commands and secrets), without starting anything: what
/// `kingdom-edge check` runs. Needs no async runtime.
pub fn check(path: &Path) -> Result<Snapshot, Vec<ConfigError>> {
    let text = config::read(path)?;
    load(&text, &config::process_env)
}

/// Compiles `text` and verifies what it needs from the machine, reporting every error of
/// both in one pass, in file order.
pub fn load(text: &str, env: Env) -> Result<Snapshot, Vec<ConfigError>> {
    let compiled = snapshot::compile(text, env);
    let index = config::lines::LineIndex::new(text);
    let machine = match config::parse(text, &index) {
        Ok(raw) => config::locate_in(text, preflight::verify(&raw, env)),
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
