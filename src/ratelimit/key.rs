//! Whose budget a request spends: the key of a rate limit or slow-down. A request without
//! the key's value (no such header, cookie or token) spends its client address's budget,
//! so leaving a header out never exempts anyone.

use std::hash::{BuildHasher, Hasher};
use std::net::IpAddr;
use std::sync::OnceLock;

use http::HeaderName;
use pingora::http::RequestHeader;

use crate::config::Errors;

/// What a limit is counted by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    /// The client address (`X-Forwarded-For` only from `server.trusted_proxies`), IPv6
    /// addresses grouped by their first `ipv6_prefix` bits.
    ClientIp,
    /// A request header's value.
    Header(HeaderName),
    /// A cookie's value.
    Cookie(String),
    /// The subject of the request's verified bearer token.
    User,
    /// One budget for the whole route.
    Route,
}

/// What a request offers to be keyed by.
pub struct Request<'a> {
    /// The client address, after `trusted_proxies`.
    pub client: Option<IpAddr>,
    /// The request header.
    pub header: &'a RequestHeader,
    /// The verified token subject.
    pub user: Option<&'a str>,
    /// The route's name.
    pub route: &'a str,
}

impl KeySource {
    /// Compiles `key:` at YAML path `path`: `client_ip`, `header:NAME`, `cookie:NAME`,
    /// `user` or `route`.
    pub fn compile(text: &str, path: &str, errors: &mut Errors) -> Option<Self> {
        let source = match text.split_once(':') {
            None => match text {
                "client_ip" => KeySource::ClientIp,
                "user" => KeySource::User,
                "route" => KeySource::Route,
                _ => return unknown(text, path, errors),
            },
            Some(("header", name)) => match HeaderName::from_bytes(name.trim().as_bytes()) {
                Ok(name) => KeySource::Header(name),
                Err(_) => {
                    errors.push(path, format!("`{name}` is not a header name"));
                    return None;
                }
            },
            Some(("cookie", name)) if !name.trim().is_empty() => {
                KeySource::Cookie(name.trim().to_string())
            }
            _ => return unknown(text, path, errors),
        };
        Some(source)
    }

    /// The key hash of `req` with this source; the client address when the source has
    /// nothing for it. `ipv6_prefix` groups IPv6 clients.
    pub fn key(&self, req: &Request<'_>, ipv6_prefix: u8) -> u64 {
        let value: Option<&[u8]> = match self {
            KeySource::ClientIp => None,
            KeySource::Header(name) => req.header.headers.get(name).map(|v| v.as_bytes()),
            KeySource::Cookie(name) => crate::request::cookie(req.header, name).map(str::as_bytes),
            KeySource::User => req.user.map(str::as_bytes),
            KeySource::Route => Some(req.route.as_bytes()),
        };
        // An empty value is no value: it must not pool everyone who sends one.
        let value = value.map(<[u8]>::trim_ascii).filter(|v| !v.is_empty());
        match value {
            // Tagged, so a header value can never collide with an address.
            Some(value) => hash(b'v', value),
            None => match req.client {
                Some(ip) => hash(b'i', &group(ip, ipv6_prefix)),
                None => hash(b'-', b""),
            },
        }
    }
}

fn unknown<T>(text: &str, path: &str, errors: &mut Errors) -> Option<T> {
    errors.push(
        path,
        format!("`{text}` is not a key: client_ip, user, route, header:NAME or cookie:NAME"),
    );
    None
}

/// An address as its group's bytes: IPv4 whole (IPv4-mapped IPv6 too), IPv6 cut to its
/// first `prefix` bits.
pub fn group(ip: IpAddr, prefix: u8) -> Vec<u8> {
    match ip.to_canonical() {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => {
            let bits = u128::from(v6);
            let kept = match prefix.min(128) {
                0 => 0,
                p => bits & (u128::MAX << (128 - u32::from(p))),
            };
            kept.to_be_bytes().to_vec()
        }
    }
}

/// A keyed 64-bit hash, its key random per process, so clients cannot aim collisions.
fn hash(tag: u8, value: &[u8]) -> u64 {
    static KEYS: OnceLock<std::collections::hash_map::RandomState> = OnceLock::new();
    let mut hasher = KEYS.get_or_init(Default::default).build_hasher();
    hasher.write_u8(tag);
    hasher.write(value);
    hasher.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(headers: &[(&str, &str)]) -> RequestHeader {
        let mut req = RequestHeader::build("GET", b"/", None).unwrap();
        for (name, value) in headers {
            req.append_header(name.to_string(), *value).unwrap();
        }
        req
    }

    fn key(source: &str, req: &RequestHeader, client: &str, user: Option<&str>) -> u64 {
        let source = KeySource::compile(source, "k", &mut Errors::default()).unwrap();
        let req = Request {
            client: Some(client.parse().unwrap()),
            header: req,
            user,
            route: "api",
        };
        source.key(&req, 64)
    }

    #[test]
    fn keys_fall_back_to_the_client_address_and_group_ipv6_by_prefix() {
        let bare = request(&[]);
        let with = request(&[("x-api-key", "k1"), ("cookie", "a=1; session=s1")]);
        let ip = key("client_ip", &bare, "203.0.113.7", None);
        assert_eq!(
            key("header:x-api-key", &bare, "203.0.113.7", None),
            ip,
            "no header: the address"
        );
        assert_ne!(key("header:x-api-key", &with, "203.0.113.7", None), ip);
        assert_eq!(
            key("header:x-api-key", &with, "203.0.113.7", None),
            key("header:x-api-key", &with, "198.51.100.1", None),
            "the header, wherever it comes from"
        );
        assert_ne!(key("cookie:session", &with, "203.0.113.7", None), ip);
        let empty = request(&[("x-api-key", " "), ("cookie", "session=")]);
        for source in ["header:x-api-key", "cookie:session"] {
            assert_eq!(
                key(source, &empty, "203.0.113.7", None),
                ip,
                "an empty {source}: the address"
            );
        }
        assert_eq!(
            key("user", &bare, "203.0.113.7", None),
            ip,
            "no token: the address"
        );
        assert_ne!(key("user", &bare, "203.0.113.7", Some("ada")), ip);
        assert_eq!(
            key("client_ip", &bare, "2001:db8:1:2:aaaa::1", None),
            key("client_ip", &bare, "2001:db8:1:2:bbbb::9", None),
            "one /64"
        );
        assert_ne!(
            key("client_ip", &bare, "2001:db8:1:2::1", None),
            key("client_ip", &bare, "2001:db8:1:3::1", None)
        );
        // IPv4 through a dual-stack listener: its own address, not all of ::ffff:0:0/64.
        assert_eq!(key("client_ip", &bare, "::ffff:203.0.113.7", None), ip);
        assert_ne!(
            key("client_ip", &bare, "::ffff:203.0.113.8", None),
            ip,
            "one budget per IPv4 address"
        );
        assert_eq!(
            key("route", &bare, "203.0.113.7", None),
            key("route", &bare, "198.51.100.1", None)
        );
        let mut errors = Errors::default();
        assert!(KeySource::compile("ip", "k", &mut errors).is_none());
        assert!(KeySource::compile("header:bad name", "k", &mut errors).is_none());
        assert_eq!(errors.len(), 2);
    }
}
