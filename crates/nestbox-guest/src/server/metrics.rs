//! `GET /metrics`: CPU from `/proc/stat` deltas, memory from `/proc/meminfo`, disk from
//! `statvfs("/")`.
//!
//! CPU usage is the busy share of all CPUs between this call and the previous one (the
//! first call measures from server start), so a poller gets the average over its interval.

use std::io;

use nestbox_envd::types::Metrics;

use super::state::Server;

/// Cumulative CPU time, in clock ticks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuSample {
    busy: u64,
    total: u64,
    cpus: u32,
}

/// Parses the aggregate `cpu` line and counts the `cpuN` lines of `/proc/stat`.
pub fn parse_cpu(stat: &str) -> Option<CpuSample> {
    let mut sample = None;
    let mut cpus = 0;
    for line in stat.lines() {
        let mut fields = line.split_ascii_whitespace();
        match fields.next() {
            Some("cpu") => {
                // user nice system idle iowait irq softirq steal (guest time is already
                // counted in user and nice).
                let values: Vec<u64> = fields.take(8).filter_map(|f| f.parse().ok()).collect();
                if values.len() < 4 {
                    return None;
                }
                let total: u64 = values.iter().sum();
                let idle = values[3] + values.get(4).copied().unwrap_or(0);
                sample = Some((total.saturating_sub(idle), total));
            }
            Some(name) if name.starts_with("cpu") => cpus += 1,
            _ => {}
        }
    }
    sample.map(|(busy, total)| CpuSample {
        busy,
        total,
        cpus: cpus.max(1),
    })
}

/// Reads `/proc/stat`.
pub fn read_cpu() -> io::Result<CpuSample> {
    let text = std::fs::read_to_string("/proc/stat")?;
    parse_cpu(&text).ok_or_else(|| io::Error::other("unexpected /proc/stat format"))
}

/// Busy percent between two samples.
pub fn cpu_percent(before: Option<CpuSample>, now: CpuSample) -> f32 {
    let (busy, total) = match before {
        Some(b) if now.total > b.total => (now.busy.saturating_sub(b.busy), now.total - b.total),
        _ => (now.busy, now.total),
    };
    if total == 0 {
        return 0.0;
    }
    // Precision loss is irrelevant for a percentage.
    #[allow(clippy::cast_precision_loss)]
    let pct = (busy as f64 / total as f64 * 100.0) as f32;
    pct.clamp(0.0, 100.0)
}

/// `(MemTotal, MemTotal - MemAvailable)` in bytes.
pub fn parse_meminfo(text: &str) -> (u64, u64) {
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| {
                rest.trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<u64>()
                    .ok()
            })
            .unwrap_or(0)
            * 1024
    };
    let total = field("MemTotal:");
    let available = field("MemAvailable:");
    (total, total.saturating_sub(available))
}

/// Takes a sample.
pub fn collect(server: &Server) -> Metrics {
    let mut metrics = Metrics {
        ts: chrono::Utc::now().timestamp(),
        ..Metrics::default()
    };
    match read_cpu() {
        Ok(now) => {
            let mut previous = server.cpu.lock().unwrap_or_else(|e| e.into_inner());
            metrics.cpu_count = now.cpus;
            metrics.cpu_used_pct = cpu_percent(*previous, now);
            *previous = Some(now);
        }
        Err(e) => tracing::warn!(error = %e, "cannot read cpu usage"),
    }
    match std::fs::read_to_string("/proc/meminfo") {
        Ok(text) => (metrics.mem_total, metrics.mem_used) = parse_meminfo(&text),
        Err(e) => tracing::warn!(error = %e, "cannot read memory usage"),
    }
    match nix::sys::statvfs::statvfs("/") {
        Ok(fs) => {
            let frag = fs.fragment_size();
            metrics.disk_total = fs.blocks().saturating_mul(frag);
            metrics.disk_used = fs
                .blocks()
                .saturating_sub(fs.blocks_free())
                .saturating_mul(frag);
        }
        Err(e) => tracing::warn!(error = %e, "cannot read disk usage"),
    }
    metrics
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_deltas() {
        let a = parse_cpu("cpu  100 0 100 700 100 0 0 0 0 0\ncpu0 1 2 3 4\ncpu1 1 2 3 4\nintr 5\n")
            .unwrap();
        assert_eq!(a.cpus, 2);
        assert_eq!(a.total, 1000);
        assert_eq!(a.busy, 200);
        let b = parse_cpu("cpu  150 0 150 750 150 0 0 0 0 0\n").unwrap();
        assert!((cpu_percent(Some(a), b) - 50.0).abs() < 0.01);
        assert!((cpu_percent(None, a) - 20.0).abs() < 0.01);
        assert!(parse_cpu("nothing").is_none());
    }

    #[test]
    fn meminfo() {
        let (total, used) =
            parse_meminfo("MemTotal:  2048 kB\nMemFree: 10 kB\nMemAvailable:   1024 kB\n");
        assert_eq!(total, 2048 * 1024);
        assert_eq!(used, 1024 * 1024);
    }
}
