//! Durations as written in config files: `250ms`, `30s`, `5m`, `1h30m`.

use std::borrow::Cow;
use std::fmt;

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A span of time in a config file, written the way Kubernetes and Envoy users
/// write it (`250ms`, `30s`, `5m`, `1h30m`).
///
/// Where a field documents it, `0s` means "disabled" (the Gateway API
/// convention), never "expire at once".
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Duration(std::time::Duration);

impl Duration {
    /// A duration of zero, which disables the timeouts that accept it.
    pub const ZERO: Duration = Duration(std::time::Duration::ZERO);

    /// A duration of `secs` whole seconds.
    pub const fn from_secs(secs: u64) -> Self {
        Duration(std::time::Duration::from_secs(secs))
    }

    /// A duration of `millis` milliseconds.
    pub const fn from_millis(millis: u64) -> Self {
        Duration(std::time::Duration::from_millis(millis))
    }

    /// The standard-library duration.
    pub const fn get(self) -> std::time::Duration {
        self.0
    }

    /// `None` when the duration is zero: for timeouts where `0s` disables.
    pub fn non_zero(self) -> Option<std::time::Duration> {
        (!self.0.is_zero()).then_some(self.0)
    }
}

impl From<std::time::Duration> for Duration {
    fn from(d: std::time::Duration) -> Self {
        Duration(d)
    }
}

impl fmt::Display for Duration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Hours are the largest unit: `48h` reads better in a config than `2days`.
        if self.0.is_zero() {
            return f.write_str("0s");
        }
        let secs = self.0.as_secs();
        let parts = [
            (secs / 3600, "h"),
            (secs / 60 % 60, "m"),
            (secs % 60, "s"),
            (u64::from(self.0.subsec_millis()), "ms"),
            (u64::from(self.0.subsec_micros() % 1000), "us"),
            (u64::from(self.0.subsec_nanos() % 1000), "ns"),
        ];
        for (value, unit) in parts {
            if value > 0 {
                write!(f, "{value}{unit}")?;
            }
        }
        Ok(())
    }
}

impl std::str::FromStr for Duration {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let trimmed = s.trim();
        if trimmed == "0" {
            return Ok(Duration::ZERO);
        }
        humantime::parse_duration(trimmed)
            .map(Duration)
            .map_err(|e| {
                format!("invalid duration {s:?} ({e}); write it like 250ms, 30s, 5m or 1h30m")
            })
    }
}

impl Serialize for Duration {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Duration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = Duration;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration such as 250ms, 30s, 5m or 1h30m")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Duration, E> {
                v.parse().map_err(E::custom)
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Duration, E> {
                if v == 0 {
                    Ok(Duration::ZERO)
                } else {
                    Err(E::custom(format!(
                        "a bare number ({v}) is ambiguous; add a unit, e.g. {v}s or {v}ms"
                    )))
                }
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Duration, E> {
                match u64::try_from(v) {
                    Ok(v) => self.visit_u64(v),
                    Err(_) => Err(E::custom("a duration cannot be negative")),
                }
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

/// A string of format `duration`, in the sense of Kubernetes' OpenAPI
/// formats (Go's `time.ParseDuration`: `250ms`, `30s`, `5m`, `1h30m`), not
/// JSON Schema's ISO 8601 one. The loader also takes a bare `0`.
impl JsonSchema for Duration {
    fn inline_schema() -> bool {
        true
    }

    fn schema_name() -> Cow<'static, str> {
        "Duration".into()
    }

    fn schema_id() -> Cow<'static, str> {
        concat!(module_path!(), "::Duration").into()
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "string",
            "format": "duration",
            "description": "A span of time such as 250ms, 30s, 5m or 1h30m.",
            "examples": ["250ms", "30s", "5m", "1h30m"],
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_forms_users_write() {
        let cases = [
            ("250ms", 250),
            ("30s", 30_000),
            ("5m", 300_000),
            ("1h30m", 5_400_000),
            ("1m30s", 90_000),
            ("0s", 0),
            ("0", 0),
        ];
        for (text, millis) in cases {
            let d: Duration = text.parse().unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(d.get().as_millis(), millis, "{text}");
        }
    }

    #[test]
    fn rejects_garbage_and_bare_numbers() {
        assert!("thirty".parse::<Duration>().is_err());
        assert!("-5s".parse::<Duration>().is_err());
        let err = serde_json::from_str::<Duration>("30").unwrap_err();
        assert!(err.to_string().contains("add a unit"), "{err}");
    }

    #[test]
    fn displays_round_trip() {
        for text in ["250ms", "30s", "5m", "1h30m", "0s", "400h", "1s500ms"] {
            let d: Duration = text.parse().unwrap();
            assert_eq!(d.to_string(), text);
        }
    }
}
