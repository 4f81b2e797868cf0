//! `cargo xtask bench agent`: how soon a baked guest is ready, beside
//! cloud-init.
//!
//! As root. Two copies of the same Debian root tree (`cargo xtask
//! guest-image`, and its `--cloud-init` twin with Debian's cloud-init),
//! each made into an ext4 image; the first is baked with the agent
//! (`cradle bake`), the second gets the instance's config drive (`cradle
//! drive build`) as its second disk, cloud-init's ConfigDrive datasource.
//! Both boot the same way: `cradle instance start` (run mode, direct
//! kernel boot with Debian's kernel, systemd as init, communication on,
//! KVM when the installer's probe says it works) from a release `cradle
//! serve` in a namespace made here, each boot from a fresh copy of its
//! image (first boot every time, as for a new instance). Measured from the
//! start request:
//!
//! - **agent ready**: until the admin API shows the agent `ready`;
//! - **cloud-init done**: until the console shows `CLOUD-INIT-DONE status:
//!   done`, which a unit prints when `cloud-init status --wait` returns
//!   (an error status never counts).
//!
//! Also the agent's binary size and its resident memory in the guest (read
//! by an allowed action). Target: ready within 0.3× cloud-init's time,
//! under 10 MiB resident.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::bench::median;
use crate::bench_install::{Netns, cli_in, must, spawn_serve};
use crate::target_dir;

const RATIO_TARGET: f64 = 0.3;
const RSS_TARGET_KIB: u64 = 10 * 1024;
const BOOT_TIMEOUT: Duration = Duration::from_secs(600);

pub use crate::bench_install::Options;

const AGENT_CONFIG: &str = r#"user = "debian"
poll = 5
[actions]
rss = ["/bin/sh", "-c", "for p in /proc/[0-9]*; do [ \"$(cat $p/comm)\" = cradle-agent ] && grep VmRSS $p/status; done; true"]
"#;

/// Both VMs' kernel command line: a VM needs no PS/2 probing or timer
/// check (each costs a second or more under TCG).
const CMDLINE: &str =
    "root=/dev/vda rw console=ttyS0 net.ifnames=0 quiet i8042.noaux i8042.nokbd no_timer_check";

struct Lab {
    bin: PathBuf,
    ns: Netns,
    data: PathBuf,
    _serve: crate::bench_install::Serve,
}

impl Lab {
    fn cli(&self, args: &[&str]) -> Result<String> {
        must(
            &mut cli_in(&self.bin, &self.ns.0, &self.data, args),
            &format!("cradle {}", args.join(" ")),
        )
    }

    fn json(&self, args: &[&str]) -> Result<serde_json::Value> {
        let mut a = args.to_vec();
        a.extend(["-o", "json"]);
        Ok(serde_json::from_str(&self.cli(&a)?)?)
    }
}

/// `mke2fs -d TREE IMG 2G`.
fn image_of(tree: &Path, img: &Path) -> Result<()> {
    must(
        Command::new("mke2fs")
            .args(["-q", "-F", "-t", "ext4", "-d"])
            .arg(tree)
            .arg(img)
            .arg("2G"),
        "mke2fs",
    )
    .map(|_| ())
}

fn fresh_copy(from: &Path, to: &Path) -> Result<()> {
    must(
        Command::new("cp").arg("--sparse=always").arg(from).arg(to),
        "cp",
    )
    .map(|_| ())
}

/// Boot `name` from a fresh copy of `image` and time it until `done`
/// says so; then kill the VM.
fn boot(
    lab: &Lab,
    name: &str,
    image: &Path,
    disk: &Path,
    done: &dyn Fn(&Lab) -> Result<bool>,
) -> Result<f64> {
    fresh_copy(image, disk)?;
    let t = Instant::now();
    lab.cli(&["instance", "start", name])?;
    loop {
        if done(lab)? {
            break;
        }
        if t.elapsed() > BOOT_TIMEOUT {
            let console = lab.cli(&["instance", "console", name]).unwrap_or_default();
            bail!(
                "{name} was not done within {} s; console:\n{console}",
                BOOT_TIMEOUT.as_secs()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let secs = t.elapsed().as_secs_f64();
    lab.cli(&["instance", "stop", name, "--force"])?;
    Ok(secs)
}

pub fn run(o: Options) -> Result<()> {
    if !crate::debian::is_root()? {
        bail!("bench agent boots VMs on taps in a namespace: run it as root");
    }
    let agent_tree = crate::guest_image::ensure(false)?;
    let cloud_tree = crate::guest_image::ensure(true)?;
    let bin = crate::bench::build_cradle()?;
    crate::ci::build_static_agent()?;
    let agent = target_dir().join("release/cradle-agent");
    let tmp = tempfile::Builder::new()
        .prefix("cradle-bench-agent-")
        .tempdir()?;
    let t = tmp.path();

    println!("==> images");
    let appliance = t.join("appliance");
    must(
        Command::new(&bin)
            .args(["appliance", "build", "--agent"])
            .arg(&agent)
            .arg("-o")
            .arg(&appliance),
        "cradle appliance build",
    )?;
    let baked = t.join("baked.img");
    image_of(&agent_tree.join("tree"), &baked)?;
    let config = t.join("agent.toml");
    std::fs::write(&config, AGENT_CONFIG)?;
    must(
        Command::new(&bin)
            .arg("bake")
            .arg(&baked)
            .arg("--agent")
            .arg(&agent)
            .arg("--config")
            .arg(&config),
        "cradle bake",
    )?;
    let cloud = t.join("cloud-init.img");
    image_of(&cloud_tree.join("tree"), &cloud)?;

    let ns = Netns::new("agent")?;
    // Each VM's own NIC (the instance's MAC, which the config drive's
    // network_data.json names), beside the communication NIC.
    for tap in ["cbagent0", "cbcloud0"] {
        must(
            Command::new("ip").args(["-n", &ns.0, "tuntap", "add", "dev", tap, "mode", "tap"]),
            "ip tuntap add",
        )?;
        must(
            Command::new("ip").args(["-n", &ns.0, "link", "set", tap, "up"]),
            "ip link set up",
        )?;
    }
    let data = t.join("data");
    let serve = spawn_serve(
        &bin,
        &ns.0,
        &data,
        &[("CRADLE_INSTALL_APPLIANCE", appliance.as_os_str())],
    )?;
    let lab = Lab {
        bin,
        ns,
        data,
        _serve: serve,
    };
    let key = "alice=ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAII8YXbZL7dcZ0XnNBF+a6VSFD42WTNtCZwsP+HMRa/7l alice";
    let (agent_disk, cloud_disk, drive) = (
        t.join("agent-run.img"),
        t.join("cloud-run.img"),
        t.join("config-2.iso"),
    );
    for (name, disk, kernel_dir, tap) in [
        ("baked", &agent_disk, &agent_tree, "cbagent0"),
        ("cloudinit", &cloud_disk, &cloud_tree, "cbcloud0"),
    ] {
        let (k, i) = (kernel_dir.join("vmlinuz"), kernel_dir.join("initrd.img"));
        let mut args = vec![
            "instance",
            "add",
            name,
            "--hostname",
            name,
            "--key",
            key,
            "--disk",
            disk.to_str().unwrap(),
            "--memory",
            "512",
            "--communication",
            "on",
            "--kernel",
            k.to_str().unwrap(),
            "--initrd",
            i.to_str().unwrap(),
            "--cmdline",
            CMDLINE,
            "--interface",
            tap,
        ];
        if name == "cloudinit" {
            args.extend(["--disk", drive.to_str().unwrap()]);
        }
        lab.cli(&args)?;
    }
    lab.cli(&["drive", "build", "cloudinit", "-o", drive.to_str().unwrap()])?;

    let since = |lab: &Lab| -> Result<Option<String>> {
        let v = lab.json(&["instance", "show", "baked"])?;
        Ok(v["agent"]["since"].as_str().map(str::to_string))
    };
    let cloud_done = |lab: &Lab| -> Result<bool> {
        Ok(lab
            .cli(&["instance", "console", "cloudinit"])?
            .contains("CLOUD-INIT-DONE status: done"))
    };
    let (mut ready, mut done, mut rss) = (Vec::new(), Vec::new(), Vec::new());
    for run in 1..=o.runs {
        // The agent's record outlives a boot: this boot's `ready` is the
        // one whose `since` is new (it reports `booting` first).
        let before = since(&lab)?;
        let r = boot(&lab, "baked", &baked, &agent_disk, &|lab| {
            let v = lab.json(&["instance", "show", "baked"])?;
            Ok(v["agent"]["state"] == "ready"
                && v["agent"]["since"].as_str().map(str::to_string) != before)
        })?;
        ready.push(r);
        let c = boot(&lab, "cloudinit", &cloud, &cloud_disk, &cloud_done)?;
        done.push(c);
        println!("    run {run}: agent ready {r:.2} s, cloud-init done {c:.2} s");
        if run == 1 {
            // Resident memory, once, from a boot that stays up a little.
            fresh_copy(&baked, &agent_disk)?;
            let before = since(&lab)?;
            lab.cli(&["instance", "start", "baked"])?;
            let t = Instant::now();
            while since(&lab)? == before
                || lab.json(&["instance", "show", "baked"])?["agent"]["state"] != "ready"
            {
                if t.elapsed() > BOOT_TIMEOUT {
                    bail!("the agent never got ready for the memory reading");
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            std::thread::sleep(Duration::from_secs(10));
            let out = lab.cli(&["instance", "run", "baked", "rss"])?;
            let kib: u64 = out
                .split_whitespace()
                .nth(1)
                .and_then(|v| v.parse().ok())
                .with_context(|| format!("no VmRSS in {out:?}"))?;
            rss.push(kib);
            lab.cli(&["instance", "stop", "baked", "--force"])?;
        }
    }
    let (r, c) = (median(ready), median(done));
    let size = std::fs::metadata(&agent)?.len();
    println!("==> results (median of {} boots each)", o.runs);
    println!("    agent ready      {r:.2} s");
    println!("    cloud-init done  {c:.2} s");
    println!(
        "    ratio            {:.2} (target <= {RATIO_TARGET})",
        r / c
    );
    println!(
        "    agent binary     {:.1} MiB (static, stripped)",
        size as f64 / (1 << 20) as f64
    );
    let kib = rss.first().copied().unwrap_or(0);
    println!(
        "    agent resident   {:.1} MiB (target < {} MiB)",
        kib as f64 / 1024.0,
        RSS_TARGET_KIB / 1024
    );
    let accel = lab
        .cli(&["instance", "events", "baked"])?
        .lines()
        .rev()
        .find_map(|l| {
            l.split("started (")
                .nth(1)
                .map(|a| a.trim_end_matches(')').to_string())
        })
        .unwrap_or_else(|| "?".into());
    println!("    accelerator      {accel}");
    Ok(())
}
