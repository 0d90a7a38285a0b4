//! `state.json`: everything a sandbox holds and needs, written before it is taken.
//!
//! The file lives in the sandbox's directory (inside the agent's data directory, mode 0700)
//! and is replaced atomically. After a crash, [`crate::cleanup`] reads it to kill the
//! sandbox's VMM, remove its network and files — or, for a paused sandbox whose snapshot
//! is intact, to adopt it again. It holds the guest agent's access token, so it is written
//! with mode 0600.

use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use nestbox_types::{SandboxId, TeamId, TemplateId};

use crate::error::AgentError;

/// Format version of `state.json`.
pub const STATE_FORMAT: u32 = 2;

/// Where a sandbox is in its life, as persisted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Booting or restoring; a crash now means the sandbox is gone.
    Starting,
    /// Its VM runs.
    Running,
    /// Its memory, devices and disk are saved; no VM runs.
    Paused,
}

/// How a sandbox came to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StartedBy {
    /// A fresh boot of an image.
    Boot,
    /// A clone of a snapshot template.
    Restore,
}

impl StartedBy {
    /// Wire spelling.
    pub fn as_str(&self) -> &'static str {
        match self {
            StartedBy::Boot => "boot",
            StartedBy::Restore => "restore",
        }
    }
}

/// Persisted record of a sandbox.
#[derive(Clone, serde::Serialize, serde::Deserialize)]
pub struct StateFile {
    /// [`STATE_FORMAT`].
    pub format_version: u32,
    /// The sandbox.
    pub sandbox_id: SandboxId,
    /// Its team.
    pub team_id: TeamId,
    /// Template name.
    pub template: String,
    /// Team template it came from, if any.
    pub template_id: Option<TemplateId>,
    /// vCPUs.
    pub vcpus: u32,
    /// Memory, MiB.
    pub memory_mb: u32,
    /// Disk, MiB.
    pub disk_size_mb: u32,
    /// Inactivity timeout, seconds (0 = never).
    pub timeout_sec: u32,
    /// The guest agent's access token (secret).
    pub access_token: String,
    /// Kernel the VM runs.
    pub kernel: PathBuf,
    /// Its initramfs.
    pub initrd: PathBuf,
    /// Kernel release.
    pub kernel_version: String,
    /// Life phase.
    pub phase: Phase,
    /// Paused by the inactivity timeout.
    #[serde(default)]
    pub auto_paused: bool,
    /// How it started.
    pub started_by: StartedBy,
    /// Its network slot while it has one.
    pub slot: Option<u32>,
    /// Its VMM process while it runs.
    pub vmm_pid: Option<u32>,
    /// The name its VMM's command line carries: the id it was started under (a pooled
    /// clone's, for a sandbox that took one over), so cleanup never kills another process.
    #[serde(default)]
    pub vmm_name: Option<String>,
    /// Its tmpfs directory (guest RAM, fast snapshot).
    pub mem_dir: PathBuf,
    /// The on-disk copy of its snapshot is complete (survives a host reboot).
    #[serde(default)]
    pub snapshot_durable: bool,
    /// When it first became ready.
    pub started_at: DateTime<Utc>,
    /// Create request to ready, ms.
    pub boot_ms: u64,
    /// Guest agent version.
    pub guest_version: String,
    /// A started clone waiting in the pool for a create to take it over.
    #[serde(default)]
    pub pooled: bool,
    /// A pooled clone's template directory (its pool, with `disk_size_mb`).
    #[serde(default)]
    pub pool_template: Option<PathBuf>,
    /// A sandbox the agent runs for itself (a warm snapshot build): never adopted after a
    /// restart.
    #[serde(default)]
    pub internal: bool,
    /// A symlink to this directory under the name it had as a pooled clone: that clone's
    /// VMM reopens its disk by the old path (QEMU does when a pause hands the image over).
    /// Removed with the directory.
    #[serde(default)]
    pub dir_alias: Option<PathBuf>,
    /// The tenant's egress rules (validated), put in force whenever it runs.
    #[serde(default)]
    pub egress: nestbox_types::egress::EgressRules,
    /// The version of the last egress change taken (0: the rules it was created with).
    #[serde(default)]
    pub egress_version: u64,
    /// A token rotation in progress: the guest agent may hold this token already (a crash
    /// before the rotation was recorded); the next start finds out which one it holds.
    #[serde(default)]
    pub rotating_to: Option<String>,
    /// The image the root disk's overlay was made over (a VMM can rewrite the overlay's
    /// header, so the image it names there is not trusted). `None` in the record of a
    /// sandbox made before this was kept.
    #[serde(default)]
    pub disk_backing: Option<PathBuf>,
}

impl std::fmt::Debug for StateFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateFile")
            .field("sandbox_id", &self.sandbox_id)
            .field("phase", &self.phase)
            .field("slot", &self.slot)
            .field("vmm_pid", &self.vmm_pid)
            .finish_non_exhaustive()
    }
}

/// Only the fields cleanup needs, readable from any format version.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct Leftovers {
    /// The sandbox.
    pub sandbox_id: SandboxId,
    /// Its slot, if it held one.
    #[serde(default)]
    pub slot: Option<u32>,
    /// Its VMM, if one ran.
    #[serde(default)]
    pub vmm_pid: Option<u32>,
    /// The name on its VMM's command line (default: the sandbox id).
    #[serde(default)]
    pub vmm_name: Option<String>,
    /// Its tmpfs directory.
    #[serde(default)]
    pub mem_dir: Option<PathBuf>,
}

/// Writes `state` into `dir/state.json` atomically, mode 0600.
pub fn write(dir: &Path, state: &StateFile) -> Result<(), AgentError> {
    let id = state.sandbox_id;
    let bytes =
        serde_json::to_vec_pretty(state).map_err(|e| AgentError::Internal(e.to_string()))?;
    let tmp = dir.join("state.json.tmp");
    let result = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .and_then(|mut f| f.write_all(&bytes).and_then(|()| f.sync_data()))
        .and_then(|()| std::fs::rename(&tmp, dir.join("state.json")));
    result.map_err(|e| AgentError::host("recording sandbox state", id, e))
}

/// Reads `dir/state.json` if it is of the current format.
pub fn read(dir: &Path) -> Option<StateFile> {
    let bytes = std::fs::read(dir.join("state.json")).ok()?;
    let state: StateFile = serde_json::from_slice(&bytes).ok()?;
    (state.format_version == STATE_FORMAT).then_some(state)
}

/// Reads what cleanup needs from `dir/state.json`, whatever its format.
pub fn read_leftovers(dir: &Path) -> Option<Leftovers> {
    let bytes = std::fs::read(dir.join("state.json")).ok()?;
    serde_json::from_slice(&bytes).ok()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// A `state.json` exactly as the first release that took sandboxes back after a restart
    /// wrote it (before token rotation and recorded disk backings): an agent upgraded from
    /// it must read every sandbox it left, or it would lose them.
    const OLDEST_ADOPTABLE: &str = r#"{
      "format_version": 2,
      "sandbox_id": "sb-6f0c2b0e-3c1d-4d55-9d0e-2f4a8b7c9e11",
      "team_id": "team-1d2c3b4a-5e6f-4a7b-8c9d-0e1f2a3b4c5d",
      "template": "minimal",
      "template_id": null,
      "vcpus": 1,
      "memory_mb": 512,
      "disk_size_mb": 5120,
      "timeout_sec": 300,
      "access_token": "a-token-of-sixteen-chars",
      "kernel": "/var/lib/nestbox/images/kernels/vmlinuz",
      "initrd": "/var/lib/nestbox/images/kernels/initrd.img",
      "kernel_version": "6.1.0",
      "phase": "running",
      "auto_paused": false,
      "started_by": "boot",
      "slot": 7,
      "vmm_pid": 4242,
      "vmm_name": null,
      "mem_dir": "/dev/shm/nestbox-abc/sb-6f0c2b0e-3c1d-4d55-9d0e-2f4a8b7c9e11",
      "snapshot_durable": false,
      "started_at": "2026-12-03T10:00:00Z",
      "boot_ms": 1800,
      "guest_version": "0.1.0",
      "pooled": false,
      "pool_template": null,
      "internal": false,
      "dir_alias": null,
      "egress": {"allow_out": [], "deny_out": []},
      "egress_version": 0
    }"#;

    #[test]
    fn an_upgraded_agent_reads_what_the_oldest_adoptable_release_wrote() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("state.json"), OLDEST_ADOPTABLE).unwrap();
        let st = read(dir.path()).expect("the older record is read");
        assert_eq!(st.phase, Phase::Running);
        assert_eq!((st.slot, st.vmm_pid), (Some(7), Some(4242)));
        assert_eq!(st.rotating_to, None);
        assert_eq!(st.disk_backing, None);
        // Written back in today's form, it reads the same.
        write(dir.path(), &st).unwrap();
        let again = read(dir.path()).unwrap();
        assert_eq!(again.sandbox_id, st.sandbox_id);
        assert_eq!(again.access_token, st.access_token);
    }
}
