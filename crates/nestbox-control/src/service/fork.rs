//! Forking a live sandbox: N independent running copies of it (processes, memory, disk)
//! without naming a template first.
//!
//! ```text
//!   source (running) ──checkpoint──▶ one-off snapshot template (hidden, `ephemeral`)
//!                                       │ N creates, each a clone with its own id, tokens,
//!                                       ▼ host name and RNG reseed (the `/init` of a clone)
//!                                    copy 1 … copy N (independent sandboxes)
//! ```
//!
//! Rules:
//! - the source must be running; it is stopped only for the checkpoint (the RAM copy and
//!   the disk freeze of a snapshot template), then carries on;
//! - the one-off template belongs to the source's team but is never visible by name, and
//!   gets no pooled clone on its host;
//! - each copy inherits the source's environment, metadata, inactivity timeout and
//!   lifetime rule; a copy that fails to start is reported in its place, the others stand;
//! - the template is deleted once no copy uses it: at once if no copy started, else by the
//!   host monitor's sweep ([`Services::sweep_fork_templates`]) after its last copy is gone.

use futures::StreamExt;
use nestbox_types::api::{self, CreateSandboxRequest};
use nestbox_types::{ErrorCode, SandboxId, SandboxStatus, TemplateKind};

use super::templates::make_template;
use super::{AuditActor, AuditEntry, detached};
use crate::error::{ApiError, ApiResult};
use crate::extract::Caller;
use crate::state::Services;

/// Most copies one fork makes.
pub const MAX_FORKS: u32 = 20;
/// Copies started at once (each is a restore on the source's host).
const CONCURRENT_STARTS: usize = 4;

impl Services {
    /// Makes `count` running copies of a running sandbox. Fails as a whole only when no
    /// copy could be made at all (bad input, the source not running, the checkpoint
    /// failing); otherwise returns one outcome per copy.
    pub async fn fork_sandbox(
        &self,
        caller: &Caller,
        id: SandboxId,
        count: u32,
        lifetime_sec: Option<u32>,
    ) -> ApiResult<Vec<ApiResult<api::Sandbox>>> {
        if !(1..=MAX_FORKS).contains(&count) {
            return Err(ApiError::invalid(format!("count must be 1–{MAX_FORKS}")));
        }
        if let Some(secs) = lifetime_sec {
            self.validate_lifetime(secs)?;
        }
        let sb = self.sandbox_row(caller, id).await?;
        if sb.status != SandboxStatus::Running {
            return Err(ApiError::new(
                ErrorCode::SandboxNotRunning,
                format!(
                    "sandbox {id} is {}; only a running sandbox can be forked",
                    sb.status
                ),
            ));
        }
        let name = format!("fork-{}", &uuid::Uuid::new_v4().simple().to_string()[..16]);
        let making = self
            .making(caller, &sb, name, TemplateKind::Snapshot, true)
            .await?;
        let template_id = making.id;
        let db = self.db.clone();
        let template = detached(async move { make_template(&db, making).await }).await;
        let template = match template {
            Ok(t) => t,
            Err(e) => {
                self.audit_fork(caller, id, count, 0, Some(&e.message))
                    .await;
                return Err(e);
            }
        };

        let req = CreateSandboxRequest {
            timeout_sec: Some(sb.timeout_sec),
            env: sb.env.clone(),
            metadata: sb.metadata.clone(),
            lifetime_sec: lifetime_sec.or(sb.lifetime_sec),
            on_expiry: Some(sb.on_expiry),
            // A copy is never less confined than its source.
            egress: Some(api::EgressRequest {
                allow_out: sb.egress.allow_out.clone(),
                deny_out: sb.egress.deny_out.clone(),
                allow_internet_access: None,
            }),
            public_traffic: Some(sb.public_traffic),
            auto_resume: Some(sb.auto_resume),
            ..Default::default()
        };
        let outcomes: Vec<ApiResult<api::Sandbox>> = futures::stream::iter(0..count)
            .map(|_| self.create_from(caller, &req, template.clone()))
            .buffer_unordered(CONCURRENT_STARTS)
            .collect()
            .await;
        let started = outcomes.iter().filter(|o| o.is_ok()).count();
        let first_error = outcomes.iter().find_map(|o| o.as_ref().err());
        self.audit_fork(
            caller,
            id,
            count,
            started,
            first_error.map(|e| e.message.as_str()),
        )
        .await;
        if started == 0 {
            // Nothing uses the template: delete it now (the sweep retries if this fails).
            if let Err(e) = self.remove_template(AuditActor::System, template).await {
                tracing::warn!(template = %template_id, error = %e, "deleting an unused fork template");
            }
        }
        Ok(outcomes)
    }

    async fn audit_fork(
        &self,
        caller: &Caller,
        id: SandboxId,
        asked: u32,
        started: usize,
        error: Option<&str>,
    ) {
        self.audit(AuditEntry {
            actor: AuditActor::Caller(*caller),
            team: Some(caller.team),
            action: "sandbox.fork",
            resource_type: "sandbox",
            resource_id: Some(id.to_string()),
            ok: started > 0,
            details: serde_json::json!({ "count": asked, "started": started, "error": error }),
        })
        .await;
    }
}
