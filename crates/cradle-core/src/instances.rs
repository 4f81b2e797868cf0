//! Instances as operators see them: register, look up, change, remove,
//! clear an error, read their events, and the operator's end of the
//! channel. Answers are views: private and secret values never leave here
//! but by key name.

use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use cradle_model::answers::{CallerView, EventView};
use cradle_model::api::{
    DEFAULT_PROJECT, InstancePatch, InstanceSpec, InstanceView, MessageIn, MessageView, Patch,
};
use cradle_model::{Instance, personalization};
use cradle_registry::ChannelDirection;
use tracing::info;

use crate::caller::{Action, Projects, authorize};
use crate::{Caller, Core, Error, blocking};

/// Whether `patch` points the package URL at another host while the
/// instance holds download credentials that the patch does not give (or
/// remove) again: they would go to the new host.
fn repoints_credentials(current: &Instance, patch: &InstancePatch) -> bool {
    let Patch::Value(url) = &patch.personalization_url else {
        return false;
    };
    let old = current
        .personalization_url
        .as_deref()
        .map(personalization::origin);
    if old == Some(personalization::origin(url)) {
        return false;
    }
    personalization::CREDENTIAL_PARAMS.iter().any(|c| {
        let is = |k: &String| k.eq_ignore_ascii_case(c);
        current.os_params.secret.keys().any(is) && !patch.os_params.secret.keys().any(is)
    })
}

impl Core {
    /// The instance by id or name, if `caller` may see it. One of a
    /// project it does not act for answers exactly as one that does not
    /// exist.
    pub(crate) fn visible(&self, caller: &Caller, key: &str) -> Result<Arc<Instance>, Error> {
        let i = self.registry.get(key)?;
        authorize(
            caller,
            Action::See {
                project: &i.project_id,
            },
        )
        .map_err(|_| cradle_registry::RegistryError::NotFound(key.to_string()))?;
        Ok(i)
    }

    /// The instance by id or name, if `caller` may change it.
    pub(crate) fn changeable(&self, caller: &Caller, key: &str) -> Result<Arc<Instance>, Error> {
        let i = self.visible(caller, key)?;
        authorize(
            caller,
            Action::Change {
                project: &i.project_id,
            },
        )?;
        Ok(i)
    }

    /// Every instance of the projects the caller acts for, oldest first.
    pub fn instances(&self, caller: &Caller) -> Result<Vec<InstanceView>, Error> {
        if let Projects::Only(p) = &caller.projects
            && p.is_empty()
        {
            return Err(Error::forbidden(
                "this token acts for no project: give it projects in the tokens file",
            ));
        }
        Ok(self
            .registry
            .list()
            .iter()
            .filter(|i| caller.acts_for(&i.project_id))
            .map(|i| self.view(i))
            .collect())
    }

    /// One instance, by id or name.
    pub fn instance(&self, caller: &Caller, key: &str) -> Result<InstanceView, Error> {
        Ok(self.view(&*self.visible(caller, key)?))
    }

    /// Validate and register an instance. The caller's roles now become its
    /// `boot_roles`, whatever becomes of the caller later.
    pub async fn create_instance(
        &self,
        caller: &Caller,
        spec: InstanceSpec,
    ) -> Result<InstanceView, Error> {
        let project = spec.project_id.as_deref().unwrap_or(DEFAULT_PROJECT);
        authorize(caller, Action::Create { project })?;
        if let Some(host) = spec.host.clone().filter(|h| h != self.registry.host()) {
            if !spec.os_params.secret.is_empty() {
                // Its secrets must live only where it is served.
                return self.create_on(&host, caller, spec).await;
            }
            self.host_record(&host).await?;
        }
        let (registry, roles) = (self.registry.clone(), caller.roles.clone());
        let created = blocking(move || Ok(registry.create(spec, roles)?)).await?;
        info!(instance = %created.id, name = %created.name, by = %caller.name, "instance registered");
        Ok(InstanceView::from(&*created))
    }

    /// Apply a patch; nothing changes unless all of it is valid.
    pub async fn modify_instance(
        &self,
        caller: &Caller,
        key: &str,
        patch: InstancePatch,
    ) -> Result<InstanceView, Error> {
        let current = self.changeable(caller, key)?;
        if patch
            .project_id
            .as_ref()
            .is_some_and(|p| *p != current.project_id)
        {
            authorize(caller, Action::MoveProject)?;
        }
        if repoints_credentials(&current, &patch) {
            authorize(caller, Action::CarryCredentials)?;
        }
        if !self.registry.is_local(&current) && !patch.os_params.secret.is_empty() {
            // Its secrets must live only where it is served.
            let id = current.id.to_string();
            return self.modify_on(&current.host, caller, &id, patch).await;
        }
        let id = current.id.to_string();
        let registry = self.registry.clone();
        let changed = blocking(move || Ok(registry.modify(&id, patch)?)).await?;
        info!(instance = %changed.id, by = %caller.name, "instance modified");
        Ok(InstanceView::from(&*changed))
    }

    /// Remove an instance, its queued messages, its secrets and its last job.
    pub async fn remove_instance(&self, caller: &Caller, key: &str) -> Result<(), Error> {
        let id = self.changeable(caller, key)?.id.to_string();
        let registry = self.registry.clone();
        let gone = blocking(move || Ok(registry.remove(&id)?)).await?;
        info!(instance = %gone.id, by = %caller.name, "instance removed");
        Ok(())
    }

    /// Clear an instance's error state: back to `registered`, with an event
    /// naming who did it. Operators only.
    pub async fn reset_state(&self, caller: &Caller, key: &str) -> Result<InstanceView, Error> {
        let i = self.visible(caller, key)?;
        authorize(caller, Action::ResetState)?;
        let (registry, by, id) = (self.registry.clone(), caller.name.clone(), i.id.to_string());
        let reset = blocking(move || Ok(registry.reset_state(&id, &by)?)).await?;
        info!(instance = %reset.id, by = %caller.name, "instance state reset");
        Ok(InstanceView::from(&*reset))
    }

    /// What happened to the instance, oldest first.
    pub async fn events(&self, caller: &Caller, key: &str) -> Result<Vec<EventView>, Error> {
        let id = self.visible(caller, key)?.id.to_string();
        let registry = self.registry.clone();
        let events = blocking(move || Ok(registry.events(&id)?)).await?;
        Ok(events
            .into_iter()
            .map(|e| EventView {
                id: e.id,
                created_at: e.created_at,
                kind: e.kind,
                message: e.message,
            })
            .collect())
    }

    /// Queue a message for the guest; its id in the queue.
    pub async fn send_message(
        &self,
        caller: &Caller,
        key: &str,
        message: MessageIn,
    ) -> Result<i64, Error> {
        let id = self.changeable(caller, key)?.id;
        let body = message.into_bytes()?;
        let registry = self.registry.clone();
        blocking(move || Ok(registry.push_message(id, ChannelDirection::ToGuest, &body)?)).await
    }

    /// Take every message the guest wrote.
    pub async fn receive_messages(
        &self,
        caller: &Caller,
        key: &str,
    ) -> Result<Vec<MessageView>, Error> {
        let id = self.changeable(caller, key)?.id;
        let registry = self.registry.clone();
        let drained =
            blocking(move || Ok(registry.drain_messages(id, ChannelDirection::ToHost)?)).await?;
        Ok(drained
            .into_iter()
            .map(|m| MessageView {
                id: m.id,
                created_at: m.created_at,
                data: B64.encode(&m.body),
                text: String::from_utf8(m.body).ok(),
            })
            .collect())
    }

    /// The Prometheus text exposition. The instance gauge is read off the
    /// registry here, the one place it is shown.
    /// Who the caller is: its name, roles and projects. The one thing a
    /// token that acts for no project may ask.
    pub fn whoami(&self, caller: &Caller) -> CallerView {
        CallerView::from(caller)
    }

    pub fn metrics_text(&self, caller: &Caller) -> Result<String, Error> {
        authorize(caller, Action::SeeServer)?;
        self.metrics.instances.set(self.registry.len() as i64);
        Ok(self.metrics.encode())
    }
}
