//! The public listener over HTTPS with a wildcard certificate, and E2B's SDKs in their
//! default mode (no `E2B_API_URL`, no `E2B_SANDBOX_URL`: `https://api.{domain}` and
//! `https://{port}-{sandboxID}.{domain}`), run as clients "on the internet": in a network
//! namespace whose DNS server answers the domain with the control plane's address.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};

use common::{Internet, Nestbox, Options, workspace};

const DOMAIN: &str = "sandboxes.test";

/// A CA and a certificate it issued for `*.{DOMAIN}` and `{DOMAIN}`, as PEM files in `dir`:
/// `ca.pem`, `cert.pem` (the chain), `key.pem`.
fn certificates(dir: &Path) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "Nestbox test CA");
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec![format!("*.{DOMAIN}"), DOMAIN.to_string()])
        .unwrap()
        .signed_by(&key, &ca)
        .unwrap();
    std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
    std::fs::write(dir.join("cert.pem"), format!("{}{}", cert.pem(), ca.pem())).unwrap();
    std::fs::write(dir.join("key.pem"), key.serialize_pem()).unwrap();
}

fn run(mut cmd: std::process::Command, what: &str) {
    let out = cmd.output().expect("starting the client");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && text.contains("DONE"),
        "{what} failed:\n{text}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn e2b_sdks_reach_sandboxes_by_host_name_over_https() {
    let venv = std::env::var_os("NESTBOX_SDK_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("target/sdk-venv"));
    let js = workspace().join("sdk-tests/js");
    assert!(
        venv.join("bin/python").exists() && js.join("node_modules/e2b").exists(),
        "E2B's SDKs are not installed: run `make sdk-deps`"
    );
    // The control plane's address is the first of the block; every name of the domain
    // points at it.
    let net = Internet::new("198.51.100.128/25", &[], &[("*.sandboxes.test", 1)]);
    let certs = tempfile::tempdir().unwrap();
    certificates(certs.path());
    let nb = Nestbox::up_with(Options {
        env: vec![
            ("NESTBOX_PROXY_DOMAIN".into(), DOMAIN.into()),
            (
                "NESTBOX_TLS_CERT".into(),
                certs.path().join("cert.pem").display().to_string(),
            ),
            (
                "NESTBOX_TLS_KEY".into(),
                certs.path().join("key.pem").display().to_string(),
            ),
        ],
        listen: Some(format!("{}:443", net.ip(1))),
        https: true,
        ..Default::default()
    });
    assert!(nb.url.starts_with("https://"), "{}", nb.url);

    // Plain HTTP is not served; HTTPS is, with the operator's certificate.
    let plain = reqwest::Client::new()
        .get(format!("http://{}:443/health", net.ip(1)))
        .timeout(std::time::Duration::from_secs(10))
        .send()
        .await;
    assert!(
        plain.is_err() || !plain.as_ref().unwrap().status().is_success(),
        "{plain:?}"
    );
    let ca = reqwest::Certificate::from_pem(&std::fs::read(certs.path().join("ca.pem")).unwrap())
        .unwrap();
    let https = reqwest::Client::builder()
        .add_root_certificate(ca)
        .resolve(
            &format!("api.{DOMAIN}"),
            format!("{}:443", net.ip(1)).parse().unwrap(),
        )
        .build()
        .unwrap();
    let health = https
        .get(format!("https://api.{DOMAIN}/health"))
        .send()
        .await
        .unwrap();
    assert!(health.status().is_success(), "{health:?}");
    // Create answers name the domain the SDKs build host names from.
    let created: serde_json::Value = https
        .post(format!("https://api.{DOMAIN}/sandboxes"))
        .header("x-api-key", &nb.api_key)
        .json(&serde_json::json!({"templateID": "base"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(created["domain"], DOMAIN, "{created}");
    https
        .delete(format!(
            "https://api.{DOMAIN}/sandboxes/{}",
            created["sandboxID"].as_str().unwrap()
        ))
        .header("x-api-key", &nb.api_key)
        .send()
        .await
        .unwrap();

    let env = |cmd: &mut std::process::Command| {
        cmd.env("E2B_DOMAIN", DOMAIN)
            .env("E2B_API_KEY", &nb.api_key)
            .env_remove("E2B_API_URL")
            .env_remove("E2B_SANDBOX_URL")
            .env_remove("E2B_DEBUG");
    };
    let mut py = net.command(venv.join("bin/python"));
    py.arg(workspace().join("sdk-tests/python/domain_smoke.py"))
        .env("SSL_CERT_FILE", certs.path().join("ca.pem"));
    env(&mut py);
    tokio::task::block_in_place(|| run(py, "the Python SDK"));

    let mut node = net.command("node");
    node.current_dir(&js)
        .arg("domain-smoke.mjs")
        .env("NODE_EXTRA_CA_CERTS", certs.path().join("ca.pem"));
    env(&mut node);
    tokio::task::block_in_place(|| run(node, "the JavaScript SDK"));
}
