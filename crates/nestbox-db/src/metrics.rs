//! `sandbox_metric_points`: per-sandbox CPU, memory and disk samples flushed from the host
//! agent's ring buffers (10 min at 500 ms, 2 h at 30 s, 24 h at 5 min).
//!
//! Points are keyed by `(sandbox, tier, ts_ms)`; writing a point again replaces it, so a flush
//! can be retried. Points go with their sandbox. [`prune_tier`] keeps a tier to its window.

use nestbox_types::SandboxId;

use crate::engine::{Db, args};
use crate::error::{DbError, missing_as_not_found};
use crate::model::MetricTier;
use crate::page::Sql;

/// One sample.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MetricPoint {
    /// Milliseconds since the Unix epoch.
    pub ts_ms: i64,
    /// CPU use in percent of one vCPU times the sandbox's vCPUs (0–100 × vcpus).
    pub cpu_pct: f64,
    pub mem_bytes: u64,
    pub disk_bytes: u64,
}

/// Rows per `INSERT` when storing points (6 arguments each, well below both engines'
/// placeholder limits).
const INSERT_BATCH: usize = 200;

/// Stores points of one tier (one transaction, multi-row inserts); existing points at the
/// same time are replaced.
pub async fn upsert_points(
    db: &Db,
    sandbox: SandboxId,
    tier: MetricTier,
    points: &[MetricPoint],
) -> Result<(), DbError> {
    // One statement may not touch a row twice (PostgreSQL): the last point of a time wins.
    let unique: std::collections::BTreeMap<i64, &MetricPoint> =
        points.iter().map(|p| (p.ts_ms, p)).collect();
    let points: Vec<&MetricPoint> = unique.into_values().collect();
    let mut tx = db.begin().await?;
    for chunk in points.chunks(INSERT_BATCH) {
        let mut sql = Sql::new(
            "INSERT INTO sandbox_metric_points \
                 (sandbox_id, tier, ts_ms, cpu_pct, mem_bytes, disk_bytes) VALUES ",
        );
        for (i, p) in chunk.iter().enumerate() {
            sql.push(if i == 0 { "(" } else { ", (" })
                .bind(sandbox)
                .push(", ")
                .bind(tier)
                .push(", ")
                .bind(p.ts_ms)
                .push(", ")
                .bind(p.cpu_pct)
                .push(", ")
                .bind(p.mem_bytes)
                .push(", ")
                .bind(p.disk_bytes)
                .push(")");
        }
        sql.push(
            " ON CONFLICT (sandbox_id, tier, ts_ms) DO UPDATE SET \
                 cpu_pct = excluded.cpu_pct, mem_bytes = excluded.mem_bytes, \
                 disk_bytes = excluded.disk_bytes",
        );
        tx.conn()
            .execute(&sql.text, sql.args)
            .await
            .map_err(|e| missing_as_not_found(e, "sandbox", sandbox))?;
    }
    tx.commit().await
}

/// The points of one tier, oldest first.
pub async fn list_points(
    db: &Db,
    sandbox: SandboxId,
    tier: MetricTier,
) -> Result<Vec<MetricPoint>, DbError> {
    db.fetch_all(
        "SELECT ts_ms, cpu_pct, mem_bytes, disk_bytes FROM sandbox_metric_points \
         WHERE sandbox_id = $1 AND tier = $2 ORDER BY ts_ms",
        args![sandbox, tier],
        |r| {
            Ok(MetricPoint {
                ts_ms: r.i64("ts_ms")?,
                cpu_pct: r.f64("cpu_pct")?,
                mem_bytes: r.u64("mem_bytes")?,
                disk_bytes: r.u64("disk_bytes")?,
            })
        },
    )
    .await
}

/// Deletes points older than `before_ms` (any sandbox, any tier); returns how many.
pub async fn prune_before(db: &Db, before_ms: i64) -> Result<u64, DbError> {
    db.execute(
        "DELETE FROM sandbox_metric_points WHERE ts_ms < $1",
        args![before_ms],
    )
    .await
}

/// Deletes one sandbox's points of one tier older than `before_ms`; returns how many. A flush
/// calls it so that each tier keeps about its own window however often the sandbox pauses.
pub async fn prune_tier(
    db: &Db,
    sandbox: SandboxId,
    tier: MetricTier,
    before_ms: i64,
) -> Result<u64, DbError> {
    db.execute(
        "DELETE FROM sandbox_metric_points WHERE sandbox_id = $1 AND tier = $2 AND ts_ms < $3",
        args![sandbox, tier, before_ms],
    )
    .await
}
