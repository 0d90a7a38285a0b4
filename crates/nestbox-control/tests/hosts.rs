//! Host credentials over the API, on SQLite and PostgreSQL: a registered host's token pair
//! is rotated by refreshes, old tokens stop working, a pair lost in a crash can be asked
//! for again, a replayed refresh token is refused and audited, every refresh failure is
//! 401, expired access tokens are refused, and deleting a host revokes what it holds.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{Engine, Harness, Options, both_engines, raw_error};
use nestbox_db::Page;
use nestbox_db::audit::{self, AuditFilter, AuditScope};
use nestbox_testkit::SimAgentConfig;
use nestbox_types::ErrorCode;
use nestbox_types::api::{HeartbeatRequest, HostTokenPair};

both_engines!(
    a_refresh_rotates_the_pair_and_old_tokens_stop_working,
    a_pair_lost_before_it_was_stored_can_be_asked_for_again,
    every_refresh_failure_is_401,
    an_expired_access_token_is_refused_until_refreshed,
    deleting_a_host_revokes_its_tokens,
    deleting_a_host_with_sandboxes_names_them_unless_forced,
);

fn refused(e: nestbox_testkit::simagent::SimAgentError) -> Option<u16> {
    e.status()
}

/// A heartbeat of the harness's agent with `token`.
async fn heartbeat_with(h: &Harness, token: &str) -> anyhow::Result<reqwest::Response> {
    let (http, url) = h.raw(&format!("/v1/hosts/{}/heartbeat", h.host_id));
    Ok(http
        .post(url)
        .bearer_auth(token)
        .json(&HeartbeatRequest {
            sandboxes: 0,
            version: "1".into(),
            address: h.agent.address(),
            ..Default::default()
        })
        .send()
        .await?)
}

async fn refresh_with(h: &Harness, body: &str) -> anyhow::Result<reqwest::Response> {
    let (http, url) = h.raw("/v1/hosts/refresh");
    Ok(http
        .post(url)
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await?)
}

fn refresh_body(pair: &HostTokenPair) -> String {
    serde_json::json!({ "refresh_token": pair.refresh_token }).to_string()
}

async fn a_refresh_rotates_the_pair_and_old_tokens_stop_working(
    engine: Engine,
) -> anyhow::Result<()> {
    let h = Harness::start(engine).await?;
    let old = h.agent.credentials().unwrap().credentials;
    assert!(old.access_expires_at < old.refresh_expires_at);
    let new = h.agent.refresh().await?;
    assert_ne!(new.access_token, old.access_token);
    assert_ne!(new.refresh_token, old.refresh_token);
    h.agent.heartbeat().await?;

    // The old access token is revoked with its pair.
    raw_error(
        heartbeat_with(&h, &old.access_token).await?,
        401,
        ErrorCode::Unauthorized,
    )
    .await?;
    // The old refresh token, replayed once its successor was used, is refused and audited.
    raw_error(
        refresh_with(&h, &refresh_body(&old)).await?,
        401,
        ErrorCode::Unauthorized,
    )
    .await?;
    let logged = audit::list(
        &h.services.db,
        AuditScope::Platform,
        &AuditFilter {
            resource_type: Some("host".into()),
            action: Some("host.refresh_reused".into()),
        },
        &Page::default(),
    )
    .await?;
    assert_eq!(logged.items.len(), 1, "{logged:?}");
    assert_eq!(
        logged.items[0].resource_id.as_deref(),
        Some(h.host_id.to_string().as_str())
    );
    // The current pair still works and keeps rotating.
    h.agent.refresh().await?;
    h.agent.heartbeat().await?;
    h.shutdown().await;
    Ok(())
}

async fn a_pair_lost_before_it_was_stored_can_be_asked_for_again(
    engine: Engine,
) -> anyhow::Result<()> {
    let h = Harness::start(engine).await?;
    let kept = h.agent.credentials().unwrap().credentials;
    // The control plane issues a pair; the agent dies before storing it.
    let lost = h.agent.refresh().await?;
    h.agent.set_tokens(kept.clone());
    // On restart it still holds the pair it had: trading it again works.
    let again = h.agent.refresh().await?;
    h.agent.heartbeat().await?;
    // The lost pair is worthless now.
    raw_error(
        heartbeat_with(&h, &lost.access_token).await?,
        401,
        ErrorCode::Unauthorized,
    )
    .await?;
    raw_error(
        refresh_with(&h, &refresh_body(&lost)).await?,
        401,
        ErrorCode::Unauthorized,
    )
    .await?;
    // And once the new pair was used, the old refresh token is a replay.
    raw_error(
        refresh_with(&h, &refresh_body(&kept)).await?,
        401,
        ErrorCode::Unauthorized,
    )
    .await?;
    assert_eq!(h.agent.credentials().unwrap().credentials, again);
    h.agent.heartbeat().await?;
    h.shutdown().await;
    Ok(())
}

async fn every_refresh_failure_is_401(engine: Engine) -> anyhow::Result<()> {
    let h = Harness::start(engine).await?;
    let access = h.agent.credentials().unwrap().credentials.access_token;
    for body in [
        "",
        "not json",
        "{}",
        r#"{"refresh_token": ""}"#,
        r#"{"refresh_token": 7}"#,
        r#"{"refresh_token": "nbxhr_0000"}"#,
        &serde_json::json!({ "refresh_token": access }).to_string(),
        &serde_json::json!({ "refresh_token": "x".repeat(10_000) }).to_string(),
    ] {
        raw_error(refresh_with(&h, body).await?, 401, ErrorCode::Unauthorized)
            .await
            .map_err(|e| e.context(format!("body {body:.40}")))?;
    }
    // Nothing was spent: the agent's own refresh still works.
    h.agent.refresh().await?;
    h.shutdown().await;
    Ok(())
}

async fn an_expired_access_token_is_refused_until_refreshed(engine: Engine) -> anyhow::Result<()> {
    let h = Harness::with(
        engine,
        Options {
            host_access_ttl: Duration::from_secs(2),
            ..Options::default()
        },
    )
    .await?;
    let pair = h.agent.credentials().unwrap().credentials;
    let left = pair.access_expires_at - chrono::Utc::now();
    tokio::time::sleep(left.to_std().unwrap_or_default() + Duration::from_millis(1100)).await;
    raw_error(
        heartbeat_with(&h, &pair.access_token).await?,
        401,
        ErrorCode::Unauthorized,
    )
    .await?;
    // The refresh token outlives it.
    h.agent.refresh().await?;
    h.agent.heartbeat().await?;
    h.shutdown().await;
    Ok(())
}

async fn deleting_a_host_revokes_its_tokens(engine: Engine) -> anyhow::Result<()> {
    let h = Harness::start(engine).await?;
    let other = h.add_agent("sim-2", SimAgentConfig::default()).await?;
    let host = other.host_id().unwrap();
    let pair = other.credentials().unwrap().credentials;
    other.heartbeat().await?;
    h.admin.client.delete_host(host).await?;
    assert_eq!(other.heartbeat().await.err().and_then(refused), Some(401));
    assert_eq!(other.refresh().await.err().and_then(refused), Some(401));
    raw_error(
        refresh_with(&h, &refresh_body(&pair)).await?,
        401,
        ErrorCode::Unauthorized,
    )
    .await?;
    other.shutdown().await;
    h.shutdown().await;
    Ok(())
}

async fn deleting_a_host_with_sandboxes_names_them_unless_forced(
    engine: Engine,
) -> anyhow::Result<()> {
    let h = Harness::start(engine).await?;
    let here = h.sandbox().await?;
    // A second host takes the next sandbox (the emptier), then goes away for good.
    let gone = h.add_agent("sim-2", SimAgentConfig::default()).await?;
    let gone_host = gone.host_id().unwrap();
    let stranded = h.sandbox().await?;
    assert_eq!(stranded.host_id, Some(gone_host));
    let paused = h.sandbox().await?;
    assert_eq!(paused.host_id, Some(h.host_id));
    h.key.pause_sandbox(paused.id).await?;

    // Refused, naming what it holds (running and paused alike).
    let body = common::api_error(
        h.admin.client.delete_host(h.host_id).await,
        409,
        ErrorCode::Conflict,
    );
    let mut named = body.error.sandbox_ids.clone();
    named.sort();
    let mut expected = vec![here.id, paused.id];
    expected.sort();
    assert_eq!(named, expected);

    // Forced, even when the host no longer answers: its sandboxes are destroyed (on the
    // host when it answers) and recorded stopped, and the host is gone.
    gone.shutdown().await;
    h.admin.client.force_delete_host(gone_host).await?;
    let got = h.key.get_sandbox(stranded.id).await?;
    assert_eq!(got.status, nestbox_types::SandboxStatus::Stopped);
    h.admin.client.force_delete_host(h.host_id).await?;
    for id in [here.id, paused.id] {
        let got = h.key.get_sandbox(id).await?;
        assert_eq!(got.status, nestbox_types::SandboxStatus::Stopped, "{id}");
    }
    assert!(h.agent.sandbox_ids().is_empty(), "destroyed on the host");
    assert!(h.admin.client.list_hosts().await?.items.is_empty());
    h.shutdown().await;
    Ok(())
}
