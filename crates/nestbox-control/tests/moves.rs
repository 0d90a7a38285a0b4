//! Moving sandboxes between hosts (simulated agents speaking the real contract): an
//! operator's move of a paused or running sandbox, a drain's moves, what a move refuses,
//! and what a move that fails or races another call leaves behind.

// Tests may panic on what they expect (see clippy.toml); helpers here are not `#[test]`s.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::{Engine, Harness, Options, api_error, arrived, both_engines, wait_until};
use nestbox_db::sandboxes;
use nestbox_testkit::{SimAgent, SimAgentConfig, SimOp, SimState};
use nestbox_types::api::{CreateSandboxRequest, DrainMoves, EgressRequest, HostDrain, PageQuery};
use nestbox_types::{ErrorCode, HostId, SandboxId, SandboxStatus};

both_engines!(
    a_paused_sandbox_moves_with_its_files_and_settings,
    a_running_sandbox_moves_and_runs_again,
    a_drain_moves_what_it_is_asked_to,
    moves_go_only_where_the_sandbox_may_run,
    a_move_that_fails_leaves_the_sandbox_where_it_was,
    calls_during_a_move_are_refused_and_a_destroy_wins,
    the_monitor_gives_up_a_move_whose_control_plane_went_away,
);

/// A control plane with its first agent and a second one.
async fn two_hosts(engine: Engine) -> anyhow::Result<(Harness, SimAgent, HostId)> {
    let h = Harness::start(engine).await?;
    let second = h.add_agent("second", SimAgentConfig::default()).await?;
    let two = second.host_id().expect("registered");
    Ok((h, second, two))
}

/// A running sandbox on the first host, with a file and egress rules.
async fn on_first(h: &Harness) -> anyhow::Result<SandboxId> {
    let sb = h
        .key
        .create_sandbox(&CreateSandboxRequest {
            env: [("KEEP".to_string(), "me".to_string())].into(),
            metadata: [("role".to_string(), "mover".to_string())].into(),
            ..Default::default()
        })
        .await?;
    if sb.host_id != Some(h.host_id) {
        // Placed on the second host: move it to the first to start from there.
        h.admin.client.move_sandbox(sb.id, Some(h.host_id)).await?;
    }
    assert!(h.agent.put_file(sb.id, "/home/user/work.txt", b"state"));
    h.key
        .set_egress(
            sb.id,
            &EgressRequest {
                deny_out: vec!["203.0.113.0/24".into()],
                ..Default::default()
            },
        )
        .await?;
    Ok(sb.id)
}

/// Packages (templates of a move) left on an agent.
fn packages(agent: &SimAgent) -> Vec<String> {
    agent
        .template_ids()
        .into_iter()
        .filter(|id| agent.template(id).is_some_and(|t| t.is_move_package()))
        .collect()
}

/// The `sandbox.move` audit entries of the first-run team, newest first.
async fn move_audits(h: &Harness) -> anyhow::Result<Vec<nestbox_types::api::AuditLog>> {
    Ok(h.admin
        .client
        .audit_logs(&PageQuery::default())
        .await?
        .items
        .into_iter()
        .filter(|a| a.action == "sandbox.move")
        .collect())
}

async fn a_paused_sandbox_moves_with_its_files_and_settings(engine: Engine) -> anyhow::Result<()> {
    let (h, second, two) = two_hosts(engine).await?;
    let id = on_first(&h).await?;
    h.key.pause_sandbox(id).await?;

    let moved = h.admin.client.move_sandbox(id, None).await?;
    assert_eq!(moved.host_id, Some(two));
    assert_eq!(moved.status, SandboxStatus::Paused);
    // The old host no longer has it; the new one has it paused, with its files, its
    // environment and the egress rules in force.
    assert!(h.agent.sandbox(id).is_none());
    let there = second.sandbox(id).expect("on the second host");
    assert_eq!(there.state, SimState::Paused);
    assert_eq!(
        second.file(id, "/home/user/work.txt").as_deref(),
        Some(&b"state"[..])
    );
    assert_eq!(there.env().get("KEEP").map(String::as_str), Some("me"));
    assert_eq!(there.egress().1, vec!["203.0.113.0/24".to_string()]);
    assert!(packages(&h.agent).is_empty() && packages(&second).is_empty());

    // It resumes on its new host, and the API follows it there.
    let resumed = h.key.resume_sandbox(id).await?;
    assert_eq!(resumed.status, SandboxStatus::Running);
    assert_eq!(second.sandbox(id).unwrap().state, SimState::Running);
    let row = sandboxes::get(&h.services.db, id).await?;
    assert_eq!((row.host_id, row.moving_to), (Some(two), None));
    assert_eq!(row.metadata.get("role").map(String::as_str), Some("mover"));
    // A monitor pass leaves it alone on its new host.
    h.monitor_pass().await?;
    assert_eq!(second.sandbox(id).unwrap().state, SimState::Running);

    let audits = move_audits(&h).await?;
    let last = audits.first().expect("audited");
    assert_eq!(last.status, "success");
    assert_eq!(last.details["to"], two.to_string());
    assert_eq!(last.details["from"], h.host_id.to_string());
    second.shutdown().await;
    h.shutdown().await;
    Ok(())
}

async fn a_running_sandbox_moves_and_runs_again(engine: Engine) -> anyhow::Result<()> {
    let (h, second, two) = two_hosts(engine).await?;
    let id = on_first(&h).await?;
    let moved = h.admin.client.move_sandbox(id, Some(two)).await?;
    assert_eq!(moved.status, SandboxStatus::Running);
    assert_eq!(moved.host_id, Some(two));
    let there = second.sandbox(id).expect("on the second host");
    assert_eq!(there.state, SimState::Running);
    assert_eq!(
        second.file(id, "/home/user/work.txt").as_deref(),
        Some(&b"state"[..])
    );
    assert!(h.agent.sandbox(id).is_none());
    // Calls reach it on its new host.
    let out = h
        .key
        .exec(
            id,
            &nestbox_types::api::ExecRequest {
                command: Some("cat /home/user/work.txt".into()),
                ..Default::default()
            },
        )
        .await;
    assert!(out.is_ok(), "{out:?}");
    let audits = move_audits(&h).await?;
    assert_eq!(audits[0].details["was_running"], true);
    second.shutdown().await;
    h.shutdown().await;
    Ok(())
}

async fn a_drain_moves_what_it_is_asked_to(engine: Engine) -> anyhow::Result<()> {
    let (h, second, two) = two_hosts(engine).await?;
    let paused = on_first(&h).await?;
    h.key.pause_sandbox(paused).await?;
    let running = on_first(&h).await?;

    // A cordon only moves nothing.
    let cordon: HostDrain = h
        .admin
        .client
        .drain_host(h.host_id, true, DrainMoves::None)
        .await?;
    assert!(cordon.host.draining && cordon.moving.is_empty());
    h.admin
        .client
        .drain_host(h.host_id, false, DrainMoves::None)
        .await?;

    // The default moves the paused one and leaves the running one.
    let drain = h
        .admin
        .client
        .drain_host(h.host_id, true, DrainMoves::Paused)
        .await?;
    assert_eq!(drain.moving, vec![paused]);
    wait_until("the paused sandbox moved", || async {
        second.sandbox(paused).is_some() && h.agent.sandbox(paused).is_none()
    })
    .await?;
    wait_until("its record follows", || async {
        sandboxes::get(&h.services.db, paused)
            .await
            .is_ok_and(|s| s.host_id == Some(two))
    })
    .await?;
    assert_eq!(h.agent.sandbox(running).unwrap().state, SimState::Running);

    // `all` moves the running one too, which runs again on its new host.
    let drain = h
        .admin
        .client
        .drain_host(h.host_id, true, DrainMoves::All)
        .await?;
    assert_eq!(drain.moving, vec![running]);
    wait_until("the running sandbox moved and runs", || async {
        sandboxes::get(&h.services.db, running)
            .await
            .is_ok_and(|s| s.host_id == Some(two) && s.status == SandboxStatus::Running)
    })
    .await?;
    assert_eq!(second.sandbox(running).unwrap().state, SimState::Running);
    assert!(h.agent.sandbox_ids().is_empty());
    second.shutdown().await;
    h.shutdown().await;
    Ok(())
}

async fn moves_go_only_where_the_sandbox_may_run(engine: Engine) -> anyhow::Result<()> {
    let h = Harness::start(engine).await?;
    let sb = h.sandbox().await?;
    // One host: nowhere to go.
    api_error(
        h.admin.client.move_sandbox(sb.id, None).await,
        503,
        ErrorCode::NoCapacity,
    );
    // Not to where it is.
    api_error(
        h.admin.client.move_sandbox(sb.id, Some(h.host_id)).await,
        400,
        ErrorCode::InvalidRequest,
    );
    // Not to another team's own host (BYOC).
    let other = h.admin.client.create_team("byoc").await?;
    h.admin.client.set_team_byoc(other.id, true).await?;
    let created = h.admin.client.create_byoc_host(other.id, "theirs").await?;
    let theirs = SimAgent::start(SimAgentConfig::default()).await?;
    theirs.register(&h.url, &created.registration_token).await?;
    theirs.heartbeat().await?;
    api_error(
        h.admin
            .client
            .move_sandbox(sb.id, Some(created.host.id))
            .await,
        400,
        ErrorCode::InvalidRequest,
    );
    // Not to a draining host.
    let spare = h.add_agent("spare", SimAgentConfig::default()).await?;
    let spare_id = spare.host_id().unwrap();
    h.admin
        .client
        .drain_host(spare_id, true, DrainMoves::None)
        .await?;
    api_error(
        h.admin.client.move_sandbox(sb.id, Some(spare_id)).await,
        400,
        ErrorCode::InvalidRequest,
    );
    // Unknown sandboxes, and API keys (a platform admin's session only).
    api_error(
        h.admin.client.move_sandbox(SandboxId::new(), None).await,
        404,
        ErrorCode::SandboxNotFound,
    );
    api_error(
        h.key.move_sandbox(sb.id, None).await,
        401,
        ErrorCode::Unauthorized,
    );
    // Nothing moved, nothing marked.
    let row = sandboxes::get(&h.services.db, sb.id).await?;
    assert_eq!((row.host_id, row.moving_to), (Some(h.host_id), None));
    assert_eq!(row.status, SandboxStatus::Running);
    assert!(theirs.sandbox_ids().is_empty() && spare.sandbox_ids().is_empty());
    theirs.shutdown().await;
    spare.shutdown().await;
    h.shutdown().await;
    Ok(())
}

async fn a_move_that_fails_leaves_the_sandbox_where_it_was(engine: Engine) -> anyhow::Result<()> {
    let (h, second, _two) = two_hosts(engine).await?;
    for (agent, op) in [
        (&h.agent, SimOp::ExportSandbox),
        (&second, SimOp::BeginImport),
        (&second, SimOp::AdoptSandbox),
    ] {
        let id = on_first(&h).await?;
        agent.fail_next(op, ErrorCode::Internal, "injected");
        if op == SimOp::BeginImport {
            // A copy is tried again: every attempt fails.
            for _ in 1..3 {
                agent.fail_next(op, ErrorCode::Internal, "injected");
            }
        }
        let err = h.admin.client.move_sandbox(id, None).await;
        assert!(err.is_err(), "{op:?}: {err:?}");
        // Where it was, running again (it was running), unmarked, with its state; nothing
        // on the other host, no package anywhere.
        let row = sandboxes::get(&h.services.db, id).await?;
        assert_eq!(
            (row.host_id, row.moving_to, row.status),
            (Some(h.host_id), None, SandboxStatus::Running),
            "{op:?}"
        );
        assert_eq!(h.agent.sandbox(id).unwrap().state, SimState::Running);
        assert!(second.sandbox(id).is_none(), "{op:?}");
        assert!(
            packages(&h.agent).is_empty() && packages(&second).is_empty(),
            "{op:?}"
        );
        let audits = move_audits(&h).await?;
        assert_eq!(audits[0].status, "failure", "{op:?}");
        // And it moves once nothing fails.
        h.admin.client.move_sandbox(id, None).await?;
        assert!(second.sandbox(id).is_some());
    }
    second.shutdown().await;
    h.shutdown().await;
    Ok(())
}

async fn calls_during_a_move_are_refused_and_a_destroy_wins(engine: Engine) -> anyhow::Result<()> {
    let (h, second, _two) = two_hosts(engine).await?;
    let id = on_first(&h).await?;
    h.key.pause_sandbox(id).await?;
    let hold = second.hold(SimOp::AdoptSandbox);
    let admin = h.admin.client.clone();
    let moving = tokio::spawn(async move { admin.move_sandbox(id, None).await });
    arrived(&hold).await?;
    // Marked: what would change its saved state waits for the move.
    api_error(h.key.resume_sandbox(id).await, 409, ErrorCode::Conflict);
    api_error(
        h.key.set_egress(id, &EgressRequest::default()).await,
        409,
        ErrorCode::Conflict,
    );
    // A monitor pass leaves both copies alone.
    h.monitor_pass().await?;
    assert!(h.agent.sandbox(id).is_some());
    // A destroy wins: the move finds it stopped and removes its copy.
    h.key.destroy_sandbox(id).await?;
    hold.release();
    let outcome = moving.await?;
    api_error(outcome, 409, ErrorCode::Conflict);
    let row = sandboxes::get(&h.services.db, id).await?;
    assert_eq!(row.status, SandboxStatus::Stopped);
    assert_eq!(row.moving_to, None);
    assert!(h.agent.sandbox(id).is_none() && second.sandbox(id).is_none());
    assert!(packages(&h.agent).is_empty() && packages(&second).is_empty());
    second.shutdown().await;
    h.shutdown().await;
    Ok(())
}

async fn the_monitor_gives_up_a_move_whose_control_plane_went_away(
    engine: Engine,
) -> anyhow::Result<()> {
    // A move's deadline is five template deadlines: 5 s here.
    let h = Harness::with(
        engine,
        Options {
            template_timeout: Duration::from_secs(1),
            ..Options::default()
        },
    )
    .await?;
    let second = h.add_agent("second", SimAgentConfig::default()).await?;
    let two = second.host_id().unwrap();
    let id = on_first(&h).await?;
    h.key.pause_sandbox(id).await?;
    // A move whose control plane went away right after it began.
    let move_id = nestbox_types::TemplateId::new();
    assert!(sandboxes::begin_move(&h.services.db, id, h.host_id, two, move_id).await?);
    assert!(
        !sandboxes::begin_move(
            &h.services.db,
            id,
            h.host_id,
            two,
            nestbox_types::TemplateId::new()
        )
        .await?
    );
    // Another move's mark is not this one's to finish.
    assert!(
        !sandboxes::finish_move(
            &h.services.db,
            id,
            h.host_id,
            two,
            nestbox_types::TemplateId::new()
        )
        .await?
    );
    h.monitor_pass().await?;
    let row = sandboxes::get(&h.services.db, id).await?;
    if row
        .moving_since
        .is_some_and(|t| chrono::Utc::now() - t < chrono::Duration::seconds(4))
    {
        assert_eq!(
            row.moving_to,
            Some(two),
            "a move within its deadline is left alone"
        );
    }
    wait_until("the monitor gives the move up", || async {
        let _ = h.monitor_pass().await;
        sandboxes::get(&h.services.db, id)
            .await
            .is_ok_and(|s| s.moving_to.is_none())
    })
    .await?;
    let row = sandboxes::get(&h.services.db, id).await?;
    assert_eq!(
        (row.host_id, row.status),
        (Some(h.host_id), SandboxStatus::Paused)
    );
    // It resumes where it is.
    h.key.resume_sandbox(id).await?;
    assert_eq!(h.agent.sandbox(id).unwrap().state, SimState::Running);
    assert!(second.sandbox(id).is_none());
    second.shutdown().await;
    h.shutdown().await;
    Ok(())
}
