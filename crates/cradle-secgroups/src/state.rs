//! Every group, rule, attachment and tenant default in memory.
//!
//! Changes are planned first (`plan_*` check everything and return the
//! [`Op`]s that make the change, touching nothing), then persisted by the
//! caller, then applied here with [`SecGroups::apply`]. Loading from a store
//! is applying the stored rows as ops, so there is one way in.
//!
//! Every lookup takes the caller's tenant: a group of another tenant answers
//! exactly like a group that does not exist.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use time::OffsetDateTime;
use uuid::Uuid;

use crate::model::{
    DefaultRule, Group, GroupView, Invalid, Remote, Rule, RuleSpec, RuleView, instance_group_name,
    validate_group, validate_tenant,
};

/// One change to the security-group state, as persisted (and, as JSON, as
/// the store's log of changes that other hosts replay).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "op", content = "with", rename_all = "snake_case")]
pub enum Op {
    AddGroup(Group),
    /// A new name or description for an existing group.
    UpdateGroup(Group),
    /// Its rules and attachments are removed by earlier ops of the same change.
    RemoveGroup(Uuid),
    AddRule(Rule),
    RemoveRule(Uuid),
    Attach {
        group: Uuid,
        instance: Uuid,
    },
    Detach {
        group: Uuid,
        instance: Uuid,
    },
    AddDefault(DefaultRule),
    RemoveDefault(Uuid),
}

/// Caps, from configuration.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_rules_per_group: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_rules_per_group: 100,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SgError {
    /// 400.
    #[error(transparent)]
    Invalid(#[from] Invalid),
    /// 404: missing, or another tenant's.
    #[error("no security group {0:?}")]
    NoGroup(String),
    #[error("no security group rule {0:?}")]
    NoRule(String),
    #[error("no default rule {0:?}")]
    NoDefault(String),
    #[error("{0}")]
    NotAttached(String),
    /// 409.
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    InUse(String),
    #[error("the group already has {0} rules, the most allowed")]
    TooManyRules(usize),
}

/// Who a change is for: the tenant in the URL.
pub type Tenant<'a> = &'a str;

#[derive(Debug, Default)]
pub struct SecGroups {
    limits: Limits,
    groups: HashMap<Uuid, Group>,
    names: HashMap<(String, String), Uuid>,
    rules: HashMap<Uuid, Rule>,
    /// Rule ids per group, oldest first.
    group_rules: HashMap<Uuid, Vec<Uuid>>,
    members: HashMap<Uuid, BTreeSet<Uuid>>,
    groups_of: HashMap<Uuid, BTreeSet<Uuid>>,
    /// Instance → its own group.
    own: HashMap<Uuid, Uuid>,
    /// Remote group → groups with rules naming it, and how many such rules.
    referrers: HashMap<Uuid, BTreeMap<Uuid, usize>>,
    /// Tenant → its default rules, oldest first.
    defaults: HashMap<String, Vec<DefaultRule>>,
}

impl SecGroups {
    pub fn new(limits: Limits) -> Self {
        SecGroups {
            limits,
            ..Default::default()
        }
    }

    // ---- reads -------------------------------------------------------

    /// The tenant's groups, instance groups included, by name.
    pub fn groups(&self, tenant: Tenant) -> Vec<&Group> {
        let mut out: Vec<&Group> = self
            .groups
            .values()
            .filter(|g| g.tenant == tenant)
            .collect();
        out.sort_by(|a, b| (&a.name, a.id).cmp(&(&b.name, b.id)));
        out
    }

    /// Every group of every tenant.
    pub fn all_groups(&self) -> impl Iterator<Item = &Group> {
        self.groups.values()
    }

    /// A group by id, whatever its tenant (for callers that already know it).
    pub fn get(&self, id: Uuid) -> Option<&Group> {
        self.groups.get(&id)
    }

    /// A group by id, or by the id of the instance it belongs to; `None` when
    /// it is missing or another tenant's.
    pub fn group(&self, tenant: Tenant, key: &str) -> Option<&Group> {
        let id = Uuid::parse_str(key).ok()?;
        let id = if self.groups.contains_key(&id) {
            id
        } else {
            *self.own.get(&id)?
        };
        self.groups.get(&id).filter(|g| g.tenant == tenant)
    }

    fn group_or_404(&self, tenant: Tenant, key: &str) -> Result<&Group, SgError> {
        self.group(tenant, key)
            .ok_or_else(|| SgError::NoGroup(key.to_string()))
    }

    /// The group's rules, oldest first.
    pub fn rules(&self, group: Uuid) -> Vec<&Rule> {
        self.group_rules
            .get(&group)
            .map(|ids| ids.iter().filter_map(|id| self.rules.get(id)).collect())
            .unwrap_or_default()
    }

    /// A rule by id, if its group is the tenant's.
    pub fn rule(&self, tenant: Tenant, id: &str) -> Option<&Rule> {
        let id = Uuid::parse_str(id).ok()?;
        let rule = self.rules.get(&id)?;
        let group = self.groups.get(&rule.group_id)?;
        (group.tenant == tenant).then_some(rule)
    }

    /// Instances attached to the group (an instance group's own instance too).
    pub fn members(&self, group: Uuid) -> impl Iterator<Item = Uuid> + '_ {
        self.members.get(&group).into_iter().flatten().copied()
    }

    /// Groups the instance is in, its own first.
    pub fn groups_of(&self, instance: Uuid) -> Vec<Uuid> {
        let own = self.own.get(&instance).copied();
        own.into_iter()
            .chain(
                self.groups_of
                    .get(&instance)
                    .into_iter()
                    .flatten()
                    .copied()
                    .filter(move |g| Some(*g) != own),
            )
            .collect()
    }

    /// The instance's own group.
    pub fn own_group(&self, instance: Uuid) -> Option<Uuid> {
        self.own.get(&instance).copied()
    }

    /// The union of the rules of every group the instance is in.
    pub fn effective_rules(&self, instance: Uuid) -> Vec<RuleSpec> {
        let set: BTreeSet<RuleSpec> = self
            .groups_of
            .get(&instance)
            .into_iter()
            .flatten()
            .flat_map(|g| self.rules(*g))
            .map(|r| r.spec)
            .collect();
        set.into_iter().collect()
    }

    /// Groups that some rule names as its remote.
    pub fn referenced_groups(&self) -> impl Iterator<Item = Uuid> + '_ {
        self.referrers
            .iter()
            .filter(|(_, by)| !by.is_empty())
            .map(|(g, _)| *g)
    }

    /// Instances whose rules name `group` as their remote.
    pub fn instances_referring_to(&self, group: Uuid) -> BTreeSet<Uuid> {
        self.referrers
            .get(&group)
            .into_iter()
            .flat_map(|by| by.keys())
            .flat_map(|g| self.members(*g))
            .collect()
    }

    /// The group with its rules and members.
    pub fn view(&self, group: &Group) -> GroupView {
        GroupView {
            id: group.id,
            tenant: group.tenant.clone(),
            name: group.name.clone(),
            description: group.description.clone(),
            instance_id: group.instance_id,
            rules: self.rules(group.id).into_iter().map(RuleView::of).collect(),
            instances: self.members(group.id).collect(),
            created_at: group.created_at,
        }
    }

    pub fn defaults(&self, tenant: Tenant) -> &[DefaultRule] {
        self.defaults.get(tenant).map(Vec::as_slice).unwrap_or(&[])
    }

    // ---- plans -------------------------------------------------------

    /// The group every new instance gets, seeded from its tenant's defaults,
    /// with the instance as its member.
    pub fn plan_instance_group(
        &self,
        instance: Uuid,
        tenant: Tenant,
        now: OffsetDateTime,
    ) -> Vec<Op> {
        let group = Group {
            id: Uuid::new_v4(),
            tenant: tenant.to_string(),
            name: instance_group_name(instance),
            description: format!("the own security group of instance {instance}"),
            instance_id: Some(instance),
            created_at: now,
        };
        let gid = group.id;
        let mut ops = vec![
            Op::AddGroup(group),
            Op::Attach {
                group: gid,
                instance,
            },
        ];
        for d in self.defaults(tenant) {
            ops.push(Op::AddRule(Rule {
                id: Uuid::new_v4(),
                group_id: gid,
                spec: d.spec,
                created_at: now,
            }));
        }
        ops
    }

    /// Everything that goes with an instance: its attachments, its own group,
    /// and rules elsewhere that name its own group as their remote.
    pub fn plan_remove_instance(&self, instance: Uuid) -> Vec<Op> {
        let mut ops = Vec::new();
        if let Some(own) = self.own.get(&instance) {
            for (g, _) in self.referrers.get(own).into_iter().flatten() {
                for r in self.rules(*g) {
                    if r.spec.remote == Remote::Group(*own) {
                        ops.push(Op::RemoveRule(r.id));
                    }
                }
            }
            for r in self.rules(*own) {
                if !ops.contains(&Op::RemoveRule(r.id)) {
                    ops.push(Op::RemoveRule(r.id));
                }
            }
        }
        for g in self.groups_of.get(&instance).into_iter().flatten() {
            ops.push(Op::Detach {
                group: *g,
                instance,
            });
        }
        if let Some(own) = self.own.get(&instance) {
            ops.push(Op::RemoveGroup(*own));
        }
        ops
    }

    pub fn plan_create_group(
        &self,
        tenant: Tenant,
        name: &str,
        description: &str,
        now: OffsetDateTime,
    ) -> Result<(Op, Uuid), SgError> {
        validate_tenant(tenant)?;
        validate_group(name, description)?;
        if self
            .names
            .contains_key(&(tenant.to_string(), name.to_string()))
        {
            return Err(SgError::Conflict(format!(
                "the tenant already has a group named {name:?}"
            )));
        }
        let id = Uuid::new_v4();
        Ok((
            Op::AddGroup(Group {
                id,
                tenant: tenant.to_string(),
                name: name.to_string(),
                description: description.to_string(),
                instance_id: None,
                created_at: now,
            }),
            id,
        ))
    }

    /// Rename a tenant group or change its description.
    pub fn plan_update_group(
        &self,
        tenant: Tenant,
        key: &str,
        name: Option<&str>,
        description: Option<&str>,
    ) -> Result<Group, SgError> {
        let g = self.group_or_404(tenant, key)?;
        if let Some(i) = g.instance_id {
            return Err(SgError::InUse(format!(
                "group {} belongs to instance {i}; its name and description are fixed",
                g.id
            )));
        }
        let mut next = g.clone();
        if let Some(n) = name {
            next.name = n.to_string();
        }
        if let Some(d) = description {
            next.description = d.to_string();
        }
        validate_group(&next.name, &next.description)?;
        if next.name != g.name
            && self
                .names
                .contains_key(&(tenant.to_string(), next.name.clone()))
        {
            return Err(SgError::Conflict(format!(
                "the tenant already has a group named {:?}",
                next.name
            )));
        }
        Ok(next)
    }

    pub fn plan_delete_group(&self, tenant: Tenant, key: &str) -> Result<Vec<Op>, SgError> {
        let g = self.group_or_404(tenant, key)?;
        if let Some(i) = g.instance_id {
            return Err(SgError::InUse(format!(
                "group {} belongs to instance {i} and goes when the instance is removed",
                g.id
            )));
        }
        let attached: Vec<String> = self.members(g.id).map(|i| i.to_string()).collect();
        if !attached.is_empty() {
            return Err(SgError::InUse(format!(
                "group {} is attached to instance(s) {}; detach it first",
                g.id,
                attached.join(", ")
            )));
        }
        let by: Vec<String> = self
            .referrers
            .get(&g.id)
            .into_iter()
            .flat_map(|m| m.keys())
            .filter(|other| **other != g.id)
            .map(|other| other.to_string())
            .collect();
        if !by.is_empty() {
            return Err(SgError::InUse(format!(
                "rules in group(s) {} name group {} as their remote; delete them first",
                by.join(", "),
                g.id
            )));
        }
        if self
            .defaults(tenant)
            .iter()
            .any(|d| d.spec.remote == Remote::Group(g.id))
        {
            return Err(SgError::InUse(format!(
                "a default rule of the tenant names group {} as its remote; delete it first",
                g.id
            )));
        }
        let mut ops: Vec<Op> = self
            .rules(g.id)
            .iter()
            .map(|r| Op::RemoveRule(r.id))
            .collect();
        ops.push(Op::RemoveGroup(g.id));
        Ok(ops)
    }

    /// The remote group of a rule must be the tenant's. An instance id there
    /// means that instance's own group, as it does in paths.
    fn check_remote(&self, tenant: Tenant, spec: &mut RuleSpec) -> Result<(), SgError> {
        if let Remote::Group(r) = spec.remote
            && !self.groups.contains_key(&r)
            && let Some(own) = self.own.get(&r)
        {
            spec.remote = Remote::Group(*own);
        }
        if let Remote::Group(r) = spec.remote {
            match self.groups.get(&r) {
                Some(g) if g.tenant == tenant => {}
                _ => {
                    return Err(SgError::Invalid(Invalid {
                        field: "remote_group_id".into(),
                        message: format!("no security group {r} for this tenant"),
                    }));
                }
            }
        }
        Ok(())
    }

    pub fn plan_add_rule(
        &self,
        tenant: Tenant,
        group: &str,
        mut spec: RuleSpec,
        now: OffsetDateTime,
    ) -> Result<Rule, SgError> {
        let g = self.group_or_404(tenant, group)?;
        self.check_remote(tenant, &mut spec)?;
        let existing = self.rules(g.id);
        if let Some(dup) = existing.iter().find(|r| r.spec == spec) {
            return Err(SgError::Conflict(format!(
                "the group already has this rule ({})",
                dup.id
            )));
        }
        if existing.len() >= self.limits.max_rules_per_group {
            return Err(SgError::TooManyRules(self.limits.max_rules_per_group));
        }
        Ok(Rule {
            id: Uuid::new_v4(),
            group_id: g.id,
            spec,
            created_at: now,
        })
    }

    pub fn plan_delete_rule(&self, tenant: Tenant, id: &str) -> Result<Op, SgError> {
        let rule = self
            .rule(tenant, id)
            .ok_or_else(|| SgError::NoRule(id.to_string()))?;
        Ok(Op::RemoveRule(rule.id))
    }

    /// Attach a tenant group to an instance of the same tenant.
    pub fn plan_attach(
        &self,
        tenant: Tenant,
        group: &str,
        instance: Uuid,
        instance_tenant: &str,
    ) -> Result<Op, SgError> {
        let g = self.group_or_404(tenant, group)?;
        if instance_tenant != tenant {
            return Err(SgError::NotAttached(format!(
                "no instance {instance} for this tenant"
            )));
        }
        if g.instance_id.is_some() {
            return Err(SgError::Invalid(Invalid {
                field: "group".into(),
                message: format!(
                    "group {} is an instance's own group and cannot be attached elsewhere",
                    g.id
                ),
            }));
        }
        if self
            .members
            .get(&g.id)
            .is_some_and(|m| m.contains(&instance))
        {
            return Err(SgError::Conflict(format!(
                "group {} is already attached to instance {instance}",
                g.id
            )));
        }
        Ok(Op::Attach {
            group: g.id,
            instance,
        })
    }

    pub fn plan_detach(&self, tenant: Tenant, group: &str, instance: Uuid) -> Result<Op, SgError> {
        let g = self.group_or_404(tenant, group)?;
        if g.instance_id == Some(instance) {
            return Err(SgError::Invalid(Invalid {
                field: "group".into(),
                message: format!("group {} is the instance's own group", g.id),
            }));
        }
        if !self
            .members
            .get(&g.id)
            .is_some_and(|m| m.contains(&instance))
        {
            return Err(SgError::NotAttached(format!(
                "group {} is not attached to instance {instance}",
                g.id
            )));
        }
        Ok(Op::Detach {
            group: g.id,
            instance,
        })
    }

    pub fn plan_add_default(
        &self,
        tenant: Tenant,
        mut spec: RuleSpec,
        now: OffsetDateTime,
    ) -> Result<DefaultRule, SgError> {
        validate_tenant(tenant)?;
        self.check_remote(tenant, &mut spec)?;
        if let Remote::Group(r) = spec.remote
            && self.groups.get(&r).is_some_and(|g| g.instance_id.is_some())
        {
            return Err(SgError::Invalid(Invalid {
                field: "remote_group_id".into(),
                message: "a default rule cannot name an instance's own group".into(),
            }));
        }
        let existing = self.defaults(tenant);
        if let Some(dup) = existing.iter().find(|d| d.spec == spec) {
            return Err(SgError::Conflict(format!(
                "the tenant already has this default rule ({})",
                dup.id
            )));
        }
        if existing.len() >= self.limits.max_rules_per_group {
            return Err(SgError::TooManyRules(self.limits.max_rules_per_group));
        }
        Ok(DefaultRule {
            id: Uuid::new_v4(),
            tenant: tenant.to_string(),
            spec,
            created_at: now,
        })
    }

    pub fn plan_delete_default(&self, tenant: Tenant, id: &str) -> Result<Op, SgError> {
        let found = Uuid::parse_str(id)
            .ok()
            .filter(|id| self.defaults(tenant).iter().any(|d| d.id == *id));
        found
            .map(Op::RemoveDefault)
            .ok_or_else(|| SgError::NoDefault(id.to_string()))
    }

    // ---- what a change touches --------------------------------------

    /// Instances whose effective rules, and groups whose members, `ops`
    /// change. Call it before and after applying, and take the union:
    /// removals are seen before, additions after. (The instances whose rules
    /// name a group are not touched by its membership: the firewall follows
    /// the group's members.)
    pub fn affected(
        &self,
        ops: &[Op],
        instances: &mut BTreeSet<Uuid>,
        groups: &mut BTreeSet<Uuid>,
    ) {
        for op in ops {
            match op {
                Op::AddRule(r) => {
                    instances.extend(self.members(r.group_id));
                    if let Remote::Group(g) = r.spec.remote {
                        groups.insert(g);
                    }
                }
                Op::RemoveRule(id) => {
                    if let Some(r) = self.rules.get(id) {
                        instances.extend(self.members(r.group_id));
                        if let Remote::Group(g) = r.spec.remote {
                            groups.insert(g);
                        }
                    }
                }
                Op::Attach { group, instance } | Op::Detach { group, instance } => {
                    instances.insert(*instance);
                    groups.insert(*group);
                }
                Op::AddGroup(g) => {
                    groups.insert(g.id);
                }
                Op::UpdateGroup(_) => {}
                Op::RemoveGroup(g) => {
                    groups.insert(*g);
                }
                Op::AddDefault(_) | Op::RemoveDefault(_) => {}
            }
        }
    }

    // ---- apply -------------------------------------------------------

    /// Apply a persisted op. Ops come from a plan (or the store), so they
    /// are known to fit; an op about something missing is ignored.
    pub fn apply(&mut self, op: &Op) {
        match op {
            Op::AddGroup(g) => {
                self.names.insert((g.tenant.clone(), g.name.clone()), g.id);
                if let Some(i) = g.instance_id {
                    self.own.insert(i, g.id);
                }
                self.groups.insert(g.id, g.clone());
            }
            Op::UpdateGroup(g) => {
                if let Some(old) = self.groups.get(&g.id) {
                    self.names.remove(&(old.tenant.clone(), old.name.clone()));
                    self.names.insert((g.tenant.clone(), g.name.clone()), g.id);
                    self.groups.insert(g.id, g.clone());
                }
            }
            Op::RemoveGroup(id) => {
                if let Some(g) = self.groups.remove(id) {
                    self.names.remove(&(g.tenant.clone(), g.name.clone()));
                    if let Some(i) = g.instance_id {
                        self.own.remove(&i);
                    }
                }
                for rid in self.group_rules.remove(id).unwrap_or_default() {
                    self.forget_rule(rid);
                }
                for i in self.members.remove(id).unwrap_or_default() {
                    if let Some(gs) = self.groups_of.get_mut(&i) {
                        gs.remove(id);
                    }
                }
            }
            Op::AddRule(r) => {
                self.group_rules.entry(r.group_id).or_default().push(r.id);
                if let Remote::Group(remote) = r.spec.remote {
                    *self
                        .referrers
                        .entry(remote)
                        .or_default()
                        .entry(r.group_id)
                        .or_default() += 1;
                }
                self.rules.insert(r.id, r.clone());
            }
            Op::RemoveRule(id) => {
                if let Some(r) = self.rules.get(id) {
                    let gid = r.group_id;
                    if let Some(ids) = self.group_rules.get_mut(&gid) {
                        ids.retain(|x| x != id);
                    }
                }
                self.forget_rule(*id);
            }
            Op::Attach { group, instance } => {
                self.members.entry(*group).or_default().insert(*instance);
                self.groups_of.entry(*instance).or_default().insert(*group);
            }
            Op::Detach { group, instance } => {
                if let Some(m) = self.members.get_mut(group) {
                    m.remove(instance);
                }
                if let Some(gs) = self.groups_of.get_mut(instance) {
                    gs.remove(group);
                    if gs.is_empty() {
                        self.groups_of.remove(instance);
                    }
                }
            }
            Op::AddDefault(d) => self
                .defaults
                .entry(d.tenant.clone())
                .or_default()
                .push(d.clone()),
            Op::RemoveDefault(id) => {
                for list in self.defaults.values_mut() {
                    list.retain(|d| d.id != *id);
                }
            }
        }
    }

    fn forget_rule(&mut self, id: Uuid) {
        if let Some(r) = self.rules.remove(&id)
            && let Remote::Group(remote) = r.spec.remote
            && let Some(by) = self.referrers.get_mut(&remote)
        {
            if let Some(n) = by.get_mut(&r.group_id) {
                *n -= 1;
                if *n == 0 {
                    by.remove(&r.group_id);
                }
            }
            if by.is_empty() {
                self.referrers.remove(&remote);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::RuleRequest;

    fn spec(v: serde_json::Value) -> RuleSpec {
        serde_json::from_value::<RuleRequest>(v)
            .unwrap()
            .validate()
            .unwrap()
    }

    fn apply(s: &mut SecGroups, ops: &[Op]) {
        for op in ops {
            s.apply(op);
        }
    }

    #[test]
    fn instance_groups_defaults_sharing_and_remote_groups() {
        let now = OffsetDateTime::UNIX_EPOCH;
        let mut s = SecGroups::new(Limits {
            max_rules_per_group: 3,
        });
        let d = s
            .plan_add_default(
                "t1",
                spec(serde_json::json!({"protocol": "tcp", "from_port": 22})),
                now,
            )
            .unwrap();
        s.apply(&Op::AddDefault(d));
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        let ops = s.plan_instance_group(a, "t1", now);
        apply(&mut s, &ops);
        let ops = s.plan_instance_group(b, "t1", now);
        apply(&mut s, &ops);
        assert_eq!(s.effective_rules(a).len(), 1, "seeded from the default");
        let own_a = s.own_group(a).unwrap();
        assert_eq!(s.group("t1", &a.to_string()).unwrap().id, own_a);
        assert!(s.group("t2", &a.to_string()).is_none(), "tenant filtered");

        // A shared group whose rule is sourced from a's own group.
        let (op, web) = s.plan_create_group("t1", "web", "", now).unwrap();
        s.apply(&op);
        let rule = s
            .plan_add_rule(
                "t1",
                &web.to_string(),
                spec(serde_json::json!({"remote_group_id": own_a.to_string()})),
                now,
            )
            .unwrap();
        s.apply(&Op::AddRule(rule.clone()));
        let attach = s.plan_attach("t1", &web.to_string(), b, "t1").unwrap();
        let (mut inst, mut groups) = (BTreeSet::new(), BTreeSet::new());
        s.affected(std::slice::from_ref(&attach), &mut inst, &mut groups);
        s.apply(&attach);
        s.affected(std::slice::from_ref(&attach), &mut inst, &mut groups);
        assert!(inst.contains(&b) && groups.contains(&web));
        assert_eq!(s.effective_rules(b).len(), 2);
        assert_eq!(s.instances_referring_to(own_a), BTreeSet::from([b]));

        // Errors.
        assert!(matches!(
            s.plan_add_rule("t1", &web.to_string(), rule.spec, now),
            Err(SgError::Conflict(_))
        ));
        assert!(matches!(
            s.plan_delete_group("t1", &web.to_string()),
            Err(SgError::InUse(_))
        ));
        assert!(matches!(
            s.plan_delete_group("t2", &web.to_string()),
            Err(SgError::NoGroup(_))
        ));
        assert!(matches!(
            s.plan_attach("t1", &own_a.to_string(), b, "t1"),
            Err(SgError::Invalid(_))
        ));
        for port in [80, 81] {
            let r = s
                .plan_add_rule(
                    "t1",
                    &web.to_string(),
                    spec(serde_json::json!({"protocol": "tcp", "from_port": port})),
                    now,
                )
                .unwrap();
            s.apply(&Op::AddRule(r));
        }
        assert!(matches!(
            s.plan_add_rule(
                "t1",
                &web.to_string(),
                spec(serde_json::json!({"protocol": "udp"})),
                now
            ),
            Err(SgError::TooManyRules(3))
        ));

        // Removing a: its group, its attachment, and the rule naming it go.
        let ops = s.plan_remove_instance(a);
        apply(&mut s, &ops);
        assert!(s.own_group(a).is_none());
        assert_eq!(s.rules(web).len(), 2);
        assert!(s.instances_referring_to(own_a).is_empty());
        let ops = s.plan_remove_instance(b);
        apply(&mut s, &ops);
        assert!(s.plan_delete_group("t1", &web.to_string()).is_ok());
    }
}
