//! Role selection and the PID 1 stages. Owned by the boot path.
//!
//! [`dispatch`] picks the role of this one static binary:
//!
//! | situation | role |
//! | --- | --- |
//! | `nestbox-guest serve …` | the server ([`crate::server::main`]) |
//! | `nestbox-guest version` | print the version |
//! | PID 1 and argv\[0\] is `/init` | [`stage1`]: initramfs → root filesystem |
//! | PID 1 otherwise | [`stage2`]: set up the guest, supervise the server, reap |
//!
//! The kernel command line keys both stages read are documented in [`cmdline`]; the
//! console markers ([`READY_MARKER`], [`PROBE_MARKER`]) are what the host watches for.

pub mod cmdline;
pub mod net;
pub mod stage1;
pub mod stage2;
pub mod sys;

use std::process::ExitCode;
use std::time::Duration;

/// Printed by stage 2 once the server accepts connections: `NESTBOX-READY t=<uptime ms>`.
pub const READY_MARKER: &str = "NESTBOX-READY";
/// Printed by stage 1 with `nbx.probe=1`, right before powering off.
pub const PROBE_MARKER: &str = "NESTBOX-PROBE-OK";
/// Where stage 1 finds stage 2 in the root filesystem.
pub const STAGE2_PATH: &str = "/usr/local/bin/nestbox-guest";
/// The server's TCP port (E2B's envd port).
pub const SERVER_PORT: u16 = 49983;

/// A failed step of an init stage.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    /// mount(2) failed.
    #[error("cannot mount {device} ({fstype}) on {target}")]
    Mount {
        /// What was mounted (a device or a pseudo filesystem name).
        device: String,
        /// Mount point.
        target: String,
        /// Filesystem type.
        fstype: String,
        /// Why.
        #[source]
        source: nix::Error,
    },
    /// A file operation failed.
    #[error("cannot {op} {path}")]
    Io {
        /// What we tried.
        op: &'static str,
        /// On what.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Another system call failed.
    #[error("cannot {op}")]
    Sys {
        /// What we tried.
        op: String,
        /// Why.
        #[source]
        source: nix::Error,
    },
    /// A network ioctl failed.
    #[error("cannot {op}")]
    Net {
        /// What we tried.
        op: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The root disk never showed up.
    #[error(
        "root device {device} did not appear within {waited:?} (is the disk attached and its driver in /lib/modules/order?)"
    )]
    NoRootDevice {
        /// The device path (`nbx.root`).
        device: String,
        /// How long we waited.
        waited: Duration,
    },
    /// The root device holds no ext4 filesystem.
    #[error("{device} does not hold an ext4 filesystem")]
    NotExt4 {
        /// The device path.
        device: String,
    },
    /// exec of the next stage failed.
    #[error("cannot exec {path}")]
    Exec {
        /// The program.
        path: String,
        /// Why.
        #[source]
        source: nix::Error,
    },
}

/// Chooses the role from argv\[0\], the first argument and the process id.
pub fn dispatch() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("serve") => return crate::server::main(&args[2..]),
        Some("version" | "--version") => {
            println!("nestbox-guest {}", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
        _ => {}
    }
    if std::process::id() == 1 {
        if args.first().map(String::as_str) == Some("/init") {
            stage1::run()
        } else {
            stage2::run()
        }
    }
    eprintln!("usage: nestbox-guest serve [--listen ADDR] | nestbox-guest version");
    eprintln!("(as PID 1 it boots the guest: /init in the initramfs, then the root filesystem)");
    ExitCode::from(2)
}
