//! Moving sandboxes between hosts of one pool: the moves of a drain, or an operator's.
//!
//! A move takes a paused sandbox (a running one is paused first and resumed on arrival):
//!
//! 1. the sandbox is marked as moving to its destination (`moving_to`, compare-and-set from
//!    `paused` on its host and not moving): from here the monitor does not take its copy on
//!    the destination for an orphan, and calls that would change its saved state (resume,
//!    egress, token rotation, templates from it) answer `conflict`;
//! 2. its host packs it (`ExportSandbox`: memory, devices and its disk flattened);
//! 3. the package is relayed to the destination as a template copy is ([`super::copies`]:
//!    checksummed, resumed where it was cut, a few attempts);
//! 4. the destination takes it over as a paused sandbox (`AdoptSandbox`);
//! 5. the record is re-pointed to the destination (compare-and-set: still paused on the
//!    source, still moving there). This is the move's commit point;
//! 6. the source's copy is destroyed and the packages deleted — if that fails, the monitor
//!    destroys the copy (an orphan now) and the agents remove packages a day old;
//! 7. a sandbox that was running is resumed on its new host.
//!
//! Rules:
//! - a failure before the commit point undoes what was done — the destination's copy
//!   destroyed, the packages deleted, the mark cleared — and leaves the sandbox where it
//!   was, resumed there if it was running;
//! - a move is one mark (its package's id): only that move may finish or end it. A move
//!   gives itself up after [`move_give_up`]; a control plane that dies mid-move leaves the
//!   mark behind, which the monitor clears once older than [`move_deadline`] (later), so a
//!   move past its time never commits over another's mark;
//! - what the destination gets (egress rules, the guest's token) is read after the mark is
//!   set, so changes made before it travel with the sandbox;
//! - a destroy during a move wins: the commit point finds the sandbox stopped, and the
//!   destination's copy is destroyed;
//! - the destination is a host of the sandbox's own pool (its team's hosts for a BYOC team,
//!   the platform's otherwise), online, not draining, with room ([`crate::scheduler`]).

use std::sync::Arc;
use std::time::{Duration, Instant};

use nestbox_db::sandboxes::{self, Sandbox};
use nestbox_proto::hostagent::{
    AdoptSandboxRequest, DestroySandboxRequest, EgressRules as PbEgress, ExportSandboxRequest,
    TemplateInfo,
};
use nestbox_types::api;
use nestbox_types::{ErrorCode, HostId, SandboxId, SandboxStatus, TemplateId};

use super::copies::{ATTEMPTS, delete_on, relay};
use super::{AuditActor, AuditEntry};
use crate::auth::{SandboxSecret, sandbox_secret};
use crate::error::{ApiError, ApiResult, from_agent};
use crate::extract::Caller;
use crate::hostpool::AgentClient;
use crate::scheduler::{Candidate, Demand};
use crate::state::Services;

/// How long a move may take before the monitor gives it up: every copy attempt at the
/// template deadline, and the packing and take-over besides.
pub(crate) fn move_deadline(template_timeout: Duration) -> Duration {
    template_timeout * (ATTEMPTS as u32 + 2)
}

/// How long a move takes before it gives itself up (well before [`move_deadline`]).
pub(crate) fn move_give_up(template_timeout: Duration) -> Duration {
    template_timeout * (ATTEMPTS as u32 + 1)
}

/// The answer of a sandbox call while it moves.
pub(crate) fn moving(sb: &Sandbox) -> ApiResult<()> {
    match sb.moving_to {
        Some(to) => Err(ApiError::conflict(format!(
            "sandbox {} is being moved to host {to}; retry once it has arrived",
            sb.id
        ))),
        None => Ok(()),
    }
}

/// A move done.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Moved {
    /// Where it went.
    pub to: HostId,
}

/// What a move must undo if it fails before its commit point.
struct Undo {
    export: TemplateId,
    from: AgentClient,
    to: AgentClient,
    to_host: HostId,
    adopted: bool,
}

/// The moves of a drain, one at a time: each sandbox read again first, and moved only if it
/// is still on the drained host in one of `statuses`.
async fn drain_moves(
    services: Arc<Services>,
    host: HostId,
    ids: Vec<SandboxId>,
    statuses: Vec<SandboxStatus>,
    actor: AuditActor,
) {
    let mut moved = 0usize;
    for id in &ids {
        let sb = match sandboxes::get(&services.db, *id).await {
            Ok(sb) if sb.host_id == Some(host) && statuses.contains(&sb.status) => sb,
            Ok(_) => continue,
            Err(e) => {
                tracing::warn!(sandbox = %id, error = %e, "a drain's move: reading the sandbox");
                continue;
            }
        };
        match services.move_one(&sb, None, actor.clone()).await {
            Ok(_) => moved += 1,
            Err(e) => {
                tracing::warn!(sandbox = %id, host = %host, error = %e, "a drain's move failed; drain again to retry")
            }
        }
    }
    tracing::info!(host = %host, moved, of = ids.len(), "drain moves done");
}

impl Undo {
    async fn run(mut self, services: &Services, sb: &Sandbox) {
        let timeout = services.cfg.template_timeout;
        if self.adopted {
            let mut rpc = tonic::Request::new(DestroySandboxRequest {
                sandbox_id: sb.id.to_string(),
            });
            rpc.set_timeout(timeout);
            if let Err(s) = self.to.destroy_sandbox(rpc).await
                && nestbox_proto::error_code(&s) != ErrorCode::SandboxNotFound
            {
                tracing::warn!(sandbox = %sb.id, host = %self.to_host, error = %s.message(), "destroying the copy of a failed move (the monitor will)");
            }
        }
        delete_on(&mut self.to, self.export, timeout).await;
        delete_on(&mut self.from, self.export, timeout).await;
        if let Err(e) = sandboxes::end_move(&services.db, sb.id, self.export).await {
            tracing::warn!(sandbox = %sb.id, error = %e, "clearing a failed move's mark (the monitor will)");
        }
    }
}

impl Services {
    /// Moves sandbox `id` to host `to` (or one the scheduler picks) and returns it.
    /// Platform admins only.
    pub async fn move_sandbox(
        &self,
        caller: &Caller,
        id: SandboxId,
        req: api::MoveSandboxRequest,
    ) -> ApiResult<api::Sandbox> {
        caller.require_admin()?;
        let sb = sandboxes::get(&self.db, id).await.map_err(|e| {
            if e.is_not_found() {
                super::sandboxes::sandbox_not_found(id)
            } else {
                e.into()
            }
        })?;
        self.move_one(&sb, req.host_id, AuditActor::Caller(*caller))
            .await?;
        let now = sandboxes::get(&self.db, id).await?;
        Ok(super::sandboxes::sandbox_view(&now))
    }

    /// Cordons a host (it takes no new sandboxes) or lets it take them again, and starts
    /// moving what it holds as `req.moves` asks, in the background. Platform admins only.
    pub async fn drain(
        self: &Arc<Self>,
        caller: &Caller,
        host: HostId,
        req: api::DrainHostRequest,
    ) -> ApiResult<api::HostDrain> {
        let view = self.drain_host(caller, host, req.draining).await?;
        let statuses: &[SandboxStatus] = match (req.draining, req.moves.unwrap_or_default()) {
            (false, _) | (true, api::DrainMoves::None) => &[],
            (true, api::DrainMoves::Paused) => &[SandboxStatus::Paused],
            (true, api::DrainMoves::All) => &[SandboxStatus::Paused, SandboxStatus::Running],
        };
        let to_move = if statuses.is_empty() {
            Vec::new()
        } else {
            sandboxes::list_by_host(&self.db, host, statuses).await?
        };
        let moving: Vec<SandboxId> = to_move.iter().map(|sb| sb.id).collect();
        if !moving.is_empty() {
            tokio::spawn(crate::request_id::scoped(drain_moves(
                self.clone(),
                host,
                moving.clone(),
                statuses.to_vec(),
                AuditActor::Caller(*caller),
            )));
        }
        Ok(api::HostDrain { host: view, moving })
    }

    /// Moves one sandbox (see the module docs); audited as `sandbox.move`.
    pub(crate) async fn move_one(
        &self,
        sb: &Sandbox,
        to: Option<HostId>,
        actor: AuditActor,
    ) -> ApiResult<Moved> {
        let started = Instant::now();
        let was_running = sb.status == SandboxStatus::Running;
        let from = sb.host_id;
        let outcome = self.move_inner(sb, to).await;
        self.audit(AuditEntry {
            actor,
            team: Some(sb.team_id),
            action: "sandbox.move",
            resource_type: "sandbox",
            resource_id: Some(sb.id.to_string()),
            ok: outcome.is_ok(),
            details: serde_json::json!({
                "from": from.map(|h| h.to_string()),
                "to": outcome.as_ref().ok().map(|m| m.to.to_string()),
                "was_running": was_running,
                "ms": started.elapsed().as_millis() as u64,
                "error": outcome.as_ref().err().map(|e| e.message.clone()),
            }),
        })
        .await;
        outcome
    }

    async fn move_inner(&self, sb: &Sandbox, to: Option<HostId>) -> ApiResult<Moved> {
        let id = sb.id;
        let system = Caller::system(sb.team_id);
        moving(sb)?;
        let from_host = match (sb.status, sb.host_id) {
            (SandboxStatus::Running | SandboxStatus::Paused, Some(h)) => h,
            (status, _) => {
                return Err(ApiError::conflict(format!(
                    "sandbox {id} is {status}; only a running or paused sandbox moves"
                )));
            }
        };
        let target = self.destination(sb, from_host, to).await?;
        let (_, from) = self.agent_for(Some(from_host)).await?;
        let to_client = self.pool.client(target.host, &target.address)?;
        let was_running = sb.status == SandboxStatus::Running;
        if was_running {
            self.pause_sandbox(&system, id).await?;
        }
        let moved = self
            .carry(sb, from_host, from.clone(), target.host, to_client)
            .await;
        if was_running {
            // On its new host if the move was done, else where it was.
            if let Err(e) = self.resume_sandbox(&system, id, None).await {
                tracing::warn!(sandbox = %id, error = %e, "resuming a moved sandbox; it stays paused");
                if moved.is_ok() {
                    return Err(ApiError::new(
                        e.code,
                        format!("sandbox {id} moved but did not resume: {}", e.message),
                    ));
                }
            }
        }
        moved.map(|()| Moved { to: target.host })
    }

    /// Where `sb` goes: `to` if it may take it, else the scheduler's pick among the hosts
    /// of its pool other than `from`.
    async fn destination(
        &self,
        sb: &Sandbox,
        from: HostId,
        to: Option<HostId>,
    ) -> ApiResult<Candidate> {
        if to == Some(from) {
            return Err(ApiError::invalid(format!(
                "sandbox {} is on host {from} already",
                sb.id
            )));
        }
        let candidates: Vec<Candidate> = self
            .candidates(sb.team_id)
            .await?
            .into_iter()
            .filter(|c| c.host != from && to.is_none_or(|t| c.host == t))
            .collect();
        let demand = Demand {
            memory_mb: sb.memory_mb,
            overcommit: self.cfg.memory_overcommit,
        };
        self.scheduler
            .pick(&candidates, &demand)
            .cloned()
            .ok_or_else(|| match to {
                Some(t) if candidates.is_empty() => ApiError::invalid(format!(
                    "host {t} cannot take sandbox {}: it is not an online, undrained host of its pool",
                    sb.id
                )),
                Some(t) => ApiError::new(
                    ErrorCode::NoCapacity,
                    format!("host {t} has no room for sandbox {} right now", sb.id),
                ),
                None => ApiError::new(
                    ErrorCode::NoCapacity,
                    format!(
                        "no other host of sandbox {}'s pool has room for it right now",
                        sb.id
                    ),
                ),
            })
    }

    /// Steps 1–6 for a paused sandbox.
    async fn carry(
        &self,
        sb: &Sandbox,
        from_host: HostId,
        mut from: AgentClient,
        to_host: HostId,
        mut to: AgentClient,
    ) -> ApiResult<()> {
        let id = sb.id;
        let timeout = self.cfg.template_timeout;
        let export = TemplateId::new();
        if !sandboxes::begin_move(&self.db, id, from_host, to_host, export).await? {
            let now = sandboxes::get(&self.db, id).await?;
            moving(&now)?;
            return Err(ApiError::conflict(format!(
                "sandbox {id} is {}; only a paused sandbox moves",
                now.status
            )));
        }
        // What travels with it is read now that it is marked (a change made before the mark
        // is in; one made after is refused).
        let sb = &sandboxes::get(&self.db, id).await?;
        let mut undo = Undo {
            export,
            from: from.clone(),
            to: to.clone(),
            to_host,
            adopted: false,
        };
        let carried = tokio::time::timeout(move_give_up(timeout), async {
            let mut rpc = tonic::Request::new(ExportSandboxRequest {
                sandbox_id: id.to_string(),
                export_id: export.to_string(),
            });
            rpc.set_timeout(timeout);
            let package = from
                .export_sandbox(rpc)
                .await
                .map_err(|s| from_agent(&s))?
                .into_inner()
                .template;
            let copied = relay_retrying(export, &mut from, &mut to, timeout).await?;
            let mut rpc = tonic::Request::new(AdoptSandboxRequest {
                sandbox_id: id.to_string(),
                export_id: export.to_string(),
                team_id: sb.team_id.to_string(),
                template: sb.template_name.clone(),
                template_id: sb.template_id.map(|t| t.to_string()).unwrap_or_default(),
                timeout_sec: sb.timeout_sec,
                egress: Some(PbEgress {
                    allow_out: sb.egress.allow_out.clone(),
                    deny_out: sb.egress.deny_out.clone(),
                }),
                egress_version: sb.egress_version,
                access_token: sandbox_secret(
                    &self.cfg.master_secret,
                    SandboxSecret::Envd,
                    id,
                    sb.token_generation,
                ),
            });
            rpc.set_timeout(timeout);
            to.adopt_sandbox(rpc).await.map_err(|s| from_agent(&s))?;
            Ok::<_, ApiError>((package, copied))
        })
        .await
        .unwrap_or_else(|_| {
            Err(ApiError::new(
                ErrorCode::HostUnavailable,
                format!("moving sandbox {id} took too long; it stays on host {from_host}"),
            ))
        });
        let (package, copied) = match carried {
            Ok(done) => done,
            Err(e) => {
                // It may have been taken over just as the time ran out (destroying a copy
                // that is not there is nothing).
                undo.adopted = true;
                undo.run(self, sb).await;
                return Err(e);
            }
        };
        undo.adopted = true;
        // It holds room on its new host from now on.
        self.fleet.placed(to_host, sb.memory_mb);
        if !sandboxes::finish_move(&self.db, id, from_host, to_host, export).await? {
            undo.run(self, sb).await;
            let now = sandboxes::get(&self.db, id).await?;
            return Err(ApiError::conflict(format!(
                "sandbox {id} changed while it moved (it is {}); it stays on host {from_host}",
                now.status
            )));
        }
        self.fleet.invalidate();
        tracing::info!(
            sandbox = %id, from = %from_host, to = %to_host,
            bytes = package.map_or(0, |p| p.size_bytes), stored = copied.size_bytes,
            "sandbox moved"
        );
        let mut rpc = tonic::Request::new(DestroySandboxRequest {
            sandbox_id: id.to_string(),
        });
        rpc.set_timeout(timeout);
        if let Err(s) = from.destroy_sandbox(rpc).await
            && nestbox_proto::error_code(&s) != ErrorCode::SandboxNotFound
        {
            tracing::warn!(sandbox = %id, host = %from_host, error = %s.message(), "destroying a moved sandbox's old copy (the monitor will)");
        }
        delete_on(&mut from, export, timeout).await;
        delete_on(&mut to, export, timeout).await;
        Ok(())
    }
}

/// [`relay`] with a few attempts, each resuming where the last stood; refusals another try
/// cannot change fail at once.
async fn relay_retrying(
    id: TemplateId,
    from: &mut AgentClient,
    to: &mut AgentClient,
    timeout: Duration,
) -> ApiResult<TemplateInfo> {
    let mut last = None;
    for attempt in 0..ATTEMPTS {
        match relay(id, from, to, timeout).await {
            Ok(info) => return Ok(info),
            Err(e) => {
                tracing::warn!(package = %id, attempt, error = %e, "copying a move package");
                if matches!(
                    e.code,
                    ErrorCode::InvalidRequest | ErrorCode::InsufficientStorage
                ) {
                    return Err(e);
                }
                last = Some(e);
            }
        }
    }
    Err(last.unwrap_or_else(|| ApiError::internal("copying the move package failed")))
}
