//! Background processes, terminals and directory watches, with a simulated host agent:
//! the calls reach the agent with what was asked, bad input is `400` with stable codes,
//! unknown processes are `404 process_not_found`, and a paused sandbox answers `409`.

// Tests may panic on what they expect (see clippy.toml); helpers here are not `#[test]`s.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use common::{Engine, Harness, api_error, both_engines, raw_error};
use futures::StreamExt;
use nestbox_types::ErrorCode;
use nestbox_types::api::{
    AuditLogQuery, ExecEvent, ProcessSignal, StartProcessRequest, StartTerminalRequest, WatchEvent,
    WatchQuery,
};
use serde_json::json;

both_engines!(
    processes_start_list_input_and_kill,
    process_validation_and_unknown_processes,
    terminals_and_watches,
);

fn sleeper(tag: Option<&str>) -> StartProcessRequest {
    StartProcessRequest {
        argv: Some(vec!["sleep".into(), "1000".into()]),
        tag: tag.map(String::from),
        stdin: true,
        ..Default::default()
    }
}

async fn processes_start_list_input_and_kill(engine: Engine) -> anyhow::Result<()> {
    let h = Harness::start(engine).await?;
    let sb = h.sandbox().await?;
    let p = h
        .key
        .start_process(
            sb.id,
            &StartProcessRequest {
                command: Some("tail -f /dev/null".into()),
                tag: Some("svc".into()),
                cwd: Some("/tmp".into()),
                ..Default::default()
            },
        )
        .await?;
    assert_eq!(p.tag.as_deref(), Some("svc"));
    assert_eq!(p.cmd, "/bin/sh");
    assert_eq!(p.args, ["-c", "tail -f /dev/null"]);
    assert_eq!(p.cwd.as_deref(), Some("/tmp"));
    let other = h.key.start_process(sb.id, &sleeper(None)).await?;
    let listed = h.key.list_processes(sb.id).await?;
    assert_eq!(
        listed.iter().map(|p| p.pid).collect::<Vec<_>>(),
        [p.pid, other.pid]
    );

    // A tag is unique among running processes.
    api_error(
        h.key.start_process(sb.id, &sleeper(Some("svc"))).await,
        409,
        ErrorCode::AlreadyExists,
    );

    // Input reaches the process (the simulated one replays it on attach), by tag or pid.
    h.key.send_stdin(sb.id, "svc", b"hello ").await?;
    h.key
        .send_stdin(sb.id, &p.pid.to_string(), b"world")
        .await?;
    let events: Vec<ExecEvent> = Box::pin(h.key.process_output(sb.id, "svc").await?)
        .map(|e| e.unwrap())
        .collect()
        .await;
    assert_eq!(events[0], ExecEvent::Started { pid: p.pid });
    assert_eq!(
        events[1],
        ExecEvent::Stdout {
            data: "aGVsbG8gd29ybGQ=".into()
        }
    );
    h.key.close_stdin(sb.id, "svc").await?;

    // Kill by tag, signal by pid: both end up gone.
    h.key.kill_process(sb.id, "svc").await?;
    h.key
        .signal_process(sb.id, &other.pid.to_string(), ProcessSignal::Sigterm)
        .await?;
    assert!(h.key.list_processes(sb.id).await?.is_empty());
    api_error(
        h.key.kill_process(sb.id, "svc").await,
        404,
        ErrorCode::ProcessNotFound,
    );

    // Starts are audited (the refused duplicate too), without arguments or environment.
    let audited = h
        .admin
        .client
        .audit_logs_filtered(&AuditLogQuery {
            action: Some("sandbox.process.start".into()),
            ..Default::default()
        })
        .await?
        .items;
    assert_eq!(audited.len(), 3, "{audited:?}");
    assert!(
        audited
            .iter()
            .all(|a| a.resource_id == Some(sb.id.to_string()))
    );
    assert_eq!(
        audited.iter().filter(|a| a.status == "failure").count(),
        1,
        "the duplicate tag"
    );
    let text = serde_json::to_string(&audited)?;
    assert!(
        text.contains("\"pid\"") && !text.contains("tail -f"),
        "{text}"
    );
    h.shutdown().await;
    Ok(())
}

async fn process_validation_and_unknown_processes(engine: Engine) -> anyhow::Result<()> {
    let h = Harness::start(engine).await?;
    let sb = h.sandbox().await?;
    let invalid = [
        StartProcessRequest::default(),
        StartProcessRequest {
            command: Some("true".into()),
            argv: Some(vec!["true".into()]),
            ..Default::default()
        },
        sleeper(Some("12345")),
        sleeper(Some("has space")),
        sleeper(Some("")),
        StartProcessRequest {
            user: Some("Bad;User".into()),
            ..sleeper(None)
        },
    ];
    for req in &invalid {
        api_error(
            h.key.start_process(sb.id, req).await,
            400,
            ErrorCode::InvalidRequest,
        );
    }
    // Malformed process names, in every route that takes one.
    for bad in ["0", "a%20b", "99999999999"] {
        api_error(
            h.key.kill_process(sb.id, bad).await,
            400,
            ErrorCode::InvalidRequest,
        );
        api_error(
            h.key.close_stdin(sb.id, bad).await,
            400,
            ErrorCode::InvalidRequest,
        );
    }
    // Unknown ones.
    for unknown in ["4242", "nobody-here"] {
        api_error(
            h.key.kill_process(sb.id, unknown).await,
            404,
            ErrorCode::ProcessNotFound,
        );
        api_error(
            h.key.send_stdin(sb.id, unknown, b"x").await,
            404,
            ErrorCode::ProcessNotFound,
        );
        api_error(
            h.key.process_output(sb.id, unknown).await.map(|_| ()),
            404,
            ErrorCode::ProcessNotFound,
        );
    }
    // Bodies: stdin needs exactly one of data and data_base64; signals are named.
    let p = h.key.start_process(sb.id, &sleeper(Some("target"))).await?;
    let stdin = format!("/v1/sandboxes/{}/processes/target/stdin", sb.id);
    let signal = format!("/v1/sandboxes/{}/processes/target/signal", sb.id);
    for (path, body) in [
        (&stdin, json!({})),
        (&stdin, json!({ "data": "a", "data_base64": "YQ==" })),
        (&stdin, json!({ "data_base64": "***" })),
        (&stdin, json!({ "data": "a", "extra": 1 })),
        (&signal, json!({ "signal": "SIGHUP" })),
        (&signal, json!({})),
    ] {
        let (http, url) = h.raw(path);
        let resp = http
            .post(url)
            .header("x-api-key", h.api_key.clone())
            .json(&body)
            .send()
            .await?;
        raw_error(resp, 400, ErrorCode::InvalidRequest).await?;
    }
    assert!(
        h.key
            .list_processes(sb.id)
            .await?
            .iter()
            .any(|x| x.pid == p.pid)
    );

    // A paused sandbox runs nothing.
    h.key.pause_sandbox(sb.id).await?;
    api_error(
        h.key.list_processes(sb.id).await,
        409,
        ErrorCode::SandboxNotRunning,
    );
    api_error(
        h.key.start_process(sb.id, &sleeper(None)).await,
        409,
        ErrorCode::SandboxNotRunning,
    );
    h.shutdown().await;
    Ok(())
}

async fn terminals_and_watches(engine: Engine) -> anyhow::Result<()> {
    let h = Harness::start(engine).await?;
    let sb = h.sandbox().await?;
    // A terminal runs a login shell by default, with TERM set.
    let t = h
        .key
        .start_terminal(
            sb.id,
            &StartTerminalRequest {
                tag: Some("shell".into()),
                ..Default::default()
            },
        )
        .await?;
    assert_eq!(
        (t.cmd.as_str(), t.args.as_slice()),
        ("/bin/bash", &["-l".to_string()][..])
    );
    let audited = h
        .admin
        .client
        .audit_logs_filtered(&AuditLogQuery {
            action: Some("sandbox.terminal.start".into()),
            ..Default::default()
        })
        .await?
        .items;
    assert_eq!(
        audited.len(),
        1,
        "a terminal is audited as such: {audited:?}"
    );
    for (cols, rows) in [(0, 24), (80, 0), (1001, 24)] {
        api_error(
            h.key
                .start_terminal(
                    sb.id,
                    &StartTerminalRequest {
                        cols: Some(cols),
                        rows: Some(rows),
                        ..Default::default()
                    },
                )
                .await,
            400,
            ErrorCode::InvalidRequest,
        );
    }
    // Attaching needs an existing terminal (checked before the upgrade).
    api_error(
        h.key
            .attach_terminal(sb.id, "nobody-here")
            .await
            .map(|_| ()),
        404,
        ErrorCode::ProcessNotFound,
    );

    // Watches: started first; a missing directory is file_not_found; a bad path is 400.
    let mut events = Box::pin(
        h.key
            .watch_dir(
                sb.id,
                &WatchQuery {
                    path: "/root".into(),
                    recursive: Some(true),
                    user: None,
                },
            )
            .await?,
    );
    assert_eq!(events.next().await.unwrap()?, WatchEvent::Started);
    let watch = |path: &str| WatchQuery {
        path: path.into(),
        ..Default::default()
    };
    api_error(
        h.key.watch_dir(sb.id, &watch("/nope")).await.map(|_| ()),
        404,
        ErrorCode::FileNotFound,
    );
    api_error(
        h.key.watch_dir(sb.id, &watch("")).await.map(|_| ()),
        400,
        ErrorCode::InvalidRequest,
    );
    h.shutdown().await;
    Ok(())
}
