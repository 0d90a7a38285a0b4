//! The one error type of the data layer.
//!
//! Constraint violations are classified here, once, for both engines, so callers never look
//! at engine-specific error codes or messages: a unique violation is [`DbError::Conflict`], a
//! missing referenced row is [`DbError::MissingReference`]. The `table` they carry is the same
//! on both engines; `constraint` is informative only (PostgreSQL reports the constraint name,
//! SQLite the column list).

use sqlx::error::{DatabaseError, ErrorKind};

/// What went wrong talking to the database.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// No row with that id (or not visible to the caller's team).
    #[error("{entity} `{id}` not found")]
    NotFound {
        /// Kind of row, e.g. `sandbox`.
        entity: &'static str,
        /// The id or name that was looked up.
        id: String,
    },
    /// A unique constraint (or primary key) rejected the write.
    #[error("{table}: a row with the same key already exists ({constraint})")]
    Conflict {
        /// The table written to, e.g. `users`.
        table: String,
        /// Constraint name (PostgreSQL) or column list (SQLite).
        constraint: String,
    },
    /// A foreign key points at a row that does not exist.
    #[error("{table}: a referenced row does not exist ({constraint})")]
    MissingReference {
        /// The table written to.
        table: String,
        /// Constraint name (PostgreSQL) or message (SQLite).
        constraint: String,
    },
    /// A pagination cursor that this crate did not produce (or from an incompatible version).
    #[error("invalid pagination cursor")]
    InvalidCursor,
    /// The database URL is neither `sqlite:` nor `postgres://`/`postgresql://`.
    #[error("unsupported database url scheme `{scheme}`; expected sqlite: or postgres://")]
    UnsupportedUrl {
        /// The scheme part of the rejected URL (never the credentials).
        scheme: String,
    },
    /// Applying the embedded migrations failed.
    #[error("database migration failed")]
    Migration(#[source] sqlx::migrate::MigrateError),
    /// A stored value cannot be mapped to the domain type (e.g. an unknown status).
    #[error("column `{column}` holds an unexpected value `{value}`")]
    Corrupt {
        /// The column read.
        column: &'static str,
        /// The offending value (truncated).
        value: String,
    },
    /// A write would take a team past one of its quotas.
    #[error(
        "the team's quota of {limit} {resource} would be exceeded ({used} in use, {requested} more asked)"
    )]
    QuotaExceeded {
        /// What is limited, e.g. `running sandboxes`.
        resource: &'static str,
        /// The limit.
        limit: u32,
        /// The team's usage now.
        used: u64,
        /// What the write would add.
        requested: u64,
    },
    /// Any other database failure (connection, I/O, SQL error, decoding).
    #[error("database error")]
    Database(#[source] sqlx::Error),
}

impl DbError {
    /// Whether this is [`DbError::NotFound`].
    pub fn is_not_found(&self) -> bool {
        matches!(self, DbError::NotFound { .. })
    }

    /// Whether this is [`DbError::Conflict`].
    pub fn is_conflict(&self) -> bool {
        matches!(self, DbError::Conflict { .. })
    }

    pub(crate) fn not_found(entity: &'static str, id: impl ToString) -> Self {
        DbError::NotFound {
            entity,
            id: id.to_string(),
        }
    }

    pub(crate) fn corrupt(column: &'static str, value: impl AsRef<str>) -> Self {
        DbError::Corrupt {
            column,
            value: value.as_ref().chars().take(80).collect(),
        }
    }
}

impl From<sqlx::Error> for DbError {
    fn from(err: sqlx::Error) -> Self {
        let sqlx::Error::Database(db_err) = &err else {
            return DbError::Database(err);
        };
        match db_err.kind() {
            ErrorKind::UniqueViolation => {
                let (table, constraint) = locate(db_err.as_ref(), "UNIQUE constraint failed: ");
                DbError::Conflict { table, constraint }
            }
            ErrorKind::ForeignKeyViolation => {
                let (table, constraint) = locate(db_err.as_ref(), "");
                DbError::MissingReference { table, constraint }
            }
            _ => DbError::Database(err),
        }
    }
}

/// `Ok` when a statement touched a row, else [`DbError::NotFound`].
pub(crate) fn found(rows: u64, entity: &'static str, id: impl ToString) -> Result<(), DbError> {
    if rows == 0 {
        Err(DbError::not_found(entity, id))
    } else {
        Ok(())
    }
}

/// Turns a foreign-key violation into "the referenced `entity` was not found".
pub(crate) fn missing_as_not_found(
    err: DbError,
    entity: &'static str,
    id: impl ToString,
) -> DbError {
    match err {
        DbError::MissingReference { .. } => DbError::not_found(entity, id),
        other => other,
    }
}

/// Table and constraint of a constraint violation. PostgreSQL reports both; SQLite only says
/// `UNIQUE constraint failed: users.email` (or `FOREIGN KEY constraint failed`, without a
/// table), so the table is parsed from the column list when it is there.
fn locate(err: &dyn DatabaseError, sqlite_prefix: &str) -> (String, String) {
    if let (Some(table), Some(constraint)) = (err.table(), err.constraint()) {
        return (table.to_owned(), constraint.to_owned());
    }
    let message = err.message();
    match message
        .strip_prefix(sqlite_prefix)
        .filter(|_| !sqlite_prefix.is_empty())
    {
        Some(columns) => {
            let table = columns
                .split(',')
                .next()
                .and_then(|first| first.trim().split_once('.'))
                .map(|(table, _)| table.to_owned())
                .unwrap_or_default();
            (table, columns.to_owned())
        }
        None => (
            err.table().unwrap_or_default().to_owned(),
            message.to_owned(),
        ),
    }
}
