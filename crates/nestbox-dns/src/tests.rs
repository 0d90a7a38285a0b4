//! The resolver against a fake upstream on loopback and a table that records what it is
//! told (the real table, nftables in a namespace, is tested end to end with VMs).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};

use hickory_proto::op::Query;
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{Name, Record, RecordType};
use nestbox_types::egress::EgressRules;

use super::*;

/// Records what the guard puts in force.
#[derive(Default, Clone)]
struct Recorder {
    pinned: Arc<std::sync::Mutex<Vec<Ipv4Addr>>>,
    replaced: Arc<AtomicUsize>,
}

impl PinTable for Recorder {
    async fn replace(&self, _egress: &Egress, keep: &[Ipv4Addr]) -> Result<(), TableError> {
        self.replaced.fetch_add(1, Ordering::SeqCst);
        *self.pinned.lock().unwrap() = keep.to_vec();
        Ok(())
    }
    async fn pin(&self, ips: &[Ipv4Addr]) -> Result<(), TableError> {
        let mut p = self.pinned.lock().unwrap();
        for ip in ips {
            if !p.contains(ip) {
                p.push(*ip);
            }
        }
        Ok(())
    }
    async fn unpin(&self, ips: &[Ipv4Addr]) -> Result<(), TableError> {
        let mut p = self.pinned.lock().unwrap();
        for ip in ips {
            assert!(p.contains(ip), "unpinning {ip}, which is not pinned");
        }
        p.retain(|x| !ips.contains(x));
        Ok(())
    }
}

impl Recorder {
    fn pins(&self) -> Vec<Ipv4Addr> {
        let mut v = self.pinned.lock().unwrap().clone();
        v.sort();
        v
    }
}

/// A resolver on loopback answering A queries from a fixed zone (UDP and TCP), counting
/// the queries it gets.
struct Upstream {
    addr: SocketAddr,
    asked: Arc<AtomicUsize>,
    _tasks: Vec<JoinHandle<()>>,
}

fn zone_answer(query: &Message, zone: &HashMap<&'static str, Vec<Ipv4Addr>>) -> Vec<u8> {
    let mut m = Message::new();
    m.set_id(query.id())
        .set_message_type(MessageType::Response)
        .set_op_code(OpCode::Query)
        .add_queries(query.queries().to_vec());
    let q = &query.queries()[0];
    let name = q
        .name()
        .to_ascii()
        .trim_end_matches('.')
        .to_ascii_lowercase();
    match zone.get(name.as_str()) {
        Some(ips) => {
            for ip in ips {
                m.add_answer(Record::from_rdata(q.name().clone(), 30, RData::A(A(*ip))));
            }
        }
        None => {
            m.set_response_code(ResponseCode::NXDomain);
        }
    }
    m.to_vec().unwrap()
}

impl Upstream {
    async fn start(zone: &[(&'static str, &[&str])]) -> Upstream {
        let zone: Arc<HashMap<&'static str, Vec<Ipv4Addr>>> = Arc::new(
            zone.iter()
                .map(|(n, ips)| (*n, ips.iter().map(|i| i.parse().unwrap()).collect()))
                .collect(),
        );
        let sockets = Sockets::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = sockets.local_addr().unwrap();
        let udp = Arc::new(UdpSocket::from_std(sockets.udp).unwrap());
        let tcp = TcpListener::from_std(sockets.tcp).unwrap();
        let asked = Arc::new(AtomicUsize::new(0));
        let (z1, a1) = (zone.clone(), asked.clone());
        let udp_task = tokio::spawn(async move {
            let mut buf = vec![0u8; 65535];
            loop {
                let (n, from) = udp.recv_from(&mut buf).await.unwrap();
                a1.fetch_add(1, Ordering::SeqCst);
                let q = Message::from_vec(&buf[..n]).unwrap();
                udp.send_to(&zone_answer(&q, &z1), from).await.unwrap();
            }
        });
        let (z2, a2) = (zone.clone(), asked.clone());
        let tcp_task = tokio::spawn(async move {
            loop {
                let (mut s, _) = tcp.accept().await.unwrap();
                a2.fetch_add(1, Ordering::SeqCst);
                let q = Message::from_vec(&read_framed(&mut s).await.unwrap()).unwrap();
                write_framed(&mut s, &zone_answer(&q, &z2)).await.unwrap();
            }
        });
        Upstream {
            addr,
            asked,
            _tasks: vec![udp_task, tcp_task],
        }
    }

    fn asked(&self) -> usize {
        self.asked.load(Ordering::SeqCst)
    }
}

fn egress(allow: &[&str], deny: &[&str]) -> Egress {
    EgressRules {
        allow_out: allow.iter().map(|s| s.to_string()).collect(),
        deny_out: deny.iter().map(|s| s.to_string()).collect(),
    }
    .parse()
    .unwrap()
}

async fn guard(rules: Egress, upstream: &Upstream) -> (DnsGuard<Recorder>, Recorder, SocketAddr) {
    let sockets = Sockets::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = sockets.local_addr().unwrap();
    let table = Recorder::default();
    let g = DnsGuard::start(sockets, table.clone(), rules, vec![upstream.addr])
        .await
        .unwrap();
    (g, table, addr)
}

fn query(name: &str) -> Vec<u8> {
    let mut m = Message::new();
    m.set_id(4242)
        .set_message_type(MessageType::Query)
        .set_op_code(OpCode::Query)
        .set_recursion_desired(true)
        .add_query(Query::query(Name::from_ascii(name).unwrap(), RecordType::A));
    m.to_vec().unwrap()
}

async fn ask(addr: SocketAddr, raw: &[u8]) -> Message {
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    sock.send_to(raw, addr).await.unwrap();
    let mut buf = vec![0u8; 65535];
    let (n, _) = tokio::time::timeout(Duration::from_secs(10), sock.recv_from(&mut buf))
        .await
        .expect("the resolver answers")
        .unwrap();
    Message::from_vec(&buf[..n]).unwrap()
}

async fn ask_over_tcp(addr: SocketAddr, name: &str) -> Message {
    let mut s = TcpStream::connect(addr).await.unwrap();
    write_framed(&mut s, &query(name)).await.unwrap();
    Message::from_vec(&read_framed(&mut s).await.unwrap()).unwrap()
}

fn addresses(m: &Message) -> Vec<Ipv4Addr> {
    m.answers()
        .iter()
        .filter_map(|r| match r.data() {
            RData::A(a) => Some(a.0),
            _ => None,
        })
        .collect()
}

const MANY: &[&str] = &[
    "203.0.113.100",
    "203.0.113.101",
    "203.0.113.102",
    "203.0.113.103",
    "203.0.113.104",
    "203.0.113.105",
    "203.0.113.106",
    "203.0.113.107",
    "203.0.113.108",
    "203.0.113.109",
    "203.0.113.110",
    "203.0.113.111",
    "203.0.113.112",
    "203.0.113.113",
    "203.0.113.114",
    "203.0.113.115",
    "203.0.113.116",
    "203.0.113.117",
    "203.0.113.118",
    "203.0.113.119",
    "203.0.113.120",
    "203.0.113.121",
    "203.0.113.122",
    "203.0.113.123",
    "203.0.113.124",
    "203.0.113.125",
    "203.0.113.126",
    "203.0.113.127",
    "203.0.113.128",
    "203.0.113.129",
    "203.0.113.130",
    "203.0.113.131",
    "203.0.113.132",
    "203.0.113.133",
    "203.0.113.134",
    "203.0.113.135",
    "203.0.113.136",
    "203.0.113.137",
    "203.0.113.138",
    "203.0.113.139",
];

const ZONE: &[(&str, &[&str])] = &[
    ("many.test", MANY),
    ("allowed.test", &["203.0.113.10", "203.0.113.11"]),
    ("other.test", &["203.0.113.20"]),
    ("api.wild.test", &["203.0.113.30"]),
    ("wild.test", &["203.0.113.31"]),
];

#[tokio::test]
async fn a_closed_sandbox_resolves_only_allowed_names_and_reaches_only_their_answers() {
    let up = Upstream::start(ZONE).await;
    let (_g, table, addr) = guard(egress(&["allowed.test"], &["0.0.0.0/0"]), &up).await;
    assert_eq!(
        table.replaced.load(Ordering::SeqCst),
        1,
        "rules put in force at start"
    );

    let ok = ask(addr, &query("allowed.test.")).await;
    assert_eq!(ok.response_code(), ResponseCode::NoError);
    assert_eq!(ok.id(), 4242);
    assert_eq!(addresses(&ok).len(), 2);
    assert_eq!(
        table.pins(),
        vec![
            "203.0.113.10".parse::<Ipv4Addr>().unwrap(),
            "203.0.113.11".parse().unwrap()
        ],
        "pinned before the answer was sent"
    );

    let asked = up.asked();
    let refused = ask(addr, &query("other.test.")).await;
    assert_eq!(refused.response_code(), ResponseCode::Refused);
    assert_eq!(refused.queries().len(), 1, "the question is echoed");
    assert_eq!(
        up.asked(),
        asked,
        "a refused name never reaches the upstream"
    );
    assert_eq!(table.pins().len(), 2);

    // Case and TCP make no difference.
    let tcp = ask_over_tcp(addr, "ALLOWED.test.").await;
    assert_eq!(tcp.response_code(), ResponseCode::NoError);
    assert_eq!(addresses(&tcp).len(), 2);
}

#[tokio::test]
async fn wildcards_cover_names_below_but_not_the_apex() {
    let up = Upstream::start(ZONE).await;
    let (_g, table, addr) = guard(egress(&["*.wild.test"], &["0.0.0.0/0"]), &up).await;
    assert_eq!(
        addresses(&ask(addr, &query("api.wild.test.")).await).len(),
        1
    );
    assert_eq!(
        ask(addr, &query("wild.test.")).await.response_code(),
        ResponseCode::Refused
    );
    assert_eq!(
        table.pins(),
        vec!["203.0.113.30".parse::<Ipv4Addr>().unwrap()]
    );
}

#[tokio::test]
async fn an_open_sandbox_resolves_everything_but_pins_only_allowed_names() {
    let up = Upstream::start(ZONE).await;
    let (g, table, addr) = guard(egress(&["allowed.test"], &["203.0.113.0/24"]), &up).await;
    let other = ask(addr, &query("other.test.")).await;
    assert_eq!(addresses(&other).len(), 1, "not everything is denied");
    assert!(table.pins().is_empty(), "an unlisted name pins nothing");
    let missing = ask(addr, &query("nowhere.test.")).await;
    assert_eq!(
        missing.response_code(),
        ResponseCode::NXDomain,
        "answers pass unchanged"
    );
    ask(addr, &query("allowed.test.")).await;
    assert_eq!(table.pins().len(), 2);
    assert_eq!(g.pinned().await.len(), 2);
}

#[tokio::test]
async fn new_rules_keep_only_the_pins_they_allow_and_apply_to_the_next_query() {
    let up = Upstream::start(ZONE).await;
    let (g, table, addr) = guard(egress(&["allowed.test"], &["0.0.0.0/0"]), &up).await;
    ask(addr, &query("allowed.test.")).await;
    assert_eq!(table.pins().len(), 2);
    // Rules that still allow the name keep its addresses reachable.
    g.replace(egress(&["allowed.test", "203.0.113.99"], &["0.0.0.0/0"]))
        .await
        .unwrap();
    assert_eq!(table.pins().len(), 2);
    assert_eq!(g.pinned().await.len(), 2);
    g.replace(egress(&["other.test"], &["0.0.0.0/0"]))
        .await
        .unwrap();
    assert!(table.pins().is_empty());
    assert!(g.pinned().await.is_empty());
    assert_eq!(
        ask(addr, &query("allowed.test.")).await.response_code(),
        ResponseCode::Refused
    );
    assert_eq!(addresses(&ask(addr, &query("other.test.")).await).len(), 1);
    assert_eq!(
        table.pins(),
        vec!["203.0.113.20".parse::<Ipv4Addr>().unwrap()]
    );
}

#[tokio::test]
async fn bad_queries_and_a_dead_upstream_get_error_codes() {
    let up = Upstream::start(ZONE).await;
    let (_g, _table, addr) = guard(egress(&["allowed.test"], &[]), &up).await;
    // Not a DNS message: FORMERR with the id it carried.
    let garbage = ask(addr, &[0x12, 0x34, 0xff, 0xff, 0, 9]).await;
    assert_eq!(garbage.id(), 0x1234);
    assert_eq!(garbage.response_code(), ResponseCode::FormErr);
    // Two questions at once.
    let mut two = Message::from_vec(&query("allowed.test.")).unwrap();
    two.add_query(Query::query(
        Name::from_ascii("other.test.").unwrap(),
        RecordType::A,
    ));
    assert_eq!(
        ask(addr, &two.to_vec().unwrap()).await.response_code(),
        ResponseCode::FormErr
    );

    // No upstream answering: SERVFAIL, not silence.
    let dead = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let dead_addr = dead.local_addr().unwrap();
    let sockets = Sockets::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = sockets.local_addr().unwrap();
    let _g = DnsGuard::start(
        sockets,
        Recorder::default(),
        egress(&[], &[]),
        vec![dead_addr],
    )
    .await
    .unwrap();
    assert_eq!(
        ask(addr, &query("allowed.test.")).await.response_code(),
        ResponseCode::ServFail
    );
}

#[tokio::test]
async fn one_answer_pins_a_bounded_number_of_addresses() {
    let up = Upstream::start(ZONE).await;
    let (_g, table, addr) = guard(egress(&["many.test"], &["0.0.0.0/0"]), &up).await;
    let answer = ask(addr, &query("many.test.")).await;
    assert_eq!(
        addresses(&answer).len(),
        MANY.len(),
        "the answer passes whole"
    );
    assert_eq!(table.pins().len(), MAX_PINS_PER_ANSWER);
}

#[tokio::test]
async fn pins_expire_and_are_taken_back() {
    let up = Upstream::start(ZONE).await;
    let (g, table, addr) = guard(egress(&["allowed.test"], &["0.0.0.0/0"]), &up).await;
    ask(addr, &query("allowed.test.")).await;
    assert_eq!(table.pins().len(), 2);
    tokio::time::pause();
    // Not before the shortest pin...
    tokio::time::advance(PIN_MIN - SWEEP_EVERY * 2).await;
    tokio::task::yield_now().await;
    assert_eq!(table.pins().len(), 2);
    // ...but once it is over (the answer's TTL was shorter).
    tokio::time::advance(SWEEP_EVERY * 3).await;
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    assert!(table.pins().is_empty(), "{:?}", table.pins());
    assert!(g.pinned().await.is_empty());
}
