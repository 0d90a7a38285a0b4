//! The `process.Process` Connect service: start processes, stream their output, feed their
//! input, signal them.
//!
//! Ownership: each process is owned by its **supervisor** task (spawned by `Start`), which
//! reads its output into the process's [`output::Broadcaster`], reaps it, removes it from the
//! [`table::ProcessTable`] and publishes the end event. Request handlers only look processes
//! up and use their handle (subscribe, write input, signal the group).
//!
//! Life of a process: `Start` reserves the tag → spawns → inserts the handle → streams events
//! to its caller. The stream is only a subscriber: when the client goes away the process
//! keeps running and `Connect` (by pid or tag) attaches to its live output. A `Start` with
//! `Connect-Timeout-Ms` arms a killer that sends `SIGKILL` to the group at the deadline; the
//! stream then ends with the end event followed by `deadline_exceeded`. Streams send a
//! keep-alive event after each idle interval (`Keepalive-Ping-Interval`, default 30 s).

pub mod output;
pub mod spawn;
pub mod table;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::{Stream, StreamExt};
use http::{HeaderMap, Request, Response};
use hyper::body::Incoming;
use nestbox_envd::connect::server::{
    ResponseBody, accept, decode_request_stream, read_single_envelope, stream_error,
    stream_response,
};
use nestbox_envd::connect::{ConnectError, Shape};
use nestbox_envd::process::{
    CloseStdinRequest, CloseStdinResponse, ConnectRequest, ConnectResponse, ListRequest,
    ListResponse, ProcessEvent, SendInputRequest, SendInputResponse, SendSignalRequest,
    SendSignalResponse, Signal, StartRequest, StartResponse, StreamInputRequest,
    StreamInputResponse, UpdateRequest, UpdateResponse, process_event, process_input,
    stream_input_request,
};
use nix::sys::signal::Signal as NixSignal;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::sync::Mutex as AsyncMutex;

use self::output::{Received, SubscribeError, Subscription};
use self::spawn::{ProcessIo, PtyMaster, SpawnError, SpawnSpec, TermSize, describe_exit};
use self::table::{InputSink, ProcessHandle};
use super::paths;
use super::rpc::{self, MAX_MESSAGE, io_error, path_error, request_user, user_error};
use super::state::Server;

/// How long the supervisor waits, after the process exited, for its output pipes to drain
/// before it publishes the end event. Pipes still held open by a background grandchild
/// are drained (and discarded) after that.
const OUTPUT_DRAIN: Duration = Duration::from_secs(1);
/// How long a `Start` stream waits for the end event after its deadline killed the process.
const KILL_GRACE: Duration = Duration::from_secs(5);

/// Serves `POST /process.Process/<method>`.
pub async fn serve(
    server: Arc<Server>,
    method: &str,
    request: Request<Incoming>,
) -> Response<ResponseBody> {
    match method {
        "Start" => start(server, request).await,
        "Connect" => connect(server, request).await,
        "StreamInput" => stream_input(server, request).await,
        "List" => {
            rpc::unary(request, |_: ListRequest, _| async move {
                Ok(ListResponse {
                    processes: server.processes.list(),
                })
            })
            .await
        }
        "SendInput" => {
            rpc::unary(request, |req: SendInputRequest, _| async move {
                let handle = server.processes.get(req.process.as_ref())?;
                if let Some(data) = input_bytes(req.input) {
                    write_input(&handle, &data).await?;
                }
                Ok(SendInputResponse {})
            })
            .await
        }
        "CloseStdin" => {
            rpc::unary(request, |req: CloseStdinRequest, _| async move {
                let handle = server.processes.get(req.process.as_ref())?;
                let mut input = handle.input.lock().await;
                if let Some(InputSink::Pty(_)) = input.as_ref() {
                    return Err(ConnectError::failed_precondition(
                        "a PTY has no stdin to close: send Ctrl-D (0x04) as input instead",
                    ));
                }
                // Dropping the pipe is the EOF.
                input.take();
                Ok(CloseStdinResponse {})
            })
            .await
        }
        "SendSignal" => {
            rpc::unary(request, |req: SendSignalRequest, _| async move {
                let handle = server.processes.get(req.process.as_ref())?;
                let signal = match Signal::try_from(req.signal) {
                    Ok(Signal::Sigterm) => NixSignal::SIGTERM,
                    Ok(Signal::Sigkill) => NixSignal::SIGKILL,
                    _ => {
                        return Err(ConnectError::invalid_argument(format!(
                            "unsupported signal {}: use SIGTERM or SIGKILL",
                            req.signal
                        )));
                    }
                };
                match handle.signal_group(signal) {
                    Ok(()) => Ok(SendSignalResponse {}),
                    Err(nix::Error::ESRCH) => Err(ConnectError::not_found(format!(
                        "process {} has ended",
                        handle.pid
                    ))),
                    Err(e) => Err(ConnectError::internal(format!(
                        "cannot signal process {}: {e}",
                        handle.pid
                    ))),
                }
            })
            .await
        }
        "Update" => {
            rpc::unary(request, |req: UpdateRequest, _| async move {
                let handle = server.processes.get(req.process.as_ref())?;
                let Some(size) = req.pty.and_then(|p| p.size) else {
                    return Ok(UpdateResponse {});
                };
                let pty = handle.pty.as_ref().ok_or_else(|| {
                    ConnectError::failed_precondition(format!(
                        "process {} was not started with a PTY",
                        handle.pid
                    ))
                })?;
                pty.resize(term_size(size.cols, size.rows)).map_err(|e| {
                    ConnectError::internal(format!("cannot resize the terminal: {e}"))
                })?;
                Ok(UpdateResponse {})
            })
            .await
        }
        other => nestbox_envd::connect::server::unary_error(&ConnectError::unimplemented(format!(
            "process.Process has no method {other:?}"
        ))),
    }
}

fn term_size(cols: u32, rows: u32) -> TermSize {
    let clamp = |v: u32, default: u16| {
        if v == 0 {
            default
        } else {
            u16::try_from(v).unwrap_or(u16::MAX)
        }
    };
    TermSize {
        cols: clamp(cols, 80),
        rows: clamp(rows, 24),
    }
}

fn input_bytes(input: Option<nestbox_envd::process::ProcessInput>) -> Option<Bytes> {
    match input.and_then(|i| i.input) {
        Some(process_input::Input::Stdin(data) | process_input::Input::Pty(data)) => Some(data),
        None => None,
    }
}

async fn write_input(handle: &ProcessHandle, data: &[u8]) -> Result<(), ConnectError> {
    let mut input = handle.input.lock().await;
    let result = match input.as_mut() {
        None => {
            return Err(ConnectError::failed_precondition(format!(
                "stdin of process {} is closed or was never opened (start it with stdin: true)",
                handle.pid
            )));
        }
        Some(InputSink::Pipe(stdin)) => match stdin.write_all(data).await {
            Ok(()) => stdin.flush().await,
            Err(e) => Err(e),
        },
        Some(InputSink::Pty(master)) => master.write_all(data).await,
    };
    result.map_err(|e| match e.kind() {
        std::io::ErrorKind::BrokenPipe => ConnectError::failed_precondition(format!(
            "process {} no longer reads its input",
            handle.pid
        )),
        _ => ConnectError::internal(format!("cannot write to process {}: {e}", handle.pid)),
    })
}

fn event(event: process_event::Event) -> ProcessEvent {
    ProcessEvent { event: Some(event) }
}

fn data_event(output: process_event::data_event::Output) -> ProcessEvent {
    event(process_event::Event::Data(process_event::DataEvent {
        output: Some(output),
    }))
}

async fn start(server: Arc<Server>, request: Request<Incoming>) -> Response<ResponseBody> {
    let (parts, body) = request.into_parts();
    let meta = match accept(&parts.headers, Shape::Streaming) {
        Ok(meta) => meta,
        Err(response) => return *response,
    };
    let start: StartRequest = match read_single_envelope(meta.codec, body, MAX_MESSAGE).await {
        Ok(message) => message,
        Err(err) => return stream_error(meta.codec, &err),
    };
    match start_process(&server, &parts.headers, start, meta.deadline) {
        Ok((handle, subscription)) => {
            let events = event_stream(
                handle.pid,
                subscription,
                rpc::keepalive(&parts.headers),
                meta.deadline,
                true,
            )
            .map(|item| item.map(|e| StartResponse { event: Some(e) }));
            stream_response(meta.codec, events)
        }
        Err(err) => stream_error(meta.codec, &err),
    }
}

async fn connect(server: Arc<Server>, request: Request<Incoming>) -> Response<ResponseBody> {
    let (parts, body) = request.into_parts();
    let meta = match accept(&parts.headers, Shape::Streaming) {
        Ok(meta) => meta,
        Err(response) => return *response,
    };
    let attach: ConnectRequest = match read_single_envelope(meta.codec, body, MAX_MESSAGE).await {
        Ok(message) => message,
        Err(err) => return stream_error(meta.codec, &err),
    };
    let subscribed = server
        .processes
        .get(attach.process.as_ref())
        .and_then(|handle| {
            handle
                .output
                .subscribe()
                .map(|s| (handle.pid, s))
                .map_err(|e| match e {
                    SubscribeError::Closed => {
                        ConnectError::not_found(format!("process {} has ended", handle.pid))
                    }
                    SubscribeError::Full => ConnectError::resource_exhausted(e.to_string()),
                })
        });
    match subscribed {
        Ok((pid, subscription)) => {
            let events = event_stream(
                pid,
                subscription,
                rpc::keepalive(&parts.headers),
                meta.deadline,
                false,
            )
            .map(|item| item.map(|e| ConnectResponse { event: Some(e) }));
            stream_response(meta.codec, events)
        }
        Err(err) => stream_error(meta.codec, &err),
    }
}

async fn stream_input(server: Arc<Server>, request: Request<Incoming>) -> Response<ResponseBody> {
    let (parts, body) = request.into_parts();
    let meta = match accept(&parts.headers, Shape::Streaming) {
        Ok(meta) => meta,
        Err(response) => return *response,
    };
    let mut messages = std::pin::pin!(decode_request_stream::<StreamInputRequest, _>(
        meta.codec,
        body,
        MAX_MESSAGE
    ));
    let result = rpc::with_deadline(&meta, async {
        let mut handle = None;
        while let Some(message) = messages.next().await {
            match message?.event {
                Some(stream_input_request::Event::Start(start)) => {
                    handle = Some(server.processes.get(start.process.as_ref())?);
                }
                Some(stream_input_request::Event::Data(data)) => {
                    let handle = handle.as_ref().ok_or_else(|| {
                        ConnectError::invalid_argument(
                            "the first message of StreamInput must select the process",
                        )
                    })?;
                    if let Some(bytes) = input_bytes(data.input) {
                        write_input(handle, &bytes).await?;
                    }
                }
                Some(stream_input_request::Event::Keepalive(_)) | None => {}
            }
        }
        Ok(StreamInputResponse {})
    })
    .await;
    stream_response(meta.codec, futures::stream::once(async move { result }))
}

/// The events of one subscriber: the start event, then the process's events with
/// keep-alives in idle intervals, until the end event (or a detachment or deadline error).
fn event_stream(
    pid: u32,
    mut subscription: Subscription,
    keepalive: Duration,
    deadline: Option<Instant>,
    owns_process: bool,
) -> impl Stream<Item = Result<ProcessEvent, ConnectError>> + Send + 'static {
    async_stream::stream! {
        yield Ok(event(process_event::Event::Start(process_event::StartEvent { pid })));
        let original_deadline = deadline;
        let mut deadline = deadline.map(tokio::time::Instant::from_std);
        let mut deadline_passed = false;
        loop {
            let wake = async {
                match deadline {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                received = tokio::time::timeout(keepalive, subscription.recv()) => match received {
                    Err(_idle) => yield Ok(event(process_event::Event::Keepalive(process_event::KeepAlive {}))),
                    Ok(Received::Event(ev)) => {
                        let is_end = matches!(ev.event, Some(process_event::Event::End(_)));
                        yield Ok(ev);
                        if is_end {
                            // The killer and this stream's timer fire together: either may
                            // be seen first.
                            if deadline_passed
                                || original_deadline.is_some_and(|d| Instant::now() >= d)
                            {
                                yield Err(ConnectError::deadline_exceeded(format!(
                                    "the deadline passed: process {pid} was killed"
                                )));
                            }
                            break;
                        }
                    }
                    Ok(Received::Overflowed) => {
                        yield Err(ConnectError::resource_exhausted(format!(
                            "this stream fell behind the output of process {pid} by more than {} chunks and was detached; output was lost; reattach with Connect",
                            output::QUEUE_EVENTS
                        )));
                        break;
                    }
                    Ok(Received::Closed) => {
                        yield Err(ConnectError::new(
                            nestbox_envd::connect::Code::Aborted,
                            format!("process {pid} was detached without an end event"),
                        ));
                        break;
                    }
                },
                () = wake => {
                    if owns_process && !deadline_passed {
                        // The process's killer fires at the same instant; wait for its end.
                        deadline_passed = true;
                        deadline = Some(tokio::time::Instant::now() + KILL_GRACE);
                    } else {
                        yield Err(ConnectError::deadline_exceeded("the stream's deadline passed"));
                        break;
                    }
                }
            }
        }
    }
}

/// Starts a process and subscribes the caller to it.
fn start_process(
    server: &Arc<Server>,
    headers: &HeaderMap,
    request: StartRequest,
    deadline: Option<Instant>,
) -> Result<(Arc<ProcessHandle>, Subscription), ConnectError> {
    let config = request
        .process
        .ok_or_else(|| ConnectError::invalid_argument("the request has no process"))?;
    if config.cmd.is_empty() {
        return Err(ConnectError::invalid_argument("the process has no cmd"));
    }
    let defaults = server.defaults();
    let user_name = request_user(headers)?;
    let (user, _) = server
        .user(user_name.as_deref())
        .map_err(|e| user_error(&e))?;
    let switch_user = if server.euid == 0 {
        true
    } else if user.uid == server.euid {
        false
    } else {
        return Err(ConnectError::permission_denied(format!(
            "the guest agent runs as uid {} and cannot start processes as {:?}",
            server.euid, user.name
        )));
    };

    let pty = request.pty.map(|p| {
        p.size
            .map_or(term_size(0, 0), |s| term_size(s.cols, s.rows))
    });

    let mut env = BTreeMap::new();
    env.insert("PATH".to_owned(), spawn::DEFAULT_PATH.to_owned());
    env.insert("HOME".to_owned(), user.home.display().to_string());
    env.insert("USER".to_owned(), user.name.clone());
    env.insert("LOGNAME".to_owned(), user.name.clone());
    env.insert("SHELL".to_owned(), user.shell.clone());
    if pty.is_some() {
        env.insert("TERM".to_owned(), "xterm-256color".to_owned());
    }
    env.extend(defaults.env);
    env.extend(config.envs.iter().map(|(k, v)| (k.clone(), v.clone())));

    let cwd = match config.cwd.as_deref().filter(|c| !c.is_empty()) {
        Some(cwd) => {
            let path = paths::resolve(cwd, &user.home).map_err(|e| path_error(&e))?;
            if !path.is_dir() {
                return Err(ConnectError::invalid_argument(format!(
                    "working directory {} does not exist or is not a directory",
                    path.display()
                )));
            }
            path
        }
        None => defaults
            .workdir
            .as_deref()
            .and_then(|w| paths::resolve(w, &user.home).ok())
            .filter(|p| p.is_dir())
            .or_else(|| Some(user.home.clone()).filter(|h| h.is_dir()))
            .unwrap_or_else(|| "/".into()),
    };

    let reservation = server.processes.reserve_tag(request.tag.as_deref())?;
    let spec = SpawnSpec {
        cmd: config.cmd.clone(),
        args: config.args.clone(),
        env: env.into_iter().collect(),
        cwd,
        user,
        switch_user,
        pty,
        stdin: request.stdin.unwrap_or(true),
    };
    let spawned = spawn::spawn(&spec).map_err(|e| spawn_error(&e))?;
    let pid = spawned.pid;

    let (input, pty_master, readers) = match spawned.io {
        ProcessIo::Pipes {
            stdin,
            stdout,
            stderr,
        } => (
            stdin.map(InputSink::Pipe),
            None,
            Readers::Pipes(stdout, stderr),
        ),
        ProcessIo::Pty(master) => (
            Some(InputSink::Pty(Arc::clone(&master))),
            Some(Arc::clone(&master)),
            Readers::Pty(master),
        ),
    };
    let handle = Arc::new(ProcessHandle {
        pid,
        tag: request.tag.clone(),
        config,
        output: output::Broadcaster::default(),
        input: AsyncMutex::new(input),
        pty: pty_master,
        exited: AtomicBool::new(false),
    });
    let subscription = handle
        .output
        .subscribe()
        .map_err(|e| ConnectError::internal(format!("cannot subscribe to a new process: {e}")))?;
    server.processes.insert(Arc::clone(&handle), reservation);
    tracing::info!(pid, cmd = %spec.cmd, user = %spec.user.name, tag = ?request.tag, "process started");

    let reader_tasks = readers.spawn(&handle);
    tokio::spawn(supervise(
        Arc::clone(server),
        Arc::clone(&handle),
        spawned.child,
        reader_tasks,
    ));
    if let Some(deadline) = deadline {
        let weak = Arc::downgrade(&handle);
        tokio::spawn(async move {
            tokio::time::sleep_until(tokio::time::Instant::from_std(deadline)).await;
            if let Some(handle) = weak.upgrade()
                && handle.signal_group(NixSignal::SIGKILL).is_ok()
            {
                tracing::info!(
                    pid = handle.pid,
                    "deadline passed: killed the process group"
                );
            }
        });
    }
    Ok((handle, subscription))
}

fn spawn_error(err: &SpawnError) -> ConnectError {
    match err {
        SpawnError::Exec { cmd, source } => {
            let mut err = io_error("start", std::path::Path::new(cmd), source);
            if err.code == nestbox_envd::connect::Code::Internal {
                err.message = format!("cannot start {cmd:?}: {source}");
            }
            err
        }
        SpawnError::Pty(source) => {
            tracing::error!(error = %source, "cannot open a pseudo-terminal");
            ConnectError::internal(format!("cannot open a pseudo-terminal: {source}"))
        }
    }
}

enum Readers {
    Pipes(tokio::process::ChildStdout, tokio::process::ChildStderr),
    Pty(Arc<PtyMaster>),
}

impl Readers {
    fn spawn(self, handle: &Arc<ProcessHandle>) -> Vec<tokio::task::JoinHandle<()>> {
        use process_event::data_event::Output;
        match self {
            Readers::Pipes(stdout, stderr) => vec![
                tokio::spawn(read_pipe(Arc::clone(handle), stdout, Output::Stdout)),
                tokio::spawn(read_pipe(Arc::clone(handle), stderr, Output::Stderr)),
            ],
            Readers::Pty(master) => {
                let handle = Arc::clone(handle);
                vec![tokio::spawn(async move {
                    let mut buf = vec![0u8; spawn::READ_CHUNK];
                    loop {
                        match master.read(&mut buf).await {
                            Ok(0) => break,
                            Ok(n) => handle.output.publish(&data_event(Output::Pty(
                                Bytes::copy_from_slice(&buf[..n]),
                            ))),
                            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                            Err(e) => {
                                tracing::debug!(pid = handle.pid, error = %e, "terminal read failed");
                                break;
                            }
                        }
                    }
                })]
            }
        }
    }
}

async fn read_pipe<R: AsyncRead + Unpin>(
    handle: Arc<ProcessHandle>,
    mut pipe: R,
    wrap: fn(Bytes) -> process_event::data_event::Output,
) {
    let mut buf = vec![0u8; spawn::READ_CHUNK];
    loop {
        match pipe.read(&mut buf).await {
            Ok(0) => break,
            Ok(n) => handle
                .output
                .publish(&data_event(wrap(Bytes::copy_from_slice(&buf[..n])))),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                tracing::debug!(pid = handle.pid, error = %e, "output read failed");
                break;
            }
        }
    }
}

/// Waits for the process, lets its output drain, and publishes its end.
async fn supervise(
    server: Arc<Server>,
    handle: Arc<ProcessHandle>,
    mut child: tokio::process::Child,
    readers: Vec<tokio::task::JoinHandle<()>>,
) {
    let status = child.wait().await;
    handle.exited.store(true, Ordering::Release);
    // Whatever the process wrote before exiting is still in the pipes.
    if tokio::time::timeout(OUTPUT_DRAIN, futures::future::join_all(readers))
        .await
        .is_err()
    {
        tracing::debug!(
            pid = handle.pid,
            "output still open after exit (a background child holds it); ending the stream"
        );
    }
    let end = match status {
        Ok(status) => {
            let (exit_code, exited, status) = describe_exit(status);
            process_event::EndEvent {
                exit_code,
                exited,
                status,
                error: None,
            }
        }
        Err(e) => process_event::EndEvent {
            exit_code: -1,
            exited: false,
            status: "unknown".into(),
            error: Some(format!("cannot wait for the process: {e}")),
        },
    };
    tracing::info!(pid = handle.pid, status = %end.status, "process ended");
    server.processes.remove(handle.pid);
    handle.input.lock().await.take();
    handle.output.close(event(process_event::Event::End(end)));
}
