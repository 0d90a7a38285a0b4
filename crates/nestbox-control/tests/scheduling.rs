//! Placement, on SQLite and PostgreSQL: each configured policy places sandboxes as it says
//! (round-robin cycles through the hosts, least-loaded fills the emptiest), and no host is
//! given more guest memory than its agent reports it can back, however much memory the
//! host has: past that, `503 no_capacity` and no record. A draining host takes none.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{Engine, Harness, Options, api_error, both_engines};
use nestbox_control::scheduler::Policy;
use nestbox_testkit::{SimAgentConfig, SimOp};
use nestbox_types::api::{CreateSandboxRequest, DrainMoves, SandboxListQuery};
use nestbox_types::{ErrorCode, HostId};

both_engines!(
    round_robin_cycles_through_the_hosts,
    least_loaded_fills_the_emptiest_host,
    a_host_gets_no_more_guest_memory_than_it_can_back,
    a_draining_host_takes_no_new_sandboxes,
    placement_between_reads_of_the_fleet_counts_what_changed,
);

fn small() -> CreateSandboxRequest {
    CreateSandboxRequest {
        memory_mb: Some(256),
        ..Default::default()
    }
}

async fn place(h: &Harness, n: usize) -> anyhow::Result<Vec<HostId>> {
    let mut hosts = Vec::new();
    for _ in 0..n {
        let sb = h.key.create_sandbox(&small()).await?;
        hosts.push(sb.host_id.expect("placed"));
    }
    Ok(hosts)
}

/// The harness's host as platform admins see it.
async fn harness_host(h: &Harness) -> anyhow::Result<nestbox_types::api::Host> {
    let hosts = h.admin.client.list_hosts().await?.items;
    Ok(hosts
        .into_iter()
        .find(|x| x.id == h.host_id)
        .expect("the harness's host is listed"))
}

async fn round_robin_cycles_through_the_hosts(engine: Engine) -> anyhow::Result<()> {
    let h = Harness::with(
        engine,
        Options {
            scheduler: Policy::RoundRobin,
            ..Options::default()
        },
    )
    .await?;
    let first = place(&h, 2).await?;
    assert_eq!(first, vec![h.host_id, h.host_id], "one host: all on it");
    let second = h.add_agent("sim-2", SimAgentConfig::default()).await?;
    let two = second.host_id().unwrap();
    let placed = place(&h, 4).await?;
    for pair in placed.chunks(2) {
        assert_ne!(pair[0], pair[1], "alternates: {placed:?}");
    }
    assert_eq!(placed.iter().filter(|x| **x == two).count(), 2);
    second.shutdown().await;
    h.shutdown().await;
    Ok(())
}

async fn least_loaded_fills_the_emptiest_host(engine: Engine) -> anyhow::Result<()> {
    // Every create reads the database: the policy is what is tested here. (With the fleet
    // view, a background read that lands between a placement's row and its record in the
    // view counts that placement twice until the next read, which can make a tie; the
    // view's own test covers that.)
    let h = Harness::with(
        engine,
        Options {
            scheduler: Policy::LeastLoaded,
            placement_refresh: std::time::Duration::ZERO,
            ..Options::default()
        },
    )
    .await?;
    place(&h, 3).await?;
    let second = h.add_agent("sim-2", SimAgentConfig::default()).await?;
    let two = second.host_id().unwrap();
    // The new host is the emptier until it holds as many.
    assert_eq!(place(&h, 3).await?, vec![two, two, two]);
    let next = place(&h, 2).await?;
    assert!(next.contains(&h.host_id) && next.contains(&two), "{next:?}");
    second.shutdown().await;
    h.shutdown().await;
    Ok(())
}

async fn a_host_gets_no_more_guest_memory_than_it_can_back(engine: Engine) -> anyhow::Result<()> {
    // 64 GiB of memory, overcommit 2, but only 700 MiB of guest memory behind it.
    let h = Harness::with(
        engine,
        Options {
            agent: SimAgentConfig {
                guest_memory_mb: Some(700),
                ..SimAgentConfig::default()
            },
            ..Options::default()
        },
    )
    .await?;
    h.agent.heartbeat().await?;
    let host = harness_host(&h).await?;
    assert_eq!(host.guest_memory_mb, Some(700));
    assert_eq!(host.guest_memory_used_mb, Some(0));

    place(&h, 2).await?;
    let full = h.key.create_sandbox(&small()).await;
    api_error(full, 503, ErrorCode::NoCapacity);
    let listed = h.key.list_sandboxes(&SandboxListQuery::default()).await?;
    assert_eq!(listed.items.len(), 2, "the refused create left no record");

    // The agent's own count is believed when it says more is held (e.g. paused sandboxes
    // kept in memory that the control plane counts elsewhere).
    h.agent.heartbeat().await?;
    let host = harness_host(&h).await?;
    assert_eq!(host.guest_memory_used_mb, Some(512));
    for sb in listed.items {
        h.key.destroy_sandbox(sb.id).await?;
    }
    // Until the agent's next report, what it last said is held still counts.
    api_error(
        h.key.create_sandbox(&small()).await,
        503,
        ErrorCode::NoCapacity,
    );
    h.agent.heartbeat().await?;
    h.key.create_sandbox(&small()).await?;
    h.shutdown().await;
    Ok(())
}

async fn a_draining_host_takes_no_new_sandboxes(engine: Engine) -> anyhow::Result<()> {
    let h = Harness::with(
        engine,
        Options {
            scheduler: Policy::RoundRobin,
            ..Options::default()
        },
    )
    .await?;
    let second = h.add_agent("sim-2", SimAgentConfig::default()).await?;
    let two = second.host_id().unwrap();
    let before = place(&h, 2).await?;
    assert!(before.contains(&two));
    let drained = h
        .admin
        .client
        .drain_host(two, true, DrainMoves::None)
        .await?;
    assert!(drained.host.draining);
    assert!(drained.moving.is_empty());
    assert_eq!(place(&h, 3).await?, vec![h.host_id; 3]);
    // What it holds stays.
    assert_eq!(second.sandbox_ids().len(), 1);
    // With every host draining, nothing can be placed, and nothing is recorded.
    h.admin
        .client
        .drain_host(h.host_id, true, DrainMoves::None)
        .await?;
    let count = h
        .key
        .list_sandboxes(&SandboxListQuery::default())
        .await?
        .items
        .len();
    api_error(
        h.key.create_sandbox(&small()).await,
        503,
        ErrorCode::NoCapacity,
    );
    assert_eq!(
        h.key
            .list_sandboxes(&SandboxListQuery::default())
            .await?
            .items
            .len(),
        count
    );
    h.admin
        .client
        .drain_host(h.host_id, false, DrainMoves::None)
        .await?;
    h.admin
        .client
        .drain_host(two, false, DrainMoves::None)
        .await?;
    let after = place(&h, 2).await?;
    assert!(after.contains(&two), "{after:?}");
    second.shutdown().await;
    h.shutdown().await;
    Ok(())
}

async fn placement_between_reads_of_the_fleet_counts_what_changed(
    engine: Engine,
) -> anyhow::Result<()> {
    // The view of the fleet is read once (at start and when dropped), never on a timer:
    // whatever placement decides comes from the view and what it was told since.
    let h = Harness::with(
        engine,
        Options {
            agent: SimAgentConfig {
                guest_memory_mb: Some(700),
                ..SimAgentConfig::default()
            },
            placement_refresh: std::time::Duration::from_secs(3600),
            ..Options::default()
        },
    )
    .await?;
    h.agent.heartbeat().await?;
    // Its own placements count: the third does not fit in 700 MiB.
    let placed = place(&h, 2).await?;
    assert_eq!(placed.len(), 2);
    api_error(
        h.key.create_sandbox(&small()).await,
        503,
        ErrorCode::NoCapacity,
    );
    assert_eq!(
        h.agent.calls(SimOp::Create),
        2,
        "refused without asking the host"
    );
    // A destroy frees the room at once, and the host's report counts from its heartbeat.
    let listed = h.key.list_sandboxes(&SandboxListQuery::default()).await?;
    h.key.destroy_sandbox(listed.items[0].id).await?;
    h.agent.heartbeat().await?;
    h.key.create_sandbox(&small()).await?;
    // A drain shows at once.
    h.admin
        .client
        .drain_host(h.host_id, true, DrainMoves::None)
        .await?;
    h.key.destroy_sandbox(listed.items[1].id).await?;
    api_error(
        h.key.create_sandbox(&small()).await,
        503,
        ErrorCode::NoCapacity,
    );
    // And so does a new host.
    let second = h.add_agent("sim-2", SimAgentConfig::default()).await?;
    let sb = h.key.create_sandbox(&small()).await?;
    assert_eq!(sb.host_id, second.host_id());
    second.shutdown().await;
    h.shutdown().await;
    Ok(())
}
