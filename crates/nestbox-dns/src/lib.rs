//! The pinning DNS resolver behind a sandbox's domain egress rules.
//!
//! A domain rule (`allow_out: ["example.com"]`) cannot be enforced by a packet filter,
//! which sees addresses only. So when a sandbox's rules name domains, the host redirects
//! every DNS query its guest sends, whatever its destination, to one [`DnsGuard`] per
//! sandbox, listening on the guest's gateway inside the sandbox's network namespace.
//! The guard:
//! - refuses names it may not resolve (everything but the allowed names when the rules
//!   deny all other traffic), so DNS cannot carry data out of a closed sandbox;
//! - forwards the rest, as the guest sent it, to the host's resolvers, and returns their
//!   answer unchanged;
//! - for an allowed name, lets through ("pins") the IPv4 addresses of the answer *before*
//!   the guest sees it, for the answer's TTL clamped to [`PIN_MIN`]..[`PIN_MAX`] (at most
//!   [`MAX_PINS_PER_ANSWER`] per answer and [`MAX_PINS`] per sandbox: a guest allowed a
//!   wildcard cannot make the host hold an unbounded set).
//!
//! Queries go upstream under a fresh random id, rebuilt from what was parsed, and an
//! answer counts only if it carries that id and the same question: the guest cannot
//! choose the id an off-path forger would have to guess, nor smuggle other bytes out.
//!
//! An address is therefore reachable through a domain rule only if the host's resolver
//! gave it for an allowed name: resolving elsewhere (another server, DNS over HTTPS,
//! a hard-coded address) gains nothing. Addresses shared by several names (CDNs) are
//! reachable through any of them; that is inherent to filtering by address.
//!
//! The nftables side is behind [`PinTable`], so the resolver's logic is tested here with a
//! recording table and a fake upstream; the host agent implements it on the namespace's
//! sets. Invariants: a pinned address is in [`PinTable`] for as long as the guard's own
//! record says (pins and unpins are serialised with that record); replacing the rules
//! keeps exactly the pins of names the new rules still allow, in the table and in the
//! record at once; once the guard is dropped nothing more is pinned.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use hickory_proto::op::{Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::RData;
use nestbox_types::egress::Egress;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{Mutex, Semaphore};
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// Shortest time an answered address stays reachable: programs cache answers beyond
/// their TTL, and a connection attempt must not race the expiry.
pub const PIN_MIN: Duration = Duration::from_secs(10 * 60);
/// Longest time an answered address stays reachable without being resolved again.
pub const PIN_MAX: Duration = Duration::from_secs(24 * 60 * 60);
/// How long one upstream resolver may take to answer.
pub const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(3);
/// Most addresses pinned for one sandbox at once; an answer that would pin more fails.
pub const MAX_PINS: usize = 4096;
/// Most addresses one answer pins (the first ones; the rest stay unreachable).
pub const MAX_PINS_PER_ANSWER: usize = 32;
/// How long one change of the table may take.
pub const TABLE_TIMEOUT: Duration = Duration::from_secs(5);
/// How often expired pins are taken back.
const SWEEP_EVERY: Duration = Duration::from_secs(30);
/// Most UDP queries answered at once; more are dropped (the guest retries).
const MAX_UDP_IN_FLIGHT: usize = 64;
/// Most TCP connections at once; more wait.
const MAX_TCP_CONNECTIONS: usize = 16;
/// How long a TCP connection may sit idle.
const TCP_IDLE: Duration = Duration::from_secs(10);

/// An error of the table the guard pins into.
pub type TableError = Box<dyn std::error::Error + Send + Sync>;

/// Where the tenant's rules and the pinned addresses are enforced (the nftables sets of
/// the sandbox's namespace).
pub trait PinTable: Send + Sync + 'static {
    /// Puts `egress` in force, replacing the rules and every pinned address but `keep`.
    fn replace(
        &self,
        egress: &Egress,
        keep: &[Ipv4Addr],
    ) -> impl Future<Output = Result<(), TableError>> + Send;
    /// Lets the guest reach `ips`.
    fn pin(&self, ips: &[Ipv4Addr]) -> impl Future<Output = Result<(), TableError>> + Send;
    /// Takes back pinned addresses.
    fn unpin(&self, ips: &[Ipv4Addr]) -> impl Future<Output = Result<(), TableError>> + Send;
}

/// Why the guard could not start or change its rules.
#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    /// The listening sockets could not be made.
    #[error("binding the sandbox's resolver to {addr} in {}", netns.display())]
    Bind {
        /// The network namespace.
        netns: PathBuf,
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The bound sockets could not join the runtime.
    #[error("registering the sandbox's resolver sockets")]
    Register(#[source] io::Error),
    /// The rules could not be put in force.
    #[error("putting the egress rules in force")]
    Table(#[source] TableError),
}

/// The guard's listening sockets, bound before it starts.
#[derive(Debug)]
pub struct Sockets {
    udp: std::net::UdpSocket,
    tcp: std::net::TcpListener,
}

impl Sockets {
    /// Binds UDP and TCP `addr` inside the network namespace at `netns` (e.g.
    /// `/run/netns/nbx7`). Blocks for the life of a short thread that enters the namespace
    /// (the process's other threads stay where they are).
    pub fn bind_in(netns: &Path, addr: SocketAddr) -> Result<Sockets, DnsError> {
        let path = netns.to_path_buf();
        let bound = std::thread::spawn(move || -> io::Result<Sockets> {
            let ns = std::fs::File::open(&path)?;
            nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(io::Error::from)?;
            Self::bind(addr)
        })
        .join()
        .unwrap_or_else(|_| Err(io::Error::other("the binding thread panicked")));
        bound.map_err(|source| DnsError::Bind {
            netns: netns.to_path_buf(),
            addr,
            source,
        })
    }

    /// Binds UDP and TCP `addr` in the caller's namespace. With port 0, both get the same
    /// free port (a port free for UDP may be taken for TCP: a few are tried).
    pub fn bind(addr: SocketAddr) -> io::Result<Sockets> {
        let mut attempts = if addr.port() == 0 { 16 } else { 1 };
        loop {
            let udp = std::net::UdpSocket::bind(addr)?;
            match std::net::TcpListener::bind(udp.local_addr()?) {
                Ok(tcp) => {
                    udp.set_nonblocking(true)?;
                    tcp.set_nonblocking(true)?;
                    return Ok(Sockets { udp, tcp });
                }
                Err(e) if attempts > 1 && e.kind() == io::ErrorKind::AddrInUse => attempts -= 1,
                Err(e) => return Err(e),
            }
        }
    }

    /// The bound address.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.udp.local_addr()
    }
}

/// A pinned address: until when, and for which names.
struct Pin {
    until: Instant,
    names: Vec<String>,
}

struct Shared<T> {
    table: T,
    upstream: Vec<SocketAddr>,
    /// The rules in force (read by every query; written under `pins`' lock).
    egress: std::sync::RwLock<Arc<Egress>>,
    /// Pinned addresses; its lock serialises every change of the table.
    pins: Mutex<HashMap<Ipv4Addr, Pin>>,
    /// The guard was dropped: pin nothing more.
    closed: std::sync::atomic::AtomicBool,
}

impl<T: PinTable> Shared<T> {
    fn egress(&self) -> Arc<Egress> {
        match self.egress.read() {
            Ok(e) => e.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    fn set_egress(&self, egress: Egress) {
        let mut guard = match self.egress.write() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        *guard = Arc::new(egress);
    }
}

/// `op` on the table, bounded by [`TABLE_TIMEOUT`].
async fn bounded(op: impl Future<Output = Result<(), TableError>>) -> Result<(), TableError> {
    tokio::time::timeout(TABLE_TIMEOUT, op)
        .await
        .unwrap_or_else(|_| Err("the table did not answer in time".into()))
}

/// A running resolver for one sandbox. Dropping it stops it (its sockets close); the
/// namespace's sets are left as they are.
pub struct DnsGuard<T: PinTable> {
    shared: Arc<Shared<T>>,
    tasks: Vec<JoinHandle<()>>,
}

impl<T: PinTable> std::fmt::Debug for DnsGuard<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DnsGuard")
            .field("upstream", &self.shared.upstream)
            .finish_non_exhaustive()
    }
}

impl<T: PinTable> Drop for DnsGuard<T> {
    fn drop(&mut self) {
        self.shared
            .closed
            .store(true, std::sync::atomic::Ordering::SeqCst);
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl<T: PinTable> DnsGuard<T> {
    /// Puts `egress` in force in `table`, then serves queries on `sockets`, forwarding them
    /// to `upstream` resolvers (tried in order). Must run inside a Tokio runtime.
    pub async fn start(
        sockets: Sockets,
        table: T,
        egress: Egress,
        upstream: Vec<SocketAddr>,
    ) -> Result<Self, DnsError> {
        bounded(table.replace(&egress, &[]))
            .await
            .map_err(DnsError::Table)?;
        let udp = UdpSocket::from_std(sockets.udp).map_err(DnsError::Register)?;
        let tcp = TcpListener::from_std(sockets.tcp).map_err(DnsError::Register)?;
        let shared = Arc::new(Shared {
            table,
            upstream,
            egress: std::sync::RwLock::new(Arc::new(egress)),
            pins: Mutex::new(HashMap::new()),
            closed: std::sync::atomic::AtomicBool::new(false),
        });
        let tasks = vec![
            tokio::spawn(serve_udp(shared.clone(), Arc::new(udp))),
            tokio::spawn(serve_tcp(shared.clone(), tcp)),
            tokio::spawn(sweep(shared.clone())),
        ];
        Ok(DnsGuard { shared, tasks })
    }

    /// Replaces the rules: the table's and the guard's. Pins of names the new rules still
    /// allow stay; the others go. On failure the earlier rules stay in the guard (the table
    /// may hold either: the caller reports it).
    pub async fn replace(&self, egress: Egress) -> Result<(), DnsError> {
        let mut pins = self.shared.pins.lock().await;
        pins.retain(|_, pin| pin.names.iter().any(|n| egress.domain_allowed(n)));
        let keep: Vec<Ipv4Addr> = pins.keys().copied().collect();
        if let Err(e) = bounded(self.shared.table.replace(&egress, &keep)).await {
            // The table's pins are unknown now: forget ours, so they are pinned again.
            pins.clear();
            return Err(DnsError::Table(e));
        }
        self.shared.set_egress(egress);
        Ok(())
    }

    /// The rules in force.
    pub fn egress(&self) -> Arc<Egress> {
        self.shared.egress()
    }

    /// Addresses pinned now.
    pub async fn pinned(&self) -> Vec<Ipv4Addr> {
        let mut v: Vec<_> = self.shared.pins.lock().await.keys().copied().collect();
        v.sort();
        v
    }
}

async fn serve_udp<T: PinTable>(shared: Arc<Shared<T>>, sock: Arc<UdpSocket>) {
    let permits = Arc::new(Semaphore::new(MAX_UDP_IN_FLIGHT));
    let mut buf = vec![0u8; 65535];
    loop {
        let (n, from) = match sock.recv_from(&mut buf).await {
            Ok(x) => x,
            Err(e) => {
                tracing::debug!(error = %e, "sandbox resolver: receiving");
                continue;
            }
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            continue;
        };
        let query = buf[..n].to_vec();
        let (shared, sock) = (shared.clone(), sock.clone());
        tokio::spawn(async move {
            if let Some(answer) = answer(&shared, &query, Transport::Udp).await
                && let Err(e) = sock.send_to(&answer, from).await
            {
                tracing::debug!(error = %e, "sandbox resolver: replying");
            }
            drop(permit);
        });
    }
}

async fn serve_tcp<T: PinTable>(shared: Arc<Shared<T>>, listener: TcpListener) {
    let permits = Arc::new(Semaphore::new(MAX_TCP_CONNECTIONS));
    loop {
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return;
        };
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let _ = serve_tcp_connection(&shared, stream).await;
            drop(permit);
        });
    }
}

async fn serve_tcp_connection<T: PinTable>(
    shared: &Shared<T>,
    mut stream: TcpStream,
) -> io::Result<()> {
    loop {
        let Ok(query) = tokio::time::timeout(TCP_IDLE, read_framed(&mut stream)).await else {
            return Ok(());
        };
        let query = query?;
        if let Some(answer) = answer(shared, &query, Transport::Tcp).await {
            write_framed(&mut stream, &answer).await?;
        }
    }
}

async fn read_framed(stream: &mut TcpStream) -> io::Result<Vec<u8>> {
    let len = stream.read_u16().await?;
    let mut buf = vec![0u8; usize::from(len)];
    stream.read_exact(&mut buf).await?;
    Ok(buf)
}

async fn write_framed(stream: &mut TcpStream, msg: &[u8]) -> io::Result<()> {
    let len = u16::try_from(msg.len()).map_err(|_| io::Error::other("message too long"))?;
    let mut out = Vec::with_capacity(msg.len() + 2);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(msg);
    stream.write_all(&out).await
}

async fn sweep<T: PinTable>(shared: Arc<Shared<T>>) {
    let mut tick = tokio::time::interval(SWEEP_EVERY);
    loop {
        tick.tick().await;
        let mut pins = shared.pins.lock().await;
        let now = Instant::now();
        let expired: Vec<Ipv4Addr> = pins
            .iter()
            .filter(|(_, pin)| pin.until <= now)
            .map(|(ip, _)| *ip)
            .collect();
        if expired.is_empty() {
            continue;
        }
        if let Err(e) = bounded(shared.table.unpin(&expired)).await {
            // One at a time, so one that is gone already does not keep the others.
            tracing::debug!(error = %e, "sandbox resolver: taking back expired addresses");
            for ip in &expired {
                if let Err(e) = bounded(shared.table.unpin(&[*ip])).await {
                    tracing::warn!(%ip, error = %e, "sandbox resolver: taking back an expired address");
                }
            }
        }
        for ip in &expired {
            pins.remove(ip);
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Transport {
    Udp,
    Tcp,
}

/// The answer to one query, or `None` when it deserves none (too short to echo its id).
async fn answer<T: PinTable>(
    shared: &Shared<T>,
    query: &[u8],
    transport: Transport,
) -> Option<Vec<u8>> {
    let parsed = match Message::from_vec(query) {
        Ok(m) => m,
        Err(_) => {
            let id = u16::from_be_bytes([*query.first()?, *query.get(1)?]);
            let mut m = Message::new();
            m.set_id(id)
                .set_message_type(MessageType::Response)
                .set_response_code(ResponseCode::FormErr);
            return m.to_vec().ok();
        }
    };
    if parsed.message_type() != MessageType::Query {
        return None;
    }
    if parsed.op_code() != OpCode::Query {
        return reply_code(&parsed, ResponseCode::NotImp);
    }
    let [question] = parsed.queries() else {
        return reply_code(&parsed, ResponseCode::FormErr);
    };
    let name = question.name().to_ascii();
    if !shared.egress().may_resolve(&name) {
        tracing::debug!(name, "sandbox resolver: refused");
        return reply_code(&parsed, ResponseCode::Refused);
    }
    // Upstream under a fresh random id, rebuilt from what was parsed.
    let mut id = [0u8; 2];
    if getrandom::fill(&mut id).is_err() {
        return reply_code(&parsed, ResponseCode::ServFail);
    }
    let upstream_id = u16::from_ne_bytes(id);
    let mut outgoing = parsed.clone();
    outgoing.set_id(upstream_id);
    let Ok(outgoing) = outgoing.to_vec() else {
        return reply_code(&parsed, ResponseCode::FormErr);
    };
    let Some(raw) = ask_upstream(&shared.upstream, &outgoing, transport).await else {
        return reply_code(&parsed, ResponseCode::ServFail);
    };
    let Ok(mut response) = Message::from_vec(&raw) else {
        return reply_code(&parsed, ResponseCode::ServFail);
    };
    if response.id() != upstream_id
        || response.message_type() != MessageType::Response
        || response.queries() != parsed.queries()
    {
        return reply_code(&parsed, ResponseCode::ServFail);
    }
    response.set_id(parsed.id());
    let addresses: Vec<(Ipv4Addr, Duration)> = response
        .answers()
        .iter()
        .filter_map(|r| match r.data() {
            RData::A(a) => Some((a.0, Duration::from_secs(u64::from(r.ttl())))),
            _ => None,
        })
        .take(MAX_PINS_PER_ANSWER)
        .collect();
    if !addresses.is_empty() {
        let mut pins = shared.pins.lock().await;
        if shared.closed.load(std::sync::atomic::Ordering::SeqCst) {
            return None;
        }
        // Checked again under the lock: the rules may have changed meanwhile.
        let egress = shared.egress();
        if egress.domain_allowed(&name) {
            let now = Instant::now();
            let fresh: Vec<Ipv4Addr> = addresses
                .iter()
                .map(|(ip, _)| *ip)
                .filter(|ip| !pins.contains_key(ip))
                .collect();
            if pins.len() + fresh.len() > MAX_PINS {
                tracing::warn!(
                    name,
                    pinned = pins.len(),
                    "sandbox resolver: too many addresses pinned"
                );
                return reply_code(&parsed, ResponseCode::ServFail);
            }
            if !fresh.is_empty()
                && let Err(e) = bounded(shared.table.pin(&fresh)).await
            {
                tracing::warn!(name, error = %e, "sandbox resolver: letting answered addresses through");
                return reply_code(&parsed, ResponseCode::ServFail);
            }
            let lower = name.trim_end_matches('.').to_ascii_lowercase();
            for (ip, ttl) in addresses {
                let until = now + ttl.clamp(PIN_MIN, PIN_MAX);
                let pin = pins.entry(ip).or_insert_with(|| Pin {
                    until,
                    names: Vec::new(),
                });
                pin.until = pin.until.max(until);
                if !pin.names.contains(&lower) && pin.names.len() < 8 {
                    pin.names.push(lower.clone());
                }
            }
        } else if !egress.may_resolve(&name) {
            return reply_code(&parsed, ResponseCode::Refused);
        }
    }
    response.to_vec().ok()
}

/// A reply with no answer and `code`, echoing the question.
fn reply_code(query: &Message, code: ResponseCode) -> Option<Vec<u8>> {
    let mut m = Message::new();
    m.set_id(query.id())
        .set_message_type(MessageType::Response)
        .set_op_code(query.op_code())
        .set_recursion_desired(query.recursion_desired())
        .set_recursion_available(true)
        .set_response_code(code)
        .add_queries(query.queries().to_vec());
    m.to_vec().ok()
}

/// The first answer an upstream resolver gives, trying each in turn.
async fn ask_upstream(
    upstream: &[SocketAddr],
    query: &[u8],
    transport: Transport,
) -> Option<Vec<u8>> {
    for server in upstream {
        let asked = match transport {
            Transport::Udp => tokio::time::timeout(UPSTREAM_TIMEOUT, ask_udp(*server, query)).await,
            Transport::Tcp => tokio::time::timeout(UPSTREAM_TIMEOUT, ask_tcp(*server, query)).await,
        };
        match asked {
            Ok(Ok(answer)) => return Some(answer),
            Ok(Err(e)) => tracing::debug!(%server, error = %e, "sandbox resolver: upstream failed"),
            Err(_) => tracing::debug!(%server, "sandbox resolver: upstream timed out"),
        }
    }
    None
}

async fn ask_udp(server: SocketAddr, query: &[u8]) -> io::Result<Vec<u8>> {
    let sock = UdpSocket::bind(SocketAddr::from(([0, 0, 0, 0], 0))).await?;
    sock.connect(server).await?;
    sock.send(query).await?;
    let mut buf = vec![0u8; 65535];
    loop {
        let n = sock.recv(&mut buf).await?;
        // Only an answer to this query (same id) counts.
        if n >= 2 && query.len() >= 2 && buf[..2] == query[..2] {
            buf.truncate(n);
            return Ok(buf);
        }
    }
}

async fn ask_tcp(server: SocketAddr, query: &[u8]) -> io::Result<Vec<u8>> {
    let mut stream = TcpStream::connect(server).await?;
    write_framed(&mut stream, query).await?;
    read_framed(&mut stream).await
}

#[cfg(test)]
mod tests;
