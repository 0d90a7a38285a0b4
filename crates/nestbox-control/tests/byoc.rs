//! Bring your own compute, on SQLite and PostgreSQL: platform admins mark a team BYOC; its
//! owners and admins (not its members, not other teams) register, list and delete the
//! team's own hosts; the team's sandboxes run only there and no other team's ever do; a
//! BYOC team without an online host gets `no_capacity` and no record; a BYOC host never
//! defines the platform's templates; BYOC is turned off only once the team has no host.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{Engine, Harness, api_error, both_engines};
use nestbox_testkit::{SimAgent, SimAgentConfig};
use nestbox_types::api::{AddMemberRequest, CreateSandboxRequest, SandboxListQuery};
use nestbox_types::{ErrorCode, TeamRole};

both_engines!(
    a_byoc_team_runs_on_its_own_hosts_and_only_it_does,
    only_a_byoc_teams_owners_and_admins_manage_its_hosts,
);

async fn a_byoc_team_runs_on_its_own_hosts_and_only_it_does(engine: Engine) -> anyhow::Result<()> {
    let h = Harness::start(engine).await?;
    let owner = h.user("byoc-owner").await?;
    let team = owner.team;

    // Not BYOC yet: no hosts of its own.
    let refused = owner.client.create_team_host(team, "mine").await;
    api_error(refused, 403, ErrorCode::Forbidden);
    let listed = h.admin.client.list_all_teams().await?.items;
    let row = listed.iter().find(|t| t.id == team).expect("listed");
    assert!(!row.is_byoc);
    assert_eq!(row.members, 1);

    let marked = h.admin.client.set_team_byoc(team, true).await?;
    assert!(marked.is_byoc);
    // Its members see it from fresh team data.
    let mine = owner.client.list_teams().await?;
    assert!(mine.iter().any(|m| m.team.id == team && m.team.is_byoc));

    // A BYOC team with no online host gets no_capacity, and no record is left.
    let none = owner
        .client
        .create_sandbox(&CreateSandboxRequest::default())
        .await;
    api_error(none, 503, ErrorCode::NoCapacity);
    let left = owner
        .client
        .list_sandboxes(&SandboxListQuery::default())
        .await?;
    assert!(left.items.is_empty(), "{left:?}");

    // The owner registers a host; an agent joins with the token.
    let created = owner.client.create_team_host(team, "owner-box").await?;
    assert_eq!(created.host.team_id, Some(team));
    let byoc_agent = SimAgent::start(SimAgentConfig::default()).await?;
    let creds = byoc_agent
        .register(&h.url, &created.registration_token)
        .await?;
    byoc_agent.heartbeat().await?;
    let byoc_host = creds.host_id;

    let listed = owner.client.list_team_hosts(team).await?.items;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].id, byoc_host);
    assert_eq!(listed[0].team_name.as_deref(), Some(marked.name.as_str()));
    let all = h.admin.client.list_hosts().await?.items;
    let platform = all.iter().find(|x| x.id == h.host_id).unwrap();
    assert_eq!((platform.team_id, platform.team_name.clone()), (None, None));
    let theirs = all.iter().find(|x| x.id == byoc_host).unwrap();
    assert_eq!(theirs.team_id, Some(team));
    assert_eq!(theirs.team_name.as_deref(), Some(marked.name.as_str()));

    // A BYOC host's report never defines the platform's templates.
    assert_eq!(
        h.services
            .sync_host_templates(byoc_host, &byoc_agent.address())
            .await?,
        0
    );

    // The team's sandboxes land on its host; another team's never do.
    let mut own = Vec::new();
    for _ in 0..3 {
        let sb = owner
            .client
            .create_sandbox(&CreateSandboxRequest::default())
            .await?;
        assert_eq!(sb.host_id, Some(byoc_host));
        own.push(sb.id);
    }
    for _ in 0..4 {
        let sb = h.sandbox().await?;
        assert_eq!(sb.host_id, Some(h.host_id));
        assert!(byoc_agent.sandbox(sb.id).is_none());
        h.key.destroy_sandbox(sb.id).await?;
    }
    assert_eq!(byoc_agent.sandbox_ids().len(), 3);

    // BYOC cannot be turned off while the team has hosts; nor can a host with sandboxes go.
    let busy = h.admin.client.set_team_byoc(team, false).await;
    api_error(busy, 409, ErrorCode::Conflict);
    let busy = owner.client.delete_team_host(team, byoc_host).await;
    api_error(busy, 409, ErrorCode::Conflict);
    for id in own {
        owner.client.destroy_sandbox(id).await?;
    }
    owner.client.delete_team_host(team, byoc_host).await?;
    let off = h.admin.client.set_team_byoc(team, false).await?;
    assert!(!off.is_byoc);
    // Its sandboxes run on the platform's hosts again.
    let sb = owner
        .client
        .create_sandbox(&CreateSandboxRequest::default())
        .await?;
    assert_eq!(sb.host_id, Some(h.host_id));

    byoc_agent.shutdown().await;
    h.shutdown().await;
    Ok(())
}

async fn only_a_byoc_teams_owners_and_admins_manage_its_hosts(
    engine: Engine,
) -> anyhow::Result<()> {
    let h = Harness::start(engine).await?;
    let owner = h.user("owner").await?;
    let admin = h.user("team-admin").await?;
    let member = h.user("member").await?;
    let stranger = h.user("stranger").await?;
    let team = owner.team;
    for (who, role) in [(&admin, TeamRole::Admin), (&member, TeamRole::Member)] {
        owner
            .client
            .add_member(
                team,
                &AddMemberRequest {
                    email: who.email.clone(),
                    role: Some(role),
                },
            )
            .await?;
    }
    h.admin.client.set_team_byoc(team, true).await?;
    // Only platform admins mark teams BYOC.
    let refused = owner.client.set_team_byoc(stranger.team, true).await;
    api_error(refused, 403, ErrorCode::Forbidden);

    let by_admin = admin.client.create_team_host(team, "a").await?;
    assert_eq!(by_admin.host.team_id, Some(team));
    let by_platform = h.admin.client.create_byoc_host(team, "p").await?;
    assert_eq!(by_platform.host.team_id, Some(team));
    assert_eq!(owner.client.list_team_hosts(team).await?.items.len(), 2);

    // Members may not; other teams do not see the team at all.
    api_error(
        member.client.create_team_host(team, "m").await,
        403,
        ErrorCode::Forbidden,
    );
    api_error(
        member.client.list_team_hosts(team).await,
        403,
        ErrorCode::Forbidden,
    );
    api_error(
        stranger.client.list_team_hosts(team).await,
        404,
        ErrorCode::TeamNotFound,
    );
    api_error(
        stranger
            .client
            .delete_team_host(team, by_admin.host.id)
            .await,
        404,
        ErrorCode::TeamNotFound,
    );
    // A team not BYOC has no hosts to manage, even for its owner.
    api_error(
        stranger.client.list_team_hosts(stranger.team).await,
        403,
        ErrorCode::Forbidden,
    );
    // A platform admin cannot give a host to a team that is not BYOC.
    api_error(
        h.admin.client.create_byoc_host(stranger.team, "x").await,
        400,
        ErrorCode::InvalidRequest,
    );
    // A platform host is not the team's to delete.
    api_error(
        owner.client.delete_team_host(team, h.host_id).await,
        404,
        ErrorCode::HostNotFound,
    );

    owner
        .client
        .delete_team_host(team, by_admin.host.id)
        .await?;
    h.admin.client.delete_host(by_platform.host.id).await?;
    assert!(owner.client.list_team_hosts(team).await?.items.is_empty());
    h.shutdown().await;
    Ok(())
}
