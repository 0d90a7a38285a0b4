//! The REST API (`/v1`): routes, handlers and the OpenAPI document generated from them.
//!
//! Handlers only parse (with our extractors, so every rejection has our error shape), call
//! one service operation and map the result. The OpenAPI document is built from the same
//! handler annotations ([`openapi`]), served at `/openapi.json`, and checked in as
//! `openapi/nestbox.json`; a test fails when the two drift.

mod auth;
mod docs;
pub mod e2b;
mod hosts;
mod processes;
mod sandboxes;
mod snapshots;
mod teams;

use axum::extract::DefaultBodyLimit;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use nestbox_types::{ErrorBody, ErrorCode};
use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::state::AppState;

/// Largest JSON body accepted (uploads are streamed and limited separately).
const JSON_LIMIT: usize = 32 << 20;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Nestbox API",
        description = "Run untrusted code in microVM sandboxes. Authenticate with a team API key \
                       (`X-API-Key`) or a user session (`Authorization: Bearer`). Errors are \
                       `{\"error\":{\"code\",\"message\"}}` with stable codes.",
        license(name = "Apache-2.0")
    ),
    modifiers(&Security),
    components(schemas(ErrorBody, ErrorCode)),
    tags(
        (name = "system", description = "Health and documentation"),
        (name = "auth", description = "Sessions and the caller"),
        (name = "teams", description = "Teams, members and API keys"),
        (name = "sandboxes", description = "Sandboxes and what runs in them"),
        (name = "files", description = "Files inside sandboxes"),
        (name = "processes", description = "Background processes and terminals inside sandboxes"),
        (name = "templates", description = "What sandboxes start from"),
        (name = "hosts", description = "Machines running the host agent"),
        (name = "admin", description = "Platform administration"),
        (name = "e2b", description = "E2B's REST API, for E2B's SDKs (`E2B_API_URL`): E2B's paths, \
                                     field names and error shape (`{\"code\": <status>, \"message\"}`)"),
    )
)]
struct ApiDoc;

struct Security;

impl Modify for Security {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "api_key",
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::new("X-API-Key"))),
        );
        components.add_security_scheme(
            "session",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .build(),
            ),
        );
    }
}

fn api_router() -> OpenApiRouter<AppState> {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(docs::health))
        .routes(routes!(docs::ready))
        .routes(routes!(auth::login))
        .routes(routes!(auth::me))
        .routes(routes!(teams::list_teams, teams::create_team))
        .routes(routes!(
            teams::get_team,
            teams::rename_team,
            teams::delete_team
        ))
        .routes(routes!(teams::list_members, teams::add_member))
        .routes(routes!(teams::update_member, teams::remove_member))
        .routes(routes!(teams::list_api_keys, teams::create_api_key))
        .routes(routes!(teams::delete_api_key))
        .routes(routes!(teams::get_team_quotas))
        .routes(routes!(teams::set_team_quotas))
        .routes(routes!(auth::create_user, auth::list_users))
        .routes(routes!(hosts::create_host, hosts::list_hosts))
        .routes(routes!(hosts::delete_host))
        .routes(routes!(hosts::register_host))
        .routes(routes!(hosts::heartbeat))
        .routes(routes!(sandboxes::list_templates))
        .routes(routes!(
            sandboxes::create_sandbox,
            sandboxes::list_sandboxes
        ))
        .routes(routes!(sandboxes::get_sandbox, sandboxes::destroy_sandbox))
        .routes(routes!(sandboxes::pause_sandbox))
        .routes(routes!(sandboxes::resume_sandbox))
        .routes(routes!(sandboxes::ping_sandbox))
        .routes(routes!(sandboxes::set_lifetime))
        .routes(routes!(sandboxes::set_egress))
        .routes(routes!(sandboxes::rotate_tokens))
        .routes(routes!(sandboxes::fork_sandbox))
        .routes(routes!(
            snapshots::create_snapshot,
            snapshots::list_snapshots
        ))
        .routes(routes!(snapshots::delete_snapshot))
        .routes(routes!(snapshots::list_admin_templates))
        .routes(routes!(sandboxes::exec))
        .routes(routes!(sandboxes::exec_stream))
        .routes(routes!(sandboxes::list_files, sandboxes::remove_path))
        .routes(routes!(sandboxes::stat))
        .routes(routes!(sandboxes::mkdir))
        .routes(routes!(sandboxes::download, sandboxes::upload))
        .routes(routes!(sandboxes::audit_logs))
        .routes(routes!(sandboxes::sandbox_metrics))
        .routes(routes!(sandboxes::sandbox_logs))
        .routes(routes!(processes::start_process, processes::list_processes))
        .routes(routes!(processes::kill_process))
        .routes(routes!(processes::signal_process))
        .routes(routes!(processes::send_stdin))
        .routes(routes!(processes::close_stdin))
        .routes(routes!(processes::process_output))
        .routes(routes!(processes::start_terminal))
        .routes(routes!(processes::attach_terminal))
        .routes(routes!(processes::watch_dir))
        .merge(e2b::routes())
}

/// The OpenAPI document of the API.
pub fn openapi() -> utoipa::openapi::OpenApi {
    let (_, api) = api_router().split_for_parts();
    api
}

/// The OpenAPI document as pretty JSON (what is checked in).
pub fn openapi_json() -> String {
    openapi()
        .to_pretty_json()
        .unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
}

async fn not_found() -> impl IntoResponse {
    crate::error::ApiError::new(ErrorCode::NotFound, "no such endpoint")
}

/// The complete router.
pub fn router(state: AppState) -> Router {
    let (router, api) = api_router().split_for_parts();
    let spec = std::sync::Arc::new(api);
    let api = router
        .route(
            "/openapi.json",
            get(move || {
                let spec = spec.clone();
                async move { Json(spec.as_ref().clone()) }
            }),
        )
        .route("/docs", get(docs::docs_page))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(JSON_LIMIT))
        .with_state(state.clone());
    // The proxy sees every request first: one carrying a sandbox target never reaches the
    // API's routes (or its body limit).
    Router::new()
        .fallback_service(api)
        .layer(axum::middleware::from_fn_with_state(
            state,
            crate::proxy::intercept,
        ))
        .layer(tower_http::trace::TraceLayer::new_for_http())
        .layer(axum::middleware::from_fn(crate::request_id::layer))
}
