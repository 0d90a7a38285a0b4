//! The host agent's Prometheus metrics (`GET /metrics`, OpenMetrics text), on a listener of
//! their own (`metrics_listen`): the agent's main listener answers only its control plane.
//! Every scrape must carry the configured token as `Authorization: Bearer <token>`.
//!
//! - `nestbox_agent_sandboxes{state}`: sandboxes by state (read at each scrape);
//! - `nestbox_agent_pooled_clones`: started clones waiting in the pools;
//! - `nestbox_agent_guest_memory_mib{kind="total"|"used"}`: the memory that backs guest RAM
//!   and how much of it sandboxes hold (what the scheduler places by);
//! - `nestbox_agent_heartbeat_age_seconds`: since the last heartbeat the control plane
//!   accepted (grows while it is out of reach);
//! - `nestbox_agent_sandbox_create_duration_seconds{outcome}`: creates from request to
//!   running (or failure), by outcome (`ok` or the error code);
//! - `nestbox_agent_template_copy_bytes`: template bytes received from other hosts.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::register::HostSession;
use crate::sandbox::Manager;

/// The response's content type.
const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: String,
}

fn create_buckets() -> Histogram {
    // 50 ms … about 7 min.
    Histogram::new(exponential_buckets(0.05, 2.0, 14))
}

/// The agent's metrics.
pub struct Telemetry {
    registry: Registry,
    sandboxes: Family<StateLabels, Gauge>,
    pooled: Gauge,
    guest_memory: Family<KindLabels, Gauge>,
    heartbeat_age: Gauge<f64, AtomicU64>,
    creates: Family<OutcomeLabels, Histogram, fn() -> Histogram>,
    copied: Counter,
    scrape: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for Telemetry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Telemetry").finish_non_exhaustive()
    }
}

impl Default for Telemetry {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("nestbox_agent");
        let sandboxes = Family::<StateLabels, Gauge>::default();
        registry.register("sandboxes", "Sandboxes by state", sandboxes.clone());
        let pooled = Gauge::default();
        registry.register(
            "pooled_clones",
            "Started clones waiting for a create to take them over",
            pooled.clone(),
        );
        let guest_memory = Family::<KindLabels, Gauge>::default();
        registry.register(
            "guest_memory_mib",
            "Memory that backs guest RAM (total) and what sandboxes hold of it (used)",
            guest_memory.clone(),
        );
        let heartbeat_age = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "heartbeat_age_seconds",
            "Seconds since the control plane last accepted a heartbeat",
            heartbeat_age.clone(),
        );
        let creates: Family<OutcomeLabels, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(create_buckets);
        registry.register(
            "sandbox_create_duration_seconds",
            "Sandbox creates from request to running (or failure), by outcome",
            creates.clone(),
        );
        let copied = Counter::default();
        registry.register(
            "template_copy_bytes",
            "Template bytes received from other hosts",
            copied.clone(),
        );
        Self {
            registry,
            sandboxes,
            pooled,
            guest_memory,
            heartbeat_age,
            creates,
            copied,
            scrape: tokio::sync::Mutex::new(()),
        }
    }
}

impl Telemetry {
    /// Counts one create that ended with `outcome` (`ok` or an error code).
    pub fn create(&self, outcome: &str, seconds: f64) {
        self.creates
            .get_or_create(&OutcomeLabels {
                outcome: outcome.to_string(),
            })
            .observe(seconds);
    }

    /// Counts template bytes received.
    pub fn copied(&self, bytes: u64) {
        self.copied.inc_by(bytes);
    }

    /// Reads the agent's state and encodes every metric.
    pub async fn render(&self, manager: &Manager, session: Option<&HostSession>) -> String {
        let _one = self.scrape.lock().await;
        self.sandboxes.clear();
        for state in crate::sandbox::State::ALL {
            self.sandboxes
                .get_or_create(&StateLabels {
                    state: state.as_str(),
                })
                .set(0);
        }
        for h in manager.list() {
            self.sandboxes
                .get_or_create(&StateLabels {
                    state: h.state().as_str(),
                })
                .inc();
        }
        self.pooled
            .set(i64::try_from(manager.pooled()).unwrap_or(i64::MAX));
        let (total, used) = manager.guest_memory_mb();
        for (kind, v) in [("total", total), ("used", used)] {
            self.guest_memory
                .get_or_create(&KindLabels { kind })
                .set(i64::try_from(v).unwrap_or(i64::MAX));
        }
        if let Some(at) = session.and_then(HostSession::last_heartbeat) {
            let age = (chrono::Utc::now() - at).num_milliseconds().max(0) as f64 / 1000.0;
            self.heartbeat_age.set(age);
        }
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::warn!(error = %e, "encoding metrics");
        }
        out
    }
}

/// Serves `GET /metrics` on `listener` to callers with `token`, until the task is aborted.
pub async fn serve(
    listener: tokio::net::TcpListener,
    token: String,
    manager: Manager,
    session: Arc<HostSession>,
) {
    use axum::http::{StatusCode, header};
    use axum::response::IntoResponse;
    use subtle::ConstantTimeEq;
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move |headers: axum::http::HeaderMap| {
            let (manager, session, token) = (manager.clone(), session.clone(), token.clone());
            async move {
                let allowed = headers
                    .get(header::AUTHORIZATION)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.strip_prefix("Bearer "))
                    .is_some_and(|got| bool::from(got.as_bytes().ct_eq(token.as_bytes())));
                if !allowed {
                    return (StatusCode::UNAUTHORIZED, "a metrics token is needed\n")
                        .into_response();
                }
                let body = manager.telemetry().render(&manager, Some(&session)).await;
                ([(header::CONTENT_TYPE, CONTENT_TYPE)], body).into_response()
            }
        }),
    );
    if let Err(e) = axum::serve(listener, app).await {
        tracing::error!(error = %e, "metrics listener failed");
    }
}

/// Binds the metrics listener.
pub async fn bind(at: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(at).await
}
