//! Fixtures shared by the repository tests.

use std::collections::BTreeMap;

use nestbox_db::sandboxes::{NewSandbox, Sandbox};
use nestbox_db::teams::Team;
use nestbox_db::users::{NewUser, User};
use nestbox_db::{Db, Engine, sandboxes, teams, users};
use nestbox_types::TeamId;
use sqlx::Connection;

/// A database of one engine, kept alive for the duration of a test.
pub struct TestDb {
    pub db: Db,
    pub url: String,
    _sqlite: Option<nestbox_testkit::TempSqlite>,
}

impl TestDb {
    pub async fn sqlite() -> TestDb {
        let tmp = nestbox_testkit::temp_sqlite_url().unwrap();
        let url = tmp.url().to_owned();
        let db = Db::connect(&url).await.unwrap();
        assert_eq!(db.engine(), Engine::Sqlite);
        TestDb {
            db,
            url,
            _sqlite: Some(tmp),
        }
    }

    pub async fn postgres() -> TestDb {
        let pg = nestbox_testkit::PgCluster::shared().await.unwrap();
        let url = pg.fresh_database().await.unwrap();
        let db = Db::connect(&url).await.unwrap();
        assert_eq!(db.engine(), Engine::Postgres);
        TestDb {
            db,
            url,
            _sqlite: None,
        }
    }

    /// Runs raw SQL on a separate connection, for test set-up the API deliberately does not
    /// offer (e.g. forcing equal timestamps).
    pub async fn raw(&self, sql: &str) {
        match self.db.engine() {
            Engine::Sqlite => {
                let mut c = sqlx::SqliteConnection::connect(&self.url).await.unwrap();
                sqlx::query(sql).execute(&mut c).await.unwrap();
                c.close().await.unwrap();
            }
            Engine::Postgres => {
                let mut c = sqlx::PgConnection::connect(&self.url).await.unwrap();
                sqlx::query(sql).execute(&mut c).await.unwrap();
                c.close().await.unwrap();
            }
        }
    }
}

/// `db_test!(name, |t| { … })` defines `name::sqlite` and `name::postgres`, each running the
/// body with `t: TestDb` of that engine.
macro_rules! db_test {
    ($name:ident, |$t:ident| $body:block) => {
        mod $name {
            #[allow(unused_imports)]
            use super::*;

            #[tokio::test]
            async fn sqlite() {
                #[allow(unused_variables)]
                let $t = $crate::common::TestDb::sqlite().await;
                $body
            }

            #[tokio::test]
            async fn postgres() {
                #[allow(unused_variables)]
                let $t = $crate::common::TestDb::postgres().await;
                $body
            }
        }
    };
}

pub async fn user(db: &Db, email: &str) -> User {
    users::create(
        db,
        &NewUser {
            email: email.into(),
            name: "Test".into(),
            password_hash: Some("hash".into()),
            is_admin: false,
        },
    )
    .await
    .unwrap()
}

/// A user and a team they own.
pub async fn team(db: &Db, name: &str) -> (User, Team) {
    let owner = user(
        db,
        &format!("{}-{}@example.com", name, uuid::Uuid::new_v4().simple()),
    )
    .await;
    let team = teams::create_with_owner(db, name, owner.id).await.unwrap();
    (owner, team)
}

pub fn new_sandbox(team: TeamId) -> NewSandbox {
    NewSandbox {
        team_id: team,
        template_id: None,
        template_name: "minimal".into(),
        vcpus: 1,
        memory_mb: 512,
        disk_size_mb: 5120,
        timeout_sec: 300,
        env: BTreeMap::new(),
        metadata: BTreeMap::new(),
        created_by: "usr-test".into(),
        lifetime_sec: None,
        on_expiry: nestbox_types::Expiry::Destroy,
        egress: Default::default(),
        public_traffic: false,
        auto_resume: false,
    }
}

pub async fn sandbox(db: &Db, team: TeamId, metadata: &[(&str, &str)]) -> Sandbox {
    let mut new = new_sandbox(team);
    new.metadata = metadata
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    sandboxes::insert(db, &new).await.unwrap()
}
