//! `cargo xtask bench personalize`: a personalization package overlaid onto
//! an ext4 disk image by `cradle personalize apply` (debugfs in user space),
//! against libguestfs's `guestfish ... tar-in` of the same package onto a
//! copy of the same image, in the same run.
//!
//! The package is made here with the `tar` and `flate2` crates: `--files`
//! small text files (a few hundred bytes to 4 KiB of deterministic
//! pseudo-random `key = value` lines, 0644 and every tenth 0755) in 50
//! directories `etc/cradle/dNN/`, plus one `--big-mib` file `big.bin` of
//! xorshift bytes (which gzip cannot shrink), all owned by 0:0 with one
//! mtime, each directory's entry before its files. The image is a sparse
//! file of `--image-mib` with a whole-disk ext4 filesystem (`mke2fs -q -F
//! -t ext4`, no partition table), made once; every contender gets a fresh
//! `cp --sparse=always` copy of it in every run (not timed).
//!
//! Timed, each from process spawn to exit, in alternating order from run to
//! run:
//!
//! - `cradle personalize apply PKG --to COPY` (the release binary): verify
//!   the whole package, look up its paths in the image, unpack file data to
//!   a temporary directory and write everything with one `debugfs -w -f`;
//! - `guestfish --rw -a COPY -i tar-in PKG / compress:gzip` as the issue
//!   has it, or, when `-i` finds no operating system to inspect (a bare data
//!   filesystem has none), `guestfish --rw -a COPY -m /dev/sda tar-in ...`,
//!   which mounts the filesystem by name; with `LIBGUESTFS_BACKEND=direct`.
//!
//! and, on its own, `cradle personalize check PKG` (verification alone), to
//! tell how much of cradle's time that is. Every contender's disks are
//! synced after it (not timed). Before the runs, guestfish is tried on the
//! image (read-only) to build and cache its appliance, to find out whether
//! the appliance boots under KVM (else TCG: forced when it hangs under
//! `/dev/kvm`) and which form works; if guestfish cannot run at all, the
//! bench says why and reports cradle alone.
//!
//! Every result is checked (not timed): `e2fsck -fn` exits 0, a few small
//! files read back with `debugfs cat` hold the package's bytes and modes,
//! the last directory lists all its files, and the big file's size and bytes
//! (`debugfs dump`) are the package's. A result that does not check out
//! fails the benchmark.

use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};

use crate::bench::{self, XorShift, median, read_full, sync};
use crate::{debian, flags};

const GUESTFISH: &str = "/usr/bin/guestfish";
const MIB: u64 = 1024 * 1024;
/// Directories the small files are spread over.
const DIRS: usize = 50;
/// One mtime for every entry (2023-11-14).
const MTIME: u64 = 1_700_000_000;
const BIG: &str = "big.bin";
/// The target: guestfish's time over cradle's.
const TARGET_RATIO: f64 = 10.0;
/// How long the appliance may show nothing from its kernel after the BIOS
/// hands over before the KVM attempt is given up for TCG.
const KVM_BOOT_GRACE: Duration = Duration::from_secs(30);
/// The longest any one command may take before the benchmark gives up.
const PROBE_TIMEOUT: Duration = Duration::from_secs(600);
const RUN_TIMEOUT: Duration = Duration::from_secs(3600);

pub struct Options {
    runs: usize,
    files: usize,
    big_mib: u64,
    image_mib: u64,
}

impl Options {
    pub fn parse(args: &[String]) -> Result<Options> {
        let mut o = Options {
            runs: 3,
            files: 5000,
            big_mib: 100,
            image_mib: 1024,
        };
        for (flag, v) in flags::pairs(args)? {
            match flag {
                "--runs" => o.runs = flags::number(flag, v, 1)?,
                "--files" => o.files = flags::number(flag, v, 1)?,
                "--big-mib" => o.big_mib = flags::number(flag, v, 1)? as u64,
                "--image-mib" => o.image_mib = flags::number(flag, v, 64)? as u64,
                other => bail!("unknown option {other:?} (see `cargo xtask --help`)"),
            }
        }
        // cradle refuses packages over 256 MiB compressed and 100,000 entries.
        if o.big_mib > 200 {
            bail!("--big-mib: at most 200 (cradle's cap is 256 MiB of package)");
        }
        if o.files > 90_000 {
            bail!("--files: at most 90000 (cradle's cap is 100000 entries)");
        }
        // The files and the big one, with room for the filesystem's own.
        let need = o.big_mib + (o.files as u64 * 8 * 1024).div_ceil(MIB) + 64;
        if o.image_mib < need {
            bail!("--image-mib: at least {need} for this package");
        }
        Ok(o)
    }
}

/// The big file's bytes, `len` of them, as a reader (for the archive and
/// for the check).
struct BigReader {
    rng: XorShift,
    left: u64,
    word: [u8; 8],
    /// Bytes of `word` not handed out yet (its tail).
    have: usize,
}

impl BigReader {
    fn new(len: u64) -> BigReader {
        BigReader {
            rng: XorShift::new(0xb16),
            left: len,
            word: [0; 8],
            have: 0,
        }
    }
}

impl Read for BigReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = (buf.len() as u64).min(self.left) as usize;
        for b in &mut buf[..n] {
            if self.have == 0 {
                self.word = self.rng.next().to_le_bytes();
                self.have = 8;
            }
            *b = self.word[8 - self.have];
            self.have -= 1;
        }
        self.left -= n as u64;
        Ok(n)
    }
}

/// The package's layout and what its files hold.
struct Package {
    files: usize,
    big: u64,
}

impl Package {
    fn dir(&self, i: usize) -> String {
        format!("etc/cradle/d{:02}", i * DIRS / self.files)
    }

    fn file(&self, i: usize) -> String {
        format!("{}/f{i:04}.conf", self.dir(i))
    }

    fn mode(i: usize) -> u32 {
        if i % 10 == 9 { 0o755 } else { 0o644 }
    }

    /// Small file `i`: 200 to 4095 bytes of `key = value` lines.
    fn content(i: usize) -> Vec<u8> {
        let mut rng = XorShift::new(i as u64 + 1);
        let size = 200 + (rng.next() % 3896) as usize;
        let mut out = Vec::with_capacity(size + 64);
        out.extend_from_slice(format!("# cradle bench file {i}\n").as_bytes());
        let mut k = 0;
        while out.len() < size {
            out.extend_from_slice(format!("key{k} = {:016x}\n", rng.next()).as_bytes());
            k += 1;
        }
        out.truncate(size);
        out
    }

    /// The files of the last directory (for the listing check).
    fn last_dir_files(&self) -> (String, usize) {
        let last = self.dir(self.files - 1);
        let n = (0..self.files).filter(|i| self.dir(*i) == last).count();
        (last, n)
    }

    /// Write the package as a .tar.gz (default compression, as a packager
    /// would); its compressed size.
    fn write(&self, path: &Path) -> Result<u64> {
        let out = BufWriter::with_capacity(
            1 << 20,
            File::create(path).with_context(|| format!("creating {}", path.display()))?,
        );
        let gz = flate2::write::GzEncoder::new(out, flate2::Compression::default());
        let mut tar = tar::Builder::new(gz);
        let header = |kind: tar::EntryType, mode: u32, size: u64| {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(kind);
            h.set_mode(mode);
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(MTIME);
            h.set_size(size);
            h
        };
        let dir = |tar: &mut tar::Builder<_>, p: &str| -> Result<()> {
            let mut h = header(tar::EntryType::Directory, 0o755, 0);
            tar.append_data(&mut h, format!("{p}/"), std::io::empty())?;
            Ok(())
        };
        dir(&mut tar, "etc")?;
        dir(&mut tar, "etc/cradle")?;
        let mut last = String::new();
        for i in 0..self.files {
            let d = self.dir(i);
            if d != last {
                dir(&mut tar, &d)?;
                last = d;
            }
            let data = Self::content(i);
            let mut h = header(tar::EntryType::Regular, Self::mode(i), data.len() as u64);
            tar.append_data(&mut h, self.file(i), &data[..])?;
        }
        let mut h = header(tar::EntryType::Regular, 0o644, self.big);
        tar.append_data(&mut h, BIG, BigReader::new(self.big))?;
        let gz = tar.into_inner()?;
        let mut out = gz.finish()?;
        out.flush()?;
        let f = out.into_inner().map_err(|e| e.into_error())?;
        f.sync_all()?;
        Ok(f.metadata()?.len())
    }
}

/// A command's end: its status, how long it ran, and why it was stopped
/// early (a timeout, or what `watch` saw), if it was.
pub(crate) struct Finished {
    pub(crate) status: Option<ExitStatus>,
    pub(crate) secs: f64,
    pub(crate) stopped: Option<String>,
}

/// Run `cmd` in a process group of its own (guestfish starts qemu), timed
/// from spawn to exit. `watch` is asked every half second and may return a
/// reason to stop it; so does the timeout. A stopped command's whole group
/// is killed.
pub(crate) fn run_timed(
    mut cmd: Command,
    timeout: Duration,
    mut watch: impl FnMut() -> Option<String>,
) -> Result<Finished> {
    cmd.stdin(Stdio::null()).process_group(0);
    let started = Instant::now();
    let mut child = cmd.spawn().with_context(|| format!("cannot run {cmd:?}"))?;
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    let waiter = std::thread::spawn(move || {
        let status = child.wait();
        let _ = tx.send((status, Instant::now()));
    });
    let mut stopped = None;
    let (status, ended) = loop {
        match rx.recv_timeout(Duration::from_millis(500)) {
            Ok(done) => break done,
            Err(mpsc::RecvTimeoutError::Disconnected) => bail!("lost the waiter of {pid}"),
            Err(mpsc::RecvTimeoutError::Timeout) => {}
        }
        if stopped.is_none() {
            stopped = watch().or_else(|| {
                (started.elapsed() > timeout)
                    .then(|| format!("still running after {} s", timeout.as_secs()))
            });
            if stopped.is_some() {
                // The group we made: the command and whatever it started.
                let _ = Command::new("kill")
                    .args(["-KILL", "--", &format!("-{pid}")])
                    .stderr(Stdio::null())
                    .status();
            }
        }
    };
    let _ = waiter.join();
    Ok(Finished {
        status: status.ok(),
        secs: (ended - started).as_secs_f64(),
        stopped,
    })
}

pub(crate) fn ok(f: &Finished) -> bool {
    f.stopped.is_none() && f.status.is_some_and(|s| s.success())
}

/// The last `n` non-empty lines of a log file, for error messages.
pub(crate) fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read(path).unwrap_or_default();
    let text = String::from_utf8_lossy(&text);
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

pub(crate) fn describe(f: &Finished) -> String {
    match (&f.stopped, f.status) {
        (Some(why), _) => format!("stopped: {why}"),
        (None, Some(s)) => s.to_string(),
        (None, None) => "no exit status".into(),
    }
}

/// A command whose output we only need on failure.
fn run_quiet(program: &str, args: &[&str]) -> Result<std::process::Output> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {program}"))?;
    if !out.status.success() {
        bail!(
            "`{program} {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out)
}

/// A fresh copy of the image (untimed).
fn fresh_copy(image: &Path, copy: &Path) -> Result<()> {
    let _ = std::fs::remove_file(copy);
    run_quiet(
        "cp",
        &[
            "--sparse=always",
            &image.display().to_string(),
            &copy.display().to_string(),
        ],
    )
    .map(|_| ())
}

/// `debugfs -R request image`: its standard output.
fn debugfs(image: &Path, request: &str) -> Result<Vec<u8>> {
    Ok(run_quiet("debugfs", &["-R", request, &image.display().to_string()])?.stdout)
}

/// The field after `name:` in debugfs's `stat` output.
fn stat_field(stat: &str, name: &str) -> Option<String> {
    let at = stat.find(&format!("{name}:"))? + name.len() + 1;
    stat[at..].split_whitespace().next().map(String::from)
}

/// Check what `who` left in `image` against the package; `dump` is a
/// scratch path for the big file.
fn verify(who: &str, image: &Path, pkg: &Package, dump: &Path) -> Result<()> {
    let wrong = |what: String| anyhow!("{who}: the image is wrong: {what}");
    let fsck = Command::new("e2fsck")
        .args(["-fn"])
        .arg(image)
        .stdin(Stdio::null())
        .output()
        .context("cannot run e2fsck")?;
    if !fsck.status.success() {
        return Err(wrong(format!(
            "e2fsck -fn exits {}:\n{}{}",
            fsck.status,
            String::from_utf8_lossy(&fsck.stdout),
            String::from_utf8_lossy(&fsck.stderr)
        )));
    }
    let mut samples = vec![0, pkg.files / 2, pkg.files - 1];
    if let Some(x) = (0..pkg.files).find(|i| Package::mode(*i) == 0o755) {
        samples.push(x);
    }
    for i in samples {
        let path = pkg.file(i);
        let got = debugfs(image, &format!("cat /{path}"))?;
        if got != Package::content(i) {
            return Err(wrong(format!(
                "/{path} holds {} bytes that are not the package's {}",
                got.len(),
                Package::content(i).len()
            )));
        }
        let stat = String::from_utf8_lossy(&debugfs(image, &format!("stat /{path}"))?).into_owned();
        let mode = stat_field(&stat, "Mode");
        if mode.as_deref() != Some(&format!("{:04o}", Package::mode(i))) {
            return Err(wrong(format!(
                "/{path} has mode {mode:?}, not {:04o}",
                Package::mode(i)
            )));
        }
    }
    let (last, n) = pkg.last_dir_files();
    let listing = String::from_utf8_lossy(&debugfs(image, &format!("ls -p /{last}"))?).into_owned();
    let found = listing
        .lines()
        .filter(|l| {
            l.split('/')
                .nth(5)
                .is_some_and(|name| name.ends_with(".conf"))
        })
        .count();
    if found != n {
        return Err(wrong(format!("/{last} lists {found} files, not {n}")));
    }
    let stat = String::from_utf8_lossy(&debugfs(image, &format!("stat /{BIG}"))?).into_owned();
    let size = stat_field(&stat, "Size");
    if size.as_deref() != Some(&pkg.big.to_string()) {
        return Err(wrong(format!("/{BIG} has size {size:?}, not {}", pkg.big)));
    }
    let _ = std::fs::remove_file(dump);
    debugfs(image, &format!("dump /{BIG} {}", dump.display()))?;
    let mut got = File::open(dump).with_context(|| format!("{who}: debugfs dumped no {BIG}"))?;
    let mut want = BigReader::new(pkg.big);
    let (mut a, mut b) = (vec![0u8; MIB as usize], vec![0u8; MIB as usize]);
    let mut at = 0u64;
    loop {
        let n = read_full(&mut got, &mut a)?;
        let m = read_full(&mut want, &mut b)?;
        if a[..n] != b[..m] {
            return Err(wrong(format!(
                "/{BIG} differs from the package's near byte {at}"
            )));
        }
        if n == 0 {
            break;
        }
        at += n as u64;
    }
    std::fs::remove_file(dump)?;
    Ok(())
}

/// How guestfish is run, once the probes have found out.
pub(crate) struct Guestfish {
    /// `-i` or `-m /dev/sda`.
    form: Vec<&'static str>,
    form_why: String,
    /// Force TCG (`LIBGUESTFS_BACKEND_SETTINGS=force_tcg`).
    pub(crate) force_tcg: bool,
    pub(crate) accel: String,
}

impl Guestfish {
    /// guestfish on `image`, read-write or read-only, with `args` after the
    /// form, and libguestfs's debug output when `debug`.
    fn command(&self, image: &Path, rw: bool, args: &[&str], debug: bool) -> Command {
        let mut c = Command::new(GUESTFISH);
        c.env("LIBGUESTFS_BACKEND", "direct");
        if self.force_tcg {
            c.env("LIBGUESTFS_BACKEND_SETTINGS", "force_tcg");
        } else {
            c.env_remove("LIBGUESTFS_BACKEND_SETTINGS");
        }
        if debug {
            c.env("LIBGUESTFS_DEBUG", "1");
        } else {
            c.env_remove("LIBGUESTFS_DEBUG")
                .env_remove("LIBGUESTFS_TRACE");
        }
        c.arg(if rw { "--rw" } else { "--ro" })
            .arg("-a")
            .arg(image)
            .args(&self.form)
            .args(args);
        c
    }

    fn shown(&self) -> String {
        format!(
            "guestfish --rw -a IMG {} tar-in PKG / compress:gzip",
            self.form.join(" ")
        )
    }
}

/// Install guestfish and a kernel for its appliance when we can; the reason
/// it cannot run otherwise.
fn install_guestfish() -> Result<(), String> {
    let has_kernel = || {
        std::fs::read_dir("/boot").is_ok_and(|d| {
            d.flatten()
                .any(|e| e.file_name().to_string_lossy().starts_with("vmlinuz-"))
        })
    };
    if Path::new(GUESTFISH).exists() && has_kernel() {
        return Ok(());
    }
    let pkgs = ["libguestfs-tools", "linux-image-amd64"];
    debian::ensure_with_qemu(
        &pkgs,
        "the benchmark compares cradle with guestfish, whose appliance boots a kernel from /boot",
    )
    .map_err(|e| format!("{e:#}"))?;
    if !Path::new(GUESTFISH).exists() {
        return Err(format!(
            "{GUESTFISH} is still missing after installing libguestfs-tools"
        ));
    }
    if !has_kernel() {
        return Err(
            "no /boot/vmlinuz-* for supermin's appliance after installing \
                    linux-image-amd64"
                .into(),
        );
    }
    Ok(())
}

/// Try guestfish on the image (read-only): cache its appliance, find out
/// whether it boots under KVM and which form works. `Err` says why it
/// cannot be run.
pub(crate) fn probe_guestfish(image: &Path, tmp: &Path) -> Result<Guestfish, String> {
    install_guestfish()?;
    println!("    {}", bench::tool_version(GUESTFISH, "--version"));
    println!(
        "    {}",
        bench::tool_version("qemu-system-x86_64", "--version")
    );
    let kvm = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    let log = tmp.join("guestfish-probe.log");
    let mut gf = Guestfish {
        form: vec!["-m", "/dev/sda"],
        form_why: String::new(),
        force_tcg: !kvm,
        accel: String::new(),
    };
    // With libguestfs's debug output (the appliance's console among it)
    // when `debug`; then the boot is watched, unless TCG is forced.
    let probe = |gf: &Guestfish, debug: bool| -> Result<Finished, String> {
        let watch_kvm = debug && !gf.force_tcg;
        let mut c = gf.command(image, false, &["ls", "/"], debug);
        let f = File::create(&log).map_err(|e| e.to_string())?;
        c.stdout(f.try_clone().map_err(|e| e.to_string())?)
            .stderr(f);
        let mut bios_at: Option<Instant> = None;
        run_timed(c, PROBE_TIMEOUT, || {
            if !watch_kvm {
                return None;
            }
            let text =
                String::from_utf8_lossy(&std::fs::read(&log).unwrap_or_default()).into_owned();
            if text.contains("Linux version") {
                return None;
            }
            if text.contains("Booting from ROM") {
                let at = *bios_at.get_or_insert_with(Instant::now);
                if at.elapsed() > KVM_BOOT_GRACE {
                    return Some(format!(
                        "nothing from the appliance's kernel {} s after the BIOS handed over",
                        KVM_BOOT_GRACE.as_secs()
                    ));
                }
            }
            None
        })
        .map_err(|e| format!("{e:#}"))
    };

    let started = Instant::now();
    let mut f = probe(&gf, true)?;
    let mut kvm_failure = None;
    if kvm && !ok(&f) {
        kvm_failure = Some(describe(&f));
        println!(
            "    under /dev/kvm: {}; trying TCG (LIBGUESTFS_BACKEND_SETTINGS=force_tcg)",
            describe(&f)
        );
        gf.force_tcg = true;
        f = probe(&gf, true)?;
    }
    if !ok(&f) {
        return Err(format!(
            "guestfish -m /dev/sda cannot read the image ({}):\n{}",
            describe(&f),
            tail(&log, 15)
        ));
    }
    let text = String::from_utf8_lossy(&std::fs::read(&log).unwrap_or_default()).into_owned();
    gf.accel = if gf.force_tcg {
        match (&kvm_failure, kvm) {
            (Some(why), _) => format!(
                "TCG (software emulation): /dev/kvm opens but the appliance does not boot \
                 under it ({why})"
            ),
            _ => "TCG (software emulation): /dev/kvm cannot be opened".into(),
        }
    } else if text.contains("Hypervisor detected: KVM") {
        "KVM".into()
    } else {
        "TCG (software emulation): qemu fell back from KVM".into()
    };
    println!(
        "    appliance built and booted: {:.1} s; accelerator: {}",
        started.elapsed().as_secs_f64(),
        gf.accel
    );

    // The form first; `-i` needs an operating system to inspect.
    let mut inspect = Guestfish {
        form: vec!["-i"],
        form_why: String::new(),
        force_tcg: gf.force_tcg,
        accel: String::new(),
    };
    let f = probe(&inspect, false)?;
    if ok(&f) {
        inspect.form_why = "the issue's form: -i found an operating system".into();
        inspect.accel = gf.accel;
        return Ok(inspect);
    }
    let why = tail(&log, 40)
        .lines()
        .find(|l| l.starts_with("guestfish:"))
        .map(|l| l.trim_start_matches("guestfish:").trim().to_string())
        .unwrap_or_else(|| describe(&f));
    gf.form_why = format!("-i fails on a bare data filesystem (\"{why}\"); -m mounts it by name");
    Ok(gf)
}

/// Who writes the package into the image.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Who {
    Cradle,
    Guestfish,
}

impl Who {
    fn name(self) -> &'static str {
        match self {
            Who::Cradle => "cradle",
            Who::Guestfish => "guestfish",
        }
    }
}

struct Run {
    cradle: f64,
    guestfish: Option<f64>,
    check: f64,
}

pub fn run(o: Options) -> Result<()> {
    let bin = bench::build_cradle()?;
    if !bin.exists() {
        bail!("{} is missing after the build", bin.display());
    }

    println!("==> e2fsprogs (mke2fs, debugfs, e2fsck)");
    if ["mke2fs", "debugfs", "e2fsck"]
        .iter()
        .any(|t| Command::new(t).arg("-V").output().is_err())
    {
        debian::ensure(&["e2fsprogs"], "cradle writes ext4 images with debugfs")?;
    }
    println!("    {}", bench::tool_version("debugfs", "-V"));

    let tmp = tempfile::Builder::new()
        .prefix("cradle-bench-personalize-")
        .tempdir()?;
    let dir = tmp.path();
    let pkg = Package {
        files: o.files,
        big: o.big_mib * MIB,
    };
    let pkg_path = dir.join("package.tar.gz");
    let image = dir.join("base.img");
    let copy = dir.join("copy.img");
    let dump = dir.join("big.dump");

    println!(
        "==> make the package: {} small files in {DIRS} directories and a {} MiB {BIG}",
        o.files, o.big_mib
    );
    let started = Instant::now();
    let compressed = pkg.write(&pkg_path)?;
    let small: usize = (0..o.files).map(|i| Package::content(i).len()).sum();
    println!(
        "    {}: {:.1} MiB gzip ({} bytes of small files); {:.1} s",
        pkg_path.display(),
        compressed as f64 / MIB as f64,
        small,
        started.elapsed().as_secs_f64()
    );

    println!("==> make a {} MiB ext4 image", o.image_mib);
    File::create(&image)?.set_len(o.image_mib * MIB)?;
    run_quiet(
        "mke2fs",
        &["-q", "-F", "-t", "ext4", &image.display().to_string()],
    )?;
    println!("    {} (whole-disk ext4, sparse)", image.display());

    println!("==> guestfish (LIBGUESTFS_BACKEND=direct)");
    let guestfish = match probe_guestfish(&image, dir) {
        Ok(g) => {
            println!("    form: {} ({})", g.shown(), g.form_why);
            Some(g)
        }
        Err(why) => {
            println!("    GUESTFISH CANNOT RUN HERE; timing cradle alone. Why:");
            for l in why.lines() {
                println!("      {l}");
            }
            None
        }
    };
    // The probes' guestfish runs are done: no appliance is left to bother
    // the timings.

    if let Ok(l) = std::fs::read_to_string("/proc/loadavg") {
        println!(
            "    load average before the runs: {} ({} CPUs)",
            l.split_whitespace().take(3).collect::<Vec<_>>().join(" "),
            std::thread::available_parallelism().map_or(0, |n| n.get())
        );
    }

    let log = dir.join("contender.log");
    let mut runs: Vec<Run> = Vec::new();
    for r in 1..=o.runs {
        let order: &[Who] = if r % 2 == 1 {
            &[Who::Cradle, Who::Guestfish]
        } else {
            &[Who::Guestfish, Who::Cradle]
        };
        println!("==> run {r}/{}: {} first", o.runs, order[0].name());
        let mut run = Run {
            cradle: 0.0,
            guestfish: None,
            check: 0.0,
        };
        for who in order {
            let mut cmd = match who {
                Who::Cradle => {
                    let mut c = Command::new(&bin);
                    c.args(["personalize", "apply"])
                        .arg(&pkg_path)
                        .arg("--to")
                        .arg(&copy);
                    c
                }
                Who::Guestfish => match &guestfish {
                    Some(g) => {
                        let mut c = g.command(&copy, true, &["tar-in"], false);
                        c.arg(&pkg_path).args(["/", "compress:gzip"]);
                        c
                    }
                    None => continue,
                },
            };
            fresh_copy(&image, &copy)?;
            sync()?;
            let f = File::create(&log)?;
            cmd.stdout(f.try_clone()?).stderr(f);
            let done = run_timed(cmd, RUN_TIMEOUT, || None)?;
            if !ok(&done) {
                bail!(
                    "{} failed ({}):\n{}",
                    who.name(),
                    describe(&done),
                    tail(&log, 20)
                );
            }
            sync()?;
            verify(who.name(), &copy, &pkg, &dump)?;
            println!(
                "    {:<34} {:>8.3} s  (checked: e2fsck -fn clean, files, modes, {BIG})",
                match who {
                    Who::Cradle => "cradle personalize apply",
                    Who::Guestfish => "guestfish tar-in",
                },
                done.secs
            );
            match who {
                Who::Cradle => run.cradle = done.secs,
                Who::Guestfish => run.guestfish = Some(done.secs),
            }
            std::fs::remove_file(&copy)?;
        }
        let mut c = Command::new(&bin);
        c.args(["personalize", "check"])
            .arg(&pkg_path)
            .stdout(Stdio::null())
            .stderr(File::create(&log)?);
        let done = run_timed(c, RUN_TIMEOUT, || None)?;
        if !ok(&done) {
            bail!(
                "cradle personalize check failed ({}):\n{}",
                describe(&done),
                tail(&log, 20)
            );
        }
        println!(
            "    {:<34} {:>8.3} s",
            "cradle personalize check (verify)", done.secs
        );
        run.check = done.secs;
        runs.push(run);
    }

    let times = |f: fn(&Run) -> Option<f64>| -> Vec<f64> { runs.iter().filter_map(f).collect() };
    let cradle = times(|r| Some(r.cradle));
    let check = times(|r| Some(r.check));
    let gf = times(|r| r.guestfish);
    let row = |name: &str, v: &[f64]| {
        let all: Vec<String> = v.iter().map(|s| format!("{s:.3}")).collect();
        println!("{name:<44} {:>9.3}  {}", median(v.to_vec()), all.join(" "));
    };
    println!();
    println!(
        "==> results: {} run(s){}; package {} small files + {} MiB {BIG} ({:.1} MiB gzip), \
         onto a {} MiB ext4 image",
        o.runs,
        if o.runs > 1 { ", medians" } else { "" },
        o.files,
        o.big_mib,
        compressed as f64 / MIB as f64,
        o.image_mib
    );
    println!("    timed from spawn to exit; a fresh copy of the image each time; page cache warm");
    println!("{:<44} {:>9}  each run", "contender", "seconds");
    row("cradle personalize apply PKG --to IMG", &cradle);
    row("  of which verify: cradle personalize check", &check);
    match &guestfish {
        Some(g) => {
            row(&format!("guestfish {} tar-in", g.form.join(" ")), &gf);
            println!();
            println!("    guestfish: {}", g.shown());
            println!("      form: {}", g.form_why);
            println!("      backend: direct; accelerator: {}", g.accel);
            let ratio = median(gf.clone()) / median(cradle.clone());
            println!();
            println!("target (from the issue; reported, not enforced):");
            println!(
                "  guestfish / cradle >= {TARGET_RATIO}x: {ratio:.1}x -> {}",
                if ratio >= TARGET_RATIO {
                    "met"
                } else {
                    "NOT met"
                }
            );
        }
        None => {
            println!(
                "guestfish                                    not run: it cannot run here (see above)"
            );
            println!();
            println!(
                "target (from the issue): guestfish / cradle >= {TARGET_RATIO}x: NOT MEASURED"
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_options() {
        let args = |s: &str| s.split_whitespace().map(String::from).collect::<Vec<_>>();
        let o = Options::parse(&[]).unwrap();
        assert_eq!(
            (o.runs, o.files, o.big_mib, o.image_mib),
            (3, 5000, 100, 1024)
        );
        let o = Options::parse(&args("--runs 1 --files 10 --big-mib 1 --image-mib 128")).unwrap();
        assert_eq!((o.runs, o.files, o.big_mib, o.image_mib), (1, 10, 1, 128));
        assert!(Options::parse(&args("--runs 0")).is_err());
        assert!(Options::parse(&args("--big-mib 500")).is_err());
        assert!(Options::parse(&args("--big-mib 100 --image-mib 100")).is_err());
        assert!(Options::parse(&args("--bogus 1")).is_err());
    }

    #[test]
    fn package_is_what_cradle_accepts() {
        let dir = tempfile::tempdir().unwrap();
        let pkg = Package {
            files: 120,
            big: 3 * MIB + 5,
        };
        let path = dir.path().join("p.tar.gz");
        pkg.write(&path).unwrap();
        let m = cradle_personalize::verify(&path, &cradle_personalize::Limits::default()).unwrap();
        assert_eq!(m.entries.len(), 2 + DIRS + 120 + 1);
        let mut names = Vec::new();
        let mut big = Vec::new();
        let gz = flate2::read::GzDecoder::new(File::open(&path).unwrap());
        let mut ar = tar::Archive::new(gz);
        for e in ar.entries().unwrap() {
            let mut e = e.unwrap();
            let p = e.path().unwrap().display().to_string();
            let h = e.header();
            assert_eq!((h.uid().unwrap(), h.gid().unwrap()), (0, 0));
            if p == BIG {
                e.read_to_end(&mut big).unwrap();
            }
            names.push(p);
        }
        // Directories before their files; 2 + 50 directories, 120 files, 1 big.
        assert_eq!(names.len(), 2 + DIRS + 120 + 1);
        assert_eq!(names[0], "etc/");
        assert_eq!(names[2], "etc/cradle/d00/");
        assert_eq!(names[3], "etc/cradle/d00/f0000.conf");
        for (i, n) in names.iter().enumerate() {
            if let Some(d) = n.strip_suffix(".conf").and_then(|f| f.rsplit_once('/')) {
                assert!(names[..i].contains(&format!("{}/", d.0)), "{n}");
            }
        }
        assert_eq!(big.len() as u64, pkg.big);
        let mut again = Vec::new();
        BigReader::new(pkg.big).read_to_end(&mut again).unwrap();
        assert_eq!(big, again);
        // Incompressible-ish: no 4 KiB run without a non-zero byte.
        assert!(big.chunks(4096).all(|c| c.iter().any(|b| *b != 0)));
        let c = Package::content(7);
        assert!((200..4096).contains(&c.len()));
        assert_eq!(c, Package::content(7));
        assert_eq!(pkg.last_dir_files(), ("etc/cradle/d49".into(), 2));
    }

    #[test]
    fn reads_debugfs_stat() {
        let stat = "Inode: 12   Type: regular    Mode:  0755   Flags: 0x80000\n\
                    User:     0   Group:     0   Project:     0   Size: 104857600\n";
        assert_eq!(stat_field(stat, "Mode").as_deref(), Some("0755"));
        assert_eq!(stat_field(stat, "Size").as_deref(), Some("104857600"));
    }
}
