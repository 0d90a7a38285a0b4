//! The fleet as placement sees it: the online hosts and the load on each.
//!
//! Reading it from the database for every create costs two queries over every online host
//! and every live sandbox, while heartbeats keep the database busy. Instead, creates read a
//! view taken at most [`FleetView::refresh`] ago by a background task ([`run`]) and kept
//! current between reads:
//! - the placements this process made since a read are added to their host's load;
//! - a heartbeat's report of the guest memory held on its host overrides what was read;
//! - a change of hosts made here (a registration, a host back online or gone, a drain, a
//!   delete) and a sandbox ending here drop the view: the next create reads the database.
//!
//! Another replica's placements and changes show at the next read. The view only chooses
//! a host: an agent refuses what it cannot run (`no_capacity`), so a view behind the truth
//! can cost a create, never overfill a host. With a refresh of zero every create reads the
//! database.
//!
//! Invariants: a placement counts in the view until a read that began after it was
//! recorded (so after its sandbox row was written) replaces the view; a view older than
//! four refresh periods (its refresher stalled) is never served. A read that begins
//! between a placement's row and its record here counts it twice until the next read:
//! for one refresh the view errs towards a host looking fuller, never emptier.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use nestbox_db::hosts::{self, GuestMemory, Host};
use nestbox_db::sandboxes::{self, HostLoad};
use nestbox_db::{Db, DbError};
use nestbox_types::HostId;

/// A read of the online hosts and their loads.
#[derive(Debug)]
struct Read {
    at: Instant,
    hosts: Vec<Host>,
    loads: HashMap<HostId, HostLoad>,
}

#[derive(Debug, Default)]
struct Inner {
    read: Option<Arc<Read>>,
    /// Numbers placements and invalidations.
    seq: u64,
    /// The `seq` of the last invalidation: a read begun before it is not installed.
    dropped_at: u64,
    /// Placements since: (seq, host, memory MiB).
    placed: Vec<(u64, HostId, u64)>,
    /// Latest guest memory reports, with when they came.
    reported: HashMap<HostId, (Instant, GuestMemory)>,
}

/// See the module docs.
#[derive(Debug)]
pub struct FleetView {
    refresh: Duration,
    inner: Mutex<Inner>,
}

impl FleetView {
    /// A view read every `refresh` (zero: no view, every create reads the database).
    pub fn new(refresh: Duration) -> Self {
        Self {
            refresh,
            inner: Mutex::default(),
        }
    }

    /// How often the view is read.
    pub fn refresh(&self) -> Duration {
        self.refresh
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The online hosts with their loads: from the view when it is fresh enough, else from
    /// the database (installing what was read).
    pub async fn hosts(&self, db: &Db) -> Result<Vec<(Host, HostLoad)>, DbError> {
        if self.refresh.is_zero() {
            let (hosts, loads) = read(db).await?;
            return Ok(join(&hosts, &loads, |_| (0, 0), &HashMap::new()));
        }
        let current = {
            let inner = self.lock();
            inner
                .read
                .clone()
                .filter(|r| r.at.elapsed() < self.refresh * 4)
                .map(|r| (r, inner.placed.clone(), inner.reported.clone()))
        };
        let (read, placed, reported) = match current {
            Some(c) => c,
            None => {
                let read = self.read_now(db).await?;
                let inner = self.lock();
                (read, inner.placed.clone(), inner.reported.clone())
            }
        };
        let extra = |host: HostId| {
            placed
                .iter()
                .filter(|(_, h, _)| *h == host)
                .fold((0, 0), |(n, m), (_, _, mem)| (n + 1, m + mem))
        };
        Ok(join(&read.hosts, &read.loads, extra, &reported))
    }

    /// Reads the database and installs the read, unless the view was dropped meanwhile
    /// (what dropped it may not be in the read). Returns the read.
    async fn read_now(&self, db: &Db) -> Result<Arc<Read>, DbError> {
        let (started, seq) = {
            let inner = self.lock();
            (Instant::now(), inner.seq)
        };
        let (hosts, loads) = read(db).await?;
        let read = Arc::new(Read {
            at: started,
            hosts,
            loads,
        });
        let mut inner = self.lock();
        if inner.dropped_at <= seq && inner.read.as_ref().is_none_or(|r| r.at <= started) {
            inner.placed.retain(|(s, _, _)| *s > seq);
            inner.reported.retain(|_, (at, _)| *at >= started);
            inner.read = Some(read.clone());
        }
        Ok(read)
    }

    /// Reads the database into the view (the background refresher's step).
    pub async fn refresh_now(&self, db: &Db) -> Result<(), DbError> {
        self.read_now(db).await.map(drop)
    }

    /// Records a placement on `host` (after its sandbox row was written).
    pub fn placed(&self, host: HostId, memory_mb: u32) {
        if self.refresh.is_zero() {
            return;
        }
        let mut inner = self.lock();
        inner.seq += 1;
        let seq = inner.seq;
        inner.placed.push((seq, host, u64::from(memory_mb)));
    }

    /// Records a heartbeat's report of the guest memory held on `host`.
    pub fn reported(&self, host: HostId, memory: GuestMemory) {
        if self.refresh.is_zero() {
            return;
        }
        self.lock().reported.insert(host, (Instant::now(), memory));
    }

    /// Drops the view: the next create reads the database.
    pub fn invalidate(&self) {
        if self.refresh.is_zero() {
            return;
        }
        let mut inner = self.lock();
        inner.seq += 1;
        inner.dropped_at = inner.seq;
        inner.read = None;
    }
}

async fn read(db: &Db) -> Result<(Vec<Host>, HashMap<HostId, HostLoad>), DbError> {
    tokio::try_join!(hosts::list_online(db), sandboxes::load_by_host(db))
}

fn join(
    hosts: &[Host],
    loads: &HashMap<HostId, HostLoad>,
    extra: impl Fn(HostId) -> (u64, u64),
    reported: &HashMap<HostId, (Instant, GuestMemory)>,
) -> Vec<(Host, HostLoad)> {
    hosts
        .iter()
        .map(|h| {
            let mut host = h.clone();
            if let Some((_, memory)) = reported.get(&h.id) {
                host.guest_memory = Some(*memory);
            }
            let mut load = loads.get(&h.id).copied().unwrap_or_default();
            let (n, mem) = extra(h.id);
            load.sandboxes += n;
            load.memory_mb += mem;
            (host, load)
        })
        .collect()
}

/// Reads the view every refresh period (a refresh of zero: returns at once).
pub async fn run(services: Arc<crate::state::Services>) {
    let view = &services.fleet;
    if view.refresh().is_zero() {
        return;
    }
    let mut ticker = tokio::time::interval(view.refresh());
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        if let Err(e) = view.refresh_now(&services.db).await {
            tracing::debug!(error = %e, "reading the fleet for placement");
        }
    }
}
