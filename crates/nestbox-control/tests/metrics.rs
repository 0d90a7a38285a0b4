//! Sandbox metrics: live from the host while running, stored on pause (asked or automatic)
//! and destroy, refused for stopped sandboxes, bad ranges and other teams. Sandbox logs:
//! paged from the host (`/v1` and E2B's two routes), refused the same way.

// Tests may panic on what they expect (see clippy.toml); helpers here are not `#[test]`s.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use common::{Engine, Harness, api_error, both_engines, raw_error};
use nestbox_db::MetricTier;
use nestbox_db::metrics::list_points;
use nestbox_testkit::{SIM_CPU_PCT, SIM_DISK_BYTES, SIM_METRIC_POINTS, SimOp};
use nestbox_types::ErrorCode;

both_engines!(
    a_running_sandbox_reports_live_metrics,
    pausing_stores_every_tier,
    an_automatic_pause_stores_them_too,
    destroying_stores_the_day_tier_and_hides_the_metrics,
    bad_ranges_and_other_teams_are_refused,
    logs_come_from_the_host_and_bad_queries_are_refused,
);

async fn a_running_sandbox_reports_live_metrics(engine: Engine) -> anyhow::Result<()> {
    let h = Harness::start(engine).await?;
    let sb = h.sandbox().await?;
    let m = h.key.sandbox_metrics(sb.id, None).await?;
    assert_eq!((m.range.as_str(), m.source.as_str()), ("10m", "live"));
    assert_eq!(m.sandbox_id, sb.id);
    assert_eq!(m.interval_ms, 500);
    assert_eq!(m.points.len(), SIM_METRIC_POINTS);
    let p = &m.points[0];
    assert_eq!(p.cpu_pct, SIM_CPU_PCT);
    assert_eq!(p.disk_bytes, SIM_DISK_BYTES);
    assert_eq!(p.mem_bytes, u64::from(sb.memory_mb) << 19);
    assert!(m.points.windows(2).all(|w| w[0].timestamp < w[1].timestamp));
    for (range, interval) in [("2h", 30_000), ("24h", 300_000)] {
        let m = h.key.sandbox_metrics(sb.id, Some(range)).await?;
        assert_eq!((m.range.as_str(), m.interval_ms), (range, interval));
        assert_eq!(m.points.len(), 1);
    }
    assert_eq!(h.agent.calls(SimOp::GetSandboxMetrics), 3);
    assert_eq!(
        h.agent.calls(SimOp::FlushSandboxMetrics),
        0,
        "nothing stored"
    );
    h.shutdown().await;
    Ok(())
}

async fn pausing_stores_every_tier(engine: Engine) -> anyhow::Result<()> {
    let h = Harness::start(engine).await?;
    let sb = h.sandbox().await?;
    h.key_api().pause(sb.id).await?;
    assert_eq!(h.agent.calls(SimOp::FlushSandboxMetrics), 1);
    let db = &h.services.db;
    assert_eq!(
        list_points(db, sb.id, MetricTier::TenMinutes).await?.len(),
        SIM_METRIC_POINTS
    );
    assert_eq!(list_points(db, sb.id, MetricTier::TwoHours).await?.len(), 1);
    assert_eq!(list_points(db, sb.id, MetricTier::Day).await?.len(), 1);
    let calls = h.agent.calls(SimOp::GetSandboxMetrics);
    let m = h.key.sandbox_metrics(sb.id, Some("10m")).await?;
    assert_eq!(m.source, "stored");
    assert_eq!(m.points.len(), SIM_METRIC_POINTS);
    assert_eq!(m.points[0].cpu_pct, SIM_CPU_PCT);
    assert_eq!(
        h.agent.calls(SimOp::GetSandboxMetrics),
        calls,
        "a paused sandbox is answered from the database"
    );
    // Resumed, it is live again; paused again, the same points are stored again (upserts).
    h.key_api().resume(sb.id).await?;
    assert_eq!(h.key.sandbox_metrics(sb.id, None).await?.source, "live");
    h.key_api().pause(sb.id).await?;
    assert_eq!(
        list_points(db, sb.id, MetricTier::TenMinutes).await?.len(),
        SIM_METRIC_POINTS
    );
    h.shutdown().await;
    Ok(())
}

async fn an_automatic_pause_stores_them_too(engine: Engine) -> anyhow::Result<()> {
    let h = Harness::start(engine).await?;
    let sb = h.sandbox().await?;
    // A failed flush after a pause leaves nothing stored; reading fetches it again.
    h.agent
        .fail_next(SimOp::FlushSandboxMetrics, ErrorCode::Busy, "busy");
    h.key_api().pause(sb.id).await?;
    assert!(
        list_points(&h.services.db, sb.id, MetricTier::Day)
            .await?
            .is_empty()
    );
    let m = h.key.sandbox_metrics(sb.id, Some("24h")).await?;
    assert_eq!((m.source.as_str(), m.points.len()), ("stored", 1));

    // The agent pauses an inactive sandbox on its own: the monitor stores its metrics.
    let idle = h.sandbox().await?;
    assert!(h.agent.auto_pause(idle.id));
    let flushes = h.agent.calls(SimOp::FlushSandboxMetrics);
    h.monitor_pass().await?;
    assert_eq!(h.agent.calls(SimOp::FlushSandboxMetrics), flushes + 1);
    assert_eq!(
        list_points(&h.services.db, idle.id, MetricTier::TenMinutes)
            .await?
            .len(),
        SIM_METRIC_POINTS
    );
    let m = h.key.sandbox_metrics(idle.id, None).await?;
    assert_eq!(
        (m.source.as_str(), m.points.len()),
        ("stored", SIM_METRIC_POINTS)
    );
    h.shutdown().await;
    Ok(())
}

async fn destroying_stores_the_day_tier_and_hides_the_metrics(
    engine: Engine,
) -> anyhow::Result<()> {
    let h = Harness::start(engine).await?;
    let sb = h.sandbox().await?;
    h.key.destroy_sandbox(sb.id).await?;
    assert_eq!(h.agent.calls(SimOp::FlushSandboxMetrics), 1);
    let db = &h.services.db;
    assert_eq!(list_points(db, sb.id, MetricTier::Day).await?.len(), 1);
    assert!(
        list_points(db, sb.id, MetricTier::TenMinutes)
            .await?
            .is_empty(),
        "only the 24 h tier is kept after a destroy"
    );
    for range in [None, Some("24h")] {
        let err = h.key.sandbox_metrics(sb.id, range).await;
        api_error(err, 404, ErrorCode::NotFound);
    }
    h.shutdown().await;
    Ok(())
}

async fn bad_ranges_and_other_teams_are_refused(engine: Engine) -> anyhow::Result<()> {
    let h = Harness::start(engine).await?;
    let sb = h.sandbox().await?;
    for bad in ["1h", "", "10M", "24h;drop"] {
        api_error(
            h.key.sandbox_metrics(sb.id, Some(bad)).await,
            400,
            ErrorCode::InvalidRequest,
        );
    }
    let (http, url) = h.raw(&format!("/v1/sandboxes/{}/metrics?bogus=1", sb.id));
    let resp = http.get(url).header("x-api-key", &h.api_key).send().await?;
    raw_error(resp, 400, ErrorCode::InvalidRequest).await?;
    let other = h.user("other").await?;
    api_error(
        other.client.sandbox_metrics(sb.id, None).await,
        404,
        ErrorCode::SandboxNotFound,
    );
    api_error(
        h.anonymous().sandbox_metrics(sb.id, None).await,
        401,
        ErrorCode::Unauthorized,
    );
    h.shutdown().await;
    Ok(())
}

async fn logs_come_from_the_host_and_bad_queries_are_refused(engine: Engine) -> anyhow::Result<()> {
    use nestbox_types::api::{LogDirection, LogLevel, LogsQuery};
    let h = Harness::start(engine).await?;
    let sb = h.sandbox().await?;
    let page = h.key.sandbox_logs(sb.id, &LogsQuery::default()).await?;
    assert_eq!(page.entries.len(), 1, "{page:?}");
    assert_eq!(page.entries[0].level, LogLevel::Info);
    assert_eq!(page.next_cursor.as_deref(), Some("1"));
    assert!(!page.has_more);
    // Past the cursor there is nothing yet; the cursor stays for the next poll.
    let after = h
        .key
        .sandbox_logs(
            sb.id,
            &LogsQuery {
                cursor: Some("1".into()),
                ..LogsQuery::default()
            },
        )
        .await?;
    assert!(after.entries.is_empty());
    assert_eq!(after.next_cursor.as_deref(), Some("1"));
    let back = h
        .key
        .sandbox_logs(
            sb.id,
            &LogsQuery {
                direction: Some(LogDirection::Backward),
                since: Some(chrono::Utc::now() - chrono::Duration::days(1)),
                ..LogsQuery::default()
            },
        )
        .await?;
    assert!(back.entries.is_empty(), "nothing before a day ago");
    assert_eq!(h.agent.calls(SimOp::GetSandboxLogs), 3);

    // E2B's routes read the same log.
    let (status, _, body) = common::e2b(
        &h,
        reqwest::Method::GET,
        &format!("/sandboxes/{}/logs", sb.id),
        None,
    )
    .await?;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["logs"][0]["line"], body["logEntries"][0]["message"]);
    assert_eq!(body["logEntries"][0]["level"], "info");
    let (status, _, body) = common::e2b(
        &h,
        reqwest::Method::GET,
        &format!("/v2/sandboxes/{}/logs?direction=backward&level=warn", sb.id),
        None,
    )
    .await?;
    assert_eq!(
        (status, body["logs"].as_array().map(Vec::len)),
        (200, Some(0))
    );

    // Bad queries: /v1's error shape, and E2B's.
    for bad in [
        "limit=0",
        "limit=1001",
        "cursor=abc",
        "level=loud",
        "direction=sideways",
        "since=yesterday",
        "bogus=1",
    ] {
        let (http, url) = h.raw(&format!("/v1/sandboxes/{}/logs?{bad}", sb.id));
        let resp = http.get(url).header("x-api-key", &h.api_key).send().await?;
        raw_error(resp, 400, ErrorCode::InvalidRequest).await?;
    }
    let long = "x".repeat(257);
    let (http, url) = h.raw(&format!("/v1/sandboxes/{}/logs?search={long}", sb.id));
    let resp = http.get(url).header("x-api-key", &h.api_key).send().await?;
    raw_error(resp, 400, ErrorCode::InvalidRequest).await?;
    for bad in ["limit=0", "direction=up", "level=LOUD", "cursor=x"] {
        let (status, _, body) = common::e2b(
            &h,
            reqwest::Method::GET,
            &format!("/v2/sandboxes/{}/logs?{bad}", sb.id),
            None,
        )
        .await?;
        assert_eq!(
            (status, &body["code"]),
            (400, &serde_json::json!(400)),
            "{bad}: {body}"
        );
        assert!(body["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    let (status, _, _) = common::e2b(
        &h,
        reqwest::Method::GET,
        &format!("/sandboxes/{}/logs?limit=5000", sb.id),
        None,
    )
    .await?;
    assert_eq!(status, 400);
    assert_eq!(
        h.agent.calls(SimOp::GetSandboxLogs),
        5,
        "bad queries never reach the host"
    );

    // Another team, nobody, and a stopped sandbox.
    let other = h.user("other").await?;
    api_error(
        other
            .client
            .sandbox_logs(sb.id, &LogsQuery::default())
            .await,
        404,
        ErrorCode::SandboxNotFound,
    );
    api_error(
        h.anonymous()
            .sandbox_logs(sb.id, &LogsQuery::default())
            .await,
        401,
        ErrorCode::Unauthorized,
    );
    h.key.destroy_sandbox(sb.id).await?;
    api_error(
        h.key.sandbox_logs(sb.id, &LogsQuery::default()).await,
        404,
        ErrorCode::NotFound,
    );
    h.shutdown().await;
    Ok(())
}
