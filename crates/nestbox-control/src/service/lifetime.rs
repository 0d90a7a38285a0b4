//! A sandbox's absolute lifetime (E2B's `timeout`), beside its inactivity timeout.
//!
//! ```text
//!   create(lifetime_sec) ─▶ running, expires_at = start + lifetime
//!        │  set (any new end) / extend (only later)
//!        ▼
//!   expires_at reached ──on_expiry=destroy──▶ stopped
//!                      └─on_expiry=pause────▶ paused ──resume(lifetime?)──▶ running,
//!                                                         expires_at = now + lifetime
//! ```
//!
//! Rules:
//! - the deadline lives in the database (`expires_at`), so it survives restarts of the
//!   control plane and of host agents; [`crate::expiry`] enforces it;
//! - only a running sandbox has a live deadline; a paused one keeps none, and a resume
//!   starts a new lifetime (the one asked for, else the one recorded);
//! - setting a lifetime may move the end sooner or later and records it as the sandbox's
//!   lifetime; extending (E2B's refresh, `connect` on a running sandbox) only moves it
//!   later, and never gives a deadline to a sandbox that has none.

use nestbox_db::sandboxes::{self, LifetimeChange};
use nestbox_types::api;
use nestbox_types::{ErrorCode, SandboxId, SandboxStatus};

use super::{AuditActor, AuditEntry};
use crate::error::{ApiError, ApiResult};
use crate::extract::Caller;
use crate::state::Services;

impl Services {
    /// Checks a requested lifetime against the limits.
    pub(crate) fn validate_lifetime(&self, lifetime_sec: u32) -> ApiResult<()> {
        if lifetime_sec == 0 {
            return Err(ApiError::invalid("lifetime_sec must be at least 1"));
        }
        let max = self.cfg.limits.max_lifetime_sec;
        if lifetime_sec > max {
            return Err(ApiError::limit("lifetime_sec", max, " s"));
        }
        Ok(())
    }

    /// Gives a running sandbox a new deadline `lifetime_sec` from now (see
    /// [`LifetimeChange`]).
    pub async fn set_lifetime(
        &self,
        caller: &Caller,
        id: SandboxId,
        lifetime_sec: u32,
        change: LifetimeChange,
    ) -> ApiResult<api::Sandbox> {
        self.validate_lifetime(lifetime_sec)?;
        let sb = self.sandbox_row(caller, id).await?;
        if sb.status != SandboxStatus::Running {
            return Err(ApiError::new(
                ErrorCode::SandboxNotRunning,
                format!("sandbox {id} is {}", sb.status),
            ));
        }
        let applied = sandboxes::set_lifetime(&self.db, id, lifetime_sec, change).await?;
        if applied {
            self.audit(AuditEntry {
                actor: AuditActor::Caller(*caller),
                team: Some(caller.team),
                action: "sandbox.lifetime",
                resource_type: "sandbox",
                resource_id: Some(id.to_string()),
                ok: true,
                details: serde_json::json!({
                    "lifetime_sec": lifetime_sec,
                    "extend_only": change == LifetimeChange::Extend,
                }),
            })
            .await;
        }
        self.get_sandbox(caller, id).await
    }
}
