//! The QEMU driver: `qemu-system-x86_64`, daemonized, one run directory per
//! VM, controlled over QMP. No shell: QEMU gets an argument vector, and
//! every value inside a `key=value,…` option has its commas doubled, as
//! QEMU's option syntax wants.

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::qmp::Qmp;
use crate::{Accel, Error, Hypervisor, KernelBoot, Status, VmSpec};

/// How long a QMP exchange may take.
const QMP_TIMEOUT: Duration = Duration::from_secs(10);

/// The QEMU driver.
#[derive(Clone, Debug)]
pub struct Qemu {
    pub binary: PathBuf,
    pub run_dir: PathBuf,
    pub accel: Accel,
}

/// A value inside a QEMU `key=value,…` option: commas doubled.
fn opt(v: &str) -> String {
    v.replace(',', ",,")
}

fn path_opt(p: &Path) -> String {
    opt(&p.display().to_string())
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let what = what.into();
    move |source| Error::Io { what, source }
}

impl Qemu {
    pub fn new(binary: impl Into<PathBuf>, run_dir: impl Into<PathBuf>, accel: Accel) -> Qemu {
        Qemu {
            binary: binary.into(),
            run_dir: run_dir.into(),
            accel,
        }
    }

    fn dir(&self, name: &str) -> Result<PathBuf, Error> {
        let ok = (1..=64).contains(&name.chars().count())
            && !name.contains('/')
            && name != "."
            && name != ".."
            && !name.chars().any(char::is_control);
        if !ok {
            return Err(Error::BadName(name.to_string()));
        }
        Ok(self.run_dir.join(name))
    }

    /// The QEMU arguments for `vm` (without the daemonizing ones).
    pub fn args(&self, vm: &VmSpec, dir: &Path) -> Vec<String> {
        let mut a: Vec<String> = vec![
            "-name".into(),
            format!("guest={},debug-threads=on", opt(&vm.name)),
            "-machine".into(),
            format!("q35,accel={}", self.accel.as_str()),
            "-cpu".into(),
            match self.accel {
                Accel::Kvm => "host",
                Accel::Tcg => "max",
            }
            .into(),
            "-m".into(),
            format!("{}M", vm.memory_mib),
            "-smp".into(),
            vm.vcpus.to_string(),
            "-nodefaults".into(),
            "-no-user-config".into(),
            "-display".into(),
            "none".into(),
            // -chardev takes key=value options, where a doubled comma is a
            // comma; -serial file: and -qmp unix: would take none in a path.
            "-chardev".into(),
            format!(
                "file,id=console,path={}",
                path_opt(&dir.join("console.log"))
            ),
            "-serial".into(),
            "chardev:console".into(),
            "-chardev".into(),
            format!(
                "socket,id=qmp,path={},server=on,wait=off",
                path_opt(&dir.join("qmp.sock"))
            ),
            "-mon".into(),
            "chardev=qmp,mode=control".into(),
        ];
        for (i, d) in vm.disks.iter().enumerate() {
            a.push("-drive".into());
            a.push(format!(
                "file={},format={},if=virtio,id=disk{i},readonly={}",
                path_opt(&d.path),
                d.format.as_str(),
                if d.read_only { "on" } else { "off" }
            ));
        }
        if let Some(iso) = &vm.cdrom {
            a.push("-drive".into());
            a.push(format!(
                "file={},format=raw,if=none,id=cd0,media=cdrom,readonly=on",
                path_opt(iso)
            ));
            a.push("-device".into());
            a.push(if vm.boot_cdrom {
                "ide-cd,drive=cd0,bootindex=0".into()
            } else {
                "ide-cd,drive=cd0".into()
            });
        }
        for (i, n) in vm.nics.iter().enumerate() {
            a.push("-netdev".into());
            a.push(format!(
                "tap,id=net{i},ifname={},script=no,downscript=no",
                opt(&n.tap)
            ));
            a.push("-device".into());
            a.push(format!("virtio-net-pci,netdev=net{i},mac={}", opt(&n.mac)));
        }
        if let Some(k) = &vm.kernel {
            a.push("-kernel".into());
            a.push(k.kernel.display().to_string());
            if let Some(i) = &k.initrd {
                a.push("-initrd".into());
                a.push(i.display().to_string());
            }
            a.push("-append".into());
            a.push(k.cmdline.clone());
        }
        if vm.no_reboot {
            a.push("-no-reboot".into());
        }
        a
    }

    /// QEMU's pid, when it is running: the pid file names a live process
    /// whose command line holds this VM's QMP socket (so a reused pid, or a
    /// zombie nobody reaped, is not taken for it).
    fn pid(&self, dir: &Path) -> Option<i32> {
        let pid: i32 = std::fs::read_to_string(dir.join("pid"))
            .ok()?
            .trim()
            .parse()
            .ok()?;
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        // As it appears in QEMU's arguments: commas doubled.
        let sock = path_opt(&dir.join("qmp.sock"));
        String::from_utf8_lossy(&cmdline)
            .contains(&sock)
            .then_some(pid)
    }

    fn wait_gone(&self, dir: &Path, within: Duration) -> bool {
        let until = Instant::now() + within;
        while Instant::now() < until {
            if self.pid(dir).is_none() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.pid(dir).is_none()
    }

    /// A QMP session with a running VM. QEMU serves one client at a time:
    /// hold it only for the exchange.
    pub fn qmp(&self, name: &str) -> Result<Qmp, Error> {
        let dir = self.dir(name)?;
        Qmp::connect(&dir.join("qmp.sock"), QMP_TIMEOUT)
    }
}

impl Hypervisor for Qemu {
    fn start(&self, vm: &VmSpec) -> Result<(), Error> {
        let dir = self.dir(&vm.name)?;
        if self.pid(&dir).is_some() {
            return Err(Error::AlreadyRunning(vm.name.clone()));
        }
        let made = !dir.exists();
        std::fs::create_dir_all(&dir).map_err(io(format!("cannot create {}", dir.display())))?;
        for stale in ["qmp.sock", "pid"] {
            let _ = std::fs::remove_file(dir.join(stale));
        }
        // A new boot, a new log.
        std::fs::write(dir.join("console.log"), b"")
            .map_err(io(format!("cannot write {}", dir.display())))?;
        let out = Command::new(&self.binary)
            .args(self.args(vm, &dir))
            .arg("-pidfile")
            .arg(dir.join("pid"))
            .arg("-daemonize")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output();
        // With -daemonize, QEMU's first process exits only once the VM is
        // set up (0) or has failed (non-zero): a failure here is QEMU dying
        // at start, and nothing of the VM runs. A run directory made for
        // this start goes with it, so a failed start leaves nothing behind.
        let failed = |e: Error| {
            if made {
                let _ = std::fs::remove_dir_all(&dir);
            }
            Err(e)
        };
        let out = match out {
            Ok(out) => out,
            Err(e) => return failed(io(format!("cannot run {}", self.binary.display()))(e)),
        };
        if !out.status.success() {
            return failed(Error::Start {
                name: vm.name.clone(),
                status: out.status.to_string(),
                stderr: tail(&out.stderr),
            });
        }
        Ok(())
    }

    fn stop(&self, name: &str, grace: Duration) -> Result<(), Error> {
        let dir = self.dir(name)?;
        if self.pid(&dir).is_none() {
            return Ok(());
        }
        if let Ok(mut q) = self.qmp(name) {
            let _ = q.execute("system_powerdown", None);
            if self.wait_gone(&dir, grace) {
                return Ok(());
            }
            let _ = q.execute("quit", None);
            if self.wait_gone(&dir, Duration::from_secs(5)) {
                return Ok(());
            }
        }
        self.kill(name)
    }

    fn kill(&self, name: &str) -> Result<(), Error> {
        let dir = self.dir(name)?;
        if let Some(pid) = self.pid(&dir) {
            // SAFETY: kill(2) on a pid just checked to be this VM's QEMU.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            if !self.wait_gone(&dir, Duration::from_secs(10)) {
                return Err(Error::Qmp(format!("QEMU (pid {pid}) survived SIGKILL")));
            }
        }
        Ok(())
    }

    fn status(&self, name: &str) -> Result<Status, Error> {
        let dir = self.dir(name)?;
        if self.pid(&dir).is_none() {
            return Ok(Status::Stopped);
        }
        let r = self.qmp(name)?.execute("query-status", None)?;
        Ok(match r.get("status").and_then(|s| s.as_str()) {
            Some("running") => Status::Running,
            Some("paused") => Status::Paused,
            Some(other) => Status::Other(other.to_string()),
            None => Status::Other(r.to_string()),
        })
    }

    fn console_log(&self, name: &str) -> Result<PathBuf, Error> {
        Ok(self.dir(name)?.join("console.log"))
    }
}

/// What [`probe`] found.
#[derive(Clone, Debug)]
pub struct Probe {
    pub accel: Accel,
    /// Why KVM is not used, when it is not.
    pub reason: Option<String>,
}

/// Whether KVM really runs `kernel`: `/dev/kvm` opens read-write, and a VM
/// under it prints the kernel's banner on its console within `within`.
/// Otherwise TCG, with the reason.
pub fn probe(binary: &Path, kernel: &Path, within: Duration) -> Probe {
    let tcg = |reason: String| Probe {
        accel: Accel::Tcg,
        reason: Some(reason),
    };
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        return tcg(format!("/dev/kvm: {e}"));
    }
    let Ok(dir) = tempfile::Builder::new()
        .prefix("cradle-kvm-probe-")
        .tempdir()
    else {
        return tcg("cannot make a temporary directory for the probe".into());
    };
    // The same command line a VM gets, under KVM, in the foreground.
    let vm = VmSpec {
        name: "kvm-probe".into(),
        memory_mib: 256,
        vcpus: 1,
        disks: Vec::new(),
        kernel: Some(KernelBoot {
            kernel: kernel.to_path_buf(),
            initrd: None,
            cmdline: "console=ttyS0 panic=-1 loglevel=4".into(),
        }),
        nics: Vec::new(),
        cdrom: None,
        boot_cdrom: false,
        no_reboot: true,
    };
    let console = dir.path().join("console.log");
    let child = Command::new(binary)
        .args(Qemu::new(binary, dir.path(), Accel::Kvm).args(&vm, dir.path()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => return tcg(format!("cannot run {}: {e}", binary.display())),
    };
    let until = Instant::now() + within;
    let booted = loop {
        let text = std::fs::read(&console).unwrap_or_default();
        if String::from_utf8_lossy(&text).contains("Linux version") {
            break true;
        }
        if let Ok(Some(_)) = child.try_wait() {
            break false;
        }
        if Instant::now() >= until {
            break false;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    // SAFETY: the probe's own process group, its leader not yet reaped.
    unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
    let _ = child.wait();
    if booted {
        return Probe {
            accel: Accel::Kvm,
            reason: None,
        };
    }
    let mut err = String::new();
    if let Some(mut s) = child.stderr.take() {
        let _ = s.read_to_string(&mut err);
    }
    let err = err.trim();
    tcg(if err.is_empty() {
        format!(
            "/dev/kvm opens, but a kernel under it printed nothing within {} s",
            within.as_secs()
        )
    } else {
        format!("QEMU with KVM failed: {err}")
    })
}

/// The end of what QEMU printed: its last 8 lines, at most 2 KiB, trimmed
/// (the reason comes last; a long stderr is mostly warnings before it).
fn tail(stderr: &[u8]) -> String {
    let text = String::from_utf8_lossy(stderr);
    let lines: Vec<&str> = text.trim().lines().collect();
    let mut s = lines[lines.len().saturating_sub(8)..].join("\n");
    if s.len() > 2048 {
        let mut cut = s.len() - 2048;
        while !s.is_char_boundary(cut) {
            cut += 1;
        }
        s = format!("[...] {}", &s[cut..]);
    }
    s
}
