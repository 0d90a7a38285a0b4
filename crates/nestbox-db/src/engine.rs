//! The database handle and the engine dispatch.
//!
//! [`Db`] wraps a connection pool of either engine. Repository modules never name an engine:
//! they write each query once, in portable SQL with `$1`, `$2`, … placeholders (sqlx binds
//! `$N` by number in SQLite too, and a number may repeat), collect the arguments as [`Arg`]s
//! and run it through [`Conn`]'s `execute`/`fetch_*` helpers. Those helpers are the only place
//! that matches on the engine: they bind each [`Arg`] with the engine's own encoding and hand
//! the resulting rows back as `&dyn DbRow`, so row-mapping code is engine-independent too.
//!
//! Storage conventions (see the two `0001_init.sql` files):
//! - UUIDs: `uuid` in PostgreSQL, lower-case hyphenated `TEXT` in SQLite ([`DbUuid`]).
//! - Timestamps: `timestamptz` in PostgreSQL; fixed-width RFC 3339 `TEXT` with microseconds and
//!   a `Z` in SQLite ([`DbTime`]), so text order is time order and keyset pagination compares
//!   correctly. All times are truncated to microseconds before they are stored ([`now`]), so both
//!   engines return exactly what was written.
//! - JSON: `jsonb` in PostgreSQL, `TEXT` in SQLite.
//! - Integers: `bigint` in PostgreSQL (so every integer column decodes as `i64` in both).
//!
//! Times are computed in Rust and bound as arguments rather than taken from the database clock,
//! which keeps every statement portable.
//!
//! SQLite write transactions start with `BEGIN IMMEDIATE`: a deferred transaction that reads
//! first and writes later can fail with `SQLITE_BUSY` without waiting for the busy timeout.

use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, NaiveDateTime, SubsecRound, Utc};
use sqlx::encode::IsNull;
use sqlx::error::BoxDynError;
use sqlx::pool::PoolConnection;
use sqlx::postgres::{
    PgArgumentBuffer, PgConnectOptions, PgConnection, PgPool, PgPoolOptions, PgRow, PgTypeInfo,
    PgValueRef,
};
use sqlx::sqlite::{
    SqliteArgumentValue, SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePool,
    SqlitePoolOptions, SqliteRow, SqliteSynchronous, SqliteTypeInfo, SqliteValueRef,
};
use sqlx::types::Json;
use sqlx::{Decode, Encode, Postgres, Row, Sqlite, Transaction, Type};
use uuid::Uuid;

use crate::error::DbError;

static SQLITE_MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("migrations/sqlite");
static POSTGRES_MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("migrations/postgres");

/// The current time, truncated to microseconds (the precision both engines store).
pub fn now() -> DateTime<Utc> {
    Utc::now().trunc_subsecs(6)
}

/// Which database engine a [`Db`] talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    /// Embedded SQLite: one box.
    Sqlite,
    /// PostgreSQL: a fleet.
    Postgres,
}

/// Pool settings. The defaults suit the control plane.
#[derive(Debug, Clone)]
pub struct DbOptions {
    /// Upper bound of pooled connections.
    pub max_connections: u32,
    /// How long to wait for a free connection before failing.
    pub acquire_timeout: Duration,
    /// How long SQLite waits for a competing writer before reporting `SQLITE_BUSY`.
    pub sqlite_busy_timeout: Duration,
}

impl Default for DbOptions {
    fn default() -> Self {
        DbOptions {
            max_connections: 10,
            acquire_timeout: Duration::from_secs(30),
            sqlite_busy_timeout: Duration::from_secs(10),
        }
    }
}

/// A handle to the database: a connection pool of one engine. Cheap to clone.
#[derive(Clone)]
pub struct Db {
    pool: Pool,
    /// Leader locks held in this process (SQLite only; see `leader`).
    locks: LockRegistry,
}

/// Keys of the leader locks held in this process.
pub(crate) type LockRegistry = std::sync::Arc<std::sync::Mutex<std::collections::HashSet<i64>>>;

#[derive(Clone)]
enum Pool {
    Sqlite(SqlitePool),
    Postgres(PgPool),
}

impl std::fmt::Debug for Db {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Db")
            .field("engine", &self.engine())
            .finish_non_exhaustive()
    }
}

impl Db {
    /// Connects to `url` (`sqlite://path`, `sqlite::memory:`, `postgres://…`) with default
    /// options and applies the embedded migrations.
    pub async fn connect(url: &str) -> Result<Db, DbError> {
        Self::connect_with(url, &DbOptions::default()).await
    }

    /// Connects with explicit pool options and applies the embedded migrations.
    ///
    /// SQLite databases are created if missing and opened in WAL mode with foreign keys on.
    pub async fn connect_with(url: &str, options: &DbOptions) -> Result<Db, DbError> {
        let scheme = url.split(':').next().unwrap_or_default();
        let pool = match scheme {
            "sqlite" => Pool::Sqlite(connect_sqlite(url, options).await?),
            "postgres" | "postgresql" => Pool::Postgres(connect_postgres(url, options).await?),
            other => {
                return Err(DbError::UnsupportedUrl {
                    scheme: other.chars().take(32).collect(),
                });
            }
        };
        let db = Db {
            pool,
            locks: crate::leader::new_registry(),
        };
        db.migrate().await?;
        tracing::info!(engine = ?db.engine(), "database ready");
        Ok(db)
    }

    /// The engine behind this handle.
    pub fn engine(&self) -> Engine {
        match self.pool {
            Pool::Sqlite(_) => Engine::Sqlite,
            Pool::Postgres(_) => Engine::Postgres,
        }
    }

    /// Closes every pooled connection; later calls fail.
    pub async fn close(&self) {
        match &self.pool {
            Pool::Sqlite(p) => p.close().await,
            Pool::Postgres(p) => p.close().await,
        }
    }

    /// Checks that the database answers.
    pub async fn ping(&self) -> Result<(), DbError> {
        self.fetch_one("SELECT CAST(1 AS BIGINT) AS one", vec![], |r| r.i64("one"))
            .await
            .map(drop)
    }

    async fn migrate(&self) -> Result<(), DbError> {
        match &self.pool {
            Pool::Sqlite(p) => SQLITE_MIGRATOR.run(p).await,
            Pool::Postgres(p) => POSTGRES_MIGRATOR.run(p).await,
        }
        .map_err(DbError::Migration)
    }

    /// The in-process lock registry, when the engine needs one (SQLite).
    pub(crate) fn lock_registry(&self) -> Option<LockRegistry> {
        match self.pool {
            Pool::Sqlite(_) => Some(self.locks.clone()),
            Pool::Postgres(_) => None,
        }
    }

    /// A PostgreSQL connection taken out of the pool for good (it closes when dropped).
    pub(crate) async fn detached_pg_connection(&self) -> Result<Option<PgConnection>, DbError> {
        match &self.pool {
            Pool::Sqlite(_) => Ok(None),
            Pool::Postgres(p) => Ok(Some(p.acquire().await?.detach())),
        }
    }

    /// A pooled connection, for several statements outside a transaction.
    pub(crate) async fn acquire(&self) -> Result<PooledConn, DbError> {
        Ok(match &self.pool {
            Pool::Sqlite(p) => PooledConn::Sqlite(p.acquire().await?),
            Pool::Postgres(p) => PooledConn::Postgres(p.acquire().await?),
        })
    }

    /// Begins a write transaction (`BEGIN IMMEDIATE` in SQLite). Rolled back on drop unless
    /// committed.
    pub(crate) async fn begin(&self) -> Result<Tx, DbError> {
        Ok(match &self.pool {
            Pool::Sqlite(p) => Tx::Sqlite(p.begin_with("BEGIN IMMEDIATE").await?),
            Pool::Postgres(p) => Tx::Postgres(p.begin().await?),
        })
    }

    /// Runs one statement on a pooled connection; returns the number of rows affected.
    pub(crate) async fn execute(&self, sql: &str, args: Vec<Arg>) -> Result<u64, DbError> {
        self.acquire().await?.conn().execute(sql, args).await
    }

    /// Runs one query on a pooled connection; maps the first row, if any.
    pub(crate) async fn fetch_optional<T, F>(
        &self,
        sql: &str,
        args: Vec<Arg>,
        map: F,
    ) -> Result<Option<T>, DbError>
    where
        F: Fn(&dyn DbRow) -> Result<T, DbError> + Send,
    {
        self.acquire()
            .await?
            .conn()
            .fetch_optional(sql, args, map)
            .await
    }

    /// Runs one query that always returns exactly one row (e.g. an aggregate).
    pub(crate) async fn fetch_one<T, F>(
        &self,
        sql: &str,
        args: Vec<Arg>,
        map: F,
    ) -> Result<T, DbError>
    where
        F: Fn(&dyn DbRow) -> Result<T, DbError> + Send,
    {
        self.acquire().await?.conn().fetch_one(sql, args, map).await
    }

    /// Runs one query on a pooled connection; maps every row.
    pub(crate) async fn fetch_all<T, F>(
        &self,
        sql: &str,
        args: Vec<Arg>,
        map: F,
    ) -> Result<Vec<T>, DbError>
    where
        F: Fn(&dyn DbRow) -> Result<T, DbError> + Send,
    {
        self.acquire().await?.conn().fetch_all(sql, args, map).await
    }
}

async fn connect_sqlite(url: &str, options: &DbOptions) -> Result<SqlitePool, DbError> {
    let connect = SqliteConnectOptions::from_str(url)?
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Normal)
        .foreign_keys(true)
        .busy_timeout(options.sqlite_busy_timeout);
    let in_memory = url.contains(":memory:") || url.contains("mode=memory");
    let pool = if in_memory {
        // Every connection to `:memory:` is its own database: keep exactly one, forever.
        SqlitePoolOptions::new()
            .max_connections(1)
            .min_connections(1)
            .idle_timeout(None)
            .max_lifetime(None)
    } else {
        SqlitePoolOptions::new().max_connections(options.max_connections.max(1))
    };
    Ok(pool
        .acquire_timeout(options.acquire_timeout)
        .connect_with(connect)
        .await?)
}

async fn connect_postgres(url: &str, options: &DbOptions) -> Result<PgPool, DbError> {
    let connect = PgConnectOptions::from_str(url)?;
    Ok(PgPoolOptions::new()
        .max_connections(options.max_connections.max(1))
        .acquire_timeout(options.acquire_timeout)
        .connect_with(connect)
        .await?)
}

/// A connection checked out of the pool.
pub(crate) enum PooledConn {
    Sqlite(PoolConnection<Sqlite>),
    Postgres(PoolConnection<Postgres>),
}

impl PooledConn {
    pub(crate) fn conn(&mut self) -> Conn<'_> {
        match self {
            PooledConn::Sqlite(c) => Conn::Sqlite(c),
            PooledConn::Postgres(c) => Conn::Postgres(c),
        }
    }
}

/// An open transaction. Dropping it without [`Tx::commit`] rolls it back.
pub(crate) enum Tx {
    Sqlite(Transaction<'static, Sqlite>),
    Postgres(Transaction<'static, Postgres>),
}

impl Tx {
    pub(crate) fn conn(&mut self) -> Conn<'_> {
        match self {
            Tx::Sqlite(t) => Conn::Sqlite(t),
            Tx::Postgres(t) => Conn::Postgres(t),
        }
    }

    pub(crate) async fn commit(self) -> Result<(), DbError> {
        match self {
            Tx::Sqlite(t) => t.commit().await?,
            Tx::Postgres(t) => t.commit().await?,
        }
        Ok(())
    }
}

/// A borrowed connection of either engine: the single point of engine dispatch.
pub(crate) enum Conn<'c> {
    Sqlite(&'c mut SqliteConnection),
    Postgres(&'c mut PgConnection),
}

/// Binds every [`Arg`] to a `sqlx::query` with the engine's own encoding. Expanded once per
/// engine, so each `bind` is type-checked against that engine.
macro_rules! bind_args {
    ($query:expr, $args:expr) => {{
        let mut query = $query;
        for arg in $args {
            query = match arg {
                Arg::Uuid(v) => query.bind(v.map(DbUuid)),
                Arg::Text(v) => query.bind(v),
                Arg::Int(v) => query.bind(v),
                Arg::Float(v) => query.bind(v),
                Arg::Bool(v) => query.bind(v),
                Arg::Time(v) => query.bind(v.map(DbTime)),
                Arg::Json(v) => query.bind(Json(v)),
                Arg::Bytes(v) => query.bind(v),
            };
        }
        query
    }};
}

impl Conn<'_> {
    /// Runs one statement; returns the number of rows affected.
    pub(crate) async fn execute(&mut self, sql: &str, args: Vec<Arg>) -> Result<u64, DbError> {
        let affected = match self {
            Conn::Sqlite(c) => bind_args!(sqlx::query(sql), args)
                .execute(&mut **c)
                .await?
                .rows_affected(),
            Conn::Postgres(c) => bind_args!(sqlx::query(sql), args)
                .execute(&mut **c)
                .await?
                .rows_affected(),
        };
        Ok(affected)
    }

    /// Runs one query; maps the first row, if any.
    pub(crate) async fn fetch_optional<T, F>(
        &mut self,
        sql: &str,
        args: Vec<Arg>,
        map: F,
    ) -> Result<Option<T>, DbError>
    where
        F: Fn(&dyn DbRow) -> Result<T, DbError> + Send,
    {
        match self {
            Conn::Sqlite(c) => {
                let row = bind_args!(sqlx::query(sql), args)
                    .fetch_optional(&mut **c)
                    .await?;
                row.as_ref().map(|r| map(r)).transpose()
            }
            Conn::Postgres(c) => {
                let row = bind_args!(sqlx::query(sql), args)
                    .fetch_optional(&mut **c)
                    .await?;
                row.as_ref().map(|r| map(r)).transpose()
            }
        }
    }

    /// Runs one query that must return a row.
    pub(crate) async fn fetch_one<T, F>(
        &mut self,
        sql: &str,
        args: Vec<Arg>,
        map: F,
    ) -> Result<T, DbError>
    where
        F: Fn(&dyn DbRow) -> Result<T, DbError> + Send,
    {
        match self {
            Conn::Sqlite(c) => map(&bind_args!(sqlx::query(sql), args)
                .fetch_one(&mut **c)
                .await?),
            Conn::Postgres(c) => map(&bind_args!(sqlx::query(sql), args)
                .fetch_one(&mut **c)
                .await?),
        }
    }

    /// Runs one query; maps every row.
    pub(crate) async fn fetch_all<T, F>(
        &mut self,
        sql: &str,
        args: Vec<Arg>,
        map: F,
    ) -> Result<Vec<T>, DbError>
    where
        F: Fn(&dyn DbRow) -> Result<T, DbError> + Send,
    {
        match self {
            Conn::Sqlite(c) => {
                let rows = bind_args!(sqlx::query(sql), args)
                    .fetch_all(&mut **c)
                    .await?;
                rows.iter().map(|r| map(r)).collect()
            }
            Conn::Postgres(c) => {
                let rows = bind_args!(sqlx::query(sql), args)
                    .fetch_all(&mut **c)
                    .await?;
                rows.iter().map(|r| map(r)).collect()
            }
        }
    }
}

/// One bound argument, engine-independent. `None` binds SQL `NULL` of the variant's type.
#[derive(Debug, Clone)]
pub(crate) enum Arg {
    Uuid(Option<Uuid>),
    Text(Option<String>),
    Int(Option<i64>),
    Float(f64),
    Bool(bool),
    Time(Option<DateTime<Utc>>),
    Json(serde_json::Value),
    /// `bytea` in PostgreSQL, `BLOB` in SQLite.
    Bytes(Vec<u8>),
}

/// `args![a, b, c]`: a `Vec<Arg>` from values that convert into [`Arg`].
macro_rules! args {
    ($($arg:expr),* $(,)?) => {
        vec![$($crate::engine::Arg::from($arg)),*]
    };
}
pub(crate) use args;

impl From<Uuid> for Arg {
    fn from(v: Uuid) -> Self {
        Arg::Uuid(Some(v))
    }
}
impl From<Option<Uuid>> for Arg {
    fn from(v: Option<Uuid>) -> Self {
        Arg::Uuid(v)
    }
}
impl From<&str> for Arg {
    fn from(v: &str) -> Self {
        Arg::Text(Some(v.to_owned()))
    }
}
impl From<&String> for Arg {
    fn from(v: &String) -> Self {
        Arg::Text(Some(v.clone()))
    }
}
impl From<String> for Arg {
    fn from(v: String) -> Self {
        Arg::Text(Some(v))
    }
}
impl From<Option<&str>> for Arg {
    fn from(v: Option<&str>) -> Self {
        Arg::Text(v.map(str::to_owned))
    }
}
impl From<Option<String>> for Arg {
    fn from(v: Option<String>) -> Self {
        Arg::Text(v)
    }
}
impl From<i64> for Arg {
    fn from(v: i64) -> Self {
        Arg::Int(Some(v))
    }
}
impl From<u32> for Arg {
    fn from(v: u32) -> Self {
        Arg::Int(Some(i64::from(v)))
    }
}
impl From<Option<u32>> for Arg {
    fn from(v: Option<u32>) -> Self {
        Arg::Int(v.map(i64::from))
    }
}
impl From<u64> for Arg {
    /// Saturates at `i64::MAX` (9.2 EB: larger values are not meaningful here).
    fn from(v: u64) -> Self {
        Arg::Int(Some(i64::try_from(v).unwrap_or(i64::MAX)))
    }
}
impl From<f64> for Arg {
    fn from(v: f64) -> Self {
        Arg::Float(v)
    }
}
impl From<bool> for Arg {
    fn from(v: bool) -> Self {
        Arg::Bool(v)
    }
}
impl From<DateTime<Utc>> for Arg {
    fn from(v: DateTime<Utc>) -> Self {
        Arg::Time(Some(v))
    }
}
impl From<Option<DateTime<Utc>>> for Arg {
    fn from(v: Option<DateTime<Utc>>) -> Self {
        Arg::Time(v)
    }
}
impl From<serde_json::Value> for Arg {
    fn from(v: serde_json::Value) -> Self {
        Arg::Json(v)
    }
}
impl From<Vec<u8>> for Arg {
    fn from(v: Vec<u8>) -> Self {
        Arg::Bytes(v)
    }
}

macro_rules! id_args {
    ($($id:ty),+) => {$(
        impl From<$id> for Arg {
            fn from(v: $id) -> Self {
                Arg::Uuid(Some(v.uuid()))
            }
        }
        impl From<Option<$id>> for Arg {
            fn from(v: Option<$id>) -> Self {
                Arg::Uuid(v.map(|id| id.uuid()))
            }
        }
    )+};
}
id_args!(
    nestbox_types::SandboxId,
    nestbox_types::UserId,
    nestbox_types::TeamId,
    nestbox_types::ApiKeyId,
    nestbox_types::HostId,
    nestbox_types::TemplateId,
    nestbox_types::AuditLogId,
    nestbox_types::BuildId
);

macro_rules! wire_args {
    ($($ty:ty),+) => {$(
        impl From<$ty> for Arg {
            fn from(v: $ty) -> Self {
                Arg::Text(Some(v.as_str().to_owned()))
            }
        }
    )+};
}
wire_args!(
    nestbox_types::SandboxStatus,
    nestbox_types::HostStatus,
    nestbox_types::TeamRole,
    nestbox_types::TemplateKind,
    nestbox_types::Expiry,
    nestbox_types::BuildStatus,
    crate::model::UserStatus,
    crate::model::HostKind,
    crate::model::ActorType,
    crate::model::AuditStatus,
    crate::model::MetricTier
);

/// A result row of either engine, read by column name.
pub(crate) trait DbRow {
    fn uuid_opt(&self, col: &str) -> Result<Option<Uuid>, DbError>;
    fn string_opt(&self, col: &str) -> Result<Option<String>, DbError>;
    fn i64_opt(&self, col: &str) -> Result<Option<i64>, DbError>;
    fn f64(&self, col: &str) -> Result<f64, DbError>;
    fn bool(&self, col: &str) -> Result<bool, DbError>;
    fn time_opt(&self, col: &str) -> Result<Option<DateTime<Utc>>, DbError>;
    fn json(&self, col: &str) -> Result<serde_json::Value, DbError>;
    fn bytes(&self, col: &str) -> Result<Vec<u8>, DbError>;
}

macro_rules! impl_db_row {
    ($($row:ty),+) => {$(
        impl DbRow for $row {
            fn uuid_opt(&self, col: &str) -> Result<Option<Uuid>, DbError> {
                Ok(self.try_get::<Option<DbUuid>, _>(col)?.map(|v| v.0))
            }
            fn string_opt(&self, col: &str) -> Result<Option<String>, DbError> {
                Ok(self.try_get(col)?)
            }
            fn i64_opt(&self, col: &str) -> Result<Option<i64>, DbError> {
                Ok(self.try_get(col)?)
            }
            fn f64(&self, col: &str) -> Result<f64, DbError> {
                Ok(self.try_get(col)?)
            }
            fn bool(&self, col: &str) -> Result<bool, DbError> {
                Ok(self.try_get(col)?)
            }
            fn time_opt(&self, col: &str) -> Result<Option<DateTime<Utc>>, DbError> {
                Ok(self.try_get::<Option<DbTime>, _>(col)?.map(|v| v.0))
            }
            fn json(&self, col: &str) -> Result<serde_json::Value, DbError> {
                Ok(self.try_get::<Json<serde_json::Value>, _>(col)?.0)
            }
            fn bytes(&self, col: &str) -> Result<Vec<u8>, DbError> {
                Ok(self.try_get(col)?)
            }
        }
    )+};
}
impl_db_row!(SqliteRow, PgRow);

/// Typed getters on top of [`DbRow`]'s primitives. Column names are `&'static str` so errors
/// can name them.
impl<'a> dyn DbRow + 'a {
    pub(crate) fn uuid(&self, col: &'static str) -> Result<Uuid, DbError> {
        self.uuid_opt(col)?
            .ok_or_else(|| DbError::corrupt(col, "NULL"))
    }

    pub(crate) fn id<T: From<Uuid>>(&self, col: &'static str) -> Result<T, DbError> {
        self.uuid(col).map(T::from)
    }

    pub(crate) fn id_opt<T: From<Uuid>>(&self, col: &'static str) -> Result<Option<T>, DbError> {
        Ok(self.uuid_opt(col)?.map(T::from))
    }

    pub(crate) fn string(&self, col: &'static str) -> Result<String, DbError> {
        self.string_opt(col)?
            .ok_or_else(|| DbError::corrupt(col, "NULL"))
    }

    pub(crate) fn i64(&self, col: &'static str) -> Result<i64, DbError> {
        self.i64_opt(col)?
            .ok_or_else(|| DbError::corrupt(col, "NULL"))
    }

    pub(crate) fn u32(&self, col: &'static str) -> Result<u32, DbError> {
        let v = self.i64(col)?;
        u32::try_from(v).map_err(|_| DbError::corrupt(col, v.to_string()))
    }

    pub(crate) fn u32_opt(&self, col: &'static str) -> Result<Option<u32>, DbError> {
        self.i64_opt(col)?
            .map(|v| u32::try_from(v).map_err(|_| DbError::corrupt(col, v.to_string())))
            .transpose()
    }

    pub(crate) fn u64(&self, col: &'static str) -> Result<u64, DbError> {
        let v = self.i64(col)?;
        u64::try_from(v).map_err(|_| DbError::corrupt(col, v.to_string()))
    }

    pub(crate) fn time(&self, col: &'static str) -> Result<DateTime<Utc>, DbError> {
        self.time_opt(col)?
            .ok_or_else(|| DbError::corrupt(col, "NULL"))
    }

    /// A column holding a wire-spelled enum (status, role, kind, …).
    pub(crate) fn parse<T: FromStr>(&self, col: &'static str) -> Result<T, DbError> {
        let s = self.string(col)?;
        s.parse().map_err(|_| DbError::corrupt(col, &s))
    }
}

/// A UUID in the engine's storage type: `uuid` in PostgreSQL, hyphenated `TEXT` in SQLite.
#[derive(Debug, Clone, Copy)]
pub(crate) struct DbUuid(pub(crate) Uuid);

impl Type<Sqlite> for DbUuid {
    fn type_info() -> SqliteTypeInfo {
        <String as Type<Sqlite>>::type_info()
    }
    fn compatible(ty: &SqliteTypeInfo) -> bool {
        <String as Type<Sqlite>>::compatible(ty)
    }
}

impl<'q> Encode<'q, Sqlite> for DbUuid {
    fn encode_by_ref(&self, buf: &mut Vec<SqliteArgumentValue<'q>>) -> Result<IsNull, BoxDynError> {
        <String as Encode<'q, Sqlite>>::encode(self.0.hyphenated().to_string(), buf)
    }
}

impl<'r> Decode<'r, Sqlite> for DbUuid {
    fn decode(value: SqliteValueRef<'r>) -> Result<Self, BoxDynError> {
        let s = <&str as Decode<'r, Sqlite>>::decode(value)?;
        Ok(DbUuid(Uuid::try_parse(s)?))
    }
}

impl Type<Postgres> for DbUuid {
    fn type_info() -> PgTypeInfo {
        <Uuid as Type<Postgres>>::type_info()
    }
    fn compatible(ty: &PgTypeInfo) -> bool {
        <Uuid as Type<Postgres>>::compatible(ty)
    }
}

impl Encode<'_, Postgres> for DbUuid {
    fn encode_by_ref(&self, buf: &mut PgArgumentBuffer) -> Result<IsNull, BoxDynError> {
        <Uuid as Encode<'_, Postgres>>::encode_by_ref(&self.0, buf)
    }
}

impl<'r> Decode<'r, Postgres> for DbUuid {
    fn decode(value: PgValueRef<'r>) -> Result<Self, BoxDynError> {
        Ok(DbUuid(<Uuid as Decode<'r, Postgres>>::decode(value)?))
    }
}

/// A timestamp in the engine's storage type: `timestamptz` in PostgreSQL; in SQLite `TEXT` of
/// the fixed-width form `2025-01-31T12:00:00.123456Z`, whose text order is time order.
#[derive(Debug, Clone, Copy)]
pub(crate) struct DbTime(pub(crate) DateTime<Utc>);

/// The SQLite text form. Fixed width: always six fraction digits and `Z`.
const SQLITE_TIME_FORMAT: &str = "%Y-%m-%dT%H:%M:%S%.6fZ";

impl Type<Sqlite> for DbTime {
    fn type_info() -> SqliteTypeInfo {
        <String as Type<Sqlite>>::type_info()
    }
    fn compatible(ty: &SqliteTypeInfo) -> bool {
        <String as Type<Sqlite>>::compatible(ty)
    }
}

impl<'q> Encode<'q, Sqlite> for DbTime {
    fn encode_by_ref(&self, buf: &mut Vec<SqliteArgumentValue<'q>>) -> Result<IsNull, BoxDynError> {
        <String as Encode<'q, Sqlite>>::encode(self.0.format(SQLITE_TIME_FORMAT).to_string(), buf)
    }
}

impl<'r> Decode<'r, Sqlite> for DbTime {
    fn decode(value: SqliteValueRef<'r>) -> Result<Self, BoxDynError> {
        let s = <&str as Decode<'r, Sqlite>>::decode(value)?;
        if let Ok(t) = DateTime::parse_from_rfc3339(s) {
            return Ok(DbTime(t.with_timezone(&Utc)));
        }
        // `CURRENT_TIMESTAMP` style, written by hand in the sqlite3 shell.
        let naive = NaiveDateTime::parse_from_str(s, "%Y-%m-%d %H:%M:%S%.f")?;
        Ok(DbTime(naive.and_utc()))
    }
}

impl Type<Postgres> for DbTime {
    fn type_info() -> PgTypeInfo {
        <DateTime<Utc> as Type<Postgres>>::type_info()
    }
    fn compatible(ty: &PgTypeInfo) -> bool {
        <DateTime<Utc> as Type<Postgres>>::compatible(ty)
    }
}

impl Encode<'_, Postgres> for DbTime {
    fn encode_by_ref(&self, buf: &mut PgArgumentBuffer) -> Result<IsNull, BoxDynError> {
        <DateTime<Utc> as Encode<'_, Postgres>>::encode_by_ref(&self.0, buf)
    }
}

impl<'r> Decode<'r, Postgres> for DbTime {
    fn decode(value: PgValueRef<'r>) -> Result<Self, BoxDynError> {
        Ok(DbTime(<DateTime<Utc> as Decode<'r, Postgres>>::decode(
            value,
        )?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlite_time_text_is_fixed_width_and_ordered() {
        let a = DateTime::parse_from_rfc3339("2025-01-31T12:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let b = a + chrono::Duration::microseconds(1);
        let c = a + chrono::Duration::milliseconds(500);
        let fa = a.format(SQLITE_TIME_FORMAT).to_string();
        let fb = b.format(SQLITE_TIME_FORMAT).to_string();
        let fc = c.format(SQLITE_TIME_FORMAT).to_string();
        assert_eq!(fa, "2025-01-31T12:00:00.000000Z");
        assert_eq!(fa.len(), fb.len());
        assert!(fa < fb && fb < fc);
    }

    #[test]
    fn now_is_microsecond_precision() {
        assert_eq!(now().timestamp_subsec_nanos() % 1000, 0);
    }
}
