//! Deserialisation helpers for request bodies.

use serde::de::{DeserializeOwned, Error as _};
use serde::{Deserialize, Deserializer};

/// An optional nested struct, only from a JSON object (or `null`): serde's derive also
/// takes a JSON array of the fields in order, which no request schema allows.
pub(crate) fn object_only<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: DeserializeOwned,
{
    match Option::<serde_json::Value>::deserialize(deserializer)? {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(v @ serde_json::Value::Object(_)) => serde_json::from_value(v)
            .map(Some)
            .map_err(D::Error::custom),
        Some(other) => Err(D::Error::custom(format!(
            "expected an object, not {}",
            match other {
                serde_json::Value::Array(_) => "an array",
                serde_json::Value::String(_) => "a string",
                serde_json::Value::Number(_) => "a number",
                _ => "a boolean",
            }
        ))),
    }
}

/// A required nested struct, only from a JSON object (see [`object_only`]).
pub(crate) fn object<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: DeserializeOwned,
{
    object_only(deserializer)?.ok_or_else(|| D::Error::custom("expected an object, not null"))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[derive(Debug, Deserialize, PartialEq)]
    struct Inner {
        a: u32,
    }

    #[derive(Debug, Deserialize)]
    struct Outer {
        #[serde(default, deserialize_with = "object_only")]
        inner: Option<Inner>,
    }

    #[test]
    fn nested_structs_come_only_from_objects() {
        let ok: Outer = serde_json::from_str(r#"{"inner": {"a": 1}}"#).unwrap();
        assert_eq!(ok.inner, Some(Inner { a: 1 }));
        for none in [r#"{}"#, r#"{"inner": null}"#] {
            assert_eq!(serde_json::from_str::<Outer>(none).unwrap().inner, None);
        }
        let err = serde_json::from_str::<Outer>(r#"{"inner": [1]}"#).unwrap_err();
        assert!(err.to_string().contains("an array"), "{err}");
        assert!(serde_json::from_str::<Outer>(r#"{"inner": {"a": "x"}}"#).is_err());
    }
}
