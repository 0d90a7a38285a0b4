//! Browser sessions: the cookie the web dashboard signs in with, and its CSRF rules.
//!
//! A browser signs in with `POST /v1/auth/session` and gets a random secret in an
//! HttpOnly, `SameSite=Strict` cookie that scripts cannot read; the database stores only
//! its SHA-256 (`nestbox_db::browser_sessions`), so signing out ends it for good. Over
//! HTTPS (the control plane's own TLS, or a proxy saying `X-Forwarded-Proto: https`) the
//! cookie is `__Host-nestbox_session`: `Secure`, and no other host of the domain (a
//! sandbox's port served as `P-S.{domain}`) can set one of that name. Invariants, enforced
//! by [`crate::extract::Caller`] for every request the cookie authenticates:
//! - a request that can change something (any method but `GET` and `HEAD`) carries the
//!   session's CSRF token in [`CSRF_HEADER`] — a token derived from the session
//!   (`Sessions::csrf_token`) that another site cannot read;
//! - a request with an `Origin` (every WebSocket handshake has one) comes from this
//!   server's own origin, so another site cannot open a terminal with the cookie;
//! - a request carrying two session cookies is refused, never guessed at (another host of
//!   the domain may have planted one);
//! - the cookie never authenticates a request to a sandbox's port and never reaches a
//!   sandbox: the proxy removes it first ([`strip_session_cookie`]);
//! - API keys and bearer tokens, when sent, win over the cookie.

use axum::http::{HeaderMap, HeaderValue, Method, header};

use crate::error::ApiError;

/// The session cookie's name over plain HTTP.
pub const COOKIE: &str = "nestbox_session";
/// Its name over HTTPS.
pub const SECURE_COOKIE: &str = "__Host-nestbox_session";
/// The header carrying a browser session's CSRF token.
pub const CSRF_HEADER: &str = "x-csrf-token";

/// The session secret in a request's cookies, if any: the HTTPS cookie when there is one,
/// else the plain one. Two cookies of the same name are refused.
pub fn session_secret(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let mut secure = Vec::new();
    let mut plain = Vec::new();
    for c in headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(cookie::Cookie::split_parse)
        .filter_map(Result::ok)
        .filter(|c| !c.value().is_empty())
    {
        match c.name() {
            SECURE_COOKIE => secure.push(c.value().to_owned()),
            COOKIE => plain.push(c.value().to_owned()),
            _ => {}
        }
    }
    let chosen = if secure.is_empty() { plain } else { secure };
    if chosen.len() > 1 {
        return Err(ApiError::unauthorized(
            "the request carries more than one session cookie (another site of this domain \
             may have set one): clear this site's cookies and sign in again",
        ));
    }
    Ok(chosen.into_iter().next())
}

/// Whether the browser reached us over HTTPS: our own TLS, or a reverse proxy's.
pub fn is_secure(tls: bool, headers: &HeaderMap) -> bool {
    tls || headers
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("https"))
}

/// `Set-Cookie` for a new session that lasts `max_age`.
pub fn session_cookie(secret: &str, max_age: std::time::Duration, secure: bool) -> String {
    let max_age = cookie::time::Duration::seconds(i64::try_from(max_age.as_secs()).unwrap_or(0));
    cookie::Cookie::build((if secure { SECURE_COOKIE } else { COOKIE }, secret))
        .path("/")
        .http_only(true)
        .same_site(cookie::SameSite::Strict)
        .secure(secure)
        .max_age(max_age)
        .build()
        .to_string()
}

/// `Set-Cookie`s that remove the session cookie (both names, as either may be held).
pub fn clearing_cookies() -> [String; 2] {
    let clear = |name: &'static str, secure: bool| {
        cookie::Cookie::build((name, ""))
            .path("/")
            .http_only(true)
            .same_site(cookie::SameSite::Strict)
            .secure(secure)
            .max_age(cookie::time::Duration::ZERO)
            .build()
            .to_string()
    };
    [clear(COOKIE, false), clear(SECURE_COOKIE, true)]
}

/// Whether a method can change something (and so needs the CSRF token).
pub fn is_unsafe(method: &Method) -> bool {
    !matches!(*method, Method::GET | Method::HEAD)
}

/// Whether the request's `Origin`, if it has one, is the host it was sent to (as the
/// client named it: `X-Forwarded-Host` behind a reverse proxy, else `Host`). A browser
/// page of another site can set neither header.
pub fn same_origin(headers: &HeaderMap) -> bool {
    let Some(origin) = headers.get(header::ORIGIN) else {
        return true;
    };
    let Some(origin) = origin.to_str().ok().and_then(authority_of) else {
        return false;
    };
    let host = headers
        .get("x-forwarded-host")
        .or_else(|| headers.get(header::HOST))
        .and_then(|v| v.to_str().ok())
        .map(str::trim);
    host.is_some_and(|h| h.eq_ignore_ascii_case(origin))
}

/// `host[:port]` of an origin (`scheme://host[:port]`); `None` for `null` and the like.
fn authority_of(origin: &str) -> Option<&str> {
    let (scheme, rest) = origin.split_once("://")?;
    if !matches!(scheme, "http" | "https") || rest.is_empty() || rest.contains('/') {
        return None;
    }
    Some(rest)
}

/// Removes the session cookies from a request's `Cookie` headers, keeping the others
/// (they may belong to an application inside a sandbox).
pub fn strip_session_cookie(headers: &mut HeaderMap) {
    let kept: Vec<String> = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .map(str::trim)
        .filter(|pair| {
            let name = pair.split_once('=').map_or(*pair, |(name, _)| name).trim();
            !pair.is_empty() && name != COOKIE && name != SECURE_COOKIE
        })
        .map(str::to_owned)
        .collect();
    headers.remove(header::COOKIE);
    if !kept.is_empty()
        && let Ok(v) = HeaderValue::from_str(&kept.join("; "))
    {
        headers.insert(header::COOKIE, v);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    fn secret(h: &HeaderMap) -> Option<String> {
        session_secret(h).unwrap()
    }

    #[test]
    fn the_secret_is_found_among_other_cookies() {
        let h = headers(&[("cookie", "a=1; nestbox_session=s3cret; b=2")]);
        assert_eq!(secret(&h).as_deref(), Some("s3cret"));
        let h = headers(&[("cookie", "a=1"), ("cookie", "nestbox_session=x")]);
        assert_eq!(secret(&h).as_deref(), Some("x"));
        assert_eq!(secret(&headers(&[("cookie", "nestbox_session=")])), None);
        assert_eq!(secret(&HeaderMap::new()), None);
    }

    #[test]
    fn the_https_cookie_wins_and_two_of_a_name_are_refused() {
        // Another host of the domain can plant a plain cookie, never a `__Host-` one.
        let h = headers(&[(
            "cookie",
            "nestbox_session=planted; __Host-nestbox_session=mine",
        )]);
        assert_eq!(secret(&h).as_deref(), Some("mine"));
        let h = headers(&[("cookie", "nestbox_session=planted; nestbox_session=mine")]);
        assert!(session_secret(&h).is_err());
        let h = headers(&[(
            "cookie",
            "__Host-nestbox_session=a; __Host-nestbox_session=b",
        )]);
        assert!(session_secret(&h).is_err());
    }

    #[test]
    fn the_cookie_is_http_only_and_strict() {
        let c = session_cookie("abc", std::time::Duration::from_secs(60), false);
        assert!(c.starts_with("nestbox_session=abc"), "{c}");
        for part in ["HttpOnly", "SameSite=Strict", "Path=/", "Max-Age=60"] {
            assert!(c.contains(part), "{c} lacks {part}");
        }
        assert!(!c.contains("Secure"), "{c}");
        let c = session_cookie("abc", std::time::Duration::from_secs(60), true);
        assert!(
            c.starts_with("__Host-nestbox_session=abc") && c.contains("Secure"),
            "{c}"
        );
        assert!(!c.contains("Domain"), "{c}");
        assert!(clearing_cookies().iter().all(|c| c.contains("Max-Age=0")));
        assert!(is_secure(
            false,
            &headers(&[("x-forwarded-proto", "https")])
        ));
        assert!(!is_secure(false, &HeaderMap::new()));
        assert!(is_unsafe(&Method::OPTIONS) && !is_unsafe(&Method::HEAD));
    }

    #[test]
    fn origins_must_match_the_host() {
        assert!(same_origin(&headers(&[("host", "a.test:8080")])));
        assert!(same_origin(&headers(&[
            ("host", "a.test:8080"),
            ("origin", "http://a.test:8080")
        ])));
        assert!(!same_origin(&headers(&[
            ("host", "a.test:8080"),
            ("origin", "http://evil.test")
        ])));
        assert!(!same_origin(&headers(&[
            ("host", "a.test"),
            ("origin", "null")
        ])));
        assert!(same_origin(&headers(&[
            ("host", "10.0.0.1"),
            ("x-forwarded-host", "nestbox.example.com"),
            ("origin", "https://nestbox.example.com")
        ])));
    }

    #[test]
    fn stripping_keeps_other_cookies() {
        let mut h = headers(&[("cookie", "a=1; nestbox_session=s; b=2")]);
        strip_session_cookie(&mut h);
        assert_eq!(h.get("cookie").unwrap(), "a=1; b=2");
        let mut h = headers(&[("cookie", "nestbox_session=s; __Host-nestbox_session=t")]);
        strip_session_cookie(&mut h);
        assert!(h.get("cookie").is_none());
    }
}
