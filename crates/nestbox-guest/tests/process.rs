//! `process.Process`: starting commands, their output, input, signals, deadlines, and
//! reattaching to running processes — through the typed client and as raw Connect JSON.

// Helpers of these tests unwrap like the tests do.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashMap;
use std::time::Duration;

use base64::Engine as _;
use common::{Guest, TOKEN, collect, command, is_root, sh, wait_for};
use futures::StreamExt;
use nestbox_envd::process::{
    ProcessInput, ProcessSelector, Pty, Signal, process_event, process_input, pty,
};
use nestbox_envd::types::InitRequest;

const LIMIT: Duration = Duration::from_secs(20);

fn stdin(data: &[u8]) -> ProcessInput {
    ProcessInput {
        input: Some(process_input::Input::Stdin(data.to_vec().into())),
    }
}

#[tokio::test]
async fn runs_a_command_with_args_env_and_cwd() {
    let guest = Guest::with_token(TOKEN).await;
    let client = guest.client(Some(TOKEN));
    client
        .init(&InitRequest {
            env_vars: Some(
                [
                    ("FROM_INIT".to_owned(), "init".to_owned()),
                    ("OVERRIDDEN".to_owned(), "init".to_owned()),
                ]
                .into(),
            ),
            ..InitRequest::default()
        })
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut request = command(
        "/bin/sh",
        &[
            "-c",
            r#"printf '%s|' "$1" "$FROM_INIT" "$OVERRIDDEN" "$PATH" "$HOME"; pwd"#,
            "sh",
            "first arg",
        ],
    );
    let config = request.process.as_mut().unwrap();
    config.envs = HashMap::from([("OVERRIDDEN".to_owned(), "request".to_owned())]);
    config.cwd = Some(dir.path().to_str().unwrap().to_owned());
    let out = collect(client.start(request).await.unwrap(), LIMIT).await;
    assert!(out.error.is_none(), "{:?}", out.error);
    let text = String::from_utf8(out.stdout).unwrap();
    let fields: Vec<&str> = text.split('|').collect();
    assert_eq!(fields[0], "first arg");
    assert_eq!(fields[1], "init");
    assert_eq!(fields[2], "request");
    assert!(fields[3].contains("/usr/bin"), "{text}");
    assert!(fields[4].starts_with('/'), "{text}");
    assert_eq!(fields[5].trim_end(), dir.path().to_str().unwrap());
    let end = out.end.unwrap();
    assert_eq!(
        (end.exit_code, end.exited, end.status.as_str()),
        (0, true, "exit status 0")
    );
    assert!(out.pid > 0);
}

#[tokio::test]
async fn runs_a_pipeline_and_reports_failures() {
    let guest = Guest::with_token(TOKEN).await;
    let client = guest.client(Some(TOKEN));
    let out = collect(
        client
            .start(sh(
                "printf 'b\\na\\nc\\n' | sort | tr a-z A-Z; echo oops >&2; exit 3",
            ))
            .await
            .unwrap(),
        LIMIT,
    )
    .await;
    assert_eq!(out.stdout, b"A\nB\nC\n");
    assert_eq!(out.stderr, b"oops\n");
    let end = out.end.unwrap();
    assert_eq!((end.exit_code, end.exited), (3, true));
    assert_eq!(end.status, "exit status 3");

    // A program that does not exist fails the call itself.
    let out = collect(
        client
            .start(command("/no/such/program", &[]))
            .await
            .unwrap(),
        LIMIT,
    )
    .await;
    let err = out.error.expect("an error");
    assert!(err.is_not_found(), "{err}");
    let out = collect(
        client
            .start({
                let mut r = sh("true");
                r.process.as_mut().unwrap().cwd = Some("/no/such/dir".into());
                r
            })
            .await
            .unwrap(),
        LIMIT,
    )
    .await;
    assert!(out.error.expect("an error").is_invalid_argument());
}

#[tokio::test]
async fn binary_output_is_intact() {
    let guest = Guest::with_token(TOKEN).await;
    let dir = tempfile::tempdir().unwrap();
    let all: Vec<u8> = (0..=255u8).cycle().take(256 * 1024).collect();
    let file = dir.path().join("all-bytes");
    std::fs::write(&file, &all).unwrap();
    let out = collect(
        guest
            .client(Some(TOKEN))
            .start(command("/bin/cat", &[file.to_str().unwrap()]))
            .await
            .unwrap(),
        LIMIT,
    )
    .await;
    assert_eq!(out.stdout.len(), all.len());
    assert!(out.stdout == all, "output differs");
}

#[tokio::test]
async fn stdin_can_be_sent_streamed_and_closed() {
    let guest = Guest::with_token(TOKEN).await;
    let client = guest.client(Some(TOKEN));
    let mut request = command("/bin/cat", &[]);
    request.stdin = Some(true);
    let mut events = client.start(request).await.unwrap();
    let mut out = common::Outcome::default();
    common::apply(&mut out, events.next().await.unwrap().unwrap());
    let pid = ProcessSelector::pid(out.pid);

    client
        .send_input(pid.clone(), stdin(b"hello\n"))
        .await
        .unwrap();
    while out.stdout != b"hello\n" {
        let event = tokio::time::timeout(LIMIT, events.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        common::apply(&mut out, event);
    }
    let chunks = futures::stream::iter([stdin(b"one "), stdin(b"two "), stdin(b"three\n")]);
    client.stream_input(pid.clone(), chunks).await.unwrap();
    client.close_stdin(pid.clone()).await.unwrap();
    let rest = collect(events, LIMIT).await;
    assert_eq!(rest.stdout, b"one two three\n");
    assert_eq!(rest.end.unwrap().exit_code, 0);

    // Input to a process without stdin, or to one that is gone, fails cleanly.
    let mut events = client.start(sh("sleep 30")).await.unwrap();
    let mut out = common::Outcome::default();
    common::apply(&mut out, events.next().await.unwrap().unwrap());
    let err = client
        .send_input(ProcessSelector::pid(out.pid), stdin(b"x"))
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        nestbox_envd::connect::Code::FailedPrecondition,
        "{err}"
    );
    client
        .send_signal(ProcessSelector::pid(out.pid), Signal::Sigkill)
        .await
        .unwrap();
    collect(events, LIMIT).await;
    let err = client
        .send_input(ProcessSelector::pid(out.pid), stdin(b"x"))
        .await
        .unwrap_err();
    assert!(err.is_not_found(), "{err}");
}

#[tokio::test]
async fn sigkill_ends_the_process_and_its_group() {
    let guest = Guest::with_token(TOKEN).await;
    let client = guest.client(Some(TOKEN));
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("child-pid");
    // The shell starts a child in its group and waits.
    let script = format!("sleep 30 & echo $! > {}; wait", marker.display());
    let mut events = client.start(sh(&script)).await.unwrap();
    let mut out = common::Outcome::default();
    common::apply(&mut out, events.next().await.unwrap().unwrap());
    let child: i32 = wait_for(LIMIT, "the child's pid", || async {
        std::fs::read_to_string(&marker).ok()?.trim().parse().ok()
    })
    .await;

    let listed = client.list().await.unwrap();
    assert!(listed.iter().any(|p| p.pid == out.pid));
    client
        .send_signal(ProcessSelector::pid(out.pid), Signal::Sigkill)
        .await
        .unwrap();
    let rest = collect(events, LIMIT).await;
    let end = rest.end.unwrap();
    assert_eq!(end.status, "signal: killed");
    assert_eq!((end.exit_code, end.exited), (-1, false));
    // The grandchild was in the group, so it is gone too.
    wait_for(LIMIT, "the grandchild to die", || async {
        let alive = nix::sys::signal::kill(nix::unistd::Pid::from_raw(child), None).is_ok()
            && !std::fs::read_to_string(format!("/proc/{child}/stat"))
                .unwrap_or_default()
                .contains(") Z ");
        (!alive).then_some(())
    })
    .await;
    assert!(
        !client
            .list()
            .await
            .unwrap()
            .iter()
            .any(|p| p.pid == out.pid)
    );
    let err = client
        .send_signal(ProcessSelector::pid(out.pid), Signal::Sigterm)
        .await
        .unwrap_err();
    assert!(err.is_not_found(), "{err}");
}

#[tokio::test]
async fn a_process_outlives_its_stream_and_can_be_reattached_by_tag() {
    let guest = Guest::with_token(TOKEN).await;
    let client = guest.client(Some(TOKEN));
    let mut request = sh("i=0; while true; do echo tick $i; i=$((i+1)); sleep 0.05; done");
    request.tag = Some("ticker".into());
    let mut events = client.start(request.clone()).await.unwrap();
    let mut first = common::Outcome::default();
    while first.stdout.is_empty() {
        let event = tokio::time::timeout(LIMIT, events.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        common::apply(&mut first, event);
    }
    // Tags are unique while the process runs.
    let dup = collect(client.start(request).await.unwrap(), LIMIT).await;
    assert!(dup.error.expect("an error").is_already_exists());

    drop(events);
    let listed = client.list().await.unwrap();
    let info = listed
        .iter()
        .find(|p| p.tag.as_deref() == Some("ticker"))
        .expect("listed");
    assert_eq!(info.pid, first.pid);
    assert_eq!(info.config.as_ref().unwrap().cmd, "/bin/sh");

    let mut attached = client
        .connect(ProcessSelector::tag("ticker"))
        .await
        .unwrap();
    let mut again = common::Outcome::default();
    while !String::from_utf8_lossy(&again.stdout).contains("tick") {
        let event = tokio::time::timeout(LIMIT, attached.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        common::apply(&mut again, event);
    }
    assert_eq!(again.pid, first.pid);
    client
        .send_signal(ProcessSelector::tag("ticker"), Signal::Sigterm)
        .await
        .unwrap();
    let rest = collect(attached, LIMIT).await;
    assert_eq!(rest.end.unwrap().status, "signal: terminated");
    let err = client.connect(ProcessSelector::tag("ticker")).await;
    let err = match err {
        Err(e) => e,
        Ok(stream) => collect(stream, LIMIT).await.error.expect("an error"),
    };
    assert!(err.is_not_found(), "{err}");
}

#[tokio::test]
async fn the_deadline_kills_the_process() {
    let guest = Guest::with_token(TOKEN).await;
    let client = guest.client(Some(TOKEN));
    let started = std::time::Instant::now();
    let events = client
        .with_timeout(Duration::from_millis(500))
        .start(sh("echo started; sleep 30"))
        .await
        .unwrap();
    let out = collect(events, LIMIT).await;
    assert!(started.elapsed() < Duration::from_secs(15));
    assert_eq!(out.stdout, b"started\n");
    assert_eq!(out.end.expect("an end event").status, "signal: killed");
    assert!(out.error.expect("an error").is_deadline_exceeded());
    assert!(
        !client
            .list()
            .await
            .unwrap()
            .iter()
            .any(|p| p.pid == out.pid)
    );
}

#[tokio::test]
async fn runs_as_another_user() {
    if !is_root() {
        eprintln!("skipped: switching users needs root");
        return;
    }
    let guest = Guest::with_token(TOKEN).await;
    let client = guest.client(Some(TOKEN)).as_user("nobody").unwrap();
    let out = collect(
        client
            .start(sh("id -un; id -u; echo $HOME $USER; pwd"))
            .await
            .unwrap(),
        LIMIT,
    )
    .await;
    let text = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], "nobody", "{text}");
    assert_ne!(lines[1], "0");
    assert!(lines[2].ends_with("nobody"), "{text}");

    let err = guest
        .client(Some(TOKEN))
        .as_user("no-such-user-here")
        .unwrap()
        .start(sh("true"))
        .await
        .unwrap();
    let err = collect(err, LIMIT).await.error.expect("an error");
    assert!(err.is_unauthenticated(), "{err}");
}

#[tokio::test]
async fn switching_users_needs_root() {
    if is_root() {
        eprintln!("skipped: only meaningful when not root");
        return;
    }
    let guest = Guest::with_token(TOKEN).await;
    let client = guest.client(Some(TOKEN)).as_user("root").unwrap();
    let out = collect(client.start(sh("true")).await.unwrap(), LIMIT).await;
    assert!(out.error.expect("an error").is_permission_denied());
}

#[tokio::test]
async fn a_pty_process_gets_a_terminal_and_resizes() {
    let guest = Guest::with_token(TOKEN).await;
    let client = guest.client(Some(TOKEN));
    let mut request = sh("tty; stty size; read line; echo got $line; stty size");
    request.pty = Some(Pty {
        size: Some(pty::Size {
            cols: 100,
            rows: 30,
        }),
    });
    let mut events = client.start(request).await.unwrap();
    let mut out = common::Outcome::default();
    while !String::from_utf8_lossy(&out.pty).contains("30 100") {
        let event = tokio::time::timeout(LIMIT, events.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        common::apply(&mut out, event);
    }
    assert!(
        String::from_utf8_lossy(&out.pty).contains("/dev/pts/"),
        "{:?}",
        out.pty
    );
    let pid = ProcessSelector::pid(out.pid);
    client
        .update(
            pid.clone(),
            Some(Pty {
                size: Some(pty::Size {
                    cols: 120,
                    rows: 40,
                }),
            }),
        )
        .await
        .unwrap();
    client
        .send_input(
            pid,
            ProcessInput {
                input: Some(process_input::Input::Pty(b"hi\n".to_vec().into())),
            },
        )
        .await
        .unwrap();
    let rest = collect(events, LIMIT).await;
    let text = String::from_utf8_lossy(&rest.pty);
    assert!(text.contains("got hi"), "{text}");
    assert!(text.contains("40 120"), "{text}");
    assert_eq!(rest.end.unwrap().exit_code, 0);
}

/// What E2B's JS SDK sends: Connect JSON, envelopes, basic-auth user, keep-alive header.
#[tokio::test]
async fn speaks_connect_json_like_the_e2b_sdk() {
    let guest = Guest::with_token(TOKEN).await;
    let http = reqwest::Client::new();
    let body = serde_json::json!({
        "process": {"cmd": "/bin/sh", "args": ["-c", "printf 'hi\\001\\377'; exit 7"], "envs": {}},
        "stdin": false
    });
    let payload = serde_json::to_vec(&body).unwrap();
    let mut frame = vec![0u8];
    frame.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    frame.extend_from_slice(&payload);
    let user = if is_root() {
        "root".to_owned()
    } else {
        whoami()
    };
    let response = http
        .post(guest.url("/process.Process/Start"))
        .header("content-type", "application/connect+json")
        .header("connect-protocol-version", "1")
        .header("connect-timeout-ms", "60000")
        .header("keepalive-ping-interval", "50")
        .header("x-access-token", TOKEN)
        .header(
            "authorization",
            nestbox_envd::auth::basic_user_header(&user),
        )
        .body(frame)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers()["content-type"],
        "application/connect+json"
    );
    let bytes = response.bytes().await.unwrap();
    let mut frames = Vec::new();
    let mut rest = &bytes[..];
    while !rest.is_empty() {
        let flags = rest[0];
        let len = u32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]) as usize;
        let json: serde_json::Value = serde_json::from_slice(&rest[5..5 + len]).unwrap();
        frames.push((flags, json));
        rest = &rest[5 + len..];
    }
    assert!(
        frames[0].1["event"]["start"]["pid"].as_u64().unwrap() > 0,
        "{frames:?}"
    );
    let stdout: Vec<u8> = frames
        .iter()
        .filter_map(|(_, f)| f["event"]["data"]["stdout"].as_str())
        .flat_map(|b64| {
            base64::engine::general_purpose::STANDARD
                .decode(b64)
                .unwrap()
        })
        .collect();
    assert_eq!(stdout, b"hi\x01\xff");
    let end = frames
        .iter()
        .find_map(|(_, f)| f["event"].get("end").cloned())
        .expect("end event");
    assert_eq!(end["exitCode"], 7);
    assert_eq!(end["exited"], true);
    assert_eq!(end["status"], "exit status 7");
    let (flags, last) = frames.last().unwrap();
    assert_eq!(*flags, 2);
    assert!(last.get("error").is_none(), "{last}");

    // Unary JSON: List, and a Connect error with its HTTP status.
    let response = http
        .post(guest.url("/process.Process/List"))
        .header("content-type", "application/json")
        .header("x-access-token", TOKEN)
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let list: serde_json::Value = response.json().await.unwrap();
    assert!(list.is_object(), "{list}");
    let response = http
        .post(guest.url("/process.Process/SendSignal"))
        .header("content-type", "application/json")
        .header("x-access-token", TOKEN)
        .body(r#"{"process":{"pid":4000000},"signal":"SIGNAL_SIGKILL"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 404);
    let err: serde_json::Value = response.json().await.unwrap();
    assert_eq!(err["code"], "not_found");

    // Compressed requests are refused with a clear code.
    let response = http
        .post(guest.url("/process.Process/List"))
        .header("content-type", "application/json")
        .header("content-encoding", "gzip")
        .header("x-access-token", TOKEN)
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 501);
    let err: serde_json::Value = response.json().await.unwrap();
    assert_eq!(err["code"], "unimplemented");
}

fn whoami() -> String {
    let uid = nix::unistd::geteuid();
    nix::unistd::User::from_uid(uid)
        .ok()
        .flatten()
        .map(|u| u.name)
        .unwrap_or_else(|| "root".into())
}

#[tokio::test]
async fn idle_streams_get_keepalives() {
    let guest = Guest::with_token(TOKEN).await;
    let http = reqwest::Client::new();
    let payload = br#"{"process":{"cmd":"/bin/sh","args":["-c","sleep 2.5"]}}"#;
    let mut frame = vec![0u8];
    frame.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    frame.extend_from_slice(payload);
    let response = http
        .post(guest.url("/process.Process/Start"))
        .header("content-type", "application/connect+json")
        .header("keepalive-ping-interval", "1")
        .header("x-access-token", TOKEN)
        .body(frame)
        .send()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&response.bytes().await.unwrap()).into_owned();
    assert!(text.contains(r#"{"event":{"keepalive":{}}}"#), "{text}");
    assert!(text.contains(r#""end""#), "{text}");
}

#[tokio::test]
async fn list_reports_running_processes() {
    let guest = Guest::with_token(TOKEN).await;
    let client = guest.client(Some(TOKEN));
    let mut request = sh("sleep 30");
    request.tag = Some("sleeper".into());
    request.process.as_mut().unwrap().envs = HashMap::from([("K".into(), "V".into())]);
    let events = client.start(request).await.unwrap();
    let info = wait_for(LIMIT, "the process in the list", || async {
        client
            .list()
            .await
            .unwrap()
            .into_iter()
            .find(|p| p.tag.as_deref() == Some("sleeper"))
    })
    .await;
    let config = info.config.unwrap();
    assert_eq!(config.args, vec!["-c", "sleep 30"]);
    assert_eq!(config.envs["K"], "V");
    client
        .send_signal(ProcessSelector::tag("sleeper"), Signal::Sigkill)
        .await
        .unwrap();
    let out = collect(events, LIMIT).await;
    assert!(matches!(
        out.end,
        Some(process_event::EndEvent { exited: false, .. })
    ));
}
