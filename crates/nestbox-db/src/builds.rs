//! Template builds: `template_builds` (one row per build: its recipe, its steps' outcomes
//! as JSON, its status), `template_build_logs` (its log, line by line), the archives its
//! copy steps unpack (`template_build_files`), the step cache (`template_build_cache`) and
//! the environment a built template gives its sandboxes (`template_env`).
//!
//! Invariants:
//! - a build ends once: [`finish`] changes only a `building` row, so a cancel, a time-out
//!   and the runner's own ending can race and exactly one of them wins;
//! - one runner writes a build's log, numbering its lines itself from 0 ([`append_logs`]);
//! - archives and cache entries belong to a team: another team cannot learn that a hash
//!   exists;
//! - a cache entry holds a hidden (`ephemeral`) template; deleting the template deletes the
//!   entry (foreign key), and the fork-template sweep leaves such templates alone.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use nestbox_types::api::{BuildStepState, Recipe};
use nestbox_types::{BuildId, BuildStatus, SandboxId, TeamId, TemplateId};

use crate::engine::{Db, DbRow, args, now};
use crate::error::{DbError, missing_as_not_found};

/// A build as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct Build {
    pub id: BuildId,
    pub team_id: TeamId,
    pub name: String,
    pub status: BuildStatus,
    pub recipe: Recipe,
    pub steps: Vec<BuildStepState>,
    pub error: Option<String>,
    pub template_id: Option<TemplateId>,
    /// The sandbox the build runs in, while it runs.
    pub sandbox_id: Option<SandboxId>,
    pub cached_steps: u32,
    /// A cancel was asked for; the runner ends the build at its next look.
    pub cancel: bool,
    pub created_by: String,
    pub created_at: DateTime<Utc>,
    /// Last sign of life from its runner.
    pub updated_at: DateTime<Utc>,
    /// When its time limit passes.
    pub deadline: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    /// The tags its template gets (`default`: it becomes the template called `name`).
    pub tags: Vec<String>,
}

/// What [`create`] writes.
#[derive(Debug, Clone)]
pub struct NewBuild {
    pub team_id: TeamId,
    pub name: String,
    pub recipe: Recipe,
    pub steps: Vec<BuildStepState>,
    pub created_by: String,
    pub deadline: DateTime<Utc>,
    /// The tags its template gets; never empty (`default` when none was asked for).
    pub tags: Vec<String>,
}

/// A line for [`append_logs`].
#[derive(Debug, Clone, PartialEq)]
pub struct LogLine {
    pub step: u32,
    pub stream: &'static str,
    pub text: String,
}

/// A stored log line.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredLogLine {
    pub seq: u64,
    pub step: u32,
    pub stream: String,
    pub text: String,
    pub at: DateTime<Utc>,
}

const COLUMNS: &str = "id, team_id, name, status, recipe, steps, error, template_id, sandbox_id, \
                       cached_steps, cancel, created_by, created_at, updated_at, deadline, \
                       finished_at, tags";

fn json_field<T: serde::de::DeserializeOwned>(
    r: &dyn DbRow,
    col: &'static str,
) -> Result<T, DbError> {
    serde_json::from_value(r.json(col)?).map_err(|e| DbError::corrupt(col, e.to_string()))
}

fn to_json<T: serde::Serialize>(v: &T) -> serde_json::Value {
    // Serialising our own plain data types cannot fail.
    serde_json::to_value(v).unwrap_or(serde_json::Value::Null)
}

fn from_row(r: &dyn DbRow) -> Result<Build, DbError> {
    Ok(Build {
        id: r.id("id")?,
        team_id: r.id("team_id")?,
        name: r.string("name")?,
        status: r.parse("status")?,
        recipe: json_field(r, "recipe")?,
        steps: json_field(r, "steps")?,
        error: r.string_opt("error")?,
        template_id: r.id_opt("template_id")?,
        sandbox_id: r.id_opt("sandbox_id")?,
        cached_steps: r.u32("cached_steps")?,
        cancel: r.bool("cancel")?,
        created_by: r.string("created_by")?,
        created_at: r.time("created_at")?,
        updated_at: r.time("updated_at")?,
        deadline: r.time("deadline")?,
        finished_at: r.time_opt("finished_at")?,
        tags: json_field(r, "tags")?,
    })
}

/// Records a new build, `building`. [`DbError::NotFound`] if the team does not exist.
pub async fn create(db: &Db, new: &NewBuild) -> Result<Build, DbError> {
    insert(db, new, BuildStatus::Building).await
}

/// Records a build announced without its recipe yet, `waiting` (see [`start_waiting`]).
pub async fn create_waiting(db: &Db, new: &NewBuild) -> Result<Build, DbError> {
    insert(db, new, BuildStatus::Waiting).await
}

async fn insert(db: &Db, new: &NewBuild, status: BuildStatus) -> Result<Build, DbError> {
    let at = now();
    db.fetch_one(
        &format!(
            "INSERT INTO template_builds (id, team_id, name, status, recipe, steps, \
                                          cached_steps, cancel, created_by, created_at, \
                                          updated_at, deadline, tags) \
             VALUES ($1, $2, $3, $4, $5, $6, 0, $7, $8, $9, $9, $10, $11) RETURNING {COLUMNS}"
        ),
        args![
            BuildId::new(),
            new.team_id,
            &new.name,
            status,
            to_json(&new.recipe),
            to_json(&new.steps),
            false,
            &new.created_by,
            at,
            new.deadline,
            to_json(&new.tags),
        ],
        from_row,
    )
    .await
    .map_err(|e| missing_as_not_found(e, "team", new.team_id))
}

/// Starts a `waiting` build with its recipe: it is `building` from then on. `None` if it
/// is not waiting (started already, or ended).
pub async fn start_waiting(
    db: &Db,
    team: TeamId,
    id: BuildId,
    recipe: &Recipe,
    steps: &[BuildStepState],
    deadline: DateTime<Utc>,
) -> Result<Option<Build>, DbError> {
    db.fetch_optional(
        &format!(
            "UPDATE template_builds SET status = $3, recipe = $4, steps = $5, deadline = $6, \
                    updated_at = $7 \
             WHERE id = $1 AND team_id = $2 AND status = $8 RETURNING {COLUMNS}"
        ),
        args![
            id,
            team,
            BuildStatus::Building,
            to_json(recipe),
            to_json(&steps),
            deadline,
            now(),
            BuildStatus::Waiting
        ],
        from_row,
    )
    .await
}

/// The team's build.
pub async fn get(db: &Db, team: TeamId, id: BuildId) -> Result<Option<Build>, DbError> {
    db.fetch_optional(
        &format!("SELECT {COLUMNS} FROM template_builds WHERE id = $1 AND team_id = $2"),
        args![id, team],
        from_row,
    )
    .await
}

/// The team's builds, newest first, at most `limit`.
pub async fn list(db: &Db, team: TeamId, limit: u32) -> Result<Vec<Build>, DbError> {
    db.fetch_all(
        &format!(
            "SELECT {COLUMNS} FROM template_builds WHERE team_id = $1 \
             ORDER BY created_at DESC, id LIMIT $2"
        ),
        args![team, limit],
        from_row,
    )
    .await
}

/// Records the runner's progress (and that it is alive). Returns whether a cancel was
/// asked for; `None` if the build has ended meanwhile.
pub async fn progress(
    db: &Db,
    id: BuildId,
    steps: &[BuildStepState],
    cached_steps: u32,
    sandbox: Option<SandboxId>,
) -> Result<Option<bool>, DbError> {
    db.fetch_optional(
        "UPDATE template_builds SET steps = $2, cached_steps = $3, sandbox_id = $4, \
                updated_at = $5 \
         WHERE id = $1 AND status = $6 RETURNING cancel",
        args![
            id,
            to_json(&steps),
            cached_steps,
            sandbox,
            now(),
            BuildStatus::Building
        ],
        |r| r.bool("cancel"),
    )
    .await
}

/// Marks a running build's runner as alive (its keep-alive, independent of the steps).
pub async fn touch(db: &Db, id: BuildId) -> Result<(), DbError> {
    db.execute(
        "UPDATE template_builds SET updated_at = $2 WHERE id = $1 AND status = $3",
        args![id, now(), BuildStatus::Building],
    )
    .await?;
    Ok(())
}

/// The build that made template `id`, if a build did.
pub async fn made(db: &Db, id: TemplateId) -> Result<Option<BuildId>, DbError> {
    db.fetch_optional(
        "SELECT id FROM template_builds WHERE template_id = $1 ORDER BY created_at DESC LIMIT 1",
        args![id],
        |r| r.id("id"),
    )
    .await
}

/// Whether the team has another build of `name` running.
pub async fn building_named(db: &Db, team: TeamId, name: &str) -> Result<bool, DbError> {
    Ok(db
        .fetch_optional(
            "SELECT id FROM template_builds WHERE team_id = $1 AND name = $2 AND status = $3 \
             LIMIT 1",
            args![team, name, BuildStatus::Building],
            |r| r.uuid("id"),
        )
        .await?
        .is_some())
}

/// Bytes of archives the team holds.
pub async fn files_size(db: &Db, team: TeamId) -> Result<u64, DbError> {
    db.fetch_one(
        "SELECT CAST(COALESCE(SUM(size), 0) AS BIGINT) AS total FROM template_build_files \
         WHERE team_id = $1",
        args![team],
        |r| r.u64("total"),
    )
    .await
}

/// Asks the team's running build to stop. `Ok(false)` if it has already ended;
/// [`DbError::NotFound`] if there is no such build.
pub async fn request_cancel(db: &Db, team: TeamId, id: BuildId) -> Result<bool, DbError> {
    let changed = db
        .execute(
            "UPDATE template_builds SET cancel = $3 \
             WHERE id = $1 AND team_id = $2 AND status = $4",
            args![id, team, true, BuildStatus::Building],
        )
        .await?;
    if changed == 1 {
        return Ok(true);
    }
    match get(db, team, id).await? {
        Some(_) => Ok(false),
        None => Err(DbError::NotFound {
            entity: "template build",
            id: id.to_string(),
        }),
    }
}

/// Ends a `building` (or `waiting`) build. Returns the stored row, or `None` if it had
/// already ended.
pub async fn finish(
    db: &Db,
    id: BuildId,
    status: BuildStatus,
    error: Option<&str>,
    template: Option<TemplateId>,
    steps: &[BuildStepState],
) -> Result<Option<Build>, DbError> {
    let at = now();
    db.fetch_optional(
        &format!(
            "UPDATE template_builds SET status = $2, error = $3, template_id = $4, steps = $5, \
                    sandbox_id = NULL, updated_at = $6, finished_at = $6 \
             WHERE id = $1 AND status IN ($7, $8) RETURNING {COLUMNS}"
        ),
        args![
            id,
            status,
            error,
            template,
            to_json(&steps),
            at,
            BuildStatus::Building,
            BuildStatus::Waiting
        ],
        from_row,
    )
    .await
}

/// Builds still `building` whose runner has not been heard of since `before`, and builds
/// still `waiting` since `waiting_before`.
pub async fn stale(
    db: &Db,
    before: DateTime<Utc>,
    waiting_before: DateTime<Utc>,
) -> Result<Vec<Build>, DbError> {
    db.fetch_all(
        &format!(
            "SELECT {COLUMNS} FROM template_builds \
             WHERE (status = $1 AND updated_at < $2) OR (status = $3 AND updated_at < $4)"
        ),
        args![
            BuildStatus::Building,
            before,
            BuildStatus::Waiting,
            waiting_before
        ],
        from_row,
    )
    .await
}

/// Appends lines numbered from `first_seq`.
pub async fn append_logs(
    db: &Db,
    id: BuildId,
    first_seq: u64,
    lines: &[LogLine],
) -> Result<(), DbError> {
    if lines.is_empty() {
        return Ok(());
    }
    let at = now();
    let mut tx = db.begin().await?;
    for (i, line) in lines.iter().enumerate() {
        tx.conn()
            .execute(
                "INSERT INTO template_build_logs (build_id, seq, step, stream, text, at) \
                 VALUES ($1, $2, $3, $4, $5, $6)",
                args![
                    id,
                    first_seq + i as u64,
                    line.step,
                    line.stream,
                    &line.text,
                    at
                ],
            )
            .await?;
    }
    tx.commit().await
}

/// Up to `limit` lines from `offset` on.
pub async fn logs(
    db: &Db,
    id: BuildId,
    offset: u64,
    limit: u32,
) -> Result<Vec<StoredLogLine>, DbError> {
    db.fetch_all(
        "SELECT seq, step, stream, text, at FROM template_build_logs \
         WHERE build_id = $1 AND seq >= $2 ORDER BY seq LIMIT $3",
        args![id, offset, limit],
        |r| {
            Ok(StoredLogLine {
                seq: r.u64("seq")?,
                step: r.u32("step")?,
                stream: r.string("stream")?,
                text: r.string("text")?,
                at: r.time("at")?,
            })
        },
    )
    .await
}

// ------------------------------------------------------------------------ archives

/// Stores an archive for the team (a second upload of the same bytes changes nothing).
pub async fn put_file(db: &Db, team: TeamId, hash: &str, data: Vec<u8>) -> Result<(), DbError> {
    let at = now();
    let size = data.len() as u64;
    db.execute(
        "INSERT INTO template_build_files (team_id, hash, size, data, created_at, used_at) \
         VALUES ($1, $2, $3, $4, $5, $5) ON CONFLICT (team_id, hash) DO NOTHING",
        args![team, hash, size, data, at],
    )
    .await
    .map_err(|e| missing_as_not_found(e, "team", team))?;
    Ok(())
}

/// The size of the team's archive, if it has it.
pub async fn file_size(db: &Db, team: TeamId, hash: &str) -> Result<Option<u64>, DbError> {
    db.fetch_optional(
        "SELECT size FROM template_build_files WHERE team_id = $1 AND hash = $2",
        args![team, hash],
        |r| r.u64("size"),
    )
    .await
}

/// The team's archive, marked as used now.
pub async fn file_data(db: &Db, team: TeamId, hash: &str) -> Result<Option<Vec<u8>>, DbError> {
    db.execute(
        "UPDATE template_build_files SET used_at = $3 WHERE team_id = $1 AND hash = $2",
        args![team, hash, now()],
    )
    .await?;
    db.fetch_optional(
        "SELECT data FROM template_build_files WHERE team_id = $1 AND hash = $2",
        args![team, hash],
        |r| r.bytes("data"),
    )
    .await
}

/// Deletes archives no build has used since `before`. Returns how many went.
pub async fn prune_files(db: &Db, before: DateTime<Utc>) -> Result<u64, DbError> {
    db.execute(
        "DELETE FROM template_build_files WHERE used_at < $1",
        args![before],
    )
    .await
}

// ---------------------------------------------------------------------- step cache

/// A step-cache entry.
#[derive(Debug, Clone, PartialEq)]
pub struct CacheEntry {
    pub team_id: TeamId,
    pub key: String,
    pub template_id: TemplateId,
    pub size_bytes: u64,
    pub used_at: DateTime<Utc>,
}

fn cache_row(r: &dyn DbRow) -> Result<CacheEntry, DbError> {
    Ok(CacheEntry {
        team_id: r.id("team_id")?,
        key: r.string("key")?,
        template_id: r.id("template_id")?,
        size_bytes: r.u64("size_bytes")?,
        used_at: r.time("used_at")?,
    })
}

/// The team's cache entries under any of `keys`, marked as used now.
pub async fn cache_lookup(
    db: &Db,
    team: TeamId,
    keys: &[String],
) -> Result<Vec<CacheEntry>, DbError> {
    if keys.is_empty() {
        return Ok(Vec::new());
    }
    let mut sql = crate::page::Sql::new(
        "SELECT team_id, key, template_id, size_bytes, used_at FROM template_build_cache \
         WHERE team_id = ",
    );
    sql.bind(team).push(" AND key IN ").bind_list(keys.to_vec());
    let found = db.fetch_all(&sql.text, sql.args, cache_row).await?;
    let at = now();
    for e in &found {
        db.execute(
            "UPDATE template_build_cache SET used_at = $3 WHERE team_id = $1 AND key = $2",
            args![team, &e.key, at],
        )
        .await?;
    }
    Ok(found)
}

/// Whether `template` is a step-cache entry's (kept until the cache is pruned).
pub async fn is_cached(db: &Db, template: TemplateId) -> Result<bool, DbError> {
    let found = db
        .fetch_optional(
            "SELECT team_id, key, template_id, size_bytes, used_at FROM template_build_cache \
             WHERE template_id = $1",
            args![template],
            cache_row,
        )
        .await?;
    Ok(found.is_some())
}

/// Records a cache entry (a key already there keeps its first template).
pub async fn cache_put(
    db: &Db,
    team: TeamId,
    key: &str,
    template: TemplateId,
    size_bytes: u64,
) -> Result<bool, DbError> {
    let at = now();
    let n = db
        .execute(
            "INSERT INTO template_build_cache (team_id, key, template_id, size_bytes, \
                                               created_at, used_at) \
             VALUES ($1, $2, $3, $4, $5, $5) ON CONFLICT (team_id, key) DO NOTHING",
            args![team, key, template, size_bytes, at],
        )
        .await?;
    Ok(n == 1)
}

/// Entries to drop: every entry unused since `before`, then, per team, the least recently
/// used ones beyond `max_bytes`.
pub async fn cache_to_prune(
    db: &Db,
    before: DateTime<Utc>,
    max_bytes: u64,
) -> Result<Vec<CacheEntry>, DbError> {
    let all = db
        .fetch_all(
            "SELECT team_id, key, template_id, size_bytes, used_at FROM template_build_cache \
             ORDER BY team_id, used_at DESC, key",
            args![],
            cache_row,
        )
        .await?;
    let mut out = Vec::new();
    let mut team_total: BTreeMap<TeamId, u64> = BTreeMap::new();
    for e in all {
        let total = team_total.entry(e.team_id).or_default();
        *total = total.saturating_add(e.size_bytes);
        if e.used_at < before || *total > max_bytes {
            out.push(e);
        }
    }
    Ok(out)
}

// ------------------------------------------------------------ built templates' env

/// What a built template gives its sandboxes.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TemplateDefaults {
    /// The environment of every process (under a create's own).
    pub env: BTreeMap<String, String>,
    /// The user commands run as when they name none (`None`: root).
    pub user: Option<String>,
    /// The directory they run in when they name none (`None`: the user's home).
    pub workdir: Option<String>,
}

/// Records what a built template gives its sandboxes.
pub async fn set_template_defaults(
    db: &Db,
    template: TemplateId,
    d: &TemplateDefaults,
) -> Result<(), DbError> {
    db.execute(
        "INSERT INTO template_env (template_id, env, default_user, default_workdir) \
         VALUES ($1, $2, $3, $4) \
         ON CONFLICT (template_id) DO UPDATE SET env = excluded.env, \
            default_user = excluded.default_user, default_workdir = excluded.default_workdir",
        args![template, to_json(&d.env), d.user.clone(), d.workdir.clone()],
    )
    .await
    .map_err(|e| missing_as_not_found(e, "template", template))?;
    Ok(())
}

/// What a template gives its sandboxes (nothing for most).
pub async fn template_defaults(db: &Db, template: TemplateId) -> Result<TemplateDefaults, DbError> {
    Ok(db
        .fetch_optional(
            "SELECT env, default_user, default_workdir FROM template_env WHERE template_id = $1",
            args![template],
            |r| {
                Ok(TemplateDefaults {
                    env: json_field(r, "env")?,
                    user: r.string_opt("default_user")?,
                    workdir: r.string_opt("default_workdir")?,
                })
            },
        )
        .await?
        .unwrap_or_default())
}

/// The environment a template gives its sandboxes (empty for most).
pub async fn template_env(
    db: &Db,
    template: TemplateId,
) -> Result<BTreeMap<String, String>, DbError> {
    Ok(template_defaults(db, template).await?.env)
}
