//! Repository tests. Every test runs twice, against SQLite (a temporary file) and against
//! PostgreSQL (a fresh database on the test kit's throwaway cluster): see `db_test!`.

// Fixtures outside `#[test]` functions unwrap too: a failed set-up should fail the test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[macro_use]
mod common;

mod api_keys;
mod audit;
mod browser_sessions;
mod engine;
mod host_credentials;
mod hosts;
mod metrics;
mod sandboxes;
mod teams;
mod templates;
mod users;
