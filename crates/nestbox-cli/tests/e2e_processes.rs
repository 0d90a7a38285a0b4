//! A user's session with long-running work in a real microVM: background processes that
//! outlive their clients, stdin, kill by tag, a terminal over a WebSocket that survives a
//! detach, directory watches — and another team reaches none of it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use common::{Nestbox, eventually, md, sh_ok};
use futures::{Stream, StreamExt};
use nestbox_client::{Client, TerminalFrame, TerminalReader};
use nestbox_types::api::{
    CreateSandboxRequest, ExecEvent, StartProcessRequest, StartTerminalRequest,
    TerminalServerMessage, WatchEvent, WatchQuery,
};
use nestbox_types::{ErrorCode, SandboxId};

/// How long anything below may take before the test fails.
const LIMIT: Duration = Duration::from_secs(60);

/// Reads process output until `stdout` collected so far satisfies `done`; returns it.
async fn read_stdout_until<S>(events: &mut S, what: &str, done: impl Fn(&str) -> bool) -> String
where
    S: Stream<Item = Result<ExecEvent, nestbox_client::ClientError>> + Unpin,
{
    let mut text = String::new();
    let read = async {
        while let Some(ev) = events.next().await {
            match ev.unwrap() {
                ExecEvent::Stdout { data } => {
                    text.push_str(&String::from_utf8_lossy(&B64.decode(data).unwrap()));
                    if done(&text) {
                        return;
                    }
                }
                ExecEvent::Error { code, message } => panic!("{what}: {code}: {message}"),
                _ => {}
            }
        }
        panic!("{what}: the stream ended; got {text:?}");
    };
    tokio::time::timeout(LIMIT, read)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"));
    text
}

/// Reads terminal output until it contains `needle`.
async fn read_terminal_until(reader: &mut TerminalReader, needle: &str) -> String {
    let mut screen = String::new();
    let read = async {
        while let Some(frame) = reader.next().await {
            match frame.unwrap() {
                TerminalFrame::Output(bytes) => {
                    screen.push_str(&String::from_utf8_lossy(&bytes));
                    if screen.contains(needle) {
                        return;
                    }
                }
                TerminalFrame::Control(TerminalServerMessage::Error { code, message }) => {
                    panic!("terminal error {code}: {message}")
                }
                TerminalFrame::Control(_) => {}
            }
        }
        panic!("the terminal closed before {needle:?}; screen: {screen:?}");
    };
    tokio::time::timeout(LIMIT, read)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {needle:?}; screen: {screen:?}"));
    screen
}

/// The largest `tick-N` number in `text`.
fn last_tick(text: &str) -> u64 {
    text.split("tick-")
        .skip(1)
        .filter_map(|rest| {
            rest.split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse()
                .ok()
        })
        .max()
        .unwrap_or(0)
}

/// A client of a second team (its own user and API key).
async fn other_team(nb: &Nestbox) -> Client {
    let key = common::other_team_key(nb, "other@example.com").await;
    nb.anonymous().with_api_key(key)
}

async fn create(nb: &Nestbox) -> SandboxId {
    nb.client()
        .create_sandbox(&CreateSandboxRequest::default())
        .await
        .unwrap_or_else(|e| panic!("create: {e}\n{}", nb.log_tail()))
        .id
}

#[tokio::test]
async fn background_processes_and_terminals() {
    let nb = Nestbox::up();
    let client = nb.client();
    let id = create(&nb).await;

    // A background process with a tag of our choosing.
    let ticker = client
        .start_process(
            id,
            &StartProcessRequest {
                command: Some(
                    "i=0; while true; do i=$((i+1)); echo tick-$i; sleep 0.2; done".into(),
                ),
                tag: Some("ticker".into()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(ticker.tag.as_deref(), Some("ticker"));
    assert!(ticker.pid > 0);

    // Watch it, then go away.
    let mut output = Box::pin(client.process_output(id, "ticker").await.unwrap());
    let seen = read_stdout_until(&mut output, "first ticks", |t| last_tick(t) >= 1).await;
    let before = last_tick(&seen);
    drop(output);

    // It still runs, and reconnecting (by pid this time) shows new output.
    let listed = client.list_processes(id).await.unwrap();
    assert!(
        listed
            .iter()
            .any(|p| p.pid == ticker.pid && p.tag.as_deref() == Some("ticker")),
        "{listed:?}"
    );
    let mut output = Box::pin(
        client
            .process_output(id, &ticker.pid.to_string())
            .await
            .unwrap(),
    );
    read_stdout_until(&mut output, "new ticks", |t| last_tick(t) > before).await;

    // Kill by tag: its stream ends with an exit, and it is gone.
    client.kill_process(id, "ticker").await.unwrap();
    let exit = tokio::time::timeout(LIMIT, async {
        while let Some(ev) = output.next().await {
            if let ExecEvent::Exit { exit_code, .. } = ev.unwrap() {
                return exit_code;
            }
        }
        panic!("the output ended without an exit");
    })
    .await
    .expect("exit after kill");
    assert_eq!(exit, 128 + 9);
    eventually(LIMIT, "the killed process to leave the list", || async {
        let list = client.list_processes(id).await.unwrap();
        list.iter().all(|p| p.pid != ticker.pid).then_some(())
    })
    .await;
    let gone = client.kill_process(id, "ticker").await.unwrap_err();
    assert_eq!(gone.code(), Some(ErrorCode::ProcessNotFound), "{gone}");
    let gone = client.process_output(id, "999999").await.err().unwrap();
    assert_eq!(gone.code(), Some(ErrorCode::ProcessNotFound), "{gone}");
    let bad = client.kill_process(id, "not a tag").await.unwrap_err();
    assert_eq!(bad.code(), Some(ErrorCode::InvalidRequest), "{bad}");

    // Stdin: what we send comes back; closing stdin ends `cat`.
    let cat = client
        .start_process(
            id,
            &StartProcessRequest {
                argv: Some(vec!["cat".into()]),
                tag: Some("cat".into()),
                stdin: true,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let mut output = Box::pin(client.process_output(id, "cat").await.unwrap());
    client
        .send_stdin(id, "cat", b"hello through stdin\n")
        .await
        .unwrap();
    read_stdout_until(&mut output, "stdin echoed", |t| {
        t.contains("hello through stdin")
    })
    .await;
    client.close_stdin(id, &cat.pid.to_string()).await.unwrap();
    let exit = tokio::time::timeout(LIMIT, async {
        while let Some(ev) = output.next().await {
            if let ExecEvent::Exit { exit_code, .. } = ev.unwrap() {
                return exit_code;
            }
        }
        panic!("no exit after closing stdin");
    })
    .await
    .expect("cat exits");
    assert_eq!(exit, 0);

    // A terminal with size, env and cwd, over a WebSocket.
    let shell = client
        .start_terminal(
            id,
            &StartTerminalRequest {
                cols: Some(80),
                rows: Some(24),
                env: md(&[("NBX_WHERE", "in-a-pty")]),
                cwd: Some("/tmp".into()),
                tag: Some("shell".into()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let term = client.attach_terminal(id, "shell").await.unwrap();
    let (mut writer, mut reader) = (term.writer, term.reader);
    match reader.next().await.unwrap().unwrap() {
        TerminalFrame::Control(TerminalServerMessage::Attached { pid }) => {
            assert_eq!(pid, shell.pid)
        }
        other => panic!("first frame: {other:?}"),
    }
    writer
        .input(b"echo $((6*7))-$NBX_WHERE-$(pwd)\n")
        .await
        .unwrap();
    let screen = read_terminal_until(&mut reader, "42-in-a-pty-/tmp").await;
    assert!(
        screen.contains("echo $((6*7))"),
        "the terminal echoes what is typed: {screen:?}"
    );
    writer.resize(123, 45).await.unwrap();
    writer.input(b"stty size\n").await.unwrap();
    read_terminal_until(&mut reader, "45 123").await;
    writer.input(b"PS1='nbx-prompt> '\n").await.unwrap();
    read_terminal_until(&mut reader, "nbx-prompt> ").await;

    // Detach: close the socket. The shell keeps running.
    writer.close().await.unwrap();
    drop(reader);
    let listed = client.list_processes(id).await.unwrap();
    assert!(listed.iter().any(|p| p.pid == shell.pid), "{listed:?}");

    // Reattach by pid; a newline brings the prompt back.
    let term = client
        .attach_terminal(id, &shell.pid.to_string())
        .await
        .unwrap();
    let (mut writer, mut reader) = (term.writer, term.reader);
    writer.input(b"\n").await.unwrap();
    read_terminal_until(&mut reader, "nbx-prompt> ").await;

    // A bad control message is answered, and the socket stays usable.
    writer.resize(0, 0).await.unwrap();
    let answered = tokio::time::timeout(LIMIT, async {
        loop {
            match reader.next().await.unwrap().unwrap() {
                TerminalFrame::Control(TerminalServerMessage::Error { code, .. }) => return code,
                _ => continue,
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(answered, ErrorCode::InvalidRequest);

    // Another team reaches none of it.
    let other = other_team(&nb).await;
    let code = |r: Result<(), nestbox_client::ClientError>| r.err().and_then(|e| e.code());
    assert_eq!(
        [
            code(other.list_processes(id).await.map(|_| ())),
            code(other.kill_process(id, "shell").await),
            code(other.send_stdin(id, "shell", b"exit\n").await),
            code(other.process_output(id, "shell").await.map(|_| ())),
            code(other.attach_terminal(id, "shell").await.map(|_| ())),
            code(
                other
                    .start_process(
                        id,
                        &StartProcessRequest {
                            command: Some("true".into()),
                            ..Default::default()
                        }
                    )
                    .await
                    .map(|_| ())
            ),
        ],
        [Some(ErrorCode::SandboxNotFound); 6]
    );

    // Kill from the terminal: the exit arrives, then the socket closes.
    writer.kill().await.unwrap();
    let exit = tokio::time::timeout(LIMIT, async {
        while let Some(frame) = reader.next().await {
            if let TerminalFrame::Control(TerminalServerMessage::Exit { exit_code }) =
                frame.unwrap()
            {
                return exit_code;
            }
        }
        panic!("the terminal closed without an exit");
    })
    .await
    .unwrap();
    assert_eq!(exit, 128 + 9);

    // The CLI: `sandbox ps` lists a tagged process, `sandbox kill` ends it by tag.
    client
        .start_process(
            id,
            &StartProcessRequest {
                argv: Some(vec!["sleep".into(), "1000".into()]),
                tag: Some("victim".into()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let sid = id.to_string();
    let ps = nb.cli(&["sandbox", "ps", &sid]);
    let listing = String::from_utf8_lossy(&ps.stdout);
    assert!(
        ps.status.success(),
        "{}",
        String::from_utf8_lossy(&ps.stderr)
    );
    assert!(
        listing.contains("victim") && listing.contains("sleep 1000"),
        "{listing}"
    );
    let kill = nb.cli(&["sandbox", "kill", &sid, "victim"]);
    assert!(
        kill.status.success(),
        "{}",
        String::from_utf8_lossy(&kill.stderr)
    );
    eventually(
        LIMIT,
        "the killed process to leave `sandbox ps`",
        || async {
            let ps = nb.cli(&["sandbox", "ps", &sid]);
            (!String::from_utf8_lossy(&ps.stdout).contains("victim")).then_some(())
        },
    )
    .await;
    let again = nb.cli(&["sandbox", "kill", &sid, "victim"]);
    assert!(!again.status.success());
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("process_not_found"),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );

    client.destroy_sandbox(id).await.unwrap();
}

/// Reads watch events until `want` arrives.
async fn wait_for<S>(events: &mut S, want: WatchEvent, seen: &mut Vec<WatchEvent>)
where
    S: Stream<Item = Result<WatchEvent, nestbox_client::ClientError>> + Unpin,
{
    let found = tokio::time::timeout(LIMIT, async {
        while let Some(ev) = events.next().await {
            let ev = ev.unwrap();
            seen.push(ev.clone());
            if ev == want {
                return true;
            }
        }
        false
    })
    .await;
    assert!(matches!(found, Ok(true)), "no {want:?} among {seen:?}");
}

#[tokio::test]
async fn watching_a_directory() {
    let nb = Nestbox::up();
    let client = nb.client();
    let id = create(&nb).await;
    sh_ok(&client, id, "mkdir -p /srv/watched").await;

    let missing = client
        .watch_dir(
            id,
            &WatchQuery {
                path: "/srv/nope".into(),
                ..Default::default()
            },
        )
        .await
        .err()
        .unwrap();
    assert_eq!(missing.code(), Some(ErrorCode::FileNotFound), "{missing}");

    let events = client
        .watch_dir(
            id,
            &WatchQuery {
                path: "/srv/watched".into(),
                recursive: Some(true),
                user: None,
            },
        )
        .await
        .unwrap();
    let mut events = Box::pin(events);
    let first = tokio::time::timeout(LIMIT, events.next()).await.unwrap();
    assert_eq!(first.unwrap().unwrap(), WatchEvent::Started);

    let mut seen = Vec::new();
    sh_ok(&client, id, "echo one > /srv/watched/a.txt").await;
    wait_for(
        &mut events,
        WatchEvent::Create {
            name: "a.txt".into(),
        },
        &mut seen,
    )
    .await;
    wait_for(
        &mut events,
        WatchEvent::Write {
            name: "a.txt".into(),
        },
        &mut seen,
    )
    .await;
    sh_ok(&client, id, "echo two >> /srv/watched/a.txt").await;
    wait_for(
        &mut events,
        WatchEvent::Write {
            name: "a.txt".into(),
        },
        &mut seen,
    )
    .await;
    sh_ok(&client, id, "mv /srv/watched/a.txt /srv/watched/b.txt").await;
    wait_for(
        &mut events,
        WatchEvent::Rename {
            name: "a.txt".into(),
        },
        &mut seen,
    )
    .await;
    wait_for(
        &mut events,
        WatchEvent::Create {
            name: "b.txt".into(),
        },
        &mut seen,
    )
    .await;
    sh_ok(&client, id, "rm /srv/watched/b.txt").await;
    wait_for(
        &mut events,
        WatchEvent::Remove {
            name: "b.txt".into(),
        },
        &mut seen,
    )
    .await;
    // Recursive: a new subdirectory is watched too.
    sh_ok(&client, id, "mkdir /srv/watched/sub").await;
    wait_for(
        &mut events,
        WatchEvent::Create { name: "sub".into() },
        &mut seen,
    )
    .await;
    sh_ok(&client, id, "echo deep > /srv/watched/sub/c.txt").await;
    wait_for(
        &mut events,
        WatchEvent::Create {
            name: "sub/c.txt".into(),
        },
        &mut seen,
    )
    .await;

    // Another team cannot watch.
    let other = other_team(&nb).await;
    let refused = other
        .watch_dir(
            id,
            &WatchQuery {
                path: "/srv/watched".into(),
                ..Default::default()
            },
        )
        .await
        .err()
        .unwrap();
    assert_eq!(
        refused.code(),
        Some(ErrorCode::SandboxNotFound),
        "{refused}"
    );

    drop(events);
    client.destroy_sandbox(id).await.unwrap();
}

#[tokio::test]
async fn a_terminal_outpacing_its_client_stays_usable() {
    let nb = Nestbox::up();
    let client = nb.client();
    let id = create(&nb).await;
    let shell = client
        .start_terminal(
            id,
            &StartTerminalRequest {
                tag: Some("flood".into()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let term = client.attach_terminal(id, "flood").await.unwrap();
    let (mut writer, mut reader) = (term.writer, term.reader);
    // Far more output than any buffer on the way holds, while the client reads nothing.
    writer
        .input(b"head -c 8000000 /dev/zero | tr '\\0' x; echo; echo flood-$((40+2)); touch /tmp/flooded\n")
        .await
        .unwrap();
    eventually(LIMIT, "the flood to finish in the sandbox", || async {
        let r = common::sh(&client, id, "test -f /tmp/flooded").await;
        (r.exit_code == 0).then_some(())
    })
    .await;
    // Now read: either everything arrives, or the attachment was cut off with a retryable
    // `busy` error — never a hang, never silently missing bytes.
    let outcome = tokio::time::timeout(LIMIT, async {
        let mut tail = String::new();
        while let Some(frame) = reader.next().await {
            match frame.unwrap() {
                TerminalFrame::Output(bytes) => {
                    tail.push_str(&String::from_utf8_lossy(&bytes));
                    if tail.contains("flood-42") {
                        return Ok(());
                    }
                    let keep = tail.len().saturating_sub(64);
                    tail.drain(..keep);
                }
                TerminalFrame::Control(TerminalServerMessage::Error { code, .. }) => {
                    return Err(code);
                }
                TerminalFrame::Control(_) => {}
            }
        }
        panic!("the terminal closed without an error");
    })
    .await
    .expect("the buffered output drains");
    eprintln!("flood outcome: {outcome:?}");
    if let Err(code) = outcome {
        assert_eq!(code, ErrorCode::Busy);
    }
    drop(writer);
    drop(reader);

    // The terminal is unharmed: reattach and use it.
    let term = client
        .attach_terminal(id, &shell.pid.to_string())
        .await
        .unwrap();
    let (mut writer, mut reader) = (term.writer, term.reader);
    writer.input(b"echo alive-$((1+1))\n").await.unwrap();
    read_terminal_until(&mut reader, "alive-2").await;
    client.destroy_sandbox(id).await.unwrap();
}

#[tokio::test]
async fn the_cli_shell_types_into_a_sandbox_and_detaches() {
    use std::io::Write as _;
    use std::process::{Command, Stdio};

    let nb = Nestbox::up();
    let client = nb.client();
    let id = create(&nb).await;
    // `script` gives the CLI a terminal of its own, as a user's would be.
    let shell = format!(
        "{} sandbox shell {id} --tag cli-shell",
        env!("CARGO_BIN_EXE_nestbox")
    );
    let mut child = Command::new("script")
        .args(["-q", "-e", "-c", &shell, "/dev/null"])
        .env("NESTBOX_URL", &nb.url)
        .env("NESTBOX_API_KEY", &nb.api_key)
        .env("NESTBOX_CONFIG", nb.dir.path().join("cli.toml"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    // A command, then Ctrl-] to detach.
    stdin
        .write_all(b"touch /tmp/typed-in-the-cli-shell\n\x1d")
        .unwrap();
    stdin.flush().unwrap();
    let status = eventually(LIMIT, "the CLI shell to detach and exit", || {
        let status = child.try_wait().unwrap();
        async move { status }
    })
    .await;
    drop(stdin);
    let output = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(status.success(), "{text}");
    assert!(text.contains("detached"), "{text}");
    eventually(LIMIT, "the typed command to have run", || async {
        let r = common::sh(&client, id, "test -f /tmp/typed-in-the-cli-shell").await;
        (r.exit_code == 0).then_some(())
    })
    .await;
    // Detached, not ended: the shell is still there to attach to.
    let listed = client.list_processes(id).await.unwrap();
    assert!(
        listed.iter().any(|p| p.tag.as_deref() == Some("cli-shell")),
        "{listed:?}"
    );
    client.destroy_sandbox(id).await.unwrap();
}
