//! In-memory stand-ins for the host side (see [`super`]): a VMM whose guests are small HTTP
//! servers on loopback speaking the part of the guest agent's API the lifecycle uses
//! (`/health`, `/init`, `/envs`, and `process.Start`, whose processes exit 0 at once),
//! networks that are loopback listeners, and disk tools that
//! write marker files. They need no root, no KVM and no QEMU.
//!
//! [`FakeHost`] keeps a ledger of what is held — networks by slot, VMMs by pid — so a test
//! can assert that nothing leaks, a trace of every [`Step`] taken, and makes any step fail
//! on request ([`FakeHost::fail`]), so a test can inject a failure at each step of an
//! operation in turn.
//!
//! The stand-ins keep the contracts of the traits, not the behaviour of QEMU: a failed save
//! leaves the guest running and no snapshot; a `Resume` restore consumes its snapshot; a
//! stop always ends the VM (a failing one too, as a killed process ends); dropping a VM
//! ends it. Snapshots are real directories with a real manifest, whose state file holds
//! the guest's state (its token, environment and host name), so a restored guest holds
//! what it held when saved.

use std::collections::{BTreeMap, HashMap};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use nestbox_dns::{DnsError, Sockets};
use nestbox_envd::types::InitRequest;
use nestbox_hostsys::disk::DiskError;
use nestbox_hostsys::net::NetError;
use nestbox_types::egress::Egress;
use nestbox_vmm::snapshot::{
    self, DiskRecord, GuestRecord, ImageDigest, MachineConfig, MemoryFile, SampledDigest, VmmRecord,
};
use nestbox_vmm::{
    Accel, FreezeHook, RestoreMemory, Restored, SaveMode, SavedMemory, SavedSnapshot,
    SnapshotManifest, StopReport, Vm, VmSpec, Vmm, VmmError, VmmInfo,
};
use sha2::{Digest, Sha256};

use super::{BoxFuture, DiskTools, Host, Network};

/// A step the stand-ins take, each of which can be made to fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Step {
    /// Making a sandbox's network.
    NetSetup,
    /// Removing it.
    NetTeardown,
    /// Binding its resolver.
    Resolver,
    /// Putting egress rules in force (and pinning).
    Egress,
    /// Expanding a base image.
    Expand,
    /// Creating an overlay.
    Overlay,
    /// Flattening a disk.
    Flatten,
    /// Shrinking an image.
    Shrink,
    /// Booting a VM.
    Boot,
    /// Restoring one from a snapshot.
    Restore,
    /// Saving one (suspend or checkpoint).
    Save,
    /// Suspending one and keeping its VMM.
    SuspendHeld,
    /// Running a held one again.
    ResumeHeld,
    /// Stopping one (it ends either way).
    Stop,
    /// The guest agent's `/init`.
    GuestInit,
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self, f)
    }
}

/// The first pid handed out: above the kernel's largest (`PID_MAX_LIMIT`, 2^22), so no
/// fake VMM ever names a real process.
const FIRST_PID: u32 = 5_000_000;
/// The guest agent version fake guests report.
pub const GUEST_VERSION: &str = "fake-guest";
/// The state file of a fake snapshot (where QEMU keeps device state): the guest's state,
/// as JSON.
const GUEST_STATE: &str = snapshot::STATE_FILE;

/// What a guest agent holds.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
struct GuestState {
    token: Option<String>,
    /// Before the first `/init` of a boot: the hash of the token it must present.
    token_sha256: Option<String>,
    env: BTreeMap<String, String>,
    hostname: Option<String>,
}

/// A VMM in the ledger.
#[derive(Debug, Clone)]
pub struct VmmEntry {
    /// The VM's id.
    pub id: String,
    /// Its network slot.
    pub slot: u32,
    /// Stopped after a suspend, its VMM kept.
    pub held: bool,
}

#[derive(Default)]
struct Ledger {
    /// Networks by slot, with the listener their guest agent serves on.
    nets: HashMap<u32, std::net::TcpListener>,
    /// Egress rules in force, by slot.
    egress: HashMap<u32, Egress>,
    /// VMMs by pid.
    vmms: HashMap<u32, VmmEntry>,
    /// Pids whose VMM is to die.
    doomed: Vec<u32>,
    /// The host's disk is full: running guests are stopped by their VMMs.
    full: bool,
    /// Every guest started, to stop them when the disk fills.
    guests: Vec<std::sync::Weak<FakeGuest>>,
}

#[derive(Default)]
struct Faults {
    /// Steps to fail: how many calls to let through first, then how many to fail.
    armed: HashMap<Step, (u32, u32)>,
    /// Steps whose next call waits at a gate until the test opens it.
    gates: HashMap<Step, Arc<Gate>>,
    trace: Vec<Step>,
}

/// A point where the next call of a step waits until the test lets it through (see
/// [`FakeHost::hold`]).
#[derive(Debug)]
pub struct Gate {
    reached: tokio::sync::Semaphore,
    open: tokio::sync::Semaphore,
}

impl Gate {
    /// Waits until a call has reached the gate.
    pub async fn reached(&self) {
        if let Ok(p) = self.reached.acquire().await {
            p.forget();
        }
    }

    /// Lets the waiting call (and any later one) through.
    pub fn open(&self) {
        self.open.close();
    }

    async fn pass(&self) {
        self.reached.add_permits(1);
        // Closing the semaphore is what opens the gate: `acquire` then returns at once.
        let _ = self.open.acquire().await;
    }
}

struct Shared {
    info: VmmInfo,
    ledger: Mutex<Ledger>,
    faults: Mutex<Faults>,
    next_pid: AtomicU32,
}

/// The stand-ins, sharing one ledger; see the module docs.
#[derive(Clone)]
pub struct FakeHost {
    shared: Arc<Shared>,
}

impl Default for FakeHost {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for FakeHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeHost").finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn injected(step: Step) -> std::io::Error {
    std::io::Error::other(format!("injected fault: {step}"))
}

fn vmm_io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> VmmError + 'a {
    move |source| VmmError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

fn disk_io(path: &Path) -> impl FnOnce(std::io::Error) -> DiskError + '_ {
    move |source| DiskError::Io {
        path: path.to_path_buf(),
        source,
    }
}

impl FakeHost {
    /// A host with nothing held and no fault armed.
    pub fn new() -> Self {
        Self {
            shared: Arc::new(Shared {
                info: VmmInfo {
                    name: "fake",
                    version: "1".into(),
                    accel: Accel::Tcg,
                    cpu: "fake",
                },
                ledger: Mutex::default(),
                faults: Mutex::default(),
                next_pid: AtomicU32::new(FIRST_PID),
            }),
        }
    }

    /// The host to give a manager.
    pub fn host(&self) -> Host {
        Host {
            vmm: Arc::new(self.clone()),
            network: Arc::new(self.clone()),
            disks: Arc::new(self.clone()),
        }
    }

    /// Makes the call of `step` after the next `after` ones fail (once).
    pub fn fail(&self, step: Step, after: u32) {
        self.fail_times(step, after, 1);
    }

    /// Makes `times` calls of `step` fail, after the next `after` ones.
    pub fn fail_times(&self, step: Step, after: u32, times: u32) {
        lock(&self.shared.faults).armed.insert(step, (after, times));
    }

    /// Makes the next call of `step` wait until the returned gate is opened (once).
    pub fn hold(&self, step: Step) -> Arc<Gate> {
        let gate = Arc::new(Gate {
            reached: tokio::sync::Semaphore::new(0),
            open: tokio::sync::Semaphore::new(0),
        });
        lock(&self.shared.faults).gates.insert(step, gate.clone());
        gate
    }

    /// Waits at `step`'s gate if one is set (and takes it away).
    async fn gate(&self, step: Step) {
        let gate = lock(&self.shared.faults).gates.remove(&step);
        if let Some(gate) = gate {
            gate.pass().await;
        }
    }

    /// Disarms every fault.
    pub fn disarm(&self) {
        lock(&self.shared.faults).armed.clear();
    }

    /// Whether a fault is armed and not yet hit.
    pub fn armed(&self) -> bool {
        !lock(&self.shared.faults).armed.is_empty()
    }

    /// The steps taken since the last call (failed ones included), in order.
    pub fn take_trace(&self) -> Vec<Step> {
        std::mem::take(&mut lock(&self.shared.faults).trace)
    }

    /// Slots whose network exists.
    pub fn networks(&self) -> Vec<u32> {
        let mut v: Vec<u32> = lock(&self.shared.ledger).nets.keys().copied().collect();
        v.sort_unstable();
        v
    }

    /// Running or held VMMs, by pid.
    pub fn vmms(&self) -> BTreeMap<u32, VmmEntry> {
        lock(&self.shared.ledger)
            .vmms
            .iter()
            .map(|(p, e)| (*p, e.clone()))
            .collect()
    }

    /// The egress rules in force in `slot`'s network.
    pub fn egress(&self, slot: u32) -> Option<Egress> {
        lock(&self.shared.ledger).egress.get(&slot).cloned()
    }

    /// Fills the host's disk (`true`): every running guest stops, as a VMM stops one whose
    /// disk write failed, and stays stopped until the disk has room again and its VMM
    /// retries ([`Vm::retry_io`]).
    pub fn set_disk_full(&self, full: bool) {
        let mut ledger = lock(&self.shared.ledger);
        ledger.full = full;
        ledger.guests.retain(|g| g.strong_count() > 0);
        if full {
            for g in ledger.guests.iter().filter_map(std::sync::Weak::upgrade) {
                g.io_stopped.store(true, Ordering::SeqCst);
            }
        }
    }

    /// Makes the VMM `pid` die, as a crashed process does.
    pub fn kill(&self, pid: u32) {
        lock(&self.shared.ledger).doomed.push(pid);
    }

    /// Records `step` and fails it if it is armed.
    fn step(&self, step: Step) -> Result<(), std::io::Error> {
        let mut f = lock(&self.shared.faults);
        f.trace.push(step);
        match f.armed.get_mut(&step) {
            Some((0, times)) => {
                *times = times.saturating_sub(1);
                if *times == 0 {
                    f.armed.remove(&step);
                }
                Err(injected(step))
            }
            Some((after, _)) => {
                *after -= 1;
                Ok(())
            }
            None => Ok(()),
        }
    }

    fn slot_of(netns: &Path) -> Option<u32> {
        netns.file_name()?.to_str()?.parse().ok()
    }

    /// Starts a VM on `spec`'s network with `guest` as its guest agent's state.
    fn start(&self, spec: &VmSpec, guest: GuestState) -> Result<FakeVm, VmmError> {
        let nestbox_vmm::NetworkSpec::Tap { netns, .. } = &spec.network else {
            return Err(VmmError::InvalidSpec {
                field: "network",
                reason: "the fake VMM runs guests on a TAP network only".into(),
            });
        };
        let slot = Self::slot_of(netns).ok_or_else(|| VmmError::InvalidSpec {
            field: "network",
            reason: format!("{} is not a fake network", netns.display()),
        })?;
        let listener = {
            let ledger = lock(&self.shared.ledger);
            let Some(l) = ledger.nets.get(&slot) else {
                return Err(VmmError::InvalidSpec {
                    field: "network",
                    reason: format!("slot {slot} has no network"),
                });
            };
            l.try_clone().map_err(vmm_io("listen", netns))?
        };
        let console = spec.run_dir.join("console.log");
        std::fs::write(&console, format!("fake VM {}\n", spec.id))
            .map_err(vmm_io("write", &console))?;
        let pid = self.shared.next_pid.fetch_add(1, Ordering::Relaxed);
        let guest = Arc::new(FakeGuest {
            alive: AtomicBool::new(true),
            io_stopped: AtomicBool::new(false),
            state: Mutex::new(guest),
            host: self.clone(),
        });
        let server = serve(listener, guest.clone()).map_err(vmm_io("listen", netns))?;
        lock(&self.shared.ledger)
            .guests
            .push(Arc::downgrade(&guest));
        lock(&self.shared.ledger).vmms.insert(
            pid,
            VmmEntry {
                id: spec.id.clone(),
                slot,
                held: false,
            },
        );
        Ok(FakeVm {
            host: self.clone(),
            id: spec.id.clone(),
            pid,
            run_dir: spec.run_dir.clone(),
            memory_dir: spec.memory_dir.clone(),
            console,
            vcpus: spec.vcpus,
            memory_mb: spec.memory_mb,
            guest,
            server: Some(server),
            held: None,
            ended: None,
        })
    }

    fn manifest(
        vm: &FakeVm,
        kind: SaveMode,
        memory: Option<MemoryFile>,
        state: u64,
    ) -> SnapshotManifest {
        SnapshotManifest {
            format_version: snapshot::FORMAT_VERSION,
            kind,
            created_at: chrono::Utc::now().to_rfc3339(),
            source_vm: vm.id.clone(),
            vmm: VmmRecord {
                name: vm.host.shared.info.name.into(),
                version: vm.host.shared.info.version.clone(),
                accel: vm.host.shared.info.accel,
            },
            guest: GuestRecord {
                kernel: ImageDigest {
                    path: String::new(),
                    size: 0,
                    sha256: String::new(),
                },
                initrd: None,
                cmdline: String::new(),
            },
            machine: MachineConfig {
                machine_type: "fake".into(),
                cpu: "fake".into(),
                host_cpu: None,
                vcpus: vm.vcpus,
                memory_mb: vm.memory_mb,
                devices: Vec::new(),
            },
            root_disk: DiskRecord {
                format: "qcow2".into(),
                virtual_size: 0,
            },
            state: snapshot::StateFile {
                file: GUEST_STATE.into(),
                size: state,
                sha256: String::new(),
            },
            memory,
        }
    }

    /// Reads a snapshot and checks it fits `spec`.
    fn read_snapshot(
        spec: &VmSpec,
        dir: &Path,
    ) -> Result<(SnapshotManifest, GuestState), VmmError> {
        let m = snapshot::read_manifest(dir)?;
        if m.machine.vcpus != spec.vcpus || m.machine.memory_mb != spec.memory_mb {
            return Err(VmmError::IncompatibleSnapshot {
                dir: dir.to_path_buf(),
                reason: format!(
                    "saved with {} vCPUs and {} MiB",
                    m.machine.vcpus, m.machine.memory_mb
                ),
            });
        }
        let path = dir.join(&m.state.file);
        let bytes = std::fs::read(&path).map_err(vmm_io("read", &path))?;
        let guest = serde_json::from_slice(&bytes).map_err(|e| VmmError::CorruptSnapshot {
            path,
            reason: e.to_string(),
        })?;
        Ok((m, guest))
    }
}

/// A fake guest agent.
struct FakeGuest {
    alive: AtomicBool,
    /// Stopped by its VMM after a failed disk write.
    io_stopped: AtomicBool,
    state: Mutex<GuestState>,
    host: FakeHost,
}

impl FakeGuest {
    /// Whether it answers: its VM runs.
    fn runs(&self) -> bool {
        self.alive.load(Ordering::SeqCst) && !self.io_stopped.load(Ordering::SeqCst)
    }

    fn authorised(&self, headers: &HeaderMap) -> bool {
        let presented = headers
            .get(nestbox_envd::headers::ACCESS_TOKEN)
            .and_then(|v| v.to_str().ok());
        let s = lock(&self.state);
        match (&s.token, &s.token_sha256, presented) {
            (Some(t), _, Some(p)) => t == p,
            (Some(_), _, None) => false,
            (None, Some(h), Some(p)) => &hex::encode(Sha256::digest(p.as_bytes())) == h,
            (None, Some(_), None) => false,
            (None, None, _) => true,
        }
    }
}

fn error(status: StatusCode, message: &str) -> Response {
    (
        status,
        axum::Json(serde_json::json!({ "code": status.as_u16(), "message": message })),
    )
        .into_response()
}

async fn health(State(g): State<Arc<FakeGuest>>) -> Response {
    if !g.runs() {
        return error(StatusCode::SERVICE_UNAVAILABLE, "the VM is not running");
    }
    (
        StatusCode::NO_CONTENT,
        [(nestbox_envd::headers::GUEST_VERSION, GUEST_VERSION)],
    )
        .into_response()
}

async fn init(
    State(g): State<Arc<FakeGuest>>,
    headers: HeaderMap,
    axum::Json(req): axum::Json<InitRequest>,
) -> Response {
    if !g.runs() {
        return error(StatusCode::SERVICE_UNAVAILABLE, "the VM is not running");
    }
    if let Err(e) = g.host.step(Step::GuestInit) {
        return error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string());
    }
    if !g.authorised(&headers) {
        return error(StatusCode::UNAUTHORIZED, "invalid access token");
    }
    let mut s = lock(&g.state);
    if let Some(t) = req.access_token {
        s.token = Some(t);
        s.token_sha256 = None;
    }
    s.env.extend(req.env_vars.unwrap_or_default());
    if req.hostname.is_some() {
        s.hostname = req.hostname;
    }
    StatusCode::NO_CONTENT.into_response()
}

async fn envs(State(g): State<Arc<FakeGuest>>, headers: HeaderMap) -> Response {
    if !g.runs() {
        return error(StatusCode::SERVICE_UNAVAILABLE, "the VM is not running");
    }
    if !g.authorised(&headers) {
        return error(StatusCode::UNAUTHORIZED, "invalid access token");
    }
    let env = lock(&g.state).env.clone();
    axum::Json(env).into_response()
}

/// `process.Start`: a process that starts and exits 0 at once.
async fn start_process(State(g): State<Arc<FakeGuest>>, headers: HeaderMap) -> Response {
    use nestbox_envd::connect::server::{accept, stream_response};
    use nestbox_envd::connect::{Code, ConnectError, Shape};
    use nestbox_envd::process::process_event::{EndEvent, Event, StartEvent};
    use nestbox_envd::process::{ProcessEvent, StartResponse};
    let meta = match accept(&headers, Shape::Streaming) {
        Ok(meta) => meta,
        Err(refused) => return (*refused).into_response(),
    };
    if !g.runs() {
        return meta
            .error(&ConnectError::new(
                Code::Unavailable,
                "the VM is not running",
            ))
            .into_response();
    }
    if !g.authorised(&headers) {
        return meta
            .error(&ConnectError::new(
                Code::Unauthenticated,
                "invalid access token",
            ))
            .into_response();
    }
    let event = |e: Event| {
        Ok(StartResponse {
            event: Some(ProcessEvent { event: Some(e) }),
        })
    };
    let events = vec![
        event(Event::Start(StartEvent { pid: 1 })),
        event(Event::End(EndEvent {
            exit_code: 0,
            exited: true,
            status: "exit status 0".into(),
            error: None,
        })),
    ];
    stream_response(meta.codec, futures::stream::iter(events)).into_response()
}

/// Serves `guest` on `listener` until the returned task is aborted (its connections end
/// with it).
fn serve(
    listener: std::net::TcpListener,
    guest: Arc<FakeGuest>,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    listener.set_nonblocking(true)?;
    let listener = tokio::net::TcpListener::from_std(listener)?;
    let app = axum::Router::new()
        .route("/health", get(health))
        .route("/init", post(init))
        .route("/envs", get(envs))
        .route("/process.Process/Start", post(start_process))
        .with_state(guest);
    Ok(tokio::spawn(async move {
        let mut connections = tokio::task::JoinSet::new();
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                break;
            };
            let service = hyper_util::service::TowerToHyperService::new(app.clone());
            connections.spawn(async move {
                let _ = hyper_util::server::conn::auto::Builder::new(
                    hyper_util::rt::TokioExecutor::new(),
                )
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
            });
            while connections.try_join_next().is_some() {}
        }
    }))
}

/// A fake VM.
pub struct FakeVm {
    host: FakeHost,
    id: String,
    pid: u32,
    run_dir: PathBuf,
    memory_dir: PathBuf,
    console: PathBuf,
    vcpus: u32,
    memory_mb: u32,
    guest: Arc<FakeGuest>,
    server: Option<tokio::task::JoinHandle<()>>,
    /// The snapshot a held VM's state is in.
    held: Option<PathBuf>,
    ended: Option<String>,
}

impl FakeVm {
    fn ram(&self) -> PathBuf {
        self.memory_dir.join(format!("{}.ram", self.id))
    }

    /// Ends the VMM: its guest stops answering and it leaves the ledger.
    fn end(&mut self, status: &str) {
        self.guest.alive.store(false, Ordering::SeqCst);
        if let Some(s) = self.server.take() {
            s.abort();
        }
        lock(&self.host.shared.ledger).vmms.remove(&self.pid);
        self.ended.get_or_insert_with(|| status.to_string());
    }

    fn check_running(&mut self) -> Result<(), VmmError> {
        if self.exited().is_some() {
            return Err(VmmError::Exited {
                id: self.id.clone(),
                status: self.ended.clone().unwrap_or_default(),
                stderr: String::new(),
                console: String::new(),
            });
        }
        Ok(())
    }

    fn set_held(&self, held: bool) {
        if let Some(e) = lock(&self.host.shared.ledger).vmms.get_mut(&self.pid) {
            e.held = held;
        }
    }

    /// Writes a snapshot of the VM into `dir`: its guest's state and, if it has a RAM file
    /// of its own, that file (moved with `take`, else copied).
    async fn write_snapshot(
        &mut self,
        dir: &Path,
        kind: SaveMode,
        take: bool,
        freeze: Option<&mut dyn FreezeHook>,
    ) -> Result<SavedSnapshot, VmmError> {
        if dir.join(snapshot::MANIFEST_FILE).exists() {
            return Err(VmmError::Io {
                op: "save into",
                path: dir.to_path_buf(),
                source: std::io::Error::other("it holds a snapshot already"),
            });
        }
        std::fs::create_dir_all(dir).map_err(vmm_io("create", dir))?;
        let written = async {
            if let Some(hook) = freeze {
                hook.freeze().await.map_err(|e| VmmError::Io {
                    op: "freeze for",
                    path: dir.to_path_buf(),
                    source: std::io::Error::other(e.to_string()),
                })?;
            }
            let state = serde_json::to_vec(&*lock(&self.guest.state)).unwrap_or_default();
            let state_path = dir.join(GUEST_STATE);
            std::fs::write(&state_path, &state).map_err(vmm_io("write", &state_path))?;
            let ram = self.ram();
            let memory = if ram.exists() {
                let to = dir.join(snapshot::MEMORY_FILE);
                let placement = if take {
                    std::fs::rename(&ram, &to).map_err(vmm_io("move", &ram))?;
                    snapshot::files::Placement::Moved
                } else {
                    std::fs::copy(&ram, &to).map_err(vmm_io("copy", &ram))?;
                    snapshot::files::Placement::Copied
                };
                Some((to, placement))
            } else {
                None
            };
            let record = memory.as_ref().map(|_| MemoryFile {
                file: snapshot::MEMORY_FILE.into(),
                size: u64::from(self.memory_mb) << 20,
                allocated: 0,
                sample: SampledDigest {
                    algorithm: "none".into(),
                    block_size: 0,
                    blocks: 0,
                    seed: 0,
                    sha256: String::new(),
                },
            });
            let manifest = FakeHost::manifest(self, kind, record, state.len() as u64);
            snapshot::write_manifest(dir, &manifest)?;
            Ok(SavedSnapshot {
                dir: dir.to_path_buf(),
                manifest,
                memory: match memory {
                    Some((path, placement)) => SavedMemory::File { path, placement },
                    None => SavedMemory::InState,
                },
                timings: Default::default(),
            })
        }
        .await;
        if written.is_err() {
            // Nothing is left in `dir`; a moved RAM file goes back.
            let moved = dir.join(snapshot::MEMORY_FILE);
            if take && moved.exists() {
                let _ = std::fs::rename(&moved, self.ram());
            }
            let _ = std::fs::remove_dir_all(dir);
        }
        written
    }
}

impl Drop for FakeVm {
    fn drop(&mut self) {
        self.end("killed (dropped)");
    }
}

impl Vm for FakeVm {
    fn id(&self) -> &str {
        &self.id
    }
    fn pid(&self) -> u32 {
        self.pid
    }
    fn console_log(&self) -> &Path {
        &self.console
    }
    fn run_dir(&self) -> &Path {
        &self.run_dir
    }
    fn exited(&mut self) -> Option<String> {
        let doomed = {
            let mut l = lock(&self.host.shared.ledger);
            let before = l.doomed.len();
            l.doomed.retain(|p| *p != self.pid);
            l.doomed.len() != before
        };
        if doomed {
            self.end("signal: 9 (SIGKILL)");
        }
        self.ended.clone()
    }
    fn run_state(&self) -> BoxFuture<'_, Result<String, VmmError>> {
        Box::pin(async move {
            Ok(if self.held.is_some() {
                "paused"
            } else if self.guest.io_stopped.load(Ordering::SeqCst) {
                nestbox_vmm::RUN_STATE_IO_ERROR
            } else {
                "running"
            }
            .to_string())
        })
    }
    fn retry_io(&mut self) -> BoxFuture<'_, Result<(), VmmError>> {
        Box::pin(async move {
            // The guest runs again only if the disk has room; else it stops at once.
            let full = lock(&self.host.shared.ledger).full;
            self.guest.io_stopped.store(full, Ordering::SeqCst);
            Ok(())
        })
    }
    fn stop(&mut self, _grace: Duration) -> BoxFuture<'_, Result<StopReport, VmmError>> {
        Box::pin(async move {
            let failed = self.host.step(Step::Stop);
            let forced = failed.is_err();
            self.end("exit status: 0");
            let ram = self.ram();
            let _ = std::fs::remove_file(&ram);
            failed.map_err(vmm_io("stop", &self.run_dir))?;
            Ok(StopReport {
                exit_code: Some(0),
                forced,
            })
        })
    }
    fn save<'a>(
        &'a mut self,
        dir: &'a Path,
        mode: SaveMode,
        freeze: Option<&'a mut dyn FreezeHook>,
    ) -> BoxFuture<'a, Result<SavedSnapshot, VmmError>> {
        Box::pin(async move {
            self.check_running()?;
            self.host.step(Step::Save).map_err(vmm_io("save", dir))?;
            let saved = self
                .write_snapshot(dir, mode, mode == SaveMode::Suspend, freeze)
                .await?;
            if mode == SaveMode::Suspend {
                self.end("exit status: 0");
            }
            Ok(saved)
        })
    }
    fn suspend_held<'a>(
        &'a mut self,
        dir: &'a Path,
    ) -> BoxFuture<'a, Result<SavedSnapshot, VmmError>> {
        Box::pin(async move {
            self.check_running()?;
            if self.held.is_some() {
                return Err(VmmError::Held {
                    id: self.id.clone(),
                    held: true,
                });
            }
            self.host
                .step(Step::SuspendHeld)
                .map_err(vmm_io("suspend", dir))?;
            let saved = self
                .write_snapshot(dir, SaveMode::Suspend, true, None)
                .await?;
            self.guest.alive.store(false, Ordering::SeqCst);
            self.held = Some(dir.to_path_buf());
            self.set_held(true);
            Ok(saved)
        })
    }
    fn relocate(&mut self, run_dir: &Path, memory_dir: &Path) {
        self.console = run_dir.join("console.log");
        self.run_dir = run_dir.to_path_buf();
        self.memory_dir = memory_dir.to_path_buf();
    }
    fn is_held(&self) -> bool {
        self.held.is_some()
    }
    fn resume_held(&mut self) -> BoxFuture<'_, Result<(), VmmError>> {
        Box::pin(async move {
            self.check_running()?;
            let Some(dir) = self.held.clone() else {
                return Err(VmmError::Held {
                    id: self.id.clone(),
                    held: false,
                });
            };
            self.host
                .step(Step::ResumeHeld)
                .map_err(vmm_io("resume", &dir))?;
            // Consumed manifest first, then the RAM goes back to the VM.
            let manifest = dir.join(snapshot::MANIFEST_FILE);
            std::fs::remove_file(&manifest).map_err(vmm_io("remove", &manifest))?;
            let ram = dir.join(snapshot::MEMORY_FILE);
            if ram.exists() {
                std::fs::rename(&ram, self.ram()).map_err(vmm_io("move", &ram))?;
            }
            let _ = std::fs::remove_file(dir.join(GUEST_STATE));
            self.held = None;
            self.set_held(false);
            self.guest.alive.store(true, Ordering::SeqCst);
            Ok(())
        })
    }
}

impl Vmm for FakeHost {
    fn info(&self) -> &VmmInfo {
        &self.shared.info
    }
    fn boot(&self, spec: VmSpec) -> BoxFuture<'_, Result<Box<dyn Vm>, VmmError>> {
        Box::pin(async move {
            self.gate(Step::Boot).await;
            self.step(Step::Boot)
                .map_err(vmm_io("boot", &spec.run_dir))?;
            let guest = GuestState {
                token_sha256: spec.guest.access_token_sha256.clone(),
                hostname: spec.guest.hostname.clone(),
                ..GuestState::default()
            };
            let vm = self.start(&spec, guest)?;
            let ram = vm.ram();
            std::fs::create_dir_all(&spec.memory_dir)
                .map_err(vmm_io("create", &spec.memory_dir))?;
            let file = std::fs::File::create(&ram).map_err(vmm_io("create", &ram))?;
            file.set_len(u64::from(spec.memory_mb) << 20)
                .map_err(vmm_io("size", &ram))?;
            Ok(Box::new(vm) as Box<dyn Vm>)
        })
    }
    fn restore<'a>(
        &'a self,
        spec: VmSpec,
        snapshot: &'a Path,
        memory: RestoreMemory,
    ) -> BoxFuture<'a, Result<Restored, VmmError>> {
        Box::pin(async move {
            self.gate(Step::Restore).await;
            let (manifest, guest) = Self::read_snapshot(&spec, snapshot)?;
            self.step(Step::Restore)
                .map_err(vmm_io("restore", snapshot))?;
            let vm = self.start(&spec, guest)?;
            let saved_ram = snapshot.join(snapshot::MEMORY_FILE);
            let placed = match (memory, saved_ram.exists()) {
                (RestoreMemory::Resume, true) => {
                    std::fs::rename(&saved_ram, vm.ram()).map_err(vmm_io("move", &saved_ram))
                }
                (RestoreMemory::Copy, true) => std::fs::copy(&saved_ram, vm.ram())
                    .map(drop)
                    .map_err(vmm_io("copy", &saved_ram)),
                _ => Ok(()),
            };
            placed?;
            if memory == RestoreMemory::Resume {
                let _ = std::fs::remove_file(snapshot.join(snapshot::MANIFEST_FILE));
                let _ = std::fs::remove_file(snapshot.join(GUEST_STATE));
            }
            Ok(Restored {
                vm: Box::new(vm),
                manifest,
                timings: Default::default(),
            })
        })
    }
    fn adopt<'a>(&'a self, run_dir: &'a Path) -> BoxFuture<'a, Result<Box<dyn Vm>, VmmError>> {
        Box::pin(async move {
            Err(VmmError::NotAdoptable {
                run_dir: run_dir.to_path_buf(),
                reason: "fake VMMs end with the process that ran them".into(),
            })
        })
    }
    fn check_snapshot<'a>(
        &'a self,
        spec: &'a VmSpec,
        snapshot: &'a Path,
    ) -> BoxFuture<'a, Result<SnapshotManifest, VmmError>> {
        Box::pin(async move { Self::read_snapshot(spec, snapshot).map(|(m, _)| m) })
    }
}

impl Network for FakeHost {
    fn setup(&self, slot: u32) -> BoxFuture<'_, Result<(), NetError>> {
        Box::pin(async move {
            let fail = |source| NetError::SlotDir {
                path: self.netns(slot),
                source,
            };
            self.step(Step::NetSetup).map_err(fail)?;
            let listener = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).map_err(fail)?;
            let mut ledger = lock(&self.shared.ledger);
            if ledger.nets.contains_key(&slot) {
                return Err(fail(std::io::Error::from(
                    std::io::ErrorKind::AlreadyExists,
                )));
            }
            ledger.nets.insert(slot, listener);
            Ok(())
        })
    }
    fn teardown(&self, slot: u32) -> BoxFuture<'_, Result<(), NetError>> {
        Box::pin(async move {
            self.step(Step::NetTeardown)
                .map_err(|source| NetError::SlotDir {
                    path: self.netns(slot),
                    source,
                })?;
            let mut ledger = lock(&self.shared.ledger);
            ledger.nets.remove(&slot);
            ledger.egress.remove(&slot);
            Ok(())
        })
    }
    fn exists(&self, slot: u32) -> bool {
        lock(&self.shared.ledger).nets.contains_key(&slot)
    }
    fn netns(&self, slot: u32) -> PathBuf {
        PathBuf::from("/nonexistent/nestbox-fake-netns").join(slot.to_string())
    }
    fn guest_agent(&self, slot: u32) -> SocketAddr {
        lock(&self.shared.ledger)
            .nets
            .get(&slot)
            .and_then(|l| l.local_addr().ok())
            // A port nothing listens on: the guest is unreachable.
            .unwrap_or(SocketAddr::from((Ipv4Addr::LOCALHOST, 9)))
    }
    fn resolver(&self, slot: u32) -> Result<Sockets, DnsError> {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
        let fail = |source| DnsError::Bind {
            netns: self.netns(slot),
            addr,
            source,
        };
        self.step(Step::Resolver).map_err(fail)?;
        Sockets::bind(addr).map_err(fail)
    }
    fn replace_egress<'a>(
        &'a self,
        slot: u32,
        egress: &'a Egress,
        _keep: &'a [Ipv4Addr],
    ) -> BoxFuture<'a, Result<(), NetError>> {
        Box::pin(async move {
            self.step(Step::Egress)
                .map_err(|source| NetError::SlotDir {
                    path: self.netns(slot),
                    source,
                })?;
            let mut ledger = lock(&self.shared.ledger);
            if !ledger.nets.contains_key(&slot) {
                return Err(NetError::SlotDir {
                    path: self.netns(slot),
                    source: std::io::Error::from(std::io::ErrorKind::NotFound),
                });
            }
            ledger.egress.insert(slot, egress.clone());
            Ok(())
        })
    }
    fn pin<'a>(&'a self, slot: u32, _ips: &'a [Ipv4Addr]) -> BoxFuture<'a, Result<(), NetError>> {
        Box::pin(async move {
            self.step(Step::Egress).map_err(|source| NetError::SlotDir {
                path: self.netns(slot),
                source,
            })
        })
    }
    fn unpin<'a>(&'a self, slot: u32, _ips: &'a [Ipv4Addr]) -> BoxFuture<'a, Result<(), NetError>> {
        Box::pin(async move {
            self.step(Step::Egress).map_err(|source| NetError::SlotDir {
                path: self.netns(slot),
                source,
            })
        })
    }
}

impl DiskTools for FakeHost {
    fn expand<'a>(&'a self, path: &'a Path, size_mb: u64) -> BoxFuture<'a, Result<(), DiskError>> {
        Box::pin(async move {
            self.step(Step::Expand).map_err(disk_io(path))?;
            let file = std::fs::OpenOptions::new()
                .write(true)
                .open(path)
                .map_err(disk_io(path))?;
            file.set_len(size_mb << 20).map_err(disk_io(path))
        })
    }
    fn create_overlay<'a>(
        &'a self,
        base: &'a Path,
        overlay: &'a Path,
        size_mb: Option<u64>,
    ) -> BoxFuture<'a, Result<(), DiskError>> {
        Box::pin(async move {
            self.step(Step::Overlay).map_err(disk_io(overlay))?;
            if !base.exists() {
                return Err(DiskError::MissingImage {
                    path: base.to_path_buf(),
                });
            }
            let text = format!(
                "fake overlay\nbase={}\nsize_mb={size_mb:?}\n",
                base.display()
            );
            std::fs::write(overlay, text).map_err(disk_io(overlay))
        })
    }
    fn flatten<'a>(
        &'a self,
        overlay: &'a Path,
        backing: &'a Path,
        out: &'a Path,
    ) -> BoxFuture<'a, Result<(), DiskError>> {
        Box::pin(async move {
            self.step(Step::Flatten).map_err(disk_io(out))?;
            let text = std::fs::read_to_string(overlay).map_err(disk_io(overlay))?;
            let text = format!("fake flat image of\n{text}over={}\n", backing.display());
            std::fs::write(out, text).map_err(disk_io(out))
        })
    }
    fn shrink<'a>(&'a self, path: &'a Path) -> BoxFuture<'a, Result<u64, DiskError>> {
        Box::pin(async move {
            self.step(Step::Shrink).map_err(disk_io(path))?;
            Ok(std::fs::metadata(path).map_err(disk_io(path))?.len())
        })
    }
}

/// Writes a built-in template named `name` (and its kernel) into the image directory
/// `root`, as `nestbox image build` would, with placeholder files: enough for a manager
/// running on a [`FakeHost`].
pub fn write_images(root: &Path, name: &str) -> std::io::Result<()> {
    use nestbox_image::manifest::{
        BootProtocol, FORMAT_VERSION, KernelManifest, Recipe, TemplateManifest,
    };
    let kernel_version = "0.0.0-fake";
    let kdir = root.join("kernels").join(kernel_version);
    let tdir = root.join("templates").join(name);
    std::fs::create_dir_all(&kdir)?;
    std::fs::create_dir_all(&tdir)?;
    std::fs::write(kdir.join("vmlinux"), b"fake kernel")?;
    std::fs::write(kdir.join("initramfs.cpio"), b"fake initramfs")?;
    std::fs::write(tdir.join("rootfs.ext4"), b"fake root filesystem")?;
    let k = KernelManifest {
        format_version: FORMAT_VERSION,
        kernel_version: kernel_version.into(),
        source: "fake".into(),
        image: "vmlinux".into(),
        boot_protocol: BootProtocol::Pvh,
        initramfs: "initramfs.cpio".into(),
        modules: Vec::new(),
        guest_sha256: "00".into(),
        inputs_hash: "11".into(),
        built_at: "2026-01-01T00:00:00Z".into(),
    };
    let t = TemplateManifest {
        format_version: FORMAT_VERSION,
        name: name.into(),
        kernel_version: kernel_version.into(),
        rootfs: "rootfs.ext4".into(),
        size_bytes: 20,
        fs_min_bytes: 1 << 20,
        recipe: Recipe::minimal(),
        recipe_hash: Recipe::minimal().hash(),
        suite: "bookworm".into(),
        mirror: "http://deb.debian.org/debian".into(),
        guest_sha256: "00".into(),
        inputs_hash: format!("fake-{name}"),
        built_at: "2026-01-01T00:00:00Z".into(),
    };
    let json = |v: serde_json::Result<Vec<u8>>| v.map_err(std::io::Error::other);
    std::fs::write(
        kdir.join("kernel.json"),
        json(serde_json::to_vec_pretty(&k))?,
    )?;
    std::fs::write(
        tdir.join("template.json"),
        json(serde_json::to_vec_pretty(&t))?,
    )?;
    Ok(())
}
