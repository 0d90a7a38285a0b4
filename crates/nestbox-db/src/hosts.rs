//! `hosts` and `host_registration_tokens`: machines running the host agent.
//!
//! Host life cycle as stored here:
//!
//! ```text
//! create_pending ──(agent presents one-time token: consume_registration_token)──▶
//! mark_registered → online ⇄ unreachable (heartbeat / mark_stale_unreachable) ──▶ delete
//! ```
//!
//! Invariants: registration tokens and host credentials are stored only as hashes computed by
//! the caller; a registration token is consumed at most once, atomically, and only before it
//! expires. A BYOC host belongs to exactly one team, a regular host to none (schema `CHECK`).
//! Deleting a host deletes its registration tokens and the templates whose files live only on
//! it, and detaches its sandboxes (`host_id` set to NULL).

use chrono::{DateTime, Utc};
use nestbox_types::{HostId, HostStatus, TeamId};
use uuid::Uuid;

use crate::engine::{Db, DbRow, args, now};
use crate::error::{DbError, found, missing_as_not_found};
use crate::model::HostKind;

/// A host.
#[derive(Debug, Clone, PartialEq)]
pub struct Host {
    pub id: HostId,
    pub name: String,
    pub kind: HostKind,
    /// The owning team of a BYOC host; `None` for regular hosts.
    pub team_id: Option<TeamId>,
    pub status: HostStatus,
    /// The agent's gRPC URL, known once registered.
    pub address: Option<String>,
    /// The agent's version, known once registered.
    pub version: Option<String>,
    pub specs: HostSpecs,
    /// The memory backing guest RAM on the host, as its agent last reported it.
    pub guest_memory: Option<GuestMemory>,
    /// Cordoned: it takes no new sandboxes.
    pub draining: bool,
    pub last_heartbeat_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// What a host offers. Zero until the agent registers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HostSpecs {
    pub vcpus: u32,
    pub memory_mb: u32,
    pub disk_mb: u32,
    /// Upper bound of concurrent sandboxes; `None` = no explicit limit.
    pub max_sandboxes: Option<u32>,
}

/// The memory that backs guest RAM on a host (its agent's tmpfs), MiB.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GuestMemory {
    /// Its size.
    pub total_mb: u32,
    /// What the host's sandboxes hold of it.
    pub used_mb: u32,
}

/// What [`create_pending`] needs.
#[derive(Debug, Clone)]
pub struct NewHost {
    pub name: String,
    pub kind: HostKind,
    /// Required for [`HostKind::Byoc`], must be `None` for [`HostKind::Regular`].
    pub team_id: Option<TeamId>,
}

/// What an agent reports when it registers.
#[derive(Debug, Clone)]
pub struct Registration {
    pub address: String,
    pub version: String,
    pub specs: HostSpecs,
    /// The host's first credential pair (any pair it held before is revoked).
    pub credentials: crate::host_credentials::NewPair,
}

const COLUMNS: &str = "id, name, kind, team_id, status, address, version, vcpus, memory_mb, \
                       disk_mb, max_sandboxes, guest_memory_mb, guest_memory_used_mb, draining, \
                       last_heartbeat_at, created_at, updated_at";

fn from_row(r: &dyn DbRow) -> Result<Host, DbError> {
    Ok(Host {
        id: r.id("id")?,
        name: r.string("name")?,
        kind: r.parse("kind")?,
        team_id: r.id_opt("team_id")?,
        status: r.parse("status")?,
        address: r.string_opt("address")?,
        version: r.string_opt("version")?,
        specs: HostSpecs {
            vcpus: r.u32("vcpus")?,
            memory_mb: r.u32("memory_mb")?,
            disk_mb: r.u32("disk_mb")?,
            max_sandboxes: r.u32_opt("max_sandboxes")?,
        },
        guest_memory: match (
            r.u32_opt("guest_memory_mb")?,
            r.u32_opt("guest_memory_used_mb")?,
        ) {
            (Some(total_mb), Some(used_mb)) => Some(GuestMemory { total_mb, used_mb }),
            _ => None,
        },
        draining: r.bool("draining")?,
        last_heartbeat_at: r.time_opt("last_heartbeat_at")?,
        created_at: r.time("created_at")?,
        updated_at: r.time("updated_at")?,
    })
}

/// Creates a `pending` host and its first one-time registration token, in one transaction.
/// [`DbError::NotFound`] if the BYOC team does not exist; a schema `CHECK` rejects a BYOC
/// host without a team and a regular host with one.
pub async fn create_pending(
    db: &Db,
    new: &NewHost,
    token_hash: &str,
    token_expires_at: DateTime<Utc>,
) -> Result<Host, DbError> {
    let id = HostId::new();
    let at = now();
    let mut tx = db.begin().await?;
    let host = tx
        .conn()
        .fetch_one(
            &format!(
                "INSERT INTO hosts (id, name, kind, team_id, status, created_at, updated_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, $6) RETURNING {COLUMNS}"
            ),
            args![
                id,
                &new.name,
                new.kind,
                new.team_id,
                HostStatus::Pending,
                at
            ],
            from_row,
        )
        .await
        .map_err(|e| missing_as_not_found(e, "team", format_team(new.team_id)))?;
    insert_token(&mut tx.conn(), id, token_hash, token_expires_at, at).await?;
    tx.commit().await?;
    Ok(host)
}

/// Issues another one-time registration token for an existing host (e.g. the first expired).
pub async fn create_registration_token(
    db: &Db,
    host: HostId,
    token_hash: &str,
    expires_at: DateTime<Utc>,
) -> Result<(), DbError> {
    insert_token(
        &mut db.acquire().await?.conn(),
        host,
        token_hash,
        expires_at,
        now(),
    )
    .await
    .map_err(|e| missing_as_not_found(e, "host", host))
}

async fn insert_token(
    conn: &mut crate::engine::Conn<'_>,
    host: HostId,
    token_hash: &str,
    expires_at: DateTime<Utc>,
    at: DateTime<Utc>,
) -> Result<(), DbError> {
    conn.execute(
        "INSERT INTO host_registration_tokens (id, host_id, token_hash, expires_at, created_at) \
         VALUES ($1, $2, $3, $4, $5)",
        args![Uuid::new_v4(), host, token_hash, expires_at, at],
    )
    .await
    .map(drop)
}

/// Consumes a registration token: atomically marks it used if it is unused and unexpired, and
/// returns its host. `None` if the token is unknown, already used or expired (the caller
/// cannot tell which, and should not tell the agent either).
pub async fn consume_registration_token(
    db: &Db,
    token_hash: &str,
) -> Result<Option<Host>, DbError> {
    let mut conn = db.acquire().await?;
    let host_id: Option<HostId> = conn
        .conn()
        .fetch_optional(
            "UPDATE host_registration_tokens SET used_at = $2 \
             WHERE token_hash = $1 AND used_at IS NULL AND expires_at > $2 RETURNING host_id",
            args![token_hash, now()],
            |r| r.id("host_id"),
        )
        .await?;
    let Some(host_id) = host_id else {
        return Ok(None);
    };
    conn.conn()
        .fetch_optional(
            &format!("SELECT {COLUMNS} FROM hosts WHERE id = $1"),
            args![host_id],
            from_row,
        )
        .await
}

/// Records a successful registration: address, specs, version and the first credential
/// pair (revoking any the host held); the host becomes `online` with a fresh heartbeat.
pub async fn mark_registered(db: &Db, id: HostId, reg: &Registration) -> Result<Host, DbError> {
    let at = now();
    let mut tx = db.begin().await?;
    let mut conn = tx.conn();
    let host = conn
        .fetch_optional(
            &format!(
                "UPDATE hosts SET address = $2, version = $3, vcpus = $4, memory_mb = $5, \
                 disk_mb = $6, max_sandboxes = $7, token_hash = NULL, status = $8, \
                 last_heartbeat_at = $9, updated_at = $9 WHERE id = $1 RETURNING {COLUMNS}"
            ),
            args![
                id,
                &reg.address,
                &reg.version,
                reg.specs.vcpus,
                reg.specs.memory_mb,
                reg.specs.disk_mb,
                reg.specs.max_sandboxes,
                HostStatus::Online,
                at,
            ],
            from_row,
        )
        .await?
        .ok_or_else(|| DbError::not_found("host", id))?;
    crate::host_credentials::issue_first(&mut conn, id, &reg.credentials, at).await?;
    tx.commit().await?;
    Ok(host)
}

/// The host whose first-version credential (a long-lived token, before token pairs) has
/// this hash. Hosts registered since hold pairs (`host_credentials`) and have none.
pub async fn find_by_legacy_token_hash(db: &Db, token_hash: &str) -> Result<Option<Host>, DbError> {
    db.fetch_optional(
        &format!("SELECT {COLUMNS} FROM hosts WHERE token_hash = $1"),
        args![token_hash],
        from_row,
    )
    .await
}

/// Records a heartbeat: the host is `online` as of now, with the guest memory its agent
/// reported (if it did). Returns `true` when it was not online before (it just came back),
/// so the caller can reconcile its sandboxes.
pub async fn heartbeat(db: &Db, id: HostId, memory: Option<GuestMemory>) -> Result<bool, DbError> {
    let at = now();
    // SET expressions see the old row: `updated_at` moves only when the status changes.
    let changed_at = db
        .fetch_optional(
            "UPDATE hosts SET status = $3, last_heartbeat_at = $2, \
             guest_memory_mb = $4, guest_memory_used_mb = $5, \
             updated_at = CASE WHEN status <> $3 THEN $2 ELSE updated_at END \
             WHERE id = $1 RETURNING updated_at",
            args![
                id,
                at,
                HostStatus::Online,
                memory.map(|m| m.total_mb),
                memory.map(|m| m.used_mb)
            ],
            |r| r.time("updated_at"),
        )
        .await?
        .ok_or_else(|| DbError::not_found("host", id))?;
    Ok(changed_at == at)
}

/// Cordons a host (it takes no new sandboxes) or lets it take them again.
pub async fn set_draining(db: &Db, id: HostId, draining: bool) -> Result<Host, DbError> {
    db.fetch_optional(
        &format!(
            "UPDATE hosts SET draining = $2, updated_at = $3 WHERE id = $1 RETURNING {COLUMNS}"
        ),
        args![id, draining, now()],
        from_row,
    )
    .await?
    .ok_or_else(|| DbError::not_found("host", id))
}

/// The host with `id`.
pub async fn get(db: &Db, id: HostId) -> Result<Host, DbError> {
    db.fetch_optional(
        &format!("SELECT {COLUMNS} FROM hosts WHERE id = $1"),
        args![id],
        from_row,
    )
    .await?
    .ok_or_else(|| DbError::not_found("host", id))
}

/// Every host, oldest first.
pub async fn list(db: &Db) -> Result<Vec<Host>, DbError> {
    db.fetch_all(
        &format!("SELECT {COLUMNS} FROM hosts ORDER BY created_at, id"),
        args![],
        from_row,
    )
    .await
}

/// The BYOC hosts of a team, oldest first.
pub async fn list_for_team(db: &Db, team: TeamId) -> Result<Vec<Host>, DbError> {
    db.fetch_all(
        &format!("SELECT {COLUMNS} FROM hosts WHERE team_id = $1 ORDER BY created_at, id"),
        args![team],
        from_row,
    )
    .await
}

/// Hosts that are `online`, oldest first (a stable order for round-robin scheduling).
pub async fn list_online(db: &Db) -> Result<Vec<Host>, DbError> {
    db.fetch_all(
        &format!("SELECT {COLUMNS} FROM hosts WHERE status = $1 ORDER BY created_at, id"),
        args![HostStatus::Online],
        from_row,
    )
    .await
}

/// Marks `online` hosts whose last heartbeat is older than `older_than` as `unreachable`, in
/// one statement; returns their ids.
pub async fn mark_stale_unreachable(
    db: &Db,
    older_than: DateTime<Utc>,
) -> Result<Vec<HostId>, DbError> {
    db.fetch_all(
        "UPDATE hosts SET status = $3, updated_at = $4 \
         WHERE status = $2 AND (last_heartbeat_at IS NULL OR last_heartbeat_at < $1) \
         RETURNING id",
        args![
            older_than,
            HostStatus::Online,
            HostStatus::Unreachable,
            now()
        ],
        |r| r.id("id"),
    )
    .await
}

/// Deletes a host; returns whether it existed. Cascades as described in the module docs.
pub async fn delete(db: &Db, id: HostId) -> Result<bool, DbError> {
    let mut tx = db.begin().await?;
    // Templates made here and copied elsewhere live on at another holder.
    tx.conn()
        .execute(
            "UPDATE templates SET host_id = ( \
                SELECT th.host_id FROM template_hosts th \
                WHERE th.template_id = templates.id AND th.host_id <> $1 \
                ORDER BY th.created_at, th.host_id LIMIT 1) \
             WHERE host_id = $1 AND EXISTS ( \
                SELECT 1 FROM template_hosts th \
                WHERE th.template_id = templates.id AND th.host_id <> $1)",
            args![id],
        )
        .await?;
    let n = tx
        .conn()
        .execute("DELETE FROM hosts WHERE id = $1", args![id])
        .await?;
    tx.commit().await?;
    Ok(n > 0)
}

/// Sets a host's status directly (e.g. an admin draining it back to `pending`).
pub async fn set_status(db: &Db, id: HostId, status: HostStatus) -> Result<(), DbError> {
    let n = db
        .execute(
            "UPDATE hosts SET status = $2, updated_at = $3 WHERE id = $1",
            args![id, status, now()],
        )
        .await?;
    found(n, "host", id)
}

/// Records where a registered host's agent now listens and which version it runs (an agent
/// that restarted may listen elsewhere). Returns whether anything changed.
pub async fn update_endpoint(
    db: &Db,
    id: HostId,
    address: &str,
    version: &str,
) -> Result<bool, DbError> {
    let n = db
        .execute(
            "UPDATE hosts SET address = $2, version = $3, updated_at = $4 \
             WHERE id = $1 AND (address IS NULL OR address <> $2 OR version IS NULL OR version <> $3)",
            args![id, address, version, now()],
        )
        .await?;
    Ok(n > 0)
}

fn format_team(team: Option<TeamId>) -> String {
    team.map(|t| t.to_string()).unwrap_or_default()
}
