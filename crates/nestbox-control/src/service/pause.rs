//! Pausing and resuming sandboxes, and keeping them alive.
//!
//! A paused sandbox keeps its memory, processes and disk on its host; no VM runs.
//!
//! ```text
//!            pause: marked before the agent call, reverted if it fails
//!   running ───────────────────────────────────────────────────────▶ paused
//!      ▲                                                               │
//!      └───────────────────────────────────────────────────────────────┘
//!            resume: marked after the agent call succeeded; a failure leaves it paused
//! ```
//!
//! Rules:
//! - pause needs a `running` sandbox (else `sandbox_not_running`) and marks it `paused`
//!   (compare-and-set from `running`) **before** asking the agent, so the host monitor never
//!   sees a "running" sandbox while its VM is being saved and stopped; if the agent fails,
//!   the mark is reverted (`paused → running`) and the error returned. When the agent says
//!   the sandbox is not running because it has paused it itself (its inactivity timer), the
//!   sandbox simply stays paused;
//! - resume needs a `paused` sandbox (else `conflict`) and marks it `running` only once the
//!   agent resumed it; on failure it stays `paused` (its saved state is intact) — unless the
//!   agent does not know the sandbox at all (its host lost it, e.g. in a crash mid-pause):
//!   then it becomes `error` at once, as the monitor would record it, and the caller gets a
//!   `conflict` saying so;
//! - the agent calls and what follows them run in detached tasks ([`super::detached`]): a
//!   client that goes away mid-call never leaves a half state, and the outcome is audited;
//! - once paused, the sandbox's metrics are fetched from the agent and stored
//!   ([`super::metrics`]); a failure there does not fail the pause;
//! - a resume starts a new lifetime ([`super::lifetime`]) before the sandbox is marked
//!   running again;
//! - ping needs a running sandbox; it resets the agent's inactivity timer and records
//!   activity.

use nestbox_db::sandboxes;
use nestbox_proto::hostagent::{
    self as pb, GetSandboxRequest, PauseSandboxRequest, PingSandboxRequest, ResumeSandboxRequest,
};
use nestbox_types::api;
use nestbox_types::{ErrorCode, SandboxId, SandboxStatus};

use super::{AuditActor, AuditEntry, detached, write_audit};
use crate::error::{ApiError, ApiResult, from_agent};
use crate::extract::Caller;
use crate::hostpool::AgentClient;
use crate::state::Services;

fn not_running(id: SandboxId, status: SandboxStatus) -> ApiError {
    ApiError::new(
        ErrorCode::SandboxNotRunning,
        format!("sandbox {id} is {status}"),
    )
}

/// What the agent says the sandbox's state is, if it answers.
async fn agent_state(client: &mut AgentClient, id: SandboxId) -> Option<pb::SandboxState> {
    let info = client
        .get_sandbox(GetSandboxRequest {
            sandbox_id: id.to_string(),
        })
        .await
        .ok()?
        .into_inner();
    pb::SandboxState::try_from(info.state).ok()
}

/// Whether a failed pause or resume call left the sandbox as the caller wanted anyway: the
/// agent refused because the sandbox already is in state `wanted`.
async fn already(
    client: &mut AgentClient,
    id: SandboxId,
    status: &tonic::Status,
    refusal: ErrorCode,
    wanted: pb::SandboxState,
) -> bool {
    nestbox_proto::error_code(status) == refusal && agent_state(client, id).await == Some(wanted)
}

impl Services {
    /// Pauses a running sandbox: its memory and disk are saved on its host and its VM
    /// stops.
    pub async fn pause_sandbox(&self, caller: &Caller, id: SandboxId) -> ApiResult<api::Sandbox> {
        let sb = self.sandbox_row(caller, id).await?;
        if sb.status != SandboxStatus::Running {
            return Err(not_running(id, sb.status));
        }
        let (host, mut client) = self.agent_for(sb.host_id).await?;
        // Marked first: from here on the monitor leaves the sandbox alone while its VM is
        // being saved.
        let marked = sandboxes::transition_within_quota(
            &self.db,
            sb.team_id,
            id,
            &[SandboxStatus::Running],
            SandboxStatus::Paused,
            &nestbox_db::quotas::Demand {
                // The platform's own pauses (a lifetime's end) are never refused: they free
                // what the sandbox ran on, and count once done.
                paused: u64::from(!matches!(caller.actor, crate::extract::Actor::System)),
                ..Default::default()
            },
        )
        .await?;
        if !marked {
            let now = self.sandbox_row(caller, id).await?;
            return Err(not_running(id, now.status));
        }
        let db = self.db.clone();
        let who = *caller;
        let timeout = self.cfg.pause_timeout;
        detached(async move {
            let mut rpc = tonic::Request::new(PauseSandboxRequest {
                sandbox_id: id.to_string(),
            });
            rpc.set_timeout(timeout);
            let outcome = match client.pause_sandbox(rpc).await {
                Ok(_) => Ok(()),
                Err(status)
                    if already(
                        &mut client,
                        id,
                        &status,
                        ErrorCode::SandboxNotRunning,
                        pb::SandboxState::Paused,
                    )
                    .await =>
                {
                    Ok(())
                }
                Err(status) => {
                    let reverted = sandboxes::transition(
                        &db,
                        id,
                        &[SandboxStatus::Paused],
                        SandboxStatus::Running,
                        None,
                    )
                    .await;
                    if !matches!(reverted, Ok(true)) {
                        tracing::warn!(sandbox = %id, result = ?reverted, "reverting a failed pause");
                    }
                    Err(from_agent(&status))
                }
            };
            if outcome.is_ok() {
                super::metrics::flush_logged(&db, &mut client, id, "pause").await;
            }
            write_audit(
                &db,
                AuditEntry {
                    actor: AuditActor::Caller(who),
                    team: Some(who.team),
                    action: "sandbox.pause",
                    resource_type: "sandbox",
                    resource_id: Some(id.to_string()),
                    ok: outcome.is_ok(),
                    details: serde_json::json!({
                        "host": host.to_string(),
                        "error": outcome.as_ref().err().map(|e| e.message.clone()),
                    }),
                },
            )
            .await;
            outcome
        })
        .await?;
        self.get_sandbox(caller, id).await
    }

    /// Resumes a paused sandbox with its processes, open files and memory, and starts a new
    /// lifetime (`lifetime_sec`, else the one it had; see [`super::lifetime`]).
    pub async fn resume_sandbox(
        &self,
        caller: &Caller,
        id: SandboxId,
        lifetime_sec: Option<u32>,
    ) -> ApiResult<api::Sandbox> {
        if let Some(secs) = lifetime_sec {
            self.validate_lifetime(secs)?;
        }
        let sb = self.sandbox_row(caller, id).await?;
        match sb.status {
            SandboxStatus::Paused => {}
            SandboxStatus::Running => {
                return Err(ApiError::conflict(format!(
                    "sandbox {id} is already running"
                )));
            }
            other => {
                return Err(ApiError::conflict(format!(
                    "sandbox {id} is {other}; only a paused sandbox can be resumed"
                )));
            }
        }
        super::moves::moving(&sb)?;
        let (host, mut client) = self.agent_for(sb.host_id).await?;
        // Running again counts against the team's quota (checked, not reserved: the
        // sandbox stays `paused` until its host has resumed it).
        let back = nestbox_db::quotas::Demand {
            running: 1,
            vcpus: u64::from(sb.vcpus),
            memory_mb: u64::from(sb.memory_mb),
            ..Default::default()
        };
        nestbox_db::quotas::check(&self.db, sb.team_id, &back).await?;
        let db = self.db.clone();
        let who = *caller;
        let team = sb.team_id;
        let timeout = self.cfg.pause_timeout;
        detached(async move {
            let mut rpc = tonic::Request::new(ResumeSandboxRequest {
                sandbox_id: id.to_string(),
            });
            rpc.set_timeout(timeout);
            let resumed = match client.resume_sandbox(rpc).await {
                Ok(_) => Ok(()),
                Err(status)
                    if already(
                        &mut client,
                        id,
                        &status,
                        ErrorCode::Conflict,
                        pb::SandboxState::Running,
                    )
                    .await =>
                {
                    Ok(())
                }
                // The host does not have it (it lost it while pausing, or since): the
                // sandbox cannot come back. Recorded now rather than at the monitor's next
                // pass, so the caller gets the truth.
                Err(status) if nestbox_proto::error_code(&status) == ErrorCode::SandboxNotFound => {
                    let lost =
                        super::record_lost(&db, host, id, team, SandboxStatus::Paused).await?;
                    Err(ApiError::conflict(if lost {
                        format!("sandbox {id} was lost by its host; its saved state is gone")
                    } else {
                        format!("sandbox {id} changed while it resumed")
                    }))
                }
                // The saved state is intact: the sandbox stays paused.
                Err(status) => Err(from_agent(&status)),
            };
            let outcome = match resumed {
                Ok(()) => record_resumed(&db, id, lifetime_sec).await,
                Err(e) => Err(e),
            };
            write_audit(
                &db,
                AuditEntry {
                    actor: AuditActor::Caller(who),
                    team: Some(who.team),
                    action: "sandbox.resume",
                    resource_type: "sandbox",
                    resource_id: Some(id.to_string()),
                    ok: outcome.is_ok(),
                    details: serde_json::json!({
                        "host": host.to_string(),
                        "error": outcome.as_ref().err().map(|e| e.message.clone()),
                    }),
                },
            )
            .await;
            outcome
        })
        .await?;
        self.get_sandbox(caller, id).await
    }

    /// Resets a running sandbox's inactivity timer.
    pub async fn ping_sandbox(&self, caller: &Caller, id: SandboxId) -> ApiResult<()> {
        let (_, mut client) = self.running(caller, id).await?;
        client
            .ping_sandbox(PingSandboxRequest {
                sandbox_id: id.to_string(),
            })
            .await
            .map_err(|s| from_agent(&s))?;
        self.touch(id).await;
        Ok(())
    }
}

/// Records that the agent resumed the sandbox, with a new lifetime.
async fn record_resumed(
    db: &nestbox_db::Db,
    id: SandboxId,
    lifetime_sec: Option<u32>,
) -> ApiResult<()> {
    // The new deadline first: once the sandbox is `running` again, the expiry task must not
    // see the old one (already past when its lifetime's end paused it).
    sandboxes::restart_lifetime(db, id, lifetime_sec).await?;
    let applied = sandboxes::transition(
        db,
        id,
        &[SandboxStatus::Paused],
        SandboxStatus::Running,
        None,
    )
    .await?;
    if !applied {
        // The monitor may have seen it running first; anything else changed under us.
        let now = sandboxes::get(db, id).await?;
        if now.status != SandboxStatus::Running {
            return Err(ApiError::conflict(format!(
                "sandbox {id} became {} while it resumed",
                now.status
            )));
        }
    }
    if let Err(e) = sandboxes::touch_last_active(db, id).await {
        tracing::warn!(sandbox = %id, error = %e, "recording activity");
    }
    Ok(())
}
