//! Bearer tokens: claims signed with HMAC-SHA256, issued by kingdom-api and verified by
//! kingdom-api and by the edge. One format in one module, so issuer and verifiers can never
//! drift apart.
//!
//! A token is `base64url(claims JSON) . base64url(HMAC-SHA256(key, first part))`. It names no
//! algorithm: the verifier's key alone decides, so the `alg` confusions of JWT (`none`, or a
//! public key used as an HMAC secret) cannot happen by construction. Time is passed in.

use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use ring::hmac;
use serde::{Deserialize, Serialize};

use crate::config::raw::RawTokens;
use crate::config::{Env, Errors};

/// Shortest secret accepted, in bytes.
pub const MIN_SECRET: usize = 16;

/// Clock skew allowed between issuer and verifier unless `tokens.clock_skew` says otherwise.
pub const DEFAULT_SKEW: Duration = Duration::from_secs(30);

/// Signs and verifies tokens with one secret.
pub struct TokenKey(hmac::Key);

/// What a token asserts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// The user id.
    pub sub: String,
    /// Issued at, Unix seconds.
    pub iat: u64,
    /// Expires at, Unix seconds.
    pub exp: u64,
}

/// Why a token was not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Invalid {
    /// Not two base64url parts, or no claims in the first.
    Malformed,
    /// The MAC does not match: forged, tampered, or signed with another secret.
    BadSignature,
    /// Expired (beyond the allowed skew).
    Expired,
    /// Issued in the future (beyond the allowed skew).
    NotYetValid,
}

impl TokenKey {
    /// A key from `secret` (at least [`MIN_SECRET`] bytes).
    pub fn new(secret: &[u8]) -> Result<Self, String> {
        if secret.len() < MIN_SECRET {
            return Err(format!(
                "the token secret must be at least {MIN_SECRET} bytes"
            ));
        }
        Ok(Self(hmac::Key::new(hmac::HMAC_SHA256, secret)))
    }

    /// The token for `claims`.
    pub fn sign(&self, claims: &Claims) -> String {
        let payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(claims).unwrap_or_default());
        let tag = hmac::sign(&self.0, payload.as_bytes());
        format!("{payload}.{}", URL_SAFE_NO_PAD.encode(tag.as_ref()))
    }

    /// The claims of a well-signed token valid at `now` (Unix seconds), give or take `skew`
    /// seconds. The signature is checked (in constant time) before the claims are read.
    pub fn verify(&self, token: &str, now: u64, skew: u64) -> Result<Claims, Invalid> {
        let (payload, tag) = token.split_once('.').ok_or(Invalid::Malformed)?;
        let tag = URL_SAFE_NO_PAD
            .decode(tag)
            .map_err(|_| Invalid::Malformed)?;
        hmac::verify(&self.0, payload.as_bytes(), &tag).map_err(|_| Invalid::BadSignature)?;
        let json = URL_SAFE_NO_PAD
            .decode(payload)
            .map_err(|_| Invalid::Malformed)?;
        let claims: Claims = serde_json::from_slice(&json).map_err(|_| Invalid::Malformed)?;
        if claims.exp.saturating_add(skew) <= now {
            return Err(Invalid::Expired);
        }
        if claims.iat > now.saturating_add(skew) {
            return Err(Invalid::NotYetValid);
        }
        Ok(claims)
    }
}

/// `routes[].auth`: whether a route verifies bearer tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Auth {
    /// No request passes without a valid token (401).
    Required,
    /// A token is verified when present (a bad one is refused with 401); none is fine.
    Optional,
}

/// How the edge verifies tokens: `tokens:` compiled.
pub struct TokenVerifier {
    key: TokenKey,
    /// Seconds of clock difference allowed with the issuer.
    pub skew: u64,
}

impl TokenVerifier {
    /// The claims of `token` at `now`.
    pub fn verify(&self, token: &str, now: u64) -> Result<Claims, Invalid> {
        self.key.verify(token, now, self.skew)
    }
}

/// Compiles `tokens:` (at YAML path `path`), reading `secret_env` through `env`.
pub fn compile(
    raw: &RawTokens,
    path: &str,
    env: Env,
    errors: &mut Errors,
) -> Option<TokenVerifier> {
    let secret = match (&raw.secret, &raw.secret_env) {
        (Some(_), Some(_)) => {
            errors.push(
                format!("{path}.secret"),
                "give `secret` or `secret_env`, not both",
            );
            return None;
        }
        (Some(secret), None) => secret.clone(),
        (None, Some(var)) => match env(var) {
            Some(secret) => secret,
            None => {
                errors.push(
                    format!("{path}.secret_env"),
                    format!("environment variable `{var}` is not set"),
                );
                return None;
            }
        },
        (None, None) => {
            errors.push(
                path,
                "needs `secret_env` (or `secret`): the secret kingdom-api signs its tokens with",
            );
            return None;
        }
    };
    let key_name = if raw.secret.is_some() {
        "secret"
    } else {
        "secret_env"
    };
    let key = match TokenKey::new(secret.as_bytes()) {
        Ok(key) => key,
        Err(why) => {
            errors.push(format!("{path}.{key_name}"), why);
            return None;
        }
    };
    let skew = raw.clock_skew.map_or(DEFAULT_SKEW, |d| d.0);
    if skew > Duration::from_secs(600) {
        errors.push(
            format!("{path}.clock_skew"),
            format!("must be at most 10m (got {skew:?})"),
        );
    }
    Some(TokenVerifier {
        key,
        skew: skew.as_secs(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_800_000_000;

    fn key() -> TokenKey {
        TokenKey::new(b"a-token-secret-for-tests").unwrap()
    }

    fn claims(iat: u64, exp: u64) -> Claims {
        Claims {
            sub: "ada".into(),
            iat,
            exp,
        }
    }

    #[test]
    fn a_signed_token_verifies_within_its_lifetime_and_the_skew() {
        let token = key().sign(&claims(NOW - 10, NOW + 60));
        assert_eq!(key().verify(&token, NOW, 0).unwrap().sub, "ada");
        assert_eq!(key().verify(&token, NOW + 60, 0), Err(Invalid::Expired));
        assert!(
            key().verify(&token, NOW + 60, 30).is_ok(),
            "within the skew"
        );
        assert_eq!(key().verify(&token, NOW + 90, 30), Err(Invalid::Expired));
        let early = key().sign(&claims(NOW + 100, NOW + 200));
        assert_eq!(key().verify(&early, NOW, 30), Err(Invalid::NotYetValid));
        assert!(key().verify(&early, NOW + 70, 30).is_ok());
    }

    #[test]
    fn forged_tampered_and_malformed_tokens_are_refused() {
        let token = key().sign(&claims(NOW, NOW + 60));
        let other = TokenKey::new(b"some-other-secret-entirely").unwrap();
        assert_eq!(other.verify(&token, NOW, 0), Err(Invalid::BadSignature));
        // Another user's claims under the original signature.
        let (_, tag) = token.split_once('.').unwrap();
        let forged = format!(
            "{}.{tag}",
            URL_SAFE_NO_PAD.encode(br#"{"sub":"root","iat":0,"exp":9999999999}"#)
        );
        assert_eq!(key().verify(&forged, NOW, 0), Err(Invalid::BadSignature));
        for bad in ["", ".", "abc", "a.b.c", "!!!.???"] {
            assert!(key().verify(bad, NOW, 0).is_err(), "{bad:?}");
        }
        // A JWT-style `alg: none` token has nothing to offer: there is no algorithm field.
        let none = format!(
            "{}.",
            URL_SAFE_NO_PAD.encode(br#"{"sub":"root","iat":0,"exp":9999999999}"#)
        );
        assert_eq!(key().verify(&none, NOW, 0), Err(Invalid::BadSignature));
        assert!(TokenKey::new(b"short").is_err());
    }
}
