//! Install jobs and run mode: the operations over `cradle-install`'s
//! installer, which runs what they start.

use std::time::Duration;

use cradle_hypervisor::Status;
use cradle_model::answers::VmView;
use cradle_model::api::InstanceView;
use cradle_model::job::JobView;

use crate::caller::authorize_package;
use crate::{Caller, Core, Error};

/// Longest a follow request waits for news, in seconds.
const MAX_FOLLOW_WAIT: u64 = 60;

/// How to stop a VM.
#[derive(Debug, Clone, Copy)]
pub struct StopRequest {
    /// Kill it at once instead of asking the guest.
    pub force: bool,
    /// How long the guest gets to power off after the ACPI request
    /// (at most an hour).
    pub grace: Duration,
}

/// Why an OS job did not start: a host that cannot run one now is
/// `install_unavailable` (run mode's `vm` is the `From` mapping).
pub(crate) fn start_error(e: cradle_install::StartError) -> Error {
    match e {
        cradle_install::StartError::Unavailable(m) => Error::unavailable("install_unavailable", m),
        other => Error::from(other),
    }
}

impl Core {
    /// Start an install job: everything is checked before anything starts
    /// (the OS definition and its variant, the disks, the appliance, the
    /// package fetched and verified). A `file://` package is read with the
    /// server's rights: operators only.
    pub async fn start_install(&self, caller: &Caller, key: &str) -> Result<JobView, Error> {
        let instance = self.changeable(caller, key)?;
        authorize_package(
            caller,
            instance.personalization_url.as_deref(),
            "installing with",
        )?;
        let job = self.installer.start(instance).await.map_err(start_error)?;
        Ok(job.view(0))
    }

    /// The instance's last install job with the events after `after`,
    /// waiting up to `wait` (at most [`MAX_FOLLOW_WAIT`] seconds) for
    /// something new while it runs.
    pub async fn install_job(
        &self,
        caller: &Caller,
        key: &str,
        after: u64,
        wait: Duration,
    ) -> Result<JobView, Error> {
        let instance = self.visible(caller, key)?;
        let Some(job) = self.registry.install_job(instance.id) else {
            return Err(Error::not_found(
                "no_install_job",
                format!(
                    "instance {} has no install job since the server started",
                    instance.name
                ),
            ));
        };
        let mut changed = job.subscribe();
        let wait = wait.min(Duration::from_secs(MAX_FOLLOW_WAIT));
        let until = tokio::time::Instant::now() + wait;
        loop {
            changed.borrow_and_update();
            let view = job.view(after);
            if !view.events.is_empty() || view.state != "running" || wait.is_zero() {
                return Ok(view);
            }
            tokio::select! {
                r = changed.changed() => if r.is_err() { return Ok(job.view(after)) },
                _ = tokio::time::sleep_until(until) => return Ok(job.view(after)),
            }
        }
    }

    /// Boot the instance's VM from its disks (run mode).
    pub async fn start_vm(&self, caller: &Caller, key: &str) -> Result<InstanceView, Error> {
        let instance = self.changeable(caller, key)?;
        let started = self.installer.start_vm(instance).await?;
        Ok(InstanceView::from(&*started))
    }

    /// Power the instance's VM off.
    pub async fn stop_vm(
        &self,
        caller: &Caller,
        key: &str,
        how: StopRequest,
    ) -> Result<InstanceView, Error> {
        let instance = self.changeable(caller, key)?;
        let grace = how.grace.min(Duration::from_secs(3600));
        let stopped = self.installer.stop_vm(instance, how.force, grace).await?;
        Ok(InstanceView::from(&*stopped))
    }

    /// The instance's state and what QEMU says of its VM.
    pub async fn vm_status(&self, caller: &Caller, key: &str) -> Result<VmView, Error> {
        let instance = self.visible(caller, key)?;
        let vm = match self.installer.vm_status(&instance).await? {
            Status::Stopped => "stopped".to_string(),
            Status::Running => "running".to_string(),
            Status::Paused => "paused".to_string(),
            Status::Other(o) => o,
        };
        Ok(VmView {
            instance: instance.name.clone(),
            state: instance.state.as_str().to_string(),
            vm,
        })
    }

    /// The last `max` bytes (at most 16 MiB) of the VM's serial console.
    pub async fn console(&self, caller: &Caller, key: &str, max: u64) -> Result<Vec<u8>, Error> {
        let instance = self.visible(caller, key)?;
        Ok(self.installer.console(&instance, max.min(16 << 20)).await?)
    }
}
