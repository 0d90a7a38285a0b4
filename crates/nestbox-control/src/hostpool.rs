//! Clients of host agents, one per host, created lazily and evicted when a host goes away.
//!
//! Each call carries a short-lived token signed with the host's key, which the control
//! plane derives from its master secret ([`nestbox_proto::auth`]). Tokens are cached and
//! re-issued before they expire.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nestbox_proto::hostagent::host_agent_client::HostAgentClient;
use nestbox_types::HostId;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

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
    clients: Arc<Mutex<HashMap<HostId, (String, AgentClient)>>>,
}

impl std::fmt::Debug for HostPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostPool").finish_non_exhaustive()
    }
}

impl HostPool {
    /// A pool signing calls with keys derived from `master_secret`.
    pub fn new(master_secret: Vec<u8>) -> Self {
        Self {
            master_secret: Arc::new(master_secret),
            clients: Arc::new(Mutex::new(HashMap::new())),
        }
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
        let endpoint = Endpoint::from_shared(address.to_string())
            .map_err(|e| {
                ApiError::internal(format!("host {host} has an invalid address {address}: {e}"))
            })?
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

    /// Forgets a host's client (host deleted).
    pub fn evict(&self, host: HostId) {
        if let Ok(mut clients) = self.clients.lock() {
            clients.remove(&host);
        }
    }
}
