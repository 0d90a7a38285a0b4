//! The registry client against a registry served by the test: token and basic
//! authentication, indexes, digests and the blob cache. (The real thing — Debian's
//! `docker-registry` with images pushed by `skopeo` — is driven by the CLI's end-to-end
//! template build tests.)
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::io::Write;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use nestbox_oci::{
    AccessPolicy, BlobCache, Credentials, Limits, OciError, Reference, Registry, apply_layers,
};
use sha2::{Digest, Sha256};

fn digest(b: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(b)))
}

#[derive(Clone, Copy, PartialEq)]
enum Auth {
    Bearer,
    Basic,
}

#[derive(Default)]
struct Store {
    blobs: HashMap<String, Vec<u8>>,
    manifests: HashMap<String, (String, Vec<u8>)>,
    blob_gets: usize,
}

#[derive(Clone)]
struct Fake {
    auth: Auth,
    base: String,
    store: Arc<Mutex<Store>>,
}

const TOKEN: &str = "tok-123";

fn authorized(fake: &Fake, headers: &HeaderMap) -> bool {
    let got = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    match fake.auth {
        Auth::Bearer => got == format!("Bearer {TOKEN}"),
        Auth::Basic => got == basic("alice", "s3cret"),
    }
}

fn basic(user: &str, pass: &str) -> String {
    use base64::Engine as _;
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"))
    )
}

fn challenge(fake: &Fake) -> Response {
    let value = match fake.auth {
        Auth::Bearer => format!(
            r#"Bearer realm="{}/token",service="fake",scope="repository:team/app:pull""#,
            fake.base
        ),
        Auth::Basic => r#"Basic realm="fake""#.to_string(),
    };
    (
        StatusCode::UNAUTHORIZED,
        [(header::WWW_AUTHENTICATE, value)],
    )
        .into_response()
}

async fn token(
    State(_fake): State<Fake>,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    let creds = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    if creds != basic("alice", "s3cret")
        || q.get("scope").map(String::as_str) != Some("repository:team/app:pull")
    {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    axum::Json(serde_json::json!({ "token": TOKEN })).into_response()
}

async fn manifest(
    State(fake): State<Fake>,
    Path((_a, _b, reference)): Path<(String, String, String)>,
    headers: HeaderMap,
) -> Response {
    if !authorized(&fake, &headers) {
        return challenge(&fake);
    }
    let store = fake.store.lock().unwrap();
    match store.manifests.get(&reference) {
        Some((ct, body)) => ([(header::CONTENT_TYPE, ct.clone())], body.clone()).into_response(),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

async fn blob(
    State(fake): State<Fake>,
    Path((_a, _b, d)): Path<(String, String, String)>,
    headers: HeaderMap,
) -> Response {
    if !authorized(&fake, &headers) {
        return challenge(&fake);
    }
    let mut store = fake.store.lock().unwrap();
    store.blob_gets += 1;
    match store.blobs.get(&d) {
        Some(b) => b.clone().into_response(),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

fn layer(files: &[(&str, &str)]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (path, body) in files {
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_700_000_000);
        h.set_size(body.len() as u64);
        b.append_data(&mut h, path, body.as_bytes()).unwrap();
    }
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&b.into_inner().unwrap()).unwrap();
    gz.finish().unwrap()
}

/// Serves an image (behind an index) as `team/app:v1`.
async fn serve(auth: Auth) -> (Fake, String) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let authority = listener.local_addr().unwrap().to_string();
    let fake = Fake {
        auth,
        base: format!("http://{authority}"),
        store: Arc::default(),
    };
    {
        let mut s = fake.store.lock().unwrap();
        let l1 = layer(&[("etc/hello", "one"), ("etc/bye", "gone soon")]);
        let l2 = layer(&[("etc/.wh.bye", ""), ("etc/new", "two")]);
        let config = serde_json::to_vec(&serde_json::json!({
            "architecture": "amd64", "os": "linux",
            "config": {"Env": ["GREETING=hi", "PATH=/bin"], "WorkingDir": "/srv", "User": "app",
                       "Entrypoint": ["/bin/sh", "-c"], "Cmd": ["serve"]}
        }))
        .unwrap();
        let manifest = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": digest(&config), "size": config.len()},
            "layers": [
                {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": digest(&l1), "size": l1.len()},
                {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": digest(&l2), "size": l2.len()},
            ]
        }))
        .unwrap();
        let index = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "manifests": [
                {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": format!("sha256:{}", "0".repeat(64)), "size": 10,
                 "platform": {"architecture": "arm64", "os": "linux"}},
                {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": digest(&manifest), "size": manifest.len(),
                 "platform": {"architecture": "amd64", "os": "linux"}},
            ]
        }))
        .unwrap();
        for b in [l1, l2, config] {
            s.blobs.insert(digest(&b), b);
        }
        let oci_manifest = "application/vnd.oci.image.manifest.v1+json".to_string();
        s.manifests
            .insert(digest(&manifest), (oci_manifest, manifest));
        s.manifests.insert(
            "v1".into(),
            ("application/vnd.oci.image.index.v1+json".into(), index),
        );
    }
    let app = Router::new()
        .route("/token", get(token))
        .route("/v2/{a}/{b}/manifests/{reference}", get(manifest))
        .route("/v2/{a}/{b}/blobs/{digest}", get(blob))
        .with_state(fake.clone());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (fake, authority)
}

fn alice() -> Option<Credentials> {
    Some(Credentials {
        username: "alice".into(),
        password: "s3cret".into(),
    })
}

fn registry(authority: &str, creds: Option<Credentials>) -> Registry {
    Registry::new(
        Reference::parse(&format!("{authority}/team/app:v1")).unwrap(),
        creds,
        AccessPolicy {
            insecure: vec![authority.to_string()],
        },
    )
    .unwrap()
}

#[tokio::test]
async fn a_token_protected_image_is_resolved_fetched_once_and_unpacked() {
    let (fake, authority) = serve(Auth::Bearer).await;
    let reg = registry(&authority, alice());
    let image = reg.resolve().await.unwrap();
    assert_eq!(image.manifest.layers.len(), 2);
    assert!(image.reference.to_string().ends_with(&image.digest));
    let run = image.config.config.clone().unwrap();
    assert_eq!(run.env_pairs()["GREETING"], "hi");
    assert_eq!(run.argv(), ["/bin/sh", "-c", "serve"]);

    let work = tempfile::tempdir().unwrap();
    let cache = BlobCache::new(work.path().join("blobs")).unwrap();
    let files = cache.fetch_layers(&reg, &image).await.unwrap();
    let tree = work.path().join("tree");
    std::fs::create_dir(&tree).unwrap();
    apply_layers(&tree, &files, &Limits::default()).unwrap();
    assert_eq!(
        std::fs::read_to_string(tree.join("etc/hello")).unwrap(),
        "one"
    );
    assert_eq!(
        std::fs::read_to_string(tree.join("etc/new")).unwrap(),
        "two"
    );
    assert!(!tree.join("etc/bye").exists());

    // A second pull of the same image fetches no layer again.
    let before = fake.store.lock().unwrap().blob_gets;
    let again = registry(&authority, alice());
    let image = again.resolve().await.unwrap();
    cache.fetch_layers(&again, &image).await.unwrap();
    assert_eq!(
        fake.store.lock().unwrap().blob_gets,
        before + 1,
        "only the config again"
    );
}

#[tokio::test]
async fn credentials_are_required_and_checked() {
    let (_fake, authority) = serve(Auth::Bearer).await;
    let err = registry(&authority, None).resolve().await.unwrap_err();
    assert!(matches!(err, OciError::Unauthorized { .. }), "{err}");
    assert!(err.to_string().contains("needs credentials"), "{err}");
    let wrong = Some(Credentials {
        username: "alice".into(),
        password: "nope".into(),
    });
    let err = registry(&authority, wrong).resolve().await.unwrap_err();
    assert!(err.to_string().contains("refused the credentials"), "{err}");

    let (_fake, authority) = serve(Auth::Basic).await;
    registry(&authority, alice()).resolve().await.unwrap();
    let err = registry(&authority, None).resolve().await.unwrap_err();
    assert!(matches!(err, OciError::Unauthorized { .. }), "{err}");
}

#[tokio::test]
async fn tampered_content_and_missing_images_are_refused() {
    let (fake, authority) = serve(Auth::Basic).await;
    // A layer whose bytes no longer match its digest.
    let reg = registry(&authority, alice());
    let image = reg.resolve().await.unwrap();
    {
        let mut s = fake.store.lock().unwrap();
        let d = &image.manifest.layers[0].digest;
        let blob = s.blobs.get_mut(d).unwrap();
        let last = blob.len() - 1;
        blob[last] ^= 0xff;
    }
    let work = tempfile::tempdir().unwrap();
    let cache = BlobCache::new(work.path()).unwrap();
    let err = cache.fetch_layers(&reg, &image).await.unwrap_err();
    assert!(matches!(err, OciError::Digest { .. }), "{err}");
    // Nothing half-written stays in the cache.
    let left: Vec<_> = std::fs::read_dir(work.path().join("sha256"))
        .unwrap()
        .collect();
    assert!(left.is_empty(), "{left:?}");

    let missing = Registry::new(
        Reference::parse(&format!("{authority}/team/app:v2")).unwrap(),
        alice(),
        AccessPolicy {
            insecure: vec![authority.clone()],
        },
    )
    .unwrap();
    assert!(matches!(
        missing.resolve().await.unwrap_err(),
        OciError::NotFound { .. }
    ));
}

#[tokio::test]
async fn a_registry_not_listed_as_insecure_is_not_reached_over_http_or_loopback() {
    let (_fake, authority) = serve(Auth::Basic).await;
    let err = Registry::new(
        Reference::parse(&format!("{authority}/team/app:v1")).unwrap(),
        alice(),
        AccessPolicy::default(),
    )
    .unwrap_err();
    assert!(matches!(err, OciError::Refused { .. }), "{err}");
    // A name that resolves to loopback is refused at resolution.
    let port = authority.rsplit(':').next().unwrap();
    let reg = Registry::new(
        Reference::parse(&format!("localhost:{port}/team/app:v1")).unwrap(),
        alice(),
        AccessPolicy { insecure: vec![] },
    )
    .unwrap();
    let err = reg.resolve().await.unwrap_err();
    assert!(matches!(err, OciError::Http { .. }), "{err}");
}
