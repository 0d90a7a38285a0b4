//! Lifecycle statuses and roles, with their stable wire spelling.
//!
//! Sandbox lifecycle (see `docs/ARCHITECTURE.md`):
//!
//! ```text
//! pending → starting → running ⇄ paused        running|paused → stopped (destroyed)
//!                         any → error           running|paused → missing (host unreachable;
//!                                                                 reversible when it returns)
//! ```

use std::fmt;
use std::str::FromStr;

/// A status string that is not one of the known values.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {kind} `{value}`; expected one of: {expected}")]
pub struct StatusParseError {
    /// What was being parsed, e.g. `sandbox status`.
    pub kind: &'static str,
    /// The rejected value.
    pub value: String,
    /// The accepted values, comma separated.
    pub expected: &'static str,
}

macro_rules! wire_enum {
    ($(#[$meta:meta])* $name:ident, $kind:literal, { $($(#[$vmeta:meta])* $variant:ident => $wire:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
        #[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
        #[serde(rename_all = "snake_case")]
        pub enum $name {
            $($(#[$vmeta])* $variant),+
        }

        impl $name {
            /// Every value, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The stable wire and database spelling.
            pub const fn as_str(&self) -> &'static str {
                match self {
                    $($name::$variant => $wire),+
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl FromStr for $name {
            type Err = StatusParseError;

            fn from_str(s: &str) -> Result<Self, Self::Err> {
                match s {
                    $($wire => Ok($name::$variant),)+
                    other => Err(StatusParseError {
                        kind: $kind,
                        value: other.chars().take(64).collect(),
                        expected: concat!($($wire, " "),+),
                    }),
                }
            }
        }
    };
}

wire_enum!(
    /// Where a sandbox is in its lifecycle.
    SandboxStatus, "sandbox status", {
        /// Recorded, not yet placed on a host.
        Pending => "pending",
        /// The host agent is booting or restoring its VM.
        Starting => "starting",
        /// The VM runs and its guest agent answers.
        Running => "running",
        /// Memory and disk are saved; no VM runs.
        Paused => "paused",
        /// Destroyed. Terminal.
        Stopped => "stopped",
        /// Creation or an operation failed; see the sandbox's `error` field. Terminal.
        Error => "error",
        /// Its host stopped answering. Reversible when the host returns.
        Missing => "missing",
    }
);

impl SandboxStatus {
    /// Terminal statuses never change again.
    pub const fn is_terminal(&self) -> bool {
        matches!(self, SandboxStatus::Stopped | SandboxStatus::Error)
    }

    /// Statuses in which the sandbox holds resources on a host.
    pub const fn holds_host_resources(&self) -> bool {
        matches!(
            self,
            SandboxStatus::Pending
                | SandboxStatus::Starting
                | SandboxStatus::Running
                | SandboxStatus::Paused
                | SandboxStatus::Missing
        )
    }
}

wire_enum!(
    /// Whether a host can take work.
    HostStatus, "host status", {
        /// Created; waiting for its agent to register with the one-time token.
        Pending => "pending",
        /// Registered and heartbeating.
        Online => "online",
        /// No heartbeat for longer than the configured grace period.
        Unreachable => "unreachable",
    }
);

wire_enum!(
    /// A member's role in a team.
    TeamRole, "team role", {
        /// Created the team; full control. Exactly one per team.
        Owner => "owner",
        /// Manages members and API keys.
        Admin => "admin",
        /// Uses the team's sandboxes and templates.
        Member => "member",
    }
);

impl TeamRole {
    /// Owners and admins manage the team.
    pub const fn can_manage(&self) -> bool {
        matches!(self, TeamRole::Owner | TeamRole::Admin)
    }
}

wire_enum!(
    /// What a template holds.
    TemplateKind, "template kind", {
        /// A root filesystem image: sandboxes boot from it.
        Image => "image",
        /// Memory and disk of a stopped-in-time sandbox: sandboxes restore from it.
        Snapshot => "snapshot",
    }
);

wire_enum!(
    /// What happens to a running sandbox when its lifetime ends (`expires_at`).
    Expiry, "expiry action", {
        /// Destroyed, like a delete (E2B's default: killed).
        Destroy => "destroy",
        /// Paused with its memory and processes (E2B's `autoPause`); a resume starts a new
        /// lifetime.
        Pause => "pause",
    }
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        for s in SandboxStatus::ALL {
            assert_eq!(s.as_str().parse::<SandboxStatus>().unwrap(), *s);
            assert_eq!(serde_json_string(s), format!("\"{}\"", s.as_str()));
        }
        for s in HostStatus::ALL {
            assert_eq!(s.as_str().parse::<HostStatus>().unwrap(), *s);
        }
        for s in TeamRole::ALL {
            assert_eq!(s.as_str().parse::<TeamRole>().unwrap(), *s);
        }
    }

    #[test]
    fn unknown_is_rejected_with_choices() {
        let err = "runnin".parse::<SandboxStatus>().unwrap_err();
        assert!(err.to_string().contains("running"));
    }

    fn serde_json_string(s: &SandboxStatus) -> String {
        serde_json::to_string(s).unwrap()
    }
}

wire_enum!(
    /// Where a template build stands.
    BuildStatus, "build status", {
        /// Announced without its recipe yet (E2B's template SDK announces a build, uploads
        /// its files, then starts it); one never started fails after an hour.
        Waiting => "waiting",
        /// Accepted; its sandbox is being prepared.
        Building => "building",
        /// Every step ran and the template is stored.
        Ready => "ready",
        /// A step failed, the time limit passed or its runner stopped; nothing was stored.
        Failed => "failed",
        /// Cancelled by a user; nothing was stored.
        Cancelled => "cancelled",
    }
);

impl BuildStatus {
    /// Whether the build has ended.
    pub const fn is_final(&self) -> bool {
        !matches!(self, BuildStatus::Building | BuildStatus::Waiting)
    }
}
