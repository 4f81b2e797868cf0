//! Property tests of the install agent's side of the channel: what it
//! parses from the host (`install.json`, `parameters.json`) never panics
//! and is an error or a job it can run safely, and what it writes
//! (`progress`, `log` and `status` bodies) is always the JSON the host
//! takes, within the body limit, whatever the script printed. The guest
//! agent's messages (`ToAgent`, `FromAgent`) are cradle-model's, tested in
//! crates/cradle-model/tests/fuzz.rs.
//!
//! Cases per property: `CRADLE_FUZZ_CASES` (`cargo xtask fuzz` sets it and
//! `PROPTEST_RNG_SEED`); the default keeps `cargo test` quick.

use std::time::Instant;

use proptest::prelude::*;
use serde_json::{Value, json};

use crate::job::{parse_job, secrets};
use crate::lines::{Batcher, MAX_BODY, MAX_LINE, Splitter, Tail, log_body};
use crate::report::{progress_body, status_body};

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

fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z_.-]{0,12}",
        Just(".hidden".to_string()),
        Just("a/b".to_string()),
        Just("x\0y".to_string()),
        Just("A=B".to_string()),
        any::<String>(),
    ]
}

fn value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        prop_oneof![any::<i64>(), Just(0), Just(1), Just(25), Just(26)].prop_map(Value::from),
        Just(json!(u64::MAX)),
        text().prop_map(Value::String),
        Just(json!("/cradle/latest/os/package")),
    ];
    leaf.prop_recursive(2, 12, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map(text(), inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// install.json-shaped objects: its fields with any values.
fn job_object() -> impl Strategy<Value = Value> {
    let field = prop::sample::select(vec![
        "job",
        "operation",
        "instance",
        "env",
        "scripts",
        "run",
        "personalization",
        "other",
    ]);
    let personalization = (value(), value(), value()).prop_map(
        |(path, disk, partition)| json!({"path": path, "disk": disk, "partition": partition}),
    );
    (
        prop::collection::btree_map(field, value(), 0..6),
        prop::option::of(personalization),
        prop::option::of(prop::collection::vec(text(), 0..4)),
    )
        .prop_map(|(fields, p, scripts)| {
            let mut m: serde_json::Map<String, Value> = fields
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect();
            if let Some(p) = p {
                m.insert("personalization".into(), p);
            }
            if let Some(s) = scripts {
                if let Some(first) = s.first() {
                    m.insert("run".into(), json!(first));
                }
                m.insert("scripts".into(), json!(s));
            }
            Value::Object(m)
        })
}

fn flip(mut body: Vec<u8>, flips: &[(usize, u8)]) -> Vec<u8> {
    for (i, b) in flips {
        if !body.is_empty() {
            let n = body.len();
            body[i % n] ^= (*b).max(1);
        }
    }
    body
}

fn check_job(body: &[u8]) -> Result<(), TestCaseError> {
    let Ok(job) = parse_job(body) else {
        return Ok(());
    };
    for s in &job.scripts {
        prop_assert!(
            !s.is_empty() && !s.contains('/') && !s.starts_with('.'),
            "{:?}",
            s
        );
    }
    if let Some(run) = &job.run {
        prop_assert!(job.scripts.contains(run));
    }
    for (k, v) in &job.env {
        prop_assert!(!k.is_empty() && !k.contains(['=', '\0']) && !v.contains('\0'));
    }
    if let Some(p) = &job.personalization {
        let dev = p.device();
        let letter = dev.as_bytes()[7];
        prop_assert!(
            dev.starts_with("/dev/vd") && letter.is_ascii_lowercase(),
            "{}",
            dev
        );
        prop_assert!(p.path.starts_with('/'));
    }
    Ok(())
}

/// A body the host takes as the agent's message of `kind`.
fn check_body(body: &str, kind: &str) -> Result<Value, TestCaseError> {
    prop_assert!(
        body.len() <= MAX_BODY,
        "a {}-byte {} body",
        body.len(),
        kind
    );
    let v: Value = serde_json::from_str(body).unwrap();
    prop_assert_eq!(v["agent"].as_str(), Some(kind));
    Ok(v)
}

proptest! {
    #![proptest_config(cases(256))]

    #[test]
    fn install_json_is_an_error_or_a_job_that_is_safe_to_run(
        job in job_object(),
        flips in prop::collection::vec((any::<usize>(), any::<u8>()), 0..4),
    ) {
        let body = serde_json::to_vec(&job).unwrap();
        check_job(&body)?;
        check_job(&flip(body, &flips))?;
    }

    #[test]
    fn parameters_json_is_an_error_or_only_the_secret_values(
        params in prop::collection::btree_map(
            text(),
            (text(), prop::sample::select(vec!["public", "private", "secret", "SECRET"])),
            0..6,
        ),
        flips in prop::collection::vec((any::<usize>(), any::<u8>()), 0..3),
    ) {
        let doc: serde_json::Map<String, Value> = params
            .iter()
            .map(|(k, (v, vis))| (k.clone(), json!([v, vis])))
            .collect();
        let body = serde_json::to_vec(&doc).unwrap();
        let s = secrets(&body).unwrap();
        let wanted = params.values().filter(|(_, vis)| *vis == "secret").count();
        prop_assert_eq!(s.len(), wanted);
        let back: std::collections::BTreeMap<String, String> =
            serde_json::from_str(s.expose()).unwrap();
        prop_assert_eq!(back.len(), wanted);
        if let Ok(s) = secrets(&flip(body, &flips)) {
            let back: Value = serde_json::from_str(s.expose()).unwrap();
            prop_assert!(back.as_object().is_some_and(|o| o.values().all(Value::is_string)));
        }
    }

    #[test]
    fn what_the_agent_writes_is_a_message_the_host_takes(
        output in prop::collection::vec(any::<u8>(), 0..20_000),
        step in any::<String>(),
        error in prop::option::of(any::<String>()),
        exit_code in any::<i32>(),
    ) {
        let mut splitter = Splitter::default();
        let mut lines = splitter.push(&output);
        lines.extend(splitter.finish());
        let (mut batcher, mut tail, now) = (Batcher::default(), Tail::default(), Instant::now());
        let mut batches = Vec::new();
        for l in &lines {
            prop_assert!(l.len() <= MAX_LINE);
            tail.push(l);
            batches.extend(batcher.push(l, now));
        }
        batches.extend(batcher.take());
        let sent: Vec<String> = batches.concat();
        prop_assert_eq!(&sent, &lines, "lines lost or reordered in batches");
        for b in &batches {
            let v = check_body(&log_body(b), "log")?;
            prop_assert_eq!(v["lines"].as_array().map(Vec::len), Some(b.len()));
        }
        let v = check_body(&progress_body(&step), "progress")?;
        prop_assert_eq!(v["step"].as_str(), Some(step.as_str()));
        let v = check_body(&status_body(exit_code, error.as_deref(), &tail), "status")?;
        prop_assert_eq!(v["exit_code"].as_i64(), Some(i64::from(exit_code)));
        prop_assert!(v["log_tail"].is_string());
    }
}
