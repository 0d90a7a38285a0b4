//! Crashes at random points, with real VMs: `nestbox up` is killed (SIGKILL) at a random
//! moment of a lifecycle workload — creates, execs, pauses, resumes, destroys, pool
//! refills — and started again on the same data directory, round after round.
//!
//! After every restart: no sandbox that ran before the round is lost (each runs in the
//! same VMM, with its memory), and the host holds nothing the instance does not account
//! for (every VMM process of the instance and every network slot belongs to a sandbox
//! directory). After the last round: no record is left in a transitional state, and a
//! clean stop leaves nothing of the instance on the host.
//!
//! Two more probes stop `nestbox up` with SIGTERM at random moments — of its start-up (its
//! warm-up boot, its pool refill), and of a lifecycle workload (creates with the pool
//! refills behind them, pauses, resumes, destroys, execs, requests in flight) — delete its
//! data directory, and check that it exited cleanly and that the host holds nothing of it:
//! no VMM, namespace, slot, firewall table, cgroup or guest memory.
//!
//! `NESTBOX_CRASH_ROUNDS` sets the number of rounds (default 100), `NESTBOX_CRASH_SEED`
//! the random seed (printed, for replaying a failure). The probe is bounded in time:
//! no round starts after `NESTBOX_CRASH_BUDGET_SECS` (default 600), and at least 20
//! rounds must have run by then.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;

use common::{
    Nestbox, assert_instance_clean, eventually, footprint, instance_slots, instance_vmms,
    new_sandbox, sh_ok,
};
use nestbox_client::Client;
use nestbox_types::api::{ExecRequest, SandboxListQuery};
use nestbox_types::{SandboxId, SandboxStatus};

/// xorshift64*: reproducible from its seed, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

/// Every sandbox the API lists, with its status.
async fn statuses(client: &Client) -> BTreeMap<SandboxId, SandboxStatus> {
    let page = client
        .list_sandboxes(&SandboxListQuery {
            limit: Some(200),
            ..Default::default()
        })
        .await
        .unwrap();
    page.items.into_iter().map(|s| (s.id, s.status)).collect()
}

/// One random lifecycle operation on the round's own sandboxes (never the stable ones).
async fn churn(client: &Client, rng: &mut Rng, mine: &mut Vec<SandboxId>) {
    let pick = |rng: &mut Rng, v: &Vec<SandboxId>| v[rng.below(v.len() as u64) as usize];
    match (rng.below(5), mine.is_empty()) {
        (0, _) | (_, true) if mine.len() < 3 => {
            if let Ok(sb) = client.create_sandbox(&Default::default()).await {
                mine.push(sb.id);
            }
        }
        (1, false) => {
            let _ = client.pause_sandbox(pick(rng, mine)).await;
        }
        (2, false) => {
            let _ = client.resume_sandbox(pick(rng, mine)).await;
        }
        (3, false) => {
            let id = pick(rng, mine);
            if client.destroy_sandbox(id).await.is_ok() {
                mine.retain(|x| *x != id);
            }
        }
        _ if !mine.is_empty() => {
            let id = pick(rng, mine);
            let req = ExecRequest {
                command: Some("echo busy > /tmp/busy".into()),
                ..Default::default()
            };
            let _ = client.exec(id, &req).await;
        }
        _ => {}
    }
}

/// What the instance's sandbox directories account for: VMM pids and slots.
fn accounted(data_dir: &Path) -> (BTreeSet<u32>, BTreeSet<u32>) {
    let mut pids = BTreeSet::new();
    let mut slots = BTreeSet::new();
    if let Ok(entries) = std::fs::read_dir(data_dir.join("agent/sandboxes")) {
        for e in entries.flatten() {
            let Ok(bytes) = std::fs::read(e.path().join("state.json")) else {
                continue;
            };
            let st: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
            pids.extend(st["vmm_pid"].as_u64().map(|p| p as u32));
            slots.extend(st["slot"].as_u64().map(|s| s as u32));
        }
    }
    (pids, slots)
}

/// Waits until every VMM process and slot of the instance belongs to a sandbox directory
/// (operations in flight after a restart, such as a pool refill, settle first).
async fn assert_accounted(nb: &Nestbox, round: u32) {
    let data = nb.data_dir();
    let tag = nb.tag();
    eventually(
        Duration::from_secs(60),
        &format!("round {round}: the host to hold only what the instance accounts for"),
        || async {
            let (pids, slots) = accounted(&data);
            let vmms = instance_vmms(&data);
            let held = instance_slots(&tag);
            let stray_vmms: Vec<_> = vmms.difference(&pids).collect();
            let stray_slots: Vec<_> = held.difference(&slots).collect();
            if stray_vmms.is_empty() && stray_slots.is_empty() {
                Some(())
            } else {
                eprintln!("round {round}: stray VMMs {stray_vmms:?}, stray slots {stray_slots:?}");
                None
            }
        },
    )
    .await;
}

#[tokio::test]
async fn kill_9_at_random_points_loses_no_running_sandbox_and_leaks_nothing() {
    let rounds = env_u64("NESTBOX_CRASH_ROUNDS").unwrap_or(100) as u32;
    let seed = env_u64("NESTBOX_CRASH_SEED").unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64
            | 1
    });
    eprintln!("crash probe: {rounds} rounds, seed {seed} (NESTBOX_CRASH_SEED replays it)");
    let mut rng = Rng(seed);
    let mut nb = Nestbox::up_env(&[("NESTBOX_CREATE_TIMEOUT_SECS", "15")]);
    let client = nb.client();
    // Two sandboxes that run through every round untouched by the workload.
    let mut stable = Vec::new();
    for i in 0..2 {
        let id = new_sandbox(&client).await;
        sh_ok(&client, id, &format!("echo stable-{i} > /dev/shm/mark")).await;
        stable.push((id, i, footprint(&nb, id).vmm_pid));
    }
    let mut mine: Vec<SandboxId> = Vec::new();
    let budget = Duration::from_secs(env_u64("NESTBOX_CRASH_BUDGET_SECS").unwrap_or(600));
    let started = std::time::Instant::now();
    let mut done = 0;
    for round in 0..rounds {
        if started.elapsed() > budget {
            eprintln!("time budget spent after {done} rounds");
            break;
        }
        done += 1;
        let client = nb.client();
        // The workload runs until the kill, which comes at a random moment of it.
        let kill_after = Duration::from_millis(rng.below(4000));
        let mut work_rng = Rng(rng.next() | 1);
        let mut work_ids = mine.clone();
        let work = tokio::spawn(async move {
            loop {
                churn(&client, &mut work_rng, &mut work_ids).await;
            }
        });
        tokio::time::sleep(kill_after).await;
        nb.kill();
        work.abort();
        let _ = work.await;
        nb.restart();
        let client = nb.client();

        // No sandbox that ran before the round is lost: same VMM, same memory.
        for (id, i, vmm) in &stable {
            let got = client.get_sandbox(*id).await.unwrap();
            assert_eq!(got.status, SandboxStatus::Running, "round {round}: {got:?}");
            assert_eq!(
                footprint(&nb, *id).vmm_pid,
                *vmm,
                "round {round}: {id} runs in the same VMM"
            );
            assert_eq!(
                sh_ok(&client, *id, "cat /dev/shm/mark").await.trim(),
                format!("stable-{i}"),
                "round {round}"
            );
        }
        assert_accounted(&nb, round).await;
        // The round's own sandboxes that ran or were paused carry on next round (an
        // interrupted create is the monitor's to settle, below).
        let listed = statuses(&client).await;
        mine = listed
            .iter()
            .filter(|(id, s)| {
                matches!(s, SandboxStatus::Running | SandboxStatus::Paused)
                    && !stable.iter().any(|(sid, _, _)| sid == *id)
            })
            .map(|(id, _)| *id)
            .collect();
        eprintln!(
            "round {round}: killed after {kill_after:?}; statuses {:?}",
            listed.values().collect::<Vec<_>>()
        );
    }

    assert!(
        done >= rounds.min(20),
        "only {done} rounds ran within {budget:?}"
    );

    // Creates the crashes interrupted are settled (twice the create timeout), never left
    // starting; sandboxes that ran keep running.
    let client = nb.client();
    eventually(
        Duration::from_secs(120),
        "no record to stay in a transitional state",
        || async {
            let listed = statuses(&client).await;
            let stuck: Vec<_> = listed
                .iter()
                .filter(|(_, s)| matches!(s, SandboxStatus::Pending | SandboxStatus::Starting))
                .collect();
            stuck.is_empty().then_some(())
        },
    )
    .await;
    for (id, status) in statuses(&client).await {
        if status.is_terminal() {
            continue;
        }
        if status == SandboxStatus::Running {
            sh_ok(&client, id, "true").await;
        }
        client.destroy_sandbox(id).await.unwrap();
    }
    let tag = nb.tag();
    nb.stop();
    let data = nb.data_dir();
    assert!(
        instance_vmms(&data).is_empty(),
        "a clean stop leaves no VMM behind"
    );
    assert_instance_clean(&tag);
}

#[tokio::test]
async fn sigterm_during_start_up_leaves_nothing_once_the_data_directory_is_gone() {
    let mut rng = Rng(std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1);
    for round in 0..6 {
        let dir = tempfile::Builder::new()
            .prefix("nbx-term-")
            .tempdir_in("/tmp")
            .unwrap();
        let data = dir.path().join("data");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let log = std::fs::File::create(dir.path().join("nestbox.log")).unwrap();
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_nestbox"))
            .args(["up", "--data-dir"])
            .arg(&data)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .arg("--images-dir")
            .arg(common::images_dir())
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let after = Duration::from_millis(300 + rng.below(5000));
        tokio::time::sleep(after).await;
        // The tag only exists once the agent made its directory; read it before the stop.
        let tag = eventually(Duration::from_secs(60), "the agent's directory", || async {
            data.join("agent")
                .exists()
                .then(|| common::nestbox_agent_tag(&data.join("agent")))
        })
        .await;
        // SAFETY: kill(2) on our own child process.
        unsafe {
            libc::kill(child.id() as i32, libc::SIGTERM);
        }
        let status = tokio::task::spawn_blocking(move || child.wait())
            .await
            .unwrap()
            .unwrap();
        let log = std::fs::read_to_string(dir.path().join("nestbox.log")).unwrap_or_default();
        assert!(
            status.success(),
            "round {round}: a stop {after:?} into start-up exits cleanly ({status}):\n{log}"
        );
        let vmms = instance_vmms(&data);
        drop(dir);
        assert!(vmms.is_empty(), "round {round}: VMMs left: {vmms:?}");
        assert_instance_clean(&tag);
        eprintln!("round {round}: stopped {after:?} into start-up; nothing left");
    }
}

#[tokio::test]
async fn sigterm_during_a_workload_leaves_nothing_once_the_data_directory_is_gone() {
    let seed = env_u64("NESTBOX_CRASH_SEED").unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64
            | 1
    });
    eprintln!("stop probe: seed {seed} (NESTBOX_CRASH_SEED replays it)");
    let mut rng = Rng(seed);
    for round in 0..4 {
        let mut nb = Nestbox::up();
        let tag = nb.tag();
        let data = nb.data_dir();
        let client = nb.client();
        let after = Duration::from_millis(rng.below(6000));
        let mut work_rng = Rng(rng.next() | 1);
        let work = tokio::spawn(async move {
            let mut mine = Vec::new();
            loop {
                churn(&client, &mut work_rng, &mut mine).await;
            }
        });
        tokio::time::sleep(after).await;
        // The workload goes on while the stop runs: requests arrive during the shutdown.
        let (nb, status) = tokio::task::spawn_blocking(move || {
            let status = nb.terminate();
            (nb, status)
        })
        .await
        .unwrap();
        work.abort();
        let _ = work.await;
        assert!(
            status.is_some_and(|s| s.success()),
            "round {round}: a stop {after:?} into the workload exits cleanly ({status:?}):\n{}",
            nb.log_problems()
        );
        let vmms = instance_vmms(&data);
        assert!(vmms.is_empty(), "round {round}: VMMs left: {vmms:?}");
        // (Checked before the harness's own clean-up runs.)
        assert!(
            !Path::new(&format!("/dev/shm/nestbox-{tag}")).exists(),
            "round {round}: guest memory left after a graceful stop"
        );
        drop(nb);
        assert!(!data.exists(), "the data directory is gone");
        assert_instance_clean(&tag);
        eprintln!("round {round}: stopped {after:?} into the workload; nothing left");
    }
}
