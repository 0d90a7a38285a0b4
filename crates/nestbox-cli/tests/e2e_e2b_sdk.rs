//! E2B's stock SDKs, unmodified, against a real installation: the Python suite
//! (`sdk-tests/python`, pytest) and the JavaScript suite (`sdk-tests/js`, node's test
//! runner) run against one `nestbox up` with real VMs, pointed at it the way the docs tell
//! users to (`E2B_API_URL`, `E2B_API_KEY`, `E2B_SANDBOX_URL`).
//!
//! The SDKs are installed by `make sdk-deps` (part of `make test`): a virtualenv in
//! `target/sdk-venv` (or `NESTBOX_SDK_VENV`) and `sdk-tests/js/node_modules`, both pinned.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{Internet, Nestbox, other_team_key};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn venv() -> PathBuf {
    let venv = std::env::var_os("NESTBOX_SDK_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("target/sdk-venv"));
    assert!(
        venv.join("bin/pytest").exists(),
        "E2B's Python SDK is not installed in {}: run `make sdk-deps` (or set NESTBOX_SDK_VENV)",
        venv.display()
    );
    venv
}

fn js_dir() -> PathBuf {
    let dir = workspace().join("sdk-tests/js");
    assert!(
        dir.join("node_modules/e2b").exists(),
        "E2B's JavaScript SDK is not installed in {}: run `make sdk-deps`",
        dir.display()
    );
    dir
}

/// Runs one suite; returns its combined output and whether it passed.
fn suite(mut cmd: Command, nb: &Nestbox, other_key: &str, net: &Internet) -> (String, bool) {
    let out = cmd
        .env("NESTBOX_TEST_IP_ALLOWED", net.ip(10))
        .env("NESTBOX_TEST_IP_OTHER", net.ip(20))
        .env("NESTBOX_TEST_IP_OPEN", net.ip(40))
        .env("E2B_API_URL", &nb.url)
        .env("E2B_API_KEY", &nb.api_key)
        .env("E2B_SANDBOX_URL", &nb.url)
        .env("NESTBOX_OTHER_API_KEY", other_key)
        .env_remove("E2B_DOMAIN")
        .env_remove("E2B_DEBUG")
        .output()
        .expect("starting the suite");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (text, out.status.success())
}

#[tokio::test(flavor = "multi_thread")]
async fn e2b_sdks_work_unmodified() {
    let venv = venv();
    let js = js_dir();
    // The suites' egress tests reach a test internet; the host resolves names with its DNS
    // server.
    let net = Internet::new(
        "203.0.113.128/25",
        &[10, 20, 40],
        &[("allowed.test", 10), ("other.test", 20)],
    );
    let nb = Nestbox::up_env(&[("NESTBOX_DNS", &net.dns())]);
    let other_key = other_team_key(&nb, "e2b-other@example.com").await;

    let mut py = Command::new(venv.join("bin/pytest"));
    py.arg("-q")
        .arg("-p")
        .arg("no:cacheprovider")
        .arg(workspace().join("sdk-tests/python"));
    let (py_out, py_ok) = tokio::task::block_in_place(|| suite(py, &nb, &other_key, &net));
    println!("--- E2B Python SDK suite ---\n{py_out}");

    let mut node = Command::new("node");
    node.current_dir(&js)
        .args(["--test", "--test-concurrency=1", "--test-reporter=spec"])
        .arg("e2b-sdk.test.mjs");
    let (js_out, js_ok) = tokio::task::block_in_place(|| suite(node, &nb, &other_key, &net));
    println!("--- E2B JavaScript SDK suite ---\n{js_out}");

    assert!(
        py_ok && js_ok,
        "E2B SDK suites failed (python ok: {py_ok}, javascript ok: {js_ok}); warnings and errors:\n{}\nlog tail:\n{}",
        nb.log_problems(),
        nb.log_tail()
    );
}
