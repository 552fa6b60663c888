//! The request's host (RFC 9110 §7.2, RFC 3986 §3.2.2): a reg-name, an IPv4 address or a
//! bracketed IPv6 literal, with an optional port 1–65535. Anything else is refused, so a
//! value like `evil.example/x` or `a<script>` never reaches routing, logs or an upstream.

use super::path::{self, Refusal};

/// Checks `value` (a `Host` header or an `:authority`). Returns it without its port, for
/// routing.
pub fn validate(value: &str) -> Result<&str, Refusal> {
    let (name, port) = split_port(value)?;
    if let Some(port) = port {
        // RFC 3986 allows an empty port (`host:`): the scheme's default.
        let valid = port.is_empty()
            || (port.len() <= 5
                && port.bytes().all(|b| b.is_ascii_digit())
                && port.parse::<u32>().is_ok_and(|p| (1..=65_535).contains(&p)));
        if !valid {
            return Err("the Host port must be a number from 1 to 65535");
        }
    }
    let valid = match name.strip_prefix('[') {
        Some(literal) => literal
            .strip_suffix(']')
            .is_some_and(|ip| ip.parse::<std::net::Ipv6Addr>().is_ok()),
        None => !name.is_empty() && name.len() <= 253 && name.bytes().all(is_reg_name_char),
    };
    match valid {
        true => Ok(name),
        false => Err("the Host header is not a valid host name or address"),
    }
}

/// `host[:port]` or `[v6][:port]`.
fn split_port(value: &str) -> Result<(&str, Option<&str>), Refusal> {
    if value.starts_with('[') {
        let end = value
            .find(']')
            .ok_or("the Host IPv6 literal is not closed")?;
        return match &value[end + 1..] {
            "" => Ok((value, None)),
            rest => match rest.strip_prefix(':') {
                Some(port) => Ok((&value[..=end], Some(port))),
                None => Err("the Host header is not a valid host name or address"),
            },
        };
    }
    Ok(match value.split_once(':') {
        Some((name, port)) => (name, Some(port)),
        None => (value, None),
    })
}

/// RFC 3986 `reg-name` characters: unreserved and sub-delims. Escapes are refused: no
/// client needs them in a host name, and they would let one name have many spellings.
fn is_reg_name_char(b: u8) -> bool {
    path::is_unreserved(b) || path::is_sub_delim(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_hosts_are_returned_without_their_port() {
        for (value, name) in [
            ("example.com", "example.com"),
            ("Example.COM:8080", "Example.COM"),
            ("127.0.0.1", "127.0.0.1"),
            ("127.0.0.1:1", "127.0.0.1"),
            ("[::1]", "[::1]"),
            ("[2001:db8::1]:65535", "[2001:db8::1]"),
            ("under_score", "under_score"),
            ("a.example:", "a.example"),
        ] {
            assert_eq!(validate(value), Ok(name), "{value}");
        }
    }

    #[test]
    fn invalid_hosts_are_refused() {
        for value in [
            "",
            "a b/c",
            "evil.example/x",
            "a<script>",
            "h:99999",
            "h:0",
            "h:8a",
            "a:1:2",
            "[::1",
            "[::1]x",
            "[zz]",
            "a%2eb",
            "a@b",
            "a\u{1}",
        ] {
            assert!(validate(value).is_err(), "{value:?} was accepted");
        }
    }
}
