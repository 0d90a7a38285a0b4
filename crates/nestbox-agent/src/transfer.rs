//! Templates copied between hosts: this host's side of a copy the control plane relays
//! (hosts never connect to each other; see `docs/ARCHITECTURE.md`).
//!
//! As a **source**, it describes a template it holds — its record and each file's size and
//! digest, computed once and kept in `digests.json` beside the files, which never change —
//! and streams a file's blocks from an offset, leaving out blocks of zeros.
//!
//! As a **destination**, it receives into `<store>/.import-<id>/`:
//!
//! ```text
//! manifest.pb     the manifest the copy is for (a different one starts the copy over)
//! progress.json   per file: every block before this offset is written and synced
//! <files>         sparse, at their full length from the start
//! ```
//!
//! and commits by checking every file's digest against the manifest, then moving the
//! directory into place as [`TemplateStore::commit`] does for a template made here.
//!
//! Invariants:
//! - a template appears on this host whole and checked, or not at all;
//! - a copy cut short (the connection, the control plane, this agent) resumes from each
//!   file's last synced offset; a file that fails its digest is copied again from the start;
//! - a digest depends only on a file's content, never on its layout on disk
//!   ([`DIGEST_SCHEME`]), so a sparse copy and its source agree;
//! - one operation at a time per template (a per-id lock): two relays of the same copy
//!   cannot interleave their writes with a commit.
//!
//! Everything here but the lock blocks: callers run it on `spawn_blocking`.

use std::collections::{BTreeMap, HashMap};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nestbox_proto::hostagent::{TemplateFile, TemplateManifest};
use nestbox_types::TemplateId;
use nestbox_vmm::snapshot::files::next_data;
use prost::Message;
use sha2::{Digest, Sha256};

use crate::error::AgentError;
use crate::templates::{
    RECORD_FILE, StoredTemplate, TEMPLATE_FORMAT, TemplateRecord, TemplateStore,
};

/// Unit of reading, digesting and sending: 1 MiB.
pub const BLOCK: u64 = 1 << 20;
/// How file digests are computed: SHA-256 over every block holding a non-zero byte, each
/// preceded by its index (u64, little endian).
pub const DIGEST_SCHEME: &str = "sha256-blocks-1m-v1";
/// The digest cache in a template's directory.
const DIGESTS_FILE: &str = "digests.json";
/// Prefix of a copy's directory in the store.
const IMPORT_PREFIX: &str = ".import-";
const MANIFEST_FILE: &str = "manifest.pb";
const PROGRESS_FILE: &str = "progress.json";
/// A copy syncs its file and records its progress after this many bytes.
const SYNC_EVERY: u64 = 64 << 20;
/// A copy must leave this much of the disk free.
const RESERVE: u64 = 256 << 20;
/// Largest file a copy accepts.
const MAX_FILE: u64 = 1 << 40;
/// An unfinished copy untouched this long is removed at start-up.
pub const STALE_IMPORT: Duration = Duration::from_secs(24 * 3600);

fn io_err(what: &str, path: &Path) -> impl FnOnce(io::Error) -> AgentError {
    let what = format!("{what} {}", path.display());
    move |e| {
        if e.raw_os_error() == Some(libc::ENOSPC) {
            AgentError::NoDiskSpace {
                what: "copying a template".into(),
                cause: e.to_string(),
            }
        } else {
            AgentError::Internal(format!("{what}: {e}"))
        }
    }
}

/// Whether `name` is a file a template copy may carry.
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name != RECORD_FILE
        && name != DIGESTS_FILE
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

fn is_zero(b: &[u8]) -> bool {
    b.iter().fold(0u8, |acc, x| acc | x) == 0
}

/// Calls `f` with every block of `file` at or after `from` (a multiple of [`BLOCK`]) that
/// holds a non-zero byte, in increasing order. Holes are skipped without reading them.
pub fn for_each_block(
    file: &File,
    from: u64,
    mut f: impl FnMut(u64, &[u8]) -> io::Result<()>,
) -> io::Result<()> {
    let size = file.metadata()?.len();
    let mut buf = vec![0u8; BLOCK as usize];
    let mut next = from - from % BLOCK;
    while let Some((start, end)) = next_data(file, next, size)? {
        let mut block = start / BLOCK * BLOCK;
        while block < end {
            let len = usize::try_from(BLOCK.min(size - block)).unwrap_or(BLOCK as usize);
            file.read_exact_at(&mut buf[..len], block)?;
            if !is_zero(&buf[..len]) {
                f(block, &buf[..len])?;
            }
            block += BLOCK;
        }
        next = block;
    }
    Ok(())
}

/// A file's length, bytes in non-zero blocks, and digest ([`DIGEST_SCHEME`]).
pub fn digest_file(path: &Path) -> io::Result<(u64, u64, String)> {
    let file = File::open(path)?;
    let size = file.metadata()?.len();
    let mut hash = Sha256::new();
    let mut data = 0u64;
    for_each_block(&file, 0, |offset, block| {
        hash.update((offset / BLOCK).to_le_bytes());
        hash.update(block);
        data += block.len() as u64;
        Ok(())
    })?;
    Ok((
        size,
        data,
        format!("{DIGEST_SCHEME}:{}", hex::encode(hash.finalize())),
    ))
}

/// One entry of `digests.json`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct CachedDigest {
    name: String,
    size: u64,
    mtime_ns: i128,
    data_bytes: u64,
    digest: String,
}

fn mtime_ns(m: &std::fs::Metadata) -> i128 {
    i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec())
}

/// Digests of the files in `dir` (cached in its `digests.json` where still valid).
fn file_digests(dir: &Path) -> Result<Vec<CachedDigest>, AgentError> {
    let cache_path = dir.join(DIGESTS_FILE);
    let cached: Vec<CachedDigest> = std::fs::read(&cache_path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map_err(io_err("listing", dir))?
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
        .filter_map(|e| e.file_name().to_str().map(String::from))
        .filter(|n| valid_name(n))
        .collect();
    names.sort();
    let mut out = Vec::with_capacity(names.len());
    let mut computed = false;
    for name in names {
        let path = dir.join(&name);
        let meta = std::fs::metadata(&path).map_err(io_err("reading", &path))?;
        let mtime = mtime_ns(&meta);
        if let Some(c) = cached
            .iter()
            .find(|c| c.name == name && c.size == meta.len() && c.mtime_ns == mtime)
        {
            out.push(c.clone());
            continue;
        }
        let (size, data_bytes, digest) = digest_file(&path).map_err(io_err("reading", &path))?;
        computed = true;
        out.push(CachedDigest {
            name,
            size,
            mtime_ns: mtime,
            data_bytes,
            digest,
        });
    }
    if computed {
        // Only a cache: a host that cannot write it digests again next time.
        if let Err(e) = write_json(&cache_path, &out) {
            tracing::debug!(dir = %dir.display(), error = %e, "digest cache not written");
        }
    }
    Ok(out)
}

/// Writes `value` as JSON to `path` atomically (a temporary file, synced, renamed).
fn write_json<T: serde::Serialize>(path: &Path, value: &T) -> Result<(), AgentError> {
    let bytes = serde_json::to_vec(value).map_err(|e| AgentError::Internal(e.to_string()))?;
    write_atomic(path, &bytes)
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), AgentError> {
    let tmp = path.with_extension("tmp");
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io_err("writing", &tmp))?;
    io::Write::write_all(&mut f, bytes).map_err(io_err("writing", &tmp))?;
    f.sync_all().map_err(io_err("writing", &tmp))?;
    std::fs::rename(&tmp, path).map_err(io_err("writing", path))
}

/// What a held template is made of, for a copy to another host.
pub fn manifest(t: &StoredTemplate) -> Result<TemplateManifest, AgentError> {
    let record_path = t.dir.join(RECORD_FILE);
    let record = std::fs::read(&record_path).map_err(io_err("reading", &record_path))?;
    let files = file_digests(&t.dir)?
        .into_iter()
        .map(|d| TemplateFile {
            name: d.name,
            size: d.size,
            data_bytes: d.data_bytes,
            digest: d.digest,
        })
        .collect();
    Ok(TemplateManifest {
        template_id: t.record.key.clone(),
        record,
        files,
    })
}

/// The path of a held template's file `name`, and its length.
pub fn export_file(t: &StoredTemplate, name: &str) -> Result<(PathBuf, u64), AgentError> {
    if !valid_name(name) {
        return Err(AgentError::Invalid(format!(
            "`{name}` is not a file of a template"
        )));
    }
    let path = t.dir.join(name);
    match std::fs::metadata(&path) {
        Ok(m) if m.is_file() => Ok((path, m.len())),
        Ok(_) => Err(AgentError::Invalid(format!(
            "template {} has no file `{name}`",
            t.record.key
        ))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Err(AgentError::Invalid(format!(
            "template {} has no file `{name}`",
            t.record.key
        ))),
        Err(e) => Err(io_err("reading", &path)(e)),
    }
}

/// A checked manifest: what a copy to this host is for.
struct Wanted {
    id: TemplateId,
    record: TemplateRecord,
    files: Vec<TemplateFile>,
    encoded: Vec<u8>,
}

fn check_manifest(m: &TemplateManifest) -> Result<Wanted, AgentError> {
    let id: TemplateId = m
        .template_id
        .parse()
        .map_err(|e: nestbox_types::IdParseError| AgentError::Invalid(e.to_string()))?;
    let record: TemplateRecord = serde_json::from_slice(&m.record)
        .map_err(|e| AgentError::Invalid(format!("template {id}: unreadable record: {e}")))?;
    if record.format_version != TEMPLATE_FORMAT {
        return Err(AgentError::Invalid(format!(
            "template {id}: record format {} is not supported here (expected {TEMPLATE_FORMAT})",
            record.format_version
        )));
    }
    if record.key != id.to_string() {
        return Err(AgentError::Invalid(format!(
            "the record is of template {}, not {id}",
            record.key
        )));
    }
    let mut seen = std::collections::HashSet::new();
    for f in &m.files {
        if !valid_name(&f.name) || !seen.insert(f.name.as_str()) {
            return Err(AgentError::Invalid(format!(
                "template {id}: `{}` cannot be a template file (or is named twice)",
                f.name
            )));
        }
        if f.size > MAX_FILE || f.data_bytes > f.size {
            return Err(AgentError::Invalid(format!(
                "template {id}: file `{}` has an impossible size",
                f.name
            )));
        }
        if !f.digest.starts_with(&format!("{DIGEST_SCHEME}:")) {
            return Err(AgentError::Invalid(format!(
                "template {id}: file `{}` has a digest of an unknown kind",
                f.name
            )));
        }
    }
    Ok(Wanted {
        id,
        record,
        files: m.files.clone(),
        encoded: m.encode_to_vec(),
    })
}

/// Where each file of a copy stands.
type Progress = BTreeMap<String, u64>;

/// The receiving side of copies, over this host's template store.
pub struct Imports {
    store: TemplateStore,
    locks: Mutex<HashMap<TemplateId, Arc<tokio::sync::Mutex<()>>>>,
}

impl std::fmt::Debug for Imports {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Imports")
            .field("store", &self.store.root())
            .finish_non_exhaustive()
    }
}

/// How a copy to this host begins.
#[derive(Debug, PartialEq, Eq)]
pub struct Begun {
    /// Where each file's copy stands, in the manifest's order.
    pub resume_at: Vec<u64>,
    /// The template is already here.
    pub present: bool,
}

impl Imports {
    /// Copies into `store`.
    pub fn new(store: TemplateStore) -> Self {
        Self {
            store,
            locks: Mutex::new(HashMap::new()),
        }
    }

    /// The lock of template `id`'s copy: held across each operation on it.
    pub async fn lock(&self, id: TemplateId) -> tokio::sync::OwnedMutexGuard<()> {
        let lock = {
            let mut locks = self.locks.lock().unwrap_or_else(|p| p.into_inner());
            locks.entry(id).or_default().clone()
        };
        lock.lock_owned().await
    }

    fn dir(&self, id: TemplateId) -> PathBuf {
        self.store.root().join(format!("{IMPORT_PREFIX}{id}"))
    }

    fn progress(&self, id: TemplateId) -> Progress {
        std::fs::read(self.dir(id).join(PROGRESS_FILE))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    fn save_progress(&self, id: TemplateId, p: &Progress) -> Result<(), AgentError> {
        write_json(&self.dir(id).join(PROGRESS_FILE), p)
    }

    fn wanted(&self, id: TemplateId) -> Result<Wanted, AgentError> {
        let path = self.dir(id).join(MANIFEST_FILE);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(AgentError::Invalid(format!(
                    "no copy of template {id} is under way on this host"
                )));
            }
            Err(e) => return Err(io_err("reading", &path)(e)),
        };
        let m = TemplateManifest::decode(bytes.as_slice())
            .map_err(|e| AgentError::Internal(format!("{}: {e}", path.display())))?;
        check_manifest(&m)
    }

    /// Starts or resumes a copy. `kernel_ok` says whether this host has the kernel a
    /// template needs; `free` is the free space of the store's filesystem, bytes.
    pub fn begin(
        &self,
        m: &TemplateManifest,
        kernel_ok: impl Fn(&str) -> bool,
        free: u64,
    ) -> Result<Begun, AgentError> {
        let w = check_manifest(m)?;
        if self.store.get_id(w.id).is_ok() {
            return Ok(Begun {
                resume_at: w.files.iter().map(|f| f.size).collect(),
                present: true,
            });
        }
        if !kernel_ok(&w.record.kernel_version) {
            return Err(AgentError::Invalid(format!(
                "template {} needs kernel {}, which this host does not have",
                w.id, w.record.kernel_version
            )));
        }
        let dir = self.dir(w.id);
        let same = std::fs::read(dir.join(MANIFEST_FILE)).is_ok_and(|b| b == w.encoded);
        if !same {
            if dir.exists() {
                std::fs::remove_dir_all(&dir).map_err(io_err("clearing", &dir))?;
            }
            std::fs::create_dir_all(&dir).map_err(io_err("creating", &dir))?;
            for f in &w.files {
                let path = dir.join(&f.name);
                let file = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&path)
                    .map_err(io_err("creating", &path))?;
                file.set_len(f.size).map_err(io_err("sizing", &path))?;
            }
            self.save_progress(w.id, &Progress::new())?;
            write_atomic(&dir.join(MANIFEST_FILE), &w.encoded)?;
        }
        let progress = self.progress(w.id);
        let have = crate::templates::allocated_bytes(&dir);
        let need = w
            .files
            .iter()
            .map(|f| f.data_bytes)
            .sum::<u64>()
            .saturating_sub(have);
        if need.saturating_add(RESERVE) > free {
            return Err(AgentError::NoDiskSpace {
                what: format!("copying template {}", w.id),
                cause: format!(
                    "it needs {} MiB more, {} MiB are free",
                    need >> 20,
                    free >> 20
                ),
            });
        }
        Ok(Begun {
            resume_at: w
                .files
                .iter()
                .map(|f| progress.get(&f.name).copied().unwrap_or(0).min(f.size))
                .collect(),
            present: false,
        })
    }

    /// Opens file `name` of template `id`'s copy for writing from where it stands.
    pub fn open(&self, id: TemplateId, name: &str) -> Result<FileWriter<'_>, AgentError> {
        let w = self.wanted(id)?;
        let entry = w.files.iter().find(|f| f.name == name).ok_or_else(|| {
            AgentError::Invalid(format!("template {id} has no file `{name}` to copy"))
        })?;
        let path = self.dir(id).join(name);
        let file = OpenOptions::new()
            .write(true)
            .open(&path)
            .map_err(io_err("opening", &path))?;
        let at = self.progress(id).get(name).copied().unwrap_or(0);
        Ok(FileWriter {
            imports: self,
            id,
            name: name.to_string(),
            size: entry.size,
            file,
            started: false,
            at,
            synced: at,
        })
    }

    /// Checks every file of template `id`'s copy and puts the template in place.
    pub fn commit(&self, id: TemplateId) -> Result<StoredTemplate, AgentError> {
        if let Ok(t) = self.store.get_id(id) {
            self.discard(id);
            return Ok(t);
        }
        let w = self.wanted(id)?;
        let dir = self.dir(id);
        let mut progress = self.progress(id);
        if let Some(f) = w
            .files
            .iter()
            .find(|f| progress.get(&f.name).copied().unwrap_or(0) < f.size)
        {
            return Err(AgentError::Invalid(format!(
                "the copy of template {id} is not complete (file `{}`)",
                f.name
            )));
        }
        let mut digests = Vec::with_capacity(w.files.len());
        for f in &w.files {
            let path = dir.join(&f.name);
            let (size, data_bytes, digest) =
                digest_file(&path).map_err(io_err("reading", &path))?;
            if size != f.size || digest != f.digest {
                // Copied again from the start next time.
                std::fs::remove_file(&path).map_err(io_err("removing", &path))?;
                let file = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&path)
                    .map_err(io_err("creating", &path))?;
                file.set_len(f.size).map_err(io_err("sizing", &path))?;
                progress.insert(f.name.clone(), 0);
                self.save_progress(id, &progress)?;
                return Err(AgentError::Internal(format!(
                    "file `{}` of template {id} arrived damaged (its digest differs); copy it again",
                    f.name
                )));
            }
            let meta = std::fs::metadata(&path).map_err(io_err("reading", &path))?;
            digests.push(CachedDigest {
                name: f.name.clone(),
                size,
                mtime_ns: mtime_ns(&meta),
                data_bytes,
                digest,
            });
        }
        write_json(&dir.join(DIGESTS_FILE), &digests)?;
        for name in [MANIFEST_FILE, PROGRESS_FILE] {
            let path = dir.join(name);
            std::fs::remove_file(&path).map_err(io_err("removing", &path))?;
        }
        let stored = self.store.commit(&dir, w.record)?;
        if let Ok(mut locks) = self.locks.lock() {
            locks.remove(&id);
        }
        Ok(stored)
    }

    /// Removes what an unfinished copy of template `id` wrote.
    pub fn discard(&self, id: TemplateId) {
        let dir = self.dir(id);
        if let Err(e) = std::fs::remove_dir_all(&dir)
            && e.kind() != io::ErrorKind::NotFound
        {
            tracing::warn!(dir = %dir.display(), error = %e, "removing an unfinished template copy");
        }
    }

    /// Removes unfinished copies nobody touched for `older_than`.
    pub fn sweep(&self, older_than: Duration) -> usize {
        let Ok(rd) = std::fs::read_dir(self.store.root()) else {
            return 0;
        };
        let mut removed = 0;
        for e in rd.flatten() {
            if !e.file_name().to_string_lossy().starts_with(IMPORT_PREFIX) {
                continue;
            }
            let touched = std::fs::metadata(e.path().join(PROGRESS_FILE))
                .or_else(|_| e.metadata())
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok());
            if touched.is_none_or(|age| age >= older_than)
                && std::fs::remove_dir_all(e.path()).is_ok()
            {
                removed += 1;
            }
        }
        removed
    }
}

/// Writes the blocks of one file of a copy (see [`Imports::open`]).
pub struct FileWriter<'a> {
    imports: &'a Imports,
    id: TemplateId,
    name: String,
    size: u64,
    file: File,
    started: bool,
    /// Every block before this is written.
    at: u64,
    /// Every block before this is synced and recorded.
    synced: u64,
}

impl FileWriter<'_> {
    /// Where this file's copy stands.
    pub fn position(&self) -> u64 {
        self.at
    }

    /// Takes the next block. The first one must be at the position the copy stands at
    /// (empty data: "from here"); then blocks in increasing order; an empty one at the
    /// file's length ends it. Returns whether the file is now whole.
    pub fn put(&mut self, offset: u64, data: &[u8]) -> Result<bool, AgentError> {
        let bad = |why: String| Err(AgentError::Invalid(format!("template {}: {why}", self.id)));
        if !self.started {
            if offset != self.at {
                return bad(format!(
                    "the copy of `{}` stands at {}, not {offset}",
                    self.name, self.at
                ));
            }
            self.started = true;
        }
        if offset < self.at || (!offset.is_multiple_of(BLOCK) && offset != self.size) {
            return bad(format!(
                "block at {offset} of `{}` is out of order",
                self.name
            ));
        }
        if data.is_empty() {
            if offset == self.size {
                self.at = self.size;
                self.sync()?;
                return Ok(true);
            }
            self.at = offset;
            return Ok(false);
        }
        if offset == self.size {
            return bad(format!("block at {offset} of `{}` does not fit", self.name));
        }
        if data.len() as u64 > BLOCK || offset + data.len() as u64 > self.size {
            return bad(format!("block at {offset} of `{}` does not fit", self.name));
        }
        let path = self.imports.dir(self.id).join(&self.name);
        self.file
            .write_all_at(data, offset)
            .map_err(io_err("writing", &path))?;
        self.at = offset + data.len() as u64;
        if self.at - self.synced >= SYNC_EVERY {
            self.sync()?;
        }
        Ok(false)
    }

    /// Syncs what was written and records how far the copy stands.
    pub fn sync(&mut self) -> Result<u64, AgentError> {
        if self.at > self.synced {
            let path = self.imports.dir(self.id).join(&self.name);
            self.file.sync_data().map_err(io_err("syncing", &path))?;
            let mut progress = self.imports.progress(self.id);
            progress.insert(self.name.clone(), self.at);
            self.imports.save_progress(self.id, &progress)?;
            self.synced = self.at;
        }
        Ok(self.synced)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Utc;

    fn record(key: &str) -> TemplateRecord {
        TemplateRecord {
            format_version: TEMPLATE_FORMAT,
            key: key.into(),
            kind: crate::templates::Kind::Snapshot,
            base_template: "minimal".into(),
            vcpus: 1,
            memory_mb: 512,
            disk_size_mb: 64,
            kernel_version: "6.1".into(),
            access_token: Some("secret".into()),
            size_bytes: 0,
            created_at: Utc::now(),
            move_of: None,
        }
    }

    /// A sparse file of `size` with `fill` bytes written at each of `at`.
    fn sparse(path: &Path, size: u64, at: &[(u64, u8)]) {
        let f = File::create(path).unwrap();
        f.set_len(size).unwrap();
        for &(offset, fill) in at {
            f.write_all_at(&[fill; 4096], offset).unwrap();
        }
    }

    /// A template with a sparse disk and a memory file, committed into `store`.
    fn made(store: &TemplateStore, id: TemplateId) -> StoredTemplate {
        let staging = store.staging(&id.to_string()).unwrap();
        sparse(
            &staging.join("rootfs.ext4"),
            40 * BLOCK + 123,
            &[(0, 1), (3 * BLOCK + 17, 2), (40 * BLOCK, 3)],
        );
        sparse(
            &staging.join("memory.ram"),
            8 * BLOCK,
            &[(BLOCK, 9), (5 * BLOCK, 0)],
        );
        std::fs::write(staging.join("state.bin"), b"device state").unwrap();
        store.commit(&staging, record(&id.to_string())).unwrap()
    }

    /// Copies template `id` from `from` to `to` the way the control plane relays it, each
    /// file's stream cut after `cut` blocks the first time.
    fn relay(from: &StoredTemplate, to: &Imports, cut: Option<usize>) -> StoredTemplate {
        let m = manifest(from).unwrap();
        let id: TemplateId = m.template_id.parse().unwrap();
        for round in 0..2 {
            let begun = to.begin(&m, |_| true, u64::MAX).unwrap();
            for (f, at) in m.files.iter().zip(begun.resume_at) {
                if at == f.size {
                    continue;
                }
                let (path, size) = export_file(from, &f.name).unwrap();
                let mut w = to.open(id, &f.name).unwrap();
                w.put(at, &[]).unwrap();
                let file = File::open(path).unwrap();
                let mut sent = 0;
                let mut whole = true;
                for_each_block(&file, at, |offset, block| {
                    if round == 0 && cut.is_some_and(|c| sent == c) {
                        whole = false;
                        return Err(io::Error::other("cut"));
                    }
                    w.put(offset, block).unwrap();
                    sent += 1;
                    Ok(())
                })
                .ok();
                if whole {
                    assert!(w.put(size, &[]).unwrap());
                } else {
                    w.sync().unwrap();
                }
            }
            if round == 0 && cut.is_some() {
                continue;
            }
            return to.commit(id).unwrap();
        }
        to.commit(id).unwrap()
    }

    #[test]
    fn digests_ignore_layout_and_see_content() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a");
        let b = dir.path().join("b");
        sparse(&a, 4 * BLOCK, &[(BLOCK, 7)]);
        // The same content with its zeros written out rather than left as holes.
        let mut content = vec![0u8; (4 * BLOCK) as usize];
        content[BLOCK as usize..BLOCK as usize + 4096].fill(7);
        std::fs::write(&b, &content).unwrap();
        let (size, data, digest) = digest_file(&a).unwrap();
        assert_eq!((size, data), (4 * BLOCK, BLOCK));
        assert_eq!(digest_file(&b).unwrap().2, digest);
        content[10] = 1;
        std::fs::write(&b, &content).unwrap();
        assert_ne!(digest_file(&b).unwrap().2, digest);
        assert!(digest.starts_with(DIGEST_SCHEME));
    }

    #[test]
    fn a_copy_arrives_whole_and_sparse() {
        let dir = tempfile::tempdir().unwrap();
        let src = TemplateStore::new(dir.path().join("src")).unwrap();
        let dst = Imports::new(TemplateStore::new(dir.path().join("dst")).unwrap());
        let id = TemplateId::new();
        let from = made(&src, id);
        let to = relay(&from, &dst, None);
        assert_eq!(to.record.key, id.to_string());
        assert_eq!(to.record.access_token.as_deref(), Some("secret"));
        for name in ["rootfs.ext4", "memory.ram", "state.bin"] {
            assert_eq!(
                std::fs::read(from.dir.join(name)).unwrap(),
                std::fs::read(to.dir.join(name)).unwrap(),
                "{name}"
            );
        }
        assert!(
            crate::templates::allocated_bytes(&to.dir) < 8 * BLOCK,
            "holes stay holes"
        );
        // The copy is a source in turn, with its digests already known.
        assert_eq!(manifest(&to).unwrap().files, manifest(&from).unwrap().files);
        assert_eq!(
            dst.begin(&manifest(&from).unwrap(), |_| true, u64::MAX)
                .unwrap(),
            Begun {
                resume_at: manifest(&from)
                    .unwrap()
                    .files
                    .iter()
                    .map(|f| f.size)
                    .collect(),
                present: true
            }
        );
    }

    #[test]
    fn a_cut_copy_resumes_where_it_stood() {
        let dir = tempfile::tempdir().unwrap();
        let src = TemplateStore::new(dir.path().join("src")).unwrap();
        let dst = Imports::new(TemplateStore::new(dir.path().join("dst")).unwrap());
        let id = TemplateId::new();
        let from = made(&src, id);
        let to = relay(&from, &dst, Some(1));
        assert_eq!(
            std::fs::read(from.dir.join("rootfs.ext4")).unwrap(),
            std::fs::read(to.dir.join("rootfs.ext4")).unwrap()
        );
        let names: Vec<_> = std::fs::read_dir(dir.path().join("dst"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(
            names,
            vec![std::ffi::OsString::from(id.to_string())],
            "no copy left"
        );
    }

    #[test]
    fn a_damaged_file_is_refused_and_copied_again() {
        let dir = tempfile::tempdir().unwrap();
        let src = TemplateStore::new(dir.path().join("src")).unwrap();
        let dst = Imports::new(TemplateStore::new(dir.path().join("dst")).unwrap());
        let id = TemplateId::new();
        let from = made(&src, id);
        let mut m = manifest(&from).unwrap();
        let state = m.files.iter_mut().find(|f| f.name == "state.bin").unwrap();
        state.digest = format!("{DIGEST_SCHEME}:00");
        dst.begin(&m, |_| true, u64::MAX).unwrap();
        for f in &m.files {
            let (path, size) = export_file(&from, &f.name).unwrap();
            let mut w = dst.open(id, &f.name).unwrap();
            w.put(0, &[]).unwrap();
            for_each_block(&File::open(path).unwrap(), 0, |o, b| {
                w.put(o, b).unwrap();
                Ok(())
            })
            .unwrap();
            assert!(w.put(size, &[]).unwrap());
        }
        let err = dst.commit(id).unwrap_err().to_string();
        assert!(
            err.contains("state.bin") && err.contains("damaged"),
            "{err}"
        );
        assert!(dst.store.get_id(id).is_err(), "nothing in place");
        let again = dst.begin(&m, |_| true, u64::MAX).unwrap();
        let i = m.files.iter().position(|f| f.name == "state.bin").unwrap();
        assert_eq!(again.resume_at[i], 0, "the damaged file starts over");
        assert!(
            again
                .resume_at
                .iter()
                .enumerate()
                .all(|(j, at)| j == i || *at == m.files[j].size),
            "the others stay copied"
        );
    }

    #[test]
    fn bad_manifests_and_blocks_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let src = TemplateStore::new(dir.path().join("src")).unwrap();
        let dst = Imports::new(TemplateStore::new(dir.path().join("dst")).unwrap());
        let id = TemplateId::new();
        let from = made(&src, id);
        let good = manifest(&from).unwrap();
        let mut escape = good.clone();
        escape.files[0].name = "../x".into();
        assert!(dst.begin(&escape, |_| true, u64::MAX).is_err());
        let mut other = good.clone();
        other.template_id = TemplateId::new().to_string();
        assert!(
            dst.begin(&other, |_| true, u64::MAX).is_err(),
            "record of another"
        );
        let err = dst.begin(&good, |_| false, u64::MAX).unwrap_err();
        assert!(err.to_string().contains("kernel"), "{err}");
        let err = dst.begin(&good, |_| true, 1 << 20).unwrap_err();
        assert!(err.out_of_space(), "{err}");
        dst.begin(&good, |_| true, u64::MAX).unwrap();
        let mut w = dst.open(id, "rootfs.ext4").unwrap();
        assert!(
            w.put(BLOCK, &[]).is_err(),
            "must start where the copy stands"
        );
        let mut w = dst.open(id, "rootfs.ext4").unwrap();
        w.put(0, &[]).unwrap();
        w.put(2 * BLOCK, &[1; 10]).unwrap();
        assert!(w.put(BLOCK, &[1; 10]).is_err(), "out of order");
        assert!(dst.open(id, "nope").is_err());
        assert!(dst.commit(id).is_err(), "incomplete");
        dst.discard(id);
        assert_eq!(dst.sweep(Duration::ZERO), 0);
    }
}
