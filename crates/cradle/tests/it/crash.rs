//! Nothing acknowledged is lost when `cradle serve` dies. Eight writers
//! create, modify and remove instances (with public, private and secret
//! parameters), queue messages, add and delete rules, and attach and
//! detach groups, while the server is killed with SIGKILL at random
//! moments and restarted on the same store, over and over. Afterwards:
//! - every write answered 2xx is there with its exact content;
//! - a write answered with an error left nothing, and one that got no
//!   answer (the kill came first) is there whole or not at all: never an
//!   instance without its own group, a rule without its group, half a
//!   modification;
//! - secret parameters are gone (they live in memory only) and never
//!   reached the store;
//! - SQLite's `PRAGMA integrity_check` is ok.
//!
//! The same against PostgreSQL, and with the firewall enforcing in a
//! namespace the test makes, where after each restart the kernel's table
//! equals the registry's rendering of it loaded into a clean namespace.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use cradle_client::{Target, blocking::Client};
use cradle_model::api::MessageIn;
use cradle_secgroups::RuleRequest;
use cradle_secgroups::api::GroupRequest;
use serde_json::{Value, json};

use crate::firewall::common::{Netns, normalized};
use crate::harness::*;

const WRITERS: usize = 8;
const KILLS: usize = 20;
const SECRET: &str = "crash-secret-canary-5xq";

/// A tiny PRNG: the seed is printed, so a failing run can be replayed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// What an instance is, as the test can check it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Inst {
    hostname: String,
    private: String,
    /// Shared groups it is attached to.
    groups: BTreeSet<String>,
}

/// One instance of a writer's: what it is now, and when the last write to
/// it got no answer, what it may be instead. A doubtful instance is left
/// alone from then on.
#[derive(Debug, Default)]
struct Entry {
    name: String,
    addr: String,
    now: Option<Inst>,
    instead: Option<Option<Inst>>,
    id: Option<String>,
    messages: Vec<String>,
    maybe_messages: Vec<String>,
}

#[derive(Debug, Default)]
struct RuleEntry {
    id: Option<String>,
    present: bool,
    doubtful: bool,
}

#[derive(Default)]
struct Ledger {
    instances: Vec<Entry>,
    /// Rules of the writer's shared group, by their (unique) port.
    rules: BTreeMap<u16, RuleEntry>,
}

/// How a write ended.
enum Outcome {
    Done(Value),
    Refused,
    NoAnswer,
}

/// The server the writers see, restarted under them.
struct Shared {
    target: RwLock<Option<Target>>,
    /// Writers hold it for each write; the killer takes it whole to check
    /// the firewall against a registry that nothing changes.
    gate: RwLock<()>,
    stop: AtomicBool,
    acked: AtomicU64,
    refused: AtomicU64,
    unanswered: AtomicU64,
}

fn write(shared: &Shared, req: &Request<impl Sized>) -> Option<Outcome> {
    let _g = shared.gate.read().unwrap();
    let target = shared.target.read().unwrap().clone()?;
    let client = Client::new(target.timeout(Duration::from_secs(10))).unwrap();
    Some(match client.fetch(req) {
        Err(_) => {
            shared.unanswered.fetch_add(1, Ordering::Relaxed);
            Outcome::NoAnswer
        }
        Ok(r) if (200..300).contains(&r.status) => {
            shared.acked.fetch_add(1, Ordering::Relaxed);
            Outcome::Done(serde_json::from_slice(&r.body).unwrap_or(Value::Null))
        }
        Ok(_) => {
            shared.refused.fetch_add(1, Ordering::Relaxed);
            Outcome::Refused
        }
    })
}

fn tenant(w: usize) -> String {
    format!("crash{w}")
}

/// One writer's life: random writes until told to stop.
fn writer(w: usize, shared: Arc<Shared>, group: String, seed: u64) -> Ledger {
    let mut rng = Rng(seed | 1);
    let mut ledger = Ledger::default();
    let mut n = 0u32;
    let mut port = 1000u16;
    while !shared.stop.load(Ordering::Relaxed) {
        let live: Vec<usize> = (0..ledger.instances.len())
            .filter(|&i| {
                let e = &ledger.instances[i];
                e.instead.is_none() && e.now.is_some()
            })
            .collect();
        let pick = |rng: &mut Rng| live[rng.below(live.len() as u64) as usize];
        let op = rng.below(100);
        match op {
            _ if live.len() < 2 || op < 20 => {
                n += 1;
                let name = format!("w{w}-{n}");
                let addr = format!("127.{}.{}.{}", 100 + w, n / 250, 1 + n % 250);
                let inst = Inst {
                    hostname: format!("h{n}-0"),
                    private: format!("private-{w}-{n}-0"),
                    groups: BTreeSet::new(),
                };
                let spec: cradle_model::api::InstanceSpec = serde_json::from_value(json!({
                    "name": name, "project_id": tenant(w), "metadata_address": addr,
                    "hostname": inst.hostname,
                    "interface": format!("c{w}x{n}"),
                    "mac": format!("02:00:00:{w:02x}:{:02x}:{:02x}", n / 256, n % 256),
                    "os_params": {
                        "public": {"pub": format!("public-{w}-{n}")},
                        "private": {"priv": inst.private},
                        "secret": {"sec": SECRET},
                    },
                }))
                .unwrap();
                let Some(out) = write(&shared, &route::create_instance(&spec)) else {
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                };
                let mut e = Entry {
                    name,
                    addr,
                    ..Default::default()
                };
                match out {
                    Outcome::Done(v) => {
                        e.id = Some(v["id"].as_str().unwrap().to_string());
                        e.now = Some(inst);
                    }
                    Outcome::Refused => {}
                    Outcome::NoAnswer => e.instead = Some(Some(inst)),
                }
                ledger.instances.push(e);
            }
            20..45 => {
                let i = pick(&mut rng);
                let e = &mut ledger.instances[i];
                let mut next = e.now.clone().unwrap();
                let v: u32 = next.hostname.rsplit('-').next().unwrap().parse().unwrap();
                next.hostname = format!("{}-{}", next.hostname.rsplit_once('-').unwrap().0, v + 1);
                next.private = format!("{}-{}", next.private.rsplit_once('-').unwrap().0, v + 1);
                let patch: cradle_model::api::InstancePatch = serde_json::from_value(json!({
                    "hostname": next.hostname,
                    "os_params": {"private": {"priv": next.private}, "secret": {"sec": SECRET}},
                }))
                .unwrap();
                let key = e.id.clone().unwrap();
                let Some(out) = write(&shared, &route::modify_instance(&key, &patch)) else {
                    continue;
                };
                settle(e, out, Some(next));
            }
            45..55 => {
                let i = pick(&mut rng);
                let e = &mut ledger.instances[i];
                let key = e.id.clone().unwrap();
                let Some(out) = write(&shared, &route::remove_instance(&key)) else {
                    continue;
                };
                settle(e, out, None);
            }
            55..70 => {
                let i = pick(&mut rng);
                let e = &mut ledger.instances[i];
                let text = format!("{}-m{}", e.name, e.messages.len() + e.maybe_messages.len());
                let msg = MessageIn {
                    text: Some(text.clone()),
                    data: None,
                };
                let key = e.id.clone().unwrap();
                let Some(out) = write(&shared, &route::send_message(&key, &msg)) else {
                    continue;
                };
                match out {
                    Outcome::Done(_) => e.messages.push(text),
                    Outcome::Refused => {}
                    Outcome::NoAnswer => e.maybe_messages.push(text),
                }
            }
            70..80 => {
                port += 1;
                let rule: RuleRequest = serde_json::from_value(json!({
                    "protocol": "tcp", "from_port": port, "to_port": port, "cidr": "10.0.0.0/8",
                }))
                .unwrap();
                let Some(out) = write(&shared, &route::add_rule(&tenant(w), &group, &rule)) else {
                    continue;
                };
                let r = ledger.rules.entry(port).or_default();
                match out {
                    Outcome::Done(v) => {
                        r.id = Some(v["security_group_rule"]["id"].as_str().unwrap().to_string());
                        r.present = true;
                    }
                    Outcome::Refused => {}
                    Outcome::NoAnswer => r.doubtful = true,
                }
            }
            85..90 => {
                // Writes refused by design: a taken name, a bad hostname.
                // They must change nothing, crash or not.
                let i = pick(&mut rng);
                let e = &ledger.instances[i];
                let req = if rng.below(2) == 0 {
                    let spec: cradle_model::api::InstanceSpec = serde_json::from_value(json!({
                        "name": e.name, "project_id": tenant(w),
                        "metadata_address": format!("127.{}.255.{}", 100 + w, 1 + rng.below(250)),
                    }))
                    .unwrap();
                    route::create_instance(&spec)
                } else {
                    let patch: cradle_model::api::InstancePatch =
                        serde_json::from_value(json!({"hostname": "-not-a-hostname"})).unwrap();
                    route::modify_instance(e.id.as_ref().unwrap(), &patch)
                };
                if let Some(Outcome::Done(v)) = write(&shared, &req) {
                    panic!("a write that must be refused was done: {v}");
                }
            }
            80..85 => {
                let Some((_, r)) = ledger
                    .rules
                    .iter_mut()
                    .find(|(_, r)| r.present && !r.doubtful)
                else {
                    continue;
                };
                let id = r.id.clone().unwrap();
                let Some(out) = write(&shared, &route::delete_rule(&tenant(w), &id)) else {
                    continue;
                };
                match out {
                    Outcome::Done(_) => r.present = false,
                    Outcome::Refused => {}
                    Outcome::NoAnswer => r.doubtful = true,
                }
            }
            _ => {
                let i = pick(&mut rng);
                let e = &mut ledger.instances[i];
                let mut next = e.now.clone().unwrap();
                let key = e.id.clone().unwrap();
                let req = if next.groups.remove(&group) {
                    route::detach_group(&tenant(w), &group, &key)
                } else {
                    next.groups.insert(group.clone());
                    route::attach_group(&tenant(w), &group, &key)
                };
                let Some(out) = write(&shared, &req) else {
                    continue;
                };
                settle(e, out, Some(next));
            }
        }
    }
    ledger
}

/// Record how a write to `e` that would make it `next` ended.
fn settle(e: &mut Entry, out: Outcome, next: Option<Inst>) {
    match out {
        Outcome::Done(_) => e.now = next,
        Outcome::Refused => {}
        Outcome::NoAnswer => e.instead = Some(next),
    }
}

struct Setup<'a> {
    env: Vec<(&'a str, String)>,
    firewall: Option<(&'a Netns, &'a Netns)>,
}

fn start(data_dir: &Path, setup: &Setup<'_>) -> Server {
    let env: Vec<(&str, &str)> = setup.env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    Server::start_with(Opts {
        data_dir: Some(data_dir),
        env: &env,
        log: Some("warn"),
        ..Default::default()
    })
}

/// Wait for the worker's first full apply, then compare the kernel's table
/// with the registry's rendering loaded into the clean namespace.
fn kernel_equals_registry(s: &Server, host: &Netns, clean: &Netns) {
    let deadline = Instant::now() + Duration::from_secs(30);
    let fw = loop {
        let fw = s.admin().fetch(route::firewall()).json();
        if fw["wanted_generation"].as_u64() > Some(0)
            && fw["wanted_generation"] == fw["applied_generation"]
        {
            break fw;
        }
        assert!(
            Instant::now() < deadline,
            "the firewall was never applied: {fw}"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let text = fw["ruleset"].as_str().unwrap();
    // Gone already the first time.
    let _ = clean
        .command("nft")
        .args(["delete", "table", "inet", "cradle"])
        .stderr(std::process::Stdio::null())
        .status();
    let mut load = clean.command("nft");
    load.args(["-f", "-"]).stdin(std::process::Stdio::piped());
    let mut child = load.spawn().unwrap();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), text.as_bytes()).unwrap();
    assert!(
        child.wait().unwrap().success(),
        "nft -f refused the registry's ruleset"
    );
    let kernel = normalized(&host.nft().list_table("cradle").unwrap());
    let registry = normalized(&clean.nft().list_table("cradle").unwrap());
    assert_eq!(kernel, registry, "the kernel's table is not the registry's");
}

/// Where the registry is, and how to read all of it back.
enum Store<'a> {
    Sqlite,
    Postgres(&'a cradle_store::testkit::PgServer, &'a str),
}

fn run(name: &str, setup: Setup<'_>, store: Store<'_>) {
    let tmp = tempfile::tempdir().unwrap();
    let data_dir = tmp.path().join("data");
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    let mut server = start(&data_dir, &setup);
    let token = server.token.clone();
    let shared = Arc::new(Shared {
        target: RwLock::new(Some(
            Target::new(&server.admin_url, token.clone()).no_proxy(),
        )),
        gate: RwLock::new(()),
        stop: AtomicBool::new(false),
        acked: AtomicU64::new(0),
        refused: AtomicU64::new(0),
        unanswered: AtomicU64::new(0),
    });
    // Each writer's shared group, made before any kill.
    let groups: Vec<String> = (0..WRITERS)
        .map(|w| {
            let g = server.admin().send(route::create_security_group(
                &tenant(w),
                &GroupRequest {
                    name: format!("g{w}"),
                    ..Default::default()
                },
            ));
            g.id.to_string()
        })
        .collect();
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let (shared, group) = (shared.clone(), groups[w].clone());
            std::thread::spawn(move || writer(w, shared, group, seed.wrapping_add(w as u64 * 7919)))
        })
        .collect();
    let mut rng = Rng(seed | 1);
    let mut restarts = Vec::new();
    for _ in 0..KILLS {
        std::thread::sleep(Duration::from_millis(150 + rng.below(450)));
        *shared.target.write().unwrap() = None;
        server.kill();
        let t = Instant::now();
        server = start(&data_dir, &setup);
        restarts.push(t.elapsed());
        if let Some((host, clean)) = setup.firewall {
            let _quiet = shared.gate.write().unwrap();
            kernel_equals_registry(&server, host, clean);
        }
        *shared.target.write().unwrap() =
            Some(Target::new(&server.admin_url, token.clone()).no_proxy());
    }
    shared.stop.store(true, Ordering::Relaxed);
    let ledgers: Vec<Ledger> = writers.into_iter().map(|h| h.join().unwrap()).collect();
    // One more crash with nothing in flight: every secret is gone after it.
    server.kill();
    if let Store::Sqlite = store {
        let db = data_dir.join("cradle.db");
        let c = rusqlite::Connection::open(&db).unwrap();
        let ok: String = c
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))
            .unwrap();
        assert_eq!(ok, "ok", "{}", db.display());
    }
    let server = start(&data_dir, &setup);
    if let Some((host, clean)) = setup.firewall {
        kernel_equals_registry(&server, host, clean);
    }
    let checked = verify(&server, &ledgers, &groups);
    restarts.sort();
    println!(
        "crash ({name}, seed {seed}): {KILLS} kills, {} writes acknowledged, {} refused, {} unanswered; {} objects checked, 0 lost; restart median {:?}",
        shared.acked.load(Ordering::Relaxed),
        shared.refused.load(Ordering::Relaxed),
        shared.unanswered.load(Ordering::Relaxed),
        checked,
        restarts[restarts.len() / 2],
    );
    for (path, bytes) in files_under(&data_dir) {
        assert!(
            !contains(&bytes, SECRET),
            "the secret reached {}",
            path.display()
        );
    }
    if let Store::Postgres(pg, db) = store {
        assert!(
            !contains(&pg.dump(db).unwrap(), SECRET),
            "the secret reached PostgreSQL"
        );
        for (path, bytes) in files_under(&pg.data_dir()) {
            assert!(
                !contains(&bytes, SECRET),
                "the secret reached {}",
                path.display()
            );
        }
    }
}

/// Compare what the server holds with every ledger; the count of objects
/// checked.
fn verify(s: &Server, ledgers: &[Ledger], groups: &[String]) -> usize {
    let admin = s.admin();
    let mut checked = 0;
    let mut lost = Vec::new();
    for (w, ledger) in ledgers.iter().enumerate() {
        let listed: Vec<Value> = serde_json::to_value(admin.send(route::instances()))
            .unwrap()
            .as_array()
            .unwrap()
            .iter()
            .filter(|v| v["project_id"] == tenant(w).as_str())
            .cloned()
            .collect();
        let by_name: BTreeMap<String, &Value> = listed
            .iter()
            .map(|v| (v["name"].as_str().unwrap().to_string(), v))
            .collect();
        let known: BTreeSet<&str> = ledger.instances.iter().map(|e| e.name.as_str()).collect();
        for name in by_name.keys() {
            assert!(known.contains(name.as_str()), "{name} was never asked for");
        }
        for e in &ledger.instances {
            checked += 1;
            let seen = by_name
                .get(&e.name)
                .map(|v| observe(s, v, &e.addr, groups[w].as_str()));
            let mut may = vec![e.now.clone()];
            may.extend(e.instead.clone());
            if !may.contains(&seen) {
                lost.push(format!("{}: is {seen:?}, may be {may:?}", e.name));
            }
            if seen.is_some() {
                let id = by_name[&e.name]["id"].as_str().unwrap();
                let own = admin.fetch(route::security_group(&tenant(w), id));
                assert_eq!(own.status, 200, "{} has no group of its own", e.name);
                assert_eq!(own.json()["security_group"]["instance_id"], id);
                let got = drain(s, &e.addr);
                for m in &e.messages {
                    if !got.contains(m) {
                        lost.push(format!("{}: message {m} lost", e.name));
                    }
                }
                for m in &got {
                    assert!(
                        e.messages.contains(m) || e.maybe_messages.contains(m),
                        "{}: message {m} was never sent",
                        e.name
                    );
                }
            }
        }
        let rules = sg_group(s, &tenant(w), &groups[w]);
        let ports: BTreeMap<u64, &Value> = rules["rules"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| (r["from_port"].as_u64().unwrap(), r))
            .collect();
        for (port, r) in &ledger.rules {
            checked += 1;
            let seen = ports.get(&u64::from(*port));
            if !r.doubtful && r.present != seen.is_some() {
                lost.push(format!(
                    "rule {port} of writer {w}: present {}",
                    seen.is_some()
                ));
            }
            if let Some(v) = seen {
                assert_eq!(
                    (&v["protocol"], &v["to_port"], &v["cidr"]),
                    (&json!("tcp"), &json!(port), &json!("10.0.0.0/8")),
                    "rule {port} of writer {w}"
                );
            }
        }
        for port in ports.keys() {
            assert!(
                ledger.rules.contains_key(&(*port as u16)),
                "rule {port} was never asked for"
            );
        }
    }
    assert!(
        lost.is_empty(),
        "lost after the crashes:\n{}",
        lost.join("\n")
    );
    checked
}

/// The instance as its guest and the admin API show it.
fn observe(s: &Server, view: &Value, addr: &str, shared_group: &str) -> Inst {
    let params = s.guest(addr).get("/cradle/latest/os/parameters.json");
    assert_eq!(params.status, 200, "{}", params.text());
    let params = params.json();
    assert!(
        !params.to_string().contains(SECRET),
        "a secret parameter outlived the crash"
    );
    let id = view["id"].as_str().unwrap();
    let groups = s.admin().send(route::instance_groups(id));
    Inst {
        hostname: view["hostname"].as_str().unwrap().to_string(),
        private: params["priv"][0].as_str().unwrap_or_default().to_string(),
        groups: groups
            .iter()
            .map(|g| g.id.to_string())
            .filter(|g| g == shared_group)
            .collect(),
    }
}

/// Every message queued for the guest at `addr`, read as it reads them.
fn drain(s: &Server, addr: &str) -> Vec<String> {
    let g = s.guest(addr);
    let mut out = Vec::new();
    loop {
        let a = g.get("/cradle/latest/read");
        if a.status == 204 {
            return out;
        }
        assert_eq!(a.status, 200, "{}", a.text());
        out.push(a.text());
    }
}

fn no_limits() -> Vec<(&'static str, String)> {
    // The check reads every message as fast as it can.
    vec![("CRADLE_METADATA_RATE_LIMIT", "0".to_string())]
}

#[test]
fn nothing_acknowledged_is_lost_when_the_server_is_killed() {
    let setup = Setup {
        env: no_limits(),
        firewall: None,
    };
    run("sqlite", setup, Store::Sqlite);
}

#[test]
fn nothing_acknowledged_is_lost_when_the_server_is_killed_on_postgres() {
    let pg = cradle_store::testkit::PgServer::start().expect("PostgreSQL starts");
    let url = pg.create_database("crash").unwrap();
    let mut env = no_limits();
    env.push(("CRADLE_STORE_URL", url));
    let setup = Setup {
        env,
        firewall: None,
    };
    run("postgres", setup, Store::Postgres(&pg, "crash"));
}

#[test]
fn after_each_crash_the_kernel_table_is_the_registrys() {
    let host = Netns::new("crash");
    let clean = Netns::new("crash-ref");
    let mut env = no_limits();
    env.push(("CRADLE_FIREWALL_ENABLED", "true".to_string()));
    env.push(("CRADLE_FIREWALL_NETNS", host.name.clone()));
    let setup = Setup {
        env,
        firewall: Some((&host, &clean)),
    };
    run("sqlite, firewall enforcing", setup, Store::Sqlite);
}
