//! `compile`: config text to a [`Snapshot`], pure. Each section is compiled by the module
//! that uses it (pools by `upstream`, routes by `route`, health checks by `health`, …); this
//! file puts them together and checks what spans sections (one address, one bind).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use super::{AdminSettings, Listener, ServerSettings, Snapshot, DEFAULT_UPGRADE_SOCKET};
use crate::access_log::AccessLogOutput;
use crate::config::lines::LineIndex;
use crate::config::raw::RawConfig;
use crate::config::units::Dur;
use crate::config::{self, ConfigError, Env, Errors};
use crate::forwarded::TrustedProxies;
use crate::metrics::{RouteMetrics, NO_ROUTE};
use crate::ratelimit::slowdown::{self, SlowDown};
use crate::ratelimit::{self, RateLimit};
use crate::request::{ClientTimeouts, HeadLimits, Hygiene};
use crate::route;
use crate::security::SecurityHeaders;
use crate::shed::Overload;
use crate::sidecar::launch::Sidecar;
use crate::tls::{CertificateFiles, TlsSettings};
use crate::token;
use crate::upstream::pool::{self, Pool};

/// Compiles config text into a snapshot, or every error in the file with its YAML path and
/// line. Pure: it reads nothing but `text` and, for secrets named by `*_env` keys, `env`; it
/// creates no live state, registers no metric and starts nothing, so `check` needs no
/// runtime and a refused file leaves nothing behind. The snapshot counts into detached
/// state until [`activate`](super::activate) binds it.
pub fn compile(text: &str, env: Env) -> Result<Snapshot, Vec<ConfigError>> {
    let index = LineIndex::new(text);
    let raw = config::parse(text, &index)?;
    let mut errors = Errors::default();
    match compile_raw(&raw, text, env, &mut errors) {
        Some(snapshot) if errors.is_empty() => Ok(snapshot),
        _ => Err(errors.into_located(&index)),
    }
}

/// Compiles a parsed file. `None` or a non-empty `errors` means failure.
fn compile_raw(raw: &RawConfig, text: &str, env: Env, errors: &mut Errors) -> Option<Snapshot> {
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
        let token = admin_token(a.token_env.as_deref(), address, env, errors);
        Some(AdminSettings { address, token })
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

    // An upgrade hands every listening socket and three pipes per sidecar process over in
    // one message, which holds at most the kernel's SCM_MAX_FD descriptors.
    let processes: usize = sidecars.iter().map(|s| s.addresses.len()).sum();
    let descriptors = listeners.len() + usize::from(raw.admin.is_some()) + 3 * processes;
    if descriptors > HANDOFF_MAX_FDS {
        errors.push(
            "sidecars",
            format!(
                "{processes} processes are too many to hand over in an upgrade (3 descriptors \
                 each, with the listeners at most {HANDOFF_MAX_FDS})"
            ),
        );
    }
    if raw.pools.is_empty() {
        errors.push("pools", "at least one pool is needed");
    }
    let pools: Vec<Pool> = raw
        .pools
        .iter()
        .filter_map(|(name, p)| pool::compile(name, p, &format!("pools.{name}"), env, errors))
        .collect();
    if raw.routes.is_empty() {
        errors.push("routes", "at least one route is needed");
    }
    let declared: Vec<&str> = raw.pools.keys().map(String::as_str).collect();
    let default_security = SecurityHeaders::default();
    let inherited = route::Inherited {
        limits: server
            .as_ref()
            .map_or_else(Default::default, |s| s.hygiene.limits),
        security_headers: server
            .as_ref()
            .map_or(&default_security, |s| &s.security_headers),
    };
    let rate_limits: Vec<RateLimit> = raw
        .rate_limits
        .iter()
        .filter_map(|(name, r)| ratelimit::compile(name, r, &format!("rate_limits.{name}"), errors))
        .collect();
    let slow_downs: Vec<SlowDown> = raw
        .slow_down
        .iter()
        .filter_map(|(name, r)| slowdown::compile(name, r, &format!("slow_down.{name}"), errors))
        .collect();
    let cache = crate::cache::Settings::compile(raw.cache.as_ref(), "cache", errors);
    // Every declared name, so a route naming a policy with errors is not reported again.
    let policies = route::Policies {
        rate_limits: &raw.rate_limits.keys().cloned().collect::<Vec<_>>(),
        slow_downs: &raw.slow_down.keys().cloned().collect::<Vec<_>>(),
    };
    let router = route::compile(
        &raw.routes,
        &pools,
        &declared,
        &policies,
        &inherited,
        errors,
    );

    let tokens = raw
        .tokens
        .as_ref()
        .and_then(|t| token::compile(t, "tokens", env, errors));
    for (i, route) in raw.routes.iter().enumerate() {
        if route.auth.is_some() && raw.tokens.is_none() {
            errors.push(
                format!("routes[{i}].auth"),
                "needs `tokens:` (the secret kingdom-api signs its tokens with)",
            );
        }
    }

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
        digest: super::digest_of(text),
        server,
        listeners,
        admin,
        sidecars,
        pools,
        router,
        access_log,
        tokens,
        rate_limits,
        slow_downs,
        cache,
        unrouted: Arc::new(RouteMetrics::detached(NO_ROUTE)),
    })
}

/// The admin token named by `admin.token_env`. Without one, only a loopback address is
/// allowed: anyone who can reach the admin API could otherwise reload or drain.
fn admin_token(
    token_env: Option<&str>,
    address: SocketAddr,
    env: Env,
    errors: &mut Errors,
) -> Option<String> {
    let Some(var) = token_env else {
        if !address.ip().is_loopback() {
            errors.push(
                "admin.address",
                format!(
                    "{address} is reachable from other hosts: set `admin.token_env` to a variable \
                     holding a token of at least {MIN_ADMIN_TOKEN} bytes, or bind to loopback"
                ),
            );
        }
        return None;
    };
    match env(var) {
        None => {
            errors.push(
                "admin.token_env",
                format!("environment variable `{var}` is not set"),
            );
            None
        }
        Some(token) if token.len() < MIN_ADMIN_TOKEN => {
            errors.push(
                "admin.token_env",
                format!("the token in `{var}` must be at least {MIN_ADMIN_TOKEN} bytes"),
            );
            None
        }
        Some(token) => Some(token),
    }
}

/// Most descriptors one upgrade hand-off carries (Linux's `SCM_MAX_FD`).
const HANDOFF_MAX_FDS: usize = 253;

/// Shortest accepted admin token.
pub const MIN_ADMIN_TOKEN: usize = 16;

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
    let trusted_proxies =
        TrustedProxies::compile(&s.trusted_proxies, "server.trusted_proxies", errors);
    let upgrade_socket = s
        .upgrade_socket
        .clone()
        .unwrap_or_else(|| PathBuf::from(DEFAULT_UPGRADE_SOCKET));
    for (key, path) in [
        ("upgrade_socket", Some(&upgrade_socket)),
        ("pid_file", s.pid_file.as_ref()),
    ] {
        if path.is_some_and(|p| p.as_os_str().is_empty()) {
            errors.push(format!("server.{key}"), "must not be empty");
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
    let overload = Overload::compile(s.overload.as_ref(), "server.overload", errors);
    let security_headers = SecurityHeaders::compile(
        s.security_headers.as_ref(),
        None,
        "server.security_headers",
        errors,
    );
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
        overload,
        security_headers,
        upgrade_socket,
        pid_file: s.pid_file.clone(),
        fingerprint: {
            use std::hash::{DefaultHasher, Hash, Hasher};
            let mut hasher = DefaultHasher::new();
            format!("{s:?}").hash(&mut hasher);
            hasher.finish()
        },
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
