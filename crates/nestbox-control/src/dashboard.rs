//! Serves the web dashboard (`nestbox_web`) next to the API, from the same origin.
//!
//! - Dashboard routes (`/`, `/login`, `/dashboard/…`, `/admin/…`, `/docs`) all get the
//!   single page (`index.html`); the page routes itself in the browser. Its files live
//!   under `/_app/`. Nothing here collides with the API (`/v1/…`) or E2B's paths.
//! - Files are served as built: brotli or gzip when the client accepts it (the build
//!   compressed them once), with an `ETag` (`304` when it matches); files named by their
//!   content are cacheable for a year, the page itself is revalidated every time.
//! - The page carries its script policy (a `Content-Security-Policy` meta tag with the
//!   hash of its one inline script); every answer here adds what a meta tag cannot say:
//!   no framing by other sites, no MIME sniffing, no referrer to other origins.
//! - An unknown file under `/_app/` is our JSON `404`, never the page.

use axum::Router;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use nestbox_types::ErrorCode;
use nestbox_web::Asset;

use crate::error::ApiError;
use crate::state::AppState;

/// The dashboard's routes.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/", get(page))
        .route("/login", get(page))
        .route("/docs", get(page))
        .route("/dashboard", get(page))
        .route("/dashboard/{*rest}", get(page))
        .route("/admin", get(page))
        .route("/admin/{*rest}", get(page))
        .route("/_app/{*rest}", get(file))
        .route("/favicon.svg", get(file))
        .route("/robots.txt", get(file))
}

/// The single page, for every dashboard route.
async fn page(headers: HeaderMap) -> Response {
    serve(nestbox_web::index(), &headers)
}

/// One of the page's files.
async fn file(uri: axum::http::Uri, headers: HeaderMap) -> Response {
    match nestbox_web::get(uri.path()) {
        Some(asset) => serve(asset, &headers),
        None => ApiError::new(ErrorCode::NotFound, "no such file").into_response(),
    }
}

/// Which encoding to send: brotli, else gzip, else none (`q=0` refuses one).
fn encoding(headers: &HeaderMap, asset: &Asset) -> Option<(&'static str, &'static [u8])> {
    let accepted = headers
        .get(header::ACCEPT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let accepts = |name: &str| {
        accepted.split(',').any(|part| {
            let mut it = part.split(';').map(str::trim);
            let coding = it.next().unwrap_or_default();
            let refused = it.any(|p| {
                p.strip_prefix("q=")
                    .and_then(|q| q.parse::<f32>().ok())
                    .is_some_and(|q| q == 0.0)
            });
            coding.eq_ignore_ascii_case(name) && !refused
        })
    };
    if let Some(br) = asset.brotli.filter(|_| accepts("br")) {
        return Some(("br", br));
    }
    asset
        .gzip
        .filter(|_| accepts("gzip"))
        .map(|gz| ("gzip", gz))
}

fn serve(asset: &'static Asset, headers: &HeaderMap) -> Response {
    let mut out = HeaderMap::new();
    out.insert(header::ETAG, HeaderValue::from_static(asset.etag));
    out.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static(if asset.immutable {
            "public, max-age=31536000, immutable"
        } else {
            "no-cache"
        }),
    );
    out.insert(header::VARY, HeaderValue::from_static("accept-encoding"));
    out.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    out.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    out.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("frame-ancestors 'none'"),
    );
    out.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    let fresh = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(',')
                .any(|t| t.trim() == asset.etag || t.trim() == "*")
        });
    if fresh {
        return (StatusCode::NOT_MODIFIED, out).into_response();
    }
    out.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(asset.content_type),
    );
    let body = match encoding(headers, asset) {
        Some((name, bytes)) => {
            out.insert(header::CONTENT_ENCODING, HeaderValue::from_static(name));
            bytes
        }
        None => asset.body,
    };
    (StatusCode::OK, out, body).into_response()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    static ASSET: Asset = Asset {
        path: "/x.js",
        body: b"plain",
        brotli: Some(b"br"),
        gzip: Some(b"gz"),
        content_type: "text/javascript",
        etag: "\"1\"",
        immutable: true,
    };

    fn accept(v: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::ACCEPT_ENCODING, HeaderValue::from_str(v).unwrap());
        h
    }

    #[test]
    fn picks_the_best_accepted_encoding() {
        assert_eq!(
            encoding(&accept("gzip, deflate, br"), &ASSET).unwrap().0,
            "br"
        );
        assert_eq!(encoding(&accept("gzip"), &ASSET).unwrap().0, "gzip");
        assert_eq!(encoding(&accept("br;q=0, gzip"), &ASSET).unwrap().0, "gzip");
        assert!(encoding(&accept("identity"), &ASSET).is_none());
        assert!(encoding(&HeaderMap::new(), &ASSET).is_none());
    }

    #[test]
    fn a_matching_etag_is_not_modified() {
        let mut h = HeaderMap::new();
        h.insert(header::IF_NONE_MATCH, HeaderValue::from_static("\"1\""));
        assert_eq!(serve(&ASSET, &h).status(), StatusCode::NOT_MODIFIED);
        let r = serve(&ASSET, &accept("br"));
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(r.headers()[header::CONTENT_ENCODING], "br");
        assert_eq!(
            r.headers()[header::CACHE_CONTROL],
            "public, max-age=31536000, immutable"
        );
    }
}
