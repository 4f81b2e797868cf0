//! Random and mutated config files (and `CRADLE_*` variables) through
//! `Config::load`, the function `cradle serve` reads its configuration
//! with before anything else: never a panic; either an error that names the
//! offending key, variable or line, or a config that loads again as itself
//! once written back out.
//!
//! Cases per property: `CRADLE_FUZZ_CASES` (`cargo xtask fuzz` sets it and
//! `PROPTEST_RNG_SEED`); the default keeps `cargo test` quick.

use cradle_config::{Config, ConfigError, KEYS, env_var};
use proptest::prelude::*;

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

/// A value for a key: of the key's own type or not, in range or not.
#[derive(Debug, Clone)]
enum Choice {
    Int(i64),
    Str(String),
    Bool(bool),
    Float(f64),
    Ints(Vec<i64>),
    Table,
    /// A `[[vendordata.dynamic]]`-shaped array of tables.
    Targets(Vec<Vec<(&'static str, Choice)>>),
}

fn leaf() -> impl Strategy<Value = Choice> {
    prop_oneof![
        prop_oneof![
            Just(0i64),
            Just(-1),
            Just(1),
            Just(65536),
            Just(i64::MAX),
            any::<i64>()
        ]
        .prop_map(Choice::Int),
        prop_oneof![
            Just(String::new()),
            Just("127.0.0.1:0".to_string()),
            Just("[::1]:8775".to_string()),
            Just("127.0.0.1".to_string()),
            prop::sample::select(vec![
                "ssh",
                "rsync",
                "json",
                "text",
                "auto",
                "kvm",
                "http://127.0.0.1:1/"
            ])
            .prop_map(String::from),
            any::<String>(),
        ]
        .prop_map(Choice::Str),
        any::<bool>().prop_map(Choice::Bool),
        any::<f64>().prop_map(Choice::Float),
        prop::collection::vec(any::<i64>(), 0..3).prop_map(Choice::Ints),
        Just(Choice::Table),
    ]
}

fn choice() -> impl Strategy<Value = Choice> {
    let target_field = prop::sample::select(vec![
        "name",
        "url",
        "connect_timeout",
        "read_timeout",
        "failure",
        "max_response_bytes",
        "cache_ttl",
        "bogus",
    ]);
    prop_oneof![
        8 => leaf(),
        1 => prop::collection::vec(prop::collection::vec((target_field, leaf()), 0..5), 0..3)
            .prop_map(Choice::Targets),
    ]
}

fn to_toml(c: &Choice) -> toml::Value {
    match c {
        Choice::Int(n) => toml::Value::Integer(*n),
        Choice::Str(s) => toml::Value::String(s.clone()),
        Choice::Bool(b) => toml::Value::Boolean(*b),
        Choice::Float(f) => toml::Value::Float(*f),
        Choice::Ints(v) => toml::Value::Array(v.iter().map(|n| toml::Value::Integer(*n)).collect()),
        Choice::Table => toml::Value::Table(toml::Table::new()),
        Choice::Targets(ts) => toml::Value::Array(
            ts.iter()
                .map(|t| {
                    toml::Value::Table(t.iter().map(|(k, v)| (k.to_string(), to_toml(v))).collect())
                })
                .collect(),
        ),
    }
}

/// Where a value goes: a known key, a misspelt one, an unknown section, or
/// a section that is not a table.
#[derive(Debug, Clone)]
enum Place {
    Known(usize),
    Typo(usize, u8),
    UnknownSection(String),
    SectionValue(usize),
}

fn place() -> impl Strategy<Value = Place> {
    prop_oneof![
        8 => (0..KEYS.len()).prop_map(Place::Known),
        1 => (0..KEYS.len(), any::<u8>()).prop_map(|(k, b)| Place::Typo(k, b)),
        1 => "[a-z_]{1,12}".prop_map(Place::UnknownSection),
        1 => (0..KEYS.len()).prop_map(Place::SectionValue),
    ]
}

/// The file's table and every key or section name it sets.
fn build(entries: &[(Place, Choice)]) -> (toml::Table, Vec<String>) {
    let mut table = toml::Table::new();
    let mut names = Vec::new();
    for (place, value) in entries {
        let (section, key) = match place {
            Place::Known(i) => (KEYS[*i].0.to_string(), Some(KEYS[*i].1.to_string())),
            Place::Typo(i, b) => {
                let mut k = KEYS[*i].1.to_string();
                let c = char::from(b'a' + b % 26);
                k.insert((*b as usize) % (k.len() + 1), c);
                (KEYS[*i].0.to_string(), Some(k))
            }
            Place::UnknownSection(s) => (s.clone(), Some("x".to_string())),
            Place::SectionValue(i) => (KEYS[*i].0.to_string(), None),
        };
        names.push(section.clone());
        match key {
            None => {
                table.insert(section, to_toml(value));
            }
            Some(key) => {
                names.push(key.clone());
                let entry = table
                    .entry(section)
                    .or_insert_with(|| toml::Value::Table(toml::Table::new()));
                if let toml::Value::Table(t) = entry {
                    t.insert(key, to_toml(value));
                }
            }
        }
    }
    (table, names)
}

fn write(dir: &std::path::Path, text: &str) -> std::path::PathBuf {
    let path = dir.join("cradle.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// A config that loaded must load again as itself from its own TOML.
fn reloads(dir: &std::path::Path, config: &Config) -> Result<(), TestCaseError> {
    let text = toml::to_string(config).unwrap();
    let path = write(dir, &text);
    match Config::load(Some(&path), Vec::new()) {
        Ok(again) => prop_assert_eq!(&again, config, "written back as:\n{}", text),
        Err(e) => prop_assert!(false, "a loaded config does not load again: {e}\n{text}"),
    }
    Ok(())
}

/// Whether `message` names one of `names` (as a key, quoted or in a path).
fn names_one(message: &str, names: &[String]) -> bool {
    names.iter().any(|n| message.contains(n.as_str()))
}

mod fuzz {
    use super::*;

    proptest! {
        #![proptest_config(cases(128))]

        #[test]
        fn generated_files_load_or_name_the_offending_key(
            entries in prop::collection::vec((place(), choice()), 0..8),
        ) {
            let tmp = tempfile::tempdir().unwrap();
            let (table, names) = build(&entries);
            let text = toml::to_string(&table).unwrap();
            let path = write(tmp.path(), &text);
            match Config::load(Some(&path), Vec::new()) {
                Ok(config) => reloads(tmp.path(), &config)?,
                Err(ConfigError::Parse { path: p, error }) => {
                    let message = error.to_string();
                    prop_assert!(p.ends_with("cradle.toml"), "{}", p);
                    prop_assert!(
                        names_one(&message, &names),
                        "the error names none of {:?}: {}\nfile:\n{}",
                        names, message, text
                    );
                }
                Err(e) => prop_assert!(false, "{e}"),
            }
        }

        #[test]
        fn damaged_files_load_or_name_a_line_or_key(
            entries in prop::collection::vec((place(), choice()), 0..6),
            flips in prop::collection::vec((any::<usize>(), any::<u8>()), 1..4),
            cut in prop::option::of(any::<usize>()),
        ) {
            let tmp = tempfile::tempdir().unwrap();
            let (table, mut names) = build(&entries);
            let mut bytes = toml::to_string(&table).unwrap().into_bytes();
            for (i, b) in flips {
                if !bytes.is_empty() {
                    let n = bytes.len();
                    bytes[i % n] = b;
                }
            }
            if let Some(c) = cut {
                bytes.truncate(c % (bytes.len() + 1));
            }
            let text = String::from_utf8_lossy(&bytes).into_owned();
            // What the damage may have made a key of: any bare word.
            names.extend(text.split(|c: char| !(c.is_alphanumeric() || c == '_' || c == '-'))
                .filter(|w| !w.is_empty()).map(String::from));
            let path = write(tmp.path(), &text);
            match Config::load(Some(&path), Vec::new()) {
                Ok(config) => reloads(tmp.path(), &config)?,
                Err(ConfigError::Parse { error, .. }) => {
                    let message = error.to_string();
                    prop_assert!(
                        message.contains("line ") || names_one(&message, &names),
                        "the error names neither a line nor a key: {}\nfile:\n{}",
                        message, text
                    );
                }
                Err(e) => prop_assert!(false, "{e}"),
            }
        }

        #[test]
        fn variables_load_or_name_the_variable(
            vars in prop::collection::vec(
                (0..KEYS.len(), prop_oneof![
                    "[0-9]{1,6}", "0x[0-9a-f]{1,9}", "-[0-9]{1,3}", any::<String>(),
                    Just("true".to_string()), Just(" false ".to_string()),
                ]),
                0..5,
            ),
        ) {
            let env: Vec<(String, String)> = vars
                .iter()
                .map(|(i, v)| (env_var(KEYS[*i].0, KEYS[*i].1), v.clone()))
                .collect();
            let names: Vec<String> = vars
                .iter()
                .flat_map(|(i, _)| [KEYS[*i].0.to_string(), KEYS[*i].1.to_string()])
                .collect();
            match Config::load(None, env.clone()) {
                Ok(config) => {
                    let tmp = tempfile::tempdir().unwrap();
                    reloads(tmp.path(), &config)?;
                }
                Err(ConfigError::Env { var, .. }) => {
                    prop_assert!(env.iter().any(|(v, _)| *v == var), "{}", var);
                }
                Err(ConfigError::Parse { error, .. }) => {
                    let message = error.to_string();
                    prop_assert!(
                        names_one(&message, &names),
                        "the error names none of {:?}: {}", names, message
                    );
                }
                Err(e) => prop_assert!(false, "{e}"),
            }
        }
    }
}

/// What the properties lean on: a value of the wrong type or out of range
/// is refused naming its key, though the file is read into a table first
/// (so toml's own line numbers are gone by then).
#[test]
fn a_bad_value_is_refused_naming_its_key() {
    let tmp = tempfile::tempdir().unwrap();
    for (text, key) in [
        ("[metadata]\nhop_limit = \"x\"\n", "hop_limit"),
        ("[drive]\nvfat_bytes = -1\n", "vfat_bytes"),
        ("[admin]\nlisten = \"nowhere\"\n", "listen"),
        ("[remote]\ntransport = \"ftp\"\n", "transport"),
        ("[[vendordata.dynamic]]\nname = 1\n", "name"),
        ("metadata = 5\n", "metadata"),
    ] {
        let path = write(tmp.path(), text);
        let e = Config::load(Some(&path), Vec::new())
            .unwrap_err()
            .to_string();
        assert!(e.contains(key), "{text}: {e}");
    }
}
