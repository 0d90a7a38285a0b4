//! The README's curl walk-through, run as written against a real installation.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::Nestbox;

/// The first ```sh block after the "walk-through with curl" heading.
fn curl_walkthrough() -> String {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md")).unwrap();
    let section = readme
        .split("## A walk-through with curl")
        .nth(1)
        .expect("the README has a curl walk-through");
    let block = section
        .split("```sh\n")
        .nth(1)
        .unwrap()
        .split("```")
        .next()
        .unwrap();
    block.to_string()
}

#[test]
fn readme_curl_walkthrough_works() {
    let nb = Nestbox::up();
    let work = tempfile::tempdir().unwrap();
    std::fs::write(work.path().join("data.csv"), "a,b\n1,2\n").unwrap();
    let script = curl_walkthrough().replace("/var/lib/nestbox", nb.data_dir().to_str().unwrap());
    // Tests run as root, where `sudo` may not be installed.
    let script = format!("set -euo pipefail\nsudo() {{ \"$@\"; }}\n{script}");
    let out = std::process::Command::new("bash")
        .arg("-c")
        .arg(&script)
        .current_dir(work.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "the walk-through failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    assert!(
        stdout.contains("\"status\":\"running\""),
        "create answered: {stdout}"
    );
    assert!(
        stdout.contains("HI\\n"),
        "exec ran with the sandbox's env: {stdout}"
    );
    assert!(
        stdout.contains("event: exit"),
        "the stream ended with an exit event: {stdout}"
    );
    assert_eq!(
        std::fs::read_to_string(work.path().join("copy.csv")).unwrap(),
        "a,b\n1,2\n"
    );
    assert!(
        stdout.contains("/home/user/data.csv"),
        "the listing shows the upload: {stdout}"
    );
    // The walk-through destroyed its sandbox.
    let client = nb.client();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let left = rt.block_on(
        client.list_sandboxes(&nestbox_types::api::SandboxListQuery {
            status: Some("running".into()),
            ..Default::default()
        }),
    );
    assert!(
        left.unwrap().items.is_empty(),
        "the walk-through's sandbox is destroyed"
    );
}
