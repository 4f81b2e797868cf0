//! Security groups (seed 004): per-instance groups, tenant groups shared by
//! several instances, tenant default rules, rules whose remote is another
//! group's members, and their enforcement with nftables.
//!
//! - [`model`]: groups, rules and their validation.
//! - [`api`]: what the security-group routes take and answer (envelopes,
//!   the Trove shapes), shared by the admin API and the typed client.
//! - [`state`]: every group, rule, attachment and default in memory, with
//!   the checks that span them (tenancy, duplicates, caps, what is in use).
//!   Pure: the registry persists each [`state::Op`] before applying it here.
//! - [`nft`]: renders what the firewall should hold ([`Enforced`] instances
//!   and group [`Members`]) into one nftables table, through nft's JSON
//!   interface, and applies whole rulesets or the difference a change makes.

#![forbid(unsafe_code)]

pub mod api;
pub mod model;
pub mod nft;
pub mod state;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, Ipv6Addr};

use uuid::Uuid;

pub use model::{
    DefaultRule, Direction, EtherType, Group, GroupView, Invalid, Match, Protocol, Remote, Rule,
    RuleRequest, RuleSpec, RuleView,
};

/// One instance as the firewall sees it: where its traffic enters the host,
/// what it may send from, and its effective rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Enforced {
    pub instance: Uuid,
    /// Its interface on the host (a tap, or the host end of a veth).
    pub interface: String,
    pub mac: [u8; 6],
    /// Its own addresses: the only sources accepted from its interface.
    pub ipv4: BTreeSet<Ipv4Addr>,
    pub ipv6: BTreeSet<Ipv6Addr>,
    /// The union of the rules of every group it is in, sorted, without
    /// duplicates.
    pub rules: Vec<RuleSpec>,
}

/// The addresses of a group's members, for rules whose remote is the group.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Members {
    pub ipv4: BTreeSet<Ipv4Addr>,
    pub ipv6: BTreeSet<Ipv6Addr>,
}

/// A change to enforce: instances to (re)render, or to drop (`None`: removed,
/// or no longer enforceable), and the current members of groups whose
/// membership or members' addresses changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Update {
    pub instances: BTreeMap<Uuid, Option<Enforced>>,
    pub groups: BTreeMap<Uuid, Members>,
}

impl Update {
    pub fn is_empty(&self) -> bool {
        self.instances.is_empty() && self.groups.is_empty()
    }
}

/// Where the registry sends what the firewall should hold. Implemented by
/// [`nft::NftEnforcer`]; errors are messages for operators.
pub trait Enforce: Send + Sync {
    /// Replace everything with exactly these instances and group sets.
    fn full(&self, instances: Vec<Enforced>, groups: BTreeMap<Uuid, Members>)
    -> Result<(), String>;
    /// Apply one change.
    fn update(&self, update: &Update) -> Result<(), String>;
}

/// Parse a MAC address as `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut out = [0u8; 6];
    let mut parts = s.split(':');
    for byte in &mut out {
        let p = parts.next()?;
        if p.len() != 2 {
            return None;
        }
        *byte = u8::from_str_radix(p, 16).ok()?;
    }
    parts.next().is_none().then_some(out)
}
