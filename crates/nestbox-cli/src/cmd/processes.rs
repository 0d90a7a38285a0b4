//! `sandbox ps`, `sandbox kill` and the interactive `sandbox shell`.
//!
//! `shell` puts the local terminal in raw mode (restored on every exit path by
//! [`RawMode`]'s drop), starts a terminal in the sandbox (or attaches to one by pid or tag)
//! and relays bytes both ways over the WebSocket. Local input is read by one blocking thread
//! into a bounded channel, so a slow sandbox slows the typist, never a queue. Ctrl-]
//! detaches and leaves the shell running; window size changes are forwarded.

use std::io::{Read as _, Write as _};

use anyhow::Context;
use nestbox_client::{Client, TerminalFrame};
use nestbox_types::SandboxId;
use nestbox_types::api::{ProcessSignal, StartTerminalRequest, TerminalServerMessage};
use tokio::sync::mpsc;

/// The byte that detaches (Ctrl-]).
const DETACH: u8 = 0x1d;
/// Chunks of local input that may wait for the sandbox.
const INPUT_CHUNKS: usize = 16;

/// Prints the sandbox's processes.
pub async fn ps(c: &Client, id: SandboxId) -> anyhow::Result<()> {
    let list = c.list_processes(id).await?;
    println!("{:>8}  {:<16}  COMMAND", "PID", "TAG");
    for p in list {
        let mut argv = vec![p.cmd];
        argv.extend(p.args);
        println!(
            "{:>8}  {:<16}  {}",
            p.pid,
            p.tag.unwrap_or_else(|| "-".into()),
            argv.join(" ")
        );
    }
    Ok(())
}

/// Signals processes by pid or tag.
pub async fn kill(
    c: &Client,
    id: SandboxId,
    processes: &[String],
    term: bool,
) -> anyhow::Result<()> {
    for p in processes {
        if term {
            c.signal_process(id, p, ProcessSignal::Sigterm).await
        } else {
            c.kill_process(id, p).await
        }
        .with_context(|| format!("signalling {p}"))?;
        println!("signalled {p}");
    }
    Ok(())
}

/// Restores the local terminal when dropped.
struct RawMode;

impl RawMode {
    fn enable() -> anyhow::Result<Self> {
        crossterm::terminal::enable_raw_mode().context("switching the terminal to raw mode")?;
        Ok(RawMode)
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let _ = crossterm::terminal::disable_raw_mode();
    }
}

/// What `shell` does.
#[derive(Debug, Default)]
pub struct ShellOptions {
    /// Attach to this terminal (pid or tag) instead of starting one.
    pub attach: Option<String>,
    /// Tag of a new terminal.
    pub tag: Option<String>,
    /// User of a new terminal.
    pub user: Option<String>,
    /// Working directory of a new terminal.
    pub cwd: Option<String>,
}

/// The local window size; 80×24 when it is unknown (a terminal that never set one).
fn window_size() -> (u16, u16) {
    match crossterm::terminal::size() {
        Ok((cols, rows)) if cols > 0 && rows > 0 => (cols, rows),
        _ => (80, 24),
    }
}

/// Runs an interactive terminal in the sandbox until it exits or the user detaches.
pub async fn shell(c: &Client, id: SandboxId, opts: ShellOptions) -> anyhow::Result<()> {
    let (cols, rows) = window_size();
    let process = match opts.attach {
        Some(p) => p,
        None => {
            let mut env = std::collections::BTreeMap::new();
            if let Ok(term) = std::env::var("TERM") {
                env.insert("TERM".to_string(), term);
            }
            let started = c
                .start_terminal(
                    id,
                    &StartTerminalRequest {
                        cols: Some(cols.into()),
                        rows: Some(rows.into()),
                        env,
                        cwd: opts.cwd,
                        user: opts.user,
                        tag: opts.tag.clone(),
                        argv: None,
                    },
                )
                .await?;
            opts.tag.unwrap_or_else(|| started.pid.to_string())
        }
    };
    let terminal = c.attach_terminal(id, &process).await?;
    let (mut writer, mut reader) = (terminal.writer, terminal.reader);
    eprintln!("attached to {process}; Ctrl-] detaches (reattach with --attach {process})\r");
    let raw = RawMode::enable()?;
    // The size may have changed meanwhile, and an attached terminal keeps its old one.
    writer.resize(cols.into(), rows.into()).await?;

    let (tx, mut input) = mpsc::channel::<Vec<u8>>(INPUT_CHUNKS);
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin().lock();
        let mut buf = [0u8; 4096];
        while let Ok(n) = stdin.read(&mut buf) {
            if n == 0 || tx.blocking_send(buf[..n].to_vec()).is_err() {
                return;
            }
        }
    });
    let mut winch = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::window_change())
        .context("watching window size changes")?;
    let mut stdout = std::io::stdout();
    let outcome = loop {
        tokio::select! {
            frame = reader.next() => match frame {
                Some(Ok(TerminalFrame::Output(bytes))) => {
                    stdout.write_all(&bytes)?;
                    stdout.flush()?;
                }
                Some(Ok(TerminalFrame::Control(TerminalServerMessage::Exit { exit_code }))) => {
                    break format!("exited with {exit_code}");
                }
                Some(Ok(TerminalFrame::Control(TerminalServerMessage::Error { code, message }))) => {
                    eprint!("\r\n[{code}: {message}]\r\n");
                }
                Some(Ok(TerminalFrame::Control(_))) => {}
                Some(Err(e)) => break format!("connection failed: {e}"),
                None => break "connection closed".to_string(),
            },
            chunk = input.recv() => match chunk {
                Some(bytes) => {
                    if let Some(at) = bytes.iter().position(|b| *b == DETACH) {
                        if at > 0 {
                            writer.input(&bytes[..at]).await?;
                        }
                        let _ = writer.close().await;
                        break format!("detached; the terminal keeps running as {process}");
                    }
                    writer.input(&bytes).await?;
                }
                None => break "end of input".to_string(),
            },
            _ = winch.recv() => {
                let (cols, rows) = window_size();
                writer.resize(cols.into(), rows.into()).await?;
            }
        }
    };
    drop(raw);
    eprintln!("\n{outcome}");
    Ok(())
}
