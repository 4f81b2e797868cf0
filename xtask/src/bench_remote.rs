//! `cargo xtask bench remote`: copies to another host through
//! `cradle-remotefs`'s two drivers, against the bare `scp` and `rsync`
//! command lines an operator would type, in the same run.
//!
//! The other host is the testkit's sshd on 127.0.0.1 (the system's OpenSSH
//! server, logging in an unprivileged user), so the network is loopback and
//! what is measured is the tools and the drivers around them. Two source
//! files of `--size-mib` each are made in the system temporary directory, on
//! the same disk as the fixture: a dense one of pseudo-random bytes (from
//! xorshift, which neither compression nor `--sparse` can shrink) and a
//! sparse one (a hole with a few bytes at the start, the middle and the end).
//! Both are read once before anything is timed, so every contender finds
//! them in the page cache.
//!
//! Each run copies each file with, in this order:
//!
//! - the ssh driver (`copy_to` of `Transport::Ssh`, whatever it runs; at
//!   this writing, the file on ssh's standard input, written by a remote
//!   `cat` to a temporary file that is renamed into place);
//! - bare `scp` in its default SFTP mode (what an operator types), then
//!   bare `scp -O` (the original protocol): two peers for the one driver;
//! - the rsync driver (`copy_to` of `Transport::Rsync`: `rsync --sparse
//!   --copy-links --relative --ignore-existing` of a symlink in a temporary
//!   tree; the destination is always new here, so the listing and second
//!   pass it makes for an existing one never run);
//! - bare `rsync --sparse -e "ssh ..."`.
//!
//! The bare tools get the ssh options the drivers pass that can matter
//! (batch mode, port, user, known hosts, the one key, no compression), so
//! what differs is the driver's own work: the
//! temporary tree, spawning under tokio in a process group of its own,
//! reading the tool's output and polling its progress. A copy is timed from the `copy_to` call, or the
//! bare tool's spawn, to its end; it goes to a fresh name in the fixture's
//! home, where its length and allocated blocks are read, and its content is
//! compared with the source's in the first run. Then it is deleted and the
//! disks synced (not timed), so rsync never finds a file to delta against
//! and no copy's writeback lands in the next one's time. Nothing syncs a
//! copy while it is timed: every contender leaves its bytes in the page
//! cache alike.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use cradle_remotefs::testkit::Sshd;
use cradle_remotefs::{Host, Op, Remote, RemoteFilesystem, RemotePath, Settings, Transport};

use crate::bench::{self, XorShift, median, read_full, sync};
use crate::{debian, flags};

const SSHD: &str = "/usr/sbin/sshd";
const RSYNC: &str = "/usr/bin/rsync";
const SCP: &str = "/usr/bin/scp";
const HOST: &str = "127.0.0.1";
const MIB: u64 = 1024 * 1024;
/// Files are written, read and compared in chunks of this size.
const CHUNK: usize = 1024 * 1024;
/// The targets: each driver's throughput over its bare tool's, and
/// what a sparse copy through the rsync driver may allocate (of its size).
const TARGET_RATIO: f64 = 0.95;
const SPARSE_MAX: f64 = 0.01;

pub struct Options {
    size_mib: u64,
    runs: usize,
}

impl Options {
    pub fn parse(args: &[String]) -> Result<Options> {
        let mut o = Options {
            size_mib: 1024,
            runs: 3,
        };
        for (flag, v) in flags::pairs(args)? {
            match flag {
                "--size-mib" => o.size_mib = flags::number(flag, v, 1)? as u64,
                "--runs" => o.runs = flags::number(flag, v, 1)?,
                other => bail!("unknown option {other:?} (see `cargo xtask --help`)"),
            }
        }
        // The dense source and one copy of it are on disk at once.
        if o.size_mib > 16 * 1024 {
            bail!("--size-mib: at most 16384");
        }
        Ok(o)
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Dense,
    Sparse,
}

impl Kind {
    const ALL: [Kind; 2] = [Kind::Dense, Kind::Sparse];

    fn name(self) -> &'static str {
        match self {
            Kind::Dense => "dense",
            Kind::Sparse => "sparse",
        }
    }
}

/// Who copies, in the order they take turns.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Contender {
    SshDriver,
    Scp,
    ScpLegacy,
    RsyncDriver,
    Rsync,
}

impl Contender {
    const ALL: [Contender; 5] = [
        Contender::SshDriver,
        Contender::Scp,
        Contender::ScpLegacy,
        Contender::RsyncDriver,
        Contender::Rsync,
    ];

    fn name(self) -> &'static str {
        match self {
            Contender::SshDriver => "ssh driver",
            Contender::Scp => "scp",
            Contender::ScpLegacy => "scp -O",
            Contender::RsyncDriver => "rsync driver",
            Contender::Rsync => "rsync --sparse",
        }
    }

    /// A name for destination files.
    fn slug(self) -> &'static str {
        match self {
            Contender::SshDriver => "ssh-driver",
            Contender::Scp => "scp",
            Contender::ScpLegacy => "scp-O",
            Contender::RsyncDriver => "rsync-driver",
            Contender::Rsync => "rsync",
        }
    }
}

/// `size` bytes of pseudo-random data, written 1 MiB at a time.
fn make_dense(path: &Path, size: u64) -> Result<()> {
    let mut f = File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let mut rng = XorShift::new(1);
    let mut buf = vec![0u8; CHUNK];
    let mut left = size;
    while left > 0 {
        let n = left.min(CHUNK as u64) as usize;
        rng.fill(&mut buf[..n]);
        f.write_all(&buf[..n])?;
        left -= n as u64;
    }
    f.sync_all()?;
    Ok(())
}

/// A file of `size` bytes that is one hole but for a few bytes at the
/// start, in the middle and at the end.
fn make_sparse(path: &Path, size: u64) -> Result<()> {
    let mut f = File::create(path).with_context(|| format!("creating {}", path.display()))?;
    f.set_len(size)?;
    for (at, what) in [
        (0, &b"cradle sparse: start"[..]),
        (size / 2, b"cradle sparse: middle"),
        (size - 16, b"cradle: the end\n"),
    ] {
        f.seek(SeekFrom::Start(at))?;
        f.write_all(what)?;
    }
    f.sync_all()?;
    Ok(())
}

/// Read `path` through once (to warm the page cache).
fn read_through(path: &Path) -> Result<()> {
    let mut f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut buf = vec![0u8; CHUNK];
    while f.read(&mut buf)? > 0 {}
    Ok(())
}

/// Fail unless `a` and `b` hold the same bytes.
fn same_content(a: &Path, b: &Path) -> Result<()> {
    let mut fa = File::open(a).with_context(|| format!("opening {}", a.display()))?;
    let mut fb = File::open(b).with_context(|| format!("opening {}", b.display()))?;
    let (mut ba, mut bb) = (vec![0u8; CHUNK], vec![0u8; CHUNK]);
    let mut at: u64 = 0;
    loop {
        let na = read_full(&mut fa, &mut ba)?;
        let nb = read_full(&mut fb, &mut bb)?;
        if ba[..na] != bb[..nb] {
            let first = ba[..na]
                .iter()
                .zip(&bb[..nb])
                .position(|(x, y)| x != y)
                .unwrap_or(na.min(nb));
            bail!(
                "{} differs from {} at byte {}",
                b.display(),
                a.display(),
                at + first as u64
            );
        }
        if na == 0 {
            return Ok(());
        }
        at += na as u64;
    }
}

fn allocated(path: &Path) -> Result<u64> {
    let m = std::fs::metadata(path).with_context(|| format!("stat {}", path.display()))?;
    Ok(m.blocks() * 512)
}

/// The fixture's sshd and what the copies need to reach it.
struct Peer {
    sshd: Sshd,
    host: Host,
    ssh_driver: Remote,
    rsync_driver: Remote,
    /// `-o ... -i KEY` for the bare tools.
    ssh_args: Vec<String>,
}

impl Peer {
    fn start() -> Result<Peer> {
        let sshd = Sshd::start().context("starting the testkit's sshd")?;
        let settings = |transport| Settings {
            transport,
            user: Some(sshd.user().into()),
            port: sshd.port(),
            identity_file: Some(sshd.key()),
            known_hosts: Some(sshd.known_hosts()),
            ..Settings::default()
        };
        let ssh_driver = Remote::new(settings(Transport::Ssh))?;
        let rsync_driver = Remote::new(settings(Transport::Rsync))?;
        let mut ssh_args = Vec::new();
        for o in [
            "BatchMode=yes".to_string(),
            format!("Port={}", sshd.port()),
            format!("User={}", sshd.user()),
            format!("UserKnownHostsFile={}", sshd.known_hosts().display()),
            "IdentitiesOnly=yes".into(),
            "Compression=no".into(),
        ] {
            ssh_args.push("-o".to_string());
            ssh_args.push(o);
        }
        ssh_args.push("-i".into());
        ssh_args.push(sshd.key().display().to_string());
        // They are joined with spaces for rsync's -e.
        if let Some(a) = ssh_args
            .iter()
            .find(|a| a.contains(|c: char| c.is_whitespace() || "\"'\\".contains(c)))
        {
            bail!("{a:?}: the fixture's paths must not need quoting");
        }
        Ok(Peer {
            host: Host::parse(HOST)?,
            sshd,
            ssh_driver,
            rsync_driver,
            ssh_args,
        })
    }

    /// Copy `src` to `dst` (in the fixture's home) as `who` does; seconds.
    fn copy(
        &self,
        rt: &tokio::runtime::Runtime,
        who: Contender,
        src: &Path,
        dst: &Path,
    ) -> Result<f64> {
        let driver = match who {
            Contender::SshDriver => Some(&self.ssh_driver),
            Contender::RsyncDriver => Some(&self.rsync_driver),
            _ => None,
        };
        if let Some(fs) = driver {
            let to = RemotePath::new(dst.as_os_str())?;
            let op = Op::new();
            let started = Instant::now();
            rt.block_on(fs.copy_to(src, &self.host, &to, &op))
                .with_context(|| format!("{}: copy_to {}", who.name(), dst.display()))?;
            return Ok(started.elapsed().as_secs_f64());
        }
        let spec = format!("{HOST}:{}", dst.display());
        let mut cmd = match who {
            Contender::Scp | Contender::ScpLegacy => {
                let mut c = Command::new(SCP);
                c.args(&self.ssh_args);
                if who == Contender::ScpLegacy {
                    c.arg("-O");
                }
                c.arg(src).arg(&spec);
                c
            }
            _ => {
                let mut c = Command::new(RSYNC);
                c.arg("--sparse")
                    .arg("-e")
                    .arg(format!("ssh {}", self.ssh_args.join(" ")))
                    .arg(src)
                    .arg(&spec);
                c
            }
        };
        cmd.stdin(Stdio::null());
        let started = Instant::now();
        let out = cmd
            .output()
            .with_context(|| format!("cannot run {}", who.name()))?;
        let secs = started.elapsed().as_secs_f64();
        if !out.status.success() {
            bail!(
                "{} to {spec} failed ({}): {}",
                who.name(),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(secs)
    }
}

/// One copy: how long it took and what it allocated on the remote side.
struct Sample {
    kind: Kind,
    who: Contender,
    secs: f64,
    alloc: u64,
}

/// The medians of one contender's copies of one file.
struct Summary {
    secs: f64,
    mib_s: f64,
    alloc_mib: f64,
    alloc_max: u64,
}

fn summarize(samples: &[Sample], kind: Kind, who: Contender, size: u64) -> Summary {
    let mine: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.kind == kind && s.who == who)
        .collect();
    let mib = size as f64 / MIB as f64;
    Summary {
        secs: median(mine.iter().map(|s| s.secs).collect()),
        mib_s: median(mine.iter().map(|s| mib / s.secs).collect()),
        alloc_mib: median(mine.iter().map(|s| s.alloc as f64 / MIB as f64).collect()),
        alloc_max: mine.iter().map(|s| s.alloc).max().unwrap_or(0),
    }
}

fn print_header() {
    println!(
        "{:<16} {:>9} {:>9} {:>11}  driver/bare MiB/s",
        "contender", "seconds", "MiB/s", "remote MiB"
    );
}

fn print_row(who: Contender, s: &Summary, ratios: &str) {
    let row = format!(
        "{:<16} {:>9.3} {:>9.1} {:>11.1}  {ratios}",
        who.name(),
        s.secs,
        s.mib_s,
        s.alloc_mib,
    );
    println!("{}", row.trim_end());
}

/// The driver/bare throughput ratios printed on a driver's row.
fn pairs() -> [(Contender, Contender); 3] {
    [
        (Contender::SshDriver, Contender::Scp),
        (Contender::SshDriver, Contender::ScpLegacy),
        (Contender::RsyncDriver, Contender::Rsync),
    ]
}

pub fn run(o: Options) -> Result<()> {
    if !debian::is_root()? {
        bail!("the remote benchmark starts sshd and creates its test user: run it as root");
    }
    println!("==> sshd, ssh, scp and rsync");
    if [SSHD, SCP, RSYNC, "/usr/bin/ssh"]
        .iter()
        .any(|p| !Path::new(p).exists())
    {
        debian::ensure(
            &["openssh-server", "openssh-client", "rsync"],
            "the benchmark copies to a local sshd with scp and rsync",
        )?;
    }
    for p in [SSHD, SCP, RSYNC, "/usr/bin/ssh"] {
        if !Path::new(p).exists() {
            bail!("{p} is still missing after installing openssh and rsync");
        }
    }
    println!("    {}", bench::tool_version("ssh", "-V"));
    println!("    {}", bench::tool_version(RSYNC, "--version"));

    let size = o.size_mib * MIB;
    let tmp = tempfile::Builder::new()
        .prefix("cradle-bench-remote-")
        .tempdir()?;
    let sources: Vec<(Kind, PathBuf)> = Kind::ALL
        .iter()
        .map(|k| (*k, tmp.path().join(format!("{}.img", k.name()))))
        .collect();
    println!(
        "==> make a dense and a sparse file of {} MiB in {}",
        o.size_mib,
        tmp.path().display()
    );
    let started = Instant::now();
    for (kind, path) in &sources {
        match kind {
            Kind::Dense => make_dense(path, size)?,
            Kind::Sparse => make_sparse(path, size)?,
        }
        read_through(path)?;
        println!(
            "    {}: {:.1} MiB allocated",
            path.display(),
            allocated(path)? as f64 / MIB as f64
        );
    }
    println!(
        "    {:.1} s (made, synced and read once to warm the page cache)",
        started.elapsed().as_secs_f64()
    );

    println!("==> start sshd on {HOST} (the testkit's fixture)");
    let peer = Peer::start()?;
    let home = peer.sshd.home();
    println!(
        "    port {}, user {}, copies go to {}",
        peer.sshd.port(),
        peer.sshd.user(),
        home.display()
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;

    if let Ok(l) = std::fs::read_to_string("/proc/loadavg") {
        println!(
            "    load average before the runs: {} ({} CPUs)",
            l.split_whitespace().take(3).collect::<Vec<_>>().join(" "),
            std::thread::available_parallelism().map_or(0, |n| n.get())
        );
    }

    let mut samples: Vec<Sample> = Vec::new();
    for run in 1..=o.runs {
        for (kind, src) in &sources {
            println!(
                "==> run {run}/{}: {} file, {} MiB{}",
                o.runs,
                kind.name(),
                o.size_mib,
                if run == 1 { " (content checked)" } else { "" }
            );
            println!(
                "{:<16} {:>9} {:>9} {:>11}",
                "contender", "seconds", "MiB/s", "remote MiB"
            );
            for who in Contender::ALL {
                let dst = home.join(format!("{}-{}-run{run}.img", kind.name(), who.slug()));
                if dst.exists() {
                    bail!("{} exists before the copy", dst.display());
                }
                let secs = peer.copy(&rt, who, src, &dst).inspect_err(|_| {
                    eprintln!("sshd's log:\n{}", peer.sshd.log());
                })?;
                let meta = std::fs::metadata(&dst).with_context(|| {
                    format!(
                        "{} reported success but wrote no {}",
                        who.name(),
                        dst.display()
                    )
                })?;
                if meta.len() != size {
                    bail!(
                        "{}: {} is {} bytes; the source is {size}",
                        who.name(),
                        dst.display(),
                        meta.len()
                    );
                }
                let alloc = meta.blocks() * 512;
                if run == 1 {
                    same_content(src, &dst).with_context(|| who.name())?;
                }
                std::fs::remove_file(&dst)
                    .with_context(|| format!("removing {}", dst.display()))?;
                sync()?;
                println!(
                    "{:<16} {:>9.3} {:>9.1} {:>11.1}",
                    who.name(),
                    secs,
                    o.size_mib as f64 / secs,
                    alloc as f64 / MIB as f64
                );
                samples.push(Sample {
                    kind: *kind,
                    who,
                    secs,
                    alloc,
                });
            }
        }
    }
    drop(peer);

    println!();
    println!(
        "==> results: {} MiB per copy to {HOST} over ssh, {} run(s){}",
        o.size_mib,
        o.runs,
        if o.runs > 1 { " (medians)" } else { "" }
    );
    println!("    timed from copy_to or the tool's spawn to its end; remote MiB: blocks allocated");
    println!(
        "    scp: scp's default (SFTP); scp -O: the original protocol; the bare tools get \
         the drivers' ssh options"
    );
    let mut verdicts = Vec::new();
    for kind in Kind::ALL {
        println!();
        println!("{} ({} MiB)", kind.name(), o.size_mib);
        print_header();
        for who in Contender::ALL {
            let s = summarize(&samples, kind, who, size);
            let ratios: Vec<String> = pairs()
                .iter()
                .filter(|(driver, _)| *driver == who)
                .map(|(driver, bare)| {
                    let r = s.mib_s / summarize(&samples, kind, *bare, size).mib_s;
                    verdicts.push((kind, *driver, *bare, r));
                    format!("{r:.3} vs {}", bare.name())
                })
                .collect();
            print_row(who, &s, &ratios.join(", "));
        }
    }

    println!();
    println!("targets (from the issue; reported, not enforced):");
    let met = |ok: bool| if ok { "met" } else { "NOT met" };
    for (kind, driver, bare, r) in &verdicts {
        println!(
            "  {:<6} {} >= {TARGET_RATIO} x {} MiB/s: {r:.3} -> {}",
            kind.name(),
            driver.name(),
            bare.name(),
            met(*r >= TARGET_RATIO)
        );
    }
    let sparse = summarize(&samples, Kind::Sparse, Contender::RsyncDriver, size);
    let limit = size as f64 * SPARSE_MAX;
    println!(
        "  sparse stays sparse through the rsync driver (allocated < {:.0}% of {} MiB, \
         every run): at most {:.2} MiB -> {}",
        SPARSE_MAX * 100.0,
        o.size_mib,
        sparse.alloc_max as f64 / MIB as f64,
        met((sparse.alloc_max as f64) < limit)
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_options() {
        let args = |s: &str| s.split_whitespace().map(String::from).collect::<Vec<_>>();
        let o = Options::parse(&[]).unwrap();
        assert_eq!((o.size_mib, o.runs), (1024, 3));
        let o = Options::parse(&args("--size-mib 64 --runs 1")).unwrap();
        assert_eq!((o.size_mib, o.runs), (64, 1));
        assert!(Options::parse(&args("--size-mib 0")).is_err());
        assert!(Options::parse(&args("--size-mib 100000")).is_err());
        assert!(Options::parse(&args("--runs 0")).is_err());
        assert!(Options::parse(&args("--bogus 1")).is_err());
    }

    #[test]
    fn makes_and_compares_files() {
        let dir = tempfile::tempdir().unwrap();
        let (dense, sparse) = (dir.path().join("d"), dir.path().join("s"));
        make_dense(&dense, 3 * MIB).unwrap();
        make_sparse(&sparse, 3 * MIB).unwrap();
        assert_eq!(std::fs::metadata(&dense).unwrap().len(), 3 * MIB);
        assert_eq!(std::fs::metadata(&sparse).unwrap().len(), 3 * MIB);
        let bytes = std::fs::read(&dense).unwrap();
        // Pseudo-random: no run of zero bytes worth a hole.
        assert!(bytes.chunks(4096).all(|c| c.iter().any(|b| *b != 0)));
        same_content(&dense, &dense).unwrap();
        assert!(same_content(&dense, &sparse).is_err());
        let copy = dir.path().join("c");
        std::fs::copy(&sparse, &copy).unwrap();
        same_content(&sparse, &copy).unwrap();
    }
}
