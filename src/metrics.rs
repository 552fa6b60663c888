//! Prometheus metrics. Families live here; per-route, per-pool and per-backend handles are
//! resolved once, when a snapshot is activated, so the request path never looks a label up
//! by string. A compiled snapshot that was never activated counts into detached handles of
//! its own, which no registry holds; a route, pool or backend that a reload removed has its
//! series retired once no snapshot uses it, so `/metrics` shows only what exists.

use std::sync::OnceLock;

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

/// Every metric family the proxy exports, registered in one registry.
pub struct Metrics {
    registry: Registry,
    requests: IntCounterVec,
    duration: HistogramVec,
    upstream: IntCounterVec,
    /// Requests being processed right now, across all listeners.
    pub in_flight: IntGauge,
    /// Of those, the ones a slow-down policy holds back (not counted for shedding).
    pub slow_down_waiting: IntGauge,
    /// Access-log lines dropped because the writer fell behind.
    pub access_log_dropped: IntCounter,
    sidecar_restarts: IntCounterVec,
    backend_healthy: IntGaugeVec,
    backend_ejected: IntGaugeVec,
    retries: IntCounterVec,
    pool_rejected: IntCounterVec,
    sticky_invalid: IntCounterVec,
    truncated: IntCounterVec,
    rejected: IntCounterVec,
    rate_limited: IntCounterVec,
    rate_limit_shadow: IntCounterVec,
    rate_limit_keys: IntGaugeVec,
    slowed_down: IntCounterVec,
    /// `kingdom_edge_shed_total{priority}`, one handle per priority in [`PRIORITIES`] order.
    pub shed: [IntCounter; 3],
    cache_lookups: IntCounterVec,
    /// `kingdom_edge_cache_bytes`: what the response cache holds.
    pub cache_bytes: IntGauge,
    /// `kingdom_edge_cache_objects`.
    pub cache_objects: IntGauge,
    /// `kingdom_edge_cache_evictions_total`.
    pub cache_evictions: IntCounter,
    /// Client connections closed because the client ran out of time.
    pub client_timeouts: ClientTimeouts,
    /// Client connections open now, over all listeners (exported; the exact count is
    /// `open_connections`).
    pub client_connections: IntGauge,
    /// The count behind `client_connections`, updated atomically against the cap.
    pub open_connections: std::sync::atomic::AtomicUsize,
    /// HTTP/1 client connections parked while idle between requests.
    pub idle_connections: IntGauge,
    /// Client connections closed at once because `server.max_connections` were open.
    pub connections_refused: IntCounter,
    /// `kingdom_edge_config_reloads_total{result="ok"}`.
    pub reloads_ok: IntCounter,
    /// `kingdom_edge_config_reloads_total{result="error"}`.
    pub reloads_error: IntCounter,
    /// The config version in force.
    pub config_version: IntGauge,
    /// Admin requests refused for a missing or wrong token.
    pub admin_auth_failures: IntCounter,
}

/// How the cache answered a request of a cached route (`kingdom_edge_cache_lookups_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheResult {
    /// Answered from a fresh entry.
    Hit,
    /// Nothing stored: fetched.
    Miss,
    /// A stale entry: fetched anew, or served stale.
    Stale,
    /// A stale entry the origin confirmed (304).
    Revalidated,
    /// Not looked up (not a GET or HEAD).
    Bypass,
    /// A copy of another request's answer, fetched while this one waited
    /// (`coalesce_uncacheable`).
    Collapsed,
}

impl CacheResult {
    /// Every result, in index order.
    pub const ALL: [CacheResult; 6] = [
        CacheResult::Hit,
        CacheResult::Miss,
        CacheResult::Stale,
        CacheResult::Revalidated,
        CacheResult::Bypass,
        CacheResult::Collapsed,
    ];

    /// Its `result` label.
    pub fn label(self) -> &'static str {
        match self {
            CacheResult::Hit => "hit",
            CacheResult::Miss => "miss",
            CacheResult::Stale => "stale",
            CacheResult::Revalidated => "revalidated",
            CacheResult::Bypass => "bypass",
            CacheResult::Collapsed => "collapsed",
        }
    }
}

/// The `priority` labels of `kingdom_edge_shed_total`, highest first.
pub const PRIORITIES: [&str; 3] = ["high", "standard", "bulk"];

/// `kingdom_edge_client_timeouts_total{phase}`, one handle per phase.
pub struct ClientTimeouts {
    tls_handshake: IntCounter,
    keepalive: IntCounter,
    header: IntCounter,
    body: IntCounter,
    h2_idle: IntCounter,
}

impl ClientTimeouts {
    /// Counts one timeout in `phase`: `tls_handshake`, `keepalive`, `header`, `body` or
    /// `h2_idle` (anything else is not a phase and is ignored).
    pub fn count(&self, phase: &str) {
        let counter = match phase {
            "tls_handshake" => &self.tls_handshake,
            "keepalive" => &self.keepalive,
            "header" => &self.header,
            "body" => &self.body,
            "h2_idle" => &self.h2_idle,
            _ => return,
        };
        counter.inc();
    }
}

/// Route label used for requests that matched no route (or were rejected before routing).
pub const NO_ROUTE: &str = "-";

const DURATION_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

impl Metrics {
    /// Creates and registers every family.
    pub fn new() -> Self {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new(
                "kingdom_edge_requests_total",
                "Requests answered, by route and status.",
            ),
            &["route", "code"],
        )
        .expect("static metric definition");
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "kingdom_edge_request_duration_seconds",
                "Time from request header to the end of the response, by route.",
            )
            .buckets(DURATION_BUCKETS.to_vec()),
            &["route"],
        )
        .expect("static metric definition");
        let upstream = IntCounterVec::new(
            Opts::new(
                "kingdom_edge_upstream_requests_total",
                "Upstream attempts, by pool, backend and outcome.",
            ),
            &["pool", "backend", "outcome"],
        )
        .expect("static metric definition");
        let in_flight = IntGauge::new("kingdom_edge_in_flight", "Requests in progress.")
            .expect("static metric definition");
        let cache_lookups = IntCounterVec::new(
            Opts::new(
                "kingdom_edge_cache_lookups_total",
                "Requests on cached routes, by route and how the cache answered.",
            ),
            &["route", "result"],
        )
        .expect("static metric definition");
        let cache_bytes = IntGauge::new(
            "kingdom_edge_cache_bytes",
            "Bytes the response cache holds (bodies, headers and bookkeeping).",
        )
        .expect("static metric definition");
        let cache_objects = IntGauge::new(
            "kingdom_edge_cache_objects",
            "Responses the response cache holds.",
        )
        .expect("static metric definition");
        let cache_evictions = IntCounter::new(
            "kingdom_edge_cache_evictions_total",
            "Responses evicted from the cache to keep it within cache.memory.",
        )
        .expect("static metric definition");
        let slow_down_waiting = IntGauge::new(
            "kingdom_edge_slow_down_waiting",
            "Requests in progress that a slow-down policy is holding back.",
        )
        .expect("static metric definition");
        let access_log_dropped = IntCounter::new(
            "kingdom_edge_access_log_dropped_total",
            "Access-log lines dropped because the writer could not keep up.",
        )
        .expect("static metric definition");
        let sidecar_restarts = IntCounterVec::new(
            Opts::new(
                "kingdom_edge_sidecar_restarts_total",
                "Sidecar processes restarted after exiting.",
            ),
            &["sidecar", "address"],
        )
        .expect("static metric definition");
        let gauge = |name: &str, help: &str, labels: &[&str]| {
            IntGaugeVec::new(Opts::new(name, help), labels).expect("static metric definition")
        };
        let counter = |name: &str, help: &str, labels: &[&str]| {
            IntCounterVec::new(Opts::new(name, help), labels).expect("static metric definition")
        };
        let backend_healthy = gauge(
            "kingdom_edge_backend_healthy",
            "1 while the backend passes its health checks (always 1 without checks).",
            &["pool", "backend"],
        );
        let backend_ejected = gauge(
            "kingdom_edge_backend_ejected",
            "1 while outlier detection keeps the backend out of rotation.",
            &["pool", "backend"],
        );
        let retries = counter(
            "kingdom_edge_retries_total",
            "Upstream attempts that were retries.",
            &["pool"],
        );
        let pool_rejected = counter(
            "kingdom_edge_pool_rejected_total",
            "Requests answered 503 by a pool: no_backend, max_in_flight, sticky_strict.",
            &["pool", "reason"],
        );
        let sticky_invalid = counter(
            "kingdom_edge_sticky_invalid_total",
            "Sticky cookies ignored: malformed, bad_signature, expired.",
            &["pool", "reason"],
        );
        let truncated = counter(
            "kingdom_edge_responses_truncated_total",
            "Responses aborted after they had started, because the upstream failed mid-response.",
            &["route"],
        );
        let rejected = counter(
            "kingdom_edge_rejected_total",
            "Requests the proxy answered itself instead of forwarding them, or after forwarding failed, by route and reason.",
            &["route", "reason"],
        );
        let rate_limited = counter(
            "kingdom_edge_rate_limited_total",
            "Requests refused with 429 by a rate limit, by route and policy.",
            &["route", "policy"],
        );
        let rate_limit_shadow = counter(
            "kingdom_edge_rate_limit_shadow_total",
            "Requests a rate limit in shadow mode would have refused, by route and policy.",
            &["route", "policy"],
        );
        let rate_limit_keys = gauge(
            "kingdom_edge_rate_limit_keys",
            "Keys a rate limit's table holds now, by policy.",
            &["policy"],
        );
        let slowed_down = counter(
            "kingdom_edge_slowed_down_total",
            "Requests delayed by a slow-down policy, by policy.",
            &["policy"],
        );
        let shed = counter(
            "kingdom_edge_shed_total",
            "Requests answered 503 because too many were in flight (server.overload), by route priority.",
            &["priority"],
        );
        let client_timeouts_vec = counter(
            "kingdom_edge_client_timeouts_total",
            "Client connections closed for taking too long: tls_handshake, keepalive (idle between requests), header, body (408), h2_idle.",
            &["phase"],
        );
        let phase = |name: &str| client_timeouts_vec.with_label_values(&[name]);
        let client_timeouts = ClientTimeouts {
            tls_handshake: phase("tls_handshake"),
            keepalive: phase("keepalive"),
            header: phase("header"),
            body: phase("body"),
            h2_idle: phase("h2_idle"),
        };
        let client_connections = IntGauge::new(
            "kingdom_edge_client_connections",
            "Client connections open now, over all listeners.",
        )
        .expect("static metric definition");
        let idle_connections = IntGauge::new(
            "kingdom_edge_client_connections_idle",
            "HTTP/1 client connections idle for more than 100ms, waiting for their next request.",
        )
        .expect("static metric definition");
        let connections_refused = IntCounter::new(
            "kingdom_edge_connections_refused_total",
            "Client connections closed at once because server.max_connections were open.",
        )
        .expect("static metric definition");
        let reloads = counter(
            "kingdom_edge_config_reloads_total",
            "Config reloads, by result: ok (applied) or error (refused; the old config keeps serving).",
            &["result"],
        );
        let config_version = IntGauge::new(
            "kingdom_edge_config_version",
            "The version of the config in force: 1 at start, one more per applied reload.",
        )
        .expect("static metric definition");
        let admin_auth_failures = IntCounter::new(
            "kingdom_edge_admin_auth_failures_total",
            "Admin API requests refused with 401: no bearer token, or a wrong one.",
        )
        .expect("static metric definition");
        for collector in [
            Box::new(requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(reloads.clone()),
            Box::new(config_version.clone()),
            Box::new(admin_auth_failures.clone()),
            Box::new(client_connections.clone()),
            Box::new(idle_connections.clone()),
            Box::new(connections_refused.clone()),
            Box::new(client_timeouts_vec.clone()),
            Box::new(duration.clone()),
            Box::new(upstream.clone()),
            Box::new(in_flight.clone()),
            Box::new(slow_down_waiting.clone()),
            Box::new(cache_lookups.clone()),
            Box::new(cache_bytes.clone()),
            Box::new(cache_objects.clone()),
            Box::new(cache_evictions.clone()),
            Box::new(access_log_dropped.clone()),
            Box::new(sidecar_restarts.clone()),
            Box::new(backend_healthy.clone()),
            Box::new(backend_ejected.clone()),
            Box::new(retries.clone()),
            Box::new(pool_rejected.clone()),
            Box::new(sticky_invalid.clone()),
            Box::new(truncated.clone()),
            Box::new(rejected.clone()),
            Box::new(rate_limited.clone()),
            Box::new(rate_limit_shadow.clone()),
            Box::new(rate_limit_keys.clone()),
            Box::new(slowed_down.clone()),
            Box::new(shed.clone()),
        ] {
            registry
                .register(collector)
                .expect("metric names are unique");
        }
        Self {
            registry,
            requests,
            duration,
            upstream,
            in_flight,
            slow_down_waiting,
            access_log_dropped,
            sidecar_restarts,
            backend_healthy,
            backend_ejected,
            retries,
            pool_rejected,
            sticky_invalid,
            truncated,
            rejected,
            rate_limited,
            rate_limit_shadow,
            rate_limit_keys,
            slowed_down,
            shed: PRIORITIES.map(|priority| shed.with_label_values(&[priority])),
            cache_lookups,
            cache_bytes,
            cache_objects,
            cache_evictions,
            client_timeouts,
            client_connections,
            open_connections: std::sync::atomic::AtomicUsize::new(0),
            idle_connections,
            connections_refused,
            reloads_ok: reloads.with_label_values(&["ok"]),
            reloads_error: reloads.with_label_values(&["error"]),
            config_version,
            admin_auth_failures,
        }
    }

    /// Per-pool counters.
    pub fn pool(&self, pool: &str) -> PoolMetrics {
        let rejected = |reason: &str| self.pool_rejected.with_label_values(&[pool, reason]);
        let invalid = |reason: &str| self.sticky_invalid.with_label_values(&[pool, reason]);
        PoolMetrics {
            retries: self.retries.with_label_values(&[pool]),
            rejected_no_backend: rejected("no_backend"),
            rejected_max_in_flight: rejected("max_in_flight"),
            rejected_sticky_strict: rejected("sticky_strict"),
            sticky_malformed: invalid("malformed"),
            sticky_bad_signature: invalid("bad_signature"),
            sticky_expired: invalid("expired"),
        }
    }

    /// Handles for one route (or for [`NO_ROUTE`]).
    pub fn route(&self, route: &str) -> RouteMetrics {
        RouteMetrics {
            family: self.requests.clone(),
            rejected_family: self.rejected.clone(),
            route: route.to_string(),
            codes: (0..CODES).map(|_| OnceLock::new()).collect(),
            reasons: (0..REASONS).map(|_| OnceLock::new()).collect(),
            limits: Default::default(),
            duration: self.duration.with_label_values(&[route]),
            truncated: self.truncated.with_label_values(&[route]),
            cache_family: self.cache_lookups.clone(),
            cache_results: Default::default(),
            retired: Default::default(),
        }
    }

    /// Handles for one backend of one pool.
    pub fn backend(&self, pool: &str, backend: &str) -> BackendMetrics {
        let counter = |outcome: &str| self.upstream.with_label_values(&[pool, backend, outcome]);
        BackendMetrics {
            ok: counter("ok"),
            http_5xx: counter("http_5xx"),
            connect_error: counter("connect_error"),
            timeout: counter("timeout"),
            error: counter("error"),
            healthy: self.backend_healthy.with_label_values(&[pool, backend]),
            ejected: self.backend_ejected.with_label_values(&[pool, backend]),
        }
    }

    /// Removes every series of a backend that no longer exists.
    pub fn retire_backend(&self, pool: &str, backend: &str) {
        for outcome in OUTCOMES {
            let _ = self
                .upstream
                .remove_label_values(&[pool, backend, outcome.as_str()]);
        }
        let _ = self.backend_healthy.remove_label_values(&[pool, backend]);
        let _ = self.backend_ejected.remove_label_values(&[pool, backend]);
    }

    /// Removes every series of a pool that no longer exists.
    pub fn retire_pool(&self, pool: &str) {
        let _ = self.retries.remove_label_values(&[pool]);
        for reason in ["no_backend", "max_in_flight", "sticky_strict"] {
            let _ = self.pool_rejected.remove_label_values(&[pool, reason]);
        }
        for reason in ["malformed", "bad_signature", "expired"] {
            let _ = self.sticky_invalid.remove_label_values(&[pool, reason]);
        }
    }

    /// Removes every series of a route that no longer exists; `route` are its handles,
    /// which create no series from now on.
    pub fn retire_route(&self, route: &RouteMetrics) {
        route
            .retired
            .store(true, std::sync::atomic::Ordering::Release);
        let name = route.route.as_str();
        for (i, slot) in route.codes.iter().enumerate() {
            if slot.get().is_some() {
                let code = (i + 100).to_string();
                let _ = self.requests.remove_label_values(&[name, &code]);
            }
        }
        for (_, reason) in route.reasons.iter().filter_map(OnceLock::get) {
            let _ = self.rejected.remove_label_values(&[name, reason]);
        }
        for result in CacheResult::ALL {
            if route.cache_results[result as usize].get().is_some() {
                let _ = self
                    .cache_lookups
                    .remove_label_values(&[name, result.label()]);
            }
        }
        for policy in route
            .limits
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            let _ = self.rate_limited.remove_label_values(&[name, policy]);
            let _ = self.rate_limit_shadow.remove_label_values(&[name, policy]);
        }
        let _ = self.duration.remove_label_values(&[name]);
        let _ = self.truncated.remove_label_values(&[name]);
    }

    /// `kingdom_edge_rate_limited_total` and `kingdom_edge_rate_limit_shadow_total` of
    /// `route` and `policy`; `route`'s retirement removes them.
    pub fn rate_limited(&self, route: &RouteMetrics, policy: &str) -> (IntCounter, IntCounter) {
        let name = route.route.as_str();
        let mut bound = route.limits.lock().unwrap_or_else(|p| p.into_inner());
        if !bound.iter().any(|p| p == policy) {
            bound.push(policy.to_string());
        }
        (
            self.rate_limited.with_label_values(&[name, policy]),
            self.rate_limit_shadow.with_label_values(&[name, policy]),
        )
    }

    /// `kingdom_edge_rate_limit_keys{policy}`.
    pub fn rate_limit_keys(&self, policy: &str) -> IntGauge {
        self.rate_limit_keys.with_label_values(&[policy])
    }

    /// `kingdom_edge_slowed_down_total{policy}`.
    pub fn slowed_down(&self, policy: &str) -> IntCounter {
        self.slowed_down.with_label_values(&[policy])
    }

    /// Removes the series of a rate limit (`slow_down: false`) or slow-down policy that a
    /// reload removed.
    pub fn retire_policy(&self, policy: &str, slow_down: bool) {
        if slow_down {
            let _ = self.slowed_down.remove_label_values(&[policy]);
        } else {
            let _ = self.rate_limit_keys.remove_label_values(&[policy]);
        }
    }

    /// Removes the series of a sidecar process a reload removed.
    pub fn retire_sidecar(&self, sidecar: &str, address: &str) {
        let _ = self
            .sidecar_restarts
            .remove_label_values(&[sidecar, address]);
    }

    /// The restart counter of one sidecar process.
    pub fn sidecar_restarts(&self, sidecar: &str, address: &str) -> IntCounter {
        self.sidecar_restarts.with_label_values(&[sidecar, address])
    }

    /// Everything in the Prometheus text exposition format.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        // Encoding into a Vec only fails on invalid metric names, which are static here.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Status codes 100..=599 get a lazily created counter each.
const CODES: usize = 500;

/// Room for every rejection reason (`errors::Rejection::index`), each a lazily created
/// counter of `kingdom_edge_rejected_total{route,reason}`.
pub const REASONS: usize = 32;

/// An unregistered counter, for handles of a snapshot that was never activated.
fn detached_counter() -> IntCounter {
    IntCounter::new("kingdom_edge_detached", "not exported").expect("static metric definition")
}

/// An unregistered gauge, for handles of a snapshot that was never activated.
fn detached_gauge() -> IntGauge {
    IntGauge::new("kingdom_edge_detached", "not exported").expect("static metric definition")
}

/// Per-route handles: a counter per status code, created on first use, and the latency histogram.
pub struct RouteMetrics {
    family: IntCounterVec,
    rejected_family: IntCounterVec,
    route: String,
    codes: Box<[OnceLock<IntCounter>]>,
    /// By rejection index: the counter and its reason label.
    reasons: Box<[OnceLock<(IntCounter, &'static str)>]>,
    /// Rate limits whose counters were bound to this route (for retirement).
    limits: std::sync::Mutex<Vec<String>>,
    duration: prometheus::Histogram,
    /// `kingdom_edge_responses_truncated_total{route}`.
    pub truncated: IntCounter,
    cache_family: IntCounterVec,
    /// By [`CacheResult`], created on first use.
    cache_results: [OnceLock<IntCounter>; CacheResult::ALL.len()],
    /// Its series were removed: no code counter is created any more.
    retired: std::sync::atomic::AtomicBool,
}

impl RouteMetrics {
    /// Handles no registry holds, for a route of a snapshot that was never activated.
    pub fn detached(route: &str) -> Self {
        let family = || {
            IntCounterVec::new(
                Opts::new("kingdom_edge_detached", "not exported"),
                &["route", "code"],
            )
            .expect("static metric definition")
        };
        Self {
            family: family(),
            rejected_family: family(),
            route: route.to_string(),
            codes: (0..CODES).map(|_| OnceLock::new()).collect(),
            reasons: (0..REASONS).map(|_| OnceLock::new()).collect(),
            limits: Default::default(),
            duration: prometheus::Histogram::with_opts(HistogramOpts::new(
                "kingdom_edge_detached",
                "not exported",
            ))
            .expect("static metric definition"),
            truncated: detached_counter(),
            cache_family: family(),
            cache_results: Default::default(),
            retired: Default::default(),
        }
    }

    /// Counts one request of a cached route by how the cache answered it.
    pub fn count_cache_lookup(&self, result: CacheResult) {
        let slot = &self.cache_results[result as usize];
        if self.is_retired() {
            if let Some(counter) = slot.get() {
                counter.inc();
            }
            return;
        }
        slot.get_or_init(|| {
            self.cache_family
                .with_label_values(&[self.route.as_str(), result.label()])
        })
        .inc();
    }

    /// Whether its series were removed.
    pub fn is_retired(&self) -> bool {
        self.retired.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Requests answered so far (every status), for request rates.
    pub fn total(&self) -> u64 {
        self.duration.get_sample_count()
    }

    /// Counts one request the proxy answered itself, for the reason with `index` and label
    /// `code`.
    pub fn count_rejection(&self, index: usize, code: &'static str) {
        let Some(slot) = self.reasons.get(index) else {
            return;
        };
        if self.is_retired() {
            if let Some((counter, _)) = slot.get() {
                counter.inc();
            }
            return;
        }
        let (counter, _) = slot.get_or_init(|| {
            let counter = self
                .rejected_family
                .with_label_values(&[self.route.as_str(), code]);
            (counter, code)
        });
        counter.inc();
    }

    /// Counts one answered request and its duration.
    pub fn observe(&self, status: u16, seconds: f64) {
        self.duration.observe(seconds);
        let Some(slot) = (status as usize)
            .checked_sub(100)
            .and_then(|i| self.codes.get(i))
        else {
            return;
        };
        if self.is_retired() {
            // A late request on an older snapshot: its series are gone, and stay gone.
            if let Some(counter) = slot.get() {
                counter.inc();
            }
            return;
        }
        slot.get_or_init(|| {
            self.family
                .with_label_values(&[self.route.as_str(), &status.to_string()])
        })
        .inc();
    }
}

impl PoolMetrics {
    /// Handles no registry holds, for a pool of a snapshot that was never activated.
    pub fn detached() -> Self {
        Self {
            retries: detached_counter(),
            rejected_no_backend: detached_counter(),
            rejected_max_in_flight: detached_counter(),
            rejected_sticky_strict: detached_counter(),
            sticky_malformed: detached_counter(),
            sticky_bad_signature: detached_counter(),
            sticky_expired: detached_counter(),
        }
    }
}

/// A pool's counters.
pub struct PoolMetrics {
    /// `kingdom_edge_retries_total{pool}`.
    pub retries: IntCounter,
    /// 503 because no backend could take the request.
    pub rejected_no_backend: IntCounter,
    /// 503 because `limits.max_in_flight` was reached.
    pub rejected_max_in_flight: IntCounter,
    /// 503 because a strict sticky pin was unusable.
    pub rejected_sticky_strict: IntCounter,
    /// Sticky cookies ignored, by reason.
    pub sticky_malformed: IntCounter,
    /// A forged or tampered sticky cookie.
    pub sticky_bad_signature: IntCounter,
    /// An expired sticky cookie.
    pub sticky_expired: IntCounter,
}

/// The outcome of one upstream attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A response below 500.
    Ok,
    /// A 5xx response.
    Http5xx,
    /// The connection could not be established.
    ConnectError,
    /// Connect, read or write timed out.
    Timeout,
    /// Any other failure after connecting (reset, protocol error).
    Error,
}

/// Every outcome, in label order.
const OUTCOMES: [Outcome; 5] = [
    Outcome::Ok,
    Outcome::Http5xx,
    Outcome::ConnectError,
    Outcome::Timeout,
    Outcome::Error,
];

impl Outcome {
    /// The label value used in metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Http5xx => "http_5xx",
            Outcome::ConnectError => "connect_error",
            Outcome::Timeout => "timeout",
            Outcome::Error => "error",
        }
    }
}

/// Per-backend upstream outcome counters and state gauges.
pub struct BackendMetrics {
    ok: IntCounter,
    http_5xx: IntCounter,
    connect_error: IntCounter,
    timeout: IntCounter,
    error: IntCounter,
    /// `kingdom_edge_backend_healthy{pool,backend}`.
    pub healthy: IntGauge,
    /// `kingdom_edge_backend_ejected{pool,backend}`.
    pub ejected: IntGauge,
}

impl BackendMetrics {
    /// Handles no registry holds, for a backend of a snapshot that was never activated.
    pub fn detached() -> Self {
        Self {
            ok: detached_counter(),
            http_5xx: detached_counter(),
            connect_error: detached_counter(),
            timeout: detached_counter(),
            error: detached_counter(),
            healthy: detached_gauge(),
            ejected: detached_gauge(),
        }
    }

    /// Upstream attempts so far (every outcome), for request rates.
    pub fn total(&self) -> u64 {
        [
            &self.ok,
            &self.http_5xx,
            &self.connect_error,
            &self.timeout,
            &self.error,
        ]
        .iter()
        .map(|c| c.get())
        .sum()
    }

    /// Counts one attempt.
    pub fn record(&self, outcome: Outcome) {
        match outcome {
            Outcome::Ok => &self.ok,
            Outcome::Http5xx => &self.http_5xx,
            Outcome::ConnectError => &self.connect_error,
            Outcome::Timeout => &self.timeout,
            Outcome::Error => &self.error,
        }
        .inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn route_counters_render_with_labels() {
        let metrics = Metrics::new();
        let route = metrics.route("api");
        route.observe(200, 0.01);
        route.observe(200, 0.02);
        route.observe(404, 0.01);
        route.observe(42, 0.01); // out of range: only the histogram counts it
        let text = metrics.render();
        assert!(text.contains(r#"kingdom_edge_requests_total{code="200",route="api"} 2"#));
        assert!(text.contains(r#"kingdom_edge_requests_total{code="404",route="api"} 1"#));
        assert!(text.contains(r#"kingdom_edge_request_duration_seconds_count{route="api"} 4"#));
        assert_eq!(route.total(), 4);
    }

    #[test]
    fn retired_series_disappear() {
        let metrics = Metrics::new();
        let route = metrics.route("gone");
        route.observe(200, 0.01);
        let backend = metrics.backend("p", "127.0.0.1:1");
        backend.record(Outcome::Ok);
        backend.healthy.set(1);
        metrics.pool("p").retries.inc();
        let kept = metrics.backend("p", "127.0.0.1:2");
        kept.record(Outcome::Ok);
        metrics.retire_route(&route);
        metrics.retire_backend("p", "127.0.0.1:1");
        metrics.retire_pool("p");
        let text = metrics.render();
        assert!(!text.contains("gone"), "{text}");
        assert!(!text.contains("127.0.0.1:1\""), "{text}");
        assert!(!text.contains("kingdom_edge_retries_total{"), "{text}");
        assert!(
            text.contains("127.0.0.1:2"),
            "the backend that stays keeps its series"
        );
    }
}
