//! A user's session with real microVMs: create, run commands, move files, destroy, and
//! nothing is left on the host.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use common::{Nestbox, assert_gone, assert_instance_clean, footprint, md, sh, sh_ok};
use futures::StreamExt;
use nestbox_types::api::{
    CreateSandboxRequest, Encoding, ExecEvent, ExecRequest, SandboxListQuery,
};
use nestbox_types::{ErrorCode, SandboxStatus};
use sha2::Digest;

#[tokio::test]
async fn create_exec_files_list_destroy() {
    let mut nb = Nestbox::up();
    let client = nb.client();

    // Create with env and metadata; it runs when the call returns.
    let sb = client
        .create_sandbox(&CreateSandboxRequest {
            env: md(&[("GREETING", "hello from nestbox")]),
            metadata: md(&[("purpose", "e2e"), ("owner", "ci")]),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("create: {e}\n{}", nb.log_tail()));
    assert_eq!(sb.status, SandboxStatus::Running);
    assert_eq!(sb.disk_size_mb, 5120, "default disk size");
    let id = sb.id;
    let fp = footprint(&nb, id);

    // A pipeline through sh -c.
    let out = sh_ok(&client, id, "printf 'b\\na\\nc\\n' | sort | tr -d '\\n'").await;
    assert_eq!(out, "abc");
    // A non-zero exit.
    let r = sh(&client, id, "echo oops >&2; exit 7").await;
    assert_eq!(r.exit_code, 7);
    assert_eq!(r.stderr.trim(), "oops");
    // Binary output comes back intact (base64 when it is not UTF-8).
    let r = sh(&client, id, "printf '\\000\\001\\377\\376binary'").await;
    assert_eq!(r.stdout_encoding, Encoding::Base64);
    assert_eq!(B64.decode(&r.stdout).unwrap(), b"\x00\x01\xff\xfebinary");
    // Sandbox env, request env and cwd.
    let r = client
        .exec(
            id,
            &ExecRequest {
                command: Some("echo \"$GREETING|$EXTRA|$(pwd)\"".into()),
                env: md(&[("EXTRA", "per-call")]),
                cwd: Some("/tmp".into()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(r.stdout.trim(), "hello from nestbox|per-call|/tmp");
    // argv without a shell; the guest sees the requested disk size.
    let r = client
        .exec(
            id,
            &ExecRequest {
                argv: Some(vec!["df".into(), "-m".into(), "/".into()]),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let size_mb: u64 = r
        .stdout
        .lines()
        .nth(1)
        .unwrap()
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        size_mb > 4500,
        "the root filesystem fills the 5 GiB disk: {}",
        r.stdout
    );
    // A command as another user.
    let r = client
        .exec(
            id,
            &ExecRequest {
                command: Some("id -un".into()),
                user: Some("user".into()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(r.stdout.trim(), "user");
    // Streaming: events arrive, then the exit.
    let mut events = Box::pin(
        client
            .exec_stream(
                id,
                &ExecRequest {
                    command: Some("for i in 1 2 3; do echo $i; done; exit 3".into()),
                    ..Default::default()
                },
            )
            .await
            .unwrap(),
    );
    let mut stdout = Vec::new();
    let mut exit = None;
    while let Some(ev) = events.next().await {
        match ev.unwrap() {
            ExecEvent::Stdout { data } => stdout.extend(B64.decode(data).unwrap()),
            ExecEvent::Exit { exit_code, .. } => exit = Some(exit_code),
            ExecEvent::Error { code, message } => panic!("stream error {code}: {message}"),
            _ => {}
        }
    }
    assert_eq!(String::from_utf8(stdout).unwrap(), "1\n2\n3\n");
    assert_eq!(exit, Some(3));
    // A timeout kills the command.
    let r = client
        .exec(
            id,
            &ExecRequest {
                command: Some("sleep 30".into()),
                timeout_sec: Some(1),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert!(r.timed_out);

    // 10 MB up and down with matching checksums.
    let data: Vec<u8> = (0..10 * 1024 * 1024u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let want = hex::encode(sha2::Sha256::digest(&data));
    let entry = client
        .upload(
            id,
            "/home/user/data/blob.bin",
            reqwest::Body::from(data.clone()),
            Some(data.len() as u64),
        )
        .await
        .unwrap();
    assert_eq!(entry.size, data.len() as u64);
    let inside = sh_ok(
        &client,
        id,
        "sha256sum /home/user/data/blob.bin | cut -d' ' -f1",
    )
    .await;
    assert_eq!(inside.trim(), want, "the guest sees the uploaded bytes");
    let (size, mut stream) = client
        .download(id, "/home/user/data/blob.bin")
        .await
        .unwrap();
    assert_eq!(size, Some(data.len() as u64));
    let mut got = Vec::new();
    while let Some(chunk) = stream.next().await {
        got.extend_from_slice(&chunk.unwrap());
    }
    assert_eq!(hex::encode(sha2::Sha256::digest(&got)), want);
    // Listing, stat, mkdir, remove.
    client.mkdir(id, "/home/user/data/sub/dir").await.unwrap();
    let listed = client
        .list_files(id, "/home/user/data", Some(2))
        .await
        .unwrap();
    let paths: Vec<&str> = listed.iter().map(|e| e.path.as_str()).collect();
    assert!(paths.contains(&"/home/user/data/blob.bin"), "{paths:?}");
    assert!(paths.contains(&"/home/user/data/sub/dir"), "{paths:?}");
    client.remove(id, "/home/user/data/blob.bin").await.unwrap();
    let err = client
        .stat(id, "/home/user/data/blob.bin")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::FileNotFound));

    // List with filters.
    let page = client
        .list_sandboxes(&SandboxListQuery {
            metadata: Some("purpose=e2e".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(
        page.items.iter().map(|s| s.id).collect::<Vec<_>>(),
        vec![id]
    );
    let none = client
        .list_sandboxes(&SandboxListQuery {
            metadata: Some("purpose=other".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(none.items.is_empty());

    // Destroy: gone from the host, stopped in the API, and a second destroy is harmless.
    client.destroy_sandbox(id).await.unwrap();
    assert_gone(&nb, &fp, id);
    assert_eq!(
        client.get_sandbox(id).await.unwrap().status,
        SandboxStatus::Stopped
    );
    client.destroy_sandbox(id).await.unwrap();
    let err = sh_err(&client, id).await;
    assert_eq!(err, ErrorCode::SandboxNotRunning);

    let tag = nb.tag();
    nb.stop();
    assert_instance_clean(&tag);
}

async fn sh_err(client: &nestbox_client::Client, id: nestbox_types::SandboxId) -> ErrorCode {
    client
        .exec(
            id,
            &ExecRequest {
                command: Some("true".into()),
                ..Default::default()
            },
        )
        .await
        .unwrap_err()
        .code()
        .unwrap()
}
