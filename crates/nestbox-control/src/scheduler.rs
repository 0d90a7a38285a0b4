//! Placement of new sandboxes on hosts.
//!
//! A [`Scheduler`] picks among *candidates*: online hosts with their capacity and current
//! load. It is pure logic (no I/O), so every policy is unit-tested. A host fits when it has
//! a free sandbox slot and enough memory: its memory times the allowed overcommit, but
//! never more than the memory that backs guest RAM there as its agent reported it (what
//! the host cannot back is never promised), counting the larger of what the control plane
//! placed there and what the agent says is held; vCPUs are time-shared and not a hard
//! limit. The policy is chosen by configuration ([`Policy`]).

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
    /// The memory that backs guest RAM there and what is held of it, MiB, as its agent
    /// last reported (`None`: not reported).
    pub guest_memory: Option<(u64, u64)>,
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
    /// The most memory sandboxes may hold here, MiB.
    fn memory_limit(&self, demand: &Demand) -> u64 {
        let overcommitted = (self.memory_mb as f64 * demand.overcommit) as u64;
        match self.guest_memory {
            Some((total, _)) => overcommitted.min(total),
            None => overcommitted,
        }
    }

    /// The memory held here, MiB.
    fn memory_used(&self) -> u64 {
        let reported = self.guest_memory.map_or(0, |(_, used)| used);
        self.used_memory_mb.max(reported)
    }

    /// Whether it has a free sandbox slot (whatever the memory).
    pub fn has_slot(&self) -> bool {
        self.sandboxes < u64::from(self.max_sandboxes)
    }

    /// Whether `demand` fits.
    pub fn fits(&self, demand: &Demand) -> bool {
        self.sandboxes < u64::from(self.max_sandboxes)
            && self.memory_used() + u64::from(demand.memory_mb) <= self.memory_limit(demand)
    }

    /// Fraction of the host in use (the larger of count and memory).
    pub fn load(&self, demand: &Demand) -> f64 {
        let count = self.sandboxes as f64 / f64::from(self.max_sandboxes.max(1));
        let mem = self.memory_used() as f64 / self.memory_limit(demand).max(1) as f64;
        count.max(mem)
    }
}

/// The placement policies, by the names configuration uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Policy {
    /// [`LeastLoaded`] (`least-loaded`).
    #[default]
    LeastLoaded,
    /// [`RoundRobin`] (`round-robin`).
    RoundRobin,
}

impl Policy {
    /// The scheduler of this policy.
    pub fn scheduler(self) -> Box<dyn Scheduler> {
        match self {
            Policy::LeastLoaded => Box::new(LeastLoaded),
            Policy::RoundRobin => Box::new(RoundRobin::default()),
        }
    }

    /// The name configuration uses.
    pub fn name(self) -> &'static str {
        match self {
            Policy::LeastLoaded => "least-loaded",
            Policy::RoundRobin => "round-robin",
        }
    }
}

impl std::str::FromStr for Policy {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "least-loaded" => Ok(Policy::LeastLoaded),
            "round-robin" => Ok(Policy::RoundRobin),
            other => Err(format!(
                "unknown scheduling policy `{other}` (least-loaded or round-robin)"
            )),
        }
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
            guest_memory: None,
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
    fn never_more_than_the_host_can_back() {
        // 1 GiB of memory, overcommit 2: 2 GiB by the host's size, but only 768 MiB of
        // guest memory behind it.
        let mut h = host(0, 0);
        h.guest_memory = Some((768, 0));
        let over = Demand {
            memory_mb: 512,
            overcommit: 2.0,
        };
        assert!(h.fits(&over));
        h.used_memory_mb = 512;
        assert!(!h.fits(&over), "512 + 512 > 768 backed");
        // What the agent says is held counts when it is more than the control plane knows
        // (a sandbox placed a moment ago counts when the report is older).
        let mut h = host(0, 0);
        h.guest_memory = Some((2048, 1800));
        assert!(!h.fits(&over));
        h.guest_memory = Some((2048, 100));
        h.used_memory_mb = 1600;
        assert!(!h.fits(&over));
        h.used_memory_mb = 1000;
        assert!(h.fits(&over));
    }

    #[test]
    fn policies_by_name() {
        for p in [Policy::LeastLoaded, Policy::RoundRobin] {
            assert_eq!(p.name().parse::<Policy>().unwrap(), p);
        }
        assert!("random".parse::<Policy>().is_err());
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
