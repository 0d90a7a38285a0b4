//! Sandbox metrics: one sampler task for every sandbox of the host.
//!
//! ```text
//!   sandbox task ── track(pid, disk) ──▶ ┌──────────── sampler task ────────────┐
//!                ── untrack (pause) ───▶ │ every 500 ms, per tracked sandbox:   │
//!                ── retire (destroy) ──▶ │   /proc/PID/stat, /proc/PID/status,  │
//!   gRPC ── get / flush (reply) ───────▶ │   stat(disk) → Tiers (ring buffers)  │
//!                                        └──────────────────────────────────────┘
//! ```
//!
//! The sampler task owns every sandbox's [`Tiers`]; the rest of the agent talks to it
//! through [`Metrics`] messages. Lifecycle notices (track, untrack, retire) wait for room in
//! the queue and are never lost; queries (get, flush) fail with "busy" when the queue is
//! full instead of waiting.
//!
//! What is sampled (see [`procfs`]): CPU is the VMM process's user + system time over wall
//! time between two samples, in percent of **one host CPU** (a VMM using two cores fully
//! reads 200), clamped to `100 × vcpus` (a QEMU's I/O threads can briefly exceed its vCPUs;
//! the contract promises the bound). The first sample of a process only sets the baseline.
//! Memory is the VMM's resident set (VmRSS), which includes the guest RAM it touched. Disk
//! is the copy-on-write overlay's allocated size (`st_blocks × 512`).
//!
//! Invariants:
//! - only running sandboxes are sampled; a paused sandbox keeps its tiers (the control
//!   plane stores them with [`Metrics::flush`] and reads the live ones meanwhile), and they
//!   continue after a resume;
//! - when a sandbox is destroyed, its 24 h tier is kept until one flush hands it over, or
//!   for [`RETAIN_FOR`] at most ([`RETAIN_MAX`] sandboxes at most), so memory stays bounded
//!   even if the control plane never asks;
//! - the reads are a few small procfs reads and one `stat` per sandbox, done inline on the
//!   runtime: cheaper than handing them to a blocking thread.

pub mod procfs;
pub mod ring;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use nestbox_types::SandboxId;
use tokio::sync::{mpsc, oneshot};
use tracing::Instrument;

pub use ring::{Point, Tier, Tiers};

use crate::error::AgentError;

/// How often running sandboxes are sampled.
pub const SAMPLE_INTERVAL: Duration = Duration::from_millis(ring::RAW_INTERVAL_MS as u64);
/// How long a destroyed sandbox's 24 h tier waits for its flush.
pub const RETAIN_FOR: Duration = Duration::from_secs(3600);
/// Most destroyed sandboxes whose 24 h tier is kept.
pub const RETAIN_MAX: usize = 4096;
/// Queue length of the sampler.
const QUEUE: usize = 256;

/// A tier's points, as handed out.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    /// Which tier.
    pub tier: Tier,
    /// Oldest first.
    pub points: Vec<Point>,
}

/// What the sampler needs to sample a running sandbox.
#[derive(Debug, Clone)]
pub struct Target {
    /// The VMM's process id.
    pub pid: u32,
    /// The sandbox's copy-on-write disk.
    pub disk: PathBuf,
    /// Its vCPUs (the CPU bound).
    pub vcpus: u32,
}

enum Msg {
    Track(SandboxId, Target),
    Untrack(SandboxId),
    Retire(SandboxId),
    Get {
        id: SandboxId,
        tier: Tier,
        reply: oneshot::Sender<Option<Series>>,
    },
    Flush {
        id: SandboxId,
        reply: oneshot::Sender<Option<Vec<Series>>>,
    },
}

/// What sampling has cost so far (for benchmarks).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SamplerStats {
    /// Wall time spent in sampling passes.
    pub busy: Duration,
    /// Sandbox samples taken (baselines included).
    pub samples: u64,
}

#[derive(Debug, Default)]
struct Counters {
    busy_ns: AtomicU64,
    samples: AtomicU64,
}

/// The handle to the sampler task. Cloning it is cheap; the task ends when every handle is
/// dropped.
#[derive(Debug, Clone)]
pub struct Metrics {
    tx: mpsc::Sender<Msg>,
    counters: Arc<Counters>,
}

impl Metrics {
    /// Starts the sampler task.
    pub fn start() -> Self {
        let (tx, rx) = mpsc::channel(QUEUE);
        let counters = Arc::new(Counters::default());
        let sampler = Sampler {
            counters: counters.clone(),
            ..Sampler::default()
        };
        tokio::spawn(
            sampler
                .run(rx)
                .instrument(tracing::info_span!("metrics_sampler")),
        );
        Self { tx, counters }
    }

    /// What sampling has cost since the start.
    pub fn stats(&self) -> SamplerStats {
        SamplerStats {
            busy: Duration::from_nanos(self.counters.busy_ns.load(Ordering::Relaxed)),
            samples: self.counters.samples.load(Ordering::Relaxed),
        }
    }

    async fn notify(&self, msg: Msg) {
        // Fails only when the sampler is gone (agent shutdown): nothing left to record.
        let _ = self.tx.send(msg).await;
    }

    /// Starts sampling a sandbox that runs now (after a create or a resume).
    pub async fn track(&self, id: SandboxId, target: Target) {
        self.notify(Msg::Track(id, target)).await;
    }

    /// Stops sampling a sandbox whose VM stops (pause); its tiers are kept.
    pub async fn untrack(&self, id: SandboxId) {
        self.notify(Msg::Untrack(id)).await;
    }

    /// Forgets a destroyed sandbox, keeping its 24 h tier for one flush.
    pub async fn retire(&self, id: SandboxId) {
        self.notify(Msg::Retire(id)).await;
    }

    async fn ask<T>(
        &self,
        id: SandboxId,
        make: impl FnOnce(oneshot::Sender<T>) -> Msg,
    ) -> Result<T, AgentError> {
        let (reply, rx) = oneshot::channel();
        self.tx.try_send(make(reply)).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => AgentError::Busy(id),
            mpsc::error::TrySendError::Closed(_) => {
                AgentError::Internal("the metrics sampler has stopped".into())
            }
        })?;
        rx.await
            .map_err(|_| AgentError::Internal("the metrics sampler did not answer".into()))
    }

    /// One tier of a sandbox the sampler knows (running, or paused after running here);
    /// `None` if it knows nothing of it.
    pub async fn get(&self, id: SandboxId, tier: Tier) -> Result<Option<Series>, AgentError> {
        self.ask(id, |reply| Msg::Get { id, tier, reply }).await
    }

    /// What to store: every tier of a sandbox the sampler knows, or the 24 h tier of a
    /// destroyed one (handed over once). `None` if it has neither.
    pub async fn flush(&self, id: SandboxId) -> Result<Option<Vec<Series>>, AgentError> {
        self.ask(id, |reply| Msg::Flush { id, reply }).await
    }
}

/// The CPU counter of the previous sample.
#[derive(Debug, Clone, Copy)]
struct Baseline {
    ticks: u64,
    at: Instant,
}

#[derive(Debug)]
struct Entry {
    tiers: Tiers,
    target: Option<Target>,
    baseline: Option<Baseline>,
}

#[derive(Debug)]
struct Retired {
    at: Instant,
    /// Order of retirement (the oldest is evicted first).
    seq: u64,
    day: Vec<Point>,
}

/// The sampler task's state.
#[derive(Debug)]
struct Sampler {
    entries: HashMap<SandboxId, Entry>,
    retired: HashMap<SandboxId, Retired>,
    retired_seq: u64,
    ticks_per_sec: u64,
    counters: Arc<Counters>,
}

impl Default for Sampler {
    fn default() -> Self {
        Self {
            entries: HashMap::new(),
            retired: HashMap::new(),
            retired_seq: 0,
            ticks_per_sec: procfs::clock_ticks(),
            counters: Arc::default(),
        }
    }
}

/// CPU percent of one host CPU between two counter readings, clamped to `[0, 100 × vcpus]`.
pub fn cpu_percent(ticks_delta: u64, ticks_per_sec: u64, elapsed: Duration, vcpus: u32) -> f64 {
    let secs = elapsed.as_secs_f64();
    if secs <= 0.0 || ticks_per_sec == 0 {
        return 0.0;
    }
    let pct = ticks_delta as f64 / ticks_per_sec as f64 / secs * 100.0;
    pct.clamp(0.0, 100.0 * f64::from(vcpus.max(1)))
}

impl Sampler {
    async fn run(mut self, mut rx: mpsc::Receiver<Msg>) {
        let mut tick = tokio::time::interval(SAMPLE_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                msg = rx.recv() => match msg {
                    Some(msg) => self.handle(msg),
                    None => return,
                },
                _ = tick.tick() => self.sample_all(),
            }
        }
    }

    fn handle(&mut self, msg: Msg) {
        match msg {
            Msg::Track(id, target) => {
                self.retired.remove(&id);
                let entry = self.entries.entry(id).or_insert_with(|| Entry {
                    tiers: Tiers::new(),
                    target: None,
                    baseline: None,
                });
                entry.target = Some(target);
                entry.baseline = None;
            }
            Msg::Untrack(id) => {
                if let Some(e) = self.entries.get_mut(&id) {
                    e.target = None;
                    e.baseline = None;
                }
            }
            Msg::Retire(id) => {
                if let Some(e) = self.entries.remove(&id)
                    && !e.tiers.is_empty()
                {
                    self.retire(id, e.tiers.points(Tier::Day));
                }
            }
            Msg::Get { id, tier, reply } => {
                let series = self.entries.get(&id).map(|e| Series {
                    tier,
                    points: e.tiers.points(tier),
                });
                let _ = reply.send(series);
            }
            Msg::Flush { id, reply } => {
                let out = match self.entries.get(&id) {
                    Some(e) => Some(
                        Tier::ALL
                            .iter()
                            .map(|&tier| Series {
                                tier,
                                points: e.tiers.points(tier),
                            })
                            .collect(),
                    ),
                    None => self.retired.remove(&id).map(|r| {
                        vec![Series {
                            tier: Tier::Day,
                            points: r.day,
                        }]
                    }),
                };
                let _ = reply.send(out);
            }
        }
    }

    fn retire(&mut self, id: SandboxId, day: Vec<Point>) {
        let now = Instant::now();
        self.retired
            .retain(|_, r| now.duration_since(r.at) < RETAIN_FOR);
        if self.retired.len() >= RETAIN_MAX
            && let Some(oldest) = self
                .retired
                .iter()
                .min_by_key(|(_, r)| r.seq)
                .map(|(id, _)| *id)
        {
            self.retired.remove(&oldest);
        }
        self.retired_seq += 1;
        self.retired.insert(
            id,
            Retired {
                at: now,
                seq: self.retired_seq,
                day,
            },
        );
    }

    fn sample_all(&mut self) {
        let started = Instant::now();
        let now_ms = chrono::Utc::now().timestamp_millis();
        let ticks_per_sec = self.ticks_per_sec;
        let mut sampled = 0u64;
        for (id, entry) in &mut self.entries {
            let Some(target) = &entry.target else {
                continue;
            };
            sampled += 1;
            match sample(target, entry.baseline, ticks_per_sec) {
                Ok((baseline, cpu, mem, disk)) => {
                    if let Some(cpu_pct) = cpu {
                        entry.tiers.push(Point {
                            ts_ms: now_ms,
                            cpu_pct,
                            mem_bytes: mem,
                            disk_bytes: disk,
                        });
                    }
                    entry.baseline = Some(baseline);
                }
                // The VMM exited; its task notices and retires the sandbox.
                Err(e) => tracing::debug!(sandbox = %id, error = %e, "sampling skipped"),
            }
        }
        if sampled > 0 {
            let busy = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
            self.counters.busy_ns.fetch_add(busy, Ordering::Relaxed);
            self.counters.samples.fetch_add(sampled, Ordering::Relaxed);
        }
    }
}

/// Reads one sandbox's counters: the new baseline, the CPU percent since the previous one
/// (none for the first reading), RSS and disk bytes.
fn sample(
    target: &Target,
    previous: Option<Baseline>,
    ticks_per_sec: u64,
) -> Result<(Baseline, Option<f64>, u64, u64), procfs::ProcError> {
    let at = Instant::now();
    let ticks = procfs::cpu_ticks(target.pid)?;
    let mem = procfs::rss_bytes(target.pid)?;
    let disk = procfs::allocated_bytes(&target.disk)?;
    let cpu = previous.map(|p| {
        cpu_percent(
            ticks.saturating_sub(p.ticks),
            ticks_per_sec,
            at.duration_since(p.at),
            target.vcpus,
        )
    });
    Ok((Baseline { ticks, at }, cpu, mem, disk))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_percent_is_of_one_host_cpu_and_bounded() {
        let s = Duration::from_millis(500);
        // 50 ticks at 100 per second in half a second: one CPU fully busy.
        assert!((cpu_percent(50, 100, s, 1) - 100.0).abs() < 1e-9);
        assert!((cpu_percent(5, 100, s, 1) - 10.0).abs() < 1e-9);
        assert!((cpu_percent(100, 100, s, 2) - 200.0).abs() < 1e-9);
        assert_eq!(cpu_percent(100, 100, s, 1), 100.0, "clamped to the vCPUs");
        assert_eq!(cpu_percent(10, 100, Duration::ZERO, 1), 0.0);
        assert_eq!(cpu_percent(0, 100, s, 4), 0.0);
    }

    fn target() -> Target {
        Target {
            pid: std::process::id(),
            disk: std::env::current_exe().unwrap(),
            vcpus: 64,
        }
    }

    /// A sampler whose sandbox `id` has one point, without sampling anything.
    fn with_points(sampler: &mut Sampler, id: SandboxId, ts_ms: i64) {
        let mut tiers = Tiers::new();
        tiers.push(Point {
            ts_ms,
            cpu_pct: 1.0,
            mem_bytes: 2,
            disk_bytes: 3,
        });
        sampler.entries.insert(
            id,
            Entry {
                tiers,
                target: None,
                baseline: None,
            },
        );
    }

    fn flush_now(sampler: &mut Sampler, id: SandboxId) -> Option<Vec<Series>> {
        let (reply, mut rx) = oneshot::channel();
        sampler.handle(Msg::Flush { id, reply });
        rx.try_recv().unwrap()
    }

    #[test]
    fn destroyed_sandboxes_are_kept_for_one_flush_and_bounded() {
        let mut sampler = Sampler::default();
        let first = SandboxId::new();
        with_points(&mut sampler, first, 0);
        sampler.handle(Msg::Retire(first));
        assert!(sampler.entries.is_empty());
        for i in 1..RETAIN_MAX {
            let id = SandboxId::new();
            with_points(&mut sampler, id, i as i64);
            sampler.handle(Msg::Retire(id));
        }
        assert_eq!(sampler.retired.len(), RETAIN_MAX);
        // One more pushes the oldest out.
        let last = SandboxId::new();
        with_points(&mut sampler, last, 1);
        sampler.handle(Msg::Retire(last));
        assert_eq!(sampler.retired.len(), RETAIN_MAX);
        assert_eq!(flush_now(&mut sampler, first), None, "evicted");
        let day = flush_now(&mut sampler, last).unwrap();
        assert_eq!(day.len(), 1);
        assert_eq!(day[0].tier, Tier::Day);
        assert_eq!(day[0].points.len(), 1);
        assert_eq!(flush_now(&mut sampler, last), None, "handed over once");
        // A sandbox never sampled leaves nothing behind.
        let idle = SandboxId::new();
        sampler.handle(Msg::Track(
            idle,
            Target {
                pid: 1,
                disk: PathBuf::from("/nonexistent"),
                vcpus: 1,
            },
        ));
        sampler.handle(Msg::Retire(idle));
        assert_eq!(flush_now(&mut sampler, idle), None);
    }

    #[test]
    fn a_resumed_sandbox_continues_its_tiers() {
        let mut sampler = Sampler::default();
        let id = SandboxId::new();
        with_points(&mut sampler, id, 0);
        sampler.handle(Msg::Untrack(id));
        let target = Target {
            pid: 1,
            disk: PathBuf::from("/nonexistent"),
            vcpus: 1,
        };
        sampler.handle(Msg::Track(id, target));
        let entry = &sampler.entries[&id];
        assert!(entry.target.is_some() && entry.baseline.is_none());
        assert_eq!(entry.tiers.points(Tier::TenMinutes).len(), 1, "kept");
        let all = flush_now(&mut sampler, id).unwrap();
        assert_eq!(all.len(), 3);
    }

    #[tokio::test]
    async fn samples_tracked_sandboxes_and_hands_over_the_day_tier_once() {
        let metrics = Metrics::start();
        let id = SandboxId::new();
        assert_eq!(metrics.get(id, Tier::TenMinutes).await.unwrap(), None);
        assert_eq!(metrics.flush(id).await.unwrap(), None);
        metrics.track(id, target()).await;
        // The first reading is a baseline; poll for a real sample.
        let deadline = Instant::now() + Duration::from_secs(30);
        let points = loop {
            let s = metrics.get(id, Tier::TenMinutes).await.unwrap().unwrap();
            if !s.points.is_empty() {
                break s.points;
            }
            assert!(Instant::now() < deadline, "no sample");
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        assert!(points[0].mem_bytes > 0 && points[0].disk_bytes > 0);
        assert!(points[0].cpu_pct >= 0.0);
        let stats = metrics.stats();
        assert!(
            stats.samples >= 2 && stats.busy > Duration::ZERO,
            "{stats:?}"
        );
        metrics.untrack(id).await;
        let flushed = metrics.flush(id).await.unwrap().unwrap();
        assert_eq!(
            flushed.iter().map(|s| s.tier).collect::<Vec<_>>(),
            Tier::ALL
        );
        assert!(flushed.iter().all(|s| !s.points.is_empty()));
        // Flushing a known sandbox is repeatable.
        assert!(metrics.flush(id).await.unwrap().is_some());
        metrics.retire(id).await;
        assert_eq!(metrics.get(id, Tier::Day).await.unwrap(), None);
        let day = metrics.flush(id).await.unwrap().unwrap();
        assert_eq!(day.len(), 1);
        assert_eq!(day[0].tier, Tier::Day);
        assert!(!day[0].points.is_empty());
        assert_eq!(metrics.flush(id).await.unwrap(), None, "handed over once");
    }
}
