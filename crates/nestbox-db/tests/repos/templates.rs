use nestbox_db::templates::{self, NewTemplate};
use nestbox_db::{DbError, sandboxes};
use nestbox_types::{PLATFORM_TEAM, SandboxStatus, TeamId, TemplateId, TemplateKind};

use crate::common::{new_sandbox, team};

fn tpl(team: TeamId, name: &str, vcpus: u32) -> NewTemplate {
    NewTemplate {
        team_id: team,
        name: name.into(),
        kind: TemplateKind::Image,
        vcpus,
        memory_mb: 512,
        disk_size_mb: 2048,
        size_bytes: 200 * 1024 * 1024,
        host_id: None,
        created_by: Some("usr-x".into()),
    }
}

db_test!(upsert_keeps_id_and_replaces_contents, |t| {
    let first = templates::upsert(&t.db, &tpl(PLATFORM_TEAM, "minimal", 1))
        .await
        .unwrap();
    let second = templates::upsert(&t.db, &tpl(PLATFORM_TEAM, "minimal", 4))
        .await
        .unwrap();
    assert_eq!(first.id, second.id);
    assert_eq!(second.vcpus, 4);
    assert_eq!(second.created_at, first.created_at);
    assert_eq!(
        templates::list_all(&t.db).await.unwrap(),
        vec![second.clone()]
    );
    assert_eq!(templates::get(&t.db, first.id).await.unwrap(), second);
});

db_test!(duplicate_name_per_team_conflicts, |t| {
    let (_, a) = team(&t.db, "a").await;
    let (_, b) = team(&t.db, "b").await;
    templates::create(&t.db, &tpl(a.id, "py", 1)).await.unwrap();
    let err = templates::create(&t.db, &tpl(a.id, "py", 1))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, DbError::Conflict { table, .. } if table == "templates"),
        "{err:?}"
    );
    // Another team may use the name.
    templates::create(&t.db, &tpl(b.id, "py", 1)).await.unwrap();
    let err = templates::create(&t.db, &tpl(TeamId::new(), "py", 1))
        .await
        .unwrap_err();
    assert!(err.is_not_found(), "{err:?}");
});

db_test!(visibility_prefers_own_then_platform, |t| {
    let (_, a) = team(&t.db, "a").await;
    let (_, b) = team(&t.db, "b").await;
    let platform = templates::upsert(&t.db, &tpl(PLATFORM_TEAM, "base", 1))
        .await
        .unwrap();
    let shared = templates::upsert(&t.db, &tpl(PLATFORM_TEAM, "node", 1))
        .await
        .unwrap();
    let own = templates::upsert(&t.db, &tpl(a.id, "base", 2))
        .await
        .unwrap();
    let private = templates::upsert(&t.db, &tpl(b.id, "secret", 1))
        .await
        .unwrap();

    assert_eq!(
        templates::get_visible(&t.db, a.id, "base").await.unwrap(),
        Some(own.clone())
    );
    assert_eq!(
        templates::get_visible(&t.db, b.id, "base").await.unwrap(),
        Some(platform.clone())
    );
    assert_eq!(
        templates::get_visible(&t.db, a.id, "secret").await.unwrap(),
        None,
        "other team's"
    );
    assert_eq!(
        templates::get_visible(&t.db, b.id, "secret").await.unwrap(),
        Some(private.clone())
    );

    assert_eq!(
        templates::list_visible(&t.db, a.id).await.unwrap(),
        vec![own, shared.clone()]
    );
    assert_eq!(
        templates::list_visible(&t.db, b.id).await.unwrap(),
        vec![platform, shared, private]
    );
    assert_eq!(templates::list_all(&t.db).await.unwrap().len(), 4);
});

db_test!(delete_detaches_sandboxes, |t| {
    let (_, a) = team(&t.db, "a").await;
    let template = templates::upsert(&t.db, &tpl(a.id, "mine", 1))
        .await
        .unwrap();
    let mut new = new_sandbox(a.id);
    new.template_id = Some(template.id);
    new.template_name = "mine".into();
    let sb = sandboxes::insert(&t.db, &new).await.unwrap();
    assert_eq!(
        sandboxes::count_by_template(&t.db, template.id, &[])
            .await
            .unwrap(),
        1
    );
    assert_eq!(
        sandboxes::count_by_template(&t.db, template.id, &[SandboxStatus::Running])
            .await
            .unwrap(),
        0
    );

    assert!(templates::delete(&t.db, template.id).await.unwrap());
    assert!(!templates::delete(&t.db, template.id).await.unwrap());
    let got = sandboxes::get(&t.db, sb.id).await.unwrap();
    assert_eq!(got.template_id, None);
    assert_eq!(got.template_name, "mine");
});

db_test!(create_with_id_keeps_the_chosen_id, |t| {
    let (_, a) = team(&t.db, "a").await;
    let id = TemplateId::new();
    let created = templates::create_with_id(&t.db, id, &tpl(a.id, "snap", 2))
        .await
        .unwrap();
    assert_eq!(created.id, id);
    assert_eq!(templates::get(&t.db, id).await.unwrap(), created);
    let err = templates::create_with_id(&t.db, TemplateId::new(), &tpl(a.id, "snap", 1))
        .await
        .unwrap_err();
    assert!(matches!(&err, DbError::Conflict { .. }), "{err:?}");
});

db_test!(replace_swaps_rows_in_one_step, |t| {
    let (_, a) = team(&t.db, "a").await;
    let old = templates::create(&t.db, &tpl(a.id, "snap", 1))
        .await
        .unwrap();
    let mut new = new_sandbox(a.id);
    new.template_id = Some(old.id);
    let sb = sandboxes::insert(&t.db, &new).await.unwrap();

    let id = TemplateId::new();
    let replaced = templates::replace(&t.db, old.id, id, &tpl(a.id, "snap", 4))
        .await
        .unwrap();
    assert_eq!((replaced.id, replaced.vcpus), (id, 4));
    assert!(
        templates::get(&t.db, old.id)
            .await
            .unwrap_err()
            .is_not_found()
    );
    assert_eq!(
        templates::get_visible(&t.db, a.id, "snap").await.unwrap(),
        Some(replaced.clone())
    );
    assert_eq!(
        sandboxes::get(&t.db, sb.id).await.unwrap().template_id,
        None
    );

    // A clash with another template's name changes nothing.
    let other = templates::create(&t.db, &tpl(a.id, "other", 1))
        .await
        .unwrap();
    let err = templates::replace(
        &t.db,
        replaced.id,
        TemplateId::new(),
        &tpl(a.id, "other", 2),
    )
    .await
    .unwrap_err();
    assert!(matches!(&err, DbError::Conflict { .. }), "{err:?}");
    assert_eq!(templates::get(&t.db, replaced.id).await.unwrap(), replaced);
    assert_eq!(templates::get(&t.db, other.id).await.unwrap(), other);

    // An old row deleted meanwhile does not stop the new one.
    let gone = TemplateId::new();
    let fresh = templates::replace(&t.db, gone, TemplateId::new(), &tpl(a.id, "fresh", 1))
        .await
        .unwrap();
    assert_eq!(templates::get(&t.db, fresh.id).await.unwrap(), fresh);
});
