use chrono::Duration;
use nestbox_db::host_credentials::NewPair;
use nestbox_db::hosts::{self, HostSpecs, NewHost, Registration};
use nestbox_db::sandboxes;
use nestbox_db::templates::{self, NewTemplate};
use nestbox_db::{HostKind, now};
use nestbox_types::{HostId, HostStatus, SandboxStatus, TeamId, TemplateKind};

use crate::common::{sandbox, team};

pub fn regular(name: &str) -> NewHost {
    NewHost {
        name: name.into(),
        kind: HostKind::Regular,
        team_id: None,
    }
}

pub fn pair(refresh_hash: &str) -> NewPair {
    NewPair {
        id: uuid::Uuid::new_v4(),
        refresh_hash: refresh_hash.into(),
        access_expires_at: now() + Duration::days(7),
        refresh_expires_at: now() + Duration::days(60),
    }
}

pub fn registration(refresh_hash: &str) -> Registration {
    Registration {
        address: "https://10.0.0.5:7443".into(),
        version: "0.1.0".into(),
        specs: HostSpecs {
            vcpus: 8,
            memory_mb: 16384,
            disk_mb: 200_000,
            max_sandboxes: Some(50),
        },
        credentials: pair(refresh_hash),
    }
}

db_test!(register_with_one_time_token, |t| {
    let host = hosts::create_pending(&t.db, &regular("h1"), "reg1", now() + Duration::hours(1))
        .await
        .unwrap();
    assert_eq!(host.status, HostStatus::Pending);
    assert_eq!(host.specs, HostSpecs::default());

    let got = hosts::consume_registration_token(&t.db, "reg1")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got.id, host.id);
    // One time only.
    assert!(
        hosts::consume_registration_token(&t.db, "reg1")
            .await
            .unwrap()
            .is_none()
    );
    assert!(
        hosts::consume_registration_token(&t.db, "unknown")
            .await
            .unwrap()
            .is_none()
    );

    let online = hosts::mark_registered(&t.db, host.id, &registration("cred1"))
        .await
        .unwrap();
    assert_eq!(online.status, HostStatus::Online);
    assert_eq!(online.specs.max_sandboxes, Some(50));
    assert_eq!(online.address.as_deref(), Some("https://10.0.0.5:7443"));
    assert!(online.last_heartbeat_at.is_some());
    // Hosts registered with token pairs hold no first-version credential.
    assert_eq!(
        hosts::find_by_legacy_token_hash(&t.db, "cred1")
            .await
            .unwrap(),
        None
    );
    assert_eq!(hosts::get(&t.db, host.id).await.unwrap(), online);
    assert!(
        hosts::mark_registered(&t.db, HostId::new(), &registration("c"))
            .await
            .unwrap_err()
            .is_not_found()
    );
});

db_test!(expired_token_is_refused, |t| {
    let host = hosts::create_pending(&t.db, &regular("h"), "old", now() - Duration::seconds(1))
        .await
        .unwrap();
    assert!(
        hosts::consume_registration_token(&t.db, "old")
            .await
            .unwrap()
            .is_none()
    );
    // A new token for the same host works.
    hosts::create_registration_token(&t.db, host.id, "fresh", now() + Duration::hours(1))
        .await
        .unwrap();
    assert_eq!(
        hosts::consume_registration_token(&t.db, "fresh")
            .await
            .unwrap()
            .unwrap()
            .id,
        host.id
    );
    let err = hosts::create_registration_token(&t.db, HostId::new(), "x", now())
        .await
        .unwrap_err();
    assert!(err.is_not_found(), "{err:?}");
});

db_test!(concurrent_consumers_get_the_token_once, |t| {
    hosts::create_pending(&t.db, &regular("h"), "race", now() + Duration::hours(1))
        .await
        .unwrap();
    let (a, b, c) = tokio::join!(
        hosts::consume_registration_token(&t.db, "race"),
        hosts::consume_registration_token(&t.db, "race"),
        hosts::consume_registration_token(&t.db, "race"),
    );
    let winners = [a.unwrap(), b.unwrap(), c.unwrap()]
        .iter()
        .filter(|h| h.is_some())
        .count();
    assert_eq!(winners, 1);
});

db_test!(duplicate_token_hash_conflicts, |t| {
    hosts::create_pending(&t.db, &regular("a"), "tok", now() + Duration::hours(1))
        .await
        .unwrap();
    let err = hosts::create_pending(&t.db, &regular("b"), "tok", now() + Duration::hours(1))
        .await
        .unwrap_err();
    assert!(err.is_conflict(), "{err:?}");
    // The failed transaction left no host behind.
    assert_eq!(hosts::list(&t.db).await.unwrap().len(), 1);
});

db_test!(byoc_hosts_belong_to_a_team, |t| {
    let (_, team) = team(&t.db, "byoc").await;
    let exp = now() + Duration::hours(1);
    let h = hosts::create_pending(
        &t.db,
        &NewHost {
            name: "mine".into(),
            kind: HostKind::Byoc,
            team_id: Some(team.id),
        },
        "b1",
        exp,
    )
    .await
    .unwrap();
    assert_eq!(h.team_id, Some(team.id));
    assert_eq!(hosts::list_for_team(&t.db, team.id).await.unwrap(), vec![h]);
    // Kind and team must agree (schema CHECK).
    assert!(
        hosts::create_pending(
            &t.db,
            &NewHost {
                name: "x".into(),
                kind: HostKind::Byoc,
                team_id: None
            },
            "b2",
            exp
        )
        .await
        .is_err()
    );
    assert!(
        hosts::create_pending(
            &t.db,
            &NewHost {
                name: "x".into(),
                kind: HostKind::Regular,
                team_id: Some(team.id)
            },
            "b3",
            exp
        )
        .await
        .is_err()
    );
    let err = hosts::create_pending(
        &t.db,
        &NewHost {
            name: "x".into(),
            kind: HostKind::Byoc,
            team_id: Some(TeamId::new()),
        },
        "b4",
        exp,
    )
    .await
    .unwrap_err();
    assert!(err.is_not_found(), "{err:?}");
});

db_test!(heartbeat_and_staleness, |t| {
    let exp = now() + Duration::hours(1);
    let a = hosts::create_pending(&t.db, &regular("a"), "ra", exp)
        .await
        .unwrap();
    let b = hosts::create_pending(&t.db, &regular("b"), "rb", exp)
        .await
        .unwrap();
    let pending = hosts::create_pending(&t.db, &regular("p"), "rp", exp)
        .await
        .unwrap();
    hosts::mark_registered(&t.db, a.id, &registration("ca"))
        .await
        .unwrap();
    hosts::mark_registered(&t.db, b.id, &registration("cb"))
        .await
        .unwrap();
    assert_eq!(hosts::list_online(&t.db).await.unwrap().len(), 2);

    // Heartbeats older than "the future" are stale: both online hosts go unreachable, the
    // pending one is untouched.
    let mut stale = hosts::mark_stale_unreachable(&t.db, now() + Duration::seconds(1))
        .await
        .unwrap();
    stale.sort();
    let mut expected = vec![a.id, b.id];
    expected.sort();
    assert_eq!(stale, expected);
    assert_eq!(
        hosts::get(&t.db, pending.id).await.unwrap().status,
        HostStatus::Pending
    );
    assert!(hosts::list_online(&t.db).await.unwrap().is_empty());
    assert!(
        hosts::mark_stale_unreachable(&t.db, now())
            .await
            .unwrap()
            .is_empty(),
        "only online hosts"
    );

    // A heartbeat brings a host back, and says so once.
    assert!(hosts::heartbeat(&t.db, a.id, None).await.unwrap());
    assert!(!hosts::heartbeat(&t.db, a.id, None).await.unwrap());
    assert_eq!(hosts::get(&t.db, a.id).await.unwrap().guest_memory, None);
    // Draining is set and cleared, and leaves the host online.
    assert!(!hosts::get(&t.db, a.id).await.unwrap().draining);
    assert!(
        hosts::set_draining(&t.db, a.id, true)
            .await
            .unwrap()
            .draining
    );
    assert_eq!(hosts::list_online(&t.db).await.unwrap().len(), 1);
    assert!(
        !hosts::set_draining(&t.db, a.id, false)
            .await
            .unwrap()
            .draining
    );
    assert!(
        hosts::set_draining(&t.db, HostId::new(), true)
            .await
            .unwrap_err()
            .is_not_found()
    );
    // What the agent reports of its guest memory is kept with each heartbeat.
    let report = hosts::GuestMemory {
        total_mb: 8192,
        used_mb: 1536,
    };
    assert!(!hosts::heartbeat(&t.db, a.id, Some(report)).await.unwrap());
    assert_eq!(
        hosts::get(&t.db, a.id).await.unwrap().guest_memory,
        Some(report)
    );
    assert_eq!(
        hosts::list_online(&t.db)
            .await
            .unwrap()
            .iter()
            .map(|h| h.id)
            .collect::<Vec<_>>(),
        vec![a.id]
    );
    // Fresh heartbeats are not stale.
    assert!(
        hosts::mark_stale_unreachable(&t.db, now() - Duration::seconds(90))
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        hosts::heartbeat(&t.db, HostId::new(), None)
            .await
            .unwrap_err()
            .is_not_found()
    );
    hosts::set_status(&t.db, a.id, HostStatus::Unreachable)
        .await
        .unwrap();
    assert_eq!(
        hosts::get(&t.db, a.id).await.unwrap().status,
        HostStatus::Unreachable
    );
});

db_test!(delete_cascades, |t| {
    let (_, team) = team(&t.db, "t").await;
    let h = hosts::create_pending(&t.db, &regular("doomed"), "tok", now() + Duration::hours(1))
        .await
        .unwrap();
    let tpl = templates::upsert(
        &t.db,
        &NewTemplate {
            team_id: team.id,
            name: "snap".into(),
            kind: TemplateKind::Snapshot,
            vcpus: 1,
            memory_mb: 512,
            disk_size_mb: 5120,
            size_bytes: 1,
            host_id: Some(h.id),
            created_by: None,
            source_sandbox_id: None,
            ephemeral: false,
        },
    )
    .await
    .unwrap();
    let sb = sandbox(&t.db, team.id, &[]).await;
    assert!(
        sandboxes::set_running(&t.db, sb.id, h.id, now())
            .await
            .unwrap()
    );

    assert!(hosts::delete(&t.db, h.id).await.unwrap());
    assert!(!hosts::delete(&t.db, h.id).await.unwrap());
    assert!(hosts::get(&t.db, h.id).await.unwrap_err().is_not_found());
    // Its registration token went with it, and so did the template whose files were on it.
    assert!(
        hosts::consume_registration_token(&t.db, "tok")
            .await
            .unwrap()
            .is_none()
    );
    assert!(
        templates::get(&t.db, tpl.id)
            .await
            .unwrap_err()
            .is_not_found()
    );
    // The sandbox record stays, detached.
    let got = sandboxes::get(&t.db, sb.id).await.unwrap();
    assert_eq!(got.host_id, None);
    assert_eq!(got.status, SandboxStatus::Running);
});
