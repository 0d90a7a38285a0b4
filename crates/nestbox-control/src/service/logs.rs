//! Sandbox logs: what a sandbox's VM wrote to its console (the kernel, init, and the guest
//! agent's own structured lines: processes started and ended, …) and its host's lifecycle
//! events (paused, resumed), as time-stamped, numbered entries.
//!
//! The host agent collects and keeps them (bounded, in the sandbox's directory); the
//! control plane pages through them for `GET /v1/sandboxes/{id}/logs` and E2B's two logs
//! routes ([`LogsRequest`] is what they share).
//!
//! Rules:
//! - another team's sandbox is `sandbox_not_found`, as everywhere;
//! - a running, paused or `missing` sandbox's log comes from its host (an unreachable host
//!   is `host_unavailable`); a sandbox not started yet has an empty log;
//! - a stopped or failed sandbox's log went with it: `not_found`;
//! - `limit` is 1..=[`MAX_LOG_PAGE`], `search` at most [`MAX_SEARCH`] bytes; anything else
//!   is `invalid_request`.

use nestbox_proto::hostagent::{GetSandboxLogsRequest, LogEntry as PbLogEntry};
use nestbox_types::api::{self, LogLevel};
use nestbox_types::limits::MAX_LOG_PAGE;
use nestbox_types::{ErrorCode, SandboxId, SandboxStatus};

use crate::error::{ApiError, ApiResult, from_agent};
use crate::extract::Caller;
use crate::state::Services;

/// Longest `search` text.
pub const MAX_SEARCH: usize = 256;
/// How long the agent may take to read a page.
const READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// What to read from a sandbox's log.
#[derive(Debug, Clone, Default)]
pub struct LogsRequest {
    /// Forward: entries at or after this time (Unix ms); backward: at or before it.
    pub start_ms: Option<i64>,
    /// Forward: entries after this `seq`; backward: before it.
    pub cursor: Option<u64>,
    /// At most this many.
    pub limit: u32,
    /// Newest first.
    pub backward: bool,
    /// Only entries at least this severe.
    pub min_level: Option<LogLevel>,
    /// Only entries whose message contains this (case-insensitive).
    pub search: Option<String>,
}

/// A page of entries.
#[derive(Debug, Clone, Default)]
pub struct LogsPage {
    /// In the direction asked for.
    pub entries: Vec<api::LogEntry>,
    /// More entries matched than the page holds.
    pub more: bool,
}

fn entry(e: PbLogEntry) -> api::LogEntry {
    api::LogEntry {
        seq: e.seq,
        timestamp: chrono::DateTime::from_timestamp_millis(e.unix_ms).unwrap_or_default(),
        level: LogLevel::parse(&e.level).unwrap_or(LogLevel::Info),
        message: e.message,
        fields: e.fields.into_iter().collect(),
    }
}

impl Services {
    /// A page of a sandbox's log.
    pub async fn sandbox_logs(
        &self,
        caller: &Caller,
        id: SandboxId,
        req: LogsRequest,
    ) -> ApiResult<LogsPage> {
        if req.limit == 0 || req.limit > MAX_LOG_PAGE {
            return Err(ApiError::invalid(format!(
                "limit must be between 1 and {MAX_LOG_PAGE}"
            )));
        }
        if req.search.as_ref().is_some_and(|s| s.len() > MAX_SEARCH) {
            return Err(ApiError::invalid(format!(
                "search is longer than {MAX_SEARCH} bytes"
            )));
        }
        let sb = self.sandbox_row(caller, id).await?;
        match sb.status {
            SandboxStatus::Running | SandboxStatus::Paused | SandboxStatus::Missing => {}
            SandboxStatus::Pending | SandboxStatus::Starting => return Ok(LogsPage::default()),
            SandboxStatus::Stopped | SandboxStatus::Error => {
                return Err(ApiError::new(
                    ErrorCode::NotFound,
                    format!("sandbox {id} is {}: its log went with it", sb.status),
                ));
            }
        }
        let (_, mut client) = self.agent_for(sb.host_id).await?;
        let mut rpc = tonic::Request::new(GetSandboxLogsRequest {
            sandbox_id: id.to_string(),
            start_unix_ms: req.start_ms,
            cursor: req.cursor,
            limit: req.limit,
            backward: req.backward,
            min_level: req
                .min_level
                .map(|l| l.as_str().to_string())
                .unwrap_or_default(),
            search: req.search.unwrap_or_default(),
        });
        rpc.set_timeout(READ_TIMEOUT);
        let page = client
            .get_sandbox_logs(rpc)
            .await
            .map_err(|s| from_agent(&s))?
            .into_inner();
        Ok(LogsPage {
            entries: page.entries.into_iter().map(entry).collect(),
            more: page.more,
        })
    }
}
