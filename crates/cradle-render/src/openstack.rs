//! The OpenStack metadata tree (`/openstack/<version>/...`), as Nova serves
//! it and cloud-init's OpenStack datasource reads it.
//!
//! Versions are dates. A version dated after today is not offered (Nova
//! offers only releases that exist), and each file and key appears only from
//! the version that introduced it, so a guest asking for an old version gets
//! what that version had.

use std::collections::BTreeMap;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use cradle_model::Instance;
use serde_json::Value;

use crate::{Context, Entry, Node, json_object, to_json};

/// The OpenStack metadata versions Nova defines, oldest first.
/// Dates compare correctly as strings.
pub const OPENSTACK_VERSIONS: &[&str] = &[
    "2012-08-10",
    "2013-04-04",
    "2013-10-17",
    "2015-10-15",
    "2016-06-30",
    "2016-10-06",
    "2017-02-22",
    "2018-08-27",
    "2020-10-14",
    "2025-04-04",
];

/// The versions offered on `today` (`YYYY-MM-DD`): those not dated after it.
fn offered(today: &str) -> impl Iterator<Item = &'static str> + '_ {
    OPENSTACK_VERSIONS
        .iter()
        .copied()
        .filter(move |v| *v <= today)
}

/// The offered version `version` names; `latest` is the newest offered.
fn resolve_version(today: &str, version: &str) -> Option<&'static str> {
    if version == "latest" {
        offered(today).last()
    } else {
        offered(today).find(|v| *v == version)
    }
}

/// The `/openstack` directory: each offered version, then `latest`. Nova
/// lists them without the directory slash, and cloud-init expects that.
pub fn openstack_versions<'a>(inst: &'a Instance, ctx: &'a Context<'a>) -> Node<'a> {
    Node::Dir(Box::new(move || {
        let mut entries: Vec<Entry<'a>> = offered(ctx.today)
            .chain(["latest"])
            .filter_map(|v| {
                let node = openstack_version(inst, ctx, v)?;
                Some(Entry::node(v, node).labelled(v))
            })
            .collect();
        if !inst.files.is_empty() {
            // Injected files, as Nova serves them: reachable, not listed.
            entries.push(Entry::node("content", content(inst)).hidden());
        }
        entries
    }))
}

/// The name under `openstack/content/` of the `n`th injected file (in path order).
pub fn content_name(n: usize) -> String {
    format!("{n:04}")
}

/// `openstack/content/`: one file per injected file.
fn content(inst: &Instance) -> Node<'_> {
    Node::Dir(Box::new(move || {
        inst.files
            .values()
            .enumerate()
            .map(|(n, data)| Entry::file(content_name(n), move || data.clone()))
            .collect()
    }))
}

/// The tree of one OpenStack version. `None` for a version cradle does not
/// know or that is dated after `ctx.today`.
pub fn openstack_version<'a>(
    inst: &'a Instance,
    ctx: &'a Context<'a>,
    version: &str,
) -> Option<Node<'a>> {
    let v = resolve_version(ctx.today, version)?;
    // Dates compare as strings, so "introduced in" is a plain comparison.
    let has = move |introduced: &str| v >= introduced;
    Some(Node::Dir(Box::new(move || {
        let mut e = vec![Entry::file("meta_data.json", move || meta_data(inst, v))];
        if has("2013-04-04") {
            // Nova's guest-set password: empty until the guest posts one.
            e.push(Entry::file("password", move || {
                inst.password.clone().unwrap_or_default().into_bytes()
            }));
        }
        if let Some(user_data) = &inst.user_data {
            e.push(Entry::file("user_data", move || user_data.clone()));
        }
        if has("2013-10-17") {
            e.push(Entry::file("vendor_data.json", move || {
                to_json(ctx.vendor_data)
            }));
        }
        if has("2016-10-06") {
            e.push(Entry::file("vendor_data2.json", move || {
                let mut v2 = ctx.dynamic_vendor_data.clone();
                v2.insert("static".to_string(), ctx.vendor_data.clone());
                to_json(&v2)
            }));
        }
        if has("2015-10-15") {
            e.push(Entry::file("network_data.json", move || network_data(inst)));
        }
        e
    })))
}

/// `meta_data.json` for version `v`. A `BTreeMap` keeps the bytes the same
/// on every read, so a config drive and the service agree.
fn meta_data(inst: &Instance, v: &str) -> Vec<u8> {
    let mut m: BTreeMap<&str, Value> = BTreeMap::new();
    m.insert("uuid", inst.id.to_string().into());
    m.insert("name", inst.name.as_str().into());
    m.insert("hostname", inst.hostname.as_str().into());
    m.insert("launch_index", inst.launch_index.into());
    m.insert("availability_zone", inst.availability_zone.as_str().into());
    if !inst.public_keys.is_empty() {
        m.insert("public_keys", json_map(&inst.public_keys));
        let keys = inst
            .public_keys
            .iter()
            .map(|(name, key)| {
                json_object([
                    ("name", name.as_str().into()),
                    ("type", "ssh".into()),
                    ("data", key.as_str().into()),
                ])
            })
            .collect();
        m.insert("keys", Value::Array(keys));
    }
    if !inst.metadata.is_empty() {
        m.insert("meta", json_map(&inst.metadata));
    }
    if !inst.files.is_empty() {
        let files = inst
            .files
            .keys()
            .enumerate()
            .map(|(n, path)| {
                json_object([
                    ("path", path.as_str().into()),
                    (
                        "content_path",
                        format!("/content/{}", content_name(n)).into(),
                    ),
                ])
            })
            .collect();
        m.insert("files", Value::Array(files));
    }
    if v >= "2013-04-04" {
        m.insert("random_seed", B64.encode(&inst.random_seed).into());
    }
    if v >= "2015-10-15" {
        m.insert("project_id", inst.project_id.as_str().into());
    }
    if v >= "2016-06-30" {
        // Device tagging is not modelled; Nova serves an empty list then.
        m.insert("devices", Value::Array(Vec::new()));
    }
    if v >= "2020-10-14" {
        m.insert("dedicated_cpus", Value::Array(Vec::new()));
    }
    to_json(&m)
}

/// A string map as a JSON object; the sorted source keeps key order fixed.
fn json_map(map: &BTreeMap<String, String>) -> Value {
    Value::Object(
        map.iter()
            .map(|(k, v)| (k.clone(), v.as_str().into()))
            .collect(),
    )
}

/// `network_data.json` in the shape cloud-init's OpenStack converter reads:
/// one physical link, one IPv4 network (static with a prefix, else DHCP),
/// and the DNS servers as services.
fn network_data(inst: &Instance) -> Vec<u8> {
    let id = inst.id.to_string();
    let link = json_object([
        ("id", "interface0".into()),
        ("type", "phy".into()),
        ("ethernet_mac_address", inst.mac.as_str().into()),
        ("mtu", Value::Null),
        ("vif_id", id.as_str().into()),
    ]);
    let static_addr = inst.local_ipv4.and_then(|h| Some((h.addr, h.netmask()?)));
    let network = match static_addr {
        Some((addr, netmask)) => {
            let routes = inst
                .gateway_ipv4
                .map(|gw| {
                    json_object([
                        ("network", "0.0.0.0".into()),
                        ("netmask", "0.0.0.0".into()),
                        ("gateway", gw.to_string().into()),
                    ])
                })
                .into_iter()
                .collect();
            json_object([
                ("id", "network0".into()),
                ("link", "interface0".into()),
                ("network_id", id.as_str().into()),
                ("type", "ipv4".into()),
                ("ip_address", addr.to_string().into()),
                ("netmask", netmask.to_string().into()),
                ("routes", Value::Array(routes)),
            ])
        }
        // No address, or one without a prefix: the guest asks DHCP.
        None => json_object([
            ("id", "network0".into()),
            ("link", "interface0".into()),
            ("network_id", id.as_str().into()),
            ("type", "ipv4_dhcp".into()),
        ]),
    };
    let services = inst
        .dns_nameservers
        .iter()
        .map(|ip| json_object([("type", "dns".into()), ("address", ip.to_string().into())]))
        .collect();
    to_json(&json_object([
        ("links", Value::Array(vec![link])),
        ("networks", Value::Array(vec![network])),
        ("services", Value::Array(services)),
    ]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{instance, json, listing, text, with_ctx};
    use serde_json::json;

    const TODAY: &str = "2025-06-01";

    fn at<R>(inst: &Instance, today: &str, version: &str, f: impl FnOnce(&Node<'_>) -> R) -> R {
        with_ctx(today, |ctx| {
            f(&openstack_version(inst, ctx, version).unwrap())
        })
    }

    #[test]
    fn versions_listing_respects_today() {
        let inst = instance();
        with_ctx(TODAY, |ctx| {
            let want: Vec<&str> = OPENSTACK_VERSIONS
                .iter()
                .copied()
                .chain(["latest"])
                .collect();
            assert_eq!(
                listing(&openstack_versions(&inst, ctx), "").unwrap(),
                want.join("\n")
            );
        });
        with_ctx("2016-01-01", |ctx| {
            let os = openstack_versions(&inst, ctx);
            assert_eq!(
                listing(&os, "").unwrap(),
                "2012-08-10\n2013-04-04\n2013-10-17\n2015-10-15\nlatest"
            );
            assert!(os.resolve(&["2016-06-30"]).is_none());
            assert!(openstack_version(&inst, ctx, "2016-06-30").is_none());
            // latest is the newest offered version, so no `devices` yet.
            let md = json(&os, "latest/meta_data.json").unwrap();
            assert!(md.get("project_id").is_some());
            assert!(md.get("devices").is_none());
            assert_eq!(
                listing(&os, "latest").unwrap(),
                listing(&os, "2015-10-15").unwrap()
            );
        });
        // A version is offered on its own date.
        with_ctx("2025-04-04", |ctx| {
            assert!(openstack_version(&inst, ctx, "2025-04-04").is_some());
        });
        with_ctx("2012-01-01", |ctx| {
            assert_eq!(listing(&openstack_versions(&inst, ctx), "").unwrap(), "");
            assert!(openstack_version(&inst, ctx, "latest").is_none());
        });
    }

    #[test]
    fn unknown_versions_are_none() {
        let inst = instance();
        with_ctx(TODAY, |ctx| {
            assert!(openstack_version(&inst, ctx, "2014-01-01").is_none());
            assert!(openstack_version(&inst, ctx, "2012-08-10/").is_none());
        });
    }

    #[test]
    fn version_listing_and_file_gating() {
        let mut inst = instance();
        at(&inst, TODAY, "2012-08-10", |n| {
            assert_eq!(listing(n, "").unwrap(), "meta_data.json\nuser_data");
        });
        at(&inst, TODAY, "2013-10-17", |n| {
            assert_eq!(
                listing(n, "").unwrap(),
                "meta_data.json\npassword\nuser_data\nvendor_data.json"
            );
        });
        at(&inst, TODAY, "latest", |n| {
            assert_eq!(
                listing(n, "").unwrap(),
                "meta_data.json\npassword\nuser_data\nvendor_data.json\nvendor_data2.json\n\
                 network_data.json"
            );
        });
        inst.user_data = None;
        at(&inst, TODAY, "2015-10-15", |n| {
            assert_eq!(
                listing(n, "").unwrap(),
                "meta_data.json\npassword\nvendor_data.json\nnetwork_data.json"
            );
        });
    }

    #[test]
    fn files_of_a_version() {
        let inst = instance();
        at(&inst, TODAY, "2016-10-06", |n| {
            let paths: Vec<String> = n.files().into_iter().map(|(p, _)| p).collect();
            assert_eq!(
                paths,
                [
                    "meta_data.json",
                    "password",
                    "user_data",
                    "vendor_data.json",
                    "vendor_data2.json",
                    "network_data.json"
                ]
            );
        });
        with_ctx(TODAY, |ctx| {
            let paths: Vec<String> = openstack_versions(&inst, ctx)
                .files()
                .into_iter()
                .map(|(p, _)| p)
                .collect();
            assert!(paths.contains(&"2012-08-10/meta_data.json".to_string()));
            assert!(paths.contains(&"latest/network_data.json".to_string()));
            assert!(!paths.contains(&"2012-08-10/password".to_string()));
        });
    }

    #[test]
    fn meta_data_key_gating() {
        let inst = instance();
        let keys = |v: &str| -> Vec<String> {
            at(&inst, TODAY, v, |n| json(n, "meta_data.json").unwrap())
                .as_object()
                .unwrap()
                .keys()
                .cloned()
                .collect()
        };
        let base = [
            "availability_zone",
            "hostname",
            "keys",
            "launch_index",
            "meta",
            "name",
        ];
        let mut want: Vec<&str> = base.into_iter().chain(["public_keys", "uuid"]).collect();
        want.sort();
        assert_eq!(keys("2012-08-10"), want);
        assert!(keys("2013-04-04").contains(&"random_seed".to_string()));
        assert!(!keys("2013-04-04").contains(&"project_id".to_string()));
        assert!(keys("2015-10-15").contains(&"project_id".to_string()));
        assert!(!keys("2015-10-15").contains(&"devices".to_string()));
        assert!(keys("2016-06-30").contains(&"devices".to_string()));
        assert!(!keys("2018-08-27").contains(&"dedicated_cpus".to_string()));
        assert!(keys("2020-10-14").contains(&"dedicated_cpus".to_string()));
    }

    #[test]
    fn meta_data_values() {
        let inst = instance();
        at(&inst, TODAY, "latest", |n| {
            let md = json(n, "meta_data.json").unwrap();
            assert_eq!(
                md,
                json!({
                    "uuid": "6f1c2a3b-4d5e-4f60-8a7b-9c0d1e2f3a4b",
                    "name": "web-1",
                    "hostname": "web-1",
                    "launch_index": 0,
                    "availability_zone": "eu-west-1a",
                    "public_keys": {"alice": "ssh-ed25519 AAAAalice alice@example"},
                    "keys": [{"name": "alice", "type": "ssh", "data": "ssh-ed25519 AAAAalice alice@example"}],
                    "meta": {"role": "web"},
                    "random_seed": md["random_seed"],
                    "project_id": "proj-42",
                    "devices": [],
                    "dedicated_cpus": [],
                })
            );
            // Compact, with sorted keys.
            let raw = text(n, "meta_data.json").unwrap();
            assert!(raw.starts_with(r#"{"availability_zone":"eu-west-1a","dedicated_cpus":[],"#));
            assert!(!raw.contains('\n'));
        });
    }

    #[test]
    fn no_keys_or_metadata_means_no_such_keys() {
        let mut inst = instance();
        inst.public_keys.clear();
        inst.metadata.clear();
        at(&inst, TODAY, "latest", |n| {
            let md = json(n, "meta_data.json").unwrap();
            assert!(md.get("public_keys").is_none());
            assert!(md.get("keys").is_none());
            assert!(md.get("meta").is_none());
        });
    }

    #[test]
    fn random_seed_is_the_instance_seed_every_time() {
        let inst = instance();
        let seed = || {
            at(&inst, TODAY, "latest", |n| {
                let md = json(n, "meta_data.json").unwrap();
                B64.decode(md["random_seed"].as_str().unwrap()).unwrap()
            })
        };
        let first = seed();
        assert_eq!(first.len(), 512);
        assert_eq!(first, inst.random_seed);
        assert_eq!(seed(), first);
    }

    #[test]
    fn password_and_vendor_data() {
        let mut inst = instance();
        at(&inst, TODAY, "latest", |n| {
            assert_eq!(text(n, "password").unwrap(), "");
            assert_eq!(text(n, "vendor_data.json").unwrap(), r#"{"cloud":"test"}"#);
            assert_eq!(
                text(n, "vendor_data2.json").unwrap(),
                r#"{"static":{"cloud":"test"}}"#
            );
            assert_eq!(text(n, "user_data").unwrap(), "#!/bin/sh\necho hi\n");
        });
        inst.password = Some("ZW5jcnlwdGVk".into());
        at(&inst, TODAY, "latest", |n| {
            assert_eq!(text(n, "password").unwrap(), "ZW5jcnlwdGVk")
        });
    }

    #[test]
    fn network_data_static() {
        at(&instance(), TODAY, "latest", |n| {
            assert_eq!(
                json(n, "network_data.json").unwrap(),
                json!({
                    "links": [{
                        "id": "interface0",
                        "type": "phy",
                        "ethernet_mac_address": "fa:16:3e:01:02:03",
                        "mtu": null,
                        "vif_id": "6f1c2a3b-4d5e-4f60-8a7b-9c0d1e2f3a4b",
                    }],
                    "networks": [{
                        "id": "network0",
                        "link": "interface0",
                        "network_id": "6f1c2a3b-4d5e-4f60-8a7b-9c0d1e2f3a4b",
                        "type": "ipv4",
                        "ip_address": "10.0.0.5",
                        "netmask": "255.255.255.0",
                        "routes": [{"network": "0.0.0.0", "netmask": "0.0.0.0", "gateway": "10.0.0.1"}],
                    }],
                    "services": [{"type": "dns", "address": "10.0.0.2"}],
                })
            );
        });
    }

    #[test]
    fn network_data_without_gateway_or_prefix() {
        let mut inst = instance();
        inst.gateway_ipv4 = None;
        at(&inst, TODAY, "latest", |n| {
            let nd = json(n, "network_data.json").unwrap();
            assert_eq!(nd["networks"][0]["routes"], json!([]));
        });
        inst.local_ipv4.as_mut().unwrap().prefix = None;
        inst.dns_nameservers.clear();
        let dhcp = json!([{
            "id": "network0",
            "link": "interface0",
            "network_id": "6f1c2a3b-4d5e-4f60-8a7b-9c0d1e2f3a4b",
            "type": "ipv4_dhcp",
        }]);
        at(&inst, TODAY, "latest", |n| {
            let nd = json(n, "network_data.json").unwrap();
            assert_eq!(nd["networks"], dhcp);
            assert_eq!(nd["services"], json!([]));
        });
        inst.local_ipv4 = None;
        at(&inst, TODAY, "latest", |n| {
            assert_eq!(json(n, "network_data.json").unwrap()["networks"], dhcp);
        });
    }

    #[test]
    fn unknown_paths_are_none() {
        at(&instance(), TODAY, "latest", |n| {
            assert!(n.resolve(&["nonesuch.json"]).is_none());
            assert!(n.resolve(&["meta_data.json", "uuid"]).is_none());
            assert!(n.resolve(&["user_data", "x", "y"]).is_none());
        });
    }

    #[test]
    fn injected_files_are_listed_in_meta_data_and_served_under_content() {
        let mut inst = instance();
        inst.files.insert("/etc/motd".into(), b"hello".to_vec());
        inst.files.insert("/etc/banner".into(), vec![0, 255]);
        with_ctx("2026-01-01", |ctx| {
            let os = openstack_versions(&inst, ctx);
            let Some(crate::Resolved::File(md)) = os.resolve(&["latest", "meta_data.json"]) else {
                panic!()
            };
            let md: Value = serde_json::from_slice(&md).unwrap();
            // Path order: /etc/banner is 0000, /etc/motd is 0001.
            assert_eq!(
                md["files"],
                serde_json::json!([
                    {"path": "/etc/banner", "content_path": "/content/0000"},
                    {"path": "/etc/motd", "content_path": "/content/0001"}
                ])
            );
            let Some(crate::Resolved::File(c)) = os.resolve(&["content", "0001"]) else {
                panic!()
            };
            assert_eq!(c, b"hello");
            let Some(crate::Resolved::File(c)) = os.resolve(&["content", "0000"]) else {
                panic!()
            };
            assert_eq!(c, vec![0, 255]);
            // Reachable, not listed: the listing is versions only.
            assert!(!String::from_utf8(os.listing()).unwrap().contains("content"));
        });
    }
}
