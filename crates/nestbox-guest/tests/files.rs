//! `GET /files` and `POST /files`: streamed downloads and uploads.

// Helpers of these tests unwrap like the tests do.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::os::unix::fs::MetadataExt;
use std::time::Duration;

use bytes::Bytes;
use common::{Guest, TOKEN, is_root, pseudo_random, sha256};
use futures::StreamExt;
use reqwest::StatusCode;

const TEN_MB: usize = 10 * 1024 * 1024;

async fn download_all(guest: &Guest, path: &str) -> (Option<u64>, Vec<u8>) {
    let (size, mut stream) = guest
        .client(Some(TOKEN))
        .download(path, None)
        .await
        .unwrap();
    let mut data = Vec::new();
    while let Some(chunk) = stream.next().await {
        data.extend_from_slice(&chunk.unwrap());
    }
    (size, data)
}

#[tokio::test]
async fn ten_megabytes_round_trip_as_a_raw_body() {
    let guest = Guest::with_token(TOKEN).await;
    let dir = tempfile::tempdir().unwrap();
    let data = pseudo_random(TEN_MB, 7);
    let path = dir.path().join("deep/er/raw.bin");
    let chunks: Vec<Bytes> = data.chunks(64 * 1024).map(Bytes::copy_from_slice).collect();
    let entries = guest
        .client(Some(TOKEN))
        .upload(
            path.to_str().unwrap(),
            None,
            futures::stream::iter(chunks.into_iter().map(Ok::<_, std::io::Error>)),
        )
        .await
        .unwrap();
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0].path, path.to_str().unwrap());
    assert_eq!(entries[0].name, "raw.bin");
    assert_eq!(sha256(&std::fs::read(&path).unwrap()), sha256(&data));

    let (size, downloaded) = download_all(&guest, path.to_str().unwrap()).await;
    assert_eq!(size, Some(TEN_MB as u64));
    assert_eq!(sha256(&downloaded), sha256(&data));
    // No temporary files are left behind.
    let names: Vec<_> = std::fs::read_dir(path.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec![std::ffi::OsString::from("raw.bin")]);
}

#[tokio::test]
async fn ten_megabytes_round_trip_as_multipart() {
    let guest = Guest::with_token(TOKEN).await;
    let dir = tempfile::tempdir().unwrap();
    let data = pseudo_random(TEN_MB, 11);
    let path = dir.path().join("multi.bin");
    std::fs::write(&path, b"old content").unwrap();
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let form = reqwest::multipart::Form::new().part(
        "file",
        reqwest::multipart::Part::bytes(data.clone()).file_name("ignored-name"),
    );
    let response = reqwest::Client::new()
        .post(guest.url("/files"))
        .query(&[("path", path.to_str().unwrap())])
        .header("x-access-token", TOKEN)
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let entries: serde_json::Value = response.json().await.unwrap();
    assert_eq!(
        entries,
        serde_json::json!([{"path": path.to_str().unwrap(), "name": "multi.bin", "type": "file"}])
    );
    // Replaced in place: the mode of the old file is kept.
    assert_eq!(std::fs::metadata(&path).unwrap().mode() & 0o777, 0o755);
    let (_, downloaded) = download_all(&guest, path.to_str().unwrap()).await;
    assert_eq!(sha256(&downloaded), sha256(&data));
}

#[tokio::test]
async fn multipart_files_without_a_path_use_their_file_names() {
    let guest = Guest::with_token(TOKEN).await;
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.txt");
    let b = dir.path().join("sub/b.txt");
    let form = reqwest::multipart::Form::new()
        .part(
            "file",
            reqwest::multipart::Part::bytes(b"A".to_vec())
                .file_name(a.to_str().unwrap().to_owned()),
        )
        .text("other", "ignored")
        .part(
            "file",
            reqwest::multipart::Part::bytes(b"B".to_vec())
                .file_name(b.to_str().unwrap().to_owned()),
        );
    let response = reqwest::Client::new()
        .post(guest.url("/files"))
        .header("x-access-token", TOKEN)
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let entries: serde_json::Value = response.json().await.unwrap();
    assert_eq!(entries.as_array().unwrap().len(), 2);
    assert_eq!(std::fs::read(&a).unwrap(), b"A");
    assert_eq!(std::fs::read(&b).unwrap(), b"B");
}

#[tokio::test]
async fn errors_are_json_with_the_status() {
    let guest = Guest::with_token(TOKEN).await;
    let dir = tempfile::tempdir().unwrap();
    let http = reqwest::Client::new();
    let get = |path: String| {
        http.get(guest.url("/files"))
            .query(&[("path", path)])
            .header("x-access-token", TOKEN)
            .send()
    };
    let missing = get(dir.path().join("missing").display().to_string())
        .await
        .unwrap();
    assert_eq!(missing.status(), StatusCode::NOT_FOUND);
    let body: serde_json::Value = missing.json().await.unwrap();
    assert_eq!(body["code"], 404);
    assert!(body["message"].as_str().unwrap().contains("missing"));

    let directory = get(dir.path().display().to_string()).await.unwrap();
    assert_eq!(directory.status(), StatusCode::BAD_REQUEST);

    let err = guest
        .client(Some(TOKEN))
        .download(dir.path().join("missing").to_str().unwrap(), None)
        .await
        .err()
        .expect("an error");
    assert!(err.is_not_found(), "{err}");
    assert_eq!(err.http_status(), Some(404));

    // A raw upload needs a path; an unknown user is refused; a directory is not a file.
    let no_path = http
        .post(guest.url("/files"))
        .header("x-access-token", TOKEN)
        .header("content-type", "application/octet-stream")
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(no_path.status(), StatusCode::BAD_REQUEST);
    let err = guest
        .client(Some(TOKEN))
        .upload(
            dir.path().join("f").to_str().unwrap(),
            Some("no-such-user-here"),
            futures::stream::iter([Ok::<_, std::io::Error>(Bytes::from_static(b"x"))]),
        )
        .await
        .unwrap_err();
    assert!(err.is_unauthenticated(), "{err}");
    let err = guest
        .client(Some(TOKEN))
        .upload(
            dir.path().to_str().unwrap(),
            None,
            futures::stream::iter([Ok::<_, std::io::Error>(Bytes::from_static(b"x"))]),
        )
        .await
        .unwrap_err();
    assert!(err.is_invalid_argument(), "{err}");
    let wrong_type = http
        .post(guest.url("/files"))
        .query(&[("path", dir.path().join("g").display().to_string())])
        .header("x-access-token", TOKEN)
        .header("content-type", "text/plain")
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(wrong_type.status(), StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn uploads_belong_to_the_user() {
    if !is_root() {
        eprintln!("skipped: giving files to another user needs root");
        return;
    }
    let guest = Guest::with_token(TOKEN).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("new-dir/owned.txt");
    guest
        .client(Some(TOKEN))
        .upload(
            path.to_str().unwrap(),
            Some("nobody"),
            futures::stream::iter([Ok::<_, std::io::Error>(Bytes::from_static(b"mine"))]),
        )
        .await
        .unwrap();
    let nobody = nix::unistd::User::from_name("nobody").unwrap().unwrap();
    assert_eq!(std::fs::metadata(&path).unwrap().uid(), nobody.uid.as_raw());
    assert_eq!(
        std::fs::metadata(path.parent().unwrap()).unwrap().uid(),
        nobody.uid.as_raw()
    );
    // The directory that already existed keeps its owner.
    assert_eq!(std::fs::metadata(dir.path()).unwrap().uid(), 0);
}

#[tokio::test]
async fn a_full_disk_is_507() {
    if !is_root() {
        eprintln!("skipped: mounting a small tmpfs needs root");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"])
        .arg(dir.path())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !mounted {
        eprintln!("skipped: cannot mount a tmpfs here");
        return;
    }
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(dir.path().to_path_buf());
    let guest = Guest::with_token(TOKEN).await;
    let data = pseudo_random(4 * 1024 * 1024, 3);
    let chunks: Vec<Bytes> = data.chunks(64 * 1024).map(Bytes::copy_from_slice).collect();
    let err = guest
        .client(Some(TOKEN))
        .upload(
            dir.path().join("big").to_str().unwrap(),
            None,
            futures::stream::iter(chunks.into_iter().map(Ok::<_, std::io::Error>)),
        )
        .await
        .unwrap_err();
    assert_eq!(err.http_status(), Some(507), "{err}");
    // The partial temporary file was removed.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

#[tokio::test]
async fn an_aborted_upload_leaves_no_file() {
    let guest = Guest::with_token(TOKEN).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("aborted.bin");
    let body = futures::stream::iter([
        Ok(Bytes::from(vec![7u8; 256 * 1024])),
        Err(std::io::Error::other("the client went away")),
    ]);
    let result = guest
        .client(Some(TOKEN))
        .upload(path.to_str().unwrap(), None, body)
        .await;
    assert!(result.is_err(), "an upload whose body failed must fail");
    common::wait_for(
        Duration::from_secs(10),
        "the partial upload to be discarded",
        || {
            let dir = dir.path().to_path_buf();
            async move {
                std::fs::read_dir(&dir)
                    .unwrap()
                    .next()
                    .is_none()
                    .then_some(())
            }
        },
    )
    .await;
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(
        leftovers.is_empty(),
        "partial files left behind: {leftovers:?}"
    );
}

async fn gzip(data: &[u8]) -> Vec<u8> {
    use tokio::io::AsyncReadExt;
    let mut out = Vec::new();
    async_compression::tokio::bufread::GzipEncoder::new(data)
        .read_to_end(&mut out)
        .await
        .unwrap();
    out
}

async fn gunzip(data: &[u8]) -> Vec<u8> {
    use tokio::io::AsyncReadExt;
    let mut out = Vec::new();
    async_compression::tokio::bufread::GzipDecoder::new(data)
        .read_to_end(&mut out)
        .await
        .unwrap();
    out
}

#[tokio::test]
async fn gzip_both_ways_and_metadata_on_uploads() {
    let guest = Guest::with_token(TOKEN).await;
    let dir = tempfile::tempdir().unwrap();
    let http = reqwest::Client::new();
    let data = pseudo_random(3 * 1024 * 1024, 5);
    let path = dir.path().join("packed.bin");
    let path_str = path.to_str().unwrap();
    let upload = |body: Vec<u8>, encoding: &'static str, meta: &[(&'static str, &'static str)]| {
        let mut rb = http
            .post(guest.url("/files"))
            .query(&[("path", path_str)])
            .header("x-access-token", TOKEN)
            .header("content-type", "application/octet-stream")
            .header("content-encoding", encoding)
            .body(body);
        for (k, v) in meta {
            rb = rb.header(format!("X-Metadata-{k}"), *v);
        }
        rb.send()
    };

    // A gzip upload with metadata: the file holds the plain bytes, the answer and every
    // later description carry the metadata (keys lowercase).
    let response = upload(
        gzip(&data).await,
        "gzip",
        &[("Owner", "alice"), ("build", "42")],
    )
    .await
    .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let entries: serde_json::Value = response.json().await.unwrap();
    assert_eq!(
        entries[0]["metadata"],
        serde_json::json!({"owner": "alice", "build": "42"})
    );
    assert_eq!(sha256(&std::fs::read(&path).unwrap()), sha256(&data));
    let info = guest.client(Some(TOKEN)).stat(path_str).await.unwrap();
    assert_eq!(
        info.metadata.get("owner").map(String::as_str),
        Some("alice")
    );
    assert_eq!(info.metadata.len(), 2);
    assert!(!info.is_symlink);

    // A download that accepts gzip gets it; one that does not gets the plain bytes.
    let packed = http
        .get(guest.url("/files"))
        .query(&[("path", path_str)])
        .header("x-access-token", TOKEN)
        .header("accept-encoding", "gzip")
        .send()
        .await
        .unwrap();
    assert_eq!(packed.headers()["content-encoding"], "gzip");
    let body = packed.bytes().await.unwrap();
    assert_eq!(sha256(&gunzip(&body).await), sha256(&data));
    let (size, plain) = download_all(&guest, path_str).await;
    assert_eq!(
        (size, sha256(&plain)),
        (Some(data.len() as u64), sha256(&data))
    );

    // A new upload without metadata replaces the file and its metadata.
    let response = upload(b"plain".to_vec(), "identity", &[]).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let info = guest.client(Some(TOKEN)).stat(path_str).await.unwrap();
    assert!(info.metadata.is_empty(), "{:?}", info.metadata);

    // Broken gzip, an unknown encoding and bad metadata are 400s that leave the file alone.
    for (body, encoding, meta) in [
        (b"not gzip at all".to_vec(), "gzip", vec![]),
        (b"x".to_vec(), "br", vec![]),
        (b"x".to_vec(), "identity", vec![("k", "caf\u{e9}")]),
    ] {
        let response = upload(body, encoding, &meta).await.unwrap();
        assert_eq!(
            response.status(),
            StatusCode::BAD_REQUEST,
            "{encoding} {meta:?}"
        );
        let err: serde_json::Value = response.json().await.unwrap();
        assert_eq!(err["code"], 400);
        assert_eq!(std::fs::read(&path).unwrap(), b"plain");
    }
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(
        names,
        vec![std::ffi::OsString::from("packed.bin")],
        "no temporary file left"
    );
}
