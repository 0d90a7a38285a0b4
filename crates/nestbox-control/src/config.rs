//! The control plane's configuration and its limits, validated at start-up.

use std::net::SocketAddr;
use std::time::Duration;

/// Upper bounds on what a request may ask for. Requests beyond them get 400
/// `limit_exceeded` naming the limit.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// vCPUs per sandbox.
    pub max_vcpus: u32,
    /// Memory per sandbox, MiB.
    pub max_memory_mb: u32,
    /// Smallest memory per sandbox, MiB.
    pub min_memory_mb: u32,
    /// Disk per sandbox, MiB.
    pub max_disk_mb: u32,
    /// Inactivity timeout, seconds.
    pub max_timeout_sec: u32,
    /// Absolute lifetime of a sandbox, seconds.
    pub max_lifetime_sec: u32,
    /// Exec timeout, seconds.
    pub max_exec_timeout_sec: u32,
    /// Upload size, bytes.
    pub max_upload_bytes: u64,
    /// Environment variables per sandbox or command.
    pub max_env_vars: usize,
    /// Metadata pairs per sandbox.
    pub max_metadata: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_vcpus: 8,
            max_memory_mb: 16384,
            min_memory_mb: 128,
            max_disk_mb: 102_400,
            max_timeout_sec: 7 * 24 * 3600,
            max_lifetime_sec: 7 * 24 * 3600,
            max_exec_timeout_sec: 3600,
            max_upload_bytes: 4 << 30,
            max_env_vars: 128,
            max_metadata: 64,
        }
    }
}

/// Everything the control plane needs.
#[derive(Debug, Clone)]
pub struct ControlConfig {
    /// Where the REST API listens.
    pub listen: SocketAddr,
    /// Database URL (`sqlite://…` or `postgres://…`).
    pub database_url: String,
    /// Secret that session tokens and host keys derive from (at least 32 bytes).
    pub master_secret: Vec<u8>,
    /// Request limits.
    pub limits: Limits,
    /// Lifetime of user session tokens.
    pub session_ttl: Duration,
    /// A host without heartbeat for this long is unreachable.
    pub host_grace: Duration,
    /// How often the host monitor runs.
    pub monitor_interval: Duration,
    /// How often sandboxes whose lifetime ended are looked for (the precision of a
    /// deadline).
    pub expiry_interval: Duration,
    /// Heartbeat period announced to agents.
    pub heartbeat_interval: Duration,
    /// Lifetime of a host's access token (a JWT its heartbeats carry).
    pub host_access_ttl: Duration,
    /// Lifetime of a host's refresh token (traded for the next pair before it ends).
    pub host_refresh_ttl: Duration,
    /// Memory overcommit factor the scheduler allows per host.
    pub memory_overcommit: f64,
    /// How sandboxes are placed on hosts.
    pub scheduler: crate::scheduler::Policy,
    /// A bearer token that may read `/metrics` (for a Prometheus scraper); platform
    /// admins may read it either way.
    pub metrics_token: Option<String>,
    /// Deadline of a sandbox create call to an agent.
    pub create_timeout: Duration,
    /// Deadline of a pause or resume call to an agent. The host monitor leaves a sandbox
    /// that was marked `paused` more recently than this alone, because its pause may still
    /// be in flight.
    pub pause_timeout: Duration,
    /// Deadline of a call that writes or deletes a template's files on an agent.
    pub template_timeout: Duration,
    /// How often placement's view of the fleet is read from the database (see
    /// [`crate::fleet_view`]); zero: every create reads the database.
    pub placement_refresh: Duration,
    /// Domain under which `{port}-{sandbox_id}.{domain}` reaches a port in a sandbox (a
    /// wildcard DNS name pointing at the control plane); `None` turns host routing off.
    pub proxy_domain: Option<String>,
    /// The public listener serves HTTPS with this certificate chain and key (PEM files;
    /// for E2B's SDKs, a wildcard certificate for `*.{proxy_domain}`); `None`: plain HTTP.
    pub tls: Option<TlsFiles>,
    /// A second, plain-HTTP listener (on loopback) for a host agent in the same process,
    /// when the public one serves TLS with a certificate that agent cannot check.
    pub local_listen: Option<SocketAddr>,
    /// Login attempts allowed per client address and per account.
    pub login_limits: crate::throttle::LoginLimits,
    /// Template builds: archive sizes and the step cache's bounds.
    pub builds: BuildLimits,
}

/// Bounds of template builds.
#[derive(Debug, Clone)]
pub struct BuildLimits {
    /// Largest archive a copy step unpacks.
    pub max_archive_bytes: u64,
    /// Space all of a team's archives may take.
    pub max_archives_bytes: u64,
    /// Step-cache space per team; the least recently used entries beyond it are dropped.
    pub cache_max_bytes: u64,
    /// Cache entries and archives unused this long are dropped.
    pub cache_max_age: Duration,
    /// A build whose runner has not been heard of for this long is failed (its runner
    /// stopped with its process).
    pub stale_after: Duration,
}

impl Default for BuildLimits {
    fn default() -> Self {
        BuildLimits {
            max_archive_bytes: 256 << 20,
            max_archives_bytes: 2 << 30,
            cache_max_bytes: 20 << 30,
            cache_max_age: Duration::from_secs(7 * 24 * 3600),
            stale_after: Duration::from_secs(60),
        }
    }
}

/// Where the public listener's certificate and key are.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// Certificate chain, PEM (the server's certificate first).
    pub cert: std::path::PathBuf,
    /// Its private key, PEM.
    pub key: std::path::PathBuf,
}

impl ControlConfig {
    /// Defaults around a listen address, database and secret.
    pub fn new(
        listen: SocketAddr,
        database_url: impl Into<String>,
        master_secret: Vec<u8>,
    ) -> Self {
        Self {
            listen,
            database_url: database_url.into(),
            master_secret,
            limits: Limits::default(),
            session_ttl: Duration::from_secs(12 * 3600),
            host_grace: Duration::from_secs(90),
            monitor_interval: Duration::from_secs(10),
            expiry_interval: Duration::from_secs(1),
            heartbeat_interval: Duration::from_secs(15),
            host_access_ttl: Duration::from_secs(7 * 24 * 3600),
            host_refresh_ttl: Duration::from_secs(60 * 24 * 3600),
            memory_overcommit: 2.0,
            scheduler: crate::scheduler::Policy::LeastLoaded,
            metrics_token: None,
            create_timeout: Duration::from_secs(180),
            pause_timeout: Duration::from_secs(120),
            template_timeout: Duration::from_secs(600),
            placement_refresh: Duration::from_millis(250),
            proxy_domain: None,
            tls: None,
            local_listen: None,
            login_limits: crate::throttle::LoginLimits::default(),
            builds: BuildLimits::default(),
        }
    }

    /// Checks values that would fail later.
    pub fn validate(&self) -> Result<(), String> {
        if self.master_secret.len() < 32 {
            return Err("the master secret must be at least 32 bytes".into());
        }
        if self.limits.max_vcpus == 0 || self.limits.max_memory_mb < self.limits.min_memory_mb {
            return Err("limits: max_vcpus must be ≥ 1 and max_memory_mb ≥ min_memory_mb".into());
        }
        if let Some(domain) = &self.proxy_domain
            && (domain.is_empty()
                || domain.starts_with('.')
                || domain.ends_with('.')
                || !domain
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.'))
        {
            return Err(format!("proxy domain `{domain}` is not a DNS name"));
        }
        if self.host_access_ttl.is_zero() || self.host_refresh_ttl <= self.host_access_ttl {
            return Err(
                "host tokens: the refresh token must outlive the access token (both > 0)".into(),
            );
        }
        if self.memory_overcommit < 1.0 {
            return Err("memory_overcommit must be at least 1.0".into());
        }
        Ok(())
    }
}
