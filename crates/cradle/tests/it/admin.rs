//! The admin API, against a running server.

use cradle_client::Method;
use cradle_model::api::{InstancePatch, InstanceSpec};
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use crate::harness::*;

/// `v` read as a typed request body (`InstanceSpec`, `InstancePatch`,
/// `RuleRequest`, …); it must read as one.
#[track_caller]
pub fn typed<B: DeserializeOwned>(v: &Value) -> B {
    serde_json::from_value(v.clone())
        .unwrap_or_else(|e| panic!("not a {} ({e}): {v}", std::any::type_name::<B>()))
}

/// Send the route `route` makes of `body` read as its typed request (`B`).
/// A body that does not read as one (malformed JSON, unknown fields, wrong
/// types: what the typed request cannot say) goes as raw text on the same
/// route instead.
pub fn fetch_body<B: DeserializeOwned + Default, T>(
    admin: &Admin,
    body: &str,
    route: impl FnOnce(&B) -> Request<T>,
) -> Answer {
    match serde_json::from_str::<B>(body) {
        Ok(b) => admin.fetch(route(&b)),
        Err(_) => admin.fetch_raw(route(&B::default()), body),
    }
}

#[test]
fn serve_generates_a_private_token_and_answers_with_it() {
    use std::os::unix::fs::PermissionsExt;
    let s = Server::start();
    let mode = std::fs::metadata(s.data_dir.join("admin.token"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    assert_eq!(s.admin().fetch(route::instances()).status, 200);
}

/// `xxxxxxxx-xxxx-4xxx-[89ab]xxx-xxxxxxxxxxxx`, lower-case hex.
pub fn assert_uuid_v4(id: &str) {
    let groups: Vec<&str> = id.split('-').collect();
    let lens: Vec<usize> = groups.iter().map(|g| g.len()).collect();
    assert_eq!(lens, [8, 4, 4, 4, 12], "not a UUID: {id}");
    assert!(
        groups.iter().all(|g| g
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))),
        "not lower-case hex: {id}"
    );
    assert!(groups[2].starts_with('4'), "not version 4: {id}");
    assert!(
        groups[3].starts_with(['8', '9', 'a', 'b']),
        "not the RFC 4122 variant: {id}"
    );
}

/// An error answer: the status, `{"error":{"code","message"}}` with nothing
/// else, and a message that mentions each of `needles`.
#[track_caller]
pub fn assert_error(a: &Answer, status: u16, code: &str, needles: &[&str]) -> String {
    assert_eq!(a.status, status, "body: {}", a.text());
    let ct = a
        .headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    assert!(ct.starts_with("application/json"), "content-type {ct:?}");
    let body = a.json();
    let obj = body.as_object().expect("an object");
    assert_eq!(obj.len(), 1, "only \"error\": {body}");
    let err = body["error"].as_object().expect("error is an object");
    assert_eq!(err.len(), 2, "error has code and message only: {body}");
    assert_eq!(err["code"], code, "{body}");
    let message = err["message"].as_str().expect("message is a string");
    assert!(!message.is_empty());
    for n in needles {
        assert!(
            message.contains(n),
            "message {message:?} should mention {n:?}"
        );
    }
    message.to_string()
}

fn ids(list: &Answer) -> Vec<String> {
    assert_eq!(list.status, 200, "{}", list.text());
    list.json()["instances"]
        .as_array()
        .expect("instances is an array")
        .iter()
        .map(|i| i["id"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn instance_lifecycle_create_read_patch_delete() {
    let s = Server::start();
    let admin = s.admin();
    let guest = s.guest("127.0.0.21");
    let user_data = b"#cloud-config\nruncmd: [true]\n\xff\x00binary tail".to_vec();
    let key = ssh_key(7, "alice@example");
    let spec = json!({
        "name": "crud1",
        "hostname": "crud1.example",
        "metadata_address": "127.0.0.21",
        "metadata": {"role": "web", "tier": "1"},
        "public_keys": {"alice": key},
        "user_data": b64(&user_data),
        "os_params": {
            "public": {"greeting": "hello", "moving": "in-the-open"},
            "private": {"priv1": "private-value-1"},
            "secret": {"sec1": "secret-value-1"}
        }
    });

    // Create.
    let a = admin.fetch(route::create_instance(&typed(&spec)));
    assert_eq!(a.status, 201, "{}", a.text());
    assert!(!a.text().contains("private-value-1") && !a.text().contains("secret-value-1"));
    let created = a.json();
    let id = created["id"].as_str().expect("id").to_string();
    assert_uuid_v4(&id);
    assert_eq!(
        a.headers.get("location").and_then(|v| v.to_str().ok()),
        Some(format!("/v1/instances/{id}").as_str())
    );
    assert_eq!(created["name"], "crud1");
    assert_eq!(created["hostname"], "crud1.example");
    assert_eq!(created["metadata_address"], "127.0.0.21");
    assert_eq!(created["metadata"], json!({"role": "web", "tier": "1"}));
    assert_eq!(created["public_keys"], json!({"alice": key}));
    assert_eq!(created["user_data"], b64(&user_data));
    assert_eq!(
        created["os_params"],
        json!({
            "public": {"greeting": "hello", "moving": "in-the-open"},
            "private": ["priv1"],
            "secret": ["sec1"]
        })
    );
    assert_eq!(created["imds_tokens"], "optional");
    assert_eq!(created["state"], "registered");
    assert_eq!(created["password_set"], false);

    // Read: in the list, by id, by name, and as the guest.
    assert!(ids(&admin.fetch(route::instances())).contains(&id));
    let by_id = admin.fetch(route::instance(&id));
    assert_eq!(by_id.status, 200);
    assert_eq!(by_id.json(), created);
    let by_name = admin.fetch(route::instance("crud1"));
    assert_eq!(by_name.status, 200);
    assert_eq!(by_name.json(), created);
    let ud = guest.get("/openstack/latest/user_data");
    assert_eq!(ud.status, 200);
    assert_eq!(ud.body, user_data, "user_data round-trips byte for byte");
    let md = guest.get("/openstack/latest/meta_data.json");
    assert_eq!(md.status, 200, "{}", md.text());
    assert_eq!(md.json()["uuid"], id.as_str());
    assert_eq!(md.json()["meta"], json!({"role": "web", "tier": "1"}));

    // Patch: rename, merge metadata (null removes), move a parameter from
    // public to secret, require IMDSv2 tokens.
    let patch = json!({
        "name": "crud1-renamed",
        "metadata": {"role": null, "tier": "2", "added": "yes"},
        "os_params": {"secret": {"moving": "now-a-secret"}},
        "imds_tokens": "required"
    });
    let a = admin.fetch(route::modify_instance("crud1", &typed(&patch)));
    assert_eq!(a.status, 200, "{}", a.text());
    assert!(!a.text().contains("now-a-secret"));
    let patched = a.json();
    assert_eq!(patched["id"], id.as_str());
    assert_eq!(patched["name"], "crud1-renamed");
    assert_eq!(patched["metadata"], json!({"added": "yes", "tier": "2"}));
    assert_eq!(
        patched["os_params"],
        json!({
            "public": {"greeting": "hello"},
            "private": ["priv1"],
            "secret": ["moving", "sec1"]
        })
    );
    assert_eq!(patched["imds_tokens"], "required");
    // Untouched fields stay.
    assert_eq!(patched["hostname"], "crud1.example");
    assert_eq!(patched["user_data"], b64(&user_data));
    assert_eq!(patched["created_at"], created["created_at"]);

    let again = admin.fetch(route::instance(&id));
    assert_eq!(again.json(), patched);
    assert_eq!(
        admin.fetch(route::instance("crud1-renamed")).json(),
        patched
    );
    assert_error(
        &admin.fetch(route::instance("crud1")),
        404,
        "not_found",
        &["crud1"],
    );

    // The guest sees the change: tokens now required, new metadata, the
    // moved parameter as secret.
    assert_eq!(guest.get("/latest/meta-data/instance-id").status, 401);
    let token = guest.token(60);
    let with_token = |path: &str| {
        guest.request(
            "GET",
            path,
            &[("X-aws-ec2-metadata-token", token.as_str())],
            None,
        )
    };
    let md = with_token("/openstack/latest/meta_data.json");
    assert_eq!(md.status, 200, "{}", md.text());
    assert_eq!(md.json()["meta"], json!({"added": "yes", "tier": "2"}));
    assert_eq!(md.json()["name"], "crud1-renamed");
    let params = with_token("/cradle/latest/os/parameters.json");
    assert_eq!(params.status, 200);
    assert_eq!(
        params.json(),
        json!({
            "greeting": ["hello", "public"],
            "moving": ["now-a-secret", "secret"],
            "priv1": ["private-value-1", "private"],
            "sec1": ["secret-value-1", "secret"]
        })
    );

    // Delete.
    let a = admin.fetch(route::remove_instance(&id));
    assert_eq!(a.status, 204, "{}", a.text());
    assert!(a.body.is_empty());
    assert_error(&admin.fetch(route::instance(&id)), 404, "not_found", &[&id]);
    assert_error(
        &admin.fetch(route::instance("crud1-renamed")),
        404,
        "not_found",
        &[],
    );
    assert!(!ids(&admin.fetch(route::instances())).contains(&id));
    assert_error(
        &admin.fetch(route::remove_instance(&id)),
        404,
        "not_found",
        &[],
    );
    let gone = guest.get("/openstack/latest/meta_data.json");
    assert_eq!(gone.status, 404, "{}", gone.text());
    // The address is free again.
    let mut respec = spec.clone();
    respec["name"] = json!("crud1-again");
    admin.create(&respec);
}

/// Every refused request gets the right status and a JSON error naming what
/// was wrong, changes nothing, and leaves the server serving.
#[test]
fn bad_requests_get_json_errors_and_change_nothing() {
    let mut s = Server::start();
    let admin = s.admin();
    let taken = admin.create(&json!({"name": "taken", "metadata_address": "127.0.0.30"}));
    let other = admin.create(&json!({"name": "other", "metadata_address": "127.0.0.31"}));
    let base = |extra: Value| {
        let mut spec = json!({"name": "fresh", "metadata_address": "127.0.0.32"});
        for (k, v) in extra.as_object().unwrap() {
            spec[k] = v.clone();
        }
        spec.to_string()
    };
    let big_user_data = b64(&vec![b'x'; 64 * 1024 + 1]);
    let uuid_name = "0b4f8e2c-5a1d-4c3e-9f7a-1234567890ab";
    let other_key = ssh_key(1, "bob").replacen("ssh-ed25519", "ssh-rsa", 1);

    struct Case {
        what: &'static str,
        /// Sends the request.
        send: Box<dyn Fn(&Admin) -> Answer>,
        status: u16,
        code: &'static str,
        /// Words the message must hold.
        needles: Vec<&'static str>,
    }
    let case = |what, send: Box<dyn Fn(&Admin) -> Answer>, status, code, needles: &[_]| Case {
        what,
        send,
        status,
        code,
        needles: needles.to_vec(),
    };
    // A create with `text` as its body: typed when it reads as a spec, else
    // raw (malformed JSON, unknown fields, wrong types).
    let post_text = |what, text: &str, status, code, needles: &[_]| {
        let text = text.to_string();
        case(
            what,
            Box::new(move |admin| fetch_body(admin, &text, route::create_instance)),
            status,
            code,
            needles,
        )
    };
    // A create: a valid spec with `extra` laid over it.
    let post = |what, extra: Value, status, code, needles: &[_]| {
        post_text(what, &base(extra), status, code, needles)
    };
    let patch = |what, body: Value, status, code, needles: &[_]| {
        let body = body.to_string();
        case(
            what,
            Box::new(move |admin| {
                fetch_body(admin, &body, |p: &InstancePatch| {
                    route::modify_instance("other", p)
                })
            }),
            status,
            code,
            needles,
        )
    };
    // A path the typed client has no route for (no such route, a method the
    // route does not take, a key that is not UTF-8), with an optional raw body.
    let unlisted = |what,
                    method: Method,
                    path: &'static str,
                    body: Option<&str>,
                    status,
                    code,
                    needles: &[_]| {
        let body = body.map(str::to_string);
        case(
            what,
            Box::new(move |admin| {
                let req = route::unlisted(method.clone(), path);
                match &body {
                    Some(b) => admin.fetch_raw(req, b),
                    None => admin.fetch(req),
                }
            }),
            status,
            code,
            needles,
        )
    };
    let fetch = |what, req: fn() -> Request<Value>, status, code, needles: &[_]| {
        case(
            what,
            Box::new(move |admin| admin.fetch(req())),
            status,
            code,
            needles,
        )
    };
    let message = |what, key: &'static str, body: &str, status, code, needles: &[_]| {
        let body = body.to_string();
        case(
            what,
            Box::new(move |admin| fetch_body(admin, &body, |m| route::send_message(key, m))),
            status,
            code,
            needles,
        )
    };
    #[rustfmt::skip]
    let cases = [
        post_text("malformed JSON", r#"{"name": "x","#, 400, "bad_request", &["malformed JSON"]),
        post_text("trailing garbage", &format!("{} x", base(json!({}))), 400, "bad_request", &["malformed JSON"]),
        post("unknown field", json!({"colour": "red"}), 422, "invalid", &["colour"]),
        post("unknown nested field", json!({"os_params": {"hidden": {}}}), 422, "invalid", &["hidden"]),
        post("wrong type", json!({"launch_index": "three"}), 422, "invalid", &["launch_index"]),
        post("wrong nested type", json!({"metadata": {"k": 5}}), 422, "invalid", &["metadata.k"]),
        post_text("metadata_address not a string", r#"{"name": "fresh", "metadata_address": 5}"#, 422, "invalid", &["metadata_address"]),
        post("duplicate name", json!({"name": "taken"}), 409, "conflict", &["name"]),
        post("duplicate metadata_address", json!({"metadata_address": "127.0.0.30"}), 409, "conflict", &["metadata_address"]),
        patch("duplicate metadata_address on PATCH", json!({"metadata_address": "127.0.0.30"}), 409, "conflict", &["metadata_address"]),
        patch("duplicate name on PATCH", json!({"name": "taken"}), 409, "conflict", &["name"]),
        post("address out of range", json!({"metadata_address": "999.1.1.1"}), 422, "invalid", &["metadata_address", "999.1.1.1"]),
        post("unspecified address", json!({"metadata_address": "0.0.0.0"}), 422, "invalid", &["metadata_address"]),
        patch("bad address on PATCH", json!({"metadata_address": "0.0.0.0"}), 422, "invalid", &["metadata_address"]),
        post("bad mac", json!({"mac": "fa:16:3e:zz:00:01"}), 422, "invalid", &["mac"]),
        post("multicast mac", json!({"mac": "01:00:5e:00:00:01"}), 422, "invalid", &["mac"]),
        post("bad hostname", json!({"hostname": "-bad_host-"}), 422, "invalid", &["hostname"]),
        post("bad ssh key", json!({"public_keys": {"alice": "ssh-ed25519 not*base64 a"}}), 422, "invalid", &["public_keys.alice"]),
        post("ssh key of another type", json!({"public_keys": {"bob": other_key}}), 422, "invalid", &["public_keys.bob"]),
        post("user_data over 64 KiB", json!({"user_data": big_user_data}), 422, "invalid", &["user_data", "65537"]),
        post("user_data not base64", json!({"user_data": "not base64!"}), 422, "invalid", &["user_data", "base64"]),
        post("os_type with os_image", json!({"os_type": "debian", "os_image": "ami-1"}), 422, "invalid", &["os_type", "os_image"]),
        post("param name with a hyphen", json!({"os_params": {"public": {"bad-name": "v"}}}), 422, "invalid", &["os_params", "bad-name"]),
        post("param in two visibilities", json!({"os_params": {"public": {"dup": "a"}, "secret": {"dup": "b"}}}), 422, "invalid", &["os_params", "dup"]),
        post("param in two visibilities ignoring case", json!({"os_params": {"private": {"Dup": "a"}, "secret": {"DUP": "b"}}}), 422, "invalid", &["os_params"]),
        post("name that is a UUID", json!({"name": uuid_name}), 422, "invalid", &["name", "UUID"]),
        patch("rename to a UUID", json!({"name": uuid_name}), 422, "invalid", &["name"]),
        post("empty name", json!({"name": ""}), 422, "invalid", &["name"]),
        post("bad imds_tokens", json!({"imds_tokens": "sometimes"}), 422, "invalid", &["imds_tokens"]),
        // A key is text: the typed route cannot name one that is not UTF-8.
        unlisted("path not UTF-8", Method::GET, "/v1/instances/%FF%FE", None, 400, "bad_request", &["UTF-8"]),
        unlisted("PATCH path not UTF-8", Method::PATCH, "/v1/instances/%FF%FE", Some("{}"), 400, "bad_request", &["UTF-8"]),
        unlisted("tenant not UTF-8", Method::GET, "/v1/tenants/%FF/security-groups", None, 400, "bad_request", &["UTF-8"]),
        unlisted("group id not UTF-8", Method::DELETE, "/v1/tenants/t1/security-groups/%FF", None, 400, "bad_request", &["UTF-8"]),
        // Query strings that do not fit their route are ours too, not
        // axum's plain-text rejection.
        fetch("query value that is not a number", || route::install_job("taken", 0, std::time::Duration::ZERO).with_query("after", "soon").as_json(), 400, "bad_request", &["query string"]),
        fetch("query value that is not a boolean", || route::stop_vm("taken", false, std::time::Duration::ZERO).with_query("force", "maybe").as_json(), 400, "bad_request", &["query string"]),
        fetch("no such instance", || route::instance("nobody").as_json(), 404, "not_found", &["nobody"]),
        unlisted("unknown route", Method::GET, "/v2/instances", None, 404, "not_found", &[]),
        unlisted("unknown route under /v1", Method::GET, "/v1/instances/taken/nothing", None, 404, "not_found", &[]),
        unlisted("wrong method", Method::PUT, "/v1/instances", Some(&base(json!({}))), 405, "method_not_allowed", &[]),
        unlisted("wrong method on an instance", Method::POST, "/v1/instances/taken", Some("{}"), 405, "method_not_allowed", &[]),
        message("message with text and data", "taken", r#"{"text": "a", "data": "YQ=="}"#, 422, "invalid", &["text", "data"]),
    ];
    for Case {
        what,
        send,
        status,
        code,
        needles,
    } in &cases
    {
        let a = send(&admin);
        let message = assert_error(&a, *status, code, needles);
        eprintln!("{what}: {status} {message}");
        assert!(s.alive(), "server died after {what}");
        assert_eq!(admin.fetch(route::instances()).status, 200, "after {what}");
    }

    // A refused change changed nothing, and nothing was created.
    let list = admin.fetch(route::instances());
    let mut listed = ids(&list);
    listed.sort();
    let mut expected = [&taken, &other].map(|i| i["id"].as_str().unwrap().to_string());
    expected.sort();
    assert_eq!(listed, expected);
    assert_eq!(admin.fetch(route::instance("taken")).json(), taken);
    assert_eq!(admin.fetch(route::instance("other")).json(), other);
    // The same bodies, made valid, are accepted: the refusals were for the
    // reasons named, not for anything else in the request.
    admin.create(
        &serde_json::from_str(&base(json!({"os_params": {"public": {"good_name": "v"}}}))).unwrap(),
    );
}

#[test]
fn a_missing_or_wrong_token_is_401() {
    let mut s = Server::start();
    let requests: [fn() -> Request<Value>; 4] = [
        || route::instances().as_json(),
        || route::metrics().as_json(),
        || {
            route::create_instance(&InstanceSpec {
                name: "x".into(),
                metadata_address: Some("127.0.0.33".into()),
                ..Default::default()
            })
            .as_json()
        },
        || route::unlisted(Method::GET, "/no/such/route"),
    ];
    let admin = s.admin();
    // The Authorization header each caller sends (none at all, a wrong
    // bearer token, another scheme, an empty bearer token).
    let callers = [
        (None, admin.presented(Presented::Anonymous)),
        (Some("Bearer wrong"), admin.with_token("wrong")),
        (
            Some("Basic YWRtaW46YWRtaW4="),
            admin
                .with_token("Basic YWRtaW46YWRtaW4=")
                .presented(Presented::Authorization),
        ),
        (Some("Bearer "), admin.with_token("")),
    ];
    for request in requests {
        for (auth, caller) in &callers {
            let req = request();
            let (method, path) = (req.method().clone(), req.path().to_string());
            let a = caller.fetch(req);
            assert_eq!(
                a.headers
                    .get("www-authenticate")
                    .and_then(|v| v.to_str().ok()),
                Some("Bearer"),
                "{method} {path} {auth:?}"
            );
            assert_error(&a, 401, "unauthorized", &["token"]);
        }
    }
    // A token with the right prefix is still wrong.
    let truncated = admin.with_token(&s.token[..s.token.len() - 1]);
    assert_eq!(truncated.fetch(route::instances()).status, 401);
    // Nothing was created without a token, and the server is fine.
    assert!(s.alive());
    let list = s.admin().fetch(route::instances());
    assert!(ids(&list).is_empty());
}

#[test]
fn a_body_over_the_limit_is_413() {
    let mut s = Server::start_with(Opts {
        env: &[("CRADLE_ADMIN_MAX_BODY_BYTES", "4096")],
        ..Default::default()
    });
    let admin = s.admin();
    let padded = |len: usize| {
        let mut spec =
            json!({"name": "big", "metadata_address": "127.0.0.34", "metadata": {"pad": ""}});
        let base = spec.to_string().len();
        spec["metadata"]["pad"] = json!("p".repeat(len - base));
        let text = spec.to_string();
        assert_eq!(text.len(), len);
        text
    };
    // The bodies go as raw text: their length in bytes is the point, and
    // the typed request would write its own.
    let create = || route::create_instance(&InstanceSpec::default());
    let a = admin.fetch_raw(create(), &padded(8 * 1024));
    assert_error(&a, 413, "too_large", &["too large"]);
    assert!(s.alive());
    let a = admin.fetch_raw(
        route::modify_instance("big", &InstancePatch::default()),
        &padded(8 * 1024),
    );
    assert_error(&a, 413, "too_large", &[]);
    // Under the limit, the same kind of body gets through to validation
    // (the pad is over the 255-character metadata limit).
    let a = admin.fetch_raw(create(), &padded(4000));
    assert_error(&a, 422, "invalid", &["metadata.pad"]);
    assert!(s.alive());
    assert_eq!(admin.fetch(route::instances()).status, 200);
}

/// A mistyped value that might be a secret is refused without being echoed.
#[test]
fn mistyped_values_are_not_echoed() {
    let mut s = Server::start();
    let admin = s.admin();
    let canary = format!("SECRETCANARY-{}", std::process::id());
    let bodies = [
        json!({"name": "m", "metadata_address": "127.0.0.35", "launch_index": canary}),
        json!({"name": "m", "metadata_address": "127.0.0.35", "imds_tokens": canary}),
        json!({"name": "m", "metadata_address": "127.0.0.35", "os_params": {"secret": canary}}),
        json!({"name": "m", "metadata_address": "127.0.0.35", "dns_nameservers": canary}),
        json!({"name": "m", "metadata_address": "127.0.0.35", "os_params": {"secret": {"k": [canary]}}}),
        json!({"name": "m", "metadata_address": "127.0.0.35", "os_params": {"secret": {"bad-name": canary}}}),
        json!({"name": "m", "metadata_address": "127.0.0.35", "os_params": {"public": {"k": "v"}, "secret": {"k": canary}}}),
        json!({"name": "m", "metadata_address": "127.0.0.35", "os_params": {"secret": {"k": 12345}}}),
    ];
    let post = |body: &Value| fetch_body(&admin, &body.to_string(), route::create_instance);
    for body in &bodies {
        let a = post(body);
        let message = assert_error(&a, 422, "invalid", &[]);
        assert!(!a.text().contains("SECRETCANARY"), "echoed: {}", a.text());
        eprintln!("{message}");
        assert!(s.alive());
    }
    // The messages still say where the problem is.
    let a = post(&bodies[0]);
    assert_error(&a, 422, "invalid", &["launch_index"]);
    let a = post(&bodies[1]);
    assert_error(&a, 422, "invalid", &["imds_tokens", "optional", "required"]);
    let a = post(&bodies[7]);
    assert_error(&a, 422, "invalid", &["os_params.secret.k"]);
    // In a PATCH too.
    admin.create(&json!({"name": "m", "metadata_address": "127.0.0.35"}));
    let a = fetch_body(
        &admin,
        &json!({"launch_index": canary}).to_string(),
        |p: &InstancePatch| route::modify_instance("m", p),
    );
    assert_error(&a, 422, "invalid", &["launch_index"]);
    assert!(!a.text().contains("SECRETCANARY"));
    assert!(!s.log().contains("SECRETCANARY"));
}

/// The value of one sample line, `name{labels} value`, whose name and labels
/// hold every part of `want`.
fn sample(text: &str, name: &str, want: &[&str]) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.split(['{', ' ']).next() == Some(name) && want.iter().all(|w| l.contains(w)))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .reduce(f64::max)
}

#[test]
fn metrics_count_requests_by_namespace_and_instances() {
    let s = Server::start();
    let admin = s.admin();
    admin.create(&json!({"name": "m1", "metadata_address": "127.0.0.36"}));
    admin.create(&json!({"name": "m2", "metadata_address": "127.0.0.37"}));
    admin.create(&json!({"name": "m3", "metadata_address": "127.0.0.38"}));
    assert_eq!(
        s.guest("127.0.0.36")
            .get("/openstack/latest/meta_data.json")
            .status,
        200
    );
    assert_eq!(
        s.guest("127.0.0.36").get("/latest/meta-data/nope").status,
        404
    );
    assert_eq!(s.guest("127.0.0.99").get("/latest/meta-data/").status, 404);

    let m = admin.fetch(route::metrics());
    assert_eq!(m.status, 200);
    let ct = m.headers.get("content-type").unwrap().to_str().unwrap();
    assert!(ct.contains("text"), "{ct}");
    let text = m.text();
    assert!(text.trim_end().ends_with("# EOF"), "{text}");
    assert!(text.contains("# TYPE cradle_requests counter"), "{text}");
    let count = |want: &[&str]| sample(&text, "cradle_requests_total", want);
    assert!(
        count(&["namespace=\"admin\"", "status=\"201\""]) >= Some(3.0),
        "{text}"
    );
    assert_eq!(
        count(&["namespace=\"openstack\"", "status=\"200\""]),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        count(&["namespace=\"ec2\"", "status=\"404\""]),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        count(&["namespace=\"none\"", "status=\"404\""]),
        Some(1.0),
        "{text}"
    );
    for ns in ["admin", "openstack"] {
        let label = format!("namespace=\"{ns}\"");
        let inf = sample(
            &text,
            "cradle_request_duration_seconds_bucket",
            &[&label, "le=\"+Inf\""],
        );
        assert!(inf >= Some(1.0), "{ns}: {text}");
        let buckets = text
            .lines()
            .filter(|l| {
                l.starts_with("cradle_request_duration_seconds_bucket{") && l.contains(&label)
            })
            .count();
        assert!(buckets > 10, "{ns} has {buckets} buckets: {text}");
        assert!(
            sample(&text, "cradle_request_duration_seconds_count", &[&label]) >= Some(1.0),
            "{text}"
        );
    }
    assert_eq!(sample(&text, "cradle_instances", &[]), Some(3.0), "{text}");

    assert_eq!(admin.fetch(route::remove_instance("m2")).status, 204);
    let text = admin.fetch(route::metrics()).text();
    assert_eq!(sample(&text, "cradle_instances", &[]), Some(2.0), "{text}");

    let anon = s.admin().with_token("");
    let a = anon.fetch(route::metrics());
    assert_error(&a, 401, "unauthorized", &[]);
    assert!(!a.text().contains("cradle_requests_total"));
}

/// See: the seed's mail-server example. A caller's roles at creation stay
/// with the instance, whatever happens to the caller's roles afterwards.
#[test]
fn boot_roles_are_the_callers_roles_at_creation_and_never_change() {
    let tmp = tempfile::tempdir().unwrap();
    let tokens = tmp.path().join("tokens.toml");
    let write_tokens = |roles: &[&str]| {
        let text = tokens_toml(&[Named {
            name: "provisioner",
            roles,
            projects: &["default"],
            token: "provisioner-secret-token",
        }]);
        std::fs::write(&tokens, text).unwrap();
    };
    write_tokens(&["mail-server"]);
    let tokens_path = tokens.to_str().unwrap().to_string();
    let s = Server::start_with(Opts {
        env: &[("CRADLE_ADMIN_TOKENS_FILE", &tokens_path)],
        ..Default::default()
    });
    let provisioner = s.admin().with_token("provisioner-secret-token");

    let first = provisioner.create(&json!({"name": "mail1", "metadata_address": "127.0.0.2"}));
    assert_eq!(first["boot_roles"], json!(["mail-server"]));

    // The caller loses the role (and gains another): the file is re-read.
    write_tokens(&["web-server", "extra"]);
    let second = provisioner.create(&json!({"name": "web1", "metadata_address": "127.0.0.3"}));
    assert_eq!(second["boot_roles"], json!(["web-server", "extra"]));
    let again = s.admin().fetch(route::instance("mail1")).json();
    assert_eq!(
        again["boot_roles"],
        json!(["mail-server"]),
        "roles stored at creation never change"
    );
    // PATCH cannot set them either.
    let a = fetch_body(
        &s.admin(),
        r#"{"boot_roles": ["x"]}"#,
        |p: &InstancePatch| route::modify_instance("mail1", p),
    );
    assert_eq!(a.status, 422, "{}", a.text());

    // The main token has the admin role; the provisioner does not.
    let a = provisioner.fetch(route::reset_state("mail1"));
    assert_eq!(a.status, 403, "{}", a.text());
    assert_eq!(a.json()["error"]["code"], "forbidden");
    let a = s.admin().fetch(route::reset_state("mail1"));
    assert_eq!(a.status, 200, "{}", a.text());
    assert_eq!(a.json()["state"], "registered");
    let events = s.admin().fetch(route::events("mail1")).json();
    assert_eq!(events["events"][0]["kind"], "reset-state");
    assert!(
        events["events"][0]["message"]
            .as_str()
            .unwrap()
            .contains("admin"),
        "{events}"
    );

    // A token not in the file (or a removed one) is refused.
    write_tokens(&["web-server"]);
    let stranger = s.admin().with_token("not-a-token");
    assert_eq!(stranger.fetch(route::instances()).status, 401);
}

/// The async face sends the same routes as the blocking one (the next
/// issue's host-to-host calls use it): a create, a read back, a refusal.
#[test]
fn the_async_client_sends_the_same_routes() {
    let s = Server::start();
    let target = cradle_client::Target::new(&s.admin_url, s.token.clone()).no_proxy();
    let api = cradle_client::Client::new(target).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let created = rt.block_on(async {
        let mut spec = InstanceSpec {
            name: "async1".into(),
            metadata_address: Some("127.0.0.41".into()),
            ..Default::default()
        };
        spec.os_params.secret.insert(
            "pw".into(),
            cradle_model::Secret::new("async-canary".into()),
        );
        let created = api.send(route::create_instance(&spec)).await.unwrap();
        assert_eq!(created.os_params.secret, ["pw"]);
        let shown = api.send(route::instance("async1")).await.unwrap();
        assert_eq!(shown.id, created.id);
        assert_eq!(api.send(route::instances()).await.unwrap().len(), 1);
        let e = api.send(route::instance("nobody")).await.unwrap_err();
        assert_eq!((e.status(), e.code()), (Some(404), Some("not_found")));
        created
    });
    // The secret went in the async face's body: the guest has it.
    let params = s
        .guest("127.0.0.41")
        .get("/cradle/latest/os/parameters.json");
    assert_eq!(
        params.json()["pw"],
        json!(["async-canary", "secret"]),
        "{}",
        params.text()
    );
    rt.block_on(async {
        api.send(route::remove_instance(&created.id.to_string()))
            .await
            .unwrap();
        assert!(api.send(route::instances()).await.unwrap().is_empty());
    });
    assert!(!s.log().contains("async-canary"));
}
