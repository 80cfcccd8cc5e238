//! An in-process authoritative DNS server for tests, on 127.0.0.1 (UDP and TCP on one ephemeral
//! port), answering from a small line-based zone that tests can replace while it runs.
//!
//! Zone lines (`#` and `;` comments and blank lines ignored; names case-insensitive, trailing dot
//! optional; standard zone-file lines `name. 3600 IN TYPE data`, as `postern dns-records` prints
//! them, are accepted too: a TTL and the class `IN` may follow the name and are ignored):
//! ```text
//! example.test MX 10 mx.example.test
//! mx.example.test A 127.0.0.2
//! mx.example.test AAAA ::1
//! example.test TXT "v=spf1 -all"          (several "..." pieces are concatenated)
//! 2.0.0.127.in-addr.arpa PTR mx.example.test
//! alias.test CNAME mx.example.test
//! null.test MX 0 .
//! broken.test SERVFAIL
//! ```
//! A name not listed gets NXDOMAIN; a listed name without the asked type gets NODATA. TXT values
//! over 255 bytes are split into several character-strings, as DKIM keys are in real zones.

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::str::FromStr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use hickory_server::net::runtime::Time;
use hickory_server::proto::op::{Header, HeaderCounts, Metadata, ResponseCode};
use hickory_server::proto::rr::rdata::{A, AAAA, CNAME, MX, PTR, TXT};
use hickory_server::proto::rr::{Name, RData, Record, RecordType};
use hickory_server::proto::serialize::binary::BinEncodable;
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponseBuilder;
use hickory_server::Server;

#[derive(Default)]
struct Entry {
    servfail: bool,
    records: Vec<(RecordType, RData)>,
}

type Zone = HashMap<String, Entry>;

fn key(name: &str) -> String {
    name.trim().trim_end_matches('.').to_ascii_lowercase()
}

fn name(s: &str) -> Name {
    let mut n = Name::from_ascii(s).unwrap_or_else(|e| panic!("bad name {s:?} in test zone: {e}"));
    n.set_fqdn(true);
    n
}

/// The character-strings of a TXT value: quoted pieces concatenated (or the bare rest of the line),
/// then cut into pieces of at most 255 bytes.
fn txt_strings(rest: &str) -> Vec<Vec<u8>> {
    let value: String = if rest.trim_start().starts_with('"') {
        rest.split('"').skip(1).step_by(2).collect()
    } else {
        rest.trim().to_string()
    };
    let bytes = value.into_bytes();
    if bytes.is_empty() {
        return vec![Vec::new()];
    }
    bytes.chunks(255).map(<[u8]>::to_vec).collect()
}

fn parse_zone(text: &str) -> Zone {
    let mut zone = Zone::new();
    for raw in text.lines() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        let token = |s: &str| -> (String, String) {
            let s = s.trim_start();
            match s.split_once(char::is_whitespace) {
                Some((t, rest)) => (t.to_string(), rest.to_string()),
                None => (s.to_string(), String::new()),
            }
        };
        let (owner, after) = token(line);
        let (mut rtype, mut rest) = token(&after);
        if !rtype.is_empty() && rtype.bytes().all(|b| b.is_ascii_digit()) {
            (rtype, rest) = token(&rest); // a TTL
        }
        if rtype.eq_ignore_ascii_case("IN") {
            (rtype, rest) = token(&rest);
        }
        if rtype.is_empty() {
            panic!("bad test zone line {line:?}");
        }
        let (owner, rtype, rest) = (owner.as_str(), rtype.to_ascii_uppercase(), rest.trim());
        let entry = zone.entry(key(owner)).or_default();
        let bad = || -> ! { panic!("bad test zone line {line:?}") };
        let rdata = match rtype.as_str() {
            "SERVFAIL" => {
                entry.servfail = true;
                continue;
            }
            "A" => RData::A(A(rest.parse().unwrap_or_else(|_| bad()))),
            "AAAA" => RData::AAAA(AAAA(rest.parse().unwrap_or_else(|_| bad()))),
            "MX" => {
                let (pref, host) = rest.split_once(char::is_whitespace).unwrap_or_else(|| bad());
                let host = host.trim();
                let exchange = if host == "." { Name::root() } else { name(host) };
                RData::MX(MX::new(pref.parse().unwrap_or_else(|_| bad()), exchange))
            }
            "TXT" => {
                let strings = txt_strings(rest);
                RData::TXT(TXT::from_bytes(strings.iter().map(Vec::as_slice).collect()))
            }
            "PTR" => RData::PTR(PTR(name(rest))),
            "CNAME" => RData::CNAME(CNAME(name(rest))),
            other => {
                let t = RecordType::from_str(other).unwrap_or_else(|_| bad());
                panic!("test zone: record type {t} not supported in {line:?}")
            }
        };
        entry.records.push((rdata.record_type(), rdata));
    }
    zone
}

/// What the zone says about one question: response code and answer records.
fn answer(zone: &Zone, qname: &Name, qtype: RecordType) -> (ResponseCode, Vec<Record>) {
    let mut answers = Vec::new();
    let mut current = qname.clone();
    // Follow CNAMEs within the zone (a few hops), as an authoritative server does.
    for _ in 0..8 {
        let Some(entry) = zone.get(&key(&current.to_ascii())) else {
            let code = if answers.is_empty() { ResponseCode::NXDomain } else { ResponseCode::NoError };
            return (code, answers);
        };
        if entry.servfail {
            return (ResponseCode::ServFail, Vec::new());
        }
        let cname = entry.records.iter().find_map(|(t, d)| match d {
            RData::CNAME(c) if *t == RecordType::CNAME && qtype != RecordType::CNAME => Some(c.0.clone()),
            _ => None,
        });
        if let Some(target) = cname {
            answers.push(Record::from_rdata(current.clone(), 0, RData::CNAME(CNAME(target.clone()))));
            current = target;
            continue;
        }
        answers.extend(
            entry
                .records
                .iter()
                .filter(|(t, _)| *t == qtype)
                .map(|(_, d)| Record::from_rdata(current.clone(), 0, d.clone())),
        );
        return (ResponseCode::NoError, answers);
    }
    (ResponseCode::ServFail, Vec::new())
}

struct Handler {
    zone: Arc<RwLock<Zone>>,
}

impl Handler {
    async fn handle<R: ResponseHandler>(&self, request: &Request, mut response_handle: R) -> ResponseInfo {
        let mut metadata = Metadata::response_from_request(&request.metadata);
        metadata.authoritative = true;
        metadata.recursion_available = true;
        let (code, answers) = match request.request_info() {
            Ok(info) => {
                let zone = self.zone.read().unwrap_or_else(|p| p.into_inner());
                answer(&zone, info.query.original().name(), info.query.query_type())
            }
            Err(_) => (ResponseCode::FormErr, Vec::new()),
        };
        metadata.response_code = code;
        let mut builder = MessageResponseBuilder::from_message_request(request);
        if let Some(edns) = &request.edns {
            builder.edns(edns);
        }
        // hickory-server answers SERVFAIL instead of setting TC when a UDP answer does not fit, so
        // truncate ourselves and let the client retry over TCP.
        let size: usize = answers.iter().map(|r| r.to_bytes().map(|b| b.len()).unwrap_or(0)).sum();
        let empty: Vec<Record> = Vec::new();
        let answers = if request.protocol().is_datagram() && size + 100 > usize::from(request.max_payload()) {
            metadata.truncation = true;
            &empty
        } else {
            &answers
        };
        let response = builder.build(metadata, answers.iter(), [], [], []);
        match response_handle.send_response(response).await {
            Ok(info) => info,
            Err(_) => {
                let mut header = Header { metadata, counts: HeaderCounts::default() };
                header.metadata.response_code = ResponseCode::ServFail;
                ResponseInfo::from(header)
            }
        }
    }
}

// `RequestHandler` is declared with `#[async_trait]`; implemented here by hand (its expansion) to
// avoid a dev-dependency on the `async-trait` crate.
impl RequestHandler for Handler {
    fn handle_request<'life0, 'life1, 'async_trait, R, T>(
        &'life0 self,
        request: &'life1 Request,
        response_handle: R,
    ) -> Pin<Box<dyn Future<Output = ResponseInfo> + Send + 'async_trait>>
    where
        R: ResponseHandler + 'async_trait,
        T: Time + 'async_trait,
        'life0: 'async_trait,
        'life1: 'async_trait,
        Self: 'async_trait,
    {
        Box::pin(self.handle(request, response_handle))
    }
}

/// A running test DNS server; dropping it stops the server.
pub struct TestDns {
    addr: SocketAddr,
    zone: Arc<RwLock<Zone>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl TestDns {
    pub fn start(zone: &str) -> TestDns {
        let zone = Arc::new(RwLock::new(parse_zone(zone)));
        let (udp, tcp) = bind_pair();
        let addr = udp.local_addr().expect("local addr");
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let handler = Handler { zone: zone.clone() };
        let thread = std::thread::Builder::new()
            .name("test-dns".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                    .expect("test dns runtime");
                rt.block_on(async move {
                    let mut server = Server::new(handler);
                    server.register_socket(tokio::net::UdpSocket::from_std(udp).expect("udp"));
                    server.register_listener(
                        tokio::net::TcpListener::from_std(tcp).expect("tcp"),
                        Duration::from_secs(5),
                        64 * 1024,
                    );
                    let _ = stop_rx.await;
                    let _ = tokio::time::timeout(Duration::from_secs(2), server.shutdown_gracefully()).await;
                });
                rt.shutdown_timeout(Duration::from_secs(1));
            })
            .expect("spawn test dns thread");
        TestDns { addr, zone, stop: Some(stop_tx), thread: Some(thread) }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Replaces all records; the next query sees the new zone.
    pub fn set_zone(&self, zone: &str) {
        let parsed = parse_zone(zone);
        *self.zone.write().unwrap_or_else(|p| p.into_inner()) = parsed;
    }
}

impl Drop for TestDns {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A UDP socket and a TCP listener on the same ephemeral loopback port (retrying when the TCP side
/// of the port the kernel picked for UDP is taken).
/// On 127.0.0.54, so the random ports never collide with the ports other helpers pick (and
/// release) on 127.0.0.1 for Pebble, smtp-sink or Postfix.
fn bind_pair() -> (std::net::UdpSocket, std::net::TcpListener) {
    let ip: IpAddr = [127, 0, 0, 54].into();
    for _ in 0..50 {
        let udp = std::net::UdpSocket::bind((ip, 0)).expect("bind udp");
        let port = udp.local_addr().expect("udp addr").port();
        if let Ok(tcp) = std::net::TcpListener::bind((ip, port)) {
            udp.set_nonblocking(true).expect("nonblocking");
            tcp.set_nonblocking(true).expect("nonblocking");
            return (udp, tcp);
        }
    }
    panic!("could not bind UDP and TCP on one port");
}

/// A UDP socket that receives queries and never answers: a dead nameserver. Keep it alive for the
/// duration of the test.
pub fn silent_server() -> (std::net::UdpSocket, SocketAddr) {
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    let addr = sock.local_addr().expect("addr");
    (sock, addr)
}
