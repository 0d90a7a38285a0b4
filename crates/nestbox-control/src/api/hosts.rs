//! Hosts: admin management, agent registration and heartbeats.

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use nestbox_types::api::{
    CreateHostRequest, CreatedHost, DeleteHostQuery, DrainHostRequest, HeartbeatRequest, Host,
    HostDrain, MoveSandboxRequest, Page, RefreshHostRequest, RefreshHostResponse,
    RegisterHostRequest, RegisterHostResponse, Sandbox,
};
use nestbox_types::{ErrorBody, HostId, SandboxId, TeamId};

use crate::error::{ApiError, ApiResult};
use crate::extract::{Caller, Json, Path, Query};
use crate::state::AppState;

/// Creates a host and its one-time registration token (platform admins).
#[utoipa::path(post, path = "/v1/admin/hosts", tag = "admin", security(("session" = [])), request_body = CreateHostRequest,
    responses((status = 201, body = CreatedHost), (status = 403, body = ErrorBody)))]
pub async fn create_host(
    State(s): State<AppState>,
    caller: Caller,
    Json(req): Json<CreateHostRequest>,
) -> ApiResult<(StatusCode, axum::Json<CreatedHost>)> {
    s.services
        .create_host(&caller, &req)
        .await
        .map(|h| (StatusCode::CREATED, axum::Json(h)))
}

/// Registers a host of a team that brings its own hosts: its one-time registration token
/// (the team's owners and admins).
#[utoipa::path(post, path = "/v1/teams/{team_id}/hosts", tag = "hosts", security(("session" = [])), params(("team_id" = TeamId, Path)), request_body = CreateHostRequest,
    responses((status = 201, body = CreatedHost), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn create_team_host(
    State(s): State<AppState>,
    caller: Caller,
    Path(team): Path<TeamId>,
    Json(req): Json<CreateHostRequest>,
) -> ApiResult<(StatusCode, axum::Json<CreatedHost>)> {
    s.services
        .create_team_host(&caller, team, &req)
        .await
        .map(|h| (StatusCode::CREATED, axum::Json(h)))
}

/// A BYOC team's hosts (the team's owners and admins).
#[utoipa::path(get, path = "/v1/teams/{team_id}/hosts", tag = "hosts", security(("session" = [])), params(("team_id" = TeamId, Path)),
    responses((status = 200, body = Page<Host>), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn list_team_hosts(
    State(s): State<AppState>,
    caller: Caller,
    Path(team): Path<TeamId>,
) -> ApiResult<axum::Json<Page<Host>>> {
    s.services
        .list_team_hosts(&caller, team)
        .await
        .map(|items| {
            axum::Json(Page {
                items,
                next_cursor: None,
            })
        })
}

/// Deletes a BYOC team's host (the team's owners and admins); as the admins' delete.
#[utoipa::path(delete, path = "/v1/teams/{team_id}/hosts/{host_id}", tag = "hosts", security(("session" = [])), params(("team_id" = TeamId, Path), ("host_id" = HostId, Path), DeleteHostQuery),
    responses((status = 204), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn delete_team_host(
    State(s): State<AppState>,
    caller: Caller,
    Path((team, host)): Path<(TeamId, HostId)>,
    Query(q): Query<DeleteHostQuery>,
) -> ApiResult<StatusCode> {
    s.services
        .delete_team_host(&caller, team, host, q.force.unwrap_or(false))
        .await
        .map(|()| StatusCode::NO_CONTENT)
}

/// Lists hosts (platform admins).
#[utoipa::path(get, path = "/v1/admin/hosts", tag = "admin", security(("session" = [])),
    responses((status = 200, body = Page<Host>), (status = 403, body = ErrorBody)))]
pub async fn list_hosts(
    State(s): State<AppState>,
    caller: Caller,
) -> ApiResult<axum::Json<Page<Host>>> {
    s.services.list_hosts(&caller).await.map(|items| {
        axum::Json(Page {
            items,
            next_cursor: None,
        })
    })
}

/// Cordons a host, or lets it take sandboxes again (platform admins): a draining host
/// takes no new sandboxes, and what it holds is moved to other hosts of its pool in the
/// background as `moves` asks (paused sandboxes by default; `all`: running ones too, each
/// paused, moved and resumed with its processes, memory and disk).
#[utoipa::path(put, path = "/v1/admin/hosts/{host_id}/drain", tag = "admin", security(("session" = [])), params(("host_id" = HostId, Path)), request_body = DrainHostRequest,
    responses((status = 200, body = HostDrain), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn drain_host(
    State(s): State<AppState>,
    caller: Caller,
    Path(host): Path<HostId>,
    Json(req): Json<DrainHostRequest>,
) -> ApiResult<axum::Json<HostDrain>> {
    s.services.drain(&caller, host, req).await.map(axum::Json)
}

/// Moves a running or paused sandbox to another host of its pool (platform admins): it
/// is paused (if running), its memory, devices and disk are copied to the new host, and it
/// is resumed there (if it was running) with its processes intact. Answers once it has
/// arrived.
#[utoipa::path(post, path = "/v1/admin/sandboxes/{sandbox_id}/move", tag = "admin", security(("session" = [])), params(("sandbox_id" = SandboxId, Path)), request_body = MoveSandboxRequest,
    responses((status = 200, body = Sandbox), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub async fn move_sandbox(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<SandboxId>,
    Json(req): Json<MoveSandboxRequest>,
) -> ApiResult<axum::Json<Sandbox>> {
    s.services
        .move_sandbox(&caller, id, req)
        .await
        .map(axum::Json)
}

/// Deletes a host (platform admins). A host holding sandboxes gets `409` naming them in
/// `sandbox_ids`, unless `?force=true`, which destroys them first.
#[utoipa::path(delete, path = "/v1/admin/hosts/{host_id}", tag = "admin", security(("session" = [])), params(("host_id" = HostId, Path), DeleteHostQuery),
    responses((status = 204), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn delete_host(
    State(s): State<AppState>,
    caller: Caller,
    Path(host): Path<HostId>,
    Query(q): Query<DeleteHostQuery>,
) -> ApiResult<StatusCode> {
    s.services
        .delete_host(&caller, host, q.force.unwrap_or(false))
        .await
        .map(|()| StatusCode::NO_CONTENT)
}

/// An agent trades its one-time registration token for credentials.
#[utoipa::path(post, path = "/v1/hosts/register", tag = "hosts", request_body = RegisterHostRequest,
    responses((status = 200, body = RegisterHostResponse), (status = 401, body = ErrorBody)))]
pub async fn register_host(
    State(s): State<AppState>,
    Json(req): Json<RegisterHostRequest>,
) -> ApiResult<axum::Json<RegisterHostResponse>> {
    s.services.register_host(&req).await.map(axum::Json)
}

/// An agent trades its refresh token for the next token pair. Any failure (a malformed
/// body included) is 401: the agent must register again.
#[utoipa::path(post, path = "/v1/hosts/refresh", tag = "hosts", request_body = RefreshHostRequest,
    responses((status = 200, body = RefreshHostResponse), (status = 401, body = ErrorBody)))]
pub async fn refresh_host(
    State(s): State<AppState>,
    body: axum::body::Bytes,
) -> ApiResult<axum::Json<RefreshHostResponse>> {
    let req: RefreshHostRequest = serde_json::from_slice(&body)
        .map_err(|_| ApiError::unauthorized("the body must be {\"refresh_token\": …}"))?;
    s.services.refresh_host(&req).await.map(axum::Json)
}

/// An agent reports that it is alive (its access token as bearer).
#[utoipa::path(post, path = "/v1/hosts/{host_id}/heartbeat", tag = "hosts", params(("host_id" = HostId, Path)), request_body = HeartbeatRequest,
    responses((status = 204), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn heartbeat(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path(host): Path<HostId>,
    Json(req): Json<HeartbeatRequest>,
) -> ApiResult<StatusCode> {
    let token = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or_else(|| ApiError::unauthorized("missing host token"))?;
    s.services
        .heartbeat(host, token, &req)
        .await
        .map(|()| StatusCode::NO_CONTENT)
}
