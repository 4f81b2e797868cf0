//! Maintenance events: operators schedule them, guests see and acknowledge
//! them, and the scheduler runs them through the hypervisor driver.
//!
//! An event lives in its instance's record (`Instance::maintenance`), so
//! every transition is an instance update (a new version: other hosts
//! follow it, the render cache lets go of the old answers) and an event
//! log line (kind `maintenance`).
//!
//! The scheduler (`Core::run_scheduler`, one task in `cradle serve`)
//! runs the events of the instances served on this host only. It sleeps
//! until the next event is due and is woken at once when an event is
//! scheduled or acknowledged, through this host or another (a cancelled
//! one needs no wake: it is simply not due when the scheduler looks): the
//! registry's change hook (`Core::new`) wakes it whenever an instance
//! served here changes and has a pending event, including changes caught
//! up from other hosts. It also looks every [`RESCAN`], which is only a
//! safety net. A due event (its not-before passed, or acknowledged by
//! the guest: that runs it at once) becomes `started`, then `completed` or
//! `failed` with the hypervisor's error:
//!
//! - `stop`: the VM is powered off (ACPI, then killed after
//!   `[maintenance] stop_grace`); a VM that is not running is left as it
//!   is, and the event completes (nothing to do).
//! - `reboot`: the same stop, then the VM is started again. A VM that is
//!   not running is not started (a reboot does not power a machine on):
//!   the event completes with nothing done.
//!
//! An event a killed server left `started` is marked `failed` at the next
//! start ("the server stopped while it ran"): whether its VM was stopped,
//! restarted or neither is not known, so it is not run twice; the operator
//! sees it and may schedule it again.

use std::sync::Arc;
use std::time::Duration;

use cradle_hypervisor::Status;
use cradle_model::Instance;
use cradle_model::maintenance::{
    self, MaintenanceCode, MaintenanceEvent, MaintenanceRequest, MaintenanceState,
};
use cradle_registry::RegistryError;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tracing::{info, warn};
use uuid::Uuid;

use crate::{Caller, Core, Error, Guest, blocking};

/// Longest the scheduler sleeps: events another host wrote for an instance
/// served here are seen at least this often.
pub const RESCAN: Duration = Duration::from_secs(30);

/// How maintenance events run (`[maintenance]`).
#[derive(Debug, Clone)]
pub struct MaintenanceSettings {
    /// Finished events kept per instance (the oldest go first).
    pub history: usize,
    /// How long a guest gets to power off (ACPI) before its VM is killed.
    pub stop_grace: Duration,
}

impl Default for MaintenanceSettings {
    fn default() -> Self {
        MaintenanceSettings {
            history: maintenance::DEFAULT_HISTORY,
            stop_grace: Duration::from_secs(60),
        }
    }
}

/// The scheduler's state: its settings and what wakes it.
pub(crate) struct Scheduler {
    settings: MaintenanceSettings,
    wake: Arc<tokio::sync::Notify>,
}

impl Scheduler {
    pub(crate) fn new(settings: MaintenanceSettings) -> Scheduler {
        Scheduler {
            settings,
            wake: Arc::new(tokio::sync::Notify::new()),
        }
    }

    /// What wakes the scheduler, for the registry's change hook.
    pub(crate) fn waker(&self) -> Arc<tokio::sync::Notify> {
        self.wake.clone()
    }
}

fn now() -> OffsetDateTime {
    OffsetDateTime::now_utc()
}

fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&Rfc3339).unwrap_or_default()
}

/// `instance-event-` and 17 random hex digits, as EC2's.
fn new_event_id() -> String {
    format!(
        "instance-event-{}",
        &Uuid::new_v4().simple().to_string()[..17]
    )
}

/// The event of `list` with `id`, or [`RegistryError::NoEvent`].
fn find<'a>(
    list: &'a mut [MaintenanceEvent],
    id: &str,
) -> Result<&'a mut MaintenanceEvent, RegistryError> {
    list.iter_mut()
        .find(|e| e.id == id)
        .ok_or_else(|| RegistryError::NoEvent(id.to_string()))
}

impl Core {
    /// Schedule a maintenance event on the instance. Validated before
    /// anything is written; the list holds at most
    /// [`maintenance::MAX_EVENTS`].
    pub async fn schedule_maintenance(
        &self,
        caller: &Caller,
        key: &str,
        request: MaintenanceRequest,
    ) -> Result<MaintenanceEvent, Error> {
        let id = self.changeable(caller, key)?.id;
        let event = request.into_event(new_event_id(), now())?;
        let (registry, history, e) = (
            self.registry.clone(),
            self.scheduler.settings.history,
            event.clone(),
        );
        blocking(move || {
            Ok(registry.change_maintenance(id, |_, list| {
                maintenance::schedule(list, e.clone(), history)?;
                Ok(Some((
                    (),
                    format!(
                        "{} {} scheduled for {}: {}",
                        e.id,
                        e.code.as_str(),
                        rfc3339(e.not_before),
                        e.description
                    ),
                )))
            })?)
        })
        .await?;
        info!(instance = %id, event = %event.id, code = event.code.as_str(), by = %caller.name, "maintenance scheduled");
        Ok(event)
    }

    /// The instance's maintenance events, in scheduling order.
    pub fn maintenance_events(
        &self,
        caller: &Caller,
        key: &str,
    ) -> Result<Vec<MaintenanceEvent>, Error> {
        Ok(self.visible(caller, key)?.maintenance.clone())
    }

    /// Cancel a maintenance event that has not started (`scheduled` or
    /// `acknowledged`); a started or finished one is a conflict.
    pub async fn cancel_maintenance(
        &self,
        caller: &Caller,
        key: &str,
        event: &str,
    ) -> Result<MaintenanceEvent, Error> {
        let id = self.changeable(caller, key)?.id;
        let by = caller.name.clone();
        let cancelled = self
            .transition(id, event, move |e| {
                if !e.state.is_pending() {
                    return Err(RegistryError::EventState(format!(
                        "maintenance event {} is {}: only a scheduled or acknowledged one \
                         can be cancelled",
                        e.id,
                        e.state.as_str()
                    )));
                }
                e.state = MaintenanceState::Cancelled;
                e.ended_at = Some(now());
                Ok(Some(format!("{} cancelled by {by}", e.id)))
            })
            .await?;
        Ok(cancelled)
    }

    /// The guest acknowledges one of its events: it runs at once. Another
    /// instance's event is not found; acknowledging again changes nothing;
    /// a started or finished event is a conflict.
    pub async fn acknowledge_event(
        &self,
        guest: &Guest,
        event: &str,
    ) -> Result<MaintenanceEvent, Error> {
        let acked = self
            .transition(guest.id(), event, |e| match e.state {
                MaintenanceState::Acknowledged => Ok(None),
                MaintenanceState::Scheduled => {
                    e.state = MaintenanceState::Acknowledged;
                    e.acknowledged_at = Some(now());
                    Ok(Some(format!(
                        "{} acknowledged by the guest: runs now",
                        e.id
                    )))
                }
                other => Err(RegistryError::EventState(format!(
                    "maintenance event {} is {}: only a scheduled one can be acknowledged",
                    e.id,
                    other.as_str()
                ))),
            })
            .await?;
        Ok(acked)
    }

    /// Apply `change` to event `event` of instance `id` (on the blocking
    /// pool, under the registry's writer): `Some(line)` is a change with its
    /// event-log line, `None` leaves it as it is. Answers the event after.
    async fn transition(
        &self,
        id: Uuid,
        event: &str,
        change: impl Fn(&mut MaintenanceEvent) -> Result<Option<String>, RegistryError> + Send + 'static,
    ) -> Result<MaintenanceEvent, Error> {
        let (registry, event) = (self.registry.clone(), event.to_string());
        let history = self.scheduler.settings.history;
        blocking(move || {
            let changed = registry.change_maintenance(id, |_, list| {
                let e = find(list, &event)?;
                let Some(line) = change(e)? else {
                    return Ok(None);
                };
                let after = e.clone();
                maintenance::prune(list, history);
                Ok(Some((after, line)))
            })?;
            match changed {
                Some((_, e)) => Ok(e),
                // Nothing changed: the event as it is.
                None => Ok(registry
                    .get(&id.to_string())?
                    .maintenance
                    .iter()
                    .find(|e| e.id == event)
                    .cloned()
                    .ok_or(RegistryError::NoEvent(event))?),
            }
        })
        .await
    }

    /// The scheduler: runs until the server stops. First fails the events a
    /// killed server left `started`, then runs each due event of this
    /// host's instances on a task of its own, sleeping in between.
    pub(crate) async fn run_scheduler(self: Arc<Self>) {
        self.fail_interrupted_events().await;
        loop {
            // Registered before the scan, so that a wake during it is kept.
            let woken = self.scheduler.wake.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            let now = now();
            let mut next: Option<OffsetDateTime> = None;
            for inst in self.registry.list() {
                if !self.registry.is_local(&inst) {
                    continue;
                }
                for e in &inst.maintenance {
                    if e.is_due(now) {
                        self.clone().start_event(inst.id, e.id.clone()).await;
                    } else if let Some(t) = e.due_at() {
                        next = Some(next.map_or(t, |n| n.min(t)));
                    }
                }
            }
            let sleep = next
                .map(|t| Duration::try_from(t - now).unwrap_or(Duration::ZERO))
                .unwrap_or(RESCAN)
                .min(RESCAN);
            tokio::select! {
                _ = woken => {}
                _ = tokio::time::sleep(sleep) => {}
            }
        }
    }

    /// Mark the event `started` (which makes it due no more) and run it on
    /// a task of its own, so that one reboot's grace does not hold back
    /// the others.
    async fn start_event(self: Arc<Self>, id: Uuid, event: String) {
        let started = self
            .transition(id, &event, |e| {
                if !e.is_due(now()) {
                    // Cancelled meanwhile.
                    return Ok(None);
                }
                e.state = MaintenanceState::Started;
                e.started_at = Some(now());
                Ok(Some(format!("{} {} started", e.id, e.code.as_str())))
            })
            .await;
        let e = match started {
            Ok(e) if e.state == MaintenanceState::Started => e,
            Ok(_) => return,
            Err(err) => {
                warn!(instance = %id, event = %event, error = %err, "cannot start a maintenance event");
                return;
            }
        };
        info!(instance = %id, event = %e.id, code = e.code.as_str(), "maintenance started");
        tokio::spawn(async move {
            let outcome = self.perform(id, e.code).await;
            let line = match &outcome {
                Ok(done) => format!("{} completed: {done}", e.id),
                Err(why) => format!("{} failed: {why}", e.id),
            };
            match &outcome {
                Ok(_) => info!(instance = %id, event = %e.id, "maintenance completed"),
                Err(why) => {
                    warn!(instance = %id, event = %e.id, error = %why, "maintenance failed")
                }
            }
            let finished = self
                .transition(id, &e.id, move |ev| {
                    if ev.state != MaintenanceState::Started {
                        return Ok(None);
                    }
                    match &outcome {
                        Ok(_) => ev.state = MaintenanceState::Completed,
                        Err(why) => {
                            ev.state = MaintenanceState::Failed;
                            ev.error = Some(why.clone());
                        }
                    }
                    ev.ended_at = Some(now());
                    Ok(Some(line.clone()))
                })
                .await;
            if let Err(err) = finished {
                warn!(instance = %id, event = %e.id, error = %err, "cannot record the end of a maintenance event");
            }
        });
    }

    /// Run `code` on the instance's VM: what was done, or why it failed.
    async fn perform(&self, id: Uuid, code: MaintenanceCode) -> Result<&'static str, String> {
        let inst: Arc<Instance> = self
            .registry
            .get(&id.to_string())
            .map_err(|e| e.to_string())?;
        if inst.state.is_busy() {
            return Err(format!("the instance is {}", inst.state.busy_with()));
        }
        let running = match self.installer.vm_status(&inst).await {
            Ok(s) => matches!(s, Status::Running | Status::Paused),
            Err(e) => return Err(e.to_string()),
        };
        if !running {
            return Ok("its VM was not running: nothing to do");
        }
        let grace = self.scheduler.settings.stop_grace;
        let stopped = self
            .installer
            .stop_vm(inst, false, grace)
            .await
            .map_err(|e| format!("stopping the VM: {e}"))?;
        match code {
            MaintenanceCode::Stop => Ok("the VM was stopped"),
            MaintenanceCode::Reboot => {
                self.installer
                    .start_vm(stopped)
                    .await
                    .map_err(|e| format!("the VM stopped, but starting it again failed: {e}"))?;
                Ok("the VM was stopped and started again")
            }
        }
    }

    /// Events this host's instances have `started` at start-up were cut
    /// short by a server that stopped: failed, not run again.
    async fn fail_interrupted_events(&self) {
        for inst in self.registry.list() {
            if !self.registry.is_local(&inst) {
                continue;
            }
            for e in &inst.maintenance {
                if e.state != MaintenanceState::Started {
                    continue;
                }
                let r = self
                    .transition(inst.id, &e.id, |ev| {
                        if ev.state != MaintenanceState::Started {
                            return Ok(None);
                        }
                        let why = "the server stopped while it ran; \
                                   see `cradle instance status` for the VM";
                        ev.state = MaintenanceState::Failed;
                        ev.error = Some(why.into());
                        ev.ended_at = Some(now());
                        Ok(Some(format!("{} failed: {why}", ev.id)))
                    })
                    .await;
                if let Err(err) = r {
                    warn!(instance = %inst.id, event = %e.id, error = %err, "cannot fail an interrupted maintenance event");
                }
            }
        }
    }
}
