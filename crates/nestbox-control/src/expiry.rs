//! Ends sandboxes whose lifetime is over: destroys them, or pauses those created with
//! `on_expiry: pause` (see [`crate::service::lifetime`]).
//!
//! Every `expiry_interval` (1 s), the replica holding the expiry leader lock asks the
//! database for running sandboxes with `expires_at` in the past and ends each through the
//! same service operations a user's request uses, acting as the system for the sandbox's
//! team (audited as `system`). Each sandbox is read again just before it is ended, so one
//! whose lifetime was extended (or that was paused) since the batch was read is left
//! alone; the operations' own compare-and-set rules cover what changes after that. A
//! failure (host unreachable, agent error) is logged and that sandbox is retried after
//! [`RETRY_AFTER`], so one unreachable host neither floods the log and the audit log nor
//! holds up the others.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use nestbox_db::sandboxes;
use nestbox_types::{ErrorCode, Expiry, SandboxId, SandboxStatus};
use tokio::time::Instant;
use tracing::Instrument;

use crate::extract::Caller;
use crate::state::Services;

/// Key of the expiry task's leader lock.
pub const LEADER_KEY: i64 = 0x6e62_7865_7870; // "nbxexp"

/// Sandboxes looked at per pass at most (the rest wait for the next pass).
const BATCH: u32 = 256;
/// How long a sandbox whose end failed waits before it is tried again.
pub const RETRY_AFTER: Duration = Duration::from_secs(30);

/// Sandboxes whose end failed, and when they may be tried again.
#[derive(Debug, Default)]
pub struct Backoff(HashMap<SandboxId, Instant>);

impl Backoff {
    fn waiting(&mut self, id: SandboxId) -> bool {
        let now = Instant::now();
        self.0.retain(|_, until| *until > now);
        self.0.contains_key(&id)
    }
}

/// Runs until the task is aborted; passes run only while this replica holds the lock.
pub async fn run(services: Arc<Services>) {
    let every = services.cfg.expiry_interval;
    let mut ticker = crate::leader::LeaderTicker::new(&services, LEADER_KEY, every, "expiry");
    let mut backoff = Backoff::default();
    loop {
        if ticker.leading().await
            && let Err(e) = pass(&services, &mut backoff).await
        {
            tracing::warn!(error = %e, "expiry pass failed");
        }
    }
}

/// One pass: ends every sandbox whose lifetime is over (except those in `backoff`).
/// Returns how many it ended.
pub async fn pass(
    services: &Services,
    backoff: &mut Backoff,
) -> Result<usize, crate::error::ApiError> {
    let mut ended = 0;
    for due in sandboxes::expired(&services.db, Utc::now(), BATCH).await? {
        if backoff.waiting(due.id) {
            continue;
        }
        // Read again: the batch may be older than a user's extension or pause.
        let sb = sandboxes::get(&services.db, due.id).await?;
        let still_due = sb.status == SandboxStatus::Running
            && sb.expires_at.is_some_and(|end| end <= Utc::now());
        if !still_due {
            continue;
        }
        let system = Caller::system(sb.team_id);
        let span = tracing::info_span!("expiry", sandbox = %sb.id, action = %sb.on_expiry);
        let outcome = async {
            match sb.on_expiry {
                Expiry::Destroy => services.destroy_sandbox(&system, sb.id).await,
                Expiry::Pause => services.pause_sandbox(&system, sb.id).await.map(|_| ()),
            }
        }
        .instrument(span.clone())
        .await;
        let _entered = span.enter();
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
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?RETRY_AFTER, "ending a sandbox whose lifetime is over");
                backoff.0.insert(sb.id, Instant::now() + RETRY_AFTER);
            }
        }
    }
    Ok(ended)
}
