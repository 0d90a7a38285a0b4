//! The control plane's error: a stable [`ErrorCode`] and a message safe to show, mapped to
//! HTTP once ([`IntoResponse`]).
//!
//! Internal failures (database, unexpected agent errors) are logged in full with a request
//! id and reach the client as `internal` with only that id, never with internals.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use nestbox_db::DbError;
use nestbox_types::{ErrorBody, ErrorCode};

/// An error returned by a service operation or handler.
#[derive(Debug, Clone)]
pub struct ApiError {
    /// Stable code.
    pub code: ErrorCode,
    /// Message for the client.
    pub message: String,
    /// Seconds to wait before retrying (`Retry-After`); retryable errors without one say 2.
    pub retry_after: Option<u64>,
    /// The sandboxes the refused request would affect.
    pub sandbox_ids: Vec<nestbox_types::SandboxId>,
}

impl ApiError {
    /// An error with `code` and `message`.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            retry_after: None,
            sandbox_ids: Vec::new(),
        }
    }

    /// The same error, naming the sandboxes the request would affect.
    pub fn with_sandboxes(mut self, ids: Vec<nestbox_types::SandboxId>) -> Self {
        self.sandbox_ids = ids;
        self
    }

    /// The same error, telling the client to retry after `secs` seconds.
    pub fn retry_after(mut self, secs: u64) -> Self {
        self.retry_after = Some(secs);
        self
    }

    /// 400 `invalid_request`.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::InvalidRequest, message)
    }

    /// 400 `limit_exceeded` naming the limit.
    pub fn limit(field: &str, limit: impl std::fmt::Display, unit: &str) -> Self {
        Self::new(
            ErrorCode::LimitExceeded,
            format!("{field} exceeds the limit of {limit}{unit}"),
        )
    }

    /// 401.
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Unauthorized, message)
    }

    /// 403.
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Forbidden, message)
    }

    /// 409 `conflict`.
    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Conflict, message)
    }

    /// 500, logging `detail` (once, here) with the request's id.
    pub fn internal(detail: impl std::fmt::Display) -> Self {
        let request_id = crate::request_id::current_or_fresh();
        tracing::error!(request_id, error = %detail, "internal error");
        Self::new(
            ErrorCode::Internal,
            format!("internal error (request id {request_id})"),
        )
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

impl std::error::Error for ApiError {}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.code.http_status())
            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut body = ErrorBody::new(self.code, self.message);
        body.error.request_id = crate::request_id::current();
        body.error.sandbox_ids = self.sandbox_ids;
        let mut resp = (status, axum::Json(body)).into_response();
        if let Some(secs) = self.retry_after {
            resp.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                axum::http::HeaderValue::from(secs),
            );
        } else if self.code.retryable() {
            resp.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                axum::http::HeaderValue::from_static("2"),
            );
        }
        resp
    }
}

impl From<DbError> for ApiError {
    fn from(err: DbError) -> Self {
        match &err {
            DbError::NotFound { .. } => ApiError::new(ErrorCode::NotFound, err.to_string()),
            DbError::Conflict { .. } => ApiError::new(ErrorCode::AlreadyExists, err.to_string()),
            DbError::InvalidCursor => ApiError::invalid("invalid cursor"),
            DbError::QuotaExceeded { .. } => {
                ApiError::new(ErrorCode::QuotaExceeded, err.to_string())
            }
            _ => ApiError::internal(&err),
        }
    }
}

/// Maps an agent call's failure. Codes the agent sets for the caller's own mistakes pass
/// through with their message; everything else is an agent error for the client.
pub fn from_agent(status: &tonic::Status) -> ApiError {
    let code = nestbox_proto::error_code(status);
    match code {
        ErrorCode::InvalidRequest
        | ErrorCode::LimitExceeded
        | ErrorCode::FileNotFound
        | ErrorCode::ProcessNotFound
        | ErrorCode::AlreadyExists
        | ErrorCode::Forbidden
        | ErrorCode::Conflict
        | ErrorCode::SandboxNotRunning
        | ErrorCode::InsufficientStorage
        | ErrorCode::NoCapacity
        | ErrorCode::Busy
        | ErrorCode::Timeout
        | ErrorCode::TemplateNotFound
        | ErrorCode::NotImplemented => ApiError::new(code, status.message().to_string()),
        ErrorCode::SandboxNotFound => ApiError::new(
            ErrorCode::SandboxNotRunning,
            "the sandbox is not running on its host",
        ),
        ErrorCode::HostUnavailable => {
            tracing::warn!(error = %status.message(), "host agent unreachable");
            ApiError::new(
                ErrorCode::HostUnavailable,
                "the sandbox's host cannot be reached; retry later",
            )
        }
        _ => {
            let request_id = crate::request_id::current_or_fresh();
            tracing::error!(request_id, code = %code, error = %status.message(), "host agent error");
            ApiError::new(
                ErrorCode::AgentError,
                format!("the host agent failed (request id {request_id})"),
            )
        }
    }
}

/// Result of a service operation.
pub type ApiResult<T> = Result<T, ApiError>;
