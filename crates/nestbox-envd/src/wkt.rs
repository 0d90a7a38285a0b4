//! `google.protobuf.Timestamp` with the proto3-canonical JSON form.
//!
//! pbjson's own type writes offsets (`…+00:00`), which protobuf-es (E2B's JS SDK) rejects
//! after fractional seconds; the canonical form is UTC with a `Z` suffix and 0, 3, 6 or 9
//! fractional digits, which is what this type writes. It reads any RFC 3339 time.

use chrono::{DateTime, SecondsFormat, Utc};
use serde::de::Error as _;

/// A point in time: seconds and nanoseconds since the Unix epoch.
#[derive(Clone, Copy, PartialEq, Eq, Hash, ::prost::Message)]
pub struct Timestamp {
    /// Seconds since 1970-01-01T00:00:00Z.
    #[prost(int64, tag = "1")]
    pub seconds: i64,
    /// Non-negative fraction of a second, in nanoseconds (0 to 999,999,999).
    #[prost(int32, tag = "2")]
    pub nanos: i32,
}

impl Timestamp {
    /// The same instant as a `chrono` time, if it is in range.
    pub fn to_datetime(self) -> Option<DateTime<Utc>> {
        DateTime::from_timestamp(self.seconds, u32::try_from(self.nanos).ok()?)
    }
}

impl From<DateTime<Utc>> for Timestamp {
    fn from(time: DateTime<Utc>) -> Self {
        Self {
            seconds: time.timestamp(),
            nanos: i32::try_from(time.timestamp_subsec_nanos()).unwrap_or(0),
        }
    }
}

impl From<std::time::SystemTime> for Timestamp {
    fn from(time: std::time::SystemTime) -> Self {
        DateTime::<Utc>::from(time).into()
    }
}

impl serde::Serialize for Timestamp {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let time = self
            .to_datetime()
            .ok_or_else(|| serde::ser::Error::custom("timestamp out of range"))?;
        serializer.serialize_str(&time.to_rfc3339_opts(SecondsFormat::AutoSi, true))
    }
}

impl<'de> serde::Deserialize<'de> for Timestamp {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        let time = DateTime::parse_from_rfc3339(&text)
            .map_err(|e| D::Error::custom(format!("invalid timestamp {text:?}: {e}")))?;
        Ok(time.with_timezone(&Utc).into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_json() {
        let cases = [
            (
                Timestamp {
                    seconds: 1_700_000_000,
                    nanos: 0,
                },
                "\"2023-11-14T22:13:20Z\"",
            ),
            (
                Timestamp {
                    seconds: 1_700_000_000,
                    nanos: 500_000_000,
                },
                "\"2023-11-14T22:13:20.500Z\"",
            ),
            (
                Timestamp {
                    seconds: 1_700_000_000,
                    nanos: 673_923_206,
                },
                "\"2023-11-14T22:13:20.673923206Z\"",
            ),
        ];
        for (ts, json) in cases {
            assert_eq!(serde_json::to_string(&ts).unwrap(), json);
            assert_eq!(serde_json::from_str::<Timestamp>(json).unwrap(), ts);
        }
        let offset: Timestamp = serde_json::from_str("\"2023-11-14T23:13:20+01:00\"").unwrap();
        assert_eq!(offset.seconds, 1_700_000_000);
        assert!(serde_json::from_str::<Timestamp>("\"yesterday\"").is_err());
    }
}
