//! E2B's template build routes, which its Template SDK (`Template.build`) calls: announce a
//! build, look up and upload its files by hash, start it with its steps, poll its status
//! and logs. Each maps onto a Nestbox template build (`/v1/templates/builds`):
//!
//! ```text
//! POST /v3/templates                              a build of `name`, waiting
//! GET  /templates/{id}/files/{hash}               present? else a signed upload URL
//! PUT  /templates/{id}/files/{hash}?token=…       the files (a tar.gz), stored by hash
//! POST /v2/templates/{id}/builds/{buildID}        the steps → a recipe; the build starts
//! GET  /templates/{id}/builds/{buildID}/status    status, log entries from logsOffset
//! ```
//!
//! E2B's semantics are kept: steps run as `user` in `/home/user` until `USER`/`WORKDIR`
//! steps say otherwise (the recipe's starting user and directory); a `COPY` copies one
//! path of its upload; `fromImage` of Debian and Python
//! images (and E2B's own `e2bdev/base`) are our `minimal` and `python` templates, Node.js
//! LTS images our `node` template where the installation has one, other images are
//! pulled from their registry. The build id E2B sees is the UUID of ours.

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use nestbox_types::api::{
    BuildLogsQuery, BuildStep, CreateBuildRequest, Recipe, RegistryAuth, StartCommand,
};
use nestbox_types::e2b::{
    BuildLogEntry, BuildStatusQuery, BuildStatusReason, Error, FromImageRegistry,
    TemplateBuildFileUpload, TemplateBuildInfo, TemplateBuildRequestV3, TemplateBuildStartV2,
    TemplateRequestResponseV3, UploadToken,
};
use nestbox_types::{BuildId, BuildStatus, ErrorCode};

use super::E2bResult;
use crate::error::ApiError;
use crate::extract::{Caller, Json, Path, Query};
use crate::state::AppState;

/// How long an upload URL is good for.
const UPLOAD_URL_TTL_SEC: i64 = 3600;

/// The template name of an E2B template id or name (`name:tag` → `name`).
fn name_of(template: &str) -> &str {
    let name = template.split(':').next().unwrap_or(template);
    super::template_name(name)
}

/// Our build id of E2B's (`<uuid>`, or ours as is).
fn build_id(raw: &str) -> Result<BuildId, ApiError> {
    let with_prefix = if raw.starts_with("bld-") {
        raw.to_string()
    } else {
        format!("bld-{raw}")
    };
    with_prefix.parse().map_err(|_| build_not_found(raw))
}

fn build_not_found(raw: &str) -> ApiError {
    ApiError::new(
        ErrorCode::BuildNotFound,
        format!(
            "template build {} not found",
            raw.chars().take(80).collect::<String>()
        ),
    )
}

/// Our template with Node.js and npm (built into an installation with
/// `--templates …,node`).
const NODE_TEMPLATE: &str = "node";

/// Whether `image` is Docker Hub's Node.js image of a version our `node` template stands
/// for: `node:lts` (the Template SDK's `from_node_image()`), `node:latest`, `node:18…`.
fn is_node_lts(image: &str) -> bool {
    let image = image
        .strip_prefix("docker.io/")
        .unwrap_or(image)
        .strip_prefix("library/")
        .unwrap_or(image.strip_prefix("docker.io/").unwrap_or(image));
    let tag = match image.split_once(':') {
        Some(("node", tag)) => tag,
        None if image == "node" => "latest",
        _ => return false,
    };
    let version = tag.split('-').next().unwrap_or(tag);
    matches!(version, "lts" | "latest" | "18") || version.starts_with("18.")
}

/// E2B's build id of ours.
fn e2b_build_id(id: BuildId) -> String {
    id.to_string().trim_start_matches("bld-").to_string()
}

/// Announces a build of a template of the team (its steps follow with
/// `POST /v2/templates/{templateID}/builds/{buildID}`).
#[utoipa::path(post, path = "/v3/templates", tag = super::TAG, security(("api_key" = [])),
    request_body = TemplateBuildRequestV3,
    responses((status = 202, body = TemplateRequestResponseV3), (status = 400, body = Error),
              (status = 401, body = Error), (status = 403, body = Error)))]
pub async fn request_build(
    State(s): State<AppState>,
    caller: Result<Caller, ApiError>,
    body: Result<Json<TemplateBuildRequestV3>, ApiError>,
) -> E2bResult<(StatusCode, axum::Json<TemplateRequestResponseV3>)> {
    let caller = caller?;
    let Json(req) = body?;
    let raw = req
        .name
        .clone()
        .or(req.alias.clone())
        .ok_or_else(|| ApiError::invalid("name is required"))?;
    let name = name_of(&raw).to_string();
    let mut tags = req.tags.clone().unwrap_or_default();
    if let Some((_, tag)) = raw.split_once(':') {
        tags.push(tag.to_string());
    }
    let build = s
        .services
        .announce_build(&caller, &name, &tags, req.cpu_count, req.memory_mb)
        .await?;
    let tags = build.tags.clone();
    Ok((
        StatusCode::ACCEPTED,
        axum::Json(TemplateRequestResponseV3 {
            template_id: name.clone(),
            build_id: e2b_build_id(build.id),
            public: false,
            names: vec![name.clone()],
            tags,
            aliases: vec![name],
        }),
    ))
}

/// Where the caller reached us (`scheme://host`), for the upload URLs we hand out.
fn origin(state: &AppState, headers: &HeaderMap) -> String {
    let text = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(|v| v.split(',').next().unwrap_or(v).trim().to_string())
    };
    let scheme = text("x-forwarded-proto").unwrap_or_else(|| {
        if state.services.cfg.tls.is_some() {
            "https".into()
        } else {
            "http".into()
        }
    });
    let host = text("x-forwarded-host")
        .or_else(|| text(header::HOST.as_str()))
        .unwrap_or_else(|| "localhost".into());
    format!("{scheme}://{host}")
}

/// Whether the team has uploaded the files `hash`; if not, a URL to `PUT` them to (it
/// carries its own authorisation for an hour: the SDK sends no API key there).
#[utoipa::path(get, path = "/templates/{templateID}/files/{hash}", tag = super::TAG, security(("api_key" = [])),
    params(("templateID" = String, Path), ("hash" = String, Path, pattern = "^[0-9a-f]{64}$")),
    responses((status = 201, body = TemplateBuildFileUpload), (status = 400, body = Error),
              (status = 401, body = Error)))]
pub async fn file_upload_link(
    State(s): State<AppState>,
    caller: Result<Caller, ApiError>,
    headers: HeaderMap,
    Path((template, hash)): Path<(String, String)>,
) -> E2bResult<(StatusCode, axum::Json<TemplateBuildFileUpload>)> {
    let caller = caller?;
    let present = match s.services.get_build_file(&caller, &hash).await {
        Ok(_) => true,
        Err(e) if e.code == ErrorCode::NotFound => false,
        Err(e) => return Err(e.into()),
    };
    let url = (!present).then(|| {
        let expires = chrono::Utc::now().timestamp() + UPLOAD_URL_TTL_SEC;
        let token = s
            .services
            .sessions
            .upload_token(caller.team, &hash, expires);
        let template: String =
            percent_encoding::utf8_percent_encode(&template, percent_encoding::NON_ALPHANUMERIC)
                .to_string();
        format!(
            "{}/templates/{template}/files/{hash}?token={token}",
            origin(&s, &headers)
        )
    });
    Ok((
        StatusCode::CREATED,
        axum::Json(TemplateBuildFileUpload { present, url }),
    ))
}

/// Stores the files `hash` (a gzip-compressed tar) through an upload URL: authorised by
/// its token, not an API key.
#[utoipa::path(put, path = "/templates/{templateID}/files/{hash}", tag = super::TAG,
    params(("templateID" = String, Path), ("hash" = String, Path, pattern = "^[0-9a-f]{64}$"), UploadToken),
    request_body(content = Vec<u8>, content_type = "application/octet-stream"),
    responses((status = 200), (status = 400, body = Error), (status = 401, body = Error),
              (status = 413, body = Error)))]
pub async fn upload_files(
    State(s): State<AppState>,
    Path((_template, hash)): Path<(String, String)>,
    token: Result<Query<UploadToken>, ApiError>,
    body: axum::body::Body,
) -> E2bResult<StatusCode> {
    let token = token.map(|Query(t)| t.token).unwrap_or_default();
    let team = s
        .services
        .sessions
        .check_upload_token(&token, &hash, chrono::Utc::now().timestamp())
        .ok_or_else(|| {
            ApiError::new(
                ErrorCode::Unauthorized,
                "the upload URL is not valid (or has expired): ask for a new one",
            )
        })?;
    let caller = Caller::system(team);
    s.services
        .put_keyed_build_file(&caller, &hash, body.into_data_stream())
        .await?;
    Ok(StatusCode::OK)
}

fn arg(step: &nestbox_types::e2b::TemplateStep, i: usize) -> Option<String> {
    step.args.get(i).filter(|a| !a.is_empty()).cloned()
}

/// The recipe of E2B's build request; with the registry credentials and whether to take
/// nothing from the cache.
fn recipe(req: &TemplateBuildStartV2) -> Result<(Recipe, Option<RegistryAuth>, bool), ApiError> {
    let mut recipe = Recipe::default();
    match (&req.from_template, &req.from_image) {
        (Some(_), Some(_)) => {
            return Err(ApiError::invalid(
                "give fromImage or fromTemplate, not both",
            ));
        }
        (Some(t), None) => recipe.base = Some(name_of(t).to_string()),
        (None, Some(image)) if image == "e2bdev/base" || image.starts_with("e2bdev/base:") => {
            recipe.base = Some(nestbox_types::limits::DEFAULT_TEMPLATE.to_string());
        }
        (None, Some(image)) => {
            match nestbox_recipe::base_for_image(image).map_err(ApiError::invalid)? {
                nestbox_recipe::Base::Template(t) => recipe.base = Some(t),
                nestbox_recipe::Base::Image(i) => recipe.image = Some(i),
            }
        }
        (None, None) => {}
    }
    let auth = match &req.from_image_registry {
        None => None,
        Some(FromImageRegistry::Registry { username, password }) => Some(RegistryAuth {
            username: username.clone(),
            password: password.clone(),
        }),
        Some(_) => {
            return Err(ApiError::invalid(
                "AWS and GCP registry credentials are not supported; use a user name and password",
            ));
        }
    };
    // E2B's defaults: the user `user`, in its home.
    recipe.user = Some("user".into());
    recipe.workdir = Some("/home/user".into());
    let mut no_cache = req.force.unwrap_or(false);
    for (i, step) in req.steps.iter().enumerate() {
        no_cache |= step.force.unwrap_or(false);
        let bad = |why: &str| ApiError::invalid(format!("step {} ({}): {why}", i + 1, step.kind));
        let next = match step.kind.as_str() {
            "RUN" => BuildStep::Run {
                command: arg(step, 0).ok_or_else(|| bad("no command"))?,
                user: arg(step, 1),
                cwd: None,
            },
            "COPY" => {
                let src = arg(step, 0).ok_or_else(|| bad("no source"))?;
                // A glob copies from the directory before its first pattern.
                let plain: Vec<&str> = src
                    .split('/')
                    .take_while(|part| !part.contains(['*', '?', '[']))
                    .collect();
                let source = plain.join("/");
                let source = source.trim_start_matches("./").trim_end_matches('/');
                BuildStep::Copy {
                    archive: step.files_hash.clone().ok_or_else(|| bad("no filesHash"))?,
                    dest: arg(step, 1).ok_or_else(|| bad("no destination"))?,
                    user: arg(step, 2).map(|u| u.split(':').next().unwrap_or_default().to_string()),
                    source: (!source.is_empty() && source != ".").then(|| source.to_string()),
                    mode: arg(step, 3),
                }
            }
            "ENV" => {
                if step.args.len() % 2 != 0 {
                    return Err(bad("arguments must be name, value pairs"));
                }
                BuildStep::Env {
                    vars: step
                        .args
                        .chunks(2)
                        .map(|kv| (kv[0].clone(), kv[1].clone()))
                        .collect(),
                }
            }
            "WORKDIR" => BuildStep::Workdir {
                path: arg(step, 0).ok_or_else(|| bad("no path"))?,
            },
            "USER" => BuildStep::User {
                name: arg(step, 0).ok_or_else(|| bad("no user"))?,
            },
            other => {
                return Err(bad(&format!(
                    "`{other}` is not a step type (RUN, COPY, ENV, WORKDIR, USER)"
                )));
            }
        };
        recipe.steps.push(next);
    }
    if let Some(command) = req.start_cmd.clone().filter(|c| !c.trim().is_empty()) {
        recipe.start = Some(StartCommand {
            command,
            ready: req.ready_cmd.clone().filter(|c| !c.trim().is_empty()),
            ready_timeout_sec: None,
        });
    }
    Ok((recipe, auth, no_cache))
}

/// Starts an announced build with its steps.
#[utoipa::path(post, path = "/v2/templates/{templateID}/builds/{buildID}", tag = super::TAG, security(("api_key" = [])),
    params(("templateID" = String, Path), ("buildID" = String, Path)),
    request_body = TemplateBuildStartV2,
    responses((status = 202), (status = 400, body = Error), (status = 401, body = Error),
              (status = 404, body = Error), (status = 409, body = Error)))]
pub async fn start_build(
    State(s): State<AppState>,
    caller: Result<Caller, ApiError>,
    Path((template, build)): Path<(String, String)>,
    body: Result<Json<TemplateBuildStartV2>, ApiError>,
) -> E2bResult<Response> {
    let caller = caller?;
    let Json(req) = body?;
    let id = build_id(&build)?;
    let announced = s.services.get_build(&caller, id).await?;
    if announced.name != name_of(&template) {
        return Err(build_not_found(&build).into());
    }
    let (mut recipe, registry_auth, no_cache) = recipe(&req)?;
    // `from_node_image()` is our `node` template where the installation has one.
    if recipe.image.as_deref().is_some_and(is_node_lts)
        && s.services
            .resolve_template(&caller, NODE_TEMPLATE)
            .await?
            .is_some()
    {
        recipe.image = None;
        recipe.base = Some(NODE_TEMPLATE.into());
    }
    s.services
        .start_announced_build(
            &caller,
            id,
            CreateBuildRequest {
                name: announced.name,
                recipe,
                timeout_sec: None,
                no_cache,
                registry_auth,
                tags: announced.tags,
            },
        )
        .await?;
    // An empty answer the SDKs' JSON readers accept.
    Ok((StatusCode::ACCEPTED, [(header::CONTENT_LENGTH, "0")]).into_response())
}

/// E2B's step of one of ours: `base` before the steps, their 1-based number, then
/// `finalize` for the start command.
fn e2b_step(step: u32, steps: usize) -> String {
    if step == 0 {
        "base".into()
    } else if step as usize > steps {
        "finalize".into()
    } else {
        step.to_string()
    }
}

/// A build's status and its log from `logsOffset`.
#[utoipa::path(get, path = "/templates/{templateID}/builds/{buildID}/status", tag = super::TAG, security(("api_key" = [])),
    params(("templateID" = String, Path), ("buildID" = String, Path), BuildStatusQuery),
    responses((status = 200, body = TemplateBuildInfo), (status = 400, body = Error),
              (status = 401, body = Error), (status = 404, body = Error)))]
pub async fn build_status(
    State(s): State<AppState>,
    caller: Result<Caller, ApiError>,
    Path((template, build)): Path<(String, String)>,
    query: Result<Query<BuildStatusQuery>, ApiError>,
) -> E2bResult<axum::Json<TemplateBuildInfo>> {
    let caller = caller?;
    let Query(q) = query?;
    let id = build_id(&build)?;
    let b = s.services.get_build(&caller, id).await?;
    if b.name != name_of(&template) {
        return Err(build_not_found(&build).into());
    }
    let steps = b.recipe.steps.len();
    let logs = s
        .services
        .build_logs(
            &caller,
            id,
            &BuildLogsQuery {
                offset: q.logs_offset.unwrap_or(0),
                limit: Some(q.limit.unwrap_or(100).clamp(1, 100)),
            },
        )
        .await?;
    let log_entries = logs
        .items
        .into_iter()
        .map(|l| BuildLogEntry {
            timestamp: l.at,
            level: "info".into(),
            message: l.text,
            step: Some(e2b_step(l.step, steps)),
        })
        .collect();
    let (status, reason) = match b.status {
        BuildStatus::Waiting => ("waiting", None),
        BuildStatus::Building => ("building", None),
        BuildStatus::Ready => ("ready", None),
        BuildStatus::Failed | BuildStatus::Cancelled => {
            let failed = b
                .steps
                .iter()
                .find(|st| st.status == "failed" || st.status == "cancelled")
                .map(|st| e2b_step(st.index, steps));
            (
                "error",
                Some(BuildStatusReason {
                    message: b
                        .error
                        .clone()
                        .unwrap_or_else(|| "the build was cancelled".into()),
                    step: failed,
                }),
            )
        }
    };
    Ok(axum::Json(TemplateBuildInfo {
        template_id: b.name.clone(),
        build_id: e2b_build_id(b.id),
        status: status.into(),
        logs: Vec::new(),
        log_entries,
        reason,
    }))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use nestbox_types::e2b::TemplateStep;

    use super::*;

    fn step(kind: &str, args: &[&str]) -> TemplateStep {
        TemplateStep {
            kind: kind.into(),
            args: args.iter().map(|a| a.to_string()).collect(),
            files_hash: (kind == "COPY").then(|| "a".repeat(64)),
            force: None,
        }
    }

    fn start(from_image: &str, steps: Vec<TemplateStep>) -> TemplateBuildStartV2 {
        TemplateBuildStartV2 {
            from_image: Some(from_image.into()),
            steps,
            ..Default::default()
        }
    }

    #[test]
    fn the_sdks_steps_become_a_recipe() {
        let req = TemplateBuildStartV2 {
            start_cmd: Some("serve".into()),
            ready_cmd: Some("check".into()),
            ..start(
                "python:3.11",
                vec![
                    step("COPY", &["app/", "/srv/app", "", ""]),
                    step("COPY", &["./src/*.py", "code", "bob:staff", "0640"]),
                    step("RUN", &["make", "root"]),
                    step("ENV", &["A", "1", "B", "2"]),
                    step("WORKDIR", &["/srv"]),
                    step("USER", &["bob"]),
                ],
            )
        };
        let (recipe, auth, no_cache) = recipe(&req).unwrap();
        assert_eq!(recipe.base.as_deref(), Some("python"));
        assert_eq!(
            (recipe.user.as_deref(), recipe.workdir.as_deref()),
            (Some("user"), Some("/home/user"))
        );
        assert!(auth.is_none() && !no_cache);
        let BuildStep::Copy {
            source,
            dest,
            user,
            mode,
            ..
        } = &recipe.steps[0]
        else {
            panic!("{:?}", recipe.steps[0])
        };
        assert_eq!(
            (source.as_deref(), dest.as_str(), user, mode),
            (Some("app"), "/srv/app", &None, &None)
        );
        // A glob copies from the directory before it; `user:group` names the user.
        let BuildStep::Copy {
            source, user, mode, ..
        } = &recipe.steps[1]
        else {
            panic!("{:?}", recipe.steps[1])
        };
        assert_eq!(
            (source.as_deref(), user.as_deref(), mode.as_deref()),
            (Some("src"), Some("bob"), Some("0640"))
        );
        assert_eq!(
            recipe.steps[2],
            BuildStep::Run {
                command: "make".into(),
                user: Some("root".into()),
                cwd: None
            }
        );
        let BuildStep::Env { vars } = &recipe.steps[3] else {
            panic!("{:?}", recipe.steps[3])
        };
        assert_eq!(vars.len(), 2);
        assert_eq!(
            recipe.start.as_ref().unwrap().ready.as_deref(),
            Some("check")
        );
        recipe.validate().unwrap();
    }

    #[test]
    fn bases_credentials_and_cache() {
        let base = |image: &str| recipe(&start(image, vec![])).unwrap().0;
        assert_eq!(base("e2bdev/base").base.as_deref(), Some("minimal"));
        assert_eq!(base("debian:stable").base.as_deref(), Some("minimal"));
        assert_eq!(base("node:lts").image.as_deref(), Some("node:lts"));
        for node in [
            "node:lts",
            "node",
            "docker.io/library/node:18-slim",
            "node:18.19.0",
            "node:lts-bookworm",
        ] {
            assert!(is_node_lts(node), "{node}");
        }
        for other in [
            "node:20",
            "nodejs:lts",
            "ghcr.io/x/node:lts",
            "node:current",
        ] {
            assert!(!is_node_lts(other), "{other}");
        }
        let mut req = start("ghcr.io/acme/app:1", vec![step("RUN", &["x"])]);
        req.steps[0].force = Some(true);
        req.from_image_registry = Some(FromImageRegistry::Registry {
            username: "u".into(),
            password: "p".into(),
        });
        let (r, auth, no_cache) = recipe(&req).unwrap();
        assert_eq!(r.image.as_deref(), Some("ghcr.io/acme/app:1"));
        assert_eq!(auth.unwrap().username, "u");
        assert!(no_cache, "a forced step builds without the cache");
        req.from_image_registry = Some(FromImageRegistry::Aws {});
        assert_eq!(recipe(&req).unwrap_err().code, ErrorCode::InvalidRequest);
    }

    #[test]
    fn malformed_steps_are_refused_naming_them() {
        for (bad, why) in [
            (step("ENV", &["A"]), "pairs"),
            (step("CMD", &["x"]), "not a step type"),
            (step("RUN", &[]), "no command"),
        ] {
            let err = recipe(&start("debian", vec![bad])).unwrap_err();
            assert!(
                err.message.contains("step 1") && err.message.contains(why),
                "{}",
                err.message
            );
        }
        let mut both = start("debian", vec![]);
        both.from_template = Some("minimal".into());
        assert!(recipe(&both).is_err());
        assert_eq!(e2b_step(0, 3), "base");
        assert_eq!(e2b_step(2, 3), "2");
        assert_eq!(e2b_step(4, 3), "finalize");
        assert_eq!(
            build_id(&e2b_build_id(
                build_id("0a7e2e7f-c442-4810-bb2c-4a067844ba19").unwrap()
            ))
            .unwrap()
            .to_string(),
            "bld-0a7e2e7f-c442-4810-bb2c-4a067844ba19"
        );
        assert!(build_id("nope").is_err());
    }
}
