//! The admin API, against a running server.

use serde_json::{Value, json};

use crate::harness::*;

#[test]
fn serve_generates_a_private_token_and_answers_with_it() {
    use std::os::unix::fs::PermissionsExt;
    let s = Server::start();
    let mode = std::fs::metadata(s.data_dir.join("admin.token"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    assert_eq!(s.admin().call("GET", "/v1/instances", None).status, 200);
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
    let a = admin.call("POST", "/v1/instances", Some(&spec.to_string()));
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
    assert!(ids(&admin.call("GET", "/v1/instances", None)).contains(&id));
    let by_id = admin.call("GET", &format!("/v1/instances/{id}"), None);
    assert_eq!(by_id.status, 200);
    assert_eq!(by_id.json(), created);
    let by_name = admin.call("GET", "/v1/instances/crud1", None);
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
    let a = admin.call("PATCH", "/v1/instances/crud1", Some(&patch.to_string()));
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

    let again = admin.call("GET", &format!("/v1/instances/{id}"), None);
    assert_eq!(again.json(), patched);
    assert_eq!(
        admin
            .call("GET", "/v1/instances/crud1-renamed", None)
            .json(),
        patched
    );
    assert_error(
        &admin.call("GET", "/v1/instances/crud1", None),
        404,
        "not_found",
        &["crud1"],
    );

    // The guest sees the change: tokens now required, new metadata, the
    // moved parameter as secret.
    assert_eq!(guest.get("/openstack/latest/meta_data.json").status, 401);
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
    let a = admin.call("DELETE", &format!("/v1/instances/{id}"), None);
    assert_eq!(a.status, 204, "{}", a.text());
    assert!(a.body.is_empty());
    assert_error(
        &admin.call("GET", &format!("/v1/instances/{id}"), None),
        404,
        "not_found",
        &[&id],
    );
    assert_error(
        &admin.call("GET", "/v1/instances/crud1-renamed", None),
        404,
        "not_found",
        &[],
    );
    assert!(!ids(&admin.call("GET", "/v1/instances", None)).contains(&id));
    assert_error(
        &admin.call("DELETE", &format!("/v1/instances/{id}"), None),
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
        method: &'static str,
        path: String,
        body: Option<String>,
        status: u16,
        code: &'static str,
        /// Words the message must hold.
        needles: Vec<&'static str>,
    }
    let raw = |what, method, path: &str, body: Option<&str>, status, code, needles: &[_]| Case {
        what,
        method,
        path: path.to_string(),
        body: body.map(str::to_string),
        status,
        code,
        needles: needles.to_vec(),
    };
    // A create: a valid spec with `extra` laid over it.
    let post = |what, extra: Value, status, code, needles: &[_]| {
        raw(
            what,
            "POST",
            "/v1/instances",
            Some(&base(extra)),
            status,
            code,
            needles,
        )
    };
    let patch = |what, body: Value, status, code, needles: &[_]| {
        let body = body.to_string();
        raw(
            what,
            "PATCH",
            "/v1/instances/other",
            Some(&body),
            status,
            code,
            needles,
        )
    };
    #[rustfmt::skip]
    let cases = [
        raw("malformed JSON", "POST", "/v1/instances", Some(r#"{"name": "x","#), 400, "bad_request", &["malformed JSON"]),
        raw("trailing garbage", "POST", "/v1/instances", Some(&format!("{} x", base(json!({})))), 400, "bad_request", &["malformed JSON"]),
        post("unknown field", json!({"colour": "red"}), 422, "invalid", &["colour"]),
        post("unknown nested field", json!({"os_params": {"hidden": {}}}), 422, "invalid", &["hidden"]),
        post("wrong type", json!({"launch_index": "three"}), 422, "invalid", &["launch_index"]),
        post("wrong nested type", json!({"metadata": {"k": 5}}), 422, "invalid", &["metadata.k"]),
        raw("metadata_address not a string", "POST", "/v1/instances", Some(r#"{"name": "fresh", "metadata_address": 5}"#), 422, "invalid", &["metadata_address"]),
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
        raw("path not UTF-8", "GET", "/v1/instances/%FF%FE", None, 400, "bad_request", &["UTF-8"]),
        raw("PATCH path not UTF-8", "PATCH", "/v1/instances/%FF%FE", Some("{}"), 400, "bad_request", &["UTF-8"]),
        raw("no such instance", "GET", "/v1/instances/nobody", None, 404, "not_found", &["nobody"]),
        raw("unknown route", "GET", "/v2/instances", None, 404, "not_found", &[]),
        raw("unknown route under /v1", "GET", "/v1/instances/taken/nothing", None, 404, "not_found", &[]),
        raw("wrong method", "PUT", "/v1/instances", Some(&base(json!({}))), 405, "method_not_allowed", &[]),
        raw("wrong method on an instance", "POST", "/v1/instances/taken", Some("{}"), 405, "method_not_allowed", &[]),
        raw("message with text and data", "POST", "/v1/instances/taken/messages", Some(r#"{"text": "a", "data": "YQ=="}"#), 422, "invalid", &["text", "data"]),
    ];
    for Case {
        what,
        method,
        path,
        body,
        status,
        code,
        needles,
    } in &cases
    {
        let a = admin.call(method, path, body.as_deref());
        let message = assert_error(&a, *status, code, needles);
        eprintln!("{what}: {status} {message}");
        assert!(s.alive(), "server died after {what}");
        assert_eq!(
            admin.call("GET", "/v1/instances", None).status,
            200,
            "after {what}"
        );
    }

    // A refused change changed nothing, and nothing was created.
    let list = admin.call("GET", "/v1/instances", None);
    let mut listed = ids(&list);
    listed.sort();
    let mut expected = [&taken, &other].map(|i| i["id"].as_str().unwrap().to_string());
    expected.sort();
    assert_eq!(listed, expected);
    assert_eq!(admin.call("GET", "/v1/instances/taken", None).json(), taken);
    assert_eq!(admin.call("GET", "/v1/instances/other", None).json(), other);
    // The same bodies, made valid, are accepted: the refusals were for the
    // reasons named, not for anything else in the request.
    admin.create(
        &serde_json::from_str(&base(json!({"os_params": {"public": {"good_name": "v"}}}))).unwrap(),
    );
}

#[test]
fn a_missing_or_wrong_token_is_401() {
    let mut s = Server::start();
    let http = reqwest::blocking::Client::builder()
        .no_proxy()
        .build()
        .unwrap();
    let url = |p: &str| format!("{}{}", s.admin_url, p);
    let bodies = [
        ("GET", "/v1/instances", None),
        ("GET", "/metrics", None),
        (
            "POST",
            "/v1/instances",
            Some(r#"{"name":"x","metadata_address":"127.0.0.33"}"#),
        ),
        ("GET", "/no/such/route", None),
    ];
    for (method, path, body) in bodies {
        for auth in [
            None,
            Some("Bearer wrong"),
            Some("Basic YWRtaW46YWRtaW4="),
            Some("Bearer "),
        ] {
            let mut req = http.request(method.parse().unwrap(), url(path));
            if let Some(a) = auth {
                req = req.header("authorization", a);
            }
            if let Some(b) = body {
                req = req.header("content-type", "application/json").body(b);
            }
            let r = req.send().unwrap();
            assert_eq!(
                r.headers()
                    .get("www-authenticate")
                    .and_then(|v| v.to_str().ok()),
                Some("Bearer"),
                "{method} {path} {auth:?}"
            );
            let status = r.status().as_u16();
            let a = Answer {
                status,
                headers: r.headers().clone(),
                body: r.bytes().unwrap().to_vec(),
            };
            assert_error(&a, 401, "unauthorized", &["token"]);
        }
    }
    // A token with the right prefix is still wrong.
    let mut admin = s.admin();
    admin.token.truncate(admin.token.len() - 1);
    assert_eq!(admin.call("GET", "/v1/instances", None).status, 401);
    // Nothing was created without a token, and the server is fine.
    assert!(s.alive());
    let list = s.admin().call("GET", "/v1/instances", None);
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
    let a = admin.call("POST", "/v1/instances", Some(&padded(8 * 1024)));
    assert_error(&a, 413, "too_large", &["too large"]);
    assert!(s.alive());
    let a = admin.call("PATCH", "/v1/instances/big", Some(&padded(8 * 1024)));
    assert_error(&a, 413, "too_large", &[]);
    // Under the limit, the same kind of body gets through to validation
    // (the pad is over the 255-character metadata limit).
    let a = admin.call("POST", "/v1/instances", Some(&padded(4000)));
    assert_error(&a, 422, "invalid", &["metadata.pad"]);
    assert!(s.alive());
    assert_eq!(admin.call("GET", "/v1/instances", None).status, 200);
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
    for body in &bodies {
        let a = admin.call("POST", "/v1/instances", Some(&body.to_string()));
        let message = assert_error(&a, 422, "invalid", &[]);
        assert!(!a.text().contains("SECRETCANARY"), "echoed: {}", a.text());
        eprintln!("{message}");
        assert!(s.alive());
    }
    // The messages still say where the problem is.
    let a = admin.call("POST", "/v1/instances", Some(&bodies[0].to_string()));
    assert_error(&a, 422, "invalid", &["launch_index"]);
    let a = admin.call("POST", "/v1/instances", Some(&bodies[1].to_string()));
    assert_error(&a, 422, "invalid", &["imds_tokens", "optional", "required"]);
    let a = admin.call("POST", "/v1/instances", Some(&bodies[7].to_string()));
    assert_error(&a, 422, "invalid", &["os_params.secret.k"]);
    // In a PATCH too.
    admin.create(&json!({"name": "m", "metadata_address": "127.0.0.35"}));
    let a = admin.call(
        "PATCH",
        "/v1/instances/m",
        Some(&json!({"launch_index": canary}).to_string()),
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

    let m = admin.call("GET", "/metrics", None);
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

    assert_eq!(admin.call("DELETE", "/v1/instances/m2", None).status, 204);
    let text = admin.call("GET", "/metrics", None).text();
    assert_eq!(sample(&text, "cradle_instances", &[]), Some(2.0), "{text}");

    let mut anon = s.admin();
    anon.token = String::new();
    let a = anon.call("GET", "/metrics", None);
    assert_error(&a, 401, "unauthorized", &[]);
    assert!(!a.text().contains("cradle_requests_total"));
}

/// See: the seed's mail-server example. A caller's roles at creation stay
/// with the instance, whatever happens to the caller's roles afterwards.
#[test]
fn boot_roles_are_the_callers_roles_at_creation_and_never_change() {
    let tmp = tempfile::tempdir().unwrap();
    let tokens = tmp.path().join("tokens.toml");
    let write_tokens = |roles: &str| {
        let text = format!(
            "[[token]]\nname = \"provisioner\"\nroles = {roles}\nsha256 = \"{}\"\n",
            sha256_hex("provisioner-secret-token")
        );
        std::fs::write(&tokens, text).unwrap();
    };
    write_tokens(r#"["mail-server"]"#);
    let tokens_path = tokens.to_str().unwrap().to_string();
    let s = Server::start_with(Opts {
        env: &[("CRADLE_ADMIN_TOKENS_FILE", &tokens_path)],
        ..Default::default()
    });
    let mut provisioner = s.admin();
    provisioner.token = "provisioner-secret-token".into();

    let first = provisioner.create(&json!({"name": "mail1", "metadata_address": "127.0.0.2"}));
    assert_eq!(first["boot_roles"], json!(["mail-server"]));

    // The caller loses the role (and gains another): the file is re-read.
    write_tokens(r#"["web-server", "extra"]"#);
    let second = provisioner.create(&json!({"name": "web1", "metadata_address": "127.0.0.3"}));
    assert_eq!(second["boot_roles"], json!(["web-server", "extra"]));
    let again = s.admin().call("GET", "/v1/instances/mail1", None).json();
    assert_eq!(
        again["boot_roles"],
        json!(["mail-server"]),
        "roles stored at creation never change"
    );
    // PATCH cannot set them either.
    let a = s.admin().call(
        "PATCH",
        "/v1/instances/mail1",
        Some(r#"{"boot_roles": ["x"]}"#),
    );
    assert_eq!(a.status, 422, "{}", a.text());

    // The main token has the admin role; the provisioner does not.
    let a = provisioner.call("POST", "/v1/instances/mail1/reset-state", None);
    assert_eq!(a.status, 403, "{}", a.text());
    assert_eq!(a.json()["error"]["code"], "forbidden");
    let a = s
        .admin()
        .call("POST", "/v1/instances/mail1/reset-state", None);
    assert_eq!(a.status, 200, "{}", a.text());
    assert_eq!(a.json()["state"], "registered");
    let events = s
        .admin()
        .call("GET", "/v1/instances/mail1/events", None)
        .json();
    assert_eq!(events["events"][0]["kind"], "reset-state");
    assert!(
        events["events"][0]["message"]
            .as_str()
            .unwrap()
            .contains("admin"),
        "{events}"
    );

    // A token not in the file (or a removed one) is refused.
    write_tokens(r#"["web-server"]"#);
    let mut stranger = s.admin();
    stranger.token = "not-a-token".into();
    assert_eq!(stranger.call("GET", "/v1/instances", None).status, 401);
}
