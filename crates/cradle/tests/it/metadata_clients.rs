//! Real clients read the metadata service: cloud-init's OpenStack and EC2
//! datasources, through Debian's Python, every connection leaving from the
//! guest's source address.

use std::collections::BTreeSet;

use serde_json::{Value, json};

use crate::harness::*;
use crate::metadata::{create, ec2_instance_id};

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
pub(crate) fn python_guest(s: &Server, source: &str, script: &str) -> Value {
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
    // cloud-init's crawl fits in the default request budget (a burst of
    // 200): not one request of it was throttled.
    let m = s.admin().fetch(route::metrics()).text();
    let crawled = metric(
        &m,
        "cradle_requests_total{namespace=\"ec2\",status=\"200\"}",
    );
    println!("cloud-init's EC2 crawl: {crawled} requests");
    assert!(crawled > 20.0 && crawled < 200.0, "{crawled} requests");
    assert_eq!(metric(&m, "cradle_metadata_throttled_total"), 0.0);
}
