//! Login throttling: password checks run on the blocking pool, a few at a time, behind
//! per-address and per-account rate limits.
//!
//! A login costs an argon2 hash (tens of milliseconds and ~19 MiB); on the async workers a
//! flood of them would stall every other request, and unbounded on the blocking pool it
//! would exhaust memory. So:
//! - each attempt first takes a token from its client address's bucket, then from its
//!   account's (the email, lowercased) — a spent bucket is `429 rate_limited` with
//!   `Retry-After`, before any hashing;
//! - the hash itself runs on the blocking pool with at most [`hash_slots`] at once; later
//!   attempts wait their turn without holding an async worker.
//!
//! Buckets (GCRA, `governor`) refill continuously; limiters forget idle keys once they
//! hold more than [`MAX_TRACKED`], so spraying addresses or emails cannot grow them
//! without bound.

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Arc;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use nestbox_types::ErrorCode;
use tokio::sync::Semaphore;

use crate::error::ApiError;

/// Keys a limiter tracks before it forgets the idle ones.
pub const MAX_TRACKED: usize = 10_000;

/// Longest email address (RFC 5321): longer input is keyed by its first this many chars.
const MAX_EMAIL: usize = 320;

/// Attempts per minute (and burst) for each client address and each account.
#[derive(Debug, Clone, Copy)]
pub struct LoginLimits {
    /// Per client address (`0`: unlimited).
    pub per_address_per_minute: u32,
    /// Per account (`0`: unlimited).
    pub per_account_per_minute: u32,
}

impl Default for LoginLimits {
    fn default() -> Self {
        Self {
            per_address_per_minute: 30,
            per_account_per_minute: 10,
        }
    }
}

/// How many password hashes run at once: one per CPU, at least two.
pub fn hash_slots() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get().max(2))
}

/// The login throttle of one control-plane process.
pub struct LoginThrottle {
    by_address: Option<DefaultKeyedRateLimiter<IpAddr>>,
    by_account: Option<DefaultKeyedRateLimiter<String>>,
    hashing: Arc<Semaphore>,
}

impl std::fmt::Debug for LoginThrottle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoginThrottle").finish_non_exhaustive()
    }
}

fn limiter<K: std::hash::Hash + Eq + Clone>(per_minute: u32) -> Option<DefaultKeyedRateLimiter<K>> {
    NonZeroU32::new(per_minute).map(|n| RateLimiter::keyed(Quota::per_minute(n)))
}

fn take<K: std::hash::Hash + Eq + Clone>(
    limiter: &Option<DefaultKeyedRateLimiter<K>>,
    key: &K,
    what: &str,
) -> Result<(), ApiError> {
    let Some(limiter) = limiter else {
        return Ok(());
    };
    if limiter.len() > MAX_TRACKED {
        limiter.retain_recent();
    }
    limiter.check_key(key).map_err(|not_until| {
        let wait = not_until.wait_time_from(DefaultClock::default().now());
        let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
        ApiError::new(
            ErrorCode::RateLimited,
            format!("too many login attempts {what}; retry in {secs} s"),
        )
        .retry_after(secs.max(1))
    })
}

impl LoginThrottle {
    /// A throttle with `limits`.
    pub fn new(limits: LoginLimits) -> Self {
        Self {
            by_address: limiter(limits.per_address_per_minute),
            by_account: limiter(limits.per_account_per_minute),
            hashing: Arc::new(Semaphore::new(hash_slots())),
        }
    }

    /// Takes one attempt from the address's and the account's buckets.
    pub fn admit(&self, address: Option<IpAddr>, email: &str) -> Result<(), ApiError> {
        if let Some(address) = address {
            take(&self.by_address, &address, "from this address")?;
        }
        take(
            &self.by_account,
            // At most an email's longest legal length: a huge "email" makes no huge key.
            &email
                .trim()
                .chars()
                .take(MAX_EMAIL)
                .collect::<String>()
                .to_lowercase(),
            "for this account",
        )
    }

    /// Runs a password check (argon2) on the blocking pool, a bounded number at once.
    pub async fn check_password(&self, password: String, hash: Option<String>) -> bool {
        let Ok(_slot) = self.hashing.clone().acquire_owned().await else {
            return false;
        };
        tokio::task::spawn_blocking(move || match hash {
            Some(hash) => crate::auth::verify_password(&password, &hash),
            None => {
                crate::auth::dummy_password_check(&password);
                false
            }
        })
        .await
        .unwrap_or(false)
    }

    /// Hashes a new password on the blocking pool, a bounded number at once.
    pub async fn hash_password(&self, password: String) -> Result<String, ApiError> {
        let _slot = self
            .hashing
            .clone()
            .acquire_owned()
            .await
            .map_err(ApiError::internal)?;
        tokio::task::spawn_blocking(move || crate::auth::hash_password(&password))
            .await
            .map_err(ApiError::internal)?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_per_address_and_account_run_out_and_say_when_to_retry() {
        let t = LoginThrottle::new(LoginLimits {
            per_address_per_minute: 3,
            per_account_per_minute: 2,
        });
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        t.admit(Some(a), "X@example.com").unwrap();
        t.admit(Some(a), "x@example.com ").unwrap();
        // The account is spent (its case and spaces do not matter)…
        let e = t.admit(Some(b), "x@EXAMPLE.com").unwrap_err();
        assert_eq!(e.code, ErrorCode::RateLimited);
        assert!(
            e.retry_after.is_some_and(|s| (1..=60).contains(&s)),
            "{e:?}"
        );
        // …another account from the same address still has one attempt, then none.
        t.admit(Some(a), "y@example.com").unwrap();
        let e = t.admit(Some(a), "z@example.com").unwrap_err();
        assert!(e.message.contains("address"), "{e:?}");
        // An oversized "email" counts as its first 320 characters.
        let long = format!("{}@example.com", "a".repeat(400));
        let t2 = LoginThrottle::new(LoginLimits {
            per_address_per_minute: 0,
            per_account_per_minute: 1,
        });
        t2.admit(None, &long).unwrap();
        let same_prefix = format!("{}b", &long[..320]);
        assert!(
            t2.admit(None, &same_prefix).is_err(),
            "keyed by the first 320 chars"
        );
        // Unlimited when set to 0.
        let open = LoginThrottle::new(LoginLimits {
            per_address_per_minute: 0,
            per_account_per_minute: 0,
        });
        for _ in 0..100 {
            open.admit(Some(a), "x@example.com").unwrap();
        }
    }

    #[tokio::test]
    async fn password_checks_run_off_the_async_workers() {
        let t = LoginThrottle::new(LoginLimits::default());
        let hash = t
            .hash_password("correct horse battery".into())
            .await
            .unwrap();
        assert!(
            t.check_password("correct horse battery".into(), Some(hash.clone()))
                .await
        );
        assert!(!t.check_password("wrong".into(), Some(hash)).await);
        assert!(!t.check_password("anything".into(), None).await);
    }
}
