//! Template builds: a recipe run step by step in a sandbox, ending in a template.
//!
//! ```text
//!  POST /v1/templates/builds ──▶ record (building) ──▶ runner task (this process)
//!     base template, or the newest step-cache entry that matches
//!        │ create the build sandbox (the submitter's team, its quotas)
//!        ▼
//!     step 1 … step N    each: run in the sandbox, log its output line by line; a step
//!        │               that changes the disk ends in a checkpoint (a hidden snapshot
//!        │               template) recorded in the step cache under its key
//!        ▼
//!     start command + ready check  ──▶  snapshot (or image) template `name`
//!        ▼
//!     build sandbox destroyed; record ready / failed / cancelled
//! ```
//!
//! Rules:
//! - a step's cache key is the SHA-256 of the previous key and the step (its archive's
//!   hash included); the first key covers the base template's id, its last change and the
//!   machine. A rebuild starts from the entry of the last disk step whose key matches and
//!   replays the environment, directory and user of the steps before it;
//! - `env`, `workdir` and `user` steps change what later steps run with: each run step gets
//!   the recipe's environment, directory and user at that point, and so do the start
//!   command and (the environment) the template's sandboxes;
//! - a failing step fails the build naming it, with its output in the log; a cancel or the
//!   time limit ends the build at the next look (every second while a step runs). Either
//!   way the build sandbox is destroyed and no template is made; entries of the steps that
//!   succeeded stay in the cache, which is what lets a fixed recipe resume;
//! - the runner records progress every second; a build not heard of for
//!   [`crate::config::BuildLimits::stale_after`] (its process stopped) is failed by the
//!   monitor, which destroys its sandbox ([`Services::sweep_builds`]), and prunes the cache
//!   and old archives;
//! - builds, their logs and archives are the team's: another team's are not found.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use nestbox_db::builds::{self as db, LogLine};
use nestbox_db::{tags, templates};
use nestbox_types::api::{
    Build, BuildFile, BuildLogEntry, BuildLogs, BuildLogsQuery, BuildStep, BuildStepState,
    CreateBuildRequest, CreateSandboxRequest, ExecEvent, ExecRequest, StartProcessRequest,
    is_sha256_hex,
};
use nestbox_types::limits::{DEFAULT_TAG, is_valid_template_name};
use nestbox_types::{BuildId, BuildStatus, ErrorCode, SandboxId, TemplateKind};
use sha2::{Digest, Sha256};

use super::templates::make_template;
use super::{AuditActor, AuditEntry};
use crate::error::{ApiError, ApiResult};
use crate::extract::Caller;
use crate::state::Services;

/// The base when a recipe names none.
const DEFAULT_BASE: &str = "minimal";
/// Longest log line kept; longer output is split.
const MAX_LINE: usize = 4096;
/// Most log lines one build keeps; output beyond is counted, not stored.
const MAX_LOG_LINES: u64 = 100_000;
/// How often a running step's output is written and the build's record touched.
const TICK: Duration = Duration::from_secs(1);
/// Builds a list shows.
const LIST_LIMIT: u32 = 100;
/// How often a running build's record is touched, whatever its steps are doing (the
/// monitor fails builds not touched for [`crate::config::BuildLimits::stale_after`]).
const KEEPALIVE: Duration = Duration::from_secs(5);
/// How much longer than its build's time limit a build sandbox may live: its lifetime
/// ends it even if nothing else does.
const SANDBOX_GRACE_SEC: u32 = 600;
/// A copy step in the build sandbox: `$1` dest (a trailing `/`: a directory), `$2` the
/// uploaded archive, `$3` the owner, `$4` the path in the archive (empty: all of it), `$5`
/// the mode (empty: as archived). Portable to busybox.
const COPY_SCRIPT: &str = r#"set -e
dest="$1"; archive="$2"; owner="$3"; source="$4"; mode="$5"
tmp="$archive.d"; rm -rf "$tmp" "$tmp.list"; mkdir -p "$tmp"
tar -xzmof "$archive" -C "$tmp"
rm -f "$archive"
src="$tmp/$source"; src="${src%/}"
if [ -d "$src" ] && [ ! -L "$src" ]; then
  : > "$tmp.list"
  if [ ! -e "$dest" ]; then mkdir -p "$dest"; echo . >> "$tmp.list"; fi
  (cd "$src" && find . -mindepth 1) >> "$tmp.list"
  cp -a "$src/." "$dest"
  base="${dest%/}"
elif [ -e "$src" ] || [ -L "$src" ]; then
  case "$dest" in
    */) mkdir -p "$dest"; dest="$dest$(basename "$src")" ;;
    *) if [ -d "$dest" ]; then dest="$dest/$(basename "$src")"; else mkdir -p "$(dirname "$dest")"; fi ;;
  esac
  rm -rf "$dest"
  cp -a "$src" "$dest"
  echo . > "$tmp.list"
  base="$dest"
else
  echo "$source is not in the uploaded files" >&2
  exit 1
fi
while IFS= read -r p; do
  if [ "$p" = . ]; then t="$base"; else t="$base/$p"; fi
  if [ "$owner" != root ]; then chown -h "$owner": "$t"; fi
  if [ -n "$mode" ] && [ ! -L "$t" ]; then chmod "$mode" "$t"; fi
done < "$tmp.list"
rm -rf "$tmp" "$tmp.list"
"#;
/// How long a build announced without its recipe (`waiting`) may wait to be started.
const WAITING_MAX: Duration = Duration::from_secs(3600);
/// Version of the cache key's recipe; a change to how steps run changes it.
const CACHE_KEY_VERSION: &str = "nestbox-build-cache-v1";

/// API view of a build.
pub fn build_view(b: &db::Build) -> Build {
    Build {
        id: b.id,
        team_id: b.team_id,
        name: b.name.clone(),
        status: b.status,
        recipe: b.recipe.clone(),
        steps: b.steps.clone(),
        error: b.error.clone(),
        template_id: b.template_id,
        cached_steps: b.cached_steps,
        created_by: b.created_by.clone(),
        created_at: b.created_at,
        finished_at: b.finished_at,
        tags: b.tags.clone(),
    }
}

/// A build's tags as asked for: checked, without repeats, `default` when none.
fn build_tags(asked: &[String]) -> ApiResult<Vec<String>> {
    let mut tags = super::tags::checked_tags(asked)?;
    if tags.is_empty() {
        tags.push(DEFAULT_TAG.to_string());
    }
    Ok(tags)
}

fn not_found(id: BuildId) -> ApiError {
    ApiError::new(
        ErrorCode::BuildNotFound,
        format!("template build {id} not found"),
    )
}

/// What steps run with at a point of the recipe.
#[derive(Debug, Clone, Default, PartialEq)]
struct RunState {
    env: BTreeMap<String, String>,
    workdir: Option<String>,
    user: Option<String>,
}

impl RunState {
    /// The state after `step` (which must be valid).
    fn apply(&mut self, step: &BuildStep) {
        match step {
            BuildStep::Env { vars } => self.env.extend(vars.clone()),
            BuildStep::Workdir { path } => self.workdir = Some(self.resolve(path)),
            BuildStep::User { name } => self.user = Some(name.clone()),
            _ => {}
        }
    }

    /// `path` taken from the working directory (`/` to begin with).
    fn resolve(&self, path: &str) -> String {
        if path.starts_with('/') {
            return path.to_string();
        }
        let base = self.workdir.as_deref().unwrap_or("/");
        format!("{}/{path}", base.trim_end_matches('/'))
    }

    fn user(&self) -> String {
        self.user.clone().unwrap_or_else(|| "root".into())
    }
}

/// What a base template is to the step cache: its id and its last change.
fn template_identity(t: &templates::Template) -> String {
    format!("{}@{}", t.id, t.updated_at.to_rfc3339())
}

/// The step-cache key of an image imported from the manifest `digest`.
fn image_key(digest: &str) -> String {
    let mut h = Sha256::new();
    h.update(CACHE_KEY_VERSION);
    h.update([0]);
    h.update("oci-image");
    h.update([0]);
    h.update(digest);
    hex::encode(h.finalize())
}

/// `argv` as one shell command line (each word single-quoted where it needs it).
fn shell_join(argv: &[String]) -> String {
    argv.iter()
        .map(|w| {
            if !w.is_empty()
                && w.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c))
            {
                w.clone()
            } else {
                format!("'{}'", w.replace('\'', r"'\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// What a build from an OCI image starts with.
struct ImageBase {
    /// The template made of it (or taken from the cache).
    template: templates::Template,
    /// Its configuration.
    config: nestbox_proto::hostagent::ResolveImageResponse,
}

/// The cache key of each step: `keys[i]` is the state after step `i + 1`.
fn cache_keys(base: &str, machine: (u32, u32, u32), steps: &[BuildStep]) -> Vec<String> {
    let mut h = Sha256::new();
    h.update(CACHE_KEY_VERSION);
    h.update([0]);
    h.update(base);
    h.update([0]);
    h.update(format!("{}/{}/{}", machine.0, machine.1, machine.2));
    let mut key = hex::encode(h.finalize());
    steps
        .iter()
        .map(|step| {
            let mut h = Sha256::new();
            h.update(&key);
            h.update([0]);
            // Our own type, serialised with sorted maps: the same step, the same bytes.
            h.update(serde_json::to_vec(step).unwrap_or_default());
            key = hex::encode(h.finalize());
            key.clone()
        })
        .collect()
}

/// The line-splitting log of a running build.
struct Log {
    build: BuildId,
    next_seq: u64,
    pending: Vec<LogLine>,
    partial: [Vec<u8>; 2],
    dropped: u64,
}

impl Log {
    fn line(&mut self, step: u32, stream: &'static str, text: impl Into<String>) {
        if self.next_seq + self.pending.len() as u64 >= MAX_LOG_LINES {
            self.dropped += 1;
            return;
        }
        self.pending.push(LogLine {
            step,
            stream,
            text: text.into(),
        });
    }

    /// Output bytes of a stream (0 stdout, 1 stderr): complete lines are logged, the rest
    /// waits for more.
    fn output(&mut self, step: u32, which: usize, data: &[u8]) {
        let stream = if which == 0 { "stdout" } else { "stderr" };
        self.partial[which].extend_from_slice(data);
        loop {
            let buf = &mut self.partial[which];
            let cut = match buf.iter().position(|&b| b == b'\n') {
                Some(i) => i + 1,
                None if buf.len() >= MAX_LINE => MAX_LINE,
                None => break,
            };
            let line: Vec<u8> = buf.drain(..cut).collect();
            let text = String::from_utf8_lossy(&line);
            self.line(step, stream, text.trim_end_matches(['\n', '\r']));
        }
    }

    /// Logs what a step left without a line end.
    fn end_step(&mut self, step: u32) {
        for which in 0..2 {
            if !self.partial[which].is_empty() {
                let rest = std::mem::take(&mut self.partial[which]);
                let stream = if which == 0 { "stdout" } else { "stderr" };
                self.line(step, stream, String::from_utf8_lossy(&rest).into_owned());
            }
        }
    }

    async fn flush(&mut self, database: &nestbox_db::Db) {
        if self.pending.is_empty() {
            return;
        }
        match db::append_logs(database, self.build, self.next_seq, &self.pending).await {
            Ok(()) => {
                self.next_seq += self.pending.len() as u64;
                self.pending.clear();
            }
            // Kept for the next flush.
            Err(e) => tracing::warn!(build = %self.build, error = %e, "writing build logs"),
        }
    }
}

/// Why a build stopped early.
enum Stop {
    Failed(String),
    Cancelled,
    /// The build ended elsewhere (the monitor failed it): nothing more to record.
    Gone,
}

impl From<ApiError> for Stop {
    fn from(e: ApiError) -> Self {
        Stop::Failed(e.message)
    }
}

/// One build's run, in its own task.
struct Runner {
    svc: Arc<Services>,
    caller: Caller,
    build: db::Build,
    steps: Vec<BuildStepState>,
    cached: u32,
    sandbox: Option<SandboxId>,
    log: Log,
    last_beat: Instant,
    /// Take nothing from the step cache (and replace its entries).
    no_cache: bool,
    /// Credentials for the recipe's image registry (this build's only; never stored).
    registry_auth: Option<nestbox_types::api::RegistryAuth>,
}

impl Runner {
    /// Writes the log and progress; fails with [`Stop`] if a cancel was asked for, the
    /// time limit passed or the build ended elsewhere.
    async fn beat(&mut self) -> Result<(), Stop> {
        self.last_beat = Instant::now();
        self.log.flush(&self.svc.db).await;
        match db::progress(
            &self.svc.db,
            self.build.id,
            &self.steps,
            self.cached,
            self.sandbox,
        )
        .await
        {
            Ok(Some(true)) => return Err(Stop::Cancelled),
            Ok(Some(false)) => {}
            Ok(None) => return Err(Stop::Gone),
            Err(e) => {
                tracing::warn!(build = %self.build.id, error = %e, "recording build progress")
            }
        }
        if chrono::Utc::now() >= self.build.deadline {
            let limit = (self.build.deadline - self.build.created_at).num_seconds();
            return Err(Stop::Failed(format!(
                "the build passed its time limit of {limit} s"
            )));
        }
        Ok(())
    }

    /// The build sandbox's lifetime: the build's time limit and a grace period.
    fn lifetime_sec(&self) -> u32 {
        let limit = (self.build.deadline - self.build.created_at).num_seconds();
        u32::try_from(limit)
            .unwrap_or(nestbox_types::api::MAX_BUILD_TIMEOUT_SEC)
            .saturating_add(SANDBOX_GRACE_SEC)
            .min(self.svc.cfg.limits.max_lifetime_sec)
    }

    fn remaining(&self) -> u32 {
        let left = (self.build.deadline - chrono::Utc::now())
            .num_seconds()
            .max(1);
        u32::try_from(left)
            .unwrap_or(u32::MAX)
            .min(self.svc.cfg.limits.max_exec_timeout_sec)
    }

    fn info(&mut self, step: u32, text: impl Into<String>) {
        self.log.line(step, "info", text);
    }

    fn set(&mut self, step: u32, status: &str) {
        if let Some(s) = self.steps.get_mut(step as usize - 1) {
            s.status = status.into();
        }
    }

    /// Records how step `index`, begun at `began`, ended.
    fn settle(&mut self, index: u32, began: Instant, ran: Result<(), Stop>) -> Result<(), Stop> {
        if let Some(s) = self.steps.get_mut(index as usize - 1) {
            s.duration_ms = Some(began.elapsed().as_millis() as u64);
        }
        let status = match &ran {
            Ok(()) => "done",
            Err(Stop::Cancelled) => "cancelled",
            Err(_) => "failed",
        };
        self.set(index, status);
        ran
    }

    /// Runs a command in the build sandbox, logging its output under `step`. Returns its
    /// exit code.
    async fn exec(&mut self, step: u32, req: ExecRequest) -> Result<i32, Stop> {
        let sandbox = self
            .sandbox
            .ok_or_else(|| Stop::Failed("no build sandbox".into()))?;
        let stream = self.svc.exec_stream(&self.caller, sandbox, &req).await?;
        let mut stream = std::pin::pin!(stream);
        let mut tick = tokio::time::interval(TICK);
        tick.tick().await;
        loop {
            tokio::select! {
                ev = stream.next() => match ev {
                    Some(ExecEvent::Stdout { data }) => self.log.output(step, 0, &decode(&data)),
                    Some(ExecEvent::Stderr { data }) => self.log.output(step, 1, &decode(&data)),
                    Some(ExecEvent::Started { .. }) => {}
                    Some(ExecEvent::Exit { exit_code, timed_out, .. }) => {
                        self.log.end_step(step);
                        if timed_out {
                            return Err(Stop::Failed(format!(
                                "step {step} ran out of time (a step runs at most {} s, and never past the build's time limit)",
                                self.svc.cfg.limits.max_exec_timeout_sec
                            )));
                        }
                        return Ok(exit_code);
                    }
                    Some(ExecEvent::Error { message, .. }) => {
                        self.log.end_step(step);
                        return Err(Stop::Failed(format!("step {step}: {message}")));
                    }
                    None => {
                        self.log.end_step(step);
                        return Err(Stop::Failed(format!("step {step}: the command's output ended without an exit status")));
                    }
                },
                _ = tick.tick() => self.beat().await?,
            }
        }
    }

    fn command(
        &self,
        state: &RunState,
        argv: Vec<String>,
        user: Option<String>,
        cwd: Option<String>,
    ) -> ExecRequest {
        ExecRequest {
            command: None,
            argv: Some(argv),
            env: state.env.clone(),
            cwd: cwd.or_else(|| state.workdir.clone()),
            user: Some(user.unwrap_or_else(|| state.user())),
            timeout_sec: Some(self.remaining()),
            stdin_base64: None,
        }
    }

    /// Runs one step; `Ok(())` when it succeeded.
    async fn step(
        &mut self,
        index: u32,
        step: &BuildStep,
        state: &mut RunState,
    ) -> Result<(), Stop> {
        let sh = |script: &str, args: &[String]| {
            let mut argv = vec![
                "/bin/sh".to_string(),
                "-c".into(),
                script.to_string(),
                "sh".into(),
            ];
            argv.extend(args.iter().cloned());
            argv
        };
        let req = match step {
            BuildStep::Run { command, user, cwd } => Some(self.command(
                state,
                sh(command, &[]),
                user.clone(),
                cwd.as_ref().map(|c| state.resolve(c)),
            )),
            BuildStep::Copy {
                archive,
                dest,
                user,
                source,
                mode,
            } => {
                let data = db::file_data(&self.svc.db, self.build.team_id, archive)
                    .await
                    .map_err(ApiError::from)?
                    .ok_or_else(|| {
                        Stop::Failed(format!("step {index}: archive {archive} was not uploaded"))
                    })?;
                let path = format!("/tmp/.nestbox-build-{archive}.tar.gz");
                let sandbox = self
                    .sandbox
                    .ok_or_else(|| Stop::Failed("no build sandbox".into()))?;
                let len = data.len() as u64;
                let body =
                    futures::stream::once(
                        async move { Ok::<_, std::io::Error>(Bytes::from(data)) },
                    );
                self.svc
                    .upload(
                        &self.caller,
                        sandbox,
                        &path,
                        &Some("root".into()),
                        Some(len),
                        body,
                    )
                    .await?;
                let owner = user.clone().unwrap_or_else(|| state.user());
                // Unpacked aside, then copied: the archive's whole content, or the one path
                // named (a directory's content into dest; a file to dest, or into it). What
                // was copied, and only that, gets the owner and the mode.
                let mut dest = state.resolve(dest);
                if dest.len() > 1 && (dest.ends_with('/') || source.is_none()) {
                    dest = format!("{}/", dest.trim_end_matches('/'));
                }
                Some(self.command(
                    state,
                    sh(
                        COPY_SCRIPT,
                        &[
                            dest,
                            path,
                            owner,
                            source.clone().unwrap_or_default(),
                            mode.clone().unwrap_or_default(),
                        ],
                    ),
                    Some("root".into()),
                    Some("/".into()),
                ))
            }
            BuildStep::Workdir { path } => {
                let dir = state.resolve(path);
                state.apply(step);
                Some(self.command(
                    state,
                    sh("mkdir -p \"$1\"", &[dir]),
                    Some("root".into()),
                    Some("/".into()),
                ))
            }
            BuildStep::User { name } => {
                state.apply(step);
                Some(self.command(
                    state,
                    sh("id -u \"$1\" >/dev/null", std::slice::from_ref(name)),
                    Some("root".into()),
                    Some("/".into()),
                ))
            }
            BuildStep::Env { .. } => {
                state.apply(step);
                None
            }
            BuildStep::Apt { packages } => Some(self.command(
                state,
                sh(
                    "export DEBIAN_FRONTEND=noninteractive; apt-get update -q && \
                     apt-get install -y -q --no-install-recommends \"$@\" && \
                     rm -rf /var/lib/apt/lists/*",
                    packages,
                ),
                Some("root".into()),
                Some("/".into()),
            )),
            BuildStep::Pip { packages } => Some(self.command(
                state,
                sh(
                    "python3 -m pip install --no-cache-dir --break-system-packages \"$@\"",
                    packages,
                ),
                None,
                None,
            )),
            BuildStep::Npm { packages } => Some(self.command(
                state,
                sh("npm install -g \"$@\"", packages),
                Some("root".into()),
                Some("/".into()),
            )),
        };
        let Some(req) = req else { return Ok(()) };
        let code = self.exec(index, req).await?;
        if let Some(s) = self.steps.get_mut(index as usize - 1) {
            s.exit_code = Some(code);
        }
        if code != 0 {
            return Err(Stop::Failed(format!(
                "step {index} ({}) failed with exit code {code}",
                step.summary()
            )));
        }
        Ok(())
    }

    /// Takes a checkpoint of the build sandbox into the step cache under `key`. A failure
    /// costs only the cache entry.
    async fn checkpoint(&mut self, index: u32, key: &str) -> Result<(), Stop> {
        let Some(sandbox) = self.sandbox else {
            return Ok(());
        };
        let made = async {
            // An entry under this key holds the same state; a build told to take nothing
            // from the cache replaces it.
            let team = self.build.team_id;
            let existing = db::cache_lookup(&self.svc.db, team, &[key.to_string()]).await?;
            if let Some(old) = existing.into_iter().next() {
                if !self.no_cache {
                    return Ok(());
                }
                if let Ok(t) = templates::get(&self.svc.db, old.template_id).await {
                    self.svc.remove_template(AuditActor::System, t).await?;
                }
            }
            let sb = self.svc.sandbox_row(&self.caller, sandbox).await?;
            let name = format!("build-cache-{}", &key[..24]);
            let making = self
                .svc
                .making(&self.caller, &sb, name, TemplateKind::Snapshot, true)
                .await?;
            let db = self.svc.db.clone();
            let template = super::detached(async move { make_template(&db, making).await }).await?;
            let stored = db::cache_put(
                &self.svc.db,
                self.build.team_id,
                key,
                template.id,
                template.size_bytes,
            )
            .await;
            if !matches!(stored, Ok(true)) {
                // Another build stored this key first (or the write failed): ours goes.
                let _ = self.svc.remove_template(AuditActor::System, template).await;
            }
            Ok::<_, ApiError>(())
        };
        if let Err(e) = made.await {
            tracing::warn!(build = %self.build.id, error = %e, "step not cached");
            self.info(index, format!("not cached: {}", e.message));
        }
        self.beat().await
    }

    /// Resolves the recipe's image and finds it in the step cache, or has a host import
    /// it (recording it there).
    async fn image_base(&mut self, reference: &str) -> Result<ImageBase, Stop> {
        self.info(0, format!("resolving image {reference}"));
        self.beat().await?;
        let auth = self.registry_auth.clone();
        let (host, config) = self
            .svc
            .resolve_image(self.build.team_id, reference, auth.as_ref())
            .await?;
        self.info(
            0,
            format!(
                "image {} ({} layers, {:.1} MiB)",
                config.pinned,
                config.layers,
                config.size_bytes as f64 / f64::from(1u32 << 20)
            ),
        );
        let key = image_key(&config.digest);
        let team = self.build.team_id;
        let found = db::cache_lookup(&self.svc.db, team, std::slice::from_ref(&key))
            .await
            .map_err(ApiError::from)?;
        if let Some(entry) = found.into_iter().next() {
            match templates::get(&self.svc.db, entry.template_id).await {
                Ok(t) if !self.no_cache => {
                    self.info(0, "image taken from the cache");
                    return Ok(ImageBase {
                        template: t,
                        config,
                    });
                }
                Ok(t) => self.svc.remove_template(AuditActor::System, t).await?,
                Err(e) => tracing::debug!(error = %e, "cache entry without its template"),
            }
        }
        self.info(0, "pulling the image and unpacking its layers");
        self.beat().await?;
        let began = Instant::now();
        let name = format!("build-image-{}", &key[..24]);
        let svc = Arc::clone(&self.svc);
        let caller = self.caller;
        let pinned = config.pinned.clone();
        // Detached: a cancel at the next look leaves no half-recorded template.
        let template = super::detached(async move {
            svc.import_image(&caller, host, &pinned, auth.as_ref(), name)
                .await
        })
        .await?;
        self.info(
            0,
            format!(
                "image unpacked in {:.1} s ({} MiB disk)",
                began.elapsed().as_secs_f64(),
                template.disk_size_mb
            ),
        );
        let stored =
            db::cache_put(&self.svc.db, team, &key, template.id, template.size_bytes).await;
        if !matches!(stored, Ok(true)) {
            // Another build recorded this image first: this one's template is used once.
            tracing::warn!(build = %self.build.id, outcome = ?stored, "image cache entry not recorded");
        }
        self.beat().await?;
        Ok(ImageBase { template, config })
    }

    /// The name of the user with id `uid` in the build sandbox (an image's numeric user).
    async fn user_named(&mut self, state: &RunState, uid: &str) -> Result<String, Stop> {
        if uid == "0" {
            return Ok("root".into());
        }
        let script = format!(
            "while IFS=: read -r name _ id _; do [ \"$id\" = {uid} ] && echo \"$name\" && exit 0; done < /etc/passwd; exit 1"
        );
        let req = self.command(
            state,
            vec!["/bin/sh".into(), "-c".into(), script],
            Some("root".into()),
            Some("/".into()),
        );
        let sandbox = self
            .sandbox
            .ok_or_else(|| Stop::Failed("no build sandbox".into()))?;
        let out = self.svc.exec(&self.caller, sandbox, &req).await?;
        let name = out.stdout.trim().to_string();
        if out.exit_code != 0 || name.is_empty() {
            return Err(Stop::Failed(format!(
                "the image runs as user {uid}, which its /etc/passwd does not name"
            )));
        }
        Ok(name)
    }

    /// Everything but the ending: returns the template made.
    async fn work(&mut self) -> Result<templates::Template, Stop> {
        let mut recipe = self.build.recipe.clone();
        let (base, identity, image) = match recipe.image.clone() {
            Some(reference) => {
                let image = self.image_base(&reference).await?;
                let identity = format!("oci:{}", image.config.digest);
                (image.template.clone(), identity, Some(image))
            }
            None => {
                let base_name = recipe.base.clone().unwrap_or_else(|| DEFAULT_BASE.into());
                let base = templates::get_visible(&self.svc.db, self.build.team_id, &base_name)
                    .await
                    .map_err(ApiError::from)?
                    .ok_or_else(|| {
                        Stop::Failed(format!("base template `{base_name}` not found"))
                    })?;
                let identity = template_identity(&base);
                (base, identity, None)
            }
        };
        let machine = (
            recipe.vcpus.unwrap_or(base.vcpus),
            recipe.memory_mb.unwrap_or(base.memory_mb),
            recipe.disk_size_mb.unwrap_or(0),
        );
        // Where the steps start is part of what they do.
        let identity = format!(
            "{identity}\0{}\0{}",
            recipe.user.as_deref().unwrap_or_default(),
            recipe.workdir.as_deref().unwrap_or_default()
        );
        let keys = cache_keys(&identity, machine, &recipe.steps);

        // The newest cache entry that matches, unless told to take none.
        let mut start_at = 0usize;
        let mut from = base.clone();
        if !self.no_cache {
            let found = db::cache_lookup(&self.svc.db, self.build.team_id, &keys)
                .await
                .map_err(ApiError::from)?;
            for (i, key) in keys.iter().enumerate().rev() {
                let Some(entry) = found.iter().find(|e| &e.key == key) else {
                    continue;
                };
                match templates::get(&self.svc.db, entry.template_id).await {
                    Ok(t) => {
                        start_at = i + 1;
                        from = t;
                        break;
                    }
                    Err(e) => tracing::debug!(error = %e, "cache entry without its template"),
                }
            }
        }
        // Steps that change only what later steps run with are replayed from the recipe,
        // so a cache entry also covers those that follow it.
        if start_at > 0 {
            while recipe
                .steps
                .get(start_at)
                .is_some_and(|s| !s.changes_disk())
            {
                start_at += 1;
            }
        }
        // Steps run with the base's environment (a built team template has one; an image
        // has its configuration's), then the recipe's.
        let mut state = RunState::default();
        if let Some(image) = &image {
            let c = &image.config;
            state.env = c.env.clone().into_iter().collect();
            state.workdir = Some(c.workdir.clone()).filter(|w| w.starts_with('/'));
            // `user[:group]`; a numeric one is named once the sandbox runs.
            let user = c.user.split(':').next().unwrap_or_default();
            state.user = Some(user.to_string()).filter(|u| !u.is_empty() && u != "0");
            let argv: Vec<String> = c.entrypoint.iter().chain(&c.cmd).cloned().collect();
            if recipe.start.is_none()
                && recipe.kind.unwrap_or(TemplateKind::Snapshot) == TemplateKind::Snapshot
                && !argv.is_empty()
            {
                let command = shell_join(&argv);
                recipe.start = Some(nestbox_types::api::StartCommand {
                    command: command.clone(),
                    ready: None,
                    ready_timeout_sec: None,
                });
                self.steps.push(BuildStepState {
                    index: recipe.steps.len() as u32 + 1,
                    summary: format!("START {command} (the image's entrypoint)")
                        .chars()
                        .take(120)
                        .collect(),
                    status: "pending".into(),
                    exit_code: None,
                    duration_ms: None,
                });
            }
        } else if !base.team_id.is_platform() {
            // A built base's environment, user and directory carry on.
            let d = db::template_defaults(&self.svc.db, base.id)
                .await
                .map_err(ApiError::from)?;
            state.env = d.env;
            state.user = d.user;
            state.workdir = d.workdir;
        }
        if let Some(user) = &recipe.user {
            state.user = Some(user.clone());
        }
        if let Some(dir) = &recipe.workdir {
            state.workdir = Some(dir.clone());
        }
        for (i, step) in recipe.steps.iter().take(start_at).enumerate() {
            state.apply(step);
            let index = i as u32 + 1;
            self.set(index, "cached");
            self.info(index, format!("step {index}: {} — cached", step.summary()));
        }
        self.cached = start_at as u32;
        self.beat().await?;

        // The build sandbox.
        let from_base = start_at == 0;
        self.info(
            0,
            if from_base {
                format!("starting a sandbox from `{}`", base.name)
            } else {
                format!("starting a sandbox from the cache after step {start_at}")
            },
        );
        let req = CreateSandboxRequest {
            vcpus: if from_base { recipe.vcpus } else { None },
            memory_mb: if from_base { recipe.memory_mb } else { None },
            disk_size_mb: if from_base { recipe.disk_size_mb } else { None },
            timeout_sec: Some(0),
            lifetime_sec: Some(self.lifetime_sec()),
            metadata: BTreeMap::from([("nestbox.build".to_string(), self.build.id.to_string())]),
            ..Default::default()
        };
        let created = self.svc.create_from(&self.caller, &req, from).await?;
        self.sandbox = Some(created.id);
        self.beat().await?;
        if let Some(uid) = state
            .user
            .clone()
            .filter(|u| u.bytes().all(|b| b.is_ascii_digit()))
        {
            state.user = Some(self.user_named(&state, &uid).await?);
        }
        if let Some(dir) = state.workdir.clone() {
            // A workdir step replayed from the recipe, or the recipe's or image's own: its
            // directory may not be there yet.
            let mkdir = self.command(
                &state,
                vec!["mkdir".into(), "-p".into(), dir],
                Some("root".into()),
                Some("/".into()),
            );
            if self.exec(start_at as u32, mkdir).await? != 0 {
                return Err(Stop::Failed("making the working directory failed".into()));
            }
        }

        for (i, step) in recipe.steps.iter().enumerate().skip(start_at) {
            let index = i as u32 + 1;
            self.set(index, "running");
            self.info(index, format!("step {index}: {}", step.summary()));
            self.beat().await?;
            let began = Instant::now();
            let ran = self.step(index, step, &mut state).await;
            self.settle(index, began, ran)?;
            if step.changes_disk() {
                self.checkpoint(index, &keys[i]).await?;
            }
        }

        let kind = recipe.kind.unwrap_or(TemplateKind::Snapshot);
        if let Some(start) = &recipe.start {
            let index = recipe.steps.len() as u32 + 1;
            self.set(index, "running");
            self.info(index, format!("start: {}", start.command));
            self.beat().await?;
            let began = Instant::now();
            let ran = self.start(index, start, &state).await;
            self.settle(index, began, ran)?;
        }

        self.info(0, format!("saving template `{}` ({kind})", self.build.name));
        self.beat().await?;
        let sandbox = self
            .sandbox
            .ok_or_else(|| Stop::Failed("no build sandbox".into()))?;
        Ok(self.save(sandbox, kind, &state).await?)
    }

    /// Makes the build sandbox a template: a hidden one first, with its environment, then
    /// the build's tags are given to it in one step (`default` makes it the template
    /// `name`; the template it replaces stays, hidden, while sandboxes or other tags hold
    /// it). A failure removes what was made.
    async fn save(
        &self,
        sandbox: SandboxId,
        kind: TemplateKind,
        state: &RunState,
    ) -> ApiResult<templates::Template> {
        let svc = &self.svc;
        let team = self.build.team_id;
        let name = self.build.name.clone();
        let known = templates::get_visible(&svc.db, team, &name)
            .await?
            .is_some_and(|t| t.team_id == team)
            || !tags::list(&svc.db, team, &name).await?.is_empty();
        if !known {
            // A new name takes a place in the team's template quota.
            let one = nestbox_db::quotas::Demand {
                templates: 1,
                ..Default::default()
            };
            nestbox_db::quotas::check(&svc.db, team, &one).await?;
        }
        let sb = svc.sandbox_row(&self.caller, sandbox).await?;
        let mut making = svc
            .making(&self.caller, &sb, String::new(), kind, true)
            .await?;
        making.new.name = tags::hidden_name(&name, making.id);
        let db = svc.db.clone();
        let made = super::detached(async move { make_template(&db, making).await }).await?;
        let tagged = async {
            // Its sandboxes' commands run as the recipe's last user, in its last directory,
            // as a container's do.
            let defaults = db::TemplateDefaults {
                env: state.env.clone(),
                user: state.user.clone(),
                workdir: state.workdir.clone(),
            };
            db::set_template_defaults(&svc.db, made.id, &defaults).await?;
            let left = tags::assign(&svc.db, team, &name, made.id, &self.build.tags).await?;
            Ok::<_, nestbox_db::DbError>((templates::get(&svc.db, made.id).await?, left))
        }
        .await;
        match tagged {
            Ok((t, left)) => {
                // What the new build replaced goes now unless something still holds it.
                for id in left {
                    svc.release_template(id).await;
                }
                Ok(t)
            }
            Err(e) => {
                if let Err(err) = svc.remove_template(AuditActor::System, made).await {
                    tracing::warn!(build = %self.build.id, error = %err, "an untagged build's template is left for the sweep");
                }
                Err(e.into())
            }
        }
    }

    /// Starts the start command and waits for its ready check.
    async fn start(
        &mut self,
        index: u32,
        start: &nestbox_types::api::StartCommand,
        state: &RunState,
    ) -> Result<(), Stop> {
        let sandbox = self
            .sandbox
            .ok_or_else(|| Stop::Failed("no build sandbox".into()))?;
        self.svc
            .start_process(
                &self.caller,
                sandbox,
                &StartProcessRequest {
                    command: Some(start.command.clone()),
                    env: state.env.clone(),
                    cwd: state.workdir.clone(),
                    user: Some(state.user()),
                    tag: Some("start".into()),
                    ..Default::default()
                },
            )
            .await?;
        let Some(ready) = &start.ready else {
            return Ok(());
        };
        let limit = Duration::from_secs(u64::from(
            start
                .ready_timeout_sec
                .unwrap_or(nestbox_types::api::DEFAULT_READY_TIMEOUT_SEC),
        ));
        let began = Instant::now();
        let mut attempts = 0u32;
        loop {
            attempts += 1;
            let mut req = self.command(
                state,
                vec!["/bin/sh".into(), "-c".into(), ready.clone()],
                None,
                None,
            );
            req.timeout_sec = Some(req.timeout_sec.unwrap_or(10).min(10));
            let out = self.svc.exec(&self.caller, sandbox, &req).await?;
            if out.exit_code == 0 {
                self.info(index, format!("ready after {attempts} check(s)"));
                return Ok(());
            }
            if began.elapsed() >= limit {
                let said = [out.stdout, out.stderr].join("").trim().to_string();
                self.info(
                    index,
                    format!("the ready check exited {}: {said}", out.exit_code),
                );
                return Err(Stop::Failed(format!(
                    "the start command was not ready within {} s",
                    limit.as_secs()
                )));
            }
            if self.last_beat.elapsed() >= TICK {
                self.beat().await?;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// Runs the build to its end and records the outcome.
    async fn run(mut self) {
        // The record says the runner lives for as long as this task does (a panic too
        // drops the guard), however long one step's call takes.
        let keepalive = {
            let database = self.svc.db.clone();
            let id = self.build.id;
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(KEEPALIVE).await;
                    if let Err(e) = db::touch(&database, id).await {
                        tracing::warn!(build = %id, error = %e, "touching a running build");
                    }
                }
            })
        };
        let _keepalive = AbortOnDrop(keepalive);
        let mut outcome = self.work().await;
        // A step that fails after a cancel was asked for (the sandbox going away under a
        // running command, say) ends the build as the person asked: cancelled.
        if matches!(outcome, Err(Stop::Failed(_)))
            && db::get(&self.svc.db, self.build.team_id, self.build.id)
                .await
                .ok()
                .flatten()
                .is_some_and(|b| b.cancel)
        {
            outcome = Err(Stop::Cancelled);
        }
        let (status, error, template) = match outcome {
            Ok(t) => (BuildStatus::Ready, None, Some(t.id)),
            Err(Stop::Failed(message)) => (BuildStatus::Failed, Some(message), None),
            Err(Stop::Cancelled) => (BuildStatus::Cancelled, Some("cancelled".to_string()), None),
            Err(Stop::Gone) => (BuildStatus::Failed, None, None),
        };
        for s in &mut self.steps {
            if s.status == "pending" || s.status == "running" {
                s.status = if status == BuildStatus::Cancelled {
                    "cancelled"
                } else {
                    "skipped"
                }
                .into();
            }
        }
        if let Some(sandbox) = self.sandbox.take() {
            self.info(0, "removing the build sandbox");
            if let Err(e) = self
                .svc
                .destroy_sandbox(&Caller::system(self.build.team_id), sandbox)
                .await
            {
                tracing::warn!(build = %self.build.id, sandbox = %sandbox, error = %e, "build sandbox left for the monitor");
            }
        }
        match (&status, &error) {
            (BuildStatus::Ready, _) => {
                self.info(0, format!("template `{}` is ready", self.build.name))
            }
            (_, Some(e)) => self.info(0, e.clone()),
            _ => {}
        }
        if self.log.dropped > 0 {
            // Past the cap: said once, in place of nothing.
            let dropped = self.log.dropped;
            self.log.pending.push(LogLine {
                step: 0,
                stream: "info",
                text: format!("{dropped} more log lines were not kept"),
            });
        }
        self.log.flush(&self.svc.db).await;
        let finished = db::finish(
            &self.svc.db,
            self.build.id,
            status,
            error.as_deref(),
            template,
            &self.steps,
        )
        .await;
        if let Err(e) = &finished {
            tracing::error!(build = %self.build.id, error = %e, "recording the end of a build");
        }
        self.svc
            .audit(AuditEntry {
                actor: AuditActor::Caller(self.caller),
                team: Some(self.build.team_id),
                action: "template.build",
                resource_type: "template_build",
                resource_id: Some(self.build.id.to_string()),
                ok: status == BuildStatus::Ready,
                details: serde_json::json!({
                    "name": self.build.name,
                    "status": status,
                    "error": error,
                    "cached_steps": self.cached,
                }),
            })
            .await;
    }
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn decode(data: &str) -> Vec<u8> {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD
        .decode(data)
        .unwrap_or_default()
}

impl Services {
    /// Accepts a build and starts its runner. The recipe, its base and every archive it
    /// names are checked first: a build that is accepted can only fail in a step.
    pub async fn create_build(
        self: &Arc<Self>,
        caller: &Caller,
        req: &CreateBuildRequest,
    ) -> ApiResult<Build> {
        let (steps, deadline) = self.check_build(caller, req).await?;
        let build = db::create(
            &self.db,
            &db::NewBuild {
                team_id: caller.team,
                name: req.name.clone(),
                recipe: req.recipe.clone(),
                steps: steps.clone(),
                created_by: caller.actor.id_string(),
                deadline,
                tags: build_tags(&req.tags)?,
            },
        )
        .await?;
        Ok(self.launch(caller, build, steps, req))
    }

    /// Announces a build of `name` whose recipe comes later ([`Self::start_announced_build`]):
    /// `waiting`, with the machine it will have. E2B's template SDK works so (it uploads the
    /// files between the two).
    pub async fn announce_build(
        &self,
        caller: &Caller,
        name: &str,
        tags: &[String],
        vcpus: Option<u32>,
        memory_mb: Option<u32>,
    ) -> ApiResult<Build> {
        let probe = CreateBuildRequest {
            name: name.to_string(),
            recipe: nestbox_types::api::Recipe {
                vcpus,
                memory_mb,
                ..Default::default()
            },
            timeout_sec: None,
            no_cache: false,
            registry_auth: None,
            tags: tags.to_vec(),
        };
        // What can be checked without the recipe is checked now.
        if !is_valid_template_name(name) {
            return Err(ApiError::invalid(
                "name must be 1–64 letters, digits, `.`, `_` or `-`, starting with a letter or digit",
            ));
        }
        if caller.team.is_platform() && !caller.actor.is_admin() {
            return Err(ApiError::forbidden(
                "templates of the platform team are every team's; only platform admins may build them",
            ));
        }
        self.validate_machine(&probe.recipe, None)?;
        let build = db::create_waiting(
            &self.db,
            &db::NewBuild {
                team_id: caller.team,
                name: name.to_string(),
                recipe: probe.recipe,
                steps: Vec::new(),
                created_by: caller.actor.id_string(),
                deadline: nestbox_db::now()
                    + chrono::Duration::from_std(WAITING_MAX).unwrap_or_default(),
                tags: build_tags(&probe.tags)?,
            },
        )
        .await?;
        Ok(build_view(&build))
    }

    /// Starts an announced build with its recipe (the machine announced is kept unless
    /// the recipe names one). `409 conflict` if it is not waiting any more.
    pub async fn start_announced_build(
        self: &Arc<Self>,
        caller: &Caller,
        id: BuildId,
        mut req: CreateBuildRequest,
    ) -> ApiResult<Build> {
        let announced = db::get(&self.db, caller.team, id)
            .await?
            .ok_or_else(|| not_found(id))?;
        if announced.status != BuildStatus::Waiting {
            return Err(ApiError::conflict(format!(
                "template build {id} has already started"
            )));
        }
        req.name = announced.name.clone();
        if req.tags.is_empty() {
            req.tags = announced.tags.clone();
        }
        req.recipe.vcpus = req.recipe.vcpus.or(announced.recipe.vcpus);
        req.recipe.memory_mb = req.recipe.memory_mb.or(announced.recipe.memory_mb);
        let checked = self.check_build(caller, &req).await;
        let (steps, deadline) = match checked {
            Ok(c) => c,
            Err(e) => {
                // A recipe refused ends the announcement: nothing will start it any more.
                let _ = db::finish(
                    &self.db,
                    id,
                    BuildStatus::Failed,
                    Some(&e.message),
                    None,
                    &[],
                )
                .await;
                return Err(e);
            }
        };
        let build = db::start_waiting(&self.db, caller.team, id, &req.recipe, &steps, deadline)
            .await?
            .ok_or_else(|| {
                ApiError::conflict(format!("template build {id} has already started"))
            })?;
        Ok(self.launch(caller, build, steps, &req))
    }

    /// Starts the runner of a recorded `building` build.
    fn launch(
        self: &Arc<Self>,
        caller: &Caller,
        build: db::Build,
        steps: Vec<BuildStepState>,
        req: &CreateBuildRequest,
    ) -> Build {
        let view = build_view(&build);
        let runner = Runner {
            svc: Arc::clone(self),
            caller: *caller,
            log: Log {
                build: build.id,
                next_seq: 0,
                pending: Vec::new(),
                partial: [Vec::new(), Vec::new()],
                dropped: 0,
            },
            steps,
            cached: 0,
            sandbox: None,
            build,
            last_beat: Instant::now(),
            no_cache: req.no_cache,
            registry_auth: req.registry_auth.clone(),
        };
        let id = view.id;
        tokio::spawn(crate::request_id::scoped(async move {
            runner.run().await;
        }));
        tracing::info!(build = %id, "template build accepted");
        view
    }

    /// Everything a build is checked for before it is accepted; returns its steps' initial
    /// states and its deadline.
    async fn check_build(
        &self,
        caller: &Caller,
        req: &CreateBuildRequest,
    ) -> ApiResult<(Vec<BuildStepState>, chrono::DateTime<chrono::Utc>)> {
        if !is_valid_template_name(&req.name) {
            return Err(ApiError::invalid(
                "name must be 1–64 letters, digits, `.`, `_` or `-`, starting with a letter or digit",
            ));
        }
        req.recipe.validate().map_err(ApiError::invalid)?;
        let tags = build_tags(&req.tags)?;
        if caller.team.is_platform() && !caller.actor.is_admin() {
            return Err(ApiError::forbidden(
                "templates of the platform team are every team's; only platform admins may build them",
            ));
        }
        let timeout = req
            .timeout_sec
            .unwrap_or(nestbox_types::api::DEFAULT_BUILD_TIMEOUT_SEC);
        if !(1..=nestbox_types::api::MAX_BUILD_TIMEOUT_SEC).contains(&timeout) {
            return Err(ApiError::limit(
                "timeout_sec",
                nestbox_types::api::MAX_BUILD_TIMEOUT_SEC,
                " s",
            ));
        }
        let base_template = match &req.recipe.image {
            Some(image) => {
                super::images::check_reference(image)?;
                None
            }
            None => {
                let base = req.recipe.base.as_deref().unwrap_or(DEFAULT_BASE);
                let Some(t) = templates::get_visible(&self.db, caller.team, base).await? else {
                    return Err(ApiError::new(
                        ErrorCode::TemplateNotFound,
                        format!("base template `{base}` not found"),
                    ));
                };
                Some(t)
            }
        };
        self.validate_machine(&req.recipe, base_template.as_ref())?;
        if db::building_named(&self.db, caller.team, &req.name).await? {
            return Err(ApiError::conflict(format!(
                "a build of `{}` is already running; cancel it or wait for its end",
                req.name
            )));
        }
        // What would refuse the template at the end refuses the build now.
        if let Some(t) = templates::get_visible(&self.db, caller.team, &req.name).await? {
            if t.team_id != caller.team {
                return Err(ApiError::new(
                    ErrorCode::AlreadyExists,
                    format!(
                        "`{}` is the name of a platform template; choose another name",
                        req.name
                    ),
                ));
            }
            if base_template.as_ref().is_some_and(|b| b.id == t.id)
                && tags.iter().any(|t| t == DEFAULT_TAG)
            {
                return Err(ApiError::invalid(format!(
                    "a build cannot replace its own base `{}`: build from another base, or under another name",
                    req.name
                )));
            }
        }
        // The environment its sandboxes will get has the same bounds as a create's.
        let mut env_names: std::collections::BTreeSet<String> = match &base_template {
            Some(b) if !b.team_id.is_platform() => db::template_env(&self.db, b.id)
                .await?
                .into_keys()
                .collect(),
            _ => Default::default(),
        };
        for step in &req.recipe.steps {
            if let BuildStep::Env { vars } = step {
                env_names.extend(vars.keys().cloned());
            }
        }
        if env_names.len() > self.cfg.limits.max_env_vars {
            return Err(ApiError::limit(
                "environment variables",
                self.cfg.limits.max_env_vars,
                "",
            ));
        }
        let mut missing = Vec::new();
        for hash in req.recipe.archives() {
            if db::file_size(&self.db, caller.team, hash).await?.is_none() {
                missing.push(hash.to_string());
            }
        }
        if !missing.is_empty() {
            return Err(ApiError::new(
                ErrorCode::InvalidRequest,
                format!(
                    "upload these archives first (PUT /v1/templates/builds/files/{{hash}}): {}",
                    missing.join(", ")
                ),
            ));
        }
        let mut steps: Vec<BuildStepState> = req
            .recipe
            .steps
            .iter()
            .enumerate()
            .map(|(i, s)| BuildStepState {
                index: i as u32 + 1,
                summary: s.summary(),
                status: "pending".into(),
                exit_code: None,
                duration_ms: None,
            })
            .collect();
        if let Some(start) = &req.recipe.start {
            let mut summary: String = format!("START {}", start.command)
                .chars()
                .take(120)
                .collect();
            if summary.contains('\n') {
                summary = summary.lines().next().unwrap_or_default().to_string();
            }
            steps.push(BuildStepState {
                index: steps.len() as u32 + 1,
                summary,
                status: "pending".into(),
                exit_code: None,
                duration_ms: None,
            });
        }
        let deadline = nestbox_db::now() + chrono::Duration::seconds(i64::from(timeout));
        Ok((steps, deadline))
    }

    /// The recipe's machine is one a sandbox from `base` (an image: any machine) may have
    /// (what a create would refuse later is refused now).
    fn validate_machine(
        &self,
        recipe: &nestbox_types::api::Recipe,
        base: Option<&templates::Template>,
    ) -> ApiResult<()> {
        let limits = &self.cfg.limits;
        if let Some(base) = base
            && base.kind == TemplateKind::Snapshot
            && (recipe.vcpus.is_some_and(|v| v != base.vcpus)
                || recipe.memory_mb.is_some_and(|m| m != base.memory_mb))
        {
            return Err(ApiError::invalid(format!(
                "base `{}` is a snapshot of {} vCPU and {} MiB: its machine is fixed (leave vcpus and memory_mb out)",
                base.name, base.vcpus, base.memory_mb
            )));
        }
        if let Some(v) = recipe.vcpus {
            if v == 0 {
                return Err(ApiError::invalid("vcpus must be at least 1"));
            }
            if v > limits.max_vcpus {
                return Err(ApiError::limit("vcpus", limits.max_vcpus, ""));
            }
        }
        if let Some(m) = recipe.memory_mb {
            if m < limits.min_memory_mb {
                return Err(ApiError::invalid(format!(
                    "memory_mb must be at least {}",
                    limits.min_memory_mb
                )));
            }
            if m > limits.max_memory_mb {
                return Err(ApiError::limit("memory_mb", limits.max_memory_mb, " MiB"));
            }
        }
        if let Some(d) = recipe.disk_size_mb {
            if d == 0 {
                return Err(ApiError::invalid("disk_size_mb must be at least 1"));
            }
            if let Some(base) = base
                && d < base.disk_size_mb.max(1)
            {
                return Err(ApiError::invalid(format!(
                    "disk_size_mb must be at least {} for base `{}`",
                    base.disk_size_mb.max(1),
                    base.name
                )));
            }
            if d > limits.max_disk_mb {
                return Err(ApiError::limit("disk_size_mb", limits.max_disk_mb, " MiB"));
            }
        }
        Ok(())
    }

    /// The team's build.
    pub async fn get_build(&self, caller: &Caller, id: BuildId) -> ApiResult<Build> {
        db::get(&self.db, caller.team, id)
            .await?
            .map(|b| build_view(&b))
            .ok_or_else(|| not_found(id))
    }

    /// The team's builds, newest first.
    pub async fn list_builds(&self, caller: &Caller) -> ApiResult<Vec<Build>> {
        Ok(db::list(&self.db, caller.team, LIST_LIMIT)
            .await?
            .iter()
            .map(build_view)
            .collect())
    }

    /// A page of the build's log.
    pub async fn build_logs(
        &self,
        caller: &Caller,
        id: BuildId,
        q: &BuildLogsQuery,
    ) -> ApiResult<BuildLogs> {
        let build = db::get(&self.db, caller.team, id)
            .await?
            .ok_or_else(|| not_found(id))?;
        if i64::try_from(q.offset).is_err() {
            return Err(ApiError::invalid("offset is past any log"));
        }
        let limit = q.limit.unwrap_or(1000);
        if !(1..=1000).contains(&limit) {
            return Err(ApiError::invalid("limit must be 1–1000"));
        }
        let lines = db::logs(&self.db, id, q.offset, limit).await?;
        let next = lines.last().map(|l| l.seq + 1).unwrap_or(q.offset);
        let done = build.status.is_final() && (lines.len() as u32) < limit;
        Ok(BuildLogs {
            items: lines
                .into_iter()
                .map(|l| BuildLogEntry {
                    seq: l.seq,
                    step: l.step,
                    stream: l.stream,
                    text: l.text,
                    at: l.at,
                })
                .collect(),
            next,
            done,
        })
    }

    /// Asks the team's build to stop; it ends `cancelled` within a second or so. A build
    /// that has ended is `conflict`.
    pub async fn cancel_build(&self, caller: &Caller, id: BuildId) -> ApiResult<Build> {
        match db::request_cancel(&self.db, caller.team, id).await {
            Ok(true) => {}
            // A build announced but not started has no runner: it ends here.
            Ok(false)
                if db::get(&self.db, caller.team, id)
                    .await?
                    .is_some_and(|b| b.status == BuildStatus::Waiting)
                    && db::finish(&self.db, id, BuildStatus::Cancelled, None, None, &[])
                        .await?
                        .is_some() => {}
            Ok(false) => {
                return Err(ApiError::conflict(format!(
                    "template build {id} has already ended"
                )));
            }
            Err(e) if e.is_not_found() => return Err(not_found(id)),
            Err(e) => return Err(e.into()),
        }
        self.audit(AuditEntry {
            actor: AuditActor::Caller(*caller),
            team: Some(caller.team),
            action: "template.build_cancel",
            resource_type: "template_build",
            resource_id: Some(id.to_string()),
            ok: true,
            details: serde_json::json!({}),
        })
        .await;
        self.get_build(caller, id).await
    }

    /// Stores an archive for the team's copy steps (the request body, read up to the
    /// archive limit), checking it is what its name says.
    pub async fn put_build_file<S, E>(
        &self,
        caller: &Caller,
        hash: &str,
        body: S,
    ) -> ApiResult<BuildFile>
    where
        S: futures::Stream<Item = Result<Bytes, E>> + Send,
        E: std::fmt::Display,
    {
        self.store_build_file(caller, hash, body, true).await
    }

    /// Stores an archive under a key its client computed from the files it holds (E2B's
    /// template SDK names uploads so; the server cannot recompute it, and the key only
    /// ever names the team's own uploads).
    pub async fn put_keyed_build_file<S, E>(
        &self,
        caller: &Caller,
        key: &str,
        body: S,
    ) -> ApiResult<BuildFile>
    where
        S: futures::Stream<Item = Result<Bytes, E>> + Send,
        E: std::fmt::Display,
    {
        self.store_build_file(caller, key, body, false).await
    }

    async fn store_build_file<S, E>(
        &self,
        caller: &Caller,
        hash: &str,
        body: S,
        check: bool,
    ) -> ApiResult<BuildFile>
    where
        S: futures::Stream<Item = Result<Bytes, E>> + Send,
        E: std::fmt::Display,
    {
        if !is_sha256_hex(hash) {
            return Err(ApiError::invalid(
                "hash must be a SHA-256 in lower-case hex",
            ));
        }
        let max = self.cfg.builds.max_archive_bytes;
        let mut body = std::pin::pin!(body);
        let mut data = Vec::new();
        let mut digest = Sha256::new();
        while let Some(chunk) = body.next().await {
            let chunk =
                chunk.map_err(|e| ApiError::invalid(format!("reading the upload failed: {e}")))?;
            if (data.len() + chunk.len()) as u64 > max {
                return Err(ApiError::new(
                    ErrorCode::PayloadTooLarge,
                    format!("archives are limited to {max} bytes"),
                ));
            }
            digest.update(&chunk);
            data.extend_from_slice(&chunk);
        }
        let actual = hex::encode(digest.finalize());
        if check && actual != hash {
            return Err(ApiError::invalid(format!(
                "the archive's SHA-256 is {actual}, not the {hash} it was sent as"
            )));
        }
        let size = data.len() as u64;
        let held = db::files_size(&self.db, caller.team).await?;
        let cap = self.cfg.builds.max_archives_bytes;
        if db::file_size(&self.db, caller.team, hash).await?.is_none() && held + size > cap {
            return Err(ApiError::new(
                ErrorCode::LimitExceeded,
                format!(
                    "the team's archives take {held} bytes, and at most {cap} are kept; \
                     archives unused for a while are dropped"
                ),
            ));
        }
        db::put_file(&self.db, caller.team, hash, data).await?;
        Ok(BuildFile {
            hash: hash.to_string(),
            size,
        })
    }

    /// Whether the team has uploaded an archive.
    pub async fn get_build_file(&self, caller: &Caller, hash: &str) -> ApiResult<BuildFile> {
        if !is_sha256_hex(hash) {
            return Err(ApiError::invalid(
                "hash must be a SHA-256 in lower-case hex",
            ));
        }
        match db::file_size(&self.db, caller.team, hash).await? {
            Some(size) => Ok(BuildFile {
                hash: hash.to_string(),
                size,
            }),
            None => Err(ApiError::new(
                ErrorCode::NotFound,
                format!("archive {hash} has not been uploaded"),
            )),
        }
    }

    /// The monitor's part: fails builds whose runner stopped (destroying their sandboxes),
    /// and prunes the step cache and old archives.
    pub async fn sweep_builds(&self) {
        self.sweep_builds_at(nestbox_db::now()).await;
    }

    /// [`Services::sweep_builds`] as of `now`.
    pub async fn sweep_builds_at(&self, now: chrono::DateTime<chrono::Utc>) {
        let limits = &self.cfg.builds;
        let before = now - chrono::Duration::from_std(limits.stale_after).unwrap_or_default();
        let waiting_before = now - chrono::Duration::from_std(WAITING_MAX).unwrap_or_default();
        match db::stale(&self.db, before, waiting_before).await {
            Ok(stale) => {
                for b in stale {
                    let message = if b.status == BuildStatus::Waiting {
                        "the build was announced but never started"
                    } else {
                        "the build's runner stopped (its control plane restarted)"
                    };
                    if let Ok(Some(_)) = db::finish(
                        &self.db,
                        b.id,
                        BuildStatus::Failed,
                        Some(message),
                        None,
                        &b.steps,
                    )
                    .await
                        && let Some(sandbox) = b.sandbox_id
                        && let Err(e) = self
                            .destroy_sandbox(&Caller::system(b.team_id), sandbox)
                            .await
                    {
                        tracing::warn!(build = %b.id, error = %e, "destroying a stopped build's sandbox");
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "listing stopped builds"),
        }
        let old = now - chrono::Duration::from_std(limits.cache_max_age).unwrap_or_default();
        match db::cache_to_prune(&self.db, old, limits.cache_max_bytes).await {
            Ok(entries) => {
                for e in entries {
                    if let Ok(t) = templates::get(&self.db, e.template_id).await
                        && let Err(err) = self.remove_template(AuditActor::System, t).await
                    {
                        tracing::debug!(template = %e.template_id, error = %err, "cache entry kept for now");
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "listing the step cache"),
        }
        if let Err(e) = db::prune_files(&self.db, old).await {
            tracing::warn!(error = %e, "pruning build archives");
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn base() -> templates::Template {
        templates::Template {
            id: nestbox_types::TemplateId::new(),
            team_id: nestbox_types::PLATFORM_TEAM,
            name: "minimal".into(),
            kind: TemplateKind::Image,
            vcpus: 1,
            memory_mb: 512,
            disk_size_mb: 1024,
            size_bytes: 0,
            host_id: None,
            created_by: None,
            created_at: chrono::Utc::now(),
            updated_at: chrono::Utc::now(),
            source_sandbox_id: None,
            ephemeral: false,
        }
    }

    fn run(c: &str) -> BuildStep {
        BuildStep::Run {
            command: c.into(),
            user: None,
            cwd: None,
        }
    }

    #[test]
    fn a_changed_step_keeps_the_keys_before_it() {
        let b = template_identity(&base());
        let one = cache_keys(&b, (1, 512, 0), &[run("a"), run("b"), run("c")]);
        let two = cache_keys(&b, (1, 512, 0), &[run("a"), run("b"), run("C")]);
        assert_eq!(one[..2], two[..2]);
        assert_ne!(one[2], two[2]);
        // Everything before a step is in its key: the same step after another is another key.
        let three = cache_keys(&b, (1, 512, 0), &[run("x"), run("b")]);
        assert_ne!(one[1], three[1]);
        // Another base, another machine: no key in common.
        let other = template_identity(&base());
        assert_ne!(cache_keys(&other, (1, 512, 0), &[run("a")])[0], one[0]);
        assert_ne!(cache_keys(&b, (2, 512, 0), &[run("a")])[0], one[0]);
        // An image is its digest.
        let image = |d: &str| cache_keys(&format!("oci:sha256:{d}"), (1, 512, 0), &[run("a")]);
        assert_eq!(image("aa"), image("aa"));
        assert_ne!(image("aa"), image("bb"));
        assert_ne!(image_key("sha256:aa"), image_key("sha256:bb"));
    }

    #[test]
    fn entrypoints_become_one_shell_line() {
        let argv = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            shell_join(&argv(&["/bin/sh", "-c", "echo it's $HOME"])),
            r#"/bin/sh -c 'echo it'\''s $HOME'"#
        );
        assert_eq!(
            shell_join(&argv(&["python3", "-m", "http.server", "8000"])),
            "python3 -m http.server 8000"
        );
        assert_eq!(shell_join(&argv(&["run", ""])), "run ''");
    }

    #[test]
    fn state_follows_env_workdir_and_user() {
        let mut s = RunState::default();
        s.apply(&BuildStep::Workdir { path: "app".into() });
        assert_eq!(s.workdir.as_deref(), Some("/app"));
        s.apply(&BuildStep::Workdir { path: "sub".into() });
        assert_eq!(s.workdir.as_deref(), Some("/app/sub"));
        s.apply(&BuildStep::Workdir {
            path: "/srv".into(),
        });
        assert_eq!(s.resolve("x"), "/srv/x");
        s.apply(&BuildStep::Env {
            vars: BTreeMap::from([("A".into(), "1".into())]),
        });
        s.apply(&BuildStep::User {
            name: "user".into(),
        });
        assert_eq!(s.env.get("A").map(String::as_str), Some("1"));
        assert_eq!(s.user(), "user");
        s.apply(&run("true"));
        assert_eq!(s.user(), "user");
    }

    #[test]
    fn output_is_logged_line_by_line() {
        let mut log = Log {
            build: BuildId::new(),
            next_seq: 0,
            pending: Vec::new(),
            partial: [Vec::new(), Vec::new()],
            dropped: 0,
        };
        log.output(1, 0, b"one\ntw");
        log.output(1, 1, b"err\n");
        log.output(1, 0, b"o\r\nthree");
        log.end_step(1);
        let lines: Vec<_> = log
            .pending
            .iter()
            .map(|l| (l.stream, l.text.as_str()))
            .collect();
        assert_eq!(
            lines,
            [
                ("stdout", "one"),
                ("stderr", "err"),
                ("stdout", "two"),
                ("stdout", "three")
            ]
        );
        log.output(2, 0, &vec![b'x'; MAX_LINE + 10]);
        assert_eq!(log.pending.last().unwrap().text.len(), MAX_LINE);
    }
}
