//! The VM runtime: one trait for microVM monitors ([`Vmm`]), a handle per running VM
//! ([`Vm`]), and the QEMU driver ([`qemu::QemuVmm`]).
//!
//! ```text
//! Vmm::boot(spec) ──▶ Box<dyn Vm> ── stop(grace) ──▶ StopReport   (process reaped, files removed)
//!                        │
//!                        ├─ pause / resume / snapshot(dir)   ─┐ NotSupported for now: the next
//! Vmm::restore(spec, dir) ────────────────────────────────────┘ step implements them (RUNTIME-FACTS §4)
//! ```
//!
//! Invariants: a [`Vm`] owns its VMM process. Dropping the handle kills it; `stop` kills
//! it gracefully and always reaps it. Its run files (QMP socket, pid file, guest RAM
//! file) are removed when it stops; the console log stays for post-mortems until the
//! owner removes the run directory.
//!
//! The host agent owns one `Box<dyn Vm>` per sandbox inside that sandbox's task; tests and
//! benchmarks use [`boot_and_wait_ready`].

pub mod console;
pub mod qemu;
pub mod qmp;
pub mod spec;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::time::{Duration, Instant};

pub use spec::{Disk, DiskFormat, GUEST_AGENT_PORT, GuestConfig, NetworkSpec, VmSpec};

/// A boxed, sendable future (the traits are object-safe).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Printed by the guest once its agent accepts connections.
pub const READY_MARKER: &str = "NESTBOX-READY";
/// Printed by the guest in KVM probe mode (`nbx.probe=1`).
pub const PROBE_MARKER: &str = "NESTBOX-PROBE-OK";

/// How the VMM executes guest code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    /// Hardware virtualisation.
    Kvm,
    /// QEMU's binary translator.
    Tcg,
}

impl Accel {
    /// QEMU's name.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Kvm => "kvm",
            Self::Tcg => "tcg",
        }
    }
}

/// Which accelerator to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AccelChoice {
    /// KVM if a probe guest really boots under it, else TCG.
    #[default]
    Auto,
    /// Always KVM.
    Kvm,
    /// Always TCG.
    Tcg,
}

/// What a driver is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmmInfo {
    /// Driver name (`qemu`).
    pub name: &'static str,
    /// VMM version (`7.2.22`).
    pub version: String,
    /// The accelerator VMs run under.
    pub accel: Accel,
}

impl std::fmt::Display for VmmInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {} ({})",
            self.name,
            self.version,
            self.accel.as_str()
        )
    }
}

/// How a VM ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StopReport {
    /// The VMM's exit code, if it exited normally.
    pub exit_code: Option<i32>,
    /// True if it had to be killed.
    pub forced: bool,
}

/// A guest that reached the ready marker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadyInfo {
    /// From the boot call to the marker on the console.
    pub elapsed: Duration,
    /// The guest's uptime in the marker (`t=`), in ms.
    pub guest_uptime_ms: Option<u64>,
}

/// A VM runtime failure.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// The spec is invalid.
    #[error("invalid vm spec: {field}: {reason}")]
    InvalidSpec {
        /// The field.
        field: &'static str,
        /// Why.
        reason: String,
    },
    /// The VMM could not be started (or a tool it needs failed).
    #[error("vm {id}: cannot start the vmm")]
    Spawn {
        /// VM id.
        id: String,
        /// Why.
        #[source]
        source: nestbox_hostsys::process::ProcessError,
    },
    /// The VMM process exited while we needed it.
    #[error("vm {id}: the vmm exited ({status}); stderr: {stderr}; console: {console}")]
    Exited {
        /// VM id.
        id: String,
        /// Exit status.
        status: String,
        /// Tail of the VMM's stderr.
        stderr: String,
        /// Tail of the guest console.
        console: String,
    },
    /// QMP failed.
    #[error("vm {id}: qmp")]
    Qmp {
        /// VM id.
        id: String,
        /// Why.
        #[source]
        source: qmp::QmpError,
    },
    /// A file operation failed.
    #[error("cannot {op} {}", path.display())]
    Io {
        /// What we tried.
        op: &'static str,
        /// On what.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The guest did not print the ready marker in time.
    #[error("vm {id}: no {marker} within {waited:?}; console tail:\n{console}")]
    NotReady {
        /// VM id.
        id: String,
        /// The marker.
        marker: &'static str,
        /// How long we waited.
        waited: Duration,
        /// Tail of the guest console.
        console: String,
    },
    /// The driver cannot do this (yet).
    #[error("{vmm} does not support {operation} yet")]
    NotSupported {
        /// Driver name.
        vmm: &'static str,
        /// The operation.
        operation: &'static str,
    },
    /// The VMM binary is unusable.
    #[error("vmm binary {binary}: {detail}")]
    Binary {
        /// The binary.
        binary: String,
        /// What is wrong.
        detail: String,
    },
}

/// A running VM. Owned by one task; dropping it kills the VMM.
pub trait Vm: Send + Sync {
    /// The spec's id.
    fn id(&self) -> &str;
    /// The VMM process id.
    fn pid(&self) -> u32;
    /// The serial console log.
    fn console_log(&self) -> &Path;
    /// The run directory.
    fn run_dir(&self) -> &Path;
    /// The exit status string if the VMM has exited (without waiting).
    fn exited(&mut self) -> Option<String>;
    /// The guest run state as the VMM reports it (`running`, `paused`, …).
    fn run_state(&self) -> BoxFuture<'_, Result<String, VmmError>>;
    /// Stops the VM: graceful quit, then SIGTERM, then SIGKILL after `grace`; always
    /// reaps the process and removes the run files (not the console log).
    fn stop(&mut self, grace: Duration) -> BoxFuture<'_, Result<StopReport, VmmError>>;
    /// Pauses the guest and saves it so it can be resumed later.
    fn pause(&mut self) -> BoxFuture<'_, Result<(), VmmError>>;
    /// Resumes a paused guest.
    fn resume(&mut self) -> BoxFuture<'_, Result<(), VmmError>>;
    /// Snapshots memory and device state into `dir` (the guest keeps running afterwards).
    fn snapshot<'a>(&'a mut self, dir: &'a Path) -> BoxFuture<'a, Result<(), VmmError>>;
}

/// A microVM monitor driver.
pub trait Vmm: Send + Sync {
    /// Name, version and accelerator.
    fn info(&self) -> &VmmInfo;
    /// Boots a VM from a spec. Returns once the VMM is up and controllable (the guest
    /// is still booting).
    fn boot(&self, spec: VmSpec) -> BoxFuture<'_, Result<Box<dyn Vm>, VmmError>>;
    /// Starts a VM from a snapshot directory written by [`Vm::snapshot`].
    fn restore<'a>(
        &'a self,
        spec: VmSpec,
        snapshot: &'a Path,
    ) -> BoxFuture<'a, Result<Box<dyn Vm>, VmmError>>;
}

/// Boots a VM and waits (polling its console, bounded by `limit`) for
/// `NESTBOX-READY t=<ms>`. On time-out or early exit the VM is stopped and the error
/// carries the console tail.
pub async fn boot_and_wait_ready(
    vmm: &dyn Vmm,
    spec: VmSpec,
    limit: Duration,
) -> Result<(Box<dyn Vm>, ReadyInfo), VmmError> {
    let started = Instant::now();
    let id = spec.id.clone();
    let mut vm = vmm.boot(spec).await?;
    let mut watcher = console::ConsoleWatcher::new(vm.console_log());
    let found = {
        let vm_ref = &mut vm;
        watcher
            .wait_for(READY_MARKER, limit, || vm_ref.exited().is_none())
            .await
    };
    match found {
        Ok(Some(line)) => {
            let guest_uptime_ms = line
                .split_whitespace()
                .find_map(|w| w.strip_prefix("t="))
                .and_then(|t| t.parse().ok());
            Ok((
                vm,
                ReadyInfo {
                    elapsed: started.elapsed(),
                    guest_uptime_ms,
                },
            ))
        }
        Ok(None) => {
            let status = vm.exited().unwrap_or_default();
            let console = console::tail_lines(vm.console_log(), 30);
            let stderr = console::tail_lines(&vm.run_dir().join(qemu::STDERR_LOG), 10);
            let _ = vm.stop(Duration::from_secs(1)).await;
            Err(VmmError::Exited {
                id,
                status,
                stderr,
                console,
            })
        }
        Err(()) => {
            let console = console::tail_lines(vm.console_log(), 30);
            let _ = vm.stop(Duration::from_secs(1)).await;
            Err(VmmError::NotReady {
                id,
                marker: READY_MARKER,
                waited: limit,
                console,
            })
        }
    }
}
