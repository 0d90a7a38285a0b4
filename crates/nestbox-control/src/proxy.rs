//! The proxy to TCP ports inside sandboxes.
//!
//! A request reaches port `P` of sandbox `S` in one of three forms, checked in this order
//! before any API route:
//! 1. headers `E2b-Sandbox-Id: S` and `E2b-Sandbox-Port: P` (one host name for every
//!    sandbox, as E2B's SDKs send them), path and query unchanged;
//! 2. host name `P-S.{domain}` when a proxy domain is configured (wildcard DNS), path and
//!    query unchanged;
//! 3. path `/v1/sandboxes/S/ports/P/rest…` (one box, no DNS needed): forwarded as `/rest…`.
//!
//! Rules:
//! - the caller is the sandbox's team (its API key or a member's session, as for every
//!   other sandbox endpoint) or holds the sandbox's traffic token
//!   (`e2b-traffic-access-token`), or the sandbox's ports are public (`public_traffic`,
//!   E2B's `allowPublicTraffic`; forms 1 and 2 only); anyone else gets the same `404` as a
//!   missing sandbox;
//! - the guest agent's port ([`GUEST_AGENT_PORT`]) needs the guest's access token in
//!   `X-Access-Token`, checked here, so the guest agent is never reachable without it;
//!   that token alone is enough there (it is what E2B's SDKs send, and it opens nothing
//!   but that sandbox's guest agent);
//! - a sandbox that is not running answers `409 sandbox_not_running` at once, a port
//!   nobody listens on `502 port_unreachable` at once: a request never hangs on them —
//!   except a paused sandbox created with `auto_resume`, which the request resumes first;
//! - the platform's credentials (API key, traffic token, a session bearer, the dashboard's
//!   session cookie) are removed before the request goes on: code in the sandbox never
//!   sees them; the session cookie authenticates nothing here (see [`crate::browser`]);
//! - the request goes to the sandbox's host agent, which forwards it to the guest
//!   ([`nestbox_forward`]); bodies stream, WebSocket upgrades pass through.

use std::net::SocketAddr;

use axum::extract::{FromRequestParts, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http::{HeaderValue, Uri, header};
use nestbox_db::sandboxes;
use nestbox_proto::proxy::{AUTH_HEADER, PORT_HEADER, SANDBOX_HEADER};
use nestbox_types::{ErrorCode, SandboxId, SandboxStatus};

use crate::auth::{SandboxSecret, check_sandbox_secret, sandbox_secret};
use crate::error::ApiError;
use crate::extract::Caller;
use crate::state::AppState;

/// The guest agent's port inside every sandbox.
pub const GUEST_AGENT_PORT: u16 = 49983;
/// E2B's routing header naming the sandbox.
pub const SANDBOX_ID_HEADER: &str = "e2b-sandbox-id";
/// E2B's routing header naming the port.
pub const SANDBOX_PORT_HEADER: &str = "e2b-sandbox-port";
/// The per-sandbox traffic token header.
pub const TRAFFIC_TOKEN_HEADER: &str = "e2b-traffic-access-token";
/// The guest agent's access token header.
pub const ACCESS_TOKEN_HEADER: &str = "x-access-token";

/// Where a proxied request goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The sandbox.
    pub sandbox: SandboxId,
    /// The port inside it.
    pub port: u16,
    /// The path and query to send, when the route rewrote them (path form).
    pub path: Option<String>,
}

fn invalid(message: impl Into<String>) -> ApiError {
    ApiError::invalid(message)
}

fn parse_port(text: &str) -> Result<u16, ApiError> {
    text.parse::<u16>()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| invalid(format!("`{text}` is not a TCP port (1–65535)")))
}

fn parse_sandbox(text: &str) -> Result<SandboxId, ApiError> {
    text.parse::<SandboxId>()
        .map_err(|_| invalid(format!("`{text}` is not a sandbox id")))
}

/// The proxy target of a request, if it is one. `Err` for a request that is clearly meant
/// for the proxy but names no valid target.
pub fn target(
    domain: Option<&str>,
    headers: &http::HeaderMap,
    uri: &Uri,
) -> Result<Option<Target>, ApiError> {
    let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    match (text(SANDBOX_ID_HEADER), text(SANDBOX_PORT_HEADER)) {
        (Some(id), Some(port)) => {
            return Ok(Some(Target {
                sandbox: parse_sandbox(id.trim())?,
                port: parse_port(port.trim())?,
                path: None,
            }));
        }
        (Some(_), None) | (None, Some(_)) => {
            return Err(invalid(format!(
                "send both {SANDBOX_ID_HEADER} and {SANDBOX_PORT_HEADER}"
            )));
        }
        (None, None) => {}
    }
    if let Some(domain) = domain
        && let Some(host) = text(header::HOST.as_str()).or(uri.host())
    {
        let host = host.rsplit_once(':').map_or(host, |(h, port)| {
            if port.bytes().all(|b| b.is_ascii_digit()) {
                h
            } else {
                host
            }
        });
        let host = host.to_ascii_lowercase();
        let domain = domain.to_ascii_lowercase();
        if let Some(label) = host
            .strip_suffix(&domain)
            .and_then(|rest| rest.strip_suffix('.'))
            .filter(|label| !label.contains('.'))
            && let Some((port, sandbox)) = label.split_once('-')
        {
            return Ok(Some(Target {
                sandbox: parse_sandbox(sandbox)?,
                port: parse_port(port)?,
                path: None,
            }));
        }
    }
    let Some(rest) = uri.path().strip_prefix("/v1/sandboxes/") else {
        return Ok(None);
    };
    let mut parts = rest.splitn(4, '/');
    let (Some(id), Some("ports"), Some(port)) = (parts.next(), parts.next(), parts.next()) else {
        return Ok(None);
    };
    let tail = parts.next().unwrap_or("");
    let query = uri.query().map(|q| format!("?{q}")).unwrap_or_default();
    Ok(Some(Target {
        sandbox: parse_sandbox(id)?,
        port: parse_port(port)?,
        path: Some(format!("/{tail}{query}")),
    }))
}

/// Middleware in front of every route: proxied requests are answered here, the rest go on.
pub async fn intercept(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let domain = state.services.cfg.proxy_domain.as_deref();
    match target(domain, request.headers(), request.uri()) {
        Ok(Some(target)) => match forward(&state, target, request).await {
            Ok(response) => response,
            Err(e) => e.into_response(),
        },
        Ok(None) => next.run(request).await,
        Err(e) => e.into_response(),
    }
}

#[tracing::instrument(skip_all, fields(sandbox = %target.sandbox, port = target.port))]
async fn forward(state: &AppState, target: Target, request: Request) -> Result<Response, ApiError> {
    let services = &state.services;
    let secret = &services.cfg.master_secret;
    let id = target.sandbox;
    let (mut parts, body) = request.into_parts();
    let not_found = || {
        ApiError::new(
            ErrorCode::SandboxNotFound,
            format!("sandbox {id} not found"),
        )
    };

    let row = || async {
        sandboxes::get(&services.db, id).await.map_err(|e| {
            if e.is_not_found() {
                not_found()
            } else {
                ApiError::from(e)
            }
        })
    };
    // The dashboard's session cookie never opens a sandbox's port (a page served from a
    // sandbox under the API's paths would run in the dashboard's origin) and never reaches
    // the sandbox.
    crate::browser::strip_session_cookie(&mut parts.headers);
    let traffic = parts
        .headers
        .get(TRAFFIC_TOKEN_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    // Tokens are checked against the sandbox's current generation (a rotation makes
    // older ones worthless), so the record is read first when one may be offered; an
    // unknown sandbox matches no token.
    let early = if traffic.is_some()
        || target.port == GUEST_AGENT_PORT
        || parts.headers.contains_key(ACCESS_TOKEN_HEADER)
    {
        match row().await {
            Ok(sb) => Some(sb),
            Err(e) if e.code == ErrorCode::SandboxNotFound => None,
            Err(e) => return Err(e),
        }
    } else {
        None
    };
    let generation = early.as_ref().map(|sb| sb.token_generation);
    let mut offered_envd = parts
        .headers
        .get(ACCESS_TOKEN_HEADER)
        .and_then(|v| v.to_str().ok())
        .zip(generation)
        .is_some_and(|(t, g)| check_sandbox_secret(secret, SandboxSecret::Envd, id, g, t));
    // A signed file URL (E2B's `download_url`/`upload_url`) stands for the guest token on
    // that one path and operation; the guest agent then gets the token itself.
    if target.port == GUEST_AGENT_PORT
        && !offered_envd
        && parts.uri.path() == "/files"
        && let Some(query) = parts.uri.query()
        && let Some(generation) = generation
        && let Some(checked) =
            file_signature(secret, id, generation, &parts.method, query, now_unix())
    {
        checked?;
        let token = sandbox_secret(secret, SandboxSecret::Envd, id, generation);
        let value = HeaderValue::try_from(token)
            .map_err(|e| ApiError::internal(format!("header value: {e}")))?;
        parts.headers.insert(ACCESS_TOKEN_HEADER, value);
        offered_envd = true;
    }
    let by_sandbox_token = match (&traffic, target.port == GUEST_AGENT_PORT && offered_envd) {
        (_, true) => true,
        (Some(token), false) => {
            let valid = generation.is_some_and(|g| {
                check_sandbox_secret(secret, SandboxSecret::Traffic, id, g, token)
            });
            if !valid {
                return Err(not_found());
            }
            true
        }
        (None, false) => false,
    };
    // A session of ours that came along is still ours: it never reaches the sandbox.
    let strip_session = |headers: &mut http::HeaderMap| {
        let session = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .is_some_and(|(_, t)| services.sessions.verify(t.trim()).is_ok());
        if session {
            headers.remove(header::AUTHORIZATION);
        }
    };
    // (An unknown sandbox is left to the credential check below, so that a caller without
    // credentials learns nothing about which sandboxes exist. Public ports are served by
    // host name and routing headers only, never under the API's own paths, so a public
    // sandbox's pages never run in the API's origin.)
    let public = if by_sandbox_token || target.path.is_some() {
        None
    } else {
        match row().await {
            Ok(sb) => Some(sb).filter(|sb| sb.public_traffic),
            Err(e) if e.code == ErrorCode::SandboxNotFound => None,
            Err(e) => return Err(e),
        }
    };
    let sandbox = if by_sandbox_token {
        strip_session(&mut parts.headers);
        match early {
            Some(sb) => sb,
            None => row().await?,
        }
    } else if let Some(sandbox) = public {
        // Public ports need no credentials; any of ours that came along stay here.
        strip_session(&mut parts.headers);
        sandbox
    } else {
        let by_key = parts.headers.contains_key("x-api-key");
        let caller = Caller::from_request_parts(&mut parts, state).await?;
        if !by_key {
            // The session's bearer token is ours, not the sandbox's.
            parts.headers.remove(header::AUTHORIZATION);
        }
        services.sandbox_row(&caller, id).await?
    };
    let sandbox = if sandbox.status == SandboxStatus::Paused && sandbox.auto_resume {
        resume_for_traffic(services, sandbox).await?
    } else {
        sandbox
    };
    if sandbox.status != SandboxStatus::Running {
        let hint = match sandbox.status {
            SandboxStatus::Paused => "; resume it to reach its ports",
            _ => "",
        };
        return Err(ApiError::new(
            ErrorCode::SandboxNotRunning,
            format!("sandbox {id} is {}{hint}", sandbox.status),
        ));
    }
    if target.port == GUEST_AGENT_PORT && !offered_envd {
        return Err(ApiError::forbidden(format!(
            "port {GUEST_AGENT_PORT} is the guest agent's: send its access token in X-Access-Token"
        )));
    }

    let (host, address) = services.host_address(sandbox.host_id).await?;
    let upstream = resolve(&address).await?;
    let headers = &mut parts.headers;
    for name in [
        "x-api-key",
        TRAFFIC_TOKEN_HEADER,
        SANDBOX_ID_HEADER,
        SANDBOX_PORT_HEADER,
    ] {
        headers.remove(name);
    }
    let bearer = format!("Bearer {}", services.pool.token(host)?);
    let value = |v: String| {
        HeaderValue::try_from(v).map_err(|e| ApiError::internal(format!("header value: {e}")))
    };
    headers.insert(AUTH_HEADER, value(bearer)?);
    headers.insert(SANDBOX_HEADER, value(id.to_string())?);
    headers.insert(PORT_HEADER, value(target.port.to_string())?);
    if let Some(path) = &target.path {
        parts.uri = path
            .parse()
            .map_err(|e| ApiError::invalid(format!("invalid path: {e}")))?;
    }
    let request = Request::from_parts(parts, body);
    let forwarded = if address.starts_with("https://") {
        services
            .pool
            .tls_forwarder(host)?
            .forward(request, upstream)
            .await
    } else {
        services.forwarder.forward(request, upstream).await
    };
    forwarded.map_err(|e| {
        ApiError::new(
            ErrorCode::HostUnavailable,
            format!("the sandbox's host cannot be reached: {e}"),
        )
    })
}

/// The socket address of an agent URL (`http(s)://host:port`).
async fn resolve(address: &str) -> Result<SocketAddr, ApiError> {
    let bad = || {
        ApiError::internal(format!(
            "host address `{address}` is not http(s)://host:port"
        ))
    };
    let authority = address
        .strip_prefix("https://")
        .or_else(|| address.strip_prefix("http://"))
        .ok_or_else(bad)?
        .trim_end_matches('/');
    if let Ok(addr) = authority.parse::<SocketAddr>() {
        return Ok(addr);
    }
    tokio::net::lookup_host(authority)
        .await
        .map_err(|e| {
            ApiError::new(
                ErrorCode::HostUnavailable,
                format!("cannot resolve {authority}: {e}"),
            )
        })?
        .next()
        .ok_or_else(bad)
}

/// Resumes a paused sandbox with `auto_resume` for a request that reached one of its
/// ports, and returns it running. Requests that arrive together resume it once: those that
/// lose the race wait (up to the pause timeout) until it runs.
async fn resume_for_traffic(
    services: &crate::state::Services,
    sb: sandboxes::Sandbox,
) -> Result<sandboxes::Sandbox, ApiError> {
    let id = sb.id;
    let resumed = services
        .resume_sandbox(&Caller::system(sb.team_id), id, None)
        .await;
    let deadline = tokio::time::Instant::now() + services.cfg.pause_timeout;
    loop {
        let now = sandboxes::get(&services.db, id).await?;
        if now.status == SandboxStatus::Running {
            return Ok(now);
        }
        if now.status != SandboxStatus::Paused || tokio::time::Instant::now() >= deadline {
            return match resumed {
                Err(e) => Err(e),
                Ok(_) => Ok(now),
            };
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

fn now_unix() -> i64 {
    chrono::Utc::now().timestamp()
}

/// Checks a signed `/files` URL: `None` when the query carries no signature, else whether
/// it is E2B's v1 signature of this path, operation (GET reads, anything else writes),
/// user and the sandbox's guest token, and not expired.
///
/// The signature is `v1_` + unpadded base64 of SHA-256 over
/// `{path}:{read|write}:{username}:{token}`, with `:{expiration}` appended when the URL
/// carries `signature_expiration` (Unix seconds).
fn file_signature(
    secret: &[u8],
    id: SandboxId,
    generation: u64,
    method: &http::Method,
    query: &str,
    now: i64,
) -> Option<Result<(), ApiError>> {
    use base64::Engine as _;
    use sha2::Digest as _;
    use subtle::ConstantTimeEq as _;
    let mut path = None;
    let mut user = String::new();
    let mut signature = None;
    let mut expiration = None;
    for (k, v) in form_urlencoded::parse(query.as_bytes()) {
        match k.as_ref() {
            "path" => path = Some(v.into_owned()),
            "username" => user = v.into_owned(),
            "signature" => signature = Some(v.into_owned()),
            "signature_expiration" => expiration = Some(v.into_owned()),
            _ => {}
        }
    }
    let signature = signature?;
    let refused = |why: &str| {
        Some(Err(ApiError::new(
            ErrorCode::Unauthorized,
            format!("signed file URL: {why}"),
        )))
    };
    let Some(path) = path else {
        return refused("it names no path");
    };
    let operation = if method == http::Method::GET || method == http::Method::HEAD {
        "read"
    } else {
        "write"
    };
    let token = sandbox_secret(secret, SandboxSecret::Envd, id, generation);
    let mut raw = format!("{path}:{operation}:{user}:{token}");
    if let Some(exp) = &expiration {
        let Ok(at) = exp.parse::<i64>() else {
            return refused("signature_expiration is not a Unix time");
        };
        if at < now {
            return refused("it has expired");
        }
        raw.push(':');
        raw.push_str(exp);
    }
    let digest = sha2::Sha256::digest(raw.as_bytes());
    let expected = format!(
        "v1_{}",
        base64::engine::general_purpose::STANDARD_NO_PAD.encode(digest)
    );
    if bool::from(expected.as_bytes().ct_eq(signature.as_bytes())) {
        Some(Ok(()))
    } else {
        refused("the signature does not match")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signed_file_urls_are_checked() {
        use base64::Engine as _;
        use sha2::Digest as _;
        let secret = [7u8; 32];
        let id = SandboxId::new();
        let token = sandbox_secret(&secret, SandboxSecret::Envd, id, 0);
        let sign = |raw: String| {
            format!(
                "v1_{}",
                base64::engine::general_purpose::STANDARD_NO_PAD
                    .encode(sha2::Sha256::digest(raw.as_bytes()))
            )
        };
        let get = http::Method::GET;
        let post = http::Method::POST;
        let enc = |s: &str| {
            percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
        };
        // No signature: not a signed request.
        assert!(file_signature(&secret, id, 0, &get, "path=/tmp/x", 0).is_none());
        let read = sign(format!("/tmp/x:read::{token}"));
        let q = format!("path=%2Ftmp%2Fx&signature={}", enc(&read));
        assert!(matches!(
            file_signature(&secret, id, 0, &get, &q, 0),
            Some(Ok(()))
        ));
        // The same signature does not write, nor read another path or sandbox.
        assert!(matches!(
            file_signature(&secret, id, 0, &post, &q, 0),
            Some(Err(_))
        ));
        let other = format!("path=%2Fetc%2Fshadow&signature={}", enc(&read));
        assert!(matches!(
            file_signature(&secret, id, 0, &get, &other, 0),
            Some(Err(_))
        ));
        assert!(matches!(
            file_signature(&secret, SandboxId::new(), 0, &get, &q, 0),
            Some(Err(_))
        ));
        // A user and an expiry are signed too; past the expiry it is refused.
        let write = sign(format!("/tmp/y:write:root:{token}:1000"));
        let q = format!(
            "path=/tmp/y&username=root&signature={}&signature_expiration=1000",
            enc(&write)
        );
        assert!(matches!(
            file_signature(&secret, id, 0, &post, &q, 999),
            Some(Ok(()))
        ));
        let late = file_signature(&secret, id, 0, &post, &q, 1001);
        assert!(
            matches!(&late, Some(Err(e)) if e.message.contains("expired")),
            "{late:?}"
        );
        let moved = q.replace("signature_expiration=1000", "signature_expiration=9999");
        assert!(matches!(
            file_signature(&secret, id, 0, &post, &moved, 0),
            Some(Err(_))
        ));
    }

    fn t(domain: Option<&str>, headers: &[(&str, &str)], uri: &str) -> Option<Target> {
        let mut h = http::HeaderMap::new();
        for (k, v) in headers {
            h.insert(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        target(domain, &h, &uri.parse().unwrap()).unwrap()
    }

    #[test]
    fn the_three_forms_are_recognised() {
        let id = SandboxId::new();
        let by_headers = t(
            None,
            &[
                ("e2b-sandbox-id", &id.to_string()),
                ("e2b-sandbox-port", "8080"),
            ],
            "/x?y=1",
        )
        .unwrap();
        assert_eq!(
            (by_headers.sandbox, by_headers.port, by_headers.path),
            (id, 8080, None)
        );

        let host = format!("3000-{id}.sb.example.com:7700");
        let by_host = t(Some("sb.example.com"), &[("host", &host)], "/").unwrap();
        assert_eq!((by_host.sandbox, by_host.port), (id, 3000));
        // Without a configured domain, host names mean nothing.
        assert!(t(None, &[("host", &host)], "/").is_none());
        // The API's own host name is not a sandbox.
        assert!(
            t(
                Some("sb.example.com"),
                &[("host", "sb.example.com")],
                "/v1/sandboxes"
            )
            .is_none()
        );

        let by_path = t(None, &[], &format!("/v1/sandboxes/{id}/ports/8080/a/b?c=d")).unwrap();
        assert_eq!(by_path.path.as_deref(), Some("/a/b?c=d"));
        let root = t(None, &[], &format!("/v1/sandboxes/{id}/ports/8080")).unwrap();
        assert_eq!(root.path.as_deref(), Some("/"));
        assert!(t(None, &[], &format!("/v1/sandboxes/{id}/files")).is_none());
        assert!(t(None, &[], "/v1/sandboxes").is_none());
    }

    #[test]
    fn bad_targets_are_invalid_requests() {
        let id = SandboxId::new();
        let h = |pairs: &[(&str, &str)]| {
            let mut h = http::HeaderMap::new();
            for (k, v) in pairs {
                h.insert(
                    http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                    v.parse().unwrap(),
                );
            }
            h
        };
        let root: Uri = "/".parse().unwrap();
        for headers in [
            h(&[("e2b-sandbox-id", &id.to_string())]),
            h(&[("e2b-sandbox-id", "nope"), ("e2b-sandbox-port", "80")]),
            h(&[
                ("e2b-sandbox-id", &id.to_string()),
                ("e2b-sandbox-port", "0"),
            ]),
            h(&[
                ("e2b-sandbox-id", &id.to_string()),
                ("e2b-sandbox-port", "99999"),
            ]),
        ] {
            let err = target(None, &headers, &root).unwrap_err();
            assert_eq!(err.code, ErrorCode::InvalidRequest);
        }
        let path: Uri = format!("/v1/sandboxes/{id}/ports/http/").parse().unwrap();
        assert!(target(None, &http::HeaderMap::new(), &path).is_err());
    }
}
