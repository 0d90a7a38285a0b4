//! `api_keys`: team API keys.
//!
//! The key itself is never stored: only its SHA-256 (hex, computed by the caller) and a short
//! prefix for display. Lookups by hash only find keys of live (not soft-deleted) teams.

use chrono::{DateTime, Utc};
use nestbox_types::{ApiKeyId, TeamId, UserId};

use crate::engine::{Db, DbRow, args, now};
use crate::error::{DbError, missing_as_not_found};
use crate::teams::Team;

/// An API key's record (never the key).
#[derive(Debug, Clone, PartialEq)]
pub struct ApiKey {
    pub id: ApiKeyId,
    pub team_id: TeamId,
    pub name: String,
    /// The first characters of the key, shown in lists.
    pub prefix: String,
    /// `None` once the creating user is deleted.
    pub created_by: Option<UserId>,
    pub created_at: DateTime<Utc>,
    pub last_used_at: Option<DateTime<Utc>>,
}

/// What [`create`] needs.
#[derive(Debug, Clone)]
pub struct NewApiKey {
    pub team_id: TeamId,
    pub name: String,
    pub prefix: String,
    /// Lower-case hex SHA-256 of the key.
    pub key_hash: String,
    pub created_by: Option<UserId>,
}

const COLUMNS: &str =
    "k.id, k.team_id, k.name, k.prefix, k.created_by, k.created_at, k.last_used_at";

fn from_row(r: &dyn DbRow) -> Result<ApiKey, DbError> {
    Ok(ApiKey {
        id: r.id("id")?,
        team_id: r.id("team_id")?,
        name: r.string("name")?,
        prefix: r.string("prefix")?,
        created_by: r.id_opt("created_by")?,
        created_at: r.time("created_at")?,
        last_used_at: r.time_opt("last_used_at")?,
    })
}

/// Stores a key. [`DbError::Conflict`] if the hash exists, [`DbError::NotFound`] if the team
/// does not.
pub async fn create(db: &Db, new: &NewApiKey) -> Result<ApiKey, DbError> {
    let id = ApiKeyId::new();
    db.execute(
        "INSERT INTO api_keys (id, team_id, name, prefix, key_hash, created_by, created_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
        args![
            id,
            new.team_id,
            &new.name,
            &new.prefix,
            &new.key_hash,
            new.created_by,
            now()
        ],
    )
    .await
    .map_err(|e| missing_as_not_found(e, "team or user", new.team_id))?;
    get(db, new.team_id, id)
        .await?
        .ok_or_else(|| DbError::not_found("API key", id))
}

/// The key with this hash and its team, if the team is live.
pub async fn find_by_hash(db: &Db, key_hash: &str) -> Result<Option<(ApiKey, Team)>, DbError> {
    db.fetch_optional(
        &format!(
            "SELECT {COLUMNS}, t.name AS team_name, t.is_byoc AS team_is_byoc, \
                    t.created_at AS team_created_at \
             FROM api_keys k JOIN teams t ON t.id = k.team_id \
             WHERE k.key_hash = $1 AND t.deleted_at IS NULL"
        ),
        args![key_hash],
        |r| {
            let key = from_row(r)?;
            let team = Team {
                id: key.team_id,
                name: r.string("team_name")?,
                is_byoc: r.bool("team_is_byoc")?,
                created_at: r.time("team_created_at")?,
            };
            Ok((key, team))
        },
    )
    .await
}

/// Records that the key was just used.
pub async fn touch_last_used(db: &Db, id: ApiKeyId) -> Result<(), DbError> {
    db.execute(
        "UPDATE api_keys SET last_used_at = $2 WHERE id = $1",
        args![id, now()],
    )
    .await?;
    Ok(())
}

/// One key of a team.
pub async fn get(db: &Db, team: TeamId, id: ApiKeyId) -> Result<Option<ApiKey>, DbError> {
    db.fetch_optional(
        &format!("SELECT {COLUMNS} FROM api_keys k WHERE k.team_id = $1 AND k.id = $2"),
        args![team, id],
        from_row,
    )
    .await
}

/// The keys of a team, oldest first.
pub async fn list_for_team(db: &Db, team: TeamId) -> Result<Vec<ApiKey>, DbError> {
    db.fetch_all(
        &format!(
            "SELECT {COLUMNS} FROM api_keys k WHERE k.team_id = $1 ORDER BY k.created_at, k.id"
        ),
        args![team],
        from_row,
    )
    .await
}

/// Deletes a team's key; returns whether it existed (another team's key is never deleted).
pub async fn delete(db: &Db, team: TeamId, id: ApiKeyId) -> Result<bool, DbError> {
    let n = db
        .execute(
            "DELETE FROM api_keys WHERE team_id = $1 AND id = $2",
            args![team, id],
        )
        .await?;
    Ok(n > 0)
}
