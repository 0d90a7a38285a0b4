//! Embeds the dashboard's build (`web/build`, or `NESTBOX_WEB_DIST`): writes a table of
//! every file with its `.br` and `.gz` variants, included with `include_bytes!`. Without a
//! build (no `npm run build` yet), the table holds one page saying how to make one, so the
//! workspace still compiles.

// A build script reports a failure by panicking, with what went wrong.
#![allow(clippy::expect_used)]

use std::fmt::Write as _;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::{Path, PathBuf};

fn main() {
    println!("cargo:rerun-if-env-changed=NESTBOX_WEB_DIST");
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let dist = std::env::var_os("NESTBOX_WEB_DIST")
        .map(PathBuf::from)
        .unwrap_or_else(|| manifest.join("../../web/build"));
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("set by cargo"));
    // Rebuilt when the build appears, changes or goes away.
    println!("cargo:rerun-if-changed={}", dist.display());

    let mut files = Vec::new();
    if dist.join("index.html").is_file() {
        walk(&dist, &dist, &mut files);
    } else {
        let page = out.join("missing.html");
        std::fs::write(&page, MISSING).expect("writing the placeholder page");
        files.push(("/index.html".to_string(), page));
    }
    files.sort();

    let mut table = String::from("&[\n");
    for (path, file) in &files {
        let body = std::fs::read(file).expect("reading a dashboard file");
        let mut h = DefaultHasher::new();
        body.hash(&mut h);
        let variant = |ext: &str| {
            let mut name = file.clone().into_os_string();
            name.push(ext);
            let p = PathBuf::from(name);
            if p.is_file() {
                format!("Some(include_bytes!({:?}))", p.display().to_string())
            } else {
                "None".to_string()
            }
        };
        let _ = writeln!(
            table,
            "    Asset {{ path: {path:?}, body: include_bytes!({:?}), brotli: {}, gzip: {}, content_type: {:?}, etag: \"W/\\\"{:016x}\\\"\", immutable: {} }},",
            file.display().to_string(),
            variant(".br"),
            variant(".gz"),
            content_type(path),
            h.finish(),
            path.starts_with("/_app/immutable/"),
        );
    }
    table.push(']');
    let built = !files.iter().any(|(_, f)| f.starts_with(&out));
    std::fs::write(
        out.join("assets.rs"),
        format!("/// Every file of the build.\npub static ASSETS: &[Asset] = {table};\n/// Whether a real build was embedded.\npub const BUILT: bool = {built};\n"),
    )
    .expect("writing the asset table");
}

fn walk(root: &Path, dir: &Path, files: &mut Vec<(String, PathBuf)>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            walk(root, &path, files);
            continue;
        }
        let name = path.to_string_lossy();
        if name.ends_with(".br") || name.ends_with(".gz") {
            continue;
        }
        let rel = path
            .strip_prefix(root)
            .expect("under the root")
            .to_string_lossy()
            .replace('\\', "/");
        files.push((format!("/{rel}"), path));
    }
}

fn content_type(path: &str) -> &'static str {
    let ext = path.rsplit_once('.').map_or("", |(_, e)| e);
    match ext {
        "html" => "text/html; charset=utf-8",
        "js" | "mjs" => "text/javascript; charset=utf-8",
        "css" => "text/css; charset=utf-8",
        "json" | "map" => "application/json",
        "svg" => "image/svg+xml",
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "ico" => "image/x-icon",
        "woff2" => "font/woff2",
        "woff" => "font/woff",
        "txt" => "text/plain; charset=utf-8",
        "webmanifest" => "application/manifest+json",
        _ => "application/octet-stream",
    }
}

const MISSING: &str = "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>Nestbox</title></head>\
<body style=\"font-family:system-ui;max-width:40rem;margin:4rem auto;padding:0 1rem\">\
<h1>The dashboard is not in this build</h1>\
<p>This <code>nestbox</code> binary was compiled without the web dashboard. Build it with \
<code>make web</code> (or <code>npm ci &amp;&amp; npm run build</code> in <code>web/</code>) and compile again; \
<code>make up</code> does both.</p><p>The API is here all the same: <a href=\"/openapi.json\">/openapi.json</a>.</p></body></html>";
