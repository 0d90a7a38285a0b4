//! The three metric tiers of one sandbox, as plain data: no clock, no I/O.
//!
//! A [`Tiers`] holds
//! - the **10 min** tier: the last [`RAW_CAPACITY`] samples as they came (one per 500 ms);
//! - the **2 h** tier: the last [`MID_CAPACITY`] averages of 30 s intervals;
//! - the **24 h** tier: the last [`DAY_CAPACITY`] averages of 5 min intervals.
//!
//! Invariants:
//! - every tier is a [`Ring`] of fixed capacity allocated up front: pushing into a full ring
//!   drops its oldest point, so a sandbox's metrics never take more than a fixed amount of
//!   memory however long it runs;
//! - an average covers the interval `[k × interval, (k + 1) × interval)` of wall-clock time
//!   and is stamped with its start; samples are added to the interval their timestamp falls
//!   in, and the interval is closed (its average pushed into the ring) when the first sample
//!   of a later interval arrives. A clock that steps back simply closes the interval too;
//! - the unfinished interval is still reported, as the last point of its tier (so a tier is
//!   never empty once a sample was taken), and is replaced by its final average later.
//!
//! Timestamps are given by the caller, which keeps this module deterministic and testable.

use std::collections::VecDeque;

/// Spacing of raw samples.
pub const RAW_INTERVAL_MS: i64 = 500;
/// Interval of the 2 h tier's averages.
pub const MID_INTERVAL_MS: i64 = 30_000;
/// Interval of the 24 h tier's averages.
pub const DAY_INTERVAL_MS: i64 = 300_000;
/// 10 minutes of 500 ms samples.
pub const RAW_CAPACITY: usize = 1200;
/// 2 hours of 30 s averages.
pub const MID_CAPACITY: usize = 240;
/// 24 hours of 5 min averages.
pub const DAY_CAPACITY: usize = 288;

/// One tier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Tier {
    /// 10 minutes of 500 ms samples.
    TenMinutes,
    /// 2 hours of 30 s averages.
    TwoHours,
    /// 24 hours of 5 min averages.
    Day,
}

impl Tier {
    /// Every tier, finest first.
    pub const ALL: [Tier; 3] = [Tier::TenMinutes, Tier::TwoHours, Tier::Day];

    /// Spacing of the tier's points.
    pub fn interval_ms(self) -> i64 {
        match self {
            Tier::TenMinutes => RAW_INTERVAL_MS,
            Tier::TwoHours => MID_INTERVAL_MS,
            Tier::Day => DAY_INTERVAL_MS,
        }
    }
}

/// A sample, or the average of the samples of an interval.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Point {
    /// Unix ms: when it was taken, or the start of the averaged interval.
    pub ts_ms: i64,
    /// Percent of one host CPU.
    pub cpu_pct: f64,
    /// Resident memory.
    pub mem_bytes: u64,
    /// Allocated disk.
    pub disk_bytes: u64,
}

/// A ring buffer of fixed capacity: the newest `capacity` items, oldest first.
#[derive(Debug, Clone)]
pub struct Ring<T> {
    items: VecDeque<T>,
    capacity: usize,
}

impl<T: Clone> Ring<T> {
    /// An empty ring holding at most `capacity` (at least 1) items.
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.max(1);
        Self {
            items: VecDeque::with_capacity(capacity),
            capacity,
        }
    }

    /// Appends `item`, dropping the oldest one when full.
    pub fn push(&mut self, item: T) {
        if self.items.len() == self.capacity {
            self.items.pop_front();
        }
        self.items.push_back(item);
    }

    /// Number of items.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// Whether it holds nothing.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// The most it holds.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// The items, oldest first.
    pub fn iter(&self) -> impl Iterator<Item = &T> {
        self.items.iter()
    }
}

/// Running sums of the samples of one interval.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    start_ms: i64,
    count: u32,
    cpu: f64,
    mem: u128,
    disk: u128,
}

impl Bucket {
    fn new(start_ms: i64) -> Self {
        Self {
            start_ms,
            count: 0,
            cpu: 0.0,
            mem: 0,
            disk: 0,
        }
    }

    fn add(&mut self, p: &Point) {
        self.count += 1;
        self.cpu += p.cpu_pct;
        self.mem += u128::from(p.mem_bytes);
        self.disk += u128::from(p.disk_bytes);
    }

    fn average(&self) -> Point {
        let n = self.count.max(1);
        Point {
            ts_ms: self.start_ms,
            cpu_pct: self.cpu / f64::from(n),
            mem_bytes: u64::try_from(self.mem / u128::from(n)).unwrap_or(u64::MAX),
            disk_bytes: u64::try_from(self.disk / u128::from(n)).unwrap_or(u64::MAX),
        }
    }
}

/// A tier of averages over fixed intervals.
#[derive(Debug, Clone)]
struct Averaged {
    interval_ms: i64,
    closed: Ring<Point>,
    open: Option<Bucket>,
}

impl Averaged {
    fn new(interval_ms: i64, capacity: usize) -> Self {
        Self {
            interval_ms,
            closed: Ring::new(capacity),
            open: None,
        }
    }

    fn push(&mut self, p: &Point) {
        let start = p.ts_ms.div_euclid(self.interval_ms) * self.interval_ms;
        match &mut self.open {
            Some(b) if b.start_ms == start => b.add(p),
            open => {
                if let Some(done) = open.take() {
                    self.closed.push(done.average());
                }
                let mut b = Bucket::new(start);
                b.add(p);
                *open = Some(b);
            }
        }
    }

    /// Closed averages then the open one, at most the ring's capacity in all.
    fn points(&self) -> Vec<Point> {
        let mut out: Vec<Point> = self.closed.iter().copied().collect();
        if let Some(b) = &self.open {
            if out.len() == self.closed.capacity() {
                out.remove(0);
            }
            out.push(b.average());
        }
        out
    }
}

/// The three tiers of one sandbox.
#[derive(Debug, Clone)]
pub struct Tiers {
    raw: Ring<Point>,
    mid: Averaged,
    day: Averaged,
}

impl Default for Tiers {
    fn default() -> Self {
        Self::new()
    }
}

impl Tiers {
    /// Empty tiers.
    pub fn new() -> Self {
        Self {
            raw: Ring::new(RAW_CAPACITY),
            mid: Averaged::new(MID_INTERVAL_MS, MID_CAPACITY),
            day: Averaged::new(DAY_INTERVAL_MS, DAY_CAPACITY),
        }
    }

    /// Records one sample in every tier.
    pub fn push(&mut self, sample: Point) {
        self.raw.push(sample);
        self.mid.push(&sample);
        self.day.push(&sample);
    }

    /// The points of one tier, oldest first.
    pub fn points(&self, tier: Tier) -> Vec<Point> {
        match tier {
            Tier::TenMinutes => self.raw.iter().copied().collect(),
            Tier::TwoHours => self.mid.points(),
            Tier::Day => self.day.points(),
        }
    }

    /// Whether no sample was ever recorded.
    pub fn is_empty(&self) -> bool {
        self.raw.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(ts_ms: i64, cpu: f64, mem: u64, disk: u64) -> Point {
        Point {
            ts_ms,
            cpu_pct: cpu,
            mem_bytes: mem,
            disk_bytes: disk,
        }
    }

    #[test]
    fn ring_keeps_the_newest_items_in_order() {
        let mut r = Ring::new(3);
        assert!(r.is_empty());
        for i in 0..5 {
            r.push(i);
        }
        assert_eq!(r.len(), 3);
        assert_eq!(r.capacity(), 3);
        assert_eq!(r.iter().copied().collect::<Vec<_>>(), [2, 3, 4]);
        let mut tiny = Ring::new(0);
        tiny.push(1);
        tiny.push(2);
        assert_eq!(
            tiny.iter().copied().collect::<Vec<_>>(),
            [2],
            "capacity at least 1"
        );
    }

    #[test]
    fn raw_tier_is_bounded_to_ten_minutes() {
        let mut t = Tiers::new();
        let start = 1_700_000_000_000;
        for i in 0..(RAW_CAPACITY as i64 + 500) {
            t.push(sample(start + i * RAW_INTERVAL_MS, 1.0, 10, 20));
        }
        let raw = t.points(Tier::TenMinutes);
        assert_eq!(raw.len(), RAW_CAPACITY);
        assert_eq!(raw[0].ts_ms, start + 500 * RAW_INTERVAL_MS);
        assert!(
            raw.windows(2)
                .all(|w| w[1].ts_ms - w[0].ts_ms == RAW_INTERVAL_MS)
        );
    }

    #[test]
    fn averages_close_when_the_next_interval_starts() {
        let mut t = Tiers::new();
        // 60 samples in [0, 30 s), then one in [30 s, 60 s).
        for i in 0..60 {
            t.push(sample(i * 500, i as f64, 100 + i as u64, 1000));
        }
        let mid = t.points(Tier::TwoHours);
        assert_eq!(mid.len(), 1, "only the open interval so far");
        assert_eq!(mid[0].ts_ms, 0);
        assert!((mid[0].cpu_pct - 29.5).abs() < 1e-9, "{}", mid[0].cpu_pct);
        t.push(sample(30_000, 100.0, 500, 3000));
        let mid = t.points(Tier::TwoHours);
        assert_eq!(mid.len(), 2);
        assert_eq!((mid[0].ts_ms, mid[1].ts_ms), (0, 30_000));
        assert!((mid[0].cpu_pct - 29.5).abs() < 1e-9);
        // mean of 100..=159 is 129.5, integer division keeps 129.
        assert_eq!(mid[0].mem_bytes, 129);
        assert_eq!(mid[0].disk_bytes, 1000);
        assert_eq!(mid[1], sample(30_000, 100.0, 500, 3000));
        // All of it is still inside the first 5 minutes.
        let day = t.points(Tier::Day);
        assert_eq!(day.len(), 1);
        assert_eq!(day[0].ts_ms, 0);
        assert_eq!(day[0].disk_bytes, (60 * 1000 + 3000) / 61);
    }

    #[test]
    fn intervals_align_to_wall_clock_and_skip_gaps() {
        let mut t = Tiers::new();
        // 12:00:29.5 and 12:00:30.0 fall in different 30 s intervals.
        let base = 1_700_000_100_000; // a multiple of 30 s and of 5 min
        assert_eq!(base % DAY_INTERVAL_MS, 0);
        t.push(sample(base + 29_500, 10.0, 1, 1));
        t.push(sample(base + 30_000, 20.0, 1, 1));
        // A pause of an hour: the next sample opens a new interval, nothing in between.
        t.push(sample(base + 3_600_000 + 100, 30.0, 1, 1));
        let mid: Vec<i64> = t.points(Tier::TwoHours).iter().map(|p| p.ts_ms).collect();
        assert_eq!(mid, [base, base + 30_000, base + 3_600_000]);
        let day: Vec<i64> = t.points(Tier::Day).iter().map(|p| p.ts_ms).collect();
        assert_eq!(day, [base, base + 3_600_000]);
    }

    #[test]
    fn averaged_tiers_are_bounded_and_include_the_open_interval() {
        let mut t = Tiers::new();
        // 25 hours at one sample per minute.
        for m in 0..(25 * 60) {
            t.push(sample(m * 60_000, 5.0, 7, 9));
        }
        let mid = t.points(Tier::TwoHours);
        assert_eq!(mid.len(), MID_CAPACITY);
        let day = t.points(Tier::Day);
        assert_eq!(day.len(), DAY_CAPACITY);
        let last = (25 * 60 - 1) * 60_000;
        assert_eq!(day.last().map(|p| p.ts_ms), Some(last / 300_000 * 300_000));
        assert_eq!(mid.last().map(|p| p.ts_ms), Some(last / 30_000 * 30_000));
        assert!(
            day.windows(2)
                .all(|w| w[1].ts_ms - w[0].ts_ms == DAY_INTERVAL_MS)
        );
        assert!(day.iter().all(|p| p.cpu_pct == 5.0 && p.mem_bytes == 7));
    }

    #[test]
    fn a_clock_stepping_back_closes_the_interval() {
        let mut t = Tiers::new();
        t.push(sample(60_000, 1.0, 1, 1));
        t.push(sample(10_000, 3.0, 1, 1));
        let mid: Vec<i64> = t.points(Tier::TwoHours).iter().map(|p| p.ts_ms).collect();
        assert_eq!(mid, [60_000, 0]);
        assert!(!t.is_empty());
        assert!(Tiers::new().points(Tier::Day).is_empty());
    }
}
