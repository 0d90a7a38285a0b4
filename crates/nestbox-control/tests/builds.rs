//! Template builds against the simulated host agent (whose commands echo their argv on
//! stdout and their environment on stderr, and exit with `SIM_EXIT_CODE`): steps, logs,
//! the environment a template gives its sandboxes, the step cache, failures, cancel, the
//! runner's keep-alive and the monitor's sweep, what is refused up front, and archives.
//! Real VMs run the same recipes in `nestbox-cli`'s `e2e_builds`.

// Tests may panic on what they expect (see clippy.toml); helpers here are not `#[test]`s.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;

use common::{Engine, Harness, api_error, both_engines, wait_until};
use nestbox_client::Client;
use nestbox_types::api::{
    Build, BuildStep, CreateBuildRequest, CreateSandboxRequest, ExecRequest, Recipe, RegistryAuth,
    SandboxListQuery, StartCommand,
};
use nestbox_types::{BuildStatus, ErrorCode, SandboxStatus};
use sha2::Digest;

both_engines!(
    a_build_runs_its_steps_and_makes_a_template,
    a_rebuild_starts_after_the_last_unchanged_step,
    a_failing_step_fails_the_build_and_leaves_nothing,
    what_would_fail_at_the_end_is_refused_at_the_start,
    builds_and_archives_are_the_teams_own,
    a_build_whose_runner_stopped_is_failed_by_the_monitor,
    a_build_from_an_image_starts_with_its_configuration_and_caches_it,
    tags_name_builds_and_a_rebuild_leaves_running_sandboxes_theirs,
);

fn run(command: &str) -> BuildStep {
    BuildStep::Run {
        command: command.into(),
        user: None,
        cwd: None,
    }
}

fn env(pairs: &[(&str, &str)]) -> BuildStep {
    BuildStep::Env {
        vars: pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    }
}

fn request(name: &str, steps: Vec<BuildStep>) -> CreateBuildRequest {
    CreateBuildRequest {
        name: name.into(),
        recipe: Recipe {
            steps,
            ..Default::default()
        },
        timeout_sec: None,
        no_cache: false,
        registry_auth: None,
        tags: Vec::new(),
    }
}

async fn ended(client: &Client, build: &Build) -> Build {
    wait_until("the build to end", || async {
        client.get_build(build.id).await.unwrap().status.is_final()
    })
    .await
    .unwrap();
    client.get_build(build.id).await.unwrap()
}

async fn log_text(client: &Client, build: &Build) -> Vec<(u32, String, String)> {
    let mut out = Vec::new();
    let mut offset = 0;
    loop {
        let page = client.build_logs(build.id, offset).await.unwrap();
        let caught_up = page.items.is_empty();
        out.extend(page.items.into_iter().map(|l| (l.step, l.stream, l.text)));
        offset = page.next;
        if page.done || caught_up {
            return out;
        }
    }
}

/// Build sandboxes that still hold a host.
async fn live_build_sandboxes(client: &Client) -> usize {
    let page = client
        .list_sandboxes(&SandboxListQuery::default())
        .await
        .unwrap();
    page.items
        .iter()
        .filter(|s| s.metadata.contains_key("nestbox.build"))
        .filter(|s| s.status != SandboxStatus::Stopped)
        .count()
}

async fn a_build_runs_its_steps_and_makes_a_template(engine: Engine) -> anyhow::Result<()> {
    let h = Harness::start(engine).await?;
    let mut req = request(
        "built",
        vec![
            run("echo one"),
            env(&[("GREETING", "hello")]),
            BuildStep::Workdir {
                path: "/srv/app".into(),
            },
            BuildStep::User {
                name: "user".into(),
            },
            run("echo two"),
        ],
    );
    req.recipe.start = Some(StartCommand {
        command: "serve".into(),
        ready: Some("check".into()),
        ready_timeout_sec: None,
    });
    let accepted = h.key.create_build(&req).await?;
    assert_eq!(accepted.status, BuildStatus::Building);
    assert_eq!(accepted.steps.len(), 6, "five steps and the start command");
    let b = ended(&h.key, &accepted).await;
    assert_eq!(b.status, BuildStatus::Ready, "{:?}", b.error);
    assert!(b.steps.iter().all(|s| s.status == "done"), "{:?}", b.steps);
    assert_eq!(b.steps[0].exit_code, Some(0));
    let template = b.template_id.expect("a ready build names its template");

    // Each step's output, by step, with the environment, directory and user it ran with.
    let log = log_text(&h.key, &b).await;
    assert!(
        log.contains(&(1, "stdout".into(), "/bin/sh -c echo one sh".into())),
        "{log:?}"
    );
    assert!(
        log.contains(&(5, "stderr".into(), "GREETING=hello".into())),
        "{log:?}"
    );
    assert!(
        !log.iter()
            .any(|(step, _, t)| *step == 1 && t.contains("GREETING"))
    );
    let last = h.agent.last_exec().expect("an exec reached the agent");
    assert_eq!(
        (last.cwd.as_str(), last.user.as_str()),
        ("/srv/app", "user")
    );
    assert!(
        log.iter()
            .any(|(_, s, t)| s == "info" && t.contains("is ready"))
    );

    // The template's sandboxes get the recipe's environment, under their own.
    let templates = h.key.list_snapshots().await?;
    let t = templates.iter().find(|t| t.name == "built").unwrap();
    assert_eq!(t.id, template);
    let sb = h
        .key
        .create_sandbox(&CreateSandboxRequest {
            template: Some("built".into()),
            env: BTreeMap::from([("MINE".into(), "1".into())]),
            ..Default::default()
        })
        .await?;
    let out = h
        .key
        .exec(
            sb.id,
            &ExecRequest {
                argv: Some(vec!["env".into()]),
                ..Default::default()
            },
        )
        .await?;
    assert!(
        out.stderr.contains("GREETING=hello") && out.stderr.contains("MINE=1"),
        "{}",
        out.stderr
    );
    // ... and run commands as its last user, in its last directory, when they name none.
    let created = h.agent.last_create().expect("a create reached the agent");
    assert_eq!(
        (
            created.default_user.as_str(),
            created.default_workdir.as_str()
        ),
        ("user", "/srv/app")
    );
    // A platform template leaves the guest's own (root, its home).
    h.key
        .create_sandbox(&CreateSandboxRequest::default())
        .await?;
    let created = h.agent.last_create().unwrap();
    assert_eq!(
        (created.default_user, created.default_workdir),
        (String::new(), String::new())
    );
    assert_eq!(live_build_sandboxes(&h.key).await, 0);
    // Audited.
    let audit = h.admin.client.audit_logs(&Default::default()).await?;
    assert!(
        audit
            .items
            .iter()
            .any(|e| e.action == "template.build" && e.status == "success")
    );
    h.shutdown().await;
    Ok(())
}

async fn a_rebuild_starts_after_the_last_unchanged_step(engine: Engine) -> anyhow::Result<()> {
    let h = Harness::start(engine).await?;
    let steps = |last: &str| {
        vec![
            run("first"),
            env(&[("A", "1")]),
            run("second"),
            BuildStep::Workdir { path: "/w".into() },
            run(last),
        ]
    };
    let one = ended(
        &h.key,
        &h.key
            .create_build(&request("cached", steps("third")))
            .await?,
    )
    .await;
    assert_eq!((one.status, one.cached_steps), (BuildStatus::Ready, 0));
    let two = ended(
        &h.key,
        &h.key
            .create_build(&request("cached", steps("changed")))
            .await?,
    )
    .await;
    assert_eq!(two.status, BuildStatus::Ready, "{:?}", two.error);
    assert_eq!(two.cached_steps, 4, "{:?}", two.steps);
    let statuses: Vec<&str> = two.steps.iter().map(|s| s.status.as_str()).collect();
    assert_eq!(statuses, ["cached", "cached", "cached", "cached", "done"]);
    // The replayed state reaches the step that runs: its environment and directory.
    let last = h.agent.last_exec().unwrap();
    assert_eq!(last.cwd, "/w");
    assert_eq!(last.env.get("A").map(String::as_str), Some("1"));
    // Without the cache every step runs again.
    let mut req = request("cached", steps("changed"));
    req.no_cache = true;
    let three = ended(&h.key, &h.key.create_build(&req).await?).await;
    assert_eq!((three.status, three.cached_steps), (BuildStatus::Ready, 0));
    // Cache entries are hidden: the team sees its one template, and they count for no quota.
    let names: Vec<String> = h
        .key
        .list_snapshots()
        .await?
        .into_iter()
        .filter(|t| !t.platform)
        .map(|t| t.name)
        .collect();
    assert_eq!(names, ["cached"]);
    let quota = nestbox_db::quotas::usage(&h.services.db, h.team).await?;
    assert_eq!(quota.templates, 1);
    h.shutdown().await;
    Ok(())
}

async fn a_failing_step_fails_the_build_and_leaves_nothing(engine: Engine) -> anyhow::Result<()> {
    let h = Harness::start(engine).await?;
    let req = request(
        "broken",
        vec![
            run("fine"),
            env(&[("SIM_EXIT_CODE", "3")]),
            run("fails"),
            run("never"),
        ],
    );
    let b = ended(&h.key, &h.key.create_build(&req).await?).await;
    assert_eq!(b.status, BuildStatus::Failed);
    let error = b.error.clone().unwrap();
    assert!(
        error.contains("step 3") && error.contains("exit code 3"),
        "{error}"
    );
    let statuses: Vec<&str> = b.steps.iter().map(|s| s.status.as_str()).collect();
    assert_eq!(statuses, ["done", "done", "failed", "skipped"]);
    assert_eq!(b.steps[2].exit_code, Some(3));
    let log = log_text(&h.key, &b).await;
    assert!(
        log.iter()
            .any(|(step, s, t)| *step == 3 && s == "stdout" && t.contains("fails"))
    );
    assert!(!log.iter().any(|(_, _, t)| t.contains("never")));
    assert!(
        h.key
            .list_snapshots()
            .await?
            .iter()
            .all(|t| t.name != "broken")
    );
    assert_eq!(live_build_sandboxes(&h.key).await, 0);
    // An ended build cannot be cancelled.
    api_error(h.key.cancel_build(b.id).await, 409, ErrorCode::Conflict);
    h.shutdown().await;
    Ok(())
}

async fn what_would_fail_at_the_end_is_refused_at_the_start(engine: Engine) -> anyhow::Result<()> {
    let h = Harness::start(engine).await?;
    let refused = |req: CreateBuildRequest| {
        let key = h.key.clone();
        async move { key.create_build(&req).await }
    };
    // Invalid recipes name their step; unknown bases and archives not uploaded.
    let e = api_error(
        refused(request("x", vec![run("ok"), run(" ")])).await,
        400,
        ErrorCode::InvalidRequest,
    );
    assert!(e.error.message.contains("step 2"), "{}", e.error.message);
    let mut req = request("x", vec![]);
    req.recipe.base = Some("no-such-base".into());
    api_error(refused(req).await, 404, ErrorCode::TemplateNotFound);
    let copy = BuildStep::Copy {
        archive: "0".repeat(64),
        dest: "/x".into(),
        user: None,
        source: None,
        mode: None,
    };
    let e = api_error(
        refused(request("x", vec![copy])).await,
        400,
        ErrorCode::InvalidRequest,
    );
    assert!(e.error.message.contains("upload these archives first"));
    api_error(
        refused(request("minimal", vec![])).await,
        409,
        ErrorCode::AlreadyExists,
    );
    let too_many: Vec<(String, String)> = (0..200).map(|i| (format!("V{i}"), "x".into())).collect();
    let big_env = BuildStep::Env {
        vars: too_many.into_iter().collect(),
    };
    api_error(
        refused(request("x", vec![big_env])).await,
        400,
        ErrorCode::LimitExceeded,
    );
    for (vcpus, memory, disk, code) in [
        (Some(0), None, None, ErrorCode::InvalidRequest),
        (Some(99), None, None, ErrorCode::LimitExceeded),
        (None, Some(1), None, ErrorCode::InvalidRequest),
        (None, None, Some(1), ErrorCode::InvalidRequest),
    ] {
        let mut req = request("x", vec![]);
        req.recipe.vcpus = vcpus;
        req.recipe.memory_mb = memory;
        req.recipe.disk_size_mb = disk;
        api_error(refused(req).await, 400, code);
    }
    let mut long = request("x", vec![]);
    long.timeout_sec = Some(7201);
    api_error(refused(long).await, 400, ErrorCode::LimitExceeded);

    // A build cannot replace its own base (it can tag another build of it).
    let first = ended(
        &h.key,
        &h.key
            .create_build(&request("in-use", vec![run("a")]))
            .await?,
    )
    .await;
    assert_eq!(first.status, BuildStatus::Ready);
    let mut own_base = request("in-use", vec![run("b")]);
    own_base.recipe.base = Some("in-use".into());
    api_error(refused(own_base).await, 400, ErrorCode::InvalidRequest);
    // Tags are checked like names, ten at most.
    let mut bad_tag = request("x", vec![]);
    bad_tag.tags = vec!["no/slash".into()];
    api_error(refused(bad_tag).await, 400, ErrorCode::InvalidRequest);
    let mut many = request("x", vec![]);
    many.tags = (0..11).map(|i| format!("t{i}")).collect();
    api_error(refused(many).await, 400, ErrorCode::LimitExceeded);

    // One build of a name at a time.
    let running = nestbox_db::builds::create(
        &h.services.db,
        &nestbox_db::builds::NewBuild {
            team_id: h.team,
            name: "busy".into(),
            recipe: Recipe::default(),
            steps: Vec::new(),
            created_by: "system".into(),
            deadline: chrono::Utc::now() + chrono::Duration::hours(1),
            tags: vec!["default".into()],
        },
    )
    .await?;
    api_error(
        refused(request("busy", vec![])).await,
        409,
        ErrorCode::Conflict,
    );
    // A cancel reaches a running build through its record.
    let cancelled = h.key.cancel_build(running.id).await?;
    assert_eq!(
        cancelled.status,
        BuildStatus::Building,
        "the runner ends it"
    );
    assert!(
        nestbox_db::builds::get(&h.services.db, h.team, running.id)
            .await?
            .unwrap()
            .cancel
    );
    assert!(h.key.list_builds().await?.iter().all(|b| b.name != "x"));
    h.shutdown().await;
    Ok(())
}

/// The template a sandbox was made from, as recorded.
async fn made_from(h: &Harness, sandbox: nestbox_types::SandboxId) -> nestbox_types::TemplateId {
    nestbox_db::sandboxes::get(&h.services.db, sandbox)
        .await
        .unwrap()
        .template_id
        .expect("a sandbox names its template")
}

async fn create_from(h: &Harness, template: &str) -> nestbox_types::SandboxId {
    h.key
        .create_sandbox(&CreateSandboxRequest {
            template: Some(template.into()),
            ..Default::default()
        })
        .await
        .unwrap()
        .id
}

async fn built(h: &Harness, name: &str, step: &str, tags: &[&str]) -> Build {
    let mut req = request(name, vec![run(step)]);
    req.tags = tags.iter().map(|t| t.to_string()).collect();
    let b = ended(&h.key, &h.key.create_build(&req).await.unwrap()).await;
    assert_eq!(b.status, BuildStatus::Ready, "{:?}", b.error);
    b
}

async fn tags_name_builds_and_a_rebuild_leaves_running_sandboxes_theirs(
    engine: Engine,
) -> anyhow::Result<()> {
    let h = Harness::start(engine).await?;
    let db = &h.services.db;
    let exists = |id| nestbox_db::templates::exists(db, id);

    // A rebuild replaces the template while a sandbox runs from the first build: the
    // sandbox keeps its build, hidden (one `app` is listed), new sandboxes get the new one.
    let one = built(&h, "app", "one", &[]).await;
    assert_eq!(one.tags, ["default"]);
    let t1 = one.template_id.unwrap();
    let s1 = create_from(&h, "app").await;
    assert_eq!(made_from(&h, s1).await, t1);
    let two = built(&h, "app", "two", &[]).await;
    let t2 = two.template_id.unwrap();
    assert_ne!(t1, t2);
    let listed: Vec<_> = h.key.list_snapshots().await?;
    let apps: Vec<_> = listed
        .iter()
        .filter(|t| t.name.starts_with("app"))
        .collect();
    assert_eq!(apps.len(), 1, "{apps:?}");
    assert_eq!(apps[0].id, t2);
    let s2 = create_from(&h, "app").await;
    assert_eq!(made_from(&h, s2).await, t2);
    assert_eq!(h.key.get_sandbox(s2).await?.template, "app");

    // A tagged build leaves `app` as it was and starts sandboxes as `app:v3`.
    let three = built(&h, "app", "three", &["v3"]).await;
    assert_eq!(three.tags, ["v3"]);
    let t3 = three.template_id.unwrap();
    let s3 = create_from(&h, "app:v3").await;
    assert_eq!(made_from(&h, s3).await, t3);
    assert_eq!(made_from(&h, create_from(&h, "app").await).await, t2);
    let tags = h.key.template_tags("app").await?;
    let view: Vec<_> = tags
        .iter()
        .map(|t| (t.tag.as_str(), t.template_id, t.build_id))
        .collect();
    assert_eq!(
        view,
        [("default", t2, Some(two.id)), ("v3", t3, Some(three.id))]
    );

    // Moving `default` (and a new tag) to v3's build: `app` is v3's now; the build it
    // replaced is held by its sandbox, then swept once that is gone.
    let after = h
        .key
        .assign_template_tags("app", Some("v3"), &["default", "prod"])
        .await?;
    let view: Vec<_> = after
        .iter()
        .map(|t| (t.tag.as_str(), t.template_id))
        .collect();
    assert_eq!(view, [("default", t3), ("prod", t3), ("v3", t3)]);
    assert_eq!(made_from(&h, create_from(&h, "app").await).await, t3);
    for s in h
        .key
        .list_sandboxes(&SandboxListQuery::default())
        .await?
        .items
    {
        if s.status != SandboxStatus::Stopped && s.id != s1 {
            h.key.destroy_sandbox(s.id).await?;
        }
    }
    h.services
        .sweep_fork_templates(chrono::Utc::now() + chrono::Duration::minutes(1))
        .await;
    assert!(
        !exists(t2).await?,
        "an untagged build no sandbox holds is deleted"
    );
    assert!(exists(t1).await?, "a build a sandbox runs from stays");
    h.key.destroy_sandbox(s1).await?;
    h.services
        .sweep_fork_templates(chrono::Utc::now() + chrono::Duration::minutes(1))
        .await;
    assert!(!exists(t1).await?);
    assert!(exists(t3).await?);

    // Taking `default` off hides `app`; its tags still start sandboxes.
    h.key.remove_template_tag("app", "v3").await?;
    h.key.remove_template_tag("app", "default").await?;
    api_error(
        h.key
            .create_sandbox(&CreateSandboxRequest {
                template: Some("app".into()),
                ..Default::default()
            })
            .await,
        404,
        ErrorCode::TemplateNotFound,
    );
    assert!(
        h.key
            .list_snapshots()
            .await?
            .iter()
            .all(|t| !t.name.starts_with("app"))
    );
    let s4 = create_from(&h, "app:prod").await;
    assert_eq!(made_from(&h, s4).await, t3);
    let tags = h.key.template_tags("app").await?;
    assert_eq!(
        tags.iter().map(|t| t.tag.as_str()).collect::<Vec<_>>(),
        ["prod"]
    );
    api_error(
        h.key.remove_template_tag("app", "v3").await,
        404,
        ErrorCode::TemplateNotFound,
    );

    // Bad references and tags are refused; another team sees none of it.
    for bad in ["app:", ":prod", "app:a:b", "app:no/slash"] {
        api_error(
            h.key
                .create_sandbox(&CreateSandboxRequest {
                    template: Some(bad.into()),
                    ..Default::default()
                })
                .await,
            400,
            ErrorCode::InvalidRequest,
        );
    }
    api_error(
        h.key.assign_template_tags("app", Some("prod"), &[]).await,
        400,
        ErrorCode::InvalidRequest,
    );
    api_error(
        h.key
            .assign_template_tags("app", Some("prod"), &["no/slash"])
            .await,
        400,
        ErrorCode::InvalidRequest,
    );
    api_error(
        h.key
            .assign_template_tags("app", Some("nope"), &["x"])
            .await,
        404,
        ErrorCode::TemplateNotFound,
    );
    api_error(
        h.key.assign_template_tags("minimal", None, &["mine"]).await,
        409,
        ErrorCode::AlreadyExists,
    );
    let other = h.user("other").await?;
    api_error(
        other.client.template_tags("app").await,
        404,
        ErrorCode::TemplateNotFound,
    );
    api_error(
        other
            .client
            .assign_template_tags("app", Some("prod"), &["x"])
            .await,
        404,
        ErrorCode::TemplateNotFound,
    );
    api_error(
        other.client.remove_template_tag("app", "prod").await,
        404,
        ErrorCode::TemplateNotFound,
    );
    api_error(
        other
            .client
            .create_sandbox(&CreateSandboxRequest {
                template: Some("app:prod".into()),
                ..Default::default()
            })
            .await,
        404,
        ErrorCode::TemplateNotFound,
    );

    // Deleting the name takes its tags: the build goes once its sandbox does.
    h.key.destroy_sandbox(s4).await?;
    h.key.delete_snapshot("app").await?;
    api_error(
        h.key.template_tags("app").await,
        404,
        ErrorCode::TemplateNotFound,
    );
    h.services
        .sweep_fork_templates(chrono::Utc::now() + chrono::Duration::minutes(1))
        .await;
    assert!(!exists(t3).await?);
    h.shutdown().await;
    Ok(())
}

async fn builds_and_archives_are_the_teams_own(engine: Engine) -> anyhow::Result<()> {
    let h = Harness::start(engine).await?;
    let other = h.user("other").await?;
    let b = ended(
        &h.key,
        &h.key.create_build(&request("mine", vec![run("a")])).await?,
    )
    .await;
    api_error(
        other.client.get_build(b.id).await,
        404,
        ErrorCode::BuildNotFound,
    );
    api_error(
        other.client.build_logs(b.id, 0).await,
        404,
        ErrorCode::BuildNotFound,
    );
    api_error(
        other.client.cancel_build(b.id).await,
        404,
        ErrorCode::BuildNotFound,
    );
    assert!(other.client.list_builds().await?.is_empty());

    // Archives: named by their SHA-256, checked, and per team.
    let data = b"an archive".to_vec();
    let hash = hex::encode(sha2::Sha256::digest(&data));
    assert!(!h.key.has_build_file(&hash).await?);
    let stored = h.key.put_build_file(&hash, data.clone()).await?;
    assert_eq!(stored.size, data.len() as u64);
    assert!(h.key.has_build_file(&hash).await?);
    assert!(
        !other.client.has_build_file(&hash).await?,
        "another team never learns of it"
    );
    api_error(
        h.key.put_build_file(&"0".repeat(64), data.clone()).await,
        400,
        ErrorCode::InvalidRequest,
    );
    api_error(
        h.key.put_build_file("not-a-hash", data).await,
        400,
        ErrorCode::InvalidRequest,
    );
    // Another team's copy step cannot name it.
    let copy = BuildStep::Copy {
        archive: hash,
        dest: "/x".into(),
        user: None,
        source: None,
        mode: None,
    };
    api_error(
        other
            .client
            .create_build(&request("theirs", vec![copy]))
            .await,
        400,
        ErrorCode::InvalidRequest,
    );
    h.shutdown().await;
    Ok(())
}

async fn a_build_whose_runner_stopped_is_failed_by_the_monitor(
    engine: Engine,
) -> anyhow::Result<()> {
    let h = Harness::start(engine).await?;
    // A build whose process went away: its record, and the sandbox it ran in.
    let sb = h
        .key
        .create_sandbox(&CreateSandboxRequest {
            metadata: BTreeMap::from([("nestbox.build".into(), "orphan".into())]),
            ..Default::default()
        })
        .await?;
    let db = &h.services.db;
    let orphan = nestbox_db::builds::create(
        db,
        &nestbox_db::builds::NewBuild {
            team_id: h.team,
            name: "orphan".into(),
            recipe: Recipe::default(),
            steps: Vec::new(),
            created_by: "system".into(),
            deadline: chrono::Utc::now() + chrono::Duration::hours(1),
            tags: vec!["default".into()],
        },
    )
    .await?;
    nestbox_db::builds::progress(db, orphan.id, &[], 0, Some(sb.id)).await?;
    // Heard of just now: left alone.
    h.services.sweep_builds().await;
    assert_eq!(
        h.key.get_build(orphan.id).await?.status,
        BuildStatus::Building
    );
    // A live runner keeps its build fresh however long a step takes; this one is gone, and
    // five minutes later the monitor sees it.
    h.services
        .sweep_builds_at(chrono::Utc::now() + chrono::Duration::minutes(5))
        .await;
    let failed = h.key.get_build(orphan.id).await?;
    assert_eq!(failed.status, BuildStatus::Failed);
    assert!(failed.error.unwrap().contains("runner stopped"));
    assert_eq!(
        h.key.get_sandbox(sb.id).await?.status,
        SandboxStatus::Stopped
    );

    // A build announced without its recipe (E2B's SDK announces, uploads, then starts)
    // waits; never started, the monitor fails it after an hour. A waiting build is
    // cancelled at once, and one started gets its recipe and runs.
    let announce = |name: &str| {
        let (services, caller) = (
            h.services.clone(),
            nestbox_control::extract::Caller::system(h.team),
        );
        let name = name.to_string();
        async move {
            services
                .announce_build(&caller, &name, &[], None, None)
                .await
        }
    };
    let waiting = announce("never-started").await?;
    assert_eq!(waiting.status, BuildStatus::Waiting);
    h.services
        .sweep_builds_at(chrono::Utc::now() + chrono::Duration::minutes(5))
        .await;
    assert_eq!(
        h.key.get_build(waiting.id).await?.status,
        BuildStatus::Waiting
    );
    h.services
        .sweep_builds_at(chrono::Utc::now() + chrono::Duration::minutes(90))
        .await;
    let expired = h.key.get_build(waiting.id).await?;
    assert_eq!(expired.status, BuildStatus::Failed);
    assert!(expired.error.unwrap().contains("never started"));
    let cancelled = announce("cancelled-waiting").await?;
    assert_eq!(
        h.key.cancel_build(cancelled.id).await?.status,
        BuildStatus::Cancelled
    );
    let started = announce("started-later").await?;
    let run_now = h
        .services
        .start_announced_build(
            &nestbox_control::extract::Caller::system(h.team),
            started.id,
            request("ignored", vec![run("echo late")]),
        )
        .await?;
    assert_eq!(run_now.name, "started-later");
    let done = ended(&h.key, &run_now).await;
    assert_eq!(done.status, BuildStatus::Ready, "{:?}", done.error);
    h.shutdown().await;
    Ok(())
}

/// The simulated agent's registry `sim.test` (see the testkit): every image's environment
/// names it, runs in `/srv` and serves with `/bin/sh -c serve`.
async fn a_build_from_an_image_starts_with_its_configuration_and_caches_it(
    engine: Engine,
) -> anyhow::Result<()> {
    let h = Harness::start(engine).await?;
    let image = |reference: &str, last: &str| {
        let mut req = request("from-image", vec![run("first"), run(last)]);
        req.recipe.image = Some(reference.into());
        req
    };
    let accepted = h
        .key
        .create_build(&image("sim.test/team/app:v1", "second"))
        .await?;
    let b = ended(&h.key, &accepted).await;
    assert_eq!(b.status, BuildStatus::Ready, "{:?}", b.error);
    // The image's entrypoint is the start command.
    assert_eq!(b.steps.len(), 3, "{:?}", b.steps);
    assert!(
        b.steps[2].summary.contains("/bin/sh -c serve"),
        "{:?}",
        b.steps
    );
    let log = log_text(&h.key, &b).await;
    let said = |text: &str| log.iter().any(|(_, s, t)| s == "info" && t.contains(text));
    assert!(said("resolving image sim.test/team/app:v1"), "{log:?}");
    assert!(said("pulling the image"), "{log:?}");
    // Steps ran with its environment, directory and user.
    let last = h.agent.last_exec().unwrap();
    assert_eq!((last.cwd.as_str(), last.user.as_str()), ("/srv", "root"));
    assert_eq!(
        last.env.get("IMAGE_NAME").map(String::as_str),
        Some("sim.test/team/app:v1")
    );
    // Its sandboxes get the image's environment.
    let sb = h
        .key
        .create_sandbox(&CreateSandboxRequest {
            template: Some("from-image".into()),
            ..Default::default()
        })
        .await?;
    let out = h
        .key
        .exec(
            sb.id,
            &ExecRequest {
                argv: Some(vec!["env".into()]),
                ..Default::default()
            },
        )
        .await?;
    assert!(
        out.stderr.contains("IMAGE_NAME=sim.test/team/app:v1"),
        "{}",
        out.stderr
    );
    h.key.destroy_sandbox(sb.id).await?;

    // A rebuild takes the image and the unchanged step from the cache.
    let again = ended(
        &h.key,
        &h.key
            .create_build(&image("sim.test/team/app:v1", "changed"))
            .await?,
    )
    .await;
    assert_eq!(
        (again.status, again.cached_steps),
        (BuildStatus::Ready, 1),
        "{:?}",
        again.error
    );
    let log = log_text(&h.key, &again).await;
    assert!(
        log.iter()
            .any(|(_, _, t)| t.contains("image taken from the cache")),
        "{log:?}"
    );
    // Another last step again, told to take nothing: the image is pulled again.
    let mut fresh = image("sim.test/team/app:v1", "other");
    fresh.no_cache = true;
    let fresh = ended(&h.key, &h.key.create_build(&fresh).await?).await;
    assert_eq!(fresh.status, BuildStatus::Ready, "{:?}", fresh.error);
    let log = log_text(&h.key, &fresh).await;
    assert!(
        log.iter().any(|(_, _, t)| t.contains("pulling the image")),
        "{log:?}"
    );

    // A private image needs credentials, which are never shown back.
    let private = ended(
        &h.key,
        &h.key
            .create_build(&image("sim.test/private/app", "x"))
            .await?,
    )
    .await;
    assert_eq!(private.status, BuildStatus::Failed);
    assert!(
        private
            .error
            .as_deref()
            .unwrap_or_default()
            .contains("needs credentials"),
        "{:?}",
        private.error
    );
    let mut with_auth = image("sim.test/private/app", "x");
    with_auth.registry_auth = Some(RegistryAuth {
        username: "sim".into(),
        password: "sim".into(),
    });
    let ok = ended(&h.key, &h.key.create_build(&with_auth).await?).await;
    assert_eq!(ok.status, BuildStatus::Ready, "{:?}", ok.error);
    let shown = serde_json::to_string(&h.key.get_build(ok.id).await?)?;
    assert!(!shown.contains("\"password\""), "{shown}");

    // A missing image fails the build and leaves nothing; a malformed reference or an
    // image beside a base is refused at once.
    let missing = ended(
        &h.key,
        &h.key.create_build(&image("sim.test/missing", "x")).await?,
    )
    .await;
    assert_eq!(missing.status, BuildStatus::Failed);
    assert!(
        missing
            .error
            .as_deref()
            .unwrap_or_default()
            .contains("not found"),
        "{:?}",
        missing.error
    );
    assert_eq!(live_build_sandboxes(&h.key).await, 0);
    api_error(
        h.key.create_build(&image("Not A/Ref!", "x")).await,
        400,
        ErrorCode::InvalidRequest,
    );
    let mut both = image("sim.test/team/app", "x");
    both.recipe.base = Some("minimal".into());
    let err = api_error(
        h.key.create_build(&both).await,
        400,
        ErrorCode::InvalidRequest,
    );
    assert!(err.error.message.contains("not both"), "{err:?}");
    h.shutdown().await;
    Ok(())
}
