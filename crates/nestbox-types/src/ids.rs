//! Typed identifiers.
//!
//! Inside Nestbox every id is a [`uuid::Uuid`] wrapped in a newtype per resource, so a
//! `TeamId` can never be passed where a `SandboxId` is expected. On the wire (REST, CLI,
//! gRPC) an id carries a type prefix: `sb-6f0c…`. Conversion happens only at the edges, via
//! [`std::fmt::Display`] and [`std::str::FromStr`]; serde uses the prefixed form.
//!
//! Invariant: `Display` followed by `FromStr` is the identity, and `FromStr` rejects a
//! string with another resource's prefix.

use std::fmt;
use std::str::FromStr;

use uuid::Uuid;

/// Why a prefixed id string could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdParseError {
    /// The string does not start with the prefix of the expected resource.
    #[error("expected an id starting with `{expected}`, got `{got}`")]
    WrongPrefix {
        /// The prefix the resource uses, e.g. `sb-`.
        expected: &'static str,
        /// The rejected input (truncated).
        got: String,
    },
    /// The part after the prefix is not a UUID.
    #[error("`{got}` is not a valid {kind} id")]
    BadUuid {
        /// Resource name, e.g. `sandbox`.
        kind: &'static str,
        /// The rejected input (truncated).
        got: String,
    },
}

fn truncate(s: &str) -> String {
    s.chars().take(80).collect()
}

macro_rules! typed_id {
    ($(#[$meta:meta])* $name:ident, $prefix:literal, $kind:literal) => {
        $(#[$meta])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(Uuid);

        impl $name {
            /// The prefix this id carries on the wire.
            pub const PREFIX: &'static str = $prefix;

            /// A fresh random id.
            pub fn new() -> Self {
                Self(Uuid::new_v4())
            }

            /// Wraps an existing UUID (e.g. read from the database).
            pub const fn from_uuid(uuid: Uuid) -> Self {
                Self(uuid)
            }

            /// The bare UUID, for storage.
            pub const fn uuid(&self) -> Uuid {
                self.0
            }

            /// First 8 hex digits of the UUID: short, for host-side names and logs.
            pub fn short(&self) -> String {
                self.0.simple().to_string()[..8].to_string()
            }
        }

        impl Default for $name {
            fn default() -> Self {
                Self::new()
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}{}", $prefix, self.0.hyphenated())
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(self, f)
            }
        }

        impl FromStr for $name {
            type Err = IdParseError;

            fn from_str(s: &str) -> Result<Self, Self::Err> {
                let rest = s.strip_prefix($prefix).ok_or_else(|| IdParseError::WrongPrefix {
                    expected: $prefix,
                    got: truncate(s),
                })?;
                // The hyphenated form only, as ids are written (and as the schema says).
                if rest.len() != 36 {
                    return Err(IdParseError::BadUuid { kind: $kind, got: truncate(s) });
                }
                Uuid::try_parse(rest)
                    .map(Self)
                    .map_err(|_| IdParseError::BadUuid { kind: $kind, got: truncate(s) })
            }
        }

        impl From<Uuid> for $name {
            fn from(uuid: Uuid) -> Self {
                Self(uuid)
            }
        }

        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.collect_str(self)
            }
        }

        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                let s = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }

        #[cfg(feature = "openapi")]
        impl utoipa::PartialSchema for $name {
            fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
                utoipa::openapi::ObjectBuilder::new()
                    .schema_type(utoipa::openapi::schema::Type::String)
                    .description(Some(concat!("A ", $kind, " id: `", $prefix, "` followed by a UUID.")))
                    .pattern(Some(concat!(
                        "^", $prefix,
                        "[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"
                    )))
                    .examples([serde_json::json!(concat!($prefix, "6f0c8a62-4f0e-4a2b-9d7e-1c2b3a4d5e6f"))])
                    .into()
            }
        }

        #[cfg(feature = "openapi")]
        impl utoipa::ToSchema for $name {}
    };
}

typed_id!(
    /// A sandbox (`sb-`).
    SandboxId, "sb-", "sandbox"
);
typed_id!(
    /// A user account (`usr-`).
    UserId, "usr-", "user"
);
typed_id!(
    /// A team (`team-`). The all-zero UUID is the platform team, see [`PLATFORM_TEAM`].
    TeamId, "team-", "team"
);
typed_id!(
    /// A team API key (`key-`).
    ApiKeyId, "key-", "API key"
);
typed_id!(
    /// A host running the host agent (`host-`).
    HostId, "host-", "host"
);
typed_id!(
    /// A template (`tpl-`).
    TemplateId, "tpl-", "template"
);
typed_id!(
    /// A template build (`bld-`).
    BuildId, "bld-", "template build"
);
typed_id!(
    /// An audit log entry (`log-`).
    AuditLogId, "log-", "audit log entry"
);

/// The platform team: owner of the built-in templates, which every team can see and only
/// platform admins can change.
pub const PLATFORM_TEAM: TeamId = TeamId::from_uuid(Uuid::nil());

impl TeamId {
    /// Whether this is the platform team.
    pub fn is_platform(&self) -> bool {
        *self == PLATFORM_TEAM
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_parse_round_trip() {
        let id = SandboxId::new();
        let s = id.to_string();
        assert!(s.starts_with("sb-"));
        assert_eq!(s.parse::<SandboxId>().unwrap(), id);
    }

    #[test]
    fn wrong_prefix_is_rejected() {
        let team = TeamId::new().to_string();
        let err = team.parse::<SandboxId>().unwrap_err();
        assert!(matches!(
            err,
            IdParseError::WrongPrefix {
                expected: "sb-",
                ..
            }
        ));
    }

    #[test]
    fn bad_uuid_is_rejected() {
        let err = "sb-not-a-uuid".parse::<SandboxId>().unwrap_err();
        assert!(matches!(
            err,
            IdParseError::BadUuid {
                kind: "sandbox",
                ..
            }
        ));
        assert!("sb-".parse::<SandboxId>().is_err());
        assert!("".parse::<SandboxId>().is_err());
    }

    #[test]
    fn serde_uses_prefixed_form() {
        let id = UserId::new();
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(json, format!("\"{id}\""));
        let back: UserId = serde_json::from_str(&json).unwrap();
        assert_eq!(back, id);
        assert!(
            serde_json::from_str::<UserId>("\"team-00000000-0000-0000-0000-000000000000\"")
                .is_err()
        );
    }

    #[test]
    fn platform_team_is_nil() {
        assert!(PLATFORM_TEAM.is_platform());
        assert_eq!(
            PLATFORM_TEAM.to_string(),
            "team-00000000-0000-0000-0000-000000000000"
        );
        assert!(!TeamId::new().is_platform());
    }
}
