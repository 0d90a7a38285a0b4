//! `users`: accounts that sign in to the dashboard and API.
//!
//! Invariant: emails are stored trimmed and lower-cased, and are unique; every lookup by email
//! normalises its input the same way. Passwords are stored only as the hash the caller computed.

use chrono::{DateTime, Utc};
use nestbox_types::UserId;

use crate::engine::{Db, DbRow, args, now};
use crate::error::DbError;
use crate::model::UserStatus;
use crate::page::{Page, Paged, Sql, finish_page};

/// A user account.
#[derive(Debug, Clone, PartialEq)]
pub struct User {
    pub id: UserId,
    /// Lower-cased.
    pub email: String,
    pub name: String,
    /// `None` for accounts that cannot sign in with a password.
    pub password_hash: Option<String>,
    pub is_admin: bool,
    pub status: UserStatus,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// What [`create`] needs.
#[derive(Debug, Clone)]
pub struct NewUser {
    /// Normalised (trimmed, lower-cased) before storing.
    pub email: String,
    pub name: String,
    pub password_hash: Option<String>,
    pub is_admin: bool,
}

const COLUMNS: &str = "id, email, name, password_hash, is_admin, status, created_at, updated_at";

pub(crate) fn from_row(r: &dyn DbRow) -> Result<User, DbError> {
    Ok(User {
        id: r.id("id")?,
        email: r.string("email")?,
        name: r.string("name")?,
        password_hash: r.string_opt("password_hash")?,
        is_admin: r.bool("is_admin")?,
        status: r.parse("status")?,
        created_at: r.time("created_at")?,
        updated_at: r.time("updated_at")?,
    })
}

/// The stored form of an email address.
pub fn normalize_email(email: &str) -> String {
    email.trim().to_lowercase()
}

/// Creates an active user. [`DbError::Conflict`] if the email is taken.
pub async fn create(db: &Db, new: &NewUser) -> Result<User, DbError> {
    let sql = format!(
        "INSERT INTO users (id, email, name, password_hash, is_admin, status, created_at, updated_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $7) RETURNING {COLUMNS}"
    );
    let args = args![
        UserId::new(),
        normalize_email(&new.email),
        &new.name,
        new.password_hash.clone(),
        new.is_admin,
        UserStatus::Active,
        now(),
    ];
    db.fetch_one(&sql, args, from_row).await
}

/// The user with `id`.
pub async fn get(db: &Db, id: UserId) -> Result<User, DbError> {
    let sql = format!("SELECT {COLUMNS} FROM users WHERE id = $1");
    db.fetch_optional(&sql, args![id], from_row)
        .await?
        .ok_or_else(|| DbError::not_found("user", id))
}

/// The user with this email (compared normalised), if any.
pub async fn get_by_email(db: &Db, email: &str) -> Result<Option<User>, DbError> {
    let sql = format!("SELECT {COLUMNS} FROM users WHERE email = $1");
    db.fetch_optional(&sql, args![normalize_email(email)], from_row)
        .await
}

/// All users, newest first.
pub async fn list(db: &Db, page: &Page) -> Result<Paged<User>, DbError> {
    let mut sql = Sql::new(&format!("SELECT {COLUMNS} FROM users u WHERE 1 = 1"));
    sql.page("u", page)?;
    let rows = db.fetch_all(&sql.text, sql.args, from_row).await?;
    Ok(finish_page(rows, page.effective_limit(), |u| {
        (u.created_at, u.id.uuid())
    }))
}

/// Grants or revokes platform admin.
pub async fn set_admin(db: &Db, id: UserId, is_admin: bool) -> Result<(), DbError> {
    update(db, id, "is_admin = $2", args![id, is_admin]).await
}

/// Activates or disables the account.
pub async fn set_status(db: &Db, id: UserId, status: UserStatus) -> Result<(), DbError> {
    update(db, id, "status = $2", args![id, status]).await
}

/// Changes the account's status and admin flag at once (either may be left as it is).
pub async fn set_access(
    db: &Db,
    id: UserId,
    status: Option<UserStatus>,
    is_admin: Option<bool>,
) -> Result<(), DbError> {
    let mut set = Vec::new();
    let mut values = args![id];
    if let Some(status) = status {
        values.push(status.into());
        set.push(format!("status = ${}", values.len()));
    }
    if let Some(is_admin) = is_admin {
        values.push(is_admin.into());
        set.push(format!("is_admin = ${}", values.len()));
    }
    if set.is_empty() {
        return get(db, id).await.map(drop);
    }
    update(db, id, &set.join(", "), values).await
}

/// Replaces the password hash (`None` removes password sign-in).
pub async fn set_password_hash(
    db: &Db,
    id: UserId,
    password_hash: Option<&str>,
) -> Result<(), DbError> {
    update(db, id, "password_hash = $2", args![id, password_hash]).await
}

/// Renames the user.
pub async fn set_name(db: &Db, id: UserId, name: &str) -> Result<(), DbError> {
    update(db, id, "name = $2", args![id, name]).await
}

/// Deletes a user; returns whether it existed. Their memberships go with them; API keys they
/// created stay, with `created_by` cleared.
pub async fn delete(db: &Db, id: UserId) -> Result<bool, DbError> {
    Ok(db
        .execute("DELETE FROM users WHERE id = $1", args![id])
        .await?
        > 0)
}

/// Number of users.
pub async fn count(db: &Db) -> Result<u64, DbError> {
    db.fetch_one("SELECT COUNT(*) AS n FROM users", args![], |r| r.u64("n"))
        .await
}

/// `UPDATE users SET <set>, updated_at = now WHERE id = $1`; `set` uses `$2…`.
async fn update(
    db: &Db,
    id: UserId,
    set: &str,
    mut args: Vec<crate::engine::Arg>,
) -> Result<(), DbError> {
    let n = args.len() + 1;
    args.push(now().into());
    let sql = format!("UPDATE users SET {set}, updated_at = ${n} WHERE id = $1");
    match db.execute(&sql, args).await? {
        0 => Err(DbError::not_found("user", id)),
        _ => Ok(()),
    }
}
