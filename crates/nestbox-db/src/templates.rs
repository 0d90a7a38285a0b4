//! `templates`: what sandboxes boot or restore from.
//!
//! Visibility: a team sees its own templates and the platform team's (all-zero team id). When
//! both have a template of the same name, the team's own shadows the platform's, in
//! [`get_visible`] and [`list_visible`] alike. Names are unique per team. An [`upsert`] keeps
//! the row's id; callers that keep files per generation must name them themselves.
//!
//! A team template's files are on the host it was made on (`host_id`) and on every host it
//! was copied to since: `template_hosts` lists them all ([`holders`]), the first included
//! (written with the template). Deleting a host re-homes the templates it made to another
//! holder ([`crate::hosts::delete`]), or deletes those it alone held.
//!
//! A fork's one-off template (`ephemeral`) belongs to its team but is never visible by name
//! ([`get_visible`], [`list_visible`]); [`unused_ephemeral`] finds those no sandbox holds
//! any more, for deletion. A build's step-cache entry is an ephemeral template too, kept
//! while its entry in `template_build_cache` is ([`crate::builds`]).

use chrono::{DateTime, Utc};
use nestbox_types::{
    HostId, PLATFORM_TEAM, SandboxId, SandboxStatus, TeamId, TemplateId, TemplateKind,
};

use crate::engine::{Conn, Db, DbRow, args, now};
use crate::error::{DbError, missing_as_not_found};

/// A template.
#[derive(Debug, Clone, PartialEq)]
pub struct Template {
    pub id: TemplateId,
    /// [`PLATFORM_TEAM`] for platform templates.
    pub team_id: TeamId,
    pub name: String,
    pub kind: TemplateKind,
    pub vcpus: u32,
    pub memory_mb: u32,
    /// Smallest root disk a sandbox from this template can have.
    pub disk_size_mb: u32,
    /// Space its files take on disk.
    pub size_bytes: u64,
    /// Where its files are; `None` = on every host.
    pub host_id: Option<HostId>,
    /// Prefixed id of the actor that made it; `None` for built-in templates.
    pub created_by: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// The sandbox it was made from, if any.
    pub source_sandbox_id: Option<SandboxId>,
    /// A fork's one-off template: hidden, deleted once unused.
    pub ephemeral: bool,
}

impl Template {
    /// The name it is known by: a hidden build of `name` ([`crate::tags::hidden_name`]) is
    /// `name` too.
    pub fn public_name(&self) -> &str {
        self.name.split('~').next().unwrap_or(&self.name)
    }
}

/// What [`upsert`] writes.
#[derive(Debug, Clone)]
pub struct NewTemplate {
    pub team_id: TeamId,
    pub name: String,
    pub kind: TemplateKind,
    pub vcpus: u32,
    pub memory_mb: u32,
    pub disk_size_mb: u32,
    pub size_bytes: u64,
    pub host_id: Option<HostId>,
    pub created_by: Option<String>,
    pub source_sandbox_id: Option<SandboxId>,
    pub ephemeral: bool,
}

pub(crate) const COLUMNS: &str = "id, team_id, name, kind, vcpus, memory_mb, disk_size_mb, size_bytes, \
                       host_id, created_by, created_at, updated_at, source_sandbox_id, ephemeral";

pub(crate) fn from_row(r: &dyn DbRow) -> Result<Template, DbError> {
    Ok(Template {
        id: r.id("id")?,
        team_id: r.id("team_id")?,
        name: r.string("name")?,
        kind: r.parse("kind")?,
        vcpus: r.u32("vcpus")?,
        memory_mb: r.u32("memory_mb")?,
        disk_size_mb: r.u32("disk_size_mb")?,
        size_bytes: r.u64("size_bytes")?,
        host_id: r.id_opt("host_id")?,
        created_by: r.string_opt("created_by")?,
        created_at: r.time("created_at")?,
        updated_at: r.time("updated_at")?,
        source_sandbox_id: r.id_opt("source_sandbox_id")?,
        ephemeral: r.bool("ephemeral")?,
    })
}

/// Creates the team's template of that name, or replaces its contents (keeping its id and
/// `created_at`). Returns the stored row.
pub async fn upsert(db: &Db, new: &NewTemplate) -> Result<Template, DbError> {
    db.fetch_one(
        &format!(
            "INSERT INTO templates (id, team_id, name, kind, vcpus, memory_mb, disk_size_mb, \
                                    size_bytes, host_id, created_by, created_at, updated_at, \
                                    source_sandbox_id, ephemeral) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $11, $12, $13) \
             ON CONFLICT (team_id, name) DO UPDATE SET \
                kind = excluded.kind, vcpus = excluded.vcpus, memory_mb = excluded.memory_mb, \
                disk_size_mb = excluded.disk_size_mb, size_bytes = excluded.size_bytes, \
                host_id = excluded.host_id, created_by = excluded.created_by, \
                updated_at = excluded.updated_at, source_sandbox_id = excluded.source_sandbox_id, \
                ephemeral = excluded.ephemeral \
             RETURNING {COLUMNS}"
        ),
        args![
            TemplateId::new(),
            new.team_id,
            &new.name,
            new.kind,
            new.vcpus,
            new.memory_mb,
            new.disk_size_mb,
            new.size_bytes,
            new.host_id,
            new.created_by.clone(),
            now(),
            new.source_sandbox_id,
            new.ephemeral,
        ],
        from_row,
    )
    .await
    .map_err(|e| missing_as_not_found(e, "team or host", new.team_id))
}

/// Inserts a new template; unlike [`upsert`], [`DbError::Conflict`] if the team already has
/// one of that name.
pub async fn create(db: &Db, new: &NewTemplate) -> Result<Template, DbError> {
    create_with_id(db, TemplateId::new(), new).await
}

/// [`create`] with an id the caller chose (the id a host already stores the files under).
/// [`DbError::Conflict`] if the team already has a template of that name (or the id is
/// taken).
pub async fn create_with_id(
    db: &Db,
    id: TemplateId,
    new: &NewTemplate,
) -> Result<Template, DbError> {
    insert(&mut db.acquire().await?.conn(), id, new).await
}

/// [`create_with_id`], admitted against the team's template quota in the same transaction
/// ([`crate::quotas`]): concurrent creates of a team never pass its limit together.
/// [`DbError::QuotaExceeded`] and nothing changed if it does not fit.
pub async fn create_within_quota(
    db: &Db,
    id: TemplateId,
    new: &NewTemplate,
) -> Result<Template, DbError> {
    let mut tx = db.begin().await?;
    let one = crate::quotas::Demand {
        templates: 1,
        ..Default::default()
    };
    crate::quotas::admit(&mut tx.conn(), new.team_id, &one).await?;
    let created = insert(&mut tx.conn(), id, new).await?;
    tx.commit().await?;
    Ok(created)
}

/// Replaces the template `old` by a new row `id` in one transaction: `old` is deleted (if it
/// still exists) and `new` inserted. Sandboxes made from `old` lose their `template_id`, as
/// with [`delete`]. [`DbError::Conflict`] (and nothing changes) if the team has another
/// template of the new name.
pub async fn replace(
    db: &Db,
    old: TemplateId,
    id: TemplateId,
    new: &NewTemplate,
) -> Result<Template, DbError> {
    let mut tx = db.begin().await?;
    tx.conn()
        .execute("DELETE FROM templates WHERE id = $1", args![old])
        .await?;
    let template = insert(&mut tx.conn(), id, new).await?;
    tx.commit().await?;
    Ok(template)
}

async fn insert(
    conn: &mut Conn<'_>,
    id: TemplateId,
    new: &NewTemplate,
) -> Result<Template, DbError> {
    let template = insert_row(conn, id, new).await?;
    if let Some(host) = new.host_id {
        conn.execute(
            "INSERT INTO template_hosts (template_id, host_id, created_at) VALUES ($1, $2, $3)",
            args![id, host, now()],
        )
        .await?;
    }
    Ok(template)
}

async fn insert_row(
    conn: &mut Conn<'_>,
    id: TemplateId,
    new: &NewTemplate,
) -> Result<Template, DbError> {
    conn.fetch_one(
        &format!(
            "INSERT INTO templates (id, team_id, name, kind, vcpus, memory_mb, disk_size_mb, \
                                    size_bytes, host_id, created_by, created_at, updated_at, \
                                    source_sandbox_id, ephemeral) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $11, $12, $13) \
             RETURNING {COLUMNS}"
        ),
        args![
            id,
            new.team_id,
            &new.name,
            new.kind,
            new.vcpus,
            new.memory_mb,
            new.disk_size_mb,
            new.size_bytes,
            new.host_id,
            new.created_by.clone(),
            now(),
            new.source_sandbox_id,
            new.ephemeral,
        ],
        from_row,
    )
    .await
    .map_err(|e| missing_as_not_found(e, "team or host", new.team_id))
}

/// The template named `name` that `team` sees: its own, else the platform's.
pub async fn get_visible(db: &Db, team: TeamId, name: &str) -> Result<Option<Template>, DbError> {
    db.fetch_optional(
        &format!(
            "SELECT {COLUMNS} FROM templates WHERE name = $2 AND team_id IN ($1, $3) \
             AND ephemeral = $4 ORDER BY CASE WHEN team_id = $1 THEN 0 ELSE 1 END LIMIT 1"
        ),
        args![team, name, PLATFORM_TEAM, false],
        from_row,
    )
    .await
}

/// Every template `team` sees, by name; the team's own shadow platform templates of the same
/// name.
pub async fn list_visible(db: &Db, team: TeamId) -> Result<Vec<Template>, DbError> {
    db.fetch_all(
        &format!(
            "SELECT {COLUMNS} FROM templates t WHERE t.ephemeral = $3 AND (t.team_id = $1 \
                OR (t.team_id = $2 AND NOT EXISTS ( \
                    SELECT 1 FROM templates o WHERE o.team_id = $1 AND o.name = t.name))) \
             ORDER BY t.name, t.team_id"
        ),
        args![team, PLATFORM_TEAM, false],
        from_row,
    )
    .await
}

/// Every template of every team (platform admins), by team then name.
pub async fn list_all(db: &Db) -> Result<Vec<Template>, DbError> {
    db.fetch_all(
        &format!("SELECT {COLUMNS} FROM templates ORDER BY team_id, name"),
        args![],
        from_row,
    )
    .await
}

/// The template with `id`, whoever owns it.
pub async fn get(db: &Db, id: TemplateId) -> Result<Template, DbError> {
    db.fetch_optional(
        &format!("SELECT {COLUMNS} FROM templates WHERE id = $1"),
        args![id],
        from_row,
    )
    .await?
    .ok_or_else(|| DbError::not_found("template", id))
}

/// Deletes a template; returns whether it existed. Sandboxes made from it keep their
/// `template_name` and lose their `template_id`.
pub async fn delete(db: &Db, id: TemplateId) -> Result<bool, DbError> {
    Ok(db
        .execute("DELETE FROM templates WHERE id = $1", args![id])
        .await?
        > 0)
}

/// Hidden templates (a fork's one-off template, a replaced or untagged build) that no
/// sandbox holding host resources was made from and no tag or step-cache entry holds, and
/// that are older than `before` (so a fork still creating its sandboxes is left alone).
pub async fn unused_ephemeral(db: &Db, before: DateTime<Utc>) -> Result<Vec<Template>, DbError> {
    let holding: Vec<SandboxStatus> = SandboxStatus::ALL
        .iter()
        .copied()
        .filter(SandboxStatus::holds_host_resources)
        .collect();
    let mut sql = crate::page::Sql::new(&format!(
        "SELECT {COLUMNS} FROM templates t WHERE t.ephemeral = "
    ));
    sql.bind(true)
        .push(" AND t.created_at < ")
        .bind(before)
        .push(" AND NOT EXISTS (SELECT 1 FROM sandboxes s WHERE s.template_id = t.id AND s.status IN ")
        .bind_list(holding)
        .push(") AND NOT EXISTS (SELECT 1 FROM template_build_cache c WHERE c.template_id = t.id)")
        .push(" AND NOT EXISTS (SELECT 1 FROM template_tags g WHERE g.template_id = t.id)");
    db.fetch_all(&sql.text, sql.args, from_row).await
}

/// The team's templates made from `sandbox` (fork templates excluded), newest first.
pub async fn made_from(
    db: &Db,
    team: TeamId,
    sandbox: SandboxId,
) -> Result<Vec<Template>, DbError> {
    db.fetch_all(
        &format!(
            "SELECT {COLUMNS} FROM templates WHERE team_id = $1 AND source_sandbox_id = $2 \
             AND ephemeral = $3 ORDER BY created_at DESC, name"
        ),
        args![team, sandbox, false],
        from_row,
    )
    .await
}

/// The hosts holding template `id`'s files, first copied first (the host it was made on
/// leads).
pub async fn holders(db: &Db, id: TemplateId) -> Result<Vec<HostId>, DbError> {
    db.fetch_all(
        "SELECT host_id FROM template_hosts WHERE template_id = $1 ORDER BY created_at, host_id",
        args![id],
        |r| r.id("host_id"),
    )
    .await
}

/// Records that `host` holds template `id`'s files (again is fine).
/// [`DbError::NotFound`] if either is gone.
pub async fn add_holder(db: &Db, id: TemplateId, host: HostId) -> Result<(), DbError> {
    db.execute(
        "INSERT INTO template_hosts (template_id, host_id, created_at) VALUES ($1, $2, $3) \
         ON CONFLICT (template_id, host_id) DO NOTHING",
        args![id, host, now()],
    )
    .await
    .map_err(|e| missing_as_not_found(e, "template or host", id))?;
    Ok(())
}

/// Records that `host` no longer holds template `id`'s files.
pub async fn remove_holder(db: &Db, id: TemplateId, host: HostId) -> Result<(), DbError> {
    db.execute(
        "DELETE FROM template_hosts WHERE template_id = $1 AND host_id = $2",
        args![id, host],
    )
    .await?;
    Ok(())
}

/// Team templates whose files live on hosts (kind either), with their holders; those of
/// the platform team only when `platform_only`.
pub async fn with_holders(
    db: &Db,
    platform_only: bool,
) -> Result<Vec<(Template, Vec<HostId>)>, DbError> {
    let list = if platform_only {
        db.fetch_all(
            &format!(
                "SELECT {COLUMNS} FROM templates WHERE host_id IS NOT NULL AND team_id = $1 \
                 ORDER BY created_at"
            ),
            args![PLATFORM_TEAM],
            from_row,
        )
        .await?
    } else {
        db.fetch_all(
            &format!(
                "SELECT {COLUMNS} FROM templates WHERE host_id IS NOT NULL ORDER BY created_at"
            ),
            args![],
            from_row,
        )
        .await?
    };
    let mut out = Vec::with_capacity(list.len());
    for t in list {
        let h = holders(db, t.id).await?;
        out.push((t, h));
    }
    Ok(out)
}

/// Whether a template with `id` exists.
pub async fn exists(db: &Db, id: TemplateId) -> Result<bool, DbError> {
    Ok(db
        .fetch_optional("SELECT id FROM templates WHERE id = $1", args![id], |r| {
            r.id::<TemplateId>("id")
        })
        .await?
        .is_some())
}
