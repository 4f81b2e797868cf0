//! One suite, two backends: every test runs against a SQLite file and
//! against a real PostgreSQL server (each test in its own database).

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use cradle_model::api::InstanceSpec;
use cradle_model::{Instance, RANDOM_SEED_LEN, Secret};
use cradle_secgroups::state::Op;
use cradle_secgroups::{DefaultRule, Group};
use cradle_store::testkit::PgServer;
use cradle_store::{Direction, HostRecord, PgStore, SqliteStore, Store, StoreError};
use time::OffsetDateTime;
use uuid::Uuid;

const SECRET: &str = "SECRET-CANARY-91f2";

fn now() -> OffsetDateTime {
    OffsetDateTime::now_utc().replace_nanosecond(0).unwrap()
}

fn instance(name: &str, addr: &str) -> Instance {
    let mut spec = InstanceSpec {
        name: name.into(),
        metadata_address: Some(addr.into()),
        user_data: Some("aGVsbG8=".into()),
        host: Some("node1".into()),
        ..Default::default()
    };
    spec.metadata.insert("role".into(), "web".into());
    spec.os_params.public.insert("pub_p".into(), "shown".into());
    spec.os_params
        .private
        .insert("priv_p".into(), Secret::new("private-canary".into()));
    spec.os_params
        .secret
        .insert("sec_p".into(), Secret::new(SECRET.into()));
    spec.into_instance(Uuid::new_v4(), now(), vec![7; RANDOM_SEED_LEN])
        .unwrap()
}

fn group(tenant: &str, name: &str) -> Group {
    Group {
        id: Uuid::new_v4(),
        tenant: tenant.into(),
        name: name.into(),
        description: String::new(),
        instance_id: None,
        created_at: now(),
    }
}

/// A store under test, and where its bytes live.
struct Under {
    store: Box<dyn Store>,
    /// Files to search for values that must never be written.
    files: Vec<PathBuf>,
    /// A `pg_dump`, where there is a server.
    dump: Option<Box<dyn Fn() -> Vec<u8>>>,
    _dir: Option<tempfile::TempDir>,
}

fn sqlite() -> Under {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("db")).unwrap();
    Under {
        store: Box::new(store),
        files: vec![dir.path().to_path_buf()],
        dump: None,
        _dir: Some(dir),
    }
}

fn server() -> &'static PgServer {
    static SERVER: OnceLock<PgServer> = OnceLock::new();
    SERVER.get_or_init(|| PgServer::start().expect("start PostgreSQL"))
}

fn fresh_database() -> (String, String) {
    static N: AtomicUsize = AtomicUsize::new(0);
    let name = format!(
        "t{}_{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    );
    let url = server().create_database(&name).unwrap();
    (name, url)
}

fn postgres() -> Under {
    let (name, url) = fresh_database();
    Under {
        store: Box::new(PgStore::connect(&url).unwrap()),
        files: vec![server().data_dir()],
        dump: Some(Box::new(move || server().dump(&name).unwrap())),
        _dir: None,
    }
}

fn grep(path: &Path, needle: &[u8], hits: &mut Vec<String>) {
    if path.is_dir() {
        for e in std::fs::read_dir(path).unwrap() {
            grep(&e.unwrap().path(), needle, hits);
        }
    } else if let Ok(bytes) = std::fs::read(path)
        && bytes.windows(needle.len()).any(|w| w == needle)
    {
        hits.push(path.display().to_string());
    }
}

fn grep_all(u: &Under, needle: &str) -> Vec<String> {
    let mut hits = Vec::new();
    for f in &u.files {
        grep(f, needle.as_bytes(), &mut hits);
    }
    if let Some(dump) = &u.dump
        && dump().windows(needle.len()).any(|w| w == needle.as_bytes())
    {
        hits.push("pg_dump".into());
    }
    hits
}

fn round_trips_everything_but_secrets(u: Under) {
    let store = &u.store;
    let a = instance("a", "127.0.0.2");
    let v = store.insert(&a, &[]).unwrap();
    assert!(v > 0);
    let loaded = store.load_all().unwrap();
    assert_eq!(loaded.len(), 1);
    let b = &loaded[0];
    assert_eq!(b.id, a.id);
    assert_eq!(b.host, "node1");
    assert_eq!(b.version, v);
    assert_eq!(b.user_data.as_deref(), Some(&b"hello"[..]));
    assert_eq!(b.metadata, a.metadata);
    assert_eq!(b.os_params.public, a.os_params.public);
    assert_eq!(b.os_params.private["priv_p"].expose(), "private-canary");
    assert!(b.os_params.secret.is_empty());
    assert_eq!(b.random_seed, a.random_seed);
    assert_eq!(b.created_at, a.created_at);
    assert_eq!(store.get(a.id).unwrap().unwrap().name, "a");
    assert!(store.get(Uuid::new_v4()).unwrap().is_none());
}

fn secret_params_never_reach_the_database(u: Under) {
    let mut a = instance("a", "127.0.0.2");
    a.version = u.store.insert(&a, &[]).unwrap();
    a.name = "renamed".into();
    u.store.update(&a).unwrap();
    u.store.record_event(a.id, "test", "an event").unwrap();
    assert_eq!(grep_all(&u, SECRET), Vec::<String>::new());
    // The search finds what is written: private values are.
    assert!(
        !grep_all(&u, "private-canary").is_empty(),
        "private values are stored"
    );
}

fn name_and_address_are_unique(u: Under) {
    let store = &u.store;
    store.insert(&instance("a", "127.0.0.2"), &[]).unwrap();
    assert!(matches!(
        store.insert(&instance("a", "127.0.0.3"), &[]),
        Err(StoreError::Conflict("name"))
    ));
    assert!(matches!(
        store.insert(&instance("b", "127.0.0.2"), &[]),
        Err(StoreError::Conflict("metadata_address"))
    ));
    // Nothing of a refused insert is left: its group is not there either.
    let g = group("t", "own");
    assert!(matches!(
        store.insert(&instance("a", "127.0.0.9"), &[Op::AddGroup(g)]),
        Err(StoreError::Conflict("name"))
    ));
    assert!(store.load_secgroups().unwrap().0.is_empty());
}

fn password_is_set_once(u: Under) {
    let store = &u.store;
    let a = instance("a", "127.0.0.2");
    store.insert(&a, &[]).unwrap();
    assert!(store.set_password_once(a.id, "first").unwrap().is_some());
    assert!(store.set_password_once(a.id, "second").unwrap().is_none());
    assert_eq!(
        store.load_all().unwrap()[0].password.as_deref(),
        Some("first")
    );
    assert!(matches!(
        store.set_password_once(Uuid::new_v4(), "x"),
        Err(StoreError::NotFound)
    ));
}

fn messages_queue_in_order_with_a_cap_and_die_with_the_instance(u: Under) {
    let store = &u.store;
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
    assert!(store.delete(a.id, &[]).unwrap().is_some());
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

fn an_update_from_a_stale_copy_is_refused(u: Under) {
    let store = &u.store;
    let mut a = instance("a", "127.0.0.2");
    a.version = store.insert(&a, &[]).unwrap();
    let stale = a.clone();
    a.name = "first".into();
    a.version = store.update(&a).unwrap();
    let mut late = stale;
    late.name = "second".into();
    assert!(matches!(store.update(&late), Err(StoreError::Stale)));
    assert_eq!(store.get(a.id).unwrap().unwrap().name, "first");
    let mut gone = instance("gone", "127.0.0.9");
    gone.version = 1;
    assert!(matches!(store.update(&gone), Err(StoreError::NotFound)));
}

fn changes_since_a_version_are_exactly_what_came_after(u: Under) {
    let store = &u.store;
    let start = store.version().unwrap();
    let mut a = instance("a", "127.0.0.2");
    let b = instance("b", "127.0.0.3");
    a.version = store.insert(&a, &[]).unwrap();
    store.insert(&b, &[]).unwrap();
    let g = group("t", "web");
    let d = DefaultRule {
        id: Uuid::new_v4(),
        tenant: "t".into(),
        spec: cradle_secgroups::RuleRequest {
            protocol: Some("tcp".into()),
            from_port: Some(22),
            to_port: Some(22),
            cidr: Some("10.0.0.0/8".into()),
            ..Default::default()
        }
        .validate()
        .unwrap(),
        created_at: now(),
    };
    let sg_version = store
        .apply_secgroups(&[Op::AddGroup(g.clone()), Op::AddDefault(d.clone())])
        .unwrap();
    let mid = store.version().unwrap();
    a.name = "a2".into();
    store.update(&a).unwrap();
    assert!(store.delete(b.id, &[]).unwrap().is_some());

    let all = store.changes_since(start).unwrap();
    assert_eq!(all.version, store.version().unwrap());
    let names: Vec<_> = all.instances.iter().map(|i| i.name.as_str()).collect();
    assert_eq!(names, ["a2"], "b is gone, a is at its latest");
    assert_eq!(all.removed, [b.id]);
    assert_eq!(
        all.secgroups,
        vec![
            (sg_version, Op::AddGroup(g)),
            (sg_version, Op::AddDefault(d))
        ]
    );
    let later = store.changes_since(mid).unwrap();
    assert!(later.secgroups.is_empty());
    assert_eq!(later.instances.len(), 1);
    let none = store.changes_since(all.version).unwrap();
    assert!(none.instances.is_empty() && none.removed.is_empty() && none.secgroups.is_empty());
}

fn hosts_record_their_heartbeats(u: Under) {
    let store = &u.store;
    let mut h = HostRecord {
        name: "node1".into(),
        admin_url: "http://127.0.0.1:8774".into(),
        peer_url: "https://10.0.0.1:8776".into(),
        metadata_address: "169.254.169.254:80".into(),
        started_at: now(),
        seen_at: now(),
    };
    store.heartbeat(&h).unwrap();
    h.seen_at += time::Duration::seconds(5);
    store.heartbeat(&h).unwrap();
    assert_eq!(store.hosts().unwrap(), vec![h]);
}

macro_rules! suite {
    ($backend:ident: $($test:ident),* $(,)?) => {
        mod $backend {
            $(
                #[test]
                fn $test() {
                    super::$test(super::$backend());
                }
            )*
        }
    };
}

macro_rules! both {
    ($($test:ident),* $(,)?) => {
        suite!(sqlite: $($test),*);
        suite!(postgres: $($test),*);
    };
}

both!(
    round_trips_everything_but_secrets,
    secret_params_never_reach_the_database,
    name_and_address_are_unique,
    password_is_set_once,
    messages_queue_in_order_with_a_cap_and_die_with_the_instance,
    an_update_from_a_stale_copy_is_refused,
    changes_since_a_version_are_exactly_what_came_after,
    hosts_record_their_heartbeats,
);

#[test]
fn sqlite_has_no_one_to_notify() {
    assert!(sqlite().store.subscribe().unwrap().is_none());
}

#[test]
fn postgres_wakes_subscribers_with_other_processes_committed_changes_only() {
    let (_, url) = fresh_database();
    let writer = PgStore::connect(&url).unwrap();
    let reader = PgStore::connect(&url).unwrap();
    let mut sub = reader.subscribe().unwrap().unwrap();
    assert!(!sub.wait(Duration::from_millis(50)).unwrap());
    // A refused insert (name taken) commits nothing, so says nothing.
    writer.insert(&instance("a", "127.0.0.2"), &[]).unwrap();
    assert!(sub.wait(Duration::from_secs(5)).unwrap());
    assert!(writer.insert(&instance("a", "127.0.0.3"), &[]).is_err());
    assert!(!sub.wait(Duration::from_millis(200)).unwrap());
    let t = Instant::now();
    writer.insert(&instance("b", "127.0.0.4"), &[]).unwrap();
    assert!(sub.wait(Duration::from_secs(5)).unwrap());
    assert!(t.elapsed() < Duration::from_secs(1));
    assert_eq!(reader.load_all().unwrap().len(), 2);
    // A change the subscriber's own store made wakes no one there: its
    // host applied it when it made it.
    reader.insert(&instance("c", "127.0.0.5"), &[]).unwrap();
    assert!(!sub.wait(Duration::from_millis(300)).unwrap());
    writer.insert(&instance("d", "127.0.0.6"), &[]).unwrap();
    assert!(sub.wait(Duration::from_secs(5)).unwrap());
}
