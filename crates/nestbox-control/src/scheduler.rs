//! Placement of new sandboxes on hosts.
//!
//! A [`Scheduler`] picks among *candidates*: online hosts with their capacity and current
//! load. It is pure logic (no I/O), so every policy is unit-tested. A host fits when it has
//! a free sandbox slot and enough (overcommitted) memory; vCPUs are time-shared and not a
//! hard limit.

use std::sync::atomic::{AtomicUsize, Ordering};

use nestbox_types::HostId;

/// A host that could take a sandbox.
#[derive(Debug, Clone)]
pub struct Candidate {
    /// The host.
    pub host: HostId,
    /// Its agent's address.
    pub address: String,
    /// Most sandboxes it takes.
    pub max_sandboxes: u32,
    /// Its memory, MiB.
    pub memory_mb: u64,
    /// Sandboxes holding resources on it.
    pub sandboxes: u64,
    /// Memory they hold, MiB.
    pub used_memory_mb: u64,
}

/// What a new sandbox needs.
#[derive(Debug, Clone, Copy)]
pub struct Demand {
    /// Memory, MiB.
    pub memory_mb: u32,
    /// Allowed memory overcommit factor.
    pub overcommit: f64,
}

impl Candidate {
    /// Whether `demand` fits.
    pub fn fits(&self, demand: &Demand) -> bool {
        let mem_limit = (self.memory_mb as f64 * demand.overcommit) as u64;
        self.sandboxes < u64::from(self.max_sandboxes)
            && self.used_memory_mb + u64::from(demand.memory_mb) <= mem_limit
    }

    /// Fraction of the host in use (the larger of count and memory).
    pub fn load(&self, demand: &Demand) -> f64 {
        let count = self.sandboxes as f64 / f64::from(self.max_sandboxes.max(1));
        let mem = self.used_memory_mb as f64 / (self.memory_mb.max(1) as f64 * demand.overcommit);
        count.max(mem)
    }
}

/// A placement policy.
pub trait Scheduler: Send + Sync {
    /// Picks a host for `demand`, or `None` when none fits.
    fn pick<'a>(&self, candidates: &'a [Candidate], demand: &Demand) -> Option<&'a Candidate>;
}

/// Picks the least loaded host that fits (ties: the first).
#[derive(Debug, Default)]
pub struct LeastLoaded;

impl Scheduler for LeastLoaded {
    fn pick<'a>(&self, candidates: &'a [Candidate], demand: &Demand) -> Option<&'a Candidate> {
        candidates
            .iter()
            .filter(|c| c.fits(demand))
            .min_by(|a, b| a.load(demand).total_cmp(&b.load(demand)))
    }
}

/// Cycles through the hosts that fit (the seed's round robin).
#[derive(Debug, Default)]
pub struct RoundRobin {
    next: AtomicUsize,
}

impl Scheduler for RoundRobin {
    fn pick<'a>(&self, candidates: &'a [Candidate], demand: &Demand) -> Option<&'a Candidate> {
        let fitting: Vec<&Candidate> = candidates.iter().filter(|c| c.fits(demand)).collect();
        if fitting.is_empty() {
            return None;
        }
        let i = self.next.fetch_add(1, Ordering::Relaxed) % fitting.len();
        Some(fitting[i])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(sandboxes: u64, used: u64) -> Candidate {
        Candidate {
            host: HostId::new(),
            address: "http://x".into(),
            max_sandboxes: 4,
            memory_mb: 1024,
            sandboxes,
            used_memory_mb: used,
        }
    }

    const D: Demand = Demand {
        memory_mb: 512,
        overcommit: 1.0,
    };

    #[test]
    fn least_loaded_prefers_emptier_and_respects_limits() {
        let hosts = vec![host(2, 512), host(1, 0), host(4, 0)];
        assert_eq!(LeastLoaded.pick(&hosts, &D).unwrap().host, hosts[1].host);
        let full = vec![host(4, 0), host(0, 1024)];
        assert!(
            LeastLoaded.pick(&full, &D).is_none(),
            "count and memory are hard limits"
        );
        let over = Demand {
            memory_mb: 512,
            overcommit: 2.0,
        };
        assert!(
            LeastLoaded.pick(&full, &over).is_some(),
            "overcommit lets memory stretch"
        );
    }

    #[test]
    fn round_robin_cycles() {
        let hosts = vec![host(0, 0), host(0, 0)];
        let rr = RoundRobin::default();
        let a = rr.pick(&hosts, &D).unwrap().host;
        let b = rr.pick(&hosts, &D).unwrap().host;
        assert_ne!(a, b);
        assert!(rr.pick(&[], &D).is_none());
    }
}
