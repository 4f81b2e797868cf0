//! Tenants cannot reach each other: every route of the admin router, taken
//! from the router's own declarations (`cradle_admin::route_table`), run by
//! every kind of caller against an object of project A, one of project B
//! and one that does not exist. Each cell's status is asserted, and no
//! answer to a caller ever carries a canary planted in a project it does
//! not act for. A route added without a row here fails the test.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use serde_json::{Value, json};

use crate::harness::*;

/// Who calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Who {
    Main,
    AdminRole,
    TenA,
    TenB,
    NoProjects,
    BadToken,
    NoToken,
}

const CALLERS: [Who; 7] = [
    Who::Main,
    Who::AdminRole,
    Who::TenA,
    Who::TenB,
    Who::NoProjects,
    Who::BadToken,
    Who::NoToken,
];

/// Whose object the request names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Obj {
    A,
    B,
    Missing,
}

/// What a route acts on, which decides who may.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scope {
    /// An instance by `{key}`.
    Instance,
    /// A tenant named in the path.
    Tenant,
    /// Everything at once (the firewall, metrics).
    Server,
    /// `GET /v1/instances`: filtered, not refused.
    List,
    /// `POST /v1/instances`: the project is in the body.
    Create,
    /// `GET /v1/whoami` and `GET /v1/openapi.json`: any valid token.
    Whoami,
}

/// One route's row: how to call it and what a caller acting for the
/// object's project gets (`ok`), and what anyone acting for every project
/// gets for a missing object (`missing`).
struct Row {
    scope: Scope,
    ok: u16,
    missing: u16,
    admin_only: bool,
}

const fn row(scope: Scope, ok: u16, missing: u16) -> Row {
    Row {
        scope,
        ok,
        missing,
        admin_only: false,
    }
}

/// A route only the admin role may use.
const fn admin_row(scope: Scope, ok: u16, missing: u16) -> Row {
    Row {
        admin_only: true,
        ..row(scope, ok, missing)
    }
}

fn rows() -> BTreeMap<(&'static str, &'static str), Row> {
    use Scope::*;
    let t = "/v1/tenants/{tenant}";
    let mut r = BTreeMap::new();
    let mut add = |m: &'static str, p: String, row: Row| {
        r.insert((m, &*Box::leak(p.into_boxed_str())), row);
    };
    add("GET", "/v1/whoami".into(), row(Whoami, 200, 200));
    add("GET", "/v1/openapi.json".into(), row(Whoami, 200, 200));
    // Public keys: any token reads them.
    add(
        "GET",
        "/v1/identity/certificate".into(),
        row(Whoami, 200, 200),
    );
    add(
        "GET",
        "/v1/identity/jwks.json".into(),
        row(Whoami, 200, 200),
    );
    add("GET", "/metrics".into(), row(Server, 200, 200));
    add("GET", "/v1/cluster".into(), row(Server, 200, 200));
    add("GET", "/v1/firewall".into(), row(Server, 200, 200));
    add(
        "POST",
        "/v1/firewall/apply".into(),
        admin_row(Server, 409, 409),
    );
    add("GET", "/v1/instances".into(), row(List, 200, 200));
    add("POST", "/v1/instances".into(), row(Create, 201, 201));
    let i = "/v1/instances/{key}";
    add("GET", i.into(), row(Instance, 200, 404));
    add("PATCH", i.into(), row(Instance, 200, 404));
    add("DELETE", i.into(), row(Instance, 204, 404));
    add("GET", format!("{i}/messages"), row(Instance, 200, 404));
    add("POST", format!("{i}/messages"), row(Instance, 202, 404));
    add("POST", format!("{i}/actions"), row(Instance, 202, 404));
    add(
        "GET",
        format!("{i}/actions/{{id}}"),
        row(Instance, 200, 404),
    );
    add("GET", format!("{i}/config-drive"), row(Instance, 200, 404));
    add(
        "POST",
        format!("{i}/reset-state"),
        admin_row(Instance, 200, 404),
    );
    add("GET", format!("{i}/events"), row(Instance, 200, 404));
    add("GET", format!("{i}/maintenance"), row(Instance, 200, 404));
    add("POST", format!("{i}/maintenance"), row(Instance, 201, 404));
    add(
        "POST",
        format!("{i}/maintenance/{{event}}/cancel"),
        row(Instance, 200, 404),
    );
    add(
        "GET",
        format!("{i}/personalization"),
        row(Instance, 404, 404),
    );
    add("GET", format!("{i}/install"), row(Instance, 404, 404));
    add("POST", format!("{i}/install"), row(Instance, 422, 404));
    add("POST", format!("{i}/start"), row(Instance, 422, 404));
    // No os_type: nothing to export or import with; a rename to its own
    // name changes nothing.
    add("POST", format!("{i}/export"), row(Instance, 422, 404));
    add("POST", format!("{i}/import"), row(Instance, 422, 404));
    add("POST", format!("{i}/rename"), row(Instance, 200, 404));
    add(
        "POST",
        format!("{i}/migrate"),
        admin_row(Instance, 200, 404),
    );
    add("POST", format!("{i}/stop"), row(Instance, 200, 404));
    add("GET", format!("{i}/vm"), row(Instance, 200, 404));
    add("GET", format!("{i}/console"), row(Instance, 200, 404));
    add(
        "GET",
        format!("{i}/security-groups"),
        row(Instance, 200, 404),
    );
    add("GET", format!("{t}/security-groups"), row(Tenant, 200, 200));
    add(
        "POST",
        format!("{t}/security-groups"),
        row(Tenant, 201, 201),
    );
    let g = format!("{t}/security-groups/{{id}}");
    add("GET", g.clone(), row(Tenant, 200, 404));
    add("PATCH", g.clone(), row(Tenant, 200, 404));
    add("DELETE", g.clone(), row(Tenant, 204, 404));
    add("GET", format!("{g}/rules"), row(Tenant, 200, 404));
    add("POST", format!("{g}/rules"), row(Tenant, 201, 404));
    add(
        "PUT",
        format!("{g}/instances/{{instance}}"),
        row(Tenant, 204, 404),
    );
    add(
        "DELETE",
        format!("{g}/instances/{{instance}}"),
        row(Tenant, 204, 404),
    );
    add(
        "DELETE",
        format!("{t}/security-group-rules/{{id}}"),
        row(Tenant, 204, 404),
    );
    add("GET", format!("{t}/default-rules"), row(Tenant, 200, 200));
    add("POST", format!("{t}/default-rules"), row(Tenant, 201, 201));
    add(
        "DELETE",
        format!("{t}/default-rules/{{id}}"),
        row(Tenant, 204, 404),
    );
    let trove = "/v1.0/{tenant}";
    add(
        "GET",
        format!("{trove}/security-groups"),
        row(Tenant, 200, 200),
    );
    add(
        "GET",
        format!("{trove}/security-groups/{{id}}"),
        row(Tenant, 200, 404),
    );
    add(
        "POST",
        format!("{trove}/security-group-rules"),
        row(Tenant, 201, 404),
    );
    add(
        "DELETE",
        format!("{trove}/security-group-rules/{{id}}"),
        row(Tenant, 204, 404),
    );
    r
}

/// A project's planted objects and the canary strings that mark them.
struct Project {
    tenant: &'static str,
    instance: String,
    address: String,
    group: String,
    canaries: Vec<String>,
}

struct Lab {
    server: Server,
    http: reqwest::blocking::Client,
    a: Project,
    b: Project,
    seq: AtomicU32,
}

const TOKENS: [Named<'static>; 4] = [
    Named {
        name: "root",
        roles: &["admin"],
        projects: &[],
        token: "token-admin-role",
    },
    Named {
        name: "alice",
        roles: &["provisioner"],
        projects: &["tenA"],
        token: "token-ten-a",
    },
    Named {
        name: "bob",
        roles: &["provisioner"],
        projects: &["tenB"],
        token: "token-ten-b",
    },
    Named {
        name: "nobody",
        roles: &["provisioner"],
        projects: &[],
        token: "token-no-projects",
    },
];
impl Lab {
    fn token(&self, who: Who) -> Option<String> {
        match who {
            Who::Main => Some(self.server.token.clone()),
            Who::AdminRole => Some(TOKENS[0].token.into()),
            Who::TenA => Some(TOKENS[1].token.into()),
            Who::TenB => Some(TOKENS[2].token.into()),
            Who::NoProjects => Some(TOKENS[3].token.into()),
            Who::BadToken => Some("not-a-token-of-anyone".into()),
            Who::NoToken => None,
        }
    }

    fn call(&self, who: Who, method: &str, path: &str, body: Option<&Value>) -> (u16, String) {
        let url = format!("{}{path}", self.server.admin_url);
        let mut req = self.http.request(method.parse().unwrap(), url);
        if let Some(t) = self.token(who) {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(b);
        }
        let r = req
            .send()
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        (r.status().as_u16(), r.text().unwrap_or_default())
    }

    /// As the main token, which must succeed.
    fn must(&self, method: &str, path: &str, body: Option<&Value>) -> Value {
        let (status, text) = self.call(Who::Main, method, path, body);
        assert!(
            (200..300).contains(&status),
            "setup {method} {path}: {status} {text}"
        );
        serde_json::from_str(&text).unwrap_or(Value::Null)
    }

    fn next(&self) -> u32 {
        self.seq.fetch_add(1, Ordering::SeqCst)
    }

    fn project(&self, obj: Obj) -> Option<&Project> {
        match obj {
            Obj::A => Some(&self.a),
            Obj::B => Some(&self.b),
            Obj::Missing => None,
        }
    }

    /// A fresh instance of `tenant`, for a call that removes one.
    fn victim_instance(&self, tenant: &str) -> String {
        let n = self.next();
        let name = format!("victim-{n}");
        self.must(
            "POST",
            "/v1/instances",
            Some(&json!({
                "name": name, "project_id": tenant,
                "metadata_address": format!("127.0.9.{}", n % 250 + 1),
            })),
        );
        name
    }

    fn rule(cidr: &str) -> Value {
        json!({"protocol": "tcp", "from_port": 443, "to_port": 443, "cidr": cidr})
    }

    /// The path and body of `method path` for `obj`, after setting up what
    /// the call consumes (a rule to delete, a membership to remove).
    fn request(&self, method: &str, path: &str, obj: Obj) -> (String, Option<Value>) {
        let p = self.project(obj);
        // Where an object is missing, the tenant is A's (a caller acting
        // for A asks for something A does not have) when the path names
        // one inside a tenant, else tenC, which nothing belongs to.
        let inside = path.contains("{id}") || path.contains("{instance}");
        let tenant = match p {
            Some(p) => p.tenant,
            None if inside => self.a.tenant,
            None => "tenC",
        };
        let missing_id = "00000000-0000-4000-8000-000000000000";
        let key = p.map_or("no-such-instance".to_string(), |p| p.instance.clone());
        let mut id = p.map_or(missing_id.to_string(), |p| p.group.clone());
        let n = self.next();
        let body = match (method, path) {
            ("POST", "/v1/instances") => Some(json!({
                "name": format!("made-{n}"),
                "project_id": tenant,
                "metadata_address": format!("127.0.8.{}", n % 250 + 1),
            })),
            ("PATCH", "/v1/instances/{key}") => Some(json!({})),
            ("POST", "/v1/instances/{key}/rename") => Some(json!({"name": key})),
            ("POST", "/v1/instances/{key}/messages") => Some(json!({"text": "hello"})),
            ("POST", "/v1/instances/{key}/actions") => Some(json!({"action": "uptime"})),
            ("POST", "/v1/instances/{key}/maintenance") => {
                Some(json!({"code": "stop", "delay_seconds": 3600}))
            }
            // A host that never joined: refused in the stream, nothing done.
            ("POST", "/v1/instances/{key}/migrate") => Some(json!({"to": "node-zz"})),
            ("POST", p) if p.ends_with("/security-groups") => {
                Some(json!({"name": format!("g{n}"), "description": "made here"}))
            }
            ("PATCH", _) => Some(json!({"description": format!("changed {n}")})),
            ("POST", p) if p.ends_with("/rules") || p.ends_with("/default-rules") => Some(
                Self::rule(&format!("192.0.{}.{}/32", n / 250 % 250, n % 250)),
            ),
            ("POST", p) if p.ends_with("/security-group-rules") => Some(json!({
                "security_group_rule": {"group_id": id, "cidr": format!("172.16.{}.{}/32", n / 250 % 250, n % 250),
                                        "protocol": "tcp", "from_port": 8443, "to_port": 8443}
            })),
            _ => None,
        };
        let mut key = key;
        let mut event = "instance-event-00000000000000000".to_string();
        if let Some(p) = p {
            // Calls that consume something get their own.
            match (method, path) {
                ("DELETE", "/v1/instances/{key}") => key = self.victim_instance(p.tenant),
                ("DELETE", x) if x.ends_with("/security-groups/{id}") => {
                    let g = self.must(
                        "POST",
                        &format!("/v1/tenants/{}/security-groups", p.tenant),
                        Some(&json!({"name": format!("victim{n}")})),
                    );
                    id = id_of(&g);
                }
                ("DELETE", x) if x.ends_with("/security-group-rules/{id}") => {
                    let r = self.must(
                        "POST",
                        &format!("/v1/tenants/{}/security-groups/{}/rules", p.tenant, p.group),
                        Some(&Self::rule(&format!("198.51.100.{}/32", n % 250))),
                    );
                    id = id_of(&r);
                }
                ("DELETE", x) if x.ends_with("/default-rules/{id}") => {
                    let r = self.must(
                        "POST",
                        &format!("/v1/tenants/{}/default-rules", p.tenant),
                        Some(&Self::rule(&format!("203.0.113.{}/32", n % 250))),
                    );
                    id = id_of(&r);
                }
                ("PUT", _) => {
                    // Attach to a group it is not in yet.
                    let _ = self.call(
                        Who::Main,
                        "DELETE",
                        &format!(
                            "/v1/tenants/{}/security-groups/{}/instances/{}",
                            p.tenant, p.group, p.instance
                        ),
                        None,
                    );
                }
                ("DELETE", x) if x.ends_with("/instances/{instance}") => {
                    let _ = self.call(
                        Who::Main,
                        "PUT",
                        &format!(
                            "/v1/tenants/{}/security-groups/{}/instances/{}",
                            p.tenant, p.group, p.instance
                        ),
                        None,
                    );
                }
                ("POST", "/v1/instances/{key}/maintenance/{event}/cancel") => {
                    // An event of this instance, for the cancel to find.
                    let e = self.must(
                        "POST",
                        &format!("/v1/instances/{}/maintenance", p.instance),
                        Some(&json!({"code": "stop", "delay_seconds": 3600})),
                    );
                    event = e["id"].as_str().unwrap().to_string();
                }
                ("GET", "/v1/instances/{key}/actions/{id}") => {
                    // An action sent to this instance, for the show to find.
                    let a = self.must(
                        "POST",
                        &format!("/v1/instances/{}/actions", p.instance),
                        Some(&json!({"action": "uptime"})),
                    );
                    id = id_of(&a);
                }
                ("GET", "/v1/instances/{key}/messages") => {
                    // A message from the guest, for the receive to find.
                    let g = self.server.guest(&p.address);
                    let w = g.request(
                        "POST",
                        "/cradle/latest/write",
                        &[],
                        Some(format!("msg-{}", p.canaries[0]).into_bytes()),
                    );
                    assert_eq!(w.status, 201);
                }
                _ => {}
            }
        }
        let instance = p.map_or("no-such-instance".to_string(), |p| p.instance.clone());
        let path = path
            .replace("{tenant}", tenant)
            .replace("{key}", &key)
            .replace("{id}", &id)
            .replace("{event}", &event)
            .replace("{instance}", &instance);
        // An import names the dump's SHA-256 (well formed; nothing is sent).
        let path = if path.ends_with("/import") {
            format!("{path}?sha256={}", "0".repeat(64))
        } else {
            path
        };
        (path, body)
    }
}

fn plant(lab_server: Server, http: reqwest::blocking::Client) -> Lab {
    let mut lab = Lab {
        server: lab_server,
        http,
        a: Project {
            tenant: "tenA",
            instance: String::new(),
            address: "127.0.7.1".into(),
            group: String::new(),
            canaries: Vec::new(),
        },
        b: Project {
            tenant: "tenB",
            instance: String::new(),
            address: "127.0.7.2".into(),
            group: String::new(),
            canaries: Vec::new(),
        },
        seq: AtomicU32::new(1),
    };
    for (mark, cidr) in [("cnrya", "10.77.1.0/24"), ("cnryb", "10.88.2.0/24")] {
        let p = if mark == "cnrya" { &lab.a } else { &lab.b };
        let (tenant, address) = (p.tenant, p.address.clone());
        let name = format!("{mark}-web");
        lab.must(
            "POST",
            "/v1/instances",
            Some(&json!({
                "name": name,
                "project_id": tenant,
                "hostname": format!("{mark}-host"),
                "metadata_address": address,
                "metadata": {"role": format!("{mark}-meta")},
                "user_data": b64(format!("{mark}-userdata").as_bytes()),
                "os_params": {
                    "public": {"pub": format!("{mark}-public")},
                    "private": {"priv": format!("{mark}-private")},
                },
            })),
        );
        let g = lab.must(
            "POST",
            &format!("/v1/tenants/{tenant}/security-groups"),
            Some(&json!({"name": format!("{mark}-group"), "description": format!("{mark}-desc")})),
        );
        let group = id_of(&g);
        lab.must(
            "POST",
            &format!("/v1/tenants/{tenant}/security-groups/{group}/rules"),
            Some(&Lab::rule(cidr)),
        );
        lab.must(
            "POST",
            &format!("/v1/tenants/{tenant}/default-rules"),
            Some(&Lab::rule(cidr)),
        );
        let p = if mark == "cnrya" {
            &mut lab.a
        } else {
            &mut lab.b
        };
        p.instance = name;
        p.group = group;
        // The mark is in its name, hostname, metadata, public and private
        // values, group and messages; user-data is shown in base64.
        p.canaries = vec![
            mark.to_string(),
            cidr.to_string(),
            b64(format!("{mark}-userdata").as_bytes()),
        ];
    }
    lab
}

/// The id of what an answer holds, bare or in its one envelope
/// (`{"security_group": {...}}`).
fn id_of(v: &Value) -> String {
    let inner = match v.as_object() {
        Some(o) if o.len() == 1 && !o.contains_key("id") => o.values().next().unwrap(),
        _ => v,
    };
    inner["id"]
        .as_str()
        .unwrap_or_else(|| panic!("no id in {v}"))
        .to_string()
}

/// The status `who` must get for `row` on `obj`.
fn expected(row: &Row, who: Who, obj: Obj, path: &str) -> u16 {
    use Scope::*;
    let inside = path.contains("{id}") || path.contains("{instance}");
    // A caller of one project, on `obj`.
    let own = |mine: Obj| match (obj, row.scope) {
        (o, _) if o == mine && row.admin_only => 403,
        (o, _) if o == mine => row.ok,
        // Another project's: its tenant named in the path or the body is
        // refused; its instance is as missing as a missing one.
        // A missing object inside a tenant is looked for in A's.
        (Obj::Missing, Tenant) if !inside || mine != Obj::A => 403,
        (Obj::Missing, Create) => 403,
        (Obj::Missing, _) => row.missing,
        (_, Tenant | Create) => 403,
        _ => 404,
    };
    match who {
        Who::BadToken | Who::NoToken => 401,
        Who::Main | Who::AdminRole => match obj {
            Obj::Missing => row.missing,
            _ => row.ok,
        },
        Who::TenA | Who::TenB => {
            let mine = if who == Who::TenA { Obj::A } else { Obj::B };
            match row.scope {
                Whoami => 200,
                List => 200,
                Server => 403,
                Instance | Tenant | Create => own(mine),
            }
        }
        Who::NoProjects => match row.scope {
            Whoami => 200,
            Instance => 404,
            Tenant | Server | List | Create => 403,
        },
    }
}

#[test]
fn no_caller_reaches_another_projects_objects_on_any_route() {
    let server = Server::with_tokens(&TOKENS);
    let http = reqwest::blocking::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let lab = plant(server, http);

    let table = cradle_admin::route_table();
    let rows = rows();
    let declared: BTreeSet<(String, String)> = table.iter().cloned().collect();
    let covered: BTreeSet<(String, String)> = rows
        .keys()
        .map(|(m, p)| (m.to_string(), p.to_string()))
        .collect();
    assert_eq!(
        declared.difference(&covered).collect::<Vec<_>>(),
        Vec::<&(String, String)>::new(),
        "routes of the admin router without a row here"
    );
    assert_eq!(
        covered.difference(&declared).collect::<Vec<_>>(),
        Vec::<&(String, String)>::new(),
        "rows here for routes the router does not have"
    );

    let mut cells = 0;
    let mut wrong = Vec::new();
    for (method, path) in &table {
        let row = &rows[&(method.as_str(), path.as_str())];
        for who in CALLERS {
            for obj in [Obj::A, Obj::B, Obj::Missing] {
                let (url, body) = lab.request(method, path, obj);
                let (status, text) = lab.call(who, method, &url, body.as_ref());
                cells += 1;
                let want = expected(row, who, obj, path);
                if status != want {
                    wrong.push(format!(
                        "{who:?} {method} {url} ({obj:?}): {status}, not {want}: {}",
                        text.chars().take(200).collect::<String>()
                    ));
                }
                // What the caller does not act for never shows. A 404 may
                // echo the key the caller sent; that is its own.
                let mut text = text;
                for segment in url.split('/').filter(|s| s.len() > 3) {
                    text = text.replace(segment, "");
                }
                let foreign: Vec<&Project> = match who {
                    Who::TenA => vec![&lab.b],
                    Who::TenB => vec![&lab.a],
                    Who::NoProjects | Who::BadToken | Who::NoToken => vec![&lab.a, &lab.b],
                    Who::Main | Who::AdminRole => vec![],
                };
                for p in foreign {
                    for c in &p.canaries {
                        assert!(
                            !text.contains(c.as_str()),
                            "{who:?} {method} {url}: the answer carries {c:?} of {}: {text}",
                            p.tenant
                        );
                    }
                }
            }
        }
    }
    println!(
        "isolation matrix: {} routes x {} callers x 3 objects = {cells} cells checked",
        table.len(),
        CALLERS.len()
    );
    assert!(
        wrong.is_empty(),
        "{} cells wrong:\n{}",
        wrong.len(),
        wrong.join("\n")
    );
}

/// An HTTP server on 127.0.0.1 that answers 404 to everything and keeps
/// every request's head.
struct Recorder {
    url: String,
    heads: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

fn recorder() -> Recorder {
    use std::io::{BufRead, BufReader, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let heads = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = heads.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { break };
            let mut head = String::new();
            let mut reader = BufReader::new(conn.try_clone().unwrap());
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                head += &line;
            }
            seen.lock().unwrap().push(head);
            let _ = conn.write_all(
                b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            );
        }
    });
    Recorder { url, heads }
}

#[test]
fn a_project_token_cannot_send_download_credentials_to_its_own_server() {
    let s = Server::with_tokens(&[Named {
        name: "alice",
        roles: &[],
        projects: &["tenA"],
        token: "token-ten-a",
    }]);
    let (legit, evil) = (recorder(), recorder());
    s.admin().create(&json!({
        "name": "web", "project_id": "tenA", "metadata_address": "127.0.0.2",
        "personalization_url": format!("{}/web.tar.gz", legit.url),
        "os_params": {"secret": {
            "personalization_user": "pkg-user-canary",
            "personalization_password": "pkg-password-canary",
        }},
    }));
    let alice = s.admin().with_token("token-ten-a");
    let repoint = |extra: Value| {
        let mut patch = json!({"personalization_url": format!("{}/web.tar.gz", evil.url)});
        patch
            .as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        alice.fetch_raw(
            route::modify_instance("web", &Default::default()),
            &patch.to_string(),
        )
    };
    // Another origin without the credentials again: refused, and the URL
    // stays where it was.
    let refused = repoint(json!({}));
    assert_eq!(refused.status, 403, "{}", refused.text());
    assert!(
        refused.text().contains("personalization_"),
        "{}",
        refused.text()
    );
    let view = alice.fetch(route::instance("web")).json();
    assert!(
        view["personalization_url"]
            .as_str()
            .unwrap()
            .starts_with(&legit.url)
    );
    // The package is fetched from the legitimate host, with them.
    alice.fetch(route::personalization_package("web"));
    // Removing them in the same request lets the URL move; the fetch that
    // follows goes out bare.
    let moved = repoint(json!({"os_params": {"secret": {
        "personalization_user": null, "personalization_password": null,
    }}}));
    assert_eq!(moved.status, 200, "{}", moved.text());
    alice.fetch(route::personalization_package("web"));

    let basic = b64(b"pkg-user-canary:pkg-password-canary");
    let legit_heads = legit.heads.lock().unwrap().join("\n");
    assert!(legit_heads.contains(&basic), "{legit_heads}");
    let evil_heads = evil.heads.lock().unwrap().clone();
    assert_eq!(evil_heads.len(), 1, "{evil_heads:?}");
    for h in &evil_heads {
        assert!(!h.to_ascii_lowercase().contains("authorization"), "{h}");
        assert!(!h.contains(&basic) && !h.contains("canary"), "{h}");
    }
}
