//! Tests of the test kit itself: the PostgreSQL cluster (including that no server outlives a
//! killed test process), temporary SQLite URLs and `wait_for`.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use nestbox_testkit::{PgCluster, temp_sqlite_url, wait_for};
use sqlx::Connection;

/// Set in the child process of `shared_cluster_is_cleaned_up_when_the_process_is_killed`.
const CHILD_ENV: &str = "NESTBOX_TESTKIT_CHILD";

fn process_alive(pid: u32) -> bool {
    // A zombie is dead for our purposes (its parent just has not reaped it yet).
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map(|s| {
            !s.lines()
                .any(|l| l.starts_with("State:") && l.contains('Z'))
        })
        .unwrap_or(false)
}

#[tokio::test]
async fn fresh_databases_are_distinct_and_usable() {
    let pg = PgCluster::shared().await.unwrap();
    let a = pg.fresh_database().await.unwrap();
    let b = pg.fresh_database().await.unwrap();
    assert_ne!(a, b);
    for url in [&a, &b] {
        let mut conn = sqlx::PgConnection::connect(url).await.unwrap();
        sqlx::query("CREATE TABLE t (x int)")
            .execute(&mut conn)
            .await
            .unwrap();
        let (n,): (i64,) = sqlx::query_as("SELECT count(*) FROM t")
            .fetch_one(&mut conn)
            .await
            .unwrap();
        assert_eq!(n, 0);
        let (fsync,): (String,) = sqlx::query_as("SHOW fsync")
            .fetch_one(&mut conn)
            .await
            .unwrap();
        assert_eq!(fsync, "off");
    }
    assert!(
        pg.socket_dir()
            .join(format!(".s.PGSQL.{}", pg.port()))
            .exists()
    );
    assert!(
        pg.version().starts_with(char::is_numeric),
        "{}",
        pg.version()
    );
}

#[tokio::test]
async fn shared_cluster_is_started_once() {
    let a = PgCluster::shared().await.unwrap();
    let b = PgCluster::shared().await.unwrap();
    assert!(std::ptr::eq(a, b));
}

#[tokio::test]
async fn dropped_cluster_stops_its_server_and_removes_its_directory() {
    let pg = PgCluster::start().await.unwrap();
    let pid = pg.pid();
    let dir = pg.dir().to_owned();
    let url = pg.fresh_database().await.unwrap();
    sqlx::PgConnection::connect(&url)
        .await
        .unwrap()
        .close()
        .await
        .unwrap();
    assert!(process_alive(pid));
    drop(pg);
    assert!(!process_alive(pid), "postgres {pid} survived drop");
    assert!(!dir.exists(), "{} survived drop", dir.display());
}

/// Runs in a child process: starts the shared cluster, reports it, then dies by SIGKILL so
/// that no destructor or exit handler runs.
#[tokio::test]
async fn child_process_starts_cluster_and_is_killed() {
    if std::env::var_os(CHILD_ENV).is_none() {
        return;
    }
    let pg = PgCluster::shared().await.unwrap();
    println!("PGINFO {} {}", pg.pid(), pg.dir().display());
    nix::sys::signal::kill(nix::unistd::getpid(), nix::sys::signal::Signal::SIGKILL).unwrap();
}

#[tokio::test]
async fn shared_cluster_is_cleaned_up_when_the_process_is_killed() {
    let exe = std::env::current_exe().unwrap();
    let mut child = Command::new(exe)
        .args([
            "--exact",
            "child_process_starts_cluster_and_is_killed",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = BufReader::new(child.stdout.take().unwrap());
    let info = stdout
        .lines()
        .map_while(Result::ok)
        .find_map(|l| {
            l.split_once("PGINFO ")
                .map(|(_, info)| info.trim().to_owned())
        })
        .expect("child reported its cluster");
    let status = child.wait().unwrap();
    assert!(!status.success(), "child was expected to die by SIGKILL");
    let (pid, dir) = info.split_once(' ').unwrap();
    let pid: u32 = pid.parse().unwrap();
    let dir = PathBuf::from(dir);
    wait_for(Duration::from_secs(20), || async {
        !process_alive(pid) && !dir.exists()
    })
    .await
    .unwrap_or_else(|e| {
        panic!(
            "postgres {pid} or {} outlived its test process: {e}",
            dir.display()
        )
    });
}

#[tokio::test]
async fn temp_sqlite_url_is_removed_on_drop() {
    let tmp = temp_sqlite_url().unwrap();
    assert!(tmp.url().starts_with("sqlite://"));
    let mut conn = sqlx::SqliteConnection::connect(&format!("{}?mode=rwc", tmp.url()))
        .await
        .unwrap();
    sqlx::query("CREATE TABLE t (x)")
        .execute(&mut conn)
        .await
        .unwrap();
    conn.close().await.unwrap();
    let dir = tmp.dir().to_owned();
    assert!(dir.join("nestbox.db").exists());
    drop(tmp);
    assert!(!dir.exists());
}

#[tokio::test]
async fn wait_for_returns_the_ready_value() {
    let mut calls = 0;
    let v = wait_for(Duration::from_secs(5), || {
        calls += 1;
        let n = calls;
        async move { (n >= 3).then_some(n) }
    })
    .await
    .unwrap();
    assert_eq!(v, 3);
}

#[tokio::test]
async fn wait_for_times_out_with_the_last_reason() {
    let err = wait_for(Duration::from_millis(50), || async {
        Err::<(), _>("still starting")
    })
    .await
    .unwrap_err();
    assert!(err.attempts >= 2, "{err}");
    assert_eq!(err.last.as_deref(), Some("still starting"));
    assert!(err.to_string().contains("still starting"));
}

#[tokio::test]
async fn wait_for_accepts_bool() {
    let start = std::time::Instant::now();
    wait_for(Duration::from_secs(5), || async move {
        start.elapsed() > Duration::from_millis(20)
    })
    .await
    .unwrap();
}
