//! Periodic background jobs that must run on one control-plane replica at a time.
//!
//! A [`LeaderTicker`] waits for the job's next tick and says whether this replica holds
//! the job's leader lock (taking it if free, noticing when it was lost). Replicas that do
//! not hold it keep trying on every tick, so another takes over if the leader dies.

use std::time::Duration;

use crate::state::Services;

/// Ticks of one leader-only job.
pub struct LeaderTicker<'a> {
    services: &'a Services,
    key: i64,
    job: &'static str,
    tick: tokio::time::Interval,
    lock: Option<nestbox_db::LeaderLock>,
}

impl<'a> LeaderTicker<'a> {
    /// Ticks every `every` for the job `job` (named in logs) with lock `key`.
    pub fn new(services: &'a Services, key: i64, every: Duration, job: &'static str) -> Self {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Self {
            services,
            key,
            job,
            tick,
            lock: None,
        }
    }

    /// Waits for the next tick; `true` when this replica should run the job now.
    pub async fn leading(&mut self) -> bool {
        self.tick.tick().await;
        if let Some(held) = self.lock.as_mut()
            && !held.still_held().await
        {
            tracing::warn!(job = self.job, "lost the leader lock");
            self.lock = None;
        }
        if self.lock.is_none() {
            match self.services.db.try_lock_leader(self.key).await {
                Ok(Some(l)) => self.lock = Some(l),
                Ok(None) => return false,
                Err(e) => {
                    tracing::warn!(job = self.job, error = %e, "taking the leader lock");
                    return false;
                }
            }
        }
        true
    }
}
