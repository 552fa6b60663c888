//! What a reload changes: the settings that only a restart can apply (held back, so nothing
//! is half-applied), and a summary of the rest for the log and `/status`.

use std::collections::BTreeSet;
use std::fmt::Write as _;

use std::net::SocketAddr;

use serde::Serialize;

use super::Snapshot;
use crate::sidecar::launch::Sidecar;

/// A setting the running process cannot change: the reload keeps its old value and says so.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HeldBack {
    /// The YAML path, e.g. `listeners[0].address` or `server.threads`.
    pub key: String,
    /// What changed, and that it needs a restart (or an upgrade).
    pub message: String,
}

/// Keeps in `next` the values of `current` for everything that applies only when the
/// process starts, and lists them. Listeners are bound, their protocols chosen and their
/// client timeouts set at start; so are the worker threads and the admin listener. A
/// listener's certificates and `default_host` still apply live.
pub fn hold_back(next: &mut Snapshot, current: &Snapshot) -> Vec<HeldBack> {
    let mut held = Vec::new();
    let mut hold = |key: String, message: String| held.push(HeldBack { key, message });

    // Listeners: the running set stays; each takes its new certificates and default host
    // when nothing else of it changed.
    let mut listeners = current.listeners.clone();
    for (i, new) in next.listeners.iter().enumerate() {
        let at = format!("listeners[{i}]");
        let Some(old) = listeners.iter_mut().find(|l| l.name == new.name) else {
            hold(at, format!("new listener `{}` needs a restart", new.name));
            continue;
        };
        let mut differs = Vec::new();
        if old.address != new.address {
            differs.push(("address", format!("{} to {}", old.address, new.address)));
        }
        if old.tls.is_some() != new.tls.is_some() {
            differs.push(("tls", "TLS turned on or off".to_string()));
        }
        let http2 = |l: &super::Listener| l.tls.as_ref().map(|t| t.http2);
        if old.tls.is_some() && new.tls.is_some() && http2(old) != http2(new) {
            differs.push(("tls.http2", "HTTP/2 offered or not".to_string()));
        }
        if old.h2c != new.h2c {
            differs.push(("h2c", "h2c turned on or off".to_string()));
        }
        if differs.is_empty() {
            *old = new.clone();
        }
        for (key, what) in differs {
            hold(
                format!("{at}.{key}"),
                format!("{what}: needs a restart (the listener's other changes wait with it)"),
            );
        }
    }
    for old in &current.listeners {
        if !next.listeners.iter().any(|l| l.name == old.name) {
            hold(
                "listeners".to_string(),
                format!("removing listener `{}` needs a restart", old.name),
            );
        }
    }
    next.listeners = listeners;

    if next.cache != current.cache {
        hold(
            "cache".into(),
            "the cache's memory, max_object and lock_timeout: need a restart".into(),
        );
        next.cache = current.cache;
    }

    let (s, c) = (&mut next.server, &current.server);
    if s.threads != c.threads {
        hold(
            "server.threads".into(),
            format!("{} to {}: needs a restart", c.threads, s.threads),
        );
        s.threads = c.threads;
    }
    let timeouts = [
        (
            "server.client_header_timeout",
            &mut s.client_timeouts.header,
            c.client_timeouts.header,
        ),
        (
            "server.keepalive_timeout",
            &mut s.client_timeouts.keepalive,
            c.client_timeouts.keepalive,
        ),
        (
            "server.tls_handshake_timeout",
            &mut s.client_timeouts.tls_handshake,
            c.client_timeouts.tls_handshake,
        ),
    ];
    for (key, new, old) in timeouts {
        if *new != old {
            hold(
                key.into(),
                format!("{old:?} to {new:?}: set on the listeners at start, needs a restart"),
            );
            *new = old;
        }
    }
    // The listeners stop reading a request head at the largest limit of any route; a larger
    // one cannot be read until they restart. A smaller one applies (routes check it).
    let (new, old) = (s.hygiene.ceiling, c.hygiene.ceiling);
    if new.request_line + new.headers > old.request_line + old.headers {
        hold(
            "server.request_limits".into(),
            format!(
                "the listeners read at most {} bytes of a request head until a restart",
                old.request_line + old.headers + 1024
            ),
        );
        s.hygiene.ceiling = old;
    }
    if s.upgrade_socket != c.upgrade_socket {
        hold(
            "server.upgrade_socket".into(),
            "read at start: needs a restart".into(),
        );
        s.upgrade_socket = c.upgrade_socket.clone();
    }
    if s.pid_file != c.pid_file {
        hold(
            "server.pid_file".into(),
            "written at start: needs a restart".into(),
        );
        s.pid_file = c.pid_file.clone();
    }

    let address = |a: &Option<super::AdminSettings>| a.as_ref().map(|a| a.address);
    if address(&next.admin) != address(&current.admin) {
        hold(
            "admin.address".into(),
            "the admin listener is bound at start: needs a restart".into(),
        );
        // A new token applies to the listener that runs; a token is never dropped from it:
        // the file may allow no token only because it moves the listener to loopback.
        let token = next.admin.as_ref().and_then(|a| a.token.clone());
        next.admin = current.admin.clone().map(|mut a| {
            if token.is_some() {
                a.token = token;
            } else if a.token.is_some() {
                hold(
                    "admin.token_env".into(),
                    "the admin listener keeps its token until it moves at a restart".into(),
                );
            }
            a
        });
    }
    held
}

/// Every sidecar process of `snapshot`: its address and what runs there.
fn processes(snapshot: &Snapshot) -> Vec<(SocketAddr, &Sidecar)> {
    snapshot
        .sidecars
        .iter()
        .flat_map(|sc| sc.addresses.iter().map(move |a| (*a, sc)))
        .collect()
}

/// What a reload changed, by name.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Changes {
    /// Routes that are new, gone, or changed in any setting.
    pub routes_added: Vec<String>,
    pub routes_removed: Vec<String>,
    pub routes_changed: Vec<String>,
    /// Pools that are new, gone, or whose policies (anything but the backend list) changed.
    pub pools_added: Vec<String>,
    pub pools_removed: Vec<String>,
    pub policies_changed: Vec<String>,
    /// Backends as `pool/address`.
    pub backends_added: Vec<String>,
    pub backends_removed: Vec<String>,
    /// Backends whose weight changed, as `pool/address`.
    pub weights_changed: Vec<String>,
    /// Sidecar processes, as `name/address`, to start, stop or restart.
    pub sidecars_added: Vec<String>,
    pub sidecars_removed: Vec<String>,
    pub sidecars_changed: Vec<String>,
    /// Other sections that changed: `server`, `listeners`, `admin`, `access_log`.
    pub other: Vec<String>,
}

impl Changes {
    /// Compares the snapshot in force with the next one.
    pub fn between(current: &Snapshot, next: &Snapshot) -> Self {
        let mut c = Changes::default();
        let names = |s: &Snapshot| -> BTreeSet<String> {
            s.router.routes().iter().map(|r| r.name.clone()).collect()
        };
        let (old, new) = (names(current), names(next));
        c.routes_added = new.difference(&old).cloned().collect();
        c.routes_removed = old.difference(&new).cloned().collect();
        for route in next.router.routes() {
            let before = current
                .router
                .routes()
                .iter()
                .find(|r| r.name == route.name);
            if before.is_some_and(|b| b.fingerprint != route.fingerprint) {
                c.routes_changed.push(route.name.clone());
            }
        }
        for pool in &next.pools {
            let Some(before) = current.find_pool(&pool.name) else {
                c.pools_added.push(pool.name.clone());
                continue;
            };
            if before.fingerprint != pool.fingerprint {
                c.policies_changed.push(pool.name.clone());
            }
            for b in &pool.backends {
                let id = format!("{}/{}", pool.name, b.label);
                match before.backends.iter().find(|o| o.address == b.address) {
                    None => c.backends_added.push(id),
                    Some(o) if o.weight != b.weight => c.weights_changed.push(id),
                    Some(_) => {}
                }
            }
            for o in &before.backends {
                if !pool.backends.iter().any(|b| b.address == o.address) {
                    c.backends_removed
                        .push(format!("{}/{}", pool.name, o.label));
                }
            }
        }
        for pool in &current.pools {
            if next.find_pool(&pool.name).is_none() {
                c.pools_removed.push(pool.name.clone());
            }
        }
        let (old, new) = (processes(current), processes(next));
        for (address, sidecar) in &new {
            match old.iter().find(|(a, _)| a == address) {
                None => c.sidecars_added.push(format!("{}/{address}", sidecar.name)),
                Some((_, before)) if !before.same_process(sidecar) => c
                    .sidecars_changed
                    .push(format!("{}/{address}", sidecar.name)),
                Some(_) => {}
            }
        }
        for (address, sidecar) in &old {
            if !new.iter().any(|(a, _)| a == address) {
                c.sidecars_removed
                    .push(format!("{}/{address}", sidecar.name));
            }
        }
        if current.server.fingerprint != next.server.fingerprint {
            c.other.push("server".into());
        }
        if current.listeners != next.listeners {
            c.other.push("listeners".into());
        }
        if current.admin != next.admin {
            c.other.push("admin".into());
        }
        if current.access_log != next.access_log {
            c.other.push("access_log".into());
        }
        c
    }

    /// One line for the log: counts, with the names where there are few.
    pub fn line(&self) -> String {
        let mut out = String::new();
        let mut part = |what: &str, items: &[String]| {
            if items.is_empty() {
                return;
            }
            if !out.is_empty() {
                out.push_str("; ");
            }
            let _ = write!(out, "{what} {}", items.len());
            if items.len() <= 4 {
                let _ = write!(out, " ({})", items.join(", "));
            }
        };
        part("routes added", &self.routes_added);
        part("routes removed", &self.routes_removed);
        part("routes changed", &self.routes_changed);
        part("pools added", &self.pools_added);
        part("pools removed", &self.pools_removed);
        part("pool policies changed", &self.policies_changed);
        part("backends added", &self.backends_added);
        part("backends removed", &self.backends_removed);
        part("weights changed", &self.weights_changed);
        part("sidecars added", &self.sidecars_added);
        part("sidecars removed", &self.sidecars_removed);
        part("sidecars changed", &self.sidecars_changed);
        part("changed", &self.other);
        if out.is_empty() {
            out.push_str("no changes");
        }
        out
    }
}
