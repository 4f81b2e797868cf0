//! The planner: [`Firewall`] remembers what the kernel's table holds (the
//! last state applied) and makes [`Plan`]s that take it to a new state,
//! whole or as the difference an [`Update`] makes: a skeleton script for
//! `nft -f` (only when a shape or a group tag is new) and the element
//! operations for one netlink batch. No I/O.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt::Write as _;
use std::net::IpAddr;

use uuid::Uuid;

use super::Skipped;
use super::layout::{
    Elem, MarkBits, Present, SetId, Shape, all_sets, delta_skeleton, full_cleanup, full_skeleton,
    instance_elems, referenced_groups, tag_elems,
};
use crate::{Enforced, Members, Update};

/// One operation of a netlink batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Op {
    Add(Elem),
    Del(Elem),
}

/// An operation as the netlink writer takes it: add (true) or delete.
pub(super) type OpRef<'a> = (bool, &'a Elem);

impl Op {
    fn pair(&self) -> OpRef<'_> {
        match self {
            Op::Add(e) => (true, e),
            Op::Del(e) => (false, e),
        }
    }
}

/// What the kernel's sets hold, as listed: per set, each key and the tag
/// its element jumps to (tag maps).
pub(super) type Listed = HashMap<SetId, HashMap<Box<[u8]>, Option<u32>>>;

/// Group tags: each distinct combination of (referenced) groups an address
/// is in gets one, and the address maps to it.
#[derive(Debug, Clone, Default)]
struct Tags {
    by_groups: HashMap<BTreeSet<Uuid>, u32>,
    groups: BTreeMap<u32, BTreeSet<Uuid>>,
    by_group: HashMap<Uuid, BTreeSet<u32>>,
    /// Each member address's tag (the tag maps' elements).
    addrs: HashMap<IpAddr, u32>,
    /// Each member address's groups.
    addr_groups: HashMap<IpAddr, BTreeSet<Uuid>>,
}

impl Tags {
    fn of_group(&self, g: Uuid) -> Vec<u32> {
        self.by_group
            .get(&g)
            .map(|t| t.iter().copied().collect())
            .unwrap_or_default()
    }

    fn insert(&mut self, n: u32, groups: BTreeSet<Uuid>) {
        for g in &groups {
            self.by_group.entry(*g).or_default().insert(n);
        }
        self.by_groups.insert(groups.clone(), n);
        self.groups.insert(n, groups);
    }
}

/// What is applied.
#[derive(Debug, Clone, Default)]
struct State {
    instances: BTreeMap<Uuid, Enforced>,
    /// The referenced groups' members.
    groups: BTreeMap<Uuid, Members>,
    /// Which applied instances name each group.
    referrers: HashMap<Uuid, BTreeSet<Uuid>>,
    ifaces: HashMap<String, Uuid>,
    elems: HashMap<Uuid, Vec<Elem>>,
    tags: Tags,
    /// The tag maps' elements (full plans).
    tag_elems: Vec<Elem>,
    /// Chains `id-1` to `id-<tag_chains>` exist: some to spare, so that a
    /// new combination of groups rarely needs nft.
    tag_chains: u32,
    shapes: BTreeSet<Shape>,
}

/// Tag chains made beyond those in use.
const SPARE_TAGS: u32 = 64;

/// What the kernel's table holds, as far as this process knows.
#[derive(Debug, Clone)]
pub struct Firewall {
    table: String,
    mark: MarkBits,
    loaded: bool,
    state: State,
    unenforced: BTreeMap<Uuid, String>,
}

/// A plan cannot be made: more distinct group combinations than the mark
/// bits hold.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "members' addresses fall into more than {capacity} distinct combinations of groups, \
     more group tags than the mark bits {mask:#010x} hold: widen [firewall] mark_mask"
)]
pub struct OutOfTags {
    pub capacity: u32,
    pub mask: u32,
}

/// What to apply, and what the applied state becomes once it took.
#[derive(Debug, Clone)]
pub struct Plan {
    table: String,
    mark: MarkBits,
    /// For `nft -f`, first (full plans make theirs when applied, from what
    /// the table holds).
    script: String,
    pub(super) ops: Vec<Op>,
    change: Change,
    skipped: Vec<Skipped>,
}

#[derive(Debug, Clone)]
enum Change {
    Full(Box<State>),
    Delta(Box<Delta>),
}

#[derive(Debug, Clone, Default)]
struct Delta {
    /// Every instance the update named.
    touched: Vec<Uuid>,
    instances: BTreeMap<Uuid, Option<Enforced>>,
    groups: BTreeMap<Uuid, Option<Members>>,
    elems: HashMap<Uuid, Vec<Elem>>,
    /// Elements instances not rendered again gain (for new tags).
    gained: HashMap<Uuid, Vec<Elem>>,
    new_tags: BTreeMap<u32, BTreeSet<Uuid>>,
    addrs: HashMap<IpAddr, Option<u32>>,
    addr_groups: HashMap<IpAddr, BTreeSet<Uuid>>,
    new_shapes: BTreeSet<Shape>,
    /// The tag chains there are afterwards.
    tag_chains: u32,
}

impl Plan {
    /// Whether this replaces the whole table.
    pub fn is_full(&self) -> bool {
        matches!(self.change, Change::Full(_))
    }

    /// Instances left out because nft cannot take them.
    pub fn skipped(&self) -> &[Skipped] {
        &self.skipped
    }

    /// How many elements the table holds once this is applied (full
    /// plans), or the change adds (deltas).
    pub fn elements(&self) -> usize {
        match &self.change {
            Change::Full(s) => s.elems.values().map(Vec::len).sum::<usize>() + s.tag_elems.len(),
            Change::Delta(_) => self.ops.iter().filter(|o| matches!(o, Op::Add(_))).count(),
        }
    }

    /// A delta's operations; a full plan's elements as additions, grouped
    /// by set. Borrowed: 400,000 elements are not copied.
    pub(super) fn pairs(&self) -> Vec<OpRef<'_>> {
        match &self.change {
            Change::Full(s) => {
                let mut by_set: BTreeMap<SetId, Vec<&Elem>> = BTreeMap::new();
                for e in s.elems.values().flatten().chain(&s.tag_elems) {
                    by_set.entry(e.set).or_default().push(e);
                }
                by_set.into_values().flatten().map(|e| (true, e)).collect()
            }
            Change::Delta(_) => self.ops.iter().map(Op::pair).collect(),
        }
    }

    /// The skeleton script: for a full plan, as applied over `present`.
    pub(super) fn script(&self, present: Option<&Present>) -> String {
        match &self.change {
            Change::Full(s) => {
                full_skeleton(&self.table, &s.shapes, s.tag_chains, self.mark, present)
            }
            Change::Delta(_) => self.script.clone(),
        }
    }

    /// The sets a full plan's table has.
    pub(super) fn sets(&self) -> Vec<SetId> {
        match &self.change {
            Change::Full(s) => all_sets(&s.shapes).collect(),
            Change::Delta(_) => Vec::new(),
        }
    }

    /// A full plan's batch against what the kernel's sets hold: only the
    /// elements that differ (after a restart, usually none), rather than
    /// every set emptied and filled again, which costs the kernel a
    /// transaction entry per element twice over (4 s for 417,000). The
    /// deletions are owned (they come from the listing); the additions are
    /// the plan's.
    pub(super) fn against(&self, listed: &Listed) -> (Vec<Elem>, Vec<&Elem>) {
        let wanted = self.pairs();
        if listed.values().all(HashMap::is_empty) {
            return (Vec::new(), wanted.into_iter().map(|(_, e)| e).collect());
        }
        let mut by_set: BTreeMap<SetId, Vec<&Elem>> = BTreeMap::new();
        for (_, e) in wanted {
            by_set.entry(e.set).or_default().push(e);
        }
        let mut dels = Vec::new();
        let mut adds = Vec::new();
        let none = HashMap::new();
        for (set, elems) in &by_set {
            let there = listed.get(set).unwrap_or(&none);
            let mut found = 0;
            for e in elems {
                match there.get(&e.key) {
                    Some(tag) if *tag == e.tag => found += 1,
                    Some(tag) => {
                        found += 1;
                        dels.push(Elem {
                            tag: *tag,
                            ..(*e).clone()
                        });
                        adds.push(*e);
                    }
                    None => adds.push(*e),
                }
            }
            // Every listed element is wanted unless some were not found.
            if found < there.len() {
                let keep: HashSet<&[u8]> = elems.iter().map(|e| &*e.key).collect();
                for (key, tag) in there {
                    if !keep.contains(&**key) {
                        dels.push(Elem {
                            set: *set,
                            key: key.clone(),
                            tag: *tag,
                        });
                    }
                }
            }
        }
        for (set, there) in listed {
            if !by_set.contains_key(set) {
                dels.extend(there.iter().map(|(key, tag)| Elem {
                    set: *set,
                    key: key.clone(),
                    tag: *tag,
                }));
            }
        }
        (dels, adds)
    }

    /// What goes after the batch: for a full plan, the tag chains of
    /// `present` no longer used.
    pub(super) fn cleanup(&self, present: &Present) -> String {
        match &self.change {
            Change::Full(s) => full_cleanup(&self.table, s.tag_chains, present),
            Change::Delta(_) => String::new(),
        }
    }

    /// The plan as nft's own language: the skeleton, then every element
    /// added (`add element`) or removed (`delete element`). For a full
    /// plan this is the whole table, as `nft -f` takes it whether the table
    /// exists or not: what `cradle firewall show` prints.
    pub fn text(&self) -> String {
        let mut out = self.script(None);
        let table = &self.table;
        let ops = self.pairs();
        let mut i = 0;
        while i < ops.len() {
            let (add, set) = (ops[i].0, ops[i].1.set);
            let mut items = Vec::new();
            while let Some((a, e)) = ops.get(i) {
                if e.set != set || *a != add {
                    break;
                }
                items.push(if add { e.text() } else { e.key_text() });
                i += 1;
            }
            let verb = if add { "add" } else { "delete" };
            let _ = writeln!(
                out,
                "{verb} element inet {table} {} {{ {} }}",
                set.name(),
                items.join(", ")
            );
        }
        out
    }
}

impl Firewall {
    /// Nothing applied yet; group tags in the default mark bits.
    pub fn new(table: impl Into<String>) -> Self {
        Firewall::with_mark(table, MarkBits::DEFAULT)
    }

    pub fn with_mark(table: impl Into<String>, mark: MarkBits) -> Self {
        Firewall {
            table: table.into(),
            mark,
            loaded: false,
            state: State::default(),
            unenforced: BTreeMap::new(),
        }
    }

    pub fn table(&self) -> &str {
        &self.table
    }

    /// The applied instances.
    pub fn instances(&self) -> &BTreeMap<Uuid, Enforced> {
        &self.state.instances
    }

    /// The applied (referenced) groups and their members.
    pub fn groups(&self) -> &BTreeMap<Uuid, Members> {
        &self.state.groups
    }

    /// How many elements the table holds.
    pub fn elements(&self) -> usize {
        self.state.elems.values().map(Vec::len).sum::<usize>() + self.state.tags.addrs.len()
    }

    /// Instances given but not enforced, and why: an interface name nft
    /// cannot take, or one another instance has. Their traffic is not
    /// filtered at all.
    pub fn unenforced(&self) -> Vec<Skipped> {
        self.unenforced
            .iter()
            .map(|(id, reason)| Skipped {
                instance: *id,
                reason: reason.clone(),
            })
            .collect()
    }

    /// Replace everything with these instances and the members of the groups
    /// their rules name (a named group missing from `groups` has none).
    /// Instances whose interface nft cannot take, or whose interface another
    /// instance (with a smaller id) has, are left out and listed in
    /// [`Plan::skipped`].
    pub fn plan_full(
        &self,
        instances: Vec<Enforced>,
        groups: &BTreeMap<Uuid, Members>,
    ) -> Result<Plan, OutOfTags> {
        let (instances, skipped) = admit(instances);
        let mut s = State::default();
        for (id, e) in &instances {
            for g in referenced_groups(e) {
                s.referrers.entry(g).or_default().insert(*id);
                s.groups
                    .entry(g)
                    .or_insert_with(|| groups.get(&g).cloned().unwrap_or_default());
            }
            s.ifaces.insert(e.interface.clone(), *id);
        }
        for (g, m) in &s.groups {
            for a in member_addrs(m) {
                s.tags.addr_groups.entry(a).or_default().insert(*g);
            }
        }
        let mut combos: BTreeSet<&BTreeSet<Uuid>> = s.tags.addr_groups.values().collect();
        if combos.len() > self.mark.capacity() as usize {
            return Err(self.out_of_tags());
        }
        let mut by_groups: HashMap<BTreeSet<Uuid>, u32> = HashMap::new();
        for (n, combo) in (1u32..).zip(std::mem::take(&mut combos)) {
            by_groups.insert(combo.clone(), n);
        }
        for (combo, n) in by_groups {
            s.tags.insert(n, combo);
        }
        let used = s.tags.groups.len() as u32;
        s.tag_chains = (used + SPARE_TAGS).min(self.mark.capacity());
        let addrs: Vec<(IpAddr, u32)> = s
            .tags
            .addr_groups
            .iter()
            .map(|(a, gs)| (*a, s.tags.by_groups[gs]))
            .collect();
        s.tags.addrs = addrs.into_iter().collect();
        for (id, e) in &instances {
            let elems = instance_elems(e, self.mark, &|g| s.tags.of_group(g));
            s.shapes.extend(shapes_of(&elems));
            s.elems.insert(*id, elems);
        }
        s.instances = instances;

        s.tag_elems = s
            .tags
            .addrs
            .iter()
            .map(|(a, n)| Elem::tag(*a, *n))
            .collect();
        s.tag_elems
            .sort_by(|a, b| (a.set, &a.key).cmp(&(b.set, &b.key)));
        Ok(Plan {
            table: self.table.clone(),
            mark: self.mark,
            script: String::new(),
            ops: Vec::new(),
            change: Change::Full(Box::new(s)),
            skipped,
        })
    }

    fn out_of_tags(&self) -> OutOfTags {
        OutOfTags {
            capacity: self.mark.capacity(),
            mask: self.mark.mask(),
        }
    }

    /// The plan that takes the applied state to the state with `update`
    /// made; `None` when nothing changes. Before any full ruleset was
    /// applied, a full plan of what the update holds.
    ///
    /// Members of a group no applied rule names are not kept: an update
    /// that makes a rule name a group should carry the group's members
    /// (without them it starts with none). An interface stays with the
    /// instance that has it: another instance in the update claiming it is
    /// skipped.
    pub fn plan_update(&self, update: &Update) -> Result<Option<Plan>, OutOfTags> {
        if !self.loaded {
            let instances = update.instances.values().flatten().cloned().collect();
            return self.plan_full(instances, &update.groups).map(Some);
        }
        let s = &self.state;
        let (next, skipped) = self.next_instances(update);
        let mut d = Delta {
            touched: update.instances.keys().copied().collect(),
            ..Delta::default()
        };

        // Which groups are named afterwards, and their members.
        let mut referrers: HashMap<Uuid, BTreeSet<Uuid>> = HashMap::new();
        let referrers_of = |g: Uuid, r: &mut HashMap<Uuid, BTreeSet<Uuid>>| -> BTreeSet<Uuid> {
            r.entry(g)
                .or_insert_with(|| s.referrers.get(&g).cloned().unwrap_or_default())
                .clone()
        };
        for (id, new) in &next {
            if let Some(old) = s.instances.get(id) {
                for g in referenced_groups(old) {
                    referrers_of(g, &mut referrers);
                    referrers.get_mut(&g).expect("just made").remove(id);
                }
            }
            if let Some(new) = new {
                for g in referenced_groups(new) {
                    referrers_of(g, &mut referrers);
                    referrers.get_mut(&g).expect("just made").insert(*id);
                }
            }
        }
        for (g, r) in &referrers {
            match (s.groups.contains_key(g), !r.is_empty()) {
                (false, true) => {
                    let m = update.groups.get(g).cloned().unwrap_or_default();
                    d.groups.insert(*g, Some(m));
                }
                (true, false) => {
                    d.groups.insert(*g, None);
                }
                _ => {}
            }
        }
        for (g, m) in &update.groups {
            if d.groups.contains_key(g) {
                continue;
            }
            if let Some(old) = s.groups.get(g)
                && old != m
            {
                d.groups.insert(*g, Some(m.clone()));
            }
        }

        // Each affected address's groups, and so its tag.
        let mut affected: HashSet<IpAddr> = HashSet::new();
        for (g, new) in &d.groups {
            affected.extend(s.groups.get(g).into_iter().flat_map(member_addrs));
            affected.extend(new.iter().flat_map(member_addrs));
        }
        let mut taken: BTreeSet<u32> = s.tags.groups.keys().copied().collect();
        let mut by_groups_new: HashMap<BTreeSet<Uuid>, u32> = HashMap::new();
        for a in affected {
            let mut gs = s.tags.addr_groups.get(&a).cloned().unwrap_or_default();
            for (g, new) in &d.groups {
                gs.remove(g);
                if new.as_ref().is_some_and(|m| has(m, a)) {
                    gs.insert(*g);
                }
            }
            let tag = if gs.is_empty() {
                None
            } else if let Some(n) = s.tags.by_groups.get(&gs).or(by_groups_new.get(&gs)) {
                Some(*n)
            } else {
                let n = (1..=self.mark.capacity())
                    .find(|n| !taken.contains(n))
                    .ok_or_else(|| self.out_of_tags())?;
                taken.insert(n);
                by_groups_new.insert(gs.clone(), n);
                d.new_tags.insert(n, gs.clone());
                Some(n)
            };
            if s.tags.addrs.get(&a).copied() != tag {
                d.addrs.insert(a, tag);
            }
            if s.tags.addr_groups.get(&a) != Some(&gs) {
                d.addr_groups.insert(a, gs);
            }
        }
        let skips_change = self.skips_change(update, &skipped);
        if next.is_empty() && d.groups.is_empty() && d.addrs.is_empty() && !skips_change {
            return Ok(None);
        }

        // The instances that change are rendered again; those whose groups
        // gained a tag get that tag's elements.
        let render: BTreeSet<Uuid> = next.keys().copied().collect();
        let mut gained: Vec<Elem> = Vec::new();
        for (n, groups) in &d.new_tags {
            let mut named: BTreeSet<Uuid> = BTreeSet::new();
            for g in groups {
                let r = referrers
                    .get(g)
                    .or(s.referrers.get(g))
                    .into_iter()
                    .flatten();
                named.extend(r);
            }
            for id in named.difference(&render) {
                let Some(e) = s.instances.get(id) else {
                    continue;
                };
                let extra = tag_elems(e, self.mark, groups, *n);
                for sh in shapes_of(&extra) {
                    if !s.shapes.contains(&sh) {
                        d.new_shapes.insert(sh);
                    }
                }
                gained.extend(extra.iter().cloned());
                d.gained.entry(*id).or_default().extend(extra);
            }
        }
        let tags_of = |g: Uuid| -> Vec<u32> {
            let mut t: BTreeSet<u32> = s.tags.by_group.get(&g).cloned().unwrap_or_default();
            t.extend(
                d.new_tags
                    .iter()
                    .filter(|(_, gs)| gs.contains(&g))
                    .map(|(n, _)| *n),
            );
            t.into_iter().collect()
        };
        let mut dels: Vec<Elem> = Vec::new();
        let mut adds: Vec<Elem> = gained;
        for id in render {
            let new = match next.get(&id) {
                Some(n) => *n,
                None => s.instances.get(&id),
            };
            let new_elems = new
                .map(|e| instance_elems(e, self.mark, &tags_of))
                .unwrap_or_default();
            let old_elems: &[Elem] = s.elems.get(&id).map_or(&[], Vec::as_slice);
            let had: HashSet<&Elem> = old_elems.iter().collect();
            let will: HashSet<&Elem> = new_elems.iter().collect();
            dels.extend(old_elems.iter().filter(|e| !will.contains(e)).cloned());
            adds.extend(new_elems.iter().filter(|e| !had.contains(e)).cloned());
            for sh in shapes_of(&new_elems) {
                if !s.shapes.contains(&sh) {
                    d.new_shapes.insert(sh);
                }
            }
            d.elems.insert(id, new_elems);
        }
        for (a, tag) in &d.addrs {
            if let Some(old) = s.tags.addrs.get(a) {
                dels.push(Elem::tag(*a, *old));
            }
            if let Some(n) = tag {
                adds.push(Elem::tag(*a, *n));
            }
        }
        let order = |a: &Elem, b: &Elem| (a.set, &a.key).cmp(&(b.set, &b.key));
        dels.sort_by(order);
        adds.sort_by(order);
        let mut ops: Vec<Op> = dels.into_iter().map(Op::Del).collect();
        ops.extend(adds.into_iter().map(Op::Add));

        let shapes: BTreeSet<Shape> = s.shapes.union(&d.new_shapes).copied().collect();
        let top = d.new_tags.keys().copied().max().unwrap_or(0);
        d.tag_chains = if top > s.tag_chains {
            (top + SPARE_TAGS).min(self.mark.capacity())
        } else {
            s.tag_chains
        };
        let new_chains: BTreeSet<u32> = (s.tag_chains + 1..=d.tag_chains).collect();
        let script = if d.new_shapes.is_empty() && new_chains.is_empty() {
            String::new()
        } else {
            delta_skeleton(&self.table, &shapes, &d.new_shapes, &new_chains, self.mark)
        };
        d.instances = next.into_iter().map(|(id, e)| (id, e.cloned())).collect();
        Ok(Some(Plan {
            table: self.table.clone(),
            mark: self.mark,
            script,
            ops,
            change: Change::Delta(Box::new(d)),
            skipped,
        }))
    }

    /// Record that the kernel took `plan`.
    pub fn commit(&mut self, plan: Plan) {
        match plan.change {
            Change::Full(state) => {
                self.loaded = true;
                self.state = *state;
                self.unenforced.clear();
            }
            Change::Delta(d) => self.commit_delta(*d),
        }
        for s in plan.skipped {
            self.unenforced.insert(s.instance, s.reason);
        }
    }

    fn commit_delta(&mut self, d: Delta) {
        let s = &mut self.state;
        for id in &d.touched {
            self.unenforced.remove(id);
        }
        for (id, new) in d.instances {
            if let Some(old) = s.instances.remove(&id) {
                for g in referenced_groups(&old) {
                    if let Some(r) = s.referrers.get_mut(&g) {
                        r.remove(&id);
                        if r.is_empty() {
                            s.referrers.remove(&g);
                        }
                    }
                }
                if s.ifaces.get(&old.interface) == Some(&id) {
                    s.ifaces.remove(&old.interface);
                }
            }
            s.elems.remove(&id);
            if let Some(new) = new {
                for g in referenced_groups(&new) {
                    s.referrers.entry(g).or_default().insert(id);
                }
                s.ifaces.insert(new.interface.clone(), id);
                s.instances.insert(id, new);
            }
        }
        for (id, elems) in d.elems {
            if s.instances.contains_key(&id) {
                s.elems.insert(id, elems);
            }
        }
        for (id, extra) in d.gained {
            if let Some(v) = s.elems.get_mut(&id) {
                v.extend(extra);
            }
        }
        for (g, m) in d.groups {
            match m {
                Some(m) => s.groups.insert(g, m),
                None => s.groups.remove(&g),
            };
        }
        for (n, groups) in d.new_tags {
            s.tags.insert(n, groups);
        }
        for (a, tag) in d.addrs {
            match tag {
                Some(n) => s.tags.addrs.insert(a, n),
                None => s.tags.addrs.remove(&a),
            };
        }
        for (a, gs) in d.addr_groups {
            if gs.is_empty() {
                s.tags.addr_groups.remove(&a);
            } else {
                s.tags.addr_groups.insert(a, gs);
            }
        }
        s.shapes.extend(d.new_shapes);
        s.tag_chains = d.tag_chains;
    }

    /// What each touched instance becomes, for those that change (`None`:
    /// it goes, or can no longer be enforced), and the touched instances
    /// left out, and why.
    fn next_instances<'u>(
        &self,
        update: &'u Update,
    ) -> (BTreeMap<Uuid, Option<&'u Enforced>>, Vec<Skipped>) {
        let mut skipped = Vec::new();
        let mut claimed: HashMap<&str, Uuid> = HashMap::new();
        let mut next: BTreeMap<Uuid, Option<&Enforced>> = BTreeMap::new();
        let skip = |skipped: &mut Vec<Skipped>, id: Uuid, reason: String| {
            skipped.push(Skipped {
                instance: id,
                reason,
            });
            None
        };
        for (id, new) in &update.instances {
            let new = match new {
                Some(e) if e.instance != *id => skip(
                    &mut skipped,
                    *id,
                    format!("its entry is for instance {}", e.instance),
                ),
                Some(e) => match admissible(e) {
                    Err(reason) => skip(&mut skipped, *id, reason),
                    Ok(()) => {
                        let holder = self
                            .state
                            .ifaces
                            .get(&e.interface)
                            .filter(|h| **h != *id && !update.instances.contains_key(h))
                            .or_else(|| claimed.get(e.interface.as_str()));
                        match holder {
                            Some(h) => skip(
                                &mut skipped,
                                *id,
                                format!("interface {} is instance {h}'s", e.interface),
                            ),
                            None => {
                                claimed.insert(&e.interface, *id);
                                Some(e)
                            }
                        }
                    }
                },
                None => None,
            };
            if self.state.instances.get(id) != new {
                next.insert(*id, new);
            }
        }
        (next, skipped)
    }

    /// Whether the list of unenforced instances changes.
    fn skips_change(&self, update: &Update, skipped: &[Skipped]) -> bool {
        skipped
            .iter()
            .any(|s| self.unenforced.get(&s.instance) != Some(&s.reason))
            || update.instances.keys().any(|id| {
                self.unenforced.contains_key(id) && !skipped.iter().any(|s| s.instance == *id)
            })
    }
}

fn member_addrs(m: &Members) -> impl Iterator<Item = IpAddr> + '_ {
    m.ipv4
        .iter()
        .map(|a| IpAddr::V4(*a))
        .chain(m.ipv6.iter().map(|a| IpAddr::V6(*a)))
}

fn has(m: &Members, a: IpAddr) -> bool {
    match a {
        IpAddr::V4(a) => m.ipv4.contains(&a),
        IpAddr::V6(a) => m.ipv6.contains(&a),
    }
}

fn shapes_of(elems: &[Elem]) -> impl Iterator<Item = Shape> + '_ {
    elems.iter().filter_map(|e| match e.set {
        SetId::Shape(s) => Some(s),
        SetId::Base(_) => None,
    })
}

/// Keep the instances nft can take: a usable interface name, and each
/// interface for one instance only (the smallest id keeps it). Later
/// entries for the same id win.
fn admit(instances: Vec<Enforced>) -> (BTreeMap<Uuid, Enforced>, Vec<Skipped>) {
    let mut by_id: BTreeMap<Uuid, Enforced> = BTreeMap::new();
    for e in instances {
        by_id.insert(e.instance, e);
    }
    let mut skipped = Vec::new();
    let mut owners: HashMap<String, Uuid> = HashMap::new();
    by_id.retain(|id, e| {
        let reason = match admissible(e) {
            Err(reason) => reason,
            Ok(()) => match owners.get(&e.interface) {
                Some(owner) => format!("interface {} is instance {owner}'s", e.interface),
                None => {
                    owners.insert(e.interface.clone(), *id);
                    return true;
                }
            },
        };
        skipped.push(Skipped {
            instance: *id,
            reason,
        });
        false
    });
    (by_id, skipped)
}

fn admissible(e: &Enforced) -> Result<(), String> {
    if !cradle_model::is_interface_name(&e.interface) {
        return Err(format!("unusable interface name {:?}", e.interface));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nft::tests::{id, instance, spec};
    use crate::{Direction, Match, Protocol, Remote};
    use std::net::Ipv4Addr;

    fn members(v4: &[u8]) -> Members {
        Members {
            ipv4: v4.iter().map(|k| Ipv4Addr::new(10, 0, 0, *k)).collect(),
            ipv6: BTreeSet::new(),
        }
    }

    fn from_group(g: Uuid, port: u16) -> crate::RuleSpec {
        spec(
            Direction::Ingress,
            Protocol::Tcp,
            Match::Ports {
                from: port,
                to: port,
            },
            Remote::Group(g),
        )
    }

    fn texts(p: &Plan) -> Vec<String> {
        p.pairs()
            .into_iter()
            .map(|(add, e)| match add {
                true => format!("add {} {}", e.set.name(), e.text()),
                false => format!("del {} {}", e.set.name(), e.key_text()),
            })
            .collect()
    }

    #[test]
    fn a_membership_change_is_one_tag_element_per_address() {
        let g = id(0xaa);
        let fw_instances = vec![
            instance(1, vec![from_group(g, 80)]),
            instance(2, vec![from_group(g, 80)]),
        ];
        let mut fw = Firewall::new("cradle");
        let full = fw
            .plan_full(fw_instances, &BTreeMap::from([(g, members(&[2]))]))
            .unwrap();
        assert!(texts(&full).contains(&"add tag4 10.0.0.2 : jump id-1".to_string()));
        fw.commit(full);

        // 10.0.0.3 joins: its combination ({g}) has a tag already.
        let u = Update {
            instances: BTreeMap::new(),
            groups: BTreeMap::from([(g, members(&[2, 3]))]),
        };
        let p = fw.plan_update(&u).unwrap().unwrap();
        assert_eq!(texts(&p), vec!["add tag4 10.0.0.3 : jump id-1"]);
        assert!(p.script.is_empty(), "no skeleton change: {}", p.script);
        fw.commit(p);

        // 10.0.0.2 leaves.
        let u = Update {
            instances: BTreeMap::new(),
            groups: BTreeMap::from([(g, members(&[3]))]),
        };
        let p = fw.plan_update(&u).unwrap().unwrap();
        assert_eq!(texts(&p), vec!["del tag4 10.0.0.2"]);
        fw.commit(p);
        assert!(fw.plan_update(&u).unwrap().is_none(), "nothing left to do");
    }

    #[test]
    fn a_new_combination_of_groups_gets_a_tag_and_its_rules() {
        let (g, h) = (id(0xaa), id(0xbb));
        let mut fw = Firewall::new("cradle");
        let full = fw
            .plan_full(
                vec![
                    instance(1, vec![from_group(g, 80)]),
                    instance(2, vec![from_group(h, 443)]),
                ],
                &BTreeMap::from([(g, members(&[5])), (h, members(&[6]))]),
            )
            .unwrap();
        fw.commit(full);
        // 10.0.0.5 joins h too: {g, h} is new.
        let u = Update {
            instances: BTreeMap::new(),
            groups: BTreeMap::from([(h, members(&[5, 6]))]),
        };
        let p = fw.plan_update(&u).unwrap().unwrap();
        assert!(
            p.script.is_empty(),
            "its chain was made to spare: {}",
            p.script
        );
        let t = texts(&p);
        assert!(t.contains(&"del tag4 10.0.0.5".to_string()), "{t:?}");
        assert!(
            t.contains(&"add tag4 10.0.0.5 : jump id-3".to_string()),
            "{t:?}"
        );
        // Both instances' group rules now also match tag 3.
        assert!(
            t.iter()
                .any(|l| l.starts_with("add in4_g_port0 \"tap1\" . 0x00300000")),
            "{t:?}"
        );
        assert!(
            t.iter()
                .any(|l| l.starts_with("add in4_g_port0 \"tap2\" . 0x00300000")),
            "{t:?}"
        );
        fw.commit(p);
    }

    #[test]
    fn a_rule_change_touches_only_its_elements() {
        let mut fw = Firewall::new("cradle");
        let rule = |p| {
            spec(
                Direction::Ingress,
                Protocol::Tcp,
                Match::Ports { from: p, to: p },
                Remote::Cidr("10.0.0.0/8".parse().unwrap()),
            )
        };
        let full = fw
            .plan_full(vec![instance(1, vec![rule(22)])], &BTreeMap::new())
            .unwrap();
        fw.commit(full);
        let u = Update {
            instances: BTreeMap::from([(id(1), Some(instance(1, vec![rule(23)])))]),
            groups: BTreeMap::new(),
        };
        let p = fw.plan_update(&u).unwrap().unwrap();
        assert_eq!(
            texts(&p),
            vec![
                "del in4_a8_port0 \"tap1\" . 10.0.0.0 . 6 . 22",
                "add in4_a8_port0 \"tap1\" . 10.0.0.0 . 6 . 23",
            ]
        );
        assert!(p.script.is_empty());
    }

    #[test]
    fn too_many_combinations_is_a_clear_error() {
        let mark = MarkBits::new(0b11).unwrap();
        let fw = Firewall::with_mark("cradle", mark);
        let groups: Vec<Uuid> = (0..3).map(|k| id(0xa0 + k)).collect();
        // Four addresses in four different combinations: 3 tags only.
        let rules = groups.iter().map(|g| from_group(*g, 80)).collect();
        let m = BTreeMap::from([
            (groups[0], members(&[1, 2, 4])),
            (groups[1], members(&[2, 3])),
            (groups[2], members(&[4])),
        ]);
        let err = fw.plan_full(vec![instance(9, rules)], &m).unwrap_err();
        assert_eq!(err.capacity, 3);
        assert!(err.to_string().contains("mark_mask"), "{err}");
    }
}
