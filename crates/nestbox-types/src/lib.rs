//! The vocabulary every Nestbox crate shares.
//!
//! This crate owns the *wire format* of identifiers (`sb-{uuid}`, `team-{uuid}`, …), the
//! lifecycle statuses of sandboxes and hosts, the stable error codes clients branch on, and
//! human-readable sizes. It performs no I/O and depends on nothing heavier than `serde`, so
//! the guest agent, the host agent and the control plane can all use it.

pub mod api;
pub mod e2b;
pub mod egress;
pub mod error;
pub mod ids;
pub mod limits;
#[cfg(feature = "openapi")]
pub mod schemas;
mod serde_util;
pub mod size;
pub mod status;

pub use error::{ErrorBody, ErrorCode, ErrorDetail};
pub use ids::{
    ApiKeyId, AuditLogId, BuildId, HostId, IdParseError, PLATFORM_TEAM, SandboxId, TeamId,
    TemplateId, UserId,
};
pub use size::{ByteSize, SizeParseError};
pub use status::{
    BuildStatus, Expiry, HostStatus, SandboxStatus, StatusParseError, TeamRole, TemplateKind,
};
