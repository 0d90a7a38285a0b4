//! The bodies of E2B's REST API, which the control plane serves beside `/v1` so that E2B's
//! SDKs work against Nestbox unmodified (`E2B_API_URL`).
//!
//! Field names, optionality and formats follow what the stock SDKs send and parse (Python
//! `e2b` 2.63, npm `e2b` 2.51): camelCase with E2B's spellings (`templateID`, `memoryMB`),
//! except `allow_internet_access`. Fields the SDKs require in answers are never optional
//! here; request fields the SDKs may leave out are `Option`. Unknown request fields are
//! accepted (newer SDKs add fields); the control plane refuses the ones it knows and does
//! not support rather than ignoring them.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

#[cfg(feature = "openapi")]
use utoipa::{IntoParams, ToSchema};

/// E2B's error body: `code` is always the HTTP status.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[cfg_attr(feature = "openapi", schema(as = e2b::Error))]
pub struct Error {
    /// The HTTP status.
    pub code: u16,
    /// What went wrong.
    pub message: String,
}

/// `POST /sandboxes` and `POST /v2/sandboxes`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[cfg_attr(feature = "openapi", schema(as = e2b::NewSandbox))]
#[serde(rename_all = "camelCase")]
pub struct NewSandbox {
    /// Template name (`base`, or empty: the platform's default template), optionally
    /// `name:tag` for one of its tagged builds.
    #[serde(rename = "templateID")]
    #[cfg_attr(
        feature = "openapi",
        schema(
            pattern = "^([A-Za-z0-9][A-Za-z0-9._-]{0,63}(:[A-Za-z0-9][A-Za-z0-9._-]{0,63})?)?$"
        )
    )]
    pub template_id: String,
    /// Lifetime, seconds (default 300): the sandbox is killed (or paused, with
    /// `autoPause`) this long after it starts unless extended.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 604800))]
    pub timeout: Option<u32>,
    /// Pause instead of kill when the lifetime ends.
    #[serde(default)]
    pub auto_pause: Option<bool>,
    /// Whether an automatic pause keeps memory (it always does here).
    #[serde(default)]
    pub auto_pause_memory: Option<bool>,
    /// Resume the sandbox, while it is paused, when a request reaches one of its ports.
    #[serde(default, deserialize_with = "crate::serde_util::object_only")]
    pub auto_resume: Option<AutoResume>,
    /// Whether the sandbox may reach the internet.
    #[serde(default, rename = "allow_internet_access")]
    pub allow_internet_access: Option<bool>,
    /// Egress and ingress rules.
    #[serde(default, deserialize_with = "crate::serde_util::object_only")]
    pub network: Option<NetworkConfig>,
    /// Labels.
    #[serde(default)]
    pub metadata: Option<BTreeMap<String, String>>,
    /// Environment of every process.
    #[serde(default)]
    pub env_vars: Option<BTreeMap<String, String>>,
    /// Older SDKs' flag; every sandbox requires its access token here.
    #[serde(default)]
    pub secure: Option<bool>,
    /// An MCP gateway configuration (not supported: refused when given).
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<Object>))]
    pub mcp: Option<serde_json::Value>,
    /// Volumes to mount (not supported: refused when given).
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<Vec<Object>>))]
    pub volume_mounts: Option<Vec<serde_json::Value>>,
}

/// `autoResume` of [`NewSandbox`].
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[cfg_attr(feature = "openapi", schema(as = e2b::AutoResume))]
pub struct AutoResume {
    /// Whether traffic resumes a paused sandbox.
    #[serde(default)]
    pub enabled: bool,
}

/// A sandbox's network settings (at create, and as `GET /sandboxes/{id}` reports them).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[cfg_attr(feature = "openapi", schema(as = e2b::NetworkConfig))]
#[serde(rename_all = "camelCase")]
pub struct NetworkConfig {
    /// Destinations allowed even when denied otherwise (CIDRs, addresses or domains).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow_out: Option<Vec<String>>,
    /// Destinations denied (CIDRs or addresses; `0.0.0.0/0` for everything).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deny_out: Option<Vec<String>>,
    /// DNS servers allowed when `allowOut` names a domain (IPv4 addresses; added to the
    /// allowed destinations). Every DNS query goes to the host's resolver either way.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns_servers: Option<Vec<String>>,
    /// Whether the sandbox's ports are reachable without its traffic token (default: yes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow_public_traffic: Option<bool>,
    /// Host header rewriting for proxied requests (not supported: refused when given).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mask_request_host: Option<String>,
    /// Per-domain request transforms (not supported: refused when not empty).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<Object>))]
    pub rules: Option<serde_json::Value>,
    /// A SOCKS5 proxy for egress (not supported: refused when given).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<Object>))]
    pub egress_proxy: Option<serde_json::Value>,
    /// Ports serving HTTPS themselves (not supported: refused when not empty).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub https_ports: Option<Vec<u16>>,
}

/// `PUT /sandboxes/{id}/network`: replaces the egress rules; an omitted field is cleared.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[cfg_attr(feature = "openapi", schema(as = e2b::SandboxNetworkUpdateConfig))]
#[serde(rename_all = "camelCase")]
pub struct NetworkUpdate {
    /// Destinations allowed even when denied otherwise (CIDRs, addresses or domains).
    #[serde(default)]
    pub allow_out: Option<Vec<String>>,
    /// Destinations denied (CIDRs or addresses).
    #[serde(default)]
    pub deny_out: Option<Vec<String>>,
    /// DNS servers allowed when `allowOut` names a domain.
    #[serde(default)]
    pub dns_servers: Option<Vec<String>>,
    /// `false` denies everything not allowed, as `0.0.0.0/0` in `denyOut` does (snake
    /// case on the wire, as E2B's SDKs send it).
    #[serde(default, rename = "allow_internet_access")]
    pub allow_internet_access: Option<bool>,
    /// Per-domain request transforms (not supported: refused when not empty).
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<Object>))]
    pub rules: Option<serde_json::Value>,
    /// A SOCKS5 proxy for egress (not supported: refused when given).
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<Object>))]
    pub egress_proxy: Option<serde_json::Value>,
}

/// `POST /sandboxes/{id}/connect` and `POST /v2/sandboxes/{id}/connect`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[cfg_attr(feature = "openapi", schema(as = e2b::ConnectSandbox))]
pub struct ConnectSandbox {
    /// A new lifetime from now, seconds (a running sandbox's is only extended).
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 604800))]
    pub timeout: Option<u32>,
    /// `false`: boot afresh instead of resuming memory (not supported: refused).
    #[serde(default)]
    pub memory: Option<bool>,
}

/// `POST /sandboxes/{id}/resume` (deprecated by E2B in favour of connect).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[cfg_attr(feature = "openapi", schema(as = e2b::ResumedSandbox))]
#[serde(rename_all = "camelCase")]
pub struct ResumedSandbox {
    /// A new lifetime from now, seconds.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 604800))]
    pub timeout: Option<u32>,
    /// Ignored (deprecated by E2B).
    #[serde(default)]
    pub auto_pause: Option<bool>,
    /// `false`: boot afresh instead of resuming memory (not supported: refused).
    #[serde(default)]
    pub memory: Option<bool>,
}

/// `POST /sandboxes/{id}/pause`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[cfg_attr(feature = "openapi", schema(as = e2b::PauseSandbox))]
#[serde(rename_all = "camelCase")]
pub struct PauseSandbox {
    /// `false`: keep only the filesystem (not supported: memory is always kept).
    #[serde(default)]
    pub memory: Option<bool>,
    /// Fail if the guest agent does not answer (it must answer for a pause here anyway).
    #[serde(default)]
    pub require_healthy_guest: Option<bool>,
}

/// `POST /sandboxes/{id}/timeout`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[cfg_attr(feature = "openapi", schema(as = e2b::SandboxTimeout))]
pub struct SandboxTimeout {
    /// The sandbox now ends this many seconds from now.
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 604800))]
    pub timeout: u32,
}

/// `POST /sandboxes/{id}/refreshes`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[cfg_attr(feature = "openapi", schema(as = e2b::SandboxRefresh))]
pub struct SandboxRefresh {
    /// Keep the sandbox alive at least this many seconds from now (0–3600, default 60).
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(maximum = 3600))]
    pub duration: Option<u32>,
}

/// `POST /sandboxes/{id}/fork`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[cfg_attr(feature = "openapi", schema(as = e2b::SandboxForkRequest))]
pub struct SandboxForkRequest {
    /// Lifetime of each copy, seconds (default: the source's).
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 604800))]
    pub timeout: Option<u32>,
    /// How many copies, 1–20 (default 1).
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 20))]
    pub count: Option<u32>,
}

/// One copy of a fork: the sandbox, or why it could not start.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[cfg_attr(feature = "openapi", schema(as = e2b::SandboxForkResult))]
pub struct SandboxForkResult {
    /// The running copy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<Sandbox>,
    /// Why this copy failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<Error>,
}

/// A created or connected sandbox.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[cfg_attr(feature = "openapi", schema(as = e2b::Sandbox))]
pub struct Sandbox {
    /// Template it started from.
    #[serde(rename = "templateID")]
    pub template_id: String,
    /// Id.
    #[serde(rename = "sandboxID")]
    pub sandbox_id: String,
    /// The host it runs on (E2B's deprecated client id).
    #[serde(rename = "clientID")]
    pub client_id: String,
    /// The version of E2B's in-VM protocol the guest agent speaks.
    #[serde(rename = "envdVersion")]
    pub envd_version: String,
    /// Sent to the guest agent as `X-Access-Token`.
    #[serde(rename = "envdAccessToken")]
    pub envd_access_token: String,
    /// Opens the sandbox's ports (`e2b-traffic-access-token`).
    #[serde(rename = "trafficAccessToken")]
    pub traffic_access_token: String,
    /// Domain of `{port}-{sandboxID}.{domain}` host names.
    pub domain: Option<String>,
}

/// E2B's sandbox states (only these two are ever reported).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[cfg_attr(feature = "openapi", schema(as = e2b::SandboxState))]
#[serde(rename_all = "lowercase")]
pub enum SandboxState {
    /// Running (or starting, or on a host that is briefly unreachable).
    Running,
    /// Paused with its memory.
    Paused,
}

/// A sandbox in a list.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[cfg_attr(feature = "openapi", schema(as = e2b::ListedSandbox))]
#[serde(rename_all = "camelCase")]
pub struct ListedSandbox {
    /// Template it started from.
    #[serde(rename = "templateID")]
    pub template_id: String,
    /// Id.
    #[serde(rename = "sandboxID")]
    pub sandbox_id: String,
    /// The host it runs on.
    #[serde(rename = "clientID")]
    pub client_id: String,
    /// When it started.
    pub started_at: DateTime<Utc>,
    /// When its lifetime ends (far in the future for a sandbox without a deadline).
    pub end_at: DateTime<Utc>,
    /// vCPUs.
    pub cpu_count: u32,
    /// Memory, MiB.
    #[serde(rename = "memoryMB")]
    pub memory_mb: u32,
    /// Root disk, MiB.
    #[serde(rename = "diskSizeMB")]
    pub disk_size_mb: u32,
    /// Labels.
    pub metadata: BTreeMap<String, String>,
    /// `running` or `paused`.
    pub state: SandboxState,
    /// The version of E2B's in-VM protocol the guest agent speaks.
    pub envd_version: String,
}

/// `autoPause` as E2B reports it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[cfg_attr(feature = "openapi", schema(as = e2b::Lifecycle))]
#[serde(rename_all = "camelCase")]
pub struct Lifecycle {
    /// Whether a request to one of its ports resumes it while it is paused.
    pub auto_resume: bool,
    /// `kill` or `pause`.
    pub on_timeout: String,
}

/// `GET /sandboxes/{id}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[cfg_attr(feature = "openapi", schema(as = e2b::SandboxDetail))]
#[serde(rename_all = "camelCase")]
pub struct SandboxDetail {
    /// What a list shows.
    #[serde(flatten)]
    pub listed: ListedSandbox,
    /// Sent to the guest agent as `X-Access-Token`.
    pub envd_access_token: String,
    /// Domain of `{port}-{sandboxID}.{domain}` host names.
    pub domain: Option<String>,
    /// What the end of its lifetime does.
    pub lifecycle: Lifecycle,
    /// Whether it reaches destinations no rule allows.
    pub allow_internet_access: bool,
    /// Its network settings.
    pub network: NetworkConfig,
}

/// Query of `GET /v2/sandboxes`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(IntoParams))]
#[cfg_attr(feature = "openapi", into_params(parameter_in = Query))]
#[serde(rename_all = "camelCase")]
pub struct ListQuery {
    /// `key=value` pairs, form-encoded, each key and value percent-encoded.
    pub metadata: Option<String>,
    /// Comma-separated states (`running`, `paused`); default both.
    #[cfg_attr(
        feature = "openapi",
        param(pattern = "^((running|paused)(,(running|paused))*)?$")
    )]
    pub state: Option<String>,
    /// Items per page, 1–100 (default 100).
    #[cfg_attr(feature = "openapi", param(minimum = 1, maximum = 100))]
    pub limit: Option<u32>,
    /// The `x-next-token` header of the previous page.
    pub next_token: Option<String>,
}

/// Query of `GET /sandboxes` (running sandboxes, unpaged).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(IntoParams))]
#[cfg_attr(feature = "openapi", into_params(parameter_in = Query))]
pub struct ListRunningQuery {
    /// `key=value` pairs, form-encoded, each key and value percent-encoded.
    pub metadata: Option<String>,
}

/// One metrics sample.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[cfg_attr(feature = "openapi", schema(as = e2b::SandboxMetric))]
#[serde(rename_all = "camelCase")]
pub struct SandboxMetric {
    /// When it was taken.
    pub timestamp: DateTime<Utc>,
    /// The same, in seconds since the epoch.
    pub timestamp_unix: i64,
    /// vCPUs.
    pub cpu_count: u32,
    /// CPU use in percent of the sandbox's vCPUs.
    pub cpu_used_pct: f64,
    /// Memory used, bytes (the VM's resident memory on its host).
    pub mem_used: u64,
    /// Memory of the sandbox, bytes.
    pub mem_total: u64,
    /// Page cache, bytes (not measured: 0).
    pub mem_cache: u64,
    /// Disk used, bytes (what its copy-on-write disk takes on its host).
    pub disk_used: u64,
    /// Disk size, bytes.
    pub disk_total: u64,
}

/// Query of `GET /sandboxes/{id}/metrics`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(IntoParams))]
#[cfg_attr(feature = "openapi", into_params(parameter_in = Query))]
pub struct MetricsQuery {
    /// Oldest sample, seconds since the epoch.
    pub start: Option<i64>,
    /// Newest sample, seconds since the epoch.
    pub end: Option<i64>,
}

/// Query of `GET /sandboxes/metrics`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(IntoParams))]
#[cfg_attr(feature = "openapi", into_params(parameter_in = Query))]
pub struct ManyMetricsQuery {
    /// Comma-separated sandbox ids (at most 100).
    pub sandbox_ids: String,
}

/// `GET /sandboxes/metrics`: the newest sample of each running sandbox asked for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[cfg_attr(feature = "openapi", schema(as = e2b::SandboxesWithMetrics))]
pub struct SandboxesWithMetrics {
    /// By sandbox id.
    pub sandboxes: BTreeMap<String, SandboxMetric>,
}

/// A log line, as `GET /sandboxes/{id}/logs` lists it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[cfg_attr(feature = "openapi", schema(as = e2b::SandboxLog))]
pub struct SandboxLog {
    /// When it was written.
    pub timestamp: DateTime<Utc>,
    /// The message.
    pub line: String,
}

/// A structured log entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[cfg_attr(feature = "openapi", schema(as = e2b::SandboxLogEntry))]
pub struct SandboxLogEntry {
    /// When it was written.
    pub timestamp: DateTime<Utc>,
    /// `debug`, `info`, `warn` or `error`.
    pub level: String,
    /// The message.
    pub message: String,
    /// Structured fields.
    pub fields: BTreeMap<String, String>,
}

/// `GET /sandboxes/{id}/logs`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[cfg_attr(feature = "openapi", schema(as = e2b::SandboxLogs))]
#[serde(rename_all = "camelCase")]
pub struct SandboxLogs {
    /// The lines, oldest first.
    pub logs: Vec<SandboxLog>,
    /// The same entries, structured.
    pub log_entries: Vec<SandboxLogEntry>,
}

/// `GET /v2/sandboxes/{id}/logs`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[cfg_attr(feature = "openapi", schema(as = e2b::SandboxLogsV2Response))]
pub struct SandboxLogsV2 {
    /// In the direction asked for.
    pub logs: Vec<SandboxLogEntry>,
}

/// Query of `GET /sandboxes/{id}/logs`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(IntoParams))]
#[cfg_attr(feature = "openapi", into_params(parameter_in = Query))]
pub struct LogsQuery {
    /// Oldest entry, Unix milliseconds.
    pub start: Option<i64>,
    /// At most this many entries (1–1000, default 1000).
    #[cfg_attr(feature = "openapi", param(minimum = 1, maximum = 1000))]
    pub limit: Option<u32>,
}

/// Query of `GET /v2/sandboxes/{id}/logs`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(IntoParams))]
#[cfg_attr(feature = "openapi", into_params(parameter_in = Query))]
pub struct LogsV2Query {
    /// Forward: entries at or after this time (Unix milliseconds); backward: at or before.
    pub cursor: Option<i64>,
    /// At most this many entries (1–1000, default 1000).
    #[cfg_attr(feature = "openapi", param(minimum = 1, maximum = 1000))]
    pub limit: Option<u32>,
    /// `forward` (oldest first, the default) or `backward` (newest first).
    #[cfg_attr(feature = "openapi", param(pattern = "^(forward|backward)$"))]
    pub direction: Option<String>,
    /// Only entries at least this severe: `debug`, `info`, `warn` or `error`.
    #[cfg_attr(feature = "openapi", param(pattern = "^(debug|info|warn|error)$"))]
    pub level: Option<String>,
    /// Only entries whose message contains this (case-insensitive).
    pub search: Option<String>,
}

/// `POST /sandboxes/{id}/snapshots`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[cfg_attr(feature = "openapi", schema(as = e2b::NewSnapshot))]
pub struct NewSnapshot {
    /// Template name; default a generated one.
    #[serde(default)]
    #[cfg_attr(
        feature = "openapi",
        schema(pattern = "^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    )]
    pub name: Option<String>,
    /// `false`: the disk only (an image template); default memory and disk.
    #[serde(default)]
    pub memory: Option<bool>,
}

/// A snapshot (a template made from a sandbox).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[cfg_attr(feature = "openapi", schema(as = e2b::SnapshotInfo))]
pub struct SnapshotInfo {
    /// Usable as `templateID` to create sandboxes from it, and to delete it.
    #[serde(rename = "snapshotID")]
    pub snapshot_id: String,
    /// Its names.
    pub names: Vec<String>,
}

/// Query of `GET /snapshots`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(IntoParams))]
#[cfg_attr(feature = "openapi", into_params(parameter_in = Query))]
#[serde(rename_all = "camelCase")]
pub struct SnapshotListQuery {
    /// Only snapshots made from this sandbox.
    #[serde(rename = "sandboxID")]
    pub sandbox_id: Option<String>,
    /// Only the snapshot of this name.
    pub name: Option<String>,
    /// Items per page, 1–100 (default 100).
    #[cfg_attr(feature = "openapi", param(minimum = 1, maximum = 100))]
    pub limit: Option<u32>,
    /// The `x-next-token` header of the previous page.
    pub next_token: Option<String>,
}

/// A template.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[cfg_attr(feature = "openapi", schema(as = e2b::Template))]
#[serde(rename_all = "camelCase")]
pub struct Template {
    /// Id (its name works wherever an id does).
    #[serde(rename = "templateID")]
    pub template_id: String,
    /// Its one build (templates are made whole here).
    #[serde(rename = "buildID")]
    pub build_id: String,
    /// vCPUs of its sandboxes.
    pub cpu_count: u32,
    /// Memory of its sandboxes, MiB.
    #[serde(rename = "memoryMB")]
    pub memory_mb: u32,
    /// Root disk of its sandboxes, MiB.
    #[serde(rename = "diskSizeMB")]
    pub disk_size_mb: u32,
    /// Visible to every team (a platform template).
    pub public: bool,
    /// Its names.
    pub aliases: Vec<String>,
    /// Its names.
    pub names: Vec<String>,
    /// When it was made.
    pub created_at: DateTime<Utc>,
    /// When it was last replaced.
    pub updated_at: DateTime<Utc>,
    /// Who made it (not recorded: null).
    #[cfg_attr(feature = "openapi", schema(value_type = Option<Object>))]
    pub created_by: Option<serde_json::Value>,
    /// Not recorded: null.
    pub last_spawned_at: Option<DateTime<Utc>>,
    /// Not recorded: 0.
    pub spawn_count: u64,
    /// Always 1.
    pub build_count: u32,
    /// The version of E2B's in-VM protocol its sandboxes speak.
    pub envd_version: String,
    /// Always `ready`.
    pub build_status: String,
}

/// One build of a template.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[cfg_attr(feature = "openapi", schema(as = e2b::TemplateBuild))]
#[serde(rename_all = "camelCase")]
pub struct TemplateBuild {
    /// Id.
    #[serde(rename = "buildID")]
    pub build_id: String,
    /// Always `ready`.
    pub status: String,
    /// When it started.
    pub created_at: DateTime<Utc>,
    /// When it last changed.
    pub updated_at: DateTime<Utc>,
    /// When it finished.
    pub finished_at: Option<DateTime<Utc>>,
    /// vCPUs.
    pub cpu_count: u32,
    /// Memory, MiB.
    #[serde(rename = "memoryMB")]
    pub memory_mb: u32,
    /// Root disk, MiB.
    #[serde(rename = "diskSizeMB")]
    pub disk_size_mb: u32,
    /// The version of E2B's in-VM protocol its sandboxes speak.
    pub envd_version: String,
}

/// `GET /templates/{id}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[cfg_attr(feature = "openapi", schema(as = e2b::TemplateWithBuilds))]
pub struct TemplateWithBuilds {
    /// The template.
    #[serde(flatten)]
    pub template: Template,
    /// Its builds.
    pub builds: Vec<TemplateBuild>,
}

/// `GET /templates/aliases/{alias}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[cfg_attr(feature = "openapi", schema(as = e2b::TemplateAlias))]
pub struct TemplateAlias {
    /// The template's id.
    #[serde(rename = "templateID")]
    pub template_id: String,
    /// Visible to every team.
    pub public: bool,
}

/// `POST /templates/tags`: point tags at the build `target` (`name:tag`) names.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[cfg_attr(feature = "openapi", schema(as = e2b::AssignTemplateTagsRequest))]
pub struct AssignTemplateTagsRequest {
    /// The build to tag: `name:tag` (a name alone is its `default` tag).
    pub target: String,
    /// The tags to give it (1–10).
    #[cfg_attr(feature = "openapi", schema(schema_with = crate::schemas::some_tags))]
    pub tags: Vec<String>,
}

/// The answer to `POST /templates/tags`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[cfg_attr(feature = "openapi", schema(as = e2b::AssignedTemplateTags))]
pub struct AssignedTemplateTags {
    /// The build that was tagged.
    #[serde(rename = "buildID")]
    #[cfg_attr(feature = "openapi", schema(format = Uuid))]
    pub build_id: String,
    /// The tags given.
    pub tags: Vec<String>,
}

/// `DELETE /templates/tags`: take tags off a template.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[cfg_attr(feature = "openapi", schema(as = e2b::DeleteTemplateTagsRequest))]
pub struct DeleteTemplateTagsRequest {
    /// The template's name.
    pub name: String,
    /// The tags to take off (1–10).
    #[cfg_attr(feature = "openapi", schema(schema_with = crate::schemas::some_tags))]
    pub tags: Vec<String>,
}

/// One of `GET /templates/{templateID}/tags`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[cfg_attr(feature = "openapi", schema(as = e2b::TemplateTag))]
#[serde(rename_all = "camelCase")]
pub struct TemplateTag {
    /// The tag.
    pub tag: String,
    /// The build it points at.
    #[serde(rename = "buildID")]
    #[cfg_attr(feature = "openapi", schema(format = Uuid))]
    pub build_id: String,
    /// When it was pointed there.
    pub created_at: DateTime<Utc>,
}

/// `POST /v3/templates`: announce a build of a template (its recipe follows with
/// `POST /v2/templates/{templateID}/builds/{buildID}`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[cfg_attr(feature = "openapi", schema(as = e2b::TemplateBuildRequestV3))]
#[serde(rename_all = "camelCase")]
pub struct TemplateBuildRequestV3 {
    /// The template's name, optionally `name:tag`.
    #[serde(default)]
    #[cfg_attr(
        feature = "openapi",
        schema(pattern = "^[A-Za-z0-9][A-Za-z0-9._-]{0,63}(:[A-Za-z0-9][A-Za-z0-9._-]{0,63})?$")
    )]
    pub name: Option<String>,
    /// Older SDKs' spelling of `name`.
    #[serde(default)]
    #[cfg_attr(
        feature = "openapi",
        schema(pattern = "^[A-Za-z0-9][A-Za-z0-9._-]{0,63}(:[A-Za-z0-9][A-Za-z0-9._-]{0,63})?$")
    )]
    pub alias: Option<String>,
    /// Tags of the build (`default` when none).
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(schema_with = crate::schemas::build_tags))]
    pub tags: Option<Vec<String>>,
    /// vCPUs.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(minimum = 1))]
    pub cpu_count: Option<u32>,
    /// Memory, MiB.
    #[serde(default, rename = "memoryMB")]
    pub memory_mb: Option<u32>,
    /// Free disk the template must leave, MiB (not used: the disk is the recipe's).
    #[serde(default)]
    pub min_free_disk_mb: Option<u32>,
}

/// The answer to `POST /v3/templates`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[cfg_attr(feature = "openapi", schema(as = e2b::TemplateRequestResponseV3))]
pub struct TemplateRequestResponseV3 {
    /// The template's id (its name).
    #[serde(rename = "templateID")]
    pub template_id: String,
    /// The build's id.
    #[serde(rename = "buildID")]
    pub build_id: String,
    /// Visible to every team.
    pub public: bool,
    /// Its names.
    pub names: Vec<String>,
    /// The build's tags.
    pub tags: Vec<String>,
    /// Its names (older SDKs).
    pub aliases: Vec<String>,
}

/// `GET /templates/{templateID}/files/{hash}`: whether the team has the files, and where
/// to upload them if not.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[cfg_attr(feature = "openapi", schema(as = e2b::TemplateBuildFileUpload))]
pub struct TemplateBuildFileUpload {
    /// The files are stored already.
    pub present: bool,
    /// Where to `PUT` them (a URL that carries its own authorisation, valid for an hour).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
}

/// `?token=` of an upload URL.
#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "openapi", derive(IntoParams))]
#[cfg_attr(feature = "openapi", into_params(parameter_in = Query))]
pub struct UploadToken {
    /// The token the lookup gave.
    pub token: String,
}

/// Registry credentials of `fromImage`.
#[derive(Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[cfg_attr(feature = "openapi", schema(as = e2b::FromImageRegistry))]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum FromImageRegistry {
    /// A user name and password.
    Registry {
        /// User name.
        username: String,
        /// Password or token.
        password: String,
    },
    /// AWS ECR credentials (not supported).
    Aws {},
    /// Google Artifact Registry credentials (not supported).
    Gcp {},
}

impl std::fmt::Debug for FromImageRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Registry { username, .. } => f
                .debug_struct("Registry")
                .field("username", username)
                .finish_non_exhaustive(),
            Self::Aws {} => f.write_str("Aws"),
            Self::Gcp {} => f.write_str("Gcp"),
        }
    }
}

/// One step of a template build.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[cfg_attr(feature = "openapi", schema(as = e2b::TemplateStep))]
#[serde(rename_all = "camelCase")]
pub struct TemplateStep {
    /// `RUN`, `COPY`, `ENV`, `WORKDIR` or `USER`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Its arguments.
    #[serde(default)]
    pub args: Vec<String>,
    /// `COPY`: the uploaded files' hash.
    #[serde(default)]
    pub files_hash: Option<String>,
    /// Run it (and the steps after it) without the cache.
    #[serde(default)]
    pub force: Option<bool>,
}

/// `POST /v2/templates/{templateID}/builds/{buildID}`: the recipe of an announced build.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[cfg_attr(feature = "openapi", schema(as = e2b::TemplateBuildStartV2))]
#[serde(rename_all = "camelCase")]
pub struct TemplateBuildStartV2 {
    /// An image to start from.
    #[serde(default)]
    pub from_image: Option<String>,
    /// A template to start from.
    #[serde(default)]
    pub from_template: Option<String>,
    /// Credentials for `fromImage`'s registry.
    #[serde(default)]
    pub from_image_registry: Option<FromImageRegistry>,
    /// Build without the cache.
    #[serde(default)]
    pub force: Option<bool>,
    /// The steps.
    #[serde(default)]
    pub steps: Vec<TemplateStep>,
    /// A command left running in the template.
    #[serde(default)]
    pub start_cmd: Option<String>,
    /// A command that exits 0 once the start command is ready.
    #[serde(default)]
    pub ready_cmd: Option<String>,
}

/// `?logsOffset=&limit=&level=` of a build's status.
#[derive(Debug, Clone, Default, Deserialize)]
#[cfg_attr(feature = "openapi", derive(IntoParams))]
#[cfg_attr(feature = "openapi", into_params(parameter_in = Query))]
#[serde(rename_all = "camelCase")]
pub struct BuildStatusQuery {
    /// Log entries to skip.
    #[serde(default)]
    pub logs_offset: Option<u64>,
    /// Most entries (default and at most 100).
    #[serde(default)]
    pub limit: Option<u32>,
    /// Lowest level shown (`debug`, `info`, `warn`, `error`).
    #[serde(default)]
    pub level: Option<String>,
}

/// One line of a build's log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[cfg_attr(feature = "openapi", schema(as = e2b::BuildLogEntry))]
pub struct BuildLogEntry {
    /// When.
    pub timestamp: DateTime<Utc>,
    /// `debug`, `info`, `warn` or `error`.
    pub level: String,
    /// The line.
    pub message: String,
    /// The step (`base`, `1`…, `finalize`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<String>,
}

/// Why a build failed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[cfg_attr(feature = "openapi", schema(as = e2b::BuildStatusReason))]
pub struct BuildStatusReason {
    /// What went wrong.
    pub message: String,
    /// The step (`base`, `1`…, `finalize`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<String>,
}

/// `GET /templates/{templateID}/builds/{buildID}/status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[cfg_attr(feature = "openapi", schema(as = e2b::TemplateBuildInfo))]
#[serde(rename_all = "camelCase")]
pub struct TemplateBuildInfo {
    /// The template's id.
    #[serde(rename = "templateID")]
    pub template_id: String,
    /// The build's id.
    #[serde(rename = "buildID")]
    pub build_id: String,
    /// `waiting`, `building`, `ready` or `error`.
    pub status: String,
    /// Plain log lines (always empty: see `logEntries`).
    pub logs: Vec<String>,
    /// Log entries from `logsOffset`.
    pub log_entries: Vec<BuildLogEntry>,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<BuildStatusReason>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_bodies_of_both_sdks_parse() {
        let py: NewSandbox = serde_json::from_str(
            r#"{"templateID":"base","timeout":120,"autoPause":true,"autoResume":{"enabled":false},
                "allow_internet_access":true,"metadata":{"a":"b"},"envVars":{"X":"1"}}"#,
        )
        .unwrap();
        assert_eq!(py.template_id, "base");
        assert_eq!(py.timeout, Some(120));
        assert_eq!(py.auto_pause, Some(true));
        assert_eq!(py.allow_internet_access, Some(true));
        assert_eq!(py.env_vars.unwrap()["X"], "1");
        let js: NewSandbox = serde_json::from_str(r#"{"templateID":"base"}"#).unwrap();
        assert!(js.timeout.is_none() && js.metadata.is_none());
        // Newer SDKs' fields are accepted.
        serde_json::from_str::<NewSandbox>(r#"{"templateID":"x","someday":1}"#).unwrap();
    }

    #[test]
    fn answers_use_e2b_spellings() {
        let listed = ListedSandbox {
            template_id: "minimal".into(),
            sandbox_id: "sb-1".into(),
            client_id: "host-1".into(),
            started_at: DateTime::from_timestamp(0, 0).unwrap(),
            end_at: DateTime::from_timestamp(300, 0).unwrap(),
            cpu_count: 1,
            memory_mb: 512,
            disk_size_mb: 5120,
            metadata: BTreeMap::new(),
            state: SandboxState::Paused,
            envd_version: "0.5.2".into(),
        };
        let v = serde_json::to_value(SandboxDetail {
            listed,
            envd_access_token: "t".into(),
            domain: None,
            lifecycle: Lifecycle {
                auto_resume: false,
                on_timeout: "kill".into(),
            },
            allow_internet_access: false,
            network: NetworkConfig {
                allow_out: Some(vec!["example.com".into()]),
                deny_out: Some(vec!["0.0.0.0/0".into()]),
                allow_public_traffic: Some(true),
                ..Default::default()
            },
        })
        .unwrap();
        for key in [
            "templateID",
            "sandboxID",
            "clientID",
            "startedAt",
            "endAt",
            "cpuCount",
            "memoryMB",
            "diskSizeMB",
            "envdVersion",
            "envdAccessToken",
            "lifecycle",
        ] {
            assert!(v.get(key).is_some(), "{key} missing in {v}");
        }
        assert_eq!(v["state"], "paused");
        assert_eq!(v["lifecycle"]["onTimeout"], "kill");
        assert_eq!(v["allowInternetAccess"], false);
        assert_eq!(v["network"]["allowOut"][0], "example.com");
        assert_eq!(v["network"]["allowPublicTraffic"], true);
        // Fields we never set are absent, not null: E2B's SDKs parse a present `rules` or
        // `egressProxy` as an object.
        let network = v["network"].as_object().unwrap();
        for absent in [
            "rules",
            "egressProxy",
            "dnsServers",
            "maskRequestHost",
            "httpsPorts",
        ] {
            assert!(!network.contains_key(absent), "{absent} in {v}");
        }
    }
}
