//! OCI images as template bases: resolve a reference at a registry, fetch its layers into
//! a content-addressed cache, and apply them to a directory tree.
//!
//! - [`reference`]: `[registry/]repository[:tag][@digest]`, read as Docker reads it.
//! - [`registry`]: the Distribution API v2 client (manifests, indexes, blobs, `Basic` and
//!   `Bearer` authentication) and the [`AccessPolicy`] that keeps it off private networks.
//! - [`manifest`]: the OCI and Docker v2 documents it reads.
//! - [`unpack`]: layers (plain, gzip, zstd) and their whiteouts, applied to a tree.
//!
//! [`BlobCache`] keeps fetched layers under `<dir>/sha256/<hex>`, each written under a
//! temporary name and renamed once its digest checked: a file at its final name is whole
//! and verified, so a second pull of the same layer fetches nothing.
//!
//! A hand-written client rather than the `oci-client` crate: that crate brings a second
//! HTTP stack and a C cryptography library for tokens it never verifies, and the four
//! requests a pull makes are small.

pub mod manifest;
pub mod reference;
pub mod registry;
pub mod unpack;

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

pub use manifest::RunConfig;
pub use reference::Reference;
pub use registry::{AccessPolicy, Credentials, Registry, Resolved};
pub use unpack::{Applied, Limits, apply_layers};

/// Something an image pull could not do.
#[derive(Debug, thiserror::Error)]
pub enum OciError {
    /// The reference does not parse.
    #[error("`{reference}` is not an image reference: {why}")]
    BadReference {
        /// As given.
        reference: String,
        /// What is wrong.
        why: String,
    },
    /// The access policy does not allow an address.
    #[error("not fetching from {url}: {why}")]
    Refused {
        /// What was refused.
        url: String,
        /// Why.
        why: String,
    },
    /// A request failed on the way.
    #[error("{what} failed")]
    Http {
        /// What was asked for.
        what: String,
        /// Why.
        #[source]
        source: reqwest::Error,
    },
    /// The registry answered with an error status.
    #[error("{what}: the registry answered {status}: {body}")]
    Status {
        /// What was asked for.
        what: String,
        /// Its status.
        status: u16,
        /// The start of its body.
        body: String,
    },
    /// The registry wants other credentials.
    #[error("registry {registry} refused access: {why}")]
    Unauthorized {
        /// The registry.
        registry: String,
        /// Why.
        why: String,
    },
    /// No such image (or blob).
    #[error("{what} not found")]
    NotFound {
        /// What was asked for.
        what: String,
    },
    /// A document is not what it should be.
    #[error("{what}: {why}")]
    Format {
        /// Which document.
        what: String,
        /// What is wrong.
        why: String,
    },
    /// Content does not match its digest.
    #[error("{what} does not match its digest (expected {expected}, got {actual})")]
    Digest {
        /// What was fetched.
        what: String,
        /// The descriptor's digest.
        expected: String,
        /// What arrived.
        actual: String,
    },
    /// Something is larger than allowed.
    #[error("{what} is larger than {limit} bytes")]
    TooLarge {
        /// What.
        what: String,
        /// The limit.
        limit: u64,
    },
    /// A layer cannot be applied.
    #[error("layer {index}: {why}")]
    Layer {
        /// Its position, from 1 at the bottom.
        index: usize,
        /// What is wrong.
        why: String,
    },
    /// A file operation failed.
    #[error("cannot {op} {}", path.display())]
    Io {
        /// What was tried.
        op: &'static str,
        /// On what.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

impl OciError {
    pub(crate) fn io(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.to_path_buf();
        move |source| Self::Io { op, path, source }
    }

    /// Whether the fault is the image's or the caller's (a bad reference, credentials,
    /// a missing or malformed image, a refused address), as opposed to this host's.
    pub fn is_user_error(&self) -> bool {
        !matches!(self, Self::Io { .. })
    }
}

/// Most bytes of (compressed) layers one image may have.
pub const MAX_IMAGE_BYTES: u64 = 10 << 30;

/// Fetched layers, by digest.
#[derive(Debug, Clone)]
pub struct BlobCache {
    dir: PathBuf,
}

impl BlobCache {
    /// A cache in `dir` (made if missing).
    pub fn new(dir: impl Into<PathBuf>) -> Result<Self, OciError> {
        let dir = dir.into().join("sha256");
        std::fs::create_dir_all(&dir).map_err(OciError::io("create", &dir))?;
        Ok(Self { dir })
    }

    fn path(&self, digest: &str) -> PathBuf {
        self.dir.join(digest.trim_start_matches("sha256:"))
    }

    /// Every layer of `image`, fetched unless already here; returns their files,
    /// bottom first.
    pub async fn fetch_layers(
        &self,
        registry: &Registry,
        image: &Resolved,
    ) -> Result<Vec<PathBuf>, OciError> {
        let total = image
            .manifest
            .layers
            .iter()
            .fold(0u64, |sum, l| sum.saturating_add(l.size));
        if total > MAX_IMAGE_BYTES {
            return Err(OciError::TooLarge {
                what: format!("image {} (its layers)", image.reference),
                limit: MAX_IMAGE_BYTES,
            });
        }
        let mut files = Vec::with_capacity(image.manifest.layers.len());
        for (i, layer) in image.manifest.layers.iter().enumerate() {
            let path = self.path(&layer.digest);
            let have = std::fs::metadata(&path).is_ok_and(|m| m.len() == layer.size);
            if have {
                // Stamp it as used, for [`BlobCache::prune`].
                if let Ok(f) = std::fs::File::options().append(true).open(&path) {
                    let _ = f.set_modified(SystemTime::now());
                }
                tracing::debug!(layer = i + 1, digest = %layer.digest, "layer cached");
            } else {
                // A name no other fetch (of this process or another) ever uses: a file at
                // a final name is only ever one a fetch wrote and checked.
                static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
                let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let part = self.dir.join(format!(
                    ".part-{}-{}-{n}",
                    layer.digest.trim_start_matches("sha256:"),
                    std::process::id()
                ));
                tracing::info!(layer = i + 1, of = image.manifest.layers.len(), digest = %layer.digest, bytes = layer.size, "fetching layer");
                registry.fetch_blob(layer, &part).await?;
                std::fs::rename(&part, &path).map_err(OciError::io("store", &path))?;
            }
            files.push(path);
        }
        Ok(files)
    }

    /// Removes layers no pull used for `max_idle`, and partial downloads older than that;
    /// returns how many.
    pub fn prune(&self, max_idle: Duration) -> usize {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return 0;
        };
        let mut removed = 0;
        for e in entries.flatten() {
            let idle = e
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok());
            if idle.is_some_and(|d| d > max_idle) && std::fs::remove_file(e.path()).is_ok() {
                removed += 1;
            }
        }
        removed
    }
}
