//! A small async QMP client (QEMU Machine Protocol over a Unix socket).
//!
//! One reader task owns the read half: it routes each `return`/`error` to the request
//! with the same `id` and broadcasts every event. Requests are written under a mutex, so
//! the client is shared by `&self`. When QEMU closes the socket (it quits or dies), every
//! pending and later request fails with [`QmpError::Closed`].
//!
//! Protocol: read the greeting, send `qmp_capabilities`, then `{"execute", "arguments",
//! "id"}` requests; replies carry the same `id`; events (`{"event", "data",
//! "timestamp"}`) can arrive at any time.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::OwnedWriteHalf;
use tokio::sync::{Mutex, broadcast, oneshot};

/// How long a command may take before [`QmpError::Timeout`].
pub const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

/// A QMP failure.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    /// The socket never accepted a connection in time.
    #[error("cannot connect to QMP socket {} within {waited:?}", path.display())]
    Connect {
        /// The socket.
        path: PathBuf,
        /// How long we tried.
        waited: Duration,
        /// The last error.
        #[source]
        source: std::io::Error,
    },
    /// Reading or writing the socket failed.
    #[error("qmp i/o")]
    Io(#[source] std::io::Error),
    /// QEMU sent something we do not understand.
    #[error("qmp protocol: {0}")]
    Protocol(String),
    /// QEMU rejected a command.
    #[error("qmp command {command} failed: {class}: {desc}")]
    Command {
        /// The command.
        command: String,
        /// QEMU's error class.
        class: String,
        /// QEMU's description.
        desc: String,
    },
    /// The connection is closed (QEMU exited).
    #[error("qmp connection closed")]
    Closed,
    /// No reply in time.
    #[error("qmp command {command} got no reply within {after:?}")]
    Timeout {
        /// The command.
        command: String,
        /// The limit.
        after: Duration,
    },
}

/// An asynchronous QEMU event.
#[derive(Debug, Clone, PartialEq)]
pub struct QmpEvent {
    /// Event name (`STOP`, `RESUME`, `SHUTDOWN`, …).
    pub name: String,
    /// Its `data` member (`null` when absent).
    pub data: Value,
}

/// The QEMU version from the greeting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct QemuVersion {
    /// Major.
    pub major: u64,
    /// Minor.
    pub minor: u64,
    /// Micro.
    pub micro: u64,
}

type Pending =
    Arc<std::sync::Mutex<Option<HashMap<u64, oneshot::Sender<Result<Value, QmpError>>>>>>;

/// A connected, negotiated QMP session.
#[derive(Debug)]
pub struct QmpClient {
    writer: Mutex<OwnedWriteHalf>,
    pending: Pending,
    events: broadcast::Sender<QmpEvent>,
    next_id: AtomicU64,
    version: QemuVersion,
    reader: tokio::task::JoinHandle<()>,
}

impl Drop for QmpClient {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

impl QmpClient {
    /// Connects to `path` (retrying while QEMU creates the socket, up to `wait`), reads
    /// the greeting and enters command mode.
    pub async fn connect(path: &Path, wait: Duration) -> Result<Self, QmpError> {
        let deadline = tokio::time::Instant::now() + wait;
        let stream = loop {
            match UnixStream::connect(path).await {
                Ok(s) => break s,
                Err(e) if tokio::time::Instant::now() >= deadline => {
                    return Err(QmpError::Connect {
                        path: path.into(),
                        waited: wait,
                        source: e,
                    });
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
            }
        };
        Self::handshake(stream, wait).await
    }

    /// Negotiates on an already connected stream.
    pub async fn handshake(stream: UnixStream, wait: Duration) -> Result<Self, QmpError> {
        let (read, write) = stream.into_split();
        let mut lines = BufReader::new(read).lines();
        let greeting = tokio::time::timeout(wait, lines.next_line())
            .await
            .map_err(|_| QmpError::Timeout {
                command: "greeting".into(),
                after: wait,
            })?
            .map_err(QmpError::Io)?
            .ok_or(QmpError::Closed)?;
        let greeting: Value = serde_json::from_str(&greeting)
            .map_err(|e| QmpError::Protocol(format!("bad greeting: {e}")))?;
        let q = greeting
            .pointer("/QMP/version/qemu")
            .ok_or_else(|| QmpError::Protocol(format!("not a QMP greeting: {greeting}")))?;
        let num = |k: &str| q.get(k).and_then(Value::as_u64).unwrap_or(0);
        let version = QemuVersion {
            major: num("major"),
            minor: num("minor"),
            micro: num("micro"),
        };

        let pending: Pending = Arc::new(std::sync::Mutex::new(Some(HashMap::new())));
        let (events, _) = broadcast::channel(64);
        let reader = tokio::spawn(read_loop(lines, pending.clone(), events.clone()));
        let client = Self {
            writer: Mutex::new(write),
            pending,
            events,
            next_id: AtomicU64::new(1),
            version,
            reader,
        };
        client.execute("qmp_capabilities", None).await?;
        Ok(client)
    }

    /// The QEMU version from the greeting.
    pub fn version(&self) -> QemuVersion {
        self.version
    }

    /// Subscribes to events that arrive from now on.
    pub fn events(&self) -> broadcast::Receiver<QmpEvent> {
        self.events.subscribe()
    }

    /// Runs a command with [`DEFAULT_COMMAND_TIMEOUT`]; returns its `return` value.
    pub async fn execute(
        &self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<Value, QmpError> {
        self.execute_timeout(command, arguments, DEFAULT_COMMAND_TIMEOUT)
            .await
    }

    /// Runs a command with a time limit.
    pub async fn execute_timeout(
        &self,
        command: &str,
        arguments: Option<Value>,
        limit: Duration,
    ) -> Result<Value, QmpError> {
        self.run(command, arguments, limit, None).await
    }

    /// `getfd`: hands QEMU a file descriptor (sent with the command, `SCM_RIGHTS`) under
    /// `name`, for commands that take `fd:NAME` (a migration to or from a file the caller
    /// opened, so QEMU needs neither a shell nor access to the path).
    pub async fn getfd(&self, name: &str, fd: BorrowedFd<'_>) -> Result<(), QmpError> {
        self.run(
            "getfd",
            Some(json!({ "fdname": name })),
            DEFAULT_COMMAND_TIMEOUT,
            Some(fd),
        )
        .await
        .map(drop)
    }

    /// Writes one request line; a descriptor to pass travels with its first bytes.
    async fn write_line(&self, line: &[u8], fd: Option<BorrowedFd<'_>>) -> std::io::Result<()> {
        let mut w = self.writer.lock().await;
        let mut rest = line;
        if let Some(fd) = fd {
            let stream: &UnixStream = w.as_ref();
            let fds = [fd.as_raw_fd()];
            let sent = loop {
                stream.writable().await?;
                let attempt = stream.try_io(tokio::io::Interest::WRITABLE, || {
                    nix::sys::socket::sendmsg::<()>(
                        stream.as_raw_fd(),
                        &[std::io::IoSlice::new(rest)],
                        &[nix::sys::socket::ControlMessage::ScmRights(&fds)],
                        nix::sys::socket::MsgFlags::MSG_NOSIGNAL,
                        None,
                    )
                    .map_err(std::io::Error::from)
                });
                match attempt {
                    Ok(n) => break n,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
            };
            rest = &rest[sent..];
        }
        w.write_all(rest).await
    }

    async fn run(
        &self,
        command: &str,
        arguments: Option<Value>,
        limit: Duration,
        fd: Option<BorrowedFd<'_>>,
    ) -> Result<Value, QmpError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        {
            let mut guard = self.pending.lock().map_err(|_| QmpError::Closed)?;
            let map = guard.as_mut().ok_or(QmpError::Closed)?;
            map.insert(id, tx);
        }
        let mut msg = json!({ "execute": command, "id": id });
        if let Some(a) = arguments {
            msg["arguments"] = a;
        }
        let mut line = msg.to_string();
        line.push('\n');
        if let Err(e) = self.write_line(line.as_bytes(), fd).await {
            self.forget(id);
            return Err(match e.kind() {
                std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset => {
                    QmpError::Closed
                }
                _ => QmpError::Io(e),
            });
        }
        match tokio::time::timeout(limit, rx).await {
            Ok(Ok(res)) => res.map_err(|e| match e {
                QmpError::Command { class, desc, .. } => QmpError::Command {
                    command: command.into(),
                    class,
                    desc,
                },
                other => other,
            }),
            Ok(Err(_)) => Err(QmpError::Closed),
            Err(_) => {
                self.forget(id);
                Err(QmpError::Timeout {
                    command: command.into(),
                    after: limit,
                })
            }
        }
    }

    fn forget(&self, id: u64) {
        if let Ok(mut g) = self.pending.lock()
            && let Some(map) = g.as_mut()
        {
            map.remove(&id);
        }
    }

    /// `query-status`: the run state (`running`, `paused`, `shutdown`, …).
    pub async fn query_status(&self) -> Result<String, QmpError> {
        let v = self.execute("query-status", None).await?;
        v.get("status")
            .and_then(Value::as_str)
            .map(str::to_string)
            .ok_or_else(|| QmpError::Protocol(format!("query-status returned {v}")))
    }

    /// `stop`: pause the vCPUs.
    pub async fn stop(&self) -> Result<(), QmpError> {
        self.execute("stop", None).await.map(drop)
    }

    /// `cont`: resume the vCPUs.
    pub async fn cont(&self) -> Result<(), QmpError> {
        self.execute("cont", None).await.map(drop)
    }

    /// `quit`: QEMU exits. The connection closing before the reply counts as success.
    pub async fn quit(&self) -> Result<(), QmpError> {
        match self
            .execute_timeout("quit", None, Duration::from_secs(5))
            .await
        {
            Ok(_) | Err(QmpError::Closed) => Ok(()),
            Err(e) => Err(e),
        }
    }
}

/// Where a migration stands (`query-migrate`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrationStatus {
    /// `none`, `setup`, `active`, `device`, `completed`, `failed`, `cancelled`, …
    pub status: String,
    /// QEMU's description of a failure.
    pub error: Option<String>,
    /// Bytes of RAM sent (outgoing side), when reported.
    pub ram_transferred: Option<u64>,
    /// QEMU's own measure of the total time, in ms, when reported.
    pub total_time_ms: Option<u64>,
}

impl MigrationStatus {
    /// Completed, failed or cancelled.
    pub fn is_finished(&self) -> bool {
        matches!(self.status.as_str(), "completed" | "failed" | "cancelled")
    }
}

impl QmpClient {
    /// `migrate-set-capabilities` with one capability.
    pub async fn set_migration_capability(&self, name: &str, state: bool) -> Result<(), QmpError> {
        self.execute(
            "migrate-set-capabilities",
            Some(json!({ "capabilities": [{ "capability": name, "state": state }] })),
        )
        .await
        .map(drop)
    }

    /// `migrate-set-parameters`.
    pub async fn set_migration_parameters(&self, parameters: Value) -> Result<(), QmpError> {
        self.execute("migrate-set-parameters", Some(parameters))
            .await
            .map(drop)
    }

    /// `migrate`: starts an outgoing migration to `uri` (returns at once).
    pub async fn migrate(&self, uri: &str) -> Result<(), QmpError> {
        self.execute("migrate", Some(json!({ "uri": uri })))
            .await
            .map(drop)
    }

    /// `migrate-incoming`: starts loading an incoming migration from `uri` (QEMU must have
    /// been started with `-incoming defer`; returns at once).
    pub async fn migrate_incoming(&self, uri: &str) -> Result<(), QmpError> {
        self.execute("migrate-incoming", Some(json!({ "uri": uri })))
            .await
            .map(drop)
    }

    /// `query-migrate`.
    pub async fn query_migrate(&self) -> Result<MigrationStatus, QmpError> {
        let v = self.execute("query-migrate", None).await?;
        Ok(MigrationStatus {
            // No migration yet: QEMU returns an empty object.
            status: v
                .get("status")
                .and_then(Value::as_str)
                .unwrap_or("none")
                .to_string(),
            error: v
                .get("error-desc")
                .and_then(Value::as_str)
                .map(str::to_string),
            ram_transferred: v.pointer("/ram/transferred").and_then(Value::as_u64),
            total_time_ms: v.get("total-time").and_then(Value::as_u64),
        })
    }
}

async fn read_loop(
    mut lines: tokio::io::Lines<BufReader<tokio::net::unix::OwnedReadHalf>>,
    pending: Pending,
    events: broadcast::Sender<QmpEvent>,
) {
    loop {
        let line = match lines.next_line().await {
            Ok(Some(l)) => l,
            Ok(None) | Err(_) => break,
        };
        let Ok(v) = serde_json::from_str::<Value>(&line) else {
            tracing::warn!(%line, "unparsable QMP message");
            continue;
        };
        if let Some(name) = v.get("event").and_then(Value::as_str) {
            let _ = events.send(QmpEvent {
                name: name.into(),
                data: v.get("data").cloned().unwrap_or(Value::Null),
            });
            continue;
        }
        let Some(id) = v.get("id").and_then(Value::as_u64) else {
            tracing::warn!(%line, "QMP reply without our id");
            continue;
        };
        let result = if let Some(r) = v.get("return") {
            Ok(r.clone())
        } else if let Some(e) = v.get("error") {
            let s = |k: &str| {
                e.get(k)
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string()
            };
            Err(QmpError::Command {
                command: String::new(),
                class: s("class"),
                desc: s("desc"),
            })
        } else {
            Err(QmpError::Protocol(format!(
                "reply with neither return nor error: {line}"
            )))
        };
        let tx = pending
            .lock()
            .ok()
            .and_then(|mut g| g.as_mut().and_then(|m| m.remove(&id)));
        if let Some(tx) = tx {
            let _ = tx.send(result);
        }
    }
    // Closed: fail everything pending and refuse new requests.
    if let Ok(mut g) = pending.lock()
        && let Some(map) = g.take()
    {
        for (_, tx) in map {
            let _ = tx.send(Err(QmpError::Closed));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::UnixListener;

    const GREETING: &str = r#"{"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": "Debian"}, "capabilities": ["oob"]}}"#;

    /// A fake QEMU: greets, answers commands by name, emits an event after `stop`,
    /// closes the socket on `quit` without replying.
    async fn fake_qemu(listener: UnixListener) {
        let (stream, _) = listener.accept().await.unwrap();
        let (r, mut w) = stream.into_split();
        w.write_all(format!("{GREETING}\n").as_bytes())
            .await
            .unwrap();
        let mut lines = BufReader::new(r).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            let v: Value = serde_json::from_str(&line).unwrap();
            let id = v["id"].clone();
            let reply = match v["execute"].as_str().unwrap() {
                "qmp_capabilities" | "cont" => json!({"return": {}, "id": id}),
                "stop" => {
                    let ev =
                        json!({"event": "STOP", "timestamp": {"seconds": 1, "microseconds": 2}});
                    w.write_all(format!("{ev}\n").as_bytes()).await.unwrap();
                    json!({"return": {}, "id": id})
                }
                "query-status" => {
                    json!({"return": {"status": "running", "running": true}, "id": id})
                }
                "query-migrate" => json!({"return": {
                    "status": "failed", "error-desc": "Unable to write to command",
                    "total-time": 7, "ram": {"transferred": 123}
                }, "id": id}),
                "quit" => return,
                "slow" => continue,
                other => {
                    json!({"error": {"class": "CommandNotFound", "desc": format!("The command {other} has not been found")}, "id": id})
                }
            };
            w.write_all(format!("{reply}\n").as_bytes()).await.unwrap();
        }
    }

    async fn setup() -> (tempfile::TempDir, QmpClient, tokio::task::JoinHandle<()>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let server = tokio::spawn(fake_qemu(listener));
        let client = QmpClient::connect(&path, Duration::from_secs(5))
            .await
            .unwrap();
        (dir, client, server)
    }

    #[tokio::test]
    async fn negotiates_and_executes() {
        let (_dir, qmp, _server) = setup().await;
        assert_eq!(
            qmp.version(),
            QemuVersion {
                major: 7,
                minor: 2,
                micro: 22
            }
        );
        assert_eq!(qmp.query_status().await.unwrap(), "running");
        let mut events = qmp.events();
        qmp.stop().await.unwrap();
        let ev = tokio::time::timeout(Duration::from_secs(5), events.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(ev.name, "STOP");
        qmp.cont().await.unwrap();
    }

    #[tokio::test]
    async fn migration_status_is_parsed() {
        let (_dir, qmp, _server) = setup().await;
        let s = qmp.query_migrate().await.unwrap();
        assert_eq!(
            s,
            MigrationStatus {
                status: "failed".into(),
                error: Some("Unable to write to command".into()),
                ram_transferred: Some(123),
                total_time_ms: Some(7),
            }
        );
        assert!(s.is_finished());
    }

    #[tokio::test]
    async fn command_errors_carry_class_and_command() {
        let (_dir, qmp, _server) = setup().await;
        let err = qmp.execute("bogus", None).await.unwrap_err();
        match err {
            QmpError::Command { command, class, .. } => {
                assert_eq!(command, "bogus");
                assert_eq!(class, "CommandNotFound");
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[tokio::test]
    async fn quit_tolerates_the_socket_closing_and_later_calls_fail_closed() {
        let (_dir, qmp, server) = setup().await;
        qmp.quit().await.unwrap();
        server.await.unwrap();
        let err = qmp.query_status().await.unwrap_err();
        assert!(matches!(err, QmpError::Closed), "{err:?}");
    }

    #[tokio::test]
    async fn unanswered_commands_time_out() {
        let (_dir, qmp, _server) = setup().await;
        let err = qmp
            .execute_timeout("slow", None, Duration::from_millis(50))
            .await
            .unwrap_err();
        assert!(matches!(err, QmpError::Timeout { .. }), "{err:?}");
        // The session still works afterwards.
        assert_eq!(qmp.query_status().await.unwrap(), "running");
    }

    #[tokio::test]
    async fn connect_gives_up_after_the_deadline() {
        let dir = tempfile::tempdir().unwrap();
        let err = QmpClient::connect(&dir.path().join("none.sock"), Duration::from_millis(50))
            .await
            .unwrap_err();
        assert!(matches!(err, QmpError::Connect { .. }), "{err:?}");
    }
}
