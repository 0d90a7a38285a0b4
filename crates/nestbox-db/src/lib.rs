//! Nestbox's data access: schema, migrations and repositories, for SQLite and PostgreSQL.
//!
//! - [`Db`] is the handle: `Db::connect("sqlite://nestbox.db")` (one box) or
//!   `Db::connect("postgres://…")` (a fleet). Connecting applies the embedded migrations: one
//!   consolidated initial migration per engine (`migrations/{sqlite,postgres}/0001_init.sql`).
//! - One module per table group ([`users`], [`teams`], [`api_keys`], [`browser_sessions`], [`hosts`], [`templates`], [`tags`], [`builds`],
//!   [`sandboxes`], [`audit`], [`metrics`], [`quotas`]) with free functions taking `&Db`, typed inputs and outputs
//!   (`nestbox-types` ids and statuses). Every query is written once, in portable SQL; the
//!   engine dispatch lives in one place (`engine`).
//! - Repositories record and read; business rules (who may do what, which transitions are
//!   legal) belong to the control plane's service layer. The schema still enforces what must
//!   never be violated: unique emails, unique template names per team, one owner and one
//!   default team, one-time registration tokens.
//! - Lists that can grow without bound are keyset-paginated the same way ([`Page`],
//!   [`Paged`]); small lists (members, keys, hosts, templates) are returned whole.
//! - [`Db::try_lock_leader`] elects one replica per background job (PostgreSQL advisory lock;
//!   in-process on SQLite).
//! - Errors are one enum, [`DbError`], with constraint violations classified for both engines.

pub mod api_keys;
pub mod audit;
pub mod browser_sessions;
pub mod builds;
mod engine;
pub mod error;
pub mod host_credentials;
pub mod hosts;
mod leader;
pub mod metrics;
pub mod model;
mod page;
pub mod quotas;
pub mod sandboxes;
pub mod tags;
pub mod teams;
pub mod templates;
pub mod users;

pub use engine::{Db, DbOptions, Engine, now};
pub use error::DbError;
pub use leader::LeaderLock;
pub use model::{ActorType, AuditStatus, HostKind, MetricTier, UserStatus};
pub use page::{DEFAULT_PAGE_LIMIT, MAX_PAGE_LIMIT, Page, Paged};
