//! E2B's stock SDKs, unmodified, against a real installation: the Python suite
//! (`sdk-tests/python`, pytest) and the JavaScript suite (`sdk-tests/js`, node's test
//! runner) run against one `nestbox up` with real VMs, pointed at it the way the docs tell
//! users to (`E2B_API_URL`, `E2B_API_KEY`, `E2B_SANDBOX_URL`).
//!
//! The SDKs are installed by `make sdk-deps` (part of `make test`): a virtualenv in
//! `target/sdk-venv` (or `NESTBOX_SDK_VENV`) and `sdk-tests/js/node_modules`, both pinned.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Command;

use common::{Internet, Nestbox, other_team_key, run_sdk_suite, sdk_js_dir, sdk_venv, workspace};

/// Runs one suite with the variables its egress and isolation tests need.
fn suite(mut cmd: Command, nb: &Nestbox, other_key: &str, net: &Internet) -> (String, bool) {
    cmd.env("NESTBOX_TEST_IP_ALLOWED", net.ip(10))
        .env("NESTBOX_TEST_IP_OTHER", net.ip(20))
        .env("NESTBOX_TEST_IP_OPEN", net.ip(40))
        .env("NESTBOX_OTHER_API_KEY", other_key);
    run_sdk_suite(cmd, nb)
}

#[tokio::test(flavor = "multi_thread")]
async fn e2b_sdks_work_unmodified() {
    let venv = sdk_venv();
    let js = sdk_js_dir();
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
        .arg(workspace().join("sdk-tests/python/test_e2b_sdk.py"));
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
