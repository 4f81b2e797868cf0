//! `cargo xtask bench install`: an install job end to end, beside
//! libguestfs's bare appliance launch (`guestfish -a /dev/null run`).
//!
//! As root. The release `cradle serve` runs in a network namespace made
//! here, with the appliance `cradle appliance build` makes from Debian's
//! kernel, busybox and the static agent. The OS definition's untrusted
//! `create` mounts the instance's 64 MiB ext4 image, writes a file and
//! unmounts it; the personalization package (three files) is overlaid after.
//! Every run installs the same instance again and checks the result with
//! debugfs. Measured per run:
//!
//! - **first request**: the job's start to the appliance's first metadata
//!   request, as the job records it (`first_request_ms`);
//! - **install**: `cradle instance install --follow` from spawn to exit
//!   (the API call, the fence, the boot, the scripts, the package, the
//!   status, the power-off and the clean-up).
//!
//! Both with KVM when it works (the installer's own probe decides under
//! `accel = "auto"`) and with TCG; guestfish likewise (its probe is the
//! personalize benchmark's: KVM only if its kernel speaks under it).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::bench::{self, median};
use crate::bench_personalize::{Finished, ok, probe_guestfish, run_timed};
use crate::{debian, flags, target_dir};

const GUESTFISH: &str = "/usr/bin/guestfish";
/// The target for the first request, with KVM.
const FIRST_REQUEST_TARGET: f64 = 1.5;
const RUN_TIMEOUT: Duration = Duration::from_secs(900);

/// `--runs N` (5): the options of the benches that boot VMs (this one and
/// `bench agent`).
pub struct Options {
    pub(crate) runs: usize,
}

impl Options {
    pub fn parse(args: &[String]) -> Result<Options> {
        let mut o = Options { runs: 5 };
        for (flag, v) in flags::pairs(args)? {
            match flag {
                "--runs" => o.runs = flags::number(flag, v, 1)?,
                other => bail!("unknown option {other:?} (see `cargo xtask --help`)"),
            }
        }
        Ok(o)
    }
}

const CREATE: &str = "#!/bin/sh\nset -e\nmount -t ext4 \"$DISK_0_PATH\" /mnt\n\
echo \"installed by cradle for $INSTANCE_NAME\" > /mnt/installed\numount /mnt\n";

/// A namespace, deleted when dropped.
pub(crate) struct Netns(pub(crate) String);

impl Netns {
    /// A new namespace with `lo` up.
    pub(crate) fn new(tag: &str) -> Result<Netns> {
        let ns = Netns(format!("cradle-bench-{tag}-{}", std::process::id()));
        must(
            Command::new("ip").args(["netns", "add", &ns.0]),
            "ip netns add",
        )?;
        must(
            Command::new("ip").args(["-n", &ns.0, "link", "set", "lo", "up"]),
            "ip link set lo up",
        )?;
        Ok(ns)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// A `cradle serve`, stopped when dropped.
pub(crate) struct Serve(std::process::Child);

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        for _ in 0..200 {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub(crate) fn must(cmd: &mut Command, what: &str) -> Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {what}"))?;
    if !out.status.success() {
        bail!(
            "{what} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

struct Setup {
    bin: PathBuf,
    appliance: PathBuf,
    os: PathBuf,
    image: PathBuf,
    package: PathBuf,
}

/// One accelerator's runs: (first request s, install s) each.
struct Measured {
    accel: String,
    runs: Vec<(f64, f64)>,
}

fn start_serve(s: &Setup, ns: &str, data: &Path, accel: &str) -> Result<Serve> {
    spawn_serve(
        &s.bin,
        ns,
        data,
        &[
            ("CRADLE_INSTALL_APPLIANCE", s.appliance.as_os_str()),
            ("CRADLE_INSTALL_ACCEL", accel.as_ref()),
            ("CRADLE_INSTALL_MEMORY_MIB", "256".as_ref()),
            ("CRADLE_OS_SEARCH_PATH", s.os.as_os_str()),
            ("CRADLE_FIREWALL_ENABLED", "false".as_ref()),
        ],
    )
}

/// `bin serve` in the namespace `ns` with `data`, the admin API on
/// 127.0.0.1:8774 and the metadata service on 169.254.169.254:80, `env`
/// set; its log beside `data`. Returns once it listens.
pub(crate) fn spawn_serve(
    bin: &Path,
    ns: &str,
    data: &Path,
    env: &[(&str, &std::ffi::OsStr)],
) -> Result<Serve> {
    let log = std::fs::File::create(data.with_extension("log"))?;
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns])
        .arg(bin)
        .args(["serve", "--data-dir"])
        .arg(data)
        .args([
            "--admin-listen",
            "127.0.0.1:8774",
            "--metadata-listen",
            "169.254.169.254:80",
        ])
        .envs(env.iter().copied())
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .context("cannot start cradle serve")?;
    let out = child.stdout.take().expect("piped");
    let serve = Serve(child);
    use std::io::BufRead;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(out).lines().map_while(|l| l.ok()) {
            let _ = tx.send(line);
        }
    });
    crate::bench::wait_for_addresses(&rx, &data.with_extension("log"))?;
    Ok(serve)
}

/// `bin ARGS` in `ns`, against the serve of [`spawn_serve`] with `data`.
pub(crate) fn cli_in(bin: &Path, ns: &str, data: &Path, args: &[&str]) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns])
        .arg(bin)
        .args(args)
        .args(["--url", "http://127.0.0.1:8774", "--token-file"])
        .arg(data.join("admin.token"));
    c
}

fn cli(s: &Setup, ns: &str, data: &Path, args: &[&str]) -> Command {
    cli_in(&s.bin, ns, data, args)
}

fn measure(s: &Setup, tmp: &Path, accel: &str, runs: usize) -> Result<Measured> {
    let ns = Netns::new("install")?;
    let data = tmp.join(format!("data-{accel}"));
    let _serve = start_serve(s, &ns.0, &data, accel)?;
    must(
        &mut cli(
            s,
            &ns.0,
            &data,
            &[
                "instance",
                "add",
                "bench",
                "--os-type",
                "benchos",
                "--disk",
                s.image.to_str().unwrap(),
                "--personalization-url",
                &format!("file://{}", s.package.display()),
            ],
        ),
        "cradle instance add",
    )?;
    let mut m = Measured {
        accel: String::new(),
        runs: Vec::new(),
    };
    for run in 1..=runs {
        let mut c = cli(
            s,
            &ns.0,
            &data,
            &["instance", "install", "bench", "--follow"],
        );
        let log = tmp.join("install.log");
        let f = std::fs::File::create(&log)?;
        c.stdout(f.try_clone()?).stderr(f);
        let done: Finished = run_timed(c, RUN_TIMEOUT, || None)?;
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if !ok(&done) {
            bail!("install run {run} failed:\n{text}");
        }
        let job: serde_json::Value = serde_json::from_str(&must(
            &mut cli(
                s,
                &ns.0,
                &data,
                &["instance", "install-status", "bench", "-o", "json"],
            ),
            "cradle instance install-status",
        )?)?;
        let first = job["first_request_ms"]
            .as_u64()
            .context("the job saw no metadata request")? as f64
            / 1000.0;
        if m.accel.is_empty() {
            m.accel = text
                .lines()
                .find_map(|l| l.split("accelerator: ").nth(1))
                .unwrap_or("?")
                .to_string();
        }
        // The install did what it says.
        let installed = must(
            Command::new("debugfs")
                .args(["-R", "cat /installed"])
                .arg(&s.image),
            "debugfs",
        )?;
        let motd = must(
            Command::new("debugfs")
                .args(["-R", "cat /etc/motd"])
                .arg(&s.image),
            "debugfs",
        )?;
        if installed != "installed by cradle for bench\n" || motd != "personalized\n" {
            bail!("run {run}: the image does not hold what the install wrote");
        }
        println!(
            "    run {run}: first metadata request {:.3} s, install {:.3} s",
            first, done.secs
        );
        m.runs.push((first, done.secs));
    }
    Ok(m)
}

/// The release `cradle`, the static agent, and the appliance they build
/// in `tmp/appliance`.
pub(crate) fn build_appliance(tmp: &Path) -> Result<(PathBuf, PathBuf)> {
    let bin = bench::build_cradle()?;
    crate::ci::build_static_agent()?;
    let agent = target_dir().join("release/cradle-agent");
    println!("==> cradle appliance build");
    let appliance = tmp.join("appliance");
    let started = Instant::now();
    let out = must(
        Command::new(&bin)
            .args(["appliance", "build", "--agent"])
            .arg(&agent)
            .arg("-o")
            .arg(&appliance),
        "cradle appliance build",
    )?;
    for l in out.lines() {
        println!("    {l}");
    }
    println!("    built in {:.1} s", started.elapsed().as_secs_f64());
    Ok((bin, appliance))
}

fn setup(tmp: &Path) -> Result<Setup> {
    let (bin, appliance) = build_appliance(tmp)?;

    if ["mke2fs", "debugfs"]
        .iter()
        .any(|t| Command::new(t).arg("-V").output().is_err())
    {
        debian::ensure(&["e2fsprogs"], "the benchmark's image is ext4")?;
    }
    let os = tmp.join("os");
    let def = os.join("benchos");
    std::fs::create_dir_all(def.join("untrusted"))?;
    std::fs::write(def.join("ganeti_api_version"), "20\n")?;
    std::fs::write(def.join("untrusted/create"), CREATE)?;
    let pkg_src = tmp.join("pkg");
    std::fs::create_dir_all(pkg_src.join("etc"))?;
    std::fs::write(pkg_src.join("etc/motd"), "personalized\n")?;
    std::fs::write(pkg_src.join("etc/issue"), "cradle bench\n")?;
    std::fs::write(pkg_src.join("etc/hostname"), "bench\n")?;
    let package = tmp.join("pkg.tar.gz");
    must(
        Command::new("tar")
            .arg("-czf")
            .arg(&package)
            .arg("-C")
            .arg(&pkg_src)
            .arg("etc"),
        "tar",
    )?;
    let image = tmp.join("disk.img");
    must(
        Command::new("mke2fs")
            .args(["-q", "-F", "-t", "ext4"])
            .arg(&image)
            .arg("64M"),
        "mke2fs",
    )?;
    Ok(Setup {
        bin,
        appliance,
        os,
        image,
        package,
    })
}

pub fn run(o: Options) -> Result<()> {
    let tmp = tempfile::Builder::new()
        .prefix("cradle-bench-install-")
        .tempdir()?;
    let s = setup(tmp.path())?;

    // KVM when it works: the installer probes under "auto".
    println!("==> cradle: accel = auto (the installer's KVM probe)");
    let auto = measure(&s, tmp.path(), "auto", o.runs)?;
    println!("    accelerator: {}", auto.accel);
    println!(
        "    (run 1 of auto may include the installer's KVM probe, when serve had not finished it)"
    );
    let tcg = if auto.accel.starts_with("tcg") {
        println!("    (KVM does not run the appliance here: auto is TCG, measured once)");
        None
    } else {
        println!("==> cradle: accel = tcg");
        Some(measure(&s, tmp.path(), "tcg", o.runs)?)
    };

    println!("==> guestfish -a /dev/null run (LIBGUESTFS_BACKEND=direct)");
    let gf = probe_guestfish(&s.image, tmp.path()).map_err(anyhow::Error::msg)?;
    println!("    accelerator: {}", gf.accel);
    let mut launches = Vec::new();
    for run in 1..=o.runs {
        let mut c = Command::new(GUESTFISH);
        c.env("LIBGUESTFS_BACKEND", "direct")
            .args(["-a", "/dev/null", "run"])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if gf.force_tcg {
            c.env("LIBGUESTFS_BACKEND_SETTINGS", "force_tcg");
        }
        let f = run_timed(c, RUN_TIMEOUT, || None)?;
        if !ok(&f) {
            bail!("guestfish -a /dev/null run failed (run {run})");
        }
        println!("    run {run}: {:.3} s", f.secs);
        launches.push(f.secs);
    }
    let launch = median(launches);

    println!("==> results (medians of {} runs)", o.runs);
    println!(
        "    {:<28} {:>14} {:>12} {:>22}",
        "", "first request", "install", "install / guestfish run"
    );
    for m in std::iter::once(&auto).chain(tcg.as_ref()) {
        let first = median(m.runs.iter().map(|r| r.0).collect());
        let install = median(m.runs.iter().map(|r| r.1).collect());
        println!(
            "    {:<28} {:>12.3} s {:>10.3} s {:>21.2}×",
            format!("cradle ({})", m.accel.split(' ').next().unwrap_or("?")),
            first,
            install,
            install / launch
        );
        let kvm = m.accel.starts_with("kvm");
        println!(
            "      first request under {FIRST_REQUEST_TARGET} s with KVM: {}",
            if kvm {
                if first < FIRST_REQUEST_TARGET {
                    "met"
                } else {
                    "NOT met"
                }
            } else {
                "not measurable here (no working KVM)"
            }
        );
        println!(
            "      whole install under guestfish's bare launch: {}",
            if install < launch { "met" } else { "NOT met" }
        );
    }
    println!(
        "    {:<28} {:>14} {:>10.3} s",
        format!(
            "guestfish -a /dev/null run ({})",
            gf.accel.split(' ').next().unwrap_or("")
        ),
        "",
        launch
    );
    Ok(())
}
