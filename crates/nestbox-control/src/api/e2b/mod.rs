//! E2B's REST API, served beside `/v1` so that E2B's SDKs work against Nestbox unmodified
//! (`E2B_API_URL` pointing at the control plane).
//!
//! A thin mapping: every handler parses E2B's request, calls the same service operation as
//! the `/v1` handler of that feature, and maps the answer to E2B's shape
//! ([`nestbox_types::e2b`]). No rule lives here.
//!
//! Differences from `/v1` that E2B's SDKs depend on:
//! - errors are `{"code": <HTTP status>, "message"}` ([`E2bError`]); the SDKs branch on
//!   the body's `code` (404 on kill, 409 on pause), so it always equals the status;
//! - a sandbox id that does not parse is "not found", as any unknown id;
//! - `state` is only ever `running` or `paused`: stopped and failed sandboxes are not
//!   found, and lists only hold sandboxes in one of those two states;
//! - success codes are E2B's exactly (201 for create, 204 with no body for kill, timeout
//!   and pause; connect answers 201 when it resumed the sandbox, else 200);
//! - E2B's Python SDK retries 429/502/503/504 unless told `Should-Retry: false`: answers
//!   to operations that must not run twice (create, snapshot) say so.

mod builds;
mod logs;
mod network;
mod sandboxes;
mod templates;

use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use nestbox_types::{ErrorCode, SandboxId, e2b};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::error::ApiError;
use crate::state::AppState;

/// The OpenAPI tag of E2B's routes.
pub const TAG: &str = "e2b";

/// An error in E2B's shape.
#[derive(Debug)]
pub struct E2bError {
    error: ApiError,
    retry: bool,
}

impl E2bError {
    /// Tells E2B's SDKs not to retry this request (it may have had effects).
    pub fn no_retry(mut self) -> Self {
        self.retry = false;
        self
    }
}

impl From<ApiError> for E2bError {
    fn from(error: ApiError) -> Self {
        let retry = error.code.retryable();
        E2bError { error, retry }
    }
}

impl IntoResponse for E2bError {
    fn into_response(self) -> Response {
        let code = self.error.code.http_status();
        let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let body = e2b::Error {
            code: status.as_u16(),
            message: self.error.message,
        };
        let mut resp = (status, axum::Json(body)).into_response();
        let retry = if self.retry { "true" } else { "false" };
        resp.headers_mut()
            .insert("should-retry", HeaderValue::from_static(retry));
        if self.retry {
            resp.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                HeaderValue::from_static("2"),
            );
        }
        resp
    }
}

/// Result of an E2B handler.
pub type E2bResult<T> = Result<T, E2bError>;

/// A sandbox id from an E2B path: one that does not parse is simply not found.
pub(crate) fn sandbox_id(raw: &str) -> Result<SandboxId, E2bError> {
    raw.parse::<SandboxId>().map_err(|_| {
        E2bError::from(ApiError::new(
            ErrorCode::SandboxNotFound,
            format!(
                "sandbox {} not found",
                raw.chars().take(80).collect::<String>()
            ),
        ))
    })
}

/// Our name of the template E2B names `name`: `base` (E2B's default) is our default, and
/// `code-interpreter-v1` (the code-interpreter SDKs' default) our `code-interpreter`.
pub(crate) fn template_name(name: &str) -> &str {
    match name {
        "" | "base" => nestbox_types::limits::DEFAULT_TEMPLATE,
        "code-interpreter-v1" => CODE_INTERPRETER_TEMPLATE,
        other => other,
    }
}

/// Our reference of the template E2B names `name` or `name:tag` ([`template_name`] of its
/// name, the tag as is).
pub(crate) fn template_ref(reference: &str) -> String {
    match reference.split_once(':') {
        Some((name, tag)) => format!("{}:{tag}", template_name(name)),
        None => template_name(reference).to_string(),
    }
}

/// The name of the template `templates/code-interpreter` builds.
pub(crate) const CODE_INTERPRETER_TEMPLATE: &str = "code-interpreter";

/// E2B's page size: 1–100, default 100.
pub(crate) fn page_limit(limit: Option<u32>) -> E2bResult<u32> {
    let limit = limit.unwrap_or(100);
    if !(1..=100).contains(&limit) {
        return Err(ApiError::invalid("limit must be 1–100").into());
    }
    Ok(limit)
}

/// A page of a list: the items, and the next page's token in `x-next-token`.
pub(crate) fn paged<T: serde::Serialize>(items: Vec<T>, next: Option<String>) -> Response {
    let mut resp = axum::Json(items).into_response();
    if let Some(value) = next.and_then(|n| HeaderValue::try_from(n).ok()) {
        resp.headers_mut().insert("x-next-token", value);
    }
    resp
}

/// E2B's routes, for the API router (and its OpenAPI document).
pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(sandboxes::create_sandbox, sandboxes::list_running))
        .routes(routes!(sandboxes::create_sandbox_v2, sandboxes::list_v2))
        .routes(routes!(sandboxes::get_sandbox, sandboxes::kill_sandbox))
        .routes(routes!(sandboxes::set_timeout))
        .routes(routes!(sandboxes::refresh))
        .routes(routes!(sandboxes::pause))
        .routes(routes!(sandboxes::resume))
        .routes(routes!(sandboxes::connect))
        .routes(routes!(sandboxes::connect_v2))
        .routes(routes!(sandboxes::metrics))
        .routes(routes!(sandboxes::many_metrics))
        .routes(routes!(logs::logs))
        .routes(routes!(logs::logs_v2))
        .routes(routes!(sandboxes::fork))
        .routes(routes!(network::update_network))
        .routes(routes!(templates::create_snapshot))
        .routes(routes!(templates::list_snapshots))
        .routes(routes!(templates::list_templates))
        .routes(routes!(templates::get_template, templates::delete_template))
        .routes(routes!(templates::get_alias))
        .routes(routes!(templates::assign_tags, templates::remove_tags))
        .routes(routes!(templates::get_tags))
        .routes(routes!(builds::request_build))
        .routes(routes!(builds::file_upload_link, builds::upload_files))
        .routes(routes!(builds::start_build))
        .routes(routes!(builds::build_status))
}
