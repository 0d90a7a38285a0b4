//! Clients of host agents, one per host, created lazily and evicted when a host goes away.
//!
//! Each call carries a short-lived token signed with the host's key, which the control
//! plane derives from its master secret ([`nestbox_proto::auth`]). Tokens are cached and
//! re-issued before they expire. Agents at `https://` addresses are dialled over mutual
//! TLS ([`nestbox_pki`]): the control plane presents its client certificate and accepts
//! only the certificate its CA issued to the host it means to reach.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nestbox_proto::hostagent::host_agent_client::HostAgentClient;
use nestbox_types::HostId;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::error::ApiError;

/// Largest message sent to an agent (uploads are chunked well below it).
const MAX_ENCODED_MESSAGE: usize = 8 << 20;

/// A client of one host agent.
pub type AgentClient = HostAgentClient<InterceptedService<Channel, HostAuth>>;

/// Adds the control-plane token to every call.
#[derive(Clone)]
pub struct HostAuth {
    host: HostId,
    key: Arc<String>,
    cached: Arc<Mutex<Option<(String, Instant)>>>,
}

impl HostAuth {
    fn token(&self) -> Result<String, tonic::Status> {
        let mut cached = self
            .cached
            .lock()
            .map_err(|_| tonic::Status::internal("token cache poisoned"))?;
        if let Some((token, at)) = cached.as_ref()
            && at.elapsed() < nestbox_proto::auth::TOKEN_TTL / 2
        {
            return Ok(token.clone());
        }
        let token = nestbox_proto::auth::issue(&self.key, self.host)
            .map_err(|e| tonic::Status::internal(format!("cannot sign agent token: {e}")))?;
        *cached = Some((token.clone(), Instant::now()));
        Ok(token)
    }
}

impl tonic::service::Interceptor for HostAuth {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        let value = format!("Bearer {}", self.token()?)
            .parse()
            .map_err(|_| tonic::Status::internal("token is not a header value"))?;
        req.metadata_mut().insert("authorization", value);
        Ok(req)
    }
}

/// Lazily created agent clients keyed by host id.
#[derive(Clone)]
pub struct HostPool {
    master_secret: Arc<Vec<u8>>,
    authority: Arc<nestbox_pki::Authority>,
    /// The control plane's client certificate (mutual TLS).
    identity: Arc<nestbox_pki::TlsBundle>,
    clients: Arc<Mutex<HashMap<HostId, (String, AgentClient)>>>,
    forwarders: Arc<Mutex<HashMap<HostId, Arc<TlsForwarder>>>>,
}

/// Forwards proxied requests to one host agent over mutual TLS.
pub type TlsForwarder = nestbox_forward::Forwarder<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
>;

impl std::fmt::Debug for HostPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostPool").finish_non_exhaustive()
    }
}

impl HostPool {
    /// A pool signing calls with keys derived from `master_secret`, and dialling agents
    /// at `https://` addresses over mutual TLS with certificates of its CA.
    pub fn new(master_secret: Vec<u8>) -> Result<Self, nestbox_pki::PkiError> {
        let authority = nestbox_pki::Authority::new(&master_secret)?;
        let identity = authority.control_plane()?;
        Ok(Self {
            master_secret: Arc::new(master_secret),
            authority: Arc::new(authority),
            identity: Arc::new(identity),
            clients: Arc::new(Mutex::new(HashMap::new())),
            forwarders: Arc::new(Mutex::new(HashMap::new())),
        })
    }

    /// A host's TLS material (what it gets at registration).
    pub fn host_tls(&self, host: HostId) -> Result<nestbox_pki::TlsBundle, ApiError> {
        self.authority
            .host(host)
            .map_err(|e| ApiError::internal(format!("issuing the certificate of {host}: {e}")))
    }

    /// The forwarder of proxied requests to `host` (mutual TLS, `host`'s certificate).
    pub fn tls_forwarder(&self, host: HostId) -> Result<Arc<TlsForwarder>, ApiError> {
        let mut forwarders = self
            .forwarders
            .lock()
            .map_err(|_| ApiError::internal("host pool poisoned"))?;
        if let Some(f) = forwarders.get(&host) {
            return Ok(f.clone());
        }
        let tls = |e: nestbox_pki::PkiError| ApiError::internal(format!("TLS to {host}: {e}"));
        let config = nestbox_pki::client_config(&self.identity, &[]).map_err(tls)?;
        let name = nestbox_pki::server_name(host).map_err(tls)?;
        let mut http = hyper_util::client::legacy::connect::HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(nestbox_forward::CONNECT_TIMEOUT));
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config((*config).clone())
            .https_only()
            .with_server_name_resolver(hyper_rustls::FixedServerNameResolver::new(name))
            .enable_http1()
            .wrap_connector(http);
        let forwarder = Arc::new(nestbox_forward::Forwarder::with_connector(
            connector, "https",
        ));
        forwarders.insert(host, forwarder.clone());
        Ok(forwarder)
    }

    /// The key a host gets at registration.
    pub fn host_key(&self, host: HostId) -> String {
        nestbox_proto::auth::derive_host_key(&self.master_secret, host)
    }

    /// A fresh bearer token for `host` (what gRPC calls carry), for proxied HTTP requests.
    pub fn token(&self, host: HostId) -> Result<String, ApiError> {
        nestbox_proto::auth::issue(&self.host_key(host), host)
            .map_err(|e| ApiError::internal(format!("cannot sign agent token: {e}")))
    }

    /// The client of `host` at `address`; re-created if the address changed.
    pub fn client(&self, host: HostId, address: &str) -> Result<AgentClient, ApiError> {
        let mut clients = self
            .clients
            .lock()
            .map_err(|_| ApiError::internal("host pool poisoned"))?;
        if let Some((addr, client)) = clients.get(&host)
            && addr == address
        {
            return Ok(client.clone());
        }
        let mut endpoint = Endpoint::from_shared(address.to_string()).map_err(|e| {
            ApiError::internal(format!("host {host} has an invalid address {address}: {e}"))
        })?;
        if address.starts_with("https://") {
            let tls = ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(&self.identity.ca_pem))
                .identity(Identity::from_pem(
                    &self.identity.cert_pem,
                    &self.identity.key_pem,
                ))
                .domain_name(nestbox_pki::host_name(host));
            endpoint = endpoint
                .tls_config(tls)
                .map_err(|e| ApiError::internal(format!("TLS to {host}: {e}")))?;
        }
        let endpoint = endpoint
            .connect_timeout(Duration::from_secs(5))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_while_idle(true);
        let channel = endpoint.connect_lazy();
        let auth = HostAuth {
            host,
            key: Arc::new(self.host_key(host)),
            cached: Arc::new(Mutex::new(None)),
        };
        let client = HostAgentClient::with_interceptor(channel, auth)
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(MAX_ENCODED_MESSAGE);
        clients.insert(host, (address.to_string(), client.clone()));
        Ok(client)
    }

    /// Forgets a host's client (host deleted or moved).
    pub fn evict(&self, host: HostId) {
        if let Ok(mut clients) = self.clients.lock() {
            clients.remove(&host);
        }
        if let Ok(mut forwarders) = self.forwarders.lock() {
            forwarders.remove(&host);
        }
    }
}
