//! Security groups and the firewall. Every group operation names its
//! tenant; another tenant's group, rule or instance answers as a missing
//! one (the registry looks everything up within the tenant).

use cradle_model::answers::{FirewallApplied, FirewallView};
use cradle_registry::{Registry, RegistryError};
use cradle_secgroups::nft::Firewall;
use cradle_secgroups::{GroupView, RuleRequest, RuleView};
use tracing::info;

use crate::caller::{Action, authorize};
use crate::{Caller, Core, Error, Kind, blocking};

impl Core {
    /// The tenant's groups, with their rules and members.
    pub fn security_groups(&self, caller: &Caller, tenant: &str) -> Result<Vec<GroupView>, Error> {
        authorize(caller, Action::Tenant { tenant })?;
        Ok(self.registry.sg_list(tenant)?)
    }

    /// A group by its id or its instance's id.
    pub fn security_group(
        &self,
        caller: &Caller,
        tenant: &str,
        key: &str,
    ) -> Result<GroupView, Error> {
        authorize(caller, Action::Tenant { tenant })?;
        Ok(self.registry.sg_show(tenant, key)?)
    }

    pub async fn create_security_group(
        &self,
        caller: &Caller,
        tenant: &str,
        name: String,
        description: String,
    ) -> Result<GroupView, Error> {
        authorize(caller, Action::Tenant { tenant })?;
        let (registry, t) = (self.registry.clone(), tenant.to_string());
        let view = blocking(move || Ok(registry.sg_create(&t, &name, &description)?)).await?;
        info!(group = %view.id, tenant = %view.tenant, by = %caller.name, "security group created");
        Ok(view)
    }

    /// Rename a tenant group or change its description.
    pub async fn update_security_group(
        &self,
        caller: &Caller,
        tenant: &str,
        key: &str,
        name: Option<String>,
        description: Option<String>,
    ) -> Result<GroupView, Error> {
        authorize(caller, Action::Tenant { tenant })?;
        let (registry, t, k) = (self.registry.clone(), tenant.to_string(), key.to_string());
        blocking(move || Ok(registry.sg_update(&t, &k, name.as_deref(), description.as_deref())?))
            .await
    }

    pub async fn delete_security_group(
        &self,
        caller: &Caller,
        tenant: &str,
        key: &str,
    ) -> Result<(), Error> {
        self.delete(caller, tenant, key, Registry::sg_delete).await
    }

    pub async fn add_rule(
        &self,
        caller: &Caller,
        tenant: &str,
        group: &str,
        rule: RuleRequest,
    ) -> Result<RuleView, Error> {
        authorize(caller, Action::Tenant { tenant })?;
        let (registry, t, g) = (self.registry.clone(), tenant.to_string(), group.to_string());
        let view = blocking(move || Ok(registry.sg_add_rule(&t, &g, &rule)?)).await?;
        info!(rule = %view.id, by = %caller.name, "security group rule added");
        Ok(view)
    }

    pub async fn delete_rule(&self, caller: &Caller, tenant: &str, id: &str) -> Result<(), Error> {
        self.delete(caller, tenant, id, Registry::sg_delete_rule)
            .await
    }

    /// Put one of the tenant's instances (by id or name) in a tenant group.
    pub async fn attach_group(
        &self,
        caller: &Caller,
        tenant: &str,
        group: &str,
        instance: &str,
    ) -> Result<(), Error> {
        self.membership(caller, tenant, group, instance, Registry::sg_attach)
            .await
    }

    pub async fn detach_group(
        &self,
        caller: &Caller,
        tenant: &str,
        group: &str,
        instance: &str,
    ) -> Result<(), Error> {
        self.membership(caller, tenant, group, instance, Registry::sg_detach)
            .await
    }

    async fn membership(
        &self,
        caller: &Caller,
        tenant: &str,
        group: &str,
        instance: &str,
        change: fn(&Registry, &str, &str, &str) -> Result<(), RegistryError>,
    ) -> Result<(), Error> {
        authorize(caller, Action::Tenant { tenant })?;
        let (registry, t, g, i) = (
            self.registry.clone(),
            tenant.to_string(),
            group.to_string(),
            instance.to_string(),
        );
        blocking(move || Ok(change(&registry, &t, &g, &i)?)).await
    }

    /// The rules every new instance of the tenant starts with.
    pub fn default_rules(&self, caller: &Caller, tenant: &str) -> Result<Vec<RuleView>, Error> {
        authorize(caller, Action::Tenant { tenant })?;
        Ok(self.registry.sg_defaults(tenant)?)
    }

    pub async fn add_default_rule(
        &self,
        caller: &Caller,
        tenant: &str,
        rule: RuleRequest,
    ) -> Result<RuleView, Error> {
        authorize(caller, Action::Tenant { tenant })?;
        let (registry, t) = (self.registry.clone(), tenant.to_string());
        blocking(move || Ok(registry.sg_add_default(&t, &rule)?)).await
    }

    pub async fn delete_default_rule(
        &self,
        caller: &Caller,
        tenant: &str,
        id: &str,
    ) -> Result<(), Error> {
        self.delete(caller, tenant, id, Registry::sg_delete_default)
            .await
    }

    /// A removal of the tenant's group, rule or default rule by id.
    async fn delete(
        &self,
        caller: &Caller,
        tenant: &str,
        id: &str,
        remove: fn(&Registry, &str, &str) -> Result<(), RegistryError>,
    ) -> Result<(), Error> {
        authorize(caller, Action::Tenant { tenant })?;
        let (registry, t, id) = (self.registry.clone(), tenant.to_string(), id.to_string());
        blocking(move || Ok(remove(&registry, &t, &id)?)).await
    }

    /// The groups an instance (by id or name) is in, its own first.
    pub fn instance_groups(&self, caller: &Caller, key: &str) -> Result<Vec<GroupView>, Error> {
        let i = self.visible(caller, key)?;
        Ok(self.registry.sg_instance_groups(&i.id.to_string())?)
    }

    /// The whole table as it would be applied now, as nft's text, rendered
    /// on the blocking pool (about a second for 10,000 instances).
    async fn ruleset(&self) -> Result<String, Error> {
        if !self.registry.security_groups_enabled() {
            return Err(RegistryError::SecGroupsDisabled.into());
        }
        let (registry, table, mark) = (
            self.registry.clone(),
            self.firewall_table.clone(),
            self.firewall_mark,
        );
        blocking(move || {
            let (instances, groups) = registry.firewall_desired();
            Firewall::with_mark(table, mark)
                .plan_full(instances, &groups)
                .map(|p| p.text())
                .map_err(|e| Error::refused(Kind::Conflict, "firewall_tags", e.to_string()))
        })
        .await
    }

    /// The ruleset, and where enforcement stands.
    pub async fn firewall(&self, caller: &Caller) -> Result<FirewallView, Error> {
        authorize(caller, Action::SeeServer)?;
        let ruleset = self.ruleset().await?;
        let status = self.registry.firewall_status().unwrap_or_default();
        Ok(FirewallView {
            enforced: self.firewall_enforced,
            dirty: status.failing,
            table: self.firewall_table.clone(),
            wanted_generation: status.wanted,
            applied_generation: status.applied,
            last_error: status.last_error,
            elements: status.elements,
            ruleset,
        })
    }

    /// Re-apply the whole ruleset (operators only) and wait until the
    /// kernel enforces it (at most [`FIREWALL_WAIT`]), or with `dry_run`
    /// only say what would be applied (the answer holds the ruleset only
    /// then: rendering 10,000 instances' takes a while).
    pub async fn apply_firewall(
        &self,
        caller: &Caller,
        dry_run: bool,
    ) -> Result<FirewallApplied, Error> {
        authorize(caller, Action::SeeServer)?;
        if dry_run {
            return Ok(FirewallApplied {
                applied: false,
                enforced: false,
                ruleset: Some(self.ruleset().await?),
            });
        }
        if !self.registry.security_groups_enabled() {
            return Err(RegistryError::SecGroupsDisabled.into());
        }
        authorize(caller, Action::ApplyFirewall)?;
        if !self.firewall_enforced {
            return Err(Error::refused(
                Kind::Conflict,
                "firewall_off",
                "the firewall is off ([firewall] enabled = false); use --dry-run to see the ruleset",
            ));
        }
        let n = self.registry.enforce_all().unwrap_or(0);
        let enforced = self.wait_firewall(n).await;
        info!(by = %caller.name, enforced, "firewall re-applied");
        Ok(FirewallApplied {
            applied: true,
            enforced,
            ruleset: None,
        })
    }

    /// Wait, holding no lock, until every change handed to the firewall so
    /// far (change `n`, or all of them with 0) is enforced, at most
    /// [`FIREWALL_WAIT`]; whether it is. True when nothing is enforced.
    pub async fn wait_firewall(&self, n: u64) -> bool {
        let Some(status) = self.registry.firewall_status() else {
            return true;
        };
        let n = if n == 0 { status.wanted } else { n };
        let registry = self.registry.clone();
        tokio::task::spawn_blocking(move || registry.firewall_wait(n, FIREWALL_WAIT))
            .await
            .unwrap_or(false)
    }
}

/// How long an admin call that asked to wait for enforcement waits.
pub const FIREWALL_WAIT: std::time::Duration = std::time::Duration::from_secs(30);
