//! Template recipes as people write them, turned into what the API builds.
//!
//! Two sources, one result ([`Prepared`]): the API's [`Recipe`] (with every copy step
//! naming its archive by SHA-256) and the archives themselves, for the caller to upload
//! before it starts the build (`PUT /v1/templates/builds/files/{hash}`; ones the team
//! already has are skipped).
//! - a **recipe file** (TOML, [`from_toml`]; the format is in `docs/templates.md`);
//! - a **Dockerfile** ([`from_dockerfile`]): `FROM`, `RUN`, `COPY`/`ADD`, `ENV`, `ARG`,
//!   `WORKDIR`, `USER`, `CMD`/`ENTRYPOINT`, `HEALTHCHECK`.
//!
//! Invariants:
//! - copy sources are read from the recipe's directory (its *context*) and never from
//!   outside it: absolute paths and `..` that leave it are refused;
//! - archives are reproducible ([`archive`]): the same files give the same bytes and so the
//!   same hash, which is what lets the step cache and the upload skip unchanged files;
//! - nothing here talks to the network; the result is checked with
//!   [`Recipe::validate`] before it is returned.

pub mod archive;
mod dockerfile;
mod file;

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};

use nestbox_types::api::Recipe;

pub use dockerfile::{Base, base_for_image, from_dockerfile};
pub use file::from_toml;

/// What went wrong reading a recipe; messages name the line or step.
#[derive(Debug, thiserror::Error)]
pub enum RecipeError {
    /// The file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The recipe file is not valid TOML or has unknown fields.
    #[error("{0}")]
    Toml(String),
    /// A Dockerfile instruction we cannot turn into a step.
    #[error("line {line}: {message}")]
    Dockerfile { line: usize, message: String },
    /// A step is malformed.
    #[error("step {step}: {message}")]
    Step { step: usize, message: String },
    /// A copy source is missing or outside the context.
    #[error("copy source `{path}`: {message}")]
    Source { path: String, message: String },
    /// The result breaks a rule of the API's recipes.
    #[error("{0}")]
    Invalid(String),
}

/// An archive a copy step unpacks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Archive {
    /// SHA-256 of `data`, lower-case hex.
    pub hash: String,
    /// The gzip-compressed tar.
    pub data: Vec<u8>,
    /// What it was made from, for messages.
    pub source: PathBuf,
}

/// A recipe ready to be sent.
#[derive(Debug, Clone, PartialEq)]
pub struct Prepared {
    /// The template name the file asks for, if any.
    pub name: Option<String>,
    /// The recipe.
    pub recipe: Recipe,
    /// The file's build time limit, if any.
    pub timeout_sec: Option<u32>,
    /// Every archive the copy steps name (each once).
    pub archives: Vec<Archive>,
    /// What was read but has no effect here (a Dockerfile's `EXPOSE`, say).
    pub warnings: Vec<String>,
}

/// Whether `path` names a Dockerfile (`Dockerfile`, `Dockerfile.*`, `*.Dockerfile`).
pub fn is_dockerfile(path: &Path) -> bool {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_lowercase())
        .unwrap_or_default();
    name == "dockerfile" || name.starts_with("dockerfile.") || name.ends_with(".dockerfile")
}

/// Reads a recipe file or a Dockerfile (by its name); copy sources are taken from its
/// directory. `args` are a Dockerfile's `--build-arg`s.
pub fn load(path: &Path, args: &BTreeMap<String, String>) -> Result<Prepared, RecipeError> {
    let text = std::fs::read_to_string(path).map_err(|source| RecipeError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let context = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if is_dockerfile(path) {
        from_dockerfile(&text, context, args)
    } else {
        from_toml(&text, context)
    }
}

/// `source` inside `context`, refusing anything that would leave it.
fn inside(context: &Path, source: &str) -> Result<PathBuf, RecipeError> {
    let refuse = |message: &str| RecipeError::Source {
        path: source.to_string(),
        message: message.to_string(),
    };
    let rel = Path::new(source);
    if rel.is_absolute() {
        return Err(refuse("must be relative to the recipe's directory"));
    }
    let mut depth = 0i32;
    for c in rel.components() {
        match c {
            Component::ParentDir => depth -= 1,
            Component::Normal(_) => depth += 1,
            Component::CurDir => {}
            _ => return Err(refuse("must be relative to the recipe's directory")),
        }
        if depth < 0 {
            return Err(refuse("leaves the recipe's directory"));
        }
    }
    let full = context.join(rel);
    if !full.exists() {
        return Err(refuse("does not exist"));
    }
    // A symbolic link on the way may not lead out either.
    let root = context
        .canonicalize()
        .map_err(|e| refuse(&format!("the recipe's directory: {e}")))?;
    let real = full.canonicalize().map_err(|e| refuse(&e.to_string()))?;
    if !real.starts_with(&root) {
        return Err(refuse(
            "leads out of the recipe's directory through a symbolic link",
        ));
    }
    Ok(full)
}

/// Collects archives once each and checks the recipe.
fn finish(
    name: Option<String>,
    recipe: Recipe,
    timeout_sec: Option<u32>,
    archives: Vec<Archive>,
    warnings: Vec<String>,
) -> Result<Prepared, RecipeError> {
    recipe.validate().map_err(RecipeError::Invalid)?;
    let mut unique: Vec<Archive> = Vec::new();
    for a in archives {
        if !unique.iter().any(|u| u.hash == a.hash) {
            unique.push(a);
        }
    }
    Ok(Prepared {
        name,
        recipe,
        timeout_sec,
        archives: unique,
        warnings,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn sources_stay_inside_the_context() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("app")).unwrap();
        assert!(inside(dir.path(), "app").is_ok());
        assert!(inside(dir.path(), "./app/../app").is_ok());
        for bad in ["/etc", "../x", "app/../../x"] {
            assert!(inside(dir.path(), bad).is_err(), "{bad}");
        }
        assert!(inside(dir.path(), "missing").is_err());
        std::os::unix::fs::symlink("/etc", dir.path().join("out")).unwrap();
        let err = inside(dir.path(), "out/hostname").unwrap_err().to_string();
        assert!(err.contains("symbolic link"), "{err}");
    }

    #[test]
    fn dockerfiles_are_known_by_name() {
        assert!(is_dockerfile(Path::new("x/Dockerfile")));
        assert!(is_dockerfile(Path::new("Dockerfile.dev")));
        assert!(is_dockerfile(Path::new("web.dockerfile")));
        assert!(!is_dockerfile(Path::new("recipe.toml")));
    }
}
