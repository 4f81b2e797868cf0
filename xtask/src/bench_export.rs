//! `cargo xtask bench export`: a 1 GiB ext4 disk exported and imported
//! through the install appliance, beside `qemu-img convert` of the same
//! disk on the host, in the same run.
//!
//! As root. The release `cradle serve` runs in a network namespace made
//! here (as `bench install` does), with the appliance under TCG (the
//! issue's condition; `--accel auto` tries KVM). The OS definition's
//! untrusted `export` is `dd if=$EXPORT_DEVICE bs=1M` and its `import`
//! `dd of=$IMPORT_DEVICE bs=1M`: the dump goes from the appliance's
//! virtio disk through the script's pipe, the agent (SHA-256 as it
//! sends), the tap and the metadata service's stream to the CLI, which
//! writes it to a file beside its `.sha256`; an import goes back the same
//! way into a second instance's fresh disk. The disk's filesystem is
//! three quarters full of random data, so that neither side can skip
//! zeros for most of it. Each run checks the dump and the imported disk
//! against the original's SHA-256. Measured per run:
//!
//! - **export** and **import**: `cradle instance export|import` from spawn
//!   to exit (the appliance's boot, the copy, its power-off, the clean-up),
//!   and the copy alone (the job's first metadata request to its end);
//! - **qemu-img convert** `-f raw -O raw` of the same disk to a new file.
//!
//! MiB/s is the disk's 1024 MiB over each time; the ratios are cradle's
//! MiB/s over qemu-img's.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::bench::median;
use crate::bench_install::{Netns, cli_in, must, spawn_serve};
use crate::bench_personalize::{ok, run_timed};
use crate::{debian, flags};

const EXPORT: &str = "#!/bin/sh\nexec dd if=\"$EXPORT_DEVICE\" bs=1M 2>/dev/null\n";
const IMPORT: &str = "#!/bin/sh\ndd of=\"$IMPORT_DEVICE\" bs=1M 2>/dev/null && sync\n";
const DISK_MIB: u64 = 1024;
const RUN_TIMEOUT: Duration = Duration::from_secs(3600);
/// The target: cradle's MiB/s over qemu-img convert's.
const TARGET: f64 = 0.5;

pub struct Options {
    runs: usize,
    accel: String,
}

impl Options {
    pub fn parse(args: &[String]) -> Result<Options> {
        let mut o = Options {
            runs: 3,
            accel: "tcg".into(),
        };
        for (flag, v) in flags::pairs(args)? {
            match flag {
                "--runs" => o.runs = flags::number(flag, v, 1)?,
                "--accel" => match v {
                    "tcg" | "kvm" | "auto" => o.accel = v.to_string(),
                    other => bail!("--accel is tcg, kvm or auto, not {other:?}"),
                },
                other => bail!("unknown option {other:?} (see `cargo xtask --help`)"),
            }
        }
        Ok(o)
    }
}

fn sha256(path: &Path) -> Result<String> {
    let out = must(Command::new("sha256sum").arg(path), "sha256sum")?;
    Ok(out.split_whitespace().next().unwrap_or("").to_string())
}

/// A 1 GiB ext4 image, three quarters full of random files.
fn make_disk(tmp: &Path) -> Result<PathBuf> {
    let seed = tmp.join("seed");
    std::fs::create_dir_all(&seed)?;
    println!("==> a {DISK_MIB} MiB ext4 disk, 768 MiB of it random files");
    let started = Instant::now();
    for n in 0..12 {
        must(
            Command::new("head")
                .args(["-c", &(64u64 << 20).to_string(), "/dev/urandom"])
                .stdout(std::fs::File::create(seed.join(format!("blob{n}")))?),
            "head /dev/urandom",
        )?;
    }
    let image = tmp.join("disk.img");
    must(
        Command::new("mke2fs")
            .args(["-q", "-F", "-t", "ext4", "-d"])
            .arg(&seed)
            .arg(&image)
            .arg(format!("{DISK_MIB}M")),
        "mke2fs",
    )?;
    std::fs::remove_dir_all(&seed)?;
    println!("    made in {:.1} s", started.elapsed().as_secs_f64());
    Ok(image)
}

/// One run's times, in seconds.
struct Run {
    export: f64,
    export_copy: f64,
    import: f64,
    import_copy: f64,
    convert: f64,
}

/// The whole job's time less the boot: from its first metadata request to
/// its end, as the job records them.
fn copy_secs(job: &serde_json::Value) -> Result<f64> {
    let first = job["first_request_ms"]
        .as_u64()
        .context("the job saw no metadata request")?;
    let total = job["elapsed_ms"].as_u64().context("no elapsed_ms")?;
    Ok(total.saturating_sub(first) as f64 / 1000.0)
}

pub fn run(o: Options) -> Result<()> {
    let tmp = tempfile::Builder::new()
        .prefix("cradle-bench-export-")
        .tempdir_in("/var/tmp")?;
    let tmp = tmp.path();
    if ["mke2fs", "debugfs"]
        .iter()
        .any(|t| Command::new(t).arg("-V").output().is_err())
    {
        debian::ensure(&["e2fsprogs"], "the benchmark's disk is ext4")?;
    }
    if Command::new("qemu-img").arg("--version").output().is_err() {
        debian::ensure(&["qemu-utils"], "qemu-img convert is the peer")?;
    }
    let (bin, appliance) = crate::bench_install::build_appliance(tmp)?;
    let os = tmp.join("os");
    let def = os.join("dumpos");
    std::fs::create_dir_all(def.join("untrusted"))?;
    std::fs::write(def.join("ganeti_api_version"), "20\n")?;
    std::fs::write(def.join("untrusted/create"), "#!/bin/sh\n")?;
    std::fs::write(def.join("untrusted/export"), EXPORT)?;
    std::fs::write(def.join("untrusted/import"), IMPORT)?;
    let image = make_disk(tmp)?;
    let want = sha256(&image)?;
    let target = tmp.join("target.img");

    let ns = Netns::new("export")?;
    let data = tmp.join("data");
    let timeout = RUN_TIMEOUT.as_secs().to_string();
    let _serve = spawn_serve(
        &bin,
        &ns.0,
        &data,
        &[
            ("CRADLE_INSTALL_APPLIANCE", appliance.as_os_str()),
            ("CRADLE_INSTALL_ACCEL", o.accel.as_ref()),
            ("CRADLE_INSTALL_MEMORY_MIB", "256".as_ref()),
            ("CRADLE_INSTALL_TIMEOUT", timeout.as_ref()),
            ("CRADLE_OS_SEARCH_PATH", os.as_os_str()),
            ("CRADLE_FIREWALL_ENABLED", "false".as_ref()),
        ],
    )?;
    let cli = |args: &[&str]| cli_in(&bin, &ns.0, &data, args);
    for (name, disk) in [("source", &image), ("target", &target)] {
        if name == "target" {
            std::fs::File::create(disk)?.set_len(DISK_MIB << 20)?;
        }
        let disk = format!("{}:raw", disk.display());
        must(
            &mut cli(&[
                "instance",
                "add",
                name,
                "--os-type",
                "dumpos",
                "--disk",
                &disk,
            ]),
            "cradle instance add",
        )?;
    }
    let job = |name: &str| -> Result<serde_json::Value> {
        Ok(serde_json::from_str(&must(
            &mut cli(&["instance", "job-status", name, "-o", "json"]),
            "cradle instance job-status",
        )?)?)
    };
    let timed = |args: &[&str], what: &str| -> Result<f64> {
        let log = tmp.join("cli.log");
        let f = std::fs::File::create(&log)?;
        let mut c = cli(args);
        c.stdout(f.try_clone()?).stderr(f);
        let done = run_timed(c, RUN_TIMEOUT, || None)?;
        if !ok(&done) {
            bail!(
                "{what} failed:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        Ok(done.secs)
    };

    let dump = tmp.join("disk.dump");
    let converted = tmp.join("converted.img");
    let mut runs = Vec::new();
    for n in 1..=o.runs {
        let _ = std::fs::remove_file(&dump);
        let export = timed(
            &["instance", "export", "source", dump.to_str().unwrap()],
            "cradle instance export",
        )?;
        let export_copy = copy_secs(&job("source")?)?;
        if sha256(&dump)? != want {
            bail!("run {n}: the dump is not the disk");
        }
        // A fresh target each time: nothing of the last run to find.
        std::fs::File::create(&target)?.set_len(DISK_MIB << 20)?;
        let import = timed(
            &["instance", "import", "target", dump.to_str().unwrap()],
            "cradle instance import",
        )?;
        let import_copy = copy_secs(&job("target")?)?;
        if sha256(&target)? != want {
            bail!("run {n}: the imported disk is not the original");
        }
        let _ = std::fs::remove_file(&converted);
        let started = Instant::now();
        must(
            Command::new("qemu-img")
                .args(["convert", "-f", "raw", "-O", "raw"])
                .arg(&image)
                .arg(&converted),
            "qemu-img convert",
        )?;
        // What qemu-img wrote is on the disk, as cradle's file is once the
        // CLI has synced it.
        must(Command::new("sync").arg(&converted), "sync")?;
        let convert = started.elapsed().as_secs_f64();
        if sha256(&converted)? != want {
            bail!("run {n}: qemu-img's copy is not the disk");
        }
        println!(
            "    run {n}: export {export:.1} s (copy {export_copy:.1} s), import {import:.1} s \
             (copy {import_copy:.1} s), qemu-img convert {convert:.1} s"
        );
        runs.push(Run {
            export,
            export_copy,
            import,
            import_copy,
            convert,
        });
    }
    let m = |f: fn(&Run) -> f64| median(runs.iter().map(f).collect());
    let mib = |s: f64| DISK_MIB as f64 / s;
    let convert = mib(m(|r| r.convert));
    println!(
        "==> results: {DISK_MIB} MiB, medians of {} runs, appliance accel {}",
        o.runs, o.accel
    );
    println!(
        "    {:<34} {:>10} {:>10} {:>18}",
        "", "seconds", "MiB/s", "÷ qemu-img convert"
    );
    for (what, secs) in [
        ("export (whole command)", m(|r| r.export)),
        ("export (copy, boot excluded)", m(|r| r.export_copy)),
        ("import (whole command)", m(|r| r.import)),
        ("import (copy, boot excluded)", m(|r| r.import_copy)),
        ("qemu-img convert (host)", m(|r| r.convert)),
    ] {
        println!(
            "    {what:<34} {secs:>10.1} {:>10.1} {:>17.2}×",
            mib(secs),
            mib(secs) / convert
        );
    }
    let whole = mib(m(|r| r.export)).min(mib(m(|r| r.import))) / convert;
    println!(
        "    target ≥ {TARGET}× qemu-img convert (whole commands, the slower of export and \
         import): {}",
        if whole >= TARGET { "met" } else { "NOT met" }
    );
    Ok(())
}
