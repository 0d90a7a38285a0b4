//! Browser sessions (the web dashboard's sign-in): the cookie's attributes, CSRF tokens,
//! origin checks, signing out, deactivated users, and the cookie never opening a
//! sandbox's ports.

// Tests may panic on what they expect (see clippy.toml); helpers here are not `#[test]`s.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use common::{Engine, Harness, PASSWORD, both_engines, raw_error};
use nestbox_types::ErrorCode;
use nestbox_types::api::{BrowserSession, CreateSandboxRequest};
use reqwest::header::{COOKIE, ORIGIN, SET_COOKIE};
use serde_json::json;

both_engines!(
    a_browser_signs_in_with_a_cookie_and_changes_need_its_csrf_token,
    signing_out_ends_the_session_everywhere,
    deactivating_a_user_ends_their_browser_sessions,
    the_cookie_never_opens_a_sandbox_port,
    planted_cookies_are_refused_and_https_uses_a_host_only_name,
);

/// A signed-in browser: its cookie header and session.
struct Browser {
    http: reqwest::Client,
    url: String,
    cookie: String,
    session: BrowserSession,
}

impl Browser {
    async fn sign_in(h: &Harness, email: &str) -> anyhow::Result<Browser> {
        let (http, url) = h.raw("");
        let resp = http
            .post(format!("{url}/v1/auth/session"))
            .json(&json!({ "email": email, "password": PASSWORD }))
            .send()
            .await?;
        assert_eq!(resp.status(), 200);
        let set = resp.headers().get(SET_COOKIE).unwrap().to_str()?.to_owned();
        for part in ["HttpOnly", "SameSite=Strict", "Path=/"] {
            assert!(set.contains(part), "{set} lacks {part}");
        }
        let cookie = set.split(';').next().unwrap().to_owned();
        assert!(cookie.starts_with("nestbox_session="), "{cookie}");
        let session: BrowserSession = resp.json().await?;
        Ok(Browser {
            http,
            url,
            cookie,
            session,
        })
    }

    fn get(&self, path: &str) -> reqwest::RequestBuilder {
        self.http
            .get(format!("{}{path}", self.url))
            .header(COOKIE, &self.cookie)
    }

    /// A request that changes something, with the session's CSRF token.
    fn send(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.bare(method, path)
            .header("x-csrf-token", &self.session.csrf_token)
    }

    /// The same without the token.
    fn bare(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.http
            .request(method, format!("{}{path}", self.url))
            .header(COOKIE, &self.cookie)
    }
}

async fn a_browser_signs_in_with_a_cookie_and_changes_need_its_csrf_token(
    engine: Engine,
) -> anyhow::Result<()> {
    use reqwest::Method;
    let h = Harness::start(engine).await?;
    let alice = h.user("alice").await?;
    let b = Browser::sign_in(&h, &alice.email).await?;
    assert_eq!(b.session.user.email, alice.email);
    assert!(b.session.csrf_token.len() >= 32);

    // After a reload the page asks for its session again: the same CSRF token.
    let again: BrowserSession = b.get("/v1/auth/session").send().await?.json().await?;
    assert_eq!(again.csrf_token, b.session.csrf_token);
    // Reading needs no token.
    assert_eq!(b.get("/v1/me").send().await?.status(), 200);

    // Changing needs it: missing, wrong, or another session's token is refused.
    let team = json!({ "name": "From the browser" });
    let resp = b.bare(Method::POST, "/v1/teams").json(&team).send().await?;
    raw_error(resp, 403, ErrorCode::Forbidden).await?;
    let resp = b
        .bare(Method::POST, "/v1/teams")
        .header("x-csrf-token", "0".repeat(64))
        .json(&team)
        .send()
        .await?;
    raw_error(resp, 403, ErrorCode::Forbidden).await?;
    let other = Browser::sign_in(&h, &alice.email).await?;
    assert_ne!(other.session.csrf_token, b.session.csrf_token);
    let resp = b
        .bare(Method::POST, "/v1/teams")
        .header("x-csrf-token", &other.session.csrf_token)
        .json(&team)
        .send()
        .await?;
    raw_error(resp, 403, ErrorCode::Forbidden).await?;
    let resp = b.send(Method::POST, "/v1/teams").json(&team).send().await?;
    assert_eq!(resp.status(), 201);

    // Another site cannot use the cookie, even for reading (a WebSocket handshake is a GET
    // with an Origin).
    let resp = b
        .send(Method::POST, "/v1/teams")
        .header(ORIGIN, "http://evil.test")
        .json(&team)
        .send()
        .await?;
    raw_error(resp, 403, ErrorCode::Forbidden).await?;
    let resp = b
        .get("/v1/me")
        .header(ORIGIN, "http://evil.test")
        .send()
        .await?;
    raw_error(resp, 403, ErrorCode::Forbidden).await?;
    let own = b.url.clone();
    let resp = b.get("/v1/me").header(ORIGIN, own).send().await?;
    assert_eq!(resp.status(), 200);

    // E2B's routes at the root follow the same rules.
    let e2b = json!({ "templateID": "minimal" });
    let resp = b.bare(Method::POST, "/sandboxes").json(&e2b).send().await?;
    assert_eq!(resp.status(), 403);
    assert_eq!(b.get("/sandboxes").send().await?.status(), 200);

    // A wrong password sets no cookie.
    let (http, url) = h.raw("/v1/auth/session");
    let resp = http
        .post(&url)
        .json(&json!({ "email": alice.email, "password": "not the password" }))
        .send()
        .await?;
    assert!(resp.headers().get(SET_COOKIE).is_none());
    raw_error(resp, 401, ErrorCode::Unauthorized).await?;
    // No cookie, no session.
    raw_error(http.get(&url).send().await?, 401, ErrorCode::Unauthorized).await?;
    h.shutdown().await;
    Ok(())
}

async fn signing_out_ends_the_session_everywhere(engine: Engine) -> anyhow::Result<()> {
    use reqwest::Method;
    let h = Harness::start(engine).await?;
    let alice = h.user("alice").await?;
    let b = Browser::sign_in(&h, &alice.email).await?;
    let kept = Browser::sign_in(&h, &alice.email).await?;

    let resp = b.bare(Method::DELETE, "/v1/auth/session").send().await?;
    raw_error(resp, 403, ErrorCode::Forbidden).await?;
    let resp = b.send(Method::DELETE, "/v1/auth/session").send().await?;
    assert_eq!(resp.status(), 204);
    let cleared = resp.headers().get(SET_COOKIE).unwrap().to_str()?;
    assert!(cleared.contains("Max-Age=0"), "{cleared}");

    // A copy of the cookie is worthless now; the other browser stays signed in.
    raw_error(b.get("/v1/me").send().await?, 401, ErrorCode::Unauthorized).await?;
    raw_error(
        b.get("/v1/auth/session").send().await?,
        401,
        ErrorCode::Unauthorized,
    )
    .await?;
    assert_eq!(kept.get("/v1/me").send().await?.status(), 200);
    // Signing out again (the session already ended) just clears the cookie.
    let resp = b.bare(Method::DELETE, "/v1/auth/session").send().await?;
    assert_eq!(resp.status(), 204);
    // Another site cannot sign a browser out.
    let resp = kept
        .send(Method::DELETE, "/v1/auth/session")
        .header(ORIGIN, "http://evil.test")
        .send()
        .await?;
    raw_error(resp, 403, ErrorCode::Forbidden).await?;
    assert_eq!(kept.get("/v1/me").send().await?.status(), 200);
    h.shutdown().await;
    Ok(())
}

async fn planted_cookies_are_refused_and_https_uses_a_host_only_name(
    engine: Engine,
) -> anyhow::Result<()> {
    let h = Harness::start(engine).await?;
    let alice = h.user("alice").await?;
    let b = Browser::sign_in(&h, &alice.email).await?;
    // Another host of the domain (a sandbox's port) may plant a cookie of the same name:
    // two of them are refused, never guessed between.
    let planted = format!("nestbox_session=planted; {}", b.cookie);
    let resp = b
        .http
        .get(format!("{}/v1/me", b.url))
        .header(COOKIE, planted)
        .send()
        .await?;
    raw_error(resp, 401, ErrorCode::Unauthorized).await?;

    // Over HTTPS (here: a reverse proxy's word) the cookie is `__Host-` (Secure, no
    // Domain), which no other host can set; it wins over a planted plain one.
    let resp = b
        .http
        .post(format!("{}/v1/auth/session", b.url))
        .header("x-forwarded-proto", "https")
        .json(&json!({ "email": alice.email, "password": PASSWORD }))
        .send()
        .await?;
    let set = resp.headers().get(SET_COOKIE).unwrap().to_str()?.to_owned();
    assert!(
        set.starts_with("__Host-nestbox_session=") && set.contains("Secure"),
        "{set}"
    );
    assert!(!set.contains("Domain"), "{set}");
    let secure = set.split(';').next().unwrap().to_owned();
    let resp = b
        .http
        .get(format!("{}/v1/me", b.url))
        .header(COOKIE, format!("nestbox_session=planted; {secure}"))
        .send()
        .await?;
    assert_eq!(resp.status(), 200);
    h.shutdown().await;
    Ok(())
}

async fn deactivating_a_user_ends_their_browser_sessions(engine: Engine) -> anyhow::Result<()> {
    use reqwest::Method;
    let h = Harness::start(engine).await?;
    let bob = h.user("bob").await?;
    let carol = h.user("carol").await?;
    nestbox_db::users::set_admin(&h.services.db, carol.id, true).await?;
    let browser = Browser::sign_in(&h, &bob.email).await?;
    let admin = Browser::sign_in(&h, &carol.email).await?;
    assert_eq!(browser.get("/v1/me").send().await?.status(), 200);

    let path = format!("/v1/admin/users/{}", bob.id);
    // Bob may not do it himself.
    let resp = browser
        .send(Method::PATCH, &path)
        .json(&json!({ "active": false }))
        .send()
        .await?;
    raw_error(resp, 403, ErrorCode::Forbidden).await?;

    let resp = admin
        .send(Method::PATCH, &path)
        .json(&json!({ "active": false }))
        .send()
        .await?;
    assert_eq!(resp.status(), 200);
    let user: nestbox_types::api::User = resp.json().await?;
    assert!(!user.active);
    raw_error(
        browser.get("/v1/me").send().await?,
        401,
        ErrorCode::Unauthorized,
    )
    .await?;
    let (http, url) = h.raw("/v1/auth/session");
    let resp = http
        .post(&url)
        .json(&json!({ "email": bob.email, "password": PASSWORD }))
        .send()
        .await?;
    raw_error(resp, 401, ErrorCode::Unauthorized).await?;

    // Reactivated, Bob signs in afresh; the old session stays ended.
    let resp = admin
        .send(Method::PATCH, &path)
        .json(&json!({ "active": true, "is_admin": true }))
        .send()
        .await?;
    let user: nestbox_types::api::User = resp.json().await?;
    assert!(user.active && user.is_admin);
    raw_error(
        browser.get("/v1/me").send().await?,
        401,
        ErrorCode::Unauthorized,
    )
    .await?;
    Browser::sign_in(&h, &bob.email).await?;

    // An admin cannot lock themselves out; an unknown user is 404; bad bodies are 400.
    let me = format!("/v1/admin/users/{}", carol.id);
    for body in [json!({ "active": false }), json!({ "is_admin": false })] {
        let resp = admin.send(Method::PATCH, &me).json(&body).send().await?;
        raw_error(resp, 400, ErrorCode::InvalidRequest).await?;
    }
    let unknown = format!("/v1/admin/users/{}", nestbox_types::UserId::new());
    let resp = admin
        .send(Method::PATCH, &unknown)
        .json(&json!({ "active": true }))
        .send()
        .await?;
    raw_error(resp, 404, ErrorCode::UserNotFound).await?;
    let resp = admin
        .send(Method::PATCH, &path)
        .json(&json!({ "active": "yes" }))
        .send()
        .await?;
    raw_error(resp, 400, ErrorCode::InvalidRequest).await?;
    h.shutdown().await;
    Ok(())
}

async fn the_cookie_never_opens_a_sandbox_port(engine: Engine) -> anyhow::Result<()> {
    let h = Harness::start(engine).await?;
    let alice = h.user("alice").await?;
    let b = Browser::sign_in(&h, &alice.email).await?;
    let sandbox = alice
        .client
        .create_sandbox(&CreateSandboxRequest::default())
        .await?;
    // The cookie works on the API…
    let path = format!("/v1/sandboxes/{}", sandbox.id);
    assert_eq!(b.get(&path).send().await?.status(), 200);
    // …but a sandbox's port under the API's own paths needs a real credential: a page
    // served from there would run in the dashboard's origin.
    let resp = b.get(&format!("{path}/ports/8080/")).send().await?;
    raw_error(resp, 401, ErrorCode::Unauthorized).await?;
    h.shutdown().await;
    Ok(())
}
