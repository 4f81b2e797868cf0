//! Enforcement with nftables: what the firewall should hold ([`Enforced`]
//! instances and group [`Members`]) rendered into one table, through nft's
//! JSON interface (`nft -j -f -`), applied whole or as the difference a
//! change makes.
//!
//! # Layout
//!
//! Everything lives in one `inet` table (`cradle` unless configured), which
//! nothing else touches. The topology is routed: each guest has its own
//! interface on the host (a tap, or the host end of a veth) and the host
//! routes between guests and the world. Bridged guests would need the
//! `bridge` family and are not covered. ARP is not filtered: the `inet`
//! family sees IPv4 and IPv6 only.
//!
//! Named objects, all global:
//!
//! - `guest_ifaces` (set of `ifname`): every enforced instance's interface.
//! - `macs` (`ifname . ether_addr`), `src4` (`ifname . ether_addr .
//!   ipv4_addr`), `src6` (`ifname . ether_addr . ipv6_addr`): what each
//!   interface may send from. `src6` also holds each instance's EUI-64
//!   link-local address (`fe80::/64` and the modified EUI-64 of its mac), so
//!   that IPv6 neighbour discovery works. (Guests that use RFC 7217
//!   stable-privacy link-local addresses instead cannot do IPv6 here.)
//! - `ingress` and `egress` (verdict maps `ifname : verdict`): from an
//!   interface to `jump in-<instance>` / `jump out-<instance>`.
//! - `g4-<group>` and `g6-<group>` (`ipv4_addr`, `ipv6_addr` hash sets): the
//!   member addresses of each group that some enforced rule names as its
//!   remote. There is one pair per referenced group, not per instance.
//!
//! Chains:
//!
//! - `prerouting` (hook prerouting, priority raw, so before conntrack):
//!   `iifname @guest_ifaces jump antispoof`. `antispoof` returns for a packet
//!   whose interface, source mac and source address are in `src4`/`src6`,
//!   for a DHCP discover (`0.0.0.0:68` to `255.255.255.255:67`) and for IPv6
//!   duplicate address detection (a neighbour solicitation from `::`) when
//!   the interface and mac are in `macs`, and drops everything else.
//! - `forward` (hook forward, priority filter): drops DHCP server replies
//!   and router advertisements coming from guests, then `iifname vmap
//!   @egress`, then `oifname vmap @ingress`.
//! - `output` (hook output, priority filter): traffic the host itself sends
//!   to a guest is ingress for the guest too, so `oifname vmap @ingress`;
//!   before it, the host's DHCP replies (udp 67 to 68) and its neighbour
//!   solicitations and advertisements and router advertisements to a guest
//!   are accepted, so they pass whatever the guest's rules are. (They are
//!   accepted here rather than in each `in-` chain, where they would also let
//!   through forwarded packets from anywhere that merely use those ports.)
//! - `in-<instance>` (the uuid without dashes), for every enforced instance:
//!   `ct state established,related accept`, `ct state invalid drop`, one rule
//!   per ingress rule (`accept`), then `drop`: ingress is denied unless a
//!   rule allows it, also for an instance with no rules.
//! - `out-<instance>`, only for an instance with egress rules (egress is
//!   allowed unless the instance has some): `ct state established,related
//!   return`, `ct state invalid drop`, one rule per egress rule, then `drop`.
//!   Allowed egress `return`s rather than accepts, so that in `forward` the
//!   destination's ingress chain still runs when it is a guest too.
//!
//! There is no `input` chain: traffic from a guest to the host itself (DHCP,
//! the metadata service, DNS on the host) is only checked against spoofing,
//! and egress rules do not apply to it.
//!
//! A rule matches `ip saddr`/`ip6 saddr` (`daddr` for egress) against its
//! prefix or its group's set (`meta nfproto ipv4`/`ipv6` alone for
//! `0.0.0.0/0` and `::/0`), `meta l4proto` unless the protocol is any, `th
//! dport` for ports (one value or a range), and `icmp type`/`code` or
//! `icmpv6 type`/`code`.
//!
//! # Why no per-instance sets
//!
//! Measured on Linux 6.18 with nft 1.0.6: creating named sets is quadratic
//! in the number of sets in the table (10,000 empty sets take 3.2 s, 20,000
//! take 15 s), and anonymous sets (`{ a, b }` literals in rules) are sets
//! too. Chains with inline rules are linear. So no instance has a set of its
//! own and no per-instance rule has a set literal: per-instance data is
//! elements of the few global sets and maps, and rules in its own chains.
//!
//! # Cost per packet
//!
//! A packet from or to a guest is dispatched by interface through a verdict
//! map (a hash lookup): constant in the number of instances. Then it walks
//! the rules of that one instance's chain, linear in that instance's own
//! rules; established flows stop at the first rule. The antispoof check is
//! one lookup in a hash set.
//!
//! # Applying
//!
//! [`render_full`] is the whole table as one transaction that replaces it
//! (`add table`, `delete table`, `add table`, then everything), valid
//! whether the table exists or not. [`Firewall`] remembers what was applied
//! and plans the difference an [`Update`] makes: only the chains whose rules
//! changed are flushed and refilled, only the elements that changed are
//! deleted or added, group sets are made before the rules that use them and
//! deleted after the last rule using them is gone, all in one transaction.
//! Applying a delta gives the same table as applying the full rendering of
//! the same state (the tests check this on a live kernel).
//!
//! The JSON is built with `serde_json` directly rather than the `nftables`
//! crate: the handful of statement shapes used here are easy to write and
//! test, the output is exactly what `cradle firewall show` prints, and it
//! keeps the dependency tree small.
//!
//! nft itself is run as a program (`nft -j -f -`, inside `ip netns exec`
//! when a namespace is configured), with argument vectors and the JSON on
//! standard input, never through a shell. Before each command nft reads
//! the table's chains and sets into its cache, so the time of even a small
//! change grows with the size of the table (see `cargo xtask bench
//! firewall`).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ffi::OsString;
use std::io::Write;
use std::net::Ipv6Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;

use ipnet::IpNet;
use serde_json::{Value, json};
use uuid::Uuid;

use crate::{Direction, Enforced, EtherType, Match, Members, Protocol, Remote, RuleSpec, Update};

/// The table's name unless configured otherwise.
pub const DEFAULT_TABLE: &str = "cradle";

const FAMILY: &str = "inet";
const GUEST_IFACES: &str = "guest_ifaces";
const MACS: &str = "macs";
const SRC4: &str = "src4";
const SRC6: &str = "src6";
const INGRESS: &str = "ingress";
const EGRESS: &str = "egress";
const ANTISPOOF: &str = "antispoof";

/// The chain of an instance's ingress rules.
pub fn ingress_chain(instance: Uuid) -> String {
    format!("in-{}", instance.simple())
}

/// The chain of an instance's egress rules (only when it has some).
pub fn egress_chain(instance: Uuid) -> String {
    format!("out-{}", instance.simple())
}

/// The set of a group's members' IPv4 addresses.
pub fn group_set4(group: Uuid) -> String {
    format!("g4-{}", group.simple())
}

/// The set of a group's members' IPv6 addresses.
pub fn group_set6(group: Uuid) -> String {
    format!("g6-{}", group.simple())
}

/// The link-local address a guest forms from its mac (modified EUI-64).
pub fn eui64_link_local(mac: [u8; 6]) -> Ipv6Addr {
    let [a, b, c, d, e, f] = mac;
    Ipv6Addr::from([
        0xfe,
        0x80,
        0,
        0,
        0,
        0,
        0,
        0,
        a ^ 0x02,
        b,
        c,
        0xff,
        0xfe,
        d,
        e,
        f,
    ])
}

/// Whether nft can take `name` as an interface name, verbatim: what Linux
/// allows (1 to 15 bytes, no `/`, `:` or whitespace) narrowed to letters,
/// digits, `-`, `_` and `.`, so that nothing in it means something to nft
/// (a leading `@` names a set, a trailing `*` is a wildcard).
pub fn valid_interface(name: &str) -> bool {
    (1..=15).contains(&name.len())
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// An instance left out of what was applied, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    pub instance: Uuid,
    pub reason: String,
}

// ---- JSON building blocks ------------------------------------------------

fn mac_str(mac: [u8; 6]) -> String {
    let [a, b, c, d, e, f] = mac;
    format!("{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{f:02x}")
}

fn meta(key: &str) -> Value {
    json!({"meta": {"key": key}})
}

fn payload(protocol: &str, field: &str) -> Value {
    json!({"payload": {"protocol": protocol, "field": field}})
}

fn eq(left: Value, right: Value) -> Value {
    json!({"match": {"op": "==", "left": left, "right": right}})
}

fn ct_state(states: &[&str]) -> Value {
    // A bitmask test, not an anonymous set.
    json!({"match": {"op": "in", "left": {"ct": {"key": "state"}}, "right": states}})
}

fn verdict(v: &str) -> Value {
    json!({ v: null })
}

fn jump(chain: &str) -> Value {
    json!({"jump": {"target": chain}})
}

fn set_ref(name: &str) -> Value {
    Value::String(format!("@{name}"))
}

/// The statements of one transaction, for one table.
struct Cmds<'a> {
    table: &'a str,
    out: Vec<Value>,
}

impl<'a> Cmds<'a> {
    fn new(table: &'a str) -> Self {
        Cmds {
            table,
            out: Vec::new(),
        }
    }

    fn table(&mut self, verb: &str) {
        self.out
            .push(json!({ verb: {"table": {"family": FAMILY, "name": self.table}}}));
    }

    fn set(&mut self, verb: &str, name: &str, ty: Value) {
        let body = if verb == "add" {
            json!({"family": FAMILY, "table": self.table, "name": name, "type": ty})
        } else {
            json!({"family": FAMILY, "table": self.table, "name": name})
        };
        self.out.push(json!({ verb: {"set": body}}));
    }

    fn map(&mut self, name: &str) {
        self.out.push(json!({"add": {"map": {
            "family": FAMILY, "table": self.table, "name": name,
            "type": "ifname", "map": "verdict",
        }}}));
    }

    fn chain(&mut self, verb: &str, name: &str) {
        self.out.push(
            json!({ verb: {"chain": {"family": FAMILY, "table": self.table, "name": name}}}),
        );
    }

    fn base_chain(&mut self, name: &str, hook: &str, prio: i32) {
        self.out.push(json!({"add": {"chain": {
            "family": FAMILY, "table": self.table, "name": name,
            "type": "filter", "hook": hook, "prio": prio, "policy": "accept",
        }}}));
    }

    fn rule(&mut self, chain: &str, expr: Vec<Value>) {
        self.out.push(json!({"add": {"rule": {
            "family": FAMILY, "table": self.table, "chain": chain, "expr": expr,
        }}}));
    }

    fn elements(&mut self, verb: &str, set: &str, elem: Vec<Value>) {
        if elem.is_empty() {
            return;
        }
        self.out.push(json!({ verb: {"element": {
            "family": FAMILY, "table": self.table, "name": set, "elem": elem,
        }}}));
    }

    fn doc(self) -> Value {
        json!({ "nftables": self.out })
    }
}

// ---- one instance --------------------------------------------------------

/// One element of a global set or map that belongs to an instance.
#[derive(Debug, Clone, PartialEq)]
struct Elem {
    set: &'static str,
    key: Value,
    /// The verdict, for map elements.
    data: Option<Value>,
}

impl Elem {
    fn add_form(&self) -> Value {
        match &self.data {
            Some(d) => json!([self.key, d]),
            None => self.key.clone(),
        }
    }
}

/// An instance rendered: its chains' rules and its elements.
#[derive(Debug, Clone, PartialEq)]
struct Rendered {
    ingress: Vec<Vec<Value>>,
    /// `None` when the instance has no (expressible) egress rule.
    egress: Option<Vec<Vec<Value>>>,
    elems: Vec<Elem>,
}

/// The groups an instance's rules name as their remote.
fn referenced_groups(e: &Enforced) -> BTreeSet<Uuid> {
    e.rules
        .iter()
        .filter_map(|r| match r.remote {
            Remote::Group(g) => Some(g),
            Remote::Cidr(_) => None,
        })
        .collect()
}

/// The matches of one rule; `None` for a rule that cannot be expressed (one
/// that validation would have refused, such as ports with protocol icmp):
/// such a rule allows nothing rather than more than it says.
pub fn rule_matches(rule: &RuleSpec) -> Option<Vec<Value>> {
    let (addr_proto, nfproto) = match rule.ethertype {
        EtherType::IPv4 => ("ip", "ipv4"),
        EtherType::IPv6 => ("ip6", "ipv6"),
    };
    let field = match rule.direction {
        Direction::Ingress => "saddr",
        Direction::Egress => "daddr",
    };
    let mut e = Vec::new();
    match rule.remote {
        Remote::Cidr(net) => {
            let same_family = matches!(
                (net, rule.ethertype),
                (IpNet::V4(_), EtherType::IPv4) | (IpNet::V6(_), EtherType::IPv6)
            );
            if !same_family {
                return None;
            }
            let net = net.trunc();
            if net.prefix_len() == 0 {
                e.push(eq(meta("nfproto"), json!(nfproto)));
            } else if net.prefix_len() == net.max_prefix_len() {
                e.push(eq(payload(addr_proto, field), json!(net.addr().to_string())));
            } else {
                e.push(eq(
                    payload(addr_proto, field),
                    json!({"prefix": {"addr": net.network().to_string(), "len": net.prefix_len()}}),
                ));
            }
        }
        Remote::Group(g) => {
            let set = match rule.ethertype {
                EtherType::IPv4 => group_set4(g),
                EtherType::IPv6 => group_set6(g),
            };
            e.push(eq(payload(addr_proto, field), set_ref(&set)));
        }
    }
    let icmp = match (rule.protocol, rule.ethertype) {
        (Protocol::Tcp, _) => {
            e.push(eq(meta("l4proto"), json!("tcp")));
            None
        }
        (Protocol::Udp, _) => {
            e.push(eq(meta("l4proto"), json!("udp")));
            None
        }
        (Protocol::Icmp, EtherType::IPv4) => {
            e.push(eq(meta("l4proto"), json!("icmp")));
            Some("icmp")
        }
        (Protocol::Icmpv6, EtherType::IPv6) => {
            e.push(eq(meta("l4proto"), json!("ipv6-icmp")));
            Some("icmpv6")
        }
        (Protocol::Any, _) => None,
        (Protocol::Icmp | Protocol::Icmpv6, _) => return None,
    };
    match rule.matches {
        Match::All => {}
        Match::Ports { from, to } => {
            if !matches!(rule.protocol, Protocol::Tcp | Protocol::Udp) || from > to {
                return None;
            }
            let right = if from == to {
                json!(from)
            } else {
                json!({"range": [from, to]})
            };
            e.push(eq(payload("th", "dport"), right));
        }
        Match::Icmp { icmp_type, code } => {
            let icmp = icmp?;
            e.push(eq(payload(icmp, "type"), json!(icmp_type)));
            if let Some(code) = code {
                e.push(eq(payload(icmp, "code"), json!(code)));
            }
        }
    }
    Some(e)
}

fn render_instance(e: &Enforced) -> Rendered {
    let rules = |direction: Direction, allow: &str| -> Vec<Vec<Value>> {
        e.rules
            .iter()
            .filter(|r| r.direction == direction)
            .filter_map(rule_matches)
            .map(|mut m| {
                m.push(verdict(allow));
                m
            })
            .collect()
    };
    let mut ingress = vec![
        vec![ct_state(&["established", "related"]), verdict("accept")],
        vec![ct_state(&["invalid"]), verdict("drop")],
    ];
    ingress.extend(rules(Direction::Ingress, "accept"));
    ingress.push(vec![verdict("drop")]);

    let allowed_out = rules(Direction::Egress, "return");
    let egress = (!allowed_out.is_empty()).then(|| {
        let mut out = vec![
            vec![ct_state(&["established", "related"]), verdict("return")],
            vec![ct_state(&["invalid"]), verdict("drop")],
        ];
        out.extend(allowed_out);
        out.push(vec![verdict("drop")]);
        out
    });

    let iface = json!(e.interface);
    let mac = json!(mac_str(e.mac));
    let mut elems = vec![
        Elem {
            set: GUEST_IFACES,
            key: iface.clone(),
            data: None,
        },
        Elem {
            set: MACS,
            key: json!({"concat": [iface, mac]}),
            data: None,
        },
    ];
    for a in &e.ipv4 {
        elems.push(Elem {
            set: SRC4,
            key: json!({"concat": [iface, mac, a.to_string()]}),
            data: None,
        });
    }
    let ll = eui64_link_local(e.mac);
    let v6: BTreeSet<Ipv6Addr> = e.ipv6.iter().copied().chain([ll]).collect();
    for a in v6 {
        elems.push(Elem {
            set: SRC6,
            key: json!({"concat": [iface, mac, a.to_string()]}),
            data: None,
        });
    }
    elems.push(Elem {
        set: INGRESS,
        key: iface.clone(),
        data: Some(jump(&ingress_chain(e.instance))),
    });
    if egress.is_some() {
        elems.push(Elem {
            set: EGRESS,
            key: iface,
            data: Some(jump(&egress_chain(e.instance))),
        });
    }
    Rendered {
        ingress,
        egress,
        elems,
    }
}

fn add_instance_chains(c: &mut Cmds, id: Uuid, r: &Rendered) {
    c.chain("add", &ingress_chain(id));
    if r.egress.is_some() {
        c.chain("add", &egress_chain(id));
    }
}

fn add_instance_rules(c: &mut Cmds, id: Uuid, r: &Rendered) {
    let chain = ingress_chain(id);
    for rule in &r.ingress {
        c.rule(&chain, rule.clone());
    }
    if let Some(out) = &r.egress {
        let chain = egress_chain(id);
        for rule in out {
            c.rule(&chain, rule.clone());
        }
    }
}

/// Elements grouped by set, in the order the sets are made.
fn add_elements<'e>(c: &mut Cmds, verb: &str, elems: impl IntoIterator<Item = &'e Elem>) {
    let mut by_set: BTreeMap<usize, (&'static str, Vec<Value>)> = BTreeMap::new();
    for e in elems {
        let rank = [GUEST_IFACES, MACS, SRC4, SRC6, INGRESS, EGRESS]
            .iter()
            .position(|s| *s == e.set)
            .unwrap_or(usize::MAX);
        let v = if verb == "delete" {
            e.key.clone()
        } else {
            e.add_form()
        };
        by_set.entry(rank).or_insert((e.set, Vec::new())).1.push(v);
    }
    for (_, (set, elems)) in by_set {
        c.elements(verb, set, elems);
    }
}

fn addr_elems<A: ToString>(addrs: impl IntoIterator<Item = A>) -> Vec<Value> {
    addrs.into_iter().map(|a| json!(a.to_string())).collect()
}

fn add_group_set(c: &mut Cmds, g: Uuid, m: &Members) {
    c.set("add", &group_set4(g), json!("ipv4_addr"));
    c.set("add", &group_set6(g), json!("ipv6_addr"));
    c.elements("add", &group_set4(g), addr_elems(&m.ipv4));
    c.elements("add", &group_set6(g), addr_elems(&m.ipv6));
}

/// The global sets, maps, base chains and their rules; instances' chains
/// and elements come between `objects` and `base_chains`.
fn global_objects(c: &mut Cmds) {
    c.set("add", GUEST_IFACES, json!("ifname"));
    c.set("add", MACS, json!(["ifname", "ether_addr"]));
    c.set("add", SRC4, json!(["ifname", "ether_addr", "ipv4_addr"]));
    c.set("add", SRC6, json!(["ifname", "ether_addr", "ipv6_addr"]));
    c.map(INGRESS);
    c.map(EGRESS);
    c.chain("add", ANTISPOOF);
}

fn base_chains(c: &mut Cmds) {
    let iif = || meta("iifname");
    let oif = || meta("oifname");
    let ether_saddr = || payload("ether", "saddr");
    let mac_known = || eq(json!({"concat": [iif(), ether_saddr()]}), set_ref(MACS));
    let udp = |sport: u16, dport: u16| {
        [
            eq(payload("udp", "sport"), json!(sport)),
            eq(payload("udp", "dport"), json!(dport)),
        ]
    };
    let icmpv6 = |t: &str| eq(payload("icmpv6", "type"), json!(t));

    // Anti-spoofing.
    c.rule(
        ANTISPOOF,
        vec![
            eq(
                json!({"concat": [iif(), ether_saddr(), payload("ip", "saddr")]}),
                set_ref(SRC4),
            ),
            verdict("return"),
        ],
    );
    c.rule(
        ANTISPOOF,
        vec![
            eq(
                json!({"concat": [iif(), ether_saddr(), payload("ip6", "saddr")]}),
                set_ref(SRC6),
            ),
            verdict("return"),
        ],
    );
    let mut dhcp = vec![
        mac_known(),
        eq(payload("ip", "saddr"), json!("0.0.0.0")),
        eq(payload("ip", "daddr"), json!("255.255.255.255")),
    ];
    dhcp.extend(udp(68, 67));
    dhcp.push(verdict("return"));
    c.rule(ANTISPOOF, dhcp);
    c.rule(
        ANTISPOOF,
        vec![
            mac_known(),
            eq(payload("ip6", "saddr"), json!("::")),
            icmpv6("nd-neighbor-solicit"),
            verdict("return"),
        ],
    );
    c.rule(ANTISPOOF, vec![verdict("drop")]);

    c.base_chain("prerouting", "prerouting", -300);
    c.rule(
        "prerouting",
        vec![eq(iif(), set_ref(GUEST_IFACES)), jump(ANTISPOOF)],
    );

    c.base_chain("forward", "forward", 0);
    let mut rogue_dhcp = vec![eq(iif(), set_ref(GUEST_IFACES))];
    rogue_dhcp.extend(udp(67, 68));
    rogue_dhcp.push(verdict("drop"));
    c.rule("forward", rogue_dhcp);
    c.rule(
        "forward",
        vec![
            eq(iif(), set_ref(GUEST_IFACES)),
            icmpv6("nd-router-advert"),
            verdict("drop"),
        ],
    );
    c.rule(
        "forward",
        vec![json!({"vmap": {"key": iif(), "data": set_ref(EGRESS)}})],
    );
    c.rule(
        "forward",
        vec![json!({"vmap": {"key": oif(), "data": set_ref(INGRESS)}})],
    );

    c.base_chain("output", "output", 0);
    let mut dhcp_reply = vec![eq(oif(), set_ref(GUEST_IFACES))];
    dhcp_reply.extend(udp(67, 68));
    dhcp_reply.push(verdict("accept"));
    c.rule("output", dhcp_reply);
    for t in ["nd-neighbor-solicit", "nd-neighbor-advert", "nd-router-advert"] {
        c.rule(
            "output",
            vec![eq(oif(), set_ref(GUEST_IFACES)), icmpv6(t), verdict("accept")],
        );
    }
    c.rule(
        "output",
        vec![json!({"vmap": {"key": oif(), "data": set_ref(INGRESS)}})],
    );
}

// ---- the desired state ---------------------------------------------------

/// Keep the instances nft can take: a usable interface name, and each
/// interface for one instance only (the smallest id keeps it). Later
/// entries for the same id win.
fn admit(instances: Vec<Enforced>) -> (BTreeMap<Uuid, Enforced>, Vec<Skipped>) {
    let mut by_id: BTreeMap<Uuid, Enforced> = BTreeMap::new();
    for e in instances {
        by_id.insert(e.instance, e);
    }
    let mut skipped = Vec::new();
    let mut owners: HashMap<String, Uuid> = HashMap::new();
    by_id.retain(|id, e| match admissible(e) {
        Err(reason) => {
            skipped.push(Skipped {
                instance: *id,
                reason,
            });
            false
        }
        Ok(()) => match owners.get(&e.interface) {
            Some(owner) => {
                skipped.push(Skipped {
                    instance: *id,
                    reason: format!("interface {} is instance {owner}'s", e.interface),
                });
                false
            }
            None => {
                owners.insert(e.interface.clone(), *id);
                true
            }
        },
    });
    (by_id, skipped)
}

fn admissible(e: &Enforced) -> Result<(), String> {
    if !valid_interface(&e.interface) {
        return Err(format!("unusable interface name {:?}", e.interface));
    }
    Ok(())
}

fn full_doc(
    table: &str,
    instances: &BTreeMap<Uuid, Enforced>,
    groups: &BTreeMap<Uuid, Members>,
) -> Value {
    let mut c = Cmds::new(table);
    c.table("add");
    c.table("delete");
    c.table("add");
    global_objects(&mut c);
    for (g, m) in groups {
        add_group_set(&mut c, *g, m);
    }
    let rendered: Vec<(Uuid, Rendered)> = instances
        .iter()
        .map(|(id, e)| (*id, render_instance(e)))
        .collect();
    for (id, r) in &rendered {
        add_instance_chains(&mut c, *id, r);
    }
    for (id, r) in &rendered {
        add_instance_rules(&mut c, *id, r);
    }
    add_elements(&mut c, "add", rendered.iter().flat_map(|(_, r)| &r.elems));
    base_chains(&mut c);
    c.doc()
}

/// The group sets a set of instances needs: every group one of their rules
/// names, with its members from `groups` (none when it is not there).
fn needed_groups(
    instances: &BTreeMap<Uuid, Enforced>,
    groups: &BTreeMap<Uuid, Members>,
) -> BTreeMap<Uuid, Members> {
    instances
        .values()
        .flat_map(referenced_groups)
        .map(|g| (g, groups.get(&g).cloned().unwrap_or_default()))
        .collect()
}

/// The whole table, as one transaction that replaces it: what `cradle
/// firewall show` prints. Instances that cannot be enforced (see
/// [`Firewall::plan_full`]) are left out. Only the groups some rule names
/// get a set; a named group missing from `groups` gets an empty one.
pub fn render_full(
    table: &str,
    instances: &[Enforced],
    groups: &BTreeMap<Uuid, Members>,
) -> Value {
    let (instances, _) = admit(instances.to_vec());
    let groups = needed_groups(&instances, groups);
    full_doc(table, &instances, &groups)
}

// ---- applied state and plans ---------------------------------------------

/// What is in the kernel's table, as far as this process knows: the last
/// state applied successfully.
#[derive(Debug, Clone)]
pub struct Firewall {
    table: String,
    /// Whether a full ruleset was applied (before that there is no table).
    loaded: bool,
    instances: BTreeMap<Uuid, Enforced>,
    /// The group sets present, with their members.
    groups: BTreeMap<Uuid, Members>,
    /// How many applied instances name each group.
    refs: BTreeMap<Uuid, usize>,
    /// Which instance has each interface.
    ifaces: HashMap<String, Uuid>,
}

/// Commands for nft, and what the applied state becomes once nft took them.
#[derive(Debug, Clone)]
pub struct Plan {
    doc: Value,
    change: Change,
    skipped: Vec<Skipped>,
}

#[derive(Debug, Clone)]
enum Change {
    Full {
        instances: BTreeMap<Uuid, Enforced>,
        groups: BTreeMap<Uuid, Members>,
    },
    Delta {
        instances: BTreeMap<Uuid, Option<Enforced>>,
        /// `Some`: the set exists afterwards with these members; `None`:
        /// deleted.
        groups: BTreeMap<Uuid, Option<Members>>,
    },
}

impl Plan {
    /// The `{"nftables": [...]}` document to apply.
    pub fn doc(&self) -> &Value {
        &self.doc
    }

    /// How many commands the document holds.
    pub fn commands(&self) -> usize {
        self.doc["nftables"].as_array().map_or(0, Vec::len)
    }

    /// Whether this replaces the whole table.
    pub fn is_full(&self) -> bool {
        matches!(self.change, Change::Full { .. })
    }

    /// Instances left out because nft cannot take them.
    pub fn skipped(&self) -> &[Skipped] {
        &self.skipped
    }
}

impl Firewall {
    /// Nothing applied yet.
    pub fn new(table: impl Into<String>) -> Self {
        Firewall {
            table: table.into(),
            loaded: false,
            instances: BTreeMap::new(),
            groups: BTreeMap::new(),
            refs: BTreeMap::new(),
            ifaces: HashMap::new(),
        }
    }

    pub fn table(&self) -> &str {
        &self.table
    }

    /// Whether a full ruleset has been applied.
    pub fn is_loaded(&self) -> bool {
        self.loaded
    }

    /// The applied instances.
    pub fn instances(&self) -> &BTreeMap<Uuid, Enforced> {
        &self.instances
    }

    /// The applied group sets and their members.
    pub fn groups(&self) -> &BTreeMap<Uuid, Members> {
        &self.groups
    }

    /// The full rendering of the applied state: what the table holds.
    pub fn render(&self) -> Value {
        full_doc(&self.table, &self.instances, &self.groups)
    }

    /// Replace everything with these instances and the sets of the groups
    /// their rules name. Instances whose interface nft cannot take, or
    /// whose interface another instance (with a smaller id) has, are left
    /// out and listed in [`Plan::skipped`].
    pub fn plan_full(&self, instances: Vec<Enforced>, groups: &BTreeMap<Uuid, Members>) -> Plan {
        let (instances, skipped) = admit(instances);
        let groups = needed_groups(&instances, groups);
        Plan {
            doc: full_doc(&self.table, &instances, &groups),
            change: Change::Full { instances, groups },
            skipped,
        }
    }

    /// The commands that take the applied state to the state with `update`
    /// made; `None` when nothing changes. Before any full ruleset was
    /// applied, a full plan of what the update holds.
    pub fn plan_update(&self, update: &Update) -> Option<Plan> {
        if !self.loaded {
            let instances = update.instances.values().flatten().cloned().collect();
            return Some(self.plan_full(instances, &update.groups));
        }
        let mut skipped = Vec::new();

        // What each touched instance becomes.
        let mut claimed: HashMap<&str, Uuid> = HashMap::new();
        let mut next: BTreeMap<Uuid, Option<&Enforced>> = BTreeMap::new();
        for (id, new) in &update.instances {
            let new = match new {
                Some(e) if e.instance != *id => {
                    skipped.push(Skipped {
                        instance: *id,
                        reason: format!("its entry is for instance {}", e.instance),
                    });
                    None
                }
                Some(e) => match admissible(e) {
                    Err(reason) => {
                        skipped.push(Skipped {
                            instance: *id,
                            reason,
                        });
                        None
                    }
                    Ok(()) => {
                        let holder = self
                            .ifaces
                            .get(&e.interface)
                            .filter(|h| **h != *id && !update.instances.contains_key(h))
                            .or_else(|| claimed.get(e.interface.as_str()));
                        match holder {
                            Some(h) => {
                                skipped.push(Skipped {
                                    instance: *id,
                                    reason: format!("interface {} is instance {h}'s", e.interface),
                                });
                                None
                            }
                            None => {
                                claimed.insert(&e.interface, *id);
                                Some(e)
                            }
                        }
                    }
                },
                None => None,
            };
            if self.instances.get(id) != new {
                next.insert(*id, new);
            }
        }

        // Which groups are named afterwards.
        let mut refs_delta: BTreeMap<Uuid, isize> = BTreeMap::new();
        for (id, new) in &next {
            if let Some(old) = self.instances.get(id) {
                for g in referenced_groups(old) {
                    *refs_delta.entry(g).or_default() -= 1;
                }
            }
            if let Some(new) = new {
                for g in referenced_groups(new) {
                    *refs_delta.entry(g).or_default() += 1;
                }
            }
        }
        let mut groups: BTreeMap<Uuid, Option<Members>> = BTreeMap::new();
        let mut created: Vec<Uuid> = Vec::new();
        let mut deleted: Vec<Uuid> = Vec::new();
        let named_after = |g: &Uuid| {
            let now = self.refs.get(g).copied().unwrap_or(0) as isize;
            now + refs_delta.get(g).copied().unwrap_or(0) > 0
        };
        for g in refs_delta.keys() {
            match (self.groups.contains_key(g), named_after(g)) {
                (false, true) => {
                    created.push(*g);
                    groups.insert(*g, Some(update.groups.get(g).cloned().unwrap_or_default()));
                }
                (true, false) => {
                    deleted.push(*g);
                    groups.insert(*g, None);
                }
                _ => {}
            }
        }
        let mut member_changes: Vec<(Uuid, &Members, &Members)> = Vec::new();
        for (g, m) in &update.groups {
            if groups.contains_key(g) {
                continue;
            }
            if let Some(old) = self.groups.get(g)
                && old != m
            {
                member_changes.push((*g, old, m));
                groups.insert(*g, Some(m.clone()));
            }
        }

        if next.is_empty() && groups.is_empty() {
            if skipped.is_empty() {
                return None;
            }
            return Some(Plan {
                doc: json!({"nftables": []}),
                change: Change::Delta {
                    instances: BTreeMap::new(),
                    groups: BTreeMap::new(),
                },
                skipped,
            });
        }

        let mut c = Cmds::new(&self.table);
        // Group sets first, so the rules below can use them.
        for g in &created {
            if let Some(Some(m)) = groups.get(g) {
                add_group_set(&mut c, *g, m);
            }
        }
        for (g, old, new) in &member_changes {
            c.elements("delete", &group_set4(*g), addr_elems(old.ipv4.difference(&new.ipv4)));
            c.elements("delete", &group_set6(*g), addr_elems(old.ipv6.difference(&new.ipv6)));
            c.elements("add", &group_set4(*g), addr_elems(new.ipv4.difference(&old.ipv4)));
            c.elements("add", &group_set6(*g), addr_elems(new.ipv6.difference(&old.ipv6)));
        }

        let rendered: Vec<(Uuid, Option<Rendered>, Option<Rendered>)> = next
            .iter()
            .map(|(id, new)| {
                (
                    *id,
                    self.instances.get(id).map(render_instance),
                    new.map(render_instance),
                )
            })
            .collect();

        // Elements that go: before their chains are deleted, and before an
        // interface moves to another instance.
        let gone = rendered.iter().flat_map(|(_, old, new)| {
            let keep: &[Elem] = new.as_ref().map_or(&[], |n| &n.elems);
            old.iter()
                .flat_map(|o| &o.elems)
                .filter(move |e| !keep.contains(e))
        });
        add_elements(&mut c, "delete", gone);

        // Empty the chains that change or go.
        let mut refill: Vec<(String, &Vec<Vec<Value>>)> = Vec::new();
        let mut drop_chains: Vec<String> = Vec::new();
        let mut new_chains: Vec<String> = Vec::new();
        for (id, old, new) in &rendered {
            let pairs = [
                (
                    ingress_chain(*id),
                    old.as_ref().map(|o| &o.ingress),
                    new.as_ref().map(|n| &n.ingress),
                ),
                (
                    egress_chain(*id),
                    old.as_ref().and_then(|o| o.egress.as_ref()),
                    new.as_ref().and_then(|n| n.egress.as_ref()),
                ),
            ];
            for (chain, old, new) in pairs {
                match (old, new) {
                    (Some(o), Some(n)) if o == n => {}
                    (Some(_), Some(n)) => {
                        c.chain("flush", &chain);
                        refill.push((chain, n));
                    }
                    (Some(_), None) => {
                        c.chain("flush", &chain);
                        drop_chains.push(chain);
                    }
                    (None, Some(n)) => {
                        new_chains.push(chain.clone());
                        refill.push((chain, n));
                    }
                    (None, None) => {}
                }
            }
        }
        for chain in &new_chains {
            c.chain("add", chain);
        }
        for (chain, rules) in refill {
            for rule in rules {
                c.rule(&chain, rule.clone());
            }
        }

        // Elements that come, once their chains exist.
        let come = rendered.iter().flat_map(|(_, old, new)| {
            let had: &[Elem] = old.as_ref().map_or(&[], |o| &o.elems);
            new.iter()
                .flat_map(|n| &n.elems)
                .filter(move |e| !had.contains(e))
        });
        add_elements(&mut c, "add", come);

        for chain in &drop_chains {
            c.chain("delete", chain);
        }
        // Group sets last: nothing uses them any more.
        for g in &deleted {
            c.set("delete", &group_set4(*g), Value::Null);
            c.set("delete", &group_set6(*g), Value::Null);
        }

        Some(Plan {
            doc: c.doc(),
            change: Change::Delta {
                instances: next
                    .into_iter()
                    .map(|(id, e)| (id, e.cloned()))
                    .collect(),
                groups,
            },
            skipped,
        })
    }

    /// Record that nft took `plan`.
    pub fn commit(&mut self, plan: Plan) {
        match plan.change {
            Change::Full { instances, groups } => {
                self.loaded = true;
                self.refs.clear();
                self.ifaces.clear();
                for (id, e) in &instances {
                    for g in referenced_groups(e) {
                        *self.refs.entry(g).or_default() += 1;
                    }
                    self.ifaces.insert(e.interface.clone(), *id);
                }
                self.instances = instances;
                self.groups = groups;
            }
            Change::Delta { instances, groups } => {
                for (id, new) in instances {
                    if let Some(old) = self.instances.remove(&id) {
                        for g in referenced_groups(&old) {
                            if let Some(n) = self.refs.get_mut(&g) {
                                *n -= 1;
                                if *n == 0 {
                                    self.refs.remove(&g);
                                }
                            }
                        }
                        if self.ifaces.get(&old.interface) == Some(&id) {
                            self.ifaces.remove(&old.interface);
                        }
                    }
                    if let Some(new) = new {
                        for g in referenced_groups(&new) {
                            *self.refs.entry(g).or_default() += 1;
                        }
                        self.ifaces.insert(new.interface.clone(), id);
                        self.instances.insert(id, new);
                    }
                }
                for (g, m) in groups {
                    match m {
                        Some(m) => self.groups.insert(g, m),
                        None => self.groups.remove(&g),
                    };
                }
            }
        }
    }
}

// ---- running nft ---------------------------------------------------------

/// How to run nft.
#[derive(Debug, Clone)]
pub struct Nft {
    /// The nft program: a path, or a name looked up in `PATH`.
    pub program: PathBuf,
    /// Run it in this network namespace (`ip netns exec NS nft ...`).
    pub netns: Option<String>,
}

impl Default for Nft {
    fn default() -> Self {
        Nft {
            program: PathBuf::from("nft"),
            netns: None,
        }
    }
}

/// nft failed, or could not be run.
#[derive(Debug, thiserror::Error)]
pub enum NftError {
    #[error("{program} not found: install nftables (or set the path to nft)")]
    Missing { program: String },
    #[error("cannot run {program}: {source}")]
    Spawn {
        program: String,
        source: std::io::Error,
    },
    #[error("`{command}` failed ({status}): {stderr}")]
    Failed {
        command: String,
        status: String,
        stderr: String,
    },
    #[error("`{command}` printed something that is not nft's JSON: {message}")]
    Output { command: String, message: String },
    #[error(
        "applied without {} instance(s) that cannot be enforced: {}",
        .0.len(),
        .0.iter().map(|s| format!("{} ({})", s.instance, s.reason)).collect::<Vec<_>>().join(", ")
    )]
    Unenforceable(Vec<Skipped>),
}

/// At most this much of nft's complaint is kept: with JSON input it quotes
/// the failing command, which can be long.
const MAX_STDERR: usize = 4096;

fn locate(program: &Path) -> Option<PathBuf> {
    if program.components().count() > 1 {
        return program.is_file().then(|| program.to_path_buf());
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|p| p.is_file())
}

impl Nft {
    /// nft from `PATH`, in the current namespace.
    pub fn new() -> Self {
        Nft::default()
    }

    /// The same nft, run in network namespace `netns`.
    pub fn in_netns(mut self, netns: impl Into<String>) -> Self {
        self.netns = Some(netns.into());
        self
    }

    /// Apply `doc` (`nft -j -f -`), as one transaction.
    pub fn apply(&self, doc: &Value) -> Result<(), NftError> {
        self.run(&["-j", "-f", "-"], Some(doc)).map(drop)
    }

    /// Check `doc` without applying it (`nft -c -j -f -`).
    pub fn check(&self, doc: &Value) -> Result<(), NftError> {
        self.run(&["-c", "-j", "-f", "-"], Some(doc)).map(drop)
    }

    /// The table as nft lists it (`nft -j list table inet NAME`).
    pub fn list_table(&self, table: &str) -> Result<Value, NftError> {
        self.list(&["list", "table", FAMILY, table])
    }

    /// `nft -j` with `args` (a `list` command), parsed.
    pub fn list(&self, args: &[&str]) -> Result<Value, NftError> {
        let mut full = vec!["-j"];
        full.extend_from_slice(args);
        let out = self.run(&full, None)?;
        serde_json::from_slice(&out).map_err(|e| NftError::Output {
            command: self.describe(&full),
            message: e.to_string(),
        })
    }

    fn describe(&self, args: &[&str]) -> String {
        let mut s = String::new();
        if let Some(ns) = &self.netns {
            s.push_str(&format!("ip netns exec {ns} "));
        }
        s.push_str(&self.program.display().to_string());
        for a in args {
            s.push(' ');
            s.push_str(a);
        }
        s
    }

    fn run(&self, args: &[&str], input: Option<&Value>) -> Result<Vec<u8>, NftError> {
        let program = locate(&self.program).ok_or_else(|| NftError::Missing {
            program: self.program.display().to_string(),
        })?;
        let mut cmd = match &self.netns {
            Some(ns) => {
                let ip = locate(Path::new("ip")).ok_or_else(|| NftError::Missing {
                    program: "ip (iproute2, for `ip netns exec`)".into(),
                })?;
                let mut cmd = Command::new(ip);
                cmd.args([OsString::from("netns"), "exec".into(), ns.into()])
                    .arg(&program);
                cmd
            }
            None => Command::new(&program),
        };
        cmd.args(args)
            .stdin(if input.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let spawn_err = |source| NftError::Spawn {
            program: program.display().to_string(),
            source,
        };
        let mut child = cmd.spawn().map_err(spawn_err)?;
        let writer = match (input, child.stdin.take()) {
            (Some(doc), Some(mut stdin)) => {
                let bytes = serde_json::to_vec(doc).expect("a JSON value serializes");
                // A thread, so that a chatty nft cannot block us on a full
                // pipe while we are still writing.
                Some(std::thread::spawn(move || stdin.write_all(&bytes)))
            }
            _ => None,
        };
        let out = child.wait_with_output().map_err(spawn_err)?;
        let written = writer.map(|w| w.join());
        if !out.status.success() {
            let mut stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
            if stderr.len() > MAX_STDERR {
                let mut cut = MAX_STDERR;
                while !stderr.is_char_boundary(cut) {
                    cut -= 1;
                }
                stderr.truncate(cut);
                stderr.push_str(" [...]");
            }
            return Err(NftError::Failed {
                command: self.describe(args),
                status: out.status.to_string(),
                stderr,
            });
        }
        if let Some(Ok(Err(e))) = written {
            return Err(spawn_err(e));
        }
        Ok(out.stdout)
    }
}

// ---- the enforcer --------------------------------------------------------

/// Keeps one nftables table equal to what the registry says, through
/// [`Firewall`] plans applied with [`Nft`]. Calls are serialized; the
/// applied state changes only when nft took the commands.
pub struct NftEnforcer {
    nft: Nft,
    fw: Mutex<Firewall>,
}

impl NftEnforcer {
    pub fn new(nft: Nft, table: impl Into<String>) -> Self {
        NftEnforcer {
            nft,
            fw: Mutex::new(Firewall::new(table)),
        }
    }

    pub fn nft(&self) -> &Nft {
        &self.nft
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Firewall> {
        self.fw.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn table(&self) -> String {
        self.lock().table().to_string()
    }

    /// The full rendering of what is applied.
    pub fn show(&self) -> Value {
        self.lock().render()
    }

    /// A copy of the applied state.
    pub fn applied(&self) -> Firewall {
        self.lock().clone()
    }

    /// Replace the table with exactly these instances and the sets of the
    /// groups their rules name. Instances that cannot be enforced are left
    /// out, the rest applied, and then they are reported as
    /// [`NftError::Unenforceable`].
    pub fn full(
        &self,
        instances: Vec<Enforced>,
        groups: BTreeMap<Uuid, Members>,
    ) -> Result<(), NftError> {
        let mut fw = self.lock();
        let plan = fw.plan_full(instances, &groups);
        self.nft.apply(plan.doc())?;
        let skipped = plan.skipped.clone();
        fw.commit(plan);
        unenforceable(skipped)
    }

    /// Apply one change as a delta. On failure nothing changed (nft applies
    /// all or nothing) and the applied state stays as it was; the caller
    /// should apply the full ruleset again (this has only the change).
    pub fn update(&self, update: &Update) -> Result<(), NftError> {
        let mut fw = self.lock();
        let Some(plan) = fw.plan_update(update) else {
            return Ok(());
        };
        if plan.commands() > 0 {
            self.nft.apply(plan.doc())?;
        }
        let skipped = plan.skipped.clone();
        fw.commit(plan);
        unenforceable(skipped)
    }
}

fn unenforceable(skipped: Vec<Skipped>) -> Result<(), NftError> {
    if skipped.is_empty() {
        Ok(())
    } else {
        Err(NftError::Unenforceable(skipped))
    }
}

impl crate::Enforce for NftEnforcer {
    fn full(&self, instances: Vec<Enforced>, groups: BTreeMap<Uuid, Members>) -> Result<(), String> {
        NftEnforcer::full(self, instances, groups).map_err(|e| e.to_string())
    }

    fn update(&self, update: &Update) -> Result<(), String> {
        NftEnforcer::update(self, update).map_err(|e| e.to_string())
    }
}
