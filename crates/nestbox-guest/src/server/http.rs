//! The HTTP surface: routing, the access-token gate, CORS, and the plain endpoints
//! (`/health`, `/init`, `/envs`, `/metrics`).
//!
//! Authorization matrix: `GET /health` and CORS preflights are open; `POST /init` checks
//! its own token rules (see [`super::state`]); every other route needs `X-Access-Token`
//! equal to the current token and answers 401 before a token is set.

use std::convert::Infallible;
use std::sync::Arc;

use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use hyper::body::Incoming;
use nestbox_envd::connect::ConnectError;
use nestbox_envd::connect::server::{ResponseBody, empty_body, full_body, unary_error};
use nestbox_envd::types::{HttpError, InitRequest};
use nestbox_envd::{headers, services};

use super::state::{InitError, Server};
use super::users::UserDb;
use super::{files, filesystem, metrics, process, system};

/// Largest `/init` body.
const MAX_INIT_BODY: usize = 1 << 20;

/// A JSON error in envd's plain-HTTP shape.
pub fn json_error(status: StatusCode, message: &str) -> Response<ResponseBody> {
    let body = serde_json::to_vec(&HttpError {
        code: status.as_u16(),
        message: message.to_owned(),
    })
    .unwrap_or_default();
    let mut response = Response::new(full_body(body));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

fn json<T: serde::Serialize>(value: &T) -> Response<ResponseBody> {
    match serde_json::to_vec(value) {
        Ok(body) => {
            let mut response = Response::new(full_body(body));
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            response
        }
        Err(e) => json_error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
    }
}

fn no_content() -> Response<ResponseBody> {
    let mut response = Response::new(empty_body());
    *response.status_mut() = StatusCode::NO_CONTENT;
    response
}

/// The service function of every connection.
pub async fn handle(
    server: Arc<Server>,
    request: Request<Incoming>,
) -> Result<Response<ResponseBody>, Infallible> {
    let mut response = route(server, request).await;
    let headers = response.headers_mut();
    headers.insert(
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        HeaderValue::from_static("*"),
    );
    headers.insert(
        header::ACCESS_CONTROL_EXPOSE_HEADERS,
        HeaderValue::from_static("*"),
    );
    Ok(response)
}

async fn route(server: Arc<Server>, request: Request<Incoming>) -> Response<ResponseBody> {
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    if method == Method::OPTIONS {
        let mut response = no_content();
        let headers = response.headers_mut();
        headers.insert(
            header::ACCESS_CONTROL_ALLOW_METHODS,
            HeaderValue::from_static("GET, POST, OPTIONS"),
        );
        headers.insert(
            header::ACCESS_CONTROL_ALLOW_HEADERS,
            HeaderValue::from_static("*"),
        );
        headers.insert(
            header::ACCESS_CONTROL_MAX_AGE,
            HeaderValue::from_static("86400"),
        );
        return response;
    }
    match (&method, path.as_str()) {
        (&Method::GET, "/health") => {
            let mut response = no_content();
            response.headers_mut().insert(
                headers::GUEST_VERSION,
                HeaderValue::from_static(env!("CARGO_PKG_VERSION")),
            );
            return response;
        }
        (&Method::POST, "/init") => return init(&server, request).await,
        _ => {}
    }

    let rpc = rpc_route(&path);
    if !server.authorized(request.headers()) {
        let message = "unauthorized: send the sandbox's access token in X-Access-Token";
        return match rpc {
            // Connect clients read the code from the body.
            Some(_) => unary_error(&ConnectError::unauthenticated(message)),
            None => json_error(StatusCode::UNAUTHORIZED, message),
        };
    }

    if let Some((service, rpc_method)) = rpc {
        if method != Method::POST {
            return json_error(StatusCode::METHOD_NOT_ALLOWED, "Connect calls use POST");
        }
        let rpc_method = rpc_method.to_owned();
        return match service {
            services::PROCESS => process::serve(server, &rpc_method, request).await,
            _ => filesystem::serve(server, &rpc_method, request).await,
        };
    }

    match (&method, path.as_str()) {
        (&Method::GET, "/envs") => json(&server.defaults().env),
        (&Method::GET, "/metrics") => {
            let server = Arc::clone(&server);
            match tokio::task::spawn_blocking(move || metrics::collect(&server)).await {
                Ok(metrics) => json(&metrics),
                Err(e) => json_error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
            }
        }
        (&Method::GET, "/files") => files::download(&server, &request).await,
        (&Method::POST, "/files") => files::upload(&server, request).await,
        (_, "/envs" | "/metrics" | "/files") => {
            json_error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed")
        }
        _ => json_error(StatusCode::NOT_FOUND, &format!("no route {method} {path}")),
    }
}

/// `(service, method)` of a Connect path of a service this agent serves.
fn rpc_route(path: &str) -> Option<(&'static str, &str)> {
    let rest = path.strip_prefix('/')?;
    let (service, method) = rest.split_once('/')?;
    let service = [services::PROCESS, services::FILESYSTEM]
        .into_iter()
        .find(|s| *s == service)?;
    (!method.is_empty() && !method.contains('/')).then_some((service, method))
}

async fn init(server: &Server, request: Request<Incoming>) -> Response<ResponseBody> {
    use http_body_util::BodyExt;

    let (parts, body) = request.into_parts();
    let bytes = match http_body_util::Limited::new(body, MAX_INIT_BODY)
        .collect()
        .await
    {
        Ok(collected) => collected.to_bytes(),
        Err(e) => {
            return json_error(
                StatusCode::BAD_REQUEST,
                &format!("cannot read the body: {e}"),
            );
        }
    };
    let init: InitRequest = if bytes.iter().all(u8::is_ascii_whitespace) {
        InitRequest::default()
    } else {
        match serde_json::from_slice(&bytes) {
            Ok(init) => init,
            Err(e) => return json_error(StatusCode::BAD_REQUEST, &format!("invalid body: {e}")),
        }
    };
    let applied = server.init(&parts.headers, &init, |name| UserDb::load()?.user(name));
    match applied {
        Ok(()) => {}
        Err(err @ InitError::Unauthorized(_)) => {
            tracing::warn!(error = %err, "refused /init");
            return json_error(StatusCode::UNAUTHORIZED, &err.to_string());
        }
        Err(InitError::User(e)) => return json_error(StatusCode::BAD_REQUEST, &e.to_string()),
    }
    if server.manage_system() {
        if let Some(time) = init.timestamp
            && let Err(e) = system::set_clock(time)
        {
            tracing::warn!(error = %e, "cannot set the clock");
        }
        if let Some(name) = init.hostname.as_deref()
            && let Err(e) = system::set_hostname(name)
        {
            tracing::warn!(error = %e, "cannot set the host name");
        }
        if let Some(entropy) = init.entropy.as_deref()
            && let Err(e) = system::add_entropy(entropy)
        {
            tracing::warn!(error = %e, "cannot reseed the random generator");
        }
    }
    tracing::info!(request = ?init, "initialised");
    no_content()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rpc_routes() {
        assert_eq!(
            rpc_route("/process.Process/Start"),
            Some((services::PROCESS, "Start"))
        );
        assert_eq!(
            rpc_route("/filesystem.Filesystem/Stat"),
            Some((services::FILESYSTEM, "Stat"))
        );
        assert_eq!(rpc_route("/process.Process/"), None);
        assert_eq!(rpc_route("/other.Service/Start"), None);
        assert_eq!(rpc_route("/files"), None);
    }
}
