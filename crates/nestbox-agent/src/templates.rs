//! Templates made from sandboxes, stored on this host.
//!
//! ```text
//! <root>/<tpl-id>/template.json   our record (format version, kind, machine, token)
//! <root>/<tpl-id>/rootfs.ext4     the disk, flattened: a standalone sparse raw image
//! <root>/<tpl-id>/snapshot.json   (snapshot kind) the VMM's manifest
//! <root>/<tpl-id>/state.bin       (snapshot kind) device state
//! <root>/<tpl-id>/memory.ram      (snapshot kind) frozen guest RAM, mapped MAP_PRIVATE by clones
//! ```
//!
//! Invariants: a template directory is complete or absent — it is built under
//! `<root>/.staging-<id>` and renamed into place, and `template.json` is written last;
//! files of a snapshot template never change after the rename (clones map its memory
//! privately and use its disk as the backing file of their overlays); deleting a template
//! removes its directory entirely, so no generation is ever left behind.
//!
//! The same store, rooted elsewhere, holds the agent's *warm* snapshots of its built-in
//! image templates (a freshly booted guest, so the default create restores instead of
//! booting); they are keyed by everything they depend on and shared by every agent on the
//! machine.

use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use nestbox_types::{SandboxId, TemplateId};

use crate::error::AgentError;

/// Format version of `template.json`.
pub const TEMPLATE_FORMAT: u32 = 1;
/// Our record's file name.
pub const RECORD_FILE: &str = "template.json";
/// The flattened disk's file name.
pub const ROOTFS_FILE: &str = "rootfs.ext4";

/// What a template holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// A root filesystem: sandboxes boot from it.
    Image,
    /// Memory, devices and disk: sandboxes restore from it.
    Snapshot,
}

impl Kind {
    /// Wire spelling.
    pub fn as_str(&self) -> &'static str {
        match self {
            Kind::Image => "image",
            Kind::Snapshot => "snapshot",
        }
    }
}

/// `template.json`.
#[derive(Clone, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TemplateRecord {
    /// [`TEMPLATE_FORMAT`].
    pub format_version: u32,
    /// Key of the template in its store (a `tpl-…` id, or a warm key).
    pub key: String,
    /// What it holds.
    pub kind: Kind,
    /// Name of the built-in template it derives from (kernel and base image).
    pub base_template: String,
    /// vCPUs of the frozen machine (snapshot kind; a default for image kind).
    pub vcpus: u32,
    /// Memory of the frozen machine, MiB (snapshot kind; a default for image kind).
    pub memory_mb: u32,
    /// The disk size the guest saw (snapshot kind) or the smallest disk that fits (image
    /// kind), MiB.
    pub disk_size_mb: u32,
    /// Kernel release it runs with.
    pub kernel_version: String,
    /// The access token the frozen guest agent holds (snapshot kind): a clone's first
    /// `/init` must present it to install the clone's own token. Secret.
    pub access_token: Option<String>,
    /// Bytes its files take on the host.
    pub size_bytes: u64,
    /// When it was made.
    pub created_at: DateTime<Utc>,
    /// A move package of this paused sandbox (see the agent's `ExportSandbox`), not a
    /// template: never listed, never started from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub move_of: Option<SandboxId>,
}

impl std::fmt::Debug for TemplateRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TemplateRecord")
            .field("key", &self.key)
            .field("kind", &self.kind)
            .field("vcpus", &self.vcpus)
            .field("memory_mb", &self.memory_mb)
            .field("disk_size_mb", &self.disk_size_mb)
            .finish_non_exhaustive()
    }
}

/// A template located on disk.
#[derive(Debug, Clone)]
pub struct StoredTemplate {
    /// Its directory.
    pub dir: PathBuf,
    /// Its record.
    pub record: TemplateRecord,
}

impl StoredTemplate {
    /// The flattened disk.
    pub fn rootfs(&self) -> PathBuf {
        self.dir.join(ROOTFS_FILE)
    }
}

/// A directory of templates.
#[derive(Debug, Clone)]
pub struct TemplateStore {
    root: PathBuf,
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> AgentError {
    let path = path.to_path_buf();
    move |e| AgentError::Internal(format!("{what} {}: {e}", path.display()))
}

impl TemplateStore {
    /// A store under `root` (created if missing).
    pub fn new(root: impl Into<PathBuf>) -> Result<Self, AgentError> {
        let root = root.into();
        std::fs::create_dir_all(&root).map_err(io("creating", &root))?;
        Ok(Self { root })
    }

    /// The store's directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where the template keyed `key` lives.
    pub fn dir(&self, key: &str) -> PathBuf {
        self.root.join(key)
    }

    /// A template by key.
    pub fn get(&self, key: &str) -> Result<StoredTemplate, AgentError> {
        let dir = self.dir(key);
        let bytes = match std::fs::read(dir.join(RECORD_FILE)) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(AgentError::TemplateNotFound(key.to_string()));
            }
            Err(e) => return Err(io("reading", &dir)(e)),
        };
        let record: TemplateRecord = serde_json::from_slice(&bytes)
            .map_err(|e| AgentError::Internal(format!("template {key}: unreadable record: {e}")))?;
        if record.format_version != TEMPLATE_FORMAT {
            return Err(AgentError::Internal(format!(
                "template {key}: record format {} is not supported (expected {TEMPLATE_FORMAT})",
                record.format_version
            )));
        }
        Ok(StoredTemplate { dir, record })
    }

    /// A template by id.
    pub fn get_id(&self, id: TemplateId) -> Result<StoredTemplate, AgentError> {
        self.get(&id.to_string())
    }

    /// A fresh staging directory for building the template keyed `key`.
    pub fn staging(&self, key: &str) -> Result<PathBuf, AgentError> {
        let dir = self.root.join(format!(".staging-{key}"));
        if dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(io("clearing", &dir))?;
        }
        std::fs::create_dir_all(&dir).map_err(io("creating", &dir))?;
        Ok(dir)
    }

    /// Writes the record into the staging directory and moves it into place. Fails if a
    /// template with that key exists.
    pub fn commit(
        &self,
        staging: &Path,
        mut record: TemplateRecord,
    ) -> Result<StoredTemplate, AgentError> {
        record.size_bytes = allocated_bytes(staging);
        let bytes =
            serde_json::to_vec_pretty(&record).map_err(|e| AgentError::Internal(e.to_string()))?;
        let path = staging.join(RECORD_FILE);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(io("writing", &path))?;
        std::io::Write::write_all(&mut f, &bytes).map_err(io("writing", &path))?;
        f.sync_all().map_err(io("writing", &path))?;
        let dir = self.dir(&record.key);
        if dir.exists() {
            return Err(AgentError::Invalid(format!(
                "template {} already exists on this host",
                record.key
            )));
        }
        std::fs::rename(staging, &dir).map_err(io("moving into place", &dir))?;
        Ok(StoredTemplate { dir, record })
    }

    /// Deletes a template. `false` if there was none.
    pub fn delete(&self, key: &str) -> Result<bool, AgentError> {
        let dir = self.dir(key);
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(io("deleting", &dir)(e)),
        }
    }

    /// Every complete template (move packages left out).
    pub fn list(&self) -> Vec<StoredTemplate> {
        let mut out: Vec<StoredTemplate> = self
            .all()
            .into_iter()
            .filter(|t| t.record.move_of.is_none())
            .collect();
        out.sort_by(|a, b| a.record.key.cmp(&b.record.key));
        out
    }

    /// Every complete template and move package.
    fn all(&self) -> Vec<StoredTemplate> {
        let Ok(rd) = std::fs::read_dir(&self.root) else {
            return Vec::new();
        };
        rd.flatten()
            .filter_map(|e| e.file_name().to_str().map(String::from))
            .filter(|name| !name.starts_with('.'))
            .filter_map(|name| self.get(&name).ok())
            .collect()
    }

    /// Removes move packages made more than `max_age` ago (a move that never finished:
    /// its control plane went away). Returns how many.
    pub fn sweep_moves(&self, max_age: std::time::Duration) -> usize {
        let Ok(age) = chrono::Duration::from_std(max_age) else {
            return 0;
        };
        let before = Utc::now() - age;
        self.all()
            .into_iter()
            .filter(|t| t.record.move_of.is_some() && t.record.created_at < before)
            .filter(|t| std::fs::remove_dir_all(&t.dir).is_ok())
            .count()
    }

    /// Removes staging directories left by a crash.
    pub fn clean_staging(&self) {
        if let Ok(rd) = std::fs::read_dir(&self.root) {
            for e in rd.flatten() {
                if e.file_name().to_string_lossy().starts_with(".staging-") {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
    }
}

/// Bytes allocated on the host by the files under `dir`.
pub fn allocated_bytes(dir: &Path) -> u64 {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return 0;
    };
    rd.flatten()
        .filter_map(|e| e.metadata().ok())
        .map(|m| {
            use std::os::unix::fs::MetadataExt;
            m.blocks() * 512
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(key: &str) -> TemplateRecord {
        TemplateRecord {
            format_version: TEMPLATE_FORMAT,
            key: key.into(),
            kind: Kind::Snapshot,
            base_template: "minimal".into(),
            vcpus: 1,
            memory_mb: 512,
            disk_size_mb: 5120,
            kernel_version: "6.1".into(),
            access_token: Some("secret-token-value".into()),
            size_bytes: 0,
            created_at: Utc::now(),
            move_of: None,
        }
    }

    #[test]
    fn staged_templates_appear_whole_and_delete_completely() {
        let dir = tempfile::tempdir().unwrap();
        let store = TemplateStore::new(dir.path()).unwrap();
        let staging = store.staging("tpl-a").unwrap();
        std::fs::write(staging.join(ROOTFS_FILE), vec![1u8; 8192]).unwrap();
        assert!(
            store.get("tpl-a").is_err(),
            "a staged template is not visible"
        );
        assert!(store.list().is_empty());
        let t = store.commit(&staging, record("tpl-a")).unwrap();
        assert!(t.record.size_bytes >= 8192);
        assert_eq!(store.get("tpl-a").unwrap().record.vcpus, 1);
        assert_eq!(store.list().len(), 1);
        let again = store.staging("tpl-a").unwrap();
        assert!(
            store.commit(&again, record("tpl-a")).is_err(),
            "no silent overwrite"
        );
        store.clean_staging();
        assert!(store.delete("tpl-a").unwrap());
        assert!(!store.delete("tpl-a").unwrap());
        assert!(matches!(
            store.get("tpl-a"),
            Err(AgentError::TemplateNotFound(_))
        ));
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            0,
            "nothing left"
        );
    }

    #[test]
    fn unknown_formats_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = TemplateStore::new(dir.path()).unwrap();
        let staging = store.staging("k").unwrap();
        let mut r = record("k");
        r.format_version = 99;
        store.commit(&staging, r).unwrap();
        let err = store.get("k").unwrap_err().to_string();
        assert!(err.contains("format 99"), "{err}");
    }
}
