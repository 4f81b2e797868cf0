//! Real traffic through the rules: a "host" namespace that routes, and
//! guest namespaces each joined to it by a veth pair (host end `vgN`, guest
//! end `eth0`, 10.77.N.2/30 behind 10.77.N.1), as a routed hypervisor joins
//! its guests. The enforcer applies rules in the host namespace; Python
//! (Debian's) in the guests serves and sends TCP, UDP and ICMP. Expected
//! drops wait 0.6 s.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use common::lab::{Lab, addr, expect};
use common::*;
use cradle_secgroups::nft::NftEnforcer;
use cradle_secgroups::{Direction, Enforced, EtherType, Members, Protocol, RuleSpec, Update};

/// Guest `k` as the enforcer sees it (IPv4 only: the lab has no IPv6).
fn guest(k: u8, rules: Vec<RuleSpec>) -> Enforced {
    let mut e = instance(k, rules);
    e.ipv6 = BTreeSet::new();
    e
}

#[test]
fn rules_decide_what_reaches_the_guests() {
    let mut lab = Lab::new(3);
    lab.serve(1, &["tcp:8080"]);
    lab.serve(2, &["tcp:8080", "tcp:9090", "udp:5353"]);

    // The lab routes before any rule, also from a second address that is not
    // the guest's own (the host has a route back to it).
    lab.foreign_address(1, "10.77.1.99");
    expect("g1 -> g2 tcp 9090, no firewall", lab.tcp(1, 2, 9090), true);
    expect(
        "g1 -> g2 tcp 8080 from 10.77.1.99, no firewall",
        lab.probe(1, &["tcp", &addr(2), "8080", "10.77.1.99"]),
        true,
    );

    let g2_rules = vec![
        tcp(Direction::Ingress, 8080, 8080, "10.77.0.0/16"),
        udp(Direction::Ingress, 5353, 5353, "10.77.3.2/32"),
        icmp_echo(Direction::Ingress, "0.0.0.0/0"),
    ];
    let g3_rules = vec![tcp(Direction::Egress, 8080, 8080, "10.77.2.2/32")];
    let enforcer = NftEnforcer::new(lab.host.nft(), "cradle");
    enforcer
        .full(
            vec![
                guest(1, vec![]),
                guest(2, g2_rules.clone()),
                guest(3, g3_rules.clone()),
            ],
            BTreeMap::new(),
        )
        .expect("the rules apply");

    expect(
        "g1 -> g2 tcp 8080 (allowed from 10.77/16)",
        lab.tcp(1, 2, 8080),
        true,
    );
    expect("g1 -> g2 tcp 9090 (no rule)", lab.tcp(1, 2, 9090), false);
    expect(
        "g1 -> g2 udp 5353 (only from g3)",
        lab.udp(1, 2, 5353),
        false,
    );
    expect("g1 -> g2 ping (echo allowed)", lab.ping(1, 2), true);
    expect("g2 -> g1 ping (g1 has no rules)", lab.ping(2, 1), false);
    expect(
        "g2 -> g1 tcp 8080 (g1 has no rules)",
        lab.tcp(2, 1, 8080),
        false,
    );
    expect(
        "g1 -> g2 tcp 8080 from an address not g1's",
        lab.probe(1, &["tcp", &addr(2), "8080", "10.77.1.99"]),
        false,
    );
    expect(
        "g1 -> g2 ping from an address not g1's",
        lab.probe(1, &["ping", &addr(2), "10.77.1.99"]),
        false,
    );
    expect(
        "g3 -> g2 tcp 8080 (egress allows it)",
        lab.tcp(3, 2, 8080),
        true,
    );
    expect(
        "g3 -> g2 udp 5353 (g2 takes it, g3's egress does not allow it)",
        lab.udp(3, 2, 5353),
        false,
    );
    expect("g3 -> g2 ping (not in g3's egress)", lab.ping(3, 2), false);

    // Egress: allow udp 5353 and tcp 8080 to all guests too.
    let mut g3_more = g3_rules.clone();
    g3_more.push(udp(Direction::Egress, 5353, 5353, "10.77.0.0/16"));
    g3_more.push(tcp(Direction::Egress, 8080, 8080, "10.77.0.0/16"));
    enforcer
        .update(&Update {
            instances: BTreeMap::from([(id(3), Some(guest(3, sorted(g3_more))))]),
            groups: BTreeMap::new(),
        })
        .unwrap();
    expect(
        "g3 -> g2 udp 5353 after the egress rule",
        lab.udp(3, 2, 5353),
        true,
    );

    // A rule whose remote is a group: g1 takes tcp 8080 from group G's
    // members, first g2, then g3.
    let g = id(0xaa);
    let g1_rules = vec![from_group(
        Direction::Ingress,
        EtherType::IPv4,
        Protocol::Tcp,
        Some(8080),
        g,
    )];
    let members = |k: u8| Members {
        ipv4: BTreeSet::from([Ipv4Addr::new(10, 77, k, 2)]),
        ipv6: BTreeSet::new(),
    };
    enforcer
        .update(&Update {
            instances: BTreeMap::from([(id(1), Some(guest(1, g1_rules.clone())))]),
            groups: BTreeMap::from([(g, members(2))]),
        })
        .unwrap();
    expect("g2 (in G) -> g1 tcp 8080", lab.tcp(2, 1, 8080), true);
    expect("g3 (not in G) -> g1 tcp 8080", lab.tcp(3, 1, 8080), false);
    enforcer
        .update(&Update {
            instances: BTreeMap::new(),
            groups: BTreeMap::from([(g, members(3))]),
        })
        .unwrap();
    expect("g2 (left G) -> g1 tcp 8080", lab.tcp(2, 1, 8080), false);
    expect("g3 (joined G) -> g1 tcp 8080", lab.tcp(3, 1, 8080), true);

    // Delete g2's tcp rule.
    let g2_less: Vec<RuleSpec> = g2_rules[1..].to_vec();
    enforcer
        .update(&Update {
            instances: BTreeMap::from([(id(2), Some(guest(2, sorted(g2_less))))]),
            groups: BTreeMap::new(),
        })
        .unwrap();
    expect(
        "g1 -> g2 tcp 8080 after its rule went",
        lab.tcp(1, 2, 8080),
        false,
    );
    expect("g1 -> g2 ping still allowed", lab.ping(1, 2), true);

    // Stop enforcing g3: its egress rules go with it.
    enforcer
        .update(&Update {
            instances: BTreeMap::from([(id(3), None)]),
            groups: BTreeMap::new(),
        })
        .unwrap();
    expect(
        "g3 -> g2 ping without g3's egress rules",
        lab.ping(3, 2),
        true,
    );
    // g3's own address is no longer checked, nor its ingress.
    expect("g2 -> g3 ping: g3 is not enforced", lab.ping(2, 3), true);
}

/// Counters of another table of the host's, as `(kept, leaked)`: packets
/// that still carry the host's own mark bit after cradle's chains, and
/// packets that carry any of cradle's bits there.
fn mark_counters(lab: &Lab) -> (u64, u64) {
    let out = lab
        .host
        .exec(&["nft", "-j", "list", "chain", "inet", "host", "after"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let packets: Vec<u64> = v["nftables"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|o| o.get("rule"))
        .filter_map(|r| {
            r["expr"]
                .as_array()?
                .iter()
                .find_map(|e| e.get("counter"))
                .map(|c| c["packets"].as_u64().unwrap())
        })
        .collect();
    (packets[0], packets[1])
}

#[test]
fn group_tags_leave_the_hosts_mark_bits_alone() {
    let mut lab = Lab::new(2);
    lab.serve(2, &["tcp:8080"]);
    // Another table of the host's marks everything from guest 1 with bit 0
    // before cradle's chains, and counts after them.
    let mut host_table = lab.host.command("nft");
    host_table.args(["-f", "-"]);
    let script = "table inet host {
        chain before { type filter hook prerouting priority mangle; meta mark set meta mark | 0x1; }
        chain after { type filter hook forward priority filter + 10;
            iifname \"vg1\" meta mark & 0x1 == 0x1 counter
            iifname \"vg1\" meta mark & 0xfff00000 != 0 counter
        }
    }";
    let mut child = host_table
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    assert!(child.wait().unwrap().success(), "the host's table loads");

    let g = id(0xaa);
    let members = Members {
        ipv4: BTreeSet::from([Ipv4Addr::new(10, 77, 1, 2)]),
        ipv6: BTreeSet::new(),
    };
    let g2 = vec![from_group(
        Direction::Ingress,
        EtherType::IPv4,
        Protocol::Tcp,
        Some(8080),
        g,
    )];
    let enforcer = NftEnforcer::new(lab.host.nft(), "cradle");
    enforcer
        .full(
            vec![guest(1, vec![]), guest(2, g2)],
            BTreeMap::from([(g, members)]),
        )
        .expect("the rules apply");
    expect("g1 (in G) -> g2 tcp 8080", lab.tcp(1, 2, 8080), true);
    let (kept, leaked) = mark_counters(&lab);
    assert!(
        kept > 0,
        "the host's mark bit did not survive cradle's chains"
    );
    assert_eq!(leaked, 0, "cradle's tag bits left its chains");
}
