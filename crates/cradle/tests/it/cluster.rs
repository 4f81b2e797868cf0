//! Several `cradle serve` hosts on one real PostgreSQL server: each serves
//! the guests placed on it, every host sees every change, and guests keep
//! their metadata while the database is down.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use cradle_model::api::InstancePatch;
use cradle_store::testkit::PgServer;
use serde_json::json;

use crate::harness::{Opts, Server, route};

const TOKEN: &str = "cluster-test-token-4b1d";

fn host(url: &str, name: &str) -> Server {
    Server::start_with(Opts {
        env: &[
            ("CRADLE_STORE_URL", url),
            ("CRADLE_CLUSTER_HOST", name),
            ("CRADLE_CLUSTER_RESYNC_INTERVAL", "1"),
            ("CRADLE_ADMIN_TOKEN", TOKEN),
        ],
        ..Default::default()
    })
}

/// Poll `f` until it is true; how long that took.
#[track_caller]
fn within(limit: Duration, what: &str, mut f: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(5));
    }
    start.elapsed()
}

fn meta(key: &str, value: &str) -> InstancePatch {
    let mut patch = InstancePatch::default();
    patch
        .metadata
        .insert(key.to_string(), Some(value.to_string()));
    patch
}

#[test]
fn each_host_serves_its_own_guests_and_every_host_sees_every_change() {
    let pg = PgServer::start().expect("start PostgreSQL");
    let url = pg.url();
    let a = host(&url, "node-a");
    let mut b = host(&url, "node-b");
    let c = host(&url, "node-c");

    // Made through A, placed on B and on C.
    let on_b = a.admin().create(&json!({
        "name": "web-b", "host": "node-b", "metadata_address": "127.0.0.21",
    }));
    assert_eq!(on_b["host"], "node-b");
    let on_c = a.admin().create(&json!({
        "name": "web-c", "host": "node-c", "metadata_address": "127.0.0.22",
    }));
    let id_b = on_b["id"].as_str().unwrap().to_string();

    let path = "/latest/meta-data/hostname";
    let took = within(Duration::from_secs(3), "B serves web-b", || {
        b.guest("127.0.0.21").get(path).status == 200
    });
    eprintln!("a create through A was served by B after {took:?}");
    assert_eq!(b.guest("127.0.0.21").get(path).text(), "web-b");
    within(Duration::from_secs(3), "C serves web-c", || {
        c.guest("127.0.0.22").get(path).status == 200
    });
    // Only its own host serves a guest: the others answer as for a stranger.
    assert_eq!(a.guest("127.0.0.21").get(path).status, 404);
    assert_eq!(c.guest("127.0.0.21").get(path).status, 404);
    assert_eq!(b.guest("127.0.0.22").get(path).status, 404);

    // Modified through B: A's admin view and C's guest see it.
    b.admin()
        .send(route::modify_instance("web-c", &meta("role", "db")));
    within(Duration::from_secs(3), "C's guest sees the change", || {
        c.guest("127.0.0.22")
            .get("/openstack/latest/meta_data.json")
            .json()["meta"]["role"]
            == "db"
    });
    within(Duration::from_secs(3), "A's admin view sees it", || {
        a.admin()
            .send(route::instance("web-c"))
            .metadata
            .get("role")
            == Some(&"db".into())
    });

    // A secret for B's instance, given to A, is refused: it would have to
    // live on A. Given to B, it is taken.
    let mut secret = InstancePatch::default();
    secret.os_params.secret.insert(
        "db_password".into(),
        Some(cradle_model::Secret::new("CLUSTER-SECRET-CANARY".into())),
    );
    let refused = a.admin().fetch(route::modify_instance("web-b", &secret));
    assert_eq!(refused.status, 409, "{}", refused.text());
    assert_eq!(refused.json()["error"]["code"], "wrong_host");
    assert!(refused.text().contains("node-b"), "{}", refused.text());
    let taken = b.admin().send(route::modify_instance("web-b", &secret));
    assert_eq!(taken.os_params.secret, ["db_password"]);
    // Another host's change keeps B's secret for it.
    a.admin()
        .send(route::modify_instance("web-b", &meta("tier", "front")));
    within(Duration::from_secs(3), "B sees A's change", || {
        b.admin()
            .send(route::instance("web-b"))
            .metadata
            .get("tier")
            == Some(&"front".into())
    });
    assert_eq!(
        b.admin().send(route::instance("web-b")).os_params.secret,
        ["db_password"]
    );
    for dir in [&a.data_dir, &b.data_dir, &c.data_dir, &pg.data_dir()] {
        assert_eq!(grep(dir, "CLUSTER-SECRET-CANARY"), Vec::<String>::new());
    }
    let dump = pg.dump("postgres").unwrap();
    assert!(!String::from_utf8_lossy(&dump).contains("CLUSTER-SECRET-CANARY"));
    assert!(
        String::from_utf8_lossy(&dump).contains("web-b"),
        "the dump has the data"
    );
    for s in [&a, &b, &c] {
        assert!(!s.log().contains("CLUSTER-SECRET-CANARY"));
    }

    // Killed and restarted, B catches up with what it missed, serves again,
    // and has lost its secrets (they were only in its memory).
    let data_b = b.data_dir.clone();
    b.kill();
    a.admin().send(route::modify_instance(
        "web-b",
        &meta("while", "b-was-down"),
    ));
    let b2 = Server::start_with(Opts {
        data_dir: Some(&data_b),
        env: &[
            ("CRADLE_STORE_URL", &url),
            ("CRADLE_CLUSTER_HOST", "node-b"),
            ("CRADLE_ADMIN_TOKEN", TOKEN),
        ],
        ..Default::default()
    });
    let doc = b2
        .guest("127.0.0.21")
        .get("/openstack/latest/meta_data.json");
    assert_eq!(doc.status, 200);
    assert_eq!(doc.json()["meta"]["while"], "b-was-down");
    assert!(
        b2.admin()
            .send(route::instance("web-b"))
            .os_params
            .secret
            .is_empty()
    );

    // Removed through C: gone from every host.
    c.admin().send(route::remove_instance(&id_b));
    within(Duration::from_secs(3), "A forgets web-b", || {
        a.admin().fetch(route::instance("web-b")).status == 404
    });
    within(Duration::from_secs(3), "B stops serving web-b", || {
        b2.guest("127.0.0.21").get(path).status == 404
    });
    let hosts: Vec<_> = b2
        .admin()
        .send(route::instances())
        .into_iter()
        .map(|i| i.name)
        .collect();
    assert_eq!(hosts, [on_c["name"].as_str().unwrap()]);
}

#[test]
fn guests_are_served_while_the_database_is_down_and_no_acknowledged_write_is_lost() {
    let pg = PgServer::start().expect("start PostgreSQL");
    let url = pg.url();
    let a = host(&url, "node-a");
    let b = host(&url, "node-b");
    a.admin().create(&json!({
        "name": "g-a", "host": "node-a", "metadata_address": "127.0.0.31",
    }));
    a.admin().create(&json!({
        "name": "g-b", "host": "node-b", "metadata_address": "127.0.0.32",
    }));
    within(Duration::from_secs(3), "B serves g-b", || {
        b.guest("127.0.0.32")
            .get("/latest/meta-data/hostname")
            .status
            == 200
    });

    let stop = Arc::new(AtomicBool::new(false));
    let reads = Arc::new(AtomicUsize::new(0));
    let failed_reads = Arc::new(AtomicUsize::new(0));
    let mut readers = Vec::new();
    for (server, source) in [(&a, "127.0.0.31"), (&b, "127.0.0.32")] {
        let guest = server.guest(source);
        let (stop, reads, failed) = (stop.clone(), reads.clone(), failed_reads.clone());
        readers.push(std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                match guest.get("/latest/meta-data/hostname").status {
                    200 => reads.fetch_add(1, Ordering::SeqCst),
                    _ => failed.fetch_add(1, Ordering::SeqCst),
                };
            }
        }));
    }

    // Writes through A, numbered; each answered 2xx is acknowledged.
    let admin = a.admin();
    let try_write = |n: usize| -> bool {
        let r = admin.fetch(route::modify_instance("g-b", &meta(&format!("w{n}"), "1")));
        match r.status {
            200 => true,
            503 => {
                assert_eq!(
                    r.json()["error"]["code"],
                    "store_unavailable",
                    "{}",
                    r.text()
                );
                false
            }
            other => panic!("write {n}: {other} {}", r.text()),
        }
    };
    let (mut acknowledged, mut refused, mut n) = (Vec::new(), 0, 0);
    let mut write = |acknowledged: &mut Vec<usize>, refused: &mut usize| {
        match try_write(n) {
            true => acknowledged.push(n),
            false => *refused += 1,
        }
        n += 1;
    };
    for _ in 0..10 {
        write(&mut acknowledged, &mut refused);
    }
    pg.stop().unwrap();
    let down = Instant::now();
    while down.elapsed() < Duration::from_secs(2) {
        write(&mut acknowledged, &mut refused);
        std::thread::sleep(Duration::from_millis(50));
    }
    let reads_while_down = reads.load(Ordering::SeqCst);
    pg.start_again().unwrap();
    let back = Instant::now();
    loop {
        let before = acknowledged.len();
        write(&mut acknowledged, &mut refused);
        if acknowledged.len() > before {
            break;
        }
        assert!(
            back.elapsed() < Duration::from_secs(10),
            "writes never came back"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!(
        "writes worked again {:?} after the database was back",
        back.elapsed()
    );
    for _ in 0..10 {
        write(&mut acknowledged, &mut refused);
    }
    stop.store(true, Ordering::SeqCst);
    for r in readers {
        r.join().unwrap();
    }
    let (reads, failed) = (
        reads.load(Ordering::SeqCst),
        failed_reads.load(Ordering::SeqCst),
    );
    eprintln!(
        "guest reads: {reads} ({reads_while_down} before the restart), failed {failed}; \
         writes: {} acknowledged, {refused} refused while down",
        acknowledged.len()
    );
    assert_eq!(failed, 0, "a guest read failed while the database was down");
    assert!(
        refused > 0,
        "no write was tried while the database was down"
    );

    // Every acknowledged write is there, on both hosts.
    for server in [&a, &b] {
        within(Duration::from_secs(5), "both hosts converge", || {
            let view = server.admin().send(route::instance("g-b"));
            acknowledged
                .iter()
                .all(|n| view.metadata.contains_key(&format!("w{n}")))
        });
    }
}

fn grep(dir: &std::path::Path, needle: &str) -> Vec<String> {
    let mut hits = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return hits;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            hits.extend(grep(&p, needle));
        } else if let Ok(bytes) = std::fs::read(&p)
            && bytes.windows(needle.len()).any(|w| w == needle.as_bytes())
        {
            hits.push(p.display().to_string());
        }
    }
    hits
}
