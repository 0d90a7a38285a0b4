//! Sandbox metrics: CPU, memory and disk over the last 10 minutes, 2 hours or 24 hours.
//!
//! The host agent samples every running sandbox and keeps three tiers in memory (10 min of
//! 500 ms samples, 2 h of 30 s averages, 24 h of 5 min averages). The control plane owns
//! the database, so it is the one that stores them:
//!
//! ```text
//!   pause (asked)           ──▶ PauseSandbox, then FlushSandboxMetrics → every tier stored
//!   pause (inactivity)      ──▶ the host monitor sees it, FlushSandboxMetrics → every tier
//!   destroy                 ──▶ DestroySandbox, then FlushSandboxMetrics → the 24 h tier
//! ```
//!
//! Rules for `GET /v1/sandboxes/{id}/metrics?range=`:
//! - `range` is `10m` (default), `2h` or `24h`; anything else is `invalid_request`;
//! - another team's sandbox is `sandbox_not_found`, as everywhere;
//! - a running sandbox's points come live from its host (`source: live`); a starting one
//!   has none yet;
//! - a paused (or `missing`) sandbox's points come from the database (`source: stored`),
//!   limited to the range before the newest stored point. If nothing was stored (the flush
//!   after the pause failed), the host is asked once more and what it hands over is stored;
//! - a stopped or failed sandbox has no metrics: `not_found`.
//!
//! A flush writes with upserts keyed by time, so repeating one is harmless, then drops the
//! tier's points older than its window before the newest one (the database holds about one
//! window per tier and sandbox); a failed flush is logged and never fails the pause or
//! destroy it follows.

use chrono::{DateTime, Utc};
use nestbox_db::metrics::{self as repo, MetricPoint};
use nestbox_db::{Db, MetricTier};
use nestbox_proto::hostagent::{
    FlushSandboxMetricsRequest, GetSandboxMetricsRequest, MetricSeries, MetricsRange,
};
use nestbox_types::api;
use nestbox_types::{ErrorCode, SandboxId, SandboxStatus};

use crate::error::{ApiError, ApiResult, from_agent};
use crate::extract::Caller;
use crate::hostpool::AgentClient;
use crate::state::Services;

/// How long a flush may take on the agent.
const FLUSH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Parses `range` (`10m` when absent).
pub fn parse_range(range: Option<&str>) -> ApiResult<MetricTier> {
    match range {
        None => Ok(MetricTier::TenMinutes),
        Some(r) => r.parse().map_err(|_| {
            ApiError::invalid(format!(
                "range: `{}` is not one of 10m, 2h, 24h",
                r.chars().take(16).collect::<String>()
            ))
        }),
    }
}

fn range_pb(tier: MetricTier) -> MetricsRange {
    match tier {
        MetricTier::TenMinutes => MetricsRange::TenMinutes,
        MetricTier::TwoHours => MetricsRange::TwoHours,
        MetricTier::Day => MetricsRange::Day,
    }
}

fn tier_of(range: i32) -> Option<MetricTier> {
    match MetricsRange::try_from(range).ok()? {
        MetricsRange::TenMinutes => Some(MetricTier::TenMinutes),
        MetricsRange::TwoHours => Some(MetricTier::TwoHours),
        MetricsRange::Day => Some(MetricTier::Day),
        MetricsRange::Unspecified => None,
    }
}

/// Spacing of a tier's points, ms.
fn interval_ms(tier: MetricTier) -> u32 {
    match tier {
        MetricTier::TenMinutes => 500,
        MetricTier::TwoHours => 30_000,
        MetricTier::Day => 300_000,
    }
}

/// What a tier covers, ms.
fn window_ms(tier: MetricTier) -> i64 {
    match tier {
        MetricTier::TenMinutes => 10 * 60_000,
        MetricTier::TwoHours => 2 * 3_600_000,
        MetricTier::Day => 24 * 3_600_000,
    }
}

fn db_points(series: &MetricSeries) -> Vec<MetricPoint> {
    series
        .points
        .iter()
        .map(|p| MetricPoint {
            ts_ms: p.ts_unix_ms,
            cpu_pct: p.cpu_pct,
            mem_bytes: p.mem_bytes,
            disk_bytes: p.disk_bytes,
        })
        .collect()
}

fn view(
    id: SandboxId,
    tier: MetricTier,
    source: &str,
    points: impl IntoIterator<Item = MetricPoint>,
) -> api::SandboxMetrics {
    api::SandboxMetrics {
        sandbox_id: id,
        range: tier.as_str().to_string(),
        interval_ms: interval_ms(tier),
        source: source.to_string(),
        points: points
            .into_iter()
            .map(|p| api::MetricPoint {
                timestamp: DateTime::<Utc>::from_timestamp_millis(p.ts_ms).unwrap_or_default(),
                cpu_pct: p.cpu_pct,
                mem_bytes: p.mem_bytes,
                disk_bytes: p.disk_bytes,
            })
            .collect(),
    }
}

/// Asks the agent for the sandbox's metrics to keep and stores them; returns how many
/// points were stored.
#[tracing::instrument(skip(db, client), fields(sandbox = %id))]
pub(crate) async fn flush(db: &Db, client: &mut AgentClient, id: SandboxId) -> ApiResult<usize> {
    let mut rpc = tonic::Request::new(FlushSandboxMetricsRequest {
        sandbox_id: id.to_string(),
    });
    rpc.set_timeout(FLUSH_TIMEOUT);
    let flushed = client
        .flush_sandbox_metrics(rpc)
        .await
        .map_err(|s| from_agent(&s))?
        .into_inner();
    let mut stored = 0;
    for series in &flushed.series {
        let Some(tier) = tier_of(series.range) else {
            continue;
        };
        let points = db_points(series);
        repo::upsert_points(db, id, tier, &points).await?;
        stored += points.len();
        // Each tier keeps about its window, however often the sandbox pauses.
        if let Some(newest) = points.iter().map(|p| p.ts_ms).max() {
            repo::prune_tier(db, id, tier, newest - window_ms(tier)).await?;
        }
    }
    tracing::debug!(stored, "metrics flushed");
    Ok(stored)
}

/// [`flush`] after a pause or destroy: a failure is logged, never returned (the change it
/// follows has happened; the data is still on the agent for a later flush).
pub(crate) async fn flush_logged(db: &Db, client: &mut AgentClient, id: SandboxId, after: &str) {
    if let Err(e) = flush(db, client, id).await {
        tracing::warn!(sandbox = %id, after, error = %e, "storing the sandbox's metrics");
    }
}

impl Services {
    /// A sandbox's metrics over `range` (`10m`, `2h` or `24h`; `10m` when absent).
    #[tracing::instrument(skip(self, caller), fields(team = %caller.team))]
    pub async fn sandbox_metrics(
        &self,
        caller: &Caller,
        id: SandboxId,
        range: Option<&str>,
    ) -> ApiResult<api::SandboxMetrics> {
        let tier = parse_range(range)?;
        let sb = self.sandbox_row(caller, id).await?;
        match sb.status {
            SandboxStatus::Running => {
                let (_, mut client) = self.agent_for(sb.host_id).await?;
                let mut rpc = tonic::Request::new(GetSandboxMetricsRequest {
                    sandbox_id: id.to_string(),
                    range: range_pb(tier) as i32,
                });
                rpc.set_timeout(FLUSH_TIMEOUT);
                let series = client
                    .get_sandbox_metrics(rpc)
                    .await
                    .map_err(|s| from_agent(&s))?
                    .into_inner()
                    .series
                    .unwrap_or_default();
                Ok(view(id, tier, "live", db_points(&series)))
            }
            SandboxStatus::Pending | SandboxStatus::Starting => {
                Ok(view(id, tier, "live", Vec::new()))
            }
            SandboxStatus::Paused | SandboxStatus::Missing => {
                let mut points = repo::list_points(&self.db, id, tier).await?;
                if points.is_empty()
                    && sb.status == SandboxStatus::Paused
                    && let Ok((_, mut client)) = self.agent_for(sb.host_id).await
                {
                    flush_logged(&self.db, &mut client, id, "a read of a paused sandbox").await;
                    points = repo::list_points(&self.db, id, tier).await?;
                }
                let newest = points.last().map(|p| p.ts_ms).unwrap_or_default();
                let from = newest - window_ms(tier);
                Ok(view(
                    id,
                    tier,
                    "stored",
                    points.into_iter().filter(|p| p.ts_ms > from),
                ))
            }
            SandboxStatus::Stopped | SandboxStatus::Error => Err(ApiError::new(
                ErrorCode::NotFound,
                format!("sandbox {id} is {}: it has no metrics", sb.status),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        assert_eq!(parse_range(None).unwrap(), MetricTier::TenMinutes);
        assert_eq!(parse_range(Some("2h")).unwrap(), MetricTier::TwoHours);
        assert_eq!(parse_range(Some("24h")).unwrap(), MetricTier::Day);
        for bad in ["", "1h", "10M", "24h "] {
            let e = parse_range(Some(bad)).unwrap_err();
            assert_eq!(e.code, ErrorCode::InvalidRequest, "{bad}");
        }
        for tier in MetricTier::ALL {
            assert_eq!(tier_of(range_pb(*tier) as i32), Some(*tier));
        }
        assert_eq!(tier_of(0), None);
    }
}
