//! Template builds: a recipe run in a sandbox, ending in a template of the team.

use axum::body::Body;
use axum::extract::State;
use axum::http::StatusCode;
use nestbox_types::api::{Build, BuildFile, BuildLogs, BuildLogsQuery, CreateBuildRequest, Page};
use nestbox_types::{BuildId, ErrorBody};

use crate::error::ApiResult;
use crate::extract::{Caller, Json, Path, Query};
use crate::state::AppState;

/// Starts building the team's template `name` from a recipe. Answers at once with the
/// build, `building`; follow it with `GET …/builds/{build_id}` and its logs. The archives
/// its copy steps name must have been uploaded.
#[utoipa::path(post, path = "/v1/templates/builds", tag = "templates", security(("api_key" = []), ("session" = [])), request_body = CreateBuildRequest,
    responses((status = 202, body = Build),
              (status = 400, description = "an invalid recipe (the message names the step) or archives not uploaded", body = ErrorBody),
              (status = 403, description = "the platform team, and the caller is not a platform admin", body = ErrorBody),
              (status = 404, description = "no such base template (`template_not_found`)", body = ErrorBody),
              (status = 409, description = "the name is a platform template's (`already_exists`)", body = ErrorBody)))]
pub async fn create_build(
    State(s): State<AppState>,
    caller: Caller,
    Json(req): Json<CreateBuildRequest>,
) -> ApiResult<(StatusCode, axum::Json<Build>)> {
    s.services
        .create_build(&caller, &req)
        .await
        .map(|b| (StatusCode::ACCEPTED, axum::Json(b)))
}

/// The team's builds, newest first (the last 100).
#[utoipa::path(get, path = "/v1/templates/builds", tag = "templates", security(("api_key" = []), ("session" = [])),
    responses((status = 200, body = Page<Build>), (status = 401, body = ErrorBody)))]
pub async fn list_builds(
    State(s): State<AppState>,
    caller: Caller,
) -> ApiResult<axum::Json<Page<Build>>> {
    s.services.list_builds(&caller).await.map(|items| {
        axum::Json(Page {
            items,
            next_cursor: None,
        })
    })
}

/// A build: its status and each step's outcome.
#[utoipa::path(get, path = "/v1/templates/builds/{build_id}", tag = "templates", security(("api_key" = []), ("session" = [])),
    params(("build_id" = BuildId, Path)),
    responses((status = 200, body = Build), (status = 404, description = "`build_not_found`", body = ErrorBody)))]
pub async fn get_build(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<BuildId>,
) -> ApiResult<axum::Json<Build>> {
    s.services.get_build(&caller, id).await.map(axum::Json)
}

/// A build's log from an offset: each step's stdout and stderr line by line, and the
/// builder's own messages (`info`). Poll with `offset` = the last answer's `next` until
/// `done`.
#[utoipa::path(get, path = "/v1/templates/builds/{build_id}/logs", tag = "templates", security(("api_key" = []), ("session" = [])),
    params(("build_id" = BuildId, Path), BuildLogsQuery),
    responses((status = 200, body = BuildLogs), (status = 404, description = "`build_not_found`", body = ErrorBody)))]
pub async fn build_logs(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<BuildId>,
    Query(q): Query<BuildLogsQuery>,
) -> ApiResult<axum::Json<BuildLogs>> {
    s.services.build_logs(&caller, id, &q).await.map(axum::Json)
}

/// Cancels a running build: it ends `cancelled` at its runner's next look (within about a
/// second), its sandbox destroyed and no template made.
#[utoipa::path(post, path = "/v1/templates/builds/{build_id}/cancel", tag = "templates", security(("api_key" = []), ("session" = [])),
    params(("build_id" = BuildId, Path)),
    responses((status = 200, body = Build), (status = 404, description = "`build_not_found`", body = ErrorBody),
              (status = 409, description = "the build has already ended", body = ErrorBody)))]
pub async fn cancel_build(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<BuildId>,
) -> ApiResult<axum::Json<Build>> {
    s.services.cancel_build(&caller, id).await.map(axum::Json)
}

/// Uploads an archive (gzip-compressed tar) for copy steps, named by the SHA-256 of its
/// bytes. Uploading what the team already has changes nothing: check first with `GET`.
#[utoipa::path(put, path = "/v1/templates/builds/files/{hash}", tag = "templates", security(("api_key" = []), ("session" = [])),
    params(("hash" = String, Path, description = "SHA-256 of the body, lower-case hex", pattern = "^[0-9a-f]{64}$")),
    request_body(content = Vec<u8>, content_type = "application/octet-stream"),
    responses((status = 201, body = BuildFile),
              (status = 400, description = "the body's SHA-256 is another", body = ErrorBody),
              (status = 413, description = "larger than the archive limit", body = ErrorBody)))]
pub async fn put_build_file(
    State(s): State<AppState>,
    caller: Caller,
    Path(hash): Path<String>,
    body: Body,
) -> ApiResult<(StatusCode, axum::Json<BuildFile>)> {
    s.services
        .put_build_file(&caller, &hash, body.into_data_stream())
        .await
        .map(|f| (StatusCode::CREATED, axum::Json(f)))
}

/// Whether the team has uploaded an archive.
#[utoipa::path(get, path = "/v1/templates/builds/files/{hash}", tag = "templates", security(("api_key" = []), ("session" = [])),
    params(("hash" = String, Path, description = "SHA-256, lower-case hex", pattern = "^[0-9a-f]{64}$")),
    responses((status = 200, body = BuildFile), (status = 404, description = "not uploaded (`not_found`)", body = ErrorBody)))]
pub async fn get_build_file(
    State(s): State<AppState>,
    caller: Caller,
    Path(hash): Path<String>,
) -> ApiResult<axum::Json<BuildFile>> {
    s.services
        .get_build_file(&caller, &hash)
        .await
        .map(axum::Json)
}
