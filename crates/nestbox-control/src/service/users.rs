//! Users: login, the caller's own view, and platform-admin user management.
//!
//! Rules: logins answer the same way for an unknown email and a wrong password (and spend
//! the same time); disabled users cannot log in and their sessions stop working at once;
//! every new user gets a personal team they own.

use nestbox_db::{Page, UserStatus, browser_sessions, teams, users};
use nestbox_types::api::{self, CreateUserRequest, CreatedUser, LoginResponse, Me, TeamMembership};
use nestbox_types::{ErrorCode, TeamRole, UserId};

use super::{AuditActor, AuditEntry, validate_email, validate_name};
use crate::auth;
use crate::error::{ApiError, ApiResult};
use crate::extract::{Actor, Caller};
use crate::state::Services;

/// API view of a user.
pub fn user_view(u: &users::User) -> api::User {
    api::User {
        id: u.id,
        email: u.email.clone(),
        name: u.name.clone(),
        is_admin: u.is_admin,
        active: u.status == UserStatus::Active,
        created_at: u.created_at,
    }
}

/// API view of a team.
pub fn team_view(t: &teams::Team) -> api::Team {
    api::Team {
        id: t.id,
        name: t.name.clone(),
        is_byoc: t.is_byoc,
        created_at: t.created_at,
    }
}

impl Services {
    /// Exchanges email and password for a session token. Attempts are rate-limited per
    /// client address (`from`) and per account ([`crate::throttle`]).
    pub async fn login(
        &self,
        email: &str,
        password: &str,
        from: Option<std::net::IpAddr>,
    ) -> ApiResult<LoginResponse> {
        let user = self
            .check_credentials(email, password, from, "token")
            .await?;
        let (token, expires_at) = self.sessions.issue(user.id)?;
        Ok(LoginResponse {
            token,
            expires_at,
            user: user_view(&user),
        })
    }

    /// Checks email and password (rate-limited; audited as `user.login` with how the user
    /// signs in) and returns the active user.
    async fn check_credentials(
        &self,
        email: &str,
        password: &str,
        from: Option<std::net::IpAddr>,
        via: &str,
    ) -> ApiResult<users::User> {
        self.login.admit(from, email)?;
        let invalid = || ApiError::unauthorized("invalid email or password");
        let Some(user) = users::get_by_email(&self.db, email).await? else {
            // The same time as a real check, so unknown emails cannot be told apart.
            self.login.check_password(password.to_owned(), None).await;
            return Err(invalid());
        };
        let ok = self
            .login
            .check_password(password.to_owned(), user.password_hash.clone())
            .await;
        let audit = |ok: bool| AuditEntry {
            actor: AuditActor::User(user.id.to_string()),
            team: None,
            action: "user.login",
            resource_type: "user",
            resource_id: Some(user.id.to_string()),
            ok,
            details: serde_json::json!({ "via": via }),
        };
        if !ok {
            self.audit(audit(false)).await;
            return Err(invalid());
        }
        if user.status != UserStatus::Active {
            return Err(ApiError::unauthorized("the account is disabled"));
        }
        self.audit(audit(true)).await;
        Ok(user)
    }

    /// Signs a browser in: returns the secret for its cookie and the session (with its
    /// CSRF token). Same checks and limits as [`Services::login`].
    pub async fn start_browser_session(
        &self,
        email: &str,
        password: &str,
        from: Option<std::net::IpAddr>,
    ) -> ApiResult<(String, api::BrowserSession)> {
        let user = self
            .check_credentials(email, password, from, "browser")
            .await?;
        let secret = auth::random_hex(32)?;
        let hash = auth::hash_token(&secret);
        let ttl = chrono::Duration::from_std(self.sessions.ttl())
            .map_err(|e| ApiError::internal(format!("session lifetime: {e}")))?;
        let session =
            browser_sessions::create(&self.db, &hash, user.id, chrono::Utc::now() + ttl).await?;
        Ok((
            secret,
            api::BrowserSession {
                csrf_token: self.sessions.csrf_token(&hash),
                expires_at: session.expires_at,
                user: user_view(&user),
            },
        ))
    }

    /// The browser session holding `secret`, with its CSRF token; `401` once it has ended
    /// or its user is disabled.
    pub async fn browser_session(&self, secret: &str) -> ApiResult<api::BrowserSession> {
        let hash = auth::hash_token(secret);
        let ended = || ApiError::unauthorized("the browser session has ended; sign in again");
        let session = browser_sessions::find(&self.db, &hash)
            .await?
            .ok_or_else(ended)?;
        let user = users::get(&self.db, session.user_id).await?;
        if user.status != UserStatus::Active {
            return Err(ApiError::unauthorized("the account is disabled"));
        }
        Ok(api::BrowserSession {
            csrf_token: self.sessions.csrf_token(&hash),
            expires_at: session.expires_at,
            user: user_view(&user),
        })
    }

    /// Signs a browser out: its session ends for good (a copy of the cookie stops
    /// working). A live session needs its CSRF token (`403` without it); one that already
    /// ended needs nothing.
    pub async fn end_browser_session(&self, secret: &str, csrf: &str) -> ApiResult<()> {
        let hash = auth::hash_token(secret);
        let Some(session) = browser_sessions::find(&self.db, &hash).await? else {
            return Ok(());
        };
        if !self.sessions.check_csrf(&hash, csrf) {
            return Err(ApiError::forbidden(format!(
                "missing or wrong CSRF token: send the session's `csrf_token` as {}",
                crate::browser::CSRF_HEADER
            )));
        }
        if browser_sessions::delete(&self.db, &hash).await? {
            self.audit(AuditEntry {
                actor: AuditActor::User(session.user_id.to_string()),
                team: None,
                action: "user.logout",
                resource_type: "user",
                resource_id: Some(session.user_id.to_string()),
                ok: true,
                details: serde_json::json!({}),
            })
            .await;
        }
        Ok(())
    }

    /// The caller and their teams.
    pub async fn me(&self, caller: &Caller) -> ApiResult<Me> {
        match caller.actor {
            Actor::User { id, .. } => {
                let user = users::get(&self.db, id).await?;
                let memberships = teams::list_for_user(&self.db, id).await?;
                Ok(Me {
                    user: Some(user_view(&user)),
                    team_id: caller.team,
                    teams: memberships
                        .iter()
                        .map(|m| TeamMembership {
                            team: team_view(&m.team),
                            role: m.role,
                            is_default: m.is_default,
                        })
                        .collect(),
                })
            }
            Actor::ApiKey { .. } | Actor::System => {
                let team = teams::get(&self.db, caller.team).await?;
                Ok(Me {
                    user: None,
                    team_id: caller.team,
                    teams: vec![TeamMembership {
                        team: team_view(&team),
                        role: TeamRole::Member,
                        is_default: true,
                    }],
                })
            }
        }
    }

    /// Creates a user with a personal team. Platform admins only.
    pub async fn create_user(
        &self,
        caller: &Caller,
        req: &CreateUserRequest,
    ) -> ApiResult<CreatedUser> {
        caller.require_admin()?;
        let created = self.create_user_unchecked(req).await?;
        self.audit(AuditEntry {
            actor: AuditActor::Caller(*caller),
            team: None,
            action: "user.create",
            resource_type: "user",
            resource_id: Some(created.user.id.to_string()),
            ok: true,
            details: serde_json::json!({ "email": created.user.email, "is_admin": created.user.is_admin }),
        })
        .await;
        Ok(created)
    }

    /// Creates a user and their team without an authorization check (first-run bootstrap).
    pub async fn create_user_unchecked(&self, req: &CreateUserRequest) -> ApiResult<CreatedUser> {
        let email = validate_email(&req.email)?;
        let name = validate_name("name", &req.name)?;
        auth::check_password_policy(&req.password)?;
        let hash = self.login.hash_password(req.password.clone()).await?;
        let user = users::create(
            &self.db,
            &users::NewUser {
                email,
                name: name.clone(),
                password_hash: Some(hash),
                is_admin: req.is_admin,
            },
        )
        .await
        .map_err(|e| {
            if e.is_conflict() {
                ApiError::new(
                    ErrorCode::AlreadyExists,
                    "a user with this email already exists",
                )
            } else {
                e.into()
            }
        })?;
        let team = teams::create_with_owner(&self.db, &format!("{name}'s team"), user.id).await?;
        Ok(CreatedUser {
            user: user_view(&user),
            team: team_view(&team),
        })
    }

    /// Activates or deactivates a user, or grants or revokes platform administration.
    /// Platform admins only; an admin cannot deactivate or demote themselves (so the
    /// platform never locks out its last admin by accident). A deactivated user's browser
    /// sessions are deleted, and every other credential of theirs stops working at once.
    pub async fn update_user(
        &self,
        caller: &Caller,
        id: UserId,
        req: &api::UpdateUserRequest,
    ) -> ApiResult<api::User> {
        let me = caller.require_admin()?;
        let user = match users::get(&self.db, id).await {
            Ok(u) => u,
            Err(e) if e.is_not_found() => {
                return Err(ApiError::new(
                    ErrorCode::UserNotFound,
                    format!("user {id} not found"),
                ));
            }
            Err(e) => return Err(e.into()),
        };
        if id == me && (req.active == Some(false) || req.is_admin == Some(false)) {
            return Err(ApiError::invalid(
                "you cannot deactivate or demote yourself; ask another platform admin",
            ));
        }
        let status = req.active.map(|active| {
            if active {
                UserStatus::Active
            } else {
                UserStatus::Disabled
            }
        });
        users::set_access(&self.db, id, status, req.is_admin).await?;
        if req.active == Some(false) {
            // Refused from now on anyway (every request reads the account); this is cleanup.
            browser_sessions::delete_for_user(&self.db, id).await?;
        }
        let updated = users::get(&self.db, id).await?;
        self.audit(AuditEntry {
            actor: AuditActor::Caller(*caller),
            team: None,
            action: "user.update",
            resource_type: "user",
            resource_id: Some(id.to_string()),
            ok: true,
            details: serde_json::json!({ "email": user.email, "active": req.active, "is_admin": req.is_admin }),
        })
        .await;
        Ok(user_view(&updated))
    }

    /// All users, paginated. Platform admins only.
    pub async fn list_users(
        &self,
        caller: &Caller,
        page: &Page,
    ) -> ApiResult<api::Page<api::User>> {
        caller.require_admin()?;
        let paged = users::list(&self.db, page).await?;
        Ok(api::Page {
            items: paged.items.iter().map(user_view).collect(),
            next_cursor: paged.next_cursor,
        })
    }
}
