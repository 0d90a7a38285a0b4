//! The sandbox manager: every sandbox on this host, each owned by one task.
//!
//! ```text
//!                   ┌───────────── pause (or inactivity) ─────────────┐
//!   create ──▶ Starting ──▶ Running ──▶ Pausing ──▶ Paused ──▶ Resuming ──▶ Running
//!                 │            │  ▲                    │
//!                 │            ▼  │ snapshot            │
//!                 │        Snapshotting                 │
//!                 ▼            └──────── destroy ───────┴──▶ Stopping ──▶ (gone)
//!     failure: everything taken is released, the error is returned
//! ```
//!
//! Ownership: the [`Manager`] holds a map from id to [`SandboxHandle`]. The handle carries
//! what request handlers may use concurrently (the guest agent client while running,
//! immutable facts, the activity clock) and a channel to the sandbox's task
//! ([`task`]). Only the task touches the VM, the network, the disk and the snapshot;
//! lifecycle requests are messages with a reply channel, and a full channel is a typed
//! "busy" error, never a hang.
//!
//! Invariants:
//! - a sandbox is in the map from the moment its id is reserved until its task has
//!   released everything; a second create with the same id fails;
//! - a failed create releases, in reverse order, everything it took (slot, namespace,
//!   disk files, VMM process) before it returns;
//! - every resource a sandbox holds is recorded in its `state.json` ([`state`]) before it
//!   is taken, so [`crate::cleanup`] can remove it after a crash — except a paused
//!   sandbox's snapshot, which the next start adopts instead;
//! - a paused sandbox's snapshot is whole from the moment it is paused: its files (disk
//!   overlay and snapshot, on tmpfs for a fast resume and copied to disk to survive a
//!   reboot) are all a resume needs. For `pause_hold` after the pause it may also keep its
//!   VMM (stopped) with its namespace and slot, so that resuming is a `cont` rather than a
//!   restore; those are released after that time, at shutdown, or when the VMM dies, and
//!   the snapshot is untouched by that.

mod copy;
mod egress;
mod launch;
pub mod logs;
mod moving;
mod pool;
pub mod state;
mod task;
mod warm;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use nestbox_envd::client::EnvdClient;
use nestbox_hostsys::disk::BaseImages;
use nestbox_hostsys::net::SlotAllocator;
use nestbox_image::ImageStore;
use nestbox_types::{SandboxId, TeamId, TemplateId};
use nestbox_vmm::Vmm;
use tokio::sync::{mpsc, oneshot};

pub use moving::AdoptParams;
pub use state::{Phase, StartedBy};

use crate::config::AgentConfig;
use crate::error::AgentError;
use crate::host::{DiskTools, Host, NetHandle, Network};
use crate::templates::{Kind, StoredTemplate, TemplateStore};

/// Lifecycle state as the agent sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Booting or restoring.
    Starting,
    /// The guest agent answers.
    Running,
    /// Saving memory and devices.
    Pausing,
    /// Saved; no VM runs.
    Paused,
    /// Coming back from a pause.
    Resuming,
    /// Being frozen into a template.
    Snapshotting,
    /// Being destroyed.
    Stopping,
}

impl State {
    /// Every state.
    pub const ALL: [State; 7] = [
        State::Starting,
        State::Running,
        State::Pausing,
        State::Paused,
        State::Resuming,
        State::Snapshotting,
        State::Stopping,
    ];

    /// Name for errors and logs.
    pub fn as_str(&self) -> &'static str {
        match self {
            State::Starting => "starting",
            State::Running => "running",
            State::Pausing => "pausing",
            State::Paused => "paused",
            State::Resuming => "resuming",
            State::Snapshotting => "snapshotting",
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
    /// A team template stored on this host, if the sandbox starts from one.
    pub template_id: Option<TemplateId>,
    /// vCPUs.
    pub vcpus: u32,
    /// Memory, MiB.
    pub memory_mb: u32,
    /// Disk, MiB (0 = the agent's default).
    pub disk_size_mb: u32,
    /// Inactivity timeout, seconds (0 = never).
    pub timeout_sec: u32,
    /// Environment for every process.
    pub env: HashMap<String, String>,
    /// Token the guest agent will require.
    pub access_token: String,
    /// Keep no pooled clone of its template ahead of time (a fork's one-off template).
    pub no_pool: bool,
    /// The tenant's egress rules.
    pub egress: nestbox_types::egress::EgressRules,
    /// The user commands run as when they name none (`None`: root).
    pub default_user: Option<String>,
    /// The directory they run in when they name none (`None`: the user's home).
    pub default_workdir: Option<String>,
}

/// Facts about a sandbox that never change.
#[derive(Debug, Clone)]
pub struct SandboxFacts {
    /// Id.
    pub id: SandboxId,
    /// Team.
    pub team: TeamId,
    /// Template name.
    pub template: String,
    /// Team template it came from.
    pub template_id: Option<TemplateId>,
    /// vCPUs.
    pub vcpus: u32,
    /// Memory, MiB.
    pub memory_mb: u32,
    /// Disk, MiB.
    pub disk_size_mb: u32,
    /// Inactivity timeout, seconds.
    pub timeout_sec: u32,
    /// When it first became ready.
    pub started_at: DateTime<Utc>,
    /// Create request to ready.
    pub boot: Duration,
    /// Kernel release.
    pub kernel_version: String,
    /// How it started.
    pub started_by: StartedBy,
    /// A sandbox the agent runs for itself (warm snapshots): never listed.
    pub internal: bool,
}

impl SandboxFacts {
    fn from_state(st: &state::StateFile, internal: bool) -> Self {
        Self {
            id: st.sandbox_id,
            team: st.team_id,
            template: st.template.clone(),
            template_id: st.template_id,
            vcpus: st.vcpus,
            memory_mb: st.memory_mb,
            disk_size_mb: st.disk_size_mb,
            timeout_sec: st.timeout_sec,
            started_at: st.started_at,
            boot: Duration::from_millis(st.boot_ms),
            kernel_version: st.kernel_version.clone(),
            started_by: st.started_by,
            internal,
        }
    }
}

/// What may change about a sandbox, behind one lock.
#[derive(Debug)]
struct Status {
    state: State,
    auto_paused: bool,
    guest: Option<EnvdClient>,
    guest_version: String,
    /// Its VMM stopped it after a failed write to its disk (the host's disk is full).
    io_stopped: bool,
}

/// A lifecycle request to a sandbox's task.
pub(crate) enum Command {
    Destroy {
        reply: oneshot::Sender<Result<(), AgentError>>,
    },
    Pause {
        auto: bool,
        reply: oneshot::Sender<Result<(), AgentError>>,
    },
    Resume {
        reply: oneshot::Sender<Result<(), AgentError>>,
    },
    /// Let a paused sandbox's held VMM go (its snapshot stays).
    ReleaseHeld {
        reply: oneshot::Sender<Result<(), AgentError>>,
    },
    /// Finish copying the snapshot to disk, then free its tmpfs copy (agent shutdown).
    Settle {
        reply: oneshot::Sender<Result<(), AgentError>>,
    },
    CreateTemplate {
        store: TemplateStore,
        key: String,
        kind: Kind,
        /// A move package rather than a template (the sandbox must be paused).
        move_of: bool,
        reply: oneshot::Sender<Result<StoredTemplate, AgentError>>,
    },
    /// Give the guest agent a new access token.
    RotateToken {
        token: String,
        reply: oneshot::Sender<Result<(), AgentError>>,
    },
    /// Leave the VM running, untouched, for the next run of the agent to take back (an
    /// upgrade restart); the task ends.
    Detach {
        reply: oneshot::Sender<Result<(), AgentError>>,
    },
    /// Replace the egress rules.
    SetEgress {
        rules: nestbox_types::egress::EgressRules,
        version: u64,
        reply: oneshot::Sender<Result<(), AgentError>>,
    },
}

/// A sandbox as request handlers see it.
#[derive(Debug)]
pub struct SandboxHandle {
    /// Immutable facts.
    pub facts: SandboxFacts,
    status: Mutex<Status>,
    last_active_ms: AtomicI64,
    commands: mpsc::Sender<Command>,
    /// Its log: the task collects into it, readers page through it.
    log: Arc<Mutex<logs::SandboxLog>>,
}

impl SandboxHandle {
    /// Current state.
    pub fn state(&self) -> State {
        self.status
            .lock()
            .map(|s| s.state)
            .unwrap_or(State::Stopping)
    }

    /// Whether its VMM stopped it after a failed disk write (the host's disk is full).
    pub fn io_stopped(&self) -> bool {
        self.status.lock().map(|s| s.io_stopped).unwrap_or(false)
    }

    /// Whether the inactivity timeout paused it.
    pub fn auto_paused(&self) -> bool {
        self.status.lock().map(|s| s.auto_paused).unwrap_or(false)
    }

    /// The guest agent's version.
    pub fn guest_version(&self) -> String {
        self.status
            .lock()
            .map(|s| s.guest_version.clone())
            .unwrap_or_default()
    }

    /// The guest agent's client; only while running. Counts as activity.
    pub fn guest(&self) -> Result<EnvdClient, AgentError> {
        let status = self
            .status
            .lock()
            .map_err(|_| AgentError::Internal("sandbox status poisoned".into()))?;
        if status.io_stopped {
            return Err(AgentError::OutOfSpace(self.facts.id));
        }
        match (&status.guest, status.state) {
            (Some(g), State::Running | State::Snapshotting) => {
                self.touch();
                Ok(g.clone())
            }
            (_, state) => Err(AgentError::WrongState {
                id: self.facts.id,
                state: state.as_str(),
            }),
        }
    }

    /// Records activity now (resets the inactivity timer).
    pub fn touch(&self) {
        self.last_active_ms
            .store(Utc::now().timestamp_millis(), Ordering::Relaxed);
    }

    /// Last activity, unix ms.
    pub fn last_active_ms(&self) -> i64 {
        self.last_active_ms.load(Ordering::Relaxed)
    }

    fn set(&self, f: impl FnOnce(&mut Status)) {
        if let Ok(mut s) = self.status.lock() {
            f(&mut s);
        }
    }

    async fn request<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T, AgentError>>) -> Command,
    ) -> Result<T, AgentError> {
        let id = self.facts.id;
        let (tx, rx) = oneshot::channel();
        self.commands.try_send(make(tx)).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => AgentError::Busy(id),
            mpsc::error::TrySendError::Closed(_) => AgentError::SandboxNotFound(id),
        })?;
        rx.await.map_err(|_| {
            AgentError::Internal(format!("sandbox {id}'s task ended without answering"))
        })?
    }
}

enum Slot {
    /// Create in progress, with its guest memory (MiB).
    Reserved(u32),
    /// Started (any state after Starting).
    Ready(Arc<SandboxHandle>),
}

/// Everything shared by the manager's operations.
pub(crate) struct Inner {
    pub(crate) cfg: Arc<AgentConfig>,
    pub(crate) tag: String,
    pub(crate) vmm: Arc<dyn Vmm>,
    pub(crate) network: Arc<dyn Network>,
    pub(crate) disks: Arc<dyn DiskTools>,
    pub(crate) images: ImageStore,
    pub(crate) bases: BaseImages,
    pub(crate) slots: SlotAllocator,
    pub(crate) http: reqwest::Client,
    pub(crate) dns: Vec<std::net::Ipv4Addr>,
    pub(crate) templates: TemplateStore,
    /// Templates being copied here from other hosts.
    pub(crate) imports: crate::transfer::Imports,
    /// Prometheus metrics.
    pub(crate) telemetry: crate::telemetry::Telemetry,
    pub(crate) warm: warm::Warm,
    pub(crate) metrics: crate::metrics::Metrics,
    /// Started clones of snapshot templates for creates to take over.
    pub(crate) pool: pool::Pool,
    /// Permits for paused sandboxes that keep their VMM (`max_held`).
    pub(crate) holds: Arc<tokio::sync::Semaphore>,
    /// The agent is stopping: no new create, resume or pooled clone starts.
    closing: std::sync::atomic::AtomicBool,
    sandboxes: Mutex<HashMap<SandboxId, Slot>>,
}

/// Parts to build a [`Manager`] from.
pub struct ManagerParts {
    /// The configuration.
    pub cfg: Arc<AgentConfig>,
    /// The instance tag (names its tmpfs directory and firewall table).
    pub tag: String,
    /// The VMM, networks and disk tools sandboxes run with.
    pub host: Host,
    /// Built-in templates and kernels.
    pub images: ImageStore,
    /// Expanded bases of built-in and image templates.
    pub bases: BaseImages,
    /// Network slots.
    pub slots: SlotAllocator,
    /// The client guest agents are called with.
    pub http: reqwest::Client,
    /// Upstream DNS servers of sandbox resolvers.
    pub dns: Vec<std::net::Ipv4Addr>,
    /// Team templates stored on this host.
    pub templates: TemplateStore,
    /// Warm snapshots of built-in templates.
    pub warm: TemplateStore,
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

/// How long a stop waits for operations under way (under TCG a create or resume takes
/// seconds; a loaded host, more).
const IN_FLIGHT_WAIT: Duration = Duration::from_secs(120);

/// A base image younger than this is never pruned (a create may be about to use it).
const BASE_GRACE: Duration = Duration::from_secs(3600);

/// Directory of a sandbox's files.
pub fn sandbox_dir(data_dir: &Path, id: SandboxId) -> PathBuf {
    data_dir.join("sandboxes").join(id.to_string())
}

/// Directory of every tmpfs file of an agent instance, on the memory filesystem at `base`.
pub fn mem_root(base: &Path, tag: &str) -> PathBuf {
    base.join(format!("nestbox-{tag}"))
}

/// Whether `asked` MiB more of guest RAM fit on a memory filesystem of `capacity` bytes
/// that `committed` MiB are promised to already. Guest RAM files are sparse, but a guest
/// may touch all of its memory: a filesystem promised more than it holds makes some VM die
/// of `SIGBUS` when it fills, so nothing is overcommitted.
pub(crate) fn admits(committed_mb: u64, asked_mb: u64, capacity: u64) -> bool {
    (committed_mb + asked_mb) << 20 <= capacity
}

/// Smallest disk a template's filesystem fits in, with room to boot and work (MiB).
pub(crate) fn min_disk_mb(fs_min_bytes: u64) -> u64 {
    (fs_min_bytes.div_ceil(1 << 20) + 256).div_ceil(256) * 256
}

async fn remove_dir_if_exists(dir: &Path) -> std::io::Result<()> {
    match tokio::fs::remove_dir_all(dir).await {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

impl Manager {
    /// A manager of no sandboxes yet, running them on `parts.host`.
    pub fn new(parts: ManagerParts) -> Self {
        Self {
            inner: Arc::new(Inner {
                warm: warm::Warm::new(parts.warm),
                holds: Arc::new(tokio::sync::Semaphore::new(parts.cfg.max_held as usize)),
                closing: std::sync::atomic::AtomicBool::new(false),
                pool: pool::Pool::default(),
                cfg: parts.cfg,
                tag: parts.tag,
                vmm: parts.host.vmm,
                network: parts.host.network,
                disks: parts.host.disks,
                images: parts.images,
                bases: parts.bases,
                slots: parts.slots,
                http: parts.http,
                dns: parts.dns,
                imports: crate::transfer::Imports::new(parts.templates.clone()),
                telemetry: crate::telemetry::Telemetry::default(),
                templates: parts.templates,
                metrics: crate::metrics::Metrics::start(),
                sandboxes: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// Pooled clones (ready or starting).
    pub fn pooled(&self) -> usize {
        self.inner.pool.len()
    }

    /// Whether pooled clones are being started.
    pub fn pool_filling(&self) -> bool {
        self.inner.pool.filling()
    }

    /// Stops every pooled clone, and waits for clones being started to be stopped too
    /// (shutdown; benchmarks measure creates without them).
    pub async fn drain_pools(&self) {
        self.drain_pool(|_| true).await;
        // A fill in flight stops its clone itself (the drain changed the pool's epoch).
        let waited = Instant::now();
        while self.inner.pool.filling() && waited.elapsed() < self.inner.cfg.boot_timeout {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub(crate) fn inner(&self) -> &Inner {
        &self.inner
    }

    /// A sandbox past its start.
    pub fn get(&self, id: SandboxId) -> Result<Arc<SandboxHandle>, AgentError> {
        let map = self
            .inner
            .sandboxes
            .lock()
            .map_err(|_| AgentError::Internal("sandbox map poisoned".into()))?;
        match map.get(&id) {
            Some(Slot::Ready(h)) if !h.facts.internal => Ok(h.clone()),
            Some(Slot::Reserved(_)) => Err(AgentError::WrongState {
                id,
                state: "starting",
            }),
            _ => Err(AgentError::SandboxNotFound(id)),
        }
    }

    /// A sandbox whose guest agent can be used now.
    pub fn running(&self, id: SandboxId) -> Result<Arc<SandboxHandle>, AgentError> {
        let h = self.get(id)?;
        match h.state() {
            State::Running | State::Snapshotting => Ok(h),
            s => Err(AgentError::WrongState {
                id,
                state: s.as_str(),
            }),
        }
    }

    /// Every sandbox past its start, paused ones included (internal ones excluded).
    pub fn list(&self) -> Vec<Arc<SandboxHandle>> {
        self.inner
            .sandboxes
            .lock()
            .map(|m| {
                m.values()
                    .filter_map(|s| match s {
                        Slot::Ready(h) if !h.facts.internal => Some(h.clone()),
                        _ => None,
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The agent's Prometheus metrics.
    pub fn telemetry(&self) -> &crate::telemetry::Telemetry {
        &self.inner.telemetry
    }

    /// Number of sandboxes, starting and paused ones included.
    pub fn count(&self) -> usize {
        self.inner.sandboxes.lock().map(|m| m.len()).unwrap_or(0)
    }

    /// Built-in image templates this host can boot.
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

    /// The metrics sampler of this host's sandboxes.
    pub fn metrics(&self) -> &crate::metrics::Metrics {
        &self.inner.metrics
    }

    /// The VMM driver itself (benchmarks boot bare VMs with it).
    pub fn vmm(&self) -> Arc<dyn Vmm> {
        self.inner.vmm.clone()
    }

    /// The base image of a built-in template at `size_mb` (at least the template's
    /// minimum), prepared if needed.
    pub async fn base_image(
        &self,
        name: &str,
        template: &nestbox_image::TemplateImage,
        size_mb: u64,
    ) -> Result<PathBuf, AgentError> {
        let key = launch::image_key(template);
        let min_mb = min_disk_mb(template.manifest.fs_min_bytes);
        self.inner
            .bases
            .ensure(
                self.inner.disks.as_ref(),
                name,
                &key,
                &template.rootfs,
                size_mb.max(min_mb),
                min_mb,
            )
            .await
            .map_err(|e| AgentError::Internal(format!("preparing template {name}: {e}")))
    }

    /// The default disk size of new sandboxes, MiB.
    pub fn default_disk_mb(&self) -> u64 {
        self.inner.cfg.default_disk_mb
    }

    /// Details of the built-in templates, for the control plane's catalogue, then of the
    /// team templates stored here.
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
                    template_id: String::new(),
                    vcpus: 0,
                    memory_mb: 0,
                    stored_at_unix_ms: 0,
                })
            })
            .chain(
                self.inner
                    .templates
                    .list()
                    .iter()
                    .map(crate::grpc::template_info),
            )
            .collect()
    }

    /// Prepares base images at the default disk size for every built-in template (the
    /// seed's EnsureImageSizes) and removes the bases nothing uses ([`Self::prune_bases`]).
    pub async fn prepare_images(&self) -> Result<(), AgentError> {
        for name in self.templates() {
            let image = self
                .inner
                .images
                .template(&name)
                .map_err(|e| AgentError::Internal(format!("template {name}: {e}")))?;
            let started = Instant::now();
            self.base_image(&name, &image, self.inner.cfg.default_disk_mb)
                .await?;
            tracing::info!(template = %name, elapsed_ms = started.elapsed().as_millis() as u64, "base image ready");
        }
        self.prune_bases().await;
        self.inner.templates.clean_staging();
        self.sweep_packages();
        let stale = self.inner.imports.sweep(crate::transfer::STALE_IMPORT);
        if stale > 0 {
            tracing::info!(
                removed = stale,
                "removed template copies left unfinished for a day"
            );
        }
        Ok(())
    }

    /// Removes the base images no sandbox's disk is backed by, except each built-in
    /// template's current build at the default size: old builds, sizes no sandbox uses any
    /// more, deleted image templates' bases. A sandbox's base stays as long as its
    /// directory does (paused ones included), so it can always start again.
    pub async fn prune_bases(&self) -> usize {
        let sandboxes = self.inner.cfg.data_dir.join("sandboxes");
        let overlays: Vec<PathBuf> = std::fs::read_dir(&sandboxes)
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.path().join("rootfs.qcow2"))
                    .filter(|p| p.is_file())
                    .collect()
            })
            .unwrap_or_default();
        let mut keep = std::collections::HashSet::new();
        for name in self.templates() {
            if let Ok(image) = self.inner.images.template(&name) {
                let min_mb = min_disk_mb(image.manifest.fs_min_bytes);
                let size = self.inner.cfg.default_disk_mb.max(min_mb);
                keep.insert(
                    self.inner
                        .bases
                        .path(&name, &launch::image_key(&image), size),
                );
            }
        }
        match self
            .inner
            .bases
            .prune_unused(&overlays, &keep, BASE_GRACE)
            .await
        {
            Ok(n) => {
                if n > 0 {
                    tracing::info!(removed = n, "removed base images nothing uses");
                }
                n
            }
            Err(e) => {
                tracing::warn!(error = %e, "pruning base images");
                0
            }
        }
    }

    /// Directory of a sandbox's tmpfs files (guest RAM, fast snapshot).
    pub(crate) fn mem_dir(&self, id: SandboxId) -> PathBuf {
        mem_root(&self.inner.cfg.memory_root, &self.inner.tag).join(id.to_string())
    }

    /// Guest memory (MiB) this host has promised on its memory filesystem: every VM that
    /// runs or is being started (its RAM file), every paused sandbox whose snapshot is
    /// still there, and pooled clones.
    fn committed_mb(&self, map: &HashMap<SandboxId, Slot>) -> u64 {
        let sandboxes: u64 = map
            .iter()
            .map(|(id, slot)| match slot {
                Slot::Reserved(mb) => u64::from(*mb),
                Slot::Ready(h) => {
                    let on_tmpfs =
                        h.state() != State::Paused || self.mem_dir(*id).join("snapshot").exists();
                    if on_tmpfs {
                        u64::from(h.facts.memory_mb)
                    } else {
                        0
                    }
                }
            })
            .sum();
        sandboxes + self.inner.pool.memory_mb()
    }

    /// The memory that backs guest RAM (the memory filesystem's size) and what sandboxes
    /// hold of it, MiB; pooled clones, which give way to sandboxes, are not counted as held.
    pub fn guest_memory_mb(&self) -> (u64, u64) {
        let held = self
            .inner
            .sandboxes
            .lock()
            .map(|map| self.committed_mb(&map))
            .unwrap_or(0)
            .saturating_sub(self.inner.pool.memory_mb());
        (self.memory_capacity() >> 20, held)
    }

    /// Whether the filesystem of the data directory (sandbox disks, snapshots, state) is
    /// full: less than 16 MiB left for the agent.
    pub(crate) fn disk_full(&self) -> bool {
        nix::sys::statvfs::statvfs(&self.inner.cfg.data_dir)
            .is_ok_and(|s| s.blocks_available() * s.fragment_size() < 16 << 20)
    }

    /// The size of the memory filesystem guest RAM lives on, bytes.
    fn memory_capacity(&self) -> u64 {
        nix::sys::statvfs::statvfs(&self.inner.cfg.memory_root)
            .map(|s| s.blocks() * s.fragment_size())
            .unwrap_or(0)
    }

    /// Refuses `memory_mb` more of guest RAM that the memory filesystem cannot hold.
    pub(crate) fn admit_memory(&self, memory_mb: u32) -> Result<(), AgentError> {
        let map = self
            .inner
            .sandboxes
            .lock()
            .map_err(|_| AgentError::Internal("sandbox map poisoned".into()))?;
        self.check_memory(&map, memory_mb)
    }

    fn check_memory(
        &self,
        map: &HashMap<SandboxId, Slot>,
        memory_mb: u32,
    ) -> Result<(), AgentError> {
        let committed = self.committed_mb(map);
        let capacity = self.memory_capacity();
        if admits(committed, u64::from(memory_mb), capacity) {
            Ok(())
        } else {
            Err(AgentError::NoCapacity(format!(
                "guest memory: {memory_mb} MiB more do not fit ({committed} of {} MiB on {} promised)",
                capacity >> 20,
                self.inner.cfg.memory_root.display()
            )))
        }
    }

    fn reserve(&self, id: SandboxId, memory_mb: u32) -> Result<(), AgentError> {
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
        self.check_memory(&map, memory_mb)?;
        map.insert(id, Slot::Reserved(memory_mb));
        Ok(())
    }

    fn unreserve(&self, id: SandboxId) {
        if let Ok(mut map) = self.inner.sandboxes.lock() {
            map.remove(&id);
        }
    }

    fn register(&self, handle: Arc<SandboxHandle>) {
        if let Ok(mut map) = self.inner.sandboxes.lock() {
            map.insert(handle.facts.id, Slot::Ready(handle));
        }
    }

    /// Starts a sandbox (boot, or restore from a snapshot template); returns once its
    /// guest agent answers. On failure everything taken is released first.
    pub async fn create(&self, params: CreateParams) -> Result<Arc<SandboxHandle>, AgentError> {
        self.create_inner(params, false).await
    }

    pub(crate) async fn create_inner(
        &self,
        params: CreateParams,
        internal: bool,
    ) -> Result<Arc<SandboxHandle>, AgentError> {
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
        self.open()?;
        if let Err(e) = self.reserve(id, params.memory_mb) {
            // Pooled clones give way to sandboxes: their memory is freed and it is tried
            // again (a create that would have taken one over restores instead).
            if !matches!(e, AgentError::NoCapacity(_)) || self.pooled() == 0 {
                return Err(e);
            }
            self.drain_pool(|_| true).await;
            self.reserve(id, params.memory_mb)?;
        }
        let started = Instant::now();
        let disk = if params.disk_size_mb == 0 {
            self.inner.cfg.default_disk_mb
        } else {
            u64::from(params.disk_size_mb)
        };
        let warm = params.template_id.is_none()
            && self
                .inner
                .warm
                .get(&params.template, params.vcpus, params.memory_mb, disk)
                .is_some();
        let mut result = self.launch_new(&params, started).await;
        if warm
            && let Err(e) = &result
            && !matches!(e, AgentError::Invalid(_))
            && !e.out_of_space()
            && !self.disk_full()
        {
            // A warm snapshot that does not restore (a VMM or kernel change the key missed)
            // must not make creates fail: forget it and boot. (Not when the host's disk is
            // full: that is no fault of the snapshot, and a boot needs space too.)
            tracing::warn!(sandbox = %id, error = %e.public_message(), "restoring the warm snapshot failed; booting instead");
            self.inner.warm.forget(&params.template);
            result = self.launch_new(&params, started).await;
        }
        match result {
            Ok((mut st, live, guest, guest_version)) => {
                if internal {
                    st.internal = true;
                    let dir = sandbox_dir(&self.inner.cfg.data_dir, id);
                    if let Err(e) = state::write(&dir, &st) {
                        tracing::warn!(sandbox = %id, error = %e.public_message(), "marking an internal sandbox");
                    }
                }
                let (tx, rx) = mpsc::channel(8);
                let handle = Arc::new(SandboxHandle {
                    facts: SandboxFacts::from_state(&st, internal),
                    status: Mutex::new(Status {
                        state: State::Running,
                        auto_paused: false,
                        guest: Some(guest),
                        guest_version,
                        io_stopped: false,
                    }),
                    last_active_ms: AtomicI64::new(Utc::now().timestamp_millis()),
                    commands: tx,
                    log: self.open_log(id),
                });
                tokio::spawn(
                    task::SandboxTask::new(self.clone(), handle.clone(), st, Some(live)).run(rx),
                );
                self.register(handle.clone());
                tracing::info!(sandbox = %id, ms = started.elapsed().as_millis() as u64, "sandbox running");
                Ok(handle)
            }
            Err(e) => {
                tracing::warn!(sandbox = %id, error = %e.public_message(), "create failed");
                self.unreserve(id);
                if !e.out_of_space() && self.disk_full() {
                    return Err(AgentError::NoDiskSpace {
                        what: format!("creating sandbox {id}"),
                        cause: e.public_message(),
                    });
                }
                Err(e)
            }
        }
    }

    fn open_log(&self, id: SandboxId) -> Arc<Mutex<logs::SandboxLog>> {
        Arc::new(Mutex::new(logs::SandboxLog::open(&sandbox_dir(
            &self.inner.cfg.data_dir,
            id,
        ))))
    }

    /// A page of a sandbox's log (running or paused).
    pub async fn logs(&self, id: SandboxId, query: logs::Query) -> Result<logs::Page, AgentError> {
        let log = self.get(id)?.log.clone();
        let dir = sandbox_dir(&self.inner.cfg.data_dir, id);
        tokio::task::spawn_blocking(move || {
            // Held so a rotation cannot happen mid-read.
            let _guard = log.lock();
            logs::read(&dir, &query)
        })
        .await
        .map_err(|e| AgentError::Internal(format!("log reader: {e}")))?
        .map_err(|e| AgentError::Internal(format!("reading the log of {id}: {e}")))
    }

    /// Takes back a paused sandbox found on disk at start-up.
    pub(crate) fn adopt_paused(&self, st: state::StateFile) {
        let id = st.sandbox_id;
        let (tx, rx) = mpsc::channel(8);
        let handle = Arc::new(SandboxHandle {
            facts: SandboxFacts::from_state(&st, false),
            status: Mutex::new(Status {
                state: State::Paused,
                auto_paused: st.auto_paused,
                guest: None,
                guest_version: st.guest_version.clone(),
                io_stopped: false,
            }),
            last_active_ms: AtomicI64::new(Utc::now().timestamp_millis()),
            commands: tx,
            log: self.open_log(id),
        });
        tokio::spawn(task::SandboxTask::new(self.clone(), handle.clone(), st, None).run(rx));
        self.register(handle);
        tracing::info!(sandbox = %id, "adopted a paused sandbox");
    }

    /// Takes back a sandbox whose VMM an earlier run of this agent left running (see
    /// [`crate::cleanup`]): a running sandbox runs on, a paused one keeps holding its VMM,
    /// a pooled clone goes back into its pool. Its resolver is started again (pinned
    /// addresses are pinned again as the guest resolves them). If it cannot be taken back
    /// (its resolver does not start, its pool is gone), everything it holds is released.
    pub(crate) async fn adopt_live(&self, mut st: state::StateFile, vm: Box<dyn nestbox_vmm::Vm>) {
        let id = st.sandbox_id;
        let dir = sandbox_dir(&self.inner.cfg.data_dir, id);
        let Some(slot) = st.slot else { return };
        let net = NetHandle::new(self.inner.network.clone(), slot);
        let live = match self.start_egress(id, &net, &st.egress).await {
            Ok(egress) => launch::Live { vm, net, egress },
            Err(e) => {
                tracing::error!(sandbox = %id, error = %e.public_message(), "taking back a sandbox: its resolver");
                let mut vm = vm;
                let _ = vm.stop(Duration::from_secs(5)).await;
                self.release(&mut st, None, &dir, false).await;
                let _ = net.teardown().await;
                if st.phase == Phase::Paused {
                    // Its snapshot is whole: it stays paused, without the VMM.
                    let _ = state::write(&dir, &st);
                    self.adopt_paused(st);
                } else {
                    self.release(&mut st, None, &dir, true).await;
                }
                return;
            }
        };
        if st.pooled {
            self.adopt_pooled(st, live).await;
            return;
        }
        let held = live.vm.is_held();
        let permit = match held {
            true => match self.inner.holds.clone().try_acquire_owned() {
                Ok(permit) => Some(permit),
                Err(_) => {
                    // No room to hold it: its snapshot is whole, the VMM goes.
                    let launch::Live {
                        mut vm,
                        net,
                        egress,
                    } = live;
                    drop(egress);
                    let _ = vm.stop(Duration::from_secs(5)).await;
                    st.vmm_pid = None;
                    self.drop_network(&mut st, Some(net)).await;
                    let _ = state::write(&dir, &st);
                    self.adopt_paused(st);
                    return;
                }
            },
            false => None,
        };
        let guest = if held {
            None
        } else {
            match self.guest_client(id, &live.net, &st.access_token) {
                Ok(g) => Some(self.settle_rotation(&mut st, &live, g).await),
                Err(e) => {
                    tracing::error!(sandbox = %id, error = %e.public_message(), "taking back a sandbox: its guest client");
                    self.release(&mut st, Some(live), &dir, true).await;
                    return;
                }
            }
        };
        let (tx, rx) = mpsc::channel(8);
        let handle = Arc::new(SandboxHandle {
            facts: SandboxFacts::from_state(&st, false),
            status: Mutex::new(Status {
                state: if held { State::Paused } else { State::Running },
                auto_paused: st.auto_paused,
                guest,
                guest_version: st.guest_version.clone(),
                io_stopped: false,
            }),
            last_active_ms: AtomicI64::new(Utc::now().timestamp_millis()),
            commands: tx,
            log: self.open_log(id),
        });
        let task = task::SandboxTask::new(self.clone(), handle.clone(), st, None);
        let task = match permit {
            Some(permit) => task.holding(live, permit),
            None => task.running(live),
        };
        tokio::spawn(task.run(rx));
        self.register(handle);
        tracing::info!(sandbox = %id, held, "took back a sandbox left running by an earlier run");
    }

    /// After a crash in the middle of a token rotation: the guest agent holds either the
    /// old token or the new one; ask it (an authenticated call), and keep the one it
    /// holds. Returns the client with that token.
    async fn settle_rotation(
        &self,
        st: &mut state::StateFile,
        live: &launch::Live,
        guest: EnvdClient,
    ) -> EnvdClient {
        let Some(next) = st.rotating_to.take() else {
            return guest;
        };
        let id = st.sandbox_id;
        let refused = matches!(
            guest.with_timeout(Duration::from_secs(10)).envs().await,
            Err(e) if e.is_unauthenticated()
        );
        let guest = if refused {
            match self.guest_client(id, &live.net, &next) {
                Ok(g) => {
                    tracing::warn!(sandbox = %id, "a token rotation had reached the guest before a restart; keeping it");
                    st.access_token = next;
                    g
                }
                Err(_) => guest,
            }
        } else {
            guest
        };
        let dir = sandbox_dir(&self.inner.cfg.data_dir, id);
        if let Err(e) = state::write(&dir, st) {
            tracing::warn!(sandbox = %id, error = %e.public_message(), "recording a settled token rotation");
        }
        guest
    }

    /// Destroys a sandbox: stops its VM (if any) and releases everything. Errors of the
    /// teardown are returned (after every step was attempted), never swallowed.
    pub async fn destroy(&self, id: SandboxId) -> Result<(), AgentError> {
        self.get(id)?
            .request(|reply| Command::Destroy { reply })
            .await
    }

    /// Pauses a running sandbox.
    pub async fn pause(&self, id: SandboxId) -> Result<(), AgentError> {
        self.get(id)?
            .request(|reply| Command::Pause { auto: false, reply })
            .await
    }

    /// Resumes a paused sandbox.
    pub async fn resume(&self, id: SandboxId) -> Result<(), AgentError> {
        self.open()?;
        self.get(id)?
            .request(|reply| Command::Resume { reply })
            .await
    }

    /// Replaces a sandbox's egress rules: at once if it runs (or holds its VMM), from its
    /// next resume if it is paused.
    pub async fn set_egress(
        &self,
        id: SandboxId,
        rules: nestbox_types::egress::EgressRules,
        version: u64,
    ) -> Result<(), AgentError> {
        egress::parse(id, &rules)?;
        self.get(id)?
            .request(|reply| Command::SetEgress {
                rules,
                version,
                reply,
            })
            .await
    }

    /// Gives a running sandbox's guest agent a new access token; from then on it accepts
    /// only that one.
    pub async fn rotate_token(&self, id: SandboxId, token: String) -> Result<(), AgentError> {
        if token.len() < 16 {
            return Err(AgentError::Invalid(
                "access_token must be at least 16 characters".into(),
            ));
        }
        self.get(id)?
            .request(|reply| Command::RotateToken { token, reply })
            .await
    }

    /// Lets a paused sandbox's held VMM go: its next resume restores the snapshot (as
    /// after the hold time or a restart). A no-op for a sandbox that holds none.
    pub async fn release_held(&self, id: SandboxId) -> Result<(), AgentError> {
        self.get(id)?
            .request(|reply| Command::ReleaseHeld { reply })
            .await
    }

    /// Resets a sandbox's inactivity timer.
    pub fn ping(&self, id: SandboxId) -> Result<(), AgentError> {
        let h = self.get(id)?;
        match h.state() {
            State::Running | State::Snapshotting => {
                h.touch();
                Ok(())
            }
            s => Err(AgentError::WrongState {
                id,
                state: s.as_str(),
            }),
        }
    }

    /// Turns a running or paused sandbox into a team template stored on this host.
    pub async fn create_template(
        &self,
        id: SandboxId,
        template: TemplateId,
        kind: Kind,
    ) -> Result<StoredTemplate, AgentError> {
        let store = self.inner.templates.clone();
        self.get(id)?
            .request(|reply| Command::CreateTemplate {
                store,
                key: template.to_string(),
                kind,
                move_of: false,
                reply,
            })
            .await
    }

    /// Deletes a team template's files; refused while a sandbox on this host builds on
    /// them (its disk is an overlay over the template's, its memory may map it). Its
    /// pooled clones are stopped first.
    pub async fn delete_template(&self, template: TemplateId) -> Result<(), AgentError> {
        if let Ok(stored) = self.template(template) {
            self.drain_pool(|k| k.template == stored.dir).await;
        }
        let users: Vec<SandboxId> = self
            .list()
            .iter()
            .filter(|h| h.facts.template_id == Some(template))
            .map(|h| h.facts.id)
            .collect();
        if !users.is_empty() {
            return Err(AgentError::TemplateInUse {
                template,
                sandboxes: users.len(),
            });
        }
        // A copy of it under way here goes too.
        self.inner.imports.discard(template);
        if self.inner.templates.delete(&template.to_string())? {
            Ok(())
        } else {
            Err(AgentError::TemplateNotFound(template.to_string()))
        }
    }

    /// A team template stored on this host.
    pub fn template(&self, template: TemplateId) -> Result<StoredTemplate, AgentError> {
        self.inner.templates.get_id(template)
    }

    /// Destroys every sandbox, paused ones included.
    pub async fn destroy_all(&self) {
        self.drain_pools().await;
        let ids: Vec<SandboxId> = self.all_ids();
        for id in ids {
            if let Err(e) = self.destroy_any(id).await {
                tracing::error!(sandbox = %id, error = %e.public_message(), "destroy at shutdown");
            }
        }
    }

    /// Pauses every running sandbox (agent shutdown: they survive the restart). Returns
    /// the ids paused; those that could not be paused are destroyed.
    pub async fn pause_all(&self) -> (Vec<SandboxId>, Vec<SandboxId>) {
        // Nothing new starts from here on; what is under way finishes first, so that no
        // sandbox comes up (or back) after its pause was decided.
        self.close();
        self.settle_in_flight(IN_FLIGHT_WAIT).await;
        self.drain_pools().await;
        let mut paused = Vec::new();
        let mut destroyed = Vec::new();
        for h in self.list() {
            let id = h.facts.id;
            if h.state() != State::Running {
                continue;
            }
            match h
                .request(|reply| Command::Pause { auto: false, reply })
                .await
            {
                Ok(()) => paused.push(id),
                Err(e) => {
                    tracing::error!(sandbox = %id, error = %e.public_message(), "pause at shutdown failed; destroying it");
                    if self.destroy(id).await.is_ok() {
                        destroyed.push(id);
                    }
                }
            }
        }
        // Their snapshots must be on disk before the agent exits, and host memory is freed
        // while it is down.
        for h in self.list() {
            if h.state() == State::Paused
                && let Err(e) = h.request(|reply| Command::Settle { reply }).await
            {
                tracing::warn!(sandbox = %h.facts.id, error = %e.public_message(), "finishing the snapshot copy");
            }
        }
        // Internal sandboxes (warm snapshot builds) never survive.
        for id in self.all_ids() {
            let internal = self.handle_any(id).is_some_and(|h| h.facts.internal);
            if internal {
                let _ = self.destroy_any(id).await;
            }
        }
        (paused, destroyed)
    }

    /// Pauses every running sandbox with its memory because the control plane has been out
    /// of reach for long (the seed's PauseAll): nothing runs unobserved and unbilled, and
    /// nothing is lost. They stay paused, marked as paused by the host, until resumed on
    /// request once the control plane is back (it sees them paused when it reconciles).
    /// Unlike [`Self::pause_all`], the agent stays open. Returns the ids paused.
    pub async fn pause_running(&self) -> Vec<SandboxId> {
        let mut paused = Vec::new();
        for h in self.list() {
            if h.state() != State::Running {
                continue;
            }
            let id = h.facts.id;
            match h
                .request(|reply| Command::Pause { auto: true, reply })
                .await
            {
                Ok(()) => paused.push(id),
                // It keeps running: better than destroying what the control plane did not
                // ask to end.
                Err(e) => {
                    tracing::error!(sandbox = %id, error = %e.public_message(), "pausing while the control plane is away failed")
                }
            }
        }
        paused
    }

    /// Lets go of every sandbox without touching it (an upgrade restart): VMMs, networks
    /// and files stay as they are for the next run to take back ([`crate::cleanup`]).
    /// Pooled clones stay too; internal sandboxes (warm-up builds) are destroyed.
    pub async fn detach_all(&self) {
        for id in self.all_ids() {
            let Some(h) = self.handle_any(id) else {
                continue;
            };
            let result = if h.facts.internal {
                h.request(|reply| Command::Destroy { reply }).await
            } else {
                h.request(|reply| Command::Detach { reply }).await
            };
            if let Err(e) = result {
                tracing::warn!(sandbox = %id, error = %e.public_message(), "letting a sandbox go");
            }
        }
        let pooled: Vec<pool::Pooled> = {
            let mut s = self.inner.pool.lock();
            s.ready.drain().flat_map(|(_, v)| v).collect()
        };
        for entry in pooled {
            entry.detach();
        }
    }

    /// Refuses new creates, resumes and pooled clones from now on (the agent is stopping).
    pub(crate) fn close(&self) {
        self.inner.closing.store(true, Ordering::SeqCst);
    }

    /// Whether new work may start (see [`Self::close`]).
    pub fn is_open(&self) -> bool {
        !self.inner.closing.load(Ordering::SeqCst)
    }

    fn open(&self) -> Result<(), AgentError> {
        if self.is_open() {
            Ok(())
        } else {
            Err(AgentError::NoCapacity("the host is stopping".into()))
        }
    }

    /// Waits (at most `limit`) until no create, pooled clone or lifecycle change is under
    /// way.
    async fn settle_in_flight(&self, limit: Duration) {
        let deadline = Instant::now() + limit;
        loop {
            let busy = self.inner.pool.filling()
                || self.inner.sandboxes.lock().is_ok_and(|m| {
                    m.values().any(|s| match s {
                        Slot::Reserved(_) => true,
                        Slot::Ready(h) => matches!(
                            h.state(),
                            State::Starting
                                | State::Pausing
                                | State::Resuming
                                | State::Snapshotting
                        ),
                    })
                });
            if !busy {
                return;
            }
            if Instant::now() >= deadline {
                tracing::warn!("operations still under way at shutdown; pausing without them");
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn all_ids(&self) -> Vec<SandboxId> {
        self.inner
            .sandboxes
            .lock()
            .map(|m| {
                m.iter()
                    .filter_map(|(id, s)| match s {
                        Slot::Ready(_) => Some(*id),
                        Slot::Reserved(_) => None,
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    fn handle_any(&self, id: SandboxId) -> Option<Arc<SandboxHandle>> {
        self.inner
            .sandboxes
            .lock()
            .ok()
            .and_then(|m| match m.get(&id) {
                Some(Slot::Ready(h)) => Some(h.clone()),
                _ => None,
            })
    }

    async fn destroy_any(&self, id: SandboxId) -> Result<(), AgentError> {
        match self.handle_any(id) {
            Some(h) => h.request(|reply| Command::Destroy { reply }).await,
            None => Err(AgentError::SandboxNotFound(id)),
        }
    }

    /// Whether the start-up warm-up of the built-in templates has finished.
    pub fn warm_up_settled(&self) -> bool {
        self.inner.warm.settled()
    }

    /// Builds (or finds) the warm snapshots of the built-in templates and fills the
    /// default template's clone pool, in the background.
    pub fn warm_up(&self) {
        self.start_pool_reaper();
        let manager = self.clone();
        tokio::spawn(async move { warm::warm_up(manager).await });
    }
}

#[cfg(test)]
mod tests {
    use super::admits;

    #[test]
    fn guest_memory_is_never_overcommitted() {
        let gib = 1u64 << 30;
        assert!(admits(0, 512, gib));
        assert!(admits(512, 512, gib), "exactly full fits");
        assert!(!admits(513, 512, gib));
        assert!(!admits(0, 2048, gib));
        assert!(!admits(0, 1, 0), "no memory filesystem, no guest");
    }
}
