//! The rendered rulesets on a live kernel, each test in network namespaces
//! of its own: nft accepts the full rendering, and after every delta the
//! table is exactly what applying the full rendering of the same state
//! gives.

mod common;

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use common::*;
use cradle_secgroups::nft::{
    Firewall, Nft, NftEnforcer, NftError, egress_chain, group_set4, group_set6, ingress_chain,
    render_full,
};
use cradle_secgroups::{Direction, Enforced, EtherType, Members, Protocol, Update};
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

    fn render(&self) -> serde_json::Value {
        let instances: Vec<Enforced> = self.instances.values().cloned().collect();
        render_full(TABLE, &instances, &self.groups)
    }
}

/// Applies updates to one namespace as deltas, and the full rendering of
/// the same state to another, and compares the two tables after each step.
struct Pair {
    _delta_ns: Netns,
    _full_ns: Netns,
    delta: NftEnforcer,
    full: Nft,
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
            full: full_ns.nft(),
            _delta_ns: delta_ns,
            _full_ns: full_ns,
            delta,
            desired,
        };
        pair.compare("after the first full apply");
        pair
    }

    fn update(&mut self, what: &str, u: Update) {
        let plan = self.delta.applied().plan_update(&u).expect("a change");
        assert!(!plan.is_full(), "{what}: a delta, not a full apply");
        self.delta
            .update(&u)
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        self.desired.apply(&u);
        self.compare(what);
    }

    fn compare(&self, what: &str) {
        self.full
            .apply(&self.desired.render())
            .unwrap_or_else(|e| panic!("{what}: the full rendering: {e}"));
        let got = listing(self.delta.nft());
        let want = listing(&self.full);
        assert_same_table(what, &got, &want);
        // And the enforcer's idea of the table is the table.
        let applied = self.delta.applied();
        assert_eq!(
            applied.instances(),
            &self.desired.instances,
            "{what}: the applied instances"
        );
    }

    fn has(&self, object: &str) -> bool {
        listing(self.delta.nft()).contains_key(object)
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
    let doc = render_full(TABLE, &instances, &groups);
    nft.check(&doc).expect("nft -c accepts the rendering");
    // Deterministic: the same input renders the same bytes.
    assert_eq!(doc, render_full(TABLE, &instances, &groups));

    // Applies when there is no table, and again over the table.
    nft.apply(&doc).expect("applies without a table");
    let first = listing(&nft);
    nft.apply(&doc).expect("applies over the table");
    assert_same_table("applied twice", &listing(&nft), &first);

    for object in [
        format!("chain {}", ingress_chain(id(1))),
        format!("chain {}", ingress_chain(id(2))),
        format!("chain {}", ingress_chain(id(3))),
        format!("chain {}", egress_chain(id(3))),
        format!("set {}", group_set4(g)),
        format!("set {}", group_set6(g)),
        "chain prerouting".into(),
        "chain forward".into(),
        "chain output".into(),
        "chain antispoof".into(),
    ] {
        assert!(
            first.contains_key(&object),
            "{object} is missing: {first:#?}"
        );
    }
    assert!(!first.contains_key(&format!("chain {}", egress_chain(id(1)))));
    // Instance 2 has no rules: established, invalid, and the final drop.
    assert_eq!(
        first[&format!("chain {}", ingress_chain(id(2)))].len(),
        1 + 3
    );
    // Instance 1: its six rules more.
    assert_eq!(
        first[&format!("chain {}", ingress_chain(id(1)))].len(),
        1 + 3 + 6
    );
    let egress = &first["map egress"];
    assert_eq!(
        egress.len(),
        2,
        "only instance 3 has egress rules: {egress:?}"
    );
    let src6 = &first["set src6"];
    assert!(
        src6.iter().any(|e| e.contains("fe80::ff:fe00:1")),
        "the EUI-64 link-local address of 02:00:00:00:00:01 is allowed: {src6:?}"
    );
    // No anonymous sets anywhere: nft would list them inline as "set".
    let text = serde_json::to_string(&nft.list_table(TABLE).unwrap()).unwrap();
    assert!(!text.contains("\"set\":["), "an anonymous set: {text}");

    // Something nft refuses comes back with its message.
    let bad = serde_json::json!({"nftables": [{"add": {"rule": {
        "family": "inet", "table": TABLE, "chain": "nonexistent",
        "expr": [{"accept": null}]}}}]});
    let err = nft.apply(&bad).unwrap_err();
    match &err {
        NftError::Failed { stderr, .. } => assert!(!stderr.is_empty(), "{err}"),
        other => panic!("expected nft's failure, got {other}"),
    }
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
    assert!(p.has(&format!("chain {}", egress_chain(id(3)))));

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
    assert!(p.has(&format!("set {}", group_set4(g))));

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
    assert!(p.has(&format!("set {}", group_set4(g))));
    p.update(
        "the last stops naming it",
        update(vec![(id(3), Some(i3.clone()))], vec![]),
    );
    assert!(!p.has(&format!("set {}", group_set4(g))));
    assert!(!p.has(&format!("set {}", group_set6(g))));

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
    assert!(!p.has(&format!("chain {}", egress_chain(id(3)))));
    assert!(p.has(&format!("chain {}", egress_chain(id(1)))));

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
    assert!(!p.has(&format!("set {}", group_set6(h))));

    // Nothing changes: no plan.
    let same = update(
        vec![(id(1), Some(i1d.clone())), (id(9), None)],
        vec![(g, members(&[]))],
    );
    assert!(p.delta.applied().plan_update(&same).is_none());
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
    assert!(matches!(err, NftError::Failed { .. }), "{err}");
    assert_eq!(enforcer.applied().instances(), before.instances());
    // The full ruleset repairs it.
    enforcer
        .full(
            vec![instance(1, vec![]), instance(2, vec![])],
            BTreeMap::new(),
        )
        .unwrap();
    assert!(listing(enforcer.nft()).contains_key(&format!("chain {}", ingress_chain(id(2)))));
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
    let table = listing(enforcer.nft());
    assert!(table.contains_key(&format!("chain {}", ingress_chain(id(1)))));
    assert!(!table.contains_key(&format!("chain {}", ingress_chain(id(2)))));
    assert!(!table.contains_key(&format!("chain {}", ingress_chain(id(3)))));

    // An update that fixes one of them enforces it and forgets its skip.
    let mut fixed = instance(2, vec![]);
    fixed.interface = "vg2".into();
    enforcer
        .update(&update(vec![(id(2), Some(fixed))], vec![]))
        .unwrap();
    let ids: Vec<Uuid> = enforcer.unenforced().iter().map(|s| s.instance).collect();
    assert_eq!(ids, vec![id(3)]);
    assert!(listing(enforcer.nft()).contains_key(&format!("chain {}", ingress_chain(id(2)))));
}

#[test]
fn an_update_before_any_full_apply_is_a_full_apply() {
    require_tools();
    let ns = Netns::new("first");
    let enforcer = NftEnforcer::new(ns.nft(), TABLE);
    let u = update(vec![(id(1), Some(instance(1, vec![])))], vec![]);
    assert!(Firewall::new(TABLE).plan_update(&u).unwrap().is_full());
    enforcer.update(&u).unwrap();
    assert!(listing(enforcer.nft()).contains_key(&format!("chain {}", ingress_chain(id(1)))));
}

#[test]
fn a_missing_nft_is_named() {
    let nft = Nft {
        program: "/nonexistent/nft".into(),
        netns: None,
    };
    let err = nft.check(&serde_json::json!({"nftables": []})).unwrap_err();
    assert!(matches!(err, NftError::Missing { .. }), "{err}");
    assert!(err.to_string().contains("install nftables"), "{err}");
}
