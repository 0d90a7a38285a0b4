//! The `filesystem.Filesystem` Connect service: stat, list, make directories, move and
//! remove, on behalf of the acting user.
//!
//! Paths are resolved with [`super::paths`] against the user's home. Operations run as the
//! agent (root in a VM) but what they create belongs to the user, as in E2B. Blocking file
//! work runs on the blocking pool. Listings are bounded by [`MAX_ENTRIES`]. Watching
//! (`WatchDir` streamed, `CreateWatcher` / `GetWatcherEvents` / `RemoveWatcher` polled) is
//! in [`super::watch`]; a `WatchDir` stream sends a start event once the watch is in place,
//! then events, with a keep-alive after each idle interval.

use std::fs::{self, Metadata};
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use http::{Request, Response};
use hyper::body::Incoming;
use nestbox_envd::connect::ConnectError;
use nestbox_envd::connect::Shape;
use nestbox_envd::connect::server::{
    ResponseBody, accept, read_single_envelope, stream_error, stream_response, unary_error,
};
use nestbox_envd::filesystem::{
    CreateWatcherRequest, CreateWatcherResponse, EntryInfo, FileType, GetWatcherEventsRequest,
    GetWatcherEventsResponse, ListDirRequest, ListDirResponse, MakeDirRequest, MakeDirResponse,
    MoveRequest, MoveResponse, RemoveRequest, RemoveResponse, RemoveWatcherRequest,
    RemoveWatcherResponse, StatRequest, StatResponse, WatchDirRequest, WatchDirResponse,
    watch_dir_response,
};

use super::paths;
use super::rpc::{self, io_error, path_error, request_user, user_error};
use super::state::Server;
use super::users::{User, UserDb};
use super::watch;

/// Most entries one `ListDir` returns.
pub const MAX_ENTRIES: usize = 100_000;

/// Serves `POST /filesystem.Filesystem/<method>`.
pub async fn serve(
    server: Arc<Server>,
    method: &str,
    request: Request<Incoming>,
) -> Response<ResponseBody> {
    match method {
        "Stat" => {
            rpc::unary(request, |req: StatRequest, parts| async move {
                let (path, _user, db) = resolve(&server, &parts.headers, &req.path)?;
                blocking(move || {
                    let entry = entry_info(&path, &db).map_err(|e| io_error("stat", &path, &e))?;
                    Ok(StatResponse { entry: Some(entry) })
                })
                .await
            })
            .await
        }
        "MakeDir" => {
            rpc::unary(request, |req: MakeDirRequest, parts| async move {
                let (path, user, db) = resolve(&server, &parts.headers, &req.path)?;
                blocking(move || {
                    if fs::symlink_metadata(&path).is_ok() {
                        return Err(ConnectError::already_exists(format!(
                            "{} already exists",
                            path.display()
                        )));
                    }
                    ensure_dirs(&path, &user).map_err(|e| io_error("mkdir", &path, &e))?;
                    let entry = entry_info(&path, &db).map_err(|e| io_error("stat", &path, &e))?;
                    Ok(MakeDirResponse { entry: Some(entry) })
                })
                .await
            })
            .await
        }
        "Move" => {
            rpc::unary(request, |req: MoveRequest, parts| async move {
                let (source, user, db) = resolve(&server, &parts.headers, &req.source)?;
                let destination =
                    paths::resolve(&req.destination, &user.home).map_err(|e| path_error(&e))?;
                blocking(move || {
                    fs::symlink_metadata(&source).map_err(|e| io_error("move", &source, &e))?;
                    if let Some(parent) = destination.parent() {
                        ensure_dirs(parent, &user).map_err(|e| io_error("mkdir", parent, &e))?;
                    }
                    fs::rename(&source, &destination)
                        .map_err(|e| io_error("move to", &destination, &e))?;
                    let entry = entry_info(&destination, &db)
                        .map_err(|e| io_error("stat", &destination, &e))?;
                    Ok(MoveResponse { entry: Some(entry) })
                })
                .await
            })
            .await
        }
        "ListDir" => {
            rpc::unary(request, |req: ListDirRequest, parts| async move {
                let (path, _user, db) = resolve(&server, &parts.headers, &req.path)?;
                let depth = req.depth.max(1);
                blocking(move || {
                    let meta = fs::metadata(&path).map_err(|e| io_error("list", &path, &e))?;
                    if !meta.is_dir() {
                        return Err(ConnectError::invalid_argument(format!(
                            "{} is not a directory",
                            path.display()
                        )));
                    }
                    let mut entries = Vec::new();
                    list_dir(&path, depth, &db, &mut entries)?;
                    Ok(ListDirResponse { entries })
                })
                .await
            })
            .await
        }
        "Remove" => {
            rpc::unary(request, |req: RemoveRequest, parts| async move {
                let (path, _user, _db) = resolve(&server, &parts.headers, &req.path)?;
                blocking(move || {
                    let meta =
                        fs::symlink_metadata(&path).map_err(|e| io_error("remove", &path, &e))?;
                    if meta.is_dir() {
                        fs::remove_dir_all(&path)
                    } else {
                        fs::remove_file(&path)
                    }
                    .map_err(|e| io_error("remove", &path, &e))?;
                    Ok(RemoveResponse {})
                })
                .await
            })
            .await
        }
        "WatchDir" => watch_dir(server, request).await,
        "CreateWatcher" => {
            rpc::unary(request, |req: CreateWatcherRequest, parts| async move {
                let (path, _user, db) = resolve(&server, &parts.headers, &req.path)?;
                let options = watch::Options {
                    recursive: req.recursive,
                    include_entry: req.include_entry.then(|| Arc::new(db)),
                    allow_network_mounts: req.allow_network_mounts,
                };
                let watchers = server.clone();
                let watcher_id = blocking(move || watchers.watchers.create(&path, options)).await?;
                Ok(CreateWatcherResponse { watcher_id })
            })
            .await
        }
        "GetWatcherEvents" => {
            rpc::unary(request, |req: GetWatcherEventsRequest, _| async move {
                let events = server.watchers.events(&req.watcher_id)?;
                Ok(GetWatcherEventsResponse { events })
            })
            .await
        }
        "RemoveWatcher" => {
            rpc::unary(request, |req: RemoveWatcherRequest, _| async move {
                server.watchers.remove(&req.watcher_id)?;
                Ok(RemoveWatcherResponse {})
            })
            .await
        }
        other => unary_error(&ConnectError::unimplemented(format!(
            "filesystem.Filesystem has no method {other:?}"
        ))),
    }
}

/// `WatchDir`: a start event once the watch is in place, then events until the client
/// goes away.
async fn watch_dir(server: Arc<Server>, request: Request<Incoming>) -> Response<ResponseBody> {
    let (parts, body) = request.into_parts();
    let meta = match accept(&parts.headers, Shape::Streaming) {
        Ok(meta) => meta,
        Err(response) => return *response,
    };
    let req: WatchDirRequest = match read_single_envelope(meta.codec, body, rpc::MAX_MESSAGE).await
    {
        Ok(message) => message,
        Err(err) => return stream_error(meta.codec, &err),
    };
    let (path, db) = match resolve(&server, &parts.headers, &req.path) {
        Ok((path, _, db)) => (path, db),
        Err(err) => return stream_error(meta.codec, &err),
    };
    let options = watch::Options {
        recursive: req.recursive,
        include_entry: req.include_entry.then(|| Arc::new(db)),
        allow_network_mounts: req.allow_network_mounts,
    };
    let started = blocking(move || watch::start(&path, options).map_err(|e| e.to_connect()));
    let mut rx = match started.await {
        Ok(rx) => rx,
        Err(err) => return stream_error(meta.codec, &err),
    };
    let keepalive = rpc::keepalive(&parts.headers);
    let respond = |event| WatchDirResponse { event: Some(event) };
    let events = async_stream::stream! {
        yield Ok(respond(watch_dir_response::Event::Start(watch_dir_response::StartEvent {})));
        loop {
            match tokio::time::timeout(keepalive, rx.recv()).await {
                Ok(Some(Ok(event))) => yield Ok(respond(watch_dir_response::Event::Filesystem(event))),
                Ok(Some(Err(err))) => {
                    yield Err(err);
                    break;
                }
                Ok(None) => break,
                Err(_idle) => yield Ok(respond(watch_dir_response::Event::Keepalive(
                    watch_dir_response::KeepAlive {},
                ))),
            }
        }
    };
    stream_response(meta.codec, events)
}

/// The acting user and the resolved path.
fn resolve(
    server: &Server,
    headers: &http::HeaderMap,
    path: &str,
) -> Result<(PathBuf, User, UserDb), ConnectError> {
    let name = request_user(headers)?;
    let (user, db) = server.user(name.as_deref()).map_err(|e| user_error(&e))?;
    let path = paths::resolve(path, &user.home).map_err(|e| path_error(&e))?;
    Ok((path, user, db))
}

async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, ConnectError> + Send + 'static,
) -> Result<T, ConnectError> {
    tokio::task::spawn_blocking(work).await.unwrap_or_else(|e| {
        Err(ConnectError::internal(format!(
            "filesystem task failed: {e}"
        )))
    })
}

/// Creates `path` and its missing parents, each owned by `user`.
pub fn ensure_dirs(path: &Path, user: &User) -> io::Result<()> {
    let mut missing = Vec::new();
    let mut current = Some(path);
    while let Some(dir) = current {
        match fs::metadata(dir) {
            Ok(meta) if meta.is_dir() => break,
            Ok(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::NotADirectory,
                    format!("{} is not a directory", dir.display()),
                ));
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                missing.push(dir);
                current = dir.parent();
            }
            Err(e) => return Err(e),
        }
    }
    for dir in missing.into_iter().rev() {
        match fs::create_dir(dir) {
            Ok(()) => chown(dir, user)?,
            // Someone else created it meanwhile.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && dir.is_dir() => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Gives `path` to `user` (a no-op when the agent is not root and is that user).
pub fn chown(path: &Path, user: &User) -> io::Result<()> {
    if !nix::unistd::geteuid().is_root() && nix::unistd::geteuid().as_raw() == user.uid {
        return Ok(());
    }
    std::os::unix::fs::lchown(path, Some(user.uid), Some(user.gid))
}

fn list_dir(
    dir: &Path,
    depth: u32,
    db: &UserDb,
    out: &mut Vec<EntryInfo>,
) -> Result<(), ConnectError> {
    let read = fs::read_dir(dir).map_err(|e| io_error("list", dir, &e))?;
    let mut children = Vec::new();
    for item in read {
        let item = item.map_err(|e| io_error("list", dir, &e))?;
        let path = item.path();
        let info = match entry_info(&path, db) {
            Ok(info) => info,
            // Removed between readdir and lstat.
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io_error("stat", &path, &e)),
        };
        if out.len() >= MAX_ENTRIES {
            return Err(ConnectError::resource_exhausted(format!(
                "the listing has more than {MAX_ENTRIES} entries; list a smaller depth"
            )));
        }
        if info.r#type == FileType::Directory as i32 {
            children.push(path);
        }
        out.push(info);
    }
    if depth > 1 {
        for child in children {
            // Unreadable subdirectories are listed but not entered.
            match list_dir(&child, depth - 1, db, out) {
                Err(e) if e.code == nestbox_envd::connect::Code::PermissionDenied => {}
                other => other?,
            }
        }
    }
    Ok(())
}

/// `ls -l`-style permission text of a mode.
pub fn permissions_string(meta: &Metadata) -> String {
    let mode = meta.mode();
    let file_type = meta.file_type();
    let kind = if file_type.is_symlink() {
        'l'
    } else if file_type.is_dir() {
        'd'
    } else {
        use std::os::unix::fs::FileTypeExt;
        if file_type.is_char_device() {
            'c'
        } else if file_type.is_block_device() {
            'b'
        } else if file_type.is_fifo() {
            'p'
        } else if file_type.is_socket() {
            's'
        } else {
            '-'
        }
    };
    let bit = |mask: u32, c: char| if mode & mask != 0 { c } else { '-' };
    let exec =
        |x: u32, special: u32, set: char, unset: char| match (mode & x != 0, mode & special != 0) {
            (true, true) => set,
            (false, true) => unset,
            (true, false) => 'x',
            (false, false) => '-',
        };
    [
        kind,
        bit(0o400, 'r'),
        bit(0o200, 'w'),
        exec(0o100, 0o4000, 's', 'S'),
        bit(0o040, 'r'),
        bit(0o020, 'w'),
        exec(0o010, 0o2000, 's', 'S'),
        bit(0o004, 'r'),
        bit(0o002, 'w'),
        exec(0o001, 0o1000, 't', 'T'),
    ]
    .iter()
    .collect()
}

/// The entry at `path` (not following a final symbolic link).
pub fn entry_info(path: &Path, db: &UserDb) -> io::Result<EntryInfo> {
    let meta = fs::symlink_metadata(path)?;
    let file_type = meta.file_type();
    let (kind, symlink_target) = if file_type.is_symlink() {
        let target = fs::read_link(path)
            .ok()
            .map(|t| t.to_string_lossy().into_owned());
        (FileType::Symlink, target)
    } else if file_type.is_dir() {
        (FileType::Directory, None)
    } else {
        (FileType::File, None)
    };
    let modified_time = Some(nestbox_envd::wkt::Timestamp {
        seconds: meta.mtime(),
        nanos: i32::try_from(meta.mtime_nsec()).unwrap_or(0),
    });
    Ok(EntryInfo {
        name: path
            .file_name()
            .map_or_else(|| "/".to_owned(), |n| n.to_string_lossy().into_owned()),
        r#type: kind as i32,
        path: path.to_string_lossy().into_owned(),
        size: i64::try_from(meta.size()).unwrap_or(i64::MAX),
        mode: meta.permissions().mode() & 0o7777,
        permissions: permissions_string(&meta),
        owner: db.user_name(meta.uid()),
        group: db.group_name(meta.gid()),
        modified_time,
        is_symlink: symlink_target.is_some() || file_type.is_symlink(),
        symlink_target,
        // Links themselves carry no user attributes.
        metadata: if file_type.is_symlink() {
            Default::default()
        } else {
            super::metadata::read(path).into_iter().collect()
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permission_strings() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        fs::write(&file, b"x").unwrap();
        fs::set_permissions(&file, fs::Permissions::from_mode(0o4754)).unwrap();
        let meta = fs::symlink_metadata(&file).unwrap();
        assert_eq!(permissions_string(&meta), "-rwsr-xr--");
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o1777)).unwrap();
        let meta = fs::symlink_metadata(dir.path()).unwrap();
        assert_eq!(permissions_string(&meta), "drwxrwxrwt");
        std::os::unix::fs::symlink(&file, dir.path().join("l")).unwrap();
        let db = UserDb::default();
        let link = entry_info(&dir.path().join("l"), &db).unwrap();
        assert_eq!(link.r#type, FileType::Symlink as i32);
        assert_eq!(link.symlink_target.as_deref(), Some(file.to_str().unwrap()));
        assert!(link.permissions.starts_with('l'));
        let info = entry_info(&file, &db).unwrap();
        assert_eq!(info.size, 1);
        assert_eq!(info.mode, 0o4754);
        assert_eq!(info.name, "f");
    }
}
