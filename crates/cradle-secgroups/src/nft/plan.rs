//! The delta planner: [`Firewall`] remembers what the kernel's table holds
//! (the last state nft took) and makes [`Plan`]s, the commands that take it
//! to a new state, whole or as the difference an [`Update`] makes, with what
//! the state becomes once they are applied. The commands themselves come
//! from `render`; running them is `run`'s: this does no I/O.

use std::collections::{BTreeMap, HashMap};

use serde::{Serialize, Serializer};
use serde_json::Value;
use uuid::Uuid;

use super::render::{
    Elem, Rendered, add_elements, add_group_set, addr_elems, admissible, admit, full_cmds,
    needed_groups, referenced_groups, render_instance,
};
use super::wire::{Cmd, Cmds, Doc, Name, Rule, Verb, to_value};
use super::{Skipped, group_set4, group_set6};
use crate::{Enforced, Members, Update};

/// What is in the kernel's table, as far as this process knows: the last
/// state applied successfully.
#[derive(Debug, Clone)]
pub struct Firewall {
    table: String,
    /// Whether a full ruleset was applied (before that there is no table).
    loaded: bool,
    instances: BTreeMap<Uuid, Enforced>,
    /// The group sets present, with their members.
    groups: BTreeMap<Uuid, Members>,
    /// How many applied instances name each group.
    refs: BTreeMap<Uuid, usize>,
    /// Which instance has each interface.
    ifaces: HashMap<String, Uuid>,
    /// Instances given but left out, and why.
    unenforced: BTreeMap<Uuid, String>,
}

/// Commands for nft, and what the applied state becomes once nft took them.
/// Serializes as the `{"nftables": [...]}` document nft reads.
#[derive(Debug, Clone)]
pub struct Plan {
    cmds: Vec<Cmd>,
    change: Change,
    skipped: Vec<Skipped>,
}

#[derive(Debug, Clone)]
enum Change {
    Full {
        instances: BTreeMap<Uuid, Enforced>,
        groups: BTreeMap<Uuid, Members>,
    },
    Delta {
        /// Every instance the update named.
        touched: Vec<Uuid>,
        /// Those that change.
        instances: BTreeMap<Uuid, Option<Enforced>>,
        /// `Some`: the set exists afterwards with these members; `None`:
        /// deleted.
        groups: BTreeMap<Uuid, Option<Members>>,
    },
}

impl Serialize for Plan {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        Doc {
            nftables: &self.cmds,
        }
        .serialize(s)
    }
}

impl Plan {
    /// The `{"nftables": [...]}` document, as a JSON value (to show it; nft
    /// is given the plan itself, serialized).
    pub fn doc(&self) -> Value {
        to_value(&self.cmds)
    }

    /// How many commands the document holds.
    pub fn commands(&self) -> usize {
        self.cmds.len()
    }

    /// Whether this replaces the whole table.
    pub fn is_full(&self) -> bool {
        matches!(self.change, Change::Full { .. })
    }

    /// Instances left out because nft cannot take them.
    pub fn skipped(&self) -> &[Skipped] {
        &self.skipped
    }
}

impl Firewall {
    /// Nothing applied yet.
    pub fn new(table: impl Into<String>) -> Self {
        Firewall {
            table: table.into(),
            loaded: false,
            instances: BTreeMap::new(),
            groups: BTreeMap::new(),
            refs: BTreeMap::new(),
            ifaces: HashMap::new(),
            unenforced: BTreeMap::new(),
        }
    }

    pub fn table(&self) -> &str {
        &self.table
    }

    /// The applied instances.
    pub fn instances(&self) -> &BTreeMap<Uuid, Enforced> {
        &self.instances
    }

    /// The applied group sets and their members.
    pub fn groups(&self) -> &BTreeMap<Uuid, Members> {
        &self.groups
    }

    /// Instances that were given but could not be enforced, and why: an
    /// interface name nft cannot take, or an interface another instance
    /// has. Their traffic is not filtered at all.
    pub fn unenforced(&self) -> Vec<Skipped> {
        self.unenforced
            .iter()
            .map(|(id, reason)| Skipped {
                instance: *id,
                reason: reason.clone(),
            })
            .collect()
    }

    /// The full rendering of the applied state: what the table holds.
    pub fn render(&self) -> Value {
        to_value(&full_cmds(&self.table, &self.instances, &self.groups))
    }

    /// Replace everything with these instances and the sets of the groups
    /// their rules name (members from `groups`; a named group missing there
    /// gets an empty set). Instances whose interface nft cannot take, or
    /// whose interface another instance (with a smaller id) has, are left
    /// out and listed in [`Plan::skipped`].
    pub fn plan_full(&self, instances: Vec<Enforced>, groups: &BTreeMap<Uuid, Members>) -> Plan {
        let (instances, skipped) = admit(instances);
        let groups = needed_groups(&instances, groups);
        Plan {
            cmds: full_cmds(&self.table, &instances, &groups),
            change: Change::Full { instances, groups },
            skipped,
        }
    }

    /// The commands that take the applied state to the state with `update`
    /// made; `None` when nothing changes. Before any full ruleset was
    /// applied, a full plan of what the update holds.
    ///
    /// Members of a group no applied rule names are not kept: an update
    /// that makes a rule name a group should carry the group's members
    /// (without them its set starts empty). An interface stays with the
    /// instance that has it: another instance in the update claiming it is
    /// skipped.
    pub fn plan_update(&self, update: &Update) -> Option<Plan> {
        if !self.loaded {
            let instances = update.instances.values().flatten().cloned().collect();
            return Some(self.plan_full(instances, &update.groups));
        }
        let (next, skipped) = self.next_instances(update);
        let mut groups = self.group_set_changes(&next, update);
        self.member_changes(update, &mut groups);
        let skips_change = self.skips_change(update, &skipped);
        if next.is_empty() && groups.sets.is_empty() && !skips_change {
            return None;
        }

        let mut c = Cmds::new(&self.table);
        add_group_sets(&mut c, &groups);
        change_group_members(&mut c, &groups.members);
        let rendered = self.render_changes(&next);
        delete_gone_elements(&mut c, &rendered);
        let dropped = flush_and_refill_chains(&mut c, &rendered);
        add_new_elements(&mut c, &rendered);
        delete_dropped_chains(&mut c, dropped);
        delete_group_sets(&mut c, &groups.deleted);

        Some(Plan {
            cmds: c.out,
            change: Change::Delta {
                touched: update.instances.keys().copied().collect(),
                instances: next.into_iter().map(|(id, e)| (id, e.cloned())).collect(),
                groups: groups.sets,
            },
            skipped,
        })
    }

    /// Record that nft took `plan`.
    pub fn commit(&mut self, plan: Plan) {
        match plan.change {
            Change::Full { instances, groups } => {
                self.loaded = true;
                self.refs.clear();
                self.ifaces.clear();
                for (id, e) in &instances {
                    for g in referenced_groups(e) {
                        *self.refs.entry(g).or_default() += 1;
                    }
                    self.ifaces.insert(e.interface.clone(), *id);
                }
                self.instances = instances;
                self.groups = groups;
                self.unenforced.clear();
            }
            Change::Delta {
                touched,
                instances,
                groups,
            } => {
                for id in touched {
                    self.unenforced.remove(&id);
                }
                for (id, new) in instances {
                    if let Some(old) = self.instances.remove(&id) {
                        for g in referenced_groups(&old) {
                            if let Some(n) = self.refs.get_mut(&g) {
                                *n -= 1;
                                if *n == 0 {
                                    self.refs.remove(&g);
                                }
                            }
                        }
                        if self.ifaces.get(&old.interface) == Some(&id) {
                            self.ifaces.remove(&old.interface);
                        }
                    }
                    if let Some(new) = new {
                        for g in referenced_groups(&new) {
                            *self.refs.entry(g).or_default() += 1;
                        }
                        self.ifaces.insert(new.interface.clone(), id);
                        self.instances.insert(id, new);
                    }
                }
                for (g, m) in groups {
                    match m {
                        Some(m) => self.groups.insert(g, m),
                        None => self.groups.remove(&g),
                    };
                }
            }
        }
        for s in plan.skipped {
            self.unenforced.insert(s.instance, s.reason);
        }
    }
}

// ---- the steps of a delta ------------------------------------------------
//
// `plan_update` first works out what changes (instances, group sets, their
// members, the unenforced list), then emits commands in the one order nft
// takes in a single transaction: a set or chain exists before anything
// refers to it, and stops being referred to before it is deleted.

/// What an update does to the group sets.
struct GroupChanges<'a> {
    /// Every set that changes: `Some`, it exists afterwards with these
    /// members; `None`, it is deleted.
    sets: BTreeMap<Uuid, Option<Members>>,
    /// Sets to make: a rule names their group now and none did.
    created: Vec<Uuid>,
    /// Sets to delete: no rule names their group any more.
    deleted: Vec<Uuid>,
    /// Sets that stay but whose members change: the group, its applied
    /// members, its new ones.
    members: Vec<(Uuid, &'a Members, &'a Members)>,
}

/// An instance that changes, rendered as applied and as it becomes (`None`
/// where it is not there).
type Rerendered = (Option<Rendered>, Option<Rendered>);

impl Firewall {
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
        for (id, new) in &update.instances {
            let new = match new {
                Some(e) if e.instance != *id => {
                    skipped.push(Skipped {
                        instance: *id,
                        reason: format!("its entry is for instance {}", e.instance),
                    });
                    None
                }
                Some(e) => match admissible(e) {
                    Err(reason) => {
                        skipped.push(Skipped {
                            instance: *id,
                            reason,
                        });
                        None
                    }
                    Ok(()) => {
                        let holder = self
                            .ifaces
                            .get(&e.interface)
                            .filter(|h| **h != *id && !update.instances.contains_key(h))
                            .or_else(|| claimed.get(e.interface.as_str()));
                        match holder {
                            Some(h) => {
                                skipped.push(Skipped {
                                    instance: *id,
                                    reason: format!("interface {} is instance {h}'s", e.interface),
                                });
                                None
                            }
                            None => {
                                claimed.insert(&e.interface, *id);
                                Some(e)
                            }
                        }
                    }
                },
                None => None,
            };
            if self.instances.get(id) != new {
                next.insert(*id, new);
            }
        }
        (next, skipped)
    }

    /// Which group sets are made or deleted: by how many rules name each
    /// group once the instances in `next` changed. A new set gets its
    /// members from the update.
    fn group_set_changes<'a>(
        &self,
        next: &BTreeMap<Uuid, Option<&Enforced>>,
        update: &Update,
    ) -> GroupChanges<'a> {
        let mut refs_delta: BTreeMap<Uuid, isize> = BTreeMap::new();
        for (id, new) in next {
            if let Some(old) = self.instances.get(id) {
                for g in referenced_groups(old) {
                    *refs_delta.entry(g).or_default() -= 1;
                }
            }
            if let Some(new) = new {
                for g in referenced_groups(new) {
                    *refs_delta.entry(g).or_default() += 1;
                }
            }
        }
        let mut groups: BTreeMap<Uuid, Option<Members>> = BTreeMap::new();
        let mut created: Vec<Uuid> = Vec::new();
        let mut deleted: Vec<Uuid> = Vec::new();
        for (g, delta) in &refs_delta {
            let now = self.refs.get(g).copied().unwrap_or(0) as isize;
            match (self.groups.contains_key(g), now + delta > 0) {
                (false, true) => {
                    created.push(*g);
                    groups.insert(*g, Some(update.groups.get(g).cloned().unwrap_or_default()));
                }
                (true, false) => {
                    deleted.push(*g);
                    groups.insert(*g, None);
                }
                _ => {}
            }
        }
        GroupChanges {
            sets: groups,
            created,
            deleted,
            members: Vec::new(),
        }
    }

    /// The sets that stay but whose members the update changes, added to
    /// `groups`. Members of a group without a set are not kept.
    fn member_changes<'a>(&'a self, update: &'a Update, groups: &mut GroupChanges<'a>) {
        for (g, m) in &update.groups {
            if groups.sets.contains_key(g) {
                continue;
            }
            if let Some(old) = self.groups.get(g)
                && old != m
            {
                groups.members.push((*g, old, m));
                groups.sets.insert(*g, Some(m.clone()));
            }
        }
    }

    /// Whether the list of unenforced instances changes: a touched instance
    /// is skipped now for another reason than before, or not any more.
    fn skips_change(&self, update: &Update, skipped: &[Skipped]) -> bool {
        skipped
            .iter()
            .any(|s| self.unenforced.get(&s.instance) != Some(&s.reason))
            || update.instances.keys().any(|id| {
                self.unenforced.contains_key(id) && !skipped.iter().any(|s| s.instance == *id)
            })
    }

    /// The instances that change, rendered before and after.
    fn render_changes(&self, next: &BTreeMap<Uuid, Option<&Enforced>>) -> Vec<Rerendered> {
        next.iter()
            .map(|(id, new)| {
                (
                    self.instances.get(id).map(render_instance),
                    new.map(render_instance),
                )
            })
            .collect()
    }
}

/// The new group sets with their members: first, so that the rules below
/// can use them.
fn add_group_sets(c: &mut Cmds, groups: &GroupChanges) {
    for g in &groups.created {
        if let Some(Some(m)) = groups.sets.get(g) {
            add_group_set(c, *g, m);
        }
    }
}

/// The members that leave or join the sets that stay.
fn change_group_members(c: &mut Cmds, members: &[(Uuid, &Members, &Members)]) {
    for (g, old, new) in members {
        let (s4, s6) = (group_set4(*g), group_set6(*g));
        c.elements(
            Verb::Delete,
            &s4,
            addr_elems(old.ipv4.difference(&new.ipv4)),
        );
        c.elements(
            Verb::Delete,
            &s6,
            addr_elems(old.ipv6.difference(&new.ipv6)),
        );
        c.elements(Verb::Add, &s4, addr_elems(new.ipv4.difference(&old.ipv4)));
        c.elements(Verb::Add, &s6, addr_elems(new.ipv6.difference(&old.ipv6)));
    }
}

/// Elements that go: before their chains are deleted, and before an
/// interface moves to another instance.
fn delete_gone_elements(c: &mut Cmds, rendered: &[Rerendered]) {
    let gone = rendered.iter().flat_map(|(old, new)| {
        let keep: &[Elem] = new.as_ref().map_or(&[], |n| &n.elems);
        old.iter()
            .flat_map(|o| &o.elems)
            .filter(move |e| !keep.contains(e))
    });
    add_elements(c, Verb::Delete, gone);
}

/// Empty the chains that change or go; make the new ones; fill the new and
/// changed ones. Returns the chains that go, emptied here and deleted once
/// no element jumps to them.
fn flush_and_refill_chains<'r>(c: &mut Cmds, rendered: &'r [Rerendered]) -> Vec<&'r Name> {
    let mut refill: Vec<(&Name, &Vec<Rule>)> = Vec::new();
    let mut drop_chains: Vec<&Name> = Vec::new();
    let mut new_chains: Vec<&Name> = Vec::new();
    for (old, new) in rendered {
        let Some(r) = new.as_ref().or(old.as_ref()) else {
            continue;
        };
        let pairs = [
            (
                &r.in_chain,
                old.as_ref().map(|o| &o.ingress),
                new.as_ref().map(|n| &n.ingress),
            ),
            (
                &r.out_chain,
                old.as_ref().and_then(|o| o.egress.as_ref()),
                new.as_ref().and_then(|n| n.egress.as_ref()),
            ),
        ];
        for (chain, old, new) in pairs {
            match (old, new) {
                (Some(o), Some(n)) if o == n => {}
                (Some(_), Some(n)) => {
                    c.chain(Verb::Flush, chain);
                    refill.push((chain, n));
                }
                (Some(_), None) => {
                    c.chain(Verb::Flush, chain);
                    drop_chains.push(chain);
                }
                (None, Some(n)) => {
                    new_chains.push(chain);
                    refill.push((chain, n));
                }
                (None, None) => {}
            }
        }
    }
    for chain in new_chains {
        c.chain(Verb::Add, chain);
    }
    for (chain, rules) in refill {
        for rule in rules {
            c.rule(chain, rule.clone());
        }
    }
    drop_chains
}

/// Elements that come, once their chains exist.
fn add_new_elements(c: &mut Cmds, rendered: &[Rerendered]) {
    let come = rendered.iter().flat_map(|(old, new)| {
        let had: &[Elem] = old.as_ref().map_or(&[], |o| &o.elems);
        new.iter()
            .flat_map(|n| &n.elems)
            .filter(move |e| !had.contains(e))
    });
    add_elements(c, Verb::Add, come);
}

/// The emptied chains that go, now that no element jumps to them.
fn delete_dropped_chains(c: &mut Cmds, chains: Vec<&Name>) {
    for chain in chains {
        c.chain(Verb::Delete, chain);
    }
}

/// Group sets last: nothing uses them any more.
fn delete_group_sets(c: &mut Cmds, deleted: &[Uuid]) {
    for g in deleted {
        c.set(Verb::Delete, group_set4(*g), None);
        c.set(Verb::Delete, group_set6(*g), None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nft::ingress_chain;
    use crate::nft::tests::{id, instance, position, spec};
    use crate::{Direction, Match, Protocol, Remote};
    use std::collections::BTreeSet;
    use std::net::Ipv4Addr;

    fn loaded(instances: Vec<Enforced>, groups: &BTreeMap<Uuid, Members>) -> Firewall {
        let mut fw = Firewall::new("t");
        let plan = fw.plan_full(instances, groups);
        fw.commit(plan);
        fw
    }

    fn one(id: Uuid, e: Option<Enforced>) -> Update {
        Update {
            instances: BTreeMap::from([(id, e)]),
            groups: BTreeMap::new(),
        }
    }

    #[test]
    fn deltas_are_ordered_so_nft_takes_them() {
        let g = id(0xaa);
        let group_rule = spec(
            Direction::Ingress,
            Protocol::Tcp,
            Match::Ports { from: 80, to: 80 },
            Remote::Group(g),
        );
        let mut fw = loaded(
            vec![instance(1, vec![]), instance(2, vec![])],
            &BTreeMap::new(),
        );

        // A rule that names a group: its sets come before the rule.
        let u = Update {
            instances: BTreeMap::from([(id(1), Some(instance(1, vec![group_rule])))]),
            groups: BTreeMap::from([(
                g,
                Members {
                    ipv4: BTreeSet::from([Ipv4Addr::new(10, 0, 0, 2)]),
                    ipv6: BTreeSet::new(),
                },
            )]),
        };
        let plan = fw.plan_update(&u).unwrap();
        let doc = plan.doc();
        let set = position(&doc, &[r#""add""#, r#""set""#, "g4-aaaa"]).unwrap();
        let elems = position(&doc, &[r#""element""#, "g4-aaaa", "10.0.0.2"]).unwrap();
        let flush = position(&doc, &[r#""flush""#, &ingress_chain(id(1))]).unwrap();
        let rule = position(&doc, &["@g4-aaaa"]).unwrap();
        assert!(set < elems && set < rule && flush < rule, "{doc:#}");
        // Only instance 1's chain is touched; its elements stay.
        assert!(
            position(&doc, &[&ingress_chain(id(2))]).is_none(),
            "{doc:#}"
        );
        assert!(
            position(&doc, &[r#""element""#, "src4"]).is_none(),
            "{doc:#}"
        );
        fw.commit(plan);

        // The same again: nothing to do.
        assert!(fw.plan_update(&u).is_none());
        // Unknown instance going away: nothing to do.
        assert!(fw.plan_update(&one(id(9), None)).is_none());

        // The instance goes: its elements, then its chain, then the set.
        let plan = fw.plan_update(&one(id(1), None)).unwrap();
        let doc = plan.doc();
        let elem = position(&doc, &[r#""delete""#, r#""element""#, r#""ingress""#]).unwrap();
        let flush = position(&doc, &[r#""flush""#, &ingress_chain(id(1))]).unwrap();
        let chain = position(&doc, &[r#""delete""#, r#""chain""#, &ingress_chain(id(1))]).unwrap();
        let set = position(&doc, &[r#""delete""#, r#""set""#, "g4-aaaa"]).unwrap();
        assert!(elem < chain && flush < chain && chain < set, "{doc:#}");
        fw.commit(plan);
        assert!(fw.groups().is_empty());
        assert_eq!(fw.instances().len(), 1);
    }

    #[test]
    fn an_interface_stays_with_its_instance() {
        let mut fw = loaded(vec![instance(1, vec![])], &BTreeMap::new());
        let mut thief = instance(2, vec![]);
        thief.interface = "tap1".into();
        let plan = fw.plan_update(&one(id(2), Some(thief))).unwrap();
        assert_eq!(plan.commands(), 0);
        assert_eq!(plan.skipped().len(), 1);
        fw.commit(plan);
        assert_eq!(fw.unenforced().len(), 1);
        assert_eq!(fw.instances().len(), 1);
        // Its owner letting it go in the same update frees it.
        let mut moved = instance(1, vec![]);
        moved.interface = "tap9".into();
        let mut taker = instance(2, vec![]);
        taker.interface = "tap1".into();
        let u = Update {
            instances: BTreeMap::from([(id(1), Some(moved)), (id(2), Some(taker))]),
            groups: BTreeMap::new(),
        };
        let plan = fw.plan_update(&u).unwrap();
        assert!(plan.skipped().is_empty());
        fw.commit(plan);
        assert!(fw.unenforced().is_empty());
        assert_eq!(fw.instances().len(), 2);
    }
}
