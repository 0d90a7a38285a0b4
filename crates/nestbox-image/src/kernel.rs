//! The guest kernel: where it comes from, the PVH `vmlinux` inside Debian's bzImage, and
//! the virtio modules the initramfs must load (with their dependencies, in order).
//!
//! Debian's cloud kernel builds virtio as modules and ext4 in. QEMU's `-kernel` boots an
//! ELF with the Xen `PHYS32_ENTRY` note directly (PVH), skipping ~300 ms of in-guest LZ4
//! decompression under TCG; the bzImage is kept as a fallback when extraction fails.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use nestbox_hostsys::process::Cmd;

use crate::apt::{PrivateApt, kernel_dependency};
use crate::manifest::BootProtocol;
use crate::progress::{Progress, Step};
use crate::{ImageError, blocking, elf};

/// Where the kernel comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KernelSource {
    /// Debian's kernel: the package a meta package (normally `linux-image-cloud-amd64`)
    /// depends on, from the build's mirror and suite.
    Debian {
        /// The meta package.
        meta_package: String,
    },
    /// A kernel the user built or unpacked.
    Local {
        /// A `vmlinuz` (bzImage) or an ELF `vmlinux`.
        image: PathBuf,
        /// The `lib/modules/<release>` directory; `None` for a kernel with virtio built in.
        modules_dir: Option<PathBuf>,
        /// The kernel release; defaults to the modules directory's name.
        version: Option<String>,
    },
}

impl Default for KernelSource {
    fn default() -> Self {
        Self::Debian {
            meta_package: "linux-image-cloud-amd64".into(),
        }
    }
}

/// Modules the guest needs, in the order we want them loaded (dependencies come first
/// automatically). `true` = required unless built in.
const WANTED_MODULES: &[(&str, bool)] = &[
    ("virtio_mmio", true),
    ("virtio_blk", true),
    ("failover", false),
    ("net_failover", false),
    ("virtio_net", true),
    ("virtio_console", false),
    ("virtio_rng", false),
];

/// A kernel identified but not necessarily downloaded yet.
#[derive(Debug, Clone)]
pub(crate) struct ResolvedKernel {
    /// Kernel release (`6.1.0-50-cloud-amd64`).
    pub version: String,
    /// Identity for hashing and the manifest (`debian:pkg=ver`, `local:<sha>`).
    pub identity: String,
    source: Resolved,
}

#[derive(Debug, Clone)]
enum Resolved {
    Debian {
        package: crate::apt::PackageRef,
    },
    Local {
        image: PathBuf,
        modules_dir: Option<PathBuf>,
    },
}

/// Kernel files on local disk.
#[derive(Debug, Clone)]
pub(crate) struct KernelFiles {
    pub image: PathBuf,
    pub modules_dir: Option<PathBuf>,
}

pub(crate) async fn resolve(
    source: &KernelSource,
    apt: Option<&PrivateApt>,
    progress: &dyn Progress,
) -> Result<ResolvedKernel, ImageError> {
    match source {
        KernelSource::Debian { meta_package } => {
            let apt = apt.ok_or_else(|| ImageError::InvalidOption {
                field: "kernel",
                reason: "a Debian kernel needs the mirror's package lists".into(),
            })?;
            apt.update(progress).await?;
            let (_, depends) = apt.show(meta_package).await?;
            let package = kernel_dependency(&depends).ok_or_else(|| ImageError::KernelPackage {
                package: meta_package.clone(),
                detail: format!("depends on no versioned linux-image package ({depends})"),
            })?;
            let (pkg, _) = apt.show(&package).await?;
            let version = package.trim_start_matches("linux-image-").to_string();
            Ok(ResolvedKernel {
                identity: format!("debian:{}={}", pkg.name, pkg.version),
                version,
                source: Resolved::Debian { package: pkg },
            })
        }
        KernelSource::Local {
            image,
            modules_dir,
            version,
        } => {
            let sha = crate::sha256_file(image).await?;
            let version = version
                .clone()
                .or_else(|| {
                    modules_dir
                        .as_ref()
                        .and_then(|d| d.file_name())
                        .map(|n| n.to_string_lossy().into_owned())
                })
                .unwrap_or_else(|| format!("custom-{}", &sha[..12]));
            if version.is_empty() || version.contains('/') || version.starts_with('.') {
                return Err(ImageError::InvalidOption {
                    field: "kernel.version",
                    reason: format!("`{version}`"),
                });
            }
            Ok(ResolvedKernel {
                identity: format!("local:{sha}"),
                version,
                source: Resolved::Local {
                    image: image.clone(),
                    modules_dir: modules_dir.clone(),
                },
            })
        }
    }
}

/// Downloads and unpacks the kernel package (cached) or checks the local files.
pub(crate) async fn materialize(
    k: &ResolvedKernel,
    apt: Option<&PrivateApt>,
    cache_dir: &Path,
    progress: &dyn Progress,
) -> Result<KernelFiles, ImageError> {
    match &k.source {
        Resolved::Local { image, modules_dir } => {
            if !image.is_file() {
                return Err(ImageError::Kernel {
                    path: image.clone(),
                    detail: "not a file".into(),
                });
            }
            if let Some(d) = modules_dir
                && !d.is_dir()
            {
                return Err(ImageError::Kernel {
                    path: d.clone(),
                    detail: "modules directory missing".into(),
                });
            }
            Ok(KernelFiles {
                image: image.clone(),
                modules_dir: modules_dir.clone(),
            })
        }
        Resolved::Debian { package } => {
            let Some(apt) = apt else {
                return Err(ImageError::InvalidOption {
                    field: "kernel",
                    reason: "no apt".into(),
                });
            };
            let root = cache_dir.join("kernels");
            let unpacked = root.join(format!(
                "{}_{}",
                package.name,
                package.version.replace(':', "%3a")
            ));
            let image = unpacked.join("boot").join(format!("vmlinuz-{}", k.version));
            let modules_dir = unpacked.join("lib/modules").join(&k.version);
            let step = Step::start(
                progress,
                format!("kernel package {} {}", package.name, package.version),
            );
            if image.is_file() {
                step.cached();
                return Ok(KernelFiles {
                    image,
                    modules_dir: Some(modules_dir),
                });
            }
            let deb = apt.download(package, &root.join("debs")).await?;
            let tmp = tempfile::Builder::new()
                .prefix(".unpack-")
                .tempdir_in(&root)
                .map_err(ImageError::io("create a directory in", &root))?;
            Cmd::new("dpkg-deb")
                .arg("-x")
                .arg(&deb)
                .arg(tmp.path())
                .run()
                .await
                .map_err(ImageError::tool(format!("unpack {}", deb.display())))?;
            let _ = std::fs::remove_dir_all(&unpacked);
            std::fs::rename(tmp.path(), &unpacked)
                .map_err(ImageError::io("rename into place", &unpacked))?;
            if !image.is_file() {
                return Err(ImageError::KernelPackage {
                    package: package.name.clone(),
                    detail: format!("has no {}", image.display()),
                });
            }
            step.done();
            Ok(KernelFiles {
                image,
                modules_dir: modules_dir.is_dir().then_some(modules_dir),
            })
        }
    }
}

/// Offset of the LZ4 legacy frame magic (`02 21 4c 18`) in a bzImage.
fn find_lz4_payload(bz: &[u8]) -> Option<usize> {
    bz.windows(4).position(|w| w == [0x02, 0x21, 0x4c, 0x18])
}

/// The bootable kernel image: an ELF `vmlinux` with the PVH note (extracted from the
/// bzImage when needed), else the bzImage itself.
pub(crate) async fn bootable_image(
    image: &Path,
) -> Result<(Vec<u8>, BootProtocol, Option<String>), ImageError> {
    let path = image.to_path_buf();
    let bytes =
        blocking(move || std::fs::read(&path).map_err(ImageError::io("read", &path))).await?;
    if elf::is_elf64(&bytes) {
        return if elf::has_pvh_entry_note(&bytes) {
            Ok((bytes, BootProtocol::Pvh, None))
        } else {
            Err(ImageError::Kernel {
                path: image.into(),
                detail: "ELF kernel without the Xen PHYS32_ENTRY note; QEMU cannot boot it (build with CONFIG_PVH)".into(),
            })
        };
    }
    let offset = {
        let b = &bytes;
        find_lz4_payload(b)
    };
    let why = match offset {
        None => "no LZ4 payload found (kernel not built with CONFIG_KERNEL_LZ4)".to_string(),
        Some(off) => {
            // The payload goes through a file: piping megabytes into a tool whose
            // output is collected only afterwards would fill both pipes and deadlock.
            let scratch = tempfile::tempdir().map_err(ImageError::io(
                "create a directory in",
                std::env::temp_dir(),
            ))?;
            let payload = scratch.path().join("payload.lz4");
            {
                let (p, b) = (payload.clone(), bytes[off..].to_vec());
                blocking(move || std::fs::write(&p, b).map_err(ImageError::io("write", &p)))
                    .await?;
            }
            // lz4 exits non-zero on the bzImage's trailing bytes after the frame; the ELF
            // checks below decide whether the output is good.
            let out = Cmd::new("lz4")
                .arg("-dc")
                .arg(&payload)
                .output()
                .await
                .map_err(ImageError::tool("decompress the kernel with lz4"))?;
            if elf::is_elf64(&out.stdout) && elf::has_pvh_entry_note(&out.stdout) {
                return Ok((out.stdout, BootProtocol::Pvh, None));
            }
            format!(
                "the LZ4 payload is not a PVH ELF ({})",
                nestbox_hostsys::process::tail(&out.stderr)
            )
        }
    };
    tracing::warn!(kernel = %image.display(), %why, "booting the bzImage instead of a PVH vmlinux");
    Ok((bytes, BootProtocol::Bzimage, Some(why)))
}

/// A module chosen for the initramfs.
#[derive(Debug, Clone)]
pub(crate) struct Module {
    /// Module name (`virtio_net`).
    pub name: String,
    /// Uncompressed `.ko` contents.
    pub bytes: Vec<u8>,
}

/// Module files under `dir`, by normalised module name.
fn index_modules(dir: &Path) -> BTreeMap<String, PathBuf> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let path = e.path();
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                stack.push(path);
                continue;
            }
            let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
                continue;
            };
            let stem = [".ko", ".ko.xz", ".ko.zst", ".ko.gz"]
                .iter()
                .find_map(|ext| name.strip_suffix(ext));
            if let Some(stem) = stem {
                out.insert(stem.replace('-', "_"), path);
            }
        }
    }
    out
}

/// Names of built-in modules from `modules.builtin` (`kernel/drivers/virtio/virtio.ko`).
fn builtin_modules(modules_dir: &Path) -> BTreeSet<String> {
    std::fs::read_to_string(modules_dir.join("modules.builtin"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            Path::new(l.trim())
                .file_name()?
                .to_str()
                .map(str::to_string)
        })
        .filter_map(|n| n.strip_suffix(".ko").map(|s| s.replace('-', "_")))
        .collect()
}

async fn read_module(path: &Path) -> Result<Vec<u8>, ImageError> {
    let name = path.to_string_lossy();
    let tool = if name.ends_with(".xz") {
        Some("xz")
    } else if name.ends_with(".zst") {
        Some("zstd")
    } else if name.ends_with(".gz") {
        Some("gzip")
    } else {
        None
    };
    match tool {
        None => {
            let p = path.to_path_buf();
            blocking(move || std::fs::read(&p).map_err(ImageError::io("read", &p))).await
        }
        Some(tool) => Ok(Cmd::new(tool)
            .arg("-dc")
            .arg(path)
            .run()
            .await
            .map_err(ImageError::tool(format!("decompress {}", path.display())))?
            .stdout),
    }
}

/// The modules to load, dependencies first. Built-ins are skipped.
pub(crate) async fn collect_modules(
    modules_dir: Option<&Path>,
    version: &str,
) -> Result<Vec<Module>, ImageError> {
    let Some(dir) = modules_dir else {
        return Ok(Vec::new());
    };
    let index = {
        let d = dir.to_path_buf();
        blocking(move || Ok(index_modules(&d))).await?
    };
    let builtin = builtin_modules(dir);
    let mut loaded: Vec<Module> = Vec::new();
    let mut seen = BTreeSet::new();
    for (name, required) in WANTED_MODULES {
        if builtin.contains(*name) || seen.contains(*name) {
            continue;
        }
        if !index.contains_key(*name) {
            if *required {
                return Err(ImageError::ModuleMissing {
                    module: name.to_string(),
                    kernel_version: version.into(),
                    modules_dir: dir.into(),
                });
            }
            continue;
        }
        // Depth-first: a module goes in after everything it depends on.
        let mut stack: Vec<(String, bool)> = vec![(name.to_string(), false)];
        let mut bytes_of: BTreeMap<String, Vec<u8>> = BTreeMap::new();
        while let Some((m, deps_done)) = stack.pop() {
            if seen.contains(&m) || builtin.contains(&m) {
                continue;
            }
            let Some(path) = index.get(&m) else {
                return Err(ImageError::ModuleMissing {
                    module: m,
                    kernel_version: version.into(),
                    modules_dir: dir.into(),
                });
            };
            if deps_done {
                seen.insert(m.clone());
                let bytes = match bytes_of.remove(&m) {
                    Some(b) => b,
                    None => read_module(path).await?,
                };
                loaded.push(Module { name: m, bytes });
                continue;
            }
            let bytes = read_module(path).await?;
            let deps = elf::module_depends(&bytes).ok_or_else(|| ImageError::Kernel {
                path: path.clone(),
                detail: "not an ELF kernel module".into(),
            })?;
            bytes_of.insert(m.clone(), bytes);
            stack.push((m, true));
            for d in deps.into_iter().rev() {
                if !seen.contains(&d) && !builtin.contains(&d) {
                    stack.push((d, false));
                }
            }
        }
    }
    Ok(loaded)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lz4_magic_is_found() {
        let mut b = vec![0u8; 100];
        b.extend_from_slice(&[0x02, 0x21, 0x4c, 0x18, 9, 9]);
        assert_eq!(find_lz4_payload(&b), Some(100));
        assert_eq!(find_lz4_payload(&[1, 2, 3]), None);
    }

    #[test]
    fn module_index_normalises_names() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("kernel/drivers/char/hw_random");
        std::fs::create_dir_all(&sub).unwrap();
        std::fs::write(sub.join("virtio-rng.ko"), b"x").unwrap();
        std::fs::write(sub.join("other.ko.xz"), b"x").unwrap();
        std::fs::write(
            dir.path().join("modules.builtin"),
            "kernel/drivers/virtio/virtio.ko\n",
        )
        .unwrap();
        let idx = index_modules(dir.path());
        assert!(idx.contains_key("virtio_rng"));
        assert!(idx.contains_key("other"));
        assert!(builtin_modules(dir.path()).contains("virtio"));
    }

    /// Uses the kernel package unpacked by an earlier image build (the default
    /// cache beside `target/nestbox-images`) when it is there.
    #[tokio::test]
    async fn debian_modules_come_in_dependency_order() {
        let cache =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/nestbox-image-cache/kernels");
        let found = std::fs::read_dir(&cache).ok().and_then(|rd| {
            rd.flatten()
                .map(|e| e.path().join("lib/modules"))
                .filter_map(|m| {
                    std::fs::read_dir(m)
                        .ok()?
                        .flatten()
                        .next()
                        .map(|e| e.path())
                })
                .next()
        });
        let Some(dir) = found else {
            eprintln!(
                "skipped: no unpacked Debian kernel under {}",
                cache.display()
            );
            return;
        };
        let mods = collect_modules(Some(&dir), "test").await.unwrap();
        let names: Vec<_> = mods.iter().map(|m| m.name.as_str()).collect();
        for (i, m) in mods.iter().enumerate() {
            for dep in elf::module_depends(&m.bytes).unwrap() {
                assert!(
                    names[..i].contains(&dep.as_str()),
                    "{} before its dependency {dep}: {names:?}",
                    m.name
                );
            }
        }
        for n in [
            "virtio",
            "virtio_ring",
            "virtio_mmio",
            "virtio_blk",
            "failover",
            "virtio_net",
            "virtio_rng",
        ] {
            assert!(names.contains(&n), "{n} missing: {names:?}");
        }
        let unique: BTreeSet<_> = names.iter().collect();
        assert_eq!(unique.len(), names.len());
    }
}
