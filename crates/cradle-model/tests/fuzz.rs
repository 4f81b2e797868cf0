//! The guest agent's channel messages, as both ends parse them: the host's
//! `FromAgent::parse` and `HostKey::parse`, and the guest's `ToAgent`.
//! Random, generated and mutated bodies never panic either side, and each
//! is an error, "not the agent's", or a message that is well-formed (it
//! passes the checks and reads back as itself once serialized).
//!
//! Cases per property: `CRADLE_FUZZ_CASES` (`cargo xtask fuzz` sets it and
//! `PROPTEST_RNG_SEED`); the default keeps `cargo test` quick.

use cradle_model::agent::{FromAgent, HostKey, MAX_FIELD, ToAgent};
use proptest::prelude::*;
use serde_json::{Map, Value, json};

/// The tags `FromAgent::parse` takes as the guest agent's.
const KINDS: &[&str] = &["guest", "host_keys", "action_result", "action_refused"];

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

fn b64(data: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(data)
}

/// A host key line: well-formed, or with its type, blob or length wrong.
fn host_key_line() -> impl Strategy<Value = String> {
    let kind = prop::sample::select(vec![
        "ssh-ed25519",
        "ecdsa-sha2-nistp256",
        "ssh-rsa",
        "ssh-dss",
        "",
    ]);
    (
        kind,
        any::<bool>(),
        prop::collection::vec(any::<u8>(), 0..40),
        prop::option::of(any::<u32>()),
    )
        .prop_map(|(kind, same, tail, len)| {
            let named = if same { kind } else { "ssh-ed25519x" };
            let mut blob = Vec::new();
            let n = len.unwrap_or(named.len() as u32);
            blob.extend_from_slice(&n.to_be_bytes());
            blob.extend_from_slice(named.as_bytes());
            blob.extend_from_slice(&tail);
            format!("{kind} {} host", b64(&blob))
        })
}

/// Text around the limits: empty, short, unicode, just over `MAX_FIELD`.
fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        "[a-z0-9._-]{1,20}",
        any::<String>(),
        (0usize..3).prop_map(|d| "é".repeat(MAX_FIELD / 2 - 1 + d)),
        Just("x".repeat(MAX_FIELD + 1)),
    ]
}

/// Any JSON value, nested a little.
fn value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(|f| json!(f)),
        Just(json!(u64::MAX)),
        text().prop_map(Value::String),
        host_key_line().prop_map(Value::String),
        Just(json!("00000000-0000-0000-0000-000000000001")),
        prop::sample::select(vec!["booting", "ready", "failed", "READY"]).prop_map(|s| json!(s)),
    ];
    leaf.prop_recursive(2, 16, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..10).prop_map(Value::Array),
            prop::collection::btree_map("[a-z_]{1,8}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Objects made of the messages' own field names (and a few others) with
/// any values, tagged with one of the kinds, another tag or none.
fn object() -> impl Strategy<Value = Value> {
    let field = prop::sample::select(vec![
        "state",
        "version",
        "kernel",
        "os_release",
        "reason",
        "keys",
        "id",
        "action",
        "exit_code",
        "output",
        "truncated",
        "step",
        "lines",
        "other",
    ]);
    let tag = prop_oneof![
        4 => prop::sample::select(KINDS.to_vec()).prop_map(|t| Some(json!(t))),
        1 => prop::sample::select(vec!["run", "progress", "status", "Guest"])
            .prop_map(|t| Some(json!(t))),
        1 => value().prop_map(Some),
        1 => Just(None),
    ];
    (tag, prop::collection::btree_map(field, value(), 0..8)).prop_map(|(tag, fields)| {
        let mut m: Map<String, Value> = fields
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
        if let Some(t) = tag {
            m.insert("agent".into(), t);
        }
        Value::Object(m)
    })
}

prop_compose! {
    /// A message the agent could send.
    fn valid_message()(
        which in 0u8..4,
        state in prop::sample::select(vec!["booting", "ready", "failed"]),
        words in prop::collection::vec("[a-z0-9 ]{0,30}", 3),
        reason in prop::option::of("[a-zé ]{0,40}"),
        id in any::<u128>(),
        action in "[a-z0-9][a-z0-9._-]{0,20}",
        exit_code in any::<i32>(),
        output in any::<String>(),
        truncated in any::<bool>(),
        keys in prop::collection::vec(any::<[u8; 32]>(), 0..4),
    ) -> Value {
        let id = uuid::Uuid::from_u128(id).to_string();
        match which {
            0 => json!({"agent": "guest", "state": state, "version": words[0],
                        "kernel": words[1], "os_release": words[2], "reason": reason}),
            1 => json!({"agent": "host_keys", "keys": keys.iter().map(|k| {
                let mut blob = 11u32.to_be_bytes().to_vec();
                blob.extend_from_slice(b"ssh-ed25519");
                blob.extend_from_slice(&32u32.to_be_bytes());
                blob.extend_from_slice(k);
                format!("ssh-ed25519 {}", b64(&blob))
            }).collect::<Vec<_>>()}),
            2 => json!({"agent": "action_result", "id": id, "action": action,
                        "exit_code": exit_code, "output": output, "truncated": truncated}),
            _ => json!({"agent": "action_refused", "id": id, "action": action,
                        "reason": words[0]}),
        }
    }
}

/// Byte-level damage: flips, insertions, deletions, a truncation.
#[derive(Debug, Clone)]
enum Edit {
    Flip(usize, u8),
    Insert(usize, u8),
    Delete(usize),
    Truncate(usize),
}

fn edits() -> impl Strategy<Value = Vec<Edit>> {
    let edit = prop_oneof![
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Edit::Flip(i, b)),
        (
            any::<usize>(),
            prop::sample::select(b"\"\\{}[],:0e-\x00\xff ".to_vec())
        )
            .prop_map(|(i, b)| Edit::Insert(i, b)),
        any::<usize>().prop_map(Edit::Delete),
        any::<usize>().prop_map(Edit::Truncate),
    ];
    prop::collection::vec(edit, 1..6)
}

fn mutate(mut body: Vec<u8>, edits: &[Edit]) -> Vec<u8> {
    for e in edits {
        let n = body.len();
        match *e {
            Edit::Flip(i, b) if n > 0 => body[i % n] ^= b.max(1),
            Edit::Insert(i, b) => body.insert(i % (n + 1), b),
            Edit::Delete(i) if n > 0 => {
                body.remove(i % n);
            }
            Edit::Truncate(i) => body.truncate(i % (n + 1)),
            _ => {}
        }
    }
    body
}

/// What both ends must make of `body`, whatever it is.
fn check_both_ends(body: &[u8]) -> Result<(), TestCaseError> {
    // The host: an error, not the agent's, or a well-formed message.
    match FromAgent::parse(body) {
        Ok(Some(m)) => {
            let again = serde_json::to_vec(&m).unwrap();
            prop_assert_eq!(FromAgent::parse(&again), Ok(Some(m)));
        }
        Ok(None) => {
            // Not taken as the agent's: then it must not be a JSON object
            // whose tag is one of the agent's kinds, however it is spelled.
            if let Ok(Value::Object(o)) = serde_json::from_slice::<Value>(body) {
                let tag = o.get("agent").and_then(Value::as_str);
                prop_assert!(
                    !tag.is_some_and(|t| KINDS.contains(&t)),
                    "an agent message ({:?}) was taken as the operator's",
                    tag
                );
            }
        }
        Err(e) => prop_assert!(!e.is_empty()),
    }
    // The guest: a run request that reads back as itself, or an error.
    if let Ok(m) = serde_json::from_slice::<ToAgent>(body) {
        let again = serde_json::to_vec(&m).unwrap();
        prop_assert_eq!(serde_json::from_slice::<ToAgent>(&again).unwrap(), m);
    }
    Ok(())
}

mod fuzz {
    use super::*;

    proptest! {
        #![proptest_config(cases(256))]

        #[test]
        fn any_bytes_are_an_error_or_a_well_formed_message(
            body in prop::collection::vec(any::<u8>(), 0..256),
        ) {
            check_both_ends(&body)?;
        }

        #[test]
        fn generated_objects_are_an_error_or_a_well_formed_message(msg in object()) {
            check_both_ends(&serde_json::to_vec(&msg).unwrap())?;
        }

        #[test]
        fn valid_messages_parse_as_themselves_and_survive_damage(
            msg in valid_message(),
            escape in any::<bool>(),
            damage in edits(),
        ) {
            let mut body = serde_json::to_vec(&msg).unwrap();
            if escape {
                // The same message with its tag's first letter as a JSON
                // escape (`"\u0067uest"`), as any JSON encoder may write it.
                let text = String::from_utf8(body).unwrap();
                let tag = msg["agent"].as_str().unwrap();
                let first = tag.as_bytes()[0];
                body = text
                    .replacen(
                        &format!("\"agent\":\"{tag}\""),
                        &format!("\"agent\":\"\\u{first:04x}{}\"", &tag[1..]),
                        1,
                    )
                    .into_bytes();
            }
            let parsed = FromAgent::parse(&body);
            prop_assert!(matches!(parsed, Ok(Some(_))), "{} gave {:?}", msg, parsed);
            check_both_ends(&body)?;
            check_both_ends(&mutate(body, &damage))?;
        }

        #[test]
        fn run_requests_parse_on_the_guest_and_survive_damage(
            id in any::<u128>(),
            action in any::<String>(),
            damage in edits(),
        ) {
            let m = ToAgent::Run { id: uuid::Uuid::from_u128(id), action };
            let body = serde_json::to_vec(&m).unwrap();
            prop_assert_eq!(serde_json::from_slice::<ToAgent>(&body).unwrap(), m);
            check_both_ends(&mutate(body, &damage))?;
        }

        #[test]
        fn host_key_lines_are_an_error_or_a_key_of_their_type(
            line in prop_oneof![host_key_line(), any::<String>()],
            damage in edits(),
        ) {
            for line in [line.clone(), String::from_utf8_lossy(&mutate(line.into_bytes(), &damage)).into_owned()] {
                if let Ok(k) = HostKey::parse(&line) {
                    prop_assert!(line.split_ascii_whitespace().next() == Some(k.kind.as_str()));
                    prop_assert!(k.fingerprint().starts_with("SHA256:"));
                }
            }
        }
    }
}

/// Found by the fuzzer: a tag written with a JSON escape (`"gu\u0065st"`)
/// could not be borrowed, so the message was taken as the operator's
/// rather than checked as the agent's.
#[test]
fn an_escaped_tag_is_still_the_agents_message() {
    let body = br#"{"agent": "gu\u0065st", "state": "ready"}"#;
    assert!(matches!(
        FromAgent::parse(body),
        Ok(Some(FromAgent::Guest { .. }))
    ));
    let bad = br#"{"agent": "host\u005fkeys", "keys": ["nope"]}"#;
    assert!(FromAgent::parse(bad).is_err());
}
