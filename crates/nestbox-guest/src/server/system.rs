//! What `/init` changes in the VM itself with `--manage-system`: the clock (a restored
//! snapshot wakes up with the time it was paused at), the host name (clones of a snapshot
//! each get their own) and the kernel's random generator (clones of a snapshot start with
//! the same state: the host's entropy makes each its own). Never used when the server runs as an ordinary process.

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
    /// Entropy that is not hex, or too much of it.
    #[error("invalid entropy: {0}")]
    InvalidEntropy(&'static str),
    /// Feeding the kernel's random generator failed.
    #[error("cannot {op} the kernel's random generator")]
    Random {
        /// What was tried.
        op: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Most entropy one `/init` may carry, bytes.
pub const MAX_ENTROPY: usize = 512;

// `RNDADDENTROPY` takes a `struct rand_pool_info` (two ints, then the bytes);
// `RNDRESEEDCRNG` makes the generator rekey from its pool now (Linux 4.17+).
nix::ioctl_write_ptr_bad!(
    rnd_add_entropy,
    nix::request_code_write!(b'R', 0x03, 2 * std::mem::size_of::<libc::c_int>()),
    libc::c_int
);
nix::ioctl_none!(rnd_reseed_crng, b'R', 0x07);

/// Mixes `hex_bytes` (random bytes from the host, hex) into the kernel's random generator,
/// credited as entropy, and reseeds it.
pub fn add_entropy(hex_bytes: &str) -> Result<(), SystemError> {
    use std::os::fd::AsRawFd;

    if hex_bytes.len() / 2 > MAX_ENTROPY {
        return Err(SystemError::InvalidEntropy("over 512 bytes"));
    }
    let bytes = hex::decode(hex_bytes).map_err(|_| SystemError::InvalidEntropy("not hex"))?;
    let random = |op| move |source| SystemError::Random { op, source };
    let len =
        libc::c_int::try_from(bytes.len()).map_err(|_| SystemError::InvalidEntropy("size"))?;
    // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
    let mut info = Vec::with_capacity(8 + bytes.len());
    info.extend_from_slice(&(len * 8).to_ne_bytes());
    info.extend_from_slice(&len.to_ne_bytes());
    info.extend_from_slice(&bytes);
    let urandom = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/urandom")
        .map_err(random("open"))?;
    // SAFETY: `info` is a complete rand_pool_info of `len` bytes, alive for the call.
    unsafe { rnd_add_entropy(urandom.as_raw_fd(), info.as_ptr().cast()) }
        .map_err(|e| random("add entropy to")(std::io::Error::from(e)))?;
    // SAFETY: an argument-less ioctl on our own descriptor.
    unsafe { rnd_reseed_crng(urandom.as_raw_fd()) }
        .map_err(|e| random("reseed")(std::io::Error::from(e)))?;
    Ok(())
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
    fn entropy_must_be_hex_and_bounded() {
        for bad in ["abc", "zz", &"00".repeat(MAX_ENTROPY + 1)] {
            assert!(
                matches!(add_entropy(bad), Err(SystemError::InvalidEntropy(_))),
                "{bad:.8}"
            );
        }
    }

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
