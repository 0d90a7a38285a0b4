//! Request ids: every request gets one, in its log span, in the `X-Request-Id` response
//! header and in the `request_id` of any error body, so a client's report points at the
//! server's log lines.
//!
//! The id lives in a task-local for the duration of the request ([`layer`]); errors built
//! while handling it ([`crate::error::ApiError`]) read it with [`current`]. Work moved to
//! another task takes it along with [`scoped`] (the service layer's `detached` does).

use axum::extract::Request;
use axum::http::HeaderValue;
use axum::middleware::Next;
use axum::response::Response;
use tracing::Instrument as _;

/// The response header carrying the id.
pub const HEADER: &str = "x-request-id";

tokio::task_local! {
    static REQUEST_ID: String;
}

/// A fresh id: 12 hex digits.
pub fn fresh() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..12].to_string()
}

/// The id of the request being handled, if any.
pub fn current() -> Option<String> {
    REQUEST_ID.try_with(Clone::clone).ok()
}

/// The id of the request being handled, or a fresh one (outside a request).
pub fn current_or_fresh() -> String {
    current().unwrap_or_else(fresh)
}

/// `work`, run with the current request's id (for work spawned onto another task).
pub fn scoped<F: std::future::Future>(work: F) -> impl std::future::Future<Output = F::Output> {
    match current() {
        Some(id) => futures::future::Either::Left(REQUEST_ID.scope(id, work)),
        None => futures::future::Either::Right(work),
    }
}

/// Middleware: gives the request an id, runs it in a span naming the id, and returns the
/// id in `X-Request-Id` (unless a sandbox's answer through the proxy has its own). An id
/// the client sent is logged beside ours, never used as ours.
pub async fn layer(request: Request, next: Next) -> Response {
    let id = fresh();
    let client_id = request
        .headers()
        .get(HEADER)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.chars().take(64).collect::<String>());
    let span = tracing::info_span!("request", request_id = %id, client_request_id = client_id);
    let mut response = REQUEST_ID
        .scope(id.clone(), next.run(request))
        .instrument(span)
        .await;
    // A sandbox's own answer through the proxy keeps its header, if it set one.
    if let Ok(value) = HeaderValue::from_str(&id) {
        response.headers_mut().entry(HEADER).or_insert(value);
    }
    response
}
