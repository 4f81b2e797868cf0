//! Random JSON rule bodies, read as the admin API reads them
//! (`serde_path_to_error` into `RuleRequest`, then `validate`, as
//! crates/cradle-admin/src/secgroups.rs does): each is either an error
//! that names a field the body has (the API's 400), or a rule whose
//! rendering in a full plan `nft -c -f -` accepts. `nft -c` changes
//! nothing, but needs root (CAP_NET_ADMIN) and nftables installed.
//!
//! Cases per property: `CRADLE_FUZZ_CASES` (`cargo xtask fuzz` sets it and
//! `PROPTEST_RNG_SEED`); the default keeps `cargo test` quick.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::process::{Command, Stdio};

use cradle_secgroups::nft::Firewall;
use cradle_secgroups::{Enforced, Members, Remote, RuleRequest, RuleSpec};
use proptest::prelude::*;
use serde_json::{Map, Value, json};
use uuid::Uuid;

/// `RuleRequest`'s fields, the only names an error may give.
const FIELDS: &[&str] = &[
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

fn cases(default: u32) -> ProptestConfig {
    let cases = std::env::var("CRADLE_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default);
    ProptestConfig {
        cases,
        ..ProptestConfig::default()
    }
}

fn number() -> impl Strategy<Value = Value> {
    prop_oneof![
        prop::sample::select(vec![0i64, 1, 22, 255, 256, 443, 65535, 65536, -1, i64::MIN])
            .prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        Just(json!(u64::MAX)),
        Just(json!(1.5)),
    ]
}

fn word() -> impl Strategy<Value = Value> {
    prop_oneof![
        prop::sample::select(vec![
            "ingress",
            "EGRESS",
            "IPv4",
            "ipv6",
            "IPV6",
            "tcp",
            "UDP",
            "icmp",
            "icmpv6",
            "ipv6-icmp",
            "any",
            "all",
            "sctp",
            "",
            " tcp",
        ])
        .prop_map(|s| json!(s)),
        any::<String>().prop_map(Value::String),
    ]
}

fn cidr() -> impl Strategy<Value = Value> {
    prop_oneof![
        prop::sample::select(vec![
            "0.0.0.0/0",
            "::/0",
            "10.0.0.0/8",
            "10.0.0.1/8",
            "10.1.2.3",
            "192.168.1.0/24",
            "2001:db8::/32",
            "2001:db8::1/128",
            "fe80::1",
            "::ffff:10.0.0.0/104",
            "10.0.0.0/33",
            "1.2.3.4/0",
            "::1/129",
            "not-a-cidr",
            "",
        ])
        .prop_map(|s| json!(s)),
        (any::<[u8; 4]>(), 0u8..=32).prop_map(|(a, p)| {
            let net = ipnet::Ipv4Net::new(Ipv4Addr::from(a), p).unwrap().trunc();
            json!(net.to_string())
        }),
        (any::<[u8; 16]>(), 0u8..=128).prop_map(|(a, p)| {
            let net = ipnet::Ipv6Net::new(Ipv6Addr::from(a), p).unwrap().trunc();
            json!(net.to_string())
        }),
    ]
}

fn field_value(field: &'static str) -> BoxedStrategy<Value> {
    let typical = match field {
        "from_port" | "to_port" | "icmp_type" | "icmp_code" => number().boxed(),
        "cidr" => cidr().boxed(),
        "remote_group_id" => prop_oneof![
            any::<u128>().prop_map(|n| json!(Uuid::from_u128(n).to_string())),
            Just(json!("not-a-uuid")),
        ]
        .boxed(),
        _ => word().boxed(),
    };
    prop_oneof![
        8 => typical,
        1 => Just(Value::Null),
        1 => prop_oneof![
            any::<bool>().prop_map(Value::Bool),
            Just(json!([])),
            Just(json!({})),
            number(),
            word(),
        ],
    ]
    .boxed()
}

/// Any rule the model can hold (some combinations, such as icmp over
/// IPv6, are ones `validate` refuses).
fn spec() -> impl Strategy<Value = RuleSpec> {
    use cradle_secgroups::{Direction, EtherType, Match, Protocol};
    let matches = prop_oneof![
        Just(Match::All),
        (any::<u16>(), any::<u16>()).prop_map(|(a, b)| Match::Ports {
            from: a.min(b),
            to: a.max(b)
        }),
        (any::<u8>(), prop::option::of(any::<u8>()))
            .prop_map(|(icmp_type, code)| Match::Icmp { icmp_type, code }),
    ];
    let remote = prop_oneof![
        cidr().prop_filter_map("a CIDR", |c| c.as_str()?.parse().ok().map(Remote::Cidr)),
        any::<u128>().prop_map(|n| Remote::Group(Uuid::from_u128(n))),
    ];
    (
        prop::sample::select(vec![Direction::Ingress, Direction::Egress]),
        prop::sample::select(vec![EtherType::IPv4, EtherType::IPv6]),
        prop::sample::select(vec![
            Protocol::Tcp,
            Protocol::Udp,
            Protocol::Icmp,
            Protocol::Icmpv6,
            Protocol::Any,
        ]),
        matches,
        remote,
    )
        .prop_map(
            |(direction, ethertype, protocol, matches, remote)| RuleSpec {
                direction,
                ethertype,
                protocol,
                matches,
                remote,
            },
        )
}

/// A rule body: objects of `RuleRequest`'s fields (a rule's own request,
/// perhaps with one field changed, or fields drawn at random), sometimes
/// an unknown one, sometimes not an object at all.
fn body() -> impl Strategy<Value = Value> {
    let changed = prop::option::of(
        prop::sample::select(FIELDS.to_vec())
            .prop_flat_map(|f| (Just(f.to_string()), field_value(f))),
    );
    let from_spec = (spec(), changed).prop_map(|(spec, changed)| {
        let mut v = serde_json::to_value(spec.to_request()).unwrap();
        if let Some((k, x)) = changed {
            v[k] = x;
        }
        v
    });
    let field = prop::sample::select(FIELDS.to_vec())
        .prop_flat_map(|f| (Just(f.to_string()), field_value(f)));
    let unknown = ("[a-z_]{1,12}", word());
    prop_oneof![
        10 => from_spec,
        10 => (prop::collection::vec(field, 0..6), prop::option::of(unknown)).prop_map(
            |(fields, unknown)| {
                let mut m: Map<String, Value> = fields.into_iter().collect();
                if let Some((k, v)) = unknown {
                    m.insert(k, v);
                }
                Value::Object(m)
            }
        ),
        1 => prop_oneof![Just(json!([])), Just(json!(null)), Just(json!("tcp")), number()],
    ]
}

/// What the admin API makes of a body: the rule, or the field it names in
/// its 400 (`None`: the body is not an object, so there is no field).
fn read(body: &Value) -> Result<RuleSpec, Option<String>> {
    let request: RuleRequest = match serde_path_to_error::deserialize(body.clone()) {
        Ok(r) => r,
        Err(e) => {
            let path = e.path().to_string();
            if !matches!(path.as_str(), "" | ".") {
                return Err(Some(path));
            }
            let msg = e.into_inner().to_string();
            // Serde names an unknown field in its message, not the path.
            return Err(msg
                .strip_prefix("unknown field `")
                .and_then(|rest| rest.split('`').next())
                .map(String::from));
        }
    };
    request.validate().map_err(|e| Some(e.field))
}

/// `nft -c -f -` on `text`: Ok, or what nft said.
fn nft_check(text: &str) -> Result<(), String> {
    let mut child = Command::new("nft")
        .args(["-c", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("nft must be installed (apt-get install nftables): {e}"));
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// Check what each body gives; render the valid rules as one instance's
/// and have nft check the whole table.
fn check(bodies: &[Value]) -> Result<(), TestCaseError> {
    let mut rules = BTreeSet::new();
    for body in bodies {
        match read(body) {
            Ok(rule) => {
                rules.insert(rule);
            }
            Err(Some(field)) => {
                prop_assert!(
                    body.get(&field).is_some(),
                    "the error names {:?}, which {} does not have",
                    field,
                    body
                );
            }
            Err(None) => prop_assert!(!body.is_object(), "no field named for {}", body),
        }
    }
    if rules.is_empty() {
        return Ok(());
    }
    let mut groups = BTreeMap::new();
    for r in &rules {
        if let Remote::Group(g) = r.remote {
            groups.insert(
                g,
                Members {
                    ipv4: BTreeSet::from([Ipv4Addr::new(10, 9, 0, 3)]),
                    ipv6: BTreeSet::from(["fd00:9::3".parse().unwrap()]),
                },
            );
        }
    }
    let instance = Enforced {
        instance: Uuid::from_u128(1),
        interface: "tap-fuzz0".into(),
        mac: [0x02, 0, 0, 0, 0, 1],
        ipv4: BTreeSet::from([Ipv4Addr::new(10, 9, 0, 2)]),
        ipv6: BTreeSet::from(["fd00:9::2".parse().unwrap()]),
        rules: rules.into_iter().collect(),
    };
    let plan = Firewall::new("cradle_fuzz")
        .plan_full(vec![instance.clone()], &groups)
        .unwrap();
    let text = plan.text();
    if let Err(e) = nft_check(&text) {
        prop_assert!(
            false,
            "nft refuses the rules {:?}:\n{}\n{}",
            instance.rules,
            e,
            text
        );
    }
    Ok(())
}

mod fuzz {
    use super::*;

    proptest! {
        #![proptest_config(cases(32))]

        #[test]
        fn a_rules_own_request_reads_back_as_the_rule_or_names_a_field(rule in spec()) {
            let body = serde_json::to_value(rule.to_request()).unwrap();
            match read(&body) {
                Ok(back) => prop_assert_eq!(back, rule),
                Err(field) => prop_assert!(
                    field.as_ref().is_some_and(|f| body.get(f).is_some_and(|v| !v.is_null())),
                    "{:?} for {}", field, body
                ),
            }
        }

        #[test]
        fn rule_bodies_are_a_400_naming_a_field_or_rules_nft_accepts(
            bodies in prop::collection::vec(body(), 1..8),
        ) {
            check(&bodies)?;
        }
    }
}

/// Found by the fuzzer: ports on a protocol without them were refused
/// naming `from_port` when only `to_port` was given, and a lone `to_port`
/// out of range was blamed on `from_port`; a lone `icmp_code` on tcp was
/// blamed on `icmp_type`.
#[test]
fn an_error_names_the_field_the_body_has() {
    for (body, field) in [
        (json!({"protocol": "icmp", "to_port": 5}), "to_port"),
        (json!({"protocol": "any", "to_port": 5}), "to_port"),
        (json!({"protocol": "tcp", "to_port": 0}), "to_port"),
        (json!({"protocol": "tcp", "icmp_code": 0}), "icmp_code"),
        (json!({"protocol": "icmp", "from_port": 5}), "from_port"),
    ] {
        assert_eq!(read(&body), Err(Some(field.to_string())), "{body}");
    }
}
