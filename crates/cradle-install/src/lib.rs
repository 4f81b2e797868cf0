//! Install jobs (seed 003's `install` mode): the instance's OS definition
//! runs its `create` scripts without untrusted code, or an untrusted
//! filesystem, ever touching the host.
//!
//! [`Installer::start`] checks everything it can before anything happens
//! (the OS definition and its variant, the disks, the appliance, the
//! personalization package, fetched and verified now), registers an
//! [`InstallJob`] with the registry (the instance goes to `installing`) and
//! runs it on a task:
//!
//! 1. the communication NIC ([`comm`]): a tap fenced by nftables;
//! 2. the appliance (`cradle appliance build`) boots in a throwaway QEMU VM
//!    with the instance's disks and that tap, its address on its kernel
//!    command line. Its agent reads the job from the metadata service
//!    (`install.json`, the untrusted scripts, the package), runs the
//!    scripts, overlays the package, and reports progress and a final
//!    status on the channel;
//! 3. at the same time the OS's trusted `create`, if it has one, runs on
//!    the host as the unprivileged script user;
//! 4. the job ends on the agent's explicit status (and the trusted
//!    script's exit), on the deadline (`[install] timeout`, counted from the
//!    start and never reset: the VM is killed), or when the appliance stops
//!    without a status. The VM, its run directory, the tap and its table are
//!    removed whatever happened; the instance goes to `stopped` or to
//!    `install_failed` with the reason, and loses its secret parameters.
//!
//! The installer is driven by `cradle-core`'s operations, which look the
//! instance up and authorize the caller first; its store writes run on the
//! blocking pool. `run_mode.rs` is the other use of the same driver: the
//! instance's own VM (`cradle instance start`).

pub mod comm;
mod os_job;
mod run_mode;

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use cradle_hypervisor::{Accel, Hypervisor, KernelBoot, Nic, Qemu, Status, VmSpec};
use cradle_model::{Instance, Os};
use cradle_os::Placement;
use cradle_registry::jobs::{Artifacts, EventKind, InstallJob, Package};
use cradle_registry::{Registry, RegistryError};
use tracing::{info, warn};

pub use comm::{Comm, METADATA_IP};
pub use cradle_registry::stream::Source;
pub use os_job::OsJob;
use os_job::Plan;

/// How the accelerator is chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AccelChoice {
    /// KVM when a probe boot shows it runs the appliance's kernel.
    Auto,
    Kvm,
    Tcg,
}

impl std::str::FromStr for AccelChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(AccelChoice::Auto),
            "kvm" => Ok(AccelChoice::Kvm),
            "tcg" => Ok(AccelChoice::Tcg),
            other => Err(format!("accel must be auto, kvm or tcg, not {other:?}")),
        }
    }
}

/// What the installer needs to know.
#[derive(Clone, Debug)]
pub struct Settings {
    /// `vmlinuz` and `initrd.img`, from `cradle appliance build -o`.
    pub appliance: PathBuf,
    pub qemu: PathBuf,
    pub accel: AccelChoice,
    pub timeout: Duration,
    pub memory_mib: u32,
    /// Where the appliance finds the metadata service at 169.254.169.254.
    pub metadata_port: u16,
    pub comm: Comm,
    /// Where the appliance VMs' run directories go.
    pub run_dir: PathBuf,
    pub os_search: Vec<PathBuf>,
    /// Who trusted scripts run as, when cradle is root.
    pub script_user: String,
    /// Writes a self_install's `os_image` onto disk 0.
    pub qemu_img: PathBuf,
    /// Answers a self-installing guest's DHCP with its own address.
    pub dnsmasq: PathBuf,
    /// Where imports' dumps are spooled and checked before their job runs.
    pub spool_dir: PathBuf,
    /// The largest dump an export sends or an import takes.
    pub stream_max_bytes: u64,
}

/// Why an install did not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// The instance cannot be installed as it is.
    #[error("{0}")]
    Invalid(String),
    /// The host cannot install now (no appliance, no script user).
    #[error("{0}")]
    Unavailable(String),
    /// The instance's OS has no script for the operation (or it has no
    /// `os_type`): a rename then renames in the registry alone.
    #[error("{0}")]
    NoScript(String),
}

/// Starts and runs install jobs.
pub struct Installer {
    registry: Arc<Registry>,
    settings: Settings,
    accel: tokio::sync::OnceCell<(Accel, Option<String>)>,
    /// Jobs running now, with their VM and tap names.
    running: std::sync::Mutex<std::collections::HashMap<uuid::Uuid, Running>>,
}

struct Running {
    job: Arc<InstallJob>,
    vm: String,
    tap: String,
}

/// How long the probe boot may take to show the kernel's banner.
const PROBE_WITHIN: Duration = Duration::from_secs(20);
/// How long the appliance gets to power itself off after its status.
const POWER_OFF_GRACE: Duration = Duration::from_secs(20);

/// How a VM that powered off without a status is reported.
const STOPPED_WITHOUT_STATUS: &str = "the VM stopped without reporting a status";

/// What the job found, before it becomes the instance's state.
type Result2 = Result<String, String>;

impl Installer {
    pub fn new(registry: Arc<Registry>, settings: Settings) -> Installer {
        Installer {
            registry,
            settings,
            accel: tokio::sync::OnceCell::new(),
            running: std::sync::Mutex::new(std::collections::HashMap::new()),
        }
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    fn kernel(&self) -> PathBuf {
        self.settings.appliance.join("vmlinuz")
    }

    fn initrd(&self) -> PathBuf {
        self.settings.appliance.join("initrd.img")
    }

    /// The accelerator, probed once (at the first install) when `auto`.
    async fn accel(&self) -> (Accel, Option<String>) {
        self.accel
            .get_or_init(|| async {
                match self.settings.accel {
                    AccelChoice::Kvm => (Accel::Kvm, None),
                    AccelChoice::Tcg => (Accel::Tcg, Some("[install] accel = \"tcg\"".into())),
                    AccelChoice::Auto => {
                        let (qemu, kernel) = (self.settings.qemu.clone(), self.kernel());
                        let p = tokio::task::spawn_blocking(move || {
                            cradle_hypervisor::probe(&qemu, &kernel, PROBE_WITHIN)
                        })
                        .await;
                        match p {
                            Ok(p) => (p.accel, p.reason),
                            Err(e) => (Accel::Tcg, Some(format!("the KVM probe failed: {e}"))),
                        }
                    }
                }
            })
            .await
            .clone()
    }

    /// Settle the accelerator now (the probe boots a kernel, up to 20 s),
    /// so the first install does not wait for it. Without an appliance
    /// there is nothing to probe yet.
    pub async fn warm_up(&self) {
        if self.kernel().is_file() {
            let (accel, why) = self.accel().await;
            info!(
                accel = accel.as_str(),
                reason = why.as_deref().unwrap_or(""),
                "install accelerator"
            );
        }
    }

    /// Check `inst` can be installed, register its job and start it. The
    /// caller (the operations layer) has looked it up and authorized it.
    pub async fn start(
        self: &Arc<Self>,
        inst: Arc<Instance>,
    ) -> Result<Arc<InstallJob>, StartError> {
        Ok(self.start_job(inst, OsJob::Create).await?.0)
    }

    /// Check `inst` can run `request`, register its job and start it; an
    /// export's answer also gets the end its dump is read from.
    pub async fn start_job(
        self: &Arc<Self>,
        inst: Arc<Instance>,
        request: OsJob,
    ) -> Result<(Arc<InstallJob>, Option<Source>), StartError> {
        let this = self.clone();
        // Files, the OS definition, the package download and the store
        // write all block: none of it on the runtime's workers.
        let prepared = tokio::task::spawn_blocking(move || {
            let (job, plan, source) = this.prepare(&inst, request)?;
            let job = this.registry.begin_install(job)?;
            Ok::<_, StartError>((inst, job, plan, source))
        })
        .await
        .map_err(|e| StartError::Unavailable(format!("internal task failed: {e}")))??;
        let (inst, job, plan, source) = prepared;
        info!(instance = %inst.id, job = %job.id, mode = plan.mode(), operation = job.operation.as_str(), "job started");
        let this = self.clone();
        let running = job.clone();
        tokio::spawn(async move { this.run(running, inst, plan).await });
        Ok((job, source))
    }

    /// Check that `request` could start now, without starting it (an
    /// import checks before its dump is uploaded).
    pub fn check_job(&self, inst: &Instance, request: OsJob) -> Result<(), StartError> {
        self.prepare(inst, request).map(|_| ())
    }

    /// Everything that can be checked before the job exists: `install`
    /// for an `os_type`, `self_install` for an `os_image`; the other OS
    /// operations need an `os_type`.
    fn prepare(
        &self,
        inst: &Instance,
        request: OsJob,
    ) -> Result<(InstallJob, Work, Option<Source>), StartError> {
        let op = request.operation();
        match &inst.os {
            Some(Os::Type(full)) => self
                .prepare_os_job(inst, full, request)
                .map(|(j, p, s)| (j, Work::Install(Box::new(p)), s)),
            _ if op != cradle_model::job::JobOperation::Create => {
                Err(StartError::NoScript(format!(
                    "instance {} has no os_type: its OS definition's {} script is what {}s it",
                    inst.name,
                    op.as_str(),
                    op.as_str()
                )))
            }
            Some(Os::Image(image)) => self
                .prepare_self_install(inst, image)
                .map(|(j, p)| (j, Work::SelfInstall(p), None)),
            None => Err(StartError::Invalid(format!(
                "instance {} has no os_type (install: an OS definition's create scripts in \
                 the appliance) and no os_image (self_install: the guest installs itself)",
                inst.name
            ))),
        }
    }

    /// Disks present, and the guest's address one the NIC can carry.
    pub(crate) fn check_machine(inst: &Instance) -> Result<Ipv4Addr, StartError> {
        let bad = |m: String| Err(StartError::Invalid(m));
        if inst.disks.is_empty() {
            return bad(format!(
                "instance {} has no disks to install onto (instance modify --disk PATH)",
                inst.name
            ));
        }
        for (n, d) in inst.disks.iter().enumerate() {
            if let Err(e) = std::fs::metadata(&d.path) {
                return bad(format!("disk {n} ({}): {e}", d.path));
            }
        }
        match inst.metadata_address {
            IpAddr::V4(a) if a.is_link_local() && a != METADATA_IP => Ok(a),
            other => bad(format!(
                "metadata_address {other} is not a guest address in 169.254.0.0/16: the \
                 communication NIC needs one"
            )),
        }
    }

    /// `self_install`: the instance boots its own disks (with `os_image`
    /// written onto disk 0 first when it names a file) and its install
    /// parameters, the communication NIC on, and configures itself from
    /// metadata. No OS script runs; the package is only served.
    fn prepare_self_install(
        &self,
        inst: &Instance,
        image: &str,
    ) -> Result<(InstallJob, SelfPlan), StartError> {
        let guest = Self::check_machine(inst)?;
        let bad = |m: String| Err(StartError::Invalid(m));
        let p = &inst.install_params;
        for (what, path) in [
            ("cdrom", &p.cdrom),
            ("kernel", &p.kernel),
            ("initrd", &p.initrd),
        ] {
            if let Some(path) = path
                && let Err(e) = std::fs::metadata(path)
            {
                return bad(format!("install_params.{what} ({path}): {e}"));
            }
        }
        let source = image.strip_prefix("file://").unwrap_or(image);
        let source = if source.starts_with('/') {
            if let Err(e) = std::fs::metadata(source) {
                return bad(format!("os_image {source}: {e}"));
            }
            Some(PathBuf::from(source))
        } else {
            None
        };
        let package = match &inst.personalization_url {
            Some(url) => Some(fetch_package(inst, url)?),
            None => None,
        };
        let manifest = serde_json::json!({
            "operation": "self_install",
            "instance": inst.name,
            "run": null,
            "scripts": [],
            "personalization": package.as_ref().map(|_| serde_json::json!({
                "path": "/cradle/latest/os/package",
            })),
        });
        let manifest = serde_json::to_vec(&manifest).expect("JSON values serialize");
        let job = InstallJob::new(
            inst,
            Artifacts {
                manifest: manifest.into(),
                scripts: BTreeMap::new(),
                package,
            },
        );
        Ok((job, SelfPlan { guest, source }))
    }

    fn running(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<uuid::Uuid, Running>> {
        self.running.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Stop every running job (the server is stopping): kill the VMs,
    /// remove the taps, fail the jobs.
    pub fn shutdown(&self) {
        let all: Vec<Running> = self.running().drain().map(|(_, r)| r).collect();
        for r in all {
            let _ = self.qemu(Accel::Tcg).kill(&r.vm);
            self.settings.comm.teardown(&r.tap);
            let _ = std::fs::remove_dir_all(self.settings.run_dir.join(&r.vm));
            let _ = self.registry.end_install(
                &r.job,
                false,
                Some("the server stopped while the install ran".into()),
            );
        }
    }

    async fn run(self: Arc<Self>, job: Arc<InstallJob>, inst: Arc<Instance>, work: Work) {
        let vm = format!("{}-{}", job.operation.noun(), inst.id);
        let tap = format!("cri{}", &inst.id.simple().to_string()[..8]);
        self.running().insert(
            job.id,
            Running {
                job: job.clone(),
                vm: vm.clone(),
                tap: tap.clone(),
            },
        );
        job.note(EventKind::Job, &format!("mode: {}", work.mode()));
        let outcome = match &work {
            Work::Install(plan) => self.drive(&job, &inst, plan, &vm, &tap).await,
            Work::SelfInstall(plan) => self.drive_self_install(&job, &inst, plan, &vm, &tap).await,
        };
        if self.running().remove(&job.id).is_none() {
            // shutdown() took it.
            return;
        }
        // Whatever happened: no VM, no scratch, no tap.
        let qemu = self.qemu(Accel::Tcg);
        let (vm2, tap2, comm) = (vm.clone(), tap.clone(), self.settings.comm.clone());
        let run_dir = self.settings.run_dir.join(&vm);
        let cleaned = tokio::task::spawn_blocking(move || {
            let killed = qemu.kill(&vm2);
            comm.teardown(&tap2);
            let _ = std::fs::remove_dir_all(&run_dir);
            killed
        })
        .await;
        match cleaned {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                warn!(instance = %inst.id, error = %e, "cannot stop the install appliance")
            }
            Err(e) => warn!(instance = %inst.id, error = %e, "cannot stop the install appliance"),
        }
        let outcome = match (outcome, &work) {
            (Ok(note), Work::Install(plan)) => {
                // The stream's ends agree; a rename's name is taken (a
                // store write, so on the blocking pool).
                let (registry, ended) = (self.registry.clone(), job.clone());
                let (request, untrusted) = (plan.job.clone(), plan.placement != Placement::Host);
                let concluded = blocking(move || {
                    let agent = ended.status();
                    os_job::conclude(&registry, &ended, &request, untrusted, agent.as_ref())
                })
                .await;
                concluded.map(|n| match n {
                    Some(more) => format!("{note}; {more}"),
                    None => note,
                })
            }
            (outcome, _) => outcome,
        };
        let (ok, reason) = match outcome {
            Ok(note) => (true, Some(note)),
            Err(reason) => (false, Some(reason)),
        };
        if let Some(spool) = job.stream().and_then(|s| s.spool()) {
            let _ = std::fs::remove_file(spool);
        }
        let (registry, ended, why) = (self.registry.clone(), job.clone(), reason.clone());
        let recorded =
            tokio::task::spawn_blocking(move || registry.end_install(&ended, ok, why)).await;
        match recorded {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                warn!(instance = %inst.id, error = %e, "cannot record the end of the job")
            }
            Err(e) => {
                warn!(instance = %inst.id, error = %e, "cannot record the end of the job")
            }
        }
        info!(instance = %inst.id, job = %job.id, operation = job.operation.as_str(), succeeded = ok, reason = reason.as_deref().unwrap_or(""), "job ended");
    }

    /// When `job` must end (`[install] timeout` from its start, never
    /// extended), and how that end is reported.
    fn deadline(
        &self,
        job: &InstallJob,
    ) -> (tokio::time::Instant, impl Fn() -> String + Sync + use<>) {
        let secs = self.settings.timeout.as_secs();
        (
            tokio::time::Instant::from_std(job.started + self.settings.timeout),
            move || {
                format!(
                    "the install ran past its {secs}s timeout ([install] timeout); the VM was killed"
                )
            },
        )
    }

    fn qemu(&self, accel: Accel) -> Qemu {
        Qemu::new(&self.settings.qemu, &self.settings.run_dir, accel)
    }

    async fn drive(
        &self,
        job: &Arc<InstallJob>,
        inst: &Arc<Instance>,
        plan: &Plan,
        vm: &str,
        tap: &str,
    ) -> Result2 {
        let (deadline, timeout_reason) = self.deadline(job);
        let trusted = if plan.placement == Placement::Appliance {
            None
        } else {
            Some(self.spawn_trusted(job, inst, plan))
        };
        let mut agent: Option<cradle_registry::jobs::AgentStatus> = None;
        if plan.appliance {
            let (accel, why) = self.accel().await;
            job.note(
                EventKind::Job,
                &match why {
                    Some(w) if accel == Accel::Tcg => format!("accelerator: tcg ({w})"),
                    _ => format!("accelerator: {}", accel.as_str()),
                },
            );
            let comm = self.settings.comm.clone();
            let (t, guest, port) = (tap.to_string(), plan.guest, self.settings.metadata_port);
            blocking(move || comm.setup(&t, guest, port, false)).await?;
            job.note(
                EventKind::Job,
                &format!(
                    "communication NIC {tap}: {METADATA_IP} on the host, {} in the appliance",
                    plan.guest
                ),
            );
            let spec = self.vm_spec(inst, plan, vm, tap);
            let qemu = self.qemu(accel);
            let q = qemu.clone();
            blocking(move || q.start(&spec).map_err(|e| e.to_string())).await?;
            job.note(EventKind::Job, "appliance booting");
            agent = Some(
                self.wait_for_agent(job, &qemu, vm, deadline, &timeout_reason)
                    .await?,
            );
            // It syncs and powers off by itself; then it is killed anyway.
            let until = tokio::time::Instant::now() + POWER_OFF_GRACE;
            while tokio::time::Instant::now() < until.min(deadline) {
                let (q, name) = (qemu.clone(), vm.to_string());
                match tokio::task::spawn_blocking(move || q.status(&name)).await {
                    Ok(Ok(Status::Running)) => tokio::time::sleep(Duration::from_millis(200)).await,
                    _ => break,
                }
            }
        }
        let trusted = match trusted {
            None => None,
            Some(handle) => match tokio::time::timeout_at(deadline, handle).await {
                Err(_) => return Err(timeout_reason()),
                Ok(Err(e)) => {
                    return Err(format!(
                        "the trusted {} script's task failed: {e}",
                        plan.op()
                    ));
                }
                Ok(Ok(r)) => Some(r?),
            },
        };
        if let Some(st) = &agent
            && st.exit_code != 0
        {
            return Err(match &st.error {
                Some(e) => format!("the appliance reported exit code {}: {e}", st.exit_code),
                None => format!("the appliance reported exit code {}", st.exit_code),
            });
        }
        if let Some(code) = trusted
            && code != 0
        {
            return Err(format!(
                "the trusted {} script exited with {code}",
                plan.op()
            ));
        }
        Ok(match (agent.is_some(), trusted.is_some()) {
            (true, true) => format!(
                "the appliance and the trusted {} script succeeded",
                plan.op()
            ),
            (true, false) => "the appliance reported exit code 0".into(),
            _ => format!("the trusted {} script succeeded", plan.op()),
        })
    }

    /// A `self_install`: disk 0 from `os_image` when it is a file, then
    /// the instance's own VM with its install parameters and the
    /// communication NIC (DHCP from dnsmasq: a static lease of its
    /// metadata address to its MAC). It ends on a status on the channel
    /// (the agent's format), on power-off (the guest's own installer is
    /// done: there is no agent to report), or at the deadline.
    async fn drive_self_install(
        &self,
        job: &Arc<InstallJob>,
        inst: &Arc<Instance>,
        plan: &SelfPlan,
        vm: &str,
        tap: &str,
    ) -> Result2 {
        let (deadline, timeout_reason) = self.deadline(job);
        if let Some(src) = &plan.source {
            job.note(
                EventKind::Job,
                &format!("writing the os_image {} onto disk 0", src.display()),
            );
            let disk = &inst.disks[0];
            let mut cmd = tokio::process::Command::new(&self.settings.qemu_img);
            cmd.args(["convert", "-n", "-O", disk.format.as_str()])
                .arg(src)
                .arg(&disk.path)
                .stdin(std::process::Stdio::null())
                .kill_on_drop(true);
            let out = tokio::time::timeout_at(deadline, cmd.output())
                .await
                .map_err(|_| timeout_reason())?
                .map_err(|e| format!("cannot run {}: {e}", self.settings.qemu_img.display()))?;
            if !out.status.success() {
                return Err(format!(
                    "writing the os_image onto disk 0 failed: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                ));
            }
        }
        let (accel, _) = self.accel().await;
        job.note(EventKind::Job, &format!("accelerator: {}", accel.as_str()));
        let comm = self.settings.comm.clone();
        let (t, guest, port) = (tap.to_string(), plan.guest, self.settings.metadata_port);
        blocking(move || comm.setup(&t, guest, port, true)).await?;
        let mut dnsmasq = tokio::process::Command::new(&self.settings.dnsmasq);
        dnsmasq
            .args(comm::dnsmasq_args(tap, &inst.mac, plan.guest))
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true);
        let mut dhcp = dnsmasq
            .spawn()
            .map_err(|e| format!("cannot run {}: {e}", self.settings.dnsmasq.display()))?;
        tokio::time::sleep(Duration::from_millis(200)).await;
        if let Ok(Some(status)) = dhcp.try_wait() {
            let mut err = String::new();
            if let Some(mut e) = dhcp.stderr.take() {
                use tokio::io::AsyncReadExt;
                let _ = e.read_to_string(&mut err).await;
            }
            return Err(format!("dnsmasq exited ({status}): {}", err.trim()));
        }
        job.note(
            EventKind::Job,
            &format!(
                "communication NIC {tap}: {METADATA_IP} on the host, DHCP gives {} to {}",
                plan.guest, inst.mac
            ),
        );
        let p = &inst.install_params;
        let spec = VmSpec {
            name: vm.to_string(),
            memory_mib: inst.memory_mib,
            vcpus: inst.vcpus,
            disks: vm_disks(inst),
            kernel: p.kernel.as_ref().map(|k| KernelBoot {
                kernel: PathBuf::from(k),
                initrd: p.initrd.as_ref().map(PathBuf::from),
                cmdline: p.cmdline.clone().unwrap_or_default(),
            }),
            nics: vec![Nic {
                tap: tap.to_string(),
                mac: inst.mac.clone(),
            }],
            cdrom: p.cdrom.as_ref().map(PathBuf::from),
            boot_cdrom: p.cdrom.is_some()
                && p.boot != Some(cradle_model::machine::BootDevice::Disk),
            no_reboot: true,
        };
        let qemu = self.qemu(accel);
        let q = qemu.clone();
        blocking(move || q.start(&spec).map_err(|e| e.to_string())).await?;
        job.note(
            EventKind::Job,
            "the instance is booting in self_install mode",
        );
        let ended = self
            .wait_for_agent(job, &qemu, vm, deadline, &timeout_reason)
            .await;
        let _ = dhcp.kill().await;
        match ended {
            Ok(st) if st.exit_code == 0 => Ok("the guest reported exit code 0".into()),
            Ok(st) => Err(match &st.error {
                Some(e) => format!("the guest reported exit code {}: {e}", st.exit_code),
                None => format!("the guest reported exit code {}", st.exit_code),
            }),
            Err(e) if e.starts_with(STOPPED_WITHOUT_STATUS) => {
                Ok("the guest powered off (self_install: its installer is done)".into())
            }
            Err(e) => Err(e),
        }
    }

    fn vm_spec(&self, inst: &Instance, plan: &Plan, vm: &str, tap: &str) -> VmSpec {
        VmSpec {
            name: vm.to_string(),
            memory_mib: self.settings.memory_mib,
            vcpus: 1,
            disks: vm_disks_with(inst, plan.read_only()),
            kernel: Some(KernelBoot {
                kernel: self.kernel(),
                initrd: Some(self.initrd()),
                cmdline: format!(
                    "console=ttyS0 panic=-1 quiet cradle.address={} cradle.metadata={METADATA_IP}:{}",
                    plan.guest, self.settings.metadata_port
                ),
            }),
            nics: vec![Nic {
                tap: tap.to_string(),
                mac: comm::mac(inst.id),
            }],
            cdrom: None,
            boot_cdrom: false,
            no_reboot: true,
        }
    }

    /// Until the agent's status, the deadline, or the VM stopping without one.
    async fn wait_for_agent(
        &self,
        job: &Arc<InstallJob>,
        qemu: &Qemu,
        vm: &str,
        deadline: tokio::time::Instant,
        timeout_reason: &(dyn Fn() -> String + Sync),
    ) -> Result<cradle_registry::jobs::AgentStatus, String> {
        let mut changed = job.subscribe();
        loop {
            if let Some(st) = job.status() {
                return Ok(st);
            }
            if let Some(why) = job.stream().and_then(|s| s.failure()) {
                return Err(why);
            }
            let (q, name) = (qemu.clone(), vm.to_string());
            let status = tokio::task::spawn_blocking(move || q.status(&name)).await;
            if let Ok(Ok(Status::Stopped)) = status {
                // The status may have come just before the power-off.
                if let Some(st) = job.status() {
                    return Ok(st);
                }
                let console = std::fs::read_to_string(qemu.console_log(vm).unwrap_or_default())
                    .unwrap_or_default();
                let tail: Vec<&str> = console.lines().rev().take(5).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                return Err(format!(
                    "{STOPPED_WITHOUT_STATUS}; its console ended with: {}",
                    tail.join(" | ")
                ));
            }
            tokio::select! {
                _ = changed.changed() => {}
                _ = tokio::time::sleep_until(deadline) => return Err(timeout_reason()),
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            }
        }
    }
}

/// The instance's disks as the VM gets them, in order.
fn vm_disks(inst: &Instance) -> Vec<cradle_hypervisor::Disk> {
    vm_disks_with(inst, false)
}

fn vm_disks_with(inst: &Instance, read_only: bool) -> Vec<cradle_hypervisor::Disk> {
    inst.disks
        .iter()
        .map(|d| cradle_hypervisor::Disk {
            path: PathBuf::from(&d.path),
            format: d.format,
            read_only,
        })
        .collect()
}

pub(crate) fn exit_code(s: &std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    s.code()
        .or_else(|| s.signal().map(|n| 128 + n))
        .unwrap_or(1)
}

/// What [`Installer::prepare`] worked out.
enum Work {
    Install(Box<Plan>),
    SelfInstall(SelfPlan),
}

impl Work {
    fn mode(&self) -> &'static str {
        match self {
            Work::Install(_) => "install",
            Work::SelfInstall(_) => "self_install",
        }
    }
}

/// A `self_install`.
struct SelfPlan {
    guest: Ipv4Addr,
    /// The image file written onto disk 0 first.
    source: Option<PathBuf>,
}

pub(crate) fn fetch_package(inst: &Instance, url: &str) -> Result<Package, StartError> {
    let credentials = cradle_personalize::Credentials::of(&inst.os_params);
    let limits = cradle_personalize::Limits::default();
    let fetched = cradle_personalize::fetch(
        url,
        &credentials,
        limits.max_compressed,
        inst.personalization_sha256.as_deref(),
    )
    .map_err(|e| StartError::Invalid(format!("the personalization package: {e}")))?;
    // Checked now, so a bad package fails the install before a VM boots.
    cradle_personalize::verify(fetched.path(), &limits)
        .map_err(|e| StartError::Invalid(format!("the personalization package: {e}")))?;
    let sha256 = fetched.sha256.clone();
    // Read once into the one buffer every request is served from.
    let mut bytes = Vec::with_capacity(usize::try_from(fetched.bytes).unwrap_or(0));
    fetched
        .into_file()
        .and_then(|mut f| std::io::Read::read_to_end(&mut f, &mut bytes))
        .map_err(|e| StartError::Unavailable(format!("the personalization package: {e}")))?;
    Ok(Package {
        bytes: bytes.into(),
        sha256,
    })
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, String> + Send + 'static,
) -> Result<T, String> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| Err(format!("internal task failed: {e}")))
}
