//! `GET /files` (download) and `POST /files` (upload), streamed both ways.
//!
//! Downloads stream from the open file with `Content-Length`, or gzip-encoded (fastest
//! level, no length) when the client accepts gzip; nothing is read whole into memory.
//!
//! Uploads (`multipart/form-data` fields named `file`, or a raw
//! `application/octet-stream` body, either possibly `Content-Encoding: gzip`, decoded as
//! it streams) stream into a temporary file in the destination's directory, which gets
//! the upload's user metadata (`X-Metadata-*` headers, see [`super::metadata`]), is given
//! to the user and renamed over the destination, so a reader never sees a half-written
//! file and a failed upload leaves the old file intact. Missing parent directories are
//! created and owned by the user. Errors are plain JSON `{"code": <status>, "message": …}`
//! as in E2B's envd.

use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use futures::{Stream, StreamExt, TryStreamExt};
use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use nestbox_envd::connect::server::ResponseBody;
use nestbox_envd::types::{UploadEntry, UploadEntryType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::filesystem::{chown, ensure_dirs};
use super::http::json_error;
use super::paths;
use super::state::Server;
use super::users::{User, UserError};

/// Read size of downloads.
const DOWNLOAD_CHUNK: usize = 64 * 1024;
/// Cap for files that report size 0 (`/proc` and `/sys` pseudo-files are read to EOF).
const PSEUDO_FILE_LIMIT: u64 = 64 << 20;

/// A failed `/files` request, converted once to an HTTP status and JSON body.
#[derive(Debug, thiserror::Error)]
pub enum FilesError {
    /// The request is malformed.
    #[error("{0}")]
    BadRequest(String),
    /// The user does not exist.
    #[error("{0}")]
    User(String),
    /// No such file.
    #[error("{0}")]
    NotFound(String),
    /// The agent may not touch the path.
    #[error("{0}")]
    Forbidden(String),
    /// The disk is full.
    #[error("not enough disk space to write {path}")]
    NoSpace {
        /// The destination.
        path: PathBuf,
    },
    /// Reading the request body failed (the client went away).
    #[error("cannot read the upload: {0}")]
    Body(String),
    /// Anything else.
    #[error("{operation} {path}: {source}")]
    Io {
        /// What was being done.
        operation: &'static str,
        /// On what.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
}

impl FilesError {
    fn status(&self) -> StatusCode {
        match self {
            FilesError::BadRequest(_) | FilesError::Body(_) => StatusCode::BAD_REQUEST,
            FilesError::User(_) => StatusCode::UNAUTHORIZED,
            FilesError::NotFound(_) => StatusCode::NOT_FOUND,
            FilesError::Forbidden(_) => StatusCode::FORBIDDEN,
            FilesError::NoSpace { .. } => StatusCode::INSUFFICIENT_STORAGE,
            FilesError::Io { .. } => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn io(operation: &'static str, path: &Path, source: io::Error) -> Self {
        let shown = path.display();
        match source.kind() {
            io::ErrorKind::NotFound => FilesError::NotFound(format!("{shown} does not exist")),
            io::ErrorKind::PermissionDenied => {
                FilesError::Forbidden(format!("{operation} {shown}: permission denied"))
            }
            io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded => FilesError::NoSpace {
                path: path.to_path_buf(),
            },
            // ENAMETOOLONG: a name the caller chose.
            io::ErrorKind::NotADirectory
            | io::ErrorKind::IsADirectory
            | io::ErrorKind::InvalidFilename => {
                FilesError::BadRequest(format!("{operation} {shown}: {source}"))
            }
            _ => FilesError::Io {
                operation,
                path: path.to_path_buf(),
                source,
            },
        }
    }

    fn into_response(self) -> Response<ResponseBody> {
        let status = self.status();
        match &self {
            FilesError::Io { .. } => tracing::error!(error = %self, "files request failed"),
            FilesError::NoSpace { .. } => tracing::warn!(error = %self, "files request failed"),
            _ => {}
        }
        json_error(status, &self.to_string())
    }
}

#[derive(Debug, Default)]
struct Query {
    path: Option<String>,
    username: Option<String>,
}

fn parse_query(uri: &http::Uri) -> Query {
    let mut query = Query::default();
    for (key, value) in form_urlencoded::parse(uri.query().unwrap_or("").as_bytes()) {
        match key.as_ref() {
            "path" => query.path = Some(value.into_owned()),
            "username" => query.username = Some(value.into_owned()).filter(|u| !u.is_empty()),
            _ => {}
        }
    }
    query
}

fn user_for(server: &Server, query: &Query) -> Result<User, FilesError> {
    server
        .user(query.username.as_deref())
        .map(|(user, _)| user)
        .map_err(|e| match e {
            UserError::NotFound { name } => {
                FilesError::User(format!("user {name:?} does not exist in this sandbox"))
            }
            UserError::Read { path, source } => FilesError::Io {
                operation: "read",
                path: PathBuf::from(path),
                source,
            },
        })
}

fn resolve(path: Option<&str>, user: &User) -> Result<PathBuf, FilesError> {
    let path =
        path.ok_or_else(|| FilesError::BadRequest("the path parameter is required".into()))?;
    paths::resolve(path, &user.home).map_err(|e| FilesError::BadRequest(e.to_string()))
}

/// `GET /files?path=…&username=…`.
pub async fn download(server: &Server, request: &Request<Incoming>) -> Response<ResponseBody> {
    match try_download(server, request).await {
        Ok(response) => response,
        Err(err) => err.into_response(),
    }
}

async fn try_download(
    server: &Server,
    request: &Request<Incoming>,
) -> Result<Response<ResponseBody>, FilesError> {
    let query = parse_query(request.uri());
    let user = user_for(server, &query)?;
    let path = resolve(query.path.as_deref(), &user)?;
    let file = tokio::fs::File::open(&path)
        .await
        .map_err(|e| FilesError::io("open", &path, e))?;
    let meta = file
        .metadata()
        .await
        .map_err(|e| FilesError::io("stat", &path, e))?;
    if meta.is_dir() {
        return Err(FilesError::BadRequest(format!(
            "{} is a directory",
            path.display()
        )));
    }
    if !meta.is_file() {
        return Err(FilesError::BadRequest(format!(
            "{} is not a regular file",
            path.display()
        )));
    }
    // A file that grows while it is sent is cut at the announced length.
    let (reader, length) = if meta.len() > 0 {
        (file.take(meta.len()), Some(meta.len()))
    } else {
        (file.take(PSEUDO_FILE_LIMIT), None)
    };
    let gzip = accepts_gzip(request.headers());
    let body = if gzip {
        // The fastest level: clients ask for gzip by default, and the guest's CPU is the
        // tenant's.
        let encoder = async_compression::tokio::bufread::GzipEncoder::with_quality(
            tokio::io::BufReader::with_capacity(DOWNLOAD_CHUNK, reader),
            async_compression::Level::Fastest,
        );
        tokio_util::io::ReaderStream::with_capacity(encoder, DOWNLOAD_CHUNK)
            .map_ok(Frame::data)
            .map_err(|e| Box::new(e) as nestbox_envd::connect::server::BoxError)
            .boxed()
    } else {
        tokio_util::io::ReaderStream::with_capacity(reader, DOWNLOAD_CHUNK)
            .map_ok(Frame::data)
            .map_err(|e| Box::new(e) as nestbox_envd::connect::server::BoxError)
            .boxed()
    };
    let mut response = Response::new(StreamBody::new(body).boxed_unsync());
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    if gzip {
        headers.insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
        headers.insert(header::VARY, HeaderValue::from_static("accept-encoding"));
    } else if let Some(length) = length {
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(length));
    }
    let name: String = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
        .chars()
        .map(|c| {
            if c.is_ascii_graphic() && c != '"' && c != '\\' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if let Ok(value) = HeaderValue::from_str(&format!("attachment; filename=\"{name}\"")) {
        headers.insert(header::CONTENT_DISPOSITION, value);
    }
    Ok(response)
}

/// Whether the client takes a gzip-encoded answer (`Accept-Encoding: gzip`, not `q=0`).
fn accepts_gzip(headers: &http::HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT_ENCODING)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|item| {
            let mut parts = item.split(';').map(str::trim);
            let coding = parts.next().unwrap_or("");
            let refused = parts.any(|p| {
                p.strip_prefix("q=")
                    .and_then(|q| q.parse::<f32>().ok())
                    .is_some_and(|q| q <= 0.0)
            });
            (coding.eq_ignore_ascii_case("gzip") || coding.eq_ignore_ascii_case("x-gzip"))
                && !refused
        })
}

/// `POST /files?path=…&username=…`.
pub async fn upload(server: &Server, request: Request<Incoming>) -> Response<ResponseBody> {
    match try_upload(server, request).await {
        Ok(entries) => match serde_json::to_vec(&entries) {
            Ok(body) => {
                let mut response = Response::new(nestbox_envd::connect::server::full_body(body));
                response.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                );
                response
            }
            Err(e) => json_error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
        },
        Err(err) => err.into_response(),
    }
}

async fn try_upload(
    server: &Server,
    request: Request<Incoming>,
) -> Result<Vec<UploadEntry>, FilesError> {
    let query = parse_query(request.uri());
    let user = user_for(server, &query)?;
    let content_type = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let gzipped = match request
        .headers()
        .get(header::CONTENT_ENCODING)
        .map(|v| v.to_str().unwrap_or("").trim().to_ascii_lowercase())
        .as_deref()
    {
        None | Some("identity") => false,
        Some("gzip" | "x-gzip") => true,
        Some(other) => {
            return Err(FilesError::BadRequest(format!(
                "content-encoding {other:?} is not supported: send gzip or no encoding"
            )));
        }
    };
    let metadata =
        super::metadata::from_headers(request.headers()).map_err(FilesError::BadRequest)?;
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    let body = pump_body(request.into_body());
    let body: BodyStream = if gzipped {
        Box::pin(gunzip(body))
    } else {
        Box::pin(body)
    };

    if essence == "application/octet-stream" {
        let path = resolve(query.path.as_deref(), &user)?;
        let entry = write_file(&path, &user, body, &metadata).await?;
        return Ok(vec![entry]);
    }
    if essence.starts_with("multipart/") {
        let boundary = multer::parse_boundary(&content_type)
            .map_err(|e| FilesError::BadRequest(format!("invalid multipart request: {e}")))?;
        let body = body.map_err(|e| io::Error::other(e.to_string()));
        let mut multipart = multer::Multipart::new(body, boundary);
        let mut entries: Vec<UploadEntry> = Vec::new();
        while let Some(field) = multipart
            .next_field()
            .await
            .map_err(|e| FilesError::BadRequest(format!("invalid multipart request: {e}")))?
        {
            if field.name() != Some("file") {
                continue;
            }
            let target = match query.path.as_deref() {
                Some(path) => Some(path.to_owned()),
                None => field.file_name().map(str::to_owned),
            };
            let path = resolve(target.as_deref(), &user)?;
            if entries.iter().any(|e| Path::new(&e.path) == path) {
                return Err(FilesError::BadRequest(format!(
                    "several files were sent for {}; upload one file per path",
                    path.display()
                )));
            }
            let data = field.map_err(|e| FilesError::Body(e.to_string()));
            entries.push(write_file(&path, &user, data, &metadata).await?);
        }
        return Ok(entries);
    }
    Err(FilesError::BadRequest(format!(
        "unsupported content type {content_type:?}: send multipart/form-data or application/octet-stream"
    )))
}

/// An upload's body.
type BodyStream = std::pin::Pin<Box<dyn Stream<Item = Result<Bytes, FilesError>> + Send>>;

/// Decompresses a gzip body as it streams (`Content-Encoding: gzip`); data that is not
/// gzip is a bad request.
fn gunzip(
    body: impl Stream<Item = Result<Bytes, FilesError>> + Send + 'static,
) -> impl Stream<Item = Result<Bytes, FilesError>> + Send {
    // Errors of the body itself travel through the reader as `Other`; the decoder's own
    // are `InvalidData`.
    let reader =
        tokio_util::io::StreamReader::new(body.map_err(|e| io::Error::other(e.to_string())));
    let decoder = async_compression::tokio::bufread::GzipDecoder::new(reader);
    tokio_util::io::ReaderStream::with_capacity(decoder, DOWNLOAD_CHUNK).map_err(|e| {
        if e.kind() == io::ErrorKind::InvalidData || e.kind() == io::ErrorKind::UnexpectedEof {
            FilesError::BadRequest(format!("the upload is not valid gzip data: {e}"))
        } else {
            FilesError::Body(e.to_string())
        }
    })
}

/// Most bytes of a failed upload read and discarded after the answer was sent.
const DRAIN_LIMIT: u64 = 64 << 20;

/// Reads the request body on its own task. When an upload fails early (disk full, bad
/// path), the handler answers at once and drops the returned stream; the task then drains
/// up to [`DRAIN_LIMIT`] more bytes, so that the client, still sending, reads the error
/// instead of a connection reset.
fn pump_body(body: Incoming) -> impl Stream<Item = Result<Bytes, FilesError>> {
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, String>>(8);
    tokio::spawn(async move {
        let mut body = std::pin::pin!(body);
        let mut drained = 0u64;
        let mut handler_gone = false;
        while let Some(frame) = body.frame().await {
            let data = match frame {
                Ok(frame) => match frame.into_data() {
                    Ok(data) => data,
                    Err(_trailers) => continue,
                },
                Err(e) => {
                    let _ = tx.send(Err(e.to_string())).await;
                    break;
                }
            };
            if !handler_gone {
                match tx.send(Ok(data)).await {
                    Ok(()) => continue,
                    Err(returned) => {
                        handler_gone = true;
                        if let Ok(data) = returned.0 {
                            drained += data.len() as u64;
                        }
                    }
                }
            } else {
                drained += data.len() as u64;
            }
            if drained > DRAIN_LIMIT {
                break;
            }
        }
    });
    futures::stream::unfold(rx, |mut rx| async move {
        let item = rx.recv().await?;
        Some((item.map_err(FilesError::Body), rx))
    })
}

/// A temporary file removed on drop unless it was renamed into place.
struct TempFile {
    path: PathBuf,
    keep: bool,
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.keep {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

static UPLOADS: AtomicU64 = AtomicU64::new(0);

/// Streams `data` to `path` through a temporary file in the same directory.
async fn write_file<S>(
    path: &Path,
    user: &User,
    data: S,
    metadata: &std::collections::BTreeMap<String, String>,
) -> Result<UploadEntry, FilesError>
where
    S: Stream<Item = Result<Bytes, FilesError>>,
{
    // Write through a symbolic link to its target, like an in-place write would.
    let target = match tokio::fs::symlink_metadata(path).await {
        Ok(meta) if meta.file_type().is_symlink() => tokio::fs::canonicalize(path)
            .await
            .unwrap_or_else(|_| path.to_path_buf()),
        _ => path.to_path_buf(),
    };
    let existing = match tokio::fs::metadata(&target).await {
        Ok(meta) if meta.is_dir() => {
            return Err(FilesError::BadRequest(format!(
                "{} is a directory",
                path.display()
            )));
        }
        Ok(meta) => Some(meta),
        Err(_) => None,
    };
    let parent = target
        .parent()
        .ok_or_else(|| FilesError::BadRequest("cannot write to /".into()))?
        .to_path_buf();
    let name = target
        .file_name()
        .ok_or_else(|| FilesError::BadRequest(format!("{} names no file", path.display())))?
        .to_string_lossy()
        .into_owned();
    {
        let (parent, user) = (parent.clone(), user.clone());
        tokio::task::spawn_blocking(move || ensure_dirs(&parent, &user).map_err(|e| (parent, e)))
            .await
            .map_err(|e| FilesError::Body(format!("upload task failed: {e}")))?
            .map_err(|(dir, e)| FilesError::io("create directory", &dir, e))?;
    }

    let temp = TempFile {
        path: parent.join(format!(
            ".{name}.nestbox-upload.{}.{}",
            std::process::id(),
            UPLOADS.fetch_add(1, Ordering::Relaxed)
        )),
        keep: false,
    };
    let mut file = tokio::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(existing.as_ref().map_or(0o644, |m| m.mode() & 0o7777))
        .open(&temp.path)
        .await
        .map_err(|e| FilesError::io("create", &target, e))?;
    let mut data = std::pin::pin!(data);
    while let Some(chunk) = data.next().await {
        let chunk = chunk?;
        file.write_all(&chunk)
            .await
            .map_err(|e| FilesError::io("write", &target, e))?;
    }
    file.flush()
        .await
        .map_err(|e| FilesError::io("write", &target, e))?;
    if let Some(meta) = &existing {
        // The umask may have narrowed the mode given at creation.
        let _ = tokio::fs::set_permissions(
            &temp.path,
            std::fs::Permissions::from_mode(meta.mode() & 0o7777),
        )
        .await;
    }
    drop(file);
    chown(&temp.path, user).map_err(|e| FilesError::io("chown", &target, e))?;
    if !metadata.is_empty() {
        super::metadata::write(&temp.path, metadata).map_err(|e| match e.raw_os_error() {
            Some(libc::EOPNOTSUPP) => FilesError::BadRequest(format!(
                "the file system of {} keeps no metadata",
                target.display()
            )),
            Some(libc::ENOSPC | libc::E2BIG | libc::ERANGE) => FilesError::BadRequest(format!(
                "the metadata is too large for the file system of {}",
                target.display()
            )),
            _ => FilesError::io("set metadata on", &target, e),
        })?;
    }
    tokio::fs::rename(&temp.path, &target)
        .await
        .map_err(|e| FilesError::io("rename into", &target, e))?;
    let mut temp = temp;
    temp.keep = true;
    Ok(UploadEntry {
        path: path.to_string_lossy().into_owned(),
        name: path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        kind: UploadEntryType::File,
        metadata: (!metadata.is_empty()).then(|| metadata.clone()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_parsing() {
        let uri: http::Uri = "/files?path=%2Ftmp%2Fa%20b&username=".parse().unwrap();
        let query = parse_query(&uri);
        assert_eq!(query.path.as_deref(), Some("/tmp/a b"));
        assert_eq!(query.username, None);
        let uri: http::Uri = "/files?username=user&path=x+y".parse().unwrap();
        let query = parse_query(&uri);
        assert_eq!(query.path.as_deref(), Some("x y"));
        assert_eq!(query.username.as_deref(), Some("user"));
    }

    #[test]
    fn gzip_is_taken_unless_refused() {
        let h = |v: &str| {
            let mut m = http::HeaderMap::new();
            m.insert(header::ACCEPT_ENCODING, HeaderValue::from_str(v).unwrap());
            m
        };
        assert!(accepts_gzip(&h("gzip")));
        assert!(accepts_gzip(&h("br, gzip;q=0.5")));
        assert!(!accepts_gzip(&h("gzip;q=0")));
        assert!(!accepts_gzip(&h("identity")));
        assert!(!accepts_gzip(&http::HeaderMap::new()));
    }

    #[test]
    fn io_errors_map_to_statuses() {
        let p = Path::new("/x");
        assert_eq!(
            FilesError::io("open", p, io::ErrorKind::NotFound.into()).status(),
            StatusCode::NOT_FOUND
        );
        assert_eq!(
            FilesError::io("write", p, io::ErrorKind::StorageFull.into()).status(),
            StatusCode::INSUFFICIENT_STORAGE
        );
        assert_eq!(
            FilesError::io("write", p, io::ErrorKind::Other.into()).status(),
            StatusCode::INTERNAL_SERVER_ERROR
        );
    }
}
