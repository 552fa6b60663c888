//! Routing: host + longest path prefix (+ methods) → route, compiled from `routes:`.
//!
//! Among the routes whose host, prefix and methods all match, the most specific host wins
//! (exact, then wildcard, then any), then the longest prefix, then the first declared.
//! Prefixes match whole path segments: `/v1` matches `/v1` and `/v1/x`, not `/v1beta`.

use std::sync::Arc;

use http::Method;

use crate::cache::policy::CachePolicy;
use crate::config::raw::{RawAuth, RawRoute};
use crate::config::Errors;
use crate::metrics::RouteMetrics;
use crate::request::path::EscapedSlashes;
use crate::request::HeadLimits;
use crate::security::cors::Cors;
use crate::security::SecurityHeaders;
use crate::shed::Priority;
use crate::token::Auth;
use crate::upstream::Pool;
use crate::validation::{accepted_methods, Validation};

/// Index of a route in its snapshot's [`Router::routes`].
pub type RouteId = usize;

/// Index of a pool in its snapshot's pool list.
pub type PoolId = usize;

/// One compiled route.
pub struct Route {
    /// `routes[].name`, used as the metrics label and in logs.
    pub name: String,
    /// The host rule, for status output.
    pub host: HostMatch,
    /// Always starts with `/`.
    pub path_prefix: String,
    /// Empty means any method.
    pub methods: Vec<Method>,
    /// Where matching requests go: an index into the snapshot's pools.
    pub pool: PoolId,
    /// Methods, body size and media types the route accepts.
    pub validation: Validation,
    /// How soon its requests are shed when the proxy is overloaded.
    pub priority: Priority,
    /// Security headers its responses get.
    pub security_headers: SecurityHeaders,
    /// Its CORS rules; `None` leaves CORS (and preflights) to the upstream.
    pub cors: Option<Cors>,
    /// What it caches; `None` caches nothing.
    pub cache: Option<CachePolicy>,
    /// What a path holding `%2F` or `%5C` gets here.
    pub escaped_slashes: EscapedSlashes,
    /// Request head limits (the server's unless the route sets its own).
    pub limits: HeadLimits,
    /// Bearer-token verification, if the route asks for it.
    pub auth: Option<Auth>,
    /// Its rate limits, in order.
    pub rate_limits: Vec<RouteLimit>,
    /// Its slow-down policy: an index into the snapshot's.
    pub slow_down: Option<usize>,
    /// A digest of the route's settings, to tell a reload that changed it.
    pub fingerprint: u64,
    /// Request counters for this route (detached until the snapshot is activated).
    pub metrics: Arc<RouteMetrics>,
}

/// One rate limit of a route: which policy, and the route's counters of it.
pub struct RouteLimit {
    /// An index into the snapshot's rate limits.
    pub policy: usize,
    /// `kingdom_edge_rate_limited_total{route,policy}`.
    pub limited: prometheus::IntCounter,
    /// `kingdom_edge_rate_limit_shadow_total{route,policy}`.
    pub shadowed: prometheus::IntCounter,
}

/// The named policies routes may refer to, by name in snapshot order.
pub struct Policies<'a> {
    /// `rate_limits:` names.
    pub rate_limits: &'a [String],
    /// `slow_down:` names.
    pub slow_downs: &'a [String],
}

/// What a route inherits from `server:` unless it says otherwise.
pub struct Inherited<'a> {
    /// `server.request_limits`.
    pub limits: HeadLimits,
    /// `server.security_headers`.
    pub security_headers: &'a SecurityHeaders,
}

/// How a route matches the request host (compared without port, case-insensitively).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostMatch {
    /// Any host.
    Any,
    /// `*.example.com`: any name ending in `.example.com` (stored as `.example.com`).
    Suffix(String),
    /// Exactly this name.
    Exact(String),
}

impl HostMatch {
    fn matches(&self, host: &str) -> bool {
        match self {
            HostMatch::Any => true,
            HostMatch::Exact(name) => host.eq_ignore_ascii_case(name),
            HostMatch::Suffix(suffix) => {
                host.len() > suffix.len()
                    && host.as_bytes()[host.len() - suffix.len()..]
                        .eq_ignore_ascii_case(suffix.as_bytes())
            }
        }
    }

    fn rank(&self) -> u8 {
        match self {
            HostMatch::Any => 0,
            HostMatch::Suffix(_) => 1,
            HostMatch::Exact(_) => 2,
        }
    }

    /// The rule as written in the config.
    pub fn to_config_string(&self) -> String {
        match self {
            HostMatch::Any => "*".to_string(),
            HostMatch::Suffix(suffix) => format!("*{suffix}"),
            HostMatch::Exact(name) => name.clone(),
        }
    }
}

/// Every route, ordered so the first match is the best one.
pub struct Router {
    routes: Vec<Route>,
}

impl Router {
    /// The best route for this request, if any.
    pub fn find(&self, host: Option<&str>, path: &str, method: &Method) -> Option<RouteId> {
        // `admin.example.` is `admin.example`, as DNS has it.
        let host = host.map(strip_port).unwrap_or("");
        let host = host.strip_suffix('.').unwrap_or(host);
        self.routes.iter().position(|route| {
            route.host.matches(host)
                && prefix_matches(&route.path_prefix, path)
                && (route.methods.is_empty() || route.methods.contains(method))
        })
    }

    /// Routes in match order; a [`RouteId`] indexes this.
    pub fn routes(&self) -> &[Route] {
        &self.routes
    }

    /// The routes, to bind them to live state.
    pub fn routes_mut(&mut self) -> &mut [Route] {
        &mut self.routes
    }
}

fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        // [v6]:port
        return host
            .split_once(']')
            .map_or(host, |(h, _)| &host[..h.len() + 1]);
    }
    host.rsplit_once(':')
        .filter(|(_, port)| port.bytes().all(|b| b.is_ascii_digit()))
        .map_or(host, |(h, _)| h)
}

fn prefix_matches(prefix: &str, path: &str) -> bool {
    match path.strip_prefix(prefix) {
        None => false,
        Some(rest) => prefix.ends_with('/') || rest.is_empty() || rest.starts_with('/'),
    }
}

/// Compiles `routes:`. `pools` are the pools that compiled; `declared` names every pool in
/// the file, so a route to a pool that failed to compile is not reported a second time.
pub fn compile(
    raw: &[RawRoute],
    pools: &[Pool],
    declared: &[&str],
    policies: &Policies<'_>,
    inherited: &Inherited<'_>,
    errors: &mut Errors,
) -> Router {
    let mut routes: Vec<(usize, Route)> = Vec::with_capacity(raw.len());
    let mut names: Vec<&str> = Vec::new();
    for (i, route) in raw.iter().enumerate() {
        let at = format!("routes[{i}]");
        let start = errors.len();
        if route.name.is_empty() {
            errors.push(format!("{at}.name"), "must not be empty");
        } else if names.contains(&route.name.as_str()) {
            errors.push(
                format!("{at}.name"),
                format!("duplicate route name `{}`", route.name),
            );
        }
        names.push(&route.name);

        let host = match route.matcher.host.as_deref() {
            None | Some("*") => HostMatch::Any,
            Some(host) => match host.strip_prefix('*') {
                Some(suffix) if suffix.starts_with('.') && valid_host(&suffix[1..]) => {
                    HostMatch::Suffix(suffix.to_ascii_lowercase())
                }
                None if valid_host(host) => HostMatch::Exact(host.to_ascii_lowercase()),
                _ => {
                    errors.push(
                        format!("{at}.match.host"),
                        format!("`{host}` is not a host name or `*.domain` wildcard"),
                    );
                    HostMatch::Any
                }
            },
        };

        let path_prefix = route
            .matcher
            .path_prefix
            .clone()
            .unwrap_or_else(|| "/".to_string());
        if !path_prefix.starts_with('/') {
            errors.push(
                format!("{at}.match.path_prefix"),
                format!("must start with `/` (got `{path_prefix}`)"),
            );
        } else {
            // Requests are matched in normalized form: a prefix written otherwise could
            // never match.
            let normal = crate::request::path::normalize(&path_prefix, true)
                .map(|n| n.unwrap_or_else(|| path_prefix.clone()))
                .map(|n| crate::request::path::for_matching(&n).into_owned());
            match normal {
                Ok(normal) if normal == path_prefix => {}
                Ok(normal) => errors.push(
                    format!("{at}.match.path_prefix"),
                    format!("write it normalized, as `{normal}` (got `{path_prefix}`)"),
                ),
                Err(why) => errors.push(
                    format!("{at}.match.path_prefix"),
                    format!("{why} (got `{path_prefix}`)"),
                ),
            }
        }

        let methods = accepted_methods(
            route.matcher.methods.as_deref(),
            &format!("{at}.match.methods"),
            errors,
        );
        let validation = Validation::compile(
            route.methods.as_deref(),
            route.max_body,
            route.content_types.as_deref(),
            &at,
            errors,
        );

        let escaped_slashes = match route.escaped_slashes.as_deref() {
            None => EscapedSlashes::default(),
            Some(text) => EscapedSlashes::parse(text).unwrap_or_else(|| {
                errors.push(
                    format!("{at}.escaped_slashes"),
                    format!("must be `reject`, `keep` or `decode` (got `{text}`)"),
                );
                EscapedSlashes::default()
            }),
        };
        let limits = HeadLimits::compile(
            route.request_limits.as_ref(),
            inherited.limits,
            &format!("{at}.request_limits"),
            errors,
        );

        let security_headers = match &route.security_headers {
            None => inherited.security_headers.clone(),
            Some(raw) => SecurityHeaders::compile(
                Some(raw),
                Some(inherited.security_headers),
                &format!("{at}.security_headers"),
                errors,
            ),
        };
        let cors = route
            .cors
            .as_ref()
            .map(|raw| Cors::compile(raw, &format!("{at}.cors"), errors));
        let cache = route
            .cache
            .as_ref()
            .and_then(|raw| CachePolicy::compile(raw, &format!("{at}.cache"), errors));

        let mut rate_limits = Vec::new();
        for (j, name) in route.rate_limit.iter().flatten().enumerate() {
            match policies.rate_limits.iter().position(|p| p == name) {
                Some(policy) if rate_limits.iter().any(|l: &RouteLimit| l.policy == policy) => {
                    errors.push(
                        format!("{at}.rate_limit[{j}]"),
                        format!("`{name}` is listed twice"),
                    )
                }
                Some(policy) => rate_limits.push(RouteLimit {
                    policy,
                    limited: detached_counter(),
                    shadowed: detached_counter(),
                }),
                None => errors.push(
                    format!("{at}.rate_limit[{j}]"),
                    format!("no rate limit named `{name}` under `rate_limits:`"),
                ),
            }
        }
        let slow_down = route.slow_down.as_ref().and_then(|name| {
            let found = policies.slow_downs.iter().position(|p| p == name);
            if found.is_none() {
                errors.push(
                    format!("{at}.slow_down"),
                    format!("no slow-down policy named `{name}` under `slow_down:`"),
                );
            }
            found
        });

        let pool = pools.iter().position(|p| p.name == route.pool);
        if pool.is_none() && !declared.contains(&route.pool.as_str()) {
            errors.push(
                format!("{at}.pool"),
                format!("no pool named `{}` under `pools:`", route.pool),
            );
        }
        let (Some(pool), true) = (pool, errors.len() == start) else {
            continue;
        };
        routes.push((
            i,
            Route {
                rate_limits,
                slow_down,
                auth: route.auth.map(|auth| match auth {
                    RawAuth::Required => Auth::Required,
                    RawAuth::Optional => Auth::Optional,
                }),
                name: route.name.clone(),
                host,
                path_prefix,
                methods,
                pool,
                validation,
                priority: Priority::compile(route.priority),
                security_headers,
                cors,
                cache,
                escaped_slashes,
                limits,
                fingerprint: fingerprint(route),
                metrics: Arc::new(RouteMetrics::detached(&route.name)),
            },
        ));
    }
    routes.sort_by(|(ia, a), (ib, b)| {
        b.host
            .rank()
            .cmp(&a.host.rank())
            .then(b.path_prefix.len().cmp(&a.path_prefix.len()))
            .then(ia.cmp(ib))
    });
    Router {
        routes: routes.into_iter().map(|(_, r)| r).collect(),
    }
}

fn detached_counter() -> prometheus::IntCounter {
    prometheus::IntCounter::new("kingdom_edge_detached", "not exported")
        .expect("static metric definition")
}

/// A digest of a route's settings.
fn fingerprint(raw: &RawRoute) -> u64 {
    use std::hash::{DefaultHasher, Hash, Hasher};
    let mut hasher = DefaultHasher::new();
    format!("{raw:?}").hash(&mut hasher);
    hasher.finish()
}

fn valid_host(host: &str) -> bool {
    !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::raw::RawConfig;

    fn router(yaml_routes: &str) -> Router {
        let yaml = format!(
            "listeners: []\npools:\n  a: {{ backends: [{{ address: 127.0.0.1:1 }}] }}\n  b: {{ backends: [{{ address: 127.0.0.1:2 }}] }}\nroutes:\n{yaml_routes}"
        );
        let raw: RawConfig = serde_yaml::from_str(&yaml).unwrap();
        let env = |_: &str| None;
        let mut errors = Errors::default();
        let pools: Vec<Pool> = raw
            .pools
            .iter()
            .map(|(name, p)| {
                crate::upstream::pool::compile(name, p, "pools", &env, &mut errors).unwrap()
            })
            .collect();
        let policies = Policies {
            rate_limits: &[],
            slow_downs: &[],
        };
        let inherited = Inherited {
            limits: HeadLimits::default(),
            security_headers: &SecurityHeaders::default(),
        };
        let router = compile(
            &raw.routes,
            &pools,
            &["a", "b"],
            &policies,
            &inherited,
            &mut errors,
        );
        assert!(errors.is_empty(), "{errors:?}");
        router
    }

    #[test]
    fn picks_host_then_longest_prefix_then_methods() {
        let r = router(
            r#"
  - { name: gen, match: { path_prefix: /v1/content/generate, methods: [POST] }, pool: a }
  - { name: content, match: { path_prefix: /v1/content }, pool: a }
  - { name: api, match: { path_prefix: /v1 }, pool: b }
  - { name: admin-host, match: { host: admin.example.com, path_prefix: / }, pool: b }
  - { name: wild, match: { host: "*.example.com", path_prefix: /v1 }, pool: b }
"#,
        );
        let cases = [
            (None, "/v1/content/generate", Method::POST, Some("gen")),
            (None, "/v1/content/generate", Method::GET, Some("content")),
            (None, "/v1/content", Method::GET, Some("content")),
            (None, "/v1/contentx", Method::GET, Some("api")),
            (None, "/v1beta", Method::GET, None),
            (None, "/v1", Method::GET, Some("api")),
            (None, "/", Method::GET, None),
            (
                Some("ADMIN.example.com:8080"),
                "/v1/x",
                Method::GET,
                Some("admin-host"),
            ),
            (
                Some("shop.example.com"),
                "/v1/content",
                Method::GET,
                Some("wild"),
            ),
            (
                Some("example.com"),
                "/v1/content",
                Method::GET,
                Some("content"),
            ),
        ];
        for (host, path, method, want) in cases {
            let got = r
                .find(host, path, &method)
                .map(|id| r.routes()[id].name.as_str());
            assert_eq!(got, want, "{host:?} {method} {path}");
        }
    }

    #[test]
    fn strips_ports_from_hosts() {
        assert_eq!(strip_port("a.example:80"), "a.example");
        assert_eq!(strip_port("a.example"), "a.example");
        assert_eq!(strip_port("[::1]:8080"), "[::1]");
        assert_eq!(strip_port("[::1]"), "[::1]");
    }
}
