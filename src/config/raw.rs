//! Serde mirror of the YAML file. No logic lives here: `compile` turns it into runtime values.
//! Every struct refuses unknown keys, so a typo is an error instead of a silently ignored key.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Deserialize;

use super::units::{Dur, Size};

/// The whole file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    #[serde(default)]
    pub server: RawServer,
    pub listeners: Vec<RawListener>,
    pub admin: Option<RawAdmin>,
    #[serde(default)]
    pub sidecars: Vec<RawSidecar>,
    pub pools: BTreeMap<String, RawPool>,
    pub routes: Vec<RawRoute>,
    #[serde(default)]
    pub access_log: RawAccessLog,
    /// How the edge verifies bearer tokens (for routes with `auth`). Default: none.
    pub tokens: Option<RawTokens>,
    /// Named rate limits, for routes' `rate_limit`. Default: none.
    #[serde(default)]
    pub rate_limits: BTreeMap<String, RawRateLimit>,
    /// Named slow-down policies, for routes' `slow_down`. Default: none.
    #[serde(default)]
    pub slow_down: BTreeMap<String, RawSlowDown>,
    /// The response cache's memory, for routes' `cache`. Default: see `cache::Settings`.
    pub cache: Option<RawCache>,
}

/// `cache` (top level).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCache {
    /// Bytes of responses kept at most. Default: 256MiB.
    pub memory: Option<Size>,
    /// Largest response body kept. Default: 8MiB.
    pub max_object: Option<Size>,
    /// How long a request waits for another's fetch of the same key. Default: 5s.
    pub lock_timeout: Option<Dur>,
}

/// `routes[].cache`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRouteCache {
    /// Default: true.
    pub enabled: Option<bool>,
    /// Freshness of a response that states none. Default: none (not stored).
    pub default_ttl: Option<Dur>,
    /// Request headers whose values are part of the cache key. Default: none.
    pub key_headers: Option<Vec<String>>,
    /// How long a stale answer may be served while it is refreshed in the background,
    /// when the answer does not say. Default: 0.
    pub stale_while_revalidate: Option<Dur>,
    /// How long a stale answer may be served when the upstream fails, when the answer does
    /// not say. Default: 0.
    pub stale_if_error: Option<Dur>,
    /// Whether identical concurrent GETs share one upstream request even when its answer
    /// is not stored. Default: false.
    pub coalesce_uncacheable: Option<bool>,
}

/// `rate_limits.<name>`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRateLimit {
    /// `client_ip`, `header:NAME`, `cookie:NAME`, `user` or `route`.
    pub key: String,
    /// Requests per `per`.
    pub limit: u32,
    pub per: Dur,
    /// Requests that may come at once. Default: `limit`.
    pub burst: Option<u32>,
    /// `enforce` or `shadow`. Default: enforce.
    pub mode: Option<RawLimitMode>,
    /// IPv6 clients share a budget per this many leading bits. Default: 64.
    pub ipv6_prefix: Option<u8>,
    /// Most keys kept. Default: 100000.
    pub max_keys: Option<usize>,
}

/// `rate_limits.<name>.mode`.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum RawLimitMode {
    Enforce,
    Shadow,
}

/// `slow_down.<name>`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSlowDown {
    /// As for rate limits.
    pub key: String,
    /// Requests in `per` that pass without delay.
    pub after: u32,
    pub per: Dur,
    /// Added per request beyond `after`.
    pub delay_step: Dur,
    /// The longest delay.
    pub max_delay: Dur,
    /// Default: 64.
    pub ipv6_prefix: Option<u8>,
    /// Default: 100000.
    pub max_keys: Option<usize>,
}

/// `tokens:`: the secret kingdom-api signs its tokens with, to verify them at the edge.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTokens {
    /// Environment variable holding the secret.
    pub secret_env: Option<String>,
    /// The secret itself (for local configs; prefer `secret_env`).
    pub secret: Option<String>,
    /// Clock difference allowed with the issuer. Default: 30s.
    pub clock_skew: Option<Dur>,
}

/// `routes[].auth:`.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum RawAuth {
    /// A valid bearer token is needed (401 without).
    Required,
    /// A token is verified when present (401 if it is bad); none is fine.
    Optional,
}

/// `server:` process-wide settings.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawServer {
    /// Worker threads per listener service. Default: 2.
    pub threads: Option<usize>,
    /// How long SIGTERM waits for in-flight requests. Default: 30s.
    pub shutdown_timeout: Option<Dur>,
    /// After SIGTERM, how long `/ready` answers 503 while the listeners still accept, before
    /// the drain starts. Default: 0s.
    pub shutdown_delay: Option<Dur>,
    /// Peers whose `X-Forwarded-*` headers are believed. Default: none.
    #[serde(default)]
    pub trusted_proxies: Vec<String>,
    /// The whole request header, from its first byte (408 past it). Default: 60s.
    pub client_header_timeout: Option<Dur>,
    /// Longest pause while a request body arrives (408 past it). Default: 60s.
    pub client_body_timeout: Option<Dur>,
    /// How long an idle keep-alive (or HTTP/2) connection is kept. Default: 75s.
    pub keepalive_timeout: Option<Dur>,
    /// How long a TLS handshake may take. Default: 10s.
    pub tls_handshake_timeout: Option<Dur>,
    /// Most client connections open at once, over all listeners. Default: no cap.
    pub max_connections: Option<usize>,
    /// Merge repeated slashes in request paths (`//a///b` is `/a/b`). Default: true.
    pub merge_slashes: Option<bool>,
    /// Request head limits. Default: 8KiB target, 8KiB per field, 32KiB in all, 100 fields.
    pub request_limits: Option<RawRequestLimits>,
    /// The unix socket a new process takes the listening sockets over by (`--upgrade`).
    /// Default: /tmp/kingdom-edge-upgrade.sock.
    pub upgrade_socket: Option<PathBuf>,
    /// Where the process writes its pid. Default: none.
    pub pid_file: Option<PathBuf>,
    /// Shedding by priority when too many requests are in flight. Default: none.
    pub overload: Option<RawOverload>,
    /// Security headers added to every response that lacks them. Default: see
    /// [`RawSecurityHeaders`].
    pub security_headers: Option<RawSecurityHeaders>,
}

/// `server.security_headers:` and `routes[].security_headers:`. Each value is the header's
/// value, or `off` to send none; a route's keys override the server's.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSecurityHeaders {
    /// On TLS listeners only. Default: `max-age=31536000`.
    pub strict_transport_security: Option<String>,
    /// Default: `nosniff`.
    pub content_type_options: Option<String>,
    /// Default: `DENY`.
    pub frame_options: Option<String>,
    /// Default: `strict-origin-when-cross-origin`.
    pub referrer_policy: Option<String>,
    /// Default: none.
    pub content_security_policy: Option<String>,
}

/// `routes[].cors:`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCors {
    /// `https://app.example.com`, `https://*.example.com` (any subdomain), or `*`.
    pub origins: Vec<String>,
    /// Methods a cross-origin request may use. Default: GET, HEAD, POST.
    pub methods: Option<Vec<String>>,
    /// Request headers it may send (`*`: any). Default: none beyond the CORS-safelisted.
    #[serde(default)]
    pub headers: Vec<String>,
    /// Response headers its script may read. Default: none beyond the CORS-safelisted.
    #[serde(default)]
    pub expose_headers: Vec<String>,
    /// Whether it may carry cookies and credentials. Default: false.
    #[serde(default)]
    pub credentials: bool,
    /// How long a browser may cache a preflight answer. Default: not said (browser default).
    pub max_age: Option<Dur>,
}

/// `server.overload:`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawOverload {
    /// Past this many requests in flight, `bulk` routes get 503.
    pub shed_bulk_at: Option<u64>,
    /// Past this many, `standard` routes too.
    pub shed_standard_at: Option<u64>,
    /// Past this many, every route.
    pub max_in_flight: Option<u64>,
    /// `retry-after` of a shed request. Default: 1s.
    pub retry_after: Option<Dur>,
}

/// `routes[].priority:`.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum RawPriority {
    High,
    Standard,
    Bulk,
}

/// `server.request_limits:` and `routes[].request_limits:`; each key defaults to the
/// server's value.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRequestLimits {
    /// Longest request target (414 past it).
    pub request_line: Option<Size>,
    /// Longest header field, name and value (431).
    pub header: Option<Size>,
    /// All header fields together (431).
    pub headers: Option<Size>,
    /// Most header fields (431).
    pub header_count: Option<usize>,
}

/// One entry of `listeners:`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawListener {
    pub name: String,
    pub address: String,
    pub tls: Option<RawTls>,
    /// `Host` for HTTP/1.0 requests that send none. Default: the listener's address.
    pub default_host: Option<String>,
    /// Accept HTTP/2 with prior knowledge on a plain listener. Default: false.
    pub h2c: Option<bool>,
}

/// `listeners[].tls:`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    pub certificates: Vec<RawCertificate>,
    /// Offer HTTP/2 through ALPN. Default: true.
    pub http2: Option<bool>,
}

/// `listeners[].tls.certificates[]`: one PEM chain and its key.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCertificate {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// `admin:`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAdmin {
    pub address: String,
    /// Environment variable holding the bearer token POSTs must carry. Default: none (then
    /// the address must be loopback).
    pub token_env: Option<String>,
}

/// One entry of `sidecars:`: a command started once per address.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSidecar {
    pub name: String,
    pub command: String,
    pub addresses: Vec<String>,
    /// Extra arguments after `--listen ADDR`. Default: none.
    #[serde(default)]
    pub args: Vec<String>,
    /// Extra environment variables. Default: none (the proxy's environment is inherited).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
}

/// One entry of `pools:`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPool {
    /// Default: weighted_round_robin.
    pub balance: Option<RawBalance>,
    /// What `consistent_hash` hashes. Default: the client IP.
    pub hash_key: Option<RawHashKey>,
    pub backends: Vec<RawBackend>,
    #[serde(default)]
    pub timeouts: RawTimeouts,
    /// Default: no active checks (backends are trusted).
    pub health_check: Option<RawHealthCheck>,
    /// Default: on, with the defaults of [`RawOutlier`].
    #[serde(default)]
    pub outlier: RawOutlier,
    /// When every backend is unhealthy or ejected. Default: fail_open.
    pub panic: Option<RawPanic>,
    #[serde(default)]
    pub limits: RawLimits,
    /// Default: on, with the defaults of [`RawRetries`].
    #[serde(default)]
    pub retries: RawRetries,
    /// Ramp a joining or recovering backend from 10% to 100% weight. Default: off.
    pub slow_start: Option<Dur>,
    /// Default: off.
    pub sticky: Option<RawSticky>,
}

/// `pools.*.balance:`.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum RawBalance {
    WeightedRoundRobin,
    LeastConnections,
    ConsistentHash,
}

/// `pools.*.hash_key:` `client_ip`, `path`, `{ header: NAME }` or `{ cookie: NAME }`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(
    untagged,
    expecting = "client_ip, path, { header: NAME } or { cookie: NAME }"
)]
pub enum RawHashKey {
    Named(RawHashSource),
    Header { header: String },
    Cookie { cookie: String },
}

/// `pools.*.hash_key:` as a single word.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum RawHashSource {
    ClientIp,
    Path,
}

/// `pools.*.health_check:`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHealthCheck {
    /// `http` or `tcp`. Default: http.
    #[serde(rename = "type")]
    pub kind: Option<RawProbeKind>,
    /// Default: /healthz.
    pub path: Option<String>,
    /// Statuses or ranges such as `200`, `"200-399"`. Default: 200-399.
    pub expected_statuses: Option<Vec<serde_yaml::Value>>,
    /// Host header. Default: the backend address.
    pub host: Option<String>,
    /// Default: 2s.
    pub interval: Option<Dur>,
    /// Default: 1s.
    pub timeout: Option<Dur>,
    /// Default: 2.
    pub rise: Option<u32>,
    /// Default: 3.
    pub fall: Option<u32>,
}

/// `pools.*.health_check.type:`.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum RawProbeKind {
    Http,
    Tcp,
}

/// `pools.*.outlier:`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawOutlier {
    /// Default: true.
    pub enabled: Option<bool>,
    /// Default: 5.
    pub consecutive_failures: Option<u32>,
    /// Default: 10s.
    pub base_ejection: Option<Dur>,
    /// Default: 5m.
    pub max_ejection: Option<Dur>,
    /// Default: 50.
    pub max_ejected_percent: Option<u8>,
    /// Which outcomes count: connect_errors, timeouts, http_5xx. Default: all three.
    pub count: Option<Vec<RawFailureKind>>,
}

/// `pools.*.outlier.count[]`.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum RawFailureKind {
    ConnectErrors,
    Timeouts,
    #[serde(rename = "http_5xx")]
    Http5xx,
}

/// `pools.*.panic:`.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum RawPanic {
    FailOpen,
    FailClosed,
}

/// `pools.*.limits:`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLimits {
    /// Requests in flight to the pool before new ones get 503. Default: no limit.
    pub max_in_flight: Option<u64>,
}

/// `pools.*.retries:`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRetries {
    /// Retries after the first attempt; 0 turns retries off. Default: 2.
    pub attempts: Option<u32>,
    #[serde(default)]
    pub backoff: RawBackoff,
    /// Default: 20.
    pub budget_percent: Option<u32>,
    /// Retries always allowed regardless of the percentage. Default: 3.
    pub min_concurrency: Option<u32>,
}

/// `pools.*.retries.backoff:`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBackoff {
    /// Default: 25ms.
    pub base: Option<Dur>,
    /// Default: 250ms.
    pub max: Option<Dur>,
}

/// `pools.*.sticky:`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSticky {
    pub cookie: String,
    /// Default: 30m.
    pub ttl: Option<Dur>,
    /// Environment variable holding the signing secret.
    pub secret_env: Option<String>,
    /// The signing secret itself (prefer `secret_env`).
    pub secret: Option<String>,
    /// `lax`, `strict` or `none`. Default: lax.
    pub same_site: Option<RawSameSite>,
    /// Answer 503 instead of re-pinning when the pinned backend is unusable. Default: false.
    pub strict: Option<bool>,
}

/// `pools.*.sticky.same_site:`.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum RawSameSite {
    Lax,
    Strict,
    None,
}

/// `pools.*.backends[]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBackend {
    pub address: String,
    /// Default: 1.
    pub weight: Option<u32>,
}

/// `pools.*.timeouts:`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTimeouts {
    /// TCP connect. Default: 1s.
    pub connect: Option<Dur>,
    /// Between reads of the upstream response. Default: 30s.
    pub read: Option<Dur>,
    /// Between writes of the request to the upstream. Default: 30s.
    pub write: Option<Dur>,
    /// How long an idle upstream keep-alive connection is kept. Default: 60s.
    pub idle: Option<Dur>,
    /// The whole exchange, from the request header to the end of the response, retries
    /// included. Default: no limit.
    pub total: Option<Dur>,
}

/// One entry of `routes:`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRoute {
    pub name: String,
    #[serde(rename = "match", default)]
    pub matcher: RawMatch,
    pub pool: String,
    /// Largest request body accepted, e.g. `64KiB`. Default: no limit.
    pub max_body: Option<Size>,
    /// `reject`, `keep` or `decode` a path holding `%2F` or `%5C`. Default: reject.
    pub escaped_slashes: Option<String>,
    /// Request head limits for this route. Default: `server.request_limits`.
    pub request_limits: Option<RawRequestLimits>,
    /// Verify bearer tokens: `required` or `optional`. Default: no verification.
    pub auth: Option<RawAuth>,
    /// Names of `rate_limits:` policies, applied in order. Default: none.
    pub rate_limit: Option<Vec<String>>,
    /// Name of a `slow_down:` policy. Default: none.
    pub slow_down: Option<String>,
    /// `high`, `standard` or `bulk`, for shedding. Default: standard.
    pub priority: Option<RawPriority>,
    /// Methods the route accepts (others get 405). Default: any.
    pub methods: Option<Vec<String>>,
    /// Media types a request body may have (others get 415). Default: any.
    pub content_types: Option<Vec<String>>,
    /// Security headers of this route, over `server.security_headers`. Default: the server's.
    pub security_headers: Option<RawSecurityHeaders>,
    /// Cross-origin requests, answered at the edge. Default: none (preflights go upstream).
    pub cors: Option<RawCors>,
    /// Response caching for the route's GETs. Default: off.
    pub cache: Option<RawRouteCache>,
}

/// `routes[].match:`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMatch {
    /// Exact (`api.example.com`) or wildcard (`*.example.com`). Default: any host.
    pub host: Option<String>,
    /// Default: `/`.
    pub path_prefix: Option<String>,
    /// Default: any method.
    pub methods: Option<Vec<String>>,
}

/// `access_log:`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAccessLog {
    /// `stdout`, `off`, or a file path. Default: stdout.
    pub output: Option<String>,
}
