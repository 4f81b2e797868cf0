//! Enforcement with nftables: what the firewall should hold ([`Enforced`]
//! instances and group [`Members`]) rendered into one table, through nft's
//! JSON interface (`nft -j -f -`), applied whole or as the difference a
//! change makes.
//!
//! # Layout
//!
//! Everything lives in one `inet` table (`cradle` unless configured), which
//! nothing else touches. The topology is routed: each guest has its own
//! interface on the host (a tap, or the host end of a veth) and the host
//! routes between guests and the world. Bridged guests would need the
//! `bridge` family and are not covered. ARP is not filtered: the `inet`
//! family sees IPv4 and IPv6 only.
//!
//! Named objects, all global:
//!
//! - `guest_ifaces` (set of `ifname`): every enforced instance's interface.
//! - `macs` (`ifname . ether_addr`), `src4` (`ifname . ether_addr .
//!   ipv4_addr`), `src6` (`ifname . ether_addr . ipv6_addr`): what each
//!   interface may send from. `src6` also holds each instance's EUI-64
//!   link-local address (`fe80::/64` and the modified EUI-64 of its mac), so
//!   that IPv6 neighbour discovery works. (Guests that use RFC 7217
//!   stable-privacy link-local addresses instead cannot do IPv6 here.)
//! - `ingress` and `egress` (verdict maps `ifname : verdict`): from an
//!   interface to `jump in-<instance>` / `jump out-<instance>`.
//! - `g4-<group>` and `g6-<group>` (`ipv4_addr`, `ipv6_addr` hash sets): the
//!   member addresses of each group that some enforced rule names as its
//!   remote. There is one pair per referenced group, not per instance.
//!
//! Chains:
//!
//! - `prerouting` (hook prerouting, priority raw, so before conntrack):
//!   `iifname @guest_ifaces jump antispoof`. `antispoof` returns for a packet
//!   whose interface, source mac and source address are in `src4`/`src6`,
//!   for a DHCP discover (`0.0.0.0:68` to `255.255.255.255:67`) and for IPv6
//!   duplicate address detection (a neighbour solicitation from `::`) when
//!   the interface and mac are in `macs`, and drops everything else.
//! - `forward` (hook forward, priority filter): drops DHCP server replies
//!   and router advertisements coming from guests, then `iifname vmap
//!   @egress`, then `oifname vmap @ingress`.
//! - `output` (hook output, priority filter): traffic the host itself sends
//!   to a guest is ingress for the guest too, so `oifname vmap @ingress`;
//!   before it, the host's DHCP replies (udp 67 to 68) and its neighbour
//!   solicitations and advertisements and router advertisements to a guest
//!   are accepted, so they pass whatever the guest's rules are. (They are
//!   accepted here rather than in each `in-` chain, where they would also let
//!   through forwarded packets from anywhere that merely use those ports.)
//! - `in-<instance>` (the uuid without dashes), for every enforced instance:
//!   `ct state established,related accept`, `ct state invalid drop`, one rule
//!   per ingress rule (`accept`), then `drop`: ingress is denied unless a
//!   rule allows it, also for an instance with no rules.
//! - `out-<instance>`, only for an instance with egress rules (egress is
//!   allowed unless the instance has some): `ct state established,related
//!   return`, `ct state invalid drop`, one rule per egress rule, then `drop`.
//!   Allowed egress `return`s rather than accepts, so that in `forward` the
//!   destination's ingress chain still runs when it is a guest too.
//!
//! There is no `input` chain: traffic from a guest to the host itself (DHCP,
//! the metadata service, DNS on the host) is only checked against spoofing,
//! and egress rules do not apply to it.
//!
//! A rule matches `ip saddr`/`ip6 saddr` (`daddr` for egress) against its
//! prefix or its group's set (`meta nfproto ipv4`/`ipv6` alone for
//! `0.0.0.0/0` and `::/0`), `meta l4proto` unless the protocol is any, `th
//! dport` for ports (one value or a range), and `icmp type`/`code` or
//! `icmpv6 type`/`code`.
//!
//! # Why no per-instance sets
//!
//! Measured on Linux 6.18 with nft 1.0.6: creating named sets is quadratic
//! in the number of sets in the table (10,000 empty sets take 3.2 s, 20,000
//! take 15 s), and anonymous sets (`{ a, b }` literals in rules) are sets
//! too. Chains with inline rules are linear. So no instance has a set of its
//! own and no per-instance rule has a set literal: per-instance data is
//! elements of the few global sets and maps, and rules in its own chains.
//!
//! # Cost per packet
//!
//! A packet from or to a guest is dispatched by interface through a verdict
//! map (a hash lookup): constant in the number of instances. Then it walks
//! the rules of that one instance's chain, linear in that instance's own
//! rules; established flows stop at the first rule. The antispoof check is
//! one lookup in a hash set.
//!
//! # Applying
//!
//! [`render_full`] is the whole table as one transaction that replaces it
//! (`add table`, `delete table`, `add table`, then everything), valid
//! whether the table exists or not. [`Firewall`] remembers what was applied
//! and plans the difference an [`Update`] makes: only the chains whose rules
//! changed are flushed and refilled, only the elements that changed are
//! deleted or added, group sets are made before the rules that use them and
//! deleted after the last rule using them is gone, all in one transaction.
//! Applying a delta gives the same table as applying the full rendering of
//! the same state (the tests check this on a live kernel).
//!
//! An instance nft cannot take (an interface name outside `[A-Za-z0-9._-]`,
//! 1 to 15 bytes, or an interface another instance has) is left out rather
//! than failing everyone's table, and listed by [`Firewall::unenforced`]:
//! its traffic is not filtered at all.
//!
//! # What a change costs (`cargo xtask bench firewall`)
//!
//! A delta is small, but applying it is not constant in the size of the
//! table, for two reasons outside this crate (Linux 6.18, nft 1.0.6):
//!
//! - The kernel validates the whole table at commit whenever the
//!   transaction adds a rule with a verdict (every rule here): it walks
//!   every base chain, through the verdict maps, into every instance chain
//!   and every rule. With 10,000 instances of 20 rules that is about 90 ms
//!   per transaction.
//! - nft fetches the list of all chains into its cache before adding a rule
//!   (tens of ms at 10,000 chains), and a long-lived `nft -i` does not keep
//!   that cache across its own commits, so it saves only the process start.
//!
//! Loading the whole table is linear: about 1 s per 1,000 instances of 20
//! rules with `-j` (nft's text format takes about half as long); rendering
//! it here is a few percent of that.
//!
//! The JSON is built from small typed values serialized with serde (not the
//! `nftables` crate, nor `serde_json::Value` trees, which cost seconds to
//! build at 200,000 rules): the handful of statement shapes used here are
//! easy to write and test, and the output is exactly what `cradle firewall
//! show` prints.
//!
//! # Parts
//!
//! - `wire`: the typed JSON that nft reads, and a builder of one
//!   transaction's commands.
//! - `render`: what the firewall should hold, as commands: whole tables, and
//!   the pieces a delta is made of.
//! - `plan`: [`Firewall`], the applied state, and the [`Plan`]s that take it
//!   somewhere else.
//! - `run`: [`Nft`], which runs nft, and [`NftEnforcer`], which applies plans
//!   with it.
//!
//! Only `run` does I/O; the rest can be tested without nft.

mod plan;
mod render;
mod run;
mod wire;

use std::net::Ipv6Addr;

use uuid::Uuid;

pub use plan::{Firewall, Plan};
pub use render::render_full;
pub use run::{Nft, NftEnforcer, NftError};

#[cfg(doc)]
use crate::{Enforced, Members, Update};

/// The chain of an instance's ingress rules.
pub fn ingress_chain(instance: Uuid) -> String {
    format!("in-{}", instance.simple())
}

/// The chain of an instance's egress rules (only when it has some).
pub fn egress_chain(instance: Uuid) -> String {
    format!("out-{}", instance.simple())
}

/// The set of a group's members' IPv4 addresses.
pub fn group_set4(group: Uuid) -> String {
    format!("g4-{}", group.simple())
}

/// The set of a group's members' IPv6 addresses.
pub fn group_set6(group: Uuid) -> String {
    format!("g6-{}", group.simple())
}

/// The link-local address a guest forms from its mac (modified EUI-64).
pub fn eui64_link_local(mac: [u8; 6]) -> Ipv6Addr {
    let [a, b, c, d, e, f] = mac;
    Ipv6Addr::from([
        0xfe,
        0x80,
        0,
        0,
        0,
        0,
        0,
        0,
        a ^ 0x02,
        b,
        c,
        0xff,
        0xfe,
        d,
        e,
        f,
    ])
}

/// An instance left out of what was applied, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    pub instance: Uuid,
    pub reason: String,
}

#[cfg(test)]
mod tests {
    //! The fixtures the parts' tests share, and the naming helpers' tests.

    use super::*;
    use crate::{Direction, Enforced, EtherType, Match, Protocol, Remote, RuleSpec};
    use ipnet::IpNet;
    use serde_json::Value;
    use std::collections::BTreeSet;
    use std::net::Ipv4Addr;

    pub(super) fn id(n: u8) -> Uuid {
        Uuid::from_bytes([n; 16])
    }

    pub(super) fn spec(
        direction: Direction,
        protocol: Protocol,
        matches: Match,
        remote: Remote,
    ) -> RuleSpec {
        let ethertype = match remote {
            Remote::Cidr(IpNet::V6(_)) => EtherType::IPv6,
            _ if protocol == Protocol::Icmpv6 => EtherType::IPv6,
            _ => EtherType::IPv4,
        };
        RuleSpec {
            direction,
            ethertype,
            protocol,
            matches,
            remote,
        }
    }

    pub(super) fn instance(n: u8, rules: Vec<RuleSpec>) -> Enforced {
        Enforced {
            instance: id(n),
            interface: format!("tap{n}"),
            mac: [2, 0, 0, 0, 0, n],
            ipv4: BTreeSet::from([Ipv4Addr::new(10, 0, 0, n)]),
            ipv6: BTreeSet::new(),
            rules,
        }
    }

    /// Where the first command whose JSON text contains all of `parts` is.
    pub(super) fn position(doc: &Value, parts: &[&str]) -> Option<usize> {
        doc["nftables"].as_array().unwrap().iter().position(|c| {
            let t = c.to_string();
            parts.iter().all(|p| t.contains(p))
        })
    }

    #[test]
    fn link_local_from_mac() {
        let ll = eui64_link_local([0x00, 0x11, 0x22, 0x33, 0x44, 0x55]);
        assert_eq!(ll, "fe80::211:22ff:fe33:4455".parse::<Ipv6Addr>().unwrap());
        let ll = eui64_link_local([0x02, 0, 0, 0, 0, 1]);
        assert_eq!(ll, "fe80::ff:fe00:1".parse::<Ipv6Addr>().unwrap());
    }
}
