//! Response headers the edge owns: the security headers (`server.security_headers`, a
//! route's `security_headers` over them) and CORS (`routes[].cors`, in [`cors`]).
//!
//! A security header is added to a response that does not carry it already: an upstream
//! that sends its own (a page-specific `content-security-policy`, say) keeps it.
//! `strict-transport-security` goes on responses of TLS listeners only: over plain HTTP a
//! browser ignores it, and a plain listener behind a TLS-terminating balancer says it there.

pub mod cors;

use http::{HeaderName, HeaderValue};
use pingora::http::ResponseHeader;

use crate::config::raw::RawSecurityHeaders;
use crate::config::Errors;

/// The value that turns a header off.
const OFF: &str = "off";

/// The security headers a response gets, compiled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecurityHeaders {
    /// On every response.
    always: Vec<(HeaderName, HeaderValue)>,
    /// `strict-transport-security`, on responses of TLS listeners.
    hsts: Option<HeaderValue>,
}

/// Each header: its key under `security_headers`, its name, its default.
const HEADERS: [(&str, HeaderName, Option<&str>); 5] = [
    (
        "strict_transport_security",
        http::header::STRICT_TRANSPORT_SECURITY,
        Some("max-age=31536000"),
    ),
    (
        "content_type_options",
        http::header::X_CONTENT_TYPE_OPTIONS,
        Some("nosniff"),
    ),
    ("frame_options", http::header::X_FRAME_OPTIONS, Some("DENY")),
    (
        "referrer_policy",
        http::header::REFERRER_POLICY,
        Some("strict-origin-when-cross-origin"),
    ),
    (
        "content_security_policy",
        http::header::CONTENT_SECURITY_POLICY,
        None,
    ),
];

impl Default for SecurityHeaders {
    /// The defaults, as when `server.security_headers` is not given.
    fn default() -> Self {
        Self::compile(
            None,
            None,
            "server.security_headers",
            &mut Errors::default(),
        )
    }
}

impl SecurityHeaders {
    /// Compiles `raw` (at YAML path `at`) over `base` (the server's, for a route; `None`
    /// for the server's own, over the defaults).
    pub fn compile(
        raw: Option<&RawSecurityHeaders>,
        base: Option<&SecurityHeaders>,
        at: &str,
        errors: &mut Errors,
    ) -> Self {
        let written = raw.map_or([None; 5], |raw| {
            [
                raw.strict_transport_security.as_deref(),
                raw.content_type_options.as_deref(),
                raw.frame_options.as_deref(),
                raw.referrer_policy.as_deref(),
                raw.content_security_policy.as_deref(),
            ]
        });
        let mut values: Vec<Option<HeaderValue>> = Vec::with_capacity(HEADERS.len());
        for ((key, name, default), written) in HEADERS.iter().zip(written) {
            let inherited = match base {
                Some(base) => base.get(name).cloned(),
                None => default.map(HeaderValue::from_static),
            };
            let value = match written.map(str::trim) {
                None => inherited,
                Some(OFF) => None,
                Some(text) => check(key, text)
                    .and_then(|()| {
                        HeaderValue::from_str(text)
                            .map_err(|_| "must be visible ASCII text".to_string())
                    })
                    .map_err(|why| errors.push(format!("{at}.{key}"), why))
                    .ok(),
            };
            values.push(value);
        }
        let hsts = values.remove(0);
        let always = HEADERS[1..]
            .iter()
            .zip(values)
            .filter_map(|((_, name, _), value)| Some((name.clone(), value?)))
            .collect();
        Self { always, hsts }
    }

    /// Adds each header `response` lacks (`strict-transport-security` only when `tls`).
    pub fn apply(&self, response: &mut ResponseHeader, tls: bool) {
        let hsts = self
            .hsts
            .iter()
            .filter(|_| tls)
            .map(|value| (&http::header::STRICT_TRANSPORT_SECURITY, value));
        let always = self.always.iter().map(|(name, value)| (name, value));
        for (name, value) in hsts.chain(always) {
            if !response.headers.contains_key(name) {
                // Infallible for a valid name and value.
                let _ = response.insert_header(name.clone(), value.clone());
            }
        }
    }

    /// The value of header `name`, if it is sent.
    fn get(&self, name: &HeaderName) -> Option<&HeaderValue> {
        if name == http::header::STRICT_TRANSPORT_SECURITY {
            return self.hsts.as_ref();
        }
        self.always.iter().find(|(n, _)| n == name).map(|(_, v)| v)
    }
}

/// What a header's value must be, beyond valid header text.
fn check(key: &str, text: &str) -> Result<(), String> {
    let expected = match key {
        "content_type_options" => &["nosniff"][..],
        "frame_options" => &["DENY", "SAMEORIGIN"][..],
        _ if text.is_empty() => return Err(format!("must not be empty (`{OFF}` sends none)")),
        _ => return Ok(()),
    };
    if expected.iter().any(|e| e.eq_ignore_ascii_case(text)) {
        Ok(())
    } else {
        Err(format!(
            "must be {} or `{OFF}` (got `{text}`)",
            expected
                .iter()
                .map(|e| format!("`{e}`"))
                .collect::<Vec<_>>()
                .join(", ")
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn compile(yaml: &str, base: Option<&SecurityHeaders>) -> (SecurityHeaders, Vec<String>) {
        let raw: RawSecurityHeaders = serde_yaml::from_str(yaml).unwrap();
        let mut errors = Errors::default();
        let headers =
            SecurityHeaders::compile(Some(&raw), base, "routes[0].security_headers", &mut errors);
        (headers, errors.rendered())
    }

    fn applied(
        headers: &SecurityHeaders,
        tls: bool,
        upstream: &[(&str, &str)],
    ) -> Vec<(String, String)> {
        let mut response = ResponseHeader::build(200, None).unwrap();
        for (name, value) in upstream {
            response.insert_header(name.to_string(), *value).unwrap();
        }
        headers.apply(&mut response, tls);
        let mut all: Vec<(String, String)> = response
            .headers
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_str().unwrap().to_string()))
            .collect();
        all.sort();
        all
    }

    fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn safe_defaults_and_hsts_on_tls_only() {
        let defaults = SecurityHeaders::default();
        let plain = [
            ("referrer-policy", "strict-origin-when-cross-origin"),
            ("x-content-type-options", "nosniff"),
            ("x-frame-options", "DENY"),
        ];
        assert_eq!(applied(&defaults, false, &[]), pairs(&plain));
        let mut tls = plain.to_vec();
        tls.insert(1, ("strict-transport-security", "max-age=31536000"));
        assert_eq!(applied(&defaults, true, &[]), pairs(&tls));
    }

    #[test]
    fn the_upstreams_own_header_wins() {
        let (route, errors) = compile(
            "{ content_security_policy: \"default-src 'self'\" }",
            Some(&SecurityHeaders::default()),
        );
        assert!(errors.is_empty());
        let upstream = [
            ("content-security-policy", "default-src 'none'"),
            ("x-frame-options", "SAMEORIGIN"),
        ];
        let got = applied(&route, false, &upstream);
        assert!(got.contains(&(
            "content-security-policy".into(),
            "default-src 'none'".into()
        )));
        assert!(got.contains(&("x-frame-options".into(), "SAMEORIGIN".into())));
    }

    #[test]
    fn a_route_overrides_key_by_key_and_off_sends_none() {
        let (server, errors) = compile(
            "{ strict_transport_security: max-age=63072000; includeSubDomains, referrer_policy: 'off' }",
            None,
        );
        assert!(errors.is_empty(), "{errors:?}");
        let (route, errors) = compile(
            "{ frame_options: sameorigin, content_security_policy: \"default-src 'none'\" }",
            Some(&server),
        );
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(
            applied(&route, true, &[]),
            pairs(&[
                ("content-security-policy", "default-src 'none'"),
                (
                    "strict-transport-security",
                    "max-age=63072000; includeSubDomains"
                ),
                ("x-content-type-options", "nosniff"),
                ("x-frame-options", "sameorigin"),
            ])
        );
    }

    #[test]
    fn bad_values_are_refused_at_their_path() {
        let (_, errors) = compile(
            "{ frame_options: ALLOW-FROM https://x, content_type_options: sniff, referrer_policy: '', content_security_policy: \"a\\nb\" }",
            None,
        );
        assert_eq!(
            errors,
            [
                "routes[0].security_headers.content_type_options: must be `nosniff` or `off` (got `sniff`)",
                "routes[0].security_headers.frame_options: must be `DENY`, `SAMEORIGIN` or `off` (got `ALLOW-FROM https://x`)",
                "routes[0].security_headers.referrer_policy: must not be empty (`off` sends none)",
                "routes[0].security_headers.content_security_policy: must be visible ASCII text",
            ]
        );
    }
}
