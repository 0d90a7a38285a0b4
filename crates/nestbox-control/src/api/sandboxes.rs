//! Sandboxes (with pause, resume, keep-alive and metrics), commands, files, templates and
//! the audit log.

use std::convert::Infallible;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::{Stream, StreamExt};
use nestbox_types::api::{
    AuditLog, AuditLogQuery, CreateSandboxRequest, EgressRequest, EntryInfo, ExecEvent,
    ExecRequest, ExecResult, FileList, ForkItem, ForkRequest, ForkResult, LifetimeRequest,
    LogDirection, LogsQuery, MetricsQuery, MkdirRequest, Page, PathQuery, ResumeRequest, Sandbox,
    SandboxListQuery, SandboxLogs, SandboxMetrics, Template,
};
use nestbox_types::{ErrorBody, SandboxId};

use crate::error::ApiResult;
use crate::extract::{Caller, Json, OptionalJson, Path, Query};
use crate::service::logs::LogsRequest;
use crate::state::AppState;
use nestbox_db::sandboxes::LifetimeChange;

/// Templates the caller's team can start sandboxes from.
#[utoipa::path(get, path = "/v1/templates", tag = "templates", security(("api_key" = []), ("session" = [])),
    responses((status = 200, body = Page<Template>), (status = 401, body = ErrorBody)))]
pub async fn list_templates(
    State(s): State<AppState>,
    caller: Caller,
) -> ApiResult<axum::Json<Page<Template>>> {
    s.services.list_templates(&caller).await.map(axum::Json)
}

/// Creates a sandbox and returns once it runs.
#[utoipa::path(post, path = "/v1/sandboxes", tag = "sandboxes", security(("api_key" = []), ("session" = [])), request_body = CreateSandboxRequest,
    responses((status = 201, body = Sandbox), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
              (status = 404, description = "unknown template", body = ErrorBody),
              (status = 503, description = "no capacity (retryable)", body = ErrorBody)))]
pub async fn create_sandbox(
    State(s): State<AppState>,
    caller: Caller,
    Json(req): Json<CreateSandboxRequest>,
) -> ApiResult<(StatusCode, axum::Json<Sandbox>)> {
    s.services
        .create_sandbox(&caller, &req)
        .await
        .map(|sb| (StatusCode::CREATED, axum::Json(sb)))
}

/// The team's sandboxes, newest first.
#[utoipa::path(get, path = "/v1/sandboxes", tag = "sandboxes", security(("api_key" = []), ("session" = [])), params(SandboxListQuery),
    responses((status = 200, body = Page<Sandbox>), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody)))]
pub async fn list_sandboxes(
    State(s): State<AppState>,
    caller: Caller,
    Query(q): Query<SandboxListQuery>,
) -> ApiResult<axum::Json<Page<Sandbox>>> {
    s.services.list_sandboxes(&caller, &q).await.map(axum::Json)
}

/// One sandbox.
#[utoipa::path(get, path = "/v1/sandboxes/{sandbox_id}", tag = "sandboxes", security(("api_key" = []), ("session" = [])),
    params(("sandbox_id" = SandboxId, Path)),
    responses((status = 200, body = Sandbox), (status = 404, body = ErrorBody)))]
pub async fn get_sandbox(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<SandboxId>,
) -> ApiResult<axum::Json<Sandbox>> {
    s.services.get_sandbox(&caller, id).await.map(axum::Json)
}

/// Destroys a sandbox (idempotent).
#[utoipa::path(delete, path = "/v1/sandboxes/{sandbox_id}", tag = "sandboxes", security(("api_key" = []), ("session" = [])),
    params(("sandbox_id" = SandboxId, Path)),
    responses((status = 204), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub async fn destroy_sandbox(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<SandboxId>,
) -> ApiResult<StatusCode> {
    s.services
        .destroy_sandbox(&caller, id)
        .await
        .map(|()| StatusCode::NO_CONTENT)
}

/// Pauses a running sandbox: its memory, processes and disk are saved on its host and its
/// VM stops until it is resumed.
#[utoipa::path(post, path = "/v1/sandboxes/{sandbox_id}/pause", tag = "sandboxes", security(("api_key" = []), ("session" = [])),
    params(("sandbox_id" = SandboxId, Path)),
    responses((status = 200, description = "the sandbox, paused", body = Sandbox), (status = 404, body = ErrorBody),
              (status = 409, description = "not running (`sandbox_not_running`)", body = ErrorBody),
              (status = 503, body = ErrorBody)))]
pub async fn pause_sandbox(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<SandboxId>,
) -> ApiResult<axum::Json<Sandbox>> {
    s.services.pause_sandbox(&caller, id).await.map(axum::Json)
}

/// Resumes a paused sandbox with its processes, open files and memory. A sandbox with a
/// lifetime starts a new one (the body's `lifetime_sec`, else the one it had).
#[utoipa::path(post, path = "/v1/sandboxes/{sandbox_id}/resume", tag = "sandboxes", security(("api_key" = []), ("session" = [])),
    params(("sandbox_id" = SandboxId, Path)), request_body(content = ResumeRequest, description = "optional"),
    responses((status = 200, description = "the sandbox, running", body = Sandbox), (status = 404, body = ErrorBody),
              (status = 409, description = "not paused (`conflict`)", body = ErrorBody),
              (status = 503, body = ErrorBody)))]
pub async fn resume_sandbox(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<SandboxId>,
    OptionalJson(req): OptionalJson<ResumeRequest>,
) -> ApiResult<axum::Json<Sandbox>> {
    s.services
        .resume_sandbox(&caller, id, req.lifetime_sec)
        .await
        .map(axum::Json)
}

/// Makes running copies of a running sandbox (processes, memory, disk): each is an
/// independent sandbox with its own id, tokens, host name and random state. The source is
/// stopped only for the checkpoint. One item per copy asked for: the sandbox, or its error.
#[utoipa::path(post, path = "/v1/sandboxes/{sandbox_id}/fork", tag = "sandboxes", security(("api_key" = []), ("session" = [])),
    params(("sandbox_id" = SandboxId, Path)), request_body(content = ForkRequest, description = "optional"),
    responses((status = 201, description = "at least one copy runs", body = ForkResult), (status = 400, body = ErrorBody),
              (status = 404, body = ErrorBody), (status = 409, description = "not running (`sandbox_not_running`)", body = ErrorBody),
              (status = 503, body = ErrorBody)))]
pub async fn fork_sandbox(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<SandboxId>,
    OptionalJson(req): OptionalJson<ForkRequest>,
) -> ApiResult<(StatusCode, axum::Json<ForkResult>)> {
    let outcomes = s
        .services
        .fork_sandbox(&caller, id, req.count.unwrap_or(1), req.lifetime_sec)
        .await?;
    if !outcomes.iter().any(Result::is_ok)
        && let Some(Err(e)) = outcomes.first()
    {
        return Err(e.clone());
    }
    let items = outcomes
        .into_iter()
        .map(|o| match o {
            Ok(sandbox) => ForkItem {
                sandbox: Some(sandbox),
                error: None,
            },
            Err(e) => ForkItem {
                sandbox: None,
                error: Some(ErrorBody::new(e.code, e.message).error),
            },
        })
        .collect();
    Ok((StatusCode::CREATED, axum::Json(ForkResult { items })))
}

/// Gives a running sandbox new access tokens (`envd_access_token` for its guest agent,
/// `traffic_access_token` for its ports): the old ones stop working at once — for
/// instance after a member who fetched them left the team. Returns the sandbox with the
/// new tokens.
#[utoipa::path(post, path = "/v1/sandboxes/{sandbox_id}/rotate-tokens", tag = "sandboxes", security(("api_key" = []), ("session" = [])),
    params(("sandbox_id" = SandboxId, Path)),
    responses((status = 200, description = "the sandbox with its new tokens", body = Sandbox), (status = 404, body = ErrorBody),
              (status = 409, description = "not running (`sandbox_not_running`), or rotated concurrently (`conflict`)", body = ErrorBody),
              (status = 503, body = ErrorBody)))]
pub async fn rotate_tokens(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<SandboxId>,
) -> ApiResult<axum::Json<Sandbox>> {
    s.services.rotate_tokens(&caller, id).await.map(axum::Json)
}

/// Replaces a running or paused sandbox's egress rules (a paused one gets them on
/// resume). New connections follow the new rules at once; established ones carry on.
#[utoipa::path(put, path = "/v1/sandboxes/{sandbox_id}/egress", tag = "sandboxes", security(("api_key" = []), ("session" = [])),
    params(("sandbox_id" = SandboxId, Path)), request_body = EgressRequest,
    responses((status = 200, description = "the sandbox with its new rules", body = Sandbox), (status = 400, body = ErrorBody),
              (status = 404, body = ErrorBody), (status = 409, description = "neither running nor paused (`conflict`)", body = ErrorBody),
              (status = 503, body = ErrorBody)))]
pub async fn set_egress(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<SandboxId>,
    Json(req): Json<EgressRequest>,
) -> ApiResult<axum::Json<Sandbox>> {
    s.services
        .set_egress(&caller, id, &req)
        .await
        .map(axum::Json)
}

/// Gives a running sandbox a new deadline: it ends `lifetime_sec` from now (destroyed, or
/// paused if it was created with `on_expiry: pause`). With `extend_only`, a sooner end
/// than the current one is ignored.
#[utoipa::path(post, path = "/v1/sandboxes/{sandbox_id}/lifetime", tag = "sandboxes", security(("api_key" = []), ("session" = [])),
    params(("sandbox_id" = SandboxId, Path)), request_body = LifetimeRequest,
    responses((status = 200, description = "the sandbox with its new `expires_at`", body = Sandbox), (status = 400, body = ErrorBody),
              (status = 404, body = ErrorBody), (status = 409, description = "not running (`sandbox_not_running`)", body = ErrorBody)))]
pub async fn set_lifetime(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<SandboxId>,
    Json(req): Json<LifetimeRequest>,
) -> ApiResult<axum::Json<Sandbox>> {
    let change = if req.extend_only {
        LifetimeChange::Extend
    } else {
        LifetimeChange::Set
    };
    s.services
        .set_lifetime(&caller, id, req.lifetime_sec, change)
        .await
        .map(axum::Json)
}

/// Keeps a running sandbox alive: resets its inactivity timer (after `timeout_sec` without
/// activity its host pauses it).
#[utoipa::path(post, path = "/v1/sandboxes/{sandbox_id}/ping", tag = "sandboxes", security(("api_key" = []), ("session" = [])),
    params(("sandbox_id" = SandboxId, Path)),
    responses((status = 204), (status = 404, body = ErrorBody),
              (status = 409, description = "not running (`sandbox_not_running`)", body = ErrorBody)))]
pub async fn ping_sandbox(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<SandboxId>,
) -> ApiResult<StatusCode> {
    s.services
        .ping_sandbox(&caller, id)
        .await
        .map(|()| StatusCode::NO_CONTENT)
}

/// Runs a command to completion and returns its output.
#[utoipa::path(post, path = "/v1/sandboxes/{sandbox_id}/exec", tag = "sandboxes", security(("api_key" = []), ("session" = [])),
    params(("sandbox_id" = SandboxId, Path)), request_body = ExecRequest,
    responses((status = 200, body = ExecResult), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn exec(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<SandboxId>,
    Json(req): Json<ExecRequest>,
) -> ApiResult<axum::Json<ExecResult>> {
    s.services.exec(&caller, id, &req).await.map(axum::Json)
}

/// One exec or process-output event as a server-sent event named by its kind.
pub(super) fn sse_event(ev: &ExecEvent) -> Event {
    let name = match ev {
        ExecEvent::Started { .. } => "started",
        ExecEvent::Stdout { .. } => "stdout",
        ExecEvent::Stderr { .. } => "stderr",
        ExecEvent::Exit { .. } => "exit",
        ExecEvent::Error { .. } => "error",
    };
    Event::default()
        .event(name)
        .json_data(ev)
        .unwrap_or_else(|_| Event::default().event("error"))
}

/// Runs a command and streams its output as server-sent events (`started`, `stdout`,
/// `stderr`, then `exit` or `error`; data is JSON, output base64).
#[utoipa::path(post, path = "/v1/sandboxes/{sandbox_id}/exec/stream", tag = "sandboxes", security(("api_key" = []), ("session" = [])),
    params(("sandbox_id" = SandboxId, Path)), request_body = ExecRequest,
    responses((status = 200, description = "text/event-stream of ExecEvent", body = ExecEvent, content_type = "text/event-stream"),
              (status = 400, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn exec_stream(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<SandboxId>,
    Json(req): Json<ExecRequest>,
) -> ApiResult<Sse<impl Stream<Item = Result<Event, Infallible>>>> {
    let events = s.services.exec_stream(&caller, id, &req).await?;
    Ok(Sse::new(events.map(|ev| Ok(sse_event(&ev)))).keep_alive(KeepAlive::default()))
}

/// Lists a directory.
#[utoipa::path(get, path = "/v1/sandboxes/{sandbox_id}/files", tag = "files", security(("api_key" = []), ("session" = [])),
    params(("sandbox_id" = SandboxId, Path), PathQuery),
    responses((status = 200, body = FileList), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn list_files(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<SandboxId>,
    Query(q): Query<PathQuery>,
) -> ApiResult<axum::Json<FileList>> {
    let items = s
        .services
        .list_files(&caller, id, &q.path, q.depth.unwrap_or(1), &q.user)
        .await?;
    Ok(axum::Json(FileList { items }))
}

/// Removes a file or directory tree.
#[utoipa::path(delete, path = "/v1/sandboxes/{sandbox_id}/files", tag = "files", security(("api_key" = []), ("session" = [])),
    params(("sandbox_id" = SandboxId, Path), PathQuery),
    responses((status = 204), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn remove_path(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<SandboxId>,
    Query(q): Query<PathQuery>,
) -> ApiResult<StatusCode> {
    s.services
        .remove_path(&caller, id, &q.path, &q.user)
        .await
        .map(|()| StatusCode::NO_CONTENT)
}

/// Describes a path.
#[utoipa::path(get, path = "/v1/sandboxes/{sandbox_id}/files/stat", tag = "files", security(("api_key" = []), ("session" = [])),
    params(("sandbox_id" = SandboxId, Path), PathQuery),
    responses((status = 200, body = EntryInfo), (status = 404, body = ErrorBody),
              (status = 409, description = "not running (`sandbox_not_running`)", body = ErrorBody)))]
pub async fn stat(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<SandboxId>,
    Query(q): Query<PathQuery>,
) -> ApiResult<axum::Json<EntryInfo>> {
    s.services
        .stat(&caller, id, &q.path, &q.user)
        .await
        .map(axum::Json)
}

/// Creates a directory and its parents.
#[utoipa::path(post, path = "/v1/sandboxes/{sandbox_id}/files/mkdir", tag = "files", security(("api_key" = []), ("session" = [])),
    params(("sandbox_id" = SandboxId, Path)), request_body = MkdirRequest,
    responses((status = 201, body = EntryInfo), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn mkdir(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<SandboxId>,
    Json(req): Json<MkdirRequest>,
) -> ApiResult<(StatusCode, axum::Json<EntryInfo>)> {
    s.services
        .mkdir(&caller, id, &req.path, &req.user)
        .await
        .map(|e| (StatusCode::CREATED, axum::Json(e)))
}

/// Downloads a file (streamed).
#[utoipa::path(get, path = "/v1/sandboxes/{sandbox_id}/files/content", tag = "files", security(("api_key" = []), ("session" = [])),
    params(("sandbox_id" = SandboxId, Path), PathQuery),
    responses((status = 200, description = "the file's bytes", content_type = "application/octet-stream"),
              (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn download(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<SandboxId>,
    Query(q): Query<PathQuery>,
) -> ApiResult<Response> {
    let (entry, body) = s.services.download(&caller, id, &q.path, &q.user).await?;
    let mut resp = Body::from_stream(body).into_response();
    let headers = resp.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    if let Ok(len) = HeaderValue::from_str(&entry.size.to_string()) {
        headers.insert(header::CONTENT_LENGTH, len);
    }
    let safe: String = entry
        .name
        .chars()
        .filter(|c| c.is_ascii_graphic() && *c != '"' && *c != '\\')
        .collect();
    if let Ok(v) = HeaderValue::from_str(&format!("attachment; filename=\"{safe}\"")) {
        headers.insert(header::CONTENT_DISPOSITION, v);
    }
    Ok(resp)
}

/// Uploads a file (the raw request body, streamed), creating parent directories and
/// replacing an existing file.
#[utoipa::path(put, path = "/v1/sandboxes/{sandbox_id}/files/content", tag = "files", security(("api_key" = []), ("session" = [])),
    params(("sandbox_id" = SandboxId, Path), PathQuery),
    request_body(content = Vec<u8>, content_type = "application/octet-stream"),
    responses((status = 200, body = EntryInfo), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody),
              (status = 413, description = "larger than the upload limit", body = ErrorBody)))]
pub async fn upload(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<SandboxId>,
    Query(q): Query<PathQuery>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<axum::Json<EntryInfo>> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    s.services
        .upload(
            &caller,
            id,
            &q.path,
            &q.user,
            declared,
            body.into_data_stream(),
        )
        .await
        .map(axum::Json)
}

/// A sandbox's CPU, memory and disk use: live while it runs, as stored when it was paused.
#[utoipa::path(get, path = "/v1/sandboxes/{sandbox_id}/metrics", tag = "sandboxes", security(("api_key" = []), ("session" = [])),
    params(("sandbox_id" = SandboxId, Path), MetricsQuery),
    responses((status = 200, body = SandboxMetrics),
              (status = 400, description = "unknown range (`invalid_request`)", body = ErrorBody),
              (status = 401, body = ErrorBody),
              (status = 404, description = "no such sandbox (`sandbox_not_found`), or it is stopped (`not_found`)", body = ErrorBody),
              (status = 503, body = ErrorBody)))]
pub async fn sandbox_metrics(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<SandboxId>,
    Query(q): Query<MetricsQuery>,
) -> ApiResult<axum::Json<SandboxMetrics>> {
    s.services
        .sandbox_metrics(&caller, id, q.range.as_deref())
        .await
        .map(axum::Json)
}

/// A page of a sandbox's log: its console (the kernel, init, the guest agent's lines about
/// processes it started and ended) and its host's events (paused, resumed), oldest first
/// unless `direction=backward`. Follow a running sandbox by asking again with the
/// `next_cursor` of the last page.
#[utoipa::path(get, path = "/v1/sandboxes/{sandbox_id}/logs", tag = "sandboxes", security(("api_key" = []), ("session" = [])),
    params(("sandbox_id" = SandboxId, Path), LogsQuery),
    responses((status = 200, body = SandboxLogs),
              (status = 400, description = "a bad limit, cursor, level or search (`invalid_request`)", body = ErrorBody),
              (status = 401, body = ErrorBody),
              (status = 404, description = "no such sandbox (`sandbox_not_found`), or it is stopped (`not_found`)", body = ErrorBody),
              (status = 503, body = ErrorBody)))]
pub async fn sandbox_logs(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<SandboxId>,
    Query(q): Query<LogsQuery>,
) -> ApiResult<axum::Json<SandboxLogs>> {
    let cursor = q
        .cursor
        .as_deref()
        .map(|c| {
            c.parse::<u64>()
                .map_err(|_| crate::error::ApiError::invalid("cursor: not one this API returned"))
        })
        .transpose()?;
    let page = s
        .services
        .sandbox_logs(
            &caller,
            id,
            LogsRequest {
                start_ms: q.since.map(|t| t.timestamp_millis()),
                cursor,
                limit: q.limit.unwrap_or(100),
                backward: q.direction == Some(LogDirection::Backward),
                min_level: q.level,
                search: q.search,
            },
        )
        .await?;
    let next_cursor = page
        .entries
        .last()
        .map(|e| e.seq)
        .or(cursor)
        .map(|c| c.to_string());
    Ok(axum::Json(SandboxLogs {
        entries: page.entries,
        next_cursor,
        has_more: page.more,
    }))
}

/// The audit log, newest first: the caller's team's (its owner and admins), or with
/// `scope=platform` the entries of no team (platform admins). Filter with `resource_type`
/// and `action`.
#[utoipa::path(get, path = "/v1/audit-logs", tag = "teams", security(("api_key" = []), ("session" = [])), params(AuditLogQuery),
    responses((status = 200, body = Page<AuditLog>), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
              (status = 403, body = ErrorBody)))]
pub async fn audit_logs(
    State(s): State<AppState>,
    caller: Caller,
    Query(q): Query<AuditLogQuery>,
) -> ApiResult<axum::Json<Page<AuditLog>>> {
    s.services.audit_logs(&caller, &q).await.map(axum::Json)
}
