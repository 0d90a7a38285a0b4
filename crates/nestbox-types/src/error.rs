//! Stable error codes and the JSON error shape.
//!
//! Every error a client can see carries one [`ErrorCode`]. Clients branch on the code, never
//! on the message. The code fixes the HTTP status (one mapping, here) and the gRPC status
//! (mapped once in `nestbox-proto`). Adding a code is fine; renaming or removing one is a
//! breaking change of the public API.

use std::fmt;

macro_rules! error_codes {
    ($($(#[$meta:meta])* $variant:ident => ($wire:literal, $status:literal, $retry:literal)),+ $(,)?) => {
        /// A stable, machine-readable error code.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
        #[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
        #[serde(rename_all = "snake_case")]
        pub enum ErrorCode {
            $($(#[$meta])* $variant),+
        }

        impl ErrorCode {
            /// Every code, for documentation and exhaustive tests.
            pub const ALL: &'static [ErrorCode] = &[$(ErrorCode::$variant),+];

            /// The stable wire spelling.
            pub const fn as_str(&self) -> &'static str {
                match self { $(ErrorCode::$variant => $wire),+ }
            }

            /// The HTTP status this code is sent with.
            pub const fn http_status(&self) -> u16 {
                match self { $(ErrorCode::$variant => $status),+ }
            }

            /// Whether the same request may succeed if retried later unchanged.
            pub const fn retryable(&self) -> bool {
                match self { $(ErrorCode::$variant => $retry),+ }
            }

            /// Parses the wire spelling.
            pub fn from_wire(s: &str) -> Option<Self> {
                match s { $($wire => Some(ErrorCode::$variant),)+ _ => None }
            }
        }
    };
}

error_codes! {
    /// The request is malformed or a field is invalid.
    InvalidRequest => ("invalid_request", 400, false),
    /// A requested amount exceeds a configured limit; the message names the limit.
    LimitExceeded => ("limit_exceeded", 400, false),
    /// No credentials, or credentials that are invalid or expired.
    Unauthorized => ("unauthorized", 401, false),
    /// Authenticated, but not allowed to do this.
    Forbidden => ("forbidden", 403, false),
    /// The resource does not exist, or belongs to another team.
    NotFound => ("not_found", 404, false),
    /// The sandbox does not exist, or belongs to another team.
    SandboxNotFound => ("sandbox_not_found", 404, false),
    /// No template of that name is visible to the team.
    TemplateNotFound => ("template_not_found", 404, false),
    /// The team does not exist or the caller is not a member.
    TeamNotFound => ("team_not_found", 404, false),
    /// No such user.
    UserNotFound => ("user_not_found", 404, false),
    /// No such host.
    HostNotFound => ("host_not_found", 404, false),
    /// No such file or directory inside the sandbox.
    FileNotFound => ("file_not_found", 404, false),
    /// No process with that pid or tag runs inside the sandbox.
    ProcessNotFound => ("process_not_found", 404, false),
    /// No template build with that id belongs to the team.
    BuildNotFound => ("build_not_found", 404, false),
    /// The resource is not in a state that allows the operation.
    Conflict => ("conflict", 409, false),
    /// The sandbox exists but is not running.
    SandboxNotRunning => ("sandbox_not_running", 409, false),
    /// A resource with that name already exists.
    AlreadyExists => ("already_exists", 409, false),
    /// The request body is larger than allowed.
    PayloadTooLarge => ("payload_too_large", 413, false),
    /// Too many requests; slow down.
    RateLimited => ("rate_limited", 429, true),
    /// The request would take the team past one of its quotas; the message names it
    /// (free some, or ask a platform admin to raise it).
    QuotaExceeded => ("quota_exceeded", 429, false),
    /// An unexpected failure; the message carries a request id for the logs.
    Internal => ("internal", 500, false),
    /// The operation is not implemented by this runtime or host.
    NotImplemented => ("not_implemented", 501, false),
    /// The host agent or guest agent failed.
    AgentError => ("agent_error", 502, true),
    /// Nothing accepts connections on that port inside the sandbox.
    PortUnreachable => ("port_unreachable", 502, true),
    /// No host has room for this sandbox right now.
    NoCapacity => ("no_capacity", 503, true),
    /// The sandbox's host cannot be reached.
    HostUnavailable => ("host_unavailable", 503, true),
    /// The component is busy; retry shortly.
    Busy => ("busy", 503, true),
    /// The operation did not finish in time.
    Timeout => ("timeout", 504, true),
    /// The sandbox's disk is full.
    InsufficientStorage => ("insufficient_storage", 507, false),
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The body of every error response: `{"error": {"code": …, "message": …}}`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

/// What went wrong.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ErrorDetail {
    /// Stable code to branch on.
    pub code: ErrorCode,
    /// Human-readable explanation. Not stable.
    pub message: String,
    /// Whether retrying the same request later may succeed.
    #[serde(default)]
    pub retryable: bool,
    /// Identifies the request in the server's logs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    /// The sandboxes the refused request would affect (deleting a host that holds them:
    /// `?force=true` destroys them).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sandbox_ids: Vec<crate::SandboxId>,
}

impl ErrorBody {
    /// A body for `code` with `message`.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            error: ErrorDetail {
                code,
                message: message.into(),
                retryable: code.retryable(),
                request_id: None,
                sandbox_ids: Vec::new(),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip_and_are_unique() {
        let mut seen = std::collections::HashSet::new();
        for c in ErrorCode::ALL {
            assert!(seen.insert(c.as_str()), "duplicate code {c}");
            assert_eq!(ErrorCode::from_wire(c.as_str()), Some(*c));
            let json = serde_json::to_string(c).unwrap();
            assert_eq!(json, format!("\"{}\"", c.as_str()));
            assert!((400..600).contains(&c.http_status()));
        }
    }

    #[test]
    fn body_shape() {
        let body = ErrorBody::new(ErrorCode::NoCapacity, "no host has room");
        let v: serde_json::Value = serde_json::to_value(&body).unwrap();
        assert_eq!(v["error"]["code"], "no_capacity");
        assert_eq!(v["error"]["retryable"], true);
        assert!(v["error"].get("request_id").is_none());
    }
}
