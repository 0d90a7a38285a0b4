//! Start-up cleanup: removes what a crashed agent left behind.
//!
//! Everything a sandbox takes is recorded before it is taken (see
//! [`crate::sandbox::StateFile`]), so after a crash this module can find and remove, for
//! this agent instance only: VMM processes (killed only if their command line names the
//! sandbox, so a recycled pid is never hit), network namespaces and veth links of the
//! instance's slots, slot files, guest memory files and sandbox directories.

use std::path::Path;

use nestbox_hostsys::net::{SandboxNet, SlotAddrs, SlotAllocator};

use crate::sandbox::StateFile;

/// What the cleanup removed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct CleanupReport {
    /// VMM processes killed.
    pub processes: usize,
    /// Network slots torn down.
    pub networks: usize,
    /// Sandbox directories removed.
    pub directories: usize,
}

fn process_mentions(pid: u32, needle: &str) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| String::from_utf8_lossy(&b).contains(needle))
        .unwrap_or(false)
}

async fn kill_and_wait(pid: u32) {
    let Ok(raw) = i32::try_from(pid) else { return };
    // SAFETY: kill(2) on a pid we verified to be one of our VMMs.
    unsafe {
        libc::kill(raw, libc::SIGKILL);
    }
    for _ in 0..100 {
        if !Path::new(&format!("/proc/{pid}")).exists() {
            return;
        }
        // A zombie whose parent died is reaped by init; an exited child of ours is not
        // possible here (we just started). Poll briefly.
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        if stat.split_whitespace().nth(2) == Some("Z") {
            return;
        }
    }
}

/// Removes the leftovers of this agent instance.
pub async fn run(data_dir: &Path, mem_root: &Path, slots: &SlotAllocator) -> CleanupReport {
    let mut report = CleanupReport::default();
    let sandboxes = data_dir.join("sandboxes");
    if let Ok(entries) = std::fs::read_dir(&sandboxes) {
        for entry in entries.flatten() {
            let dir = entry.path();
            let state: Option<StateFile> = std::fs::read(dir.join("state.json"))
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok());
            if let Some(state) = &state {
                if let Some(pid) = state.vmm_pid
                    && process_mentions(pid, &state.sandbox_id.to_string())
                {
                    tracing::warn!(sandbox = %state.sandbox_id, pid, "killing a VMM left by a previous run");
                    kill_and_wait(pid).await;
                    report.processes += 1;
                }
                if let Some(slot) = state.slot {
                    if let Err(e) = SandboxNet::teardown_addrs(&SlotAddrs::new(slot)).await {
                        tracing::error!(slot, error = %e, "removing a leftover network");
                    }
                    let _ = slots.release(slot);
                    report.networks += 1;
                }
                if let Some(mem) = &state.mem_dir {
                    let _ = std::fs::remove_dir_all(mem);
                }
            }
            if std::fs::remove_dir_all(&dir).is_ok() {
                report.directories += 1;
            }
        }
    }
    // Slots whose sandbox directory was already gone.
    if let Ok(owned) = slots.owned() {
        for (slot, holder) in owned {
            tracing::warn!(slot, holder = %holder, "removing a leftover network slot");
            if let Err(e) = SandboxNet::teardown_addrs(&SlotAddrs::new(slot)).await {
                tracing::error!(slot, error = %e, "removing a leftover network");
            }
            let _ = slots.release(slot);
            report.networks += 1;
        }
    }
    let _ = std::fs::remove_dir_all(mem_root);
    if report != CleanupReport::default() {
        tracing::warn!(?report, "cleaned up after a previous run");
    }
    report
}
