//! A simulated host agent for control-plane tests.
//!
//! [`SimAgent`] serves the real `nestbox.hostagent.v1.HostAgent` gRPC contract on
//! `127.0.0.1:0`, keeps its sandboxes and their files in memory, and can be told to fail.
//! It registers with a control plane exactly like a real agent (`POST /v1/hosts/register`
//! with a one-time token) and heartbeats when asked ([`SimAgent::heartbeat`]). It is a fake
//! for the control plane's tests, never a substitute for the real agent's own tests.
//!
//! # What it owns
//!
//! One [`Mutex`]-guarded state: the credentials it got at registration, the sandboxes it
//! "runs" (each with its create request and an in-memory file tree), queued faults and
//! per-RPC call counters. No lock is held across an `.await`.
//!
//! # Behaviour
//!
//! - **Authentication**: every call must carry `authorization: Bearer <token>` that
//!   [`nestbox_proto::auth::verify`] accepts for the host id and key received at
//!   registration. Before registration every call is refused (`UNAUTHENTICATED`). Refused
//!   calls are counted ([`SimAgent::rejected_calls`]).
//! - **Ping** reports the configured capacity and templates (`template_infos`; by default
//!   `minimal`, kind `image`, `min_disk_mb` 512).
//! - **CreateSandbox** refuses unknown templates (`template_not_found`), disks below the
//!   template's minimum (`invalid_request`), duplicates (`already_exists`) and anything past
//!   the enforced `max_sandboxes` (`no_capacity`). The enforced limit starts at the
//!   configured one (also what registration announces) and can be lowered at run time with
//!   [`SimAgent::set_max_sandboxes`] to make the agent full while the control plane still
//!   believes it has room.
//! - **Exec / ExecStream** are deterministic: stdout is the argv (`cmd` then `args`) joined by
//!   spaces plus `\n`, followed by stdin verbatim; stderr is the environment (the sandbox's
//!   create-time env overlaid with the command's env) as sorted `KEY=VALUE\n` lines; the exit
//!   code is the value of the env var [`EXIT_CODE_ENV`] (default 0). When [`STDOUT_HEX_ENV`]
//!   is set, stdout is exactly its hex-decoded bytes instead (for non-UTF-8 output).
//!   The stream sends `started`, the stdout chunk(s), stderr, then `exited`.
//! - **Files** live in a per-sandbox tree rooted at `/` with `/root` (relative paths are
//!   resolved against `/root`). Writes create parent directories and are kept only when the
//!   upload stream carries its commit message: an aborted upload stores nothing (and is
//!   counted, [`SimAgent::aborted_writes`]).
//! - **Pause and resume** change a sandbox's state like the real agent: `PauseSandbox` needs a
//!   running sandbox (else `sandbox_not_running`), `ResumeSandbox` a paused one (else
//!   `conflict`); commands, files and `PingSandbox` need a running one. Paused sandboxes are
//!   listed with state `PAUSED`; [`SimAgent::auto_pause`] pauses one as the agent's inactivity
//!   timer would (`auto_paused`), [`SimAgent::resume_unasked`] resumes one behind the control
//!   plane's back. Destroy works in either state.
//! - **Templates** made by `CreateTemplate` are stored per agent by id with their kind,
//!   machine (the sandbox's vCPUs and memory), disk, a deterministic size and a copy of the
//!   sandbox's files; `CreateSandbox` with a `template_id` starts from one (unknown →
//!   `template_not_found`; a snapshot's vCPUs and memory must match, else `invalid_request`;
//!   the disk may not be smaller) and gets its files. `Ping` lists them after the built-in
//!   templates, with `template_id` set. `DeleteTemplate` of an unknown id is
//!   `template_not_found`. Every template call is logged in arrival order
//!   ([`SimAgent::template_log`]).
//! - **Template copies**: `GetTemplateManifest` describes a stored template as a record
//!   (its metadata and files, JSON) and one file, `disk.img` ([`SIM_COPY_FILE_BYTES`] of
//!   bytes derived from the id, with a block of zeros in the middle, which `ReadTemplateFile`
//!   leaves out); `BeginTemplateImport`, `WriteTemplateFile` and `CommitTemplateImport` keep
//!   a copy in memory, resume it where it stood, check its digest and then store the
//!   template (logged as [`TemplateCall::Import`]). A failure injected into
//!   `ReadTemplateFile` cuts its stream after the first data block (a copy cut short).
//! - **Background processes** (`StartProcess`, terminals included) get the next pid and
//!   never exit by themselves; a tag is unique per sandbox (`already_exists`). Input is kept
//!   and replayed as stdout by `ConnectProcess` after the `started` event (then the stream
//!   ends); any signal removes the process; unknown pids and tags are `process_not_found`.
//!   `WatchDir` checks the directory (`file_not_found`, `invalid_request`) and sends only
//!   the `started` event.
//! - **Failure injection**: [`SimAgent::fail_next`] makes the next call of one RPC fail with
//!   a Nestbox error code (as a real agent would, via [`nestbox_proto::status`]);
//!   [`SimAgent::lose`] forgets a sandbox silently (the VM "died"); [`SimAgent::adopt`]
//!   makes it run a sandbox the control plane never created.
//! - **Metrics** are deterministic ([`sim_metrics`]): every sandbox the agent holds has
//!   [`SIM_METRIC_POINTS`] points in its 10 min tier and one in each averaged tier, with
//!   `cpu_pct` [`SIM_CPU_PCT`], `mem_bytes` half its memory and `disk_bytes`
//!   [`SIM_DISK_BYTES`]. `FlushSandboxMetrics` returns all three tiers of a sandbox it holds;
//!   `DestroySandbox` keeps the 24 h tier, which one flush then hands over.
//! - **Calls in flight**: [`SimAgent::hold`] parks every call of one RPC (after counting it,
//!   before its injected failure and its effect) until the returned [`SimHold`] is released
//!   or dropped, so a test can look at the control plane while the call is pending.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use nestbox_proto::hostagent::host_agent_server::{HostAgent, HostAgentServer};
use nestbox_proto::hostagent::{
    self as pb, CreateSandboxRequest, CreateSandboxResponse, CreateTemplateRequest,
    CreateTemplateResponse, DeleteTemplateRequest, DeleteTemplateResponse, DestroySandboxRequest,
    DestroySandboxResponse, ExecEvent, ExecRequest, ExecResponse, GetSandboxRequest,
    ListDirRequest, ListDirResponse, ListSandboxesRequest, ListSandboxesResponse, MakeDirRequest,
    MakeDirResponse, PauseSandboxRequest, PingRequest, PingResponse, PingSandboxRequest,
    PingSandboxResponse, ReadFileRequest, ReadFileResponse, RemoveRequest, RemoveResponse,
    ResumeSandboxRequest, SandboxInfo, StatRequest, StatResponse, TemplateInfo, WriteFileRequest,
    WriteFileResponse, exec_event, read_file_response, write_file_request,
};
use nestbox_types::api::{
    HeartbeatRequest, HostTokenPair, RefreshHostRequest, RefreshHostResponse, RegisterHostRequest,
    RegisterHostResponse,
};
use nestbox_types::{ErrorCode, HostId, SandboxId, TemplateId};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tonic::{Request, Response, Status, Streaming};

/// Env var whose value becomes a simulated command's exit code.
pub const EXIT_CODE_ENV: &str = "SIM_EXIT_CODE";
/// Env var whose hex-decoded value becomes a simulated command's whole stdout.
pub const STDOUT_HEX_ENV: &str = "SIM_STDOUT_HEX";
/// Version the simulated agent reports.
pub const SIM_VERSION: &str = "0.0.0-sim";
/// Home directory relative paths resolve against.
pub const HOME: &str = "/root";
/// Length of the one file a simulated template copy carries.
pub const SIM_COPY_FILE_BYTES: u64 = 5 * SIM_COPY_BLOCK;
/// Block size of simulated template copies.
pub const SIM_COPY_BLOCK: u64 = 64 << 10;
/// Name of the file a simulated template copy carries.
const SIM_COPY_FILE: &str = "disk.img";

/// Points in a simulated sandbox's 10 min metrics tier.
pub const SIM_METRIC_POINTS: usize = 4;
/// CPU percent of every simulated metric point.
pub const SIM_CPU_PCT: f64 = 12.5;
/// Disk bytes of every simulated metric point.
pub const SIM_DISK_BYTES: u64 = 64 << 20;
/// Chunk size of simulated downloads.
const READ_CHUNK: usize = 64 * 1024;

/// A template the simulated host can boot.
#[derive(Debug, Clone)]
pub struct SimTemplate {
    /// Name, e.g. `minimal`.
    pub name: String,
    /// `image` or `snapshot`.
    pub kind: String,
    /// Smallest disk, MiB.
    pub min_disk_mb: u32,
    /// Bytes its files take.
    pub size_bytes: u64,
}

impl SimTemplate {
    /// An image template.
    pub fn image(name: &str, min_disk_mb: u32) -> Self {
        Self {
            name: name.into(),
            kind: "image".into(),
            min_disk_mb,
            size_bytes: u64::from(min_disk_mb) << 20,
        }
    }
}

/// What the simulated host has and announces at registration.
#[derive(Debug, Clone)]
pub struct SimAgentConfig {
    /// Most sandboxes it runs at once (announced and enforced).
    pub max_sandboxes: u32,
    /// CPUs.
    pub vcpus: u32,
    /// Memory, MiB.
    pub memory_mb: u64,
    /// Disk, MiB.
    pub disk_mb: u64,
    /// Templates it reports in `Ping`.
    pub templates: Vec<SimTemplate>,
    /// The memory backing guest RAM it reports with heartbeats, MiB (what its running
    /// sandboxes hold counts as used); `None`: not reported.
    pub guest_memory_mb: Option<u64>,
}

impl Default for SimAgentConfig {
    fn default() -> Self {
        Self {
            max_sandboxes: 64,
            vcpus: 16,
            memory_mb: 64 * 1024,
            disk_mb: 1 << 20,
            templates: vec![SimTemplate::image("minimal", 512)],
            guest_memory_mb: None,
        }
    }
}

/// The RPCs, for [`SimAgent::fail_next`] and [`SimAgent::calls`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SimOp {
    /// `Ping`.
    Ping,
    /// `CreateSandbox`.
    Create,
    /// `DestroySandbox`.
    Destroy,
    /// `GetSandbox`.
    Get,
    /// `ListSandboxes`.
    List,
    /// `Exec`.
    Exec,
    /// `ExecStream`.
    ExecStream,
    /// `WriteFile`.
    WriteFile,
    /// `ReadFile`.
    ReadFile,
    /// `ListDir`.
    ListDir,
    /// `Stat`.
    Stat,
    /// `MakeDir`.
    MakeDir,
    /// `Remove`.
    Remove,
    /// `PauseSandbox`.
    PauseSandbox,
    /// `ResumeSandbox`.
    ResumeSandbox,
    /// `PingSandbox`.
    PingSandbox,
    /// `SetEgress`.
    SetEgress,
    /// `RotateSandboxToken`.
    RotateToken,
    /// `CreateTemplate`.
    CreateTemplate,
    /// `DeleteTemplate`.
    DeleteTemplate,
    /// `ImportImage`.
    ImportImage,
    /// `GetSandboxMetrics`.
    GetSandboxMetrics,
    /// `GetSandboxLogs`.
    GetSandboxLogs,
    /// `FlushSandboxMetrics`.
    FlushSandboxMetrics,
    /// `GetTemplateManifest`.
    TemplateManifest,
    /// `ReadTemplateFile`.
    ReadTemplateFile,
    /// `BeginTemplateImport`.
    BeginImport,
    /// `WriteTemplateFile`.
    WriteTemplateFile,
    /// `CommitTemplateImport`.
    CommitImport,
    /// `ExportSandbox`.
    ExportSandbox,
    /// `AdoptSandbox`.
    AdoptSandbox,
}

/// Whether a simulated sandbox's VM runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SimState {
    /// It runs.
    Running,
    /// Its memory and disk are saved; no VM runs.
    Paused,
}

/// A template call as the agent received it, for [`SimAgent::template_log`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TemplateCall {
    /// `CreateTemplate`.
    Create {
        /// The id the control plane chose.
        template_id: String,
        /// The sandbox captured.
        sandbox_id: String,
    },
    /// `DeleteTemplate`.
    Delete {
        /// The template whose files to delete.
        template_id: String,
    },
    /// `CommitTemplateImport` that stored a copied template.
    Import {
        /// The template copied here.
        template_id: String,
    },
}

/// A template the simulated agent stores (made by `CreateTemplate`).
#[derive(Debug, Clone)]
pub struct SimStoredTemplate {
    /// Its id (`tpl-…`).
    pub id: String,
    /// Image or snapshot.
    pub kind: pb::TemplateKind,
    /// The captured sandbox's vCPUs.
    pub vcpus: u32,
    /// The captured sandbox's memory, MiB.
    pub memory_mb: u32,
    /// The captured sandbox's disk, MiB: the smallest disk of sandboxes from it.
    pub disk_size_mb: u32,
    /// Bytes its files take (what `CreateTemplate` reported).
    pub size_bytes: u64,
    /// The sandbox it was made from.
    pub sandbox_id: String,
    /// When it was stored on this agent, Unix ms.
    pub stored_at_unix_ms: i64,
    files: BTreeMap<String, Node>,
    /// A move package (`ExportSandbox`): the paused sandbox it carries. Never listed.
    moved: Option<SimMoved>,
}

impl SimStoredTemplate {
    /// Whether it is a move package rather than a template.
    pub fn is_move_package(&self) -> bool {
        self.moved.is_some()
    }
}

/// What a move package carries besides the sandbox's files, in a form its record can hold.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct SimMoved {
    /// The create request (protobuf, hex).
    request: String,
    started_at_unix_ms: i64,
    /// Background processes: info (protobuf, hex) and stdin (hex).
    processes: Vec<(String, String)>,
}

impl SimMoved {
    fn of(sb: &SimSandbox) -> Self {
        use prost::Message;
        Self {
            request: hex::encode(sb.request.encode_to_vec()),
            started_at_unix_ms: sb.started_at_unix_ms,
            processes: sb
                .processes
                .values()
                .map(|p| (hex::encode(p.info.encode_to_vec()), hex::encode(&p.stdin)))
                .collect(),
        }
    }

    fn sandbox_id(&self) -> Option<String> {
        use prost::Message;
        let bytes = hex::decode(&self.request).ok()?;
        Some(
            CreateSandboxRequest::decode(bytes.as_slice())
                .ok()?
                .sandbox_id,
        )
    }

    /// The paused sandbox it carries, with `files`.
    fn sandbox(&self, files: BTreeMap<String, Node>) -> Result<SimSandbox, Status> {
        use prost::Message;
        let bad = |e: String| invalid(format!("unreadable move package: {e}"));
        let bytes = hex::decode(&self.request).map_err(|e| bad(e.to_string()))?;
        let request =
            CreateSandboxRequest::decode(bytes.as_slice()).map_err(|e| bad(e.to_string()))?;
        let mut sb = new_sandbox(request);
        sb.files = files;
        sb.state = SimState::Paused;
        sb.started_at_unix_ms = self.started_at_unix_ms;
        sb.started_by = "move".into();
        for (info, stdin) in &self.processes {
            let info = hex::decode(info).map_err(|e| bad(e.to_string()))?;
            let info = pb::ProcessInfo::decode(info.as_slice()).map_err(|e| bad(e.to_string()))?;
            let stdin = hex::decode(stdin).map_err(|e| bad(e.to_string()))?;
            sb.processes.insert(info.pid, SimProcess { info, stdin });
        }
        Ok(sb)
    }
}

/// A sandbox the simulated agent runs: what the control plane asked for.
#[derive(Debug, Clone)]
pub struct SimSandbox {
    /// The create request as received.
    pub request: CreateSandboxRequest,
    /// When it "booted", Unix ms.
    pub started_at_unix_ms: i64,
    /// Running or paused.
    pub state: SimState,
    /// Paused by the inactivity timer ([`SimAgent::auto_pause`]).
    pub auto_paused: bool,
    /// Last activity (creation, resume, `PingSandbox`), Unix ms.
    pub last_active_unix_ms: i64,
    /// `boot`, `restore` (from a snapshot template) or `resume`.
    pub started_by: String,
    /// The version of the egress change in force (0: the create's rules).
    pub egress_version: u64,
    files: BTreeMap<String, Node>,
    /// Background processes by pid.
    processes: BTreeMap<u32, SimProcess>,
}

/// A background process the simulated agent "runs": it never exits by itself and keeps
/// what it was sent on stdin.
#[derive(Debug, Clone)]
struct SimProcess {
    info: pb::ProcessInfo,
    stdin: Vec<u8>,
}

impl SimSandbox {
    /// Environment variables given at creation.
    pub fn env(&self) -> BTreeMap<String, String> {
        self.request.env.clone().into_iter().collect()
    }

    /// The egress rules in force (from the create, replaced by `SetEgress`).
    pub fn egress(&self) -> (Vec<String>, Vec<String>) {
        let e = self.request.egress.clone().unwrap_or_default();
        (e.allow_out, e.deny_out)
    }
}

#[derive(Debug, Clone)]
struct Node {
    data: Option<Vec<u8>>,
    modified_unix_ms: i64,
}

impl Node {
    fn dir() -> Self {
        Self {
            data: None,
            modified_unix_ms: now_ms(),
        }
    }

    fn file(data: Vec<u8>) -> Self {
        Self {
            data: Some(data),
            modified_unix_ms: now_ms(),
        }
    }
}

/// Why talking to the control plane failed.
#[derive(Debug, thiserror::Error)]
pub enum SimAgentError {
    /// The request did not complete.
    #[error("request to {url} failed")]
    Http {
        /// The URL.
        url: String,
        /// Why.
        #[source]
        source: reqwest::Error,
    },
    /// The control plane answered with an error.
    #[error("{url} answered {status}: {body}")]
    Refused {
        /// The URL.
        url: String,
        /// HTTP status.
        status: u16,
        /// Response body.
        body: String,
    },
    /// The agent has not registered yet.
    #[error("the simulated agent is not registered")]
    NotRegistered,
}

impl SimAgentError {
    /// The HTTP status when the control plane refused.
    pub fn status(&self) -> Option<u16> {
        match self {
            SimAgentError::Refused { status, .. } => Some(*status),
            _ => None,
        }
    }
}

#[derive(Debug)]
struct Registered {
    control_plane: String,
    creds: RegisterHostResponse,
}

#[derive(Debug)]
struct State {
    cfg: SimAgentConfig,
    max_sandboxes: u32,
    registered: Option<Registered>,
    sandboxes: BTreeMap<String, SimSandbox>,
    faults: HashMap<SimOp, VecDeque<(ErrorCode, String)>>,
    calls: HashMap<SimOp, u32>,
    rejected_calls: u32,
    aborted_writes: u32,
    last_exec: Option<ExecRequest>,
    last_create: Option<CreateSandboxRequest>,
    next_pid: u32,
    templates: BTreeMap<String, SimStoredTemplate>,
    /// Template copies under way: the manifest, and the file with where it stands.
    imports: BTreeMap<String, (pb::TemplateManifest, Vec<u8>, u64)>,
    template_log: Vec<TemplateCall>,
    holds: HashMap<SimOp, Arc<Gate>>,
    /// 24 h tiers of destroyed sandboxes, until flushed.
    retired_metrics: BTreeMap<String, pb::MetricSeries>,
}

/// Where held calls of one RPC wait until [`SimHold`] opens it.
#[derive(Debug)]
struct Gate {
    /// Calls that have arrived at the gate.
    arrived: watch::Sender<u32>,
    open: watch::Sender<bool>,
}

impl Gate {
    async fn pass(&self) {
        let mut open = self.open.subscribe();
        self.arrived.send_modify(|n| *n += 1);
        // The sender lives as long as `self`: this only ends when the gate opens.
        let _ = open.wait_for(|o| *o).await;
    }
}

/// Calls of one RPC held in flight by [`SimAgent::hold`]. Releasing or dropping it lets them
/// (and later calls) through.
#[derive(Debug)]
pub struct SimHold {
    op: SimOp,
    gate: Arc<Gate>,
    shared: Shared,
}

impl SimHold {
    /// Waits until at least one call has arrived and is being held.
    pub async fn arrived(&self) {
        let mut arrived = self.gate.arrived.subscribe();
        let _ = arrived.wait_for(|n| *n > 0).await;
    }

    /// Lets the held calls go on.
    pub fn release(self) {}
}

impl Drop for SimHold {
    fn drop(&mut self) {
        let mut st = self.shared.lock();
        if st
            .holds
            .get(&self.op)
            .is_some_and(|g| Arc::ptr_eq(g, &self.gate))
        {
            st.holds.remove(&self.op);
        }
        drop(st);
        self.gate.open.send_replace(true);
    }
}

#[derive(Debug, Clone)]
struct Shared(Arc<Mutex<State>>);

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock only happens in a failing test; keep going.
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counts a call of `op`, waits while calls of `op` are held, and returns its injected
    /// failure, if any.
    async fn enter(&self, op: SimOp) -> Result<(), Status> {
        let gate = {
            let mut st = self.lock();
            *st.calls.entry(op).or_default() += 1;
            st.holds.get(&op).cloned()
        };
        if let Some(gate) = gate {
            gate.pass().await;
        }
        let mut st = self.lock();
        match st.faults.get_mut(&op).and_then(VecDeque::pop_front) {
            Some((code, message)) => Err(nestbox_proto::status(code, message)),
            None => Ok(()),
        }
    }
}

/// A running simulated host agent. Dropping it stops its server.
#[derive(Debug)]
pub struct SimAgent {
    shared: Shared,
    addr: SocketAddr,
    http: reqwest::Client,
    shutdown: Option<oneshot::Sender<()>>,
    server: JoinHandle<()>,
}

impl Drop for SimAgent {
    fn drop(&mut self) {
        self.server.abort();
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

fn not_found(id: &str) -> Status {
    nestbox_proto::status(
        ErrorCode::SandboxNotFound,
        format!("sandbox {id} not found on this host"),
    )
}

impl SimAgent {
    /// Starts serving on `127.0.0.1:0`.
    pub async fn start(cfg: SimAgentConfig) -> std::io::Result<SimAgent> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let shared = Shared(Arc::new(Mutex::new(State {
            max_sandboxes: cfg.max_sandboxes,
            cfg,
            registered: None,
            sandboxes: BTreeMap::new(),
            faults: HashMap::new(),
            calls: HashMap::new(),
            rejected_calls: 0,
            aborted_writes: 0,
            last_exec: None,
            last_create: None,
            next_pid: 100,
            templates: BTreeMap::new(),
            imports: BTreeMap::new(),
            template_log: Vec::new(),
            holds: HashMap::new(),
            retired_metrics: BTreeMap::new(),
        })));
        let service = Service {
            shared: shared.clone(),
        };
        let auth = shared.clone();
        let server = HostAgentServer::with_interceptor(service, move |req: Request<()>| {
            authenticate(&auth, req)
        });
        let (tx, rx) = oneshot::channel::<()>();
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
        let server = tokio::spawn(async move {
            let result = tonic::transport::Server::builder()
                .add_service(server)
                .serve_with_incoming_shutdown(incoming, async {
                    let _ = rx.await;
                })
                .await;
            if let Err(e) = result {
                tracing::warn!(error = %e, "simulated agent server failed");
            }
        });
        let http = reqwest::Client::builder()
            .build()
            .map_err(std::io::Error::other)?;
        Ok(SimAgent {
            shared,
            addr,
            http,
            shutdown: Some(tx),
            server,
        })
    }

    /// Where the control plane reaches it: `http://127.0.0.1:PORT`.
    pub fn address(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Trades a one-time registration token for credentials, like a real agent.
    pub async fn register(
        &self,
        control_plane: &str,
        token: &str,
    ) -> Result<RegisterHostResponse, SimAgentError> {
        let base = control_plane.trim_end_matches('/').to_string();
        let request = {
            let st = self.shared.lock();
            RegisterHostRequest {
                token: token.to_string(),
                address: self.address(),
                version: SIM_VERSION.into(),
                vcpus: st.cfg.vcpus,
                memory_mb: st.cfg.memory_mb,
                disk_mb: st.cfg.disk_mb,
                max_sandboxes: st.cfg.max_sandboxes,
            }
        };
        let url = format!("{base}/v1/hosts/register");
        let creds: RegisterHostResponse = self
            .post(&url, None, &request)
            .await?
            .json()
            .await
            .map_err(|source| SimAgentError::Http {
                url: url.clone(),
                source,
            })?;
        self.shared.lock().registered = Some(Registered {
            control_plane: base,
            creds: creds.clone(),
        });
        Ok(creds)
    }

    async fn post<B: serde::Serialize>(
        &self,
        url: &str,
        bearer: Option<&str>,
        body: &B,
    ) -> Result<reqwest::Response, SimAgentError> {
        let mut rb = self.http.post(url).json(body);
        if let Some(token) = bearer {
            rb = rb.bearer_auth(token);
        }
        let resp = rb.send().await.map_err(|source| SimAgentError::Http {
            url: url.to_string(),
            source,
        })?;
        if !resp.status().is_success() {
            let status = resp.status().as_u16();
            let body = resp.text().await.unwrap_or_default();
            return Err(SimAgentError::Refused {
                url: url.to_string(),
                status,
                body,
            });
        }
        Ok(resp)
    }

    /// Sends one heartbeat with its host token.
    pub async fn heartbeat(&self) -> Result<(), SimAgentError> {
        let (url, token, body) = {
            let st = self.shared.lock();
            let reg = st.registered.as_ref().ok_or(SimAgentError::NotRegistered)?;
            (
                format!(
                    "{}/v1/hosts/{}/heartbeat",
                    reg.control_plane, reg.creds.host_id
                ),
                reg.creds.credentials.access_token.clone(),
                HeartbeatRequest {
                    sandboxes: u32::try_from(st.sandboxes.len()).unwrap_or(u32::MAX),
                    version: SIM_VERSION.into(),
                    address: format!("http://{}", self.addr),
                    guest_memory_mb: st.cfg.guest_memory_mb,
                    guest_memory_used_mb: st.cfg.guest_memory_mb.map(|_| {
                        st.sandboxes
                            .values()
                            .map(|sb| u64::from(sb.request.memory_mb))
                            .sum()
                    }),
                },
            )
        };
        self.post(&url, Some(&token), &body).await.map(drop)
    }

    /// Trades its refresh token for the next pair (like a real agent), keeps the pair and
    /// returns it.
    pub async fn refresh(&self) -> Result<HostTokenPair, SimAgentError> {
        let (url, token) = {
            let st = self.shared.lock();
            let reg = st.registered.as_ref().ok_or(SimAgentError::NotRegistered)?;
            (
                format!("{}/v1/hosts/refresh", reg.control_plane),
                reg.creds.credentials.refresh_token.clone(),
            )
        };
        let resp: RefreshHostResponse = self
            .post(
                &url,
                None,
                &RefreshHostRequest {
                    refresh_token: token,
                },
            )
            .await?
            .json()
            .await
            .map_err(|source| SimAgentError::Http {
                url: url.clone(),
                source,
            })?;
        let mut st = self.shared.lock();
        if let Some(reg) = st.registered.as_mut() {
            reg.creds.credentials = resp.credentials.clone();
        }
        Ok(resp.credentials)
    }

    /// Replaces the token pair it holds (a test restoring a pair it kept, or losing one).
    pub fn set_tokens(&self, pair: HostTokenPair) {
        if let Some(reg) = self.shared.lock().registered.as_mut() {
            reg.creds.credentials = pair;
        }
    }

    /// The host id it registered as.
    pub fn host_id(&self) -> Option<HostId> {
        self.shared
            .lock()
            .registered
            .as_ref()
            .map(|r| r.creds.host_id)
    }

    /// The credentials it got at registration.
    pub fn credentials(&self) -> Option<RegisterHostResponse> {
        self.shared
            .lock()
            .registered
            .as_ref()
            .map(|r| r.creds.clone())
    }

    /// Changes how many sandboxes it accepts (registration keeps announcing the original).
    pub fn set_max_sandboxes(&self, n: u32) {
        self.shared.lock().max_sandboxes = n;
    }

    /// Makes the next call of `op` fail with `code` (queued: call again for more failures).
    pub fn fail_next(&self, op: SimOp, code: ErrorCode, message: impl Into<String>) {
        self.shared
            .lock()
            .faults
            .entry(op)
            .or_default()
            .push_back((code, message.into()));
    }

    /// Forgets a sandbox without telling anyone (its VM died). Returns whether it existed.
    pub fn lose(&self, id: impl std::fmt::Display) -> bool {
        self.shared
            .lock()
            .sandboxes
            .remove(&id.to_string())
            .is_some()
    }

    /// Holds every call of `op` in flight (counted, but before its injected failure and its
    /// effect) until the returned handle is released or dropped.
    pub fn hold(&self, op: SimOp) -> SimHold {
        let gate = Arc::new(Gate {
            arrived: watch::channel(0).0,
            open: watch::channel(false).0,
        });
        self.shared.lock().holds.insert(op, gate.clone());
        SimHold {
            op,
            gate,
            shared: self.shared.clone(),
        }
    }

    /// Pauses a running sandbox as the agent's inactivity timer would (`auto_paused`).
    /// Returns whether it was running.
    pub fn auto_pause(&self, id: impl std::fmt::Display) -> bool {
        let mut st = self.shared.lock();
        match st.sandboxes.get_mut(&id.to_string()) {
            Some(sb) if sb.state == SimState::Running => {
                sb.state = SimState::Paused;
                sb.auto_paused = true;
                true
            }
            _ => false,
        }
    }

    /// Resumes a paused sandbox without being asked (as if the answer to a resume never
    /// reached the control plane). Returns whether it was paused.
    pub fn resume_unasked(&self, id: impl std::fmt::Display) -> bool {
        let mut st = self.shared.lock();
        match st.sandboxes.get_mut(&id.to_string()) {
            Some(sb) if sb.state == SimState::Paused => {
                resume(sb);
                true
            }
            _ => false,
        }
    }

    /// A template it stores.
    pub fn template(&self, id: impl std::fmt::Display) -> Option<SimStoredTemplate> {
        self.shared.lock().templates.get(&id.to_string()).cloned()
    }

    /// Ids of the templates it stores.
    pub fn template_ids(&self) -> Vec<String> {
        self.shared.lock().templates.keys().cloned().collect()
    }

    /// Every `CreateTemplate`/`DeleteTemplate` call received, in order (failed ones too).
    pub fn template_log(&self) -> Vec<TemplateCall> {
        self.shared.lock().template_log.clone()
    }

    /// Starts running a sandbox the control plane did not ask for (an orphan).
    pub fn adopt(&self, id: SandboxId, team: impl std::fmt::Display, template: &str) {
        let request = CreateSandboxRequest {
            sandbox_id: id.to_string(),
            team_id: team.to_string(),
            template: template.into(),
            vcpus: 1,
            memory_mb: 512,
            disk_size_mb: 5120,
            ..Default::default()
        };
        let sb = new_sandbox(request);
        self.shared.lock().sandboxes.insert(id.to_string(), sb);
    }

    /// A sandbox it runs.
    pub fn sandbox(&self, id: impl std::fmt::Display) -> Option<SimSandbox> {
        self.shared.lock().sandboxes.get(&id.to_string()).cloned()
    }

    /// Ids of the sandboxes it runs.
    pub fn sandbox_ids(&self) -> Vec<String> {
        self.shared.lock().sandboxes.keys().cloned().collect()
    }

    /// The content of a file inside a sandbox (`None` if either is missing or it is a
    /// directory).
    pub fn file(&self, id: impl std::fmt::Display, path: &str) -> Option<Vec<u8>> {
        let path = normalize(path).ok()?;
        let st = self.shared.lock();
        st.sandboxes
            .get(&id.to_string())?
            .files
            .get(&path)?
            .data
            .clone()
    }

    /// Writes a file inside a sandbox directly (parents created). Returns whether the
    /// sandbox exists and the path could be written.
    pub fn put_file(&self, id: impl std::fmt::Display, path: &str, data: &[u8]) -> bool {
        let Ok(path) = normalize(path) else {
            return false;
        };
        let mut st = self.shared.lock();
        st.sandboxes
            .get_mut(&id.to_string())
            .is_some_and(|sb| write(&mut sb.files, &path, data.to_vec()).is_ok())
    }

    /// How many calls of `op` reached the service (after authentication).
    pub fn calls(&self, op: SimOp) -> u32 {
        self.shared.lock().calls.get(&op).copied().unwrap_or(0)
    }

    /// How many calls were refused for a missing or invalid control-plane token.
    pub fn rejected_calls(&self) -> u32 {
        self.shared.lock().rejected_calls
    }

    /// How many uploads (`WriteFile`) ended with a broken stream, storing nothing.
    pub fn aborted_writes(&self) -> u32 {
        self.shared.lock().aborted_writes
    }

    /// The last `Exec`/`ExecStream` request received.
    pub fn last_exec(&self) -> Option<ExecRequest> {
        self.shared.lock().last_exec.clone()
    }

    /// The last `CreateSandbox` request received.
    pub fn last_create(&self) -> Option<CreateSandboxRequest> {
        self.shared.lock().last_create.clone()
    }

    /// Stops serving and waits for the server to end.
    pub async fn shutdown(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        let _ = (&mut self.server).await;
    }
}

fn authenticate(shared: &Shared, req: Request<()>) -> Result<Request<()>, Status> {
    let mut st = shared.lock();
    let ok = match &st.registered {
        Some(reg) => req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .is_some_and(|token| {
                nestbox_proto::auth::verify(&reg.creds.host_key, reg.creds.host_id, token).is_ok()
            }),
        None => false,
    };
    if ok {
        Ok(req)
    } else {
        st.rejected_calls += 1;
        Err(Status::unauthenticated("invalid control-plane token"))
    }
}

fn new_sandbox(request: CreateSandboxRequest) -> SimSandbox {
    let mut files = BTreeMap::new();
    files.insert("/".to_string(), Node::dir());
    files.insert(HOME.to_string(), Node::dir());
    let now = now_ms();
    SimSandbox {
        request,
        started_at_unix_ms: now,
        state: SimState::Running,
        auto_paused: false,
        last_active_unix_ms: now,
        started_by: "boot".into(),
        egress_version: 0,
        files,
        processes: BTreeMap::new(),
    }
}

fn resume(sb: &mut SimSandbox) {
    sb.state = SimState::Running;
    sb.auto_paused = false;
    sb.started_by = "resume".into();
    sb.last_active_unix_ms = now_ms();
}

fn info(sb: &SimSandbox) -> SandboxInfo {
    let r = &sb.request;
    let state = match sb.state {
        SimState::Running => pb::SandboxState::Running,
        SimState::Paused => pb::SandboxState::Paused,
    };
    SandboxInfo {
        sandbox_id: r.sandbox_id.clone(),
        team_id: r.team_id.clone(),
        state: state as i32,
        template: r.template.clone(),
        vcpus: r.vcpus,
        memory_mb: r.memory_mb,
        disk_size_mb: r.disk_size_mb,
        started_at_unix_ms: sb.started_at_unix_ms,
        guest_agent_version: SIM_VERSION.into(),
        vmm: "sim".into(),
        kernel_version: "sim".into(),
        boot_ms: 1,
        timeout_sec: r.timeout_sec,
        last_active_unix_ms: sb.last_active_unix_ms,
        auto_paused: sb.auto_paused,
        started_by: sb.started_by.clone(),
    }
}

/// A simulated template as a copy's record carries it.
#[derive(serde::Serialize, serde::Deserialize)]
struct SimRecord {
    id: String,
    kind: i32,
    vcpus: u32,
    memory_mb: u32,
    disk_size_mb: u32,
    size_bytes: u64,
    sandbox_id: String,
    /// Path → content (hex; none for a directory).
    files: BTreeMap<String, (Option<String>, i64)>,
    #[serde(default)]
    moved: Option<SimMoved>,
}

impl SimRecord {
    fn of(t: &SimStoredTemplate) -> Self {
        Self {
            id: t.id.clone(),
            kind: t.kind as i32,
            vcpus: t.vcpus,
            memory_mb: t.memory_mb,
            disk_size_mb: t.disk_size_mb,
            size_bytes: t.size_bytes,
            sandbox_id: t.sandbox_id.clone(),
            moved: t.moved.clone(),
            files: t
                .files
                .iter()
                .map(|(p, n)| {
                    (
                        p.clone(),
                        (n.data.as_ref().map(hex::encode), n.modified_unix_ms),
                    )
                })
                .collect(),
        }
    }

    fn template(self) -> Result<SimStoredTemplate, Status> {
        let mut files = BTreeMap::new();
        for (path, (data, modified_unix_ms)) in self.files {
            let data = match data {
                Some(h) => Some(hex::decode(h).map_err(|e| invalid(e.to_string()))?),
                None => None,
            };
            files.insert(
                path,
                Node {
                    data,
                    modified_unix_ms,
                },
            );
        }
        Ok(SimStoredTemplate {
            id: self.id,
            kind: pb::TemplateKind::try_from(self.kind).unwrap_or(pb::TemplateKind::Image),
            vcpus: self.vcpus,
            memory_mb: self.memory_mb,
            disk_size_mb: self.disk_size_mb,
            size_bytes: self.size_bytes,
            sandbox_id: self.sandbox_id,
            stored_at_unix_ms: now_ms(),
            files,
            moved: self.moved,
        })
    }
}

/// The content of a simulated template's one file: bytes derived from its id, with the
/// middle block all zeros.
fn sim_copy_content(id: &str) -> Vec<u8> {
    use sha2::Digest;
    let mut out = Vec::with_capacity(SIM_COPY_FILE_BYTES as usize);
    let mut seed = sha2::Sha256::digest(id.as_bytes()).to_vec();
    while (out.len() as u64) < SIM_COPY_FILE_BYTES {
        seed = sha2::Sha256::digest(&seed).to_vec();
        out.extend_from_slice(&seed);
    }
    out.truncate(SIM_COPY_FILE_BYTES as usize);
    let mid = (2 * SIM_COPY_BLOCK) as usize;
    out[mid..mid + SIM_COPY_BLOCK as usize].fill(0);
    out
}

fn sim_digest(content: &[u8]) -> String {
    use sha2::Digest;
    format!("sim-sha256:{}", hex::encode(sha2::Sha256::digest(content)))
}

fn template_info(t: &SimStoredTemplate) -> TemplateInfo {
    TemplateInfo {
        name: t.id.clone(),
        min_disk_mb: t.disk_size_mb,
        size_bytes: t.size_bytes,
        kind: match t.kind {
            pb::TemplateKind::Snapshot => "snapshot",
            _ => "image",
        }
        .into(),
        template_id: t.id.clone(),
        vcpus: t.vcpus,
        memory_mb: t.memory_mb,
        stored_at_unix_ms: t.stored_at_unix_ms,
    }
}

fn not_running(id: &str) -> Status {
    nestbox_proto::status(
        ErrorCode::SandboxNotRunning,
        format!("sandbox {id} is paused"),
    )
}

fn template_not_found(id: &str) -> Status {
    nestbox_proto::status(
        ErrorCode::TemplateNotFound,
        format!("template {id} is not on this host"),
    )
}

// ------------------------------------------------------------------------------ files

/// The simulated registry `sim.test`: every repository exists (its digest follows the
/// reference; `…/private…` needs the credentials `sim`/`sim`), except `sim.test/missing`.
/// The configuration names the image, runs `/srv` as root and serves with `serve`.
fn sim_image(
    reference: &str,
    creds: Option<&pb::RegistryCredentials>,
) -> Result<pb::ResolveImageResponse, Status> {
    use sha2::Digest as _;
    let (name, _) = reference.split_once('@').unwrap_or((reference, ""));
    let Some(repo) = name.strip_prefix("sim.test/") else {
        return Err(invalid(format!(
            "image {reference}: not fetching from its registry: only sim.test is simulated"
        )));
    };
    let repo = repo.split(':').next().unwrap_or(repo);
    if repo == "missing" {
        return Err(invalid(format!(
            "image {reference}: manifest {repo} not found"
        )));
    }
    if repo.starts_with("private")
        && creds.is_none_or(|c| c.username != "sim" || c.password != "sim")
    {
        return Err(invalid(format!(
            "image {reference}: registry sim.test refused access: it needs credentials"
        )));
    }
    let digest = format!(
        "sha256:{}",
        hex::encode(sha2::Sha256::digest(name.as_bytes()))
    );
    Ok(pb::ResolveImageResponse {
        pinned: format!("{name}@{digest}"),
        digest,
        env: [
            ("IMAGE_NAME".to_string(), name.to_string()),
            ("PATH".into(), "/usr/bin:/bin".into()),
        ]
        .into_iter()
        .collect(),
        workdir: "/srv".into(),
        user: "root".into(),
        entrypoint: vec!["/bin/sh".into(), "-c".into()],
        cmd: vec!["serve".into()],
        layers: 2,
        size_bytes: 10 << 20,
    })
}

fn invalid(message: impl Into<String>) -> Status {
    nestbox_proto::status(ErrorCode::InvalidRequest, message)
}

fn file_not_found(path: &str) -> Status {
    nestbox_proto::status(ErrorCode::FileNotFound, format!("{path}: no such file"))
}

/// An absolute, normalised path (`/`, `/a/b`); relative paths start at [`HOME`].
fn normalize(path: &str) -> Result<String, Status> {
    if path.is_empty() || path.contains('\0') {
        return Err(invalid("path must be non-empty without NUL"));
    }
    let joined = if path.starts_with('/') {
        path.to_string()
    } else {
        format!("{HOME}/{path}")
    };
    let mut parts: Vec<&str> = Vec::new();
    for part in joined.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            p => parts.push(p),
        }
    }
    Ok(format!("/{}", parts.join("/")))
}

fn parent(path: &str) -> Option<&str> {
    if path == "/" {
        return None;
    }
    match path.rfind('/') {
        Some(0) => Some("/"),
        Some(i) => Some(&path[..i]),
        None => None,
    }
}

fn is_child(dir: &str, path: &str) -> bool {
    let rest = if dir == "/" {
        path.strip_prefix('/')
    } else {
        path.strip_prefix(dir).and_then(|r| r.strip_prefix('/'))
    };
    rest.is_some_and(|r| !r.is_empty() && !r.contains('/'))
}

fn is_descendant(dir: &str, path: &str) -> bool {
    path != dir
        && (dir == "/"
            || path
                .strip_prefix(dir)
                .is_some_and(|rest| rest.starts_with('/')))
}

fn entry(path: &str, node: &Node) -> pb::EntryInfo {
    let name = path
        .rsplit('/')
        .next()
        .filter(|n| !n.is_empty())
        .unwrap_or("/");
    let (kind, size, mode, permissions) = match &node.data {
        Some(d) => (pb::FileType::File, d.len() as u64, 0o644, "-rw-r--r--"),
        None => (pb::FileType::Directory, 4096, 0o755, "drwxr-xr-x"),
    };
    pb::EntryInfo {
        name: name.into(),
        path: path.into(),
        r#type: kind as i32,
        size,
        mode,
        permissions: permissions.into(),
        owner: "root".into(),
        group: "root".into(),
        modified_unix_ms: node.modified_unix_ms,
        symlink_target: None,
    }
}

/// Creates `path` and its parents as directories.
fn make_dirs(files: &mut BTreeMap<String, Node>, path: &str) -> Result<(), Status> {
    if let Some(node) = files.get(path) {
        return match node.data {
            None => Ok(()),
            Some(_) => Err(nestbox_proto::status(
                ErrorCode::AlreadyExists,
                format!("{path} exists and is not a directory"),
            )),
        };
    }
    if let Some(p) = parent(path) {
        make_dirs(files, p)?;
    }
    files.insert(path.to_string(), Node::dir());
    Ok(())
}

fn write(files: &mut BTreeMap<String, Node>, path: &str, data: Vec<u8>) -> Result<(), Status> {
    if matches!(files.get(path), Some(n) if n.data.is_none()) {
        return Err(invalid(format!("{path} is a directory")));
    }
    if let Some(p) = parent(path) {
        make_dirs(files, p)?;
    }
    files.insert(path.to_string(), Node::file(data));
    Ok(())
}

fn list(files: &BTreeMap<String, Node>, dir: &str, depth: u32, out: &mut Vec<pb::EntryInfo>) {
    for (path, node) in files.iter().filter(|(p, _)| is_child(dir, p)) {
        out.push(entry(path, node));
        if node.data.is_none() && depth > 1 {
            list(files, path, depth - 1, out);
        }
    }
}

// ---------------------------------------------------------------------------- service

struct Service {
    shared: Shared,
}

impl Service {
    /// Runs `f` on sandbox `id` with the lock held.
    fn with_sandbox<T>(
        &self,
        id: &str,
        f: impl FnOnce(&mut SimSandbox) -> Result<T, Status>,
    ) -> Result<T, Status> {
        let mut st = self.shared.lock();
        let sb = st.sandboxes.get_mut(id).ok_or_else(|| not_found(id))?;
        f(sb)
    }

    /// Runs `f` on sandbox `id`, which must be running, with the lock held.
    fn with_running<T>(
        &self,
        id: &str,
        f: impl FnOnce(&mut SimSandbox) -> Result<T, Status>,
    ) -> Result<T, Status> {
        self.with_sandbox(id, |sb| match sb.state {
            SimState::Running => f(sb),
            SimState::Paused => Err(not_running(id)),
        })
    }

    /// Runs `f` on a running sandbox's process named by `selector`.
    fn with_process<T>(
        &self,
        id: &str,
        selector: Option<&pb::ProcessSelector>,
        f: impl FnOnce(&mut SimSandbox, u32) -> Result<T, Status>,
    ) -> Result<T, Status> {
        use pb::process_selector::Selector;
        self.with_running(id, |sb| {
            let pid = match selector.and_then(|s| s.selector.as_ref()) {
                Some(Selector::Pid(pid)) => sb.processes.contains_key(pid).then_some(*pid),
                Some(Selector::Tag(tag)) => sb
                    .processes
                    .values()
                    .find(|p| &p.info.tag == tag)
                    .map(|p| p.info.pid),
                None => return Err(invalid("no process selector")),
            };
            let pid = pid.ok_or_else(|| {
                nestbox_proto::status(ErrorCode::ProcessNotFound, "no such process")
            })?;
            f(sb, pid)
        })
    }

    fn log(&self, call: TemplateCall) {
        self.shared.lock().template_log.push(call);
    }

    /// What a simulated command prints and returns.
    fn run(&self, req: &ExecRequest) -> Result<(u32, Vec<u8>, Vec<u8>, i32), Status> {
        let mut st = self.shared.lock();
        st.last_exec = Some(req.clone());
        let sandbox = st
            .sandboxes
            .get(&req.sandbox_id)
            .ok_or_else(|| not_found(&req.sandbox_id))?;
        if sandbox.state != SimState::Running {
            return Err(not_running(&req.sandbox_id));
        }
        let sandbox_env = sandbox.env();
        st.next_pid += 1;
        let pid = st.next_pid;
        drop(st);
        if req.cmd.is_empty() {
            return Err(invalid("cmd is empty"));
        }
        let mut env = sandbox_env;
        env.extend(req.env.clone());
        let stdout = match env.get(STDOUT_HEX_ENV) {
            Some(h) => hex::decode(h).map_err(|_| invalid(format!("{STDOUT_HEX_ENV}: not hex")))?,
            None => {
                let mut argv = vec![req.cmd.clone()];
                argv.extend(req.args.iter().cloned());
                let mut out = format!("{}\n", argv.join(" ")).into_bytes();
                out.extend_from_slice(&req.stdin);
                out
            }
        };
        let stderr: String = env.iter().map(|(k, v)| format!("{k}={v}\n")).collect();
        let exit_code = env
            .get(EXIT_CODE_ENV)
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        Ok((pid, stdout, stderr.into_bytes(), exit_code))
    }
}

type EventStream = Pin<Box<dyn tokio_stream::Stream<Item = Result<ExecEvent, Status>> + Send>>;
type ProcessStream =
    Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::ProcessEvent, Status>> + Send>>;
type WatchStream =
    Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::WatchDirEvent, Status>> + Send>>;
type ReadStream =
    Pin<Box<dyn tokio_stream::Stream<Item = Result<ReadFileResponse, Status>> + Send>>;

#[tonic::async_trait]
impl HostAgent for Service {
    async fn ping(&self, _: Request<PingRequest>) -> Result<Response<PingResponse>, Status> {
        self.shared.enter(SimOp::Ping).await?;
        let st = self.shared.lock();
        Ok(Response::new(PingResponse {
            host_id: st
                .registered
                .as_ref()
                .map(|r| r.creds.host_id.to_string())
                .unwrap_or_default(),
            version: SIM_VERSION.into(),
            capacity: Some(pb::HostCapacity {
                vcpus: st.cfg.vcpus,
                memory_mb: st.cfg.memory_mb,
                disk_mb: st.cfg.disk_mb,
                max_sandboxes: st.max_sandboxes,
            }),
            sandboxes: u32::try_from(st.sandboxes.len()).unwrap_or(u32::MAX),
            templates: st.cfg.templates.iter().map(|t| t.name.clone()).collect(),
            vmm: "sim".into(),
            template_infos: st
                .cfg
                .templates
                .iter()
                .map(|t| TemplateInfo {
                    name: t.name.clone(),
                    min_disk_mb: t.min_disk_mb,
                    size_bytes: t.size_bytes,
                    kind: t.kind.clone(),
                    ..Default::default()
                })
                .chain(
                    st.templates
                        .values()
                        .filter(|t| t.moved.is_none())
                        .map(template_info),
                )
                .collect(),
        }))
    }

    async fn create_sandbox(
        &self,
        request: Request<CreateSandboxRequest>,
    ) -> Result<Response<CreateSandboxResponse>, Status> {
        self.shared.enter(SimOp::Create).await?;
        let req = request.into_inner();
        req.sandbox_id
            .parse::<SandboxId>()
            .map_err(|e| invalid(e.to_string()))?;
        let mut st = self.shared.lock();
        st.last_create = Some(req.clone());
        let (min_disk_mb, from) = if req.template_id.is_empty() {
            let template = st
                .cfg
                .templates
                .iter()
                .find(|t| t.name == req.template)
                .ok_or_else(|| {
                    nestbox_proto::status(
                        ErrorCode::TemplateNotFound,
                        format!("template `{}` is not on this host", req.template),
                    )
                })?;
            (template.min_disk_mb, None)
        } else {
            let template = st
                .templates
                .get(&req.template_id)
                .ok_or_else(|| template_not_found(&req.template_id))?;
            if template.kind == pb::TemplateKind::Snapshot
                && (req.vcpus, req.memory_mb) != (template.vcpus, template.memory_mb)
            {
                return Err(invalid(format!(
                    "a sandbox from snapshot {} has {} vCPUs and {} MiB",
                    template.id, template.vcpus, template.memory_mb
                )));
            }
            (template.disk_size_mb, Some(template.clone()))
        };
        if req.disk_size_mb < min_disk_mb {
            return Err(invalid(format!(
                "disk_size_mb must be at least {min_disk_mb}"
            )));
        }
        if st.sandboxes.contains_key(&req.sandbox_id) {
            return Err(nestbox_proto::status(
                ErrorCode::AlreadyExists,
                format!("sandbox {} already exists", req.sandbox_id),
            ));
        }
        if st.sandboxes.len() >= st.max_sandboxes as usize {
            return Err(nestbox_proto::status(
                ErrorCode::NoCapacity,
                format!("this host runs {} sandboxes already", st.sandboxes.len()),
            ));
        }
        let mut sb = new_sandbox(req);
        if let Some(template) = from {
            sb.files = template.files;
            if template.kind == pb::TemplateKind::Snapshot {
                sb.started_by = "restore".into();
            }
        }
        let out = info(&sb);
        st.sandboxes.insert(out.sandbox_id.clone(), sb);
        Ok(Response::new(CreateSandboxResponse { sandbox: Some(out) }))
    }

    async fn destroy_sandbox(
        &self,
        request: Request<DestroySandboxRequest>,
    ) -> Result<Response<DestroySandboxResponse>, Status> {
        self.shared.enter(SimOp::Destroy).await?;
        let id = request.into_inner().sandbox_id;
        let mut st = self.shared.lock();
        match st.sandboxes.remove(&id) {
            Some(sb) => {
                let day = sim_metrics(&sb, pb::MetricsRange::Day);
                st.retired_metrics.insert(id, day);
                Ok(Response::new(DestroySandboxResponse {}))
            }
            None => Err(not_found(&id)),
        }
    }

    async fn get_sandbox(
        &self,
        request: Request<GetSandboxRequest>,
    ) -> Result<Response<SandboxInfo>, Status> {
        self.shared.enter(SimOp::Get).await?;
        let id = request.into_inner().sandbox_id;
        self.with_sandbox(&id, |sb| Ok(Response::new(info(sb))))
    }

    async fn list_sandboxes(
        &self,
        _: Request<ListSandboxesRequest>,
    ) -> Result<Response<ListSandboxesResponse>, Status> {
        self.shared.enter(SimOp::List).await?;
        let st = self.shared.lock();
        Ok(Response::new(ListSandboxesResponse {
            sandboxes: st.sandboxes.values().map(info).collect(),
        }))
    }

    async fn exec(&self, request: Request<ExecRequest>) -> Result<Response<ExecResponse>, Status> {
        self.shared.enter(SimOp::Exec).await?;
        let (pid, stdout, stderr, exit_code) = self.run(request.get_ref())?;
        Ok(Response::new(ExecResponse {
            stdout,
            stderr,
            exit_code,
            duration_ms: 1,
            timed_out: false,
            stdout_truncated: false,
            stderr_truncated: false,
            pid,
        }))
    }

    type ExecStreamStream = EventStream;

    async fn exec_stream(
        &self,
        request: Request<ExecRequest>,
    ) -> Result<Response<EventStream>, Status> {
        self.shared.enter(SimOp::ExecStream).await?;
        let (pid, stdout, stderr, exit_code) = self.run(request.get_ref())?;
        let event = |e: exec_event::Event| Ok(ExecEvent { event: Some(e) });
        let mut events = vec![event(exec_event::Event::Started(pb::ExecStarted { pid }))];
        events.extend(
            stdout
                .split_inclusive(|b| *b == b'\n')
                .map(|line| event(exec_event::Event::Stdout(line.to_vec()))),
        );
        if !stderr.is_empty() {
            events.push(event(exec_event::Event::Stderr(stderr)));
        }
        events.push(event(exec_event::Event::Exited(pb::ExecExited {
            exit_code,
            duration_ms: 1,
            timed_out: false,
        })));
        Ok(Response::new(Box::pin(tokio_stream::iter(events))))
    }

    async fn start_process(
        &self,
        request: Request<pb::StartProcessRequest>,
    ) -> Result<Response<pb::ProcessInfo>, Status> {
        let r = request.into_inner();
        if r.cmd.is_empty() {
            return Err(invalid("cmd is empty"));
        }
        let pid = {
            let mut st = self.shared.lock();
            st.next_pid += 1;
            st.next_pid
        };
        let info = pb::ProcessInfo {
            pid,
            tag: r.tag.clone(),
            cmd: r.cmd,
            args: r.args,
            env: r.env,
            cwd: r.cwd,
        };
        self.with_running(&r.sandbox_id, |sb| {
            if !r.tag.is_empty() && sb.processes.values().any(|p| p.info.tag == r.tag) {
                return Err(nestbox_proto::status(
                    ErrorCode::AlreadyExists,
                    format!("tag {:?} is taken", r.tag),
                ));
            }
            sb.processes.insert(
                pid,
                SimProcess {
                    info: info.clone(),
                    stdin: Vec::new(),
                },
            );
            Ok(())
        })?;
        Ok(Response::new(info))
    }

    async fn list_processes(
        &self,
        request: Request<pb::ListProcessesRequest>,
    ) -> Result<Response<pb::ListProcessesResponse>, Status> {
        let r = request.into_inner();
        let processes = self.with_running(&r.sandbox_id, |sb| {
            Ok(sb.processes.values().map(|p| p.info.clone()).collect())
        })?;
        Ok(Response::new(pb::ListProcessesResponse { processes }))
    }

    type ConnectProcessStream = ProcessStream;

    async fn connect_process(
        &self,
        request: Request<pb::ConnectProcessRequest>,
    ) -> Result<Response<ProcessStream>, Status> {
        let r = request.into_inner();
        // The started event, then what the process was sent on stdin, as its output.
        let events = self.with_process(&r.sandbox_id, r.process.as_ref(), |sb, pid| {
            let mut events = vec![Ok(pb::ProcessEvent {
                event: Some(pb::process_event::Event::Started(pb::ExecStarted { pid })),
            })];
            let stdin = sb.processes.get(&pid).map(|p| p.stdin.clone());
            if let Some(data) = stdin.filter(|d| !d.is_empty()) {
                events.push(Ok(pb::ProcessEvent {
                    event: Some(pb::process_event::Event::Stdout(data)),
                }));
            }
            Ok(events)
        })?;
        Ok(Response::new(Box::pin(tokio_stream::iter(events))))
    }

    async fn send_process_input(
        &self,
        request: Request<pb::SendProcessInputRequest>,
    ) -> Result<Response<pb::SendProcessInputResponse>, Status> {
        let r = request.into_inner();
        self.with_process(&r.sandbox_id, r.process.as_ref(), |sb, pid| {
            if let Some(p) = sb.processes.get_mut(&pid) {
                p.stdin.extend_from_slice(&r.data);
            }
            Ok(())
        })?;
        Ok(Response::new(pb::SendProcessInputResponse {}))
    }

    async fn close_process_stdin(
        &self,
        request: Request<pb::CloseProcessStdinRequest>,
    ) -> Result<Response<pb::CloseProcessStdinResponse>, Status> {
        let r = request.into_inner();
        self.with_process(&r.sandbox_id, r.process.as_ref(), |_, _| Ok(()))?;
        Ok(Response::new(pb::CloseProcessStdinResponse {}))
    }

    async fn signal_process(
        &self,
        request: Request<pb::SignalProcessRequest>,
    ) -> Result<Response<pb::SignalProcessResponse>, Status> {
        let r = request.into_inner();
        if !matches!(r.signal, 9 | 15) {
            return Err(invalid("unsupported signal"));
        }
        // Every signal ends a simulated process.
        self.with_process(&r.sandbox_id, r.process.as_ref(), |sb, pid| {
            sb.processes.remove(&pid);
            Ok(())
        })?;
        Ok(Response::new(pb::SignalProcessResponse {}))
    }

    async fn resize_terminal(
        &self,
        request: Request<pb::ResizeTerminalRequest>,
    ) -> Result<Response<pb::ResizeTerminalResponse>, Status> {
        let r = request.into_inner();
        self.with_process(&r.sandbox_id, r.process.as_ref(), |_, _| Ok(()))?;
        Ok(Response::new(pb::ResizeTerminalResponse {}))
    }

    type WatchDirStream = WatchStream;

    async fn watch_dir(
        &self,
        request: Request<pb::WatchDirRequest>,
    ) -> Result<Response<WatchStream>, Status> {
        let r = request.into_inner();
        let path = normalize(&r.path)?;
        self.with_running(&r.sandbox_id, |sb| match sb.files.get(&path) {
            Some(node) if node.data.is_none() => Ok(()),
            Some(_) => Err(invalid(format!("{path} is not a directory"))),
            None => Err(file_not_found(&path)),
        })?;
        // Started, then nothing: a simulated sandbox's files change only through the API.
        let started = Ok(pb::WatchDirEvent {
            started: true,
            r#type: 0,
            name: String::new(),
        });
        Ok(Response::new(Box::pin(tokio_stream::iter([started]))))
    }

    async fn write_file(
        &self,
        request: Request<Streaming<WriteFileRequest>>,
    ) -> Result<Response<WriteFileResponse>, Status> {
        self.shared.enter(SimOp::WriteFile).await?;
        let mut stream = request.into_inner();
        let header = match stream.message().await? {
            Some(WriteFileRequest {
                part: Some(write_file_request::Part::Header(h)),
            }) => h,
            _ => return Err(invalid("the first message must be a header")),
        };
        let path = normalize(&header.path)?;
        self.with_running(&header.sandbox_id, |_| Ok(()))?;
        let mut data = Vec::new();
        // Keep the file only when the stream carries its commit: anything else is an abort.
        loop {
            match stream.message().await {
                Ok(Some(WriteFileRequest {
                    part: Some(write_file_request::Part::Chunk(c)),
                })) => data.extend_from_slice(&c),
                Ok(Some(WriteFileRequest {
                    part: Some(write_file_request::Part::Commit(commit)),
                })) if commit.total_bytes == data.len() as u64 => break,
                Ok(Some(_)) => {
                    self.shared.lock().aborted_writes += 1;
                    return Err(invalid(
                        "only data chunks and a matching commit may follow the header",
                    ));
                }
                Ok(None) => {
                    self.shared.lock().aborted_writes += 1;
                    return Err(Status::aborted("the upload ended without a commit"));
                }
                Err(status) => {
                    self.shared.lock().aborted_writes += 1;
                    return Err(status);
                }
            }
        }
        let written = data.len() as u64;
        self.with_running(&header.sandbox_id, |sb| {
            write(&mut sb.files, &path, data)?;
            let node = sb.files.get(&path).ok_or_else(|| file_not_found(&path))?;
            Ok(Response::new(WriteFileResponse {
                entry: Some(entry(&path, node)),
                bytes_written: written,
            }))
        })
    }

    type ReadFileStream = ReadStream;

    async fn read_file(
        &self,
        request: Request<ReadFileRequest>,
    ) -> Result<Response<ReadStream>, Status> {
        self.shared.enter(SimOp::ReadFile).await?;
        let req = request.into_inner();
        let path = normalize(&req.path)?;
        let (info, data) = self.with_running(&req.sandbox_id, |sb| {
            let node = sb.files.get(&path).ok_or_else(|| file_not_found(&path))?;
            let data = node
                .data
                .clone()
                .ok_or_else(|| invalid(format!("{path} is a directory")))?;
            Ok((entry(&path, node), data))
        })?;
        let mut parts = vec![Ok(ReadFileResponse {
            part: Some(read_file_response::Part::Header(pb::ReadFileHeader {
                entry: Some(info),
            })),
        })];
        parts.extend(data.chunks(READ_CHUNK).map(|c| {
            Ok(ReadFileResponse {
                part: Some(read_file_response::Part::Chunk(c.to_vec())),
            })
        }));
        Ok(Response::new(Box::pin(tokio_stream::iter(parts))))
    }

    async fn list_dir(
        &self,
        request: Request<ListDirRequest>,
    ) -> Result<Response<ListDirResponse>, Status> {
        self.shared.enter(SimOp::ListDir).await?;
        let req = request.into_inner();
        let path = normalize(&req.path)?;
        self.with_running(&req.sandbox_id, |sb| {
            let node = sb.files.get(&path).ok_or_else(|| file_not_found(&path))?;
            if node.data.is_some() {
                return Err(invalid(format!("{path} is not a directory")));
            }
            let mut entries = Vec::new();
            list(&sb.files, &path, req.depth.max(1), &mut entries);
            Ok(Response::new(ListDirResponse { entries }))
        })
    }

    async fn stat(&self, request: Request<StatRequest>) -> Result<Response<StatResponse>, Status> {
        self.shared.enter(SimOp::Stat).await?;
        let req = request.into_inner();
        let path = normalize(&req.path)?;
        self.with_running(&req.sandbox_id, |sb| {
            let node = sb.files.get(&path).ok_or_else(|| file_not_found(&path))?;
            Ok(Response::new(StatResponse {
                entry: Some(entry(&path, node)),
            }))
        })
    }

    async fn make_dir(
        &self,
        request: Request<MakeDirRequest>,
    ) -> Result<Response<MakeDirResponse>, Status> {
        self.shared.enter(SimOp::MakeDir).await?;
        let req = request.into_inner();
        let path = normalize(&req.path)?;
        self.with_running(&req.sandbox_id, |sb| {
            make_dirs(&mut sb.files, &path)?;
            let node = sb.files.get(&path).ok_or_else(|| file_not_found(&path))?;
            Ok(Response::new(MakeDirResponse {
                entry: Some(entry(&path, node)),
            }))
        })
    }

    async fn remove(
        &self,
        request: Request<RemoveRequest>,
    ) -> Result<Response<RemoveResponse>, Status> {
        self.shared.enter(SimOp::Remove).await?;
        let req = request.into_inner();
        let path = normalize(&req.path)?;
        if path == "/" {
            return Err(invalid("cannot remove /"));
        }
        self.with_running(&req.sandbox_id, |sb| {
            if sb.files.remove(&path).is_none() {
                return Err(file_not_found(&path));
            }
            sb.files.retain(|p, _| !is_descendant(&path, p));
            Ok(Response::new(RemoveResponse {}))
        })
    }

    async fn pause_sandbox(
        &self,
        request: Request<PauseSandboxRequest>,
    ) -> Result<Response<SandboxInfo>, Status> {
        self.shared.enter(SimOp::PauseSandbox).await?;
        let id = request.into_inner().sandbox_id;
        self.with_running(&id, |sb| {
            sb.state = SimState::Paused;
            sb.auto_paused = false;
            Ok(Response::new(info(sb)))
        })
    }

    async fn resume_sandbox(
        &self,
        request: Request<ResumeSandboxRequest>,
    ) -> Result<Response<SandboxInfo>, Status> {
        self.shared.enter(SimOp::ResumeSandbox).await?;
        let id = request.into_inner().sandbox_id;
        self.with_sandbox(&id, |sb| match sb.state {
            SimState::Paused => {
                resume(sb);
                Ok(Response::new(info(sb)))
            }
            SimState::Running => Err(nestbox_proto::status(
                ErrorCode::Conflict,
                format!("sandbox {id} is not paused"),
            )),
        })
    }

    async fn ping_sandbox(
        &self,
        request: Request<PingSandboxRequest>,
    ) -> Result<Response<PingSandboxResponse>, Status> {
        self.shared.enter(SimOp::PingSandbox).await?;
        let id = request.into_inner().sandbox_id;
        self.with_running(&id, |sb| {
            sb.last_active_unix_ms = now_ms();
            Ok(Response::new(PingSandboxResponse {}))
        })
    }

    async fn set_egress(
        &self,
        request: Request<pb::SetEgressRequest>,
    ) -> Result<Response<pb::SetEgressResponse>, Status> {
        self.shared.enter(SimOp::SetEgress).await?;
        let req = request.into_inner();
        // As the real agent: a change no newer than the one in force changes nothing.
        self.with_sandbox(&req.sandbox_id, |sb| {
            if req.version == 0 || req.version > sb.egress_version {
                sb.request.egress = req.egress;
                if req.version != 0 {
                    sb.egress_version = req.version;
                }
            }
            Ok(Response::new(pb::SetEgressResponse {}))
        })
    }

    async fn rotate_sandbox_token(
        &self,
        request: Request<pb::RotateSandboxTokenRequest>,
    ) -> Result<Response<pb::RotateSandboxTokenResponse>, Status> {
        self.shared.enter(SimOp::RotateToken).await?;
        let req = request.into_inner();
        if req.access_token.len() < 16 {
            return Err(invalid("access_token must be at least 16 characters"));
        }
        // As the real agent: a running guest takes it now, a paused one when it resumes
        // (the sim keeps no guest, so both just hold it).
        self.with_sandbox(&req.sandbox_id, |sb| {
            sb.request.access_token = req.access_token;
            Ok(Response::new(pb::RotateSandboxTokenResponse {}))
        })
    }

    async fn create_template(
        &self,
        request: Request<CreateTemplateRequest>,
    ) -> Result<Response<CreateTemplateResponse>, Status> {
        let req = request.into_inner();
        self.log(TemplateCall::Create {
            template_id: req.template_id.clone(),
            sandbox_id: req.sandbox_id.clone(),
        });
        self.shared.enter(SimOp::CreateTemplate).await?;
        req.template_id
            .parse::<TemplateId>()
            .map_err(|e| invalid(e.to_string()))?;
        let kind = match pb::TemplateKind::try_from(req.kind) {
            Ok(k @ (pb::TemplateKind::Image | pb::TemplateKind::Snapshot)) => k,
            _ => return Err(invalid("kind must be image or snapshot")),
        };
        let mut st = self.shared.lock();
        if st.templates.contains_key(&req.template_id) {
            return Err(nestbox_proto::status(
                ErrorCode::AlreadyExists,
                format!("template {} already exists", req.template_id),
            ));
        }
        let sb = st
            .sandboxes
            .get(&req.sandbox_id)
            .ok_or_else(|| not_found(&req.sandbox_id))?;
        // Deterministic: a 64 MiB base image, the files written into it, and the memory of a
        // snapshot.
        let files: u64 = sb
            .files
            .values()
            .filter_map(|n| n.data.as_ref())
            .map(|d| d.len() as u64)
            .sum();
        let memory = match kind {
            pb::TemplateKind::Snapshot => u64::from(sb.request.memory_mb) << 20,
            _ => 0,
        };
        let template = SimStoredTemplate {
            id: req.template_id.clone(),
            kind,
            vcpus: sb.request.vcpus,
            memory_mb: sb.request.memory_mb,
            disk_size_mb: sb.request.disk_size_mb,
            size_bytes: (64 << 20) + files + memory,
            sandbox_id: req.sandbox_id.clone(),
            stored_at_unix_ms: now_ms(),
            files: sb.files.clone(),
            moved: None,
        };
        let out = template_info(&template);
        st.templates.insert(template.id.clone(), template);
        Ok(Response::new(CreateTemplateResponse {
            template: Some(out),
        }))
    }

    async fn delete_template(
        &self,
        request: Request<DeleteTemplateRequest>,
    ) -> Result<Response<DeleteTemplateResponse>, Status> {
        let id = request.into_inner().template_id;
        self.log(TemplateCall::Delete {
            template_id: id.clone(),
        });
        self.shared.enter(SimOp::DeleteTemplate).await?;
        match self.shared.lock().templates.remove(&id) {
            Some(_) => Ok(Response::new(DeleteTemplateResponse {})),
            None => Err(template_not_found(&id)),
        }
    }

    async fn resolve_image(
        &self,
        request: Request<pb::ResolveImageRequest>,
    ) -> Result<Response<pb::ResolveImageResponse>, Status> {
        let r = request.into_inner();
        sim_image(&r.reference, r.credentials.as_ref()).map(Response::new)
    }

    async fn import_image(
        &self,
        request: Request<pb::ImportImageRequest>,
    ) -> Result<Response<CreateTemplateResponse>, Status> {
        let r = request.into_inner();
        self.shared.enter(SimOp::ImportImage).await?;
        sim_image(&r.reference, r.credentials.as_ref())?;
        r.template_id
            .parse::<TemplateId>()
            .map_err(|e| invalid(e.to_string()))?;
        let mut st = self.shared.lock();
        if st.templates.contains_key(&r.template_id) {
            return Err(nestbox_proto::status(
                ErrorCode::AlreadyExists,
                format!("template {} already exists", r.template_id),
            ));
        }
        let template = SimStoredTemplate {
            id: r.template_id.clone(),
            kind: pb::TemplateKind::Image,
            vcpus: 1,
            memory_mb: 512,
            disk_size_mb: 512,
            size_bytes: 32 << 20,
            sandbox_id: String::new(),
            stored_at_unix_ms: now_ms(),
            files: BTreeMap::new(),
            moved: None,
        };
        let out = template_info(&template);
        st.templates.insert(template.id.clone(), template);
        Ok(Response::new(CreateTemplateResponse {
            template: Some(out),
        }))
    }

    async fn export_sandbox(
        &self,
        request: Request<pb::ExportSandboxRequest>,
    ) -> Result<Response<CreateTemplateResponse>, Status> {
        self.shared.enter(SimOp::ExportSandbox).await?;
        let req = request.into_inner();
        req.export_id
            .parse::<TemplateId>()
            .map_err(|e| invalid(e.to_string()))?;
        let mut st = self.shared.lock();
        if let Some(t) = st.templates.get(&req.export_id) {
            return match &t.moved {
                Some(m) if m.sandbox_id().as_deref() == Some(req.sandbox_id.as_str()) => {
                    Ok(Response::new(CreateTemplateResponse {
                        template: Some(template_info(t)),
                    }))
                }
                _ => Err(invalid(format!("{} already exists", req.export_id))),
            };
        }
        let sb = st
            .sandboxes
            .get(&req.sandbox_id)
            .ok_or_else(|| not_found(&req.sandbox_id))?;
        if sb.state != SimState::Paused {
            return Err(nestbox_proto::status(
                ErrorCode::SandboxNotRunning,
                format!("sandbox {} is running", req.sandbox_id),
            ));
        }
        let package = SimStoredTemplate {
            id: req.export_id.clone(),
            kind: pb::TemplateKind::Snapshot,
            vcpus: sb.request.vcpus,
            memory_mb: sb.request.memory_mb,
            disk_size_mb: sb.request.disk_size_mb,
            size_bytes: (64 << 20) + (u64::from(sb.request.memory_mb) << 20),
            sandbox_id: req.sandbox_id.clone(),
            stored_at_unix_ms: now_ms(),
            files: sb.files.clone(),
            moved: Some(SimMoved::of(sb)),
        };
        let out = template_info(&package);
        st.templates.insert(req.export_id, package);
        Ok(Response::new(CreateTemplateResponse {
            template: Some(out),
        }))
    }

    async fn adopt_sandbox(
        &self,
        request: Request<pb::AdoptSandboxRequest>,
    ) -> Result<Response<SandboxInfo>, Status> {
        self.shared.enter(SimOp::AdoptSandbox).await?;
        let req = request.into_inner();
        let mut st = self.shared.lock();
        if st.sandboxes.contains_key(&req.sandbox_id) {
            return Err(nestbox_proto::status(
                ErrorCode::AlreadyExists,
                format!("sandbox {} exists", req.sandbox_id),
            ));
        }
        let package = st
            .templates
            .get(&req.export_id)
            .ok_or_else(|| template_not_found(&req.export_id))?;
        let moved = match &package.moved {
            Some(m) if m.sandbox_id().as_deref() == Some(req.sandbox_id.as_str()) => m,
            _ => {
                return Err(invalid(format!(
                    "{} is not a move package of {}",
                    req.export_id, req.sandbox_id
                )));
            }
        };
        let mut sb = moved.sandbox(package.files.clone())?;
        sb.request.team_id = req.team_id;
        sb.request.template = req.template;
        sb.request.template_id = req.template_id;
        sb.request.timeout_sec = req.timeout_sec;
        sb.request.egress = req.egress;
        sb.egress_version = req.egress_version;
        let out = info(&sb);
        st.templates.remove(&req.export_id);
        st.sandboxes.insert(req.sandbox_id, sb);
        Ok(Response::new(out))
    }

    async fn get_template_manifest(
        &self,
        request: Request<pb::GetTemplateManifestRequest>,
    ) -> Result<Response<pb::TemplateManifest>, Status> {
        self.shared.enter(SimOp::TemplateManifest).await?;
        let id = request.into_inner().template_id;
        let st = self.shared.lock();
        let t = st
            .templates
            .get(&id)
            .ok_or_else(|| template_not_found(&id))?;
        let content = sim_copy_content(&id);
        let record = serde_json::to_vec(&SimRecord::of(t)).map_err(|e| invalid(e.to_string()))?;
        Ok(Response::new(pb::TemplateManifest {
            template_id: id,
            record,
            files: vec![pb::TemplateFile {
                name: SIM_COPY_FILE.into(),
                size: SIM_COPY_FILE_BYTES,
                data_bytes: SIM_COPY_FILE_BYTES - SIM_COPY_BLOCK,
                digest: sim_digest(&content),
            }],
        }))
    }

    type ReadTemplateFileStream =
        Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::FileBlock, Status>> + Send>>;

    async fn read_template_file(
        &self,
        request: Request<pb::ReadTemplateFileRequest>,
    ) -> Result<Response<Self::ReadTemplateFileStream>, Status> {
        let req = request.into_inner();
        let cut = self.shared.enter(SimOp::ReadTemplateFile).await.err();
        if !self.shared.lock().templates.contains_key(&req.template_id) {
            return Err(template_not_found(&req.template_id));
        }
        if req.name != SIM_COPY_FILE
            || !req.offset.is_multiple_of(SIM_COPY_BLOCK)
            || req.offset > SIM_COPY_FILE_BYTES
        {
            return Err(invalid("no such file or offset"));
        }
        let content = sim_copy_content(&req.template_id);
        let block = |offset: u64, data: Vec<u8>| pb::FileBlock {
            template_id: req.template_id.clone(),
            name: req.name.clone(),
            offset,
            data,
        };
        let mut out = Vec::new();
        if req.offset < SIM_COPY_FILE_BYTES {
            out.push(Ok(block(req.offset, Vec::new())));
        }
        let mut at = req.offset;
        let mut sent = 0;
        while at < SIM_COPY_FILE_BYTES {
            let data = &content[at as usize..(at + SIM_COPY_BLOCK) as usize];
            if data.iter().any(|b| *b != 0) {
                if let Some(status) = &cut
                    && sent == 1
                {
                    out.push(Err(status.clone()));
                    break;
                }
                out.push(Ok(block(at, data.to_vec())));
                sent += 1;
            }
            at += SIM_COPY_BLOCK;
        }
        if at >= SIM_COPY_FILE_BYTES {
            out.push(Ok(block(SIM_COPY_FILE_BYTES, Vec::new())));
        }
        Ok(Response::new(Box::pin(tokio_stream::iter(out))))
    }

    async fn begin_template_import(
        &self,
        request: Request<pb::TemplateManifest>,
    ) -> Result<Response<pb::BeginTemplateImportResponse>, Status> {
        self.shared.enter(SimOp::BeginImport).await?;
        let m = request.into_inner();
        if m.files.len() != 1 || m.files[0].name != SIM_COPY_FILE {
            return Err(invalid("a simulated copy carries one file"));
        }
        let mut st = self.shared.lock();
        if st.templates.contains_key(&m.template_id) {
            return Ok(Response::new(pb::BeginTemplateImportResponse {
                resume_at: vec![m.files[0].size],
                present: true,
            }));
        }
        let size = m.files[0].size;
        let at = match st.imports.get(&m.template_id) {
            Some((same, _, at)) if *same == m => *at,
            _ => {
                st.imports.insert(
                    m.template_id.clone(),
                    (m.clone(), vec![0; size as usize], 0),
                );
                0
            }
        };
        Ok(Response::new(pb::BeginTemplateImportResponse {
            resume_at: vec![at],
            present: false,
        }))
    }

    async fn write_template_file(
        &self,
        request: Request<Streaming<pb::FileBlock>>,
    ) -> Result<Response<pb::WriteTemplateFileResponse>, Status> {
        self.shared.enter(SimOp::WriteTemplateFile).await?;
        let mut stream = request.into_inner();
        let mut first = true;
        let mut id = String::new();
        // A broken stream ends the write where it stands.
        while let Ok(Some(b)) = stream.message().await {
            let mut st = self.shared.lock();
            let (_, content, at) = st
                .imports
                .get_mut(&b.template_id)
                .ok_or_else(|| invalid("no copy of this template is under way"))?;
            if first && b.offset != *at {
                return Err(invalid(format!(
                    "the copy stands at {at}, not {}",
                    b.offset
                )));
            }
            if b.offset < *at || b.offset as usize + b.data.len() > content.len() {
                return Err(invalid("block out of order or out of the file"));
            }
            first = false;
            id = b.template_id.clone();
            content[b.offset as usize..b.offset as usize + b.data.len()].copy_from_slice(&b.data);
            *at = if b.data.is_empty() {
                b.offset
            } else {
                b.offset + b.data.len() as u64
            };
        }
        let at = self.shared.lock().imports.get(&id).map_or(0, |i| i.2);
        Ok(Response::new(pb::WriteTemplateFileResponse {
            next_offset: at,
        }))
    }

    async fn commit_template_import(
        &self,
        request: Request<pb::CommitTemplateImportRequest>,
    ) -> Result<Response<CreateTemplateResponse>, Status> {
        self.shared.enter(SimOp::CommitImport).await?;
        let id = request.into_inner().template_id;
        let mut st = self.shared.lock();
        if let Some(t) = st.templates.get(&id) {
            return Ok(Response::new(CreateTemplateResponse {
                template: Some(template_info(t)),
            }));
        }
        let (m, content, at) = st
            .imports
            .remove(&id)
            .ok_or_else(|| invalid("no copy of this template is under way"))?;
        if at < m.files[0].size || sim_digest(&content) != m.files[0].digest {
            st.imports.insert(id, (m, vec![0; content.len()], 0));
            return Err(nestbox_proto::status(
                ErrorCode::Internal,
                "the copy is incomplete or damaged; copy it again",
            ));
        }
        let record: SimRecord =
            serde_json::from_slice(&m.record).map_err(|e| invalid(e.to_string()))?;
        let template = record.template()?;
        let out = template_info(&template);
        st.templates.insert(id.clone(), template);
        st.template_log
            .push(TemplateCall::Import { template_id: id });
        Ok(Response::new(CreateTemplateResponse {
            template: Some(out),
        }))
    }

    async fn get_sandbox_metrics(
        &self,
        request: Request<pb::GetSandboxMetricsRequest>,
    ) -> Result<Response<pb::GetSandboxMetricsResponse>, Status> {
        self.shared.enter(SimOp::GetSandboxMetrics).await?;
        let req = request.into_inner();
        let range = match pb::MetricsRange::try_from(req.range) {
            Ok(
                r @ (pb::MetricsRange::TenMinutes
                | pb::MetricsRange::TwoHours
                | pb::MetricsRange::Day),
            ) => r,
            _ => return Err(invalid("range must be set")),
        };
        self.with_sandbox(&req.sandbox_id, |sb| {
            Ok(Response::new(pb::GetSandboxMetricsResponse {
                series: Some(sim_metrics(sb, range)),
            }))
        })
    }

    /// The simulated log holds one entry: the sandbox's start (`seq` 1, at its start
    /// time, `info`); the query's limit, direction, cursor, start time, level and search
    /// apply to it.
    async fn get_sandbox_logs(
        &self,
        request: Request<pb::GetSandboxLogsRequest>,
    ) -> Result<Response<pb::GetSandboxLogsResponse>, Status> {
        self.shared.enter(SimOp::GetSandboxLogs).await?;
        let req = request.into_inner();
        if req.limit == 0 || req.limit > 1000 {
            return Err(invalid("limit must be 1..=1000"));
        }
        self.with_sandbox(&req.sandbox_id, |sb| {
            let at = sb.started_at_unix_ms;
            let visible = match (req.backward, req.start_unix_ms, req.cursor) {
                (false, start, cursor) => {
                    start.is_none_or(|t| at >= t) && cursor.is_none_or(|c| 1 > c)
                }
                (true, start, cursor) => {
                    start.is_none_or(|t| at <= t) && cursor.is_none_or(|c| 1 < c)
                }
            };
            let level_ok = matches!(req.min_level.as_str(), "" | "debug" | "info");
            let search_ok = "sandbox started".contains(&req.search.to_lowercase());
            let entries = (visible && level_ok && search_ok)
                .then(|| pb::LogEntry {
                    seq: 1,
                    unix_ms: at,
                    level: "info".into(),
                    message: "sandbox started".into(),
                    fields: [("source".to_string(), "host".to_string())].into(),
                })
                .into_iter()
                .collect();
            Ok(Response::new(pb::GetSandboxLogsResponse {
                entries,
                more: false,
            }))
        })
    }

    async fn flush_sandbox_metrics(
        &self,
        request: Request<pb::FlushSandboxMetricsRequest>,
    ) -> Result<Response<pb::FlushSandboxMetricsResponse>, Status> {
        self.shared.enter(SimOp::FlushSandboxMetrics).await?;
        let id = request.into_inner().sandbox_id;
        let mut st = self.shared.lock();
        let series = match st.sandboxes.get(&id) {
            Some(sb) => [
                pb::MetricsRange::TenMinutes,
                pb::MetricsRange::TwoHours,
                pb::MetricsRange::Day,
            ]
            .into_iter()
            .map(|r| sim_metrics(sb, r))
            .collect(),
            None => st.retired_metrics.remove(&id).into_iter().collect(),
        };
        Ok(Response::new(pb::FlushSandboxMetricsResponse { series }))
    }
}

/// The simulated metrics of one tier of a sandbox: [`SIM_METRIC_POINTS`] points 500 ms
/// apart from its start in the 10 min tier, one point (its start's interval) in the others.
pub fn sim_metrics(sb: &SimSandbox, range: pb::MetricsRange) -> pb::MetricSeries {
    let interval: i64 = match range {
        pb::MetricsRange::TwoHours => 30_000,
        pb::MetricsRange::Day => 300_000,
        _ => 500,
    };
    let point = |ts_unix_ms| pb::MetricPoint {
        ts_unix_ms,
        cpu_pct: SIM_CPU_PCT,
        mem_bytes: u64::from(sb.request.memory_mb) << 19,
        disk_bytes: SIM_DISK_BYTES,
    };
    let start = sb.started_at_unix_ms;
    let points = if interval == 500 {
        (0..SIM_METRIC_POINTS as i64)
            .map(|i| point(start + i * 500))
            .collect()
    } else {
        vec![point(start.div_euclid(interval) * interval)]
    };
    pb::MetricSeries {
        range: range as i32,
        interval_ms: interval as u32,
        points,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_normalise() {
        assert_eq!(normalize("/").unwrap(), "/");
        assert_eq!(normalize("a/b").unwrap(), "/root/a/b");
        assert_eq!(normalize("/x/./y/../z/").unwrap(), "/x/z");
        assert_eq!(normalize("/../..").unwrap(), "/");
        assert!(normalize("").is_err());
        assert_eq!(parent("/a/b"), Some("/a"));
        assert_eq!(parent("/a"), Some("/"));
        assert_eq!(parent("/"), None);
        assert!(is_child("/", "/a"));
        assert!(is_child("/a", "/a/b"));
        assert!(!is_child("/a", "/a/b/c"));
        assert!(!is_child("/a", "/ab"));
        assert!(is_descendant("/a", "/a/b/c"));
        assert!(!is_descendant("/a", "/ab"));
    }

    #[test]
    fn file_tree() {
        let mut files = new_sandbox(CreateSandboxRequest::default()).files;
        write(&mut files, "/d/e/f.txt", b"hi".to_vec()).unwrap();
        write(&mut files, "/d/g.txt", b"x".to_vec()).unwrap();
        assert!(write(&mut files, "/d/e", vec![]).is_err(), "a directory");
        assert!(make_dirs(&mut files, "/d/g.txt").is_err(), "a file");
        let mut out = Vec::new();
        list(&files, "/d", 1, &mut out);
        let names: Vec<_> = out.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(names, ["/d/e", "/d/g.txt"]);
        out.clear();
        list(&files, "/d", 2, &mut out);
        let names: Vec<_> = out.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(names, ["/d/e", "/d/e/f.txt", "/d/g.txt"]);
    }

    #[tokio::test]
    async fn held_calls_wait_for_their_release() {
        let agent = SimAgent::start(SimAgentConfig::default()).await.unwrap();
        let held = agent.hold(SimOp::PauseSandbox);
        let shared = agent.shared.clone();
        let call = tokio::spawn(async move { shared.enter(SimOp::PauseSandbox).await });
        held.arrived().await;
        assert!(!call.is_finished(), "held until released");
        // The failure is decided when the call goes on, not when it arrived.
        agent.fail_next(SimOp::PauseSandbox, ErrorCode::Busy, "busy");
        held.release();
        let err = call.await.unwrap().unwrap_err();
        assert_eq!(nestbox_proto::error_code(&err), ErrorCode::Busy);
        agent.shared.enter(SimOp::PauseSandbox).await.unwrap();
        assert_eq!(agent.calls(SimOp::PauseSandbox), 2);
        agent.shutdown().await;
    }

    #[tokio::test]
    async fn refuses_calls_before_registration() {
        let agent = SimAgent::start(SimAgentConfig::default()).await.unwrap();
        let mut client = pb::host_agent_client::HostAgentClient::connect(agent.address())
            .await
            .unwrap();
        let err = client.ping(PingRequest {}).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unauthenticated);
        assert_eq!(agent.rejected_calls(), 1);
        assert_eq!(agent.calls(SimOp::Ping), 0);
        agent.shutdown().await;
    }
}
