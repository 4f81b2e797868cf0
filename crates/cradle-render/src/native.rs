//! cradle's native tree (`/cradle/latest/...`, also reachable as `/ganeti`
//! for guests written against Ganeti's metadata daemon).
//!
//! Unlike the EC2 and OpenStack trees it describes everything cradle knows,
//! including the OS parameters an installing guest needs; it has one version
//! because only cradle's own scripts read it.

use std::collections::BTreeMap;

use cradle_model::{Instance, Os, Visibility};
use serde_json::Value;

use crate::{Context, Entry, Node, to_json};

/// The native directory: `latest/` with `events` (the instance's
/// maintenance events, as the admin API shows them: ids, cradle's states
/// and the time of each step; acknowledged with `POST
/// events/ID/ack`), `meta_data.json` and `os/` (`parameters.json` and
/// `scripts/`).
pub fn native<'a>(inst: &'a Instance, _ctx: &'a Context<'a>) -> Node<'a> {
    Node::Dir(Box::new(move || {
        vec![Entry::dir("latest", move || {
            vec![
                Entry::file("events", move || {
                    serde_json::to_vec_pretty(&inst.maintenance)
                        .expect("maintenance events serialize")
                }),
                Entry::file("meta_data.json", move || meta_data(inst)),
                Entry::dir("os", move || {
                    vec![
                        Entry::file("parameters.json", move || parameters(inst)),
                        // OS definitions, which provide the scripts, come later.
                        Entry::dir("scripts", Vec::new),
                    ]
                }),
            ]
        })]
    }))
}

/// `latest/meta_data.json`: the instance, compact. A `BTreeMap` keeps the
/// keys sorted, so every read gives the same bytes.
fn meta_data(inst: &Instance) -> Vec<u8> {
    let map = |m: &BTreeMap<String, String>| -> Value {
        Value::Object(
            m.iter()
                .map(|(k, v)| (k.clone(), v.as_str().into()))
                .collect(),
        )
    };
    let mut doc: BTreeMap<&str, Value> = BTreeMap::from([
        ("uuid", inst.id.to_string().into()),
        ("name", inst.name.as_str().into()),
        ("hostname", inst.hostname.as_str().into()),
        ("project_id", inst.project_id.as_str().into()),
        ("availability_zone", inst.availability_zone.as_str().into()),
        ("launch_index", inst.launch_index.into()),
        ("instance_type", inst.instance_type.as_str().into()),
        ("mac", inst.mac.as_str().into()),
        (
            "local_ipv4",
            inst.local_ipv4
                .map_or(Value::Null, |h| h.to_string().into()),
        ),
        (
            "public_ipv4",
            inst.public_ipv4
                .map_or(Value::Null, |ip| ip.to_string().into()),
        ),
        ("metadata", map(&inst.metadata)),
        ("public_keys", map(&inst.public_keys)),
        ("imds_tokens", inst.imds_tokens.as_str().into()),
    ]);
    // At most one of the two is set; the absent one is left out, not null.
    match &inst.os {
        Some(Os::Type(t)) => doc.insert("os_type", t.as_str().into()),
        Some(Os::Image(i)) => doc.insert("os_image", i.as_str().into()),
        None => None,
    };
    to_json(&doc)
}

/// `os/parameters.json`: `{name: [value, visibility]}` for every parameter.
///
/// This is the one place private and secret values leave the process, and
/// it is served only to the instance they belong to.
fn parameters(inst: &Instance) -> Vec<u8> {
    let p = &inst.os_params;
    let entry = |value: &str, vis: Visibility| Value::from(vec![value, vis.as_str()]);
    let mut out: BTreeMap<&str, Value> = BTreeMap::new();
    for (k, v) in &p.public {
        out.insert(k, entry(v, Visibility::Public));
    }
    for (k, v) in &p.private {
        out.insert(k, entry(v.expose(), Visibility::Private));
    }
    for (k, v) in &p.secret {
        out.insert(k, entry(v.expose(), Visibility::Secret));
    }
    to_json(&out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{instance, json, listing, text, with_ctx};
    use serde_json::json;

    fn at<R>(inst: &Instance, f: impl FnOnce(&Node<'_>) -> R) -> R {
        with_ctx("2025-06-01", |ctx| f(&native(inst, ctx)))
    }

    #[test]
    fn layout() {
        at(&instance(), |n| {
            assert_eq!(listing(n, "").unwrap(), "latest/");
            assert_eq!(listing(n, "latest").unwrap(), "events\nmeta_data.json\nos/");
            assert_eq!(
                listing(n, "latest/os").unwrap(),
                "parameters.json\nscripts/"
            );
            assert_eq!(listing(n, "latest/os/scripts").unwrap(), "");
            let paths: Vec<String> = n.files().into_iter().map(|(p, _)| p).collect();
            assert_eq!(
                paths,
                [
                    "latest/events",
                    "latest/meta_data.json",
                    "latest/os/parameters.json"
                ]
            );
            assert!(n.resolve(&["latest", "os", "scripts", "install"]).is_none());
            assert!(n.resolve(&["latest", "meta_data.json", "x"]).is_none());
            assert!(n.resolve(&["2020-01-01"]).is_none());
        });
    }

    #[test]
    fn meta_data() {
        let mut inst = instance();
        at(&inst, |n| {
            assert_eq!(
                json(n, "latest/meta_data.json").unwrap(),
                json!({
                    "uuid": "6f1c2a3b-4d5e-4f60-8a7b-9c0d1e2f3a4b",
                    "name": "web-1",
                    "hostname": "web-1",
                    "project_id": "proj-42",
                    "availability_zone": "eu-west-1a",
                    "launch_index": 0,
                    "instance_type": "m1.small",
                    "mac": "fa:16:3e:01:02:03",
                    "local_ipv4": "10.0.0.5/24",
                    "public_ipv4": "203.0.113.7",
                    "os_image": "ami-12345678",
                    "metadata": {"role": "web"},
                    "public_keys": {"alice": "ssh-ed25519 AAAAalice alice@example"},
                    "imds_tokens": "optional",
                })
            );
            let raw = text(n, "latest/meta_data.json").unwrap();
            assert!(raw.starts_with(r#"{"availability_zone":"eu-west-1a","hostname":"web-1","#));
        });
        inst.os = Some(Os::Type("debootstrap".into()));
        inst.local_ipv4 = None;
        inst.public_ipv4 = None;
        at(&inst, |n| {
            let md = json(n, "latest/meta_data.json").unwrap();
            assert_eq!(md["os_type"], "debootstrap");
            assert!(md.get("os_image").is_none());
            assert_eq!(md["local_ipv4"], Value::Null);
            assert_eq!(md["public_ipv4"], Value::Null);
        });
        inst.os = None;
        at(&inst, |n| {
            let md = json(n, "latest/meta_data.json").unwrap();
            assert!(md.get("os_type").is_none());
            assert!(md.get("os_image").is_none());
        });
    }

    #[test]
    fn parameters_carry_all_three_visibilities() {
        at(&instance(), |n| {
            assert_eq!(
                text(n, "latest/os/parameters.json").unwrap(),
                r#"{"db_url":["postgres://db","private"],"locale":["en_US","public"],"root_pw":["hunter2","secret"]}"#
            );
        });
    }
}
