//! Instances as operators see them: register, look up, change, remove,
//! clear an error, read their events, and the operator's end of the
//! channel. Answers are views: private and secret values never leave here
//! but by key name.

use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use cradle_model::Instance;
use cradle_model::answers::EventView;
use cradle_model::api::{InstancePatch, InstanceSpec, InstanceView, MessageIn, MessageView};
use cradle_registry::ChannelDirection;
use tracing::info;

use crate::caller::{Action, authorize};
use crate::{Caller, Core, Error, blocking};

impl Core {
    /// The instance by id or name, if `caller` may see it. One it may not
    /// see answers as one that does not exist.
    pub(crate) fn visible(&self, caller: &Caller, key: &str) -> Result<Arc<Instance>, Error> {
        let i = self.registry.get(key)?;
        authorize(caller, Action::See)
            .map_err(|_| cradle_registry::RegistryError::NotFound(key.to_string()))?;
        Ok(i)
    }

    /// The instance by id or name, if `caller` may change it.
    pub(crate) fn changeable(&self, caller: &Caller, key: &str) -> Result<Arc<Instance>, Error> {
        let i = self.visible(caller, key)?;
        authorize(caller, Action::Change)?;
        Ok(i)
    }

    /// Every instance the caller may see, oldest first.
    pub fn instances(&self, caller: &Caller) -> Result<Vec<InstanceView>, Error> {
        authorize(caller, Action::See)?;
        Ok(self
            .registry
            .list()
            .iter()
            .map(|i| InstanceView::from(&**i))
            .collect())
    }

    /// One instance, by id or name.
    pub fn instance(&self, caller: &Caller, key: &str) -> Result<InstanceView, Error> {
        Ok(InstanceView::from(&*self.visible(caller, key)?))
    }

    /// Validate and register an instance. The caller's roles now become its
    /// `boot_roles`, whatever becomes of the caller later.
    pub async fn create_instance(
        &self,
        caller: &Caller,
        spec: InstanceSpec,
    ) -> Result<InstanceView, Error> {
        authorize(caller, Action::Create)?;
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
        let id = self.changeable(caller, key)?.id.to_string();
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
    pub fn metrics_text(&self, caller: &Caller) -> Result<String, Error> {
        authorize(caller, Action::SeeServer)?;
        self.metrics.instances.set(self.registry.len() as i64);
        Ok(self.metrics.encode())
    }
}
