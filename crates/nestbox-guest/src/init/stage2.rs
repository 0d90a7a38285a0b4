//! Stage 2: PID 1 in the root filesystem.
//!
//! ```text
//! block the signals we handle (they are taken synchronously with sigtimedwait)
//! mounts (/proc /sys /dev when booted without initramfs; /dev/pts /dev/shm /run
//!   /sys/fs/cgroup), / read-write, /tmp sticky
//! hostname (+ /etc/hosts), clock (nbx.clock), lo up, eth0 + default route,
//!   /etc/resolv.conf, grow / to fill the disk
//! supervise:
//!   Starting ──spawn ok──▶ Running ──server exits──▶ Backoff ──delay──▶ Starting
//!   every wake-up reaps all children (waitpid(-1)); orphans re-parented to us die here
//!   SIGTERM / SIGINT (ctrl-alt-del) / SIGPWR / SIGUSR1 / SIGUSR2 ──▶ shutdown:
//!     TERM the server, TERM then KILL everyone, sync, remount / ro, power off
//! ```
//!
//! A probe thread prints `NESTBOX-READY t=<uptime ms>` once, the first time the server
//! accepts a TCP connection on port 49983.
//!
//! Invariants: never returns, never panics; a failed set-up step is reported on the
//! console and the boot goes on, because a reachable server is worth more than a
//! perfect environment.

use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::mount::MsFlags;
use nix::sys::signal::{SigSet, Signal};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;

use super::cmdline::BootConfig;
use super::sys::{self, say, say_error};
use super::{InitError, READY_MARKER, SERVER_PORT, net};

/// Server restarts back off from this delay…
const MIN_BACKOFF: Duration = Duration::from_millis(100);
/// …doubling up to this one.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// A server that ran this long resets the backoff.
const HEALTHY_RUN: Duration = Duration::from_secs(10);

/// Runs stage 2. Never returns.
pub fn run() -> ! {
    let signals = handled_signals();
    if let Err(e) = signals.thread_block() {
        say(&format!("nestbox-init: cannot block signals: {e}"));
    }
    // Ctrl-Alt-Del then arrives as SIGINT instead of an immediate reboot.
    let _ = nix::sys::reboot::set_cad_enabled(false);

    early_mounts();
    sys::ensure_console_fds();
    let cfg = BootConfig::from_proc();
    for w in &cfg.warnings {
        say(&format!("nestbox-init: {w}"));
    }
    setup(&cfg);
    say(&format!(
        "nestbox-init: stage 2 ready to serve t={}",
        sys::uptime_ms()
    ));
    Supervisor::new(cfg, signals).run()
}

fn handled_signals() -> SigSet {
    let mut set = SigSet::empty();
    for s in [
        Signal::SIGCHLD,
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGHUP,
        Signal::SIGPWR,
        Signal::SIGUSR1,
        Signal::SIGUSR2,
    ] {
        set.add(s);
    }
    set
}

fn report<T>(what: &str, res: Result<T, InitError>) -> Option<T> {
    match res {
        Ok(v) => Some(v),
        Err(e) => {
            say_error(what, &e);
            None
        }
    }
}

/// /proc, /sys and /dev are already there when stage 1 ran; not when the kernel started
/// us directly (`init=` without an initramfs).
fn early_mounts() {
    let nosuid = MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC | MsFlags::MS_NODEV;
    report(
        "mount /proc",
        sys::mount_if_needed("proc", "/proc", "proc", nosuid, None),
    );
    report(
        "mount /sys",
        sys::mount_if_needed("sysfs", "/sys", "sysfs", nosuid, None),
    );
    report(
        "mount /dev",
        sys::mount_if_needed(
            "devtmpfs",
            "/dev",
            "devtmpfs",
            MsFlags::MS_NOSUID,
            Some("mode=0755"),
        ),
    );
}

fn setup(cfg: &BootConfig) {
    // / is read-only when the kernel mounted it without an initramfs.
    if nix::sys::statvfs::statvfs("/")
        .map(|s| s.flags().contains(nix::sys::statvfs::FsFlags::ST_RDONLY))
        .unwrap_or(false)
    {
        report(
            "remount / read-write",
            nix::mount::mount(
                None::<&str>,
                "/",
                None::<&str>,
                MsFlags::MS_REMOUNT,
                None::<&str>,
            )
            .map_err(|source| InitError::Sys {
                op: "remount / rw".into(),
                source,
            }),
        );
    }
    let nosuid = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    report(
        "mount /dev/pts",
        sys::mount_if_needed(
            "devpts",
            "/dev/pts",
            "devpts",
            MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
            Some("gid=5,mode=620,ptmxmode=666"),
        ),
    );
    report(
        "mount /dev/shm",
        sys::mount_if_needed("tmpfs", "/dev/shm", "tmpfs", nosuid, Some("mode=1777")),
    );
    report(
        "mount /run",
        sys::mount_if_needed("tmpfs", "/run", "tmpfs", nosuid, Some("mode=0755")),
    );
    report(
        "mount /sys/fs/cgroup",
        sys::mount_if_needed(
            "cgroup2",
            "/sys/fs/cgroup",
            "cgroup2",
            nosuid | MsFlags::MS_NOEXEC,
            None,
        ),
    );
    for (dir, mode) in [("/run/lock", 0o1777), ("/tmp", 0o1777)] {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::create_dir_all(dir);
        let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode));
    }
    for (link, target) in [
        ("/dev/fd", "/proc/self/fd"),
        ("/dev/stdin", "/proc/self/fd/0"),
        ("/dev/stdout", "/proc/self/fd/1"),
        ("/dev/stderr", "/proc/self/fd/2"),
    ] {
        if std::fs::symlink_metadata(link).is_err() {
            let _ = std::os::unix::fs::symlink(target, link);
        }
    }

    set_hostname(cfg);
    if let Some(ms) = cfg.clock_ms {
        report("set the clock", sys::set_clock(ms));
    }
    report("bring loopback up", net::loopback_up());
    report("configure eth0", net::configure_eth0(cfg));
    report("write /etc/resolv.conf", net::write_resolv_conf(cfg));

    let started = Instant::now();
    if let Some(sys::Growth::Grown { from, to }) =
        report("grow the root filesystem", sys::grow_root_fs(&cfg.root))
    {
        say(&format!(
            "nestbox-init: grew / from {} MiB to {} MiB in {} ms",
            from >> 20,
            to >> 20,
            started.elapsed().as_millis()
        ));
    }
}

fn set_hostname(cfg: &BootConfig) {
    let name = match &cfg.hostname {
        Some(n) => n.clone(),
        None => std::fs::read_to_string("/etc/hostname")
            .ok()
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "nestbox".to_string()),
    };
    report(
        "set the hostname",
        nix::unistd::sethostname(&name).map_err(|source| InitError::Sys {
            op: format!("sethostname {name}"),
            source,
        }),
    );
    if cfg.hostname.is_some() {
        let hosts = format!(
            "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n127.0.1.1\t{name}\n"
        );
        let _ = std::fs::write("/etc/hostname", format!("{name}\n"));
        report(
            "write /etc/hosts",
            std::fs::write("/etc/hosts", hosts).map_err(|source| InitError::Io {
                op: "write",
                path: "/etc/hosts".into(),
                source,
            }),
        );
    }
}

/// Where the server child stands.
enum ServerState {
    /// Start it at this instant.
    Waiting { start_at: Instant },
    /// Running since `since`.
    Running { pid: Pid, since: Instant },
}

struct Supervisor {
    cfg: BootConfig,
    signals: SigSet,
    state: ServerState,
    backoff: Duration,
    probe_started: bool,
}

impl Supervisor {
    fn new(cfg: BootConfig, signals: SigSet) -> Self {
        Self {
            cfg,
            signals,
            state: ServerState::Waiting {
                start_at: Instant::now(),
            },
            backoff: MIN_BACKOFF,
            probe_started: false,
        }
    }

    fn run(mut self) -> ! {
        loop {
            if let ServerState::Waiting { start_at } = self.state
                && Instant::now() >= start_at
            {
                self.start_server();
            }
            let timeout = match self.state {
                ServerState::Waiting { start_at } => {
                    start_at.saturating_duration_since(Instant::now())
                }
                ServerState::Running { .. } => Duration::from_secs(60),
            };
            let signal = wait_signal(&self.signals, timeout);
            match signal {
                Some(
                    Signal::SIGTERM
                    | Signal::SIGINT
                    | Signal::SIGPWR
                    | Signal::SIGUSR1
                    | Signal::SIGUSR2,
                ) => self.shutdown(),
                // SIGCHLD, SIGHUP, time-outs: reap whatever is there.
                _ => self.reap(),
            }
        }
    }

    fn start_server(&mut self) {
        let exe = std::env::current_exe().unwrap_or_else(|_| super::STAGE2_PATH.into());
        let mut cmd = Command::new(&exe);
        cmd.arg("serve")
            .arg("--listen")
            .arg(format!("0.0.0.0:{SERVER_PORT}"))
            .arg("--manage-system");
        if let Some(h) = &self.cfg.token_sha256 {
            cmd.arg("--access-token-sha256").arg(h);
        }
        cmd.env_clear()
            .env(
                "PATH",
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            )
            .env("HOME", "/root")
            .env("USER", "root")
            .env("LANG", "C.UTF-8")
            .env("TERM", "xterm-256color")
            .current_dir("/")
            .stdin(Stdio::null());
        // std resets the signal mask and SIGPIPE in the child, so the server starts clean.
        match cmd.spawn() {
            Ok(child) => {
                let pid = Pid::from_raw(child.id() as i32);
                // The Child handle is dropped without waiting: the reaper collects it.
                drop(child);
                self.state = ServerState::Running {
                    pid,
                    since: Instant::now(),
                };
                if !self.probe_started {
                    self.probe_started = true;
                    start_ready_probe();
                }
            }
            Err(e) => {
                say(&format!(
                    "nestbox-init: cannot start the server {}: {e}",
                    exe.display()
                ));
                self.schedule_restart();
            }
        }
    }

    fn schedule_restart(&mut self) {
        self.state = ServerState::Waiting {
            start_at: Instant::now() + self.backoff,
        };
        self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
    }

    /// Collects every exited child; notices when it was the server.
    fn reap(&mut self) {
        loop {
            match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(_) => return,
                Ok(status) => {
                    let Some(pid) = status.pid() else { continue };
                    if let ServerState::Running { pid: server, since } = self.state
                        && pid == server
                    {
                        say(&format!(
                            "nestbox-init: server exited ({status:?}); restarting"
                        ));
                        if since.elapsed() >= HEALTHY_RUN {
                            self.backoff = MIN_BACKOFF;
                        }
                        self.schedule_restart();
                    }
                }
            }
        }
    }

    fn shutdown(&mut self) -> ! {
        say("nestbox-init: shutting down");
        if let ServerState::Running { pid, .. } = self.state {
            let _ = nix::sys::signal::kill(pid, Signal::SIGTERM);
            wait_children(Some(pid), Duration::from_secs(3));
        }
        // pid -1: every process but us.
        let everyone = Pid::from_raw(-1);
        let _ = nix::sys::signal::kill(everyone, Signal::SIGTERM);
        wait_children(None, Duration::from_secs(2));
        let _ = nix::sys::signal::kill(everyone, Signal::SIGKILL);
        wait_children(None, Duration::from_secs(1));
        nix::unistd::sync();
        let _ = nix::mount::mount(
            None::<&str>,
            "/",
            None::<&str>,
            MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
            None::<&str>,
        );
        sys::power_off()
    }
}

/// Reaps children until `target` (or, with `None`, every child) is gone or `limit` passes.
fn wait_children(target: Option<Pid>, limit: Duration) {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
            Err(_) => return, // ECHILD: nobody left
            Ok(WaitStatus::StillAlive) => std::thread::sleep(Duration::from_millis(10)),
            Ok(status) => {
                if target.is_some() && status.pid() == target {
                    return;
                }
            }
        }
    }
}

/// Waits up to `timeout` for one of `set` (all blocked). `None` on time-out.
fn wait_signal(set: &SigSet, timeout: Duration) -> Option<Signal> {
    let ts = libc::timespec {
        tv_sec: timeout.as_secs().min(i64::MAX as u64) as libc::time_t,
        tv_nsec: libc::c_long::from(timeout.subsec_nanos() as i32),
    };
    // SAFETY: `set` is a valid sigset, the info pointer may be null, `ts` lives for the call.
    let rc = unsafe { libc::sigtimedwait(set.as_ref(), std::ptr::null_mut(), &ts) };
    if rc < 0 {
        None
    } else {
        Signal::try_from(rc).ok()
    }
}

/// Prints the READY marker once the server accepts connections. Runs on its own thread
/// (signals stay blocked there, inherited) so the supervisor keeps reaping meanwhile.
fn start_ready_probe() {
    let spawned = std::thread::Builder::new()
        .name("ready-probe".into())
        .spawn(|| {
            let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, SERVER_PORT));
            let mut delay = Duration::from_millis(2);
            loop {
                if TcpStream::connect_timeout(&addr, Duration::from_millis(500)).is_ok() {
                    say(&format!("{READY_MARKER} t={}", sys::uptime_ms()));
                    return;
                }
                std::thread::sleep(delay);
                delay = (delay * 2).min(Duration::from_millis(50));
            }
        });
    if let Err(e) = spawned {
        say(&format!(
            "nestbox-init: cannot start the readiness probe: {e}"
        ));
    }
}
