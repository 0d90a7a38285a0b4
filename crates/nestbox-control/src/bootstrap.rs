//! First-run set-up of a one-box installation: an admin user, their team and an API key.

use nestbox_db::users;
use nestbox_types::api::CreateUserRequest;

use crate::error::ApiResult;
use crate::state::Services;

/// What the first run created; shown once.
#[derive(Clone)]
pub struct FirstRun {
    /// Admin email.
    pub email: String,
    /// Admin password.
    pub password: String,
    /// API key of the admin's team.
    pub api_key: String,
    /// The admin's team.
    pub team_id: nestbox_types::TeamId,
}

impl std::fmt::Debug for FirstRun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FirstRun")
            .field("email", &self.email)
            .finish_non_exhaustive()
    }
}

/// Creates the admin, their team and an API key if the installation has no users yet.
pub async fn first_run(services: &Services, email: &str) -> ApiResult<Option<FirstRun>> {
    if users::count(&services.db).await? > 0 {
        return Ok(None);
    }
    let password = crate::auth::random_hex(12)?;
    let created = services
        .create_user_unchecked(&CreateUserRequest {
            email: email.to_string(),
            name: "Admin".into(),
            password: password.clone(),
            is_admin: true,
        })
        .await?;
    let key = services
        .create_api_key_unchecked(created.team.id, "default", Some(created.user.id), None)
        .await?;
    Ok(Some(FirstRun {
        email: created.user.email,
        password,
        api_key: key.key,
        team_id: created.team.id,
    }))
}
