//! A sandbox's egress rules after creation (`PUT /v1/sandboxes/{id}/egress`, E2B's
//! `PUT /sandboxes/{id}/network`).
//!
//! Rules are validated and normalised here ([`validate_egress`]) and enforced by the
//! sandbox's host (`nestbox_dns`, nftables in its namespace), which keeps them across
//! pause and resume. A change is recorded in the database first, under the next version
//! of the sandbox's rules, then sent to the agent with that version; the agent takes a
//! change only if it is newer than the one it holds. So concurrent changes, whatever order
//! they reach the agent in, end with the agent and the database holding the same, last
//! recorded rules. An agent that refuses a change has it undone in the database (unless a
//! later change was made meanwhile) and is sent the undoing change too (best effort,
//! logged: it may have taken the change before failing).
//! Only running and paused sandboxes have rules to change; a paused one gets them on
//! resume. Forks inherit their source's rules.

use nestbox_db::sandboxes;
use nestbox_proto::hostagent::{self as pb, SetEgressRequest};
use nestbox_types::api::{self, EgressRequest};
use nestbox_types::egress::EgressRules;
use nestbox_types::{SandboxId, SandboxStatus};

use super::{AuditActor, AuditEntry, detached, write_audit};
use crate::error::{ApiError, ApiResult, from_agent};
use crate::extract::Caller;
use crate::state::Services;

/// Validates and normalises egress rules (`invalid_request` naming the bad entry).
pub(crate) fn validate_egress(rules: &EgressRules) -> ApiResult<EgressRules> {
    rules
        .normalized()
        .map_err(|e| ApiError::invalid(format!("egress: {e}")))
}

/// Egress rules on the agents' wire (absent when there are none).
pub(crate) fn pb_egress(rules: &EgressRules) -> Option<pb::EgressRules> {
    (!rules.is_empty()).then(|| pb::EgressRules {
        allow_out: rules.allow_out.clone(),
        deny_out: rules.deny_out.clone(),
    })
}

impl Services {
    /// Replaces a running or paused sandbox's egress rules.
    pub async fn set_egress(
        &self,
        caller: &Caller,
        id: SandboxId,
        req: &EgressRequest,
    ) -> ApiResult<api::Sandbox> {
        let rules = validate_egress(&req.rules())?;
        let sb = self.sandbox_row(caller, id).await?;
        match sb.status {
            SandboxStatus::Running | SandboxStatus::Paused => {}
            SandboxStatus::Pending | SandboxStatus::Starting => {
                return Err(ApiError::conflict(format!(
                    "sandbox {id} is starting; retry once it runs"
                )));
            }
            other => {
                return Err(ApiError::conflict(format!(
                    "sandbox {id} is {other}; only a running or paused sandbox has egress rules"
                )));
            }
        }
        super::moves::moving(&sb)?;
        let (host, mut client) = self.agent_for(sb.host_id).await?;
        let db = self.db.clone();
        let who = *caller;
        detached(async move {
            let request = |rules: &EgressRules, version: i64| SetEgressRequest {
                sandbox_id: id.to_string(),
                egress: pb_egress(rules),
                version: u64::try_from(version).unwrap_or(0),
            };
            // Recorded first, under the next version: of concurrent changes, the host keeps
            // the newest that reaches it, and the database holds that same one.
            let outcome = match sandboxes::set_egress(&db, id, &rules).await {
                Err(e) => Err(ApiError::from(e)),
                Ok(None) => Err(ApiError::new(
                    nestbox_types::ErrorCode::SandboxNotFound,
                    format!("sandbox {id} was deleted meanwhile"),
                )),
                Ok(Some(change)) => match client.set_egress(request(&rules, change.version)).await {
                    Ok(_) => Ok(()),
                    Err(status) => {
                        // Undone unless a later change was made meanwhile; the host gets
                        // the undoing change too (it may have taken this one before failing).
                        match sandboxes::revert_egress(&db, id, &change).await {
                            Ok(Some(version)) => {
                                if let Err(back) =
                                    client.set_egress(request(&change.previous, version)).await
                                {
                                    tracing::warn!(sandbox = %id, error = %back.message(), "setting the previous egress rules back");
                                }
                            }
                            Ok(None) => {}
                            Err(e) => {
                                tracing::error!(sandbox = %id, error = %e, "undoing a failed egress change");
                            }
                        }
                        Err(from_agent(&status))
                    }
                },
            };
            write_audit(
                &db,
                AuditEntry {
                    actor: AuditActor::Caller(who),
                    team: Some(who.team),
                    action: "sandbox.egress",
                    resource_type: "sandbox",
                    resource_id: Some(id.to_string()),
                    ok: outcome.is_ok(),
                    details: serde_json::json!({
                        "host": host.to_string(),
                        "allow_out": rules.allow_out,
                        "deny_out": rules.deny_out,
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
}
