//! Per-team quotas: limits a platform admin sets on a team (columns of `teams`; `NULL`: no
//! limit) and the team's usage, counted from `sandboxes` and `templates` when asked.
//!
//! Invariant: a write that adds to a team's usage and checks its quota ([`admit`]) does
//! both in one transaction that first locks the team's row (an `UPDATE` of it), so
//! concurrent requests of one team are admitted one after the other and together never
//! exceed a limit (on PostgreSQL the row lock; on SQLite the write transaction, which is
//! already exclusive).

use nestbox_types::TeamId;

use crate::engine::{Conn, Db, DbRow, args};
use crate::error::DbError;

/// A team's limits (`None`: no limit).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Quota {
    /// Sandboxes that run or are being started (`pending`, `starting`, `running`,
    /// `missing`).
    pub max_running: Option<u32>,
    /// Paused sandboxes.
    pub max_paused: Option<u32>,
    /// vCPUs of running sandboxes.
    pub max_vcpus: Option<u32>,
    /// Memory of running sandboxes, MiB.
    pub max_memory_mb: Option<u32>,
    /// Disk of running and paused sandboxes, MiB.
    pub max_disk_mb: Option<u32>,
    /// Templates the team owns.
    pub max_templates: Option<u32>,
}

/// What a team holds now (and, as [`Demand`], what a request would add).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Running sandboxes (as [`Quota::max_running`] counts them).
    pub running: u64,
    /// Paused sandboxes.
    pub paused: u64,
    /// vCPUs of running sandboxes.
    pub vcpus: u64,
    /// Memory of running sandboxes, MiB.
    pub memory_mb: u64,
    /// Disk of running and paused sandboxes, MiB.
    pub disk_mb: u64,
    /// Templates.
    pub templates: u64,
}

/// What a request would add to a team's usage: an amount of each resource.
pub type Demand = Usage;

/// The statuses [`Quota::max_running`] counts.
const RUNNING: &str = "('pending', 'starting', 'running', 'missing')";

fn quota_from_row(r: &dyn DbRow) -> Result<Quota, DbError> {
    Ok(Quota {
        max_running: r.u32_opt("max_running")?,
        max_paused: r.u32_opt("max_paused")?,
        max_vcpus: r.u32_opt("max_vcpus")?,
        max_memory_mb: r.u32_opt("max_memory_mb")?,
        max_disk_mb: r.u32_opt("max_disk_mb")?,
        max_templates: r.u32_opt("max_templates")?,
    })
}

fn usage_from_row(r: &dyn DbRow) -> Result<Usage, DbError> {
    let n = |col: &'static str| r.i64(col).map(|v| u64::try_from(v).unwrap_or(0));
    Ok(Usage {
        running: n("running")?,
        paused: n("paused")?,
        vcpus: n("vcpus")?,
        memory_mb: n("memory_mb")?,
        disk_mb: n("disk_mb")?,
        templates: n("templates")?,
    })
}

fn usage_sql() -> String {
    let sum = |what: &str, statuses: &str| {
        format!(
            "CAST(COALESCE(SUM(CASE WHEN s.status IN {statuses} THEN {what} ELSE 0 END), 0) AS BIGINT)"
        )
    };
    let held = "('pending', 'starting', 'running', 'missing', 'paused')";
    format!(
        "SELECT {} AS running, {} AS paused, {} AS vcpus, {} AS memory_mb, {} AS disk_mb, \
             (SELECT COUNT(*) FROM templates t WHERE t.team_id = $1 \
                AND NOT EXISTS (SELECT 1 FROM template_build_cache c \
                                WHERE c.template_id = t.id)) AS templates \
         FROM sandboxes s WHERE s.team_id = $1",
        sum("1", RUNNING),
        sum("1", "('paused')"),
        sum("s.vcpus", RUNNING),
        sum("s.memory_mb", RUNNING),
        sum("s.disk_size_mb", held),
    )
}

/// A live team's limits; [`DbError::NotFound`] if there is no such team.
pub async fn get(db: &Db, team: TeamId) -> Result<Quota, DbError> {
    db.fetch_optional(
        "SELECT max_running, max_paused, max_vcpus, max_memory_mb, max_disk_mb, max_templates \
         FROM teams WHERE id = $1 AND deleted_at IS NULL",
        args![team],
        quota_from_row,
    )
    .await?
    .ok_or_else(|| DbError::not_found("team", team))
}

/// Sets a live team's limits (all of them: `None` lifts one).
pub async fn set(db: &Db, team: TeamId, q: &Quota) -> Result<(), DbError> {
    let n = db
        .execute(
            "UPDATE teams SET max_running = $2, max_paused = $3, max_vcpus = $4, \
                 max_memory_mb = $5, max_disk_mb = $6, max_templates = $7 \
             WHERE id = $1 AND deleted_at IS NULL",
            args![
                team,
                q.max_running,
                q.max_paused,
                q.max_vcpus,
                q.max_memory_mb,
                q.max_disk_mb,
                q.max_templates
            ],
        )
        .await?;
    if n == 0 {
        return Err(DbError::not_found("team", team));
    }
    Ok(())
}

/// What `team` holds now.
pub async fn usage(db: &Db, team: TeamId) -> Result<Usage, DbError> {
    db.fetch_one(&usage_sql(), args![team], usage_from_row)
        .await
}

/// Inside a write transaction: locks `team`'s row, then checks that `demand` fits its
/// quota on top of its usage; [`DbError::QuotaExceeded`] names the first limit it would
/// pass. A team without limits is admitted without counting.
pub(crate) async fn admit(
    conn: &mut Conn<'_>,
    team: TeamId,
    demand: &Demand,
) -> Result<(), DbError> {
    // The lock: concurrent admissions of one team wait here until this one commits.
    conn.execute("UPDATE teams SET name = name WHERE id = $1", args![team])
        .await?;
    let quota = conn
        .fetch_optional(
            "SELECT max_running, max_paused, max_vcpus, max_memory_mb, max_disk_mb, \
                 max_templates FROM teams WHERE id = $1",
            args![team],
            quota_from_row,
        )
        .await?
        .unwrap_or_default();
    if quota == Quota::default() {
        return Ok(());
    }
    let usage = conn
        .fetch_one(&usage_sql(), args![team], usage_from_row)
        .await?;
    let checks = [
        (
            "running sandboxes",
            quota.max_running,
            usage.running,
            demand.running,
        ),
        (
            "paused sandboxes",
            quota.max_paused,
            usage.paused,
            demand.paused,
        ),
        ("vcpus", quota.max_vcpus, usage.vcpus, demand.vcpus),
        (
            "memory_mb",
            quota.max_memory_mb,
            usage.memory_mb,
            demand.memory_mb,
        ),
        ("disk_mb", quota.max_disk_mb, usage.disk_mb, demand.disk_mb),
        (
            "templates",
            quota.max_templates,
            usage.templates,
            demand.templates,
        ),
    ];
    for (resource, limit, used, more) in checks {
        if let Some(limit) = limit
            && more > 0
            && used + more > u64::from(limit)
        {
            return Err(DbError::QuotaExceeded {
                resource,
                limit,
                used,
                requested: more,
            });
        }
    }
    Ok(())
}

/// Checks `demand` against `team`'s quota in a transaction of its own (for a request whose
/// write happens elsewhere; only [`admit`] inside the write's own transaction is exact).
pub async fn check(db: &Db, team: TeamId, demand: &Demand) -> Result<(), DbError> {
    let mut tx = db.begin().await?;
    admit(&mut tx.conn(), team, demand).await?;
    tx.commit().await
}
