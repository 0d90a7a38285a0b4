//! E2B's logs routes: `GET /sandboxes/{id}/logs` (lines and entries from a start time)
//! and `GET /v2/sandboxes/{id}/logs` (a time cursor, a direction, a level, a search), both
//! over [`Services::sandbox_logs`](crate::state::Services::sandbox_logs).

use axum::extract::State;
use nestbox_types::api::{LogEntry, LogLevel};
use nestbox_types::e2b::{
    Error, LogsQuery, LogsV2Query, SandboxLog, SandboxLogEntry, SandboxLogs, SandboxLogsV2,
};
use nestbox_types::limits::MAX_LOG_PAGE;

use super::sandboxes::visible;
use super::{E2bResult, sandbox_id};
use crate::error::ApiError;
use crate::extract::{Caller, Path, Query};
use crate::service::logs::LogsRequest;
use crate::state::AppState;

fn entry(e: &LogEntry) -> SandboxLogEntry {
    SandboxLogEntry {
        timestamp: e.timestamp,
        level: e.level.as_str().to_string(),
        message: e.message.clone(),
        fields: e.fields.clone(),
    }
}

/// A sandbox's log from `start` (Unix ms), oldest first.
#[utoipa::path(get, path = "/sandboxes/{sandboxID}/logs", tag = super::TAG, security(("api_key" = [])),
    params(("sandboxID" = String, Path), LogsQuery),
    responses((status = 200, body = SandboxLogs), (status = 400, body = Error), (status = 401, body = Error),
              (status = 404, body = Error)))]
pub async fn logs(
    State(s): State<AppState>,
    caller: Result<Caller, ApiError>,
    Path(raw): Path<String>,
    query: Result<Query<LogsQuery>, ApiError>,
) -> E2bResult<axum::Json<SandboxLogs>> {
    let caller = caller?;
    let id = sandbox_id(&raw)?;
    let Query(q) = query?;
    visible(&s, &caller, id).await?;
    let page = s
        .services
        .sandbox_logs(
            &caller,
            id,
            LogsRequest {
                start_ms: q.start,
                limit: q.limit.unwrap_or(MAX_LOG_PAGE),
                ..LogsRequest::default()
            },
        )
        .await?;
    Ok(axum::Json(SandboxLogs {
        logs: page
            .entries
            .iter()
            .map(|e| SandboxLog {
                timestamp: e.timestamp,
                line: e.message.clone(),
            })
            .collect(),
        log_entries: page.entries.iter().map(entry).collect(),
    }))
}

/// A page of a sandbox's log from a time cursor, either way, filtered by level and text.
#[utoipa::path(get, path = "/v2/sandboxes/{sandboxID}/logs", tag = super::TAG, security(("api_key" = [])),
    params(("sandboxID" = String, Path), LogsV2Query),
    responses((status = 200, body = SandboxLogsV2), (status = 400, body = Error), (status = 401, body = Error),
              (status = 404, body = Error)))]
pub async fn logs_v2(
    State(s): State<AppState>,
    caller: Result<Caller, ApiError>,
    Path(raw): Path<String>,
    query: Result<Query<LogsV2Query>, ApiError>,
) -> E2bResult<axum::Json<SandboxLogsV2>> {
    let caller = caller?;
    let id = sandbox_id(&raw)?;
    let Query(q) = query?;
    let backward = match q.direction.as_deref() {
        None | Some("forward") => false,
        Some("backward") => true,
        Some(other) => {
            return Err(ApiError::invalid(format!(
                "direction: `{}` is not forward or backward",
                other.chars().take(16).collect::<String>()
            ))
            .into());
        }
    };
    let min_level = q
        .level
        .as_deref()
        .map(|l| {
            LogLevel::parse(l).ok_or_else(|| {
                ApiError::invalid(format!(
                    "level: `{}` is not debug, info, warn or error",
                    l.chars().take(16).collect::<String>()
                ))
            })
        })
        .transpose()?;
    visible(&s, &caller, id).await?;
    let page = s
        .services
        .sandbox_logs(
            &caller,
            id,
            LogsRequest {
                start_ms: q.cursor,
                cursor: None,
                limit: q.limit.unwrap_or(MAX_LOG_PAGE),
                backward,
                min_level,
                search: q.search.filter(|s| !s.is_empty()),
            },
        )
        .await?;
    Ok(axum::Json(SandboxLogsV2 {
        logs: page.entries.iter().map(entry).collect(),
    }))
}
