//! Snapshots: templates made from sandboxes, their tags, and the platform's view of every
//! template.

use axum::extract::State;
use axum::http::StatusCode;
use nestbox_types::ErrorBody;
use nestbox_types::api::{
    AssignTagsRequest, CreateSnapshotRequest, Page, Template, TemplateListQuery, TemplateTag,
};
use nestbox_types::limits::DEFAULT_TAG;

use crate::error::ApiResult;
use crate::extract::{Caller, Json, Path, Query};
use crate::state::AppState;

/// Turns a running or paused sandbox into a template of the team: `snapshot` (memory and
/// disk; sandboxes from it continue where it was) or `image` (the disk; sandboxes boot
/// from it). The sandbox keeps its state.
#[utoipa::path(post, path = "/v1/snapshots", tag = "templates", security(("api_key" = []), ("session" = [])), request_body = CreateSnapshotRequest,
    responses((status = 201, body = Template), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
              (status = 409, description = "the name is taken (`already_exists`), the template is in use or the sandbox is neither running nor paused (`conflict`)", body = ErrorBody),
              (status = 503, body = ErrorBody)))]
pub async fn create_snapshot(
    State(s): State<AppState>,
    caller: Caller,
    Json(req): Json<CreateSnapshotRequest>,
) -> ApiResult<(StatusCode, axum::Json<Template>)> {
    s.services
        .create_snapshot(&caller, &req)
        .await
        .map(|t| (StatusCode::CREATED, axum::Json(t)))
}

/// The team's templates and the platform's.
#[utoipa::path(get, path = "/v1/snapshots", tag = "templates", security(("api_key" = []), ("session" = [])), params(TemplateListQuery),
    responses((status = 200, body = Page<Template>), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody)))]
pub async fn list_snapshots(
    State(s): State<AppState>,
    caller: Caller,
    Query(q): Query<TemplateListQuery>,
) -> ApiResult<axum::Json<Page<Template>>> {
    s.services.list_snapshots(&caller, &q).await.map(axum::Json)
}

/// Deletes a template (the team's own, else the platform's: platform admins only) and its
/// files, unless sandboxes made from it still hold resources.
#[utoipa::path(delete, path = "/v1/snapshots/{name}", tag = "templates", security(("api_key" = []), ("session" = [])),
    params(("name" = String, Path, description = "Template name", pattern = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")),
    responses((status = 204), (status = 400, body = ErrorBody),
              (status = 403, description = "a platform template, and the caller is not a platform admin", body = ErrorBody),
              (status = 404, body = ErrorBody), (status = 409, description = "in use", body = ErrorBody),
              (status = 503, body = ErrorBody)))]
pub async fn delete_snapshot(
    State(s): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    s.services
        .delete_snapshot(&caller, &name)
        .await
        .map(|()| StatusCode::NO_CONTENT)
}

/// Every team's templates (platform admins).
#[utoipa::path(get, path = "/v1/admin/templates", tag = "admin", security(("session" = [])), params(TemplateListQuery),
    responses((status = 200, body = Page<Template>), (status = 403, body = ErrorBody)))]
pub async fn list_admin_templates(
    State(s): State<AppState>,
    caller: Caller,
    Query(q): Query<TemplateListQuery>,
) -> ApiResult<axum::Json<Page<Template>>> {
    s.services
        .list_all_templates(&caller, &q)
        .await
        .map(axum::Json)
}

/// A template name's tags: `default` (the template `name` itself) first, then the others,
/// each with the template and build it points at.
#[utoipa::path(get, path = "/v1/snapshots/{name}/tags", tag = "templates", security(("api_key" = []), ("session" = [])),
    params(("name" = String, Path, description = "Template name", pattern = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")),
    responses((status = 200, body = Vec<TemplateTag>), (status = 400, body = ErrorBody),
              (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn list_tags(
    State(s): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
) -> ApiResult<axum::Json<Vec<TemplateTag>>> {
    s.services
        .template_tags(&caller, &name)
        .await
        .map(axum::Json)
}

/// Points tags of the team's template name at the build its tag `from` points at
/// (`default` makes that build the template `name`; the one it replaces stays while
/// sandboxes or other tags hold it). Answers the name's tags afterwards.
#[utoipa::path(post, path = "/v1/snapshots/{name}/tags", tag = "templates", security(("api_key" = []), ("session" = [])),
    params(("name" = String, Path, description = "Template name", pattern = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")),
    request_body = AssignTagsRequest,
    responses((status = 200, body = Vec<TemplateTag>), (status = 400, body = ErrorBody),
              (status = 401, body = ErrorBody),
              (status = 403, description = "the platform team's tags, and the caller is not a platform admin", body = ErrorBody),
              (status = 404, body = ErrorBody),
              (status = 409, description = "a platform template's name (`already_exists`)", body = ErrorBody)))]
pub async fn assign_tags(
    State(s): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
    Json(req): Json<AssignTagsRequest>,
) -> ApiResult<axum::Json<Vec<TemplateTag>>> {
    let from = req.from.as_deref().unwrap_or(DEFAULT_TAG);
    s.services
        .assign_template_tags(&caller, &name, from, &req.tags)
        .await?;
    s.services
        .template_tags(&caller, &name)
        .await
        .map(axum::Json)
}

/// Takes a tag off the team's template name. Taking `default` hides the template `name`
/// itself: its sandboxes carry on, its other tags keep it.
#[utoipa::path(delete, path = "/v1/snapshots/{name}/tags/{tag}", tag = "templates", security(("api_key" = []), ("session" = [])),
    params(("name" = String, Path, description = "Template name", pattern = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"),
           ("tag" = String, Path, description = "Tag", pattern = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")),
    responses((status = 204), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
              (status = 403, description = "the platform team's tags, and the caller is not a platform admin", body = ErrorBody),
              (status = 404, body = ErrorBody)))]
pub async fn remove_tag(
    State(s): State<AppState>,
    caller: Caller,
    Path((name, tag)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    s.services
        .remove_template_tags(&caller, &name, &[tag])
        .await
        .map(|()| StatusCode::NO_CONTENT)
}
