//! The security-group API: every validation error, tenant isolation, the
//! extension switch, and groups living and dying with their instances,
//! against a running server.

use cradle_secgroups::RuleRequest;
use cradle_secgroups::api::{GroupPatch, GroupRequest, TroveRuleRequest};
use serde_json::{Value, json};

use crate::admin::{assert_error, fetch_body, typed};
use crate::harness::*;

fn instance(s: &Server, name: &str, tenant: &str, addr: &str) -> String {
    let v = s.admin().create(&json!({
        "name": name, "project_id": tenant, "metadata_address": addr,
    }));
    v["id"].as_str().unwrap().to_string()
}

/// A native rule: the typed request when `rule` reads as one, else `rule`
/// as raw text (wrong types, unknown fields).
fn add_rule(s: &Server, tenant: &str, group: &str, rule: Value) -> Answer {
    fetch_body(&s.admin(), &rule.to_string(), |r: &RuleRequest| {
        route::add_rule(tenant, group, r)
    })
}

/// A Trove rule, `rule` being what goes in its `security_group_rule`: the
/// typed request when it reads as one, else raw text in the same envelope.
fn trove_rule(s: &Server, tenant: &str, rule: Value) -> Answer {
    match serde_json::from_value::<TroveRuleRequest>(rule.clone()) {
        Ok(r) => s.admin().fetch(route::trove_add_rule(tenant, &r)),
        Err(_) => s.admin().fetch_raw(
            route::trove_add_rule(tenant, &TroveRuleRequest::default()),
            &json!({ "security_group_rule": rule }).to_string(),
        ),
    }
}

/// Create a shared group of `tenant` from `body`: the typed request when it
/// reads as one, else `body` as raw text.
fn create_group(s: &Server, tenant: &str, body: &str) -> Answer {
    fetch_body(&s.admin(), body, |g: &GroupRequest| {
        route::create_security_group(tenant, g)
    })
}

#[test]
fn every_bad_rule_is_a_400_naming_the_problem() {
    let s = Server::start();
    let id = instance(&s, "v", "t1", "127.0.0.9");
    let g = sg_group(&s, "t1", &id)["id"].as_str().unwrap().to_string();
    let cases = [
        (json!({"cidr": "10.0.0.1/24"}), "host bits"),
        (json!({"cidr": "10.0.0.0/33"}), "not a CIDR"),
        (json!({"cidr": "banana"}), "not a CIDR"),
        (
            json!({"protocol": "tcp", "from_port": 0}),
            "outside 1..65535",
        ),
        (
            json!({"protocol": "tcp", "from_port": 70000}),
            "outside 1..65535",
        ),
        (
            json!({"protocol": "udp", "from_port": 90, "to_port": 80}),
            "reversed",
        ),
        (
            json!({"protocol": "icmp", "icmp_type": 300}),
            "outside 0..255",
        ),
        (
            json!({"protocol": "icmp", "icmp_type": 8, "icmp_code": 256}),
            "outside 0..255",
        ),
        (
            json!({"protocol": "icmp", "icmp_code": 1}),
            "needs an icmp_type",
        ),
        (json!({"protocol": "sctp"}), "unknown protocol"),
        (
            json!({"protocol": "any", "from_port": 22}),
            "ports need protocol tcp or udp",
        ),
        (json!({"protocol": "icmp", "from_port": 22}), "has no ports"),
        (
            json!({"protocol": "tcp", "icmp_type": 8}),
            "need protocol icmp",
        ),
        (json!({"protocol": "icmp", "cidr": "::/0"}), "use icmpv6"),
        (
            json!({"ethertype": "IPv6", "cidr": "10.0.0.0/8"}),
            "IPv4 network",
        ),
        (json!({"direction": "both"}), "not ingress or egress"),
        (json!({"from_port": "22", "protocol": "tcp"}), "from_port"),
        (
            json!({"cidr": "10.0.0.0/8", "remote_group_id": g}),
            "not both",
        ),
        (json!({"remote_group_id": "nope"}), "not a group id"),
        (json!({"portz": 1}), "portz"),
    ];
    for (body, needle) in cases {
        let a = add_rule(&s, "t1", &g, body.clone());
        assert_eq!(a.status, 400, "{body}: {}", a.text());
        let e = assert_error(&a, 400, "invalid", &[]);
        assert!(e.contains(needle), "{body}: {e:?} lacks {needle:?}");
    }
    // None of them landed.
    assert_eq!(sg_group(&s, "t1", &id)["rules"], json!([]));

    // A good one, then the same again: 409.
    let rule = json!({"protocol": "tcp", "from_port": 22, "to_port": 22, "cidr": "10.0.0.0/8"});
    assert_eq!(add_rule(&s, "t1", &g, rule.clone()).status, 201);
    assert_error(
        &add_rule(&s, "t1", &g, rule),
        409,
        "conflict",
        &["already has this rule"],
    );
    // The Trove body gets the same checks.
    let a = trove_rule(&s, "t1", json!({"group_id": g, "cidr": "10.0.0.1/8"}));
    assert_error(&a, 400, "invalid", &["host bits"]);
    let a = trove_rule(
        &s,
        "t1",
        json!({"group_id": g, "protocol": "tcp", "from_port": "x"}),
    );
    assert_error(&a, 400, "invalid", &["from_port"]);
    // A group of another tenant as the remote is refused.
    let other = instance(&s, "w", "t2", "127.0.0.10");
    let other_group = sg_group(&s, "t2", &other)["id"]
        .as_str()
        .unwrap()
        .to_string();
    let a = add_rule(&s, "t1", &g, json!({"remote_group_id": other_group}));
    assert_error(&a, 400, "invalid", &["remote_group_id"]);
}

#[test]
fn an_interface_belongs_to_one_instance() {
    let s = Server::start();
    let spec = |name: &str, addr: &str| {
        typed(&json!({"name": name, "metadata_address": addr, "interface": "tap7"}))
    };
    assert_eq!(
        s.admin()
            .fetch(route::create_instance(&spec("a", "127.0.0.51")))
            .status,
        201
    );
    let b = s
        .admin()
        .fetch(route::create_instance(&spec("b", "127.0.0.52")));
    assert_error(&b, 409, "conflict", &["interface"]);
    let bad = json!({"name": "c", "metadata_address": "127.0.0.53", "interface": "tap 7"});
    let c = s.admin().fetch(route::create_instance(&typed(&bad)));
    assert_error(&c, 422, "invalid", &["interface"]);
}

#[test]
fn rules_per_group_are_capped() {
    let s = Server::start_with(Opts {
        env: &[("CRADLE_SECURITY_GROUPS_MAX_RULES_PER_GROUP", "3")],
        ..Default::default()
    });
    let id = instance(&s, "v", "t1", "127.0.0.9");
    for port in 1..=3 {
        let a = add_rule(&s, "t1", &id, json!({"protocol": "tcp", "from_port": port}));
        assert_eq!(a.status, 201, "{}", a.text());
    }
    let a = add_rule(&s, "t1", &id, json!({"protocol": "tcp", "from_port": 4}));
    assert_error(&a, 409, "quota", &["3 rules"]);
}

#[test]
fn tenants_see_only_their_own_groups() {
    let s = Server::start();
    let a1 = instance(&s, "a1", "t1", "127.0.0.11");
    let b1 = instance(&s, "b1", "t2", "127.0.0.12");
    let g_b1 = sg_group(&s, "t2", &b1)["id"].as_str().unwrap().to_string();

    // Lists are per tenant.
    let list = |req: Request<Value>| {
        let a = s.admin().fetch(req);
        assert_eq!(a.status, 200);
        a.json()["security_groups"]
            .as_array()
            .unwrap()
            .iter()
            .map(|g| g["instance_id"].as_str().unwrap().to_string())
            .collect::<Vec<_>>()
    };
    assert_eq!(
        list(route::security_groups("t1").as_json()),
        std::slice::from_ref(&a1)
    );
    assert_eq!(
        list(route::trove_security_groups("t1").as_json()),
        std::slice::from_ref(&a1)
    );
    assert_eq!(
        list(route::trove_security_groups("t2").as_json()),
        std::slice::from_ref(&b1)
    );

    // Another tenant's group, by group id or instance id, is 404 on both APIs.
    for req in [
        route::trove_security_group("t1", &g_b1).as_json(),
        route::trove_security_group("t1", &b1).as_json(),
        route::security_group("t1", &g_b1).as_json(),
    ] {
        assert_error(&s.admin().fetch(req), 404, "not_found", &[]);
    }
    // Nor can it add, and then delete, rules there.
    let a = trove_rule(&s, "t1", json!({"group_id": g_b1, "cidr": "10.0.0.0/8"}));
    assert_error(&a, 404, "not_found", &[]);
    let rule = add_rule(&s, "t2", &g_b1, json!({"cidr": "10.0.0.0/8"})).json()["security_group_rule"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let a = s.admin().fetch(route::trove_delete_rule("t1", &rule));
    assert_error(&a, 404, "not_found", &[]);
    assert_eq!(
        sg_group(&s, "t2", &b1)["rules"].as_array().unwrap().len(),
        1
    );
    // Nor attach its own group to the other tenant's instance.
    let (st, body) = {
        let a = create_group(&s, "t1", r#"{"name":"web"}"#);
        (a.status, a.json())
    };
    assert_eq!(st, 201);
    let web = body["security_group"]["id"].as_str().unwrap().to_string();
    let a = s.admin().fetch(route::attach_group("t1", &web, &b1));
    assert_error(&a, 404, "not_found", &[]);
    assert_eq!(
        s.admin().fetch(route::attach_group("t1", &web, &a1)).status,
        204
    );
    // An instance id as the remote means its own group, as in paths.
    let r = add_rule(
        &s,
        "t1",
        &web,
        json!({"remote_group_id": a1, "protocol": "tcp", "from_port": 5}),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(
        r.json()["security_group_rule"]["remote_group_id"],
        sg_group(&s, "t1", &a1)["id"]
    );
    // Trove's delete of the tenant's own rule works: 204.
    let r =
        add_rule(&s, "t1", &a1, json!({"cidr": "10.0.0.0/8"})).json()["security_group_rule"]["id"]
            .as_str()
            .unwrap()
            .to_string();
    assert_eq!(
        s.admin().fetch(route::trove_delete_rule("t1", &r)).status,
        204
    );
}

#[test]
fn groups_live_and_die_with_their_instances_and_defaults_seed_them() {
    let s = Server::start();
    let d = s.admin().fetch(route::add_default_rule(
        "t1",
        &typed(&json!({"protocol": "tcp", "from_port": 22, "cidr": "10.0.0.0/8"})),
    ));
    assert_eq!(d.status, 201, "{}", d.text());
    let default_id = d.json()["default_rule"]["id"].as_str().unwrap().to_string();
    let a = instance(&s, "a", "t1", "127.0.0.21");
    let g = sg_group(&s, "t1", &a);
    assert_eq!(g["name"], format!("cradle-sg-{a}"));
    assert_eq!(g["rules"].as_array().unwrap().len(), 1);
    assert_eq!(g["rules"][0]["from_port"], 22);
    assert_eq!(g["instances"], json!([a]));
    // Removing the default leaves existing groups as they are.
    assert_eq!(
        s.admin()
            .fetch(route::delete_default_rule("t1", &default_id))
            .status,
        204
    );
    assert_eq!(sg_group(&s, "t1", &a)["rules"].as_array().unwrap().len(), 1);
    let b = instance(&s, "b", "t1", "127.0.0.22");
    assert_eq!(sg_group(&s, "t1", &b)["rules"], json!([]));

    // An instance group cannot be deleted, attached elsewhere, or named like one.
    let ga = g["id"].as_str().unwrap();
    assert_error(
        &s.admin().fetch(route::delete_security_group("t1", ga)),
        409,
        "in_use",
        &["belongs to instance"],
    );
    assert_error(
        &s.admin().fetch(route::attach_group("t1", ga, &b)),
        400,
        "invalid",
        &["own group"],
    );
    assert_error(
        &create_group(&s, "t1", r#"{"name":"cradle-sg-x"}"#),
        400,
        "invalid",
        &["cradle-sg-"],
    );

    // A shared group with a rule sourced from a's group, attached to b: in
    // use until detached and the rule is gone with a.
    let web =
        create_group(&s, "t1", r#"{"name":"web","description":"shared"}"#).json()["security_group"]
            ["id"]
            .as_str()
            .unwrap()
            .to_string();
    // Renamed and described; instance groups stay as they are.
    let patch = |id: &str, body: &str| {
        fetch_body(&s.admin(), body, |p: &GroupPatch| {
            route::update_security_group("t1", id, p)
        })
    };
    let renamed = patch(&web, r#"{"name":"www","description":"front"}"#);
    assert_eq!(renamed.status, 200, "{}", renamed.text());
    assert_eq!(renamed.json()["security_group"]["name"], "www");
    assert_eq!(sg_group(&s, "t1", &web)["description"], "front");
    assert_eq!(patch(&web, r#"{"name":"web"}"#).status, 200);
    assert_error(
        &patch(ga, r#"{"description":"x"}"#),
        409,
        "in_use",
        &["fixed"],
    );
    assert_error(&patch(&web, r#"{"name":""}"#), 400, "invalid", &["name"]);
    assert_error(
        &patch(&web, r#"{"colour":"red"}"#),
        400,
        "invalid",
        &["colour"],
    );
    assert_error(
        &create_group(&s, "t1", r#"{"name":"web"}"#),
        409,
        "conflict",
        &["web"],
    );
    assert_eq!(
        add_rule(
            &s,
            "t1",
            &web,
            json!({"remote_group_id": ga, "protocol": "udp"})
        )
        .status,
        201
    );
    assert_eq!(
        s.admin().fetch(route::attach_group("t1", &web, &b)).status,
        204
    );
    assert_error(
        &s.admin().fetch(route::attach_group("t1", &web, &b)),
        409,
        "conflict",
        &["already attached"],
    );
    let of_b = s.admin().fetch(route::instance_groups(&b)).json();
    let names: Vec<&str> = of_b["security_groups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, [format!("cradle-sg-{b}").as_str(), "web"]);
    assert_error(
        &s.admin().fetch(route::delete_security_group("t1", &web)),
        409,
        "in_use",
        &["attached"],
    );
    assert_eq!(s.admin().fetch(route::remove_instance(&a)).status, 204);
    let web_now = sg_group(&s, "t1", &web);
    assert_eq!(
        web_now["rules"],
        json!([]),
        "the rule sourced from a's group went with a"
    );
    assert_error(
        &s.admin().fetch(route::security_group("t1", ga)),
        404,
        "not_found",
        &[],
    );
    assert_eq!(
        s.admin().fetch(route::detach_group("t1", &web, &b)).status,
        204
    );
    assert_eq!(
        s.admin()
            .fetch(route::delete_security_group("t1", &web))
            .status,
        204
    );
    // A tenant change would strand the instance's groups.
    let a = s.admin().fetch(route::modify_instance(
        &b,
        &typed(&json!({"project_id": "t9"})),
    ));
    assert_error(&a, 422, "invalid", &["project_id"]);
}

#[test]
fn groups_survive_a_restart() {
    let mut s = Server::start();
    let a = instance(&s, "a", "t1", "127.0.0.31");
    assert_eq!(
        add_rule(&s, "t1", &a, json!({"protocol": "icmp", "icmp_type": 8})).status,
        201
    );
    let before = sg_group(&s, "t1", &a);
    let data_dir = s.data_dir.clone();
    s.stop();
    let s = Server::start_with(Opts {
        data_dir: Some(&data_dir),
        ..Default::default()
    });
    assert_eq!(sg_group(&s, "t1", &a), before);
}

#[test]
fn the_extension_switch_turns_every_route_off() {
    let mut s = Server::start_with(Opts {
        env: &[("CRADLE_SECURITY_GROUPS_ENABLED", "false")],
        ..Default::default()
    });
    let a = instance(&s, "a", "t1", "127.0.0.41");
    let rule = TroveRuleRequest {
        group_id: a.clone(),
        cidr: Some("10.0.0.0/8".into()),
        ..Default::default()
    };
    let group = GroupRequest {
        name: "x".into(),
        ..Default::default()
    };
    for req in [
        route::trove_security_groups("t1").as_json(),
        route::trove_security_group("t1", &a).as_json(),
        route::trove_add_rule("t1", &rule).as_json(),
        route::trove_delete_rule("t1", &a).as_json(),
        route::security_groups("t1").as_json(),
        route::create_security_group("t1", &group).as_json(),
        route::default_rules("t1").as_json(),
        route::instance_groups(&a).as_json(),
        route::firewall().as_json(),
        route::apply_firewall(true).as_json(),
    ] {
        let r = s.admin().fetch(req);
        assert_error(&r, 404, "not_found", &[]);
    }
    // Turned on later, the instance made while it was off gets its group.
    let data_dir = s.data_dir.clone();
    s.stop();
    let s = Server::start_with(Opts {
        data_dir: Some(&data_dir),
        ..Default::default()
    });
    assert_eq!(sg_group(&s, "t1", &a)["name"], format!("cradle-sg-{a}"));
}

/// Found by schemathesis: serde fills a struct from a JSON array, so
/// `[null, null]` posted as a rule made one open to everything. Every body
/// must be an object.
#[test]
fn a_body_that_is_not_an_object_is_refused_and_changes_nothing() {
    let s = Server::start();
    let id = instance(&s, "v", "t1", "127.0.0.9");
    let before = sg_group(&s, "t1", &id);
    for body in ["[null, null]", "[]", "42", "\"rule\"", "null"] {
        // Sent as written: the typed client would make an object of it.
        let admin = s.admin();
        for a in [
            admin.fetch_raw(route::add_rule("t1", &id, &Default::default()), body),
            admin.fetch_raw(
                route::create_security_group("t1", &GroupRequest::default()),
                body,
            ),
            admin.fetch_raw(route::create_instance(&Default::default()), body),
        ] {
            assert_eq!(a.status, 422, "{body}: {}", a.text());
            assert!(a.text().contains("must be a JSON object"), "{}", a.text());
        }
    }
    assert_eq!(sg_group(&s, "t1", &id), before);
    assert_eq!(s.admin().send(route::instances()).len(), 1);
    // Malformed JSON stays a 400.
    let a = create_group(&s, "t1", "[nul");
    assert_eq!(a.status, 400, "{}", a.text());
}

/// Found by schemathesis: a rule as the API answers it (its fields and its
/// id) did not fit the document's schema, which refused every field the
/// request type does not have. The answers are checked against
/// docs/openapi.json with Debian's python3-jsonschema.
#[test]
fn answers_fit_the_committed_openapi_document() {
    let s = Server::start();
    let id = instance(&s, "v", "t1", "127.0.0.9");
    let rule = add_rule(&s, "t1", &id, json!({"protocol": "tcp", "from_port": 22}));
    assert_eq!(rule.status, 201, "{}", rule.text());
    let default = s
        .admin()
        .fetch_raw(route::add_default_rule("t1", &Default::default()), "{}");
    assert_eq!(default.status, 201, "{}", default.text());
    let metrics = s.admin().fetch(route::metrics());
    let doc: Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../docs/openapi.json"
        ))
        .unwrap(),
    )
    .unwrap();
    let content = |path: &str, method: &str, status: &str| {
        doc["paths"][path][method]["responses"][status]["content"].clone()
    };
    let checks = json!([
        [
            content(
                "/v1/tenants/{tenant}/security-groups/{id}/rules",
                "post",
                "201"
            )["application/json"]["schema"],
            rule.json()
        ],
        [
            content("/v1/tenants/{tenant}/default-rules", "post", "201")["application/json"]["schema"],
            default.json()
        ],
    ]);
    let out = python(
        r#"
import json, sys, jsonschema
doc = json.load(open(sys.argv[1]))
for schema, value in json.loads(sys.argv[2]):
    schema = dict(schema, components=doc["components"])
    jsonschema.validate(value, schema, cls=jsonschema.Draft202012Validator)
print("ok")
"#,
        &[
            concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/openapi.json"),
            &checks.to_string(),
        ],
    );
    assert_eq!(out.trim(), "ok");
    // The server serves that very document.
    let served = s
        .admin()
        .fetch(route::unlisted(reqwest::Method::GET, "/v1/openapi.json"));
    assert_eq!(served.status, 200);
    assert_eq!(served.json(), doc);
    // And /metrics answers the content type the document declares.
    let declared = content("/metrics", "get", "200");
    let served = metrics
        .headers
        .get("content-type")
        .unwrap()
        .to_str()
        .unwrap();
    assert!(declared.get(served).is_some(), "{served} not in {declared}");
}
