//! `cradle secgroup …` and `cradle firewall …` against a running server: the
//! real binary, checked against what the admin API then holds.

use serde_json::{Value, json};

use crate::admin::assert_uuid_v4;
use crate::harness::*;

trait Line {
    fn line(&self) -> String;
}

impl Line for Run {
    /// The one line of standard output (a new rule's id).
    #[track_caller]
    fn line(&self) -> String {
        let lines: Vec<&str> = self.stdout.lines().collect();
        assert_eq!(lines.len(), 1, "not one line: {:?}", self.stdout);
        lines[0].to_string()
    }
}

/// `cradle <args> --url … --token-file …` against `s`, with `env` set.
fn cradle_env(s: &Server, args: &[&str], env: &[(&str, &str)]) -> Run {
    let mut cmd = s.cli(args);
    cmd.envs(env.iter().copied());
    Run::of(&mut cmd)
}

fn cradle(s: &Server, args: &[&str]) -> Run {
    cradle_env(s, args, &[])
}

/// `cradle secgroup <args> --tenant <tenant>`.
fn sg(s: &Server, tenant: &str, args: &[&str]) -> Run {
    let mut all = vec!["secgroup"];
    all.extend_from_slice(args);
    all.extend_from_slice(&["--tenant", tenant]);
    cradle(s, &all)
}

/// Register an instance of `project` with the CLI; returns its id.
fn add_instance(s: &Server, name: &str, address: &str, project: &str, extra: &[&str]) -> String {
    let mut args = vec![
        "instance",
        "add",
        name,
        "--metadata-address",
        address,
        "--project",
        project,
        "-o",
        "json",
    ];
    args.extend_from_slice(extra);
    let v = cradle(s, &args).success().json();
    v["id"].as_str().unwrap().to_string()
}

/// The rule fields that say what it matches.
fn matches(rule: &Value) -> Value {
    let keys = [
        "direction",
        "ethertype",
        "protocol",
        "from_port",
        "to_port",
        "icmp_type",
        "icmp_code",
        "cidr",
        "remote_group_id",
    ];
    keys.iter()
        .map(|k| (k.to_string(), rule[*k].clone()))
        .collect::<serde_json::Map<_, _>>()
        .into()
}

/// The rows of a table printed by the CLI, split on whitespace, header first.
fn rows(out: &str) -> Vec<Vec<String>> {
    out.lines()
        .map(|l| l.split_whitespace().map(str::to_string).collect())
        .collect()
}

/// The value of a `key   value` line of `secgroup show`.
#[track_caller]
fn field(out: &str, name: &str) -> String {
    out.lines()
        .find_map(|l| {
            l.strip_prefix(name)
                .filter(|rest| rest.starts_with(' '))
                .map(|rest| rest.trim().to_string())
        })
        .unwrap_or_else(|| panic!("no {name:?} line in:\n{out}"))
}

#[test]
fn secgroup_verbs_manage_groups_rules_and_members() {
    let s = Server::start();
    let web1 = add_instance(&s, "web1", "127.0.0.5", "t1", &[]);
    let db1 = add_instance(&s, "db1", "127.0.0.6", "t1", &[]);

    // Every instance has its own group, listed with it.
    let list = sg(&s, "t1", &["list"]).success();
    let table = rows(&list.stdout);
    assert_eq!(table[0], ["ID", "NAME", "INSTANCE", "RULES", "MEMBERS"]);
    assert_eq!(table.len(), 3, "{}", list.stdout);
    for id in [&web1, &db1] {
        let row = table
            .iter()
            .find(|r| r[2] == *id)
            .unwrap_or_else(|| panic!("no group of {id}:\n{}", list.stdout));
        assert_uuid_v4(&row[0]);
        assert_eq!(row[1], format!("cradle-sg-{id}"));
        assert_eq!(row[3..], ["0", "1"]);
    }
    let groups = sg(&s, "t1", &["list", "-o", "json"]).success().json();
    let groups = groups.as_array().unwrap();
    assert_eq!(groups.len(), 2);
    let own_of = |instance: &str| -> String {
        groups
            .iter()
            .find(|g| g["instance_id"] == instance)
            .unwrap()["id"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let (web1_own, db1_own) = (own_of(&web1), own_of(&db1));

    // show: by group id, by instance id and by instance name, the same group.
    let show = sg(&s, "t1", &["show", &web1_own]).success();
    assert_eq!(field(&show.stdout, "id"), web1_own);
    assert_eq!(field(&show.stdout, "name"), format!("cradle-sg-{web1}"));
    assert_eq!(field(&show.stdout, "tenant"), "t1");
    assert_eq!(field(&show.stdout, "instance"), web1);
    assert_eq!(field(&show.stdout, "members"), web1);
    assert!(
        show.stdout.contains("RULE ID"),
        "no rules table:\n{}",
        show.stdout
    );
    for key in [web1.as_str(), "web1"] {
        let v = sg(&s, "t1", &["show", key, "-o", "json"]).success().json();
        assert_eq!(v["id"], web1_own.as_str(), "show {key}");
    }

    // create a tenant group
    let created = sg(
        &s,
        "t1",
        &[
            "create",
            "web",
            "--description",
            "web servers",
            "-o",
            "json",
        ],
    )
    .success()
    .json();
    let web = created["id"].as_str().unwrap().to_string();
    assert_uuid_v4(&web);
    assert_eq!(created["name"], "web");
    assert_eq!(created["description"], "web servers");
    assert_eq!(created["instance_id"], Value::Null);
    assert_eq!(created["rules"], json!([]));
    assert_eq!(sg_group(&s, "t1", &web)["name"], "web");
    sg(&s, "t1", &["create", "web"]).fails_with(&["already has a group named", "HTTP 409"]);
    sg(&s, "t1", &["create", "cradle-sg-mine"]).fails_with(&["cradle-sg-", "HTTP 400"]);
    sg(&s, "t1", &["update", "web", "--description", "front end"]).success();
    assert_eq!(sg_group(&s, "t1", &web)["description"], "front end");
    sg(&s, "t1", &["update", "web"]).fails_with(&["nothing to change"]);

    // rules of every kind; the table form prints the new id alone
    let tcp = sg(
        &s,
        "t1",
        &["rule", "add", "web", "--protocol", "tcp", "--port", "443"],
    )
    .success()
    .line();
    assert_uuid_v4(&tcp);
    let range = sg(
        &s,
        "t1",
        &[
            "rule",
            "add",
            &web,
            "--protocol",
            "tcp",
            "--ports",
            "8000-8080",
            "--cidr",
            "10.0.0.0/8",
        ],
    )
    .success()
    .line();
    let icmp = sg(
        &s,
        "t1",
        &[
            "rule",
            "add",
            "web",
            "--protocol",
            "icmp",
            "--icmp-type",
            "8",
            "--icmp-code",
            "0",
        ],
    )
    .success()
    .line();
    let egress = sg(
        &s,
        "t1",
        &[
            "rule",
            "add",
            "web",
            "--direction",
            "egress",
            "--protocol",
            "udp",
            "--port",
            "53",
        ],
    )
    .success()
    .line();
    let v6 = sg(&s, "t1", &["rule", "add", "web", "--cidr", "2001:db8::/32"])
        .success()
        .line();
    // A remote group by instance name: the instance's own group.
    let remote = sg(
        &s,
        "t1",
        &[
            "rule",
            "add",
            "web",
            "--protocol",
            "tcp",
            "--port",
            "5432",
            "--remote-group",
            "db1",
            "-o",
            "json",
        ],
    )
    .success()
    .json();
    assert_eq!(remote["group_id"], web.as_str());
    let remote = remote["id"].as_str().unwrap().to_string();

    let held = sg_group(&s, "t1", &web);
    assert_eq!(
        rule_ids(&held),
        [&tcp, &range, &icmp, &egress, &v6, &remote].map(String::as_str)
    );
    let r = |i: usize| matches(&held["rules"][i]);
    let rule = |d: &str, e: &str, p: &str, ports: [Value; 4], cidr: Value, rg: Value| {
        let [from_port, to_port, icmp_type, icmp_code] = ports;
        json!({"direction": d, "ethertype": e, "protocol": p, "from_port": from_port,
               "to_port": to_port, "icmp_type": icmp_type, "icmp_code": icmp_code,
               "cidr": cidr, "remote_group_id": rg})
    };
    let n = Value::Null;
    let ports = |a: i64, b: i64| [json!(a), json!(b), Value::Null, Value::Null];
    assert_eq!(
        r(0),
        rule(
            "ingress",
            "IPv4",
            "tcp",
            ports(443, 443),
            json!("0.0.0.0/0"),
            n.clone()
        )
    );
    assert_eq!(
        r(1),
        rule(
            "ingress",
            "IPv4",
            "tcp",
            ports(8000, 8080),
            json!("10.0.0.0/8"),
            n.clone()
        )
    );
    assert_eq!(
        r(2),
        rule(
            "ingress",
            "IPv4",
            "icmp",
            [n.clone(), n.clone(), json!(8), json!(0)],
            json!("0.0.0.0/0"),
            n.clone()
        )
    );
    assert_eq!(
        r(3),
        rule(
            "egress",
            "IPv4",
            "udp",
            ports(53, 53),
            json!("0.0.0.0/0"),
            n.clone()
        )
    );
    assert_eq!(
        r(4),
        rule(
            "ingress",
            "IPv6",
            "any",
            [n.clone(), n.clone(), n.clone(), n.clone()],
            json!("2001:db8::/32"),
            n.clone()
        )
    );
    assert_eq!(
        r(5),
        rule(
            "ingress",
            "IPv4",
            "tcp",
            ports(5432, 5432),
            n.clone(),
            json!(db1_own)
        )
    );

    // The rules table of `show`.
    let show = sg(&s, "t1", &["show", "web"]).success();
    let table = rows(&show.stdout);
    let header = table
        .iter()
        .position(|r| r.first().map(String::as_str) == Some("RULE"))
        .unwrap();
    assert_eq!(
        table[header],
        [
            "RULE",
            "ID",
            "DIRECTION",
            "ETHERTYPE",
            "PROTOCOL",
            "PORTS/ICMP",
            "REMOTE"
        ]
    );
    let row = |id: &str| -> Vec<String> {
        table
            .iter()
            .find(|r| r.first().map(String::as_str) == Some(id))
            .unwrap_or_else(|| panic!("no rule {id}:\n{}", show.stdout))[1..]
            .to_vec()
    };
    assert_eq!(
        row(&tcp),
        ["ingress", "IPv4", "tcp", "port", "443", "0.0.0.0/0"]
    );
    assert_eq!(
        row(&range),
        ["ingress", "IPv4", "tcp", "ports", "8000-8080", "10.0.0.0/8"]
    );
    assert_eq!(
        row(&icmp),
        [
            "ingress",
            "IPv4",
            "icmp",
            "type",
            "8",
            "code",
            "0",
            "0.0.0.0/0"
        ]
    );
    assert_eq!(
        row(&egress),
        ["egress", "IPv4", "udp", "port", "53", "0.0.0.0/0"]
    );
    assert_eq!(row(&v6), ["ingress", "IPv6", "any", "all", "2001:db8::/32"]);
    assert_eq!(
        row(&remote),
        [
            "ingress".to_string(),
            "IPv4".into(),
            "tcp".into(),
            "port".into(),
            "5432".into(),
            "group".into(),
            format!("cradle-sg-{db1}"),
            format!("({db1_own})"),
        ]
    );
    // The same rule again is refused.
    sg(
        &s,
        "t1",
        &["rule", "add", "web", "--protocol", "tcp", "--port", "443"],
    )
    .fails_with(&["already has this rule", &tcp]);

    // attach and detach
    let attached = sg(&s, "t1", &["attach", "web", "web1"]).success();
    assert_eq!(
        attached.stdout.trim(),
        format!("attached security group {web} to instance web1")
    );
    assert_eq!(sg_group(&s, "t1", &web)["instances"], json!([web1]));
    let of_web1 = s.admin().fetch(route::instance_groups(&web1)).json();
    let ids: Vec<&str> = of_web1["security_groups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [web1_own.as_str(), web.as_str()]);
    let list = sg(&s, "t1", &["list"]).success();
    let web_row = rows(&list.stdout)
        .into_iter()
        .find(|r| r[0] == web)
        .unwrap();
    assert_eq!(web_row, [web.as_str(), "web", "-", "6", "1"]);
    sg(&s, "t1", &["attach", &web, &web1]).fails_with(&["already attached", "HTTP 409"]);
    // An instance's own group stays its own.
    sg(&s, "t1", &["attach", &web1_own, "db1"]).fails_with(&["instance's own group", "HTTP 400"]);
    sg(&s, "t1", &["detach", &web1_own, "web1"]).fails_with(&["own group", "HTTP 400"]);
    sg(&s, "t1", &["attach", "web", "nosuch"]).fails_with(&["nosuch", "HTTP 404"]);
    // Attached, the group cannot go.
    sg(&s, "t1", &["delete", "web"]).fails_with(&["detach it first", "HTTP 409"]);
    let detached = sg(&s, "t1", &["detach", "web", &web1, "-o", "json"])
        .success()
        .json();
    assert_eq!(
        detached,
        json!({"detached": {"group": web, "instance": web1}})
    );
    assert_eq!(sg_group(&s, "t1", &web)["instances"], json!([]));
    sg(&s, "t1", &["detach", "web", "web1"]).fails_with(&["not attached", "HTTP 404"]);

    // rule delete
    let deleted = sg(&s, "t1", &["rule", "delete", &tcp]).success();
    assert_eq!(
        deleted.stdout.trim(),
        format!("deleted security group rule {tcp}")
    );
    assert_eq!(
        rule_ids(&sg_group(&s, "t1", &web)),
        [&range, &icmp, &egress, &v6, &remote].map(String::as_str)
    );
    sg(&s, "t1", &["rule", "delete", &tcp]).fails_with(&[&tcp, "HTTP 404"]);

    // A group named as remote cannot go; an instance group never can.
    sg(&s, "t1", &["delete", &db1_own]).fails_with(&["goes when the instance is removed"]);
    let other = sg(&s, "t1", &["create", "clients", "-o", "json"])
        .success()
        .json()["id"]
        .as_str()
        .unwrap()
        .to_string();
    sg(
        &s,
        "t1",
        &["rule", "add", "web", "--remote-group", "clients"],
    )
    .success();
    sg(&s, "t1", &["delete", "clients"]).fails_with(&["delete them first", "HTTP 409"]);

    // delete
    let gone = sg(&s, "t1", &["delete", "web", "-o", "json"])
        .success()
        .json();
    assert_eq!(gone, json!({"deleted": web}));
    let a = s.admin().fetch(route::security_group("t1", &web));
    assert_eq!(a.status, 404, "{}", a.text());
    sg(&s, "t1", &["show", &web]).fails_with(&["HTTP 404"]);
    sg(&s, "t1", &["delete", "clients"]).success();
    sg(&s, "t1", &["show", &other]).fails_with(&["HTTP 404"]);
    let left = sg(&s, "t1", &["list", "-o", "json"]).success().json();
    assert_eq!(left.as_array().unwrap().len(), 2, "{left}");
}

#[test]
fn secgroup_bad_rules_exit_non_zero_naming_the_problem() {
    let s = Server::start();
    let web1 = add_instance(&s, "web1", "127.0.0.5", "t1", &[]);
    let add = |extra: &[&str]| {
        let mut args = vec!["rule", "add", "web1"];
        args.extend_from_slice(extra);
        sg(&s, "t1", &args)
    };
    // The server's message, naming the field, with its status.
    add(&["--cidr", "10.0.0.1/24"]).fails_with(&["cidr", "host bits", "10.0.0.0/24", "HTTP 400"]);
    add(&["--protocol", "tcp", "--ports", "80-22"]).fails_with(&["to_port", "80-22", "reversed"]);
    add(&["--protocol", "icmp", "--port", "22"]).fails_with(&["from_port", "icmp has no ports"]);
    add(&["--protocol", "tcp", "--port", "70000"]).fails_with(&["70000", "outside 1..65535"]);
    add(&["--protocol", "tcp", "--port", "-1"]).fails_with(&["port -1", "outside 1..65535"]);
    add(&["--protocol", "gre"]).fails_with(&["unknown protocol", "gre"]);
    add(&["--direction", "sideways"]).fails_with(&["direction", "sideways"]);
    add(&["--protocol", "icmp", "--icmp-code", "0"])
        .fails_with(&["icmp_code", "needs an icmp_type"]);
    add(&["--protocol", "icmp", "--cidr", "2001:db8::/32"]).fails_with(&["icmp is for IPv4"]);
    add(&["--ethertype", "IPv6", "--cidr", "10.0.0.0/8"]).fails_with(&["IPv4 network", "IPv6"]);
    add(&["--remote-group", "nosuch"]).fails_with(&["--remote-group", "nosuch"]);
    // --ports is the one value checked here: no request is made.
    for bad in ["80", "80-", "a-b", "1-2-3"] {
        let r = add(&["--protocol", "tcp", "--ports", bad]).fails_with(&["--ports", "FROM-TO"]);
        assert!(!r.stderr.contains("HTTP"), "{}", r.stderr);
    }
    // Flags that cannot go together are refused before anything is sent.
    add(&["--port", "22", "--ports", "22-23"]).fails_with(&["--port", "--ports", "cannot be used"]);
    add(&["--cidr", "10.0.0.0/8", "--remote-group", "web1"]).fails_with(&["cannot be used"]);
    // Default rules get the same checks.
    sg(&s, "t1", &["default", "add", "--cidr", "10.0.0.1/24"]).fails_with(&["host bits"]);
    // Nothing was added.
    assert_eq!(sg_group(&s, "t1", &web1)["rules"], json!([]));
    let defaults = s.admin().fetch(route::default_rules("t1")).json();
    assert_eq!(defaults["default_rules"], json!([]));

    // The tenant: required, or from CRADLE_TENANT.
    cradle(&s, &["secgroup", "list"]).fails_with(&["--tenant"]);
    let list = cradle_env(
        &s,
        &["secgroup", "list", "-o", "json"],
        &[("CRADLE_TENANT", "t1")],
    )
    .success()
    .json();
    assert_eq!(list[0]["instance_id"], web1.as_str());
    let other = cradle_env(
        &s,
        &["secgroup", "list", "-o", "json"],
        &[("CRADLE_TENANT", "t2")],
    )
    .success()
    .json();
    assert_eq!(other, json!([]));
}

#[test]
fn secgroup_of_another_tenant_is_not_found() {
    let s = Server::start();
    let web1 = add_instance(&s, "web1", "127.0.0.5", "t1", &[]);
    let own = sg_group(&s, "t1", &web1)["id"]
        .as_str()
        .unwrap()
        .to_string();
    let web = sg(&s, "t1", &["create", "web", "-o", "json"])
        .success()
        .json()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let rule = sg(
        &s,
        "t1",
        &["rule", "add", &web, "--protocol", "tcp", "--port", "22"],
    )
    .success()
    .line();

    for id in [&own, &web, &web1] {
        sg(&s, "t2", &["show", id]).fails_with(&["no security group", id, "HTTP 404"]);
        sg(&s, "t2", &["rule", "add", id, "--protocol", "udp"]).fails_with(&["HTTP 404"]);
    }
    sg(&s, "t2", &["delete", &web]).fails_with(&["HTTP 404"]);
    sg(&s, "t2", &["attach", &web, &web1]).fails_with(&["HTTP 404"]);
    sg(&s, "t2", &["rule", "delete", &rule]).fails_with(&["no security group rule", "HTTP 404"]);
    // Names are looked up in the tenant only.
    for name in ["web", "web1"] {
        sg(&s, "t2", &["show", name])
            .fails_with(&["tenant \"t2\" has no security group or instance named"]);
    }
    let list = sg(&s, "t2", &["list"]).success();
    assert_eq!(rows(&list.stdout).len(), 1, "{}", list.stdout);
    // Nothing changed for t1.
    let held = sg_group(&s, "t1", &web);
    assert_eq!(rule_ids(&held), [rule.as_str()]);
    assert_eq!(held["rules"][0]["protocol"], "tcp");
    assert_eq!(held["instances"], json!([]));
}

#[test]
fn secgroup_default_rules_seed_new_instances() {
    let s = Server::start();
    let early = add_instance(&s, "early", "127.0.0.5", "t1", &[]);
    let ssh = sg(
        &s,
        "t1",
        &[
            "default",
            "add",
            "--protocol",
            "tcp",
            "--port",
            "22",
            "--cidr",
            "192.168.0.0/16",
        ],
    )
    .success()
    .line();
    assert_uuid_v4(&ssh);
    let ping = sg(
        &s,
        "t1",
        &[
            "default",
            "add",
            "--protocol",
            "icmp",
            "--icmp-type",
            "8",
            "-o",
            "json",
        ],
    )
    .success()
    .json();
    assert_eq!(ping["protocol"], "icmp");
    assert_eq!(ping["icmp_type"], 8);
    let ping = ping["id"].as_str().unwrap().to_string();
    sg(
        &s,
        "t1",
        &["default", "add", "--protocol", "icmp", "--icmp-type", "8"],
    )
    .fails_with(&["already has this default rule", &ping]);

    let list = sg(&s, "t1", &["default", "list"]).success();
    let table = rows(&list.stdout);
    assert_eq!(table.len(), 3, "{}", list.stdout);
    assert_eq!(
        table[1],
        [
            ssh.as_str(),
            "ingress",
            "IPv4",
            "tcp",
            "port",
            "22",
            "192.168.0.0/16"
        ]
    );
    assert_eq!(
        table[2],
        [
            ping.as_str(),
            "ingress",
            "IPv4",
            "icmp",
            "type",
            "8",
            "0.0.0.0/0"
        ]
    );
    let defaults = sg(&s, "t1", &["default", "list", "-o", "json"])
        .success()
        .json();
    let defaults: Vec<Value> = defaults.as_array().unwrap().iter().map(matches).collect();
    assert_eq!(defaults.len(), 2);

    // A new instance's own group holds copies of the defaults; one made
    // before keeps what it had.
    let seeded = add_instance(&s, "seeded", "127.0.0.6", "t1", &[]);
    let group = sg(&s, "t1", &["show", "seeded", "-o", "json"])
        .success()
        .json();
    let copied: Vec<Value> = group["rules"]
        .as_array()
        .unwrap()
        .iter()
        .map(matches)
        .collect();
    assert_eq!(copied, defaults);
    assert!(
        !rule_ids(&group).contains(&ssh),
        "copies have their own ids"
    );
    assert_eq!(sg_group(&s, "t1", &early)["rules"], json!([]));
    // Another tenant's instance gets none of them.
    let elsewhere = add_instance(&s, "elsewhere", "127.0.0.7", "t2", &[]);
    assert_eq!(sg_group(&s, "t2", &elsewhere)["rules"], json!([]));
    assert_eq!(
        sg(&s, "t2", &["default", "list", "-o", "json"])
            .success()
            .json(),
        json!([])
    );
    sg(&s, "t2", &["default", "delete", &ssh]).fails_with(&["no default rule", "HTTP 404"]);

    // delete one: later instances get only the other; earlier copies stay.
    let deleted = sg(&s, "t1", &["default", "delete", &ssh]).success();
    assert_eq!(deleted.stdout.trim(), format!("deleted default rule {ssh}"));
    let left = sg(&s, "t1", &["default", "list", "-o", "json"])
        .success()
        .json();
    let left: Vec<&str> = left
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_str().unwrap())
        .collect();
    assert_eq!(left, [ping.as_str()]);
    sg(&s, "t1", &["default", "delete", &ssh]).fails_with(&["HTTP 404"]);
    let later = add_instance(&s, "later", "127.0.0.8", "t1", &[]);
    let rules = sg_group(&s, "t1", &later)["rules"].clone();
    assert_eq!(rules.as_array().unwrap().len(), 1, "{rules}");
    assert_eq!(matches(&rules[0]), defaults[1]);
    assert_eq!(rule_ids(&sg_group(&s, "t1", &seeded)).len(), 2);
}

/// The elements of interface `iface` in a ruleset in nft's language, one
/// string per element; `None` when the interface is not enforced.
fn elements(ruleset: &str, iface: &str) -> Option<Vec<String>> {
    let quoted = format!("\"{iface}\"");
    let found: Vec<String> = ruleset
        .lines()
        .filter(|l| l.starts_with("add element "))
        .flat_map(|l| {
            let inner = &l[l.find('{').unwrap() + 1..l.rfind('}').unwrap()];
            inner
                .split(", ")
                .map(|e| e.trim().to_string())
                .collect::<Vec<_>>()
        })
        .filter(|e| e.contains(&quoted))
        .collect();
    (!found.is_empty()).then_some(found)
}

#[test]
fn firewall_show_and_dry_run_print_the_ruleset() {
    let s = Server::start();
    add_instance(
        &s,
        "web1",
        "127.0.0.5",
        "t1",
        &["--interface", "tap-web1", "--local-ipv4", "10.0.0.5/24"],
    );
    // Without an interface an instance is not enforced: no elements.
    let db1 = add_instance(&s, "db1", "127.0.0.6", "t1", &[]);

    let show = cradle(&s, &["firewall", "show"]).success();
    assert!(show.stderr.contains("not enforced"), "{}", show.stderr);
    assert_eq!(show.stderr.lines().count(), 1, "{}", show.stderr);
    let ruleset = show.stdout.clone();
    assert!(ruleset.starts_with("add table inet cradle\n"), "{ruleset}");
    let web = elements(&ruleset, "tap-web1").unwrap_or_else(|| panic!("no web1: {ruleset}"));
    assert!(!web.iter().any(|e| e.contains("8443")), "{web:?}");
    let ifaces = ruleset
        .lines()
        .find(|l| l.starts_with("add element inet cradle guest_ifaces "))
        .unwrap();
    assert!(
        !ifaces.contains(&db1) && ifaces.matches('"').count() == 2,
        "{ifaces}"
    );

    let whole = cradle(&s, &["firewall", "show", "-o", "json"])
        .success()
        .json();
    assert_eq!(whole["enforced"], false);
    assert_eq!(whole["dirty"], false);
    assert_eq!(whole["table"], "cradle");
    assert_eq!(whole["ruleset"], ruleset);

    // A rule in web1's own group shows up in its chain.
    sg(
        &s,
        "t1",
        &["rule", "add", "web1", "--protocol", "tcp", "--port", "8443"],
    )
    .success();
    let dry = cradle(&s, &["firewall", "apply", "--dry-run"]).success();
    assert!(dry.stderr.contains("dry run"), "{}", dry.stderr);
    let dry = dry.stdout;
    let web = elements(&dry, "tap-web1").unwrap();
    assert!(
        web.iter().any(|e| e == "\"tap-web1\" . 6 . 8443"),
        "no element for port 8443 in {web:?}"
    );
    assert_eq!(cradle(&s, &["firewall", "show"]).success().stdout, dry);
    let dry_json = cradle(&s, &["firewall", "apply", "--dry-run", "-o", "json"])
        .success()
        .json();
    assert_eq!(
        dry_json,
        json!({"applied": false, "enforced": false, "ruleset": dry})
    );

    // A guest whose link-local address is not its mac's (RFC 7217): the
    // registered one may be sent from; a global one is refused for it.
    cradle(
        &s,
        &[
            "instance",
            "add",
            "web3",
            "--metadata-address",
            "127.0.0.9",
            "--project",
            "t1",
            "--interface",
            "tap-web3",
            "--link-local-ipv6",
            "2001:db8::7",
        ],
    )
    .fails_with(&["link_local_ipv6", "not a link-local address", "HTTP 422"]);
    add_instance(
        &s,
        "web3",
        "127.0.0.9",
        "t1",
        &[
            "--interface",
            "tap-web3",
            "--link-local-ipv6",
            "fe80::1c2b:3a4d:5e6f:7081",
        ],
    );
    let shown = cradle(&s, &["firewall", "show"]).success().stdout;
    let src6 = shown
        .lines()
        .find(|l| l.starts_with("add element inet cradle src6 "))
        .unwrap();
    assert!(
        src6.contains("\"tap-web3\" . ") && src6.contains(" . fe80::1c2b:3a4d:5e6f:7081"),
        "{src6}"
    );
    let show = cradle(&s, &["instance", "show", "web3"]).success().stdout;
    assert!(show.contains("fe80::1c2b:3a4d:5e6f:7081"), "{show}");

    // The harness runs serve with the firewall off: applying is refused.
    let r = cradle(&s, &["firewall", "apply"]).fails_with(&[
        "firewall is off",
        "--dry-run",
        "HTTP 409",
    ]);
    assert_eq!(r.stdout, "");
}

#[test]
fn secgroup_help_answers_the_questions() {
    let help = |args: &[&str]| {
        let out = cradle_command().args(args).arg("--help").output().unwrap();
        assert!(out.status.success());
        String::from_utf8(out.stdout).unwrap()
    };
    let top = help(&[]);
    assert!(
        top.contains("secgroup") && top.contains("firewall"),
        "{top}"
    );
    let add = help(&["secgroup", "rule", "add"]);
    for needle in [
        "--tenant <TENANT>",
        "CRADLE_TENANT",
        "--ports <FROM-TO>",
        "--remote-group <GROUP>",
        "--icmp-type",
        "Examples:",
    ] {
        assert!(add.contains(needle), "no {needle:?} in:\n{add}");
    }
    let sg = help(&["secgroup"]);
    for needle in ["default", "attach", "detach", "--interface"] {
        assert!(sg.contains(needle), "no {needle:?} in:\n{sg}");
    }
    let fw = help(&["firewall", "apply"]);
    assert!(fw.contains("--dry-run"), "{fw}");
}
