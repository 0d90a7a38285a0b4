//! The control plane's certificate authority and the TLS set-up of the channel between the
//! control plane and host agents (mutual TLS).
//!
//! Everything is derived from the control plane's master secret, so every replica issues
//! the same certificates and nothing is stored: the CA key, the control plane's client key
//! and each host's key are Ed25519 keys whose seeds are `HMAC-SHA256(secret, label)`, and
//! the certificates have fixed serials and validity, so their bytes are the same on every
//! replica (Ed25519 signatures are deterministic).
//!
//! - A host gets its bundle (CA certificate, its certificate and key) when it registers.
//!   Its certificate names it `<host id>.hosts.nestbox` and is for server authentication.
//! - The control plane's certificate is for client authentication.
//! - An agent accepts only clients with a certificate of the CA ([`server_config`]); the
//!   control plane accepts only the certificate of the host it meant to reach
//!   ([`client_config`], [`host_name`]), whatever address the host is at.
//!
//! Rotating the master secret rotates all of it (hosts then register again).
//!
//! The control plane's public listener is another matter: it serves the operator's own
//! certificate ([`public_server_config`]), which nothing here derives.

use std::sync::Arc;

use hmac::Mac;
use nestbox_types::HostId;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PKCS_ED25519, SanType, SerialNumber,
};
pub use rustls;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};

/// A certificate or configuration that could not be made.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// Generating a certificate failed.
    #[error("cannot issue the {what} certificate")]
    Issue {
        /// Which certificate.
        what: &'static str,
        /// Why.
        #[source]
        source: rcgen::Error,
    },
    /// A PEM document did not parse.
    #[error("invalid {what} PEM")]
    Pem {
        /// What it should have been.
        what: &'static str,
    },
    /// rustls refused the configuration.
    #[error("invalid TLS configuration")]
    Tls(#[from] rustls::Error),
    /// A client certificate verifier could not be built.
    #[error("cannot build the client certificate verifier: {0}")]
    Verifier(String),
}

/// A certificate with its key and the CA that issued it (PEM).
pub type TlsBundle = nestbox_types::api::HostTls;

/// The name in a host's certificate (what the control plane checks).
pub fn host_name(host: HostId) -> String {
    format!("{host}.hosts.nestbox")
}

/// The certificate authority of one master secret.
pub struct Authority {
    secret: Vec<u8>,
    ca_key: KeyPair,
    ca_params: CertificateParams,
    ca_pem: String,
}

impl std::fmt::Debug for Authority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authority").finish_non_exhaustive()
    }
}

/// `HMAC-SHA256(secret, label)` as an Ed25519 key.
fn derived_key(secret: &[u8], label: &str) -> Result<KeyPair, rcgen::Error> {
    let mut mac = <hmac::Hmac<sha2::Sha256> as Mac>::new_from_slice(secret)
        .unwrap_or_else(|_| unreachable!("HMAC accepts keys of any length"));
    mac.update(b"nestbox pki v1:");
    mac.update(label.as_bytes());
    let seed = mac.finalize().into_bytes();
    // PKCS#8 v1 of an Ed25519 private key: a fixed prefix, then the 32-byte seed.
    let mut der = vec![
        0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04,
        0x20,
    ];
    der.extend_from_slice(&seed);
    KeyPair::from_pkcs8_der_and_sign_algo(&PrivatePkcs8KeyDer::from(der), &PKCS_ED25519)
}

/// Parameters with the fixed serial and validity that keep certificates reproducible.
fn params(common_name: &str, serial: u8) -> CertificateParams {
    let mut p = CertificateParams::default();
    p.not_before = rcgen::date_time_ymd(2025, 1, 1);
    p.not_after = rcgen::date_time_ymd(2125, 1, 1);
    p.serial_number = Some(SerialNumber::from_slice(&[serial]));
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    p.distinguished_name = dn;
    p
}

impl Authority {
    /// The authority of `master_secret`.
    pub fn new(master_secret: &[u8]) -> Result<Self, PkiError> {
        let issue = |source| PkiError::Issue { what: "CA", source };
        let ca_key = derived_key(master_secret, "ca").map_err(issue)?;
        let mut ca_params = params("Nestbox control plane CA", 1);
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_pem = ca_params.self_signed(&ca_key).map_err(issue)?.pem();
        Ok(Self {
            secret: master_secret.to_vec(),
            ca_key,
            ca_params,
            ca_pem,
        })
    }

    /// The CA's certificate.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    fn issue(
        &self,
        what: &'static str,
        label: &str,
        params: CertificateParams,
    ) -> Result<TlsBundle, PkiError> {
        let err = |source| PkiError::Issue { what, source };
        let key = derived_key(&self.secret, label).map_err(err)?;
        let issuer = Issuer::from_params(&self.ca_params, &self.ca_key);
        let cert = params.signed_by(&key, &issuer).map_err(err)?;
        Ok(TlsBundle {
            ca_pem: self.ca_pem.clone(),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// A host's bundle: server authentication as [`host_name`].
    pub fn host(&self, host: HostId) -> Result<TlsBundle, PkiError> {
        let name = host_name(host);
        let mut p = params(&name, 2);
        p.subject_alt_names = vec![SanType::DnsName(name.clone().try_into().map_err(
            |source| PkiError::Issue {
                what: "host",
                source,
            },
        )?)];
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.issue("host", &format!("host:{host}"), p)
    }

    /// The control plane's bundle: client authentication.
    pub fn control_plane(&self) -> Result<TlsBundle, PkiError> {
        let mut p = params("nestbox-control-plane", 3);
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.issue("control plane", "control-plane", p)
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certs(pem: &str, what: &'static str) -> Result<Vec<CertificateDer<'static>>, PkiError> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| PkiError::Pem { what })?;
    if certs.is_empty() {
        return Err(PkiError::Pem { what });
    }
    Ok(certs)
}

fn key(pem: &str) -> Result<PrivateKeyDer<'static>, PkiError> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|_| PkiError::Pem { what: "key" })
}

fn roots(ca_pem: &str) -> Result<Arc<rustls::RootCertStore>, PkiError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in certs(ca_pem, "CA certificate")? {
        roots.add(cert)?;
    }
    Ok(Arc::new(roots))
}

/// A host agent's TLS server: its certificate, and clients must present one of the CA's.
/// Speaks HTTP/2 (gRPC) and HTTP/1.1 (proxied requests).
pub fn server_config(host: &TlsBundle) -> Result<Arc<rustls::ServerConfig>, PkiError> {
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        roots(&host.ca_pem)?,
        provider(),
    )
    .build()
    .map_err(|e| PkiError::Verifier(e.to_string()))?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs(&host.cert_pem, "certificate")?, key(&host.key_pem)?)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The control plane's public TLS server (API, E2B's API, sandbox ports by host name):
/// the operator's certificate chain and key (PEM; usually a wildcard certificate for the
/// proxy domain), no client certificates. Speaks HTTP/2 and HTTP/1.1.
pub fn public_server_config(
    cert_pem: &str,
    key_pem: &str,
) -> Result<Arc<rustls::ServerConfig>, PkiError> {
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs(cert_pem, "certificate")?, key(key_pem)?)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The control plane's TLS client for one host: the host's certificate must be the CA's
/// for [`host_name`] (checked whatever address is dialled); the control plane presents
/// its own. `alpn` lists the protocols to offer.
pub fn client_config(
    control_plane: &TlsBundle,
    alpn: &[&[u8]],
) -> Result<Arc<rustls::ClientConfig>, PkiError> {
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots(&control_plane.ca_pem)?)
        .with_client_auth_cert(
            certs(&control_plane.cert_pem, "certificate")?,
            key(&control_plane.key_pem)?,
        )?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}

/// The server name to verify a host's certificate against.
pub fn server_name(host: HostId) -> Result<ServerName<'static>, PkiError> {
    ServerName::try_from(host_name(host)).map_err(|_| PkiError::Pem { what: "host name" })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_same_secret_issues_the_same_certificates() {
        let host = HostId::new();
        let a = Authority::new(b"secret one").unwrap();
        let b = Authority::new(b"secret one").unwrap();
        assert_eq!(a.ca_pem(), b.ca_pem());
        assert_eq!(a.host(host).unwrap(), b.host(host).unwrap());
        assert_eq!(a.control_plane().unwrap(), b.control_plane().unwrap());
        let other = Authority::new(b"secret two").unwrap();
        assert_ne!(a.ca_pem(), other.ca_pem());
        assert_ne!(a.host(host).unwrap(), a.host(HostId::new()).unwrap());
    }

    /// Runs a handshake in memory; the first error either side raises.
    fn handshake(
        client: Arc<rustls::ClientConfig>,
        name: ServerName<'static>,
        server: Arc<rustls::ServerConfig>,
    ) -> Result<(), rustls::Error> {
        let mut c = rustls::ClientConnection::new(client, name)?;
        let mut s = rustls::ServerConnection::new(server)?;
        for _ in 0..20 {
            let mut buf = Vec::new();
            while c.wants_write() {
                c.write_tls(&mut buf).unwrap();
            }
            let mut rd = &buf[..];
            while !rd.is_empty() {
                s.read_tls(&mut rd).unwrap();
            }
            s.process_new_packets()?;
            let mut buf = Vec::new();
            while s.wants_write() {
                s.write_tls(&mut buf).unwrap();
            }
            let mut rd = &buf[..];
            while !rd.is_empty() {
                c.read_tls(&mut rd).unwrap();
            }
            c.process_new_packets()?;
            if !c.is_handshaking() && !s.is_handshaking() {
                return Ok(());
            }
        }
        Err(rustls::Error::General("no handshake".into()))
    }

    #[test]
    fn only_the_control_plane_reaches_only_the_host_it_names() {
        let ca = Authority::new(b"s").unwrap();
        let host = HostId::new();
        let server = server_config(&ca.host(host).unwrap()).unwrap();
        let cp = client_config(&ca.control_plane().unwrap(), &[b"h2"]).unwrap();
        handshake(cp.clone(), server_name(host).unwrap(), server.clone()).unwrap();
        // Another host's certificate is not the one meant.
        assert!(handshake(cp, server_name(HostId::new()).unwrap(), server.clone()).is_err());
        // Another authority's control plane, or a client without a certificate, is refused.
        let stranger = Authority::new(b"other").unwrap();
        let mut wrong = stranger.control_plane().unwrap();
        wrong.ca_pem = ca.ca_pem().to_string();
        let wrong = client_config(&wrong, &[b"h2"]).unwrap();
        assert!(handshake(wrong, server_name(host).unwrap(), server.clone()).is_err());
        let anonymous = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots(ca.ca_pem()).unwrap())
            .with_no_client_auth();
        assert!(handshake(Arc::new(anonymous), server_name(host).unwrap(), server).is_err());
    }

    #[test]
    fn a_hosts_certificate_opens_no_other_host() {
        // A host (a deleted one, say) presenting its own certificate as a client is
        // refused: it is for server authentication only.
        let ca = Authority::new(b"s").unwrap();
        let (one, two) = (HostId::new(), HostId::new());
        let server = server_config(&ca.host(two).unwrap()).unwrap();
        let as_client = client_config(&ca.host(one).unwrap(), &[b"h2"]).unwrap();
        assert!(handshake(as_client, server_name(two).unwrap(), server).is_err());
    }

    #[test]
    fn configurations_build() {
        let ca = Authority::new(b"s").unwrap();
        server_config(&ca.host(HostId::new()).unwrap()).unwrap();
        client_config(&ca.control_plane().unwrap(), &[b"h2"]).unwrap();
    }

    #[test]
    fn the_public_listener_takes_an_operators_certificate() {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["*.sandboxes.test".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let config = public_server_config(&cert.pem(), &key.serialize_pem()).unwrap();
        assert_eq!(config.alpn_protocols[0], b"h2");
        assert!(matches!(
            public_server_config("not a certificate", &key.serialize_pem()),
            Err(PkiError::Pem { .. })
        ));
        assert!(public_server_config(&cert.pem(), "not a key").is_err());
    }
}
