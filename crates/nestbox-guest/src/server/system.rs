//! What `/init` changes in the VM itself with `--manage-system`: the clock (a restored
//! snapshot wakes up with the time it was paused at) and the host name (clones of a snapshot
//! each get their own). Never used when the server runs as an ordinary process.

use chrono::{DateTime, Utc};

/// A system setting that could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum SystemError {
    /// `clock_settime` failed.
    #[error("cannot set the clock to {time}")]
    Clock {
        /// The requested time.
        time: DateTime<Utc>,
        /// Why.
        #[source]
        source: nix::Error,
    },
    /// `sethostname` failed.
    #[error("cannot set the host name to {name:?}")]
    Hostname {
        /// The requested name.
        name: String,
        /// Why.
        #[source]
        source: nix::Error,
    },
    /// The host name is not a valid one.
    #[error("invalid host name {0:?}")]
    InvalidHostname(String),
}

/// Sets the real-time clock.
pub fn set_clock(time: DateTime<Utc>) -> Result<(), SystemError> {
    let spec =
        nix::sys::time::TimeSpec::new(time.timestamp(), i64::from(time.timestamp_subsec_nanos()));
    nix::time::clock_settime(nix::time::ClockId::CLOCK_REALTIME, spec)
        .map_err(|source| SystemError::Clock { time, source })
}

/// Whether `name` is a valid host name (RFC 1123 labels, at most 64 bytes for the kernel).
pub fn valid_hostname(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

/// Sets the kernel host name.
pub fn set_hostname(name: &str) -> Result<(), SystemError> {
    if !valid_hostname(name) {
        return Err(SystemError::InvalidHostname(name.to_owned()));
    }
    nix::unistd::sethostname(name).map_err(|source| SystemError::Hostname {
        name: name.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_names() {
        assert!(valid_hostname("sb-1234"));
        assert!(valid_hostname("a.b.c"));
        assert!(!valid_hostname(""));
        assert!(!valid_hostname("-x"));
        assert!(!valid_hostname("a b"));
        assert!(!valid_hostname(&"a".repeat(65)));
    }
}
