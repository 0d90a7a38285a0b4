//! Sandboxes: create, read, list, destroy, and what runs inside them (commands, files).
//!
//! Rules:
//! - a team sees only its own sandboxes: another team's sandbox is "not found";
//! - requests are validated at the edge against the configured [`crate::config::Limits`];
//!   a value beyond a limit is `limit_exceeded` naming the limit;
//! - a sandbox from a `snapshot` template keeps the snapshot's vCPUs and memory (asking for
//!   others is `invalid_request`) and by default its disk (a larger one is fine); a sandbox
//!   from any template stored on one host (`host_id`) is placed on that host only;
//! - create records the sandbox (`pending`), places it (`starting`), then asks the host
//!   agent to boot it; the agent call runs to its end even if the client goes away, and
//!   leaves the sandbox `running`, or `error` with the reason (the agent has released
//!   everything by then);
//! - destroy stores the sandbox's 24 h metrics tier the agent kept ([`super::metrics`]);
//! - destroy swallows only "not found on the agent" (already gone); any other agent error
//!   is returned and the sandbox keeps its status;
//! - commands and file operations need a `running` sandbox (else `sandbox_not_running`)
//!   and count as activity;
//! - pause, resume and keep-alive are in [`super::pause`].

use std::collections::BTreeMap;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use bytes::Bytes;
use futures::{Stream, StreamExt};
use nestbox_db::{hosts, sandboxes, teams, templates};
use nestbox_proto::hostagent::{
    self as pb, CreateSandboxRequest as PbCreate, DestroySandboxRequest, ExecRequest as PbExec,
    exec_event, read_file_response, write_file_request,
};
use nestbox_types::api::{
    self, CreateSandboxRequest, Encoding, EntryInfo, ExecEvent, ExecRequest, ExecResult, FileType,
};
use nestbox_types::egress::EgressRules;
use nestbox_types::limits::{DEFAULT_DISK_SIZE_MB, DEFAULT_TEMPLATE, DEFAULT_TIMEOUT_SEC};
use nestbox_types::{ErrorCode, HostId, SandboxId, SandboxStatus, TemplateKind};

use super::egress::{pb_egress, validate_egress};
use super::{AuditActor, AuditEntry};
use crate::auth::{SandboxSecret, sandbox_secret};
use crate::error::{ApiError, ApiResult, from_agent};
use crate::extract::Caller;
use crate::hostpool::AgentClient;
use crate::scheduler::{Candidate, Demand};
use crate::state::Services;

/// Longest path accepted for file operations.
const MAX_PATH: usize = 4096;
/// Longest shell command accepted.
const MAX_COMMAND: usize = 128 * 1024;
/// Largest stdin of a collected exec.
const MAX_STDIN: usize = 16 << 20;
/// Exec timeout when the request gives none.
const DEFAULT_EXEC_TIMEOUT: u32 = 60;
/// Upload chunk size sent to the agent.
const UPLOAD_CHUNK: usize = 256 * 1024;

/// API view of a sandbox.
pub fn sandbox_view(s: &sandboxes::Sandbox) -> api::Sandbox {
    api::Sandbox {
        id: s.id,
        team_id: s.team_id,
        template: s.template_name.clone(),
        status: s.status,
        error: s.error.clone(),
        vcpus: s.vcpus,
        memory_mb: s.memory_mb,
        disk_size_mb: s.disk_size_mb,
        timeout_sec: s.timeout_sec,
        metadata: s.metadata.clone(),
        host_id: s.host_id,
        created_at: s.created_at,
        started_at: s.started_at,
        stopped_at: s.stopped_at,
        expires_at: (s.status == SandboxStatus::Running)
            .then_some(s.expires_at)
            .flatten(),
        lifetime_sec: s.lifetime_sec,
        on_expiry: s.on_expiry,
        egress: s.egress.clone(),
        public_traffic: s.public_traffic,
        auto_resume: s.auto_resume,
        traffic_access_token: None,
        envd_access_token: None,
    }
}

pub(crate) fn sandbox_not_found(id: SandboxId) -> ApiError {
    ApiError::new(
        ErrorCode::SandboxNotFound,
        format!("sandbox {id} not found"),
    )
}

fn validate_env(limits: &crate::config::Limits, env: &BTreeMap<String, String>) -> ApiResult<()> {
    if env.len() > limits.max_env_vars {
        return Err(ApiError::limit(
            "env",
            format!("{} variables", limits.max_env_vars),
            "",
        ));
    }
    let mut total = 0usize;
    for (k, v) in env {
        let valid = !k.is_empty()
            && k.len() <= 256
            && k.chars()
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !valid {
            return Err(ApiError::invalid(format!(
                "env: `{}` is not a valid variable name",
                k.chars().take(64).collect::<String>()
            )));
        }
        if v.contains('\0') {
            return Err(ApiError::invalid(format!(
                "env: the value of {k} contains a NUL byte"
            )));
        }
        total += k.len() + v.len();
    }
    if total > 64 * 1024 {
        return Err(ApiError::limit("env", "64 KiB", " in total"));
    }
    Ok(())
}

fn validate_metadata(
    limits: &crate::config::Limits,
    md: &BTreeMap<String, String>,
) -> ApiResult<()> {
    if md.len() > limits.max_metadata {
        return Err(ApiError::limit(
            "metadata",
            format!("{} pairs", limits.max_metadata),
            "",
        ));
    }
    for (k, v) in md {
        if k.is_empty() || k.len() > 64 || k.contains([',', '=']) || k.chars().any(char::is_control)
        {
            return Err(ApiError::invalid(
                "metadata keys must be 1–64 characters without `,`, `=` or control characters",
            ));
        }
        if v.len() > 512 || v.contains(',') || v.chars().any(char::is_control) {
            return Err(ApiError::invalid(
                "metadata values must be at most 512 characters without `,` or control characters",
            ));
        }
    }
    Ok(())
}

pub(crate) fn validate_path(path: &str) -> ApiResult<()> {
    if path.is_empty() || path.len() > MAX_PATH || path.contains('\0') {
        return Err(ApiError::invalid(format!(
            "path must be 1–{MAX_PATH} bytes without NUL"
        )));
    }
    Ok(())
}

pub(crate) fn validate_user(user: &Option<String>) -> ApiResult<String> {
    match user.as_deref() {
        None | Some("") => Ok(String::new()),
        Some(u) => {
            let ok = u.len() <= 32
                && u.chars()
                    .next()
                    .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
                && u.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-');
            if ok {
                Ok(u.to_string())
            } else {
                Err(ApiError::invalid("user must be a valid user name"))
            }
        }
    }
}

fn encode_output(bytes: Vec<u8>) -> (String, Encoding) {
    match String::from_utf8(bytes) {
        Ok(s) => (s, Encoding::Utf8),
        Err(e) => (B64.encode(e.into_bytes()), Encoding::Base64),
    }
}

/// API view of an agent entry.
pub fn entry_view(e: &pb::EntryInfo) -> EntryInfo {
    let file_type = match pb::FileType::try_from(e.r#type).unwrap_or(pb::FileType::Unspecified) {
        pb::FileType::File => FileType::File,
        pb::FileType::Directory => FileType::Directory,
        pb::FileType::Symlink => FileType::Symlink,
        pb::FileType::Unspecified => FileType::Other,
    };
    EntryInfo {
        name: e.name.clone(),
        path: e.path.clone(),
        file_type,
        size: e.size,
        mode: e.mode,
        permissions: e.permissions.clone(),
        owner: e.owner.clone(),
        group: e.group.clone(),
        modified_at: (e.modified_unix_ms != 0)
            .then(|| chrono::DateTime::from_timestamp_millis(e.modified_unix_ms))
            .flatten(),
        symlink_target: e.symlink_target.clone(),
    }
}

/// A command after validation, ready for the agent.
pub(crate) struct Command {
    pub(crate) cmd: String,
    pub(crate) args: Vec<String>,
    pub(crate) env: BTreeMap<String, String>,
    pub(crate) cwd: String,
    pub(crate) user: String,
    pub(crate) timeout_sec: u32,
    pub(crate) stdin: Vec<u8>,
}

impl Services {
    pub(crate) fn command(&self, req: &ExecRequest) -> ApiResult<Command> {
        let (cmd, args) = match (&req.command, &req.argv) {
            (Some(c), None) => {
                if c.trim().is_empty() {
                    return Err(ApiError::invalid("command is empty"));
                }
                if c.len() > MAX_COMMAND || c.contains('\0') {
                    return Err(ApiError::invalid(
                        "command must be at most 128 KiB without NUL",
                    ));
                }
                ("/bin/sh".to_string(), vec!["-c".to_string(), c.clone()])
            }
            (None, Some(argv)) => {
                let Some((first, rest)) = argv.split_first() else {
                    return Err(ApiError::invalid("argv is empty"));
                };
                if first.is_empty() || argv.iter().any(|a| a.contains('\0')) {
                    return Err(ApiError::invalid(
                        "argv[0] must be non-empty and no argument may contain NUL",
                    ));
                }
                if argv.iter().map(String::len).sum::<usize>() > MAX_COMMAND {
                    return Err(ApiError::invalid("argv must be at most 128 KiB"));
                }
                (first.clone(), rest.to_vec())
            }
            _ => {
                return Err(ApiError::invalid(
                    "give exactly one of `command` (a shell command line) and `argv`",
                ));
            }
        };
        validate_env(&self.cfg.limits, &req.env)?;
        let cwd = req.cwd.clone().unwrap_or_default();
        if cwd.len() > MAX_PATH || cwd.contains('\0') {
            return Err(ApiError::invalid("cwd is too long or contains NUL"));
        }
        let user = validate_user(&req.user)?;
        let timeout_sec = req.timeout_sec.unwrap_or(DEFAULT_EXEC_TIMEOUT);
        if timeout_sec == 0 {
            return Err(ApiError::invalid("timeout_sec must be at least 1"));
        }
        if timeout_sec > self.cfg.limits.max_exec_timeout_sec {
            return Err(ApiError::limit(
                "timeout_sec",
                self.cfg.limits.max_exec_timeout_sec,
                " s",
            ));
        }
        let stdin = match &req.stdin_base64 {
            Some(s) => B64
                .decode(s)
                .map_err(|_| ApiError::invalid("stdin_base64 is not valid base64"))?,
            None => Vec::new(),
        };
        if stdin.len() > MAX_STDIN {
            return Err(ApiError::limit("stdin", "16 MiB", ""));
        }
        Ok(Command {
            cmd,
            args,
            env: req.env.clone(),
            cwd,
            user,
            timeout_sec,
            stdin,
        })
    }

    /// The caller's team's sandbox, with its access tokens.
    pub async fn get_sandbox(&self, caller: &Caller, id: SandboxId) -> ApiResult<api::Sandbox> {
        let sb = self.sandbox_row(caller, id).await?;
        Ok(self.with_tokens(&sb))
    }

    /// A sandbox's view with its current access tokens.
    pub(crate) fn with_tokens(&self, sb: &sandboxes::Sandbox) -> api::Sandbox {
        let mut view = sandbox_view(sb);
        let secret = &self.cfg.master_secret;
        let (id, generation) = (sb.id, sb.token_generation);
        view.traffic_access_token = Some(sandbox_secret(
            secret,
            SandboxSecret::Traffic,
            id,
            generation,
        ));
        view.envd_access_token = Some(sandbox_secret(secret, SandboxSecret::Envd, id, generation));
        view
    }

    pub(crate) async fn sandbox_row(
        &self,
        caller: &Caller,
        id: SandboxId,
    ) -> ApiResult<sandboxes::Sandbox> {
        sandboxes::get_for_team(&self.db, caller.team, id)
            .await
            .map_err(|e| {
                if e.is_not_found() {
                    sandbox_not_found(id)
                } else {
                    e.into()
                }
            })
    }

    /// The client of a sandbox's (or template's) host, which must be online.
    pub(crate) async fn agent_for(&self, host: Option<HostId>) -> ApiResult<(HostId, AgentClient)> {
        let (host, address) = self.host_address(host).await?;
        Ok((host, self.pool.client(host, &address)?))
    }

    /// The address (`http://ip:port`) of a sandbox's (or template's) host, which must be
    /// online.
    pub(crate) async fn host_address(&self, host: Option<HostId>) -> ApiResult<(HostId, String)> {
        let host = host
            .ok_or_else(|| ApiError::new(ErrorCode::HostUnavailable, "the sandbox has no host"))?;
        let h = hosts::get(&self.db, host).await.map_err(|e| {
            if e.is_not_found() {
                ApiError::new(ErrorCode::HostUnavailable, "the sandbox's host was deleted")
            } else {
                e.into()
            }
        })?;
        if h.status != nestbox_types::HostStatus::Online {
            return Err(ApiError::new(
                ErrorCode::HostUnavailable,
                format!("host {host} is {}", h.status),
            ));
        }
        let address = h.address.ok_or_else(|| {
            ApiError::new(ErrorCode::HostUnavailable, "the host has not registered")
        })?;
        Ok((host, address))
    }

    /// A running sandbox of the caller's team and its host's client.
    pub(crate) async fn running(
        &self,
        caller: &Caller,
        id: SandboxId,
    ) -> ApiResult<(sandboxes::Sandbox, AgentClient)> {
        let sb = self.sandbox_row(caller, id).await?;
        if sb.status != SandboxStatus::Running {
            return Err(ApiError::new(
                ErrorCode::SandboxNotRunning,
                format!("sandbox {id} is {}", sb.status),
            ));
        }
        let (_, client) = self.agent_for(sb.host_id).await?;
        Ok((sb, client))
    }

    pub(crate) async fn touch(&self, id: SandboxId) {
        if let Err(e) = sandboxes::touch_last_active(&self.db, id).await {
            tracing::warn!(sandbox = %id, error = %e, "recording activity");
        }
    }

    /// Online hosts that may take `team`'s sandboxes, with their load: a team that brings
    /// its own hosts (BYOC) gets only those, every other team only the platform's; a
    /// draining host takes none.
    pub(crate) async fn candidates(
        &self,
        team: nestbox_types::TeamId,
    ) -> ApiResult<Vec<Candidate>> {
        let byoc = !team.is_platform()
            && teams::get(&self.db, team)
                .await
                .map(|t| t.is_byoc)
                .or_else(|e| if e.is_not_found() { Ok(false) } else { Err(e) })?;
        let mut out = Vec::new();
        for (h, load) in self.fleet.hosts(&self.db).await? {
            let eligible = !h.draining
                && if byoc {
                    h.team_id == Some(team)
                } else {
                    h.team_id.is_none()
                };
            let Some(address) = h.address.clone().filter(|_| eligible) else {
                continue;
            };
            out.push(Candidate {
                host: h.id,
                address,
                max_sandboxes: h.specs.max_sandboxes.unwrap_or(u32::MAX),
                memory_mb: u64::from(h.specs.memory_mb),
                sandboxes: load.sandboxes,
                used_memory_mb: load.memory_mb,
                guest_memory: h
                    .guest_memory
                    .map(|m| (u64::from(m.total_mb), u64::from(m.used_mb))),
            });
        }
        Ok(out)
    }

    /// Creates a sandbox and returns it running.
    pub async fn create_sandbox(
        &self,
        caller: &Caller,
        req: &CreateSandboxRequest,
    ) -> ApiResult<api::Sandbox> {
        let started = std::time::Instant::now();
        let created = self.create(caller, req).await;
        let outcome = match &created {
            Ok(_) => "ok".to_string(),
            Err(e) => e.code.to_string(),
        };
        self.telemetry
            .create(&outcome, started.elapsed().as_secs_f64());
        created
    }

    async fn create(&self, caller: &Caller, req: &CreateSandboxRequest) -> ApiResult<api::Sandbox> {
        let name = req
            .template
            .clone()
            .unwrap_or_else(|| DEFAULT_TEMPLATE.to_string());
        let Some(template) = self.resolve_template(caller, &name).await? else {
            // While no host has registered its templates, "not found" would be a lie.
            if let Err(reason) = self.readiness().await {
                return Err(ApiError::new(
                    ErrorCode::HostUnavailable,
                    format!("the platform is starting ({reason}); retry shortly"),
                ));
            }
            return Err(ApiError::new(
                ErrorCode::TemplateNotFound,
                format!("template `{name}` not found"),
            ));
        };
        self.create_from(caller, req, template).await
    }

    /// Creates a sandbox from `template` (already resolved and visible to the caller's
    /// team; `req.template` is not looked at) and returns it running.
    pub(crate) async fn create_from(
        &self,
        caller: &Caller,
        req: &CreateSandboxRequest,
        template: templates::Template,
    ) -> ApiResult<api::Sandbox> {
        let limits = &self.cfg.limits;
        let name = template.public_name().to_string();
        // A snapshot resumes a machine as it was: its vCPUs and memory are fixed.
        let snapshot = template.kind == TemplateKind::Snapshot;
        let fixed = |field: &str, asked: Option<u32>, has: u32, unit: &str| match asked {
            Some(v) if snapshot && v != has => Err(ApiError::invalid(format!(
                "{field} must be {has}{unit} (or omitted): sandboxes from snapshot `{name}` \
                 keep its machine"
            ))),
            Some(v) => Ok(v),
            None => Ok(has),
        };
        let vcpus = fixed("vcpus", req.vcpus, template.vcpus, "")?;
        let memory_mb = fixed("memory_mb", req.memory_mb, template.memory_mb, " MiB")?;
        if vcpus == 0 {
            return Err(ApiError::invalid("vcpus must be at least 1"));
        }
        if vcpus > limits.max_vcpus {
            return Err(ApiError::limit("vcpus", limits.max_vcpus, ""));
        }
        if memory_mb < limits.min_memory_mb {
            return Err(ApiError::invalid(format!(
                "memory_mb must be at least {}",
                limits.min_memory_mb
            )));
        }
        if memory_mb > limits.max_memory_mb {
            return Err(ApiError::limit("memory_mb", limits.max_memory_mb, " MiB"));
        }
        let disk_size_mb = req.disk_size_mb.unwrap_or(if snapshot {
            template.disk_size_mb
        } else {
            DEFAULT_DISK_SIZE_MB.max(template.disk_size_mb)
        });
        if disk_size_mb < template.disk_size_mb {
            return Err(ApiError::invalid(format!(
                "disk_size_mb must be at least {} for template `{name}`",
                template.disk_size_mb
            )));
        }
        if disk_size_mb > limits.max_disk_mb {
            return Err(ApiError::limit("disk_size_mb", limits.max_disk_mb, " MiB"));
        }
        let timeout_sec = req.timeout_sec.unwrap_or(DEFAULT_TIMEOUT_SEC);
        if timeout_sec > limits.max_timeout_sec {
            return Err(ApiError::limit("timeout_sec", limits.max_timeout_sec, " s"));
        }
        // A built template's environment (under the request's own), user and directory.
        let defaults = if template.team_id.is_platform() {
            nestbox_db::builds::TemplateDefaults::default()
        } else {
            nestbox_db::builds::template_defaults(&self.db, template.id).await?
        };
        let mut env = defaults.env.clone();
        env.extend(req.env.clone());
        validate_env(limits, &env)?;
        validate_metadata(limits, &req.metadata)?;
        if let Some(lifetime) = req.lifetime_sec {
            self.validate_lifetime(lifetime)?;
        }
        let egress = match &req.egress {
            Some(e) => validate_egress(&e.rules())?,
            None => EgressRules::default(),
        };

        let placing = std::time::Instant::now();
        let candidates = self.candidates(caller.team).await?;
        let demand = Demand {
            memory_mb,
            overcommit: self.cfg.memory_overcommit,
        };
        // A template whose files live on hosts starts on one that holds them if one has
        // room; otherwise on another host of the pool, which gets a copy first.
        let holders = match template.host_id {
            Some(_) => templates::holders(&self.db, template.id).await?,
            None => Vec::new(),
        };
        let holding: Vec<Candidate> = candidates
            .iter()
            .filter(|c| holders.contains(&c.host))
            .cloned()
            .collect();
        let placed = self
            .scheduler
            .pick(&holding, &demand)
            .or_else(|| self.scheduler.pick(&candidates, &demand))
            .cloned();
        self.telemetry.placement(placing.elapsed().as_secs_f64());
        self.telemetry.decision(
            self.cfg.scheduler.name(),
            if placed.is_some() {
                "placed"
            } else {
                "no_capacity"
            },
        );
        let placed = placed.ok_or_else(|| {
            let message = match () {
                () if candidates.is_empty() => {
                    "no host of this team's pool is online; retry later".into()
                }
                () if candidates.iter().any(Candidate::has_slot) => format!(
                    "no host has guest memory for {memory_mb} MiB more right now; retry later"
                ),
                () => "no host has room for this sandbox right now; retry later".into(),
            };
            ApiError::new(ErrorCode::NoCapacity, message)
        })?;

        let sb = sandboxes::insert(
            &self.db,
            &sandboxes::NewSandbox {
                team_id: caller.team,
                template_id: Some(template.id),
                template_name: name.clone(),
                vcpus,
                memory_mb,
                disk_size_mb,
                timeout_sec,
                env: env.clone(),
                metadata: req.metadata.clone(),
                created_by: caller.actor.id_string(),
                lifetime_sec: req.lifetime_sec,
                on_expiry: req.on_expiry.unwrap_or(nestbox_types::Expiry::Destroy),
                egress: egress.clone(),
                public_traffic: req.public_traffic.unwrap_or(false),
                auto_resume: req.auto_resume.unwrap_or(false),
            },
        )
        .await?;
        let id = sb.id;
        sandboxes::set_host(&self.db, id, Some(placed.host)).await?;
        self.fleet.placed(placed.host, memory_mb);
        sandboxes::transition(
            &self.db,
            id,
            &[SandboxStatus::Pending],
            SandboxStatus::Starting,
            None,
        )
        .await?;

        let access_token = sandbox_secret(
            &self.cfg.master_secret,
            SandboxSecret::Envd,
            id,
            sb.token_generation,
        );
        let request = PbCreate {
            sandbox_id: id.to_string(),
            team_id: caller.team.to_string(),
            template: name.clone(),
            vcpus,
            memory_mb,
            disk_size_mb,
            timeout_sec,
            env: env.into_iter().collect(),
            access_token,
            // Templates stored on a host are found there by id; the built-in ones by name.
            template_id: template
                .host_id
                .map(|_| template.id.to_string())
                .unwrap_or_default(),
            // A fork's one-off template gets no pooled clone.
            no_pool: template.ephemeral,
            egress: pb_egress(&egress),
            default_user: defaults.user.unwrap_or_default(),
            default_workdir: defaults.workdir.unwrap_or_default(),
        };
        let mut client = self.pool.client(placed.host, &placed.address)?;
        let db = self.db.clone();
        let host = placed.host;
        let timeout = self.cfg.create_timeout;
        // A host that lacks the template's files gets a copy first.
        let copy = (!holders.contains(&host) && template.host_id.is_some())
            .then(|| (self.copier(), template.clone()));
        // Detached: the outcome is recorded even if the client disconnects meanwhile.
        let outcome = tokio::spawn(async move {
            let copied = match copy {
                Some((copier, template)) => copier.ensure(&template, host, &client).await,
                None => Ok(()),
            };
            let created = match copied {
                Ok(()) => {
                    let mut rpc = tonic::Request::new(request);
                    rpc.set_timeout(timeout);
                    client.create_sandbox(rpc).await.map_err(|s| {
                        let err = from_agent(&s);
                        let reason = format!("{}: {}", err.code, s.message());
                        (err, reason)
                    })
                }
                Err(err) => {
                    let reason =
                        format!("{}: copying its template here: {}", err.code, err.message);
                    Err((err, reason))
                }
            };
            match created {
                Ok(resp) => {
                    let started = resp
                        .into_inner()
                        .sandbox
                        .and_then(|s| chrono::DateTime::from_timestamp_millis(s.started_at_unix_ms))
                        .unwrap_or_else(chrono::Utc::now);
                    match sandboxes::set_running(&db, id, host, started).await {
                        // A lifetime runs from the start, not from the request.
                        Ok(true) => sandboxes::restart_lifetime(&db, id, None)
                            .await
                            .map_err(ApiError::from),
                        Ok(false) => Err(ApiError::conflict(format!(
                            "sandbox {id} was destroyed while it started"
                        ))),
                        Err(e) => Err(ApiError::from(e)),
                    }
                }
                Err((err, reason)) => {
                    if let Err(e) = sandboxes::transition(
                        &db,
                        id,
                        &[SandboxStatus::Starting, SandboxStatus::Pending],
                        SandboxStatus::Error,
                        Some(&reason),
                    )
                    .await
                    {
                        tracing::error!(sandbox = %id, error = %e, "recording a failed create");
                    }
                    Err(err)
                }
            }
        })
        .await
        .map_err(|e| ApiError::internal(format!("create task: {e}")))?;
        if outcome.is_err() {
            // What it held is free again.
            self.fleet.invalidate();
        }

        self.audit(AuditEntry {
            actor: AuditActor::Caller(*caller),
            team: Some(caller.team),
            action: "sandbox.create",
            resource_type: "sandbox",
            resource_id: Some(id.to_string()),
            ok: outcome.is_ok(),
            details: serde_json::json!({
                "template": name, "vcpus": vcpus, "memory_mb": memory_mb,
                "disk_size_mb": disk_size_mb, "host": host.to_string(),
                "error": outcome.as_ref().err().map(|e| e.message.clone()),
            }),
        })
        .await;
        match outcome {
            Ok(()) => self.get_sandbox(caller, id).await,
            Err(e) => Err(ApiError::new(
                e.code,
                format!("sandbox {id} failed to start: {}", e.message),
            )),
        }
    }

    /// A page of the caller's team's sandboxes.
    pub async fn list_sandboxes(
        &self,
        caller: &Caller,
        q: &api::SandboxListQuery,
    ) -> ApiResult<api::Page<api::Sandbox>> {
        let statuses = match q.status.as_deref().filter(|s| !s.is_empty()) {
            Some(s) => s
                .split(',')
                .map(|p| {
                    p.trim()
                        .parse::<SandboxStatus>()
                        .map_err(|e| ApiError::invalid(e.to_string()))
                })
                .collect::<Result<Vec<_>, _>>()?,
            None => SandboxStatus::ALL
                .iter()
                .copied()
                .filter(|s| *s != SandboxStatus::Stopped)
                .collect(),
        };
        let mut metadata = Vec::new();
        if let Some(m) = q.metadata.as_deref().filter(|s| !s.is_empty()) {
            for pair in m.split(',') {
                let (k, v) = pair.split_once('=').ok_or_else(|| {
                    ApiError::invalid(
                        "metadata filter must be `key=value` pairs separated by commas",
                    )
                })?;
                metadata.push((k.trim().to_string(), v.trim().to_string()));
            }
        }
        let limit = q.limit.unwrap_or(50);
        if !(1..=200).contains(&limit) {
            return Err(ApiError::invalid("limit must be 1–200"));
        }
        let paged = self
            .sandbox_page(
                caller,
                sandboxes::SandboxFilter { statuses, metadata },
                limit,
                q.cursor.clone(),
            )
            .await?;
        Ok(api::Page {
            items: paged.items.iter().map(sandbox_view).collect(),
            next_cursor: paged.next_cursor,
        })
    }

    /// A page of the caller's team's sandbox records matching `filter`, newest first.
    pub(crate) async fn sandbox_page(
        &self,
        caller: &Caller,
        filter: sandboxes::SandboxFilter,
        limit: u32,
        cursor: Option<String>,
    ) -> ApiResult<nestbox_db::Paged<sandboxes::Sandbox>> {
        let page = nestbox_db::Page { limit, cursor };
        Ok(sandboxes::list_for_team(&self.db, caller.team, &filter, &page).await?)
    }

    /// Destroys a sandbox. Idempotent for sandboxes already stopped.
    pub async fn destroy_sandbox(&self, caller: &Caller, id: SandboxId) -> ApiResult<()> {
        let sb = self.sandbox_row(caller, id).await?;
        match sb.status {
            SandboxStatus::Stopped => return Ok(()),
            SandboxStatus::Pending | SandboxStatus::Starting => {
                return Err(ApiError::conflict(format!(
                    "sandbox {id} is {}; retry once it has started",
                    sb.status
                )));
            }
            SandboxStatus::Error => {}
            SandboxStatus::Running | SandboxStatus::Paused | SandboxStatus::Missing => {
                let (_, mut client) = self.agent_for(sb.host_id).await?;
                let mut rpc = tonic::Request::new(DestroySandboxRequest {
                    sandbox_id: id.to_string(),
                });
                rpc.set_timeout(Duration::from_secs(60));
                match client.destroy_sandbox(rpc).await {
                    // The agent kept the 24 h metrics tier for us.
                    Ok(_) => {
                        super::metrics::flush_logged(&self.db, &mut client, id, "destroy").await
                    }
                    Err(status) => {
                        let code = nestbox_proto::error_code(&status);
                        if code != ErrorCode::SandboxNotFound {
                            return Err(from_agent(&status));
                        }
                    }
                }
            }
        }
        let from = [
            SandboxStatus::Running,
            SandboxStatus::Paused,
            SandboxStatus::Missing,
            SandboxStatus::Error,
        ];
        sandboxes::transition(
            &self.db,
            id,
            &from,
            SandboxStatus::Stopped,
            sb.error.as_deref(),
        )
        .await?;
        self.fleet.invalidate();
        self.audit(AuditEntry {
            actor: AuditActor::Caller(*caller),
            team: Some(caller.team),
            action: "sandbox.destroy",
            resource_type: "sandbox",
            resource_id: Some(id.to_string()),
            ok: true,
            details: serde_json::json!({ "previous_status": sb.status }),
        })
        .await;
        if let Some(template) = sb.template_id {
            self.drop_fork_template(template).await;
        }
        Ok(())
    }

    /// Deletes `template` if it is a hidden template (a fork's one-off template, a
    /// replaced or untagged build) that nothing holds any more (else the host monitor's
    /// sweep gets it later): see [`Services::release_template`].
    async fn drop_fork_template(&self, template: nestbox_types::TemplateId) {
        self.release_template(template).await;
    }

    /// Runs a command and collects its output.
    pub async fn exec(
        &self,
        caller: &Caller,
        id: SandboxId,
        req: &ExecRequest,
    ) -> ApiResult<ExecResult> {
        let c = self.command(req)?;
        let (_, mut client) = self.running(caller, id).await?;
        let timeout = Duration::from_secs(u64::from(c.timeout_sec));
        let mut rpc = tonic::Request::new(PbExec {
            sandbox_id: id.to_string(),
            cmd: c.cmd,
            args: c.args,
            env: c.env.into_iter().collect(),
            cwd: c.cwd,
            user: c.user,
            timeout_ms: u32::try_from(timeout.as_millis()).unwrap_or(u32::MAX),
            stdin: c.stdin,
            max_output_bytes: 0,
        });
        rpc.set_timeout(timeout + Duration::from_secs(15));
        let out = client
            .exec(rpc)
            .await
            .map_err(|s| from_agent(&s))?
            .into_inner();
        self.touch(id).await;
        let (stdout, stdout_encoding) = encode_output(out.stdout);
        let (stderr, stderr_encoding) = encode_output(out.stderr);
        Ok(ExecResult {
            exit_code: out.exit_code,
            stdout,
            stderr,
            stdout_encoding,
            stderr_encoding,
            duration_ms: out.duration_ms,
            timed_out: out.timed_out,
            stdout_truncated: out.stdout_truncated,
            stderr_truncated: out.stderr_truncated,
        })
    }

    /// Runs a command and streams its events. Failures after the start become a final
    /// [`ExecEvent::Error`].
    pub async fn exec_stream(
        &self,
        caller: &Caller,
        id: SandboxId,
        req: &ExecRequest,
    ) -> ApiResult<impl Stream<Item = ExecEvent> + Send + 'static + use<>> {
        let c = self.command(req)?;
        let (_, mut client) = self.running(caller, id).await?;
        let timeout = Duration::from_secs(u64::from(c.timeout_sec));
        let mut rpc = tonic::Request::new(PbExec {
            sandbox_id: id.to_string(),
            cmd: c.cmd,
            args: c.args,
            env: c.env.into_iter().collect(),
            cwd: c.cwd,
            user: c.user,
            timeout_ms: u32::try_from(timeout.as_millis()).unwrap_or(u32::MAX),
            stdin: c.stdin,
            max_output_bytes: 0,
        });
        rpc.set_timeout(timeout + Duration::from_secs(15));
        let stream = client
            .exec_stream(rpc)
            .await
            .map_err(|s| from_agent(&s))?
            .into_inner();
        self.touch(id).await;
        Ok(stream.map(|item| match item {
            Ok(ev) => match ev.event {
                Some(exec_event::Event::Started(s)) => ExecEvent::Started { pid: s.pid },
                Some(exec_event::Event::Stdout(b)) => ExecEvent::Stdout {
                    data: B64.encode(b),
                },
                Some(exec_event::Event::Stderr(b)) => ExecEvent::Stderr {
                    data: B64.encode(b),
                },
                Some(exec_event::Event::Exited(x)) => ExecEvent::Exit {
                    exit_code: x.exit_code,
                    duration_ms: x.duration_ms,
                    timed_out: x.timed_out,
                },
                None => ExecEvent::Error {
                    code: ErrorCode::AgentError,
                    message: "empty event from the host agent".into(),
                },
            },
            Err(status) => {
                let e = from_agent(&status);
                ExecEvent::Error {
                    code: e.code,
                    message: e.message,
                }
            }
        }))
    }

    /// Lists a directory.
    pub async fn list_files(
        &self,
        caller: &Caller,
        id: SandboxId,
        path: &str,
        depth: u32,
        user: &Option<String>,
    ) -> ApiResult<Vec<EntryInfo>> {
        validate_path(path)?;
        if !(1..=10).contains(&depth) {
            return Err(ApiError::invalid("depth must be 1–10"));
        }
        let user = validate_user(user)?;
        let (_, mut client) = self.running(caller, id).await?;
        let resp = client
            .list_dir(pb::ListDirRequest {
                sandbox_id: id.to_string(),
                path: path.into(),
                depth,
                user,
            })
            .await
            .map_err(|s| from_agent(&s))?
            .into_inner();
        self.touch(id).await;
        Ok(resp.entries.iter().map(entry_view).collect())
    }

    /// Describes a path.
    pub async fn stat(
        &self,
        caller: &Caller,
        id: SandboxId,
        path: &str,
        user: &Option<String>,
    ) -> ApiResult<EntryInfo> {
        validate_path(path)?;
        let user = validate_user(user)?;
        let (_, mut client) = self.running(caller, id).await?;
        let resp = client
            .stat(pb::StatRequest {
                sandbox_id: id.to_string(),
                path: path.into(),
                user,
            })
            .await
            .map_err(|s| from_agent(&s))?
            .into_inner();
        resp.entry
            .as_ref()
            .map(entry_view)
            .ok_or_else(|| ApiError::internal("agent returned no entry"))
    }

    /// Creates a directory with its parents.
    pub async fn mkdir(
        &self,
        caller: &Caller,
        id: SandboxId,
        path: &str,
        user: &Option<String>,
    ) -> ApiResult<EntryInfo> {
        validate_path(path)?;
        let user = validate_user(user)?;
        let (_, mut client) = self.running(caller, id).await?;
        let resp = client
            .make_dir(pb::MakeDirRequest {
                sandbox_id: id.to_string(),
                path: path.into(),
                user,
            })
            .await
            .map_err(|s| from_agent(&s))?
            .into_inner();
        self.touch(id).await;
        resp.entry
            .as_ref()
            .map(entry_view)
            .ok_or_else(|| ApiError::internal("agent returned no entry"))
    }

    /// Removes a file or directory tree.
    pub async fn remove_path(
        &self,
        caller: &Caller,
        id: SandboxId,
        path: &str,
        user: &Option<String>,
    ) -> ApiResult<()> {
        validate_path(path)?;
        let user = validate_user(user)?;
        let (_, mut client) = self.running(caller, id).await?;
        client
            .remove(pb::RemoveRequest {
                sandbox_id: id.to_string(),
                path: path.into(),
                user,
            })
            .await
            .map_err(|s| from_agent(&s))?;
        self.touch(id).await;
        Ok(())
    }

    /// Streams `body` into a file. Over the upload limit → 413, and the partial upload is
    /// aborted (the guest keeps no partial file).
    pub async fn upload<S, E>(
        &self,
        caller: &Caller,
        id: SandboxId,
        path: &str,
        user: &Option<String>,
        declared_len: Option<u64>,
        body: S,
    ) -> ApiResult<EntryInfo>
    where
        S: Stream<Item = Result<Bytes, E>> + Send + 'static,
        E: std::fmt::Display + Send + 'static,
    {
        validate_path(path)?;
        let user = validate_user(user)?;
        let max = self.cfg.limits.max_upload_bytes;
        if declared_len.is_some_and(|n| n > max) {
            return Err(ApiError::new(
                ErrorCode::PayloadTooLarge,
                format!("uploads are limited to {max} bytes"),
            ));
        }
        let (_, mut client) = self.running(caller, id).await?;
        let (tx, rx) = tokio::sync::mpsc::channel::<pb::WriteFileRequest>(8);
        let header = pb::WriteFileRequest {
            part: Some(write_file_request::Part::Header(pb::WriteFileHeader {
                sandbox_id: id.to_string(),
                path: path.into(),
                user,
            })),
        };
        let rpc = client.write_file(tokio_stream::wrappers::ReceiverStream::new(rx));
        let feed = async move {
            tx.send(header)
                .await
                .map_err(|_| ApiError::internal("upload stream closed"))?;
            let mut body = std::pin::pin!(body);
            let mut total: u64 = 0;
            while let Some(chunk) = body.next().await {
                let failed = match chunk {
                    Err(e) => Some(ApiError::invalid(format!("reading the upload failed: {e}"))),
                    Ok(c) if total + c.len() as u64 > max => Some(ApiError::new(
                        ErrorCode::PayloadTooLarge,
                        format!("uploads are limited to {max} bytes"),
                    )),
                    Ok(c) => {
                        total += c.len() as u64;
                        for piece in c.chunks(UPLOAD_CHUNK) {
                            let msg = pb::WriteFileRequest {
                                part: Some(write_file_request::Part::Chunk(piece.to_vec())),
                            };
                            if tx.send(msg).await.is_err() {
                                // The call ended early; its result says why.
                                return Ok(());
                            }
                        }
                        None
                    }
                };
                if let Some(e) = failed {
                    // No commit: the agent discards what it received.
                    return Err(e);
                }
            }
            let commit = pb::WriteFileRequest {
                part: Some(write_file_request::Part::Commit(pb::WriteFileCommit {
                    total_bytes: total,
                })),
            };
            let _ = tx.send(commit).await;
            Ok(())
        };
        let (fed, result) = {
            let mut rpc = std::pin::pin!(rpc);
            let mut feed = std::pin::pin!(feed);
            tokio::select! {
                fed = &mut feed => match fed {
                    Ok(()) => (Ok(()), rpc.await),
                    // The call fails once the agent has seen the broken stream.
                    Err(e) => (Err(e), rpc.await),
                },
                result = &mut rpc => (Ok(()), result),
            }
        };
        fed?;
        let resp = result.map_err(|s| from_agent(&s))?.into_inner();
        self.touch(id).await;
        resp.entry
            .as_ref()
            .map(entry_view)
            .ok_or_else(|| ApiError::internal("agent returned no entry"))
    }

    /// Opens a file for download: its entry and a stream of its bytes.
    pub async fn download(
        &self,
        caller: &Caller,
        id: SandboxId,
        path: &str,
        user: &Option<String>,
    ) -> ApiResult<(
        EntryInfo,
        impl Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static + use<>,
    )> {
        validate_path(path)?;
        let user = validate_user(user)?;
        let (_, mut client) = self.running(caller, id).await?;
        let mut stream = client
            .read_file(pb::ReadFileRequest {
                sandbox_id: id.to_string(),
                path: path.into(),
                user,
            })
            .await
            .map_err(|s| from_agent(&s))?
            .into_inner();
        let first = stream.message().await.map_err(|s| from_agent(&s))?;
        let entry = match first.and_then(|m| m.part) {
            Some(read_file_response::Part::Header(h)) => h
                .entry
                .as_ref()
                .map(entry_view)
                .ok_or_else(|| ApiError::internal("agent sent no entry"))?,
            _ => {
                return Err(ApiError::internal(
                    "agent did not start the download with a header",
                ));
            }
        };
        self.touch(id).await;
        let body = stream.filter_map(|item| async move {
            match item {
                Ok(pb::ReadFileResponse {
                    part: Some(read_file_response::Part::Chunk(c)),
                }) => Some(Ok(Bytes::from(c))),
                Ok(_) => None,
                Err(status) => Some(Err(std::io::Error::other(status.message().to_string()))),
            }
        });
        Ok((entry, body))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Limits;

    #[test]
    fn env_validation() {
        let l = Limits::default();
        let ok: BTreeMap<String, String> = [("PATH_X".to_string(), "1".to_string())].into();
        assert!(validate_env(&l, &ok).is_ok());
        let bad: BTreeMap<String, String> = [("1X".to_string(), "1".to_string())].into();
        assert!(validate_env(&l, &bad).is_err());
        let many: BTreeMap<String, String> =
            (0..200).map(|i| (format!("V{i}"), "x".into())).collect();
        assert_eq!(
            validate_env(&l, &many).unwrap_err().code,
            ErrorCode::LimitExceeded
        );
    }

    #[test]
    fn output_encoding() {
        assert_eq!(
            encode_output(b"hi".to_vec()),
            ("hi".to_string(), Encoding::Utf8)
        );
        let (s, e) = encode_output(vec![0xff, 0x00]);
        assert_eq!(e, Encoding::Base64);
        assert_eq!(B64.decode(s).unwrap(), vec![0xff, 0x00]);
    }

    #[test]
    fn users() {
        assert_eq!(validate_user(&None).unwrap(), "");
        assert_eq!(validate_user(&Some("user".into())).unwrap(), "user");
        assert!(validate_user(&Some("Root;rm".into())).is_err());
    }
}
