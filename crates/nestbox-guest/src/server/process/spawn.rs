//! Starting a process: its command, environment, working directory, user, process group
//! and I/O (pipes, or a pseudo-terminal).
//!
//! Every process leads its own process group (pipes: `setpgid`; PTY: `setsid`, which also
//! makes the terminal its controlling one), so signals reach its whole tree. Switching user
//! happens in the child between `fork` and `exec`: supplementary groups, then the group, then
//! the user — only with async-signal-safe calls on data prepared before the fork.

use std::ffi::OsString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::process::Stdio;

use tokio::io::unix::AsyncFd;
use tokio::process::{Child, ChildStderr, ChildStdin, ChildStdout, Command};

use crate::server::users::User;

/// Size of one output read, and so the largest data event.
pub const READ_CHUNK: usize = 32 * 1024;

/// The `PATH` processes start with unless the environment sets one.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// A terminal size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TermSize {
    /// Columns.
    pub cols: u16,
    /// Rows.
    pub rows: u16,
}

impl TermSize {
    fn winsize(self) -> libc::winsize {
        libc::winsize {
            ws_row: self.rows,
            ws_col: self.cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        }
    }
}

/// Everything needed to start one process.
#[derive(Debug, Clone)]
pub struct SpawnSpec {
    /// Program, looked up in the new environment's `PATH` when it has no slash.
    pub cmd: String,
    /// Arguments.
    pub args: Vec<String>,
    /// The complete environment.
    pub env: Vec<(String, String)>,
    /// Working directory (exists).
    pub cwd: PathBuf,
    /// The user to run as.
    pub user: User,
    /// Whether to switch to `user` (the server runs as root and `user` is another one).
    pub switch_user: bool,
    /// Run on a new pseudo-terminal of this size.
    pub pty: Option<TermSize>,
    /// Keep stdin open for input (pipes only; a PTY always takes input).
    pub stdin: bool,
}

/// The master side of a pseudo-terminal, non-blocking.
#[derive(Debug)]
pub struct PtyMaster {
    fd: AsyncFd<OwnedFd>,
}

impl PtyMaster {
    fn new(fd: OwnedFd) -> io::Result<Self> {
        let flags = nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_GETFL)?;
        let flags = nix::fcntl::OFlag::from_bits_retain(flags) | nix::fcntl::OFlag::O_NONBLOCK;
        nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_SETFL(flags))?;
        // SAFETY: `fd` is an open descriptor owned by the `AsyncFd` from here on; an
        // `OwnedFd` always reports the same descriptor and closes it only on drop.
        let fd = unsafe { AsyncFd::register(fd) }.map_err(|e| e.into_parts().1)?;
        Ok(Self { fd })
    }

    /// Reads output; `Ok(0)` once the terminal is gone (`EIO` after the last slave closes).
    pub async fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let mut guard = self.fd.readable().await?;
            match guard.try_io(|fd| nix::unistd::read(fd.get_ref(), buf).map_err(io::Error::from)) {
                Ok(Ok(n)) => return Ok(n),
                Ok(Err(e)) if e.raw_os_error() == Some(libc::EIO) => return Ok(0),
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            }
        }
    }

    /// Writes all of `data` to the terminal's input.
    pub async fn write_all(&self, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            let mut guard = self.fd.writable().await?;
            match guard.try_io(|fd| nix::unistd::write(fd.get_ref(), data).map_err(io::Error::from))
            {
                Ok(Ok(n)) => data = &data[n..],
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            }
        }
        Ok(())
    }

    /// Sets the terminal size (the foreground process group gets `SIGWINCH`).
    pub fn resize(&self, size: TermSize) -> io::Result<()> {
        let winsize = size.winsize();
        // SAFETY: TIOCSWINSZ reads one `winsize` from the pointer, which lives for the call;
        // the fd is open for as long as `self`.
        let rc = unsafe {
            libc::ioctl(
                self.fd.get_ref().as_raw_fd(),
                libc::TIOCSWINSZ,
                &raw const winsize,
            )
        };
        if rc == -1 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }
}

struct Pty {
    master: OwnedFd,
    slave: OwnedFd,
}

/// Opens a pseudo-terminal of `size`, both ends close-on-exec (so that no other child
/// inherits them).
fn open_pty(size: TermSize) -> io::Result<Pty> {
    use nix::fcntl::OFlag;
    use std::os::unix::fs::OpenOptionsExt;

    let master = nix::pty::posix_openpt(OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC)?;
    nix::pty::grantpt(&master)?;
    nix::pty::unlockpt(&master)?;
    let slave_path = nix::pty::ptsname_r(&master)?;
    let slave = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY)
        .open(&slave_path)?;
    let master = master.as_fd().try_clone_to_owned()?;
    let winsize = size.winsize();
    // SAFETY: TIOCSWINSZ reads one `winsize` from the pointer, which lives for the call.
    if unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &raw const winsize) } == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(Pty {
        master,
        slave: OwnedFd::from(slave),
    })
}

/// The parent's ends of the child's I/O.
#[derive(Debug)]
pub enum ProcessIo {
    /// Separate pipes.
    Pipes {
        /// Stdin, when kept open.
        stdin: Option<ChildStdin>,
        /// Stdout.
        stdout: ChildStdout,
        /// Stderr.
        stderr: ChildStderr,
    },
    /// One terminal for input and output.
    Pty(std::sync::Arc<PtyMaster>),
}

/// A started process.
#[derive(Debug)]
pub struct Spawned {
    /// The child, to wait on.
    pub child: Child,
    /// Its pid, which is also its process group id.
    pub pid: u32,
    /// Its I/O.
    pub io: ProcessIo,
}

/// Why a process could not be started.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    /// `fork`/`exec` (or the pre-exec setup) failed.
    #[error("cannot start {cmd:?}")]
    Exec {
        /// The program.
        cmd: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The pseudo-terminal could not be set up.
    #[error("cannot open a pseudo-terminal")]
    Pty(#[source] io::Error),
}

/// Starts the process described by `spec`.
pub fn spawn(spec: &SpawnSpec) -> Result<Spawned, SpawnError> {
    let mut command = Command::new(&spec.cmd);
    command
        .args(&spec.args)
        .env_clear()
        .envs(
            spec.env
                .iter()
                .map(|(k, v)| (OsString::from(k), OsString::from(v))),
        )
        .current_dir(&spec.cwd)
        .kill_on_drop(false);

    let mut pty_master = None;
    match spec.pty {
        None => {
            command
                .stdin(if spec.stdin {
                    Stdio::piped()
                } else {
                    Stdio::null()
                })
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .process_group(0);
        }
        Some(size) => {
            let pty = open_pty(size).map_err(SpawnError::Pty)?;
            let dup = |fd: &OwnedFd| fd.as_fd().try_clone_to_owned().map_err(SpawnError::Pty);
            command
                .stdin(Stdio::from(dup(&pty.slave)?))
                .stdout(Stdio::from(dup(&pty.slave)?))
                .stderr(Stdio::from(pty.slave));
            pty_master = Some(pty.master);
            // SAFETY: setsid and ioctl are async-signal-safe and touch no memory of the
            // parent; stdin is already the terminal's slave side when pre_exec runs.
            unsafe {
                command.pre_exec(|| {
                    if libc::setsid() == -1 {
                        return Err(io::Error::last_os_error());
                    }
                    if libc::ioctl(0, libc::TIOCSCTTY, 0) == -1 {
                        return Err(io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
    }

    if spec.switch_user {
        let groups: Vec<libc::gid_t> = spec.user.groups.clone();
        let (uid, gid) = (spec.user.uid, spec.user.gid);
        // SAFETY: only async-signal-safe calls on data allocated before the fork (`groups`
        // is moved into the closure and only read).
        unsafe {
            command.pre_exec(move || {
                if libc::setgroups(groups.len(), groups.as_ptr()) == -1 {
                    return Err(io::Error::last_os_error());
                }
                if libc::setgid(gid) == -1 {
                    return Err(io::Error::last_os_error());
                }
                if libc::setuid(uid) == -1 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }

    let mut child = command.spawn().map_err(|source| SpawnError::Exec {
        cmd: spec.cmd.clone(),
        source,
    })?;
    // The command holds the slave ends; drop them now so that reads on the master see EIO
    // once the child's tree closes the terminal.
    drop(command);
    let pid = child.id().ok_or_else(|| SpawnError::Exec {
        cmd: spec.cmd.clone(),
        source: io::Error::other("the child exited before its pid was read"),
    })?;
    let io = match pty_master {
        Some(master) => ProcessIo::Pty(std::sync::Arc::new(
            PtyMaster::new(master).map_err(SpawnError::Pty)?,
        )),
        None => {
            let missing = || SpawnError::Exec {
                cmd: spec.cmd.clone(),
                source: io::Error::other("child pipes are missing"),
            };
            ProcessIo::Pipes {
                stdin: child.stdin.take(),
                stdout: child.stdout.take().ok_or_else(missing)?,
                stderr: child.stderr.take().ok_or_else(missing)?,
            }
        }
    };
    Ok(Spawned { child, pid, io })
}

/// Go's name of a signal, as E2B's agent reports it in `EndEvent.status`.
pub fn signal_name(signal: i32) -> String {
    let name = match signal {
        libc::SIGHUP => "hangup",
        libc::SIGINT => "interrupt",
        libc::SIGQUIT => "quit",
        libc::SIGILL => "illegal instruction",
        libc::SIGTRAP => "trace/breakpoint trap",
        libc::SIGABRT => "aborted",
        libc::SIGBUS => "bus error",
        libc::SIGFPE => "floating point exception",
        libc::SIGKILL => "killed",
        libc::SIGUSR1 => "user defined signal 1",
        libc::SIGSEGV => "segmentation fault",
        libc::SIGUSR2 => "user defined signal 2",
        libc::SIGPIPE => "broken pipe",
        libc::SIGALRM => "alarm clock",
        libc::SIGTERM => "terminated",
        libc::SIGXCPU => "CPU time limit exceeded",
        libc::SIGXFSZ => "file size limit exceeded",
        _ => return format!("signal {signal}"),
    };
    name.to_owned()
}

/// `(exit_code, exited, status)` of a finished process, in E2B's (Go's) terms: an exit
/// gives its code and `exit status N`; a signal gives -1 and `signal: NAME`.
pub fn describe_exit(status: std::process::ExitStatus) -> (i32, bool, String) {
    use std::os::unix::process::ExitStatusExt;
    if let Some(code) = status.code() {
        return (code, true, format!("exit status {code}"));
    }
    match status.signal() {
        Some(signal) => {
            let mut text = format!("signal: {}", signal_name(signal));
            if status.core_dumped() {
                text.push_str(" (core dumped)");
            }
            (-1, false, text)
        }
        None => (-1, false, format!("{status}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt;

    #[test]
    fn exit_descriptions() {
        let exited = std::process::ExitStatus::from_raw(3 << 8);
        assert_eq!(describe_exit(exited), (3, true, "exit status 3".into()));
        let killed = std::process::ExitStatus::from_raw(libc::SIGKILL);
        assert_eq!(describe_exit(killed), (-1, false, "signal: killed".into()));
        let dumped = std::process::ExitStatus::from_raw(libc::SIGSEGV | 0x80);
        assert_eq!(
            describe_exit(dumped).2,
            "signal: segmentation fault (core dumped)"
        );
        assert_eq!(signal_name(64), "signal 64");
    }
}
