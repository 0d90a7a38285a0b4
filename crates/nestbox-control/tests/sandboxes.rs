//! Sandboxes, with a simulated host agent: create, read, list, destroy, commands, files,
//! validation, capacity, agent failures and the audit log.

// Tests may panic on what they expect (see clippy.toml); helpers here are not `#[test]`s.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use common::{Engine, Harness, Options, WAIT, api_error, both_engines};
use futures::{StreamExt, TryStreamExt};
use nestbox_client::Client;
use nestbox_control::Limits;
use nestbox_testkit::simagent::{EXIT_CODE_ENV, STDOUT_HEX_ENV};
use nestbox_testkit::{SimOp, wait_for};
use nestbox_types::api::{
    AddMemberRequest, CreateSandboxRequest, Encoding, ExecEvent, ExecRequest, FileType, PageQuery,
    Sandbox, SandboxListQuery,
};
use nestbox_types::{ErrorCode, HostStatus, SandboxId, SandboxStatus, TeamRole};
use sha2::{Digest, Sha256};

both_engines!(
    errors_name_their_request_and_hide_internals,
    create_with_defaults_runs_on_the_agent,
    create_with_explicit_values_env_and_metadata,
    list_filters_and_pages,
    destroy_stops_and_is_idempotent,
    rotating_tokens_replaces_both_and_a_refusal_keeps_the_old,
    removing_a_member_or_a_key_can_rotate_the_teams_tokens,
    exec_collects_output_and_exit_codes,
    exec_streams_events,
    exec_validation,
    files_round_trip,
    create_validation,
    uploads_over_the_limit_store_nothing,
    no_capacity_is_retryable,
    agent_create_failure_leaves_an_error_sandbox,
    agent_destroy_failure_keeps_the_sandbox,
    audit_log_records_changes_for_team_admins,
);

fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// `T::default()` changed by `f`, for tables of requests.
fn with<T: Default>(f: impl FnOnce(&mut T)) -> T {
    let mut value = T::default();
    f(&mut value);
    value
}

fn argv(args: &[&str]) -> ExecRequest {
    ExecRequest {
        argv: Some(args.iter().map(|a| a.to_string()).collect()),
        ..Default::default()
    }
}

/// Every page of the team's sandboxes matching `query`, following cursors.
async fn all_pages(client: &Client, mut query: SandboxListQuery) -> anyhow::Result<Vec<Sandbox>> {
    let mut out = Vec::new();
    loop {
        let page = client.list_sandboxes(&query).await?;
        out.extend(page.items);
        match page.next_cursor {
            Some(c) => query.cursor = Some(c),
            None => return Ok(out),
        }
    }
}

async fn create_with_defaults_runs_on_the_agent(engine: Engine) -> anyhow::Result<()> {
    let h = Harness::start(engine).await?;
    let templates = h.key.list_templates().await?;
    let minimal = templates
        .iter()
        .find(|t| t.name == "minimal")
        .expect("the agent's template is a platform template");
    assert!(minimal.platform && minimal.disk_size_mb == 512);

    let sb = h.sandbox().await?;
    assert_eq!(sb.status, SandboxStatus::Running);
    assert_eq!(sb.team_id, h.team);
    assert_eq!(sb.template, "minimal");
    assert_eq!(
        (sb.vcpus, sb.memory_mb, sb.disk_size_mb, sb.timeout_sec),
        (1, 512, 5120, 300),
        "defaults"
    );
    assert_eq!(sb.host_id, Some(h.host_id));
    assert!(sb.started_at.is_some() && sb.stopped_at.is_none() && sb.error.is_none());

    let on_agent = h.agent.sandbox(sb.id).expect("the agent runs it");
    let req = &on_agent.request;
    assert_eq!(req.team_id, h.team.to_string());
    assert_eq!(
        (req.vcpus, req.memory_mb, req.disk_size_mb, req.timeout_sec),
        (1, 512, 5120, 300)
    );
    assert_eq!(req.access_token.len(), 64, "a per-sandbox access token");
    assert_eq!(
        h.agent.rejected_calls(),
        0,
        "every agent call carried a valid token"
    );

    assert_eq!(h.key.get_sandbox(sb.id).await?, sb);
    h.shutdown().await;
    Ok(())
}

async fn create_with_explicit_values_env_and_metadata(engine: Engine) -> anyhow::Result<()> {
    let h = Harness::start(engine).await?;
    let sb = h
        .key
        .create_sandbox(&CreateSandboxRequest {
            template: Some("minimal".into()),
            vcpus: Some(2),
            memory_mb: Some(1024),
            disk_size_mb: Some(2048),
            timeout_sec: Some(0),
            env: map(&[("GREETING", "hello"), ("_X1", "")]),
            metadata: map(&[("owner", "alice"), ("purpose", "ci run 7")]),
            ..Default::default()
        })
        .await?;
    assert_eq!(
        (sb.vcpus, sb.memory_mb, sb.disk_size_mb, sb.timeout_sec),
        (2, 1024, 2048, 0)
    );
    assert_eq!(
        sb.metadata,
        map(&[("owner", "alice"), ("purpose", "ci run 7")])
    );
    let on_agent = h.agent.sandbox(sb.id).expect("the agent runs it");
    assert_eq!(on_agent.env(), map(&[("GREETING", "hello"), ("_X1", "")]));

    let out = h.key.exec(sb.id, &argv(&["env"])).await?;
    assert_eq!(
        out.stderr, "GREETING=hello\n_X1=\n",
        "the sandbox's env reaches commands"
    );
    assert_eq!(h.key.get_sandbox(sb.id).await?.metadata, sb.metadata);
    h.shutdown().await;
    Ok(())
}

async fn list_filters_and_pages(engine: Engine) -> anyhow::Result<()> {
    let h = Harness::start(engine).await?;
    let mut made = Vec::new();
    for (i, batch) in ["a", "a", "b", "a", "b"].iter().enumerate() {
        let sb = h
            .key
            .create_sandbox(&CreateSandboxRequest {
                metadata: map(&[("batch", batch), ("n", &i.to_string())]),
                ..Default::default()
            })
            .await?;
        made.push(sb.id);
    }
    h.key.destroy_sandbox(made[0]).await?;

    let live = all_pages(&h.key, SandboxListQuery::default()).await?;
    let ids: Vec<SandboxId> = live.iter().map(|s| s.id).collect();
    let expected: Vec<SandboxId> = made[1..].iter().rev().copied().collect();
    assert_eq!(ids, expected, "newest first, stopped hidden by default");

    let stopped = all_pages(
        &h.key,
        with(|q: &mut SandboxListQuery| q.status = Some("stopped".into())),
    )
    .await?;
    assert_eq!(stopped.iter().map(|s| s.id).collect::<Vec<_>>(), [made[0]]);

    let both = all_pages(
        &h.key,
        with(|q: &mut SandboxListQuery| q.status = Some("running,stopped".into())),
    )
    .await?;
    assert_eq!(both.len(), 5);

    let batch_a = all_pages(
        &h.key,
        with(|q: &mut SandboxListQuery| q.metadata = Some("batch=a".into())),
    )
    .await?;
    assert_eq!(
        batch_a.iter().map(|s| s.id).collect::<Vec<_>>(),
        [made[3], made[1]],
        "metadata filter (the stopped one is hidden)"
    );
    let one = all_pages(
        &h.key,
        with(|q: &mut SandboxListQuery| q.metadata = Some("batch=b,n=2".into())),
    )
    .await?;
    assert_eq!(
        one.iter().map(|s| s.id).collect::<Vec<_>>(),
        [made[2]],
        "all pairs must match"
    );

    // Pages of two: 2 + 2 + 1 across cursors, no duplicates, same order.
    let first = h
        .key
        .list_sandboxes(&SandboxListQuery {
            status: Some("running,stopped".into()),
            limit: Some(2),
            ..Default::default()
        })
        .await?;
    assert_eq!(first.items.len(), 2);
    assert!(first.next_cursor.is_some(), "more pages follow");
    let paged = all_pages(
        &h.key,
        SandboxListQuery {
            status: Some("running,stopped".into()),
            limit: Some(2),
            ..Default::default()
        },
    )
    .await?;
    assert_eq!(
        paged.iter().map(|s| s.id).collect::<Vec<_>>(),
        both.iter().map(|s| s.id).collect::<Vec<_>>()
    );

    for bad in [
        with(|q: &mut SandboxListQuery| q.status = Some("runnin".into())),
        with(|q: &mut SandboxListQuery| q.metadata = Some("no-equals-sign".into())),
        with(|q: &mut SandboxListQuery| q.limit = Some(0)),
        with(|q: &mut SandboxListQuery| q.limit = Some(201)),
        with(|q: &mut SandboxListQuery| q.cursor = Some("garbage".into())),
    ] {
        api_error(
            h.key.list_sandboxes(&bad).await,
            400,
            ErrorCode::InvalidRequest,
        );
    }
    h.shutdown().await;
    Ok(())
}

async fn destroy_stops_and_is_idempotent(engine: Engine) -> anyhow::Result<()> {
    let h = Harness::start(engine).await?;
    let sb = h.sandbox().await?;
    h.key.destroy_sandbox(sb.id).await?;
    assert!(h.agent.sandbox(sb.id).is_none(), "destroyed on the agent");
    let got = h.key.get_sandbox(sb.id).await?;
    assert_eq!(got.status, SandboxStatus::Stopped);
    assert!(got.stopped_at.is_some());

    h.key.destroy_sandbox(sb.id).await?;
    assert_eq!(
        h.agent.calls(SimOp::Destroy),
        1,
        "a second destroy is a no-op"
    );

    let body = api_error(
        h.key.exec(sb.id, &argv(&["true"])).await,
        409,
        ErrorCode::SandboxNotRunning,
    );
    assert!(body.error.message.contains("stopped"), "{body:?}");
    api_error(
        h.key.list_files(sb.id, "/", None).await,
        409,
        ErrorCode::SandboxNotRunning,
    );
    api_error(
        h.key.destroy_sandbox(SandboxId::new()).await,
        404,
        ErrorCode::SandboxNotFound,
    );
    h.shutdown().await;
    Ok(())
}

async fn exec_collects_output_and_exit_codes(engine: Engine) -> anyhow::Result<()> {
    let h = Harness::start(engine).await?;
    let sb = h.sandbox().await?;

    let out = h
        .key
        .exec(
            sb.id,
            &ExecRequest {
                command: Some("echo hi".into()),
                ..Default::default()
            },
        )
        .await?;
    assert_eq!(
        out.stdout, "/bin/sh -c echo hi\n",
        "a command runs through the shell"
    );
    assert_eq!((out.exit_code, out.stdout_encoding), (0, Encoding::Utf8));
    let sent = h.agent.last_exec().expect("the agent ran it");
    assert_eq!(sent.timeout_ms, 60_000, "default exec timeout");

    let out = h
        .key
        .exec(
            sb.id,
            &ExecRequest {
                command: None,
                argv: Some(vec!["cat".into()]),
                env: map(&[(EXIT_CODE_ENV, "3")]),
                cwd: Some("/tmp".into()),
                user: Some("nobody".into()),
                timeout_sec: Some(5),
                stdin_base64: Some(B64.encode("from stdin")),
            },
        )
        .await?;
    assert_eq!(out.exit_code, 3);
    assert_eq!(out.stdout, "cat\nfrom stdin");
    assert_eq!(out.stderr, format!("{EXIT_CODE_ENV}=3\n"));
    let sent = h.agent.last_exec().expect("the agent ran it");
    assert_eq!(
        (sent.cwd.as_str(), sent.user.as_str(), sent.timeout_ms),
        ("/tmp", "nobody", 5000)
    );

    let binary = [0xffu8, 0x00, 0xfe, b'a'];
    let out = h
        .key
        .exec(
            sb.id,
            &ExecRequest {
                argv: Some(vec!["head".into(), "-c4".into(), "/dev/urandom".into()]),
                env: map(&[(STDOUT_HEX_ENV, &hex::encode(binary))]),
                ..Default::default()
            },
        )
        .await?;
    assert_eq!(out.stdout_encoding, Encoding::Base64, "non-UTF-8 output");
    assert_eq!(B64.decode(&out.stdout)?, binary);
    assert_eq!(out.stderr_encoding, Encoding::Utf8);
    h.shutdown().await;
    Ok(())
}

async fn exec_streams_events(engine: Engine) -> anyhow::Result<()> {
    let h = Harness::start(engine).await?;
    let sb = h.sandbox().await?;
    let mut req = argv(&["printf", "two\nlines"]);
    req.env = map(&[(EXIT_CODE_ENV, "7")]);
    let events: Vec<ExecEvent> = h.key.exec_stream(sb.id, &req).await?.try_collect().await?;

    assert!(
        matches!(events.first(), Some(ExecEvent::Started { pid }) if *pid > 0),
        "{events:?}"
    );
    assert_eq!(
        events.last(),
        Some(&ExecEvent::Exit {
            exit_code: 7,
            duration_ms: 1,
            timed_out: false
        })
    );
    let mut stdout = Vec::new();
    let mut stderr = Vec::new();
    for ev in &events {
        match ev {
            ExecEvent::Stdout { data } => stdout.extend(B64.decode(data)?),
            ExecEvent::Stderr { data } => stderr.extend(B64.decode(data)?),
            _ => {}
        }
    }
    assert_eq!(stdout, b"printf two\nlines\n");
    assert_eq!(stderr, format!("{EXIT_CODE_ENV}=7\n").as_bytes());
    assert!(
        events
            .iter()
            .filter(|e| matches!(e, ExecEvent::Stdout { .. }))
            .count()
            > 1,
        "output arrives in chunks"
    );

    h.key.destroy_sandbox(sb.id).await?;
    let err = h.key.exec_stream(sb.id, &req).await.map(|_| ());
    api_error(err, 409, ErrorCode::SandboxNotRunning);
    h.shutdown().await;
    Ok(())
}

async fn exec_validation(engine: Engine) -> anyhow::Result<()> {
    let h = Harness::start(engine).await?;
    let sb = h.sandbox().await?;
    let both = ExecRequest {
        command: Some("ls".into()),
        argv: Some(vec!["ls".into()]),
        ..Default::default()
    };
    let invalid = [
        both,
        ExecRequest::default(),
        argv(&[]),
        argv(&[""]),
        ExecRequest {
            command: Some("  ".into()),
            ..Default::default()
        },
        ExecRequest {
            env: map(&[("1BAD", "x")]),
            ..argv(&["true"])
        },
        ExecRequest {
            env: map(&[("A-B", "x")]),
            ..argv(&["true"])
        },
        ExecRequest {
            stdin_base64: Some("***".into()),
            ..argv(&["true"])
        },
        ExecRequest {
            timeout_sec: Some(0),
            ..argv(&["true"])
        },
        ExecRequest {
            user: Some("Root;rm".into()),
            ..argv(&["true"])
        },
    ];
    for req in &invalid {
        api_error(h.key.exec(sb.id, req).await, 400, ErrorCode::InvalidRequest);
        let streamed = h.key.exec_stream(sb.id, req).await.map(|_| ());
        api_error(streamed, 400, ErrorCode::InvalidRequest);
    }
    let too_long = ExecRequest {
        timeout_sec: Some(3601),
        ..argv(&["true"])
    };
    let body = api_error(
        h.key.exec(sb.id, &too_long).await,
        400,
        ErrorCode::LimitExceeded,
    );
    assert!(body.error.message.contains("timeout_sec"), "{body:?}");
    assert_eq!(
        h.agent.calls(SimOp::Exec) + h.agent.calls(SimOp::ExecStream),
        0,
        "nothing invalid reaches the agent"
    );
    h.shutdown().await;
    Ok(())
}

async fn files_round_trip(engine: Engine) -> anyhow::Result<()> {
    let h = Harness::start(engine).await?;
    let sb = h.sandbox().await?;

    // 700 KiB of non-trivial bytes: several chunks both ways.
    let payload: Vec<u8> = (0u32..700 * 1024)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let entry = h
        .key
        .upload(
            sb.id,
            "/work/data.bin",
            payload.clone().into(),
            Some(payload.len() as u64),
        )
        .await?;
    assert_eq!(
        (entry.path.as_str(), entry.file_type, entry.size),
        ("/work/data.bin", FileType::File, payload.len() as u64)
    );
    let (size, body) = h.key.download(sb.id, "/work/data.bin").await?;
    assert_eq!(size, Some(payload.len() as u64), "Content-Length");
    let chunks: Vec<bytes::Bytes> = body.try_collect().await?;
    let downloaded = chunks.concat();
    assert_eq!(
        hex::encode(Sha256::digest(&downloaded)),
        hex::encode(Sha256::digest(&payload)),
        "the download's checksum matches the upload's"
    );

    // A streamed upload without a declared length, relative to the home directory.
    let parts: Vec<Result<&'static [u8], std::io::Error>> = vec![Ok(b"hello "), Ok(b"world")];
    let streamed = reqwest::Body::wrap_stream(futures::stream::iter(parts));
    h.key.upload(sb.id, "notes.txt", streamed, None).await?;
    assert_eq!(
        h.agent.file(sb.id, "/root/notes.txt").as_deref(),
        Some(&b"hello world"[..])
    );

    let dir = h.key.mkdir(sb.id, "/work/sub/deeper").await?;
    assert_eq!(dir.file_type, FileType::Directory);
    let listed = h.key.list_files(sb.id, "/work", None).await?;
    let names: Vec<&str> = listed.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(names, ["data.bin", "sub"]);
    let deep = h.key.list_files(sb.id, "/work", Some(3)).await?;
    let paths: Vec<&str> = deep.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(paths, ["/work/data.bin", "/work/sub", "/work/sub/deeper"]);

    let stat = h.key.stat(sb.id, "/work/data.bin").await?;
    assert_eq!(stat.size, payload.len() as u64);
    assert_eq!(stat.name, "data.bin");

    h.key.remove(sb.id, "/work/sub").await?;
    api_error(
        h.key.stat(sb.id, "/work/sub/deeper").await,
        404,
        ErrorCode::FileNotFound,
    );
    api_error(
        h.key.remove(sb.id, "/work/sub").await,
        404,
        ErrorCode::FileNotFound,
    );
    api_error(
        h.key.download(sb.id, "/nope").await.map(|(size, _)| size),
        404,
        ErrorCode::FileNotFound,
    );
    api_error(
        h.key.list_files(sb.id, "/work", Some(11)).await,
        400,
        ErrorCode::InvalidRequest,
    );
    h.shutdown().await;
    Ok(())
}

async fn create_validation(engine: Engine) -> anyhow::Result<()> {
    let h = Harness::start(engine).await?;
    let create = |req: CreateSandboxRequest| {
        let key = h.key.clone();
        async move { key.create_sandbox(&req).await }
    };
    api_error(
        create(with(|r: &mut CreateSandboxRequest| {
            r.template = Some("no-such-template".into())
        }))
        .await,
        404,
        ErrorCode::TemplateNotFound,
    );
    let limits = Limits::default();
    let over_limits = [
        (
            "vcpus",
            with(|r: &mut CreateSandboxRequest| r.vcpus = Some(limits.max_vcpus + 1)),
        ),
        (
            "memory_mb",
            with(|r: &mut CreateSandboxRequest| r.memory_mb = Some(limits.max_memory_mb + 1)),
        ),
        (
            "disk_size_mb",
            with(|r: &mut CreateSandboxRequest| r.disk_size_mb = Some(limits.max_disk_mb + 1)),
        ),
        (
            "timeout_sec",
            with(|r: &mut CreateSandboxRequest| r.timeout_sec = Some(limits.max_timeout_sec + 1)),
        ),
        (
            "env",
            with(|r: &mut CreateSandboxRequest| {
                r.env = (0..=limits.max_env_vars)
                    .map(|i| (format!("V{i}"), "x".into()))
                    .collect()
            }),
        ),
        (
            "metadata",
            with(|r: &mut CreateSandboxRequest| {
                r.metadata = (0..=limits.max_metadata)
                    .map(|i| (format!("k{i}"), "v".into()))
                    .collect()
            }),
        ),
    ];
    for (field, req) in over_limits {
        let body = api_error(create(req).await, 400, ErrorCode::LimitExceeded);
        assert!(
            body.error.message.starts_with(field),
            "the message names the limit `{field}`: {body:?}"
        );
    }
    let invalid = [
        with(|r: &mut CreateSandboxRequest| r.disk_size_mb = Some(256)),
        with(|r: &mut CreateSandboxRequest| r.vcpus = Some(0)),
        with(|r: &mut CreateSandboxRequest| r.memory_mb = Some(limits.min_memory_mb - 1)),
        with(|r: &mut CreateSandboxRequest| r.env = map(&[("NOT VALID", "x")])),
        with(|r: &mut CreateSandboxRequest| r.env = map(&[("9LIVES", "x")])),
        with(|r: &mut CreateSandboxRequest| r.env = map(&[("NUL", "a\0b")])),
        with(|r: &mut CreateSandboxRequest| r.metadata = map(&[("a=b", "x")])),
        with(|r: &mut CreateSandboxRequest| r.template = Some("../../etc".into())),
    ];
    for req in invalid {
        let body = api_error(create(req.clone()).await, 400, ErrorCode::InvalidRequest);
        if req.disk_size_mb == Some(256) {
            assert!(
                body.error.message.contains("512"),
                "names the template's minimum: {body:?}"
            );
        }
    }
    assert_eq!(
        h.agent.calls(SimOp::Create),
        0,
        "nothing invalid reaches the agent"
    );
    let all = all_pages(
        &h.key,
        SandboxListQuery {
            status: Some("pending,starting,running,error,stopped".into()),
            ..Default::default()
        },
    )
    .await?;
    assert!(
        all.is_empty(),
        "a rejected request records nothing: {all:?}"
    );
    h.shutdown().await;
    Ok(())
}

/// Uploads 512 bytes to `path`, waits until the agent is writing them, then sends `then`
/// (more bytes or a failure of the client's body).
async fn upload_interrupted(
    h: &Harness,
    id: SandboxId,
    path: &str,
    then: Result<Vec<u8>, std::io::Error>,
) -> anyhow::Result<Result<nestbox_types::api::EntryInfo, nestbox_client::ClientError>> {
    let writes = h.agent.calls(SimOp::WriteFile);
    let (go, gate) = tokio::sync::oneshot::channel::<()>();
    let first = futures::stream::once(async { Ok::<_, std::io::Error>(vec![7u8; 512]) });
    let rest = futures::stream::once(async move {
        let _ = gate.await;
        then
    });
    let body = reqwest::Body::wrap_stream(first.chain(rest));
    let upload = h.key.upload(id, path, body, None);
    let release = async {
        let started = wait_for(WAIT, || async { h.agent.calls(SimOp::WriteFile) > writes }).await;
        let _ = go.send(());
        started
    };
    let (result, started) = tokio::join!(upload, release);
    started?;
    Ok(result)
}

async fn uploads_over_the_limit_store_nothing(engine: Engine) -> anyhow::Result<()> {
    let opts = Options {
        limits: Limits {
            max_upload_bytes: 1024,
            ..Limits::default()
        },
        ..Options::default()
    };
    let h = Harness::with(engine, opts).await?;
    let sb = h.sandbox().await?;

    let big = vec![7u8; 4096];
    let body = api_error(
        h.key
            .upload(sb.id, "/big.bin", big.clone().into(), Some(4096))
            .await,
        413,
        ErrorCode::PayloadTooLarge,
    );
    assert!(body.error.message.contains("1024"), "{body:?}");
    assert_eq!(
        h.agent.calls(SimOp::WriteFile),
        0,
        "refused before reaching the agent"
    );

    // Without a declared length the limit is enforced while streaming: the agent is already
    // writing when the upload goes over, and must be left with nothing.
    let result = upload_interrupted(&h, sb.id, "/big.bin", Ok(vec![7u8; 4096])).await?;
    api_error(result, 413, ErrorCode::PayloadTooLarge);
    // The agent sees the broken stream on its own time; then it must not have stored it.
    wait_for(WAIT, || async { h.agent.aborted_writes() == 1 }).await?;
    assert_eq!(
        h.agent.file(sb.id, "/big.bin").map(|f| f.len()),
        None,
        "nothing stored on the agent"
    );
    api_error(
        h.key.stat(sb.id, "/big.bin").await,
        404,
        ErrorCode::FileNotFound,
    );

    // A client that breaks off mid-upload leaves nothing either.
    let broken = Err(std::io::Error::other("the client went away"));
    let result = upload_interrupted(&h, sb.id, "/cut.bin", broken).await?;
    assert!(result.is_err(), "{result:?}");
    wait_for(WAIT, || async { h.agent.aborted_writes() == 2 }).await?;
    assert_eq!(h.agent.file(sb.id, "/cut.bin"), None);

    h.key
        .upload(sb.id, "/fits.bin", vec![1u8; 1024].into(), Some(1024))
        .await?;
    assert_eq!(
        h.agent.file(sb.id, "/fits.bin").map(|f| f.len()),
        Some(1024)
    );
    h.shutdown().await;
    Ok(())
}

async fn no_capacity_is_retryable(engine: Engine) -> anyhow::Result<()> {
    let h = Harness::start(engine).await?;
    let kept = h.sandbox().await?;

    // The agent is full although the control plane believes it has room.
    h.agent.set_max_sandboxes(1);
    let body = api_error(h.sandbox().await, 503, ErrorCode::NoCapacity);
    assert!(body.error.retryable, "{body:?}");
    h.agent.set_max_sandboxes(64);
    let failed = all_pages(
        &h.key,
        SandboxListQuery {
            status: Some("error".into()),
            ..Default::default()
        },
    )
    .await?;
    assert_eq!(failed.len(), 1, "the refused sandbox is recorded as failed");

    // No online host at all.
    nestbox_db::hosts::set_status(&h.services.db, h.host_id, HostStatus::Unreachable).await?;
    h.services.fleet.invalidate();
    let creates = h.agent.calls(SimOp::Create);
    let body = api_error(h.sandbox().await, 503, ErrorCode::NoCapacity);
    assert!(body.error.retryable, "{body:?}");
    assert_eq!(h.agent.calls(SimOp::Create), creates, "no host was asked");

    nestbox_db::hosts::set_status(&h.services.db, h.host_id, HostStatus::Online).await?;
    h.services.fleet.invalidate();
    h.sandbox().await?;
    assert_eq!(
        h.key.get_sandbox(kept.id).await?.status,
        SandboxStatus::Running
    );
    h.shutdown().await;
    Ok(())
}

async fn agent_create_failure_leaves_an_error_sandbox(engine: Engine) -> anyhow::Result<()> {
    let h = Harness::start(engine).await?;
    h.agent.fail_next(
        SimOp::Create,
        ErrorCode::Internal,
        "qemu exited with status 1",
    );
    let body = api_error(h.sandbox().await, 502, ErrorCode::AgentError);
    assert!(
        !body.error.message.contains("qemu"),
        "agent internals stay out of the response: {body:?}"
    );

    h.agent.fail_next(
        SimOp::Create,
        ErrorCode::InsufficientStorage,
        "no space left for the disk",
    );
    let body = api_error(h.sandbox().await, 507, ErrorCode::InsufficientStorage);
    assert!(body.error.message.contains("no space left"), "{body:?}");

    let failed = all_pages(
        &h.key,
        SandboxListQuery {
            status: Some("error".into()),
            ..Default::default()
        },
    )
    .await?;
    assert_eq!(failed.len(), 2);
    for sb in &failed {
        let got = h.key.get_sandbox(sb.id).await?;
        assert_eq!(got.status, SandboxStatus::Error);
        let reason = got.error.expect("an error sandbox says why");
        assert!(
            reason.starts_with("agent_error") || reason.contains("no space left"),
            "{reason}"
        );
        api_error(
            h.key.exec(sb.id, &argv(&["true"])).await,
            409,
            ErrorCode::SandboxNotRunning,
        );
        h.key.destroy_sandbox(sb.id).await?;
        assert_eq!(
            h.key.get_sandbox(sb.id).await?.status,
            SandboxStatus::Stopped
        );
    }
    assert!(h.agent.sandbox_ids().is_empty());
    h.sandbox().await?;
    h.shutdown().await;
    Ok(())
}

async fn agent_destroy_failure_keeps_the_sandbox(engine: Engine) -> anyhow::Result<()> {
    let h = Harness::start(engine).await?;
    let sb = h.sandbox().await?;
    h.agent
        .fail_next(SimOp::Destroy, ErrorCode::Internal, "cannot kill the VMM");
    api_error(
        h.key.destroy_sandbox(sb.id).await,
        502,
        ErrorCode::AgentError,
    );
    assert_eq!(
        h.key.get_sandbox(sb.id).await?.status,
        SandboxStatus::Running
    );
    assert!(h.agent.sandbox(sb.id).is_some());

    // "Not found on the agent" is the one failure a destroy swallows.
    assert!(h.agent.lose(sb.id));
    h.key.destroy_sandbox(sb.id).await?;
    assert_eq!(
        h.key.get_sandbox(sb.id).await?.status,
        SandboxStatus::Stopped
    );
    h.shutdown().await;
    Ok(())
}

async fn audit_log_records_changes_for_team_admins(engine: Engine) -> anyhow::Result<()> {
    let h = Harness::start(engine).await?;
    let sb = h.sandbox().await?;
    h.key.destroy_sandbox(sb.id).await?;

    let log = h.admin.client.audit_logs(&PageQuery::default()).await?;
    let about: Vec<_> = log
        .items
        .iter()
        .filter(|a| a.resource_id.as_deref() == Some(&sb.id.to_string()))
        .collect();
    let actions: Vec<&str> = about.iter().map(|a| a.action.as_str()).collect();
    assert_eq!(
        actions,
        ["sandbox.destroy", "sandbox.create"],
        "newest first"
    );
    for entry in &about {
        assert_eq!(entry.actor_type, "api_key");
        assert_eq!(entry.status, "success");
        assert_eq!(entry.team_id, Some(h.team));
    }

    let member = h.user("member").await?;
    h.admin
        .client
        .add_member(
            h.team,
            &AddMemberRequest {
                email: member.email.clone(),
                role: Some(TeamRole::Member),
            },
        )
        .await?;
    let as_member = member.client.clone().with_team(h.team);
    api_error(
        as_member.audit_logs(&PageQuery::default()).await,
        403,
        ErrorCode::Forbidden,
    );
    api_error(
        h.key.audit_logs(&PageQuery::default()).await,
        403,
        ErrorCode::Forbidden,
    );
    // Paging works like every list.
    let page = h
        .admin
        .client
        .audit_logs(&PageQuery {
            limit: Some(1),
            cursor: None,
        })
        .await?;
    assert_eq!(page.items.len(), 1);
    let next = h
        .admin
        .client
        .audit_logs(&PageQuery {
            limit: Some(1),
            cursor: page.next_cursor.clone(),
        })
        .await?;
    assert_ne!(next.items[0].id, page.items[0].id);
    assert!(
        log.items.iter().any(|a| a.action == "api_key.create"),
        "the first run's key is audited"
    );
    h.shutdown().await;
    Ok(())
}

async fn errors_name_their_request_and_hide_internals(engine: Engine) -> anyhow::Result<()> {
    let h = Harness::start(engine).await?;
    let call = |method: reqwest::Method, path: String| {
        let (http, url) = h.raw(&path);
        let key = h.api_key.clone();
        async move {
            let resp = http
                .request(method, url)
                .header("x-api-key", key)
                .send()
                .await?;
            let id = resp
                .headers()
                .get("x-request-id")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            let status = resp.status().as_u16();
            let body: serde_json::Value = resp.json().await.unwrap_or_default();
            anyhow::Ok((status, id, body))
        }
    };
    // Every answer names its request; an error body carries the same id.
    let (status, id, body) = call(
        reqwest::Method::GET,
        format!("/v1/sandboxes/{}", SandboxId::new()),
    )
    .await?;
    let id = id.expect("x-request-id");
    assert_eq!(status, 404);
    assert_eq!(id.len(), 12);
    assert_eq!(body["error"]["request_id"], serde_json::json!(id));
    let (_, other, _) = call(reqwest::Method::GET, "/v1/me".into()).await?;
    assert!(other.is_some_and(|o| o != id), "each request its own id");

    // A host failure (in work detached from the request) reaches the client with the
    // request's id and without the host's details, which go to the log.
    let sb = h.sandbox().await?;
    h.agent.fail_next(
        SimOp::PauseSandbox,
        ErrorCode::Internal,
        "qemu: /var/lib/nestbox/agent/sandboxes/secret: broken",
    );
    let (status, id, body) = call(
        reqwest::Method::POST,
        format!("/v1/sandboxes/{}/pause", sb.id),
    )
    .await?;
    let id = id.expect("x-request-id");
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (502, Some("agent_error"))
    );
    assert_eq!(body["error"]["request_id"], serde_json::json!(id));
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains(&id), "{message}");
    assert!(
        !message.contains("/var/lib") && !message.contains("qemu"),
        "{message}"
    );
    h.shutdown().await;
    Ok(())
}

async fn rotating_tokens_replaces_both_and_a_refusal_keeps_the_old(
    engine: Engine,
) -> anyhow::Result<()> {
    let h = Harness::start(engine).await?;
    let sb = h.sandbox().await?;
    let before = h.key.get_sandbox(sb.id).await?;
    let (envd0, traffic0) = (before.envd_access_token, before.traffic_access_token);
    assert!(envd0.is_some() && traffic0.is_some());
    assert_eq!(
        h.agent.sandbox(sb.id).unwrap().request.access_token,
        envd0.clone().unwrap(),
        "the guest holds the token it was created with"
    );

    let rotated = h.key.rotate_tokens(sb.id).await?;
    assert_ne!(rotated.envd_access_token, envd0);
    assert_ne!(rotated.traffic_access_token, traffic0);
    assert_eq!(
        h.agent.sandbox(sb.id).unwrap().request.access_token,
        rotated.envd_access_token.clone().unwrap(),
        "the guest was given the new token"
    );
    // Every later read shows the new tokens.
    let again = h.key.get_sandbox(sb.id).await?;
    assert_eq!(again.envd_access_token, rotated.envd_access_token);
    assert_eq!(again.traffic_access_token, rotated.traffic_access_token);

    // A host that refuses leaves the tokens as they were.
    h.agent.fail_next(
        SimOp::RotateToken,
        ErrorCode::Internal,
        "the guest did not answer",
    );
    api_error(h.key.rotate_tokens(sb.id).await, 502, ErrorCode::AgentError);
    let kept = h.key.get_sandbox(sb.id).await?;
    assert_eq!(kept.envd_access_token, rotated.envd_access_token);
    assert_eq!(kept.traffic_access_token, rotated.traffic_access_token);

    // A paused sandbox is rotated too (its guest takes the token when it resumes); a
    // destroyed one has nothing to rotate.
    h.key.pause_sandbox(sb.id).await?;
    let while_paused = h.key.rotate_tokens(sb.id).await?;
    assert_ne!(while_paused.envd_access_token, rotated.envd_access_token);
    assert_eq!(
        h.agent.sandbox(sb.id).unwrap().request.access_token,
        while_paused.envd_access_token.clone().unwrap()
    );
    h.key.destroy_sandbox(sb.id).await?;
    api_error(
        h.key.rotate_tokens(sb.id).await,
        409,
        ErrorCode::SandboxNotRunning,
    );
    api_error(
        h.key.rotate_tokens(SandboxId::new()).await,
        404,
        ErrorCode::SandboxNotFound,
    );
    let log = h.admin.client.audit_logs(&Default::default()).await?;
    let audited: Vec<&str> = log
        .items
        .iter()
        .filter(|a| a.action == "sandbox.rotate_tokens")
        .map(|a| a.status.as_str())
        .collect();
    assert_eq!(
        audited.len(),
        3,
        "two rotations and the refusal: {audited:?}"
    );
    h.shutdown().await;
    Ok(())
}

async fn removing_a_member_or_a_key_can_rotate_the_teams_tokens(
    engine: Engine,
) -> anyhow::Result<()> {
    let h = Harness::start(engine).await?;
    let running = h.sandbox().await?;
    let paused = h.sandbox().await?;
    h.key.pause_sandbox(paused.id).await?;
    let guest_token = |id| h.agent.sandbox(id).unwrap().request.access_token;
    let (run0, paused0) = (guest_token(running.id), guest_token(paused.id));
    let delete = |path: String| {
        let (http, url) = h.raw(&path);
        http.delete(url).bearer_auth(&h.admin.token).send()
    };

    // Deleting a key without asking rotates nothing.
    let key = h.admin.client.create_api_key(h.team, "plain").await?;
    let r = delete(format!("/v1/teams/{}/api-keys/{}", h.team, key.api_key.id)).await?;
    assert_eq!(r.status().as_u16(), 204);
    assert_eq!(guest_token(running.id), run0);

    // Asking rotates every running and paused sandbox of the team.
    let key = h.admin.client.create_api_key(h.team, "leaked").await?;
    let r = delete(format!(
        "/v1/teams/{}/api-keys/{}?rotate_tokens=true",
        h.team, key.api_key.id
    ))
    .await?;
    assert_eq!(r.status().as_u16(), 204);
    let run1 = guest_token(running.id);
    assert_ne!(run1, run0, "the running sandbox got a new token");
    assert_ne!(guest_token(paused.id), paused0, "so did the paused one");
    assert_eq!(
        h.key.get_sandbox(running.id).await?.envd_access_token,
        Some(run1.clone())
    );

    // The same when a member is removed.
    let bob = h.user("rotate-bob").await?;
    h.admin
        .client
        .add_member(
            h.team,
            &nestbox_types::api::AddMemberRequest {
                email: bob.email.clone(),
                role: Some(nestbox_types::TeamRole::Member),
            },
        )
        .await?;
    let r = delete(format!(
        "/v1/teams/{}/members/{}?rotate_tokens=true",
        h.team, bob.id
    ))
    .await?;
    assert_eq!(r.status().as_u16(), 204);
    assert_ne!(guest_token(running.id), run1);
    // A bad flag is a clear error, and nothing is removed.
    let key = h.admin.client.create_api_key(h.team, "kept").await?;
    let r = delete(format!(
        "/v1/teams/{}/api-keys/{}?rotate_tokens=maybe",
        h.team, key.api_key.id
    ))
    .await?;
    assert_eq!(r.status().as_u16(), 400);
    let keys = h.admin.client.list_api_keys(h.team).await?;
    assert!(
        keys.iter().any(|k| k.id == key.api_key.id),
        "the key is still there"
    );
    h.shutdown().await;
    Ok(())
}
