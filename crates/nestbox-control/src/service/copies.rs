//! Team templates across the fleet: copying a template's files to another host, relayed
//! by the control plane.
//!
//! A team template is made on one host; a sandbox from it placed elsewhere (the template's
//! hosts are full or gone, or the template is the platform's and belongs on every platform
//! host) first gets the files copied there. The control plane reads them from a host that
//! holds them and writes them to the one that needs them, over the two agents' mutually
//! authenticated channels: hosts never connect to each other, so no host (a BYOC one
//! included) can reach another's files.
//!
//! Rules:
//! - a copy goes file by file; the receiving agent says where each file's copy stands, so a
//!   copy cut short (either agent, the network, this process) resumes there, and checks
//!   every file's digest before the template appears (see the agent's `transfer` module);
//! - one copy of a template to a host at a time in this process ([`Copies`]); concurrent
//!   copies from several control planes are safe on the agent (a per-template lock, and a
//!   template already there is "present");
//! - a host is recorded as a holder (`template_hosts`) only once its copy is committed, so a
//!   delete never misses one: a delete that races a copy finds the record gone, and the
//!   monitor deletes files of templates that no longer exist from hosts that hold them
//!   ([`Services::sweep_orphan_templates`]);
//! - the monitor copies platform templates to every online platform host.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use nestbox_db::{hosts, templates};
use nestbox_proto::hostagent::{
    CommitTemplateImportRequest, DeleteTemplateRequest, FileBlock, GetTemplateManifestRequest,
    ReadTemplateFileRequest, TemplateInfo,
};
use nestbox_types::{ErrorCode, HostId, TemplateId};

use crate::error::{ApiError, ApiResult, from_agent};
use crate::hostpool::AgentClient;
use crate::state::Services;

/// Attempts of one copy before it fails (each resumes where the last stood).
pub(crate) const ATTEMPTS: usize = 3;

/// Copies under way in this process, by template and receiving host.
#[derive(Debug, Default)]
pub struct Copies {
    running: Mutex<HashSet<(TemplateId, HostId)>>,
    /// Wakes those waiting for a copy to end.
    done: tokio::sync::Notify,
}

/// Marks a copy as under way until dropped.
struct Running<'a> {
    copies: &'a Copies,
    key: (TemplateId, HostId),
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        if let Ok(mut running) = self.copies.running.lock() {
            running.remove(&self.key);
        }
        self.copies.done.notify_waiters();
    }
}

impl Copies {
    /// Waits until no copy of `key` runs here, then marks one as running.
    async fn start(&self, key: (TemplateId, HostId)) -> Running<'_> {
        loop {
            let notified = self.done.notified();
            {
                let mut running = self.running.lock().unwrap_or_else(|p| p.into_inner());
                if running.insert(key) {
                    return Running { copies: self, key };
                }
            }
            notified.await;
        }
    }

    /// Whether a copy of `key` runs here.
    fn is_running(&self, key: (TemplateId, HostId)) -> bool {
        self.running
            .lock()
            .map(|r| r.contains(&key))
            .unwrap_or(false)
    }
}

/// Relays template `id` from `from` to `to`, once: resumes each file where `to` says it
/// stands. Returns the template as `to` stored it.
pub(crate) async fn relay(
    id: TemplateId,
    from: &mut AgentClient,
    to: &mut AgentClient,
    timeout: Duration,
) -> ApiResult<TemplateInfo> {
    let agent = |s: tonic::Status| from_agent(&s);
    let mut rpc = tonic::Request::new(GetTemplateManifestRequest {
        template_id: id.to_string(),
    });
    rpc.set_timeout(timeout);
    let manifest = from.get_template_manifest(rpc).await.map_err(agent)?;
    let manifest = manifest.into_inner();
    let mut rpc = tonic::Request::new(manifest.clone());
    rpc.set_timeout(timeout);
    let begun = to
        .begin_template_import(rpc)
        .await
        .map_err(agent)?
        .into_inner();
    if !begun.present {
        for (file, at) in manifest.files.iter().zip(begun.resume_at.iter().copied()) {
            if at >= file.size {
                continue;
            }
            let mut rpc = tonic::Request::new(ReadTemplateFileRequest {
                template_id: id.to_string(),
                name: file.name.clone(),
                offset: at,
            });
            rpc.set_timeout(timeout);
            let blocks = from
                .read_template_file(rpc)
                .await
                .map_err(agent)?
                .into_inner();
            // A read that fails ends the write where it stands; the error is kept.
            let failed = Arc::new(Mutex::new(None::<tonic::Status>));
            let seen = failed.clone();
            let outbound = blocks
                .take_while(move |b| {
                    let ok = match b {
                        Ok(_) => true,
                        Err(s) => {
                            if let Ok(mut f) = seen.lock() {
                                *f = Some(s.clone());
                            }
                            false
                        }
                    };
                    futures::future::ready(ok)
                })
                .filter_map(|b: Result<FileBlock, tonic::Status>| futures::future::ready(b.ok()));
            let mut rpc = tonic::Request::new(outbound);
            rpc.set_timeout(timeout);
            let wrote = to
                .write_template_file(rpc)
                .await
                .map_err(agent)?
                .into_inner();
            if let Some(status) = failed.lock().ok().and_then(|mut f| f.take()) {
                return Err(from_agent(&status));
            }
            if wrote.next_offset < file.size {
                return Err(ApiError::new(
                    ErrorCode::HostUnavailable,
                    format!(
                        "the copy of `{}` stopped at {} of {} bytes",
                        file.name, wrote.next_offset, file.size
                    ),
                ));
            }
        }
    }
    let mut rpc = tonic::Request::new(CommitTemplateImportRequest {
        template_id: id.to_string(),
    });
    rpc.set_timeout(timeout);
    let committed = to
        .commit_template_import(rpc)
        .await
        .map_err(agent)?
        .into_inner();
    committed
        .template
        .ok_or_else(|| ApiError::internal("the host stored the template but did not describe it"))
}

/// What a copy needs of the services, owned: copies run in detached tasks.
#[derive(Clone)]
pub(crate) struct Copier {
    db: nestbox_db::Db,
    pool: crate::hostpool::HostPool,
    copies: Arc<Copies>,
    timeout: Duration,
}

impl Services {
    /// A handle for template copies.
    pub(crate) fn copier(&self) -> Copier {
        Copier {
            db: self.db.clone(),
            pool: self.pool.clone(),
            copies: self.copies.clone(),
            timeout: self.cfg.template_timeout,
        }
    }
}

impl Copier {
    /// The client of `host` if it is online.
    async fn online(&self, host: HostId) -> Option<AgentClient> {
        let h = hosts::get(&self.db, host).await.ok()?;
        if h.status != nestbox_types::HostStatus::Online {
            return None;
        }
        self.pool.client(host, h.address.as_deref()?).ok()
    }

    /// Makes sure `to` holds template `t`'s files, copying them from a host that does if
    /// needed (see the module docs). Templates every host has need nothing.
    pub(crate) async fn ensure(
        &self,
        t: &templates::Template,
        to: HostId,
        client: &AgentClient,
    ) -> ApiResult<()> {
        if t.host_id.is_none() {
            return Ok(());
        }
        let _running = self.copies.start((t.id, to)).await;
        let holders = templates::holders(&self.db, t.id).await?;
        if holders.contains(&to) {
            return Ok(());
        }
        let mut sources = Vec::new();
        for h in holders {
            if let Some(c) = self.online(h).await {
                sources.push((h, c));
            }
        }
        if sources.is_empty() {
            return Err(ApiError::new(
                ErrorCode::HostUnavailable,
                format!(
                    "no host holding template `{}` is online to copy it from; retry later",
                    t.name
                ),
            ));
        }
        let started = std::time::Instant::now();
        let mut to_client = client.clone();
        let mut last = None;
        for attempt in 0..ATTEMPTS {
            let (from, mut from_client) = sources[attempt % sources.len()].clone();
            match relay(t.id, &mut from_client, &mut to_client, self.timeout).await {
                Ok(info) => {
                    if let Err(e) = templates::add_holder(&self.db, t.id, to).await {
                        // Deleted meanwhile: its files must not stay.
                        delete_on(&mut to_client, t.id, self.timeout).await;
                        return Err(if e.is_not_found() {
                            ApiError::new(
                                ErrorCode::TemplateNotFound,
                                format!("template `{}` was deleted meanwhile", t.name),
                            )
                        } else {
                            e.into()
                        });
                    }
                    tracing::info!(
                        template = %t.id, from = %from, to = %to, bytes = info.size_bytes,
                        ms = started.elapsed().as_millis() as u64, "template copied"
                    );
                    return Ok(());
                }
                Err(e) => {
                    tracing::warn!(template = %t.id, from = %from, to = %to, attempt, error = %e, "copying a template");
                    // Refusals another try cannot change.
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
        Err(last.unwrap_or_else(|| ApiError::internal("copying the template failed")))
    }
}

impl Services {
    /// Copies platform templates to every online platform host that lacks them, one copy
    /// at a time per template and host, in the background.
    pub fn spread_platform_templates(&self) -> tokio::task::JoinHandle<usize> {
        let copier = self.copier();
        tokio::spawn(async move {
            let listed = tokio::try_join!(
                templates::with_holders(&copier.db, true),
                hosts::list_online(&copier.db)
            );
            let (list, online) = match listed {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!(error = %e, "listing platform templates and hosts");
                    return 0;
                }
            };
            let mut begun = 0;
            for (t, holders) in list {
                for h in online.iter().filter(|h| h.team_id.is_none() && !h.draining) {
                    if holders.contains(&h.id) || copier.copies.is_running((t.id, h.id)) {
                        continue;
                    }
                    let Some(address) = &h.address else { continue };
                    let Ok(client) = copier.pool.client(h.id, address) else {
                        continue;
                    };
                    begun += 1;
                    let copier = copier.clone();
                    let (t, host) = (t.clone(), h.id);
                    tokio::spawn(async move {
                        if let Err(e) = copier.ensure(&t, host, &client).await {
                            tracing::warn!(template = %t.id, host = %host, error = %e, "copying a platform template");
                        }
                    });
                }
            }
            begun
        })
    }

    /// Deletes from `host` the files of team templates that no longer exist (deleted while
    /// the host was away, or made by a create whose record was never stored), once they are
    /// older than the template call's deadline; records as holders the hosts that have the
    /// files of templates that exist. `infos` is what the host reported.
    pub(crate) async fn sweep_orphan_templates(
        &self,
        host: HostId,
        client: &mut AgentClient,
        infos: &[TemplateInfo],
    ) -> ApiResult<()> {
        let grace = chrono::Duration::from_std(self.cfg.template_timeout)
            .unwrap_or(chrono::Duration::minutes(10));
        let cutoff = (chrono::Utc::now() - grace).timestamp_millis();
        for info in infos.iter().filter(|i| !i.template_id.is_empty()) {
            let Ok(id) = info.template_id.parse::<TemplateId>() else {
                continue;
            };
            if self.copies.is_running((id, host)) {
                continue;
            }
            if templates::exists(&self.db, id).await? {
                if let Err(e) = templates::add_holder(&self.db, id, host).await
                    && !e.is_not_found()
                {
                    return Err(e.into());
                }
                continue;
            }
            if info.stored_at_unix_ms > cutoff {
                continue;
            }
            tracing::info!(template = %id, host = %host, "deleting the files of a template that no longer exists");
            delete_on(client, id, self.cfg.template_timeout).await;
        }
        Ok(())
    }
}

/// Deletes template `id`'s files on a host, best effort.
pub(crate) async fn delete_on(client: &mut AgentClient, id: TemplateId, timeout: Duration) {
    let mut rpc = tonic::Request::new(DeleteTemplateRequest {
        template_id: id.to_string(),
    });
    rpc.set_timeout(timeout);
    if let Err(s) = client.delete_template(rpc).await
        && nestbox_proto::error_code(&s) != ErrorCode::TemplateNotFound
    {
        tracing::warn!(template = %id, error = %s.message(), "template files left on a host");
    }
}
