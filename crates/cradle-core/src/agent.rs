//! The guest agent, as the host sees it: what it reports over the channel
//! (its state and heartbeats, its SSH host keys, the answers to actions)
//! and the operator's actions sent to it.
//!
//! The agent's state and host keys are part of the instance (stored, so
//! every host of a cluster shows them); a heartbeat that changes nothing
//! only notes the time it was heard, in memory on the serving host. An
//! action lives in memory on the serving host, which alone hears its
//! agent: sending one elsewhere answers `wrong_host`. Actions and their
//! outcome are events; their output is never stored.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use cradle_model::Instance;
use cradle_model::agent::{
    ActionRequest, ActionState, ActionView, AgentRecord, AgentState, FromAgent, HostKey, ToAgent,
    check_action_name,
};
use cradle_model::api::InstanceView;
use cradle_registry::{ChannelDirection, RegistryError};
use time::OffsetDateTime;
use uuid::Uuid;

use crate::caller::Caller;
use crate::guest::Guest;
use crate::{Core, Error, Kind, blocking};

/// Actions kept (sent and finished), oldest dropped first.
const KEPT_ACTIONS: usize = 4096;
/// Actions waiting for an answer, per instance.
const PENDING_PER_INSTANCE: usize = 16;
/// The longest a request waits for an action's answer.
pub const MAX_ACTION_WAIT: Duration = Duration::from_secs(60);

/// The serving host's memory of agents: when each was last heard, and the
/// actions sent.
pub(crate) struct Agents {
    heard: Mutex<HashMap<Uuid, OffsetDateTime>>,
    actions: Mutex<Actions>,
    changed: tokio::sync::watch::Sender<u64>,
}

#[derive(Default)]
struct Actions {
    by_id: HashMap<Uuid, ActionView>,
    order: VecDeque<Uuid>,
}

impl Agents {
    pub(crate) fn new() -> Agents {
        Agents {
            heard: Mutex::new(HashMap::new()),
            actions: Mutex::new(Actions::default()),
            changed: tokio::sync::watch::channel(0).0,
        }
    }

    fn heard(&self, id: Uuid) -> Option<OffsetDateTime> {
        self.heard
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&id)
            .copied()
    }

    fn note_heard(&self, id: Uuid) {
        self.heard
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, OffsetDateTime::now_utc());
    }

    fn actions(&self) -> std::sync::MutexGuard<'_, Actions> {
        self.actions.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn wake(&self) {
        self.changed.send_modify(|n| *n += 1);
    }
}

impl Actions {
    fn put(&mut self, v: ActionView) {
        if !self.by_id.contains_key(&v.id) {
            self.order.push_back(v.id);
        }
        self.by_id.insert(v.id, v);
        while self.order.len() > KEPT_ACTIONS {
            if let Some(old) = self.order.pop_front() {
                self.by_id.remove(&old);
            }
        }
    }
}

fn describe(
    state: AgentState,
    version: &str,
    kernel: &str,
    os: &str,
    reason: Option<&str>,
) -> String {
    let mut s = format!("agent {}", state.as_str());
    let about: Vec<&str> = [version, kernel, os]
        .into_iter()
        .filter(|v| !v.is_empty())
        .collect();
    if !about.is_empty() {
        s.push_str(&format!(" ({})", about.join("; ")));
    }
    if let Some(r) = reason {
        s.push_str(&format!(": {r}"));
    }
    s
}

impl Core {
    /// An instance's view with what only the serving host knows of its
    /// agent (when it was last heard).
    pub(crate) fn view(&self, i: &Instance) -> InstanceView {
        let mut v = InstanceView::from(i);
        if let (Some(a), Some(heard)) = (v.agent.as_mut(), self.agents.heard(i.id)) {
            a.last_heard = heard.max(a.since);
        }
        v
    }

    /// A message from the guest agent (see `cradle_model::agent`).
    pub(crate) async fn agent_message(&self, guest: &Guest, msg: FromAgent) -> Result<(), Error> {
        let id = guest.id();
        self.agents.note_heard(id);
        let registry = self.registry.clone();
        match msg {
            FromAgent::Guest {
                state,
                version,
                kernel,
                os_release,
                reason,
            } => {
                let now = OffsetDateTime::now_utc();
                let prev = guest.instance().agent.clone();
                let changed_state = prev.as_ref().map(|p| p.state) != Some(state);
                let event = changed_state
                    .then(|| describe(state, &version, &kernel, &os_release, reason.as_deref()));
                blocking(move || {
                    registry.set_agent(
                        id,
                        |a| {
                            let keys = a.as_ref().map(|a| a.host_keys.clone()).unwrap_or_default();
                            let since = match a.as_ref() {
                                Some(p) if p.state == state => p.since,
                                _ => now,
                            };
                            *a = Some(AgentRecord {
                                state,
                                version: version.clone(),
                                kernel: kernel.clone(),
                                os_release: os_release.clone(),
                                reason: reason.clone(),
                                since,
                                host_keys: keys,
                            });
                        },
                        event.as_deref(),
                    )?;
                    Ok(())
                })
                .await
            }
            FromAgent::HostKeys { keys } => {
                let keys = keys
                    .iter()
                    .map(|k| HostKey::parse(k))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| Error::refused(Kind::BadRequest, "bad_request", e))?;
                let event = format!(
                    "host keys published: {}",
                    keys.iter()
                        .map(|k| format!("{} {}", k.kind, k.fingerprint()))
                        .collect::<Vec<_>>()
                        .join(", ")
                );
                let now = OffsetDateTime::now_utc();
                // `set_agent` records the event only when the keys change.
                blocking(move || {
                    registry.set_agent(
                        id,
                        |a| match a {
                            Some(r) => r.host_keys = keys.clone(),
                            None => {
                                *a = Some(AgentRecord {
                                    state: AgentState::Booting,
                                    version: String::new(),
                                    kernel: String::new(),
                                    os_release: String::new(),
                                    reason: None,
                                    since: now,
                                    host_keys: keys.clone(),
                                })
                            }
                        },
                        Some(&event),
                    )?;
                    Ok(())
                })
                .await
            }
            FromAgent::ActionResult {
                id: action_id,
                exit_code,
                output,
                truncated,
                ..
            } => {
                self.finish_action(id, action_id, |v| {
                    v.state = ActionState::Done;
                    v.exit_code = Some(exit_code);
                    v.output = Some(output.clone());
                    v.truncated = truncated;
                    format!("action {} ({}) exited {exit_code}", v.action, v.id)
                })
                .await
            }
            FromAgent::ActionRefused {
                id: action_id,
                reason,
                ..
            } => {
                self.finish_action(id, action_id, |v| {
                    v.state = ActionState::Refused;
                    v.reason = Some(reason.clone());
                    format!(
                        "action {} ({}) refused by the agent: {reason}",
                        v.action, v.id
                    )
                })
                .await
            }
        }
    }

    /// The agent's answer to an action sent to `instance`: an answer to
    /// an action this host did not send it, or sent to another instance, or
    /// already answered, is dropped (at most once).
    async fn finish_action(
        &self,
        instance: Uuid,
        action: Uuid,
        finish: impl FnOnce(&mut ActionView) -> String,
    ) -> Result<(), Error> {
        let event = {
            let mut actions = self.agents.actions();
            let Some(v) = actions.by_id.get_mut(&action) else {
                return Ok(());
            };
            if v.instance != instance || v.state != ActionState::Sent {
                return Ok(());
            }
            let e = finish(v);
            v.finished_at = Some(OffsetDateTime::now_utc());
            e
        };
        self.agents.wake();
        let registry = self.registry.clone();
        blocking(move || Ok(registry.record_event(instance, "action", &event)?)).await
    }

    /// Send `req.action` to the instance's agent. Only the serving host
    /// hears the agent's answer, so only it sends.
    pub async fn send_action(
        &self,
        caller: &Caller,
        key: &str,
        req: ActionRequest,
    ) -> Result<ActionView, Error> {
        let inst = self.changeable(caller, key)?;
        check_action_name(&req.action).map_err(|m| {
            Error::Invalid(cradle_model::api::Invalid {
                field: "action".into(),
                message: m,
            })
        })?;
        if !self.registry.is_local(&inst) {
            return Err(RegistryError::WrongHost(format!(
                "instance {} is served by host {}: send its actions there",
                inst.name, inst.host
            ))
            .into());
        }
        let view = ActionView {
            id: Uuid::new_v4(),
            instance: inst.id,
            action: req.action,
            state: ActionState::Sent,
            exit_code: None,
            output: None,
            truncated: false,
            reason: None,
            sent_at: OffsetDateTime::now_utc(),
            finished_at: None,
        };
        {
            let mut actions = self.agents.actions();
            let pending = actions
                .by_id
                .values()
                .filter(|v| v.instance == inst.id && v.state == ActionState::Sent)
                .count();
            if pending >= PENDING_PER_INSTANCE {
                return Err(Error::refused(
                    Kind::TooMany,
                    "too_many_actions",
                    format!(
                        "instance {} has {pending} actions waiting for its agent's answer; \
                         wait for them first",
                        inst.name
                    ),
                ));
            }
            actions.put(view.clone());
        }
        let body = serde_json::to_vec(&ToAgent::Run {
            id: view.id,
            action: view.action.clone(),
        })
        .map_err(|e| Error::Internal(e.to_string()))?;
        let (registry, id) = (self.registry.clone(), inst.id);
        let event = format!("action {} ({}) sent", view.action, view.id);
        let sent = blocking(move || {
            registry.push_message(id, ChannelDirection::ToGuest, &body)?;
            registry.record_event(id, "action", &event)?;
            Ok(())
        })
        .await;
        if let Err(e) = sent {
            self.agents.actions().by_id.remove(&view.id);
            return Err(e);
        }
        Ok(view)
    }

    /// An action sent to the instance, once it is answered or `wait` (at
    /// most [`MAX_ACTION_WAIT`]) has passed.
    pub async fn action(
        &self,
        caller: &Caller,
        key: &str,
        action: Uuid,
        wait: Duration,
    ) -> Result<ActionView, Error> {
        let inst = self.visible(caller, key)?;
        let mut changed = self.agents.changed.subscribe();
        let deadline = tokio::time::Instant::now() + wait.min(MAX_ACTION_WAIT);
        loop {
            let view = self
                .agents
                .actions()
                .by_id
                .get(&action)
                .filter(|v| v.instance == inst.id)
                .cloned()
                .ok_or_else(|| {
                    Error::not_found(
                        "no_action",
                        format!("instance {} has no action {action} on this host", inst.name),
                    )
                })?;
            if view.state != ActionState::Sent {
                return Ok(view);
            }
            match tokio::time::timeout_at(deadline, changed.changed()).await {
                Ok(Ok(())) => continue,
                _ => return Ok(view),
            }
        }
    }
}
