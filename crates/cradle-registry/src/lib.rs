//! The operations layer: every change to an instance goes through
//! [`Registry`], whichever front end (admin API, metadata service) asked.
//!
//! The registry keeps every instance in memory, indexed by id, name and
//! metadata address, over a persistent [`Store`]. The metadata hot path reads
//! only the index. Secret OS parameters live only in these in-memory
//! instances: the store never sees them, so they vanish when an instance is
//! removed or the process restarts.
//!
//! Mutations are serialized by one lock and reach the store before the index,
//! so the index never shows what the store refused.

#![forbid(unsafe_code)]

mod cluster;
pub mod jobs;
pub mod metrics;
mod secgroups;
pub mod stream;

use std::collections::BTreeSet;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::AtomicI64;
use std::sync::{Arc, Mutex, RwLock};

use cradle_model::api::{InstancePatch, InstanceSpec, Invalid};
use cradle_model::{Instance, MAX_PASSWORD, RANDOM_SEED_LEN, State};
use cradle_secgroups::state::{SecGroups, SgError};
use cradle_store::{Direction, Message, Store, StoreError};
use jobs::{InstallJob, JobOperation};
use rand::RngCore;
use secgroups::enforced_identity;
use time::OffsetDateTime;
use uuid::Uuid;

pub use cradle_store::Direction as ChannelDirection;

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("no instance {0:?}")]
    NotFound(String),
    #[error("another instance already has this {0}")]
    Conflict(&'static str),
    #[error(transparent)]
    Invalid(#[from] Invalid),
    #[error("the password is already set")]
    PasswordSet,
    #[error("the password is longer than {MAX_PASSWORD} bytes")]
    PasswordTooLong,
    #[error("the message queue is full ({0} messages)")]
    QueueFull(usize),
    #[error("the message is {0} bytes; at most {1} are allowed")]
    MessageTooLarge(usize, usize),
    #[error("storage failed: {0}")]
    Store(StoreError),
    #[error(transparent)]
    SecGroup(#[from] SgError),
    #[error("security groups are not enabled")]
    SecGroupsDisabled,
    /// The instance is busy (an install runs); try again later.
    #[error("{0}")]
    Busy(String),
    /// The instance is served by another host of the cluster, and what was
    /// asked can only be done there.
    #[error("{0}")]
    WrongHost(String),
    /// The instance has no maintenance event of this id.
    #[error("instance has no maintenance event {0:?}")]
    NoEvent(String),
    /// The maintenance event is past what was asked of it (cancelling a
    /// started one, acknowledging a finished one).
    #[error("{0}")]
    EventState(String),
}

impl From<StoreError> for RegistryError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Conflict(field) => RegistryError::Conflict(field),
            other => RegistryError::Store(other),
        }
    }
}

/// Bounds on the host-guest channel.
#[derive(Debug, Clone, Copy)]
pub struct ChannelLimits {
    /// Messages queued per instance and direction.
    pub queue_len: usize,
    /// Bytes per message.
    pub message_bytes: usize,
}

impl Default for ChannelLimits {
    fn default() -> Self {
        ChannelLimits {
            queue_len: 256,
            message_bytes: 64 * 1024,
        }
    }
}

#[derive(Default)]
struct Index {
    by_id: HashMap<Uuid, Arc<Instance>>,
    by_address: HashMap<IpAddr, Arc<Instance>>,
    by_name: HashMap<String, Uuid>,
    /// Host interfaces (for the firewall), by host and name: one instance
    /// each (another host's interfaces are its own).
    by_interface: HashMap<(String, String), Uuid>,
}

impl Index {
    fn put(&mut self, i: Arc<Instance>) {
        self.by_address.insert(i.metadata_address, i.clone());
        self.by_name.insert(i.name.clone(), i.id);
        if let Some(ifname) = &i.interface {
            self.by_interface
                .insert((i.host.clone(), ifname.clone()), i.id);
        }
        self.by_id.insert(i.id, i);
    }

    fn take(&mut self, id: Uuid) -> Option<Arc<Instance>> {
        let i = self.by_id.remove(&id)?;
        // Another host's change may have given the name or address to
        // another instance already: only drop entries that are still ours.
        if self
            .by_address
            .get(&i.metadata_address)
            .is_some_and(|o| o.id == id)
        {
            self.by_address.remove(&i.metadata_address);
        }
        if self.by_name.get(&i.name) == Some(&id) {
            self.by_name.remove(&i.name);
        }
        if let Some(ifname) = &i.interface
            && self.by_interface.get(&(i.host.clone(), ifname.clone())) == Some(&id)
        {
            self.by_interface.remove(&(i.host.clone(), ifname.clone()));
        }
        Some(i)
    }
}

/// Instances in memory over a store.
pub struct Registry {
    store: Arc<dyn Store>,
    index: RwLock<Index>,
    writer: Mutex<()>,
    limits: ChannelLimits,
    /// Security groups, when enabled.
    groups: Option<RwLock<SecGroups>>,
    /// Where enforcement goes, once set: the worker that owns it.
    firewall: RwLock<Option<Arc<cradle_secgroups::worker::Worker>>>,
    /// The last install job of each instance (memory only).
    jobs: RwLock<HashMap<Uuid, Arc<InstallJob>>>,
    /// This host's name: the metadata service serves, and the firewall
    /// enforces, only the instances placed here.
    host: String,
    /// Every change up to this store version is in memory.
    seen: AtomicI64,
    /// Every security-group change up to this version is in memory (the
    /// state was loaded at it).
    sg_seen: AtomicI64,
    /// Held by the catch-up that runs.
    catching: Mutex<()>,
    /// The hosts' records as of the last heartbeat or lookup.
    hosts: RwLock<Vec<cradle_store::HostRecord>>,
    /// Versions of security-group ops this process wrote and applied itself,
    /// which catching up must not apply again.
    own_sg_versions: Mutex<BTreeSet<i64>>,
    /// Told the id of every instance whose in-memory record changed (made,
    /// changed here or by another host, removed), once set.
    on_change: std::sync::OnceLock<Box<dyn Fn(Uuid) + Send + Sync>>,
}

impl Registry {
    /// Load every stored instance into memory, as host `host`. Instances
    /// stored before cradle knew hosts are placed here.
    pub fn open(
        store: Arc<dyn Store>,
        limits: ChannelLimits,
        host: &str,
    ) -> Result<Self, RegistryError> {
        let seen = store.version()?;
        let mut index = Index::default();
        for mut i in store.load_all()? {
            if i.host.is_empty() {
                i.host = host.to_string();
                i.version = store.update(&i)?;
            }
            if i.host == host && !i.stored_secret_names.is_empty() {
                // Their values were in the memory of this host's last run.
                let names = std::mem::take(&mut i.stored_secret_names);
                store.record_event(
                    i.id,
                    "secrets",
                    &format!(
                        "host {host} restarted: the secret parameters {} were only in its \
                         memory and are gone; give them again",
                        names.join(", ")
                    ),
                )?;
                i.version = store.update(&i)?;
            }
            index.put(Arc::new(i));
        }
        Ok(Registry {
            store,
            index: RwLock::new(index),
            writer: Mutex::new(()),
            limits,
            groups: None,
            firewall: RwLock::new(None),
            jobs: RwLock::new(HashMap::new()),
            host: host.to_string(),
            seen: AtomicI64::new(seen),
            sg_seen: AtomicI64::new(0),
            catching: Mutex::new(()),
            hosts: RwLock::new(Vec::new()),
            own_sg_versions: Mutex::new(BTreeSet::new()),
            on_change: std::sync::OnceLock::new(),
        })
    }

    /// Record, with what is stored, the names of the secrets this host
    /// holds for `i` (another host's record of its own is left alone).
    fn stamp(&self, i: &mut Instance) {
        if self.is_local(i) {
            i.stored_secret_names = i.os_params.secret.keys().cloned().collect();
        }
    }

    /// Have `hook` told the id of every instance whose in-memory record
    /// changes from now on, after the change is visible. Set once; the
    /// hook must not block (it runs under no lock, on the writer's thread).
    pub fn on_change(&self, hook: impl Fn(Uuid) + Send + Sync + 'static) {
        let _ = self.on_change.set(Box::new(hook));
    }

    fn changed(&self, id: Uuid) {
        if let Some(hook) = self.on_change.get() {
            hook(id);
        }
    }

    /// This host's name.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// Whether `i` is served here.
    pub fn is_local(&self, i: &Instance) -> bool {
        i.host == self.host
    }

    pub fn limits(&self) -> ChannelLimits {
        self.limits
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Index> {
        self.index.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Index> {
        self.index.write().unwrap_or_else(|e| e.into_inner())
    }

    fn lock_writer(&self) -> std::sync::MutexGuard<'_, ()> {
        self.writer.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Number of registered instances.
    pub fn len(&self) -> usize {
        self.read().by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The instance whose requests come from `addr`: the guest's identity on
    /// the metadata listener.
    pub fn by_address(&self, addr: IpAddr) -> Option<Arc<Instance>> {
        self.read()
            .by_address
            .get(&addr.to_canonical())
            .filter(|i| self.is_local(i))
            .cloned()
    }

    /// Look up by UUID, or else by name.
    pub fn get(&self, key: &str) -> Result<Arc<Instance>, RegistryError> {
        let index = self.read();
        let id = match Uuid::parse_str(key) {
            Ok(id) => Some(id),
            Err(_) => index.by_name.get(key).copied(),
        };
        id.and_then(|id| index.by_id.get(&id).cloned())
            .ok_or_else(|| RegistryError::NotFound(key.to_string()))
    }

    /// Every instance, oldest first.
    pub fn list(&self) -> Vec<Arc<Instance>> {
        let mut all: Vec<_> = self.read().by_id.values().cloned().collect();
        all.sort_by(|a, b| (a.created_at, &a.name).cmp(&(b.created_at, &b.name)));
        all
    }

    fn check_unique(index: &Index, i: &Instance) -> Result<(), RegistryError> {
        if index.by_name.get(&i.name).is_some_and(|id| *id != i.id) {
            return Err(RegistryError::Conflict("name"));
        }
        if index
            .by_address
            .get(&i.metadata_address)
            .is_some_and(|o| o.id != i.id)
        {
            return Err(RegistryError::Conflict("metadata_address"));
        }
        if let Some(ifname) = &i.interface
            && index
                .by_interface
                .get(&(i.host.clone(), ifname.clone()))
                .is_some_and(|id| *id != i.id)
        {
            return Err(RegistryError::Conflict("interface"));
        }
        Ok(())
    }

    /// Validate and register a new instance. `boot_roles` are the caller's
    /// roles now; they stay with the instance whatever becomes of the caller.
    pub fn create(
        &self,
        mut spec: InstanceSpec,
        boot_roles: Vec<String>,
    ) -> Result<Arc<Instance>, RegistryError> {
        let mut seed = vec![0u8; RANDOM_SEED_LEN];
        rand::rng().fill_bytes(&mut seed);
        // Held from allocation to insert, so no other create takes the address.
        let _w = self.lock_writer();
        if spec.metadata_address.is_none() {
            let index = self.read();
            let free = cradle_model::allocate_link_local(|a| {
                index.by_address.contains_key(&IpAddr::V4(a))
            })
            .ok_or_else(|| {
                RegistryError::Invalid(cradle_model::api::Invalid {
                    field: "metadata_address".into(),
                    message: "every link-local address cradle allocates is taken; give one".into(),
                })
            })?;
            spec.metadata_address = Some(free.to_string());
        }
        let mut instance = spec.into_instance(Uuid::new_v4(), now(), seed)?;
        instance.boot_roles = boot_roles;
        if instance.host.is_empty() {
            instance.host = self.host.clone();
        }
        if !self.is_local(&instance) && !instance.os_params.secret.is_empty() {
            return Err(self.secrets_elsewhere(&instance));
        }
        Self::check_unique(&self.read(), &instance)?;
        let ops = self
            .groups_read()
            .map(|g| g.plan_instance_group(instance.id, &instance.project_id, instance.created_at))
            .unwrap_or_default();
        self.stamp(&mut instance);
        instance.version = self.store.insert(&instance, &ops)?;
        self.own_sg(instance.version, &ops);
        let instance = Arc::new(instance);
        self.write().put(instance.clone());
        self.changed(instance.id);
        self.apply_groups(&ops)?;
        Ok(instance)
    }

    /// Apply a patch; nothing changes unless all of it is valid.
    pub fn modify(&self, key: &str, patch: InstancePatch) -> Result<Arc<Instance>, RegistryError> {
        let _w = self.lock_writer();
        let id = self.get(key)?.id;
        self.retry_stale(id, || self.modify_locked(id, patch.clone()))
    }

    fn modify_locked(
        &self,
        id: Uuid,
        patch: InstancePatch,
    ) -> Result<Arc<Instance>, RegistryError> {
        let current = self.get(&id.to_string())?;
        let secrets_before = current.os_params.secret.keys().collect::<Vec<_>>();
        let next = patch.apply(&current, now())?;
        if !self.is_local(&current)
            && next.os_params.secret.keys().collect::<Vec<_>>() != secrets_before
        {
            return Err(self.secrets_elsewhere(&current));
        }
        Self::check_unique(&self.read(), &next)?;
        if next.project_id != current.project_id && self.groups.is_some() {
            return Err(RegistryError::Invalid(cradle_model::api::Invalid {
                field: "project_id".into(),
                message: "an instance cannot change tenant while security groups are enabled: \
                          its groups belong to its tenant"
                    .into(),
            }));
        }
        let mut next = next;
        self.stamp(&mut next);
        next.version = self.store.update(&next)?;
        let identity_changed = enforced_identity(&current) != enforced_identity(&next);
        let next = self.publish(next);
        if identity_changed {
            self.enforce_identity(next.id)?;
        }
        Ok(next)
    }

    /// Make `next` the in-memory version of its instance (the store already
    /// holds it): a new `Arc`, so caches keyed on the old one let go.
    fn publish(&self, next: Instance) -> Arc<Instance> {
        let next = Arc::new(next);
        {
            let mut index = self.write();
            index.take(next.id);
            index.put(next.clone());
        }
        self.changed(next.id);
        next
    }

    /// Replace the stored and in-memory instance with `change` applied, under
    /// the writer lock.
    fn update_with(
        &self,
        id: Uuid,
        change: impl Fn(&mut Instance),
    ) -> Result<Arc<Instance>, RegistryError> {
        self.retry_stale(id, || {
            let current = self.get(&id.to_string())?;
            let mut next = (*current).clone();
            change(&mut next);
            next.updated_at = now();
            self.stamp(&mut next);
            next.version = self.store.update(&next)?;
            Ok(self.publish(next))
        })
    }

    /// Put an instance in state `error` with `reason`, and record the event.
    /// A no-op when it is already in error for the same reason.
    pub fn set_error(
        &self,
        id: Uuid,
        kind: &str,
        reason: &str,
    ) -> Result<Arc<Instance>, RegistryError> {
        let _w = self.lock_writer();
        let current = self.get(&id.to_string())?;
        if current.state == State::Error && current.state_reason.as_deref() == Some(reason) {
            return Ok(current);
        }
        let next = self.update_with(id, |i| {
            i.state = State::Error;
            i.state_reason = Some(reason.to_string());
        })?;
        self.store.record_event(id, kind, reason)?;
        Ok(next)
    }

    /// Change what the instance's guest agent reported, and record `event`
    /// (kind `agent`) when there is one. A no-op when `change` leaves it
    /// as it was.
    pub fn set_agent(
        &self,
        id: Uuid,
        change: impl Fn(&mut Option<cradle_model::agent::AgentRecord>),
        event: Option<&str>,
    ) -> Result<Arc<Instance>, RegistryError> {
        let _w = self.lock_writer();
        let current = self.get(&id.to_string())?;
        let mut agent = current.agent.clone();
        change(&mut agent);
        if agent == current.agent {
            return Ok(current);
        }
        let next = self.update_with(id, |i| change(&mut i.agent))?;
        if let Some(e) = event {
            self.store.record_event(id, "agent", e)?;
        }
        Ok(next)
    }

    /// Change the instance's maintenance events: `change` gets the current
    /// list (re-read if another host changed the instance meanwhile) and
    /// answers what it made of it and the event log's line (kind
    /// `maintenance`), or `None` for nothing to change; or it refuses.
    /// Every change is an instance update: a new version, which other hosts
    /// follow and the render cache sees.
    pub fn change_maintenance<T>(
        &self,
        id: Uuid,
        change: impl Fn(
            &Instance,
            &mut Vec<cradle_model::maintenance::MaintenanceEvent>,
        ) -> Result<Option<(T, String)>, RegistryError>,
    ) -> Result<Option<(Arc<Instance>, T)>, RegistryError> {
        let _w = self.lock_writer();
        let done = self.retry_stale(id, || {
            let current = self.get(&id.to_string())?;
            let mut next = (*current).clone();
            let Some((answer, line)) = change(&current, &mut next.maintenance)? else {
                return Ok(None);
            };
            next.updated_at = now();
            self.stamp(&mut next);
            next.version = self.store.update(&next)?;
            Ok(Some((self.publish(next), answer, line)))
        })?;
        let Some((next, answer, line)) = done else {
            return Ok(None);
        };
        self.store.record_event(id, "maintenance", &line)?;
        Ok(Some((next, answer)))
    }

    /// Clear an error: back to `registered`, reason gone, event recorded.
    pub fn reset_state(&self, key: &str, by: &str) -> Result<Arc<Instance>, RegistryError> {
        let _w = self.lock_writer();
        let id = self.get(key)?.id;
        let next = self.update_with(id, |i| {
            i.state = State::Registered;
            i.state_reason = None;
        })?;
        self.store.record_event(
            id,
            "reset-state",
            &format!("state reset to registered by {by}"),
        )?;
        Ok(next)
    }

    /// The instance's events, oldest first.
    pub fn events(&self, key: &str) -> Result<Vec<cradle_store::Event>, RegistryError> {
        let id = self.get(key)?.id;
        Ok(self.store.events(id)?)
    }

    /// Remove an instance, its queued messages, its secrets and its last
    /// install job.
    pub fn remove(&self, key: &str) -> Result<Arc<Instance>, RegistryError> {
        let _w = self.lock_writer();
        let current = self.get(key)?;
        let ops = self
            .groups_read()
            .map(|g| g.plan_remove_instance(current.id))
            .unwrap_or_default();
        if let Some(version) = self.store.delete(current.id, &ops)? {
            self.own_sg(version, &ops);
        }
        self.write().take(current.id);
        self.changed(current.id);
        // Its last job goes too (a running one ends by itself).
        self.jobs
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&current.id);
        self.apply_groups(&ops)?;
        Ok(current)
    }

    /// Set the guest's password, once.
    pub fn set_password(&self, id: Uuid, password: &str) -> Result<(), RegistryError> {
        if password.len() > MAX_PASSWORD {
            return Err(RegistryError::PasswordTooLong);
        }
        let _w = self.lock_writer();
        let current = self.get(&id.to_string())?;
        let Some(version) = self.store.set_password_once(id, password)? else {
            return Err(RegistryError::PasswordSet);
        };
        let mut next = (*current).clone();
        next.password = Some(password.to_string());
        next.version = version;
        self.publish(next);
        Ok(())
    }

    /// Start an OS job: the instance goes to the job's state (`installing`,
    /// `exporting`, `importing`, `renaming`) and `job` becomes its job.
    /// Refused while one runs.
    pub fn begin_install(&self, job: InstallJob) -> Result<Arc<InstallJob>, RegistryError> {
        let _w = self.lock_writer();
        let current = self.get(&job.instance.to_string())?;
        if current.state.is_busy()
            || self
                .install_job(job.instance)
                .is_some_and(|j| j.is_running())
        {
            return Err(RegistryError::Busy(format!(
                "instance {} is {}",
                current.name,
                current.state.busy_with()
            )));
        }
        let job = Arc::new(job);
        let (state, noun) = (job.operation.busy_state(), job.operation.noun());
        self.update_with(current.id, |i| {
            i.state = state;
            i.state_reason = None;
        })?;
        self.store
            .record_event(current.id, noun, &format!("{noun} job {} started", job.id))?;
        self.jobs
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(current.id, job.clone());
        Ok(job)
    }

    /// The instance's last install job, running or not.
    pub fn install_job(&self, id: Uuid) -> Option<Arc<InstallJob>> {
        self.jobs
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&id)
            .cloned()
    }

    /// The instance's install job while it runs: what the metadata service
    /// serves the appliance from.
    pub fn running_install(&self, id: Uuid) -> Option<Arc<InstallJob>> {
        self.install_job(id).filter(|j| j.is_running())
    }

    /// End an OS job, and lose the instance's secret parameters: they were
    /// served to the job's scripts for this job only. After an install the
    /// instance is `stopped` (installed) or `install_failed` with `reason`;
    /// after an import the same, except that an import that failed before
    /// its script read any of the dump gives the instance its state back;
    /// after an export or a rename it has its state back whatever
    /// happened (a rename's new name is set before, by the installer).
    pub fn end_install(
        &self,
        job: &InstallJob,
        succeeded: bool,
        reason: Option<String>,
    ) -> Result<(), RegistryError> {
        let _w = self.lock_writer();
        job.finish(succeeded, reason.clone());
        let noun = job.operation.noun();
        let event = match (&reason, succeeded) {
            (_, true) => format!("{noun} job {} succeeded", job.id),
            (Some(r), false) => format!("{noun} job {} failed: {r}", job.id),
            (None, false) => format!("{noun} job {} failed", job.id),
        };
        if self.get(&job.instance.to_string()).is_err() {
            // Removed while it ran: nothing left to update.
            return Ok(());
        }
        let disk_touched = match job.operation {
            JobOperation::Create => true,
            JobOperation::Import => job.stream().is_none_or(|s| s.is_taken()),
            JobOperation::Export | JobOperation::Rename => false,
        };
        let (state, why) = match (succeeded, disk_touched) {
            (true, true) => (State::Stopped, None),
            (false, true) => (State::InstallFailed, reason.clone()),
            (_, false) => (job.previous, None),
        };
        self.update_with(job.instance, |i| {
            i.os_params.secret.clear();
            i.state = state;
            i.state_reason = match (&why, job.previous) {
                (Some(r), _) => Some(r.clone()),
                // An export that fails leaves an install_failed's reason.
                (None, State::InstallFailed) if !disk_touched => i.state_reason.clone(),
                _ => None,
            };
        })?;
        self.store.record_event(job.instance, noun, &event)?;
        Ok(())
    }

    /// Record that the instance's VM started (`running`) or stopped
    /// (`stopped`) in run mode. Refused while it is being installed.
    pub fn set_run_state(
        &self,
        id: Uuid,
        state: State,
        why: &str,
    ) -> Result<Arc<Instance>, RegistryError> {
        let _w = self.lock_writer();
        let current = self.get(&id.to_string())?;
        if current.state.is_busy() {
            return Err(RegistryError::Busy(format!(
                "instance {} is {}",
                current.name,
                current.state.busy_with()
            )));
        }
        if current.state == state {
            return Ok(current);
        }
        let next = self.update_with(id, |i| {
            i.state = state;
            i.state_reason = None;
        })?;
        self.store.record_event(id, state.as_str(), why)?;
        Ok(next)
    }

    /// Instances left `installing` or `importing` by a server that stopped
    /// mid-job: no job runs any more, so they failed (their disks hold what
    /// the job had written). One left `exporting` or `renaming` is
    /// `stopped` again: those jobs change no disk cradle knows of, and no
    /// VM runs after a server stop.
    pub fn fail_interrupted_installs(&self) -> Result<Vec<String>, RegistryError> {
        let _w = self.lock_writer();
        let stuck: Vec<_> = self
            .list()
            .into_iter()
            // Another host's jobs are its own.
            .filter(|i| i.state.is_busy() && self.is_local(i))
            .collect();
        for i in &stuck {
            let noun = match i.state {
                State::Exporting => "export",
                State::Importing => "import",
                State::Renaming => "rename",
                _ => "install",
            };
            let reason = format!("the server stopped while the {noun} ran");
            let failed = matches!(i.state, State::Installing | State::Importing);
            self.update_with(i.id, |i| {
                if failed {
                    i.state = State::InstallFailed;
                    i.state_reason = Some(reason.clone());
                } else {
                    i.state = State::Stopped;
                    i.state_reason = None;
                }
            })?;
            self.store.record_event(i.id, noun, &reason)?;
        }
        Ok(stuck.iter().map(|i| i.name.clone()).collect())
    }

    /// Queue a message on the channel.
    pub fn push_message(
        &self,
        id: Uuid,
        direction: Direction,
        body: &[u8],
    ) -> Result<i64, RegistryError> {
        if body.len() > self.limits.message_bytes {
            return Err(RegistryError::MessageTooLarge(
                body.len(),
                self.limits.message_bytes,
            ));
        }
        match self
            .store
            .push_message(id, direction, body, self.limits.queue_len)
        {
            Ok(Some(n)) => Ok(n),
            Ok(None) => Err(RegistryError::QueueFull(self.limits.queue_len)),
            Err(StoreError::NotFound) => Err(RegistryError::NotFound(id.to_string())),
            Err(e) => Err(e.into()),
        }
    }

    /// Take the oldest queued message, if any. Never returns one twice.
    pub fn pop_message(
        &self,
        id: Uuid,
        direction: Direction,
    ) -> Result<Option<Message>, RegistryError> {
        Ok(self.store.pop_message(id, direction)?)
    }

    /// Take every queued message.
    pub fn drain_messages(
        &self,
        id: Uuid,
        direction: Direction,
    ) -> Result<Vec<Message>, RegistryError> {
        Ok(self.store.drain_messages(id, direction)?)
    }
}

fn now() -> OffsetDateTime {
    // Whole seconds: timestamps are shown and stored as RFC 3339 and must
    // round-trip exactly (config drives take their times from here).
    let t = OffsetDateTime::now_utc();
    t.replace_nanosecond(0).unwrap_or(t)
}
