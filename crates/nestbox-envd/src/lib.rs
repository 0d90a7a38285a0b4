//! The envd wire contract: what E2B's in-VM agent speaks, so E2B's SDKs work against Nestbox.
//!
//! This crate owns the contract and nothing that runs it:
//!
//! - [`process`] and [`filesystem`]: messages generated from `proto/envd` (wire-identical to
//!   E2B's), with proto3-canonical JSON (camelCase names, enums as strings, bytes as base64,
//!   timestamps as RFC 3339) for Connect's JSON encoding;
//! - [`connect`]: the Connect protocol (unary and streaming, proto and JSON, envelopes,
//!   errors, deadlines) as building blocks for an HTTP server and client;
//! - [`types`]: the plain-HTTP endpoints' JSON (`/init`, `/metrics`, `/files`);
//! - [`client`] (feature `client`): the typed client the host agent drives a guest with.
//!
//! The guest agent depends on this crate without the `client` feature, which keeps reqwest
//! and rustls out of the static guest binary.

pub mod auth;
pub mod connect;
pub mod types;
pub mod wkt;

#[cfg(feature = "client")]
pub mod client;

/// Generated messages of the `process.Process` service.
#[allow(missing_docs, clippy::all, clippy::pedantic, clippy::unwrap_used)]
pub mod process {
    include!(concat!(env!("OUT_DIR"), "/process.rs"));
    include!(concat!(env!("OUT_DIR"), "/process.serde.rs"));
}

/// Generated messages of the `filesystem.Filesystem` service.
#[allow(missing_docs, clippy::all, clippy::pedantic, clippy::unwrap_used)]
pub mod filesystem {
    include!(concat!(env!("OUT_DIR"), "/filesystem.rs"));
    include!(concat!(env!("OUT_DIR"), "/filesystem.serde.rs"));
}

pub use prost;

/// The fully-qualified service names, as they appear in request paths
/// (`/process.Process/Start`).
pub mod services {
    /// `process.Process`.
    pub const PROCESS: &str = "process.Process";
    /// `filesystem.Filesystem`.
    pub const FILESYSTEM: &str = "filesystem.Filesystem";
}

/// Header names of the envd HTTP API (lower case, as HTTP/2 sends them).
pub mod headers {
    /// The per-sandbox access token set by `/init`.
    pub const ACCESS_TOKEN: &str = "x-access-token";
    /// The guest agent's version, on `GET /health` responses.
    pub const GUEST_VERSION: &str = "nestbox-guest-version";
    /// Seconds between keep-alive events on idle streams, sent by E2B's SDKs.
    pub const KEEPALIVE_PING_INTERVAL: &str = "keepalive-ping-interval";
}

impl process::ProcessSelector {
    /// Selects a process by pid.
    pub fn pid(pid: u32) -> Self {
        Self {
            selector: Some(process::process_selector::Selector::Pid(pid)),
        }
    }

    /// Selects a process by its tag.
    pub fn tag(tag: impl Into<String>) -> Self {
        Self {
            selector: Some(process::process_selector::Selector::Tag(tag.into())),
        }
    }
}
