//! Child processes: the one place Nestbox starts `qemu-img`, `nft`, `debootstrap`, QEMU…
//!
//! A [`Cmd`] records its argv so every error names the command that failed. Short-lived
//! tools run with [`Cmd::run`] (non-zero exit is an error carrying a stderr tail) or
//! [`Cmd::output`] (exit status returned). Long-lived processes start with [`Cmd::spawn`],
//! which returns a [`Supervised`] child that is killed and reaped when dropped.
//!
//! A command can be started inside a network namespace ([`Cmd::netns`]) and in a session of
//! its own ([`Cmd::new_session`]) so terminal signals aimed at the agent do not reach it.

use std::ffi::OsString;
use std::fmt;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use tokio::io::AsyncWriteExt;

/// How many bytes of stderr an error keeps.
const STDERR_TAIL: usize = 2048;

/// A failed child process operation.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    /// The program is not installed.
    #[error("`{program}` not found{}", hint_suffix(program))]
    NotFound {
        /// Program name as given.
        program: String,
    },
    /// The program exists but could not be started.
    #[error("could not start `{argv}`")]
    Spawn {
        /// The command line.
        argv: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The program ran and failed.
    #[error("`{argv}` failed ({status}): {stderr}")]
    Failed {
        /// The command line.
        argv: String,
        /// How it ended.
        status: Exit,
        /// The last bytes it wrote to stderr (or stdout when stderr was empty).
        stderr: String,
    },
    /// A control group to join could not be opened.
    #[error("cannot join cgroup {}", path.display())]
    Cgroup {
        /// Its `cgroup.procs` file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The program did not finish in time and was killed.
    #[error("`{argv}` did not finish within {after:?}")]
    Timeout {
        /// The command line.
        argv: String,
        /// The limit.
        after: Duration,
    },
    /// Reading from or writing to the program failed.
    #[error("i/o with `{argv}`")]
    Io {
        /// The command line.
        argv: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The jail to run in cannot be built.
    #[error(transparent)]
    Jail(#[from] crate::jail::JailError),
    /// The network namespace to run in could not be opened.
    #[error("cannot open network namespace {path}")]
    Netns {
        /// Its path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// The confined tools' seccomp filter, compiled once.
fn tool_filter() -> Result<&'static crate::seccomp::ToolFilter, &'static crate::seccomp::FilterError>
{
    static FILTER: std::sync::OnceLock<
        Result<crate::seccomp::ToolFilter, crate::seccomp::FilterError>,
    > = std::sync::OnceLock::new();
    FILTER
        .get_or_init(crate::seccomp::ToolFilter::build)
        .as_ref()
}

/// The Debian package that provides a tool, for "not found" errors.
pub fn package_hint(program: &str) -> Option<&'static str> {
    let name = Path::new(program).file_name()?.to_str()?;
    Some(match name {
        "qemu-system-x86_64" => "qemu-system-x86",
        "qemu-img" | "qemu-nbd" => "qemu-utils",
        "nft" => "nftables",
        "ip" => "iproute2",
        "debootstrap" => "debootstrap",
        "mkfs.ext4" | "resize2fs" | "e2fsck" | "debugfs" | "tune2fs" | "dumpe2fs" => "e2fsprogs",
        "lz4" => "lz4",
        "cpio" => "cpio",
        "dpkg-deb" => "dpkg",
        "apt-get" | "apt-cache" => "apt",
        "initdb" | "pg_ctl" | "postgres" => "postgresql",
        _ => return None,
    })
}

fn hint_suffix(program: &str) -> String {
    match package_hint(program) {
        Some(pkg) => format!("; install it with `apt-get install {pkg}`"),
        None => "; install it or check PATH".to_string(),
    }
}

/// Keeps the last [`STDERR_TAIL`] bytes of `bytes` as lossy text, trimmed.
pub fn tail(bytes: &[u8]) -> String {
    let start = bytes.len().saturating_sub(STDERR_TAIL);
    String::from_utf8_lossy(&bytes[start..]).trim().to_string()
}

/// Collected result of a finished command.
#[derive(Debug, Clone)]
pub struct Output {
    /// Exit status.
    pub status: ExitStatus,
    /// Everything written to stdout.
    pub stdout: Vec<u8>,
    /// Everything written to stderr.
    pub stderr: Vec<u8>,
}

impl Output {
    /// Stdout as trimmed lossy text.
    pub fn stdout_text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).trim().to_string()
    }
}

/// A command to run. Built like [`std::process::Command`], but every failure names it.
#[derive(Debug, Clone)]
pub struct Cmd {
    program: OsString,
    args: Vec<OsString>,
    envs: Vec<(OsString, OsString)>,
    cwd: Option<PathBuf>,
    stdin: Option<Vec<u8>>,
    timeout: Option<Duration>,
    netns: Option<PathBuf>,
    new_session: bool,
    inherit_output: bool,
    cgroups: Vec<PathBuf>,
    confined: Option<Confined>,
    jail: Option<crate::jail::Jail>,
    pass: Vec<(std::sync::Arc<OwnedFd>, i32)>,
    tap: Option<(String, i32)>,
}

impl Cmd {
    /// A command running `program`.
    pub fn new(program: impl Into<OsString>) -> Self {
        Self {
            program: program.into(),
            args: Vec::new(),
            envs: Vec::new(),
            cwd: None,
            stdin: None,
            timeout: None,
            netns: None,
            new_session: false,
            inherit_output: false,
            cgroups: Vec::new(),
            confined: None,
            jail: None,
            pass: Vec::new(),
            tap: None,
        }
    }

    /// Appends one argument.
    pub fn arg(mut self, arg: impl Into<OsString>) -> Self {
        self.args.push(arg.into());
        self
    }

    /// Appends arguments.
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// Sets an environment variable.
    pub fn env(mut self, key: impl Into<OsString>, value: impl Into<OsString>) -> Self {
        self.envs.push((key.into(), value.into()));
        self
    }

    /// Sets the working directory.
    pub fn current_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.cwd = Some(dir.into());
        self
    }

    /// Bytes written to stdin, which is then closed.
    pub fn stdin(mut self, bytes: impl Into<Vec<u8>>) -> Self {
        self.stdin = Some(bytes.into());
        self
    }

    /// Kills the command if it runs longer than `limit` ([`Cmd::run`] and [`Cmd::output`]).
    pub fn timeout(mut self, limit: Duration) -> Self {
        self.timeout = Some(limit);
        self
    }

    /// Runs the command inside the network namespace at `path` (e.g. `/run/netns/x`).
    pub fn netns(mut self, path: impl Into<PathBuf>) -> Self {
        self.netns = Some(path.into());
        self
    }

    /// Runs the command confined (see [`Confined`]): as `uid`:`gid` with no supplementary
    /// groups, no capabilities and no way to gain privileges, in new network, IPC, UTS and
    /// mount namespaces (no network but loopback; empty private `/tmp`, `/var/tmp` and
    /// `/dev/shm`). `file`, opened by the caller, is its descriptor 3: the only file of
    /// the caller's it can reach (name it `/proc/self/fd/3`).
    pub fn confined(mut self, uid: u32, gid: u32, file: Option<OwnedFd>) -> Self {
        self.confined = Some(Confined {
            uid,
            gid,
            file: file.map(std::sync::Arc::new),
        });
        self
    }

    /// Runs the command in `jail` (see [`crate::jail`]): its own mount namespace holding
    /// only the jail's files, as the jail's unprivileged user.
    pub fn jail(mut self, jail: crate::jail::Jail) -> Self {
        self.jail = Some(jail);
        self
    }

    /// Hands the command `fd` as its descriptor `target` (3..64).
    pub fn pass_fd(mut self, fd: OwnedFd, target: i32) -> Self {
        self.pass.push((std::sync::Arc::new(fd), target));
        self
    }

    /// Opens the TAP device `ifname` of the command's network namespace ([`Cmd::netns`])
    /// for it, as its descriptor `target` (3..64): the command needs no privilege to use
    /// it.
    pub fn open_tap(mut self, ifname: impl Into<String>, target: i32) -> Self {
        self.tap = Some((ifname.into(), target));
        self
    }

    /// Has the command join the control groups whose `cgroup.procs` files are given
    /// before it runs anything (see [`crate::cgroup`]).
    pub fn join_cgroups(mut self, procs: Vec<PathBuf>) -> Self {
        self.cgroups = procs;
        self
    }

    /// Starts the command in a new session (its own process group, no controlling tty).
    pub fn new_session(mut self) -> Self {
        self.new_session = true;
        self
    }

    /// Lets the command write to the agent's own stdout/stderr (for progress output of
    /// long tools); errors then carry no stderr tail.
    pub fn inherit_output(mut self) -> Self {
        self.inherit_output = true;
        self
    }

    /// The command line, for logs and errors.
    pub fn argv(&self) -> String {
        let mut s = self.program.to_string_lossy().into_owned();
        for a in &self.args {
            s.push(' ');
            let a = a.to_string_lossy();
            if a.is_empty() || a.contains(char::is_whitespace) {
                s.push_str(&format!("{a:?}"));
            } else {
                s.push_str(&a);
            }
        }
        s
    }

    /// Builds the tokio command. The returned fd (the network namespace, if any) must stay
    /// open until the command has been spawned.
    fn command(&self) -> Result<(tokio::process::Command, Vec<OwnedFd>), ProcessError> {
        let mut cmd = tokio::process::Command::new(&self.program);
        cmd.args(&self.args).kill_on_drop(true);
        for (k, v) in &self.envs {
            cmd.env(k, v);
        }
        if let Some(dir) = &self.cwd {
            cmd.current_dir(dir);
        }
        let netns: Option<OwnedFd> =
            match &self.netns {
                Some(path) => Some(std::fs::File::open(path).map(OwnedFd::from).map_err(
                    |source| ProcessError::Netns {
                        path: path.clone(),
                        source,
                    },
                )?),
                None => None,
            };
        let mut procs: Vec<OwnedFd> = Vec::new();
        for path in &self.cgroups {
            let file = std::fs::OpenOptions::new()
                .write(true)
                .open(path)
                .map_err(|source| ProcessError::Cgroup {
                    path: path.clone(),
                    source,
                })?;
            procs.push(OwnedFd::from(file));
        }
        let new_session = self.new_session;
        if netns.is_some() || new_session || !procs.is_empty() {
            let fd = netns.as_ref().map(|f| f.as_raw_fd());
            // Fixed-size, allocated before the fork: the child may not allocate.
            let mut joins = [-1i32; 8];
            for (slot, f) in joins.iter_mut().zip(&procs) {
                *slot = f.as_raw_fd();
            }
            if procs.len() > joins.len() {
                return Err(ProcessError::Cgroup {
                    path: self.cgroups[joins.len()].clone(),
                    source: std::io::Error::other("more than 8 hierarchies"),
                });
            }
            // SAFETY: the closure runs in the forked child before exec and only makes
            // async-signal-safe system calls (write, setns, setsid) on descriptors that stay
            // open in the parent until spawn returns (the caller holds the returned fds).
            unsafe {
                cmd.pre_exec(move || {
                    for fd in joins.iter().copied().filter(|fd| *fd >= 0) {
                        // `0`: the writing process joins the group.
                        if libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                            return Err(std::io::Error::last_os_error());
                        }
                    }
                    if let Some(fd) = fd
                        && libc::setns(fd, libc::CLONE_NEWNET) != 0
                    {
                        return Err(std::io::Error::last_os_error());
                    }
                    if new_session && libc::setsid() < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let mut held: Vec<OwnedFd> = netns.into_iter().collect();
        held.extend(procs);
        if !self.pass.is_empty() || self.tap.is_some() || self.jail.is_some() {
            self.handover(&mut cmd, &mut held)?;
        }
        if let Some(c) = &self.confined {
            let file = match &c.file {
                Some(f) => Some(f.try_clone().map_err(|source| ProcessError::Spawn {
                    argv: self.argv(),
                    source,
                })?),
                None => None,
            };
            let raw = file.as_ref().map(|f| f.as_raw_fd());
            held.extend(file);
            let (uid, gid) = (c.uid, c.gid);
            // Built before the fork: the child may not allocate.
            let scratch: Vec<std::ffi::CString> = ["/tmp", "/var/tmp", "/dev/shm"]
                .iter()
                .filter(|p| Path::new(p).is_dir())
                .filter_map(|p| std::ffi::CString::new(*p).ok())
                .collect();
            let tmpfs = c"tmpfs";
            let options = c"size=1m,mode=1777";
            let root = c"/";
            let filter = tool_filter().map_err(|e| ProcessError::Spawn {
                argv: self.argv(),
                source: std::io::Error::other(e.to_string()),
            })?;
            // SAFETY: the closure runs in the forked child before exec and only makes
            // async-signal-safe system calls (unshare, mount, dup2, setgroups, setresgid,
            // setresuid, prctl, seccomp) on strings, descriptors and a filter made before
            // the fork.
            unsafe {
                cmd.pre_exec(move || {
                    let check = |r: libc::c_int| {
                        if r < 0 {
                            Err(std::io::Error::last_os_error())
                        } else {
                            Ok(())
                        }
                    };
                    check(libc::unshare(
                        libc::CLONE_NEWNET
                            | libc::CLONE_NEWIPC
                            | libc::CLONE_NEWUTS
                            | libc::CLONE_NEWNS,
                    ))?;
                    check(libc::mount(
                        std::ptr::null(),
                        root.as_ptr(),
                        std::ptr::null(),
                        libc::MS_REC | libc::MS_PRIVATE,
                        std::ptr::null(),
                    ))?;
                    for dir in &scratch {
                        check(libc::mount(
                            tmpfs.as_ptr(),
                            dir.as_ptr(),
                            tmpfs.as_ptr(),
                            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                            options.as_ptr().cast(),
                        ))?;
                    }
                    if let Some(fd) = raw {
                        check(libc::dup2(fd, 3))?;
                    }
                    check(libc::setgroups(0, std::ptr::null()))?;
                    check(libc::setresgid(gid, gid, gid))?;
                    check(libc::setresuid(uid, uid, uid))?;
                    check(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0))?;
                    filter.install()?;
                    Ok(())
                });
            }
        }
        Ok((cmd, held))
    }

    /// Registers the child's descriptor hand-over (passed descriptors, the TAP device) and
    /// its jail. Runs after the namespace and control-group steps, so the TAP device is
    /// the namespace's.
    fn handover(
        &self,
        cmd: &mut tokio::process::Command,
        held: &mut Vec<OwnedFd>,
    ) -> Result<(), ProcessError> {
        /// Descriptors are parked at or above this number before they move to their
        /// targets, so no source is overwritten by another's target.
        const PARK: i32 = 64;
        let bad_target = |target: i32| ProcessError::Spawn {
            argv: self.argv(),
            source: std::io::Error::other(format!("descriptor target {target} is not in 3..64")),
        };
        // Fixed-size, built before the fork: the child may not allocate.
        let mut moves = [(-1i32, -1i32); 8];
        if self.pass.len() > moves.len() {
            return Err(ProcessError::Spawn {
                argv: self.argv(),
                source: std::io::Error::other("more than 8 descriptors to pass"),
            });
        }
        for (slot, (fd, target)) in moves.iter_mut().zip(&self.pass) {
            if !(3..PARK).contains(target) {
                return Err(bad_target(*target));
            }
            let fd = fd.try_clone().map_err(|source| ProcessError::Spawn {
                argv: self.argv(),
                source,
            })?;
            *slot = (fd.as_raw_fd(), *target);
            held.push(fd);
        }
        let tap = match &self.tap {
            Some((name, target)) => {
                if !(3..PARK).contains(target) {
                    return Err(bad_target(*target));
                }
                let ifr = crate::jail::tap_request(name).ok_or_else(|| ProcessError::Spawn {
                    argv: self.argv(),
                    source: std::io::Error::other(format!("bad TAP device name {name:?}")),
                })?;
                Some((ifr, *target))
            }
            None => None,
        };
        let jail = self.jail.as_ref().map(|j| j.prepare()).transpose()?;
        // SAFETY: the closure runs in the forked child before exec and only makes
        // async-signal-safe system calls (open, ioctl, fcntl, dup2, close and the jail's
        // mount and credential calls) on buffers built before the fork and descriptors the
        // parent keeps open until spawn returns.
        unsafe {
            cmd.pre_exec(move || {
                let mut parked = [-1i32; 9];
                for (i, (fd, _)) in moves.iter().enumerate().filter(|(_, m)| m.0 >= 0) {
                    let p = libc::fcntl(*fd, libc::F_DUPFD_CLOEXEC, PARK);
                    if p < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    parked[i] = p;
                }
                if let Some((ifr, _)) = &tap {
                    let fd = crate::jail::open_tap(ifr)?;
                    let p = libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, PARK);
                    libc::close(fd);
                    if p < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    parked[8] = p;
                }
                let targets = moves
                    .iter()
                    .map(|m| m.1)
                    .chain(std::iter::once(tap.as_ref().map_or(-1, |t| t.1)));
                for (p, target) in parked.iter().copied().zip(targets) {
                    // dup2 leaves the target without close-on-exec: it survives exec.
                    if p >= 0 && libc::dup2(p, target) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                if let Some(j) = &jail {
                    j.enter()?;
                }
                Ok(())
            });
        }
        Ok(())
    }

    fn spawn_error(&self, source: std::io::Error) -> ProcessError {
        if source.kind() == std::io::ErrorKind::NotFound {
            ProcessError::NotFound {
                program: self.program.to_string_lossy().into_owned(),
            }
        } else {
            ProcessError::Spawn {
                argv: self.argv(),
                source,
            }
        }
    }

    /// Runs to completion and returns the output whatever the exit status.
    pub async fn output(&self) -> Result<Output, ProcessError> {
        let (mut cmd, _netns) = self.command()?;
        cmd.stdin(if self.stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        });
        if self.inherit_output {
            cmd.stdout(Stdio::inherit()).stderr(Stdio::inherit());
        } else {
            cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        }
        tracing::debug!(argv = %self.argv(), "running");
        let mut child = cmd.spawn().map_err(|e| self.spawn_error(e))?;
        // Stdin is written while the output is collected: a tool that writes a lot before
        // it has read all its input must not deadlock.
        let feeder = match (&self.stdin, child.stdin.take()) {
            (Some(input), Some(mut stdin)) => {
                let input = input.clone();
                Some(tokio::spawn(async move {
                    let r = stdin.write_all(&input).await;
                    drop(stdin);
                    r
                }))
            }
            _ => None,
        };
        let wait = child.wait_with_output();
        let out = match self.timeout {
            Some(limit) => {
                tokio::time::timeout(limit, wait)
                    .await
                    .map_err(|_| ProcessError::Timeout {
                        argv: self.argv(),
                        after: limit,
                    })?
            }
            None => wait.await,
        }
        .map_err(|source| ProcessError::Io {
            argv: self.argv(),
            source,
        })?;
        if let Some(feeder) = feeder {
            match feeder.await {
                Ok(Ok(())) => {}
                // The tool may legitimately exit without reading all of its input.
                Ok(Err(e)) if e.kind() == std::io::ErrorKind::BrokenPipe => {}
                Ok(Err(source)) => {
                    return Err(ProcessError::Io {
                        argv: self.argv(),
                        source,
                    });
                }
                Err(e) => {
                    return Err(ProcessError::Io {
                        argv: self.argv(),
                        source: std::io::Error::other(e),
                    });
                }
            }
        }
        Ok(Output {
            status: out.status,
            stdout: out.stdout,
            stderr: out.stderr,
        })
    }

    /// Runs to completion; a non-zero exit is [`ProcessError::Failed`].
    pub async fn run(&self) -> Result<Output, ProcessError> {
        let out = self.output().await?;
        if out.status.success() {
            Ok(out)
        } else {
            let stderr = if out.stderr.is_empty() {
                tail(&out.stdout)
            } else {
                tail(&out.stderr)
            };
            Err(ProcessError::Failed {
                argv: self.argv(),
                status: Exit::Status(out.status),
                stderr,
            })
        }
    }

    /// Starts a long-lived process. Its stdout and stderr go to `log` when given (appended),
    /// otherwise to /dev/null.
    pub fn spawn(&self, log: Option<&Path>) -> Result<Supervised, ProcessError> {
        let (mut cmd, _netns) = self.command()?;
        cmd.stdin(Stdio::null());
        match log {
            Some(path) => {
                let file = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(|source| ProcessError::Io {
                        argv: self.argv(),
                        source,
                    })?;
                let err = file.try_clone().map_err(|source| ProcessError::Io {
                    argv: self.argv(),
                    source,
                })?;
                cmd.stdout(file).stderr(err);
            }
            None => {
                cmd.stdout(Stdio::null()).stderr(Stdio::null());
            }
        }
        tracing::debug!(argv = %self.argv(), "spawning");
        let child = cmd.spawn().map_err(|e| self.spawn_error(e))?;
        let pid = child.id().unwrap_or(0);
        Ok(Supervised {
            argv: self.argv(),
            pid,
            proc: Proc::Child(child),
        })
    }
}

impl fmt::Display for Cmd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.argv())
    }
}

/// How a confined command runs (see [`Cmd::confined`]).
#[derive(Debug, Clone)]
struct Confined {
    uid: u32,
    gid: u32,
    file: Option<std::sync::Arc<OwnedFd>>,
}

/// How a supervised process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// Its exit status (a process this one started and reaped).
    Status(ExitStatus),
    /// It ended, but its status went to whoever reaped it: a process adopted after a
    /// restart ([`Supervised::adopt`]) is not our child.
    Unknown,
}

impl Exit {
    /// The exit code, if it exited normally and we know it.
    pub fn code(&self) -> Option<i32> {
        match self {
            Exit::Status(s) => s.code(),
            Exit::Unknown => None,
        }
    }

    /// Whether it is known to have exited with status 0.
    pub fn success(&self) -> bool {
        matches!(self, Exit::Status(s) if s.success())
    }
}

impl fmt::Display for Exit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Exit::Status(s) => s.fmt(f),
            Exit::Unknown => f.write_str("ended (status unknown: adopted process)"),
        }
    }
}

/// The start time of process `pid` (clock ticks after boot, `/proc/<pid>/stat` field 22):
/// with the pid, it names one process for the life of the machine.
pub fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: fields after it are
    // counted from its last `)`.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// A pidfd (`pidfd_open(2)`) for `pid`.
fn pidfd_open(pid: u32) -> std::io::Result<OwnedFd> {
    let raw = i32::try_from(pid).map_err(|_| std::io::Error::from_raw_os_error(libc::ESRCH))?;
    // SAFETY: pidfd_open takes a pid and flags and returns a new file descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, raw, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let fd = i32::try_from(fd).map_err(|_| std::io::Error::from_raw_os_error(libc::EBADF))?;
    // SAFETY: the kernel just returned this descriptor to us; nothing else owns it.
    Ok(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) })
}

/// Whether the process behind a pidfd has ended (the pidfd polls readable).
fn pidfd_ended(fd: &OwnedFd) -> bool {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, zero timeout.
    let n = unsafe { libc::poll(&mut pfd, 1, 0) };
    n > 0 && pfd.revents != 0
}

/// The process a [`Supervised`] holds.
#[derive(Debug)]
enum Proc {
    /// Started by this process.
    Child(tokio::process::Child),
    /// Found running after a restart: reached through a pidfd, so a recycled pid is
    /// never signalled.
    Adopted(tokio::io::unix::AsyncFd<OwnedFd>),
}

/// A long-lived process: a child this process started (killed and, in the background,
/// reaped when dropped) or one adopted after a restart ([`Supervised::adopt`], signalled
/// through a pidfd and killed when dropped).
#[derive(Debug)]
pub struct Supervised {
    argv: String,
    pid: u32,
    proc: Proc,
}

impl Drop for Supervised {
    fn drop(&mut self) {
        if let Proc::Adopted(fd) = &self.proc
            && !pidfd_ended(fd.get_ref())
        {
            self.signal(libc::SIGKILL);
        }
    }
}

impl Supervised {
    /// Takes over a running process that an earlier instance of this program started
    /// (after a crash or an upgrade restart), if it is still the process started at
    /// `start_time` (see [`start_time`]); `argv` describes it in errors. The process keeps
    /// running; dropping the handle kills it, as for a child.
    pub fn adopt(pid: u32, start_time: u64, argv: &str) -> Result<Self, ProcessError> {
        let io = |source| ProcessError::Io {
            argv: argv.to_string(),
            source,
        };
        // The pidfd first: if the start time matches afterwards, the pidfd names that
        // process (a pid recycled in between would show another start time).
        let fd = pidfd_open(pid).map_err(io)?;
        if self::start_time(pid) != Some(start_time) || pidfd_ended(&fd) {
            return Err(io(std::io::Error::from_raw_os_error(libc::ESRCH)));
        }
        // SAFETY: the pidfd is an `OwnedFd` this handle owns; it is never replaced or closed
        // while registered.
        let fd = unsafe { tokio::io::unix::AsyncFd::register(fd) }
            .map_err(|e| io(std::io::Error::from(e)))?;
        Ok(Self {
            argv: argv.to_string(),
            pid,
            proc: Proc::Adopted(fd),
        })
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The command line it was started with.
    pub fn argv(&self) -> &str {
        &self.argv
    }

    /// How it ended if it has, without waiting.
    pub fn try_status(&mut self) -> Option<Exit> {
        match &mut self.proc {
            Proc::Child(c) => c.try_wait().ok().flatten().map(Exit::Status),
            Proc::Adopted(fd) => pidfd_ended(fd.get_ref()).then_some(Exit::Unknown),
        }
    }

    /// Waits for the process to end.
    pub async fn wait(&mut self) -> Result<Exit, ProcessError> {
        let result = match &mut self.proc {
            Proc::Child(c) => c.wait().await.map(Exit::Status),
            Proc::Adopted(fd) => fd.readable().await.map(|mut guard| {
                guard.retain_ready();
                Exit::Unknown
            }),
        };
        result.map_err(|source| ProcessError::Io {
            argv: self.argv.clone(),
            source,
        })
    }

    /// Signals the process, and its whole process group when it leads one (started with
    /// [`Cmd::new_session`]), so helpers it started do not outlive it.
    fn signal(&self, sig: i32) {
        let Ok(pid) = i32::try_from(self.pid) else {
            return;
        };
        if let Proc::Adopted(fd) = &self.proc {
            // SAFETY: pidfd_send_signal on our pidfd: it reaches that process or none.
            unsafe {
                libc::syscall(
                    libc::SYS_pidfd_send_signal,
                    fd.get_ref().as_raw_fd(),
                    sig,
                    std::ptr::null::<libc::siginfo_t>(),
                    0,
                );
            }
            if pidfd_ended(fd.get_ref()) {
                return;
            }
        }
        // SAFETY: plain kill(2) calls on a process that has not ended (a child we have not
        // reaped, or an adopted one whose pidfd says it is alive), so the pid and, if it
        // leads one, the process group are ours.
        unsafe {
            if libc::getpgid(pid) == pid {
                libc::kill(-pid, sig);
            } else {
                libc::kill(pid, sig);
            }
        }
    }

    /// Sends SIGTERM, waits up to `grace`, then SIGKILL; returns once it has ended.
    pub async fn terminate(&mut self, grace: Duration) -> Result<Exit, ProcessError> {
        if let Some(status) = self.try_status() {
            return Ok(status);
        }
        self.signal(libc::SIGTERM);
        match tokio::time::timeout(grace, self.wait()).await {
            Ok(res) => res,
            Err(_) => self.kill().await,
        }
    }

    /// Sends SIGKILL and returns once it has ended.
    pub async fn kill(&mut self) -> Result<Exit, ProcessError> {
        if self.try_status().is_none() {
            self.signal(libc::SIGKILL);
        }
        if let Proc::Child(c) = &mut self.proc {
            let _ = c.start_kill();
        }
        self.wait().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn run_collects_output() {
        let out = Cmd::new("sh")
            .args(["-c", "echo hi; echo err >&2"])
            .run()
            .await
            .unwrap();
        assert_eq!(out.stdout_text(), "hi");
        assert_eq!(tail(&out.stderr), "err");
    }

    #[tokio::test]
    async fn failure_names_command_and_stderr() {
        let err = Cmd::new("sh")
            .args(["-c", "echo boom >&2; exit 3"])
            .run()
            .await
            .unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("sh -c"), "{msg}");
        assert!(msg.contains("boom"), "{msg}");
        assert!(matches!(err, ProcessError::Failed { .. }));
    }

    #[tokio::test]
    async fn missing_tool_names_package() {
        let err = Cmd::new("qemu-img-definitely-missing")
            .run()
            .await
            .unwrap_err();
        assert!(matches!(err, ProcessError::NotFound { .. }));
        let err = ProcessError::NotFound {
            program: "nft".into(),
        };
        assert!(err.to_string().contains("apt-get install nftables"));
    }

    #[tokio::test]
    async fn timeout_kills() {
        let err = Cmd::new("sleep")
            .arg("10")
            .timeout(Duration::from_millis(100))
            .run()
            .await;
        assert!(matches!(err, Err(ProcessError::Timeout { .. })));
    }

    #[tokio::test]
    async fn large_stdin_with_large_output_does_not_deadlock() {
        let input = vec![b'x'; 8 << 20];
        let out = Cmd::new("cat")
            .stdin(input.clone())
            .timeout(Duration::from_secs(30))
            .run()
            .await
            .unwrap();
        assert_eq!(out.stdout.len(), input.len());
    }

    #[tokio::test]
    async fn stdin_is_fed() {
        let out = Cmd::new("cat").stdin(b"abc".to_vec()).run().await.unwrap();
        assert_eq!(out.stdout, b"abc");
    }

    #[tokio::test]
    async fn supervised_terminate() {
        let mut child = Cmd::new("sleep")
            .arg("30")
            .new_session()
            .spawn(None)
            .unwrap();
        assert!(child.pid() > 0);
        let status = child.terminate(Duration::from_secs(5)).await.unwrap();
        assert!(!status.success());
    }

    #[tokio::test]
    async fn confined_commands_have_no_privileges_network_or_scratch_of_ours() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("image");
        std::fs::write(&file, b"data").unwrap();
        let fd = OwnedFd::from(std::fs::File::open(&file).unwrap());
        std::fs::write("/dev/shm/nbx-confine-probe", b"host").unwrap();
        let out = Cmd::new("sh")
            .args([
                "-c",
                "id -u; id -G; cat /proc/self/fd/3; echo; grep -c : /proc/net/dev; \
                 ls /dev/shm | wc -l; grep CapEff /proc/self/status; grep NoNewPrivs /proc/self/status; \
                 cat /proc/1/root/etc/hostname 2>/dev/null || echo denied; \
                 grep Seccomp: /proc/self/status; \
                 python3 -c 'import socket; socket.socket()' 2>&1 | tail -1; \
                 unshare -U true 2>&1 | tail -1",
            ])
            .confined(65534, 65534, Some(fd))
            .run()
            .await
            .unwrap();
        let _ = std::fs::remove_file("/dev/shm/nbx-confine-probe");
        let text = out.stdout_text();
        let lines: Vec<&str> = text.lines().map(str::trim).collect();
        assert_eq!(lines[0], "65534", "{text}");
        assert_eq!(lines[1], "65534", "no supplementary groups: {text}");
        assert_eq!(lines[2], "data", "the file handed in: {text}");
        assert_eq!(lines[3], "1", "only loopback: {text}");
        assert_eq!(lines[4], "0", "an empty /dev/shm: {text}");
        assert!(
            lines[5].ends_with("0000000000000000"),
            "no capabilities: {text}"
        );
        assert!(lines[6].ends_with('1'), "no new privileges: {text}");
        assert_eq!(lines[7], "denied", "{text}");
        // Under its seccomp filter: no socket, no namespace of its own.
        assert!(lines[8].ends_with('2'), "seccomp filter mode: {text}");
        assert!(
            lines[9].contains("PermissionError") && lines[9].contains("Errno 1"),
            "a socket was made: {text}"
        );
        assert!(lines[10].contains("Operation not permitted"), "{text}");
    }

    #[tokio::test]
    async fn adopted_processes_are_checked_signalled_and_waited_for() {
        let mut child = Cmd::new("sleep")
            .arg("30")
            .new_session()
            .spawn(None)
            .unwrap();
        let pid = child.pid();
        let started = start_time(pid).unwrap();
        // Another start time is another process: refused.
        assert!(Supervised::adopt(pid, started + 1, "sleep 30").is_err());
        let mut adopted = Supervised::adopt(pid, started, "sleep 30").unwrap();
        assert!(adopted.try_status().is_none());
        assert_eq!(adopted.kill().await.unwrap(), Exit::Unknown);
        // The real parent still gets the status.
        assert!(!child.wait().await.unwrap().success());
        assert!(Supervised::adopt(pid, started, "sleep 30").is_err());
    }
}
