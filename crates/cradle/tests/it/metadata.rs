//! The metadata service as guests see it: the real binary, read from
//! 127.0.0.x source addresses by reqwest, by raw sockets, and by Debian's
//! cloud-init and botocore.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use cradle_model::api::MessageIn;
use serde_json::{Value, json};

use crate::harness::*;

// ---------------------------------------------------------------------------
// Helpers

/// Create an instance and return its id.
fn create(s: &Server, spec: Value) -> String {
    let view = s.admin().create(&spec);
    view["id"]
        .as_str()
        .expect("create returns an id")
        .to_string()
}

/// The EC2 instance id cradle derives from a UUID: `i-` and its first 17
/// hex digits.
fn ec2_instance_id(uuid: &str) -> String {
    format!("i-{}", &uuid.replace('-', "")[..17])
}

/// Python run before each client script: every connection the script makes
/// leaves from the source address `argv[1]`, and connections to
/// 169.254.169.254:80 (where the service lives in production, and where
/// cloud-init looks for EC2 data) go to the test server `argv[2]` instead.
/// `emit(result)` prints the result as JSON on a `RESULT ` line, bytes as
/// `{"b64": ...}`, with the source addresses actually used under "sources".
const PY_PRELUDE: &str = r#"
import base64, copy, json, socket, sys
import urllib3.util.connection as _uc

SRC = sys.argv[1]
_HOST, _PORT = sys.argv[2].rsplit(":", 1)
_PORT = int(_PORT)
URL = "http://" + sys.argv[2]
SEEN = []

def _route(address):
    if address[0] == "169.254.169.254":
        return (_HOST, _PORT)
    return (address[0], address[1])

_orig_uc = _uc.create_connection
def _uc_create(address, timeout=socket._GLOBAL_DEFAULT_TIMEOUT, source_address=None, socket_options=None):
    sock = _orig_uc(_route(address), timeout, (SRC, 0), socket_options)
    SEEN.append(sock.getsockname()[0])
    return sock
_uc.create_connection = _uc_create

_orig_sock = socket.create_connection
def _sock_create(address, timeout=socket._GLOBAL_DEFAULT_TIMEOUT, source_address=None, **kw):
    sock = _orig_sock(_route(address), timeout, (SRC, 0), **kw)
    SEEN.append(sock.getsockname()[0])
    return sock
socket.create_connection = _sock_create

def _enc(o):
    if isinstance(o, (bytes, bytearray)):
        return {"b64": base64.b64encode(bytes(o)).decode()}
    raise TypeError(repr(o))

def emit(result):
    result["sources"] = sorted(set(SEEN))
    print("RESULT " + json.dumps(result, default=_enc, sort_keys=True))
"#;

/// Run `script` (after [`PY_PRELUDE`]) with Debian's Python as the guest at
/// `source`, and return what it emitted. Asserts that it connected, and only
/// from `source`.
fn python_guest(s: &Server, source: &str, script: &str) -> Value {
    let program = format!("{PY_PRELUDE}\n{script}");
    let out = python(&program, &[source, &s.metadata.to_string()]);
    let line = out
        .lines()
        .find_map(|l| l.strip_prefix("RESULT "))
        .unwrap_or_else(|| panic!("the script emitted no result:\n{out}"));
    let v: Value = serde_json::from_str(line).unwrap();
    assert_eq!(
        v["sources"],
        json!([source]),
        "connections left from {source}"
    );
    v
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
// Real clients

#[test]
fn cloud_init_openstack_reader_reads_the_instance() {
    let s = Server::start();
    let (alice, bob) = (ssh_key(1, "alice@laptop"), ssh_key(2, "bob@desk"));
    let user_data = b"#cloud-config\nhostname: web-1\nruncmd:\n  - [echo, hello]\n";
    let id = create(
        &s,
        json!({
            "name": "web one",
            "hostname": "web-1",
            "metadata": {"role": "web", "tier": "1"},
            "public_keys": {"alice": alice, "bob": bob},
            "user_data": b64(user_data),
            "metadata_address": "127.0.0.2",
            "mac": "fa:16:3e:00:00:21",
            "local_ipv4": "10.0.0.5/24",
            "gateway_ipv4": "10.0.0.1",
            "dns_nameservers": ["10.0.0.2"],
        }),
    );

    // cloud-init's OpenStack datasource also reads the EC2 tree from
    // 169.254.169.254, which the prelude routes to the test server.
    let out = python_guest(
        &s,
        "127.0.0.2",
        r#"
from cloudinit import sources
from cloudinit.sources.helpers import openstack
res = openstack.MetadataReader(URL, timeout=5, retries=1).read_v2()
md = res["metadata"]
links = res["networkdata"]["links"]
net = openstack.convert_net_json(copy.deepcopy(res["networkdata"]),
                                 known_macs={links[0]["ethernet_mac_address"]: "eth0"})
emit({"read": res, "ssh_keys": sorted(sources.normalize_pubkey_data(md["public_keys"])),
      "seed_len": len(md["random_seed"]), "net": net})
"#,
    );

    let read = &out["read"];
    let md = &read["metadata"];
    assert_eq!(read["version"], 2);
    assert_eq!(md["uuid"], id);
    assert_eq!(
        md["instance-id"], id,
        "cloud-init's instance-id is the uuid"
    );
    assert_eq!(md["name"], "web one");
    assert_eq!(md["hostname"], "web-1");
    assert_eq!(md["local-hostname"], "web-1");
    assert_eq!(md["meta"], json!({"role": "web", "tier": "1"}));
    assert_eq!(md["public_keys"], json!({"alice": alice, "bob": bob}));
    let mut want_keys = vec![alice.clone(), bob.clone()];
    want_keys.sort();
    assert_eq!(out["ssh_keys"], json!(want_keys));
    assert_eq!(read["userdata"], json!({"b64": b64(user_data)}));
    assert_eq!(out["seed_len"], 512);
    assert_eq!(read["vendordata"], json!({}));
    assert_eq!(read["vendordata2"], json!({"static": {}}));
    assert_eq!(
        read["networkdata"]["links"][0]["ethernet_mac_address"],
        "fa:16:3e:00:00:21"
    );
    // cloud-init turns network_data.json into a static configuration.
    assert_eq!(
        out["net"]["config"][0],
        json!({
            "type": "physical",
            "name": "eth0",
            "mac_address": "fa:16:3e:00:00:21",
            "mtu": null,
            "subnets": [{
                "type": "static",
                "ipv4": true,
                "address": "10.0.0.5",
                "netmask": "255.255.255.0",
                "routes": [{"network": "0.0.0.0", "netmask": "0.0.0.0", "gateway": "10.0.0.1"}],
            }],
        })
    );
    assert_eq!(
        out["net"]["config"][1],
        json!({"type": "nameserver", "address": "10.0.0.2"})
    );
    assert_eq!(read["ec2-metadata"]["instance-id"], ec2_instance_id(&id));
    assert_eq!(
        read["ec2-metadata"]["public-keys"],
        json!({"alice": alice, "bob": bob})
    );
}

#[test]
fn cloud_init_openstack_reader_works_where_ec2_tokens_are_required() {
    let s = Server::start();
    let key = ssh_key(3, "carol@desk");
    let id = create(
        &s,
        json!({
            "name": "os-required",
            "hostname": "os-required",
            "public_keys": {"carol": key},
            "metadata_address": "127.0.0.2",
            "imds_tokens": "required",
        }),
    );
    // The OpenStack datasource sends no token: its OpenStack reads answer,
    // its EC2 reads are refused, which it takes as "no EC2 data".
    let out = python_guest(
        &s,
        "127.0.0.2",
        r#"
from cloudinit.sources.helpers import openstack
res = openstack.MetadataReader(URL, timeout=5, retries=0).read_v2()
emit({"uuid": res["metadata"]["uuid"], "keys": res["metadata"]["public_keys"],
      "ec2": res["ec2-metadata"]})
"#,
    );
    assert_eq!(out["uuid"], id);
    assert_eq!(out["keys"], json!({"carol": key}));
    assert_eq!(out["ec2"], json!({}));
    // Set to strict, the OpenStack paths want a token as well.
    s.admin().send(route::modify_instance(
        "os-required",
        &cradle_model::api::InstancePatch {
            imds_tokens: Some(cradle_model::ImdsTokens::Strict),
            ..Default::default()
        },
    ));
    let g = s.bare_guest("127.0.0.2");
    assert_eq!(g.get("/openstack/latest/meta_data.json").status, 401);
}

#[test]
fn cloud_init_ec2_reader_reads_the_instance() {
    let s = Server::start();
    let (alice, bob) = (ssh_key(1, "alice"), ssh_key(2, "bob"));
    let user_data = b"#cloud-config\npackages: [nginx]\n\x00\xff binary tail";
    let id = create(
        &s,
        json!({
            "name": "ec2-guest",
            "hostname": "ec2-guest.example.org",
            "availability_zone": "eu-west-1b",
            "public_keys": {"alice": alice, "bob": bob},
            "user_data": b64(user_data),
            "metadata_address": "127.0.0.3",
            "mac": "fa:16:3e:00:00:31",
            "public_ipv4": "203.0.113.31",
        }),
    );
    let g = s.guest("127.0.0.3");
    let instance_id = g.get("/latest/meta-data/instance-id").text();
    assert_eq!(instance_id, ec2_instance_id(&id));

    let out = python_guest(
        &s,
        "127.0.0.3",
        r#"
from cloudinit import sources
from cloudinit.sources.helpers import ec2
md = ec2.get_instance_metadata(api_version="latest", metadata_address=URL, retries=1)
ud = ec2.get_instance_userdata(api_version="latest", metadata_address=URL, retries=1)
emit({"md": md, "ud": ud, "ssh_keys": sorted(sources.normalize_pubkey_data(md.get("public-keys")))})
"#,
    );
    let md = &out["md"];
    assert_eq!(md["instance-id"], instance_id);
    assert_eq!(md["hostname"], "ec2-guest.example.org");
    assert_eq!(md["local-hostname"], "ec2-guest.example.org");
    assert_eq!(md["public-hostname"], "ec2-guest.example.org");
    assert_eq!(md["public-ipv4"], "203.0.113.31");
    // `0=alice` and `1=bob` become a map from key name to key.
    assert_eq!(md["public-keys"], json!({"alice": alice, "bob": bob}));
    let mut want_keys = vec![alice.clone(), bob.clone()];
    want_keys.sort();
    assert_eq!(out["ssh_keys"], json!(want_keys));
    assert_eq!(
        md["placement"],
        json!({"availability-zone": "eu-west-1b", "region": "eu-west-1"})
    );
    assert_eq!(md["mac"], "fa:16:3e:00:00:31");
    assert_eq!(
        md["network"]["interfaces"]["macs"]["fa:16:3e:00:00:31"]["public-ipv4s"],
        "203.0.113.31"
    );
    // cloud-init materialised every key the listing offers.
    let keys: BTreeSet<&str> = md.as_object().unwrap().keys().map(|k| k.as_str()).collect();
    let listed = g.get("/latest/meta-data/").text();
    let want: BTreeSet<&str> = listed.lines().map(|l| l.trim_end_matches('/')).collect();
    assert_eq!(keys, want);
    assert_eq!(out["ud"], json!({"b64": b64(user_data)}));
}

#[test]
fn botocore_reads_region_and_instance_id_with_an_imdsv2_token() {
    let s = Server::start();
    let id = create(
        &s,
        json!({
            "name": "sdk",
            "metadata_address": "127.0.0.4",
            "availability_zone": "us-east-1a",
            "imds_tokens": "required",
        }),
    );
    // The instance really requires a token.
    let g = s.guest("127.0.0.4");
    assert_eq!(g.get("/latest/meta-data/instance-id").status, 401);
    assert_eq!(
        g.get("/latest/meta-data/placement/availability-zone")
            .status,
        401
    );

    // botocore 1.29's internal API; paths are relative to base_url, as
    // botocore's own are.
    let out = python_guest(
        &s,
        "127.0.0.4",
        r#"
from botocore.utils import InstanceMetadataFetcher, InstanceMetadataRegionFetcher
region = InstanceMetadataRegionFetcher(timeout=2, num_attempts=1, base_url=URL, env={}).retrieve_region()
f = InstanceMetadataFetcher(timeout=2, num_attempts=1, base_url=URL, env={})
token = f._fetch_metadata_token()
r = f._get_request("latest/meta-data/instance-id", None, token)
emit({"region": region, "token": token, "status": r.status_code, "instance_id": r.text})
"#,
    );
    assert_eq!(out["region"], "us-east-1");
    assert!(out["token"].as_str().is_some_and(|t| !t.is_empty()));
    assert_eq!(out["status"], 200);
    assert_eq!(out["instance_id"], ec2_instance_id(&id));
}

// ---------------------------------------------------------------------------
// IMDSv2

#[test]
fn token_put_validates_the_ttl_and_refuses_forwarded_requests() {
    let s = Server::start();
    create(&s, json!({"name": "a", "metadata_address": "127.0.0.2"}));
    let g = s.guest("127.0.0.2");
    let put = |headers: &[(&str, &str)]| g.request("PUT", "/latest/api/token", headers, None);
    const TTL: &str = "X-aws-ec2-metadata-token-ttl-seconds";

    assert_eq!(put(&[]).status, 400, "TTL header missing");
    for bad in ["0", "21601", "abc", "-1", "1.5", ""] {
        assert_eq!(put(&[(TTL, bad)]).status, 400, "TTL {bad:?}");
    }
    let ok = put(&[(TTL, "21600")]);
    assert_eq!(ok.status, 200);
    assert_eq!(
        ok.headers.get(TTL).and_then(|v| v.to_str().ok()),
        Some("21600")
    );
    assert!(!ok.body.is_empty());
    let one = put(&[(TTL, "1")]);
    assert_eq!(one.status, 200);
    assert_eq!(one.headers.get(TTL).unwrap(), "1");

    let forwarded = put(&[(TTL, "60"), ("X-Forwarded-For", "10.0.0.1")]);
    assert_eq!(forwarded.status, 400);

    for method in ["GET", "POST", "DELETE"] {
        let a = g.request(method, "/latest/api/token", &[], None);
        assert_eq!(a.status, 405, "{method}");
        assert_eq!(a.headers.get("allow").unwrap(), "PUT", "{method}");
    }
}

#[test]
fn tokens_are_bound_to_their_instance_and_always_checked() {
    let s = Server::start();
    create(&s, json!({"name": "a", "metadata_address": "127.0.0.2"}));
    create(
        &s,
        json!({"name": "b", "metadata_address": "127.0.0.3", "imds_tokens": "required"}),
    );
    let (a, b) = (s.guest("127.0.0.2"), s.guest("127.0.0.3"));
    let with = |g: &Guest, path: &str, token: &str| {
        g.request("GET", path, &[("X-aws-ec2-metadata-token", token)], None)
    };

    // `optional`: no token is fine, a good one is fine, a bad one is not.
    assert_eq!(a.get("/latest/meta-data/hostname").text(), "a");
    let ta = a.token(300);
    let ok = with(&a, "/latest/meta-data/hostname", &ta);
    assert_eq!((ok.status, ok.text().as_str()), (200, "a"));
    for garbage in ["garbage", "", "AAAA", &ta[..ta.len() - 2]] {
        assert_eq!(
            with(&a, "/latest/meta-data/hostname", garbage).status,
            401,
            "token {garbage:?}"
        );
    }
    // A token is checked in every namespace, not only EC2's.
    assert_eq!(
        with(&a, "/openstack/latest/meta_data.json", "garbage").status,
        401
    );
    assert_eq!(
        with(&a, "/cradle/latest/meta_data.json", "garbage").status,
        401
    );

    // A's token is no good from B's address, even though B requires one.
    assert_eq!(with(&b, "/latest/meta-data/hostname", &ta).status, 401);

    // `required`: EC2 paths need a token; OpenStack paths, which no
    // OpenStack client sends one to, do not; the native namespace takes the
    // header (which the harness's guest sends, as cradle's agent does).
    for path in ["/latest/meta-data/hostname", "/", "/2021-01-03/meta-data/"] {
        let a = b.get(path);
        assert_eq!(a.status, 401, "{path}");
        assert!(
            a.text().contains("X-aws-ec2-metadata-token"),
            "{path}: {}",
            a.text()
        );
    }
    assert_eq!(
        b.get("/openstack/latest/meta_data.json").json()["name"],
        "b"
    );
    assert_eq!(b.get("/cradle/latest/meta_data.json").json()["name"], "b");
    assert_eq!(b.get("/ganeti/latest/os/parameters.json").status, 200);
    let tb = b.token(300);
    let ok = with(&b, "/latest/meta-data/hostname", &tb);
    assert_eq!((ok.status, ok.text().as_str()), (200, "b"));
    let md = with(&b, "/openstack/latest/meta_data.json", &tb);
    assert_eq!(md.status, 200);
    assert_eq!(md.json()["name"], "b");
    // And B's token is no good at A's address.
    assert_eq!(with(&a, "/latest/meta-data/hostname", &tb).status, 401);
}

#[test]
fn a_token_stops_working_when_its_ttl_runs_out() {
    let s = Server::start();
    create(
        &s,
        json!({"name": "a", "metadata_address": "127.0.0.2", "imds_tokens": "required"}),
    );
    let g = s.guest("127.0.0.2");
    let token = g.token(1);
    let issued = Instant::now();
    let get = || {
        g.request(
            "GET",
            "/latest/meta-data/hostname",
            &[("X-aws-ec2-metadata-token", &token)],
            None,
        )
        .status
    };
    assert_eq!(get(), 200, "a fresh one-second token works");
    // Poll the clock condition: the token must die after about a second.
    let died = loop {
        let status = get();
        if status == 401 {
            break issued.elapsed();
        }
        assert_eq!(status, 200);
        assert!(
            issued.elapsed() < Duration::from_secs(5),
            "a one-second token still works after 5 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        died >= Duration::from_millis(900),
        "a one-second token died after only {died:?}"
    );
    // A fresh token works again: it was expiry, not something else.
    let fresh = g.token(60);
    let a = g.request(
        "GET",
        "/latest/meta-data/hostname",
        &[("X-aws-ec2-metadata-token", &fresh)],
        None,
    );
    assert_eq!(a.status, 200);
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
    let s = Server::start();
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
        "ami-id\nami-launch-index\nami-manifest-path\nblock-device-mapping/\nhostname\n\
         instance-action\ninstance-id\ninstance-type\nlocal-hostname\nlocal-ipv4\nmac\n\
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
fn the_native_namespace_answers_only_with_the_header_or_a_token() {
    let s = Server::start();
    create(
        &s,
        json!({
            "name": "n",
            "metadata_address": "127.0.0.2",
            "os_params": {"secret": {"db_password": "native-canary"}},
        }),
    );
    let g = s.bare_guest("127.0.0.2");
    let paths = [
        "/cradle/latest/meta_data.json",
        "/cradle/latest/os/parameters.json",
        "/ganeti/latest/os/parameters.json",
        "/cradle/latest/read",
        "/cradle/",
    ];
    // What an SSRF can send: a URL, perhaps with the wrong flavor.
    for path in paths {
        for headers in [
            &[][..],
            &[("Metadata-Flavor", "Google")][..],
            &[("Metadata", "true")][..],
        ] {
            let a = g.request("GET", path, headers, None);
            assert_eq!(a.status, 403, "{path} {headers:?}");
            assert!(!a.text().contains("native-canary"));
            assert_eq!(
                a.text(),
                "403 Forbidden: the native namespace needs the header Metadata-Flavor: cradle \
                 (or an IMDSv2 token in X-aws-ec2-metadata-token)"
            );
        }
    }
    let w = g.request("POST", "/cradle/latest/write", &[], Some(b"hello".to_vec()));
    assert_eq!(w.status, 403);
    // With the header, or with a token instead, it answers.
    let flavored = [("Metadata-Flavor", "cradle")];
    let params = g.request("GET", "/cradle/latest/os/parameters.json", &flavored, None);
    assert_eq!(params.status, 200);
    assert_eq!(
        params.json()["db_password"],
        json!(["native-canary", "secret"])
    );
    let token = g.token(60);
    let with_token = [("X-aws-ec2-metadata-token", token.as_str())];
    let a = g.request("GET", "/cradle/latest/meta_data.json", &with_token, None);
    assert_eq!((a.status, a.json()["name"].clone()), (200, json!("n")));
    // A bad token is refused even beside the header.
    let a = g.request(
        "GET",
        "/cradle/latest/meta_data.json",
        &[
            ("Metadata-Flavor", "cradle"),
            ("X-aws-ec2-metadata-token", "garbage"),
        ],
        None,
    );
    assert_eq!(a.status, 401);
    // EC2 and OpenStack paths need no header.
    assert_eq!(g.get("/latest/meta-data/hostname").status, 200);
    assert_eq!(g.get("/openstack/latest/meta_data.json").status, 200);
    assert!(!s.log().contains("native-canary"));
}

#[test]
fn token_rules_follow_each_namespace() {
    let s = Server::start();
    for (n, tokens) in ["optional", "required", "strict"].iter().enumerate() {
        let address = format!("127.0.0.{}", n + 2);
        create(
            &s,
            json!({"name": tokens, "metadata_address": address, "imds_tokens": tokens}),
        );
        let g = s.bare_guest(&address);
        let (ec2, openstack) = match *tokens {
            "optional" => (200, 200),
            "required" => (401, 200),
            _ => (401, 401),
        };
        let status = |path: &str| g.get(path).status;
        assert_eq!(status("/latest/meta-data/instance-id"), ec2, "{tokens}");
        assert_eq!(
            status("/2009-04-04/user-data"),
            if ec2 == 200 { 404 } else { 401 }
        );
        assert_eq!(
            status("/openstack/latest/meta_data.json"),
            openstack,
            "{tokens}"
        );
        assert_eq!(
            status("/openstack/2012-08-10/meta_data.json"),
            openstack,
            "{tokens}"
        );
        assert_eq!(status("/cradle/latest/meta_data.json"), 403, "{tokens}");
        let refused = g.get("/openstack/latest/meta_data.json");
        if openstack == 401 {
            assert!(
                refused.text().contains("imds_tokens = strict"),
                "{}",
                refused.text()
            );
        }
        // A token opens all three.
        let token = g.token(60);
        let t = [("X-aws-ec2-metadata-token", token.as_str())];
        for path in [
            "/latest/meta-data/instance-id",
            "/openstack/latest/meta_data.json",
            "/cradle/latest/meta_data.json",
        ] {
            assert_eq!(
                g.request("GET", path, &t, None).status,
                200,
                "{tokens} {path}"
            );
        }
    }
    // The instance's view says which it is.
    let v = s.admin().send(route::instance("strict"));
    assert_eq!(v.imds_tokens.as_str(), "strict");
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
    assert_eq!(g.get("/cradle/latest/").text(), "meta_data.json\nos/");
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
    for method in ["DELETE", "PUT", "POST", "PATCH", "OPTIONS"] {
        let a = g.request(method, "/latest/meta-data/", &[], None);
        assert_eq!(a.status, 405, "{method}");
        assert_eq!(a.headers.get("allow").unwrap(), "GET, HEAD", "{method}");
    }
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
