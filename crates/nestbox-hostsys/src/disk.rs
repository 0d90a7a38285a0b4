//! Copy-on-write root disks.
//!
//! A template's root filesystem is stored shrunk (as small as `resize2fs -M` makes it). A
//! sandbox needs a disk of `disk_size_mb`, so [`BaseImages`] keeps, per template and size, a
//! sparse copy of the template expanded to that size (`truncate` + `resize2fs`: the seed's
//! EnsureImageSizes; no extra physical space). The default size is prepared when the agent
//! starts; other sizes on first use. Each sandbox then gets a qcow2 overlay backed by the
//! expanded base ([`create_overlay`]): creating one takes ~10 ms and writes ~200 KiB.
//!
//! Invariants: a base file at its final path is complete (built under a temporary name and
//! renamed); bases are never written once in use (overlays only read them); an overlay's
//! virtual size equals its base's size, so the guest's filesystem fills its disk.
//!
//! Filesystem images may come from guests (a team's image template is a sandbox's disk),
//! so the tools that parse them (`e2fsck`, `resize2fs`, `dumpe2fs`) never run as root:
//! each runs confined ([`Cmd::confined`]: as `nobody`, no capabilities, no new
//! privileges, no network, empty scratch directories) on the one image it is handed as a
//! descriptor, which belongs to `nobody` only while a tool writes it.
//!
//! The operations that run tools on images are behind [`DiskTools`] ([`Ext4Qcow2`] runs
//! the real tools), so the sandbox manager can be driven with a stand-in that makes no
//! image at all.

use std::future::Future;
use std::os::fd::OwnedFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;

use crate::process::{Cmd, Output, ProcessError};

/// The user filesystem tools run as (`nobody`).
const TOOL_USER: u32 = 65534;

/// Runs `tool args… /proc/self/fd/3` confined on the image at `path` (see the module
/// docs); with `write`, the image belongs to the tool's user while it runs, and to its
/// owner again after, whatever the outcome. Returns the output whatever the exit status.
async fn confined_tool(
    tool: &str,
    args: &[&str],
    path: &Path,
    write: bool,
) -> Result<Output, DiskError> {
    let meta = std::fs::metadata(path).map_err(io_err(path))?;
    if write {
        std::os::unix::fs::chown(path, Some(TOOL_USER), Some(TOOL_USER)).map_err(io_err(path))?;
    }
    let result = async {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(write)
            .open(path)
            .map_err(io_err(path))?;
        Cmd::new(tool)
            .args(args.iter().copied())
            .arg("/proc/self/fd/3")
            .confined(TOOL_USER, TOOL_USER, Some(OwnedFd::from(file)))
            .output()
            .await
            .map_err(|source| DiskError::Command {
                path: path.to_path_buf(),
                source,
            })
    }
    .await;
    if write {
        std::os::unix::fs::chown(path, Some(meta.uid()), Some(meta.gid())).map_err(io_err(path))?;
    }
    result
}

/// [`confined_tool`], a non-zero exit being [`ProcessError::Failed`] (unless listed in
/// `ok`).
async fn confined_run(
    tool: &str,
    args: &[&str],
    path: &Path,
    write: bool,
    ok: &[i32],
) -> Result<Output, DiskError> {
    let out = confined_tool(tool, args, path, write).await?;
    if out.status.code().is_some_and(|c| ok.contains(&c)) {
        return Ok(out);
    }
    Err(DiskError::Command {
        path: path.to_path_buf(),
        source: ProcessError::Failed {
            argv: format!("{tool} {} {}", args.join(" "), path.display()),
            status: crate::process::Exit::Status(out.status),
            stderr: crate::process::tail(if out.stderr.is_empty() {
                &out.stdout
            } else {
                &out.stderr
            }),
        },
    })
}

/// A disk operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// The template image is missing.
    #[error("template image {path} not found")]
    MissingImage {
        /// Where it was expected.
        path: PathBuf,
    },
    /// The requested size is smaller than the template's filesystem.
    #[error("a disk of {requested_mb} MiB is too small for this template (needs {min_mb} MiB)")]
    TooSmall {
        /// Requested size.
        requested_mb: u64,
        /// Smallest size that fits.
        min_mb: u64,
    },
    /// A tool failed.
    #[error("disk operation on {path}")]
    Command {
        /// The file being worked on.
        path: PathBuf,
        /// The failed command.
        #[source]
        source: ProcessError,
    },
    /// A file operation failed.
    #[error("disk file {path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> DiskError + '_ {
    move |source| DiskError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A boxed, sendable future (the trait is object-safe).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The operations that run tools on disk images: everything the sandbox manager does to
/// an image besides copying it.
pub trait DiskTools: Send + Sync {
    /// Grows the ext4 image at `path` to `size_mb` (see [`expand_ext4`]).
    fn expand<'a>(&'a self, path: &'a Path, size_mb: u64) -> BoxFuture<'a, Result<(), DiskError>>;
    /// Creates a qcow2 overlay of `base` (see [`create_overlay`]).
    fn create_overlay<'a>(
        &'a self,
        base: &'a Path,
        overlay: &'a Path,
        size_mb: Option<u64>,
    ) -> BoxFuture<'a, Result<(), DiskError>>;
    /// Writes the disk `overlay` over `backing` shows into a raw image (see [`flatten`]).
    fn flatten<'a>(
        &'a self,
        overlay: &'a Path,
        backing: &'a Path,
        out: &'a Path,
    ) -> BoxFuture<'a, Result<(), DiskError>>;
    /// Shrinks the ext4 image at `path`; returns its new size (see [`shrink_ext4`]).
    fn shrink<'a>(&'a self, path: &'a Path) -> BoxFuture<'a, Result<u64, DiskError>>;
}

/// The real tools: `resize2fs`, `e2fsck` and `dumpe2fs` confined, `qemu-img`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Ext4Qcow2;

impl DiskTools for Ext4Qcow2 {
    fn expand<'a>(&'a self, path: &'a Path, size_mb: u64) -> BoxFuture<'a, Result<(), DiskError>> {
        Box::pin(expand_ext4(path, size_mb))
    }
    fn create_overlay<'a>(
        &'a self,
        base: &'a Path,
        overlay: &'a Path,
        size_mb: Option<u64>,
    ) -> BoxFuture<'a, Result<(), DiskError>> {
        Box::pin(create_overlay(base, overlay, size_mb))
    }
    fn flatten<'a>(
        &'a self,
        overlay: &'a Path,
        backing: &'a Path,
        out: &'a Path,
    ) -> BoxFuture<'a, Result<(), DiskError>> {
        Box::pin(flatten(overlay, backing, out))
    }
    fn shrink<'a>(&'a self, path: &'a Path) -> BoxFuture<'a, Result<u64, DiskError>> {
        Box::pin(shrink_ext4(path))
    }
}

/// Expanded template images, per size.
#[derive(Debug, Clone)]
pub struct BaseImages {
    dir: PathBuf,
    /// Held (shared) from choosing a base until an overlay names it; pruning takes it
    /// exclusively, so it never removes a base a create is about to use.
    uses: std::sync::Arc<tokio::sync::RwLock<()>>,
}

impl BaseImages {
    /// Bases are kept under `dir` (created if missing).
    pub fn new(dir: impl Into<PathBuf>) -> Result<Self, DiskError> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        Ok(Self {
            dir,
            uses: Default::default(),
        })
    }

    /// Where the base of `template` at `size_mb` lives. `key` distinguishes builds of the
    /// same template (e.g. its recipe hash), so a rebuilt template never reuses old bases.
    pub fn path(&self, template: &str, key: &str, size_mb: u64) -> PathBuf {
        self.dir
            .join(template)
            .join(format!("{key}-{size_mb}m.ext4"))
    }

    /// Returns the base of `template` at `size_mb`, creating it from the shrunk `source`
    /// image if needed (expanded by `tools`). `min_mb` is the smallest disk the template's
    /// filesystem fits.
    pub async fn ensure(
        &self,
        tools: &dyn DiskTools,
        template: &str,
        key: &str,
        source: &Path,
        size_mb: u64,
        min_mb: u64,
    ) -> Result<PathBuf, DiskError> {
        if size_mb < min_mb {
            return Err(DiskError::TooSmall {
                requested_mb: size_mb,
                min_mb,
            });
        }
        let target = self.path(template, key, size_mb);
        if target.exists() {
            return Ok(target);
        }
        if !source.exists() {
            return Err(DiskError::MissingImage {
                path: source.to_path_buf(),
            });
        }
        let parent = target.parent().unwrap_or(&self.dir).to_path_buf();
        tokio::fs::create_dir_all(&parent)
            .await
            .map_err(io_err(&parent))?;
        // Each call builds its own copy: concurrent creates of a new size never share a
        // temporary file. The first to finish publishes it; the others find it there.
        static BUILDS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let tmp = parent.join(format!(
            ".{}.tmp-{}-{}",
            target
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or("base"),
            std::process::id(),
            BUILDS.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        let result = async {
            Cmd::new("cp")
                .arg("--sparse=always")
                .arg(source)
                .arg(&tmp)
                .run()
                .await
                .map_err(|e| DiskError::Command {
                    path: tmp.clone(),
                    source: e,
                })?;
            tools.expand(&tmp, size_mb).await?;
            // Published without replacing: a base already in place (a concurrent build
            // finished first) may be in use and stays as it is.
            match tokio::fs::hard_link(&tmp, &target).await {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
                Err(e) => Err(io_err(&target)(e)),
            }
        }
        .await;
        let _ = tokio::fs::remove_file(&tmp).await;
        result.map(|()| target)
    }

    /// A use of the bases: hold it from [`BaseImages::ensure`] until the overlay that
    /// names the base exists (or the create gave up).
    pub async fn use_guard(&self) -> tokio::sync::OwnedRwLockReadGuard<()> {
        self.uses.clone().read_owned().await
    }

    /// Removes every base that no overlay in `overlays` is backed by, that is not in
    /// `keep` and that was made more than `grace` ago (old builds, sizes no sandbox uses
    /// any more, deleted templates), and the template directories left empty. Bases being
    /// built are left alone.
    pub async fn prune_unused(
        &self,
        overlays: &[PathBuf],
        keep: &std::collections::HashSet<PathBuf>,
        grace: std::time::Duration,
    ) -> Result<usize, DiskError> {
        let _exclusive = self.uses.write().await;
        let mut in_use: std::collections::HashSet<PathBuf> = keep.clone();
        for overlay in overlays {
            if let Ok(Some(base)) = backing_file(overlay) {
                in_use.insert(base);
            }
        }
        let mut removed = 0;
        let Ok(templates) = std::fs::read_dir(&self.dir) else {
            return Ok(0);
        };
        for template in templates.flatten() {
            let Ok(files) = std::fs::read_dir(template.path()) else {
                continue;
            };
            for file in files.flatten() {
                let path = file.path();
                let building = file.file_name().to_string_lossy().starts_with('.');
                let recent = file
                    .metadata()
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.elapsed().ok())
                    .is_none_or(|age| age < grace);
                if !building && !recent && !in_use.contains(&path) {
                    std::fs::remove_file(&path).map_err(io_err(&path))?;
                    removed += 1;
                }
            }
            // Only if empty.
            let _ = std::fs::remove_dir(template.path());
        }
        Ok(removed)
    }
}

/// The backing file a qcow2 image names in its header (`None`: it has none), read from
/// the header itself (no tool runs on the image).
pub fn backing_file(qcow2: &Path) -> std::io::Result<Option<PathBuf>> {
    use std::io::{Read, Seek, SeekFrom};
    use std::os::unix::ffi::OsStringExt;
    let mut f = std::fs::File::open(qcow2)?;
    let mut header = [0u8; 20];
    f.read_exact(&mut header)?;
    if &header[..4] != b"QFI\xfb" {
        return Err(std::io::Error::other("not a qcow2 image"));
    }
    let offset = u64::from_be_bytes(header[8..16].try_into().unwrap_or_default());
    let size = u32::from_be_bytes(header[16..20].try_into().unwrap_or_default());
    if offset == 0 || size == 0 {
        return Ok(None);
    }
    if size > 4096 {
        return Err(std::io::Error::other("backing file name too long"));
    }
    let mut name = vec![0u8; size as usize];
    f.seek(SeekFrom::Start(offset))?;
    f.read_exact(&mut name)?;
    Ok(Some(PathBuf::from(std::ffi::OsString::from_vec(name))))
}

/// Grows the ext4 filesystem image at `path` to `size_mb` (sparse: no blocks are written
/// for the new space). Shrinking is refused by resize2fs.
pub async fn expand_ext4(path: &Path, size_mb: u64) -> Result<(), DiskError> {
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(io_err(path))?;
    file.set_len(size_mb * 1024 * 1024).map_err(io_err(path))?;
    drop(file);
    // Template images are checked when they are built and never mounted on the host, so
    // the "run e2fsck first" safety check of resize2fs is skipped with -f.
    confined_run("resize2fs", &["-f"], path, true, &[0]).await?;
    Ok(())
}

/// Creates a qcow2 overlay at `overlay` backed by the raw image `base`, with the base's
/// size, or `size_mb` when given (larger than the base: the guest grows its filesystem).
pub async fn create_overlay(
    base: &Path,
    overlay: &Path,
    size_mb: Option<u64>,
) -> Result<(), DiskError> {
    let mut cmd = Cmd::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
        .arg(base)
        .arg(overlay);
    if let Some(mb) = size_mb {
        cmd = cmd.arg(format!("{mb}M"));
    }
    cmd.run().await.map_err(|source| DiskError::Command {
        path: overlay.to_path_buf(),
        source,
    })?;
    Ok(())
}

/// Writes the whole disk seen through `overlay` (a qcow2 over the raw image `backing`)
/// into a standalone raw image at `out`. Zeroed regions stay holes, so the result is
/// sparse. The backing image is the one given, whatever the overlay's header names: a VMM
/// that ran the disk could have rewritten the header to point at any host file.
pub async fn flatten(overlay: &Path, backing: &Path, out: &Path) -> Result<(), DiskError> {
    let esc = |p: &Path| p.to_string_lossy().replace(',', ",,");
    let source = format!(
        "driver=qcow2,file.driver=file,file.filename={},backing.driver=raw,\
         backing.file.driver=file,backing.file.filename={}",
        esc(overlay),
        esc(backing)
    );
    Cmd::new("qemu-img")
        .args(["convert", "-q", "--image-opts"])
        .arg(source)
        .args(["-O", "raw"])
        .arg(out)
        .run()
        .await
        .map_err(|source| DiskError::Command {
            path: out.to_path_buf(),
            source,
        })?;
    Ok(())
}

/// Copies a file keeping its holes (a sparse copy).
pub async fn sparse_copy(from: &Path, to: &Path) -> Result<(), DiskError> {
    Cmd::new("cp")
        .arg("--sparse=always")
        .arg(from)
        .arg(to)
        .run()
        .await
        .map_err(|source| DiskError::Command {
            path: to.to_path_buf(),
            source,
        })?;
    Ok(())
}

/// Shrinks the ext4 image at `path` to its smallest size (checked first, then
/// `resize2fs -M`, then truncated to the filesystem). Returns the new size in bytes.
pub async fn shrink_ext4(path: &Path) -> Result<u64, DiskError> {
    // e2fsck exits 1 when it fixed something (a crash-consistent copy replays its journal).
    confined_run("e2fsck", &["-fy"], path, true, &[0, 1]).await?;
    confined_run("resize2fs", &["-f", "-M"], path, true, &[0]).await?;
    let out = confined_run("dumpe2fs", &["-h"], path, false, &[0]).await?;
    let text = String::from_utf8_lossy(&out.stdout);
    let field = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split(':').nth(1))
            .and_then(|v| v.trim().parse::<u64>().ok())
    };
    let (Some(blocks), Some(block_size)) = (field("Block count"), field("Block size")) else {
        return Err(DiskError::Io {
            path: path.to_path_buf(),
            source: std::io::Error::other("dumpe2fs printed no block count"),
        });
    };
    let size = blocks * block_size;
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(io_err(path))?;
    file.set_len(size).map_err(io_err(path))?;
    Ok(size)
}

/// Bytes actually allocated on the host for `path` (sparse files count only written
/// blocks).
pub fn allocated_bytes(path: &Path) -> Result<u64, DiskError> {
    let meta = std::fs::metadata(path).map_err(io_err(path))?;
    Ok(meta.blocks() * 512)
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn make_ext4(path: &Path, size_mb: u64) {
        Cmd::new("mkfs.ext4")
            .args(["-q", "-F"])
            .arg(path)
            .arg(format!("{size_mb}M"))
            .run()
            .await
            .unwrap();
    }

    fn tools_present() -> bool {
        ["mkfs.ext4", "resize2fs", "e2fsck", "qemu-img"]
            .iter()
            .all(|t| {
                std::env::var_os("PATH")
                    .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(t).exists()))
            })
    }

    #[tokio::test]
    async fn flattening_reads_the_recorded_backing_image_not_the_header() {
        assert!(tools_present(), "needs e2fsprogs and qemu-utils installed");
        let dir = tempfile::tempdir().unwrap();
        let image = |name: &str, mark: &[u8]| {
            let path = dir.path().join(name);
            let mut data = mark.to_vec();
            data.resize(1 << 20, 0);
            std::fs::write(&path, data).unwrap();
            path
        };
        let base = image("base.raw", b"BASEDATA");
        // A header rewritten to name another host file (as a VMM that ran the disk could).
        let secret = image("secret.raw", b"SECRETS!");
        let overlay = dir.path().join("o.qcow2");
        create_overlay(&secret, &overlay, None).await.unwrap();
        let flat = dir.path().join("flat.raw");
        flatten(&overlay, &base, &flat).await.unwrap();
        assert_eq!(&std::fs::read(&flat).unwrap()[..8], b"BASEDATA");
    }

    #[tokio::test]
    async fn ensure_expands_sparsely_and_caches() {
        assert!(tools_present(), "needs e2fsprogs and qemu-utils installed");
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("rootfs.ext4");
        make_ext4(&src, 32).await;
        let bases = BaseImages::new(dir.path().join("bases")).unwrap();
        let err = bases
            .ensure(&Ext4Qcow2, "t", "k1", &src, 16, 32)
            .await
            .unwrap_err();
        assert!(matches!(err, DiskError::TooSmall { .. }));
        let base = bases
            .ensure(&Ext4Qcow2, "t", "k1", &src, 256, 32)
            .await
            .unwrap();
        let meta = std::fs::metadata(&base).unwrap();
        assert_eq!(meta.len(), 256 * 1024 * 1024);
        assert!(
            allocated_bytes(&base).unwrap() < 64 * 1024 * 1024,
            "expanded sparsely"
        );
        // Cached: same path, untouched.
        let again = bases
            .ensure(&Ext4Qcow2, "t", "k1", &src, 256, 32)
            .await
            .unwrap();
        assert_eq!(base, again);
        let overlay = dir.path().join("o.qcow2");
        create_overlay(&base, &overlay, None).await.unwrap();
        assert!(allocated_bytes(&overlay).unwrap() < 1024 * 1024);
        // Flatten the overlay back into a standalone sparse image, and shrink it.
        let flat = dir.path().join("flat.ext4");
        flatten(&overlay, &base, &flat).await.unwrap();
        assert_eq!(std::fs::metadata(&flat).unwrap().len(), 256 * 1024 * 1024);
        assert!(
            allocated_bytes(&flat).unwrap() < 64 * 1024 * 1024,
            "flattening keeps holes"
        );
        let shrunk = shrink_ext4(&flat).await.unwrap();
        assert!(shrunk < 64 * 1024 * 1024, "shrunk to {shrunk}");
        assert_eq!(std::fs::metadata(&flat).unwrap().len(), shrunk);
        // Concurrent first builds of one new size agree on one whole base and leave no
        // temporary file.
        let ensure = || bases.ensure(&Ext4Qcow2, "t", "k1", &src, 512, 32);
        let built = tokio::join!(ensure(), ensure(), ensure(), ensure());
        let built = [built.0, built.1, built.2, built.3];
        let first = built[0].as_ref().unwrap().clone();
        assert!(built.iter().all(|b| b.as_ref().unwrap() == &first));
        assert_eq!(std::fs::metadata(&first).unwrap().len(), 512 * 1024 * 1024);
        Cmd::new("e2fsck")
            .arg("-fn")
            .arg(&first)
            .run()
            .await
            .unwrap();
        let names: Vec<String> = std::fs::read_dir(first.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(names.iter().all(|n| !n.contains(".tmp-")), "{names:?}");
        // Pruning keeps what an overlay is backed by and what is asked to be kept, and
        // removes the rest (the 512 MiB base, an old build's).
        assert_eq!(backing_file(&overlay).unwrap(), Some(base.clone()));
        let kept = bases
            .ensure(&Ext4Qcow2, "t", "k2", &src, 64, 32)
            .await
            .unwrap();
        let keep = std::collections::HashSet::from([kept.clone()]);
        assert_eq!(
            bases
                .prune_unused(
                    std::slice::from_ref(&overlay),
                    &keep,
                    std::time::Duration::ZERO
                )
                .await
                .unwrap(),
            1
        );
        assert!(base.exists() && kept.exists() && !first.exists());
        // Without its overlay, the base goes too.
        std::fs::remove_file(&overlay).unwrap();
        // Young bases are left alone (a create may be about to use one).
        assert_eq!(
            bases
                .prune_unused(&[], &keep, std::time::Duration::from_secs(3600))
                .await
                .unwrap(),
            0
        );
        assert_eq!(
            bases
                .prune_unused(&[], &keep, std::time::Duration::ZERO)
                .await
                .unwrap(),
            1
        );
        assert!(!base.exists() && kept.exists());
        assert_eq!(backing_file(&flat).ok(), None, "not a qcow2 image");
    }
}
