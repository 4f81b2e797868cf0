//! Install jobs for real: `cradle serve` runs inside a network namespace the
//! test makes, with the appliance `cradle appliance build` made from
//! Debian's kernel and busybox and the static agent; every install boots it
//! under QEMU (TCG) with a disk image the test made with mke2fs, on a tap
//! cradle makes in that namespace. What the scripts wrote is read back with
//! debugfs, never mounted on the host.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use crate::firewall::common::Netns;
use serde_json::Value;

use crate::appliance::agent;
use crate::harness::*;

/// The appliance, built once per test run.
pub(crate) fn appliance() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = tempfile::Builder::new()
            .prefix("cradle-it-appliance-")
            .tempdir()
            .unwrap()
            .keep();
        Run::of(
            cradle_command()
                .args(["appliance", "build", "--agent"])
                .arg(agent())
                .arg("-o")
                .arg(&dir),
        )
        .success();
        dir
    })
}

pub(crate) fn write(p: &Path, text: &str, mode: u32) {
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, text).unwrap();
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

pub(crate) fn chmod(p: &Path, mode: u32) {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// A 32 MiB ext4 image holding `seed` (made with `mke2fs -d`).
pub(crate) fn ext4_image(work: &Path, name: &str) -> PathBuf {
    let seed = work.join(format!("{name}-seed"));
    write(&seed.join("etc/hostname"), "before-install\n", 0o644);
    let img = work.join(format!("{name}.img"));
    mke2fs(&seed, &img, "32M");
    img
}

/// `mke2fs -t ext4 -d SEED IMG SIZE`.
pub(crate) fn mke2fs(seed: &Path, img: &Path, size: &str) {
    let out = Command::new("mke2fs")
        .args(["-q", "-F", "-t", "ext4", "-L", "root", "-d"])
        .arg(seed)
        .arg(img)
        .arg(size)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

pub(crate) fn debugfs(img: &Path, request: &str) -> String {
    let out = Command::new("debugfs")
        .arg("-R")
        .arg(request)
        .arg(img)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The namespace, the server in it, and the test's files.
pub(crate) struct Lab {
    pub(crate) server: Server,
    pub(crate) ns: Netns,
    pub(crate) work: tempfile::TempDir,
}

pub(crate) fn lab(timeout_secs: u32) -> Lab {
    lab_with(timeout_secs, appliance())
}

/// A lab whose `[install] appliance` is `appliance`.
fn lab_with(timeout_secs: u32, appliance: &Path) -> Lab {
    lab_with_env(timeout_secs, appliance, &[])
}

/// A lab with more of the server's environment.
pub(crate) fn lab_with_env(timeout_secs: u32, appliance: &Path, extra: &[(&str, &str)]) -> Lab {
    let work = tempfile::tempdir().unwrap();
    // Trusted scripts run as nobody, who must reach them.
    chmod(work.path(), 0o755);
    let ns = Netns::new("inst");
    let appliance = appliance.to_str().unwrap().to_string();
    let os = work.path().join("os");
    std::fs::create_dir_all(&os).unwrap();
    chmod(&os, 0o755);
    let timeout = timeout_secs.to_string();
    let mut env = vec![
        ("CRADLE_INSTALL_APPLIANCE", appliance.as_str()),
        ("CRADLE_INSTALL_ACCEL", "tcg"),
        ("CRADLE_INSTALL_TIMEOUT", timeout.as_str()),
        ("CRADLE_INSTALL_MEMORY_MIB", "256"),
        ("CRADLE_OS_SEARCH_PATH", os.to_str().unwrap()),
    ];
    env.extend_from_slice(extra);
    let server = Server::start_with(Opts {
        data_dir: Some(&work.path().join("data")),
        netns: Some(&ns.name),
        // Reachable from the tap but for the fence: the appliance must not get in.
        admin_listen: Some("0.0.0.0:8774"),
        metadata_listen: Some("169.254.169.254:80"),
        log: Some("trace"),
        env: &env,
        ..Default::default()
    });
    Lab { server, ns, work }
}

impl Lab {
    pub(crate) fn os_dir(&self, name: &str) -> PathBuf {
        let d = self.work.path().join("os").join(name);
        write(&d.join("ganeti_api_version"), "20\n", 0o644);
        chmod(&d, 0o755);
        d
    }

    pub(crate) fn cli(&self, args: &[&str]) -> Run {
        Run::of(&mut self.server.cli(args))
    }

    /// The packets the fences' drop counters have counted, now.
    fn fence_drops(&self) -> u64 {
        fence_drops(&self.ns.nft())
    }

    /// Taps and fences left in the namespace.
    pub(crate) fn leftovers(&self) -> (String, String) {
        let links = String::from_utf8_lossy(&self.ns.ip(&["-o", "link"]).stdout).into_owned();
        let taps = links
            .lines()
            .filter(|l| l.contains(": cri"))
            .collect::<Vec<_>>()
            .join("\n");
        let out = self
            .ns
            .command("nft")
            .args(["list", "tables"])
            .output()
            .unwrap();
        let tables = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.contains("cradle_comm_"))
            .collect::<Vec<_>>()
            .join("\n");
        (taps, tables)
    }
}

/// The packets counted by the drop rules of every install fence
/// (`cradle_comm_*` tables) in the namespace `nft` works in.
fn fence_drops(nft: &cradle_secgroups::nft::Nft) -> u64 {
    fence_counts(nft, "cradle_comm_").1
}

/// What the rules of the fences whose tables start with `prefix` counted:
/// the packets they accepted (to the metadata port) and dropped.
pub(crate) fn fence_counts(nft: &cradle_secgroups::nft::Nft, prefix: &str) -> (u64, u64) {
    let v = nft
        .list(&["list", "ruleset"])
        .expect("nft lists the ruleset");
    let (mut accepted, mut dropped) = (0, 0);
    for item in v["nftables"].as_array().into_iter().flatten() {
        let rule = &item["rule"];
        if !rule["table"]
            .as_str()
            .is_some_and(|t| t.starts_with(prefix))
        {
            continue;
        }
        let expr = rule["expr"].as_array().cloned().unwrap_or_default();
        let packets: u64 = expr
            .iter()
            .filter_map(|e| e["counter"]["packets"].as_u64())
            .sum();
        if expr.iter().any(|e| e.get("drop").is_some()) {
            dropped += packets;
        } else if expr.iter().any(|e| e.get("accept").is_some()) {
            accepted += packets;
        }
    }
    (accepted, dropped)
}

/// Runs on the host as nobody: records what it was given.
const TRUSTED_CREATE: &str = r#"#!/bin/sh
out=OUTDIR
id -u > "$out/uid"
env | sort > "$out/env"
tr '\0' ' ' < /proc/$$/cmdline > "$out/argv"
if [ -n "${CRADLE_SECRETS_FD:-}" ]; then cat <&"$CRADLE_SECRETS_FD"; fi | sha256sum | cut -d' ' -f1 > "$out/secrets.sha256"
echo "trusted create: hello from the host, disk $DISK_0_PATH"
# The appliance's messages on the channel arrive on standard input.
msg=$(timeout 120 head -n 1)
echo "trusted create: the appliance said: $msg"
"#;

/// Runs inside the appliance.
const UNTRUSTED_CREATE: &str = r#"#!/bin/sh
echo "create: $INSTANCE_NAME disk $DISK_0_PATH flavor $OSP_FLAVOR"
secrets=$(if [ -n "${CRADLE_SECRETS_FD:-}" ]; then cat <&"$CRADLE_SECRETS_FD"; fi)
echo "create: my secrets are $secrets"
mount -t ext4 "$DISK_0_PATH" /mnt || exit 5
echo "written inside the appliance for $INSTANCE_NAME" > /mnt/created-by-script
printf '%s' "$secrets" | sha256sum | cut -d' ' -f1 > /mnt/secrets.sha256
umount /mnt
# Debian's busybox-static wget crashes (SIGSEGV); nc speaks HTTP well enough.
get() { printf 'GET %s HTTP/1.0\r\nMetadata-Flavor: cradle\r\n\r\n' "$2" | nc -w 3 169.254.169.254 "$1"; }
own=$(sed -n 's/.*cradle.address=\([0-9.]*\).*/\1/p' /proc/cmdline)
case "$(get 80 /cradle/latest/meta_data.json)" in
  *"HTTP/1."?" 200 "*) echo "fence: own metadata answered" ;;
  *) echo "fence: own metadata NOT ANSWERED" ;;
esac
case "$(get 8774 /v1/instances)" in
  *HTTP/*) echo "fence: admin API REACHABLE" ;;
  *) echo "fence: admin API unreachable" ;;
esac
ip addr flush dev eth0
ip addr add "$OSP_OTHER/16" dev eth0
case "$(get 80 /cradle/latest/os/parameters.json)" in
  *HTTP/*) echo "fence: spoofed request ANSWERED" ;;
  *) echo "fence: spoofed request unanswered" ;;
esac
ip addr flush dev eth0
ip addr add "$own/16" dev eth0
# Talk with the trusted script on the host, through the channel.
n=0
while [ $n -lt 60 ]; do
  heard=$(get 80 /cradle/latest/read | sed '1,/^\r$/d')
  case "$heard" in *"hello from the host"*) break ;; esac
  n=$((n+1)); sleep 1
done
echo "create: the host said: $heard"
note="hello host, this is $INSTANCE_NAME"
printf 'POST /cradle/latest/write HTTP/1.0\r\nMetadata-Flavor: cradle\r\nContent-Length: %s\r\n\r\n%s' "${#note}" "$note" | nc -w 3 169.254.169.254 80 > /dev/null
echo "create: done"
"#;

#[test]
fn an_install_runs_its_scripts_in_the_appliance_and_on_the_host_and_overlays_the_package() {
    let lab = lab(600);
    let w = lab.work.path();
    let out_dir = w.join("trusted-out");
    std::fs::create_dir_all(&out_dir).unwrap();
    chmod(&out_dir, 0o777);
    let d = lab.os_dir("testos");
    write(
        &d.join("parameters.list"),
        "flavor The size\nother An address to spoof\npw A password\n",
        0o644,
    );
    write(
        &d.join("create"),
        &TRUSTED_CREATE.replace("OUTDIR", out_dir.to_str().unwrap()),
        0o755,
    );
    write(&d.join("untrusted/create"), UNTRUSTED_CREATE, 0o644);

    // The personalization package (GNU tar), served as a file URL.
    let pkg_src = w.join("pkg");
    write(&pkg_src.join("etc/motd"), "personalized by cradle\n", 0o644);
    write(
        &pkg_src.join("root/.ssh/authorized_keys"),
        "ssh-ed25519 AAAA test\n",
        0o600,
    );
    let pkg = w.join("pkg.tar.gz");
    let tar = Command::new("tar")
        .arg("-czf")
        .arg(&pkg)
        .arg("-C")
        .arg(&pkg_src)
        .args(["etc", "root"])
        .status()
        .unwrap();
    assert!(tar.success());

    let img = ext4_image(w, "inst1");
    let canary = format!("INSTALLCANARY-{}", std::process::id());
    let other_canary = format!("OTHERCANARY-{}", std::process::id());
    let pw = w.join("pw");
    std::fs::write(&pw, &canary).unwrap();
    let other_pw = w.join("other-pw");
    std::fs::write(&other_pw, &other_canary).unwrap();
    let mut outputs = Vec::new();
    let mut cli = |args: &[&str]| {
        let r = lab.cli(args).success();
        outputs.push(format!("{}{}", r.stdout, r.stderr));
        r
    };
    // Another instance: its address is the one the appliance will spoof.
    cli(&[
        "instance",
        "add",
        "other",
        "--metadata-address",
        "169.254.1.200",
        "--secret-param",
        &format!("pw=@{}", other_pw.display()),
    ]);
    cli(&[
        "instance",
        "add",
        "inst1",
        "--os-type",
        "testos",
        "--disk",
        &format!("{}:raw", img.display()),
        "--param",
        "flavor=small",
        "--param",
        "other=169.254.1.200",
        "--secret-param",
        &format!("pw=@{}", pw.display()),
        "--personalization-url",
        &format!("file://{}", pkg.display()),
    ]);

    // Watch the fence's drop counter while the job runs (its table goes
    // with the job).
    let drops = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let watcher = {
        let (drops, done, nft) = (drops.clone(), done.clone(), lab.ns.nft());
        std::thread::spawn(move || {
            while !done.load(Ordering::SeqCst) {
                drops.fetch_max(fence_drops(&nft), Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(200));
            }
        })
    };
    let started = Instant::now();
    let follow = cli(&["instance", "install", "inst1", "--follow"]);
    done.store(true, Ordering::SeqCst);
    watcher.join().unwrap();
    let text = format!("{}{}", follow.stdout, follow.stderr);
    eprintln!(
        "install took {:.1}s:\n{text}",
        started.elapsed().as_secs_f64()
    );

    // Progress and the scripts' output reached --follow, in order.
    for want in [
        "accelerator: tcg",
        "first metadata request from the appliance",
        "create: inst1 disk /dev/vda flavor small",
        "create: my secrets are {\"pw\":\"<redacted>\"}",
        "fence: own metadata answered",
        "fence: admin API unreachable",
        "fence: spoofed request unanswered",
        "create: done",
        "trusted create: hello from the host",
        "create: the host said: trusted create: hello from the host, disk",
        "trusted create: the appliance said: hello host, this is inst1",
        "status",
        "exit code 0",
        "install succeeded",
        "install of inst1 succeeded",
    ] {
        assert!(text.contains(want), "{want:?} missing from:\n{text}");
    }
    assert!(
        !text.contains("REACHABLE") && !text.contains("ANSWERED") && !text.contains("Segmentation"),
        "{text}"
    );
    let progress = text.find("progress").expect("a progress line");
    assert!(progress < text.find("create: done").unwrap(), "{text}");
    assert!(
        drops.load(Ordering::SeqCst) > 0,
        "the fence dropped nothing: the spoofed packets were not stopped by it"
    );

    // What the untrusted script and the package wrote, read without a mount.
    assert_eq!(
        debugfs(&img, "cat /created-by-script"),
        "written inside the appliance for inst1\n"
    );
    let secrets_json = format!("{{\"pw\":\"{canary}\"}}");
    assert_eq!(
        debugfs(&img, "cat /secrets.sha256").trim(),
        sha256_hex(&secrets_json)
    );
    assert_eq!(debugfs(&img, "cat /etc/motd"), "personalized by cradle\n");
    assert_eq!(
        debugfs(&img, "cat /root/.ssh/authorized_keys"),
        "ssh-ed25519 AAAA test\n"
    );
    assert_eq!(debugfs(&img, "cat /etc/hostname"), "before-install\n");
    let fsck = Command::new("e2fsck")
        .args(["-fn"])
        .arg(&img)
        .output()
        .unwrap();
    assert!(
        fsck.status.success(),
        "{}",
        String::from_utf8_lossy(&fsck.stdout)
    );

    // The trusted script: as nobody, the documented environment, the
    // secrets on its descriptor and nowhere else.
    let read = |n: &str| std::fs::read_to_string(out_dir.join(n)).unwrap();
    assert_eq!(read("uid").trim(), "65534");
    let env = read("env");
    for want in [
        "OS_API_VERSION=20",
        "OS_NAME=testos",
        "INSTANCE_NAME=inst1",
        "INSTANCE_OS=testos",
        "HYPERVISOR=kvm",
        "DISK_COUNT=1",
        &format!("DISK_0_PATH={}", img.display()),
        "DISK_0_ACCESS=rw",
        "OSP_FLAVOR=small",
        "CRADLE_SECRETS_FD=3",
    ] {
        assert!(
            env.lines().any(|l| l == want),
            "{want} missing from:\n{env}"
        );
    }
    assert!(!env.contains(&canary), "a secret is in the environment");
    let argv = read("argv");
    assert!(argv.contains("create") && !argv.contains(&canary), "{argv}");
    assert_eq!(read("secrets.sha256").trim(), sha256_hex(&secrets_json));

    // After the job: installed, the secret dropped, nothing left behind.
    let show = cli(&["instance", "show", "inst1", "-o", "json"]);
    let v: Value = serde_json::from_str(&show.stdout).unwrap();
    assert_eq!(v["state"], "stopped", "{v}");
    assert_eq!(v["os_params"]["secret"], serde_json::json!([]), "{v}");
    let status = cli(&["instance", "install-status", "inst1", "-o", "json"]);
    let job: Value = serde_json::from_str(&status.stdout).unwrap();
    assert_eq!(job["state"], "succeeded", "{job}");
    assert_eq!(job["status"]["exit_code"], 0, "{job}");
    assert!(job["first_request_ms"].as_u64().is_some(), "{job}");
    let (taps, tables) = lab.leftovers();
    assert!(
        taps.is_empty() && tables.is_empty(),
        "left: {taps} {tables}"
    );
    assert!(
        std::fs::read_dir(lab.server.data_dir.join("run"))
            .map(|d| d.count())
            .unwrap_or(0)
            == 0,
        "the appliance's run directory is left"
    );
    // Installed again: the secret was for the first job only.
    let again = cli(&["instance", "install", "inst1", "--follow"]);
    let again_text = format!("{}{}", again.stdout, again.stderr);
    assert!(
        again_text.contains("create: my secrets are"),
        "{again_text}"
    );
    assert!(!again_text.contains("<redacted>"), "{again_text}");
    assert_eq!(
        debugfs(&img, "cat /secrets.sha256").trim(),
        sha256_hex(""),
        "the second appliance got a secret"
    );

    // The canaries: in no log line, no output, no file of the data dir.
    let log = lab.server.log();
    for c in [&canary, &other_canary] {
        assert!(!log.contains(c.as_str()), "a canary is in the server log");
        for o in &outputs {
            assert!(!o.contains(c.as_str()), "a canary is in CLI output:\n{o}");
        }
        for (f, bytes) in files_under(&lab.server.data_dir) {
            assert!(!contains(&bytes, c), "a canary is in {}", f.display());
        }
    }
    assert!(lab.fence_drops() == 0, "a fence outlived its job");
}

#[test]
fn a_hanging_script_is_killed_at_the_timeout_and_the_instance_is_install_failed() {
    let lab = lab(45);
    let d = lab.os_dir("hangos");
    // Output every second: traffic must not extend the deadline.
    write(
        &d.join("untrusted/create"),
        "#!/bin/sh\necho about to hang\nwhile true; do echo tick; sleep 1; done\n",
        0o644,
    );
    let img = ext4_image(lab.work.path(), "hang");
    lab.cli(&[
        "instance",
        "add",
        "hang1",
        "--os-type",
        "hangos",
        "--disk",
        img.to_str().unwrap(),
    ])
    .success();
    let started = Instant::now();
    let r = lab
        .cli(&["instance", "install", "hang1", "--follow"])
        .fails_with(&["install of hang1 failed", "ran past its 45s timeout"]);
    let took = started.elapsed();
    assert!(
        took >= Duration::from_secs(45) && took < Duration::from_secs(75),
        "took {took:?}"
    );
    assert!(r.stdout.contains("about to hang"), "{}", r.stdout);
    assert!(r.stdout.matches("tick").count() >= 3, "{}", r.stdout);
    let show = lab
        .cli(&["instance", "show", "hang1", "-o", "json"])
        .success();
    let v: Value = serde_json::from_str(&show.stdout).unwrap();
    assert_eq!(v["state"], "install_failed", "{v}");
    assert!(
        v["state_reason"].as_str().unwrap_or("").contains("timeout"),
        "{v}"
    );
    // The VM is gone, and its tap, fence and scratch with it.
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let cmd = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        assert!(
            !(contains(&cmd, "install-") && contains(&cmd, lab.server.data_dir.to_str().unwrap())),
            "the appliance of a timed-out job still runs ({})",
            entry.path().display()
        );
    }
    let (taps, tables) = lab.leftovers();
    assert!(
        taps.is_empty() && tables.is_empty(),
        "left: {taps} {tables}"
    );
    // The instance is refused nothing: a new install may start.
    let events = lab.cli(&["instance", "events", "hang1"]).success();
    assert!(events.stdout.contains("timeout"), "{}", events.stdout);
}

#[test]
fn run_mode_starts_reports_and_stops_the_instances_vm() {
    let work = tempfile::tempdir().unwrap();
    let s = Server::start_with(Opts {
        env: &[("CRADLE_INSTALL_ACCEL", "tcg")],
        ..Default::default()
    });
    let img = ext4_image(work.path(), "run");
    let cli = |args: &[&str]| Run::of(&mut s.cli(args));
    cli(&[
        "instance",
        "add",
        "vm1",
        "--disk",
        img.to_str().unwrap(),
        "--memory",
        "128",
        "--vcpus",
        "1",
    ])
    .success();
    let shown = cli(&["instance", "show", "vm1"]).success();
    assert!(shown.stdout.contains("128 MiB"), "{}", shown.stdout);
    assert!(
        shown.stdout.contains(&format!("{} (raw)", img.display())),
        "{}",
        shown.stdout
    );
    cli(&["instance", "status", "vm1"])
        .success()
        .stdout
        .contains("vm stopped")
        .then_some(())
        .expect("stopped before start");
    let started = cli(&["instance", "start", "vm1", "-o", "json"]).success();
    let v: Value = serde_json::from_str(&started.stdout).unwrap();
    assert_eq!(v["state"], "running", "{v}");
    let st = cli(&["instance", "status", "vm1"]).success();
    assert!(
        st.stdout.contains("state running, vm running"),
        "{}",
        st.stdout
    );
    cli(&["instance", "start", "vm1"]).fails_with(&["already running"]);
    // The console is the serial port's log; it exists once the VM runs.
    cli(&["instance", "console", "vm1"]).success();
    let stopped = cli(&["instance", "stop", "vm1", "--grace", "2", "-o", "json"]).success();
    let v: Value = serde_json::from_str(&stopped.stdout).unwrap();
    assert_eq!(v["state"], "stopped", "{v}");
    let st = cli(&["instance", "status", "vm1"]).success();
    assert!(
        st.stdout.contains("state stopped, vm stopped"),
        "{}",
        st.stdout
    );
    // Bad input is named.
    cli(&["instance", "add", "vm2", "--disk", "relative.img"]).fails_with(&["disks", "absolute"]);
    cli(&["instance", "add", "vm2", "--memory", "1"]).fails_with(&["memory_mib"]);
    cli(&["instance", "add", "vm3"]).success();
    cli(&["instance", "start", "vm3"]).fails_with(&["no disks"]);
    cli(&["instance", "install", "vm3"]).fails_with(&["no os_type"]);
}

/// `/init` of a guest that installs itself: the appliance's kernel and
/// busybox, this script instead of the agent. It gets its address by DHCP
/// (nothing on its command line), reads its hostname from the metadata
/// service, writes on its disk and reports its status on the channel.
const SELF_INIT: &str = r#"#!/bin/sh
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in $(cat /lib/modules/load.order); do insmod "/lib/modules/$m.ko"; done
ip link set lo up
n=0
while [ ! -e /sys/class/net/eth0 ] && [ $n -lt 10 ]; do sleep 1; n=$((n+1)); done
ip link set eth0 up
udhcpc -i eth0 -n -q -t 20 -T 1 -s /udhcpc.sh > /dev/console 2>&1
addr=$(ip -4 -o addr show dev eth0 | sed -n 's/.* inet \([0-9./]*\).*/\1/p')
get() { printf 'GET %s HTTP/1.0\r\nMetadata-Flavor: cradle\r\n\r\n' "$1" | nc -w 5 169.254.169.254 80; }
host=$(get /latest/meta-data/hostname | sed '1,/^\r$/d')
mount -t ext4 /dev/vda /mnt
echo "$host" > /mnt/hostname-from-metadata
echo "$addr" > /mnt/dhcp-address
umount /mnt
status="{\"agent\":\"status\",\"exit_code\":0,\"log_tail\":\"self-installed as $host at $addr\"}"
printf 'POST /cradle/latest/write HTTP/1.0\r\nMetadata-Flavor: cradle\r\nContent-Length: %s\r\n\r\n%s' "${#status}" "$status" | nc -w 5 169.254.169.254 80 > /dev/console
sync
poweroff -f
"#;

const UDHCPC_SCRIPT: &str = r#"#!/bin/sh
case "$1" in
  bound|renew) ip addr flush dev "$interface"; ip addr add "$ip/$mask" dev "$interface" ;;
esac
"#;

#[test]
fn a_self_install_writes_the_image_boots_the_instance_and_it_configures_itself_by_dhcp() {
    let lab = lab(180);
    let w = lab.work.path();
    // The OS image: an ext4 filesystem with a marker, written onto disk 0.
    let seed = w.join("image-seed");
    write(&seed.join("from-image"), "written by mke2fs\n", 0o644);
    let image = w.join("os.img");
    mke2fs(&seed, &image, "16M");
    let disk = w.join("selfy.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(32 << 20)
        .unwrap();
    // Its install media: the appliance's kernel, and its initrd with
    // another /init appended.
    let mut initrd = std::fs::read(appliance().join("initrd.img")).unwrap();
    initrd.extend(
        cradle_appliance::overlay_archive(&[
            ("init", 0o755, SELF_INIT.as_bytes()),
            ("udhcpc.sh", 0o755, UDHCPC_SCRIPT.as_bytes()),
        ])
        .unwrap(),
    );
    let initrd_path = w.join("self-initrd.img");
    std::fs::write(&initrd_path, initrd).unwrap();
    let kernel = appliance().join("vmlinuz");
    lab.cli(&[
        "instance",
        "add",
        "selfy",
        "--hostname",
        "selfy",
        "--metadata-address",
        "169.254.1.77",
        "--os-image",
        &format!("file://{}", image.display()),
        "--disk",
        disk.to_str().unwrap(),
        "--memory",
        "256",
        "--install-kernel",
        kernel.to_str().unwrap(),
        "--install-initrd",
        initrd_path.to_str().unwrap(),
        "--install-cmdline",
        "console=ttyS0 quiet panic=-1",
    ])
    .success();
    let r = lab
        .cli(&["instance", "install", "selfy", "--follow"])
        .success();
    let text = format!("{}{}", r.stdout, r.stderr);
    eprintln!("{text}");
    for want in [
        "mode: self_install",
        "writing the os_image",
        "DHCP gives 169.254.1.77",
        "the instance is booting in self_install mode",
        "exit code 0",
        "install of selfy succeeded",
    ] {
        assert!(text.contains(want), "{want:?} missing from:\n{text}");
    }
    // The image went onto disk 0; the guest knew itself from metadata,
    // with the address DHCP gave it.
    assert_eq!(debugfs(&disk, "cat /from-image"), "written by mke2fs\n");
    assert!(
        debugfs(&disk, "cat /hostname-from-metadata").starts_with("selfy"),
        "{}",
        debugfs(&disk, "cat /hostname-from-metadata")
    );
    assert_eq!(debugfs(&disk, "cat /dhcp-address"), "169.254.1.77/16\n");
    // The install parameters stay, for a reinstall; nothing is left running.
    let show = lab
        .cli(&["instance", "show", "selfy", "-o", "json"])
        .success();
    let v: Value = serde_json::from_str(&show.stdout).unwrap();
    assert_eq!(v["state"], "stopped", "{v}");
    assert_eq!(
        v["install_params"]["kernel"],
        kernel.to_str().unwrap(),
        "{v}"
    );
    let (taps, tables) = lab.leftovers();
    assert!(
        taps.is_empty() && tables.is_empty(),
        "left: {taps} {tables}"
    );
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let cmd = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        assert!(
            !(contains(&cmd, "dnsmasq") && contains(&cmd, "169.254.1.77")),
            "the job's dnsmasq still runs ({})",
            entry.path().display()
        );
    }
    // Bad install parameters are named.
    lab.cli(&["instance", "modify", "selfy", "--install-initrd", "/x"])
        .fails_with(&["install_params", "need a kernel"]);
}

/// QEMU dying at start: a self_install whose install kernel is a file
/// that real QEMU cannot load. The install fails at once, naming QEMU, its
/// exit status and what it said; the tap, its fence, the job's dnsmasq,
/// the VM's run directory and QEMU itself are all gone.
#[test]
fn qemu_dying_at_start_fails_the_install_and_leaves_nothing() {
    // A self_install boots no appliance: none is built for this test.
    let no_appliance = tempfile::tempdir().unwrap();
    let lab = lab_with(60, no_appliance.path());
    let w = lab.work.path();
    let disk = w.join("dies.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    let kernel = w.join("not-a-kernel");
    write(&kernel, "this is not a kernel\n", 0o644);
    lab.cli(&[
        "instance",
        "add",
        "dies",
        "--metadata-address",
        "169.254.1.78",
        "--os-image",
        "its-own-installer",
        "--disk",
        disk.to_str().unwrap(),
        "--memory",
        "256",
        "--install-kernel",
        kernel.to_str().unwrap(),
    ])
    .success();
    let started = Instant::now();
    let r = lab
        .cli(&["instance", "install", "dies", "--follow"])
        .fails_with(&[
            "install of dies failed",
            "QEMU exited at the start of VM \"install-",
            "(exit status: 1): ",
        ]);
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "not at once: {:?}",
        started.elapsed()
    );
    let text = format!("{}{}", r.stdout, r.stderr);
    // The tap was made (and dnsmasq started) before QEMU died; QEMU's own
    // words about the kernel it could not load are in the reason.
    assert!(text.contains("communication NIC cri"), "{text}");
    assert!(text.contains("qemu: invalid kernel header"), "{text}");
    let show = lab
        .cli(&["instance", "show", "dies", "-o", "json"])
        .success();
    let v: Value = serde_json::from_str(&show.stdout).unwrap();
    assert_eq!(v["state"], "install_failed", "{v}");
    let reason = v["state_reason"].as_str().unwrap_or("");
    assert!(reason.contains("QEMU exited at the start of VM"), "{v}");

    let (taps, tables) = lab.leftovers();
    assert!(
        taps.is_empty() && tables.is_empty(),
        "left: {taps} {tables}"
    );
    // QEMU was started: the VMs' run directory is there, and empty.
    let run = lab.server.data_dir.join("run");
    let dirs: Vec<_> = std::fs::read_dir(&run)
        .unwrap_or_else(|e| panic!("{}: {e}", run.display()))
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(
        dirs.is_empty(),
        "run dirs left in {}: {dirs:?}",
        run.display()
    );
    // dnsmasq is killed when the job ends (it is not waited for): give it
    // a moment to go.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut left = Vec::new();
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
            let cmd = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
            let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
            let zombie = stat
                .rsplit_once(')')
                .is_some_and(|(_, r)| r.trim_start().starts_with('Z'));
            let dnsmasq = contains(&cmd, "dnsmasq") && contains(&cmd, "169.254.1.78");
            let qemu =
                contains(&cmd, "install-") && contains(&cmd, lab.server.data_dir.to_str().unwrap());
            if (dnsmasq || qemu) && !zombie {
                left.push(String::from_utf8_lossy(&cmd).replace('\0', " "));
            }
        }
        if left.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "still running: {left:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}
