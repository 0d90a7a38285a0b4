//! Load with real VMs: 50 sandboxes created at once from a snapshot template, then 500
//! commands run at once across them, all without an error; the latencies are printed (p50, p99, max), never asserted
//! (speed is measured, not tested). Runs alone (see `.config/nextest.toml`): it fills the
//! machine.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::{Nestbox, assert_instance_clean};
use nestbox_types::api::{CreateSandboxRequest, CreateSnapshotRequest, ExecRequest};

const SANDBOXES: usize = 50;
const EXECS: usize = 500;

/// `(p50, p99, max)` of `samples`, in milliseconds.
fn percentiles(mut samples: Vec<Duration>) -> (u128, u128, u128) {
    samples.sort();
    let at = |q: f64| {
        let i = ((samples.len() as f64 - 1.0) * q).round() as usize;
        samples[i].as_millis()
    };
    (at(0.50), at(0.99), at(1.0))
}

#[tokio::test]
async fn fifty_creates_and_five_hundred_execs_without_an_error() {
    let mut nb = Nestbox::up();
    let client = nb.client();
    // Fifty sandboxes of a team's snapshot template (256 MiB each, so that all fit this
    // machine's guest memory at once): each is a restore whose RAM pages its siblings
    // share, as a fleet of agents would start them.
    let base = client
        .create_sandbox(&CreateSandboxRequest {
            memory_mb: Some(256),
            ..Default::default()
        })
        .await
        .unwrap();
    client
        .create_snapshot(&CreateSnapshotRequest {
            sandbox_id: base.id,
            name: "load".into(),
            overwrite: false,
            kind: None,
        })
        .await
        .unwrap();
    client.destroy_sandbox(base.id).await.unwrap();
    let req = CreateSandboxRequest {
        template: Some("load".into()),
        timeout_sec: Some(1800),
        ..Default::default()
    };
    let started = Instant::now();
    let creates = (0..SANDBOXES).map(|_| {
        let (client, req) = (client.clone(), req.clone());
        tokio::spawn(async move {
            let t = Instant::now();
            let made = client.create_sandbox(&req).await;
            (made, t.elapsed())
        })
    });
    let mut ids = Vec::new();
    let mut create_times = Vec::new();
    let mut errors = Vec::new();
    for joined in futures::future::join_all(creates).await {
        let (made, took) = joined.unwrap();
        match made {
            Ok(sb) => {
                ids.push(sb.id);
                create_times.push(took);
            }
            Err(e) => errors.push(e.to_string()),
        }
    }
    let all_created = started.elapsed();
    assert!(
        errors.is_empty(),
        "{} creates failed: {errors:?}",
        errors.len()
    );
    let (p50, p99, max) = percentiles(create_times);
    println!(
        "{SANDBOXES} concurrent creates: p50 {p50} ms, p99 {p99} ms, max {max} ms, all in {} ms",
        all_created.as_millis()
    );

    let started = Instant::now();
    let execs = (0..EXECS).map(|i| {
        let client = client.clone();
        let id = ids[i % ids.len()];
        tokio::spawn(async move {
            let req = ExecRequest {
                argv: Some(vec!["echo".into(), format!("exec-{i}")]),
                ..Default::default()
            };
            let t = Instant::now();
            let ran = client.exec(id, &req).await;
            (i, ran, t.elapsed())
        })
    });
    let mut exec_times = Vec::new();
    for joined in futures::future::join_all(execs).await {
        let (i, ran, took) = joined.unwrap();
        match ran {
            Ok(r) if r.exit_code == 0 && r.stdout.trim() == format!("exec-{i}") => {
                exec_times.push(took)
            }
            Ok(r) => errors.push(format!("exec {i}: {r:?}")),
            Err(e) => errors.push(format!("exec {i}: {e}")),
        }
    }
    let all_ran = started.elapsed();
    assert!(
        errors.is_empty(),
        "{} execs failed: {errors:?}",
        errors.len()
    );
    let (p50, p99, max) = percentiles(exec_times);
    println!(
        "{EXECS} concurrent execs over {SANDBOXES} sandboxes: p50 {p50} ms, p99 {p99} ms, max {max} ms, all in {} ms",
        all_ran.as_millis()
    );

    let destroys = ids.iter().map(|id| client.destroy_sandbox(*id));
    for destroyed in futures::future::join_all(destroys).await {
        destroyed.unwrap();
    }
    let tag = nb.tag();
    nb.stop();
    assert_instance_clean(&tag);
}

/// A tenant that fills its own memory (until its guest's OOM killer acts) and its own disk
/// (until `ENOSPC`) keeps within its sandbox: a neighbour keeps answering commands all the
/// while, the filler itself recovers, and the host is left as it was.
#[tokio::test]
async fn a_tenant_filling_its_memory_and_disk_leaves_its_neighbour_serving() {
    let mut nb = Nestbox::up();
    let client = nb.client();
    let noisy = client
        .create_sandbox(&CreateSandboxRequest {
            memory_mb: Some(256),
            disk_size_mb: Some(512),
            ..Default::default()
        })
        .await
        .unwrap()
        .id;
    let quiet = client
        .create_sandbox(&CreateSandboxRequest::default())
        .await
        .unwrap()
        .id;
    let fill = {
        let client = client.clone();
        tokio::spawn(async move {
            // Memory: `tail` keeps its whole input (no newline in it) until the guest's
            // OOM killer stops it. Disk: zeros until the filesystem is full.
            let memory = common::sh(
                &client,
                noisy,
                "bash -c 'head -c 2000M /dev/zero | tail >/dev/null; echo status=${PIPESTATUS[1]}'",
            )
            .await;
            let disk = common::sh(
                &client,
                noisy,
                "dd if=/dev/zero of=$HOME/fill bs=1M 2>&1 | grep -m1 -o 'No space left on device'; df -m / | tail -1",
            )
            .await;
            (memory, disk)
        })
    };
    let mut answered = 0;
    while !fill.is_finished() {
        let out = common::sh_ok(&client, quiet, "echo still-here").await;
        assert_eq!(out.trim(), "still-here");
        answered += 1;
    }
    let (memory, disk) = fill.await.unwrap();
    println!("neighbour answered {answered} commands while the other filled itself");
    // Killed (SIGKILL) by the guest's OOM killer, not by anything of the host's.
    assert!(memory.stdout.contains("status=137"), "{memory:?}");
    assert!(
        disk.stdout.contains("No space left on device"),
        "the disk did not fill: {disk:?}"
    );
    // The filler still works, and frees what it took.
    let freed = common::sh_ok(&client, noisy, "rm $HOME/fill && sync && echo freed").await;
    assert_eq!(freed.trim(), "freed");
    for id in [noisy, quiet] {
        client.destroy_sandbox(id).await.unwrap();
    }
    let tag = nb.tag();
    nb.stop();
    assert_instance_clean(&tag);
}
