//! schemathesis (from PyPI, pinned in `tests/requirements-tools.txt`) over the whole
//! OpenAPI document against a real `nestbox up`, with real VMs, with every check it has:
//! no server error (`500`; a guest or host agent that does not answer is a documented
//! `502`), every response as the document says (status codes, content types, bodies,
//! headers), missing credentials refused as documented, requests the schema forbids
//! refused, and requests it allows accepted — except where the answer depends on state or
//! on the installation's limits, which `tests/schemathesis.toml` lists (there `400` is a
//! documented answer). Needs `make tool-deps` (or `NESTBOX_TOOLS_VENV`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::PathBuf;

use common::{Nestbox, assert_instance_clean};

/// The checks that must pass: all of them.
const CHECKS: &str = "all";

#[test]
fn the_api_answers_as_its_openapi_document_says() {
    let venv = std::env::var_os("NESTBOX_TOOLS_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/tools-venv")
        });
    let st = venv.join("bin/st");
    assert!(
        st.exists(),
        "schemathesis is not installed in {}: run `make tool-deps` (or set NESTBOX_TOOLS_VENV)",
        venv.display()
    );
    let mut nb = Nestbox::up();
    let config = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/schemathesis.toml");
    let out = std::process::Command::new(&st)
        // Its cache goes with the instance.
        .current_dir(nb.dir.path())
        .arg("--config-file")
        .arg(&config)
        .arg("run")
        .arg(format!("{}/openapi.json", nb.url))
        .args(["-H", &format!("X-API-Key: {}", nb.api_key)])
        .args(["--checks", CHECKS])
        // A fixed seed: the same cases every run (the failures it finds reproduce).
        .args([
            "--seed",
            "1",
            "--max-examples",
            "3",
            "--request-timeout",
            "120",
        ])
        .args([
            "--no-color",
            "--exclude-path-regex",
            "/(exec/stream|terminals|watch)",
        ])
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    println!("{report}");
    assert!(
        out.status.success(),
        "schemathesis found failures:\n{report}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tag = nb.tag();
    nb.stop();
    assert_instance_clean(&tag);
}
