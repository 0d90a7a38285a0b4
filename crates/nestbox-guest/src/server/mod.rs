//! The guest agent server: E2B's envd wire protocol on TCP port 49983.
//!
//! `nestbox-guest serve [--listen 0.0.0.0:49983] [--access-token-sha256 HEX]
//! [--default-user NAME] [--manage-system]`
//!
//! One listener serves HTTP/1.1 and h2c (prior knowledge) on the same port, `TCP_NODELAY`
//! on every connection, on a small tokio runtime (VMs often have one vCPU). Modules:
//!
//! - [`http`] — routing, the access-token gate, the plain endpoints;
//! - [`state`] — token, defaults from `/init`, shared tables;
//! - [`process`] — `process.Process` (processes, their output fan-out, PTYs);
//! - [`filesystem`] — `filesystem.Filesystem`, with directory watches in [`watch`];
//! - [`files`] — streamed downloads and uploads;
//! - [`users`], [`paths`], [`metrics`], [`system`], [`rpc`], [`args`] — helpers.
//!
//! When bound it prints `listening on <addr>` on stdout (tests start it on port 0 and read
//! the port from there).

mod args;
mod files;
mod filesystem;
mod http;
mod metadata;
mod metrics;
mod paths;
mod process;
mod rpc;
mod state;
mod system;
mod users;
mod watch;

use std::io::Write as _;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

use self::args::{ServeArgs, USAGE};
use self::state::{Config, Server};

/// Why the server stopped.
#[derive(Debug, thiserror::Error)]
enum ServeError {
    #[error("cannot start the async runtime")]
    Runtime(#[source] std::io::Error),
    #[error("cannot listen on {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot install the signal handler")]
    Signal(#[source] std::io::Error),
}

/// Entry point of `nestbox-guest serve`.
pub fn main(args: &[String]) -> ExitCode {
    let args = match ServeArgs::parse(args) {
        Ok(args) => args,
        Err(e) => {
            eprintln!("nestbox-guest serve: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    // One JSON object per line on the console: the host collects them into the sandbox's
    // log with their level and fields.
    let _ = tracing_subscriber::fmt()
        .json()
        .with_current_span(false)
        .with_span_list(false)
        .with_ansi(false)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .try_init();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(32)
        .enable_all()
        .build();
    let result = match runtime {
        Ok(runtime) => runtime.block_on(run(args)),
        Err(e) => Err(ServeError::Runtime(e)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let mut message = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(cause) = source {
                message.push_str(&format!(": {cause}"));
                source = cause.source();
            }
            tracing::error!("{message}");
            eprintln!("nestbox-guest serve: {message}");
            ExitCode::FAILURE
        }
    }
}

/// The default user when none is configured: root when running as root, else whoever
/// runs the server.
fn default_user(configured: Option<String>) -> String {
    if let Some(user) = configured {
        return user;
    }
    let euid = nix::unistd::geteuid();
    if euid.is_root() {
        return "root".into();
    }
    users::UserDb::load()
        .ok()
        .and_then(|db| db.user_by_uid(euid.as_raw()))
        .map_or_else(|| "root".into(), |u| u.name)
}

async fn run(args: ServeArgs) -> Result<(), ServeError> {
    let listener = TcpListener::bind(args.listen)
        .await
        .map_err(|source| ServeError::Bind {
            addr: args.listen,
            source,
        })?;
    let local = listener.local_addr().map_err(|source| ServeError::Bind {
        addr: args.listen,
        source,
    })?;
    let server = Arc::new(Server::new(Config {
        token_sha256: args.access_token_sha256,
        default_user: default_user(args.default_user),
        manage_system: args.manage_system,
    }));
    {
        let mut stdout = std::io::stdout().lock();
        let _ = writeln!(stdout, "listening on {local}");
        let _ = stdout.flush();
    }
    tracing::info!(addr = %local, version = env!("CARGO_PKG_VERSION"), "guest agent listening");

    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(ServeError::Signal)?;
    let mut interrupt = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
        .map_err(ServeError::Signal)?;
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    if let Err(e) = stream.set_nodelay(true) {
                        tracing::debug!(%peer, error = %e, "cannot set TCP_NODELAY");
                    }
                    let server = Arc::clone(&server);
                    tokio::spawn(async move {
                        let service = hyper::service::service_fn(move |request| {
                            http::handle(Arc::clone(&server), request)
                        });
                        if let Err(e) = auto::Builder::new(TokioExecutor::new())
                            .serve_connection(TokioIo::new(stream), service)
                            .await
                        {
                            tracing::debug!(%peer, error = %e, "connection ended with an error");
                        }
                    });
                }
                Err(e) => {
                    // Out of file descriptors, typically: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            _ = terminate.recv() => break,
            _ = interrupt.recv() => break,
        }
    }
    tracing::info!("guest agent stopping");
    Ok(())
}
