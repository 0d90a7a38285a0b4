//! The web dashboard's files, compiled into the binary.
//!
//! `build.rs` embeds `web/build` (made by `npm run build` in `web/`): every file with the
//! brotli and gzip variants the build wrote next to it, a content type, and an `ETag`.
//! This crate only holds and finds them; the control plane serves them (see its `dashboard`
//! module). Invariants: paths start with `/`; files under `/_app/immutable/` are named by
//! their content and never change; `/index.html` is always present (a page saying how to
//! build the dashboard when the binary was compiled without it).

/// One file of the dashboard.
#[derive(Debug)]
pub struct Asset {
    /// Its path, from `/`.
    pub path: &'static str,
    /// Its bytes.
    pub body: &'static [u8],
    /// Brotli-compressed, if that is smaller.
    pub brotli: Option<&'static [u8]>,
    /// Gzip-compressed, if that is smaller.
    pub gzip: Option<&'static [u8]>,
    /// `Content-Type`.
    pub content_type: &'static str,
    /// `ETag`: a weak validator (the same for every encoding of the file).
    pub etag: &'static str,
    /// Named by its content: cacheable for good.
    pub immutable: bool,
}

include!(concat!(env!("OUT_DIR"), "/assets.rs"));

/// The file at `path` (`/_app/…`, `/favicon.svg`), if the build has one.
pub fn get(path: &str) -> Option<&'static Asset> {
    ASSETS
        .binary_search_by(|a| a.path.cmp(path))
        .ok()
        .map(|i| &ASSETS[i])
}

/// The page every dashboard route is served with.
pub fn index() -> &'static Asset {
    get("/index.html").unwrap_or(&ASSETS[0])
}

/// Whether the binary holds a real build of the dashboard.
pub fn built() -> bool {
    BUILT
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_is_sorted_and_has_an_index() {
        assert!(ASSETS.windows(2).all(|w| w[0].path < w[1].path));
        assert!(index().content_type.starts_with("text/html"));
        assert!(get("/index.html").is_some());
        assert!(get("/nope").is_none());
    }
}
