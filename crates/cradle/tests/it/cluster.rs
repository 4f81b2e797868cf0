//! Several `cradle serve` hosts on one real PostgreSQL server, each in a
//! network namespace of its own with its own data dir and listeners: each
//! serves the guests placed on it, every host sees every change, secrets
//! travel only to the host that serves them, and guests keep their metadata
//! while the database is down.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use cradle_model::api::InstancePatch;
use cradle_store::testkit::PgServer;
use serde_json::json;

use crate::harness::{BIN, Opts, Server, route};

pub(crate) const TOKEN: &str = "cluster-test-token-4b1d";

/// The environment of a host on `url`; with `tls` (its tls_dir) it has a
/// peer listener (on its own address, in a [`Lan`]).
pub(crate) fn host_env(url: &str, name: &str, tls: Option<&Path>) -> Vec<(&'static str, String)> {
    let mut env = vec![
        ("CRADLE_STORE_URL", url.to_string()),
        ("CRADLE_CLUSTER_HOST", name.to_string()),
        ("CRADLE_CLUSTER_RESYNC_INTERVAL", "1".to_string()),
        ("CRADLE_ADMIN_TOKEN", TOKEN.to_string()),
    ];
    if let Some(dir) = tls {
        env.push(("CRADLE_CLUSTER_TLS_DIR", dir.display().to_string()));
        env.push(("CRADLE_CLUSTER_PEER_LISTEN", "127.0.0.1:0".to_string()));
    }
    env
}

/// Hosts each in a network namespace of their own, on one bridge in the
/// test's namespace (10.250.N.1/24, N one per lab): host `i` is
/// 10.250.N.(11+i), and a guest is an address of the bridge, so the test
/// speaks as it from here. The hosts reach each other over the bridge,
/// PostgreSQL by its socket. Removed when dropped.
pub(crate) struct Lan {
    net: u8,
    bridge: String,
    hosts: Vec<String>,
}

impl Lan {
    pub(crate) fn new(n: usize) -> Lan {
        static LABS: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(1);
        let net = LABS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let tag = format!("{}{net}", std::process::id() % 10_000);
        let ip = |args: &[&str]| {
            let out = Command::new("ip").args(args).output().unwrap();
            assert!(
                out.status.success(),
                "ip {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let bridge = format!("cb{tag}");
        let lan = Lan {
            net,
            bridge: bridge.clone(),
            hosts: (1..=n).map(|i| format!("cradle-h{tag}-{i}")).collect(),
        };
        ip(&["link", "add", &bridge, "type", "bridge"]);
        ip(&["addr", "add", &format!("10.250.{net}.1/24"), "dev", &bridge]);
        ip(&["link", "set", &bridge, "up"]);
        for (i, ns) in lan.hosts.iter().enumerate() {
            let veth = format!("ch{tag}{}", i + 1);
            ip(&["netns", "add", ns]);
            ip(&[
                "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", ns,
            ]);
            ip(&["link", "set", &veth, "master", &bridge, "up"]);
            let addr = format!("{}/24", lan.host_ip(i));
            ip(&["-n", ns, "addr", "add", &addr, "dev", "eth0"]);
            ip(&["-n", ns, "link", "set", "eth0", "up"]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        lan
    }

    /// The bridge's address: the test's side, where its sshd listens too.
    pub(crate) fn bridge_ip(&self) -> std::net::Ipv4Addr {
        std::net::Ipv4Addr::new(10, 250, self.net, 1)
    }

    pub(crate) fn host_ip(&self, i: usize) -> String {
        format!("10.250.{}.{}", self.net, 11 + i)
    }

    /// A guest's address (the bridge answers for it).
    pub(crate) fn guest(&self, k: u8) -> String {
        let a = format!("10.250.{}.{}", self.net, 100 + k);
        let _ = Command::new("ip")
            .args(["addr", "add", &format!("{a}/32"), "dev", &self.bridge])
            .output();
        a
    }

    /// Host `i` (0-based) of the cluster on `url`, in its namespace.
    fn host(
        &self,
        i: usize,
        url: &str,
        name: &str,
        tls: Option<&Path>,
        data: Option<&Path>,
    ) -> Server {
        self.host_with(i, host_env(url, name, tls), data)
    }

    /// Host `i` with the environment `env` (from [`host_env`], and more).
    pub(crate) fn host_with(
        &self,
        i: usize,
        mut env: Vec<(&'static str, String)>,
        data: Option<&Path>,
    ) -> Server {
        let ip = self.host_ip(i);
        for (k, v) in env.iter_mut() {
            if *k == "CRADLE_CLUSTER_PEER_LISTEN" {
                *v = format!("{ip}:0");
            }
        }
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let listen = format!("{ip}:0");
        Server::start_with(Opts {
            env: &env,
            data_dir: data,
            netns: Some(&self.hosts[i]),
            admin_listen: Some(&listen),
            metadata_listen: Some(&listen),
            ..Default::default()
        })
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        for ns in &self.hosts {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
        let _ = Command::new("ip")
            .args(["link", "del", &self.bridge])
            .output();
    }
}

/// `cradle cluster init`, then `cradle cluster join` for each host, its
/// certificate naming its address; the CA's dir and each host's tls_dir.
pub(crate) fn credentials(dir: &Path, hosts: &[(&str, &str)]) -> (PathBuf, Vec<PathBuf>) {
    let ca = dir.join("ca");
    let cradle = |args: &[&str]| Command::new(BIN).args(args).output().unwrap();
    let made = cradle(&["cluster", "init", "--dir", ca.to_str().unwrap()]);
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    let again = cradle(&["cluster", "init", "--dir", ca.to_str().unwrap()]);
    assert!(!again.status.success(), "init must not replace a CA");
    assert!(String::from_utf8_lossy(&again.stderr).contains("refusing to replace"));
    let mut dirs = Vec::new();
    for (h, address) in hosts {
        let out = dir.join(format!("tls-{h}"));
        let joined = cradle(&[
            "cluster",
            "join",
            h,
            "--ca",
            ca.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--address",
            address,
        ]);
        assert!(
            joined.status.success(),
            "{}",
            String::from_utf8_lossy(&joined.stderr)
        );
        let mode = std::fs::metadata(out.join("host.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "host.key is private");
        dirs.push(out);
    }
    (ca, dirs)
}

/// Poll `f` until it is true; how long that took.
#[track_caller]
pub(crate) fn within(limit: Duration, what: &str, mut f: impl FnMut() -> bool) -> Duration {
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
    let tmp = tempfile::tempdir().unwrap();
    // Each host in a network namespace of its own.
    let lan = Lan::new(3);
    let (ca, tls) = credentials(
        tmp.path(),
        &[("node-a", &lan.host_ip(0)), ("node-b", &lan.host_ip(1))],
    );
    let a = lan.host(0, &url, "node-a", Some(&tls[0]), None);
    let mut b = lan.host(1, &url, "node-b", Some(&tls[1]), None);
    // C has no cluster credentials: it cannot hand secrets on.
    let c = lan.host(2, &url, "node-c", None, None);
    let (g21, g22, g23) = (lan.guest(21), lan.guest(22), lan.guest(23));

    // Made through A, placed on B and on C.
    let on_b = a.admin().create(&json!({
        "name": "web-b", "host": "node-b", "metadata_address": g21,
    }));
    assert_eq!(on_b["host"], "node-b");
    a.admin().create(&json!({
        "name": "web-c", "host": "node-c", "metadata_address": g22,
    }));
    let id_b = on_b["id"].as_str().unwrap().to_string();

    let path = "/latest/meta-data/hostname";
    let took = within(Duration::from_secs(3), "B serves web-b", || {
        b.guest(&g21).get(path).status == 200
    });
    eprintln!("a create through A was served by B after {took:?}");
    assert_eq!(b.guest(&g21).get(path).text(), "web-b");
    within(Duration::from_secs(3), "C serves web-c", || {
        c.guest(&g22).get(path).status == 200
    });
    // Only its own host serves a guest: the others answer as for a stranger.
    assert_eq!(a.guest(&g21).get(path).status, 404);
    assert_eq!(c.guest(&g21).get(path).status, 404);
    assert_eq!(b.guest(&g22).get(path).status, 404);

    // Modified through B: A's admin view and C's guest see it. C's guest,
    // waiting for a change, is woken by C's catching up, with no polling.
    std::thread::scope(|t| {
        let waiter = t.spawn(|| {
            c.guest(&g22)
                .get("/openstack/latest/meta_data.json?wait=true&timeout_sec=30")
        });
        within(Duration::from_secs(5), "C's guest waits", || {
            crate::harness::metric(
                &c.admin().fetch(route::metrics()).text(),
                "cradle_metadata_waiting",
            ) == 1.0
        });
        let start = std::time::Instant::now();
        b.admin()
            .send(route::modify_instance("web-c", &meta("role", "db")));
        let woken = waiter.join().unwrap();
        eprintln!(
            "a change through B woke C's waiting guest after {:?}",
            start.elapsed()
        );
        assert_eq!(woken.status, 200);
        assert_eq!(woken.json()["meta"]["role"], "db");
        assert!(start.elapsed() < Duration::from_secs(3));
    });
    within(Duration::from_secs(3), "C's guest sees the change", || {
        c.guest(&g22).get("/openstack/latest/meta_data.json").json()["meta"]["role"] == "db"
    });
    within(Duration::from_secs(3), "A's admin view sees it", || {
        a.admin()
            .send(route::instance("web-c"))
            .metadata
            .get("role")
            == Some(&"db".into())
    });

    // A secret for B's instance, given to A, is handed to B over mutual
    // TLS and lives only there. C, with no credentials, refuses it.
    let mut secret = InstancePatch::default();
    secret.os_params.secret.insert(
        "db_password".into(),
        Some(cradle_model::Secret::new("CLUSTER-SECRET-CANARY".into())),
    );
    let refused = c.admin().fetch(route::modify_instance("web-b", &secret));
    assert_eq!(refused.status, 409, "{}", refused.text());
    assert_eq!(refused.json()["error"]["code"], "wrong_host");
    assert!(refused.text().contains("node-b"), "{}", refused.text());
    let taken = a.admin().send(route::modify_instance("web-b", &secret));
    assert_eq!(
        taken.os_params.secret,
        ["db_password"],
        "B's view, through A"
    );
    assert_eq!(
        b.admin().send(route::instance("web-b")).os_params.secret,
        ["db_password"]
    );
    assert!(
        a.admin()
            .send(route::instance("web-b"))
            .os_params
            .secret
            .is_empty(),
        "A keeps no copy"
    );
    // It reaches B's guest, and no other host answers that guest at all.
    let params = "/cradle/latest/os/parameters.json";
    let read = b.guest(&g21).get(params);
    assert_eq!(read.status, 200, "{}", read.text());
    assert_eq!(
        read.json()["db_password"],
        json!(["CLUSTER-SECRET-CANARY", "secret"])
    );
    assert_eq!(a.guest(&g21).get(params).status, 404);
    assert_eq!(c.guest(&g21).get(params).status, 404);
    // Created through A with a secret, placed on B: made by B.
    let mut spec: cradle_model::api::InstanceSpec = serde_json::from_value(json!({
        "name": "web-b2", "host": "node-b", "metadata_address": g23,
    }))
    .unwrap();
    spec.os_params.secret.insert(
        "token".into(),
        cradle_model::Secret::new("CLUSTER-SECRET-CANARY".into()),
    );
    let made = a.admin().send(route::create_instance(&spec));
    assert_eq!(made.host, "node-b");
    assert_eq!(
        b.admin().send(route::instance("web-b2")).os_params.secret,
        ["token"]
    );
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

    // The peer listener takes only certificates of the cluster's CA, and
    // offers only create and modify.
    let peer = cluster_peer_url(&a, "node-b");
    let curl = |cert: bool, path: &str| {
        let mut cmd = Command::new("curl");
        cmd.args(["-sS", "--max-time", "5", "--cacert"])
            .arg(ca.join("ca.pem"));
        if cert {
            cmd.arg("--cert")
                .arg(tls[0].join("host.pem"))
                .arg("--key")
                .arg(tls[0].join("host.key"));
        }
        cmd.arg(format!("{peer}{path}")).output().unwrap()
    };
    assert!(
        !curl(false, "/v1/instances").status.success(),
        "a client without a certificate got in"
    );
    let other = curl(true, "/v1/whoami");
    assert!(
        other.status.success(),
        "{}",
        String::from_utf8_lossy(&other.stderr)
    );
    assert!(
        String::from_utf8_lossy(&other.stdout).contains("no such route on the peer listener"),
        "{}",
        String::from_utf8_lossy(&other.stdout)
    );

    // The canary reached no disk, no dump and no log of any host.
    for dir in [&a.data_dir, &b.data_dir, &c.data_dir, &pg.data_dir()] {
        assert_eq!(grep(dir, "CLUSTER-SECRET-CANARY"), Vec::<String>::new());
    }
    let dump = String::from_utf8_lossy(&pg.dump("postgres").unwrap()).into_owned();
    assert!(!dump.contains("CLUSTER-SECRET-CANARY"));
    assert!(dump.contains("web-b"), "the dump has the data");
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
    let b2 = lan.host(1, &url, "node-b", Some(&tls[1]), Some(&data_b));
    let doc = b2.guest(&g21).get("/openstack/latest/meta_data.json");
    assert_eq!(doc.status, 200);
    assert_eq!(doc.json()["meta"]["while"], "b-was-down");
    let events = b2.admin().send(route::events("web-b"));
    assert!(
        events.iter().any(|e| e.kind == "secrets"
            && e.message.contains("host node-b restarted")
            && e.message.contains("db_password")),
        "{:?}",
        events.iter().map(|e| &e.message).collect::<Vec<_>>()
    );
    assert!(!format!("{events:?}").contains("CLUSTER-SECRET-CANARY"));
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
        b2.guest(&g21).get(path).status == 404
    });
    let names: Vec<_> = b2
        .admin()
        .send(route::instances())
        .into_iter()
        .map(|i| i.name)
        .collect();
    let mut names = names;
    names.sort();
    assert_eq!(names, ["web-b2", "web-c"]);

    // `cradle cluster show` lists every host.
    let out = Command::new(BIN)
        .args(["cluster", "show", "--url", &a.admin_url])
        .env("CRADLE_ADMIN_TOKEN", TOKEN)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("this host: node-a (store: postgres)"),
        "{text}"
    );
    for h in ["node-a", "node-b", "node-c"] {
        assert!(text.contains(h), "{text}");
    }
    // A placement on a host that never joined is refused.
    let unknown = a.admin().fetch_raw(
        route::create_instance(&Default::default()),
        r#"{"name": "x", "host": "node-z"}"#,
    );
    assert_eq!(unknown.status, 422, "{}", unknown.text());
    assert_eq!(unknown.json()["error"]["code"], "unknown_host");
}

/// Host `name`'s peer URL, as the cluster records it.
fn cluster_peer_url(via: &Server, name: &str) -> String {
    let cluster = via.admin().send(route::cluster());
    let h = cluster
        .hosts
        .iter()
        .find(|h| h.name == name)
        .expect("the host is known");
    assert!(h.up);
    h.peer_url.clone()
}

#[test]
fn guests_are_served_while_the_database_is_down_and_no_acknowledged_write_is_lost() {
    let pg = PgServer::start().expect("start PostgreSQL");
    let url = pg.url();
    let lan = Lan::new(2);
    // The guests read as fast as they can, far past any guest's budget:
    // this test is about reads being answered, not how often.
    let unmetered = |name| {
        let mut env = host_env(&url, name, None);
        env.push(("CRADLE_METADATA_RATE_LIMIT", "0".into()));
        env
    };
    let a = lan.host_with(0, unmetered("node-a"), None);
    let b = lan.host_with(1, unmetered("node-b"), None);
    let (g31, g32) = (lan.guest(31), lan.guest(32));
    a.admin().create(&json!({
        "name": "g-a", "host": "node-a", "metadata_address": g31,
    }));
    a.admin().create(&json!({
        "name": "g-b", "host": "node-b", "metadata_address": g32,
    }));
    within(Duration::from_secs(3), "B serves g-b", || {
        b.guest(&g32).get("/latest/meta-data/hostname").status == 200
    });

    let stop = Arc::new(AtomicBool::new(false));
    let reads = Arc::new(AtomicUsize::new(0));
    let failed_reads = Arc::new(AtomicUsize::new(0));
    let mut readers = Vec::new();
    for (server, source) in [(&a, g31.as_str()), (&b, g32.as_str())] {
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

pub(crate) fn grep(dir: &std::path::Path, needle: &str) -> Vec<String> {
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
