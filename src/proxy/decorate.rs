//! Decoration: the headers the edge puts on every response it sends, the upstream's and its
//! own alike, one call from `response_filter` and from the error answers: the request id,
//! the route's RateLimit headers, its security headers and its CORS headers. What the
//! upstream says about itself (`server`, `x-powered-by`) is removed.

use http::{header, HeaderName, HeaderValue};
use pingora::http::ResponseHeader;

use crate::security::cors::Cors;
use crate::security::SecurityHeaders;

/// What decides a response's headers.
pub struct Decoration<'a> {
    /// `x-request-id`.
    pub request_id: &'a str,
    /// The route's RateLimit headers, from admission.
    pub admission: &'a [(HeaderName, HeaderValue)],
    /// The security headers: the matched route's, or the server's for a request that
    /// matched none.
    pub security: &'a SecurityHeaders,
    /// The route's CORS rules (`None` on a preflight's answer, which has its own).
    pub cors: Option<&'a Cors>,
    /// The request's `origin`, for CORS.
    pub origin: Option<&'a HeaderValue>,
    /// Whether the client connection is TLS (`strict-transport-security`).
    pub tls: bool,
}

/// Puts the edge's headers on `response`.
pub fn decorate(response: &mut ResponseHeader, d: &Decoration<'_>) {
    response.remove_header(&header::SERVER);
    response.remove_header(&super::names::X_POWERED_BY);
    // Infallible: valid names and values.
    let _ = response.insert_header(super::names::X_REQUEST_ID, d.request_id);
    for (name, value) in d.admission {
        let _ = response.insert_header(name.clone(), value.clone());
    }
    d.security.apply(response, d.tls);
    if let Some(cors) = d.cors {
        cors.decorate(d.origin, response);
    }
}
