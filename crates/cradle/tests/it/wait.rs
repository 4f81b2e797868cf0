//! Waiting for a change (`?wait=true`, as GCE's `wait_for_change`): a
//! change wakes exactly the guests waiting on its instance, a wait answers
//! at once when the guest's tag is already stale and at its timeout with
//! the unchanged document, waits are capped, and they end at shutdown.
//! (A change made on another host of a cluster is in cluster.rs; 10,000
//! waiting guests are `cargo xtask bench wait`.)

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use cradle_model::api::InstancePatch;
use serde_json::json;

use crate::harness::*;

const HOSTNAME: &str = "/latest/meta-data/hostname";

fn address(k: usize) -> String {
    format!("127.20.{}.{}", k / 250, k % 250 + 1)
}

/// Send a GET for `path` from `source` and leave it waiting.
fn ask(source: &str, target: SocketAddr, path: &str) -> TcpStream {
    let mut conn = connect_from(source, target).unwrap();
    conn.write_all(format!("GET {path} HTTP/1.1\r\nHost: m\r\n\r\n").as_bytes())
        .unwrap();
    conn
}

fn hostname(name: &str) -> InstancePatch {
    InstancePatch {
        hostname: Some(name.to_string()),
        ..Default::default()
    }
}

fn waiting(s: &Server) -> f64 {
    metric(
        &s.admin().fetch(route::metrics()).text(),
        "cradle_metadata_waiting",
    )
}

fn until(limit: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Whether an answer has come on `conn` (without consuming it).
fn answered(conn: &TcpStream) -> bool {
    conn.set_nonblocking(true).unwrap();
    let mut b = [0u8; 1];
    let got = match conn.peek(&mut b) {
        Ok(n) => n > 0,
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => false,
        Err(e) => panic!("{e}"),
    };
    conn.set_nonblocking(false).unwrap();
    got
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1]
}

#[test]
fn a_change_wakes_exactly_its_own_guest_among_a_thousand_waiting() {
    const GUESTS: usize = 1000;
    const CHANGED: usize = 100;
    raise_open_files(GUESTS as u64 + 256);
    let s = Server::start();
    // Registered from a few threads: the test is about waiting, not this.
    std::thread::scope(|t| {
        for part in 0..4 {
            let s = &s;
            t.spawn(move || {
                for k in (part..GUESTS).step_by(4) {
                    s.admin().create(&json!({
                        "name": format!("w{k}"), "metadata_address": address(k),
                    }));
                }
            });
        }
    });
    let (status, head, before) = {
        let mut c = connect_from(&address(0), s.metadata).unwrap();
        c.write_all(format!("GET {HOSTNAME} HTTP/1.1\r\nHost: m\r\n\r\n").as_bytes())
            .unwrap();
        read_response_head(&mut c).unwrap()
    };
    assert_eq!((status, &before[..]), (200, &b"w0"[..]));
    let tag_before = header_of(&head, "etag").expect("an ETag").to_string();

    let path = format!("{HOSTNAME}?wait=true&timeout_sec=600");
    let mut conns: Vec<Option<TcpStream>> = (0..GUESTS)
        .map(|k| Some(ask(&address(k), s.metadata, &path)))
        .collect();
    until(Duration::from_secs(20), "every guest waits", || {
        waiting(&s) == GUESTS as f64
    });

    // Change one instance at a time; time from the change sent to its
    // guest's answer received.
    let mut took = Vec::new();
    for j in 0..CHANGED {
        let k = (j * 379) % GUESTS;
        let mut conn = conns[k].take().expect("each changed once");
        let new = format!("changed-{k}");
        let start = Instant::now();
        s.admin()
            .send(route::modify_instance(&format!("w{k}"), &hostname(&new)));
        let (status, head, body) = read_response_head(&mut conn).unwrap();
        took.push(start.elapsed());
        assert_eq!(status, 200);
        assert_eq!(String::from_utf8_lossy(&body), new, "guest {k}");
        let tag = header_of(&head, "etag").expect("an ETag");
        assert_ne!(tag, tag_before);
        // No other guest was woken by it.
        if j % 10 == 0 {
            for (n, c) in conns.iter().enumerate() {
                if let Some(c) = c {
                    assert!(!answered(c), "guest {n} answered after a change to {k}");
                }
            }
        }
    }
    took.sort();
    let (p50, p99) = (percentile(&took, 0.5), percentile(&took, 0.99));
    eprintln!(
        "wake-up, change sent to answer received, {CHANGED} changes among {GUESTS} waiting guests: \
         p50 {p50:?}, p99 {p99:?}, max {:?}",
        took.last().unwrap()
    );
    assert!(p99 <= Duration::from_millis(50), "p99 {p99:?}");
    for (n, c) in conns.iter().enumerate() {
        if let Some(c) = c {
            assert!(!answered(c), "guest {n} answered though it never changed");
        }
    }
    assert_eq!(waiting(&s), (GUESTS - CHANGED) as f64);
}

#[test]
fn a_wait_answers_at_once_when_stale_and_at_its_timeout_unchanged() {
    let s = Server::start();
    s.admin()
        .create(&json!({"name": "patient", "metadata_address": "127.0.0.2"}));
    let g = s.guest("127.0.0.2");
    let now = g.get(HOSTNAME);
    let tag = now.headers["etag"].to_str().unwrap().to_string();
    let bare = tag.trim_matches('"').to_string();

    // A tag that is not the document's: the answer comes at once.
    let start = Instant::now();
    let a = g.get(&format!("{HOSTNAME}?wait=true&last_etag=0123"));
    assert_eq!((a.status, a.text()), (200, "patient".to_string()));
    assert!(start.elapsed() < Duration::from_secs(1));

    // The document's own tag, bare (as GCE's clients send it) or quoted:
    // it waits out its timeout, then answers the unchanged document.
    for last in [bare.clone(), tag.clone()] {
        let start = Instant::now();
        let a = g.get(&format!(
            "{HOSTNAME}?wait=true&timeout_sec=1&last_etag={}",
            last.replace('"', "%22")
        ));
        let waited = start.elapsed();
        assert_eq!(a.status, 200);
        assert_eq!(a.text(), "patient");
        assert_eq!(a.headers["etag"].to_str().unwrap(), tag);
        assert!(
            (Duration::from_millis(950)..Duration::from_secs(3)).contains(&waited),
            "{waited:?}"
        );
    }

    // A change that leaves the waited document as it was does not answer
    // it: the wait is for the document, not for the instance.
    let start = Instant::now();
    std::thread::scope(|t| {
        let waiter = t.spawn(|| g.get(&format!("{HOSTNAME}?wait=true&timeout_sec=2")));
        std::thread::sleep(Duration::from_millis(300));
        let mut patch = InstancePatch::default();
        patch.metadata.insert("role".into(), Some("db".into()));
        s.admin().send(route::modify_instance("patient", &patch));
        let a = waiter.join().unwrap();
        assert_eq!((a.status, a.text()), (200, "patient".to_string()));
        assert!(
            start.elapsed() >= Duration::from_millis(1900),
            "{:?}",
            start.elapsed()
        );
    });

    // Without last_etag a wait is for the next change, in any namespace.
    let native = "/cradle/latest/os/parameters.json";
    std::thread::scope(|t| {
        let waiter = t.spawn(|| {
            let start = Instant::now();
            (g.get(&format!("{native}?wait=true")), start.elapsed())
        });
        until(Duration::from_secs(5), "the native read waits", || {
            waiting(&s) == 1.0
        });
        let mut patch = InstancePatch::default();
        patch
            .os_params
            .public
            .insert("colour".into(), Some("blue".into()));
        s.admin().send(route::modify_instance("patient", &patch));
        let (a, took) = waiter.join().unwrap();
        assert_eq!(a.status, 200, "{}", a.text());
        assert_eq!(a.json()["colour"], json!(["blue", "public"]));
        assert!(took < Duration::from_secs(5));
    });

    // What a wait cannot be.
    for (query, says) in [
        (
            "wait=true&timeout_sec=0",
            "timeout_sec must be from 1 to 3600",
        ),
        (
            "wait=true&timeout_sec=3601",
            "timeout_sec must be from 1 to 3600",
        ),
        (
            "wait=true&timeout_sec=soon",
            "timeout_sec must be a whole number",
        ),
        ("wait=maybe", "wait must be true or false"),
    ] {
        let a = g.get(&format!("{HOSTNAME}?{query}"));
        assert_eq!(a.status, 400, "{query}");
        assert!(a.text().contains(says), "{query}: {}", a.text());
    }
    // Parameters cradle does not know are ignored, as EC2 ignores them.
    assert_eq!(
        g.get(&format!("{HOSTNAME}?wait=false&x=1")).text(),
        "patient"
    );
}

#[test]
fn waits_are_capped_and_end_with_an_answer_at_shutdown() {
    let mut s = Server::start_with(Opts {
        env: &[
            ("CRADLE_METADATA_MAX_WAITING", "6"),
            ("CRADLE_METADATA_MAX_WAITING_PER_INSTANCE", "4"),
        ],
        ..Default::default()
    });
    for (name, addr) in [("a", "127.0.0.2"), ("b", "127.0.0.3")] {
        s.admin()
            .create(&json!({"name": name, "metadata_address": addr}));
    }
    let path = format!("{HOSTNAME}?wait=true&timeout_sec=600");
    let mut held: Vec<(TcpStream, &str)> = (0..4)
        .map(|_| (ask("127.0.0.2", s.metadata, &path), "a"))
        .collect();
    until(Duration::from_secs(5), "a's four wait", || {
        waiting(&s) == 4.0
    });
    let mut fifth = ask("127.0.0.2", s.metadata, &path);
    let (status, body) = read_response(&mut fifth).unwrap();
    assert_eq!(status, 429);
    assert!(
        String::from_utf8_lossy(&body).contains("this instance has 4 requests waiting"),
        "{}",
        String::from_utf8_lossy(&body)
    );
    held.extend((0..2).map(|_| (ask("127.0.0.3", s.metadata, &path), "b")));
    until(Duration::from_secs(5), "six wait", || waiting(&s) == 6.0);
    let mut seventh = ask("127.0.0.3", s.metadata, &path);
    let (status, body) = read_response(&mut seventh).unwrap();
    assert_eq!(status, 429);
    assert!(String::from_utf8_lossy(&body).contains("6 requests are waiting"));
    let m = s.admin().fetch(route::metrics()).text();
    assert_eq!(
        metric(
            &m,
            "cradle_metadata_wait_refused_total{reason=\"instance\"}"
        ),
        1.0
    );
    assert_eq!(
        metric(&m, "cradle_metadata_wait_refused_total{reason=\"total\"}"),
        1.0
    );

    // A guest that gives up gives its place back at once, not at its
    // timeout: another wait of its instance is taken in.
    drop(held.remove(0));
    until(
        Duration::from_secs(3),
        "the closed wait's place is free",
        || waiting(&s) == 5.0,
    );
    held.push((ask("127.0.0.2", s.metadata, &path), "a"));
    until(Duration::from_secs(5), "six wait again", || {
        waiting(&s) == 6.0
    });

    // At shutdown every wait answers its document as it is, and the
    // server does not hang on them.
    let start = Instant::now();
    let status = s.stop().expect("it was running");
    let stopped = start.elapsed();
    assert!(status.success(), "{status:?}");
    assert!(
        stopped < Duration::from_secs(4),
        "stopping took {stopped:?}"
    );
    for (mut conn, name) in held {
        let (status, body) = read_response(&mut conn).unwrap();
        assert_eq!(
            (status, String::from_utf8_lossy(&body).to_string()),
            (200, name.to_string())
        );
    }
}

#[test]
fn a_guest_waiting_on_its_maintenance_events_hears_of_a_new_one_at_once() {
    let s = Server::start();
    s.admin()
        .create(&json!({"name": "maint", "metadata_address": "127.0.0.2"}));
    let g = s.guest("127.0.0.2");
    let path = "/latest/meta-data/events/maintenance/scheduled";
    let now = g.get(path);
    assert_eq!((now.status, now.text()), (200, "[]".to_string()));
    std::thread::scope(|t| {
        let waiter = t.spawn(|| {
            let a = g.get(&format!("{path}?wait=true&timeout_sec=30"));
            (a, Instant::now())
        });
        until(Duration::from_secs(5), "the guest waits", || {
            waiting(&s) == 1.0
        });
        let sent = Instant::now();
        let request = cradle_model::maintenance::MaintenanceRequest {
            code: Some(cradle_model::maintenance::MaintenanceCode::Reboot),
            delay_seconds: Some(3600),
            description: Some("kernel update".into()),
            ..Default::default()
        };
        let event = s
            .admin()
            .send(route::schedule_maintenance("maint", &request));
        let (a, at) = waiter.join().unwrap();
        eprintln!(
            "a scheduled event reached its waiting guest after {:?}",
            at - sent
        );
        assert_eq!(a.status, 200);
        let events = a.json();
        assert_eq!(events[0]["EventId"], event.id);
        assert_eq!(events[0]["Code"], "instance-reboot");
        assert_eq!(events[0]["Description"], "kernel update");
        assert!(at - sent < Duration::from_secs(2));
    });
}
