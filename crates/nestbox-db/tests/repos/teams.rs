use nestbox_db::{DbError, teams, users};
use nestbox_types::{TeamId, TeamRole, UserId};

use crate::common::{team, user};

db_test!(create_with_owner_makes_first_team_default, |t| {
    let owner = user(&t.db, "owner@example.com").await;
    let first = teams::create_with_owner(&t.db, "First", owner.id)
        .await
        .unwrap();
    let second = teams::create_with_owner(&t.db, "Second", owner.id)
        .await
        .unwrap();
    let mine = teams::list_for_user(&t.db, owner.id).await.unwrap();
    assert_eq!(mine.len(), 2);
    assert_eq!(mine[0].team, first);
    assert_eq!(mine[0].role, TeamRole::Owner);
    assert!(mine[0].is_default);
    assert_eq!(mine[1].team, second);
    assert!(!mine[1].is_default);
    assert_eq!(
        teams::default_team_for_user(&t.db, owner.id)
            .await
            .unwrap()
            .unwrap()
            .team,
        first
    );
    assert_eq!(teams::get(&t.db, first.id).await.unwrap(), first);
});

db_test!(members_and_roles, |t| {
    let (owner, team) = team(&t.db, "acme").await;
    let bob = user(&t.db, "bob@example.com").await;
    teams::add_member(&t.db, team.id, bob.id, TeamRole::Member)
        .await
        .unwrap();
    assert_eq!(
        teams::membership(&t.db, team.id, bob.id).await.unwrap(),
        Some(TeamRole::Member)
    );
    // Bob had no team: this one became his default.
    assert_eq!(
        teams::default_team_for_user(&t.db, bob.id)
            .await
            .unwrap()
            .unwrap()
            .team
            .id,
        team.id
    );

    let err = teams::add_member(&t.db, team.id, bob.id, TeamRole::Admin)
        .await
        .unwrap_err();
    assert!(err.is_conflict(), "{err:?}");
    let err = teams::add_member(&t.db, TeamId::new(), bob.id, TeamRole::Member)
        .await
        .unwrap_err();
    assert!(err.is_not_found(), "{err:?}");
    let err = teams::add_member(&t.db, team.id, UserId::new(), TeamRole::Member)
        .await
        .unwrap_err();
    assert!(err.is_not_found(), "{err:?}");

    teams::set_role(&t.db, team.id, bob.id, TeamRole::Admin)
        .await
        .unwrap();
    assert_eq!(
        teams::membership(&t.db, team.id, bob.id).await.unwrap(),
        Some(TeamRole::Admin)
    );
    // A second owner is refused by the schema.
    let err = teams::set_role(&t.db, team.id, bob.id, TeamRole::Owner)
        .await
        .unwrap_err();
    assert!(err.is_conflict(), "{err:?}");
    let err = teams::set_role(&t.db, team.id, UserId::new(), TeamRole::Admin)
        .await
        .unwrap_err();
    assert!(err.is_not_found(), "{err:?}");

    let members = teams::list_members(&t.db, team.id).await.unwrap();
    assert_eq!(
        members
            .iter()
            .map(|m| (m.user.id, m.role))
            .collect::<Vec<_>>(),
        vec![(owner.id, TeamRole::Owner), (bob.id, TeamRole::Admin)]
    );

    assert!(teams::remove_member(&t.db, team.id, bob.id).await.unwrap());
    assert!(!teams::remove_member(&t.db, team.id, bob.id).await.unwrap());
    assert_eq!(
        teams::membership(&t.db, team.id, bob.id).await.unwrap(),
        None
    );
    assert_eq!(
        teams::default_team_for_user(&t.db, bob.id).await.unwrap(),
        None
    );
});

db_test!(rename_and_soft_delete, |t| {
    let (owner, team) = team(&t.db, "old").await;
    teams::rename(&t.db, team.id, "new").await.unwrap();
    teams::set_byoc(&t.db, team.id, true).await.unwrap();
    let got = teams::get(&t.db, team.id).await.unwrap();
    assert_eq!(got.name, "new");
    assert!(got.is_byoc);

    teams::soft_delete(&t.db, team.id).await.unwrap();
    assert!(teams::get(&t.db, team.id).await.unwrap_err().is_not_found());
    assert!(
        teams::soft_delete(&t.db, team.id)
            .await
            .unwrap_err()
            .is_not_found()
    );
    assert!(
        teams::rename(&t.db, team.id, "x")
            .await
            .unwrap_err()
            .is_not_found()
    );
    assert!(
        teams::list_for_user(&t.db, owner.id)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        teams::membership(&t.db, team.id, owner.id).await.unwrap(),
        None
    );
    let other = user(&t.db, "late@example.com").await;
    assert!(
        teams::add_member(&t.db, team.id, other.id, TeamRole::Member)
            .await
            .unwrap_err()
            .is_not_found()
    );

    // The owner's next team becomes their default.
    let next = teams::create_with_owner(&t.db, "next", owner.id)
        .await
        .unwrap();
    let default = teams::default_team_for_user(&t.db, owner.id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(default.team.id, next.id);
    assert!(default.is_default);
});

db_test!(default_team_falls_back_to_oldest_membership, |t| {
    let (_, a) = team(&t.db, "a").await;
    let (_, b) = team(&t.db, "b").await;
    let u = user(&t.db, "multi@example.com").await;
    teams::add_member(&t.db, a.id, u.id, TeamRole::Member)
        .await
        .unwrap();
    teams::add_member(&t.db, b.id, u.id, TeamRole::Member)
        .await
        .unwrap();
    assert!(teams::remove_member(&t.db, a.id, u.id).await.unwrap());
    // Not flagged default any more, but still the team to use.
    let d = teams::default_team_for_user(&t.db, u.id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(d.team.id, b.id);
    assert!(!d.is_default);
});

db_test!(deleting_a_user_cascades_to_memberships, |t| {
    let (owner, team) = team(&t.db, "cascade").await;
    let bob = user(&t.db, "bob@example.com").await;
    teams::add_member(&t.db, team.id, bob.id, TeamRole::Member)
        .await
        .unwrap();
    assert!(users::delete(&t.db, bob.id).await.unwrap());
    assert!(!users::delete(&t.db, bob.id).await.unwrap());
    let members = teams::list_members(&t.db, team.id).await.unwrap();
    assert_eq!(members.len(), 1);
    assert_eq!(members[0].user.id, owner.id);
    let err = teams::create_with_owner(&t.db, "ghost", bob.id)
        .await
        .unwrap_err();
    assert!(
        matches!(err, DbError::NotFound { entity: "user", .. }),
        "{err:?}"
    );
});
