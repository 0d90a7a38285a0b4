//! Background processes, terminals and directory watches in a guest, for the gRPC service.
//!
//! The guest agent owns every process: it runs until it exits or is signalled, whoever
//! watches it. This module only translates between the host agent's contract
//! (`nestbox.hostagent.v1`) and the guest's (envd `process` / `filesystem`):
//!
//! - [`start`] starts a process and returns once the guest reports its pid; the start
//!   stream is then dropped, which never affects the process;
//! - [`connect`] and [`watch`] wait for the guest's first answer before returning, so an
//!   unknown pid, tag or directory is an error of the call itself rather than of the stream;
//!   they then forward events through a bounded channel ([`FORWARD_EVENTS`]), so a slow
//!   caller slows the forwarding task, never grows a queue (the guest detaches a subscriber
//!   that falls too far behind, which ends the stream with an error). Every forwarded event
//!   counts as the sandbox's activity (its inactivity timer restarts); an idle stream does
//!   not keep a sandbox awake.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use nestbox_envd::client::{EnvdClient, EnvdError, EnvdStream};
use nestbox_envd::filesystem::{EventType, WatchDirResponse, watch_dir_response};
use nestbox_envd::process::{
    self as envd, ProcessConfig, StartRequest, process_event, process_event::data_event,
};
use nestbox_proto::hostagent as pb;
use nestbox_types::SandboxId;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;

use crate::error::AgentError;
use crate::sandbox::SandboxHandle;

/// Events a forwarding task may have queued for its caller.
pub const FORWARD_EVENTS: usize = 16;
/// How long a start may take until the guest reports the pid.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// A stream of events for a gRPC response.
pub type EventStream<T> = ReceiverStream<Result<T, Status>>;

/// The guest's selector for a host-agent selector; also its text for error messages.
pub fn selector(
    process: Option<&pb::ProcessSelector>,
) -> Result<(envd::ProcessSelector, String), Status> {
    match process.and_then(|p| p.selector.as_ref()) {
        Some(pb::process_selector::Selector::Pid(pid)) if *pid > 0 => {
            Ok((envd::ProcessSelector::pid(*pid), pid.to_string()))
        }
        Some(pb::process_selector::Selector::Tag(tag)) if !tag.is_empty() => {
            Ok((envd::ProcessSelector::tag(tag.clone()), format!("{tag:?}")))
        }
        _ => Err(Status::invalid_argument(
            "process must name a pid (> 0) or a non-empty tag",
        )),
    }
}

/// Maps a guest failure about a process: "not found" means no such process.
pub fn process_error(id: SandboxId, process: &str, source: EnvdError) -> AgentError {
    if source.is_not_found() {
        AgentError::ProcessNotFound {
            id,
            process: process.to_string(),
        }
    } else {
        AgentError::Guest { id, source }
    }
}

fn non_empty(s: &str) -> Option<String> {
    if s.is_empty() {
        None
    } else {
        Some(s.to_string())
    }
}

/// Starts a process in the background and returns what it runs, with its pid.
pub async fn start(
    id: SandboxId,
    guest: &EnvdClient,
    r: pb::StartProcessRequest,
) -> Result<pb::ProcessInfo, AgentError> {
    let guest_err = |source| AgentError::Guest { id, source };
    let pty = r.terminal.map(|t| envd::Pty {
        size: Some(envd::pty::Size {
            cols: t.cols,
            rows: t.rows,
        }),
    });
    let request = StartRequest {
        process: Some(ProcessConfig {
            cmd: r.cmd.clone(),
            args: r.args.clone(),
            envs: r.env.clone().into_iter().collect(),
            cwd: non_empty(&r.cwd),
        }),
        stdin: Some(r.stdin || pty.is_some()),
        pty,
        tag: non_empty(&r.tag),
    };
    let mut stream = guest.start(request).await.map_err(guest_err)?;
    let first = async {
        while let Some(event) = stream.next().await {
            match event.map_err(guest_err)?.event {
                Some(process_event::Event::Start(s)) => return Ok(s.pid),
                Some(process_event::Event::End(end)) => {
                    return Err(AgentError::Invalid(format!(
                        "the process ended before it started: {}",
                        end.error.unwrap_or(end.status)
                    )));
                }
                _ => {}
            }
        }
        Err(AgentError::Internal(format!(
            "the guest agent of {id} ended the start stream without a pid"
        )))
    };
    let pid = tokio::time::timeout(START_TIMEOUT, first)
        .await
        .map_err(|_| {
            AgentError::Internal(format!(
                "the guest agent of {id} did not start the process in {START_TIMEOUT:?}"
            ))
        })??;
    // Dropping the stream detaches this caller; the process keeps running.
    drop(stream);
    tracing::info!(sandbox = %id, pid, tag = %r.tag, "started a background process");
    Ok(pb::ProcessInfo {
        pid,
        tag: r.tag,
        cmd: r.cmd,
        args: r.args,
        env: r.env,
        cwd: r.cwd,
    })
}

/// What the guest runs.
pub fn info(p: envd::ProcessInfo) -> pb::ProcessInfo {
    let config = p.config.unwrap_or_default();
    pb::ProcessInfo {
        pid: p.pid,
        tag: p.tag.unwrap_or_default(),
        cmd: config.cmd,
        args: config.args,
        env: config.envs.into_iter().collect(),
        cwd: config.cwd.unwrap_or_default(),
    }
}

fn event(ev: envd::ProcessEvent) -> Option<pb::ProcessEvent> {
    use pb::process_event::Event as E;
    let mapped = match ev.event? {
        process_event::Event::Start(s) => E::Started(pb::ExecStarted { pid: s.pid }),
        process_event::Event::Data(d) => match d.output? {
            data_event::Output::Stdout(b) => E::Stdout(b.to_vec()),
            data_event::Output::Stderr(b) => E::Stderr(b.to_vec()),
            data_event::Output::Pty(b) => E::Terminal(b.to_vec()),
        },
        process_event::Event::End(end) => E::Exited(pb::ExecExited {
            exit_code: crate::guest::exit_code(&end),
            duration_ms: 0,
            timed_out: false,
        }),
        process_event::Event::Keepalive(_) => return None,
    };
    Some(pb::ProcessEvent {
        event: Some(mapped),
    })
}

/// Attaches to a running process's live output.
pub async fn connect(
    sandbox: Arc<SandboxHandle>,
    guest: &EnvdClient,
    process: Option<&pb::ProcessSelector>,
) -> Result<EventStream<pb::ProcessEvent>, Status> {
    let id = sandbox.facts.id;
    let (sel, shown) = selector(process)?;
    let mut stream = guest
        .connect(sel)
        .await
        .map_err(|e| process_error(id, &shown, e))?;
    // The guest answers with the start event, or the error.
    let first = match stream.next().await {
        Some(Ok(ev)) => ev,
        Some(Err(e)) => return Err(process_error(id, &shown, e).into()),
        None => {
            return Err(AgentError::ProcessNotFound { id, process: shown }.into());
        }
    };
    Ok(forward(sandbox, first, stream, event))
}

fn forward<In, Out>(
    sandbox: Arc<SandboxHandle>,
    first: In,
    mut rest: EnvdStream<In>,
    map: fn(In) -> Option<Out>,
) -> EventStream<Out>
where
    In: Send + 'static,
    Out: Send + 'static,
{
    let id = sandbox.facts.id;
    let (tx, rx) = mpsc::channel(FORWARD_EVENTS);
    tokio::spawn(async move {
        if let Some(ev) = map(first)
            && tx.send(Ok(ev)).await.is_err()
        {
            return;
        }
        loop {
            let item = tokio::select! {
                item = rest.next() => item,
                () = tx.closed() => return,
            };
            let sent = match item {
                None => return,
                Some(Ok(ev)) => match map(ev) {
                    Some(ev) => {
                        sandbox.touch();
                        tx.send(Ok(ev)).await
                    }
                    None => continue,
                },
                Some(Err(e)) => {
                    let _ = tx
                        .send(Err(AgentError::Guest { id, source: e }.into()))
                        .await;
                    return;
                }
            };
            if sent.is_err() {
                return;
            }
        }
    });
    ReceiverStream::new(rx)
}

fn watch_event(r: WatchDirResponse) -> Option<pb::WatchDirEvent> {
    match r.event? {
        watch_dir_response::Event::Start(_) => Some(pb::WatchDirEvent {
            started: true,
            r#type: pb::WatchEventType::Unspecified as i32,
            name: String::new(),
        }),
        watch_dir_response::Event::Filesystem(f) => {
            let kind = match EventType::try_from(f.r#type).unwrap_or(EventType::Unspecified) {
                EventType::Create => pb::WatchEventType::Create,
                EventType::Write => pb::WatchEventType::Write,
                EventType::Remove => pb::WatchEventType::Remove,
                EventType::Rename => pb::WatchEventType::Rename,
                EventType::Chmod => pb::WatchEventType::Chmod,
                EventType::Unspecified => return None,
            };
            Some(pb::WatchDirEvent {
                started: false,
                r#type: kind as i32,
                name: f.name,
            })
        }
        watch_dir_response::Event::Keepalive(_) => None,
    }
}

/// Watches a directory; the first event says the watch is in place.
pub async fn watch(
    sandbox: Arc<SandboxHandle>,
    guest: &EnvdClient,
    path: &str,
    recursive: bool,
) -> Result<EventStream<pb::WatchDirEvent>, Status> {
    let id = sandbox.facts.id;
    let guest_err = |source| AgentError::Guest { id, source };
    let mut stream = guest.watch_dir(path, recursive).await.map_err(guest_err)?;
    let first = match stream.next().await {
        Some(Ok(ev)) => ev,
        Some(Err(e)) => return Err(guest_err(e).into()),
        None => {
            return Err(AgentError::Internal(format!(
                "the guest agent of {id} ended the watch of {path} at once"
            ))
            .into());
        }
    };
    Ok(forward(sandbox, first, stream, watch_event))
}

/// The host-agent selector of a pid.
pub fn pid_selector(pid: u32) -> pb::ProcessSelector {
    pb::ProcessSelector {
        selector: Some(pb::process_selector::Selector::Pid(pid)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nestbox_envd::process::process_selector;

    #[test]
    fn selectors() {
        let (sel, shown) = selector(Some(&pid_selector(7))).unwrap();
        assert_eq!(sel, envd::ProcessSelector::pid(7));
        assert_eq!(shown, "7");
        let tag = pb::ProcessSelector {
            selector: Some(pb::process_selector::Selector::Tag("web".into())),
        };
        let (sel, _) = selector(Some(&tag)).unwrap();
        assert!(matches!(
            sel.selector,
            Some(process_selector::Selector::Tag(ref t)) if t == "web"
        ));
        assert!(selector(None).is_err());
        assert!(selector(Some(&pid_selector(0))).is_err());
    }
}
