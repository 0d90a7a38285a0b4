//! `template_tags`: other names of a team template's builds, `name:tag`.
//!
//! The tag [`DEFAULT_TAG`] is the visible template called `name` itself
//! ([`crate::templates::get_visible`]) and has no row. Every other tag is a row pointing at a
//! template of the team: the visible one, or a hidden one (`ephemeral`, under an internal
//! name [`hidden_name`] that no valid template name can take). A hidden template is kept
//! while a tag, a sandbox or the step cache holds it ([`crate::templates::unused_ephemeral`]
//! finds it once nothing does).
//!
//! [`assign`] and [`remove`] change a name's tags in one transaction with the team's row
//! locked, so concurrent changes to one team's tags apply one after the other. Moving
//! `default` hides the template that was visible (kept while something holds it) and makes
//! the tag's template visible under `name`.

use chrono::{DateTime, Utc};
use nestbox_types::{PLATFORM_TEAM, TeamId, TemplateId};

use crate::engine::{Conn, Db, args, now};
use crate::error::DbError;
use crate::templates::{COLUMNS, Template, from_row};

pub use nestbox_types::limits::DEFAULT_TAG;

/// A tag of a template name.
#[derive(Debug, Clone, PartialEq)]
pub struct Tag {
    pub tag: String,
    pub template_id: TemplateId,
    pub created_at: DateTime<Utc>,
}

/// The internal name of a hidden build of `name` (`~` never appears in a template name).
pub fn hidden_name(name: &str, id: TemplateId) -> String {
    format!("{name}~{id}")
}

/// The template `team` sees as `name:tag` for a tag other than [`DEFAULT_TAG`]: its own
/// tag, else the platform's.
pub async fn resolve(
    db: &Db,
    team: TeamId,
    name: &str,
    tag: &str,
) -> Result<Option<Template>, DbError> {
    let cols = COLUMNS
        .split(", ")
        .map(|c| format!("t.{c}"))
        .collect::<Vec<_>>()
        .join(", ");
    db.fetch_optional(
        &format!(
            "SELECT {cols} FROM template_tags g JOIN templates t ON t.id = g.template_id \
             WHERE g.name = $2 AND g.tag = $3 AND g.team_id IN ($1, $4) \
             ORDER BY CASE WHEN g.team_id = $1 THEN 0 ELSE 1 END LIMIT 1"
        ),
        args![team, name, tag, PLATFORM_TEAM],
        from_row,
    )
    .await
}

/// The tags of the team's name (other than [`DEFAULT_TAG`]), by tag.
pub async fn list(db: &Db, team: TeamId, name: &str) -> Result<Vec<Tag>, DbError> {
    db.fetch_all(
        "SELECT tag, template_id, created_at FROM template_tags \
         WHERE team_id = $1 AND name = $2 ORDER BY tag",
        args![team, name],
        |r| {
            Ok(Tag {
                tag: r.string("tag")?,
                template_id: r.id("template_id")?,
                created_at: r.time("created_at")?,
            })
        },
    )
    .await
}

/// Whether a tag points at template `id`.
pub async fn is_tagged(db: &Db, id: TemplateId) -> Result<bool, DbError> {
    Ok(db
        .fetch_optional(
            "SELECT tag FROM template_tags WHERE template_id = $1 LIMIT 1",
            args![id],
            |r| r.string("tag"),
        )
        .await?
        .is_some())
}

async fn lock_team(conn: &mut Conn<'_>, team: TeamId) -> Result<(), DbError> {
    conn.execute("UPDATE teams SET name = name WHERE id = $1", args![team])
        .await?;
    Ok(())
}

async fn visible(
    conn: &mut Conn<'_>,
    team: TeamId,
    name: &str,
) -> Result<Option<Template>, DbError> {
    conn.fetch_optional(
        &format!("SELECT {COLUMNS} FROM templates WHERE team_id = $1 AND name = $2"),
        args![team, name],
        from_row,
    )
    .await
}

/// Hides the visible template `t` (kept while a tag or a sandbox holds it).
async fn hide(conn: &mut Conn<'_>, t: &Template) -> Result<(), DbError> {
    conn.execute(
        "UPDATE templates SET name = $2, ephemeral = $3, updated_at = $4 WHERE id = $1",
        args![t.id, hidden_name(&t.name, t.id), true, now()],
    )
    .await?;
    Ok(())
}

/// Gives `tags` of the team's `name` to its template `id` (made for `name`, visible or
/// hidden). [`DEFAULT_TAG`] makes `id` the visible template `name`: the one visible before
/// is hidden. Other tags are pointed at `id`, wherever they pointed before. Returns the
/// templates the tags left (which may be held by nothing now).
/// [`DbError::NotFound`] if `id` is not a template of the team.
pub async fn assign(
    db: &Db,
    team: TeamId,
    name: &str,
    id: TemplateId,
    tags: &[String],
) -> Result<Vec<TemplateId>, DbError> {
    let mut left = Vec::new();
    let mut tx = db.begin().await?;
    let mut conn = tx.conn();
    lock_team(&mut conn, team).await?;
    let target = conn
        .fetch_optional(
            &format!("SELECT {COLUMNS} FROM templates WHERE id = $1 AND team_id = $2"),
            args![id, team],
            from_row,
        )
        .await?
        .ok_or_else(|| DbError::not_found("template", id))?;
    for tag in tags {
        if tag == DEFAULT_TAG {
            if target.name == name && !target.ephemeral {
                continue;
            }
            if let Some(old) = visible(&mut conn, team, name).await? {
                hide(&mut conn, &old).await?;
                left.push(old.id);
            }
            conn.execute(
                "UPDATE templates SET name = $2, ephemeral = $3, updated_at = $4 WHERE id = $1",
                args![id, name, false, now()],
            )
            .await?;
        } else {
            left.extend(tagged(&mut conn, team, name, tag).await?);
            conn.execute(
                "INSERT INTO template_tags (team_id, name, tag, template_id, created_at) \
                 VALUES ($1, $2, $3, $4, $5) \
                 ON CONFLICT (team_id, name, tag) DO UPDATE SET \
                    template_id = excluded.template_id, created_at = excluded.created_at",
                args![team, name, tag.as_str(), id, now()],
            )
            .await?;
        }
    }
    tx.commit().await?;
    left.retain(|t| *t != id);
    Ok(left)
}

async fn tagged(
    conn: &mut Conn<'_>,
    team: TeamId,
    name: &str,
    tag: &str,
) -> Result<Option<TemplateId>, DbError> {
    conn.fetch_optional(
        "SELECT template_id FROM template_tags WHERE team_id = $1 AND name = $2 AND tag = $3",
        args![team, name, tag],
        |r| r.id("template_id"),
    )
    .await
}

/// Takes `tags` off the team's `name`; returns the templates they pointed at (which may be
/// held by nothing now), none if the name had none of them. Taking [`DEFAULT_TAG`] hides
/// the visible template `name` (sandboxes from it carry on; other tags keep it).
pub async fn remove(
    db: &Db,
    team: TeamId,
    name: &str,
    tags: &[String],
) -> Result<Vec<TemplateId>, DbError> {
    let mut tx = db.begin().await?;
    let mut conn = tx.conn();
    lock_team(&mut conn, team).await?;
    let mut left = Vec::new();
    for tag in tags {
        if tag == DEFAULT_TAG {
            if let Some(old) = visible(&mut conn, team, name).await? {
                hide(&mut conn, &old).await?;
                left.push(old.id);
            }
        } else if let Some(id) = tagged(&mut conn, team, name, tag).await? {
            conn.execute(
                "DELETE FROM template_tags WHERE team_id = $1 AND name = $2 AND tag = $3",
                args![team, name, tag.as_str()],
            )
            .await?;
            left.push(id);
        }
    }
    tx.commit().await?;
    Ok(left)
}

/// Takes every tag (other than [`DEFAULT_TAG`]) off the team's `name`; returns the
/// templates they pointed at (which may be held by nothing now).
pub async fn remove_all(db: &Db, team: TeamId, name: &str) -> Result<Vec<TemplateId>, DbError> {
    let mut tx = db.begin().await?;
    let mut conn = tx.conn();
    lock_team(&mut conn, team).await?;
    let left = conn
        .fetch_all(
            "SELECT template_id FROM template_tags WHERE team_id = $1 AND name = $2",
            args![team, name],
            |r| r.id("template_id"),
        )
        .await?;
    conn.execute(
        "DELETE FROM template_tags WHERE team_id = $1 AND name = $2",
        args![team, name],
    )
    .await?;
    tx.commit().await?;
    Ok(left)
}
