//! Test harness: runs the real `nestbox-guest serve` on a loopback port and hands out
//! clients. The server is killed when the [`Guest`] is dropped.

#![allow(dead_code, clippy::expect_used, clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures::StreamExt;
use nestbox_envd::client::{EnvdClient, EnvdError};
use nestbox_envd::process::{ProcessConfig, ProcessEvent, StartRequest, process_event};
use nestbox_envd::types::InitRequest;

/// A running guest agent.
pub struct Guest {
    child: Child,
    pub addr: SocketAddr,
    pub base: String,
}

impl Guest {
    /// Starts the server with extra arguments and waits for its `listening on` line.
    /// `NESTBOX_GUEST_BIN` runs another build (the static one shipped in VMs) instead.
    pub fn start(extra: &[&str]) -> Guest {
        let binary = std::env::var("NESTBOX_GUEST_BIN")
            .unwrap_or_else(|_| env!("CARGO_BIN_EXE_nestbox-guest").to_owned());
        let mut child = Command::new(binary)
            .arg("serve")
            .args(["--listen", "127.0.0.1:0"])
            .args(extra)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start nestbox-guest");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("the guest printed no listening line in time");
        let addr: SocketAddr = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .parse()
            .expect("address");
        Guest {
            child,
            addr,
            base: format!("http://{addr}"),
        }
    }

    /// Starts a server and initialises it with `token`.
    pub async fn with_token(token: &str) -> Guest {
        let guest = Guest::start(&[]);
        guest
            .client(None)
            .init(&InitRequest {
                access_token: Some(token.into()),
                ..InitRequest::default()
            })
            .await
            .expect("init");
        guest
    }

    /// An envd client with `token`.
    pub fn client(&self, token: Option<&str>) -> EnvdClient {
        EnvdClient::new(self.base.clone(), token.map(str::to_owned)).expect("client")
    }

    /// A URL on this guest.
    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The token the tests use.
pub const TOKEN: &str = "test-token-0123456789";

/// Whether the tests run as root.
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// A start request for `cmd args…`.
pub fn command(cmd: &str, args: &[&str]) -> StartRequest {
    StartRequest {
        process: Some(ProcessConfig {
            cmd: cmd.into(),
            args: args.iter().map(|s| s.to_string()).collect(),
            ..ProcessConfig::default()
        }),
        stdin: Some(false),
        ..StartRequest::default()
    }
}

/// A start request for `sh -c script`.
pub fn sh(script: &str) -> StartRequest {
    command("/bin/sh", &["-c", script])
}

/// Everything a process produced.
#[derive(Debug, Default)]
pub struct Outcome {
    pub pid: u32,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub pty: Vec<u8>,
    pub end: Option<process_event::EndEvent>,
    pub error: Option<EnvdError>,
}

/// Reads a process's events to the end (or the first error), within `limit`.
pub async fn collect<S>(mut events: S, limit: Duration) -> Outcome
where
    S: futures::Stream<Item = Result<ProcessEvent, EnvdError>> + Unpin,
{
    let mut outcome = Outcome::default();
    let deadline = Instant::now() + limit;
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        let next = tokio::time::timeout(remaining, events.next())
            .await
            .expect("the process did not finish in time");
        match next {
            None => break,
            Some(Err(e)) => {
                outcome.error = Some(e);
                break;
            }
            Some(Ok(event)) => apply(&mut outcome, event),
        }
    }
    outcome
}

/// Folds one event into an outcome.
pub fn apply(outcome: &mut Outcome, event: ProcessEvent) {
    use process_event::data_event::Output;
    match event.event {
        Some(process_event::Event::Start(start)) => outcome.pid = start.pid,
        Some(process_event::Event::Data(data)) => match data.output {
            Some(Output::Stdout(b)) => outcome.stdout.extend_from_slice(&b),
            Some(Output::Stderr(b)) => outcome.stderr.extend_from_slice(&b),
            Some(Output::Pty(b)) => outcome.pty.extend_from_slice(&b),
            None => {}
        },
        Some(process_event::Event::End(end)) => outcome.end = Some(end),
        Some(process_event::Event::Keepalive(_)) | None => {}
    }
}

/// Polls `check` until it returns `Some`, failing after `limit`.
pub async fn wait_for<T, F, Fut>(limit: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Deterministic pseudo-random bytes.
pub fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed | 1;
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.extend_from_slice(&state.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Hex SHA-256.
pub fn sha256(data: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(data))
}
