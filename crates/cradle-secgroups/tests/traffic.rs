//! Real traffic through the rules: a "host" namespace that routes, and
//! guest namespaces each joined to it by a veth pair (host end `vgN`, guest
//! end `eth0`, 10.77.N.2/30 and fd00:77:0:N::2/64), as a routed hypervisor
//! joins its guests. The enforcer applies rules in the host namespace; Python
//! (Debian's) in the guests serves and sends TCP, UDP and ICMP. Expected
//! drops wait 0.6 s.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use common::lab::{Lab, addr, addr6, expect};
use common::*;
use cradle_secgroups::nft::NftEnforcer;
use cradle_secgroups::{Direction, Enforced, EtherType, Members, Protocol, RuleSpec, Update};

/// Guest `k` as the enforcer sees it, IPv4 only.
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

fn tcp6(direction: Direction, port: u16, remote: &str) -> RuleSpec {
    tcp(direction, port, port, remote)
}

fn echo6(remote: &str) -> RuleSpec {
    RuleSpec {
        direction: Direction::Ingress,
        ethertype: EtherType::IPv6,
        protocol: Protocol::Icmpv6,
        matches: cradle_secgroups::Match::Icmp {
            icmp_type: 128,
            code: None,
        },
        remote: cidr(remote),
    }
}

/// Whether the host itself gets an answer to a ping of `addr` (with a
/// zone, for a link-local address).
fn host_ping(lab: &Lab, addr: &str) -> bool {
    let out = lab
        .host
        .command("ping")
        .args(["-6", "-c", "1", "-W", "1", addr])
        .output()
        .expect("ping (iputils-ping) runs");
    match out.status.code() {
        Some(0) => true,
        Some(1) => false,
        _ => panic!("ping broke: {}", String::from_utf8_lossy(&out.stderr)),
    }
}

#[test]
fn ipv6_traffic_follows_the_rules_and_registered_link_locals_pass() {
    // Guest 3 forms its link-local address as RFC 7217 says, not from its
    // mac.
    let mut lab = Lab::with_stable_privacy(3, &[3]);
    lab.serve(2, &["tcp:8080", "tcp:9090"]);
    let ll3 = lab.link_local(3);
    assert_ne!(ll3, cradle_secgroups::nft::eui64_link_local(mac(3)));

    // The lab routes IPv6 before any rule.
    expect(
        "g1 -> g2 tcp6 8080, no firewall",
        lab.tcp6(1, 2, 8080),
        true,
    );
    expect(
        "host -> g3's link-local, no firewall",
        host_ping(&lab, &format!("{ll3}%vg3")),
        true,
    );

    let g = id(0xaa);
    let members = Members {
        ipv4: BTreeSet::new(),
        ipv6: BTreeSet::from(["fd00:77:0:3::2".parse().unwrap()]),
    };
    let g2 = vec![
        tcp6(Direction::Ingress, 8080, "fd00:77:0:1::/64"),
        echo6("::/0"),
        from_group(
            Direction::Ingress,
            EtherType::IPv6,
            Protocol::Tcp,
            Some(9090),
            g,
        ),
    ];
    let g3 = vec![echo6("::/0")];
    let enforcer = NftEnforcer::new(lab.host.nft(), "cradle");
    enforcer
        .full(
            vec![
                instance(1, vec![]),
                instance(2, g2),
                instance(3, g3.clone()),
            ],
            BTreeMap::from([(g, members)]),
        )
        .expect("the rules apply");

    expect(
        "g1 -> g2 tcp6 8080 (from its /64)",
        lab.tcp6(1, 2, 8080),
        true,
    );
    expect(
        "g3 -> g2 tcp6 8080 (not its /64)",
        lab.tcp6(3, 2, 8080),
        false,
    );
    expect("g1 -> g2 ping6 (echo allowed)", lab.ping6(1, 2), true);
    expect("g2 -> g1 ping6 (g1 has no rules)", lab.ping6(2, 1), false);
    expect("g3 (in G) -> g2 tcp6 9090", lab.tcp6(3, 2, 9090), true);
    expect("g1 (not in G) -> g2 tcp6 9090", lab.tcp6(1, 2, 9090), false);
    expect(
        "g1 -> g2 tcp6 8080 from an address not g1's",
        {
            lab.guest(1)
                .ip(&["addr", "add", "fd00:77:0:1::99/64", "dev", "eth0", "nodad"]);
            lab.probe(1, &["tcp", &addr6(2), "8080", "fd00:77:0:1::99"])
        },
        false,
    );

    // Guest 3's own link-local address is not its mac's: its answers from
    // it are spoofing until the operator registers it.
    let ll3_zoned = format!("{ll3}%vg3");
    expect(
        "host -> g3's link-local, unregistered",
        host_ping(&lab, &ll3_zoned),
        false,
    );
    let mut registered = instance(3, g3);
    registered.ipv6.insert(ll3);
    enforcer
        .update(&Update {
            instances: BTreeMap::from([(id(3), Some(registered))]),
            groups: BTreeMap::new(),
        })
        .unwrap();
    expect(
        "host -> g3's link-local, registered",
        host_ping(&lab, &ll3_zoned),
        true,
    );
}

/// Instance `k` of the crowd the lab's guests hide in: its interface does
/// not exist, its rules look like a tenant's.
fn crowd(k: u32) -> Enforced {
    let [_, _, a, b] = k.to_be_bytes();
    let g = id(0xaa);
    let mut rules = vec![
        tcp(Direction::Ingress, 22, 22, "10.0.0.0/8"),
        tcp(Direction::Ingress, 443, 443, "0.0.0.0/0"),
        tcp(Direction::Ingress, 8000, 8080, "192.168.0.0/16"),
        udp(Direction::Ingress, 60000, 61000, "0.0.0.0/0"),
        icmp_echo(Direction::Ingress, "0.0.0.0/0"),
        tcp(Direction::Ingress, 5432, 5432, "fd00::/8"),
        from_group(
            Direction::Ingress,
            EtherType::IPv4,
            Protocol::Tcp,
            Some(6379),
            g,
        ),
    ];
    if k.is_multiple_of(4) {
        rules.push(tcp(Direction::Egress, 443, 443, "0.0.0.0/0"));
    }
    Enforced {
        instance: uuid::Uuid::from_u128(0x5eed_0000 + u128::from(k)),
        interface: format!("crowd{k:05}"),
        mac: [0x02, 0xee, 0, 0, a, b],
        ipv4: BTreeSet::from([Ipv4Addr::new(10, 200, a, b)]),
        ipv6: BTreeSet::new(),
        rules: sorted(rules),
    }
}

#[test]
fn ten_thousand_instances_and_real_packets_through_a_sample() {
    let mut lab = Lab::new(3);
    lab.serve(2, &["tcp:8080", "tcp:6379"]);
    let g = id(0xaa);
    // Group G: guest 1 and every fourth instance of the crowd.
    let mut members = Members::default();
    members.ipv4.insert(Ipv4Addr::new(10, 77, 1, 2));
    let mut all: Vec<Enforced> = (0..9997).map(crowd).collect();
    for e in all.iter().step_by(4) {
        members.ipv4.extend(e.ipv4.iter().copied());
    }
    let g2 = vec![
        tcp(Direction::Ingress, 8080, 8080, "10.77.1.2/32"),
        from_group(
            Direction::Ingress,
            EtherType::IPv4,
            Protocol::Tcp,
            Some(6379),
            g,
        ),
    ];
    all.extend([guest(1, vec![]), guest(2, g2.clone()), guest(3, vec![])]);
    let enforcer = NftEnforcer::new(lab.host.nft(), "cradle");
    let started = std::time::Instant::now();
    enforcer
        .full(all, BTreeMap::from([(g, members.clone())]))
        .expect("10,000 instances apply");
    eprintln!(
        "10,000 instances: {} elements applied in {:?}",
        enforcer.applied().elements(),
        started.elapsed()
    );
    assert_eq!(enforcer.applied().instances().len(), 10_000);

    expect("g1 -> g2 tcp 8080", lab.tcp(1, 2, 8080), true);
    expect("g3 -> g2 tcp 8080", lab.tcp(3, 2, 8080), false);
    expect("g1 (in G) -> g2 tcp 6379", lab.tcp(1, 2, 6379), true);
    expect("g3 (not in G) -> g2 tcp 6379", lab.tcp(3, 2, 6379), false);

    // Changes among 10,000: g3 joins G, g1 loses its own rule on g2.
    members.ipv4.insert(Ipv4Addr::new(10, 77, 3, 2));
    let started = std::time::Instant::now();
    enforcer
        .update(&Update {
            instances: BTreeMap::from([(id(2), Some(guest(2, g2[1..].to_vec())))]),
            groups: BTreeMap::from([(g, members)]),
        })
        .unwrap();
    eprintln!("one change among 10,000 instances: {:?}", started.elapsed());
    expect("g3 (joined G) -> g2 tcp 6379", lab.tcp(3, 2, 6379), true);
    expect(
        "g1 -> g2 tcp 8080 after its rule went",
        lab.tcp(1, 2, 8080),
        false,
    );
}
