//! What the listeners do with clients that ask too much: a guest past its
//! request budget gets 429 and nobody else notices; a source past its
//! connection cap is reset at accept, and once a listener holds its total
//! new connections wait, unanswered, until one closes, while established
//! connections keep being served; slow and
//! oversized request heads are cut. (The flood of all of these at once
//! is tests/flood.rs.)

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::harness::*;

const PATH: &str = "/latest/meta-data/instance-id";

fn metrics(s: &Server) -> String {
    s.admin().fetch(route::metrics()).text()
}

#[test]
fn an_instance_past_its_budget_gets_429_and_other_guests_never_notice() {
    let s = Server::start_with(Opts {
        env: &[
            ("CRADLE_METADATA_RATE_LIMIT", "2"),
            ("CRADLE_METADATA_RATE_BURST", "5"),
        ],
        ..Default::default()
    });
    s.admin()
        .create(&json!({"name": "greedy", "metadata_address": "127.0.0.2"}));
    s.admin()
        .create(&json!({"name": "calm", "metadata_address": "127.0.0.3"}));
    let mut greedy = connect_from("127.0.0.2", s.metadata).unwrap();
    let mut calm = connect_from("127.0.0.3", s.metadata).unwrap();
    for i in 0..5 {
        assert_eq!(raw_get(&mut greedy, PATH).unwrap().0, 200, "request {i}");
    }
    // Past the burst: 429, on the same connection, with when to come back.
    greedy
        .write_all(format!("GET {PATH} HTTP/1.1\r\nHost: m\r\n\r\n").as_bytes())
        .unwrap();
    let mut head = vec![0u8; 1024];
    let n = greedy.read(&mut head).unwrap();
    let head = String::from_utf8_lossy(&head[..n]).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 429"), "{head}");
    assert!(head.contains("\r\nretry-after: 1\r\n"), "{head}");
    assert!(head.contains("over this instance's request rate"), "{head}");
    // The other guest has a budget of its own.
    for i in 0..5 {
        assert_eq!(raw_get(&mut calm, PATH).unwrap().0, 200, "calm request {i}");
    }
    assert_eq!(metric(&metrics(&s), "cradle_metadata_throttled_total"), 1.0);
    // Half a second later, at 2 a second, one more request is in budget.
    std::thread::sleep(Duration::from_millis(600));
    let mut again = connect_from("127.0.0.2", s.metadata).unwrap();
    assert_eq!(raw_get(&mut again, PATH).unwrap().0, 200);
}

/// A request sent on a new connection from `source`.
fn ask(source: &str, target: SocketAddr, path: &str, token: Option<&str>) -> Option<TcpStream> {
    let mut c = connect_from(source, target).ok()?;
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    c.write_all(format!("GET {path} HTTP/1.1\r\nHost: m\r\n{auth}\r\n").as_bytes())
        .ok()?;
    Some(c)
}

/// Whether the listener resets a new connection from `source` at accept
/// (or closes it before any answer).
fn reset(source: &str, target: SocketAddr, path: &str, token: Option<&str>) -> bool {
    match ask(source, target, path, token) {
        None => true,
        Some(mut c) => matches!(
            read_response(&mut c),
            Err(e) if e.kind() != std::io::ErrorKind::WouldBlock && e.kind() != std::io::ErrorKind::TimedOut
        ),
    }
}

/// A new connection from `source` that gets no answer within a second (it
/// waits in the kernel's backlog while the listener is at its total).
fn waiting(source: &str, target: SocketAddr, path: &str, token: Option<&str>) -> TcpStream {
    let mut c = ask(source, target, path, token).expect("the kernel queues the connection");
    c.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    let mut b = [0u8; 1];
    let e = c
        .read(&mut b)
        .expect_err("a connection past the total was served");
    assert!(
        matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
        "a connection past the total was closed ({e}) instead of waiting"
    );
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    c
}

fn refused_count(text: &str, listener: &str, reason: &str) -> f64 {
    metric(
        text,
        &format!("cradle_connections_refused_total{{listener=\"{listener}\",reason=\"{reason}\"}}"),
    )
}

#[test]
fn a_guest_past_its_connection_cap_is_refused_at_accept_and_no_other_is() {
    let s = Server::start_with(Opts {
        env: &[
            ("CRADLE_METADATA_MAX_CONNECTIONS", "6"),
            ("CRADLE_METADATA_MAX_CONNECTIONS_PER_SOURCE", "3"),
            ("CRADLE_METADATA_MAX_CONNECTIONS_PER_UNKNOWN_SOURCE", "1"),
        ],
        ..Default::default()
    });
    s.admin()
        .create(&json!({"name": "a", "metadata_address": "127.0.0.2"}));
    s.admin()
        .create(&json!({"name": "b", "metadata_address": "127.0.0.3"}));
    let m = s.metadata;
    let mut held: Vec<_> = (0..3)
        .map(|_| {
            let mut c = connect_from("127.0.0.2", m).unwrap();
            assert_eq!(raw_get(&mut c, PATH).unwrap().0, 200);
            c
        })
        .collect();
    assert!(reset("127.0.0.2", m, PATH, None), "a 4th connection from a");
    // Another guest is not a's cap.
    let mut b = connect_from("127.0.0.3", m).unwrap();
    assert_eq!(raw_get(&mut b, PATH).unwrap().0, 200);
    // An address that is no instance's gets one.
    let mut unknown = connect_from("127.0.0.9", m).unwrap();
    assert_eq!(raw_get(&mut unknown, PATH).unwrap().0, 404);
    assert!(
        reset("127.0.0.9", m, PATH, None),
        "a 2nd from an unknown address"
    );
    // Five held; one more reaches the total, and then a new connection
    // waits, unanswered...
    let mut b2 = connect_from("127.0.0.3", m).unwrap();
    assert_eq!(raw_get(&mut b2, PATH).unwrap().0, 200);
    let mut queued = waiting("127.0.0.3", m, PATH, None);
    // ...while every established one is still served.
    for c in held.iter_mut().chain([&mut b, &mut b2]) {
        assert_eq!(raw_get(c, PATH).unwrap().0, 200);
    }
    let text = metrics(&s);
    assert_eq!(refused_count(&text, "metadata", "source"), 1.0, "{text}");
    assert_eq!(
        refused_count(&text, "metadata", "unknown_source"),
        1.0,
        "{text}"
    );
    assert!(
        metric(
            &text,
            "cradle_connections_limit_reached_total{listener=\"metadata\"}"
        ) >= 1.0
    );
    assert_eq!(
        metric(&text, "cradle_connections{listener=\"metadata\"}"),
        6.0
    );
    // A closed connection frees its place at once, for the one waiting.
    drop(held.pop());
    assert_eq!(read_response(&mut queued).unwrap().0, 200);
}

#[test]
fn admin_connections_are_capped_per_source_and_in_total() {
    let s = Server::start_with(Opts {
        env: &[
            ("CRADLE_ADMIN_MAX_CONNECTIONS", "5"),
            ("CRADLE_ADMIN_MAX_CONNECTIONS_PER_SOURCE", "3"),
        ],
        ..Default::default()
    });
    let admin: SocketAddr = s.admin_url.trim_start_matches("http://").parse().unwrap();
    let token = s.token.clone();
    let list =
        format!("GET /v1/instances HTTP/1.1\r\nHost: m\r\nAuthorization: Bearer {token}\r\n\r\n");
    let open = |source: &str| {
        let mut c = connect_from(source, admin).unwrap();
        c.write_all(list.as_bytes()).unwrap();
        assert_eq!(read_response(&mut c).unwrap().0, 200);
        c
    };
    let mut held: Vec<_> = (0..3).map(|_| open("127.0.0.5")).collect();
    assert!(reset("127.0.0.5", admin, "/v1/instances", Some(&token)));
    held.push(open("127.0.0.6"));
    held.push(open("127.0.0.7"));
    let mut queued = waiting("127.0.0.8", admin, "/metrics", Some(&token));
    for c in &mut held {
        c.write_all(list.as_bytes()).unwrap();
        assert_eq!(
            read_response(c).unwrap().0,
            200,
            "an established connection"
        );
    }
    drop(held.pop());
    let (status, body) = read_response(&mut queued).unwrap();
    assert_eq!(status, 200);
    let text = String::from_utf8(body).unwrap();
    assert_eq!(refused_count(&text, "admin", "source"), 1.0);
    assert!(
        metric(
            &text,
            "cradle_connections_limit_reached_total{listener=\"admin\"}"
        ) >= 1.0
    );
}

/// Send `head` and say what came back: the status, or `None` when the
/// server closed the connection without an answer.
fn answer_to(target: std::net::SocketAddr, head: &[u8]) -> Option<u16> {
    let mut c = connect_from("127.0.0.1", target).unwrap();
    let _ = c.write_all(head);
    read_response(&mut c).ok().map(|(status, _)| status)
}

#[test]
fn slow_and_oversized_request_heads_are_cut_on_both_listeners() {
    let s = Server::start_with(Opts {
        env: &[
            ("CRADLE_ADMIN_HEADER_TIMEOUT", "1"),
            ("CRADLE_METADATA_HEADER_TIMEOUT", "1"),
        ],
        ..Default::default()
    });
    let admin: std::net::SocketAddr = s.admin_url.trim_start_matches("http://").parse().unwrap();
    for (name, target, head_cap) in [
        ("admin", admin, 64 * 1024),
        ("metadata", s.metadata, 16 * 1024),
    ] {
        // A head that never ends is closed at the deadline.
        let mut c = connect_from("127.0.0.1", target).unwrap();
        let t = Instant::now();
        c.write_all(b"GET / HTTP/1.1\r\nHost: m\r\nX-Slow: a")
            .unwrap();
        let mut buf = [0u8; 256];
        let closed = loop {
            match c.read(&mut buf) {
                Ok(0) | Err(_) => break t.elapsed(),
                Ok(_) => {}
            }
        };
        assert!(
            closed >= Duration::from_millis(900) && closed < Duration::from_secs(4),
            "{name}: a slow head was closed after {closed:?}"
        );
        // A head past the cap (which is checked between reads, so a head
        // may pass it by one read), and one of too many fields.
        let big = format!(
            "GET / HTTP/1.1\r\nHost: m\r\nX-Big: {}\r\n\r\n",
            "a".repeat(2 * head_cap)
        );
        assert_eq!(
            answer_to(target, big.as_bytes()),
            Some(431),
            "{name}: a big head"
        );
    }
    let mut many = String::from("GET /v1/instances HTTP/1.1\r\nHost: m\r\n");
    for i in 0..101 {
        many.push_str(&format!("X-H{i}: v\r\n"));
    }
    many.push_str("\r\n");
    assert_eq!(
        answer_to(admin, many.as_bytes()),
        Some(431),
        "admin: 101 headers"
    );
}
