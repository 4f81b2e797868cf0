//! One registry among the hosts of a cluster, all on one store.
//!
//! Each host keeps every instance in memory, as on one host, and follows
//! the others' changes: the store wakes it (PostgreSQL's LISTEN/NOTIFY, with
//! ids and versions only), and it asks for everything after the last
//! version it has seen ([`Registry::catch_up`]). It asks again after every
//! reconnect and on a timer, so a host that missed a notification
//! converges anyway. What a host holds only in memory (secret parameters,
//! install jobs) stays with it: another host's change to an instance keeps
//! this host's secrets for it.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use cradle_model::Instance;
use cradle_secgroups::state::Op;
use cradle_store::{HostRecord, StoreError};
use uuid::Uuid;

use crate::secgroups::enforced_identity;
use crate::{Registry, RegistryError};

impl Registry {
    /// Remember that this process wrote (and applied) `ops` at `version`.
    pub(crate) fn own_sg(&self, version: i64, ops: &[Op]) {
        // Alone on the store, nothing is ever caught up: nothing to skip.
        if !ops.is_empty() && self.store.shared() {
            self.own_sg_versions
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(version);
        }
    }

    pub(crate) fn secrets_elsewhere(&self, i: &Instance) -> RegistryError {
        RegistryError::WrongHost(format!(
            "instance {} is served by host {:?}, not this one ({:?}): give its secret \
             parameters to that host's admin API (secrets stay on the host that serves them)",
            i.name, i.host, self.host
        ))
    }

    /// Run `f`; when the store says the in-memory copy was stale (another
    /// host changed the instance meanwhile), reload it and run `f` once more.
    pub(crate) fn retry_stale<T>(
        &self,
        id: Uuid,
        f: impl Fn() -> Result<T, RegistryError>,
    ) -> Result<T, RegistryError> {
        match f() {
            Err(RegistryError::Store(StoreError::Stale)) => {
                match self.store.get(id)? {
                    Some(i) => {
                        self.adopt(i);
                    }
                    None => {
                        self.forget(id);
                    }
                }
                f()
            }
            other => other,
        }
    }

    /// Take another host's copy of an instance, unless ours is as new.
    /// Keeps this host's secrets for it while it is served here.
    fn adopt(&self, mut next: Instance) -> bool {
        let current = self.read().by_id.get(&next.id).cloned();
        if let Some(c) = &current {
            if c.version >= next.version {
                return false;
            }
            if self.is_local(c) && self.is_local(&next) {
                next.os_params.secret = c.os_params.secret.clone();
            }
        }
        let refirewall = current.as_ref().is_none_or(|c| {
            enforced_identity(c) != enforced_identity(&next) || c.host != next.host
        });
        let id = next.id;
        self.publish(next);
        if refirewall {
            // A failure marks the firewall dirty; maintenance re-applies it.
            let _ = self.enforce_identity(id);
        }
        true
    }

    /// Drop an instance another host removed.
    fn forget(&self, id: Uuid) -> bool {
        let gone = self.write().take(id).is_some();
        self.changed(id);
        self.jobs
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
        gone
    }

    /// Apply every change stored after the last one this host has seen;
    /// returns how many instances changed.
    pub fn catch_up(&self) -> Result<usize, RegistryError> {
        // One catch-up at a time, reading where the last one ended: two
        // from the same version would replay security-group ops twice.
        // Writers wait only while it applies, not while it reads.
        let _one = self.catching.lock().unwrap_or_else(|e| e.into_inner());
        let since = self.seen.load(Ordering::SeqCst);
        let changes = self.store.changes_since(since)?;
        let _w = self.lock_writer();
        let loaded = self.sg_seen.load(Ordering::SeqCst);
        let mut changed = 0;
        for i in changes.instances {
            changed += usize::from(self.adopt(i));
        }
        for id in changes.removed {
            changed += usize::from(self.forget(id));
        }
        let ops: Vec<Op> = {
            let mut own = self
                .own_sg_versions
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            let versions: BTreeSet<i64> = changes.secgroups.iter().map(|(v, _)| *v).collect();
            let ops = changes
                .secgroups
                .into_iter()
                .filter(|(v, _)| *v > loaded && !own.contains(v))
                .map(|(_, op)| op)
                .collect();
            own.retain(|v| !versions.contains(v) && *v > since);
            ops
        };
        if !ops.is_empty() && self.groups.is_some() {
            // A failure marks the firewall dirty; maintenance re-applies it.
            let _ = self.apply_groups(&ops);
        }
        self.seen.fetch_max(changes.version, Ordering::SeqCst);
        Ok(changed)
    }

    /// Follow other hosts' changes until the process ends: woken by the
    /// store, and at least every `every`. Returns at once (with `None`)
    /// when no other process shares the store.
    pub fn follow(self: &Arc<Self>, every: Duration) -> Option<std::thread::JoinHandle<()>> {
        let first = match self.store.subscribe() {
            Ok(None) => return None,
            Ok(Some(s)) => Some(s),
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for other hosts' changes; retrying");
                None
            }
        };
        let registry = self.clone();
        let thread = std::thread::Builder::new()
            .name("cradle-follow".into())
            .spawn(move || registry.follow_loop(first, every))
            .expect("spawn the follower thread");
        Some(thread)
    }

    fn follow_loop(&self, mut sub: Option<Box<dyn cradle_store::Subscription>>, every: Duration) {
        let mut backoff = Duration::from_millis(100);
        loop {
            let Some(s) = sub.as_mut() else {
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_secs(2));
                match self.store.subscribe() {
                    Ok(s) => sub = s,
                    Err(e) => tracing::debug!(error = %e, "still cannot listen for changes"),
                }
                continue;
            };
            // Whatever happened while not listening is caught up now.
            self.catch_up_logged();
            backoff = Duration::from_millis(100);
            loop {
                match s.wait(every) {
                    Ok(_) => self.catch_up_logged(),
                    Err(e) => {
                        tracing::warn!(error = %e, "lost the store's notifications; reconnecting");
                        sub = None;
                        break;
                    }
                }
            }
        }
    }

    fn catch_up_logged(&self) {
        if let Err(e) = self.catch_up() {
            tracing::warn!(error = %e, "cannot catch up with other hosts' changes");
        }
    }

    /// Say this host is up (for `cradle cluster show`, and for other hosts
    /// that look for it), and take the others' records as they are now.
    pub fn heartbeat(&self, record: &HostRecord) -> Result<(), RegistryError> {
        self.store.heartbeat(record)?;
        self.hosts().map(drop)
    }

    /// Every host that ever said it was up, as the store has them now.
    pub fn hosts(&self) -> Result<Vec<HostRecord>, RegistryError> {
        let hosts = self.store.hosts()?;
        *self.hosts.write().unwrap_or_else(|e| e.into_inner()) = hosts.clone();
        Ok(hosts)
    }

    /// Host `name`'s record: the one taken at the last heartbeat when it was
    /// seen within `fresh` then, else the store's own.
    pub fn host_record(
        &self,
        name: &str,
        fresh: std::time::Duration,
    ) -> Result<Option<HostRecord>, RegistryError> {
        let now = time::OffsetDateTime::now_utc();
        let known = self
            .hosts
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .find(|h| h.name == name && now - h.seen_at <= fresh)
            .cloned();
        match known {
            Some(h) => Ok(Some(h)),
            None => Ok(self.hosts()?.into_iter().find(|h| h.name == name)),
        }
    }

    /// Place an instance on `host` with `disks`: a migration's move. Its
    /// secrets are kept only while it is served here (`secrets` are what it
    /// has here afterwards). The firewall follows at once.
    pub fn set_placement(
        &self,
        id: Uuid,
        host: &str,
        disks: Vec<cradle_model::machine::Disk>,
        secrets: std::collections::BTreeMap<String, cradle_model::Secret<String>>,
    ) -> Result<Arc<Instance>, RegistryError> {
        let _w = self.lock_writer();
        let local = host == self.host;
        let next = self.update_with(id, |i| {
            i.host = host.to_string();
            i.disks = disks.clone();
            i.os_params.secret = if local {
                secrets.clone()
            } else {
                Default::default()
            };
        })?;
        // A failure marks the firewall dirty; maintenance re-applies it.
        let _ = self.enforce_identity(id);
        Ok(next)
    }

    /// Add to an instance's event log.
    pub fn record_event(&self, id: Uuid, kind: &str, message: &str) -> Result<(), RegistryError> {
        Ok(self.store.record_event(id, kind, message)?)
    }

    /// `sqlite` or `postgres`.
    pub fn store_backend(&self) -> &'static str {
        self.store.backend()
    }
}
