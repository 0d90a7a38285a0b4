//! The agent's HTTP side: requests for a TCP port inside a sandbox, sent by the control
//! plane to the same listener as gRPC.
//!
//! Rules (the control plane has already checked who the caller is and which team owns the
//! sandbox; this hop checks that the caller is the control plane):
//! - every request carries the control plane's bearer token for this host (the one gRPC
//!   calls carry) in [`AUTH_HEADER`], else `401`; the caller's own `Authorization` is
//!   the sandbox's business and passes through;
//! - the target is named by [`SANDBOX_HEADER`] and [`PORT_HEADER`]; both headers and the
//!   token header are removed before the request goes on, so nothing of the platform's own
//!   credentials reaches the sandbox;
//! - only a running sandbox is reachable (`409 sandbox_not_running` otherwise, at once);
//!   a port nobody listens on is `502 port_unreachable`, at once;
//! - proxied requests count as activity for the inactivity timeout;
//! - errors are JSON in the platform's shape, so the control plane passes them on as
//!   they are.

use std::net::{IpAddr, SocketAddr};

use axum::body::Body;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use http::{HeaderMap, Request, StatusCode};
use nestbox_forward::{ForwardError, Forwarder};
use nestbox_proto::proxy::{AUTH_HEADER, PORT_HEADER, SANDBOX_HEADER};
use nestbox_types::{ErrorBody, ErrorCode, HostId, SandboxId};

use crate::error::AgentError;
use crate::sandbox::Manager;

/// What the proxy handler needs.
#[derive(Clone, Debug)]
pub struct ProxyState {
    manager: Manager,
    host: HostId,
    key: String,
    forwarder: Forwarder,
}

impl ProxyState {
    /// Proxying for `manager`'s sandboxes, accepting tokens issued for `host` with `key`.
    pub fn new(manager: Manager, host: HostId, key: String) -> Self {
        Self {
            manager,
            host,
            key,
            forwarder: Forwarder::new(),
        }
    }
}

fn error(code: ErrorCode, message: impl Into<String>) -> Response {
    let status = StatusCode::from_u16(code.http_status()).unwrap_or(StatusCode::BAD_GATEWAY);
    (status, axum::Json(ErrorBody::new(code, message))).into_response()
}

fn target(headers: &HeaderMap) -> Result<(SandboxId, u16), Box<Response>> {
    let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let id = text(SANDBOX_HEADER)
        .and_then(|v| v.parse::<SandboxId>().ok())
        .ok_or_else(|| {
            Box::new(error(
                ErrorCode::InvalidRequest,
                format!("{SANDBOX_HEADER} must name a sandbox"),
            ))
        })?;
    let port = text(PORT_HEADER)
        .and_then(|v| v.parse::<u16>().ok())
        .filter(|p| *p != 0)
        .ok_or_else(|| {
            Box::new(error(
                ErrorCode::InvalidRequest,
                format!("{PORT_HEADER} must be a TCP port"),
            ))
        })?;
    Ok((id, port))
}

/// The host-side address of a running sandbox (the guest answers on every port of it).
fn address(manager: &Manager, id: SandboxId) -> Result<IpAddr, AgentError> {
    let guest = manager.get(id)?.guest()?;
    guest
        .base_url()
        .strip_prefix("http://")
        .and_then(|rest| rest.rsplit_once(':'))
        .and_then(|(host, _)| host.parse().ok())
        .ok_or_else(|| AgentError::Internal(format!("sandbox {id} has no address")))
}

/// Forwards one request to a port inside a sandbox.
#[tracing::instrument(skip_all, fields(sandbox, port))]
pub async fn handle(State(state): State<ProxyState>, mut request: Request<Body>) -> Response {
    let token = request
        .headers()
        .get(AUTH_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if token.is_none_or(|t| nestbox_proto::auth::verify(&state.key, state.host, t).is_err()) {
        return error(
            ErrorCode::Unauthorized,
            "missing or invalid control-plane token",
        );
    }
    let (id, port) = match target(request.headers()) {
        Ok(t) => t,
        Err(response) => return *response,
    };
    tracing::Span::current().record("sandbox", tracing::field::display(id));
    tracing::Span::current().record("port", port);
    let ip = match address(&state.manager, id) {
        Ok(ip) => ip,
        Err(e) => return error(e.code(), e.public_message()),
    };
    let headers = request.headers_mut();
    headers.remove(AUTH_HEADER);
    headers.remove(SANDBOX_HEADER);
    headers.remove(PORT_HEADER);
    match state
        .forwarder
        .forward(request, SocketAddr::new(ip, port))
        .await
    {
        Ok(response) => response,
        Err(ForwardError::Connect { .. }) => error(
            ErrorCode::PortUnreachable,
            format!("nothing accepts connections on port {port} in sandbox {id}"),
        ),
        Err(e) => {
            // Accepted, then broken: worth a line in the log (the client sees a 502).
            tracing::warn!(sandbox = %id, port, error = %e, "forwarding to the guest failed");
            error(
                ErrorCode::PortUnreachable,
                format!("port {port} of sandbox {id}: {e}"),
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_headers_are_validated() {
        let mut h = HeaderMap::new();
        assert!(target(&h).is_err());
        let id = SandboxId::new();
        h.insert(SANDBOX_HEADER, id.to_string().parse().unwrap());
        h.insert(PORT_HEADER, "0".parse().unwrap());
        assert!(target(&h).is_err());
        h.insert(PORT_HEADER, "70000".parse().unwrap());
        assert!(target(&h).is_err());
        h.insert(PORT_HEADER, "8080".parse().unwrap());
        assert_eq!(target(&h).unwrap(), (id, 8080));
        h.insert(SANDBOX_HEADER, "nope".parse().unwrap());
        assert!(target(&h).is_err());
    }
}
