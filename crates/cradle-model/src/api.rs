//! What crosses the admin API: the create and modify requests, the view
//! returned for an instance, and channel messages. Validation lives beside the
//! request types, so every caller gets the same rules and the same messages.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use serde::{Deserialize, Deserializer, Serialize};
use time::OffsetDateTime;
use uuid::Uuid;

use crate::instance::{
    HostAddr, ImdsTokens, Instance, MAX_USER_DATA, Os, OsParams, RANDOM_SEED_LEN, State,
};
use crate::machine::{self, Disk, InstallParams, RunKernel, RunParams};
use crate::{Secret, personalization};

mod check;
use check::*;
pub use check::{check_openssh_key, parse_host_name, parse_mac, parse_metadata_address};

/// Limits, as Nova applies them to instance metadata.
pub const MAX_METADATA_ITEMS: usize = 128;
pub const MAX_METADATA_KEY: usize = 255;
pub const MAX_METADATA_VALUE: usize = 255;
pub const MAX_PUBLIC_KEYS: usize = 32;
pub const MAX_OS_PARAMS: usize = 256;
pub const MAX_OS_PARAM_VALUE: usize = 64 * 1024;
/// Injected files: how many, how long a guest path, how large each.
pub const MAX_FILES: usize = 16;
pub const MAX_FILE_PATH: usize = 255;
pub const MAX_FILE_BYTES: usize = 64 * 1024;

/// A request that is well-formed JSON but says something cradle refuses.
/// The message names the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct Invalid {
    pub field: String,
    pub message: String,
}

fn invalid<T>(field: impl Into<String>, message: impl Into<String>) -> Result<T, Invalid> {
    Err(Invalid {
        field: field.into(),
        message: message.into(),
    })
}

/// `POST /v1/instances`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct InstanceSpec {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub project_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub availability_zone: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub launch_index: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance_type: Option<String>,
    /// Base64 of the raw user-data.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_data: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub public_keys: BTreeMap<String, String>,
    /// Injected files: absolute guest path to base64 contents.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub files: BTreeMap<String, String>,
    /// Left out: cradle allocates a link-local address
    /// ([`crate::allocate_link_local`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata_address: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local_ipv4: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local_ipv6: Option<String>,
    /// Its link-local IPv6 address (fe80::/10), when it is not the EUI-64
    /// one of its mac (RFC 7217 stable privacy), for anti-spoofing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link_local_ipv6: Option<String>,
    /// The guest's interface on the host, for the firewall.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway_ipv4: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dns_nameservers: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_ipv4: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub os_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub os_image: Option<String>,
    /// The personalization package's URL (http, https or file; .tar.gz or .tgz).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub personalization_url: Option<String>,
    /// Pins the package's content (64 hex digits).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub personalization_sha256: Option<String>,
    /// Never serialized: `Secret` would print `<redacted>` for the values
    /// anyway. The typed client writes them out in its request body, the
    /// one place they must go.
    #[serde(default, skip_serializing_if = "never")]
    pub os_params: OsParamsSpec,
    /// Disk images on this host, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disks: Vec<Disk>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mib: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vcpus: Option<u32>,
    /// What a `self_install` boots with (on PATCH: replaces the whole set).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub install_params: Option<InstallParams>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub imds_tokens: Option<ImdsTokens>,
    /// How its own VM runs: the communication NIC, a kernel booted directly.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_params: Option<RunParams>,
    /// The host that serves it (its metadata, its firewall, its VM). Left
    /// out: the host whose admin API registers it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// Tags (EC2's): at most 50, keys up to 128 characters, values up to 256.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tags: BTreeMap<String, String>,
    /// Serve the tags to the guest at `meta-data/tags/instance/` [default: off].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata_tags: Option<bool>,
}

/// OS parameters as given on create: values in each visibility.
#[derive(Debug, Clone, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct OsParamsSpec {
    #[serde(default)]
    pub public: BTreeMap<String, String>,
    #[serde(default)]
    #[schema(value_type = BTreeMap<String, String>)]
    pub private: BTreeMap<String, Secret<String>>,
    #[serde(default)]
    #[schema(value_type = BTreeMap<String, String>)]
    pub secret: BTreeMap<String, Secret<String>>,
}

/// A field of a PATCH: left out, set to `null` (cleared), or given a value.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Patch<T> {
    #[default]
    Absent,
    Null,
    Value(T),
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Patch<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(match Option::<T>::deserialize(d)? {
            None => Patch::Null,
            Some(v) => Patch::Value(v),
        })
    }
}

impl<T: Serialize> Serialize for Patch<T> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Patch::Value(v) => v.serialize(s),
            _ => s.serialize_none(),
        }
    }
}

impl<T> Patch<T> {
    pub fn is_absent(&self) -> bool {
        matches!(self, Patch::Absent)
    }
}

/// For `skip_serializing_if` on fields that are never written out (so
/// that they still show in the OpenAPI schema, unlike `skip_serializing`).
fn never<T>(_: &T) -> bool {
    true
}

/// The project of an instance registered without one.
pub const DEFAULT_PROJECT: &str = "default";

/// `PATCH /v1/instances/{id}`. Scalars replace; maps merge as in RFC 7396
/// (a key set to `null` is removed); a nullable field set to `null` is cleared.
#[derive(Debug, Clone, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct InstancePatch {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub project_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub availability_zone: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub launch_index: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance_type: Option<String>,
    #[serde(default, skip_serializing_if = "Patch::is_absent")]
    #[schema(value_type = Option<String>)]
    pub user_data: Patch<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, Option<String>>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub public_keys: BTreeMap<String, Option<String>>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub files: BTreeMap<String, Option<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata_address: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    #[serde(default, skip_serializing_if = "Patch::is_absent")]
    #[schema(value_type = Option<String>)]
    pub local_ipv4: Patch<String>,
    #[serde(default, skip_serializing_if = "Patch::is_absent")]
    #[schema(value_type = Option<String>)]
    pub local_ipv6: Patch<String>,
    #[serde(default, skip_serializing_if = "Patch::is_absent")]
    #[schema(value_type = Option<String>)]
    pub link_local_ipv6: Patch<String>,
    #[serde(default, skip_serializing_if = "Patch::is_absent")]
    #[schema(value_type = Option<String>)]
    pub interface: Patch<String>,
    #[serde(default, skip_serializing_if = "Patch::is_absent")]
    #[schema(value_type = Option<String>)]
    pub gateway_ipv4: Patch<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns_nameservers: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Patch::is_absent")]
    #[schema(value_type = Option<String>)]
    pub public_ipv4: Patch<String>,
    #[serde(default, skip_serializing_if = "Patch::is_absent")]
    #[schema(value_type = Option<String>)]
    pub os_type: Patch<String>,
    #[serde(default, skip_serializing_if = "Patch::is_absent")]
    #[schema(value_type = Option<String>)]
    pub os_image: Patch<String>,
    /// Changing the URL drops the old pin unless this patch sets one.
    #[serde(default, skip_serializing_if = "Patch::is_absent")]
    #[schema(value_type = Option<String>)]
    pub personalization_url: Patch<String>,
    #[serde(default, skip_serializing_if = "Patch::is_absent")]
    #[schema(value_type = Option<String>)]
    pub personalization_sha256: Patch<String>,
    /// Never serialized, as [`InstanceSpec::os_params`].
    #[serde(default, skip_serializing_if = "never")]
    pub os_params: OsParamsPatch,
    /// Replaces the whole list.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disks: Option<Vec<Disk>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mib: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vcpus: Option<u32>,
    /// What a `self_install` boots with (on PATCH: replaces the whole set).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub install_params: Option<InstallParams>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub imds_tokens: Option<ImdsTokens>,
    /// Turn the communication NIC on or off in run mode (used from the
    /// next start).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub communication: Option<bool>,
    /// The kernel run mode boots directly; `null` boots from the disks.
    #[serde(default, skip_serializing_if = "Patch::is_absent")]
    #[schema(value_type = Option<RunKernel>)]
    pub run_kernel: Patch<RunKernel>,
    /// Tags to set; a tag set to `null` is removed.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tags: BTreeMap<String, Option<String>>,
    /// Serve the tags to the guest at `meta-data/tags/instance/`, or stop.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata_tags: Option<bool>,
}

/// OS parameter changes: per visibility, a key set to `null` is removed.
#[derive(Debug, Clone, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct OsParamsPatch {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub public: BTreeMap<String, Option<String>>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schema(value_type = BTreeMap<String, Option<String>>)]
    pub private: BTreeMap<String, Option<Secret<String>>>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schema(value_type = BTreeMap<String, Option<String>>)]
    pub secret: BTreeMap<String, Option<Secret<String>>>,
}

/// An instance as the admin API shows it: private and secret parameters by
/// key name only.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct InstanceView {
    pub id: Uuid,
    pub name: String,
    pub project_id: String,
    /// The cluster host that serves it.
    #[serde(default)]
    pub host: String,
    pub hostname: String,
    pub availability_zone: String,
    pub launch_index: u32,
    pub instance_type: String,
    pub user_data: Option<String>,
    pub metadata: BTreeMap<String, String>,
    pub public_keys: BTreeMap<String, String>,
    /// Guest path to base64 contents.
    #[serde(default)]
    pub files: BTreeMap<String, String>,
    #[schema(value_type = String)]
    pub metadata_address: IpAddr,
    pub mac: String,
    #[schema(value_type = Option<String>)]
    pub local_ipv4: Option<HostAddr>,
    #[serde(default)]
    #[schema(value_type = Option<String>)]
    pub local_ipv6: Option<Ipv6Addr>,
    #[serde(default)]
    #[schema(value_type = Option<String>)]
    pub link_local_ipv6: Option<Ipv6Addr>,
    #[serde(default)]
    pub interface: Option<String>,
    #[schema(value_type = Option<String>)]
    pub gateway_ipv4: Option<Ipv4Addr>,
    #[schema(value_type = Vec<String>)]
    pub dns_nameservers: Vec<IpAddr>,
    #[schema(value_type = Option<String>)]
    pub public_ipv4: Option<Ipv4Addr>,
    pub os_type: Option<String>,
    pub os_image: Option<String>,
    #[serde(default)]
    pub personalization_url: Option<String>,
    #[serde(default)]
    pub personalization_sha256: Option<String>,
    pub os_params: OsParamsView,
    #[serde(default)]
    pub disks: Vec<Disk>,
    #[serde(default = "default_memory")]
    pub memory_mib: u32,
    #[serde(default = "default_vcpus")]
    pub vcpus: u32,
    #[serde(default)]
    pub install_params: InstallParams,
    #[serde(default)]
    pub run_params: RunParams,
    pub imds_tokens: ImdsTokens,
    pub state: State,
    /// Why the instance is in state `error`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state_reason: Option<String>,
    /// The creator's roles at creation, sent to vendordata targets.
    #[serde(default)]
    pub boot_roles: Vec<String>,
    pub password_set: bool,
    /// The guest agent, once it has reported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<crate::agent::AgentView>,
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
    /// Whether the guest reads its tags as metadata.
    #[serde(default)]
    pub metadata_tags: bool,
    /// Its maintenance events, pending and recent, in scheduling order.
    #[serde(default)]
    pub maintenance: Vec<crate::maintenance::MaintenanceEvent>,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub updated_at: OffsetDateTime,
}

fn default_memory() -> u32 {
    crate::machine::DEFAULT_MEMORY_MIB
}

fn default_vcpus() -> u32 {
    1
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct OsParamsView {
    pub public: BTreeMap<String, String>,
    pub private: Vec<String>,
    pub secret: Vec<String>,
}

impl From<&Instance> for InstanceView {
    fn from(i: &Instance) -> Self {
        let (os_type, os_image) = match &i.os {
            Some(Os::Type(t)) => (Some(t.clone()), None),
            Some(Os::Image(m)) => (None, Some(m.clone())),
            None => (None, None),
        };
        InstanceView {
            id: i.id,
            name: i.name.clone(),
            project_id: i.project_id.clone(),
            host: i.host.clone(),
            hostname: i.hostname.clone(),
            availability_zone: i.availability_zone.clone(),
            launch_index: i.launch_index,
            instance_type: i.instance_type.clone(),
            user_data: i.user_data.as_ref().map(|u| B64.encode(u)),
            metadata: i.metadata.clone(),
            public_keys: i.public_keys.clone(),
            files: i
                .files
                .iter()
                .map(|(p, c)| (p.clone(), B64.encode(c)))
                .collect(),
            metadata_address: i.metadata_address,
            mac: i.mac.clone(),
            local_ipv4: i.local_ipv4,
            local_ipv6: i.local_ipv6,
            link_local_ipv6: i.link_local_ipv6,
            interface: i.interface.clone(),
            gateway_ipv4: i.gateway_ipv4,
            dns_nameservers: i.dns_nameservers.clone(),
            public_ipv4: i.public_ipv4,
            os_type,
            os_image,
            personalization_url: i.personalization_url.clone(),
            personalization_sha256: i.personalization_sha256.clone(),
            os_params: OsParamsView {
                public: i.os_params.public.clone(),
                private: i.os_params.private.keys().cloned().collect(),
                secret: i.os_params.secret.keys().cloned().collect(),
            },
            disks: i.disks.clone(),
            memory_mib: i.memory_mib,
            vcpus: i.vcpus,
            install_params: i.install_params.clone(),
            run_params: i.run_params.clone(),
            imds_tokens: i.imds_tokens,
            state: i.state,
            state_reason: i.state_reason.clone(),
            boot_roles: i.boot_roles.clone(),
            password_set: i.password.is_some(),
            agent: i.agent.as_ref().map(crate::agent::AgentView::of),
            tags: i.tags.clone(),
            metadata_tags: i.metadata_tags,
            maintenance: i.maintenance.clone(),
            created_at: i.created_at,
            updated_at: i.updated_at,
        }
    }
}

/// The admin API's error body: `{"error": {"code": ..., "message": ...}}`.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ErrorDetail {
    pub code: String,
    pub message: String,
}

/// `POST /v1/instances/{id}/messages`: exactly one of `text` or `data` (base64).
#[derive(Debug, Clone, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MessageIn {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<String>,
}

impl MessageIn {
    pub fn into_bytes(self) -> Result<Vec<u8>, Invalid> {
        match (self.text, self.data) {
            (Some(t), None) => Ok(t.into_bytes()),
            (None, Some(d)) => B64
                .decode(d.as_bytes())
                .or_else(|_| invalid("data", "is not valid base64")),
            _ => invalid(
                "message",
                "give exactly one of \"text\" or \"data\" (base64)",
            ),
        }
    }
}

/// A message drained from the guest → host queue.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct MessageView {
    pub id: i64,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    /// Base64 of the bytes the guest wrote.
    pub data: String,
    /// The same bytes when they are UTF-8.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
}

impl InstanceSpec {
    /// Validate everything, then build the instance. Nothing is half-applied:
    /// either every field is good or the first bad one is named.
    pub fn into_instance(
        self,
        id: Uuid,
        now: OffsetDateTime,
        random_seed: Vec<u8>,
    ) -> Result<Instance, Invalid> {
        check_name(&self.name)?;
        let project_id = self
            .project_id
            .unwrap_or_else(|| DEFAULT_PROJECT.to_string());
        check_text("project_id", &project_id, 255)?;
        let host = match self.host {
            Some(h) => parse_host_name("host", &h)?,
            // The registry places it on its own host.
            None => String::new(),
        };
        let hostname = match &self.hostname {
            Some(h) => parse_hostname(h)?,
            None => hostname_from_name(&self.name, id),
        };
        let availability_zone = self.availability_zone.unwrap_or_else(|| "nova".to_string());
        check_text("availability_zone", &availability_zone, 255)?;
        let instance_type = self.instance_type.unwrap_or_else(|| "default".to_string());
        check_text("instance_type", &instance_type, 255)?;
        let user_data = self.user_data.as_deref().map(parse_user_data).transpose()?;
        check_metadata(&self.metadata)?;
        check_public_keys(&self.public_keys)?;
        let files = parse_files(&self.files)?;
        let Some(metadata_address) = self.metadata_address.as_deref() else {
            return invalid(
                "metadata_address",
                "is required here (the registry allocates one when it is left out)",
            );
        };
        let metadata_address = parse_metadata_address(metadata_address)?;
        let mac = match &self.mac {
            Some(m) => parse_mac(m)?,
            None => mac_from_id(id),
        };
        let local_ipv4 = self
            .local_ipv4
            .as_deref()
            .map(parse_host_addr)
            .transpose()?;
        let local_ipv6 = self.local_ipv6.as_deref().map(parse_ipv6).transpose()?;
        let link_local_ipv6 = self
            .link_local_ipv6
            .as_deref()
            .map(parse_link_local)
            .transpose()?;
        let interface = self.interface.as_deref().map(parse_interface).transpose()?;
        let gateway_ipv4 = self
            .gateway_ipv4
            .as_deref()
            .map(|g| parse_ipv4("gateway_ipv4", g))
            .transpose()?;
        let dns_nameservers = parse_dns(&self.dns_nameservers)?;
        let public_ipv4 = self
            .public_ipv4
            .as_deref()
            .map(|g| parse_ipv4("public_ipv4", g))
            .transpose()?;
        let os = resolve_os(self.os_type, self.os_image)?;
        let os_params = OsParams {
            public: self.os_params.public,
            private: self.os_params.private,
            secret: self.os_params.secret,
        };
        check_params(&os_params)?;
        let (personalization_url, personalization_sha256) =
            parse_personalization(self.personalization_url, self.personalization_sha256)?;
        machine::check_disks(&self.disks).or_else(|m| invalid("disks", m))?;
        let memory_mib = self.memory_mib.unwrap_or(machine::DEFAULT_MEMORY_MIB);
        machine::check_memory(memory_mib).or_else(|m| invalid("memory_mib", m))?;
        let vcpus = self.vcpus.unwrap_or(1);
        machine::check_vcpus(vcpus).or_else(|m| invalid("vcpus", m))?;
        let install_params = self.install_params.unwrap_or_default();
        machine::check_install_params(&install_params).or_else(|m| invalid("install_params", m))?;
        let run_params = self.run_params.unwrap_or_default();
        if let Some(k) = &run_params.kernel {
            machine::check_run_kernel(k).or_else(|m| invalid("run_params.kernel", m))?;
        }
        let metadata_tags = self.metadata_tags.unwrap_or(false);
        crate::tags::check_tags(&self.tags, metadata_tags)?;
        if random_seed.len() != RANDOM_SEED_LEN {
            return invalid("random_seed", "internal: wrong length");
        }
        Ok(Instance {
            id,
            name: self.name,
            project_id,
            host,
            version: 0,
            stored_secret_names: Vec::new(),
            hostname,
            availability_zone,
            launch_index: self.launch_index.unwrap_or(0),
            instance_type,
            user_data,
            metadata: self.metadata,
            public_keys: self.public_keys,
            files,
            metadata_address,
            mac,
            local_ipv4,
            local_ipv6,
            link_local_ipv6,
            interface,
            gateway_ipv4,
            dns_nameservers,
            public_ipv4,
            os,
            personalization_url,
            personalization_sha256,
            os_params,
            disks: self.disks,
            memory_mib,
            vcpus,
            install_params,
            run_params,
            agent: None,
            imds_tokens: self.imds_tokens.unwrap_or_default(),
            state: State::Registered,
            state_reason: None,
            boot_roles: Vec::new(),
            created_at: now,
            updated_at: now,
            random_seed,
            password: None,
            tags: self.tags,
            metadata_tags,
            maintenance: Vec::new(),
        })
    }
}

fn merge<V>(map: &mut BTreeMap<String, V>, patch: BTreeMap<String, Option<V>>) {
    for (k, v) in patch {
        match v {
            Some(v) => {
                map.insert(k, v);
            }
            None => {
                map.remove(&k);
            }
        }
    }
}

impl InstancePatch {
    /// Apply to a copy of `current` and validate the result; `current` is not
    /// touched, so a refused patch changes nothing.
    pub fn apply(self, current: &Instance, now: OffsetDateTime) -> Result<Instance, Invalid> {
        let mut i = current.clone();
        if let Some(n) = self.name {
            check_name(&n)?;
            i.name = n;
        }
        if let Some(p) = self.project_id {
            check_text("project_id", &p, 255)?;
            i.project_id = p;
        }
        if let Some(h) = self.hostname {
            i.hostname = parse_hostname(&h)?;
        }
        if let Some(az) = self.availability_zone {
            check_text("availability_zone", &az, 255)?;
            i.availability_zone = az;
        }
        if let Some(li) = self.launch_index {
            i.launch_index = li;
        }
        if let Some(t) = self.instance_type {
            check_text("instance_type", &t, 255)?;
            i.instance_type = t;
        }
        match self.user_data {
            Patch::Absent => {}
            Patch::Null => i.user_data = None,
            Patch::Value(u) => i.user_data = Some(parse_user_data(&u)?),
        }
        merge(&mut i.metadata, self.metadata);
        check_metadata(&i.metadata)?;
        merge(&mut i.public_keys, self.public_keys);
        check_public_keys(&i.public_keys)?;
        if !self.files.is_empty() {
            let mut encoded: BTreeMap<String, String> = i
                .files
                .iter()
                .map(|(p, c)| (p.clone(), B64.encode(c)))
                .collect();
            merge(&mut encoded, self.files);
            i.files = parse_files(&encoded)?;
        }
        if let Some(a) = self.metadata_address {
            i.metadata_address = parse_metadata_address(&a)?;
        }
        if let Some(m) = self.mac {
            i.mac = parse_mac(&m)?;
        }
        match self.local_ipv4 {
            Patch::Absent => {}
            Patch::Null => i.local_ipv4 = None,
            Patch::Value(v) => i.local_ipv4 = Some(parse_host_addr(&v)?),
        }
        match self.local_ipv6 {
            Patch::Absent => {}
            Patch::Null => i.local_ipv6 = None,
            Patch::Value(v) => i.local_ipv6 = Some(parse_ipv6(&v)?),
        }
        match self.link_local_ipv6 {
            Patch::Absent => {}
            Patch::Null => i.link_local_ipv6 = None,
            Patch::Value(v) => i.link_local_ipv6 = Some(parse_link_local(&v)?),
        }
        match self.interface {
            Patch::Absent => {}
            Patch::Null => i.interface = None,
            Patch::Value(v) => i.interface = Some(parse_interface(&v)?),
        }
        match self.gateway_ipv4 {
            Patch::Absent => {}
            Patch::Null => i.gateway_ipv4 = None,
            Patch::Value(v) => i.gateway_ipv4 = Some(parse_ipv4("gateway_ipv4", &v)?),
        }
        if let Some(d) = self.dns_nameservers {
            i.dns_nameservers = parse_dns(&d)?;
        }
        match self.public_ipv4 {
            Patch::Absent => {}
            Patch::Null => i.public_ipv4 = None,
            Patch::Value(v) => i.public_ipv4 = Some(parse_ipv4("public_ipv4", &v)?),
        }
        i.os = match (self.os_type, self.os_image) {
            (Patch::Value(_), Patch::Value(_)) => {
                return invalid("os_type", "os_type and os_image are mutually exclusive");
            }
            (Patch::Value(t), _) => resolve_os(Some(t), None)?,
            (_, Patch::Value(m)) => resolve_os(None, Some(m))?,
            (t, m) => match i.os.take() {
                Some(Os::Type(_)) if t == Patch::Null => None,
                Some(Os::Image(_)) if m == Patch::Null => None,
                other => other,
            },
        };
        let url_changed = !self.personalization_url.is_absent();
        let url = match self.personalization_url {
            Patch::Absent => i.personalization_url.take(),
            Patch::Null => None,
            Patch::Value(u) => Some(u),
        };
        let sha256 = match self.personalization_sha256 {
            Patch::Absent if url_changed => None,
            Patch::Absent => i.personalization_sha256.take(),
            Patch::Null => None,
            Patch::Value(h) => Some(h),
        };
        (i.personalization_url, i.personalization_sha256) = parse_personalization(url, sha256)?;
        if let Some(d) = self.disks {
            machine::check_disks(&d).or_else(|m| invalid("disks", m))?;
            i.disks = d;
        }
        if let Some(m) = self.memory_mib {
            machine::check_memory(m).or_else(|e| invalid("memory_mib", e))?;
            i.memory_mib = m;
        }
        if let Some(v) = self.vcpus {
            machine::check_vcpus(v).or_else(|e| invalid("vcpus", e))?;
            i.vcpus = v;
        }
        if let Some(p) = self.install_params {
            machine::check_install_params(&p).or_else(|e| invalid("install_params", e))?;
            i.install_params = p;
        }
        if let Some(c) = self.communication {
            i.run_params.communication = c;
        }
        match self.run_kernel {
            Patch::Absent => {}
            Patch::Null => i.run_params.kernel = None,
            Patch::Value(k) => {
                machine::check_run_kernel(&k).or_else(|e| invalid("run_kernel", e))?;
                i.run_params.kernel = Some(k);
            }
        }
        // A parameter moves between visibilities by being set in its new one.
        let p = self.os_params;
        for k in p
            .public
            .keys()
            .chain(p.private.keys())
            .chain(p.secret.keys())
        {
            if !p.public.contains_key(k) {
                i.os_params.public.remove(k);
            }
            if !p.private.contains_key(k) {
                i.os_params.private.remove(k);
            }
            if !p.secret.contains_key(k) {
                i.os_params.secret.remove(k);
            }
        }
        merge(&mut i.os_params.public, p.public);
        merge(&mut i.os_params.private, p.private);
        merge(&mut i.os_params.secret, p.secret);
        check_params(&i.os_params)?;
        if let Some(t) = self.imds_tokens {
            i.imds_tokens = t;
        }
        merge(&mut i.tags, self.tags);
        if let Some(m) = self.metadata_tags {
            i.metadata_tags = m;
        }
        crate::tags::check_tags(&i.tags, i.metadata_tags)?;
        i.updated_at = now;
        Ok(i)
    }
}
