//! Reading one VMM process's counters straight from `/proc`, and its disk's allocation.
//!
//! Three small reads per sandbox and sample, no child process, no allocation beyond the
//! file contents: `/proc/PID/stat` (user + system CPU ticks), `/proc/PID/status` (VmRSS)
//! and `stat()` of the copy-on-write disk (`st_blocks × 512`, what it really takes on the
//! host, not its logical size).

use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// Why a counter could not be read (usually: the process exited).
#[derive(Debug, thiserror::Error)]
pub enum ProcError {
    /// Reading a file failed.
    #[error("reading {path}")]
    Read {
        /// The file.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A file did not have the expected shape.
    #[error("unexpected contents of {path}")]
    Parse {
        /// The file.
        path: String,
    },
}

/// Clock ticks per second of `/proc/PID/stat` CPU times.
pub fn clock_ticks() -> u64 {
    // SAFETY: sysconf has no preconditions; it returns -1 for an unknown name.
    let n = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    u64::try_from(n).ok().filter(|&n| n > 0).unwrap_or(100)
}

/// User + system CPU time of `pid`, in clock ticks.
pub fn cpu_ticks(pid: u32) -> Result<u64, ProcError> {
    let path = format!("/proc/{pid}/stat");
    let text = std::fs::read_to_string(&path).map_err(|source| ProcError::Read {
        path: path.clone(),
        source,
    })?;
    parse_stat_ticks(&text).ok_or(ProcError::Parse { path })
}

/// Resident memory of `pid`, in bytes.
pub fn rss_bytes(pid: u32) -> Result<u64, ProcError> {
    let path = format!("/proc/{pid}/status");
    let text = std::fs::read_to_string(&path).map_err(|source| ProcError::Read {
        path: path.clone(),
        source,
    })?;
    parse_status_rss(&text).ok_or(ProcError::Parse { path })
}

/// Bytes a file takes on its filesystem (holes excluded).
pub fn allocated_bytes(file: &Path) -> Result<u64, ProcError> {
    std::fs::metadata(file)
        .map(|m| m.blocks() * 512)
        .map_err(|source| ProcError::Read {
            path: file.display().to_string(),
            source,
        })
}

/// `utime + stime` (fields 14 and 15) of a `/proc/PID/stat` line. The command name (field
/// 2) is in parentheses and may hold spaces and parentheses, so fields are counted after
/// its last `)`.
pub fn parse_stat_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    // `rest` starts at field 3 (state): utime is the 12th field from here, stime the 13th.
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// `VmRSS` of a `/proc/PID/status` file, in bytes.
pub fn parse_status_rss(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let mut parts = line["VmRSS:".len()..].split_whitespace();
    let value: u64 = parts.next()?.parse().ok()?;
    match parts.next() {
        Some("kB") | None => Some(value * 1024),
        Some(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_counted_after_the_command_name() {
        let line = "4242 (qemu-system-x86) S 1 4242 4242 0 -1 4194560 25010 0 0 0 \
                    1234 567 0 0 20 0 3 0 99887 1234567 8910 18446744073709551615";
        assert_eq!(parse_stat_ticks(line), Some(1234 + 567));
        // A name with spaces and parentheses.
        let odd = "7 (a) b (c) R 1 7 7 0 -1 0 0 0 0 0 5 6 0 0 20 0 1 0 1 1 1";
        assert_eq!(parse_stat_ticks(odd), Some(11));
        assert_eq!(parse_stat_ticks("garbage"), None);
        assert_eq!(parse_stat_ticks("1 (x) S 1 2"), None);
    }

    #[test]
    fn rss_is_read_in_bytes() {
        let status = "Name:\tqemu\nVmPeak:\t  999 kB\nVmRSS:\t  204800 kB\nThreads:\t3\n";
        assert_eq!(parse_status_rss(status), Some(204_800 * 1024));
        assert_eq!(parse_status_rss("Name:\tkthreadd\n"), None);
    }

    #[test]
    fn reads_this_process() {
        let me = std::process::id();
        assert!(rss_bytes(me).unwrap() > 0);
        cpu_ticks(me).unwrap();
        assert!(clock_ticks() > 0);
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), vec![1u8; 64 * 1024]).unwrap();
        assert!(allocated_bytes(file.path()).unwrap() >= 64 * 1024);
        assert!(cpu_ticks(u32::MAX).is_err());
    }
}
