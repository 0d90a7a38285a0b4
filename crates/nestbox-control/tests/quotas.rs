//! Per-team quotas: set by platform admins, read by the team, enforced on creates, pauses,
//! resumes and templates with `429 quota_exceeded`, and never passed by concurrent
//! requests together.

// Tests may panic on what they expect (see clippy.toml); helpers here are not `#[test]`s.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use common::{Engine, Harness, api_error, both_engines};
use nestbox_types::api::{
    AuditLogQuery, CreateSandboxRequest, CreateSnapshotRequest, SandboxListQuery, TeamQuotaLimits,
};
use nestbox_types::{ErrorCode, SandboxStatus};

both_engines!(
    quotas_hold_creates_pauses_resumes_and_templates,
    concurrent_creates_never_pass_a_limit_together,
    concurrent_templates_never_pass_a_limit_together,
);

async fn live(h: &Harness) -> anyhow::Result<usize> {
    let page = h.key.list_sandboxes(&SandboxListQuery::default()).await?;
    Ok(page.items.len())
}

async fn quotas_hold_creates_pauses_resumes_and_templates(engine: Engine) -> anyhow::Result<()> {
    let h = Harness::start(engine).await?;
    let admin = &h.admin.client;
    // New teams have no limits; the team's own API key sees them and its usage.
    let q = h.key.team_quotas(h.team).await?;
    assert_eq!(q.limits, TeamQuotaLimits::default());
    assert_eq!(q.usage.running, 0);

    let one = TeamQuotaLimits {
        max_running: Some(1),
        ..Default::default()
    };
    let set = admin.set_team_quotas(h.team, &one).await?;
    assert_eq!(set.limits, one);
    // The admin console reads any team's quotas; an unknown team is 404.
    let (http, url) = h.raw(&format!("/v1/admin/teams/{}/quotas", h.team));
    let token = h.services.sessions.issue(h.admin.id)?.0;
    let read: nestbox_types::api::TeamQuotas = http
        .get(&url)
        .bearer_auth(&token)
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(read.limits, one);
    let (_, unknown) = h.raw(&format!(
        "/v1/admin/teams/{}/quotas",
        nestbox_types::TeamId::new()
    ));
    let resp = http.get(&unknown).bearer_auth(&token).send().await?;
    common::raw_error(resp, 404, ErrorCode::TeamNotFound).await?;
    let a = h.sandbox().await?;
    let refused = api_error(h.sandbox().await, 429, ErrorCode::QuotaExceeded);
    assert!(
        refused.error.message.contains("running sandboxes"),
        "{refused:?}"
    );
    assert!(!refused.error.retryable);
    assert_eq!(live(&h).await?, 1, "a refused create leaves no record");
    let q = h.key.team_quotas(h.team).await?;
    assert_eq!((q.usage.running, q.usage.paused), (1, 0));
    assert_eq!(u64::from(a.vcpus), q.usage.vcpus);
    assert_eq!(u64::from(a.memory_mb), q.usage.memory_mb);
    assert_eq!(u64::from(a.disk_size_mb), q.usage.disk_mb);

    // Pauses past the paused quota are refused and leave the sandbox running.
    let no_paused = TeamQuotaLimits {
        max_paused: Some(0),
        ..one
    };
    admin.set_team_quotas(h.team, &no_paused).await?;
    api_error(
        h.key.pause_sandbox(a.id).await,
        429,
        ErrorCode::QuotaExceeded,
    );
    assert_eq!(
        h.key.get_sandbox(a.id).await?.status,
        SandboxStatus::Running
    );

    // Paused, it frees its running slot; resuming needs one again.
    let paused_ok = TeamQuotaLimits {
        max_paused: Some(1),
        ..one
    };
    admin.set_team_quotas(h.team, &paused_ok).await?;
    h.key.pause_sandbox(a.id).await?;
    let b = h.sandbox().await?;
    let refused = api_error(
        h.key.resume_sandbox(a.id).await,
        429,
        ErrorCode::QuotaExceeded,
    );
    assert!(refused.error.message.contains("running"), "{refused:?}");
    assert_eq!(h.key.get_sandbox(a.id).await?.status, SandboxStatus::Paused);
    h.key.destroy_sandbox(b.id).await?;
    assert_eq!(
        h.key.resume_sandbox(a.id).await?.status,
        SandboxStatus::Running
    );

    // Sizes count too.
    let small = TeamQuotaLimits {
        max_vcpus: Some(a.vcpus + 1),
        max_memory_mb: Some(a.memory_mb),
        ..Default::default()
    };
    admin.set_team_quotas(h.team, &small).await?;
    let refused = api_error(h.sandbox().await, 429, ErrorCode::QuotaExceeded);
    assert!(refused.error.message.contains("memory_mb"), "{refused:?}");
    let big = CreateSandboxRequest {
        vcpus: Some(2),
        ..Default::default()
    };
    let refused = api_error(
        h.key.create_sandbox(&big).await,
        429,
        ErrorCode::QuotaExceeded,
    );
    assert!(refused.error.message.contains("vcpus"), "{refused:?}");

    // Templates: a new name counts.
    let none = TeamQuotaLimits {
        max_templates: Some(0),
        ..Default::default()
    };
    admin.set_team_quotas(h.team, &none).await?;
    let snap = CreateSnapshotRequest {
        sandbox_id: a.id,
        name: "mine".into(),
        overwrite: false,
        kind: None,
    };
    api_error(
        h.key.create_snapshot(&snap).await,
        429,
        ErrorCode::QuotaExceeded,
    );
    // Lifted, everything goes again.
    admin
        .set_team_quotas(h.team, &TeamQuotaLimits::default())
        .await?;
    h.key.create_snapshot(&snap).await?;
    assert_eq!(h.key.team_quotas(h.team).await?.usage.templates, 1);
    h.sandbox().await?;

    // Only platform admins set quotas (an API key lacks the session it takes), and every
    // change is audited.
    api_error(
        h.key.set_team_quotas(h.team, &one).await,
        401,
        ErrorCode::Unauthorized,
    );
    let audit = admin
        .audit_logs_filtered(&AuditLogQuery {
            action: Some("team.quotas_set".into()),
            ..Default::default()
        })
        .await?;
    assert_eq!(audit.items.len(), 6, "{audit:?}");
    Ok(())
}

async fn concurrent_creates_never_pass_a_limit_together(engine: Engine) -> anyhow::Result<()> {
    let h = Harness::start(engine).await?;
    let two = TeamQuotaLimits {
        max_running: Some(2),
        ..Default::default()
    };
    h.admin.client.set_team_quotas(h.team, &two).await?;
    let creates = (0..6).map(|_| h.sandbox());
    let results = futures::future::join_all(creates).await;
    let made = results.iter().filter(|r| r.is_ok()).count();
    for r in results.into_iter().filter(|r| r.is_err()) {
        api_error(r, 429, ErrorCode::QuotaExceeded);
    }
    assert_eq!(made, 2);
    assert_eq!(live(&h).await?, 2);
    Ok(())
}

async fn concurrent_templates_never_pass_a_limit_together(engine: Engine) -> anyhow::Result<()> {
    let h = Harness::start(engine).await?;
    let mut sandboxes = Vec::new();
    for _ in 0..4 {
        sandboxes.push(h.sandbox().await?);
    }
    let one = TeamQuotaLimits {
        max_templates: Some(1),
        ..Default::default()
    };
    h.admin.client.set_team_quotas(h.team, &one).await?;
    let snaps = sandboxes.iter().enumerate().map(|(i, sb)| {
        let req = CreateSnapshotRequest {
            sandbox_id: sb.id,
            name: format!("t{i}"),
            overwrite: false,
            kind: None,
        };
        let key = h.key.clone();
        async move { key.create_snapshot(&req).await }
    });
    let results = futures::future::join_all(snaps).await;
    let made = results.iter().filter(|r| r.is_ok()).count();
    for r in results.into_iter().filter(|r| r.is_err()) {
        api_error(r, 429, ErrorCode::QuotaExceeded);
    }
    assert_eq!(made, 1);
    assert_eq!(h.key.team_quotas(h.team).await?.usage.templates, 1);
    Ok(())
}
