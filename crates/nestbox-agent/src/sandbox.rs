//! The sandbox manager: every sandbox on this host, each owned by one task.
//!
//! ```text
//!   create ──▶ Starting ──(guest agent answers)──▶ Running ──destroy──▶ Stopping ──▶ (gone)
//!                 │ failure: everything taken is released, the error is returned
//!                 ▼
//!              (gone)
//! ```
//!
//! Ownership: the [`Manager`] holds a map from id to [`SandboxHandle`]. The handle carries
//! what request handlers may use concurrently (the guest agent client, immutable facts) and
//! a channel to the sandbox's task. Only the task touches the VM, the network and the
//! disk; lifecycle requests are messages with a reply channel, and a full channel is a
//! typed "busy" error, never a hang.
//!
//! Invariants:
//! - a sandbox is in the map from the moment its id is reserved (Starting) until its task
//!   has released everything; a second create with the same id fails;
//! - a failed create releases, in reverse order, everything it took (slot, namespace,
//!   disk files, VMM process) before it returns;
//! - every resource a sandbox holds is recorded in its directory's `state.json` before it
//!   is taken, so [`crate::cleanup`] can remove it after a crash.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use nestbox_envd::client::EnvdClient;
use nestbox_envd::types::InitRequest;
use nestbox_hostsys::disk::{self, BaseImages};
use nestbox_hostsys::net::{self, SandboxNet, SlotAllocator};
use nestbox_image::ImageStore;
use nestbox_types::limits::GUEST_AGENT_PORT;
use nestbox_types::{SandboxId, TeamId};
use nestbox_vmm::{Disk, DiskFormat, GuestConfig, NetworkSpec, Vm, VmSpec, Vmm};
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, oneshot};

use crate::config::AgentConfig;
use crate::error::AgentError;

/// Format version of `state.json`.
pub const STATE_FORMAT: u32 = 1;

/// Lifecycle state as the agent sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Booting.
    Starting,
    /// The guest agent answers.
    Running,
    /// Being destroyed.
    Stopping,
}

impl State {
    /// Name for errors and logs.
    pub fn as_str(&self) -> &'static str {
        match self {
            State::Starting => "starting",
            State::Running => "running",
            State::Stopping => "stopping",
        }
    }
}

/// What the control plane asked for.
#[derive(Debug, Clone)]
pub struct CreateParams {
    /// Id chosen by the control plane.
    pub id: SandboxId,
    /// Owning team.
    pub team: TeamId,
    /// Template name.
    pub template: String,
    /// vCPUs.
    pub vcpus: u32,
    /// Memory, MiB.
    pub memory_mb: u32,
    /// Disk, MiB (0 = the agent's default).
    pub disk_size_mb: u32,
    /// Inactivity timeout, seconds.
    pub timeout_sec: u32,
    /// Environment for every process.
    pub env: HashMap<String, String>,
    /// Token the guest agent will require.
    pub access_token: String,
}

/// Facts about a sandbox that never change after it starts.
#[derive(Debug, Clone)]
pub struct SandboxFacts {
    /// Id.
    pub id: SandboxId,
    /// Team.
    pub team: TeamId,
    /// Template name.
    pub template: String,
    /// vCPUs.
    pub vcpus: u32,
    /// Memory, MiB.
    pub memory_mb: u32,
    /// Disk, MiB.
    pub disk_size_mb: u32,
    /// When it became ready.
    pub started_at: DateTime<Utc>,
    /// Create request to guest ready.
    pub boot: Duration,
    /// Guest agent version.
    pub guest_version: String,
    /// Kernel release.
    pub kernel_version: String,
}

/// Persisted record of what a sandbox holds, for crash cleanup.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct StateFile {
    /// [`STATE_FORMAT`].
    pub format_version: u32,
    /// The sandbox.
    pub sandbox_id: SandboxId,
    /// Its network slot, once taken.
    pub slot: Option<u32>,
    /// Its VMM process, once started.
    pub vmm_pid: Option<u32>,
    /// Directory of its guest RAM file.
    pub mem_dir: Option<PathBuf>,
}

enum Command {
    Destroy {
        reply: oneshot::Sender<Result<(), AgentError>>,
    },
}

/// A sandbox as request handlers see it.
#[derive(Debug)]
pub struct SandboxHandle {
    /// Immutable facts (set once running).
    pub facts: SandboxFacts,
    /// Client of its guest agent.
    pub guest: EnvdClient,
    state: Mutex<State>,
    commands: mpsc::Sender<Command>,
}

impl SandboxHandle {
    /// Current state.
    pub fn state(&self) -> State {
        self.state.lock().map(|s| *s).unwrap_or(State::Stopping)
    }

    fn set_state(&self, s: State) {
        if let Ok(mut g) = self.state.lock() {
            *g = s;
        }
    }
}

enum Slot {
    /// Create in progress.
    Reserved,
    /// Running (or stopping).
    Ready(Arc<SandboxHandle>),
}

/// Everything shared by the manager's operations.
pub(crate) struct Inner {
    pub(crate) cfg: Arc<AgentConfig>,
    pub(crate) tag: String,
    pub(crate) vmm: Arc<dyn Vmm>,
    pub(crate) images: ImageStore,
    pub(crate) bases: BaseImages,
    pub(crate) slots: SlotAllocator,
    pub(crate) http: reqwest::Client,
    pub(crate) dns: Vec<std::net::Ipv4Addr>,
    sandboxes: Mutex<HashMap<SandboxId, Slot>>,
}

/// All sandboxes of this host.
#[derive(Clone)]
pub struct Manager {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Manager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Manager")
            .field("tag", &self.inner.tag)
            .finish()
    }
}

/// Directory of a sandbox's files.
pub fn sandbox_dir(data_dir: &Path, id: SandboxId) -> PathBuf {
    data_dir.join("sandboxes").join(id.to_string())
}

/// Directory of a sandbox's guest RAM (on tmpfs).
pub fn mem_dir(tag: &str, id: SandboxId) -> PathBuf {
    PathBuf::from("/dev/shm")
        .join(format!("nestbox-{tag}"))
        .join(id.to_string())
}

fn write_state(dir: &Path, state: &StateFile) -> Result<(), AgentError> {
    let bytes =
        serde_json::to_vec_pretty(state).map_err(|e| AgentError::Internal(e.to_string()))?;
    let tmp = dir.join("state.json.tmp");
    std::fs::write(&tmp, bytes)
        .and_then(|()| std::fs::rename(&tmp, dir.join("state.json")))
        .map_err(|e| AgentError::host("recording sandbox state", state.sandbox_id, e))
}

/// The last lines of a console log, for boot failure messages.
fn console_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    let all: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    all[all.len().saturating_sub(lines)..].join(" | ")
}

/// What a create has taken so far, released in reverse on failure.
struct Taken {
    id: SandboxId,
    dir: Option<PathBuf>,
    mem_dir: Option<PathBuf>,
    slot: Option<u32>,
    net: Option<SandboxNet>,
    vm: Option<Box<dyn Vm>>,
}

impl Taken {
    async fn release(mut self, inner: &Inner) -> Result<(), AgentError> {
        let id = self.id;
        let mut first: Option<AgentError> = None;
        let mut note = |e: AgentError| {
            tracing::warn!(sandbox = %id, error = %e.public_message(), "releasing sandbox resources");
            first.get_or_insert(e);
        };
        if let Some(mut vm) = self.vm.take()
            && let Err(e) = vm.stop(Duration::from_secs(5)).await
        {
            note(AgentError::host("stopping the VMM", id, e));
        }
        if let Some(net) = self.net.take()
            && let Err(e) = net.teardown().await
        {
            note(AgentError::host("removing the network", id, e));
        }
        if let Some(slot) = self.slot.take()
            && let Err(e) = inner.slots.release(slot)
        {
            note(AgentError::host("releasing the network slot", id, e));
        }
        if let Some(dir) = self.mem_dir.take()
            && let Err(e) = remove_dir_if_exists(&dir).await
        {
            note(AgentError::host("removing guest memory", id, e));
        }
        if let Some(dir) = self.dir.take()
            && let Err(e) = remove_dir_if_exists(&dir).await
        {
            note(AgentError::host("removing the sandbox directory", id, e));
        }
        match first {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

async fn remove_dir_if_exists(dir: &Path) -> std::io::Result<()> {
    match tokio::fs::remove_dir_all(dir).await {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

impl Manager {
    pub(crate) fn new(inner_parts: InnerParts) -> Self {
        let InnerParts {
            cfg,
            tag,
            vmm,
            images,
            bases,
            slots,
            http,
            dns,
        } = inner_parts;
        Self {
            inner: Arc::new(Inner {
                cfg,
                tag,
                vmm,
                images,
                bases,
                slots,
                http,
                dns,
                sandboxes: Mutex::new(HashMap::new()),
            }),
        }
    }

    pub(crate) fn inner(&self) -> &Inner {
        &self.inner
    }

    /// A running sandbox.
    pub fn get(&self, id: SandboxId) -> Result<Arc<SandboxHandle>, AgentError> {
        let map = self
            .inner
            .sandboxes
            .lock()
            .map_err(|_| AgentError::Internal("sandbox map poisoned".into()))?;
        match map.get(&id) {
            Some(Slot::Ready(h)) => Ok(h.clone()),
            Some(Slot::Reserved) => Err(AgentError::WrongState {
                id,
                state: "starting",
            }),
            None => Err(AgentError::SandboxNotFound(id)),
        }
    }

    /// A sandbox that is running (not starting or stopping).
    pub fn running(&self, id: SandboxId) -> Result<Arc<SandboxHandle>, AgentError> {
        let h = self.get(id)?;
        match h.state() {
            State::Running => Ok(h),
            s => Err(AgentError::WrongState {
                id,
                state: s.as_str(),
            }),
        }
    }

    /// Every sandbox past its start.
    pub fn list(&self) -> Vec<Arc<SandboxHandle>> {
        self.inner
            .sandboxes
            .lock()
            .map(|m| {
                m.values()
                    .filter_map(|s| match s {
                        Slot::Ready(h) => Some(h.clone()),
                        Slot::Reserved => None,
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Number of sandboxes, starting ones included.
    pub fn count(&self) -> usize {
        self.inner.sandboxes.lock().map(|m| m.len()).unwrap_or(0)
    }

    /// Template names this host can boot.
    pub fn templates(&self) -> Vec<String> {
        let dir = self.inner.images.root().join("templates");
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .map(|rd| {
                rd.flatten()
                    .filter(|e| e.path().join("template.json").exists())
                    .filter_map(|e| e.file_name().to_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
    }

    /// The VMM driver, as a description (`qemu 7.2.22 (tcg)`).
    pub fn vmm_info(&self) -> String {
        self.inner.vmm.info().to_string()
    }

    /// The VMM driver itself (benchmarks boot bare VMs with it).
    pub fn vmm(&self) -> Arc<dyn Vmm> {
        self.inner.vmm.clone()
    }

    /// The base image of `template` at the default disk size, prepared if needed.
    pub async fn base_image(
        &self,
        name: &str,
        template: &nestbox_image::TemplateImage,
    ) -> Result<PathBuf, AgentError> {
        let key = &template.manifest.inputs_hash[..16.min(template.manifest.inputs_hash.len())];
        let min_mb = min_disk_mb(template.manifest.fs_min_bytes);
        let size = self.inner.cfg.default_disk_mb.max(min_mb);
        self.inner
            .bases
            .ensure(name, key, &template.rootfs, size, min_mb)
            .await
            .map_err(|e| AgentError::Internal(format!("preparing template {name}: {e}")))
    }

    /// Details of the templates this host can boot, for the control plane's catalogue.
    pub fn template_infos(&self) -> Vec<nestbox_proto::hostagent::TemplateInfo> {
        self.templates()
            .into_iter()
            .filter_map(|name| {
                let image = self.inner.images.template(&name).ok()?;
                Some(nestbox_proto::hostagent::TemplateInfo {
                    min_disk_mb: u32::try_from(min_disk_mb(image.manifest.fs_min_bytes))
                        .unwrap_or(u32::MAX),
                    size_bytes: image.manifest.size_bytes,
                    kind: "image".into(),
                    name,
                })
            })
            .collect()
    }

    /// Prepares base images at the default disk size for every template (the seed's
    /// EnsureImageSizes) and removes bases of old builds.
    pub async fn prepare_images(&self) -> Result<(), AgentError> {
        for name in self.templates() {
            let image = self
                .inner
                .images
                .template(&name)
                .map_err(|e| AgentError::Internal(format!("template {name}: {e}")))?;
            let key = &image.manifest.inputs_hash[..16.min(image.manifest.inputs_hash.len())];
            let min_mb = min_disk_mb(image.manifest.fs_min_bytes);
            let size = self.inner.cfg.default_disk_mb.max(min_mb);
            let started = Instant::now();
            self.inner
                .bases
                .ensure(&name, key, &image.rootfs, size, min_mb)
                .await
                .map_err(|e| AgentError::Internal(format!("preparing template {name}: {e}")))?;
            let pruned = self.inner.bases.prune(&name, key).await.unwrap_or(0);
            tracing::info!(template = %name, size_mb = size, pruned, elapsed_ms = started.elapsed().as_millis() as u64, "base image ready");
        }
        Ok(())
    }

    fn reserve(&self, id: SandboxId) -> Result<(), AgentError> {
        let mut map = self
            .inner
            .sandboxes
            .lock()
            .map_err(|_| AgentError::Internal("sandbox map poisoned".into()))?;
        if map.contains_key(&id) {
            return Err(AgentError::SandboxExists(id));
        }
        if map.len() >= self.inner.cfg.max_sandboxes as usize {
            return Err(AgentError::NoCapacity(format!(
                "{} of {} sandboxes in use",
                map.len(),
                self.inner.cfg.max_sandboxes
            )));
        }
        map.insert(id, Slot::Reserved);
        Ok(())
    }

    fn unreserve(&self, id: SandboxId) {
        if let Ok(mut map) = self.inner.sandboxes.lock() {
            map.remove(&id);
        }
    }

    /// Boots a sandbox; returns once its guest agent answers. On failure everything taken
    /// is released first.
    pub async fn create(&self, params: CreateParams) -> Result<Arc<SandboxHandle>, AgentError> {
        let id = params.id;
        if params.access_token.len() < 16 {
            return Err(AgentError::Invalid(
                "access_token must be at least 16 characters".into(),
            ));
        }
        if params.vcpus == 0 || params.memory_mb < 128 {
            return Err(AgentError::Invalid(
                "a sandbox needs at least 1 vCPU and 128 MiB".into(),
            ));
        }
        self.reserve(id)?;
        let mut taken = Taken {
            id,
            dir: None,
            mem_dir: None,
            slot: None,
            net: None,
            vm: None,
        };
        let started = Instant::now();
        match self.boot(&params, &mut taken, started).await {
            Ok((facts, guest, vm, net, slot)) => {
                let (tx, rx) = mpsc::channel(8);
                let handle = Arc::new(SandboxHandle {
                    facts,
                    guest,
                    state: Mutex::new(State::Running),
                    commands: tx,
                });
                let task = SandboxTask {
                    manager: self.clone(),
                    handle: handle.clone(),
                    taken: Taken {
                        id,
                        dir: taken.dir.take(),
                        mem_dir: taken.mem_dir.take(),
                        slot: Some(slot),
                        net: Some(net),
                        vm: Some(vm),
                    },
                };
                tokio::spawn(task.run(rx));
                if let Ok(mut map) = self.inner.sandboxes.lock() {
                    map.insert(id, Slot::Ready(handle.clone()));
                }
                tracing::info!(sandbox = %id, boot_ms = started.elapsed().as_millis() as u64, "sandbox running");
                Ok(handle)
            }
            Err(e) => {
                tracing::warn!(sandbox = %id, error = %e.public_message(), "create failed; releasing");
                if let Err(cleanup) = taken.release(&self.inner).await {
                    tracing::error!(sandbox = %id, error = %cleanup.public_message(), "release after failed create");
                }
                self.unreserve(id);
                Err(e)
            }
        }
    }

    async fn boot(
        &self,
        p: &CreateParams,
        taken: &mut Taken,
        started: Instant,
    ) -> Result<(SandboxFacts, EnvdClient, Box<dyn Vm>, SandboxNet, u32), AgentError> {
        let inner = &self.inner;
        let id = p.id;
        let (template, kernel) = inner
            .images
            .template_with_kernel(&p.template)
            .map_err(|_| AgentError::TemplateNotFound(p.template.clone()))?;
        let min_mb = min_disk_mb(template.manifest.fs_min_bytes);
        let disk_mb = if p.disk_size_mb == 0 {
            inner.cfg.default_disk_mb
        } else {
            u64::from(p.disk_size_mb)
        };
        if disk_mb < min_mb {
            return Err(AgentError::Invalid(format!(
                "disk_size_mb {disk_mb} is too small for template `{}` (needs at least {min_mb})",
                p.template
            )));
        }

        // Directory and state record first: from here on a crash is cleaned up.
        let dir = sandbox_dir(&inner.cfg.data_dir, id);
        tokio::fs::create_dir_all(&dir)
            .await
            .map_err(|e| AgentError::host("creating the sandbox directory", id, e))?;
        taken.dir = Some(dir.clone());
        let mem = mem_dir(&inner.tag, id);
        let mut state = StateFile {
            format_version: STATE_FORMAT,
            sandbox_id: id,
            slot: None,
            vmm_pid: None,
            mem_dir: Some(mem.clone()),
        };
        write_state(&dir, &state)?;
        tokio::fs::create_dir_all(&mem)
            .await
            .map_err(|e| AgentError::host("creating the guest memory directory", id, e))?;
        taken.mem_dir = Some(mem.clone());

        // Disk: the template's base at this size, then a copy-on-write overlay.
        let key = &template.manifest.inputs_hash[..16.min(template.manifest.inputs_hash.len())];
        let base = inner
            .bases
            .ensure(&p.template, key, &template.rootfs, disk_mb, min_mb)
            .await
            .map_err(|e| AgentError::host("preparing the base image", id, e))?;
        let overlay = dir.join("rootfs.qcow2");
        disk::create_overlay(&base, &overlay)
            .await
            .map_err(|e| AgentError::host("creating the root disk", id, e))?;

        // Network.
        let slot = inner
            .slots
            .allocate(&id.to_string())
            .map_err(|e| AgentError::host("allocating a network slot", id, e))?;
        taken.slot = Some(slot);
        state.slot = Some(slot);
        write_state(&dir, &state)?;
        let net = SandboxNet::setup(slot)
            .await
            .map_err(|e| AgentError::host("setting up the network", id, e))?;
        taken.net = Some(net.clone());

        // VM.
        let token_hash = hex::encode(Sha256::digest(p.access_token.as_bytes()));
        let spec = VmSpec {
            id: id.to_string(),
            vcpus: p.vcpus,
            memory_mb: p.memory_mb,
            kernel: kernel.kernel.clone(),
            initrd: Some(kernel.initramfs.clone()),
            cmdline_extra: Vec::new(),
            root_disk: Disk {
                path: overlay.clone(),
                format: DiskFormat::Qcow2,
            },
            network: NetworkSpec::Tap {
                netns: net.addrs.netns_path(),
                ifname: net::TAP_NAME.to_string(),
                mac: guest_mac(id),
            },
            guest: GuestConfig {
                hostname: Some(hostname(id)),
                ip: Some(format!("{}/{}", net::GUEST_IP, net::GUEST_PREFIX)),
                gateway: Some(net::GUEST_GATEWAY),
                dns: inner.dns.clone(),
                access_token_sha256: Some(token_hash),
            },
            run_dir: dir.clone(),
            memory_dir: mem.clone(),
        };
        let vm = inner.vmm.boot(spec).await.map_err(|e| AgentError::Boot {
            id,
            reason: format!(
                "{e}; console: {}",
                console_tail(&dir.join("console.log"), 8)
            ),
        })?;
        state.vmm_pid = Some(vm.pid());
        let console = vm.console_log().to_path_buf();
        taken.vm = Some(vm);
        write_state(&dir, &state)?;

        // Guest agent.
        let url = format!("http://{}:{GUEST_AGENT_PORT}", net.addrs.sandbox_ip);
        let guest =
            EnvdClient::with_http_client(inner.http.clone(), url, Some(p.access_token.clone()))
                .map_err(|e| AgentError::Guest { id, source: e })?;
        let probe = guest.with_timeout(Duration::from_secs(2));
        let deadline = started + inner.cfg.boot_timeout;
        let guest_version = loop {
            match probe.health().await {
                Ok(v) => break v,
                Err(e) => {
                    if let Some(vm) = taken.vm.as_mut()
                        && vm.exited().is_some()
                    {
                        return Err(AgentError::Boot {
                            id,
                            reason: format!(
                                "the VMM exited; console: {}",
                                console_tail(&console, 12)
                            ),
                        });
                    }
                    if Instant::now() >= deadline {
                        return Err(AgentError::Boot {
                            id,
                            reason: format!(
                                "guest agent not answering after {:?} ({e}); console: {}",
                                inner.cfg.boot_timeout,
                                console_tail(&console, 12)
                            ),
                        });
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        };
        let init = InitRequest {
            access_token: Some(p.access_token.clone()),
            env_vars: Some(p.env.clone().into_iter().collect()),
            default_user: Some("root".into()),
            default_workdir: None,
            timestamp: Some(Utc::now()),
            hostname: Some(hostname(id)),
        };
        guest
            .with_timeout(Duration::from_secs(10))
            .init(&init)
            .await
            .map_err(|e| AgentError::Guest { id, source: e })?;

        let facts = SandboxFacts {
            id,
            team: p.team,
            template: p.template.clone(),
            vcpus: p.vcpus,
            memory_mb: p.memory_mb,
            disk_size_mb: u32::try_from(disk_mb).unwrap_or(u32::MAX),
            started_at: Utc::now(),
            boot: started.elapsed(),
            guest_version,
            kernel_version: kernel.manifest.kernel_version.clone(),
        };
        let vm = taken
            .vm
            .take()
            .ok_or_else(|| AgentError::Internal("VM vanished during create".into()))?;
        let net = taken
            .net
            .take()
            .ok_or_else(|| AgentError::Internal("network vanished during create".into()))?;
        taken.slot = None;
        Ok((facts, guest, vm, net, slot))
    }

    /// Destroys a sandbox: stops its VM and releases everything. Errors of the teardown are
    /// returned (after every step was attempted), never swallowed.
    pub async fn destroy(&self, id: SandboxId) -> Result<(), AgentError> {
        let handle = self.get(id)?;
        let (tx, rx) = oneshot::channel();
        handle
            .commands
            .try_send(Command::Destroy { reply: tx })
            .map_err(|e| match e {
                mpsc::error::TrySendError::Full(_) => AgentError::Busy(id),
                mpsc::error::TrySendError::Closed(_) => AgentError::SandboxNotFound(id),
            })?;
        rx.await.map_err(|_| {
            AgentError::Internal(format!("sandbox {id}'s task ended without answering"))
        })?
    }

    /// Destroys every sandbox (agent shutdown).
    pub async fn destroy_all(&self) {
        let ids: Vec<SandboxId> = self.list().iter().map(|h| h.facts.id).collect();
        for id in ids {
            if let Err(e) = self.destroy(id).await {
                tracing::error!(sandbox = %id, error = %e.public_message(), "destroy at shutdown");
            }
        }
    }
}

/// Parts to build a [`Manager`] from.
pub(crate) struct InnerParts {
    pub cfg: Arc<AgentConfig>,
    pub tag: String,
    pub vmm: Arc<dyn Vmm>,
    pub images: ImageStore,
    pub bases: BaseImages,
    pub slots: SlotAllocator,
    pub http: reqwest::Client,
    pub dns: Vec<std::net::Ipv4Addr>,
}

/// Smallest disk a template's filesystem fits in, with room to boot and work (MiB).
fn min_disk_mb(fs_min_bytes: u64) -> u64 {
    (fs_min_bytes.div_ceil(1 << 20) + 256).div_ceil(256) * 256
}

fn hostname(id: SandboxId) -> String {
    format!("sb-{}", id.short())
}

/// A stable, locally administered MAC per sandbox.
fn guest_mac(id: SandboxId) -> String {
    let b = id.uuid().into_bytes();
    format!("02:nb:{:02x}:{:02x}:{:02x}:{:02x}", b[0], b[1], b[2], b[3]).replace("nb", "4e")
}

/// The task that owns one running sandbox.
struct SandboxTask {
    manager: Manager,
    handle: Arc<SandboxHandle>,
    taken: Taken,
}

impl SandboxTask {
    async fn run(mut self, mut rx: mpsc::Receiver<Command>) {
        let id = self.handle.facts.id;
        let mut watch = tokio::time::interval(Duration::from_millis(500));
        loop {
            tokio::select! {
                cmd = rx.recv() => match cmd {
                    Some(Command::Destroy { reply }) => {
                        self.handle.set_state(State::Stopping);
                        let result = self.taken.release(&self.manager.inner).await;
                        self.manager.unreserve(id);
                        let _ = reply.send(result);
                        tracing::info!(sandbox = %id, "sandbox destroyed");
                        return;
                    }
                    None => return,
                },
                _ = watch.tick() => {
                    let exited = self.taken.vm.as_mut().is_some_and(|vm| vm.exited().is_some());
                    if exited {
                        tracing::warn!(sandbox = %id, "VMM exited on its own; releasing the sandbox");
                        self.handle.set_state(State::Stopping);
                        if let Err(e) = self.taken.release(&self.manager.inner).await {
                            tracing::error!(sandbox = %id, error = %e.public_message(), "release after VMM exit");
                        }
                        self.manager.unreserve(id);
                        // Answer whoever is waiting to destroy it.
                        while let Ok(Command::Destroy { reply }) = rx.try_recv() {
                            let _ = reply.send(Ok(()));
                        }
                        return;
                    }
                }
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
