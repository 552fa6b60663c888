//! The compiled, immutable config. A request loads one snapshot and uses it throughout, so a
//! reload landing mid-request never mixes two configs.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;
use ring::digest;

use crate::config::raw::RawConfig;
use crate::config::units::Dur;
use crate::config::{CompileContext, Errors};
use crate::metrics::{RouteMetrics, NO_ROUTE};
use crate::pool::{self, Pool};
use crate::request::{HeadLimits, Hygiene};
use crate::route::{self, Router};

/// Everything a request or a supervisor needs from the config.
pub struct Snapshot {
    /// Counts loads in this process: 1 for the first, then one more per successful reload.
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
    /// `pools:`, by name order.
    pub pools: Vec<Arc<Pool>>,
    /// `routes:`.
    pub router: Router,
    /// Where access-log lines go.
    pub access_log: AccessLogOutput,
    /// Counters for requests that matched no route.
    pub unrouted: RouteMetrics,
}

impl Snapshot {
    /// Whether some route sends requests to `pool`.
    pub fn is_routed(&self, pool: &Pool) -> bool {
        self.router
            .routes()
            .iter()
            .any(|r| r.pool.name == pool.name)
    }
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
    pub trusted_proxies: Vec<IpNet>,
    /// Path normalization and request head limits.
    pub hygiene: Hygiene,
    /// How long a client may take, phase by phase.
    pub client_timeouts: ClientTimeouts,
    /// Most client connections open at once; `None` is no cap.
    pub max_connections: Option<usize>,
}

/// `server.*_timeout` for clients: what a slow client cannot stretch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientTimeouts {
    /// The whole request header, from its first byte.
    pub header: Duration,
    /// The longest pause in a request body.
    pub body: Duration,
    /// An idle HTTP/1 keep-alive connection, or an HTTP/2 one with no open stream.
    pub keepalive: Duration,
    /// A TLS handshake.
    pub tls_handshake: Duration,
}

impl Default for ClientTimeouts {
    /// nginx's `client_header_timeout`, `client_body_timeout` and `keepalive_timeout`.
    fn default() -> Self {
        Self {
            header: Duration::from_secs(60),
            body: Duration::from_secs(60),
            keepalive: Duration::from_secs(75),
            tls_handshake: Duration::from_secs(10),
        }
    }
}

impl ServerSettings {
    /// Whether a peer at `ip` may tell us who the client is.
    pub fn is_trusted(&self, ip: IpAddr) -> bool {
        self.trusted_proxies.iter().any(|net| net.contains(&ip))
    }
}

/// One client-facing listener.
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

/// TLS termination for a listener.
pub struct TlsSettings {
    /// Served by SNI; the first is the default for clients that send no matching name.
    pub certificates: Vec<CertificateFiles>,
    /// Offer `h2` through ALPN.
    pub http2: bool,
}

/// One certificate chain and key, with the YAML path for errors while loading them.
pub struct CertificateFiles {
    /// PEM chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
    /// `listeners[i].tls.certificates[j]`.
    pub yaml_path: String,
}

/// The admin listener.
pub struct AdminSettings {
    /// Where it binds; loopback in the shipped configs.
    pub address: SocketAddr,
}

/// A supervised upstream process, started once per address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sidecar {
    /// `sidecars[].name`, used in logs.
    pub name: String,
    /// Binary name or path.
    pub command: String,
    /// One process per address, each given `--listen ADDR`.
    pub addresses: Vec<SocketAddr>,
    /// Extra arguments.
    pub args: Vec<String>,
    /// Extra environment.
    pub env: BTreeMap<String, String>,
}

/// `access_log.output`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AccessLogOutput {
    /// No access log.
    Off,
    /// One JSON line per request on standard output.
    Stdout,
    /// Appended to this file.
    File(PathBuf),
}

/// Compiles a parsed file: no I/O, and the time and environment come from `cx`. `None` or a
/// non-empty `errors` means failure.
pub fn compile(
    raw: &RawConfig,
    text: &str,
    cx: &CompileContext,
    errors: &mut Errors,
) -> Option<Snapshot> {
    let server = compile_server(raw, errors);
    let mut binds = Binds::default();

    let mut listeners = Vec::new();
    if raw.listeners.is_empty() {
        errors.push("listeners", "at least one listener is needed");
    }
    for (i, l) in raw.listeners.iter().enumerate() {
        let at = format!("listeners[{i}]");
        if raw.listeners[..i].iter().any(|other| other.name == l.name) {
            errors.push(
                format!("{at}.name"),
                format!("duplicate listener name `{}`", l.name),
            );
        }
        let Some(address) = errors.address(&format!("{at}.address"), &l.address) else {
            continue;
        };
        binds.claim(format!("{at}.address"), address, errors);
        let tls = l.tls.as_ref().map(|tls| {
            if tls.certificates.is_empty() {
                errors.push(
                    format!("{at}.tls.certificates"),
                    "at least one certificate is needed",
                );
            }
            TlsSettings {
                certificates: tls
                    .certificates
                    .iter()
                    .enumerate()
                    .map(|(j, c)| CertificateFiles {
                        cert: c.cert.clone(),
                        key: c.key.clone(),
                        yaml_path: format!("{at}.tls.certificates[{j}]"),
                    })
                    .collect(),
                http2: tls.http2.unwrap_or(true),
            }
        });
        let default_host = match &l.default_host {
            Some(host) => {
                if let Err(why) = crate::request::host::validate(host) {
                    errors.push(
                        format!("{at}.default_host"),
                        format!("{why} (got `{host}`)"),
                    );
                }
                host.clone()
            }
            None => address.to_string(),
        };
        let h2c = l.h2c.unwrap_or(false);
        if h2c && tls.is_some() {
            errors.push(
                format!("{at}.h2c"),
                "is for plain listeners; a TLS listener offers HTTP/2 through ALPN (`tls.http2`)",
            );
        }
        listeners.push(Listener {
            name: l.name.clone(),
            address,
            tls,
            default_host,
            h2c,
        });
    }

    let admin = raw.admin.as_ref().and_then(|a| {
        let address = errors.address("admin.address", &a.address)?;
        binds.claim("admin.address".to_string(), address, errors);
        Some(AdminSettings { address })
    });

    let mut sidecars = Vec::new();
    for (i, s) in raw.sidecars.iter().enumerate() {
        let at = format!("sidecars[{i}]");
        if s.name.is_empty() {
            errors.push(format!("{at}.name"), "must not be empty");
        }
        if s.command.is_empty() {
            errors.push(format!("{at}.command"), "must not be empty");
        }
        if s.addresses.is_empty() {
            errors.push(format!("{at}.addresses"), "at least one address is needed");
        }
        let mut addresses = Vec::new();
        for (j, text) in s.addresses.iter().enumerate() {
            let path = format!("{at}.addresses[{j}]");
            if let Some(address) = errors.address(&path, text) {
                binds.claim(path, address, errors);
                addresses.push(address);
            }
        }
        sidecars.push(Sidecar {
            name: s.name.clone(),
            command: s.command.clone(),
            addresses,
            args: s.args.clone(),
            env: s.env.clone(),
        });
    }

    if raw.pools.is_empty() {
        errors.push("pools", "at least one pool is needed");
    }
    let pools: Vec<Arc<Pool>> = raw
        .pools
        .iter()
        .filter_map(|(name, p)| pool::compile(name, p, &format!("pools.{name}"), cx, errors))
        .map(Arc::new)
        .collect();
    if raw.routes.is_empty() {
        errors.push("routes", "at least one route is needed");
    }
    let declared: Vec<&str> = raw.pools.keys().map(String::as_str).collect();
    let limits = server
        .as_ref()
        .map_or_else(Default::default, |s| s.hygiene.limits);
    let router = route::compile(&raw.routes, &pools, &declared, limits, cx.metrics, errors);

    let access_log = match raw.access_log.output.as_deref() {
        None | Some("stdout") => AccessLogOutput::Stdout,
        Some("off") => AccessLogOutput::Off,
        Some("") => {
            errors.push(
                "access_log.output",
                "must be `stdout`, `off` or a file path",
            );
            AccessLogOutput::Off
        }
        Some(path) => AccessLogOutput::File(PathBuf::from(path)),
    };

    let mut server = server?;
    server.hygiene.ceiling = router
        .routes()
        .iter()
        .fold(server.hygiene.limits, |ceiling, route| {
            ceiling.max(route.limits)
        });
    Some(Snapshot {
        version: 1,
        digest: hex_prefix(digest::digest(&digest::SHA256, text.as_bytes()).as_ref()),
        server,
        listeners,
        admin,
        sidecars,
        pools,
        router,
        access_log,
        unrouted: cx.metrics.route(NO_ROUTE),
    })
}

fn compile_server(raw: &RawConfig, errors: &mut Errors) -> Option<ServerSettings> {
    let s = &raw.server;
    let start = errors.len();
    let threads = s.threads.unwrap_or(2);
    if !(1..=256).contains(&threads) {
        errors.push(
            "server.threads",
            format!("must be between 1 and 256 (got {threads})"),
        );
    }
    let shutdown_timeout = s.shutdown_timeout.map_or(Duration::from_secs(30), |d| d.0);
    let shutdown_delay = s.shutdown_delay.map_or(Duration::ZERO, |d| d.0);
    let mut trusted_proxies = Vec::new();
    for (i, text) in s.trusted_proxies.iter().enumerate() {
        let net = text
            .parse::<IpNet>()
            .or_else(|_| text.parse::<IpAddr>().map(IpNet::from));
        match net {
            Ok(net) => trusted_proxies.push(net),
            Err(_) => errors.push(
                format!("server.trusted_proxies[{i}]"),
                format!("`{text}` is not an IP address or CIDR range"),
            ),
        }
    }
    let limits = HeadLimits::compile(
        s.request_limits.as_ref(),
        HeadLimits::default(),
        "server.request_limits",
        errors,
    );
    if s.max_connections == Some(0) {
        errors.push("server.max_connections", "must be > 0 (got 0)");
    }
    let max_connections = s.max_connections;
    let defaults = ClientTimeouts::default();
    let mut timeout = |key: &str, value: Option<Dur>, default: Duration| {
        let value = value.map_or(default, |d| d.0);
        if value < Duration::from_secs(1) {
            errors.push(
                format!("server.{key}"),
                format!("must be at least 1s (got {value:?})"),
            );
        }
        value
    };
    let client_timeouts = ClientTimeouts {
        header: timeout(
            "client_header_timeout",
            s.client_header_timeout,
            defaults.header,
        ),
        body: timeout("client_body_timeout", s.client_body_timeout, defaults.body),
        keepalive: timeout("keepalive_timeout", s.keepalive_timeout, defaults.keepalive),
        tls_handshake: timeout(
            "tls_handshake_timeout",
            s.tls_handshake_timeout,
            defaults.tls_handshake,
        ),
    };
    let hygiene = Hygiene {
        merge_slashes: s.merge_slashes.unwrap_or(true),
        limits,
        ceiling: limits,
    };
    (errors.len() == start).then_some(ServerSettings {
        threads,
        shutdown_timeout,
        shutdown_delay,
        trusted_proxies,
        hygiene,
        client_timeouts,
        max_connections,
    })
}

/// Every socket the process will bind, to refuse two things on one address.
#[derive(Default)]
struct Binds(Vec<(String, SocketAddr)>);

impl Binds {
    fn claim(&mut self, path: String, address: SocketAddr, errors: &mut Errors) {
        let clash = self.0.iter().find(|(_, other)| {
            other.port() == address.port()
                && (other.ip() == address.ip()
                    || other.ip().is_unspecified()
                    || address.ip().is_unspecified())
        });
        if let Some((other_path, other)) = clash {
            errors.push(
                path.clone(),
                format!("{address} conflicts with {other} at {other_path}"),
            );
        }
        self.0.push((path, address));
    }
}

fn hex_prefix(bytes: &[u8]) -> String {
    bytes.iter().take(6).map(|b| format!("{b:02x}")).collect()
}

/// The current snapshot, swapped whole on reload; readers never block.
pub struct ConfigStore {
    current: arc_swap::ArcSwap<Snapshot>,
}

impl ConfigStore {
    /// Starts with the first loaded snapshot.
    pub fn new(first: Snapshot) -> Self {
        Self {
            current: arc_swap::ArcSwap::from_pointee(first),
        }
    }

    /// The snapshot to use for one whole request.
    pub fn load(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }
}
