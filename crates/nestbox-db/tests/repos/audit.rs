use nestbox_db::audit::{self, AuditFilter, AuditScope, NewAuditLog};
use nestbox_db::{ActorType, AuditStatus, Page};
use nestbox_types::TeamId;
use serde_json::json;

fn entry(team: Option<TeamId>, action: &str, resource_type: &str) -> NewAuditLog {
    NewAuditLog {
        team_id: team,
        actor_type: ActorType::User,
        actor_id: Some("usr-1".into()),
        action: action.into(),
        resource_type: resource_type.into(),
        resource_id: Some("sb-1".into()),
        status: AuditStatus::Success,
        details: json!({"vcpus": 2, "note": "ünïcode"}),
    }
}

db_test!(insert_and_list, |t| {
    let a = TeamId::new();
    let b = TeamId::new();
    let e1 = audit::insert(&t.db, &entry(Some(a), "sandbox.create", "sandbox"))
        .await
        .unwrap();
    let e2 = audit::insert(&t.db, &entry(Some(a), "api_key.create", "api_key"))
        .await
        .unwrap();
    let e3 = audit::insert(&t.db, &entry(Some(b), "sandbox.create", "sandbox"))
        .await
        .unwrap();
    let e4 = audit::insert(
        &t.db,
        &NewAuditLog {
            actor_type: ActorType::System,
            status: AuditStatus::Failure,
            ..entry(None, "host.unreachable", "host")
        },
    )
    .await
    .unwrap();

    let page = audit::list(
        &t.db,
        AuditScope::Team(a),
        &AuditFilter::default(),
        &Page::default(),
    )
    .await
    .unwrap();
    assert_eq!(page.items, vec![e2.clone(), e1.clone()]);
    let page = audit::list(
        &t.db,
        AuditScope::Team(a),
        &AuditFilter {
            resource_type: Some("sandbox".into()),
            action: None,
        },
        &Page::default(),
    )
    .await
    .unwrap();
    assert_eq!(page.items, vec![e1.clone()]);
    let page = audit::list(
        &t.db,
        AuditScope::All,
        &AuditFilter {
            resource_type: None,
            action: Some("sandbox.create".into()),
        },
        &Page::default(),
    )
    .await
    .unwrap();
    assert_eq!(page.items, vec![e3.clone(), e1.clone()]);
    let page = audit::list(
        &t.db,
        AuditScope::All,
        &AuditFilter::default(),
        &Page::default(),
    )
    .await
    .unwrap();
    assert_eq!(page.items, vec![e4.clone(), e3, e2, e1]);
    let page = audit::list(
        &t.db,
        AuditScope::Platform,
        &AuditFilter::default(),
        &Page::default(),
    )
    .await
    .unwrap();
    assert_eq!(page.items, vec![e4], "entries of no team only");
});

db_test!(pagination_never_skips_same_microsecond_entries, |t| {
    let team = TeamId::new();
    for i in 0..7 {
        audit::insert(&t.db, &entry(Some(team), &format!("a{i}"), "x"))
            .await
            .unwrap();
    }
    t.raw("UPDATE audit_logs SET created_at = (SELECT MAX(created_at) FROM audit_logs)")
        .await;
    let mut seen = Vec::new();
    let mut page = Page::first(3);
    loop {
        let p = audit::list(
            &t.db,
            AuditScope::Team(team),
            &AuditFilter::default(),
            &page,
        )
        .await
        .unwrap();
        seen.extend(p.items.iter().map(|e| e.id));
        match p.next_cursor {
            Some(c) => page = Page::after(3, c),
            None => break,
        }
    }
    let mut expected = seen.clone();
    expected.sort_by(|a, b| b.cmp(a));
    expected.dedup();
    assert_eq!(seen, expected);
    assert_eq!(seen.len(), 7);
});
