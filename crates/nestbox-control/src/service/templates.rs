//! Templates: what teams may start sandboxes from.
//!
//! Two origins:
//! - **platform image templates** are discovered from the hosts: an agent reports the
//!   templates it can boot, and [`Services::sync_host_templates`] records them as platform
//!   templates (visible to every team, on every host);
//! - **team templates** are made from a team's running or paused sandbox
//!   (`POST /v1/snapshots`): kind `snapshot` (memory and disk: sandboxes from it continue
//!   where it was, on the same machine size) or `image` (the disk: sandboxes boot from it).
//!   Their files are made on the sandbox's host (`host_id`) and copied to other hosts of the
//!   team's pool as sandboxes from them are placed there ([`super::copies`]).
//!
//! A team sees its own templates and the platform's. Rules:
//! - names are [`is_valid_template_name`] and unique per team; a platform template's name is
//!   reserved (`already_exists`);
//! - create: the agent writes the files under a new id, then the record is stored. With
//!   `overwrite`, the new files come first, then the old template's files are deleted on its
//!   host — if that fails, the new files are deleted (best effort) and the old template stays
//!   — and only then the record is replaced (one transaction). Old generations never
//!   accumulate, and a failure never loses the old template;
//! - a template from which sandboxes holding host resources were made is in use (their disks
//!   build on its files): it can be neither overwritten nor deleted (`conflict`);
//! - delete resolves the team's own template, else the platform's. A platform template needs
//!   a platform admin (`forbidden` before anything else happens). The files go first (only
//!   "not found" on a host is ignored; any other failure keeps the record), then the record;
//! - the agent calls and what follows them run in detached tasks ([`super::detached`]), and
//!   every change is audited.

use std::time::Duration;

use nestbox_db::{DbError, hosts, sandboxes, tags, templates};
use nestbox_proto::hostagent::{
    self as pb, CreateTemplateRequest, DeleteTemplateRequest, PingRequest,
};
use nestbox_types::api::{self, CreateSnapshotRequest, Template, TemplateListQuery};
use nestbox_types::limits::{DEFAULT_TAG, is_valid_template_name, split_template_ref};
use nestbox_types::{ErrorCode, HostId, PLATFORM_TEAM, SandboxStatus, TemplateId, TemplateKind};

use super::{AuditActor, AuditEntry, detached, write_audit};
use crate::error::{ApiError, ApiResult, from_agent};
use crate::extract::Caller;
use crate::hostpool::AgentClient;
use crate::state::Services;

/// API view of a template.
pub fn template_view(t: &templates::Template) -> Template {
    Template {
        id: t.id,
        name: t.name.clone(),
        team_id: t.team_id,
        platform: t.team_id.is_platform(),
        kind: t.kind,
        vcpus: t.vcpus,
        memory_mb: t.memory_mb,
        disk_size_mb: t.disk_size_mb,
        size_bytes: t.size_bytes,
        host_id: t.host_id,
        created_at: t.created_at,
    }
}

fn invalid_name() -> ApiError {
    ApiError::invalid(
        "name must be 1–64 letters, digits, `.`, `_` or `-`, starting with a letter or digit",
    )
}

fn page(list: &[templates::Template], q: &TemplateListQuery) -> api::Page<Template> {
    api::Page {
        items: list
            .iter()
            .filter(|t| q.kind.is_none_or(|k| t.kind == k))
            .map(template_view)
            .collect(),
        next_cursor: None,
    }
}

fn proto_kind(kind: TemplateKind) -> pb::TemplateKind {
    match kind {
        TemplateKind::Image => pb::TemplateKind::Image,
        TemplateKind::Snapshot => pb::TemplateKind::Snapshot,
    }
}

/// Deletes a template's files on each of `hosts`. A host that has none is fine; any other
/// failure is returned.
async fn delete_files(
    hosts: &mut [(HostId, AgentClient)],
    id: TemplateId,
    timeout: Duration,
) -> ApiResult<()> {
    for (host, client) in hosts {
        let mut rpc = tonic::Request::new(DeleteTemplateRequest {
            template_id: id.to_string(),
        });
        rpc.set_timeout(timeout);
        if let Err(status) = client.delete_template(rpc).await {
            if nestbox_proto::error_code(&status) == ErrorCode::TemplateNotFound {
                continue;
            }
            tracing::warn!(template = %id, host = %host, error = %status.message(), "deleting template files");
            return Err(from_agent(&status));
        }
    }
    Ok(())
}

/// Best-effort removal of files a failed create left on a host.
pub(super) async fn discard(client: &AgentClient, host: HostId, id: TemplateId, timeout: Duration) {
    let mut hosts = [(host, client.clone())];
    if let Err(e) = delete_files(&mut hosts, id, timeout).await {
        tracing::warn!(template = %id, host = %host, error = %e, "template files left on the host");
    }
}

/// What [`make_template`] works with.
pub(super) struct Making {
    pub(super) id: TemplateId,
    pub(super) new: templates::NewTemplate,
    pub(super) sandbox: nestbox_types::SandboxId,
    pub(super) host: HostId,
    pub(super) client: AgentClient,
    /// The template being overwritten and the hosts with its files.
    pub(super) old: Option<(templates::Template, Vec<(HostId, AgentClient)>)>,
    pub(super) timeout: Duration,
}

impl Services {
    /// What making a template of `kind` named `name` from `sb` (on its host) takes.
    pub(super) async fn making(
        &self,
        caller: &Caller,
        sb: &nestbox_db::sandboxes::Sandbox,
        name: String,
        kind: TemplateKind,
        ephemeral: bool,
    ) -> ApiResult<Making> {
        let (host, client) = self.agent_for(sb.host_id).await?;
        Ok(Making {
            id: TemplateId::new(),
            new: templates::NewTemplate {
                team_id: caller.team,
                name,
                kind,
                vcpus: sb.vcpus,
                memory_mb: sb.memory_mb,
                disk_size_mb: sb.disk_size_mb,
                size_bytes: 0,
                host_id: Some(host),
                created_by: Some(caller.actor.id_string()),
                source_sandbox_id: Some(sb.id),
                ephemeral,
            },
            sandbox: sb.id,
            host,
            client,
            old: None,
            timeout: self.cfg.template_timeout,
        })
    }
}

/// New files, then (overwrite) the old files, then the record.
pub(super) async fn make_template(
    db: &nestbox_db::Db,
    m: Making,
) -> ApiResult<templates::Template> {
    let Making {
        id,
        mut new,
        sandbox,
        host,
        mut client,
        old,
        timeout,
    } = m;
    let mut rpc = tonic::Request::new(CreateTemplateRequest {
        sandbox_id: sandbox.to_string(),
        template_id: id.to_string(),
        kind: proto_kind(new.kind) as i32,
    });
    rpc.set_timeout(timeout);
    let created = client
        .create_template(rpc)
        .await
        .map_err(|s| from_agent(&s))?
        .into_inner();
    new.size_bytes = created.template.map(|t| t.size_bytes).unwrap_or(0);

    if let Some((old, mut old_hosts)) = old {
        if let Err(e) = delete_files(&mut old_hosts, old.id, timeout).await {
            discard(&client, host, id, timeout).await;
            return Err(e);
        }
        return match templates::replace(db, old.id, id, &new).await {
            Ok(t) => Ok(t),
            Err(e) => {
                // The old files are gone: its record must not outlive them.
                discard(&client, host, id, timeout).await;
                if let Err(del) = templates::delete(db, old.id).await {
                    tracing::error!(template = %old.id, error = %del, "a template record without files is left");
                }
                Err(stored_error(e, &new.name))
            }
        };
    }
    // A new name takes a place in the team's template quota, admitted with the record (a
    // fork's one-off template is counted but never refused).
    let stored = if new.ephemeral {
        templates::create_with_id(db, id, &new).await
    } else {
        templates::create_within_quota(db, id, &new).await
    };
    match stored {
        Ok(t) => Ok(t),
        Err(e) => {
            discard(&client, host, id, timeout).await;
            Err(stored_error(e, &new.name))
        }
    }
}

fn stored_error(e: DbError, name: &str) -> ApiError {
    match e {
        DbError::Conflict { .. } => ApiError::new(
            ErrorCode::AlreadyExists,
            format!("template `{name}` was created meanwhile"),
        ),
        other => other.into(),
    }
}

impl Services {
    /// Templates visible to the caller's team.
    pub async fn list_templates(&self, caller: &Caller) -> ApiResult<api::Page<Template>> {
        self.list_snapshots(caller, &TemplateListQuery::default())
            .await
    }

    /// Templates visible to the caller's team (its own and the platform's), by kind.
    pub async fn list_snapshots(
        &self,
        caller: &Caller,
        q: &TemplateListQuery,
    ) -> ApiResult<api::Page<Template>> {
        let list = templates::list_visible(&self.db, caller.team).await?;
        Ok(page(&list, q))
    }

    /// Every team's templates. Platform admins only.
    pub async fn list_all_templates(
        &self,
        caller: &Caller,
        q: &TemplateListQuery,
    ) -> ApiResult<api::Page<Template>> {
        caller.require_admin()?;
        let list = templates::list_all(&self.db).await?;
        Ok(page(&list, q))
    }

    /// The template a reference (`name` or `name:tag`) names for the caller's team: its
    /// own, else the platform's. `400` if the reference is not valid.
    pub async fn resolve_template(
        &self,
        caller: &Caller,
        reference: &str,
    ) -> ApiResult<Option<templates::Template>> {
        let (name, tag) = split_template_ref(reference).ok_or_else(|| {
            ApiError::invalid(
                "template must be a name, or `name:tag`: each 1–64 letters, digits, `.`, `_` or `-`",
            )
        })?;
        Ok(if tag == DEFAULT_TAG {
            templates::get_visible(&self.db, caller.team, name).await?
        } else {
            tags::resolve(&self.db, caller.team, name, tag).await?
        })
    }

    /// Fails if sandboxes holding host resources were made from `t`.
    pub(super) async fn ensure_unused(&self, t: &templates::Template) -> ApiResult<()> {
        let holding: Vec<SandboxStatus> = SandboxStatus::ALL
            .iter()
            .copied()
            .filter(SandboxStatus::holds_host_resources)
            .collect();
        let n = sandboxes::count_by_template(&self.db, t.id, &holding).await?;
        if n > 0 {
            return Err(ApiError::conflict(format!(
                "template `{}` is in use by {n} sandbox(es), whose disks build on its files; \
                 destroy them first",
                t.name
            )));
        }
        Ok(())
    }

    /// The online hosts holding a template's files: those it was made on or copied to, or
    /// every online host for templates every host has. (One that is away deletes the files
    /// of a deleted template when it returns: [`Services::sweep_orphan_templates`].)
    async fn template_hosts(
        &self,
        t: &templates::Template,
    ) -> ApiResult<Vec<(HostId, AgentClient)>> {
        let holders = match t.host_id {
            Some(_) => Some(templates::holders(&self.db, t.id).await?),
            None => None,
        };
        let mut out = Vec::new();
        for h in hosts::list_online(&self.db).await? {
            if holders.as_ref().is_some_and(|held| !held.contains(&h.id)) {
                continue;
            }
            if let Some(address) = &h.address {
                out.push((h.id, self.pool.client(h.id, address)?));
            }
        }
        Ok(out)
    }

    /// Turns a running or paused sandbox into a template of the caller's team.
    pub async fn create_snapshot(
        &self,
        caller: &Caller,
        req: &CreateSnapshotRequest,
    ) -> ApiResult<Template> {
        if !is_valid_template_name(&req.name) {
            return Err(invalid_name());
        }
        // The platform team's templates are every team's: only platform admins write them
        // (never an API key, even one of the platform team).
        if caller.team.is_platform() && !caller.actor.is_admin() {
            return Err(ApiError::forbidden(
                "templates of the platform team are every team's; only platform admins may make them",
            ));
        }
        let kind = req.kind.unwrap_or(TemplateKind::Snapshot);
        let sb = self.sandbox_row(caller, req.sandbox_id).await?;
        if !matches!(sb.status, SandboxStatus::Running | SandboxStatus::Paused) {
            return Err(ApiError::conflict(format!(
                "sandbox {} is {}; only a running or paused sandbox can become a template",
                sb.id, sb.status
            )));
        }
        super::moves::moving(&sb)?;
        let old = match templates::get_visible(&self.db, caller.team, &req.name).await? {
            None => None,
            Some(t) if t.team_id != caller.team => {
                return Err(ApiError::new(
                    ErrorCode::AlreadyExists,
                    format!(
                        "`{}` is the name of a platform template; choose another name",
                        req.name
                    ),
                ));
            }
            Some(_) if !req.overwrite => {
                return Err(ApiError::new(
                    ErrorCode::AlreadyExists,
                    format!(
                        "template `{}` already exists; pass `overwrite: true` to replace it",
                        req.name
                    ),
                ));
            }
            Some(t) => {
                self.ensure_unused(&t).await?;
                let hosts = self.template_hosts(&t).await?;
                Some((t, hosts))
            }
        };
        // A new name counts against the team's template quota (an overwrite replaces):
        // refused here before any work, admitted exactly when it is recorded.
        if old.is_none() {
            let one = nestbox_db::quotas::Demand {
                templates: 1,
                ..Default::default()
            };
            nestbox_db::quotas::check(&self.db, caller.team, &one).await?;
        }
        let mut making = self
            .making(caller, &sb, req.name.clone(), kind, false)
            .await?;
        making.old = old;
        let host = making.host;
        let db = self.db.clone();
        let who = *caller;
        let replaced = making.old.as_ref().map(|(t, _)| t.id.to_string());
        let name = req.name.clone();
        let created = detached(async move {
            let id = making.id;
            let outcome = make_template(&db, making).await;
            write_audit(
                &db,
                AuditEntry {
                    actor: AuditActor::Caller(who),
                    team: Some(who.team),
                    action: "template.create",
                    resource_type: "template",
                    resource_id: Some(id.to_string()),
                    ok: outcome.is_ok(),
                    details: serde_json::json!({
                        "name": name, "kind": kind, "sandbox": sb.id.to_string(),
                        "host": host.to_string(), "replaced": replaced,
                        "error": outcome.as_ref().err().map(|e| e.message.clone()),
                    }),
                },
            )
            .await;
            outcome
        })
        .await?;
        Ok(template_view(&created))
    }

    /// Deletes a template visible to the caller's team: its files, then its record.
    pub async fn delete_snapshot(&self, caller: &Caller, name: &str) -> ApiResult<()> {
        if !is_valid_template_name(name) {
            return Err(invalid_name());
        }
        let not_found = || {
            ApiError::new(
                ErrorCode::TemplateNotFound,
                format!("template `{name}` not found"),
            )
        };
        let visible = templates::get_visible(&self.db, caller.team, name).await?;
        if let Some(t) = &visible
            && t.team_id.is_platform()
            && !caller.actor.is_admin()
        {
            return Err(ApiError::forbidden(format!(
                "`{name}` is a platform template; only platform admins may delete it"
            )));
        }
        if let Some(t) = &visible {
            self.ensure_unused(t).await?;
        }
        let owner = visible.as_ref().map_or(caller.team, |t| t.team_id);
        // Its tagged builds go with it (each once no sandbox holds it: the sweep of hidden
        // templates).
        let untagged = tags::remove_all(&self.db, owner, name).await?;
        let removed = match visible {
            Some(t) => self.remove_template(AuditActor::Caller(*caller), t).await,
            None if !untagged.is_empty() => Ok(()),
            None => Err(not_found()),
        };
        for id in untagged {
            self.release_template(id).await;
        }
        removed
    }

    /// Deletes a template that no sandbox uses: its files on every host that has them,
    /// then its record. Audited as `who`.
    pub(crate) async fn remove_template(
        &self,
        who: AuditActor,
        t: templates::Template,
    ) -> ApiResult<()> {
        self.ensure_unused(&t).await?;
        let mut hosts = self.template_hosts(&t).await?;
        let db = self.db.clone();
        let timeout = self.cfg.template_timeout;
        detached(async move {
            let outcome = match delete_files(&mut hosts, t.id, timeout).await {
                Ok(()) => templates::delete(&db, t.id)
                    .await
                    .map(drop)
                    .map_err(ApiError::from),
                Err(e) => Err(e),
            };
            write_audit(
                &db,
                AuditEntry {
                    actor: who,
                    team: (!t.team_id.is_platform()).then_some(t.team_id),
                    action: "template.delete",
                    resource_type: "template",
                    resource_id: Some(t.id.to_string()),
                    ok: outcome.is_ok(),
                    details: serde_json::json!({
                        "name": t.name, "kind": t.kind,
                        "host": t.host_id.map(|h| h.to_string()),
                        "error": outcome.as_ref().err().map(|e| e.message.clone()),
                    }),
                },
            )
            .await;
            outcome
        })
        .await
    }

    /// The team's templates made from one of its sandboxes, newest first.
    pub async fn templates_made_from(
        &self,
        caller: &Caller,
        sandbox: nestbox_types::SandboxId,
    ) -> ApiResult<Vec<Template>> {
        let list = templates::made_from(&self.db, caller.team, sandbox).await?;
        Ok(list.iter().map(template_view).collect())
    }

    /// Deletes the hidden template `id` (a fork's one-off template, a replaced or untagged
    /// build) if nothing holds it: no sandbox holding host resources, no tag, no
    /// step-cache entry (a build sandbox starts from one; it stays until the cache is
    /// pruned). A template still held stays, for the monitor's sweep.
    pub(crate) async fn release_template(&self, id: TemplateId) {
        let Ok(t) = templates::get(&self.db, id).await else {
            return;
        };
        if !t.ephemeral
            || nestbox_db::builds::is_cached(&self.db, id)
                .await
                .unwrap_or(true)
            || tags::is_tagged(&self.db, id).await.unwrap_or(true)
        {
            return;
        }
        if let Err(e) = self.remove_template(AuditActor::System, t).await {
            tracing::debug!(template = %id, error = %e, "hidden template kept for now");
        }
    }

    /// Deletes the fork templates no sandbox uses any more (made before `before`, so that
    /// a fork still starting its sandboxes keeps its template). Returns how many went.
    pub async fn sweep_fork_templates(&self, before: chrono::DateTime<chrono::Utc>) -> usize {
        let unused = match templates::unused_ephemeral(&self.db, before).await {
            Ok(list) => list,
            Err(e) => {
                tracing::warn!(error = %e, "listing unused fork templates");
                return 0;
            }
        };
        let mut removed = 0;
        for t in unused {
            let id = t.id;
            match self.remove_template(AuditActor::System, t).await {
                Ok(()) => removed += 1,
                Err(e) => {
                    tracing::debug!(template = %id, error = %e, "fork template not removed yet")
                }
            }
        }
        removed
    }

    /// Asks a host which templates it holds: team templates that no longer exist are
    /// deleted there ([`Services::sweep_orphan_templates`]); a platform host's built-in
    /// templates are recorded as platform templates (a BYOC host's never are).
    pub async fn sync_host_templates(&self, host: HostId, address: &str) -> ApiResult<usize> {
        let byoc = nestbox_db::hosts::get(&self.db, host)
            .await?
            .team_id
            .is_some();
        let platform = platform_templates(&self.db).await?;
        self.sync_host_templates_with(host, byoc, address, &platform)
            .await
    }

    /// [`Self::sync_host_templates`] with what a monitor pass read once for every host:
    /// whether the host is a team's (`byoc`) and the platform's templates by name.
    pub(crate) async fn sync_host_templates_with(
        &self,
        host: HostId,
        byoc: bool,
        address: &str,
        platform: &std::collections::HashMap<String, templates::Template>,
    ) -> ApiResult<usize> {
        let mut client = self.pool.client(host, address)?;
        let mut req = tonic::Request::new(PingRequest {});
        req.set_timeout(std::time::Duration::from_secs(10));
        let ping = client
            .ping(req)
            .await
            .map_err(|s| from_agent(&s))?
            .into_inner();
        self.sweep_orphan_templates(host, &mut client, &ping.template_infos)
            .await?;
        // A team's own host (BYOC) is run by that team: what it reports never defines the
        // platform's templates.
        if byoc {
            return Ok(0);
        }
        let mut n = 0;
        for info in &ping.template_infos {
            // Team templates stored on the host are recorded when they are made.
            if info.kind != "image" || !info.template_id.is_empty() {
                continue;
            }
            if !nestbox_types::limits::is_valid_template_name(&info.name) {
                tracing::warn!(host = %host, name = %info.name, "host reports an invalid template name; ignored");
                continue;
            }
            let unchanged = platform.get(&info.name).is_some_and(|t| {
                t.team_id.is_platform()
                    && t.disk_size_mb == info.min_disk_mb
                    && t.size_bytes == info.size_bytes
            });
            if unchanged {
                continue;
            }
            templates::upsert(
                &self.db,
                &templates::NewTemplate {
                    team_id: PLATFORM_TEAM,
                    name: info.name.clone(),
                    kind: TemplateKind::Image,
                    vcpus: nestbox_types::limits::DEFAULT_VCPUS,
                    memory_mb: nestbox_types::limits::DEFAULT_MEMORY_MB,
                    disk_size_mb: info.min_disk_mb,
                    size_bytes: info.size_bytes,
                    host_id: None,
                    created_by: None,
                    source_sandbox_id: None,
                    ephemeral: false,
                },
            )
            .await
            .map_err(ApiError::from)?;
            n += 1;
        }
        if n > 0 {
            tracing::info!(host = %host, templates = n, "platform templates updated");
        }
        Ok(n)
    }
}

/// The platform's templates by name (what every platform host should report).
pub(crate) async fn platform_templates(
    db: &nestbox_db::Db,
) -> ApiResult<std::collections::HashMap<String, templates::Template>> {
    Ok(templates::list_visible(db, PLATFORM_TEAM)
        .await?
        .into_iter()
        .map(|t| (t.name.clone(), t))
        .collect())
}
