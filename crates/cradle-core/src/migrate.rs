//! Cold migration: move an instance, its disks and everything that serves
//! it to another host of the cluster.
//!
//! The source host runs it, step by step, each recorded as an event:
//!
//! 1. **check**: the target is known, up and reachable as a peer; every disk
//!    is readable; the target has room for them (it answers from its own
//!    `statvfs`); the transport's credentials work (the target's directory
//!    is made over ssh or rsync);
//! 2. **stop** the VM if it runs (ACPI power-off, killed after a grace);
//! 3. **copy** every disk with the configured remote filesystem driver
//!    (`cradle-remotefs`), progress reported, sparse files kept sparse;
//! 4. **move** the placement (the target's metadata service serves it and
//!    its firewall enforces it from this write on), and hand the secrets to
//!    the target in memory over the peer channel;
//! 5. **start** it on the target if it was running.
//!
//! A failure or a cancellation at any step rolls back: the placement and the
//! secrets come back, what was copied is removed from the target, and the VM
//! is started again here if it was running. Only when every step is done are
//! the source's disk files removed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cradle_client::route;
use cradle_hypervisor::Status;
use cradle_model::answers::{MigrateRequest, MigrationPrepare, MigrationProgress, MigrationTarget};
use cradle_model::api::{InstancePatch, InstanceView};
use cradle_model::machine::Disk;
use cradle_model::{Instance, Secret};
use cradle_remotefs::{CancellationToken, Host, Op, Remote, RemoteFilesystem, RemotePath};
use tracing::{info, warn};

use crate::caller::{Action, authorize};
use crate::{Caller, Core, Error, Kind, blocking};

/// How this host moves instances and takes them in (`[cluster]`, `[remote]`).
#[derive(Clone, Default)]
pub struct MigrationSettings {
    /// Where arriving disks go: `<disk_dir>/<instance id>/`.
    pub disk_dir: PathBuf,
    /// How other hosts reach this one over ssh or rsync.
    pub ssh_address: String,
    /// How this host reaches others to copy disks.
    pub remote: cradle_remotefs::Settings,
}

/// Where a migration's progress goes, line by line.
pub type Report = Arc<dyn Fn(MigrationProgress) + Send + Sync>;

/// How long the VM has to power off before it is killed, unless asked.
const STOP_GRACE: Duration = Duration::from_secs(60);

/// Free bytes for an unprivileged writer on the filesystem holding `dir`
/// (or its nearest existing parent: the directory is made later).
fn free_space(dir: &Path) -> Result<u64, String> {
    let mut at = dir;
    loop {
        match rustix::fs::statvfs(at) {
            Ok(s) => return Ok(s.f_bavail.saturating_mul(s.f_frsize)),
            Err(rustix::io::Errno::NOENT) => {
                at = at
                    .parent()
                    .ok_or_else(|| format!("{}: no such directory", dir.display()))?;
            }
            Err(e) => return Err(format!("{}: {e}", at.display())),
        }
    }
}

/// What a disk occupies (sparse: only what is allocated), and its file name.
fn disk_usage(n: usize, d: &Disk) -> Result<(String, u64, u64), Error> {
    use std::os::unix::fs::MetadataExt;
    let bad = |why: String| {
        Error::refused(
            Kind::Invalid,
            "invalid",
            format!("disk {n} ({}): {why}", d.path),
        )
    };
    let meta = std::fs::metadata(&d.path).map_err(|e| bad(e.to_string()))?;
    if !meta.is_file() {
        return Err(bad("not a regular file".into()));
    }
    std::fs::File::open(&d.path).map_err(|e| bad(format!("cannot read it: {e}")))?;
    let name = Path::new(&d.path)
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| bad("names no file".into()))?
        .to_string();
    Ok((name, meta.blocks() * 512, meta.len()))
}

/// One migration, once checked: what its steps work on.
#[derive(Clone, Copy)]
struct Move<'a> {
    inst: &'a Arc<Instance>,
    to: &'a str,
    peer: &'a cradle_client::Client,
    remote: &'a Remote,
    target: &'a MigrationTarget,
    /// The target's ssh or rsync end.
    host: &'a Host,
    /// Each disk's file name, allocated bytes and size.
    usage: &'a [(String, u64, u64)],
    grace: Duration,
    cancel: &'a CancellationToken,
    report: &'a Report,
}

/// What a failed step undoes.
#[derive(Default)]
struct Undo {
    /// The target directory was made (and maybe filled).
    copied: Option<(Host, RemotePath)>,
    /// The placement moved.
    moved: bool,
    /// The VM ran before.
    was_running: bool,
}

impl Core {
    /// Take in an instance (target side, through the peer listener): where
    /// its disks go here, once the room for them is checked.
    pub async fn prepare_migration(
        &self,
        caller: &Caller,
        req: MigrationPrepare,
    ) -> Result<MigrationTarget, Error> {
        authorize(caller, Action::Migrate)?;
        let root = self.migration.disk_dir.clone();
        let dir = root.join(req.instance.to_string());
        let need: u64 = req.disks.iter().map(|d| d.1).sum();
        let free = blocking(move || {
            free_space(&root).map_err(|e| Error::Internal(format!("free space: {e}")))
        })
        .await?;
        if free < need {
            return Err(Error::refused(
                Kind::Conflict,
                "no_space",
                format!(
                    "host {:?} has {free} bytes free in {}; the disks need {need}",
                    self.registry.host(),
                    self.migration.disk_dir.display()
                ),
            ));
        }
        let mut paths = Vec::new();
        for (n, (name, _)) in req.disks.iter().enumerate() {
            let name = match req.disks[..n].iter().any(|(other, _)| other == name) {
                true => format!("{n}-{name}"),
                false => name.clone(),
            };
            paths.push(dir.join(name).display().to_string());
        }
        let ssh_address = match self.migration.ssh_address.as_str() {
            "" => self.registry.host().to_string(),
            a => a.to_string(),
        };
        Ok(MigrationTarget {
            ssh_address,
            dir: dir.display().to_string(),
            paths,
        })
    }

    /// What can be refused before a migration starts (who asks, which
    /// instance, where to): front ends that stream its progress answer these
    /// refusals as plain errors first.
    pub fn check_migration(
        &self,
        caller: &Caller,
        key: &str,
        req: &MigrateRequest,
    ) -> Result<(), Error> {
        self.migration_subject(caller, key, req).map(drop)
    }

    fn migration_subject(
        &self,
        caller: &Caller,
        key: &str,
        req: &MigrateRequest,
    ) -> Result<(Arc<Instance>, String), Error> {
        let inst = self.changeable(caller, key)?;
        authorize(caller, Action::Migrate)?;
        if !self.registry.is_local(&inst) {
            return Err(Error::refused(
                Kind::Conflict,
                "wrong_host",
                format!(
                    "instance {} is served by host {:?}: its migration runs there \
                     (`cradle instance migrate` asks it)",
                    inst.name, inst.host
                ),
            ));
        }
        let to = cradle_model::api::parse_host_name("to", &req.to)?;
        if to == inst.host {
            return Err(Error::refused(
                Kind::Invalid,
                "invalid",
                format!("to: instance {} is on host {to:?} already", inst.name),
            ));
        }
        if inst.state.is_busy() {
            return Err(Error::refused(
                Kind::Conflict,
                "busy",
                format!("instance {} is {}", inst.name, inst.state.busy_with()),
            ));
        }
        Ok((inst, to))
    }

    /// Move an instance to another host (source side); see the module doc.
    /// `cancel` (the client went away) rolls back like a failure.
    pub async fn migrate(
        &self,
        caller: &Caller,
        key: &str,
        req: MigrateRequest,
        cancel: CancellationToken,
        report: Report,
    ) -> Result<InstanceView, Error> {
        let (inst, to) = self.migration_subject(caller, key, &req)?;
        let mut settings = self.migration.remote.clone();
        if let Some(t) = &req.transport {
            settings.transport = t.parse().map_err(|e: cradle_remotefs::Error| {
                Error::refused(Kind::Invalid, "invalid", format!("transport: {e}"))
            })?;
        }
        let transport = settings.transport;
        let grace = req
            .grace
            .map_or(STOP_GRACE, |g| Duration::from_secs(g.min(3600)));
        let remote = Remote::new(settings)
            .map_err(|e| Error::refused(Kind::Invalid, "invalid", format!("[remote]: {e}")))?;

        // 1. check
        report(MigrationProgress::new(
            "check",
            format!("checking host {to:?} and {} disk(s)", inst.disks.len()),
        ));
        let mut usage = Vec::new();
        for (n, d) in inst.disks.iter().enumerate() {
            usage.push(disk_usage(n, d)?);
        }
        let peer = self.peer(&to, caller).await?;
        let target = peer
            .send(route::prepare_migration(&MigrationPrepare {
                instance: inst.id,
                disks: usage.iter().map(|(n, a, _)| (n.clone(), *a)).collect(),
            }))
            .await
            .map_err(|e| crate::peers::from_peer(&to, e))?;
        let host = Host::parse(&target.ssh_address).map_err(|e| {
            Error::refused(
                Kind::Invalid,
                "invalid",
                format!("host {to:?}'s ssh_address: {e}"),
            )
        })?;
        let dir = RemotePath::new(target.dir.clone())
            .map_err(|e| Error::Internal(format!("target directory: {e}")))?;
        let unreachable = |what: &str, e: cradle_remotefs::Error| {
            Error::refused(
                Kind::Unavailable,
                "transport",
                format!("{what} on host {to:?} over {transport}: {e}"),
            )
        };
        remote
            .create_dir(&host, &dir, &Op::new().with_cancel(cancel.clone()))
            .await
            .map_err(|e| unreachable("cannot make the disks' directory", e))?;
        let mut undo = Undo {
            copied: Some((host.clone(), dir)),
            ..Undo::default()
        };
        self.event(
            &inst,
            format!("migration to {to} over {transport}: checks passed"),
        )
        .await;
        let result = self
            .migrate_steps(
                &Move {
                    inst: &inst,
                    to: &to,
                    peer: &peer,
                    remote: &remote,
                    target: &target,
                    host: &host,
                    usage: &usage,
                    grace,
                    cancel: &cancel,
                    report: &report,
                },
                &mut undo,
            )
            .await;
        match result {
            Ok(view) => {
                for d in &inst.disks {
                    if let Err(e) = std::fs::remove_file(&d.path) {
                        warn!(path = %d.path, error = %e, "cannot remove a migrated disk's old copy");
                    }
                    // The directory an earlier migration made, once empty.
                    if let Some(dir) = Path::new(&d.path).parent()
                        && dir.starts_with(&self.migration.disk_dir)
                    {
                        let _ = std::fs::remove_dir(dir);
                    }
                }
                self.event(&inst, format!("migrated to {to}")).await;
                info!(instance = %inst.id, to = %to, by = %caller.name, "instance migrated");
                Ok(view)
            }
            Err(e) => {
                let why = match cancel.is_cancelled() {
                    true => "the client went away".to_string(),
                    false => e.public_message(),
                };
                report(MigrationProgress::new(
                    "rollback",
                    format!("rolling back: {why}"),
                ));
                self.roll_back(&inst, &remote, undo).await;
                let running = match self.installer.vm_status(&inst).await {
                    Ok(Status::Running) => ", running",
                    _ => "",
                };
                self.event(
                    &inst,
                    format!(
                        "migration to {to} failed: {why}; the instance stays on {}{running}",
                        inst.host
                    ),
                )
                .await;
                Err(e)
            }
        }
    }

    async fn migrate_steps(&self, m: &Move<'_>, undo: &mut Undo) -> Result<InstanceView, Error> {
        let Move {
            inst,
            to,
            peer,
            remote,
            target,
            host,
            usage,
            grace,
            cancel,
            report,
        } = *m;
        let cancelled = || {
            Error::refused(
                Kind::Unavailable,
                "cancelled",
                "the migration was cancelled",
            )
        };
        // 2. stop
        undo.was_running = matches!(self.installer.vm_status(inst).await, Ok(Status::Running));
        if undo.was_running {
            report(MigrationProgress::new(
                "stop",
                "stopping the VM (ACPI power-off, then killed)",
            ));
            self.installer.stop_vm(inst.clone(), false, grace).await?;
            self.event(inst, "migration: VM stopped".into()).await;
        }
        if cancel.is_cancelled() {
            return Err(cancelled());
        }
        // 3. copy
        for (n, (d, dst)) in inst.disks.iter().zip(&target.paths).enumerate() {
            let total = usage[n].2;
            report(MigrationProgress {
                disk: Some(n),
                done: Some(0),
                total: Some(total),
                ..MigrationProgress::new("copy", format!("copying disk {n} ({}) to {dst}", d.path))
            });
            let last = Mutex::new(Instant::now());
            let r = report.clone();
            let op = Op::new().with_cancel(cancel.clone()).on_progress(move |p| {
                let mut last = last.lock().unwrap_or_else(|e| e.into_inner());
                if last.elapsed() >= Duration::from_millis(250) {
                    *last = Instant::now();
                    r(MigrationProgress {
                        disk: Some(n),
                        done: Some(p.done),
                        total: Some(p.total),
                        ..MigrationProgress::new("copy", "")
                    });
                }
            });
            let dst_path = RemotePath::new(dst.clone())
                .map_err(|e| Error::Internal(format!("target path: {e}")))?;
            remote
                .copy_to(Path::new(&d.path), host, &dst_path, &op)
                .await
                .map_err(|e| {
                    Error::refused(
                        Kind::Unavailable,
                        "transport",
                        format!("copying disk {n} to host {to:?}: {e}"),
                    )
                })?;
            report(MigrationProgress {
                disk: Some(n),
                done: Some(total),
                total: Some(total),
                ..MigrationProgress::new("copy", format!("disk {n} copied"))
            });
        }
        self.event(
            inst,
            format!("migration: {} disk(s) copied to {to}", inst.disks.len()),
        )
        .await;
        if cancel.is_cancelled() {
            return Err(cancelled());
        }
        // 4. move
        report(MigrationProgress::new(
            "move",
            format!("placing it on {to}"),
        ));
        let disks: Vec<Disk> = inst
            .disks
            .iter()
            .zip(&target.paths)
            .map(|(d, p)| Disk {
                path: p.clone(),
                format: d.format,
            })
            .collect();
        let (registry, id, to_host) = (self.registry.clone(), inst.id, to.to_string());
        blocking(move || Ok(registry.set_placement(id, &to_host, disks, BTreeMap::new())?)).await?;
        undo.moved = true;
        if !inst.os_params.secret.is_empty() {
            let mut patch = InstancePatch::default();
            patch.os_params.secret = inst
                .os_params
                .secret
                .iter()
                .map(|(k, v)| (k.clone(), Some(Secret::new(v.expose().clone()))))
                .collect();
            peer.send(route::modify_instance(&inst.id.to_string(), &patch))
                .await
                .map_err(|e| crate::peers::from_peer(to, e))?;
        }
        self.event(inst, format!("migration: placed on {to}")).await;
        // 5. start
        let mut view = None;
        if undo.was_running {
            report(MigrationProgress::new(
                "start",
                format!("starting it on {to}"),
            ));
            view = Some(
                peer.send(route::start_vm(&inst.id.to_string()))
                    .await
                    .map_err(|e| crate::peers::from_peer(to, e))?,
            );
        }
        let view = match view {
            Some(v) => v,
            None => peer
                .send(route::instance(&inst.id.to_string()))
                .await
                .map_err(|e| crate::peers::from_peer(to, e))?,
        };
        report(MigrationProgress {
            instance: Some(Box::new(view.clone())),
            ..MigrationProgress::new(
                "done",
                format!("instance {} runs from host {to} now", inst.name),
            )
        });
        Ok(view)
    }

    /// Undo what a failed migration did; each part is tried whatever the
    /// others did.
    async fn roll_back(&self, inst: &Arc<Instance>, remote: &Remote, undo: Undo) {
        if undo.moved {
            let (registry, id, host) = (self.registry.clone(), inst.id, inst.host.clone());
            let (disks, secrets) = (inst.disks.clone(), inst.os_params.secret.clone());
            if let Err(e) =
                blocking(move || Ok(registry.set_placement(id, &host, disks, secrets)?)).await
            {
                warn!(instance = %inst.id, error = %e, "cannot move a failed migration's placement back");
            }
        }
        if let Some((host, dir)) = undo.copied
            && let Err(e) = remote.remove_dir(&host, &dir, &Op::new()).await
        {
            warn!(instance = %inst.id, error = %e, "cannot remove a failed migration's copies");
        }
        if undo.was_running {
            match self.registry.get(&inst.id.to_string()) {
                Ok(current) => {
                    if let Err(e) = self.installer.start_vm(current).await {
                        warn!(instance = %inst.id, error = %e, "cannot start the VM again after a failed migration");
                    }
                }
                Err(e) => warn!(instance = %inst.id, error = %e, "the instance is gone"),
            }
        }
    }

    async fn event(&self, inst: &Instance, message: String) {
        let (registry, id) = (self.registry.clone(), inst.id);
        let r = blocking(move || Ok(registry.record_event(id, "migrate", &message)?)).await;
        if let Err(e) = r {
            warn!(instance = %inst.id, error = %e, "cannot record a migration event");
        }
    }
}
