//! The guest agent baked into a real Debian image and booted: a root tree
//! from Debian's packages (systemd, Debian's kernel, no openssh-server;
//! built by `cargo xtask guest-image`, which `cargo xtask ci` runs), made
//! into an ext4 image with `mke2fs -d`, baked with `cradle bake`, and
//! started in run mode with communication on (`cradle instance start`:
//! direct kernel boot, systemd as init, the fenced communication NIC) by a
//! `cradle serve` in a network namespace the test makes. What the guest
//! did is read back over the admin API, then with debugfs once the VM is
//! off.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::appliance::agent;
use crate::firewall::common::Netns;
use crate::harness::*;
use crate::install::mke2fs;

/// Where `cargo xtask guest-image` puts the tree (xtask/src/guest_image.rs):
/// `tree/`, `vmlinuz`, `initrd.img`.
pub fn guest_tree() -> PathBuf {
    // The version is guest_image.rs's VERSION.
    const TREE: &str = "guest-rootfs-2";
    ci_cache(&format!("{TREE}/initrd.img"), "guest-image");
    ci_cache(&format!("{TREE}/tree/etc/os-release"), "guest-image");
    ci_cache(TREE, "guest-image")
}

fn debugfs_cat(img: &Path, path: &str) -> String {
    let out = Command::new("debugfs")
        .arg("-R")
        .arg(format!("cat {path}"))
        .arg(img)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `sha256sum`'s digest of `p` (an optimized reader of 2 GiB images,
/// which this debug-built test binary is not).
pub fn sha256(p: &Path) -> String {
    let out = Command::new("sha256sum").arg(p).output().unwrap();
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

/// The configuration baked into the test's image: the test's user, quick
/// polls and heartbeats, three allowed actions.
const AGENT_CONFIG: &str = r#"
user = "debian"
poll = 1
heartbeat = 2
action_timeout = 30

[actions]
hello = ["/bin/sh", "-c", "echo hello from $(hostname), uid $(id -u)"]
keys = ["/bin/cat", "/home/debian/.ssh/authorized_keys"]
processes = ["/bin/sh", "-c", "cat /proc/[0-9]*/comm 2>/dev/null; true"]
poweroff = ["/bin/sh", "-c", "(sleep 2; systemctl poweroff) >/dev/null 2>&1 &"]
"#;

const ALICE: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAII8YXbZL7dcZ0XnNBF+a6VSFD42WTNtCZwsP+HMRa/7l alice";
const BOB: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFb7YOf6x2+jZZtntPkpOqyqDKVcY862LpfNBm7XO7SI bob";

#[test]
fn a_baked_debian_guest_reports_ready_takes_its_keys_publishes_host_keys_and_runs_only_allowed_actions()
 {
    let t0 = Instant::now();
    let say = |what: &str| eprintln!("[{:6.1} s] {what}", t0.elapsed().as_secs_f64());
    let tree = guest_tree();
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let img = w.join("debian.img");
    mke2fs(&tree.join("tree"), &img, "2G");
    assert!(
        debugfs_cat(&img, "/usr/sbin/sshd").is_empty(),
        "the image has no sshd"
    );
    let config = w.join("agent.toml");
    std::fs::write(&config, AGENT_CONFIG).unwrap();
    say("image made");

    // Baked, then baked again: the second bake writes nothing.
    let bake = |args: &[&str]| {
        Run::of(
            cradle_command()
                .arg("bake")
                .arg(&img)
                .arg("--agent")
                .arg(agent())
                .args(args),
        )
    };
    let first = bake(&["--config", config.to_str().unwrap()]).success();
    assert!(
        first.stdout.contains("/usr/local/bin/cradle-agent"),
        "{}",
        first.stdout
    );
    let baked = sha256(&img);
    let again = bake(&["--config", config.to_str().unwrap()]).success();
    assert!(again.stdout.contains("already baked"), "{}", again.stdout);
    assert_eq!(sha256(&img), baked, "baking twice gives the same image");
    assert_eq!(
        debugfs_cat(&img, "/etc/cradle/agent.toml"),
        AGENT_CONFIG,
        "the configuration is in the image"
    );

    say("baked");
    // The server, in a namespace of its own; the VM gets KVM when it works.
    let ns = Netns::new("agent");
    let appliance = crate::install::appliance().to_str().unwrap().to_string();
    let server = Server::start_with(Opts {
        data_dir: Some(&w.join("data")),
        netns: Some(&ns.name),
        admin_listen: Some("0.0.0.0:8774"),
        metadata_listen: Some("169.254.169.254:80"),
        log: Some("debug"),
        env: &[("CRADLE_INSTALL_APPLIANCE", &appliance)],
        ..Default::default()
    });
    let _vms = KillVms(w.join("data/run"));
    let cli = |args: &[&str]| Run::of(&mut server.cli(args));
    let kernel = tree.join("vmlinuz");
    let initrd = tree.join("initrd.img");
    cli(&[
        "instance",
        "add",
        "vm1",
        "--hostname",
        "agent-vm",
        "--key",
        &format!("alice={ALICE}"),
        "--disk",
        img.to_str().unwrap(),
        "--memory",
        "512",
        "--communication",
        "on",
        "--kernel",
        kernel.to_str().unwrap(),
        "--initrd",
        initrd.to_str().unwrap(),
        "--cmdline",
        "root=/dev/vda rw console=ttyS0 net.ifnames=0 quiet i8042.noaux i8042.nokbd no_timer_check",
    ])
    .success();
    let shown = cli(&["instance", "show", "vm1"]).success();
    assert!(
        shown.stdout.contains("communication      on"),
        "{}",
        shown.stdout
    );
    assert!(
        shown.stdout.contains("no agent has reported"),
        "{}",
        shown.stdout
    );
    say("server up");
    cli(&["instance", "start", "vm1"]).success();
    say("started");
    let tap = {
        let v = cli(&["instance", "show", "vm1", "-o", "json"])
            .success()
            .json();
        format!("crr{}", &v["id"].as_str().unwrap().replace('-', "")[..8])
    };

    // ready, with what the guest is.
    let booted = Instant::now();
    let agent_view = loop {
        let v = cli(&["instance", "show", "vm1", "-o", "json"])
            .success()
            .json();
        if v["agent"]["state"] == "ready" {
            break v["agent"].clone();
        }
        if booted.elapsed() > Duration::from_secs(300) {
            let console = cli(&["instance", "console", "vm1"]).stdout;
            panic!("no ready from the agent in 300 s: {v}\nconsole:\n{console}");
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    eprintln!(
        "agent ready {:.1} s after start",
        booted.elapsed().as_secs_f64()
    );
    assert!(
        agent_view["os_release"]
            .as_str()
            .unwrap()
            .contains("Debian GNU/Linux 12"),
        "{agent_view}"
    );
    assert!(
        agent_view["kernel"]
            .as_str()
            .unwrap()
            .starts_with("Linux 6."),
        "{agent_view}"
    );
    assert_eq!(agent_view["version"], env!("CARGO_PKG_VERSION"));
    let status = cli(&["instance", "status", "vm1"]).success();
    assert!(
        status.stdout.contains("agent ready since"),
        "{}",
        status.stdout
    );

    // An allowed action runs once and answers; the hostname is the instance's.
    let hello = cli(&["instance", "run", "vm1", "hello"]).success();
    assert_eq!(hello.stdout, "hello from agent-vm, uid 0\n");
    let keys = cli(&["instance", "run", "vm1", "keys"]).success();
    assert!(keys.stdout.contains(ALICE), "{}", keys.stdout);
    assert!(!keys.stdout.contains(BOB), "{}", keys.stdout);
    // One that is not allowed is refused, and recorded.
    cli(&["instance", "run", "vm1", "reboot"]).fails_with(&["the agent refused action reboot"]);
    let events = cli(&["instance", "events", "vm1"]).success().stdout;
    assert!(events.contains("action hello"), "{events}");
    assert!(events.contains("exited 0"), "{events}");
    assert!(
        events.contains("action reboot") && events.contains("refused by the agent"),
        "{events}"
    );
    assert!(
        events.contains("host keys published: ssh-ed25519 SHA256:"),
        "{events}"
    );

    say("actions answered");
    // A key added on the host lands in the guest without a reboot.
    cli(&["instance", "modify", "vm1", "--key", &format!("bob={BOB}")]).success();
    let t = Instant::now();
    loop {
        let keys = cli(&["instance", "run", "vm1", "keys"]).success();
        if keys.stdout.contains(BOB) {
            assert!(keys.stdout.contains(ALICE));
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "bob's key never landed: {}",
            keys.stdout
        );
        std::thread::sleep(Duration::from_secs(1));
    }

    // Nothing listens: no sshd ran, and the fence saw nothing but requests
    // to the metadata port.
    let procs = cli(&["instance", "run", "vm1", "processes"])
        .success()
        .stdout;
    assert!(procs.lines().any(|l| l == "cradle-agent"), "{procs}");
    assert!(procs.lines().any(|l| l == "systemd"), "{procs}");
    assert!(!procs.lines().any(|l| l.starts_with("sshd")), "{procs}");
    let (accepted, dropped) = fence_counters(&ns, &tap);
    assert!(
        accepted > 0,
        "the fence counted no request to the metadata port"
    );
    assert_eq!(
        dropped, 0,
        "the guest sent something else than metadata requests"
    );

    // Host keys, as known_hosts lines and fingerprints.
    let known = cli(&["instance", "host-keys", "vm1"]).success().stdout;
    let line = known.lines().next().unwrap().to_string();
    assert!(line.starts_with("agent-vm,vm1 ssh-ed25519 AAAA"), "{known}");
    let fingerprints = cli(&["instance", "host-keys", "vm1", "--fingerprints"])
        .success()
        .stdout;

    // The guest powers itself off when asked (an allowed action), so that
    // its filesystem is clean for debugfs; then the host records it.
    say("key landed, fence checked");
    cli(&["instance", "run", "vm1", "poweroff"]).success();
    let t = Instant::now();
    while !cli(&["instance", "status", "vm1"])
        .success()
        .stdout
        .contains("vm stopped")
    {
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "the guest did not power off"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    say("powered off");
    cli(&["instance", "stop", "vm1", "--grace", "1"]).success();
    // Off: the fence is gone, and the image tells what the guest wrote.
    let tables = String::from_utf8_lossy(
        &ns.command("nft")
            .args(["list", "tables"])
            .output()
            .unwrap()
            .stdout,
    )
    .into_owned();
    assert!(!tables.contains(&tap), "{tables}");
    assert_eq!(debugfs_cat(&img, "/etc/hostname"), "agent-vm\n");
    let on_disk = debugfs_cat(&img, "/home/debian/.ssh/authorized_keys");
    assert!(
        on_disk.contains(ALICE) && on_disk.contains(BOB),
        "{on_disk}"
    );
    let pubkey = debugfs_cat(&img, "/etc/ssh/ssh_host_ed25519_key.pub");
    let words: Vec<&str> = pubkey.split_whitespace().collect();
    assert_eq!(
        line.split_whitespace().nth(2),
        words.get(1).copied(),
        "{pubkey}"
    );
    // ssh-keygen's fingerprint of the guest's file is the one cradle shows.
    let pubfile = w.join("host.pub");
    std::fs::write(&pubfile, &pubkey).unwrap();
    let keygen = Command::new("ssh-keygen")
        .arg("-lf")
        .arg(&pubfile)
        .output()
        .unwrap();
    let fp = String::from_utf8_lossy(&keygen.stdout);
    let fp = fp.split_whitespace().nth(1).unwrap();
    assert_eq!(fingerprints.trim(), format!("ssh-ed25519 {fp}"));
    // Every action sent is recorded once in the guest, before it ran.
    let done = debugfs_cat(&img, "/var/lib/cradle-agent/actions.done");
    let ids: std::collections::BTreeSet<&str> = done.lines().collect();
    let events = cli(&["instance", "events", "vm1"]).success().stdout;
    let sent = events.lines().filter(|l| l.contains(") sent")).count();
    assert_eq!(ids.len(), done.lines().count(), "an id ran twice: {done}");
    assert_eq!(ids.len(), sent, "{done}\n{events}");
}

/// Kills the VMs of the run directory `0` when dropped: they are
/// daemonized, and would outlive a test that fails.
struct KillVms(PathBuf);

impl Drop for KillVms {
    fn drop(&mut self) {
        let dirs = std::fs::read_dir(&self.0).into_iter().flatten().flatten();
        for pid in dirs.filter_map(|d| std::fs::read_to_string(d.path().join("pid")).ok()) {
            let _ = Command::new("kill").args(["-9", pid.trim()]).status();
        }
    }
}

/// The communication fence's counters for `tap`: what it let through to
/// the metadata port, and what it dropped.
fn fence_counters(ns: &Netns, tap: &str) -> (u64, u64) {
    crate::install::fence_counts(&ns.nft(), &format!("cradle_comm_{tap}"))
}
