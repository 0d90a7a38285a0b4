//! How the control plane proves itself to a host agent.
//!
//! Each host gets a *host key* when it registers: `HMAC-SHA256(master secret, host id)`.
//! The control plane never stores host keys — it derives them from its master secret —
//! and a leaked host key opens only that host. Every call to an agent carries
//! `authorization: Bearer <JWT>` signed (HS256) with the host key, addressed to the host
//! (`aud`) and valid for [`TOKEN_TTL`]. The agent checks signature, audience and expiry.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use nestbox_types::HostId;
use sha2::Sha256;

/// How long a control-plane token is valid.
pub const TOKEN_TTL: Duration = Duration::from_secs(300);

/// A token that cannot be issued or was rejected.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// Signing failed.
    #[error("cannot sign a control-plane token")]
    Sign(#[source] jsonwebtoken::errors::Error),
    /// The token is missing, malformed, expired, for another host or badly signed.
    #[error("invalid control-plane token")]
    Invalid(#[source] jsonwebtoken::errors::Error),
}

#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct Claims {
    iss: String,
    aud: String,
    iat: u64,
    exp: u64,
}

/// Derives the host key of `host` from the control plane's master secret.
pub fn derive_host_key(master_secret: &[u8], host: HostId) -> String {
    use hmac::Mac;
    let mut mac = <hmac::Hmac<Sha256> as hmac::Mac>::new_from_slice(master_secret)
        .unwrap_or_else(|_| unreachable!("HMAC accepts keys of any length"));
    mac.update(b"nestbox host key v1:");
    mac.update(host.to_string().as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Issues a token for calls to `host`.
pub fn issue(host_key: &str, host: HostId) -> Result<String, AuthError> {
    let iat = now();
    let claims = Claims {
        iss: "nestbox-control-plane".into(),
        aud: host.to_string(),
        iat,
        exp: iat + TOKEN_TTL.as_secs(),
    };
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(host_key.as_bytes()),
    )
    .map_err(AuthError::Sign)
}

/// Checks a token presented to `host`.
pub fn verify(host_key: &str, host: HostId, token: &str) -> Result<(), AuthError> {
    let mut validation = Validation::new(Algorithm::HS256);
    validation.set_audience(&[host.to_string()]);
    validation.set_issuer(&["nestbox-control-plane"]);
    validation.leeway = 30;
    jsonwebtoken::decode::<Claims>(
        token,
        &DecodingKey::from_secret(host_key.as_bytes()),
        &validation,
    )
    .map(|_| ())
    .map_err(AuthError::Invalid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issue_verify() {
        let host = HostId::new();
        let key = derive_host_key(b"master", host);
        assert_eq!(
            key,
            derive_host_key(b"master", host),
            "derivation is stable"
        );
        let token = issue(&key, host).unwrap();
        verify(&key, host, &token).unwrap();
    }

    #[test]
    fn rejects_other_host_and_key() {
        let host = HostId::new();
        let other = HostId::new();
        let key = derive_host_key(b"master", host);
        let other_key = derive_host_key(b"master", other);
        assert_ne!(key, other_key);
        let token = issue(&key, host).unwrap();
        assert!(verify(&key, other, &token).is_err(), "audience is checked");
        assert!(
            verify(&other_key, host, &token).is_err(),
            "signature is checked"
        );
        assert!(verify(&key, host, "garbage").is_err());
    }
}
