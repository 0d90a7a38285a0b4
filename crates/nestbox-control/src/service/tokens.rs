//! Rotating a sandbox's tokens (`POST /v1/sandboxes/{id}/rotate-tokens`).
//!
//! A sandbox's guest token (`envd_access_token`, which its guest agent requires) and
//! traffic token (which opens its ports through the proxy) derive from the master secret,
//! its id and its *token generation* ([`crate::auth::sandbox_secret`]). A rotation takes
//! the next generation: recorded first (from then on the proxy accepts only the new
//! tokens), then the sandbox's guest agent is given the new guest token (presenting the
//! one it holds), after which it refuses the old one too. If its host refuses, the
//! generation is put back. A running or paused sandbox can be rotated: a paused one's host
//! records the new guest token and its guest agent gets it when it resumes (a resume that
//! cannot give it fails and leaves the sandbox paused). Removing a member or deleting an
//! API key offers it for the whole team (`?rotate_tokens=true`): every running and paused
//! sandbox of the team gets new tokens ([`Services::rotate_team_tokens`]).

use nestbox_db::sandboxes;
use nestbox_proto::hostagent::RotateSandboxTokenRequest;
use nestbox_types::{ErrorCode, SandboxId, SandboxStatus, api};

use super::{AuditActor, AuditEntry, detached, write_audit};
use crate::auth::{SandboxSecret, sandbox_secret};
use crate::error::{ApiError, ApiResult, from_agent};
use crate::extract::Caller;
use crate::state::Services;

impl Services {
    /// Rotates the tokens of every running and paused sandbox of `acting.team` (after a
    /// member's removal or an API key's deletion: what they fetched stops working).
    /// Returns how many were rotated; one that cannot be is logged and audited as failed,
    /// and the others go on.
    pub async fn rotate_team_tokens(&self, acting: &Caller) -> ApiResult<u32> {
        let running =
            sandboxes::list_by_status(&self.db, &[SandboxStatus::Running, SandboxStatus::Paused])
                .await?;
        let mut rotated = 0;
        for sb in running.into_iter().filter(|sb| sb.team_id == acting.team) {
            match self.rotate_tokens(acting, sb.id).await {
                Ok(_) => rotated += 1,
                Err(e) => {
                    tracing::warn!(sandbox = %sb.id, error = %e.message, "rotating a sandbox's tokens with its team's");
                }
            }
        }
        Ok(rotated)
    }

    /// Gives a running or paused sandbox new guest and traffic tokens; the old ones stop
    /// working. Returns the sandbox with its new tokens.
    pub async fn rotate_tokens(&self, caller: &Caller, id: SandboxId) -> ApiResult<api::Sandbox> {
        let sb = self.sandbox_row(caller, id).await?;
        if !matches!(sb.status, SandboxStatus::Running | SandboxStatus::Paused) {
            return Err(ApiError::new(
                ErrorCode::SandboxNotRunning,
                format!(
                    "sandbox {id} is {}; only a running or paused sandbox has tokens to rotate",
                    sb.status
                ),
            ));
        }
        super::moves::moving(&sb)?;
        let (host, mut client) = self.agent_for(sb.host_id).await?;
        let db = self.db.clone();
        let secret = self.cfg.master_secret.clone();
        let who = *caller;
        let from = sb.token_generation;
        detached(async move {
            let outcome = match sandboxes::rotate_tokens(&db, id, from).await {
                Err(e) => Err(ApiError::from(e)),
                Ok(None) => Err(ApiError::conflict(format!(
                    "sandbox {id}'s tokens were rotated meanwhile"
                ))),
                Ok(Some(next)) => {
                    let request = RotateSandboxTokenRequest {
                        sandbox_id: id.to_string(),
                        access_token: sandbox_secret(&secret, SandboxSecret::Envd, id, next),
                    };
                    match client.rotate_sandbox_token(request).await {
                        Ok(_) => Ok(next),
                        Err(status) => {
                            if let Err(e) = sandboxes::unrotate_tokens(&db, id, next).await {
                                tracing::error!(sandbox = %id, error = %e, "undoing a refused token rotation");
                            }
                            Err(from_agent(&status))
                        }
                    }
                }
            };
            write_audit(
                &db,
                AuditEntry {
                    actor: AuditActor::Caller(who),
                    team: Some(who.team),
                    action: "sandbox.rotate_tokens",
                    resource_type: "sandbox",
                    resource_id: Some(id.to_string()),
                    ok: outcome.is_ok(),
                    details: serde_json::json!({
                        "host": host.to_string(),
                        "generation": outcome.as_ref().ok(),
                        "error": outcome.as_ref().err().map(|e| e.message.clone()),
                    }),
                },
            )
            .await;
            outcome.map(drop)
        })
        .await?;
        self.get_sandbox(caller, id).await
    }
}
