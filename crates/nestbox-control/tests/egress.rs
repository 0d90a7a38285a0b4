//! Egress rules through the real control plane (simulated host agent): validation and
//! normalisation at the edge, what the agent is told at create, on change and for forks,
//! E2B's `network` fields, and that a refused change leaves nothing half done. (Enforcement
//! itself is tested with real VMs in `e2e_egress`.)

#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use common::{Engine, Harness, api_error, both_engines};
use nestbox_testkit::simagent::SimOp;
use nestbox_types::api::{CreateSandboxRequest, EgressRequest};
use nestbox_types::{ErrorCode, SandboxId};
use serde_json::{Value, json};

both_engines!(
    v1_rules_are_validated_normalised_and_reach_the_agent,
    v1_rules_change_on_running_and_paused_sandboxes_only,
    a_refused_change_changes_nothing,
    concurrent_changes_end_with_the_agent_and_the_database_agreeing,
    forks_keep_their_sources_rules,
    e2b_network_fields_map_to_rules,
);

/// An E2B call with the first-run key: status and JSON body.
async fn e2b(
    h: &Harness,
    method: reqwest::Method,
    path: &str,
    body: Option<Value>,
) -> anyhow::Result<(u16, Value)> {
    let (status, _, value) = common::e2b(h, method, path, body).await?;
    Ok((status, value))
}

fn rules(allow: &[&str], deny: &[&str]) -> EgressRequest {
    EgressRequest {
        allow_out: allow.iter().map(|s| s.to_string()).collect(),
        deny_out: deny.iter().map(|s| s.to_string()).collect(),
        allow_internet_access: None,
    }
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

async fn v1_rules_are_validated_normalised_and_reach_the_agent(
    engine: Engine,
) -> anyhow::Result<()> {
    let h = Harness::start(engine).await?;
    let sb = h
        .key
        .create_sandbox(&CreateSandboxRequest {
            egress: Some(EgressRequest {
                allow_out: strings(&["Example.COM.", "198.51.100.7/24", "*.api.test"]),
                deny_out: vec![],
                allow_internet_access: Some(false),
            }),
            ..Default::default()
        })
        .await?;
    // Normalised: lowercase names, truncated blocks, `allow_internet_access: false` as a
    // deny-all rule.
    assert_eq!(
        sb.egress.allow_out,
        strings(&["198.51.100.0/24", "example.com", "*.api.test"])
    );
    assert_eq!(sb.egress.deny_out, strings(&["0.0.0.0/0"]));
    assert!(
        !sb.public_traffic,
        "ports need the traffic token by default"
    );
    let on_agent = h.agent.sandbox(sb.id).expect("runs on the agent");
    assert_eq!(
        on_agent.egress(),
        (sb.egress.allow_out.clone(), sb.egress.deny_out.clone())
    );
    assert_eq!(h.key.get_sandbox(sb.id).await?.egress, sb.egress);

    // No rules: none sent, none shown.
    let plain = h.sandbox().await?;
    assert!(plain.egress.is_empty());
    assert_eq!(
        h.agent.sandbox(plain.id).unwrap().egress(),
        (vec![], vec![])
    );

    // Bad rules: a clear error naming the entry, and no sandbox left behind.
    let before = h.key.list_sandboxes(&Default::default()).await?.items.len();
    for (allow, deny, needle) in [
        (vec!["2001:db8::/32"], vec![], "IPv6"),
        (vec!["10.0.0.0/33"], vec![], "CIDR"),
        (vec![], vec!["example.com"], "deny rules"),
        (vec!["bad name.com"], vec![], "domain name"),
    ] {
        let err = api_error(
            h.key
                .create_sandbox(&CreateSandboxRequest {
                    egress: Some(rules(&allow, &deny)),
                    ..Default::default()
                })
                .await,
            400,
            ErrorCode::InvalidRequest,
        );
        assert!(err.error.message.contains(needle), "{err:?}");
    }
    let too_many: Vec<String> = (0..300).map(|i| format!("10.1.{}.0/24", i % 256)).collect();
    let err = api_error(
        h.key
            .create_sandbox(&CreateSandboxRequest {
                egress: Some(EgressRequest {
                    allow_out: too_many,
                    ..Default::default()
                }),
                ..Default::default()
            })
            .await,
        400,
        ErrorCode::InvalidRequest,
    );
    assert!(err.error.message.contains("at most"), "{err:?}");
    let (http, url) = h.raw("/v1/sandboxes");
    let unknown = http
        .post(url)
        .header("x-api-key", &h.api_key)
        .json(&json!({"egress": {"allow": ["1.1.1.1"]}}))
        .send()
        .await?;
    common::raw_error(unknown, 400, ErrorCode::InvalidRequest).await?;
    assert_eq!(
        h.key.list_sandboxes(&Default::default()).await?.items.len(),
        before
    );
    h.shutdown().await;
    Ok(())
}

async fn v1_rules_change_on_running_and_paused_sandboxes_only(
    engine: Engine,
) -> anyhow::Result<()> {
    let h = Harness::start(engine).await?;
    let sb = h.sandbox().await?;
    let changed = h
        .key
        .set_egress(sb.id, &rules(&["203.0.113.5"], &["203.0.113.0/24"]))
        .await?;
    assert_eq!(changed.egress.allow_out, strings(&["203.0.113.5"]));
    assert_eq!(
        h.agent.sandbox(sb.id).unwrap().egress(),
        (strings(&["203.0.113.5"]), strings(&["203.0.113.0/24"]))
    );

    // A paused sandbox takes new rules too (its host keeps them for the resume).
    h.key.pause_sandbox(sb.id).await?;
    let paused = h.key.set_egress(sb.id, &rules(&[], &[])).await?;
    assert!(paused.egress.is_empty());
    assert_eq!(h.agent.sandbox(sb.id).unwrap().egress(), (vec![], vec![]));
    h.key.resume_sandbox(sb.id).await?;

    // Bad input is refused before anything is asked of the agent.
    let calls = h.agent.calls(SimOp::SetEgress);
    api_error(
        h.key.set_egress(sb.id, &rules(&["::/0"], &[])).await,
        400,
        ErrorCode::InvalidRequest,
    );
    assert_eq!(h.agent.calls(SimOp::SetEgress), calls);

    // Unknown, and gone, sandboxes.
    api_error(
        h.key.set_egress(SandboxId::new(), &rules(&[], &[])).await,
        404,
        ErrorCode::SandboxNotFound,
    );
    h.key.destroy_sandbox(sb.id).await?;
    api_error(
        h.key.set_egress(sb.id, &rules(&[], &[])).await,
        409,
        ErrorCode::Conflict,
    );

    // Audited.
    let logs = h
        .admin
        .client
        .audit_logs_filtered(&nestbox_types::api::AuditLogQuery {
            action: Some("sandbox.egress".into()),
            ..Default::default()
        })
        .await?;
    assert!(logs.items.len() >= 2, "{logs:?}");
    assert!(logs.items.iter().all(|l| l.action == "sandbox.egress"));
    h.shutdown().await;
    Ok(())
}

async fn a_refused_change_changes_nothing(engine: Engine) -> anyhow::Result<()> {
    let h = Harness::start(engine).await?;
    let sb = h
        .key
        .create_sandbox(&CreateSandboxRequest {
            egress: Some(rules(&[], &["0.0.0.0/0"])),
            ..Default::default()
        })
        .await?;
    h.agent
        .fail_next(SimOp::SetEgress, ErrorCode::Internal, "nftables failed");
    let err = h.key.set_egress(sb.id, &rules(&[], &[])).await;
    assert!(err.is_err(), "{err:?}");
    assert_eq!(
        h.key.get_sandbox(sb.id).await?.egress.deny_out,
        strings(&["0.0.0.0/0"]),
        "the database keeps the rules the agent still enforces"
    );
    let held = h.agent.sandbox(sb.id).unwrap();
    assert_eq!(held.egress().1, strings(&["0.0.0.0/0"]));
    assert_eq!(
        held.egress_version, 2,
        "the undoing change reached the agent too"
    );
    h.shutdown().await;
    Ok(())
}

async fn concurrent_changes_end_with_the_agent_and_the_database_agreeing(
    engine: Engine,
) -> anyhow::Result<()> {
    let h = Harness::start(engine).await?;
    let sb = h.sandbox().await?;
    // Eight changes at once, all held at the agent and then let go together: they reach
    // it in any order.
    let hold = h.agent.hold(SimOp::SetEgress);
    let mut changes = Vec::new();
    for i in 0..8 {
        let key = h.key.clone();
        changes.push(tokio::spawn(async move {
            key.set_egress(sb.id, &rules(&[&format!("203.0.113.{i}")], &["0.0.0.0/0"]))
                .await
        }));
    }
    hold.arrived().await;
    while h.agent.calls(SimOp::SetEgress) < 8 {
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    hold.release();
    for c in changes {
        c.await??;
    }
    let recorded = h.key.get_sandbox(sb.id).await?.egress;
    let held = h.agent.sandbox(sb.id).unwrap();
    assert_eq!(
        held.egress(),
        (recorded.allow_out.clone(), recorded.deny_out.clone())
    );
    assert_eq!(
        held.egress_version, 8,
        "the last recorded change is the one in force"
    );
    h.shutdown().await;
    Ok(())
}

async fn forks_keep_their_sources_rules(engine: Engine) -> anyhow::Result<()> {
    let h = Harness::start(engine).await?;
    let sb = h
        .key
        .create_sandbox(&CreateSandboxRequest {
            egress: Some(rules(&["example.com"], &["0.0.0.0/0"])),
            public_traffic: Some(true),
            ..Default::default()
        })
        .await?;
    let forked = h.key.fork_sandbox(sb.id, 2).await?;
    assert_eq!(forked.items.len(), 2);
    for item in forked.items {
        let copy = item.sandbox.expect("the copy runs");
        assert_eq!(copy.egress, sb.egress);
        assert!(copy.public_traffic);
        assert_eq!(
            h.agent.sandbox(copy.id).unwrap().egress(),
            (strings(&["example.com"]), strings(&["0.0.0.0/0"])),
            "the copy is confined from its first instruction"
        );
    }
    h.shutdown().await;
    Ok(())
}

async fn e2b_network_fields_map_to_rules(engine: Engine) -> anyhow::Result<()> {
    use reqwest::Method;
    let h = Harness::start(engine).await?;
    let created = e2b(
        &h,
        Method::POST,
        "/v2/sandboxes",
        Some(json!({
            "templateID": "base",
            "allow_internet_access": false,
            "network": {"allowOut": ["api.test"], "dnsServers": ["192.0.2.53"]}
        })),
    )
    .await?;
    assert_eq!(created.0, 201, "{created:?}");
    let id: SandboxId = created.1["sandboxID"].as_str().unwrap().parse()?;
    // No internet means deny-all; the DNS servers open nothing (every DNS query goes to
    // the host's resolver).
    assert_eq!(
        h.agent.sandbox(id).unwrap().egress(),
        (strings(&["api.test"]), strings(&["0.0.0.0/0"]))
    );
    let got = e2b(&h, Method::GET, &format!("/sandboxes/{id}"), None).await?;
    assert_eq!(got.1["allowInternetAccess"], false, "{got:?}");
    assert_eq!(got.1["network"]["allowOut"], json!(["api.test"]));
    assert_eq!(got.1["network"]["denyOut"], json!(["0.0.0.0/0"]));
    assert_eq!(
        got.1["network"]["allowPublicTraffic"], true,
        "E2B's default: public URLs"
    );

    // The update replaces everything; what it leaves out is cleared.
    let put = e2b(
        &h,
        Method::PUT,
        &format!("/sandboxes/{id}/network"),
        Some(json!({"denyOut": ["198.51.100.0/24"]})),
    )
    .await?;
    assert_eq!(put.0, 204, "{put:?}");
    assert_eq!(put.1, Value::Null);
    assert_eq!(
        h.agent.sandbox(id).unwrap().egress(),
        (vec![], strings(&["198.51.100.0/24"]))
    );
    let got = e2b(&h, Method::GET, &format!("/sandboxes/{id}"), None).await?;
    assert_eq!(got.1["allowInternetAccess"], true);
    // `allow_internet_access` in an update is a deny-all rule too.
    let put = e2b(
        &h,
        Method::PUT,
        &format!("/sandboxes/{id}/network"),
        Some(json!({"allow_internet_access": false})),
    )
    .await?;
    assert_eq!(put.0, 204, "{put:?}");
    assert_eq!(
        h.agent.sandbox(id).unwrap().egress().1,
        strings(&["0.0.0.0/0"])
    );

    // Private ports, and resumed by traffic, on request.
    let created = e2b(
        &h,
        Method::POST,
        "/v2/sandboxes",
        Some(json!({
            "templateID": "base",
            "autoPause": true,
            "autoResume": {"enabled": true},
            "network": {"dnsServers": ["192.0.2.53"], "allowPublicTraffic": false}
        })),
    )
    .await?;
    assert_eq!(created.0, 201, "{created:?}");
    let id: SandboxId = created.1["sandboxID"].as_str().unwrap().parse()?;
    assert_eq!(h.agent.sandbox(id).unwrap().egress(), (vec![], vec![]));
    let sb = h.key.get_sandbox(id).await?;
    assert!(!sb.public_traffic);
    assert!(sb.auto_resume);
    let got = e2b(&h, Method::GET, &format!("/sandboxes/{id}"), None).await?;
    assert_eq!(got.1["lifecycle"]["autoResume"], true, "{got:?}");
    assert_eq!(got.1["lifecycle"]["onTimeout"], "pause", "{got:?}");
    h.shutdown().await;
    Ok(())
}
