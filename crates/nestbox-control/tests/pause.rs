//! Pausing and resuming sandboxes, and keeping them alive: the happy path, refusals, the
//! state while a pause is in flight, agent failures and clients that go away.

// Tests may panic on what they expect (see clippy.toml); helpers here are not `#[test]`s.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use common::{Engine, Harness, WAIT, api_error, arrived, both_engines};
use nestbox_testkit::{SimOp, SimState, wait_for};
use nestbox_types::api::{AuditLog, ExecRequest, PageQuery};
use nestbox_types::{ErrorCode, HostStatus, SandboxId, SandboxStatus};

both_engines!(
    pause_and_resume_keep_the_sandbox,
    pausing_or_resuming_in_the_wrong_state_is_refused,
    a_sandbox_is_paused_while_its_pause_is_in_flight,
    a_client_that_goes_away_mid_pause_leaves_it_paused,
    a_failed_pause_leaves_it_running,
    a_failed_resume_leaves_it_paused,
    pausing_what_its_host_already_paused_succeeds,
    ping_keeps_a_running_sandbox_alive,
    paused_sandboxes_can_be_destroyed,
);

fn echo() -> ExecRequest {
    ExecRequest {
        argv: Some(vec!["echo".into(), "hi".into()]),
        ..Default::default()
    }
}

/// The team's audit entries about `id`, newest first.
async fn audit_of(h: &Harness, id: SandboxId) -> anyhow::Result<Vec<AuditLog>> {
    let log = h.admin.client.audit_logs(&PageQuery::default()).await?;
    Ok(log
        .items
        .into_iter()
        .filter(|a| a.resource_id.as_deref() == Some(id.to_string().as_str()))
        .collect())
}

async fn status(h: &Harness, id: SandboxId) -> anyhow::Result<SandboxStatus> {
    Ok(h.key.get_sandbox(id).await?.status)
}

fn agent_state(h: &Harness, id: SandboxId) -> Option<SimState> {
    h.agent.sandbox(id).map(|s| s.state)
}

async fn pause_and_resume_keep_the_sandbox(engine: Engine) -> anyhow::Result<()> {
    let h = Harness::start(engine).await?;
    let api = h.key_api();
    let sb = h.sandbox().await?;
    assert!(h.agent.put_file(sb.id, "/work/notes.txt", b"kept"));

    let paused = api.pause(sb.id).await?;
    assert_eq!(paused.status, SandboxStatus::Paused);
    assert_eq!(agent_state(&h, sb.id), Some(SimState::Paused));
    assert_eq!(status(&h, sb.id).await?, SandboxStatus::Paused);
    // Nothing runs in a paused sandbox.
    api_error(
        h.key.exec(sb.id, &echo()).await,
        409,
        ErrorCode::SandboxNotRunning,
    );

    let resumed = api.resume(sb.id).await?;
    assert_eq!(resumed.status, SandboxStatus::Running);
    assert_eq!(
        resumed.started_at, sb.started_at,
        "resuming is not a new start"
    );
    let on_agent = h.agent.sandbox(sb.id).expect("still on its host");
    assert_eq!(
        (on_agent.state, on_agent.started_by.as_str()),
        (SimState::Running, "resume")
    );
    assert_eq!(h.key.exec(sb.id, &echo()).await?.stdout, "echo hi\n");
    assert_eq!(
        h.agent.file(sb.id, "/work/notes.txt").as_deref(),
        Some(&b"kept"[..])
    );

    let actions: Vec<String> = audit_of(&h, sb.id)
        .await?
        .into_iter()
        .map(|a| format!("{} {}", a.action, a.status))
        .collect();
    assert_eq!(
        actions,
        [
            "sandbox.resume success",
            "sandbox.pause success",
            "sandbox.create success"
        ]
    );
    h.shutdown().await;
    Ok(())
}

async fn pausing_or_resuming_in_the_wrong_state_is_refused(engine: Engine) -> anyhow::Result<()> {
    let h = Harness::start(engine).await?;
    let api = h.key_api();
    let sb = h.sandbox().await?;

    api_error(api.resume(sb.id).await, 409, ErrorCode::Conflict);
    api.pause(sb.id).await?;
    let pauses = h.agent.calls(SimOp::PauseSandbox);
    api_error(api.pause(sb.id).await, 409, ErrorCode::SandboxNotRunning);
    assert_eq!(
        h.agent.calls(SimOp::PauseSandbox),
        pauses,
        "refused without asking the host"
    );

    h.key.destroy_sandbox(sb.id).await?;
    api_error(api.pause(sb.id).await, 409, ErrorCode::SandboxNotRunning);
    api_error(api.resume(sb.id).await, 409, ErrorCode::Conflict);
    api_error(
        api.pause(SandboxId::new()).await,
        404,
        ErrorCode::SandboxNotFound,
    );

    // Another team's sandbox does not exist for the caller.
    let other = h.user("other").await?;
    let theirs = h.sandbox().await?;
    api_error(
        other.api().pause(theirs.id).await,
        404,
        ErrorCode::SandboxNotFound,
    );
    api_error(
        other.api().resume(theirs.id).await,
        404,
        ErrorCode::SandboxNotFound,
    );

    // A host that cannot be reached is not asked, and the sandbox keeps its status.
    nestbox_db::hosts::set_status(&h.services.db, h.host_id, HostStatus::Unreachable).await?;
    h.services.fleet.invalidate();
    api_error(api.pause(theirs.id).await, 503, ErrorCode::HostUnavailable);
    assert_eq!(status(&h, theirs.id).await?, SandboxStatus::Running);
    h.shutdown().await;
    Ok(())
}

async fn a_sandbox_is_paused_while_its_pause_is_in_flight(engine: Engine) -> anyhow::Result<()> {
    let h = Harness::start(engine).await?;
    let sb = h.sandbox().await?;
    let held = h.agent.hold(SimOp::PauseSandbox);
    let api = h.key_api();
    let pause = tokio::spawn(async move { api.pause(sb.id).await });
    arrived(&held).await?;

    // The VM is being saved: the database already says paused, and a monitor pass that
    // sees the VM still running on the agent leaves it so.
    assert_eq!(status(&h, sb.id).await?, SandboxStatus::Paused);
    assert_eq!(agent_state(&h, sb.id), Some(SimState::Running));
    h.monitor_pass().await?;
    assert_eq!(status(&h, sb.id).await?, SandboxStatus::Paused);

    held.release();
    let paused = pause.await??;
    assert_eq!(paused.status, SandboxStatus::Paused);
    assert_eq!(agent_state(&h, sb.id), Some(SimState::Paused));
    h.shutdown().await;
    Ok(())
}

async fn a_client_that_goes_away_mid_pause_leaves_it_paused(engine: Engine) -> anyhow::Result<()> {
    let h = Harness::start(engine).await?;
    let sb = h.sandbox().await?;
    let held = h.agent.hold(SimOp::PauseSandbox);
    let api = h.key_api();
    let pause = tokio::spawn(async move { api.pause(sb.id).await });
    arrived(&held).await?;
    pause.abort();
    assert!(pause.await.is_err(), "the client gave up");
    held.release();

    // The pause runs to its end and is recorded.
    wait_for(WAIT, || async {
        let log = audit_of(&h, sb.id).await?;
        anyhow::ensure!(
            log.iter().any(|a| a.action == "sandbox.pause"),
            "not audited yet"
        );
        Ok(())
    })
    .await?;
    assert_eq!(status(&h, sb.id).await?, SandboxStatus::Paused);
    assert_eq!(agent_state(&h, sb.id), Some(SimState::Paused));
    h.key_api().resume(sb.id).await?;
    h.shutdown().await;
    Ok(())
}

async fn a_failed_pause_leaves_it_running(engine: Engine) -> anyhow::Result<()> {
    let h = Harness::start(engine).await?;
    let api = h.key_api();
    let sb = h.sandbox().await?;
    h.agent.fail_next(
        SimOp::PauseSandbox,
        ErrorCode::Internal,
        "cannot save device state",
    );
    let body = api_error(api.pause(sb.id).await, 502, ErrorCode::AgentError);
    assert!(!body.error.message.contains("device state"), "{body:?}");
    assert_eq!(status(&h, sb.id).await?, SandboxStatus::Running);
    assert_eq!(agent_state(&h, sb.id), Some(SimState::Running));
    assert_eq!(h.key.exec(sb.id, &echo()).await?.exit_code, 0);

    h.agent.fail_next(
        SimOp::PauseSandbox,
        ErrorCode::InsufficientStorage,
        "no room for the memory file",
    );
    api_error(api.pause(sb.id).await, 507, ErrorCode::InsufficientStorage);
    assert_eq!(status(&h, sb.id).await?, SandboxStatus::Running);

    let log = audit_of(&h, sb.id).await?;
    let failed = log
        .iter()
        .filter(|a| a.action == "sandbox.pause" && a.status == "failure")
        .count();
    assert_eq!(failed, 2, "failed pauses are audited: {log:?}");
    // It pauses fine afterwards.
    api.pause(sb.id).await?;
    h.shutdown().await;
    Ok(())
}

async fn a_failed_resume_leaves_it_paused(engine: Engine) -> anyhow::Result<()> {
    let h = Harness::start(engine).await?;
    let api = h.key_api();
    let sb = h.sandbox().await?;
    api.pause(sb.id).await?;
    h.agent.fail_next(
        SimOp::ResumeSandbox,
        ErrorCode::NoCapacity,
        "no memory for the VM",
    );
    let body = api_error(api.resume(sb.id).await, 503, ErrorCode::NoCapacity);
    assert!(body.error.retryable);
    assert_eq!(status(&h, sb.id).await?, SandboxStatus::Paused);
    assert_eq!(agent_state(&h, sb.id), Some(SimState::Paused));

    let resumed = api.resume(sb.id).await?;
    assert_eq!(resumed.status, SandboxStatus::Running);
    h.shutdown().await;
    Ok(())
}

async fn pausing_what_its_host_already_paused_succeeds(engine: Engine) -> anyhow::Result<()> {
    let h = Harness::start(engine).await?;
    let api = h.key_api();
    let sb = h.sandbox().await?;
    // The agent's inactivity timer got there first; the monitor has not seen it yet.
    assert!(h.agent.auto_pause(sb.id));
    let paused = api.pause(sb.id).await?;
    assert_eq!(paused.status, SandboxStatus::Paused);
    assert_eq!(agent_state(&h, sb.id), Some(SimState::Paused));

    // Symmetrically, a sandbox its host resumed already is simply running.
    assert!(h.agent.resume_unasked(sb.id));
    let resumed = api.resume(sb.id).await?;
    assert_eq!(resumed.status, SandboxStatus::Running);
    h.shutdown().await;
    Ok(())
}

async fn ping_keeps_a_running_sandbox_alive(engine: Engine) -> anyhow::Result<()> {
    let h = Harness::start(engine).await?;
    let api = h.key_api();
    let sb = h.sandbox().await?;
    let before = nestbox_db::sandboxes::get(&h.services.db, sb.id)
        .await?
        .last_active_at
        .expect("a started sandbox has been active");

    api.ping(sb.id).await?;
    assert_eq!(h.agent.calls(SimOp::PingSandbox), 1);
    let after = nestbox_db::sandboxes::get(&h.services.db, sb.id)
        .await?
        .last_active_at
        .expect("still active");
    assert!(after >= before);

    api.pause(sb.id).await?;
    api_error(api.ping(sb.id).await, 409, ErrorCode::SandboxNotRunning);
    assert_eq!(
        h.agent.calls(SimOp::PingSandbox),
        1,
        "a paused sandbox is not pinged"
    );
    api_error(
        api.ping(SandboxId::new()).await,
        404,
        ErrorCode::SandboxNotFound,
    );
    h.shutdown().await;
    Ok(())
}

async fn paused_sandboxes_can_be_destroyed(engine: Engine) -> anyhow::Result<()> {
    let h = Harness::start(engine).await?;
    let sb = h.sandbox().await?;
    h.key_api().pause(sb.id).await?;
    h.key.destroy_sandbox(sb.id).await?;
    assert_eq!(status(&h, sb.id).await?, SandboxStatus::Stopped);
    assert!(
        h.agent.sandbox(sb.id).is_none(),
        "its saved state is gone from the host"
    );
    h.shutdown().await;
    Ok(())
}
