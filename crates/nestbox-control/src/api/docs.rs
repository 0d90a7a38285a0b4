//! Health (liveness and readiness) and metrics. (The API reference page, `/docs`, is part
//! of the dashboard.)

use axum::extract::State;
use axum::http::StatusCode;
use nestbox_types::api::Health;

use crate::state::AppState;

/// Liveness: the control plane answers.
#[utoipa::path(get, path = "/health", tag = "system", responses((status = 200, body = Health)))]
pub async fn health() -> axum::Json<Health> {
    axum::Json(Health {
        status: "ok".into(),
        version: crate::VERSION.into(),
        reason: None,
    })
}

/// Readiness: sandboxes can be created — the database answers and at least one host is
/// online with the platform's templates. `503` with the reason until then.
#[utoipa::path(get, path = "/health/ready", tag = "system",
    responses((status = 200, body = Health), (status = 503, description = "not ready yet", body = Health)))]
pub async fn ready(State(s): State<AppState>) -> (StatusCode, axum::Json<Health>) {
    let (status, word, reason) = match s.services.readiness().await {
        Ok(()) => (StatusCode::OK, "ready", None),
        Err(reason) => (StatusCode::SERVICE_UNAVAILABLE, "starting", Some(reason)),
    };
    (
        status,
        axum::Json(Health {
            status: word.into(),
            version: crate::VERSION.into(),
            reason,
        }),
    )
}

/// Prometheus metrics of this control-plane replica and of the fleet (OpenMetrics text; see
/// `nestbox_control::telemetry`). For platform admins, or with the scrape token the server
/// was given (`--metrics-token-file`) as `Authorization: Bearer <token>`.
#[utoipa::path(get, path = "/metrics", tag = "system", security(("session" = [])),
    responses((status = 200, description = "the metrics, in the OpenMetrics text format",
        content_type = "application/openmetrics-text", body = String)))]
pub async fn metrics(
    State(s): State<AppState>,
    headers: axum::http::HeaderMap,
    caller: Result<crate::extract::Caller, crate::error::ApiError>,
) -> Result<axum::response::Response, crate::error::ApiError> {
    use axum::response::IntoResponse;
    use subtle::ConstantTimeEq;
    let scraper = s.services.cfg.metrics_token.as_deref().is_some_and(|want| {
        headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .is_some_and(|got| bool::from(got.as_bytes().ct_eq(want.as_bytes())))
    });
    if !scraper {
        caller?.require_admin()?;
    }
    let body = s.services.telemetry.render(&s.services.db).await?;
    Ok((
        [(
            axum::http::header::CONTENT_TYPE,
            crate::telemetry::CONTENT_TYPE,
        )],
        body,
    )
        .into_response())
}

/// Counts every request the API's routes answer (by matched route, never raw path).
pub async fn track(
    State(s): State<AppState>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let method = req.method().as_str().to_string();
    let route = req
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map_or_else(|| "other".to_string(), |p| p.as_str().to_string());
    let started = std::time::Instant::now();
    let resp = next.run(req).await;
    s.services.telemetry.request(
        &method,
        &route,
        resp.status().as_u16(),
        started.elapsed().as_secs_f64(),
    );
    resp
}
