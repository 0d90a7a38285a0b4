//! The `code-interpreter` template, built by the recipe system from its Dockerfile in
//! `templates/code-interpreter` (its Python wheels served to the build by a package host on
//! a test internet), then used by E2B's stock code-interpreter SDKs, unmodified: the Python
//! suite (`sdk-tests/python/test_code_interpreter.py`) and the JavaScript one
//! (`sdk-tests/js/code-interpreter.test.mjs`) run cells, keep state, get charts, data frames
//! and tracebacks, use contexts, environment variables and timeouts.
//!
//! The wheels are the template's pinned requirements, downloaded from PyPI by `make
//! code-interpreter-wheels` (part of `make test`) into `target/code-interpreter-wheels` (or
//! `NESTBOX_CODE_INTERPRETER_WHEELS`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use common::{Internet, Nestbox, run_sdk_suite, sdk_js_dir, sdk_venv, workspace};

fn wheels() -> PathBuf {
    let dir = std::env::var_os("NESTBOX_CODE_INTERPRETER_WHEELS")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("target/code-interpreter-wheels"));
    let count = std::fs::read_dir(&dir)
        .map(|d| d.filter_map(Result::ok).count())
        .unwrap_or(0);
    assert!(
        count > 0,
        "the code-interpreter template's wheels are not in {}: run `make code-interpreter-wheels`",
        dir.display()
    );
    dir
}

/// Runs one suite against the template the test built.
fn suite(mut cmd: Command, nb: &Nestbox) -> (String, bool) {
    cmd.env("NESTBOX_CODE_INTERPRETER_TEMPLATE", "code-interpreter");
    run_sdk_suite(cmd, nb)
}

#[tokio::test(flavor = "multi_thread")]
async fn the_code_interpreter_template_serves_the_stock_sdks() {
    let venv = sdk_venv();
    let js = sdk_js_dir();
    let wheels = wheels();
    let net = Internet::new("198.18.0.128/25", &[], &[]);
    let _wheels = net.serve_dir(&wheels, 8081);
    let nb = Nestbox::up_env(&[("NESTBOX_DNS", &net.dns())]);

    // Built from the shipped Dockerfile; pip takes the wheels from the package host only.
    let dockerfile = workspace().join("templates/code-interpreter/Dockerfile");
    let host = net.ip(2);
    let pip =
        format!("PIP_OPTIONS=--no-index --trusted-host {host} --find-links http://{host}:8081/");
    let began = Instant::now();
    let out = tokio::task::block_in_place(|| {
        nb.cli(&[
            "template",
            "build",
            dockerfile.to_str().unwrap(),
            "--name",
            "code-interpreter",
            "--build-arg",
            &pip,
        ])
    });
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "the code-interpreter template did not build:\n{log}\nlog tail:\n{}",
        nb.log_tail()
    );
    println!(
        "code-interpreter template built in {:.0} s",
        began.elapsed().as_secs_f64()
    );

    let mut py = Command::new(venv.join("bin/pytest"));
    py.args(["-q", "-s", "-p", "no:cacheprovider"])
        .arg(workspace().join("sdk-tests/python/test_code_interpreter.py"));
    let (py_out, py_ok) = tokio::task::block_in_place(|| suite(py, &nb));
    println!("--- E2B code-interpreter Python SDK suite ---\n{py_out}");

    let mut node = Command::new("node");
    node.current_dir(&js)
        .args(["--test", "--test-concurrency=1", "--test-reporter=spec"])
        .arg("code-interpreter.test.mjs");
    let (js_out, js_ok) = tokio::task::block_in_place(|| suite(node, &nb));
    println!("--- E2B code-interpreter JavaScript SDK suite ---\n{js_out}");

    // The benchmark script works (its numbers are printed, not judged).
    let mut bench = Command::new(venv.join("bin/python"));
    bench
        .arg(workspace().join("benches/code_interpreter.py"))
        .arg("2");
    let (bench_out, bench_ok) = tokio::task::block_in_place(|| suite(bench, &nb));
    println!("--- benches/code_interpreter.py ---\n{bench_out}");

    assert!(
        py_ok && js_ok && bench_ok,
        "code-interpreter suites failed (python ok: {py_ok}, javascript ok: {js_ok}, bench ok: {bench_ok}); warnings and errors:\n{}\nlog tail:\n{}",
        nb.log_problems(),
        nb.log_tail()
    );
}
