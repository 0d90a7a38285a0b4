//! Plumbing shared by the Connect services: reading the request, the deadline, the acting
//! user, and mapping local errors to Connect codes (once, here).

use std::future::Future;
use std::io;
use std::path::Path;
use std::time::Duration;

use http::{HeaderMap, Request, Response, header};
use hyper::body::Incoming;
use nestbox_envd::auth::parse_basic_user;
use nestbox_envd::connect::server::{
    RequestMeta, ResponseBody, accept, read_unary, unary_error, unary_response,
};
use nestbox_envd::connect::{Code, ConnectError, Message, Shape};

use super::paths::PathError;
use super::users::UserError;

/// Largest request message accepted (stdin chunks are the big ones).
pub const MAX_MESSAGE: usize = 16 << 20;

/// Seconds between keep-alive events on idle streams, unless the client asks otherwise.
const DEFAULT_KEEPALIVE: Duration = Duration::from_secs(30);

/// Runs a unary handler: decodes the request, applies the deadline, encodes the result.
pub async fn unary<Req, Resp, F, Fut>(
    request: Request<Incoming>,
    handler: F,
) -> Response<ResponseBody>
where
    Req: Message,
    Resp: Message,
    F: FnOnce(Req, http::request::Parts) -> Fut,
    Fut: Future<Output = Result<Resp, ConnectError>>,
{
    let (parts, body) = request.into_parts();
    let meta = match accept(&parts.headers, Shape::Unary) {
        Ok(meta) => meta,
        Err(response) => return *response,
    };
    let message = match read_unary::<Req, _>(meta.codec, body, MAX_MESSAGE).await {
        Ok(message) => message,
        Err(err) => return unary_error(&err),
    };
    let result = with_deadline(&meta, handler(message, parts)).await;
    unary_response(meta.codec, result)
}

/// Runs `future` until the request's deadline, if it has one.
pub async fn with_deadline<T>(
    meta: &RequestMeta,
    future: impl Future<Output = Result<T, ConnectError>>,
) -> Result<T, ConnectError> {
    match meta.remaining() {
        Some(remaining) => tokio::time::timeout(remaining, future)
            .await
            .unwrap_or_else(|_| {
                Err(ConnectError::deadline_exceeded(
                    "the request's deadline passed",
                ))
            }),
        None => future.await,
    }
}

/// The user named by `Authorization: Basic …`, if any.
pub fn request_user(headers: &HeaderMap) -> Result<Option<String>, ConnectError> {
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return Ok(None);
    };
    let text = value
        .to_str()
        .map_err(|_| ConnectError::unauthenticated("the authorization header is not text"))?;
    parse_basic_user(text)
        .map(Some)
        .map_err(|e| ConnectError::unauthenticated(format!("invalid authorization header: {e}")))
}

/// The keep-alive interval the client asked for (`Keepalive-Ping-Interval`, seconds).
pub fn keepalive(headers: &HeaderMap) -> Duration {
    headers
        .get(nestbox_envd::headers::KEEPALIVE_PING_INTERVAL)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map_or(DEFAULT_KEEPALIVE, |secs| {
            Duration::from_secs(secs.clamp(1, 600))
        })
}

/// A user that cannot act.
pub fn user_error(err: &UserError) -> ConnectError {
    match err {
        UserError::NotFound { name } => {
            ConnectError::unauthenticated(format!("user {name:?} does not exist in this sandbox"))
        }
        UserError::Read { .. } => {
            tracing::error!(error = %err, "cannot read the user database");
            ConnectError::internal("cannot read the user database")
        }
    }
}

/// A path that cannot be resolved.
pub fn path_error(err: &PathError) -> ConnectError {
    ConnectError::invalid_argument(err.to_string())
}

/// An I/O failure on `path` during `operation`.
pub fn io_error(operation: &str, path: &Path, err: &io::Error) -> ConnectError {
    use io::ErrorKind as K;
    let shown = path.display();
    let code = match err.kind() {
        K::NotFound => Code::NotFound,
        K::PermissionDenied => Code::PermissionDenied,
        K::AlreadyExists => Code::AlreadyExists,
        K::NotADirectory | K::IsADirectory | K::InvalidInput | K::InvalidFilename => {
            Code::InvalidArgument
        }
        K::DirectoryNotEmpty | K::CrossesDevices | K::ReadOnlyFilesystem => {
            Code::FailedPrecondition
        }
        K::StorageFull | K::QuotaExceeded | K::FileTooLarge => Code::ResourceExhausted,
        _ => Code::Internal,
    };
    if code == Code::Internal {
        tracing::error!(operation, path = %shown, error = %err, "filesystem operation failed");
    }
    ConnectError::new(code, format!("{operation} {shown}: {err}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_errors_map_to_codes() {
        let p = Path::new("/x");
        let e = |kind| io_error("stat", p, &io::Error::from(kind)).code;
        assert_eq!(e(io::ErrorKind::NotFound), Code::NotFound);
        assert_eq!(e(io::ErrorKind::PermissionDenied), Code::PermissionDenied);
        assert_eq!(e(io::ErrorKind::AlreadyExists), Code::AlreadyExists);
        assert_eq!(e(io::ErrorKind::StorageFull), Code::ResourceExhausted);
        assert_eq!(e(io::ErrorKind::Other), Code::Internal);
    }

    #[test]
    fn users_and_keepalive_from_headers() {
        let mut headers = HeaderMap::new();
        assert_eq!(request_user(&headers).unwrap(), None);
        assert_eq!(keepalive(&headers), DEFAULT_KEEPALIVE);
        headers.insert(
            header::AUTHORIZATION,
            nestbox_envd::auth::basic_user_header("nobody")
                .parse()
                .unwrap(),
        );
        headers.insert("keepalive-ping-interval", "50".parse().unwrap());
        assert_eq!(request_user(&headers).unwrap().as_deref(), Some("nobody"));
        assert_eq!(keepalive(&headers), Duration::from_secs(50));
        headers.insert(header::AUTHORIZATION, "Bearer x".parse().unwrap());
        assert_eq!(
            request_user(&headers).unwrap_err().code,
            Code::Unauthenticated
        );
    }
}
