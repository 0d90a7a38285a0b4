//! E2B's REST API over the real control plane (simulated host agent), and the absolute
//! sandbox lifetime it maps to (`/v1` too): E2B's shapes, status codes and error body,
//! paging, deadlines that kill or pause, and bad input.

#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use chrono::Utc;
use common::{Engine, Harness, both_engines, e2b, e2b_as};
use nestbox_types::api::{CreateSandboxRequest, Sandbox};
use nestbox_types::{Expiry, SandboxStatus};
use serde_json::{Value, json};

both_engines!(
    lifetime_ends_a_sandbox_by_destroying_it,
    lifetime_end_pauses_and_resume_starts_a_new_one,
    lifetime_can_be_set_and_extended,
    e2b_create_get_list_and_kill,
    e2b_pause_connect_and_timeout,
    e2b_errors_have_e2b_shape,
    e2b_list_pages_with_next_token_header,
    e2b_templates_and_snapshots,
);

/// Asserts E2B's error shape with `status`.
#[track_caller]
fn e2b_error(got: &(u16, reqwest::header::HeaderMap, Value), status: u16) -> String {
    assert_eq!(got.0, status, "expected {status}, got {got:?}");
    assert_eq!(
        got.2["code"],
        json!(status),
        "body code must equal the status: {got:?}"
    );
    let message = got.2["message"].as_str().expect("a message").to_string();
    assert!(!message.is_empty());
    message
}

async fn with_lifetime(h: &Harness, secs: u32, on: Expiry) -> anyhow::Result<Sandbox> {
    Ok(h.key
        .create_sandbox(&CreateSandboxRequest {
            lifetime_sec: Some(secs),
            on_expiry: Some(on),
            ..Default::default()
        })
        .await?)
}

/// Moves a sandbox's deadline into the past, as if its lifetime had run out.
async fn expire(h: &Harness, sb: &Sandbox) -> anyhow::Result<()> {
    // A lifetime of 1 s and a wait for it: the database decides, never the test's clock.
    h.key.set_lifetime(sb.id, 1, false).await?;
    common::wait_until("the deadline to pass", || async {
        let end = h
            .key
            .get_sandbox(sb.id)
            .await
            .ok()
            .and_then(|s| s.expires_at);
        end.is_some_and(|end| Utc::now() > end + chrono::Duration::milliseconds(50))
    })
    .await
}

async fn lifetime_ends_a_sandbox_by_destroying_it(engine: Engine) -> anyhow::Result<()> {
    let h = Harness::start(engine).await?;
    let sb = with_lifetime(&h, 3600, Expiry::Destroy).await?;
    let untouched = h.sandbox().await?;
    let end = sb.expires_at.expect("a deadline");
    let lifetime = (end - sb.created_at).num_seconds();
    assert!((3599..=3601).contains(&lifetime), "{lifetime}");
    assert_eq!(sb.on_expiry, Expiry::Destroy);
    assert_eq!(h.expiry_pass().await?, 0, "nothing is due yet");

    expire(&h, &sb).await?;
    assert_eq!(h.expiry_pass().await?, 1);
    let gone = h.key.get_sandbox(sb.id).await?;
    assert_eq!(gone.status, SandboxStatus::Stopped);
    assert!(h.agent.sandbox(sb.id).is_none(), "destroyed on its host");
    assert_eq!(
        h.key.get_sandbox(untouched.id).await?.status,
        SandboxStatus::Running,
        "a sandbox without a lifetime never expires"
    );
    assert_eq!(h.expiry_pass().await?, 0);
    h.shutdown().await;
    Ok(())
}

async fn lifetime_end_pauses_and_resume_starts_a_new_one(engine: Engine) -> anyhow::Result<()> {
    let h = Harness::start(engine).await?;
    let sb = with_lifetime(&h, 600, Expiry::Pause).await?;
    expire(&h, &sb).await?;
    assert_eq!(h.expiry_pass().await?, 1);
    let paused = h.key.get_sandbox(sb.id).await?;
    assert_eq!(paused.status, SandboxStatus::Paused);
    assert_eq!(
        paused.expires_at, None,
        "a paused sandbox has no live deadline"
    );
    assert_eq!(
        h.expiry_pass().await?,
        0,
        "a paused sandbox is not paused again"
    );

    // The lifetime last set (1 s, by `expire`) applies again unless the resume names one.
    let resumed = h.key_api().resume(sb.id).await?;
    assert_eq!(resumed.status, SandboxStatus::Running);
    let (http, url) = h.raw(&format!("/v1/sandboxes/{}/pause", sb.id));
    http.post(url)
        .header("x-api-key", &h.api_key)
        .send()
        .await?;
    let (http, url) = h.raw(&format!("/v1/sandboxes/{}/resume", sb.id));
    let resp = http
        .post(url)
        .header("x-api-key", &h.api_key)
        .json(&json!({ "lifetime_sec": 1200 }))
        .send()
        .await?;
    assert_eq!(resp.status(), 200);
    let again: Sandbox = resp.json().await?;
    let left = (again.expires_at.unwrap() - Utc::now()).num_seconds();
    assert!((1100..=1200).contains(&left), "{left}");
    assert_eq!(again.lifetime_sec, Some(1200));
    h.shutdown().await;
    Ok(())
}

async fn lifetime_can_be_set_and_extended(engine: Engine) -> anyhow::Result<()> {
    let h = Harness::start(engine).await?;
    let sb = with_lifetime(&h, 600, Expiry::Destroy).await?;
    let shorter = h.key.set_lifetime(sb.id, 100, false).await?;
    assert!(shorter.expires_at < sb.expires_at, "set may shorten");
    let kept = h.key.set_lifetime(sb.id, 50, true).await?;
    assert_eq!(kept.expires_at, shorter.expires_at, "extend never shortens");
    let longer = h.key.set_lifetime(sb.id, 900, true).await?;
    assert!(longer.expires_at > shorter.expires_at);

    let plain = h.sandbox().await?;
    let still = h.key.set_lifetime(plain.id, 60, true).await?;
    assert_eq!(
        still.expires_at, None,
        "extend gives no deadline to a sandbox without one"
    );
    let now_has = h.key.set_lifetime(plain.id, 60, false).await?;
    assert!(now_has.expires_at.is_some());

    common::api_error(
        h.key.set_lifetime(sb.id, 0, false).await,
        400,
        nestbox_types::ErrorCode::InvalidRequest,
    );
    common::api_error(
        h.key.set_lifetime(sb.id, u32::MAX, false).await,
        400,
        nestbox_types::ErrorCode::LimitExceeded,
    );
    h.key_api().pause(sb.id).await?;
    common::api_error(
        h.key.set_lifetime(sb.id, 60, false).await,
        409,
        nestbox_types::ErrorCode::SandboxNotRunning,
    );
    h.shutdown().await;
    Ok(())
}

async fn e2b_create_get_list_and_kill(engine: Engine) -> anyhow::Result<()> {
    use reqwest::Method;
    let h = Harness::start(engine).await?;
    let created = e2b(
        &h,
        Method::POST,
        "/v2/sandboxes",
        Some(json!({"templateID": "base", "metadata": {"app": "x y"}, "envVars": {"A": "1"}})),
    )
    .await?;
    assert_eq!(created.0, 201, "{created:?}");
    let body = &created.2;
    for key in [
        "templateID",
        "sandboxID",
        "clientID",
        "envdVersion",
        "envdAccessToken",
        "trafficAccessToken",
    ] {
        assert!(body[key].is_string(), "{key} in {body}");
    }
    assert_eq!(body["templateID"], "minimal");
    assert_eq!(body["envdVersion"], nestbox_types::limits::ENVD_VERSION);
    let id = body["sandboxID"].as_str().unwrap().to_string();
    let on_agent = h
        .agent
        .sandbox(id.parse::<nestbox_types::SandboxId>()?)
        .expect("runs on the agent");
    assert_eq!(on_agent.env().get("A").map(String::as_str), Some("1"));

    let got = e2b(&h, Method::GET, &format!("/sandboxes/{id}"), None).await?;
    assert_eq!(got.0, 200);
    assert_eq!(got.2["state"], "running");
    assert_eq!(got.2["metadata"]["app"], "x y");
    assert_eq!(got.2["lifecycle"]["onTimeout"], "kill");
    let end = chrono::DateTime::parse_from_rfc3339(got.2["endAt"].as_str().unwrap())?;
    let left = (end.with_timezone(&Utc) - Utc::now()).num_seconds();
    assert!(
        (250..=300).contains(&left),
        "E2B's default lifetime is 300 s: {left}"
    );
    for key in [
        "startedAt",
        "cpuCount",
        "memoryMB",
        "diskSizeMB",
        "envdAccessToken",
    ] {
        assert!(!got.2[key].is_null(), "{key} in {}", got.2);
    }

    // The SDKs encode each key and value, then the whole filter once more.
    let filter = "app%3Dx%252520y";
    let listed = e2b(
        &h,
        Method::GET,
        &format!("/v2/sandboxes?metadata={filter}"),
        None,
    )
    .await?;
    assert_eq!(listed.0, 200);
    let ids: Vec<&str> = listed
        .2
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["sandboxID"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec![id.as_str()]);
    let running = e2b(&h, Method::GET, "/sandboxes", None).await?;
    assert_eq!(running.2.as_array().unwrap().len(), 1);

    let killed = e2b(&h, Method::DELETE, &format!("/sandboxes/{id}"), None).await?;
    assert_eq!((killed.0, &killed.2), (204, &Value::Null));
    e2b_error(
        &e2b(&h, Method::DELETE, &format!("/sandboxes/{id}"), None).await?,
        404,
    );
    e2b_error(
        &e2b(&h, Method::GET, &format!("/sandboxes/{id}"), None).await?,
        404,
    );
    let listed = e2b(&h, Method::GET, "/v2/sandboxes", None).await?;
    assert_eq!(listed.2, json!([]), "killed sandboxes are not listed");
    h.shutdown().await;
    Ok(())
}

async fn e2b_pause_connect_and_timeout(engine: Engine) -> anyhow::Result<()> {
    use reqwest::Method;
    let h = Harness::start(engine).await?;
    let created = e2b(
        &h,
        Method::POST,
        "/sandboxes",
        Some(json!({"templateID": "base", "timeout": 60, "autoPause": true})),
    )
    .await?;
    assert_eq!(created.0, 201);
    let id = created.2["sandboxID"].as_str().unwrap().to_string();
    let sb: nestbox_types::SandboxId = id.parse()?;
    assert_eq!(h.key.get_sandbox(sb).await?.on_expiry, Expiry::Pause);
    assert_eq!(
        h.key.get_sandbox(sb).await?.timeout_sec,
        0,
        "no inactivity timeout"
    );

    let t = e2b(
        &h,
        Method::POST,
        &format!("/sandboxes/{id}/timeout"),
        Some(json!({"timeout": 3000})),
    )
    .await?;
    assert_eq!((t.0, &t.2), (204, &Value::Null));
    let left = (h.key.get_sandbox(sb).await?.expires_at.unwrap() - Utc::now()).num_seconds();
    assert!((2900..=3000).contains(&left), "{left}");
    let r = e2b(
        &h,
        Method::POST,
        &format!("/sandboxes/{id}/refreshes"),
        Some(json!({"duration": 10})),
    )
    .await?;
    assert_eq!(r.0, 204);
    let after = (h.key.get_sandbox(sb).await?.expires_at.unwrap() - Utc::now()).num_seconds();
    assert!(after > 2900, "a refresh never shortens: {after}");

    let connected = e2b(
        &h,
        Method::POST,
        &format!("/v2/sandboxes/{id}/connect"),
        Some(json!({})),
    )
    .await?;
    assert_eq!(connected.0, 200, "a running sandbox: 200 {connected:?}");
    let p = e2b(
        &h,
        Method::POST,
        &format!("/sandboxes/{id}/pause"),
        Some(json!({})),
    )
    .await?;
    assert_eq!((p.0, &p.2), (204, &Value::Null));
    e2b_error(
        &e2b(
            &h,
            Method::POST,
            &format!("/sandboxes/{id}/pause"),
            Some(json!({})),
        )
        .await?,
        409,
    );
    assert_eq!(
        e2b(&h, Method::GET, &format!("/sandboxes/{id}"), None)
            .await?
            .2["state"],
        "paused"
    );
    let paused = e2b(&h, Method::GET, "/v2/sandboxes?state=paused", None).await?;
    assert_eq!(paused.2.as_array().unwrap().len(), 1);

    let resumed = e2b(
        &h,
        Method::POST,
        &format!("/v2/sandboxes/{id}/connect"),
        Some(json!({"timeout": 120})),
    )
    .await?;
    assert_eq!(resumed.0, 201, "{resumed:?}");
    assert_eq!(resumed.2["sandboxID"], json!(id));
    let left = (h.key.get_sandbox(sb).await?.expires_at.unwrap() - Utc::now()).num_seconds();
    assert!((100..=120).contains(&left), "{left}");
    e2b_error(
        &e2b(&h, Method::POST, &format!("/sandboxes/{id}/resume"), None).await?,
        409,
    );
    h.shutdown().await;
    Ok(())
}

async fn e2b_errors_have_e2b_shape(engine: Engine) -> anyhow::Result<()> {
    use reqwest::Method;
    let h = Harness::start(engine).await?;
    let sb = h.sandbox().await?;
    let cases: Vec<(Method, String, Option<Value>, u16)> = vec![
        (
            Method::POST,
            "/v2/sandboxes".into(),
            Some(json!({"templateID": "nope"})),
            404,
        ),
        (
            Method::POST,
            "/v2/sandboxes".into(),
            Some(json!({"templateID": "../x"})),
            400,
        ),
        (
            Method::POST,
            "/v2/sandboxes".into(),
            Some(json!({"timeout": 5})),
            400,
        ),
        (
            Method::POST,
            "/v2/sandboxes".into(),
            Some(json!({"templateID": "base", "timeout": 0})),
            400,
        ),
        (
            Method::POST,
            "/v2/sandboxes".into(),
            Some(json!({"templateID": "base", "timeout": 4_000_000_000u64})),
            400,
        ),
        (
            Method::POST,
            "/v2/sandboxes".into(),
            Some(json!({"templateID": "base", "envVars": {"1bad": "x"}})),
            400,
        ),
        (
            Method::POST,
            "/v2/sandboxes".into(),
            Some(json!({"templateID": "base", "mcp": {"x": {}}})),
            400,
        ),
        (
            Method::POST,
            "/v2/sandboxes".into(),
            Some(json!({"templateID": "base", "network": {"allowOut": ["::1"]}})),
            400,
        ),
        (
            Method::POST,
            "/v2/sandboxes".into(),
            Some(json!({"templateID": "base", "network": {"denyOut": ["example.com"]}})),
            400,
        ),
        (
            Method::POST,
            "/v2/sandboxes".into(),
            Some(json!({"templateID": "base", "network": {"rules": {"a.com": [{}]}}})),
            400,
        ),
        (
            Method::POST,
            "/v2/sandboxes".into(),
            Some(json!({"templateID": "base", "network": {"egressProxy": {"address": "p:1080"}}})),
            400,
        ),
        (
            Method::POST,
            "/v2/sandboxes".into(),
            Some(
                json!({"templateID": "base", "network": {"allowOut": ["a.com"], "dnsServers": ["dns.google"]}}),
            ),
            400,
        ),
        (
            Method::PUT,
            format!("/sandboxes/{}/network", sb.id),
            Some(json!({"allowOut": ["1.2.3.4/40"]})),
            400,
        ),
        (
            Method::PUT,
            format!("/sandboxes/{}/network", sb.id),
            Some(json!({"allowOut": "not a list"})),
            400,
        ),
        (
            Method::PUT,
            "/sandboxes/sb-00000000-0000-0000-0000-000000000000/network".into(),
            Some(json!({})),
            404,
        ),
        (
            Method::POST,
            "/v2/sandboxes".into(),
            Some(json!("not an object")),
            400,
        ),
        (Method::GET, "/sandboxes/not-an-id".into(), None, 404),
        (
            Method::GET,
            "/sandboxes/sb-00000000-0000-0000-0000-000000000000".into(),
            None,
            404,
        ),
        (
            Method::POST,
            format!("/sandboxes/{}/timeout", sb.id),
            Some(json!({})),
            400,
        ),
        (
            Method::POST,
            format!("/sandboxes/{}/timeout", sb.id),
            Some(json!({"timeout": -1})),
            400,
        ),
        (
            Method::POST,
            format!("/sandboxes/{}/refreshes", sb.id),
            Some(json!({"duration": 99999})),
            400,
        ),
        (
            Method::POST,
            format!("/sandboxes/{}/pause", sb.id),
            Some(json!({"memory": false})),
            400,
        ),
        (Method::GET, "/v2/sandboxes?limit=0".into(), None, 400),
        (Method::GET, "/v2/sandboxes?state=gone".into(), None, 400),
        (
            Method::GET,
            "/v2/sandboxes?nextToken=garbage".into(),
            None,
            400,
        ),
        (
            Method::GET,
            format!("/sandboxes/{}/metrics?start=10&end=5", sb.id),
            None,
            400,
        ),
        (Method::GET, "/templates/nope".into(), None, 404),
        (Method::DELETE, "/templates/nope".into(), None, 404),
        (Method::GET, "/templates/aliases/nope".into(), None, 404),
    ];
    for (method, path, body, status) in cases {
        let got = e2b(&h, method.clone(), &path, body.clone()).await?;
        let message = e2b_error(&got, status);
        assert!(
            !message.contains("request id") || status >= 500,
            "{method} {path}: {message}"
        );
    }
    // A wrong key and no key: 401 in E2B's shape.
    let wrong = e2b_as(&h, "e2b_wrong", Method::GET, "/v2/sandboxes", None).await?;
    e2b_error(&wrong, 401);
    let (http, url) = h.raw("/v2/sandboxes");
    let resp = http.get(url).send().await?;
    assert_eq!(resp.status(), 401);
    let body: Value = resp.json().await?;
    assert_eq!(body["code"], 401);
    // Creates are never retried by the SDK on our say-so.
    let failed = e2b(
        &h,
        Method::POST,
        "/v2/sandboxes",
        Some(json!({"templateID": "nope"})),
    )
    .await?;
    assert_eq!(failed.1.get("should-retry").unwrap(), "false");
    h.shutdown().await;
    Ok(())
}

async fn e2b_list_pages_with_next_token_header(engine: Engine) -> anyhow::Result<()> {
    use reqwest::Method;
    let h = Harness::start(engine).await?;
    let mut made = Vec::new();
    for _ in 0..5 {
        let c = e2b(
            &h,
            Method::POST,
            "/v2/sandboxes",
            Some(json!({"templateID": "base", "metadata": {"batch": "b"}})),
        )
        .await?;
        made.push(c.2["sandboxID"].as_str().unwrap().to_string());
    }
    let mut seen = Vec::new();
    let mut next: Option<String> = None;
    let mut pages = 0;
    loop {
        let path = match &next {
            Some(t) => format!("/v2/sandboxes?limit=2&metadata=batch%3Db&nextToken={t}"),
            None => "/v2/sandboxes?limit=2&metadata=batch%3Db".to_string(),
        };
        let page = e2b(&h, Method::GET, &path, None).await?;
        assert_eq!(page.0, 200);
        pages += 1;
        seen.extend(
            page.2
                .as_array()
                .unwrap()
                .iter()
                .map(|s| s["sandboxID"].as_str().unwrap().to_string()),
        );
        match page.1.get("x-next-token") {
            Some(t) => next = Some(t.to_str()?.to_string()),
            None => break,
        }
    }
    assert_eq!(pages, 3);
    seen.sort();
    made.sort();
    assert_eq!(seen, made);
    h.shutdown().await;
    Ok(())
}

async fn e2b_templates_and_snapshots(engine: Engine) -> anyhow::Result<()> {
    use reqwest::Method;
    let h = Harness::start(engine).await?;
    let sb = h.sandbox().await?;
    let list = e2b(&h, Method::GET, "/templates", None).await?;
    assert_eq!(list.0, 200);
    let minimal = list
        .2
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["templateID"] == "minimal")
        .expect("minimal");
    assert_eq!(minimal["public"], true);
    assert_eq!(minimal["buildStatus"], "ready");
    let one = e2b(&h, Method::GET, "/templates/base", None).await?;
    assert_eq!((one.0, &one.2["templateID"]), (200, &json!("minimal")));
    assert_eq!(one.2["builds"].as_array().unwrap().len(), 1);
    let alias = e2b(&h, Method::GET, "/templates/aliases/minimal", None).await?;
    assert_eq!(alias.2, json!({"templateID": "minimal", "public": true}));

    let snap = e2b(
        &h,
        Method::POST,
        &format!("/sandboxes/{}/snapshots", sb.id),
        Some(json!({"name": "e2b-snap"})),
    )
    .await?;
    assert_eq!(snap.0, 201, "{snap:?}");
    assert_eq!(
        snap.2,
        json!({"snapshotID": "e2b-snap", "names": ["e2b-snap"]})
    );
    let unnamed = e2b(
        &h,
        Method::POST,
        &format!("/sandboxes/{}/snapshots", sb.id),
        None,
    )
    .await?;
    assert_eq!(unnamed.0, 201, "{unnamed:?}");
    let snaps = e2b(&h, Method::GET, "/snapshots", None).await?;
    assert_eq!(snaps.2.as_array().unwrap().len(), 2);
    let from = e2b(
        &h,
        Method::POST,
        "/v2/sandboxes",
        Some(json!({"templateID": "e2b-snap"})),
    )
    .await?;
    assert_eq!(from.0, 201, "{from:?}");
    e2b_error(
        &e2b(&h, Method::DELETE, "/templates/e2b-snap", None).await?,
        409,
    );
    e2b(
        &h,
        Method::DELETE,
        &format!("/sandboxes/{}", from.2["sandboxID"].as_str().unwrap()),
        None,
    )
    .await?;
    assert_eq!(
        e2b(&h, Method::DELETE, "/templates/e2b-snap", None)
            .await?
            .0,
        204
    );
    e2b_error(
        &e2b(&h, Method::DELETE, "/templates/e2b-snap", None).await?,
        404,
    );
    e2b_error(
        &e2b(&h, Method::DELETE, "/templates/base", None).await?,
        403,
    );
    h.shutdown().await;
    Ok(())
}
