//! Run mode: the instance's own VM (`cradle instance start`), beside the
//! install jobs that share its driver.
//!
//! With `run_params.communication` on, the VM also gets the communication
//! NIC as its last NIC (`crr` and 8 hex digits of its id, fenced as an
//! install job's: only the instance's own address, only to the metadata
//! port), so that a guest agent reaches the metadata service and nothing
//! else. A kernel booted directly then hears where it is on its command
//! line: `cradle.address=` (the instance's link-local address),
//! `cradle.metadata=` and `cradle.nic=` (the NIC's MAC). Stopping the VM
//! removes the tap; a start removes a stale one first.

use std::sync::Arc;
use std::time::Duration;

use std::path::PathBuf;

use cradle_hypervisor::{Accel, Hypervisor, KernelBoot, Nic, Status, VmSpec};
use cradle_model::Instance;
use cradle_registry::RegistryError;

use crate::comm::{self, METADATA_IP};
use crate::{AccelChoice, Installer, StartError, blocking, vm_disks};

/// Run mode: the instance's own VM, from its disks, with its memory, vcpus
/// and (when it has one) its interface as a tap with its MAC. Named
/// `vm-<id>` in the run directory, daemonized: it outlives a restart of
/// cradle and is found again by name.
impl Installer {
    fn vm_name(inst: &Instance) -> String {
        format!("vm-{}", inst.id)
    }

    /// The run-mode communication NIC's tap.
    pub fn run_tap(inst: &Instance) -> String {
        format!("crr{}", &inst.id.simple().to_string()[..8])
    }

    /// Start the instance's VM; its state becomes `running`.
    pub async fn start_vm(&self, inst: Arc<Instance>) -> Result<Arc<Instance>, StartError> {
        if inst.state.is_busy() {
            return Err(StartError::Registry(RegistryError::Busy(format!(
                "instance {} is {}",
                inst.name,
                inst.state.busy_with()
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
        if let Some(k) = &inst.run_params.kernel {
            for (what, path) in [("kernel", Some(&k.path)), ("initrd", k.initrd.as_ref())] {
                if let Some(path) = path
                    && let Err(e) = std::fs::metadata(path)
                {
                    return Err(StartError::Invalid(format!(
                        "run_params.kernel's {what} ({path}): {e}"
                    )));
                }
            }
        }
        let accel = match self.settings.accel {
            AccelChoice::Kvm => Accel::Kvm,
            AccelChoice::Tcg => Accel::Tcg,
            // The probe needs the appliance's kernel; without it, TCG.
            AccelChoice::Auto if self.kernel().is_file() => self.accel().await.0,
            AccelChoice::Auto => Accel::Tcg,
        };
        let mut nics: Vec<Nic> = inst
            .interface
            .iter()
            .map(|tap| Nic {
                tap: tap.clone(),
                mac: inst.mac.clone(),
            })
            .collect();
        let port = self.settings.metadata_port;
        let comm_tap = match inst.run_params.communication {
            false => None,
            true => {
                let guest = Self::check_machine(&inst)?;
                let (c, tap) = (self.settings.comm.clone(), Self::run_tap(&inst));
                let t = tap.clone();
                blocking(move || c.setup(&t, guest, port, false))
                    .await
                    .map_err(StartError::Unavailable)?;
                nics.push(Nic {
                    tap: tap.clone(),
                    mac: comm::mac(inst.id),
                });
                Some((tap, guest))
            }
        };
        let kernel = inst.run_params.kernel.as_ref().map(|k| {
            let mut cmdline = k.cmdline.clone().unwrap_or_default();
            if let Some((_, guest)) = &comm_tap {
                cmdline.push_str(&format!(
                    " cradle.address={guest} cradle.metadata={METADATA_IP}:{port} cradle.nic={}",
                    comm::mac(inst.id)
                ));
            }
            KernelBoot {
                kernel: PathBuf::from(&k.path),
                initrd: k.initrd.as_ref().map(PathBuf::from),
                cmdline: cmdline.trim().to_string(),
            }
        });
        let spec = VmSpec {
            name: Self::vm_name(&inst),
            memory_mib: inst.memory_mib,
            vcpus: inst.vcpus,
            disks: vm_disks(&inst),
            kernel,
            nics,
            cdrom: None,
            boot_cdrom: false,
            no_reboot: false,
        };
        let qemu = self.qemu(accel);
        let started = blocking(move || qemu.start(&spec).map_err(|e| e.to_string())).await;
        if let Err(e) = started {
            if let Some((tap, _)) = comm_tap {
                let c = self.settings.comm.clone();
                let _ = tokio::task::spawn_blocking(move || c.teardown(&tap)).await;
            }
            return Err(StartError::Unavailable(e));
        }
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
        // Its communication NIC goes with it (nothing when it had none).
        let (c, tap) = (self.settings.comm.clone(), Self::run_tap(&inst));
        let _ = tokio::task::spawn_blocking(move || c.teardown(&tap)).await;
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
