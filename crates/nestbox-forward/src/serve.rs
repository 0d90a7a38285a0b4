//! Serving a router over TLS, for the host agent's mutual-TLS listener and the control
//! plane's public HTTPS listener.
//!
//! Each connection gets its own task: a TLS handshake bounded by [`HANDSHAKE_TIMEOUT`]
//! (a client that never finishes it holds nothing for long), then HTTP/1.1 or HTTP/2 as
//! ALPN chose, upgrades included. On shutdown no new connection is accepted and open ones
//! get [`DRAIN_TIMEOUT`] to finish.

use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo};

/// How long a client may take to complete its TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long open connections may take to finish after shutdown.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves `app` over TLS with `tls` until `shutdown` completes.
pub async fn serve_tls(
    listener: tokio::net::TcpListener,
    app: axum::Router,
    tls: Arc<tokio_rustls::rustls::ServerConfig>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (tcp, peer) = match accepted {
                    Ok(pair) => pair,
                    Err(e) => {
                        tracing::debug!(error = %e, "accepting a connection");
                        continue;
                    }
                };
                if let Err(e) = tcp.set_nodelay(true) {
                    tracing::debug!(error = %e, "TCP_NODELAY");
                }
                let (acceptor, app, builder) = (acceptor.clone(), app.clone(), builder.clone());
                let watcher = graceful.watcher();
                tokio::spawn(async move {
                    let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(stream)) => stream,
                        Ok(Err(e)) => {
                            tracing::debug!(%peer, error = %e, "TLS handshake refused");
                            return;
                        }
                        Err(_) => return,
                    };
                    // Handlers see the client's address as with axum's own server.
                    let app = app.layer(axum::Extension(axum::extract::ConnectInfo(peer)));
                    let service = hyper_util::service::TowerToHyperService::new(app);
                    let conn = builder
                        .serve_connection_with_upgrades(TokioIo::new(stream), service)
                        .into_owned();
                    if let Err(e) = watcher.watch(conn).await {
                        tracing::debug!(%peer, error = %e, "connection ended");
                    }
                });
            }
            _ = &mut shutdown => break,
        }
    }
    let _ = tokio::time::timeout(DRAIN_TIMEOUT, graceful.shutdown()).await;
}
