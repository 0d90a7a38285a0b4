//! Credentials: passwords, API keys, session tokens, host tokens.
//!
//! - Passwords are hashed with argon2id (PHC strings); verification is constant-time.
//! - API keys are `nbx_` + 64 hex digits of randomness; only their SHA-256 is stored (a
//!   256-bit random key needs no slow hash) plus a short prefix to recognise them.
//! - Session tokens are HS256 JWTs whose key derives from the master secret; they carry only
//!   the user id. Every request re-reads the user, memberships and admin flag from the
//!   database, so a disabled user or a removed member loses access at once.
//! - Hosts hold a pair: an access token (an HS256 JWT with its own key derived from the
//!   master secret, naming the host and the pair as `jti`; checked against the pair's row on
//!   use, so a revoked pair or a deleted host is refused at once) and a refresh token
//!   (random like an API key, stored hashed). See `nestbox_db::host_credentials`.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use hmac::Mac;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use nestbox_types::{SandboxId, UserId};
use sha2::{Digest, Sha256};

use crate::error::ApiError;

/// Prefix of API keys.
pub const API_KEY_PREFIX: &str = "nbx_";
/// Characters of a key shown in lists.
pub const SHOWN_PREFIX_LEN: usize = 12;

/// What a per-sandbox secret is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SandboxSecret {
    /// The guest agent's access token (`X-Access-Token`).
    Envd,
    /// The token that opens a sandbox's ports through the proxy without team credentials.
    Traffic,
}

/// A per-sandbox secret derived from the master secret, the sandbox's id and its token
/// generation: nothing is stored, a sandbox's tokens are recomputed when needed and cannot
/// be guessed from its id, and a rotation (the next generation) makes every earlier one
/// worthless. Generation 0 is the tokens a sandbox is created with.
pub fn sandbox_secret(
    master_secret: &[u8],
    purpose: SandboxSecret,
    id: SandboxId,
    generation: u64,
) -> String {
    let label: &[u8] = match purpose {
        SandboxSecret::Envd => b"nestbox sandbox envd token v1",
        SandboxSecret::Traffic => b"nestbox sandbox traffic token v1",
    };
    let mut mac = <hmac::Hmac<Sha256> as hmac::Mac>::new_from_slice(master_secret)
        .unwrap_or_else(|_| unreachable!("HMAC accepts keys of any length"));
    mac.update(label);
    mac.update(&[0]);
    mac.update(id.to_string().as_bytes());
    if generation > 0 {
        mac.update(&[0]);
        mac.update(generation.to_string().as_bytes());
    }
    hex::encode(mac.finalize().into_bytes())
}

/// Whether `offered` is `id`'s secret for `purpose` at `generation` (constant time).
pub fn check_sandbox_secret(
    master_secret: &[u8],
    purpose: SandboxSecret,
    id: SandboxId,
    generation: u64,
    offered: &str,
) -> bool {
    use subtle::ConstantTimeEq as _;
    let expected = sandbox_secret(master_secret, purpose, id, generation);
    bool::from(expected.as_bytes().ct_eq(offered.as_bytes()))
}

/// `n` random bytes, hex encoded.
pub fn random_hex(n: usize) -> Result<String, ApiError> {
    let mut buf = vec![0u8; n];
    getrandom::fill(&mut buf).map_err(|e| ApiError::internal(format!("no randomness: {e}")))?;
    Ok(hex::encode(buf))
}

/// SHA-256 of a token, hex.
pub fn hash_token(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// A new API key: (key shown once, its hash, its displayable prefix).
pub fn new_api_key() -> Result<(String, String, String), ApiError> {
    let key = format!("{API_KEY_PREFIX}{}", random_hex(32)?);
    let hash = hash_token(&key);
    let prefix = key[..SHOWN_PREFIX_LEN].to_string();
    Ok((key, hash, prefix))
}

/// Hashes a password with argon2id.
pub fn hash_password(password: &str) -> Result<String, ApiError> {
    let mut salt = [0u8; 16];
    getrandom::fill(&mut salt).map_err(|e| ApiError::internal(format!("no randomness: {e}")))?;
    let salt = SaltString::encode_b64(&salt).map_err(ApiError::internal)?;
    argon2::Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(ApiError::internal)
}

/// Checks a password against its stored hash.
pub fn verify_password(password: &str, hash: &str) -> bool {
    PasswordHash::new(hash)
        .map(|parsed| {
            argon2::Argon2::default()
                .verify_password(password.as_bytes(), &parsed)
                .is_ok()
        })
        .unwrap_or(false)
}

/// A hash that never verifies, used to spend the same time on unknown emails.
pub fn dummy_password_check(password: &str) {
    const DUMMY: &str = "$argon2id$v=19$m=19456,t=2,p=1$c29tZXNhbHRzb21lc2FsdA$2Qi3Jz3c1f8jWw4oQvQ4m0jG6Jv1Yh8Tq3k3iQ9X4a8";
    let _ = verify_password(password, DUMMY);
}

/// Validates a new password.
pub fn check_password_policy(password: &str) -> Result<(), ApiError> {
    if password.chars().count() < 10 {
        return Err(ApiError::invalid("password must be at least 10 characters"));
    }
    if password.len() > 1024 {
        return Err(ApiError::invalid("password must be at most 1024 bytes"));
    }
    Ok(())
}

#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct SessionClaims {
    sub: String,
    typ: String,
    iat: u64,
    exp: u64,
}

/// Issues and checks user session tokens, and derives browser sessions' CSRF tokens.
#[derive(Clone)]
pub struct Sessions {
    key: Vec<u8>,
    csrf_key: Vec<u8>,
    upload_key: Vec<u8>,
    ttl: Duration,
}

impl std::fmt::Debug for Sessions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sessions")
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

impl Sessions {
    /// Sessions signed with a key derived from `master_secret`.
    pub fn new(master_secret: &[u8], ttl: Duration) -> Self {
        let mut mac = <hmac::Hmac<Sha256> as hmac::Mac>::new_from_slice(master_secret)
            .unwrap_or_else(|_| unreachable!("HMAC accepts keys of any length"));
        mac.update(b"nestbox user session v1");
        let key = mac.finalize().into_bytes().to_vec();
        let mut mac = <hmac::Hmac<Sha256> as hmac::Mac>::new_from_slice(master_secret)
            .unwrap_or_else(|_| unreachable!("HMAC accepts keys of any length"));
        mac.update(b"nestbox browser session csrf v1");
        let csrf_key = mac.finalize().into_bytes().to_vec();
        let mut mac = <hmac::Hmac<Sha256> as hmac::Mac>::new_from_slice(master_secret)
            .unwrap_or_else(|_| unreachable!("HMAC accepts keys of any length"));
        mac.update(b"nestbox template file upload v1");
        Self {
            key,
            csrf_key,
            upload_key: mac.finalize().into_bytes().to_vec(),
            ttl,
        }
    }

    fn upload_mac(&self, team: &str, hash: &str, expires: i64) -> String {
        let mut mac = <hmac::Hmac<Sha256> as hmac::Mac>::new_from_slice(&self.upload_key)
            .unwrap_or_else(|_| unreachable!("HMAC accepts keys of any length"));
        mac.update(format!("{team}\n{hash}\n{expires}").as_bytes());
        hex::encode(mac.finalize().into_bytes())
    }

    /// A token that lets its bearer upload the files `hash` for `team` until `expires`
    /// (Unix seconds): what an upload URL carries in place of an API key (E2B's SDKs send
    /// none to the URL they are given).
    pub fn upload_token(&self, team: nestbox_types::TeamId, hash: &str, expires: i64) -> String {
        let team = team.to_string();
        format!("{team}.{expires}.{}", self.upload_mac(&team, hash, expires))
    }

    /// The team an upload token for `hash` was issued to, if it is genuine and current.
    pub fn check_upload_token(
        &self,
        token: &str,
        hash: &str,
        now: i64,
    ) -> Option<nestbox_types::TeamId> {
        use subtle::ConstantTimeEq as _;
        let mut parts = token.splitn(3, '.');
        let (team, expires, mac) = (parts.next()?, parts.next()?, parts.next()?);
        let expires: i64 = expires.parse().ok()?;
        let expected = self.upload_mac(team, hash, expires);
        if !bool::from(expected.as_bytes().ct_eq(mac.as_bytes())) || now > expires {
            return None;
        }
        team.parse().ok()
    }

    /// How long a session lasts.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// The CSRF token of the browser session whose secret hashes to `token_hash`: derived,
    /// never stored, and useless without the session's cookie.
    pub fn csrf_token(&self, token_hash: &str) -> String {
        let mut mac = <hmac::Hmac<Sha256> as hmac::Mac>::new_from_slice(&self.csrf_key)
            .unwrap_or_else(|_| unreachable!("HMAC accepts keys of any length"));
        mac.update(token_hash.as_bytes());
        hex::encode(mac.finalize().into_bytes())
    }

    /// Whether `offered` is the CSRF token of that session (constant time).
    pub fn check_csrf(&self, token_hash: &str, offered: &str) -> bool {
        use subtle::ConstantTimeEq as _;
        bool::from(
            self.csrf_token(token_hash)
                .as_bytes()
                .ct_eq(offered.as_bytes()),
        )
    }

    /// A token for `user` and when it expires.
    pub fn issue(&self, user: UserId) -> Result<(String, chrono::DateTime<chrono::Utc>), ApiError> {
        let iat = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let exp = iat + self.ttl.as_secs();
        let claims = SessionClaims {
            sub: user.to_string(),
            typ: "user".into(),
            iat,
            exp,
        };
        let token = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(&self.key),
        )
        .map_err(ApiError::internal)?;
        let expires = chrono::DateTime::from_timestamp(i64::try_from(exp).unwrap_or(i64::MAX), 0)
            .unwrap_or_default();
        Ok((token, expires))
    }

    /// The user a valid token belongs to.
    pub fn verify(&self, token: &str) -> Result<UserId, ApiError> {
        let validation = Validation::new(Algorithm::HS256);
        let data = jsonwebtoken::decode::<SessionClaims>(
            token,
            &DecodingKey::from_secret(&self.key),
            &validation,
        )
        .map_err(|_| ApiError::unauthorized("invalid or expired session token"))?;
        if data.claims.typ != "user" {
            return Err(ApiError::unauthorized("not a user session token"));
        }
        data.claims
            .sub
            .parse()
            .map_err(|_| ApiError::unauthorized("invalid session token subject"))
    }
}

#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct HostClaims {
    sub: String,
    jti: String,
    typ: String,
    iat: u64,
    exp: u64,
}

/// Prefix of host refresh tokens.
pub const HOST_REFRESH_PREFIX: &str = "nbxhr_";

/// Issues and checks host access tokens.
#[derive(Clone)]
pub struct HostTokens {
    key: Vec<u8>,
}

impl std::fmt::Debug for HostTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostTokens").finish_non_exhaustive()
    }
}

impl HostTokens {
    /// Tokens signed with a key derived from `master_secret`.
    pub fn new(master_secret: &[u8]) -> Self {
        let mut mac = <hmac::Hmac<Sha256> as hmac::Mac>::new_from_slice(master_secret)
            .unwrap_or_else(|_| unreachable!("HMAC accepts keys of any length"));
        mac.update(b"nestbox host access v1");
        Self {
            key: mac.finalize().into_bytes().to_vec(),
        }
    }

    /// An access token of `host`'s pair `pair`, valid until `expires`.
    pub fn issue(
        &self,
        host: nestbox_types::HostId,
        pair: uuid::Uuid,
        expires: chrono::DateTime<chrono::Utc>,
    ) -> Result<String, ApiError> {
        let iat = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let claims = HostClaims {
            sub: host.to_string(),
            jti: pair.to_string(),
            typ: "host".into(),
            iat,
            exp: u64::try_from(expires.timestamp()).unwrap_or(0),
        };
        jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(&self.key),
        )
        .map_err(ApiError::internal)
    }

    /// The host and pair of a well-signed, unexpired access token (whether the pair is
    /// still the host's is the database's to say).
    pub fn verify(&self, token: &str) -> Result<(nestbox_types::HostId, uuid::Uuid), ApiError> {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = 0;
        let data = jsonwebtoken::decode::<HostClaims>(
            token,
            &DecodingKey::from_secret(&self.key),
            &validation,
        )
        .map_err(|_| ApiError::unauthorized("invalid or expired host access token"))?;
        if data.claims.typ != "host" {
            return Err(ApiError::unauthorized("not a host access token"));
        }
        let bad = || ApiError::unauthorized("invalid host access token");
        Ok((
            data.claims.sub.parse().map_err(|_| bad())?,
            data.claims.jti.parse().map_err(|_| bad())?,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords() {
        let h = hash_password("correct horse battery").unwrap();
        assert!(h.starts_with("$argon2id$"));
        assert!(verify_password("correct horse battery", &h));
        assert!(!verify_password("wrong", &h));
        assert!(!verify_password("x", "not a hash"));
        assert!(check_password_policy("short").is_err());
    }

    #[test]
    fn api_keys() {
        let (key, hash, prefix) = new_api_key().unwrap();
        assert!(key.starts_with("nbx_"));
        assert_eq!(key.len(), 4 + 64);
        assert_eq!(hash, hash_token(&key));
        assert!(key.starts_with(&prefix));
        let (other, _, _) = new_api_key().unwrap();
        assert_ne!(key, other);
    }

    #[test]
    fn host_tokens() {
        let t = HostTokens::new(&[7u8; 32]);
        let host = nestbox_types::HostId::new();
        let pair = uuid::Uuid::new_v4();
        let token = t
            .issue(host, pair, chrono::Utc::now() + chrono::Duration::hours(1))
            .unwrap();
        assert_eq!(t.verify(&token).unwrap(), (host, pair));
        assert!(HostTokens::new(&[8u8; 32]).verify(&token).is_err());
        let expired = t
            .issue(
                host,
                pair,
                chrono::Utc::now() - chrono::Duration::seconds(1),
            )
            .unwrap();
        assert!(t.verify(&expired).is_err());
        // A user session is not a host token, even under the same secret.
        let (session, _) = Sessions::new(&[7u8; 32], Duration::from_secs(60))
            .issue(UserId::new())
            .unwrap();
        assert!(t.verify(&session).is_err());
    }

    #[test]
    fn sessions() {
        let s = Sessions::new(&[7u8; 32], Duration::from_secs(60));
        let user = UserId::new();
        let (token, _) = s.issue(user).unwrap();
        assert_eq!(s.verify(&token).unwrap(), user);
        let other = Sessions::new(&[8u8; 32], Duration::from_secs(60));
        assert!(other.verify(&token).is_err());
        assert!(s.verify("nope").is_err());
    }
}
