//! CORS (`routes[].cors`): the edge answers a route's preflights itself and decorates its
//! responses, so the upstream never sees a preflight and its own `access-control-*`
//! headers are replaced by the route's.
//!
//! A preflight (`OPTIONS` with `origin` and `access-control-request-method`) from an allowed
//! origin, for an allowed method and allowed headers, gets 204 with the route's CORS
//! headers; any other preflight gets 403 and no CORS headers. Any other request from an
//! allowed origin gets `access-control-allow-origin` (and `-credentials`, `-expose-headers`)
//! on its response; from another origin, none.

use http::{header, HeaderName, HeaderValue, Method};
use pingora::http::{RequestHeader, ResponseHeader};

use crate::config::raw::RawCors;
use crate::config::Errors;
use crate::validation::accepted_methods;

/// Which origins a route allows.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Origin {
    /// `*`: any (never with credentials).
    Any,
    /// Exactly this origin (`https://app.example.com`, `http://localhost:8080`).
    Exact(String),
    /// `https://*.example.com`: any subdomain of `example.com` at depth one or more, with
    /// this scheme and this port (`suffix` is `.example.com`, `port` `""` or `:8443`).
    Subdomains {
        scheme: String,
        suffix: String,
        port: String,
    },
}

impl Origin {
    fn parse(text: &str) -> Result<Self, String> {
        if text == "*" {
            return Ok(Origin::Any);
        }
        let lower = text.to_ascii_lowercase();
        let Some((scheme, rest)) = lower.split_once("://") else {
            return Err(format!("`{text}` is not an origin (`https://host[:port]`)"));
        };
        if scheme != "https" && scheme != "http" {
            return Err(format!("`{text}`: the scheme must be `https` or `http`"));
        }
        let (host, port) = match rest.rsplit_once(':') {
            Some((host, port)) if !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) => {
                (host, format!(":{port}"))
            }
            _ => (rest, String::new()),
        };
        let wildcard = host.strip_prefix("*.");
        let name = wildcard.unwrap_or(host);
        let valid = !name.is_empty()
            && name.split('.').all(|label| {
                !label.is_empty()
                    && label
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-')
            });
        if !valid {
            return Err(format!(
                "`{text}` is not an origin (`https://host[:port]`, `https://*.domain`, no path)"
            ));
        }
        Ok(match wildcard {
            Some(domain) => Origin::Subdomains {
                scheme: scheme.to_string(),
                suffix: format!(".{domain}"),
                port,
            },
            None => Origin::Exact(lower),
        })
    }

    fn allows(&self, origin: &str) -> bool {
        match self {
            Origin::Any => true,
            Origin::Exact(exact) => origin.eq_ignore_ascii_case(exact),
            Origin::Subdomains {
                scheme,
                suffix,
                port,
            } => {
                let Some(rest) = origin
                    .get(..scheme.len() + 3)
                    .filter(|s| s.eq_ignore_ascii_case(&format!("{scheme}://")))
                    .map(|_| &origin[scheme.len() + 3..])
                else {
                    return false;
                };
                let Some(host) = rest
                    .len()
                    .checked_sub(port.len())
                    .filter(|&end| &rest[end..] == port.as_str())
                    .map(|end| &rest[..end])
                else {
                    return false;
                };
                let Some(sub) = host
                    .len()
                    .checked_sub(suffix.len())
                    .filter(|&at| at > 0 && host[at..].eq_ignore_ascii_case(suffix))
                else {
                    return false;
                };
                host[..sub].split('.').all(|label| {
                    !label.is_empty()
                        && label
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                })
            }
        }
    }
}

/// A route's CORS rules, compiled.
#[derive(Debug, Clone)]
pub struct Cors {
    origins: Vec<Origin>,
    methods: Vec<Method>,
    /// `access-control-allow-methods`.
    allow_methods: HeaderValue,
    /// Allowed request headers (lower case); `None` is any (`*`).
    headers: Option<Vec<String>>,
    /// `access-control-expose-headers`.
    expose: Option<HeaderValue>,
    credentials: bool,
    /// `access-control-max-age`.
    max_age: Option<HeaderValue>,
}

/// What a preflight gets.
#[derive(Debug, PartialEq, Eq)]
pub enum Preflight {
    /// 204 with these headers.
    Allowed(Vec<(HeaderName, HeaderValue)>),
    /// 403, no CORS headers.
    Denied,
}

/// `vary` of every response of a route whose answer depends on the origin.
const VARY_ORIGIN: HeaderValue = HeaderValue::from_static("origin");

impl Cors {
    /// Compiles `routes[].cors` (at YAML path `at`).
    pub fn compile(raw: &RawCors, at: &str, errors: &mut Errors) -> Self {
        let mut origins = Vec::new();
        for (i, text) in raw.origins.iter().enumerate() {
            match Origin::parse(text.trim()) {
                Ok(origin) => origins.push(origin),
                Err(why) => errors.push(format!("{at}.origins[{i}]"), why),
            }
        }
        if raw.origins.is_empty() {
            errors.push(format!("{at}.origins"), "must list at least one origin");
        }
        if raw.credentials && origins.contains(&Origin::Any) {
            errors.push(
                format!("{at}.origins"),
                "`*` cannot be used with `credentials: true`: browsers refuse it; list the origins",
            );
        }
        let methods = match &raw.methods {
            Some(names) => {
                if names.is_empty() {
                    errors.push(format!("{at}.methods"), "must list at least one method");
                }
                accepted_methods(Some(names), &format!("{at}.methods"), errors)
            }
            None => vec![Method::GET, Method::HEAD, Method::POST],
        };
        let allow_methods = list_value(methods.iter().map(Method::as_str));
        let headers = header_names(&raw.headers, &format!("{at}.headers"), true, errors);
        if raw.credentials && headers.is_none() {
            errors.push(
                format!("{at}.headers"),
                "`*` cannot be used with `credentials: true`: browsers refuse it; list the headers",
            );
        }
        let expose = header_names(
            &raw.expose_headers,
            &format!("{at}.expose_headers"),
            false,
            errors,
        )
        .filter(|names| !names.is_empty())
        .map(|names| list_value(names.iter().map(String::as_str)));
        let max_age = raw.max_age.map(|d| HeaderValue::from(d.0.as_secs()));
        Self {
            origins,
            methods,
            allow_methods,
            headers,
            expose,
            credentials: raw.credentials,
            max_age,
        }
    }

    /// The preflight's answer, if `req` is a preflight.
    pub fn preflight(&self, req: &RequestHeader) -> Option<Preflight> {
        if req.method != Method::OPTIONS {
            return None;
        }
        let origin = req.headers.get(header::ORIGIN)?;
        let method = req.headers.get(header::ACCESS_CONTROL_REQUEST_METHOD)?;
        let Some(allow_origin) = self.allow_origin(origin) else {
            return Some(Preflight::Denied);
        };
        let method_allowed =
            Method::from_bytes(method.as_bytes()).is_ok_and(|m| self.methods.contains(&m));
        let requested: Vec<String> = req
            .headers
            .get_all(header::ACCESS_CONTROL_REQUEST_HEADERS)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(|name| name.trim().to_ascii_lowercase())
            .filter(|name| !name.is_empty())
            .collect();
        let headers_allowed = match &self.headers {
            None => true,
            Some(allowed) => requested.iter().all(|name| allowed.contains(name)),
        };
        if !method_allowed || !headers_allowed {
            return Some(Preflight::Denied);
        }
        let mut answer = vec![
            (header::ACCESS_CONTROL_ALLOW_ORIGIN, allow_origin),
            (
                header::ACCESS_CONTROL_ALLOW_METHODS,
                self.allow_methods.clone(),
            ),
        ];
        if !requested.is_empty() {
            // The headers asked for, all allowed (the list is echoed, as `*` would not
            // cover `authorization`).
            answer.push((
                header::ACCESS_CONTROL_ALLOW_HEADERS,
                list_value(requested.iter().map(String::as_str)),
            ));
        }
        if self.credentials {
            answer.push((
                header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
                HeaderValue::from_static("true"),
            ));
        }
        if let Some(max_age) = &self.max_age {
            answer.push((header::ACCESS_CONTROL_MAX_AGE, max_age.clone()));
        }
        answer.push((
            header::VARY,
            HeaderValue::from_static(
                "origin, access-control-request-method, access-control-request-headers",
            ),
        ));
        Some(Preflight::Allowed(answer))
    }

    /// Puts the route's CORS headers on a response to a request from `origin`: the
    /// upstream's own (every `access-control-*` field) are dropped, and an allowed origin
    /// gets the route's.
    pub fn decorate(&self, origin: Option<&HeaderValue>, response: &mut ResponseHeader) {
        let upstream: Vec<HeaderName> = response
            .headers
            .keys()
            .filter(|name| name.as_str().starts_with("access-control-"))
            .cloned()
            .collect();
        for name in upstream {
            response.remove_header(&name);
        }
        if self.origins != [Origin::Any] {
            // The answer depends on the origin: caches must keep one per origin.
            add_vary_origin(response);
        }
        let Some(allow_origin) = origin.and_then(|o| self.allow_origin(o)) else {
            return;
        };
        // Infallible for valid names and values.
        let _ = response.insert_header(header::ACCESS_CONTROL_ALLOW_ORIGIN, allow_origin);
        if self.credentials {
            let _ = response.insert_header(header::ACCESS_CONTROL_ALLOW_CREDENTIALS, "true");
        }
        if let Some(expose) = &self.expose {
            let _ = response.insert_header(header::ACCESS_CONTROL_EXPOSE_HEADERS, expose.clone());
        }
    }

    /// `access-control-allow-origin` for `origin`, if it is allowed.
    fn allow_origin(&self, origin: &HeaderValue) -> Option<HeaderValue> {
        let text = origin.to_str().ok()?;
        let allowed = self.origins.iter().find(|rule| rule.allows(text))?;
        Some(match allowed {
            Origin::Any => HeaderValue::from_static("*"),
            _ => origin.clone(),
        })
    }
}

/// Adds `origin` to `vary` unless it is there (or `vary: *`).
fn add_vary_origin(response: &mut ResponseHeader) {
    let present = response
        .headers
        .get_all(header::VARY)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|item| {
            let item = item.trim();
            item == "*" || item.eq_ignore_ascii_case("origin")
        });
    if !present {
        let _ = response.append_header(header::VARY, VARY_ORIGIN);
    }
}

/// Header names in lower case (`*` allowed when `star`: `None`), each checked.
fn header_names(
    names: &[String],
    at: &str,
    star: bool,
    errors: &mut Errors,
) -> Option<Vec<String>> {
    if star && names.iter().any(|n| n.trim() == "*") {
        return None;
    }
    let mut valid = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let lower = name.trim().to_ascii_lowercase();
        match HeaderName::from_bytes(lower.as_bytes()) {
            Ok(_) => valid.push(lower),
            Err(_) => errors.push(
                format!("{at}[{i}]"),
                format!("`{name}` is not a header name"),
            ),
        }
    }
    Some(valid)
}

/// `a, b, c`.
fn list_value<'a>(items: impl Iterator<Item = &'a str>) -> HeaderValue {
    let joined = items.collect::<Vec<_>>().join(", ");
    // Method and header names are tokens: always a valid value.
    HeaderValue::from_str(&joined).unwrap_or(HeaderValue::from_static(""))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cors(yaml: &str) -> (Cors, Vec<String>) {
        let raw: RawCors = serde_yaml::from_str(yaml).unwrap();
        let mut errors = Errors::default();
        let cors = Cors::compile(&raw, "routes[0].cors", &mut errors);
        (cors, errors.rendered())
    }

    fn preflight(origin: &str, method: &str, headers: Option<&str>) -> RequestHeader {
        let mut req = RequestHeader::build("OPTIONS", b"/v1/x", None).unwrap();
        req.insert_header("origin", origin).unwrap();
        req.insert_header("access-control-request-method", method)
            .unwrap();
        if let Some(headers) = headers {
            req.insert_header("access-control-request-headers", headers)
                .unwrap();
        }
        req
    }

    fn api() -> Cors {
        let (cors, errors) = cors(
            "{ origins: [https://kingdomstudios.app, 'https://*.kingdomstudios.app', 'http://localhost:5173'], methods: [GET, POST, DELETE], headers: [Authorization, Content-Type], expose_headers: [x-request-id, ratelimit], credentials: true, max_age: 10m }",
        );
        assert!(errors.is_empty(), "{errors:?}");
        cors
    }

    #[test]
    fn wildcard_origins_cover_subdomains_only() {
        let cors = api();
        let allowed = |origin: &str| {
            cors.allow_origin(&HeaderValue::from_str(origin).unwrap())
                .is_some()
        };
        for ok in [
            "https://kingdomstudios.app",
            "https://eu.kingdomstudios.app",
            "https://a.b.kingdomstudios.app",
            "HTTPS://EU.KingdomStudios.app",
            "http://localhost:5173",
        ] {
            assert!(allowed(ok), "{ok}");
        }
        for bad in [
            "https://evilkingdomstudios.app",
            "https://.kingdomstudios.app",
            "https://kingdomstudios.app.evil.com",
            "https://eu.kingdomstudios.app.evil.com",
            "http://eu.kingdomstudios.app",
            "https://eu.kingdomstudios.app:8443",
            "https://eu.kingdomstudios.app/",
            "https://e u.kingdomstudios.app",
            "https://x..kingdomstudios.app",
            "http://localhost:5174",
            "null",
            "",
        ] {
            assert!(!allowed(bad), "{bad}");
        }
    }

    #[test]
    fn an_allowed_preflight_gets_every_cors_header() {
        let answer = api().preflight(&preflight(
            "https://eu.kingdomstudios.app",
            "DELETE",
            Some("authorization, Content-Type"),
        ));
        let Some(Preflight::Allowed(headers)) = answer else {
            panic!("{answer:?}");
        };
        let got: Vec<(&str, &str)> = headers
            .iter()
            .map(|(n, v)| (n.as_str(), v.to_str().unwrap()))
            .collect();
        assert_eq!(
            got,
            [
                (
                    "access-control-allow-origin",
                    "https://eu.kingdomstudios.app"
                ),
                ("access-control-allow-methods", "GET, HEAD, POST, DELETE"),
                (
                    "access-control-allow-headers",
                    "authorization, content-type"
                ),
                ("access-control-allow-credentials", "true"),
                ("access-control-max-age", "600"),
                (
                    "vary",
                    "origin, access-control-request-method, access-control-request-headers"
                ),
            ]
        );
    }

    #[test]
    fn a_preflight_outside_the_rules_is_denied() {
        let cors = api();
        for (origin, method, headers) in [
            ("https://evil.example", "GET", None),
            ("https://kingdomstudios.app", "PUT", None),
            (
                "https://kingdomstudios.app",
                "GET",
                Some("authorization, x-debug"),
            ),
        ] {
            let answer = cors.preflight(&preflight(origin, method, headers));
            assert_eq!(
                answer,
                Some(Preflight::Denied),
                "{origin} {method} {headers:?}"
            );
        }
        // Not preflights: an OPTIONS without the request method, or a GET.
        let mut options = RequestHeader::build("OPTIONS", b"/", None).unwrap();
        options
            .insert_header("origin", "https://kingdomstudios.app")
            .unwrap();
        assert_eq!(cors.preflight(&options), None);
        let get = RequestHeader::build("GET", b"/", None).unwrap();
        assert_eq!(cors.preflight(&get), None);
    }

    #[test]
    fn responses_carry_cors_headers_for_allowed_origins_only() {
        let cors = api();
        let decorate = |origin: Option<&str>| {
            let mut response = ResponseHeader::build(200, None).unwrap();
            response
                .insert_header("access-control-allow-origin", "*")
                .unwrap();
            response
                .insert_header("access-control-allow-private-network", "true")
                .unwrap();
            response.insert_header("vary", "accept-encoding").unwrap();
            let origin = origin.map(|o| HeaderValue::from_str(o).unwrap());
            cors.decorate(origin.as_ref(), &mut response);
            let mut all: Vec<String> = response
                .headers
                .iter()
                .map(|(n, v)| format!("{n}: {}", v.to_str().unwrap()))
                .collect();
            all.sort();
            all
        };
        assert_eq!(
            decorate(Some("https://eu.kingdomstudios.app")),
            [
                "access-control-allow-credentials: true",
                "access-control-allow-origin: https://eu.kingdomstudios.app",
                "access-control-expose-headers: x-request-id, ratelimit",
                "vary: accept-encoding",
                "vary: origin",
            ]
        );
        // The upstream's `*` (and any other access-control field) is gone too: the route's
        // rules are the only ones.
        assert_eq!(
            decorate(Some("https://evil.example")),
            ["vary: accept-encoding", "vary: origin"]
        );
        assert_eq!(decorate(None), ["vary: accept-encoding", "vary: origin"]);
    }

    #[test]
    fn any_origin_without_credentials() {
        let (cors, errors) = cors("{ origins: ['*'], headers: ['*'] }");
        assert!(errors.is_empty());
        let answer = cors.preflight(&preflight(
            "https://anyone.example",
            "POST",
            Some("x-anything"),
        ));
        let Some(Preflight::Allowed(headers)) = answer else {
            panic!("{answer:?}");
        };
        assert_eq!(headers[0].1, "*");
        assert_eq!(headers[2].1, "x-anything");
        let mut response = ResponseHeader::build(200, None).unwrap();
        cors.decorate(
            Some(&HeaderValue::from_static("https://anyone.example")),
            &mut response,
        );
        assert_eq!(
            response.headers.get("access-control-allow-origin").unwrap(),
            "*"
        );
        assert!(response.headers.get("vary").is_none());
    }

    #[test]
    fn bad_rules_are_refused_at_their_path() {
        let (_, errors) = cors(
            "{ origins: ['*', 'https://ok.example', 'ftp://x.example', 'https://x.example/path', 'https://*.'], methods: [get], headers: ['*', 'bad header'], credentials: true }",
        );
        assert_eq!(
            errors,
            [
                "routes[0].cors.origins[2]: `ftp://x.example`: the scheme must be `https` or `http`",
                "routes[0].cors.origins[3]: `https://x.example/path` is not an origin (`https://host[:port]`, `https://*.domain`, no path)",
                "routes[0].cors.origins[4]: `https://*.` is not an origin (`https://host[:port]`, `https://*.domain`, no path)",
                "routes[0].cors.origins: `*` cannot be used with `credentials: true`: browsers refuse it; list the origins",
                "routes[0].cors.methods[0]: `get` is not an upper-case HTTP method",
                "routes[0].cors.headers: `*` cannot be used with `credentials: true`: browsers refuse it; list the headers",
            ]
        );
        let (_, errors) = cors("{ origins: [] }");
        assert_eq!(
            errors,
            ["routes[0].cors.origins: must list at least one origin"]
        );
    }
}
