//! The server's shared state: the access token, the defaults set by `/init`, and the
//! process table.
//!
//! The token is kept only as its SHA-256 digest and compared in constant time. The session
//! (token, default environment, user, working directory) sits behind a `std` lock held for
//! a few field copies, never across an await; `/init` validates everything before it
//! changes anything, so the session is never half-updated.
//!
//! Token life cycle: *unset* (only `/health` and `/init` are served) → *set* by the first
//! `/init` (which must match `--access-token-sha256` when given) → *rotated* by a later
//! `/init` that carries the current token.

use std::collections::BTreeMap;
use std::sync::{Mutex, RwLock};

use http::HeaderMap;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::metrics::CpuSample;
use super::process::table::ProcessTable;
use super::users::{User, UserDb, UserError};
use nestbox_envd::headers;
use nestbox_envd::types::InitRequest;

/// What the command line fixed.
#[derive(Debug, Clone)]
pub struct Config {
    /// SHA-256 of the only token the first `/init` may set.
    pub token_sha256: Option<[u8; 32]>,
    /// The default user before `/init` sets one.
    pub default_user: String,
    /// Whether `/init` may set the clock and the host name.
    pub manage_system: bool,
}

#[derive(Debug, Default)]
struct Session {
    token_sha256: Option<[u8; 32]>,
    env: BTreeMap<String, String>,
    default_user: String,
    default_workdir: Option<String>,
}

/// The defaults a request starts from.
#[derive(Debug, Clone)]
pub struct Defaults {
    /// Environment merged into every process's.
    pub env: BTreeMap<String, String>,
    /// The working directory of processes that name none.
    pub workdir: Option<String>,
}

/// Why `/init` was refused.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    /// The request does not carry the current token, or the first token does not match the
    /// expected hash.
    #[error("{0}")]
    Unauthorized(&'static str),
    /// The default user does not exist.
    #[error("default user cannot be used")]
    User(#[source] UserError),
}

/// State shared by every connection.
#[derive(Debug)]
pub struct Server {
    config: Config,
    session: RwLock<Session>,
    /// Running processes.
    pub processes: ProcessTable,
    /// Polled directory watchers (`CreateWatcher`).
    pub watchers: super::watch::Watchers,
    /// The previous CPU sample, for `/metrics` deltas.
    pub cpu: Mutex<Option<CpuSample>>,
    /// The effective uid of this server: switching to another user needs 0.
    pub euid: u32,
}

fn digest(token: &[u8]) -> [u8; 32] {
    Sha256::digest(token).into()
}

impl Server {
    /// A server with no token set.
    pub fn new(config: Config) -> Self {
        let session = Session {
            default_user: config.default_user.clone(),
            ..Session::default()
        };
        Self {
            config,
            session: RwLock::new(session),
            processes: ProcessTable::default(),
            watchers: super::watch::Watchers::default(),
            cpu: Mutex::new(super::metrics::read_cpu().ok()),
            euid: nix::unistd::geteuid().as_raw(),
        }
    }

    /// Whether `/init` may touch the clock and host name.
    pub fn manage_system(&self) -> bool {
        self.config.manage_system
    }

    fn session(&self) -> std::sync::RwLockReadGuard<'_, Session> {
        // A poisoned lock only means a panic elsewhere; the data is plain values.
        self.session.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether a token is set and `headers` carry it.
    pub fn authorized(&self, headers: &HeaderMap) -> bool {
        let Some(expected) = self.session().token_sha256 else {
            return false;
        };
        headers
            .get(headers::ACCESS_TOKEN)
            .is_some_and(|sent| bool::from(digest(sent.as_bytes()).ct_eq(&expected)))
    }

    /// The current defaults.
    pub fn defaults(&self) -> Defaults {
        let session = self.session();
        Defaults {
            env: session.env.clone(),
            workdir: session.default_workdir.clone(),
        }
    }

    /// Applies `/init`: checks the token rules, then sets the token, merges the environment
    /// and sets the defaults. `users` validates `defaultUser`.
    pub fn init(
        &self,
        headers: &HeaderMap,
        request: &InitRequest,
        users: impl FnOnce(&str) -> Result<User, UserError>,
    ) -> Result<(), InitError> {
        let mut session = self.session.write().unwrap_or_else(|e| e.into_inner());
        match session.token_sha256 {
            Some(current) => {
                let sent = headers
                    .get(headers::ACCESS_TOKEN)
                    .map(|v| digest(v.as_bytes()));
                if !sent.is_some_and(|s| bool::from(s.ct_eq(&current))) {
                    return Err(InitError::Unauthorized(
                        "the guest is initialised: /init needs the current access token",
                    ));
                }
            }
            None => {
                if let Some(expected) = self.config.token_sha256 {
                    let offered = request
                        .access_token
                        .as_deref()
                        .map(|t| digest(t.as_bytes()));
                    if !offered.is_some_and(|o| bool::from(o.ct_eq(&expected))) {
                        return Err(InitError::Unauthorized(
                            "the access token does not match the one this guest expects",
                        ));
                    }
                }
            }
        }
        if let Some(user) = &request.default_user {
            users(user).map_err(InitError::User)?;
        }

        if let Some(token) = &request.access_token {
            session.token_sha256 = Some(digest(token.as_bytes()));
        }
        if let Some(env) = &request.env_vars {
            session
                .env
                .extend(env.iter().map(|(k, v)| (k.clone(), v.clone())));
        }
        if let Some(user) = &request.default_user {
            session.default_user = user.clone();
        }
        if let Some(workdir) = &request.default_workdir {
            session.default_workdir = (!workdir.is_empty()).then(|| workdir.clone());
        }
        Ok(())
    }

    /// Resolves the user a request acts as: `name`, or the default user.
    pub fn user(&self, name: Option<&str>) -> Result<(User, UserDb), UserError> {
        let db = UserDb::load()?;
        let name = match name {
            Some(name) => name.to_owned(),
            None => self.session().default_user.clone(),
        };
        let user = db.user(&name)?;
        Ok((user, db))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn server(hash: Option<&str>) -> Server {
        Server::new(Config {
            token_sha256: hash.map(|t| digest(t.as_bytes())),
            default_user: "root".into(),
            manage_system: false,
        })
    }

    fn any_user(name: &str) -> Result<User, UserError> {
        Ok(User {
            name: name.into(),
            uid: 0,
            gid: 0,
            home: PathBuf::from("/"),
            shell: "/bin/sh".into(),
            groups: vec![],
        })
    }

    fn with_token(token: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(headers::ACCESS_TOKEN, token.parse().unwrap());
        headers
    }

    fn init(token: Option<&str>) -> InitRequest {
        InitRequest {
            access_token: token.map(str::to_owned),
            ..InitRequest::default()
        }
    }

    #[test]
    fn token_life_cycle() {
        let s = server(None);
        assert!(!s.authorized(&HeaderMap::new()));
        s.init(&HeaderMap::new(), &init(Some("one")), any_user)
            .unwrap();
        assert!(s.authorized(&with_token("one")));
        assert!(!s.authorized(&with_token("two")));
        // Re-init needs the current token; with it, the token rotates.
        assert!(
            s.init(&HeaderMap::new(), &init(Some("two")), any_user)
                .is_err()
        );
        s.init(&with_token("one"), &init(Some("two")), any_user)
            .unwrap();
        assert!(s.authorized(&with_token("two")));
        assert!(!s.authorized(&with_token("one")));
    }

    #[test]
    fn first_token_must_match_the_expected_hash() {
        let s = server(Some("expected"));
        assert!(
            s.init(&HeaderMap::new(), &init(Some("other")), any_user)
                .is_err()
        );
        assert!(s.init(&HeaderMap::new(), &init(None), any_user).is_err());
        s.init(&HeaderMap::new(), &init(Some("expected")), any_user)
            .unwrap();
        assert!(s.authorized(&with_token("expected")));
    }

    #[test]
    fn init_merges_env_and_validates_before_changing() {
        let s = server(None);
        let mut req = init(Some("t"));
        req.env_vars = Some([("A".to_owned(), "1".to_owned())].into());
        s.init(&HeaderMap::new(), &req, any_user).unwrap();
        let mut req = InitRequest {
            env_vars: Some([("B".to_owned(), "2".to_owned())].into()),
            default_user: Some("ghost".into()),
            ..InitRequest::default()
        };
        let refused = s.init(&with_token("t"), &req, |name| {
            Err(UserError::NotFound { name: name.into() })
        });
        assert!(matches!(refused, Err(InitError::User(_))));
        assert!(!s.defaults().env.contains_key("B"));
        req.default_user = None;
        req.default_workdir = Some("/srv".into());
        s.init(&with_token("t"), &req, any_user).unwrap();
        let defaults = s.defaults();
        assert_eq!(defaults.env.len(), 2);
        assert_eq!(defaults.workdir.as_deref(), Some("/srv"));
    }
}
