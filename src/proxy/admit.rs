//! Admission: what a route asks of a request before the request reaches its pool, one call
//! from `request_filter`, in order: a CORS preflight is answered, then the request is
//! validated, authenticated, rate-limited and shed, and last comes how long the slow-down
//! policy holds it. Each step is a policy module's decision; this file
//! only runs them in order and turns a refusal into the answer's status and headers.

use std::net::IpAddr;
use std::time::Duration;

use http::header;
use http::{HeaderName, HeaderValue};
use pingora::http::RequestHeader;
use prometheus::IntCounter;

use crate::errors::{Refusal, Rejection};
use crate::ratelimit::gcra::Verdict;
use crate::ratelimit::{key, seconds_up};
use crate::route::Route;
use crate::security::cors::Preflight;
use crate::snapshot::Snapshot;
use crate::token::Auth;

/// `ratelimit-policy`.
pub const RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
/// `ratelimit`.
pub const RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");

/// What admission found out about an admitted request.
#[derive(Debug, Default)]
pub struct Admitted {
    /// The subject of a verified bearer token: forwarded as `x-user-id`, and the `user`
    /// rate-limit key.
    pub user: Option<String>,
    /// The RateLimit headers every response of the route carries.
    pub rate_headers: Vec<(HeaderName, HeaderValue)>,
    /// How long the slow-down policy holds the request before it goes on.
    pub delay: Duration,
}

/// The clocks admission reads: Unix seconds (token expiry) and monotonic nanoseconds
/// (`ratelimit::nanos`, for buckets and windows).
#[derive(Debug, Clone, Copy)]
pub struct Now {
    /// Unix time, seconds.
    pub unix: u64,
    /// Monotonic nanoseconds.
    pub nanos: u64,
}

/// How loaded the proxy is, for shedding.
#[derive(Clone, Copy)]
pub struct Load<'a> {
    /// Requests in progress over all listeners, this one included.
    pub in_flight: u64,
    /// `kingdom_edge_shed_total{priority}`, by [`crate::shed::Priority::index`].
    pub shed: &'a [IntCounter; 3],
}

/// What admission decided, short of a refusal.
#[derive(Debug)]
pub enum Admission {
    /// A CORS preflight the edge answers 204 with these headers.
    Preflight(Vec<(HeaderName, HeaderValue)>),
    /// On to the pool.
    Forward(Admitted),
}

/// Runs the route's admission policies on `req` from `client` at `now`; `has_body` says
/// whether a body follows the head.
pub fn admit(
    snapshot: &Snapshot,
    route: &Route,
    req: &RequestHeader,
    has_body: bool,
    client: Option<IpAddr>,
    now: Now,
    load: Load<'_>,
) -> Result<Admission, Refusal> {
    // A preflight first: it asks about the request to come, which is what the other steps
    // judge, so it never reaches them.
    match route.cors.as_ref().and_then(|cors| cors.preflight(req)) {
        Some(Preflight::Allowed(headers)) => return Ok(Admission::Preflight(headers)),
        Some(Preflight::Denied) => return Err(Rejection::CorsPreflightDenied.into()),
        None => {}
    }
    route.validation.check(req, has_body)?;
    let user = authenticate(snapshot, route, req, now.unix)?;
    let keyed = key::Request {
        client,
        header: req,
        user: user.as_deref(),
        route: &route.name,
    };
    let sheds = snapshot
        .server
        .overload
        .sheds(route.priority, load.in_flight);
    // A rate limit answers first (429), but a request about to be shed is not counted
    // against its client's budget: it was never served.
    let rate_headers = rate_limit(snapshot, route, &keyed, now.nanos, !sheds)?;
    if sheds {
        // It passed its rate limits: its answer says where they stand.
        return Err(shed(snapshot, route, load, rate_headers));
    }
    // Slowed down last: a request that waits is one that will be served.
    let delay = route.slow_down.map_or(Duration::ZERO, |id| {
        let policy = &snapshot.slow_downs[id];
        policy.hit(policy.key.key(&keyed, policy.ipv6_prefix), now.nanos)
    });
    Ok(Admission::Forward(Admitted {
        user,
        rate_headers,
        delay,
    }))
}

/// Sheds a request the slow-down held back if the proxy is overloaded now: the wait may
/// have let the load grow, and waiting requests were not counted. `rate_headers` are the
/// ones admission gave it.
pub fn shed_after_wait(
    snapshot: &Snapshot,
    route: &Route,
    load: Load<'_>,
    rate_headers: &[(HeaderName, HeaderValue)],
) -> Result<(), Refusal> {
    match snapshot
        .server
        .overload
        .sheds(route.priority, load.in_flight)
    {
        true => Err(shed(snapshot, route, load, rate_headers.to_vec())),
        false => Ok(()),
    }
}

/// The 503 of a shed request, counted, with the RateLimit headers it was admitted with.
fn shed(
    snapshot: &Snapshot,
    route: &Route,
    load: Load<'_>,
    rate_headers: Vec<(HeaderName, HeaderValue)>,
) -> Refusal {
    load.shed[route.priority.index()].inc();
    let retry_after = snapshot.server.overload.retry_after.as_secs();
    let mut refusal = Refusal::from(Rejection::Overloaded).retry_after(retry_after);
    refusal.headers.extend(rate_headers);
    refusal
}

/// Runs the route's rate limits in order: the RateLimit headers of the enforced ones, or the
/// 429 of the first that refuses (the limits after it are not counted). Without `record`,
/// nothing is counted: the verdicts are what the buckets would say.
fn rate_limit(
    snapshot: &Snapshot,
    route: &Route,
    keyed: &key::Request<'_>,
    now: u64,
    record: bool,
) -> Result<Vec<(HeaderName, HeaderValue)>, Refusal> {
    if route.rate_limits.is_empty() {
        return Ok(Vec::new());
    }
    let (mut policies, mut statuses) = (Vec::new(), Vec::new());
    for limit in &route.rate_limits {
        let policy = &snapshot.rate_limits[limit.policy];
        let key = policy.key.key(keyed, policy.ipv6_prefix);
        let outcome = match record {
            true => policy.check(key, now),
            false => policy.peek(key, now),
        };
        let over = matches!(outcome.verdict, Verdict::Deny { .. });
        if !outcome.refused {
            // A peek (a request about to be shed) is not a hit of the shadow policy either.
            if over && record {
                // Shadow mode: counted and logged, and left out of the headers.
                limit.shadowed.inc();
                if policy.log_shadow_hit(now) {
                    tracing::info!(route = %route.name, policy = %policy.name, "rate limit in shadow mode would refuse requests");
                }
            }
            if policy.mode == crate::ratelimit::Mode::Shadow {
                continue;
            }
        }
        policies.push(policy.policy_item.as_str());
        statuses.push(policy.status_item(&outcome.verdict));
        if let Verdict::Deny { retry_after, .. } = outcome.verdict {
            if outcome.refused {
                limit.limited.inc();
                let mut refusal =
                    Refusal::from(Rejection::RateLimited).retry_after(seconds_up(retry_after));
                refusal.headers.extend(headers(&policies, &statuses));
                return Err(refusal);
            }
        }
    }
    Ok(headers(&policies, &statuses))
}

/// `ratelimit-policy` and `ratelimit` (IETF httpapi draft), one list item per policy.
fn headers(policies: &[&str], statuses: &[String]) -> Vec<(HeaderName, HeaderValue)> {
    if policies.is_empty() {
        return Vec::new();
    }
    let value = |items: String| HeaderValue::from_str(&items).ok();
    let policy = value(policies.join(", "));
    let status = value(statuses.join(", "));
    match (policy, status) {
        (Some(policy), Some(status)) => vec![(RATELIMIT_POLICY, policy), (RATELIMIT, status)],
        _ => Vec::new(),
    }
}

/// The verified subject of the request's bearer token, when the route checks tokens.
fn authenticate(
    snapshot: &Snapshot,
    route: &Route,
    req: &RequestHeader,
    unix_now: u64,
) -> Result<Option<String>, Refusal> {
    let Some(auth) = route.auth else {
        return Ok(None);
    };
    // Compiling refuses `auth` without `tokens:`.
    let Some(verifier) = &snapshot.tokens else {
        return Err(Rejection::Internal.into());
    };
    if req
        .headers
        .get_all(header::AUTHORIZATION)
        .iter()
        .nth(1)
        .is_some()
    {
        // Which token would the upstream read? RFC 6750 §3.1: a repeated credential is an
        // invalid request.
        return Err(
            Refusal::from(Rejection::BadRequest("more than one authorization field")).with(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static(
                    "Bearer realm=\"kingdom-edge\", error=\"invalid_request\"",
                ),
            ),
        );
    }
    match (bearer(req), auth) {
        (None, Auth::Optional) => Ok(None),
        (None, Auth::Required) => Err(unauthorized(
            "a valid bearer token is required",
            "Bearer realm=\"kingdom-edge\"",
        )),
        (Some(token), _) => match verifier.verify(token, unix_now) {
            // The subject becomes a header: anything but visible ASCII is refused.
            Ok(claims)
                if !claims.sub.is_empty() && claims.sub.bytes().all(|b| b.is_ascii_graphic()) =>
            {
                Ok(Some(claims.sub))
            }
            _ => Err(unauthorized(
                "the bearer token is invalid or expired",
                "Bearer realm=\"kingdom-edge\", error=\"invalid_token\"",
            )),
        },
    }
}

/// The token of `Authorization: Bearer <token>`, if the request has one.
fn bearer(req: &RequestHeader) -> Option<&str> {
    let value = req.headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

fn unauthorized(message: &'static str, challenge: &'static str) -> Refusal {
    Refusal::from(Rejection::Unauthorized(message)).with(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static(challenge),
    )
}
