//! The SQLite store against a real database file.

use cradle_model::api::InstanceSpec;
use cradle_model::{Instance, RANDOM_SEED_LEN, Secret};
use cradle_store::{Direction, SqliteStore, Store, StoreError};
use time::OffsetDateTime;
use uuid::Uuid;

fn instance(name: &str, addr: &str) -> Instance {
    let mut spec = InstanceSpec {
        name: name.into(),
        metadata_address: Some(addr.into()),
        user_data: Some("aGVsbG8=".into()),
        ..Default::default()
    };
    spec.metadata.insert("role".into(), "web".into());
    spec.os_params.public.insert("pub_p".into(), "shown".into());
    spec.os_params
        .private
        .insert("priv_p".into(), Secret::new("private-canary".into()));
    spec.os_params
        .secret
        .insert("sec_p".into(), Secret::new("SECRET-CANARY-91f2".into()));
    spec.into_instance(
        Uuid::new_v4(),
        OffsetDateTime::now_utc().replace_nanosecond(0).unwrap(),
        vec![7; RANDOM_SEED_LEN],
    )
    .unwrap()
}

fn grep_dir(dir: &std::path::Path, needle: &[u8]) -> Vec<String> {
    let mut hits = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        let bytes = std::fs::read(&p).unwrap();
        if bytes.windows(needle.len()).any(|w| w == needle) {
            hits.push(p.display().to_string());
        }
    }
    hits
}

#[test]
fn round_trips_everything_but_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("db")).unwrap();
    let a = instance("a", "127.0.0.2");
    store.insert(&a, &[]).unwrap();
    let loaded = store.load_all().unwrap();
    assert_eq!(loaded.len(), 1);
    let b = &loaded[0];
    assert_eq!(b.id, a.id);
    assert_eq!(b.user_data.as_deref(), Some(&b"hello"[..]));
    assert_eq!(b.metadata, a.metadata);
    assert_eq!(b.os_params.public, a.os_params.public);
    assert_eq!(b.os_params.private["priv_p"].expose(), "private-canary");
    assert!(b.os_params.secret.is_empty());
    assert_eq!(b.random_seed, a.random_seed);
    assert_eq!(b.created_at, a.created_at);
}

#[test]
fn secret_params_never_reach_the_database() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("db")).unwrap();
    let mut a = instance("a", "127.0.0.2");
    store.insert(&a, &[]).unwrap();
    a.name = "renamed".into();
    store.update(&a).unwrap();
    drop(store);
    assert_eq!(
        grep_dir(dir.path(), b"SECRET-CANARY-91f2"),
        Vec::<String>::new()
    );
    assert!(
        !grep_dir(dir.path(), b"private-canary").is_empty(),
        "private values are stored"
    );
}

#[test]
fn name_and_address_are_unique() {
    let store = SqliteStore::in_memory().unwrap();
    store.insert(&instance("a", "127.0.0.2"), &[]).unwrap();
    assert!(matches!(
        store.insert(&instance("a", "127.0.0.3"), &[]),
        Err(StoreError::Conflict("name"))
    ));
    assert!(matches!(
        store.insert(&instance("b", "127.0.0.2"), &[]),
        Err(StoreError::Conflict("metadata_address"))
    ));
}

#[test]
fn password_is_set_once() {
    let store = SqliteStore::in_memory().unwrap();
    let a = instance("a", "127.0.0.2");
    store.insert(&a, &[]).unwrap();
    assert!(store.set_password_once(a.id, "first").unwrap());
    assert!(!store.set_password_once(a.id, "second").unwrap());
    assert_eq!(
        store.load_all().unwrap()[0].password.as_deref(),
        Some("first")
    );
    assert!(matches!(
        store.set_password_once(Uuid::new_v4(), "x"),
        Err(StoreError::NotFound)
    ));
}

#[test]
fn messages_queue_in_order_with_a_cap_and_die_with_the_instance() {
    let store = SqliteStore::in_memory().unwrap();
    let a = instance("a", "127.0.0.2");
    store.insert(&a, &[]).unwrap();
    for n in 0..3 {
        assert!(
            store
                .push_message(a.id, Direction::ToGuest, format!("m{n}").as_bytes(), 3)
                .unwrap()
                .is_some()
        );
    }
    assert!(
        store
            .push_message(a.id, Direction::ToGuest, b"over", 3)
            .unwrap()
            .is_none()
    );
    assert_eq!(
        store
            .pop_message(a.id, Direction::ToGuest)
            .unwrap()
            .unwrap()
            .body,
        b"m0"
    );
    assert_eq!(store.pop_message(a.id, Direction::ToHost).unwrap(), None);
    let rest: Vec<_> = store
        .drain_messages(a.id, Direction::ToGuest)
        .unwrap()
        .into_iter()
        .map(|m| m.body)
        .collect();
    assert_eq!(rest, vec![b"m1".to_vec(), b"m2".to_vec()]);
    store
        .push_message(a.id, Direction::ToHost, b"x", 3)
        .unwrap();
    assert!(store.delete(a.id, &[]).unwrap());
    assert!(
        store
            .drain_messages(a.id, Direction::ToHost)
            .unwrap()
            .is_empty()
    );
    assert!(matches!(
        store.push_message(a.id, Direction::ToHost, b"x", 3),
        Err(StoreError::NotFound)
    ));
}
