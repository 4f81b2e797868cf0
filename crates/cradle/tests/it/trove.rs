//! The Trove-compatible security-group extension, driven by the real
//! python-troveclient from PyPI.
//!
//! How troveclient is wired: it normally asks keystone for a token and finds
//! the database endpoint in the service catalog. There is no keystone here, so
//! the driver hands troveclient a keystoneauth1 `Session` whose auth plugin is
//! `keystoneauth1.token_endpoint.Token(endpoint, token)`, with the endpoint
//! `http://<admin addr>/v1.0/p1` and cradle's admin token:
//! `troveclient.client.Client("1.0", session=Session(auth=Token(url, token)))`.
//! Given a session, troveclient builds its `SessionClient` (a keystoneauth
//! adapter) instead of its keystone-v2 `HTTPClient`; the adapter asks the
//! plugin for the endpoint (the `Token` plugin returns its own endpoint
//! whatever service type or interface is asked for, so no catalog is needed)
//! and for the request headers (the plugin adds `X-Auth-Token: <token>`,
//! which cradle accepts like a bearer token). Every manager call then goes to
//! `<endpoint>/security-groups...` exactly as against Trove. (The alternative,
//! `HTTPClient` with `bypass_url`, still authenticates against keystone first;
//! `keystoneauth1.noauth` sends no token at all.)
//!
//! The driver is one long-lived Python process (imports take half a second):
//! it reads one JSON command a line on stdin and answers one JSON line on
//! stdout, so that the test can check cradle's native API between
//! troveclient's calls. The URL and both tokens go in its environment.
//!
//! python-troveclient is installed from PyPI into a venv of Debian's
//! `/usr/bin/python3` under the cargo target dir, keyed by the requirement
//! (see [`troveclient_venv`]): built once, reused on reruns, rebuilt when it
//! is missing or no longer imports (a fresh CI machine, a new Debian Python).

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::admin::typed;
use crate::harness::*;

/// What pip installs. The venv's directory is named after it, so changing it
/// builds a new venv.
const TROVECLIENT: &str = "python-troveclient==8.11.0";

/// The venv with [`TROVECLIENT`] installed, built if it is missing or broken.
///
/// Builders take an exclusive lock on a file next to it (released by the
/// kernel if a run dies), so racing test runs build it once and the others
/// wait for it. It is built in a `.partial-*` sibling and renamed into place
/// only once troveclient imports, so a venv at the final path is always
/// complete; partials left by killed runs are removed under the lock. (A venv
/// moved after creation keeps working when run as `bin/python`: that is a
/// symlink to Debian's interpreter and the prefix comes from where the link
/// lives; only the console scripts' shebangs, which are not used, name the
/// old path.)
fn troveclient_venv() -> PathBuf {
    let root = Path::new(env!("CARGO_TARGET_TMPDIR")).join("venvs");
    let key: String = TROVECLIENT
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let dir = root.join(&key);
    if venv_works(&dir) {
        return dir;
    }
    std::fs::create_dir_all(&root).unwrap();
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(root.join(format!(".{key}.lock")))
        .unwrap();
    lock.lock().expect("lock the venv directory");
    if venv_works(&dir) {
        return dir; // built while this run waited
    }
    for entry in std::fs::read_dir(&root).unwrap().flatten() {
        if entry.file_name().to_string_lossy().starts_with(".partial-") {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }

    let started = Instant::now();
    let partial = root.join(format!(".partial-{key}"));
    let built = (|| {
        run_setup(
            Command::new(DEBIAN_PYTHON)
                .args(["-m", "venv"])
                .arg(&partial),
            "create the venv (Debian's python3-venv must be installed; cargo xtask ci installs it)",
        )?;
        run_setup(
            Command::new(partial.join("bin/python"))
                .args(["-m", "pip", "install", "--no-input", "--quiet", TROVECLIENT])
                .env("PIP_DISABLE_PIP_VERSION_CHECK", "1"),
            &format!("pip install {TROVECLIENT} from PyPI"),
        )?;
        if venv_works(&partial) {
            Ok(())
        } else {
            Err(format!(
                "{} cannot import troveclient after pip install",
                partial.display()
            ))
        }
    })();
    if let Err(e) = built {
        let _ = std::fs::remove_dir_all(&partial);
        panic!("cannot set up the troveclient venv: {e}");
    }
    // A broken venv in the way (say Debian's Python moved on): rename does
    // not replace a non-empty directory.
    if dir.exists() {
        std::fs::remove_dir_all(&dir).unwrap();
    }
    std::fs::rename(&partial, &dir).unwrap();
    drop(lock);
    eprintln!(
        "built the troveclient venv {} in {:.1}s",
        dir.display(),
        started.elapsed().as_secs_f64()
    );
    dir
}

/// Whether the venv's Python runs and imports troveclient and keystoneauth1.
fn venv_works(dir: &Path) -> bool {
    let python = dir.join("bin/python");
    python.exists()
        && Command::new(python)
            .args(["-c", "import troveclient, keystoneauth1"])
            .env_remove("PYTHONPATH")
            .env_remove("PYTHONHOME")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
}

fn run_setup(cmd: &mut Command, what: &str) -> Result<(), String> {
    let out = cmd
        .env_remove("PYTHONPATH")
        .env_remove("PYTHONHOME")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot {what}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "cannot {what} ({}):\nstdout:\n{}\nstderr:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// The driver: one JSON command a line in, one JSON answer a line out,
/// `{"ok": result}` or `{"error": {"class", "status", "message"}}` for
/// troveclient's exceptions. `"token": "wrong"` uses `TROVE_WRONG_TOKEN`.
/// Every request troveclient sends through keystoneauth is recorded
/// (method, URL, JSON body) and answered under "sent".
const DRIVER: &str = r#"
import json, os, sys
from importlib import metadata

from keystoneauth1 import session as ks_session
from keystoneauth1 import token_endpoint
from troveclient import client as trove_client
from troveclient import exceptions as trove_exc

SENT = []
_request = ks_session.Session.request
def _recording(self, url, method, **kwargs):
    SENT.append({"method": method, "url": url, "json": kwargs.get("json")})
    return _request(self, url, method, **kwargs)
ks_session.Session.request = _recording

def connect(token):
    auth = token_endpoint.Token(os.environ["TROVE_URL"], token)
    session = ks_session.Session(auth=auth, timeout=30)
    return trove_client.Client("1.0", session=session)

CLIENTS = {
    "admin": connect(os.environ["TROVE_TOKEN"]),
    "wrong": connect(os.environ["TROVE_WRONG_TOKEN"]),
}

def run(req):
    c = CLIENTS[req.get("token", "admin")]
    op = req["op"]
    if op == "version":
        return {
            "troveclient": metadata.version("python-troveclient"),
            "keystoneauth1": metadata.version("keystoneauth1"),
            "client": type(c.client).__module__ + "." + type(c.client).__name__,
            "management_url": c.client.management_url,
        }
    if op == "list":
        return [g.to_dict() for g in c.security_groups.list()]
    if op == "get":
        return c.security_groups.get(req["id"]).to_dict()
    if op == "create":
        return c.security_group_rules.create(req["group_id"], req["cidr"])
    if op == "delete":
        return c.security_group_rules.delete(req["id"])
    raise ValueError("unknown op " + op)

for line in sys.stdin:
    req = json.loads(line)
    del SENT[:]
    try:
        reply = {"ok": run(req)}
    except trove_exc.ClientException as e:
        reply = {"error": {
            "class": type(e).__name__,
            "status": getattr(e, "http_status", None),
            "message": getattr(e, "message", str(e)),
        }}
    reply["sent"] = list(SENT)
    print(json.dumps(reply), flush=True)
"#;

/// A running driver, killed when dropped.
struct Trove {
    child: Child,
    stdin: ChildStdin,
    lines: mpsc::Receiver<String>,
    stderr: tempfile::NamedTempFile,
    _cache: tempfile::TempDir,
}

impl Trove {
    fn start(venv: &Path, url: &str, token: &str) -> Trove {
        let stderr = tempfile::NamedTempFile::new().unwrap();
        let cache = tempfile::tempdir().unwrap();
        let mut child = Command::new(venv.join("bin/python"))
            .args(["-c", DRIVER])
            .env_remove("PYTHONPATH")
            .env_remove("PYTHONHOME")
            .env("NO_PROXY", "*")
            .env("no_proxy", "*")
            .env("TROVE_URL", url)
            .env("TROVE_TOKEN", token)
            .env("TROVE_WRONG_TOKEN", "not-the-admin-token")
            // troveclient's completion cache, should a call write it.
            .env("TROVECLIENT_UUID_CACHE_DIR", cache.path())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(stderr.reopen().unwrap()))
            .spawn()
            .expect("run the venv's python");
        let stdin = child.stdin.take().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Trove {
            child,
            stdin,
            lines,
            stderr,
            _cache: cache,
        }
    }

    /// Send one command; the whole answer (`ok` or `error`, and `sent`).
    fn call(&mut self, req: Value) -> Value {
        let written = writeln!(self.stdin, "{req}").and_then(|()| self.stdin.flush());
        let line = written
            .ok()
            .and_then(|()| self.lines.recv_timeout(Duration::from_secs(60)).ok());
        let Some(line) = line else {
            let _ = self.child.kill();
            panic!(
                "the troveclient driver did not answer {req}; stderr:\n{}",
                std::fs::read_to_string(self.stderr.path()).unwrap_or_default()
            );
        };
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"))
    }

    /// Send one command that must succeed; its result.
    #[track_caller]
    fn ok(&mut self, req: Value) -> Value {
        let a = self.call(req.clone());
        match a.get("ok") {
            Some(v) => v.clone(),
            None => panic!("troveclient {req} failed: {a}"),
        }
    }
}

impl Drop for Trove {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `GET` a tenant's Trove security group, the token presented the way
/// Trove clients present it (`X-Auth-Token`).
fn get_with_auth_token(s: &Server, tenant: &str, id: &str) -> (u16, Value) {
    let a = s
        .admin()
        .presented(Presented::AuthToken)
        .fetch(route::trove_security_group(tenant, id));
    (
        a.status,
        serde_json::from_slice(&a.body).unwrap_or(Value::Null),
    )
}

fn instance(s: &Server, name: &str, project: &str, address: &str) -> String {
    let view = s.admin().create(&json!({
        "name": name,
        "project_id": project,
        "metadata_address": address,
    }));
    view["id"].as_str().unwrap().to_string()
}

/// A native rule; its id.
fn native_rule(s: &Server, tenant: &str, group: &str, rule: Value) -> String {
    let a = s
        .admin()
        .fetch(route::add_rule(tenant, group, &typed(&rule)));
    assert_eq!(a.status, 201, "{}", a.text());
    a.json()["security_group_rule"]["id"]
        .as_str()
        .unwrap()
        .to_string()
}

#[track_caller]
fn assert_not_found(answer: &Value, what: &str) {
    assert_eq!(
        answer["error"]["status"], 404,
        "{what}: expected troveclient's NotFound, got {answer}"
    );
    assert_eq!(answer["error"]["class"], "NotFound", "{what}: {answer}");
}

#[test]
fn troveclient_lists_shows_adds_and_deletes_rules() {
    let venv = troveclient_venv();
    let s = Server::start();

    let a1 = instance(&s, "db-a", "p1", "127.0.0.11");
    let a2 = instance(&s, "db-b", "p1", "127.0.0.12");
    let b1 = instance(&s, "db-c", "p2", "127.0.0.13");
    let own_group = |tenant: &str, inst: &str| -> String {
        let a = s.admin().fetch(route::security_groups(tenant));
        assert_eq!(a.status, 200, "{}", a.text());
        let list = a.json()["security_groups"].as_array().unwrap().clone();
        let g = list
            .iter()
            .find(|g| g["instance_id"] == inst)
            .unwrap_or_else(|| panic!("no group of {inst} in {list:?}"));
        g["id"].as_str().unwrap().to_string()
    };
    let g1 = own_group("p1", &a1);
    let g2 = own_group("p1", &a2);
    let other = own_group("p2", &b1);
    // A rule on the first group, so that show has one to return.
    let ssh = native_rule(
        &s,
        "p1",
        &g1,
        json!({"protocol": "tcp", "from_port": 22, "to_port": 22, "cidr": "10.0.0.0/8"}),
    );
    // And one in the other tenant, which p1 must not be able to delete.
    let foreign = native_rule(&s, "p2", &other, json!({"cidr": "198.51.100.0/24"}));

    // Another tenant's group does not exist for p1, by group id or by
    // instance id.
    for id in [&other, &b1] {
        let (status, body) = get_with_auth_token(&s, "p1", id);
        assert_eq!(status, 404, "p2's group through p1 by {id}: {body}");
    }
    let (status, body) = get_with_auth_token(&s, "p2", &other);
    assert_eq!(status, 200, "p2's group through p2: {body}");

    let endpoint = format!("{}/v1.0/p1", s.admin_url);
    let mut trove = Trove::start(&venv, &endpoint, &s.token);
    let version = trove.ok(json!({"op": "version"}));
    eprintln!("troveclient: {version}");
    assert_eq!(
        format!(
            "python-troveclient=={}",
            version["troveclient"].as_str().unwrap()
        ),
        TROVECLIENT
    );
    assert_eq!(version["client"], "troveclient.client.SessionClient");
    assert_eq!(version["management_url"], endpoint.as_str());

    // list: exactly p1's two instance groups.
    let listed = trove.call(json!({"op": "list"}));
    assert_eq!(
        listed["sent"],
        json!([{"method": "GET", "url": "/security-groups", "json": null}])
    );
    let mut groups: Vec<(String, String, String)> = listed["ok"]
        .as_array()
        .unwrap_or_else(|| panic!("list failed: {listed}"))
        .iter()
        .map(|g| {
            (
                g["id"].as_str().unwrap().to_string(),
                g["name"].as_str().unwrap().to_string(),
                g["instance_id"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    groups.sort();
    let mut want = vec![
        (g1.clone(), format!("cradle-sg-{a1}"), a1.clone()),
        (g2.clone(), format!("cradle-sg-{a2}"), a2.clone()),
    ];
    want.sort();
    assert_eq!(groups, want, "{listed}");

    // get (show): the group with its rules, by group id and by instance id.
    let shown = trove.ok(json!({"op": "get", "id": g1}));
    assert_eq!(shown["id"], g1.as_str());
    assert_eq!(shown["name"], format!("cradle-sg-{a1}"));
    assert_eq!(shown["instance_id"], a1.as_str());
    let rules = shown["rules"].as_array().expect("show has rules");
    assert_eq!(rules.len(), 1, "{shown}");
    for (k, v) in [
        ("id", json!(ssh)),
        ("security_group_id", json!(g1)),
        ("protocol", json!("tcp")),
        ("from_port", json!(22)),
        ("to_port", json!(22)),
        ("cidr", json!("10.0.0.0/8")),
    ] {
        assert_eq!(rules[0][k], v, "rule field {k}: {shown}");
    }
    assert!(rules[0]["created"].is_string(), "{shown}");
    let by_instance = trove.ok(json!({"op": "get", "id": a1}));
    assert_eq!(by_instance, shown);
    // Tenant-filtered through troveclient too.
    assert_not_found(&trove.call(json!({"op": "get", "id": other})), "p2's group");
    assert_not_found(&trove.call(json!({"op": "get", "id": b1})), "p2's instance");

    // create: troveclient sends only the group and the CIDR; cradle then
    // allows every protocol from the CIDR.
    let created = trove.call(json!({"op": "create", "group_id": g2, "cidr": "192.0.2.0/24"}));
    assert_eq!(
        created["sent"],
        json!([{
            "method": "POST",
            "url": "/security-group-rules",
            "json": {"security_group_rule": {"group_id": g2, "cidr": "192.0.2.0/24"}},
        }]),
        "{created}"
    );
    let new_rules = created["ok"]
        .as_array()
        .unwrap_or_else(|| panic!("create failed: {created}"));
    assert_eq!(new_rules.len(), 1, "{created}");
    let rule = &new_rules[0];
    let rule_id = rule["id"].as_str().unwrap().to_string();
    assert_eq!(rule["cidr"], "192.0.2.0/24");
    assert_eq!(rule["security_group_id"], g2.as_str());
    assert_eq!(rule["group_id"], g2.as_str());
    assert_eq!(rule["protocol"], "any");
    assert_eq!(rule["from_port"], Value::Null);
    assert_eq!(rule["to_port"], Value::Null);
    assert!(rule["created"].is_string(), "{created}");
    let native = sg_group(&s, "p1", &g2);
    assert_eq!(
        rule_ids(&native),
        std::slice::from_ref(&rule_id),
        "{native}"
    );
    assert_eq!(native["rules"][0]["cidr"], "192.0.2.0/24");
    // ... and troveclient's show sees it as well.
    let shown = trove.ok(json!({"op": "get", "id": g2}));
    assert_eq!(shown["rules"], json!([rule.clone()]));

    // delete: p2's rule is not p1's to delete; p1's own goes.
    assert_not_found(
        &trove.call(json!({"op": "delete", "id": foreign})),
        "deleting p2's rule",
    );
    assert_eq!(rule_ids(&sg_group(&s, "p2", &other)), [foreign]);
    let deleted = trove.call(json!({"op": "delete", "id": rule_id}));
    assert_eq!(deleted["ok"], Value::Null, "{deleted}");
    assert_eq!(
        deleted["sent"],
        json!([{"method": "DELETE", "url": format!("/security-group-rules/{rule_id}"), "json": null}])
    );
    assert_eq!(rule_ids(&sg_group(&s, "p1", &g2)), Vec::<String>::new());
    assert_eq!(rule_ids(&sg_group(&s, "p1", &g1)), [ssh]);
    assert_not_found(
        &trove.call(json!({"op": "delete", "id": rule_id})),
        "deleting it again",
    );

    // A wrong token is refused, and troveclient reports Unauthorized.
    let refused = trove.call(json!({"op": "list", "token": "wrong"}));
    assert_eq!(refused["error"]["status"], 401, "{refused}");
    assert_eq!(refused["error"]["class"], "Unauthorized", "{refused}");
    assert_eq!(refused.get("ok"), None);
}

#[test]
fn troveclient_with_a_project_token_reaches_its_tenant_and_no_other() {
    let venv = troveclient_venv();
    let s = Server::with_tokens(&[Named {
        name: "p1-operator",
        roles: &[],
        projects: &["p1"],
        token: "p1-project-token",
    }]);
    let mine = instance(&s, "db-mine", "p1", "127.0.0.21");
    instance(&s, "db-theirs", "p2", "127.0.0.22");

    let own = format!("{}/v1.0/p1", s.admin_url);
    let mut trove = Trove::start(&venv, &own, "p1-project-token");
    let listed = trove.ok(json!({"op": "list"}));
    let instances: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["instance_id"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(instances, [mine.as_str()], "{listed}");

    // The same token at another tenant's endpoint: troveclient's Forbidden,
    // with cradle's message, and nothing of p2's.
    let theirs = format!("{}/v1.0/p2", s.admin_url);
    let mut trove = Trove::start(&venv, &theirs, "p1-project-token");
    let refused = trove.call(json!({"op": "list"}));
    assert_eq!(refused["error"]["status"], 403, "{refused}");
    assert_eq!(refused["error"]["class"], "Forbidden", "{refused}");
    assert!(
        refused["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("\"p2\" is not one this token acts for")),
        "{refused}"
    );
    assert!(!refused.to_string().contains("db-theirs"));
}
