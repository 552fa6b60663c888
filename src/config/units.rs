//! Duration (`250ms`, `2s`, `15m`, `1h`) and size (`64KiB`, `256MiB`) values as written in YAML.

use std::fmt;
use std::time::Duration;

use serde::{de, Deserialize, Deserializer};

/// A duration written as an integer followed by `ms`, `s`, `m` or `h`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dur(pub Duration);

/// A byte size written as an integer followed by `B`, `KiB`, `MiB` or `GiB`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Size(pub u64);

/// Longest duration accepted anywhere (a year): every deadline computed from a config value
/// stays far from `Instant`'s and `u64`'s limits.
pub const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);

/// Parses `250ms`, `2s`, `15m`, `1h`, up to [`MAX_DURATION`]. Bare numbers are refused: a unit
/// is always required.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("`{text}` needs a unit: ms, s, m or h (e.g. 250ms, 2s)"))?;
    let (digits, unit) = text.split_at(split);
    let value: u64 = digits
        .parse()
        .map_err(|_| format!("`{text}` is not a duration (e.g. 250ms, 2s, 15m, 1h)"))?;
    let millis = match unit {
        "ms" => Some(value),
        "s" => value.checked_mul(1_000),
        "m" => value.checked_mul(60_000),
        "h" => value.checked_mul(3_600_000),
        _ => {
            return Err(format!(
                "`{text}` has an unknown unit `{unit}`: use ms, s, m or h"
            ))
        }
    };
    millis
        .map(Duration::from_millis)
        .filter(|d| *d <= MAX_DURATION)
        .ok_or_else(|| format!("`{text}` is too large: at most 8760h (a year)"))
}

/// Parses `512B`, `64KiB`, `256MiB`, `1GiB` (binary units), or a bare byte count.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let value: u64 = digits
        .parse()
        .map_err(|_| format!("`{text}` is not a size (e.g. 64KiB, 256MiB)"))?;
    let factor: u64 = match unit {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        _ => {
            return Err(format!(
                "`{text}` has an unknown unit `{unit}`: use B, KiB, MiB or GiB"
            ))
        }
    };
    value
        .checked_mul(factor)
        .ok_or_else(|| format!("`{text}` is too large"))
}

struct TextVisitor<T>(fn(&str) -> Result<T, String>, &'static str);

impl<T> de::Visitor<'_> for TextVisitor<T> {
    type Value = T;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(self.1)
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<T, E> {
        (self.0)(v).map_err(E::custom)
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<T, E> {
        (self.0)(&v.to_string()).map_err(E::custom)
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<T, E> {
        (self.0)(&v.to_string()).map_err(E::custom)
    }
}

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(TextVisitor(
            parse_duration,
            "a duration such as 250ms, 2s, 15m, 1h",
        ))
        .map(Dur)
    }
}

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(TextVisitor(parse_size, "a size such as 64KiB, 256MiB"))
            .map(Size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        let cases = [
            ("250ms", Ok(250)),
            ("2s", Ok(2_000)),
            ("15m", Ok(900_000)),
            ("1h", Ok(3_600_000)),
            ("0s", Ok(0)),
            ("2", Err("needs a unit")),
            ("2 s", Err("unknown unit")),
            ("1d", Err("unknown unit")),
            ("-1s", Err("not a duration")),
            ("ms", Err("not a duration")),
            ("8760h", Ok(31_536_000_000)),
            ("8761h", Err("too large")),
            ("99999999999999999999h", Err("not a duration")),
            ("9999999999999999h", Err("too large")),
        ];
        for (text, want) in cases {
            match (parse_duration(text), want) {
                (Ok(got), Ok(ms)) => assert_eq!(got, Duration::from_millis(ms), "{text}"),
                (Err(got), Err(part)) => assert!(got.contains(part), "{text}: {got}"),
                (got, want) => panic!("{text}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn sizes() {
        let cases = [
            ("64KiB", Ok(65_536)),
            ("256MiB", Ok(268_435_456)),
            ("1GiB", Ok(1 << 30)),
            ("512B", Ok(512)),
            ("100", Ok(100)),
            ("64KB", Err("unknown unit")),
            ("KiB", Err("not a size")),
        ];
        for (text, want) in cases {
            match (parse_size(text), want) {
                (Ok(got), Ok(n)) => assert_eq!(got, n, "{text}"),
                (Err(got), Err(part)) => assert!(got.contains(part), "{text}: {got}"),
                (got, want) => panic!("{text}: got {got:?}, want {want:?}"),
            }
        }
    }
}
