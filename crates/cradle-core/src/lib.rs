//! The operations layer: every change and query that a front end (the
//! admin API, the metadata service, the CLI through the typed client)
//! needs is a method of [`Core`]. Each takes who asks (a [`Caller`], or a
//! [`Guest`] known by its source address), decides in
//! [`caller::authorize`] whether they may, and does the work; front ends
//! parse a request, call one operation and shape its answer.
//!
//! Underneath are the parts the operations drive: the registry (instances
//! in memory over the store, security groups, install jobs), the installer
//! (the appliance VMs and run mode), the renderer, config drives,
//! vendordata and personalization packages. No front end reaches them but
//! through here.
//!
//! Anything that blocks (the store, files, QEMU, nft, downloads) runs on
//! tokio's blocking pool inside the operation, so no front end's worker
//! thread ever waits on it; the operations that stay synchronous read
//! memory only.
//!
//! - `instances.rs`: instances, their events and the channel (operator side).
//! - `artifacts.rs`: config drives and personalization packages.
//! - `install.rs`: install jobs and run mode.
//! - `os_jobs.rs`: export, import and rename jobs, and their data streams.
//! - `secgroups.rs`: security groups and the firewall.
//! - `maintenance.rs`: maintenance events (schedule, cancel, the guest's
//!   acknowledgement) and the scheduler that runs them.
//! - `guest/`: what a guest may do (documents, IMDSv2 tokens, the channel,
//!   its password, the appliance's install files), with the render cache.

#![forbid(unsafe_code)]

mod agent;
mod artifacts;
mod caller;
mod error;
mod guest;
pub mod identity;
mod install;
mod instances;
mod maintenance;
pub mod migrate;
mod os_jobs;
pub mod peers;
mod secgroups;
pub use secgroups::FIREWALL_WAIT;

use std::sync::Arc;

use cradle_install::Installer;
use cradle_registry::Registry;

pub use artifacts::{ConfigDrive, PackageDownload};
pub use caller::{ADMIN_ROLE, Caller, Projects};
pub use cradle_drive::Format as DriveFormat;
pub use cradle_registry::metrics::Metrics;
pub use error::{Error, Kind};
pub use guest::{
    DEFAULT_WAIT, Doc, Guest, InstallFile, Namespace, Presented, Wait, WaitLimits, Written,
};
pub use install::StopRequest;
pub use maintenance::MaintenanceSettings;
pub use os_jobs::Export;

/// What the operations run on, built by `cradle serve`.
pub struct Parts {
    pub registry: Arc<Registry>,
    pub install: cradle_install::Settings,
    pub metrics: Arc<Metrics>,
    /// Static vendordata (`[vendordata] static_file`).
    pub vendor_data: serde_json::Value,
    pub vendordata: Arc<cradle_vendordata::Vendordata>,
    pub drive_limits: cradle_drive::Limits,
    /// The nftables table security groups render into.
    pub firewall_table: String,
    /// Whether security-group changes reach the kernel.
    pub firewall_enforced: bool,
    /// The packet-mark bits the firewall's group tags use.
    pub firewall_mark: cradle_secgroups::nft::MarkBits,
    /// Bytes of rendered guest answers kept; 0 disables the cache.
    pub render_cache_bytes: usize,
    /// Longest IMDSv2 token a guest may ask for, in seconds.
    pub max_token_ttl: u32,
    /// How many guests may wait for a change, and for how long.
    pub waits: guest::WaitLimits,
    /// How this host reaches the other hosts of its cluster.
    pub peers: peers::Peers,
    /// How it moves instances to them and takes them in.
    pub migration: migrate::MigrationSettings,
    /// How maintenance events run.
    pub maintenance: MaintenanceSettings,
    pub identity: identity::Identity,
}

/// How many config drives are built at once: each may hold a whole image
/// (64 MiB for vfat) in memory, so a burst queues instead of exhausting it.
const DRIVE_BUILDS: usize = 2;
/// How many personalization packages are fetched at once: each passes
/// through a temporary file of up to the compressed cap.
const PACKAGE_FETCHES: usize = 4;

/// Every operation, over the parts they drive.
pub struct Core {
    registry: Arc<Registry>,
    installer: Arc<Installer>,
    metrics: Arc<Metrics>,
    vendor_data: Arc<serde_json::Value>,
    vendordata: Arc<cradle_vendordata::Vendordata>,
    drive_limits: cradle_drive::Limits,
    drive_builds: tokio::sync::Semaphore,
    package_fetches: tokio::sync::Semaphore,
    firewall_table: String,
    firewall_enforced: bool,
    firewall_mark: cradle_secgroups::nft::MarkBits,
    guests: guest::Guests,
    peers: peers::Peers,
    migration: migrate::MigrationSettings,
    agents: agent::Agents,
    scheduler: maintenance::Scheduler,
    identity: identity::Identity,
}

impl Core {
    pub fn new(parts: Parts) -> Arc<Core> {
        let installer = Arc::new(Installer::new(parts.registry.clone(), parts.install));
        let guests = guest::Guests::new(
            parts.render_cache_bytes,
            parts.max_token_ttl,
            parts.waits,
            parts.metrics.clone(),
        );
        let scheduler = maintenance::Scheduler::new(parts.maintenance);
        // Every change of an instance's record, made here or caught up from
        // another host, wakes what waits on it: the guests waiting for a
        // change, and the scheduler when the instance is served here and
        // has an event to run.
        let (waits, wake) = (guests.waits.clone(), scheduler.waker());
        let registry = Arc::downgrade(&parts.registry);
        parts.registry.on_change(move |id| {
            waits.changed(id);
            if let Some(r) = registry.upgrade()
                && let Ok(i) = r.get(&id.to_string())
                && r.is_local(&i)
                && i.maintenance.iter().any(|e| e.due_at().is_some())
            {
                wake.notify_one();
            }
        });
        Arc::new(Core {
            scheduler,
            guests,
            registry: parts.registry,
            installer,
            metrics: parts.metrics,
            vendor_data: Arc::new(parts.vendor_data),
            vendordata: parts.vendordata,
            drive_limits: parts.drive_limits,
            drive_builds: tokio::sync::Semaphore::new(DRIVE_BUILDS),
            package_fetches: tokio::sync::Semaphore::new(PACKAGE_FETCHES),
            firewall_table: parts.firewall_table,
            firewall_enforced: parts.firewall_enforced,
            firewall_mark: parts.firewall_mark,
            peers: parts.peers,
            migration: parts.migration,
            agents: agent::Agents::new(),
            identity: parts.identity,
        })
    }

    /// The metrics both listeners record their requests in.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Apply what other hosts changed since this one last looked.
    pub async fn catch_up(&self) -> Result<(), Error> {
        let registry = self.registry.clone();
        blocking(move || Ok(registry.catch_up().map(drop)?)).await
    }

    /// This host's name in its cluster.
    pub fn host(&self) -> &str {
        self.registry.host()
    }

    /// How many instances are registered (for start-up logs).
    pub fn instance_count(&self) -> usize {
        self.registry.len()
    }

    /// Start what runs beside the listeners: settling the installer's
    /// accelerator (a probe boot of up to 20 s, so the first install does
    /// not wait for it) and the maintenance events' scheduler. (The
    /// firewall's worker retries failed changes on its own.)
    pub fn spawn_maintenance(self: &Arc<Self>) {
        let installer = self.installer.clone();
        tokio::spawn(async move { installer.warm_up().await });
        tokio::spawn(self.clone().run_scheduler());
    }

    /// The server is stopping: kill the install VMs, remove their taps,
    /// fail their jobs.
    pub async fn shutdown(&self) {
        let installer = self.installer.clone();
        let _ = tokio::task::spawn_blocking(move || installer.shutdown()).await;
    }
}

/// Run `f` on the blocking pool. A task that panicked or was cancelled is
/// an internal error, never something a caller could mistake for theirs.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, Error> + Send + 'static,
) -> Result<T, Error> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::Internal(format!("a blocking task failed: {e}")))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_failed_blocking_task_is_an_internal_error_not_the_callers() {
        let e = blocking(|| -> Result<(), Error> { panic!("a bug, not the caller's doing") })
            .await
            .unwrap_err();
        assert_eq!((e.kind(), e.code()), (Kind::Internal, "internal"));
        // What the caller is told names no detail.
        assert_eq!(e.public_message(), "internal error; see the server log");
    }
}
