//! Stage 1: `/init` in the initramfs, PID 1.
//!
//! ```text
//! mount devtmpfs, proc, sysfs
//!   └─ nbx.probe=1 → print NESTBOX-PROBE-OK, power off
//! load /lib/modules/<each line of /lib/modules/order> with finit_module (EEXIST is fine)
//! wait for nbx.root (default /dev/vda), bounded
//! mount it ext4 rw at /newroot; move /dev /proc /sys into it
//! free the initramfs (/init, /lib), switch root (mount --move, chroot, chdir)
//! exec /usr/local/bin/nestbox-guest  → stage 2
//! ```
//!
//! Invariant: this function never returns and never panics. Any failure prints a message
//! naming what failed and powers the VM off; the host sees QEMU exit and the console log.

use std::os::fd::AsRawFd;
use std::time::Duration;

use nix::mount::MsFlags;

use super::cmdline::BootConfig;
use super::sys::{self, say};
use super::{InitError, PROBE_MARKER, STAGE2_PATH};

/// Where the initramfs keeps its modules and their load order.
const MODULES_DIR: &str = "/lib/modules";
/// How long to wait for the root block device.
const ROOT_WAIT: Duration = Duration::from_secs(10);

/// Runs stage 1. Never returns.
pub fn run() -> ! {
    let err = match boot() {
        Ok(never) => match never {},
        Err(e) => e,
    };
    sys::say_error("stage 1 failed", &err);
    say("nestbox-init: powering off");
    sys::power_off()
}

fn boot() -> Result<std::convert::Infallible, InitError> {
    let nosuid = MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC;
    sys::mount_if_needed(
        "devtmpfs",
        "/dev",
        "devtmpfs",
        MsFlags::MS_NOSUID,
        Some("mode=0755"),
    )?;
    sys::ensure_console_fds();
    sys::mount_if_needed("proc", "/proc", "proc", nosuid | MsFlags::MS_NODEV, None)?;
    sys::mount_if_needed("sysfs", "/sys", "sysfs", nosuid | MsFlags::MS_NODEV, None)?;

    let cfg = BootConfig::from_proc();
    say(&format!("nestbox-init: stage 1 t={}", sys::uptime_ms()));
    for w in &cfg.warnings {
        say(&format!("nestbox-init: {w}"));
    }
    if cfg.probe {
        say(PROBE_MARKER);
        sys::power_off();
    }

    load_modules();
    sys::wait_for_block_device(&cfg.root, ROOT_WAIT)?;
    sys::mount_if_needed(&cfg.root, "/newroot", "ext4", MsFlags::empty(), None)?;
    for dir in ["/dev", "/proc", "/sys"] {
        let target = format!("/newroot{dir}");
        if !std::path::Path::new(&target).exists() {
            std::fs::create_dir_all(&target).map_err(|source| InitError::Io {
                op: "create",
                path: target.clone(),
                source,
            })?;
        }
        nix::mount::mount(
            Some(dir),
            target.as_str(),
            None::<&str>,
            MsFlags::MS_MOVE,
            None::<&str>,
        )
        .map_err(|source| InitError::Sys {
            op: format!("move {dir} to {target}"),
            source,
        })?;
    }
    free_initramfs();
    switch_root("/newroot")?;
    say(&format!(
        "nestbox-init: root {} mounted t={}",
        cfg.root,
        sys::uptime_ms()
    ));

    let path = std::ffi::CString::new(STAGE2_PATH).map_err(|_| InitError::Exec {
        path: STAGE2_PATH.into(),
        source: nix::Error::EINVAL,
    })?;
    let Err(source) = nix::unistd::execv(&path, &[path.as_c_str()]);
    Err(InitError::Exec {
        path: STAGE2_PATH.into(),
        source,
    })
}

/// Loads the modules listed in `/lib/modules/order`, in order. A module that fails to
/// load is reported and skipped: a missing optional driver must not stop the boot (the
/// root device wait reports the consequence if it mattered).
fn load_modules() {
    let order = match std::fs::read_to_string(format!("{MODULES_DIR}/order")) {
        Ok(s) => s,
        Err(e) => {
            say(&format!(
                "nestbox-init: no module list ({e}); assuming a kernel with built-in drivers"
            ));
            return;
        }
    };
    for name in order
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        let path = format!("{MODULES_DIR}/{name}");
        if let Err(e) = load_module(&path) {
            sys::say_error("module", &e);
        }
    }
}

fn load_module(path: &str) -> Result<(), InitError> {
    let file = std::fs::File::open(path).map_err(|source| InitError::Io {
        op: "open module",
        path: path.to_string(),
        source,
    })?;
    // SAFETY: finit_module(2) with a valid fd, an empty NUL-terminated parameter string
    // and no flags.
    let rc = unsafe { libc::syscall(libc::SYS_finit_module, file.as_raw_fd(), c"".as_ptr(), 0) };
    if rc != 0 {
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EEXIST) {
            return Err(InitError::Io {
                op: "load module",
                path: path.to_string(),
                source: err,
            });
        }
    }
    Ok(())
}

/// Deletes what the initramfs put in RAM (it stays allocated after the switch otherwise).
/// Only paths we created are touched, so no mount is ever crossed.
fn free_initramfs() {
    let _ = std::fs::remove_dir_all(MODULES_DIR);
    let _ = std::fs::remove_file("/init");
}

/// Makes `new_root` the root: `mount --move new_root /`, `chroot .`, `chdir /`.
fn switch_root(new_root: &str) -> Result<(), InitError> {
    let sysop = |op: &str| {
        let op = op.to_string();
        move |source| InitError::Sys { op, source }
    };
    nix::unistd::chdir(new_root).map_err(sysop("chdir to the new root"))?;
    nix::mount::mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)
        .map_err(sysop("move the new root onto /"))?;
    nix::unistd::chroot(".").map_err(sysop("chroot into the new root"))?;
    nix::unistd::chdir("/").map_err(sysop("chdir to /"))?;
    Ok(())
}
