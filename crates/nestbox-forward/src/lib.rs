//! One reverse-proxy hop: forwards an HTTP request to an upstream server and its answer
//! back, WebSocket (and any other HTTP/1.1) upgrades included. (And [`serve_tls`]: serving
//! a router over TLS, which both ends of the hop need.)
//!
//! The control plane uses it to reach a host agent, the host agent to reach a port inside
//! a sandbox. What this module owns, and its invariants:
//! - hop-by-hop headers (RFC 9110 §7.6.1, plus any named in `Connection`) never cross a
//!   hop, except `Connection: upgrade` and `Upgrade` on an upgrade request and its `101`;
//! - bodies stream in both directions: nothing is buffered whole, so a large upload or a
//!   long-lived event stream costs no memory here;
//! - an upgraded pair of connections is spliced byte for byte until either side closes;
//! - upstream connections are pooled (keep-alive), and connecting is bounded by
//!   [`CONNECT_TIMEOUT`]; a request that has connected is never cut short by this module
//!   (long polls and streams are the upstream's business).

mod serve;

pub use serve::{DRAIN_TIMEOUT, HANDSHAKE_TIMEOUT, serve_tls};

use std::net::SocketAddr;
use std::time::Duration;

use axum::body::Body;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Uri};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};

/// How long connecting to an upstream may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a request could not be forwarded.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    /// Nothing accepted the connection (refused, unreachable, or timed out).
    #[error("cannot connect to {addr}: {detail}")]
    Connect {
        /// The upstream.
        addr: SocketAddr,
        /// What the connector said.
        detail: String,
    },
    /// The connection broke before a complete answer came back.
    #[error("{addr} did not answer: {detail}")]
    Upstream {
        /// The upstream.
        addr: SocketAddr,
        /// What went wrong.
        detail: String,
    },
    /// The request's target cannot be rewritten for the upstream.
    #[error("invalid request target: {0}")]
    Target(String),
}

/// A pooled HTTP/1.1 client that forwards requests as they are, over `C` (plain TCP by
/// default; a TLS connector for hops that need one).
#[derive(Clone, Debug)]
pub struct Forwarder<C = HttpConnector> {
    client: Client<C, Body>,
    scheme: &'static str,
}

impl Default for Forwarder {
    fn default() -> Self {
        Self::new()
    }
}

/// Headers that belong to one connection, not to the message.
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Whether `headers` ask for a protocol upgrade (`Connection: upgrade` + `Upgrade`).
pub fn is_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE)
        && headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|token| token.trim().eq_ignore_ascii_case("upgrade"))
}

/// Removes hop-by-hop headers; keeps the upgrade pair when `keep_upgrade`.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    let upgrade = keep_upgrade
        .then(|| headers.get(header::UPGRADE).cloned())
        .flatten();
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(name);
    }
    if let Some(upgrade) = upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, upgrade);
    }
}

impl Forwarder {
    /// A forwarder over plain TCP with its own connection pool.
    pub fn new() -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(CONNECT_TIMEOUT));
        Self::with_connector(connector, "http")
    }
}

impl<C> Forwarder<C>
where
    C: hyper_util::client::legacy::connect::Connect + Clone + Send + Sync + 'static,
{
    /// A forwarder over `connector`, addressing upstreams as `scheme://addr` (the
    /// connector's caller should bound connecting by [`CONNECT_TIMEOUT`]).
    pub fn with_connector(connector: C, scheme: &'static str) -> Self {
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(connector);
        Self { client, scheme }
    }

    /// Sends `request` to `upstream` (its path and query kept, its `Host` kept) and returns
    /// the answer. An upgrade that the upstream accepts (`101`) is spliced in the
    /// background once both sides have switched.
    pub async fn forward(
        &self,
        mut request: Request<Body>,
        upstream: SocketAddr,
    ) -> Result<Response<Body>, ForwardError> {
        let upgrade = is_upgrade(request.headers());
        let downstream = upgrade.then(|| hyper::upgrade::on(&mut request));
        let path = request
            .uri()
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_owned();
        *request.uri_mut() = Uri::builder()
            .scheme(self.scheme)
            .authority(upstream.to_string())
            .path_and_query(path)
            .build()
            .map_err(|e| ForwardError::Target(e.to_string()))?;
        // The client writes the HTTP/1.1 request itself: an HTTP/2 caller's version must
        // not leak into it.
        *request.version_mut() = http::Version::HTTP_11;
        strip_hop_by_hop(request.headers_mut(), upgrade);

        let mut response = self.client.request(request).await.map_err(|e| {
            let detail = error_chain(&e);
            if e.is_connect() {
                ForwardError::Connect {
                    addr: upstream,
                    detail,
                }
            } else {
                ForwardError::Upstream {
                    addr: upstream,
                    detail,
                }
            }
        })?;

        let switched = response.status() == StatusCode::SWITCHING_PROTOCOLS;
        if let (true, Some(downstream)) = (switched, downstream) {
            let upstream_io = hyper::upgrade::on(&mut response);
            tokio::spawn(async move {
                match tokio::try_join!(downstream, upstream_io) {
                    Ok((down, up)) => {
                        let mut down = TokioIo::new(down);
                        let mut up = TokioIo::new(up);
                        if let Err(e) = tokio::io::copy_bidirectional(&mut down, &mut up).await {
                            tracing::debug!(%upstream, error = %e, "upgraded connection ended");
                        }
                    }
                    Err(e) => tracing::debug!(%upstream, error = %e, "upgrade did not complete"),
                }
            });
        }
        strip_hop_by_hop(response.headers_mut(), switched);
        Ok(response.map(Body::new))
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        out.push_str(": ");
        out.push_str(&cause.to_string());
        source = cause.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn hop_by_hop_headers_are_removed_named_ones_too() {
        let mut h = headers(&[
            ("connection", "keep-alive, x-private"),
            ("keep-alive", "timeout=5"),
            ("x-private", "secret"),
            ("te", "trailers"),
            ("content-type", "text/plain"),
        ]);
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 1, "{h:?}");
        assert_eq!(h["content-type"], "text/plain");
    }

    #[test]
    fn an_upgrade_keeps_its_pair() {
        let mut h = headers(&[
            ("connection", "Upgrade, keep-alive"),
            ("upgrade", "websocket"),
            ("sec-websocket-key", "abc"),
        ]);
        assert!(is_upgrade(&h));
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h["connection"], "upgrade");
        assert_eq!(h["upgrade"], "websocket");
        assert_eq!(h["sec-websocket-key"], "abc");
        assert!(!is_upgrade(&headers(&[("upgrade", "websocket")])));
    }

    /// A one-shot HTTP/1.1 server that answers with the request head it received.
    async fn echo_head_server() -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = Vec::new();
            let mut chunk = [0u8; 1024];
            while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = s.read(&mut chunk).await.unwrap();
                buf.extend_from_slice(&chunk[..n]);
            }
            let head = String::from_utf8_lossy(&buf).to_string();
            let reply = format!(
                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: x-drop\r\nx-drop: 1\r\n\r\n{head}",
                head.len()
            );
            s.write_all(reply.as_bytes()).await.unwrap();
        });
        addr
    }

    #[tokio::test]
    async fn forwards_path_host_and_body_without_hop_headers() {
        let addr = echo_head_server().await;
        let request = Request::builder()
            .uri("http://front.example/some/path?x=1")
            .header("host", "front.example")
            .header("te", "trailers")
            .header("x-app", "yes")
            .body(Body::empty())
            .unwrap();
        let response = Forwarder::new().forward(request, addr).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert!(!response.headers().contains_key("x-drop"));
        let body = axum::body::to_bytes(response.into_body(), 1 << 16)
            .await
            .unwrap();
        let head = String::from_utf8_lossy(&body).to_lowercase();
        assert!(head.starts_with("get /some/path?x=1 http/1.1"), "{head}");
        assert!(head.contains("host: front.example"), "{head}");
        assert!(head.contains("x-app: yes"), "{head}");
        assert!(!head.contains("te: trailers"), "{head}");
    }

    #[tokio::test]
    async fn a_closed_port_is_a_connect_error() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let request = Request::builder().uri("/").body(Body::empty()).unwrap();
        match Forwarder::new().forward(request, addr).await {
            Err(ForwardError::Connect { addr: a, .. }) => assert_eq!(a, addr),
            other => panic!("expected a connect error, got {other:?}"),
        }
    }
}
