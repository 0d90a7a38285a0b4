//! A client of one repository of a registry (Distribution API v2): manifests by tag or
//! digest, blobs streamed to files, and the registry's authentication challenge
//! (`Basic`, or `Bearer` with a token fetched from its realm, with or without
//! credentials).
//!
//! Where it may connect is the [`AccessPolicy`]'s decision, checked for every address it
//! dials — the registry, the token realm and every redirect (blob stores): HTTPS to public
//! addresses only (names are resolved by a resolver that drops private, loopback and
//! link-local addresses), unless the registry is listed as insecure, which allows plain
//! HTTP and private addresses for that host alone. A tenant naming an image therefore
//! cannot make the host fetch from its own network.
//!
//! Everything fetched is checked against its digest (and size) before it is used.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use reqwest::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, WWW_AUTHENTICATE};
use reqwest::{StatusCode, Url};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use crate::OciError;
use crate::manifest::{ACCEPTED, ConfigFile, Descriptor, Document, Manifest};
use crate::reference::Reference;

/// Largest manifest or index read, bytes.
const MAX_MANIFEST: u64 = 4 << 20;
/// Largest image configuration read, bytes.
const MAX_CONFIG: u64 = 4 << 20;
/// Largest token response read, bytes.
const MAX_TOKEN: u64 = 1 << 20;
/// The platform pulled from an index.
const OS: &str = "linux";
const ARCH: &str = "amd64";

/// Credentials for a registry. `Debug` never shows the password.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// User name.
    pub username: String,
    /// Password or access token.
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

/// Which registries may be reached how (see the module docs).
#[derive(Debug, Clone, Default)]
pub struct AccessPolicy {
    /// `host` or `host:port` entries reached over plain HTTP and allowed on private
    /// addresses.
    pub insecure: Vec<String>,
}

impl AccessPolicy {
    /// Whether the registry at `authority` (`host[:port]`) is listed as insecure.
    pub fn is_insecure(&self, authority: &str) -> bool {
        let host = host_of(authority);
        self.insecure
            .iter()
            .any(|e| e.eq_ignore_ascii_case(authority) || e.eq_ignore_ascii_case(host))
    }

    /// Whether `host` (no port) may resolve to private addresses.
    fn allows_private_host(&self, host: &str) -> bool {
        self.insecure
            .iter()
            .any(|e| host_of(e).eq_ignore_ascii_case(host))
    }

    /// Refuses a URL this policy does not allow (its scheme, or an address literal).
    pub fn check(&self, url: &Url) -> Result<(), String> {
        let host = url.host_str().unwrap_or_default();
        let authority = match url.port() {
            Some(p) => format!("{host}:{p}"),
            None => host.to_string(),
        };
        let insecure = self.is_insecure(&authority);
        match url.scheme() {
            "https" => {}
            "http" if insecure => {}
            other => {
                return Err(format!(
                    "{other}:// to {authority} is not allowed (only HTTPS, unless the registry is listed as insecure)"
                ));
            }
        }
        let literal = host.trim_start_matches('[').trim_end_matches(']');
        if let Ok(ip) = literal.parse::<IpAddr>()
            && !insecure
            && !is_public(ip)
        {
            return Err(format!(
                "{authority} is not a public address (list the registry as insecure to allow it)"
            ));
        }
        Ok(())
    }
}

/// `host` of `host:port` (IPv6 literals in brackets keep them).
fn host_of(authority: &str) -> &str {
    if let Some(end) = authority.find(']') {
        return &authority[..=end];
    }
    authority.split(':').next().unwrap_or(authority)
}

/// Whether an address is on the public internet: not loopback, private, shared,
/// link-local, multicast, unspecified or reserved.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            !(v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
                || o[0] == 0
                || o[0] >= 240
                || (o[0] == 100 && (o[1] & 0xc0) == 64)
                || (o[0] == 192 && o[1] == 0 && (o[2] == 0 || o[2] == 2))
                || (o[0] == 198 && (o[1] & 0xfe) == 18)
                || (o[0] == 198 && o[1] == 51 && o[2] == 100)
                || (o[0] == 203 && o[1] == 0 && o[2] == 113))
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_public(IpAddr::V4(v4));
            }
            let s = v6.segments();
            // Addresses that carry an IPv4 address (NAT64, 6to4, IPv4-compatible) are
            // that address's.
            let embedded = |hi: u16, lo: u16| {
                IpAddr::V4(std::net::Ipv4Addr::new(
                    (hi >> 8) as u8,
                    hi as u8,
                    (lo >> 8) as u8,
                    lo as u8,
                ))
            };
            if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
                return is_public(embedded(s[6], s[7]));
            }
            if s[0] == 0x2002 {
                return is_public(embedded(s[1], s[2]));
            }
            if s[..6] == [0; 6] && s[6] != 0 {
                return is_public(embedded(s[6], s[7]));
            }
            !(v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (s[0] & 0xfe00) == 0xfc00
                || (s[0] & 0xffc0) == 0xfe80)
        }
    }
}

/// Resolves names, keeping only the addresses the policy allows for them.
struct GuardedResolver {
    policy: Arc<AccessPolicy>,
}

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let policy = self.policy.clone();
        let host = name.as_str().to_string();
        Box::pin(async move {
            let private_ok = policy.allows_private_host(&host);
            let found: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0))
                .await?
                .filter(|a| private_ok || is_public(a.ip()))
                .collect();
            if found.is_empty() {
                return Err(format!(
                    "{host} has no public address (list the registry as insecure to allow a private one)"
                )
                .into());
            }
            Ok(Box::new(found.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// An image resolved to one manifest: its digest, layers and configuration.
#[derive(Debug)]
pub struct Resolved {
    /// The reference, pinned to the manifest's digest.
    pub reference: Reference,
    /// The image manifest's digest (`sha256:…`).
    pub digest: String,
    /// The manifest.
    pub manifest: Manifest,
    /// The image configuration.
    pub config: ConfigFile,
}

/// A client of one repository.
pub struct Registry {
    http: reqwest::Client,
    policy: Arc<AccessPolicy>,
    reference: Reference,
    base: Url,
    credentials: Option<Credentials>,
    /// The `Authorization` value that last worked (a token, or basic credentials).
    authorization: Mutex<Option<String>>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("reference", &self.reference)
            .finish_non_exhaustive()
    }
}

/// One parsed `WWW-Authenticate` challenge.
#[derive(Debug, PartialEq)]
pub(crate) struct Challenge {
    pub scheme: String,
    pub params: Vec<(String, String)>,
}

impl Challenge {
    /// Parses `Scheme k="v", k2=v2` (quoted values may hold commas).
    pub(crate) fn parse(header: &str) -> Option<Self> {
        let header = header.trim();
        let (scheme, mut rest) = match header.split_once(' ') {
            Some((s, r)) => (s, r.trim()),
            None => (header, ""),
        };
        let mut params = Vec::new();
        while !rest.is_empty() {
            let (key, after) = rest.split_once('=')?;
            let after = after.trim_start();
            let (value, next) = if let Some(q) = after.strip_prefix('"') {
                let mut value = String::new();
                let mut chars = q.char_indices();
                let mut end = None;
                while let Some((i, c)) = chars.next() {
                    match c {
                        '\\' => {
                            if let Some((_, n)) = chars.next() {
                                value.push(n);
                            }
                        }
                        '"' => {
                            end = Some(i + 1);
                            break;
                        }
                        c => value.push(c),
                    }
                }
                (value, &q[end?..])
            } else {
                match after.split_once(',') {
                    Some((v, n)) => (v.trim().to_string(), n),
                    None => (after.trim().to_string(), ""),
                }
            };
            params.push((key.trim().to_ascii_lowercase(), value));
            rest = next.trim_start().trim_start_matches(',').trim_start();
        }
        Some(Self {
            scheme: scheme.to_ascii_lowercase(),
            params,
        })
    }

    fn param(&self, key: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

fn sha256_hex(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

fn check_digest(digest: &str) -> Result<&str, OciError> {
    digest
        .strip_prefix("sha256:")
        .filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
        .ok_or_else(|| OciError::Format {
            what: "a descriptor".into(),
            why: format!("unsupported digest `{digest}` (only sha256 is)"),
        })
}

impl Registry {
    /// A client for `reference`'s repository.
    pub fn new(
        reference: Reference,
        credentials: Option<Credentials>,
        policy: AccessPolicy,
    ) -> Result<Self, OciError> {
        let policy = Arc::new(policy);
        let scheme = if policy.is_insecure(&reference.registry) {
            "http"
        } else {
            "https"
        };
        let base =
            Url::parse(&format!("{scheme}://{}/v2/", reference.api_host())).map_err(|e| {
                OciError::BadReference {
                    reference: reference.to_string(),
                    why: format!("not a registry address: {e}"),
                }
            })?;
        policy.check(&base).map_err(|why| OciError::Refused {
            url: base.to_string(),
            why,
        })?;
        let redirects = policy.clone();
        let http = reqwest::Client::builder()
            .user_agent(concat!("nestbox/", env!("CARGO_PKG_VERSION")))
            // A proxy would resolve names where the policy cannot see them.
            .no_proxy()
            .connect_timeout(Duration::from_secs(15))
            .read_timeout(Duration::from_secs(60))
            .dns_resolver(Arc::new(GuardedResolver {
                policy: policy.clone(),
            }))
            .redirect(reqwest::redirect::Policy::custom(move |attempt| {
                if attempt.previous().len() >= 5 {
                    return attempt.error("more than 5 redirects");
                }
                match redirects.check(attempt.url()) {
                    Ok(()) => attempt.follow(),
                    Err(why) => attempt.error(why),
                }
            }))
            .build()
            .map_err(|e| OciError::Http {
                what: "making an HTTP client".into(),
                source: e,
            })?;
        Ok(Self {
            http,
            policy,
            reference,
            base,
            credentials,
            authorization: Mutex::new(None),
        })
    }

    /// The repository's reference.
    pub fn reference(&self) -> &Reference {
        &self.reference
    }

    fn url(&self, path: &str) -> Result<Url, OciError> {
        self.base
            .join(&format!("{}/{path}", self.reference.repository))
            .map_err(|e| OciError::BadReference {
                reference: self.reference.to_string(),
                why: e.to_string(),
            })
    }

    fn basic(&self) -> Option<String> {
        use base64::Engine as _;
        self.credentials.as_ref().map(|c| {
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD
                    .encode(format!("{}:{}", c.username, c.password))
            )
        })
    }

    fn current_authorization(&self) -> Option<String> {
        self.authorization
            .lock()
            .map(|a| a.clone())
            .unwrap_or_default()
    }

    /// Answers a `401`: works out the `Authorization` value its challenge asks for.
    async fn authenticate(&self, challenge: Option<&str>) -> Result<String, OciError> {
        let registry = self.reference.registry.clone();
        let challenge =
            challenge
                .and_then(Challenge::parse)
                .ok_or_else(|| OciError::Unauthorized {
                    registry: registry.clone(),
                    why: "it asked for authentication without saying how".into(),
                })?;
        match challenge.scheme.as_str() {
            "basic" => self.basic().ok_or(OciError::Unauthorized {
                registry,
                why: "it needs credentials".into(),
            }),
            "bearer" => {
                let realm = challenge
                    .param("realm")
                    .ok_or_else(|| OciError::Unauthorized {
                        registry: registry.clone(),
                        why: "its token challenge has no realm".into(),
                    })?;
                let mut url = Url::parse(realm).map_err(|e| OciError::Unauthorized {
                    registry: registry.clone(),
                    why: format!("its token realm `{realm}` is not a URL: {e}"),
                })?;
                self.policy.check(&url).map_err(|why| OciError::Refused {
                    url: url.to_string(),
                    why,
                })?;
                let default_scope = format!("repository:{}:pull", self.reference.repository);
                {
                    let mut q = url.query_pairs_mut();
                    if let Some(service) = challenge.param("service") {
                        q.append_pair("service", service);
                    }
                    q.append_pair("scope", challenge.param("scope").unwrap_or(&default_scope));
                }
                let mut req = self.http.get(url.clone());
                if let Some(basic) = self.basic() {
                    req = req.header(AUTHORIZATION, basic);
                }
                let resp = req.send().await.map_err(|e| OciError::Http {
                    what: format!("asking {} for a token", host_of(url.as_str())),
                    source: e,
                })?;
                if resp.status() == StatusCode::UNAUTHORIZED
                    || resp.status() == StatusCode::FORBIDDEN
                {
                    return Err(OciError::Unauthorized {
                        registry,
                        why: if self.credentials.is_some() {
                            "it refused the credentials".into()
                        } else {
                            "it needs credentials".into()
                        },
                    });
                }
                let body = read_limited(resp, MAX_TOKEN, "a token").await?;
                #[derive(serde::Deserialize)]
                struct Token {
                    token: Option<String>,
                    access_token: Option<String>,
                }
                let t: Token = serde_json::from_slice(&body).map_err(|e| OciError::Format {
                    what: "the token response".into(),
                    why: e.to_string(),
                })?;
                let token = t.token.or(t.access_token).ok_or_else(|| OciError::Format {
                    what: "the token response".into(),
                    why: "it holds no token".into(),
                })?;
                Ok(format!("Bearer {token}"))
            }
            other => Err(OciError::Unauthorized {
                registry,
                why: format!("it asks for `{other}` authentication, which is not supported"),
            }),
        }
    }

    /// GET `url`, authenticating once if the registry asks to.
    async fn get(
        &self,
        url: Url,
        accept: Option<&str>,
        what: &str,
    ) -> Result<reqwest::Response, OciError> {
        let mut retried = false;
        loop {
            let mut req = self.http.get(url.clone());
            if let Some(a) = accept {
                req = req.header(ACCEPT, a);
            }
            if let Some(auth) = self.current_authorization() {
                req = req.header(AUTHORIZATION, auth);
            }
            let resp = req.send().await.map_err(|e| OciError::Http {
                what: what.to_string(),
                source: e,
            })?;
            match resp.status() {
                StatusCode::UNAUTHORIZED if !retried => {
                    let challenge = resp
                        .headers()
                        .get(WWW_AUTHENTICATE)
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_string);
                    let auth = self.authenticate(challenge.as_deref()).await?;
                    if let Ok(mut slot) = self.authorization.lock() {
                        *slot = Some(auth);
                    }
                    retried = true;
                }
                StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
                    return Err(OciError::Unauthorized {
                        registry: self.reference.registry.clone(),
                        why: if self.credentials.is_some() {
                            format!("it refused the credentials for {what}")
                        } else {
                            format!("{what} needs credentials")
                        },
                    });
                }
                StatusCode::NOT_FOUND => {
                    return Err(OciError::NotFound {
                        what: what.to_string(),
                    });
                }
                s if s.is_success() => return Ok(resp),
                s => {
                    let text = read_limited(resp, 4096, what).await.unwrap_or_default();
                    return Err(OciError::Status {
                        what: what.to_string(),
                        status: s.as_u16(),
                        body: String::from_utf8_lossy(&text).chars().take(300).collect(),
                    });
                }
            }
        }
    }

    /// Fetches a manifest (by tag or digest): its body, type and digest (checked against
    /// `expected` when the reference was a digest).
    async fn manifest(&self, reference: &str) -> Result<(Document, String), OciError> {
        let what = format!("manifest {}", self.reference.repository);
        let resp = self
            .get(
                self.url(&format!("manifests/{reference}"))?,
                Some(&ACCEPTED.join(", ")),
                &what,
            )
            .await?;
        let content_type = resp
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let body = read_limited(resp, MAX_MANIFEST, &what).await?;
        let digest = sha256_hex(&body);
        if reference.starts_with("sha256:") && !reference.eq_ignore_ascii_case(&digest) {
            return Err(OciError::Digest {
                what,
                expected: reference.to_string(),
                actual: digest,
            });
        }
        let doc = Document::parse(content_type.as_deref(), &body)
            .map_err(|why| OciError::Format { what, why })?;
        Ok((doc, digest))
    }

    /// Resolves the reference to the linux/amd64 image manifest and its configuration.
    pub async fn resolve(&self) -> Result<Resolved, OciError> {
        let (doc, mut digest) = self.manifest(self.reference.manifest_ref()).await?;
        let manifest = match doc {
            Document::Manifest(m) => m,
            Document::Index(index) => {
                let entry = index.pick(OS, ARCH).ok_or_else(|| OciError::Format {
                    what: format!("image {}", self.reference),
                    why: format!("it has no {OS}/{ARCH} variant"),
                })?;
                check_digest(&entry.digest)?;
                let (doc, d) = self.manifest(&entry.digest).await?;
                digest = d;
                match doc {
                    Document::Manifest(m) => m,
                    Document::Index(_) => {
                        return Err(OciError::Format {
                            what: format!("image {}", self.reference),
                            why: "an index inside an index".into(),
                        });
                    }
                }
            }
        };
        check_digest(&manifest.config.digest)?;
        if manifest.config.size > MAX_CONFIG {
            return Err(OciError::TooLarge {
                what: "the image configuration".into(),
                limit: MAX_CONFIG,
            });
        }
        let what = format!("configuration {}", manifest.config.digest);
        let resp = self
            .get(
                self.url(&format!("blobs/{}", manifest.config.digest))?,
                None,
                &what,
            )
            .await?;
        let body = read_limited(resp, MAX_CONFIG, &what).await?;
        let actual = sha256_hex(&body);
        if actual != manifest.config.digest {
            return Err(OciError::Digest {
                what,
                expected: manifest.config.digest.clone(),
                actual,
            });
        }
        let config: ConfigFile = serde_json::from_slice(&body).map_err(|e| OciError::Format {
            what: "the image configuration".into(),
            why: e.to_string(),
        })?;
        if (!config.os.is_empty() && config.os != OS)
            || (!config.architecture.is_empty() && config.architecture != ARCH)
        {
            return Err(OciError::Format {
                what: format!("image {}", self.reference),
                why: format!(
                    "it is for {}/{}, not {OS}/{ARCH}",
                    config.os, config.architecture
                ),
            });
        }
        for layer in &manifest.layers {
            check_digest(&layer.digest)?;
            if !layer.urls.is_empty() && layer.media_type.contains("nondistributable") {
                return Err(OciError::Format {
                    what: format!("layer {}", layer.digest),
                    why: "non-distributable layers (fetched from elsewhere) are not supported"
                        .into(),
                });
            }
        }
        Ok(Resolved {
            reference: self.reference.pinned(&digest),
            digest,
            manifest,
            config,
        })
    }

    /// Streams a blob into `dest` (made new), checking its size and digest; on any
    /// failure `dest` is removed.
    pub async fn fetch_blob(&self, blob: &Descriptor, dest: &Path) -> Result<(), OciError> {
        let what = format!("layer {}", blob.digest);
        let resp = self
            .get(self.url(&format!("blobs/{}", blob.digest))?, None, &what)
            .await?;
        // Made new, so that the cleanup below only ever removes this fetch's own file.
        let file = tokio::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(dest)
            .await
            .map_err(OciError::io("create", dest))?;
        let result = write_blob(blob, resp, file, dest, what).await;
        if result.is_err() {
            let _ = tokio::fs::remove_file(dest).await;
        }
        result
    }
}

/// Streams a blob's body into its file, checking its size and digest.
async fn write_blob(
    blob: &Descriptor,
    resp: reqwest::Response,
    mut file: tokio::fs::File,
    dest: &Path,
    what: String,
) -> Result<(), OciError> {
    let mut hasher = Sha256::new();
    let mut written = 0u64;
    let mut body = resp.bytes_stream();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| OciError::Http {
            what: what.clone(),
            source: e,
        })?;
        written += chunk.len() as u64;
        if written > blob.size {
            return Err(OciError::Format {
                what,
                why: format!(
                    "it is larger than the {} bytes its descriptor says",
                    blob.size
                ),
            });
        }
        hasher.update(&chunk);
        file.write_all(&chunk)
            .await
            .map_err(OciError::io("write", dest))?;
    }
    file.sync_all().await.map_err(OciError::io("sync", dest))?;
    let actual = format!("sha256:{}", hex::encode(hasher.finalize()));
    if written != blob.size || actual != blob.digest {
        return Err(OciError::Digest {
            what,
            expected: format!("{} ({} bytes)", blob.digest, blob.size),
            actual: format!("{actual} ({written} bytes)"),
        });
    }
    Ok(())
}

/// Reads a response body of at most `limit` bytes.
async fn read_limited(
    resp: reqwest::Response,
    limit: u64,
    what: &str,
) -> Result<Vec<u8>, OciError> {
    if resp.content_length().is_some_and(|l| l > limit) {
        return Err(OciError::TooLarge {
            what: what.to_string(),
            limit,
        });
    }
    let mut out = Vec::new();
    let mut body = resp.bytes_stream();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| OciError::Http {
            what: what.to_string(),
            source: e,
        })?;
        if (out.len() + chunk.len()) as u64 > limit {
            return Err(OciError::TooLarge {
                what: what.to_string(),
                limit,
            });
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn challenges_parse_with_quoted_commas() {
        let c = Challenge::parse(
            r#"Bearer realm="https://auth.example/token",service="registry.example",scope="repository:a/b:pull,push""#,
        )
        .unwrap();
        assert_eq!(c.scheme, "bearer");
        assert_eq!(c.param("realm"), Some("https://auth.example/token"));
        assert_eq!(c.param("scope"), Some("repository:a/b:pull,push"));
        let c = Challenge::parse(r#"Basic realm="Registry Realm""#).unwrap();
        assert_eq!(c.scheme, "basic");
        assert_eq!(c.param("realm"), Some("Registry Realm"));
        assert_eq!(Challenge::parse("Basic").unwrap().params, vec![]);
    }

    #[test]
    fn the_policy_keeps_tenants_off_private_networks() {
        let none = AccessPolicy::default();
        let local = AccessPolicy {
            insecure: vec!["127.0.0.1:5000".into(), "registry.lan".into()],
        };
        let u = |s: &str| Url::parse(s).unwrap();
        assert!(none.check(&u("https://ghcr.io/v2/")).is_ok());
        assert!(none.check(&u("http://ghcr.io/v2/")).is_err());
        for private in [
            "https://127.0.0.1/v2/",
            "https://10.1.2.3/v2/",
            "https://169.254.169.254/latest",
            "https://[::1]/v2/",
            "https://[fd00::1]/v2/",
            "https://100.64.0.1/",
        ] {
            assert!(none.check(&u(private)).is_err(), "{private} allowed");
        }
        assert!(none.check(&u("https://93.184.216.34/v2/")).is_ok());
        assert!(local.check(&u("http://127.0.0.1:5000/v2/")).is_ok());
        assert!(local.check(&u("http://127.0.0.1:5001/v2/")).is_err());
        assert!(local.check(&u("http://registry.lan:8080/v2/")).is_ok());
        assert!(local.allows_private_host("registry.lan"));
        assert!(!local.allows_private_host("other.lan"));
        assert!(!is_public("::ffff:192.168.1.1".parse().unwrap()));
        for hidden in [
            "64:ff9b::a00:1",
            "2002:c0a8:101::",
            "::10.0.0.1",
            "198.18.0.5",
            "203.0.113.9",
        ] {
            assert!(!is_public(hidden.parse().unwrap()), "{hidden}");
        }
        assert!(is_public("2606:4700::1111".parse().unwrap()));
    }
}
