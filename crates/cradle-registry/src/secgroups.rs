//! Security groups in the registry: every change is checked against the
//! in-memory state, persisted, applied in memory, and then handed to the
//! firewall worker as the smallest [`Update`] that covers it, under the
//! writer lock, so the firewall sees changes in the order they were made.
//! Handing over never waits for nft: the worker applies it on its own
//! thread.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, RwLockReadGuard};
use std::time::Duration;

use cradle_model::Instance;
use cradle_secgroups::state::{Limits, Op, SecGroups};
use cradle_secgroups::worker::{Status, Worker};
use cradle_secgroups::{Enforced, GroupView, Members, RuleRequest, RuleView, Update, parse_mac};
use uuid::Uuid;

use super::{Index, Registry, RegistryError, now};

/// What of an instance the firewall uses (its interface, mac, member
/// addresses, and link-local address); a change to it re-renders the
/// instance and the member sets of its groups.
pub(crate) fn enforced_identity(
    i: &Instance,
) -> (Option<&str>, &str, Vec<IpAddr>, Option<std::net::Ipv6Addr>) {
    let mut addrs: Vec<IpAddr> = vec![i.metadata_address];
    addrs.extend(i.local_ipv4.map(|h| IpAddr::V4(h.addr)));
    addrs.extend(i.local_ipv6.map(IpAddr::V6));
    (
        i.interface.as_deref(),
        i.mac.as_str(),
        addrs,
        i.link_local_ipv6,
    )
}

fn members_of(i: &Instance, m: &mut Members) {
    for a in enforced_identity(i).2 {
        match a {
            IpAddr::V4(a) => {
                m.ipv4.insert(a);
            }
            IpAddr::V6(a) => {
                m.ipv6.insert(a);
            }
        }
    }
}

impl Registry {
    /// Turn security groups on: load them, and give every instance that has
    /// no group of its own (made while they were off) its group now.
    pub fn enable_security_groups(mut self, limits: Limits) -> Result<Self, RegistryError> {
        let mut state = SecGroups::new(limits);
        let (ops, version) = self.store.load_secgroups()?;
        for op in ops {
            state.apply(&op);
        }
        // Catching up must not apply what this load holds already.
        self.sg_seen.store(version, Ordering::SeqCst);
        let missing: Vec<Arc<Instance>> = self
            .list()
            .into_iter()
            .filter(|i| state.own_group(i.id).is_none())
            .collect();
        for i in missing {
            let ops = state.plan_instance_group(i.id, &i.project_id, now());
            let version = self.store.apply_secgroups(&ops)?;
            self.own_sg(version, &ops);
            for op in &ops {
                state.apply(op);
            }
        }
        self.groups = Some(std::sync::RwLock::new(state));
        Ok(self)
    }

    pub fn security_groups_enabled(&self) -> bool {
        self.groups.is_some()
    }

    pub(crate) fn groups_read(&self) -> Option<RwLockReadGuard<'_, SecGroups>> {
        self.groups
            .as_ref()
            .map(|g| g.read().unwrap_or_else(|e| e.into_inner()))
    }

    fn sg(&self) -> Result<RwLockReadGuard<'_, SecGroups>, RegistryError> {
        self.groups_read().ok_or(RegistryError::SecGroupsDisabled)
    }

    /// Apply persisted ops in memory, then enforce what they touched.
    pub(crate) fn apply_groups(&self, ops: &[Op]) -> Result<(), RegistryError> {
        let Some(lock) = &self.groups else {
            return Ok(());
        };
        let (mut instances, mut groups) = (BTreeSet::new(), BTreeSet::new());
        {
            let mut state = lock.write().unwrap_or_else(|e| e.into_inner());
            state.affected(ops, &mut instances, &mut groups);
            for op in ops {
                state.apply(op);
            }
            state.affected(ops, &mut instances, &mut groups);
        }
        self.enforce(instances, groups)
    }

    /// After an instance's interface, mac or addresses changed.
    pub(crate) fn enforce_identity(&self, id: Uuid) -> Result<(), RegistryError> {
        let Some(state) = self.groups_read() else {
            return Ok(());
        };
        // The members of its groups change; the instances naming those
        // groups keep their rules.
        let groups: BTreeSet<Uuid> = state.groups_of(id).into_iter().collect();
        drop(state);
        self.enforce(BTreeSet::from([id]), groups)
    }

    /// Set where enforcement goes. Call [`Registry::enforce_all`] next.
    pub fn set_firewall(&self, worker: Arc<Worker>) {
        *self.firewall.write().unwrap_or_else(|e| e.into_inner()) = Some(worker);
    }

    fn worker(&self) -> Option<Arc<Worker>> {
        self.firewall
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The instance as the firewall sees it; `None` when it is gone or has
    /// no interface.
    fn enforced(&self, state: &SecGroups, index: &Index, id: Uuid) -> Option<Enforced> {
        // Another host's instances are enforced there; their addresses
        // still count as members of their groups (`members`).
        let i = index.by_id.get(&id).filter(|i| self.is_local(i))?;
        let interface = i.interface.clone()?;
        let mac = parse_mac(&i.mac)?;
        let mut m = Members::default();
        members_of(i, &mut m);
        // Its own link-local address may be sent from, but is no member
        // address of its groups: it means nothing off its link.
        m.ipv6.extend(i.link_local_ipv6);
        Some(Enforced {
            instance: id,
            interface,
            mac,
            ipv4: m.ipv4,
            ipv6: m.ipv6,
            rules: state.effective_rules(id),
        })
    }

    fn members(state: &SecGroups, index: &Index, group: Uuid) -> Members {
        let mut m = Members::default();
        for id in state.members(group) {
            if let Some(i) = index.by_id.get(&id) {
                members_of(i, &mut m);
            }
        }
        m
    }

    /// Everything the firewall should hold now: every instance with an
    /// interface, and the members of every group some rule names.
    pub fn firewall_desired(&self) -> (Vec<Enforced>, BTreeMap<Uuid, Members>) {
        let Some(state) = self.groups_read() else {
            return (Vec::new(), BTreeMap::new());
        };
        let index = self.read();
        let instances = index
            .by_id
            .keys()
            .filter_map(|id| self.enforced(&state, &index, *id))
            .collect();
        let groups = state
            .referenced_groups()
            .map(|g| (g, Self::members(&state, &index, g)))
            .collect();
        (instances, groups)
    }

    /// Ask for the whole ruleset to be applied (at start, or on request):
    /// the number to wait for, or `None` without a firewall.
    pub fn enforce_all(&self) -> Option<u64> {
        Some(self.worker()?.full())
    }

    /// Where enforcement stands, with a firewall.
    pub fn firewall_status(&self) -> Option<Status> {
        Some(self.worker()?.status())
    }

    /// Wait (holding no lock of the registry) until change `n` is enforced,
    /// at most `timeout`; whether it is. True without a firewall.
    pub fn firewall_wait(&self, n: u64, timeout: Duration) -> bool {
        self.worker().is_none_or(|w| w.wait(n, timeout))
    }

    fn enforce(
        &self,
        instances: BTreeSet<Uuid>,
        groups: BTreeSet<Uuid>,
    ) -> Result<(), RegistryError> {
        let Some(worker) = self.worker() else {
            return Ok(());
        };
        let Some(state) = self.groups_read() else {
            return Ok(());
        };
        let index = self.read();
        let update = Update {
            instances: instances
                .into_iter()
                .map(|id| (id, self.enforced(&state, &index, id)))
                .collect(),
            groups: groups
                .into_iter()
                .map(|g| (g, Self::members(&state, &index, g)))
                .collect(),
        };
        drop((index, state));
        if !update.is_empty() {
            worker.submit(update);
        }
        Ok(())
    }

    /// Persist and apply ops planned under the writer lock.
    fn commit_groups(&self, ops: &[Op]) -> Result<(), RegistryError> {
        let version = self.store.apply_secgroups(ops)?;
        self.own_sg(version, ops);
        self.apply_groups(ops)
    }

    // ---- the operations the APIs offer ---------------------------------

    /// The tenant's groups, with rules and members.
    pub fn sg_list(&self, tenant: &str) -> Result<Vec<GroupView>, RegistryError> {
        let state = self.sg()?;
        Ok(state
            .groups(tenant)
            .into_iter()
            .map(|g| state.view(g))
            .collect())
    }

    /// A group by its id or its instance's id.
    pub fn sg_show(&self, tenant: &str, key: &str) -> Result<GroupView, RegistryError> {
        let state = self.sg()?;
        let g = state
            .group(tenant, key)
            .ok_or_else(|| cradle_secgroups::state::SgError::NoGroup(key.to_string()))?;
        Ok(state.view(g))
    }

    pub fn sg_create(
        &self,
        tenant: &str,
        name: &str,
        description: &str,
    ) -> Result<GroupView, RegistryError> {
        let _w = self.lock_writer();
        let (op, id) = self
            .sg()?
            .plan_create_group(tenant, name, description, now())?;
        self.commit_groups(std::slice::from_ref(&op))?;
        self.sg_show(tenant, &id.to_string())
    }

    pub fn sg_update(
        &self,
        tenant: &str,
        key: &str,
        name: Option<&str>,
        description: Option<&str>,
    ) -> Result<GroupView, RegistryError> {
        let _w = self.lock_writer();
        let next = self
            .sg()?
            .plan_update_group(tenant, key, name, description)?;
        let id = next.id.to_string();
        self.commit_groups(&[Op::UpdateGroup(next)])?;
        self.sg_show(tenant, &id)
    }

    pub fn sg_delete(&self, tenant: &str, key: &str) -> Result<(), RegistryError> {
        let _w = self.lock_writer();
        let ops = self.sg()?.plan_delete_group(tenant, key)?;
        self.commit_groups(&ops)
    }

    pub fn sg_add_rule(
        &self,
        tenant: &str,
        group: &str,
        rule: &RuleRequest,
    ) -> Result<RuleView, RegistryError> {
        let spec = rule
            .validate()
            .map_err(cradle_secgroups::state::SgError::Invalid)?;
        let _w = self.lock_writer();
        let rule = self.sg()?.plan_add_rule(tenant, group, spec, now())?;
        let view = RuleView::of(&rule);
        self.commit_groups(&[Op::AddRule(rule)])?;
        Ok(view)
    }

    pub fn sg_delete_rule(&self, tenant: &str, id: &str) -> Result<(), RegistryError> {
        let _w = self.lock_writer();
        let op = self.sg()?.plan_delete_rule(tenant, id)?;
        self.commit_groups(&[op])
    }

    /// Attach a tenant group to an instance (by id or name) of the tenant.
    pub fn sg_attach(
        &self,
        tenant: &str,
        group: &str,
        instance: &str,
    ) -> Result<(), RegistryError> {
        let _w = self.lock_writer();
        let i = self.instance_of(tenant, instance)?;
        let op = self.sg()?.plan_attach(tenant, group, i.id, &i.project_id)?;
        self.commit_groups(&[op])
    }

    pub fn sg_detach(
        &self,
        tenant: &str,
        group: &str,
        instance: &str,
    ) -> Result<(), RegistryError> {
        let _w = self.lock_writer();
        let i = self.instance_of(tenant, instance)?;
        let op = self.sg()?.plan_detach(tenant, group, i.id)?;
        self.commit_groups(&[op])
    }

    /// The tenant's instance by id or name; another tenant's is not found.
    fn instance_of(&self, tenant: &str, key: &str) -> Result<Arc<Instance>, RegistryError> {
        self.get(key)
            .ok()
            .filter(|i| i.project_id == tenant)
            .ok_or_else(|| RegistryError::NotFound(key.to_string()))
    }

    pub fn sg_defaults(&self, tenant: &str) -> Result<Vec<RuleView>, RegistryError> {
        Ok(self
            .sg()?
            .defaults(tenant)
            .iter()
            .map(RuleView::of_default)
            .collect())
    }

    pub fn sg_add_default(
        &self,
        tenant: &str,
        rule: &RuleRequest,
    ) -> Result<RuleView, RegistryError> {
        let spec = rule
            .validate()
            .map_err(cradle_secgroups::state::SgError::Invalid)?;
        let _w = self.lock_writer();
        let d = self.sg()?.plan_add_default(tenant, spec, now())?;
        let view = RuleView::of_default(&d);
        self.commit_groups(&[Op::AddDefault(d)])?;
        Ok(view)
    }

    pub fn sg_delete_default(&self, tenant: &str, id: &str) -> Result<(), RegistryError> {
        let _w = self.lock_writer();
        let op = self.sg()?.plan_delete_default(tenant, id)?;
        self.commit_groups(&[op])
    }

    /// The groups an instance (by id or name) is in, its own first.
    pub fn sg_instance_groups(&self, key: &str) -> Result<Vec<GroupView>, RegistryError> {
        let state = self.sg()?;
        let i = self.get(key)?;
        Ok(state
            .groups_of(i.id)
            .into_iter()
            .filter_map(|g| state.get(g))
            .map(|g| state.view(g))
            .collect())
    }
}
