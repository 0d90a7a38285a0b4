//! Pause and resume with real VMs: processes, tmpfs files and memory survive; the
//! inactivity timeout pauses (never stops); paused sandboxes survive agent restarts and
//! crashes; a paused sandbox's held VMM (the fast resume) can die or be let go without
//! losing anything; running, held and pooled VMMs carry on through a crash or an upgrade
//! of the agent.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{Nestbox, assert_gone, eventually, footprint, new_sandbox, sh, sh_ok, vmm_alive};
use nestbox_client::Client;
use nestbox_types::api::{CreateSandboxRequest, ExecRequest};
use nestbox_types::{ErrorCode, SandboxId, SandboxStatus};

/// Starts a counter loop writing to tmpfs and a note in memory; returns the loop's pid.
async fn start_state(client: &Client, id: SandboxId) -> u32 {
    sh_ok(client, id, "echo 'kept in memory' > /dev/shm/note").await;
    let pid = sh_ok(
        client,
        id,
        // Written to a side file and renamed: a reader never sees it half-written.
        "nohup sh -c 'i=0; while true; do i=$((i+1)); echo $i > /dev/shm/counter.tmp; mv /dev/shm/counter.tmp /dev/shm/counter; sleep 0.2; done' >/dev/null 2>&1 & echo $!",
    )
    .await;
    let pid: u32 = pid.trim().parse().unwrap();
    eventually(Duration::from_secs(30), "the counter to start", || async {
        let r = sh(client, id, "cat /dev/shm/counter").await;
        (r.exit_code == 0).then_some(())
    })
    .await;
    pid
}

async fn counter(client: &Client, id: SandboxId) -> u64 {
    sh_ok(client, id, "cat /dev/shm/counter")
        .await
        .trim()
        .parse()
        .unwrap()
}

/// Asserts the state made by [`start_state`] survived and the loop still runs.
async fn assert_state_survived(client: &Client, id: SandboxId, pid: u32, before: u64) {
    assert_eq!(
        sh_ok(client, id, "cat /dev/shm/note").await.trim(),
        "kept in memory"
    );
    let alive = sh_ok(client, id, &format!("kill -0 {pid} && echo alive")).await;
    assert_eq!(
        alive.trim(),
        "alive",
        "the process started before the pause still runs"
    );
    let after = eventually(
        Duration::from_secs(30),
        "the counter to move on",
        || async {
            let c = counter(client, id).await;
            (c > before).then_some(c)
        },
    )
    .await;
    assert!(after > before);
    // The guest's clock was resynced: within a few seconds of the host's.
    let guest: i64 = sh_ok(client, id, "date +%s").await.trim().parse().unwrap();
    let host = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!(
        (guest - host).abs() <= 5,
        "guest clock {guest} vs host {host}"
    );
}

async fn pause_resume_round_trip(nb: &Nestbox, req: CreateSandboxRequest) {
    let client = nb.client();
    let sb = client.create_sandbox(&req).await.unwrap();
    let id = sb.id;
    let pid = start_state(&client, id).await;
    let before = counter(&client, id).await;

    let paused = client.pause_sandbox(id).await.unwrap();
    assert_eq!(paused.status, SandboxStatus::Paused);
    assert_eq!(
        client.get_sandbox(id).await.unwrap().status,
        SandboxStatus::Paused
    );
    // A paused sandbox runs nothing and refuses work.
    let err = client
        .exec(
            id,
            &ExecRequest {
                command: Some("true".into()),
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::SandboxNotRunning));
    let err = client.pause_sandbox(id).await.unwrap_err();
    assert_eq!(err.status().map(|s| s.as_u16()), Some(409), "{err}");

    let resumed = client.resume_sandbox(id).await.unwrap();
    assert_eq!(resumed.status, SandboxStatus::Running);
    let err = client.resume_sandbox(id).await.unwrap_err();
    assert_eq!(err.status().map(|s| s.as_u16()), Some(409), "{err}");
    assert_state_survived(&client, id, pid, before).await;

    // And a second round trip.
    let before = counter(&client, id).await;
    client.pause_sandbox(id).await.unwrap();
    client.resume_sandbox(id).await.unwrap();
    assert_state_survived(&client, id, pid, before).await;
    client.destroy_sandbox(id).await.unwrap();
}

#[tokio::test]
async fn pause_and_resume_keep_processes_files_and_memory() {
    let nb = Nestbox::up();
    // The default machine restores from the warm snapshot (its RAM is a private mapping);
    // another size boots (its RAM is a file of its own): both must pause and resume.
    pause_resume_round_trip(&nb, CreateSandboxRequest::default()).await;
    pause_resume_round_trip(
        &nb,
        CreateSandboxRequest {
            memory_mb: Some(384),
            ..Default::default()
        },
    )
    .await;
}

#[tokio::test]
async fn inactivity_pauses_and_pings_keep_a_sandbox_alive() {
    let nb = Nestbox::up();
    let client = nb.client();
    let sb = client
        .create_sandbox(&CreateSandboxRequest {
            timeout_sec: Some(4),
            ..Default::default()
        })
        .await
        .unwrap();
    // Activity (pings) keeps it running well past its timeout.
    for _ in 0..8 {
        client.ping_sandbox(sb.id).await.unwrap();
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let r = sh(&client, sb.id, "echo still here").await;
    assert_eq!(r.stdout.trim(), "still here");
    // Left alone, it is paused — recorded as paused, never stopped.
    eventually(
        Duration::from_secs(90),
        "the sandbox to be auto-paused",
        || async {
            let s = client.get_sandbox(sb.id).await.unwrap();
            assert_ne!(
                s.status,
                SandboxStatus::Stopped,
                "an inactive sandbox is paused, not stopped"
            );
            (s.status == SandboxStatus::Paused).then_some(())
        },
    )
    .await;
    client.resume_sandbox(sb.id).await.unwrap();
    assert_eq!(sh_ok(&client, sb.id, "echo back").await.trim(), "back");
    client.destroy_sandbox(sb.id).await.unwrap();
}

#[tokio::test]
async fn paused_sandboxes_survive_restarts_and_crashes() {
    let mut nb = Nestbox::up();
    let client = nb.client();
    let a = client
        .create_sandbox(&CreateSandboxRequest::default())
        .await
        .unwrap()
        .id;
    let pid = start_state(&client, a).await;
    let before = counter(&client, a).await;
    client.pause_sandbox(a).await.unwrap();

    // A clean restart: the paused sandbox is still there and resumes.
    nb.restart();
    let client = nb.client();
    assert_eq!(
        client.get_sandbox(a).await.unwrap().status,
        SandboxStatus::Paused
    );
    client.resume_sandbox(a).await.unwrap();
    assert_state_survived(&client, a, pid, before).await;

    // A crash: the paused sandbox is adopted again.
    let before = counter(&client, a).await;
    client.pause_sandbox(a).await.unwrap();
    nb.kill();
    nb.restart();
    let client = nb.client();
    client.resume_sandbox(a).await.unwrap();
    assert_state_survived(&client, a, pid, before).await;
    client.destroy_sandbox(a).await.unwrap();
}

#[tokio::test]
async fn a_crash_in_the_middle_of_a_pause_leaves_a_consistent_state() {
    let mut nb = Nestbox::up();
    let client = nb.client();
    let a = client
        .create_sandbox(&CreateSandboxRequest {
            memory_mb: Some(384),
            ..Default::default()
        })
        .await
        .unwrap()
        .id;
    sh_ok(&client, a, "echo data > /dev/shm/note").await;
    let pausing = tokio::spawn({
        let client = client.clone();
        async move { client.pause_sandbox(a).await }
    });
    // Kill the platform while the pause is in flight (the database already says paused).
    eventually(
        Duration::from_secs(30),
        "the pause to be recorded",
        || async {
            let s = client.get_sandbox(a).await.ok()?;
            (s.status == SandboxStatus::Paused).then_some(())
        },
    )
    .await;
    nb.kill();
    let _ = pausing.await;
    nb.restart();
    let client = nb.client();
    // Either the pause completed (paused, and it resumes with its memory) or it did not
    // (lost: error) — never running without a VM.
    let status = eventually(
        Duration::from_secs(60),
        "the monitor to settle the sandbox",
        || async {
            let s = client.get_sandbox(a).await.ok()?;
            assert_ne!(s.status, SandboxStatus::Running, "running without a VM");
            matches!(s.status, SandboxStatus::Paused | SandboxStatus::Error).then_some(s.status)
        },
    )
    .await;
    // The database may still say paused before the monitor's first pass; a resume then
    // either brings it back with its memory or finds it lost (and records that at once).
    let status = match status {
        SandboxStatus::Paused => match client.resume_sandbox(a).await {
            Ok(_) => SandboxStatus::Running,
            Err(e) => {
                assert!(
                    e.to_string().contains("lost by its host"),
                    "a failed resume says why: {e}"
                );
                client.get_sandbox(a).await.unwrap().status
            }
        },
        other => other,
    };
    if status == SandboxStatus::Running {
        assert_eq!(sh_ok(&client, a, "cat /dev/shm/note").await.trim(), "data");
    } else {
        assert_eq!(status, SandboxStatus::Error, "a lost sandbox is marked");
        // Nothing of it is left on the host.
        let dir = nb.data_dir().join("agent/sandboxes").join(a.to_string());
        assert!(!dir.exists(), "{} left", dir.display());
    }
    client.destroy_sandbox(a).await.unwrap();
}

#[tokio::test]
async fn a_held_vmm_that_dies_or_is_let_go_leaves_a_whole_snapshot() {
    let nb = Nestbox::up_env(&[("NESTBOX_PAUSE_HOLD_SECS", "4")]);
    let client = nb.client();
    let a = new_sandbox(&client).await;
    let pid = start_state(&client, a).await;

    // Paused, it keeps its VMM (stopped) and network for a while; that VMM dies.
    let before = counter(&client, a).await;
    client.pause_sandbox(a).await.unwrap();
    let fp = footprint(&nb, a);
    assert!(
        vmm_alive(fp.vmm_pid, &fp.vmm_name),
        "a paused sandbox holds its VMM"
    );
    // SAFETY: a VMM of this test's sandbox, checked just above.
    unsafe {
        libc::kill(fp.vmm_pid as i32, libc::SIGKILL);
    }
    eventually(Duration::from_secs(30), "the VMM to be gone", || async {
        (!vmm_alive(fp.vmm_pid, &fp.vmm_name)).then_some(())
    })
    .await;
    assert_eq!(
        client.get_sandbox(a).await.unwrap().status,
        SandboxStatus::Paused
    );
    client.resume_sandbox(a).await.unwrap();
    assert_state_survived(&client, a, pid, before).await;

    // Paused again and left alone past the hold time: the VMM and the network are let
    // go, then its memory leaves tmpfs; the sandbox stays paused on its snapshot on disk
    // and resumes from it.
    let before = counter(&client, a).await;
    client.pause_sandbox(a).await.unwrap();
    let fp = footprint(&nb, a);
    let state = fp.sandbox_dir.join("state.json");
    eventually(
        Duration::from_secs(60),
        "the held VMM to be let go",
        || async {
            let st: serde_json::Value =
                serde_json::from_slice(&std::fs::read(&state).unwrap()).unwrap();
            (st["vmm_pid"].is_null()
                && st["slot"].is_null()
                && !vmm_alive(fp.vmm_pid, &fp.vmm_name))
            .then_some(())
        },
    )
    .await;
    // Its memory leaves tmpfs too (the disk copy is whole): the resume below restores
    // from disk.
    let fast = fp.mem_dir.join("snapshot");
    eventually(
        Duration::from_secs(60),
        "the tmpfs copy to be freed",
        || async { (!fast.exists()).then_some(()) },
    )
    .await;
    assert!(fp.sandbox_dir.join("snapshot/snapshot.json").is_file());
    let slot_file = std::path::Path::new("/run/nestbox/slots").join(fp.slot.to_string());
    assert!(
        !std::fs::read_to_string(&slot_file)
            .unwrap_or_default()
            .contains(&a.to_string()),
        "the paused sandbox's slot is free"
    );
    assert_eq!(
        client.get_sandbox(a).await.unwrap().status,
        SandboxStatus::Paused
    );
    client.resume_sandbox(a).await.unwrap();
    assert_state_survived(&client, a, pid, before).await;

    // Destroyed while paused with its VMM held: nothing of it is left.
    client.pause_sandbox(a).await.unwrap();
    let fp = footprint(&nb, a);
    assert!(vmm_alive(fp.vmm_pid, &fp.vmm_name), "held again");
    client.destroy_sandbox(a).await.unwrap();
    assert_gone(&nb, &fp, a);
}

/// The pooled clones the instance holds: their VMM pids.
fn pooled_vmms(nb: &Nestbox) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir(nb.data_dir().join("agent/sandboxes")) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .filter_map(|e| std::fs::read(e.path().join("state.json")).ok())
        .filter_map(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .filter(|st| st["pooled"] == true && st["phase"] == "running")
        .filter_map(|st| st["vmm_pid"].as_u64().map(|p| p as u32))
        .collect()
}

#[tokio::test]
async fn agent_crashes_and_upgrades_keep_sandboxes_running() {
    let mut nb = Nestbox::up_env(&[("NESTBOX_PAUSE_HOLD_SECS", "3600")]);
    let client = nb.client();
    // A running sandbox with a process and memory state…
    let a = new_sandbox(&client).await;
    let pid_a = start_state(&client, a).await;
    // …a paused one holding its VMM (stopped, for a fast resume)…
    let b = new_sandbox(&client).await;
    let pid_b = start_state(&client, b).await;
    let before_b = counter(&client, b).await;
    client.pause_sandbox(b).await.unwrap();
    // …and a pooled clone waiting for the next create.
    let pooled = eventually(Duration::from_secs(120), "a pooled clone", || async {
        let p = pooled_vmms(&nb);
        (!p.is_empty()).then_some(p)
    })
    .await;
    let (fa, fb) = (footprint(&nb, a), footprint(&nb, b));
    assert!(vmm_alive(fb.vmm_pid, &fb.vmm_name), "b holds its VMM");
    // Every VMM runs under QEMU's seccomp filter.
    for pid in [fa.vmm_pid, fb.vmm_pid] {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        assert!(status.lines().any(|l| l == "Seccomp:\t2"), "{status}");
    }

    // A crash: the VMMs run on without their agent, and the next start takes them back.
    let before_a = counter(&client, a).await;
    nb.kill();
    assert!(
        vmm_alive(fa.vmm_pid, &fa.vmm_name),
        "a's VMM outlives the crash"
    );
    nb.restart();
    let client = nb.client();
    let got = client.get_sandbox(a).await.unwrap();
    assert_eq!(got.status, SandboxStatus::Running, "{got:?}");
    assert_eq!(
        footprint(&nb, a).vmm_pid,
        fa.vmm_pid,
        "a runs in the same VMM"
    );
    assert_state_survived(&client, a, pid_a, before_a).await;
    assert_eq!(
        client.get_sandbox(b).await.unwrap().status,
        SandboxStatus::Paused
    );
    assert_eq!(
        footprint(&nb, b).vmm_pid,
        fb.vmm_pid,
        "b still holds its VMM"
    );
    assert!(vmm_alive(fb.vmm_pid, &fb.vmm_name));
    let still = pooled_vmms(&nb);
    assert!(
        pooled.iter().all(|p| still.contains(p)),
        "pooled clones stay pooled: {pooled:?} then {still:?}"
    );
    // A create takes one of them over.
    let c = new_sandbox(&client).await;
    let fc = footprint(&nb, c);
    assert!(
        pooled.contains(&fc.vmm_pid),
        "the create took over a pooled clone ({} not in {pooled:?})",
        fc.vmm_pid
    );
    sh_ok(&client, c, "echo 'on c' > /dev/shm/c").await;

    // An upgrade: the platform stops for a restart (SIGUSR2) and a new binary starts on
    // the same data directory; running, held and pooled VMMs carry on.
    let upgraded = nb.dir.path().join("nestbox-upgraded");
    std::fs::copy(env!("CARGO_BIN_EXE_nestbox"), &upgraded).unwrap();
    let before_a = counter(&client, a).await;
    nb.upgrade_to(&upgraded);
    let client = nb.client();
    for (id, fp) in [(a, &fa), (c, &fc)] {
        assert_eq!(
            client.get_sandbox(id).await.unwrap().status,
            SandboxStatus::Running
        );
        assert_eq!(
            footprint(&nb, id).vmm_pid,
            fp.vmm_pid,
            "{id} runs in the same VMM"
        );
    }
    assert_state_survived(&client, a, pid_a, before_a).await;
    assert_eq!(sh_ok(&client, c, "cat /dev/shm/c").await.trim(), "on c");
    // b resumes in its held VMM, with its memory and processes.
    assert_eq!(
        footprint(&nb, b).vmm_pid,
        fb.vmm_pid,
        "b still holds its VMM"
    );
    client.resume_sandbox(b).await.unwrap();
    assert_eq!(footprint(&nb, b).vmm_pid, fb.vmm_pid, "b resumed in place");
    assert_state_survived(&client, b, pid_b, before_b).await;

    for id in [a, b, c] {
        let fp = footprint(&nb, id);
        client.destroy_sandbox(id).await.unwrap();
        assert_gone(&nb, &fp, id);
    }
}
