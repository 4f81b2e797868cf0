//! Helpers shared by the nftables tests: network namespaces that clean up
//! after themselves, instances and rules, and a normalized listing of the
//! table to compare two kernels' tables by.
//!
//! Everything runs inside namespaces made here (`ip netns add`); the root
//! namespace's ruleset is never touched. The tests need root, nft and ip.

#![allow(dead_code)]

pub mod lab;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, Ipv6Addr};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};

use cradle_secgroups::nft::Nft;
use cradle_secgroups::{Direction, Enforced, EtherType, Match, Protocol, Remote, RuleSpec};
use serde_json::Value;
use uuid::Uuid;

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// Run a command to completion; panic with its output when it fails.
pub fn run(program: &str, args: &[&str]) -> Output {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    assert!(
        out.status.success(),
        "`{program} {}` failed ({}): {}{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A network namespace of our own, deleted when dropped (also when the test
/// panics).
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(tag: &str) -> Netns {
        let name = format!(
            "csg-{tag}-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst)
        );
        run("ip", &["netns", "add", &name]);
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// `ip -n NS args`.
    pub fn ip(&self, args: &[&str]) -> Output {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        run("ip", &full)
    }

    /// `ip netns exec NS args` (must succeed).
    pub fn exec(&self, args: &[&str]) -> Output {
        let mut full = vec!["netns", "exec", self.name.as_str()];
        full.extend_from_slice(args);
        run("ip", &full)
    }

    /// A command that runs in this namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }

    pub fn nft(&self) -> Nft {
        Nft::new().in_netns(self.name.clone())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// Fail early, with a useful message, where the tests cannot run.
pub fn require_tools() {
    for tool in ["nft", "ip"] {
        let found = std::env::var_os("PATH")
            .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()));
        assert!(
            found,
            "{tool} is not installed: these tests need nftables and iproute2 (and root)"
        );
    }
}

pub fn id(n: u8) -> Uuid {
    Uuid::from_bytes([n; 16])
}

pub fn mac(n: u8) -> [u8; 6] {
    [0x02, 0, 0, 0, 0, n]
}

pub fn instance(n: u8, rules: Vec<RuleSpec>) -> Enforced {
    Enforced {
        instance: id(n),
        interface: format!("vg{n}"),
        mac: mac(n),
        ipv4: BTreeSet::from([Ipv4Addr::new(10, 77, n, 2)]),
        ipv6: BTreeSet::from([Ipv6Addr::new(0xfd00, 0x77, 0, n.into(), 0, 0, 0, 2)]),
        rules: sorted(rules),
    }
}

pub fn sorted(mut rules: Vec<RuleSpec>) -> Vec<RuleSpec> {
    rules.sort();
    rules.dedup();
    rules
}

pub fn tcp(direction: Direction, from: u16, to: u16, remote: &str) -> RuleSpec {
    ports(direction, Protocol::Tcp, from, to, remote)
}

pub fn udp(direction: Direction, from: u16, to: u16, remote: &str) -> RuleSpec {
    ports(direction, Protocol::Udp, from, to, remote)
}

pub fn cidr(s: &str) -> Remote {
    Remote::Cidr(s.parse().expect("a CIDR"))
}

fn ethertype_of(remote: &Remote) -> EtherType {
    match remote {
        Remote::Cidr(ipnet::IpNet::V6(_)) => EtherType::IPv6,
        _ => EtherType::IPv4,
    }
}

pub fn ports(
    direction: Direction,
    protocol: Protocol,
    from: u16,
    to: u16,
    remote: &str,
) -> RuleSpec {
    let remote = cidr(remote);
    RuleSpec {
        direction,
        ethertype: ethertype_of(&remote),
        protocol,
        matches: Match::Ports { from, to },
        remote,
    }
}

pub fn icmp_echo(direction: Direction, remote: &str) -> RuleSpec {
    RuleSpec {
        direction,
        ethertype: EtherType::IPv4,
        protocol: Protocol::Icmp,
        matches: Match::Icmp {
            icmp_type: 8,
            code: None,
        },
        remote: cidr(remote),
    }
}

pub fn from_group(
    direction: Direction,
    ethertype: EtherType,
    protocol: Protocol,
    port: Option<u16>,
    group: Uuid,
) -> RuleSpec {
    RuleSpec {
        direction,
        ethertype,
        protocol,
        matches: match port {
            Some(p) => Match::Ports { from: p, to: p },
            None => Match::All,
        },
        remote: Remote::Group(group),
    }
}

/// The table as a map from each object (`chain NAME`, `set NAME`, `map
/// NAME`) to what it holds: its properties, its rules in order (for chains)
/// or its sorted elements (for sets and maps). Handles are left out, so two
/// tables built in different orders compare equal when they hold the same.
pub fn normalized(listing: &Value) -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let items = listing["nftables"].as_array().expect("nft's JSON listing");
    for item in items {
        let Some((kind, body)) = item.as_object().and_then(|o| o.iter().next()) else {
            continue;
        };
        let mut body = body.clone();
        if let Some(o) = body.as_object_mut() {
            o.remove("handle");
        }
        match kind.as_str() {
            "chain" => {
                let name = body["name"].as_str().unwrap().to_string();
                let mut props = body.clone();
                props.as_object_mut().unwrap().remove("name");
                out.entry(format!("chain {name}"))
                    .or_default()
                    .insert(0, format!("props {props}"));
            }
            "rule" => {
                let chain = body["chain"].as_str().unwrap().to_string();
                out.entry(format!("chain {chain}"))
                    .or_default()
                    .push(format!("rule {}", body["expr"]));
            }
            "set" | "map" => {
                let name = body["name"].as_str().unwrap().to_string();
                let mut elems: Vec<String> = body["elem"]
                    .as_array()
                    .map(|a| a.iter().map(Value::to_string).collect())
                    .unwrap_or_default();
                elems.sort();
                let mut props = body.clone();
                props.as_object_mut().unwrap().remove("elem");
                props.as_object_mut().unwrap().remove("name");
                let mut v = vec![format!("props {props}")];
                v.extend(elems.into_iter().map(|e| format!("elem {e}")));
                out.insert(format!("{kind} {name}"), v);
            }
            _ => {}
        }
    }
    out
}

/// Panic with the objects that differ between two normalized tables.
pub fn assert_same_table(
    what: &str,
    got: &BTreeMap<String, Vec<String>>,
    want: &BTreeMap<String, Vec<String>>,
) {
    let keys: BTreeSet<&String> = got.keys().chain(want.keys()).collect();
    let mut diffs = Vec::new();
    for k in keys {
        let (g, w) = (got.get(k), want.get(k));
        if g != w {
            diffs.push(format!("{k}:\n  delta: {g:?}\n  full:  {w:?}"));
        }
    }
    assert!(
        diffs.is_empty(),
        "{what}: the table after the delta differs from the full rendering:\n{}",
        diffs.join("\n")
    );
}
