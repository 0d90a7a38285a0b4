//! Sandbox metrics with real VMs: live samples while a sandbox runs, the stored ones once
//! it is paused (by the user or by its inactivity timeout), nothing once it is destroyed,
//! and nothing for another team. Sandbox logs with real VMs: the console, the guest
//! agent's structured lines and the host's events, through pause and resume.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{Nestbox, eventually, sh_ok};
use nestbox_client::Client;
use nestbox_types::api::{
    CreateSandboxRequest, LogDirection, LogEntry, LogLevel, LogsQuery, MetricPoint, Sandbox,
};
use nestbox_types::{ErrorCode, SandboxStatus};

/// Asserts a point describes a VM of `sb`'s size.
fn assert_plausible(p: &MetricPoint, sb: &Sandbox) {
    let memory = u64::from(sb.memory_mb) << 20;
    assert!(
        p.mem_bytes > 0 && p.mem_bytes < memory,
        "rss {} of a {} MiB sandbox",
        p.mem_bytes,
        sb.memory_mb
    );
    assert!(p.disk_bytes > 0, "disk {}", p.disk_bytes);
    let max_cpu = 100.0 * f64::from(sb.vcpus);
    assert!(
        (0.0..=max_cpu).contains(&p.cpu_pct),
        "cpu {} of {} vCPUs",
        p.cpu_pct,
        sb.vcpus
    );
}

/// A client of a second team.
async fn other_team(nb: &Nestbox) -> Client {
    let key = common::other_team_key(nb, "metrics-other@example.com").await;
    nb.anonymous().with_api_key(key)
}

#[tokio::test]
async fn metrics_follow_a_sandbox_through_pause_and_destroy() {
    let nb = Nestbox::up();
    let client = nb.client();
    let sb = client
        .create_sandbox(&CreateSandboxRequest::default())
        .await
        .unwrap();

    // Some work, so the disk and the CPU have something to show.
    sh_ok(
        &client,
        sb.id,
        "dd if=/dev/urandom of=/root/blob bs=1M count=8 2>/dev/null && sync && echo ok",
    )
    .await;
    let live = eventually(Duration::from_secs(60), "the first samples", || async {
        let m = client.sandbox_metrics(sb.id, None).await.unwrap();
        (m.points.len() >= 2).then_some(m)
    })
    .await;
    assert_eq!(
        (live.range.as_str(), live.source.as_str(), live.interval_ms),
        ("10m", "live", 500)
    );
    for p in &live.points {
        assert_plausible(p, &sb);
    }
    assert!(
        live.points
            .windows(2)
            .all(|w| w[0].timestamp < w[1].timestamp)
    );
    for range in ["2h", "24h"] {
        let m = client.sandbox_metrics(sb.id, Some(range)).await.unwrap();
        assert_eq!((m.range.as_str(), m.source.as_str()), (range, "live"));
        assert!(!m.points.is_empty(), "{range}: the open interval is shown");
        assert_plausible(&m.points[0], &sb);
    }

    // Another team sees nothing, as with every sandbox route.
    let other = other_team(&nb).await;
    let e = other.sandbox_metrics(sb.id, None).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::SandboxNotFound), "{e}");
    let e = client.sandbox_metrics(sb.id, Some("1h")).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::InvalidRequest), "{e}");

    // Paused: the points were stored, and are served from the database.
    client.pause_sandbox(sb.id).await.unwrap();
    let stored = client.sandbox_metrics(sb.id, None).await.unwrap();
    assert_eq!(stored.source, "stored");
    assert!(
        stored.points.len() >= live.points.len(),
        "{} stored, {} seen live",
        stored.points.len(),
        live.points.len()
    );
    assert!(
        stored
            .points
            .iter()
            .any(|p| p.timestamp == live.points[0].timestamp),
        "the live points were stored"
    );
    for p in &stored.points {
        assert_plausible(p, &sb);
    }
    let day = client.sandbox_metrics(sb.id, Some("24h")).await.unwrap();
    assert_eq!(day.source, "stored");
    assert!(!day.points.is_empty());
    // The CLI shows the same.
    let out = nb.cli(&["sandbox", "metrics", &sb.id.to_string(), "--range", "24h"]);
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("24h (stored, every 300000 ms)"), "{text}");
    assert_eq!(text.lines().count(), 2 + day.points.len(), "{text}");

    // Resumed, live again; destroyed, gone.
    client.resume_sandbox(sb.id).await.unwrap();
    assert_eq!(
        client.sandbox_metrics(sb.id, None).await.unwrap().source,
        "live"
    );
    client.destroy_sandbox(sb.id).await.unwrap();
    let e = client.sandbox_metrics(sb.id, None).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::NotFound), "{e}");
    assert_eq!(e.status().map(|s| s.as_u16()), Some(404), "{e}");
}

#[tokio::test]
async fn an_inactive_sandbox_keeps_its_metrics_when_paused() {
    let nb = Nestbox::up();
    let client = nb.client();
    let sb = client
        .create_sandbox(&CreateSandboxRequest {
            timeout_sec: Some(5),
            ..Default::default()
        })
        .await
        .unwrap();
    let seen = eventually(Duration::from_secs(60), "the first samples", || async {
        client.ping_sandbox(sb.id).await.unwrap();
        let m = client.sandbox_metrics(sb.id, None).await.unwrap();
        (!m.points.is_empty()).then_some(m.points.len())
    })
    .await;
    eventually(
        Duration::from_secs(120),
        "the sandbox to be auto-paused",
        || async {
            let s = client.get_sandbox(sb.id).await.unwrap();
            (s.status == SandboxStatus::Paused).then_some(())
        },
    )
    .await;
    let stored = client.sandbox_metrics(sb.id, None).await.unwrap();
    assert_eq!(stored.source, "stored");
    assert!(stored.points.len() >= seen);
    for p in &stored.points {
        assert_plausible(p, &sb);
    }
    client.destroy_sandbox(sb.id).await.unwrap();
}

/// Every entry of a sandbox's log, oldest first.
async fn whole_log(client: &Client, id: nestbox_types::SandboxId) -> Vec<LogEntry> {
    let mut all = Vec::new();
    let mut cursor = None;
    loop {
        let page = client
            .sandbox_logs(
                id,
                &LogsQuery {
                    limit: Some(1000),
                    cursor: cursor.clone(),
                    ..LogsQuery::default()
                },
            )
            .await
            .unwrap();
        all.extend(page.entries);
        cursor = page.next_cursor;
        if !page.has_more {
            return all;
        }
    }
}

/// Waits until the log has an entry with this message.
async fn logged(client: &Client, id: nestbox_types::SandboxId, message: &str) -> LogEntry {
    eventually(Duration::from_secs(30), message, || async {
        whole_log(client, id)
            .await
            .into_iter()
            .find(|e| e.message == message)
    })
    .await
}

#[tokio::test]
async fn a_sandbox_log_holds_its_console_its_processes_and_its_pauses() {
    let nb = Nestbox::up();
    let client = nb.client();
    let sb = client
        .create_sandbox(&CreateSandboxRequest::default())
        .await
        .unwrap();

    // A line written to the console, and the guest agent's own line about the process.
    sh_ok(&client, sb.id, "echo nbx-log-one > /dev/console").await;
    let one = logged(&client, sb.id, "nbx-log-one").await;
    assert_eq!(one.fields["source"], "console");
    assert_eq!(one.level, LogLevel::Info);
    let all = whole_log(&client, sb.id).await;
    let started = all
        .iter()
        .rev()
        .find(|e| e.message == "process started")
        .unwrap_or_else(|| panic!("no process entry in {all:#?}"));
    assert_eq!(started.fields["source"], "guest");
    assert_eq!(started.fields["cmd"], "/bin/sh");
    let pid = &started.fields["pid"];
    let ended = eventually(Duration::from_secs(30), "the process's end", || async {
        whole_log(&client, sb.id)
            .await
            .into_iter()
            .find(|e| e.message == "process ended" && e.fields.get("pid") == Some(pid))
    })
    .await;
    assert_eq!(ended.fields["status"], "exit status 0");
    assert!(ended.seq > started.seq && ended.timestamp >= started.timestamp);

    // Paused: the log is still there, and says so last.
    client.pause_sandbox(sb.id).await.unwrap();
    let newest = client
        .sandbox_logs(
            sb.id,
            &LogsQuery {
                limit: Some(1),
                direction: Some(LogDirection::Backward),
                ..LogsQuery::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(newest.entries[0].message, "paused");
    assert_eq!(newest.entries[0].fields["source"], "host");
    assert!(newest.has_more);

    // Resumed (a new console): the log goes on from where it was.
    client.resume_sandbox(sb.id).await.unwrap();
    let cursor = whole_log(&client, sb.id)
        .await
        .last()
        .map(|e| e.seq.to_string());
    sh_ok(&client, sb.id, "echo nbx-log-two > /dev/console").await;
    logged(&client, sb.id, "nbx-log-two").await;
    let all = whole_log(&client, sb.id).await;
    let seqs: Vec<u64> = all.iter().map(|e| e.seq).collect();
    assert_eq!(
        seqs,
        (1..=all.len() as u64).collect::<Vec<_>>(),
        "numbered without gaps"
    );
    assert!(all.windows(2).all(|w| w[0].timestamp <= w[1].timestamp));
    let pos = |m: &str| all.iter().position(|e| e.message == m).unwrap();
    assert!(pos("nbx-log-one") < pos("paused"));
    assert!(pos("paused") < pos("resumed"));
    assert!(pos("resumed") < pos("nbx-log-two"));
    assert_eq!(
        all.iter().filter(|e| e.message == "nbx-log-one").count(),
        1,
        "nothing twice"
    );

    // Following from a cursor gives only what came after it.
    let since = client
        .sandbox_logs(
            sb.id,
            &LogsQuery {
                cursor,
                ..LogsQuery::default()
            },
        )
        .await
        .unwrap();
    assert!(since.entries.iter().any(|e| e.message == "nbx-log-two"));
    assert!(since.entries.iter().all(|e| e.message != "paused"));

    // Filters: text (case-insensitive) and level.
    let found = client
        .sandbox_logs(
            sb.id,
            &LogsQuery {
                search: Some("NBX-LOG-TWO".into()),
                ..LogsQuery::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(found.entries.len(), 1, "{:?}", found.entries);
    let errors = client
        .sandbox_logs(
            sb.id,
            &LogsQuery {
                level: Some(LogLevel::Warn),
                ..LogsQuery::default()
            },
        )
        .await
        .unwrap();
    assert!(errors.entries.iter().all(|e| e.level >= LogLevel::Warn));

    // Another team sees nothing; a destroyed sandbox's log is gone with it.
    let other = other_team(&nb).await;
    let e = other
        .sandbox_logs(sb.id, &LogsQuery::default())
        .await
        .unwrap_err();
    assert!(e.to_string().contains("sandbox_not_found"), "{e}");
    client.destroy_sandbox(sb.id).await.unwrap();
    let e = client
        .sandbox_logs(sb.id, &LogsQuery::default())
        .await
        .unwrap_err();
    assert!(e.to_string().contains("not_found"), "{e}");
}
