use std::collections::{BTreeMap, BTreeSet};

use chrono::Duration;
use nestbox_db::hosts::{self, NewHost};
use nestbox_db::sandboxes::{self, HostLoad, SandboxFilter};
use nestbox_db::{HostKind, Page, now};
use nestbox_types::{HostId, SandboxId, SandboxStatus, TemplateId};

use crate::common::{new_sandbox, sandbox, team};

async fn host(db: &nestbox_db::Db, name: &str) -> HostId {
    let new = NewHost {
        name: name.into(),
        kind: HostKind::Regular,
        team_id: None,
    };
    hosts::create_pending(db, &new, &format!("tok-{name}"), now() + Duration::hours(1))
        .await
        .unwrap()
        .id
}

db_test!(insert_and_get, |t| {
    let (_, team) = team(&t.db, "a").await;
    let mut new = new_sandbox(team.id);
    new.env = BTreeMap::from([("PATH".to_string(), "/bin".to_string())]);
    new.metadata = BTreeMap::from([
        ("owner".to_string(), "ci".to_string()),
        ("run".to_string(), "7".to_string()),
    ]);
    let sb = sandboxes::insert(&t.db, &new).await.unwrap();
    assert_eq!(sb.status, SandboxStatus::Pending);
    assert_eq!(sb.env, new.env);
    assert_eq!(sb.metadata, new.metadata);
    assert_eq!(sb.disk_size_mb, 5120);
    assert_eq!(sb.host_id, None);
    assert_eq!(sandboxes::get(&t.db, sb.id).await.unwrap(), sb);
    assert_eq!(
        sandboxes::get_for_team(&t.db, team.id, sb.id)
            .await
            .unwrap(),
        sb
    );
    assert!(
        sandboxes::get(&t.db, SandboxId::new())
            .await
            .unwrap_err()
            .is_not_found()
    );

    let mut bad = new_sandbox(team.id);
    bad.template_id = Some(TemplateId::new());
    assert!(
        sandboxes::insert(&t.db, &bad)
            .await
            .unwrap_err()
            .is_not_found()
    );
});

db_test!(team_scoping, |t| {
    let (_, a) = team(&t.db, "a").await;
    let (_, b) = team(&t.db, "b").await;
    let sa = sandbox(&t.db, a.id, &[]).await;
    let err = sandboxes::get_for_team(&t.db, b.id, sa.id)
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            nestbox_db::DbError::NotFound {
                entity: "sandbox",
                ..
            }
        ),
        "{err:?}"
    );
    let listed = sandboxes::list_for_team(&t.db, b.id, &SandboxFilter::default(), &Page::default())
        .await
        .unwrap();
    assert!(listed.items.is_empty());
    let listed = sandboxes::list_for_team(&t.db, a.id, &SandboxFilter::default(), &Page::default())
        .await
        .unwrap();
    assert_eq!(listed.items, vec![sa]);
    assert_eq!(listed.next_cursor, None);
});

db_test!(compare_and_set_transitions, |t| {
    let (_, team) = team(&t.db, "a").await;
    let sb = sandbox(&t.db, team.id, &[]).await;
    use SandboxStatus::*;
    assert!(
        !sandboxes::transition(&t.db, sb.id, &[Running], Paused, None)
            .await
            .unwrap()
    );
    assert!(
        sandboxes::transition(&t.db, sb.id, &[Pending], Starting, None)
            .await
            .unwrap()
    );
    assert!(
        !sandboxes::transition(&t.db, sb.id, &[], Running, None)
            .await
            .unwrap()
    );
    assert!(
        !sandboxes::transition(&t.db, SandboxId::new(), &[Pending], Running, None)
            .await
            .unwrap()
    );
    // Every status is storable, and an error message is kept then cleared.
    assert!(
        sandboxes::transition(&t.db, sb.id, &[Starting], Missing, Some("host gone"))
            .await
            .unwrap()
    );
    assert_eq!(
        sandboxes::get(&t.db, sb.id).await.unwrap().error.as_deref(),
        Some("host gone")
    );
    assert!(
        sandboxes::transition(&t.db, sb.id, &[Missing], Paused, None)
            .await
            .unwrap()
    );
    let got = sandboxes::get(&t.db, sb.id).await.unwrap();
    assert_eq!(
        (got.status, got.error, got.stopped_at),
        (Paused, None, None)
    );
    assert!(
        sandboxes::transition(&t.db, sb.id, &[Running, Paused], Error, Some("boom"))
            .await
            .unwrap()
    );
    let got = sandboxes::get(&t.db, sb.id).await.unwrap();
    assert_eq!(got.status, Error);
    let stopped_at = got.stopped_at.expect("terminal sets stopped_at");
    assert!(
        sandboxes::transition(&t.db, sb.id, &[Error], Stopped, None)
            .await
            .unwrap()
    );
    assert_eq!(
        sandboxes::get(&t.db, sb.id).await.unwrap().stopped_at,
        Some(stopped_at),
        "set once"
    );
    // A terminal sandbox is never set running again.
    let h = host(&t.db, "h").await;
    assert!(
        !sandboxes::set_running(&t.db, sb.id, h, now())
            .await
            .unwrap()
    );
});

db_test!(concurrent_transitions_have_one_winner, |t| {
    let (_, team) = team(&t.db, "a").await;
    let sb = sandbox(&t.db, team.id, &[]).await;
    use SandboxStatus::*;
    let (x, y, z) = tokio::join!(
        sandboxes::transition(&t.db, sb.id, &[Pending], Starting, None),
        sandboxes::transition(&t.db, sb.id, &[Pending], Error, Some("cancelled")),
        sandboxes::transition(&t.db, sb.id, &[Pending], Stopped, None),
    );
    let wins = [x.unwrap(), y.unwrap(), z.unwrap()]
        .iter()
        .filter(|w| **w)
        .count();
    assert_eq!(wins, 1);
});

db_test!(running_host_activity_and_load, |t| {
    let (_, team) = team(&t.db, "a").await;
    let h = host(&t.db, "h").await;
    let other = host(&t.db, "o").await;
    let s1 = sandbox(&t.db, team.id, &[]).await;
    let s2 = sandbox(&t.db, team.id, &[]).await;
    let s3 = sandbox(&t.db, team.id, &[]).await;
    let started = now() - Duration::seconds(5);
    assert!(
        sandboxes::set_running(&t.db, s1.id, h, started)
            .await
            .unwrap()
    );
    assert!(sandboxes::set_host(&t.db, s2.id, Some(h)).await.unwrap());
    assert!(sandboxes::set_host(&t.db, s3.id, Some(h)).await.unwrap());
    assert!(
        sandboxes::transition(
            &t.db,
            s3.id,
            &[SandboxStatus::Pending],
            SandboxStatus::Stopped,
            None
        )
        .await
        .unwrap()
    );
    assert!(
        !sandboxes::set_host(&t.db, SandboxId::new(), Some(h))
            .await
            .unwrap()
    );
    assert!(
        sandboxes::set_host(&t.db, s1.id, Some(HostId::new()))
            .await
            .unwrap_err()
            .is_not_found()
    );

    let got = sandboxes::get(&t.db, s1.id).await.unwrap();
    assert_eq!(
        (got.status, got.host_id, got.started_at, got.last_active_at),
        (
            SandboxStatus::Running,
            Some(h),
            Some(started),
            Some(started)
        )
    );
    sandboxes::touch_last_active(&t.db, s1.id).await.unwrap();
    assert!(
        sandboxes::get(&t.db, s1.id)
            .await
            .unwrap()
            .last_active_at
            .unwrap()
            > started
    );

    // s1 running + s2 pending hold resources; s3 is stopped.
    assert_eq!(
        sandboxes::host_load(&t.db, h).await.unwrap(),
        HostLoad {
            sandboxes: 2,
            vcpus: 2,
            memory_mb: 1024
        }
    );
    assert_eq!(
        sandboxes::host_load(&t.db, other).await.unwrap(),
        HostLoad::default()
    );
    // The whole fleet's load at once agrees.
    let loads = sandboxes::load_by_host(&t.db).await.unwrap();
    assert_eq!(
        loads.get(&h).copied(),
        Some(sandboxes::host_load(&t.db, h).await.unwrap())
    );
    assert_eq!(
        loads.get(&other),
        None,
        "a host holding nothing is left out"
    );
    let by_status = sandboxes::count_by_status(&t.db).await.unwrap();
    let count = |st: SandboxStatus| {
        by_status
            .iter()
            .find(|(s, _)| *s == st)
            .map_or(0, |(_, n)| *n)
    };
    assert_eq!(
        (count(SandboxStatus::Running), count(SandboxStatus::Pending)),
        (1, 1)
    );

    let on_host: Vec<_> = sandboxes::list_by_host(&t.db, h, &[])
        .await
        .unwrap()
        .into_iter()
        .map(|s| s.id)
        .collect();
    assert_eq!(on_host, vec![s1.id, s2.id, s3.id]);
    let running: Vec<_> = sandboxes::list_by_host(&t.db, h, &[SandboxStatus::Running])
        .await
        .unwrap()
        .into_iter()
        .map(|s| s.id)
        .collect();
    assert_eq!(running, vec![s1.id]);
    let pending: Vec<_> = sandboxes::list_by_status(&t.db, &[SandboxStatus::Pending])
        .await
        .unwrap()
        .into_iter()
        .map(|s| s.id)
        .collect();
    assert_eq!(pending, vec![s2.id]);
});

db_test!(metadata_and_status_filters, |t| {
    let (_, team) = team(&t.db, "a").await;
    let a = sandbox(&t.db, team.id, &[("env", "prod"), ("app", "web")]).await;
    let b = sandbox(&t.db, team.id, &[("env", "prod"), ("app", "db")]).await;
    let c = sandbox(&t.db, team.id, &[("env", "dev"), ("app", "web")]).await;
    let _d = sandbox(&t.db, team.id, &[]).await;
    sandboxes::transition(
        &t.db,
        b.id,
        &[SandboxStatus::Pending],
        SandboxStatus::Stopped,
        None,
    )
    .await
    .unwrap();

    let ids = |filter: SandboxFilter| {
        let db = t.db.clone();
        async move {
            let page = sandboxes::list_for_team(&db, team.id, &filter, &Page::default())
                .await
                .unwrap();
            page.items
                .into_iter()
                .map(|s| s.id)
                .collect::<BTreeSet<_>>()
        }
    };
    let kv = |pairs: &[(&str, &str)]| {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<Vec<_>>()
    };

    assert_eq!(
        ids(SandboxFilter {
            metadata: kv(&[("env", "prod")]),
            ..Default::default()
        })
        .await,
        BTreeSet::from([a.id, b.id])
    );
    assert_eq!(
        ids(SandboxFilter {
            metadata: kv(&[("env", "prod"), ("app", "web")]),
            ..Default::default()
        })
        .await,
        BTreeSet::from([a.id])
    );
    assert_eq!(
        ids(SandboxFilter {
            metadata: kv(&[("app", "web")]),
            ..Default::default()
        })
        .await,
        BTreeSet::from([a.id, c.id])
    );
    assert_eq!(
        ids(SandboxFilter {
            metadata: kv(&[("env", "nope")]),
            ..Default::default()
        })
        .await,
        BTreeSet::new()
    );
    assert_eq!(
        ids(SandboxFilter {
            statuses: vec![SandboxStatus::Pending],
            metadata: kv(&[("env", "prod")])
        })
        .await,
        BTreeSet::from([a.id])
    );
    assert_eq!(
        ids(SandboxFilter {
            statuses: vec![SandboxStatus::Stopped, SandboxStatus::Error],
            metadata: vec![]
        })
        .await,
        BTreeSet::from([b.id])
    );

    // Replacing metadata changes what matches.
    assert!(
        sandboxes::set_metadata(
            &t.db,
            c.id,
            &BTreeMap::from([("env".to_string(), "prod".to_string())])
        )
        .await
        .unwrap()
    );
    assert!(
        !sandboxes::set_metadata(&t.db, SandboxId::new(), &BTreeMap::new())
            .await
            .unwrap()
    );
    assert_eq!(sandboxes::get(&t.db, c.id).await.unwrap().metadata.len(), 1);
    assert_eq!(
        ids(SandboxFilter {
            metadata: kv(&[("env", "prod")]),
            ..Default::default()
        })
        .await,
        BTreeSet::from([a.id, b.id, c.id])
    );
});

db_test!(network_settings_round_trip, |t| {
    let (_, team) = team(&t.db, "net").await;
    let mut new = new_sandbox(team.id);
    new.egress = nestbox_types::egress::EgressRules {
        allow_out: vec!["example.com".into(), "198.51.100.0/24".into()],
        deny_out: vec!["0.0.0.0/0".into()],
    };
    new.public_traffic = true;
    new.auto_resume = true;
    let sb = sandboxes::insert(&t.db, &new).await.unwrap();
    assert_eq!(sb.egress, new.egress);
    assert!(sb.public_traffic);
    assert!(sb.auto_resume);
    let plain = sandboxes::insert(&t.db, &new_sandbox(team.id))
        .await
        .unwrap();
    assert!(plain.egress.is_empty());
    assert!(!plain.public_traffic);
    assert!(!plain.auto_resume);

    // Changes are versioned and remember what they replaced.
    let open = nestbox_types::egress::EgressRules::default();
    let first = sandboxes::set_egress(&t.db, sb.id, &open)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((first.version, &first.previous), (1, &new.egress));
    assert!(
        sandboxes::get(&t.db, sb.id)
            .await
            .unwrap()
            .egress
            .is_empty()
    );
    // Undoing it records the previous rules as the next version…
    assert_eq!(
        sandboxes::revert_egress(&t.db, sb.id, &first)
            .await
            .unwrap(),
        Some(2)
    );
    assert_eq!(
        sandboxes::get(&t.db, sb.id).await.unwrap().egress,
        new.egress
    );
    // …but never over a later change.
    assert_eq!(
        sandboxes::revert_egress(&t.db, sb.id, &first)
            .await
            .unwrap(),
        None
    );
    assert_eq!(
        sandboxes::get(&t.db, sb.id).await.unwrap().egress,
        new.egress
    );
    assert!(
        sandboxes::set_egress(&t.db, SandboxId::new(), &open)
            .await
            .unwrap()
            .is_none()
    );
});

db_test!(pagination_with_equal_timestamps, |t| {
    let (_, team) = team(&t.db, "a").await;
    let mut all = Vec::new();
    for i in 0..9 {
        all.push(sandbox(&t.db, team.id, &[("i", &i.to_string())]).await.id);
    }
    // Six of the nine share one timestamp: page boundaries fall inside the tie.
    t.raw(
        "UPDATE sandboxes SET created_at = (SELECT MIN(created_at) FROM sandboxes) \
         WHERE id IN (SELECT id FROM sandboxes ORDER BY created_at LIMIT 6)",
    )
    .await;
    let full =
        sandboxes::list_for_team(&t.db, team.id, &SandboxFilter::default(), &Page::first(100))
            .await
            .unwrap();
    assert_eq!(full.items.len(), 9);
    assert_eq!(full.next_cursor, None);
    let expected: Vec<_> = full.items.iter().map(|s| s.id).collect();
    // Newest first, ties by id descending.
    for w in full.items.windows(2) {
        assert!((w[0].created_at, w[0].id) > (w[1].created_at, w[1].id));
    }
    for limit in [1, 2, 4] {
        let mut seen = Vec::new();
        let mut page = Page::first(limit);
        loop {
            let p = sandboxes::list_for_team(&t.db, team.id, &SandboxFilter::default(), &page)
                .await
                .unwrap();
            assert!(p.items.len() <= limit as usize);
            assert!(
                p.items.iter().all(|s| s.metadata.contains_key("i")),
                "metadata attached"
            );
            seen.extend(p.items.iter().map(|s| s.id));
            match p.next_cursor {
                Some(c) => page = Page::after(limit, c),
                None => break,
            }
        }
        assert_eq!(seen, expected, "limit {limit}");
    }
    let mut sorted = all.clone();
    sorted.sort();
    let mut got = expected.clone();
    got.sort();
    assert_eq!(got, sorted);
});
