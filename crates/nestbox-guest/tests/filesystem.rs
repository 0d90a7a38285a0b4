//! `filesystem.Filesystem`: stat, list, make directories, move and remove, and their
//! error codes.

// Helpers of these tests unwrap like the tests do.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{Guest, TOKEN};
use nestbox_envd::connect::Code;
use nestbox_envd::filesystem::FileType;

#[tokio::test]
async fn make_stat_list_move_remove() {
    let guest = Guest::with_token(TOKEN).await;
    let client = guest.client(Some(TOKEN));
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_str().unwrap().to_owned();

    let made = client.make_dir(&format!("{root}/a/b/c")).await.unwrap();
    assert_eq!(made.r#type, FileType::Directory as i32);
    assert_eq!(made.name, "c");
    assert_eq!(made.path, format!("{root}/a/b/c"));
    assert!(made.permissions.starts_with('d'));
    let err = client.make_dir(&format!("{root}/a/b")).await.unwrap_err();
    assert!(err.is_already_exists(), "{err}");

    std::fs::write(dir.path().join("a/file.txt"), b"hello").unwrap();
    std::os::unix::fs::symlink("file.txt", dir.path().join("a/link")).unwrap();
    let stat = client.stat(&format!("{root}/a/file.txt")).await.unwrap();
    assert_eq!(stat.r#type, FileType::File as i32);
    assert_eq!(stat.size, 5);
    assert!(stat.permissions.starts_with("-rw"), "{}", stat.permissions);
    assert!(stat.modified_time.is_some());
    assert!(!stat.owner.is_empty() && !stat.group.is_empty());
    let link = client.stat(&format!("{root}/a/link")).await.unwrap();
    assert_eq!(link.r#type, FileType::Symlink as i32);
    assert_eq!(link.symlink_target.as_deref(), Some("file.txt"));

    let shallow = client.list_dir(&format!("{root}/a"), 1).await.unwrap();
    let mut names: Vec<_> = shallow.iter().map(|e| e.name.as_str()).collect();
    names.sort();
    assert_eq!(names, ["b", "file.txt", "link"]);
    let deep = client.list_dir(&format!("{root}/a"), 3).await.unwrap();
    assert!(deep.iter().any(|e| e.path == format!("{root}/a/b/c")));
    let default_depth = client.list_dir(&format!("{root}/a"), 0).await.unwrap();
    assert_eq!(default_depth.len(), 3);

    let moved = client
        .move_path(
            &format!("{root}/a/file.txt"),
            &format!("{root}/x/y/moved.txt"),
        )
        .await
        .unwrap();
    assert_eq!(moved.path, format!("{root}/x/y/moved.txt"));
    assert_eq!(
        std::fs::read(dir.path().join("x/y/moved.txt")).unwrap(),
        b"hello"
    );

    client.remove(&format!("{root}/a")).await.unwrap();
    assert!(!dir.path().join("a").exists());
    client
        .remove(&format!("{root}/x/y/moved.txt"))
        .await
        .unwrap();
}

#[tokio::test]
async fn errors_carry_connect_codes() {
    let guest = Guest::with_token(TOKEN).await;
    let client = guest.client(Some(TOKEN));
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_str().unwrap().to_owned();
    std::fs::write(dir.path().join("file"), b"x").unwrap();

    assert!(
        client
            .stat(&format!("{root}/missing"))
            .await
            .unwrap_err()
            .is_not_found()
    );
    assert!(
        client
            .remove(&format!("{root}/missing"))
            .await
            .unwrap_err()
            .is_not_found()
    );
    assert!(
        client
            .move_path(&format!("{root}/missing"), &format!("{root}/elsewhere"))
            .await
            .unwrap_err()
            .is_not_found()
    );
    assert!(
        client
            .list_dir(&format!("{root}/missing"), 1)
            .await
            .unwrap_err()
            .is_not_found()
    );
    assert!(
        client
            .list_dir(&format!("{root}/file"), 1)
            .await
            .unwrap_err()
            .is_invalid_argument()
    );
    assert!(
        client
            .make_dir(&format!("{root}/file/sub"))
            .await
            .unwrap_err()
            .is_invalid_argument()
    );
    assert!(client.stat("").await.unwrap_err().is_invalid_argument());
    assert!(
        client
            .stat("~other/x")
            .await
            .unwrap_err()
            .is_invalid_argument()
    );
    // `~` is the user's home (which may not exist, as for `nobody`).
    let home = nix::unistd::User::from_uid(nix::unistd::geteuid())
        .unwrap()
        .map(|u| u.dir)
        .unwrap();
    match client.stat("~").await {
        Ok(entry) => {
            assert_eq!(entry.r#type, FileType::Directory as i32);
            assert_eq!(std::path::Path::new(&entry.path), home);
        }
        Err(err) => {
            assert!(!home.exists());
            assert!(err.is_not_found() && err.message().contains(home.to_str().unwrap()));
        }
    }

    let err = guest
        .client(Some(TOKEN))
        .as_user("no-such-user-here")
        .unwrap()
        .stat("/")
        .await
        .unwrap_err();
    assert!(err.is_unauthenticated(), "{err}");
}

/// What E2B's SDKs send for polled watchers: unary Connect JSON, events with enum names.
#[tokio::test]
async fn polled_watchers_in_connect_json() {
    let guest = Guest::with_token(TOKEN).await;
    let dir = tempfile::tempdir().unwrap();
    let call = |method: &str, body: serde_json::Value| {
        reqwest::Client::new()
            .post(guest.url(&format!("/filesystem.Filesystem/{method}")))
            .header("content-type", "application/json")
            .header("connect-protocol-version", "1")
            .header("x-access-token", TOKEN)
            .json(&body)
            .send()
    };
    let created: serde_json::Value = call(
        "CreateWatcher",
        serde_json::json!({"path": dir.path(), "recursive": false}),
    )
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    let id = created["watcherId"].as_str().unwrap().to_string();
    std::fs::write(dir.path().join("new.txt"), b"x").unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let event = loop {
        let body: serde_json::Value =
            call("GetWatcherEvents", serde_json::json!({"watcherId": id}))
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
        if let Some(first) = body["events"].as_array().and_then(|e| e.first()) {
            break first.clone();
        }
        assert!(std::time::Instant::now() < deadline, "no event: {body}");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    assert_eq!(event["name"], "new.txt");
    assert_eq!(event["type"], "EVENT_TYPE_CREATE");
    let removed = call("RemoveWatcher", serde_json::json!({"watcherId": id}))
        .await
        .unwrap();
    assert_eq!(removed.status(), 200);
    let gone = call("RemoveWatcher", serde_json::json!({"watcherId": id}))
        .await
        .unwrap();
    assert_eq!(gone.status(), 404);
    let body: serde_json::Value = gone.json().await.unwrap();
    assert_eq!(body["code"], Code::NotFound.as_str());
}

/// What E2B's SDKs send for `files.getInfo`: unary Connect JSON.
#[tokio::test]
async fn stat_in_connect_json() {
    let guest = Guest::with_token(TOKEN).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("f.txt");
    std::fs::write(&file, b"12345").unwrap();
    let response = reqwest::Client::new()
        .post(guest.url("/filesystem.Filesystem/Stat"))
        .header("content-type", "application/json")
        .header("connect-protocol-version", "1")
        .header("x-access-token", TOKEN)
        .json(&serde_json::json!({"path": file}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let body: serde_json::Value = response.json().await.unwrap();
    let entry = &body["entry"];
    assert_eq!(entry["name"], "f.txt");
    assert_eq!(entry["type"], "FILE_TYPE_FILE");
    assert_eq!(entry["size"], "5");
    assert!(
        entry["modifiedTime"].as_str().unwrap().ends_with('Z'),
        "{entry}"
    );
    let missing = reqwest::Client::new()
        .post(guest.url("/filesystem.Filesystem/Stat"))
        .header("content-type", "application/json")
        .header("x-access-token", TOKEN)
        .json(&serde_json::json!({"path": dir.path().join("nope")}))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
    let body: serde_json::Value = missing.json().await.unwrap();
    assert_eq!(body["code"], "not_found");
}
