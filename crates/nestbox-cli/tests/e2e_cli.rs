//! The README's CLI walk-through against a real installation.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::Nestbox;

fn ok(out: &std::process::Output) -> String {
    assert!(
        out.status.success(),
        "status {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn cli_walkthrough() {
    let nb = Nestbox::up();
    let id = ok(&nb.cli(&["sandbox", "create", "-q", "-m", "app=cli"]))
        .trim()
        .to_string();
    assert!(id.starts_with("sb-"), "{id}");

    let list = ok(&nb.cli(&["sandbox", "list", "-m", "app=cli"]));
    assert!(list.contains(&id) && list.contains("running"), "{list}");

    assert_eq!(
        ok(&nb.cli(&["sandbox", "exec", &id, "--sh", "echo hello | tr a-z A-Z"])).trim(),
        "HELLO"
    );
    assert_eq!(
        ok(&nb.cli(&["sandbox", "exec", &id, "--", "uname", "-s"])).trim(),
        "Linux"
    );
    let failing = nb.cli(&["sandbox", "exec", &id, "--sh", "exit 4"]);
    assert_eq!(
        failing.status.code(),
        Some(4),
        "the exit code is passed through"
    );

    let dir = tempfile::tempdir().unwrap();
    let local = dir.path().join("in.txt");
    std::fs::write(&local, b"round trip\n").unwrap();
    ok(&nb.cli(&[
        "file",
        "cp",
        local.to_str().unwrap(),
        &format!("{id}:/tmp/in.txt"),
    ]));
    let back = dir.path().join("out.txt");
    ok(&nb.cli(&[
        "file",
        "cp",
        &format!("{id}:/tmp/in.txt"),
        back.to_str().unwrap(),
    ]));
    assert_eq!(std::fs::read(&back).unwrap(), b"round trip\n");
    let ls = ok(&nb.cli(&["file", "ls", &id, "/tmp"]));
    assert!(ls.contains("/tmp/in.txt"), "{ls}");

    let get = ok(&nb.cli(&["sandbox", "get", &id]));
    assert!(get.contains("\"status\": \"running\""), "{get}");
    ok(&nb.cli(&["sandbox", "rm", &id]));
    let get = ok(&nb.cli(&["sandbox", "get", &id]));
    assert!(get.contains("\"status\": \"stopped\""), "{get}");

    // Logging in with the first-run admin and using the session works too.
    let login = nb.cli(&[
        "login",
        "--email",
        &nb.admin_email,
        "--password",
        &nb.admin_password,
    ]);
    ok(&login);
    let templates = ok(&nb.cli(&["template", "list"]));
    assert!(templates.contains("minimal"), "{templates}");
}
