//! A private apt state for one mirror + suite, used to resolve and download the kernel
//! package without touching (or depending on) the host's apt sources and lists.
//!
//! Layout under `<cache>/apt/<hash of mirror+suite>/`: `sources.list`, `lists/`,
//! `cache/`, an empty `status`. Package lists are refreshed when older than
//! [`LISTS_MAX_AGE`], so a rebuild with unchanged inputs makes no network access.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use nestbox_hostsys::process::{Cmd, ProcessError};

use crate::ImageError;
use crate::manifest::hash_json;
use crate::progress::{Progress, Step};

/// How long downloaded package lists are trusted.
pub const LISTS_MAX_AGE: Duration = Duration::from_secs(24 * 3600);

/// Debian's archive keyring, used as `signed-by` when present.
const DEBIAN_KEYRING: &str = "/usr/share/keyrings/debian-archive-keyring.gpg";

/// A resolved binary package.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackageRef {
    /// Package name.
    pub name: String,
    /// Package version.
    pub version: String,
}

/// apt pointed at one mirror and suite.
#[derive(Debug, Clone)]
pub struct PrivateApt {
    root: PathBuf,
    mirror: String,
    suite: String,
}

impl PrivateApt {
    /// Prepares (creates) the state directory under `cache_dir`.
    pub fn new(cache_dir: &Path, mirror: &str, suite: &str) -> Result<Self, ImageError> {
        let key = hash_json(&(mirror, suite));
        let root = cache_dir.join("apt").join(&key[..16]);
        for d in ["lists/partial", "cache/archives/partial", "parts", "prefs"] {
            let p = root.join(d);
            std::fs::create_dir_all(&p).map_err(ImageError::io("create", &p))?;
        }
        let signed_by = if Path::new(DEBIAN_KEYRING).exists() {
            format!("[signed-by={DEBIAN_KEYRING}] ")
        } else {
            String::new()
        };
        let sources = format!("deb {signed_by}{mirror} {suite} main\n");
        let path = root.join("sources.list");
        std::fs::write(&path, sources).map_err(ImageError::io("write", &path))?;
        let status = root.join("status");
        if !status.exists() {
            std::fs::write(&status, b"").map_err(ImageError::io("write", &status))?;
        }
        Ok(Self {
            root,
            mirror: mirror.into(),
            suite: suite.into(),
        })
    }

    fn options(&self) -> Vec<String> {
        let r = self.root.display();
        [
            format!("Dir::State={r}"),
            format!("Dir::State::Lists={r}/lists"),
            format!("Dir::State::status={r}/status"),
            format!("Dir::Cache={r}/cache"),
            // Keep apt's binary caches even where the host's apt.conf disables them
            // (Docker images do): they make an up-to-date rebuild instant.
            format!("Dir::Cache::pkgcache={r}/cache/pkgcache.bin"),
            format!("Dir::Cache::srcpkgcache={r}/cache/srcpkgcache.bin"),
            format!("Dir::Etc::SourceList={r}/sources.list"),
            format!("Dir::Etc::SourceParts={r}/parts"),
            format!("Dir::Etc::PreferencesParts={r}/prefs"),
            "APT::Sandbox::User=root".into(),
            "Acquire::Languages=none".into(),
            "Acquire::IndexTargets::deb::DEP-11::DefaultEnabled=false".into(),
            "Acquire::IndexTargets::deb::DEP-11-icons::DefaultEnabled=false".into(),
            "Acquire::IndexTargets::deb::DEP-11-icons-small::DefaultEnabled=false".into(),
            "Debug::NoLocking=true".into(),
        ]
        .into_iter()
        .flat_map(|o| ["-o".to_string(), o])
        .collect()
    }

    fn cmd(&self, program: &str) -> Cmd {
        Cmd::new(program).args(self.options())
    }

    /// The downloaded `Packages` index, if any.
    fn packages_index(&self) -> Option<PathBuf> {
        let dir = std::fs::read_dir(self.root.join("lists")).ok()?;
        dir.flatten().map(|e| e.path()).find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.contains("_Packages"))
        })
    }

    /// Downloads the package lists unless fresh ones are there.
    pub async fn update(&self, progress: &dyn Progress) -> Result<(), ImageError> {
        let step = Step::start(
            progress,
            format!("apt package lists for {} {}", self.mirror, self.suite),
        );
        let fresh = self
            .packages_index()
            .and_then(|p| p.metadata().ok())
            .and_then(|m| m.modified().ok())
            .is_some_and(|t| {
                SystemTime::now()
                    .duration_since(t)
                    .is_ok_and(|age| age < LISTS_MAX_AGE)
            });
        if fresh {
            step.cached();
            return Ok(());
        }
        let out = self
            .cmd("apt-get")
            .args(["-q", "update"])
            .timeout(Duration::from_secs(600))
            .output()
            .await
            .map_err(ImageError::tool("apt-get update"))?;
        // apt-get update exits 0 on some fetch failures ("W: Failed to fetch"); the index
        // being there is what counts.
        if !out.status.success() || self.packages_index().is_none() {
            let text = format!(
                "{}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            let detail = text
                .lines()
                .filter(|l| l.starts_with("E:") || l.starts_with("W:") || l.starts_with("Err"))
                .collect::<Vec<_>>()
                .join("; ");
            return Err(ImageError::MirrorUnreachable {
                mirror: self.mirror.clone(),
                suite: self.suite.clone(),
                detail: if detail.is_empty() {
                    nestbox_hostsys::process::tail(&out.stderr)
                } else {
                    detail
                },
            });
        }
        // The index file keeps the server's mtime; mark when we fetched it.
        if let Some(p) = self.packages_index()
            && let Ok(f) = std::fs::File::options().append(true).open(&p)
        {
            let _ = f.set_modified(SystemTime::now());
        }
        step.done();
        Ok(())
    }

    /// The candidate version of `package` and its `Depends` field.
    pub async fn show(&self, package: &str) -> Result<(PackageRef, String), ImageError> {
        let out = self
            .cmd("apt-cache")
            .args(["show", "--no-all-versions", package])
            .run()
            .await
            .map_err(|e| match e {
                ProcessError::Failed { stderr, .. } => ImageError::KernelPackage {
                    package: package.into(),
                    detail: format!("not found in {} {}: {stderr}", self.mirror, self.suite),
                },
                other => ImageError::Tool {
                    step: format!("apt-cache show {package}"),
                    source: other,
                },
            })?;
        let text = out.stdout_text();
        let field = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name).map(|v| v.trim().to_string()))
                .unwrap_or_default()
        };
        let version = field("Version:");
        if version.is_empty() {
            return Err(ImageError::KernelPackage {
                package: package.into(),
                detail: format!("no candidate version in {} {}", self.mirror, self.suite),
            });
        }
        Ok((
            PackageRef {
                name: package.into(),
                version,
            },
            field("Depends:"),
        ))
    }

    /// Downloads `pkg` into `dir` (skipped when the .deb is already there); returns its path.
    pub async fn download(&self, pkg: &PackageRef, dir: &Path) -> Result<PathBuf, ImageError> {
        std::fs::create_dir_all(dir).map_err(ImageError::io("create", dir))?;
        let file = format!("{}_{}_amd64.deb", pkg.name, pkg.version.replace(':', "%3a"));
        let path = dir.join(&file);
        if path.exists() {
            return Ok(path);
        }
        self.cmd("apt-get")
            .args(["-q", "download", &format!("{}={}", pkg.name, pkg.version)])
            .current_dir(dir)
            .timeout(Duration::from_secs(1800))
            .run()
            .await
            .map_err(|e| match e {
                ProcessError::Failed { stderr, .. } => ImageError::MirrorUnreachable {
                    mirror: self.mirror.clone(),
                    suite: self.suite.clone(),
                    detail: format!("downloading {}: {stderr}", pkg.name),
                },
                other => ImageError::Tool {
                    step: format!("apt-get download {}", pkg.name),
                    source: other,
                },
            })?;
        if !path.exists() {
            return Err(ImageError::KernelPackage {
                package: pkg.name.clone(),
                detail: format!("apt-get download did not produce {}", path.display()),
            });
        }
        Ok(path)
    }
}

/// The `linux-image-*` package a meta package depends on
/// (`linux-image-6.1.0-50-cloud-amd64 (= 6.1.176-1)` → `linux-image-6.1.0-50-cloud-amd64`).
pub fn kernel_dependency(depends: &str) -> Option<String> {
    depends
        .split([',', '|'])
        .map(|d| d.split_whitespace().next().unwrap_or_default())
        .find(|name| name.starts_with("linux-image-") && name.chars().any(|c| c.is_ascii_digit()))
        .map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_versioned_kernel_package() {
        assert_eq!(
            kernel_dependency("linux-image-6.1.0-50-cloud-amd64 (= 6.1.176-1)").as_deref(),
            Some("linux-image-6.1.0-50-cloud-amd64")
        );
        assert_eq!(
            kernel_dependency("initramfs-tools | linux-initramfs-tool, linux-image-6.12.9-cloud-amd64 (= 6.12.9-1)")
                .as_deref(),
            Some("linux-image-6.12.9-cloud-amd64")
        );
        assert_eq!(kernel_dependency("libc6"), None);
    }
}
