//! `cargo xtask guest-image`: a real Debian root tree for the guest-agent
//! tests and `bench agent`: bookworm from Debian's mirror (mmdebstrap),
//! systemd as init, Debian's kernel and its initramfs, and no
//! openssh-server, so nothing in it but the agent could talk to the host.
//! The boot test bakes an ext4 image of it and boots it with the kernel
//! and initrd beside it (`vmlinuz`, `initrd.img`).
//!
//! Built once into the CI cache (`~/.cache/cradle-ci/guest-rootfs-<V>`,
//! `…-cloud-init-<V>` with Debian's cloud-init added for the benchmark's
//! side by side), through a temporary directory renamed into place when
//! whole. The tree is changed after mmdebstrap from here, with argument
//! vectors (files written, `chroot TREE useradd …`).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

/// Bumped when what is built changes, so a stale cache is rebuilt.
const VERSION: u32 = 2;
/// The same for the cloud-init twin.
const CLOUD_INIT_VERSION: u32 = 4;
/// The mirror the tree comes from (the machines reach Debian's packages).
const MIRROR: &str = "http://deb.debian.org/debian";
const SECURITY: &str = "http://deb.debian.org/debian-security";

/// The packages on top of mmdebstrap's `apt` variant (Essential and apt;
/// no Recommends, so no openssh, dbus or firmware).
const PACKAGES: &[&str] = &[
    "systemd",
    "systemd-sysv",
    "udev",
    "kmod",
    "linux-image-amd64",
    "initramfs-tools",
    // fsck and the remount of an ext4 root.
    "e2fsprogs",
];

/// Where the tree for `flavour` lives (`None`: the agent's; `Some("cloud-init")`).
pub fn dir(cloud_init: bool) -> Result<PathBuf> {
    let name = match cloud_init {
        false => format!("guest-rootfs-{VERSION}"),
        true => format!("guest-rootfs-cloud-init-{CLOUD_INIT_VERSION}"),
    };
    Ok(crate::ci_cache_dir()?.join(name))
}

/// The tree (`DIR/tree`, with `DIR/vmlinuz` and `DIR/initrd.img`), built
/// if it is not there.
pub fn ensure(cloud_init: bool) -> Result<PathBuf> {
    let dir = dir(cloud_init)?;
    println!(
        "==> the Debian guest tree{} for the agent's boot test",
        if cloud_init { " with cloud-init" } else { "" }
    );
    if dir.join("tree/etc/os-release").exists() && dir.join("initrd.img").is_file() {
        println!("    cached: {}", dir.display());
        return Ok(dir);
    }
    if !crate::debian::is_root()? {
        bail!("building the guest tree needs root (mmdebstrap --mode=root, chroot)");
    }
    crate::debian::ensure(
        &["mmdebstrap"],
        "the guest-agent tests build a Debian root tree",
    )?;
    let parent = dir.parent().context("cache root has no parent")?;
    std::fs::create_dir_all(parent)?;
    let partial = tempfile::Builder::new()
        .prefix(".guest-rootfs-partial-")
        .tempdir_in(parent)?;
    let tree = partial.path().join("tree");
    let mut include: Vec<&str> = PACKAGES.to_vec();
    if cloud_init {
        include.push("cloud-init");
    }
    println!(
        "    mmdebstrap bookworm ({}) into {}",
        include.join(","),
        tree.display()
    );
    let t0 = std::time::Instant::now();
    let mut cmd = Command::new("mmdebstrap");
    cmd.args([
        "--mode=root",
        "--variant=apt",
        "--format=directory",
        "--quiet",
    ])
    .arg(format!("--include={}", include.join(",")));
    for o in [
        "path-exclude=/usr/share/man/*",
        "path-exclude=/usr/share/info/*",
        "path-exclude=/usr/share/doc/*",
        "path-include=/usr/share/doc/*/copyright",
        "path-exclude=/usr/share/locale/*",
    ] {
        cmd.arg(format!("--dpkgopt={o}"));
    }
    cmd.arg("bookworm")
        .arg(&tree)
        .arg(format!("deb {MIRROR} bookworm main"))
        .arg(format!("deb {MIRROR} bookworm-updates main"))
        .arg(format!("deb {SECURITY} bookworm-security main"));
    let status = cmd.status().context("cannot run mmdebstrap")?;
    if !status.success() {
        bail!("mmdebstrap failed ({status})");
    }
    customize(&tree, cloud_init)?;
    for (glob, name) in [("vmlinuz-", "vmlinuz"), ("initrd.img-", "initrd.img")] {
        let found = std::fs::read_dir(tree.join("boot"))?
            .flatten()
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with(glob))
            })
            .with_context(|| format!("no /boot/{glob}* in the tree"))?;
        std::fs::copy(&found, partial.path().join(name))?;
    }
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::rename(partial.keep(), &dir)?;
    println!(
        "    built in {:.0} s: {}",
        t0.elapsed().as_secs_f64(),
        dir.display()
    );
    Ok(dir)
}

/// What mmdebstrap leaves as it is and a guest needs: its root in fstab, a
/// hostname the agent will change, a user for the instance's keys,
/// multi-user.target as the default.
fn customize(tree: &Path, cloud_init: bool) -> Result<()> {
    let write = |p: &str, text: &str| -> Result<()> {
        std::fs::write(tree.join(p), text).with_context(|| format!("cannot write /{p}"))
    };
    write("etc/hostname", "baked-image\n")?;
    // A small initramfs, as cloud images have: the virtio and ext4 modules
    // only (the kernel package's default takes most modules, 36 MB, which
    // costs seconds to unpack at every boot under TCG).
    write(
        "etc/initramfs-tools/conf.d/cradle.conf",
        "MODULES=list\nCOMPRESS=gzip\n",
    )?;
    write(
        "etc/initramfs-tools/modules",
        "virtio_pci\nvirtio_blk\nvirtio_net\next4\ncrc32c_generic\n",
    )?;
    chroot(tree, &["update-initramfs", "-u", "-k", "all"])?;
    write("etc/hosts", "127.0.0.1 localhost\n")?;
    write("etc/fstab", "/dev/vda / ext4 rw,errors=remount-ro 0 1\n")?;
    chroot(
        tree,
        &["useradd", "--create-home", "--shell", "/bin/sh", "debian"],
    )?;
    chroot(tree, &["systemctl", "set-default", "multi-user.target"])?;
    if cloud_init {
        // The benchmark gives cloud-init cradle's config drive, and tells on
        // the console when it is done.
        // Without a locale the tree lacks, cloud-init's locale module
        // fails and `status --wait` ends early with `status: error`.
        write(
            "etc/cloud/cloud.cfg.d/90-cradle.cfg",
            "datasource_list: [ ConfigDrive, None ]\nlocale: C.UTF-8\n",
        )?;
        // The benchmark waits for `CLOUD-INIT-DONE status: done`. Wanted by
        // cloud-init.target, not multi-user.target: cloud-final runs after
        // multi-user.target, so that would be an ordering cycle (and
        // systemd would drop this unit).
        write(
            "etc/systemd/system/cloud-init-done.service",
            "[Unit]\nDescription=Say on the console when cloud-init is done\n\
             After=cloud-final.service\n\n[Service]\nType=oneshot\n\
             ExecStart=/bin/sh -c 'echo \"CLOUD-INIT-DONE $$(cloud-init status --wait | tail -n 1)\" > /dev/ttyS0'\n\n\
             [Install]\nWantedBy=cloud-init.target\n",
        )?;
        chroot(tree, &["systemctl", "enable", "cloud-init-done.service"])?;
    }
    Ok(())
}

fn chroot(tree: &Path, argv: &[&str]) -> Result<()> {
    let status = Command::new("chroot")
        .arg(tree)
        .args(argv)
        .status()
        .context("cannot run chroot")?;
    if !status.success() {
        bail!(
            "chroot {} {} failed ({status})",
            tree.display(),
            argv.join(" ")
        );
    }
    Ok(())
}
