//! The audit log: filters (`resource_type`, `action`) with pagination, their validation,
//! and who may read the team scope and the platform scope.

// Tests may panic on what they expect (see clippy.toml); helpers here are not `#[test]`s.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use std::collections::HashSet;

use common::{Engine, Harness, api_error, both_engines};
use nestbox_client::Client;
use nestbox_types::api::{AddMemberRequest, AuditLog, AuditLogQuery};
use nestbox_types::{ErrorCode, TeamRole};

both_engines!(
    filters_narrow_the_log_across_pages,
    invalid_filters_are_refused,
    the_platform_scope_is_for_platform_admins,
);

/// Every entry of a query, following cursors `limit` at a time.
async fn all_pages(
    client: &Client,
    query: AuditLogQuery,
    limit: u32,
) -> anyhow::Result<Vec<AuditLog>> {
    let mut out = Vec::new();
    let mut cursor = None;
    loop {
        let page = client
            .audit_logs_filtered(&AuditLogQuery {
                limit: Some(limit),
                cursor: cursor.clone(),
                ..query.clone()
            })
            .await?;
        anyhow::ensure!(page.items.len() <= limit as usize, "page larger than asked");
        out.extend(page.items);
        match page.next_cursor {
            Some(c) => cursor = Some(c),
            None => return Ok(out),
        }
    }
}

async fn filters_narrow_the_log_across_pages(engine: Engine) -> anyhow::Result<()> {
    let h = Harness::start(engine).await?;
    let mut created = Vec::new();
    for _ in 0..3 {
        created.push(h.sandbox().await?.id);
    }
    for id in &created[..2] {
        h.key.destroy_sandbox(*id).await?;
    }
    h.admin.client.create_api_key(h.team, "more").await?;
    let client = &h.admin.client;

    let destroys = all_pages(
        client,
        AuditLogQuery {
            action: Some("sandbox.destroy".into()),
            ..Default::default()
        },
        1,
    )
    .await?;
    assert_eq!(destroys.len(), 2);
    assert!(destroys.iter().all(|a| a.action == "sandbox.destroy"));
    let ids: HashSet<_> = destroys.iter().map(|a| a.id).collect();
    assert_eq!(ids.len(), 2, "no entry twice across pages");
    assert!(
        destroys[0].created_at >= destroys[1].created_at,
        "newest first"
    );

    let sandboxes = all_pages(
        client,
        AuditLogQuery {
            resource_type: Some("sandbox".into()),
            ..Default::default()
        },
        2,
    )
    .await?;
    assert_eq!(
        sandboxes.len(),
        5,
        "3 creates and 2 destroys: {sandboxes:#?}"
    );
    assert!(sandboxes.iter().all(|a| a.resource_type == "sandbox"));
    assert!(sandboxes.iter().all(|a| a.team_id == Some(h.team)));

    let both = all_pages(
        client,
        AuditLogQuery {
            resource_type: Some("sandbox".into()),
            action: Some("sandbox.create".into()),
            ..Default::default()
        },
        50,
    )
    .await?;
    assert_eq!(both.len(), 3);
    let none = all_pages(
        client,
        AuditLogQuery {
            resource_type: Some("api_key".into()),
            action: Some("sandbox.create".into()),
            ..Default::default()
        },
        50,
    )
    .await?;
    assert!(none.is_empty());
    let keys = all_pages(
        client,
        AuditLogQuery {
            resource_type: Some("api_key".into()),
            ..Default::default()
        },
        50,
    )
    .await?;
    // The first run's key and this one.
    assert_eq!(keys.len(), 2, "{keys:#?}");
    assert!(keys.iter().all(|a| a.action == "api_key.create"));
    h.shutdown().await;
    Ok(())
}

async fn invalid_filters_are_refused(engine: Engine) -> anyhow::Result<()> {
    let h = Harness::start(engine).await?;
    let bad = [
        AuditLogQuery {
            action: Some("Sandbox.Create".into()),
            ..Default::default()
        },
        AuditLogQuery {
            action: Some(String::new()),
            ..Default::default()
        },
        AuditLogQuery {
            resource_type: Some("sandbox.create".into()),
            ..Default::default()
        },
        AuditLogQuery {
            resource_type: Some("x".repeat(65)),
            ..Default::default()
        },
        AuditLogQuery {
            scope: Some("everything".into()),
            ..Default::default()
        },
        AuditLogQuery {
            cursor: Some("not-a-cursor".into()),
            ..Default::default()
        },
    ];
    for q in &bad {
        api_error(
            h.admin.client.audit_logs_filtered(q).await,
            400,
            ErrorCode::InvalidRequest,
        );
    }
    h.shutdown().await;
    Ok(())
}

async fn the_platform_scope_is_for_platform_admins(engine: Engine) -> anyhow::Result<()> {
    let h = Harness::start(engine).await?;
    // Creating users is a platform-level change (no team).
    let owner = h.user("owner").await?;
    let admin = h.user("teamadmin").await?;
    owner
        .client
        .add_member(
            owner.team,
            &AddMemberRequest {
                email: admin.email.clone(),
                role: Some(TeamRole::Admin),
            },
        )
        .await?;
    let platform = AuditLogQuery {
        scope: Some("platform".into()),
        ..Default::default()
    };
    let log = all_pages(&h.admin.client, platform.clone(), 1).await?;
    assert!(log.iter().all(|a| a.team_id.is_none()), "{log:#?}");
    let users = log.iter().filter(|a| a.action == "user.create").count();
    assert_eq!(users, 2, "{log:#?}");
    // Filters apply within the scope.
    let filtered = all_pages(
        &h.admin.client,
        AuditLogQuery {
            action: Some("user.create".into()),
            ..platform.clone()
        },
        50,
    )
    .await?;
    assert_eq!(filtered.len(), 2);

    // Owners of a team, its admins and API keys are not platform admins.
    let team_admin = admin.client.clone().with_team(owner.team);
    for who in [&owner.client, &team_admin] {
        api_error(
            who.audit_logs_filtered(&platform).await,
            403,
            ErrorCode::Forbidden,
        );
    }
    api_error(
        h.key.audit_logs_filtered(&platform).await,
        401,
        ErrorCode::Unauthorized,
    );
    // The team scope still works for the team's owner and admins and shows only theirs.
    for who in [&owner.client, &team_admin] {
        let own = who.audit_logs_filtered(&AuditLogQuery::default()).await?;
        assert!(own.items.iter().all(|a| a.team_id == Some(owner.team)));
    }
    h.shutdown().await;
    Ok(())
}
