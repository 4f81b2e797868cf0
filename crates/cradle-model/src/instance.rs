//! The instance: what cradle knows about one guest.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use time::OffsetDateTime;
use uuid::Uuid;

use crate::Secret;

/// Largest user-data accepted, in bytes (decoded), as EC2 and Nova allow.
pub const MAX_USER_DATA: usize = 64 * 1024;
/// Bytes of the per-instance random seed served as OpenStack `random_seed`.
pub const RANDOM_SEED_LEN: usize = 512;
/// Largest password a guest may post, in bytes (Nova's limit).
pub const MAX_PASSWORD: usize = 1020;

/// One guest, as held in memory by the registry.
///
/// `os_params.secret` lives only here, never in a store; everything else is
/// persistent.
#[derive(Debug, Clone)]
pub struct Instance {
    pub id: Uuid,
    pub name: String,
    pub project_id: String,
    /// The cluster host that serves it: its metadata, its firewall and its
    /// VM live there.
    pub host: String,
    /// The store's change version of this state: every stored change takes
    /// a higher one, so hosts can tell a newer copy from an older (0 until
    /// stored).
    pub version: i64,
    /// The names (never the values) of the secret parameters its host held
    /// when it was last stored: what a host that restarts has lost.
    pub stored_secret_names: Vec<String>,
    pub hostname: String,
    pub availability_zone: String,
    pub launch_index: u32,
    pub instance_type: String,
    pub user_data: Option<Vec<u8>>,
    pub metadata: BTreeMap<String, String>,
    pub public_keys: BTreeMap<String, String>,
    /// Files injected into the guest (Nova's personality files): guest path
    /// to contents. Served as `openstack/content/NNNN`, in path order.
    pub files: BTreeMap<String, Vec<u8>>,
    /// The source address the guest's metadata requests come from. Unique.
    pub metadata_address: IpAddr,
    /// Lower-case, colon-separated.
    pub mac: String,
    pub local_ipv4: Option<HostAddr>,
    /// The guest's IPv6 address, if it has one.
    pub local_ipv6: Option<Ipv6Addr>,
    /// Its IPv6 link-local address when that is not the one its mac gives
    /// (RFC 7217 stable privacy): anti-spoofing lets it through too.
    pub link_local_ipv6: Option<Ipv6Addr>,
    /// Its network interface on the host (its tap, or the host end of a
    /// veth): where the firewall meets its traffic. Unset: not enforced.
    pub interface: Option<String>,
    pub gateway_ipv4: Option<Ipv4Addr>,
    pub dns_nameservers: Vec<IpAddr>,
    pub public_ipv4: Option<Ipv4Addr>,
    pub os: Option<Os>,
    /// Where its personalization package comes from (http, https or file;
    /// `.tar.gz` or `.tgz`). Credentials are never part of it: they are the
    /// secret parameters named in [`crate::personalization`].
    pub personalization_url: Option<String>,
    /// The package's SHA-256 (lower-case hex), when its content is pinned.
    pub personalization_sha256: Option<String>,
    pub os_params: OsParams,
    /// Its disks, in order (`vda`, `vdb`, …; `DISK_0_PATH`, …).
    pub disks: Vec<crate::machine::Disk>,
    pub memory_mib: u32,
    pub vcpus: u32,
    /// What a `self_install` boots with (stored apart from the run setup).
    pub install_params: crate::machine::InstallParams,
    /// How its own VM runs: the communication NIC, a kernel booted directly.
    pub run_params: crate::machine::RunParams,
    /// What its guest agent last reported (state, versions, host keys).
    pub agent: Option<crate::agent::AgentRecord>,
    pub imds_tokens: ImdsTokens,
    pub state: State,
    /// Why the instance is in `State::Error` (e.g. a fatal vendordata failure).
    pub state_reason: Option<String>,
    /// The roles of whoever created the instance, fixed at creation: sent to
    /// vendordata targets as `boot-roles`, unchanged when that caller's roles
    /// change later.
    pub boot_roles: Vec<String>,
    pub created_at: OffsetDateTime,
    pub updated_at: OffsetDateTime,
    /// Fixed per instance so that every read (and a config drive) agrees.
    pub random_seed: Vec<u8>,
    /// Set once by the guest (already encrypted by it, as Nova's is).
    pub password: Option<String>,
    /// Tags (EC2's), key to value; see [`crate::tags`].
    pub tags: BTreeMap<String, String>,
    /// Whether the guest reads its tags at `meta-data/tags/instance/`.
    pub metadata_tags: bool,
    /// Its maintenance events, in scheduling order; see [`crate::maintenance`].
    pub maintenance: Vec<crate::maintenance::MaintenanceEvent>,
}

impl Instance {
    /// EC2-style instance id derived from the UUID: `i-` and 17 hex digits.
    pub fn ec2_instance_id(&self) -> String {
        format!("i-{}", &self.id.simple().to_string()[..17])
    }

    /// EC2-style reservation id, stable per instance.
    pub fn ec2_reservation_id(&self) -> String {
        format!("r-{}", &self.id.simple().to_string()[15..32])
    }

    /// EC2 `ami-id`: the image when it is named like an AMI, else zeros.
    pub fn ami_id(&self) -> String {
        match &self.os {
            Some(Os::Image(image)) if image.starts_with("ami-") => image.clone(),
            _ => "ami-00000000".to_string(),
        }
    }

    /// The region EC2 clients derive from the zone: the zone less its last letter.
    pub fn region(&self) -> &str {
        let az = self.availability_zone.as_str();
        match az.chars().last() {
            Some(c) if c.is_ascii_lowercase() && az.len() > 1 && az.contains('-') => {
                &az[..az.len() - 1]
            }
            _ => az,
        }
    }
}

/// The first free link-local address for a guest's metadata channel, as
/// Ganeti's communication NIC gives each instance one: from 169.254.1.1 up
/// to 169.254.254.254 (RFC 3927's usable range), skipping every `.0` and
/// `.255` and all of 169.254.169.0/24, where clouds put their services
/// (169.254.169.254 is the metadata service itself). `None` when every
/// address is taken.
pub fn allocate_link_local(taken: impl Fn(Ipv4Addr) -> bool) -> Option<Ipv4Addr> {
    (1u8..=254)
        .filter(|third| *third != 169)
        .flat_map(|third| (1u8..=254).map(move |fourth| Ipv4Addr::new(169, 254, third, fourth)))
        .find(|a| !taken(*a))
}

/// Whether `name` is acceptable as an instance's host interface: what Linux
/// allows (1 to 15 bytes, no `/`, `:` or whitespace) narrowed to letters,
/// digits, `-`, `_` and `.`, so that nothing in it means something to nft
/// (a leading `@` names a set, a trailing `*` is a wildcard).
pub fn is_interface_name(name: &str) -> bool {
    (1..=15).contains(&name.len())
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// How the guest's operating system is defined: an OS definition or an image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Os {
    Type(String),
    Image(String),
}

/// OS parameters in the three visibilities of Ganeti's design.
///
/// - public: stored, logged, shown.
/// - private: stored; never logged; the admin API shows key names only.
/// - secret: memory only; gone on removal or restart.
#[derive(Debug, Clone, Default)]
pub struct OsParams {
    pub public: BTreeMap<String, String>,
    pub private: BTreeMap<String, Secret<String>>,
    pub secret: BTreeMap<String, Secret<String>>,
}

/// Where a parameter may go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Visibility {
    Public,
    Private,
    Secret,
}

impl Visibility {
    pub fn as_str(self) -> &'static str {
        match self {
            Visibility::Public => "public",
            Visibility::Private => "private",
            Visibility::Secret => "secret",
        }
    }
}

/// Which of this guest's reads need an EC2 IMDSv2 session token. The
/// native namespace is ruled apart (it takes a token or the
/// `Metadata-Flavor: cradle` header whatever this says); see the table in
/// docs/metadata-api.md.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ImdsTokens {
    /// No read needs a token; a token that is sent must be good.
    #[default]
    Optional,
    /// EC2 paths need a token, as on an EC2 instance set to IMDSv2 only.
    /// OpenStack paths do not: no OpenStack client sends one.
    Required,
    /// EC2 and OpenStack paths need a token: for guests whose every
    /// metadata client speaks IMDSv2.
    Strict,
}

impl ImdsTokens {
    pub const NAMES: &'static [&'static str] = &["optional", "required", "strict"];

    pub fn as_str(self) -> &'static str {
        match self {
            ImdsTokens::Optional => "optional",
            ImdsTokens::Required => "required",
            ImdsTokens::Strict => "strict",
        }
    }
}

impl FromStr for ImdsTokens {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "optional" => Ok(ImdsTokens::Optional),
            "required" => Ok(ImdsTokens::Required),
            "strict" => Ok(ImdsTokens::Strict),
            other => Err(format!(
                "imds_tokens must be optional, required or strict, not {other:?}"
            )),
        }
    }
}

/// Lifecycle state. Later capabilities (install, run) move instances through it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// Known to cradle; its metadata is served.
    #[default]
    Registered,
    Installing,
    Running,
    Stopped,
    Error,
    /// Its last install job failed (`state_reason` says why), or an
    /// import that had begun writing its disk did.
    InstallFailed,
    /// Its OS's `export` runs (`cradle instance export`).
    Exporting,
    /// Its OS's `import` runs (`cradle instance import`).
    Importing,
    /// Its OS's `rename` runs (`cradle instance rename`).
    Renaming,
}

impl State {
    /// Whether an OS job (install, export, import, rename) runs on the
    /// instance: nothing else may start, stop or move it meanwhile.
    pub fn is_busy(self) -> bool {
        matches!(
            self,
            State::Installing | State::Exporting | State::Importing | State::Renaming
        )
    }

    /// What the instance is busy with, for a refusal: "being installed".
    pub fn busy_with(self) -> &'static str {
        match self {
            State::Exporting => "being exported",
            State::Importing => "being imported",
            State::Renaming => "being renamed",
            _ => "being installed",
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            State::Registered => "registered",
            State::Installing => "installing",
            State::Running => "running",
            State::Stopped => "stopped",
            State::Error => "error",
            State::InstallFailed => "install_failed",
            State::Exporting => "exporting",
            State::Importing => "importing",
            State::Renaming => "renaming",
        }
    }
}

impl FromStr for State {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        serde_json::from_value(serde_json::Value::String(s.to_string()))
            .map_err(|_| format!("unknown state {s:?}"))
    }
}

/// An IPv4 address with an optional prefix length: `10.0.0.5` or `10.0.0.5/24`.
///
/// Without a prefix the guest's network is described as DHCP-configured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostAddr {
    pub addr: Ipv4Addr,
    pub prefix: Option<u8>,
}

impl HostAddr {
    /// Dotted netmask for the prefix, when there is one.
    pub fn netmask(&self) -> Option<Ipv4Addr> {
        self.prefix.map(|p| {
            let bits = if p == 0 {
                0
            } else {
                u32::MAX << (32 - u32::from(p))
            };
            Ipv4Addr::from(bits)
        })
    }
}

impl FromStr for HostAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => {
                let p: u8 = p
                    .parse()
                    .ok()
                    .filter(|p| *p <= 32)
                    .ok_or_else(|| format!("{s:?}: prefix length must be 0..=32"))?;
                (a, Some(p))
            }
            None => (s, None),
        };
        let addr = addr
            .parse()
            .map_err(|_| format!("{s:?} is not an IPv4 address"))?;
        Ok(HostAddr { addr, prefix })
    }
}

impl fmt::Display for HostAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.prefix {
            Some(p) => write!(f, "{}/{}", self.addr, p),
            None => write!(f, "{}", self.addr),
        }
    }
}

impl Serialize for HostAddr {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for HostAddr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_local_allocation_skips_services_and_edges() {
        assert_eq!(
            allocate_link_local(|_| false),
            Some(Ipv4Addr::new(169, 254, 1, 1))
        );
        let first_free_after = |n: u32| {
            allocate_link_local(|a| {
                let o = a.octets();
                u32::from(o[2] - 1) * 254 + u32::from(o[3] - 1) < n
            })
        };
        assert_eq!(first_free_after(254), Some(Ipv4Addr::new(169, 254, 2, 1)));
        // 168 full /24s, then 169.254.169.0/24 is skipped.
        assert_eq!(
            first_free_after(168 * 254),
            Some(Ipv4Addr::new(169, 254, 170, 1))
        );
        assert_eq!(allocate_link_local(|_| true), None);
        let all = (1u8..=254).filter(|t| *t != 169).count() * 254;
        assert_eq!(all, 64262);
    }
}
