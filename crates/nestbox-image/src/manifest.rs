//! On-disk formats the builder owns and the host agent reads: `kernel.json`,
//! `template.json`, and the [`ImageStore`] that finds images in an output directory.
//!
//! Layout of an output directory:
//!
//! ```text
//! out/kernels/<kernel version>/{vmlinux | vmlinuz, initramfs.cpio, kernel.json}
//! out/templates/<name>/{rootfs.ext4, template.json}
//! ```
//!
//! Every manifest carries [`FORMAT_VERSION`]; a reader rejects any other version with
//! [`ImageError::UnsupportedFormat`]. `inputs_hash` is what the builder compares to decide
//! that an output is up to date.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::ImageError;

/// Version of `kernel.json` / `template.json`.
pub const FORMAT_VERSION: u32 = 1;

/// Bumped whenever the builder's output changes for the same inputs, so caches rebuild.
pub const BUILDER_VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), "+b1");

/// How QEMU boots a kernel image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BootProtocol {
    /// An ELF `vmlinux` with the Xen PVH entry note: direct boot, no decompression.
    Pvh,
    /// A compressed `bzImage` (fallback when the ELF could not be extracted).
    Bzimage,
}

/// `kernel.json`: one kernel and its initramfs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KernelManifest {
    /// [`FORMAT_VERSION`].
    pub format_version: u32,
    /// Kernel release (`6.1.0-48-cloud-amd64`).
    pub kernel_version: String,
    /// Where it came from (`debian:linux-image-…=6.1.172-1` or `local:<sha256>`).
    pub source: String,
    /// File name of the kernel image in this directory.
    pub image: String,
    /// How to boot it.
    pub boot_protocol: BootProtocol,
    /// File name of the initramfs in this directory.
    pub initramfs: String,
    /// Modules in the initramfs, in load order.
    pub modules: Vec<String>,
    /// SHA-256 of the guest binary that is `/init`.
    pub guest_sha256: String,
    /// Hash of every build input.
    pub inputs_hash: String,
    /// When it was built (RFC 3339).
    pub built_at: String,
}

/// The tools every built-in template has, as E2B's base image does: `ps`, `pgrep` and
/// `free` (procps), `ss` and `ip` (iproute2), and `curl` with the CA certificates — among
/// them what E2B's ready checks run (`wait_for_port`, `wait_for_process`, `wait_for_url`).
pub const BASE_PACKAGES: &[&str] = &["ca-certificates", "curl", "iproute2", "procps"];

/// What goes into a template's root filesystem. Templates differ only in their
/// recipe; `python` and `node` are `minimal` plus packages.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Recipe {
    /// Template name (`minimal`): a directory name, `[a-z0-9-]`.
    pub name: String,
    /// debootstrap variant.
    pub variant: String,
    /// Extra Debian packages (`--include`), sorted.
    pub packages: Vec<String>,
}

impl Recipe {
    /// debootstrap minbase, [`BASE_PACKAGES`] and nestbox-guest.
    pub fn minimal() -> Self {
        Self::with_packages("minimal", &[])
    }

    /// `minimal` plus extra packages, under another name.
    pub fn with_packages(name: &str, packages: &[&str]) -> Self {
        let mut packages: Vec<String> = BASE_PACKAGES
            .iter()
            .chain(packages)
            .map(|p| p.to_string())
            .collect();
        packages.sort();
        packages.dedup();
        Self {
            name: name.into(),
            variant: "minbase".into(),
            packages,
        }
    }

    /// Python 3 with pip and venv (E2B's code-interpreter base).
    pub fn python() -> Self {
        Self::with_packages(
            "python",
            &["ca-certificates", "python3", "python3-pip", "python3-venv"],
        )
    }

    /// Node.js with npm.
    pub fn node() -> Self {
        Self::with_packages("node", &["ca-certificates", "nodejs", "npm"])
    }

    /// A built-in recipe by name.
    pub fn builtin(name: &str) -> Option<Self> {
        match name {
            "minimal" => Some(Self::minimal()),
            "python" => Some(Self::python()),
            "node" => Some(Self::node()),
            _ => None,
        }
    }

    /// Names of the built-in recipes.
    pub const BUILTIN: &'static [&'static str] = &["minimal", "python", "node"];

    /// Hash of the recipe (hex SHA-256 of its canonical JSON).
    pub fn hash(&self) -> String {
        hash_json(self)
    }

    pub(crate) fn validate(&self) -> Result<(), ImageError> {
        let ok_name = !self.name.is_empty()
            && self.name.len() <= 64
            && self
                .name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
        if !ok_name {
            return Err(ImageError::InvalidOption {
                field: "recipe.name",
                reason: format!("`{}` must be 1-64 characters of a-z, 0-9 and -", self.name),
            });
        }
        let bad = |s: &String| {
            s.is_empty()
                || !s
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "+-.:".contains(c))
        };
        if let Some(p) = self.packages.iter().find(|p| bad(p)) {
            return Err(ImageError::InvalidOption {
                field: "recipe.packages",
                reason: format!("`{p}` is not a Debian package name"),
            });
        }
        if bad(&self.variant) {
            return Err(ImageError::InvalidOption {
                field: "recipe.variant",
                reason: format!("`{}` is not a debootstrap variant", self.variant),
            });
        }
        Ok(())
    }
}

/// `template.json`: one template's root filesystem.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TemplateManifest {
    /// [`FORMAT_VERSION`].
    pub format_version: u32,
    /// Template name.
    pub name: String,
    /// The kernel release this template boots with (`out/kernels/<it>/`).
    pub kernel_version: String,
    /// File name of the root filesystem image in this directory.
    pub rootfs: String,
    /// Size of the stored (shrunk) image file in bytes.
    pub size_bytes: u64,
    /// Smallest size the filesystem can be shrunk to (`resize2fs -P`), in bytes.
    pub fs_min_bytes: u64,
    /// The recipe it was built from.
    pub recipe: Recipe,
    /// [`Recipe::hash`].
    pub recipe_hash: String,
    /// Debian suite.
    pub suite: String,
    /// Debian mirror.
    pub mirror: String,
    /// SHA-256 of the installed guest binary.
    pub guest_sha256: String,
    /// Hash of every build input.
    pub inputs_hash: String,
    /// When it was built (RFC 3339).
    pub built_at: String,
}

/// Hex SHA-256 of a value's JSON (serde_json writes struct fields in declaration order,
/// so the encoding is stable).
pub fn hash_json<T: Serialize>(value: &T) -> String {
    let bytes = serde_json::to_vec(value).unwrap_or_default();
    hex::encode(Sha256::digest(&bytes))
}

/// Reads a manifest, checking its format version first.
pub fn read_manifest<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T, ImageError> {
    let bytes = std::fs::read(path).map_err(ImageError::io("read", path))?;
    #[derive(Deserialize)]
    struct Version {
        format_version: u32,
    }
    let v: Version = serde_json::from_slice(&bytes).map_err(|source| ImageError::Manifest {
        path: path.into(),
        source,
    })?;
    if v.format_version != FORMAT_VERSION {
        return Err(ImageError::UnsupportedFormat {
            path: path.into(),
            found: v.format_version,
            supported: FORMAT_VERSION,
        });
    }
    serde_json::from_slice(&bytes).map_err(|source| ImageError::Manifest {
        path: path.into(),
        source,
    })
}

/// Writes a manifest (pretty JSON, trailing newline).
pub(crate) fn write_manifest<T: Serialize>(path: &Path, value: &T) -> Result<(), ImageError> {
    let mut bytes = serde_json::to_vec_pretty(value).map_err(|source| ImageError::Manifest {
        path: path.into(),
        source,
    })?;
    bytes.push(b'\n');
    std::fs::write(path, bytes).map_err(ImageError::io("write", path))
}

/// A built kernel, located.
#[derive(Debug, Clone)]
pub struct KernelImage {
    /// Its directory.
    pub dir: PathBuf,
    /// The kernel image to pass to `-kernel`.
    pub kernel: PathBuf,
    /// The initramfs to pass to `-initrd`.
    pub initramfs: PathBuf,
    /// Its manifest.
    pub manifest: KernelManifest,
}

/// A built template, located.
#[derive(Debug, Clone)]
pub struct TemplateImage {
    /// Its directory.
    pub dir: PathBuf,
    /// The root filesystem image (stored shrunk).
    pub rootfs: PathBuf,
    /// Its manifest.
    pub manifest: TemplateManifest,
}

/// Finds built images in an output directory. Read-only.
#[derive(Debug, Clone)]
pub struct ImageStore {
    root: PathBuf,
}

impl ImageStore {
    /// An output directory of [`crate::build`]. A relative path is made absolute (the
    /// paths handed out end up in QEMU and qcow2 backing files, which resolve relative
    /// paths against other directories).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        let root = root.into();
        Self {
            root: std::path::absolute(&root).unwrap_or(root),
        }
    }

    /// The directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `kernels/<version>/`.
    pub fn kernel_dir(&self, version: &str) -> PathBuf {
        self.root.join("kernels").join(version)
    }

    /// `templates/<name>/`.
    pub fn template_dir(&self, name: &str) -> PathBuf {
        self.root.join("templates").join(name)
    }

    /// A kernel by release.
    pub fn kernel(&self, version: &str) -> Result<KernelImage, ImageError> {
        let dir = self.kernel_dir(version);
        let path = dir.join("kernel.json");
        if !path.exists() {
            return Err(ImageError::NotBuilt {
                what: format!("kernel {version}"),
                path,
            });
        }
        let manifest: KernelManifest = read_manifest(&path)?;
        Ok(KernelImage {
            kernel: dir.join(&manifest.image),
            initramfs: dir.join(&manifest.initramfs),
            dir,
            manifest,
        })
    }

    /// A template by name.
    pub fn template(&self, name: &str) -> Result<TemplateImage, ImageError> {
        let dir = self.template_dir(name);
        let path = dir.join("template.json");
        if !path.exists() {
            return Err(ImageError::NotBuilt {
                what: format!("template {name}"),
                path,
            });
        }
        let manifest: TemplateManifest = read_manifest(&path)?;
        Ok(TemplateImage {
            rootfs: dir.join(&manifest.rootfs),
            dir,
            manifest,
        })
    }

    /// A template and the kernel it boots with.
    pub fn template_with_kernel(
        &self,
        name: &str,
    ) -> Result<(TemplateImage, KernelImage), ImageError> {
        let t = self.template(name)?;
        let k = self.kernel(&t.manifest.kernel_version)?;
        Ok((t, k))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recipes_hash_stably_and_differ() {
        assert_eq!(Recipe::minimal().hash(), Recipe::minimal().hash());
        assert_ne!(Recipe::minimal().hash(), Recipe::python().hash());
        for name in Recipe::BUILTIN {
            let r = Recipe::builtin(name).unwrap();
            r.validate().unwrap();
            assert_eq!(r.name, *name);
        }
        assert!(Recipe::with_packages("Bad Name", &[]).validate().is_err());
        assert!(Recipe::with_packages("ok", &["rm -rf"]).validate().is_err());
    }

    #[test]
    fn unknown_format_versions_are_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("template.json");
        std::fs::write(&path, r#"{"format_version": 99, "name": "x"}"#).unwrap();
        let err = read_manifest::<TemplateManifest>(&path).unwrap_err();
        assert!(
            matches!(err, ImageError::UnsupportedFormat { found: 99, .. }),
            "{err}"
        );
    }

    #[test]
    fn manifests_round_trip_and_store_finds_them() {
        let dir = tempfile::tempdir().unwrap();
        let store = ImageStore::new(dir.path());
        assert!(matches!(
            store.template("minimal"),
            Err(ImageError::NotBuilt { .. })
        ));
        let k = KernelManifest {
            format_version: FORMAT_VERSION,
            kernel_version: "6.1.0-1-cloud-amd64".into(),
            source: "local:abc".into(),
            image: "vmlinux".into(),
            boot_protocol: BootProtocol::Pvh,
            initramfs: "initramfs.cpio".into(),
            modules: vec!["virtio_mmio.ko".into()],
            guest_sha256: "00".into(),
            inputs_hash: "11".into(),
            built_at: "2025-01-01T00:00:00Z".into(),
        };
        let t = TemplateManifest {
            format_version: FORMAT_VERSION,
            name: "minimal".into(),
            kernel_version: k.kernel_version.clone(),
            rootfs: "rootfs.ext4".into(),
            size_bytes: 1,
            fs_min_bytes: 1,
            recipe: Recipe::minimal(),
            recipe_hash: Recipe::minimal().hash(),
            suite: "bookworm".into(),
            mirror: "http://deb.debian.org/debian".into(),
            guest_sha256: "00".into(),
            inputs_hash: "22".into(),
            built_at: "2025-01-01T00:00:00Z".into(),
        };
        std::fs::create_dir_all(store.kernel_dir(&k.kernel_version)).unwrap();
        std::fs::create_dir_all(store.template_dir("minimal")).unwrap();
        write_manifest(&store.kernel_dir(&k.kernel_version).join("kernel.json"), &k).unwrap();
        write_manifest(&store.template_dir("minimal").join("template.json"), &t).unwrap();
        let (tt, kk) = store.template_with_kernel("minimal").unwrap();
        assert_eq!(tt.manifest, t);
        assert_eq!(kk.manifest, k);
        assert!(kk.kernel.ends_with("kernels/6.1.0-1-cloud-amd64/vmlinux"));
    }
}
