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
        source_sandbox_id: None,
        ephemeral: false,
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

db_test!(fork_templates_are_hidden_and_found_once_unused, |t| {
    let (_, a) = team(&t.db, "a").await;
    let source = sandboxes::insert(&t.db, &new_sandbox(a.id)).await.unwrap();
    let mut spec = tpl(a.id, "fork-1", 1);
    spec.ephemeral = true;
    spec.source_sandbox_id = Some(source.id);
    let fork = templates::create(&t.db, &spec).await.unwrap();
    let mut named = tpl(a.id, "named", 1);
    named.source_sandbox_id = Some(source.id);
    let named = templates::create(&t.db, &named).await.unwrap();

    assert_eq!(
        templates::get_visible(&t.db, a.id, "fork-1").await.unwrap(),
        None
    );
    let visible: Vec<String> = templates::list_visible(&t.db, a.id)
        .await
        .unwrap()
        .into_iter()
        .map(|t| t.name)
        .collect();
    assert_eq!(visible, vec!["named".to_string()]);
    assert_eq!(
        templates::made_from(&t.db, a.id, source.id).await.unwrap(),
        vec![named.clone()]
    );
    let (_, b) = team(&t.db, "b").await;
    assert!(
        templates::made_from(&t.db, b.id, source.id)
            .await
            .unwrap()
            .is_empty()
    );

    // In use by a running sandbox: not unused. Stopped: unused (once old enough).
    let mut child = new_sandbox(a.id);
    child.template_id = Some(fork.id);
    let child = sandboxes::insert(&t.db, &child).await.unwrap();
    sandboxes::transition(
        &t.db,
        child.id,
        &[SandboxStatus::Pending],
        SandboxStatus::Running,
        None,
    )
    .await
    .unwrap();
    let later = chrono::Utc::now() + chrono::Duration::seconds(5);
    assert!(
        templates::unused_ephemeral(&t.db, later)
            .await
            .unwrap()
            .is_empty()
    );
    sandboxes::transition(
        &t.db,
        child.id,
        &[SandboxStatus::Running],
        SandboxStatus::Stopped,
        None,
    )
    .await
    .unwrap();
    let unused = templates::unused_ephemeral(&t.db, later).await.unwrap();
    assert_eq!(
        unused.iter().map(|t| t.id).collect::<Vec<_>>(),
        vec![fork.id]
    );
    let earlier = fork.created_at - chrono::Duration::seconds(1);
    assert!(
        templates::unused_ephemeral(&t.db, earlier)
            .await
            .unwrap()
            .is_empty()
    );
});
