//! The handle itself: connecting, migrations, seeds, dispatch details.

use nestbox_db::{Db, DbError, Page, teams, users};
use nestbox_types::PLATFORM_TEAM;

db_test!(platform_team_is_seeded, |t| {
    let team = teams::get(&t.db, PLATFORM_TEAM).await.unwrap();
    assert_eq!(team.name, "Platform");
    assert!(team.id.is_platform());
});

db_test!(reconnecting_reapplies_nothing, |t| {
    let again = Db::connect(&t.url).await.unwrap();
    again.ping().await.unwrap();
    assert_eq!(users::count(&again).await.unwrap(), 0);
});

db_test!(invalid_cursor_is_rejected, |t| {
    let err = users::list(&t.db, &Page::after(10, "not-a-cursor"))
        .await
        .unwrap_err();
    assert!(matches!(err, DbError::InvalidCursor), "{err:?}");
});

#[tokio::test]
async fn unsupported_url_is_rejected() {
    let err = Db::connect("mysql://root:secret@localhost/x")
        .await
        .unwrap_err();
    assert!(
        matches!(&err, DbError::UnsupportedUrl { scheme } if scheme == "mysql"),
        "{err:?}"
    );
    assert!(!err.to_string().contains("secret"));
}

#[tokio::test]
async fn in_memory_sqlite_works() {
    let db = Db::connect("sqlite::memory:").await.unwrap();
    let u = crate::common::user(&db, "mem@example.com").await;
    assert_eq!(users::get(&db, u.id).await.unwrap(), u);
}

#[tokio::test]
async fn sqlite_file_uses_wal_and_foreign_keys() {
    let t = crate::common::TestDb::sqlite().await;
    use sqlx::Connection;
    // A pooled connection of the Db is configured by its options; check on the file itself.
    let mut c = sqlx::SqliteConnection::connect(&t.url).await.unwrap();
    let (mode,): (String,) = sqlx::query_as("PRAGMA journal_mode")
        .fetch_one(&mut c)
        .await
        .unwrap();
    assert_eq!(mode, "wal");
    // Foreign keys: a membership for a missing user is refused through the Db.
    let err = teams::create_with_owner(&t.db, "x", nestbox_types::UserId::new())
        .await
        .unwrap_err();
    assert!(err.is_not_found(), "{err:?}");
    // …and the failed transaction left no team behind.
    let (n,): (i64,) = sqlx::query_as("SELECT count(*) FROM teams")
        .fetch_one(&mut c)
        .await
        .unwrap();
    assert_eq!(n, 1, "only the platform team");
}

db_test!(leader_lock_is_exclusive, |t| {
    let other = Db::connect(&t.url).await.unwrap();
    let mut lock =
        t.db.try_lock_leader(42)
            .await
            .unwrap()
            .expect("first caller leads");
    assert_eq!(lock.key(), 42);
    assert!(lock.still_held().await);
    // Another handle (another replica on PostgreSQL) cannot take it; other keys are free.
    let contender = match t.db.engine() {
        nestbox_db::Engine::Sqlite => t.db.clone(),
        nestbox_db::Engine::Postgres => other.clone(),
    };
    assert!(contender.try_lock_leader(42).await.unwrap().is_none());
    let other_key = contender
        .try_lock_leader(43)
        .await
        .unwrap()
        .expect("other key is free");
    lock.release().await;
    let again = contender
        .try_lock_leader(42)
        .await
        .unwrap()
        .expect("released");
    // Dropping releases too (on PostgreSQL when the server notices the closed session).
    drop(again);
    nestbox_testkit::wait_for(std::time::Duration::from_secs(10), || {
        let db = t.db.clone();
        async move { db.try_lock_leader(42).await.unwrap().is_some() }
    })
    .await
    .unwrap();
    drop(other_key);
});
