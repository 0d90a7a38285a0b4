//! Resolving the paths clients send: absolute, `~`-prefixed, or relative to the user's
//! home. The result is absolute and lexically normalised (`.` and `..` removed without
//! following symbolic links), the way E2B's agent resolves them.

use std::path::{Component, Path, PathBuf};

/// A path that cannot be resolved.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    /// No path at all.
    #[error("path is empty")]
    Empty,
    /// `~other` names another user's home, which is not supported.
    #[error("cannot expand {0:?}: only ~ and ~/… are supported")]
    OtherHome(String),
    /// A NUL byte.
    #[error("path contains a NUL byte")]
    Nul,
}

/// Resolves `path` for a user whose home is `home`.
pub fn resolve(path: &str, home: &Path) -> Result<PathBuf, PathError> {
    if path.is_empty() {
        return Err(PathError::Empty);
    }
    if path.contains('\0') {
        return Err(PathError::Nul);
    }
    let joined = if path == "~" {
        home.to_path_buf()
    } else if let Some(rest) = path.strip_prefix("~/") {
        home.join(rest)
    } else if path.starts_with('~') {
        return Err(PathError::OtherHome(path.to_owned()));
    } else if path.starts_with('/') {
        PathBuf::from(path)
    } else {
        home.join(path)
    };
    Ok(normalize(&joined))
}

/// Removes `.` and `..` lexically; `..` at the root stays at the root.
pub fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::from("/");
    for component in path.components() {
        match component {
            Component::Normal(part) => out.push(part),
            Component::ParentDir => {
                out.pop();
            }
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_like_envd() {
        let home = Path::new("/home/user");
        assert_eq!(
            resolve("/etc/hosts", home).unwrap(),
            PathBuf::from("/etc/hosts")
        );
        assert_eq!(
            resolve("a/b", home).unwrap(),
            PathBuf::from("/home/user/a/b")
        );
        assert_eq!(resolve("~", home).unwrap(), PathBuf::from("/home/user"));
        assert_eq!(
            resolve("~/x/../y", home).unwrap(),
            PathBuf::from("/home/user/y")
        );
        assert_eq!(resolve("../../../..", home).unwrap(), PathBuf::from("/"));
        assert_eq!(resolve("/a/./b/", home).unwrap(), PathBuf::from("/a/b"));
        assert_eq!(resolve("", home), Err(PathError::Empty));
        assert!(matches!(
            resolve("~root/x", home),
            Err(PathError::OtherHome(_))
        ));
        assert_eq!(resolve("a\0b", home), Err(PathError::Nul));
    }
}
