//! The QEMU driver against real QEMU, booting Debian's kernel (installed
//! by `cargo xtask ci` as linux-image-amd64) with no root filesystem: it
//! prints its banner on the serial console and stops at the panic, which
//! is all these tests need from a guest.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use cradle_hypervisor::{
    Accel, Disk, DiskFormat, Error, Hypervisor, KernelBoot, Qemu, Status, VmSpec, probe,
};

const QEMU: &str = "/usr/bin/qemu-system-x86_64";

/// Debian's kernel from /boot (the newest).
fn kernel() -> PathBuf {
    let mut found: Vec<PathBuf> = std::fs::read_dir("/boot")
        .expect("/boot")
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
        })
        .collect();
    found.sort();
    found
        .pop()
        .expect("a Debian kernel in /boot: cargo xtask ci installs linux-image-amd64")
}

/// Kills the VM whatever happens to the test.
struct Guard<'a>(&'a Qemu, &'a str);

impl Drop for Guard<'_> {
    fn drop(&mut self) {
        let _ = self.0.kill(self.1);
    }
}

fn spec(name: &str, disks: Vec<Disk>, cmdline: &str) -> VmSpec {
    VmSpec {
        name: name.into(),
        memory_mib: 256,
        vcpus: 2,
        disks,
        kernel: Some(KernelBoot {
            kernel: kernel(),
            initrd: None,
            cmdline: cmdline.into(),
        }),
        nics: Vec::new(),
        cdrom: None,
        boot_cdrom: false,
        no_reboot: true,
    }
}

fn wait_for_console(log: &Path, needle: &str, within: Duration) -> String {
    let until = Instant::now() + within;
    loop {
        let text = String::from_utf8_lossy(&std::fs::read(log).unwrap_or_default()).into_owned();
        if text.contains(needle) || Instant::now() > until {
            return text;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn start_status_console_and_stop_with_raw_and_qcow2_disks() {
    let work = tempfile::tempdir().unwrap();
    let raw = work.path().join("disk, one.img");
    std::fs::File::create(&raw)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    let qcow2 = work.path().join("data.qcow2");
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&qcow2)
        .arg("16M"));
    let q = Qemu::new(QEMU, work.path().join("run"), Accel::Tcg);
    let name = "web1, the first";
    let _guard = Guard(&q, name);
    let vm = spec(
        name,
        vec![
            Disk {
                path: raw.clone(),
                format: DiskFormat::Raw,
                read_only: false,
            },
            Disk {
                path: qcow2.clone(),
                format: DiskFormat::Qcow2,
                read_only: true,
            },
        ],
        // Stay up after the panic (no root filesystem), so it can be stopped.
        "console=ttyS0 panic=0",
    );
    assert_eq!(q.status(name).unwrap(), Status::Stopped);
    q.start(&vm).unwrap();
    assert_eq!(q.status(name).unwrap(), Status::Running);
    let e = q.start(&vm).unwrap_err();
    assert!(e.to_string().contains("already running"), "{e}");

    // The guest's own view of its hardware, through QMP.
    let mut qmp = q.qmp(name).unwrap();
    let blocks = qmp.execute("query-block", None).unwrap();
    let drives: Vec<(String, String, bool)> = blocks
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|b| {
            let i = b.get("inserted")?;
            Some((
                i["file"].as_str()?.to_string(),
                i["drv"].as_str()?.to_string(),
                i["ro"].as_bool()?,
            ))
        })
        .collect();
    assert_eq!(
        drives,
        [
            (raw.display().to_string(), "raw".into(), false),
            (qcow2.display().to_string(), "qcow2".into(), true)
        ]
    );
    let cpus = qmp.execute("query-cpus-fast", None).unwrap();
    assert_eq!(cpus.as_array().unwrap().len(), 2);
    let mem = qmp.execute("query-memory-size-summary", None).unwrap();
    assert_eq!(mem["base-memory"], 256u64 << 20);
    // QEMU serves one QMP client at a time.
    drop(qmp);

    let log = q.console_log(name).unwrap();
    let text = wait_for_console(&log, "Linux version", Duration::from_secs(120));
    assert!(text.contains("Linux version"), "console: {text}");

    // The guest cannot power off (it panicked): stop falls back to quit.
    let started = Instant::now();
    q.stop(name, Duration::from_secs(1)).unwrap();
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(q.status(name).unwrap(), Status::Stopped);
    // Stopping a stopped VM is no error.
    q.stop(name, Duration::from_secs(1)).unwrap();

    // Started again, then killed.
    q.start(&vm).unwrap();
    assert_eq!(q.status(name).unwrap(), Status::Running);
    q.kill(name).unwrap();
    assert_eq!(q.status(name).unwrap(), Status::Stopped);
}

#[test]
fn bad_input_is_refused_with_qemus_reason() {
    let work = tempfile::tempdir().unwrap();
    let q = Qemu::new(QEMU, work.path().join("run"), Accel::Tcg);
    let missing = spec(
        "missing-disk",
        vec![Disk {
            path: work.path().join("nope.img"),
            format: DiskFormat::Raw,
            read_only: false,
        }],
        "console=ttyS0",
    );
    let e = q.start(&missing).unwrap_err();
    assert!(e.to_string().contains("nope.img"), "{e}");
    assert_eq!(q.status("missing-disk").unwrap(), Status::Stopped);
    let e = q.status("../escape").unwrap_err();
    assert!(e.to_string().contains("cannot be used"), "{e}");
}

/// Processes whose command line mentions `dir`.
fn processes_under(dir: &Path) -> Vec<String> {
    let dir = dir.display().to_string();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().parse::<u32>().is_ok())
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .filter(|c| c.contains(&dir))
        .collect()
}

#[test]
fn qemu_dying_at_start_is_named_with_its_status_and_leaves_nothing() {
    let work = tempfile::tempdir().unwrap();
    let run = work.path().join("run");

    // A real QEMU, told to boot a kernel that is not there.
    let q = Qemu::new(QEMU, &run, Accel::Tcg);
    let mut vm = spec("no-kernel", Vec::new(), "console=ttyS0");
    vm.kernel.as_mut().unwrap().kernel = work.path().join("no-such-vmlinuz");
    let e = q.start(&vm).unwrap_err();
    let Error::Start {
        name,
        status,
        stderr,
    } = &e
    else {
        panic!("not Error::Start: {e:?}");
    };
    assert_eq!(name, "no-kernel");
    assert_eq!(status, "exit status: 1");
    assert!(stderr.contains("no-such-vmlinuz"), "{e}");
    assert_eq!(
        e.to_string(),
        format!("QEMU exited at the start of VM \"no-kernel\" (exit status: 1): {stderr}")
    );
    assert!(!run.join("no-kernel").exists(), "the run dir is left");
    assert_eq!(q.status("no-kernel").unwrap(), Status::Stopped);

    // The configured QEMU is a program that exits at once, saying nothing.
    let q = Qemu::new("/bin/false", &run, Accel::Tcg);
    let e = q.start(&spec("false", Vec::new(), "")).unwrap_err();
    assert!(matches!(e, Error::Start { .. }), "{e:?}");
    assert_eq!(
        e.to_string(),
        "QEMU exited at the start of VM \"false\" (exit status: 1) and printed nothing on stderr"
    );
    assert!(!run.join("false").exists(), "the run dir is left");
    assert_eq!(std::fs::read_dir(&run).unwrap().count(), 0);
    assert!(processes_under(work.path()).is_empty());
}

#[test]
fn the_probe_picks_an_accelerator_that_boots_the_kernel() {
    let p = probe(Path::new(QEMU), &kernel(), Duration::from_secs(10));
    eprintln!("probe: {:?}", p);
    assert_eq!(p.reason.is_none(), p.accel == Accel::Kvm, "{p:?}");
    // Whatever it chose boots the kernel.
    let work = tempfile::tempdir().unwrap();
    let q = Qemu::new(QEMU, work.path().join("run"), p.accel);
    let _guard = Guard(&q, "probed");
    q.start(&spec("probed", vec![], "console=ttyS0 panic=0"))
        .unwrap();
    let text = wait_for_console(
        &q.console_log("probed").unwrap(),
        "Linux version",
        Duration::from_secs(120),
    );
    assert!(text.contains("Linux version"), "{:?}: {text}", p.accel);
}
