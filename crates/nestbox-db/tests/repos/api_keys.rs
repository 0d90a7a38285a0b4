use nestbox_db::api_keys::{self, NewApiKey};
use nestbox_db::{teams, users};
use nestbox_types::{ApiKeyId, TeamId};

use crate::common::team;

fn new_key(team: TeamId, hash: &str, created_by: Option<nestbox_types::UserId>) -> NewApiKey {
    NewApiKey {
        team_id: team,
        name: "ci".into(),
        prefix: "nbx_1234abcd".into(),
        key_hash: hash.into(),
        created_by,
    }
}

db_test!(create_find_touch_list_delete, |t| {
    let (owner, team) = team(&t.db, "keys").await;
    let key = api_keys::create(&t.db, &new_key(team.id, "aa11", Some(owner.id)))
        .await
        .unwrap();
    assert_eq!(key.team_id, team.id);
    assert_eq!(key.created_by, Some(owner.id));
    assert_eq!(key.last_used_at, None);

    let (found, found_team) = api_keys::find_by_hash(&t.db, "aa11")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(found, key);
    assert_eq!(found_team, team);
    assert!(api_keys::find_by_hash(&t.db, "zz").await.unwrap().is_none());

    api_keys::touch_last_used(&t.db, key.id).await.unwrap();
    let listed = api_keys::list_for_team(&t.db, team.id).await.unwrap();
    assert_eq!(listed.len(), 1);
    assert!(listed[0].last_used_at.is_some());

    assert!(api_keys::delete(&t.db, team.id, key.id).await.unwrap());
    assert!(!api_keys::delete(&t.db, team.id, key.id).await.unwrap());
    assert!(
        api_keys::find_by_hash(&t.db, "aa11")
            .await
            .unwrap()
            .is_none()
    );
});

db_test!(duplicate_hash_conflicts, |t| {
    let (_, team) = team(&t.db, "dup").await;
    api_keys::create(&t.db, &new_key(team.id, "same", None))
        .await
        .unwrap();
    let err = api_keys::create(&t.db, &new_key(team.id, "same", None))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, nestbox_db::DbError::Conflict { table, .. } if table == "api_keys"),
        "{err:?}"
    );
});

db_test!(unknown_team_is_not_found, |t| {
    let err = api_keys::create(&t.db, &new_key(TeamId::new(), "x", None))
        .await
        .unwrap_err();
    assert!(err.is_not_found(), "{err:?}");
});

db_test!(scoped_to_team, |t| {
    let (_, a) = team(&t.db, "a").await;
    let (_, b) = team(&t.db, "b").await;
    let key = api_keys::create(&t.db, &new_key(a.id, "ka", None))
        .await
        .unwrap();
    assert!(
        !api_keys::delete(&t.db, b.id, key.id).await.unwrap(),
        "another team cannot delete it"
    );
    assert!(api_keys::get(&t.db, b.id, key.id).await.unwrap().is_none());
    assert!(
        api_keys::list_for_team(&t.db, b.id)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(api_keys::get(&t.db, a.id, key.id).await.unwrap().is_some());
    assert!(
        api_keys::get(&t.db, a.id, ApiKeyId::new())
            .await
            .unwrap()
            .is_none()
    );
});

db_test!(keys_of_deleted_teams_do_not_authenticate, |t| {
    let (_, team) = team(&t.db, "gone").await;
    api_keys::create(&t.db, &new_key(team.id, "gone-key", None))
        .await
        .unwrap();
    teams::soft_delete(&t.db, team.id).await.unwrap();
    assert!(
        api_keys::find_by_hash(&t.db, "gone-key")
            .await
            .unwrap()
            .is_none()
    );
});

db_test!(deleting_the_creator_keeps_the_key, |t| {
    let (owner, team) = team(&t.db, "creator").await;
    let key = api_keys::create(&t.db, &new_key(team.id, "kept", Some(owner.id)))
        .await
        .unwrap();
    users::delete(&t.db, owner.id).await.unwrap();
    let got = api_keys::get(&t.db, team.id, key.id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got.created_by, None);
});
