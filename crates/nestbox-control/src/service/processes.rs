//! Background processes, terminals and directory watches inside sandboxes.
//!
//! The guest agent owns every process; the control plane keeps no state about them. A
//! process is named in paths by its pid (all digits) or by its tag (anything else), so tags
//! may not be all digits.
//!
//! Rules:
//! - everything needs a `running` sandbox of the caller's team (another team's sandbox is
//!   `sandbox_not_found`, as everywhere) and counts as activity;
//! - an unknown pid or tag is `process_not_found`; a malformed one is `invalid_request`;
//! - a process outlives every request: ending an output stream, a watch or a terminal
//!   attachment never stops it; only a signal (or its own end) does;
//! - streams are pulled: the agent's gRPC stream is read only as fast as the client takes
//!   events, so nothing queues without bound here.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use futures::{Stream, StreamExt};
use nestbox_proto::hostagent::{self as pb, process_event};
use nestbox_types::api::{
    ExecEvent, ExecRequest, ProcessInfo, ProcessInputRequest, ProcessList, ProcessSignal,
    StartProcessRequest, StartTerminalRequest, WatchEvent, WatchQuery,
};
use nestbox_types::{ErrorCode, SandboxId};

use super::sandboxes::{validate_path, validate_user};
use super::{AuditActor, AuditEntry};
use crate::error::{ApiError, ApiResult, from_agent};
use crate::extract::Caller;
use crate::hostpool::AgentClient;
use crate::state::Services;

/// Largest input of one stdin or terminal write.
pub const MAX_INPUT: usize = 1 << 20;
/// Largest terminal side, in cells.
const MAX_TERMINAL_SIDE: u32 = 1000;
/// The terminal program when the request names none.
const DEFAULT_SHELL: [&str; 2] = ["/bin/bash", "-l"];

/// Checks a tag: 1–64 letters, digits, `.`, `_`, `-`, not all digits (those are pids).
pub fn validate_tag(tag: &str) -> ApiResult<()> {
    let ok = (1..=64).contains(&tag.len())
        && tag
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        && !tag.chars().all(|c| c.is_ascii_digit());
    if ok {
        Ok(())
    } else {
        Err(ApiError::invalid(
            "tag must be 1–64 letters, digits, `.`, `_` or `-`, and not all digits",
        ))
    }
}

/// A process named in a path: a pid (all digits) or a tag.
pub fn parse_process(s: &str) -> ApiResult<pb::ProcessSelector> {
    use pb::process_selector::Selector;
    let selector = if !s.is_empty() && s.chars().all(|c| c.is_ascii_digit()) {
        match s.parse::<u32>() {
            Ok(pid) if pid > 0 => Selector::Pid(pid),
            _ => return Err(ApiError::invalid("pid must be between 1 and 4294967295")),
        }
    } else {
        validate_tag(s)?;
        Selector::Tag(s.to_string())
    };
    Ok(pb::ProcessSelector {
        selector: Some(selector),
    })
}

/// Checks a terminal size.
pub fn validate_size(cols: u32, rows: u32) -> ApiResult<pb::TerminalSize> {
    let side = 1..=MAX_TERMINAL_SIDE;
    if side.contains(&cols) && side.contains(&rows) {
        Ok(pb::TerminalSize { cols, rows })
    } else {
        Err(ApiError::invalid(format!(
            "cols and rows must be 1–{MAX_TERMINAL_SIDE}"
        )))
    }
}

fn info_view(p: pb::ProcessInfo) -> ProcessInfo {
    ProcessInfo {
        pid: p.pid,
        tag: (!p.tag.is_empty()).then_some(p.tag),
        cmd: p.cmd,
        args: p.args,
        cwd: (!p.cwd.is_empty()).then_some(p.cwd),
    }
}

fn input_bytes(req: &ProcessInputRequest) -> ApiResult<Vec<u8>> {
    let data = match (&req.data, &req.data_base64) {
        (Some(text), None) => text.as_bytes().to_vec(),
        (None, Some(b64)) => B64
            .decode(b64)
            .map_err(|_| ApiError::invalid("data_base64 is not valid base64"))?,
        _ => {
            return Err(ApiError::invalid(
                "give exactly one of `data` (text) and `data_base64`",
            ));
        }
    };
    if data.len() > MAX_INPUT {
        return Err(ApiError::limit("data", "1 MiB", ""));
    }
    Ok(data)
}

/// A terminal attachment: its output and the way to drive it. Dropping it detaches; the
/// terminal keeps running.
pub struct TerminalSession {
    client: AgentClient,
    sandbox: SandboxId,
    process: pb::ProcessSelector,
    /// The pid of the terminal's process.
    pub pid: u32,
    output: tonic::Streaming<pb::ProcessEvent>,
}

/// What a terminal produced.
#[derive(Debug)]
pub enum TerminalOutput {
    /// Bytes for the screen.
    Data(Vec<u8>),
    /// The process exited; nothing follows.
    Exit(i32),
}

impl TerminalSession {
    /// The next output; `None` when the attachment ended without an exit.
    pub async fn next(&mut self) -> Option<ApiResult<TerminalOutput>> {
        loop {
            let event = match self.output.message().await {
                Ok(Some(ev)) => ev,
                Ok(None) => return None,
                Err(status) => return Some(Err(from_agent(&status))),
            };
            match event.event {
                Some(
                    process_event::Event::Terminal(b)
                    | process_event::Event::Stdout(b)
                    | process_event::Event::Stderr(b),
                ) => return Some(Ok(TerminalOutput::Data(b))),
                Some(process_event::Event::Exited(x)) => {
                    return Some(Ok(TerminalOutput::Exit(x.exit_code)));
                }
                Some(process_event::Event::Started(_)) | None => {}
            }
        }
    }

    /// A handle that sends input and control requests while [`Self::next`] is awaited.
    pub fn control(&self) -> TerminalControl {
        TerminalControl {
            client: self.client.clone(),
            sandbox: self.sandbox,
            process: self.process.clone(),
        }
    }
}

/// Sends input and control requests to an attached terminal.
#[derive(Clone)]
pub struct TerminalControl {
    client: AgentClient,
    sandbox: SandboxId,
    process: pb::ProcessSelector,
}

impl TerminalControl {
    /// Types `data`. Returns once the guest wrote it to the terminal.
    pub async fn input(&mut self, data: Vec<u8>) -> ApiResult<()> {
        if data.len() > MAX_INPUT {
            return Err(ApiError::limit("input frame", "1 MiB", ""));
        }
        self.client
            .send_process_input(pb::SendProcessInputRequest {
                sandbox_id: self.sandbox.to_string(),
                process: Some(self.process.clone()),
                data,
                terminal: true,
            })
            .await
            .map_err(|s| from_agent(&s))?;
        Ok(())
    }

    /// Resizes the terminal.
    pub async fn resize(&mut self, cols: u32, rows: u32) -> ApiResult<()> {
        let size = validate_size(cols, rows)?;
        self.client
            .resize_terminal(pb::ResizeTerminalRequest {
                sandbox_id: self.sandbox.to_string(),
                process: Some(self.process.clone()),
                size: Some(size),
            })
            .await
            .map_err(|s| from_agent(&s))?;
        Ok(())
    }

    /// Signals the terminal's process group.
    pub async fn signal(&mut self, signal: ProcessSignal) -> ApiResult<()> {
        self.client
            .signal_process(pb::SignalProcessRequest {
                sandbox_id: self.sandbox.to_string(),
                process: Some(self.process.clone()),
                signal: signal.number(),
            })
            .await
            .map_err(|s| from_agent(&s))?;
        Ok(())
    }
}

impl Services {
    /// Starts a process (a terminal's too) and audits it: who started what where; its
    /// arguments and environment are left out (they may carry secrets).
    async fn start(
        &self,
        caller: &Caller,
        id: SandboxId,
        request: pb::StartProcessRequest,
    ) -> ApiResult<ProcessInfo> {
        let (_, mut client) = self.running(caller, id).await?;
        let terminal = request.terminal.is_some();
        let details = serde_json::json!({
            "cmd": request.cmd, "tag": request.tag, "user": request.user, "terminal": terminal,
        });
        let started = client
            .start_process(request)
            .await
            .map_err(|s| from_agent(&s))
            .map(|r| r.into_inner());
        let mut details = details;
        match &started {
            Ok(info) => details["pid"] = info.pid.into(),
            Err(e) => details["error"] = e.message.clone().into(),
        }
        self.audit(AuditEntry {
            actor: AuditActor::Caller(*caller),
            team: Some(caller.team),
            action: if terminal {
                "sandbox.terminal.start"
            } else {
                "sandbox.process.start"
            },
            resource_type: "sandbox",
            resource_id: Some(id.to_string()),
            ok: started.is_ok(),
            details,
        })
        .await;
        let info = started?;
        self.touch(id).await;
        Ok(info_view(info))
    }

    /// Starts a process in the background.
    #[tracing::instrument(skip_all, fields(sandbox = %id))]
    pub async fn start_process(
        &self,
        caller: &Caller,
        id: SandboxId,
        req: &StartProcessRequest,
    ) -> ApiResult<ProcessInfo> {
        let c = self.command(&ExecRequest {
            command: req.command.clone(),
            argv: req.argv.clone(),
            env: req.env.clone(),
            cwd: req.cwd.clone(),
            user: req.user.clone(),
            timeout_sec: None,
            stdin_base64: None,
        })?;
        if let Some(tag) = &req.tag {
            validate_tag(tag)?;
        }
        let request = pb::StartProcessRequest {
            sandbox_id: id.to_string(),
            cmd: c.cmd,
            args: c.args,
            env: c.env.into_iter().collect(),
            cwd: c.cwd,
            user: c.user,
            tag: req.tag.clone().unwrap_or_default(),
            stdin: req.stdin,
            terminal: None,
        };
        self.start(caller, id, request).await
    }

    /// Starts a shell (or the given program) on a terminal, in the background.
    #[tracing::instrument(skip_all, fields(sandbox = %id))]
    pub async fn start_terminal(
        &self,
        caller: &Caller,
        id: SandboxId,
        req: &StartTerminalRequest,
    ) -> ApiResult<ProcessInfo> {
        let size = validate_size(req.cols.unwrap_or(80), req.rows.unwrap_or(24))?;
        let argv = req
            .argv
            .clone()
            .unwrap_or_else(|| DEFAULT_SHELL.iter().map(|s| s.to_string()).collect());
        let mut env = req.env.clone();
        env.entry("TERM".into())
            .or_insert_with(|| "xterm-256color".into());
        let c = self.command(&ExecRequest {
            command: None,
            argv: Some(argv),
            env,
            cwd: req.cwd.clone(),
            user: req.user.clone(),
            timeout_sec: None,
            stdin_base64: None,
        })?;
        if let Some(tag) = &req.tag {
            validate_tag(tag)?;
        }
        let request = pb::StartProcessRequest {
            sandbox_id: id.to_string(),
            cmd: c.cmd,
            args: c.args,
            env: c.env.into_iter().collect(),
            cwd: c.cwd,
            user: c.user,
            tag: req.tag.clone().unwrap_or_default(),
            stdin: true,
            terminal: Some(size),
        };
        self.start(caller, id, request).await
    }

    /// The sandbox's running processes.
    pub async fn list_processes(&self, caller: &Caller, id: SandboxId) -> ApiResult<ProcessList> {
        let (_, mut client) = self.running(caller, id).await?;
        let list = client
            .list_processes(pb::ListProcessesRequest {
                sandbox_id: id.to_string(),
            })
            .await
            .map_err(|s| from_agent(&s))?
            .into_inner();
        self.touch(id).await;
        let mut items: Vec<ProcessInfo> = list.processes.into_iter().map(info_view).collect();
        items.sort_by_key(|p| p.pid);
        Ok(ProcessList { items })
    }

    async fn connect(
        &self,
        caller: &Caller,
        id: SandboxId,
        process: &str,
    ) -> ApiResult<(
        AgentClient,
        pb::ProcessSelector,
        tonic::Streaming<pb::ProcessEvent>,
    )> {
        let selector = parse_process(process)?;
        let (_, mut client) = self.running(caller, id).await?;
        let stream = client
            .connect_process(pb::ConnectProcessRequest {
                sandbox_id: id.to_string(),
                process: Some(selector.clone()),
            })
            .await
            .map_err(|s| from_agent(&s))?
            .into_inner();
        self.touch(id).await;
        Ok((client, selector, stream))
    }

    /// Streams a running process's output from now on, then its exit. Terminal output
    /// arrives as `stdout`.
    #[tracing::instrument(skip_all, fields(sandbox = %id, process))]
    pub async fn process_output(
        &self,
        caller: &Caller,
        id: SandboxId,
        process: &str,
    ) -> ApiResult<impl Stream<Item = ExecEvent> + Send + 'static + use<>> {
        let (_, _, stream) = self.connect(caller, id, process).await?;
        Ok(stream.map(|item| match item {
            Ok(ev) => match ev.event {
                Some(process_event::Event::Started(s)) => ExecEvent::Started { pid: s.pid },
                Some(process_event::Event::Stdout(b) | process_event::Event::Terminal(b)) => {
                    ExecEvent::Stdout {
                        data: B64.encode(b),
                    }
                }
                Some(process_event::Event::Stderr(b)) => ExecEvent::Stderr {
                    data: B64.encode(b),
                },
                Some(process_event::Event::Exited(x)) => ExecEvent::Exit {
                    exit_code: x.exit_code,
                    duration_ms: x.duration_ms,
                    timed_out: false,
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

    /// Attaches to a terminal: its output from now on, and a way to type into it.
    #[tracing::instrument(skip_all, fields(sandbox = %id, process))]
    pub async fn attach_terminal(
        &self,
        caller: &Caller,
        id: SandboxId,
        process: &str,
    ) -> ApiResult<TerminalSession> {
        let (client, selector, mut output) = self.connect(caller, id, process).await?;
        // The agent's first event is the start event with the pid.
        let pid = match output.message().await {
            Ok(Some(pb::ProcessEvent {
                event: Some(process_event::Event::Started(s)),
            })) => s.pid,
            Ok(_) => {
                return Err(ApiError::new(
                    ErrorCode::AgentError,
                    "the host agent did not confirm the attachment",
                ));
            }
            Err(status) => return Err(from_agent(&status)),
        };
        Ok(TerminalSession {
            client,
            sandbox: id,
            process: selector,
            pid,
            output,
        })
    }

    /// Writes to a process's stdin.
    pub async fn send_process_input(
        &self,
        caller: &Caller,
        id: SandboxId,
        process: &str,
        req: &ProcessInputRequest,
    ) -> ApiResult<()> {
        let selector = parse_process(process)?;
        let data = input_bytes(req)?;
        let (_, mut client) = self.running(caller, id).await?;
        client
            .send_process_input(pb::SendProcessInputRequest {
                sandbox_id: id.to_string(),
                process: Some(selector),
                data,
                terminal: false,
            })
            .await
            .map_err(|s| from_agent(&s))?;
        self.touch(id).await;
        Ok(())
    }

    /// Closes a process's stdin (end of input).
    pub async fn close_process_stdin(
        &self,
        caller: &Caller,
        id: SandboxId,
        process: &str,
    ) -> ApiResult<()> {
        let selector = parse_process(process)?;
        let (_, mut client) = self.running(caller, id).await?;
        client
            .close_process_stdin(pb::CloseProcessStdinRequest {
                sandbox_id: id.to_string(),
                process: Some(selector),
            })
            .await
            .map_err(|s| from_agent(&s))?;
        self.touch(id).await;
        Ok(())
    }

    /// Signals a process's group.
    #[tracing::instrument(skip_all, fields(sandbox = %id, process, ?signal))]
    pub async fn signal_process(
        &self,
        caller: &Caller,
        id: SandboxId,
        process: &str,
        signal: ProcessSignal,
    ) -> ApiResult<()> {
        let selector = parse_process(process)?;
        let (_, mut client) = self.running(caller, id).await?;
        client
            .signal_process(pb::SignalProcessRequest {
                sandbox_id: id.to_string(),
                process: Some(selector),
                signal: signal.number(),
            })
            .await
            .map_err(|s| from_agent(&s))?;
        self.touch(id).await;
        Ok(())
    }

    /// Watches a directory: `started`, then its changes until the client goes away.
    #[tracing::instrument(skip_all, fields(sandbox = %id))]
    pub async fn watch_dir(
        &self,
        caller: &Caller,
        id: SandboxId,
        q: &WatchQuery,
    ) -> ApiResult<impl Stream<Item = WatchEvent> + Send + 'static + use<>> {
        validate_path(&q.path)?;
        let user = validate_user(&q.user)?;
        let (_, mut client) = self.running(caller, id).await?;
        let stream = client
            .watch_dir(pb::WatchDirRequest {
                sandbox_id: id.to_string(),
                path: q.path.clone(),
                recursive: q.recursive.unwrap_or(false),
                user,
            })
            .await
            .map_err(|s| from_agent(&s))?
            .into_inner();
        self.touch(id).await;
        Ok(stream.filter_map(|item| async move {
            match item {
                Ok(ev) if ev.started => Some(WatchEvent::Started),
                Ok(ev) => {
                    let name = ev.name;
                    match pb::WatchEventType::try_from(ev.r#type).ok()? {
                        pb::WatchEventType::Create => Some(WatchEvent::Create { name }),
                        pb::WatchEventType::Write => Some(WatchEvent::Write { name }),
                        pb::WatchEventType::Remove => Some(WatchEvent::Remove { name }),
                        pb::WatchEventType::Rename => Some(WatchEvent::Rename { name }),
                        pb::WatchEventType::Chmod => Some(WatchEvent::Chmod { name }),
                        pb::WatchEventType::Unspecified => None,
                    }
                }
                Err(status) => {
                    let e = from_agent(&status);
                    Some(WatchEvent::Error {
                        code: e.code,
                        message: e.message,
                    })
                }
            }
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn processes_by_pid_or_tag() {
        use pb::process_selector::Selector;
        assert_eq!(
            parse_process("42").unwrap().selector,
            Some(Selector::Pid(42))
        );
        assert_eq!(
            parse_process("web-1").unwrap().selector,
            Some(Selector::Tag("web-1".into()))
        );
        for bad in ["", "0", "99999999999", "a b", "x/y", &"t".repeat(65)] {
            assert_eq!(
                parse_process(bad).unwrap_err().code,
                ErrorCode::InvalidRequest,
                "{bad:?}"
            );
        }
        assert!(validate_tag("123").is_err());
        assert!(validate_size(0, 10).is_err());
        assert!(validate_size(80, 24).is_ok());
    }

    #[test]
    fn input_is_text_or_base64() {
        let text = ProcessInputRequest {
            data: Some("hi".into()),
            data_base64: None,
        };
        assert_eq!(input_bytes(&text).unwrap(), b"hi");
        let b64 = ProcessInputRequest {
            data: None,
            data_base64: Some("AAE=".into()),
        };
        assert_eq!(input_bytes(&b64).unwrap(), [0, 1]);
        assert!(input_bytes(&ProcessInputRequest::default()).is_err());
    }
}
