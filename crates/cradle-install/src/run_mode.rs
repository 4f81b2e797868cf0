//! Run mode: the instance's own VM (`cradle instance start`), beside the
//! install jobs that share its driver.

use std::sync::Arc;
use std::time::Duration;

use cradle_hypervisor::{Accel, Hypervisor, Nic, Status, VmSpec};
use cradle_model::Instance;
use cradle_registry::RegistryError;

use crate::{AccelChoice, Installer, StartError, blocking, vm_disks};

/// Run mode: the instance's own VM, from its disks, with its memory, vcpus
/// and (when it has one) its interface as a tap with its MAC. Named
/// `vm-<id>` in the run directory, daemonized: it outlives a restart of
/// cradle and is found again by name.
impl Installer {
    fn vm_name(inst: &Instance) -> String {
        format!("vm-{}", inst.id)
    }

    /// Start the instance's VM; its state becomes `running`.
    pub async fn start_vm(&self, inst: Arc<Instance>) -> Result<Arc<Instance>, StartError> {
        if inst.state == cradle_model::State::Installing {
            return Err(StartError::Registry(RegistryError::Busy(format!(
                "instance {} is being installed",
                inst.name
            ))));
        }
        if inst.disks.is_empty() {
            return Err(StartError::Invalid(format!(
                "instance {} has no disks to boot from",
                inst.name
            )));
        }
        for (n, d) in inst.disks.iter().enumerate() {
            if let Err(e) = std::fs::metadata(&d.path) {
                return Err(StartError::Invalid(format!("disk {n} ({}): {e}", d.path)));
            }
        }
        let accel = match self.settings.accel {
            AccelChoice::Kvm => Accel::Kvm,
            AccelChoice::Tcg => Accel::Tcg,
            // The probe needs the appliance's kernel; without it, TCG.
            AccelChoice::Auto if self.kernel().is_file() => self.accel().await.0,
            AccelChoice::Auto => Accel::Tcg,
        };
        let spec = VmSpec {
            name: Self::vm_name(&inst),
            memory_mib: inst.memory_mib,
            vcpus: inst.vcpus,
            disks: vm_disks(&inst),
            kernel: None,
            nics: inst
                .interface
                .iter()
                .map(|tap| Nic {
                    tap: tap.clone(),
                    mac: inst.mac.clone(),
                })
                .collect(),
            cdrom: None,
            boot_cdrom: false,
            no_reboot: false,
        };
        let qemu = self.qemu(accel);
        blocking(move || qemu.start(&spec).map_err(|e| e.to_string()))
            .await
            .map_err(StartError::Unavailable)?;
        self.record_run_state(
            inst.id,
            cradle_model::State::Running,
            format!("started ({})", accel.as_str()),
        )
        .await
    }

    /// The run state, written to the store on the blocking pool.
    async fn record_run_state(
        &self,
        id: uuid::Uuid,
        state: cradle_model::State,
        why: String,
    ) -> Result<Arc<Instance>, StartError> {
        let registry = self.registry.clone();
        tokio::task::spawn_blocking(move || registry.set_run_state(id, state, &why))
            .await
            .map_err(|e| StartError::Unavailable(format!("internal task failed: {e}")))?
            .map_err(StartError::from)
    }

    /// Stop the instance's VM: ACPI power-off with `grace`, then killed
    /// (`force`: killed at once). Its state becomes `stopped`.
    pub async fn stop_vm(
        &self,
        inst: Arc<Instance>,
        force: bool,
        grace: Duration,
    ) -> Result<Arc<Instance>, StartError> {
        let (qemu, name) = (self.qemu(Accel::Tcg), Self::vm_name(&inst));
        blocking(move || {
            if force {
                qemu.kill(&name)
            } else {
                qemu.stop(&name, grace)
            }
            .map_err(|e| e.to_string())
        })
        .await
        .map_err(StartError::Unavailable)?;
        let why = if force { "killed" } else { "stopped" };
        self.record_run_state(inst.id, cradle_model::State::Stopped, why.into())
            .await
    }

    /// What QEMU says of the instance's VM.
    pub async fn vm_status(&self, inst: &Instance) -> Result<Status, StartError> {
        let (qemu, name) = (self.qemu(Accel::Tcg), Self::vm_name(inst));
        blocking(move || qemu.status(&name).map_err(|e| e.to_string()))
            .await
            .map_err(StartError::Unavailable)
    }

    /// The last `max` bytes of the VM's console (its serial port).
    pub async fn console(&self, inst: &Instance, max: u64) -> Result<Vec<u8>, StartError> {
        use std::io::{Read, Seek, SeekFrom};
        let path = self
            .qemu(Accel::Tcg)
            .console_log(&Self::vm_name(inst))
            .map_err(|e| StartError::Unavailable(e.to_string()))?;
        blocking(move || {
            let mut f = match std::fs::File::open(&path) {
                Ok(f) => f,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
                Err(e) => return Err(format!("{}: {e}", path.display())),
            };
            let len = f.metadata().map(|m| m.len()).unwrap_or(0);
            f.seek(SeekFrom::Start(len.saturating_sub(max)))
                .map_err(|e| e.to_string())?;
            let mut out = Vec::new();
            f.read_to_end(&mut out).map_err(|e| e.to_string())?;
            Ok(out)
        })
        .await
        .map_err(StartError::Unavailable)
    }
}
