//! Each VMM in a jail of its own ([`nestbox_hostsys::jail`]): its own unprivileged user,
//! a mount namespace holding only its files, no capabilities, QEMU's seccomp filter.
//!
//! ```text
//!   the agent (root), before the VMM starts          the VMM (uid from VmSpec::uid)
//!   ─ QMP socket bound, handed in as fd 3      ──▶   -chardev socket,fd=3 (never creates
//!   ─ TAP opened in the sandbox's namespace,           files in the run directory)
//!     handed in as fd 4                        ──▶   -netdev tap,fd=4 (no CAP_NET_ADMIN)
//!   ─ a clone's template RAM copied once into a ──▶  mem-path=/proc/self/fd/5, share=off:
//!     sealed memfd (F_SEAL_WRITE), fd 5               its pages shared, never writable
//!   ─ console log, RAM file, top disk: made and       bound writable at their host paths
//!     given to the VMM's user
//!   ─ kernel, initramfs, the overlay's recorded       bound read-only
//!     backing image (root, 0644), /usr, /dev/*
//! ```
//!
//! Invariants:
//! - a jailed VMM can open nothing of the host but its own binds: no other sandbox's
//!   disk, RAM or log, no host configuration, no other process's `/proc` entries;
//! - it writes only its own top disk, RAM file and console log; backing images and
//!   templates' RAM are read-only to it (a template's pages reach a clone through a
//!   sealed copy, because QEMU 7.2 opens a private RAM file read-write);
//! - an overlay's backing image is the one its maker recorded, never the one its header
//!   names (a VMM can rewrite the header of the disk it runs);
//! - the run directory stays root's: the VMM can neither replace the files the agent
//!   reads there (its record, the console log) with links nor add any.

use std::os::fd::OwnedFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};

use nestbox_hostsys::jail::Jail;

use super::argv::RunPaths;
use crate::snapshot::files::Stamp;
use crate::spec::{DiskFormat, VmSpec};
use crate::{Accel, VmmError};

/// QEMU's QMP listening socket, handed in.
pub const QMP_FD: i32 = 3;
/// The TAP device, opened in the sandbox's namespace and handed in.
pub const TAP_FD: i32 = 4;
/// A clone's sealed template RAM, handed in.
pub const RAM_FD: i32 = 5;
/// Where a jailed QEMU finds [`RAM_FD`].
pub const RAM_FD_PATH: &str = "/proc/self/fd/5";
/// The empty directory in a run directory that a VMM's jail is mounted on (in the VMM's
/// own mount namespace only).
pub const JAIL_DIR: &str = "vmm-root";

/// The first user id of VMMs: a host agent runs the VMM of network slot `n` as
/// `VMM_UID_BASE + n` (slots are unique machine-wide, so are these users); tools and
/// tests use ids above [`VMM_UID_BASE`] + 65536.
pub const VMM_UID_BASE: u32 = 0x6e62_0000;

/// The VMM user of network slot `slot`.
pub fn uid_for_slot(slot: u32) -> u32 {
    VMM_UID_BASE + slot
}

fn io(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> VmmError {
    let path = path.to_path_buf();
    move |source| VmmError::Io { op, path, source }
}

/// Creates (empty) or takes `path` and gives it to `uid`, readable by it alone.
pub(crate) fn give(path: &Path, uid: u32, create: bool) -> Result<(), VmmError> {
    if create {
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .map_err(io("create", path))?;
    }
    std::os::unix::fs::chown(path, Some(uid), Some(uid)).map_err(io("chown", path))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(io("chmod", path))
}

/// The image under `disk`, checked: a qcow2 overlay's header must name exactly the
/// image its maker recorded ([`crate::Disk::backing`]), one level, raw. That image is
/// immutable: it becomes root's, readable by all (it sits in the agent's private data
/// directory), so any VMM whose jail binds it can read it and none can write it.
fn checked_backing(disk: &crate::spec::Disk) -> Result<Option<PathBuf>, VmmError> {
    use std::os::unix::fs::MetadataExt;
    if disk.format != DiskFormat::Qcow2 {
        return Ok(None);
    }
    let named = nestbox_hostsys::disk::backing_file(&disk.path).map_err(io("read", &disk.path))?;
    let refuse = |reason: String| VmmError::InvalidSpec {
        field: "root_disk",
        reason: format!("{}: {reason}", disk.path.display()),
    };
    let image = match (named, &disk.backing) {
        (None, None) => return Ok(None),
        (Some(named), Some(recorded))
            if named == *recorded
                || std::fs::canonicalize(&named).is_ok_and(|n| n == *recorded) =>
        {
            recorded.clone()
        }
        (named, recorded) => {
            return Err(refuse(format!(
                "its header names backing image {named:?}, its maker recorded {recorded:?}"
            )));
        }
    };
    let meta = std::fs::symlink_metadata(&image).map_err(io("stat", &image))?;
    if !meta.is_file() {
        return Err(refuse(format!("{} is not a regular file", image.display())));
    }
    if nestbox_hostsys::disk::backing_file(&image).is_ok() {
        return Err(refuse(format!("{} is not a raw image", image.display())));
    }
    if meta.uid() != 0 || meta.gid() != 0 {
        std::os::unix::fs::chown(&image, Some(0), Some(0)).map_err(io("chown", &image))?;
    }
    if meta.mode() & 0o7777 != 0o644 {
        std::fs::set_permissions(&image, std::fs::Permissions::from_mode(0o644))
            .map_err(io("chmod", &image))?;
    }
    Ok(Some(image))
}

/// Prepares `spec`'s files for its VMM's user and builds its jail: `ram` is the guest RAM
/// file to bind writable (an owned RAM file; `None` for a clone or anonymous memory).
pub(crate) fn vmm_jail(
    spec: &VmSpec,
    paths: &RunPaths,
    binary: &Path,
    accel: Accel,
    ram: Option<&Path>,
) -> Result<Jail, VmmError> {
    let uid = spec.uid.ok_or_else(|| VmmError::InvalidSpec {
        field: "uid",
        reason: "this driver jails its VMMs: each needs a user of its own".into(),
    })?;
    let backing = checked_backing(&spec.root_disk)?;
    let root = spec.run_dir.join(JAIL_DIR);
    std::fs::create_dir_all(&root).map_err(io("create", &root))?;
    give(&paths.console_log, uid, true)?;
    if let Some(ram) = ram {
        give(ram, uid, !ram.exists())?;
    }
    give(&spec.root_disk.path, uid, false)?;
    let mut jail = Jail::new(root, uid, uid)
        .with_system()
        .bind(&spec.kernel, false)
        .bind(&paths.console_log, true)
        .bind(&spec.root_disk.path, true);
    if let Some(initrd) = &spec.initrd {
        jail = jail.bind(initrd, false);
    }
    if let Some(image) = backing {
        jail = jail.bind(image, false);
    }
    if let Some(ram) = ram {
        jail = jail.bind(ram, true);
    }
    if !binary.starts_with("/usr") && binary.is_absolute() {
        jail = jail.bind(binary, false);
    }
    if accel == Accel::Kvm {
        use std::os::unix::fs::MetadataExt;
        let kvm = Path::new("/dev/kvm");
        let meta = std::fs::metadata(kvm).map_err(io("stat", kvm))?;
        jail = jail.bind(kvm, true).group(meta.gid());
    }
    Ok(jail)
}

/// Binds the QMP listening socket at `path` (root's, 0600: only the agent connects).
pub(crate) fn qmp_listener(path: &Path) -> Result<OwnedFd, VmmError> {
    let _ = std::fs::remove_file(path);
    let listener = std::os::unix::net::UnixListener::bind(path).map_err(io("bind", path))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(io("chmod", path))?;
    Ok(listener.into())
}

/// Templates' RAM files as sealed memfds, shared by the clones that run from them while
/// any of those runs (each holds an `Arc`; the cache only a `Weak`).
#[derive(Debug, Default)]
pub(crate) struct SealedRam {
    cache: Mutex<Vec<(PathBuf, Stamp, Weak<OwnedFd>)>>,
}

impl SealedRam {
    /// The sealed copy of `file`, made now unless a live clone already has one of this
    /// version of it. Blocking (copies the file's data the first time).
    pub(crate) fn get(&self, file: &Path) -> Result<Arc<OwnedFd>, VmmError> {
        let stamp = Stamp::read(file).map_err(io("stat", file))?;
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        cache.retain(|(_, _, w)| w.strong_count() > 0);
        if let Some(fd) = cache
            .iter()
            .find(|(p, s, _)| p == file && *s == stamp)
            .and_then(|(_, _, w)| w.upgrade())
        {
            return Ok(fd);
        }
        let fd = Arc::new(sealed_copy(file).map_err(io("seal a copy of", file))?);
        cache.push((file.to_path_buf(), stamp, Arc::downgrade(&fd)));
        Ok(fd)
    }
}

/// A memfd holding `file`'s data (holes stay holes), sealed against any write, growth
/// or shrinking: mapped `MAP_PRIVATE` it is a clone's RAM, and no VMM can change the
/// pages other clones share.
fn sealed_copy(file: &Path) -> std::io::Result<OwnedFd> {
    use std::io::{Read, Seek, SeekFrom, Write};
    use std::os::fd::{AsRawFd, FromRawFd};
    let mut src = std::fs::File::open(file)?;
    let len = src.metadata()?.len();
    // SAFETY: memfd_create returns a new descriptor we own, or -1.
    let fd = unsafe {
        libc::memfd_create(
            c"nestbox-template-ram".as_ptr(),
            libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor nothing else owns.
    let mut dst = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    dst.set_len(len)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut pos = 0u64;
    while pos < len {
        // SAFETY: lseek on a descriptor we own.
        let data = unsafe { libc::lseek(src.as_raw_fd(), pos as libc::off_t, libc::SEEK_DATA) };
        if data < 0 {
            // ENXIO: only a hole remains.
            break;
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(src.as_raw_fd(), data, libc::SEEK_HOLE) };
        let end = if hole < 0 { len } else { hole as u64 };
        src.seek(SeekFrom::Start(data as u64))?;
        dst.seek(SeekFrom::Start(data as u64))?;
        let mut left = end - data as u64;
        while left > 0 {
            let n = buf.len().min(left as usize);
            src.read_exact(&mut buf[..n])?;
            dst.write_all(&buf[..n])?;
            left -= n as u64;
        }
        pos = end;
    }
    let seals = libc::F_SEAL_WRITE | libc::F_SEAL_GROW | libc::F_SEAL_SHRINK | libc::F_SEAL_SEAL;
    // SAFETY: fcntl on a descriptor we own.
    if unsafe { libc::fcntl(dst.as_raw_fd(), libc::F_ADD_SEALS, seals) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(dst.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_copies_hold_the_data_and_refuse_writes() {
        use std::io::{Read, Seek, SeekFrom, Write};
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("memory.ram");
        let mut f = std::fs::File::create(&file).unwrap();
        f.set_len(8 << 20).unwrap();
        f.seek(SeekFrom::Start(3 << 20)).unwrap();
        f.write_all(b"guest page").unwrap();
        drop(f);
        let sealed = SealedRam::default();
        let fd = sealed.get(&file).unwrap();
        // A second clone shares it while the first lives; a changed file gets a new one.
        assert!(Arc::ptr_eq(&fd, &sealed.get(&file).unwrap()));
        let mut copy = std::fs::File::from(fd.try_clone().unwrap());
        assert_eq!(copy.metadata().unwrap().len(), 8 << 20);
        let mut page = [0u8; 10];
        copy.seek(SeekFrom::Start(3 << 20)).unwrap();
        copy.read_exact(&mut page).unwrap();
        assert_eq!(&page, b"guest page");
        // Reopened read-write through /proc (as a jailed QEMU does): writes are refused.
        let path = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&copy));
        let mut rw = std::fs::OpenOptions::new().write(true).open(path).unwrap();
        assert!(rw.write_all(b"x").is_err());
        assert!(copy.set_len(1).is_err());
        drop((fd, copy, rw));
        std::fs::write(&file, "changed").unwrap();
        let again = sealed.get(&file).unwrap();
        assert_eq!(
            std::fs::File::from(again.try_clone().unwrap())
                .metadata()
                .unwrap()
                .len(),
            7
        );
    }
}
