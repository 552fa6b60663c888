//! Request hygiene at the edge, before routing: the request-target form (RFC 9112 §3.2),
//! one normalized path, the host, header limits and framing. Pure: [`inspect`] reads the
//! request header and says what to change in it, or why it is refused.

pub mod host;
pub mod path;

use std::borrow::Cow;

use http::{header, Method, Version};
use pingora::http::RequestHeader;

use crate::config::raw::RawRequestLimits;
use crate::config::Errors;
use crate::errors::Rejection;

/// `server.*_timeout` for clients: what a slow client cannot stretch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientTimeouts {
    /// The whole request header, from its first byte.
    pub header: std::time::Duration,
    /// The longest pause in a request body.
    pub body: std::time::Duration,
    /// An idle HTTP/1 keep-alive connection, or an HTTP/2 one with no open stream.
    pub keepalive: std::time::Duration,
    /// A TLS handshake.
    pub tls_handshake: std::time::Duration,
}

impl Default for ClientTimeouts {
    /// nginx's `client_header_timeout`, `client_body_timeout` and `keepalive_timeout`.
    fn default() -> Self {
        use std::time::Duration;
        Self {
            header: Duration::from_secs(60),
            body: Duration::from_secs(60),
            keepalive: Duration::from_secs(75),
            tls_handshake: Duration::from_secs(10),
        }
    }
}

/// `server.request_limits` (and `routes[].request_limits`): how large a request head may be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeadLimits {
    /// Longest request target, in bytes (414 past it).
    pub request_line: usize,
    /// Longest single header field, name and value, in bytes (431).
    pub header: usize,
    /// All header fields together, in bytes (431).
    pub headers: usize,
    /// Most header fields (431).
    pub header_count: usize,
}

impl Default for HeadLimits {
    /// nginx's and Envoy's orders of magnitude: 8 KiB lines and fields, 32 KiB, 100 fields.
    fn default() -> Self {
        Self {
            request_line: 8 * 1024,
            header: 8 * 1024,
            headers: 32 * 1024,
            header_count: 100,
        }
    }
}

impl HeadLimits {
    /// The larger of each limit: what must pass before the route is known.
    pub fn max(self, other: Self) -> Self {
        Self {
            request_line: self.request_line.max(other.request_line),
            header: self.header.max(other.header),
            headers: self.headers.max(other.headers),
            header_count: self.header_count.max(other.header_count),
        }
    }

    /// Compiles `raw` (at YAML path `at`), each missing key taken from `base`.
    pub fn compile(
        raw: Option<&RawRequestLimits>,
        base: Self,
        at: &str,
        errors: &mut Errors,
    ) -> Self {
        let Some(raw) = raw else { return base };
        let mut size = |key: &str, value: Option<crate::config::units::Size>, base: usize| {
            let Some(value) = value else { return base };
            match usize::try_from(value.0) {
                Ok(n) if (1..=1 << 20).contains(&n) => n,
                _ => {
                    errors.push(
                        format!("{at}.{key}"),
                        format!("must be between 1B and 1MiB (got {}B)", value.0),
                    );
                    base
                }
            }
        };
        let request_line = size("request_line", raw.request_line, base.request_line);
        let header = size("header", raw.header, base.header);
        let headers = size("headers", raw.headers, base.headers);
        let header_count = match raw.header_count {
            None => base.header_count,
            Some(n) if (1..=256).contains(&n) => n,
            Some(n) => {
                errors.push(
                    format!("{at}.header_count"),
                    format!("must be between 1 and 256 (got {n})"),
                );
                base.header_count
            }
        };
        Self {
            request_line,
            header,
            headers,
            header_count,
        }
    }

    /// Checks a request head of `size` against these limits.
    pub fn check(&self, size: &HeadSize) -> Result<(), Rejection> {
        if size.target > self.request_line {
            return Err(Rejection::UriTooLong);
        }
        if size.fields > self.header_count {
            return Err(Rejection::HeadersTooLarge(
                "the request has too many header fields",
            ));
        }
        if size.largest_field > self.header {
            return Err(Rejection::HeadersTooLarge(
                "a request header field is too large",
            ));
        }
        if size.total > self.headers {
            return Err(Rejection::HeadersTooLarge(
                "the request header is too large",
            ));
        }
        Ok(())
    }
}

/// How large a request head is, as the client sent it (measured before normalization
/// changes it, so the limits hold the client to what it sent).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HeadSize {
    /// Bytes of the request target.
    pub target: usize,
    /// Header fields; the `cookie` fields count as one, as HTTP/2 clients split them.
    pub fields: usize,
    /// Bytes of the largest field (`name: value\r\n`; the cookies joined).
    pub largest_field: usize,
    /// Bytes of all fields.
    pub total: usize,
}

impl HeadSize {
    /// Measures `req`.
    pub fn of(req: &RequestHeader) -> Self {
        let mut size = HeadSize {
            target: req.raw_path().len(),
            ..HeadSize::default()
        };
        let mut cookies = 0;
        for (name, value) in &req.headers {
            // As on the wire: `name: value\r\n`.
            let bytes = name.as_str().len() + value.len() + 4;
            size.total += bytes;
            if name == header::COOKIE {
                cookies += value.len() + 2;
                continue;
            }
            size.fields += 1;
            size.largest_field = size.largest_field.max(bytes);
        }
        if cookies > 0 {
            size.fields += 1;
            size.largest_field = size.largest_field.max(cookies + "cookie: ".len());
        }
        size
    }
}

/// Server-wide hygiene settings, compiled from `server:`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hygiene {
    /// `server.merge_slashes` (default true): `//a///b` is `/a/b`.
    pub merge_slashes: bool,
    /// `server.request_limits`.
    pub limits: HeadLimits,
    /// The largest of `limits` and every route's: what must pass before routing.
    pub ceiling: HeadLimits,
}

impl Default for Hygiene {
    fn default() -> Self {
        Self {
            merge_slashes: true,
            limits: HeadLimits::default(),
            ceiling: HeadLimits::default(),
        }
    }
}

/// What [`inspect`] found: the changes to make to the request before it is routed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Inspected {
    /// The target to forward, origin-form, when it differs from the received one.
    pub target: Option<String>,
    /// A `Host` header to set: none was sent (HTTP/1.0: the listener's default host), or the
    /// host came from `:authority`.
    pub host: Option<String>,
    /// `OPTIONS *`: asks about the server, answered by the edge.
    pub asterisk: bool,
    /// A single `Content-Length` to forward in place of identical repeated ones.
    pub content_length: Option<u64>,
    /// The head as received, for the route's limits.
    pub size: HeadSize,
}

/// The value of cookie `name` in the request's `Cookie` headers (quotes removed).
pub fn cookie<'a>(req: &'a RequestHeader, name: &str) -> Option<&'a str> {
    req.headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|cookies| cookies.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(n, _)| *n == name)
        .map(|(_, v)| v.trim_matches('"'))
}

/// Checks a request head before routing: limits, framing, target form and path, host.
/// `default_host` names the listener's host for HTTP/1.0 requests that send none.
pub fn inspect(
    req: &RequestHeader,
    hygiene: &Hygiene,
    default_host: impl FnOnce() -> String,
) -> Result<Inspected, Rejection> {
    let size = HeadSize::of(req);
    hygiene.ceiling.check(&size)?;
    let mut out = Inspected {
        size,
        content_length: check_framing(req)?,
        ..Inspected::default()
    };
    let raw = req.raw_path();
    let mut authority = None;
    if raw == b"*" {
        if req.method != Method::OPTIONS {
            return Err(Rejection::BadRequest("`*` is a target only for OPTIONS"));
        }
        out.asterisk = true;
    } else if !raw.starts_with(b"/") {
        authority = Some(absolute_form_authority(raw).ok_or(Rejection::BadRequest(
            "the request target must be a path starting with `/` or an http(s) URL",
        ))?);
    }
    out.host = match authority {
        // RFC 9112 §3.2.2: the target's authority is the host (Pingora has already refused
        // a `Host` that differs).
        Some(authority) => {
            host::validate(authority).map_err(Rejection::BadRequest)?;
            Some(authority.to_string())
        }
        None => choose_host(req, default_host)?,
    };

    if !out.asterisk {
        let path = req.uri.path();
        let normalized =
            path::normalize(path, hygiene.merge_slashes).map_err(Rejection::BadRequest)?;
        let query = req.uri.query();
        if let Some(query) = query {
            path::check_query(query).map_err(Rejection::BadRequest)?;
        }
        // An absolute-form target is forwarded in origin-form, its authority in `Host`.
        if normalized.is_some() || !raw.starts_with(b"/") {
            let path = normalized.map_or(Cow::Borrowed(path), Cow::Owned);
            out.target = Some(match query {
                Some(query) => format!("{path}?{query}"),
                None => path.into_owned(),
            });
        }
    }
    Ok(out)
}

/// The authority of an absolute-form target: `http://` or `https://` (any case), then the
/// authority up to the path or query. `None` for any other form (or no authority).
fn absolute_form_authority(raw: &[u8]) -> Option<&str> {
    let text = std::str::from_utf8(raw).ok()?;
    let (scheme, rest) = text.split_once("://")?;
    if !scheme.eq_ignore_ascii_case("http") && !scheme.eq_ignore_ascii_case("https") {
        return None;
    }
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    Some(&rest[..end]).filter(|a| !a.is_empty())
}

/// The request's host, checked. HTTP/1.1 must send `Host` (or an absolute-form target,
/// which Pingora has already reconciled with it); HTTP/2 sends `:authority`, which must
/// agree with a `Host` it also sends.
fn choose_host(
    req: &RequestHeader,
    default_host: impl FnOnce() -> String,
) -> Result<Option<String>, Rejection> {
    let mut hosts = req.headers.get_all(header::HOST).iter();
    let header = hosts.next();
    if hosts.next().is_some() {
        return Err(Rejection::BadRequest("more than one Host header"));
    }
    let header = header
        .map(|v| {
            v.to_str()
                .map_err(|_| Rejection::BadRequest("the Host header is not text"))
        })
        .transpose()?;
    let authority = match req.version {
        Version::HTTP_2 | Version::HTTP_3 => req.uri.authority().map(|a| a.as_str()),
        _ => None,
    };
    let (value, to_set) = match (header, authority) {
        (Some(h), Some(a)) if !h.eq_ignore_ascii_case(a) => {
            return Err(Rejection::BadRequest("Host differs from the :authority"));
        }
        (Some(h), _) => (Cow::Borrowed(h), None),
        (None, Some(a)) => (Cow::Borrowed(a), Some(a.to_string())),
        (None, None) if req.version == Version::HTTP_10 => {
            let host = default_host();
            (Cow::Owned(host.clone()), Some(host))
        }
        (None, None) => return Err(Rejection::BadRequest("a Host header is required")),
    };
    host::validate(&value).map_err(Rejection::BadRequest)?;
    Ok(to_set)
}

/// `chunked` is the only transfer coding the edge understands, sent once. Repeated
/// `Content-Length` values must agree; when there is more than one, the length to forward
/// alone is returned.
fn check_framing(req: &RequestHeader) -> Result<Option<u64>, Rejection> {
    let mut lengths = req
        .headers
        .get_all(header::CONTENT_LENGTH)
        .iter()
        .flat_map(|v| v.to_str().unwrap_or("x").split(','))
        .map(|v| v.trim().parse::<u64>());
    let mut repeated = None;
    if let Some(first) = lengths.next() {
        let first = first.map_err(|_| Rejection::BadRequest("an invalid Content-Length"))?;
        for other in lengths {
            if other != Ok(first) {
                return Err(Rejection::BadRequest("conflicting Content-Length headers"));
            }
            repeated = Some(first);
        }
    }
    let mut codings = req.headers.get_all(header::TRANSFER_ENCODING).iter();
    if let Some(coding) = codings.next() {
        if codings.next().is_some() {
            return Err(Rejection::BadRequest(
                "more than one Transfer-Encoding header",
            ));
        }
        let chunked = coding
            .to_str()
            .is_ok_and(|c| c.trim().eq_ignore_ascii_case("chunked"));
        if !chunked {
            return Err(Rejection::UnsupportedTransferCoding);
        }
    }
    Ok(repeated)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(method: &str, target: &str, headers: &[(&str, &str)]) -> RequestHeader {
        let mut req = RequestHeader::build(method, target.as_bytes(), None).unwrap();
        for (name, value) in headers {
            req.append_header(name.to_string(), *value).unwrap();
        }
        req
    }

    fn run(req: &RequestHeader) -> Result<Inspected, Rejection> {
        inspect(req, &Hygiene::default(), || "edge.local:8080".to_string())
    }

    #[test]
    fn targets_are_normalized_and_absolute_form_becomes_origin_form() {
        let host = [("host", "a.example")];
        let cases = [
            ("/plain?q=1", None),
            ("/%6cimited/x?q=%41", Some("/limited/x?q=%41")),
            ("//limited//x", Some("/limited/x")),
            ("http://a.example/x?y", Some("/x?y")),
            ("HTTP://a.example", Some("/")),
        ];
        for (target, expected) in cases {
            let out = run(&request("GET", target, &host)).unwrap();
            assert_eq!(out.target.as_deref(), expected, "{target}");
        }
        let absolute = run(&request("GET", "https://b.example:8443/x", &[])).unwrap();
        assert_eq!(absolute.host.as_deref(), Some("b.example:8443"));
        for bad in ["http://user@b.example/x", "http:///x", "http://a b/"] {
            assert!(run(&request("GET", bad, &[])).is_err(), "{bad}");
        }
        let star = run(&request("OPTIONS", "*", &host)).unwrap();
        assert!(star.asterisk);
    }

    #[test]
    fn malformed_targets_are_refused() {
        let host = [("host", "a.example")];
        for (method, target) in [
            ("GET", "a"),
            ("GET", "?q=1"),
            ("GET", "*"),
            ("GET", "ftp://a.example/x"),
            ("GET", "/a/../b"),
            ("GET", "/a%00"),
            ("GET", "/a?q=%00"),
        ] {
            let result = run(&request(method, target, &host));
            assert!(
                matches!(result, Err(Rejection::BadRequest(_))),
                "{method} {target}: {result:?}"
            );
        }
    }

    #[test]
    fn hosts_are_required_checked_and_defaulted_for_http_1_0() {
        let bad = run(&request("GET", "/", &[("host", "a b/c")]));
        assert!(matches!(bad, Err(Rejection::BadRequest(_))));
        let missing = run(&request("GET", "/", &[]));
        assert!(matches!(missing, Err(Rejection::BadRequest(_))));
        let mut old = request("GET", "/", &[]);
        old.set_version(Version::HTTP_10);
        assert_eq!(run(&old).unwrap().host.as_deref(), Some("edge.local:8080"));
        let twice = run(&request("GET", "/", &[("host", "a"), ("host", "b")]));
        assert!(matches!(twice, Err(Rejection::BadRequest(_))));
    }

    #[test]
    fn http2_authority_is_the_host_and_must_agree_with_host() {
        let h2 = |host: Option<&str>| {
            let mut req = request("GET", "/x", &[]);
            req.set_version(Version::HTTP_2);
            req.set_uri("https://a.example/x".parse().unwrap());
            if let Some(host) = host {
                req.insert_header("host", host).unwrap();
            }
            run(&req)
        };
        assert_eq!(h2(None).unwrap().host.as_deref(), Some("a.example"));
        assert_eq!(h2(Some("A.example")).unwrap().host, None);
        assert!(matches!(
            h2(Some("b.example")),
            Err(Rejection::BadRequest(_))
        ));
    }

    #[test]
    fn only_a_single_chunked_coding_is_understood() {
        let te = |value: &str| {
            run(&request(
                "POST",
                "/",
                &[("host", "a"), ("transfer-encoding", value)],
            ))
        };
        assert!(te("chunked").is_ok());
        assert!(te("Chunked ").is_ok());
        assert_eq!(
            te("gzip, chunked"),
            Err(Rejection::UnsupportedTransferCoding)
        );
        assert_eq!(te("identity"), Err(Rejection::UnsupportedTransferCoding));
        let twice = run(&request(
            "POST",
            "/",
            &[
                ("host", "a"),
                ("transfer-encoding", "chunked"),
                ("transfer-encoding", "chunked"),
            ],
        ));
        assert!(matches!(twice, Err(Rejection::BadRequest(_))));
        let lengths = run(&request(
            "POST",
            "/",
            &[
                ("host", "a"),
                ("content-length", "1"),
                ("content-length", "2"),
            ],
        ));
        assert!(matches!(lengths, Err(Rejection::BadRequest(_))));
        let same = run(&request(
            "POST",
            "/",
            &[("host", "a"), ("content-length", "3, 3")],
        ));
        assert_eq!(same.unwrap().content_length, Some(3));
        let one = run(&request(
            "POST",
            "/",
            &[("host", "a"), ("content-length", "3")],
        ));
        assert_eq!(one.unwrap().content_length, None);
    }

    #[test]
    fn head_limits_give_414_and_431() {
        let limits = HeadLimits {
            request_line: 16,
            header: 32,
            headers: 64,
            header_count: 3,
        };
        let ok = request("GET", "/short", &[("host", "a")]);
        assert_eq!(limits.check(&HeadSize::of(&ok)), Ok(()));
        let long = request("GET", "/a-rather-long-path", &[]);
        assert_eq!(
            limits.check(&HeadSize::of(&long)),
            Err(Rejection::UriTooLong)
        );
        let big = request("GET", "/", &[("x-big", &"v".repeat(30))]);
        assert!(matches!(
            limits.check(&HeadSize::of(&big)),
            Err(Rejection::HeadersTooLarge(_))
        ));
        let many = request(
            "GET",
            "/",
            &[("a", "1"), ("b", "1"), ("c", "1"), ("d", "1")],
        );
        assert!(matches!(
            limits.check(&HeadSize::of(&many)),
            Err(Rejection::HeadersTooLarge(_))
        ));
        let total = request(
            "GET",
            "/",
            &[
                ("x-a", &"v".repeat(20)),
                ("x-b", &"v".repeat(20)),
                ("x-c", &"v".repeat(20)),
            ],
        );
        assert!(matches!(
            limits.check(&HeadSize::of(&total)),
            Err(Rejection::HeadersTooLarge(_))
        ));
        let cookies = request(
            "GET",
            "/",
            &[
                ("cookie", "a=1"),
                ("cookie", "b=2"),
                ("cookie", "c=3"),
                ("cookie", "d=4"),
            ],
        );
        assert_eq!(
            limits.check(&HeadSize::of(&cookies)),
            Ok(()),
            "cookies count as one"
        );
    }
}
