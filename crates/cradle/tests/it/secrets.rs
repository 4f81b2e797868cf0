//! Private and secret OS parameters, followed everywhere they could go.
//!
//! Unique canaries are registered as private and secret parameters of two
//! instances; every admin and metadata path is exercised at trace logging;
//! the server is restarted on the same data directory and exercised again.
//! Then every admin response, both logs and every file in the data directory
//! are searched for them.

use std::collections::BTreeMap;
use std::path::Path;

use cradle_client::Method;
use cradle_model::api::{InstancePatch, MessageIn};
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use crate::admin::{fetch_body, typed};
use crate::harness::*;

/// One guest of the test: its name, address and the canaries it holds.
struct Who {
    name: &'static str,
    address: &'static str,
    /// Parameter name prefix: `pa`, `sa` for A.
    p: &'static str,
    s: &'static str,
}

const A: Who = Who {
    name: "inst-a",
    address: "127.0.0.51",
    p: "pa",
    s: "sa",
};
const B: Who = Who {
    name: "inst-b",
    address: "127.0.0.52",
    p: "pb",
    s: "sb",
};

struct Canaries {
    tag: String,
}

impl Canaries {
    /// `PRIVCANARY-A1-<tag>`: private, instance A, generation 1.
    fn private(&self, who: &Who, generation: u32) -> String {
        format!("PRIVCANARY-{}{generation}-{}", who.p, self.tag)
    }
    fn secret(&self, who: &Who, generation: u32) -> String {
        format!("SECRETCANARY-{}{generation}-{}", who.s, self.tag)
    }
    /// Values sent only in requests that are refused: they must go nowhere.
    fn refused(&self, kind: &str) -> String {
        format!("REFUSEDCANARY-{kind}-{}", self.tag)
    }
}

/// Everything the server said, kept for the searches at the end.
#[derive(Default)]
struct Seen {
    admin: Vec<(String, String)>,
    /// (instance name, path, body)
    guest: Vec<(&'static str, String, String)>,
}

impl Seen {
    /// Send `req`, keep its answer.
    fn fetch<T>(&mut self, s: &Server, req: Request<T>) -> Answer {
        let what = format!("{} {}", req.method(), req.path());
        let a = s.admin().fetch(req);
        self.keep(what, a)
    }

    /// Send the route `route` makes of `body`: typed when `body` reads as
    /// its request (`B`), else as raw text (what the typed request cannot
    /// say: malformed JSON, wrong types). Keep its answer.
    fn body<B: DeserializeOwned + Default, T>(
        &mut self,
        s: &Server,
        body: &str,
        route: impl Fn(&B) -> Request<T>,
    ) -> Answer {
        let what = {
            let req = route(&B::default());
            format!("{} {}", req.method(), req.path())
        };
        let a = fetch_body(&s.admin(), body, route);
        self.keep(what, a)
    }

    fn keep(&mut self, what: String, a: Answer) -> Answer {
        self.admin
            .push((format!("{what} → {}", a.status), a.text()));
        a
    }

    /// What the last admin request was, and its status.
    fn last(&self) -> &str {
        &self.admin.last().unwrap().0
    }

    fn guest(&mut self, who: &Who, path: &str, a: &Answer) {
        self.guest.push((who.name, path.to_string(), a.text()));
    }
}

/// GET every file under the metadata directories, as `who`.
fn crawl(s: &Server, who: &Who, seen: &mut Seen) {
    let g = s.guest(who.address);
    // Version listings are read but not followed (every version is the same
    // tree); `latest` and one dated version of each are followed.
    for listing in ["/", "/openstack/", "/cradle/"] {
        let a = g.get(listing);
        assert_eq!(a.status, 200, "{listing}");
        seen.guest(who, listing, &a);
    }
    let mut todo: Vec<String> = [
        "/latest/",
        "/2009-04-04/",
        "/openstack/latest/",
        "/openstack/2013-04-04/",
        "/cradle/latest/",
        "/ganeti/latest/",
    ]
    .map(String::from)
    .to_vec();
    let mut files = 0;
    while let Some(dir) = todo.pop() {
        let a = g.get(&dir);
        assert_eq!(a.status, 200, "{dir}: {}", a.text());
        seen.guest(who, &dir, &a);
        for entry in a.text().lines() {
            if let Some((index, _)) = entry.split_once('=') {
                todo.push(format!("{dir}{index}/"));
            } else if entry.ends_with('/') {
                todo.push(format!("{dir}{entry}"));
            } else {
                let path = format!("{dir}{entry}");
                let f = g.get(&path);
                assert_eq!(f.status, 200, "{path}: {}", f.text());
                seen.guest(who, &path, &f);
                files += 1;
            }
        }
        assert!(files < 500, "the crawl does not end");
    }
    assert!(files > 30, "only {files} files crawled");
}

/// Guest-side side effects: an IMDSv2 token, the password, the channel.
fn guest_writes(s: &Server, who: &Who, seen: &mut Seen, first_run: bool) {
    let g = s.guest(who.address);
    let token = g.token(120);
    let a = g.request(
        "GET",
        "/latest/meta-data/instance-id",
        &[("X-aws-ec2-metadata-token", &token)],
        None,
    );
    assert_eq!(a.status, 200);
    seen.guest(who, "/latest/meta-data/instance-id (token)", &a);
    let params = g.request(
        "GET",
        "/cradle/latest/os/parameters.json",
        &[("X-aws-ec2-metadata-token", &token)],
        None,
    );
    assert_eq!(params.status, 200);
    seen.guest(who, "/cradle/latest/os/parameters.json (token)", &params);

    let pw = format!("encrypted-password-of-{}", who.name);
    let a = g.request(
        "POST",
        "/openstack/latest/password",
        &[],
        Some(pw.clone().into_bytes()),
    );
    assert_eq!(a.status, if first_run { 200 } else { 409 }, "{}", a.text());
    let a = g.get("/openstack/latest/password");
    assert_eq!(a.text(), pw);

    // Host → guest and back.
    let msg = MessageIn {
        text: Some(format!("to {}", who.name)),
        data: None,
    };
    assert_eq!(
        seen.fetch(s, route::send_message(who.name, &msg)).status,
        202
    );
    let a = g.get("/cradle/latest/read");
    assert_eq!(a.text(), format!("to {}", who.name));
    seen.guest(who, "/cradle/latest/read", &a);
    let a = g.request(
        "POST",
        "/cradle/latest/write",
        &[],
        Some(format!("from {}", who.name).into_bytes()),
    );
    assert_eq!(a.status, 201);
    let a = seen.fetch(s, route::receive_messages(who.name));
    assert_eq!(
        a.json()["messages"][0]["text"],
        format!("from {}", who.name)
    );
}

/// Requests that are refused, carrying canaries where they do not belong.
fn bad_requests(s: &Server, c: &Canaries, seen: &mut Seen) {
    let rs = c.refused("S");
    let rp = c.refused("P");
    // Where each body goes: a create, or a PATCH of the instance named.
    enum To {
        Create,
        Patch(&'static str),
    }
    let cases: Vec<(String, To, u16)> = vec![
        // A create refused for a conflict: its parameters must not be kept.
        (
            json!({"name": A.name, "metadata_address": "127.0.0.59",
                   "os_params": {"private": {"rp": rp}, "secret": {"rs": rs}}})
            .to_string(),
            To::Create,
            409,
        ),
        (
            json!({"name": "fresh", "metadata_address": "127.0.0.59",
                   "os_params": {"private": {"rp": rp}, "secret": {"rs": rs}}, "mac": "bad"})
            .to_string(),
            To::Create,
            422,
        ),
        (
            json!({"name": "fresh", "metadata_address": "127.0.0.59", "launch_index": rs})
                .to_string(),
            To::Create,
            422,
        ),
        (
            json!({"name": "fresh", "metadata_address": "127.0.0.59", "imds_tokens": rs})
                .to_string(),
            To::Create,
            422,
        ),
        (
            json!({"os_params": {"secret": {"bad-name": rs}}}).to_string(),
            To::Patch("inst-a"),
            422,
        ),
        (
            json!({"os_params": {"private": {"rp": rp}, "secret": {"rp": rs}}}).to_string(),
            To::Patch("inst-a"),
            422,
        ),
        (
            json!({"os_params": {"private": {"rp": rp}, "secret": {"rs": rs}}, "hostname": "-"})
                .to_string(),
            To::Patch("inst-b"),
            422,
        ),
        (
            format!(r#"{{"os_params": {{"secret": {{"rs": "{rs}""#),
            To::Patch("inst-a"),
            400,
        ),
        (
            json!({"os_params": {"secret": {"rs": rs}}}).to_string(),
            To::Patch("nobody"),
            404,
        ),
    ];
    for (body, to, status) in cases {
        let a = match to {
            To::Create => seen.body(s, &body, route::create_instance),
            To::Patch(key) => {
                seen.body(s, &body, |p: &InstancePatch| route::modify_instance(key, p))
            }
        };
        assert_eq!(a.status, status, "{} {body}: {}", seen.last(), a.text());
        assert!(a.json()["error"]["message"].is_string());
    }
    // A key is text: the typed route cannot name one that is not UTF-8.
    let a = seen.fetch(s, route::unlisted(Method::GET, "/v1/instances/%FF%FE"));
    assert_eq!(a.status, 400);
}

/// Register A and B with generation-1 canaries, then add generation 2.
fn register(s: &Server, c: &Canaries, seen: &mut Seen) {
    for who in [&A, &B] {
        let spec = json!({
            "name": who.name,
            "metadata_address": who.address,
            "metadata": {"role": "canary-test"},
            "os_params": {
                "public": {format!("{}_pub", who.p): "public-value"},
                "private": {format!("{}1", who.p): c.private(who, 1)},
                "secret": {format!("{}1", who.s): c.secret(who, 1)}
            }
        });
        let a = seen.fetch(s, route::create_instance(&typed(&spec)));
        assert_eq!(a.status, 201, "{}", a.text());
    }
}

/// Add a private and a secret parameter of `generation` to both.
fn add_generation(s: &Server, c: &Canaries, seen: &mut Seen, generation: u32) {
    for who in [&A, &B] {
        let patch = json!({"os_params": {
            "private": {format!("{}{generation}", who.p): c.private(who, generation)},
            "secret": {format!("{}{generation}", who.s): c.secret(who, generation)}
        }});
        let a = seen.fetch(s, route::modify_instance(who.name, &typed(&patch)));
        assert_eq!(a.status, 200, "{}", a.text());
    }
}

/// Read everything back through the admin API; returns the views by name.
fn read_back(s: &Server, seen: &mut Seen) -> BTreeMap<String, Value> {
    let list = seen.fetch(s, route::instances());
    assert_eq!(list.status, 200);
    let mut views = BTreeMap::new();
    for v in list.json()["instances"].as_array().unwrap() {
        let name = v["name"].as_str().unwrap().to_string();
        let by_id = seen.fetch(s, route::instance(v["id"].as_str().unwrap()));
        let by_name = seen.fetch(s, route::instance(&name));
        assert_eq!(by_id.json(), *v);
        assert_eq!(by_name.json(), *v);
        views.insert(name, v.clone());
    }
    let m = seen.fetch(s, route::metrics());
    assert!(m.text().contains("cradle_instances 2"), "{}", m.text());
    views
}

/// No secret in any file under the data directory; every private value of
/// the live generations in one of them.
fn check_data_dir(data: &Path, c: &Canaries, generations: &[u32], when: &str) {
    let files = files_under(data);
    let names: Vec<String> = files
        .iter()
        .map(|(p, _)| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    for expected in ["cradle.db", "admin.token"] {
        assert!(names.iter().any(|n| n == expected), "{when}: {names:?}");
    }
    for (path, bytes) in &files {
        for marker in ["SECRETCANARY", "REFUSEDCANARY"] {
            assert!(
                !contains(bytes, marker),
                "{when}: {} holds a {marker}",
                path.display()
            );
        }
    }
    let db: Vec<u8> = files
        .iter()
        .filter(|(p, _)| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("cradle.db")
        })
        .flat_map(|(_, b)| b.iter().copied())
        .collect();
    for g in generations {
        for who in [&A, &B] {
            let p = c.private(who, *g);
            assert!(
                contains(&db, &p),
                "{when}: {p} is not in the database ({names:?})"
            );
        }
    }
}

/// What the guests saw (`reads`): each instance's private values of
/// `generations` and secret values of `secrets_live` in its own
/// `parameters.json`, no other secrets, and nothing of the other instance's.
/// No other file holds a canary.
fn check_guest_views(
    reads: &[(&'static str, String, String)],
    c: &Canaries,
    generations: &[u32],
    secrets_live: &[u32],
) {
    for who in [&A, &B] {
        let other = if who.name == A.name { &B } else { &A };
        let mine: Vec<&(&str, String, String)> =
            reads.iter().filter(|(n, _, _)| *n == who.name).collect();
        let mut param_reads = 0;
        for (_, path, body) in &mine {
            for g in 1..=3 {
                for canary in [c.private(other, g), c.secret(other, g)] {
                    assert!(
                        !body.contains(&canary),
                        "{} read {canary} at {path}",
                        who.name
                    );
                }
                if !secrets_live.contains(&g) {
                    let dead = c.secret(who, g);
                    assert!(
                        !body.contains(&dead),
                        "{} still reads {dead} at {path}",
                        who.name
                    );
                }
            }
            if path.contains("/os/parameters.json") {
                param_reads += 1;
                for g in generations {
                    assert!(body.contains(&c.private(who, *g)), "{path}: {body}");
                }
                for g in secrets_live {
                    assert!(body.contains(&c.secret(who, *g)), "{path}: {body}");
                }
            } else {
                assert!(!body.contains("CANARY"), "{} {path}: {body}", who.name);
            }
        }
        // /cradle and /ganeti by crawl, and once with a token.
        assert!(
            param_reads >= 2,
            "{}: {param_reads} parameter reads",
            who.name
        );
    }
}

#[test]
fn private_and_secret_parameters_go_only_where_they_belong() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let c = Canaries {
        tag: format!("{:016x}", rand::random::<u64>()),
    };
    let mut seen = Seen::default();
    let opts = || Opts {
        data_dir: Some(&data),
        log: Some("trace"),
        ..Default::default()
    };

    // First run: register, change, read, use every path.
    let mut s = Server::start_with(opts());
    register(&s, &c, &mut seen);
    add_generation(&s, &c, &mut seen, 2);
    let views = read_back(&s, &mut seen);
    for who in [&A, &B] {
        let v = &views[who.name]["os_params"];
        assert_eq!(
            v["private"],
            json!([format!("{}1", who.p), format!("{}2", who.p)])
        );
        assert_eq!(
            v["secret"],
            json!([format!("{}1", who.s), format!("{}2", who.s)])
        );
        guest_writes(&s, who, &mut seen, true);
        crawl(&s, who, &mut seen);
    }
    bad_requests(&s, &c, &mut seen);
    check_guest_views(&seen.guest, &c, &[1, 2], &[1, 2]);
    check_data_dir(&data, &c, &[1, 2], "run 1, running");
    let first_log = s.log_path.clone();
    let token = s.token.clone();
    assert!(s.stop().is_some_and(|st| st.success()), "clean exit");
    check_data_dir(&data, &c, &[1, 2], "run 1, stopped");

    // Second run on the same data: secrets are gone, private values stay.
    let mut s = Server::start_with(opts());
    assert_ne!(s.log_path, first_log);
    let guest_reads_before = seen.guest.len();
    let views = read_back(&s, &mut seen);
    for who in [&A, &B] {
        let v = &views[who.name]["os_params"];
        assert_eq!(
            v["private"],
            json!([format!("{}1", who.p), format!("{}2", who.p)])
        );
        assert_eq!(v["secret"], json!([]), "{}", who.name);
        let params = s
            .guest(who.address)
            .get("/cradle/latest/os/parameters.json");
        assert_eq!(
            params.json(),
            json!({
                format!("{}_pub", who.p): ["public-value", "public"],
                format!("{}1", who.p): [c.private(who, 1), "private"],
                format!("{}2", who.p): [c.private(who, 2), "private"],
            }),
            "{}",
            who.name
        );
        seen.guest(
            who,
            "/cradle/latest/os/parameters.json (after restart)",
            &params,
        );
        crawl(&s, who, &mut seen);
    }
    check_guest_views(&seen.guest[guest_reads_before..], &c, &[1, 2], &[]);
    // Secrets given again (as an operator must after a restart) work again.
    add_generation(&s, &c, &mut seen, 3);
    let gen3_reads = seen.guest.len();
    for who in [&A, &B] {
        guest_writes(&s, who, &mut seen, false);
        crawl(&s, who, &mut seen);
    }
    bad_requests(&s, &c, &mut seen);
    check_guest_views(&seen.guest[gen3_reads..], &c, &[1, 2, 3], &[3]);
    check_data_dir(&data, &c, &[1, 2, 3], "run 2, running");
    let second_log = s.log_path.clone();
    assert!(s.stop().is_some_and(|st| st.success()), "clean exit");
    check_data_dir(&data, &c, &[1, 2, 3], "run 2, stopped");

    // No admin response carried any canary.
    assert!(
        seen.admin.len() > 40,
        "{} admin responses",
        seen.admin.len()
    );
    assert!(
        seen.admin.iter().any(|(_, b)| b.contains("\"pa1\"")),
        "the views were collected"
    );
    for (what, body) in &seen.admin {
        assert!(!body.contains("CANARY"), "{what}: {body}");
        assert!(!body.contains("<redacted>"), "{what}: {body}");
    }

    // Neither log holds a canary (or the admin token), and both were written
    // with debug and trace enabled (TRACE events come only from the first
    // start's schema migration, so only run 1 can show them).
    for (run, path) in [(1, &first_log), (2, &second_log)] {
        let log = std::fs::read_to_string(path).unwrap();
        assert!(log.contains("admin request"), "run {run}: {log}");
        assert!(log.contains("metadata request"), "run {run}");
        assert!(log.contains(" DEBUG "), "run {run}: no debug lines");
        assert!(!log.contains("CANARY"), "run {run}: a canary is in the log");
        assert!(
            !log.contains(&token),
            "run {run}: the admin token is in the log"
        );
    }
    let first = std::fs::read_to_string(&first_log).unwrap();
    assert!(first.contains(" TRACE "), "run 1 was not at trace level");
}
