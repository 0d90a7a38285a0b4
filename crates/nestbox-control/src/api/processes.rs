//! Background processes, terminals (WebSocket) and directory watches (server-sent events).
//!
//! The terminal WebSocket speaks a small protocol: binary frames are terminal bytes (input
//! from the client, output from the server); text frames are JSON control messages
//! ([`TerminalClientMessage`] from the client, [`TerminalServerMessage`] from the server).
//! One task serves a socket and handles one thing at a time: while it waits for the client
//! to take output it reads no input, and while the guest writes input it forwards no
//! output, so every queue on the way is bounded (the socket's, the gRPC stream's flow
//! control, the agent's forwarding channel). Closing the socket detaches; the terminal
//! keeps running and can be attached again.

use std::convert::Infallible;

use axum::extract::State;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::{Stream, StreamExt};
use nestbox_types::api::{
    ExecEvent, ProcessInfo, ProcessInputRequest, ProcessList, ProcessSignal, SignalRequest,
    StartProcessRequest, StartTerminalRequest, TerminalClientMessage, TerminalServerMessage,
    WatchEvent, WatchQuery,
};
use nestbox_types::{ErrorBody, ErrorCode, SandboxId};

use crate::error::{ApiError, ApiResult};
use crate::extract::{Caller, Json, Path, Query};
use crate::service::processes::{TerminalOutput, TerminalSession};
use crate::state::AppState;

/// Starts a process in the background; it keeps running when the client goes away.
#[utoipa::path(post, path = "/v1/sandboxes/{sandbox_id}/processes", tag = "processes", security(("api_key" = []), ("session" = [])),
    params(("sandbox_id" = SandboxId, Path)), request_body = StartProcessRequest,
    responses((status = 201, body = ProcessInfo), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
              (status = 409, description = "sandbox not running, or the tag is taken", body = ErrorBody)))]
pub async fn start_process(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<SandboxId>,
    Json(req): Json<StartProcessRequest>,
) -> ApiResult<(StatusCode, axum::Json<ProcessInfo>)> {
    s.services
        .start_process(&caller, id, &req)
        .await
        .map(|p| (StatusCode::CREATED, axum::Json(p)))
}

/// The sandbox's running processes.
#[utoipa::path(get, path = "/v1/sandboxes/{sandbox_id}/processes", tag = "processes", security(("api_key" = []), ("session" = [])),
    params(("sandbox_id" = SandboxId, Path)),
    responses((status = 200, body = ProcessList), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn list_processes(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<SandboxId>,
) -> ApiResult<axum::Json<ProcessList>> {
    s.services.list_processes(&caller, id).await.map(axum::Json)
}

/// Kills a process (`SIGKILL` to its group).
#[utoipa::path(delete, path = "/v1/sandboxes/{sandbox_id}/processes/{process}", tag = "processes", security(("api_key" = []), ("session" = [])),
    params(("sandbox_id" = SandboxId, Path), ("process" = String, Path, description = "pid, or tag", max_length = 64, pattern = r"^([1-9][0-9]{0,8}|[1-3][0-9]{9}|4[01][0-9]{8}|42[0-8][0-9]{7}|429[0-3][0-9]{6}|4294[0-8][0-9]{5}|42949[0-5][0-9]{4}|429496[0-6][0-9]{3}|4294967[01][0-9]{2}|42949672[0-8][0-9]|429496729[0-5]|[A-Za-z0-9._-]*[A-Za-z._-][A-Za-z0-9._-]*)$")),
    responses((status = 204), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn kill_process(
    State(s): State<AppState>,
    caller: Caller,
    Path((id, process)): Path<(SandboxId, String)>,
) -> ApiResult<StatusCode> {
    s.services
        .signal_process(&caller, id, &process, ProcessSignal::Sigkill)
        .await
        .map(|()| StatusCode::NO_CONTENT)
}

/// Sends a signal to a process's group.
#[utoipa::path(post, path = "/v1/sandboxes/{sandbox_id}/processes/{process}/signal", tag = "processes", security(("api_key" = []), ("session" = [])),
    params(("sandbox_id" = SandboxId, Path), ("process" = String, Path, description = "pid, or tag", max_length = 64, pattern = r"^([1-9][0-9]{0,8}|[1-3][0-9]{9}|4[01][0-9]{8}|42[0-8][0-9]{7}|429[0-3][0-9]{6}|4294[0-8][0-9]{5}|42949[0-5][0-9]{4}|429496[0-6][0-9]{3}|4294967[01][0-9]{2}|42949672[0-8][0-9]|429496729[0-5]|[A-Za-z0-9._-]*[A-Za-z._-][A-Za-z0-9._-]*)$")), request_body = SignalRequest,
    responses((status = 204), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn signal_process(
    State(s): State<AppState>,
    caller: Caller,
    Path((id, process)): Path<(SandboxId, String)>,
    Json(req): Json<SignalRequest>,
) -> ApiResult<StatusCode> {
    s.services
        .signal_process(&caller, id, &process, req.signal)
        .await
        .map(|()| StatusCode::NO_CONTENT)
}

/// Writes to a process's stdin (it must have been started with `stdin: true`).
#[utoipa::path(post, path = "/v1/sandboxes/{sandbox_id}/processes/{process}/stdin", tag = "processes", security(("api_key" = []), ("session" = [])),
    params(("sandbox_id" = SandboxId, Path), ("process" = String, Path, description = "pid, or tag", max_length = 64, pattern = r"^([1-9][0-9]{0,8}|[1-3][0-9]{9}|4[01][0-9]{8}|42[0-8][0-9]{7}|429[0-3][0-9]{6}|4294[0-8][0-9]{5}|42949[0-5][0-9]{4}|429496[0-6][0-9]{3}|4294967[01][0-9]{2}|42949672[0-8][0-9]|429496729[0-5]|[A-Za-z0-9._-]*[A-Za-z._-][A-Za-z0-9._-]*)$")), request_body = ProcessInputRequest,
    responses((status = 204), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn send_stdin(
    State(s): State<AppState>,
    caller: Caller,
    Path((id, process)): Path<(SandboxId, String)>,
    Json(req): Json<ProcessInputRequest>,
) -> ApiResult<StatusCode> {
    s.services
        .send_process_input(&caller, id, &process, &req)
        .await
        .map(|()| StatusCode::NO_CONTENT)
}

/// Closes a process's stdin (end of input).
#[utoipa::path(post, path = "/v1/sandboxes/{sandbox_id}/processes/{process}/close-stdin", tag = "processes", security(("api_key" = []), ("session" = [])),
    params(("sandbox_id" = SandboxId, Path), ("process" = String, Path, description = "pid, or tag", max_length = 64, pattern = r"^([1-9][0-9]{0,8}|[1-3][0-9]{9}|4[01][0-9]{8}|42[0-8][0-9]{7}|429[0-3][0-9]{6}|4294[0-8][0-9]{5}|42949[0-5][0-9]{4}|429496[0-6][0-9]{3}|4294967[01][0-9]{2}|42949672[0-8][0-9]|429496729[0-5]|[A-Za-z0-9._-]*[A-Za-z._-][A-Za-z0-9._-]*)$")),
    responses((status = 204), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn close_stdin(
    State(s): State<AppState>,
    caller: Caller,
    Path((id, process)): Path<(SandboxId, String)>,
) -> ApiResult<StatusCode> {
    s.services
        .close_process_stdin(&caller, id, &process)
        .await
        .map(|()| StatusCode::NO_CONTENT)
}

/// Attaches to a running process's output: server-sent events as for `exec/stream`
/// (`started`, `stdout`, `stderr`, then `exit` or `error`), from now on. Leaving does not
/// stop the process.
#[utoipa::path(get, path = "/v1/sandboxes/{sandbox_id}/processes/{process}/output", tag = "processes", security(("api_key" = []), ("session" = [])),
    params(("sandbox_id" = SandboxId, Path), ("process" = String, Path, description = "pid, or tag", max_length = 64, pattern = r"^([1-9][0-9]{0,8}|[1-3][0-9]{9}|4[01][0-9]{8}|42[0-8][0-9]{7}|429[0-3][0-9]{6}|4294[0-8][0-9]{5}|42949[0-5][0-9]{4}|429496[0-6][0-9]{3}|4294967[01][0-9]{2}|42949672[0-8][0-9]|429496729[0-5]|[A-Za-z0-9._-]*[A-Za-z._-][A-Za-z0-9._-]*)$")),
    responses((status = 200, description = "text/event-stream of ExecEvent", body = ExecEvent, content_type = "text/event-stream"),
              (status = 400, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn process_output(
    State(s): State<AppState>,
    caller: Caller,
    Path((id, process)): Path<(SandboxId, String)>,
) -> ApiResult<Sse<impl Stream<Item = Result<Event, Infallible>>>> {
    let events = s.services.process_output(&caller, id, &process).await?;
    Ok(
        Sse::new(events.map(|ev| Ok(super::sandboxes::sse_event(&ev))))
            .keep_alive(KeepAlive::default()),
    )
}

/// Starts a shell on a terminal in the background; attach to it with the WebSocket
/// `GET …/terminals/{process}`.
#[utoipa::path(post, path = "/v1/sandboxes/{sandbox_id}/terminals", tag = "processes", security(("api_key" = []), ("session" = [])),
    params(("sandbox_id" = SandboxId, Path)), request_body = StartTerminalRequest,
    responses((status = 201, body = ProcessInfo), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
              (status = 409, body = ErrorBody)))]
pub async fn start_terminal(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<SandboxId>,
    Json(req): Json<StartTerminalRequest>,
) -> ApiResult<(StatusCode, axum::Json<ProcessInfo>)> {
    s.services
        .start_terminal(&caller, id, &req)
        .await
        .map(|p| (StatusCode::CREATED, axum::Json(p)))
}

/// Attaches to a terminal over a WebSocket (see the terminal protocol in docs/API.md).
/// A plain request without the upgrade is `400 invalid_request` once the caller, the
/// sandbox and the process are known.
#[utoipa::path(get, path = "/v1/sandboxes/{sandbox_id}/terminals/{process}", tag = "processes", security(("api_key" = []), ("session" = [])),
    params(("sandbox_id" = SandboxId, Path), ("process" = String, Path, description = "pid, or tag", max_length = 64, pattern = r"^([1-9][0-9]{0,8}|[1-3][0-9]{9}|4[01][0-9]{8}|42[0-8][0-9]{7}|429[0-3][0-9]{6}|4294[0-8][0-9]{5}|42949[0-5][0-9]{4}|429496[0-6][0-9]{3}|4294967[01][0-9]{2}|42949672[0-8][0-9]|429496729[0-5]|[A-Za-z0-9._-]*[A-Za-z._-][A-Za-z0-9._-]*)$")),
    responses((status = 101, description = "WebSocket: binary frames are terminal bytes, text frames JSON control messages (TerminalClientMessage, TerminalServerMessage)"),
              (status = 400, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn attach_terminal(
    State(s): State<AppState>,
    caller: Caller,
    Path((id, process)): Path<(SandboxId, String)>,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    let session = match s.services.attach_terminal(&caller, id, &process).await {
        Ok(session) => session,
        Err(e) => return e.into_response(),
    };
    match upgrade {
        Ok(upgrade) => upgrade
            .on_upgrade(move |socket| serve_terminal(socket, session))
            .into_response(),
        Err(_) => ApiError::invalid(
            "this endpoint needs a WebSocket upgrade (GET with Upgrade: websocket)",
        )
        .into_response(),
    }
}

fn control_frame(message: &TerminalServerMessage) -> Message {
    let text = serde_json::to_string(message).unwrap_or_else(|_| r#"{"type":"error"}"#.into());
    Message::Text(text.into())
}

fn error_frame(e: &ApiError) -> Message {
    control_frame(&TerminalServerMessage::Error {
        code: e.code,
        message: e.message.clone(),
    })
}

/// Serves one attachment until the client leaves or the terminal's process exits.
#[tracing::instrument(skip_all, fields(pid = session.pid))]
async fn serve_terminal(mut socket: WebSocket, mut session: TerminalSession) {
    let mut control = session.control();
    let attached = control_frame(&TerminalServerMessage::Attached { pid: session.pid });
    if socket.send(attached).await.is_err() {
        return;
    }
    loop {
        tokio::select! {
            output = session.next() => {
                let (frame, last) = match output {
                    Some(Ok(TerminalOutput::Data(bytes))) => (Message::Binary(bytes.into()), false),
                    Some(Ok(TerminalOutput::Exit(exit_code))) => {
                        (control_frame(&TerminalServerMessage::Exit { exit_code }), true)
                    }
                    Some(Err(e)) => (error_frame(&e), true),
                    None => (
                        error_frame(&ApiError::new(
                            ErrorCode::AgentError,
                            "the terminal's output ended",
                        )),
                        true,
                    ),
                };
                if socket.send(frame).await.is_err() || last {
                    let _ = socket.send(Message::Close(None)).await;
                    return;
                }
            }
            incoming = socket.recv() => {
                let message = match incoming {
                    Some(Ok(message)) => message,
                    // Gone: detach; the terminal keeps running.
                    Some(Err(_)) | None => return,
                };
                let result = match message {
                    Message::Binary(bytes) => control.input(bytes.to_vec()).await,
                    Message::Text(text) => match serde_json::from_str::<TerminalClientMessage>(&text) {
                        Ok(TerminalClientMessage::Input { data }) => control.input(data.into_bytes()).await,
                        Ok(TerminalClientMessage::Resize { cols, rows }) => control.resize(cols, rows).await,
                        Ok(TerminalClientMessage::Signal { signal }) => control.signal(signal).await,
                        Ok(TerminalClientMessage::Kill) => control.signal(ProcessSignal::Sigkill).await,
                        Err(e) => Err(ApiError::invalid(format!("unknown control message: {e}"))),
                    },
                    Message::Close(_) => return,
                    Message::Ping(_) | Message::Pong(_) => Ok(()),
                };
                if let Err(e) = result
                    && socket.send(error_frame(&e)).await.is_err()
                {
                    return;
                }
            }
        }
    }
}

fn watch_sse(ev: &WatchEvent) -> Event {
    let name = match ev {
        WatchEvent::Started => "started",
        WatchEvent::Create { .. } => "create",
        WatchEvent::Write { .. } => "write",
        WatchEvent::Remove { .. } => "remove",
        WatchEvent::Rename { .. } => "rename",
        WatchEvent::Chmod { .. } => "chmod",
        WatchEvent::Error { .. } => "error",
    };
    Event::default()
        .event(name)
        .json_data(ev)
        .unwrap_or_else(|_| Event::default().event("error"))
}

/// Watches a directory: server-sent events, `started` once the watch is in place, then
/// `create`, `write`, `remove`, `rename`, `chmod` (data: JSON with the `name` relative to
/// the directory), until the client goes away; `error` ends it.
#[utoipa::path(get, path = "/v1/sandboxes/{sandbox_id}/files/watch", tag = "files", security(("api_key" = []), ("session" = [])),
    params(("sandbox_id" = SandboxId, Path), WatchQuery),
    responses((status = 200, description = "text/event-stream of WatchEvent", body = WatchEvent, content_type = "text/event-stream"),
              (status = 400, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn watch_dir(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<SandboxId>,
    Query(q): Query<WatchQuery>,
) -> ApiResult<Sse<impl Stream<Item = Result<Event, Infallible>>>> {
    let events = s.services.watch_dir(&caller, id, &q).await?;
    Ok(Sse::new(events.map(|ev| Ok(watch_sse(&ev)))).keep_alive(KeepAlive::default()))
}
