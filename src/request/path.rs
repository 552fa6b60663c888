//! One normalized path for routing, every route policy and the upstream (RFC 3986 §6.2.2),
//! so the edge and the upstream can never disagree about which route a request is for.
//!
//! Escapes of unreserved characters are decoded (`/%6cimited` is `/limited`), the others are
//! uppercased (`%3a` is `%3A`), repeated slashes are merged when asked, and characters a path
//! may not hold raw are escaped. Refused: control characters, `%00`, a raw backslash, a `%`
//! that starts no escape, and `.` or `..` segments (also when spelled `%2e`, or hidden behind
//! a `;` parameter as in `/..;/admin`). `%2F` and `%5C` (an escaped slash or backslash) are
//! kept as they are and flagged: each route says what to do with them.

use std::borrow::Cow;

/// `routes[].escaped_slashes`: what a path holding `%2F` or `%5C` gets on that route.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum EscapedSlashes {
    /// 400 (the default): upstreams disagree on whether `%2F` separates segments.
    #[default]
    Reject,
    /// Forwarded as they are, for an API whose identifiers may contain slashes.
    Keep,
    /// Decoded to `/` (both), and the request routed again on the result, which must be the
    /// same route.
    Decode,
}

impl EscapedSlashes {
    /// Parses the config value.
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "reject" => Some(Self::Reject),
            "keep" => Some(Self::Keep),
            "decode" => Some(Self::Decode),
            _ => None,
        }
    }
}

/// A path that failed normalization: the reason, for the 400's message.
pub type Refusal = &'static str;

/// Normalizes `raw`, an origin-form path (without its query). `None` means it is already
/// normal, the common case, with nothing allocated.
pub fn normalize(raw: &str, merge_slashes: bool) -> Result<Option<String>, Refusal> {
    if !raw.starts_with('/') {
        return Err("the request target must start with `/`");
    }
    if is_normal(raw.as_bytes(), merge_slashes) {
        check_segments(raw)?;
        return Ok(None);
    }
    let bytes = raw.as_bytes();
    let mut out = String::with_capacity(raw.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        match b {
            b'%' => {
                let value = bytes
                    .get(i + 1..i + 3)
                    .and_then(|hex| Some(hex_value(hex[0])? << 4 | hex_value(hex[1])?))
                    .ok_or("a `%` in the path starts no escape")?;
                match value {
                    0 => return Err("the path contains an escaped NUL (`%00`)"),
                    v if is_unreserved(v) => out.push(char::from(v)),
                    v => push_escape(&mut out, v),
                }
                i += 3;
                continue;
            }
            b'/' if merge_slashes && out.ends_with('/') => {}
            b'\\' => return Err("the path contains a backslash"),
            0..=0x1f | 0x7f => return Err("the path contains a control character"),
            b if is_path_char(b) => out.push(char::from(b)),
            b => push_escape(&mut out, b),
        }
        i += 1;
    }
    check_segments(&out)?;
    Ok(Some(out))
}

/// Whether a normalized path holds an escaped slash or backslash.
pub fn has_escaped_slashes(path: &str) -> bool {
    path.contains("%2F") || path.contains("%5C")
}

/// `%2F` and `%5C` of a normalized path decoded to `/`, then normalized again.
pub fn decode_slashes(path: &str, merge_slashes: bool) -> Result<String, Refusal> {
    let decoded = path.replace("%2F", "/").replace("%5C", "/");
    Ok(normalize(&decoded, merge_slashes)?.unwrap_or(decoded))
}

/// The path routes match: each segment without its `;` parameters (`/a;v=1/b` is `/a/b`),
/// and without the empty segments that leaves or that the client sent (`/;/a//b` is `/a/b`),
/// as servlet containers read it.
pub fn for_matching(path: &str) -> Cow<'_, str> {
    if !path.contains(';') && !path.contains("//") {
        return Cow::Borrowed(path);
    }
    let mut out = String::with_capacity(path.len());
    for name in path.split('/').map(|s| s.split(';').next().unwrap_or("")) {
        if !name.is_empty() {
            out.push('/');
            out.push_str(name);
        }
    }
    if out.is_empty() || path.ends_with('/') {
        out.push('/');
    }
    Cow::Owned(out)
}

/// Checks the query of a request target: no escaped NUL. (A `%` that starts no escape is
/// left alone, as browsers send it; control characters never get this far: the URI parser
/// refuses them.)
pub fn check_query(query: &str) -> Result<(), Refusal> {
    let bytes = query.as_bytes();
    if bytes.windows(3).any(|w| w == b"%00") {
        return Err("the query contains an escaped NUL (`%00`)");
    }
    if bytes.iter().any(|b| matches!(b, 0..=0x1f | 0x7f)) {
        return Err("the query contains a control character");
    }
    Ok(())
}

/// Already normal: no escapes, no characters to escape or refuse, no repeated slashes.
fn is_normal(bytes: &[u8], merge_slashes: bool) -> bool {
    bytes.iter().all(|&b| b != b'%' && is_path_char(b))
        && !(merge_slashes && bytes.windows(2).any(|w| w == b"//"))
}

/// Refuses `.` and `..` segments, with or without `;` parameters.
fn check_segments(path: &str) -> Result<(), Refusal> {
    if !path.contains('.') {
        return Ok(());
    }
    let dot = path
        .split('/')
        .map(|segment| segment.split(';').next().unwrap_or(""))
        .any(|name| name == "." || name == "..");
    match dot {
        true => Err("the path contains `.` or `..` segments"),
        false => Ok(()),
    }
}

fn push_escape(out: &mut String, byte: u8) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    out.push('%');
    out.push(char::from(HEX[usize::from(byte >> 4)]));
    out.push(char::from(HEX[usize::from(byte & 0xf)]));
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// RFC 3986 `unreserved`.
pub(super) fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// RFC 3986 `sub-delims`.
pub(super) fn is_sub_delim(b: u8) -> bool {
    b"!$&'()*+,;=".contains(&b)
}

/// What a path may hold raw: `pchar` (unreserved, sub-delims, `:`, `@`) and `/`.
fn is_path_char(b: u8) -> bool {
    is_unreserved(b) || is_sub_delim(b) || matches!(b, b':' | b'@' | b'/')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn normal(raw: &str) -> Result<String, Refusal> {
        Ok(normalize(raw, true)?.unwrap_or_else(|| raw.to_string()))
    }

    #[test]
    fn spellings_of_one_path_normalize_alike() {
        for (raw, expected) in [
            ("/limited/x", "/limited/x"),
            ("/%6cimited/x", "/limited/x"),
            ("/%6C%69mited/x", "/limited/x"),
            ("//limited///x", "/limited/x"),
            ("/a%7eb", "/a~b"),
            ("/a%3ab", "/a%3Ab"),
            ("/a%3Ab", "/a%3Ab"),
            ("/a%20b", "/a%20b"),
            ("/a\"b", "/a%22b"),
            ("/caf\u{e9}", "/caf%C3%A9"),
            ("/a;v=1/b", "/a;v=1/b"),
            ("/a%2fb", "/a%2Fb"),
            ("/a%5cb", "/a%5Cb"),
            ("/", "/"),
            ("/.well-known/x", "/.well-known/x"),
            ("/a..b/...", "/a..b/..."),
        ] {
            assert_eq!(normal(raw), Ok(expected.to_string()), "{raw}");
        }
        assert_eq!(normalize("/limited/x", true), Ok(None), "nothing to do");
        assert_eq!(normalize("//a", false), Ok(None), "merging off");
    }

    #[test]
    fn unsafe_paths_are_refused() {
        for raw in [
            "a",
            "",
            "/a/../b",
            "/a/./b",
            "/a/%2e%2e/b",
            "/a/%2E/b",
            "/a/.%2e",
            "/public/..;/admin",
            "/..",
            "/a%00b",
            "/a%zz",
            "/a%4",
            "/a\\b",
            "/a\u{1}b",
            "/a\u{7f}",
        ] {
            assert!(normal(raw).is_err(), "{raw:?} was accepted");
        }
    }

    #[test]
    fn matching_ignores_path_parameters() {
        assert_eq!(for_matching("/limited;x=1/a"), "/limited/a");
        assert_eq!(for_matching("/limited;/a;b;c"), "/limited/a");
        assert_eq!(for_matching("/;/limited/x"), "/limited/x");
        assert_eq!(for_matching("/;x=1/;/limited"), "/limited");
        assert_eq!(for_matching("//limited//x/"), "/limited/x/");
        assert_eq!(for_matching("/;"), "/");
        assert!(matches!(for_matching("/plain"), Cow::Borrowed("/plain")));
    }

    #[test]
    fn escaped_slashes_are_flagged_and_decodable() {
        assert!(has_escaped_slashes("/a%2Fb"));
        assert!(has_escaped_slashes("/a%5Cb"));
        assert!(!has_escaped_slashes("/a%252Fb"), "an escaped `%` is data");
        assert_eq!(decode_slashes("/a%2Fb%5Cc", true), Ok("/a/b/c".to_string()));
        assert_eq!(decode_slashes("/a%2F%2Fb", true), Ok("/a/b".to_string()));
        assert!(decode_slashes("/a%2F..%2Fb", true).is_err());
        assert_eq!(EscapedSlashes::parse("keep"), Some(EscapedSlashes::Keep));
        assert_eq!(EscapedSlashes::parse("Keep"), None);
    }

    #[test]
    fn queries_refuse_nul_and_broken_escapes() {
        assert!(check_query("q=1&r=%20").is_ok());
        assert!(check_query("q=%00").is_err());
        assert!(check_query("q=100%").is_ok(), "browsers send a raw `%`");
    }
}
