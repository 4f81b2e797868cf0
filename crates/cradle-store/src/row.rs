//! An instance as a row: the columns, their values, and back. Shared by both
//! drivers, so that both store exactly the same thing.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};

use base64::Engine;
use cradle_model::{HostAddr, ImdsTokens, Instance, Os, OsParams, Secret, State};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use uuid::Uuid;

use crate::StoreError;
use crate::db::{Row, Value};

/// Every stored column of `instances` but `version`, in [`encode`]'s order.
pub(crate) const COLUMNS: &[&str] = &[
    "id",
    "name",
    "project_id",
    "hostname",
    "availability_zone",
    "launch_index",
    "instance_type",
    "user_data",
    "metadata",
    "public_keys",
    "metadata_address",
    "mac",
    "local_ipv4",
    "gateway_ipv4",
    "dns_nameservers",
    "public_ipv4",
    "os_type",
    "os_image",
    "os_params_public",
    "os_params_private",
    "imds_tokens",
    "state",
    "created_at",
    "updated_at",
    "random_seed",
    "password",
    "files",
    "boot_roles",
    "state_reason",
    "local_ipv6",
    "interface",
    "personalization_url",
    "personalization_sha256",
    "disks",
    "memory_mib",
    "vcpus",
    "install_params",
    "host",
    "secret_names",
    "run_params",
    "agent",
    "link_local_ipv6",
    "tags",
    "metadata_tags",
    "maintenance",
];

/// `SELECT` list: [`COLUMNS`], then `version`.
pub(crate) fn select_list() -> String {
    let mut s = COLUMNS.join(", ");
    s.push_str(", version");
    s
}

pub(crate) fn ts(t: OffsetDateTime) -> String {
    t.format(&Rfc3339)
        .expect("RFC 3339 formats every OffsetDateTime")
}

pub(crate) fn parse_ts(s: &str) -> Result<OffsetDateTime, StoreError> {
    OffsetDateTime::parse(s, &Rfc3339)
        .map_err(|e| StoreError::Corrupt(format!("timestamp {s:?}: {e}")))
}

pub(crate) fn json<T: serde::Serialize + ?Sized>(v: &T) -> String {
    serde_json::to_string(v).expect("maps of strings serialize")
}

pub(crate) fn corrupt(what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(format!("{what}: {e}"))
}

pub(crate) fn uuid(what: &str, s: &str) -> Result<Uuid, StoreError> {
    Uuid::parse_str(s).map_err(|e| corrupt(what, e))
}

fn private_json(p: &OsParams) -> String {
    let exposed: BTreeMap<&str, &str> = p
        .private
        .iter()
        .map(|(k, v)| (k.as_str(), v.expose().as_str()))
        .collect();
    json(&exposed)
}

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// Injected files as a JSON object of path to base64 contents.
fn files_json(files: &BTreeMap<String, Vec<u8>>) -> String {
    let encoded: BTreeMap<&str, String> = files
        .iter()
        .map(|(p, c)| (p.as_str(), B64.encode(c)))
        .collect();
    json(&encoded)
}

fn parse_files(text: &str) -> Result<BTreeMap<String, Vec<u8>>, StoreError> {
    let encoded: BTreeMap<String, String> =
        serde_json::from_str(text).map_err(|e| corrupt("files", e))?;
    encoded
        .into_iter()
        .map(|(p, c)| Ok((p, B64.decode(c).map_err(|e| corrupt("files", e))?)))
        .collect()
}

/// The values of [`COLUMNS`] for `i`. Secret parameters have no column.
pub(crate) fn encode(i: &Instance) -> Vec<Value> {
    let (os_type, os_image) = match &i.os {
        Some(Os::Type(t)) => (Some(t.as_str()), None),
        Some(Os::Image(m)) => (None, Some(m.as_str())),
        None => (None, None),
    };
    let text = |s: &str| Value::Text(s.to_string());
    let blob = |b: Option<&[u8]>| b.map_or(Value::Null, |b| Value::Blob(b.to_vec()));
    vec![
        Value::Text(i.id.to_string()),
        text(&i.name),
        text(&i.project_id),
        text(&i.hostname),
        text(&i.availability_zone),
        Value::Int(i64::from(i.launch_index)),
        text(&i.instance_type),
        blob(i.user_data.as_deref()),
        Value::Text(json(&i.metadata)),
        Value::Text(json(&i.public_keys)),
        Value::Text(i.metadata_address.to_string()),
        text(&i.mac),
        i.local_ipv4.map(|a| a.to_string()).into(),
        i.gateway_ipv4.map(|a| a.to_string()).into(),
        Value::Text(json(&i.dns_nameservers)),
        i.public_ipv4.map(|a| a.to_string()).into(),
        os_type.into(),
        os_image.into(),
        Value::Text(json(&i.os_params.public)),
        Value::Text(private_json(&i.os_params)),
        text(i.imds_tokens.as_str()),
        text(i.state.as_str()),
        Value::Text(ts(i.created_at)),
        Value::Text(ts(i.updated_at)),
        Value::Blob(i.random_seed.clone()),
        i.password.as_deref().into(),
        Value::Text(files_json(&i.files)),
        Value::Text(json(&i.boot_roles)),
        i.state_reason.as_deref().into(),
        i.local_ipv6.map(|a| a.to_string()).into(),
        i.interface.as_deref().into(),
        i.personalization_url.as_deref().into(),
        i.personalization_sha256.as_deref().into(),
        Value::Text(json(&i.disks)),
        Value::Int(i64::from(i.memory_mib)),
        Value::Int(i64::from(i.vcpus)),
        Value::Text(json(&i.install_params)),
        text(&i.host),
        Value::Text(json(&i.stored_secret_names)),
        Value::Text(json(&i.run_params)),
        i.agent.as_ref().map(json).into(),
        i.link_local_ipv6.map(|a| a.to_string()).into(),
        Value::Text(json(&i.tags)),
        Value::Int(i64::from(i.metadata_tags)),
        Value::Text(json(&i.maintenance)),
    ]
}

/// An instance from a row of [`select_list`]. It has no secret parameters.
pub(crate) fn decode(r: &Row) -> Result<Instance, StoreError> {
    let de = |what: &str, i: usize| -> Result<BTreeMap<String, String>, StoreError> {
        serde_json::from_str(&r.text(i)?).map_err(|e| corrupt(what, e))
    };
    let ipv4 = |what: &str, i: usize| -> Result<Option<Ipv4Addr>, StoreError> {
        r.opt_text(i)?
            .map(|v| v.parse().map_err(|e| corrupt(what, e)))
            .transpose()
    };
    let small = |what: &str, i: usize| -> Result<u32, StoreError> {
        u32::try_from(r.int(i)?).map_err(|e| corrupt(what, e))
    };
    let private = de("os_params_private", 19)?;
    let os = match (r.opt_text(16)?, r.opt_text(17)?) {
        (Some(t), _) => Some(Os::Type(t)),
        (None, Some(m)) => Some(Os::Image(m)),
        (None, None) => None,
    };
    Ok(Instance {
        id: uuid("id", &r.text(0)?)?,
        name: r.text(1)?,
        project_id: r.text(2)?,
        hostname: r.text(3)?,
        availability_zone: r.text(4)?,
        launch_index: small("launch_index", 5)?,
        instance_type: r.text(6)?,
        user_data: r.opt_blob(7)?,
        metadata: de("metadata", 8)?,
        public_keys: de("public_keys", 9)?,
        metadata_address: r
            .text(10)?
            .parse::<IpAddr>()
            .map_err(|e| corrupt("metadata_address", e))?,
        mac: r.text(11)?,
        local_ipv4: r
            .opt_text(12)?
            .map(|v| v.parse::<HostAddr>().map_err(|e| corrupt("local_ipv4", e)))
            .transpose()?,
        gateway_ipv4: ipv4("gateway_ipv4", 13)?,
        dns_nameservers: serde_json::from_str(&r.text(14)?)
            .map_err(|e| corrupt("dns_nameservers", e))?,
        public_ipv4: ipv4("public_ipv4", 15)?,
        os,
        os_params: OsParams {
            public: de("os_params_public", 18)?,
            private: private
                .into_iter()
                .map(|(k, v)| (k, Secret::new(v)))
                .collect(),
            secret: BTreeMap::new(),
        },
        imds_tokens: r
            .text(20)?
            .parse::<ImdsTokens>()
            .map_err(|e| corrupt("imds_tokens", e))?,
        state: r
            .text(21)?
            .parse::<State>()
            .map_err(|e| corrupt("state", e))?,
        created_at: parse_ts(&r.text(22)?)?,
        updated_at: parse_ts(&r.text(23)?)?,
        random_seed: r.blob(24)?,
        password: r.opt_text(25)?,
        files: parse_files(&r.text(26)?)?,
        boot_roles: serde_json::from_str(&r.text(27)?).map_err(|e| corrupt("boot_roles", e))?,
        state_reason: r.opt_text(28)?,
        local_ipv6: r
            .opt_text(29)?
            .map(|v| v.parse().map_err(|e| corrupt("local_ipv6", e)))
            .transpose()?,
        interface: r.opt_text(30)?,
        personalization_url: r.opt_text(31)?,
        personalization_sha256: r.opt_text(32)?,
        disks: serde_json::from_str(&r.text(33)?).map_err(|e| corrupt("disks", e))?,
        memory_mib: small("memory_mib", 34)?,
        vcpus: small("vcpus", 35)?,
        install_params: serde_json::from_str(&r.text(36)?)
            .map_err(|e| corrupt("install_params", e))?,
        host: r.text(37)?,
        stored_secret_names: serde_json::from_str(&r.text(38)?)
            .map_err(|e| corrupt("secret_names", e))?,
        run_params: serde_json::from_str(&r.text(39)?).map_err(|e| corrupt("run_params", e))?,
        agent: r
            .opt_text(40)?
            .map(|a| serde_json::from_str(&a).map_err(|e| corrupt("agent", e)))
            .transpose()?,
        link_local_ipv6: r
            .opt_text(41)?
            .map(|v| v.parse().map_err(|e| corrupt("link_local_ipv6", e)))
            .transpose()?,
        tags: de("tags", 42)?,
        metadata_tags: r.int(43)? != 0,
        maintenance: serde_json::from_str(&r.text(44)?).map_err(|e| corrupt("maintenance", e))?,
        version: r.int(45)?,
    })
}
