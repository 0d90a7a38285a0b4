//! `sandboxes` and `sandbox_metadata`: what should exist, per team.
//!
//! The database is the truth for what *should* exist; the host agent's memory is the truth for
//! what runs. This module only records; the control plane's service layer decides which
//! transitions are legal (see the state diagram in `nestbox_types::status`).
//!
//! Invariants:
//! - status changes are compare-and-set ([`transition`]): a writer names the statuses it
//!   expects to leave, so two concurrent writers cannot both win;
//! - [`set_running`] never resurrects a terminal (`stopped`/`error`) sandbox;
//! - reads for a team ([`get_for_team`], [`list_for_team`]) never return another team's rows:
//!   another team's sandbox is "not found";
//! - metadata is one row per key (`sandbox_metadata`), written with the sandbox in one
//!   transaction and deleted with it.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use nestbox_types::egress::EgressRules;
use nestbox_types::{Expiry, HostId, SandboxId, SandboxStatus, TeamId, TemplateId};

use crate::engine::{Arg, Conn, Db, DbRow, args, now};
use crate::error::{DbError, missing_as_not_found};
use crate::page::{Page, Paged, Sql, finish_page};

/// A sandbox record.
#[derive(Debug, Clone, PartialEq)]
pub struct Sandbox {
    pub id: SandboxId,
    pub team_id: TeamId,
    /// Where it runs (or ran); `None` before placement or after its host was deleted.
    pub host_id: Option<HostId>,
    /// `None` if the template was deleted since.
    pub template_id: Option<TemplateId>,
    pub template_name: String,
    pub status: SandboxStatus,
    /// Why it is in `error` (or why the last operation failed).
    pub error: Option<String>,
    pub vcpus: u32,
    pub memory_mb: u32,
    pub disk_size_mb: u32,
    pub timeout_sec: u32,
    pub env: BTreeMap<String, String>,
    pub metadata: BTreeMap<String, String>,
    /// Prefixed id of the actor that created it (`usr-…`, `key-…`).
    pub created_by: String,
    pub created_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub stopped_at: Option<DateTime<Utc>>,
    pub last_active_at: Option<DateTime<Utc>>,
    pub updated_at: DateTime<Utc>,
    /// When its lifetime ends while it runs; `None`: no deadline.
    pub expires_at: Option<DateTime<Utc>>,
    /// The lifetime a resume applies again when it names none.
    pub lifetime_sec: Option<u32>,
    /// What its lifetime's end does.
    pub on_expiry: Expiry,
    /// Its egress rules (normalised).
    pub egress: EgressRules,
    /// Its ports answer without the traffic token.
    pub public_traffic: bool,
    /// A request to one of its ports resumes it when it is paused.
    pub auto_resume: bool,
    /// The generation its guest and traffic tokens derive from (bumped by a rotation).
    pub token_generation: u64,
    /// The version of its egress rules (one more at each change).
    pub egress_version: u64,
    /// The host a move is taking it to ([`begin_move`]); it stays on `host_id` until the
    /// move re-points it.
    pub moving_to: Option<HostId>,
    /// That move (its package's id): only it may finish or end the move.
    pub moving_id: Option<TemplateId>,
    /// When that move began.
    pub moving_since: Option<DateTime<Utc>>,
}

/// What [`insert`] needs. The sandbox starts `pending`.
#[derive(Debug, Clone)]
pub struct NewSandbox {
    pub team_id: TeamId,
    pub template_id: Option<TemplateId>,
    pub template_name: String,
    pub vcpus: u32,
    pub memory_mb: u32,
    pub disk_size_mb: u32,
    pub timeout_sec: u32,
    pub env: BTreeMap<String, String>,
    pub metadata: BTreeMap<String, String>,
    pub created_by: String,
    /// Absolute lifetime from now; `None`: no deadline.
    pub lifetime_sec: Option<u32>,
    pub on_expiry: Expiry,
    /// Egress rules, validated and normalised by the caller.
    pub egress: EgressRules,
    pub public_traffic: bool,
    pub auto_resume: bool,
}

/// Which sandboxes [`list_for_team`] returns. Empty fields do not filter.
#[derive(Debug, Clone, Default)]
pub struct SandboxFilter {
    /// Any of these statuses.
    pub statuses: Vec<SandboxStatus>,
    /// All of these `key = value` metadata pairs.
    pub metadata: Vec<(String, String)>,
}

/// Resources held on a host by its sandboxes (those whose status holds host resources).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HostLoad {
    pub sandboxes: u64,
    pub vcpus: u64,
    pub memory_mb: u64,
}

const COLUMNS: &str = "s.id, s.team_id, s.host_id, s.template_id, s.template_name, s.status, \
                       s.error, s.vcpus, s.memory_mb, s.disk_size_mb, s.timeout_sec, s.env, \
                       s.created_by, s.created_at, s.started_at, s.stopped_at, s.last_active_at, \
                       s.updated_at, s.expires_at, s.lifetime_sec, s.on_expiry, s.egress, \
                       s.public_traffic, s.auto_resume, s.token_generation, s.egress_version, \
                       s.moving_to, s.moving_id, s.moving_since";

fn from_row(r: &dyn DbRow) -> Result<Sandbox, DbError> {
    let env = r.json("env")?;
    let env: BTreeMap<String, String> = serde_json::from_value(env.clone())
        .map_err(|_| DbError::corrupt("env", env.to_string()))?;
    let egress = r.json("egress")?;
    let egress: EgressRules = serde_json::from_value(egress.clone())
        .map_err(|_| DbError::corrupt("egress", egress.to_string()))?;
    Ok(Sandbox {
        id: r.id("id")?,
        team_id: r.id("team_id")?,
        host_id: r.id_opt("host_id")?,
        template_id: r.id_opt("template_id")?,
        template_name: r.string("template_name")?,
        status: r.parse("status")?,
        error: r.string_opt("error")?,
        vcpus: r.u32("vcpus")?,
        memory_mb: r.u32("memory_mb")?,
        disk_size_mb: r.u32("disk_size_mb")?,
        timeout_sec: r.u32("timeout_sec")?,
        env,
        metadata: BTreeMap::new(),
        created_by: r.string("created_by")?,
        created_at: r.time("created_at")?,
        started_at: r.time_opt("started_at")?,
        stopped_at: r.time_opt("stopped_at")?,
        last_active_at: r.time_opt("last_active_at")?,
        updated_at: r.time("updated_at")?,
        expires_at: r.time_opt("expires_at")?,
        lifetime_sec: r.u32_opt("lifetime_sec")?,
        on_expiry: r.parse("on_expiry")?,
        egress,
        public_traffic: r.bool("public_traffic")?,
        auto_resume: r.bool("auto_resume")?,
        token_generation: u64::try_from(r.i64("token_generation")?)
            .map_err(|_| DbError::corrupt("token_generation", "negative"))?,
        egress_version: u64::try_from(r.i64("egress_version")?)
            .map_err(|_| DbError::corrupt("egress_version", "negative"))?,
        moving_to: r.id_opt("moving_to")?,
        moving_id: r.id_opt("moving_id")?,
        moving_since: r.time_opt("moving_since")?,
    })
}

/// Records a new `pending` sandbox with its metadata, in one transaction that first admits
/// it against its team's quota ([`crate::quotas`]). [`DbError::NotFound`] if the team or
/// template does not exist, [`DbError::QuotaExceeded`] if it does not fit.
pub async fn insert(db: &Db, new: &NewSandbox) -> Result<Sandbox, DbError> {
    let id = SandboxId::new();
    let at = now();
    let env: serde_json::Map<String, serde_json::Value> = new
        .env
        .iter()
        .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
        .collect();
    let env = serde_json::Value::Object(env);
    let mut tx = db.begin().await?;
    let demand = crate::quotas::Demand {
        running: 1,
        vcpus: u64::from(new.vcpus),
        memory_mb: u64::from(new.memory_mb),
        disk_mb: u64::from(new.disk_size_mb),
        ..Default::default()
    };
    crate::quotas::admit(&mut tx.conn(), new.team_id, &demand).await?;
    tx.conn()
        .execute(
            "INSERT INTO sandboxes (id, team_id, template_id, template_name, status, vcpus, \
                 memory_mb, disk_size_mb, timeout_sec, env, created_by, created_at, updated_at, \
                 expires_at, lifetime_sec, on_expiry, egress, public_traffic, auto_resume) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $12, $13, $14, $15, \
                 $16, $17, $18)",
            args![
                id,
                new.team_id,
                new.template_id,
                &new.template_name,
                SandboxStatus::Pending,
                new.vcpus,
                new.memory_mb,
                new.disk_size_mb,
                new.timeout_sec,
                env,
                &new.created_by,
                at,
                new.lifetime_sec.map(|s| after(at, s)),
                new.lifetime_sec,
                new.on_expiry,
                egress_json(&new.egress)?,
                new.public_traffic,
                new.auto_resume,
            ],
        )
        .await
        .map_err(|e| missing_as_not_found(e, "team or template", new.team_id))?;
    for (key, value) in &new.metadata {
        tx.conn()
            .execute(
                "INSERT INTO sandbox_metadata (sandbox_id, key, value) VALUES ($1, $2, $3)",
                args![id, key, value],
            )
            .await?;
    }
    let sandbox = fetch_one_with_metadata(&mut tx.conn(), id).await?;
    tx.commit().await?;
    sandbox.ok_or_else(|| DbError::not_found("sandbox", id))
}

/// The team's sandbox `id`; [`DbError::NotFound`] if it does not exist *or belongs to another
/// team*.
pub async fn get_for_team(db: &Db, team: TeamId, id: SandboxId) -> Result<Sandbox, DbError> {
    let mut conn = db.acquire().await?;
    let sandbox = conn
        .conn()
        .fetch_optional(
            &format!("SELECT {COLUMNS} FROM sandboxes s WHERE s.id = $1 AND s.team_id = $2"),
            args![id, team],
            from_row,
        )
        .await?;
    let Some(mut sandbox) = sandbox else {
        return Err(DbError::not_found("sandbox", id));
    };
    sandbox.metadata = metadata_of(&mut conn.conn(), &[id])
        .await?
        .remove(&id)
        .unwrap_or_default();
    Ok(sandbox)
}

/// The sandbox `id`, whatever its team (for the host monitor and platform admins).
pub async fn get(db: &Db, id: SandboxId) -> Result<Sandbox, DbError> {
    fetch_one_with_metadata(&mut db.acquire().await?.conn(), id)
        .await?
        .ok_or_else(|| DbError::not_found("sandbox", id))
}

async fn fetch_one_with_metadata(
    conn: &mut Conn<'_>,
    id: SandboxId,
) -> Result<Option<Sandbox>, DbError> {
    let sandbox = conn
        .fetch_optional(
            &format!("SELECT {COLUMNS} FROM sandboxes s WHERE s.id = $1"),
            args![id],
            from_row,
        )
        .await?;
    let Some(mut sandbox) = sandbox else {
        return Ok(None);
    };
    sandbox.metadata = metadata_of(conn, &[id])
        .await?
        .remove(&id)
        .unwrap_or_default();
    Ok(Some(sandbox))
}

/// A team's sandboxes, newest first, filtered and paginated.
pub async fn list_for_team(
    db: &Db,
    team: TeamId,
    filter: &SandboxFilter,
    page: &Page,
) -> Result<Paged<Sandbox>, DbError> {
    let mut sql = Sql::new(&format!(
        "SELECT {COLUMNS} FROM sandboxes s WHERE s.team_id = "
    ));
    sql.bind(team);
    if !filter.statuses.is_empty() {
        sql.push(" AND s.status IN ")
            .bind_list(filter.statuses.iter().copied());
    }
    for (key, value) in &filter.metadata {
        sql.push(
            " AND EXISTS (SELECT 1 FROM sandbox_metadata m WHERE m.sandbox_id = s.id AND m.key = ",
        );
        sql.bind(key).push(" AND m.value = ").bind(value).push(")");
    }
    sql.page("s", page)?;
    let mut conn = db.acquire().await?;
    let rows = conn.conn().fetch_all(&sql.text, sql.args, from_row).await?;
    let mut paged = finish_page(rows, page.effective_limit(), |s| {
        (s.created_at, s.id.uuid())
    });
    attach_metadata(&mut conn.conn(), &mut paged.items).await?;
    Ok(paged)
}

/// Sandboxes placed on `host` whose status is one of `statuses` (all statuses if empty),
/// oldest first.
pub async fn list_by_host(
    db: &Db,
    host: HostId,
    statuses: &[SandboxStatus],
) -> Result<Vec<Sandbox>, DbError> {
    let mut sql = Sql::new(&format!(
        "SELECT {COLUMNS} FROM sandboxes s WHERE s.host_id = "
    ));
    sql.bind(host);
    if !statuses.is_empty() {
        sql.push(" AND s.status IN ")
            .bind_list(statuses.iter().copied());
    }
    sql.push(" ORDER BY s.created_at, s.id");
    let mut conn = db.acquire().await?;
    let mut rows = conn.conn().fetch_all(&sql.text, sql.args, from_row).await?;
    attach_metadata(&mut conn.conn(), &mut rows).await?;
    Ok(rows)
}

/// Sandboxes in any of `statuses`, whatever their team or host, oldest first (background jobs:
/// stuck `pending` rows, idle `running` ones).
pub async fn list_by_status(db: &Db, statuses: &[SandboxStatus]) -> Result<Vec<Sandbox>, DbError> {
    if statuses.is_empty() {
        return Ok(Vec::new());
    }
    let mut sql = Sql::new(&format!(
        "SELECT {COLUMNS} FROM sandboxes s WHERE s.status IN "
    ));
    sql.bind_list(statuses.iter().copied())
        .push(" ORDER BY s.created_at, s.id");
    let mut conn = db.acquire().await?;
    let mut rows = conn.conn().fetch_all(&sql.text, sql.args, from_row).await?;
    attach_metadata(&mut conn.conn(), &mut rows).await?;
    Ok(rows)
}

/// Compare-and-set of the status: moves the sandbox to `to` (recording `error`, which `None`
/// clears) only if its current status is one of `from`. Returns whether it applied. Entering a
/// terminal status sets `stopped_at` (once).
pub async fn transition(
    db: &Db,
    id: SandboxId,
    from: &[SandboxStatus],
    to: SandboxStatus,
    error: Option<&str>,
) -> Result<bool, DbError> {
    if from.is_empty() {
        return Ok(false);
    }
    let at = now();
    let stopped_at = to.is_terminal().then_some(at);
    let mut sql = Sql::new("UPDATE sandboxes SET status = ");
    sql.bind(to)
        .push(", error = ")
        .bind(error)
        .push(", updated_at = ")
        .bind(at);
    sql.push(", stopped_at = COALESCE(stopped_at, ")
        .bind(stopped_at)
        .push(")");
    sql.push(" WHERE id = ")
        .bind(id)
        .push(" AND status IN ")
        .bind_list(from.iter().copied());
    Ok(db.execute(&sql.text, sql.args).await? > 0)
}

/// [`transition`] from `was` to `to` of a sandbox still recorded on `host` (what a host
/// reports changes only its own sandboxes: one that moved elsewhere meanwhile is not its).
/// Returns whether it applied.
pub async fn transition_on_host(
    db: &Db,
    id: SandboxId,
    host: HostId,
    was: SandboxStatus,
    to: SandboxStatus,
    error: Option<&str>,
) -> Result<bool, DbError> {
    let at = now();
    let stopped_at = to.is_terminal().then_some(at);
    let n = db
        .execute(
            "UPDATE sandboxes SET status = $2, error = $3, updated_at = $4, \
             stopped_at = COALESCE(stopped_at, $7) \
             WHERE id = $1 AND status = $5 AND host_id = $6",
            args![id, to, error, at, was, host, stopped_at],
        )
        .await?;
    Ok(n > 0)
}

/// [`transition`] of a sandbox of `team`, admitted against the team's quota for
/// `demand` in the same transaction ([`crate::quotas`]): [`DbError::QuotaExceeded`] and
/// nothing changed if it does not fit.
pub async fn transition_within_quota(
    db: &Db,
    team: TeamId,
    id: SandboxId,
    from: &[SandboxStatus],
    to: SandboxStatus,
    demand: &crate::quotas::Demand,
) -> Result<bool, DbError> {
    let mut tx = db.begin().await?;
    crate::quotas::admit(&mut tx.conn(), team, demand).await?;
    let mut sql = Sql::new("UPDATE sandboxes SET status = ");
    sql.bind(to).push(", updated_at = ").bind(now());
    sql.push(" WHERE id = ")
        .bind(id)
        .push(" AND team_id = ")
        .bind(team)
        .push(" AND status IN ")
        .bind_list(from.iter().copied());
    let changed = tx.conn().execute(&sql.text, sql.args).await? > 0;
    tx.commit().await?;
    Ok(changed)
}

/// Records that the sandbox runs on `host` since `started_at`: status `running`, error cleared,
/// last activity = `started_at`. Refuses (returns `false`) if the sandbox is missing or in a
/// terminal status.
pub async fn set_running(
    db: &Db,
    id: SandboxId,
    host: HostId,
    started_at: DateTime<Utc>,
) -> Result<bool, DbError> {
    let n = db
        .execute(
            "UPDATE sandboxes SET status = $2, host_id = $3, started_at = $4, \
             last_active_at = $4, error = NULL, updated_at = $5 \
             WHERE id = $1 AND status NOT IN ($6, $7)",
            args![
                id,
                SandboxStatus::Running,
                host,
                started_at,
                now(),
                SandboxStatus::Stopped,
                SandboxStatus::Error,
            ],
        )
        .await
        .map_err(|e| missing_as_not_found(e, "host", host))?;
    Ok(n > 0)
}

/// How [`set_lifetime`] changes a deadline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LifetimeChange {
    /// The sandbox ends `lifetime_sec` from now, sooner or later than before (E2B's
    /// `set_timeout`); a sandbox without a deadline gets one.
    Set,
    /// Only a later end than the current one applies, and only to a sandbox that has a
    /// deadline (E2B's refresh, and `connect` on a running sandbox).
    Extend,
}

/// Sets a sandbox's deadline to `lifetime_sec` from now (see [`LifetimeChange`]) and, for
/// [`LifetimeChange::Set`], records `lifetime_sec` as the lifetime a resume applies again.
/// Only `running` sandboxes (and `starting` ones, whose create is in flight) change.
/// Returns whether it applied.
pub async fn set_lifetime(
    db: &Db,
    id: SandboxId,
    lifetime_sec: u32,
    change: LifetimeChange,
) -> Result<bool, DbError> {
    let at = now();
    let end = after(at, lifetime_sec);
    let live = [SandboxStatus::Running, SandboxStatus::Starting];
    let mut sql = Sql::new("UPDATE sandboxes SET expires_at = ");
    sql.bind(end).push(", updated_at = ").bind(at);
    if change == LifetimeChange::Set {
        sql.push(", lifetime_sec = ").bind(lifetime_sec);
    }
    sql.push(" WHERE id = ")
        .bind(id)
        .push(" AND status IN ")
        .bind_list(live);
    if change == LifetimeChange::Extend {
        sql.push(" AND expires_at IS NOT NULL AND expires_at < ")
            .bind(end);
    }
    Ok(db.execute(&sql.text, sql.args).await? > 0)
}

/// Starts a new lifetime for a sandbox that is resuming: `lifetime_sec` (or, when `None`,
/// the one it recorded) from now, and records it. A sandbox without a recorded lifetime and
/// none given keeps no deadline.
pub async fn restart_lifetime(
    db: &Db,
    id: SandboxId,
    lifetime_sec: Option<u32>,
) -> Result<(), DbError> {
    let Some(secs) = lifetime_sec.or(get(db, id).await?.lifetime_sec) else {
        return Ok(());
    };
    let at = now();
    db.execute(
        "UPDATE sandboxes SET expires_at = $2, lifetime_sec = $3, updated_at = $4 WHERE id = $1",
        args![id, after(at, secs), secs, at],
    )
    .await?;
    Ok(())
}

/// `secs` seconds after `at`.
fn after(at: DateTime<Utc>, secs: u32) -> DateTime<Utc> {
    at + chrono::Duration::seconds(i64::from(secs))
}

/// Running sandboxes whose lifetime ended at or before `at`, soonest first, at most `limit`.
pub async fn expired(db: &Db, at: DateTime<Utc>, limit: u32) -> Result<Vec<Sandbox>, DbError> {
    let mut sql = Sql::new(&format!(
        "SELECT {COLUMNS} FROM sandboxes s WHERE s.status = "
    ));
    sql.bind(SandboxStatus::Running)
        .push(" AND s.expires_at IS NOT NULL AND s.expires_at <= ")
        .bind(at)
        .push(" ORDER BY s.expires_at LIMIT ")
        .bind(limit);
    db.fetch_all(&sql.text, sql.args, from_row).await
}

/// Records activity (commands, file operations, proxied traffic) now.
pub async fn touch_last_active(db: &Db, id: SandboxId) -> Result<(), DbError> {
    db.execute(
        "UPDATE sandboxes SET last_active_at = $2 WHERE id = $1",
        args![id, now()],
    )
    .await?;
    Ok(())
}

/// Places (or un-places, with `None`) the sandbox on a host. Returns whether it exists.
pub async fn set_host(db: &Db, id: SandboxId, host: Option<HostId>) -> Result<bool, DbError> {
    let n = db
        .execute(
            "UPDATE sandboxes SET host_id = $2, updated_at = $3 WHERE id = $1",
            args![id, host, now()],
        )
        .await
        .map_err(|e| {
            missing_as_not_found(e, "host", host.map(|h| h.to_string()).unwrap_or_default())
        })?;
    Ok(n > 0)
}

/// Marks paused sandbox `id` on `from` as moving to `to` by move `move_id`. Applies only to
/// a sandbox that is `paused` on `from` and not moving already; returns whether it applied.
pub async fn begin_move(
    db: &Db,
    id: SandboxId,
    from: HostId,
    to: HostId,
    move_id: TemplateId,
) -> Result<bool, DbError> {
    let at = now();
    let n = db
        .execute(
            "UPDATE sandboxes SET moving_to = $2, moving_since = $3, updated_at = $3, \
             moving_id = $6 \
             WHERE id = $1 AND host_id = $4 AND status = $5 AND moving_to IS NULL",
            args![id, to, at, from, SandboxStatus::Paused, move_id],
        )
        .await
        .map_err(|e| missing_as_not_found(e, "host", to))?;
    Ok(n > 0)
}

/// Re-points a moving sandbox to the host it moved to. Applies only if it is still `paused`
/// on `from` and moving to `to` by move `move_id` (nothing changed it meanwhile, and the
/// move was not given up); returns whether it applied.
pub async fn finish_move(
    db: &Db,
    id: SandboxId,
    from: HostId,
    to: HostId,
    move_id: TemplateId,
) -> Result<bool, DbError> {
    let n = db
        .execute(
            "UPDATE sandboxes SET host_id = $2, moving_to = NULL, moving_id = NULL, \
             moving_since = NULL, updated_at = $3 \
             WHERE id = $1 AND host_id = $4 AND moving_to = $2 AND status = $5 \
             AND moving_id = $6",
            args![id, to, now(), from, SandboxStatus::Paused, move_id],
        )
        .await?;
    Ok(n > 0)
}

/// Ends move `move_id`, which did not happen: the sandbox stays where it is. Returns
/// whether that move was under way.
pub async fn end_move(db: &Db, id: SandboxId, move_id: TemplateId) -> Result<bool, DbError> {
    let n = db
        .execute(
            "UPDATE sandboxes SET moving_to = NULL, moving_id = NULL, moving_since = NULL, \
             updated_at = $3 WHERE id = $1 AND moving_id = $2",
            args![id, move_id, now()],
        )
        .await?;
    Ok(n > 0)
}

/// Sandboxes whose move began before `before`.
pub async fn moves_begun_before(db: &Db, before: DateTime<Utc>) -> Result<Vec<Sandbox>, DbError> {
    let mut sql = Sql::new(&format!(
        "SELECT {COLUMNS} FROM sandboxes s WHERE s.moving_to IS NOT NULL AND s.moving_since < "
    ));
    sql.bind(before).push(" ORDER BY s.moving_since, s.id");
    let mut conn = db.acquire().await?;
    let mut rows = conn.conn().fetch_all(&sql.text, sql.args, from_row).await?;
    attach_metadata(&mut conn.conn(), &mut rows).await?;
    Ok(rows)
}

/// What the sandboxes on `host` hold: count, vCPUs and memory of those whose status holds host
/// resources ([`SandboxStatus::holds_host_resources`]).
pub async fn host_load(db: &Db, host: HostId) -> Result<HostLoad, DbError> {
    let holding = SandboxStatus::ALL
        .iter()
        .copied()
        .filter(SandboxStatus::holds_host_resources);
    let mut sql = Sql::new(
        "SELECT COUNT(*) AS n, CAST(COALESCE(SUM(vcpus), 0) AS BIGINT) AS vcpus, \
         CAST(COALESCE(SUM(memory_mb), 0) AS BIGINT) AS memory_mb FROM sandboxes WHERE host_id = ",
    );
    sql.bind(host).push(" AND status IN ").bind_list(holding);
    db.fetch_one(&sql.text, sql.args, |r| {
        Ok(HostLoad {
            sandboxes: r.u64("n")?,
            vcpus: r.u64("vcpus")?,
            memory_mb: r.u64("memory_mb")?,
        })
    })
    .await
}

/// [`host_load`] of every host that holds something, in one query (placement reads the
/// whole fleet's load at once).
pub async fn load_by_host(db: &Db) -> Result<std::collections::HashMap<HostId, HostLoad>, DbError> {
    let holding = SandboxStatus::ALL
        .iter()
        .copied()
        .filter(SandboxStatus::holds_host_resources);
    let mut sql = Sql::new(
        "SELECT host_id, COUNT(*) AS n, CAST(COALESCE(SUM(vcpus), 0) AS BIGINT) AS vcpus, \
         CAST(COALESCE(SUM(memory_mb), 0) AS BIGINT) AS memory_mb FROM sandboxes \
         WHERE host_id IS NOT NULL AND status IN ",
    );
    sql.bind_list(holding).push(" GROUP BY host_id");
    let rows = db
        .fetch_all(&sql.text, sql.args, |r| {
            Ok((
                r.id::<HostId>("host_id")?,
                HostLoad {
                    sandboxes: r.u64("n")?,
                    vcpus: r.u64("vcpus")?,
                    memory_mb: r.u64("memory_mb")?,
                },
            ))
        })
        .await?;
    Ok(rows.into_iter().collect())
}

/// How many sandboxes there are in each status (statuses with none are left out).
pub async fn count_by_status(db: &Db) -> Result<Vec<(SandboxStatus, u64)>, DbError> {
    db.fetch_all(
        "SELECT status, COUNT(*) AS n FROM sandboxes GROUP BY status",
        args![],
        |r| Ok((r.parse::<SandboxStatus>("status")?, r.u64("n")?)),
    )
    .await
}

/// How many sandboxes made from `template` are in one of `statuses` (all statuses if empty);
/// lets the service refuse to delete a template in use.
pub async fn count_by_template(
    db: &Db,
    template: TemplateId,
    statuses: &[SandboxStatus],
) -> Result<u64, DbError> {
    let mut sql = Sql::new("SELECT COUNT(*) AS n FROM sandboxes WHERE template_id = ");
    sql.bind(template);
    if !statuses.is_empty() {
        sql.push(" AND status IN ")
            .bind_list(statuses.iter().copied());
    }
    db.fetch_one(&sql.text, sql.args, |r| r.u64("n")).await
}

fn egress_json(rules: &EgressRules) -> Result<serde_json::Value, DbError> {
    serde_json::to_value(rules).map_err(|e| DbError::corrupt("egress", e.to_string()))
}

/// A recorded change of a sandbox's egress rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EgressChange {
    /// The change's version: one more than the one before.
    pub version: i64,
    /// The rules it replaced.
    pub previous: EgressRules,
}

fn parse_egress(value: serde_json::Value) -> Result<EgressRules, DbError> {
    serde_json::from_value(value.clone()).map_err(|_| DbError::corrupt("egress", value.to_string()))
}

/// Records new egress rules under the next version (one transaction); `None` when the
/// sandbox does not exist. When `expect` is given, the change is made only if the rules'
/// current version is that one (`None` otherwise).
async fn change_egress(
    db: &Db,
    id: SandboxId,
    rules: &EgressRules,
    expect: Option<i64>,
) -> Result<Option<EgressChange>, DbError> {
    // The row stays locked until the update (SQLite's write transactions lock the file).
    let lock = match db.engine() {
        crate::Engine::Postgres => " FOR UPDATE",
        crate::Engine::Sqlite => "",
    };
    let mut tx = db.begin().await?;
    let current = tx
        .conn()
        .fetch_optional(
            &format!("SELECT egress, egress_version FROM sandboxes WHERE id = $1{lock}"),
            args![id],
            |r| Ok((r.json("egress")?, r.i64("egress_version")?)),
        )
        .await?;
    let Some((previous, version)) = current else {
        return Ok(None);
    };
    if expect.is_some_and(|v| v != version) {
        return Ok(None);
    }
    let change = EgressChange {
        version: version + 1,
        previous: parse_egress(previous)?,
    };
    tx.conn()
        .execute(
            "UPDATE sandboxes SET egress = $2, egress_version = $3, updated_at = $4 WHERE id = $1",
            args![id, egress_json(rules)?, change.version, now()],
        )
        .await?;
    tx.commit().await?;
    Ok(Some(change))
}

/// Moves a sandbox's tokens to the next generation (a rotation) if they are still at
/// `from`; returns the new generation, `None` when the sandbox does not exist or another
/// rotation came first.
pub async fn rotate_tokens(db: &Db, id: SandboxId, from: u64) -> Result<Option<u64>, DbError> {
    let from =
        i64::try_from(from).map_err(|_| DbError::corrupt("token_generation", "too large"))?;
    let n = db
        .execute(
            "UPDATE sandboxes SET token_generation = $3, updated_at = $4 \
             WHERE id = $1 AND token_generation = $2",
            args![id, from, from + 1, now()],
        )
        .await?;
    Ok((n == 1).then(|| u64::try_from(from + 1).unwrap_or(u64::MAX)))
}

/// Undoes a rotation to `to` (its host refused it), if no later one was made.
pub async fn unrotate_tokens(db: &Db, id: SandboxId, to: u64) -> Result<bool, DbError> {
    let to = i64::try_from(to).map_err(|_| DbError::corrupt("token_generation", "too large"))?;
    let n = db
        .execute(
            "UPDATE sandboxes SET token_generation = $3, updated_at = $4 \
             WHERE id = $1 AND token_generation = $2",
            args![id, to, to - 1, now()],
        )
        .await?;
    Ok(n == 1)
}

/// Records new egress rules under the next version; `None` when the sandbox does not
/// exist. The sandbox's host is told afterwards, with the version: it takes a change only
/// if it is newer than the one it holds.
pub async fn set_egress(
    db: &Db,
    id: SandboxId,
    rules: &EgressRules,
) -> Result<Option<EgressChange>, DbError> {
    change_egress(db, id, rules, None).await
}

/// Undoes `change` (its host refused it) by recording its previous rules under the next
/// version — only if no later change was made meanwhile (that one stands). Returns the
/// version of the undoing change.
pub async fn revert_egress(
    db: &Db,
    id: SandboxId,
    change: &EgressChange,
) -> Result<Option<i64>, DbError> {
    Ok(
        change_egress(db, id, &change.previous, Some(change.version))
            .await?
            .map(|c| c.version),
    )
}

/// Replaces a sandbox's metadata (one transaction). Returns whether the sandbox exists.
pub async fn set_metadata(
    db: &Db,
    id: SandboxId,
    metadata: &BTreeMap<String, String>,
) -> Result<bool, DbError> {
    let mut tx = db.begin().await?;
    let n = tx
        .conn()
        .execute(
            "UPDATE sandboxes SET updated_at = $2 WHERE id = $1",
            args![id, now()],
        )
        .await?;
    if n == 0 {
        return Ok(false);
    }
    tx.conn()
        .execute(
            "DELETE FROM sandbox_metadata WHERE sandbox_id = $1",
            args![id],
        )
        .await?;
    for (key, value) in metadata {
        tx.conn()
            .execute(
                "INSERT INTO sandbox_metadata (sandbox_id, key, value) VALUES ($1, $2, $3)",
                args![id, key, value],
            )
            .await?;
    }
    tx.commit().await?;
    Ok(true)
}

async fn attach_metadata(conn: &mut Conn<'_>, sandboxes: &mut [Sandbox]) -> Result<(), DbError> {
    let ids: Vec<SandboxId> = sandboxes.iter().map(|s| s.id).collect();
    let mut all = metadata_of(conn, &ids).await?;
    for sandbox in sandboxes {
        sandbox.metadata = all.remove(&sandbox.id).unwrap_or_default();
    }
    Ok(())
}

/// Metadata of several sandboxes, in chunks small enough for any engine's parameter limit.
async fn metadata_of(
    conn: &mut Conn<'_>,
    ids: &[SandboxId],
) -> Result<BTreeMap<SandboxId, BTreeMap<String, String>>, DbError> {
    let mut out: BTreeMap<SandboxId, BTreeMap<String, String>> = BTreeMap::new();
    for chunk in ids.chunks(500) {
        let mut sql =
            Sql::new("SELECT sandbox_id, key, value FROM sandbox_metadata WHERE sandbox_id IN ");
        sql.bind_list(chunk.iter().copied().map(Arg::from));
        let rows = conn
            .fetch_all(&sql.text, sql.args, |r| {
                Ok((
                    r.id::<SandboxId>("sandbox_id")?,
                    r.string("key")?,
                    r.string("value")?,
                ))
            })
            .await?;
        for (id, key, value) in rows {
            out.entry(id).or_default().insert(key, value);
        }
    }
    Ok(out)
}
