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
//! - [`nft`]: keeps one nftables table holding what the firewall should
//!   ([`Enforced`] instances and group [`Members`]) as elements of a few
//!   hash sets, written over netlink, whole or as the difference a change
//!   makes.
//! - [`worker`]: the thread that owns enforcement, so that no registry
//!   operation waits on nft.

#![forbid(unsafe_code)]

pub mod api;
pub mod model;
pub mod nft;
pub mod state;
pub mod worker;

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

/// What applies what the firewall should hold, called by the
/// [`worker::Worker`] only. Implemented by [`nft::NftEnforcer`]; errors are
/// messages for operators.
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
