//! What a route accepts (`routes[].methods`, `routes[].max_body`, `routes[].content_types`):
//! another method gets 405 with `allow`, a declared body over `max_body` 413, a request body
//! of another media type 415 (and one with several `content-type` fields 400). A route that
//! accepts GET accepts HEAD, which is GET without the body (RFC 9110 §9.3.2). (The edge's framing, head limits and timeouts are request
//! hygiene's, in `request`; a chunked body over `max_body` is counted as it arrives.)

use http::{header, HeaderValue, Method};
use pingora::http::RequestHeader;

use crate::config::units::Size;
use crate::config::Errors;
use crate::errors::{Refusal, Rejection};

/// A route's validation rules, compiled.
#[derive(Debug, Clone, Default)]
pub struct Validation {
    /// Methods accepted; empty accepts any.
    methods: Vec<Method>,
    /// `allow` of a 405.
    allow: Option<HeaderValue>,
    /// Largest request body in bytes; `None` is no limit.
    pub max_body: Option<u64>,
    /// Media ranges a request body may have (`type/subtype`, `type/*`); empty accepts any.
    content_types: Vec<String>,
}

impl Validation {
    /// The rules from method names, a body size limit and media ranges (lower case).
    pub fn new(methods: Vec<Method>, max_body: Option<u64>, content_types: Vec<String>) -> Self {
        let listed: Vec<&str> = methods.iter().map(Method::as_str).collect();
        let allow = HeaderValue::from_str(&listed.join(", ")).ok();
        Self {
            allow: allow.filter(|_| !methods.is_empty()),
            methods,
            max_body,
            content_types,
        }
    }

    /// Compiles a route's `methods`, `max_body` and `content_types` (the route at YAML
    /// path `at`).
    pub fn compile(
        methods: Option<&[String]>,
        max_body: Option<Size>,
        content_types: Option<&[String]>,
        at: &str,
        errors: &mut Errors,
    ) -> Self {
        if methods.is_some_and(<[String]>::is_empty) {
            errors.push(format!("{at}.methods"), "must list at least one method");
        }
        let methods = accepted_methods(methods, &format!("{at}.methods"), errors);
        let max_body = max_body.map(|size| size.0);
        if max_body == Some(0) {
            errors.push(format!("{at}.max_body"), "must be > 0 (got 0B)");
        }
        let mut ranges = Vec::new();
        for (i, range) in content_types.into_iter().flatten().enumerate() {
            let range = range.trim().to_ascii_lowercase();
            if is_media_range(&range) {
                ranges.push(range);
            } else {
                errors.push(
                    format!("{at}.content_types[{i}]"),
                    format!("`{range}` is not a media type (`type/subtype`, `type/*` or `*/*`)"),
                );
            }
        }
        if content_types.is_some_and(<[String]>::is_empty) {
            errors.push(
                format!("{at}.content_types"),
                "must list at least one media type",
            );
        }
        Self::new(methods, max_body, ranges)
    }

    /// Checks `req` against the rules; `has_body` says whether a body follows its head (an
    /// HTTP/2 request may send one without `content-length`).
    pub fn check(&self, req: &RequestHeader, has_body: bool) -> Result<(), Refusal> {
        if !self.methods.is_empty() && !self.methods.contains(&req.method) {
            let refusal = Refusal::from(Rejection::MethodNotAllowed);
            return Err(match &self.allow {
                Some(allow) => refusal.with(header::ALLOW, allow.clone()),
                None => refusal,
            });
        }
        if let (Some(max), Some(length)) = (self.max_body, declared_length(req)) {
            if length > max {
                return Err(Rejection::BodyTooLarge.into());
            }
        }
        if !self.content_types.is_empty() && has_body {
            let mut fields = req.headers.get_all(header::CONTENT_TYPE).iter();
            let (first, more) = (fields.next(), fields.next().is_some());
            if more {
                // Which one would the upstream read? Not a question to leave to it.
                return Err(Rejection::BadRequest("more than one content-type field").into());
            }
            let media_type = first.and_then(|v| v.to_str().ok()).map(|v| {
                v.split(';')
                    .next()
                    .unwrap_or("")
                    .trim()
                    .to_ascii_lowercase()
            });
            let accepted =
                media_type.is_some_and(|t| self.content_types.iter().any(|r| covers(r, &t)));
            if !accepted {
                return Err(Rejection::UnsupportedMediaType.into());
            }
        }
        Ok(())
    }
}

/// Parses a list of method names (upper case, as HTTP spells them) at YAML path `at`.
pub fn parse_methods(names: Option<&[String]>, at: &str, errors: &mut Errors) -> Vec<Method> {
    let mut methods = Vec::new();
    for (i, name) in names.into_iter().flatten().enumerate() {
        match Method::from_bytes(name.as_bytes()) {
            Ok(m) if name.bytes().all(|b| b.is_ascii_uppercase()) => methods.push(m),
            _ => errors.push(
                format!("{at}[{i}]"),
                format!("`{name}` is not an upper-case HTTP method"),
            ),
        }
    }
    methods
}

/// The methods a route accepts, from their names at YAML path `at`: GET brings HEAD along.
pub fn accepted_methods(names: Option<&[String]>, at: &str, errors: &mut Errors) -> Vec<Method> {
    let mut methods = parse_methods(names, at, errors);
    if let Some(get) = methods.iter().position(|m| m == Method::GET) {
        if !methods.contains(&Method::HEAD) {
            methods.insert(get + 1, Method::HEAD);
        }
    }
    methods
}

/// The request's `content-length`, when it has a valid one.
fn declared_length(req: &RequestHeader) -> Option<u64> {
    let value = req.headers.get(header::CONTENT_LENGTH)?.to_str().ok()?;
    value.trim().parse().ok()
}

/// Whether media range `range` (`type/subtype`, `type/*`, `*/*`) covers `media_type`.
fn covers(range: &str, media_type: &str) -> bool {
    match range.strip_suffix("/*") {
        Some("*") => true,
        Some(kind) => media_type.split_once('/').is_some_and(|(t, _)| t == kind),
        None => range == media_type,
    }
}

/// Whether `text` is a media range this module understands.
pub fn is_media_range(text: &str) -> bool {
    let token = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$&-^_.+".contains(&b))
    };
    match text.split_once('/') {
        Some(("*", "*")) => true,
        Some((kind, "*")) => token(kind),
        Some((kind, sub)) => token(kind) && token(sub),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(method: &str, headers: &[(&str, &str)]) -> RequestHeader {
        let mut req = RequestHeader::build(method, b"/", None).unwrap();
        for (name, value) in headers {
            req.append_header(name.to_string(), *value).unwrap();
        }
        req
    }

    /// Checks a request whose body is announced as HTTP/1.1 does (a non-zero length, or a
    /// transfer coding).
    fn check(rules: &Validation, req: &RequestHeader) -> Result<(), Refusal> {
        let length = declared_length(req).unwrap_or(0);
        let has_body = length > 0 || req.headers.contains_key(header::TRANSFER_ENCODING);
        rules.check(req, has_body)
    }

    #[test]
    fn other_methods_get_405_with_allow_and_other_bodies_415() {
        let rules = Validation::new(
            vec![Method::GET, Method::POST],
            Some(1024),
            vec!["application/json".into(), "text/*".into()],
        );
        assert!(check(&rules, &request("GET", &[])).is_ok());
        let refused = check(&rules, &request("DELETE", &[])).unwrap_err();
        assert_eq!(refused.rejection, Rejection::MethodNotAllowed);
        assert_eq!(refused.headers[0].1, "GET, POST");
        let json = [
            ("content-type", "Application/JSON; charset=utf-8"),
            ("content-length", "2"),
        ];
        assert!(check(&rules, &request("POST", &json)).is_ok());
        let text = [
            ("content-type", "text/plain"),
            ("transfer-encoding", "chunked"),
        ];
        assert!(check(&rules, &request("POST", &text)).is_ok());
        for headers in [
            &[("content-type", "application/xml"), ("content-length", "5")][..],
            &[("content-length", "5")][..],
        ] {
            let refused = check(&rules, &request("POST", headers)).unwrap_err();
            assert_eq!(
                refused.rejection,
                Rejection::UnsupportedMediaType,
                "{headers:?}"
            );
        }
        // No body, no media type to check.
        assert!(check(&rules, &request("POST", &[("content-length", "0")])).is_ok());
        assert!(check(&Validation::default(), &request("PATCH", &[])).is_ok());
        // Method first, then size, then media type.
        let big = [
            ("content-type", "application/xml"),
            ("content-length", "1025"),
        ];
        let refused = check(&rules, &request("PUT", &big)).unwrap_err();
        assert_eq!(refused.rejection, Rejection::MethodNotAllowed);
        let refused = check(&rules, &request("POST", &big)).unwrap_err();
        assert_eq!(refused.rejection, Rejection::BodyTooLarge);
    }

    #[test]
    fn head_goes_with_get_and_a_body_is_checked_however_it_is_framed() {
        let mut errors = Errors::default();
        let names = ["GET".to_string(), "POST".to_string()];
        let types = ["application/json".to_string()];
        let rules = Validation::compile(Some(&names), None, Some(&types), "r", &mut errors);
        assert!(errors.is_empty());
        assert!(check(&rules, &request("HEAD", &[])).is_ok());
        let refused = check(&rules, &request("PUT", &[])).unwrap_err();
        assert_eq!(refused.headers[0].1, "GET, HEAD, POST");
        // An HTTP/2 body needs no content-length: the caller says a body follows.
        let unlabelled = request("POST", &[]);
        assert!(rules.check(&unlabelled, false).is_ok());
        let refused = rules.check(&unlabelled, true).unwrap_err();
        assert_eq!(refused.rejection, Rejection::UnsupportedMediaType);
        let json = request("POST", &[("content-type", "application/json")]);
        assert!(rules.check(&json, true).is_ok());
        // Two media types: which one the upstream reads is not left to chance.
        let two = request(
            "POST",
            &[
                ("content-type", "application/json"),
                ("content-type", "text/html"),
            ],
        );
        let refused = rules.check(&two, true).unwrap_err();
        assert_eq!(
            refused.rejection,
            Rejection::BadRequest("more than one content-type field")
        );
    }

    #[test]
    fn compile_reports_each_bad_entry_at_its_path() {
        let mut errors = Errors::default();
        let methods = ["GET".to_string(), "get".to_string()];
        let types = ["Application/JSON".to_string(), "json".to_string()];
        let rules = Validation::compile(
            Some(&methods),
            Some(Size(0)),
            Some(&types),
            "routes[2]",
            &mut errors,
        );
        assert_eq!(
            errors.rendered(),
            [
                "routes[2].methods[1]: `get` is not an upper-case HTTP method",
                "routes[2].max_body: must be > 0 (got 0B)",
                "routes[2].content_types[1]: `json` is not a media type (`type/subtype`, `type/*` or `*/*`)",
            ]
        );
        assert_eq!(rules.content_types, ["application/json"]);
        let mut errors = Errors::default();
        Validation::compile(Some(&[]), None, Some(&[]), "routes[0]", &mut errors);
        assert_eq!(
            errors.rendered(),
            [
                "routes[0].methods: must list at least one method",
                "routes[0].content_types: must list at least one media type",
            ]
        );
    }

    #[test]
    fn media_ranges() {
        assert!(covers("*/*", "image/png") && covers("image/*", "image/png"));
        assert!(!covers("image/*", "text/png") && !covers("text/plain", "text/html"));
        for ok in [
            "application/json",
            "text/*",
            "*/*",
            "application/vnd.api+json",
        ] {
            assert!(is_media_range(ok), "{ok}");
        }
        for bad in ["json", "*/json", "text/", "te xt/plain"] {
            assert!(!is_media_range(bad), "{bad}");
        }
    }
}
