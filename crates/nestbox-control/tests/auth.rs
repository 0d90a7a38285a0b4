//! Authentication: logging in, who the caller is, disabled accounts, and what malformed
//! credentials and bodies get back (always our `{"error":{"code","message"}}` shape).

// Tests may panic on what they expect (see clippy.toml); helpers here are not `#[test]`s.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use anyhow::Context as _;
use common::{ADMIN_EMAIL, Engine, Harness, PASSWORD, api_error, both_engines, raw_error};
use nestbox_db::{UserStatus, users};
use nestbox_types::ErrorCode;
use nestbox_types::api::CreateSandboxRequest;
use reqwest::header::{AUTHORIZATION, CONTENT_TYPE};

both_engines!(
    login_and_me,
    wrong_password_and_unknown_email_look_the_same,
    api_key_me,
    disabled_user_is_locked_out_at_once,
    malformed_credentials_are_401,
    team_header_selects_only_own_teams,
    malformed_bodies_get_our_error_shape,
    login_floods_get_429_while_the_rest_keeps_answering,
);

async fn login_and_me(engine: Engine) -> anyhow::Result<()> {
    let h = Harness::start(engine).await?;
    let alice = h.user("alice").await?;

    let login = h.anonymous().login("Alice@Example.com", PASSWORD).await?;
    assert_eq!(login.user.id, alice.id, "emails are case-insensitive");
    assert!(!login.user.is_admin && login.user.active);
    assert!(login.expires_at > chrono::Utc::now());

    let me = h.anonymous().with_token(&login.token).me().await?;
    let user = me.user.expect("a session's caller is a user");
    assert_eq!(user.email, "alice@example.com");
    assert_eq!(
        me.team_id, alice.team,
        "acts for the personal team by default"
    );
    assert_eq!(me.teams.len(), 1);
    assert!(me.teams[0].is_default);
    assert_eq!(me.teams[0].role, nestbox_types::TeamRole::Owner);

    let admin = h.admin.client.me().await?;
    assert!(
        admin.user.expect("a user").is_admin,
        "the first-run user is a platform admin"
    );
    assert_eq!(admin.team_id, h.team);
    h.shutdown().await;
    Ok(())
}

async fn wrong_password_and_unknown_email_look_the_same(engine: Engine) -> anyhow::Result<()> {
    let h = Harness::start(engine).await?;
    let mut wrong = api_error(
        h.anonymous().login(ADMIN_EMAIL, "not the password").await,
        401,
        ErrorCode::Unauthorized,
    );
    let mut unknown = api_error(
        h.anonymous().login("nobody@example.com", PASSWORD).await,
        401,
        ErrorCode::Unauthorized,
    );
    // Each names its own request; nothing else differs.
    assert_ne!(wrong.error.request_id, unknown.error.request_id);
    (wrong.error.request_id, unknown.error.request_id) = (None, None);
    assert_eq!(
        wrong, unknown,
        "a wrong password and an unknown email must be indistinguishable"
    );
    h.shutdown().await;
    Ok(())
}

async fn api_key_me(engine: Engine) -> anyhow::Result<()> {
    let h = Harness::start(engine).await?;
    let me = h.key.me().await?;
    assert!(me.user.is_none(), "an API key is not a user");
    assert_eq!(me.team_id, h.team);
    assert_eq!(me.teams.len(), 1);
    assert_eq!(me.teams[0].team.id, h.team);
    assert_eq!(me.teams[0].role, nestbox_types::TeamRole::Member);
    h.shutdown().await;
    Ok(())
}

async fn disabled_user_is_locked_out_at_once(engine: Engine) -> anyhow::Result<()> {
    let h = Harness::start(engine).await?;
    let bob = h.user("bob").await?;
    bob.client.me().await?;

    users::set_status(&h.services.db, bob.id, UserStatus::Disabled).await?;
    api_error(bob.client.me().await, 401, ErrorCode::Unauthorized);
    api_error(
        bob.client.list_sandboxes(&Default::default()).await,
        401,
        ErrorCode::Unauthorized,
    );
    api_error(
        h.anonymous().login(&bob.email, PASSWORD).await,
        401,
        ErrorCode::Unauthorized,
    );

    users::set_status(&h.services.db, bob.id, UserStatus::Active).await?;
    bob.client.me().await?;
    h.shutdown().await;
    Ok(())
}

async fn malformed_credentials_are_401(engine: Engine) -> anyhow::Result<()> {
    let h = Harness::start(engine).await?;
    let (http, url) = h.raw("/v1/me");
    let cases: [(&str, &str); 7] = [
        ("authorization", "Basic YWRtaW46cGFzcw=="),
        ("authorization", "Bearer"),
        ("authorization", "Bearer not.a.jwt"),
        ("authorization", "Token abc"),
        ("x-api-key", "nbx_0000"),
        ("x-api-key", "definitely not a key"),
        ("x-api-key", "   "),
    ];
    for (name, value) in cases {
        let resp = http.get(&url).header(name, value).send().await?;
        raw_error(resp, 401, ErrorCode::Unauthorized)
            .await
            .with_context(|| format!("{name}: {value}"))?;
    }
    raw_error(http.get(&url).send().await?, 401, ErrorCode::Unauthorized).await?;

    // A session token signed by another installation is refused too.
    let other = Harness::start(engine).await?;
    let resp = http
        .get(&url)
        .header(
            AUTHORIZATION,
            format!("Bearer {}", forged_token(&other).await?),
        )
        .send()
        .await?;
    raw_error(resp, 401, ErrorCode::Unauthorized).await?;
    other.shutdown().await;
    h.shutdown().await;
    Ok(())
}

/// A valid session token of `h`'s installation (for presenting it to another one).
async fn forged_token(h: &Harness) -> anyhow::Result<String> {
    Ok(h.services.sessions.issue(h.admin.id)?.0)
}

async fn team_header_selects_only_own_teams(engine: Engine) -> anyhow::Result<()> {
    let h = Harness::start(engine).await?;
    let carol = h.user("carol").await?;
    let (http, url) = h.raw("/v1/me");
    let token = h.services.sessions.issue(carol.id)?.0;
    let with_team = |team: &str| {
        http.get(&url)
            .bearer_auth(&token)
            .header("x-nestbox-team", team)
    };
    raw_error(
        with_team("not-a-team").send().await?,
        400,
        ErrorCode::InvalidRequest,
    )
    .await?;
    raw_error(
        with_team(&h.team.to_string()).send().await?,
        404,
        ErrorCode::TeamNotFound,
    )
    .await?;
    let me: nestbox_types::api::Me = with_team(&carol.team.to_string())
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(me.team_id, carol.team);
    // The platform team: its templates are every team's, so only platform admins act for it.
    let platform = nestbox_types::PLATFORM_TEAM.to_string();
    raw_error(
        with_team(&platform).send().await?,
        404,
        ErrorCode::TeamNotFound,
    )
    .await?;
    let admin = h.services.sessions.issue(h.admin.id)?.0;
    let me: nestbox_types::api::Me = http
        .get(&url)
        .bearer_auth(&admin)
        .header("x-nestbox-team", &platform)
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(me.team_id, nestbox_types::PLATFORM_TEAM);
    h.shutdown().await;
    Ok(())
}

async fn malformed_bodies_get_our_error_shape(engine: Engine) -> anyhow::Result<()> {
    let h = Harness::start(engine).await?;
    let (http, login) = h.raw("/v1/auth/login");
    let json = |url: &str, body: &str| {
        http.post(url)
            .header(CONTENT_TYPE, "application/json")
            .body(body.to_string())
    };
    let bodies = [
        "{not json",
        "",
        "[]",
        r#"{"email": 7, "password": "x"}"#,
        r#"{"email": "a@b.c"}"#,
        r#"{"email": "a@b.c", "password": "x", "extra": true}"#,
    ];
    for body in bodies {
        let resp = json(&login, body).send().await?;
        raw_error(resp, 400, ErrorCode::InvalidRequest)
            .await
            .with_context(|| format!("body {body:?}"))?;
    }
    let resp = http
        .post(&login)
        .body(r#"{"email":"a@b.c","password":"x"}"#)
        .send()
        .await?;
    raw_error(resp, 400, ErrorCode::InvalidRequest)
        .await
        .context("a JSON body without its content type")?;

    // Authenticated routes too, and path and query parameters.
    let (_, sandboxes) = h.raw("/v1/sandboxes");
    let key = api_key_of(&h).await?;
    let resp = json(&sandboxes, r#"{"vcpus": "many"}"#)
        .header("x-api-key", &key)
        .send()
        .await?;
    raw_error(resp, 400, ErrorCode::InvalidRequest).await?;
    let resp = http
        .get(format!("{sandboxes}/not-a-sandbox-id"))
        .header("x-api-key", &key)
        .send()
        .await?;
    raw_error(resp, 400, ErrorCode::InvalidRequest).await?;
    let resp = http
        .get(format!("{sandboxes}?limit=lots"))
        .header("x-api-key", &key)
        .send()
        .await?;
    raw_error(resp, 400, ErrorCode::InvalidRequest).await?;
    api_error(
        h.key
            .create_sandbox(&CreateSandboxRequest {
                template: Some("../etc".into()),
                ..Default::default()
            })
            .await,
        400,
        ErrorCode::InvalidRequest,
    );
    let (_, nowhere) = h.raw("/v1/no/such/route");
    raw_error(http.get(nowhere).send().await?, 404, ErrorCode::NotFound).await?;
    h.shutdown().await;
    Ok(())
}

/// A fresh API key of the first-run team, as a header value.
async fn api_key_of(h: &Harness) -> anyhow::Result<String> {
    Ok(h.admin
        .client
        .create_api_key(h.team, "raw requests")
        .await?
        .key)
}

async fn login_floods_get_429_while_the_rest_keeps_answering(engine: Engine) -> anyhow::Result<()> {
    let h = Harness::with(
        engine,
        common::Options {
            login_limits: nestbox_control::throttle::LoginLimits {
                per_address_per_minute: 12,
                per_account_per_minute: 4,
            },
            ..Default::default()
        },
    )
    .await?;
    let alice = h.user("alice").await?;
    let login = |email: String, password: &'static str| {
        let (http, url) = h.raw("/v1/auth/login");
        async move {
            let resp = http
                .post(url)
                .json(&serde_json::json!({ "email": email, "password": password }))
                .send()
                .await?;
            let retry = resp
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok());
            let status = resp.status().as_u16();
            let body: serde_json::Value = resp.json().await?;
            anyhow::Ok((status, retry, body))
        }
    };
    // One account guessed at: four attempts are checked, the fifth is refused unhashed,
    // even with the right password.
    for _ in 0..4 {
        assert_eq!(login(alice.email.clone(), "wrong password!").await?.0, 401);
    }
    let (status, retry, body) = login(alice.email.clone(), common::PASSWORD).await?;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (429, Some("rate_limited"))
    );
    assert!(
        retry.is_some_and(|s| (1..=60).contains(&s)),
        "Retry-After {retry:?}"
    );
    // Spraying other accounts from the same address runs out too, while everything else
    // keeps answering.
    let flood: Vec<_> = (0..20)
        .map(|i| login(format!("nobody{i}@example.com"), "whatever password"))
        .collect();
    let anonymous = h.anonymous();
    let (results, health) = tokio::join!(futures::future::join_all(flood), anonymous.health());
    assert_eq!(health?.status, "ok");
    let refused = results
        .iter()
        .filter(|r| matches!(r, Ok((429, _, _))))
        .count();
    assert!(refused >= 12, "{refused} of 20 refused");
    assert!(results.iter().all(|r| matches!(r, Ok((401 | 429, _, _)))));
    assert!(h.key.me().await.is_ok(), "API keys are not throttled");
    h.shutdown().await;
    Ok(())
}
