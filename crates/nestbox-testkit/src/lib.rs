//! Test support shared across the workspace.
//!
//! - [`PgCluster`]: a throwaway PostgreSQL server started from the system's binaries, one per
//!   test process, with a fresh database per test ([`PgCluster::fresh_database`]).
//! - [`temp_sqlite_url`]: a SQLite database file in a temporary directory.
//! - [`simagent::SimAgent`]: a simulated host agent (the real gRPC contract, in memory, with
//!   failure injection and calls held in flight) that registers with a control plane like a
//!   real agent.
//! - [`wait_for`]: poll a condition until it holds or a deadline passes (tests never sleep a
//!   fixed time).

mod pg;
pub mod simagent;
mod wait;

pub use pg::{PgCluster, PgError};
pub use simagent::{
    SIM_CPU_PCT, SIM_DISK_BYTES, SIM_METRIC_POINTS, SimAgent, SimAgentConfig, SimHold, SimOp,
    SimState, TemplateCall,
};
pub use wait::{Ready, WaitTimedOut, wait_for};

/// A SQLite database in its own temporary directory, removed on drop.
#[derive(Debug)]
pub struct TempSqlite {
    dir: tempfile::TempDir,
    url: String,
}

impl TempSqlite {
    /// The `sqlite://…` URL of the database (the file is created on first connect).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The directory holding the database file (and its WAL files).
    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }
}

/// A fresh SQLite URL in a new temporary directory. Keep the returned value alive while the
/// database is in use: dropping it deletes the directory.
pub fn temp_sqlite_url() -> std::io::Result<TempSqlite> {
    let dir = tempfile::Builder::new()
        .prefix("nestbox-sqlite-")
        .tempdir()?;
    let url = format!("sqlite://{}", dir.path().join("nestbox.db").display());
    Ok(TempSqlite { dir, url })
}
