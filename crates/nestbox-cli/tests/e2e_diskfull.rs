//! The host's disk filling up under a running installation: its data directory lives on a
//! small filesystem of its own (a loop-mounted image), which the test fills to the last
//! block while sandboxes run and are paused. Creates are refused with a clear
//! `insufficient_storage` and leave no VM, network or slot behind; nothing recorded is
//! corrupted; once space is freed every sandbox carries on, and a restart finds them all.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{
    Nestbox, Options, eventually, instance_slot_holders, instance_slots, new_sandbox, sh_ok,
};
use nestbox_client::ClientError;
use nestbox_types::api::{CreateSandboxRequest, ExecRequest};
use nestbox_types::{ErrorCode, SandboxStatus};

/// An ext4 filesystem in an image file, mounted; unmounted when dropped.
struct LoopFs {
    dir: tempfile::TempDir,
    mount: PathBuf,
}

impl LoopFs {
    fn new(size_mb: u64) -> LoopFs {
        let dir = tempfile::Builder::new()
            .prefix("nbx-df-")
            .tempdir_in("/tmp")
            .unwrap();
        let image = dir.path().join("fs.img");
        let mount = dir.path().join("mnt");
        std::fs::create_dir(&mount).unwrap();
        std::fs::File::create(&image)
            .unwrap()
            .set_len(size_mb << 20)
            .unwrap();
        run(Command::new("mkfs.ext4")
            .args(["-q", "-m", "0"])
            .arg(&image));
        run(Command::new("mount")
            .args(["-o", "loop"])
            .arg(&image)
            .arg(&mount));
        LoopFs { dir, mount }
    }

    /// Fills the filesystem to its last block (again, if something freed space since);
    /// the files that hold it are named `filler-*`.
    fn fill(&self) {
        for round in 0..10 {
            let free = avail(&self.mount);
            if free < 64 << 10 {
                return;
            }
            if free > 32 << 20 {
                let _ = Command::new("fallocate")
                    .args(["-l", &(free - (16 << 20)).to_string()])
                    .arg(self.mount.join(format!("filler-{round}-big")))
                    .status();
            }
            // The last blocks, until the filesystem refuses.
            let _ = Command::new("dd")
                .args(["if=/dev/zero", "bs=4096", "status=none"])
                .arg(format!(
                    "of={}",
                    self.mount.join(format!("filler-{round}")).display()
                ))
                .status();
            let _ = Command::new("sync").status();
        }
        panic!("the filesystem does not stay full");
    }

    /// Removes the files [`LoopFs::fill`] made.
    fn unfill(&self) {
        for e in std::fs::read_dir(&self.mount).unwrap().flatten() {
            if e.file_name().to_string_lossy().starts_with("filler-") {
                std::fs::remove_file(e.path()).unwrap();
            }
        }
    }
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.mount).status();
        let _ = self.dir.path();
    }
}

/// Bytes available on the filesystem of `p`.
fn avail(p: &Path) -> u64 {
    let out = Command::new("df")
        .args(["--output=avail", "-B1"])
        .arg(p)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .nth(1)
        .and_then(|l| l.trim().parse().ok())
        .unwrap()
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Whether the sandbox directory `dir` is a pooled clone that finished starting.
fn is_pooled(dir: &Path) -> bool {
    std::fs::read(dir.join("state.json"))
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .is_some_and(|st| st["pooled"] == true)
}

fn code(err: &ClientError) -> Option<ErrorCode> {
    match err {
        ClientError::Api { body, .. } => Some(body.error.code),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_host_disk_refuses_creates_clearly_and_corrupts_nothing() {
    let fs = LoopFs::new(1536);
    // The control plane's database lives elsewhere: this is the host's disk filling.
    let db = fs.dir.path().join("nestbox.db");
    let mut nb = Nestbox::up_with(Options {
        data_dir: Some(fs.mount.join("data")),
        env: vec![
            ("DATABASE_URL".into(), format!("sqlite://{}", db.display())),
            // Paused sandboxes keep their VMM throughout (a resume in place needs no disk).
            ("NESTBOX_PAUSE_HOLD_SECS".into(), "3600".into()),
        ],
        ..Default::default()
    });
    let client = nb.client();
    let tag = nb.tag();
    let running = new_sandbox(&client).await;
    sh_ok(&client, running, "echo kept > /root/kept && sync").await;
    let paused = new_sandbox(&client).await;
    sh_ok(&client, paused, "echo kept > /root/kept && sync").await;
    client.pause_sandbox(paused).await.unwrap();
    // Its snapshot is copied to disk in the background: let that finish first.
    let durable = nb
        .data_dir()
        .join("agent/sandboxes")
        .join(paused.to_string())
        .join("snapshot/snapshot.json");
    eventually(
        Duration::from_secs(120),
        "the paused snapshot on disk",
        || async { durable.exists().then_some(()) },
    )
    .await;
    let later = new_sandbox(&client).await;
    let slots = instance_slots(&tag);

    fs.fill();
    // A pause needs no new disk space (its snapshot is on the memory filesystem): it
    // happens, and is recorded, and its snapshot copied to disk, once space is back.
    client.pause_sandbox(later).await.unwrap();

    // A create is refused clearly, and leaves nothing on the host. (One that takes over a
    // clone the pool had started needs no new space, and succeeds.)
    let mut taken = Vec::new();
    let err = loop {
        fs.fill();
        match client
            .create_sandbox(&CreateSandboxRequest::default())
            .await
        {
            Ok(sb) => {
                assert!(taken.len() < 2, "creates keep succeeding on a full disk");
                taken.push(sb.id);
            }
            Err(e) => break e,
        }
    };
    assert_eq!(code(&err), Some(ErrorCode::InsufficientStorage), "{err}");
    assert!(
        !err.to_string().contains('/'),
        "a host path reached the tenant: {err}"
    );
    // (A pooled clone may have gone meanwhile, and the pool may be trying to start another,
    // which gives its network back if it fails on the full disk, or is pooled if the space
    // a failed create gave back was enough for it: no other network may stay.)
    let sandboxes = nb.data_dir().join("agent/sandboxes");
    eventually(
        Duration::from_secs(60),
        "no network beyond those held before the disk filled, the takers' and the pool's",
        || async {
            let strays: Vec<_> = instance_slot_holders(&tag)
                .into_iter()
                .filter(|(slot, holder)| {
                    !slots.contains(slot)
                        && !taken.iter().any(|t| t.to_string() == *holder)
                        && !is_pooled(&sandboxes.join(holder))
                })
                .collect();
            if !strays.is_empty() {
                eprintln!("networks still held: {strays:?}");
            }
            strays.is_empty().then_some(())
        },
    )
    .await;
    let failed = client
        .list_sandboxes(&Default::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|s| ![running, paused, later].contains(&s.id) && !taken.contains(&s.id))
        .collect::<Vec<_>>();
    assert!(
        !failed.is_empty() && failed.iter().all(|s| s.status == SandboxStatus::Error),
        "a failed create is recorded as failed: {failed:?}"
    );
    // A resume needs no new disk space (its snapshot is whole on the memory filesystem).
    client.resume_sandbox(paused).await.unwrap();
    assert_eq!(
        sh_ok(&client, paused, "cat /root/kept").await.trim(),
        "kept"
    );
    // (The resume freed its disk copy: full again first.)
    fs.fill();
    // A running guest that writes is stopped by its VMM rather than lose the write; its
    // requests are answered clearly meanwhile.
    let stopped = eventually(
        Duration::from_secs(120),
        "the writer stopped by the full disk",
        || async {
            let exec = client
                .exec(
                    running,
                    &ExecRequest {
                        command: Some(
                            "dd if=/dev/urandom of=/root/more bs=1M count=64 && sync".into(),
                        ),
                        timeout_sec: Some(15),
                        ..Default::default()
                    },
                )
                .await;
            match exec {
                Err(e) if code(&e) == Some(ErrorCode::InsufficientStorage) => Some(e),
                _ => None,
            }
        },
    )
    .await;
    assert!(!stopped.to_string().contains('/'), "{stopped}");

    // Space comes back: everything carries on.
    fs.unfill();
    let again = eventually(
        Duration::from_secs(120),
        "a create after space came back",
        || async {
            client
                .create_sandbox(&CreateSandboxRequest::default())
                .await
                .ok()
        },
    )
    .await;
    // The paused sandbox's snapshot copy, which failed, is made again.
    let durable = nb
        .data_dir()
        .join("agent/sandboxes")
        .join(later.to_string())
        .join("snapshot/snapshot.json");
    eventually(
        Duration::from_secs(180),
        "the failed snapshot copy made again",
        || async { durable.exists().then_some(()) },
    )
    .await;
    client.resume_sandbox(later).await.unwrap();
    let all: Vec<_> = [running, paused, later, again.id]
        .into_iter()
        .chain(taken)
        .collect();
    for &id in &all {
        let ok = eventually(
            Duration::from_secs(60),
            "the sandbox answering again",
            || async {
                client
                    .exec(
                        id,
                        &ExecRequest {
                            command: Some("echo ok".into()),
                            ..Default::default()
                        },
                    )
                    .await
                    .inspect_err(|e| eprintln!("{id} not answering yet: {e}"))
                    .ok()
            },
        )
        .await;
        assert_eq!(ok.stdout.trim(), "ok", "{id}");
    }
    assert_eq!(
        sh_ok(&client, running, "cat /root/kept").await.trim(),
        "kept"
    );

    // Nothing recorded was damaged: a restart finds every sandbox.
    nb.restart();
    let client = nb.client();
    for &id in &all {
        let sb = client.get_sandbox(id).await.unwrap();
        if sb.status == SandboxStatus::Paused {
            client.resume_sandbox(id).await.unwrap();
        }
        assert_eq!(
            sh_ok(&client, id, "echo ok").await.trim(),
            "ok",
            "{id} after a restart"
        );
    }
    assert_eq!(
        sh_ok(&client, running, "cat /root/kept").await.trim(),
        "kept"
    );
    for &id in &all {
        client.destroy_sandbox(id).await.unwrap();
    }
    nb.stop();
    drop(nb);
    drop(fs);
}
