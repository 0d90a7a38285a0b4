//! The service layer: every business rule of the control plane, one module per resource.
//!
//! Handlers (in [`crate::api`]) only parse requests, call a service operation and map its
//! result; background jobs call the same operations. Each operation takes the [`Caller`]
//! (or an internal actor), checks what it may do, validates input, changes state, and
//! writes an audit entry for every change.

pub mod auditlog;
pub mod builds;
pub mod copies;
pub mod egress;
pub mod fork;
pub mod hosts;
pub mod images;
pub mod lifetime;
pub mod logs;
pub mod metrics;
pub mod moves;
pub mod pause;
pub mod processes;
pub mod sandboxes;
pub mod tags;
pub mod teams;
pub mod templates;
pub mod tokens;
pub mod users;

use nestbox_db::{ActorType, AuditStatus, audit};
use nestbox_types::TeamId;

use crate::error::ApiError;
use crate::extract::Caller;
use crate::state::Services;

/// Who an audit entry is attributed to.
#[derive(Debug, Clone)]
pub enum AuditActor {
    /// A request's caller.
    Caller(Caller),
    /// A host agent.
    Host(String),
    /// The control plane itself.
    System,
    /// A user outside a team context (login).
    User(String),
}

/// One audit entry to write.
#[derive(Debug, Clone)]
pub struct AuditEntry<'a> {
    /// Who.
    pub actor: AuditActor,
    /// Team it belongs to; `None` for platform scope.
    pub team: Option<TeamId>,
    /// What, e.g. `sandbox.create`.
    pub action: &'a str,
    /// Kind of resource.
    pub resource_type: &'a str,
    /// Prefixed id of the resource.
    pub resource_id: Option<String>,
    /// Whether it succeeded.
    pub ok: bool,
    /// Extra context.
    pub details: serde_json::Value,
}

impl Services {
    /// Writes an audit entry. Failure to audit is logged, not returned: the change it
    /// describes has already happened.
    pub async fn audit(&self, e: AuditEntry<'_>) {
        write_audit(&self.db, e).await;
    }
}

/// Records that a sandbox's host no longer knows it: `was → error` (compare-and-set, so a
/// sandbox that changed meanwhile is left alone), audited as `sandbox.lost`. Returns whether
/// this call made the change. Used by the monitor and by a resume the agent cannot serve.
pub(crate) async fn record_lost(
    db: &nestbox_db::Db,
    host: nestbox_types::HostId,
    id: nestbox_types::SandboxId,
    team: nestbox_types::TeamId,
    was: nestbox_types::SandboxStatus,
) -> Result<bool, ApiError> {
    let applied = nestbox_db::sandboxes::transition_on_host(
        db,
        id,
        host,
        was,
        nestbox_types::SandboxStatus::Error,
        Some("lost by its host (the VM exited or the host agent restarted)"),
    )
    .await?;
    if applied {
        tracing::warn!(sandbox = %id, host = %host, "sandbox lost by its host");
        write_audit(
            db,
            AuditEntry {
                actor: AuditActor::System,
                team: Some(team),
                action: "sandbox.lost",
                resource_type: "sandbox",
                resource_id: Some(id.to_string()),
                ok: false,
                details: serde_json::json!({ "host": host.to_string(), "was": was }),
            },
        )
        .await;
    }
    Ok(applied)
}

/// Runs a multi-step change in its own task and waits for its outcome. The task runs to its
/// end even if the request that started it is dropped (the client went away): the change
/// always leaves a clear state and records it, and nothing is written to a dead connection.
pub(crate) async fn detached<T, F>(work: F) -> Result<T, ApiError>
where
    T: Send + 'static,
    F: std::future::Future<Output = Result<T, ApiError>> + Send + 'static,
{
    tokio::spawn(crate::request_id::scoped(work))
        .await
        .map_err(|e| ApiError::internal(format!("detached task: {e}")))?
}

/// [`Services::audit`] for detached tasks, which own a database handle but not the services.
pub(crate) async fn write_audit(db: &nestbox_db::Db, e: AuditEntry<'_>) {
    let (actor_type, actor_id) = match &e.actor {
        AuditActor::Caller(c) if c.actor == crate::extract::Actor::System => {
            (ActorType::System, None)
        }
        AuditActor::Caller(c) => (c.actor.kind(), Some(c.actor.id_string())),
        AuditActor::Host(id) => (ActorType::Host, Some(id.clone())),
        AuditActor::System => (ActorType::System, None),
        AuditActor::User(id) => (ActorType::User, Some(id.clone())),
    };
    let entry = audit::NewAuditLog {
        team_id: e.team,
        actor_type,
        actor_id,
        action: e.action.to_string(),
        resource_type: e.resource_type.to_string(),
        resource_id: e.resource_id,
        status: if e.ok {
            AuditStatus::Success
        } else {
            AuditStatus::Failure
        },
        details: e.details,
    };
    if let Err(err) = audit::insert(db, &entry).await {
        tracing::error!(error = %err, action = e.action, "writing an audit entry");
    }
}

/// Validates a display name: 1–128 characters, no control characters.
pub fn validate_name(field: &str, name: &str) -> Result<String, ApiError> {
    let trimmed = name.trim();
    if trimmed.is_empty() || trimmed.chars().count() > 128 {
        return Err(ApiError::invalid(format!(
            "{field} must be 1–128 characters"
        )));
    }
    if trimmed.chars().any(char::is_control) {
        return Err(ApiError::invalid(format!(
            "{field} must not contain control characters"
        )));
    }
    Ok(trimmed.to_string())
}

/// Validates an email address (shape only).
pub fn validate_email(email: &str) -> Result<String, ApiError> {
    let e = email.trim().to_lowercase();
    let ok = e.len() <= 254
        && !e.chars().any(|c| c.is_whitespace() || c.is_control())
        && e.split_once('@').is_some_and(|(local, domain)| {
            !local.is_empty() && !domain.is_empty() && !domain.contains('@')
        });
    if !ok {
        return Err(ApiError::invalid("email is not a valid address"));
    }
    Ok(e)
}
