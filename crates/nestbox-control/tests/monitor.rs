//! The host monitor: hosts that stop heartbeating, sandboxes their agent lost, and orphans
//! the agent runs although the database says they should not exist.

// Tests may panic on what they expect (see clippy.toml); helpers here are not `#[test]`s.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::{Engine, Harness, Options, WAIT, api_error, both_engines};
use nestbox_db::sandboxes;
use nestbox_testkit::{SimOp, SimState, wait_for};
use nestbox_types::api::{ExecRequest, PageQuery};
use nestbox_types::{ErrorCode, HostStatus, SandboxId, SandboxStatus};

both_engines!(
    silent_host_becomes_unreachable_and_recovers,
    sandbox_lost_by_its_host_becomes_error,
    sandbox_gone_when_its_host_returns_becomes_error,
    orphans_are_destroyed_on_the_agent,
    auto_paused_sandboxes_become_paused_never_stopped,
    a_paused_sandbox_its_host_lost_becomes_error,
    paused_sandboxes_go_missing_with_their_host_and_come_back_paused,
    a_sandbox_resumed_behind_its_back_runs_once_its_pause_settled,
    creates_that_lost_their_call_are_settled,
);

/// A control plane whose hosts are unreachable after two seconds without heartbeat.
async fn short_grace(engine: Engine) -> anyhow::Result<Harness> {
    Harness::with(
        engine,
        Options {
            host_grace: Duration::from_secs(2),
            ..Options::default()
        },
    )
    .await
}

async fn host_status(h: &Harness) -> anyhow::Result<HostStatus> {
    let hosts = h.admin.client.list_hosts().await?.items;
    let host = hosts
        .iter()
        .find(|x| x.id == h.host_id)
        .ok_or_else(|| anyhow::anyhow!("the host is not listed"))?;
    Ok(host.status)
}

/// Runs monitor passes until the host is unreachable (its heartbeat ages past the grace).
async fn wait_until_unreachable(h: &Harness) -> anyhow::Result<()> {
    wait_for(WAIT, || async {
        h.monitor_pass().await?;
        match host_status(h).await? {
            HostStatus::Unreachable => Ok(()),
            other => Err(anyhow::anyhow!("host is {other}")),
        }
    })
    .await?;
    Ok(())
}

fn echo() -> ExecRequest {
    ExecRequest {
        argv: Some(vec!["echo".into(), "alive".into()]),
        ..Default::default()
    }
}

async fn silent_host_becomes_unreachable_and_recovers(engine: Engine) -> anyhow::Result<()> {
    let h = short_grace(engine).await?;
    let sb = h.sandbox().await?;
    h.agent.heartbeat().await?;
    h.monitor_pass().await?;
    assert_eq!(
        host_status(&h).await?,
        HostStatus::Online,
        "fresh heartbeat"
    );
    assert_eq!(
        h.key.get_sandbox(sb.id).await?.status,
        SandboxStatus::Running
    );

    wait_until_unreachable(&h).await?;
    let missing = h.key.get_sandbox(sb.id).await?;
    assert_eq!(missing.status, SandboxStatus::Missing);
    assert!(missing.error.is_some(), "says why: {missing:?}");
    api_error(
        h.key.exec(sb.id, &echo()).await,
        409,
        ErrorCode::SandboxNotRunning,
    );
    let body = api_error(
        h.key.destroy_sandbox(sb.id).await,
        503,
        ErrorCode::HostUnavailable,
    );
    assert!(body.error.retryable);
    api_error(h.sandbox().await, 503, ErrorCode::NoCapacity);

    h.agent.heartbeat().await?;
    assert_eq!(host_status(&h).await?, HostStatus::Online);
    h.monitor_pass().await?;
    let back = h.key.get_sandbox(sb.id).await?;
    assert_eq!(back.status, SandboxStatus::Running, "back with its host");
    assert_eq!(back.error, None);
    let out = h.key.exec(sb.id, &echo()).await?;
    assert_eq!(out.stdout, "echo alive\n");
    h.shutdown().await;
    Ok(())
}

async fn sandbox_lost_by_its_host_becomes_error(engine: Engine) -> anyhow::Result<()> {
    let h = Harness::start(engine).await?;
    let lost = h.sandbox().await?;
    let kept = h.sandbox().await?;
    assert!(h.agent.lose(lost.id));

    h.monitor_pass().await?;
    let got = h.key.get_sandbox(lost.id).await?;
    assert_eq!(got.status, SandboxStatus::Error);
    let reason = got.error.unwrap_or_default();
    assert!(reason.contains("lost by its host"), "{reason}");
    assert!(got.stopped_at.is_some());
    assert_eq!(
        h.key.get_sandbox(kept.id).await?.status,
        SandboxStatus::Running
    );

    let log = h.admin.client.audit_logs(&PageQuery::default()).await?;
    let entry = log
        .items
        .iter()
        .find(|a| a.action == "sandbox.lost")
        .expect("the loss is audited");
    assert_eq!(
        entry.resource_id.as_deref(),
        Some(lost.id.to_string().as_str())
    );
    assert_eq!(
        (entry.actor_type.as_str(), entry.status.as_str()),
        ("system", "failure")
    );

    // Destroying what is left is fine, and does not bother the agent.
    let destroys = h.agent.calls(SimOp::Destroy);
    h.key.destroy_sandbox(lost.id).await?;
    assert_eq!(h.agent.calls(SimOp::Destroy), destroys);
    h.shutdown().await;
    Ok(())
}

async fn sandbox_gone_when_its_host_returns_becomes_error(engine: Engine) -> anyhow::Result<()> {
    let h = short_grace(engine).await?;
    let gone = h.sandbox().await?;
    let survivor = h.sandbox().await?;
    wait_until_unreachable(&h).await?;
    assert_eq!(
        h.key.get_sandbox(gone.id).await?.status,
        SandboxStatus::Missing
    );

    // The agent restarted meanwhile and lost one of them.
    assert!(h.agent.lose(gone.id));
    h.agent.heartbeat().await?;
    h.monitor_pass().await?;
    assert_eq!(
        h.key.get_sandbox(survivor.id).await?.status,
        SandboxStatus::Running
    );
    let got = h.key.get_sandbox(gone.id).await?;
    assert_eq!(
        got.status,
        SandboxStatus::Error,
        "a missing sandbox its returned host does not know is lost, not missing forever"
    );
    let load = sandboxes::host_load(&h.services.db, h.host_id).await?;
    assert_eq!(load.sandboxes, 1, "it no longer holds a slot on the host");
    h.shutdown().await;
    Ok(())
}

async fn orphans_are_destroyed_on_the_agent(engine: Engine) -> anyhow::Result<()> {
    let h = Harness::start(engine).await?;
    // One the control plane never heard of…
    let stranger = SandboxId::new();
    h.agent.adopt(stranger, h.team, "minimal");
    // …one the database says is stopped (its destroy never reached the agent)…
    let stopped = h.sandbox().await?;
    sandboxes::transition(
        &h.services.db,
        stopped.id,
        &[SandboxStatus::Running],
        SandboxStatus::Stopped,
        None,
    )
    .await?;
    // …and one that is fine.
    let fine = h.sandbox().await?;

    h.monitor_pass().await?;
    assert!(
        h.agent.sandbox(stranger).is_none(),
        "unknown sandbox destroyed"
    );
    assert!(
        h.agent.sandbox(stopped.id).is_none(),
        "stopped sandbox destroyed"
    );
    assert!(h.agent.sandbox(fine.id).is_some(), "live sandbox untouched");
    assert_eq!(h.agent.calls(SimOp::Destroy), 2);
    assert_eq!(
        h.key.get_sandbox(stopped.id).await?.status,
        SandboxStatus::Stopped
    );
    assert_eq!(
        h.key.get_sandbox(fine.id).await?.status,
        SandboxStatus::Running
    );

    // A failing orphan destroy is retried on the next pass.
    let again = SandboxId::new();
    h.agent.adopt(again, h.team, "minimal");
    h.agent
        .fail_next(SimOp::Destroy, ErrorCode::Busy, "the VMM is busy");
    h.monitor_pass().await?;
    assert!(h.agent.sandbox(again).is_some());
    h.monitor_pass().await?;
    assert!(h.agent.sandbox(again).is_none());
    h.shutdown().await;
    Ok(())
}

async fn auto_paused_sandboxes_become_paused_never_stopped(engine: Engine) -> anyhow::Result<()> {
    let h = Harness::start(engine).await?;
    let idle = h.sandbox().await?;
    let busy = h.sandbox().await?;
    assert!(h.agent.auto_pause(idle.id), "its inactivity timer fired");

    for _ in 0..2 {
        h.monitor_pass().await?;
        assert_eq!(
            h.key.get_sandbox(idle.id).await?.status,
            SandboxStatus::Paused
        );
    }
    assert_eq!(
        h.key.get_sandbox(busy.id).await?.status,
        SandboxStatus::Running
    );
    assert_eq!(h.agent.calls(SimOp::Destroy), 0, "its saved state is kept");
    let log = h.admin.client.audit_logs(&PageQuery::default()).await?;
    let entry = log
        .items
        .iter()
        .find(|a| a.action == "sandbox.auto_pause")
        .expect("the pause is audited");
    assert_eq!(
        entry.resource_id.as_deref(),
        Some(idle.id.to_string().as_str())
    );
    assert_eq!(entry.actor_type, "system");
    assert_eq!(entry.details["auto_paused"], true);

    // It resumes like any paused sandbox.
    h.key_api().resume(idle.id).await?;
    assert_eq!(
        h.agent.sandbox(idle.id).map(|s| s.state),
        Some(SimState::Running)
    );
    h.shutdown().await;
    Ok(())
}

async fn a_paused_sandbox_its_host_lost_becomes_error(engine: Engine) -> anyhow::Result<()> {
    let h = Harness::start(engine).await?;
    let sb = h.sandbox().await?;
    h.key_api().pause(sb.id).await?;
    assert!(h.agent.lose(sb.id), "its snapshot files are gone");

    h.monitor_pass().await?;
    let got = h.key.get_sandbox(sb.id).await?;
    assert_eq!(got.status, SandboxStatus::Error);
    let reason = got.error.unwrap_or_default();
    assert!(reason.contains("lost by its host"), "{reason}");
    api_error(h.key_api().resume(sb.id).await, 409, ErrorCode::Conflict);
    h.shutdown().await;
    Ok(())
}

async fn paused_sandboxes_go_missing_with_their_host_and_come_back_paused(
    engine: Engine,
) -> anyhow::Result<()> {
    let h = short_grace(engine).await?;
    let paused = h.sandbox().await?;
    let running = h.sandbox().await?;
    h.key_api().pause(paused.id).await?;

    wait_until_unreachable(&h).await?;
    for sb in [&paused, &running] {
        assert_eq!(
            h.key.get_sandbox(sb.id).await?.status,
            SandboxStatus::Missing
        );
    }
    api_error(
        h.key_api().resume(paused.id).await,
        409,
        ErrorCode::Conflict,
    );

    h.agent.heartbeat().await?;
    h.monitor_pass().await?;
    assert_eq!(
        h.key.get_sandbox(paused.id).await?.status,
        SandboxStatus::Paused,
        "back as its host holds it"
    );
    assert_eq!(
        h.key.get_sandbox(running.id).await?.status,
        SandboxStatus::Running
    );
    h.key_api().resume(paused.id).await?;
    h.shutdown().await;
    Ok(())
}

async fn a_sandbox_resumed_behind_its_back_runs_once_its_pause_settled(
    engine: Engine,
) -> anyhow::Result<()> {
    // A pause call lasts at most a second here, so a pause marked longer ago is over.
    let h = Harness::with(
        engine,
        Options {
            pause_timeout: Duration::from_secs(1),
            ..Options::default()
        },
    )
    .await?;
    let sb = h.sandbox().await?;
    h.key_api().pause(sb.id).await?;
    // The answer to a resume never reached the control plane.
    assert!(h.agent.resume_unasked(sb.id));

    wait_for(WAIT, || async {
        h.monitor_pass().await?;
        let status = h.key.get_sandbox(sb.id).await?.status;
        anyhow::ensure!(status == SandboxStatus::Running, "still {status}");
        Ok(())
    })
    .await?;
    assert_eq!(h.key.exec(sb.id, &echo()).await?.stdout, "echo alive\n");
    h.shutdown().await;
    Ok(())
}

/// A sandbox record left `pending` (no host yet) or `starting` (on `host`), as a control
/// plane that died in the middle of a create leaves it.
async fn abandoned_create(
    h: &Harness,
    host: Option<nestbox_types::HostId>,
) -> anyhow::Result<SandboxId> {
    let sb = sandboxes::insert(
        &h.services.db,
        &sandboxes::NewSandbox {
            team_id: h.team,
            template_id: None,
            template_name: "minimal".into(),
            vcpus: 1,
            memory_mb: 512,
            disk_size_mb: 5120,
            timeout_sec: 0,
            env: Default::default(),
            metadata: Default::default(),
            created_by: "test".into(),
            lifetime_sec: None,
            on_expiry: nestbox_types::Expiry::Destroy,
            egress: Default::default(),
            public_traffic: false,
            auto_resume: false,
        },
    )
    .await?;
    if let Some(host) = host {
        sandboxes::set_host(&h.services.db, sb.id, Some(host)).await?;
        sandboxes::transition(
            &h.services.db,
            sb.id,
            &[SandboxStatus::Pending],
            SandboxStatus::Starting,
            None,
        )
        .await?;
    }
    Ok(sb.id)
}

async fn creates_that_lost_their_call_are_settled(engine: Engine) -> anyhow::Result<()> {
    let h = Harness::with(
        engine,
        Options {
            create_timeout: Duration::from_secs(1),
            ..Options::default()
        },
    )
    .await?;
    // The host finished one of them, never heard of another; a third never got a host.
    let finished = abandoned_create(&h, Some(h.host_id)).await?;
    h.agent.adopt(finished, h.team, "minimal");
    let unknown = abandoned_create(&h, Some(h.host_id)).await?;
    let hostless = abandoned_create(&h, None).await?;
    tokio::time::sleep(Duration::from_millis(2100)).await;
    // A create younger than the deadline still belongs to its call.
    let young = abandoned_create(&h, Some(h.host_id)).await?;
    h.monitor_pass().await?;

    let got = h.key.get_sandbox(finished).await?;
    assert_eq!(got.status, SandboxStatus::Running, "{got:?}");
    for id in [unknown, hostless] {
        let got = h.key.get_sandbox(id).await?;
        assert_eq!(got.status, SandboxStatus::Error, "{got:?}");
        let reason = got.error.unwrap_or_default();
        assert!(reason.contains("interrupted"), "says why: {reason}");
    }
    assert_eq!(
        h.key.get_sandbox(young).await?.status,
        SandboxStatus::Starting
    );
    let log = h.admin.client.audit_logs(&PageQuery::default()).await?;
    let audited = log
        .items
        .iter()
        .filter(|a| a.action == "sandbox.create_interrupted")
        .count();
    assert_eq!(audited, 2, "each settled failure is audited");
    // Nothing else is touched on the host.
    assert!(h.agent.sandbox(finished).is_some());
    assert_eq!(h.agent.calls(SimOp::Destroy), 0);
    h.shutdown().await;
    Ok(())
}
