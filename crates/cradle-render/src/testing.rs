//! Fixtures and path helpers shared by the unit tests.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};

use cradle_model::{HostAddr, ImdsTokens, Instance, Os, OsParams, Secret, State};
use time::macros::datetime;
use uuid::Uuid;

use crate::{Context, Node, Resolved};

/// An instance with every optional field set, so each gated key can appear.
pub fn instance() -> Instance {
    let s = |v: &str| v.to_string();
    Instance {
        id: Uuid::parse_str("6f1c2a3b-4d5e-4f60-8a7b-9c0d1e2f3a4b").unwrap(),
        name: s("web-1"),
        project_id: s("proj-42"),
        host: s("node1"),
        version: 0,
        stored_secret_names: Vec::new(),
        hostname: s("web-1"),
        availability_zone: s("eu-west-1a"),
        launch_index: 0,
        instance_type: s("m1.small"),
        user_data: Some(b"#!/bin/sh\necho hi\n".to_vec()),
        metadata: BTreeMap::from([(s("role"), s("web"))]),
        public_keys: BTreeMap::from([(s("alice"), s("ssh-ed25519 AAAAalice alice@example"))]),
        files: BTreeMap::new(),
        boot_roles: Vec::new(),
        state_reason: None,
        metadata_address: IpAddr::V4(Ipv4Addr::new(10, 0, 0, 5)),
        mac: s("fa:16:3e:01:02:03"),
        local_ipv6: None,
        link_local_ipv6: None,
        interface: None,
        local_ipv4: Some(HostAddr {
            addr: Ipv4Addr::new(10, 0, 0, 5),
            prefix: Some(24),
        }),
        gateway_ipv4: Some(Ipv4Addr::new(10, 0, 0, 1)),
        dns_nameservers: vec![IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2))],
        public_ipv4: Some(Ipv4Addr::new(203, 0, 113, 7)),
        os: Some(Os::Image(s("ami-12345678"))),
        personalization_url: None,
        personalization_sha256: None,
        disks: Vec::new(),
        memory_mib: 512,
        vcpus: 1,
        install_params: Default::default(),
        run_params: Default::default(),
        agent: None,
        os_params: OsParams {
            public: BTreeMap::from([(s("locale"), s("en_US"))]),
            private: BTreeMap::from([(s("db_url"), Secret::new(s("postgres://db")))]),
            secret: BTreeMap::from([(s("root_pw"), Secret::new(s("hunter2")))]),
        },
        imds_tokens: ImdsTokens::Optional,
        state: State::Registered,
        // Fractional seconds, to check they are dropped where EC2 has none.
        created_at: datetime!(2024-05-06 07:08:09.5 UTC),
        updated_at: datetime!(2024-05-06 07:08:09.5 UTC),
        random_seed: (0..512).map(|i| (i % 251) as u8).collect(),
        password: None,
        tags: Default::default(),
        metadata_tags: false,
        maintenance: Vec::new(),
    }
}

/// Run `f` with a context for `today`; the closure form keeps the borrowed
/// vendordata and group names alive for as long as the tree is used.
pub fn with_ctx<R>(today: &str, f: impl FnOnce(&Context<'_>) -> R) -> R {
    let vendor = serde_json::json!({"cloud": "test"});
    let ctx = Context {
        security_groups: &["default", "web"],
        ..Context::new(today, &vendor)
    };
    f(&ctx)
}

fn segments(path: &str) -> Vec<&str> {
    path.split('/').filter(|s| !s.is_empty()).collect()
}

/// The bytes of the file at `path`; `None` if absent or a directory.
pub fn file(node: &Node<'_>, path: &str) -> Option<Vec<u8>> {
    match node.resolve(&segments(path))? {
        Resolved::File(b) => Some(b),
        Resolved::Listing(_) => None,
    }
}

/// The file at `path` as text.
pub fn text(node: &Node<'_>, path: &str) -> Option<String> {
    file(node, path).map(|b| String::from_utf8(b).unwrap())
}

/// The file at `path` parsed as JSON.
pub fn json(node: &Node<'_>, path: &str) -> Option<serde_json::Value> {
    file(node, path).map(|b| serde_json::from_slice(&b).unwrap())
}

/// The listing of the directory at `path`; `None` if absent or a file.
pub fn listing(node: &Node<'_>, path: &str) -> Option<String> {
    match node.resolve(&segments(path))? {
        Resolved::Listing(b) => Some(String::from_utf8(b).unwrap()),
        Resolved::File(_) => None,
    }
}
