//! The control plane's Prometheus metrics (`GET /metrics`, OpenMetrics text).
//!
//! Counted as things happen, in this replica:
//! - `nestbox_http_requests` / `nestbox_http_request_duration_seconds`: API requests by
//!   method, route (the matched route template, never the raw path, so sandbox ids never
//!   become labels) and status class;
//! - `nestbox_sandbox_create_duration_seconds`: sandbox creates by outcome (`ok` or the
//!   error code), from request to running;
//! - `nestbox_scheduler_decisions`: placements by policy and outcome (`placed`,
//!   `no_capacity`), and `nestbox_scheduler_placement_duration_seconds`: how long reading
//!   the candidates and picking one took;
//! - `nestbox_monitor_pass_duration_seconds`: passes of the host monitor (on the replica
//!   that leads it).
//!
//! Read from the database at each scrape (the same in every replica): sandboxes by status
//! (`nestbox_sandboxes`), hosts by status (`nestbox_hosts`) and each registered host's
//! heartbeat age (`nestbox_host_heartbeat_age_seconds`). Scrapes are serialized: the
//! gauges are set, then everything is encoded.
//!
//! Who may read it: a platform admin, or whoever presents the scrape token the server was
//! given (`--metrics-token-file`), as `Authorization: Bearer <token>`.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// The response's content type.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Labels of an API request.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// HTTP method.
    pub method: String,
    /// Matched route template (`/v1/sandboxes/{sandbox_id}`), or `other`.
    pub route: String,
    /// Status class (`2xx` …).
    pub status: String,
}

/// Labels of a request's latency.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    /// HTTP method.
    pub method: String,
    /// Matched route template, or `other`.
    pub route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DecisionLabels {
    policy: String,
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusLabels {
    status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HostLabels {
    host: String,
    name: String,
}

type Histograms<L> = Family<L, Histogram, fn() -> Histogram>;

fn request_buckets() -> Histogram {
    // 1 ms … about 16 s.
    Histogram::new(exponential_buckets(0.001, 2.0, 15))
}

fn create_buckets() -> Histogram {
    // 50 ms … about 7 min (a cold boot under TCG takes seconds).
    Histogram::new(exponential_buckets(0.05, 2.0, 14))
}

/// The metrics of one control-plane process.
pub struct Telemetry {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    request_seconds: Histograms<RouteLabels>,
    create_seconds: Histograms<OutcomeLabels>,
    decisions: Family<DecisionLabels, Counter>,
    placement_seconds: Histogram,
    monitor_seconds: Histogram,
    sandboxes: Family<StatusLabels, Gauge>,
    hosts: Family<StatusLabels, Gauge>,
    heartbeat_age: Family<HostLabels, Gauge<f64, AtomicU64>>,
    scrape: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for Telemetry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Telemetry").finish_non_exhaustive()
    }
}

impl Default for Telemetry {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("nestbox");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "http_requests",
            "API requests by method, route and status class",
            requests.clone(),
        );
        let request_seconds: Histograms<RouteLabels> =
            Family::new_with_constructor(request_buckets);
        registry.register(
            "http_request_duration_seconds",
            "API request latency by method and route",
            request_seconds.clone(),
        );
        let create_seconds: Histograms<OutcomeLabels> =
            Family::new_with_constructor(create_buckets);
        registry.register(
            "sandbox_create_duration_seconds",
            "Sandbox creates from request to running (or failure), by outcome",
            create_seconds.clone(),
        );
        let decisions = Family::<DecisionLabels, Counter>::default();
        registry.register(
            "scheduler_decisions",
            "Placement decisions by policy and outcome",
            decisions.clone(),
        );
        // 0.1 ms … about 3 s.
        let placement_seconds = Histogram::new(exponential_buckets(0.0001, 2.0, 15));
        registry.register(
            "scheduler_placement_duration_seconds",
            "Placement (reading the team's candidate hosts and their load, then picking one)",
            placement_seconds.clone(),
        );
        // 10 ms … about 80 s.
        let monitor_seconds = Histogram::new(exponential_buckets(0.01, 2.0, 14));
        registry.register(
            "monitor_pass_duration_seconds",
            "Passes of the host monitor over the fleet",
            monitor_seconds.clone(),
        );
        let sandboxes = Family::<StatusLabels, Gauge>::default();
        registry.register("sandboxes", "Sandboxes by status", sandboxes.clone());
        let hosts = Family::<StatusLabels, Gauge>::default();
        registry.register("hosts", "Hosts by status", hosts.clone());
        let heartbeat_age = Family::<HostLabels, Gauge<f64, AtomicU64>>::default();
        registry.register(
            "host_heartbeat_age_seconds",
            "Seconds since each registered host's last heartbeat",
            heartbeat_age.clone(),
        );
        Self {
            registry,
            requests,
            request_seconds,
            create_seconds,
            decisions,
            placement_seconds,
            monitor_seconds,
            sandboxes,
            hosts,
            heartbeat_age,
            scrape: tokio::sync::Mutex::new(()),
        }
    }
}

impl Telemetry {
    /// Counts one API request.
    pub fn request(&self, method: &str, route: &str, status: u16, seconds: f64) {
        self.requests
            .get_or_create(&RequestLabels {
                method: method.to_string(),
                route: route.to_string(),
                status: format!("{}xx", status / 100),
            })
            .inc();
        self.request_seconds
            .get_or_create(&RouteLabels {
                method: method.to_string(),
                route: route.to_string(),
            })
            .observe(seconds);
    }

    /// Counts one sandbox create that ended with `outcome` (`ok` or an error code).
    pub fn create(&self, outcome: &str, seconds: f64) {
        self.create_seconds
            .get_or_create(&OutcomeLabels {
                outcome: outcome.to_string(),
            })
            .observe(seconds);
    }

    /// Counts one placement decision.
    pub fn decision(&self, policy: &str, outcome: &str) {
        self.decisions
            .get_or_create(&DecisionLabels {
                policy: policy.to_string(),
                outcome: outcome.to_string(),
            })
            .inc();
    }

    /// Times one placement.
    pub fn placement(&self, seconds: f64) {
        self.placement_seconds.observe(seconds);
    }

    /// Times one pass of the host monitor.
    pub fn monitor_pass(&self, seconds: f64) {
        self.monitor_seconds.observe(seconds);
    }

    /// Reads the fleet's state from the database and encodes every metric.
    pub async fn render(&self, db: &nestbox_db::Db) -> crate::error::ApiResult<String> {
        let _one = self.scrape.lock().await;
        let counts = nestbox_db::sandboxes::count_by_status(db).await?;
        let hosts = nestbox_db::hosts::list(db).await?;
        self.sandboxes.clear();
        for status in nestbox_types::SandboxStatus::ALL {
            let n = counts
                .iter()
                .find(|(s, _)| s == status)
                .map_or(0, |(_, n)| *n);
            self.sandboxes
                .get_or_create(&StatusLabels {
                    status: status.to_string(),
                })
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
        self.hosts.clear();
        self.heartbeat_age.clear();
        let now = chrono::Utc::now();
        for status in nestbox_types::HostStatus::ALL {
            let n = hosts.iter().filter(|h| h.status == *status).count();
            self.hosts
                .get_or_create(&StatusLabels {
                    status: status.to_string(),
                })
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
        for h in &hosts {
            if let Some(at) = h.last_heartbeat_at {
                let age = (now - at).num_milliseconds().max(0) as f64 / 1000.0;
                self.heartbeat_age
                    .get_or_create(&HostLabels {
                        host: h.id.to_string(),
                        name: h.name.clone(),
                    })
                    .set(age);
            }
        }
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .map_err(|e| crate::error::ApiError::internal(format!("encoding metrics: {e}")))?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_not_paths_are_labels_and_requests_count() {
        let t = Telemetry::default();
        t.request("GET", "/v1/sandboxes/{sandbox_id}", 200, 0.004);
        t.request("GET", "/v1/sandboxes/{sandbox_id}", 404, 0.002);
        t.decision("least-loaded", "placed");
        t.create("ok", 1.5);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &t.registry).unwrap();
        assert!(out.contains(
            "nestbox_http_requests_total{method=\"GET\",route=\"/v1/sandboxes/{sandbox_id}\",status=\"2xx\"} 1"
        ), "{out}");
        assert!(out.contains("status=\"4xx\"} 1"), "{out}");
        assert!(
            out.contains(
                "nestbox_scheduler_decisions_total{policy=\"least-loaded\",outcome=\"placed\"} 1"
            ),
            "{out}"
        );
        assert!(
            out.contains("nestbox_sandbox_create_duration_seconds_count{outcome=\"ok\"} 1"),
            "{out}"
        );
        assert!(out.ends_with("# EOF\n"));
    }
}
