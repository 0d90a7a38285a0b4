//! `GET /metrics`: the fleet's state and this replica's counters in the OpenMetrics text
//! format, for platform admins and for a scraper holding the configured token.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{Engine, Harness, Options, both_engines};
use nestbox_types::api::CreateSandboxRequest;

both_engines!(metrics_describe_the_fleet_and_are_for_admins_and_the_scraper);

const TOKEN: &str = "a-scrape-token-of-some-length";

async fn scrape(url: &str, bearer: Option<&str>) -> (u16, String, String) {
    let mut req = reqwest::Client::new().get(format!("{url}/metrics"));
    if let Some(b) = bearer {
        req = req.bearer_auth(b);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let kind = resp
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    (status, kind, resp.text().await.unwrap())
}

async fn metrics_describe_the_fleet_and_are_for_admins_and_the_scraper(
    engine: Engine,
) -> anyhow::Result<()> {
    let h = Harness::with(
        engine,
        Options {
            metrics_token: Some(TOKEN.into()),
            ..Options::default()
        },
    )
    .await?;
    let sb = h.sandbox().await?;
    h.key.get_sandbox(sb.id).await?;

    let (status, kind, text) = scrape(&h.url, Some(TOKEN)).await;
    assert_eq!(status, 200, "{text}");
    assert!(kind.starts_with("application/openmetrics-text"), "{kind}");
    for line in [
        "nestbox_sandboxes{status=\"running\"} 1",
        "nestbox_sandboxes{status=\"paused\"} 0",
        "nestbox_hosts{status=\"online\"} 1",
        "nestbox_scheduler_decisions_total{policy=\"least-loaded\",outcome=\"placed\"} 1",
        "nestbox_sandbox_create_duration_seconds_count{outcome=\"ok\"} 1",
        "nestbox_http_requests_total{method=\"GET\",route=\"/v1/sandboxes/{sandbox_id}\",status=\"2xx\"} 1",
    ] {
        assert!(text.contains(line), "no `{line}` in:\n{text}");
    }
    assert!(
        text.contains(&format!(
            "nestbox_host_heartbeat_age_seconds{{host=\"{}\"",
            h.host_id
        )),
        "{text}"
    );
    assert!(
        !text.contains(&sb.id.to_string()),
        "a sandbox id became a label"
    );

    // A platform admin reads them too; nobody else does.
    let (status, _, _) = scrape(&h.url, Some(&h.admin.token)).await;
    assert_eq!(status, 200);
    let (status, _, _) = scrape(&h.url, Some("not-the-token")).await;
    assert_eq!(status, 401);
    let (status, _, _) = scrape(&h.url, None).await;
    assert_eq!(status, 401);
    let member = h.user("member").await?;
    let (status, _, _) = scrape(&h.url, Some(&member.token)).await;
    assert_eq!(status, 403);
    // A failed create is counted by its code.
    h.key
        .create_sandbox(&CreateSandboxRequest {
            template: Some("no-such-template".into()),
            ..Default::default()
        })
        .await
        .unwrap_err();
    let (_, _, text) = scrape(&h.url, Some(TOKEN)).await;
    assert!(
        text.contains(
            "nestbox_sandbox_create_duration_seconds_count{outcome=\"template_not_found\"} 1"
        ),
        "{text}"
    );
    h.shutdown().await;
    Ok(())
}
