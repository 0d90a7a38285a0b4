//! Directories only the agent may touch: the data directory and the tmpfs directory that
//! holds guest RAM.
//!
//! [`private_dir`] makes one or checks one that exists: a real directory (not a symbolic
//! link), owned by the calling user, mode 0700. A directory someone else made first (the
//! tmpfs one has a predictable name under the world-writable `/dev/shm`) is refused rather
//! than used, so nobody can plant a link or read a guest's memory through it.

use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Why a directory cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum DirError {
    /// Creating or inspecting it failed.
    #[error("{path}: {source}")]
    Io {
        /// The directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// It is a symbolic link, or not a directory.
    #[error(
        "{path} is not a directory (a symbolic link or another file is in its place); remove it"
    )]
    NotADirectory {
        /// The path.
        path: PathBuf,
    },
    /// Someone else owns it.
    #[error("{path} is owned by uid {owner}, not by this process (uid {me}); remove it")]
    Foreign {
        /// The directory.
        path: PathBuf,
        /// Its owner.
        owner: u32,
        /// This process's effective uid.
        me: u32,
    },
}

/// Makes `path` (and missing parents) a private directory, or checks the one there and
/// narrows its mode to 0700.
pub fn private_dir(path: &Path) -> Result<(), DirError> {
    let io = |source| DirError::Io {
        path: path.to_path_buf(),
        source,
    };
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(io)?;
    }
    match std::fs::DirBuilder::new().mode(0o700).create(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(io(e)),
    }
    // Checked whether it was made here or found: another process may have won the race.
    let meta = std::fs::symlink_metadata(path).map_err(io)?;
    if !meta.file_type().is_dir() {
        return Err(DirError::NotADirectory {
            path: path.to_path_buf(),
        });
    }
    let me = nix::unistd::geteuid().as_raw();
    if meta.uid() != me {
        return Err(DirError::Foreign {
            path: path.to_path_buf(),
            owner: meta.uid(),
            me,
        });
    }
    if meta.mode() & 0o7777 != 0o700 {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700)).map_err(io)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn made_private_or_checked_and_narrowed() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("a/b");
        private_dir(&dir).unwrap();
        let mode = std::fs::metadata(&dir).unwrap().mode() & 0o7777;
        assert_eq!(mode, 0o700);
        // An existing, too open directory of ours is narrowed.
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        private_dir(&dir).unwrap();
        assert_eq!(std::fs::metadata(&dir).unwrap().mode() & 0o7777, 0o700);
    }

    #[test]
    fn links_files_and_foreign_directories_are_refused() {
        let root = tempfile::tempdir().unwrap();
        let target = root.path().join("elsewhere");
        std::fs::create_dir(&target).unwrap();
        let link = root.path().join("link");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        assert!(matches!(
            private_dir(&link),
            Err(DirError::NotADirectory { .. })
        ));
        let file = root.path().join("file");
        std::fs::write(&file, "x").unwrap();
        assert!(matches!(
            private_dir(&file),
            Err(DirError::NotADirectory { .. })
        ));
        if nix::unistd::geteuid().is_root() {
            let foreign = root.path().join("foreign");
            std::fs::create_dir(&foreign).unwrap();
            std::os::unix::fs::chown(&foreign, Some(65534), Some(65534)).unwrap();
            let err = private_dir(&foreign).unwrap_err();
            assert!(
                matches!(err, DirError::Foreign { owner: 65534, .. }),
                "{err}"
            );
        }
    }
}
