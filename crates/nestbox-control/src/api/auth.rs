//! Sessions, the caller, and platform-admin user management.

use axum::extract::State;
use axum::http::StatusCode;
use axum::http::{HeaderMap, header};
use axum::response::AppendHeaders;
use nestbox_types::ErrorBody;
use nestbox_types::UserId;
use nestbox_types::api::{
    BrowserSession, CreateUserRequest, CreatedUser, LoginRequest, LoginResponse, Me, Page,
    PageQuery, UpdateUserRequest, User,
};

use crate::error::ApiError;
use crate::error::ApiResult;
use crate::extract::{Caller, Json, Path, Query};
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

/// Signs a browser in (the web dashboard): the session goes in an HttpOnly,
/// `SameSite=Strict` cookie (`__Host-nestbox_session` over HTTPS, `nestbox_session` over
/// plain HTTP), and the answer carries the CSRF token that requests changing something
/// must send as `X-CSRF-Token`. Same limits as `/v1/auth/login`.
#[utoipa::path(post, path = "/v1/auth/session", tag = "auth", request_body = LoginRequest,
    responses((status = 200, body = BrowserSession, headers(("set-cookie" = String, description = "the session cookie"))),
              (status = 401, body = ErrorBody),
              (status = 429, description = "too many attempts; retry after `Retry-After` seconds", body = ErrorBody)))]
pub async fn create_browser_session(
    State(s): State<AppState>,
    extensions: axum::http::Extensions,
    headers: HeaderMap,
    Json(req): Json<LoginRequest>,
) -> ApiResult<(
    AppendHeaders<[(header::HeaderName, String); 1]>,
    axum::Json<BrowserSession>,
)> {
    let from = extensions
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .map(|c| c.0.ip());
    let (secret, session) = s
        .services
        .start_browser_session(&req.email, &req.password, from)
        .await?;
    let secure = crate::browser::is_secure(s.services.cfg.tls.is_some(), &headers);
    let cookie = crate::browser::session_cookie(&secret, s.services.sessions.ttl(), secure);
    Ok((
        AppendHeaders([(header::SET_COOKIE, cookie)]),
        axum::Json(session),
    ))
}

/// The browser's session, with its CSRF token (after a page reload, say). Only the session
/// cookie is accepted here.
#[utoipa::path(get, path = "/v1/auth/session", tag = "auth", security(("browser_session" = [])),
    responses((status = 200, body = BrowserSession), (status = 401, description = "no session, or it has ended", body = ErrorBody)))]
pub async fn get_browser_session(
    State(s): State<AppState>,
    headers: HeaderMap,
) -> ApiResult<axum::Json<BrowserSession>> {
    let secret = crate::browser::session_secret(&headers)?
        .ok_or_else(|| ApiError::unauthorized("not signed in"))?;
    s.services.browser_session(&secret).await.map(axum::Json)
}

/// Signs the browser out: the session ends on the server (a copy of the cookie stops
/// working) and the cookie is cleared. It needs no credential: a live session needs its
/// CSRF token here too, and without one there is only the cookie to clear.
#[utoipa::path(delete, path = "/v1/auth/session", tag = "auth",
    responses((status = 204, description = "signed out", headers(("set-cookie" = String, description = "clears the session cookie"))),
              (status = 403, description = "a live session without its CSRF token, or from another site", body = ErrorBody)))]
pub async fn delete_browser_session(
    State(s): State<AppState>,
    headers: HeaderMap,
) -> ApiResult<(StatusCode, AppendHeaders<[(header::HeaderName, String); 2]>)> {
    if !crate::browser::same_origin(&headers) {
        return Err(ApiError::forbidden(
            "a browser session is only accepted from this server's own pages",
        ));
    }
    // Conflicting cookies are cleared all the same.
    if let Ok(Some(secret)) = crate::browser::session_secret(&headers) {
        let csrf = headers
            .get(crate::browser::CSRF_HEADER)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        s.services.end_browser_session(&secret, csrf).await?;
    }
    let [plain, secure] = crate::browser::clearing_cookies();
    Ok((
        StatusCode::NO_CONTENT,
        AppendHeaders([(header::SET_COOKIE, plain), (header::SET_COOKIE, secure)]),
    ))
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

/// Activates or deactivates a user, or grants or revokes platform administration. A
/// deactivated user is signed out everywhere at once.
#[utoipa::path(patch, path = "/v1/admin/users/{user_id}", tag = "admin", security(("session" = [])),
    params(("user_id" = UserId, Path)), request_body = UpdateUserRequest,
    responses((status = 200, body = User), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn update_user(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<UserId>,
    Json(req): Json<UpdateUserRequest>,
) -> ApiResult<axum::Json<User>> {
    s.services
        .update_user(&caller, id, &req)
        .await
        .map(axum::Json)
}
