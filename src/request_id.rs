//! `x-request-id`: keep a sane incoming one so traces join up across hops, else make one.

/// Longest incoming id we keep.
pub const MAX_LEN: usize = 128;

/// The id for this request: the client's if it is 1..=128 characters of `[A-Za-z0-9._:-]`,
/// otherwise a fresh random one.
pub fn choose(incoming: Option<&[u8]>) -> String {
    match incoming {
        Some(id) if is_sane(id) => String::from_utf8_lossy(id).into_owned(),
        _ => generate(),
    }
}

fn is_sane(id: &[u8]) -> bool {
    (1..=MAX_LEN).contains(&id.len())
        && id
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
}

/// 32 lower-case hex digits from a 128-bit random number.
pub fn generate() -> String {
    format!("{:032x}", fastrand::u128(..))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_sane_ids_and_replaces_others() {
        assert_eq!(choose(Some(b"abc-123_x.y:z")), "abc-123_x.y:z");
        for bad in [&b""[..], b"has space", b"quote\"", &[b'a'; 129], b"\xff"] {
            let id = choose(Some(bad));
            assert_eq!(id.len(), 32, "{bad:?}");
            assert!(id.bytes().all(|b| b.is_ascii_hexdigit()));
        }
        assert_ne!(choose(None), choose(None));
    }
}
