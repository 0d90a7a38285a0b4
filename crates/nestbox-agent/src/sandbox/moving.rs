//! Moving a paused sandbox between hosts: packing it on the host it leaves, taking it over
//! on the host it goes to. The control plane relays the package between the two (as it
//! relays a template copy, see [`crate::transfer`]) and decides which copy is the sandbox.
//!
//! A **move package** is a snapshot template of the paused sandbox — its memory and device
//! state, and its disk flattened into a standalone image — whose record names the sandbox
//! (`move_of`). The store never lists one and no create starts from one; a package nothing
//! took over is removed [`PACKAGE_TTL`] after it was made (at start-up, and whenever a move
//! packs or takes over one here).
//!
//! Taking a package over makes the sandbox paused here exactly as a pause leaves one whose
//! snapshot reached the disk: `rootfs.qcow2` a fresh overlay over the package's image
//! (kept in the sandbox's directory as `base.ext4`, its recorded backing), the snapshot in
//! `snapshot/`, `state.json` recorded last. The next resume restores it with its processes,
//! memory and disk, under the access token its guest holds.
//!
//! Invariants:
//! - the sandbox's own copy on the host it leaves is untouched by packing: it stays paused
//!   (and can resume there) until the control plane destroys it;
//! - a take-over that fails leaves nothing: its directory and reservation are released.

use std::path::Path;
use std::sync::Arc;

use nestbox_types::{SandboxId, TeamId, TemplateId};
use nestbox_vmm::snapshot::{MANIFEST_FILE, MEMORY_FILE, STATE_FILE};

use super::state::{self, Phase, StartedBy, StateFile};
use super::{Command, Manager, SandboxHandle, sandbox_dir};
use crate::error::AgentError;
use crate::templates::{Kind, StoredTemplate};

/// A taken-over sandbox's disk image (its overlay's backing), in its directory.
const BASE_FILE: &str = "base.ext4";
/// A move package older than this is left over (a move is given up long before): removed
/// at start-up and whenever another move packs or takes over one here.
pub const PACKAGE_TTL: std::time::Duration = std::time::Duration::from_secs(6 * 3600);

/// What the control plane knows of a sandbox that the package does not carry.
#[derive(Debug, Clone)]
pub struct AdoptParams {
    /// The sandbox.
    pub id: SandboxId,
    /// Its move package, received on this host.
    pub export: TemplateId,
    /// Its team.
    pub team: TeamId,
    /// Its template's name.
    pub template: String,
    /// The team template it was made from, if any.
    pub template_id: Option<TemplateId>,
    /// Inactivity timeout, seconds (0: never).
    pub timeout_sec: u32,
    /// Its egress rules (validated).
    pub egress: nestbox_types::egress::EgressRules,
    /// Their version.
    pub egress_version: u64,
    /// The token its guest must hold from now on, when a rotation made while it was paused
    /// changed it (`None`: the package's).
    pub access_token: Option<String>,
}

impl Manager {
    /// Packs paused sandbox `id` as move package `export` (see the module docs). Asked
    /// again, answers the package made the first time.
    pub async fn export_sandbox(
        &self,
        id: SandboxId,
        export: TemplateId,
    ) -> Result<StoredTemplate, AgentError> {
        self.sweep_packages_off_workers().await;
        if let Ok(made) = self.inner().templates.get_id(export) {
            return if made.record.move_of == Some(id) {
                Ok(made)
            } else {
                Err(AgentError::Invalid(format!(
                    "{export} already exists on this host"
                )))
            };
        }
        let store = self.inner().templates.clone();
        self.get(id)?
            .request(|reply| Command::CreateTemplate {
                store,
                key: export.to_string(),
                kind: Kind::Snapshot,
                move_of: true,
                reply,
            })
            .await
    }

    /// Makes sandbox `p.id` paused here from its move package (consumed on success).
    pub async fn adopt_sandbox(&self, p: AdoptParams) -> Result<Arc<SandboxHandle>, AgentError> {
        let id = p.id;
        self.sweep_packages_off_workers().await;
        let package = self.inner().templates.get_id(p.export)?;
        if package.record.move_of != Some(id) || package.record.kind != Kind::Snapshot {
            return Err(AgentError::Invalid(format!(
                "{} is not a move package of sandbox {id}",
                p.export
            )));
        }
        let token = package.record.access_token.clone().ok_or_else(|| {
            AgentError::Invalid(format!("move package {} has no access token", p.export))
        })?;
        let kernel = self
            .inner()
            .images
            .kernel(&package.record.kernel_version)
            .map_err(|e| {
                AgentError::Invalid(format!(
                    "sandbox {id} runs kernel {}, which this host lacks: {e}",
                    package.record.kernel_version
                ))
            })?;
        if let Some(token) = &p.access_token
            && token.len() < 16
        {
            return Err(AgentError::Invalid(
                "access_token must be at least 16 characters".into(),
            ));
        }
        self.open()?;
        let dir = sandbox_dir(&self.inner().cfg.data_dir, id);
        // Only a directory made here is removed on failure.
        if tokio::fs::try_exists(&dir).await.unwrap_or(true) {
            return Err(AgentError::SandboxExists(id));
        }
        if let Err(e) = self.reserve(id, package.record.memory_mb) {
            // Pooled clones give way, as they do to a create.
            if !matches!(e, AgentError::NoCapacity(_)) || self.pooled() == 0 {
                return Err(e);
            }
            self.drain_pool(|_| true).await;
            self.reserve(id, package.record.memory_mb)?;
        }
        let st = StateFile {
            format_version: state::STATE_FORMAT,
            sandbox_id: id,
            team_id: p.team,
            template: p.template,
            template_id: p.template_id,
            vcpus: package.record.vcpus,
            memory_mb: package.record.memory_mb,
            disk_size_mb: package.record.disk_size_mb,
            timeout_sec: p.timeout_sec,
            access_token: token,
            kernel: kernel.kernel,
            initrd: kernel.initramfs,
            kernel_version: package.record.kernel_version.clone(),
            phase: Phase::Paused,
            auto_paused: false,
            started_by: StartedBy::Restore,
            slot: None,
            vmm_pid: None,
            vmm_name: None,
            mem_dir: self.mem_dir(id),
            snapshot_durable: true,
            started_at: chrono::Utc::now(),
            boot_ms: 0,
            guest_version: String::new(),
            pooled: false,
            pool_template: None,
            internal: false,
            dir_alias: None,
            egress: p.egress,
            egress_version: p.egress_version,
            rotating_to: p
                .access_token
                .filter(|t| Some(t) != package.record.access_token.as_ref()),
            disk_backing: Some(dir.join(BASE_FILE)),
        };
        match self.unpack(&package, &dir, &st).await {
            Ok(()) => {
                if let Err(e) = self.inner().templates.delete(&p.export.to_string()) {
                    tracing::warn!(sandbox = %id, error = %e.public_message(), "removing a move package taken over");
                }
                self.adopt_paused(st);
                tracing::info!(sandbox = %id, "took over a moved sandbox (paused)");
                self.get(id)
            }
            Err(e) => {
                let _ = tokio::fs::remove_dir_all(&dir).await;
                self.unreserve(id);
                Err(e)
            }
        }
    }

    /// [`Self::sweep_packages`] on the blocking pool (it reads and removes directories).
    async fn sweep_packages_off_workers(&self) {
        let manager = self.clone();
        if let Err(e) = tokio::task::spawn_blocking(move || manager.sweep_packages()).await {
            tracing::warn!(error = %e, "sweeping move packages");
        }
    }

    /// Removes move packages older than [`PACKAGE_TTL`].
    pub(crate) fn sweep_packages(&self) -> usize {
        let removed = self.inner().templates.sweep_moves(PACKAGE_TTL);
        if removed > 0 {
            tracing::info!(removed, "removed move packages nothing took over");
        }
        removed
    }

    /// Moves the package's files into the sandbox's new directory, makes its disk and
    /// records it.
    async fn unpack(
        &self,
        package: &StoredTemplate,
        dir: &Path,
        st: &StateFile,
    ) -> Result<(), AgentError> {
        let id = st.sandbox_id;
        let io = |what: &'static str| move |e: std::io::Error| AgentError::host(what, id, e);
        let snapshot = dir.join("snapshot");
        tokio::fs::create_dir_all(&snapshot)
            .await
            .map_err(io("creating the sandbox directory"))?;
        let base = dir.join(BASE_FILE);
        tokio::fs::rename(package.rootfs(), &base)
            .await
            .map_err(io("taking the moved disk"))?;
        for name in [STATE_FILE, MEMORY_FILE, MANIFEST_FILE] {
            let from = package.dir.join(name);
            if tokio::fs::try_exists(&from).await.unwrap_or(false) {
                tokio::fs::rename(&from, snapshot.join(name))
                    .await
                    .map_err(io("taking the moved snapshot"))?;
            }
        }
        if !snapshot.join(MANIFEST_FILE).is_file() {
            return Err(AgentError::Invalid(format!(
                "the move package of {id} holds no snapshot"
            )));
        }
        self.inner()
            .disks
            .create_overlay(&base, &dir.join("rootfs.qcow2"), None)
            .await
            .map_err(|e| AgentError::host("creating the root disk", id, e))?;
        state::write(dir, st)
    }
}
