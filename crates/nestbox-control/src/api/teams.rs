//! Teams, members and API keys.

use axum::extract::State;
use axum::http::StatusCode;
use nestbox_types::api::{
    AddMemberRequest, AdminTeam, ApiKey, CreateApiKeyRequest, CreatedApiKey, Member, Page,
    PageQuery, SetByocRequest, Team, TeamMembership, TeamQuotaLimits, TeamQuotas, TeamRequest,
    UpdateMemberRequest,
};
use nestbox_types::{ApiKeyId, ErrorBody, TeamId, UserId};

use crate::error::ApiResult;
use crate::extract::{Caller, Json, Path, Query};
use crate::state::AppState;

fn page<T>(items: Vec<T>) -> axum::Json<Page<T>> {
    axum::Json(Page {
        items,
        next_cursor: None,
    })
}

/// The caller's teams.
#[utoipa::path(get, path = "/v1/teams", tag = "teams", security(("session" = [])),
    responses((status = 200, body = Page<TeamMembership>), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)))]
pub async fn list_teams(
    State(s): State<AppState>,
    caller: Caller,
) -> ApiResult<axum::Json<Page<TeamMembership>>> {
    s.services.list_teams(&caller).await.map(page)
}

/// Creates a team owned by the caller.
#[utoipa::path(post, path = "/v1/teams", tag = "teams", security(("session" = [])), request_body = TeamRequest,
    responses((status = 201, body = Team), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody)))]
pub async fn create_team(
    State(s): State<AppState>,
    caller: Caller,
    Json(req): Json<TeamRequest>,
) -> ApiResult<(StatusCode, axum::Json<Team>)> {
    s.services
        .create_team(&caller, &req.name)
        .await
        .map(|t| (StatusCode::CREATED, axum::Json(t)))
}

/// One team.
#[utoipa::path(get, path = "/v1/teams/{team_id}", tag = "teams", security(("session" = [])), params(("team_id" = TeamId, Path)),
    responses((status = 200, body = Team), (status = 404, body = ErrorBody)))]
pub async fn get_team(
    State(s): State<AppState>,
    caller: Caller,
    Path(team): Path<TeamId>,
) -> ApiResult<axum::Json<Team>> {
    s.services.get_team(&caller, team).await.map(axum::Json)
}

/// The team's quotas and what it uses of them (members; the team's API keys).
#[utoipa::path(get, path = "/v1/teams/{team_id}/quotas", tag = "teams", security(("api_key" = []), ("session" = [])), params(("team_id" = TeamId, Path)),
    responses((status = 200, body = TeamQuotas), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn get_team_quotas(
    State(s): State<AppState>,
    caller: Caller,
    Path(team): Path<TeamId>,
) -> ApiResult<axum::Json<TeamQuotas>> {
    s.services.team_quotas(&caller, team).await.map(axum::Json)
}

/// Any team's quotas and what it uses of them (platform admins).
#[utoipa::path(get, path = "/v1/admin/teams/{team_id}/quotas", tag = "admin", security(("session" = [])), params(("team_id" = TeamId, Path)),
    responses((status = 200, body = TeamQuotas), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn get_admin_team_quotas(
    State(s): State<AppState>,
    caller: Caller,
    Path(team): Path<TeamId>,
) -> ApiResult<axum::Json<TeamQuotas>> {
    s.services
        .admin_team_quotas(&caller, team)
        .await
        .map(axum::Json)
}

/// Sets a team's quotas, all at once (`null`: no limit; platform admins). What the team
/// already uses above a new limit keeps running; requests that would add to it get
/// `429 quota_exceeded`.
#[utoipa::path(put, path = "/v1/admin/teams/{team_id}/quotas", tag = "admin", security(("session" = [])), params(("team_id" = TeamId, Path)), request_body = TeamQuotaLimits,
    responses((status = 200, body = TeamQuotas), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn set_team_quotas(
    State(s): State<AppState>,
    caller: Caller,
    Path(team): Path<TeamId>,
    Json(req): Json<TeamQuotaLimits>,
) -> ApiResult<axum::Json<TeamQuotas>> {
    s.services
        .set_team_quotas(&caller, team, &req)
        .await
        .map(axum::Json)
}

/// Every team with its BYOC flag, members and hosts, newest first (platform admins).
#[utoipa::path(get, path = "/v1/admin/teams", tag = "admin", security(("session" = [])), params(PageQuery),
    responses((status = 200, body = Page<AdminTeam>), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)))]
pub async fn list_all_teams(
    State(s): State<AppState>,
    caller: Caller,
    Query(q): Query<PageQuery>,
) -> ApiResult<axum::Json<Page<AdminTeam>>> {
    let page = nestbox_db::Page {
        limit: q.limit.unwrap_or(50).clamp(1, 200),
        cursor: q.cursor,
    };
    s.services
        .list_all_teams(&caller, &page)
        .await
        .map(axum::Json)
}

/// Lets a team bring its own hosts (BYOC), or stops it once it has none (platform
/// admins): its sandboxes then run only on its own hosts.
#[utoipa::path(put, path = "/v1/admin/teams/{team_id}/byoc", tag = "admin", security(("session" = [])), params(("team_id" = TeamId, Path)), request_body = SetByocRequest,
    responses((status = 200, body = Team), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn set_team_byoc(
    State(s): State<AppState>,
    caller: Caller,
    Path(team): Path<TeamId>,
    Json(req): Json<SetByocRequest>,
) -> ApiResult<axum::Json<Team>> {
    s.services
        .set_team_byoc(&caller, team, req.enabled)
        .await
        .map(axum::Json)
}

/// Renames a team (owners and admins).
#[utoipa::path(patch, path = "/v1/teams/{team_id}", tag = "teams", security(("session" = [])), params(("team_id" = TeamId, Path)), request_body = TeamRequest,
    responses((status = 200, body = Team), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn rename_team(
    State(s): State<AppState>,
    caller: Caller,
    Path(team): Path<TeamId>,
    Json(req): Json<TeamRequest>,
) -> ApiResult<axum::Json<Team>> {
    s.services
        .rename_team(&caller, team, &req.name)
        .await
        .map(axum::Json)
}

/// Deletes a team without live sandboxes (owner only).
#[utoipa::path(delete, path = "/v1/teams/{team_id}", tag = "teams", security(("session" = [])), params(("team_id" = TeamId, Path)),
    responses((status = 204), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn delete_team(
    State(s): State<AppState>,
    caller: Caller,
    Path(team): Path<TeamId>,
) -> ApiResult<StatusCode> {
    s.services
        .delete_team(&caller, team)
        .await
        .map(|()| StatusCode::NO_CONTENT)
}

/// Members of a team.
#[utoipa::path(get, path = "/v1/teams/{team_id}/members", tag = "teams", security(("session" = [])), params(("team_id" = TeamId, Path)),
    responses((status = 200, body = Page<Member>), (status = 404, body = ErrorBody)))]
pub async fn list_members(
    State(s): State<AppState>,
    caller: Caller,
    Path(team): Path<TeamId>,
) -> ApiResult<axum::Json<Page<Member>>> {
    s.services.list_members(&caller, team).await.map(page)
}

/// Adds an existing user to a team (owners and admins).
#[utoipa::path(post, path = "/v1/teams/{team_id}/members", tag = "teams", security(("session" = [])), params(("team_id" = TeamId, Path)), request_body = AddMemberRequest,
    responses((status = 201, body = Member), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn add_member(
    State(s): State<AppState>,
    caller: Caller,
    Path(team): Path<TeamId>,
    Json(req): Json<AddMemberRequest>,
) -> ApiResult<(StatusCode, axum::Json<Member>)> {
    s.services
        .add_member(&caller, team, &req)
        .await
        .map(|m| (StatusCode::CREATED, axum::Json(m)))
}

/// Changes a member's role (owners and admins).
#[utoipa::path(patch, path = "/v1/teams/{team_id}/members/{user_id}", tag = "teams", security(("session" = [])),
    params(("team_id" = TeamId, Path), ("user_id" = UserId, Path)), request_body = UpdateMemberRequest,
    responses((status = 200, body = Member), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn update_member(
    State(s): State<AppState>,
    caller: Caller,
    Path((team, user)): Path<(TeamId, UserId)>,
    Json(req): Json<UpdateMemberRequest>,
) -> ApiResult<axum::Json<Member>> {
    s.services
        .set_member_role(&caller, team, user, req.role)
        .await
        .map(axum::Json)
}

/// Removes a member (owners and admins), or leaves the team (the member).
#[utoipa::path(delete, path = "/v1/teams/{team_id}/members/{user_id}", tag = "teams", security(("session" = [])),
    params(("team_id" = TeamId, Path), ("user_id" = UserId, Path), RotateQuery),
    responses((status = 204), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn remove_member(
    State(s): State<AppState>,
    caller: Caller,
    Path((team, user)): Path<(TeamId, UserId)>,
    Query(q): Query<RotateQuery>,
) -> ApiResult<StatusCode> {
    let acting = s.services.remove_member(&caller, team, user).await?;
    if q.rotate_tokens.unwrap_or(false) {
        s.services.rotate_team_tokens(&acting).await?;
    }
    Ok(StatusCode::NO_CONTENT)
}

/// Whether to rotate the tokens of the team's running sandboxes too.
#[derive(Debug, Default, serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct RotateQuery {
    /// Also give every running sandbox of the team new guest and traffic tokens
    /// (`POST /v1/sandboxes/{id}/rotate-tokens` for each), so what the removed member or
    /// the deleted key fetched stops working.
    pub rotate_tokens: Option<bool>,
}

/// API keys of a team (without their secrets).
#[utoipa::path(get, path = "/v1/teams/{team_id}/api-keys", tag = "teams", security(("session" = [])), params(("team_id" = TeamId, Path)),
    responses((status = 200, body = Page<ApiKey>), (status = 404, body = ErrorBody)))]
pub async fn list_api_keys(
    State(s): State<AppState>,
    caller: Caller,
    Path(team): Path<TeamId>,
) -> ApiResult<axum::Json<Page<ApiKey>>> {
    s.services.list_api_keys(&caller, team).await.map(page)
}

/// Creates an API key; the key is in this response only (owners and admins).
#[utoipa::path(post, path = "/v1/teams/{team_id}/api-keys", tag = "teams", security(("session" = [])), params(("team_id" = TeamId, Path)), request_body = CreateApiKeyRequest,
    responses((status = 201, body = CreatedApiKey), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn create_api_key(
    State(s): State<AppState>,
    caller: Caller,
    Path(team): Path<TeamId>,
    Json(req): Json<CreateApiKeyRequest>,
) -> ApiResult<(StatusCode, axum::Json<CreatedApiKey>)> {
    s.services
        .create_api_key(&caller, team, &req.name)
        .await
        .map(|k| (StatusCode::CREATED, axum::Json(k)))
}

/// Revokes an API key (owners and admins).
#[utoipa::path(delete, path = "/v1/teams/{team_id}/api-keys/{key_id}", tag = "teams", security(("session" = [])),
    params(("team_id" = TeamId, Path), ("key_id" = ApiKeyId, Path), RotateQuery),
    responses((status = 204), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn delete_api_key(
    State(s): State<AppState>,
    caller: Caller,
    Path((team, key)): Path<(TeamId, ApiKeyId)>,
    Query(q): Query<RotateQuery>,
) -> ApiResult<StatusCode> {
    let acting = s.services.delete_api_key(&caller, team, key).await?;
    if q.rotate_tokens.unwrap_or(false) {
        s.services.rotate_team_tokens(&acting).await?;
    }
    Ok(StatusCode::NO_CONTENT)
}
