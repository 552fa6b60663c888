//! Why the proxy answered a request itself, and how that becomes a status and a JSON body.
//! The body carries the request id and never internal details. A [`Refusal`] is a rejection
//! with the headers of its own answer (`retry-after`, `allow`, `www-authenticate`, the
//! RateLimit fields).

use bytes::Bytes;
use http::{HeaderName, HeaderValue};
use pingora::{Error, ErrorSource, ErrorType};

/// A request the proxy answers on its own instead of forwarding (or after forwarding failed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    /// Malformed or unsafe request framing, path or headers.
    #[error("{0}")]
    BadRequest(&'static str),
    /// The request target is longer than the limits allow.
    #[error("the request target is too long")]
    UriTooLong,
    /// A header field, or the whole header, is over the limits.
    #[error("{0}")]
    HeadersTooLarge(&'static str),
    /// A transfer coding other than `chunked`.
    #[error("only the chunked transfer coding is supported")]
    UnsupportedTransferCoding,
    /// The client took too long to send its request header or body.
    #[error("the request took too long to arrive")]
    RequestTimeout,
    /// An `Expect` other than `100-continue`.
    #[error("only `Expect: 100-continue` is supported")]
    ExpectationFailed,
    /// No route matches host, path and method.
    #[error("no route matches this request")]
    NoRoute,
    /// A method the proxy refuses outright (`CONNECT`), or one the route does not accept
    /// (answered with `allow`).
    #[error("this method is not allowed")]
    MethodNotAllowed,
    /// The route needs a valid bearer token, and the request has none or a bad one.
    #[error("{0}")]
    Unauthorized(&'static str),
    /// A CORS preflight from an origin (or for a method or headers) the route does not
    /// allow.
    #[error("this cross-origin request is not allowed")]
    CorsPreflightDenied,
    /// The request body's media type is not one the route accepts.
    #[error("this content type is not accepted here")]
    UnsupportedMediaType,
    /// A rate limit of the route is exhausted for this client.
    #[error("too many requests, retry later")]
    RateLimited,
    /// The proxy is overloaded and sheds requests of this priority.
    #[error("the service is overloaded, retry shortly")]
    Overloaded,
    /// The body is larger than the route's `max_body`.
    #[error("the request body is larger than this route accepts")]
    BodyTooLarge,
    /// The pool has no backend that can take the request.
    #[error("no upstream backend is available")]
    NoBackend,
    /// The pool already has `limits.max_in_flight` requests in progress.
    #[error("the service is at capacity, retry shortly")]
    PoolSaturated,
    /// Every backend is unhealthy or ejected and the pool fails closed.
    #[error("no healthy upstream backend, retry shortly")]
    NoHealthyBackend,
    /// The pinned backend is unusable and stickiness is strict.
    #[error("the session's backend is unavailable")]
    StickyBackendUnavailable,
    /// The upstream could not be reached or broke the exchange.
    #[error("the upstream failed to answer")]
    UpstreamFailed,
    /// Connecting to or reading from the upstream took too long.
    #[error("the upstream timed out")]
    UpstreamTimeout,
    /// A bug or resource problem inside the proxy.
    #[error("internal proxy error")]
    Internal,
}

impl Rejection {
    /// The HTTP status sent to the client.
    pub fn status(self) -> u16 {
        match self {
            Rejection::BadRequest(_) => 400,
            Rejection::Unauthorized(_) => 401,
            Rejection::CorsPreflightDenied => 403,
            Rejection::NoRoute => 404,
            Rejection::MethodNotAllowed => 405,
            Rejection::UnsupportedMediaType => 415,
            Rejection::RateLimited => 429,
            Rejection::BodyTooLarge => 413,
            Rejection::RequestTimeout => 408,
            Rejection::UriTooLong => 414,
            Rejection::ExpectationFailed => 417,
            Rejection::HeadersTooLarge(_) => 431,
            Rejection::UnsupportedTransferCoding => 501,
            Rejection::NoBackend | Rejection::UpstreamFailed => 502,
            Rejection::PoolSaturated
            | Rejection::NoHealthyBackend
            | Rejection::StickyBackendUnavailable
            | Rejection::Overloaded => 503,
            Rejection::UpstreamTimeout => 504,
            Rejection::Internal => 500,
        }
    }

    /// A stable machine-readable code for the body and the access log.
    pub fn code(self) -> &'static str {
        match self {
            Rejection::BadRequest(_) => "bad_request",
            Rejection::Unauthorized(_) => "unauthorized",
            Rejection::CorsPreflightDenied => "cors_preflight_denied",
            Rejection::NoRoute => "no_route",
            Rejection::MethodNotAllowed => "method_not_allowed",
            Rejection::UnsupportedMediaType => "unsupported_media_type",
            Rejection::RateLimited => "rate_limited",
            Rejection::Overloaded => "overloaded",
            Rejection::BodyTooLarge => "body_too_large",
            Rejection::RequestTimeout => "request_timeout",
            Rejection::UriTooLong => "uri_too_long",
            Rejection::HeadersTooLarge(_) => "headers_too_large",
            Rejection::UnsupportedTransferCoding => "unsupported_transfer_coding",
            Rejection::ExpectationFailed => "expectation_failed",
            Rejection::NoBackend => "no_backend",
            Rejection::PoolSaturated => "pool_saturated",
            Rejection::NoHealthyBackend => "no_healthy_backend",
            Rejection::StickyBackendUnavailable => "sticky_backend_unavailable",
            Rejection::UpstreamFailed => "upstream_error",
            Rejection::UpstreamTimeout => "upstream_timeout",
            Rejection::Internal => "internal_error",
        }
    }

    /// A dense index, for per-reason counters ([`Self::COUNT`] of them).
    pub fn index(self) -> usize {
        match self {
            Rejection::BadRequest(_) => 0,
            Rejection::UriTooLong => 1,
            Rejection::HeadersTooLarge(_) => 2,
            Rejection::UnsupportedTransferCoding => 3,
            Rejection::RequestTimeout => 4,
            Rejection::ExpectationFailed => 5,
            Rejection::NoRoute => 6,
            Rejection::MethodNotAllowed => 7,
            Rejection::Unauthorized(_) => 8,
            Rejection::CorsPreflightDenied => 9,
            Rejection::UnsupportedMediaType => 10,
            Rejection::RateLimited => 11,
            Rejection::Overloaded => 12,
            Rejection::BodyTooLarge => 13,
            Rejection::NoBackend => 14,
            Rejection::PoolSaturated => 15,
            Rejection::NoHealthyBackend => 16,
            Rejection::StickyBackendUnavailable => 17,
            Rejection::UpstreamFailed => 18,
            Rejection::UpstreamTimeout => 19,
            Rejection::Internal => 20,
        }
    }

    /// How many [`Self::index`] values there are.
    pub const COUNT: usize = 21;
}

// Every reason has its counter slot.
const _: () = assert!(Rejection::COUNT <= crate::metrics::REASONS);

impl Rejection {
    /// `{"error":"no_route","message":"…","request_id":"…"}`.
    pub fn body(self, request_id: &str) -> Bytes {
        let body = serde_json::json!({
            "error": self.code(),
            "message": self.to_string(),
            "request_id": request_id,
        });
        Bytes::from(body.to_string())
    }

    /// Classifies a Pingora error. `None` means the client connection is gone and nothing can
    /// be sent.
    pub fn from_error(e: &Error) -> Option<Rejection> {
        use ErrorType::*;
        match e.etype() {
            ConnectTimedout | ReadTimedout | WriteTimedout | TLSHandshakeTimedout
                if e.esource() == &ErrorSource::Upstream =>
            {
                Some(Rejection::UpstreamTimeout)
            }
            ReadTimedout if e.esource() == &ErrorSource::Downstream => {
                Some(Rejection::RequestTimeout)
            }
            HTTPStatus(504) => Some(Rejection::UpstreamTimeout),
            HTTPStatus(502) => Some(Rejection::UpstreamFailed),
            HTTPStatus(404) => Some(Rejection::NoRoute),
            HTTPStatus(413) => Some(Rejection::BodyTooLarge),
            HTTPStatus(code) if (400..500).contains(code) => {
                Some(Rejection::BadRequest("the request is malformed"))
            }
            _ if client_gone(e) => None,
            _ => match e.esource() {
                ErrorSource::Upstream => Some(Rejection::UpstreamFailed),
                ErrorSource::Downstream => Some(Rejection::BadRequest("the request is malformed")),
                ErrorSource::Internal | ErrorSource::Unset => Some(Rejection::Internal),
            },
        }
    }
}

/// Whether `e` means the client's connection or stream is gone (closed, reset, or failing
/// reads and writes): nothing can be sent to it, and the upstream is not to blame.
pub fn client_gone(e: &Error) -> bool {
    use ErrorType::*;
    e.esource() == &ErrorSource::Downstream
        && matches!(
            e.etype(),
            WriteError | ReadError | ConnectionClosed | H2Error | WriteTimedout
        )
}

/// A rejection and the headers of its answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// Why.
    pub rejection: Rejection,
    /// Sent with the JSON error, besides the usual ones.
    pub headers: Vec<(HeaderName, HeaderValue)>,
}

impl Refusal {
    /// Adds a header to the answer.
    pub fn with(mut self, name: HeaderName, value: HeaderValue) -> Self {
        self.headers.push((name, value));
        self
    }

    /// Adds `retry-after: <seconds>` (at least 1).
    pub fn retry_after(self, seconds: u64) -> Self {
        self.with(http::header::RETRY_AFTER, HeaderValue::from(seconds.max(1)))
    }
}

impl From<Rejection> for Refusal {
    fn from(rejection: Rejection) -> Self {
        Self {
            rejection,
            headers: Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_pingora_errors() {
        let upstream = |t| {
            let mut e = Error::new(t);
            e.as_up();
            e
        };
        let downstream = |t| {
            let mut e = Error::new(t);
            e.as_down();
            e
        };
        let cases = [
            (upstream(ErrorType::ConnectTimedout), Some(504)),
            (upstream(ErrorType::ReadTimedout), Some(504)),
            (upstream(ErrorType::ConnectRefused), Some(502)),
            (upstream(ErrorType::ConnectionClosed), Some(502)),
            (downstream(ErrorType::ConnectionClosed), None),
            (downstream(ErrorType::InvalidHTTPHeader), Some(400)),
            (downstream(ErrorType::ReadTimedout), Some(408)),
            (Error::new(ErrorType::InternalError), Some(500)),
        ];
        for (e, want) in cases {
            assert_eq!(
                Rejection::from_error(&e).map(Rejection::status),
                want,
                "{e}"
            );
        }
    }

    #[test]
    fn body_names_code_and_request_id() {
        let body = Rejection::NoRoute.body("abc");
        let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(json["error"], "no_route");
        assert_eq!(json["request_id"], "abc");
    }

    #[test]
    fn every_reason_has_its_own_index_and_code() {
        let all = [
            Rejection::BadRequest("x"),
            Rejection::UriTooLong,
            Rejection::HeadersTooLarge("x"),
            Rejection::UnsupportedTransferCoding,
            Rejection::RequestTimeout,
            Rejection::ExpectationFailed,
            Rejection::NoRoute,
            Rejection::MethodNotAllowed,
            Rejection::Unauthorized("x"),
            Rejection::CorsPreflightDenied,
            Rejection::UnsupportedMediaType,
            Rejection::RateLimited,
            Rejection::Overloaded,
            Rejection::BodyTooLarge,
            Rejection::NoBackend,
            Rejection::PoolSaturated,
            Rejection::NoHealthyBackend,
            Rejection::StickyBackendUnavailable,
            Rejection::UpstreamFailed,
            Rejection::UpstreamTimeout,
            Rejection::Internal,
        ];
        assert_eq!(all.len(), Rejection::COUNT);
        let mut indexes: Vec<usize> = all.iter().map(|r| r.index()).collect();
        indexes.sort();
        assert_eq!(indexes, (0..Rejection::COUNT).collect::<Vec<_>>());
        let mut codes: Vec<&str> = all.iter().map(|r| r.code()).collect();
        codes.sort();
        codes.dedup();
        assert_eq!(codes.len(), Rejection::COUNT);
    }
}
