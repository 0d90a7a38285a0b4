//! Health (liveness and readiness), metrics, and the API documentation page.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Html;
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

/// A self-contained page rendering `/openapi.json` (no external scripts, works offline).
pub async fn docs_page() -> Html<&'static str> {
    Html(DOCS_HTML)
}

const DOCS_HTML: &str = r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Nestbox API</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body{font:15px/1.5 system-ui,sans-serif;margin:0;color:#1d2330;background:#f7f8fa}
header{background:#1d2330;color:#fff;padding:18px 32px}header h1{margin:0;font-size:20px}
main{max-width:1000px;margin:0 auto;padding:24px 32px}
.op{background:#fff;border:1px solid #e2e5ea;border-radius:8px;margin:10px 0;padding:10px 14px}
.m{display:inline-block;min-width:64px;font-weight:700;font-family:monospace}
.get{color:#0a7d32}.post{color:#1857c4}.put{color:#9a5b00}.patch{color:#7a3fb8}.delete{color:#b3261e}
code{font-family:ui-monospace,monospace}.p{font-family:monospace}
details summary{cursor:pointer}pre{background:#f2f4f7;padding:8px;overflow:auto;font-size:12px}
h2{margin-top:28px;text-transform:capitalize}
</style></head><body><header><h1>Nestbox API</h1><div id="desc"></div></header>
<main id="main">Loading <code>/openapi.json</code>…</main>
<script>
fetch('/openapi.json').then(r=>r.json()).then(spec=>{
 document.getElementById('desc').textContent=spec.info.description||'';
 const byTag={};
 for(const [path,item] of Object.entries(spec.paths||{})){
  for(const [method,op] of Object.entries(item)){
   const tag=(op.tags||['other'])[0];(byTag[tag]=byTag[tag]||[]).push({path,method,op});}}
 const main=document.getElementById('main');main.textContent='';
 for(const [tag,ops] of Object.entries(byTag)){
  const h=document.createElement('h2');h.textContent=tag;main.appendChild(h);
  for(const {path,method,op} of ops){
   const d=document.createElement('div');d.className='op';
   const s=document.createElement('details');const sum=document.createElement('summary');
   sum.innerHTML='<span class="m '+method+'">'+method.toUpperCase()+'</span> <span class="p"></span> — <span class="s"></span>';
   sum.querySelector('.p').textContent=path;sum.querySelector('.s').textContent=op.summary||op.description||'';
   s.appendChild(sum);const pre=document.createElement('pre');pre.textContent=JSON.stringify(op,null,2);s.appendChild(pre);
   d.appendChild(s);main.appendChild(d);}}
});
</script></body></html>"#;
