//! Forks: running copies of a running sandbox, through `/v1` and E2B's API, over the real
//! control plane with a simulated host agent.

#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;

use common::{Engine, Harness, api_error, both_engines};
use nestbox_types::api::{CreateSandboxRequest, ForkResult};
use nestbox_types::{ErrorCode, Expiry, SandboxStatus};
use serde_json::{Value, json};

both_engines!(
    fork_makes_independent_running_copies,
    fork_refuses_what_it_cannot_copy,
    e2b_fork_and_snapshots_of_one_sandbox,
);

async fn post(h: &Harness, path: &str, body: Value) -> anyhow::Result<(u16, Value)> {
    let (http, url) = h.raw(path);
    let resp = http
        .post(url)
        .header("x-api-key", &h.api_key)
        .json(&body)
        .send()
        .await?;
    let status = resp.status().as_u16();
    let text = resp.text().await?;
    Ok((status, serde_json::from_str(&text).unwrap_or(Value::Null)))
}

async fn fork_makes_independent_running_copies(engine: Engine) -> anyhow::Result<()> {
    let h = Harness::start(engine).await?;
    let env: BTreeMap<String, String> = [("GREETING".to_string(), "hi".to_string())].into();
    let md: BTreeMap<String, String> = [("app".to_string(), "forked".to_string())].into();
    let source = h
        .key
        .create_sandbox(&CreateSandboxRequest {
            env: env.clone(),
            metadata: md.clone(),
            lifetime_sec: Some(600),
            on_expiry: Some(Expiry::Pause),
            ..Default::default()
        })
        .await?;
    let templates_before = h.key.list_templates().await?.len();

    let (status, body) = post(
        &h,
        &format!("/v1/sandboxes/{}/fork", source.id),
        json!({"count": 3}),
    )
    .await?;
    assert_eq!(status, 201, "{body}");
    let result: ForkResult = serde_json::from_value(body)?;
    assert_eq!(result.items.len(), 3);
    let copies: Vec<_> = result
        .items
        .iter()
        .map(|i| i.sandbox.clone().expect("a copy"))
        .collect();
    let mut ids: Vec<_> = copies.iter().map(|c| c.id).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 3, "each copy has its own id");
    for copy in &copies {
        assert_ne!(copy.id, source.id);
        assert_eq!(copy.status, SandboxStatus::Running);
        assert_eq!(copy.metadata, md);
        assert_eq!(copy.on_expiry, Expiry::Pause);
        assert_eq!(
            (copy.vcpus, copy.memory_mb),
            (source.vcpus, source.memory_mb)
        );
        assert_ne!(copy.envd_access_token, source.envd_access_token);
        let on_agent = h.agent.sandbox(copy.id).expect("runs on the agent");
        assert_eq!(on_agent.env(), env);
    }
    assert_eq!(
        h.key.get_sandbox(source.id).await?.status,
        SandboxStatus::Running
    );
    assert_eq!(
        h.key.list_templates().await?.len(),
        templates_before,
        "the fork's template is not listed"
    );

    // The one-off template goes with the last copy.
    let db = &h.services.db;
    let fork_template = nestbox_db::sandboxes::get(db, copies[0].id)
        .await?
        .template_id
        .expect("made from a template");
    for copy in &copies[..2] {
        h.key.destroy_sandbox(copy.id).await?;
        assert!(
            nestbox_db::templates::get(db, fork_template).await.is_ok(),
            "still in use"
        );
    }
    h.key.destroy_sandbox(copies[2].id).await?;
    assert!(
        nestbox_db::templates::get(db, fork_template).await.is_err(),
        "deleted with its last copy"
    );
    h.shutdown().await;
    Ok(())
}

async fn fork_refuses_what_it_cannot_copy(engine: Engine) -> anyhow::Result<()> {
    let h = Harness::start(engine).await?;
    let sb = h.sandbox().await?;
    for bad in [
        json!({"count": 0}),
        json!({"count": 21}),
        json!({"lifetime_sec": 0}),
        json!({"copies": 2}),
    ] {
        let (status, body) =
            post(&h, &format!("/v1/sandboxes/{}/fork", sb.id), bad.clone()).await?;
        assert_eq!(status, 400, "{bad}: {body}");
        assert_eq!(body["error"]["code"], "invalid_request");
    }
    h.key_api().pause(sb.id).await?;
    let (status, body) = post(&h, &format!("/v1/sandboxes/{}/fork", sb.id), json!({})).await?;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (409, Some("sandbox_not_running"))
    );
    let other = h.user("other").await?;
    let theirs = other
        .client
        .create_sandbox(&CreateSandboxRequest::default())
        .await?;
    let (status, _) = post(&h, &format!("/v1/sandboxes/{}/fork", theirs.id), json!({})).await?;
    assert_eq!(status, 404, "another team's sandbox is not found");
    api_error(
        h.key.get_sandbox(theirs.id).await,
        404,
        ErrorCode::SandboxNotFound,
    );
    h.shutdown().await;
    Ok(())
}

async fn e2b_fork_and_snapshots_of_one_sandbox(engine: Engine) -> anyhow::Result<()> {
    let h = Harness::start(engine).await?;
    let a = h.sandbox().await?;
    let b = h.sandbox().await?;
    let (status, body) = post(
        &h,
        &format!("/sandboxes/{}/fork", a.id),
        json!({"count": 2, "timeout": 120}),
    )
    .await?;
    assert_eq!(status, 201, "{body}");
    let items = body.as_array().expect("an array");
    assert_eq!(items.len(), 2);
    for item in items {
        let copy = &item["sandbox"];
        assert!(
            copy["sandboxID"].is_string() && copy["envdAccessToken"].is_string(),
            "{item}"
        );
        assert_ne!(copy["sandboxID"], json!(a.id.to_string()));
    }
    let (status, body) = post(
        &h,
        "/sandboxes/sb-00000000-0000-0000-0000-000000000000/fork",
        json!({}),
    )
    .await?;
    assert_eq!((status, &body["code"]), (404, &json!(404)));

    for (sb, name) in [(a.id, "snap-a"), (b.id, "snap-b")] {
        let (status, _) = post(
            &h,
            &format!("/sandboxes/{sb}/snapshots"),
            json!({"name": name}),
        )
        .await?;
        assert_eq!(status, 201);
    }
    let (http, url) = h.raw(&format!("/snapshots?sandboxID={}", a.id));
    let listed: Value = http
        .get(url)
        .header("x-api-key", &h.api_key)
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(
        listed,
        json!([{"snapshotID": "snap-a", "names": ["snap-a"]}])
    );
    h.shutdown().await;
    Ok(())
}
