//! Request extractors: who is calling ([`Caller`]), and JSON/query extractors whose
//! rejections use our error shape.
//!
//! Authentication order: `X-API-Key` (a team API key), else `Authorization: Bearer` (a
//! user session), else the browser session cookie (with its CSRF and origin rules:
//! [`crate::browser`]). A user's request acts for the team named in `X-Nestbox-Team` (a
//! WebSocket handshake, which cannot carry it, in its `team` query parameter), else their
//! default team. Membership, role, admin flag and account status are read from the
//! database on every request.

use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use nestbox_db::{UserStatus, api_keys, teams, users};
use nestbox_types::{ApiKeyId, ErrorCode, TeamId, TeamRole, UserId};
use serde::de::DeserializeOwned;

use crate::error::ApiError;
use crate::state::AppState;

/// Header selecting the team a user acts for.
pub const TEAM_HEADER: &str = "x-nestbox-team";

/// Who makes a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Actor {
    /// A signed-in user.
    User {
        /// The user.
        id: UserId,
        /// Platform admin (read from the database for this request).
        is_admin: bool,
    },
    /// A team API key.
    ApiKey {
        /// The key.
        id: ApiKeyId,
    },
    /// The control plane itself, acting for a team (a sandbox's lifetime ending). Never
    /// the result of authenticating a request.
    System,
}

impl Actor {
    /// Prefixed id, for audit logs and `created_by`.
    pub fn id_string(&self) -> String {
        match self {
            Actor::User { id, .. } => id.to_string(),
            Actor::ApiKey { id } => id.to_string(),
            Actor::System => "system".to_string(),
        }
    }

    /// Audit actor type.
    pub fn kind(&self) -> nestbox_db::ActorType {
        match self {
            Actor::User { .. } => nestbox_db::ActorType::User,
            Actor::ApiKey { .. } => nestbox_db::ActorType::ApiKey,
            Actor::System => nestbox_db::ActorType::System,
        }
    }

    /// The user, if the caller is one.
    pub fn user(&self) -> Option<UserId> {
        match self {
            Actor::User { id, .. } => Some(*id),
            Actor::ApiKey { .. } | Actor::System => None,
        }
    }

    /// Whether the caller is a platform admin.
    pub fn is_admin(&self) -> bool {
        matches!(self, Actor::User { is_admin: true, .. })
    }
}

/// An authenticated caller and the team the request acts for.
#[derive(Debug, Clone, Copy)]
pub struct Caller {
    /// Who.
    pub actor: Actor,
    /// For which team.
    pub team: TeamId,
    /// Their role in it (API keys act as members).
    pub role: TeamRole,
}

impl Caller {
    /// The control plane acting on `team`'s resources.
    pub fn system(team: TeamId) -> Self {
        Caller {
            actor: Actor::System,
            team,
            role: TeamRole::Member,
        }
    }

    /// Fails unless the caller is a user (not an API key).
    pub fn require_user(&self) -> Result<UserId, ApiError> {
        self.actor.user().ok_or_else(session_required)
    }

    /// Fails unless the caller is a platform admin.
    pub fn require_admin(&self) -> Result<UserId, ApiError> {
        match self.actor {
            Actor::User { id, is_admin: true } => Ok(id),
            Actor::User { .. } => Err(ApiError::forbidden("platform admins only")),
            Actor::ApiKey { .. } | Actor::System => Err(session_required()),
        }
    }
}

/// An operation that only a user session may call, called with an API key: the
/// credential it needs (`Authorization: Bearer`) is missing.
fn session_required() -> ApiError {
    ApiError::new(
        ErrorCode::Unauthorized,
        "this operation needs a user session (`Authorization: Bearer`); API keys cannot call it",
    )
}

fn header<'a>(parts: &'a Parts, name: &str) -> Option<&'a str> {
    parts
        .headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty())
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let db = &state.services.db;
        if let Some(key) = header(parts, "x-api-key") {
            let hash = crate::auth::hash_token(key);
            let (key, team) = api_keys::find_by_hash(db, &hash)
                .await?
                .ok_or_else(|| ApiError::unauthorized("invalid API key"))?;
            if state.services.should_record_key_use(key.id)
                && let Err(e) = api_keys::touch_last_used(db, key.id).await
            {
                tracing::warn!(error = %e, "recording API key use");
            }
            return Ok(Caller {
                actor: Actor::ApiKey { id: key.id },
                team: team.id,
                role: TeamRole::Member,
            });
        }
        let user_id = if let Some(auth) = header(parts, "authorization") {
            let token = auth
                .strip_prefix("Bearer ")
                .or_else(|| auth.strip_prefix("bearer "))
                .ok_or_else(|| ApiError::unauthorized("Authorization must be `Bearer <token>`"))?;
            state.services.sessions.verify(token.trim())?
        } else if let Some(secret) = crate::browser::session_secret(&parts.headers)? {
            browser_user(parts, state, &secret).await?
        } else {
            return Err(ApiError::unauthorized(
                "missing credentials: send X-API-Key or Authorization: Bearer",
            ));
        };
        let user = match users::get(db, user_id).await {
            Ok(u) => u,
            Err(e) if e.is_not_found() => {
                return Err(ApiError::unauthorized("the account no longer exists"));
            }
            Err(e) => return Err(e.into()),
        };
        if user.status != UserStatus::Active {
            return Err(ApiError::unauthorized("the account is disabled"));
        }
        let actor = Actor::User {
            id: user.id,
            is_admin: user.is_admin,
        };
        let (team, role) = match header(parts, TEAM_HEADER).or_else(|| websocket_team(parts)) {
            Some(raw) => {
                let team: TeamId = raw.parse().map_err(|e: nestbox_types::IdParseError| {
                    ApiError::invalid(format!("{TEAM_HEADER}: {e}"))
                })?;
                // The platform team has no members: platform admins own it (its templates
                // are every team's), and nobody else acts for it.
                let role = if team.is_platform() {
                    user.is_admin.then_some(TeamRole::Owner)
                } else {
                    teams::membership(db, team, user.id).await?
                };
                let role = role.ok_or_else(|| {
                    ApiError::new(ErrorCode::TeamNotFound, format!("team {team} not found"))
                })?;
                (team, role)
            }
            None => {
                let t = teams::default_team_for_user(db, user.id)
                    .await?
                    .ok_or_else(|| {
                        ApiError::new(ErrorCode::TeamNotFound, "you belong to no team")
                    })?;
                (t.team.id, t.role)
            }
        };
        Ok(Caller { actor, team, role })
    }
}

/// The team a WebSocket handshake names in its `team` query parameter: a browser cannot
/// send headers with one (a team id is no secret).
fn websocket_team(parts: &Parts) -> Option<&str> {
    let upgrade = header(parts, "upgrade").is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    if !upgrade {
        return None;
    }
    parts
        .uri
        .query()?
        .split('&')
        .find_map(|pair| pair.strip_prefix("team="))
        .filter(|v| !v.is_empty())
}

/// The user of a browser session, with the session's CSRF and origin rules checked (see
/// [`crate::browser`]).
async fn browser_user(parts: &Parts, state: &AppState, secret: &str) -> Result<UserId, ApiError> {
    let hash = crate::auth::hash_token(secret);
    let session = nestbox_db::browser_sessions::find(&state.services.db, &hash)
        .await?
        .ok_or_else(|| ApiError::unauthorized("the browser session has ended; sign in again"))?;
    if !crate::browser::same_origin(&parts.headers) {
        return Err(ApiError::forbidden(
            "a browser session is only accepted from this server's own pages",
        ));
    }
    if crate::browser::is_unsafe(&parts.method) {
        let offered = header(parts, crate::browser::CSRF_HEADER).unwrap_or_default();
        if !state.services.sessions.check_csrf(&hash, offered) {
            return Err(ApiError::forbidden(format!(
                "missing or wrong CSRF token: send the session's `csrf_token` as {}",
                crate::browser::CSRF_HEADER
            )));
        }
    }
    Ok(session.user_id)
}

/// JSON body extractor with our error shape (and a size limit from the router).
#[derive(Debug, Clone, Copy, Default)]
pub struct Json<T>(pub T);

/// A request body's `T`: a JSON object (serde would also read a struct from an array),
/// with whole numbers as integers ([`whole_numbers`]).
fn from_body<T: DeserializeOwned>(mut v: serde_json::Value) -> Result<T, ApiError> {
    if !v.is_object() {
        return Err(ApiError::invalid("a request body is a JSON object"));
    }
    whole_numbers(&mut v);
    serde_json::from_value(v).map_err(|e| ApiError::invalid(format!("invalid request body: {e}")))
}

/// Writes every number with no fractional part as an integer (`5.0` → `5`): JSON Schema
/// counts `5.0` as an integer, so an integer field must take it.
pub(crate) fn whole_numbers(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::Number(n) if n.is_f64() => {
            if let Some(f) = n.as_f64().filter(|f| f.fract() == 0.0) {
                // Exact in an i64/u64 only below 2^53; beyond, leave it as it came.
                if f.abs() < 9_007_199_254_740_992.0 {
                    *n = if f < 0.0 {
                        serde_json::Number::from(f as i64)
                    } else {
                        serde_json::Number::from(f as u64)
                    };
                }
            }
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(whole_numbers),
        serde_json::Value::Object(map) => map.values_mut().for_each(whole_numbers),
        _ => {}
    }
}

impl<T, S> FromRequest<S> for Json<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match axum::Json::<serde_json::Value>::from_request(req, state).await {
            Ok(axum::Json(v)) => from_body(v).map(Json),
            Err(rejection) => {
                use axum::extract::rejection::JsonRejection::*;
                Err(match rejection {
                    MissingJsonContentType(_) => {
                        ApiError::invalid("expected a JSON body (Content-Type: application/json)")
                    }
                    JsonSyntaxError(e) => {
                        ApiError::invalid(format!("malformed JSON: {}", e.body_text()))
                    }
                    JsonDataError(e) => {
                        ApiError::invalid(format!("invalid request body: {}", e.body_text()))
                    }
                    BytesRejection(e)
                        if e.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE =>
                    {
                        ApiError::new(ErrorCode::PayloadTooLarge, "request body too large")
                    }
                    other => ApiError::invalid(other.body_text()),
                })
            }
        }
    }
}

/// Query extractor with our error shape.
#[derive(Debug, Clone, Copy, Default)]
pub struct Query<T>(pub T);

impl<T, S> FromRequestParts<S> for Query<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Query(v)| Query(v))
            .map_err(|e| ApiError::invalid(format!("invalid query: {}", e.body_text())))
    }
}

/// Path extractor with our error shape.
#[derive(Debug, Clone, Copy, Default)]
pub struct Path<T>(pub T);

impl<T, S> FromRequestParts<S> for Path<T>
where
    T: DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Path(v)| Path(v))
            .map_err(|e| ApiError::invalid(format!("invalid path: {}", e.body_text())))
    }
}

/// A JSON body that may be left out: an empty body (with any content type) is
/// `T::default()`; anything else must be valid JSON of `T`.
#[derive(Debug, Clone, Copy, Default)]
pub struct OptionalJson<T>(pub T);

impl<T, S> FromRequest<S> for OptionalJson<T>
where
    T: DeserializeOwned + Default,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = axum::body::Bytes::from_request(req, state)
            .await
            .map_err(|e| {
                if e.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
                    ApiError::new(ErrorCode::PayloadTooLarge, "request body too large")
                } else {
                    ApiError::invalid(e.body_text())
                }
            })?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(OptionalJson(T::default()));
        }
        let v: serde_json::Value = serde_json::from_slice(&bytes)
            .map_err(|e| ApiError::invalid(format!("malformed JSON: {e}")))?;
        from_body(v).map(OptionalJson)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn parts(uri: &str, upgrade: bool) -> Parts {
        let mut b = axum::http::Request::builder().uri(uri);
        if upgrade {
            b = b.header("upgrade", "websocket");
        }
        b.body(()).unwrap().into_parts().0
    }

    #[test]
    fn only_websocket_handshakes_name_their_team_in_the_query() {
        let t = "team-1e0b4a5e-36b5-4b43-9d56-6f8f2ad4d4b1";
        let with = format!("/v1/sandboxes/sb-x/terminals/term-1?team={t}");
        assert_eq!(websocket_team(&parts(&with, true)), Some(t));
        assert_eq!(websocket_team(&parts(&with, false)), None);
        assert_eq!(websocket_team(&parts("/x?team=", true)), None);
        assert_eq!(websocket_team(&parts("/x?a=1", true)), None);
    }
}
