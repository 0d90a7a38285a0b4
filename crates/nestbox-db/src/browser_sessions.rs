//! `browser_sessions`: the web dashboard's signed-in browsers.
//!
//! A browser holds a random secret in an HttpOnly cookie; only its SHA-256 (hex, computed
//! by the caller) is stored. A session is valid until `expires_at` and while its row
//! exists: signing out deletes it, and deleting the user deletes their sessions.

use chrono::{DateTime, Utc};
use nestbox_types::UserId;

use crate::engine::{Db, args, now};
use crate::error::{DbError, missing_as_not_found};

/// A live session.
#[derive(Debug, Clone, PartialEq)]
pub struct BrowserSession {
    pub user_id: UserId,
    pub created_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
}

/// Stores a session until `expires_at`, and deletes every expired one.
/// [`DbError::NotFound`] if the user does not exist.
pub async fn create(
    db: &Db,
    token_hash: &str,
    user: UserId,
    expires_at: DateTime<Utc>,
) -> Result<BrowserSession, DbError> {
    let created_at = now();
    db.execute(
        "DELETE FROM browser_sessions WHERE expires_at <= $1",
        args![created_at],
    )
    .await?;
    db.execute(
        "INSERT INTO browser_sessions (token_hash, user_id, created_at, expires_at) \
         VALUES ($1, $2, $3, $4)",
        args![token_hash, user, created_at, expires_at],
    )
    .await
    .map_err(|e| missing_as_not_found(e, "user", user))?;
    Ok(BrowserSession {
        user_id: user,
        created_at,
        expires_at,
    })
}

/// The unexpired session with this hash.
pub async fn find(db: &Db, token_hash: &str) -> Result<Option<BrowserSession>, DbError> {
    db.fetch_optional(
        "SELECT user_id, created_at, expires_at FROM browser_sessions \
         WHERE token_hash = $1 AND expires_at > $2",
        args![token_hash, now()],
        |r| {
            Ok(BrowserSession {
                user_id: r.id("user_id")?,
                created_at: r.time("created_at")?,
                expires_at: r.time("expires_at")?,
            })
        },
    )
    .await
}

/// Ends a session; returns whether it existed.
pub async fn delete(db: &Db, token_hash: &str) -> Result<bool, DbError> {
    let n = db
        .execute(
            "DELETE FROM browser_sessions WHERE token_hash = $1",
            args![token_hash],
        )
        .await?;
    Ok(n > 0)
}

/// Ends every session of a user (their account was disabled); returns how many.
pub async fn delete_for_user(db: &Db, user: UserId) -> Result<u64, DbError> {
    db.execute(
        "DELETE FROM browser_sessions WHERE user_id = $1",
        args![user],
    )
    .await
}
