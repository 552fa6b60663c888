//! The compiled, immutable config, and its life: [`compile`] (pure: the file's text and the
//! environment in, a snapshot or every error out), [`activate`] (binds it to the live state
//! that outlives snapshots), [`ConfigStore::swap`] (publishes it). A request loads one
//! snapshot and uses it throughout, so a reload landing mid-request never mixes two configs.

mod activate;
mod compile;
pub mod diff;
mod store;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

pub use activate::{activate, in_force};
pub use compile::compile;
pub use store::{ConfigStore, ReloadReport, Trigger};

use crate::access_log::AccessLogOutput;
use crate::forwarded::TrustedProxies;
use crate::metrics::RouteMetrics;
use crate::ratelimit::slowdown::SlowDown;
use crate::ratelimit::RateLimit;
use crate::request::{ClientTimeouts, Hygiene};
use crate::route::{PoolId, Route, RouteId, Router};
use crate::sidecar::launch::Sidecar;
use crate::tls::TlsSettings;
use crate::token::TokenVerifier;
use crate::upstream::Pool;

/// Everything a request or the runtime needs from the config.
pub struct Snapshot {
    /// Counts loads in this process: 1 for the first, then one more per applied reload.
    pub version: u64,
    /// First 12 hex digits of the SHA-256 of the file text.
    pub digest: String,
    /// `server:`.
    pub server: ServerSettings,
    /// `listeners:`.
    pub listeners: Vec<Listener>,
    /// `admin:`; `None` runs no admin listener.
    pub admin: Option<AdminSettings>,
    /// `sidecars:`.
    pub sidecars: Vec<Sidecar>,
    /// `pools:`, by name order; a [`PoolId`] indexes this.
    pub pools: Vec<Pool>,
    /// `routes:`.
    pub router: Router,
    /// Where access-log lines go.
    pub access_log: AccessLogOutput,
    /// How bearer tokens are verified (`tokens:`), for routes with `auth`.
    pub tokens: Option<TokenVerifier>,
    /// `rate_limits:`, by name order; routes refer to them by index.
    pub rate_limits: Vec<RateLimit>,
    /// `slow_down:`, likewise.
    pub slow_downs: Vec<SlowDown>,
    /// `cache:`: the response cache's size (the process keeps the one it started with).
    pub cache: crate::cache::Settings,
    /// Counters for requests that matched no route.
    pub unrouted: Arc<RouteMetrics>,
}

impl Snapshot {
    /// The route with this id.
    pub fn route(&self, id: RouteId) -> &Route {
        &self.router.routes()[id]
    }

    /// The pool with this id.
    pub fn pool(&self, id: PoolId) -> &Pool {
        &self.pools[id]
    }

    /// The pool named `name`.
    pub fn find_pool(&self, name: &str) -> Option<&Pool> {
        self.pools.iter().find(|p| p.name == name)
    }

    /// Whether some route sends requests to `pool`.
    pub fn is_routed(&self, pool: &Pool) -> bool {
        self.router
            .routes()
            .iter()
            .any(|r| self.pools[r.pool].name == pool.name)
    }

    /// The listener named `name`.
    pub fn listener(&self, name: &str) -> Option<&Listener> {
        self.listeners.iter().find(|l| l.name == name)
    }
}

/// The digest a snapshot of config `text` has: the first 12 hex digits of its SHA-256.
pub fn digest_of(text: &str) -> String {
    let sum = ring::digest::digest(&ring::digest::SHA256, text.as_bytes());
    sum.as_ref()
        .iter()
        .take(6)
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// `server:`.
pub struct ServerSettings {
    /// Worker threads per listener service.
    pub threads: usize,
    /// Longest SIGTERM waits for in-flight requests.
    pub shutdown_timeout: Duration,
    /// The lame-duck period between SIGTERM and the drain.
    pub shutdown_delay: Duration,
    /// Peers whose forwarding headers are believed.
    pub trusted_proxies: TrustedProxies,
    /// Path normalization and request head limits.
    pub hygiene: Hygiene,
    /// How long a client may take, phase by phase.
    pub client_timeouts: ClientTimeouts,
    /// Most client connections open at once; `None` is no cap.
    pub max_connections: Option<usize>,
    /// When requests are shed, by priority.
    pub overload: crate::shed::Overload,
    /// Security headers of responses that match no route (routes compile their own over
    /// these).
    pub security_headers: crate::security::SecurityHeaders,
    /// The unix socket a new process takes the listening sockets over by.
    pub upgrade_socket: PathBuf,
    /// Where the process writes its pid; `None` writes none.
    pub pid_file: Option<PathBuf>,
    /// A digest of the whole section, to tell a reload that changed it.
    pub fingerprint: u64,
}

/// Where a new process listens for the old one's sockets, unless `server.upgrade_socket`
/// says otherwise.
pub const DEFAULT_UPGRADE_SOCKET: &str = "/tmp/kingdom-edge-upgrade.sock";

/// One client-facing listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listener {
    /// `listeners[].name`.
    pub name: String,
    /// Where it binds.
    pub address: SocketAddr,
    /// TLS settings; `None` is plain HTTP/1.1.
    pub tls: Option<TlsSettings>,
    /// `Host` for HTTP/1.0 requests that send none.
    pub default_host: String,
    /// HTTP/2 with prior knowledge (cleartext) besides HTTP/1.1; plain listeners only.
    pub h2c: bool,
}

/// The admin listener.
#[derive(Clone, PartialEq, Eq)]
pub struct AdminSettings {
    /// Where it binds; loopback unless a token guards it.
    pub address: SocketAddr,
    /// The bearer token every POST must carry (read from `admin.token_env`); `None` when no
    /// token is configured, which only a loopback address allows.
    pub token: Option<String>,
}

impl std::fmt::Debug for AdminSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminSettings")
            .field("address", &self.address)
            .field("token", &self.token.as_ref().map(|_| "<set>"))
            .finish()
    }
}

#[cfg(test)]
mod tests;
