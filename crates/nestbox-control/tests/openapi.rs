//! The REST contract: the generated OpenAPI document is the checked-in one, and the server
//! serves it, its documentation page and its health.
//!
//! To accept a change of the API, regenerate the checked-in document:
//! `UPDATE_OPENAPI=1 cargo test -p nestbox-control --test openapi`.

// Tests may panic on what they expect (see clippy.toml); helpers here are not `#[test]`s.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use std::path::PathBuf;

use common::{Engine, Harness, both_engines};

both_engines!(serves_its_document_docs_and_health);

fn checked_in() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../openapi/nestbox.json")
}

#[test]
fn document_matches_the_checked_in_file() -> anyhow::Result<()> {
    let generated = format!("{}\n", nestbox_control::api::openapi_json());
    let path = checked_in();
    if std::env::var_os("UPDATE_OPENAPI").is_some_and(|v| v == "1") {
        std::fs::write(&path, &generated)?;
        eprintln!("wrote {}", path.display());
        return Ok(());
    }
    let on_disk = std::fs::read_to_string(&path).unwrap_or_default();
    if on_disk != generated {
        let line = on_disk
            .lines()
            .zip(generated.lines())
            .position(|(a, b)| a != b)
            .unwrap_or_else(|| on_disk.lines().count().min(generated.lines().count()));
        panic!(
            "the API changed: openapi/nestbox.json differs from the generated document \
             (first at line {}). If the change is intended, regenerate it with \
             `UPDATE_OPENAPI=1 cargo test -p nestbox-control --test openapi` and commit it.",
            line + 1
        );
    }
    Ok(())
}

#[test]
fn every_operation_is_documented() {
    let doc = nestbox_control::api::openapi();
    let mut ids = std::collections::BTreeMap::new();
    for (path, item) in &doc.paths.paths {
        let ops = [
            ("get", &item.get),
            ("post", &item.post),
            ("put", &item.put),
            ("patch", &item.patch),
            ("delete", &item.delete),
        ];
        for (method, op) in ops {
            let Some(op) = op else { continue };
            assert!(
                op.tags.as_ref().is_some_and(|t| !t.is_empty()),
                "{method} {path} has no tag"
            );
            assert!(
                op.description.is_some() || op.summary.is_some(),
                "{method} {path} has no description"
            );
            assert!(
                !op.responses.responses.is_empty(),
                "{method} {path} documents no response"
            );
            // Clients generated from the document key operations by id.
            let id = op.operation_id.clone().unwrap_or_default();
            assert!(!id.is_empty(), "{method} {path} has no operation id");
            if let Some(other) = ids.insert(id.clone(), format!("{method} {path}")) {
                panic!("{method} {path} and {other} share the operation id {id}");
            }
        }
    }
}

async fn serves_its_document_docs_and_health(engine: Engine) -> anyhow::Result<()> {
    let h = Harness::start(engine).await?;
    let (http, url) = h.raw("/openapi.json");
    let served: serde_json::Value = http
        .get(url)
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let generated = serde_json::to_value(nestbox_control::api::openapi())?;
    assert_eq!(
        served, generated,
        "/openapi.json serves the generated document"
    );

    let (_, url) = h.raw("/docs");
    let resp = http.get(url).send().await?.error_for_status()?;
    let content_type = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    assert!(content_type.starts_with("text/html"), "{content_type}");
    assert_eq!(resp.headers()["x-frame-options"], "DENY");
    let page = resp.text().await?;
    assert!(page.contains("<html"), "the docs page is the dashboard's");
    // The dashboard's routes never shadow the API's answers.
    for path in ["/_app/immutable/nope.js", "/v1/nope", "/dashboardx"] {
        let (_, url) = h.raw(path);
        common::raw_error(
            http.get(url).send().await?,
            404,
            nestbox_types::ErrorCode::NotFound,
        )
        .await?;
    }
    // The page is revalidated, not re-sent.
    let (_, url) = h.raw("/dashboard/sandboxes");
    let first = http.get(&url).send().await?.error_for_status()?;
    let etag = first.headers()["etag"].clone();
    let again = http.get(&url).header("if-none-match", etag).send().await?;
    assert_eq!(again.status(), 304);

    let health = h.anonymous().health().await?;
    assert_eq!(health.status, "ok");
    assert_eq!(health.version, nestbox_control::VERSION);

    // Ready: a host is online with the platform's templates.
    let ready = |h: &Harness| {
        let (http, url) = h.raw("/health/ready");
        async move {
            let resp = http.get(url).send().await?;
            let status = resp.status().as_u16();
            anyhow::Ok((status, resp.json::<serde_json::Value>().await?))
        }
    };
    let (status, body) = ready(&h).await?;
    assert_eq!(
        (status, &body["status"]),
        (200, &serde_json::json!("ready"))
    );
    // With no host online it is not, says why, and a create of a template nobody has
    // registered is "retry later", not "not found".
    nestbox_db::hosts::mark_stale_unreachable(
        &h.services.db,
        chrono::Utc::now() + chrono::Duration::hours(1),
    )
    .await?;
    let (status, body) = ready(&h).await?;
    assert_eq!(
        (status, &body["status"]),
        (503, &serde_json::json!("starting"))
    );
    assert_eq!(body["reason"], "no platform host is online yet");
    common::api_error(
        h.key
            .create_sandbox(&nestbox_types::api::CreateSandboxRequest {
                template: Some("not-registered-yet".into()),
                ..Default::default()
            })
            .await,
        503,
        nestbox_types::ErrorCode::HostUnavailable,
    );
    assert_eq!(h.anonymous().health().await?.status, "ok", "still live");
    // The host's next heartbeat makes it ready again; then an unknown template is 404.
    h.agent.heartbeat().await?;
    assert_eq!(ready(&h).await?.0, 200);
    common::api_error(
        h.key
            .create_sandbox(&nestbox_types::api::CreateSandboxRequest {
                template: Some("not-registered-yet".into()),
                ..Default::default()
            })
            .await,
        404,
        nestbox_types::ErrorCode::TemplateNotFound,
    );
    h.shutdown().await;
    Ok(())
}
