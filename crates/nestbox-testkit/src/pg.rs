//! A throwaway PostgreSQL cluster for tests.
//!
//! [`PgCluster::shared`] starts one server per test process, lazily, from the system's
//! binaries (`$NESTBOX_PG_BIN`, then `PATH`, then the newest `/usr/lib/postgresql/*/bin`), in a
//! temporary directory, on a free loopback port, with its Unix socket in that directory and
//! durability off (`fsync`, `synchronous_commit`, `full_page_writes`). Each test then takes
//! its own database with [`PgCluster::fresh_database`].
//!
//! `initdb` and `postgres` refuse to run as root: when the tests run as root, the server runs
//! as the `postgres` OS user and owns the temporary directory.
//!
//! `initdb` costs about a second, and `cargo nextest` runs every test in its own process, so
//! the first `initdb` on a machine is kept as a template in the system temp directory
//! (`nestbox-testkit-pgdata-<version>`) and later clusters start from a copy of it.
//!
//! # Shutdown without orphans
//!
//! A shared cluster lives in a `static`, and statics are never dropped. So every cluster has a
//! *supervisor*: a small `sh` process, in its own process group, whose stdin is a pipe that
//! only this process holds open. When this process ends — normally, by panic, or killed with
//! SIGKILL — the kernel closes the pipe, the supervisor reads end-of-file, stops the server
//! (fast shutdown, then SIGKILL after 5 s) and deletes the directory. A cluster that is
//! dropped (from [`PgCluster::start`]) stops its server itself and lets the supervisor clean
//! up the same way.

use std::fs;
use std::io::{self, Read, Seek, SeekFrom};
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use sqlx::Connection;
use tokio::sync::OnceCell;

/// Why a cluster could not be started or used.
#[derive(Debug, thiserror::Error)]
pub enum PgError {
    /// No `initdb`/`postgres` binaries were found.
    #[error(
        "PostgreSQL server binaries (initdb, postgres) not found in $NESTBOX_PG_BIN, PATH or \
         /usr/lib/postgresql/*/bin; install them with `apt-get install postgresql`"
    )]
    BinariesNotFound,
    /// Running as root, but there is no `postgres` user to run the server as.
    #[error("running as root and there is no `postgres` OS user to run the server as")]
    NoPostgresUser,
    /// A file system operation failed.
    #[error("{what} `{}`", path.display())]
    Io {
        /// What was being done, e.g. `creating directory`.
        what: &'static str,
        /// The path involved.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A helper program failed.
    #[error("`{program}` failed ({status}): {output}")]
    Command {
        /// The program run.
        program: String,
        /// Its exit status.
        status: String,
        /// The tail of its output.
        output: String,
    },
    /// The server exited or did not become ready in time.
    #[error("postgres did not start: {reason}; log tail:\n{log}")]
    Start {
        /// What went wrong.
        reason: String,
        /// The tail of the server log.
        log: String,
    },
    /// Talking to the running server failed.
    #[error("talking to the test cluster at {url}")]
    Sql {
        /// The URL connected to.
        url: String,
        /// The cause.
        #[source]
        source: sqlx::Error,
    },
}

/// A running PostgreSQL server owned by this test process.
#[derive(Debug)]
pub struct PgCluster {
    root: PathBuf,
    port: u16,
    version: String,
    postgres: Mutex<Child>,
    supervisor: Mutex<Option<(Child, ChildStdin)>>,
}

static SHARED: OnceCell<PgCluster> = OnceCell::const_new();

/// How long the server may take to accept connections.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// Attempts with a new port when another process took ours between probing and binding.
const PORT_ATTEMPTS: u32 = 5;

impl PgCluster {
    /// The cluster shared by every test in this process, started on first use.
    pub async fn shared() -> Result<&'static PgCluster, PgError> {
        SHARED.get_or_try_init(PgCluster::start).await
    }

    /// Starts a private cluster, stopped and deleted when dropped. Prefer [`Self::shared`].
    pub async fn start() -> Result<PgCluster, PgError> {
        match tokio::task::spawn_blocking(start_blocking).await {
            Ok(result) => result,
            Err(join) => Err(PgError::Start {
                reason: format!("start task failed: {join}"),
                log: String::new(),
            }),
        }
    }

    /// Creates an empty database with a unique name and returns its URL.
    pub async fn fresh_database(&self) -> Result<String, PgError> {
        let name = format!("t_{}", uuid::Uuid::new_v4().simple());
        let admin = self.url("postgres");
        let sql_err = |source| PgError::Sql {
            url: admin.clone(),
            source,
        };
        let mut conn = sqlx::PgConnection::connect(&admin).await.map_err(sql_err)?;
        sqlx::query(&format!("CREATE DATABASE \"{name}\""))
            .execute(&mut conn)
            .await
            .map_err(sql_err)?;
        conn.close().await.map_err(sql_err)?;
        Ok(self.url(&name))
    }

    /// The URL of database `db` on this cluster (user `postgres`, no password).
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// The TCP port the server listens on (127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The directory holding the server's Unix socket (`.s.PGSQL.<port>`).
    pub fn socket_dir(&self) -> PathBuf {
        self.root.join("sock")
    }

    /// The server's version, e.g. `15.14`.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// The process id of the postmaster.
    pub fn pid(&self) -> u32 {
        self.postgres
            .lock()
            .map(|c| c.id())
            .unwrap_or_else(|p| p.into_inner().id())
    }

    /// The temporary directory holding data, socket and log; deleted at shutdown.
    pub fn dir(&self) -> &Path {
        &self.root
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        // Fast shutdown, reaped here so the supervisor does not wait for a zombie.
        if let Ok(child) = self.postgres.get_mut() {
            stop_child(
                child,
                nix::sys::signal::Signal::SIGINT,
                Duration::from_secs(10),
            );
        }
        // Closing the pipe tells the supervisor to clean up; wait until the directory is gone.
        if let Ok(Some((mut supervisor, stdin))) = self.supervisor.get_mut().map(Option::take) {
            drop(stdin);
            wait_timeout(&mut supervisor, Duration::from_secs(15));
        }
    }
}

fn start_blocking() -> Result<PgCluster, PgError> {
    let bin = find_bin_dir().ok_or(PgError::BinariesNotFound)?;
    let owner = server_owner()?;
    let version = server_version(&bin)?;

    let root = tempfile::Builder::new()
        .prefix("nestbox-pg-")
        .tempdir()
        .map_err(|source| PgError::Io {
            what: "creating temp dir",
            path: std::env::temp_dir(),
            source,
        })?
        .keep();
    // From here on the supervisor owns the directory's removal.
    let (supervisor, supervisor_stdin) = spawn_supervisor(&root)?;
    let mut guard = StartGuard {
        root: root.clone(),
        supervisor: Some((supervisor, supervisor_stdin)),
    };

    let sock = root.join("sock");
    mkdir(&sock)?;
    chown_tree(&root, owner)?;
    let data = root.join("data");
    prepare_data_dir(&bin, &version, &root, &data, owner)?;

    let log_path = root.join("postgres.log");
    let mut last_error = None;
    for _ in 0..PORT_ATTEMPTS {
        let port = free_port().map_err(|source| PgError::Io {
            what: "probing a free port",
            path: PathBuf::from("127.0.0.1:0"),
            source,
        })?;
        let mut child = spawn_postgres(&bin, &root, &data, &sock, port, &log_path, owner)?;
        match wait_ready(&mut child, &data, &log_path) {
            Ok(()) => {
                // The supervisor needs to know which process to stop.
                let mut supervisor = guard.supervisor.take();
                if let Some((_, stdin)) = supervisor.as_mut() {
                    use std::io::Write;
                    let _ = writeln!(stdin, "{}", child.id()).and_then(|()| stdin.flush());
                }
                tracing::info!(port, %version, dir = %root.display(), "test postgres ready");
                return Ok(PgCluster {
                    root,
                    port,
                    version,
                    postgres: Mutex::new(child),
                    supervisor: Mutex::new(supervisor),
                });
            }
            Err(err) => {
                stop_child(
                    &mut child,
                    nix::sys::signal::Signal::SIGKILL,
                    Duration::from_secs(5),
                );
                let port_taken = matches!(&err, PgError::Start { log, .. }
                    if log.contains("could not bind") || log.contains("already in use"));
                if !port_taken {
                    return Err(err);
                }
                last_error = Some(err);
            }
        }
    }
    Err(last_error.unwrap_or(PgError::Start {
        reason: "no free port".into(),
        log: String::new(),
    }))
}

/// Until the cluster is handed out, a failed start must still clean up: dropping the guard
/// closes the supervisor's pipe, and the supervisor removes the directory.
struct StartGuard {
    root: PathBuf,
    supervisor: Option<(Child, ChildStdin)>,
}

impl Drop for StartGuard {
    fn drop(&mut self) {
        if let Some((mut child, stdin)) = self.supervisor.take() {
            drop(stdin);
            wait_timeout(&mut child, Duration::from_secs(15));
        } else {
            tracing::trace!(dir = %self.root.display(), "test postgres handed over");
        }
    }
}

/// The supervisor script. Its first stdin line is the postmaster's pid (sent once the server is
/// ready); end-of-file on stdin means "the test process is gone: stop the server, delete $1".
const SUPERVISOR: &str = r#"
dir=$1
pid=
read -r pid || true
cat > /dev/null
alive() {
    [ -n "$pid" ] && [ -r "/proc/$pid/status" ] && ! grep -q '^State:[[:space:]]*Z' "/proc/$pid/status" 2>/dev/null
}
if alive && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = postgres ]; then
    kill -INT "$pid" 2>/dev/null
    i=0
    while alive && [ "$i" -lt 100 ]; do sleep 0.05; i=$((i + 1)); done
    alive && kill -KILL "$pid" 2>/dev/null
fi
rm -rf "$dir"
"#;

fn spawn_supervisor(root: &Path) -> Result<(Child, ChildStdin), PgError> {
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(SUPERVISOR)
        .arg("nestbox-pg-supervisor")
        .arg(root)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        // Its own process group: a signal to the test's group (Ctrl-C, a runner's timeout
        // kill) must not take the supervisor down before it has cleaned up.
        .process_group(0)
        .spawn()
        .map_err(|source| PgError::Io {
            what: "spawning supervisor sh",
            path: root.to_owned(),
            source,
        })?;
    let Some(stdin) = child.stdin.take() else {
        let _ = child.kill();
        return Err(PgError::Start {
            reason: "supervisor has no stdin".into(),
            log: String::new(),
        });
    };
    Ok((child, stdin))
}

/// uid and gid the server runs as: `None` = as ourselves; `postgres` when we are root.
type Owner = Option<(nix::unistd::Uid, nix::unistd::Gid)>;

fn server_owner() -> Result<Owner, PgError> {
    if !nix::unistd::geteuid().is_root() {
        return Ok(None);
    }
    match nix::unistd::User::from_name("postgres") {
        Ok(Some(user)) => Ok(Some((user.uid, user.gid))),
        _ => Err(PgError::NoPostgresUser),
    }
}

fn find_bin_dir() -> Option<PathBuf> {
    let has_server = |dir: &Path| dir.join("initdb").is_file() && dir.join("postgres").is_file();
    if let Some(dir) = std::env::var_os("NESTBOX_PG_BIN").map(PathBuf::from) {
        return has_server(&dir).then_some(dir);
    }
    if let Some(path) = std::env::var_os("PATH")
        && let Some(dir) = std::env::split_paths(&path).find(|d| has_server(d))
    {
        return Some(dir);
    }
    let mut versions: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(Result::ok)
        .filter_map(|e| {
            let major = e.file_name().to_str()?.parse::<u32>().ok()?;
            Some((major, e.path().join("bin")))
        })
        .filter(|(_, dir)| has_server(dir))
        .collect();
    versions.sort();
    versions.pop().map(|(_, dir)| dir)
}

fn server_version(bin: &Path) -> Result<String, PgError> {
    let out = run(Command::new(bin.join("postgres")).arg("--version"), None)?;
    // "postgres (PostgreSQL) 15.14 (Debian 15.14-0+deb12u1)"
    Ok(out
        .split_whitespace()
        .nth(2)
        .filter(|v| v.chars().all(|c| c.is_ascii_alphanumeric() || c == '.'))
        .unwrap_or("unknown")
        .to_owned())
}

/// Fills `data` with a fresh cluster: a copy of the cached template when there is one, else
/// `initdb` (and the result becomes the template).
fn prepare_data_dir(
    bin: &Path,
    version: &str,
    root: &Path,
    data: &Path,
    owner: Owner,
) -> Result<(), PgError> {
    let user = if owner.is_some() { "root" } else { "user" };
    let template = std::env::temp_dir().join(format!("nestbox-testkit-pgdata-{version}-{user}"));
    if template.join("PG_VERSION").is_file()
        && run(Command::new("cp").arg("-a").arg(&template).arg(data), None).is_ok()
    {
        return Ok(());
    }
    let _ = fs::remove_dir_all(data);
    run(
        Command::new(bin.join("initdb"))
            .arg("-D")
            .arg(data)
            .args([
                "-U",
                "postgres",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            ])
            .current_dir(root),
        owner,
    )?;
    // Publish the template atomically: copy aside, then rename. Losing a race is fine.
    let staging = std::env::temp_dir().join(format!(
        "nestbox-testkit-pgdata-{version}-{user}.{}.tmp",
        std::process::id()
    ));
    if run(Command::new("cp").arg("-a").arg(data).arg(&staging), None).is_ok()
        && fs::rename(&staging, &template).is_err()
    {
        let _ = fs::remove_dir_all(&staging);
    }
    Ok(())
}

fn spawn_postgres(
    bin: &Path,
    root: &Path,
    data: &Path,
    sock: &Path,
    port: u16,
    log_path: &Path,
    owner: Owner,
) -> Result<Child, PgError> {
    fn io_err(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> PgError + use<> {
        let path = path.to_owned();
        move |source| PgError::Io { what, path, source }
    }
    let log = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log_path)
        .map_err(io_err("opening server log", log_path))?;
    let log2 = log
        .try_clone()
        .map_err(io_err("opening server log", log_path))?;
    if let Some((uid, gid)) = owner {
        nix::unistd::chown(log_path, Some(uid), Some(gid)).map_err(|e| PgError::Io {
            what: "chown",
            path: log_path.to_owned(),
            source: e.into(),
        })?;
    }
    let mut cmd = Command::new(bin.join("postgres"));
    cmd.arg("-D")
        .arg(data)
        .arg("-p")
        .arg(port.to_string())
        .arg("-k")
        .arg(sock)
        .args(["-c", "listen_addresses=127.0.0.1"])
        .args([
            "-c",
            "fsync=off",
            "-c",
            "synchronous_commit=off",
            "-c",
            "full_page_writes=off",
        ])
        .args(["-c", "max_connections=200", "-c", "shared_buffers=32MB"])
        .args([
            "-c",
            "logging_collector=off",
            "-c",
            "log_min_messages=warning",
        ])
        .current_dir(root)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log2)
        // Not in the test's process group: the supervisor decides when it stops.
        .process_group(0);
    if let Some((uid, gid)) = owner {
        cmd.uid(uid.as_raw()).gid(gid.as_raw());
    }
    cmd.spawn()
        .map_err(io_err("spawning postgres", &bin.join("postgres")))
}

/// Waits until the postmaster reports `ready` in `postmaster.pid` and accepts TCP connections.
fn wait_ready(child: &mut Child, data: &Path, log_path: &Path) -> Result<(), PgError> {
    let deadline = Instant::now() + START_TIMEOUT;
    let mut delay = Duration::from_millis(5);
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(PgError::Start {
                reason: format!("postgres exited ({status})"),
                log: tail(log_path),
            });
        }
        // Line 8 of postmaster.pid is the postmaster's status (PostgreSQL 10+).
        let ready = fs::read_to_string(data.join("postmaster.pid"))
            .map(|s| s.lines().nth(7).map(str::trim) == Some("ready"))
            .unwrap_or(false);
        if ready {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(PgError::Start {
                reason: format!("not ready within {START_TIMEOUT:?}"),
                log: tail(log_path),
            });
        }
        std::thread::sleep(delay);
        delay = (delay * 2).min(Duration::from_millis(100));
    }
}

fn free_port() -> io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn mkdir(path: &Path) -> Result<(), PgError> {
    fs::create_dir_all(path).map_err(|source| PgError::Io {
        what: "creating directory",
        path: path.to_owned(),
        source,
    })
}

fn chown_tree(root: &Path, owner: Owner) -> Result<(), PgError> {
    let Some((uid, gid)) = owner else {
        return Ok(());
    };
    for path in [root.to_owned(), root.join("sock")] {
        nix::unistd::chown(&path, Some(uid), Some(gid)).map_err(|e| PgError::Io {
            what: "chown",
            path: path.clone(),
            source: e.into(),
        })?;
    }
    Ok(())
}

/// Runs a helper to completion (as `owner` when given); returns its stdout.
fn run(cmd: &mut Command, owner: Owner) -> Result<String, PgError> {
    if let Some((uid, gid)) = owner {
        cmd.uid(uid.as_raw()).gid(gid.as_raw());
    }
    let program = cmd.get_program().to_string_lossy().into_owned();
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|source| PgError::Io {
            what: "running",
            path: PathBuf::from(&program),
            source,
        })?;
    if !out.status.success() {
        let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.push_str(&String::from_utf8_lossy(&out.stderr));
        return Err(PgError::Command {
            program,
            status: out.status.to_string(),
            output: last_chars(&text, 2000),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Signals `child`, waits up to `grace`, then kills and reaps it.
fn stop_child(child: &mut Child, signal: nix::sys::signal::Signal, grace: Duration) {
    if let Ok(Some(_)) = child.try_wait() {
        return;
    }
    if let Ok(pid) = i32::try_from(child.id()) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal);
    }
    if wait_timeout(child, grace).is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
}

fn wait_timeout(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            _ => return None,
        }
    }
}

fn tail(path: &Path) -> String {
    let mut bytes = Vec::new();
    if let Ok(mut file) = fs::File::open(path) {
        let len = file.metadata().map(|m| m.len()).unwrap_or(0);
        let _ = file.seek(SeekFrom::Start(len.saturating_sub(4000)));
        let _ = file.read_to_end(&mut bytes);
    }
    String::from_utf8_lossy(&bytes).into_owned()
}

fn last_chars(s: &str, n: usize) -> String {
    let count = s.chars().count();
    s.chars().skip(count.saturating_sub(n)).collect()
}
