//! Sessions, the caller, and platform-admin user management.

use axum::extract::State;
use axum::http::StatusCode;
use nestbox_types::ErrorBody;
use nestbox_types::api::{
    CreateUserRequest, CreatedUser, LoginRequest, LoginResponse, Me, Page, PageQuery, User,
};

use crate::error::ApiResult;
use crate::extract::{Caller, Json, Query};
use crate::state::AppState;

/// Logs in with email and password and returns a session token. Attempts are limited per
/// client address and per account: past the limit, `429 rate_limited` with `Retry-After`.
#[utoipa::path(post, path = "/v1/auth/login", tag = "auth", request_body = LoginRequest,
    responses((status = 200, body = LoginResponse), (status = 401, body = ErrorBody), (status = 400, body = ErrorBody),
              (status = 429, description = "too many attempts; retry after `Retry-After` seconds", body = ErrorBody)))]
pub async fn login(
    State(s): State<AppState>,
    extensions: axum::http::Extensions,
    Json(req): Json<LoginRequest>,
) -> ApiResult<axum::Json<LoginResponse>> {
    let from = extensions
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .map(|c| c.0.ip());
    s.services
        .login(&req.email, &req.password, from)
        .await
        .map(axum::Json)
}

/// The caller: user (if any), current team and teams.
#[utoipa::path(get, path = "/v1/me", tag = "auth", security(("api_key" = []), ("session" = [])),
    responses((status = 200, body = Me), (status = 401, body = ErrorBody)))]
pub async fn me(State(s): State<AppState>, caller: Caller) -> ApiResult<axum::Json<Me>> {
    s.services.me(&caller).await.map(axum::Json)
}

/// Creates a user and their personal team.
#[utoipa::path(post, path = "/v1/admin/users", tag = "admin", security(("session" = [])), request_body = CreateUserRequest,
    responses((status = 201, body = CreatedUser), (status = 403, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn create_user(
    State(s): State<AppState>,
    caller: Caller,
    Json(req): Json<CreateUserRequest>,
) -> ApiResult<(StatusCode, axum::Json<CreatedUser>)> {
    s.services
        .create_user(&caller, &req)
        .await
        .map(|u| (StatusCode::CREATED, axum::Json(u)))
}

/// Lists users.
#[utoipa::path(get, path = "/v1/admin/users", tag = "admin", security(("session" = [])), params(PageQuery),
    responses((status = 200, body = Page<User>), (status = 403, body = ErrorBody)))]
pub async fn list_users(
    State(s): State<AppState>,
    caller: Caller,
    Query(q): Query<PageQuery>,
) -> ApiResult<axum::Json<Page<User>>> {
    let page = nestbox_db::Page {
        limit: q.limit.unwrap_or(50).clamp(1, 200),
        cursor: q.cursor,
    };
    s.services.list_users(&caller, &page).await.map(axum::Json)
}
