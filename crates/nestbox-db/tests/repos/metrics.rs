use nestbox_db::MetricTier;
use nestbox_db::metrics::{self, MetricPoint};
use nestbox_types::SandboxId;

use crate::common::{sandbox, team};

db_test!(points_upsert_list_prune_and_cascade, |t| {
    let (_, team) = team(&t.db, "m").await;
    let sb = sandbox(&t.db, team.id, &[]).await;
    let p = |ts_ms, cpu_pct| MetricPoint {
        ts_ms,
        cpu_pct,
        mem_bytes: 1 << 30,
        disk_bytes: 200 << 20,
    };
    metrics::upsert_points(
        &t.db,
        sb.id,
        MetricTier::TenMinutes,
        &[p(2000, 12.5), p(1000, 0.0)],
    )
    .await
    .unwrap();
    metrics::upsert_points(&t.db, sb.id, MetricTier::TenMinutes, &[p(2000, 50.0)])
        .await
        .unwrap();
    metrics::upsert_points(&t.db, sb.id, MetricTier::Day, &[p(0, 1.0)])
        .await
        .unwrap();
    assert_eq!(
        metrics::list_points(&t.db, sb.id, MetricTier::TenMinutes)
            .await
            .unwrap(),
        vec![p(1000, 0.0), p(2000, 50.0)]
    );
    assert_eq!(
        metrics::list_points(&t.db, sb.id, MetricTier::Day)
            .await
            .unwrap(),
        vec![p(0, 1.0)]
    );
    assert!(
        metrics::list_points(&t.db, sb.id, MetricTier::TwoHours)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(metrics::prune_before(&t.db, 1500).await.unwrap(), 2);
    let err = metrics::upsert_points(&t.db, SandboxId::new(), MetricTier::Day, &[p(0, 1.0)])
        .await
        .unwrap_err();
    assert!(err.is_not_found(), "{err:?}");
});

db_test!(large_flushes_are_stored_in_batches, |t| {
    let (_, team) = team(&t.db, "big").await;
    let sb = sandbox(&t.db, team.id, &[]).await;
    // More points than one INSERT carries, with one time twice (the last one wins).
    let mut points: Vec<MetricPoint> = (0..1200)
        .map(|i| MetricPoint {
            ts_ms: i * 500,
            cpu_pct: 1.0,
            mem_bytes: 1,
            disk_bytes: 2,
        })
        .collect();
    points.push(MetricPoint {
        ts_ms: 0,
        cpu_pct: 99.0,
        mem_bytes: 3,
        disk_bytes: 4,
    });
    metrics::upsert_points(&t.db, sb.id, MetricTier::TenMinutes, &points)
        .await
        .unwrap();
    let stored = metrics::list_points(&t.db, sb.id, MetricTier::TenMinutes)
        .await
        .unwrap();
    assert_eq!(stored.len(), 1200);
    assert_eq!(stored[0].cpu_pct, 99.0);
    assert_eq!(stored[1199].ts_ms, 1199 * 500);
    // Keeping the last 10 minutes of this tier leaves the other tiers alone.
    metrics::upsert_points(&t.db, sb.id, MetricTier::Day, &points[..1])
        .await
        .unwrap();
    let pruned = metrics::prune_tier(&t.db, sb.id, MetricTier::TenMinutes, 1000 * 500)
        .await
        .unwrap();
    assert_eq!(pruned, 1000);
    let left = metrics::list_points(&t.db, sb.id, MetricTier::TenMinutes)
        .await
        .unwrap();
    assert_eq!(left.len(), 200);
    assert_eq!(
        metrics::list_points(&t.db, sb.id, MetricTier::Day)
            .await
            .unwrap()
            .len(),
        1
    );
});
