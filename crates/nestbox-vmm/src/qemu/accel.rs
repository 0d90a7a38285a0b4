//! Choosing the accelerator. `/dev/kvm` existing proves little (this project's machines
//! expose a PVM-only KVM that cannot run ordinary guests), so `Auto` boots the real
//! kernel + initramfs under KVM with `nbx.probe=1` and accepts KVM only if the guest
//! prints `NESTBOX-PROBE-OK` in time. The verdict is cached in a file keyed by QEMU
//! version and kernel hash.
//!
//! Under TCG the guest needs `tsc_early_khz=<host MHz × 1000>` ([`host_tsc_khz`]):
//! without a reference clock on microvm the kernel can hang calibrating the TSC.

use std::path::{Path, PathBuf};
use std::time::Duration;

use nestbox_hostsys::process::Cmd;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::console::ConsoleWatcher;
use crate::{Accel, PROBE_MARKER, VmmError};

/// How long a KVM probe guest may take to print its marker.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(20);

/// The host TSC frequency in kHz, from the first `cpu MHz` line of /proc/cpuinfo.
pub fn host_tsc_khz() -> Option<u64> {
    parse_cpu_mhz(&std::fs::read_to_string("/proc/cpuinfo").ok()?)
}

fn parse_cpu_mhz(cpuinfo: &str) -> Option<u64> {
    let line = cpuinfo.lines().find(|l| l.starts_with("cpu MHz"))?;
    let mhz: f64 = line.split(':').nth(1)?.trim().parse().ok()?;
    (mhz > 0.0).then_some((mhz * 1000.0) as u64)
}

/// The cached verdict.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct ProbeVerdict {
    qemu_version: String,
    kernel_sha256: String,
    kvm_works: bool,
}

/// The kernel and initramfs the probe boots (the real guest images).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeImages {
    /// Kernel image.
    pub kernel: PathBuf,
    /// Initramfs (stage 1 answers `nbx.probe=1`).
    pub initrd: PathBuf,
}

async fn sha256_file(path: &Path) -> Result<String, VmmError> {
    let p = path.to_path_buf();
    tokio::task::spawn_blocking(move || {
        let bytes = std::fs::read(&p).map_err(|source| VmmError::Io {
            op: "read",
            path: p.clone(),
            source,
        })?;
        Ok(hex::encode(Sha256::digest(&bytes)))
    })
    .await
    .map_err(|e| VmmError::Io {
        op: "hash",
        path: path.into(),
        source: std::io::Error::other(e),
    })?
}

/// Boots the probe guest under KVM; true if it printed the marker within `limit`.
pub async fn probe_kvm(
    binary: &Path,
    images: &ProbeImages,
    limit: Duration,
) -> Result<bool, VmmError> {
    let dir = tempfile_dir()?;
    let console = dir.join("console.log");
    let append = format!(
        "console=ttyS0 panic=-1 quiet pci=off {} nbx.probe=1",
        crate::spec::FAST_ARGS.join(" ")
    );
    let cmd = Cmd::new(binary)
        .args([
            "-M", "microvm", "-accel", "kvm", "-cpu", "host", "-m", "256M", "-smp", "1",
        ])
        .args([
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
        ])
        .arg("-chardev")
        .arg(format!("file,id=con0,path={}", console.display()))
        .args(["-serial", "chardev:con0", "-kernel"])
        .arg(&images.kernel)
        .arg("-initrd")
        .arg(&images.initrd)
        .arg("-append")
        .arg(append)
        .new_session();
    let result = async {
        let mut child =
            cmd.spawn(Some(&dir.join("stderr.log")))
                .map_err(|source| VmmError::Spawn {
                    id: "kvm-probe".into(),
                    source,
                })?;
        let mut watcher = ConsoleWatcher::new(&console);
        let seen = watcher
            .wait_for(PROBE_MARKER, limit, || child.try_status().is_none())
            .await;
        let _ = child.terminate(Duration::from_secs(1)).await;
        Ok(matches!(seen, Ok(Some(_))))
    }
    .await;
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn tempfile_dir() -> Result<PathBuf, VmmError> {
    let base = std::env::temp_dir();
    for n in 0..100u32 {
        let dir = base.join(format!("nestbox-kvm-probe-{}-{n}", std::process::id()));
        match std::fs::create_dir(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(source) => {
                return Err(VmmError::Io {
                    op: "create",
                    path: dir,
                    source,
                });
            }
        }
    }
    Err(VmmError::Io {
        op: "create a directory in",
        path: base,
        source: std::io::Error::other("too many probes"),
    })
}

/// Decides KVM or TCG for `Auto`, using (and refreshing) the cached verdict in
/// `state_dir`.
pub async fn auto_accel(
    binary: &Path,
    qemu_version: &str,
    images: Option<&ProbeImages>,
    state_dir: Option<&Path>,
) -> Result<Accel, VmmError> {
    if !Path::new("/dev/kvm").exists() {
        return Ok(Accel::Tcg);
    }
    let Some(images) = images else {
        tracing::warn!("/dev/kvm exists but no probe images were given; using TCG");
        return Ok(Accel::Tcg);
    };
    let kernel_sha256 = sha256_file(&images.kernel).await?;
    let cache = state_dir.map(|d| d.join("kvm-probe.json"));
    if let Some(path) = &cache
        && let Ok(bytes) = std::fs::read(path)
        && let Ok(v) = serde_json::from_slice::<ProbeVerdict>(&bytes)
        && v.qemu_version == qemu_version
        && v.kernel_sha256 == kernel_sha256
    {
        return Ok(if v.kvm_works { Accel::Kvm } else { Accel::Tcg });
    }
    let kvm_works = probe_kvm(binary, images, PROBE_TIMEOUT).await?;
    tracing::info!(kvm_works, "kvm probe finished");
    if let Some(path) = &cache {
        let v = ProbeVerdict {
            qemu_version: qemu_version.into(),
            kernel_sha256,
            kvm_works,
        };
        if let Some(parent) = path.parent() {
            let _ = std::fs::create_dir_all(parent);
        }
        if let Ok(bytes) = serde_json::to_vec_pretty(&v) {
            std::fs::write(path, bytes).map_err(|source| VmmError::Io {
                op: "write",
                path: path.clone(),
                source,
            })?;
        }
    }
    Ok(if kvm_works { Accel::Kvm } else { Accel::Tcg })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_mhz_becomes_khz() {
        let info =
            "processor\t: 0\nmodel name\t: AMD EPYC\ncpu MHz\t\t: 2596.138\ncache size\t: 512 KB\n";
        assert_eq!(parse_cpu_mhz(info), Some(2_596_138));
        assert_eq!(parse_cpu_mhz("processor : 0\n"), None);
        assert!(host_tsc_khz().is_some_and(|k| k > 100_000));
    }
}
