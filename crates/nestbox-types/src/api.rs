//! The REST API's request and response bodies: the public contract of `/v1`.
//!
//! The control plane serialises these and generates its OpenAPI document from them; the
//! Rust client and the CLI deserialise them. Changing a field here changes the public API:
//! add fields as optional, never rename or repurpose one.
//!
//! Conventions: ids are prefixed strings, times are RFC 3339 UTC, sizes are MiB in fields
//! ending in `_mb`, every list is `{"items": [...], "next_cursor": ...}`.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::{
    ApiKeyId, AuditLogId, BuildId, ErrorCode, Expiry, HostId, HostStatus, SandboxId, SandboxStatus,
    TeamId, TeamRole, TemplateId, TemplateKind, UserId,
};

#[cfg(feature = "openapi")]
use utoipa::{IntoParams, ToSchema};

/// A page of a list. `next_cursor` is absent on the last page.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct Page<T> {
    /// The items of this page.
    pub items: Vec<T>,
    /// Pass as `cursor` to get the next page.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
}

/// Query parameters of every list endpoint.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(IntoParams))]
#[serde(deny_unknown_fields)]
pub struct PageQuery {
    /// Items per page, 1–200 (default 50).
    #[cfg_attr(feature = "openapi", param(minimum = 1, maximum = 200))]
    pub limit: Option<u32>,
    /// The `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

/// `GET /health` and `GET /health/ready`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct Health {
    /// `ok` when the server answers (`/health`); `ready` or `starting` (`/health/ready`).
    pub status: String,
    /// Server version.
    pub version: String,
    /// Why it is not ready yet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

// ---------------------------------------------------------------- auth, users, teams

/// `POST /v1/auth/login`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(deny_unknown_fields)]
pub struct LoginRequest {
    /// Account email.
    pub email: String,
    /// Account password.
    pub password: String,
}

/// A session token for a user.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct LoginResponse {
    /// Send as `Authorization: Bearer <token>`.
    pub token: String,
    /// When the token stops working.
    pub expires_at: DateTime<Utc>,
    /// Who logged in.
    pub user: User,
}

/// A browser's session (`POST`/`GET /v1/auth/session`). The session itself travels in an
/// HttpOnly cookie that scripts cannot read; requests that change something must also send
/// this CSRF token as `X-CSRF-Token`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct BrowserSession {
    /// Send as `X-CSRF-Token` with every `POST`, `PUT`, `PATCH` and `DELETE`.
    pub csrf_token: String,
    /// When the session ends.
    pub expires_at: DateTime<Utc>,
    /// Who is signed in.
    pub user: User,
}

/// A user account.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct User {
    /// Id.
    pub id: UserId,
    /// Email, lower case.
    pub email: String,
    /// Display name.
    pub name: String,
    /// Platform administrator.
    pub is_admin: bool,
    /// Whether the account may log in.
    pub active: bool,
    /// Creation time.
    pub created_at: DateTime<Utc>,
}

/// `GET /v1/me`: the caller and their teams.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct Me {
    /// The user, absent when the caller is an API key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<User>,
    /// The team requests are scoped to by default.
    pub team_id: TeamId,
    /// The teams the user belongs to (for an API key: its team).
    pub teams: Vec<TeamMembership>,
}

/// A team and the caller's role in it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct TeamMembership {
    /// The team.
    pub team: Team,
    /// The caller's role.
    pub role: TeamRole,
    /// Used when a request does not name a team.
    pub is_default: bool,
}

/// A team: owns sandboxes, templates and API keys.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct Team {
    /// Id.
    pub id: TeamId,
    /// Name.
    pub name: String,
    /// Whether the team brings its own hosts (BYOC): its sandboxes run only on them, and
    /// its owners and admins register and remove them.
    pub is_byoc: bool,
    /// Creation time.
    pub created_at: DateTime<Utc>,
}

/// A team in the platform admins' list of every team (`GET /v1/admin/teams`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct AdminTeam {
    /// Id.
    pub id: TeamId,
    /// Name.
    pub name: String,
    /// Whether the team brings its own hosts.
    pub is_byoc: bool,
    /// Its members.
    pub members: u64,
    /// Its hosts (BYOC).
    pub hosts: u64,
    /// Creation time.
    pub created_at: DateTime<Utc>,
}

/// `PUT /v1/admin/teams/{team_id}/byoc`.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(deny_unknown_fields)]
pub struct SetByocRequest {
    /// Whether the team brings its own hosts (turning it off needs its hosts gone).
    pub enabled: bool,
}

/// `POST /v1/teams`, `PATCH /v1/teams/{id}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(deny_unknown_fields)]
pub struct TeamRequest {
    /// 1–128 characters.
    pub name: String,
}

/// A team's quotas (`null`: no limit). `PUT /v1/admin/teams/{id}/quotas` sets all of
/// them at once.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(deny_unknown_fields)]
pub struct TeamQuotaLimits {
    /// Sandboxes running or being started.
    #[serde(default)]
    pub max_running: Option<u32>,
    /// Paused sandboxes (explicit pauses are refused past it; inactivity pauses are not).
    #[serde(default)]
    pub max_paused: Option<u32>,
    /// vCPUs of running sandboxes.
    #[serde(default)]
    pub max_vcpus: Option<u32>,
    /// Memory of running sandboxes, MiB.
    #[serde(default)]
    pub max_memory_mb: Option<u32>,
    /// Disk of running and paused sandboxes, MiB.
    #[serde(default)]
    pub max_disk_mb: Option<u32>,
    /// Templates the team owns.
    #[serde(default)]
    pub max_templates: Option<u32>,
}

/// What a team uses of its quotas.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct TeamQuotaUsage {
    /// Sandboxes running or being started.
    pub running: u64,
    /// Paused sandboxes.
    pub paused: u64,
    /// vCPUs of running sandboxes.
    pub vcpus: u64,
    /// Memory of running sandboxes, MiB.
    pub memory_mb: u64,
    /// Disk of running and paused sandboxes, MiB.
    pub disk_mb: u64,
    /// Templates.
    pub templates: u64,
}

/// A team's quotas and usage.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct TeamQuotas {
    /// The team.
    pub team_id: TeamId,
    /// Its limits.
    pub limits: TeamQuotaLimits,
    /// What it uses now.
    pub usage: TeamQuotaUsage,
}

/// A member of a team.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct Member {
    /// The user.
    pub user_id: UserId,
    /// Their email.
    pub email: String,
    /// Their name.
    pub name: String,
    /// Their role.
    pub role: TeamRole,
    /// When they joined.
    pub joined_at: DateTime<Utc>,
}

/// `POST /v1/teams/{id}/members`: add an existing user.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(deny_unknown_fields)]
pub struct AddMemberRequest {
    /// The user's email.
    pub email: String,
    /// `admin` or `member` (default).
    #[serde(default)]
    pub role: Option<TeamRole>,
}

/// `PATCH /v1/teams/{id}/members/{user_id}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(deny_unknown_fields)]
pub struct UpdateMemberRequest {
    /// `admin` or `member`.
    pub role: TeamRole,
}

/// A team API key (the secret itself is only shown once, at creation).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct ApiKey {
    /// Id.
    pub id: ApiKeyId,
    /// The team it acts for.
    pub team_id: TeamId,
    /// Label.
    pub name: String,
    /// The first characters of the key, to recognise it.
    pub prefix: String,
    /// Creation time.
    pub created_at: DateTime<Utc>,
    /// Last time it authenticated a request. Recorded at most once a minute.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_used_at: Option<DateTime<Utc>>,
}

/// `POST /v1/teams/{id}/api-keys`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(deny_unknown_fields)]
pub struct CreateApiKeyRequest {
    /// Label, 1–128 characters.
    pub name: String,
}

/// A new API key. `key` is shown only in this response; store it now.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct CreatedApiKey {
    /// The key's record.
    pub api_key: ApiKey,
    /// Send as `X-API-Key: <key>`.
    pub key: String,
}

/// `POST /v1/admin/users` (platform admins).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(deny_unknown_fields)]
pub struct CreateUserRequest {
    /// Email, unique.
    pub email: String,
    /// Display name.
    pub name: String,
    /// At least 10 characters.
    pub password: String,
    /// Make the user a platform admin.
    #[serde(default)]
    pub is_admin: bool,
}

/// `PATCH /v1/admin/users/{user_id}` (platform admins). Omitted fields stay as they are.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(deny_unknown_fields)]
pub struct UpdateUserRequest {
    /// `false` deactivates the account: it can no longer sign in, and its sessions and
    /// browser sessions stop working at once.
    #[serde(default)]
    pub active: Option<bool>,
    /// Grant or revoke platform administration.
    #[serde(default)]
    pub is_admin: Option<bool>,
}

/// A created user and the personal team made for them.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct CreatedUser {
    /// The user.
    pub user: User,
    /// Their own team.
    pub team: Team,
}

// ---------------------------------------------------------------------- sandboxes

/// `POST /v1/sandboxes`. Omitted fields take the server's defaults.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(deny_unknown_fields)]
pub struct CreateSandboxRequest {
    /// Template name (default `minimal`), or `name:tag` for one of its tagged builds.
    #[serde(default)]
    #[cfg_attr(
        feature = "openapi",
        schema(pattern = "^[A-Za-z0-9][A-Za-z0-9._-]{0,63}(:[A-Za-z0-9][A-Za-z0-9._-]{0,63})?$")
    )]
    pub template: Option<String>,
    /// Virtual CPUs.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 8))]
    pub vcpus: Option<u32>,
    /// Memory, MiB.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(minimum = 128))]
    pub memory_mb: Option<u32>,
    /// Root disk, MiB (default 5120).
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 102400))]
    pub disk_size_mb: Option<u32>,
    /// Inactivity timeout, seconds; 0 means never.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(maximum = 604800))]
    pub timeout_sec: Option<u32>,
    /// Environment variables for every process in the sandbox.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(schema_with = crate::schemas::env_map))]
    pub env: BTreeMap<String, String>,
    /// Free-form labels, filterable in lists.
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    /// Absolute lifetime, seconds: the sandbox ends this long after it starts (and again
    /// after each resume) unless extended (`POST /v1/sandboxes/{id}/lifetime`); omitted: no
    /// deadline. Independent of the inactivity timeout.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 604800))]
    pub lifetime_sec: Option<u32>,
    /// What the end of its lifetime does: `destroy` (default) or `pause`.
    #[serde(default)]
    pub on_expiry: Option<Expiry>,
    /// Egress rules, in force before the sandbox's first instruction runs; omitted: none
    /// (the host's own rules always apply).
    #[serde(default, deserialize_with = "crate::serde_util::object_only")]
    pub egress: Option<EgressRequest>,
    /// Its ports answer through the proxy without the traffic token (default `false`).
    #[serde(default)]
    pub public_traffic: Option<bool>,
    /// While it is paused, a request to one of its ports resumes it (default `false`).
    #[serde(default)]
    pub auto_resume: Option<bool>,
}

/// A sandbox's egress rules as set (`egress` at create, `PUT /v1/sandboxes/{id}/egress`).
///
/// `allow_out` takes IPv4 addresses, CIDR blocks and domain names (`example.com` for that
/// name, `*.example.com` for every name below it); `deny_out` takes addresses and blocks.
/// An allowed destination is reachable even when a deny rule covers it; anything neither
/// allowed nor denied is reachable. Domain rules work by the host's resolver: the
/// addresses it answers for an allowed name become reachable.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(deny_unknown_fields)]
pub struct EgressRequest {
    /// Destinations allowed even when denied.
    #[serde(default)]
    pub allow_out: Vec<String>,
    /// Destinations denied; `0.0.0.0/0` for everything not allowed.
    #[serde(default)]
    pub deny_out: Vec<String>,
    /// `false` denies everything not allowed (as `0.0.0.0/0` in `deny_out` does).
    #[serde(default)]
    pub allow_internet_access: Option<bool>,
}

impl EgressRequest {
    /// The rules this request stands for (not yet validated).
    pub fn rules(&self) -> crate::egress::EgressRules {
        let mut rules = crate::egress::EgressRules {
            allow_out: self.allow_out.clone(),
            deny_out: self.deny_out.clone(),
        };
        if self.allow_internet_access == Some(false)
            && !rules
                .deny_out
                .iter()
                .any(|d| d == crate::egress::ALL_TRAFFIC)
        {
            rules.deny_out.push(crate::egress::ALL_TRAFFIC.to_string());
        }
        rules
    }
}

/// `POST /v1/sandboxes/{id}/fork`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ForkRequest {
    /// How many copies, 1–20 (default 1).
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 20))]
    pub count: Option<u32>,
    /// Lifetime of each copy, seconds (default: the source's, if it has one).
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 604800))]
    pub lifetime_sec: Option<u32>,
}

/// One copy of a fork: the sandbox, or why it could not start.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct ForkItem {
    /// The running copy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<Sandbox>,
    /// Why this copy failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<crate::ErrorDetail>,
}

/// The answer of `POST /v1/sandboxes/{id}/fork`: one item per copy asked for.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct ForkResult {
    /// In no particular order.
    pub items: Vec<ForkItem>,
}

/// `POST /v1/sandboxes/{id}/lifetime`: a new deadline for a running sandbox.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(deny_unknown_fields)]
pub struct LifetimeRequest {
    /// The sandbox now ends this many seconds from now (sooner or later than before).
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 604800))]
    pub lifetime_sec: u32,
    /// Only move the deadline later, never sooner (a keep-alive).
    #[serde(default)]
    pub extend_only: bool,
}

/// `POST /v1/sandboxes/{id}/resume` (the body is optional).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ResumeRequest {
    /// The new lifetime from now, seconds; omitted: the one it had (if any).
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 604800))]
    pub lifetime_sec: Option<u32>,
}

/// A sandbox.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct Sandbox {
    /// Id.
    pub id: SandboxId,
    /// Owning team.
    pub team_id: TeamId,
    /// Template it started from.
    pub template: String,
    /// Lifecycle status.
    pub status: SandboxStatus,
    /// Why it is in `error`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Virtual CPUs.
    pub vcpus: u32,
    /// Memory, MiB.
    pub memory_mb: u32,
    /// Root disk, MiB.
    pub disk_size_mb: u32,
    /// Inactivity timeout, seconds.
    pub timeout_sec: u32,
    /// Labels.
    pub metadata: BTreeMap<String, String>,
    /// The host it runs on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_id: Option<HostId>,
    /// Creation time.
    pub created_at: DateTime<Utc>,
    /// When it became ready.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<DateTime<Utc>>,
    /// When it was destroyed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stopped_at: Option<DateTime<Utc>>,
    /// When its lifetime ends, while it runs; absent: no deadline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<DateTime<Utc>>,
    /// The lifetime it was given (and a resume gives it again), seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lifetime_sec: Option<u32>,
    /// What the end of its lifetime does.
    pub on_expiry: Expiry,
    /// Its egress rules, normalised; absent: none.
    #[serde(default, skip_serializing_if = "crate::egress::EgressRules::is_empty")]
    pub egress: crate::egress::EgressRules,
    /// Its ports answer through the proxy without the traffic token.
    #[serde(default)]
    pub public_traffic: bool,
    /// While it is paused, a request to one of its ports resumes it.
    #[serde(default)]
    pub auto_resume: bool,
    /// Opens the sandbox's ports through the proxy without team credentials (header
    /// `e2b-traffic-access-token`); in the answers of create and get only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traffic_access_token: Option<String>,
    /// The guest agent's access token (`X-Access-Token`), for talking to it on port 49983
    /// through the proxy; in the answers of create and get only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub envd_access_token: Option<String>,
}

/// Filters of `GET /v1/sandboxes`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(IntoParams))]
pub struct SandboxListQuery {
    /// Comma-separated statuses (default: every status but `stopped`).
    pub status: Option<String>,
    /// `key=value` pairs, comma-separated; all must match.
    pub metadata: Option<String>,
    /// Items per page, 1–200 (default 50).
    #[cfg_attr(feature = "openapi", param(minimum = 1, maximum = 200))]
    pub limit: Option<u32>,
    /// The `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

/// `POST /v1/sandboxes/{id}/exec` and `/exec/stream`. Give exactly one of `command` (run
/// by `/bin/sh -c`) and `argv` (run directly).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ExecRequest {
    /// A shell command line.
    #[serde(default)]
    pub command: Option<String>,
    /// Program and arguments.
    #[serde(default)]
    pub argv: Option<Vec<String>>,
    /// Extra environment variables.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(schema_with = crate::schemas::env_map))]
    pub env: BTreeMap<String, String>,
    /// Working directory (default: the user's home).
    #[serde(default)]
    pub cwd: Option<String>,
    /// User to run as (default: the template's user, root for most).
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(pattern = "^([a-z_][a-z0-9_-]{0,31})?$"))]
    pub user: Option<String>,
    /// Kill the command after this many seconds (default 60, at most 3600; an
    /// installation may set another limit).
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 3600))]
    pub timeout_sec: Option<u32>,
    /// Standard input, base64.
    #[serde(default)]
    #[cfg_attr(
        feature = "openapi",
        schema(pattern = "^([A-Za-z0-9+/]{4})*([A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$")
    )]
    pub stdin_base64: Option<String>,
}

/// How an output field is encoded.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum Encoding {
    /// Text: the bytes were valid UTF-8.
    Utf8,
    /// Base64 of arbitrary bytes.
    Base64,
}

/// Collected result of a command.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct ExecResult {
    /// Exit status; 128+n when killed by signal n.
    pub exit_code: i32,
    /// Standard output, encoded as `stdout_encoding` says.
    pub stdout: String,
    /// Standard error, encoded as `stderr_encoding` says.
    pub stderr: String,
    /// `utf8` when stdout is valid UTF-8, else `base64`.
    pub stdout_encoding: Encoding,
    /// `utf8` when stderr is valid UTF-8, else `base64`.
    pub stderr_encoding: Encoding,
    /// Wall time inside the sandbox.
    pub duration_ms: u64,
    /// Killed because `timeout_sec` passed.
    pub timed_out: bool,
    /// Output beyond the limit was dropped.
    pub stdout_truncated: bool,
    /// Output beyond the limit was dropped.
    pub stderr_truncated: bool,
}

/// One event of a streamed command (server-sent events; the SSE event name is `type`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ExecEvent {
    /// The process started.
    Started {
        /// Its pid inside the sandbox.
        pid: u32,
    },
    /// Bytes on stdout, base64.
    Stdout {
        /// Base64.
        data: String,
    },
    /// Bytes on stderr, base64.
    Stderr {
        /// Base64.
        data: String,
    },
    /// The process exited. Last event.
    Exit {
        /// Exit status.
        exit_code: i32,
        /// Wall time.
        duration_ms: u64,
        /// Killed by the timeout.
        timed_out: bool,
    },
    /// The stream failed. Last event.
    Error {
        /// Stable code.
        code: ErrorCode,
        /// Explanation.
        message: String,
    },
}

/// Kind of a filesystem entry.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum FileType {
    /// Regular file.
    File,
    /// Directory.
    Directory,
    /// Symbolic link.
    Symlink,
    /// Anything else.
    Other,
}

/// A file or directory inside a sandbox.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct EntryInfo {
    /// Base name.
    pub name: String,
    /// Absolute path.
    pub path: String,
    /// Kind.
    #[serde(rename = "type")]
    pub file_type: FileType,
    /// Size in bytes.
    pub size: u64,
    /// Unix mode bits.
    pub mode: u32,
    /// `ls -l` style permissions.
    pub permissions: String,
    /// Owner name.
    pub owner: String,
    /// Group name.
    pub group: String,
    /// Last modification.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub modified_at: Option<DateTime<Utc>>,
    /// Target, for symbolic links.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub symlink_target: Option<String>,
}

/// A directory listing.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct FileList {
    /// Entries, depth-first.
    pub items: Vec<EntryInfo>,
}

/// Query of the file endpoints.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(IntoParams))]
#[serde(deny_unknown_fields)]
pub struct PathQuery {
    /// Absolute path, or relative to the user's home.
    #[cfg_attr(
        feature = "openapi",
        param(min_length = 1, max_length = 4096, pattern = "^[^\\x00]+$")
    )]
    pub path: String,
    /// User whose permissions apply (default `root`).
    #[cfg_attr(feature = "openapi", param(pattern = "^([a-z_][a-z0-9_-]{0,31})?$"))]
    pub user: Option<String>,
    /// Levels to list (directories only; default 1).
    #[cfg_attr(feature = "openapi", param(minimum = 1, maximum = 10))]
    pub depth: Option<u32>,
}

/// `POST /v1/sandboxes/{id}/files/mkdir`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(deny_unknown_fields)]
pub struct MkdirRequest {
    /// Directory to create, with its parents.
    #[cfg_attr(
        feature = "openapi",
        schema(min_length = 1, max_length = 4096, pattern = "^[^\\x00]+$")
    )]
    pub path: String,
    /// Owner (default `root`).
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(pattern = "^([a-z_][a-z0-9_-]{0,31})?$"))]
    pub user: Option<String>,
}

// ------------------------------------------------------------------------ templates

/// A template sandboxes start from.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct Template {
    /// Id.
    pub id: TemplateId,
    /// Name, unique per team.
    pub name: String,
    /// Owning team; the platform team's templates are visible to all.
    pub team_id: TeamId,
    /// A platform template.
    pub platform: bool,
    /// Image (boots) or snapshot (restores).
    pub kind: TemplateKind,
    /// Default vCPUs.
    pub vcpus: u32,
    /// Default memory, MiB.
    pub memory_mb: u32,
    /// Smallest disk, MiB.
    pub disk_size_mb: u32,
    /// Space its files take.
    pub size_bytes: u64,
    /// The host holding its files; sandboxes from it start there. Absent for templates every
    /// host has.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_id: Option<HostId>,
    /// Creation time.
    pub created_at: DateTime<Utc>,
}

/// A tag of a template name: `name:tag` starts sandboxes from the build it points at. The
/// tag `default` is the template `name` itself.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct TemplateTag {
    /// The tag.
    pub tag: String,
    /// The template it points at.
    pub template_id: TemplateId,
    /// The build that made that template, if a build did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub build_id: Option<BuildId>,
    /// When it was pointed there (for `default`: when the template was made).
    pub created_at: DateTime<Utc>,
}

/// `POST /v1/snapshots/{name}/tags`: points tags of a template name at the build another
/// of its tags points at.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(deny_unknown_fields)]
pub struct AssignTagsRequest {
    /// The tag whose build gets the tags (default `default`: the template `name`).
    #[serde(default)]
    #[cfg_attr(
        feature = "openapi",
        schema(pattern = "^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    )]
    pub from: Option<String>,
    /// The tags to point there (1–10; `default` makes that build the template `name`).
    #[cfg_attr(feature = "openapi", schema(schema_with = crate::schemas::some_tags))]
    pub tags: Vec<String>,
}

/// `POST /v1/snapshots`: turns a running or paused sandbox into a template of the team.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(deny_unknown_fields)]
pub struct CreateSnapshotRequest {
    /// The sandbox to capture; it keeps running (or stays paused).
    pub sandbox_id: SandboxId,
    /// Template name: 1–64 letters, digits, `.`, `_` or `-`, starting with a letter or digit.
    #[cfg_attr(
        feature = "openapi",
        schema(pattern = "^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    )]
    pub name: String,
    /// Replace the team's template of that name (default: refuse with `already_exists`).
    #[serde(default)]
    pub overwrite: bool,
    /// `snapshot` (memory and disk: sandboxes resume where it was; the default) or `image`
    /// (the disk only: sandboxes boot from it).
    #[serde(default)]
    pub kind: Option<TemplateKind>,
}

/// Filters of the template lists.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(IntoParams))]
#[serde(deny_unknown_fields)]
pub struct TemplateListQuery {
    /// Only templates of this kind.
    pub kind: Option<TemplateKind>,
}

// ---------------------------------------------------------------------------- hosts

/// `POST /v1/admin/hosts`: a host that an agent will register as.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(deny_unknown_fields)]
pub struct CreateHostRequest {
    /// Label.
    pub name: String,
    /// On `POST /v1/admin/hosts`: the BYOC team the host belongs to (none: a platform
    /// host). Not accepted on `POST /v1/teams/{team_id}/hosts`, whose team it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub team_id: Option<TeamId>,
}

/// `PUT /v1/admin/hosts/{host_id}/drain`.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(deny_unknown_fields)]
pub struct DrainHostRequest {
    /// Cordon the host (`true`: it takes no new sandboxes) or let it take them again.
    pub draining: bool,
    /// What a cordon moves to other hosts of the host's pool, in the background (default
    /// `paused`). Ignored when `draining` is `false`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub moves: Option<DrainMoves>,
}

/// The sandboxes a drain moves away.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum DrainMoves {
    /// None: a cordon only.
    None,
    /// Paused sandboxes.
    #[default]
    Paused,
    /// Paused and running sandboxes (a running one is paused, moved and resumed with its
    /// processes, memory and disk).
    All,
}

/// The answer to a drain: the host, and the sandboxes it moves away.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct HostDrain {
    /// The host as it is now.
    pub host: Host,
    /// Sandboxes being moved to other hosts of its pool, one at a time (each move is
    /// audited as `sandbox.move`; one that fails stays where it is, and draining again
    /// retries it).
    pub moving: Vec<SandboxId>,
}

/// `POST /v1/admin/sandboxes/{sandbox_id}/move`.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(deny_unknown_fields)]
pub struct MoveSandboxRequest {
    /// The host to move it to: an online, undrained host of the sandbox's pool (default:
    /// the one the scheduler picks).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_id: Option<HostId>,
}

/// Query of the host deletes.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(IntoParams))]
#[serde(deny_unknown_fields)]
pub struct DeleteHostQuery {
    /// Destroy the sandboxes the host holds first (without it, a host holding sandboxes is
    /// refused with `409`, naming them).
    pub force: Option<bool>,
}

/// A new host and its one-time registration token (valid one hour).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct CreatedHost {
    /// The host, `pending` until its agent registers.
    pub host: Host,
    /// Pass to `nestbox agent --register-token`.
    pub registration_token: String,
    /// When the token expires.
    pub expires_at: DateTime<Utc>,
}

/// A machine running the host agent.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct Host {
    /// Id.
    pub id: HostId,
    /// Label.
    pub name: String,
    /// Status.
    pub status: HostStatus,
    /// Where the control plane reaches its agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    /// Agent version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// CPUs.
    pub vcpus: u32,
    /// Memory, MiB.
    pub memory_mb: u64,
    /// Disk for sandboxes, MiB.
    pub disk_mb: u64,
    /// Most sandboxes it takes at once.
    pub max_sandboxes: u32,
    /// The team whose own host it is (BYOC); absent for a platform host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub team_id: Option<TeamId>,
    /// That team's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub team_name: Option<String>,
    /// Size of the memory that backs guest RAM, MiB, as its agent last reported it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_memory_mb: Option<u64>,
    /// What its sandboxes hold of that memory, MiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_memory_used_mb: Option<u64>,
    /// Cordoned: it takes no new sandboxes (`PUT /v1/admin/hosts/{host_id}/drain`).
    #[serde(default)]
    pub draining: bool,
    /// Last heartbeat.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_heartbeat_at: Option<DateTime<Utc>>,
    /// Creation time.
    pub created_at: DateTime<Utc>,
}

/// `POST /v1/hosts/register`, sent by an agent with its one-time token.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(deny_unknown_fields)]
pub struct RegisterHostRequest {
    /// The one-time registration token.
    pub token: String,
    /// gRPC URL where the control plane reaches the agent.
    #[cfg_attr(feature = "openapi", schema(pattern = "^https?://[^\\s]+$"))]
    pub address: String,
    /// Agent version.
    #[cfg_attr(feature = "openapi", schema(min_length = 1, max_length = 64))]
    pub version: String,
    /// CPUs.
    pub vcpus: u32,
    /// Memory, MiB.
    pub memory_mb: u64,
    /// Disk for sandboxes, MiB.
    pub disk_mb: u64,
    /// Most sandboxes it takes at once.
    pub max_sandboxes: u32,
}

/// Credentials of a registered host.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct RegisterHostResponse {
    /// The host's id.
    pub host_id: HostId,
    /// Its first token pair.
    #[serde(flatten)]
    pub credentials: HostTokenPair,
    /// Key the control plane signs its calls to this agent with (HS256). Secret.
    pub host_key: String,
    /// How often to heartbeat.
    pub heartbeat_interval_sec: u32,
    /// The agent's TLS server certificate and key, and the CA whose client certificate
    /// (the control plane's) it must require. Secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<HostTls>,
}

/// A host's tokens: the access token its heartbeats carry and the refresh token it trades
/// for the next pair (`POST /v1/hosts/refresh`) before the access token expires. Secret.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct HostTokenPair {
    /// Bearer token of heartbeats (a JWT).
    pub access_token: String,
    /// When it expires.
    pub access_expires_at: DateTime<Utc>,
    /// Traded once for the next pair (stored hashed by the control plane).
    pub refresh_token: String,
    /// When it expires.
    pub refresh_expires_at: DateTime<Utc>,
}

impl std::fmt::Debug for HostTokenPair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostTokenPair")
            .field("access_expires_at", &self.access_expires_at)
            .field("refresh_expires_at", &self.refresh_expires_at)
            .finish_non_exhaustive()
    }
}

/// `POST /v1/hosts/refresh`: a host trades its refresh token for the next pair.
#[derive(Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct RefreshHostRequest {
    /// The refresh token of the host's current pair.
    pub refresh_token: String,
}

impl std::fmt::Debug for RefreshHostRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RefreshHostRequest").finish_non_exhaustive()
    }
}

/// The next pair of a host.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct RefreshHostResponse {
    /// The host's id.
    pub host_id: HostId,
    /// Its new pair (the old one no longer works).
    #[serde(flatten)]
    pub credentials: HostTokenPair,
}

/// TLS material issued by the control plane's CA (PEM).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct HostTls {
    /// The CA's certificate.
    pub ca_pem: String,
    /// The certificate.
    pub cert_pem: String,
    /// Its private key (PKCS#8). Secret.
    pub key_pem: String,
}

impl std::fmt::Debug for HostTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostTls").finish_non_exhaustive()
    }
}

/// `POST /v1/hosts/{id}/heartbeat`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(deny_unknown_fields)]
pub struct HeartbeatRequest {
    /// Sandboxes the agent runs.
    pub sandboxes: u32,
    /// Agent version.
    #[cfg_attr(feature = "openapi", schema(min_length = 1, max_length = 64))]
    pub version: String,
    /// gRPC URL where the control plane reaches the agent now.
    pub address: String,
    /// Size of the memory that backs guest RAM (the agent's tmpfs), MiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_memory_mb: Option<u64>,
    /// What its sandboxes hold of it (running, held and paused in memory; pooled clones,
    /// which give way, not counted), MiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_memory_used_mb: Option<u64>,
}

// -------------------------------------------------------------------------- metrics

/// Query of `GET /v1/sandboxes/{sandbox_id}/metrics`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(IntoParams))]
#[serde(deny_unknown_fields)]
pub struct MetricsQuery {
    /// `10m` (the default: 500 ms samples), `2h` (30 s averages) or `24h` (5 min averages).
    #[cfg_attr(feature = "openapi", param(pattern = "^(10m|2h|24h)$"))]
    pub range: Option<String>,
}

/// One metric point of a sandbox: a sample, or the average of an interval.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct MetricPoint {
    /// When the sample was taken, or the start of the averaged interval.
    pub timestamp: DateTime<Utc>,
    /// CPU time of the sandbox's VM over wall time, in percent of one host CPU (0 to
    /// 100 × vCPUs).
    pub cpu_pct: f64,
    /// Host memory the VM uses (its resident set).
    pub mem_bytes: u64,
    /// Host disk the sandbox's copy-on-write disk takes.
    pub disk_bytes: u64,
}

/// A sandbox's resource use over one range.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct SandboxMetrics {
    /// The sandbox.
    pub sandbox_id: SandboxId,
    /// `10m`, `2h` or `24h`.
    pub range: String,
    /// Spacing of the points, milliseconds.
    pub interval_ms: u32,
    /// `live` (from its host: the sandbox runs) or `stored` (saved when it was paused).
    pub source: String,
    /// Oldest first; the last point of `2h` and `24h` may cover an unfinished interval.
    pub points: Vec<MetricPoint>,
}

// ---------------------------------------------------------------------------- logs

/// A log entry's severity (ordered: `debug < info < warn < error`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    /// Debugging detail.
    Debug,
    /// Informational.
    Info,
    /// A warning.
    Warn,
    /// An error.
    Error,
}

impl LogLevel {
    /// The lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Debug => "debug",
            Self::Info => "info",
            Self::Warn => "warn",
            Self::Error => "error",
        }
    }

    /// Parses a level name, case-insensitively (`trace` is `debug`, `warning` is `warn`,
    /// `fatal` is `error`, as loggers name them).
    pub fn parse(s: &str) -> Option<Self> {
        match s.to_ascii_lowercase().as_str() {
            "trace" | "debug" => Some(Self::Debug),
            "info" => Some(Self::Info),
            "warn" | "warning" => Some(Self::Warn),
            "error" | "fatal" => Some(Self::Error),
            _ => None,
        }
    }
}

/// Which way a log is read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum LogDirection {
    /// Oldest first.
    #[default]
    Forward,
    /// Newest first.
    Backward,
}

/// Query of `GET /v1/sandboxes/{sandbox_id}/logs`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(IntoParams))]
#[serde(deny_unknown_fields)]
pub struct LogsQuery {
    /// Entries per page, 1–1000 (default 100).
    #[cfg_attr(feature = "openapi", param(minimum = 1, maximum = 1000))]
    pub limit: Option<u32>,
    /// `forward` (the default: oldest first) or `backward` (newest first).
    pub direction: Option<LogDirection>,
    /// Forward: entries at or after this time; backward: at or before it (RFC 3339).
    pub since: Option<DateTime<Utc>>,
    /// The `next_cursor` of the previous page: the page after it, in the same direction.
    pub cursor: Option<String>,
    /// Only entries at least this severe.
    pub level: Option<LogLevel>,
    /// Only entries whose message contains this text (case-insensitive; up to 256 bytes).
    pub search: Option<String>,
}

/// One entry of a sandbox's log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct LogEntry {
    /// Its number in the sandbox's log (from 1, without gaps).
    pub seq: u64,
    /// When it was written (never earlier than the entry before it).
    pub timestamp: DateTime<Utc>,
    /// Severity.
    pub level: LogLevel,
    /// The message.
    pub message: String,
    /// Structured fields; `source` is `console` (the kernel, init), `guest` (the guest
    /// agent: processes started and ended, …) or `host` (paused, resumed).
    pub fields: BTreeMap<String, String>,
}

/// A page of a sandbox's log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct SandboxLogs {
    /// In the direction asked for.
    pub entries: Vec<LogEntry>,
    /// Pass as `cursor` for the next page (also once `has_more` is false: following a
    /// running sandbox's log forward, it returns what was written since). Absent only when
    /// the page is empty and no cursor was given.
    pub next_cursor: Option<String>,
    /// Whether more entries matched than this page holds.
    pub has_more: bool,
}

// ---------------------------------------------------------------------------- audit

/// Query of `GET /v1/audit-logs`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(IntoParams))]
#[serde(deny_unknown_fields)]
pub struct AuditLogQuery {
    /// Items per page, 1–200 (default 50).
    #[cfg_attr(feature = "openapi", param(minimum = 1, maximum = 200))]
    pub limit: Option<u32>,
    /// The `next_cursor` of the previous page.
    pub cursor: Option<String>,
    /// Only entries about this kind of resource, e.g. `sandbox`.
    #[cfg_attr(feature = "openapi", param(pattern = "^[a-z0-9_]{1,64}$"))]
    pub resource_type: Option<String>,
    /// Only entries of this action, e.g. `sandbox.create`.
    #[cfg_attr(feature = "openapi", param(pattern = "^[a-z0-9_.]{1,64}$"))]
    pub action: Option<String>,
    /// `team` (the default: the caller's team's entries; its owner and admins) or
    /// `platform` (entries of no team, such as host registrations; platform admins only).
    #[cfg_attr(feature = "openapi", param(pattern = "^(team|platform)$"))]
    pub scope: Option<String>,
}

/// One audited change.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct AuditLog {
    /// Id.
    pub id: AuditLogId,
    /// Team the change belongs to (absent for platform-scope changes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub team_id: Option<TeamId>,
    /// `user`, `api_key`, `host` or `system`.
    pub actor_type: String,
    /// Prefixed id of the actor.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actor_id: Option<String>,
    /// What was done, e.g. `sandbox.create`.
    pub action: String,
    /// Kind of resource, e.g. `sandbox`.
    pub resource_type: String,
    /// Prefixed id of the resource.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource_id: Option<String>,
    /// `success` or `failure`.
    pub status: String,
    /// Extra context.
    pub details: serde_json::Value,
    /// When.
    pub created_at: DateTime<Utc>,
}

// ------------------------------------------------- processes, terminals, file watching

mod processes;
pub use processes::*;

// ------------------------------------------------------------------ template builds

mod builds;
pub use builds::*;
