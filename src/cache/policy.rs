//! What a route caches (`routes[].cache`), under which key, and for how long.
//!
//! Only GET and HEAD are looked up and stored (a HEAD is answered from the GET's entry).
//! The key is the scheme, host, path and normalized query, plus the values of the route's
//! `key_headers`. RFC 9111 decides what is stored and how long it stays fresh: `s-maxage`
//! over `max-age` over `Expires` (against `Date`); a response that says none of them is
//! stored only when the route gives a `default_ttl`, as heuristic freshness is off. Never
//! stored: `no-store`, `private`, a response with `Set-Cookie` or with `Vary: *`, and the
//! answer to a request with `Authorization` unless the response says `public`, `s-maxage`
//! or `must-revalidate`.

use std::time::Duration;

use http::{header, HeaderName, Method};
use pingora::cache::cache_control::{CacheControl, InterpretCacheControl};
use pingora::cache::filters::{calculate_expires_header_time, resp_cacheable};
use pingora::cache::key::HashBinary;
use pingora::cache::VarianceBuilder;
use pingora::cache::{CacheKey, CacheMeta, CacheMetaDefaults, NoCacheReason, RespCacheable};
use pingora::http::{RequestHeader, ResponseHeader};

use crate::config::raw::RawRouteCache;
use crate::config::Errors;

/// A route's `cache:` policy, compiled.
#[derive(Debug, Clone)]
pub struct CachePolicy {
    /// Request headers whose values are part of the key.
    key_headers: Vec<HeaderName>,
    /// Freshness of a response that states none, if the route gives one.
    default_ttl: Option<Duration>,
    /// Serve-stale windows for answers that state none: while revalidating, on error.
    stale_while_revalidate: Duration,
    stale_if_error: Duration,
    /// Identical concurrent GETs share one upstream request, stored or not.
    pub coalesce_uncacheable: bool,
}

/// Why a HEAD's own answer is not stored (it is answered from a GET's entry).
pub const HEAD_REASON: &str = "head";

/// Statuses a response may be stored with when only `default_ttl` makes it fresh (those
/// RFC 9110 §15.1 calls heuristically cacheable).
const DEFAULT_CACHEABLE: [u16; 10] = [200, 203, 204, 300, 301, 308, 404, 405, 410, 501];

/// Statuses whose caching rules the edge knows (RFC 9110's final status codes): a response
/// with another and `Cache-Control: must-understand` is not stored.
const UNDERSTOOD: [u16; 43] = [
    200, 201, 202, 203, 204, 205, 206, 300, 301, 302, 303, 304, 305, 307, 308, 400, 401, 402, 403,
    404, 405, 406, 407, 408, 409, 410, 411, 412, 413, 414, 415, 416, 417, 421, 422, 426, 451, 500,
    501, 502, 503, 504, 505,
];

/// No freshness of our own: heuristic freshness is off.
const NO_DEFAULTS: CacheMetaDefaults = CacheMetaDefaults::new(|_| None, 0, 0);

/// A freshness for the statuses above, replaced by the route's `default_ttl`.
const PLACEHOLDER: CacheMetaDefaults = CacheMetaDefaults::new(
    |status| {
        DEFAULT_CACHEABLE
            .contains(&status.as_u16())
            .then_some(Duration::from_secs(1))
    },
    0,
    0,
);

impl CachePolicy {
    /// Compiles a route's `cache` (at YAML path `at`); `None` when it is off.
    pub fn compile(raw: &RawRouteCache, at: &str, errors: &mut Errors) -> Option<Self> {
        let mut key_headers = Vec::new();
        for (i, name) in raw.key_headers.iter().flatten().enumerate() {
            match HeaderName::from_bytes(name.trim().as_bytes()) {
                Ok(name) => key_headers.push(name),
                Err(_) => errors.push(
                    format!("{at}.key_headers[{i}]"),
                    format!("`{name}` is not a header name"),
                ),
            }
        }
        let default_ttl = raw.default_ttl.map(|d| d.0);
        if default_ttl.is_some_and(|ttl| ttl < Duration::from_secs(1)) {
            errors.push(format!("{at}.default_ttl"), "must be at least 1s");
        }
        let window = |d: Option<crate::config::units::Dur>| d.map_or(Duration::ZERO, |d| d.0);
        raw.enabled.unwrap_or(true).then_some(Self {
            key_headers,
            default_ttl,
            stale_while_revalidate: window(raw.stale_while_revalidate),
            stale_if_error: window(raw.stale_if_error),
            coalesce_uncacheable: raw.coalesce_uncacheable.unwrap_or(false),
        })
    }

    /// Whether `req` may be answered from the cache (and its answer stored).
    pub fn applies_to(req: &RequestHeader) -> bool {
        matches!(req.method, Method::GET | Method::HEAD)
    }

    /// The cache key of `req`, over `scheme`, `host` and the `forwarded_host` the upstream
    /// is told. Each part is length-prefixed, so that no two requests share a key by moving
    /// bytes from one part to the next.
    pub fn key(
        &self,
        scheme: &str,
        host: &str,
        forwarded_host: Option<&str>,
        req: &RequestHeader,
    ) -> CacheKey {
        let host = host.to_ascii_lowercase();
        let mut primary = Vec::with_capacity(128);
        let mut part = |bytes: &[u8]| {
            primary.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
            primary.extend_from_slice(bytes);
        };
        part(scheme.as_bytes());
        part(host.as_bytes());
        part(&present(
            forwarded_host.map(|h| h.to_ascii_lowercase().into_bytes()),
        ));
        part(req.uri.path().as_bytes());
        part(normalize_query(req.uri.query().unwrap_or("")).as_bytes());
        for name in &self.key_headers {
            part(name.as_str().as_bytes());
            part(&present(joined(req, name.as_str())));
        }
        // The URL, readable: purges by URL and by prefix compare against it.
        let url = format!("{scheme}://{host}{}", req.uri.path());
        let mut key = CacheKey::new(url, "");
        key.set_primary_bin_override(pingora::cache::key::hash_key(&primary));
        key
    }

    /// Whether the response `resp` to a request that did or did not carry `Authorization`
    /// may be stored, and until when.
    pub fn cacheable(&self, resp: &ResponseHeader, authorization: bool) -> RespCacheable {
        let surrogate = Surrogate::of(resp);
        if surrogate.no_store {
            return RespCacheable::Uncacheable(NoCacheReason::Custom("surrogate-control"));
        }
        let control = CacheControl::from_resp_headers(resp);
        let verdict = match surrogate.max_age {
            Some(seconds) => {
                Self::storable_for_surrogate(resp, control.as_ref(), authorization, seconds)
            }
            None => self.storable(resp, control.as_ref(), authorization),
        };
        let RespCacheable::Cacheable(meta) = verdict else {
            return verdict;
        };
        let created = meta.created();
        let mut lifetime = meta
            .fresh_until()
            .duration_since(created)
            .unwrap_or_default();
        // Already this old when it arrives (`Age`, RFC 9111 §4.2.3). An `Age` that is not
        // one number makes the response stale.
        let age = age(resp).unwrap_or(lifetime);
        // For `Expires`, the lifetime is `Expires - Date` (the origin's clock against
        // itself, not the edge's).
        let by_control = surrogate.max_age.is_some()
            || control
                .as_ref()
                .is_some_and(|cc| cc.fresh_duration().is_some());
        if let (false, Some(expires), Some(date)) = (
            by_control,
            calculate_expires_header_time(resp),
            header_date(resp, header::DATE),
        ) {
            lifetime = expires.duration_since(date).unwrap_or_default();
        }
        // The serve-stale windows: the answer's (`stale-while-revalidate=`, `stale-if-error=`,
        // or 0 where `must-revalidate` and the like forbid it), else the route's.
        let seconds = |d: Duration| u32::try_from(d.as_secs()).unwrap_or(u32::MAX);
        let (swr, sie) = match &control {
            Some(cc) => (
                cc.serve_stale_while_revalidate_duration()
                    .unwrap_or(self.stale_while_revalidate),
                cc.serve_stale_if_error_duration()
                    .unwrap_or(self.stale_if_error),
            ),
            None => (self.stale_while_revalidate, self.stale_if_error),
        };
        let validators = resp.headers.contains_key(header::ETAG)
            || resp.headers.contains_key(header::LAST_MODIFIED);
        if lifetime <= age && !validators && swr.is_zero() && sie.is_zero() {
            // Stale on arrival, with nothing to revalidate it with and no window to serve it
            // stale in: useless to keep.
            return RespCacheable::Uncacheable(NoCacheReason::Custom("stale-on-arrival"));
        }
        // An age beyond the clock's reach is as old as can be.
        let created = created.checked_sub(age).unwrap_or(std::time::UNIX_EPOCH);
        // A far-future `Expires` cannot overflow the clock: it is fresh as long as it can be.
        let fresh_until = created
            .checked_add(lifetime)
            .unwrap_or_else(|| meta.fresh_until());
        let mut stored = meta.response_header_copy();
        // The age is in `created` now, and hits say their own; a response that came without
        // a `Date` keeps the time it was received (RFC 9110 §6.6.1), which hits then show.
        stored.remove_header(&header::AGE);
        if !stored.headers.contains_key(header::DATE) {
            let received = httpdate::fmt_http_date(meta.created());
            stored.insert_header(header::DATE, received).ok();
        }
        RespCacheable::Cacheable(CacheMeta::new(
            fresh_until,
            created,
            seconds(swr),
            seconds(sie),
            stored,
        ))
    }

    /// What no freshness can make storable.
    fn refused(resp: &ResponseHeader, control: Option<&CacheControl>) -> Option<NoCacheReason> {
        let status = resp.status.as_u16();
        let reason = if status == 206 {
            // A part of the body: storing it would answer a whole GET with a part.
            "partial"
        } else if resp.headers.contains_key(header::SET_COOKIE) {
            "set-cookie"
        } else if vary_names(resp).any(|name| name == "*") {
            "vary-star"
        } else if !UNDERSTOOD.contains(&status)
            && control.is_some_and(|cc| cc.has_key("must-understand"))
        {
            // RFC 9111 §5.2.2.3: only for a status whose caching rules the cache knows.
            "must-understand"
        } else {
            return None;
        };
        Some(NoCacheReason::Custom(reason))
    }

    /// Storage under the origin's `Surrogate-Control: max-age`, meant for the edge: it
    /// replaces `Cache-Control`'s and `Expires`' freshness and `no-store` here. `private`
    /// still keeps an answer out (and `private="…"` its fields), and `Authorization` still
    /// needs the origin's word in `Cache-Control`.
    fn storable_for_surrogate(
        resp: &ResponseHeader,
        control: Option<&CacheControl>,
        authorization: bool,
        seconds: u32,
    ) -> RespCacheable {
        if let Some(reason) = Self::refused(resp, control) {
            return RespCacheable::Uncacheable(reason);
        }
        let personal = control.is_some_and(|cc| cc.private() && cc.private_field_names().is_none());
        if personal {
            return RespCacheable::Uncacheable(NoCacheReason::Custom("private"));
        }
        let shared =
            control.is_some_and(|cc| cc.public() || cc.has_key("s-maxage") || cc.must_revalidate());
        if authorization && !shared {
            return RespCacheable::Uncacheable(NoCacheReason::Custom("authorization"));
        }
        let mut stored = resp.clone();
        if let Some(cc) = control {
            cc.strip_private_headers(&mut stored);
        }
        let now = std::time::SystemTime::now();
        let fresh_until = now
            .checked_add(Duration::from_secs(seconds.into()))
            .unwrap_or(now);
        RespCacheable::Cacheable(CacheMeta::new(fresh_until, now, 0, 0, stored))
    }

    /// Whether `resp` may be stored at all, and its freshness as RFC 9111 states it.
    fn storable(
        &self,
        resp: &ResponseHeader,
        control: Option<&CacheControl>,
        authorization: bool,
    ) -> RespCacheable {
        if let Some(reason) = Self::refused(resp, control) {
            return RespCacheable::Uncacheable(reason);
        }
        let stated = control.is_some_and(|cc| cc.fresh_duration().is_some())
            || calculate_expires_header_time(resp).is_some();
        let Some(ttl) = self.default_ttl.filter(|_| !stated) else {
            return resp_cacheable(control, resp.clone(), authorization, &NO_DEFAULTS);
        };
        // The answer states no freshness: RFC 9111 still decides whether it may be stored
        // (any placeholder freshness will do for that), then the route's default applies.
        match resp_cacheable(control, resp.clone(), authorization, &PLACEHOLDER) {
            RespCacheable::Cacheable(meta) => {
                let created = meta.created();
                RespCacheable::Cacheable(CacheMeta::new(
                    created + ttl,
                    created,
                    meta.stale_while_revalidate_sec(),
                    meta.stale_if_error_sec(),
                    meta.response_header_copy(),
                ))
            }
            uncacheable => uncacheable,
        }
    }
}

/// The URLs (as keys name them) a successful unsafe request `req` to `host` over `scheme`
/// makes stale: its own, and those its answer's `Location` and `Content-Location` name on
/// the same host (RFC 9111 §4.4).
pub fn invalidated(
    scheme: &str,
    host: Option<&str>,
    req: &RequestHeader,
    resp: &ResponseHeader,
) -> Vec<String> {
    let Some(host) = host.map(str::to_ascii_lowercase) else {
        return Vec::new();
    };
    let origin = format!("{scheme}://{host}");
    let mut urls = vec![format!("{origin}{}", req.uri.path())];
    for name in [header::LOCATION, header::CONTENT_LOCATION] {
        let Some(target) = resp.headers.get(&name).and_then(|v| v.to_str().ok()) else {
            continue;
        };
        // The scheme and host compare without case (the path with it).
        let head = target.len().min(origin.len());
        let same_origin =
            target.is_char_boundary(head) && target[..head].eq_ignore_ascii_case(&origin);
        let path = match same_origin.then(|| &target[head..]) {
            Some(rest) if rest.starts_with('/') => rest,
            Some(_) => continue,
            // Another origin's URL is not this cache's to drop.
            None if !target.starts_with('/') || target.starts_with("//") => continue,
            None => target,
        };
        let path = path.split(['?', '#']).next().unwrap_or(path);
        urls.push(format!("{origin}{path}"));
    }
    urls
}

/// A URL as keys name it: scheme and host in lower case, the path as given, no query or
/// fragment. `None` unless it is `scheme://host/...`.
pub fn purge_url(url: &str) -> Option<String> {
    let (scheme, rest) = url.split_once("://")?;
    let slash = rest.find('/')?;
    let (host, path) = rest.split_at(slash);
    if scheme.is_empty() || host.is_empty() {
        return None;
    }
    let path = path.split(['?', '#']).next().unwrap_or(path);
    Some(format!(
        "{}://{}{path}",
        scheme.to_ascii_lowercase(),
        host.to_ascii_lowercase()
    ))
}

/// A response's `Age`: zero when absent, `None` when it is not exactly one field holding
/// one non-negative integer (RFC 9111 §5.1). A number too large saturates.
fn age(resp: &ResponseHeader) -> Option<Duration> {
    let mut fields = resp.headers.get_all(header::AGE).iter();
    let Some(field) = fields.next() else {
        return Some(Duration::ZERO);
    };
    let digits = field.as_bytes();
    if fields.next().is_some() || digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let seconds = digits.iter().fold(0u64, |n, d| {
        n.saturating_mul(10).saturating_add(u64::from(d - b'0'))
    });
    Some(Duration::from_secs(seconds))
}

/// What an origin's `Surrogate-Control` (W3C Edge Architecture) tells the edge: directives
/// for every surrogate, and those aimed at this one by its name (`max-age=60;kingdom-edge`).
#[derive(Debug, Default, PartialEq)]
struct Surrogate {
    no_store: bool,
    max_age: Option<u32>,
}

impl Surrogate {
    /// The directives aimed at this edge by name, if there are any (they take precedence),
    /// else those for every surrogate.
    fn of(resp: &ResponseHeader) -> Surrogate {
        let directives = || {
            resp.headers
                .get_all(SURROGATE_CONTROL)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(','))
                .map(|d| match d.split_once(';') {
                    None => (d.trim(), None),
                    Some((d, target)) => (d.trim(), Some(target.trim())),
                })
        };
        let targeted = directives().any(|(_, target)| target == Some(SURROGATE_NAME));
        let ours = directives()
            .filter(|(_, target)| match target {
                Some(name) => *name == SURROGATE_NAME,
                None => !targeted,
            })
            .map(|(directive, _)| directive);
        let mut surrogate = Surrogate::default();
        for directive in ours {
            let (name, value) = directive.split_once('=').unwrap_or((directive, ""));
            if name.eq_ignore_ascii_case("no-store") {
                surrogate.no_store = true;
            } else if name.eq_ignore_ascii_case("max-age")
                && !value.is_empty()
                && value.bytes().all(|b| b.is_ascii_digit())
            {
                surrogate.max_age = Some(value.parse().unwrap_or(u32::MAX));
            }
        }
        surrogate
    }
}

/// The origin's instructions to the edge; removed before an answer leaves it.
pub const SURROGATE_CONTROL: HeaderName = HeaderName::from_static("surrogate-control");

/// The name this cache goes by in `Surrogate-Control` targets.
const SURROGATE_NAME: &str = "kingdom-edge";

/// What a cached route's requests tell the origin the edge understands.
pub const SURROGATE_CAPABILITY: HeaderName = HeaderName::from_static("surrogate-capability");
pub const SURROGATE_CAPABILITY_VALUE: &str = "kingdom-edge=\"Surrogate/1.0\"";

/// A header holding an HTTP date.
fn header_date(resp: &ResponseHeader, name: HeaderName) -> Option<std::time::SystemTime> {
    let text = resp.headers.get(name)?.to_str().ok()?;
    httpdate::parse_http_date(text).ok()
}

/// The names a response's `Vary` lists, lower case.
pub(crate) fn vary_names(resp: &ResponseHeader) -> impl Iterator<Item = String> + '_ {
    resp.headers
        .get_all(header::VARY)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|name| name.trim().to_ascii_lowercase())
        .filter(|name| !name.is_empty())
}

/// The variant of the stored response `meta` that `req` asks for: a hash of `req`'s values
/// of the headers the response's `Vary` names (`None` when it names none).
pub fn variance(meta: &CacheMeta, req: &RequestHeader) -> Option<HashBinary> {
    let mut names: Vec<String> = vary_names(meta.response_header()).collect();
    if names.is_empty() {
        return None;
    }
    names.sort();
    names.dedup();
    let mut variance = VarianceBuilder::new();
    for name in &names {
        variance.add_owned_value(name.as_str(), present(joined(req, name)));
    }
    variance.finalize()
}

/// A query in one spelling: its parameters sorted by name (the order of two different
/// parameters never changes the answer of a well-behaved origin; repeated ones keep their
/// order), empty ones dropped.
pub fn normalize_query(query: &str) -> String {
    let mut pairs: Vec<&str> = query.split('&').filter(|p| !p.is_empty()).collect();
    pairs.sort_by_key(|pair| pair.split('=').next().unwrap_or(pair));
    pairs.join("&")
}

/// All values of header `name` in `req`, joined by commas; `None` when it is absent.
fn joined(req: &RequestHeader, name: &str) -> Option<Vec<u8>> {
    let mut values = req.headers.get_all(name).iter().peekable();
    values.peek()?;
    let values: Vec<&[u8]> = values.map(|v| v.as_bytes()).collect();
    Some(values.join(&b','))
}

/// A value marked present (`1` before it) or absent (`0`): an absent header never matches
/// an empty one (RFC 9111 §4.1).
fn present(value: Option<Vec<u8>>) -> Vec<u8> {
    match value {
        Some(mut value) => {
            value.insert(0, 1);
            value
        }
        None => vec![0],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::units::Dur;

    fn policy(default_ttl: Option<u64>, key_headers: &[&str]) -> CachePolicy {
        let raw = RawRouteCache {
            enabled: None,
            default_ttl: default_ttl.map(|s| Dur(Duration::from_secs(s))),
            key_headers: Some(key_headers.iter().map(|h| h.to_string()).collect()),
            stale_while_revalidate: None,
            stale_if_error: None,
            coalesce_uncacheable: None,
        };
        CachePolicy::compile(&raw, "routes[0].cache", &mut Errors::default()).unwrap()
    }

    fn response(status: u16, headers: &[(&str, &str)]) -> ResponseHeader {
        let mut resp = ResponseHeader::build(status, None).unwrap();
        for (name, value) in headers {
            resp.append_header(name.to_string(), *value).unwrap();
        }
        resp
    }

    fn stored(policy: &CachePolicy, resp: &ResponseHeader, authorization: bool) -> Option<u64> {
        match policy.cacheable(resp, authorization) {
            RespCacheable::Cacheable(meta) => Some(
                meta.fresh_until()
                    .duration_since(meta.created())
                    .unwrap_or_default()
                    .as_secs(),
            ),
            RespCacheable::Uncacheable(_) => None,
        }
    }

    #[test]
    fn rfc_9111_decides_what_is_stored_and_for_how_long() {
        let p = policy(None, &[]);
        let cc = |v: &'static str| response(200, &[("cache-control", v)]);
        assert_eq!(stored(&p, &cc("max-age=60"), false), Some(60));
        assert_eq!(stored(&p, &cc("max-age=60, s-maxage=5"), false), Some(5));
        for never in ["no-store, max-age=60", "private, max-age=60"] {
            assert_eq!(stored(&p, &cc(never), false), None, "{never}");
        }
        let cookie = response(
            200,
            &[("cache-control", "max-age=60"), ("set-cookie", "a=1")],
        );
        assert_eq!(stored(&p, &cookie, false), None);
        let star = response(
            200,
            &[("cache-control", "max-age=60"), ("vary", "accept, *")],
        );
        assert_eq!(stored(&p, &star, false), None);
        // Nothing said: not stored, unless the route gives a default.
        assert_eq!(stored(&p, &response(200, &[]), false), None);
        assert_eq!(
            stored(&policy(Some(30), &[]), &response(200, &[]), false),
            Some(30)
        );
        assert_eq!(
            stored(&policy(Some(30), &[]), &response(500, &[]), false),
            None
        );
        // Authorization: only what the origin says a shared cache may keep.
        assert_eq!(stored(&p, &cc("max-age=60"), true), None);
        assert_eq!(stored(&p, &cc("public, max-age=60"), true), Some(60));
        assert_eq!(stored(&p, &cc("s-maxage=60"), true), Some(60));
    }

    #[test]
    fn keys_cover_scheme_host_path_query_and_key_headers() {
        let p = policy(None, &["x-tenant"]);
        let req = |target: &str, tenant: Option<&str>| {
            let mut req = RequestHeader::build("GET", target.as_bytes(), None).unwrap();
            if let Some(tenant) = tenant {
                req.insert_header("x-tenant", tenant).unwrap();
            }
            req
        };
        use pingora::cache::key::CacheHashKey;
        let key = |scheme, host, target, tenant| {
            p.key(scheme, host, None, &req(target, tenant))
                .primary_bin()
        };
        let base = key("http", "a.test", "/x?b=2&a=1", Some("t1"));
        assert_eq!(
            base,
            key("http", "A.test", "/x?a=1&b=2&", Some("t1")),
            "normalized"
        );
        assert_ne!(base, key("https", "a.test", "/x?a=1&b=2", Some("t1")));
        assert_ne!(base, key("http", "b.test", "/x?a=1&b=2", Some("t1")));
        assert_ne!(base, key("http", "a.test", "/y?a=1&b=2", Some("t1")));
        assert_ne!(base, key("http", "a.test", "/x?a=1&b=3", Some("t1")));
        assert_ne!(base, key("http", "a.test", "/x?a=1&b=2", Some("t2")));
        assert_ne!(base, key("http", "a.test", "/x?a=1&b=2", None));
        // Parts are framed: bytes moved from the path to the query make another key.
        assert_ne!(
            key("http", "a.test", "/x?y", None),
            key("http", "a.test", "/xy", None)
        );
        let stored = p.key("http", "a.test", None, &req("/x?b=2", None));
        assert_eq!(stored.primary_key_str(), Some("http://a.test/x"));
        // What the upstream is told of the host is part of the key; absent is not empty;
        // repeated parameters keep their order.
        let told = |host| {
            p.key("http", "a.test", host, &req("/x", None))
                .primary_bin()
        };
        assert_ne!(told(None), told(Some("evil.test")));
        assert_eq!(told(Some("Evil.test")), told(Some("evil.test")));
        assert_ne!(
            key("http", "a.test", "/x", Some("")),
            key("http", "a.test", "/x", None)
        );
        assert_ne!(
            key("http", "a.test", "/x?v=1&v=2", None),
            key("http", "a.test", "/x?v=2&v=1", None)
        );
        assert_eq!(
            purge_url("HTTP://A.test:8080/X?q=1").as_deref(),
            Some("http://a.test:8080/X")
        );
        assert_eq!(purge_url("a.test/x"), None);
    }

    #[test]
    fn age_expires_and_partial_answers() {
        let p = policy(None, &[]);
        // Already 100 s old, fresh for 60: stale on arrival, and nothing to revalidate with.
        let old = response(200, &[("cache-control", "max-age=60"), ("age", "100")]);
        assert_eq!(stored(&p, &old, false), None);
        let aged = response(200, &[("cache-control", "max-age=60"), ("age", "20")]);
        let RespCacheable::Cacheable(meta) = p.cacheable(&aged, false) else {
            panic!("stored");
        };
        let left = meta
            .fresh_until()
            .duration_since(std::time::SystemTime::now());
        let left = left.unwrap().as_secs();
        assert!((39..=40).contains(&left), "{left}");
        // Expires counts from Date, whatever the edge's clock says.
        let date = std::time::SystemTime::now() + Duration::from_secs(3000);
        let expires = date + Duration::from_secs(60);
        let skewed = response(
            200,
            &[
                ("date", &httpdate::fmt_http_date(date)),
                ("expires", &httpdate::fmt_http_date(expires)),
            ],
        );
        assert_eq!(stored(&p, &skewed, false), Some(60));
        // The answer's serve-stale windows, else the route's (stale_if_error: 300s here).
        let raw = RawRouteCache {
            enabled: None,
            default_ttl: None,
            key_headers: None,
            stale_while_revalidate: None,
            stale_if_error: Some(Dur(Duration::from_secs(300))),
            coalesce_uncacheable: None,
        };
        let windowed = CachePolicy::compile(&raw, "r", &mut Errors::default()).unwrap();
        let windows = |cc: &'static str| match windowed
            .cacheable(&response(200, &[("cache-control", cc)]), false)
        {
            RespCacheable::Cacheable(meta) => {
                Some((meta.stale_while_revalidate_sec(), meta.stale_if_error_sec()))
            }
            RespCacheable::Uncacheable(_) => None,
        };
        assert_eq!(windows("max-age=60"), Some((0, 300)));
        assert_eq!(
            windows("max-age=60, stale-while-revalidate=30, stale-if-error=10"),
            Some((30, 10))
        );
        assert_eq!(windows("max-age=60, must-revalidate"), Some((0, 0)));
        // Stale on arrival, but with a window to serve it stale in: kept.
        assert_eq!(
            windows("max-age=0, stale-while-revalidate=30"),
            Some((30, 300))
        );
        let partial = response(206, &[("cache-control", "max-age=60")]);
        assert_eq!(stored(&p, &partial, false), None);
        // Stale on arrival but with a validator: kept, to be revalidated.
        let tagged = response(200, &[("cache-control", "max-age=0"), ("etag", "\"v\"")]);
        assert!(matches!(
            p.cacheable(&tagged, false),
            RespCacheable::Cacheable(_)
        ));
    }

    #[test]
    fn an_age_that_is_not_one_number_makes_the_answer_stale() {
        let p = policy(None, &[]);
        let with_age = |ages: &[&'static str]| {
            let mut headers = vec![("cache-control", "max-age=3600")];
            headers.extend(ages.iter().map(|a| ("age", *a)));
            stored(&p, &response(200, &headers), false)
        };
        assert_eq!(with_age(&[]), Some(3600));
        assert_eq!(with_age(&["0"]), Some(3600));
        for bad in [
            &["abc"][..],
            &["-1"],
            &["1.5"],
            &["old, 0"],
            &["0", "0"],
            &["0, 0"],
            &["0;x=1"],
            &[""],
        ] {
            assert_eq!(with_age(bad), None, "{bad:?}");
        }
        assert_eq!(with_age(&["99999999999999999999999"]), None);
        // Even with a validator to keep it for: stale, never fresh.
        let huge = response(
            200,
            &[
                ("cache-control", "max-age=3600"),
                ("etag", "\"v\""),
                ("age", "99999999999999999999999"),
            ],
        );
        let RespCacheable::Cacheable(meta) = p.cacheable(&huge, false) else {
            panic!("kept, to be revalidated");
        };
        assert!(!meta.is_fresh(std::time::SystemTime::now()));
        // What is stored says no `Age` (hits say their own) and has a `Date`.
        let aged = response(200, &[("cache-control", "max-age=60"), ("age", "10")]);
        let RespCacheable::Cacheable(meta) = p.cacheable(&aged, false) else {
            panic!("stored");
        };
        assert!(!meta.headers().contains_key("age"));
        assert!(meta.headers().contains_key("date"));
    }

    #[test]
    fn surrogate_control_speaks_to_the_edge() {
        let p = policy(None, &[]);
        let answer = |headers: &[(&str, &str)]| stored(&p, &response(200, headers), false);
        assert_eq!(answer(&[("surrogate-control", "max-age=60")]), Some(60));
        assert_eq!(
            answer(&[
                ("surrogate-control", "MaX-aGe=60"),
                ("cache-control", "max-age=1")
            ]),
            Some(60)
        );
        // It replaces Cache-Control here, no-store included, but not private.
        assert_eq!(
            answer(&[
                ("surrogate-control", "max-age=60"),
                ("cache-control", "private")
            ]),
            None
        );
        let qualified = response(
            200,
            &[
                ("surrogate-control", "max-age=60"),
                ("cache-control", "private=\"x-account\""),
                ("x-account", "42"),
            ],
        );
        let RespCacheable::Cacheable(meta) = p.cacheable(&qualified, false) else {
            panic!("stored");
        };
        assert!(!meta.headers().contains_key("x-account"));
        assert_eq!(
            answer(&[
                ("surrogate-control", "max-age=60"),
                ("cache-control", "no-store")
            ]),
            Some(60)
        );
        assert_eq!(
            answer(&[
                ("surrogate-control", "no-store"),
                ("cache-control", "max-age=60")
            ]),
            None
        );
        assert_eq!(
            answer(&[
                ("surrogate-control", "max-age=60;kingdom-edge"),
                ("cache-control", "no-store")
            ]),
            Some(60)
        );
        // Aimed at this edge, it wins over what is for every surrogate.
        assert_eq!(
            answer(&[(
                "surrogate-control",
                "max-age=60 ;kingdom-edge, max-age=3600"
            )]),
            Some(60)
        );
        assert_eq!(
            answer(&[("surrogate-control", "no-store, max-age=60;kingdom-edge")]),
            Some(60)
        );
        // Not ours: aimed at another surrogate, or malformed.
        for other in ["max-age=60;cdn", "max-age =60", "max-age= 60", "max-age=x"] {
            assert_eq!(
                answer(&[("surrogate-control", other), ("cache-control", "max-age=5")]),
                Some(5),
                "{other}"
            );
        }
        assert_eq!(
            answer(&[("surrogate-control", "max-age=99999999999")]),
            Some(u64::from(u32::MAX))
        );
        // The edge still keeps no answer to an authorized request the origin did not share.
        let header = response(200, &[("surrogate-control", "max-age=60")]);
        assert_eq!(stored(&p, &header, true), None);
    }

    #[test]
    fn must_understand_needs_a_known_status() {
        let p = policy(None, &[]);
        let cc = "max-age=60, must-understand";
        assert_eq!(
            stored(&p, &response(599, &[("cache-control", cc)]), false),
            None
        );
        assert_eq!(
            stored(&p, &response(200, &[("cache-control", cc)]), false),
            Some(60)
        );
        assert_eq!(
            stored(
                &p,
                &response(599, &[("cache-control", "max-age=60")]),
                false
            ),
            Some(60)
        );
    }

    #[test]
    fn variance_follows_the_stored_vary() {
        let p = policy(None, &[]);
        let resp = response(
            200,
            &[("cache-control", "max-age=60"), ("vary", "Accept-Encoding")],
        );
        let RespCacheable::Cacheable(meta) = p.cacheable(&resp, false) else {
            panic!("stored");
        };
        let req = |encoding: Option<&str>| {
            let mut req = RequestHeader::build("GET", b"/", None).unwrap();
            if let Some(encoding) = encoding {
                req.insert_header("accept-encoding", encoding).unwrap();
            }
            req
        };
        let gzip = variance(&meta, &req(Some("gzip")));
        assert!(gzip.is_some());
        assert_eq!(gzip, variance(&meta, &req(Some("gzip"))));
        assert_ne!(gzip, variance(&meta, &req(Some("br"))));
        assert_ne!(gzip, variance(&meta, &req(None)));
        let plain = response(200, &[("cache-control", "max-age=60")]);
        let RespCacheable::Cacheable(meta) = p.cacheable(&plain, false) else {
            panic!("stored");
        };
        assert_eq!(variance(&meta, &req(Some("gzip"))), None);
    }
}
