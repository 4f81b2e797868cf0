//! The table's shape: its fixed sets and chains, the lookup sets ("shapes")
//! rules are stored in, how an [`Enforced`] instance becomes elements of
//! them, and the nft text of the skeleton. Pure: no I/O.
//!
//! An element is kept as the bytes the kernel stores (each field of a
//! concatenation padded to 4 bytes, as nft lays it out), so that the planner
//! can diff elements cheaply and the netlink writer can send them as they
//! are; [`Elem::text`] decodes them for `nft -f` and for people.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;
use uuid::Uuid;

use super::eui64_link_local;
use crate::{Direction, Enforced, EtherType, Match, Protocol, Remote, RuleSpec};

/// The chains every table has (besides one `id-N` per group tag).
pub(super) const FIXED_CHAINS: [&str; 6] = [
    "antispoof",
    "guest_in",
    "guest_out",
    "prerouting",
    "forward",
    "output",
];

/// The packet-mark bits cradle owns: group tags are written there, and only
/// there, for the length of one lookup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MarkBits {
    mask: u32,
}

impl MarkBits {
    /// The default: bits 20 to 31 (`0xfff00000`), 4,095 group tags.
    pub const DEFAULT: MarkBits = MarkBits { mask: 0xfff0_0000 };

    /// A mask of contiguous bits, at least 2 of them.
    pub fn new(mask: u32) -> Result<MarkBits, String> {
        let shift = mask.trailing_zeros();
        let width = (mask >> shift.min(31)).trailing_ones();
        if mask == 0 || width < 2 || (mask >> shift) != (u32::MAX >> (32 - width)) {
            return Err(format!(
                "mark mask {mask:#010x} must be at least 2 contiguous bits (such as 0xfff00000)"
            ));
        }
        Ok(MarkBits { mask })
    }

    pub fn mask(self) -> u32 {
        self.mask
    }

    fn shift(self) -> u32 {
        self.mask.trailing_zeros()
    }

    /// How many group tags fit.
    pub fn capacity(self) -> u32 {
        self.mask >> self.shift()
    }

    /// Tag `n` (1..=capacity) as the mark value.
    pub(super) fn value(self, n: u32) -> u32 {
        n << self.shift()
    }
}

impl Default for MarkBits {
    fn default() -> Self {
        MarkBits::DEFAULT
    }
}

// ---- fields and sets -----------------------------------------------------

/// The type of one field of a set's key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ty {
    Ifname,
    Ether,
    V4,
    V6,
    Proto,
    Port,
    Mark,
    IcmpType { v6: bool },
    IcmpCode { v6: bool },
}

impl Ty {
    fn name(self) -> &'static str {
        match self {
            Ty::Ifname => "ifname",
            Ty::Ether => "ether_addr",
            Ty::V4 => "ipv4_addr",
            Ty::V6 => "ipv6_addr",
            Ty::Proto => "inet_proto",
            Ty::Port => "inet_service",
            Ty::Mark => "mark",
            Ty::IcmpType { v6: false } => "icmp_type",
            Ty::IcmpType { v6: true } => "icmpv6_type",
            Ty::IcmpCode { v6: false } => "icmp_code",
            Ty::IcmpCode { v6: true } => "icmpv6_code",
        }
    }

    /// Bytes the field's value has (before padding).
    fn len(self) -> usize {
        match self {
            Ty::Ifname => 16,
            Ty::Ether => 6,
            Ty::V4 | Ty::Mark => 4,
            Ty::V6 => 16,
            Ty::Port => 2,
            Ty::Proto | Ty::IcmpType { .. } | Ty::IcmpCode { .. } => 1,
        }
    }

    fn padded(self) -> usize {
        self.len().div_ceil(4) * 4
    }

    fn text(self, b: &[u8], out: &mut String) {
        match self {
            Ty::Ifname => {
                let end = b.iter().position(|c| *c == 0).unwrap_or(b.len());
                let _ = write!(out, "\"{}\"", String::from_utf8_lossy(&b[..end]));
            }
            Ty::Ether => {
                let parts: Vec<String> = b[..6].iter().map(|x| format!("{x:02x}")).collect();
                out.push_str(&parts.join(":"));
            }
            Ty::V4 => {
                let _ = write!(out, "{}", Ipv4Addr::new(b[0], b[1], b[2], b[3]));
            }
            Ty::V6 => {
                let a: [u8; 16] = b[..16].try_into().expect("16 bytes");
                let _ = write!(out, "{}", Ipv6Addr::from(a));
            }
            Ty::Port => {
                let _ = write!(out, "{}", u16::from_be_bytes([b[0], b[1]]));
            }
            Ty::Mark => {
                let v = u32::from_ne_bytes(b[..4].try_into().expect("4 bytes"));
                let _ = write!(out, "{v:#010x}");
            }
            Ty::Proto | Ty::IcmpType { .. } | Ty::IcmpCode { .. } => {
                let _ = write!(out, "{}", b[0]);
            }
        }
    }
}

/// The sets every table has.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(super) enum Base {
    /// Every enforced instance's interface.
    GuestIfaces,
    /// `ifname . ether_addr`: the mac each interface may send from.
    Macs,
    /// `ifname . ether_addr . ipv4_addr`: the addresses it may send from.
    Src4,
    Src6,
    /// Interfaces whose egress is filtered (instances with egress rules).
    EgressOn,
    /// `ipv4_addr : verdict`: a member address's group tag, as a jump to
    /// the chain that writes it into the mark.
    Tag4,
    Tag6,
}

const BASES: [Base; 7] = [
    Base::GuestIfaces,
    Base::Macs,
    Base::Src4,
    Base::Src6,
    Base::EgressOn,
    Base::Tag4,
    Base::Tag6,
];

/// Where a rule's other end is, as a set's key sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(super) enum Src {
    /// The address masked to this prefix length (0: not in the key).
    Net(u8),
    /// The group tag the address maps to, in the mark.
    Tag,
}

/// What a rule matches beyond the address, as a set's key sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(super) enum L4 {
    /// Any protocol.
    Any,
    /// One protocol, every port (or every ICMP type).
    Proto,
    /// A protocol and an aligned block of 2^bits destination ports.
    Ports(u8),
    IcmpType,
    IcmpTypeCode,
}

/// One lookup set of rules, and the one rule that consults it: every rule
/// of every instance with the same direction, family, prefix length (or
/// group remote) and kind of match is an element of the same set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(super) struct Shape {
    pub(super) egress: bool,
    pub(super) v6: bool,
    pub(super) src: Src,
    pub(super) l4: L4,
}

/// A set of the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(super) enum SetId {
    Base(Base),
    Shape(Shape),
}

impl SetId {
    pub(super) fn name(self) -> String {
        match self {
            SetId::Base(b) => match b {
                Base::GuestIfaces => "guest_ifaces",
                Base::Macs => "macs",
                Base::Src4 => "src4",
                Base::Src6 => "src6",
                Base::EgressOn => "egress_on",
                Base::Tag4 => "tag4",
                Base::Tag6 => "tag6",
            }
            .to_string(),
            SetId::Shape(s) => {
                let src = match s.src {
                    Src::Net(p) => format!("a{p}"),
                    Src::Tag => "g".to_string(),
                };
                let l4 = match s.l4 {
                    L4::Any => "any".to_string(),
                    L4::Proto => "p".to_string(),
                    L4::Ports(b) => format!("port{b}"),
                    L4::IcmpType => "t".to_string(),
                    L4::IcmpTypeCode => "tc".to_string(),
                };
                let dir = if s.egress { "out" } else { "in" };
                let fam = if s.v6 { 6 } else { 4 };
                format!("{dir}{fam}_{src}_{l4}")
            }
        }
    }

    fn fields(self) -> Vec<Ty> {
        match self {
            SetId::Base(b) => match b {
                Base::GuestIfaces | Base::EgressOn => vec![Ty::Ifname],
                Base::Macs => vec![Ty::Ifname, Ty::Ether],
                Base::Src4 => vec![Ty::Ifname, Ty::Ether, Ty::V4],
                Base::Src6 => vec![Ty::Ifname, Ty::Ether, Ty::V6],
                Base::Tag4 => vec![Ty::V4],
                Base::Tag6 => vec![Ty::V6],
            },
            SetId::Shape(s) => {
                let mut f = vec![Ty::Ifname];
                match s.src {
                    Src::Net(0) => {}
                    Src::Net(_) => f.push(if s.v6 { Ty::V6 } else { Ty::V4 }),
                    Src::Tag => f.push(Ty::Mark),
                }
                match s.l4 {
                    L4::Any => {}
                    L4::Proto => f.push(Ty::Proto),
                    L4::Ports(_) => f.extend([Ty::Proto, Ty::Port]),
                    L4::IcmpType => f.push(Ty::IcmpType { v6: s.v6 }),
                    L4::IcmpTypeCode => {
                        f.extend([Ty::IcmpType { v6: s.v6 }, Ty::IcmpCode { v6: s.v6 }])
                    }
                }
                f
            }
        }
    }

    fn is_map(self) -> bool {
        matches!(self, SetId::Base(Base::Tag4 | Base::Tag6))
    }

    /// `add set`/`add map` of it.
    fn declare(self, table: &str, out: &mut String) {
        let types: Vec<&str> = self.fields().iter().map(|t| t.name()).collect();
        let (kind, data) = if self.is_map() {
            ("map", " : verdict")
        } else {
            ("set", "")
        };
        let _ = writeln!(
            out,
            "add {kind} inet {table} {} {{ type {}{data}; }}",
            self.name(),
            types.join(" . ")
        );
    }
}

// ---- elements ------------------------------------------------------------

/// One element: its set and its key as the kernel stores it; for the tag
/// maps, the tag it jumps to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(super) struct Elem {
    pub(super) set: SetId,
    pub(super) key: Box<[u8]>,
    pub(super) tag: Option<u32>,
}

/// Builds a key field by field, padding each to 4 bytes.
struct KeyBuf(Vec<u8>);

impl KeyBuf {
    fn new() -> KeyBuf {
        KeyBuf(Vec::with_capacity(48))
    }

    fn push(&mut self, bytes: &[u8]) {
        self.0.extend_from_slice(bytes);
        while !self.0.len().is_multiple_of(4) {
            self.0.push(0);
        }
    }

    fn ifname(mut self, name: &str) -> KeyBuf {
        let mut b = [0u8; 16];
        let n = name.len().min(15);
        b[..n].copy_from_slice(&name.as_bytes()[..n]);
        self.push(&b);
        self
    }

    fn done(self) -> Box<[u8]> {
        self.0.into_boxed_slice()
    }
}

fn addr_bytes(a: IpAddr) -> Vec<u8> {
    match a {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

impl Elem {
    fn of(set: SetId, key: Box<[u8]>) -> Elem {
        Elem {
            set,
            key,
            tag: None,
        }
    }

    /// The tag map element that gives `addr` tag `n`.
    pub(super) fn tag(addr: IpAddr, n: u32) -> Elem {
        let set = match addr {
            IpAddr::V4(_) => Base::Tag4,
            IpAddr::V6(_) => Base::Tag6,
        };
        let mut k = KeyBuf::new();
        k.push(&addr_bytes(addr));
        Elem {
            set: SetId::Base(set),
            key: k.done(),
            tag: Some(n),
        }
    }

    /// The element as nft's text writes it (`KEY` or `KEY : jump id-N`).
    pub(super) fn text(&self) -> String {
        let mut out = self.key_text();
        if let Some(n) = self.tag {
            let _ = write!(out, " : jump {}", tag_chain(n));
        }
        out
    }

    /// Its key alone, as nft's text writes it (to delete it).
    pub(super) fn key_text(&self) -> String {
        let mut out = String::new();
        let mut at = 0;
        for (i, ty) in self.set.fields().into_iter().enumerate() {
            if i > 0 {
                out.push_str(" . ");
            }
            ty.text(&self.key[at..at + ty.len()], &mut out);
            at += ty.padded();
        }
        out
    }
}

/// The chain that writes tag `n` into the mark.
pub(super) fn tag_chain(n: u32) -> String {
    format!("id-{n}")
}

/// The aligned blocks `from..=to` splits into: (first port, log2 of size).
pub(super) fn port_blocks(from: u16, to: u16) -> Vec<(u16, u8)> {
    let mut out = Vec::new();
    let (mut lo, hi) = (u32::from(from), u32::from(to));
    while lo <= hi {
        let mut bits = lo.trailing_zeros().min(16);
        while lo + (1 << bits) - 1 > hi {
            bits -= 1;
        }
        out.push((lo as u16, bits as u8));
        lo += 1 << bits;
    }
    out
}

/// The l4 part of a rule: the kind of key and each key's bytes; `None` for
/// a rule the layout cannot express (validation refuses those), which then
/// allows nothing rather than more than it says.
fn l4_keys(rule: &RuleSpec) -> Option<Vec<(L4, Vec<u8>)>> {
    let v6 = rule.ethertype == EtherType::IPv6;
    let proto = match (rule.protocol, v6) {
        (Protocol::Tcp, _) => 6u8,
        (Protocol::Udp, _) => 17,
        (Protocol::Icmp, false) => 1,
        (Protocol::Icmpv6, true) => 58,
        (Protocol::Any, _) => 0,
        (Protocol::Icmp | Protocol::Icmpv6, _) => return None,
    };
    let pad = |b: &[u8]| {
        let mut k = KeyBuf::new();
        for f in b.chunks(1) {
            k.push(f);
        }
        k.0
    };
    Some(match (rule.protocol, rule.matches) {
        (Protocol::Any, Match::All) => vec![(L4::Any, Vec::new())],
        (Protocol::Any, _) => return None,
        (_, Match::All) => vec![(L4::Proto, pad(&[proto]))],
        (Protocol::Tcp | Protocol::Udp, Match::Ports { from, to }) if from <= to => {
            port_blocks(from, to)
                .into_iter()
                .map(|(base, bits)| {
                    if bits >= 16 {
                        return (L4::Proto, pad(&[proto]));
                    }
                    let mut k = KeyBuf::new();
                    k.push(&[proto]);
                    k.push(&base.to_be_bytes());
                    (L4::Ports(bits), k.0)
                })
                .collect()
        }
        (Protocol::Icmp | Protocol::Icmpv6, Match::Icmp { icmp_type, code }) => match code {
            None => vec![(L4::IcmpType, pad(&[icmp_type]))],
            Some(c) => vec![(L4::IcmpTypeCode, pad(&[icmp_type, c]))],
        },
        _ => return None,
    })
}

/// The remote part of a rule: the kind of key and each key's bytes. Group
/// rules have one per tag whose groups include the group (none: the group
/// has no members, and the rule allows nothing).
fn src_keys(
    rule: &RuleSpec,
    mark: MarkBits,
    tags_of: &dyn Fn(Uuid) -> Vec<u32>,
) -> Option<Vec<(Src, Vec<u8>)>> {
    let v6 = rule.ethertype == EtherType::IPv6;
    Some(match rule.remote {
        Remote::Cidr(net) => {
            if matches!(net, IpNet::V6(_)) != v6 {
                return None;
            }
            let net = net.trunc();
            let p = net.prefix_len();
            let bytes = if p == 0 {
                Vec::new()
            } else {
                addr_bytes(net.network())
            };
            vec![(Src::Net(p), bytes)]
        }
        Remote::Group(g) => tags_of(g)
            .into_iter()
            .map(|n| (Src::Tag, mark.value(n).to_ne_bytes().to_vec()))
            .collect(),
    })
}

/// The groups an instance's rules name as their remote.
pub(super) fn referenced_groups(e: &Enforced) -> BTreeSet<Uuid> {
    e.rules
        .iter()
        .filter_map(|r| match r.remote {
            Remote::Group(g) => Some(g),
            Remote::Cidr(_) => None,
        })
        .collect()
}

/// Every element an instance has: its interface, the addresses it may
/// send from, and one element per rule, port block and (for group rules)
/// tag. `tags_of(g)` is the tags whose groups include `g`.
pub(super) fn instance_elems(
    e: &Enforced,
    mark: MarkBits,
    tags_of: &dyn Fn(Uuid) -> Vec<u32>,
) -> Vec<Elem> {
    let iface = &e.interface;
    let base = |set: Base| SetId::Base(set);
    let with_mac = || {
        let mut k = KeyBuf::new().ifname(iface);
        k.push(&e.mac);
        k
    };
    let mut out = vec![
        Elem::of(base(Base::GuestIfaces), KeyBuf::new().ifname(iface).done()),
        Elem::of(base(Base::Macs), with_mac().done()),
    ];
    for a in &e.ipv4 {
        let mut k = with_mac();
        k.push(&a.octets());
        out.push(Elem::of(base(Base::Src4), k.done()));
    }
    let v6: BTreeSet<Ipv6Addr> = e
        .ipv6
        .iter()
        .copied()
        .chain([eui64_link_local(e.mac)])
        .collect();
    for a in v6 {
        let mut k = with_mac();
        k.push(&a.octets());
        out.push(Elem::of(base(Base::Src6), k.done()));
    }
    let mut egress = false;
    for rule in &e.rules {
        let (Some(l4), Some(src)) = (l4_keys(rule), src_keys(rule, mark, tags_of)) else {
            continue;
        };
        egress |= rule.direction == Direction::Egress;
        rule_elems(iface, rule, &src, &l4, &mut out);
    }
    if egress {
        out.push(Elem::of(
            base(Base::EgressOn),
            KeyBuf::new().ifname(iface).done(),
        ));
    }
    out.sort_by(|a, b| (a.set, &a.key).cmp(&(b.set, &b.key)));
    out.dedup();
    out
}

/// One rule's elements: one per remote key and l4 key.
fn rule_elems(
    iface: &str,
    rule: &RuleSpec,
    src: &[(Src, Vec<u8>)],
    l4: &[(L4, Vec<u8>)],
    out: &mut Vec<Elem>,
) {
    for (s, sbytes) in src {
        for (l, lbytes) in l4 {
            let shape = Shape {
                egress: rule.direction == Direction::Egress,
                v6: rule.ethertype == EtherType::IPv6,
                src: *s,
                l4: *l,
            };
            let mut k = KeyBuf::new().ifname(iface);
            k.0.extend_from_slice(sbytes);
            k.0.extend_from_slice(lbytes);
            out.push(Elem::of(SetId::Shape(shape), k.done()));
        }
    }
}

/// The elements a new tag `n` (for the combination `groups`) adds to an
/// instance: one per rule naming one of the groups, per l4 key. What
/// [`instance_elems`] gives once `n` is among the groups' tags, minus what
/// it gave before.
pub(super) fn tag_elems(
    e: &Enforced,
    mark: MarkBits,
    groups: &BTreeSet<Uuid>,
    n: u32,
) -> Vec<Elem> {
    let mut out = Vec::new();
    let src = [(Src::Tag, mark.value(n).to_ne_bytes().to_vec())];
    for rule in &e.rules {
        let Remote::Group(g) = rule.remote else {
            continue;
        };
        if !groups.contains(&g) {
            continue;
        }
        if let Some(l4) = l4_keys(rule) {
            rule_elems(&e.interface, rule, &src, &l4, &mut out);
        }
    }
    out.sort_by(|a, b| (a.set, &a.key).cmp(&(b.set, &b.key)));
    out.dedup();
    out
}

// ---- the skeleton --------------------------------------------------------

fn v4_mask(p: u8) -> String {
    let m: u32 = if p == 0 { 0 } else { u32::MAX << (32 - p) };
    Ipv4Addr::from(m).to_string()
}

fn v6_mask(p: u8) -> String {
    let m: u128 = if p == 0 { 0 } else { u128::MAX << (128 - p) };
    Ipv6Addr::from(m).to_string()
}

/// The rule that consults `shape`'s set.
fn lookup_rule(shape: Shape, mark: MarkBits) -> String {
    let (fam, ip) = if shape.v6 {
        ("ipv6", "ip6")
    } else {
        ("ipv4", "ip")
    };
    let (iface, dir) = if shape.egress {
        ("iifname", "daddr")
    } else {
        ("oifname", "saddr")
    };
    let mut key = vec![iface.to_string()];
    match shape.src {
        Src::Net(0) => {}
        Src::Net(p) if p == if shape.v6 { 128 } else { 32 } => key.push(format!("{ip} {dir}")),
        Src::Net(p) => {
            let m = if shape.v6 { v6_mask(p) } else { v4_mask(p) };
            key.push(format!("{ip} {dir} & {m}"));
        }
        Src::Tag => key.push(format!("meta mark & {:#010x}", mark.mask())),
    }
    let icmp = if shape.v6 { "icmpv6" } else { "icmp" };
    match shape.l4 {
        L4::Any => {}
        L4::Proto => key.push("meta l4proto".into()),
        L4::Ports(0) => key.extend(["meta l4proto".into(), "th dport".into()]),
        L4::Ports(b) => {
            let m = (0xffffu32 << b) & 0xffff;
            key.extend(["meta l4proto".into(), format!("th dport & {m}")]);
        }
        L4::IcmpType => key.push(format!("{icmp} type")),
        L4::IcmpTypeCode => key.extend([format!("{icmp} type"), format!("{icmp} code")]),
    }
    let verdict = if shape.egress { "return" } else { "accept" };
    let clear = match shape.src {
        Src::Tag => format!("meta mark set meta mark & {:#010x} ", !mark.mask()),
        Src::Net(_) => String::new(),
    };
    format!(
        "meta nfproto {fam} {} @{} {clear}{verdict}",
        key.join(" . "),
        SetId::Shape(shape).name()
    )
}

/// The rules of `guest_in` (ingress, `egress: false`) or `guest_out`: the
/// connection-tracking shortcuts, one lookup per shape in use (prefixes
/// first, then group tags), and drop.
fn guest_chain(egress: bool, shapes: &BTreeSet<Shape>, mark: MarkBits) -> Vec<String> {
    let allow = if egress { "return" } else { "accept" };
    let mut rules = vec![
        format!("ct state established,related {allow}"),
        "ct state invalid drop".to_string(),
    ];
    let mine = || shapes.iter().filter(move |s| s.egress == egress);
    rules.extend(
        mine()
            .filter(|s| s.src != Src::Tag)
            .map(|s| lookup_rule(*s, mark)),
    );
    if mine().any(|s| s.src == Src::Tag) {
        let dir = if egress { "daddr" } else { "saddr" };
        rules.push(format!("meta mark set meta mark & {:#010x}", !mark.mask()));
        rules.push(format!("ip {dir} vmap @tag4"));
        rules.push(format!("ip6 {dir} vmap @tag6"));
        rules.extend(
            mine()
                .filter(|s| s.src == Src::Tag)
                .map(|s| lookup_rule(*s, mark)),
        );
    }
    rules.push("drop".to_string());
    rules
}

/// The base chains' and `antispoof`'s rules.
fn fixed_rules(chain: &str) -> Vec<&'static str> {
    match chain {
        "antispoof" => vec![
            "iifname . ether saddr . ip saddr @src4 return",
            "iifname . ether saddr . ip6 saddr @src6 return",
            "iifname . ether saddr @macs ip saddr 0.0.0.0 ip daddr 255.255.255.255 udp sport 68 udp dport 67 return",
            "iifname . ether saddr @macs ip6 saddr :: icmpv6 type nd-neighbor-solicit return",
            "drop",
        ],
        "prerouting" => vec!["iifname @guest_ifaces jump antispoof"],
        "forward" => vec![
            "iifname @guest_ifaces udp sport 67 udp dport 68 drop",
            "iifname @guest_ifaces icmpv6 type nd-router-advert drop",
            "iifname @egress_on jump guest_out",
            "oifname @guest_ifaces jump guest_in",
        ],
        "output" => vec![
            "oifname @guest_ifaces udp sport 67 udp dport 68 accept",
            "oifname @guest_ifaces icmpv6 type nd-neighbor-solicit accept",
            "oifname @guest_ifaces icmpv6 type nd-neighbor-advert accept",
            "oifname @guest_ifaces icmpv6 type nd-router-advert accept",
            "oifname @guest_ifaces jump guest_in",
        ],
        _ => vec![],
    }
}

fn hook(chain: &str) -> Option<&'static str> {
    match chain {
        "prerouting" => Some("type filter hook prerouting priority raw; policy accept;"),
        "forward" => Some("type filter hook forward priority filter; policy accept;"),
        "output" => Some("type filter hook output priority filter; policy accept;"),
        _ => None,
    }
}

fn rewrite_chain(table: &str, chain: &str, rules: &[String], out: &mut String) {
    let _ = writeln!(out, "flush chain inet {table} {chain}");
    for r in rules {
        let _ = writeln!(out, "add rule inet {table} {chain} {r}");
    }
}

fn tag_rule(n: u32, mark: MarkBits) -> String {
    format!(
        "meta mark set meta mark & {:#010x} | {:#010x}",
        !mark.mask(),
        mark.value(n)
    )
}

/// What the kernel's table holds besides elements, as listed: to clean up
/// what a full apply no longer wants.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Present {
    /// Whether the table exists.
    pub table: bool,
    pub sets: BTreeSet<String>,
    pub chains: BTreeSet<String>,
}

impl Present {
    /// Whether a chain not of this layout is there (a table written by an
    /// older cradle, or by hand): then the table is replaced whole.
    fn foreign(&self) -> bool {
        self.chains
            .iter()
            .any(|c| !FIXED_CHAINS.contains(&c.as_str()) && !c.starts_with("id-"))
    }
}

/// The whole skeleton, applied with the elements a full apply sends after
/// it. With `present` the table's chains are rewritten in place (so the
/// elements in its sets keep filtering until the new ones replace them in
/// one netlink batch) and the sets not wanted are deleted (the tag chains
/// not wanted go after the batch: [`full_cleanup`]); without it (or
/// when the table is not this layout's) the table is replaced.
pub(super) fn full_skeleton(
    table: &str,
    shapes: &BTreeSet<Shape>,
    tag_chains: u32,
    mark: MarkBits,
    present: Option<&Present>,
) -> String {
    let mut out = String::with_capacity(8192);
    let _ = writeln!(out, "add table inet {table}");
    let present = present.filter(|p| p.table && !p.foreign());
    if present.is_none() {
        let _ = writeln!(out, "delete table inet {table}");
        let _ = writeln!(out, "add table inet {table}");
    }
    for set in all_sets(shapes) {
        set.declare(table, &mut out);
    }
    for n in 1..=tag_chains {
        let _ = writeln!(out, "add chain inet {table} {}", tag_chain(n));
        rewrite_chain(table, &tag_chain(n), &[tag_rule(n, mark)], &mut out);
    }
    for chain in FIXED_CHAINS {
        match hook(chain) {
            Some(h) => {
                let _ = writeln!(out, "add chain inet {table} {chain} {{ {h} }}");
            }
            None => {
                let _ = writeln!(out, "add chain inet {table} {chain}");
            }
        }
    }
    // Chains that jump come after the chains they jump to, so that the
    // kernel sees no dangling jump between flush and refill.
    for chain in ["antispoof", "guest_in", "guest_out"] {
        rewrite_chain(table, chain, &chain_rules(chain, shapes, mark), &mut out);
    }
    for chain in ["prerouting", "forward", "output"] {
        rewrite_chain(table, chain, &chain_rules(chain, shapes, mark), &mut out);
    }
    if let Some(p) = present {
        let wanted: BTreeSet<String> = all_sets(shapes).map(|s| s.name()).collect();
        for s in p.sets.difference(&wanted) {
            let _ = writeln!(out, "delete set inet {table} {s}");
        }
    }
    out
}

/// After a full apply's elements: the tag chains no element jumps to any
/// more (they cannot go before the tag maps are refilled).
pub(super) fn full_cleanup(table: &str, tag_chains: u32, present: &Present) -> String {
    let mut out = String::new();
    if !present.table || present.foreign() {
        return out;
    }
    for c in &present.chains {
        let stale = c
            .strip_prefix("id-")
            .and_then(|n| n.parse::<u32>().ok())
            .is_some_and(|n| n == 0 || n > tag_chains);
        if stale {
            let _ = writeln!(out, "delete chain inet {table} {c}");
        }
    }
    out
}

/// What a change adds to the skeleton: sets for new shapes (and the
/// lookup chains rewritten to consult them), more tag chains. Empty when
/// nothing is new.
pub(super) fn delta_skeleton(
    table: &str,
    shapes: &BTreeSet<Shape>,
    new_shapes: &BTreeSet<Shape>,
    new_chains: &BTreeSet<u32>,
    mark: MarkBits,
) -> String {
    let mut out = String::new();
    for s in new_shapes {
        SetId::Shape(*s).declare(table, &mut out);
    }
    for n in new_chains {
        let _ = writeln!(out, "add chain inet {table} {}", tag_chain(*n));
        rewrite_chain(table, &tag_chain(*n), &[tag_rule(*n, mark)], &mut out);
    }
    for (chain, egress) in [("guest_in", false), ("guest_out", true)] {
        if new_shapes.iter().any(|s| s.egress == egress) {
            rewrite_chain(table, chain, &chain_rules(chain, shapes, mark), &mut out);
        }
    }
    out
}

fn chain_rules(chain: &str, shapes: &BTreeSet<Shape>, mark: MarkBits) -> Vec<String> {
    match chain {
        "guest_in" => guest_chain(false, shapes, mark),
        "guest_out" => guest_chain(true, shapes, mark),
        other => fixed_rules(other).into_iter().map(String::from).collect(),
    }
}

/// Every set of a table whose rules use `shapes`.
pub(super) fn all_sets(shapes: &BTreeSet<Shape>) -> impl Iterator<Item = SetId> + '_ {
    BASES
        .into_iter()
        .map(SetId::Base)
        .chain(shapes.iter().map(|s| SetId::Shape(*s)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_ranges_split_into_aligned_blocks() {
        assert_eq!(port_blocks(22, 22), vec![(22, 0)]);
        assert_eq!(port_blocks(0, 65535), vec![(0, 16)]);
        assert_eq!(
            port_blocks(8000, 8080),
            vec![(8000, 6), (8064, 4), (8080, 0)]
        );
        assert_eq!(port_blocks(65535, 65535), vec![(65535, 0)]);
        for (from, to) in [(1, 65535), (60000, 61000), (5000, 5999), (3, 4)] {
            let blocks = port_blocks(from, to);
            let mut next = u32::from(from);
            for (base, bits) in &blocks {
                assert_eq!(u32::from(*base), next, "{from}-{to}: contiguous");
                assert_eq!(u32::from(*base) % (1 << bits), 0, "{from}-{to}: aligned");
                next += 1 << bits;
            }
            assert_eq!(next, u32::from(to) + 1, "{from}-{to}: covered exactly");
            assert!(blocks.len() <= 30, "{from}-{to}: {} blocks", blocks.len());
        }
    }

    #[test]
    fn mark_bits() {
        assert_eq!(MarkBits::DEFAULT.capacity(), 4095);
        assert_eq!(MarkBits::DEFAULT.value(1), 0x0010_0000);
        let m = MarkBits::new(0x0000_ff00).unwrap();
        assert_eq!((m.capacity(), m.value(3)), (255, 0x300));
        for bad in [0, 1, 0x8000_0000, 0x0000_ff0f, 0xf0f0_0000] {
            assert!(MarkBits::new(bad).is_err(), "{bad:#x}");
        }
        assert!(MarkBits::new(0xffff_ffff).is_ok());
    }

    #[test]
    fn elements_read_back_as_nft_text() {
        let e = Elem::tag("10.1.2.3".parse().unwrap(), 7);
        assert_eq!(e.text(), "10.1.2.3 : jump id-7");
        let shape = Shape {
            egress: false,
            v6: false,
            src: Src::Net(24),
            l4: L4::Ports(4),
        };
        let mut k = KeyBuf::new().ifname("tap1");
        k.push(&[10, 1, 2, 0]);
        k.push(&[6]);
        k.push(&8064u16.to_be_bytes());
        let e = Elem::of(SetId::Shape(shape), k.done());
        assert_eq!(e.key.len(), 16 + 4 + 4 + 4);
        assert_eq!(e.text(), "\"tap1\" . 10.1.2.0 . 6 . 8064");
        assert_eq!(SetId::Shape(shape).name(), "in4_a24_port4");
        assert_eq!(
            lookup_rule(shape, MarkBits::DEFAULT),
            "meta nfproto ipv4 oifname . ip saddr & 255.255.255.0 . meta l4proto . th dport & 65520 @in4_a24_port4 accept"
        );
    }
}
