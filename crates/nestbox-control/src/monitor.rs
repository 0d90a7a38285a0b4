//! The host monitor: reconciles what the database says should exist with what hosts run.
//!
//! Every `monitor_interval`:
//! 1. hosts without a heartbeat for `host_grace` become `unreachable`, and their running and
//!    paused sandboxes `missing` (reversible);
//! 2. for each online host (the live sandboxes and the platform's templates read once for
//!    all of them): refresh its platform templates, then compare its agent's list
//!    (running and paused sandboxes, with their state) with the database —
//!    - `running`, `paused` or `missing` in the database but unknown to the agent (checked
//!      twice, so a destroy in flight is not mistaken for a loss) → `error` ("lost by its
//!      host");
//!    - `missing` in the database and known to the agent → `running` or `paused`, as the
//!      agent reports it;
//!    - `running` in the database and paused on the agent (its inactivity timer paused it)
//!      → `paused`, audited as `sandbox.auto_pause`, its metrics stored (as after any
//!      pause); never `stopped`: its state is saved;
//!    - `paused` in the database and running on the agent (a resume whose answer was lost)
//!      → `running`, but only once the sandbox was marked paused longer ago than
//!      `pause_timeout`: a pause marks the sandbox before its agent call, so until then the
//!      call may still be in flight and the VM still running;
//!    - known to the agent but stopped, failed or unknown in the database, or recorded on
//!      another host (and not moving here) → destroyed on the agent (an orphan).
//!
//!    A host's team templates are compared too: files of templates that no longer exist
//!    are deleted there ([`Services::sweep_orphan_templates`]).
//! 3. platform templates are copied to every online platform host that lacks them
//!    ([`Services::spread_platform_templates`]); fork templates no sandbox uses any more
//!    are deleted
//!    ([`Services::sweep_fork_templates`]); builds whose runner stopped are failed and
//!    the step cache pruned ([`Services::sweep_builds`]).
//!
//! 4. moves begun longer ago than their deadline are given up
//!    ([`crate::service::moves`]): the sandbox stays where it was.
//!
//! 5. sandboxes `pending` or `starting` for longer than twice the create call's deadline
//!    have lost their create call (the control plane restarted in the middle):
//!    → `running` if their host runs them, else `error` (audited as
//!    `sandbox.create_interrupted`). Younger ones are never touched: their create call
//!    owns them.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use futures::StreamExt;
use nestbox_db::{hosts, sandboxes};
use nestbox_proto::hostagent::{
    DestroySandboxRequest, GetSandboxRequest, ListSandboxesRequest, SandboxInfo, SandboxState,
};
use nestbox_types::{ErrorCode, SandboxId, SandboxStatus};

use crate::service::{AuditActor, AuditEntry};
use crate::state::Services;

/// Hosts a pass works on at once.
const HOSTS_AT_ONCE: usize = 64;

/// Key of the monitor's leader lock: with several control-plane replicas on one
/// PostgreSQL, only the replica holding it runs passes.
pub const LEADER_KEY: i64 = 0x6e62_786d_6f6e; // "nbxmon"

/// Runs the monitor until the task is aborted. Passes run only while this replica holds
/// the monitor's leader lock; the others keep trying, so one takes over if the leader dies.
pub async fn run(services: Arc<Services>) {
    let every = services.cfg.monitor_interval;
    let mut ticker = crate::leader::LeaderTicker::new(&services, LEADER_KEY, every, "host monitor");
    loop {
        if ticker.leading().await {
            let started = std::time::Instant::now();
            if let Err(e) = pass(&services).await {
                tracing::warn!(error = %e, "host monitor pass failed");
            }
            services
                .telemetry
                .monitor_pass(started.elapsed().as_secs_f64());
        }
    }
}

/// One monitor pass.
pub async fn pass(services: &Services) -> Result<(), crate::error::ApiError> {
    let cutoff = Utc::now()
        - chrono::Duration::from_std(services.cfg.host_grace)
            .unwrap_or(chrono::Duration::seconds(90));
    for host in hosts::mark_stale_unreachable(&services.db, cutoff).await? {
        tracing::warn!(host = %host, "host missed its heartbeats; marking it unreachable");
        services.fleet.invalidate();
        let live = [SandboxStatus::Running, SandboxStatus::Paused];
        for sb in sandboxes::list_by_host(&services.db, host, &live).await? {
            sandboxes::transition(
                &services.db,
                sb.id,
                &[sb.status],
                SandboxStatus::Missing,
                Some("its host stopped answering"),
            )
            .await?;
        }
        services
            .audit(AuditEntry {
                actor: AuditActor::System,
                team: None,
                action: "host.down",
                resource_type: "host",
                resource_id: Some(host.to_string()),
                ok: true,
                details: serde_json::json!({}),
            })
            .await;
    }
    // Creates interrupted before a host was chosen.
    let stale = Utc::now() - create_deadline(services);
    for sb in sandboxes::list_by_status(&services.db, &[SandboxStatus::Pending]).await? {
        if sb.host_id.is_none() && sb.updated_at < stale {
            interrupted(services, &sb).await?;
        }
    }
    // Moves whose control plane went away: the sandbox stays where it was, and the copy
    // its destination took over (if any) becomes an orphan there.
    let deadline = chrono::Duration::from_std(crate::service::moves::move_deadline(
        services.cfg.template_timeout,
    ))
    .unwrap_or(chrono::Duration::hours(1));
    for sb in sandboxes::moves_begun_before(&services.db, Utc::now() - deadline).await? {
        if let (Some(to), Some(move_id)) = (sb.moving_to, sb.moving_id)
            && sandboxes::end_move(&services.db, sb.id, move_id).await?
        {
            tracing::warn!(sandbox = %sb.id, to = %to, "gave up a move that outlived its deadline");
        }
    }
    // What every host's step needs of the database, read once (a pass over a thousand
    // hosts would otherwise be tens of thousands of queries).
    let (online, live, platform) = tokio::try_join!(
        async { Ok::<_, crate::error::ApiError>(hosts::list_online(&services.db).await?) },
        async { Ok(PassView::read(&services.db).await?) },
        crate::service::templates::platform_templates(&services.db),
    )?;
    let (live, platform) = (&live, &platform);
    // Hosts are independent: several at a time, so one pass over a large fleet (or one
    // slow host) stays short.
    futures::stream::iter(online)
        .for_each_concurrent(HOSTS_AT_ONCE, |host| async move {
            let Some(address) = host.address.clone() else {
                return;
            };
            let byoc = host.team_id.is_some();
            // Its templates and its sandboxes are independent: both asked at once.
            let (templates, reconciled) = tokio::join!(
                services.sync_host_templates_with(host.id, byoc, &address, platform),
                reconcile(services, host.id, &address, live)
            );
            if let Err(e) = templates {
                tracing::debug!(host = %host.id, error = %e, "template refresh");
            }
            if let Err(e) = reconciled {
                tracing::warn!(host = %host.id, error = %e, "reconciling sandboxes");
            }
        })
        .await;
    // Platform templates belong on every platform host (copies run in the background).
    services.spread_platform_templates();
    // Fork templates whose copies are all gone (a minute's grace for forks in flight).
    services
        .sweep_fork_templates(Utc::now() - chrono::Duration::seconds(60))
        .await;
    // Builds whose runner stopped; the step cache and archives past their bounds.
    services.sweep_builds().await;
    Ok(())
}

/// The live sandboxes (not yet ended) as a pass read them once, before asking any host.
/// Reconciling decides from it only what a compare-and-set makes safe against a change
/// since; a sandbox it would destroy as an orphan is read again first.
struct PassView {
    by_host: HashMap<nestbox_types::HostId, Vec<sandboxes::Sandbox>>,
    by_id: HashMap<SandboxId, (Option<nestbox_types::HostId>, Option<nestbox_types::HostId>)>,
}

impl PassView {
    async fn read(db: &nestbox_db::Db) -> Result<PassView, nestbox_db::DbError> {
        let live = sandboxes::list_by_status(
            db,
            &[
                SandboxStatus::Pending,
                SandboxStatus::Starting,
                SandboxStatus::Running,
                SandboxStatus::Paused,
                SandboxStatus::Missing,
            ],
        )
        .await?;
        let mut view = PassView {
            by_host: HashMap::new(),
            by_id: HashMap::new(),
        };
        for sb in live {
            view.by_id.insert(sb.id, (sb.host_id, sb.moving_to));
            if let Some(h) = sb.host_id {
                view.by_host.entry(h).or_default().push(sb);
            }
        }
        Ok(view)
    }

    /// `host`'s sandboxes in one of `statuses`.
    fn on(
        &self,
        host: nestbox_types::HostId,
        statuses: &[SandboxStatus],
    ) -> Vec<&sandboxes::Sandbox> {
        self.by_host
            .get(&host)
            .map(|all| {
                all.iter()
                    .filter(|s| statuses.contains(&s.status))
                    .collect()
            })
            .unwrap_or_default()
    }
}

async fn reconcile(
    services: &Services,
    host: nestbox_types::HostId,
    address: &str,
    view: &PassView,
) -> Result<(), crate::error::ApiError> {
    let mut client = services.pool.client(host, address)?;
    let mut req = tonic::Request::new(ListSandboxesRequest {});
    req.set_timeout(Duration::from_secs(10));
    let listed = client
        .list_sandboxes(req)
        .await
        .map_err(|s| crate::error::from_agent(&s))?
        .into_inner();
    let on_agent: HashMap<SandboxId, &SandboxInfo> = listed
        .sandboxes
        .iter()
        .filter_map(|s| Some((s.sandbox_id.parse().ok()?, s)))
        .collect();
    let settle = chrono::Duration::from_std(services.cfg.pause_timeout)
        .unwrap_or(chrono::Duration::minutes(2));

    let in_db = view.on(
        host,
        &[
            SandboxStatus::Running,
            SandboxStatus::Paused,
            SandboxStatus::Missing,
        ],
    );
    for sb in in_db {
        let Some(info) = on_agent.get(&sb.id) else {
            // Ask again: a destroy may have finished between the list and now.
            let again = client
                .get_sandbox(GetSandboxRequest {
                    sandbox_id: sb.id.to_string(),
                })
                .await;
            let gone = matches!(&again, Err(s) if nestbox_proto::error_code(s) == ErrorCode::SandboxNotFound);
            if gone {
                lost(services, host, sb).await?;
            }
            continue;
        };
        let state = SandboxState::try_from(info.state).unwrap_or(SandboxState::Unspecified);
        let to = match (sb.status, state) {
            (SandboxStatus::Missing, SandboxState::Running) => SandboxStatus::Running,
            (SandboxStatus::Missing, SandboxState::Paused) => SandboxStatus::Paused,
            (SandboxStatus::Running, SandboxState::Paused) => SandboxStatus::Paused,
            (SandboxStatus::Paused, SandboxState::Running)
                if Utc::now() - sb.updated_at >= settle =>
            {
                SandboxStatus::Running
            }
            _ => continue,
        };
        let applied =
            sandboxes::transition_on_host(&services.db, sb.id, host, sb.status, to, None).await?;
        if !applied {
            continue;
        }
        tracing::info!(sandbox = %sb.id, from = %sb.status, to = %to, "sandbox follows its host");
        if (sb.status, to) == (SandboxStatus::Running, SandboxStatus::Paused) {
            crate::service::metrics::flush_logged(&services.db, &mut client, sb.id, "auto-pause")
                .await;
            services
                .audit(AuditEntry {
                    actor: AuditActor::System,
                    team: Some(sb.team_id),
                    action: "sandbox.auto_pause",
                    resource_type: "sandbox",
                    resource_id: Some(sb.id.to_string()),
                    ok: true,
                    details: serde_json::json!({
                        "host": host.to_string(),
                        "auto_paused": info.auto_paused,
                        "last_active_unix_ms": info.last_active_unix_ms,
                    }),
                })
                .await;
        }
    }
    // Creates that outlived every deadline: their create call is gone (a restart of the
    // control plane in the middle). The host's answer settles them.
    let stale = Utc::now() - create_deadline(services);
    let starting = view.on(host, &[SandboxStatus::Pending, SandboxStatus::Starting]);
    for sb in starting.into_iter().filter(|sb| sb.updated_at < stale) {
        match on_agent.get(&sb.id) {
            Some(info) if SandboxState::try_from(info.state) == Ok(SandboxState::Running) => {
                let started = chrono::DateTime::from_timestamp_millis(info.started_at_unix_ms)
                    .unwrap_or_else(Utc::now);
                if sandboxes::set_running(&services.db, sb.id, host, started).await? {
                    sandboxes::restart_lifetime(&services.db, sb.id, None).await?;
                    tracing::warn!(sandbox = %sb.id, "an interrupted create had finished on its host");
                }
            }
            _ => interrupted(services, sb).await?,
        }
    }
    for id in on_agent.into_keys() {
        // Live and here (or moving here) when the pass began: no orphan. Anything else is
        // read again: it may have been created or moved here since.
        if let Some((on, moving)) = view.by_id.get(&id)
            && (*on == Some(host) || *moving == Some(host))
        {
            continue;
        }
        let orphan = match sandboxes::get(&services.db, id).await {
            // A sandbox's copy on the host it is moving to is the move's.
            Ok(sb) => {
                sb.status.is_terminal() || (sb.host_id != Some(host) && sb.moving_to != Some(host))
            }
            Err(e) if e.is_not_found() => true,
            Err(e) => return Err(e.into()),
        };
        if orphan {
            tracing::warn!(sandbox = %id, host = %host, "destroying an orphan sandbox");
            if let Err(s) = client
                .destroy_sandbox(DestroySandboxRequest {
                    sandbox_id: id.to_string(),
                })
                .await
            {
                tracing::warn!(sandbox = %id, error = %s.message(), "destroying an orphan");
            }
        }
    }
    Ok(())
}

/// How long a create may stay `pending` or `starting` before the monitor settles it:
/// twice the create call's own deadline (a live create call has answered by then).
fn create_deadline(services: &Services) -> chrono::Duration {
    chrono::Duration::from_std(services.cfg.create_timeout * 2)
        .unwrap_or(chrono::Duration::minutes(6))
}

/// Records a create that nothing will finish any more as failed.
async fn interrupted(
    services: &Services,
    sb: &sandboxes::Sandbox,
) -> Result<(), crate::error::ApiError> {
    let applied = sandboxes::transition(
        &services.db,
        sb.id,
        &[SandboxStatus::Pending, SandboxStatus::Starting],
        SandboxStatus::Error,
        Some("its create was interrupted (the platform restarted); create it again"),
    )
    .await?;
    if applied {
        tracing::warn!(sandbox = %sb.id, "an interrupted create is recorded as failed");
        services
            .audit(AuditEntry {
                actor: AuditActor::System,
                team: Some(sb.team_id),
                action: "sandbox.create_interrupted",
                resource_type: "sandbox",
                resource_id: Some(sb.id.to_string()),
                ok: true,
                details: serde_json::json!({
                    "host": sb.host_id.map(|h| h.to_string()),
                    "status": sb.status.to_string(),
                }),
            })
            .await;
    }
    Ok(())
}

/// Records that `sb`'s host no longer knows it.
async fn lost(
    services: &Services,
    host: nestbox_types::HostId,
    sb: &sandboxes::Sandbox,
) -> Result<(), crate::error::ApiError> {
    crate::service::record_lost(&services.db, host, sb.id, sb.team_id, sb.status).await?;
    Ok(())
}
