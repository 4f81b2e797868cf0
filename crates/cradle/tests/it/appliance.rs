//! `cradle appliance build` from Debian's kernel and busybox-static
//! packages (fetched with `apt-get download`, unpacked, never installed),
//! booted under QEMU (TCG) with a disk and no `cradle.address` on the
//! kernel command line: the static agent comes up as /init, loads the
//! virtio, ext4 and vfat modules, finds the disk, says there is nothing to
//! install and powers off.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use cradle_hypervisor::{Accel, Disk, DiskFormat, Hypervisor, KernelBoot, Qemu, Status, VmSpec};

use crate::harness::{BIN, Run, command_of, cradle_command};

/// A file of target/release, which `cargo xtask ci` builds: `cradle` by
/// the README's first command, `cradle-agent` by `cargo xtask agent`.
fn release(name: &str) -> PathBuf {
    let target = PathBuf::from(BIN)
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .to_path_buf();
    let file = target.join("release").join(name);
    assert!(
        file.exists(),
        "{} is missing: `cargo xtask ci` builds it (`cargo run --release` and `cargo xtask agent`)",
        file.display()
    );
    file
}

/// The static agent `cargo xtask agent` builds into target/release.
pub fn agent() -> PathBuf {
    release("cradle-agent")
}

#[test]
fn the_appliance_boots_its_agent_which_finds_the_disk_and_powers_off() {
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("appliance");
    // As a newcomer makes it after the README's commands: the release
    // binary, with the agent `cargo xtask agent` put beside it (no --agent).
    let agent = agent();
    let built = Run::of(
        command_of(&release("cradle"))
            .args(["appliance", "build", "-o"])
            .arg(&out),
    )
    .success();
    let used = built
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("agent   "))
        .unwrap_or_else(|| panic!("no agent line: {}", built.stdout));
    assert_eq!(
        std::fs::canonicalize(used).unwrap(),
        std::fs::canonicalize(&agent).unwrap(),
        "the agent beside the release binary"
    );
    assert!(built.stdout.contains("virtio_blk"), "{}", built.stdout);
    assert!(built.stdout.contains("ext4"), "{}", built.stdout);
    assert!(built.stdout.contains("vfat"), "{}", built.stdout);
    assert!(built.stdout.contains("applets in /bin"), "{}", built.stdout);

    // A dynamic agent would find no C library in the appliance: refused
    // before anything is downloaded or unpacked.
    Run::of(
        cradle_command()
            .args([
                "appliance",
                "build",
                "--agent",
                BIN,
                "--kernel-deb",
                "/nonexistent.deb",
                "--busybox-deb",
                "/nonexistent.deb",
                "-o",
            ])
            .arg(work.path().join("never")),
    )
    .fails_with(&["dynamically linked", "cargo xtask agent"]);
    assert!(!work.path().join("never").exists());

    let disk = work.path().join("disk.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    let q = Qemu::new(
        "/usr/bin/qemu-system-x86_64",
        work.path().join("run"),
        Accel::Tcg,
    );
    let vm = VmSpec {
        name: "appliance-test".into(),
        memory_mib: 256,
        vcpus: 1,
        disks: vec![Disk {
            path: disk,
            format: DiskFormat::Raw,
            read_only: false,
        }],
        kernel: Some(KernelBoot {
            kernel: out.join("vmlinuz"),
            initrd: Some(out.join("initrd.img")),
            cmdline: "console=ttyS0 quiet panic=-1".into(),
        }),
        nics: Vec::new(),
        cdrom: None,
        boot_cdrom: false,
        no_reboot: true,
    };
    q.start(&vm).unwrap();
    let until = Instant::now() + Duration::from_secs(180);
    while q.status("appliance-test").unwrap() != Status::Stopped {
        if Instant::now() > until {
            let _ = q.kill("appliance-test");
            panic!("the appliance did not power off within 180 s");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let console =
        String::from_utf8_lossy(&std::fs::read(q.console_log("appliance-test").unwrap()).unwrap())
            .into_owned();
    for want in [
        "cradle-agent: started",
        "virtio_pci",
        "virtio_blk",
        "ext4",
        "vfat",
        "cradle-agent: disks: vda",
        "cradle-agent: no cradle.address on the kernel command line: nothing to install",
        "cradle-agent: powering off",
        "reboot: Power down",
    ] {
        assert!(
            console.contains(want),
            "{want:?} not on the console:\n{console}"
        );
    }
    assert!(!console.contains("cannot"), "{console}");
}
