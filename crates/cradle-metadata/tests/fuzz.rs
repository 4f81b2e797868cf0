//! The metadata listener under random requests, served in-process over a
//! real `Core` on SQLite, the way `cradle serve` serves it: random methods,
//! paths (percent-encoding, dot segments, empty segments, NUL, overlong),
//! headers (tokens of this and other guests, `Metadata-Flavor`, forwarding
//! headers, conditionals, oversized ones) and bodies, sent as raw HTTP/1.1
//! from source addresses across 127/8 (loopback answers all of it; an
//! instance's `metadata_address` decides whose a source is).
//!
//! Every request gets a response (a panic in a handler would drop the
//! connection), its status is one docs/metadata-api.md gives, a source
//! that is no instance's gets 404 for any request that reaches routing,
//! and no response to one source ever holds another instance's canary
//! (a unique string in its user data, metadata, files, parameters of each
//! visibility and name).
//!
//! Cases per property: `CRADLE_FUZZ_CASES` (`cargo xtask fuzz` sets it and
//! `PROPTEST_RNG_SEED`); the default keeps `cargo test` quick.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use cradle_core::{Caller, Core};
use cradle_metadata::{MetadataService, Settings};
use cradle_model::Secret;
use cradle_model::api::{InstanceSpec, OsParamsSpec};
use cradle_registry::{ChannelLimits, Registry};
use proptest::prelude::*;

/// Statuses docs/metadata-api.md gives, and the two hyper answers a
/// request with over 16 KiB of headers (or of path) with before routing.
const DOCUMENTED: &[u16] = &[
    200, 201, 204, 304, 400, 401, 403, 404, 405, 408, 409, 413, 414, 429, 431, 503,
];

/// The guests: their source addresses. Each one's canary is `canary(i)`.
const GUESTS: [Ipv4Addr; 3] = [
    Ipv4Addr::new(127, 0, 0, 2),
    Ipv4Addr::new(127, 0, 0, 3),
    Ipv4Addr::new(127, 1, 2, 3),
];

fn canary(i: usize) -> String {
    format!("QZ{i}CANARYX")
}

fn cases(default: u32) -> ProptestConfig {
    let cases = std::env::var("CRADLE_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default);
    ProptestConfig {
        cases,
        ..ProptestConfig::default()
    }
}

fn b64(data: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(data)
}

struct Server {
    addr: SocketAddr,
    /// Each guest's IMDSv2 token, minted at start.
    tokens: Vec<String>,
    _runtime: tokio::runtime::Runtime,
    _tmp: tempfile::TempDir,
}

fn core(tmp: &std::path::Path) -> Arc<Core> {
    let store = cradle_store::SqliteStore::open(&tmp.join("cradle.db")).unwrap();
    let registry = Registry::open(
        Arc::new(store),
        ChannelLimits {
            queue_len: 4,
            message_bytes: 1024,
        },
        "node1",
    )
    .unwrap()
    .enable_security_groups(Default::default())
    .unwrap();
    let mut metrics = cradle_core::Metrics::new();
    let vendordata =
        cradle_vendordata::Vendordata::new(Vec::new(), metrics.registry_mut()).unwrap();
    Core::new(cradle_core::Parts {
        registry: Arc::new(registry),
        install: cradle_install::Settings {
            appliance: tmp.join("appliance"),
            qemu: "qemu-system-x86_64".into(),
            accel: cradle_install::AccelChoice::Tcg,
            timeout: Duration::from_secs(60),
            memory_mib: 256,
            metadata_port: 80,
            comm: cradle_install::Comm {
                ip: "ip".into(),
                nft: "nft".into(),
            },
            run_dir: tmp.join("run"),
            os_search: Vec::new(),
            script_user: "nobody".into(),
            qemu_img: "qemu-img".into(),
            dnsmasq: "dnsmasq".into(),
            spool_dir: std::env::temp_dir().join("cradle-spool-unused"),
            stream_max_bytes: 1 << 30,
        },
        metrics: Arc::new(metrics),
        vendor_data: serde_json::json!({}),
        vendordata: Arc::new(vendordata),
        drive_limits: Default::default(),
        firewall_table: "cradle".into(),
        firewall_enforced: false,
        firewall_mark: Default::default(),
        render_cache_bytes: 1 << 20,
        max_token_ttl: 21600,
        waits: Default::default(),
        peers: Default::default(),
        migration: Default::default(),
        maintenance: Default::default(),
        identity: cradle_core::identity::Identity::generated("https://cradle.test"),
    })
}

/// One instance per guest address, its canary in everything it has.
fn spec(i: usize) -> InstanceSpec {
    let c = canary(i);
    let secret = |s: String| Secret::new(s);
    InstanceSpec {
        name: format!("guest{i}-{c}"),
        user_data: Some(b64(format!("#!/bin/sh\necho {c}-user-data\n").as_bytes())),
        metadata: BTreeMap::from([("role".to_string(), format!("{c}-metadata"))]),
        files: BTreeMap::from([(
            "/etc/canary".to_string(),
            b64(format!("{c}-file").as_bytes()),
        )]),
        metadata_address: Some(GUESTS[i].to_string()),
        os_params: OsParamsSpec {
            public: BTreeMap::from([("pub".to_string(), format!("{c}-public"))]),
            private: BTreeMap::from([("priv".to_string(), secret(format!("{c}-private")))]),
            secret: BTreeMap::from([("sec".to_string(), secret(format!("{c}-secret")))]),
        },
        ..Default::default()
    }
}

/// The listener, started once for the whole test binary.
fn server() -> &'static Server {
    static SERVER: OnceLock<Server> = OnceLock::new();
    SERVER.get_or_init(|| {
        let tmp = tempfile::tempdir().unwrap();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let core = core(tmp.path());
        let addr = runtime.block_on(async {
            for i in 0..GUESTS.len() {
                core.create_instance(&Caller::system(), spec(i))
                    .await
                    .unwrap();
            }
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            // Unmetered: thousands of requests a second from three guests
            // would otherwise be mostly 429s, and reach nothing else.
            let settings = Settings {
                rate: 0,
                ..Default::default()
            };
            let service = Arc::new(MetadataService::new(core, settings));
            tokio::spawn(cradle_metadata::serve(
                listener,
                service,
                std::future::pending(),
            ));
            addr
        });
        let mut server = Server {
            addr,
            tokens: Vec::new(),
            _runtime: runtime,
            _tmp: tmp,
        };
        for g in GUESTS {
            let r = send(
                &server,
                g,
                b"PUT /latest/api/token HTTP/1.1\r\nHost: x\r\n\
                  X-aws-ec2-metadata-token-ttl-seconds: 21600\r\nConnection: close\r\n\r\n",
            )
            .expect("a token");
            assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.raw));
            server
                .tokens
                .push(String::from_utf8(r.body().to_vec()).unwrap());
        }
        server
    })
}

struct Answer {
    status: u16,
    raw: Vec<u8>,
}

impl Answer {
    fn body(&self) -> &[u8] {
        let at = self
            .raw
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .map_or(self.raw.len(), |p| p + 4);
        &self.raw[at..]
    }
}

/// Send `request` from `source` on a connection of its own and read the
/// answer to the end; `None` when the server closed without one.
fn send(server: &Server, source: Ipv4Addr, request: &[u8]) -> Option<Answer> {
    use socket2::{Domain, Socket, Type};
    let sock = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    sock.bind(&SocketAddr::from((source, 0)).into()).unwrap();
    sock.connect(&server.addr.into()).unwrap();
    let mut stream: TcpStream = sock.into();
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    // The server may answer (and close) before it has read everything,
    // as it does for oversized headers: a failed write is not the test's.
    let _ = stream.write_all(request);
    let _ = stream.shutdown(std::net::Shutdown::Write);
    let mut raw = Vec::new();
    let _ = stream.read_to_end(&mut raw);
    let status = raw
        .strip_prefix(b"HTTP/1.1 ")
        .and_then(|r| std::str::from_utf8(r.get(..3)?).ok())
        .and_then(|s| s.parse().ok())?;
    Some(Answer { status, raw })
}

/// Paths the service answers, before damage.
const PATHS: &[&str] = &[
    "/",
    "/latest",
    "/latest/",
    "/latest/meta-data/",
    "/latest/meta-data/hostname",
    "/latest/meta-data/instance-id",
    "/latest/meta-data/public-keys/",
    "/latest/user-data",
    "/2009-04-04/meta-data/local-ipv4",
    "/2021-01-03/dynamic/instance-identity/document",
    "/latest/api/token",
    "/openstack",
    "/openstack/latest/meta_data.json",
    "/openstack/latest/user_data",
    "/openstack/latest/network_data.json",
    "/openstack/latest/vendor_data2.json",
    "/openstack/2013-04-04/password",
    "/openstack/content/0000",
    "/cradle/latest/meta_data.json",
    "/cradle/latest/os/parameters.json",
    "/cradle/latest/install.json",
    "/cradle/latest/os/scripts/create",
    "/cradle/latest/os/package",
    "/cradle/latest/read",
    "/cradle/latest/write",
    "/ganeti/latest/os/parameters.json",
];

/// What is done to a path.
#[derive(Debug, Clone)]
enum PathDamage {
    None,
    /// Insert one of the ambiguous pieces at a byte offset.
    Insert(usize, &'static str),
    /// Percent-encode the byte at an offset.
    Encode(usize),
    /// Append a query string or fragment.
    Suffix(&'static str),
    /// Pad one segment to this many bytes.
    Overlong(usize),
    /// A request-target that is no path at all.
    Target(&'static str),
}

fn path_damage() -> impl Strategy<Value = PathDamage> {
    prop_oneof![
        10 => Just(PathDamage::None),
        3 => (
            any::<usize>(),
            prop::sample::select(vec![
                "..", "/..", "/.", "./", "//", "%2e%2e", "%2F", "%00", "%", "\\", "%zz", "/../openstack",
                ";", "~", "\u{e9}", "\0",
            ])
        )
            .prop_map(|(i, s)| PathDamage::Insert(i, s)),
        1 => any::<usize>().prop_map(PathDamage::Encode),
        1 => prop::sample::select(vec!["?x=1", "?", "#frag", "?../..", "?a=%00"]).prop_map(PathDamage::Suffix),
        1 => prop::sample::select(vec![300usize, 4000, 9000, 17000]).prop_map(PathDamage::Overlong),
        1 => prop::sample::select(vec![
            "*", "http://169.254.169.254/latest/meta-data/", "http://127.0.0.2/cradle/latest/read",
            "latest/meta-data", "", "//169.254.169.254/",
        ])
        .prop_map(PathDamage::Target),
    ]
}

fn damaged(path: &str, damage: &PathDamage) -> Vec<u8> {
    let mut p = path.as_bytes().to_vec();
    match damage {
        PathDamage::None => {}
        PathDamage::Insert(i, s) => {
            let at = i % (p.len() + 1);
            p.splice(at..at, s.bytes());
        }
        PathDamage::Encode(i) => {
            let at = i % p.len();
            let enc = format!("%{:02X}", p[at]).into_bytes();
            p.splice(at..=at, enc);
        }
        PathDamage::Suffix(s) => p.extend_from_slice(s.as_bytes()),
        PathDamage::Overlong(n) => {
            p.extend_from_slice(b"/");
            p.resize(p.len() + n, b'a');
        }
        PathDamage::Target(t) => p = t.as_bytes().to_vec(),
    }
    p
}

/// A header line, by kind; token ones name a guest (its valid token) or
/// carry garbage.
#[derive(Debug, Clone)]
enum Header {
    Flavor(&'static str),
    Token(usize),
    BadToken(String),
    Ttl(&'static str),
    Forwarded(&'static str, usize),
    IfNoneMatch(&'static str),
    Random(String, String),
    Huge(usize),
}

fn header() -> impl Strategy<Value = Header> {
    prop_oneof![
        4 => prop::sample::select(vec!["cradle", "CRADLE", "Cradle ", "google", ""]).prop_map(Header::Flavor),
        2 => (0..GUESTS.len()).prop_map(Header::Token),
        1 => "[ -~]{0,60}".prop_map(Header::BadToken),
        2 => prop::sample::select(vec!["21600", "1", "0", "21601", "-1", " 60 ", "abc", "99999999999"])
            .prop_map(Header::Ttl),
        1 => (prop::sample::select(vec!["X-Forwarded-For", "Forwarded", "X-Real-IP"]), 0..GUESTS.len())
            .prop_map(|(h, g)| Header::Forwarded(h, g)),
        1 => prop::sample::select(vec!["*", "\"0000000000000000\"", "W/\"x\", *", ""]).prop_map(Header::IfNoneMatch),
        1 => ("[A-Za-z][A-Za-z0-9-]{0,20}", "[ -~]{0,40}").prop_map(|(n, v)| Header::Random(n, v)),
        1 => prop::sample::select(vec![8000usize, 17000]).prop_map(Header::Huge),
    ]
}

#[derive(Debug, Clone)]
struct Request {
    source: usize,
    /// Another address of 127/8, which no instance has.
    stranger: [u8; 3],
    method: &'static str,
    path: usize,
    damage: PathDamage,
    headers: Vec<Header>,
    body: Option<Vec<u8>>,
    chunked: bool,
}

fn request() -> impl Strategy<Value = Request> {
    (
        0..GUESTS.len() + 2,
        any::<[u8; 3]>(),
        prop::option::of(prop::sample::select(vec![
            "GET", "HEAD", "PUT", "POST", "DELETE", "OPTIONS", "PATCH", "get", "BREW", "CONNECT",
            "TRACE",
        ])),
        0..PATHS.len(),
        path_damage(),
        prop::collection::vec(header(), 0..3),
        prop::option::of(prop::collection::vec(any::<u8>(), 0..1500)),
        any::<bool>(),
    )
        .prop_map(
            |(source, stranger, method, path, damage, headers, body, chunked)| Request {
                source,
                stranger,
                // Half the time the method the path is for, so that writes,
                // passwords and tokens get past 405.
                method: method.unwrap_or(match PATHS[path] {
                    "/cradle/latest/write" | "/openstack/2013-04-04/password" => "POST",
                    "/latest/api/token" => "PUT",
                    _ => "GET",
                }),
                path,
                damage,
                headers,
                body,
                chunked,
            },
        )
}

impl Request {
    fn source(&self) -> (Ipv4Addr, Option<usize>) {
        match self.source {
            i if i < GUESTS.len() => (GUESTS[i], Some(i)),
            i if i == GUESTS.len() => (Ipv4Addr::new(127, 0, 0, 77), None),
            _ => {
                let [a, b, c] = self.stranger;
                let addr = Ipv4Addr::new(127, a, b, c.max(1));
                (addr, GUESTS.iter().position(|g| *g == addr))
            }
        }
    }

    /// Whether hyper takes it as a request at all: a request-target of
    /// visible ASCII in origin, absolute or asterisk form, and a head (the
    /// request line and headers) well inside its 16 KiB buffer.
    fn well_formed(&self, target: &[u8], bytes: &[u8]) -> bool {
        let head = bytes
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .unwrap_or(bytes.len());
        (target.starts_with(b"/") || target.starts_with(b"http://") || target == b"*")
            && target.iter().all(|b| (0x21..0x7f).contains(b))
            && head < 15 * 1024
            && self.method.bytes().all(|b| b.is_ascii_alphabetic())
    }

    fn bytes(&self, server: &Server, target: &[u8]) -> Vec<u8> {
        let mut r = Vec::new();
        r.extend_from_slice(self.method.as_bytes());
        r.push(b' ');
        r.extend_from_slice(target);
        r.extend_from_slice(b" HTTP/1.1\r\nHost: 169.254.169.254\r\n");
        for h in &self.headers {
            let line = match h {
                Header::Flavor(v) => format!("Metadata-Flavor: {v}"),
                Header::Token(g) => format!("X-aws-ec2-metadata-token: {}", server.tokens[*g]),
                Header::BadToken(v) => format!("X-aws-ec2-metadata-token: {v}"),
                Header::Ttl(v) => format!("X-aws-ec2-metadata-token-ttl-seconds: {v}"),
                Header::Forwarded(h, g) => format!("{h}: {}", GUESTS[*g]),
                Header::IfNoneMatch(v) => format!("If-None-Match: {v}"),
                Header::Random(n, v) => format!("X-{n}: {v}"),
                Header::Huge(n) => format!("X-Padding: {}", "p".repeat(*n)),
            };
            r.extend_from_slice(line.trim_end().as_bytes());
            r.extend_from_slice(b"\r\n");
        }
        match &self.body {
            Some(body) if self.chunked => {
                r.extend_from_slice(b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n");
                for chunk in body.chunks(500) {
                    r.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
                    r.extend_from_slice(chunk);
                    r.extend_from_slice(b"\r\n");
                }
                r.extend_from_slice(b"0\r\n\r\n");
            }
            Some(body) => {
                r.extend_from_slice(
                    format!(
                        "Content-Length: {}\r\nConnection: close\r\n\r\n",
                        body.len()
                    )
                    .as_bytes(),
                );
                r.extend_from_slice(body);
            }
            None => r.extend_from_slice(b"Connection: close\r\n\r\n"),
        }
        r
    }
}

fn check(server: &Server, req: &Request) -> Result<(), TestCaseError> {
    let target = damaged(PATHS[req.path], &req.damage);
    let bytes = req.bytes(server, &target);
    let (source, guest) = req.source();
    let well_formed = req.well_formed(&target, &bytes);
    let shown = || String::from_utf8_lossy(&bytes[..bytes.len().min(400)]).into_owned();
    let Some(answer) = send(server, source, &bytes) else {
        prop_assert!(!well_formed, "no answer from {} to:\n{}", source, shown());
        return Ok(());
    };
    prop_assert!(
        DOCUMENTED.contains(&answer.status),
        "status {} is not documented, from {} for:\n{}\nanswer:\n{}",
        answer.status,
        source,
        shown(),
        String::from_utf8_lossy(&answer.raw)
    );
    if guest.is_none() && well_formed {
        prop_assert_eq!(
            answer.status,
            404,
            "a stranger got an answer to:\n{}",
            shown()
        );
    }
    for other in (0..GUESTS.len()).filter(|i| Some(*i) != guest) {
        let c = canary(other);
        prop_assert!(
            !answer.raw.windows(c.len()).any(|w| w == c.as_bytes()),
            "{}'s answer holds guest {}'s canary, for:\n{}\nanswer:\n{}",
            source,
            other,
            shown(),
            String::from_utf8_lossy(&answer.raw)
        );
    }
    Ok(())
}

mod fuzz {
    use super::*;

    proptest! {
        #![proptest_config(cases(64))]

        #[test]
        fn any_request_gets_a_documented_status_and_only_its_own_guests_data(
            requests in prop::collection::vec(request(), 1..6),
        ) {
            let server = server();
            for r in &requests {
                check(server, r)?;
            }
        }
    }
}

#[test]
fn a_guest_reads_its_own_canary_and_a_stranger_gets_404() {
    let s = server();
    let get = |src: Ipv4Addr, path: &str| {
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: x\r\nMetadata-Flavor: cradle\r\nConnection: close\r\n\r\n"
        );
        send(s, src, req.as_bytes()).expect("an answer")
    };
    let a = get(GUESTS[1], "/cradle/latest/os/parameters.json");
    assert_eq!(a.status, 200);
    assert!(String::from_utf8_lossy(a.body()).contains(&format!("{}-secret", canary(1))));
    let a = get(GUESTS[2], "/latest/user-data");
    assert_eq!(a.status, 200);
    assert!(String::from_utf8_lossy(a.body()).contains(&canary(2)));
    assert_eq!(
        get(Ipv4Addr::new(127, 9, 9, 9), "/latest/user-data").status,
        404
    );
}

/// Found by the fuzzer, in the harness (`cargo xtask fuzz`): two 8000-byte
/// headers and a 300-byte path make a head past hyper's 16 KiB, which gets
/// 431 before routing, from a stranger too; the harness had counted each
/// header alone.
#[test]
fn a_head_past_16_kib_is_431_for_anyone() {
    let s = server();
    let pad = "p".repeat(9000);
    let req = format!(
        "GET / HTTP/1.1\r\nHost: x\r\nX-A: {pad}\r\nX-B: {pad}\r\nConnection: close\r\n\r\n"
    );
    for src in [GUESTS[0], Ipv4Addr::new(127, 0, 0, 77)] {
        assert_eq!(send(s, src, req.as_bytes()).expect("an answer").status, 431);
    }
}
