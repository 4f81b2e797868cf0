//! The install appliance: Debian's kernel, taken from its package (unpacked
//! with `dpkg-deb -x`, never installed on the host), and an initramfs whose
//! `/init` is the static `cradle-agent`, with the kernel modules the agent
//! needs and the order to load them in.
//!
//! The OS scripts the agent runs are usually `#!/bin/sh` scripts that
//! mount disks and copy files, so the initramfs also holds Debian's static
//! busybox (package `busybox-static`, unpacked the same way) as
//! `/bin/busybox`, with a symlink `/bin/<applet>` → `busybox` for every
//! applet it lists (`busybox --list`, run on the build host: the binary is
//! static amd64, like the appliance). Everything is in `/bin`; the host
//! hands the scripts their `PATH`.
//!
//! The layout: `/init` (the agent), `/bin` (busybox), `/lib/modules/*.ko`
//! and `/lib/modules/load.order`, `/dev/console`, and the empty mount
//! points `/dev`, `/proc`, `/sys`, `/tmp`, `/run` and `/mnt`.
//!
//! The initramfs is a gzip-compressed cpio archive in the `newc` format,
//! written here: the format is a 110-byte ASCII header per entry, and the
//! crates that write it do less than these few lines (no device nodes).
//! Module dependencies come from `depmod -b` run on the unpacked tree,
//! because `modules.dep` is made at install time and the package lacks it.

use std::collections::{BTreeMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The modules the agent loads, before their dependencies are added: the
/// PCI transport for virtio, its disks and network, ext4, and vfat.
///
/// `modules.dep` lists hard dependencies only; what a module asks the
/// kernel for at run time must be here too, because the kernel cannot
/// load it on demand (the appliance has no `/sbin/modprobe`): ext4 and
/// jbd2 need a `crc32c` crypto driver at mount time (their softdep;
/// `crc32c_generic`, which works on any CPU), and vfat the code page and
/// character set it mounts with by default (Debian's kernel has
/// `FAT_DEFAULT_CODEPAGE=437` and `FAT_DEFAULT_IOCHARSET="ascii"`).
/// Packet sockets (`af_packet`) are not needed: the agent sets its address
/// with ioctls, not DHCP.
pub const MODULES: &[&str] = &[
    "virtio_pci",
    "virtio_blk",
    "virtio_net",
    "crc32c_generic",
    "ext4",
    "vfat",
    "nls_cp437",
    "nls_ascii",
];

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Invalid(String),
    #[error("{tool} failed: {reason}")]
    Tool { tool: String, reason: String },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let what = what.into();
    move |source| Error::Io { what, source }
}

/// What was built.
#[derive(Debug, Clone)]
pub struct Built {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    /// The kernel release, e.g. `6.1.0-56-amd64`.
    pub release: String,
    /// Module names in the order the agent loads them.
    pub modules: Vec<String>,
    /// The busybox applets linked in `/bin`.
    pub applets: Vec<String>,
}

/// Run a tool with an argument vector; its stderr is the error.
fn tool(cmd: &mut Command) -> Result<std::process::Output, Error> {
    let name = cmd.get_program().to_string_lossy().into_owned();
    let out = cmd.output().map_err(io(format!("cannot run {name}")))?;
    if !out.status.success() {
        return Err(Error::Tool {
            tool: name,
            reason: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(out)
}

/// The kernel package `linux-image-amd64` points at
/// (`linux-image-6.1.0-56-amd64`), from `apt-cache depends`.
pub fn kernel_package() -> Result<String, Error> {
    let depends = tool(Command::new("apt-cache").args(["depends", "linux-image-amd64"]))?;
    let text = String::from_utf8_lossy(&depends.stdout);
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("Depends: "))
        .find(|p| p.starts_with("linux-image-"))
        .map(str::to_string)
        .ok_or_else(|| {
            Error::Invalid(format!(
                "linux-image-amd64 depends on no linux-image package: {text}"
            ))
        })
}

/// Download the kernel package `linux-image-amd64` points at into `dir`
/// with `apt-get download` (the package itself; nothing is installed).
pub fn download_kernel(dir: &Path) -> Result<PathBuf, Error> {
    apt_download(dir, &kernel_package()?)
}

/// Download the package `busybox-static` into `dir` with `apt-get
/// download` (nothing is installed).
pub fn download_busybox(dir: &Path) -> Result<PathBuf, Error> {
    apt_download(dir, "busybox-static")
}

/// `apt-get download PKG` in `dir`, and the `.deb` it left there.
fn apt_download(dir: &Path, pkg: &str) -> Result<PathBuf, Error> {
    tool(
        Command::new("apt-get")
            .args(["download", pkg])
            .current_dir(dir),
    )?;
    // The file is PKG_VERSION_ARCH.deb.
    let prefix = format!("{pkg}_");
    std::fs::read_dir(dir)
        .map_err(io(format!("cannot read {}", dir.display())))?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name().is_some_and(|n| {
                n.to_string_lossy().starts_with(&prefix) && n.to_string_lossy().ends_with(".deb")
            })
        })
        .ok_or_else(|| {
            Error::Invalid(format!(
                "apt-get download left no {pkg} .deb in {}",
                dir.display()
            ))
        })
}

/// Whether an ELF file names a program interpreter (is dynamically linked).
fn is_dynamic(elf: &[u8]) -> Result<bool, String> {
    if elf.len() < 64 || &elf[..4] != b"\x7fELF" || elf[4] != 2 || elf[5] != 1 {
        return Err("not a 64-bit little-endian ELF executable".into());
    }
    let u16_at = |o: usize| u16::from_le_bytes([elf[o], elf[o + 1]]) as usize;
    let u64_at = |o: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&elf[o..o + 8]);
        u64::from_le_bytes(b) as usize
    };
    let (phoff, phentsize, phnum) = (u64_at(32), u16_at(54), u16_at(56));
    for i in 0..phnum {
        let at = phoff + i * phentsize;
        if at + 4 > elf.len() {
            return Err("truncated program headers".into());
        }
        // PT_INTERP
        if u32::from_le_bytes([elf[at], elf[at + 1], elf[at + 2], elf[at + 3]]) == 3 {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Read the agent and check it is a static executable: the appliance has
/// no C library. [`build`] does this first; a caller can do it before
/// downloading anything.
pub fn check_agent(agent: &Path) -> Result<Vec<u8>, Error> {
    let bytes = std::fs::read(agent).map_err(io(format!(
        "cannot read the agent {} (build it with `cargo xtask agent`)",
        agent.display()
    )))?;
    match is_dynamic(&bytes) {
        Ok(false) => Ok(bytes),
        Ok(true) => Err(Error::Invalid(format!(
            "{} is dynamically linked; the appliance has no C library. Build it static \
             with `cargo xtask agent` (it lands in target/release/cradle-agent)",
            agent.display()
        ))),
        Err(why) => Err(Error::Invalid(format!("{}: {why}", agent.display()))),
    }
}

/// Busybox as unpacked from `deb` into `tree`: its static binary and the
/// applets it lists.
fn busybox(deb: &Path, tree: &Path) -> Result<(Vec<u8>, Vec<String>), Error> {
    tool(Command::new("dpkg-deb").arg("-x").arg(deb).arg(tree))?;
    let path = ["bin/busybox", "usr/bin/busybox"]
        .iter()
        .map(|p| tree.join(p))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            Error::Invalid(format!(
                "{} holds no /bin/busybox (use the package busybox-static)",
                deb.display()
            ))
        })?;
    let bytes = std::fs::read(&path).map_err(io(format!("cannot read {}", path.display())))?;
    match is_dynamic(&bytes) {
        Ok(false) => {}
        Ok(true) => {
            return Err(Error::Invalid(format!(
                "the busybox in {} is dynamically linked; the appliance has no C library. \
                 Use the package busybox-static",
                deb.display()
            )));
        }
        Err(why) => {
            return Err(Error::Invalid(format!(
                "the busybox in {}: {why}",
                deb.display()
            )));
        }
    }
    let list = tool(Command::new(&path).arg("--list"))?;
    let applets = applet_names(&String::from_utf8_lossy(&list.stdout))?;
    Ok((bytes, applets))
}

/// The applet names in `busybox --list` output, sorted, without
/// `busybox` itself; refused if one could name anything but a file in
/// `/bin`.
fn applet_names(list: &str) -> Result<Vec<String>, Error> {
    let mut names = Vec::new();
    for name in list.lines().map(str::trim).filter(|n| !n.is_empty()) {
        if name.contains('/') || name.starts_with('.') || name.contains('\0') {
            return Err(Error::Invalid(format!(
                "busybox --list gave {name:?}, which is not a plain applet name"
            )));
        }
        if name != "busybox" {
            names.push(name.to_string());
        }
    }
    if names.is_empty() {
        return Err(Error::Invalid("busybox --list gave no applets".into()));
    }
    names.sort();
    names.dedup();
    Ok(names)
}

/// Build the appliance from `kernel_deb`, `busybox_deb` and `agent` into
/// `out` (`vmlinuz` and `initrd.img`, each written to a temporary name and
/// renamed into place).
pub fn build(
    kernel_deb: &Path,
    busybox_deb: &Path,
    agent: &Path,
    out: &Path,
) -> Result<Built, Error> {
    let agent_bytes = check_agent(agent)?;
    let work = tempfile::Builder::new()
        .prefix("cradle-appliance-")
        .tempdir()
        .map_err(io("cannot make a temporary directory"))?;
    let (busybox_bytes, applets) = busybox(busybox_deb, &work.path().join("busybox"))?;
    let tree = work.path().join("kernel");
    tool(
        Command::new("dpkg-deb")
            .arg("-x")
            .arg(kernel_deb)
            .arg(&tree),
    )?;
    let boot = tree.join("boot");
    let vmlinuz = std::fs::read_dir(&boot)
        .map_err(|_| Error::Invalid(format!("{} holds no /boot", kernel_deb.display())))?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
        })
        .ok_or_else(|| {
            Error::Invalid(format!("{} holds no /boot/vmlinuz-*", kernel_deb.display()))
        })?;
    let release = vmlinuz
        .file_name()
        .unwrap()
        .to_string_lossy()
        .trim_start_matches("vmlinuz-")
        .to_string();
    let moddir = ["lib/modules", "usr/lib/modules"]
        .iter()
        .map(|d| tree.join(d).join(&release))
        .find(|d| d.is_dir())
        .ok_or_else(|| {
            Error::Invalid(format!(
                "{} holds no modules for {release}",
                kernel_deb.display()
            ))
        })?;
    let base = moddir.parent().unwrap().parent().unwrap().parent().unwrap();
    tool(Command::new("depmod").arg("-b").arg(base).arg(&release))?;
    let dep = std::fs::read_to_string(moddir.join("modules.dep"))
        .map_err(io("depmod wrote no modules.dep"))?;
    let modules = load_order(&dep, MODULES)?;

    let mut cpio = Cpio::default();
    for d in [
        "bin",
        "dev",
        "proc",
        "sys",
        "tmp",
        "run",
        "mnt",
        "lib",
        "lib/modules",
    ] {
        cpio.dir(d);
    }
    cpio.char_device("dev/console", 5, 1);
    cpio.file("init", 0o755, &agent_bytes);
    cpio.file("bin/busybox", 0o755, &busybox_bytes);
    for applet in &applets {
        cpio.symlink(&format!("bin/{applet}"), "busybox");
    }
    let mut order = String::new();
    for (name, rel) in &modules {
        let bytes =
            std::fs::read(moddir.join(rel)).map_err(io(format!("cannot read module {rel}")))?;
        cpio.file(&format!("lib/modules/{name}.ko"), 0o644, &bytes);
        order.push_str(name);
        order.push('\n');
    }
    cpio.file("lib/modules/load.order", 0o644, order.as_bytes());
    let archive = cpio.finish();

    std::fs::create_dir_all(out).map_err(io(format!("cannot create {}", out.display())))?;
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&archive)
        .map_err(io("cannot compress the initramfs"))?;
    let gz = gz.finish().map_err(io("cannot compress the initramfs"))?;
    let kernel = out.join("vmlinuz");
    let initrd = out.join("initrd.img");
    let kernel_bytes = std::fs::read(&vmlinuz).map_err(io("cannot read the kernel"))?;
    write_atomically(&kernel, &kernel_bytes)?;
    write_atomically(&initrd, &gz)?;
    Ok(Built {
        kernel,
        initrd,
        release,
        modules: modules.into_iter().map(|(n, _)| n).collect(),
        applets,
    })
}

fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), Error> {
    let tmp = path.with_extension("part");
    std::fs::write(&tmp, bytes).map_err(io(format!("cannot write {}", tmp.display())))?;
    std::fs::rename(&tmp, path).map_err(io(format!("cannot rename into {}", path.display())))
}

/// The module name a path in modules.dep stands for: its file name less
/// `.ko`, with `-` read as `_` (as the kernel does).
fn module_name(rel: &str) -> String {
    let file = rel.rsplit('/').next().unwrap_or(rel);
    file.split(".ko").next().unwrap_or(file).replace('-', "_")
}

/// `wanted` and everything they depend on, dependencies first, as
/// (name, path relative to the modules directory).
pub fn load_order(modules_dep: &str, wanted: &[&str]) -> Result<Vec<(String, String)>, Error> {
    let mut deps: BTreeMap<String, (String, Vec<String>)> = BTreeMap::new();
    for line in modules_dep.lines() {
        let Some((m, rest)) = line.split_once(':') else {
            continue;
        };
        deps.insert(
            module_name(m),
            (
                m.to_string(),
                rest.split_whitespace().map(module_name).collect(),
            ),
        );
    }
    let mut out = Vec::new();
    let mut done = HashSet::new();
    fn visit(
        name: &str,
        deps: &BTreeMap<String, (String, Vec<String>)>,
        done: &mut HashSet<String>,
        out: &mut Vec<(String, String)>,
    ) -> Result<(), Error> {
        if done.contains(name) {
            return Ok(());
        }
        let Some((path, ds)) = deps.get(name) else {
            return Err(Error::Invalid(format!(
                "module {name} is not in this kernel's modules.dep"
            )));
        };
        done.insert(name.to_string());
        for d in ds {
            visit(d, deps, done, out)?;
        }
        out.push((name.to_string(), path.clone()));
        Ok(())
    }
    for w in wanted {
        visit(w, &deps, &mut done, &mut out)?;
    }
    Ok(out)
}

/// A gzipped newc archive of regular files `(path, mode, bytes)`, to
/// append to an initrd: the kernel unpacks concatenated archives in order,
/// later files replacing earlier ones (how a test gives the appliance's
/// kernel and busybox another `/init`).
pub fn overlay_archive(files: &[(&str, u32, &[u8])]) -> Result<Vec<u8>, Error> {
    let mut cpio = Cpio::default();
    for (name, mode, data) in files {
        cpio.file(name, *mode, data);
    }
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&cpio.finish())
        .map_err(io("cannot compress the archive"))?;
    gz.finish().map_err(io("cannot compress the archive"))
}

/// A cpio archive in the `newc` format, built in memory.
#[derive(Default)]
struct Cpio {
    buf: Vec<u8>,
    ino: u32,
}

impl Cpio {
    fn entry(&mut self, name: &str, mode: u32, rdev: (u32, u32), data: &[u8]) {
        self.ino += 1;
        let header = format!(
            "070701{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            self.ino,
            mode,
            0,
            0,
            1,
            0,
            data.len(),
            0,
            0,
            rdev.0,
            rdev.1,
            name.len() + 1,
            0
        );
        self.buf.extend_from_slice(header.as_bytes());
        self.buf.extend_from_slice(name.as_bytes());
        self.buf.push(0);
        self.pad();
        self.buf.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.buf.len().is_multiple_of(4) {
            self.buf.push(0);
        }
    }

    fn dir(&mut self, name: &str) {
        self.entry(name, 0o040755, (0, 0), &[]);
    }

    fn file(&mut self, name: &str, perm: u32, data: &[u8]) {
        self.entry(name, 0o100000 | perm, (0, 0), data);
    }

    /// A symbolic link: the data is the target.
    fn symlink(&mut self, name: &str, target: &str) {
        self.entry(name, 0o120777, (0, 0), target.as_bytes());
    }

    fn char_device(&mut self, name: &str, major: u32, minor: u32) {
        self.entry(name, 0o020600, (major, minor), &[]);
    }

    fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, (0, 0), &[]);
        self.buf
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dependencies_load_first_once() {
        let dep = "kernel/fs/ext4/ext4.ko: kernel/lib/crc16.ko kernel/fs/mbcache.ko kernel/fs/jbd2/jbd2.ko\n\
                   kernel/lib/crc16.ko:\nkernel/fs/mbcache.ko:\nkernel/fs/jbd2/jbd2.ko:\n\
                   kernel/drivers/block/virtio_blk.ko: kernel/drivers/virtio/virtio-ring.ko\n\
                   kernel/drivers/virtio/virtio-ring.ko:\n";
        let order: Vec<String> = load_order(dep, &["virtio_blk", "ext4"])
            .unwrap()
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        assert_eq!(
            order,
            [
                "virtio_ring",
                "virtio_blk",
                "crc16",
                "mbcache",
                "jbd2",
                "ext4"
            ]
        );
        let e = load_order(dep, &["nope"]).unwrap_err();
        assert!(e.to_string().contains("module nope is not in"), "{e}");
    }

    #[test]
    fn static_and_dynamic_elves_are_told_apart() {
        let me = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        assert_eq!(is_dynamic(&me), Ok(true), "test binaries are dynamic");
        assert!(is_dynamic(b"#!/bin/sh\n").is_err());
    }

    /// The entries of a newc archive: (name, mode, rdev major, data).
    fn entries(mut buf: &[u8]) -> Vec<(String, u32, u32, Vec<u8>)> {
        let field = |h: &[u8], i: usize| {
            u32::from_str_radix(std::str::from_utf8(&h[6 + 8 * i..14 + 8 * i]).unwrap(), 16)
                .unwrap()
        };
        let pad = |n: usize| n.div_ceil(4) * 4;
        let mut out = Vec::new();
        loop {
            assert_eq!(&buf[..6], b"070701");
            let (mode, size, major, namesize) = (
                field(buf, 1),
                field(buf, 6) as usize,
                field(buf, 9),
                field(buf, 11) as usize,
            );
            let name = std::str::from_utf8(&buf[110..110 + namesize - 1])
                .unwrap()
                .to_string();
            let data_at = pad(110 + namesize);
            let data = buf[data_at..data_at + size].to_vec();
            buf = &buf[pad(data_at + size)..];
            if name == "TRAILER!!!" {
                assert!(buf.is_empty());
                return out;
            }
            out.push((name, mode, major, data));
        }
    }

    #[test]
    fn cpio_entries_round_trip() {
        let mut c = Cpio::default();
        c.dir("bin");
        c.file("bin/busybox", 0o755, b"\x7fELF...");
        c.symlink("bin/sh", "busybox");
        c.char_device("dev/console", 5, 1);
        let got = entries(&c.finish());
        assert_eq!(
            got,
            [
                ("bin".to_string(), 0o040755, 0, vec![]),
                (
                    "bin/busybox".to_string(),
                    0o100755,
                    0,
                    b"\x7fELF...".to_vec()
                ),
                ("bin/sh".to_string(), 0o120777, 0, b"busybox".to_vec()),
                ("dev/console".to_string(), 0o020600, 5, vec![]),
            ]
        );
    }

    #[test]
    fn applets_are_plain_names() {
        assert_eq!(
            applet_names("sh\nmount\n\nbusybox\n[\n[[\nsh\n").unwrap(),
            ["[", "[[", "mount", "sh"]
        );
        for bad in ["sh\n../etc/passwd\n", "usr/bin/env\n", ".hidden\n"] {
            let e = applet_names(bad).unwrap_err();
            assert!(e.to_string().contains("not a plain applet name"), "{e}");
        }
        assert!(applet_names("busybox\n").is_err());
    }
}
