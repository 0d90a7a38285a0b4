//! File work behind snapshots: digests (full and sampled), the kernel digest cache, and
//! moving or copying guest RAM files sparsely. Everything here blocks: callers run it on
//! `spawn_blocking`.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use sha2::{Digest, Sha256};

use super::{ImageDigest, SampledDigest};

/// Block size of the sampled RAM digest (one guest page).
pub const SAMPLE_BLOCK: u64 = 4096;
/// How many blocks the sampled RAM digest reads (1 MiB in all).
pub const SAMPLE_BLOCKS: u64 = 256;
/// Name of the sampling scheme, recorded in the manifest.
pub const SAMPLE_ALGORITHM: &str = "sha256-stratified-4k-v1";

/// Granularity of hole detection when copying RAM: a zero page stays a hole.
const ZERO_BLOCK: usize = 4096;
/// Read size of the sparse copy.
const COPY_CHUNK: usize = 1 << 20;

/// SHA-256 of a whole file, hex.
pub fn sha256_file(path: &Path) -> io::Result<String> {
    let mut f = File::open(path)?;
    let mut h = Sha256::new();
    io::copy(&mut f, &mut h)?;
    Ok(hex::encode(h.finalize()))
}

/// A fresh seed for [`sampled_digest`]: different snapshots sample different blocks.
/// Below 2^53, so any JSON reader holds it exactly.
pub fn new_seed() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    splitmix64(nanos ^ (u64::from(std::process::id()) << 32)) & ((1 << 53) - 1)
}

fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The sampled digest of a RAM file of `size` bytes: the file is cut into
/// [`SAMPLE_BLOCKS`] equal strata and one 4 KiB block is read at a seed-chosen place in
/// each; the digest covers the size, the seed, each block's index and its bytes. A file
/// shorter than `size` fails with `UnexpectedEof`.
pub fn sampled_digest(path: &Path, size: u64, seed: u64) -> io::Result<SampledDigest> {
    let f = File::open(path)?;
    let total = size.div_ceil(SAMPLE_BLOCK);
    let n = SAMPLE_BLOCKS.min(total);
    let mut h = Sha256::new();
    h.update(SAMPLE_ALGORITHM.as_bytes());
    h.update(size.to_le_bytes());
    h.update(seed.to_le_bytes());
    let mut buf = vec![0u8; SAMPLE_BLOCK as usize];
    for i in 0..n {
        let lo = total * i / n;
        let hi = (total * (i + 1) / n).max(lo + 1);
        let index = lo + splitmix64(seed ^ i) % (hi - lo);
        let offset = index * SAMPLE_BLOCK;
        let len = SAMPLE_BLOCK.min(size - offset) as usize;
        f.read_exact_at(&mut buf[..len], offset)?;
        h.update(index.to_le_bytes());
        h.update(&buf[..len]);
    }
    Ok(SampledDigest {
        algorithm: SAMPLE_ALGORITHM.into(),
        block_size: SAMPLE_BLOCK,
        blocks: n,
        seed,
        sha256: hex::encode(h.finalize()),
    })
}

/// Bytes a file really occupies (holes excluded).
pub fn allocated_bytes(path: &Path) -> io::Result<u64> {
    Ok(std::fs::metadata(path)?.blocks() * 512)
}

/// What identifies a file's content cheaply (device, inode, size, times): a changed
/// stamp means "hash again".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: i128,
    ctime_ns: i128,
}

impl Stamp {
    /// The stamp of `path` now.
    pub fn read(path: &Path) -> io::Result<Self> {
        Ok(Self::of(&std::fs::metadata(path)?))
    }

    fn of(meta: &std::fs::Metadata) -> Self {
        let ns = |s: i64, n: i64| i128::from(s) * 1_000_000_000 + i128::from(n);
        Self {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.len(),
            mtime_ns: ns(meta.mtime(), meta.mtime_nsec()),
            ctime_ns: ns(meta.ctime(), meta.ctime_nsec()),
        }
    }
}

/// SHA-256 of kernel and initramfs images, remembered per path while the file's inode,
/// size and times stay the same: the 50 MB kernel is hashed once per driver, not on
/// every snapshot or restore.
#[derive(Debug, Default)]
pub struct DigestCache {
    entries: Mutex<HashMap<PathBuf, (Stamp, String)>>,
}

impl DigestCache {
    /// The digest of `path`, from the cache when the file has not changed.
    pub fn digest(&self, path: &Path) -> io::Result<ImageDigest> {
        self.digest_stamped(path).map(|(d, _)| d)
    }

    /// The digest of `path` and the stamp it belongs to.
    pub fn digest_stamped(&self, path: &Path) -> io::Result<(ImageDigest, Stamp)> {
        let stamp = Stamp::read(path)?;
        let cached = self.entries.lock().ok().and_then(|m| {
            m.get(path)
                .filter(|(s, _)| *s == stamp)
                .map(|(_, h)| h.clone())
        });
        let sha256 = match cached {
            Some(h) => h,
            None => {
                let h = sha256_file(path)?;
                // Changed while we hashed: do not trust (or remember) the result.
                if Stamp::read(path)? != stamp {
                    return Err(io::Error::other("the file changed while it was hashed"));
                }
                if let Ok(mut m) = self.entries.lock() {
                    m.insert(path.to_path_buf(), (stamp, h.clone()));
                }
                h
            }
        };
        let shown = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
        let digest = ImageDigest {
            path: shown.to_string_lossy().into_owned(),
            size: stamp.size,
            sha256,
        };
        Ok((digest, stamp))
    }

    /// The digest of `path` as it was when `stamp` was taken; an error if the file has
    /// changed since (a VM's kernel replaced after it booted must not be recorded as
    /// the kernel it booted).
    pub fn digest_unchanged(&self, path: &Path, stamp: Stamp) -> io::Result<ImageDigest> {
        let (digest, now) = self.digest_stamped(path)?;
        if now != stamp {
            return Err(io::Error::other(
                "the file was replaced or modified since the vm booted from it",
            ));
        }
        Ok(digest)
    }
}

/// How a file got to its destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Placement {
    /// Renamed: no data was copied (same filesystem).
    Moved,
    /// A copy-on-write clone (`FICLONE`: XFS, btrfs).
    Reflinked,
    /// A sparse copy: only non-zero pages were written.
    Copied,
}

/// Copies `src` to the new file `dst` (which must not exist): a reflink where the
/// filesystem can, otherwise a sparse copy that skips holes and leaves zero pages as
/// holes (like `cp --sparse=always`). `dst` is removed on failure.
pub fn copy_sparse(src: &Path, dst: &Path) -> io::Result<Placement> {
    let s = File::open(src)?;
    let d = OpenOptions::new().write(true).create_new(true).open(dst)?;
    let result = copy_into(&s, &d);
    if result.is_err() {
        let _ = std::fs::remove_file(dst);
    }
    result
}

fn copy_into(s: &File, d: &File) -> io::Result<Placement> {
    // SAFETY: ioctl(FICLONE) takes the source fd as its argument; both fds are open.
    if unsafe { libc::ioctl(d.as_raw_fd(), libc::FICLONE, s.as_raw_fd()) } == 0 {
        return Ok(Placement::Reflinked);
    }
    let size = s.metadata()?.len();
    d.set_len(size)?;
    let mut buf = vec![0u8; COPY_CHUNK];
    let mut pos = 0u64;
    while pos < size {
        let Some(data) = seek(s, pos, libc::SEEK_DATA)? else {
            break;
        };
        let hole = seek(s, data, libc::SEEK_HOLE)?.unwrap_or(size).min(size);
        let mut off = data;
        while off < hole {
            let len = COPY_CHUNK.min((hole - off) as usize);
            s.read_exact_at(&mut buf[..len], off)?;
            write_nonzero_runs(d, &buf[..len], off)?;
            off += len as u64;
        }
        pos = hole.max(data + 1);
    }
    Ok(Placement::Copied)
}

/// The first region of data of `f` at or after `from`, as `[start, end)` (`end` at most
/// `size`); `None` when only holes follow. Filesystems without hole support report
/// everything as data.
pub fn next_data(f: &File, from: u64, size: u64) -> io::Result<Option<(u64, u64)>> {
    if from >= size {
        return Ok(None);
    }
    let Some(start) = seek(f, from, libc::SEEK_DATA)?.filter(|s| *s < size) else {
        return Ok(None);
    };
    let end = seek(f, start, libc::SEEK_HOLE)?.unwrap_or(size).min(size);
    Ok(Some((start, end.max(start + 1).min(size))))
}

/// `lseek(SEEK_DATA | SEEK_HOLE)`; `None` past the last data. Filesystems without hole
/// support report everything as data.
fn seek(f: &File, from: u64, whence: i32) -> io::Result<Option<u64>> {
    let from = i64::try_from(from).map_err(io::Error::other)?;
    // SAFETY: lseek on an open fd; it only moves the file offset, which we never use
    // (all reads are positional).
    let r = unsafe { libc::lseek(f.as_raw_fd(), from, whence) };
    if r >= 0 {
        return Ok(Some(r as u64));
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::ENXIO) => Ok(None),
        Some(libc::EINVAL) if whence == libc::SEEK_DATA => Ok(Some(from as u64)),
        Some(libc::EINVAL) => Ok(None),
        _ => Err(e),
    }
}

fn write_nonzero_runs(d: &File, buf: &[u8], base: u64) -> io::Result<()> {
    let is_zero = |b: &[u8]| b.iter().fold(0u8, |acc, x| acc | x) == 0;
    let mut i = 0;
    while i < buf.len() {
        let end = (i + ZERO_BLOCK).min(buf.len());
        if is_zero(&buf[i..end]) {
            i = end;
            continue;
        }
        let start = i;
        i = end;
        while i < buf.len() {
            let end = (i + ZERO_BLOCK).min(buf.len());
            if is_zero(&buf[i..end]) {
                break;
            }
            i = end;
        }
        d.write_all_at(&buf[start..i], base + start as u64)?;
    }
    Ok(())
}

/// Puts `src` at `dst` (which must not exist) without copying when it can: a rename;
/// across filesystems a reflink or sparse copy, and then `src` is **left in place** (the
/// caller removes it once it no longer needs a way back).
pub fn rename_or_copy(src: &Path, dst: &Path) -> io::Result<Placement> {
    if dst.symlink_metadata().is_ok() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!("{} exists", dst.display()),
        ));
    }
    match std::fs::rename(src, dst) {
        Ok(()) => Ok(Placement::Moved),
        Err(e) if e.raw_os_error() == Some(libc::EXDEV) => copy_sparse(src, dst),
        Err(e) => Err(e),
    }
}

/// Undoes [`rename_or_copy`]: renames back, or removes the copy.
pub fn undo_placement(src: &Path, dst: &Path, how: Placement) -> io::Result<()> {
    match how {
        Placement::Moved => std::fs::rename(dst, src),
        Placement::Reflinked | Placement::Copied => std::fs::remove_file(dst),
    }
}

/// fsync of a file or directory (a no-op on tmpfs; makes snapshots on disks durable
/// before their manifest appears).
pub fn sync_path(path: &Path) -> io::Result<()> {
    File::open(path)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sparse_file(path: &Path, size: u64, pages: &[(u64, u8)]) {
        let f = File::create(path).unwrap();
        f.set_len(size).unwrap();
        for (page, byte) in pages {
            f.write_all_at(&[*byte; 4096], page * 4096).unwrap();
        }
    }

    #[test]
    fn sparse_copy_keeps_content_and_holes() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        let dst = dir.path().join("dst");
        // Data pages, a written-but-zero page, holes, and a partial last page.
        sparse_file(&src, 64 << 20, &[(0, 1), (7, 0), (8, 2), (9, 3), (4000, 4)]);
        {
            let f = OpenOptions::new().write(true).open(&src).unwrap();
            f.set_len((64 << 20) + 100).unwrap();
            f.write_all_at(&[5u8; 100], 64 << 20).unwrap();
        }
        let how = copy_sparse(&src, &dst).unwrap();
        assert!(matches!(how, Placement::Copied | Placement::Reflinked));
        assert_eq!(std::fs::read(&src).unwrap(), std::fs::read(&dst).unwrap());
        if how == Placement::Copied {
            // 4 data pages + the tail; the zero page became a hole.
            assert!(allocated_bytes(&dst).unwrap() <= 6 * 4096 + 8192);
        }
        // Never overwrites.
        assert_eq!(
            copy_sparse(&src, &dst).unwrap_err().kind(),
            io::ErrorKind::AlreadyExists
        );
    }

    #[test]
    fn rename_refuses_to_overwrite_and_can_be_undone() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        std::fs::write(&a, b"x").unwrap();
        std::fs::write(&b, b"y").unwrap();
        assert!(rename_or_copy(&a, &b).is_err());
        std::fs::remove_file(&b).unwrap();
        assert_eq!(rename_or_copy(&a, &b).unwrap(), Placement::Moved);
        assert!(!a.exists() && std::fs::read(&b).unwrap() == b"x");
        undo_placement(&a, &b, Placement::Moved).unwrap();
        assert!(a.exists() && !b.exists());
    }

    #[test]
    fn across_filesystems_the_source_stays_until_the_caller_removes_it() {
        let shm = Path::new("/dev/shm");
        if !shm.is_dir() {
            return;
        }
        let here = tempfile::tempdir().unwrap();
        let there = tempfile::tempdir_in(shm).unwrap();
        let a = here.path().join("a");
        let b = there.path().join("b");
        std::fs::write(&a, vec![7u8; 10000]).unwrap();
        let how = rename_or_copy(&a, &b).unwrap();
        if how != Placement::Moved {
            assert!(a.exists(), "the source is kept after a copy");
            assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
            undo_placement(&a, &b, how).unwrap();
            assert!(!b.exists());
        }
    }

    #[test]
    fn sampled_digest_sees_truncation_and_replacement() {
        let dir = tempfile::tempdir().unwrap();
        let ram = dir.path().join("ram");
        let size = 16u64 << 20;
        // Every page differs: any sampled page tells the files apart.
        {
            let f = File::create(&ram).unwrap();
            for page in 0..size / 4096 {
                f.write_all_at(&page.to_le_bytes(), page * 4096).unwrap();
            }
        }
        let d1 = sampled_digest(&ram, size, 42).unwrap();
        assert_eq!(d1, sampled_digest(&ram, size, 42).unwrap());
        assert_eq!(d1.blocks, SAMPLE_BLOCKS);
        assert_ne!(d1.sha256, sampled_digest(&ram, size, 43).unwrap().sha256);
        // Replaced by other content of the same size.
        let other = dir.path().join("other");
        sparse_file(&other, size, &[]);
        assert_ne!(d1.sha256, sampled_digest(&other, size, 42).unwrap().sha256);
        // Truncated.
        File::options()
            .write(true)
            .open(&ram)
            .unwrap()
            .set_len(size / 2)
            .unwrap();
        assert_eq!(
            sampled_digest(&ram, size, 42).unwrap_err().kind(),
            io::ErrorKind::UnexpectedEof
        );
    }

    #[test]
    fn digest_cache_rehashes_changed_files() {
        let dir = tempfile::tempdir().unwrap();
        let k = dir.path().join("vmlinux");
        std::fs::write(&k, b"kernel one").unwrap();
        let cache = DigestCache::default();
        let d1 = cache.digest(&k).unwrap();
        assert_eq!(d1.sha256, sha256_file(&k).unwrap());
        assert_eq!(cache.digest(&k).unwrap(), d1);
        // A replaced file (new inode) is hashed again.
        let tmp = dir.path().join("new");
        std::fs::write(&tmp, b"kernel two").unwrap();
        std::fs::rename(&tmp, &k).unwrap();
        assert_ne!(cache.digest(&k).unwrap().sha256, d1.sha256);
        // A stamp from before the replacement is refused.
        let old = Stamp::read(&k).unwrap();
        let tmp = dir.path().join("newer");
        std::fs::write(&tmp, b"kernel three").unwrap();
        std::fs::rename(&tmp, &k).unwrap();
        assert!(cache.digest_unchanged(&k, old).is_err());
        let now = Stamp::read(&k).unwrap();
        assert_eq!(
            cache.digest_unchanged(&k, now).unwrap().sha256,
            sha256_file(&k).unwrap()
        );
    }
}
