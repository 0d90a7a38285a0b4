//! Teams: creating and renaming them, members and their roles, API keys, and how access
//! ends at once when a member is removed or a key revoked.

// Tests may panic on what they expect (see clippy.toml); helpers here are not `#[test]`s.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use common::{Engine, Harness, TestUser, api_error, both_engines};
use nestbox_client::Client;
use nestbox_types::api::{AddMemberRequest, CreateSandboxRequest, SandboxListQuery};
use nestbox_types::{ErrorCode, TeamId, TeamRole};

both_engines!(
    create_rename_and_read_a_team,
    members_and_roles,
    owner_cannot_be_demoted_or_removed,
    members_may_leave,
    removed_member_loses_access_at_once,
    api_keys_work_until_revoked,
    team_with_live_sandboxes_cannot_be_deleted,
);

/// `owner`'s new team with `others` added in their roles; returns the team.
async fn team_with(
    name: &str,
    owner: &TestUser,
    others: &[(&TestUser, TeamRole)],
) -> anyhow::Result<TeamId> {
    let team = owner.client.create_team(name).await?;
    for (user, role) in others {
        owner
            .client
            .add_member(
                team.id,
                &AddMemberRequest {
                    email: user.email.clone(),
                    role: Some(*role),
                },
            )
            .await?;
    }
    Ok(team.id)
}

fn as_team(user: &TestUser, team: TeamId) -> Client {
    user.client.clone().with_team(team)
}

async fn create_rename_and_read_a_team(engine: Engine) -> anyhow::Result<()> {
    let h = Harness::start(engine).await?;
    let alice = h.user("alice").await?;

    let team = alice.client.create_team("  Research  ").await?;
    assert_eq!(team.name, "Research", "names are trimmed");
    let teams = alice.client.list_teams().await?;
    let mine = teams
        .iter()
        .find(|m| m.team.id == team.id)
        .expect("the new team is listed");
    assert_eq!(mine.role, TeamRole::Owner);
    assert!(!mine.is_default, "the personal team stays the default");

    let renamed = alice.client.rename_team(team.id, "Research & Dev").await?;
    assert_eq!(renamed.name, "Research & Dev");
    assert_eq!(alice.client.get_team(team.id).await?, renamed);
    let members = alice.client.list_members(team.id).await?;
    assert_eq!(members.len(), 1);
    assert_eq!(
        (members[0].user_id, members[0].role),
        (alice.id, TeamRole::Owner)
    );

    for bad in ["", "   ", "tab\tname", &"x".repeat(129)] {
        api_error(
            alice.client.create_team(bad).await,
            400,
            ErrorCode::InvalidRequest,
        );
    }
    api_error(
        h.key.create_team("keys cannot").await,
        401,
        ErrorCode::Unauthorized,
    );
    h.shutdown().await;
    Ok(())
}

async fn members_and_roles(engine: Engine) -> anyhow::Result<()> {
    let h = Harness::start(engine).await?;
    let alice = h.user("alice").await?;
    let bob = h.user("bob").await?;
    let carol = h.user("carol").await?;
    let dave = h.user("dave").await?;

    let team = alice.client.create_team("Ops").await?.id;
    let added = alice
        .client
        .add_member(
            team,
            &AddMemberRequest {
                email: "BOB@example.com".into(),
                role: None,
            },
        )
        .await?;
    assert_eq!(
        (added.user_id, added.role),
        (bob.id, TeamRole::Member),
        "member by default"
    );
    alice
        .client
        .add_member(
            team,
            &AddMemberRequest {
                email: carol.email.clone(),
                role: Some(TeamRole::Admin),
            },
        )
        .await?;

    // A member reads, but does not manage.
    assert_eq!(bob.client.list_members(team).await?.len(), 3);
    bob.client.get_team(team).await?;
    let add_dave = AddMemberRequest {
        email: dave.email.clone(),
        role: None,
    };
    api_error(
        bob.client.add_member(team, &add_dave).await,
        403,
        ErrorCode::Forbidden,
    );
    api_error(
        bob.client.rename_team(team, "Mine").await,
        403,
        ErrorCode::Forbidden,
    );
    // An admin manages members.
    carol.client.add_member(team, &add_dave).await?;
    let promoted = carol
        .client
        .update_member(team, bob.id, TeamRole::Admin)
        .await?;
    assert_eq!(promoted.role, TeamRole::Admin);
    carol.client.remove_member(team, dave.id).await?;

    carol.client.add_member(team, &add_dave).await?;
    api_error(
        carol.client.add_member(team, &add_dave).await,
        409,
        ErrorCode::AlreadyExists,
    );
    api_error(
        carol
            .client
            .add_member(
                team,
                &AddMemberRequest {
                    email: "nobody@example.com".into(),
                    role: None,
                },
            )
            .await,
        404,
        ErrorCode::UserNotFound,
    );
    api_error(
        carol
            .client
            .add_member(
                team,
                &AddMemberRequest {
                    email: h.admin.email.clone(),
                    role: Some(TeamRole::Owner),
                },
            )
            .await,
        400,
        ErrorCode::InvalidRequest,
    );
    api_error(
        carol
            .client
            .update_member(team, bob.id, TeamRole::Owner)
            .await,
        400,
        ErrorCode::InvalidRequest,
    );
    api_error(
        carol.client.remove_member(team, h.admin.id).await,
        404,
        ErrorCode::UserNotFound,
    );
    let roles: Vec<(String, TeamRole)> = alice
        .client
        .list_members(team)
        .await?
        .into_iter()
        .map(|m| (m.email, m.role))
        .collect();
    assert_eq!(roles.len(), 4, "{roles:?}");
    assert!(roles.contains(&(dave.email.clone(), TeamRole::Member)));
    h.shutdown().await;
    Ok(())
}

async fn owner_cannot_be_demoted_or_removed(engine: Engine) -> anyhow::Result<()> {
    let h = Harness::start(engine).await?;
    let alice = h.user("alice").await?;
    let carol = h.user("carol").await?;
    let team = team_with("Core", &alice, &[(&carol, TeamRole::Admin)]).await?;

    for by in [&alice, &carol] {
        api_error(
            by.client
                .update_member(team, alice.id, TeamRole::Member)
                .await,
            403,
            ErrorCode::Forbidden,
        );
        api_error(
            by.client.remove_member(team, alice.id).await,
            403,
            ErrorCode::Forbidden,
        );
    }
    api_error(
        carol.client.delete_team(team).await,
        403,
        ErrorCode::Forbidden,
    );
    let owner = alice.client.list_members(team).await?;
    assert!(
        owner
            .iter()
            .any(|m| m.user_id == alice.id && m.role == TeamRole::Owner)
    );
    h.shutdown().await;
    Ok(())
}

async fn members_may_leave(engine: Engine) -> anyhow::Result<()> {
    let h = Harness::start(engine).await?;
    let alice = h.user("alice").await?;
    let bob = h.user("bob").await?;
    let carol = h.user("carol").await?;
    let team = team_with(
        "Guild",
        &alice,
        &[(&bob, TeamRole::Member), (&carol, TeamRole::Member)],
    )
    .await?;

    api_error(
        bob.client.remove_member(team, carol.id).await,
        403,
        ErrorCode::Forbidden,
    );
    bob.client.remove_member(team, bob.id).await?;
    api_error(
        bob.client.get_team(team).await,
        404,
        ErrorCode::TeamNotFound,
    );
    assert!(
        !bob.client
            .list_teams()
            .await?
            .iter()
            .any(|m| m.team.id == team)
    );
    let left: Vec<_> = alice
        .client
        .list_members(team)
        .await?
        .into_iter()
        .map(|m| m.user_id)
        .collect();
    assert!(!left.contains(&bob.id) && left.contains(&carol.id));
    h.shutdown().await;
    Ok(())
}

async fn removed_member_loses_access_at_once(engine: Engine) -> anyhow::Result<()> {
    let h = Harness::start(engine).await?;
    let alice = h.user("alice").await?;
    let bob = h.user("bob").await?;
    let team = team_with("Lab", &alice, &[(&bob, TeamRole::Admin)]).await?;

    let bob_in_lab = as_team(&bob, team);
    let sb = bob_in_lab
        .create_sandbox(&CreateSandboxRequest::default())
        .await?;
    assert_eq!(sb.team_id, team);
    bob_in_lab.get_sandbox(sb.id).await?;

    alice.client.remove_member(team, bob.id).await?;
    api_error(
        bob_in_lab.get_sandbox(sb.id).await,
        404,
        ErrorCode::TeamNotFound,
    );
    api_error(
        bob_in_lab
            .list_sandboxes(&SandboxListQuery::default())
            .await,
        404,
        ErrorCode::TeamNotFound,
    );
    api_error(
        bob.client.list_members(team).await,
        404,
        ErrorCode::TeamNotFound,
    );
    api_error(
        bob.client.get_sandbox(sb.id).await,
        404,
        ErrorCode::SandboxNotFound,
    );
    // Their own team still works.
    bob.client.me().await?;
    as_team(&alice, team).destroy_sandbox(sb.id).await?;
    h.shutdown().await;
    Ok(())
}

async fn api_keys_work_until_revoked(engine: Engine) -> anyhow::Result<()> {
    let h = Harness::start(engine).await?;
    let alice = h.user("alice").await?;
    let bob = h.user("bob").await?;
    let team = team_with("Bots", &alice, &[(&bob, TeamRole::Member)]).await?;

    let created = alice.client.create_api_key(team, "ci").await?;
    assert!(created.key.starts_with(&created.api_key.prefix));
    assert_eq!(created.api_key.team_id, team);
    let ci = h.anonymous().with_api_key(&created.key);
    let me = ci.me().await?;
    assert_eq!((me.user.is_none(), me.team_id), (true, team));
    let sb = ci.create_sandbox(&CreateSandboxRequest::default()).await?;
    assert_eq!(sb.team_id, team);

    // Listed without the secret, with its last use.
    let (http, url) = h.raw(&format!("/v1/teams/{team}/api-keys"));
    let token = h.services.sessions.issue(bob.id)?.0;
    let raw = http
        .get(url)
        .bearer_auth(token)
        .send()
        .await?
        .text()
        .await?;
    assert!(
        !raw.contains(&created.key),
        "the secret is never listed: {raw}"
    );
    let listed = bob.client.list_api_keys(team).await?;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].id, created.api_key.id);
    assert!(listed[0].last_used_at.is_some(), "use is recorded");

    api_error(
        bob.client.create_api_key(team, "mine").await,
        403,
        ErrorCode::Forbidden,
    );
    api_error(
        bob.client.delete_api_key(team, created.api_key.id).await,
        403,
        ErrorCode::Forbidden,
    );
    api_error(
        ci.create_api_key(team, "keys do not make keys").await,
        401,
        ErrorCode::Unauthorized,
    );

    alice
        .client
        .delete_api_key(team, created.api_key.id)
        .await?;
    api_error(ci.me().await, 401, ErrorCode::Unauthorized);
    api_error(ci.get_sandbox(sb.id).await, 401, ErrorCode::Unauthorized);
    api_error(
        alice.client.delete_api_key(team, created.api_key.id).await,
        404,
        ErrorCode::NotFound,
    );
    assert!(alice.client.list_api_keys(team).await?.is_empty());
    h.shutdown().await;
    Ok(())
}

async fn team_with_live_sandboxes_cannot_be_deleted(engine: Engine) -> anyhow::Result<()> {
    let h = Harness::start(engine).await?;
    let alice = h.user("alice").await?;
    let team = alice.client.create_team("Short-lived").await?.id;
    let in_team = as_team(&alice, team);
    let sb = in_team
        .create_sandbox(&CreateSandboxRequest::default())
        .await?;

    api_error(
        alice.client.delete_team(team).await,
        409,
        ErrorCode::Conflict,
    );
    in_team.destroy_sandbox(sb.id).await?;
    alice.client.delete_team(team).await?;
    api_error(
        alice.client.get_team(team).await,
        404,
        ErrorCode::TeamNotFound,
    );
    api_error(in_team.me().await, 404, ErrorCode::TeamNotFound);
    api_error(
        h.admin
            .client
            .delete_team(nestbox_types::PLATFORM_TEAM)
            .await,
        403,
        ErrorCode::Forbidden,
    );
    h.shutdown().await;
    Ok(())
}
