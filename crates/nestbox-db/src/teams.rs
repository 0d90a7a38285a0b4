//! `teams` and `team_members`: who belongs to which team, with which role.
//!
//! Invariants (enforced by the schema, relied on here):
//! - a team has at most one `owner` (partial unique index); transferring ownership means
//!   demoting the old owner before promoting the new one;
//! - a user has at most one default team (partial unique index). A membership becomes the
//!   default when it is created while the user has no default; soft-deleting a team clears the
//!   default flag of its memberships;
//! - soft-deleted teams (`deleted_at` set) are invisible to every read here, and members cannot
//!   be added to them. Rows of deleted teams are kept.

use chrono::{DateTime, Utc};
use nestbox_types::{TeamId, TeamRole, UserId};

use crate::engine::{Db, DbRow, args, now};
use crate::error::{DbError, found, missing_as_not_found};
use crate::page::{Page, Paged, Sql, finish_page};
use crate::users::{self, User};

/// A team.
#[derive(Debug, Clone, PartialEq)]
pub struct Team {
    pub id: TeamId,
    pub name: String,
    /// Whether the team may bring its own hosts.
    pub is_byoc: bool,
    pub created_at: DateTime<Utc>,
}

/// A team as seen by one of its members.
#[derive(Debug, Clone, PartialEq)]
pub struct UserTeam {
    pub team: Team,
    pub role: TeamRole,
    pub is_default: bool,
}

/// A member of a team.
#[derive(Debug, Clone, PartialEq)]
pub struct Member {
    pub user: User,
    pub role: TeamRole,
    pub is_default: bool,
    /// When the user joined the team.
    pub joined_at: DateTime<Utc>,
}

const TEAM_COLUMNS: &str = "t.id, t.name, t.is_byoc, t.created_at";

pub(crate) fn team_from_row(r: &dyn DbRow) -> Result<Team, DbError> {
    Ok(Team {
        id: r.id("id")?,
        name: r.string("name")?,
        is_byoc: r.bool("is_byoc")?,
        created_at: r.time("created_at")?,
    })
}

fn user_team_from_row(r: &dyn DbRow) -> Result<UserTeam, DbError> {
    Ok(UserTeam {
        team: team_from_row(r)?,
        role: r.parse("role")?,
        is_default: r.bool("is_default")?,
    })
}

/// Whether `user` currently has a default team; used as the `is_default` of a new membership.
const NO_DEFAULT_YET: &str =
    "NOT EXISTS (SELECT 1 FROM team_members d WHERE d.user_id = $2 AND d.is_default)";

/// Creates a team with `owner` as its owner, in one transaction. The membership is the
/// owner's default team when they have none yet (e.g. their first team).
pub async fn create_with_owner(db: &Db, name: &str, owner: UserId) -> Result<Team, DbError> {
    let id = TeamId::new();
    let at = now();
    let mut tx = db.begin().await?;
    let team = tx
        .conn()
        .fetch_one(
            "INSERT INTO teams (id, name, is_byoc, created_at) VALUES ($1, $2, $3, $4) \
             RETURNING id, name, is_byoc, created_at",
            args![id, name, false, at],
            team_from_row,
        )
        .await?;
    tx.conn()
        .execute(
            &format!(
                "INSERT INTO team_members (team_id, user_id, role, is_default, created_at) \
                 VALUES ($1, $2, $3, {NO_DEFAULT_YET}, $4)"
            ),
            args![id, owner, TeamRole::Owner, at],
        )
        .await
        .map_err(|e| missing_as_not_found(e, "user", owner))?;
    tx.commit().await?;
    Ok(team)
}

/// The team with `id`, unless it is soft-deleted.
pub async fn get(db: &Db, id: TeamId) -> Result<Team, DbError> {
    db.fetch_optional(
        &format!("SELECT {TEAM_COLUMNS} FROM teams t WHERE t.id = $1 AND t.deleted_at IS NULL"),
        args![id],
        team_from_row,
    )
    .await?
    .ok_or_else(|| DbError::not_found("team", id))
}

/// The teams `user` belongs to, with their role, oldest membership first.
pub async fn list_for_user(db: &Db, user: UserId) -> Result<Vec<UserTeam>, DbError> {
    db.fetch_all(
        &format!(
            "SELECT {TEAM_COLUMNS}, m.role, m.is_default FROM team_members m \
             JOIN teams t ON t.id = m.team_id \
             WHERE m.user_id = $1 AND t.deleted_at IS NULL \
             ORDER BY m.created_at, t.id"
        ),
        args![user],
        user_team_from_row,
    )
    .await
}

/// The team a user works in when they do not say: their default team, else their oldest
/// membership. `None` when they belong to no (live) team.
pub async fn default_team_for_user(db: &Db, user: UserId) -> Result<Option<UserTeam>, DbError> {
    db.fetch_optional(
        &format!(
            "SELECT {TEAM_COLUMNS}, m.role, m.is_default FROM team_members m \
             JOIN teams t ON t.id = m.team_id \
             WHERE m.user_id = $1 AND t.deleted_at IS NULL \
             ORDER BY m.is_default DESC, m.created_at, t.id LIMIT 1"
        ),
        args![user],
        user_team_from_row,
    )
    .await
}

/// Renames a live team.
pub async fn rename(db: &Db, id: TeamId, name: &str) -> Result<(), DbError> {
    let n = db
        .execute(
            "UPDATE teams SET name = $2 WHERE id = $1 AND deleted_at IS NULL",
            args![id, name],
        )
        .await?;
    found(n, "team", id)
}

/// Marks whether a live team may bring its own hosts.
pub async fn set_byoc(db: &Db, id: TeamId, is_byoc: bool) -> Result<(), DbError> {
    let n = db
        .execute(
            "UPDATE teams SET is_byoc = $2 WHERE id = $1 AND deleted_at IS NULL",
            args![id, is_byoc],
        )
        .await?;
    found(n, "team", id)
}

/// Stops a live team from bringing its own hosts, unless it still has some: `Ok(false)`
/// then (its hosts must be deleted first), in the same statement.
pub async fn disable_byoc(db: &Db, id: TeamId) -> Result<bool, DbError> {
    let n = db
        .execute(
            "UPDATE teams SET is_byoc = FALSE WHERE id = $1 AND deleted_at IS NULL \
             AND NOT EXISTS (SELECT 1 FROM hosts h WHERE h.team_id = $1)",
            args![id],
        )
        .await?;
    if n == 1 {
        return Ok(true);
    }
    get(db, id).await.map(|_| false)
}

/// A team as platform admins see it in the list of every team.
#[derive(Debug, Clone, PartialEq)]
pub struct TeamSummary {
    pub team: Team,
    /// Its members.
    pub members: u64,
    /// Its BYOC hosts.
    pub hosts: u64,
}

/// Every live team but the platform's, newest first, a page at a time.
pub async fn list_all(db: &Db, page: &Page) -> Result<Paged<TeamSummary>, DbError> {
    let mut sql = Sql::new(&format!(
        "SELECT {TEAM_COLUMNS}, \
         (SELECT COUNT(*) FROM team_members m WHERE m.team_id = t.id) AS members, \
         (SELECT COUNT(*) FROM hosts h WHERE h.team_id = t.id) AS hosts \
         FROM teams t WHERE t.deleted_at IS NULL AND t.id <> "
    ));
    sql.bind(nestbox_types::PLATFORM_TEAM);
    sql.page("t", page)?;
    let rows = db
        .fetch_all(&sql.text, sql.args, |r| {
            Ok(TeamSummary {
                team: team_from_row(r)?,
                members: r.u64("members")?,
                hosts: r.u64("hosts")?,
            })
        })
        .await?;
    Ok(finish_page(rows, page.effective_limit(), |t| {
        (t.team.created_at, t.team.id.uuid())
    }))
}

/// Soft-deletes a team (one transaction): sets `deleted_at` and clears the default flag of its
/// memberships, so its members get a new default with their next team. [`DbError::NotFound`]
/// if the team does not exist or is already deleted.
pub async fn soft_delete(db: &Db, id: TeamId) -> Result<(), DbError> {
    let mut tx = db.begin().await?;
    let n = tx
        .conn()
        .execute(
            "UPDATE teams SET deleted_at = $2 WHERE id = $1 AND deleted_at IS NULL",
            args![id, now()],
        )
        .await?;
    found(n, "team", id)?;
    tx.conn()
        .execute(
            "UPDATE team_members SET is_default = $2 WHERE team_id = $1",
            args![id, false],
        )
        .await?;
    tx.commit().await
}

/// Adds `user` to a live team with `role`; it becomes their default team if they have none.
/// [`DbError::NotFound`] for a missing or deleted team or a missing user,
/// [`DbError::Conflict`] if already a member (or a second owner).
pub async fn add_member(
    db: &Db,
    team: TeamId,
    user: UserId,
    role: TeamRole,
) -> Result<(), DbError> {
    let n = db
        .execute(
            &format!(
                "INSERT INTO team_members (team_id, user_id, role, is_default, created_at) \
                 SELECT $1, $2, $3, {NO_DEFAULT_YET}, $4 FROM teams \
                 WHERE id = $1 AND deleted_at IS NULL"
            ),
            args![team, user, role, now()],
        )
        .await
        .map_err(|e| missing_as_not_found(e, "user", user))?;
    found(n, "team", team)
}

/// Changes a member's role. [`DbError::NotFound`] if `user` is not a member,
/// [`DbError::Conflict`] when promoting a second owner.
pub async fn set_role(db: &Db, team: TeamId, user: UserId, role: TeamRole) -> Result<(), DbError> {
    let n = db
        .execute(
            "UPDATE team_members SET role = $3 WHERE team_id = $1 AND user_id = $2",
            args![team, user, role],
        )
        .await?;
    found(n, "team member", user)
}

/// Removes a membership; returns whether there was one.
pub async fn remove_member(db: &Db, team: TeamId, user: UserId) -> Result<bool, DbError> {
    let n = db
        .execute(
            "DELETE FROM team_members WHERE team_id = $1 AND user_id = $2",
            args![team, user],
        )
        .await?;
    Ok(n > 0)
}

/// `user`'s role in a live team, or `None` if they are not a member (or the team is deleted).
pub async fn membership(db: &Db, team: TeamId, user: UserId) -> Result<Option<TeamRole>, DbError> {
    db.fetch_optional(
        "SELECT m.role FROM team_members m JOIN teams t ON t.id = m.team_id \
         WHERE m.team_id = $1 AND m.user_id = $2 AND t.deleted_at IS NULL",
        args![team, user],
        |r| r.parse("role"),
    )
    .await
}

/// The members of a team, in joining order.
pub async fn list_members(db: &Db, team: TeamId) -> Result<Vec<Member>, DbError> {
    let columns = "u.id, u.email, u.name, u.password_hash, u.is_admin, u.status, u.created_at, \
                   u.updated_at, m.role, m.is_default, m.created_at AS joined_at";
    db.fetch_all(
        &format!(
            "SELECT {columns} FROM team_members m JOIN users u ON u.id = m.user_id \
             WHERE m.team_id = $1 ORDER BY m.created_at, u.id"
        ),
        args![team],
        |r| {
            Ok(Member {
                user: users::from_row(r)?,
                role: r.parse("role")?,
                is_default: r.bool("is_default")?,
                joined_at: r.time("joined_at")?,
            })
        },
    )
    .await
}
