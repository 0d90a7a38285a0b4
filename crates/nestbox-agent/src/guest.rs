//! Running commands in a guest through its agent (envd protocol).
//!
//! [`run`] is the one implementation behind both collected and streamed exec: it starts the
//! process, forwards events to an optional channel, keeps at most `max_output` bytes per
//! stream, and enforces the timeout by killing the process (SIGKILL to its group) and
//! waiting a bounded time for its end event.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use nestbox_envd::client::EnvdClient;
use nestbox_envd::process::{
    ProcessConfig, ProcessInput, ProcessSelector, Signal, StartRequest, process_event,
    process_event::data_event, process_input,
};
use nestbox_proto::hostagent::{ExecEvent, ExecExited, ExecStarted, exec_event};
use nestbox_types::SandboxId;
use tokio::sync::mpsc;

use crate::error::AgentError;

/// How long to wait for the end event after killing a timed-out process.
const KILL_GRACE: Duration = Duration::from_secs(5);

/// A command to run.
#[derive(Debug, Clone)]
pub struct ExecParams {
    /// Program.
    pub cmd: String,
    /// Arguments.
    pub args: Vec<String>,
    /// Extra environment.
    pub env: HashMap<String, String>,
    /// Working directory, if any.
    pub cwd: Option<String>,
    /// User, if not the default.
    pub user: Option<String>,
    /// Kill after this long.
    pub timeout: Duration,
    /// Bytes for stdin (then closed); `None` leaves stdin closed from the start.
    pub stdin: Option<Bytes>,
    /// Per-stream limit of collected output.
    pub max_output: u64,
}

/// What a finished command produced.
#[derive(Debug, Default)]
pub struct ExecOutcome {
    /// Pid in the guest.
    pub pid: u32,
    /// Collected stdout (empty when streaming).
    pub stdout: Vec<u8>,
    /// Collected stderr (empty when streaming).
    pub stderr: Vec<u8>,
    /// Exit status; 128+n for signal n.
    pub exit_code: i32,
    /// Wall time.
    pub duration: Duration,
    /// Killed by the timeout.
    pub timed_out: bool,
    /// Stdout beyond the limit was dropped.
    pub stdout_truncated: bool,
    /// Stderr beyond the limit was dropped.
    pub stderr_truncated: bool,
}

fn append(buf: &mut Vec<u8>, data: &[u8], limit: u64, truncated: &mut bool) {
    let room = usize::try_from(limit)
        .unwrap_or(usize::MAX)
        .saturating_sub(buf.len());
    if data.len() > room {
        *truncated = true;
    }
    buf.extend_from_slice(&data[..data.len().min(room)]);
}

/// Exit code from the guest's end event: the status when it exited, 128+signal when killed.
pub(crate) fn exit_code(end: &process_event::EndEvent) -> i32 {
    if end.exited {
        return end.exit_code;
    }
    // "signal: killed" / "signal: terminated" / "signal: 9"
    let sig = end.status.strip_prefix("signal: ").map(str::trim);
    let num = match sig {
        Some("killed") => Some(9),
        Some("terminated") => Some(15),
        Some("interrupt") => Some(2),
        Some("hangup") => Some(1),
        Some(s) => s.parse::<i32>().ok(),
        None => None,
    };
    match num {
        Some(n) => 128 + n,
        None if end.exit_code != 0 => end.exit_code,
        None => -1,
    }
}

/// Runs a command in the guest. With `events`, output is forwarded as it arrives and not
/// collected; a closed receiver does not stop the command (it outlives its watcher, like
/// any guest process) but ends forwarding.
pub async fn run(
    id: SandboxId,
    guest: &EnvdClient,
    params: ExecParams,
    events: Option<mpsc::Sender<Result<ExecEvent, tonic::Status>>>,
) -> Result<ExecOutcome, AgentError> {
    let guest_err = |source| AgentError::Guest { id, source };
    let client = match &params.user {
        Some(user) => guest.as_user(user).map_err(guest_err)?,
        None => guest.clone(),
    };
    let request = StartRequest {
        process: Some(ProcessConfig {
            cmd: params.cmd.clone(),
            args: params.args.clone(),
            envs: params.env.clone(),
            cwd: params.cwd.clone(),
        }),
        pty: None,
        tag: None,
        stdin: Some(params.stdin.is_some()),
    };
    let started = Instant::now();
    let mut stream = client.start(request).await.map_err(guest_err)?;
    let mut out = ExecOutcome::default();
    let mut events = events;
    let deadline = tokio::time::Instant::now() + params.timeout;
    let mut killed_at: Option<tokio::time::Instant> = None;

    loop {
        let limit = killed_at.map(|t| t + KILL_GRACE).unwrap_or(deadline);
        let next = tokio::time::timeout_at(limit, stream.next()).await;
        let event = match next {
            Err(_elapsed) if killed_at.is_none() => {
                out.timed_out = true;
                killed_at = Some(tokio::time::Instant::now());
                let target = if out.pid != 0 {
                    ProcessSelector::pid(out.pid)
                } else {
                    continue;
                };
                if let Err(e) = client.send_signal(target, Signal::Sigkill).await {
                    tracing::warn!(sandbox = %id, error = %e, "killing a timed-out command");
                }
                continue;
            }
            Err(_elapsed) => {
                return Err(AgentError::Internal(format!(
                    "command in {id} did not end {KILL_GRACE:?} after it was killed"
                )));
            }
            Ok(None) => {
                return Err(AgentError::Internal(format!(
                    "the guest agent of {id} ended the process stream without an end event"
                )));
            }
            Ok(Some(Err(e))) => return Err(guest_err(e)),
            Ok(Some(Ok(event))) => event,
        };
        let forward = |ev: exec_event::Event| ExecEvent { event: Some(ev) };
        match event.event {
            Some(process_event::Event::Start(start)) => {
                out.pid = start.pid;
                if let Some(input) = params.stdin.clone() {
                    let sel = ProcessSelector::pid(start.pid);
                    let input = ProcessInput {
                        input: Some(process_input::Input::Stdin(input)),
                    };
                    client
                        .send_input(sel.clone(), input)
                        .await
                        .map_err(guest_err)?;
                    client.close_stdin(sel).await.map_err(guest_err)?;
                }
                if let Some(tx) = &events
                    && tx
                        .send(Ok(forward(exec_event::Event::Started(ExecStarted {
                            pid: start.pid,
                        }))))
                        .await
                        .is_err()
                {
                    events = None;
                }
            }
            Some(process_event::Event::Data(data)) => match data.output {
                Some(data_event::Output::Stdout(bytes)) => match &events {
                    Some(tx) => {
                        if tx
                            .send(Ok(forward(exec_event::Event::Stdout(bytes.to_vec()))))
                            .await
                            .is_err()
                        {
                            events = None;
                        }
                    }
                    None => append(
                        &mut out.stdout,
                        &bytes,
                        params.max_output,
                        &mut out.stdout_truncated,
                    ),
                },
                Some(data_event::Output::Stderr(bytes)) => match &events {
                    Some(tx) => {
                        if tx
                            .send(Ok(forward(exec_event::Event::Stderr(bytes.to_vec()))))
                            .await
                            .is_err()
                        {
                            events = None;
                        }
                    }
                    None => append(
                        &mut out.stderr,
                        &bytes,
                        params.max_output,
                        &mut out.stderr_truncated,
                    ),
                },
                Some(data_event::Output::Pty(bytes)) => append(
                    &mut out.stdout,
                    &bytes,
                    params.max_output,
                    &mut out.stdout_truncated,
                ),
                None => {}
            },
            Some(process_event::Event::End(end)) => {
                out.exit_code = exit_code(&end);
                out.duration = started.elapsed();
                if let Some(tx) = &events {
                    let _ = tx
                        .send(Ok(forward(exec_event::Event::Exited(ExecExited {
                            exit_code: out.exit_code,
                            duration_ms: u64::try_from(out.duration.as_millis())
                                .unwrap_or(u64::MAX),
                            timed_out: out.timed_out,
                        }))))
                        .await;
                }
                return Ok(out);
            }
            Some(process_event::Event::Keepalive(_)) | None => {}
        }
    }
}

/// Flushes the guest's page cache to its disk (`sync`), so a disk copy is complete.
pub async fn sync(id: SandboxId, guest: &EnvdClient) -> Result<(), AgentError> {
    let params = ExecParams {
        cmd: "sync".into(),
        args: Vec::new(),
        env: HashMap::new(),
        cwd: None,
        user: None,
        timeout: Duration::from_secs(60),
        stdin: None,
        max_output: 4096,
    };
    let out = run(id, guest, params, None).await?;
    if out.exit_code != 0 {
        return Err(AgentError::Internal(format!(
            "sync in {id} exited with {}",
            out.exit_code
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes() {
        let end = |exited, code, status: &str| process_event::EndEvent {
            exit_code: code,
            exited,
            status: status.into(),
            error: None,
        };
        assert_eq!(exit_code(&end(true, 3, "exit status 3")), 3);
        assert_eq!(exit_code(&end(false, -1, "signal: killed")), 137);
        assert_eq!(exit_code(&end(false, -1, "signal: terminated")), 143);
    }

    #[test]
    fn append_truncates() {
        let mut buf = Vec::new();
        let mut t = false;
        append(&mut buf, b"hello", 3, &mut t);
        assert_eq!(buf, b"hel");
        assert!(t);
        append(&mut buf, b"x", 3, &mut t);
        assert_eq!(buf, b"hel");
    }
}
