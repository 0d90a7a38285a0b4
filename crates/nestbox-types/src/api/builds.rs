//! Bodies of the template build endpoints (`/v1/templates/builds`): a recipe, the build's
//! progress and its logs.
//!
//! A recipe is a base template, then steps run in order in a sandbox made from it, then an
//! optional start command. [`Recipe::validate`] is the one check of a recipe's shape, used
//! by the control plane before it accepts a build and by the CLI before it uploads
//! anything.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::{BuildId, BuildStatus, TeamId, TemplateId, TemplateKind};

#[cfg(feature = "openapi")]
use utoipa::{IntoParams, ToSchema};

/// Most steps one recipe has.
pub const MAX_STEPS: usize = 100;
/// Longest command line of a step, bytes.
pub const MAX_COMMAND: usize = 64 << 10;
/// Most packages one helper step installs.
pub const MAX_PACKAGES: usize = 200;
/// Default time limit of a build, seconds.
pub const DEFAULT_BUILD_TIMEOUT_SEC: u32 = 1800;
/// Longest time limit of a build, seconds.
pub const MAX_BUILD_TIMEOUT_SEC: u32 = 7200;
/// Default time the start command has to become ready, seconds.
pub const DEFAULT_READY_TIMEOUT_SEC: u32 = 120;

/// `POST /v1/templates/builds`: build the team's template `name` from a recipe.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(deny_unknown_fields)]
pub struct CreateBuildRequest {
    /// The template to make (or replace, once the build succeeds): 1–64 letters, digits,
    /// `.`, `_` or `-`, starting with a letter or digit.
    #[cfg_attr(
        feature = "openapi",
        schema(pattern = "^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    )]
    pub name: String,
    /// What to build.
    #[serde(deserialize_with = "crate::serde_util::object")]
    pub recipe: Recipe,
    /// Time limit of the whole build, seconds (default 1800, at most 7200).
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 7200))]
    pub timeout_sec: Option<u32>,
    /// Run every step, taking nothing from the step cache (default `false`).
    #[serde(default)]
    pub no_cache: bool,
    /// Credentials for the registry of the recipe's `image`. Used for this build only:
    /// never stored, never shown.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "crate::serde_util::object_only"
    )]
    pub registry_auth: Option<RegistryAuth>,
    /// The tags the template gets (default `["default"]`: it becomes the template `name`
    /// itself; others make it `name:tag`, leaving `name` as it was). At most 10, each like
    /// a name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[cfg_attr(feature = "openapi", schema(schema_with = crate::schemas::build_tags))]
    pub tags: Vec<String>,
}

/// A user name and password (or access token) for an image registry. `Debug` never
/// shows the password.
#[derive(Clone, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(deny_unknown_fields)]
pub struct RegistryAuth {
    /// User name.
    pub username: String,
    /// Password or access token.
    pub password: String,
}

impl std::fmt::Debug for RegistryAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryAuth")
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

/// A template described as a base and the steps that make it.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(deny_unknown_fields)]
pub struct Recipe {
    /// The template to start from: the team's own or a platform one (default `minimal`,
    /// unless `image` is given).
    #[serde(default)]
    pub base: Option<String>,
    /// An OCI image to start from instead of a template:
    /// `[registry[:port]/]repository[:tag][@sha256:…]` (Docker Hub when no registry is
    /// named). Its layers become the root filesystem, and its environment, working
    /// directory, user and entrypoint (as the start command, unless the recipe has one)
    /// are the recipe's to begin with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(pattern = "^[!-~]{1,512}$"))]
    pub image: Option<String>,
    /// The user the steps and the start command run as until a `user` step (default:
    /// the image's user, else `root`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// The directory they run in until a `workdir` step (absolute; made if missing;
    /// default: the image's, else `/`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workdir: Option<String>,
    /// The steps, in order.
    #[serde(default)]
    pub steps: Vec<BuildStep>,
    /// A command left running in the template: sandboxes from it start with it already
    /// serving.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "crate::serde_util::object_only"
    )]
    pub start: Option<StartCommand>,
    /// `snapshot` (memory and disk: sandboxes continue with the start command running; the
    /// default) or `image` (the disk only: sandboxes boot from it; no start command).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<TemplateKind>,
    /// vCPUs of the build sandbox and of the template's sandboxes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 8))]
    pub vcpus: Option<u32>,
    /// Memory, MiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(minimum = 128))]
    pub memory_mb: Option<u32>,
    /// Root disk, MiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 102400))]
    pub disk_size_mb: Option<u32>,
}

/// One step of a recipe.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum BuildStep {
    /// Runs a shell command line (`/bin/sh -c`); a non-zero exit fails the build.
    Run {
        /// The command line.
        command: String,
        /// User to run as (default: the recipe's current user, `root` to begin with).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        user: Option<String>,
        /// Directory to run in (default: the recipe's current working directory).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        cwd: Option<String>,
    },
    /// Unpacks an uploaded archive (gzip-compressed tar, named by its SHA-256; see
    /// `PUT /v1/templates/builds/files/{hash}`) into a directory.
    Copy {
        /// SHA-256 of the archive, lower-case hex.
        #[cfg_attr(feature = "openapi", schema(pattern = "^[0-9a-f]{64}$"))]
        archive: String,
        /// Directory to unpack into (made if missing); relative paths are taken from the
        /// current working directory. With `source` naming a file, the file's path.
        dest: String,
        /// Owner of the unpacked files (default: the recipe's current user).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        user: Option<String>,
        /// Only this path of the archive (relative, no `..`): a directory's contents go
        /// into `dest`; a file becomes `dest` (or goes into it, when `dest` ends with `/`).
        /// Default: the whole archive.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        source: Option<String>,
        /// Permissions of what is copied, octal (`"0755"`), applied recursively.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        #[cfg_attr(feature = "openapi", schema(pattern = "^[0-7]{3,4}$"))]
        mode: Option<String>,
    },
    /// Sets environment variables for the steps after it, the start command and the
    /// template's sandboxes.
    Env {
        /// Names and values.
        vars: BTreeMap<String, String>,
    },
    /// Sets the working directory of the steps after it and of the start command (made if
    /// missing).
    Workdir {
        /// An absolute path, or one relative to the current working directory.
        path: String,
    },
    /// Sets the user of the steps after it and of the start command.
    User {
        /// An existing user of the template.
        name: String,
    },
    /// Installs Debian packages with `apt-get` (as root).
    Apt {
        /// Package names, optionally `name=version`.
        packages: Vec<String>,
    },
    /// Installs Python packages with `pip` (as the current user).
    Pip {
        /// Requirement specifiers (`name`, `name==1.2`).
        packages: Vec<String>,
    },
    /// Installs npm packages globally (as root).
    Npm {
        /// Package specifiers (`name`, `name@1.2.3`).
        packages: Vec<String>,
    },
}

/// The command a template keeps running, and how to tell it is ready.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(deny_unknown_fields)]
pub struct StartCommand {
    /// A shell command line, started in the background as the recipe's current user, in
    /// its working directory and with its environment.
    pub command: String,
    /// A shell command line run until it exits 0 (every half second); absent: ready at
    /// once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready: Option<String>,
    /// How long the start command has to become ready, seconds (default 120).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 3600))]
    pub ready_timeout_sec: Option<u32>,
}

fn valid_user(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_lowercase() || c == '_')
        && name.len() <= 32
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
}

fn valid_env_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// A package name as a helper passes it to its tool: never an option, never a shell word.
fn valid_package(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 214
        && !name.starts_with('-')
        && name.chars().all(|c| {
            c.is_ascii_alphanumeric()
                || matches!(
                    c,
                    '.' | '_'
                        | '-'
                        | '+'
                        | '='
                        | '@'
                        | '/'
                        | ':'
                        | '<'
                        | '>'
                        | '~'
                        | '^'
                        | '['
                        | ']'
                        | ','
                        | '!'
                )
        })
}

fn valid_path(path: &str) -> bool {
    !path.is_empty() && path.len() <= 4096 && !path.contains('\0')
}

fn check_command(what: &str, command: &str) -> Result<(), String> {
    if command.trim().is_empty() {
        return Err(format!("{what} is empty"));
    }
    if command.len() > MAX_COMMAND || command.contains('\0') {
        return Err(format!(
            "{what} must be at most {MAX_COMMAND} bytes, without NUL"
        ));
    }
    Ok(())
}

impl BuildStep {
    /// The step's kind, as spelled on the wire.
    pub fn kind(&self) -> &'static str {
        match self {
            BuildStep::Run { .. } => "run",
            BuildStep::Copy { .. } => "copy",
            BuildStep::Env { .. } => "env",
            BuildStep::Workdir { .. } => "workdir",
            BuildStep::User { .. } => "user",
            BuildStep::Apt { .. } => "apt",
            BuildStep::Pip { .. } => "pip",
            BuildStep::Npm { .. } => "npm",
        }
    }

    /// A one-line description for logs and lists.
    pub fn summary(&self) -> String {
        let text = match self {
            BuildStep::Run { command, .. } => format!("RUN {command}"),
            BuildStep::Copy {
                archive,
                dest,
                source,
                ..
            } => match source {
                Some(src) => format!("COPY {src} → {dest}"),
                None => format!("COPY {} → {dest}", &archive[..archive.len().min(12)]),
            },
            BuildStep::Env { vars } => {
                format!("ENV {}", vars.keys().cloned().collect::<Vec<_>>().join(" "))
            }
            BuildStep::Workdir { path } => format!("WORKDIR {path}"),
            BuildStep::User { name } => format!("USER {name}"),
            BuildStep::Apt { packages } => format!("APT {}", packages.join(" ")),
            BuildStep::Pip { packages } => format!("PIP {}", packages.join(" ")),
            BuildStep::Npm { packages } => format!("NPM {}", packages.join(" ")),
        };
        let line = text.lines().next().unwrap_or_default();
        let mut out: String = line.chars().take(120).collect();
        if out.len() < text.len() {
            out.push('…');
        }
        out
    }

    /// Whether the step changes the disk (and so ends in a cache entry); the others only
    /// change what later steps run with.
    pub fn changes_disk(&self) -> bool {
        !matches!(
            self,
            BuildStep::Env { .. } | BuildStep::Workdir { .. } | BuildStep::User { .. }
        )
    }

    fn validate(&self) -> Result<(), String> {
        let user_ok = |u: &Option<String>| match u {
            Some(u) if !valid_user(u) => Err(format!("user `{u}` is not a valid user name")),
            _ => Ok(()),
        };
        let packages_ok = |packages: &Vec<String>| {
            if packages.is_empty() || packages.len() > MAX_PACKAGES {
                return Err(format!("names 1–{MAX_PACKAGES} packages"));
            }
            match packages.iter().find(|p| !valid_package(p)) {
                Some(p) => Err(format!("package `{p}` is not a valid package name")),
                None => Ok(()),
            }
        };
        match self {
            BuildStep::Run { command, user, cwd } => {
                check_command("its command", command)?;
                user_ok(user)?;
                if cwd.as_deref().is_some_and(|c| !valid_path(c)) {
                    return Err("its cwd is not a valid path".into());
                }
                Ok(())
            }
            BuildStep::Copy {
                archive,
                dest,
                user,
                source,
                mode,
            } => {
                if !is_sha256_hex(archive) {
                    return Err("archive must be a SHA-256 in lower-case hex".into());
                }
                if !valid_path(dest) {
                    return Err("dest is not a valid path".into());
                }
                if let Some(src) = source
                    && (!valid_path(src)
                        || src.starts_with('/')
                        || src.split('/').any(|part| part == ".."))
                {
                    return Err("source must be a relative path inside the archive".into());
                }
                if let Some(m) = mode
                    && !(matches!(m.len(), 3 | 4) && m.bytes().all(|b| (b'0'..=b'7').contains(&b)))
                {
                    return Err("mode must be 3 or 4 octal digits".into());
                }
                user_ok(user)
            }
            BuildStep::Env { vars } => {
                if vars.is_empty() {
                    return Err("sets no variables".into());
                }
                match vars
                    .iter()
                    .find(|(k, v)| !valid_env_name(k) || v.contains('\0'))
                {
                    Some((k, _)) => Err(format!(
                        "`{k}` is not a valid variable (letters, digits and `_`, not starting with a digit; no NUL in values)"
                    )),
                    None => Ok(()),
                }
            }
            BuildStep::Workdir { path } => {
                if valid_path(path) {
                    Ok(())
                } else {
                    Err("path is not a valid path".into())
                }
            }
            BuildStep::User { name } => user_ok(&Some(name.clone())),
            BuildStep::Apt { packages }
            | BuildStep::Pip { packages }
            | BuildStep::Npm { packages } => packages_ok(packages),
        }
    }
}

/// Whether `s` is a SHA-256 digest in lower-case hex.
pub fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

impl Recipe {
    /// Checks the recipe's shape: step count, every step's fields, the start command.
    /// The message names the step (1-based) at fault.
    pub fn validate(&self) -> Result<(), String> {
        if let Some(image) = &self.image {
            if self.base.is_some() {
                return Err("a recipe starts from a base template or an image, not both".into());
            }
            if image.is_empty()
                || image.len() > 512
                || image.chars().any(|c| c.is_whitespace() || c.is_control())
            {
                return Err("image must be a reference of 1–512 characters without spaces".into());
            }
        }
        if let Some(u) = &self.user
            && !valid_user(u)
        {
            return Err(format!("user `{u}` is not a user name"));
        }
        if let Some(w) = &self.workdir
            && (!w.starts_with('/') || !valid_path(w))
        {
            return Err("workdir must be an absolute path".into());
        }
        if self.steps.len() > MAX_STEPS {
            return Err(format!("a recipe has at most {MAX_STEPS} steps"));
        }
        for (i, step) in self.steps.iter().enumerate() {
            step.validate()
                .map_err(|e| format!("step {} ({}): {e}", i + 1, step.kind()))?;
        }
        if let Some(start) = &self.start {
            check_command("the start command", &start.command)?;
            if let Some(ready) = &start.ready {
                check_command("the ready check", ready)?;
            }
            if start
                .ready_timeout_sec
                .is_some_and(|t| !(1..=3600).contains(&t))
            {
                return Err("ready_timeout_sec must be 1–3600".into());
            }
            if self.kind == Some(TemplateKind::Image) {
                return Err(
                    "an image template keeps no running process: a start command needs kind `snapshot`"
                        .into(),
                );
            }
        }
        Ok(())
    }

    /// The archives the recipe's copy steps unpack.
    pub fn archives(&self) -> impl Iterator<Item = &str> {
        self.steps.iter().filter_map(|s| match s {
            BuildStep::Copy { archive, .. } => Some(archive.as_str()),
            _ => None,
        })
    }
}

/// Where one step of a build stands.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct BuildStepState {
    /// 1-based position in the recipe; the start command is the step after the last.
    pub index: u32,
    /// What it does, in one line.
    pub summary: String,
    /// `pending`, `running`, `done`, `cached` (taken from the step cache), `failed` or
    /// `cancelled`.
    pub status: String,
    /// Exit code of its command, once it ran.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// How long it ran, ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
}

/// A template build.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct Build {
    /// Id.
    pub id: BuildId,
    /// The team it builds for.
    pub team_id: TeamId,
    /// The template it makes.
    pub name: String,
    /// Where it stands.
    pub status: BuildStatus,
    /// The recipe.
    pub recipe: Recipe,
    /// Each step (and the start command, last) with its outcome.
    pub steps: Vec<BuildStepState>,
    /// Why it failed or was cancelled; names the step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The template it made, once `ready`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template_id: Option<TemplateId>,
    /// Steps taken from the step cache.
    pub cached_steps: u32,
    /// Prefixed id of who started it.
    pub created_by: String,
    /// When it was accepted.
    pub created_at: DateTime<Utc>,
    /// When it ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<DateTime<Utc>>,
    /// The tags its template gets (`default`: it is the template `name`).
    pub tags: Vec<String>,
}

/// A line of a build's log.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct BuildLogEntry {
    /// Position in the build's log, from 0.
    pub seq: u64,
    /// The step it belongs to (1-based); 0 for the build's own messages.
    pub step: u32,
    /// `stdout`, `stderr` or `info` (the builder's own).
    pub stream: String,
    /// The text, a line at most (output is split at line ends).
    pub text: String,
    /// When it was recorded.
    pub at: DateTime<Utc>,
}

/// `GET /v1/templates/builds/{id}/logs`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct BuildLogs {
    /// Entries from the requested offset on.
    pub items: Vec<BuildLogEntry>,
    /// The offset to ask for next.
    pub next: u64,
    /// The build has ended and `items` reaches the end of its log.
    pub done: bool,
}

/// Query of `GET /v1/templates/builds/{id}/logs`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(IntoParams))]
#[serde(deny_unknown_fields)]
pub struct BuildLogsQuery {
    /// First entry to return (`next` of the previous answer; default 0).
    #[serde(default)]
    pub offset: u64,
    /// Most entries to return (default and at most 1000).
    #[serde(default)]
    #[cfg_attr(feature = "openapi", param(minimum = 1, maximum = 1000))]
    pub limit: Option<u32>,
}

/// `PUT /v1/templates/builds/files/{hash}` and `GET` of the same: an uploaded archive.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct BuildFile {
    /// SHA-256 of its bytes.
    pub hash: String,
    /// Its size, bytes.
    pub size: u64,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn recipe(steps: serde_json::Value) -> Recipe {
        serde_json::from_value(serde_json::json!({ "steps": steps })).unwrap()
    }

    #[test]
    fn every_step_kind_reads_from_json() {
        let r = recipe(serde_json::json!([
            {"type": "run", "command": "echo hi", "user": "user", "cwd": "/tmp"},
            {"type": "copy", "archive": "a".repeat(64), "dest": "/app"},
            {"type": "env", "vars": {"PORT": "8080"}},
            {"type": "workdir", "path": "/app"},
            {"type": "user", "name": "user"},
            {"type": "apt", "packages": ["curl"]},
            {"type": "pip", "packages": ["flask==3.0"]},
            {"type": "npm", "packages": ["left-pad@1.3.0"]},
        ]));
        assert_eq!(r.steps.len(), 8);
        r.validate().unwrap();
        let kinds: Vec<_> = r.steps.iter().map(BuildStep::kind).collect();
        assert_eq!(
            kinds,
            ["run", "copy", "env", "workdir", "user", "apt", "pip", "npm"]
        );
        assert!(!r.steps[2].changes_disk());
        assert!(r.steps[0].changes_disk());
    }

    #[test]
    fn bad_steps_are_named() {
        let r = recipe(serde_json::json!([
            {"type": "run", "command": "true"},
            {"type": "apt", "packages": ["-oAPT::Update::Pre-Invoke=x"]},
        ]));
        let err = r.validate().unwrap_err();
        assert!(err.starts_with("step 2 (apt):"), "{err}");

        let r = recipe(serde_json::json!([{"type": "env", "vars": {"1X": "y"}}]));
        assert!(r.validate().unwrap_err().contains("`1X`"));
        let r = recipe(serde_json::json!([{"type": "copy", "archive": "x", "dest": "/"}]));
        assert!(r.validate().unwrap_err().contains("SHA-256"));
        let r = recipe(serde_json::json!([{"type": "run", "command": "  "}]));
        assert!(r.validate().unwrap_err().contains("empty"));
        let r = recipe(serde_json::json!([{"type": "user", "name": "Root;"}]));
        assert!(r.validate().is_err());
        assert!(
            serde_json::from_value::<Recipe>(serde_json::json!({"steps": [{"type": "nope"}]}))
                .is_err()
        );
    }

    #[test]
    fn an_image_template_has_no_start_command() {
        let r = Recipe {
            kind: Some(TemplateKind::Image),
            start: Some(StartCommand {
                command: "sleep 1000".into(),
                ready: None,
                ready_timeout_sec: None,
            }),
            ..Default::default()
        };
        assert!(r.validate().unwrap_err().contains("snapshot"));
    }

    #[test]
    fn summaries_are_one_short_line() {
        let step = BuildStep::Run {
            command: format!("echo {}\nsecond line", "x".repeat(300)),
            user: None,
            cwd: None,
        };
        let s = step.summary();
        assert!(s.chars().count() <= 121 && !s.contains('\n') && s.ends_with('…'));
    }
}
