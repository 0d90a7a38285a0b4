//! `host_credentials`: the access/refresh token pairs a host agent holds.
//!
//! Each row is one pair: an access token (a JWT signed by the control plane whose `jti` is
//! the row's id; only its expiry is kept here) and a refresh token (kept as a hash computed
//! by the caller). Life cycle of a pair:
//!
//! ```text
//! issued ──(heartbeat with its access token, or a refresh with it)──▶ confirmed
//! issued/confirmed ──(refresh with its refresh token)──▶ revoked `rotated` (a child is issued)
//! issued child of a rotated pair ──(the parent replayed before the child was confirmed)──▶
//!     revoked `replaced` (another child is issued)
//! ```
//!
//! Invariants:
//! - A host holds at most one pair that is not revoked ([`refresh`] revokes before it issues,
//!   in one transaction, and a concurrent refresh with the same token finds it revoked).
//! - A rotated pair can be refreshed again only while its child was never seen in use: an
//!   agent that crashed after the control plane issued a pair but before storing it is not
//!   locked out, while a refresh token replayed after its successor was used is refused.
//! - Deleting a host deletes its pairs (`ON DELETE CASCADE`): every token it holds stops
//!   working at once. Registering again revokes the pairs it held before.

use chrono::{DateTime, Utc};
use nestbox_types::HostId;
use uuid::Uuid;

use crate::engine::{Conn, Db, args, now};
use crate::error::DbError;

/// A pair to issue.
#[derive(Debug, Clone)]
pub struct NewPair {
    /// The pair's id (the access token's `jti`).
    pub id: Uuid,
    /// Hash of the refresh token.
    pub refresh_hash: String,
    /// When the access token expires.
    pub access_expires_at: DateTime<Utc>,
    /// When the refresh token expires.
    pub refresh_expires_at: DateTime<Utc>,
}

/// What a refresh came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refresh {
    /// The pair was issued to this host.
    Issued(HostId),
    /// No pair has this refresh token.
    Unknown,
    /// The refresh token of this host's pair has expired.
    Expired(HostId),
    /// The refresh token was revoked (rotated and its successor seen in use, or revoked
    /// otherwise): a replay, refused. Names the pair.
    Reused {
        /// The host it was issued to.
        host: HostId,
        /// The pair.
        pair: Uuid,
    },
}

/// Why an access token is not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccessCheck {
    /// The pair is the host's current one.
    Valid,
    /// No such pair for this host (never issued, or the host was deleted).
    Unknown,
    /// The pair was revoked (refreshed since, or replaced).
    Revoked,
}

async fn insert(
    conn: &mut Conn<'_>,
    host: HostId,
    parent: Option<Uuid>,
    pair: &NewPair,
    at: DateTime<Utc>,
) -> Result<(), DbError> {
    // Pairs whose refresh token has expired can never be used again: forget them.
    conn.execute(
        "DELETE FROM host_credentials WHERE host_id = $1 AND refresh_expires_at < $2",
        args![host, at],
    )
    .await?;
    conn.execute(
        "INSERT INTO host_credentials (id, host_id, refresh_hash, parent_id, access_expires_at, \
         refresh_expires_at, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7)",
        args![
            pair.id,
            host,
            &pair.refresh_hash,
            parent,
            pair.access_expires_at,
            pair.refresh_expires_at,
            at
        ],
    )
    .await
    .map(drop)
}

/// Issues the first pair of a (re-)registration, revoking every pair the host held.
pub(crate) async fn issue_first(
    conn: &mut Conn<'_>,
    host: HostId,
    pair: &NewPair,
    at: DateTime<Utc>,
) -> Result<(), DbError> {
    conn.execute(
        "UPDATE host_credentials SET revoked_at = $2, revoked_reason = 'replaced' \
         WHERE host_id = $1 AND revoked_at IS NULL",
        args![host, at],
    )
    .await?;
    insert(conn, host, None, pair, at).await
}

/// Trades a refresh token (by hash) for `next`, in one transaction. See the module docs for
/// when a rotated token is accepted again. A host credential of the first version (the
/// long-lived token in `hosts.token_hash`) is accepted once, as a refresh token.
pub async fn refresh(db: &Db, refresh_hash: &str, next: &NewPair) -> Result<Refresh, DbError> {
    let at = now();
    let mut tx = db.begin().await?;
    let mut conn = tx.conn();
    let found = conn
        .fetch_optional(
            "SELECT id, host_id, refresh_expires_at, revoked_at, revoked_reason \
             FROM host_credentials WHERE refresh_hash = $1",
            args![refresh_hash],
            |r| {
                Ok((
                    r.uuid("id")?,
                    r.id::<HostId>("host_id")?,
                    r.time("refresh_expires_at")?,
                    r.time_opt("revoked_at")?,
                    r.string_opt("revoked_reason")?,
                ))
            },
        )
        .await?;
    let Some((pair, host, expires_at, revoked_at, reason)) = found else {
        // A credential of the first version: trade it once for a pair.
        let legacy: Option<HostId> = conn
            .fetch_optional(
                "UPDATE hosts SET token_hash = NULL WHERE token_hash = $1 RETURNING id",
                args![refresh_hash],
                |r| r.id("id"),
            )
            .await?;
        let Some(host) = legacy else {
            return Ok(Refresh::Unknown);
        };
        issue_first(&mut conn, host, next, at).await?;
        tx.commit().await?;
        return Ok(Refresh::Issued(host));
    };
    if expires_at <= at {
        return Ok(Refresh::Expired(host));
    }
    let reused = Refresh::Reused { host, pair };
    if revoked_at.is_none() {
        // The current pair: revoke it (conditionally, so that of two concurrent refreshes
        // with it only one wins), then issue its child.
        let n = conn
            .execute(
                "UPDATE host_credentials SET revoked_at = $2, revoked_reason = 'rotated', \
                 confirmed_at = COALESCE(confirmed_at, $2) WHERE id = $1 AND revoked_at IS NULL",
                args![pair, at],
            )
            .await?;
        if n != 1 {
            return Ok(reused);
        }
    } else if reason.as_deref() == Some("rotated") {
        // Its child was issued but perhaps never received: if nothing ever used the child,
        // replace it.
        let n = conn
            .execute(
                "UPDATE host_credentials SET revoked_at = $2, revoked_reason = 'replaced' \
                 WHERE parent_id = $1 AND revoked_at IS NULL AND confirmed_at IS NULL",
                args![pair, at],
            )
            .await?;
        if n != 1 {
            return Ok(reused);
        }
    } else {
        return Ok(reused);
    }
    insert(&mut conn, host, Some(pair), next, at).await?;
    tx.commit().await?;
    Ok(Refresh::Issued(host))
}

/// Checks that `pair` is `host`'s current pair and marks it confirmed (seen in use). The
/// access token's own signature and expiry are the caller's to check.
pub async fn check_access(db: &Db, host: HostId, pair: Uuid) -> Result<AccessCheck, DbError> {
    let found = db
        .fetch_optional(
            "SELECT revoked_at, confirmed_at FROM host_credentials WHERE id = $1 AND host_id = $2",
            args![pair, host],
            |r| Ok((r.time_opt("revoked_at")?, r.time_opt("confirmed_at")?)),
        )
        .await?;
    match found {
        None => Ok(AccessCheck::Unknown),
        Some((Some(_), _)) => Ok(AccessCheck::Revoked),
        Some((None, confirmed)) => {
            if confirmed.is_none() {
                db.execute(
                    "UPDATE host_credentials SET confirmed_at = $2 \
                     WHERE id = $1 AND confirmed_at IS NULL",
                    args![pair, now()],
                )
                .await?;
            }
            Ok(AccessCheck::Valid)
        }
    }
}
