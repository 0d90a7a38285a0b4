//! `filesystem.WatchDir` and the polled watchers: create, write, remove and rename events,
//! recursion into new directories, and errors for what cannot be watched.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{Guest, TOKEN};
use futures::{Stream, StreamExt};
use nestbox_envd::client::EnvdError;
use nestbox_envd::filesystem::{EventType, WatchDirResponse, watch_dir_response};

const LIMIT: Duration = Duration::from_secs(20);

/// Reads the stream until an event of `kind` for `name` arrives; returns what came before.
async fn expect_event<S>(events: &mut S, kind: EventType, name: &str) -> Vec<(EventType, String)>
where
    S: Stream<Item = Result<WatchDirResponse, EnvdError>> + Unpin,
{
    let mut seen = Vec::new();
    let found = tokio::time::timeout(LIMIT, async {
        while let Some(item) = events.next().await {
            if let Some(watch_dir_response::Event::Filesystem(ev)) = item.unwrap().event {
                let ty = EventType::try_from(ev.r#type).unwrap();
                seen.push((ty, ev.name.clone()));
                if ty == kind && ev.name == name {
                    return true;
                }
            }
        }
        false
    })
    .await;
    assert!(
        matches!(found, Ok(true)),
        "no {kind:?} {name:?} among {seen:?}"
    );
    seen
}

#[tokio::test]
async fn watch_dir_streams_changes() {
    let guest = Guest::with_token(TOKEN).await;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    std::fs::create_dir(root.join("old")).unwrap();
    let client = guest.client(Some(TOKEN));
    let mut events = client
        .watch_dir(root.to_str().unwrap(), true)
        .await
        .unwrap();
    // The start event: the watch is in place.
    let first = tokio::time::timeout(LIMIT, events.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(matches!(
        first.event,
        Some(watch_dir_response::Event::Start(_))
    ));

    std::fs::write(root.join("a.txt"), b"one").unwrap();
    expect_event(&mut events, EventType::Create, "a.txt").await;
    expect_event(&mut events, EventType::Write, "a.txt").await;
    std::fs::rename(root.join("a.txt"), root.join("b.txt")).unwrap();
    expect_event(&mut events, EventType::Rename, "a.txt").await;
    expect_event(&mut events, EventType::Create, "b.txt").await;
    std::fs::remove_file(root.join("b.txt")).unwrap();
    expect_event(&mut events, EventType::Remove, "b.txt").await;
    // Subdirectories that existed and that are created later are watched.
    std::fs::write(root.join("old/x"), b"x").unwrap();
    expect_event(&mut events, EventType::Create, "old/x").await;
    std::fs::create_dir(root.join("new")).unwrap();
    expect_event(&mut events, EventType::Create, "new").await;
    std::fs::write(root.join("new/y"), b"y").unwrap();
    expect_event(&mut events, EventType::Create, "new/y").await;
}

#[tokio::test]
async fn watching_only_the_top_level_and_errors() {
    let guest = Guest::with_token(TOKEN).await;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    std::fs::create_dir(root.join("sub")).unwrap();
    let client = guest.client(Some(TOKEN));
    let mut events = client
        .watch_dir(root.to_str().unwrap(), false)
        .await
        .unwrap();
    tokio::time::timeout(LIMIT, events.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    // Not recursive: a change below is not reported, the next one at the top is.
    std::fs::write(root.join("sub/deep"), b"d").unwrap();
    std::fs::write(root.join("top"), b"t").unwrap();
    let seen = expect_event(&mut events, EventType::Create, "top").await;
    assert!(
        seen.iter().all(|(_, name)| !name.starts_with("sub/")),
        "{seen:?}"
    );

    // A missing directory and a file cannot be watched.
    let missing = async {
        let mut s = client
            .watch_dir(root.join("nope").to_str().unwrap(), false)
            .await?;
        s.next().await.unwrap()
    };
    assert!(missing.await.unwrap_err().is_not_found());
    let file = async {
        let mut s = client
            .watch_dir(root.join("top").to_str().unwrap(), false)
            .await?;
        s.next().await.unwrap()
    };
    assert!(file.await.unwrap_err().is_invalid_argument());
}

#[tokio::test]
async fn polled_watchers_collect_events_until_removed() {
    let guest = Guest::with_token(TOKEN).await;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let client = guest.client(Some(TOKEN));
    let id = client
        .create_watcher(root.to_str().unwrap(), false)
        .await
        .unwrap();
    std::fs::write(root.join("polled"), b"p").unwrap();
    std::fs::remove_file(root.join("polled")).unwrap();
    let mut seen = Vec::new();
    let deadline = std::time::Instant::now() + LIMIT;
    while !seen.contains(&(EventType::Remove, "polled".to_string())) {
        assert!(
            std::time::Instant::now() < deadline,
            "no remove event among {seen:?}"
        );
        for ev in client.get_watcher_events(&id).await.unwrap() {
            seen.push((EventType::try_from(ev.r#type).unwrap(), ev.name));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(seen[0], (EventType::Create, "polled".to_string()));
    client.remove_watcher(&id).await.unwrap();
    assert!(
        client
            .get_watcher_events(&id)
            .await
            .unwrap_err()
            .is_not_found()
    );
    assert!(client.remove_watcher(&id).await.unwrap_err().is_not_found());
}

#[tokio::test]
async fn events_carry_their_entry_when_asked() {
    use nestbox_envd::filesystem::WatchDirRequest;
    let guest = Guest::with_token(TOKEN).await;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let client = guest.client(Some(TOKEN));
    let mut events = client
        .watch_dir_with(WatchDirRequest {
            path: root.to_str().unwrap().into(),
            recursive: false,
            include_entry: true,
            allow_network_mounts: false,
        })
        .await
        .unwrap();
    let _start = tokio::time::timeout(LIMIT, events.next()).await.unwrap();
    std::fs::write(root.join("e.txt"), b"12345").unwrap();
    std::fs::remove_file(root.join("e.txt")).unwrap();
    let mut entries = Vec::new();
    tokio::time::timeout(LIMIT, async {
        while let Some(item) = events.next().await {
            if let Some(watch_dir_response::Event::Filesystem(ev)) = item.unwrap().event {
                let ty = EventType::try_from(ev.r#type).unwrap();
                entries.push((ty, ev.entry));
                if ty == EventType::Remove {
                    break;
                }
            }
        }
    })
    .await
    .unwrap();
    // The file may already be gone when its create event is read; the remove never
    // carries an entry; any entry there is describes the file.
    assert_eq!(
        entries.last().map(|e| (e.0, e.1.is_none())),
        Some((EventType::Remove, true))
    );
    for (_, entry) in entries.iter().filter_map(|(t, e)| Some((t, e.as_ref()?))) {
        assert_eq!(entry.name, "e.txt");
        assert_eq!(entry.path, root.join("e.txt").to_str().unwrap());
    }

    // Without a removal racing it, a write's entry is there, with its size.
    std::fs::write(root.join("f.txt"), b"123").unwrap();
    let entry = tokio::time::timeout(LIMIT, async {
        loop {
            let item = events.next().await.unwrap().unwrap();
            if let Some(watch_dir_response::Event::Filesystem(ev)) = item.event
                && ev.name == "f.txt"
                && let Some(entry) = ev.entry
                && entry.size == 3
            {
                return entry;
            }
        }
    })
    .await
    .unwrap();
    assert!(!entry.is_symlink);
}
