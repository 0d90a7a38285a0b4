//! Directory watching for `filesystem.Filesystem`: `WatchDir` (streamed) and the polled
//! `CreateWatcher` / `GetWatcherEvents` / `RemoveWatcher`, on Linux inotify.
//!
//! Ownership: each watch is one inotify instance owned by one reader task, which maps the
//! kernel's events to envd events (names relative to the watched directory) and sends them
//! into a bounded channel of [`QUEUE_EVENTS`]. The task owns the map of watch descriptors
//! to directories; nobody else touches it. When the receiver is dropped (the client went
//! away, or the watcher was removed) the task ends and the inotify instance is closed.
//!
//! Invariants:
//! - no queue grows without bound: a full channel makes the reader task wait, the kernel
//!   then queues events (bounded by `max_queued_events`) and reports an overflow when its
//!   queue is full, which ends the watch with `resource_exhausted` — events are never
//!   dropped silently;
//! - recursive watches add every subdirectory at start and each directory created or moved
//!   in later (files created in a new directory before its watch is in place are missed;
//!   the directory's own `create` event is always reported);
//! - kernel events map as fsnotify's do: create and moved-to → `create`, modify → `write`,
//!   delete → `remove`, moved-from → `rename`, attrib → `chmod`;
//! - with `include_entry`, `create`, `write` and `chmod` events carry the entry as it is
//!   when the event is read (none if it is already gone); `remove` and `rename` never do;
//! - a directory on a network file system (NFS, SMB/CIFS, FUSE, 9P) is watched only when
//!   the request allows it (`allow_network_mounts`), as there changes may go unreported.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use inotify::{EventMask, Inotify, WatchDescriptor, WatchMask, Watches};
use nestbox_envd::connect::ConnectError;
use nestbox_envd::filesystem::{EventType, FilesystemEvent};
use tokio::sync::mpsc;

use super::users::UserDb;

/// Events a watch may have queued for its reader.
pub const QUEUE_EVENTS: usize = 1024;
/// Polled watchers one guest may have at once.
pub const MAX_WATCHERS: usize = 64;
/// Most events one `GetWatcherEvents` returns.
const MAX_POLLED: usize = 4096;
/// Directories one recursive watch may cover.
const MAX_DIRS: usize = 8192;

/// Why a watch could not be made.
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    /// The path is not a directory or cannot be read.
    #[error("cannot watch {path}")]
    Path {
        /// The directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The directory is on a network file system and the request did not allow that.
    #[error(
        "{path} is on a network file system, where changes may go unreported; set allow_network_mounts to watch it anyway"
    )]
    NetworkMount {
        /// The directory.
        path: PathBuf,
    },
    /// inotify refused (too many watches or instances).
    #[error("inotify on {path}")]
    Inotify {
        /// The directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

impl WatchError {
    /// The Connect error for clients.
    pub fn to_connect(&self) -> ConnectError {
        match self {
            WatchError::Path { path, source } => super::rpc::io_error("watch", path, source),
            WatchError::NetworkMount { .. } => ConnectError::failed_precondition(self.to_string()),
            WatchError::Inotify { source, .. } => {
                ConnectError::resource_exhausted(format!("{self}: {source}"))
            }
        }
    }
}

/// One item of a watch: an event, or the error that ends it.
pub type WatchItem = Result<FilesystemEvent, ConnectError>;

const MASK: WatchMask = WatchMask::CREATE
    .union(WatchMask::MODIFY)
    .union(WatchMask::DELETE)
    .union(WatchMask::MOVED_FROM)
    .union(WatchMask::MOVED_TO)
    .union(WatchMask::ATTRIB)
    .union(WatchMask::DELETE_SELF)
    .union(WatchMask::MOVE_SELF)
    .union(WatchMask::ONLYDIR);

/// Adds watches on `dir` (relative name `rel`) and, when `recursive`, its subdirectories.
fn add_tree(
    watches: &mut Watches,
    dirs: &mut HashMap<WatchDescriptor, PathBuf>,
    dir: &Path,
    rel: PathBuf,
    recursive: bool,
) -> std::io::Result<()> {
    let wd = watches.add(dir, MASK)?;
    dirs.insert(wd, rel.clone());
    if !recursive {
        return Ok(());
    }
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        // Removed meanwhile, or unreadable: nothing below to watch.
        Err(_) => return Ok(()),
    };
    for entry in entries.flatten() {
        if dirs.len() >= MAX_DIRS {
            return Err(std::io::Error::other(format!(
                "more than {MAX_DIRS} directories to watch"
            )));
        }
        let is_dir = entry.file_type().map(|t| t.is_dir()).unwrap_or(false);
        if is_dir {
            add_tree(
                watches,
                dirs,
                &entry.path(),
                rel.join(entry.file_name()),
                true,
            )?;
        }
    }
    Ok(())
}

fn kind(mask: EventMask) -> Option<EventType> {
    if mask.contains(EventMask::CREATE) || mask.contains(EventMask::MOVED_TO) {
        Some(EventType::Create)
    } else if mask.contains(EventMask::MODIFY) {
        Some(EventType::Write)
    } else if mask.contains(EventMask::DELETE) {
        Some(EventType::Remove)
    } else if mask.contains(EventMask::MOVED_FROM) {
        Some(EventType::Rename)
    } else if mask.contains(EventMask::ATTRIB) {
        Some(EventType::Chmod)
    } else {
        None
    }
}

/// What a watch reports and where it may run.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Subdirectories too (those created later included).
    pub recursive: bool,
    /// Events carry the entry they are about (when it still exists), described with these
    /// users' and groups' names.
    pub include_entry: Option<Arc<UserDb>>,
    /// Watching a directory on a network file system is allowed.
    pub allow_network_mounts: bool,
}

/// File system magic numbers (`statfs`) of network and FUSE file systems.
const NETWORK_FS: [i64; 6] = [
    0x6969,      // NFS
    0x517b,      // SMB
    0xff53_4d42, // CIFS
    0xfe53_4d42, // SMB2
    0x6573_5546, // FUSE
    0x0102_1997, // 9P (v9fs)
];

fn on_network_fs(path: &Path) -> bool {
    nix::sys::statfs::statfs(path)
        .map(|s| NETWORK_FS.contains(&s.filesystem_type().0))
        .unwrap_or(false)
}

/// Starts watching `root`; events arrive on the returned receiver until it is dropped.
pub fn start(root: &Path, options: Options) -> Result<mpsc::Receiver<WatchItem>, WatchError> {
    let Options {
        recursive,
        include_entry,
        allow_network_mounts,
    } = options;
    let meta = std::fs::metadata(root).map_err(|source| WatchError::Path {
        path: root.to_path_buf(),
        source,
    })?;
    if !allow_network_mounts && on_network_fs(root) {
        return Err(WatchError::NetworkMount {
            path: root.to_path_buf(),
        });
    }
    if !meta.is_dir() {
        return Err(WatchError::Path {
            path: root.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::NotADirectory, "not a directory"),
        });
    }
    let inotify_err = |source| WatchError::Inotify {
        path: root.to_path_buf(),
        source,
    };
    let inotify = Inotify::init().map_err(inotify_err)?;
    let mut watches = inotify.watches();
    let mut dirs = HashMap::new();
    add_tree(&mut watches, &mut dirs, root, PathBuf::new(), recursive).map_err(inotify_err)?;
    let mut events = inotify
        .into_event_stream(vec![0u8; 64 * 1024])
        .map_err(inotify_err)?;
    let (tx, rx) = mpsc::channel(QUEUE_EVENTS);
    let root = root.to_path_buf();
    let span = tracing::debug_span!("watch", path = %root.display(), recursive);
    let task = async move {
        loop {
            let event = tokio::select! {
                event = events.next() => event,
                () = tx.closed() => return,
            };
            let event = match event {
                Some(Ok(event)) => event,
                Some(Err(e)) => {
                    let _ = tx
                        .send(Err(ConnectError::internal(format!("reading inotify: {e}"))))
                        .await;
                    return;
                }
                None => return,
            };
            if event.mask.contains(EventMask::Q_OVERFLOW) {
                let _ = tx
                    .send(Err(ConnectError::resource_exhausted(
                        "the watch fell behind the changes and lost events; watch again",
                    )))
                    .await;
                return;
            }
            if event.mask.contains(EventMask::IGNORED) {
                dirs.remove(&event.wd);
                if dirs.is_empty() {
                    // The watched directory itself is gone.
                    return;
                }
                continue;
            }
            let Some(dir) = dirs.get(&event.wd).cloned() else {
                continue;
            };
            let Some(name) = event.name.as_deref().map(OsStr::to_os_string) else {
                // Events on the directory itself (deleted or moved): its parent reports them.
                continue;
            };
            let rel = dir.join(&name);
            if recursive
                && event.mask.contains(EventMask::ISDIR)
                && (event.mask.contains(EventMask::CREATE)
                    || event.mask.contains(EventMask::MOVED_TO))
            {
                let mut watches = events.watches();
                if let Err(e) =
                    add_tree(&mut watches, &mut dirs, &root.join(&rel), rel.clone(), true)
                {
                    tracing::warn!(dir = %rel.display(), error = %e, "cannot watch a new directory");
                }
            }
            let Some(kind) = kind(event.mask) else {
                continue;
            };
            let entry = match (&include_entry, kind) {
                (Some(db), k) if k != EventType::Remove && k != EventType::Rename => {
                    super::filesystem::entry_info(&root.join(&rel), db).ok()
                }
                _ => None,
            };
            let item = FilesystemEvent {
                name: rel.to_string_lossy().into_owned(),
                r#type: kind as i32,
                entry,
            };
            if tx.send(Ok(item)).await.is_err() {
                return;
            }
        }
    };
    tokio::spawn(tracing::Instrument::instrument(task, span));
    Ok(rx)
}

/// The polled watchers (`CreateWatcher`), by id.
#[derive(Debug, Default)]
pub struct Watchers {
    next: AtomicU64,
    table: Mutex<HashMap<String, mpsc::Receiver<WatchItem>>>,
}

impl Watchers {
    /// Starts a polled watcher; returns its id.
    pub fn create(&self, root: &Path, options: Options) -> Result<String, ConnectError> {
        let full = || {
            ConnectError::resource_exhausted(format!(
                "there are {MAX_WATCHERS} watchers already; remove one first"
            ))
        };
        if self.len()? >= MAX_WATCHERS {
            return Err(full());
        }
        let rx = start(root, options).map_err(|e| e.to_connect())?;
        let mut table = self
            .table
            .lock()
            .map_err(|_| ConnectError::internal("watcher table poisoned"))?;
        if table.len() >= MAX_WATCHERS {
            return Err(full());
        }
        let id = format!("w-{}", self.next.fetch_add(1, Ordering::Relaxed) + 1);
        table.insert(id.clone(), rx);
        Ok(id)
    }

    fn len(&self) -> Result<usize, ConnectError> {
        self.table
            .lock()
            .map(|t| t.len())
            .map_err(|_| ConnectError::internal("watcher table poisoned"))
    }

    /// The events since the previous call. A watcher whose watch failed returns its error
    /// once and is removed.
    pub fn events(&self, id: &str) -> Result<Vec<FilesystemEvent>, ConnectError> {
        let mut table = self
            .table
            .lock()
            .map_err(|_| ConnectError::internal("watcher table poisoned"))?;
        let rx = table
            .get_mut(id)
            .ok_or_else(|| ConnectError::not_found(format!("no watcher {id:?}")))?;
        let mut out = Vec::new();
        while out.len() < MAX_POLLED {
            match rx.try_recv() {
                Ok(Ok(event)) => out.push(event),
                Ok(Err(err)) => {
                    table.remove(id);
                    return Err(err);
                }
                Err(_) => break,
            }
        }
        Ok(out)
    }

    /// Stops a watcher.
    pub fn remove(&self, id: &str) -> Result<(), ConnectError> {
        let mut table = self
            .table
            .lock()
            .map_err(|_| ConnectError::internal("watcher table poisoned"))?;
        table
            .remove(id)
            .map(|_| ())
            .ok_or_else(|| ConnectError::not_found(format!("no watcher {id:?}")))
    }
}
