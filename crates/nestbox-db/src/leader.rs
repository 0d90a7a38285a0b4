//! Leadership for background jobs: exactly one holder of a job's lock at a time.
//!
//! Background jobs (host monitor, reapers, metric pruning) must run on one control-plane
//! replica only. On PostgreSQL the lock is a session-level advisory lock held on a dedicated
//! connection taken out of the pool: it is released when the [`LeaderLock`] is released or
//! dropped (the connection closes), and also when the holder dies or loses its connection — so
//! a leader must call [`LeaderLock::still_held`] before each round of work. On SQLite (one box,
//! one process) the lock is an in-process registry shared by clones of the [`Db`].

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use sqlx::{Connection, PgConnection};

use crate::engine::{Db, LockRegistry, args};
use crate::error::DbError;

/// A held job lock. Dropping it releases the lock.
#[derive(Debug)]
pub struct LeaderLock {
    key: i64,
    inner: Held,
}

#[derive(Debug)]
enum Held {
    Postgres(Option<PgConnection>),
    Local(LockRegistry),
}

impl Db {
    /// Tries to become the leader for job `key` without waiting. `None` if someone else holds
    /// it.
    pub async fn try_lock_leader(&self, key: i64) -> Result<Option<LeaderLock>, DbError> {
        if let Some(registry) = self.lock_registry() {
            let acquired = registry
                .lock()
                .map(|mut held| held.insert(key))
                .unwrap_or(false);
            return Ok(acquired.then(|| LeaderLock {
                key,
                inner: Held::Local(registry),
            }));
        }
        let Some(mut conn) = self.detached_pg_connection().await? else {
            return Ok(None);
        };
        let acquired: bool = crate::engine::Conn::Postgres(&mut conn)
            .fetch_one(
                "SELECT pg_try_advisory_lock($1) AS locked",
                args![key],
                |r| r.bool("locked"),
            )
            .await?;
        if acquired {
            tracing::info!(key, "leader lock acquired");
            Ok(Some(LeaderLock {
                key,
                inner: Held::Postgres(Some(conn)),
            }))
        } else {
            let _ = conn.close().await;
            Ok(None)
        }
    }
}

impl LeaderLock {
    /// The job key.
    pub fn key(&self) -> i64 {
        self.key
    }

    /// Whether the lock is still held: on PostgreSQL, whether its session is alive.
    pub async fn still_held(&mut self) -> bool {
        match &mut self.inner {
            Held::Postgres(Some(conn)) => conn.ping().await.is_ok(),
            Held::Postgres(None) => false,
            Held::Local(_) => true,
        }
    }

    /// Releases the lock now.
    pub async fn release(mut self) {
        if let Held::Postgres(conn) = &mut self.inner
            && let Some(mut conn) = conn.take()
        {
            let _ = crate::engine::Conn::Postgres(&mut conn)
                .execute("SELECT pg_advisory_unlock($1)", args![self.key])
                .await;
            let _ = conn.close().await;
        }
        // Drop does the rest.
    }
}

impl Drop for LeaderLock {
    fn drop(&mut self) {
        match &mut self.inner {
            // Dropping the connection closes its socket; the server ends the session and frees
            // every advisory lock it held.
            Held::Postgres(conn) => drop(conn.take()),
            Held::Local(registry) => {
                if let Ok(mut held) = registry.lock() {
                    held.remove(&self.key);
                }
            }
        }
    }
}

/// A fresh in-process registry.
pub(crate) fn new_registry() -> LockRegistry {
    Arc::new(Mutex::new(HashSet::new()))
}
