//! Bringing a sandbox's VM up: a fresh boot, a clone of a snapshot template, or the resume
//! of a paused sandbox. All three take a network slot and namespace, start a VMM, wait for
//! the guest agent and initialise it; on failure they release what they took (and a
//! resume puts its snapshot back, so the sandbox stays paused).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use chrono::Utc;
use nestbox_envd::client::EnvdClient;
use nestbox_envd::types::InitRequest;
use nestbox_hostsys::disk;
use nestbox_hostsys::net;
use nestbox_types::SandboxId;
use nestbox_vmm::snapshot::RestoreMemory;
use nestbox_vmm::{Disk, DiskFormat, GuestConfig, NetworkSpec, Vm, VmSpec};
use sha2::{Digest, Sha256};

use super::pool::{self, PoolKey};
use super::state::{self, Phase, StartedBy, StateFile};
use super::{CreateParams, Manager, min_disk_mb, remove_dir_if_exists, sandbox_dir};
use crate::error::AgentError;
use crate::host::NetHandle;
use crate::templates::{Kind, StoredTemplate};

/// The key of a built-in template's build (its base images are named by it).
pub(crate) fn image_key(image: &nestbox_image::TemplateImage) -> String {
    image.manifest.inputs_hash.chars().take(16).collect()
}

/// What a running sandbox holds on the host.
pub(crate) struct Live {
    pub vm: Box<dyn Vm>,
    pub net: NetHandle,
    /// Its resolver, holding its egress rules (dropped with the network).
    pub egress: super::egress::Guard,
}

impl Live {
    /// Leaves the VM, its network and its resolver's rules as they are, without running
    /// any destructor: the VMM is not killed, its run files stay, the namespace stays
    /// (an upgrade restart; the next run of the agent takes them back).
    pub(crate) fn detach(self) {
        std::mem::forget(self);
    }
}

/// Where a new sandbox's VM comes from.
enum Origin {
    /// Boot a kernel with a root filesystem (the base image, expanded to the disk size).
    Boot {
        base_name: String,
        base_key: String,
        rootfs: PathBuf,
        min_mb: u64,
    },
    /// Restore a clone of a snapshot template (a team's or a warm one), mapping its memory
    /// as `memory` says.
    Clone {
        template: StoredTemplate,
        memory: RestoreMemory,
    },
}

/// How the guest agent is initialised once it answers.
pub(crate) struct Init {
    /// Token the guest agent holds now (`None`: the first `/init` of a fresh boot, checked
    /// against the hash on the kernel command line).
    pub present: Option<String>,
    /// Token it must require from now on.
    pub token: String,
    /// Default environment (`None` keeps the guest's).
    pub env: Option<HashMap<String, String>>,
    /// Host name to set.
    pub hostname: Option<String>,
    /// The user and directory commands default to (`None` keeps the guest's: a new
    /// sandbox sets them, a resumed one keeps what it had).
    pub defaults: Option<Defaults>,
}

/// The user and directory a sandbox's commands default to.
#[derive(Debug, Clone, Default)]
pub(crate) struct Defaults {
    /// `None`: root.
    pub user: Option<String>,
    /// `None`: the user's home.
    pub workdir: Option<String>,
}

impl Defaults {
    /// A create's: `None` when it names neither (the guest keeps its own: root after a
    /// boot, the snapshot's after a restore).
    pub(crate) fn of(p: &super::CreateParams) -> Option<Self> {
        (p.default_user.is_some() || p.default_workdir.is_some()).then(|| Self {
            user: p.default_user.clone(),
            workdir: p.default_workdir.clone(),
        })
    }
}

/// The guest's host name for a sandbox.
pub(crate) fn hostname(id: SandboxId) -> String {
    format!("sb-{}", id.short())
}

/// A stable, locally administered MAC per sandbox.
pub(crate) fn guest_mac(id: SandboxId) -> String {
    let b = id.uuid().into_bytes();
    format!("02:4e:{:02x}:{:02x}:{:02x}:{:02x}", b[0], b[1], b[2], b[3])
}

/// The last lines of a console log, for failure messages.
pub(crate) fn console_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    let all: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    all[all.len().saturating_sub(lines)..].join(" | ")
}

impl Manager {
    /// Resolves where a new sandbox comes from and the facts that follow from it.
    fn origin(&self, p: &CreateParams) -> Result<(Origin, StateFile), AgentError> {
        let inner = self.inner();
        let id = p.id;
        let default_disk = |disk: u32| {
            if disk == 0 {
                inner.cfg.default_disk_mb
            } else {
                u64::from(disk)
            }
        };
        let mut st = StateFile {
            format_version: state::STATE_FORMAT,
            sandbox_id: id,
            team_id: p.team,
            template: p.template.clone(),
            template_id: p.template_id,
            vcpus: p.vcpus,
            memory_mb: p.memory_mb,
            disk_size_mb: 0,
            timeout_sec: p.timeout_sec,
            access_token: p.access_token.clone(),
            kernel: PathBuf::new(),
            initrd: PathBuf::new(),
            kernel_version: String::new(),
            phase: Phase::Starting,
            auto_paused: false,
            started_by: StartedBy::Boot,
            slot: None,
            vmm_pid: None,
            vmm_name: None,
            mem_dir: self.mem_dir(id),
            snapshot_durable: false,
            started_at: Utc::now(),
            boot_ms: 0,
            guest_version: String::new(),
            pooled: false,
            pool_template: None,
            internal: false,
            dir_alias: None,
            egress: p.egress.clone(),
            egress_version: 0,
            rotating_to: None,
            disk_backing: None,
        };
        let origin = match p.template_id {
            Some(tpl) => {
                let template = self.template(tpl)?;
                if template.record.move_of.is_some() {
                    return Err(AgentError::TemplateNotFound(tpl.to_string()));
                }
                let kernel = inner
                    .images
                    .kernel(&template.record.kernel_version)
                    .map_err(|e| {
                        AgentError::Invalid(format!(
                            "template {tpl} needs kernel {}: {e}",
                            template.record.kernel_version
                        ))
                    })?;
                st.kernel = kernel.kernel;
                st.initrd = kernel.initramfs;
                st.kernel_version = template.record.kernel_version.clone();
                let disk =
                    default_disk(p.disk_size_mb).max(u64::from(template.record.disk_size_mb));
                st.disk_size_mb = u32::try_from(disk).unwrap_or(u32::MAX);
                match template.record.kind {
                    Kind::Snapshot => {
                        if p.vcpus != template.record.vcpus
                            || p.memory_mb != template.record.memory_mb
                        {
                            return Err(AgentError::Invalid(format!(
                                "snapshot template {tpl} runs with {} vCPUs and {} MiB",
                                template.record.vcpus, template.record.memory_mb
                            )));
                        }
                        st.started_by = StartedBy::Restore;
                        // Clones of a team template share its pages (many idle clones
                        // cost little host memory); pausing one saves its RAM in full.
                        Origin::Clone {
                            template,
                            memory: RestoreMemory::Clone,
                        }
                    }
                    Kind::Image => Origin::Boot {
                        base_name: tpl.to_string(),
                        base_key: "t".into(),
                        rootfs: template.rootfs(),
                        min_mb: u64::from(template.record.disk_size_mb),
                    },
                }
            }
            None => {
                let (image, kernel) = inner
                    .images
                    .template_with_kernel(&p.template)
                    .map_err(|_| AgentError::TemplateNotFound(p.template.clone()))?;
                let min_mb = min_disk_mb(image.manifest.fs_min_bytes);
                let disk = default_disk(p.disk_size_mb);
                if disk < min_mb {
                    return Err(AgentError::Invalid(format!(
                        "disk_size_mb {disk} is too small for template `{}` (needs at least {min_mb})",
                        p.template
                    )));
                }
                st.disk_size_mb = u32::try_from(disk).unwrap_or(u32::MAX);
                st.kernel = kernel.kernel;
                st.initrd = kernel.initramfs;
                st.kernel_version = kernel.manifest.kernel_version.clone();
                // The default machine of a built-in template restores from its warm
                // snapshot when one is ready.
                match inner.warm.get(&p.template, p.vcpus, p.memory_mb, disk) {
                    Some(template) => {
                        st.started_by = StartedBy::Restore;
                        // A default sandbox gets its own copy of the warm snapshot's RAM:
                        // it pauses fast, and templates made from it carry a RAM file
                        // their own clones can share.
                        Origin::Clone {
                            template,
                            memory: RestoreMemory::Copy,
                        }
                    }
                    None => Origin::Boot {
                        base_name: p.template.clone(),
                        base_key: image_key(&image),
                        rootfs: image.rootfs,
                        min_mb,
                    },
                }
            }
        };
        Ok((origin, st))
    }

    /// Creates a new sandbox's files, network and VM, and initialises its guest agent. A
    /// clone of a snapshot template takes over a pooled one when there is one.
    pub(super) async fn launch_new(
        &self,
        p: &CreateParams,
        started: Instant,
    ) -> Result<(StateFile, Live, EnvdClient, String), AgentError> {
        let (origin, st) = self.origin(p)?;
        let key = match &origin {
            Origin::Clone { template, .. } => pool::key(template, &st),
            Origin::Boot { .. } => None,
        };
        let Some(key) = key else {
            return self.launch_from(p, origin, st, started).await;
        };
        let result = match self.take_pooled(&key, p, started).await {
            Some(done) => Ok(done),
            None => self.launch_from(p, origin, st, started).await,
        };
        // Top the pool up for the next create, in the background.
        if !p.no_pool {
            self.refill_pool(key, p);
        }
        result
    }

    /// The pool key of `p`'s creates, if they start as clones a pooled one can serve.
    pub(super) fn pool_key_of(&self, p: &CreateParams) -> Result<Option<PoolKey>, AgentError> {
        Ok(match self.origin(p)? {
            (Origin::Clone { template, .. }, st) => pool::key(&template, &st),
            (Origin::Boot { .. }, _) => None,
        })
    }

    /// The start of a pooled clone (no pool taken from, none refilled).
    pub(super) async fn launch_for_pool(
        &self,
        p: &CreateParams,
        key: &PoolKey,
    ) -> Result<(StateFile, Live, EnvdClient, String), AgentError> {
        let (origin, st) = self.origin(p)?;
        let matches = match &origin {
            Origin::Clone { template, .. } => pool::key(template, &st).as_ref() == Some(key),
            Origin::Boot { .. } => false,
        };
        if !matches {
            return Err(AgentError::Internal(format!(
                "template {} no longer starts as a clone of {}",
                p.template,
                key.template.display()
            )));
        }
        self.launch_from(p, origin, st, Instant::now()).await
    }

    /// [`Self::launch_new`] once the origin is known.
    async fn launch_from(
        &self,
        p: &CreateParams,
        origin: Origin,
        mut st: StateFile,
        started: Instant,
    ) -> Result<(StateFile, Live, EnvdClient, String), AgentError> {
        let inner = self.inner();
        let id = p.id;
        let dir = sandbox_dir(&inner.cfg.data_dir, id);
        let result = async {
            // Directory and state record first: from here on a crash is cleaned up.
            tokio::fs::create_dir_all(&dir)
                .await
                .map_err(|e| AgentError::host("creating the sandbox directory", id, e))?;
            state::write(&dir, &st)?;
            tokio::fs::create_dir_all(&st.mem_dir)
                .await
                .map_err(|e| AgentError::host("creating the guest memory directory", id, e))?;
            let overlay = dir.join("rootfs.qcow2");
            let disk_mb = u64::from(st.disk_size_mb);
            // No base is pruned between choosing it and the overlay naming it.
            let using_bases = inner.bases.use_guard().await;
            let (base, size) = match &origin {
                Origin::Boot {
                    base_name,
                    base_key,
                    rootfs,
                    min_mb,
                } => {
                    let base = inner
                        .bases
                        .ensure(
                            inner.disks.as_ref(),
                            base_name,
                            base_key,
                            rootfs,
                            disk_mb,
                            *min_mb,
                        )
                        .await
                        .map_err(|e| AgentError::host("preparing the base image", id, e))?;
                    (base, None)
                }
                Origin::Clone { template, .. } => {
                    let larger =
                        (disk_mb > u64::from(template.record.disk_size_mb)).then_some(disk_mb);
                    (template.rootfs(), larger)
                }
            };
            inner
                .disks
                .create_overlay(&base, &overlay, size)
                .await
                .map_err(|e| AgentError::host("creating the root disk", id, e))?;
            st.disk_backing = Some(base.clone());
            drop(using_bases);
            let init = Init {
                present: match &origin {
                    Origin::Boot { .. } => None,
                    Origin::Clone { template, .. } => template.record.access_token.clone(),
                },
                token: p.access_token.clone(),
                env: Some(p.env.clone()),
                hostname: Some(hostname(id)),
                defaults: Defaults::of(p),
            };
            let snapshot = match &origin {
                Origin::Boot { .. } => None,
                Origin::Clone { template, memory } => Some((template.dir.clone(), *memory)),
            };
            self.bring_up(&mut st, &dir, snapshot, init, started).await
        }
        .await;
        match result {
            Ok((live, guest, version)) => {
                st.phase = Phase::Running;
                st.boot_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
                st.started_at = Utc::now();
                st.guest_version = version.clone();
                if let Err(e) = state::write(&dir, &st) {
                    self.release(&mut st, Some(live), &dir, true).await;
                    return Err(e);
                }
                Ok((st, live, guest, version))
            }
            Err(e) => {
                self.release(&mut st, None, &dir, true).await;
                Err(e)
            }
        }
    }

    /// Network, VMM (boot or restore), guest agent answering and initialised. On failure
    /// everything this call took is released (not the directories).
    pub(super) async fn bring_up(
        &self,
        st: &mut StateFile,
        dir: &Path,
        snapshot: Option<(PathBuf, RestoreMemory)>,
        init: Init,
        started: Instant,
    ) -> Result<(Live, EnvdClient, String), AgentError> {
        let inner = self.inner();
        let id = st.sandbox_id;
        let phase = Instant::now();
        let slot = inner
            .slots
            .allocate(&id.to_string())
            .map_err(|e| AgentError::host("allocating a network slot", id, e))?;
        st.slot = Some(slot);
        let net = match async {
            state::write(dir, st)?;
            NetHandle::setup(inner.network.clone(), slot)
                .await
                .map_err(|e| AgentError::host("setting up the network", id, e))
        }
        .await
        {
            Ok(net) => net,
            Err(e) => {
                let _ = inner.slots.release(slot);
                st.slot = None;
                return Err(e);
            }
        };
        // The tenant's egress rules hold before the guest runs.
        let egress = match self.start_egress(id, &net, &st.egress).await {
            Ok(guard) => guard,
            Err(e) => {
                self.drop_network(st, Some(net)).await;
                return Err(e);
            }
        };
        let net_ms = phase.elapsed().as_millis();
        let spec = VmSpec {
            id: id.to_string(),
            vcpus: st.vcpus,
            memory_mb: st.memory_mb,
            kernel: st.kernel.clone(),
            initrd: Some(st.initrd.clone()),
            cmdline_extra: Vec::new(),
            root_disk: Disk {
                path: dir.join("rootfs.qcow2"),
                format: DiskFormat::Qcow2,
                backing: self.disk_backing(st, &dir.join("rootfs.qcow2")),
            },
            network: NetworkSpec::Tap {
                netns: net.netns(),
                ifname: net::TAP_NAME.to_string(),
                mac: guest_mac(id),
            },
            guest: GuestConfig {
                hostname: Some(hostname(id)),
                ip: Some(format!("{}/{}", net::GUEST_IP, net::GUEST_PREFIX)),
                gateway: Some(net::GUEST_GATEWAY),
                dns: inner.dns.clone(),
                access_token_sha256: Some(hex::encode(Sha256::digest(init.token.as_bytes()))),
            },
            run_dir: dir.to_path_buf(),
            memory_dir: st.mem_dir.clone(),
            // Slots are unique machine-wide, so are the VMM users made from them.
            uid: Some(nestbox_vmm::qemu::jail::uid_for_slot(slot)),
        };
        let console = dir.join("console.log");
        let started_vm = match &snapshot {
            None => inner.vmm.boot(spec).await,
            Some((snap, memory)) => inner.vmm.restore(spec, snap, *memory).await.map(|r| r.vm),
        };
        let mut vm = match started_vm {
            Ok(vm) => vm,
            Err(e) => {
                drop(egress);
                self.drop_network(st, Some(net)).await;
                return Err(AgentError::Boot {
                    id,
                    reason: format!("{e}; console: {}", console_tail(&console, 8)),
                });
            }
        };
        st.vmm_pid = Some(vm.pid());
        st.vmm_name = Some(vm.id().to_string());
        let vmm_ms = phase.elapsed().as_millis();
        let restored = snapshot.is_some();
        // A restored guest keeps the version it had (resume); a clone learns it after /init.
        let known_version = (!st.guest_version.is_empty()).then(|| st.guest_version.clone());
        let deadline = started + inner.cfg.boot_timeout;
        let up = async {
            state::write(dir, st)?;
            let guest = self.guest_client(id, &net, &init.token)?;
            // A booting guest is probed until it serves. A restored one already serves, but
            // under TCG its first answers are slow (every code path is translated again),
            // so it gets /init at once rather than a probe first.
            let probed = if restored {
                None
            } else {
                Some(wait_for_guest(&guest, vm.as_mut(), id, deadline, &console).await?)
            };
            let guest_ms = phase.elapsed().as_millis();
            send_init(&guest, init, vm.as_mut(), id, deadline, &console).await?;
            let version = match probed.or(known_version) {
                Some(v) => v,
                None => guest
                    .with_timeout(Duration::from_secs(10))
                    .health()
                    .await
                    .map_err(|e| AgentError::Guest { id, source: e })?,
            };
            tracing::debug!(
                sandbox = %id,
                restored,
                net_ms,
                vmm_ms,
                guest_ms,
                init_ms = phase.elapsed().as_millis(),
                "sandbox up (milliseconds since bring-up started)"
            );
            Ok::<_, AgentError>((guest, version))
        }
        .await;
        match up {
            Ok((guest, version)) => Ok((Live { vm, net, egress }, guest, version)),
            Err(e) => {
                if let Err(stop) = vm.stop(Duration::from_secs(5)).await {
                    tracing::warn!(sandbox = %id, error = %stop, "stopping a VM that did not come up");
                }
                st.vmm_pid = None;
                drop(egress);
                self.drop_network(st, Some(net)).await;
                Err(e)
            }
        }
    }

    /// A client of the guest agent behind `net`, presenting `token`.
    /// The image `st`'s overlay at `disk` was made over: as recorded at its creation, or
    /// (a sandbox made before that was recorded) the one its header names if that is one
    /// of this host's base or template images.
    pub(super) fn disk_backing(&self, st: &StateFile, disk: &Path) -> Option<PathBuf> {
        if st.disk_backing.is_some() {
            return st.disk_backing.clone();
        }
        let named = disk::backing_file(disk).ok().flatten()?;
        let data = &self.inner().cfg.data_dir;
        let ours = [
            data.join("bases"),
            data.join("templates"),
            self.inner().cfg.warm_dir.clone(),
        ]
        .iter()
        .any(|root| {
            named.parent().and_then(Path::parent) == Some(root.as_path())
                || named.parent() == Some(root.as_path())
        });
        ours.then_some(named)
    }

    pub(super) fn guest_client(
        &self,
        id: SandboxId,
        net: &NetHandle,
        token: &str,
    ) -> Result<EnvdClient, AgentError> {
        let url = format!("http://{}", net.guest_agent());
        EnvdClient::with_http_client(self.inner().http.clone(), url, Some(token.to_string()))
            .map_err(|e| AgentError::Guest { id, source: e })
    }

    /// Tears down a sandbox's network and frees its slot (see [`Self::remove_network`]);
    /// a failure is logged.
    pub(super) async fn drop_network(&self, st: &mut StateFile, net: Option<NetHandle>) {
        if let Err(e) = self.remove_network(st, net).await {
            tracing::warn!(sandbox = %st.sandbox_id, error = %e.public_message(), "removing the network");
        }
    }

    /// Tears down the network of `st`'s slot (through `net` if the caller holds it) and
    /// frees the slot. A teardown that fails is tried once more; a network that still
    /// cannot be removed keeps its slot taken, so nothing is set up over it and start-up
    /// recovery removes it, and the slot stays in `st` (recorded by the caller).
    pub(super) async fn remove_network(
        &self,
        st: &mut StateFile,
        net: Option<NetHandle>,
    ) -> Result<(), AgentError> {
        let id = st.sandbox_id;
        let Some(slot) = st.slot else {
            return Ok(());
        };
        let net = net.unwrap_or_else(|| NetHandle::new(self.inner().network.clone(), slot));
        if let Err(first) = net.teardown().await {
            tracing::warn!(sandbox = %id, slot, error = %first, "removing the network; trying again");
            net.teardown()
                .await
                .map_err(|e| AgentError::host("removing the network", id, e))?;
        }
        st.slot = None;
        self.inner()
            .slots
            .release(slot)
            .map_err(|e| AgentError::host("releasing the network slot", id, e))
    }

    /// Releases everything of a sandbox: VM, network, slot and, with `files`, its
    /// directories (disk, snapshots, tmpfs). Returns the first error.
    pub(super) async fn release(
        &self,
        st: &mut StateFile,
        live: Option<Live>,
        dir: &Path,
        files: bool,
    ) -> Option<AgentError> {
        let id = st.sandbox_id;
        let mut first: Option<AgentError> = None;
        let mut note = |e: AgentError| {
            tracing::warn!(sandbox = %id, error = %e.public_message(), "releasing sandbox resources");
            first.get_or_insert(e);
        };
        let net = match live {
            Some(mut live) => {
                if let Err(e) = live.vm.stop(Duration::from_secs(5)).await {
                    note(AgentError::host("stopping the VMM", id, e));
                }
                Some(live.net)
            }
            None => None,
        };
        st.vmm_pid = None;
        if let Err(e) = self.remove_network(st, net).await {
            note(e);
        }
        if files {
            if let Err(e) = remove_dir_if_exists(&st.mem_dir).await {
                note(AgentError::host("removing guest memory", id, e));
            }
            if let Err(e) = remove_dir_if_exists(dir).await {
                note(AgentError::host("removing the sandbox directory", id, e));
            }
            if let Some(alias) = st.dir_alias.take()
                && let Err(e) = tokio::fs::remove_file(&alias).await
                && e.kind() != std::io::ErrorKind::NotFound
            {
                note(AgentError::host("removing the directory's old name", id, e));
            }
        }
        first
    }
}

/// Initialises the guest agent that `guest` (holding the new token) talks to, as `init`
/// says; its clock is set to the host's.
pub(super) async fn send_init(
    guest: &EnvdClient,
    init: Init,
    vm: &mut dyn Vm,
    id: SandboxId,
    deadline: Instant,
    console: &Path,
) -> Result<(), AgentError> {
    let request = InitRequest {
        access_token: Some(init.token.clone()),
        env_vars: init.env.map(|e| e.into_iter().collect()),
        default_user: init
            .defaults
            .as_ref()
            .map(|d| d.user.clone().unwrap_or_else(|| "root".into())),
        default_workdir: init
            .defaults
            .as_ref()
            .map(|d| d.workdir.clone().unwrap_or_default()),
        timestamp: Some(Utc::now()),
        hostname: init.hostname,
        // A clone (or a resumed sandbox) shares its generator state with its snapshot.
        entropy: Some(crate::random_token()?),
    };
    let presenting = match &init.present {
        Some(t) => guest
            .with_access_token(Some(t.clone()))
            .map_err(|e| AgentError::Guest { id, source: e })?,
        None => guest.clone(),
    };
    init_guest(&presenting, guest, &request, vm, id, deadline, console).await
}

/// Sends `/init` presenting the guest's current token (`presenting`). A connection that
/// fails before an answer is retried until the VMM exits or the deadline passes; if the
/// request had in fact been applied, the guest now wants the new token, so after such a
/// failure a refusal is retried with `fresh` (which carries it).
async fn init_guest(
    presenting: &EnvdClient,
    fresh: &EnvdClient,
    request: &InitRequest,
    vm: &mut dyn Vm,
    id: SandboxId,
    deadline: Instant,
    console: &Path,
) -> Result<(), AgentError> {
    let mut client = presenting.with_timeout(Duration::from_secs(10));
    let mut broke = false;
    loop {
        let err = match client.init(request).await {
            Ok(()) => return Ok(()),
            Err(e) => e,
        };
        let transport = matches!(err, nestbox_envd::client::EnvdError::Transport { .. });
        if broke && err.is_unauthenticated() {
            client = fresh.with_timeout(Duration::from_secs(10));
            broke = false;
            continue;
        }
        if !transport {
            return Err(AgentError::Guest { id, source: err });
        }
        broke = true;
        if let Some(e) = give_up(vm, id, deadline, console, &err) {
            return Err(e);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The error to stop waiting for a guest agent with: its VMM exited, or `deadline` passed
/// (`last` is why the last attempt failed). `None`: try again.
fn give_up(
    vm: &mut dyn Vm,
    id: SandboxId,
    deadline: Instant,
    console: &Path,
    last: &dyn std::fmt::Display,
) -> Option<AgentError> {
    let reason = if vm.exited().is_some() {
        "the VMM exited".to_string()
    } else if Instant::now() >= deadline {
        format!("guest agent not answering ({last})")
    } else {
        return None;
    };
    Some(AgentError::Boot {
        id,
        reason: format!("{reason}; console: {}", console_tail(console, 12)),
    })
}

/// Polls the guest agent's health until it answers, the VMM exits or the deadline passes.
async fn wait_for_guest(
    guest: &EnvdClient,
    vm: &mut dyn Vm,
    id: SandboxId,
    deadline: Instant,
    console: &Path,
) -> Result<String, AgentError> {
    let probe = guest.with_timeout(Duration::from_secs(2));
    loop {
        match probe.health().await {
            Ok(v) => return Ok(v),
            Err(e) => {
                if let Some(e) = give_up(vm, id, deadline, console, &e) {
                    return Err(e);
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_is_valid_and_local() {
        let mac = guest_mac(SandboxId::new());
        let parts: Vec<&str> = mac.split(':').collect();
        assert_eq!(parts.len(), 6);
        assert!(
            parts
                .iter()
                .all(|p| p.len() == 2 && u8::from_str_radix(p, 16).is_ok()),
            "{mac}"
        );
        assert_eq!(parts[0], "02");
    }
}
