//! E2B's template and snapshot routes. A snapshot is a template the team made from a
//! sandbox; its id is its name, which works wherever E2B takes a template id.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use nestbox_types::api::{CreateSnapshotRequest, Template as OurTemplate};
use nestbox_types::e2b::{
    AssignTemplateTagsRequest, AssignedTemplateTags, DeleteTemplateTagsRequest, Error, NewSnapshot,
    SnapshotInfo, SnapshotListQuery, Template, TemplateAlias, TemplateBuild,
    TemplateTag as E2bTemplateTag, TemplateWithBuilds,
};
use nestbox_types::limits::{DEFAULT_TAG, ENVD_VERSION};
use nestbox_types::{ErrorCode, TemplateKind};

use super::{E2bError, E2bResult, sandbox_id};
use crate::error::ApiError;
use crate::extract::OptionalJson;
use crate::extract::{Caller, Json, Path, Query};
use crate::state::AppState;

fn template(t: &OurTemplate) -> Template {
    Template {
        template_id: t.name.clone(),
        build_id: t.id.to_string(),
        cpu_count: t.vcpus,
        memory_mb: t.memory_mb,
        disk_size_mb: t.disk_size_mb,
        public: t.platform,
        aliases: vec![t.name.clone()],
        names: vec![t.name.clone()],
        created_at: t.created_at,
        updated_at: t.created_at,
        created_by: None,
        last_spawned_at: None,
        spawn_count: 0,
        build_count: 1,
        envd_version: ENVD_VERSION.to_string(),
        build_status: "ready".into(),
    }
}

async fn find(state: &AppState, caller: &Caller, name: &str) -> E2bResult<OurTemplate> {
    let name = super::template_name(name);
    let all = state.services.list_templates(caller).await?;
    all.items
        .into_iter()
        .find(|t| t.name == name || t.id.to_string() == name)
        .ok_or_else(|| {
            ApiError::new(
                ErrorCode::TemplateNotFound,
                format!(
                    "template `{}` not found",
                    name.chars().take(80).collect::<String>()
                ),
            )
            .into()
        })
}

/// Makes a snapshot of a sandbox (memory and disk; the disk only with `memory: false`): a
/// template of the team that new sandboxes start from, where the sandbox was.
#[utoipa::path(post, path = "/sandboxes/{sandboxID}/snapshots", tag = super::TAG, security(("api_key" = [])),
    params(("sandboxID" = String, Path)), request_body = NewSnapshot,
    responses((status = 201, body = SnapshotInfo), (status = 400, body = Error), (status = 401, body = Error),
              (status = 404, body = Error), (status = 409, body = Error)))]
pub async fn create_snapshot(
    State(s): State<AppState>,
    caller: Result<Caller, ApiError>,
    Path(raw): Path<String>,
    body: Result<OptionalJson<NewSnapshot>, ApiError>,
) -> E2bResult<(StatusCode, axum::Json<SnapshotInfo>)> {
    let caller = caller?;
    let id = sandbox_id(&raw)?;
    let OptionalJson(req) = body?;
    let name = req.name.unwrap_or_else(|| {
        let id = id.to_string();
        let short: String = id.trim_start_matches("sb-").chars().take(8).collect();
        format!(
            "snapshot-{short}-{}",
            chrono::Utc::now().format("%Y%m%d%H%M%S")
        )
    });
    let kind = match req.memory {
        Some(false) => TemplateKind::Image,
        _ => TemplateKind::Snapshot,
    };
    let made = s
        .services
        .create_snapshot(
            &caller,
            &CreateSnapshotRequest {
                sandbox_id: id,
                name,
                overwrite: false,
                kind: Some(kind),
            },
        )
        .await
        .map_err(|e| E2bError::from(e).no_retry())?;
    Ok((
        StatusCode::CREATED,
        axum::Json(SnapshotInfo {
            snapshot_id: made.name.clone(),
            names: vec![made.name],
        }),
    ))
}

/// The team's snapshots (templates it made from sandboxes), newest first.
#[utoipa::path(get, path = "/snapshots", tag = super::TAG, security(("api_key" = [])), params(SnapshotListQuery),
    responses((status = 200, body = Vec<SnapshotInfo>,
               headers(("x-next-token" = String, description = "the next page's `nextToken`; absent on the last page"))),
              (status = 400, body = Error), (status = 401, body = Error),
              (status = 404, description = "`sandboxID` names no sandbox of the team", body = Error)))]
pub async fn list_snapshots(
    State(s): State<AppState>,
    caller: Result<Caller, ApiError>,
    query: Result<Query<SnapshotListQuery>, ApiError>,
) -> E2bResult<Response> {
    let caller = caller?;
    let Query(q) = query?;
    let limit = super::page_limit(q.limit)?;
    let offset: usize = match q.next_token.as_deref().filter(|t| !t.is_empty()) {
        Some(t) => t
            .parse()
            .map_err(|_| E2bError::from(ApiError::invalid("invalid nextToken")))?,
        None => 0,
    };
    let all = match q.sandbox_id.as_deref() {
        Some(raw) => {
            let id = sandbox_id(raw)?;
            s.services.sandbox_row(&caller, id).await?;
            s.services.templates_made_from(&caller, id).await?
        }
        None => s.services.list_templates(&caller).await?.items,
    };
    let mut mine: Vec<OurTemplate> = all
        .into_iter()
        .filter(|t| !t.platform)
        .filter(|t| q.name.as_deref().is_none_or(|n| n == t.name))
        .collect();
    mine.sort_by(|a, b| b.created_at.cmp(&a.created_at).then(b.name.cmp(&a.name)));
    let end = offset.saturating_add(limit as usize).min(mine.len());
    let items: Vec<SnapshotInfo> = mine
        .get(offset.min(end)..end)
        .unwrap_or_default()
        .iter()
        .map(|t| SnapshotInfo {
            snapshot_id: t.name.clone(),
            names: vec![t.name.clone()],
        })
        .collect();
    Ok(super::paged(
        items,
        (end < mine.len()).then(|| end.to_string()),
    ))
}

/// Templates the team can start sandboxes from (its own and the platform's).
#[utoipa::path(get, path = "/templates", tag = super::TAG, security(("api_key" = [])),
    responses((status = 200, body = Vec<Template>), (status = 401, body = Error)))]
pub async fn list_templates(
    State(s): State<AppState>,
    caller: Result<Caller, ApiError>,
) -> E2bResult<axum::Json<Vec<Template>>> {
    let caller = caller?;
    let all = s.services.list_templates(&caller).await?;
    Ok(axum::Json(all.items.iter().map(template).collect()))
}

/// One template (by name or id) with its build.
#[utoipa::path(get, path = "/templates/{templateID}", tag = super::TAG, security(("api_key" = [])),
    params(("templateID" = String, Path)),
    responses((status = 200, body = TemplateWithBuilds), (status = 401, body = Error), (status = 404, body = Error)))]
pub async fn get_template(
    State(s): State<AppState>,
    caller: Result<Caller, ApiError>,
    Path(name): Path<String>,
) -> E2bResult<axum::Json<TemplateWithBuilds>> {
    let caller = caller?;
    let t = find(&s, &caller, &name).await?;
    let build = TemplateBuild {
        build_id: t.id.to_string(),
        status: "ready".into(),
        created_at: t.created_at,
        updated_at: t.created_at,
        finished_at: Some(t.created_at),
        cpu_count: t.vcpus,
        memory_mb: t.memory_mb,
        disk_size_mb: t.disk_size_mb,
        envd_version: ENVD_VERSION.to_string(),
    };
    Ok(axum::Json(TemplateWithBuilds {
        template: template(&t),
        builds: vec![build],
    }))
}

/// Deletes a template of the team (a snapshot). 404 if there is none of that name.
#[utoipa::path(delete, path = "/templates/{templateID}", tag = super::TAG, security(("api_key" = [])),
    params(("templateID" = String, Path)),
    responses((status = 204), (status = 401, body = Error), (status = 403, body = Error), (status = 404, body = Error),
              (status = 409, body = Error)))]
pub async fn delete_template(
    State(s): State<AppState>,
    caller: Result<Caller, ApiError>,
    Path(name): Path<String>,
) -> E2bResult<StatusCode> {
    let caller = caller?;
    let t = find(&s, &caller, &name).await?;
    s.services.delete_snapshot(&caller, &t.name).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Whether a template of that name exists for the team.
#[utoipa::path(get, path = "/templates/aliases/{alias}", tag = super::TAG, security(("api_key" = [])),
    params(("alias" = String, Path)),
    responses((status = 200, body = TemplateAlias), (status = 401, body = Error), (status = 404, body = Error)))]
pub async fn get_alias(
    State(s): State<AppState>,
    caller: Result<Caller, ApiError>,
    Path(alias): Path<String>,
) -> E2bResult<axum::Json<TemplateAlias>> {
    let caller = caller?;
    match find(&s, &caller, &alias).await {
        Ok(t) => Ok(axum::Json(TemplateAlias {
            template_id: t.name,
            public: t.platform,
        })),
        // A name with tagged builds only exists too.
        Err(e) => match s
            .services
            .template_tags(&caller, super::template_name(&alias))
            .await
        {
            Ok(_) => Ok(axum::Json(TemplateAlias {
                template_id: super::template_name(&alias).to_string(),
                public: false,
            })),
            Err(_) => Err(e),
        },
    }
}

/// E2B's build id of a tag's build: the build's UUID, or the template's for a template no
/// build made (a snapshot).
fn tag_build_id(
    template: nestbox_types::TemplateId,
    build: Option<nestbox_types::BuildId>,
) -> String {
    build.map_or(template.uuid(), |b| b.uuid()).to_string()
}

/// Points tags at the build `target` (`name:tag`) names; `default` makes it the template
/// `name` itself.
#[utoipa::path(post, path = "/templates/tags", tag = super::TAG, security(("api_key" = [])),
    request_body = AssignTemplateTagsRequest,
    responses((status = 201, body = AssignedTemplateTags), (status = 400, body = Error),
              (status = 401, body = Error), (status = 403, body = Error), (status = 404, body = Error),
              (status = 409, description = "a platform template's name", body = Error)))]
pub async fn assign_tags(
    State(s): State<AppState>,
    caller: Result<Caller, ApiError>,
    body: Result<Json<AssignTemplateTagsRequest>, ApiError>,
) -> E2bResult<(StatusCode, axum::Json<AssignedTemplateTags>)> {
    let caller = caller?;
    let Json(req) = body?;
    let (name, from) = req
        .target
        .split_once(':')
        .unwrap_or((&req.target, DEFAULT_TAG));
    let name = super::template_name(name);
    let (source, tags) = s
        .services
        .assign_template_tags(&caller, name, from, &req.tags)
        .await?;
    let build = nestbox_db::builds::made(&s.services.db, source.id)
        .await
        .map_err(ApiError::from)?;
    Ok((
        StatusCode::CREATED,
        axum::Json(AssignedTemplateTags {
            build_id: tag_build_id(source.id, build),
            tags,
        }),
    ))
}

/// Takes tags off a template; `default` hides the template `name` itself (its sandboxes
/// carry on, its other tags keep it).
#[utoipa::path(delete, path = "/templates/tags", tag = super::TAG, security(("api_key" = [])),
    request_body = DeleteTemplateTagsRequest,
    responses((status = 204), (status = 400, body = Error), (status = 401, body = Error),
              (status = 403, body = Error), (status = 404, body = Error)))]
pub async fn remove_tags(
    State(s): State<AppState>,
    caller: Result<Caller, ApiError>,
    body: Result<Json<DeleteTemplateTagsRequest>, ApiError>,
) -> E2bResult<StatusCode> {
    let caller = caller?;
    let Json(req) = body?;
    let name = super::template_name(&req.name);
    s.services
        .remove_template_tags(&caller, name, &req.tags)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// A template's tags, `default` first, with the build each points at.
#[utoipa::path(get, path = "/templates/{templateID}/tags", tag = super::TAG, security(("api_key" = [])),
    params(("templateID" = String, Path)),
    responses((status = 200, body = Vec<E2bTemplateTag>), (status = 400, body = Error),
              (status = 401, body = Error), (status = 404, body = Error)))]
pub async fn get_tags(
    State(s): State<AppState>,
    caller: Result<Caller, ApiError>,
    Path(name): Path<String>,
) -> E2bResult<axum::Json<Vec<E2bTemplateTag>>> {
    let caller = caller?;
    let name = super::template_name(&name);
    let tags = s.services.template_tags(&caller, name).await?;
    Ok(axum::Json(
        tags.into_iter()
            .map(|t| E2bTemplateTag {
                tag: t.tag,
                build_id: tag_build_id(t.template_id, t.build_id),
                created_at: t.created_at,
            })
            .collect(),
    ))
}
