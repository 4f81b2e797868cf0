//! Dynamic vendordata end to end: `cradle serve --config` with
//! `[[vendordata.dynamic]]` targets that are real HTTP servers on 127.0.0.1,
//! guests reading `vendor_data2.json`, and what the operator sees (instance
//! state, events, the CLI, `/metrics`, the log).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::harness::*;

const GUEST: &str = "127.0.0.2";
const V2: &str = "/openstack/latest/vendor_data2.json";

// ---------------------------------------------------------------------------
// A tiny HTTP/1.1 target: one thread per connection, `Connection: close`.

/// A request the target received.
#[derive(Debug, Clone)]
struct Req {
    method: String,
    path: String,
    /// Names lower-cased, in arrival order.
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Req {
    fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "request body is not JSON ({e}): {}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }
}

/// What the target answers.
struct Resp {
    status: u16,
    headers: Vec<(&'static str, String)>,
    body: Vec<u8>,
    /// Waited before answering.
    delay: Duration,
}

impl Resp {
    fn json(value: Value) -> Resp {
        Resp {
            status: 200,
            headers: Vec::new(),
            body: value.to_string().into_bytes(),
            delay: Duration::ZERO,
        }
    }

    fn status(status: u16) -> Resp {
        Resp {
            status,
            ..Resp::json(json!({"error": "nope"}))
        }
    }

    fn header(mut self, name: &'static str, value: &str) -> Resp {
        self.headers.push((name, value.to_string()));
        self
    }

    fn after(mut self, delay: Duration) -> Resp {
        self.delay = delay;
        self
    }
}

type Handler = dyn Fn(&Req) -> Resp + Send + Sync;

/// A running target; its threads end with the test binary.
struct Target {
    url: String,
    seen: Arc<Mutex<Vec<Req>>>,
}

impl Target {
    fn start(handler: impl Fn(&Req) -> Resp + Send + Sync + 'static) -> Target {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/vendordata", listener.local_addr().unwrap());
        let seen: Arc<Mutex<Vec<Req>>> = Arc::default();
        let handler: Arc<Handler> = Arc::new(handler);
        let recorded = seen.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let (handler, recorded) = (handler.clone(), recorded.clone());
                std::thread::spawn(move || serve_connection(stream, &*handler, &recorded));
            }
        });
        Target { url, seen }
    }

    fn requests(&self) -> Vec<Req> {
        self.seen.lock().unwrap().clone()
    }
}

fn serve_connection(stream: TcpStream, handler: &Handler, recorded: &Mutex<Vec<Req>>) {
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut line = String::new();
    if reader.read_line(&mut line).unwrap_or(0) == 0 {
        return; // a connection opened and closed unused
    }
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or_default().to_string();
    let path = parts.next().unwrap_or_default().to_string();
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        reader.read_line(&mut h).unwrap();
        let h = h.trim_end_matches(['\r', '\n']);
        if h.is_empty() {
            break;
        }
        let (name, value) = h.split_once(':').expect("header line has a colon");
        headers.push((name.trim().to_ascii_lowercase(), value.trim().to_string()));
    }
    let mut req = Req {
        method,
        path,
        headers,
        body: Vec::new(),
    };
    assert!(
        req.header("transfer-encoding").is_none(),
        "this target only reads Content-Length bodies: {req:?}"
    );
    let len: usize = req
        .header("content-length")
        .map_or(0, |v| v.parse().expect("numeric Content-Length"));
    req.body = vec![0; len];
    reader.read_exact(&mut req.body).unwrap();
    recorded.lock().unwrap().push(req.clone());

    let resp = handler(&req);
    std::thread::sleep(resp.delay);
    let reason = match resp.status {
        200 => "OK",
        401 => "Unauthorized",
        500 => "Internal Server Error",
        _ => "Whatever",
    };
    let mut out = format!(
        "HTTP/1.1 {} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n",
        resp.status,
        resp.body.len()
    );
    for (name, value) in &resp.headers {
        out.push_str(&format!("{name}: {value}\r\n"));
    }
    out.push_str("\r\n");
    let mut stream = stream;
    // The client may be gone (a read_timeout): nothing to do about it.
    let _ = stream.write_all(out.as_bytes());
    let _ = stream.write_all(&resp.body);
    let _ = stream.shutdown(std::net::Shutdown::Both);
}

// ---------------------------------------------------------------------------
// Helpers.

/// `path` as a TOML basic string.
fn q(path: &Path) -> String {
    serde_json::to_string(path.to_str().unwrap()).unwrap()
}

/// Write `config` to `dir/cradle.toml` and start `cradle serve --config` on it.
fn serve(dir: &Path, config: &str, log: Option<&str>) -> Server {
    let path = dir.join("cradle.toml");
    std::fs::write(&path, config).unwrap();
    let path = path.to_str().unwrap().to_string();
    Server::start_with(Opts {
        args: &["--config", &path],
        log,
        ..Default::default()
    })
}

/// Write a file by renaming a fresh one over it, as an operator rotating a
/// secret should.
fn replace(path: &Path, contents: &str) {
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, contents).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// A static vendordata file; returns its JSON.
fn static_file(dir: &Path) -> (std::path::PathBuf, Value) {
    let value = json!({"motd": "static vendordata", "n": [1, 2, 3]});
    let path = dir.join("vendor_data.json");
    std::fs::write(&path, value.to_string()).unwrap();
    (path, value)
}

/// `cradle instance <args>` against `s` as the operator; (ok, stdout, stderr).
fn cli(s: &Server, args: &[&str]) -> (bool, String, String) {
    let r = Run::of(&mut s.cli(std::iter::once("instance").chain(args.iter().copied())));
    (r.ok, r.stdout, r.stderr)
}

/// The value of an unlabelled-but-for-`target` sample on `/metrics`.
fn metric(s: &Server, name: &str, target: &str) -> Option<u64> {
    let a = s.admin().fetch(route::metrics());
    assert_eq!(a.status, 200, "{}", a.text());
    let prefix = format!("{name}{{target=\"{target}\"}} ");
    a.text()
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .map(|v| v.trim().parse().unwrap())
}

/// Read one file out of an ISO 9660 image with isoinfo (Rock Ridge names).
fn iso_file(image: &[u8], dir: &Path, path: &str) -> Vec<u8> {
    let iso = dir.join("drive.iso");
    std::fs::write(&iso, image).unwrap();
    let out = Command::new("isoinfo")
        .args(["-R", "-x", path, "-i"])
        .arg(&iso)
        .output()
        .expect("isoinfo (genisoimage) must be installed");
    assert!(
        out.status.success(),
        "isoinfo failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

// ---------------------------------------------------------------------------
// Tests.

#[test]
fn guests_get_the_targets_answer_in_vendor_data2_json() {
    let tmp = tempfile::tempdir().unwrap();
    let (static_path, static_value) = static_file(tmp.path());
    let token_path = tmp.path().join("service.token");
    std::fs::write(&token_path, "service-token-5d1c\n").unwrap();

    let target = Target::start(|req| {
        if req.header("x-auth-token") != Some("service-token-5d1c") {
            return Resp::status(401);
        }
        Resp::json(json!({"hello": "world"})).header("Cache-Control", "max-age=60")
    });
    let config = format!(
        r#"
[vendordata]
static_file = {static_file}

[[vendordata.dynamic]]
name = "acme"
url = "{url}"
token_file = {token}
failure = "fatal"
"#,
        static_file = q(&static_path),
        url = target.url,
        token = q(&token_path),
    );
    let s = serve(tmp.path(), &config, None);

    let user_data = b"#cloud-config\nruncmd: [[echo, hi]]\n\xff\x00binary".to_vec();
    let created = s.admin().create(&json!({
        "name": "vd1",
        "project_id": "proj-42",
        "hostname": "vd1-host",
        "metadata_address": GUEST,
        "metadata": {"role": "db", "tier": "gold"},
        "user_data": b64(&user_data),
        "os_image": "debian-12",
    }));
    let id = created["id"].as_str().unwrap().to_string();

    let a = s.guest(GUEST).get(V2);
    assert_eq!(a.status, 200, "{}", a.text());
    assert_eq!(
        a.json(),
        json!({"static": static_value, "acme": {"hello": "world"}})
    );
    assert_eq!(
        a.headers["content-type"], "application/json",
        "{:?}",
        a.headers
    );

    let seen = target.requests();
    assert_eq!(seen.len(), 1, "{seen:?}");
    let req = &seen[0];
    assert_eq!(req.method, "POST");
    assert_eq!(req.path, "/vendordata");
    assert_eq!(req.header("content-type"), Some("application/json"));
    assert_eq!(req.header("accept"), Some("application/json"));
    assert_eq!(req.header("user-agent"), Some("cradle-vendordata"));
    assert_eq!(req.header("x-auth-token"), Some("service-token-5d1c"));
    assert_eq!(
        req.json(),
        json!({
            "project-id": "proj-42",
            "instance-id": id,
            "image-id": "debian-12",
            "user-data": b64(&user_data),
            "hostname": "vd1-host",
            "metadata": {"role": "db", "tier": "gold"},
            "boot-roles": "admin",
        })
    );

    // Read again: cached for the answer's max-age.
    let again = s.guest(GUEST).get(V2);
    assert_eq!(again.status, 200);
    assert_eq!(again.body, a.body);
    assert_eq!(target.requests().len(), 1);

    // The config drive carries the very same bytes.
    let drive = s.admin().fetch(route::config_drive(&id, Some("iso9660")));
    assert_eq!(drive.status, 200, "{}", drive.text());
    let on_drive = iso_file(&drive.body, tmp.path(), V2);
    assert_eq!(
        String::from_utf8_lossy(&on_drive),
        a.text(),
        "config drive and metadata service disagree"
    );
}

#[test]
fn boot_roles_reach_the_target_and_survive_a_role_change() {
    let tmp = tempfile::tempdir().unwrap();
    let tokens = tmp.path().join("tokens.toml");
    let write_tokens = |roles: &[&str]| {
        let text = tokens_toml(&[Named {
            name: "provisioner",
            roles,
            projects: &["default"],
            token: "provisioner-token-81aa",
        }]);
        replace(&tokens, &text);
    };
    write_tokens(&["mail-server"]);

    let target = Target::start(|req| {
        let body = req.json();
        Resp::json(json!({"roles": body["boot-roles"]}))
    });
    let config = format!(
        r#"
[admin]
tokens_file = {tokens}

[[vendordata.dynamic]]
name = "roles"
url = "{url}"
"#,
        tokens = q(&tokens),
        url = target.url,
    );
    let s = serve(tmp.path(), &config, None);
    let provisioner = s.admin().with_token("provisioner-token-81aa");

    let a = provisioner.create(&json!({"name": "mail", "metadata_address": "127.0.0.2"}));
    assert_eq!(a["boot_roles"], json!(["mail-server"]));
    write_tokens(&["web-server"]);
    let b = provisioner.create(&json!({"name": "web", "metadata_address": "127.0.0.3"}));
    assert_eq!(b["boot_roles"], json!(["web-server"]));

    // Guest A asks only after its creator's roles changed.
    let va = s.guest("127.0.0.2").get(V2);
    assert_eq!(va.status, 200, "{}", va.text());
    assert_eq!(va.json()["roles"], json!({"roles": "mail-server"}));
    let vb = s.guest("127.0.0.3").get(V2);
    assert_eq!(vb.status, 200, "{}", vb.text());
    assert_eq!(vb.json()["roles"], json!({"roles": "web-server"}));

    let bodies: Vec<Value> = target.requests().iter().map(Req::json).collect();
    assert_eq!(bodies.len(), 2, "{bodies:?}");
    let roles_for = |id: &Value| -> Vec<Value> {
        bodies
            .iter()
            .filter(|b| b["instance-id"] == *id)
            .map(|b| b["boot-roles"].clone())
            .collect()
    };
    assert_eq!(roles_for(&a["id"]), vec![json!("mail-server")]);
    assert_eq!(roles_for(&b["id"]), vec![json!("web-server")]);
}

#[test]
fn a_fatal_failure_puts_the_instance_in_error_and_reset_state_clears_it() {
    let tmp = tempfile::tempdir().unwrap();
    let (static_path, static_value) = static_file(tmp.path());
    let healthy = Arc::new(AtomicBool::new(false));
    let target = Target::start({
        let healthy = healthy.clone();
        move |_| {
            if healthy.load(Ordering::SeqCst) {
                Resp::json(json!({"ok": true}))
            } else {
                Resp::status(500)
            }
        }
    });
    let config = format!(
        r#"
[vendordata]
static_file = {static_file}

[[vendordata.dynamic]]
name = "billing"
url = "{url}"
failure = "fatal"
"#,
        static_file = q(&static_path),
        url = target.url,
    );
    let s = serve(tmp.path(), &config, None);
    let admin = s.admin();
    admin.create(&json!({"name": "fragile", "metadata_address": GUEST}));
    let guest = s.guest(GUEST);

    for _ in 0..2 {
        let a = guest.get(V2);
        assert_eq!(a.status, 503, "{}", a.text());
    }
    assert_eq!(target.requests().len(), 2, "failures are not cached");

    let view = admin.fetch(route::instance("fragile")).json();
    assert_eq!(view["state"], "error", "{view}");
    let reason = view["state_reason"].as_str().expect("a state_reason");
    assert!(
        reason.contains("billing") && reason.contains("500"),
        "{reason}"
    );

    let events = admin.fetch(route::events("fragile"));
    assert_eq!(events.status, 200, "{}", events.text());
    let events = events.json()["events"].as_array().unwrap().clone();
    let vendordata: Vec<&Value> = events
        .iter()
        .filter(|e| e["kind"] == "vendordata")
        .collect();
    assert_eq!(
        vendordata.len(),
        1,
        "one event for the same failure twice: {events:?}"
    );
    assert_eq!(vendordata[0]["message"], reason);

    // The operator sees why.
    let (ok, out, err) = cli(&s, &["show", "fragile"]);
    assert!(ok, "{err}");
    assert!(out.contains("error"), "{out}");
    assert!(out.contains(reason), "the reason is shown:\n{out}");

    // The rest of the metadata is still served.
    for path in [
        "/openstack/latest/meta_data.json",
        "/openstack/latest/vendor_data.json",
        "/latest/meta-data/instance-id",
    ] {
        let a = guest.get(path);
        assert_eq!(a.status, 200, "{path}: {}", a.text());
    }
    // A config drive needs the vendordata too.
    let drive = admin.fetch(route::config_drive("fragile", None));
    assert_eq!(drive.status, 503, "{}", drive.text());
    assert_eq!(drive.json()["error"]["code"], "vendordata_failed");

    let (ok, out, err) = cli(&s, &["reset-state", "fragile"]);
    assert!(ok, "{err}");
    assert!(out.contains("registered"), "{out}");
    let view = admin.fetch(route::instance("fragile")).json();
    assert_eq!(view["state"], "registered", "{view}");
    assert!(view["state_reason"].is_null(), "{view}");
    let events = admin.fetch(route::events("fragile")).json();
    assert_eq!(
        events["events"].as_array().unwrap().last().unwrap()["kind"],
        "reset-state",
        "{events}"
    );

    // Once the target recovers, the guest gets its vendordata.
    healthy.store(true, Ordering::SeqCst);
    let a = guest.get(V2);
    assert_eq!(a.status, 200, "{}", a.text());
    assert_eq!(
        a.json(),
        json!({"static": static_value, "billing": {"ok": true}})
    );
    let view = admin.fetch(route::instance("fragile")).json();
    assert_eq!(view["state"], "registered", "{view}");
}

#[test]
fn a_soft_failure_leaves_the_instance_alone() {
    let tmp = tempfile::tempdir().unwrap();
    let (static_path, static_value) = static_file(tmp.path());
    let broken = Target::start(|_| Resp::status(500));
    let slow = Target::start(|_| Resp::json(json!({"late": true})).after(Duration::from_secs(3)));
    let config = format!(
        r#"
[vendordata]
static_file = {static_file}

[[vendordata.dynamic]]
name = "t"
url = "{broken}"
failure = "soft"

[[vendordata.dynamic]]
name = "slow"
url = "{slow}"
read_timeout = 1
"#,
        static_file = q(&static_path),
        broken = broken.url,
        slow = slow.url,
    );
    let s = serve(tmp.path(), &config, None);
    s.admin()
        .create(&json!({"name": "sturdy", "metadata_address": GUEST}));

    let started = Instant::now();
    let a = s.guest(GUEST).get(V2);
    let took = started.elapsed();
    assert_eq!(a.status, 200, "{}", a.text());
    assert_eq!(
        a.json(),
        json!({"static": static_value, "t": {}, "slow": {}})
    );
    assert!(
        took < Duration::from_millis(2500),
        "the slow target must be cut off at read_timeout, took {took:?}"
    );
    assert_eq!(broken.requests().len(), 1);
    assert_eq!(slow.requests().len(), 1);

    let view = s.admin().fetch(route::instance("sturdy")).json();
    assert_eq!(view["state"], "registered", "{view}");
    assert!(view["state_reason"].is_null(), "{view}");
    let events = s.admin().fetch(route::events("sturdy")).json();
    assert_eq!(events["events"], json!([]), "{events}");

    // The reasons are logged.
    let log = s.log();
    assert!(log.contains("500"), "{log}");
    assert!(log.contains("read_timeout"), "{log}");
    assert_eq!(metric(&s, "cradle_vendordata_failures_total", "t"), Some(1));
    assert_eq!(
        metric(&s, "cradle_vendordata_failures_total", "slow"),
        Some(1)
    );
}

#[test]
fn one_hundred_concurrent_guests_share_one_upstream_call() {
    let tmp = tempfile::tempdir().unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let target = Target::start({
        let calls = calls.clone();
        move |_| {
            let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
            Resp::json(json!({"call": n})).after(Duration::from_millis(200))
        }
    });
    let config = format!(
        r#"
[[vendordata.dynamic]]
name = "count"
url = "{url}"
"#,
        url = target.url,
    );
    // A hundred connections at once from the one guest address: past the
    // per-source cap, which this test is not about.
    let config = format!("{config}\n[metadata]\nmax_connections_per_source = 0\nrate_limit = 0\n");
    let s = serve(tmp.path(), &config, None);
    s.admin()
        .create(&json!({"name": "popular", "metadata_address": GUEST}));

    const GUESTS: usize = 100;
    let barrier = Arc::new(Barrier::new(GUESTS));
    let answers: Vec<(u16, Vec<u8>)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..GUESTS)
            .map(|_| {
                let barrier = barrier.clone();
                let s = &s;
                scope.spawn(move || {
                    let guest = s.guest(GUEST);
                    barrier.wait();
                    let a = guest.get(V2);
                    (a.status, a.body)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });

    for (status, body) in &answers {
        assert_eq!(*status, 200, "{}", String::from_utf8_lossy(body));
        assert_eq!(body, &answers[0].1, "every guest got the same answer");
    }
    let first: Value = serde_json::from_slice(&answers[0].1).unwrap();
    assert_eq!(first, json!({"static": {}, "count": {"call": 1}}));
    assert_eq!(calls.load(Ordering::SeqCst), 1, "one upstream call");
    assert_eq!(target.requests().len(), 1);

    assert_eq!(
        metric(&s, "cradle_vendordata_upstream_calls_total", "count"),
        Some(1)
    );
    assert_eq!(
        metric(&s, "cradle_vendordata_cache_misses_total", "count"),
        Some(1)
    );
    assert_eq!(
        metric(&s, "cradle_vendordata_cache_hits_total", "count"),
        Some(GUESTS as u64 - 1)
    );
    assert_eq!(
        metric(&s, "cradle_vendordata_failures_total", "count"),
        Some(0)
    );
}

#[test]
fn the_service_token_rotates_without_a_restart() {
    const FIRST: &str = "tok-1";
    const SECOND: &str = "token-two";
    const CANARY: &str = "user-data-canary-0b9e4d";
    let tmp = tempfile::tempdir().unwrap();
    let token_path = tmp.path().join("service.token");
    std::fs::write(&token_path, format!("{FIRST}\n")).unwrap();
    let target = Target::start(|req| {
        Resp::json(json!({"authenticated": req.header("x-auth-token").is_some()}))
    });
    let config = format!(
        r#"
[[vendordata.dynamic]]
name = "rot"
url = "{url}"
token_file = {token}
cache_ttl = 0
"#,
        url = target.url,
        token = q(&token_path),
    );
    // The most verbose log there is: still no token, no user-data.
    let s = serve(tmp.path(), &config, Some("trace"));
    s.admin().create(&json!({
        "name": "rotating",
        "metadata_address": GUEST,
        "user_data": b64(CANARY.as_bytes()),
    }));
    let guest = s.guest(GUEST);

    let a = guest.get(V2);
    assert_eq!(a.status, 200, "{}", a.text());
    let seen = target.requests();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].header("x-auth-token"), Some(FIRST));
    assert_eq!(seen[0].json()["user-data"], b64(CANARY.as_bytes()));

    replace(&token_path, &format!("{SECOND}\n"));
    let a = guest.get(V2);
    assert_eq!(a.status, 200, "{}", a.text());
    let seen = target.requests();
    assert_eq!(seen.len(), 2, "cache_ttl = 0 calls every time");
    assert_eq!(seen[1].header("x-auth-token"), Some(SECOND));

    // Rewritten in place (same inode), longer again: still picked up.
    std::fs::write(&token_path, "token-number-three").unwrap();
    assert_eq!(guest.get(V2).status, 200);
    let seen = target.requests();
    assert_eq!(seen.len(), 3);
    assert_eq!(seen[2].header("x-auth-token"), Some("token-number-three"));

    let log = s.log();
    assert!(
        log.contains("metadata request") && log.contains("TRACE"),
        "the log is being written, at trace level: {log}"
    );
    for secret in [
        FIRST,
        SECOND,
        "token-number-three",
        CANARY,
        &b64(CANARY.as_bytes()),
    ] {
        assert!(!log.contains(secret), "{secret:?} is in the log:\n{log}");
    }
}

#[test]
fn a_bad_vendordata_config_stops_serve_with_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    // (the target's table, what stderr must name, the cause, said once)
    let cases: [(&str, &[&str], &str); 4] = [
        (
            "name = \"static\"\nurl = \"http://127.0.0.1:9/\"",
            &["\"static\"", "name"],
            "is reserved",
        ),
        (
            "name = \"ftp-target\"\nurl = \"ftp://127.0.0.1/vendordata\"",
            &["\"ftp-target\"", "url", "\"ftp\""],
            "scheme must be http or https",
        ),
        (
            "name = \"tokenless\"\nurl = \"http://127.0.0.1:9/\"\n\
             token_file = \"/nonexistent/cradle/vendordata.token\"",
            &[
                "\"tokenless\"",
                "token_file",
                "/nonexistent/cradle/vendordata.token",
            ],
            "No such file",
        ),
        (
            "name = \"typo\"\nurl = \"http://127.0.0.1:9/\"\nread_timout = 3",
            &["read_timout", "vendordata.dynamic"],
            "unknown field",
        ),
    ];
    for (n, (target, names, cause)) in cases.into_iter().enumerate() {
        let config = tmp.path().join(format!("bad-{n}.toml"));
        std::fs::write(&config, format!("[[vendordata.dynamic]]\n{target}\n")).unwrap();
        let data_dir = tmp.path().join(format!("data-{n}"));
        let stderr = serve_refuses(
            tmp.path(),
            &[
                std::ffi::OsStr::new("--config"),
                config.as_os_str(),
                std::ffi::OsStr::new("--data-dir"),
                data_dir.as_os_str(),
            ],
            &[],
        );
        for name in names {
            assert!(stderr.contains(name), "stderr names {name:?}:\n{stderr}");
        }
        assert_eq!(
            stderr.matches(cause).count(),
            1,
            "the cause, once:\n{stderr}"
        );
        assert!(
            !data_dir.exists(),
            "nothing is written before the configuration is checked"
        );
    }
}
