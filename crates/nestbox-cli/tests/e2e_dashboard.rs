//! The web dashboard in a real browser: the suite in `web/tests/e2e` (node's test runner,
//! playwright-core driving Debian's headless Chromium, axe-core) against one `nestbox up`
//! with real VMs, signed in as the people who use it. Screenshots of every page land in
//! `target/dashboard-screenshots/`.
//!
//! Needs `make web` (the dashboard built into the binary, and the suite's packages) and
//! Chromium (`scripts/install-deps.sh --test`); `make test` does both.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::os::unix::process::CommandExt as _;
use std::path::Path;
use std::process::{Command, Stdio};

use common::{Nestbox, workspace};

#[tokio::test(flavor = "multi_thread")]
async fn the_dashboard_works_in_a_real_browser() {
    let web = workspace().join("web");
    assert!(
        web.join("node_modules/playwright-core").exists(),
        "the dashboard's test packages are not installed in {}: run `make web`",
        web.display()
    );
    assert!(
        Path::new("/usr/bin/chromium").exists(),
        "Chromium is missing: run `scripts/install-deps.sh --test`"
    );
    let nb = Nestbox::up();
    let page = reqwest::get(format!("{}/", nb.url))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        !page.contains("The dashboard is not in this build"),
        "this nestbox binary was compiled without the dashboard: run `make web`, then build again"
    );
    let shots = workspace().join("target/dashboard-screenshots");
    let _ = std::fs::remove_dir_all(&shots);

    let mut suite = Command::new("node");
    suite
        .current_dir(&web)
        .args(["--test", "--test-concurrency=1", "--test-reporter=spec"])
        .arg("tests/e2e/")
        .env("NESTBOX_URL", &nb.url)
        .env("NESTBOX_ADMIN_EMAIL", &nb.admin_email)
        .env("NESTBOX_ADMIN_PASSWORD", &nb.admin_password)
        .env("NESTBOX_BIN", env!("CARGO_BIN_EXE_nestbox"))
        .env("NESTBOX_TEST_IMAGES", common::images_dir())
        .env("NESTBOX_SCREENSHOTS", &shots)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own process group: whatever it starts (the browser, a host agent) is
        // stopped with it, even if it fails half-way.
        .process_group(0);
    let child = suite.spawn().expect("starting node");
    let group = child.id();
    let out = tokio::task::block_in_place(|| child.wait_with_output()).expect("running the suite");
    let _ = Command::new("kill")
        .args(["-KILL", "--", &format!("-{group}")])
        .status();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!("--- dashboard suite ---\n{text}");
    assert!(
        out.status.success(),
        "the dashboard suite failed (screenshots in {}); warnings and errors:\n{}\nlog tail:\n{}",
        shots.display(),
        nb.log_problems(),
        nb.log_tail()
    );
    let taken = std::fs::read_dir(&shots).map(|d| d.count()).unwrap_or(0);
    assert!(taken >= 20, "only {taken} screenshots were saved");
}
