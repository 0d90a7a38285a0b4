//! The REST API (`/v1`): routes, handlers and the OpenAPI document generated from them.
//!
//! Handlers only parse (with our extractors, so every rejection has our error shape), call
//! one service operation and map the result. The OpenAPI document is built from the same
//! handler annotations ([`openapi`]), served at `/openapi.json`, and checked in as
//! `openapi/nestbox.json`; a test fails when the two drift.

mod auth;
mod builds;
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
                       (`X-API-Key`), a user session (`Authorization: Bearer`), or a browser \
                       session (the `nestbox_session` cookie with `X-CSRF-Token`). Errors are \
                       `{\"error\":{\"code\",\"message\"}}` with stable codes.",
        license(name = "Apache-2.0")
    ),
    modifiers(&Security),
    components(schemas(ErrorBody, ErrorCode, nestbox_types::api::LogDirection)),
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
            "browser_session",
            SecurityScheme::ApiKey(ApiKey::Cookie(ApiKeyValue::with_description(
                crate::browser::COOKIE,
                "The web dashboard's session (`POST /v1/auth/session`); requests that change \
                 something also send the session's CSRF token as `X-CSRF-Token`.",
            ))),
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
        .routes(routes!(docs::metrics))
        .routes(routes!(auth::login))
        .routes(routes!(
            auth::create_browser_session,
            auth::get_browser_session,
            auth::delete_browser_session
        ))
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
        .routes(routes!(
            teams::get_admin_team_quotas,
            teams::set_team_quotas
        ))
        .routes(routes!(teams::list_all_teams))
        .routes(routes!(teams::set_team_byoc))
        .routes(routes!(auth::create_user, auth::list_users))
        .routes(routes!(auth::update_user))
        .routes(routes!(hosts::create_host, hosts::list_hosts))
        .routes(routes!(hosts::delete_host))
        .routes(routes!(hosts::drain_host))
        .routes(routes!(hosts::move_sandbox))
        .routes(routes!(hosts::create_team_host, hosts::list_team_hosts))
        .routes(routes!(hosts::delete_team_host))
        .routes(routes!(hosts::register_host))
        .routes(routes!(hosts::refresh_host))
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
        .routes(routes!(snapshots::list_tags, snapshots::assign_tags))
        .routes(routes!(snapshots::remove_tag))
        .routes(routes!(snapshots::list_admin_templates))
        .routes(routes!(builds::create_build, builds::list_builds))
        .routes(routes!(builds::get_build))
        .routes(routes!(builds::build_logs))
        .routes(routes!(builds::cancel_build))
        .routes(routes!(builds::put_build_file, builds::get_build_file))
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
    finished(api)
}

/// The generated document completed with what the annotations cannot say.
fn finished(api: utoipa::openapi::OpenApi) -> utoipa::openapi::OpenApi {
    refine_schemas(with_common_errors(e2b_operation_ids(api)))
}

/// The operations of a path.
fn operations(
    item: &mut utoipa::openapi::PathItem,
) -> impl Iterator<Item = &mut utoipa::openapi::path::Operation> {
    [
        &mut item.get,
        &mut item.put,
        &mut item.post,
        &mut item.delete,
        &mut item.patch,
    ]
    .into_iter()
    .flatten()
}

/// E2B's operations get ids of their own (`e2b_…`): their handlers are named like ours
/// (`list_templates`, `create_sandbox`), and an operation id must be unique in the document
/// (code generators key operations by it).
fn e2b_operation_ids(mut api: utoipa::openapi::OpenApi) -> utoipa::openapi::OpenApi {
    for (path, item) in api.paths.paths.iter_mut() {
        let ours = path.starts_with("/v1/") || path.starts_with("/health") || path == "/metrics";
        if ours {
            continue;
        }
        for op in operations(item) {
            if let Some(id) = op.operation_id.as_mut()
                && !id.starts_with("e2b_")
            {
                *id = format!("e2b_{id}");
            }
        }
    }
    api
}

/// Constraints the derived schemas cannot express, as the server checks them: a command
/// is exactly one of `command` and `argv`; E2B's flags that only `true` is supported for;
/// egress destinations are never empty strings.
fn refine_schemas(mut api: utoipa::openapi::OpenApi) -> utoipa::openapi::OpenApi {
    use utoipa::openapi::RefOr;
    use utoipa::openapi::schema::{
        AllOfBuilder, ArrayBuilder, ArrayItems, ObjectBuilder, OneOfBuilder, Schema, Type,
    };
    let Some(components) = api.components.as_mut() else {
        return api;
    };
    let schemas = &mut components.schemas;
    for name in ["ExecRequest", "StartProcessRequest"] {
        let Some(original) = schemas.remove(name) else {
            continue;
        };
        // The other one absent or null.
        let null = || ObjectBuilder::new().schema_type(Type::Null);
        let command = ObjectBuilder::new()
            .required("command")
            .property(
                "command",
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .min_length(Some(1)),
            )
            .property("argv", null());
        // No argument holds NUL, and the program (the first) is not empty.
        let argument = || {
            ObjectBuilder::new()
                .schema_type(Type::String)
                .pattern(Some("^[^\\x00]*$"))
        };
        let argv = ObjectBuilder::new()
            .required("argv")
            .property(
                "argv",
                ArrayBuilder::new()
                    .prefix_items([argument().min_length(Some(1))])
                    .items(argument())
                    .min_items(Some(1)),
            )
            .property("command", null());
        let exactly_one = OneOfBuilder::new().item(command).item(argv);
        let refined = AllOfBuilder::new().item(original).item(exactly_one);
        schemas.insert(name.to_string(), refined.into());
    }
    for (schema, field) in [
        ("e2b.ConnectSandbox", "memory"),
        ("e2b.ResumedSandbox", "memory"),
        ("e2b.PauseSandbox", "memory"),
        ("e2b.NewSandbox", "autoPauseMemory"),
    ] {
        if let Some(Schema::Object(o)) = property(schemas, schema, field) {
            o.enum_values = Some(vec![serde_json::Value::Bool(true), serde_json::Value::Null]);
        }
    }
    // Input for a process: exactly one of text and base64.
    if let Some(original) = schemas.remove("ProcessInputRequest") {
        let field = |name: &str| {
            ObjectBuilder::new()
                .required(name)
                .property(name, ObjectBuilder::new().schema_type(Type::String))
        };
        let exactly_one = OneOfBuilder::new()
            .item(field("data"))
            .item(field("data_base64"));
        let refined = AllOfBuilder::new().item(original).item(exactly_one);
        schemas.insert("ProcessInputRequest".to_string(), refined.into());
    }
    // Environment variable names.
    for (schema, field) in [
        ("CreateSandboxRequest", "env"),
        ("ExecRequest", "env"),
        ("StartProcessRequest", "env"),
        ("StartTerminalRequest", "env"),
        ("e2b.NewSandbox", "envVars"),
    ] {
        if let Some(Schema::Object(o)) = property(&mut *schemas, schema, field) {
            o.property_names = Some(Box::new(
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .pattern(Some("^[A-Za-z_][A-Za-z0-9_]{0,255}$"))
                    .into(),
            ));
        }
    }
    // Accepted by E2B's API, not supported here: only their absence is.
    for (schema, field) in [
        ("e2b.NewSandbox", "mcp"),
        ("e2b.NewSandbox", "volumeMounts"),
        ("e2b.NetworkConfig", "rules"),
        ("e2b.NetworkConfig", "egressProxy"),
        ("e2b.NetworkConfig", "httpsPorts"),
        ("e2b.SandboxNetworkUpdateConfig", "rules"),
    ] {
        match property(&mut *schemas, schema, field) {
            Some(Schema::Object(o)) => o.enum_values = Some(vec![serde_json::Value::Null]),
            // A list: only an empty one.
            Some(Schema::Array(a)) => a.max_items = Some(0),
            _ => {}
        }
    }
    for (schema, field) in [
        ("e2b.NetworkConfig", "dnsServers"),
        ("e2b.SandboxNetworkUpdateConfig", "dnsServers"),
        ("EgressRequest", "allow_out"),
        ("EgressRequest", "deny_out"),
        ("EgressRules", "allow_out"),
        ("EgressRules", "deny_out"),
        ("e2b.NetworkConfig", "allowOut"),
        ("e2b.NetworkConfig", "denyOut"),
        ("e2b.SandboxNetworkUpdateConfig", "allowOut"),
        ("e2b.SandboxNetworkUpdateConfig", "denyOut"),
    ] {
        if let Some(Schema::Array(a)) = property(schemas, schema, field)
            && let ArrayItems::RefOrSchema(item) = &mut a.items
            && let RefOr::T(Schema::Object(o)) = item.as_mut()
        {
            o.min_length = Some(1);
            // Addresses or blocks, never names (only E2B's `allowOut` takes domains).
            if field == "dnsServers" {
                o.pattern = Some(IPV4.to_string());
            } else if field != "allowOut" {
                o.pattern = Some(IPV4_OR_CIDR.to_string());
            }
        }
    }
    api
}

/// An IPv4 address.
const IPV4: &str = "^((25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])\\.){3}(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])$";
/// An IPv4 address, or a CIDR block of them.
const IPV4_OR_CIDR: &str = "^((25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])\\.){3}(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])(/(3[0-2]|[12]?[0-9]))?$";

/// A property's own (inline) schema in component `schema`.
fn property<'a>(
    schemas: &'a mut std::collections::BTreeMap<
        String,
        utoipa::openapi::RefOr<utoipa::openapi::schema::Schema>,
    >,
    schema: &str,
    field: &str,
) -> Option<&'a mut utoipa::openapi::schema::Schema> {
    use utoipa::openapi::RefOr;
    use utoipa::openapi::schema::Schema;
    match schemas.get_mut(schema)? {
        RefOr::T(Schema::Object(o)) => match o.properties.get_mut(field)? {
            RefOr::T(s) => Some(s),
            RefOr::Ref(_) => None,
        },
        _ => None,
    }
}

/// `POST` operations whose body may be left out (`OptionalJson`).
const OPTIONAL_BODIES: &[&str] = &[
    "/sandboxes/{sandboxID}/connect",
    "/v2/sandboxes/{sandboxID}/connect",
    "/sandboxes/{sandboxID}/fork",
    "/sandboxes/{sandboxID}/pause",
    "/sandboxes/{sandboxID}/refreshes",
    "/sandboxes/{sandboxID}/resume",
    "/sandboxes/{sandboxID}/snapshots",
    "/v1/sandboxes/{sandbox_id}/fork",
    "/v1/sandboxes/{sandbox_id}/resume",
];

/// Adds the error answers any operation can give where its annotation does not list them:
/// `400` (a path, query or body that does not parse), `500` (an unexpected failure) and,
/// for operations that need a credential, `401` (none, or the wrong kind) and `403`.
fn with_common_errors(mut api: utoipa::openapi::OpenApi) -> utoipa::openapi::OpenApi {
    use utoipa::openapi::{ContentBuilder, Ref, ResponseBuilder};
    let error = |what: &str, schema: &str| {
        ResponseBuilder::new()
            .description(what)
            .content(
                "application/json",
                ContentBuilder::new()
                    .schema(Some(Ref::from_schema_name(schema)))
                    .build(),
            )
            .build()
    };
    let global = api.security.clone().unwrap_or_default();
    for (path, item) in api.paths.paths.iter_mut() {
        // E2B's paths answer in E2B's error shape.
        let ours = path.starts_with("/v1/") || path.starts_with("/health") || path == "/metrics";
        let schema = if ours { "ErrorBody" } else { "e2b.Error" };
        // Whatever acts inside a sandbox finds it not running (paused, destroyed), or its
        // host or guest agent not answering.
        let inside = path.starts_with("/v1/sandboxes/{sandbox_id}/");
        let reaches_agent = inside || path.contains("{sandboxID}");
        if let Some(post) = item.post.as_mut()
            && OPTIONAL_BODIES.contains(&path.as_str())
            && let Some(body) = post.request_body.as_mut()
        {
            body.required = Some(utoipa::openapi::Required::False);
        }
        for op in operations(item) {
            let secured = op
                .security
                .as_ref()
                .map_or(!global.is_empty(), |s| !s.is_empty());
            let mut common = vec![
                (
                    "400",
                    "a path, query or body that does not parse (`invalid_request`)",
                ),
                ("500", "an unexpected failure (`internal`)"),
            ];
            if inside {
                common.push(("409", "the sandbox is not running (`sandbox_not_running`)"));
            }
            if reaches_agent {
                common.push((
                    "502",
                    "the sandbox's host or guest agent failed (`agent_error`)",
                ));
            }
            if secured {
                common.push((
                    "401",
                    "no credential, or not the kind this operation needs (`unauthorized`)",
                ));
                common.push(("403", "a credential that may not do this (`forbidden`)"));
            }
            for (code, what) in common {
                op.responses
                    .responses
                    .entry(code.to_string())
                    .or_insert_with(|| error(what, schema).into());
            }
        }
    }
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
    let spec = std::sync::Arc::new(finished(api));
    let api = router
        .route(
            "/openapi.json",
            get(move || {
                let spec = spec.clone();
                async move { Json(spec.as_ref().clone()) }
            }),
        )
        .merge(crate::dashboard::routes())
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(JSON_LIMIT))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            docs::track,
        ))
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
