//! The request pipeline: Pingora's `ProxyHttp` hooks in the order they run. Each phase is a
//! few lines that call the module owning the policy.
//!
//! | phase                     | what happens                                             |
//! |---------------------------|----------------------------------------------------------|
//! | `new_ctx`                 | take the config snapshot, count the request in flight    |
//! | `early_request_filter`    | request id, client address, framing and path sanity      |
//! | `request_filter`          | route by host + path prefix + method, or 404; body limit |
//! | `request_body_filter`     | count body bytes against the route's `max_body` (413)    |
//! | `upstream_peer`           | pick a backend from the route's pool, set timeouts       |
//! | `upstream_request_filter` | `X-Forwarded-*`, `x-request-id`                          |
//! | `fail_to_connect`         | no retry yet: the attempt's error becomes the answer     |
//! | `response_filter`         | `x-request-id`; drop `Server`, `X-Powered-By`            |
//! | `fail_to_proxy`           | JSON error (400/404/502/504) with the request id         |
//! | `logging`                 | metrics and one access-log line                          |
//!
//! Hop-by-hop headers are stripped by Pingora's standard upstream request policy, which also
//! forwards WebSocket upgrades.

use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use bytes::Bytes;
use http::header;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::HttpPeer;
use pingora::protocols::l4::socket::SocketAddr as PeerAddr;
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use pingora::{Error, ErrorType, Result};
use prometheus::IntGauge;

use crate::access_log::{self, AccessLog, Entry};
use crate::balance::BackendId;
use crate::errors::Rejection;
use crate::forwarded::{self, Forwarded, Incoming};
use crate::metrics::{Metrics, Outcome};
use crate::request_id;
use crate::route::Route;
use crate::snapshot::{ConfigStore, Snapshot};

/// The proxy for one listener.
pub struct EdgeProxy {
    store: Arc<ConfigStore>,
    metrics: Arc<Metrics>,
    access_log: Arc<AccessLog>,
    /// Whether this listener terminates TLS (for `X-Forwarded-Proto`).
    tls: bool,
}

impl EdgeProxy {
    /// A proxy reading its config from `store`.
    pub fn new(
        store: Arc<ConfigStore>,
        metrics: Arc<Metrics>,
        access_log: Arc<AccessLog>,
        tls: bool,
    ) -> Self {
        Self {
            store,
            metrics,
            access_log,
            tls,
        }
    }
}

/// Per-request state, alive from the request header to the log line.
pub struct RequestCtx {
    snapshot: Arc<Snapshot>,
    started: Instant,
    request_id: String,
    forwarded: Option<Forwarded>,
    route: Option<Arc<Route>>,
    backend: Option<BackendId>,
    attempts: u32,
    body_bytes: u64,
    rejection: Option<Rejection>,
    _in_flight: InFlight,
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
            backend: None,
            attempts: 0,
            body_bytes: 0,
            rejection: None,
            _in_flight: InFlight::new(&self.metrics.in_flight),
        }
    }

    async fn early_request_filter(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        let req = session.req_header();
        ctx.request_id = request_id::choose(req.headers.get("x-request-id").map(|v| v.as_bytes()));
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
            ctx.forwarded = Some(forwarded::resolve(&incoming, &ctx.snapshot.server));
        }
        if let Err(reason) = check_request(session.req_header()) {
            return reject(ctx, Rejection::BadRequest(reason));
        }
        Ok(())
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        let req = session.req_header();
        let route = ctx
            .snapshot
            .router
            .find(request_host(req), req.uri.path(), &req.method)
            .cloned();
        let Some(route) = route else {
            return answer(session, ctx, Rejection::NoRoute).await;
        };
        let declared = session
            .req_header()
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        let too_large = matches!((route.max_body, declared), (Some(max), Some(len)) if len > max);
        ctx.route = Some(route);
        if too_large {
            return answer(session, ctx, Rejection::BodyTooLarge).await;
        }
        Ok(false)
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
        match ctx.route.as_ref().and_then(|r| r.max_body) {
            Some(max) if ctx.body_bytes > max => reject(ctx, Rejection::BodyTooLarge),
            _ => Ok(()),
        }
    }

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<Box<HttpPeer>> {
        let Some(pool) = ctx.route.as_ref().map(|r| &r.pool) else {
            return reject(ctx, Rejection::Internal);
        };
        let Some((id, backend)) = pool.select().and_then(|id| Some((id, pool.backend(id)?))) else {
            return reject(ctx, Rejection::NoBackend);
        };
        ctx.backend = Some(id);
        ctx.attempts += 1;
        let mut peer = HttpPeer::new(backend.address, false, String::new());
        let t = pool.timeouts;
        peer.options.connection_timeout = Some(t.connect);
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
            upstream.insert_header("x-forwarded-for", &f.for_chain)?;
            upstream.insert_header("x-forwarded-proto", &f.proto)?;
            match &f.host {
                Some(host) => upstream.insert_header("x-forwarded-host", host)?,
                None => {
                    upstream.remove_header("x-forwarded-host");
                }
            }
        }
        upstream.insert_header("x-request-id", &ctx.request_id)?;
        Ok(())
    }

    fn fail_to_connect(
        &self,
        _session: &mut Session,
        _peer: &HttpPeer,
        _ctx: &mut RequestCtx,
        mut e: Box<Error>,
    ) -> Box<Error> {
        // Retries with a budget are a pool policy of their own; until a pool asks for them,
        // a failed connect is the answer.
        e.set_retry(false);
        e
    }

    async fn response_filter(
        &self,
        _session: &mut Session,
        response: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        response.remove_header(&header::SERVER);
        response.remove_header("x-powered-by");
        response.insert_header("x-request-id", &ctx.request_id)?;
        Ok(())
    }

    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &Error,
        ctx: &mut RequestCtx,
    ) -> FailToProxy {
        let rejection = ctx.rejection.or_else(|| Rejection::from_error(e));
        ctx.rejection = rejection;
        let error_code = match rejection {
            Some(rejection) if session.response_written().is_none() => {
                match respond(session, ctx, rejection).await {
                    Ok(()) => rejection.status(),
                    Err(_) => 0,
                }
            }
            Some(rejection) => rejection.status(),
            None => 0,
        };
        FailToProxy {
            error_code,
            can_reuse_downstream: false,
        }
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
        let status = session.response_written().map_or(0, |r| r.status.as_u16());
        let elapsed = ctx.started.elapsed();
        let route_metrics = ctx
            .route
            .as_ref()
            .map_or(&ctx.snapshot.unrouted, |r| &r.metrics);
        route_metrics.observe(status, elapsed.as_secs_f64());

        let pool = ctx.route.as_ref().map(|r| &r.pool);
        let backend = ctx.backend.and_then(|id| pool?.backend(id));
        if let Some(backend) = backend {
            backend.metrics.record(outcome(e, status));
        }

        if !self.access_log.enabled() {
            return;
        }
        let req = session.req_header();
        self.access_log.log(&Entry {
            time: access_log::now_rfc3339(),
            request_id: &ctx.request_id,
            client: ctx.forwarded.as_ref().map(|f| f.client_ip),
            method: req.method.as_str(),
            host: request_host(req).unwrap_or(""),
            path: req.uri.path(),
            status,
            bytes_out: session.body_bytes_sent(),
            duration_ms: elapsed.as_micros() as f64 / 1000.0,
            route: ctx.route.as_ref().map(|r| r.name.as_str()),
            pool: pool.map(|p| p.name.as_str()),
            backend: backend.map(|b| b.label.as_str()),
            attempts: ctx.attempts,
            error: ctx.rejection.map(Rejection::code),
        });
    }
}

/// Records why the proxy answers itself and stops the pipeline with the matching status.
fn reject<T>(ctx: &mut RequestCtx, rejection: Rejection) -> Result<T> {
    ctx.rejection = Some(rejection);
    Error::e_explain(ErrorType::HTTPStatus(rejection.status()), rejection.code())
}

/// Answers the request with `rejection` and ends the pipeline.
async fn answer(session: &mut Session, ctx: &mut RequestCtx, rejection: Rejection) -> Result<bool> {
    ctx.rejection = Some(rejection);
    respond(session, ctx, rejection).await?;
    Ok(true)
}

/// Writes the JSON error for `rejection`.
async fn respond(session: &mut Session, ctx: &RequestCtx, rejection: Rejection) -> Result<()> {
    let body = rejection.body(&ctx.request_id);
    let mut header = ResponseHeader::build(rejection.status(), Some(4))?;
    header.insert_header(header::CONTENT_TYPE, "application/json")?;
    header.insert_header(header::CONTENT_LENGTH, body.len().to_string())?;
    header.insert_header(header::CACHE_CONTROL, "no-store")?;
    header.insert_header("x-request-id", &ctx.request_id)?;
    session.set_keepalive(None);
    session
        .write_response_header(Box::new(header), false)
        .await?;
    session.write_response_body(Some(body), true).await
}

/// How the last upstream attempt went.
fn outcome(e: Option<&Error>, status: u16) -> Outcome {
    match e.map(|e| (e.etype(), e.esource())) {
        None if status >= 500 => Outcome::Http5xx,
        None => Outcome::Ok,
        Some((
            ErrorType::ConnectTimedout | ErrorType::ReadTimedout | ErrorType::WriteTimedout,
            _,
        )) => Outcome::Timeout,
        Some((
            ErrorType::ConnectRefused | ErrorType::ConnectNoRoute | ErrorType::ConnectError,
            _,
        )) => Outcome::ConnectError,
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
fn check_request(req: &RequestHeader) -> std::result::Result<(), &'static str> {
    let lengths = req.headers.get_all(header::CONTENT_LENGTH);
    let mut iter = lengths.iter();
    if let Some(first) = iter.next() {
        if iter.any(|other| other != first) {
            return Err("conflicting Content-Length headers");
        }
    }
    let path = req.uri.path();
    if !path.starts_with('/') {
        return Err("the request target must be an absolute path");
    }
    if path.contains(['.', '%']) && path.split('/').any(is_dot_segment) {
        return Err("the path contains `.` or `..` segments");
    }
    Ok(())
}

/// `.` or `..`, with any of the dots written as `%2e`/`%2E`.
fn is_dot_segment(segment: &str) -> bool {
    let mut rest = segment.as_bytes();
    let mut dots = 0;
    while !rest.is_empty() {
        rest = match rest {
            [b'.', tail @ ..] => tail,
            [b'%', b'2', e, tail @ ..] if e.eq_ignore_ascii_case(&b'e') => tail,
            _ => return false,
        };
        dots += 1;
    }
    dots == 1 || dots == 2
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
    fn request_checks() {
        type Case<'a> = (&'a str, &'a [(&'a str, &'a str)], bool);
        let cases: &[Case] = &[
            ("/v1/echo", &[], true),
            (
                "/v1/echo",
                &[("content-length", "3"), ("content-length", "3")],
                true,
            ),
            (
                "/v1/echo",
                &[("content-length", "3"), ("content-length", "4")],
                false,
            ),
            ("/v1/../admin", &[], false),
            ("/v1/%2E%2e/admin", &[], false),
            ("/v1/./x", &[], false),
            ("/v1/..x", &[], true),
            ("/v1/.%2e", &[], false),
            ("/v1/...", &[], true),
            ("/v1/%2", &[], true),
            ("/v1/file.txt", &[], true),
        ];
        for (path, headers, ok) in cases {
            assert_eq!(
                check_request(&request(path, headers)).is_ok(),
                *ok,
                "{path} {headers:?}"
            );
        }
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
