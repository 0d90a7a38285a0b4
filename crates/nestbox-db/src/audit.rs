//! `audit_logs`: who did what to which resource, per team.
//!
//! Entries are append-only. Actor and resource ids are prefixed strings (`usr-…`, `sb-…`)
//! because they are polymorphic; `team_id` is `None` for platform-level (admin) actions.
//! Listing is keyset-paginated at microsecond precision with the id as tie-breaker, so pages
//! never skip or repeat entries.

use chrono::{DateTime, Utc};
use nestbox_types::{AuditLogId, TeamId};

use crate::engine::{Db, DbRow, args, now};
use crate::error::DbError;
use crate::model::{ActorType, AuditStatus};
use crate::page::{Page, Paged, Sql, finish_page};

/// An audit log entry.
#[derive(Debug, Clone, PartialEq)]
pub struct AuditLog {
    pub id: AuditLogId,
    pub team_id: Option<TeamId>,
    pub actor_type: ActorType,
    pub actor_id: Option<String>,
    /// e.g. `sandbox.create`.
    pub action: String,
    /// e.g. `sandbox`.
    pub resource_type: String,
    pub resource_id: Option<String>,
    pub status: AuditStatus,
    /// Free-form JSON (an object by convention).
    pub details: serde_json::Value,
    pub created_at: DateTime<Utc>,
}

/// What [`insert`] records.
#[derive(Debug, Clone)]
pub struct NewAuditLog {
    pub team_id: Option<TeamId>,
    pub actor_type: ActorType,
    pub actor_id: Option<String>,
    pub action: String,
    pub resource_type: String,
    pub resource_id: Option<String>,
    pub status: AuditStatus,
    pub details: serde_json::Value,
}

/// Whose entries [`list`] returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuditScope {
    /// One team's entries.
    Team(TeamId),
    /// Platform-level entries only (no team).
    Platform,
    /// Every entry, including platform-level ones (platform admins only).
    All,
}

/// Narrows [`list`]. Empty fields do not filter.
#[derive(Debug, Clone, Default)]
pub struct AuditFilter {
    pub resource_type: Option<String>,
    pub action: Option<String>,
}

const COLUMNS: &str = "a.id, a.team_id, a.actor_type, a.actor_id, a.action, a.resource_type, \
                       a.resource_id, a.status, a.details, a.created_at";

fn from_row(r: &dyn DbRow) -> Result<AuditLog, DbError> {
    Ok(AuditLog {
        id: r.id("id")?,
        team_id: r.id_opt("team_id")?,
        actor_type: r.parse("actor_type")?,
        actor_id: r.string_opt("actor_id")?,
        action: r.string("action")?,
        resource_type: r.string("resource_type")?,
        resource_id: r.string_opt("resource_id")?,
        status: r.parse("status")?,
        details: r.json("details")?,
        created_at: r.time("created_at")?,
    })
}

/// Appends an entry, stamped now.
pub async fn insert(db: &Db, new: &NewAuditLog) -> Result<AuditLog, DbError> {
    let entry = AuditLog {
        id: AuditLogId::new(),
        team_id: new.team_id,
        actor_type: new.actor_type,
        actor_id: new.actor_id.clone(),
        action: new.action.clone(),
        resource_type: new.resource_type.clone(),
        resource_id: new.resource_id.clone(),
        status: new.status,
        details: new.details.clone(),
        created_at: now(),
    };
    db.execute(
        "INSERT INTO audit_logs (id, team_id, actor_type, actor_id, action, resource_type, \
                                 resource_id, status, details, created_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
        args![
            entry.id,
            entry.team_id,
            entry.actor_type,
            entry.actor_id.clone(),
            &entry.action,
            &entry.resource_type,
            entry.resource_id.clone(),
            entry.status,
            entry.details.clone(),
            entry.created_at,
        ],
    )
    .await?;
    Ok(entry)
}

/// Entries in `scope` matching `filter`, newest first.
pub async fn list(
    db: &Db,
    scope: AuditScope,
    filter: &AuditFilter,
    page: &Page,
) -> Result<Paged<AuditLog>, DbError> {
    let mut sql = Sql::new(&format!("SELECT {COLUMNS} FROM audit_logs a WHERE 1 = 1"));
    match scope {
        AuditScope::Team(team) => {
            sql.push(" AND a.team_id = ").bind(team);
        }
        AuditScope::Platform => {
            sql.push(" AND a.team_id IS NULL");
        }
        AuditScope::All => {}
    }
    if let Some(resource_type) = &filter.resource_type {
        sql.push(" AND a.resource_type = ").bind(resource_type);
    }
    if let Some(action) = &filter.action {
        sql.push(" AND a.action = ").bind(action);
    }
    sql.page("a", page)?;
    let rows = db.fetch_all(&sql.text, sql.args, from_row).await?;
    Ok(finish_page(rows, page.effective_limit(), |a| {
        (a.created_at, a.id.uuid())
    }))
}
