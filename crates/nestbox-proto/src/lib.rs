//! The host agent's gRPC contract.
//!
//! Generated from `proto/hostagent/v1/hostagent.proto`. This crate also owns the one
//! mapping between Nestbox [`ErrorCode`]s and gRPC statuses: the code travels in the
//! `x-nestbox-code` metadata entry so that nothing ever parses a message.

use nestbox_types::ErrorCode;

pub mod auth;

/// The HTTP side of the agent's listener: requests for a port inside a sandbox.
///
/// The control plane sends them to the agent's address (the one gRPC uses) with the same
/// token as gRPC calls, in [`proxy::AUTH_HEADER`] (so the caller's own `Authorization`
/// reaches the sandbox untouched), plus the two target headers; the agent forwards the
/// request, without any of the three, to the port inside the sandbox.
pub mod proxy {
    /// `Bearer <control-plane token for this host>`.
    pub const AUTH_HEADER: &str = "x-nestbox-proxy-authorization";
    /// The sandbox (`sb-…`) a proxied request is for.
    pub const SANDBOX_HEADER: &str = "x-nestbox-proxy-sandbox";
    /// The TCP port inside the sandbox.
    pub const PORT_HEADER: &str = "x-nestbox-proxy-port";
}

/// Generated types and services of `nestbox.hostagent.v1`.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod hostagent {
    tonic::include_proto!("nestbox.hostagent.v1");
}

/// Metadata key carrying the stable Nestbox error code of a failed call.
pub const CODE_METADATA_KEY: &str = "x-nestbox-code";

/// Builds a gRPC status for a Nestbox error.
pub fn status(code: ErrorCode, message: impl Into<String>) -> tonic::Status {
    let grpc = match code {
        ErrorCode::InvalidRequest | ErrorCode::LimitExceeded => tonic::Code::InvalidArgument,
        ErrorCode::Unauthorized => tonic::Code::Unauthenticated,
        ErrorCode::Forbidden => tonic::Code::PermissionDenied,
        ErrorCode::NotFound
        | ErrorCode::SandboxNotFound
        | ErrorCode::TemplateNotFound
        | ErrorCode::TeamNotFound
        | ErrorCode::UserNotFound
        | ErrorCode::HostNotFound
        | ErrorCode::FileNotFound
        | ErrorCode::ProcessNotFound
        | ErrorCode::BuildNotFound => tonic::Code::NotFound,
        ErrorCode::Conflict | ErrorCode::SandboxNotRunning => tonic::Code::FailedPrecondition,
        ErrorCode::AlreadyExists => tonic::Code::AlreadyExists,
        ErrorCode::PayloadTooLarge | ErrorCode::InsufficientStorage => {
            tonic::Code::ResourceExhausted
        }
        ErrorCode::RateLimited
        | ErrorCode::QuotaExceeded
        | ErrorCode::NoCapacity
        | ErrorCode::Busy => tonic::Code::ResourceExhausted,
        ErrorCode::Internal => tonic::Code::Internal,
        ErrorCode::NotImplemented => tonic::Code::Unimplemented,
        ErrorCode::AgentError | ErrorCode::HostUnavailable | ErrorCode::PortUnreachable => {
            tonic::Code::Unavailable
        }
        ErrorCode::Timeout => tonic::Code::DeadlineExceeded,
    };
    let mut status = tonic::Status::new(grpc, message);
    if let Ok(value) = code.as_str().parse() {
        status.metadata_mut().insert(CODE_METADATA_KEY, value);
    }
    status
}

/// Recovers the Nestbox error code of a status: from its metadata when the agent set one,
/// otherwise from the gRPC code (transport failures, deadline, …).
pub fn error_code(status: &tonic::Status) -> ErrorCode {
    if let Some(code) = status
        .metadata()
        .get(CODE_METADATA_KEY)
        .and_then(|v| v.to_str().ok())
        .and_then(ErrorCode::from_wire)
    {
        return code;
    }
    match status.code() {
        tonic::Code::InvalidArgument => ErrorCode::InvalidRequest,
        tonic::Code::NotFound => ErrorCode::NotFound,
        tonic::Code::AlreadyExists => ErrorCode::AlreadyExists,
        tonic::Code::FailedPrecondition => ErrorCode::Conflict,
        tonic::Code::PermissionDenied => ErrorCode::Forbidden,
        tonic::Code::Unauthenticated => ErrorCode::Unauthorized,
        tonic::Code::ResourceExhausted => ErrorCode::Busy,
        tonic::Code::DeadlineExceeded => ErrorCode::Timeout,
        tonic::Code::Unimplemented => ErrorCode::NotImplemented,
        tonic::Code::Unavailable => ErrorCode::HostUnavailable,
        _ => ErrorCode::AgentError,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_survives_a_status() {
        for code in ErrorCode::ALL {
            let st = status(*code, "x");
            assert_eq!(error_code(&st), *code);
        }
    }

    #[test]
    fn bare_statuses_map_sensibly() {
        assert_eq!(
            error_code(&tonic::Status::unavailable("down")),
            ErrorCode::HostUnavailable
        );
        assert_eq!(
            error_code(&tonic::Status::not_found("x")),
            ErrorCode::NotFound
        );
    }
}
