//! Sticky sessions: a signed cookie names the backend a client is pinned to.
//!
//! The value is `base64url(backend) . expiry . base64url(HMAC-SHA256)`, the MAC covering the
//! cookie name, backend and expiry. Any instance with the same secret accepts it, across
//! restarts. The expiry slides, but without a `Set-Cookie` on every response: a fresh cookie
//! is sent when the pin changes or when less than half of its `ttl` is left.

use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use ring::hmac;

use crate::config::raw::{RawSameSite, RawSticky};
use crate::config::{Env, Errors};

/// Shortest accepted secret.
pub const MIN_SECRET: usize = 16;

/// Compiles `pools.<name>.sticky` (at YAML path `path`), reading `secret_env` through `env`;
/// `None` when it has errors.
pub fn compile(raw: &RawSticky, path: &str, env: Env, errors: &mut Errors) -> Option<StickyPolicy> {
    let valid_name = !raw.cookie.is_empty()
        && raw
            .cookie
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
    if !valid_name {
        errors.push(
            format!("{path}.cookie"),
            format!("`{}` is not a cookie name (A-Z a-z 0-9 _ - .)", raw.cookie),
        );
    }
    let ttl = raw.ttl.map_or(Duration::from_secs(1800), |d| d.0);
    if ttl < Duration::from_secs(1) {
        errors.push(format!("{path}.ttl"), "must be at least 1s");
    }
    let secret = match (&raw.secret, &raw.secret_env) {
        (Some(_), Some(_)) => {
            errors.push(
                format!("{path}.secret"),
                "give `secret` or `secret_env`, not both",
            );
            None
        }
        (Some(secret), None) => Some(secret.clone()),
        (None, Some(var)) => {
            let value = env(var);
            if value.is_none() {
                errors.push(
                    format!("{path}.secret_env"),
                    format!("environment variable `{var}` is not set"),
                );
            }
            value
        }
        (None, None) => {
            errors.push(path, "needs `secret_env` (or `secret`) to sign its cookies");
            None
        }
    };
    if let Some(secret) = &secret {
        if secret.len() < MIN_SECRET {
            let key = if raw.secret.is_some() {
                "secret"
            } else {
                "secret_env"
            };
            errors.push(
                format!("{path}.{key}"),
                format!("the secret must be at least {MIN_SECRET} bytes"),
            );
        }
    }
    let same_site = match raw.same_site {
        None | Some(RawSameSite::Lax) => SameSite::Lax,
        Some(RawSameSite::Strict) => SameSite::Strict,
        Some(RawSameSite::None) => SameSite::None,
    };
    let secret = secret.filter(|s| s.len() >= MIN_SECRET && valid_name)?;
    Some(StickyPolicy::new(
        raw.cookie.clone(),
        ttl,
        same_site,
        raw.strict.unwrap_or(false),
        secret.as_bytes(),
    ))
}

/// `SameSite` attribute of the cookie.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SameSite {
    /// `SameSite=Lax` (the default).
    Lax,
    /// `SameSite=Strict`.
    Strict,
    /// `SameSite=None` (browsers then require `Secure`).
    None,
}

/// `pools.*.sticky`, compiled.
pub struct StickyPolicy {
    /// Cookie name.
    pub cookie: String,
    /// Session timeout, refreshed on use.
    pub ttl: Duration,
    /// `SameSite` attribute.
    pub same_site: SameSite,
    /// When the pinned backend is unusable: `true` answers 503, `false` re-pins.
    pub strict: bool,
    key: hmac::Key,
}

/// Why a cookie was not accepted (a label of `kingdom_edge_sticky_invalid_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Invalid {
    /// Not in the expected shape.
    Malformed,
    /// The MAC does not match: forged or tampered.
    BadSignature,
    /// Past its expiry.
    Expired,
}

impl Invalid {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Invalid::Malformed => "malformed",
            Invalid::BadSignature => "bad_signature",
            Invalid::Expired => "expired",
        }
    }
}

impl StickyPolicy {
    /// A policy signing with `secret`.
    pub fn new(
        cookie: String,
        ttl: Duration,
        same_site: SameSite,
        strict: bool,
        secret: &[u8],
    ) -> Self {
        Self {
            cookie,
            ttl,
            same_site,
            strict,
            key: hmac::Key::new(hmac::HMAC_SHA256, secret),
        }
    }

    fn mac(&self, backend: &str, expires: u64) -> hmac::Tag {
        let message = format!("{}\n{backend}\n{expires}", self.cookie);
        hmac::sign(&self.key, message.as_bytes())
    }

    /// The cookie value pinning `backend` until `now + ttl` (Unix seconds).
    pub fn encode(&self, backend: &str, now: u64) -> String {
        let expires = now + self.ttl.as_secs();
        format!(
            "{}.{expires}.{}",
            URL_SAFE_NO_PAD.encode(backend),
            URL_SAFE_NO_PAD.encode(self.mac(backend, expires).as_ref())
        )
    }

    /// Whether a cookie expiring at `expires` should be renewed at `now`: less than half of
    /// the ttl is left.
    pub fn needs_refresh(&self, expires: u64, now: u64) -> bool {
        expires.saturating_sub(now) < self.ttl.as_secs() / 2
    }

    /// The backend a cookie value names and when the cookie expires, if it is authentic and
    /// unexpired at `now`.
    pub fn decode(&self, value: &str, now: u64) -> Result<(String, u64), Invalid> {
        let mut parts = value.split('.');
        let (Some(backend), Some(expires), Some(tag), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(Invalid::Malformed);
        };
        let backend = URL_SAFE_NO_PAD
            .decode(backend)
            .ok()
            .and_then(|b| String::from_utf8(b).ok())
            .ok_or(Invalid::Malformed)?;
        let expires: u64 = expires.parse().map_err(|_| Invalid::Malformed)?;
        let tag = URL_SAFE_NO_PAD
            .decode(tag)
            .map_err(|_| Invalid::Malformed)?;
        let message = format!("{}\n{backend}\n{expires}", self.cookie);
        hmac::verify(&self.key, message.as_bytes(), &tag).map_err(|_| Invalid::BadSignature)?;
        if expires <= now {
            return Err(Invalid::Expired);
        }
        Ok((backend, expires))
    }

    /// The `Set-Cookie` header value for `value`; `Secure` on TLS listeners.
    pub fn set_cookie(&self, value: &str, secure: bool) -> String {
        let same_site = match self.same_site {
            SameSite::Lax => "Lax",
            SameSite::Strict => "Strict",
            SameSite::None => "None",
        };
        format!(
            "{}={value}; Path=/; Max-Age={}; HttpOnly; SameSite={same_site}{}",
            self.cookie,
            self.ttl.as_secs(),
            if secure { "; Secure" } else { "" }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(secret: &[u8]) -> StickyPolicy {
        StickyPolicy::new(
            "kd".into(),
            Duration::from_secs(1800),
            SameSite::Lax,
            false,
            secret,
        )
    }

    #[test]
    fn round_trips_and_rejects_tampering() {
        let p = policy(b"secret-one-secret-one");
        let now = 1_700_000_000;
        let value = p.encode("127.0.0.1:9101", now);
        assert_eq!(
            p.decode(&value, now + 10),
            Ok(("127.0.0.1:9101".to_string(), now + 1800))
        );
        assert!(!p.needs_refresh(now + 1800, now + 10));
        assert!(
            p.needs_refresh(now + 1800, now + 901),
            "less than half the ttl left"
        );
        // Another instance with the same secret agrees.
        assert!(policy(b"secret-one-secret-one").decode(&value, now).is_ok());

        let (backend, rest) = value.split_once('.').unwrap();
        let other = URL_SAFE_NO_PAD.encode("127.0.0.1:9102");
        let cases = [
            (format!("{other}.{rest}"), Invalid::BadSignature),
            (
                value.replace(&format!(".{}.", now + 1800), &format!(".{}.", now + 99_999)),
                Invalid::BadSignature,
            ),
            (
                format!("{backend}.{}.AAAA", now + 1800),
                Invalid::BadSignature,
            ),
            ("garbage".to_string(), Invalid::Malformed),
            ("a.b.c.d".to_string(), Invalid::Malformed),
            (
                format!("{backend}.soon.{}", rest.split_once('.').unwrap().1),
                Invalid::Malformed,
            ),
        ];
        for (bad, why) in cases {
            assert_eq!(p.decode(&bad, now), Err(why), "{bad}");
        }
        assert_eq!(
            policy(b"another-secret-entirely").decode(&value, now),
            Err(Invalid::BadSignature)
        );
        assert_eq!(p.decode(&value, now + 1800), Err(Invalid::Expired));
    }

    #[test]
    fn cookie_attributes() {
        let p = policy(b"secret-one-secret-one");
        assert_eq!(
            p.set_cookie("v", false),
            "kd=v; Path=/; Max-Age=1800; HttpOnly; SameSite=Lax"
        );
        assert!(p.set_cookie("v", true).ends_with("; Secure"));
    }
}
