//! The admin API's bearer token: every request that changes something (any method but `GET`
//! and `HEAD`) must carry `Authorization: Bearer <token>` when a token is configured. The
//! token is compared in constant time (as digests, so not even its length leaks), and every
//! refusal is counted.

use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use ring::digest;
use subtle::ConstantTimeEq;

use super::AdminState;

/// Lets reads through; lets a write through only with the configured token.
pub async fn require_token(
    State(state): State<AdminState>,
    request: Request,
    next: Next,
) -> Response {
    if matches!(*request.method(), Method::GET | Method::HEAD) {
        return next.run(request).await;
    }
    let snapshot = state.store.load();
    let expected = snapshot.admin.as_ref().and_then(|a| a.token.as_deref());
    let Some(expected) = expected else {
        // No token configured: the address is loopback (compile refuses anything else).
        return next.run(request).await;
    };
    let presented = request.headers().get(header::AUTHORIZATION);
    if authorized(presented, expected) {
        return next.run(request).await;
    }
    state.metrics.admin_auth_failures.inc();
    tracing::warn!(
        method = %request.method(),
        path = %request.uri().path(),
        "admin request refused: {}",
        if presented.is_some() { "wrong token" } else { "no token" }
    );
    let mut response = super::error(
        StatusCode::UNAUTHORIZED,
        "unauthorized",
        "this endpoint needs `Authorization: Bearer <token>` (the token in admin.token_env)",
    );
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Bearer realm=\"kingdom-edge admin\""),
    );
    response.into_response()
}

/// Whether `presented` is `Bearer <expected>`.
fn authorized(presented: Option<&HeaderValue>, expected: &str) -> bool {
    let Some(token) = presented
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim())
    else {
        return false;
    };
    let sum = |text: &str| digest::digest(&digest::SHA256, text.as_bytes());
    sum(token).as_ref().ct_eq(sum(expected).as_ref()).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_exact_bearer_token_passes() {
        let token = "an-admin-token-of-some-length";
        let header = |v: &str| HeaderValue::from_str(v).unwrap();
        assert!(authorized(Some(&header(&format!("Bearer {token}"))), token));
        assert!(authorized(
            Some(&header(&format!("bearer  {token}"))),
            token
        ));
        assert!(!authorized(None, token));
        assert!(!authorized(Some(&header(token)), token), "no scheme");
        assert!(!authorized(Some(&header(&format!("Basic {token}"))), token));
        assert!(!authorized(
            Some(&header("Bearer an-admin-token-of-some-lengtH")),
            token
        ));
        assert!(!authorized(Some(&header("Bearer ")), token));
        assert!(!authorized(
            Some(&header(&format!("Bearer {token}x"))),
            token
        ));
    }
}
