//! The request pipeline: Pingora's `ProxyHttp` hooks in the order they run. Each phase is a
//! few lines that call the module owning the policy.
//!
//! | phase                      | what happens                                                |
//! |----------------------------|-------------------------------------------------------------|
//! | `new_ctx`                  | take the config snapshot, count the request in flight       |
//! | `early_request_filter`     | request id; target, path, host, framing, limits (`request`);|
//! |                            | pipelining on; client address                               |
//! | `request_filter`           | `OPTIONS *`; route (or 404) and its head limits; admission  |
//! |                            | (`admit`: CORS preflight, validate, authenticate,           |
//! |                            | rate-limit, shed, slow down); `100 Continue`, pool          |
//! |                            | admission, sticky pin                                       |
//! | `request_body_filter`      | count body bytes against the route's `max_body` (413)       |
//! | `upstream_peer`            | backoff before a retry; pick a backend (pin, balancer,      |
//! |                            | panic mode) admitted by its breaker; set timeouts           |
//! | `upstream_request_filter`  | `X-Forwarded-*`, `x-request-id`, `x-user-id`                |
//! | `fail_to_connect`          | record the failure; retry (any method) if the budget allows |
//! | `upstream_response_filter` | record the outcome; retry an idempotent 502/503/504         |
//! | `error_while_proxy`        | record a reset or timeout; retry only replayable requests   |
//! | `response_filter`          | drop hop-by-hop; `decorate` (request id, RateLimit,         |
//! |                            | security and CORS headers; no `server`); sticky cookie      |
//! | `fail_to_proxy`            | JSON error (4xx/5xx), decorated like any response           |
//! | `logging`                  | metrics and one access-log line                             |
//!
//! Hop-by-hop request headers are stripped by Pingora's standard upstream request policy,
//! which also forwards WebSocket upgrades.

mod admit;
mod decorate;

use std::borrow::Cow;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use bytes::Bytes;
use http::header;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::HttpPeer;
use pingora::protocols::http::ServerSession;
use pingora::protocols::l4::socket::SocketAddr as PeerAddr;
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use pingora::{Error, ErrorSource, ErrorType, Result, RetryType};
use prometheus::IntGauge;

use self::admit::Admission;
use self::decorate::{decorate, Decoration};
use crate::access_log::{self, AccessLog, Entry};
use crate::balance::BackendId;
use crate::cache::collapse::{self, Collapser, Role};
use crate::cache::policy::{self as cache_policy, CachePolicy};
use crate::cache::Cache;
use crate::errors::{self, Refusal, Rejection};
use crate::forwarded::{self, Forwarded, Incoming};
use crate::live::{InFlight as BackendInFlight, PoolRequest};
use crate::metrics::{Metrics, Outcome};
use crate::request;
use crate::request::path::{self, EscapedSlashes};
use crate::request_id;
use crate::route::{Route, RouteId};
use crate::snapshot::{ConfigStore, Snapshot};
use crate::sticky::Invalid;
use crate::upstream::{Choice, HashKey, Pool, Unavailable};

/// The proxy for one listener.
pub struct EdgeProxy {
    store: Arc<ConfigStore>,
    metrics: Arc<Metrics>,
    access_log: Arc<AccessLog>,
    /// `listeners[].name`, for its settings in the snapshot.
    listener: String,
    /// Whether this listener terminates TLS (for `X-Forwarded-Proto` and `Secure` cookies).
    tls: bool,
    /// Set from SIGTERM on: HTTP/1 responses close their connection.
    draining: Arc<AtomicBool>,
    /// The process's response cache.
    cache: Arc<Cache>,
}

impl EdgeProxy {
    /// A proxy reading its config from `store`.
    pub fn new(
        store: Arc<ConfigStore>,
        metrics: Arc<Metrics>,
        access_log: Arc<AccessLog>,
        listener: String,
        tls: bool,
        draining: Arc<AtomicBool>,
        cache: Arc<Cache>,
    ) -> Self {
        Self {
            store,
            metrics,
            access_log,
            listener,
            tls,
            draining,
            cache,
        }
    }

    /// The scheme the client used and the `X-Forwarded-Host` the upstream is told, as
    /// `forwarded` decided them (a trusted proxy's word counts): both shape the upstream's
    /// answer, so both are part of the cache key.
    fn cache_scheme_and_host<'c>(&self, ctx: &'c RequestCtx) -> (&'c str, Option<&'c str>) {
        let own = if self.tls { "https" } else { "http" };
        match &ctx.forwarded {
            Some(f) => (f.proto.as_str(), f.host.as_deref()),
            None => (own, None),
        }
    }

    /// On a route with `coalesce_uncacheable`: the answer of an identical request in flight,
    /// once it is complete; else (no flight, or nothing to share) the request goes upstream,
    /// leading a flight when there was none.
    async fn collapse(&self, session: &mut Session, ctx: &mut RequestCtx) -> Collapsed {
        let Some(policy) = ctx.route().and_then(|r| r.cache.as_ref()) else {
            return Collapsed::Fetch;
        };
        let body_empty = session.is_body_empty();
        // A request that already waited on the cache lock for this key waits no more.
        let waited = session.cache.lock_duration().is_some();
        let req = session.req_header();
        if !policy.coalesce_uncacheable || waited || !Collapser::eligible(req, body_empty) {
            return Collapsed::Fetch;
        }
        // The cache key, as `cache_key_callback` made it (the cache is on for every request
        // that may take part).
        let Some(mut key) = ctx.cache_key else {
            return Collapsed::Fetch;
        };
        // A flight belongs to one config: after a reload that moves the URL to another
        // pool, no request is answered by the old pool's fetch.
        for (k, v) in key.iter_mut().zip(ctx.snapshot.version.to_le_bytes()) {
            *k ^= v;
        }
        let (limit, wait) = (
            self.cache.settings.max_object,
            self.cache.settings.lock_timeout,
        );
        let (flight, deadline) = match self.cache.collapser.join(key, limit, wait) {
            Role::Leader(leader) => {
                ctx.flight = Some(leader);
                return Collapsed::Fetch;
            }
            Role::Follower(flight, deadline) => (flight, deadline),
        };
        // The request has no body: watching the connection tells when the client leaves.
        let answer = tokio::select! {
            answer = collapse::follow(flight, deadline) => answer,
            _ = session.as_downstream_mut().read_body_or_idle(true) => return Collapsed::ClientGone,
        };
        match answer {
            Some(answer) if answer.serves(session.req_header()) => Collapsed::Answer(answer),
            _ => Collapsed::Fetch,
        }
    }

    /// The load shedding decides on: requests in flight, less those a slow-down holds back
    /// (they cost a timer, and a client being slowed down must not get others shed).
    fn load(&self) -> admit::Load<'_> {
        let busy = self.metrics.in_flight.get() - self.metrics.slow_down_waiting.get();
        admit::Load {
            in_flight: u64::try_from(busy).unwrap_or(0),
            shed: &self.metrics.shed,
        }
    }

    /// Holds a slowed-down request for `delay`: its task waits, no thread does, and it is
    /// not counted towards shedding meanwhile. False if the client left during the wait
    /// (closed its connection or reset its stream); only a request without a body can tell,
    /// as watching the connection would read the body.
    async fn slow_down(&self, session: &mut Session, delay: Duration) -> bool {
        let _waiting = InFlight::new(&self.metrics.slow_down_waiting);
        if !session.is_body_empty() {
            tokio::time::sleep(delay).await;
            return true;
        }
        tokio::select! {
            () = tokio::time::sleep(delay) => true,
            // A pipelined request's bytes are kept for later and leave this pending.
            _ = session.as_downstream_mut().read_body_or_idle(true) => false,
        }
    }
}

/// Per-request state, alive from the request header to the log line.
pub struct RequestCtx {
    snapshot: Arc<Snapshot>,
    started: Instant,
    request_id: String,
    forwarded: Option<Forwarded>,
    /// The matched route, in `snapshot`.
    route: Option<RouteId>,
    body_bytes: u64,
    /// Why the proxy answers itself, once it does.
    rejection: Option<Rejection>,
    /// The headers of that answer besides the usual ones (`retry-after`, `allow`, …).
    refusal_headers: Vec<(http::HeaderName, http::HeaderValue)>,
    /// Held while the request is in its pool: `max_in_flight` and the retry budget.
    pool_request: Option<PoolRequest>,
    /// The subject of the request's verified bearer token.
    user: Option<String>,
    /// Whether the response was found storable (set on a cache miss).
    cache_stored: bool,
    /// The primary cache key of a request the cache looked up.
    cache_key: Option<pingora::cache::key::HashBinary>,
    /// Leading identical requests that wait for this one's answer (`coalesce_uncacheable`).
    flight: Option<Box<collapse::Leader>>,
    /// Headers admission adds to the response (the RateLimit fields).
    admission_headers: Vec<(http::HeaderName, http::HeaderValue)>,
    /// Whether the client connection is TLS.
    tls: bool,
    /// The backend a valid sticky cookie names.
    pin: Option<BackendId>,
    /// When the request's valid sticky cookie expires (Unix seconds).
    pin_expires: Option<u64>,
    /// Backends tried so far, in order; the last is the current attempt's.
    tried: Vec<BackendId>,
    /// The current attempt.
    choice: Option<Choice>,
    /// Whether the current attempt's outcome has been recorded.
    recorded: bool,
    /// What the current attempt's failure leads to, once decided (`after_failure`).
    decision: Option<Next>,
    /// Held while an attempt is in flight to its backend.
    backend_in_flight: Option<BackendInFlight>,
    /// Why the exchange ended early, once it has.
    cut: Option<Cut>,
    /// `OPTIONS *`: answered by the edge once routing would start.
    asterisk: bool,
    /// The request head as received, for the route's limits.
    head_size: request::HeadSize,
    /// The next attempt resends on a new connection after a stale pooled one.
    resend: bool,
    /// The current attempt's upstream answered with a non-5xx header.
    answered: bool,
    /// When `timeouts.total` runs out, for routes whose pool sets it.
    deadline: Option<Instant>,
    _in_flight: InFlight,
}

/// An exchange that ended before its response was complete.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cut {
    /// The client went away: its outcome, not the backend's (logged as 499 when no response
    /// had started, as nginx does).
    ClientAborted,
    /// The upstream failed after part of its response was sent to the client: the client's
    /// connection (HTTP/1) or stream (HTTP/2) is aborted so it sees a failure, never a
    /// response completed from another attempt.
    UpstreamTruncated,
}

impl Cut {
    fn code(self) -> &'static str {
        match self {
            Cut::ClientAborted => "client_aborted",
            Cut::UpstreamTruncated => "upstream_truncated",
        }
    }
}

impl RequestCtx {
    fn route(&self) -> Option<&Route> {
        self.route.map(|id| self.snapshot.route(id))
    }

    fn pool(&self) -> Option<&Pool> {
        self.route().map(|r| self.snapshot.pool(r.pool))
    }

    /// What decides the edge's headers on the answer to `req`.
    fn decoration<'a>(&'a self, req: &'a RequestHeader) -> Decoration<'a> {
        Decoration {
            request_id: &self.request_id,
            admission: &self.admission_headers,
            security: self
                .route()
                .map_or(&self.snapshot.server.security_headers, |r| {
                    &r.security_headers
                }),
            cors: self.route().and_then(|r| r.cors.as_ref()),
            origin: req.headers.get(header::ORIGIN),
            tls: self.tls,
        }
    }

    fn attempts(&self) -> u32 {
        self.tried.len() as u32
    }

    /// Records the current attempt's outcome once.
    fn record(&mut self, outcome: Outcome) {
        if let (Some(choice), false, Some(pool)) = (self.choice, self.recorded, self.pool()) {
            pool.record(choice.id, Instant::now(), outcome);
            self.recorded = true;
        }
    }

    /// Whether an attempt's error is nobody's fault on the upstream side: raised by the proxy
    /// or the client rather than the upstream, or a timeout that fired only because
    /// `timeouts.total` ran out (the backend may be healthy, just not fast enough for what
    /// was left).
    fn blameless(&self, e: &Error) -> bool {
        use ErrorType::*;
        let capped = self.time_left() == Some(Duration::ZERO)
            && matches!(
                e.etype(),
                ConnectTimedout | ReadTimedout | WriteTimedout | TLSHandshakeTimedout
            );
        e.esource() != &ErrorSource::Upstream || capped
    }

    /// Records the current attempt's failure `e` unless it is [`Self::blameless`].
    fn record_fault(&mut self, e: &Error) {
        if self.blameless(e) {
            self.abandon_attempt();
        } else {
            self.record(outcome(Some(e), 0));
        }
    }

    /// What is left of `timeouts.total`, if the pool sets it.
    fn time_left(&self) -> Option<Duration> {
        self.deadline
            .map(|d| d.saturating_duration_since(Instant::now()))
    }

    /// Whether the request is pinned by strict stickiness to a backend that already failed it.
    fn strict_pin_failed(&self) -> bool {
        let strict = self
            .pool()
            .and_then(|p| p.sticky.as_ref())
            .is_some_and(|s| s.strict);
        strict && self.pin.is_some_and(|pin| self.tried.contains(&pin))
    }

    /// Ends the current attempt without an outcome (the backend is not to blame): a claimed
    /// half-open probe is given back.
    fn abandon_attempt(&mut self) {
        if let (Some(choice), false, Some(pool)) = (self.choice, self.recorded, self.pool()) {
            if choice.probe {
                pool.abandon_probe(choice.id);
            }
        }
        self.recorded = true;
    }

    /// Whether another attempt is allowed: attempts left, and room in the pool's budget.
    fn may_retry(&mut self) -> bool {
        self.may_retry_with(true)
    }

    /// [`Self::may_retry`]; `budgeted: false` for a retry that needs no room in the budget.
    fn may_retry_with(&mut self, budgeted: bool) -> bool {
        let snapshot = self.snapshot.clone();
        let Some(pool) = self.route.map(|id| snapshot.pool(snapshot.route(id).pool)) else {
            return false;
        };
        // A strict pin's retry only turns into its 503: it loads no backend.
        let budgeted = budgeted && !self.strict_pin_failed();
        let in_time = self.deadline.is_none_or(|d| Instant::now() < d);
        let attempts_left = self.tried.len() as u32 <= pool.retries.attempts;
        let Some(request) = self.pool_request.as_mut() else {
            return false;
        };
        in_time
            && attempts_left
            && (!budgeted || request.try_retry(&pool.retries, pool.backends.len()))
    }
}

/// Counts a request in `kingdom_edge_in_flight` for exactly as long as it lives, on every
/// path including errors and client aborts.
struct InFlight(IntGauge);

impl InFlight {
    fn new(gauge: &IntGauge) -> Self {
        gauge.inc();
        Self(gauge.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[async_trait]
impl ProxyHttp for EdgeProxy {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> RequestCtx {
        RequestCtx {
            snapshot: self.store.load(),
            started: Instant::now(),
            request_id: String::new(),
            forwarded: None,
            route: None,
            body_bytes: 0,
            rejection: None,
            refusal_headers: Vec::new(),
            pool_request: None,
            user: None,
            cache_stored: false,
            cache_key: None,
            flight: None,
            admission_headers: Vec::new(),
            tls: self.tls,
            pin: None,
            pin_expires: None,
            tried: Vec::new(),
            choice: None,
            recorded: false,
            decision: None,
            backend_in_flight: None,
            cut: None,
            asterisk: false,
            head_size: request::HeadSize::default(),
            resend: false,
            answered: false,
            deadline: None,
            _in_flight: InFlight::new(&self.metrics.in_flight),
        }
    }

    async fn early_request_filter(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        if self.draining.load(Ordering::Relaxed) {
            session.set_keepalive(None);
        }
        // Requests a client sends before reading the previous answer are served in order
        // (RFC 9112 §9.3.2) instead of being dropped with the connection.
        session.set_pipelining_enabled(true);
        // A request body may pause for at most this long between reads (408 past it).
        session.set_read_timeout(Some(ctx.snapshot.server.client_timeouts.body));
        // Only a verified token says who the user is (see `upstream_request_filter`).
        strip_user_id(session.req_header_mut());
        let req = session.req_header();
        ctx.request_id = request_id::choose(req.headers.get("x-request-id").map(|v| v.as_bytes()));
        let default_host = || {
            let listeners = &ctx.snapshot.listeners;
            listeners
                .iter()
                .find(|l| l.name == self.listener)
                .map_or_else(String::new, |l| l.default_host.clone())
        };
        let inspected = match request::inspect(req, &ctx.snapshot.server.hygiene, default_host) {
            Ok(inspected) => inspected,
            Err(rejection) => return reject(ctx, rejection),
        };
        apply(session.req_header_mut(), inspected.target, inspected.host)?;
        if let Some(length) = inspected.content_length {
            let req = session.req_header_mut();
            req.remove_header(&header::CONTENT_LENGTH);
            req.insert_header(header::CONTENT_LENGTH, length.to_string())?;
        }
        ctx.asterisk = inspected.asterisk;
        ctx.head_size = inspected.size;
        if let Some(peer) = session.client_addr().and_then(PeerAddr::as_inet) {
            let req = session.req_header();
            let xff = joined_header(req, "x-forwarded-for");
            let incoming = Incoming {
                peer: peer.ip(),
                tls: self.tls,
                host: request_host(req),
                xff: xff.as_deref(),
                proto: header_str(req, "x-forwarded-proto"),
                forwarded_host: header_str(req, "x-forwarded-host"),
            };
            let trusted = &ctx.snapshot.server.trusted_proxies;
            ctx.forwarded = Some(forwarded::resolve(&incoming, trusted));
        }
        Ok(())
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        if ctx.asterisk {
            return answer_options_asterisk(session, ctx).await;
        }
        if session
            .req_header()
            .method
            .as_str()
            .eq_ignore_ascii_case("PURGE")
        {
            // Purging is the admin API's (`POST /cache/purge`), never a client's.
            return answer(session, ctx, Rejection::MethodNotAllowed).await;
        }
        let snapshot = ctx.snapshot.clone();
        let id = match route_request(&snapshot, session.req_header_mut()) {
            Ok(Some(id)) => id,
            Ok(None) => return answer(session, ctx, Rejection::NoRoute).await,
            Err(rejection) => return answer(session, ctx, rejection).await,
        };
        let route = snapshot.route(id);
        ctx.route = Some(id);
        if let Err(rejection) = route.limits.check(&ctx.head_size) {
            return answer(session, ctx, rejection).await;
        }
        let now = admit::Now {
            unix: unix_now(),
            nanos: crate::ratelimit::nanos(Instant::now()),
        };
        let client = ctx.forwarded.as_ref().map(|f| f.client_ip);
        let has_body = !session.is_body_empty();
        let req = session.req_header();
        match admit::admit(&snapshot, route, req, has_body, client, now, self.load()) {
            Ok(Admission::Preflight(headers)) => {
                return answer_preflight(session, ctx, headers).await;
            }
            Ok(Admission::Forward(admitted)) => {
                ctx.user = admitted.user;
                ctx.admission_headers = admitted.rate_headers;
                if !admitted.delay.is_zero() {
                    if !self.slow_down(session, admitted.delay).await {
                        // The client left while held back: nothing to forward, no one to
                        // answer.
                        ctx.cut = Some(Cut::ClientAborted);
                        session.set_keepalive(None);
                        return Ok(true);
                    }
                    let rate_headers = &ctx.admission_headers;
                    let load = self.load();
                    if let Err(refusal) =
                        admit::shed_after_wait(&snapshot, route, load, rate_headers)
                    {
                        return answer(session, ctx, refusal).await;
                    }
                }
            }
            Err(refusal) => return answer(session, ctx, refusal).await,
        }
        Ok(false)
    }

    /// On to the pool (the request was not answered from the cache): its limits, then the
    /// client's body.
    async fn proxy_upstream_filter(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<bool> {
        let snapshot = ctx.snapshot.clone();
        let Some(pool) = ctx.route.map(|id| snapshot.pool(snapshot.route(id).pool)) else {
            return reject(ctx, Rejection::Internal);
        };
        match self.collapse(session, ctx).await {
            Collapsed::Fetch => {}
            Collapsed::Answer(answer) => {
                // Another request fetched it while this one waited.
                if self.draining.load(Ordering::Relaxed) {
                    session.set_keepalive(None);
                }
                write_collapsed(session, ctx, &answer).await?;
                return Ok(false);
            }
            Collapsed::ClientGone => {
                // Nothing to forward, no one to answer (logged 499 by `fail_to_proxy`).
                let why = "the client left while waiting for another request's fetch";
                return Err(Error::create(
                    ErrorType::ConnectionClosed,
                    ErrorSource::Downstream,
                    Some(why.into()),
                    None,
                ));
            }
        }
        // `timeouts.total` counts from here: a slow-down's wait, or one for another request's
        // fetch of the same cached URL, is not the upstream's.
        if !session.is_upgrade_req() {
            ctx.deadline = pool.timeouts.total.map(|total| Instant::now() + total);
        }
        let Some(request) = pool.state.start(pool.max_in_flight) else {
            pool.state.metrics.rejected_max_in_flight.inc();
            return answer(session, ctx, Rejection::PoolSaturated)
                .await
                .map(|_| false);
        };
        ctx.pool_request = Some(request);
        if let Err(rejection) = expect_continue(session).await {
            return answer(session, ctx, rejection).await.map(|_| false);
        }
        (ctx.pin, ctx.pin_expires) = sticky_pin(pool, session.req_header()).unzip();
        Ok(true)
    }

    async fn request_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        _end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        // Chunked bodies declare no length: count what arrives.
        ctx.body_bytes += body.as_ref().map_or(0, |b| b.len() as u64);
        match ctx.route().and_then(|r| r.validation.max_body) {
            Some(max) if ctx.body_bytes > max => reject(ctx, Rejection::BodyTooLarge),
            _ => Ok(()),
        }
    }

    async fn upstream_peer(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<Box<HttpPeer>> {
        let snapshot = ctx.snapshot.clone();
        let Some(pool) = ctx.route.map(|id| snapshot.pool(snapshot.route(id).pool)) else {
            return reject(ctx, Rejection::Internal);
        };
        let retry = ctx.attempts();
        if retry > 0 && !ctx.resend && ctx.strict_pin_failed() {
            // Strict stickiness: the pinned backend failed this request; no other may serve it.
            pool.state.metrics.rejected_sticky_strict.inc();
            return reject(ctx, Rejection::StickyBackendUnavailable);
        }
        if retry > 0 {
            pool.state.metrics.retries.inc();
            let wait = pool.retries.backoff(retry, fastrand::f64());
            tokio::time::sleep(wait.min(ctx.time_left().unwrap_or(wait))).await;
        }
        let left = ctx.time_left();
        if left == Some(Duration::ZERO) {
            return reject(ctx, Rejection::UpstreamTimeout);
        }
        let key = hash_key(pool, session.req_header(), ctx.forwarded.as_ref());
        // A pooled connection found closed is no fault of its backend: it may be chosen again.
        let tried = match std::mem::take(&mut ctx.resend) {
            true => &ctx.tried[..ctx.tried.len().saturating_sub(1)],
            false => &ctx.tried[..],
        };
        let choice = match pool.choose(Instant::now(), ctx.pin, key.as_deref(), tried) {
            Ok(choice) => choice,
            Err(why) => {
                let rejection = match why {
                    Unavailable::Exhausted => Rejection::NoBackend,
                    Unavailable::FailClosed => Rejection::NoHealthyBackend,
                    Unavailable::StickyStrict => Rejection::StickyBackendUnavailable,
                };
                match why {
                    Unavailable::StickyStrict => pool.state.metrics.rejected_sticky_strict.inc(),
                    _ => pool.state.metrics.rejected_no_backend.inc(),
                }
                return reject(ctx, rejection);
            }
        };
        let Some(backend) = pool.backend(choice.id) else {
            return reject(ctx, Rejection::Internal);
        };
        ctx.tried.push(choice.id);
        ctx.choice = Some(choice);
        ctx.decision = None;
        ctx.recorded = false;
        ctx.answered = false;
        ctx.backend_in_flight = Some(backend.state.start_request());
        let mut peer = HttpPeer::new(backend.address, false, String::new());
        // `timeouts.total` caps the connect here, and the exchange after it through
        // `upstream_deadline`, however the upstream spaces its bytes.
        let t = pool.timeouts;
        peer.options.connection_timeout = Some(left.map_or(t.connect, |left| t.connect.min(left)));
        peer.options.read_timeout = Some(t.read);
        peer.options.write_timeout = Some(t.write);
        peer.options.idle_timeout = Some(t.idle);
        Ok(Box::new(peer))
    }

    async fn upstream_request_filter(
        &self,
        _session: &mut Session,
        upstream: &mut RequestHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        if let Some(f) = &ctx.forwarded {
            upstream.insert_header(names::X_FORWARDED_FOR, &f.for_chain)?;
            upstream.insert_header(names::X_FORWARDED_PROTO, &f.proto)?;
            match &f.host {
                Some(host) => upstream.insert_header(names::X_FORWARDED_HOST, host)?,
                None => {
                    upstream.remove_header(&names::X_FORWARDED_HOST);
                }
            }
        }
        upstream.insert_header(names::X_REQUEST_ID, &ctx.request_id)?;
        if let Some(user) = &ctx.user {
            upstream.insert_header(names::X_USER_ID, user)?;
        }
        if ctx.route().is_some_and(|r| r.cache.is_some()) {
            // The origin may aim `Surrogate-Control` at this cache by this name.
            // (A client's own claim about the edge's capabilities is not passed on.)
            upstream.insert_header(
                cache_policy::SURROGATE_CAPABILITY,
                cache_policy::SURROGATE_CAPABILITY_VALUE,
            )?;
        }
        Ok(())
    }

    fn fail_to_connect(
        &self,
        session: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut RequestCtx,
        mut e: Box<Error>,
    ) -> Box<Error> {
        let failure = match outcome(Some(&e), 0) {
            Outcome::Timeout => Outcome::Timeout,
            _ => Outcome::ConnectError,
        };
        if ctx.blameless(&e) {
            ctx.abandon_attempt();
        } else {
            ctx.record(failure);
        }
        let refused = e.etype() == &ErrorType::ConnectRefused;
        let retry = after_failure(session, ctx, Failure::Connect { refused });
        e.set_retry(matches!(retry, Next::Retry));
        e
    }

    async fn upstream_response_filter(
        &self,
        session: &mut Session,
        response: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        if response.status.is_informational() {
            return Ok(());
        }
        let status = response.status.as_u16();
        if status >= 500 {
            ctx.record(outcome(None, status));
        } else {
            // A success only once the body is complete too: see `logging`.
            ctx.answered = true;
        }
        let next = match status {
            500.. => after_failure(session, ctx, Failure::Status(status)),
            _ => Next::PassOn,
        };
        match next {
            // The answer goes on; for a stale one, Pingora's cache asks `should_serve_stale`
            // about the 5xx, which says yes.
            Next::PassOn | Next::ServeStale => {
                if let Some(leader) = &mut ctx.flight {
                    leader.header(response, session.req_header());
                }
                Ok(())
            }
            Next::Retry => {
                // An error tells Pingora's attempt loop to try again (and
                // `error_while_proxy` leaves it as it is).
                let mut e =
                    Error::explain(ErrorType::HTTPStatus(status), "retrying an upstream 5xx");
                e.set_retry(true);
                Err(e)
            }
        }
    }

    fn error_while_proxy(
        &self,
        peer: &HttpPeer,
        session: &mut Session,
        e: Box<Error>,
        ctx: &mut RequestCtx,
        client_reused: bool,
    ) -> Box<Error> {
        let mut e = e.more_context(format!("Peer: {peer}"));
        let retrying_status = matches!(e.etype(), ErrorType::HTTPStatus(_));
        if retrying_status && ctx.decision == Some(Next::Retry) {
            // A 5xx answer `upstream_response_filter` turned into a retry.
            return e;
        }
        if errors::client_gone(&e) {
            // Nothing to hold against the backend, and nobody left to answer.
            ctx.cut = Some(Cut::ClientAborted);
            ctx.abandon_attempt();
            e.set_retry(false);
            return e;
        }
        if response_started(session) {
            // Part of this attempt's response is already with the client: another attempt
            // would splice a second response onto it.
            ctx.cut = Some(Cut::UpstreamTruncated);
            ctx.record_fault(&e);
            e.set_retry(false);
            return e;
        }
        if ctx.blameless(&e) {
            // Our own rejection (a body over `max_body`), a bad request body, or the total
            // deadline: the same would happen on any backend, and none is at fault.
            ctx.abandon_attempt();
            e.set_retry(false);
            return e;
        }
        let stale = client_reused && matches!(e.retry, RetryType::ReusedOnly);
        let retry = if stale {
            // (Not blameless: a stale connection is the one case retried outside the rules.)
            // A pooled keep-alive connection the upstream had already closed: not the
            // backend's fault, and safe to resend on a new connection, outside the budget
            // but within one attempt more than the policy's.
            let allowed = ctx
                .pool()
                .is_some_and(|pool| ctx.attempts() <= pool.retries.attempts + 1);
            ctx.abandon_attempt();
            ctx.resend = allowed && replayable(session);
            ctx.resend
        } else {
            ctx.record(outcome(Some(&e), 0));
            // Not retried, a stale entry still answers if it may (Pingora asks
            // `should_serve_stale` once the attempts are over).
            matches!(after_failure(session, ctx, Failure::Exchange), Next::Retry)
        };
        e.set_retry(retry);
        e
    }

    fn upstream_response_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> Result<Option<Duration>> {
        if let Some(leader) = &mut ctx.flight {
            leader.body(body.as_ref(), end_of_stream);
        }
        if end_of_stream && ctx.answered {
            // The whole response came in: a success, recorded before its last bytes go out.
            ctx.record(Outcome::Ok);
        }
        Ok(None)
    }

    fn request_cache_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<()> {
        let cached = ctx.route().is_some_and(|r| r.cache.is_some());
        // A request with a body is not looked up: the body is not in the key.
        if cached && CachePolicy::applies_to(session.req_header()) && session.is_body_empty() {
            let cache = &self.cache;
            // Waiting for another request's fetch of the key: at most `cache.lock_timeout`.
            let mut wait = pingora::cache::CacheOptionOverrides::default();
            wait.wait_timeout = Some(cache.settings.lock_timeout);
            session.cache.enable(
                cache.storage,
                Some(cache.eviction),
                Some(cache.predictor),
                Some(cache.lock),
                Some(wait),
            );
            session
                .cache
                .set_max_file_size_bytes(cache.settings.max_object);
        }
        Ok(())
    }

    fn cache_key_callback(
        &self,
        session: &Session,
        ctx: &mut RequestCtx,
    ) -> Result<pingora::cache::CacheKey> {
        let Some(policy) = ctx.route().and_then(|r| r.cache.as_ref()) else {
            return Error::e_explain(ErrorType::InternalError, "caching without a cache policy");
        };
        let req = session.req_header();
        let (scheme, forwarded_host) = self.cache_scheme_and_host(ctx);
        let host = request_host(req).unwrap_or("");
        let key = policy.key(scheme, host, forwarded_host, req);
        ctx.cache_key = Some(pingora::cache::key::CacheHashKey::primary_bin(&key));
        Ok(key)
    }

    fn response_cache_filter(
        &self,
        session: &Session,
        response: &ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<pingora::cache::RespCacheable> {
        let Some(policy) = ctx.route().and_then(|r| r.cache.as_ref()) else {
            let reason = pingora::cache::NoCacheReason::NeverEnabled;
            return Ok(pingora::cache::RespCacheable::Uncacheable(reason));
        };
        let req = session.req_header();
        if req.method == http::Method::HEAD {
            // A HEAD is answered from a GET's entry; its own answer has no body to store.
            let reason = pingora::cache::NoCacheReason::Custom(cache_policy::HEAD_REASON);
            return Ok(pingora::cache::RespCacheable::Uncacheable(reason));
        }
        let authorization = req.headers.contains_key(header::AUTHORIZATION);
        let verdict = policy.cacheable(response, authorization);
        ctx.cache_stored = matches!(verdict, pingora::cache::RespCacheable::Cacheable(_));
        Ok(verdict)
    }

    /// Whether a stale entry may answer (its windows, `stale-while-revalidate` and
    /// `stale-if-error`, are checked before this): while it is refreshed in the background,
    /// or when the upstream failed or the pool has no backend to ask.
    fn should_serve_stale(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        error: Option<&Error>,
    ) -> bool {
        let Some(error) = error else {
            return true;
        };
        // No attempt could be made: the pool has no backend to ask, the time ran out
        // between attempts, or a strict pin's backend failed.
        let no_attempt = matches!(
            ctx.rejection,
            Some(
                Rejection::NoBackend
                    | Rejection::NoHealthyBackend
                    | Rejection::UpstreamTimeout
                    | Rejection::StickyBackendUnavailable
            )
        );
        let upstream = error.esource() == &ErrorSource::Upstream;
        let serve = no_attempt
            || match (ctx.decision, error.etype()) {
                // As decided in `after_failure`; a retry still planned never came about.
                (Some(next), _) => next != Next::PassOn,
                // A 5xx answer reaches here before `upstream_response_filter`: decided now, and
                // recorded against its backend, which the stale answer would skip.
                (None, ErrorType::HTTPStatus(status)) if upstream && ctx.rejection.is_none() => {
                    let next = after_failure(session, ctx, Failure::Status(*status));
                    if next == Next::ServeStale {
                        ctx.record(outcome(None, *status));
                    }
                    next == Next::ServeStale
                }
                // An exchange ended where no retry was possible (the deadline, a pooled
                // connection that could not be resent).
                (None, _) => upstream && ctx.rejection.is_none(),
            };
        if serve {
            // Answered from the cache after all: not a refusal.
            ctx.rejection = None;
        }
        serve
    }

    fn cache_vary_filter(
        &self,
        meta: &pingora::cache::CacheMeta,
        _ctx: &mut RequestCtx,
        req: &RequestHeader,
    ) -> Option<pingora::cache::key::HashBinary> {
        cache_policy::variance(meta, req)
    }

    async fn response_filter(
        &self,
        session: &mut Session,
        response: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        if self.draining.load(Ordering::Relaxed) {
            // `Connection: close`, so clients move to new connections while the listeners
            // still accept them, instead of meeting a closed keep-alive connection later.
            session.set_keepalive(None);
        }
        strip_hop_by_hop(response);
        decorate(response, &ctx.decoration(session.req_header()));
        if let Some(route) = ctx.route().filter(|r| r.cache.is_some()) {
            mark_cached(response, route, cache_status(session, ctx.cache_stored))?;
        }
        let req = session.req_header();
        let changed = !req.method.is_safe() && (200..400).contains(&response.status.as_u16());
        if changed && self.cache.storage.objects() > 0 {
            // A change went through, whichever route took it: what the cache holds of it is
            // out of date (RFC 9111 §4.4), at its URL and at those the answer names.
            let (scheme, _) = self.cache_scheme_and_host(ctx);
            let urls = cache_policy::invalidated(scheme, request_host(req), req, response);
            for url in &urls {
                self.cache.purge_url(url);
            }
        }
        if let (Some(choice), Some(pool)) = (ctx.choice, ctx.pool()) {
            if let (Some(sticky), Some(backend)) = (&pool.sticky, pool.backend(choice.id)) {
                let now = unix_now();
                let changed = ctx.pin != Some(choice.id);
                let stale = ctx.pin_expires.is_none_or(|e| sticky.needs_refresh(e, now));
                // A cookie on an error or on a response shared caches may store would pin
                // other clients, or pin to a backend that failed.
                // (Checked only when a cookie is due, which most responses of a pinned session
                // are not.)
                let pinnable = || response.status.as_u16() < 400 && !shared_cacheable(response);
                if (changed || stale) && pinnable() {
                    let value = sticky.encode(&backend.label, now);
                    let cookie = sticky.set_cookie(&value, self.tls);
                    response.append_header(header::SET_COOKIE, cookie)?;
                }
            }
        }
        Ok(())
    }

    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &Error,
        ctx: &mut RequestCtx,
    ) -> FailToProxy {
        if errors::client_gone(e) {
            ctx.cut = Some(Cut::ClientAborted);
        }
        if response_started(session) {
            // Too late for an error response: make sure the client cannot take what it got
            // for a complete response.
            ctx.cut.get_or_insert(Cut::UpstreamTruncated);
            abort_response(session);
            return FailToProxy {
                error_code: 0,
                can_reuse_downstream: false,
            };
        }
        let rejection = ctx.rejection.or_else(|| Rejection::from_error(e));
        ctx.rejection = rejection;
        if rejection == Some(Rejection::RequestTimeout) {
            self.metrics.client_timeouts.count("body");
        }
        let (error_code, answered) = match rejection {
            Some(rejection) if !response_started(session) => {
                match respond(session, ctx, rejection).await {
                    Ok(()) => (rejection.status(), true),
                    Err(_) => (0, false),
                }
            }
            Some(rejection) => (rejection.status(), false),
            None => (0, false),
        };
        FailToProxy {
            error_code,
            // What `respond` told the client decides: a connection its answer kept alive
            // (no `Connection: close`) must stay open, or the client's next request on it
            // meets a reset.
            can_reuse_downstream: answered,
        }
    }

    fn client_timed_out(&self, phase: &'static str) {
        self.metrics.client_timeouts.count(phase);
    }

    fn admit_connection(&self) -> bool {
        let max = self
            .store
            .load()
            .server
            .max_connections
            .unwrap_or(usize::MAX);
        let admitted = self.metrics.open_connections.fetch_update(
            Ordering::AcqRel,
            Ordering::Acquire,
            |open| (open < max).then_some(open + 1),
        );
        if admitted.is_err() {
            self.metrics.connections_refused.inc();
            return false;
        }
        self.metrics.client_connections.inc();
        true
    }

    fn connection_closed(&self) {
        self.metrics.open_connections.fetch_sub(1, Ordering::AcqRel);
        self.metrics.client_connections.dec();
    }

    fn idle_connections_changed(&self, delta: isize) {
        self.metrics.idle_connections.add(delta as i64);
    }

    fn upstream_deadline(&self, ctx: &RequestCtx) -> Option<Instant> {
        ctx.deadline
    }

    fn early_error_response(&self, status: u16) -> Option<(ResponseHeader, Bytes)> {
        // Before any hook ran: there is no request id yet, so one is made for the answer.
        let rejection = match status {
            405 => Rejection::MethodNotAllowed,
            408 => Rejection::RequestTimeout,
            431 => Rejection::HeadersTooLarge("the request header is too large"),
            501 => Rejection::UnsupportedTransferCoding,
            _ => Rejection::BadRequest("the request is malformed"),
        };
        let request_id = request_id::choose(None);
        let body = rejection.body(&request_id);
        let mut header = error_header(rejection, &[], &request_id, body.len()).ok()?;
        let snapshot = self.store.load();
        let decoration = Decoration {
            request_id: &request_id,
            admission: &[],
            security: &snapshot.server.security_headers,
            cors: None,
            origin: None,
            tls: self.tls,
        };
        decorate(&mut header, &decoration);
        snapshot
            .unrouted
            .count_rejection(rejection.index(), rejection.code());
        Some((header, body))
    }

    fn request_summary(&self, session: &Session, ctx: &RequestCtx) -> String {
        // Pingora's error lines then carry the id the client and the access log see.
        format!(
            "{}, request_id: {}",
            session.as_ref().request_summary(),
            ctx.request_id
        )
    }

    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut RequestCtx) {
        // The last attempt's outcome, if nothing recorded it yet: a success once the whole
        // response went through, the upstream's failure, or none (the client left, or the
        // attempt was blameless; a claimed half-open probe is then given back).
        if ctx.choice.is_some() && !ctx.recorded {
            match e {
                Some(e) => ctx.record_fault(e),
                None if ctx.answered && ctx.cut.is_none() => ctx.record(Outcome::Ok),
                None => ctx.abandon_attempt(),
            }
        }
        ctx.backend_in_flight = None;

        let written = session
            .response_written()
            .filter(|r| !r.status.is_informational())
            .map(|r| r.status.as_u16());
        let status = match (written, ctx.cut) {
            (Some(status), _) => status,
            (None, Some(Cut::ClientAborted)) => CLIENT_CLOSED_REQUEST,
            (None, _) => 0,
        };
        let elapsed = ctx.started.elapsed();
        let route_metrics = ctx.route().map_or(&ctx.snapshot.unrouted, |r| &r.metrics);
        route_metrics.observe(status, elapsed.as_secs_f64());
        if let Some(rejection) = ctx.rejection {
            route_metrics.count_rejection(rejection.index(), rejection.code());
        }
        if ctx.cut == Some(Cut::UpstreamTruncated) {
            route_metrics.truncated.inc();
        }

        if !self.access_log.enabled() {
            return;
        }
        let pool = ctx.pool();
        let backend = ctx.choice.and_then(|c| pool?.backend(c.id));
        let req = session.req_header();
        self.access_log.log(&Entry {
            time: access_log::now_rfc3339(),
            request_id: &ctx.request_id,
            client: ctx.forwarded.as_ref().map(|f| f.client_ip),
            method: req.method.as_str(),
            host: request_host(req).unwrap_or(""),
            path: req.uri.path(),
            query: req.uri.query(),
            status,
            bytes_out: session.body_bytes_sent(),
            duration_ms: elapsed.as_micros() as f64 / 1000.0,
            route: ctx.route().map(|r| r.name.as_str()),
            pool: pool.map(|p| p.name.as_str()),
            backend: backend.map(|b| b.label.as_str()),
            attempts: ctx.attempts(),
            error: ctx
                .cut
                .map(Cut::code)
                .or(ctx.rejection.map(Rejection::code)),
        });
    }
}

/// Whether a shared cache may store the response (`Cache-Control: public` or `s-maxage`).
fn shared_cacheable(response: &ResponseHeader) -> bool {
    response
        .headers
        .get_all(header::CACHE_CONTROL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|d| d.split('=').next().unwrap_or("").trim())
        .any(|d| d.eq_ignore_ascii_case("public") || d.eq_ignore_ascii_case("s-maxage"))
}

/// Removes every `x-user-id` the client sent, spelled with underscores too: many
/// frameworks read `x_user_id` as the same header (CGI's `HTTP_X_USER_ID`).
fn strip_user_id(req: &mut RequestHeader) {
    let is_user_id = |name: &http::HeaderName| {
        let name = name.as_str().as_bytes();
        name.len() == 9
            && name
                .iter()
                .map(|&b| if b == b'_' { b'-' } else { b })
                .eq(*b"x-user-id")
    };
    let spoofed: Vec<http::HeaderName> = req
        .headers
        .keys()
        .filter(|n| is_user_id(n))
        .cloned()
        .collect();
    for name in spoofed {
        req.remove_header(&name);
    }
}

/// nginx's status for a request whose client closed the connection before the answer.
const CLIENT_CLOSED_REQUEST: u16 = 499;

/// Header names set or removed on every request or response: as `HeaderName`s, a lookup
/// neither parses nor allocates the name.
pub(crate) mod names {
    use http::HeaderName;
    pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
    pub const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
    pub const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
    pub const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
    pub const X_USER_ID: HeaderName = HeaderName::from_static("x-user-id");
    pub const X_POWERED_BY: HeaderName = HeaderName::from_static("x-powered-by");
    pub const CACHE_STATUS: HeaderName = HeaderName::from_static("cache-status");
    pub const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
    pub const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
}

/// Aborts a response that has started but cannot be completed: HTTP/1 closes the
/// connection without finishing the body, HTTP/2 resets the stream.
fn abort_response(session: &mut Session) {
    session.set_keepalive(None);
    if let ServerSession::H2(h2) = session.as_downstream_mut() {
        h2.shutdown_with_reason(h2::Reason::INTERNAL_ERROR);
    }
}

/// What a request on a `coalesce_uncacheable` route does instead of, or before, going
/// upstream.
enum Collapsed {
    /// Go upstream (leading a flight, or after one that could not be shared).
    Fetch,
    /// Answer with a copy of what an identical request fetched.
    Answer(Arc<collapse::Answer>),
    /// Nothing: the client left while waiting.
    ClientGone,
}

/// How an upstream attempt failed.
#[derive(Clone, Copy)]
enum Failure {
    /// No connection; `refused` when the backend's host turned it away at once.
    Connect { refused: bool },
    /// The exchange broke (an error, a timeout) before any of its answer went out.
    Exchange,
    /// The upstream answered with this 5xx status.
    Status(u16),
}

/// What follows a failed upstream attempt.
#[derive(Clone, Copy, PartialEq)]
enum Next {
    /// Another attempt, at another backend where there is one.
    Retry,
    /// The stale entry the cache holds for the request.
    ServeStale,
    /// The failure itself: the upstream's 5xx, or the edge's error answer.
    PassOn,
}

/// The one decision after a failed attempt (a pooled connection found closed aside, which
/// `error_while_proxy` resends outside the rules).
///
/// First another attempt, while the retry policy, its budget and the deadline allow:
/// - a connection that failed carried nothing, so any request may be retried; a refused
///   one costs the backends nothing, so its retry needs no room in the budget (which is
///   there to keep retries from multiplying the load on struggling backends);
/// - a broken exchange, or a 502, 503 or 504, when the request can be sent again.
///
/// Then the stale entry, while its `stale-if-error` window is open (RFC 5861: on errors
/// and on 500, 502, 503 and 504); Pingora's cache then asks `should_serve_stale`, which
/// follows this. Else the failure goes to the client.
fn after_failure(session: &Session, ctx: &mut RequestCtx, failure: Failure) -> Next {
    if let Some(next) = ctx.decision {
        // Asked twice about one failure (Pingora's cache asks about a 5xx before
        // `upstream_response_filter` sees it): the retry is charged to the budget once.
        return next;
    }
    let retry = match failure {
        Failure::Connect { refused } => ctx.may_retry_with(!refused),
        Failure::Exchange => replayable(session) && ctx.may_retry(),
        Failure::Status(status) => {
            matches!(status, 502..=504) && replayable(session) && ctx.may_retry()
        }
    };
    let stale_serves = !matches!(failure, Failure::Status(s) if !matches!(s, 500 | 502..=504));
    let next = if retry {
        Next::Retry
    } else if stale_serves && session.cache.can_serve_stale_error() {
        Next::ServeStale
    } else {
        Next::PassOn
    };
    ctx.decision = Some(next);
    next
}

/// Whether the request can be sent again: an idempotent method whose body (if any) is still
/// held in Pingora's retry buffer.
fn replayable(session: &Session) -> bool {
    session.req_header().method.is_idempotent() && !session.as_ref().retry_buffer_truncated()
}

/// The backend a valid sticky cookie pins the request to, and when the cookie expires;
/// invalid cookies are counted and ignored.
fn sticky_pin(pool: &Pool, req: &RequestHeader) -> Option<(BackendId, u64)> {
    let sticky = pool.sticky.as_ref()?;
    let value = request::cookie(req, &sticky.cookie)?;
    match sticky.decode(value, unix_now()) {
        // A backend gone after a reload simply has no id: the balancer re-pins.
        Ok((label, expires)) => pool.find(&label).map(|id| (id, expires)),
        Err(why) => {
            match why {
                Invalid::Malformed => &pool.state.metrics.sticky_malformed,
                Invalid::BadSignature => &pool.state.metrics.sticky_bad_signature,
                Invalid::Expired => &pool.state.metrics.sticky_expired,
            }
            .inc();
            None
        }
    }
}

/// The consistent-hash key of a request, for pools that hash; borrowed where it can be.
fn hash_key<'a>(
    pool: &Pool,
    req: &'a RequestHeader,
    forwarded: Option<&Forwarded>,
) -> Option<Cow<'a, [u8]>> {
    match pool.hash_key.as_ref()? {
        HashKey::ClientIp => forwarded.map(|f| Cow::Owned(f.client_ip.to_string().into_bytes())),
        HashKey::Path => Some(Cow::Borrowed(req.uri.path().as_bytes())),
        HashKey::Header(name) => req.headers.get(name).map(|v| Cow::Borrowed(v.as_bytes())),
        HashKey::Cookie(name) => request::cookie(req, name).map(|v| Cow::Borrowed(v.as_bytes())),
    }
}

/// How the cache answered a request, for `cache-status` and the lookup counter.
struct CacheStatus {
    /// `cache-status` (RFC 9211).
    value: String,
    /// The `result` label of `kingdom_edge_cache_lookups_total`.
    result: crate::metrics::CacheResult,
}

/// Puts the cache's part in an answer of a cached route: its `cache-status`, counted, and
/// no `Surrogate-Control` (meant for the edge, which has read it when it stored the answer).
fn mark_cached(response: &mut ResponseHeader, route: &Route, status: CacheStatus) -> Result<()> {
    route.metrics.count_cache_lookup(status.result);
    response.insert_header(names::CACHE_STATUS, status.value)?;
    response.remove_header(&cache_policy::SURROGATE_CONTROL);
    Ok(())
}

/// The cache's part in the answer to `session`'s request on a cached route; `stored` says
/// whether a fetched response was found storable.
fn cache_status(session: &Session, stored: bool) -> CacheStatus {
    use crate::metrics::CacheResult;
    use pingora::cache::CachePhase;
    use std::fmt::Write;
    let cache = &session.cache;
    let collapsed = match cache.lock_duration() {
        Some(_) => "; collapsed",
        None => "",
    };
    let stored = if stored { "; stored" } else { "" };
    let mut value = String::with_capacity(48);
    value.push_str("kingdom-edge; ");
    // (Writing to a String cannot fail.)
    let result = match cache.phase() {
        CachePhase::Hit => {
            let ttl = cache
                .cache_meta()
                .fresh_until()
                .duration_since(SystemTime::now())
                .map_or(0, |left| left.as_secs());
            let _ = write!(value, "hit; ttl={ttl}{collapsed}");
            CacheResult::Hit
        }
        CachePhase::Miss => {
            let _ = write!(value, "fwd=miss{stored}{collapsed}");
            CacheResult::Miss
        }
        CachePhase::Expired => {
            let _ = write!(value, "fwd=stale{stored}{collapsed}");
            CacheResult::Stale
        }
        CachePhase::Revalidated | CachePhase::RevalidatedNoCache(_) => {
            let _ = write!(value, "fwd=stale; fwd-status=304{stored}");
            CacheResult::Revalidated
        }
        CachePhase::Stale | CachePhase::StaleUpdating => {
            value.push_str("hit; fwd=stale");
            CacheResult::Stale
        }
        // Not a GET or HEAD: never looked up.
        _ if !CachePolicy::applies_to(session.req_header()) => {
            value.push_str("fwd=method");
            CacheResult::Bypass
        }
        // Looked up and fetched, then found not storable (the cache let go of it).
        _ => {
            let _ = write!(value, "fwd=miss{collapsed}");
            CacheResult::Miss
        }
    };
    CacheStatus { value, result }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Records why the proxy answers itself and stops the pipeline with the matching status.
fn reject<T>(ctx: &mut RequestCtx, rejection: Rejection) -> Result<T> {
    ctx.rejection = Some(rejection);
    Error::e_explain(ErrorType::HTTPStatus(rejection.status()), rejection.code())
}

/// Answers the request with `refusal` and ends the pipeline.
async fn answer(
    session: &mut Session,
    ctx: &mut RequestCtx,
    refusal: impl Into<Refusal>,
) -> Result<bool> {
    let refusal = refusal.into();
    ctx.rejection = Some(refusal.rejection);
    ctx.refusal_headers = refusal.headers;
    respond(session, ctx, refusal.rejection).await?;
    Ok(true)
}

/// The response header of the JSON error for `rejection`, whose body is `length` bytes, with
/// `extra` headers. A 503 says `retry-after: 1` unless `extra` says otherwise.
fn error_header(
    rejection: Rejection,
    extra: &[(http::HeaderName, http::HeaderValue)],
    request_id: &str,
    length: usize,
) -> Result<ResponseHeader> {
    let mut header = ResponseHeader::build(rejection.status(), Some(5 + extra.len()))?;
    header.insert_header(header::CONTENT_TYPE, "application/json")?;
    header.insert_header(header::CONTENT_LENGTH, length.to_string())?;
    header.insert_header(header::CACHE_CONTROL, "no-store")?;
    header.insert_header(names::X_REQUEST_ID, request_id)?;
    for (name, value) in extra {
        header.append_header(name.clone(), value.clone())?;
    }
    if rejection.status() == 503 && !extra.iter().any(|(n, _)| n == header::RETRY_AFTER) {
        header.insert_header(header::RETRY_AFTER, "1")?;
    }
    Ok(header)
}

/// Writes a copy of another request's `answer` with this request's own decoration.
async fn write_collapsed(
    session: &mut Session,
    ctx: &RequestCtx,
    answer: &collapse::Answer,
) -> Result<()> {
    let mut header = answer.header.clone();
    strip_hop_by_hop(&mut header);
    header.remove_header(&header::TRANSFER_ENCODING);
    header.insert_header(header::CONTENT_LENGTH, answer.body.len().to_string())?;
    decorate(&mut header, &ctx.decoration(session.req_header()));
    if let Some(route) = ctx.route() {
        let status = CacheStatus {
            value: "kingdom-edge; fwd=miss; collapsed".to_string(),
            result: crate::metrics::CacheResult::Collapsed,
        };
        mark_cached(&mut header, route, status)?;
    }
    session
        .write_response_header(Box::new(header), false)
        .await?;
    session
        .write_response_body(Some(answer.body.clone()), true)
        .await
}

/// Writes the JSON error for `rejection`, with the refusal's headers.
async fn respond(session: &mut Session, ctx: &RequestCtx, rejection: Rejection) -> Result<()> {
    let body = rejection.body(&ctx.request_id);
    let mut header = error_header(rejection, &ctx.refusal_headers, &ctx.request_id, body.len())?;
    let mut decoration = ctx.decoration(session.req_header());
    if rejection == Rejection::CorsPreflightDenied {
        // A denied preflight carries no CORS header at all.
        decoration.cors = None;
    }
    decorate(&mut header, &decoration);
    // The connection stays open only when nothing of the request is left unread and the
    // request was well-formed.
    let clean = session.is_body_empty()
        && !matches!(
            rejection,
            Rejection::BadRequest(_)
                | Rejection::BodyTooLarge
                | Rejection::UriTooLong
                | Rejection::HeadersTooLarge(_)
                | Rejection::UnsupportedTransferCoding
                | Rejection::ExpectationFailed
                | Rejection::RequestTimeout
        );
    if !clean || ctx.cut.is_some() || ctx.choice.is_some() {
        session.set_keepalive(None);
    }
    session
        .write_response_header(Box::new(header), false)
        .await?;
    session.write_response_body(Some(body), true).await
}

/// How the last upstream attempt went.
fn outcome(e: Option<&Error>, status: u16) -> Outcome {
    use ErrorType::*;
    match e.map(Error::etype) {
        None if status >= 500 => Outcome::Http5xx,
        None => Outcome::Ok,
        Some(ConnectTimedout | ReadTimedout | WriteTimedout | TLSHandshakeTimedout) => {
            Outcome::Timeout
        }
        Some(ConnectRefused | ConnectNoRoute | ConnectError) => Outcome::ConnectError,
        Some(_) => Outcome::Error,
    }
}

/// `Host`, or the `:authority` of an HTTP/2 request.
fn request_host(req: &RequestHeader) -> Option<&str> {
    header_str(req, "host").or_else(|| req.uri.host())
}

fn header_str<'a>(req: &'a RequestHeader, name: &str) -> Option<&'a str> {
    req.headers.get(name).and_then(|v| v.to_str().ok())
}

/// All values of a repeatable header joined with commas, as RFC 9110 allows.
fn joined_header(req: &RequestHeader, name: &str) -> Option<String> {
    let mut values = req
        .headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok());
    let first = values.next()?;
    Some(values.fold(first.to_string(), |mut all, v| {
        all.push(',');
        all.push_str(v);
        all
    }))
}

/// Framing and path checks that protect upstreams from request smuggling and path tricks.
/// (Pingora itself resolves `Content-Length` + `Transfer-Encoding` before this runs: it drops
/// the length, frames by the encoding and closes the connection after the response.)
/// Makes the request what [`request::inspect`] found it should be: the normalized
/// origin-form target, and a `Host`.
fn apply(req: &mut RequestHeader, target: Option<String>, host: Option<String>) -> Result<()> {
    if let Some(target) = target {
        let uri = http::Uri::try_from(target).map_err(|e| {
            Error::because(ErrorType::InvalidHTTPHeader, "normalized request target", e)
        })?;
        req.set_uri(uri);
    }
    if let Some(host) = host {
        req.insert_header(header::HOST, host)?;
    }
    Ok(())
}

/// The method a CORS preflight announces (`OPTIONS` with `origin` and
/// `access-control-request-method`), if the request is one.
fn announced_method(req: &RequestHeader) -> Option<http::Method> {
    if req.method != http::Method::OPTIONS || !req.headers.contains_key(header::ORIGIN) {
        return None;
    }
    let method = req.headers.get(header::ACCESS_CONTROL_REQUEST_METHOD)?;
    http::Method::from_bytes(method.as_bytes()).ok()
}

/// The route for the request, matched on its normalized path without `;` parameters, after
/// the route's rule for escaped slashes (which may decode them and route again).
fn route_request(
    snapshot: &Snapshot,
    req: &mut RequestHeader,
) -> std::result::Result<Option<RouteId>, Rejection> {
    let find = |host: Option<&str>, path: &str, method: &http::Method| {
        let path = path::for_matching(path);
        snapshot.router.find(host, &path, method)
    };
    // A preflight goes to the route of the request it announces if that route answers
    // preflights (has `cors`), so it is judged by that route's rules; otherwise it is an
    // OPTIONS request like any other.
    let preflight = announced_method(req).and_then(|method| {
        let id = find(request_host(req), req.uri.path(), &method)?;
        snapshot.route(id).cors.is_some().then_some((id, method))
    });
    let (id, method) = match preflight {
        Some(found) => found,
        None => match find(request_host(req), req.uri.path(), &req.method) {
            Some(id) => (id, req.method.clone()),
            None => return Ok(None),
        },
    };
    if !path::has_escaped_slashes(req.uri.path()) {
        return Ok(Some(id));
    }
    let route = snapshot.route(id);
    if route.escaped_slashes == EscapedSlashes::Reject {
        return Err(Rejection::BadRequest(
            "the path contains an escaped slash or backslash (`%2F`, `%5C`)",
        ));
    }
    // Kept or decoded, the path must still be this route's once decoded (and hold no `..`):
    // an upstream that decodes them must not find another route's path.
    let merge = snapshot.server.hygiene.merge_slashes;
    let decoded = path::decode_slashes(req.uri.path(), merge).map_err(Rejection::BadRequest)?;
    let again = find(request_host(req), &decoded, &method);
    if again != Some(id) {
        return Err(Rejection::BadRequest(
            "the path routes elsewhere once its escaped slashes are decoded",
        ));
    }
    if route.escaped_slashes == EscapedSlashes::Decode {
        let target = match req.uri.query() {
            Some(query) => format!("{decoded}?{query}"),
            None => decoded,
        };
        apply(req, Some(target), None)
            .map_err(|_| Rejection::BadRequest("the decoded path is not a valid target"))?;
    }
    Ok(Some(id))
}

/// `OPTIONS *` asks what the server supports: the edge answers it.
/// Answers an allowed CORS preflight: 204 with the route's CORS headers, decorated like
/// any response; the upstream is not asked.
async fn answer_preflight(
    session: &mut Session,
    ctx: &mut RequestCtx,
    headers: Vec<(http::HeaderName, http::HeaderValue)>,
) -> Result<bool> {
    let mut header = ResponseHeader::build(204, Some(headers.len() + 6))?;
    for (name, value) in headers {
        header.append_header(name, value)?;
    }
    // The preflight's own CORS headers stand: the route's rules for an actual request do
    // not apply to it.
    let decoration = Decoration {
        cors: None,
        ..ctx.decoration(session.req_header())
    };
    decorate(&mut header, &decoration);
    if !session.is_body_empty() {
        session.set_keepalive(None);
    }
    session
        .write_response_header(Box::new(header), true)
        .await?;
    Ok(true)
}

async fn answer_options_asterisk(session: &mut Session, ctx: &RequestCtx) -> Result<bool> {
    let mut header = ResponseHeader::build(200, Some(8))?;
    header.insert_header(
        header::ALLOW,
        "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS",
    )?;
    header.insert_header(header::CONTENT_LENGTH, "0")?;
    decorate(&mut header, &ctx.decoration(session.req_header()));
    session
        .write_response_header(Box::new(header), true)
        .await?;
    Ok(true)
}

/// Answers `Expect: 100-continue` at the edge, once the request is known to be acceptable
/// (routed, within its limits, admitted by its pool), so the client sends its body without
/// waiting on an upstream; the upstream is not asked.
/// Any other expectation is refused (417).
async fn expect_continue(session: &mut Session) -> std::result::Result<(), Rejection> {
    let mut expectations = session.req_header().headers.get_all(header::EXPECT).iter();
    let Some(first) = expectations.next() else {
        return Ok(());
    };
    let understood = |v: &http::HeaderValue| v.as_bytes().eq_ignore_ascii_case(b"100-continue");
    if !understood(first) || !expectations.all(understood) {
        return Err(Rejection::ExpectationFailed);
    }
    session.req_header_mut().remove_header(&header::EXPECT);
    if session.req_header().version != http::Version::HTTP_11 || session.is_body_empty() {
        return Ok(());
    }
    let Ok(continue_) = ResponseHeader::build(100, Some(0)) else {
        return Err(Rejection::Internal);
    };
    // An interim answer does not end the exchange: the connection may stay open after the
    // final one. A client that went away is found out when its body is read.
    session.set_close_on_response_before_downstream_finish(false);
    let _ = session
        .write_response_header(Box::new(continue_), false)
        .await;
    session.set_close_on_response_before_downstream_finish(true);
    Ok(())
}

/// Whether a final response header went to the client (a `100 Continue` is not one).
fn response_started(session: &Session) -> bool {
    session
        .response_written()
        .is_some_and(|r| !r.status.is_informational())
}

/// Headers that describe the upstream connection, not the response (RFC 9110 §7.6.1):
/// `Connection` and the headers it names, and the classic hop-by-hop set. `Upgrade` stays
/// on a `101` and a `426`, which need it.
fn strip_hop_by_hop(response: &mut ResponseHeader) {
    // Names other than `close`, `keep-alive` and `upgrade` (handled below) are copied, to be
    // removed once the map is no longer borrowed; most responses name none, and allocate
    // nothing here.
    const HANDLED: [&str; 3] = ["close", "keep-alive", "upgrade"];
    let named: Vec<String> = response
        .headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|name| !name.is_empty() && !HANDLED.iter().any(|h| name.eq_ignore_ascii_case(h)))
        .map(str::to_ascii_lowercase)
        .collect();
    let upgrading = matches!(response.status.as_u16(), 101 | 426);
    for name in &named {
        response.remove_header(name.as_str());
    }
    for name in [
        names::KEEP_ALIVE,
        names::PROXY_CONNECTION,
        header::TE,
        header::TRAILER,
    ] {
        response.remove_header(&name);
    }
    if !upgrading {
        response.remove_header(&header::UPGRADE);
    }
    if response.status != 101 {
        response.remove_header(&header::CONNECTION);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(path: &str, headers: &[(&str, &str)]) -> RequestHeader {
        let mut req = RequestHeader::build("GET", path.as_bytes(), None).unwrap();
        for (name, value) in headers {
            req.append_header(name.to_string(), *value).unwrap();
        }
        req
    }

    #[test]
    fn finds_cookies_across_cookie_headers() {
        let req = request(
            "/",
            &[("cookie", "a=1"), ("cookie", "a=1; kd=abc.1.x; b=\"2\"")],
        );
        assert_eq!(request::cookie(&req, "kd"), Some("abc.1.x"));
        assert_eq!(request::cookie(&req, "b"), Some("2"));
        let req = request("/", &[("cookie", "kdx=1; b=2")]);
        assert_eq!(request::cookie(&req, "kd"), None);
    }

    #[test]
    fn outcomes() {
        assert_eq!(outcome(None, 200), Outcome::Ok);
        assert_eq!(outcome(None, 503), Outcome::Http5xx);
        let e = Error::new(ErrorType::ConnectRefused);
        assert_eq!(outcome(Some(&e), 0), Outcome::ConnectError);
        let e = Error::new(ErrorType::ReadTimedout);
        assert_eq!(outcome(Some(&e), 0), Outcome::Timeout);
    }
}
