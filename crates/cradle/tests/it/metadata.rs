//! The metadata service as guests see it: the real binary, read from
//! 127.0.0.x source addresses by reqwest and by raw sockets. Real clients
//! (cloud-init) are in `metadata_clients.rs`; tokens and the header each
//! namespace wants, with botocore, in `metadata_tokens.rs`.

use std::collections::{BTreeMap, VecDeque};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use cradle_model::api::MessageIn;
use serde_json::{Value, json};

use crate::harness::*;

// ---------------------------------------------------------------------------
// Helpers

/// Create an instance and return its id.
pub(crate) fn create(s: &Server, spec: Value) -> String {
    let view = s.admin().create(&spec);
    view["id"]
        .as_str()
        .expect("create returns an id")
        .to_string()
}

/// The EC2 instance id cradle derives from a UUID: `i-` and its first 17
/// hex digits.
pub(crate) fn ec2_instance_id(uuid: &str) -> String {
    format!("i-{}", &uuid.replace('-', "")[..17])
}

/// A TCP connection to the metadata listener from `source`, so that a
/// request can be written byte for byte (reqwest would normalise the path).
fn connect_from(s: &Server, source: &str) -> TcpStream {
    use socket2::{Domain, Socket, Type};
    let sock = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    let local: SocketAddr = format!("{source}:0").parse().unwrap();
    sock.bind(&local.into()).unwrap();
    sock.connect(&s.metadata.into()).unwrap();
    let stream: TcpStream = sock.into();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream
}

/// What came back on a raw connection.
struct Raw {
    status: Option<u16>,
    head: String,
    body: Vec<u8>,
}

impl Raw {
    fn header(&self, name: &str) -> Option<String> {
        self.head.lines().skip(1).find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_string())
        })
    }
}

/// Read everything until the server closes (or resets) the connection.
fn read_all(stream: &mut TcpStream) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                assert!(
                    !matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ),
                    "the server neither answered nor closed within 10 s"
                );
                break;
            }
        }
    }
    out
}

fn parse_raw(bytes: &[u8]) -> Raw {
    let split = bytes
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| (i, i + 4));
    let (head, body) = match split {
        Some((h, b)) => (&bytes[..h], bytes[b..].to_vec()),
        None => (bytes, Vec::new()),
    };
    let head = String::from_utf8_lossy(head).into_owned();
    let status = head
        .strip_prefix("HTTP/1.1 ")
        .and_then(|r| r.get(..3))
        .and_then(|c| c.parse().ok());
    Raw { status, head, body }
}

/// Send `request` verbatim from `source` and read the answer to the end;
/// the request should ask for `Connection: close`. A server that closes
/// while the request is still being written is tolerated (the answer is
/// then whatever arrived, possibly nothing).
fn raw_request(s: &Server, source: &str, request: &[u8]) -> Raw {
    let mut stream = connect_from(s, source);
    let _ = stream.write_all(request);
    parse_raw(&read_all(&mut stream))
}

/// Every path reachable from `starts` by following listings, as seen from
/// one guest, with what each returned.
///
/// A listing line `name/` is a directory and `0=name` (EC2 public keys)
/// stands for the directory `0/`. Version listings name directories without
/// a slash, so any other line is fetched as it is and, when what comes back
/// looks like a listing (non-empty lines of path characters only), also
/// explored as a directory; for a plain value that only costs a 404.
fn crawl(g: &Guest, starts: &[&str]) -> BTreeMap<String, Answer> {
    fn looks_like_listing(body: &[u8]) -> bool {
        let Ok(text) = std::str::from_utf8(body) else {
            return false;
        };
        !text.is_empty()
            && text.lines().all(|l| {
                !l.is_empty()
                    && l.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"._:=-/".contains(&b))
            })
    }
    let mut seen = BTreeMap::new();
    let mut queue: VecDeque<String> = starts.iter().map(|s| s.to_string()).collect();
    while let Some(path) = queue.pop_front() {
        if seen.contains_key(&path) {
            continue;
        }
        assert!(seen.len() < 20_000, "runaway crawl at {path}");
        let a = g.get(&path);
        let explore = a.status == 200 && (path.ends_with('/') || looks_like_listing(&a.body));
        if explore {
            let base = if path.ends_with('/') {
                path.clone()
            } else {
                format!("{path}/")
            };
            for line in a.text().lines() {
                let child = match (line.split_once('='), line.strip_suffix('/')) {
                    (Some((index, _)), _) => format!("{base}{index}/"),
                    (None, Some(dir)) => format!("{base}{dir}/"),
                    (None, None) => format!("{base}{line}"),
                };
                if !line.is_empty() {
                    queue.push_back(child);
                }
            }
        }
        seen.insert(path, a);
    }
    seen
}

// ---------------------------------------------------------------------------
// Who is asking

/// A spec whose every field carries a marker unique to `tag`, and the
/// markers a guest could be served.
fn marked_spec(tag: &str, address: &str, n: u8) -> (Value, Vec<String>) {
    let m = |field: &str| format!("{tag}-{field}-q7z");
    let key = ssh_key(n, &m("keycomment"));
    let user_data = format!("#cloud-config\n# {}\n", m("userdata"));
    let spec = json!({
        "name": m("name"),
        "hostname": m("host"),
        "project_id": m("project"),
        "availability_zone": m("zone"),
        "instance_type": m("type"),
        "metadata": {m("metakey"): m("metavalue")},
        "public_keys": {m("keyname"): key},
        "user_data": b64(user_data.as_bytes()),
        "metadata_address": address,
        "mac": format!("02:{n:02x}:{n:02x}:{n:02x}:{n:02x}:{n:02x}"),
        "local_ipv4": format!("10.{n}.0.5/24"),
        "gateway_ipv4": format!("10.{n}.0.1"),
        "dns_nameservers": [format!("10.{n}.0.53")],
        "public_ipv4": format!("198.51.100.{n}"),
        "os_image": m("image"),
        "os_params": {
            "public": {format!("{tag}_pub"): m("public")},
            "private": {format!("{tag}_priv"): m("private")},
            "secret": {format!("{tag}_sec"): m("secret")},
        },
    });
    let markers = vec![
        m("name"),
        m("host"),
        m("project"),
        m("zone"),
        m("type"),
        m("metakey"),
        m("metavalue"),
        m("keycomment"),
        m("keyname"),
        key.split(' ').nth(1).unwrap().to_string(),
        m("userdata"),
        format!("02:{n:02x}:{n:02x}:{n:02x}:{n:02x}:{n:02x}"),
        format!("10.{n}.0.5"),
        format!("10.{n}.0.1"),
        format!("10.{n}.0.53"),
        format!("198.51.100.{n}"),
        m("image"),
        format!("{tag}_pub"),
        m("public"),
        format!("{tag}_priv"),
        m("private"),
        format!("{tag}_sec"),
        m("secret"),
    ];
    (spec, markers)
}

const NAMESPACES: &[&str] = &["/", "/openstack/", "/cradle/", "/ganeti/"];

#[test]
fn a_guest_sees_only_its_own_instance_on_every_path() {
    // The crawl of all four namespaces is some 1,500 requests in a second
    // or two, far past any guest's budget: this test is about what is
    // answered, not how often.
    let s = Server::start_with(Opts {
        env: &[("CRADLE_METADATA_RATE_LIMIT", "0")],
        ..Default::default()
    });
    let (spec_a, mut markers_a) = marked_spec("alpha", "127.0.0.2", 77);
    let (spec_b, mut markers_b) = marked_spec("bravo", "127.0.0.3", 88);
    let id_a = create(&s, spec_a);
    let id_b = create(&s, spec_b);
    let (a, b) = (s.guest("127.0.0.2"), s.guest("127.0.0.3"));
    for (g, id, markers, tag) in [
        (&a, &id_a, &mut markers_a, "alpha"),
        (&b, &id_b, &mut markers_b, "bravo"),
    ] {
        // What the guest itself sets is part of its instance too.
        let pw = format!("{tag}-password-q7z");
        let set = g.request(
            "POST",
            "/openstack/latest/password",
            &[],
            Some(pw.clone().into_bytes()),
        );
        assert_eq!(set.status, 200);
        let seed = g.get("/openstack/latest/meta_data.json").json()["random_seed"]
            .as_str()
            .unwrap()
            .to_string();
        markers.extend([
            id.clone(),
            ec2_instance_id(id),
            id.replace('-', "")[15..].to_string(),
            seed,
            pw,
        ]);
    }
    // A message queued for A is not B's to read.
    let queued = s.admin().fetch(route::send_message(
        &id_a,
        &MessageIn {
            text: Some("alpha-message-q7z".into()),
            data: None,
        },
    ));
    assert_eq!(queued.status, 202);
    let read_b = b.get("/cradle/latest/read");
    assert_eq!((read_b.status, read_b.body.len()), (204, 0));

    let seen_a = crawl(&a, NAMESPACES);
    let seen_b = crawl(&b, NAMESPACES);
    assert!(seen_b.len() >= 40, "crawled only {} paths", seen_b.len());
    assert!(
        seen_b
            .keys()
            .any(|p| p.contains("/public-keys/0/openssh-key"))
            && seen_b.contains_key("/openstack/2012-08-10/meta_data.json")
            && seen_b.contains_key("/cradle/latest/os/parameters.json")
            && seen_b.contains_key("/ganeti/latest/os/parameters.json"),
        "the crawl missed whole trees: {:?}",
        seen_b.keys().collect::<Vec<_>>()
    );

    let found = |seen: &BTreeMap<String, Answer>, marker: &str| -> Vec<String> {
        seen.iter()
            .filter(|(_, ans)| ans.text().contains(marker))
            .map(|(p, _)| p.clone())
            .collect()
    };
    // Each guest's crawl finds every one of its own markers, so the crawl
    // reaches everything a marker could leak through...
    for (seen, markers) in [(&seen_a, &markers_a), (&seen_b, &markers_b)] {
        for m in markers {
            assert!(!found(seen, m).is_empty(), "crawl never served {m:?}");
        }
    }
    // ...and none of the other's, whether at B's own paths or at every path
    // A's crawl found (A's key index, A's mac directory, ...).
    let mut replayed = BTreeMap::new();
    for path in seen_a.keys() {
        replayed.insert(path.clone(), b.get(path));
    }
    for m in &markers_a {
        assert_eq!(
            found(&seen_b, m),
            Vec::<String>::new(),
            "B was served {m:?}"
        );
        assert_eq!(
            found(&replayed, m),
            Vec::<String>::new(),
            "B was served {m:?} at one of A's paths"
        );
    }
    for m in &markers_b {
        assert_eq!(
            found(&seen_a, m),
            Vec::<String>::new(),
            "A was served {m:?}"
        );
    }
    // The crawls read nothing from the channel: A's message is still there.
    assert_eq!(a.get("/cradle/latest/read").text(), "alpha-message-q7z");
}

#[test]
fn forwarding_headers_cannot_change_who_is_asking() {
    let s = Server::start();
    create(&s, json!({"name": "a", "metadata_address": "127.0.0.2"}));
    create(&s, json!({"name": "b", "metadata_address": "127.0.0.3"}));
    let b = s.guest("127.0.0.3");
    for header in [
        ("X-Forwarded-For", "127.0.0.2"),
        ("X-Real-IP", "127.0.0.2"),
        ("Forwarded", "for=127.0.0.2"),
        ("X-Client-IP", "127.0.0.2"),
    ] {
        let h = b.request("GET", "/latest/meta-data/hostname", &[header], None);
        assert_eq!((h.status, h.text().as_str()), (200, "b"), "{header:?}");
        let md = b.request("GET", "/openstack/latest/meta_data.json", &[header], None);
        assert_eq!(md.json()["name"], "b", "{header:?}");
    }
    // A token minted with a forwarding header still belongs to B.
    let t = b.request(
        "PUT",
        "/latest/api/token",
        &[
            ("X-aws-ec2-metadata-token-ttl-seconds", "60"),
            ("Forwarded", "for=127.0.0.2"),
        ],
        None,
    );
    assert_eq!(t.status, 200);
    let token = t.text();
    let use_token = |g: &Guest| {
        g.request(
            "GET",
            "/latest/meta-data/hostname",
            &[("X-aws-ec2-metadata-token", &token)],
            None,
        )
        .status
    };
    assert_eq!(use_token(&b), 200);
    assert_eq!(use_token(&s.guest("127.0.0.2")), 401);
}

#[test]
fn an_unknown_source_gets_404_everywhere() {
    let s = Server::start();
    create(&s, json!({"name": "a", "metadata_address": "127.0.0.2"}));
    let stranger = s.guest("127.0.0.9");
    for path in [
        "/",
        "/latest/meta-data/",
        "/latest/meta-data/hostname",
        "/openstack/latest/meta_data.json",
        "/cradle/latest/os/parameters.json",
        "/cradle/latest/read",
    ] {
        let a = stranger.get(path);
        assert_eq!(a.status, 404, "{path}");
        assert!(!a.text().contains("\"a\""), "{path}: {}", a.text());
    }
    let put = stranger.request(
        "PUT",
        "/latest/api/token",
        &[("X-aws-ec2-metadata-token-ttl-seconds", "60")],
        None,
    );
    assert_eq!(put.status, 404);
    let write = stranger.request("POST", "/cradle/latest/write", &[], Some(b"x".to_vec()));
    assert_eq!(write.status, 404);
    // The instance itself is served, so the 404s are about the source.
    assert_eq!(
        s.guest("127.0.0.2")
            .get("/latest/meta-data/hostname")
            .text(),
        "a"
    );
}

// ---------------------------------------------------------------------------
// Formats

#[test]
fn ec2_tree_has_the_documented_shape() {
    let s = Server::start();
    let (alice, bob) = (ssh_key(1, "alice"), ssh_key(2, "bob"));
    let id = create(
        &s,
        json!({
            "name": "ec2",
            "hostname": "ec2-host",
            "public_keys": {"bob": bob, "alice": alice},
            "user_data": b64(b"#!/bin/sh\necho hi\n"),
            "metadata_address": "127.0.0.2",
            "availability_zone": "eu-west-1a",
            "local_ipv4": "10.0.0.5/24",
        }),
    );
    create(&s, json!({"name": "bare", "metadata_address": "127.0.0.3"}));
    let g = s.guest("127.0.0.2");
    let text = |path: &str| {
        let a = g.get(path);
        assert_eq!(a.status, 200, "{path}: {}", a.text());
        a.text()
    };

    let mut versions: Vec<&str> = EC2_DOCUMENTED.to_vec();
    versions.push("latest");
    assert_eq!(text("/"), versions.join("\n"));
    // Sub-trees carry a trailing slash, as docs/metadata-api.md says.
    assert_eq!(text("/latest/"), "dynamic/\nmeta-data/\nuser-data");
    assert_eq!(text("/latest"), text("/latest/"));
    assert_eq!(text("/1.0/"), "meta-data/\nuser-data");
    assert_eq!(
        text("/latest/meta-data/"),
        "ami-id\nami-launch-index\nami-manifest-path\nblock-device-mapping/\nevents/\n\
         hostname\ninstance-action\ninstance-id\ninstance-type\nlocal-hostname\nlocal-ipv4\nmac\n\
         network/\nplacement/\npublic-keys/\nreservation-id\nsecurity-groups"
    );
    assert_eq!(text("/latest/meta-data"), text("/latest/meta-data/"));
    assert!(!text("/1.0/meta-data/").contains("local-hostname"));
    assert_eq!(text("/latest/meta-data/public-keys/"), "0=alice\n1=bob");
    assert_eq!(text("/latest/meta-data/public-keys"), "0=alice\n1=bob");
    assert_eq!(text("/latest/meta-data/public-keys/0/"), "openssh-key");
    assert_eq!(text("/latest/meta-data/public-keys/0/openssh-key"), alice);
    assert_eq!(text("/latest/meta-data/public-keys/1/openssh-key"), bob);
    assert_eq!(g.get("/latest/meta-data/public-keys/0=alice").status, 404);
    assert_eq!(text("/latest/meta-data/instance-id"), ec2_instance_id(&id));
    assert_eq!(text("/latest/meta-data/hostname"), "ec2-host");
    assert_eq!(text("/latest/meta-data/local-ipv4"), "10.0.0.5");
    assert_eq!(
        text("/latest/meta-data/placement/availability-zone"),
        "eu-west-1a"
    );
    assert_eq!(text("/latest/meta-data/placement/region"), "eu-west-1");
    assert_eq!(text("/latest/meta-data/security-groups"), "default");

    let ud = g.get("/latest/user-data");
    assert_eq!(ud.body, b"#!/bin/sh\necho hi\n");
    assert_eq!(
        ud.headers.get("content-type").unwrap(),
        "application/octet-stream"
    );

    let doc = g.get("/latest/dynamic/instance-identity/document");
    assert_eq!(doc.headers.get("content-type").unwrap(), "application/json");
    let doc = doc.json();
    assert_eq!(doc["instanceId"], ec2_instance_id(&id));
    assert_eq!(doc["availabilityZone"], "eu-west-1a");
    assert_eq!(doc["region"], "eu-west-1");
    assert_eq!(doc["privateIp"], "10.0.0.5");
    assert_eq!(g.get("/2008-09-01/dynamic/").status, 404);

    // Without user-data or keys, neither is listed nor served.
    let bare = s.guest("127.0.0.3");
    assert_eq!(bare.get("/latest/").text(), "dynamic/\nmeta-data/");
    assert_eq!(bare.get("/latest/user-data").status, 404);
    assert!(
        !bare
            .get("/latest/meta-data/")
            .text()
            .contains("public-keys")
    );
    assert_eq!(bare.get("/latest/meta-data/public-keys/").status, 404);
    // local-ipv4 falls back to the address the guest asks from.
    assert_eq!(bare.get("/latest/meta-data/local-ipv4").text(), "127.0.0.3");
    assert_eq!(g.get("/2011-01-02/meta-data/").status, 404);
    assert_eq!(g.get("/latest/meta-data/nonesuch").status, 404);
}

/// Every version EC2 lists at `GET /` (the EC2 User Guide's example, and
/// what EC2 has added since, to 2024-04-11), written out here apart from
/// the renderer's own list.
const EC2_DOCUMENTED: &[&str] = &[
    "1.0",
    "2007-01-19",
    "2007-03-01",
    "2007-08-29",
    "2007-10-10",
    "2007-12-15",
    "2008-02-01",
    "2008-09-01",
    "2009-04-04",
    "2011-01-01",
    "2011-05-01",
    "2012-01-12",
    "2014-02-25",
    "2014-11-05",
    "2015-10-20",
    "2016-04-19",
    "2016-06-30",
    "2016-09-02",
    "2018-03-28",
    "2018-08-17",
    "2018-09-24",
    "2019-10-01",
    "2020-10-27",
    "2021-01-03",
    "2021-03-23",
    "2021-07-15",
    "2022-09-24",
    "2024-04-11",
];

#[test]
fn every_documented_ec2_version_answers_and_no_other() {
    let s = Server::start();
    let id = create(&s, json!({"name": "v", "metadata_address": "127.0.0.2"}));
    let g = s.bare_guest("127.0.0.2");
    for v in EC2_DOCUMENTED.iter().chain(&["latest"]) {
        let a = g.get(&format!("/{v}/meta-data/instance-id"));
        assert_eq!((a.status, a.text()), (200, ec2_instance_id(&id)), "{v}");
        assert!(
            g.get(&format!("/{v}/")).text().contains("meta-data/"),
            "{v}"
        );
    }
    // The identity document from 2009-04-04 on, as EC2 serves it.
    assert_eq!(
        g.get("/2008-09-01/dynamic/instance-identity/document")
            .status,
        404
    );
    let doc = g.get("/2021-01-03/dynamic/instance-identity/document");
    assert_eq!(doc.json()["instanceId"], ec2_instance_id(&id));
    for never in [
        "2011-01-02",
        "2010-01-01",
        "2025-01-01",
        "1.1",
        "2.0",
        "Latest",
    ] {
        let a = g.get(&format!("/{never}/meta-data/instance-id"));
        assert_eq!(a.status, 404, "{never}");
    }
}

#[test]
fn openstack_tree_has_the_documented_shape() {
    let s = Server::start();
    create(
        &s,
        json!({
            "name": "os",
            "metadata_address": "127.0.0.2",
            "mac": "fa:16:3e:aa:bb:cc",
            "project_id": "proj-7",
            "user_data": b64(b"hello"),
        }),
    );
    create(&s, json!({"name": "bare", "metadata_address": "127.0.0.3"}));
    let g = s.guest("127.0.0.2");

    let versions = "2012-08-10\n2013-04-04\n2013-10-17\n2015-10-15\n2016-06-30\n2016-10-06\n\
                    2017-02-22\n2018-08-27\n2020-10-14\n2025-04-04\nlatest";
    assert_eq!(g.get("/openstack").text(), versions);
    assert_eq!(g.get("/openstack/").text(), versions);
    assert_eq!(
        g.get("/openstack/latest").text(),
        "meta_data.json\npassword\nuser_data\nvendor_data.json\nvendor_data2.json\n\
         network_data.json"
    );
    assert_eq!(
        g.get("/openstack/2012-08-10/").text(),
        "meta_data.json\nuser_data"
    );

    let old = g.get("/openstack/2012-08-10/meta_data.json").json();
    assert_eq!(old["name"], "os");
    assert!(old.get("random_seed").is_none(), "{old}");
    assert!(old.get("project_id").is_none(), "{old}");
    let seed_of = || {
        let md = g.get("/openstack/latest/meta_data.json").json();
        assert_eq!(md["project_id"], "proj-7");
        md["random_seed"].as_str().unwrap().to_string()
    };
    let seed = seed_of();
    assert_eq!(seed_of(), seed, "random_seed is the same on every read");
    use base64::Engine;
    let raw = base64::engine::general_purpose::STANDARD
        .decode(&seed)
        .unwrap();
    assert_eq!(raw.len(), 512);
    let other_seed = s
        .guest("127.0.0.3")
        .get("/openstack/latest/meta_data.json")
        .json()["random_seed"]
        .clone();
    assert_ne!(other_seed, json!(seed), "each instance has its own seed");

    assert_eq!(g.get("/openstack/latest/user_data").body, b"hello");
    assert_eq!(
        s.guest("127.0.0.3")
            .get("/openstack/latest/user_data")
            .status,
        404
    );
    let vd = g.get("/openstack/latest/vendor_data.json");
    assert_eq!((vd.status, vd.text().as_str()), (200, "{}"));
    assert_eq!(
        g.get("/openstack/latest/vendor_data2.json").text(),
        r#"{"static":{}}"#
    );
    let nd = g.get("/openstack/latest/network_data.json").json();
    assert_eq!(nd["links"][0]["ethernet_mac_address"], "fa:16:3e:aa:bb:cc");
    assert_eq!(nd["networks"][0]["type"], "ipv4_dhcp");
    assert_eq!(g.get("/openstack/2014-01-01/meta_data.json").status, 404);
    assert_eq!(g.get("/openstack/2013-04-04/network_data.json").status, 404);
}

#[test]
fn openstack_password_can_be_set_once() {
    let s = Server::start();
    let id = create(&s, json!({"name": "a", "metadata_address": "127.0.0.2"}));
    create(&s, json!({"name": "b", "metadata_address": "127.0.0.3"}));
    create(&s, json!({"name": "c", "metadata_address": "127.0.0.4"}));
    let g = s.guest("127.0.0.2");
    let post = |g: &Guest, path: &str, body: &[u8]| {
        g.request("POST", path, &[], Some(body.to_vec())).status
    };

    let empty = g.get("/openstack/latest/password");
    assert_eq!((empty.status, empty.body.len()), (200, 0));
    assert_eq!(post(&g, "/openstack/latest/password", b"pw1"), 200);
    assert_eq!(g.get("/openstack/latest/password").text(), "pw1");
    assert_eq!(g.get("/openstack/2013-04-04/password").text(), "pw1");
    assert_eq!(post(&g, "/openstack/latest/password", b"pw2"), 409);
    assert_eq!(g.get("/openstack/latest/password").text(), "pw1");
    let view = s.admin().fetch(route::instance(&id)).json();
    assert_eq!(view["password_set"], true);

    // Nova's limit is 1020 bytes; one more is refused and sets nothing.
    let b = s.guest("127.0.0.3");
    assert_eq!(post(&b, "/openstack/latest/password", &[b'x'; 1021]), 400);
    assert_eq!(b.get("/openstack/latest/password").body.len(), 0);
    assert_eq!(post(&b, "/openstack/latest/password", &[b'y'; 1020]), 200);
    assert_eq!(b.get("/openstack/latest/password").body, [b'y'; 1020]);

    // 2012-08-10 has no password file to post to.
    let c = s.guest("127.0.0.4");
    assert_eq!(post(&c, "/openstack/2012-08-10/password", b"pw"), 404);
    assert_eq!(c.get("/openstack/2012-08-10/password").status, 404);
    assert_eq!(c.get("/openstack/latest/password").body.len(), 0);
    // Only the password file takes a POST.
    let a = c.request("POST", "/openstack/latest/meta_data.json", &[], None);
    assert_eq!(a.status, 405);
    assert_eq!(a.headers.get("allow").unwrap(), "GET, HEAD");
    let a = c.request("PUT", "/openstack/latest/password", &[], None);
    assert_eq!(a.status, 405);
    assert_eq!(a.headers.get("allow").unwrap(), "GET, HEAD, POST");
}

#[test]
fn native_tree_serves_metadata_and_os_parameters() {
    let s = Server::start();
    let id = create(
        &s,
        json!({
            "name": "nat",
            "metadata_address": "127.0.0.2",
            "os_type": "debootstrap",
            "os_params": {
                "public": {"locale": "en_US"},
                "private": {"db_url": "postgres://db"},
                "secret": {"root_pw": "hunter2"},
            },
        }),
    );
    let g = s.guest("127.0.0.2");
    assert_eq!(g.get("/cradle/").text(), "latest/");
    assert_eq!(
        g.get("/cradle/latest/").text(),
        "events\nmeta_data.json\nos/"
    );
    let native = g.get("/cradle/latest/meta_data.json");
    assert_eq!(native.status, 200);
    assert_eq!(native.body, g.get("/ganeti/latest/meta_data.json").body);
    let md = native.json();
    assert_eq!(md["uuid"], id);
    assert_eq!(md["name"], "nat");
    assert_eq!(md["os_type"], "debootstrap");
    assert_eq!(md["imds_tokens"], "optional");
    let params = g.get("/cradle/latest/os/parameters.json");
    assert_eq!(params.status, 200);
    assert_eq!(
        params.json(),
        json!({
            "locale": ["en_US", "public"],
            "db_url": ["postgres://db", "private"],
            "root_pw": ["hunter2", "secret"],
        })
    );
    assert_eq!(params.body, g.get("/ganeti/latest/os/parameters.json").body);
    assert_eq!(g.get("/cradle/latest/os/scripts/").text(), "");
    assert_eq!(g.get("/cradle/latest/os/scripts/create").status, 404);
    assert_eq!(g.get("/cradle/2020-01-01/meta_data.json").status, 404);
}

#[test]
fn channel_carries_messages_both_ways_exactly_once() {
    let s = Server::start();
    let id = create(&s, json!({"name": "ch", "metadata_address": "127.0.0.2"}));
    let admin = s.admin();
    let g = s.guest("127.0.0.2");

    // Host → guest, in order, each once.
    let binary = [0x00u8, 0xff, 0x10, 0x80, b'\n'];
    for body in [
        MessageIn {
            text: Some("m1".into()),
            data: None,
        },
        MessageIn {
            text: None,
            data: Some(b64(&binary)),
        },
    ] {
        assert_eq!(admin.fetch(route::send_message(&id, &body)).status, 202);
    }
    // HEAD is not a read: it must not pop a message.
    assert_eq!(
        g.request("HEAD", "/cradle/latest/read", &[], None).status,
        405
    );
    let first = g.get("/cradle/latest/read");
    assert_eq!((first.status, first.body.as_slice()), (200, &b"m1"[..]));
    let second = g.get("/ganeti/latest/read");
    assert_eq!((second.status, second.body.as_slice()), (200, &binary[..]));
    let id_of = |a: &Answer| a.headers.get("x-cradle-message-id").unwrap().clone();
    assert_ne!(id_of(&first), id_of(&second));
    let empty = g.get("/cradle/latest/read");
    assert_eq!((empty.status, empty.body.len()), (204, 0));
    assert_eq!(g.get("/cradle/latest/read").status, 204);
    let a = g.request("POST", "/cradle/latest/read", &[], None);
    assert_eq!(a.status, 405);
    assert_eq!(a.headers.get("allow").unwrap(), "GET");

    // Guest → host, drained once.
    let w = g.request("POST", "/cradle/latest/write", &[], Some(b"hello".to_vec()));
    assert_eq!(w.status, 201);
    assert!(w.headers.contains_key("x-cradle-message-id"));
    let drained = admin.fetch(route::receive_messages(&id)).json();
    let got = drained["messages"].as_array().unwrap();
    assert_eq!(got.len(), 1, "{drained}");
    assert_eq!(got[0]["text"], "hello");
    assert_eq!(got[0]["data"], b64(b"hello"));
    assert_eq!(
        admin.fetch(route::receive_messages(&id)).json()["messages"],
        json!([])
    );
    let a = g.request("GET", "/cradle/latest/write", &[], None);
    assert_eq!(a.status, 405);
    assert_eq!(a.headers.get("allow").unwrap(), "POST");

    // 64 KiB is the largest message.
    let max = vec![0xabu8; 64 * 1024];
    let w = g.request("POST", "/cradle/latest/write", &[], Some(max.clone()));
    assert_eq!(w.status, 201);
    let w = g.request(
        "POST",
        "/cradle/latest/write",
        &[],
        Some(vec![0u8; 64 * 1024 + 1]),
    );
    assert_eq!(w.status, 413);
    let drained = admin.fetch(route::receive_messages(&id)).json();
    let got = drained["messages"].as_array().unwrap();
    assert_eq!(got.len(), 1, "only the 64 KiB message was queued");
    assert_eq!(got[0]["data"], b64(&max));
    assert!(got[0].get("text").is_none(), "not UTF-8, so no text");
}

#[test]
fn channel_write_gets_429_when_the_queue_is_full() {
    let s = Server::start_with(Opts {
        env: &[("CRADLE_CHANNEL_QUEUE_LEN", "3")],
        ..Opts::default()
    });
    let id = create(&s, json!({"name": "q", "metadata_address": "127.0.0.2"}));
    let g = s.guest("127.0.0.2");
    let write = |body: &str| {
        g.request(
            "POST",
            "/cradle/latest/write",
            &[],
            Some(body.as_bytes().to_vec()),
        )
        .status
    };
    for n in 1..=3 {
        assert_eq!(write(&format!("w{n}")), 201, "write {n}");
    }
    assert_eq!(write("w4"), 429);
    let drained = s.admin().fetch(route::receive_messages(&id)).json();
    let texts: Vec<&str> = drained["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["text"].as_str().unwrap())
        .collect();
    assert_eq!(texts, ["w1", "w2", "w3"]);
    // Drained, the queue takes writes again.
    assert_eq!(write("w5"), 201);
}

// ---------------------------------------------------------------------------
// Hardening

#[test]
fn ambiguous_paths_get_400() {
    let s = Server::start();
    create(&s, json!({"name": "a", "metadata_address": "127.0.0.2"}));
    for path in [
        "/latest/../openstack/latest/meta_data.json",
        "/latest/meta-data/..",
        "/latest/%2e%2e/meta-data/",
        "/latest/meta-data/host%6eame",
        "//latest/meta-data/",
        "/latest//meta-data/",
        "/latest/./meta-data/",
        "/./",
        "/latest/meta-data\\hostname",
    ] {
        let r = raw_request(
            &s,
            "127.0.0.2",
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        );
        assert_eq!(r.status, Some(400), "{path}: {}", r.head);
    }
    // The same connection code answers a clean path.
    let r = raw_request(
        &s,
        "127.0.0.2",
        b"GET /latest/meta-data/hostname HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert_eq!((r.status, r.body.as_slice()), (Some(200), &b"a"[..]));
}

#[test]
fn head_is_get_without_a_body_and_other_methods_get_405() {
    let s = Server::start();
    create(
        &s,
        json!({"name": "a", "hostname": "a-rather-long-hostname", "metadata_address": "127.0.0.2"}),
    );
    let get = s.guest("127.0.0.2").get("/latest/meta-data/hostname");
    assert_eq!(get.text(), "a-rather-long-hostname");
    let head = raw_request(
        &s,
        "127.0.0.2",
        b"HEAD /latest/meta-data/hostname HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(head.status, Some(200), "{}", head.head);
    assert_eq!(
        head.header("content-length"),
        Some(get.body.len().to_string())
    );
    assert!(head.body.is_empty(), "HEAD sent a body");

    let g = s.guest("127.0.0.2");
    g.refuses_methods(
        "/latest/meta-data/",
        &["DELETE", "PUT", "POST", "PATCH", "OPTIONS"],
        "GET, HEAD",
    );
}

#[test]
fn malformed_and_oversized_requests_leave_the_server_serving() {
    let s = Server::start();
    create(&s, json!({"name": "a", "metadata_address": "127.0.0.2"}));
    let works = || {
        let a = s.guest("127.0.0.2").get("/latest/meta-data/hostname");
        assert_eq!((a.status, a.text().as_str()), (200, "a"));
    };

    let r = raw_request(
        &s,
        "127.0.0.2",
        b"GET /latest/\xff\xfe/hostname HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    let status = r.status.expect("an answer to a non-UTF-8 request line");
    assert!((400..500).contains(&status), "{}", r.head);
    works();

    let r = raw_request(&s, "127.0.0.2", b"NOT HTTP AT ALL\r\n\r\n");
    assert!(
        r.status.is_none_or(|c| (400..500).contains(&c)),
        "{}",
        r.head
    );
    works();

    // A 64 KiB header: refused (431 or 400) or cut off, never served.
    let mut big = b"GET /latest/meta-data/hostname HTTP/1.1\r\nHost: x\r\nX-Big: ".to_vec();
    big.extend(std::iter::repeat_n(b'a', 64 * 1024));
    big.extend_from_slice(b"\r\nConnection: close\r\n\r\n");
    let r = raw_request(&s, "127.0.0.2", &big);
    assert!(
        matches!(r.status, None | Some(400) | Some(431)),
        "a 64 KiB header got {}",
        r.head
    );
    works();
}

#[test]
fn a_slow_client_is_cut_off_after_the_header_timeout() {
    let s = Server::start_with(Opts {
        env: &[("CRADLE_METADATA_HEADER_TIMEOUT", "1")],
        ..Opts::default()
    });
    create(&s, json!({"name": "a", "metadata_address": "127.0.0.2"}));
    let mut slow = connect_from(&s, "127.0.0.2");
    slow.write_all(b"GET / HTTP/1.1\r\n").unwrap();
    let started = Instant::now();
    let answer = read_all(&mut slow);
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(800) && took <= Duration::from_secs(3),
        "the connection was closed after {took:?}"
    );
    // Whatever it said first, it never answered the request.
    assert!(
        !String::from_utf8_lossy(&answer).contains("200 OK"),
        "{answer:?}"
    );
    // A prompt client on the same server is served.
    let a = s.guest("127.0.0.2").get("/latest/meta-data/hostname");
    assert_eq!((a.status, a.text().as_str()), (200, "a"));
}
