//! Security groups, rules and tenant default rules, and their validation.
//!
//! A rule arrives as a [`RuleRequest`] (the native API) or a Trove-style
//! body, and leaves [`RuleRequest::validate`] as a [`RuleSpec`] that can only
//! hold what the enforcement can express: a CIDR with no host bits, a port
//! range inside 1..=65535 for tcp and udp only, an ICMP type and code only
//! for the ICMP of the rule's ethertype.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use uuid::Uuid;

/// A security group. Instance groups (`instance_id` set) are made with their
/// instance and die with it; tenant groups are made and removed by users.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Group {
    pub id: Uuid,
    pub tenant: String,
    pub name: String,
    pub description: String,
    pub instance_id: Option<Uuid>,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
}

/// The name of an instance's own group.
pub fn instance_group_name(instance: Uuid) -> String {
    format!("cradle-sg-{instance}")
}

/// A rule in a group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rule {
    pub id: Uuid,
    pub group_id: Uuid,
    pub spec: RuleSpec,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
}

/// A tenant's default rule: copied into every instance group made for the
/// tenant afterwards.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DefaultRule {
    pub id: Uuid,
    pub tenant: String,
    pub spec: RuleSpec,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// Traffic to the instance; the remote is the source.
    Ingress,
    /// Traffic from the instance; the remote is the destination.
    Egress,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum EtherType {
    IPv4,
    IPv6,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
    Icmp,
    Icmpv6,
    Any,
}

/// What a rule matches beyond protocol and remote.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Match {
    /// Every packet of the protocol.
    All,
    /// Destination ports `from..=to` (tcp, udp).
    Ports { from: u16, to: u16 },
    /// An ICMP type, and optionally a code (icmp, icmpv6).
    Icmp { icmp_type: u8, code: Option<u8> },
}

/// Where the other end of the traffic is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Remote {
    Cidr(IpNet),
    /// The current members of a group (instances attached to it; an
    /// instance group's one member is its instance).
    Group(Uuid),
}

/// A validated rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct RuleSpec {
    pub direction: Direction,
    pub ethertype: EtherType,
    pub protocol: Protocol,
    #[serde(rename = "match")]
    pub matches: Match,
    pub remote: Remote,
}

/// A bad rule or group: the field and what is wrong with it. Answered as 400.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct Invalid {
    pub field: String,
    pub message: String,
}

fn invalid<T>(field: &str, message: impl Into<String>) -> Result<T, Invalid> {
    Err(Invalid {
        field: field.to_string(),
        message: message.into(),
    })
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Direction::Ingress => "ingress",
            Direction::Egress => "egress",
        })
    }
}

impl fmt::Display for EtherType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            EtherType::IPv4 => "IPv4",
            EtherType::IPv6 => "IPv6",
        })
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Icmp => "icmp",
            Protocol::Icmpv6 => "icmpv6",
            Protocol::Any => "any",
        })
    }
}

impl FromStr for Direction {
    type Err = Invalid;
    fn from_str(s: &str) -> Result<Self, Invalid> {
        match s.to_ascii_lowercase().as_str() {
            "ingress" => Ok(Direction::Ingress),
            "egress" => Ok(Direction::Egress),
            _ => invalid("direction", format!("{s:?} is not ingress or egress")),
        }
    }
}

impl FromStr for EtherType {
    type Err = Invalid;
    fn from_str(s: &str) -> Result<Self, Invalid> {
        match s.to_ascii_lowercase().as_str() {
            "ipv4" => Ok(EtherType::IPv4),
            "ipv6" => Ok(EtherType::IPv6),
            _ => invalid("ethertype", format!("{s:?} is not IPv4 or IPv6")),
        }
    }
}

impl FromStr for Protocol {
    type Err = Invalid;
    fn from_str(s: &str) -> Result<Self, Invalid> {
        match s.to_ascii_lowercase().as_str() {
            "tcp" => Ok(Protocol::Tcp),
            "udp" => Ok(Protocol::Udp),
            "icmp" => Ok(Protocol::Icmp),
            "icmpv6" | "ipv6-icmp" => Ok(Protocol::Icmpv6),
            "any" | "all" => Ok(Protocol::Any),
            _ => invalid(
                "protocol",
                format!("unknown protocol {s:?}; use tcp, udp, icmp, icmpv6 or any"),
            ),
        }
    }
}

/// Parse a CIDR, refusing host bits (`10.0.0.1/24`) rather than guessing.
/// A bare address is a /32 (or /128).
pub fn parse_cidr(s: &str) -> Result<IpNet, Invalid> {
    let net = if s.contains('/') {
        IpNet::from_str(s).map_err(|_| Invalid {
            field: "cidr".into(),
            message: format!("{s:?} is not a CIDR such as 10.0.0.0/24 or 2001:db8::/64"),
        })?
    } else {
        let addr = IpAddr::from_str(s).map_err(|_| Invalid {
            field: "cidr".into(),
            message: format!("{s:?} is not a CIDR such as 10.0.0.0/24 or 2001:db8::/64"),
        })?;
        IpNet::from(addr)
    };
    if net.trunc() != net {
        return invalid(
            "cidr",
            format!("{s:?} has host bits set; the network is {}", net.trunc()),
        );
    }
    Ok(net)
}

/// A rule as the native API takes it. Numbers are wide so that an out-of-range
/// value gets a message about its range, not about JSON.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RuleRequest {
    #[serde(default)]
    pub direction: Option<String>,
    #[serde(default)]
    pub ethertype: Option<String>,
    #[serde(default)]
    pub protocol: Option<String>,
    #[serde(default)]
    pub from_port: Option<i64>,
    #[serde(default)]
    pub to_port: Option<i64>,
    #[serde(default)]
    pub icmp_type: Option<i64>,
    #[serde(default)]
    pub icmp_code: Option<i64>,
    #[serde(default)]
    pub cidr: Option<String>,
    #[serde(default)]
    pub remote_group_id: Option<String>,
}

impl RuleRequest {
    /// Check every field and build the rule. Defaults: ingress, protocol
    /// any, from anywhere; the ethertype follows the CIDR (IPv4 without one).
    /// `remote_group_id` is only parsed here; whether the group exists and
    /// belongs to the tenant is the caller's check.
    pub fn validate(&self) -> Result<RuleSpec, Invalid> {
        let direction = match &self.direction {
            Some(d) => d.parse()?,
            None => Direction::Ingress,
        };
        let protocol = match &self.protocol {
            Some(p) => p.parse()?,
            None => Protocol::Any,
        };
        let cidr = self.cidr.as_deref().map(parse_cidr).transpose()?;
        let remote_group = match &self.remote_group_id {
            Some(g) => Some(Uuid::parse_str(g).map_err(|_| Invalid {
                field: "remote_group_id".into(),
                message: format!("{g:?} is not a group id"),
            })?),
            None => None,
        };
        let ethertype = match (&self.ethertype, cidr) {
            (Some(e), _) => e.parse()?,
            (None, Some(IpNet::V6(_))) => EtherType::IPv6,
            (None, _) if protocol == Protocol::Icmpv6 => EtherType::IPv6,
            (None, _) => EtherType::IPv4,
        };
        let remote = match (cidr, remote_group) {
            (Some(_), Some(_)) => {
                return invalid(
                    "remote_group_id",
                    "give either cidr or remote_group_id, not both",
                );
            }
            (Some(net), None) => {
                let family = match net {
                    IpNet::V4(_) => EtherType::IPv4,
                    IpNet::V6(_) => EtherType::IPv6,
                };
                if family != ethertype {
                    return invalid(
                        "cidr",
                        format!(
                            "{net} is an {family} network but the rule's ethertype is {ethertype}"
                        ),
                    );
                }
                Remote::Cidr(net)
            }
            (None, Some(g)) => Remote::Group(g),
            (None, None) => Remote::Cidr(match ethertype {
                EtherType::IPv4 => "0.0.0.0/0".parse().expect("literal"),
                EtherType::IPv6 => "::/0".parse().expect("literal"),
            }),
        };
        match (protocol, ethertype) {
            (Protocol::Icmp, EtherType::IPv6) => {
                return invalid("protocol", "icmp is for IPv4; use icmpv6 with IPv6");
            }
            (Protocol::Icmpv6, EtherType::IPv4) => {
                return invalid("protocol", "icmpv6 is for IPv6; use icmp with IPv4");
            }
            _ => {}
        }
        let matches = match protocol {
            Protocol::Tcp | Protocol::Udp => {
                self.no_icmp(protocol)?;
                match (self.from_port, self.to_port) {
                    (None, None) => Match::All,
                    (Some(p), None) => {
                        let p = port("from_port", p)?;
                        Match::Ports { from: p, to: p }
                    }
                    (None, Some(p)) => {
                        let p = port("to_port", p)?;
                        Match::Ports { from: p, to: p }
                    }
                    (Some(from), Some(to)) => {
                        let (from, to) = (port("from_port", from)?, port("to_port", to)?);
                        if from > to {
                            return invalid(
                                "to_port",
                                format!(
                                    "the range {from}-{to} is reversed; to_port must be at least from_port"
                                ),
                            );
                        }
                        Match::Ports { from, to }
                    }
                }
            }
            Protocol::Icmp | Protocol::Icmpv6 => {
                if let Some(field) = self.port_field() {
                    return invalid(
                        field,
                        format!("{protocol} has no ports; give icmp_type and icmp_code"),
                    );
                }
                match (self.icmp_type, self.icmp_code) {
                    (None, None) => Match::All,
                    (None, Some(_)) => {
                        return invalid("icmp_code", "an ICMP code needs an icmp_type");
                    }
                    (Some(t), code) => Match::Icmp {
                        icmp_type: icmp("icmp_type", t)?,
                        code: code.map(|c| icmp("icmp_code", c)).transpose()?,
                    },
                }
            }
            Protocol::Any => {
                if let Some(field) = self.port_field() {
                    return invalid(
                        field,
                        "ports need protocol tcp or udp; protocol any has none",
                    );
                }
                self.no_icmp(protocol)?;
                Match::All
            }
        };
        Ok(RuleSpec {
            direction,
            ethertype,
            protocol,
            matches,
            remote,
        })
    }

    /// The port field the request gives, for an error that must name one
    /// the caller actually sent.
    fn port_field(&self) -> Option<&'static str> {
        match (self.from_port, self.to_port) {
            (Some(_), _) => Some("from_port"),
            (None, Some(_)) => Some("to_port"),
            (None, None) => None,
        }
    }

    fn no_icmp(&self, protocol: Protocol) -> Result<(), Invalid> {
        let field = match (self.icmp_type, self.icmp_code) {
            (Some(_), _) => "icmp_type",
            (None, Some(_)) => "icmp_code",
            (None, None) => return Ok(()),
        };
        invalid(
            field,
            format!("icmp_type and icmp_code need protocol icmp or icmpv6, not {protocol}"),
        )
    }
}

fn port(field: &str, p: i64) -> Result<u16, Invalid> {
    match u16::try_from(p) {
        Ok(p) if p >= 1 => Ok(p),
        _ => invalid(field, format!("port {p} is outside 1..65535")),
    }
}

fn icmp(field: &str, v: i64) -> Result<u8, Invalid> {
    u8::try_from(v).or_else(|_| invalid(field, format!("{v} is outside 0..255")))
}

impl RuleSpec {
    /// The inverse of [`RuleRequest::validate`], for views.
    pub fn to_request(&self) -> RuleRequest {
        let (from_port, to_port, icmp_type, icmp_code) = match self.matches {
            Match::All => (None, None, None, None),
            Match::Ports { from, to } => (Some(from.into()), Some(to.into()), None, None),
            Match::Icmp { icmp_type, code } => {
                (None, None, Some(icmp_type.into()), code.map(i64::from))
            }
        };
        let (cidr, remote_group_id) = match self.remote {
            Remote::Cidr(net) => (Some(net.to_string()), None),
            Remote::Group(g) => (None, Some(g.to_string())),
        };
        RuleRequest {
            direction: Some(self.direction.to_string()),
            ethertype: Some(self.ethertype.to_string()),
            protocol: Some(self.protocol.to_string()),
            from_port,
            to_port,
            icmp_type,
            icmp_code,
            cidr,
            remote_group_id,
        }
    }
}

/// Check a group's user-supplied name and description.
pub fn validate_group(name: &str, description: &str) -> Result<(), Invalid> {
    if name.is_empty() || name.len() > 255 {
        return invalid("name", "a group name is 1 to 255 bytes");
    }
    if name.chars().any(char::is_control) {
        return invalid("name", "a group name has no control characters");
    }
    if name.starts_with("cradle-sg-") {
        return invalid(
            "name",
            "names starting with cradle-sg- are kept for instance groups",
        );
    }
    if description.len() > 1024 {
        return invalid("description", "a description is at most 1024 bytes");
    }
    Ok(())
}

/// Check a tenant id as it appears in a URL.
pub fn validate_tenant(tenant: &str) -> Result<(), Invalid> {
    if tenant.is_empty() || tenant.len() > 255 || tenant.chars().any(char::is_control) {
        return invalid(
            "tenant",
            "a tenant id is 1 to 255 bytes with no control characters",
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(v: serde_json::Value) -> RuleRequest {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn defaults_and_errors() {
        let spec = req(serde_json::json!({"protocol": "tcp", "from_port": 22, "to_port": 22, "cidr": "10.0.0.0/8"}))
            .validate()
            .unwrap();
        assert_eq!(spec.direction, Direction::Ingress);
        assert_eq!(spec.ethertype, EtherType::IPv4);
        assert_eq!(spec.matches, Match::Ports { from: 22, to: 22 });
        let spec = req(serde_json::json!({"cidr": "2001:db8::/32"}))
            .validate()
            .unwrap();
        assert_eq!(spec.ethertype, EtherType::IPv6);
        assert_eq!(spec.protocol, Protocol::Any);

        for (body, field) in [
            (serde_json::json!({"cidr": "10.0.0.1/24"}), "cidr"),
            (serde_json::json!({"cidr": "10.0.0/24"}), "cidr"),
            (
                serde_json::json!({"protocol": "tcp", "from_port": 0}),
                "from_port",
            ),
            (
                serde_json::json!({"protocol": "tcp", "from_port": 65536}),
                "from_port",
            ),
            (
                serde_json::json!({"protocol": "tcp", "from_port": 80, "to_port": 22}),
                "to_port",
            ),
            (
                serde_json::json!({"protocol": "icmp", "icmp_type": 256}),
                "icmp_type",
            ),
            (
                serde_json::json!({"protocol": "icmp", "icmp_type": 8, "icmp_code": -1}),
                "icmp_code",
            ),
            (
                serde_json::json!({"protocol": "icmp", "icmp_code": 0}),
                "icmp_code",
            ),
            (serde_json::json!({"protocol": "gre"}), "protocol"),
            (
                serde_json::json!({"protocol": "any", "from_port": 22}),
                "from_port",
            ),
            (
                serde_json::json!({"protocol": "icmp", "from_port": 22}),
                "from_port",
            ),
            (
                serde_json::json!({"protocol": "icmp", "cidr": "::/0"}),
                "protocol",
            ),
            (
                serde_json::json!({"ethertype": "IPv6", "cidr": "10.0.0.0/8"}),
                "cidr",
            ),
            (serde_json::json!({"direction": "sideways"}), "direction"),
            (
                serde_json::json!({"cidr": "10.0.0.0/8", "remote_group_id": Uuid::nil().to_string()}),
                "remote_group_id",
            ),
        ] {
            let err = req(body.clone()).validate().unwrap_err();
            assert_eq!(err.field, field, "{body}: {err}");
        }
    }

    #[test]
    fn round_trip_through_request() {
        for body in [
            serde_json::json!({"protocol": "udp", "from_port": 53, "to_port": 53, "cidr": "192.168.0.0/16", "direction": "egress"}),
            serde_json::json!({"protocol": "icmp", "icmp_type": 8}),
            serde_json::json!({"protocol": "icmpv6", "icmp_type": 128, "icmp_code": 0}),
            serde_json::json!({"remote_group_id": Uuid::new_v4().to_string()}),
        ] {
            let spec = req(body).validate().unwrap();
            assert_eq!(spec.to_request().validate().unwrap(), spec);
        }
    }
}

/// A rule as the APIs show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RuleView {
    pub id: Uuid,
    /// The group (for a tenant default rule: absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group_id: Option<Uuid>,
    #[serde(flatten)]
    pub rule: RuleRequest,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
}

impl RuleView {
    pub fn of(rule: &Rule) -> Self {
        RuleView {
            id: rule.id,
            group_id: Some(rule.group_id),
            rule: rule.spec.to_request(),
            created_at: rule.created_at,
        }
    }

    pub fn of_default(rule: &DefaultRule) -> Self {
        RuleView {
            id: rule.id,
            group_id: None,
            rule: rule.spec.to_request(),
            created_at: rule.created_at,
        }
    }
}

/// A group as the native API shows it: its rules and its members.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct GroupView {
    pub id: Uuid,
    pub tenant: String,
    pub name: String,
    pub description: String,
    /// Set for an instance's own group.
    pub instance_id: Option<Uuid>,
    pub rules: Vec<RuleView>,
    /// Instances in the group.
    pub instances: Vec<Uuid>,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
}
