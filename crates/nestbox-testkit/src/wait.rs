//! Polling with a deadline.
//!
//! Tests wait for conditions, never for fixed times: `wait_for(timeout, || async { … })` calls
//! the check until it reports ready, backing off from 5 ms to 100 ms between calls, and fails
//! with the last reason when the deadline passes.

use std::fmt;
use std::future::Future;
use std::time::{Duration, Instant};

/// What a check returns: ready with a value, or not yet (with an optional reason).
pub trait Ready {
    /// The value produced once ready.
    type Output;
    /// `Ok(value)` when ready, `Err(reason)` when not yet.
    fn ready(self) -> Result<Self::Output, Option<String>>;
}

impl Ready for bool {
    type Output = ();
    fn ready(self) -> Result<(), Option<String>> {
        if self { Ok(()) } else { Err(None) }
    }
}

impl<T> Ready for Option<T> {
    type Output = T;
    fn ready(self) -> Result<T, Option<String>> {
        self.ok_or(None)
    }
}

impl<T, E: fmt::Display> Ready for Result<T, E> {
    type Output = T;
    fn ready(self) -> Result<T, Option<String>> {
        self.map_err(|e| Some(e.to_string()))
    }
}

/// The condition did not hold before the deadline.
#[derive(Debug, Clone, thiserror::Error)]
#[error("condition not met within {timeout:?} after {attempts} attempts{}", last.as_ref().map(|l| format!("; last: {l}")).unwrap_or_default())]
pub struct WaitTimedOut {
    /// The deadline that passed.
    pub timeout: Duration,
    /// How many times the check ran.
    pub attempts: u32,
    /// The reason the last check gave, if any.
    pub last: Option<String>,
}

/// Calls `check` until it is ready or `timeout` has passed. The check always runs at least
/// once, and once more at the deadline.
pub async fn wait_for<F, Fut, R>(timeout: Duration, mut check: F) -> Result<R::Output, WaitTimedOut>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = R>,
    R: Ready,
{
    let deadline = Instant::now() + timeout;
    let mut delay = Duration::from_millis(5);
    let mut attempts = 0;
    loop {
        attempts += 1;
        let last = match check().await.ready() {
            Ok(value) => return Ok(value),
            Err(reason) => reason,
        };
        let now = Instant::now();
        if now >= deadline {
            return Err(WaitTimedOut {
                timeout,
                attempts,
                last,
            });
        }
        tokio::time::sleep(delay.min(deadline - now)).await;
        delay = (delay * 2).min(Duration::from_millis(100));
    }
}
