//! The EC2 instance metadata tree (`/<version>/meta-data/...`), as Nova's EC2
//! compatibility layer serves it.
//!
//! Guests and tools (cloud-init, ec2-metadata, SDKs) ask for a dated version
//! and expect exactly the keys that version had, so each key is gated on the
//! version that introduced it, as Nova gates them.

use std::net::IpAddr;

use cradle_model::Instance;
use serde_json::Value;
use time::macros::format_description;

use crate::{Context, Entry, Node, json_object};

/// The EC2 metadata versions served, oldest first: every version EC2
/// itself lists at `GET http://169.254.169.254/` ("Get the available
/// versions of the instance metadata" in the EC2 User Guide's instance
/// metadata examples; the last three are what EC2 has listed since, up to
/// 2024-04-11). Clients pin whichever they were written against (afterburn
/// asks for 2021-01-03, cloud-init for 2021-03-23, 2018-09-24 or
/// 2016-09-02), so every one answers. `latest` is accepted too and means
/// the last of these. A version added here serves what its predecessor
/// does; a key it introduced needs its gate in [`meta_data`].
pub const EC2_VERSIONS: &[&str] = &[
    "1.0",
    "2007-01-19",
    "2007-03-01",
    "2007-08-29",
    "2007-10-10",
    "2007-12-15",
    "2008-02-01",
    "2008-09-01",
    "2009-04-04",
    "2011-01-01",
    "2011-05-01",
    "2012-01-12",
    "2014-02-25",
    "2014-11-05",
    "2015-10-20",
    "2016-04-19",
    "2016-06-30",
    "2016-09-02",
    "2018-03-28",
    "2018-08-17",
    "2018-09-24",
    "2019-10-01",
    "2020-10-27",
    "2021-01-03",
    "2021-03-23",
    "2021-07-15",
    "2022-09-24",
    "2024-04-11",
];

/// A served version, as its position in [`EC2_VERSIONS`]. Positions order
/// versions correctly where the names ("1.0" and dates) would not.
#[derive(Debug, Clone, Copy)]
struct Version(usize);

impl Version {
    fn parse(version: &str) -> Option<Version> {
        if version == "latest" {
            return Some(Version(EC2_VERSIONS.len() - 1));
        }
        EC2_VERSIONS.iter().position(|v| *v == version).map(Version)
    }

    /// Whether a key introduced in version `introduced` is served here.
    fn has(self, introduced: &str) -> bool {
        let since = Version::parse(introduced).expect("gate names a listed EC2 version");
        self.0 >= since.0
    }
}

/// The tree of one EC2 version: `dynamic/` (from 2009-04-04), `meta-data/`
/// and, when the instance has user-data, `user-data`. `None` for a version
/// cradle does not serve.
pub fn ec2_version<'a>(
    inst: &'a Instance,
    ctx: &'a Context<'a>,
    version: &str,
) -> Option<Node<'a>> {
    let v = Version::parse(version)?;
    Some(Node::Dir(Box::new(move || {
        let mut entries = Vec::new();
        if v.has("2009-04-04") {
            entries.push(Entry::dir("dynamic", move || {
                vec![Entry::dir("instance-identity", move || {
                    let mut e = vec![Entry::file("document", move || identity_document(inst))];
                    // The signed bytes are the served `document`'s, exactly.
                    if let Some(signer) = ctx.identity {
                        e.push(Entry::file("pkcs7", move || {
                            signer.pkcs7(&identity_document(inst))
                        }));
                        e.push(Entry::file("rsa2048", move || {
                            signer.rsa2048(&identity_document(inst))
                        }));
                        e.push(Entry::file("signature", move || {
                            signer.signature(&identity_document(inst))
                        }));
                    }
                    e
                })]
            }));
        }
        entries.push(Entry::dir("meta-data", move || meta_data(inst, ctx, v)));
        if let Some(user_data) = &inst.user_data {
            entries.push(Entry::file("user-data", move || user_data.clone()));
        }
        entries
    })))
}

/// The `meta-data/` tree of a version as one JSON object, as a config drive
/// carries it in `ec2/<version>/meta-data.json`: directories become objects,
/// documents strings, and a listing label (`0=alice`) is kept as `_name`, as
/// Nova writes it. `None` for a version cradle does not serve.
pub fn ec2_meta_data_json(inst: &Instance, ctx: &Context<'_>, version: &str) -> Option<Vec<u8>> {
    let v = Version::parse(version)?;
    fn object(entries: Vec<Entry<'_>>) -> serde_json::Value {
        let mut map = serde_json::Map::new();
        for e in entries {
            let value = match &e.node {
                Node::File(f) => String::from_utf8_lossy(&f()).into_owned().into(),
                Node::Dir(d) => {
                    let mut inner = object(d());
                    if let (Some(label), serde_json::Value::Object(m)) = (&e.label, &mut inner) {
                        m.insert("_name".into(), label.clone().into());
                    }
                    inner
                }
            };
            map.insert(e.name, value);
        }
        serde_json::Value::Object(map)
    }
    Some(crate::to_json(&object(meta_data(inst, ctx, v))))
}

/// The `meta-data/` directory, alphabetical as EC2 lists it.
fn meta_data<'a>(inst: &'a Instance, ctx: &'a Context<'a>, v: Version) -> Vec<Entry<'a>> {
    let mut e = vec![
        Entry::text("ami-id", inst.ami_id()),
        Entry::text("ami-launch-index", inst.launch_index.to_string()),
        // Nova says "FIXME"; EC2 itself says "(unknown)" for instances not
        // launched from an S3 manifest, which is what a guest can cope with.
        Entry::text("ami-manifest-path", "(unknown)"),
        Entry::text("hostname", &inst.hostname),
        Entry::text("instance-id", inst.ec2_instance_id()),
        Entry::text("local-ipv4", local_ipv4(inst)),
        Entry::text("reservation-id", inst.ec2_reservation_id()),
        Entry::text("security-groups", ctx.security_groups.join("\n")),
    ];
    if !inst.public_keys.is_empty() {
        e.push(Entry::dir("public-keys", move || public_keys(inst)));
    }
    if v.has("2007-01-19") {
        e.push(Entry::text("local-hostname", &inst.hostname));
        // Without a public address there is no public name either; EC2
        // leaves both out rather than serving empty values.
        if let Some(ip) = inst.public_ipv4 {
            e.push(Entry::text("public-hostname", &inst.hostname));
            e.push(Entry::text("public-ipv4", ip.to_string()));
        }
    }
    if v.has("2007-08-29") {
        e.push(Entry::text("instance-type", &inst.instance_type));
    }
    if v.has("2007-12-15") {
        e.push(Entry::dir("block-device-mapping", || {
            vec![Entry::text("ami", "vda"), Entry::text("root", "/dev/vda")]
        }));
    }
    if v.has("2008-02-01") {
        e.push(Entry::dir("placement", move || {
            let mut p = vec![Entry::text("availability-zone", &inst.availability_zone)];
            // EC2's table dates it 2020-08-24, a version it never listed:
            // the first listed one after is where it appears.
            if v.has("2020-10-27") {
                p.push(Entry::text("region", inst.region()));
            }
            p
        }));
    }
    if v.has("2008-09-01") {
        e.push(Entry::text("instance-action", "none"));
    }
    if v.has("2018-08-17") {
        e.push(Entry::dir("events", move || {
            vec![Entry::dir("maintenance", move || {
                vec![
                    Entry::file("history", move || maintenance_events(inst, true)),
                    Entry::file("scheduled", move || maintenance_events(inst, false)),
                ]
            })]
        }));
    }
    // Only when the instance says so, as EC2's "Allow tags in instance
    // metadata": without it, `tags/` is not there at all (404).
    if v.has("2021-07-15") && inst.metadata_tags {
        e.push(Entry::dir("tags", move || {
            vec![Entry::dir("instance", move || {
                inst.tags
                    .iter()
                    .map(|(k, val)| Entry::text(k, val))
                    .collect()
            })]
        }));
    }
    // EC2 introduced the interface tree with 2011-01-01, as Nova gates it.
    if v.has("2011-01-01") {
        e.push(Entry::text("mac", &inst.mac));
        e.push(Entry::dir("network", move || {
            vec![Entry::dir("interfaces", move || {
                vec![Entry::dir("macs", move || {
                    vec![Entry::dir(&inst.mac, move || interface(inst))]
                })]
            })]
        }));
    }
    e.sort_by(|a, b| a.name.cmp(&b.name));
    e
}

/// `events/maintenance/scheduled` (pending and started events) or
/// `history` (finished ones) in EC2's shape: a JSON array of objects with
/// `NotBefore`, `NotAfter`, `Code`, `Description`, `EventId` and `State`
/// (`active`, `completed` or `canceled`; a failed event is `completed`
/// with a description starting `[Failed]`, as a completed one starts
/// `[Completed]`). `NotAfter` is when it ended, or, while it has not,
/// an hour after `NotBefore` (cradle starts it at `NotBefore`).
fn maintenance_events(inst: &Instance, finished: bool) -> Vec<u8> {
    use cradle_model::maintenance::MaintenanceState as S;
    let events: Vec<Value> = inst
        .maintenance
        .iter()
        .filter(|e| e.state.is_finished() == finished)
        .map(|e| {
            let (state, prefix) = match e.state {
                S::Scheduled | S::Acknowledged | S::Started => ("active", ""),
                S::Completed => ("completed", "[Completed] "),
                S::Failed => ("completed", "[Failed] "),
                S::Cancelled => ("canceled", "[Canceled] "),
            };
            let not_after = e
                .ended_at
                .unwrap_or(e.not_before + time::Duration::hours(1));
            json_object([
                ("Code", e.code.ec2_code().into()),
                ("Description", format!("{prefix}{}", e.description).into()),
                ("EventId", e.id.as_str().into()),
                ("NotAfter", ec2_date(not_after).into()),
                ("NotBefore", ec2_date(e.not_before).into()),
                ("State", state.into()),
            ])
        })
        .collect();
    serde_json::to_vec_pretty(&events).expect("JSON values always serialize")
}

/// A time as EC2's event documents write it: `21 Jan 2019 09:00:43 GMT`.
fn ec2_date(t: time::OffsetDateTime) -> String {
    let format = format_description!(
        "[day padding:none] [month repr:short] [year] [hour]:[minute]:[second] GMT"
    );
    t.to_offset(time::UtcOffset::UTC)
        .format(&format)
        .expect("every component of the format is in an OffsetDateTime")
}

/// `local-ipv4`: the configured address; failing that the address the guest
/// talks to the service from (which is the guest's own), if IPv4; else empty.
fn local_ipv4(inst: &Instance) -> String {
    match (inst.local_ipv4, inst.metadata_address) {
        (Some(h), _) => h.addr.to_string(),
        (None, IpAddr::V4(a)) => a.to_string(),
        (None, IpAddr::V6(_)) => String::new(),
    }
}

/// `public-keys/`: entries `0`, `1`, ... in key-name order, listed as
/// `0=name` (no slash, as EC2 lists them), each holding `openssh-key`.
fn public_keys(inst: &Instance) -> Vec<Entry<'_>> {
    inst.public_keys
        .iter()
        .enumerate()
        .map(|(i, (name, key))| {
            Entry::dir(i.to_string(), move || vec![Entry::text("openssh-key", key)])
                .labelled(format!("{i}={name}"))
        })
        .collect()
}

/// `network/interfaces/macs/<mac>/`: the one interface, alphabetical.
fn interface(inst: &Instance) -> Vec<Entry<'_>> {
    let mut e = vec![
        Entry::text("device-number", "0"),
        Entry::text("local-hostname", &inst.hostname),
    ];
    let local = local_ipv4(inst);
    if !local.is_empty() {
        e.push(Entry::text("local-ipv4s", local));
    }
    e.push(Entry::text("mac", &inst.mac));
    if let Some(ip) = inst.public_ipv4 {
        e.push(Entry::text("public-ipv4s", ip.to_string()));
    }
    e
}

/// `dynamic/instance-identity/document`: pretty-printed with two-space
/// indents and keys in EC2's (alphabetical) order, since some tools parse it
/// with line-oriented scripts.
fn identity_document(inst: &Instance) -> Vec<u8> {
    let doc = json_object([
        ("accountId", Value::from(inst.project_id.as_str())),
        ("architecture", "x86_64".into()),
        ("availabilityZone", inst.availability_zone.as_str().into()),
        ("imageId", inst.ami_id().into()),
        ("instanceId", inst.ec2_instance_id().into()),
        ("instanceType", inst.instance_type.as_str().into()),
        ("pendingTime", pending_time(inst).into()),
        (
            "privateIp",
            inst.local_ipv4
                .map_or(Value::Null, |h| h.addr.to_string().into()),
        ),
        ("region", inst.region().into()),
        ("version", "2017-09-30".into()),
    ]);
    serde_json::to_vec_pretty(&doc).expect("JSON values always serialize")
}

/// Creation time as EC2 writes it: UTC, `Z`, whole seconds.
fn pending_time(inst: &Instance) -> String {
    let format = format_description!("[year]-[month]-[day]T[hour]:[minute]:[second]Z");
    inst.created_at
        .to_offset(time::UtcOffset::UTC)
        .format(&format)
        .expect("every component of the format is in an OffsetDateTime")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{instance, json, listing, text, with_ctx};

    /// Run `f` on the tree of `version` for the fixture instance.
    fn at<R>(inst: &Instance, version: &str, f: impl FnOnce(&Node<'_>) -> R) -> R {
        with_ctx("2025-06-01", |ctx| {
            f(&ec2_version(inst, ctx, version).unwrap())
        })
    }

    #[test]
    fn latest_meta_data_listing_is_exact() {
        at(&instance(), "latest", |n| {
            assert_eq!(
                listing(n, "meta-data").unwrap(),
                "ami-id\nami-launch-index\nami-manifest-path\nblock-device-mapping/\nevents/\n\
                 hostname\ninstance-action\ninstance-id\ninstance-type\nlocal-hostname\nlocal-ipv4\nmac\n\
                 network/\nplacement/\npublic-hostname\npublic-ipv4\npublic-keys/\n\
                 reservation-id\nsecurity-groups"
            );
        });
    }

    #[test]
    fn version_dir_lists_dynamic_meta_data_user_data() {
        let inst = instance();
        at(&inst, "latest", |n| {
            assert_eq!(listing(n, "").unwrap(), "dynamic/\nmeta-data/\nuser-data")
        });
        at(&inst, "2008-09-01", |n| {
            assert_eq!(listing(n, "").unwrap(), "meta-data/\nuser-data")
        });
        at(&inst, "2009-04-04", |n| {
            assert!(listing(n, "dynamic/instance-identity").is_some())
        });
    }

    #[test]
    fn user_data_is_raw_and_absent_when_none() {
        let mut inst = instance();
        at(&inst, "1.0", |n| {
            assert_eq!(text(n, "user-data").unwrap(), "#!/bin/sh\necho hi\n")
        });
        inst.user_data = None;
        at(&inst, "latest", |n| {
            assert_eq!(listing(n, "").unwrap(), "dynamic/\nmeta-data/");
            assert!(n.resolve(&["user-data"]).is_none());
        });
    }

    #[test]
    fn maintenance_events_are_in_ec2s_shape_and_dates() {
        use cradle_model::maintenance::{MaintenanceCode, MaintenanceRequest, MaintenanceState};
        let mut inst = instance();
        let t = time::macros::datetime!(2019-01-21 09:00:43 UTC);
        let ev = |n: u8, code, state| {
            let mut e = MaintenanceRequest {
                code: Some(code),
                delay_seconds: Some(0),
                description: Some("host work".into()),
                ..Default::default()
            }
            .into_event(format!("instance-event-0000000000000000{n}"), t)
            .unwrap();
            e.state = state;
            e
        };
        inst.maintenance = vec![
            ev(1, MaintenanceCode::Reboot, MaintenanceState::Acknowledged),
            ev(2, MaintenanceCode::Stop, MaintenanceState::Failed),
            ev(3, MaintenanceCode::Stop, MaintenanceState::Cancelled),
        ];
        inst.maintenance[1].ended_at = Some(t + time::Duration::minutes(2));
        at(&inst, "latest", |n| {
            assert_eq!(
                listing(n, "meta-data/events/maintenance").unwrap(),
                "history\nscheduled"
            );
            assert_eq!(
                json(n, "meta-data/events/maintenance/scheduled").unwrap(),
                serde_json::json!([{
                    "Code": "instance-reboot",
                    "Description": "host work",
                    "EventId": "instance-event-00000000000000001",
                    "NotAfter": "21 Jan 2019 10:00:43 GMT",
                    "NotBefore": "21 Jan 2019 09:00:43 GMT",
                    "State": "active",
                }])
            );
            let history = json(n, "meta-data/events/maintenance/history").unwrap();
            assert_eq!(history[0]["State"], "completed");
            assert_eq!(history[0]["Description"], "[Failed] host work");
            assert_eq!(history[0]["NotAfter"], "21 Jan 2019 09:02:43 GMT");
            assert_eq!(history[1]["State"], "canceled");
        });
        // Not before EC2 had them.
        at(&inst, "2016-09-02", |n| {
            assert!(n.resolve(&["meta-data", "events"]).is_none())
        });
    }

    #[test]
    fn tags_are_served_only_when_switched_on() {
        let mut inst = instance();
        inst.tags.insert("Name".into(), "web1".into());
        inst.tags.insert("env".into(), "prod".into());
        at(&inst, "latest", |n| {
            assert!(n.resolve(&["meta-data", "tags"]).is_none());
        });
        inst.metadata_tags = true;
        at(&inst, "latest", |n| {
            assert_eq!(listing(n, "meta-data/tags/instance").unwrap(), "Name\nenv");
            assert_eq!(text(n, "meta-data/tags/instance/env").unwrap(), "prod");
        });
        at(&inst, "2021-03-23", |n| {
            assert!(n.resolve(&["meta-data", "tags"]).is_none());
        });
    }

    #[test]
    fn public_keys_are_indexed_and_labelled() {
        let mut inst = instance();
        at(&inst, "latest", |n| {
            assert_eq!(listing(n, "meta-data/public-keys").unwrap(), "0=alice");
            assert_eq!(
                listing(n, "meta-data/public-keys/0").unwrap(),
                "openssh-key"
            );
            assert_eq!(
                text(n, "meta-data/public-keys/0/openssh-key").unwrap(),
                "ssh-ed25519 AAAAalice alice@example"
            );
        });
        inst.public_keys
            .insert("bob".into(), "ssh-rsa AAAAbob".into());
        at(&inst, "latest", |n| {
            assert_eq!(
                listing(n, "meta-data/public-keys").unwrap(),
                "0=alice\n1=bob"
            );
            assert_eq!(
                text(n, "meta-data/public-keys/1/openssh-key").unwrap(),
                "ssh-rsa AAAAbob"
            );
        });
        inst.public_keys.clear();
        at(&inst, "latest", |n| {
            assert!(!listing(n, "meta-data").unwrap().contains("public-keys"));
        });
    }

    #[test]
    fn keys_are_gated_by_version() {
        let inst = instance();
        let md = |v: &str| at(&inst, v, |n| listing(n, "meta-data").unwrap());
        let has = |v: &str, key: &str| md(v).lines().any(|l| l == key);
        assert!(!has("1.0", "local-hostname"));
        assert!(has("2007-01-19", "local-hostname"));
        assert!(has("2007-01-19", "public-ipv4"));
        assert!(!has("2007-03-01", "instance-type"));
        assert!(has("2007-08-29", "instance-type"));
        assert!(!has("2007-10-10", "block-device-mapping/"));
        assert!(has("2007-12-15", "block-device-mapping/"));
        assert!(!has("2007-12-15", "placement/"));
        assert!(has("2008-02-01", "placement/"));
        assert!(!has("2008-02-01", "instance-action"));
        assert!(has("2008-09-01", "instance-action"));
        assert!(!has("2009-04-04", "mac"));
        assert!(has("2011-01-01", "mac"));
        assert!(has("2011-01-01", "network/"));
        assert_eq!(
            md("1.0"),
            "ami-id\nami-launch-index\nami-manifest-path\nhostname\ninstance-id\nlocal-ipv4\n\
             public-keys/\nreservation-id\nsecurity-groups"
        );
    }

    #[test]
    fn placement_region_only_from_2020_10_27() {
        let inst = instance();
        at(&inst, "2019-10-01", |n| {
            assert_eq!(
                listing(n, "meta-data/placement").unwrap(),
                "availability-zone"
            );
            assert!(n.resolve(&["meta-data", "placement", "region"]).is_none());
        });
        at(&inst, "2020-10-27", |n| {
            assert_eq!(
                listing(n, "meta-data/placement").unwrap(),
                "availability-zone\nregion"
            );
            assert_eq!(text(n, "meta-data/placement/region").unwrap(), "eu-west-1");
            assert_eq!(
                text(n, "meta-data/placement/availability-zone").unwrap(),
                "eu-west-1a"
            );
        });
    }

    #[test]
    fn scalar_values() {
        at(&instance(), "latest", |n| {
            let get = |p: &str| text(n, &format!("meta-data/{p}")).unwrap();
            assert_eq!(get("ami-id"), "ami-12345678");
            assert_eq!(get("ami-launch-index"), "0");
            assert_eq!(get("ami-manifest-path"), "(unknown)");
            assert_eq!(get("hostname"), "web-1");
            assert_eq!(get("local-hostname"), "web-1");
            assert_eq!(get("public-hostname"), "web-1");
            assert_eq!(get("instance-id"), "i-6f1c2a3b4d5e4f608");
            assert_eq!(get("reservation-id"), "r-08a7b9c0d1e2f3a4b");
            assert_eq!(get("instance-type"), "m1.small");
            assert_eq!(get("instance-action"), "none");
            assert_eq!(get("local-ipv4"), "10.0.0.5");
            assert_eq!(get("public-ipv4"), "203.0.113.7");
            assert_eq!(get("security-groups"), "default\nweb");
            assert_eq!(get("mac"), "fa:16:3e:01:02:03");
            assert_eq!(get("block-device-mapping/ami"), "vda");
            assert_eq!(get("block-device-mapping/root"), "/dev/vda");
        });
    }

    #[test]
    fn no_public_ipv4_means_no_public_hostname() {
        let mut inst = instance();
        inst.public_ipv4 = None;
        at(&inst, "latest", |n| {
            let md = listing(n, "meta-data").unwrap();
            assert!(!md.contains("public-hostname"));
            assert!(!md.contains("public-ipv4"));
            assert!(
                !listing(n, "meta-data/network/interfaces/macs/fa:16:3e:01:02:03")
                    .unwrap()
                    .contains("public-ipv4s")
            );
        });
    }

    #[test]
    fn local_ipv4_falls_back_to_the_metadata_address() {
        let mut inst = instance();
        inst.local_ipv4 = None;
        inst.metadata_address = "192.0.2.9".parse().unwrap();
        at(&inst, "latest", |n| {
            assert_eq!(text(n, "meta-data/local-ipv4").unwrap(), "192.0.2.9")
        });
        inst.metadata_address = "2001:db8::9".parse().unwrap();
        at(&inst, "latest", |n| {
            assert_eq!(text(n, "meta-data/local-ipv4").unwrap(), "");
            assert_eq!(
                json(n, "dynamic/instance-identity/document").unwrap()["privateIp"],
                Value::Null
            );
        });
    }

    #[test]
    fn network_interface_tree() {
        at(&instance(), "latest", |n| {
            assert_eq!(listing(n, "meta-data/network").unwrap(), "interfaces/");
            assert_eq!(listing(n, "meta-data/network/interfaces").unwrap(), "macs/");
            assert_eq!(
                listing(n, "meta-data/network/interfaces/macs").unwrap(),
                "fa:16:3e:01:02:03/"
            );
            let dir = "meta-data/network/interfaces/macs/fa:16:3e:01:02:03";
            assert_eq!(
                listing(n, dir).unwrap(),
                "device-number\nlocal-hostname\nlocal-ipv4s\nmac\npublic-ipv4s"
            );
            assert_eq!(text(n, &format!("{dir}/device-number")).unwrap(), "0");
            assert_eq!(text(n, &format!("{dir}/local-ipv4s")).unwrap(), "10.0.0.5");
            assert_eq!(
                text(n, &format!("{dir}/public-ipv4s")).unwrap(),
                "203.0.113.7"
            );
        });
    }

    /// A signer that answers what it was given, tagged: enough to show the
    /// signed bytes are the served document's.
    #[derive(Debug)]
    struct Echo;
    impl crate::IdentitySigner for Echo {
        fn signature(&self, d: &[u8]) -> Vec<u8> {
            [b"sig:".as_slice(), d].concat()
        }
        fn pkcs7(&self, d: &[u8]) -> Vec<u8> {
            [b"p7:".as_slice(), d].concat()
        }
        fn rsa2048(&self, d: &[u8]) -> Vec<u8> {
            [b"rsa:".as_slice(), d].concat()
        }
    }

    #[test]
    fn a_signer_adds_the_signed_forms_of_the_served_document() {
        let inst = instance();
        with_ctx("2025-06-01", |ctx| {
            let ctx = ctx.clone().with_identity(&Echo);
            let n = ec2_version(&inst, &ctx, "latest").unwrap();
            assert_eq!(
                listing(&n, "dynamic/instance-identity").unwrap(),
                "document\npkcs7\nrsa2048\nsignature"
            );
            let doc = text(&n, "dynamic/instance-identity/document").unwrap();
            for (file, tag) in [("signature", "sig:"), ("pkcs7", "p7:"), ("rsa2048", "rsa:")] {
                let got = text(&n, &format!("dynamic/instance-identity/{file}")).unwrap();
                assert_eq!(got, format!("{tag}{doc}"), "{file}");
            }
        });
    }

    #[test]
    fn identity_document_matches_ec2() {
        at(&instance(), "latest", |n| {
            assert_eq!(listing(n, "dynamic").unwrap(), "instance-identity/");
            assert_eq!(listing(n, "dynamic/instance-identity").unwrap(), "document");
            assert_eq!(
                text(n, "dynamic/instance-identity/document").unwrap(),
                r#"{
  "accountId": "proj-42",
  "architecture": "x86_64",
  "availabilityZone": "eu-west-1a",
  "imageId": "ami-12345678",
  "instanceId": "i-6f1c2a3b4d5e4f608",
  "instanceType": "m1.small",
  "pendingTime": "2024-05-06T07:08:09Z",
  "privateIp": "10.0.0.5",
  "region": "eu-west-1",
  "version": "2017-09-30"
}"#
            );
        });
    }

    #[test]
    fn unknown_versions_and_paths() {
        let inst = instance();
        with_ctx("2025-06-01", |ctx| {
            for never in [
                "2011-01-02",
                "2010-01-01",
                "2025-01-01",
                "1.1",
                "",
                "LATEST",
            ] {
                assert!(ec2_version(&inst, ctx, never).is_none(), "{never}");
            }
        });
        at(&inst, "latest", |n| {
            assert!(n.resolve(&["meta-data", "nonesuch"]).is_none());
            assert!(n.resolve(&["meta-data", "hostname", "extra"]).is_none());
            assert!(n.resolve(&["meta-data", "public-keys", "1"]).is_none());
            assert!(
                n.resolve(&["meta-data", "public-keys", "0=alice"])
                    .is_none()
            );
        });
    }

    #[test]
    fn meta_data_json_mirrors_the_tree() {
        let inst = instance();
        with_ctx("2026-01-01", |ctx| {
            let json: serde_json::Value =
                serde_json::from_slice(&ec2_meta_data_json(&inst, ctx, "2009-04-04").unwrap())
                    .unwrap();
            assert_eq!(json["hostname"], "web-1");
            assert_eq!(json["placement"]["availability-zone"], "eu-west-1a");
            assert_eq!(
                json["public-keys"]["0"]["openssh-key"],
                "ssh-ed25519 AAAAalice alice@example"
            );
            assert_eq!(json["public-keys"]["0"]["_name"], "0=alice");
            // Gated like the tree: no mac before 2011-01-01.
            assert!(json.get("mac").is_none());
            let node = ec2_version(&inst, ctx, "2009-04-04").unwrap();
            let Some(crate::Resolved::File(id)) = node.resolve(&["meta-data", "instance-id"])
            else {
                panic!()
            };
            assert_eq!(json["instance-id"], String::from_utf8(id).unwrap());
            assert!(ec2_meta_data_json(&inst, ctx, "2001-01-01").is_none());
        });
    }
}
