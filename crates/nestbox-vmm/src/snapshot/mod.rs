//! VM snapshots: the on-disk format (a directory with a versioned `snapshot.json`), the
//! checks that decide whether a snapshot may be restored, and the types of the save and
//! restore API ([`crate::Vm::save`], [`crate::Vmm::restore`]).
//!
//! # A snapshot directory
//!
//! ```text
//! <dir>/snapshot.json   the manifest (written last: no manifest = no snapshot)
//! <dir>/state.bin       device state, QEMU's migration stream (~100 KiB); it also holds
//!                       the guest RAM when the VM's RAM was not a shared file (a clone)
//! <dir>/memory.ram      guest RAM, byte for byte (sparse), when the VM owned a RAM file
//! ```
//!
//! The caller's own files (a frozen disk, say) may live in the same directory; the driver
//! only ever creates, checks or removes the three names above.
//!
//! # What the checks guarantee
//!
//! [`check_compatible`] refuses ([`VmmError::IncompatibleSnapshot`]) an unknown format
//! version, another VMM (name, version, accelerator), another kernel or initramfs (by
//! SHA-256, whatever their paths), another machine (type, CPU model, vCPUs, memory size,
//! device drivers with their ids and order), a TAP-made snapshot on a slirp NIC, and a
//! root disk smaller than the one the guest saw. [`verify_files`] refuses
//! ([`VmmError::CorruptSnapshot`]) missing files and files that differ from the manifest:
//!
//! - `state.bin`: exact size and full SHA-256 (it is small), so any change is caught.
//! - `memory.ram`: exact size (catches truncation and extension), plus a *sampled*
//!   SHA-256 over 256 pages, one at a seed-chosen place in each 1/256th of the file
//!   (1 MiB read, about a millisecond). It catches a zeroed, truncated or garbage file and
//!   the RAM of another VM or template with near certainty. It does **not** promise to
//!   catch a few flipped pages or a RAM file swapped with a sibling snapshot of the same
//!   VM taken moments apart (they differ in few pages): a full hash of 512 MiB would cost
//!   about 300 ms, too much for a sub-100 ms restore.
//!
//! All checks run before any VMM process starts.

pub mod files;

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::{Accel, BoxFuture, Vm, VmmError, VmmInfo};
pub use files::{DigestCache, Placement};

/// Version of `snapshot.json` this build writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// The manifest's file name.
pub const MANIFEST_FILE: &str = "snapshot.json";
/// The device-state file's name.
pub const STATE_FILE: &str = "state.bin";
/// The RAM file's name.
pub const MEMORY_FILE: &str = "memory.ram";

/// What a save does with the VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SaveMode {
    /// Pause a sandbox: stop the guest, save its device state, quit the VMM and **move**
    /// its RAM file into the snapshot (a rename: no copy, the snapshot directory should be
    /// on the same tmpfs as the VM's `memory_dir`; elsewhere the RAM is copied). The VM
    /// handle is finished afterwards. Restore it with [`RestoreMemory::Resume`].
    Suspend,
    /// Freeze a running sandbox into a template: stop, save the device state, copy the
    /// RAM file sparsely into the snapshot, `cont`. The VM keeps running. Restore clones
    /// from it with [`RestoreMemory::Clone`].
    Checkpoint,
}

/// How a restored VM gets its RAM from a snapshot with a RAM file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestoreMemory {
    /// The VM takes the snapshot's RAM file as its own: it is moved to
    /// `<memory_dir>/<id>.ram` (a rename; a sparse copy across filesystems) and mapped
    /// `share=on`, so the VM can be suspended again without a copy. This **consumes** the
    /// snapshot: on success its manifest and state file are removed too; on failure
    /// everything is put back.
    Resume,
    /// The VM maps the snapshot's RAM file `share=off` (`MAP_PRIVATE`): any number of
    /// clones share its pages and write into private copies. The snapshot is left as it
    /// is and **must not change while clones run** (replacing or rewriting the file shows
    /// through pages a clone has not written yet; removing it is fine).
    Clone,
    /// The VM gets its own sparse copy of the snapshot's RAM file in
    /// `<memory_dir>/<id>.ram` (a reflink where the filesystem can), mapped `share=on`.
    /// The snapshot is left as it is. Slower to start than `Clone` (the copy: about 60 ms
    /// for a booted 512 MiB guest) and no pages are shared, but the VM owns a RAM file,
    /// so suspending it later is the fast path (`Clone`s carry their RAM in the state
    /// file instead).
    Copy,
}

/// A caller's hook that runs while the guest is stopped, to freeze the disk at the same
/// instant as memory (reflink or copy of the disk image). By the time it runs, the guest's
/// vCPUs are stopped and QEMU has flushed and released its disk image (migration
/// completed), so the image file is consistent and nothing writes to it until the hook
/// returns. It runs concurrently with the RAM copy; keep it short: it is guest downtime.
pub trait FreezeHook: Send {
    /// Freezes whatever must match the memory snapshot.
    fn freeze(&mut self) -> BoxFuture<'_, Result<(), BoxError>>;
}

/// A boxed error from a caller's hook.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl<F> FreezeHook for F
where
    F: FnMut() -> BoxFuture<'static, Result<(), BoxError>> + Send,
{
    fn freeze(&mut self) -> BoxFuture<'_, Result<(), BoxError>> {
        (self)()
    }
}

/// Where a saved snapshot's RAM went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SavedMemory {
    /// A RAM file in the snapshot directory.
    File {
        /// Its path (`<dir>/memory.ram`).
        path: PathBuf,
        /// How it got there: [`Placement::Moved`] for a suspend on the same filesystem.
        placement: Placement,
    },
    /// Inside the state file: the VM's RAM was not a shared file of its own (a clone
    /// maps its template `share=off`, a VM resumed from such a snapshot has anonymous
    /// RAM). QEMU's `x-ignore-shared` skips only shared RAM, so the migration stream
    /// carries every page: a slower save and restore (see the crate docs).
    InState,
}

/// How long each phase of a save took.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SaveTimings {
    /// QMP `stop`.
    pub stop: Duration,
    /// Writing the migration stream (device state, and RAM when in state).
    pub save_state: Duration,
    /// Moving or copying the RAM file (concurrent with `freeze`).
    pub memory: Duration,
    /// The caller's freeze hook, when given.
    pub freeze: Option<Duration>,
    /// Digests and the manifest.
    pub manifest: Duration,
    /// `cont` (checkpoint) or quitting the VMM (suspend).
    pub finish: Duration,
    /// From `stop` until the guest ran again (checkpoint) or the VMM was gone (suspend).
    pub paused: Duration,
    /// The whole call.
    pub total: Duration,
}

/// A saved snapshot.
#[derive(Debug, Clone)]
pub struct SavedSnapshot {
    /// The snapshot directory (absolute).
    pub dir: PathBuf,
    /// What was written to `snapshot.json`.
    pub manifest: SnapshotManifest,
    /// Where the RAM is.
    pub memory: SavedMemory,
    /// Phase timings.
    pub timings: SaveTimings,
}

/// How long each phase of a restore took.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RestoreTimings {
    /// Manifest, compatibility and file checks.
    pub check: Duration,
    /// Moving the RAM file into place (resume).
    pub memory: Duration,
    /// Starting the VMM until its QMP socket answered.
    pub spawn: Duration,
    /// Loading the state (incoming migration) until `completed`.
    pub load: Duration,
    /// `cont`.
    pub cont: Duration,
    /// The whole call, until the guest runs.
    pub total: Duration,
}

/// A VM started from a snapshot; its guest is running.
pub struct Restored {
    /// The VM.
    pub vm: Box<dyn Vm>,
    /// The snapshot's manifest.
    pub manifest: SnapshotManifest,
    /// Phase timings.
    pub timings: RestoreTimings,
}

impl std::fmt::Debug for Restored {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Restored")
            .field("vm", &self.vm.id())
            .field("manifest", &self.manifest)
            .field("timings", &self.timings)
            .finish()
    }
}

/// `snapshot.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotManifest {
    /// [`FORMAT_VERSION`].
    pub format_version: u32,
    /// How it was made.
    pub kind: SaveMode,
    /// When (RFC 3339, UTC).
    pub created_at: String,
    /// The id of the VM it was taken from.
    pub source_vm: String,
    /// The VMM that wrote it.
    pub vmm: VmmRecord,
    /// What the guest booted.
    pub guest: GuestRecord,
    /// The virtual machine.
    pub machine: MachineConfig,
    /// The root disk as the guest saw it (its content is the caller's business).
    pub root_disk: DiskRecord,
    /// The device-state file.
    pub state: StateFile,
    /// The RAM file; `None` when the RAM is inside the state file.
    pub memory: Option<MemoryFile>,
}

/// The VMM that wrote a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmmRecord {
    /// Driver name (`qemu`).
    pub name: String,
    /// Its version (`7.2.22`).
    pub version: String,
    /// The accelerator.
    pub accel: Accel,
}

/// A kernel or initramfs image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageDigest {
    /// Where it was when the VM booted (informational: restore compares digests).
    pub path: String,
    /// Size in bytes.
    pub size: u64,
    /// SHA-256, hex.
    pub sha256: String,
}

/// What the guest booted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GuestRecord {
    /// The kernel.
    pub kernel: ImageDigest,
    /// The initramfs.
    pub initrd: Option<ImageDigest>,
    /// The kernel command line it booted with. A restore starts the VMM with this one,
    /// not the spec's: the guest never reads it again, but the firmware tables must match.
    pub cmdline: String,
}

/// One device, in command-line order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceConfig {
    /// Device id (`root`, `net0`, `rng0`).
    pub id: String,
    /// Guest-visible device model (`virtio-blk-device`).
    pub driver: String,
    /// Host-side backend (`qcow2`, `raw`, `tap`, `user`, `urandom`): informational,
    /// except that a TAP NIC cannot be restored onto slirp.
    pub backend: String,
}

/// The virtual machine a snapshot needs: restore refuses any difference except in
/// backends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfig {
    /// QEMU machine type (`microvm`).
    pub machine_type: String,
    /// CPU model (`default` under TCG, `host` under KVM).
    pub cpu: String,
    /// The host CPU's model name under KVM (`-cpu host` exposes it to the guest).
    pub host_cpu: Option<String>,
    /// vCPUs.
    pub vcpus: u32,
    /// Guest memory, MiB.
    pub memory_mb: u32,
    /// Devices in command-line order.
    pub devices: Vec<DeviceConfig>,
}

impl MachineConfig {
    /// Whether the machine has a network card.
    pub fn has_nic(&self) -> bool {
        self.devices.iter().any(|d| d.driver == NIC_DRIVER)
    }

    fn nic_backend(&self) -> Option<&str> {
        self.devices
            .iter()
            .find(|d| d.driver == NIC_DRIVER)
            .map(|d| d.backend.as_str())
    }

    /// Bytes of guest RAM.
    pub fn memory_bytes(&self) -> u64 {
        u64::from(self.memory_mb) << 20
    }
}

const NIC_DRIVER: &str = "virtio-net-device";

/// The root disk as the guest saw it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskRecord {
    /// Image format of the original (`qcow2`, `raw`): informational, a clone may run on
    /// a flattened raw copy.
    pub format: String,
    /// Size the guest saw, in bytes.
    pub virtual_size: u64,
}

/// The device-state file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StateFile {
    /// Its name in the directory.
    pub file: String,
    /// Size in bytes.
    pub size: u64,
    /// SHA-256 of the whole file, hex.
    pub sha256: String,
}

/// The RAM file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryFile {
    /// Its name in the directory.
    pub file: String,
    /// Size in bytes (the guest's memory size).
    pub size: u64,
    /// Bytes allocated when saved (informational: holes are unused guest pages).
    pub allocated: u64,
    /// The sampled digest.
    pub sample: SampledDigest,
}

/// A digest over a sample of a file's blocks (see the module docs for what it catches).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SampledDigest {
    /// The scheme ([`files::SAMPLE_ALGORITHM`]).
    pub algorithm: String,
    /// Bytes per block.
    pub block_size: u64,
    /// Blocks read.
    pub blocks: u64,
    /// Chooses the blocks.
    pub seed: u64,
    /// SHA-256, hex.
    pub sha256: String,
}

/// What a restore expects of a snapshot: this host's VMM and the spec's machine and images.
#[derive(Debug, Clone)]
pub struct Expected<'a> {
    /// This driver.
    pub vmm: &'a VmmInfo,
    /// The spec's machine.
    pub machine: &'a MachineConfig,
    /// The spec's kernel.
    pub kernel: &'a ImageDigest,
    /// The spec's initramfs.
    pub initrd: Option<&'a ImageDigest>,
    /// The spec's root disk.
    pub root_disk: &'a DiskRecord,
}

fn corrupt(path: &Path, reason: impl Into<String>) -> VmmError {
    VmmError::CorruptSnapshot {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

fn incompatible(dir: &Path, reason: impl Into<String>) -> VmmError {
    VmmError::IncompatibleSnapshot {
        dir: dir.to_path_buf(),
        reason: reason.into(),
    }
}

/// Reads `<dir>/snapshot.json`: the format version first (an unknown one is
/// incompatible, whatever else the file holds), then the rest.
pub fn read_manifest(dir: &Path) -> Result<SnapshotManifest, VmmError> {
    let path = dir.join(MANIFEST_FILE);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(corrupt(
                &path,
                "missing: not a snapshot, or an incomplete one",
            ));
        }
        Err(source) => {
            return Err(VmmError::Io {
                op: "read",
                path,
                source,
            });
        }
    };
    let value: serde_json::Value =
        serde_json::from_slice(&bytes).map_err(|e| corrupt(&path, format!("not JSON: {e}")))?;
    let version = value
        .get("format_version")
        .and_then(serde_json::Value::as_u64)
        .ok_or_else(|| corrupt(&path, "no format_version"))?;
    if version != u64::from(FORMAT_VERSION) {
        return Err(incompatible(
            dir,
            format!("format version {version}; this build reads version {FORMAT_VERSION}"),
        ));
    }
    let m: SnapshotManifest =
        serde_json::from_value(value).map_err(|e| corrupt(&path, e.to_string()))?;
    for name in std::iter::once(&m.state.file).chain(m.memory.as_ref().map(|m| &m.file)) {
        if name.is_empty() || name.contains('/') || name == "." || name == ".." {
            return Err(corrupt(&path, format!("bad file name {name:?}")));
        }
    }
    Ok(m)
}

/// Writes `<dir>/snapshot.json` atomically (temporary file, fsync, rename, fsync dir).
pub fn write_manifest(dir: &Path, m: &SnapshotManifest) -> Result<(), VmmError> {
    let path = dir.join(MANIFEST_FILE);
    let tmp = dir.join(format!("{MANIFEST_FILE}.tmp"));
    let io = |op: &'static str, p: &Path| {
        let path = p.to_path_buf();
        move |source| VmmError::Io { op, path, source }
    };
    let bytes = serde_json::to_vec_pretty(m).map_err(|e| VmmError::Io {
        op: "serialize",
        path: path.clone(),
        source: std::io::Error::other(e),
    })?;
    std::fs::write(&tmp, bytes).map_err(io("write", &tmp))?;
    files::sync_path(&tmp).map_err(io("sync", &tmp))?;
    std::fs::rename(&tmp, &path).map_err(io("rename", &tmp))?;
    files::sync_path(dir).map_err(io("sync", dir))
}

/// Compares a manifest with what this host and spec would run. Pure: no file access.
pub fn check_compatible(
    dir: &Path,
    m: &SnapshotManifest,
    e: &Expected<'_>,
) -> Result<(), VmmError> {
    let refuse = |reason: String| Err(incompatible(dir, reason));
    if m.vmm.name != e.vmm.name || m.vmm.version != e.vmm.version {
        return refuse(format!(
            "made by {} {}; this host runs {} {}",
            m.vmm.name, m.vmm.version, e.vmm.name, e.vmm.version
        ));
    }
    if m.vmm.accel != e.vmm.accel {
        return refuse(format!(
            "made under {}; this host runs {}",
            m.vmm.accel.as_str(),
            e.vmm.accel.as_str()
        ));
    }
    if m.guest.kernel.sha256 != e.kernel.sha256 {
        return refuse(format!(
            "another kernel: the snapshot booted {} (sha256 {}), the spec has {} (sha256 {})",
            m.guest.kernel.path, m.guest.kernel.sha256, e.kernel.path, e.kernel.sha256
        ));
    }
    match (&m.guest.initrd, e.initrd) {
        (None, None) => {}
        (Some(a), Some(b)) if a.sha256 == b.sha256 => {}
        (a, b) => {
            let show = |d: Option<&ImageDigest>| {
                d.map_or("none".to_string(), |d| {
                    format!("{} (sha256 {})", d.path, d.sha256)
                })
            };
            return refuse(format!(
                "another initramfs: the snapshot booted {}, the spec has {}",
                show(a.as_ref()),
                show(b)
            ));
        }
    }
    let (s, x) = (&m.machine, e.machine);
    let field = |name: &str, a: &dyn std::fmt::Display, b: &dyn std::fmt::Display| {
        format!("{name}: the snapshot has {a}, the spec {b}")
    };
    if s.machine_type != x.machine_type {
        return refuse(field("machine type", &s.machine_type, &x.machine_type));
    }
    if s.cpu != x.cpu {
        return refuse(field("cpu model", &s.cpu, &x.cpu));
    }
    if s.host_cpu != x.host_cpu {
        return refuse(format!(
            "host cpu: made on {:?}, this host is {:?}",
            s.host_cpu, x.host_cpu
        ));
    }
    if s.vcpus != x.vcpus {
        return refuse(field("vcpus", &s.vcpus, &x.vcpus));
    }
    if s.memory_mb != x.memory_mb {
        return refuse(field("memory_mb", &s.memory_mb, &x.memory_mb));
    }
    let list = |d: &[DeviceConfig]| {
        d.iter()
            .map(|d| format!("{}:{}", d.id, d.driver))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let same_devices = s.devices.len() == x.devices.len()
        && s.devices
            .iter()
            .zip(&x.devices)
            .all(|(a, b)| a.id == b.id && a.driver == b.driver);
    if !same_devices {
        return refuse(format!(
            "devices: the snapshot has [{}], the spec [{}]",
            list(&s.devices),
            list(&x.devices)
        ));
    }
    if s.nic_backend() == Some("tap") && x.nic_backend() == Some("user") {
        return refuse(
            "network: the guest negotiated TAP offloads (vnet headers) that a user-mode \
             (slirp) backend cannot offer; restore it on a TAP device"
                .into(),
        );
    }
    if e.root_disk.virtual_size < m.root_disk.virtual_size {
        return refuse(format!(
            "root disk: the guest saw {} bytes, the spec's disk has {}",
            m.root_disk.virtual_size, e.root_disk.virtual_size
        ));
    }
    Ok(())
}

/// Checks the snapshot's files against its manifest (see the module docs). Blocking.
pub fn verify_files(dir: &Path, m: &SnapshotManifest) -> Result<(), VmmError> {
    let state = dir.join(&m.state.file);
    let size = file_size(&state)?;
    if size != m.state.size {
        return Err(corrupt(
            &state,
            format!("{size} bytes, the manifest says {}", m.state.size),
        ));
    }
    let sha = files::sha256_file(&state).map_err(|source| VmmError::Io {
        op: "read",
        path: state.clone(),
        source,
    })?;
    if sha != m.state.sha256 {
        return Err(corrupt(
            &state,
            "content differs from the manifest (sha256)",
        ));
    }
    if let Some(mem) = &m.memory {
        let path = dir.join(&mem.file);
        let size = file_size(&path)?;
        if mem.size != m.machine.memory_bytes() {
            return Err(corrupt(
                &path,
                format!(
                    "the manifest says {} bytes for {} MiB of guest memory",
                    mem.size, m.machine.memory_mb
                ),
            ));
        }
        if size != mem.size {
            return Err(corrupt(
                &path,
                format!("{size} bytes, the manifest says {}", mem.size),
            ));
        }
        if mem.sample.algorithm != files::SAMPLE_ALGORITHM {
            return Err(corrupt(
                &path,
                format!("unknown digest scheme {}", mem.sample.algorithm),
            ));
        }
        let got = files::sampled_digest(&path, mem.size, mem.sample.seed).map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                corrupt(&path, "truncated while reading")
            } else {
                VmmError::Io {
                    op: "read",
                    path: path.clone(),
                    source: e,
                }
            }
        })?;
        if got.sha256 != mem.sample.sha256 {
            return Err(corrupt(
                &path,
                "content differs from the manifest (sampled sha256)",
            ));
        }
    }
    Ok(())
}

fn file_size(path: &Path) -> Result<u64, VmmError> {
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() => Ok(m.len()),
        Ok(_) => Err(corrupt(path, "not a regular file")),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(corrupt(path, "missing")),
        Err(source) => Err(VmmError::Io {
            op: "stat",
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// The size a disk image shows the guest: a raw file's length, or a qcow2 image's
/// virtual size from its header.
pub fn disk_virtual_size(path: &Path, format: crate::DiskFormat) -> std::io::Result<u64> {
    match format {
        crate::DiskFormat::Raw => Ok(std::fs::metadata(path)?.len()),
        crate::DiskFormat::Qcow2 => {
            use std::os::unix::fs::FileExt;
            let mut header = [0u8; 32];
            std::fs::File::open(path)?.read_exact_at(&mut header, 0)?;
            if &header[..4] != b"QFI\xfb" {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    "not a qcow2 image",
                ));
            }
            let mut size = [0u8; 8];
            size.copy_from_slice(&header[24..32]);
            Ok(u64::from_be_bytes(size))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(name: &str, sha: &str) -> ImageDigest {
        ImageDigest {
            path: format!("/img/{name}"),
            size: 1,
            sha256: sha.into(),
        }
    }

    fn machine() -> MachineConfig {
        MachineConfig {
            machine_type: "microvm".into(),
            cpu: "default".into(),
            host_cpu: None,
            vcpus: 1,
            memory_mb: 512,
            devices: vec![
                DeviceConfig {
                    id: "root".into(),
                    driver: "virtio-blk-device".into(),
                    backend: "qcow2".into(),
                },
                DeviceConfig {
                    id: "net0".into(),
                    driver: NIC_DRIVER.into(),
                    backend: "tap".into(),
                },
            ],
        }
    }

    fn manifest() -> SnapshotManifest {
        SnapshotManifest {
            format_version: FORMAT_VERSION,
            kind: SaveMode::Checkpoint,
            created_at: "2026-01-01T00:00:00Z".into(),
            source_vm: "a".into(),
            vmm: VmmRecord {
                name: "qemu".into(),
                version: "7.2.22".into(),
                accel: Accel::Tcg,
            },
            guest: GuestRecord {
                kernel: digest("vmlinux", "k1"),
                initrd: Some(digest("initramfs", "i1")),
                cmdline: "console=ttyS0".into(),
            },
            machine: machine(),
            root_disk: DiskRecord {
                format: "qcow2".into(),
                virtual_size: 1 << 30,
            },
            state: StateFile {
                file: STATE_FILE.into(),
                size: 0,
                sha256: String::new(),
            },
            memory: None,
        }
    }

    fn check(m: &SnapshotManifest, mutate: impl FnOnce(&mut Owned)) -> Result<(), String> {
        let mut o = Owned {
            vmm: VmmInfo {
                name: "qemu",
                version: "7.2.22".into(),
                accel: Accel::Tcg,
                cpu: crate::qemu::TCG_CPU,
            },
            machine: machine(),
            kernel: digest("k", "k1"),
            initrd: Some(digest("i", "i1")),
            disk: DiskRecord {
                format: "raw".into(),
                virtual_size: 1 << 30,
            },
        };
        mutate(&mut o);
        let e = Expected {
            vmm: &o.vmm,
            machine: &o.machine,
            kernel: &o.kernel,
            initrd: o.initrd.as_ref(),
            root_disk: &o.disk,
        };
        check_compatible(Path::new("/snap"), m, &e).map_err(|e| match e {
            VmmError::IncompatibleSnapshot { reason, .. } => reason,
            other => panic!("unexpected {other}"),
        })
    }

    type Mutation = Box<dyn FnOnce(&mut Owned)>;

    struct Owned {
        vmm: VmmInfo,
        machine: MachineConfig,
        kernel: ImageDigest,
        initrd: Option<ImageDigest>,
        disk: DiskRecord,
    }

    #[test]
    fn compatible_when_only_paths_and_backends_differ() {
        let m = manifest();
        check(&m, |o| {
            o.machine.devices[0].backend = "raw".into();
            o.disk.virtual_size = 2 << 30;
        })
        .unwrap();
    }

    #[test]
    fn every_difference_is_named() {
        let m = manifest();
        let cases: Vec<(Mutation, &str)> = vec![
            (
                Box::new(|o| o.vmm.version = "8.2.0".into()),
                "qemu 7.2.22; this host runs qemu 8.2.0",
            ),
            (Box::new(|o| o.vmm.accel = Accel::Kvm), "made under tcg"),
            (
                Box::new(|o| o.kernel.sha256 = "k2".into()),
                "another kernel",
            ),
            (Box::new(|o| o.initrd = None), "another initramfs"),
            (
                Box::new(|o| o.machine.memory_mb = 256),
                "memory_mb: the snapshot has 512, the spec 256",
            ),
            (Box::new(|o| o.machine.vcpus = 2), "vcpus"),
            (
                Box::new(|o| {
                    o.machine.devices.pop();
                }),
                "devices: the snapshot has [root:virtio-blk-device, net0:virtio-net-device], the spec [root:virtio-blk-device]",
            ),
            (
                Box::new(|o| o.machine.devices[1].backend = "user".into()),
                "slirp",
            ),
            (Box::new(|o| o.disk.virtual_size = 1 << 29), "root disk"),
        ];
        for (mutate, want) in cases {
            let reason = check(&m, mutate).unwrap_err();
            assert!(reason.contains(want), "{reason:?} lacks {want:?}");
        }
    }

    #[test]
    fn manifests_round_trip_and_unknown_versions_are_incompatible() {
        let dir = tempfile::tempdir().unwrap();
        let m = manifest();
        write_manifest(dir.path(), &m).unwrap();
        assert_eq!(read_manifest(dir.path()).unwrap(), m);
        let path = dir.path().join(MANIFEST_FILE);
        let mut v: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        v["format_version"] = 99.into();
        v["something_new"] = true.into();
        std::fs::write(&path, v.to_string()).unwrap();
        match read_manifest(dir.path()).unwrap_err() {
            VmmError::IncompatibleSnapshot { reason, .. } => {
                assert!(reason.contains("format version 99"), "{reason}")
            }
            other => panic!("unexpected {other}"),
        }
        std::fs::write(&path, b"{\"format_version\": 1}").unwrap();
        assert!(matches!(
            read_manifest(dir.path()).unwrap_err(),
            VmmError::CorruptSnapshot { .. }
        ));
        std::fs::remove_file(&path).unwrap();
        assert!(matches!(
            read_manifest(dir.path()).unwrap_err(),
            VmmError::CorruptSnapshot { .. }
        ));
    }

    #[test]
    fn qcow2_virtual_size_comes_from_the_header() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.qcow2");
        let mut header = vec![0u8; 512];
        header[..4].copy_from_slice(b"QFI\xfb");
        header[24..32].copy_from_slice(&(5u64 << 30).to_be_bytes());
        std::fs::write(&p, &header).unwrap();
        assert_eq!(
            disk_virtual_size(&p, crate::DiskFormat::Qcow2).unwrap(),
            5 << 30
        );
        assert_eq!(disk_virtual_size(&p, crate::DiskFormat::Raw).unwrap(), 512);
    }
}
