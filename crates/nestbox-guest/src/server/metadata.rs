//! User metadata on files, as E2B's envd keeps it: an upload's `X-Metadata-<key>: <value>`
//! headers become the file's `user.e2b.<key>` extended attributes, and every entry the
//! agent describes (stat, list, move, watch events, upload answers) carries the file's
//! `user.e2b.*` attributes back, prefix stripped.
//!
//! Rules: keys are HTTP header names (so lowercase once received) of at most [`MAX_KEY`]
//! bytes; values are printable ASCII of at most [`MAX_VALUE`] bytes; at most
//! [`MAX_ENTRIES`] per upload. Other `user.*` attributes are neither shown nor touched.

use std::collections::BTreeMap;
use std::path::Path;

use http::HeaderMap;

/// Header prefix of upload metadata (header names arrive lowercase).
pub const HEADER_PREFIX: &str = "x-metadata-";
/// Extended-attribute prefix of stored metadata.
pub const XATTR_PREFIX: &str = "user.e2b.";
/// Longest key (the attribute name, with its prefix, stays within Linux's 255 bytes).
pub const MAX_KEY: usize = 200;
/// Longest value.
pub const MAX_VALUE: usize = 4096;
/// Most keys per upload.
pub const MAX_ENTRIES: usize = 64;

/// The metadata an upload asks for, validated; empty when it asks for none.
pub fn from_headers(headers: &HeaderMap) -> Result<BTreeMap<String, String>, String> {
    let mut out = BTreeMap::new();
    for (name, value) in headers {
        let Some(key) = name.as_str().strip_prefix(HEADER_PREFIX) else {
            continue;
        };
        if key.is_empty() || key.len() > MAX_KEY {
            return Err(format!(
                "metadata key {key:?} must be 1 to {MAX_KEY} bytes long"
            ));
        }
        let value = value
            .to_str()
            .ok()
            .filter(|v| v.bytes().all(|b| (0x20..0x7f).contains(&b)))
            .ok_or_else(|| format!("metadata value of {key:?} must be printable ASCII"))?;
        if value.len() > MAX_VALUE {
            return Err(format!(
                "metadata value of {key:?} is longer than {MAX_VALUE} bytes"
            ));
        }
        out.insert(key.to_owned(), value.to_owned());
        if out.len() > MAX_ENTRIES {
            return Err(format!("at most {MAX_ENTRIES} metadata keys per upload"));
        }
    }
    Ok(out)
}

/// Stores `metadata` on the file at `path` (not following a final symbolic link).
pub fn write(path: &Path, metadata: &BTreeMap<String, String>) -> std::io::Result<()> {
    for (key, value) in metadata {
        xattr::set(path, format!("{XATTR_PREFIX}{key}"), value.as_bytes())?;
    }
    Ok(())
}

/// The file's metadata; empty when it has none or its file system keeps none.
pub fn read(path: &Path) -> BTreeMap<String, String> {
    let Ok(names) = xattr::list(path) else {
        return BTreeMap::new();
    };
    names
        .filter_map(|name| {
            let key = name.to_str()?.strip_prefix(XATTR_PREFIX)?.to_owned();
            let value = xattr::get(path, &name).ok()??;
            Some((key, String::from_utf8_lossy(&value).into_owned()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                http::HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn headers_become_validated_lowercase_keys() {
        let got = from_headers(&headers(&[
            ("X-Metadata-Owner", "alice"),
            ("x-metadata-build.id", "42"),
            ("content-type", "text/plain"),
        ]))
        .unwrap();
        assert_eq!(
            got.into_iter().collect::<Vec<_>>(),
            [
                ("build.id".to_string(), "42".to_string()),
                ("owner".to_string(), "alice".to_string())
            ]
        );
        assert!(from_headers(&headers(&[("x-metadata-", "x")])).is_err());
        assert!(from_headers(&headers(&[("x-metadata-k", "tab\there")])).is_err());
        let long = "v".repeat(MAX_VALUE + 1);
        assert!(from_headers(&headers(&[("x-metadata-k", &long)])).is_err());
    }

    #[test]
    fn metadata_round_trips_through_extended_attributes() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        std::fs::write(&file, "x").unwrap();
        assert!(read(&file).is_empty());
        let meta: BTreeMap<_, _> = [("owner".to_string(), "alice".to_string())].into();
        write(&file, &meta).unwrap();
        // Other user attributes are not metadata.
        xattr::set(&file, "user.other", b"x").unwrap();
        assert_eq!(read(&file), meta);
    }
}
