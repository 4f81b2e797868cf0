//! Running guests: the [`Hypervisor`] trait and its QEMU driver.
//!
//! A VM is named (its instance's name) and lives in a run directory of its
//! own, `RUN_DIR/NAME/`: QEMU's QMP socket, its pid file and the console
//! log (the guest's serial port). QEMU is started daemonized, so a guest
//! outlives a restart of cradle, and is controlled over QMP afterwards.
//!
//! KVM is used only when it really runs a guest: `/dev/kvm` can open and
//! still fail to boot a kernel (nested or paravirtual KVM), so [`probe`]
//! boots the kernel it is given and falls back to TCG when nothing comes
//! out on the console in time.

pub mod qemu;
pub mod qmp;

use std::path::PathBuf;
use std::time::Duration;

pub use qemu::{Probe, Qemu, probe};

/// How QEMU executes guest code.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    pub fn as_str(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

/// A disk image's format: the model's, so an instance's disks need no
/// translation on their way to QEMU.
pub use cradle_model::machine::DiskFormat;

/// One disk, attached as a virtio block device in order (`vda`, `vdb`, …).
#[derive(Clone, Debug)]
pub struct Disk {
    pub path: PathBuf,
    pub format: DiskFormat,
    pub read_only: bool,
}

/// A kernel booted directly, without a bootloader.
#[derive(Clone, Debug)]
pub struct KernelBoot {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
}

/// What to start.
#[derive(Clone, Debug)]
pub struct VmSpec {
    /// The instance's name: the run directory and QEMU's `-name`.
    pub name: String,
    pub memory_mib: u32,
    pub vcpus: u32,
    pub disks: Vec<Disk>,
    pub kernel: Option<KernelBoot>,
    /// Network interfaces, in order: each a tap on the host (made before
    /// the VM starts; QEMU only opens it).
    pub nics: Vec<Nic>,
    /// An installation CD-ROM image, attached read-only.
    pub cdrom: Option<PathBuf>,
    /// Boot from the CD-ROM first.
    pub boot_cdrom: bool,
    /// Exit instead of rebooting (the install appliance powers off once).
    pub no_reboot: bool,
}

/// A virtio NIC backed by a host tap.
#[derive(Clone, Debug)]
pub struct Nic {
    pub tap: String,
    /// Lower-case, colon-separated.
    pub mac: String,
}

/// What a VM is doing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Status {
    /// No QEMU process.
    Stopped,
    Running,
    Paused,
    /// Another QMP run state (`shutdown`, `internal-error`, `guest-panicked`, …).
    Other(String),
}

/// Start, stop and watch VMs.
pub trait Hypervisor {
    /// Start `vm`; refused while a VM of that name runs.
    fn start(&self, vm: &VmSpec) -> Result<(), Error>;
    /// Ask the guest to power off (ACPI), wait up to `grace`, then stop it.
    fn stop(&self, name: &str, grace: Duration) -> Result<(), Error>;
    /// Stop at once (SIGKILL).
    fn kill(&self, name: &str) -> Result<(), Error>;
    fn status(&self, name: &str) -> Result<Status, Error>;
    /// The console log: what the guest wrote to its serial port.
    fn console_log(&self, name: &str) -> Result<PathBuf, Error>;
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("VM {0:?} is already running")]
    AlreadyRunning(String),
    #[error("VM name {0:?} cannot be used (1-64 characters, no '/', NUL or control characters)")]
    BadName(String),
    /// QEMU exited before the VM was up (a bad option, a missing file, a
    /// broken binary). `stderr` is the tail of what it printed (its last
    /// lines, at most 2 KiB); the VM's run directory is removed.
    #[error("QEMU exited at the start of VM {name:?} ({status}){}", said(.stderr))]
    Start {
        name: String,
        status: String,
        stderr: String,
    },
    #[error("QMP: {0}")]
    Qmp(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

/// What QEMU printed, for [`Error::Start`]: said to be nothing when it
/// was, rather than a message ending on a bare colon.
fn said(stderr: &str) -> String {
    if stderr.is_empty() {
        " and printed nothing on stderr".into()
    } else {
        format!(": {stderr}")
    }
}
