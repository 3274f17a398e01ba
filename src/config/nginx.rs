//! Values in nginx's syntax, for the `nginx_http_*` keys Kong passes to
//! nginx: sizes (`8k`, `10m`), times (`60s`, `1m30s`, `500ms`) and
//! `large_client_header_buffers` (`4 8k`). Each keeps the text it was
//! written as, so `gatehouse config` prints what the operator wrote.

use std::fmt;
use std::time::Duration;

use serde::de::Error as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A size: bytes, or a number followed by `k`, `m` or `g` (any case).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Size {
    text: String,
    bytes: u64,
}

impl Size {
    pub(crate) fn parse(text: &str) -> Result<Size, String> {
        let trimmed = text.trim();
        let (digits, unit) = match trimmed.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
            Some((idx, _)) => trimmed.split_at(idx),
            None => (trimmed, ""),
        };
        let number: u64 = digits
            .parse()
            .map_err(|_| format!("invalid size {text:?}: expected a number of bytes, or a number followed by k, m or g"))?;
        let factor: u64 = match unit {
            "" => 1,
            "k" | "K" => 1 << 10,
            "m" | "M" => 1 << 20,
            "g" | "G" => 1 << 30,
            _ => {
                return Err(format!(
                    "invalid size {text:?}: unknown unit {unit:?} (expected k, m or g)"
                ))
            }
        };
        let bytes = number
            .checked_mul(factor)
            .ok_or_else(|| format!("invalid size {text:?}: too large"))?;
        Ok(Size {
            text: trimmed.to_owned(),
            bytes,
        })
    }

    pub(crate) fn bytes(&self) -> u64 {
        self.bytes
    }
}

/// A time: a sequence of numbers with units `ms`, `s`, `m`, `h`, `d`
/// (`1m30s`); a bare number is seconds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Time {
    text: String,
    duration: Duration,
}

impl Time {
    pub(crate) fn parse(text: &str) -> Result<Time, String> {
        let trimmed = text.trim();
        let invalid = || {
            format!("invalid time {text:?}: expected seconds, or numbers with units ms, s, m, h, d (e.g. 60s, 1m30s)")
        };
        if trimmed.is_empty() {
            return Err(invalid());
        }
        if let Ok(seconds) = trimmed.parse::<u64>() {
            return Ok(Time {
                text: trimmed.to_owned(),
                duration: Duration::from_secs(seconds),
            });
        }
        let mut duration = Duration::ZERO;
        let mut rest = trimmed;
        while !rest.is_empty() {
            let digits_end = rest
                .find(|c: char| !c.is_ascii_digit())
                .ok_or_else(invalid)?;
            let (digits, after) = rest.split_at(digits_end);
            let number: u64 = digits.parse().map_err(|_| invalid())?;
            let unit_end = after
                .find(|c: char| c.is_ascii_digit())
                .unwrap_or(after.len());
            let (unit, next) = after.split_at(unit_end);
            let millis_per_unit: u64 = match unit {
                "ms" => 1,
                "s" => 1_000,
                "m" => 60_000,
                "h" => 3_600_000,
                "d" => 86_400_000,
                _ => return Err(invalid()),
            };
            let millis = number.checked_mul(millis_per_unit).ok_or_else(invalid)?;
            duration = duration
                .checked_add(Duration::from_millis(millis))
                .ok_or_else(invalid)?;
            rest = next;
        }
        Ok(Time {
            text: trimmed.to_owned(),
            duration,
        })
    }

    pub(crate) fn duration(&self) -> Duration {
        self.duration
    }
}

/// `large_client_header_buffers`: how many buffers and how large each.
/// One buffer bounds a line of the head; all of them bound the head.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct HeaderBuffers {
    text: String,
    pub(crate) number: u64,
    pub(crate) size: Size,
}

impl HeaderBuffers {
    pub(crate) fn parse(text: &str) -> Result<HeaderBuffers, String> {
        let mut words = text.split_whitespace();
        let invalid =
            || format!("invalid buffers {text:?}: expected a number and a size, e.g. \"4 8k\"");
        let number: u64 = words
            .next()
            .and_then(|word| word.parse().ok())
            .filter(|number| *number > 0)
            .ok_or_else(invalid)?;
        let size = Size::parse(words.next().ok_or_else(invalid)?)?;
        if words.next().is_some() || size.bytes() == 0 {
            return Err(invalid());
        }
        Ok(HeaderBuffers {
            text: text.trim().to_owned(),
            number,
            size,
        })
    }

    /// The largest request head: every buffer.
    pub(crate) fn total_bytes(&self) -> u64 {
        self.number.saturating_mul(self.size.bytes())
    }
}

/// Environment variables and TOML give numbers for `0` or `60`, strings for
/// `10m` or `60s`.
#[derive(Deserialize)]
#[serde(untagged)]
enum Raw {
    Number(u64),
    Text(String),
}

impl Raw {
    fn into_text(self) -> String {
        match self {
            Raw::Number(number) => number.to_string(),
            Raw::Text(text) => text,
        }
    }
}

macro_rules! text_serde {
    ($ty:ty) => {
        impl Serialize for $ty {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.serialize_str(&self.text)
            }
        }

        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                let text = Raw::deserialize(deserializer)?.into_text();
                <$ty>::parse(&text).map_err(D::Error::custom)
            }
        }

        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.text)
            }
        }
    };
}

text_serde!(Size);
text_serde!(Time);
text_serde!(HeaderBuffers);

#[cfg(test)]
mod tests {
    use super::*;

    fn check_size(text: &str, expect: Result<u64, ()>) {
        assert_eq!(
            Size::parse(text).map(|s| s.bytes()).map_err(|_| ()),
            expect,
            "{text}"
        );
    }

    fn check_time(text: &str, expect: Result<u64, ()>) {
        assert_eq!(
            Time::parse(text)
                .map(|t| t.duration().as_millis() as u64)
                .map_err(|_| ()),
            expect,
            "{text}"
        );
    }

    #[test]
    fn sizes() {
        check_size("0", Ok(0));
        check_size("1024", Ok(1024));
        check_size("8k", Ok(8192));
        check_size("10m", Ok(10 << 20));
        check_size("1G", Ok(1 << 30));
        check_size(" 2K ", Ok(2048));
        check_size("", Err(()));
        check_size("k", Err(()));
        check_size("10 m", Err(()));
        check_size("1t", Err(()));
        check_size("-1", Err(()));
        check_size("99999999999999999999g", Err(()));
    }

    #[test]
    fn times() {
        check_time("60", Ok(60_000));
        check_time("60s", Ok(60_000));
        check_time("500ms", Ok(500));
        check_time("1m30s", Ok(90_000));
        check_time("1h", Ok(3_600_000));
        check_time("2d", Ok(172_800_000));
        check_time("", Err(()));
        check_time("s", Err(()));
        check_time("10x", Err(()));
        check_time("1.5s", Err(()));
    }

    #[test]
    fn header_buffers() {
        let buffers = HeaderBuffers::parse("4 8k").expect("valid");
        assert_eq!((buffers.number, buffers.size.bytes()), (4, 8192));
        assert_eq!(buffers.total_bytes(), 32768);
        assert!(HeaderBuffers::parse("4").is_err());
        assert!(HeaderBuffers::parse("0 8k").is_err());
        assert!(HeaderBuffers::parse("4 0").is_err());
        assert!(HeaderBuffers::parse("4 8k 1").is_err());
    }
}
