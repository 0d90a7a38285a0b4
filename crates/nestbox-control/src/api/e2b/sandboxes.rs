//! E2B's sandbox routes: create, list, get, kill, lifetime, pause/resume/connect, metrics.

use std::collections::BTreeMap;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::Response;
use chrono::{DateTime, Utc};
use nestbox_db::sandboxes::{self as repo, LifetimeChange, SandboxFilter};
use nestbox_types::api::{self, CreateSandboxRequest};
use nestbox_types::e2b::{
    ConnectSandbox, Error, Lifecycle, ListQuery, ListRunningQuery, ListedSandbox, ManyMetricsQuery,
    MetricsQuery, NewSandbox, PauseSandbox, ResumedSandbox, Sandbox, SandboxDetail,
    SandboxForkRequest, SandboxForkResult, SandboxMetric, SandboxRefresh, SandboxState,
    SandboxTimeout, SandboxesWithMetrics,
};
use nestbox_types::limits::ENVD_VERSION;
use nestbox_types::{ErrorCode, Expiry, SandboxId, SandboxStatus};

use super::{E2bError, E2bResult, sandbox_id};
use crate::error::ApiError;
use crate::extract::{Caller, Path, Query};
use crate::extract::{Json, OptionalJson};
use crate::state::AppState;

/// Lifetime of a sandbox created without `timeout`, seconds (E2B's default).
const DEFAULT_LIFETIME_SEC: u32 = 300;
/// Extension of a refresh without `duration`, seconds.
const DEFAULT_REFRESH_SEC: u32 = 60;
/// Longest extension of one refresh, seconds (E2B's limit).
const MAX_REFRESH_SEC: u32 = 3600;

fn not_supported(what: &str) -> E2bError {
    ApiError::invalid(format!("{what} is not supported by this server")).into()
}

/// Refuses `memory: false` (E2B's filesystem-only pauses and cold resumes): here a
/// sandbox's memory is always kept.
fn memory_kept(memory: Option<bool>) -> E2bResult<()> {
    match memory {
        Some(false) => Err(not_supported(
            "memory: false (a pause always keeps memory and a resume restores it)",
        )),
        _ => Ok(()),
    }
}

/// The domain E2B's SDKs build `https://{port}-{sandboxID}.{domain}` from: the proxy
/// domain, else the host the caller reached us at (so an SDK without `E2B_SANDBOX_URL`
/// fails on a name that cannot resolve instead of sending the sandbox's token elsewhere).
fn domain(state: &AppState, headers: &HeaderMap) -> Option<String> {
    state.services.cfg.proxy_domain.clone().or_else(|| {
        headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .map(str::to_owned)
    })
}

fn created(state: &AppState, headers: &HeaderMap, sb: &api::Sandbox) -> Sandbox {
    Sandbox {
        template_id: sb.template.clone(),
        sandbox_id: sb.id.to_string(),
        client_id: sb.host_id.map(|h| h.to_string()).unwrap_or_default(),
        envd_version: ENVD_VERSION.to_string(),
        envd_access_token: sb.envd_access_token.clone().unwrap_or_default(),
        traffic_access_token: sb.traffic_access_token.clone().unwrap_or_default(),
        domain: domain(state, headers),
    }
}

/// E2B's state of a sandbox, `None` for one E2B would not show (stopped, failed).
fn state_of(status: SandboxStatus) -> Option<SandboxState> {
    match status {
        SandboxStatus::Pending
        | SandboxStatus::Starting
        | SandboxStatus::Running
        | SandboxStatus::Missing => Some(SandboxState::Running),
        SandboxStatus::Paused => Some(SandboxState::Paused),
        SandboxStatus::Stopped | SandboxStatus::Error => None,
    }
}

/// `endAt` of a sandbox without a deadline: the last second of year 9999, which every
/// SDK's date parser takes.
fn no_deadline() -> DateTime<Utc> {
    DateTime::from_timestamp(253_402_300_799, 0).unwrap_or(DateTime::<Utc>::MAX_UTC)
}

fn listed(sb: &repo::Sandbox) -> Option<ListedSandbox> {
    let state = state_of(sb.status)?;
    Some(ListedSandbox {
        template_id: sb.template_name.clone(),
        sandbox_id: sb.id.to_string(),
        client_id: sb.host_id.map(|h| h.to_string()).unwrap_or_default(),
        started_at: sb.started_at.unwrap_or(sb.created_at),
        end_at: sb.expires_at.unwrap_or_else(no_deadline),
        cpu_count: sb.vcpus,
        memory_mb: sb.memory_mb,
        disk_size_mb: sb.disk_size_mb,
        metadata: sb.metadata.clone(),
        state,
        envd_version: ENVD_VERSION.to_string(),
    })
}

fn sandbox_not_found(id: SandboxId) -> E2bError {
    ApiError::new(
        ErrorCode::SandboxNotFound,
        format!("sandbox {id} not found"),
    )
    .into()
}

/// The caller's sandbox if E2B would show it.
pub(super) async fn visible(
    state: &AppState,
    caller: &Caller,
    id: SandboxId,
) -> E2bResult<repo::Sandbox> {
    let sb = state.services.sandbox_row(caller, id).await?;
    if state_of(sb.status).is_none() {
        return Err(sandbox_not_found(id));
    }
    Ok(sb)
}

fn create_request(req: NewSandbox) -> E2bResult<CreateSandboxRequest> {
    if req.auto_pause_memory == Some(false) {
        return Err(not_supported(
            "autoPauseMemory: false (a pause always keeps memory)",
        ));
    }
    if req.mcp.as_ref().is_some_and(|m| !m.is_null()) {
        return Err(not_supported("mcp"));
    }
    if req.volume_mounts.as_ref().is_some_and(|v| !v.is_empty()) {
        return Err(not_supported("volumeMounts"));
    }
    let net = req.network.unwrap_or_default();
    if net.mask_request_host.is_some() {
        return Err(not_supported("network.maskRequestHost"));
    }
    if net.https_ports.as_ref().is_some_and(|p| !p.is_empty()) {
        return Err(not_supported("network.httpsPorts"));
    }
    let egress = super::network::egress_request(
        net.allow_out,
        net.deny_out,
        net.dns_servers,
        req.allow_internet_access,
        &net.rules,
        &net.egress_proxy,
    )?;
    let template = super::template_ref(&req.template_id);
    Ok(CreateSandboxRequest {
        template: Some(template),
        // E2B's sandboxes have an absolute lifetime and no inactivity timeout.
        timeout_sec: Some(0),
        env: req.env_vars.unwrap_or_default(),
        metadata: req.metadata.unwrap_or_default(),
        lifetime_sec: Some(req.timeout.unwrap_or(DEFAULT_LIFETIME_SEC)),
        on_expiry: Some(if req.auto_pause == Some(true) {
            Expiry::Pause
        } else {
            Expiry::Destroy
        }),
        egress: Some(egress),
        // E2B's default: a sandbox's URLs are public unless asked otherwise.
        public_traffic: Some(net.allow_public_traffic.unwrap_or(true)),
        auto_resume: Some(req.auto_resume.is_some_and(|a| a.enabled)),
        ..Default::default()
    })
}

async fn create(
    state: &AppState,
    caller: &Caller,
    headers: &HeaderMap,
    req: NewSandbox,
) -> E2bResult<(StatusCode, axum::Json<Sandbox>)> {
    let req = create_request(req).map_err(E2bError::no_retry)?;
    let sb = state
        .services
        .create_sandbox(caller, &req)
        .await
        .map_err(|e| E2bError::from(e).no_retry())?;
    Ok((
        StatusCode::CREATED,
        axum::Json(created(state, headers, &sb)),
    ))
}

/// Creates a sandbox (E2B's SDKs before 2.5).
#[utoipa::path(post, path = "/sandboxes", tag = super::TAG, security(("api_key" = [])), request_body = NewSandbox,
    responses((status = 201, body = Sandbox), (status = 400, body = Error), (status = 401, body = Error),
              (status = 404, body = Error), (status = 503, body = Error)))]
pub async fn create_sandbox(
    State(s): State<AppState>,
    caller: Result<Caller, ApiError>,
    headers: HeaderMap,
    body: Result<Json<NewSandbox>, ApiError>,
) -> E2bResult<(StatusCode, axum::Json<Sandbox>)> {
    let Json(req) = body?;
    create(&s, &caller?, &headers, req).await
}

/// Creates a sandbox; it ends `timeout` seconds after it starts (killed, or paused with
/// `autoPause`) unless extended.
#[utoipa::path(post, path = "/v2/sandboxes", tag = super::TAG, security(("api_key" = [])), request_body = NewSandbox,
    responses((status = 201, body = Sandbox), (status = 400, body = Error), (status = 401, body = Error),
              (status = 404, body = Error), (status = 503, body = Error)))]
pub async fn create_sandbox_v2(
    State(s): State<AppState>,
    caller: Result<Caller, ApiError>,
    headers: HeaderMap,
    body: Result<Json<NewSandbox>, ApiError>,
) -> E2bResult<(StatusCode, axum::Json<Sandbox>)> {
    let Json(req) = body?;
    create(&s, &caller?, &headers, req).await
}

/// Decodes E2B's metadata filter: form-encoded `key=value` pairs whose keys and values are
/// percent-encoded once more.
fn metadata_filter(raw: Option<&str>) -> E2bResult<Vec<(String, String)>> {
    let Some(raw) = raw.filter(|r| !r.is_empty()) else {
        return Ok(Vec::new());
    };
    let decode = |s: &str| -> E2bResult<String> {
        percent_encoding::percent_decode_str(s)
            .decode_utf8()
            .map(|c| c.into_owned())
            .map_err(|_| ApiError::invalid("metadata filter is not valid UTF-8").into())
    };
    form_urlencoded::parse(raw.as_bytes())
        .map(|(k, v)| Ok((decode(&k)?, decode(&v)?)))
        .collect()
}

fn statuses(state: Option<&str>) -> E2bResult<Vec<SandboxStatus>> {
    let mut out = Vec::new();
    let wanted: Vec<&str> = match state.filter(|s| !s.is_empty()) {
        Some(s) => s.split(',').map(str::trim).collect(),
        None => vec!["running", "paused"],
    };
    for w in wanted {
        match w {
            "running" => out.extend([
                SandboxStatus::Pending,
                SandboxStatus::Running,
                SandboxStatus::Starting,
                SandboxStatus::Missing,
            ]),
            "paused" => out.push(SandboxStatus::Paused),
            other => {
                return Err(ApiError::invalid(format!(
                    "state: unknown state `{}`; expected running or paused",
                    other.chars().take(32).collect::<String>()
                ))
                .into());
            }
        }
    }
    Ok(out)
}

/// Running sandboxes of the team (unpaged; E2B's SDKs before 1.1).
#[utoipa::path(get, path = "/sandboxes", tag = super::TAG, security(("api_key" = [])), params(ListRunningQuery),
    responses((status = 200, body = Vec<ListedSandbox>), (status = 400, body = Error), (status = 401, body = Error)))]
pub async fn list_running(
    State(s): State<AppState>,
    caller: Result<Caller, ApiError>,
    query: Result<Query<ListRunningQuery>, ApiError>,
) -> E2bResult<axum::Json<Vec<ListedSandbox>>> {
    let caller = caller?;
    let Query(q) = query?;
    let filter = SandboxFilter {
        statuses: statuses(Some("running"))?,
        metadata: metadata_filter(q.metadata.as_deref())?,
    };
    let mut out = Vec::new();
    let mut cursor = None;
    loop {
        let page = s
            .services
            .sandbox_page(&caller, filter.clone(), 200, cursor)
            .await?;
        out.extend(page.items.iter().filter_map(listed));
        match page.next_cursor {
            Some(next) => cursor = Some(next),
            None => break,
        }
    }
    Ok(axum::Json(out))
}

/// The team's sandboxes, newest first, filtered by state and metadata; the next page's
/// token is in the `x-next-token` header.
#[utoipa::path(get, path = "/v2/sandboxes", tag = super::TAG, security(("api_key" = [])), params(ListQuery),
    responses((status = 200, body = Vec<ListedSandbox>,
               headers(("x-next-token" = String, description = "the next page's `nextToken`; absent on the last page"))),
              (status = 400, body = Error), (status = 401, body = Error)))]
pub async fn list_v2(
    State(s): State<AppState>,
    caller: Result<Caller, ApiError>,
    query: Result<Query<ListQuery>, ApiError>,
) -> E2bResult<Response> {
    let caller = caller?;
    let Query(q) = query?;
    let limit = super::page_limit(q.limit)?;
    let filter = SandboxFilter {
        statuses: statuses(q.state.as_deref())?,
        metadata: metadata_filter(q.metadata.as_deref())?,
    };
    let page = s
        .services
        .sandbox_page(
            &caller,
            filter,
            limit,
            q.next_token.filter(|t| !t.is_empty()),
        )
        .await?;
    let items: Vec<ListedSandbox> = page.items.iter().filter_map(listed).collect();
    Ok(super::paged(items, page.next_cursor))
}

/// One sandbox.
#[utoipa::path(get, path = "/sandboxes/{sandboxID}", tag = super::TAG, security(("api_key" = [])),
    params(("sandboxID" = String, Path)),
    responses((status = 200, body = SandboxDetail), (status = 401, body = Error), (status = 404, body = Error)))]
pub async fn get_sandbox(
    State(s): State<AppState>,
    caller: Result<Caller, ApiError>,
    headers: HeaderMap,
    Path(raw): Path<String>,
) -> E2bResult<axum::Json<SandboxDetail>> {
    let caller = caller?;
    let id = sandbox_id(&raw)?;
    let sb = visible(&s, &caller, id).await?;
    let listed = listed(&sb).ok_or_else(|| sandbox_not_found(id))?;
    let view = s.services.get_sandbox(&caller, id).await?;
    let (allow_internet_access, network) = super::network::network_view(&sb);
    Ok(axum::Json(SandboxDetail {
        allow_internet_access,
        network,
        listed,
        envd_access_token: view.envd_access_token.unwrap_or_default(),
        domain: domain(&s, &headers),
        lifecycle: Lifecycle {
            auto_resume: sb.auto_resume,
            on_timeout: match sb.on_expiry {
                Expiry::Destroy => "kill".into(),
                Expiry::Pause => "pause".into(),
            },
        },
    }))
}

/// Kills a sandbox. An unknown or already killed sandbox is 404.
#[utoipa::path(delete, path = "/sandboxes/{sandboxID}", tag = super::TAG, security(("api_key" = [])),
    params(("sandboxID" = String, Path)),
    responses((status = 204), (status = 401, body = Error), (status = 404, body = Error), (status = 409, body = Error)))]
pub async fn kill_sandbox(
    State(s): State<AppState>,
    caller: Result<Caller, ApiError>,
    Path(raw): Path<String>,
) -> E2bResult<StatusCode> {
    let caller = caller?;
    let id = sandbox_id(&raw)?;
    let sb = s.services.sandbox_row(&caller, id).await?;
    if sb.status == SandboxStatus::Stopped {
        return Err(sandbox_not_found(id));
    }
    s.services.destroy_sandbox(&caller, id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Sets when a running sandbox ends: `timeout` seconds from now, sooner or later than
/// before.
#[utoipa::path(post, path = "/sandboxes/{sandboxID}/timeout", tag = super::TAG, security(("api_key" = [])),
    params(("sandboxID" = String, Path)), request_body = SandboxTimeout,
    responses((status = 204), (status = 400, body = Error), (status = 401, body = Error), (status = 404, body = Error),
              (status = 409, body = Error)))]
pub async fn set_timeout(
    State(s): State<AppState>,
    caller: Result<Caller, ApiError>,
    Path(raw): Path<String>,
    body: Result<Json<SandboxTimeout>, ApiError>,
) -> E2bResult<StatusCode> {
    let caller = caller?;
    let id = sandbox_id(&raw)?;
    let Json(req) = body?;
    visible(&s, &caller, id).await?;
    s.services
        .set_lifetime(&caller, id, req.timeout, LifetimeChange::Set)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Keeps a running sandbox alive at least `duration` seconds from now.
#[utoipa::path(post, path = "/sandboxes/{sandboxID}/refreshes", tag = super::TAG, security(("api_key" = [])),
    params(("sandboxID" = String, Path)), request_body = SandboxRefresh,
    responses((status = 204), (status = 400, body = Error), (status = 401, body = Error), (status = 404, body = Error),
              (status = 409, description = "paused", body = Error)))]
pub async fn refresh(
    State(s): State<AppState>,
    caller: Result<Caller, ApiError>,
    Path(raw): Path<String>,
    body: Result<OptionalJson<SandboxRefresh>, ApiError>,
) -> E2bResult<StatusCode> {
    let caller = caller?;
    let id = sandbox_id(&raw)?;
    let OptionalJson(req) = body?;
    let duration = req.duration.unwrap_or(DEFAULT_REFRESH_SEC);
    if duration > MAX_REFRESH_SEC {
        return Err(ApiError::invalid(format!("duration must be 0–{MAX_REFRESH_SEC}")).into());
    }
    visible(&s, &caller, id).await?;
    if duration > 0 {
        s.services
            .set_lifetime(&caller, id, duration, LifetimeChange::Extend)
            .await?;
    }
    Ok(StatusCode::NO_CONTENT)
}

/// Pauses a running sandbox with its memory. 409 if it is already paused.
#[utoipa::path(post, path = "/sandboxes/{sandboxID}/pause", tag = super::TAG, security(("api_key" = [])),
    params(("sandboxID" = String, Path)), request_body = PauseSandbox,
    responses((status = 204), (status = 401, body = Error), (status = 404, body = Error), (status = 409, body = Error)))]
pub async fn pause(
    State(s): State<AppState>,
    caller: Result<Caller, ApiError>,
    Path(raw): Path<String>,
    body: Result<OptionalJson<PauseSandbox>, ApiError>,
) -> E2bResult<StatusCode> {
    let caller = caller?;
    let id = sandbox_id(&raw)?;
    let OptionalJson(req) = body?;
    memory_kept(req.memory)?;
    visible(&s, &caller, id).await?;
    s.services.pause_sandbox(&caller, id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Resumes a paused sandbox and starts a new lifetime (`timeout`, else the one it had).
/// Paused and running sandboxes alike end up running: answers 201 when it resumed one.
async fn resume_or_extend(
    state: &AppState,
    caller: &Caller,
    headers: &HeaderMap,
    id: SandboxId,
    timeout: Option<u32>,
) -> E2bResult<(StatusCode, axum::Json<Sandbox>)> {
    let sb = visible(state, caller, id).await?;
    let (status, view) = match sb.status {
        SandboxStatus::Paused => (
            StatusCode::CREATED,
            state.services.resume_sandbox(caller, id, timeout).await?,
        ),
        _ => {
            if let Some(secs) = timeout {
                state
                    .services
                    .set_lifetime(caller, id, secs, LifetimeChange::Extend)
                    .await?;
            }
            (
                StatusCode::OK,
                state.services.get_sandbox(caller, id).await?,
            )
        }
    };
    Ok((status, axum::Json(created(state, headers, &view))))
}

/// Connects to a sandbox: resumes it if it is paused (201), else extends its lifetime to
/// `timeout` from now if that is later (200). E2B's SDKs before 2.5.
#[utoipa::path(post, path = "/sandboxes/{sandboxID}/connect", tag = super::TAG, security(("api_key" = [])),
    params(("sandboxID" = String, Path)), request_body = ConnectSandbox,
    responses((status = 200, body = Sandbox), (status = 201, description = "it was paused and is resumed", body = Sandbox),
              (status = 401, body = Error), (status = 404, body = Error), (status = 409, body = Error)))]
pub async fn connect(
    State(s): State<AppState>,
    caller: Result<Caller, ApiError>,
    headers: HeaderMap,
    Path(raw): Path<String>,
    body: Result<OptionalJson<ConnectSandbox>, ApiError>,
) -> E2bResult<(StatusCode, axum::Json<Sandbox>)> {
    let caller = caller?;
    let id = sandbox_id(&raw)?;
    let OptionalJson(req) = body?;
    if req.memory == Some(false) {
        return Err(not_supported(
            "memory: false (a resume always restores memory)",
        ));
    }
    resume_or_extend(&s, &caller, &headers, id, req.timeout).await
}

/// [`connect`], as E2B's current SDKs call it.
#[utoipa::path(post, path = "/v2/sandboxes/{sandboxID}/connect", tag = super::TAG, security(("api_key" = [])),
    params(("sandboxID" = String, Path)), request_body = ConnectSandbox,
    responses((status = 200, body = Sandbox), (status = 201, description = "it was paused and is resumed", body = Sandbox),
              (status = 401, body = Error), (status = 404, body = Error), (status = 409, body = Error)))]
pub async fn connect_v2(
    state: State<AppState>,
    caller: Result<Caller, ApiError>,
    headers: HeaderMap,
    path: Path<String>,
    body: Result<OptionalJson<ConnectSandbox>, ApiError>,
) -> E2bResult<(StatusCode, axum::Json<Sandbox>)> {
    connect(state, caller, headers, path, body).await
}

/// Resumes a paused sandbox (E2B's deprecated form of connect): 409 if it runs.
#[utoipa::path(post, path = "/sandboxes/{sandboxID}/resume", tag = super::TAG, security(("api_key" = [])),
    params(("sandboxID" = String, Path)), request_body = ResumedSandbox,
    responses((status = 201, body = Sandbox), (status = 401, body = Error), (status = 404, body = Error),
              (status = 409, description = "already running", body = Error)))]
pub async fn resume(
    State(s): State<AppState>,
    caller: Result<Caller, ApiError>,
    headers: HeaderMap,
    Path(raw): Path<String>,
    body: Result<OptionalJson<ResumedSandbox>, ApiError>,
) -> E2bResult<(StatusCode, axum::Json<Sandbox>)> {
    let caller = caller?;
    let id = sandbox_id(&raw)?;
    let OptionalJson(req) = body?;
    if req.memory == Some(false) {
        return Err(not_supported(
            "memory: false (a resume always restores memory)",
        ));
    }
    visible(&s, &caller, id).await?;
    let view = s.services.resume_sandbox(&caller, id, req.timeout).await?;
    Ok((
        StatusCode::CREATED,
        axum::Json(created(&s, &headers, &view)),
    ))
}

/// Makes `count` running copies of a running sandbox (processes, memory, disk); one
/// entry per copy: the sandbox, or its error.
#[utoipa::path(post, path = "/sandboxes/{sandboxID}/fork", tag = super::TAG, security(("api_key" = [])),
    params(("sandboxID" = String, Path)), request_body = SandboxForkRequest,
    responses((status = 201, body = Vec<SandboxForkResult>), (status = 400, body = Error), (status = 401, body = Error),
              (status = 404, body = Error), (status = 409, body = Error),
              (status = 503, description = "no host has room for the copies right now", body = Error)))]
pub async fn fork(
    State(s): State<AppState>,
    caller: Result<Caller, ApiError>,
    headers: HeaderMap,
    Path(raw): Path<String>,
    body: Result<OptionalJson<SandboxForkRequest>, ApiError>,
) -> E2bResult<(StatusCode, axum::Json<Vec<SandboxForkResult>>)> {
    let caller = caller?;
    let id = sandbox_id(&raw)?;
    let OptionalJson(req) = body?;
    visible(&s, &caller, id).await?;
    let outcomes = s
        .services
        .fork_sandbox(&caller, id, req.count.unwrap_or(1), req.timeout)
        .await
        .map_err(|e| E2bError::from(e).no_retry())?;
    if !outcomes.iter().any(Result::is_ok)
        && let Some(Err(e)) = outcomes.first()
    {
        return Err(E2bError::from(e.clone()).no_retry());
    }
    let items = outcomes
        .iter()
        .map(|o| match o {
            Ok(sb) => SandboxForkResult {
                sandbox: Some(created(&s, &headers, sb)),
                error: None,
            },
            Err(e) => SandboxForkResult {
                sandbox: None,
                error: Some(Error {
                    code: e.code.http_status(),
                    message: e.message.clone(),
                }),
            },
        })
        .collect();
    Ok((StatusCode::CREATED, axum::Json(items)))
}

fn metric(sb_vcpus: u32, memory_mb: u32, disk_mb: u32, p: &api::MetricPoint) -> SandboxMetric {
    const MIB: u64 = 1 << 20;
    SandboxMetric {
        timestamp: p.timestamp,
        timestamp_unix: p.timestamp.timestamp(),
        cpu_count: sb_vcpus,
        // Ours is a percent of one host CPU; E2B's of the sandbox's vCPUs.
        cpu_used_pct: p.cpu_pct / f64::from(sb_vcpus.max(1)),
        mem_used: p.mem_bytes,
        mem_total: u64::from(memory_mb) * MIB,
        mem_cache: 0,
        disk_used: p.disk_bytes,
        disk_total: u64::from(disk_mb) * MIB,
    }
}

/// The range of ours that covers `start`.
fn range_for(start: Option<i64>) -> &'static str {
    let now = Utc::now().timestamp();
    match start {
        Some(s) if now.saturating_sub(s) > 2 * 3600 => "24h",
        Some(s) if now.saturating_sub(s) > 600 => "2h",
        _ => "10m",
    }
}

/// A sandbox's metrics between `start` and `end` (seconds since the epoch; default the
/// last ten minutes).
#[utoipa::path(get, path = "/sandboxes/{sandboxID}/metrics", tag = super::TAG, security(("api_key" = [])),
    params(("sandboxID" = String, Path), MetricsQuery),
    responses((status = 200, body = Vec<SandboxMetric>), (status = 400, body = Error), (status = 401, body = Error),
              (status = 404, body = Error)))]
pub async fn metrics(
    State(s): State<AppState>,
    caller: Result<Caller, ApiError>,
    Path(raw): Path<String>,
    query: Result<Query<MetricsQuery>, ApiError>,
) -> E2bResult<axum::Json<Vec<SandboxMetric>>> {
    let caller = caller?;
    let id = sandbox_id(&raw)?;
    let Query(q) = query?;
    if let (Some(a), Some(b)) = (q.start, q.end)
        && a > b
    {
        return Err(ApiError::invalid("start must not be after end").into());
    }
    let sb = visible(&s, &caller, id).await?;
    let series = s
        .services
        .sandbox_metrics(&caller, id, Some(range_for(q.start)))
        .await?;
    let out = series
        .points
        .iter()
        .filter(|p| {
            let t = p.timestamp.timestamp();
            q.start.is_none_or(|a| t >= a) && q.end.is_none_or(|b| t <= b)
        })
        .map(|p| metric(sb.vcpus, sb.memory_mb, sb.disk_size_mb, p))
        .collect();
    Ok(axum::Json(out))
}

/// The newest metrics sample of each of the team's running sandboxes named (up to 100);
/// others are left out.
#[utoipa::path(get, path = "/sandboxes/metrics", tag = super::TAG, security(("api_key" = [])), params(ManyMetricsQuery),
    responses((status = 200, body = SandboxesWithMetrics), (status = 400, body = Error), (status = 401, body = Error)))]
pub async fn many_metrics(
    State(s): State<AppState>,
    caller: Result<Caller, ApiError>,
    query: Result<Query<ManyMetricsQuery>, ApiError>,
) -> E2bResult<axum::Json<SandboxesWithMetrics>> {
    let caller = caller?;
    let Query(q) = query?;
    let ids: Vec<&str> = q
        .sandbox_ids
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    if ids.len() > 100 {
        return Err(ApiError::invalid("at most 100 sandbox_ids").into());
    }
    let mut out = BTreeMap::new();
    for raw in ids {
        let Ok(id) = raw.parse::<SandboxId>() else {
            continue;
        };
        let Ok(sb) = s.services.sandbox_row(&caller, id).await else {
            continue;
        };
        if sb.status != SandboxStatus::Running {
            continue;
        }
        let series = s.services.sandbox_metrics(&caller, id, Some("10m")).await?;
        if let Some(p) = series.points.last() {
            out.insert(
                id.to_string(),
                metric(sb.vcpus, sb.memory_mb, sb.disk_size_mb, p),
            );
        }
    }
    Ok(axum::Json(SandboxesWithMetrics { sandboxes: out }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_filter_is_decoded_like_the_sdks_encode_it() {
        // `{"user": "a b", "k&": "v=1"}` as the SDKs send it, after the query's own decoding.
        let got = metadata_filter(Some("user=a%2520b&k%2526=v%253D1")).unwrap();
        assert_eq!(
            got,
            vec![
                ("user".to_string(), "a b".to_string()),
                ("k&".to_string(), "v=1".to_string())
            ]
        );
        assert!(metadata_filter(None).unwrap().is_empty());
        assert!(metadata_filter(Some("")).unwrap().is_empty());
    }

    #[test]
    fn states() {
        assert_eq!(
            statuses(Some("paused")).unwrap(),
            vec![SandboxStatus::Paused]
        );
        assert!(statuses(None).unwrap().contains(&SandboxStatus::Running));
        assert!(statuses(Some("running,paused")).unwrap().len() > 1);
        assert!(statuses(Some("killed")).is_err());
        assert_eq!(state_of(SandboxStatus::Stopped), None);
        assert_eq!(state_of(SandboxStatus::Error), None);
    }

    #[test]
    fn create_maps_e2b_defaults() {
        let req = create_request(NewSandbox {
            template_id: "base".into(),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(
            req.template.as_deref(),
            Some(nestbox_types::limits::DEFAULT_TEMPLATE)
        );
        assert_eq!(req.lifetime_sec, Some(DEFAULT_LIFETIME_SEC));
        assert_eq!(req.timeout_sec, Some(0));
        assert_eq!(req.on_expiry, Some(Expiry::Destroy));
        let paused = create_request(NewSandbox {
            template_id: "python".into(),
            timeout: Some(5),
            auto_pause: Some(true),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(paused.on_expiry, Some(Expiry::Pause));
        assert_eq!(paused.lifetime_sec, Some(5));
        assert!(
            create_request(NewSandbox {
                template_id: "base".into(),
                mcp: Some(serde_json::json!({"x": 1})),
                ..Default::default()
            })
            .is_err()
        );
    }
}
