//! Security groups enforced for real, end to end: `cradle serve` applies its
//! ruleset inside a "host" network namespace the test makes
//! (`[firewall] netns`), which routes for three guest namespaces; rules
//! change through the admin API, and real TCP, UDP and ICMP between the
//! guests show what passes. Expected drops wait 0.6 s. Every namespace goes
//! when the test ends, also when it fails.

#[path = "../../../cradle-secgroups/tests/common/mod.rs"]
pub mod common;

use common::lab::{Lab, addr, expect};
use cradle_secgroups::api::GroupRequest;
use serde_json::{Value, json};

use crate::admin::typed;
use crate::harness::*;

fn start(lab: &Lab, data_dir: Option<&std::path::Path>) -> Server {
    let s = Server::start_with(Opts {
        data_dir,
        env: &[
            ("CRADLE_FIREWALL_ENABLED", "true"),
            ("CRADLE_FIREWALL_NETNS", &lab.host.name),
        ],
        ..Default::default()
    });
    // The whole ruleset is applied in the background: wait for it.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let fw = ok(s.admin().fetch(route::firewall()), 200);
        let (wanted, applied) = (&fw["wanted_generation"], &fw["applied_generation"]);
        if wanted.as_u64() > Some(0) && wanted == applied {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the firewall is not applied 20 s after start: {fw}"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    s
}

fn ok(a: Answer, status: u16) -> Value {
    assert_eq!(a.status, status, "{}", a.text());
    if a.body.is_empty() {
        Value::Null
    } else {
        a.json()
    }
}

fn rule(s: &Server, group: &str, body: Value) -> String {
    let v = ok(
        s.admin().fetch(route::add_rule("t", group, &typed(&body))),
        201,
    );
    v["security_group_rule"]["id"].as_str().unwrap().to_string()
}

fn unrule(s: &Server, id: &str) {
    ok(s.admin().fetch(route::delete_rule("t", id)), 204);
}

#[test]
fn cradle_enforces_rules_as_they_change_and_after_a_restart() {
    let mut lab = Lab::new(3);
    lab.serve(1, &["tcp:22", "tcp:80", "udp:53"]);
    lab.serve(2, &["tcp:80"]);
    let mut s = start(&lab, None);
    let mut ids = Vec::new();
    for k in 1..=3u8 {
        let v = s.admin().create(&json!({
            "name": format!("g{k}"),
            "project_id": "t",
            "metadata_address": addr(k),
            "local_ipv4": addr(k),
            "interface": format!("vg{k}"),
            "mac": lab.mac(k),
        }));
        ids.push(v["id"].as_str().unwrap().to_string());
    }
    let (a, b, c) = (ids[0].clone(), ids[1].clone(), ids[2].clone());

    // No rules: ingress denied, egress allowed (the answer is established).
    expect("tcp 2→1:22 with no rules", lab.tcp(2, 1, 22), false);
    expect("ping 2→1 with no rules", lab.ping(2, 1), false);

    // A CIDR rule for one port from one guest's network.
    let ssh = rule(
        &s,
        &a,
        json!({"protocol": "tcp", "from_port": 22, "cidr": "10.77.2.0/30"}),
    );
    expect(
        "tcp 2→1:22 allowed from 10.77.2.0/30",
        lab.tcp(2, 1, 22),
        true,
    );
    expect("tcp 3→1:22 from outside the CIDR", lab.tcp(3, 1, 22), false);
    expect("tcp 2→1:80, another port", lab.tcp(2, 1, 80), false);
    expect("udp 2→1:53, another protocol", lab.udp(2, 1, 53), false);
    let dns = rule(&s, &a, json!({"protocol": "udp", "from_port": 53}));
    expect("udp 3→1:53 allowed from anywhere", lab.udp(3, 1, 53), true);
    rule(&s, &a, json!({"protocol": "icmp", "icmp_type": 8}));
    expect("ping 3→1, echo request allowed", lab.ping(3, 1), true);
    unrule(&s, &ssh);
    expect("tcp 2→1:22 after the rule went", lab.tcp(2, 1, 22), false);
    unrule(&s, &dns);
    expect("udp 3→1:53 after the rule went", lab.udp(3, 1, 53), false);

    // A rule sourced from a tenant group: its members, as they change.
    let clients = ok(
        s.admin().fetch(route::create_security_group(
            "t",
            &GroupRequest {
                name: "clients".into(),
                ..Default::default()
            },
        )),
        201,
    )["security_group"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    rule(
        &s,
        &a,
        json!({"protocol": "tcp", "from_port": 80, "remote_group_id": clients}),
    );
    expect("tcp 2→1:80, group still empty", lab.tcp(2, 1, 80), false);
    ok(s.admin().fetch(route::attach_group("t", &clients, &b)), 204);
    expect("tcp 2→1:80 once g2 is a member", lab.tcp(2, 1, 80), true);
    expect("tcp 3→1:80, g3 is not a member", lab.tcp(3, 1, 80), false);
    ok(s.admin().fetch(route::detach_group("t", &clients, &b)), 204);
    expect("tcp 2→1:80 after g2 left", lab.tcp(2, 1, 80), false);

    // Egress: once g3 has an egress rule, only that leaves it.
    rule(&s, &b, json!({"protocol": "tcp", "from_port": 80}));
    expect(
        "tcp 3→2:80 before g3 has egress rules",
        lab.tcp(3, 2, 80),
        true,
    );
    rule(
        &s,
        &a,
        json!({"protocol": "tcp", "from_port": 22, "cidr": "10.77.3.0/30"}),
    );
    let egress = rule(
        &s,
        &c,
        json!({"direction": "egress", "protocol": "tcp", "from_port": 22, "cidr": "10.77.1.0/30"}),
    );
    expect("tcp 3→1:22, allowed out and in", lab.tcp(3, 1, 22), true);
    expect("tcp 3→2:80, not allowed out", lab.tcp(3, 2, 80), false);
    expect(
        "tcp 1→2:80, g1 has no egress rules",
        lab.tcp(1, 2, 80),
        true,
    );
    unrule(&s, &egress);
    expect(
        "tcp 3→2:80 after the egress rule went",
        lab.tcp(3, 2, 80),
        true,
    );

    // Spoofing: g2 sends from an address that is not its own.
    rule(
        &s,
        &a,
        json!({"protocol": "tcp", "from_port": 22, "cidr": "10.77.0.0/16"}),
    );
    lab.foreign_address(2, "10.77.2.99");
    expect("tcp 2→1:22 from its own address", lab.tcp(2, 1, 22), true);
    expect(
        "tcp 2→1:22 from 10.77.2.99, not its own",
        lab.probe(2, &["tcp", &addr(1), "22", "10.77.2.99"]),
        false,
    );

    // The kernel follows the registry across a restart: the table is gone
    // while cradle is down, and back when it starts.
    let data_dir = s.data_dir.clone();
    s.stop();
    lab.host.exec(&["nft", "delete", "table", "inet", "cradle"]);
    expect(
        "tcp 3→1:80 while the table is gone",
        lab.tcp(3, 1, 80),
        true,
    );
    let s = start(&lab, Some(&data_dir));
    expect("tcp 2→1:22 after the restart", lab.tcp(2, 1, 22), true);
    expect("tcp 3→1:80 after the restart", lab.tcp(3, 1, 80), false);
    let fw = ok(s.admin().fetch(route::firewall()), 200);
    assert_eq!(fw["enforced"], true);
    assert_eq!(fw["dirty"], false);
    assert_eq!(fw["applied_generation"], fw["wanted_generation"], "{fw}");
    let text = fw["ruleset"].as_str().unwrap();
    for (id, k) in [(&a, 1), (&b, 2), (&c, 3)] {
        assert!(
            text.contains(&format!("\"vg{k}\"")),
            "instance {id}'s interface vg{k} is missing from the ruleset"
        );
    }

    // The worker's metrics: a full apply at start, nothing pending, and as
    // many elements as the table holds.
    let m = s.admin().fetch(route::metrics());
    assert_eq!(m.status, 200);
    let metrics = m.text();
    let value = |name: &str| -> f64 {
        metrics
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in:\n{metrics}"))
    };
    assert!(value("cradle_firewall_apply_seconds_count{kind=\"full\"}") >= 1.0);
    assert_eq!(value("cradle_firewall_backlog"), 0.0);
    assert_eq!(value("cradle_firewall_failures_total"), 0.0);
    assert_eq!(
        value("cradle_firewall_elements"),
        fw["elements"].as_f64().unwrap()
    );
    assert!(fw["elements"].as_u64().unwrap() > 0, "{fw}");
}
