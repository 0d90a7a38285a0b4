//! Small enums stored as text that `nestbox-types` does not (yet) define.
//!
//! Each has a stable lower-case spelling, used in the database `CHECK` constraints and on the
//! wire. They are here rather than in `nestbox-types` only because this crate needed them first.

use std::fmt;
use std::str::FromStr;

/// A stored text value that is not one of an enum's spellings.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {kind} `{value}`")]
pub struct UnknownValue {
    /// What was parsed, e.g. `user status`.
    pub kind: &'static str,
    /// The rejected value.
    pub value: String,
}

macro_rules! text_enum {
    ($(#[$meta:meta])* $name:ident, $kind:literal, { $($(#[$vmeta:meta])* $variant:ident => $wire:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name {
            $($(#[$vmeta])* $variant),+
        }

        impl $name {
            /// Every value, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The stable spelling.
            pub const fn as_str(&self) -> &'static str {
                match self { $($name::$variant => $wire),+ }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl FromStr for $name {
            type Err = UnknownValue;

            fn from_str(s: &str) -> Result<Self, Self::Err> {
                match s {
                    $($wire => Ok($name::$variant),)+
                    other => Err(UnknownValue { kind: $kind, value: other.chars().take(64).collect() }),
                }
            }
        }
    };
}

text_enum!(
    /// Whether a user may sign in.
    UserStatus, "user status", {
        /// May sign in.
        Active => "active",
        /// Blocked by an admin; existing sessions must be refused.
        Disabled => "disabled",
    }
);

text_enum!(
    /// Who runs a host.
    HostKind, "host kind", {
        /// Run by the platform; serves every team.
        Regular => "regular",
        /// Brought by one team ("bring your own compute"); serves only that team.
        Byoc => "byoc",
    }
);

text_enum!(
    /// Who did something recorded in the audit log.
    ActorType, "actor type", {
        /// A signed-in user (`actor_id` = `usr-…`).
        User => "user",
        /// A team API key (`actor_id` = `key-…`).
        ApiKey => "api_key",
        /// A host agent (`actor_id` = `host-…`).
        Host => "host",
        /// The control plane itself (background jobs).
        System => "system",
    }
);

text_enum!(
    /// Outcome of an audited action.
    AuditStatus, "audit status", {
        /// The action took effect.
        Success => "success",
        /// The action was attempted and failed.
        Failure => "failure",
    }
);

text_enum!(
    /// Retention tier of a sandbox metric point: 10 min at 500 ms, 2 h at 30 s, 24 h at 5 min.
    MetricTier, "metric tier", {
        /// Last 10 minutes, 500 ms samples.
        TenMinutes => "10m",
        /// Last 2 hours, 30 s averages.
        TwoHours => "2h",
        /// Last 24 hours, 5 min averages.
        Day => "24h",
    }
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        for v in UserStatus::ALL {
            assert_eq!(v.as_str().parse::<UserStatus>().unwrap(), *v);
        }
        for v in HostKind::ALL {
            assert_eq!(v.as_str().parse::<HostKind>().unwrap(), *v);
        }
        for v in ActorType::ALL {
            assert_eq!(v.as_str().parse::<ActorType>().unwrap(), *v);
        }
        for v in AuditStatus::ALL {
            assert_eq!(v.as_str().parse::<AuditStatus>().unwrap(), *v);
        }
        for v in MetricTier::ALL {
            assert_eq!(v.as_str().parse::<MetricTier>().unwrap(), *v);
        }
        assert!("bogus".parse::<HostKind>().is_err());
    }
}
