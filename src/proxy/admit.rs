//! Admission: what a route asks of a request before the request reaches its pool, one call
//! from `request_filter`, in order: validate, authenticate, rate-limit, slow down, shed. Each
//! step is a policy module's decision; this file only runs them in order and turns a
//! refusal into the answer's status and headers.

use http::header;
use http::HeaderValue;
use pingora::http::RequestHeader;

use crate::errors::{Refusal, Rejection};
use crate::route::Route;
use crate::snapshot::Snapshot;
use crate::token::Auth;

/// What admission found out about an admitted request.
#[derive(Debug, Default)]
pub struct Admitted {
    /// The subject of a verified bearer token: forwarded as `x-user-id`, and the `user`
    /// rate-limit key.
    pub user: Option<String>,
}

/// Runs the route's admission policies on `req`, at Unix time `unix_now`.
pub fn admit(
    snapshot: &Snapshot,
    route: &Route,
    req: &RequestHeader,
    unix_now: u64,
) -> Result<Admitted, Refusal> {
    let user = authenticate(snapshot, route, req, unix_now)?;
    Ok(Admitted { user })
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
