//! E2B's network settings: egress rules at create and `PUT /sandboxes/{id}/network`, and
//! how `GET /sandboxes/{id}` reports them.
//!
//! E2B's `allowInternetAccess: false` is `0.0.0.0/0` in `denyOut`. `dnsServers` (IPv4
//! addresses, at most [`MAX_DNS_SERVERS`]) is validated and has no effect: on E2B it opens
//! those servers (every port) so that a sandbox with domain rules can resolve; here every
//! DNS query of such a sandbox goes to the host's pinning resolver whatever its
//! destination, and opening the servers would hand a closed sandbox DNS-over-HTTPS and
//! DNS-over-TLS, i.e. a way out. Request transforms (`rules`), an egress proxy and HTTPS
//! backends are refused as unsupported, never silently ignored.

use std::net::Ipv4Addr;

use axum::extract::State;
use axum::http::StatusCode;
use nestbox_db::sandboxes as repo;
use nestbox_types::api::EgressRequest;
use nestbox_types::e2b::{Error, NetworkConfig, NetworkUpdate};

use super::{E2bResult, sandbox_id};
use crate::error::ApiError;
use crate::extract::{Caller, Json, Path};
use crate::state::AppState;

/// Most `dnsServers` entries (E2B's limit).
pub const MAX_DNS_SERVERS: usize = 10;

fn not_supported(what: &str) -> super::E2bError {
    ApiError::invalid(format!("{what} is not supported by this server")).into()
}

fn non_empty(v: &Option<serde_json::Value>) -> bool {
    match v {
        None | Some(serde_json::Value::Null) => false,
        Some(serde_json::Value::Object(m)) => !m.is_empty(),
        Some(serde_json::Value::Array(a)) => !a.is_empty(),
        Some(_) => true,
    }
}

/// E2B's egress fields as our rules (validated by the service).
pub(super) fn egress_request(
    allow_out: Option<Vec<String>>,
    deny_out: Option<Vec<String>>,
    dns_servers: Option<Vec<String>>,
    allow_internet_access: Option<bool>,
    rules: &Option<serde_json::Value>,
    egress_proxy: &Option<serde_json::Value>,
) -> E2bResult<EgressRequest> {
    if non_empty(rules) {
        return Err(not_supported("network.rules (request transforms)"));
    }
    if non_empty(egress_proxy) {
        return Err(not_supported("network.egressProxy"));
    }
    let allow_out = allow_out.unwrap_or_default();
    let dns_servers = dns_servers.unwrap_or_default();
    if dns_servers.len() > MAX_DNS_SERVERS {
        return Err(ApiError::invalid(format!(
            "network.dnsServers: at most {MAX_DNS_SERVERS} entries"
        ))
        .into());
    }
    for server in &dns_servers {
        if server.trim().parse::<Ipv4Addr>().is_err() {
            return Err(ApiError::invalid(format!(
                "network.dnsServers: `{}` is not an IPv4 address",
                server.chars().take(64).collect::<String>()
            ))
            .into());
        }
    }
    Ok(EgressRequest {
        allow_out,
        deny_out: deny_out.unwrap_or_default(),
        allow_internet_access,
    })
}

/// `allowInternetAccess` and `network` of a sandbox, as E2B reports them.
pub(super) fn network_view(sb: &repo::Sandbox) -> (bool, NetworkConfig) {
    let open = !sb
        .egress
        .deny_out
        .iter()
        .any(|d| d == nestbox_types::egress::ALL_TRAFFIC);
    (
        open,
        NetworkConfig {
            allow_out: Some(sb.egress.allow_out.clone()),
            deny_out: Some(sb.egress.deny_out.clone()),
            allow_public_traffic: Some(sb.public_traffic),
            ..Default::default()
        },
    )
}

/// Replaces a running or paused sandbox's egress rules; fields left out are cleared.
#[utoipa::path(put, path = "/sandboxes/{sandboxID}/network", tag = super::TAG, security(("api_key" = [])),
    params(("sandboxID" = String, Path)), request_body = NetworkUpdate,
    responses((status = 204, description = "the new rules are in force"), (status = 400, body = Error),
              (status = 401, body = Error), (status = 404, body = Error), (status = 409, body = Error)))]
pub async fn update_network(
    State(s): State<AppState>,
    caller: Result<Caller, ApiError>,
    Path(raw): Path<String>,
    body: Result<Json<NetworkUpdate>, ApiError>,
) -> E2bResult<StatusCode> {
    let caller = caller?;
    let id = sandbox_id(&raw)?;
    let Json(req) = body?;
    super::sandboxes::visible(&s, &caller, id).await?;
    let egress = egress_request(
        req.allow_out,
        req.deny_out,
        req.dns_servers,
        req.allow_internet_access,
        &req.rules,
        &req.egress_proxy,
    )?;
    s.services.set_egress(&caller, id, &egress).await?;
    Ok(StatusCode::NO_CONTENT)
}
