//! Snapshots: sandboxes that become templates, sandboxes started from them, overwriting and
//! deleting them (with the host's files), platform templates, and the admin listing.

// Tests may panic on what they expect (see clippy.toml); helpers here are not `#[test]`s.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use common::api::snapshot;
use common::{Engine, Harness, Options, api_error, arrived, both_engines, wait_until};
use nestbox_db::templates::{self, NewTemplate};
use nestbox_testkit::{SimAgent, SimAgentConfig, SimOp, SimState, TemplateCall};
use nestbox_types::api::{CreateSandboxRequest, CreateSnapshotRequest, PageQuery, Template};
use nestbox_types::{ErrorCode, HostStatus, PLATFORM_TEAM, SandboxStatus, TemplateKind};

both_engines!(
    a_sandbox_becomes_a_template_that_sandboxes_start_from,
    an_image_template_keeps_only_the_disk,
    snapshot_requests_are_validated,
    overwrite_deletes_the_old_files_before_the_record_changes,
    a_failed_overwrite_keeps_the_old_template,
    templates_in_use_are_neither_deleted_nor_overwritten,
    a_delete_the_host_refuses_keeps_the_record,
    a_template_deleted_while_its_host_is_away_leaves_it_when_it_returns,
    only_platform_admins_delete_platform_templates,
    platform_templates_reach_every_platform_host_and_leave_them_all,
    platform_admins_list_every_teams_templates,
    snapshot_sandboxes_start_on_their_templates_host,
);

fn from(template: &str) -> CreateSandboxRequest {
    CreateSandboxRequest {
        template: Some(template.into()),
        ..Default::default()
    }
}

fn overwrite(req: CreateSnapshotRequest) -> CreateSnapshotRequest {
    CreateSnapshotRequest {
        overwrite: true,
        ..req
    }
}

fn names(list: &[Template]) -> Vec<&str> {
    list.iter().map(|t| t.name.as_str()).collect()
}

/// The template named `name` the first-run team sees.
async fn visible(h: &Harness, name: &str) -> anyhow::Result<Option<Template>> {
    let list = h.key_api().snapshots(None).await?.items;
    Ok(list.into_iter().find(|t| t.name == name))
}

/// Makes a team's template a platform template, as a platform admin publishing it would.
async fn publish(h: &Harness, t: &Template) -> anyhow::Result<()> {
    let row = templates::get(&h.services.db, t.id).await?;
    templates::replace(
        &h.services.db,
        row.id,
        row.id,
        &NewTemplate {
            team_id: PLATFORM_TEAM,
            name: row.name,
            kind: row.kind,
            vcpus: row.vcpus,
            memory_mb: row.memory_mb,
            disk_size_mb: row.disk_size_mb,
            size_bytes: row.size_bytes,
            host_id: row.host_id,
            created_by: row.created_by,
            source_sandbox_id: row.source_sandbox_id,
            ephemeral: row.ephemeral,
        },
    )
    .await?;
    Ok(())
}

async fn a_sandbox_becomes_a_template_that_sandboxes_start_from(
    engine: Engine,
) -> anyhow::Result<()> {
    let h = Harness::start(engine).await?;
    let api = h.key_api();
    let sb = h.sandbox().await?;
    assert!(h.agent.put_file(sb.id, "/srv/model.bin", b"weights"));

    let t = api.snapshot(&snapshot(sb.id, "warm")).await?;
    assert_eq!(
        (t.name.as_str(), t.kind, t.team_id, t.platform),
        ("warm", TemplateKind::Snapshot, h.team, false)
    );
    assert_eq!(
        t.host_id,
        Some(h.host_id),
        "its files are on the sandbox's host"
    );
    assert_eq!(
        (t.vcpus, t.memory_mb, t.disk_size_mb),
        (sb.vcpus, sb.memory_mb, sb.disk_size_mb)
    );
    let stored = h.agent.template(t.id).expect("the host stores its files");
    assert_eq!(
        stored.kind,
        nestbox_proto::hostagent::TemplateKind::Snapshot
    );
    assert_eq!(
        t.size_bytes, stored.size_bytes,
        "the size the host reported"
    );
    assert_eq!(
        h.key.get_sandbox(sb.id).await?.status,
        SandboxStatus::Running
    );
    assert_eq!(
        h.agent.sandbox(sb.id).map(|s| s.state),
        Some(SimState::Running),
        "the sandbox keeps running"
    );

    // Listed with the platform's templates, and filtered by kind.
    assert_eq!(
        names(&api.snapshots(None).await?.items),
        ["minimal", "warm"]
    );
    assert_eq!(
        names(&api.snapshots(Some(TemplateKind::Snapshot)).await?.items),
        ["warm"]
    );
    assert_eq!(
        names(&api.snapshots(Some(TemplateKind::Image)).await?.items),
        ["minimal"]
    );
    assert!(h.key.list_templates().await?.contains(&t));

    // A sandbox from it resumes the captured machine, with its files.
    let clone = h.key.create_sandbox(&from("warm")).await?;
    assert_eq!(clone.status, SandboxStatus::Running);
    assert_eq!(clone.template, "warm");
    assert_eq!(
        (clone.vcpus, clone.memory_mb, clone.disk_size_mb),
        (t.vcpus, t.memory_mb, t.disk_size_mb)
    );
    let on_agent = h.agent.sandbox(clone.id).expect("the clone runs");
    assert_eq!(on_agent.request.template_id, t.id.to_string());
    assert_eq!(on_agent.started_by, "restore");
    assert_eq!(
        h.agent.file(clone.id, "/srv/model.bin").as_deref(),
        Some(&b"weights"[..])
    );

    // A paused sandbox can be captured too, and stays paused.
    h.key_api().pause(sb.id).await?;
    let later = api.snapshot(&snapshot(sb.id, "warm-2")).await?;
    assert_eq!(
        h.key.get_sandbox(sb.id).await?.status,
        SandboxStatus::Paused
    );
    assert_eq!(
        h.agent.sandbox(sb.id).map(|s| s.state),
        Some(SimState::Paused)
    );

    let log = h.admin.client.audit_logs(&PageQuery::default()).await?;
    for made in [&t, &later] {
        let entry = log
            .items
            .iter()
            .find(|a| a.resource_id.as_deref() == Some(made.id.to_string().as_str()))
            .expect("audited");
        assert_eq!(
            (entry.action.as_str(), entry.status.as_str()),
            ("template.create", "success")
        );
    }
    h.shutdown().await;
    Ok(())
}

async fn an_image_template_keeps_only_the_disk(engine: Engine) -> anyhow::Result<()> {
    let h = Harness::start(engine).await?;
    let sb = h.sandbox().await?;
    let t = h
        .key_api()
        .snapshot(&CreateSnapshotRequest {
            kind: Some(TemplateKind::Image),
            ..snapshot(sb.id, "disk-only")
        })
        .await?;
    assert_eq!(t.kind, TemplateKind::Image);
    assert_eq!(
        h.agent.template(t.id).map(|s| s.kind),
        Some(nestbox_proto::hostagent::TemplateKind::Image)
    );

    // Sandboxes boot from it, with the machine they ask for.
    let booted = h
        .key
        .create_sandbox(&CreateSandboxRequest {
            vcpus: Some(2),
            memory_mb: Some(1024),
            ..from("disk-only")
        })
        .await?;
    assert_eq!((booted.vcpus, booted.memory_mb), (2, 1024));
    let on_agent = h.agent.sandbox(booted.id).expect("it runs");
    assert_eq!(
        (
            on_agent.request.template_id.as_str(),
            on_agent.started_by.as_str()
        ),
        (t.id.to_string().as_str(), "boot")
    );

    // The host reports the team's template among its own; it never becomes a platform
    // template.
    h.monitor_pass().await?;
    let platform: Vec<String> = h
        .key
        .list_templates()
        .await?
        .into_iter()
        .filter(|t| t.platform)
        .map(|t| t.name)
        .collect();
    assert_eq!(platform, ["minimal"]);
    h.shutdown().await;
    Ok(())
}

async fn snapshot_requests_are_validated(engine: Engine) -> anyhow::Result<()> {
    let h = Harness::start(engine).await?;
    let api = h.key_api();
    let sb = h.sandbox().await?;

    let long = "a".repeat(65);
    for bad in ["", "-x", "../etc", "a b", "ünïcode", long.as_str()] {
        let body = api_error(
            api.snapshot(&snapshot(sb.id, bad)).await,
            400,
            ErrorCode::InvalidRequest,
        );
        assert!(body.error.message.contains("name"), "{body:?}");
    }
    api_error(
        api.delete_snapshot("-x").await,
        400,
        ErrorCode::InvalidRequest,
    );
    let (http, url) = h.raw("/v1/snapshots");
    let unknown_kind = http
        .post(url)
        .header("x-api-key", &h.api_key)
        .json(&serde_json::json!({ "sandbox_id": sb.id, "name": "x", "kind": "vm" }))
        .send()
        .await?;
    common::raw_error(unknown_kind, 400, ErrorCode::InvalidRequest).await?;

    api_error(
        api.snapshot(&snapshot(nestbox_types::SandboxId::new(), "x"))
            .await,
        404,
        ErrorCode::SandboxNotFound,
    );
    let other = h.user("other").await?;
    api_error(
        other.api().snapshot(&snapshot(sb.id, "mine-now")).await,
        404,
        ErrorCode::SandboxNotFound,
    );
    // A platform template's name is reserved, overwrite or not.
    for req in [
        snapshot(sb.id, "minimal"),
        overwrite(snapshot(sb.id, "minimal")),
    ] {
        let body = api_error(api.snapshot(&req).await, 409, ErrorCode::AlreadyExists);
        assert!(body.error.message.contains("platform"), "{body:?}");
    }
    assert_eq!(
        h.agent.calls(SimOp::CreateTemplate),
        0,
        "the host was never asked"
    );

    api.snapshot(&snapshot(sb.id, "taken")).await?;
    let body = api_error(
        api.snapshot(&snapshot(sb.id, "taken")).await,
        409,
        ErrorCode::AlreadyExists,
    );
    assert!(body.error.message.contains("overwrite"), "{body:?}");
    // Another team may use the name.
    let theirs = other
        .client
        .create_sandbox(&CreateSandboxRequest::default())
        .await?;
    other.api().snapshot(&snapshot(theirs.id, "taken")).await?;

    h.key.destroy_sandbox(sb.id).await?;
    api_error(
        api.snapshot(&snapshot(sb.id, "too-late")).await,
        409,
        ErrorCode::Conflict,
    );
    api_error(
        api.delete_snapshot("never-made").await,
        404,
        ErrorCode::TemplateNotFound,
    );
    assert_eq!(h.agent.calls(SimOp::CreateTemplate), 2);
    h.shutdown().await;
    Ok(())
}

async fn overwrite_deletes_the_old_files_before_the_record_changes(
    engine: Engine,
) -> anyhow::Result<()> {
    let h = Harness::start(engine).await?;
    let sb = h.sandbox().await?;
    assert!(h.agent.put_file(sb.id, "/app/version", b"1"));
    let old = h.key_api().snapshot(&snapshot(sb.id, "app")).await?;
    assert!(h.agent.put_file(sb.id, "/app/version", b"2"));

    let held = h.agent.hold(SimOp::DeleteTemplate);
    let api = h.key_api();
    let id = sb.id;
    let replacing =
        tokio::spawn(async move { api.snapshot(&overwrite(snapshot(id, "app"))).await });
    arrived(&held).await?;
    // The new files exist, the old ones are being deleted, and the record is still the old
    // one.
    assert_eq!(h.agent.template_ids().len(), 2);
    assert_eq!(visible(&h, "app").await?.map(|t| t.id), Some(old.id));
    held.release();
    let new = replacing.await??;

    assert_ne!(new.id, old.id);
    assert_eq!(visible(&h, "app").await?, Some(new.clone()));
    assert_eq!(
        h.agent.template_log(),
        [
            TemplateCall::Create {
                template_id: old.id.to_string(),
                sandbox_id: sb.id.to_string()
            },
            TemplateCall::Create {
                template_id: new.id.to_string(),
                sandbox_id: sb.id.to_string()
            },
            TemplateCall::Delete {
                template_id: old.id.to_string()
            },
        ]
    );
    assert_eq!(
        h.agent.template_ids(),
        [new.id.to_string()],
        "no old generation is left on the host"
    );
    let all = h.admin.api().admin_templates().await?.items;
    assert_eq!(all.iter().filter(|t| t.name == "app").count(), 1);

    let clone = h.key.create_sandbox(&from("app")).await?;
    assert_eq!(
        h.agent.file(clone.id, "/app/version").as_deref(),
        Some(&b"2"[..])
    );
    h.shutdown().await;
    Ok(())
}

async fn a_failed_overwrite_keeps_the_old_template(engine: Engine) -> anyhow::Result<()> {
    let h = Harness::start(engine).await?;
    let api = h.key_api();
    let sb = h.sandbox().await?;
    let old = api.snapshot(&snapshot(sb.id, "app")).await?;

    // The old files cannot be deleted: the new ones go, the old template stays.
    h.agent.fail_next(
        SimOp::DeleteTemplate,
        ErrorCode::Internal,
        "device or resource busy",
    );
    api_error(
        api.snapshot(&overwrite(snapshot(sb.id, "app"))).await,
        502,
        ErrorCode::AgentError,
    );
    assert_eq!(visible(&h, "app").await?, Some(old.clone()));
    assert_eq!(h.agent.template_ids(), [old.id.to_string()]);
    let log = h.agent.template_log();
    let TemplateCall::Create {
        template_id: attempted,
        ..
    } = &log[1]
    else {
        panic!("the new files came first: {log:?}");
    };
    assert_eq!(
        log[2..],
        [
            TemplateCall::Delete {
                template_id: old.id.to_string()
            },
            TemplateCall::Delete {
                template_id: attempted.clone()
            },
        ]
    );

    // The host cannot write the new files: nothing changes.
    h.agent.fail_next(
        SimOp::CreateTemplate,
        ErrorCode::InsufficientStorage,
        "no space for the memory file",
    );
    api_error(
        api.snapshot(&overwrite(snapshot(sb.id, "app"))).await,
        507,
        ErrorCode::InsufficientStorage,
    );
    assert_eq!(visible(&h, "app").await?, Some(old.clone()));
    assert_eq!(h.agent.template_ids(), [old.id.to_string()]);

    let audit = h.admin.client.audit_logs(&PageQuery::default()).await?;
    let failed = audit
        .items
        .iter()
        .filter(|a| a.action == "template.create" && a.status == "failure")
        .count();
    assert_eq!(failed, 2);

    // And then it works.
    let new = api.snapshot(&overwrite(snapshot(sb.id, "app"))).await?;
    assert_eq!(h.agent.template_ids(), [new.id.to_string()]);
    h.shutdown().await;
    Ok(())
}

async fn templates_in_use_are_neither_deleted_nor_overwritten(
    engine: Engine,
) -> anyhow::Result<()> {
    let h = Harness::start(engine).await?;
    let api = h.key_api();
    let sb = h.sandbox().await?;
    let t = api.snapshot(&snapshot(sb.id, "base")).await?;
    let clone = h.key.create_sandbox(&from("base")).await?;

    let body = api_error(api.delete_snapshot("base").await, 409, ErrorCode::Conflict);
    assert!(body.error.message.contains("in use"), "{body:?}");
    api_error(
        api.snapshot(&overwrite(snapshot(sb.id, "base"))).await,
        409,
        ErrorCode::Conflict,
    );
    // A paused clone still builds on its files.
    api.pause(clone.id).await?;
    api_error(api.delete_snapshot("base").await, 409, ErrorCode::Conflict);
    assert_eq!(h.agent.calls(SimOp::DeleteTemplate), 0);
    assert_eq!(h.agent.calls(SimOp::CreateTemplate), 1);

    h.key.destroy_sandbox(clone.id).await?;
    api.delete_snapshot("base").await?;
    assert!(h.agent.template(t.id).is_none(), "its files are gone");
    assert_eq!(visible(&h, "base").await?, None);
    api_error(
        h.key.create_sandbox(&from("base")).await,
        404,
        ErrorCode::TemplateNotFound,
    );
    let log = h.admin.client.audit_logs(&PageQuery::default()).await?;
    assert!(
        log.items.iter().any(|a| a.action == "template.delete"
            && a.resource_id.as_deref() == Some(t.id.to_string().as_str())),
        "the delete is audited"
    );
    h.shutdown().await;
    Ok(())
}

async fn a_delete_the_host_refuses_keeps_the_record(engine: Engine) -> anyhow::Result<()> {
    let h = Harness::start(engine).await?;
    let api = h.key_api();
    let sb = h.sandbox().await?;
    let t = api.snapshot(&snapshot(sb.id, "keep")).await?;

    h.agent
        .fail_next(SimOp::DeleteTemplate, ErrorCode::Internal, "i/o error");
    api_error(
        api.delete_snapshot("keep").await,
        502,
        ErrorCode::AgentError,
    );
    assert_eq!(visible(&h, "keep").await?, Some(t.clone()));
    assert!(h.agent.template(t.id).is_some());

    // Files the host no longer has are no reason to keep the record.
    h.agent.fail_next(
        SimOp::DeleteTemplate,
        ErrorCode::TemplateNotFound,
        "no such template",
    );
    api.delete_snapshot("keep").await?;
    assert_eq!(visible(&h, "keep").await?, None);
    h.shutdown().await;
    Ok(())
}

async fn a_template_deleted_while_its_host_is_away_leaves_it_when_it_returns(
    engine: Engine,
) -> anyhow::Result<()> {
    let h = Harness::with(
        engine,
        Options {
            // Files of templates that no longer exist are deleted once this old.
            template_timeout: std::time::Duration::from_secs(2),
            ..Options::default()
        },
    )
    .await?;
    let api = h.key_api();
    let sb = h.sandbox().await?;
    let t = api.snapshot(&snapshot(sb.id, "away")).await?;
    h.key.destroy_sandbox(sb.id).await?;
    nestbox_db::hosts::set_status(&h.services.db, h.host_id, HostStatus::Unreachable).await?;
    h.services.fleet.invalidate();
    api.delete_snapshot("away").await?;
    assert_eq!(visible(&h, "away").await?, None, "the record goes at once");
    assert!(h.agent.template(t.id).is_some(), "the host was away");
    nestbox_db::hosts::set_status(&h.services.db, h.host_id, HostStatus::Online).await?;
    h.services.fleet.invalidate();
    // (A template made moments ago may be one whose record is still being written.)
    h.monitor_pass().await?;
    assert!(
        h.agent.template(t.id).is_some(),
        "too fresh to be an orphan"
    );
    tokio::time::sleep(std::time::Duration::from_millis(2100)).await;
    h.monitor_pass().await?;
    assert!(
        h.agent.template(t.id).is_none(),
        "the returning host deletes the files"
    );
    h.shutdown().await;
    Ok(())
}

async fn only_platform_admins_delete_platform_templates(engine: Engine) -> anyhow::Result<()> {
    let h = Harness::start(engine).await?;
    let sb = h.sandbox().await?;
    let t = h.key_api().snapshot(&snapshot(sb.id, "golden")).await?;
    publish(&h, &t).await?;

    let other = h.user("other").await?;
    let seen = other.api().snapshots(None).await?.items;
    let golden = seen
        .iter()
        .find(|x| x.name == "golden")
        .expect("every team sees platform templates");
    assert!(golden.platform);

    let log_before = h.agent.template_log();
    for caller in [other.api(), h.key_api()] {
        api_error(
            caller.delete_snapshot("golden").await,
            403,
            ErrorCode::Forbidden,
        );
    }
    assert_eq!(
        h.agent.calls(SimOp::DeleteTemplate),
        0,
        "refused before the host"
    );
    assert_eq!(h.agent.template_log(), log_before);
    assert!(h.agent.template(t.id).is_some());

    // An API key of the platform team itself may not write its templates either: not
    // overwrite one, not add one every team would see.
    let platform_key = h
        .services
        .create_api_key_unchecked(PLATFORM_TEAM, "platform", None, None)
        .await?;
    let platform = nestbox_client::Client::new(&h.url)?.with_api_key(platform_key.key.clone());
    let platform_sb = platform
        .create_sandbox(&CreateSandboxRequest::default())
        .await?;
    let platform_api = common::api::Api::new(&h.url, vec![("x-api-key", platform_key.key)]);
    for name in ["golden", "brand-new"] {
        api_error(
            platform_api
                .snapshot(&CreateSnapshotRequest {
                    overwrite: true,
                    ..snapshot(platform_sb.id, name)
                })
                .await,
            403,
            ErrorCode::Forbidden,
        );
    }
    assert_eq!(
        h.agent.template_log(),
        log_before,
        "refused before the host"
    );
    // Nor tag them, or take their tags off (`default` would hide the template from every
    // team); they only read them.
    api_error(
        platform
            .assign_template_tags("golden", None, &["mine"])
            .await,
        403,
        ErrorCode::Forbidden,
    );
    api_error(
        platform.remove_template_tag("golden", "default").await,
        403,
        ErrorCode::Forbidden,
    );
    let tags = platform.template_tags("golden").await?;
    assert_eq!(
        tags.iter().map(|t| t.tag.as_str()).collect::<Vec<_>>(),
        ["default"]
    );
    assert_eq!(tags[0].template_id, t.id);

    h.admin.api().delete_snapshot("golden").await?;
    assert!(h.agent.template(t.id).is_none());
    assert!(
        other
            .api()
            .snapshots(None)
            .await?
            .items
            .iter()
            .all(|x| x.name != "golden")
    );
    h.shutdown().await;
    Ok(())
}

async fn platform_templates_reach_every_platform_host_and_leave_them_all(
    engine: Engine,
) -> anyhow::Result<()> {
    let h = Harness::start(engine).await?;
    let sb = h.sandbox().await?;
    let t = h.key_api().snapshot(&snapshot(sb.id, "golden")).await?;
    publish(&h, &t).await?;
    h.key.destroy_sandbox(sb.id).await?;
    let second = h.add_agent("sim-2", SimAgentConfig::default()).await?;
    let third = h.add_agent("sim-3", SimAgentConfig::default()).await?;
    // A BYOC team's host never gets the platform's templates by itself.
    let owner = h.user("byoc-owner").await?;
    h.admin.client.set_team_byoc(owner.team, true).await?;
    let created = owner.client.create_team_host(owner.team, "own").await?;
    let byoc = SimAgent::start(SimAgentConfig::default()).await?;
    byoc.register(&h.url, &created.registration_token).await?;
    byoc.heartbeat().await?;

    h.monitor_pass().await?;
    let every = [
        h.host_id,
        second.host_id().unwrap(),
        third.host_id().unwrap(),
    ];
    wait_until("the platform template on every platform host", || async {
        templates::holders(&h.services.db, t.id)
            .await
            .is_ok_and(|held| every.iter().all(|x| held.contains(x)))
    })
    .await?;
    for agent in [&second, &third] {
        assert!(agent.template(t.id).is_some());
    }
    assert!(byoc.template(t.id).is_none());
    assert_eq!(byoc.calls(SimOp::BeginImport), 0);
    // Another pass copies nothing again.
    h.monitor_pass().await?;
    assert_eq!(second.calls(SimOp::BeginImport), 1);

    // Deleting it deletes it everywhere.
    h.admin.api().delete_snapshot("golden").await?;
    for agent in [&h.agent, &second, &third] {
        assert!(agent.template(t.id).is_none());
    }
    byoc.shutdown().await;
    third.shutdown().await;
    second.shutdown().await;
    h.shutdown().await;
    Ok(())
}

async fn platform_admins_list_every_teams_templates(engine: Engine) -> anyhow::Result<()> {
    let h = Harness::start(engine).await?;
    let sb = h.sandbox().await?;
    let ours = h.key_api().snapshot(&snapshot(sb.id, "ours")).await?;
    let other = h.user("other").await?;
    let theirs_sb = other
        .client
        .create_sandbox(&CreateSandboxRequest::default())
        .await?;
    let theirs = other
        .api()
        .snapshot(&snapshot(theirs_sb.id, "theirs"))
        .await?;

    let all = h.admin.api().admin_templates().await?.items;
    for (name, team) in [
        ("ours", ours.team_id),
        ("theirs", theirs.team_id),
        ("minimal", PLATFORM_TEAM),
    ] {
        assert!(
            all.iter().any(|t| t.name == name && t.team_id == team),
            "{name} of {team} in {all:?}"
        );
    }
    assert_eq!(
        names(&other.api().snapshots(None).await?.items),
        ["minimal", "theirs"],
        "a team sees only its own and the platform's"
    );
    api_error(
        other.api().admin_templates().await,
        403,
        ErrorCode::Forbidden,
    );
    // An API key lacks the session this needs.
    api_error(
        h.key_api().admin_templates().await,
        401,
        ErrorCode::Unauthorized,
    );
    h.shutdown().await;
    Ok(())
}

async fn snapshot_sandboxes_start_on_their_templates_host(engine: Engine) -> anyhow::Result<()> {
    let h = Harness::with(
        engine,
        Options {
            agent: SimAgentConfig {
                max_sandboxes: 2,
                ..SimAgentConfig::default()
            },
            ..Options::default()
        },
    )
    .await?;
    let sb = h.sandbox().await?;
    let t = h.key_api().snapshot(&snapshot(sb.id, "warm")).await?;
    // A second, empty host: the scheduler would prefer it.
    let second = h.add_agent("sim-2", SimAgentConfig::default()).await?;

    // A snapshot's machine is fixed; its disk may grow.
    let refused = [
        (
            "vcpus",
            CreateSandboxRequest {
                vcpus: Some(t.vcpus + 1),
                ..from("warm")
            },
        ),
        (
            "memory_mb",
            CreateSandboxRequest {
                memory_mb: Some(t.memory_mb * 2),
                ..from("warm")
            },
        ),
        (
            "disk_size_mb",
            CreateSandboxRequest {
                disk_size_mb: Some(t.disk_size_mb - 1),
                ..from("warm")
            },
        ),
    ];
    for (field, req) in refused {
        let body = api_error(
            h.key.create_sandbox(&req).await,
            400,
            ErrorCode::InvalidRequest,
        );
        assert!(
            body.error.message.starts_with(field),
            "names `{field}`: {body:?}"
        );
    }
    let clone = h
        .key
        .create_sandbox(&CreateSandboxRequest {
            vcpus: Some(t.vcpus),
            memory_mb: Some(t.memory_mb),
            disk_size_mb: Some(t.disk_size_mb + 1024),
            ..from("warm")
        })
        .await?;
    assert_eq!(
        clone.host_id,
        Some(h.host_id),
        "started where the files are"
    );
    assert_eq!(clone.disk_size_mb, t.disk_size_mb + 1024);
    assert_eq!(
        h.agent.sandbox(clone.id).map(|s| s.request.template_id),
        Some(t.id.to_string())
    );
    assert!(second.sandbox_ids().is_empty());

    // Its host is full now: the next one starts on the other host, which gets a copy
    // of the template first (a copy cut short resumes where it stood).
    h.agent.fail_next(
        SimOp::ReadTemplateFile,
        ErrorCode::Internal,
        "connection reset",
    );
    let moved = h.key.create_sandbox(&from("warm")).await?;
    assert_eq!(
        moved.host_id,
        second.host_id(),
        "copied to where there is room"
    );
    assert_eq!(
        second.template_log(),
        vec![TemplateCall::Import {
            template_id: t.id.to_string()
        }]
    );
    assert_eq!(second.calls(SimOp::WriteTemplateFile), 2, "resumed once");
    assert_eq!(
        nestbox_db::templates::holders(&h.services.db, t.id).await?,
        vec![h.host_id, second.host_id().unwrap()]
    );
    // Both hold it now; the next goes to the one with room, with no copy.
    let begun = second.calls(SimOp::BeginImport);
    let again = h.key.create_sandbox(&from("warm")).await?;
    assert_eq!(again.host_id, second.host_id());
    assert_eq!(second.calls(SimOp::BeginImport), begun, "no second copy");

    // Its holders are down: a host that lacks it has nowhere to copy it from.
    let third = h.add_agent("sim-3", SimAgentConfig::default()).await?;
    for host in [h.host_id, second.host_id().unwrap()] {
        nestbox_db::hosts::set_status(&h.services.db, host, HostStatus::Unreachable).await?;
        h.services.fleet.invalidate();
    }
    let body = api_error(
        h.key.create_sandbox(&from("warm")).await,
        503,
        ErrorCode::HostUnavailable,
    );
    assert!(body.error.retryable);
    assert_eq!(third.calls(SimOp::Create), 0);
    third.shutdown().await;
    second.shutdown().await;
    h.shutdown().await;
    Ok(())
}
