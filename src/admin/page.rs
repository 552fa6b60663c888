//! `GET /`: the status page. One self-contained HTML document (no external assets) that
//! reads `/status` every two seconds and shows every pool and backend, the routes, and the
//! last reload.

use axum::http::header;
use axum::response::{IntoResponse, Response};

/// The page, built into the binary.
const PAGE: &str = include_str!("page.html");

/// `GET /`.
pub async fn page() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
            // Everything it needs is inline; it talks only to this admin API.
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'",
            ),
        ],
        PAGE,
    )
        .into_response()
}
