//! Byte sizes parsed once from human input ("5G", "512M", "1.5GiB", "4096").
//!
//! Suffixes are binary (K = 1024): a sandbox's "512M" of memory is 512 MiB, matching
//! what QEMU and the kernel mean.

use std::fmt;
use std::str::FromStr;

/// A size in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct ByteSize(pub u64);

/// A size string that could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not a size; use a number with an optional K, M, G or T suffix (e.g. 512M, 5G)")]
pub struct SizeParseError(pub String);

impl ByteSize {
    /// One kibibyte.
    pub const KIB: u64 = 1024;
    /// One mebibyte.
    pub const MIB: u64 = 1024 * 1024;
    /// One gibibyte.
    pub const GIB: u64 = 1024 * 1024 * 1024;

    /// A size of `n` mebibytes.
    pub const fn mib(n: u64) -> Self {
        Self(n * Self::MIB)
    }

    /// Whole mebibytes, rounded down.
    pub const fn as_mib(&self) -> u64 {
        self.0 / Self::MIB
    }

    /// The size in bytes.
    pub const fn bytes(&self) -> u64 {
        self.0
    }
}

impl FromStr for ByteSize {
    type Err = SizeParseError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let err = || SizeParseError(input.chars().take(40).collect());
        let s = input.trim();
        let split = s
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(s.len());
        let (num, unit) = s.split_at(split);
        if num.is_empty() {
            return Err(err());
        }
        let mult: u64 = match unit.trim().to_ascii_uppercase().as_str() {
            "" | "B" => 1,
            "K" | "KB" | "KIB" => Self::KIB,
            "M" | "MB" | "MIB" => Self::MIB,
            "G" | "GB" | "GIB" => Self::GIB,
            "T" | "TB" | "TIB" => Self::GIB * 1024,
            _ => return Err(err()),
        };
        if let Ok(n) = num.parse::<u64>() {
            return n.checked_mul(mult).map(ByteSize).ok_or_else(err);
        }
        let f: f64 = num.parse().map_err(|_| err())?;
        let bytes = f * mult as f64;
        if !bytes.is_finite() || bytes < 0.0 || bytes > u64::MAX as f64 {
            return Err(err());
        }
        Ok(ByteSize(bytes as u64))
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        if b >= Self::GIB && b.is_multiple_of(Self::GIB) {
            write!(f, "{}G", b / Self::GIB)
        } else if b >= Self::MIB && b.is_multiple_of(Self::MIB) {
            write!(f, "{}M", b / Self::MIB)
        } else if b >= Self::KIB && b.is_multiple_of(Self::KIB) {
            write!(f, "{}K", b / Self::KIB)
        } else {
            write!(f, "{b}")
        }
    }
}

impl serde::Serialize for ByteSize {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for ByteSize {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(serde::Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Num(u64),
            Str(String),
        }
        match Raw::deserialize(deserializer)? {
            Raw::Num(n) => Ok(ByteSize(n)),
            Raw::Str(s) => s.parse().map_err(serde::de::Error::custom),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_common_forms() {
        assert_eq!("4096".parse::<ByteSize>().unwrap(), ByteSize(4096));
        assert_eq!("512M".parse::<ByteSize>().unwrap(), ByteSize::mib(512));
        assert_eq!("5G".parse::<ByteSize>().unwrap(), ByteSize::mib(5120));
        assert_eq!("5 GiB".parse::<ByteSize>().unwrap(), ByteSize::mib(5120));
        assert_eq!("1.5G".parse::<ByteSize>().unwrap(), ByteSize::mib(1536));
        assert_eq!("64k".parse::<ByteSize>().unwrap(), ByteSize(65536));
    }

    #[test]
    fn rejects_garbage() {
        for bad in ["", "G", "5X", "-1", "1e9", "99999999999999999999T", "5GG"] {
            assert!(bad.parse::<ByteSize>().is_err(), "{bad} should fail");
        }
    }

    #[test]
    fn displays_compactly() {
        assert_eq!(ByteSize::mib(5120).to_string(), "5G");
        assert_eq!(ByteSize::mib(512).to_string(), "512M");
        assert_eq!(ByteSize(1000).to_string(), "1000");
    }
}
