//! The image builder's error type.

use std::path::PathBuf;

use nestbox_hostsys::process::ProcessError;

/// A failed image build step.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// An external tool failed (or is missing: the message names the package).
    #[error("{step}")]
    Tool {
        /// What we were doing.
        step: String,
        /// The tool's error.
        #[source]
        source: ProcessError,
    },
    /// A file operation failed.
    #[error("cannot {op} {}", path.display())]
    Io {
        /// What we tried.
        op: &'static str,
        /// On what.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The Debian mirror could not be used.
    #[error(
        "cannot fetch from the Debian mirror {mirror} (suite {suite}): {detail}; check that the \
         host reaches it (DNS, firewall, http_proxy), that the URL is a Debian archive root and \
         that the suite exists there"
    )]
    MirrorUnreachable {
        /// The mirror URL.
        mirror: String,
        /// The suite.
        suite: String,
        /// What the tool said.
        detail: String,
    },
    /// The kernel package could not be resolved or unpacked.
    #[error("kernel package {package}: {detail}")]
    KernelPackage {
        /// The package name.
        package: String,
        /// What went wrong.
        detail: String,
    },
    /// The kernel image is unusable.
    #[error("kernel {}: {detail}", path.display())]
    Kernel {
        /// The kernel file.
        path: PathBuf,
        /// What went wrong.
        detail: String,
    },
    /// A required kernel module is neither built in nor shipped.
    #[error("kernel {kernel_version} has no module {module} (neither built in nor under {})", modules_dir.display())]
    ModuleMissing {
        /// The module name.
        module: String,
        /// The kernel release.
        kernel_version: String,
        /// Where we looked.
        modules_dir: PathBuf,
    },
    /// The guest binary is missing or unsuitable.
    #[error("guest binary {}: {detail}", path.display())]
    GuestBinary {
        /// Its path.
        path: PathBuf,
        /// What is wrong with it.
        detail: String,
    },
    /// A step needs root.
    #[error("{what} needs root (run the image build as root)")]
    NotRoot {
        /// The step.
        what: &'static str,
    },
    /// An option is invalid.
    #[error("invalid build option {field}: {reason}")]
    InvalidOption {
        /// The option.
        field: &'static str,
        /// Why.
        reason: String,
    },
    /// A root filesystem tree cannot be made into a template (it comes from an image).
    #[error("{0}")]
    BadTree(String),
    /// A manifest could not be read or written.
    #[error("manifest {}", path.display())]
    Manifest {
        /// Its path.
        path: PathBuf,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// A manifest has a format version this build does not understand.
    #[error("manifest {} has format version {found}; this build reads version {supported} (rebuild the images)", path.display())]
    UnsupportedFormat {
        /// Its path.
        path: PathBuf,
        /// The version found.
        found: u32,
        /// The version we support.
        supported: u32,
    },
    /// An image is not where it should be.
    #[error("no {what} at {} (build images with `nestbox image build`)", path.display())]
    NotBuilt {
        /// What was looked for.
        what: String,
        /// Where.
        path: PathBuf,
    },
    /// A background task died.
    #[error("background task failed")]
    Join(#[source] tokio::task::JoinError),
}

impl ImageError {
    pub(crate) fn io(
        op: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| Self::Io { op, path, source }
    }

    pub(crate) fn tool(step: impl Into<String>) -> impl FnOnce(ProcessError) -> Self {
        let step = step.into();
        move |source| Self::Tool { step, source }
    }
}

/// Runs blocking work off the async runtime.
pub(crate) async fn blocking<T, F>(f: F) -> Result<T, ImageError>
where
    F: FnOnce() -> Result<T, ImageError> + Send + 'static,
    T: Send + 'static,
{
    tokio::task::spawn_blocking(f)
        .await
        .map_err(ImageError::Join)?
}
