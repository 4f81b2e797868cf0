//! Two hosts of a cluster enforce their own instances for real: each
//! `cradle serve` applies its table (`cradle_a`, `cradle_b`) in the routing
//! lab's host namespace, and real TCP between the guests shows that a rule
//! made through one host is enforced by the other, with a group whose
//! members live on both.

use std::time::{Duration, Instant};

use cradle_secgroups::api::GroupRequest;
use cradle_store::testkit::PgServer;
use serde_json::{Value, json};

use crate::admin::typed;
use crate::cluster::host_env;
use crate::firewall::common::lab::{Lab, addr, expect};
use crate::harness::{Opts, Server, route};

fn start(url: &str, name: &str, lab: &Lab, table: &str) -> Server {
    let mut env = host_env(url, name, None);
    env.push(("CRADLE_FIREWALL_ENABLED", "true".into()));
    env.push(("CRADLE_FIREWALL_NETNS", lab.host.name.clone()));
    env.push(("CRADLE_FIREWALL_TABLE", table.into()));
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    Server::start_with(Opts {
        env: &env,
        ..Default::default()
    })
}

fn table(lab: &Lab, name: &str) -> String {
    let out = lab
        .host
        .command("nft")
        .args(["list", "table", "inet", name])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Wait until `probe` gives `want`; how long that took.
fn until(what: &str, want: bool, mut probe: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    loop {
        if probe() == want {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{what}: never {want}"
        );
    }
}

#[test]
fn each_host_enforces_its_own_instances_and_another_hosts_rules() {
    let mut lab = Lab::new(3);
    lab.serve(1, &["tcp:22"]);
    let pg = PgServer::start().expect("start PostgreSQL");
    let url = pg.url();
    let a = start(&url, "node-a", &lab, "cradle_a");
    let b = start(&url, "node-b", &lab, "cradle_b");
    let mut ids = Vec::new();
    // g1 on A, made through B; g2 and g3 on B, made through A.
    for (k, host, via) in [(1u8, "node-a", &b), (2, "node-b", &a), (3, "node-b", &a)] {
        let v: Value = via.admin().create(&json!({
            "name": format!("g{k}"),
            "host": host,
            "project_id": "t",
            "metadata_address": addr(k),
            "local_ipv4": addr(k),
            "interface": format!("vg{k}"),
            "mac": lab.mac(k),
        }));
        ids.push(v["id"].as_str().unwrap().to_string());
    }
    let wait_tables = Instant::now();
    while !(table(&lab, "cradle_a").contains("vg1") && table(&lab, "cradle_b").contains("vg3")) {
        assert!(
            wait_tables.elapsed() < Duration::from_secs(10),
            "the tables never filled"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let (ta, tb) = (table(&lab, "cradle_a"), table(&lab, "cradle_b"));
    assert!(
        ta.contains("\"vg1\"") && !ta.contains("\"vg2\"") && !ta.contains("\"vg3\""),
        "{ta}"
    );
    assert!(
        tb.contains("\"vg2\"") && tb.contains("\"vg3\"") && !tb.contains("\"vg1\""),
        "{tb}"
    );
    expect("tcp 2→1:22 with no rules", lab.tcp(2, 1, 22), false);

    // A tenant group with a member on B; a rule on g1 (A's) sourced from it,
    // made through B: A enforces it, with B's member's address.
    let friends = b
        .admin()
        .fetch(route::create_security_group(
            "t",
            &GroupRequest {
                name: "friends".into(),
                ..Default::default()
            },
        ))
        .json()["security_group"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let attached = b.admin().fetch(route::attach_group("t", &friends, &ids[1]));
    assert_eq!(attached.status, 204, "{}", attached.text());
    let made = b.admin().fetch(route::add_rule(
        "t",
        &ids[0],
        &typed(&json!({"protocol": "tcp", "from_port": 22, "remote_group_id": friends})),
    ));
    assert_eq!(made.status, 201, "{}", made.text());
    let rule_id = made.json()["security_group_rule"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let took = until("tcp 2→1:22 once B's rule reaches A", true, || {
        lab.tcp(2, 1, 22)
    });
    eprintln!("a rule made through B was enforced by A after {took:?}");
    expect("tcp 3→1:22, g3 is not a friend", lab.tcp(3, 1, 22), false);

    // Removed through A, the same: enforced at once by A.
    let gone = a.admin().fetch(route::delete_rule("t", &rule_id));
    assert_eq!(gone.status, 204, "{}", gone.text());
    expect("tcp 2→1:22 after the rule went", lab.tcp(2, 1, 22), false);
    // The membership changed through A on B's instance: A's set follows.
    a.admin().fetch(route::add_rule(
        "t",
        &ids[0],
        &typed(&json!({"protocol": "tcp", "from_port": 22, "remote_group_id": friends})),
    ));
    until("tcp 2→1:22 with the rule back", true, || {
        lab.tcp(2, 1, 22)
    });
    let left = b.admin().fetch(route::detach_group("t", &friends, &ids[1]));
    assert_eq!(left.status, 204, "{}", left.text());
    until("tcp 2→1:22 once g2 left, through B", false, || {
        lab.tcp(2, 1, 22)
    });
}
