//! Small system-call wrappers shared by both init stages: console output, mounts,
//! power-off, the clock and growing the root filesystem.
//!
//! Nothing here may panic: these run as PID 1, where a panic (the guest profile aborts)
//! becomes a kernel panic. Every failure is an [`InitError`] the caller reports and, where
//! it can, survives.

use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;
use std::time::Duration;

use nix::mount::MsFlags;

use super::InitError;

/// Writes one line to the console (PID 1's stdout is /dev/console).
pub fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// Reports an error with its whole cause chain on the console.
pub fn say_error(context: &str, err: &dyn std::error::Error) {
    let mut msg = format!("nestbox-init: {context}: {err}");
    let mut source = err.source();
    while let Some(s) = source {
        msg.push_str(&format!(": {s}"));
        source = s.source();
    }
    say(&msg);
}

/// Milliseconds since boot (CLOCK_BOOTTIME; needs no /proc).
pub fn uptime_ms() -> u64 {
    match nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME) {
        Ok(ts) => (ts.tv_sec() as u64) * 1000 + (ts.tv_nsec() as u64) / 1_000_000,
        Err(_) => 0,
    }
}

/// Makes sure fds 0, 1 and 2 are open, on /dev/console if the kernel could not open it
/// for us (an initramfs without a console node). Needs /dev mounted.
pub fn ensure_console_fds() {
    // SAFETY: fcntl(F_GETFD) only queries a descriptor number.
    let missing = (0..3).any(|fd| unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0);
    if !missing {
        return;
    }
    let Ok(console) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/console")
    else {
        return;
    };
    for fd in 0..3 {
        // SAFETY: as above; dup2 onto a closed standard descriptor.
        unsafe {
            if libc::fcntl(fd, libc::F_GETFD) < 0 {
                libc::dup2(console.as_raw_fd(), fd);
            }
        }
    }
}

/// Mounts `fstype` at `target` (created if missing) unless something is mounted there.
pub fn mount_if_needed(
    source: &str,
    target: &str,
    fstype: &str,
    flags: MsFlags,
    data: Option<&str>,
) -> Result<(), InitError> {
    if !Path::new(target).exists() {
        std::fs::create_dir_all(target).map_err(|source| InitError::Io {
            op: "create",
            path: target.to_string(),
            source,
        })?;
    }
    if is_mountpoint(target) {
        return Ok(());
    }
    mount(source, target, fstype, flags, data)
}

/// mount(2) with an error naming the device and the target.
pub fn mount(
    device: &str,
    target: &str,
    fstype: &str,
    flags: MsFlags,
    data: Option<&str>,
) -> Result<(), InitError> {
    nix::mount::mount(Some(device), target, Some(fstype), flags, data).map_err(|source| {
        InitError::Mount {
            device: device.to_string(),
            target: target.to_string(),
            fstype: fstype.to_string(),
            source,
        }
    })
}

/// Whether `path` is a mount point (its device differs from its parent's, or it is `/`).
pub fn is_mountpoint(path: &str) -> bool {
    let p = Path::new(path);
    let Some(parent) = p.parent() else {
        return true;
    };
    match (std::fs::metadata(p), std::fs::metadata(parent)) {
        (Ok(a), Ok(b)) => a.dev() != b.dev() || a.ino() == b.ino(),
        _ => false,
    }
}

/// Polls until `path` is a block device, for at most `limit`.
pub fn wait_for_block_device(path: &str, limit: Duration) -> Result<(), InitError> {
    let start = std::time::Instant::now();
    loop {
        if std::fs::metadata(path)
            .map(|m| m.file_type().is_block_device())
            .unwrap_or(false)
        {
            return Ok(());
        }
        if start.elapsed() >= limit {
            return Err(InitError::NoRootDevice {
                device: path.to_string(),
                waited: limit,
            });
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Syncs and powers the machine off. Never returns: if power-off fails, PID 1 parks.
pub fn power_off() -> ! {
    nix::unistd::sync();
    let Err(e) = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_POWER_OFF);
    say(&format!(
        "nestbox-init: power off failed: {e}; halting here"
    ));
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// Sets the wall clock to `ms` milliseconds after the Unix epoch.
pub fn set_clock(ms: u64) -> Result<(), InitError> {
    let ts = nix::sys::time::TimeSpec::new(
        (ms / 1000) as libc::time_t,
        ((ms % 1000) * 1_000_000) as libc::c_long,
    );
    nix::time::clock_settime(nix::time::ClockId::CLOCK_REALTIME, ts).map_err(|source| {
        InitError::Sys {
            op: "set the clock".into(),
            source,
        }
    })
}

const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
const EXT4_IOC_RESIZE_FS: libc::c_ulong = 0x4008_6610;
const EXT4_SUPER_MAGIC: u16 = 0xEF53;
const EXT4_FEATURE_INCOMPAT_64BIT: u32 = 0x80;

/// The block count and block size of an ext4 filesystem, from its superblock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ext4Geometry {
    /// Filesystem blocks.
    pub blocks: u64,
    /// Bytes per block.
    pub block_size: u64,
}

/// Parses the fields we need from the 1024-byte superblock (found at byte 1024).
pub fn parse_ext4_superblock(sb: &[u8]) -> Option<Ext4Geometry> {
    let u32_at = |off: usize| -> Option<u32> {
        Some(u32::from_le_bytes(sb.get(off..off + 4)?.try_into().ok()?))
    };
    let magic = u16::from_le_bytes(sb.get(0x38..0x3A)?.try_into().ok()?);
    if magic != EXT4_SUPER_MAGIC {
        return None;
    }
    let log = u32_at(0x18)?;
    if log > 6 {
        return None;
    }
    let block_size = 1024u64 << log;
    let mut blocks = u64::from(u32_at(0x04)?);
    if u32_at(0x60)? & EXT4_FEATURE_INCOMPAT_64BIT != 0 {
        blocks |= u64::from(u32_at(0x150)?) << 32;
    }
    Some(Ext4Geometry { blocks, block_size })
}

/// What [`grow_root_fs`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Growth {
    /// The filesystem already fills the disk.
    AlreadyFull,
    /// Grown from `from` to `to` bytes.
    Grown {
        /// Size before.
        from: u64,
        /// Size after.
        to: u64,
    },
}

/// Grows the ext4 filesystem mounted at `/` online to fill `device` when the disk is
/// larger (the host keeps templates shrunk and hands out bigger disks).
pub fn grow_root_fs(device: &str) -> Result<Growth, InitError> {
    use std::os::unix::fs::FileExt;
    let io = |op: &'static str, path: &str| {
        let path = path.to_string();
        move |source| InitError::Io { op, path, source }
    };
    let dev = File::open(device).map_err(io("open", device))?;
    let mut dev_bytes: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer we pass.
    if unsafe { libc::ioctl(dev.as_raw_fd(), BLKGETSIZE64, &mut dev_bytes as *mut u64) } < 0 {
        return Err(InitError::Io {
            op: "read the size of",
            path: device.to_string(),
            source: std::io::Error::last_os_error(),
        });
    }
    let mut sb = [0u8; 1024];
    dev.read_exact_at(&mut sb, 1024)
        .map_err(io("read the superblock of", device))?;
    let geo = parse_ext4_superblock(&sb).ok_or_else(|| InitError::NotExt4 {
        device: device.to_string(),
    })?;
    let target = dev_bytes / geo.block_size;
    // Below one MiB of slack the resize is not worth the journal traffic.
    if target.saturating_sub(geo.blocks) * geo.block_size < 1024 * 1024 {
        return Ok(Growth::AlreadyFull);
    }
    let root = File::open("/").map_err(io("open", "/"))?;
    // SAFETY: EXT4_IOC_RESIZE_FS reads one u64 (the new block count) through the pointer.
    if unsafe { libc::ioctl(root.as_raw_fd(), EXT4_IOC_RESIZE_FS, &target as *const u64) } < 0 {
        return Err(InitError::Io {
            op: "resize the filesystem on",
            path: device.to_string(),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(Growth::Grown {
        from: geo.blocks * geo.block_size,
        to: target * geo.block_size,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn superblock_fields() {
        let mut sb = vec![0u8; 1024];
        sb[0x38..0x3A].copy_from_slice(&EXT4_SUPER_MAGIC.to_le_bytes());
        sb[0x18..0x1C].copy_from_slice(&2u32.to_le_bytes());
        sb[0x04..0x08].copy_from_slice(&55_448u32.to_le_bytes());
        assert_eq!(
            parse_ext4_superblock(&sb),
            Some(Ext4Geometry {
                blocks: 55_448,
                block_size: 4096
            })
        );
        sb[0x60..0x64].copy_from_slice(&EXT4_FEATURE_INCOMPAT_64BIT.to_le_bytes());
        sb[0x150..0x154].copy_from_slice(&1u32.to_le_bytes());
        assert_eq!(
            parse_ext4_superblock(&sb).map(|g| g.blocks),
            Some((1u64 << 32) + 55_448)
        );
        sb[0x38] = 0;
        assert_eq!(parse_ext4_superblock(&sb), None);
    }

    #[test]
    fn uptime_is_monotonic() {
        let a = uptime_ms();
        let b = uptime_ms();
        assert!(a > 0 && b >= a);
    }
}
