//! The set-based table on a live kernel, each test in network namespaces of
//! its own: nft accepts and prints what cradle writes (skeleton through nft,
//! elements over netlink), and after every delta the table holds what a
//! full apply of the same state gives. Group tags are numbered in the order
//! they are needed, so tables are compared with each tag read as the
//! addresses that have it.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use cradle_secgroups::nft::{Firewall, Nft, NftEnforcer, NftError};
use cradle_secgroups::worker::{FirewallMetrics, Worker};
use cradle_secgroups::{Direction, Enforce, Enforced, EtherType, Members, Protocol, Update};
use serde_json::Value;
use uuid::Uuid;

const TABLE: &str = "cradle";

fn members(v4: &[Ipv4Addr]) -> Members {
    Members {
        ipv4: v4.iter().copied().collect(),
        ipv6: Default::default(),
    }
}

fn listing(nft: &Nft) -> BTreeMap<String, Vec<String>> {
    normalized(&nft.list_table(TABLE).expect("nft lists the table"))
}

/// The table's elements with each group tag read as the addresses that
/// have it: every non-empty set and map, and the fixed chains whose rules do
/// not depend on which shapes are in use. Elements of tags no address has
/// (left by deltas until the next full apply) match nothing and are left
/// out.
fn semantic(nft: &Nft) -> BTreeMap<String, Vec<String>> {
    let v = nft.list_table(TABLE).expect("nft lists the table");
    let items = v["nftables"].as_array().unwrap();
    let mut tag_addrs: BTreeMap<u64, BTreeSet<String>> = BTreeMap::new();
    for item in items {
        let Some(m) = item.get("map") else { continue };
        for e in m["elem"].as_array().into_iter().flatten() {
            let target = e[1]["jump"]["target"].as_str().unwrap();
            let n: u64 = target.strip_prefix("id-").unwrap().parse().unwrap();
            tag_addrs.entry(n).or_default().insert(e[0].to_string());
        }
    }
    let mut out = listing(nft);
    out.retain(|k, v| {
        let chain = k.strip_prefix("chain ");
        !(chain.is_some_and(|c| c.starts_with("id-") || c.starts_with("guest_"))
            || (k.starts_with("set ") && v.len() == 1))
    });
    for item in items {
        let Some(set) = item.get("set") else { continue };
        let name = set["name"].as_str().unwrap();
        if !name.contains("_g_") {
            continue;
        }
        let mut elems: Vec<String> = Vec::new();
        for e in set["elem"].as_array().into_iter().flatten() {
            let mut parts = e["concat"].as_array().unwrap().clone();
            let n = parts[1].as_u64().unwrap() >> 20;
            let Some(addrs) = tag_addrs.get(&n) else {
                continue;
            };
            parts[1] = Value::String(format!("{addrs:?}"));
            elems.push(format!("elem {}", Value::Array(parts)));
        }
        elems.sort();
        let key = format!("set {name}");
        if elems.is_empty() {
            out.remove(&key);
        } else {
            elems.insert(0, "props".into());
            out.insert(key, elems);
        }
    }
    for kind in ["map tag4", "map tag6"] {
        if let Some(v) = out.get_mut(kind) {
            let mut elems: Vec<String> = v
                .drain(1..)
                .map(|e| {
                    let e: Value = serde_json::from_str(e.strip_prefix("elem ").unwrap()).unwrap();
                    let n: u64 = e[1]["jump"]["target"].as_str().unwrap()[3..]
                        .parse()
                        .unwrap();
                    format!("elem {} -> {:?}", e[0], tag_addrs[&n])
                })
                .collect();
            elems.sort();
            v.extend(elems);
        }
    }
    out
}

/// The chains of the table.
fn chains(nft: &Nft) -> BTreeSet<String> {
    listing(nft)
        .keys()
        .filter_map(|k| k.strip_prefix("chain ").map(String::from))
        .collect()
}

/// The state the tests want, kept apart from the enforcer's own
/// bookkeeping: the full rendering of this is the reference.
#[derive(Default)]
struct Desired {
    instances: BTreeMap<Uuid, Enforced>,
    groups: BTreeMap<Uuid, Members>,
}

impl Desired {
    fn apply(&mut self, u: &Update) {
        for (id, e) in &u.instances {
            match e {
                Some(e) => self.instances.insert(*id, e.clone()),
                None => self.instances.remove(id),
            };
        }
        for (g, m) in &u.groups {
            self.groups.insert(*g, m.clone());
        }
    }

    fn instances(&self) -> Vec<Enforced> {
        self.instances.values().cloned().collect()
    }
}

/// Applies updates to one namespace as deltas, and the full rendering of
/// the same state to another, and compares the two tables after each step.
struct Pair {
    _delta_ns: Netns,
    _full_ns: Netns,
    delta: NftEnforcer,
    full: NftEnforcer,
    desired: Desired,
}

impl Pair {
    fn new(instances: Vec<Enforced>, groups: BTreeMap<Uuid, Members>) -> Pair {
        require_tools();
        let delta_ns = Netns::new("delta");
        let full_ns = Netns::new("full");
        let delta = NftEnforcer::new(delta_ns.nft(), TABLE);
        let mut desired = Desired::default();
        for e in &instances {
            desired.instances.insert(e.instance, e.clone());
        }
        desired.groups = groups.clone();
        delta
            .full(instances, groups)
            .expect("the full ruleset applies");
        let pair = Pair {
            full: NftEnforcer::new(full_ns.nft(), TABLE),
            _delta_ns: delta_ns,
            _full_ns: full_ns,
            delta,
            desired,
        };
        pair.compare("after the first full apply");
        pair
    }

    fn update(&mut self, what: &str, u: Update) {
        let plan = self
            .delta
            .applied()
            .plan_update(&u)
            .unwrap()
            .expect("a change");
        assert!(!plan.is_full(), "{what}: a delta, not a full apply");
        self.delta
            .update(&u)
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        self.desired.apply(&u);
        self.compare(what);
    }

    fn compare(&self, what: &str) {
        self.full
            .full(self.desired.instances(), self.desired.groups.clone())
            .unwrap_or_else(|e| panic!("{what}: the full apply: {e}"));
        let got = semantic(self.delta.nft());
        let want = semantic(self.full.nft());
        assert_same_table(what, &got, &want);
        // And the enforcer's idea of the table is the table.
        let applied = self.delta.applied();
        assert_eq!(
            applied.instances(),
            &self.desired.instances,
            "{what}: the applied instances"
        );
    }

    /// Whether the delta's table holds an element whose text has all of
    /// `parts`, in set `set`.
    fn has(&self, set: &str, parts: &[&str]) -> bool {
        listing(self.delta.nft())
            .get(set)
            .is_some_and(|v| v.iter().any(|e| parts.iter().all(|p| e.contains(p))))
    }
}

fn update(instances: Vec<(Uuid, Option<Enforced>)>, groups: Vec<(Uuid, Members)>) -> Update {
    Update {
        instances: instances.into_iter().collect(),
        groups: groups.into_iter().collect(),
    }
}

#[test]
fn full_rendering_is_accepted_and_replaces_the_table() {
    require_tools();
    let ns = Netns::new("full");
    let nft = ns.nft();
    let g = id(0xaa);
    let instances = vec![
        instance(
            1,
            vec![
                tcp(Direction::Ingress, 22, 22, "10.0.0.0/8"),
                udp(Direction::Ingress, 5000, 5100, "0.0.0.0/0"),
                icmp_echo(Direction::Ingress, "0.0.0.0/0"),
                tcp(Direction::Ingress, 443, 443, "2001:db8::/32"),
                from_group(
                    Direction::Ingress,
                    EtherType::IPv4,
                    Protocol::Tcp,
                    Some(80),
                    g,
                ),
                from_group(Direction::Ingress, EtherType::IPv6, Protocol::Any, None, g),
            ],
        ),
        instance(2, vec![]),
        instance(3, vec![tcp(Direction::Egress, 53, 53, "192.0.2.53/32")]),
    ];
    let groups = BTreeMap::from([(g, members(&[Ipv4Addr::new(10, 77, 2, 2)]))]);

    // The plan as text is a whole table that nft takes as it is.
    let plan = Firewall::new(TABLE)
        .plan_full(instances.clone(), &groups)
        .unwrap();
    let text = plan.text();
    nft.apply_text(&text)
        .expect("nft -f takes the text of a full plan");
    let from_text = semantic(&nft);
    assert_eq!(text, plan.text(), "deterministic");

    // A table of another layout (an older cradle's per-instance chains) is
    // replaced whole by the enforcer.
    nft.apply_text(&format!(
        "add table inet {TABLE}\nadd chain inet {TABLE} in-0101\nadd set inet {TABLE} g4-aa {{ type ipv4_addr; }}\n"
    ))
    .unwrap();
    let enforcer = NftEnforcer::new(nft.clone(), TABLE);
    enforcer.full(instances.clone(), groups.clone()).unwrap();
    let first = semantic(&nft);
    assert_same_table("the enforcer against the plan's text", &first, &from_text);
    let fixed: BTreeSet<String> = [
        "antispoof",
        "guest_in",
        "guest_out",
        "prerouting",
        "forward",
        "output",
    ]
    .map(String::from)
    .into();
    let (tag_chains, others): (BTreeSet<String>, BTreeSet<String>) =
        chains(&nft).into_iter().partition(|c| c.starts_with("id-"));
    assert_eq!(others, fixed, "the old chains are gone");
    // One tag in use, and 64 more to spare.
    assert_eq!(tag_chains.len(), 65, "{tag_chains:?}");
    assert!(!listing(&nft).contains_key("set g4-aa"));

    // Again over its own table: the same, in place.
    enforcer.full(instances.clone(), groups.clone()).unwrap();
    assert_same_table("applied twice", &semantic(&nft), &first);

    let raw = listing(&nft);
    let src6 = &raw["set src6"];
    assert!(
        src6.iter().any(|e| e.contains("fe80::ff:fe00:1")),
        "the EUI-64 link-local address of 02:00:00:00:00:01 is allowed: {src6:?}"
    );
    assert_eq!(
        raw["set egress_on"].len(),
        2,
        "only instance 3 filters egress"
    );
    // udp 5000-5100: aligned blocks, each an element of its block size's set.
    assert!(
        raw["set in4_a0_port3"].iter().any(|e| e.contains("5000")),
        "{raw:#?}"
    );
    assert!(raw["set in4_a0_port2"].iter().any(|e| e.contains("5096")));
    assert!(raw["set in4_a0_port0"].iter().any(|e| e.contains("5100")));
    // nft prints the whole table back in its own language.
    let printed = nft_text(&nft);
    assert!(
        printed.contains(
            "oifname . ip saddr & 255.0.0.0 . meta l4proto . th dport @in4_a8_port0 accept"
        ),
        "{printed}"
    );
    // Smaller layouts leave no set behind: a full apply without group rules
    // drops the group sets and the tag chains beyond the spare ones.
    enforcer
        .full(vec![instance(2, vec![])], BTreeMap::new())
        .unwrap();
    let after = listing(&nft);
    assert!(!after.contains_key("set in4_g_port0"), "{after:#?}");
    assert!(
        after["map tag4"].len() == 1,
        "no tag in use: {:?}",
        after["map tag4"]
    );
    assert!(
        !chains(&nft).contains("id-65"),
        "only the spare tag chains stay"
    );

    // Something nft refuses comes back with its message.
    let err = nft
        .apply_text(&format!("add rule inet {TABLE} nonexistent accept\n"))
        .unwrap_err();
    match &err {
        NftError::Failed { stderr, .. } => assert!(!stderr.is_empty(), "{err}"),
        other => panic!("expected nft's failure, got {other}"),
    }
}

/// `nft list table` as text.
fn nft_text(nft: &Nft) -> String {
    let mut cmd = match &nft.netns {
        Some(ns) => {
            let mut c = std::process::Command::new("ip");
            c.args(["netns", "exec", ns, "nft"]);
            c
        }
        None => std::process::Command::new("nft"),
    };
    let out = cmd.args(["list", "table", "inet", TABLE]).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn deltas_give_the_table_the_full_rendering_gives() {
    let (g, h) = (id(0xaa), id(0xbb));
    let i1 = instance(
        1,
        vec![
            tcp(Direction::Ingress, 22, 22, "10.0.0.0/8"),
            icmp_echo(Direction::Ingress, "0.0.0.0/0"),
        ],
    );
    let i2 = instance(2, vec![]);
    let mut p = Pair::new(vec![i1.clone(), i2.clone()], BTreeMap::new());

    let i3 = instance(
        3,
        vec![
            tcp(Direction::Ingress, 80, 80, "0.0.0.0/0"),
            udp(Direction::Egress, 53, 53, "10.77.0.0/16"),
        ],
    );
    p.update(
        "add an instance with egress rules",
        update(vec![(id(3), Some(i3.clone()))], vec![]),
    );
    assert!(p.has("set egress_on", &["vg3"]));

    let mut i1b = i1.clone();
    i1b.rules = sorted(vec![
        tcp(Direction::Ingress, 22, 23, "10.0.0.0/8"),
        udp(Direction::Ingress, 53, 53, "::/0"),
        icmp_echo(Direction::Ingress, "0.0.0.0/0"),
    ]);
    p.update(
        "change an instance's rules",
        update(vec![(id(1), Some(i1b.clone()))], vec![]),
    );

    let mut i2b = i2.clone();
    i2b.rules = vec![from_group(
        Direction::Ingress,
        EtherType::IPv4,
        Protocol::Tcp,
        Some(8080),
        g,
    )];
    let g_members = members(&[Ipv4Addr::new(10, 77, 1, 2)]);
    p.update(
        "add a rule from a group",
        update(vec![(id(2), Some(i2b.clone()))], vec![(g, g_members)]),
    );
    assert!(p.has("map tag4", &["10.77.1.2", "id-1"]));

    p.update(
        "change the group's members",
        update(
            vec![],
            vec![(
                g,
                members(&[Ipv4Addr::new(10, 77, 3, 2), Ipv4Addr::new(10, 77, 4, 2)]),
            )],
        ),
    );
    p.update(
        "change the group's members again",
        update(vec![], vec![(g, members(&[Ipv4Addr::new(10, 77, 4, 2)]))]),
    );

    // An address in two named groups: a combination of its own.
    let k = id(0xcc);
    let mut i1k = i1b.clone();
    i1k.rules.push(from_group(
        Direction::Ingress,
        EtherType::IPv4,
        Protocol::Udp,
        Some(9999),
        k,
    ));
    i1k.rules = sorted(i1k.rules);
    p.update(
        "an address in two named groups",
        update(
            vec![(id(1), Some(i1k))],
            vec![(
                k,
                members(&[Ipv4Addr::new(10, 77, 4, 2), Ipv4Addr::new(10, 77, 5, 2)]),
            )],
        ),
    );
    p.update(
        "the rule naming the second group goes",
        update(vec![(id(1), Some(i1b.clone()))], vec![]),
    );

    // A second instance names the group; the first stops: the set stays.
    let mut i3b = i3.clone();
    i3b.rules.push(from_group(
        Direction::Egress,
        EtherType::IPv6,
        Protocol::Any,
        None,
        g,
    ));
    i3b.rules = sorted(i3b.rules);
    p.update(
        "a second rule names the group",
        update(vec![(id(3), Some(i3b.clone()))], vec![]),
    );
    p.update(
        "the first stops naming it",
        update(vec![(id(2), Some(i2.clone()))], vec![]),
    );
    assert!(p.has("map tag4", &["10.77.4.2"]));
    p.update(
        "the last stops naming it",
        update(vec![(id(3), Some(i3.clone()))], vec![]),
    );
    assert!(!p.has("map tag4", &["10.77.4.2"]));
    assert!(!p.delta.applied().groups().contains_key(&g));

    // A rule naming a group whose members the update does not carry: the
    // set starts empty.
    let mut i2c = i2.clone();
    i2c.rules = vec![from_group(
        Direction::Ingress,
        EtherType::IPv6,
        Protocol::Udp,
        Some(5353),
        h,
    )];
    p.update(
        "a group without members",
        update(vec![(id(2), Some(i2c.clone()))], vec![]),
    );

    // Egress comes and goes.
    let mut i3c = i3.clone();
    i3c.rules.retain(|r| r.direction == Direction::Ingress);
    let mut i1c = i1b.clone();
    i1c.rules
        .push(tcp(Direction::Egress, 443, 443, "0.0.0.0/0"));
    i1c.rules = sorted(i1c.rules);
    p.update(
        "one instance loses its egress rules, another gains some",
        update(
            vec![(id(1), Some(i1c.clone())), (id(3), Some(i3c.clone()))],
            vec![],
        ),
    );
    assert!(!p.has("set egress_on", &["vg3"]));
    assert!(p.has("set egress_on", &["vg1"]));

    // Identity: new interface, mac and addresses, same rules.
    let mut i1d = i1c.clone();
    i1d.interface = "tap-renamed".into();
    i1d.mac = mac(0x41);
    i1d.ipv4 = [Ipv4Addr::new(10, 77, 1, 3), Ipv4Addr::new(10, 77, 1, 4)].into();
    i1d.ipv6.clear();
    p.update(
        "an instance's identity changes",
        update(vec![(id(1), Some(i1d.clone()))], vec![]),
    );

    // Two instances swap interfaces in one update.
    let (mut i2d, mut i3d) = (i2c.clone(), i3c.clone());
    std::mem::swap(&mut i2d.interface, &mut i3d.interface);
    p.update(
        "two instances swap interfaces",
        update(
            vec![(id(2), Some(i2d.clone())), (id(3), Some(i3d.clone()))],
            vec![],
        ),
    );

    p.update("remove an instance", update(vec![(id(3), None)], vec![]));
    p.update(
        "remove the one naming a group, add another",
        update(
            vec![(id(2), None), (id(5), Some(instance(5, vec![])))],
            vec![],
        ),
    );
    assert!(!p.delta.applied().groups().contains_key(&h));

    // Nothing changes: no plan.
    let same = update(
        vec![(id(1), Some(i1d.clone())), (id(9), None)],
        vec![(g, members(&[]))],
    );
    assert!(p.delta.applied().plan_update(&same).unwrap().is_none());
    p.delta.update(&same).unwrap();
    p.compare("after an update that changes nothing");
}

#[test]
fn a_failed_delta_leaves_the_applied_state() {
    require_tools();
    let ns = Netns::new("fail");
    let enforcer = NftEnforcer::new(ns.nft(), TABLE);
    enforcer
        .full(vec![instance(1, vec![])], BTreeMap::new())
        .unwrap();
    let before = enforcer.applied();
    // Someone removes the table behind our back: the delta fails.
    ns.exec(&["nft", "delete", "table", "inet", TABLE]);
    let u = update(vec![(id(2), Some(instance(2, vec![])))], vec![]);
    let err = enforcer.update(&u).unwrap_err();
    assert!(matches!(err, NftError::Netlink(_)), "{err}");
    assert!(err.to_string().contains("No such file"), "{err}");
    assert_eq!(enforcer.applied().instances(), before.instances());
    // The full ruleset repairs it.
    enforcer
        .full(
            vec![instance(1, vec![]), instance(2, vec![])],
            BTreeMap::new(),
        )
        .unwrap();
    assert!(has_iface(enforcer.nft(), "vg2"));
}

/// Whether the table enforces interface `iface`.
fn has_iface(nft: &Nft, iface: &str) -> bool {
    listing(nft)
        .get("set guest_ifaces")
        .is_some_and(|v| v.iter().any(|e| e.contains(&format!("\"{iface}\""))))
}

#[test]
fn unusable_instances_are_left_out_and_reported() {
    require_tools();
    let ns = Netns::new("skip");
    let enforcer = NftEnforcer::new(ns.nft(), TABLE);
    let mut bad = instance(2, vec![]);
    bad.interface = "@guest_ifaces".into();
    let mut twin = instance(3, vec![]);
    twin.interface = "vg1".into();
    // Not an error (applying again would not change it), but reported.
    enforcer
        .full(vec![instance(1, vec![]), bad, twin], BTreeMap::new())
        .unwrap();
    let ids: Vec<Uuid> = enforcer.unenforced().iter().map(|s| s.instance).collect();
    assert_eq!(ids, vec![id(2), id(3)], "{:?}", enforcer.unenforced());
    assert!(has_iface(enforcer.nft(), "vg1"));
    assert!(!has_iface(enforcer.nft(), "@guest_ifaces"));
    assert_eq!(
        listing(enforcer.nft())["set guest_ifaces"].len(),
        2,
        "vg1 alone"
    );

    // An update that fixes one of them enforces it and forgets its skip.
    let mut fixed = instance(2, vec![]);
    fixed.interface = "vg2".into();
    enforcer
        .update(&update(vec![(id(2), Some(fixed))], vec![]))
        .unwrap();
    let ids: Vec<Uuid> = enforcer.unenforced().iter().map(|s| s.instance).collect();
    assert_eq!(ids, vec![id(3)]);
    assert!(has_iface(enforcer.nft(), "vg2"));
}

#[test]
fn an_update_before_any_full_apply_is_a_full_apply() {
    require_tools();
    let ns = Netns::new("first");
    let enforcer = NftEnforcer::new(ns.nft(), TABLE);
    let u = update(vec![(id(1), Some(instance(1, vec![])))], vec![]);
    assert!(
        Firewall::new(TABLE)
            .plan_update(&u)
            .unwrap()
            .unwrap()
            .is_full()
    );
    enforcer.update(&u).unwrap();
    assert!(has_iface(enforcer.nft(), "vg1"));
}

#[test]
fn a_missing_nft_is_named() {
    let nft = Nft {
        program: "/nonexistent/nft".into(),
        netns: None,
    };
    let err = nft.apply_text("").unwrap_err();
    assert!(matches!(err, NftError::Missing { .. }), "{err}");
    assert!(err.to_string().contains("install nftables"), "{err}");
}

/// An nft program whose target the test can change under a running
/// enforcer: a symlink, replaced atomically (a new link renamed over it).
struct SwitchableNft {
    _dir: tempfile::TempDir,
    link: PathBuf,
}

impl SwitchableNft {
    fn new() -> SwitchableNft {
        let dir = tempfile::tempdir().unwrap();
        let link = dir.path().join("nft");
        let s = SwitchableNft { _dir: dir, link };
        s.point_at(&real_nft());
        s
    }

    fn point_at(&self, target: &Path) {
        let tmp = self.link.with_extension("new");
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink(target, &tmp).unwrap();
        std::fs::rename(&tmp, &self.link).unwrap();
    }

    fn in_netns(&self, ns: &Netns) -> Nft {
        Nft {
            program: self.link.clone(),
            netns: Some(ns.name.clone()),
        }
    }
}

fn real_nft() -> PathBuf {
    let path = std::env::var_os("PATH").expect("PATH is set");
    std::env::split_paths(&path)
        .map(|d| d.join("nft"))
        .find(|p| p.is_file())
        .expect("nft is installed (nftables)")
}

/// `/bin/false`: a real program that exists, runs and fails, saying nothing.
const FAILS: &str = "/bin/false";

#[test]
fn a_failing_nft_is_named_and_leaves_the_state_and_the_table() {
    require_tools();
    let ns = Netns::new("nftfails");
    let nft = SwitchableNft::new();
    let enforcer = NftEnforcer::new(nft.in_netns(&ns), TABLE);
    enforcer
        .full(vec![instance(1, vec![])], BTreeMap::new())
        .unwrap();
    let state = enforcer.applied();
    let table = listing(&ns.nft());

    // nft is there but fails: the full apply (which writes the skeleton
    // with nft) stops before any element is touched.
    nft.point_at(Path::new(FAILS));
    let err = enforcer
        .full(
            vec![instance(1, vec![]), instance(2, vec![])],
            BTreeMap::new(),
        )
        .unwrap_err();
    let NftError::Failed {
        command, status, ..
    } = &err
    else {
        panic!("not NftError::Failed: {err:?}");
    };
    assert!(command.ends_with("/nft -f -"), "{command}");
    assert!(command.starts_with("ip netns exec "), "{command}");
    assert_eq!(status, "exit status: 1");
    let msg = err.to_string();
    assert!(
        msg.contains("nft -f -` failed (exit status: 1) and printed nothing on stderr"),
        "{msg}"
    );
    assert_eq!(enforcer.applied().instances(), state.instances());
    assert_eq!(listing(&ns.nft()), table, "the kernel's table is as it was");

    // A real nft that refuses: what it said is in the error, and the
    // transaction is all or nothing, so the table is still as it was.
    nft.point_at(&real_nft());
    let err = nft
        .in_netns(&ns)
        .apply_text(&format!(
            "add chain inet {TABLE} extra\nadd rule inet {TABLE} extra jump nowhere\n"
        ))
        .unwrap_err();
    let NftError::Failed { stderr, .. } = &err else {
        panic!("not NftError::Failed: {err:?}");
    };
    assert!(stderr.contains("Error:"), "{err}");
    assert!(err.to_string().contains(stderr.as_str()), "{err}");
    assert_eq!(listing(&ns.nft()), table, "the kernel's table is as it was");

    // nft works again: the next full apply takes.
    enforcer
        .full(
            vec![instance(1, vec![]), instance(2, vec![])],
            BTreeMap::new(),
        )
        .unwrap();
    assert!(has_iface(&ns.nft(), "vg2"));
}

/// Poll `f` every 20 ms until it holds, at most `within`.
fn eventually(within: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    f()
}

#[test]
fn the_worker_reports_a_failing_nft_and_retries_until_it_works() {
    require_tools();
    let ns = Netns::new("nftretry");
    let nft = SwitchableNft::new();
    let enforcer = Arc::new(NftEnforcer::new(nft.in_netns(&ns), TABLE));
    let desired = Arc::new(Mutex::new(vec![instance(1, vec![])]));
    let metrics = FirewallMetrics::default();
    let worker = {
        let (desired, counted) = (desired.clone(), enforcer.clone());
        Worker::start(
            enforcer.clone() as Arc<dyn Enforce>,
            Arc::new(move || (desired.lock().unwrap().clone(), BTreeMap::new())),
            metrics.clone(),
            Arc::new(move || counted.elements()),
        )
    };
    assert!(worker.wait(worker.full(), Duration::from_secs(10)));
    let table = listing(&ns.nft());

    nft.point_at(Path::new(FAILS));
    desired.lock().unwrap().push(instance(2, vec![]));
    let n = worker.full();
    assert!(
        eventually(Duration::from_secs(5), || worker.status().failing),
        "{:?}",
        worker.status()
    );
    let st = worker.status();
    let last = st.last_error.clone().expect("the failure is reported");
    assert!(
        last.contains("/nft -f -` failed (exit status: 1)"),
        "{last}"
    );
    assert!(st.applied < n, "{st:?}");
    // It tries again by itself (the first retry comes after 500 ms).
    assert!(
        eventually(Duration::from_secs(5), || metrics.failures.get() >= 2),
        "failures: {}",
        metrics.failures.get()
    );
    assert!(!worker.wait(n, Duration::ZERO));
    assert_eq!(listing(&ns.nft()), table, "the kernel's table is as it was");
    assert_eq!(enforcer.applied().instances().len(), 1);

    // nft is repaired: a retry takes, and the error is cleared.
    nft.point_at(&real_nft());
    assert!(
        worker.wait(n, Duration::from_secs(15)),
        "{:?}",
        worker.status()
    );
    let st = worker.status();
    assert!(!st.failing && st.last_error.is_none(), "{st:?}");
    assert!(has_iface(&ns.nft(), "vg2"));
    assert_eq!(enforcer.applied().instances().len(), 2);
}
