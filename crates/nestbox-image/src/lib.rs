//! Builds Nestbox guest images: a kernel with its initramfs, and one ext4 root
//! filesystem per template.
//!
//! ```text
//! out/kernels/<kernel version>/{vmlinux, initramfs.cpio, kernel.json}
//! out/templates/<name>/{rootfs.ext4, template.json}
//! ```
//!
//! - The kernel is Debian's cloud kernel (resolved and downloaded through a private apt
//!   state for the chosen mirror and suite, see [`apt`]) or one the user supplies. The
//!   PVH `vmlinux` is extracted from the bzImage ([`kernel`]).
//! - The initramfs is `/init` = the static guest binary, plus the virtio modules and
//!   their load order ([`initramfs`]). The contract with the guest is documented in
//!   `nestbox-guest`'s `init` module.
//! - Root filesystems are debootstrap trees (cached) + our files, packed with
//!   `mkfs.ext4 -d` and stored shrunk ([`rootfs`], [`ext4`]). The host agent grows them
//!   with [`expand_image`].
//!
//! Outputs are cached by content: each manifest records the hash of every input (recipe,
//! mirror, suite, kernel package version, guest binary, builder version), and an output
//! with the same hash is not rebuilt. Every output is built in a temporary directory
//! beside its final place and swapped in atomically (`renameat2(RENAME_EXCHANGE)`), so a
//! failed or interrupted build leaves the previous output intact.
//!
//! Called by the CLI (`nestbox image build`).

pub mod apt;
mod elf;
mod error;
pub mod ext4;
pub mod initramfs;
pub mod kernel;
pub mod manifest;
pub mod progress;
pub mod rootfs;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

pub use error::ImageError;
pub(crate) use error::blocking;
pub use ext4::{Expansion, expand_image};
pub use kernel::KernelSource;
pub use manifest::{
    BUILDER_VERSION, BootProtocol, FORMAT_VERSION, ImageStore, KernelImage, KernelManifest, Recipe,
    TemplateImage, TemplateManifest,
};
pub use progress::{ConsoleProgress, NoProgress, Progress, StepOutcome};

use crate::manifest::{hash_json, write_manifest};
use crate::progress::Step;

/// The default Debian mirror.
pub const DEFAULT_MIRROR: &str = "http://deb.debian.org/debian";
/// The default Debian suite.
pub const DEFAULT_SUITE: &str = "bookworm";
/// Host name baked into templates (the host agent sets the real one with `nbx.hostname`).
pub const DEFAULT_HOSTNAME: &str = "nestbox";

/// What to build and where.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    /// Output directory (the layout above).
    pub out_dir: PathBuf,
    /// Cache for downloads, unpacked kernels and debootstrap trees.
    pub cache_dir: PathBuf,
    /// The static `nestbox-guest` binary.
    pub guest_binary: PathBuf,
    /// Debian mirror URL.
    pub mirror: String,
    /// Debian suite.
    pub suite: String,
    /// Where the kernel comes from.
    pub kernel: KernelSource,
    /// Templates to build.
    pub templates: Vec<Recipe>,
    /// Rebuild even when the outputs are up to date.
    pub force: bool,
}

impl BuildOptions {
    /// Defaults: Debian bookworm from deb.debian.org, the cloud kernel, the `minimal`
    /// template.
    pub fn new(
        out_dir: impl Into<PathBuf>,
        cache_dir: impl Into<PathBuf>,
        guest_binary: impl Into<PathBuf>,
    ) -> Self {
        Self {
            out_dir: out_dir.into(),
            cache_dir: cache_dir.into(),
            guest_binary: guest_binary.into(),
            mirror: DEFAULT_MIRROR.into(),
            suite: DEFAULT_SUITE.into(),
            kernel: KernelSource::default(),
            templates: vec![Recipe::minimal()],
            force: false,
        }
    }

    fn validate(&self) -> Result<(), ImageError> {
        let mirror = self.mirror.trim_end_matches('/');
        if !(mirror.starts_with("http://")
            || mirror.starts_with("https://")
            || mirror.starts_with("file:/"))
        {
            return Err(ImageError::InvalidOption {
                field: "mirror",
                reason: format!("`{}` is not an http(s):// or file:/ URL", self.mirror),
            });
        }
        if self.suite.is_empty()
            || !self
                .suite
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-')
        {
            return Err(ImageError::InvalidOption {
                field: "suite",
                reason: format!("`{}`", self.suite),
            });
        }
        let mut names = std::collections::BTreeSet::new();
        for r in &self.templates {
            r.validate()?;
            if !names.insert(&r.name) {
                return Err(ImageError::InvalidOption {
                    field: "templates",
                    reason: format!("`{}` is listed twice", r.name),
                });
            }
        }
        Ok(())
    }
}

/// The kernel part of a build.
#[derive(Debug, Clone)]
pub struct KernelArtifact {
    /// The located kernel and initramfs.
    pub image: KernelImage,
    /// True when it was already up to date.
    pub cached: bool,
}

/// One template of a build.
#[derive(Debug, Clone)]
pub struct TemplateArtifact {
    /// The located template.
    pub image: TemplateImage,
    /// True when it was already up to date.
    pub cached: bool,
}

/// What a build produced.
#[derive(Debug, Clone)]
pub struct BuildReport {
    /// The kernel and initramfs.
    pub kernel: KernelArtifact,
    /// The templates, in the order asked for.
    pub templates: Vec<TemplateArtifact>,
    /// Wall time of the whole build.
    pub elapsed: Duration,
}

impl BuildReport {
    /// True when nothing had to be rebuilt.
    pub fn all_cached(&self) -> bool {
        self.kernel.cached && self.templates.iter().all(|t| t.cached)
    }
}

/// Hex SHA-256 of a file, off the async runtime.
pub async fn sha256_file(path: &Path) -> Result<String, ImageError> {
    let path = path.to_path_buf();
    blocking(move || {
        use std::io::Read;
        let mut f = std::fs::File::open(&path).map_err(ImageError::io("open", &path))?;
        let mut h = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = f.read(&mut buf).map_err(ImageError::io("read", &path))?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
        }
        Ok(hex::encode(h.finalize()))
    })
    .await
}

/// Checks the guest binary is a static x86-64 ELF executable; returns its SHA-256.
async fn check_guest(path: &Path) -> Result<String, ImageError> {
    let p = path.to_path_buf();
    let head = blocking(move || {
        let bytes = std::fs::read(&p).map_err(|e| ImageError::GuestBinary {
            path: p.clone(),
            detail: e.to_string(),
        })?;
        Ok(bytes)
    })
    .await?;
    match elf::is_static_executable(&head) {
        Some(true) => {}
        Some(false) => {
            return Err(ImageError::GuestBinary {
                path: path.into(),
                detail: "dynamically linked; build it with RUSTFLAGS=\"-C target-feature=+crt-static\" cargo build \
                         --profile guest -p nestbox-guest --target x86_64-unknown-linux-gnu"
                    .into(),
            });
        }
        None => {
            return Err(ImageError::GuestBinary {
                path: path.into(),
                detail: "not an ELF executable".into(),
            });
        }
    }
    sha256_file(path).await
}

/// Whether the manifest at `path` records `inputs_hash`.
fn up_to_date<T: for<'de> serde::Deserialize<'de>>(
    path: &Path,
    inputs_hash: &str,
    get: impl Fn(&T) -> &str,
) -> bool {
    manifest::read_manifest::<T>(path)
        .map(|m| get(&m) == inputs_hash)
        .unwrap_or(false)
}

/// Moves a finished temporary directory into place, swapping atomically with an existing
/// output (the old one then sits in `tmp` and is removed with it).
fn publish(tmp: tempfile::TempDir, target: &Path) -> Result<(), ImageError> {
    if target.exists() {
        let from =
            std::ffi::CString::new(tmp.path().as_os_str().as_encoded_bytes()).map_err(|_| {
                ImageError::InvalidOption {
                    field: "out_dir",
                    reason: "contains NUL".into(),
                }
            })?;
        let to = std::ffi::CString::new(target.as_os_str().as_encoded_bytes()).map_err(|_| {
            ImageError::InvalidOption {
                field: "out_dir",
                reason: "contains NUL".into(),
            }
        })?;
        // SAFETY: two valid NUL-terminated paths; renameat2 does not retain them.
        let rc = unsafe {
            libc::renameat2(
                libc::AT_FDCWD,
                from.as_ptr(),
                libc::AT_FDCWD,
                to.as_ptr(),
                libc::RENAME_EXCHANGE,
            )
        };
        if rc != 0 {
            return Err(ImageError::Io {
                op: "swap into place",
                path: target.into(),
                source: std::io::Error::last_os_error(),
            });
        }
        drop(tmp);
    } else {
        let path = tmp.keep();
        std::fs::rename(&path, target).map_err(ImageError::io("rename into place", target))?;
    }
    Ok(())
}

fn now_rfc3339() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

fn tempdir_in(dir: &Path, prefix: &str) -> Result<tempfile::TempDir, ImageError> {
    std::fs::create_dir_all(dir).map_err(ImageError::io("create", dir))?;
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in(dir)
        .map_err(ImageError::io("create a directory in", dir))
}

/// Builds the kernel + initramfs and the requested templates. See the crate docs.
pub async fn build(
    opts: &BuildOptions,
    progress: &dyn Progress,
) -> Result<BuildReport, ImageError> {
    let started = Instant::now();
    opts.validate()?;
    // apt and debootstrap resolve relative paths against other roots: use absolute ones.
    let mut opts = opts.clone();
    for (field, p) in [
        ("out_dir", &mut opts.out_dir),
        ("cache_dir", &mut opts.cache_dir),
        ("guest_binary", &mut opts.guest_binary),
    ] {
        *p = std::path::absolute(&*p).map_err(|e| ImageError::InvalidOption {
            field,
            reason: format!("{}: {e}", p.display()),
        })?;
    }
    let opts = &opts;
    let mirror = opts.mirror.trim_end_matches('/').to_string();
    let guest_sha = check_guest(&opts.guest_binary).await?;
    let store = ImageStore::new(&opts.out_dir);

    let apt = match &opts.kernel {
        KernelSource::Debian { .. } => {
            Some(apt::PrivateApt::new(&opts.cache_dir, &mirror, &opts.suite)?)
        }
        KernelSource::Local { .. } => None,
    };
    let resolved = kernel::resolve(&opts.kernel, apt.as_ref(), progress).await?;

    // Kernel and initramfs.
    let kernel_hash = hash_json(&(BUILDER_VERSION, &resolved.identity, &guest_sha));
    let kdir = store.kernel_dir(&resolved.version);
    let step = Step::start(progress, format!("kernel {} + initramfs", resolved.version));
    let kernel_cached = !opts.force
        && up_to_date::<KernelManifest>(&kdir.join("kernel.json"), &kernel_hash, |m| {
            &m.inputs_hash
        })
        && store
            .kernel(&resolved.version)
            .is_ok_and(|k| k.kernel.is_file() && k.initramfs.is_file());
    if kernel_cached {
        step.cached();
    } else {
        let files = kernel::materialize(&resolved, apt.as_ref(), &opts.cache_dir, progress).await?;
        let (image, boot_protocol, fallback) = kernel::bootable_image(&files.image).await?;
        if let Some(why) = fallback {
            step.output(&format!("booting the bzImage: {why}"));
        }
        let modules =
            kernel::collect_modules(files.modules_dir.as_deref(), &resolved.version).await?;
        let tmp = tempdir_in(&opts.out_dir.join("kernels"), ".tmp-")?;
        let image_name = match boot_protocol {
            BootProtocol::Pvh => "vmlinux",
            BootProtocol::Bzimage => "vmlinuz",
        };
        {
            let p = tmp.path().join(image_name);
            blocking(move || std::fs::write(&p, image).map_err(ImageError::io("write", &p)))
                .await?;
        }
        initramfs::build(
            &tmp.path().join("initramfs.cpio"),
            &opts.guest_binary,
            &modules,
        )
        .await?;
        let m = KernelManifest {
            format_version: FORMAT_VERSION,
            kernel_version: resolved.version.clone(),
            source: resolved.identity.clone(),
            image: image_name.into(),
            boot_protocol,
            initramfs: "initramfs.cpio".into(),
            modules: modules.iter().map(|m| format!("{}.ko", m.name)).collect(),
            guest_sha256: guest_sha.clone(),
            inputs_hash: kernel_hash,
            built_at: now_rfc3339(),
        };
        write_manifest(&tmp.path().join("kernel.json"), &m)?;
        publish(tmp, &kdir)?;
        step.output(&format!(
            "{} ({:?}), modules: {}",
            image_name,
            boot_protocol,
            m.modules.join(" ")
        ));
        step.done();
    }
    let kernel = KernelArtifact {
        image: store.kernel(&resolved.version)?,
        cached: kernel_cached,
    };

    // Templates.
    let mut templates = Vec::new();
    let mut trees = Vec::new();
    for recipe in &opts.templates {
        let inputs = hash_json(&(
            BUILDER_VERSION,
            recipe,
            &mirror,
            &opts.suite,
            &resolved.identity,
            &guest_sha,
        ));
        let tdir = store.template_dir(&recipe.name);
        let step = Step::start(progress, format!("template {}", recipe.name));
        let cached = !opts.force
            && up_to_date::<TemplateManifest>(&tdir.join("template.json"), &inputs, |m| {
                &m.inputs_hash
            })
            && store
                .template(&recipe.name)
                .is_ok_and(|t| t.rootfs.is_file());
        if cached {
            step.cached();
            templates.push(TemplateArtifact {
                image: store.template(&recipe.name)?,
                cached: true,
            });
            continue;
        }
        if !nix::unistd::geteuid().is_root() {
            return Err(ImageError::NotRoot {
                what: "building a root filesystem (file ownership)",
            });
        }
        let base =
            rootfs::base_tree(&opts.cache_dir, &mirror, &opts.suite, recipe, progress).await?;
        trees.push(base.clone());
        let tmp = tempdir_in(&opts.out_dir.join("templates"), ".tmp-")?;
        let work = tempdir_in(&opts.cache_dir.join("work"), "rootfs-")?;
        let pack = Step::start(progress, format!("pack {} rootfs.ext4", recipe.name));
        let info = rootfs::build_image(
            &base,
            work.path(),
            &opts.guest_binary,
            DEFAULT_HOSTNAME,
            &tmp.path().join("rootfs.ext4"),
        )
        .await?;
        pack.output(&format!(
            "{} MiB (shrunk), minimum {} MiB",
            info.size_bytes >> 20,
            info.fs_min_bytes >> 20
        ));
        pack.done();
        drop(work);
        let m = TemplateManifest {
            format_version: FORMAT_VERSION,
            name: recipe.name.clone(),
            kernel_version: resolved.version.clone(),
            rootfs: "rootfs.ext4".into(),
            size_bytes: info.size_bytes,
            fs_min_bytes: info.fs_min_bytes,
            recipe: recipe.clone(),
            recipe_hash: recipe.hash(),
            suite: opts.suite.clone(),
            mirror: mirror.clone(),
            guest_sha256: guest_sha.clone(),
            inputs_hash: inputs,
            built_at: now_rfc3339(),
        };
        write_manifest(&tmp.path().join("template.json"), &m)?;
        publish(tmp, &tdir)?;
        step.done();
        templates.push(TemplateArtifact {
            image: store.template(&recipe.name)?,
            cached: false,
        });
    }
    // Trees of old recipes, suites or mirrors go after a month unused.
    let pruned = rootfs::prune(&opts.cache_dir, &trees, rootfs::TREE_MAX_IDLE);
    if pruned > 0 {
        tracing::info!(pruned, cache = %opts.cache_dir.display(), "removed stale cached trees");
    }
    Ok(BuildReport {
        kernel,
        templates,
        elapsed: started.elapsed(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_are_validated() {
        let mut o = BuildOptions::new("/o", "/c", "/g");
        o.validate().unwrap();
        o.mirror = "ftp://x".into();
        assert!(matches!(
            o.validate(),
            Err(ImageError::InvalidOption {
                field: "mirror",
                ..
            })
        ));
        o.mirror = DEFAULT_MIRROR.into();
        o.templates = vec![Recipe::minimal(), Recipe::minimal()];
        assert!(matches!(
            o.validate(),
            Err(ImageError::InvalidOption {
                field: "templates",
                ..
            })
        ));
    }

    #[tokio::test]
    async fn dynamic_guest_binaries_are_refused() {
        // The test binary itself is dynamically linked.
        let exe = std::env::current_exe().unwrap();
        let err = check_guest(&exe).await.unwrap_err();
        assert!(err.to_string().contains("crt-static"), "{err}");
        let err = check_guest(Path::new("/nonexistent/guest"))
            .await
            .unwrap_err();
        assert!(matches!(err, ImageError::GuestBinary { .. }));
    }

    #[test]
    fn publish_swaps_existing_outputs() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("t");
        for content in ["one", "two"] {
            let tmp = tempdir_in(dir.path(), ".tmp-").unwrap();
            std::fs::write(tmp.path().join("f"), content).unwrap();
            publish(tmp, &target).unwrap();
            assert_eq!(std::fs::read_to_string(target.join("f")).unwrap(), content);
        }
        // Only the target is left: no temporary directories.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
