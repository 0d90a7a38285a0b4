//! schemathesis (from PyPI, pinned in `tests/requirements-tools.txt`) over the whole
//! OpenAPI document against a real `nestbox up`, with real VMs: no server error (`500`;
//! a guest or host agent that does not answer is a documented `502`, see
//! `tests/schemathesis.toml`), and every
//! response as the document says (status codes, content types, bodies, headers), missing
//! credentials refused as documented. Needs `make tool-deps` (or `NESTBOX_TOOLS_VENV`).
//!
//! Not asserted here: schemathesis's request-side checks (schema-valid requests the server
//! refuses, schema-invalid ones it accepts). They still find requests whose validity
//! depends on state the schema cannot state (an opaque paging cursor, a template's
//! minimum disk size, `start` after `end`); those are listed in docs/testing.md.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::PathBuf;

use common::{Nestbox, assert_instance_clean};

/// The checks that must pass.
const CHECKS: &str = "not_a_server_error,status_code_conformance,content_type_conformance,\
                      response_schema_conformance,response_headers_conformance,\
                      missing_required_header,ignored_auth,unsupported_method";

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
