//! Who needs a token, or a header: IMDSv2 session tokens (their TTL, their
//! binding to one instance, their expiry) and the rule of each namespace
//! for `imds_tokens = optional | required | strict`, with the
//! `Metadata-Flavor: cradle` header the native namespace wants, proven with
//! raw requests and with botocore's and cloud-init's own readers.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::harness::*;
use crate::metadata::{create, ec2_instance_id};
use crate::metadata_clients::python_guest;

#[test]
fn cloud_init_openstack_reader_works_where_ec2_tokens_are_required() {
    let s = Server::start();
    let key = ssh_key(3, "carol@desk");
    let id = create(
        &s,
        json!({
            "name": "os-required",
            "hostname": "os-required",
            "public_keys": {"carol": key},
            "metadata_address": "127.0.0.2",
            "imds_tokens": "required",
        }),
    );
    // The OpenStack datasource sends no token: its OpenStack reads answer,
    // its EC2 reads are refused, which it takes as "no EC2 data".
    let out = python_guest(
        &s,
        "127.0.0.2",
        r#"
from cloudinit.sources.helpers import openstack
res = openstack.MetadataReader(URL, timeout=5, retries=0).read_v2()
emit({"uuid": res["metadata"]["uuid"], "keys": res["metadata"]["public_keys"],
      "ec2": res["ec2-metadata"]})
"#,
    );
    assert_eq!(out["uuid"], id);
    assert_eq!(out["keys"], json!({"carol": key}));
    assert_eq!(out["ec2"], json!({}));
    // Set to strict, the OpenStack paths want a token as well.
    s.admin().send(route::modify_instance(
        "os-required",
        &cradle_model::api::InstancePatch {
            imds_tokens: Some(cradle_model::ImdsTokens::Strict),
            ..Default::default()
        },
    ));
    let g = s.bare_guest("127.0.0.2");
    assert_eq!(g.get("/openstack/latest/meta_data.json").status, 401);
}

#[test]
fn botocore_reads_region_and_instance_id_with_an_imdsv2_token() {
    let s = Server::start();
    let id = create(
        &s,
        json!({
            "name": "sdk",
            "metadata_address": "127.0.0.4",
            "availability_zone": "us-east-1a",
            "imds_tokens": "required",
        }),
    );
    // The instance really requires a token.
    let g = s.guest("127.0.0.4");
    assert_eq!(g.get("/latest/meta-data/instance-id").status, 401);
    assert_eq!(
        g.get("/latest/meta-data/placement/availability-zone")
            .status,
        401
    );

    // botocore 1.29's internal API; paths are relative to base_url, as
    // botocore's own are.
    let out = python_guest(
        &s,
        "127.0.0.4",
        r#"
from botocore.utils import InstanceMetadataFetcher, InstanceMetadataRegionFetcher
region = InstanceMetadataRegionFetcher(timeout=2, num_attempts=1, base_url=URL, env={}).retrieve_region()
f = InstanceMetadataFetcher(timeout=2, num_attempts=1, base_url=URL, env={})
token = f._fetch_metadata_token()
r = f._get_request("latest/meta-data/instance-id", None, token)
emit({"region": region, "token": token, "status": r.status_code, "instance_id": r.text})
"#,
    );
    assert_eq!(out["region"], "us-east-1");
    assert!(out["token"].as_str().is_some_and(|t| !t.is_empty()));
    assert_eq!(out["status"], 200);
    assert_eq!(out["instance_id"], ec2_instance_id(&id));
}

// ---------------------------------------------------------------------------
// IMDSv2

#[test]
fn token_put_validates_the_ttl_and_refuses_forwarded_requests() {
    let s = Server::start();
    create(&s, json!({"name": "a", "metadata_address": "127.0.0.2"}));
    let g = s.guest("127.0.0.2");
    let put = |headers: &[(&str, &str)]| g.request("PUT", "/latest/api/token", headers, None);
    const TTL: &str = "X-aws-ec2-metadata-token-ttl-seconds";

    assert_eq!(put(&[]).status, 400, "TTL header missing");
    for bad in ["0", "21601", "abc", "-1", "1.5", ""] {
        assert_eq!(put(&[(TTL, bad)]).status, 400, "TTL {bad:?}");
    }
    let ok = put(&[(TTL, "21600")]);
    assert_eq!(ok.status, 200);
    assert_eq!(
        ok.headers.get(TTL).and_then(|v| v.to_str().ok()),
        Some("21600")
    );
    assert!(!ok.body.is_empty());
    let one = put(&[(TTL, "1")]);
    assert_eq!(one.status, 200);
    assert_eq!(one.headers.get(TTL).unwrap(), "1");

    let forwarded = put(&[(TTL, "60"), ("X-Forwarded-For", "10.0.0.1")]);
    assert_eq!(forwarded.status, 400);

    g.refuses_methods("/latest/api/token", &["GET", "POST", "DELETE"], "PUT");
}

#[test]
fn tokens_are_bound_to_their_instance_and_always_checked() {
    let s = Server::start();
    create(&s, json!({"name": "a", "metadata_address": "127.0.0.2"}));
    create(
        &s,
        json!({"name": "b", "metadata_address": "127.0.0.3", "imds_tokens": "required"}),
    );
    let (a, b) = (s.guest("127.0.0.2"), s.guest("127.0.0.3"));
    let with = |g: &Guest, path: &str, token: &str| {
        g.request("GET", path, &[("X-aws-ec2-metadata-token", token)], None)
    };

    // `optional`: no token is fine, a good one is fine, a bad one is not.
    assert_eq!(a.get("/latest/meta-data/hostname").text(), "a");
    let ta = a.token(300);
    let ok = with(&a, "/latest/meta-data/hostname", &ta);
    assert_eq!((ok.status, ok.text().as_str()), (200, "a"));
    for garbage in ["garbage", "", "AAAA", &ta[..ta.len() - 2]] {
        assert_eq!(
            with(&a, "/latest/meta-data/hostname", garbage).status,
            401,
            "token {garbage:?}"
        );
    }
    // A token is checked in every namespace, not only EC2's.
    assert_eq!(
        with(&a, "/openstack/latest/meta_data.json", "garbage").status,
        401
    );
    assert_eq!(
        with(&a, "/cradle/latest/meta_data.json", "garbage").status,
        401
    );

    // A's token is no good from B's address, even though B requires one.
    assert_eq!(with(&b, "/latest/meta-data/hostname", &ta).status, 401);

    // `required`: EC2 paths need a token; OpenStack paths, which no
    // OpenStack client sends one to, do not; the native namespace takes the
    // header (which the harness's guest sends, as cradle's agent does).
    for path in ["/latest/meta-data/hostname", "/", "/2021-01-03/meta-data/"] {
        let a = b.get(path);
        assert_eq!(a.status, 401, "{path}");
        assert!(
            a.text().contains("X-aws-ec2-metadata-token"),
            "{path}: {}",
            a.text()
        );
    }
    assert_eq!(
        b.get("/openstack/latest/meta_data.json").json()["name"],
        "b"
    );
    assert_eq!(b.get("/cradle/latest/meta_data.json").json()["name"], "b");
    assert_eq!(b.get("/ganeti/latest/os/parameters.json").status, 200);
    let tb = b.token(300);
    let ok = with(&b, "/latest/meta-data/hostname", &tb);
    assert_eq!((ok.status, ok.text().as_str()), (200, "b"));
    let md = with(&b, "/openstack/latest/meta_data.json", &tb);
    assert_eq!(md.status, 200);
    assert_eq!(md.json()["name"], "b");
    // And B's token is no good at A's address.
    assert_eq!(with(&a, "/latest/meta-data/hostname", &tb).status, 401);
}

#[test]
fn a_token_stops_working_when_its_ttl_runs_out() {
    let s = Server::start();
    create(
        &s,
        json!({"name": "a", "metadata_address": "127.0.0.2", "imds_tokens": "required"}),
    );
    let g = s.guest("127.0.0.2");
    let token = g.token(1);
    let issued = Instant::now();
    let get = || {
        g.request(
            "GET",
            "/latest/meta-data/hostname",
            &[("X-aws-ec2-metadata-token", &token)],
            None,
        )
        .status
    };
    assert_eq!(get(), 200, "a fresh one-second token works");
    // Poll the clock condition: the token must die after about a second.
    let died = loop {
        let status = get();
        if status == 401 {
            break issued.elapsed();
        }
        assert_eq!(status, 200);
        assert!(
            issued.elapsed() < Duration::from_secs(5),
            "a one-second token still works after 5 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        died >= Duration::from_millis(900),
        "a one-second token died after only {died:?}"
    );
    // A fresh token works again: it was expiry, not something else.
    let fresh = g.token(60);
    let a = g.request(
        "GET",
        "/latest/meta-data/hostname",
        &[("X-aws-ec2-metadata-token", &fresh)],
        None,
    );
    assert_eq!(a.status, 200);
}

#[test]
fn the_native_namespace_answers_only_with_the_header_or_a_token() {
    let s = Server::start();
    create(
        &s,
        json!({
            "name": "n",
            "metadata_address": "127.0.0.2",
            "os_params": {"secret": {"db_password": "native-canary"}},
        }),
    );
    let g = s.bare_guest("127.0.0.2");
    let paths = [
        "/cradle/latest/meta_data.json",
        "/cradle/latest/os/parameters.json",
        "/ganeti/latest/os/parameters.json",
        "/cradle/latest/read",
        "/cradle/",
    ];
    // What an SSRF can send: a URL, perhaps with the wrong flavor.
    for path in paths {
        for headers in [
            &[][..],
            &[("Metadata-Flavor", "Google")][..],
            &[("Metadata", "true")][..],
        ] {
            let a = g.request("GET", path, headers, None);
            assert_eq!(a.status, 403, "{path} {headers:?}");
            assert!(!a.text().contains("native-canary"));
            assert_eq!(
                a.text(),
                "403 Forbidden: the native namespace needs the header Metadata-Flavor: cradle \
                 (or an IMDSv2 token in X-aws-ec2-metadata-token)"
            );
        }
    }
    let w = g.request("POST", "/cradle/latest/write", &[], Some(b"hello".to_vec()));
    assert_eq!(w.status, 403);
    // With the header, or with a token instead, it answers.
    let flavored = [("Metadata-Flavor", "cradle")];
    let params = g.request("GET", "/cradle/latest/os/parameters.json", &flavored, None);
    assert_eq!(params.status, 200);
    assert_eq!(
        params.json()["db_password"],
        json!(["native-canary", "secret"])
    );
    let token = g.token(60);
    let with_token = [("X-aws-ec2-metadata-token", token.as_str())];
    let a = g.request("GET", "/cradle/latest/meta_data.json", &with_token, None);
    assert_eq!((a.status, a.json()["name"].clone()), (200, json!("n")));
    // A bad token is refused even beside the header.
    let a = g.request(
        "GET",
        "/cradle/latest/meta_data.json",
        &[
            ("Metadata-Flavor", "cradle"),
            ("X-aws-ec2-metadata-token", "garbage"),
        ],
        None,
    );
    assert_eq!(a.status, 401);
    // EC2 and OpenStack paths need no header.
    assert_eq!(g.get("/latest/meta-data/hostname").status, 200);
    assert_eq!(g.get("/openstack/latest/meta_data.json").status, 200);
    assert!(!s.log().contains("native-canary"));
}

#[test]
fn token_rules_follow_each_namespace() {
    let s = Server::start();
    for (n, tokens) in ["optional", "required", "strict"].iter().enumerate() {
        let address = format!("127.0.0.{}", n + 2);
        create(
            &s,
            json!({"name": tokens, "metadata_address": address, "imds_tokens": tokens}),
        );
        let g = s.bare_guest(&address);
        let (ec2, openstack) = match *tokens {
            "optional" => (200, 200),
            "required" => (401, 200),
            _ => (401, 401),
        };
        let status = |path: &str| g.get(path).status;
        assert_eq!(status("/latest/meta-data/instance-id"), ec2, "{tokens}");
        assert_eq!(
            status("/2009-04-04/user-data"),
            if ec2 == 200 { 404 } else { 401 }
        );
        assert_eq!(
            status("/openstack/latest/meta_data.json"),
            openstack,
            "{tokens}"
        );
        assert_eq!(
            status("/openstack/2012-08-10/meta_data.json"),
            openstack,
            "{tokens}"
        );
        assert_eq!(status("/cradle/latest/meta_data.json"), 403, "{tokens}");
        let refused = g.get("/openstack/latest/meta_data.json");
        if openstack == 401 {
            assert!(
                refused.text().contains("imds_tokens = strict"),
                "{}",
                refused.text()
            );
        }
        // A token opens all three.
        let token = g.token(60);
        let t = [("X-aws-ec2-metadata-token", token.as_str())];
        for path in [
            "/latest/meta-data/instance-id",
            "/openstack/latest/meta_data.json",
            "/cradle/latest/meta_data.json",
        ] {
            assert_eq!(
                g.request("GET", path, &t, None).status,
                200,
                "{tokens} {path}"
            );
        }
    }
    // The instance's view says which it is.
    let v = s.admin().send(route::instance("strict"));
    assert_eq!(v.imds_tokens.as_str(), "strict");
}
