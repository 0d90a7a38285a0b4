//! `vm.json`: what a later process needs to take a running QEMU over.
//!
//! A QEMU outlives the process that started it (it runs in a session of its own): after
//! the host agent crashes, is OOM-killed or is restarted on a new binary, its VMs keep
//! running. The record in each VM's run directory lets the next agent adopt them
//! ([`crate::Vmm::adopt`]) instead of killing them.
//!
//! It names the process by pid **and start time** (a recycled pid never matches), and
//! holds what a [`QemuVm`] is made of beyond the process: the spec it runs, the kernel
//! command line it booted with, where its RAM lives, a held VM's snapshot, and a save in
//! progress. It is rewritten (atomically, mode 0600) whenever one of those changes: at
//! boot and restore, when a save starts and ends, when a held VM runs again, and when
//! the VM is relocated; it is removed with the run files when the VM stops.
//!
//! Adoption undoes a save that the crash interrupted: the RAM file goes back where the
//! VM maps it, the snapshot files are removed and the guest runs again — the same undo
//! as a save that fails. A held VM stays held, its snapshot whole.

use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nestbox_hostsys::process::Supervised;

use super::{GuestImages, Held, MemoryBacking, QemuVm, QemuVmm, RunPaths};
use crate::qmp::QmpClient;
use crate::snapshot::{MEMORY_FILE, Placement};
use crate::{VmSpec, VmmError};

/// The record's name in the run directory.
pub const RECORD_FILE: &str = "vm.json";
/// Its format version.
const RECORD_FORMAT: u32 = 1;
/// How long a QMP handshake with an adopted VM may take.
const QMP_WAIT: Duration = Duration::from_secs(10);

/// The persisted form of a [`QemuVm`].
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub(crate) struct VmRecord {
    format: u32,
    pid: u32,
    start_time: u64,
    spec: VmSpec,
    cmdline: String,
    memory: MemoryBacking,
    held: Option<Held>,
    saving: Option<PathBuf>,
}

impl QemuVm {
    /// Writes the VM's record. A failure is logged, not raised: the VM runs on, and only
    /// its adoption after a crash is lost (the next agent then ends it).
    pub(crate) fn write_record(&self) {
        let record = VmRecord {
            format: RECORD_FORMAT,
            pid: self.child.pid(),
            start_time: self.start_time,
            spec: self.spec.clone(),
            cmdline: self.cmdline.clone(),
            memory: self.memory.clone(),
            held: self.held.clone(),
            saving: self.saving.clone(),
        };
        if let Err(error) = write_atomic(&self.paths.record, &record) {
            tracing::warn!(id = %self.id, %error, "cannot record the vm for a later take-over");
        }
    }

    /// Undoes a save a crash interrupted (see the module docs).
    async fn undo_interrupted_save(&mut self, dir: &Path) -> Result<(), VmmError> {
        let state = self
            .qmp
            .query_status()
            .await
            .map_err(|source| VmmError::Qmp {
                id: self.id.clone(),
                source,
            })?;
        let ram = dir.join(MEMORY_FILE);
        let undo = match &self.memory {
            MemoryBacking::Owned(src) if !src.exists() && ram.exists() => {
                Some((src.clone(), Placement::Moved))
            }
            _ => None,
        };
        tracing::warn!(id = %self.id, %state, dir = %dir.display(), "undoing a save interrupted by a restart");
        if state == "running" {
            // Not stopped yet: the files (if any) are all there is to undo.
            super::snapshot::remove_snapshot_files(dir);
        } else {
            self.abort_save(dir, undo).await;
        }
        self.saving = None;
        self.write_record();
        Ok(())
    }
}

fn write_atomic(path: &Path, record: &VmRecord) -> std::io::Result<()> {
    let bytes = serde_json::to_vec(record).map_err(std::io::Error::other)?;
    let tmp = path.with_extension("json.tmp");
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .and_then(|mut f| f.write_all(&bytes))?;
    std::fs::rename(&tmp, path)
}

impl QemuVmm {
    /// Takes over the VM whose record is in `run_dir` (see [`crate::Vmm::adopt`]).
    pub(super) async fn adopt_vm(&self, run_dir: &Path) -> Result<QemuVm, VmmError> {
        let refuse = |reason: String| VmmError::NotAdoptable {
            run_dir: run_dir.to_path_buf(),
            reason,
        };
        let path = run_dir.join(RECORD_FILE);
        let bytes = std::fs::read(&path).map_err(|e| refuse(format!("no record: {e}")))?;
        let record: VmRecord =
            serde_json::from_slice(&bytes).map_err(|e| refuse(format!("bad record: {e}")))?;
        if record.format != RECORD_FORMAT {
            return Err(refuse(format!("record format {}", record.format)));
        }
        let spec = record.spec;
        let child = Supervised::adopt(record.pid, record.start_time, &format!("qemu {}", spec.id))
            .map_err(|e| refuse(format!("its process {} is gone: {e}", record.pid)))?;
        let paths = RunPaths::new(&spec.run_dir, &spec.memory_dir, &spec.id);
        let stream = tokio::net::UnixStream::connect(&paths.qmp_socket)
            .await
            .map_err(|e| refuse(format!("its monitor: {e}")))?;
        let qmp = QmpClient::handshake(stream, QMP_WAIT)
            .await
            .map_err(|source| VmmError::Qmp {
                id: spec.id.clone(),
                source,
            })?;
        let images = GuestImages::of(&spec)?;
        let mut vm = QemuVm {
            id: spec.id.clone(),
            run_dir: spec.run_dir.clone(),
            paths,
            start_time: record.start_time,
            child,
            qmp,
            stopped: false,
            saving: None,
            cgroup: self.cgroup_of(&spec.id),
            held: record.held,
            info: self.info.clone(),
            machine: self.machine_config(&spec),
            cmdline: record.cmdline,
            images,
            digests: self.digests.clone(),
            memory: record.memory,
            spec,
            // Its QEMU holds its own descriptor of any sealed template RAM.
            _template_ram: None,
        };
        if let Some(dir) = record.saving.filter(|_| vm.held.is_none()) {
            vm.undo_interrupted_save(&dir).await?;
        }
        tracing::info!(id = %vm.id, pid = record.pid, held = vm.held.is_some(), "vm adopted");
        Ok(vm)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::spec::{Disk, DiskFormat, NetworkSpec};

    /// A `vm.json` as the first release that kept records wrote it: its spec had neither
    /// the overlay's recorded backing nor the VMM's own user (VMMs ran as root then). An
    /// agent upgraded from it must still take those VMs over.
    #[test]
    fn records_of_the_oldest_adoptable_release_are_read() {
        let record = VmRecord {
            format: RECORD_FORMAT,
            pid: 4242,
            start_time: 123_456,
            spec: VmSpec {
                id: "sb-1".into(),
                vcpus: 1,
                memory_mb: 512,
                kernel: "/img/vmlinuz".into(),
                initrd: Some("/img/initrd.img".into()),
                cmdline_extra: vec![],
                root_disk: Disk {
                    path: "/data/sandboxes/sb-1/rootfs.qcow2".into(),
                    format: DiskFormat::Qcow2,
                    backing: Some("/data/bases/minimal.ext4".into()),
                },
                network: NetworkSpec::None,
                guest: Default::default(),
                run_dir: "/data/sandboxes/sb-1".into(),
                memory_dir: "/dev/shm/nbx/sb-1".into(),
                uid: Some(0x6e62_0007),
            },
            cmdline: "console=ttyS0".into(),
            memory: MemoryBacking::Owned("/dev/shm/nbx/sb-1/memory.ram".into()),
            held: None,
            saving: None,
        };
        let mut old = serde_json::to_value(&record).unwrap();
        let spec = old["spec"].as_object_mut().unwrap();
        assert!(spec.remove("uid").is_some());
        assert!(
            spec["root_disk"]
                .as_object_mut()
                .unwrap()
                .remove("backing")
                .is_some()
        );
        let read: VmRecord = serde_json::from_value(old).unwrap();
        assert_eq!(
            (read.format, read.pid, read.start_time),
            (RECORD_FORMAT, 4242, 123_456)
        );
        assert_eq!(
            read.spec.uid, None,
            "an old VMM ran as root: it is not jailed"
        );
        assert_eq!(read.spec.root_disk.backing, None);
        assert_eq!(read.memory, record.memory);
    }
}
