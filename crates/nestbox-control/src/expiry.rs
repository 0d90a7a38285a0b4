//! Ends sandboxes whose lifetime is over: destroys them, or pauses those created with
//! `on_expiry: pause` (see [`crate::service::lifetime`]).
//!
//! Every `expiry_interval` (1 s), the replica holding the expiry leader lock asks the
//! database for running sandboxes with `expires_at` in the past and ends each through the
//! same service operations a user's request uses, acting as the system for the sandbox's
//! team (audited as `system`). A failure (host unreachable, agent error) is logged and
//! retried on the next pass; a sandbox that changed meanwhile (paused, destroyed) is
//! skipped by the operations' own compare-and-set rules.

use std::sync::Arc;

use chrono::Utc;
use nestbox_db::sandboxes;
use nestbox_types::{ErrorCode, Expiry};

use crate::extract::Caller;
use crate::state::Services;

/// Key of the expiry task's leader lock.
pub const LEADER_KEY: i64 = 0x6e62_7865_7870; // "nbxexp"

/// Sandboxes ended per pass at most (the rest wait for the next pass).
const BATCH: u32 = 64;

/// Runs until the task is aborted; passes run only while this replica holds the lock.
pub async fn run(services: Arc<Services>) {
    let mut tick = tokio::time::interval(services.cfg.expiry_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut lock: Option<nestbox_db::LeaderLock> = None;
    loop {
        tick.tick().await;
        if let Some(held) = lock.as_mut()
            && !held.still_held().await
        {
            tracing::warn!("lost the expiry task's leader lock");
            lock = None;
        }
        if lock.is_none() {
            match services.db.try_lock_leader(LEADER_KEY).await {
                Ok(Some(l)) => lock = Some(l),
                Ok(None) => continue,
                Err(e) => {
                    tracing::warn!(error = %e, "taking the expiry task's leader lock");
                    continue;
                }
            }
        }
        if let Err(e) = pass(&services).await {
            tracing::warn!(error = %e, "expiry pass failed");
        }
    }
}

/// One pass: ends every sandbox whose lifetime is over. Returns how many it ended.
pub async fn pass(services: &Services) -> Result<usize, crate::error::ApiError> {
    let mut ended = 0;
    for sb in sandboxes::expired(&services.db, Utc::now(), BATCH).await? {
        let system = Caller::system(sb.team_id);
        let span = tracing::info_span!("expiry", sandbox = %sb.id, action = %sb.on_expiry);
        let _guard = span.enter();
        let outcome = match sb.on_expiry {
            Expiry::Destroy => services.destroy_sandbox(&system, sb.id).await,
            Expiry::Pause => services.pause_sandbox(&system, sb.id).await.map(|_| ()),
        };
        match outcome {
            Ok(()) => {
                tracing::info!("lifetime ended");
                ended += 1;
            }
            // Paused or destroyed meanwhile by someone else: nothing left to do.
            Err(e)
                if matches!(
                    e.code,
                    ErrorCode::SandboxNotRunning | ErrorCode::SandboxNotFound
                ) => {}
            Err(e) => tracing::warn!(error = %e, "ending a sandbox whose lifetime is over"),
        }
    }
    Ok(ended)
}
