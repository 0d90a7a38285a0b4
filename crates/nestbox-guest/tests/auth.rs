//! The access token: which endpoints need it, how the first `/init` sets it, how a later
//! one rotates it.

// Helpers of these tests unwrap like the tests do.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{Guest, TOKEN, sha256};
use nestbox_envd::types::InitRequest;
use reqwest::StatusCode;

/// Every endpoint but `/health` and `/init`, as `(method, path, content type)`. A new
/// endpoint must be added here, or this matrix does not cover it.
const PROTECTED: &[(&str, &str, &str)] = &[
    ("GET", "/envs", ""),
    ("GET", "/metrics", ""),
    ("GET", "/files?path=/etc/hostname", ""),
    // No path: with the token this is a 400, and nothing is written.
    ("POST", "/files", "application/octet-stream"),
    ("POST", "/process.Process/List", "application/json"),
    ("POST", "/process.Process/Start", "application/connect+json"),
    (
        "POST",
        "/process.Process/Connect",
        "application/connect+json",
    ),
    ("POST", "/process.Process/SendInput", "application/json"),
    (
        "POST",
        "/process.Process/StreamInput",
        "application/connect+json",
    ),
    ("POST", "/process.Process/SendSignal", "application/json"),
    ("POST", "/process.Process/CloseStdin", "application/json"),
    ("POST", "/process.Process/Update", "application/json"),
    ("POST", "/filesystem.Filesystem/Stat", "application/json"),
    ("POST", "/filesystem.Filesystem/MakeDir", "application/json"),
    ("POST", "/filesystem.Filesystem/Move", "application/json"),
    ("POST", "/filesystem.Filesystem/ListDir", "application/json"),
    ("POST", "/filesystem.Filesystem/Remove", "application/json"),
    (
        "POST",
        "/filesystem.Filesystem/WatchDir",
        "application/connect+json",
    ),
    (
        "POST",
        "/filesystem.Filesystem/CreateWatcher",
        "application/json",
    ),
    (
        "POST",
        "/filesystem.Filesystem/GetWatcherEvents",
        "application/json",
    ),
    (
        "POST",
        "/filesystem.Filesystem/RemoveWatcher",
        "application/json",
    ),
];

async fn status_of(
    guest: &Guest,
    method: &str,
    path: &str,
    content_type: &str,
    token: Option<&str>,
) -> StatusCode {
    let http = reqwest::Client::new();
    let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
    let mut request = http.request(method, guest.url(path));
    if !content_type.is_empty() {
        request = request.header("content-type", content_type).body("{}");
    }
    if let Some(token) = token {
        request = request.header("x-access-token", token);
    }
    request.send().await.unwrap().status()
}

#[tokio::test]
async fn every_protected_endpoint_needs_the_token() {
    let guest = Guest::start(&[]);
    // Before /init: nothing but /health and /init.
    for (method, path, content_type) in PROTECTED {
        let status = status_of(&guest, method, path, content_type, Some("anything")).await;
        assert_eq!(
            status,
            StatusCode::UNAUTHORIZED,
            "{method} {path} before init"
        );
    }
    let health = reqwest::get(guest.url("/health")).await.unwrap();
    assert_eq!(health.status(), StatusCode::NO_CONTENT);
    assert_eq!(
        health.headers()["nestbox-guest-version"],
        env!("CARGO_PKG_VERSION")
    );

    guest
        .client(None)
        .init(&InitRequest {
            access_token: Some(TOKEN.into()),
            ..InitRequest::default()
        })
        .await
        .unwrap();
    for (method, path, content_type) in PROTECTED {
        for token in [None, Some("wrong")] {
            let status = status_of(&guest, method, path, content_type, token).await;
            assert_eq!(
                status,
                StatusCode::UNAUTHORIZED,
                "{method} {path} with {token:?}"
            );
        }
        let status = status_of(&guest, method, path, content_type, Some(TOKEN)).await;
        assert_ne!(
            status,
            StatusCode::UNAUTHORIZED,
            "{method} {path} with the token"
        );
    }
    // Health stays open.
    assert_eq!(
        guest.client(None).health().await.unwrap(),
        env!("CARGO_PKG_VERSION")
    );
}

#[tokio::test]
async fn unauthenticated_connect_calls_get_connect_errors() {
    let guest = Guest::with_token(TOKEN).await;
    let err = guest.client(Some("wrong")).list().await.unwrap_err();
    assert!(err.is_unauthenticated(), "{err}");
    assert_eq!(err.http_status(), Some(401));
    let err = guest.client(None).metrics().await.unwrap_err();
    assert!(err.is_unauthenticated(), "{err}");
}

#[tokio::test]
async fn the_first_init_must_match_the_expected_hash() {
    let guest = Guest::start(&["--access-token-sha256", &sha256(b"good-token")]);
    let client = guest.client(None);
    let init = |token: &str| InitRequest {
        access_token: Some(token.into()),
        ..InitRequest::default()
    };
    let err = client.init(&init("bad-token")).await.unwrap_err();
    assert!(err.is_unauthenticated(), "{err}");
    let err = client.init(&InitRequest::default()).await.unwrap_err();
    assert!(err.is_unauthenticated(), "{err}");
    client.init(&init("good-token")).await.unwrap();
    guest.client(Some("good-token")).list().await.unwrap();
}

#[tokio::test]
async fn a_later_init_needs_the_current_token_and_rotates_it() {
    let guest = Guest::with_token("first").await;
    let rotate = InitRequest {
        access_token: Some("second".into()),
        env_vars: Some([("ROTATED".to_owned(), "yes".to_owned())].into()),
        ..InitRequest::default()
    };
    // Without the current token, nothing changes.
    let err = guest.client(None).init(&rotate).await.unwrap_err();
    assert!(err.is_unauthenticated(), "{err}");
    let err = guest.client(Some("wrong")).init(&rotate).await.unwrap_err();
    assert!(err.is_unauthenticated(), "{err}");
    guest.client(Some("first")).list().await.unwrap();

    guest.client(Some("first")).init(&rotate).await.unwrap();
    assert!(
        guest
            .client(Some("first"))
            .list()
            .await
            .unwrap_err()
            .is_unauthenticated()
    );
    let envs = guest.client(Some("second")).envs().await.unwrap();
    assert_eq!(envs["ROTATED"], "yes");
}

#[tokio::test]
async fn init_rejects_unknown_default_users_and_bad_bodies() {
    let guest = Guest::with_token(TOKEN).await;
    let err = guest
        .client(Some(TOKEN))
        .init(&InitRequest {
            default_user: Some("no-such-user-here".into()),
            ..InitRequest::default()
        })
        .await
        .unwrap_err();
    assert!(err.is_invalid_argument(), "{err}");
    let response = reqwest::Client::new()
        .post(guest.url("/init"))
        .header("x-access-token", TOKEN)
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["code"], 400);
}

#[tokio::test]
async fn metrics_report_the_machine() {
    let guest = Guest::with_token(TOKEN).await;
    let metrics = guest.client(Some(TOKEN)).metrics().await.unwrap();
    assert!(metrics.cpu_count >= 1);
    assert!(metrics.mem_total > 0 && metrics.mem_used <= metrics.mem_total);
    assert!(metrics.disk_total > 0 && metrics.disk_used <= metrics.disk_total);
    assert!((0.0..=100.0).contains(&metrics.cpu_used_pct));
    assert!(metrics.ts > 1_600_000_000);
}

#[tokio::test]
async fn serves_h2c_on_the_same_port() {
    let guest = Guest::with_token(TOKEN).await;
    let http = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let response = http
        .post(guest.url("/process.Process/List"))
        .header("content-type", "application/json")
        .header("x-access-token", TOKEN)
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(response.version(), reqwest::Version::HTTP_2);
    assert_eq!(response.status(), StatusCode::OK);
    let health = http.get(guest.url("/health")).send().await.unwrap();
    assert_eq!(health.status(), StatusCode::NO_CONTENT);
}
