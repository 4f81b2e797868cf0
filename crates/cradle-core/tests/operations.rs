//! The operations layer over a real SQLite store: who may do what, what a
//! guest's channel does while an install job runs, and what a job keeps.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use cradle_core::{Caller, Core, Error, InstallFile, Kind, Written};
use cradle_model::Secret;
use cradle_model::api::{InstancePatch, InstanceSpec, Patch};
use cradle_registry::jobs::{Artifacts, FORWARD_QUEUE, InstallJob, Package};
use cradle_registry::{ChannelLimits, Registry};

struct Setup {
    core: Arc<Core>,
    registry: Arc<Registry>,
    _tmp: tempfile::TempDir,
}

fn setup() -> Setup {
    let tmp = tempfile::tempdir().unwrap();
    let store = cradle_store::SqliteStore::open(&tmp.path().join("cradle.db")).unwrap();
    let registry = Registry::open(
        Arc::new(store),
        ChannelLimits {
            queue_len: 4,
            message_bytes: 1024,
        },
        "node1",
    )
    .unwrap()
    .enable_security_groups(Default::default())
    .unwrap();
    let registry = Arc::new(registry);
    let mut metrics = cradle_core::Metrics::new();
    let vendordata =
        cradle_vendordata::Vendordata::new(Vec::new(), metrics.registry_mut()).unwrap();
    let core = Core::new(cradle_core::Parts {
        registry: registry.clone(),
        install: cradle_install::Settings {
            appliance: tmp.path().join("appliance"),
            qemu: "qemu-system-x86_64".into(),
            accel: cradle_install::AccelChoice::Tcg,
            timeout: Duration::from_secs(60),
            memory_mib: 256,
            metadata_port: 80,
            comm: cradle_install::Comm {
                ip: "ip".into(),
                nft: "nft".into(),
            },
            run_dir: tmp.path().join("run"),
            os_search: Vec::new(),
            script_user: "nobody".into(),
            qemu_img: "qemu-img".into(),
            dnsmasq: "dnsmasq".into(),
            spool_dir: std::env::temp_dir().join("cradle-spool-unused"),
            stream_max_bytes: 1 << 30,
        },
        metrics: Arc::new(metrics),
        vendor_data: serde_json::json!({}),
        vendordata: Arc::new(vendordata),
        drive_limits: Default::default(),
        firewall_table: "cradle".into(),
        firewall_enforced: false,
        firewall_mark: Default::default(),
        render_cache_bytes: 1 << 20,
        max_token_ttl: 21600,
        waits: Default::default(),
        peers: Default::default(),
        migration: Default::default(),
        maintenance: Default::default(),
        identity: cradle_core::identity::Identity::generated("https://cradle.test"),
    });
    Setup {
        core,
        registry,
        _tmp: tmp,
    }
}

/// A token of the default project, without the admin role.
fn operator(name: &str) -> Caller {
    Caller::named(name, vec!["provisioner".into()], ["default".to_string()])
}

fn spec(name: &str, address: &str) -> InstanceSpec {
    InstanceSpec {
        name: name.into(),
        metadata_address: Some(address.into()),
        ..Default::default()
    }
}

#[track_caller]
fn kind(r: Result<impl std::fmt::Debug, Error>) -> (Kind, &'static str) {
    let e = r.expect_err("the operation should have been refused");
    (e.kind(), e.code())
}

#[tokio::test]
async fn operator_only_operations_are_refused_to_other_callers() {
    let s = setup();
    let (admin, other) = (Caller::system(), operator("provisioner"));
    let mut web = spec("web", "169.254.3.1");
    web.personalization_url = Some("file:///etc/hostname.tar.gz".into());
    s.core.create_instance(&other, web).await.unwrap();

    assert_eq!(
        kind(s.core.reset_state(&other, "web").await),
        (Kind::Forbidden, "forbidden")
    );
    s.core.reset_state(&admin, "web").await.unwrap();

    // A file:// package is read with the server's rights: for serving it
    // and for installing with it alike, decided in one place.
    let e = s
        .core
        .personalization_package(&other, "web")
        .await
        .unwrap_err();
    assert_eq!(e.kind(), Kind::Forbidden);
    assert!(e.to_string().contains("serving a file:// package"), "{e}");
    let e = s.core.start_install(&other, "web").await.unwrap_err();
    assert_eq!(e.kind(), Kind::Forbidden);
    assert!(
        e.to_string().contains("installing with a file:// package"),
        "{e}"
    );

    // The ruleset spans every project: a project's token sees none of it;
    // one acting for all may, and applying it is an operator's.
    assert_eq!(
        kind(s.core.apply_firewall(&other, true).await),
        (Kind::Forbidden, "forbidden")
    );
    let everywhere = Caller {
        projects: cradle_core::Projects::All,
        ..operator("everywhere")
    };
    s.core.apply_firewall(&everywhere, true).await.unwrap();
    assert_eq!(
        kind(s.core.apply_firewall(&everywhere, false).await),
        (Kind::Forbidden, "forbidden")
    );
    assert_eq!(
        kind(s.core.apply_firewall(&admin, false).await),
        (Kind::Conflict, "firewall_off")
    );

    // Something missing is missing, whoever asks.
    assert_eq!(
        kind(s.core.instance(&other, "nope")),
        (Kind::NotFound, "not_found")
    );
}

#[tokio::test]
async fn views_carry_parameter_names_never_values() {
    let s = setup();
    let mut web = spec("web", "169.254.3.2");
    web.os_params
        .private
        .insert("db".into(), Secret::new("private-canary-1".into()));
    web.os_params
        .secret
        .insert("pw".into(), Secret::new("secret-canary-2".into()));
    let created = s.core.create_instance(&operator("p"), web).await.unwrap();
    let mut patch = InstancePatch {
        hostname: Some("web-2".into()),
        user_data: Patch::Absent,
        ..Default::default()
    };
    patch
        .os_params
        .secret
        .insert("pw2".into(), Some(Secret::new("secret-canary-3".into())));
    let modified = s
        .core
        .modify_instance(&operator("p"), "web", patch)
        .await
        .unwrap();
    let shown = s.core.instance(&operator("p"), "web").unwrap();
    let listed = s.core.instances(&operator("p")).unwrap();
    let all = serde_json::to_string(&(created, modified, &shown, listed)).unwrap();
    assert!(!all.contains("canary"), "{all}");
    assert_eq!(shown.os_params.secret, ["pw", "pw2"]);
    assert_eq!(shown.os_params.private, ["db"]);
}

fn artifacts() -> Artifacts {
    Artifacts {
        manifest: Bytes::from_static(br#"{"operation":"create"}"#),
        scripts: BTreeMap::from([("create".to_string(), Bytes::from_static(b"#!/bin/sh\n"))]),
        package: Some(Package {
            bytes: Bytes::from(vec![1u8; 4096]),
            sha256: "ab".repeat(32),
        }),
    }
}

#[tokio::test]
async fn a_guest_being_installed_writes_to_its_job_and_is_slowed_when_the_script_lags() {
    let s = setup();
    let view = s
        .core
        .create_instance(&operator("p"), spec("web", "169.254.3.3"))
        .await
        .unwrap();
    let inst = s.registry.get("web").unwrap();
    let job = s
        .registry
        .begin_install(InstallJob::new(&inst, artifacts()))
        .unwrap();
    let guest = s
        .core
        .guest(view.metadata_address)
        .expect("known by its address");

    // What the job serves, from its one buffer.
    let (a, sha) = s.core.install_file(&guest, InstallFile::Package).unwrap();
    let (b, _) = s.core.install_file(&guest, InstallFile::Package).unwrap();
    assert_eq!(a.as_ptr(), b.as_ptr(), "one buffer, not a copy per request");
    assert_eq!(sha.unwrap(), "ab".repeat(32));
    assert_eq!(
        kind(s.core.install_file(&guest, InstallFile::Script("nope"))),
        (Kind::NotFound, "no_script")
    );

    // The agent's reports are the job's.
    let report = Bytes::from_static(br#"{"agent":"progress","step":"partitioning"}"#);
    assert_eq!(
        s.core.write_message(&guest, report).await.unwrap(),
        Written::Job
    );
    assert_eq!(job.view(0).step.as_deref(), Some("partitioning"));

    // Anything else goes to the trusted script, through a bounded queue.
    let script_stdin = job.forward_to_script();
    for n in 0..FORWARD_QUEUE {
        let line = Bytes::from(format!("line {n}"));
        assert_eq!(
            s.core.write_message(&guest, line).await.unwrap(),
            Written::Job
        );
    }
    let full = Bytes::from_static(b"one too many");
    assert_eq!(
        kind(s.core.write_message(&guest, full.clone()).await),
        (Kind::TooMany, "queue_full")
    );
    assert_eq!(script_stdin.recv().unwrap(), b"line 0");
    assert_eq!(
        s.core.write_message(&guest, full).await.unwrap(),
        Written::Job
    );

    // When the job ends, what it served is gone, and the channel is the
    // operator's again.
    s.registry.end_install(&job, true, None).unwrap();
    assert_eq!(
        kind(s.core.install_file(&guest, InstallFile::Manifest)),
        (Kind::NotFound, "no_install_job")
    );
    assert!(job.artifacts().is_none());
    let after = Bytes::from_static(b"hello operator");
    assert!(matches!(
        s.core.write_message(&guest, after).await.unwrap(),
        Written::Queued(_)
    ));

    // Its record goes with the instance.
    assert!(s.registry.install_job(inst.id).is_some());
    s.core.remove_instance(&operator("p"), "web").await.unwrap();
    assert!(s.registry.install_job(inst.id).is_none());
    assert!(s.core.guest(view.metadata_address).is_none());
}

#[tokio::test]
async fn a_guest_token_is_checked_before_anything_else() {
    use cradle_core::{Namespace, Presented};
    use cradle_model::ImdsTokens;
    let s = setup();
    let mut guests = Vec::new();
    for (n, tokens) in [
        ImdsTokens::Optional,
        ImdsTokens::Required,
        ImdsTokens::Strict,
    ]
    .into_iter()
    .enumerate()
    {
        let mut web = spec(&format!("web{n}"), &format!("169.254.3.{}", n + 4));
        web.imds_tokens = Some(tokens);
        let view = s.core.create_instance(&operator("p"), web).await.unwrap();
        guests.push((tokens, s.core.guest(view.metadata_address).unwrap()));
    }
    let bare = Presented::default();
    let flavor = Presented {
        flavor: true,
        ..Presented::default()
    };
    let unauthorized = Err((Kind::Unauthorized, "unauthorized"));
    let forbidden = Err((Kind::Forbidden, "forbidden"));
    for (tokens, guest) in &guests {
        let check = |ns, p| {
            s.core
                .authorize_guest(guest, ns, p)
                .map_err(|e| (e.kind(), e.code()))
        };
        // The table of docs/metadata-api.md, without a token.
        let (ec2, openstack) = match tokens {
            ImdsTokens::Optional => (Ok(()), Ok(())),
            ImdsTokens::Required => (unauthorized, Ok(())),
            ImdsTokens::Strict => (unauthorized, unauthorized),
        };
        assert_eq!(check(Namespace::Ec2, bare), ec2, "{tokens:?} ec2");
        assert_eq!(
            check(Namespace::OpenStack, bare),
            openstack,
            "{tokens:?} openstack"
        );
        assert_eq!(
            check(Namespace::Native, bare),
            forbidden,
            "{tokens:?} native"
        );
        // The header opens the native namespace, and nothing else.
        assert_eq!(check(Namespace::Native, flavor), Ok(()), "{tokens:?}");
        assert_eq!(check(Namespace::Ec2, flavor), ec2, "{tokens:?}");
        // A good token opens every namespace; a bad one none.
        let token = s.core.issue_token(guest, 60).unwrap();
        let good = Presented {
            token: Some(token.as_bytes()),
            flavor: false,
        };
        let bad = Presented {
            token: Some(b"garbage"),
            flavor: true,
        };
        for ns in [Namespace::Ec2, Namespace::OpenStack, Namespace::Native] {
            assert_eq!(check(ns, good), Ok(()), "{tokens:?} {ns:?}");
            assert_eq!(check(ns, bad), unauthorized, "{tokens:?} {ns:?}");
        }
    }
    // Another guest's token is no token of this one's.
    let (_, web0) = &guests[0];
    let (_, web1) = &guests[1];
    let token = s.core.issue_token(web0, 60).unwrap();
    let theirs = Presented {
        token: Some(token.as_bytes()),
        flavor: false,
    };
    assert_eq!(
        kind(s.core.authorize_guest(web1, Namespace::Ec2, theirs)),
        (Kind::Unauthorized, "unauthorized")
    );
    assert_eq!(
        kind(s.core.issue_token(web0, 0)),
        (Kind::BadRequest, "bad_request")
    );
    assert!(s.core.issue_token(web0, 21601).is_err());
}

#[tokio::test]
async fn a_caller_sees_and_changes_only_its_projects() {
    let s = setup();
    let a = Caller::named("a", vec![], ["tenA".to_string()]);
    let b = Caller::named("b", vec![], ["tenB".to_string()]);
    let nobody = Caller::named("nobody", vec!["provisioner".into()], []);
    let admin = Caller::named("root", vec![cradle_core::ADMIN_ROLE.into()], []);
    let mut web = spec("web", "169.254.4.1");
    web.project_id = Some("tenA".into());
    let created = s.core.create_instance(&a, web).await.unwrap();

    // B may not create in A's project, nor see, change or remove A's
    // instance: to B it is as missing as one that never existed.
    let mut theirs = spec("theirs", "169.254.4.2");
    theirs.project_id = Some("tenA".into());
    assert_eq!(
        kind(s.core.create_instance(&b, theirs).await),
        (Kind::Forbidden, "forbidden")
    );
    let missing = kind(s.core.instance(&b, "no-such-instance"));
    for key in ["web", created.id.to_string().as_str()] {
        assert_eq!(kind(s.core.instance(&b, key)), missing, "{key}");
        assert_eq!(kind(s.core.events(&b, key).await), missing);
        assert_eq!(
            kind(
                s.core
                    .modify_instance(&b, key, InstancePatch::default())
                    .await
            ),
            missing
        );
        assert_eq!(kind(s.core.remove_instance(&b, key).await), missing);
        assert_eq!(kind(s.core.instance_groups(&b, key)), missing);
    }
    assert!(s.core.instances(&b).unwrap().is_empty());
    assert_eq!(s.core.instances(&a).unwrap().len(), 1);
    assert_eq!(s.core.instances(&admin).unwrap().len(), 1);
    // A token of no project can only ask who it is.
    assert_eq!(
        kind(s.core.instances(&nobody)),
        (Kind::Forbidden, "forbidden")
    );
    assert_eq!(kind(s.core.instance(&nobody, "web")), missing);
    let me = s.core.whoami(&nobody);
    assert_eq!((me.all_projects, me.projects.len()), (false, 0));
    assert!(s.core.whoami(&admin).all_projects);

    // A tenant's security groups are its own; naming another is 403.
    assert_eq!(
        kind(s.core.security_groups(&b, "tenA")),
        (Kind::Forbidden, "forbidden")
    );
    assert_eq!(s.core.security_groups(&a, "tenA").unwrap().len(), 1);
    assert!(s.core.security_groups(&b, "tenB").unwrap().is_empty());

    // Moving an instance to another project is the admin role's.
    let to_b = InstancePatch {
        project_id: Some("tenB".into()),
        ..Default::default()
    };
    assert_eq!(
        kind(s.core.modify_instance(&a, "web", to_b.clone()).await),
        (Kind::Forbidden, "forbidden")
    );
    // Past authorization, the registry has its own reason: groups belong
    // to their tenant.
    assert_eq!(
        kind(s.core.modify_instance(&admin, "web", to_b).await),
        (Kind::Invalid, "invalid")
    );
}

#[tokio::test]
async fn download_credentials_do_not_follow_a_url_to_another_host() {
    let s = setup();
    let a = Caller::named("a", vec![], ["default".to_string()]);
    let mut web = spec("web", "169.254.5.1");
    web.personalization_url = Some("https://pkg.example/web.tar.gz".into());
    for (k, v) in [
        ("personalization_user", "u"),
        ("personalization_password", "p"),
    ] {
        web.os_params.secret.insert(k.into(), Secret::new(v.into()));
    }
    s.core.create_instance(&a, web).await.unwrap();
    let repoint = |url: &str| InstancePatch {
        personalization_url: cradle_model::api::Patch::Value(url.into()),
        ..Default::default()
    };
    // The same host (another path, another case) keeps them.
    s.core
        .modify_instance(&a, "web", repoint("https://PKG.example/v2/web.tar.gz"))
        .await
        .unwrap();
    // Another host, or another port, is refused without them...
    for url in [
        "https://attacker.example/web.tar.gz",
        "https://pkg.example:8443/web.tar.gz",
        "http://pkg.example/web.tar.gz",
    ] {
        let e = s
            .core
            .modify_instance(&a, "web", repoint(url))
            .await
            .unwrap_err();
        assert_eq!(e.kind(), Kind::Forbidden, "{url}");
        assert!(e.to_string().contains("personalization_"), "{e}");
    }
    // ...and allowed with them given again, or removed.
    let mut again = repoint("https://mirror.example/web.tar.gz");
    for (k, v) in [
        ("personalization_user", "u2"),
        ("personalization_password", "p2"),
    ] {
        again
            .os_params
            .secret
            .insert(k.into(), Some(Secret::new(v.into())));
    }
    s.core.modify_instance(&a, "web", again).await.unwrap();
    let mut dropped = repoint("https://other.example/web.tar.gz");
    for k in ["personalization_user", "personalization_password"] {
        dropped.os_params.secret.insert(k.into(), None);
    }
    let v = s.core.modify_instance(&a, "web", dropped).await.unwrap();
    assert!(v.os_params.secret.is_empty());
    // With nothing held, any host will do.
    s.core
        .modify_instance(&a, "web", repoint("https://any.example/web.tar.gz"))
        .await
        .unwrap();
    // The admin role may carry them, knowingly.
    let mut db = spec("db", "169.254.5.2");
    db.personalization_url = Some("https://pkg.example/db.tar.gz".into());
    db.os_params
        .secret
        .insert("personalization_token".into(), Secret::new("t".into()));
    s.core.create_instance(&a, db).await.unwrap();
    let moved = repoint("https://mirror.example/db.tar.gz");
    assert!(
        s.core
            .modify_instance(&a, "db", moved.clone())
            .await
            .is_err()
    );
    let v = s
        .core
        .modify_instance(&Caller::system(), "db", moved)
        .await
        .unwrap();
    assert_eq!(v.os_params.secret, ["personalization_token"]);
}
