//! Export, import and rename for real: in the install tests' lab (a
//! network namespace, the appliance under QEMU TCG, ext4 images made with
//! mke2fs and read back with debugfs), through the CLI as an operator
//! runs them.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::harness::*;
use crate::install::{Lab, appliance, chmod, debugfs, ext4_image, lab, lab_with_env, write};

/// Writes a marker and some random bytes onto disk 0, in the appliance.
const UNTRUSTED_CREATE: &str = r#"#!/bin/sh
mount -t ext4 "$DISK_0_PATH" /mnt || exit 5
printf 'marker of %s\n' "$INSTANCE_NAME" > /mnt/marker
head -c 300000 /dev/urandom > /mnt/blob
umount /mnt
"#;

/// The dump is `dd` of the disk; what it saw goes to standard error (the
/// job's log), never into the dump.
const UNTRUSTED_EXPORT: &str = r#"#!/bin/sh
echo "export: device=$EXPORT_DEVICE index=$EXPORT_INDEX access=$DISK_0_ACCESS name=$INSTANCE_NAME" >&2
secrets=$(if [ -n "${CRADLE_SECRETS_FD:-}" ]; then cat <&"$CRADLE_SECRETS_FD"; fi)
echo "export: secrets $(printf '%s' "$secrets" | sha256sum | cut -d' ' -f1)" >&2
if dd if=/dev/zero of="$EXPORT_DEVICE" bs=512 count=1 seek=1 conv=notrunc 2>/dev/null; then
  echo "export: the disk is WRITABLE" >&2
else
  echo "export: the disk is read-only" >&2
fi
# Both scripts run at once and talk through the channel, as for create.
get() { printf 'GET %s HTTP/1.0\r\nMetadata-Flavor: cradle\r\n\r\n' "$1" | nc -w 3 169.254.169.254 80; }
n=0
while [ $n -lt 60 ]; do
  heard=$(get /cradle/latest/read | sed '1,/^\r$/d')
  case "$heard" in *"hello from the host"*) break ;; esac
  n=$((n+1)); sleep 1
done
echo "export: the host said: $heard" >&2
note="hello host, exporting $INSTANCE_NAME"
printf 'POST /cradle/latest/write HTTP/1.0\r\nMetadata-Flavor: cradle\r\nContent-Length: %s\r\n\r\n%s' "${#note}" "$note" | nc -w 3 169.254.169.254 80 > /dev/null
exec dd if="$EXPORT_DEVICE" bs=1M 2>/dev/null
"#;

/// Beside the untrusted export: on the host, talking to it.
const TRUSTED_BESIDE: &str = r#"#!/bin/sh
echo "trusted export: hello from the host"
msg=$(timeout 120 head -n 1)
echo "trusted export: the appliance said: $msg"
"#;

const UNTRUSTED_IMPORT: &str = r#"#!/bin/sh
echo "import: device=$IMPORT_DEVICE index=$IMPORT_INDEX access=$DISK_0_ACCESS" >&2
dd of="$IMPORT_DEVICE" bs=1M 2>/dev/null || exit 7
sync
"#;

/// The same on the host, as nobody; what it was given goes to OUTDIR.
const TRUSTED_EXPORT: &str = r#"#!/bin/sh
env | sort > OUTDIR/export.env
exec dd if="$EXPORT_DEVICE" bs=1M 2>/dev/null
"#;

const TRUSTED_IMPORT: &str = r#"#!/bin/sh
env | sort > OUTDIR/import.env
echo ran > OUTDIR/import.ran
dd of="$IMPORT_DEVICE" bs=1M conv=notrunc 2>/dev/null || exit 7
"#;

fn json(r: &Run) -> Value {
    serde_json::from_str(&r.stdout).unwrap_or_else(|e| panic!("{e}: {}", r.stdout))
}

fn state(lab: &Lab, name: &str) -> Value {
    json(&lab.cli(&["instance", "show", name, "-o", "json"]).success())
}

fn last_job(lab: &Lab, name: &str) -> Value {
    json(
        &lab.cli(&["instance", "job-status", name, "-o", "json"])
            .success(),
    )
}

fn job_text(job: &Value) -> String {
    job["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["text"].as_str().unwrap().to_string())
        .collect::<Vec<_>>()
        .join("\n")
}

fn add(lab: &Lab, name: &str, os: &str, img: &Path, extra: &[&str]) {
    let disk = format!("{}:raw", img.display());
    let mut args = vec!["instance", "add", name, "--os-type", os, "--disk", &disk];
    args.extend_from_slice(extra);
    lab.cli(&args).success();
}

fn assert_nothing_left(lab: &Lab) {
    let (taps, tables) = lab.leftovers();
    assert!(
        taps.is_empty() && tables.is_empty(),
        "left: {taps} {tables}"
    );
    let data = lab.server.data_dir.to_str().unwrap().to_string();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let cmd = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        assert!(
            !(contains(&cmd, "qemu") && contains(&cmd, &data)),
            "a VM of a finished job still runs ({})",
            entry.path().display()
        );
    }
    let spooled = std::fs::read_dir(lab.server.data_dir.join("spool"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(spooled, 0, "a spooled dump outlived its job");
}

/// Files in `dir` whose names hold `part`.
fn named(dir: &Path, part: &str) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.file_name().unwrap().to_string_lossy().contains(part))
        .collect()
}

#[test]
fn an_instance_goes_out_and_back_in_through_untrusted_and_trusted_scripts() {
    let lab = lab(600);
    let w = lab.work.path();
    let out = w.join("trusted-out");
    std::fs::create_dir_all(&out).unwrap();
    chmod(&out, 0o777);

    // Untrusted: create, export and import inside the appliance.
    let d = lab.os_dir("dumpos");
    write(&d.join("parameters.list"), "pw A password\n", 0o644);
    write(&d.join("untrusted/create"), UNTRUSTED_CREATE, 0o644);
    write(&d.join("untrusted/export"), UNTRUSTED_EXPORT, 0o644);
    write(&d.join("export"), TRUSTED_BESIDE, 0o755);
    write(&d.join("untrusted/import"), UNTRUSTED_IMPORT, 0o644);
    let img_a = ext4_image(w, "a");
    let img_b = ext4_image(w, "b");
    let canary = format!("EXPORTCANARY-{}", std::process::id());
    let pw = w.join("pw");
    std::fs::write(&pw, &canary).unwrap();
    add(&lab, "a", "dumpos", &img_a, &[]);
    add(&lab, "b", "dumpos", &img_b, &[]);
    lab.cli(&["instance", "install", "a", "--follow"]).success();
    assert_eq!(debugfs(&img_a, "cat /marker"), "marker of a\n");

    // The export gets the instance's secrets on descriptor 3, as create does.
    lab.cli(&[
        "instance",
        "modify",
        "a",
        "--secret-param",
        &format!("pw=@{}", pw.display()),
    ])
    .success();
    let dump = w.join("a.dump");
    let started = Instant::now();
    let r = lab
        .cli(&["instance", "export", "a", dump.to_str().unwrap()])
        .success();
    eprintln!(
        "untrusted export took {:.1}s: {}",
        started.elapsed().as_secs_f64(),
        r.stderr
    );
    assert!(
        r.stderr.contains("exported a disk 0: 33554432 bytes"),
        "{}",
        r.stderr
    );
    assert_eq!(
        sha256_file(&dump),
        sha256_file(&img_a),
        "the dump is the disk"
    );
    let sums = std::fs::read_to_string(w.join("a.dump.sha256")).unwrap();
    assert_eq!(sums, format!("{}  a.dump\n", sha256_file(&img_a)));
    assert!(named(w, ".partial").is_empty(), "a partial dump is left");
    let job = last_job(&lab, "a");
    assert_eq!(
        (&job["operation"], &job["state"]),
        (&Value::from("export"), &Value::from("succeeded")),
        "{job}"
    );
    assert_eq!(job["stream"]["bytes"], 33554432, "{job}");
    assert_eq!(
        job["status"]["stream"], job["stream"],
        "both ends counted the same"
    );
    let text = job_text(&job);
    for want in [
        "export: device=/dev/vda index=0 access=ro name=a",
        "export: the disk is read-only",
        "export: the host said: trusted export: hello from the host",
        "stdout: trusted export: the appliance said: hello host, exporting a",
        "the appliance and the trusted export script succeeded",
        &format!(
            "export: secrets {}",
            sha256_hex(&format!("{{\"pw\":\"{canary}\"}}"))
        ),
    ] {
        assert!(text.contains(want), "{want:?} missing from:\n{text}");
    }
    let a = state(&lab, "a");
    assert_eq!(a["state"], "stopped", "{a}");
    assert_eq!(a["os_params"]["secret"], serde_json::json!([]), "{a}");

    // Into a second instance's fresh disk.
    let r = lab
        .cli(&["instance", "import", "b", dump.to_str().unwrap()])
        .success();
    assert!(r.stderr.contains("import of b succeeded"), "{}", r.stderr);
    assert!(
        r.stdout
            .contains("import: device=/dev/vda index=0 access=rw"),
        "{}",
        r.stdout
    );
    assert_eq!(debugfs(&img_b, "cat /marker"), "marker of a\n");
    let blob = |img: &Path, to: &Path| {
        debugfs(img, &format!("dump /blob {}", to.display()));
        sha256_file(to)
    };
    assert_eq!(
        blob(&img_b, &w.join("blob-b")),
        blob(&img_a, &w.join("blob-a"))
    );
    assert_eq!(sha256_file(&img_b), sha256_file(&img_a));
    assert_eq!(state(&lab, "b")["state"], "stopped");
    assert_nothing_left(&lab);

    // Trusted: the same on the host, the dump straight from the pipe.
    let t = lab.os_dir("hostdump");
    let outdir = out.to_str().unwrap();
    write(
        &t.join("export"),
        &TRUSTED_EXPORT.replace("OUTDIR", outdir),
        0o755,
    );
    write(
        &t.join("import"),
        &TRUSTED_IMPORT.replace("OUTDIR", outdir),
        0o755,
    );
    write(&t.join("create"), "#!/bin/sh\n", 0o755);
    // c holds what a's install wrote.
    let img_c = w.join("c.img");
    std::fs::copy(&img_a, &img_c).unwrap();
    let img_d = ext4_image(w, "d");
    // The scripts run as nobody.
    chmod(&img_c, 0o644);
    chmod(&img_d, 0o666);
    add(&lab, "c", "hostdump", &img_c, &[]);
    add(&lab, "d", "hostdump", &img_d, &[]);
    let dump_c = w.join("c.dump");
    let started = Instant::now();
    lab.cli(&["instance", "export", "c", dump_c.to_str().unwrap()])
        .success();
    eprintln!(
        "trusted export took {:.1}s",
        started.elapsed().as_secs_f64()
    );
    assert_eq!(sha256_file(&dump_c), sha256_file(&img_c));
    let env = std::fs::read_to_string(out.join("export.env")).unwrap();
    for want in [
        format!("EXPORT_DEVICE={}", img_c.display()),
        "EXPORT_INDEX=0".into(),
        "DISK_0_ACCESS=ro".into(),
        "INSTANCE_NAME=c".into(),
    ] {
        assert!(
            env.lines().any(|l| l == want),
            "{want} missing from:\n{env}"
        );
    }
    // To standard output, too.
    let mut cmd = lab.server.cli(["instance", "export", "c"]);
    let raw = cmd.output().unwrap();
    assert!(
        raw.status.success(),
        "{}",
        String::from_utf8_lossy(&raw.stderr)
    );
    assert_eq!(raw.stdout.len(), 32 << 20);
    let r = lab
        .cli(&["instance", "import", "d", dump_c.to_str().unwrap()])
        .success();
    assert!(r.stderr.contains("import of d succeeded"), "{}", r.stderr);
    assert_eq!(debugfs(&img_d, "cat /marker"), "marker of a\n");
    let env = std::fs::read_to_string(out.join("import.env")).unwrap();
    for want in [
        format!("IMPORT_DEVICE={}", img_d.display()),
        "IMPORT_INDEX=0".into(),
        "DISK_0_ACCESS=rw".into(),
    ] {
        assert!(
            env.lines().any(|l| l == want),
            "{want} missing from:\n{env}"
        );
    }
    assert_nothing_left(&lab);

    // The canary: in no log line, no job, no file of the data dir.
    assert!(
        !lab.server.log().contains(&canary),
        "a canary is in the server log"
    );
    assert!(!job.to_string().contains(&canary));
    for (f, bytes) in files_under(&lab.server.data_dir) {
        assert!(!contains(&bytes, &canary), "a canary is in {}", f.display());
    }
}

#[test]
fn a_hostile_export_is_cut_at_the_size_cap_and_at_the_timeout() {
    let lab = lab_with_env(
        45,
        appliance(),
        &[("CRADLE_INSTALL_STREAM_MAX_BYTES", "8388608")],
    );
    let w = lab.work.path();
    let flood = lab.os_dir("flood");
    write(&flood.join("untrusted/create"), "#!/bin/sh\n", 0o644);
    write(
        &flood.join("untrusted/export"),
        "#!/bin/sh\nwhile :; do cat /dev/zero; done\n",
        0o644,
    );
    let trickle = lab.os_dir("trickle");
    write(&trickle.join("untrusted/create"), "#!/bin/sh\n", 0o644);
    write(
        &trickle.join("untrusted/export"),
        "#!/bin/sh\nwhile :; do echo x; sleep 1; done\n",
        0o644,
    );
    add(&lab, "f", "flood", &ext4_image(w, "f"), &[]);
    add(&lab, "t", "trickle", &ext4_image(w, "t"), &[]);

    let dump = w.join("f.dump");
    let started = Instant::now();
    lab.cli(&["instance", "export", "f", dump.to_str().unwrap()])
        .fails_with(&[
            "export of f failed",
            "passed its cap of 8388608 bytes",
            "no file was written",
        ]);
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(45),
        "cut at the cap, not the timeout: {took:?}"
    );
    assert!(
        !dump.exists() && named(w, "f.dump").is_empty(),
        "a partial dump is left"
    );
    assert_eq!(state(&lab, "f")["state"], "registered");
    assert_nothing_left(&lab);

    let dump = w.join("t.dump");
    let started = Instant::now();
    lab.cli(&["instance", "export", "t", dump.to_str().unwrap()])
        .fails_with(&["export of t failed", "ran past its 45s timeout"]);
    let took = started.elapsed();
    assert!(
        took >= Duration::from_secs(45) && took < Duration::from_secs(80),
        "took {took:?}"
    );
    assert!(
        !dump.exists() && named(w, "t.dump").is_empty(),
        "a partial dump is left"
    );
    assert_eq!(state(&lab, "t")["state"], "registered");
    assert_nothing_left(&lab);
}

#[test]
fn a_corrupted_or_truncated_dump_never_reaches_the_import_script() {
    let lab = lab(120);
    let w = lab.work.path();
    let out = w.join("out");
    std::fs::create_dir_all(&out).unwrap();
    chmod(&out, 0o777);
    let t = lab.os_dir("hostdump");
    let outdir = out.to_str().unwrap();
    write(&t.join("create"), "#!/bin/sh\n", 0o755);
    write(
        &t.join("import"),
        &TRUSTED_IMPORT.replace("OUTDIR", outdir),
        0o755,
    );
    let bad = lab.os_dir("badimport");
    write(&bad.join("create"), "#!/bin/sh\n", 0o755);
    write(
        &bad.join("import"),
        "#!/bin/sh\nhead -c 1000 > /dev/null\necho giving up >&2\nexit 3\n",
        0o755,
    );
    let target = ext4_image(w, "target");
    chmod(&target, 0o666);
    add(&lab, "t", "hostdump", &target, &[]);
    let before = sha256_file(&target);

    // A good dump, and its SHA-256 as the export writes it.
    let good = ext4_image(w, "source");
    let sum = sha256_file(&good);
    let with_sum = |name: &str, bytes: &[u8]| {
        let p = w.join(name);
        std::fs::write(&p, bytes).unwrap();
        std::fs::write(w.join(format!("{name}.sha256")), format!("{sum}  {name}\n")).unwrap();
        p
    };
    let mut bytes = std::fs::read(&good).unwrap();
    bytes[1100] ^= 0x01;
    let flipped = with_sum("flipped.dump", &bytes);
    bytes[1100] ^= 0x01;
    let truncated = with_sum("truncated.dump", &bytes[..bytes.len() - 4096]);
    for dump in [&flipped, &truncated] {
        lab.cli(&["instance", "import", "t", dump.to_str().unwrap()])
            .fails_with(&["SHA-256", "corrupted or truncated", "the disk is unchanged"]);
        assert!(!out.join("import.ran").exists(), "the script ran");
        assert_eq!(sha256_file(&target), before);
        let t = state(&lab, "t");
        assert_eq!(t["state"], "registered", "{t}");
    }
    // Without a .sha256 and without --sha256: refused, with the way out.
    let bare = w.join("bare.dump");
    std::fs::copy(&good, &bare).unwrap();
    lab.cli(&["instance", "import", "t", bare.to_str().unwrap()])
        .fails_with(&["bare.dump.sha256", "--sha256"]);
    // Given by hand, it goes in.
    lab.cli(&[
        "instance",
        "import",
        "t",
        bare.to_str().unwrap(),
        "--sha256",
        &sum,
    ])
    .success();
    assert!(out.join("import.ran").exists());
    assert_eq!(sha256_file(&target), sum);

    // A script that fails after it began reading: install_failed, and said.
    add(&lab, "u", "badimport", &ext4_image(w, "u"), &[]);
    lab.cli(&[
        "instance",
        "import",
        "u",
        bare.to_str().unwrap(),
        "--sha256",
        &sum,
    ])
    .fails_with(&[
        "import of u failed",
        "the trusted import script exited with 3",
    ]);
    let u = state(&lab, "u");
    assert_eq!(u["state"], "install_failed", "{u}");
    assert!(
        u["state_reason"]
            .as_str()
            .unwrap()
            .contains("exited with 3"),
        "{u}"
    );
    assert!(job_text(&last_job(&lab, "u")).contains("stderr: giving up"));
    assert_nothing_left(&lab);
}

/// Records both names; fails while OUTDIR/fail exists.
const TRUSTED_RENAME: &str = r#"#!/bin/sh
echo "$OLD_INSTANCE_NAME -> $INSTANCE_NAME" >> OUTDIR/renamed
if [ -e OUTDIR/fail ]; then echo "told to fail" >&2; exit 4; fi
"#;

#[test]
fn a_rename_runs_the_script_and_takes_the_new_name_only_when_it_succeeded() {
    let lab = lab(120);
    let w = lab.work.path();
    let out = w.join("out");
    std::fs::create_dir_all(&out).unwrap();
    chmod(&out, 0o777);
    let r = lab.os_dir("renos");
    write(&r.join("create"), "#!/bin/sh\n", 0o755);
    write(
        &r.join("rename"),
        &TRUSTED_RENAME.replace("OUTDIR", out.to_str().unwrap()),
        0o755,
    );
    let plain = lab.os_dir("plain");
    write(&plain.join("create"), "#!/bin/sh\n", 0o755);
    add(
        &lab,
        "old1",
        "renos",
        &ext4_image(w, "r"),
        &["--metadata-address", "169.254.50.5"],
    );
    add(&lab, "p1", "plain", &ext4_image(w, "p"), &[]);
    // The guest, reading its metadata from its own address in the namespace.
    for a in ["169.254.50.5/32", "169.254.169.254/32"] {
        let o = lab.ns.ip(&["addr", "add", a, "dev", "lo"]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    let guest_name = || {
        let o = lab
            .ns
            .command("curl")
            .args([
                "-sf",
                "--interface",
                "169.254.50.5",
                "http://169.254.169.254/openstack/latest/meta_data.json",
            ])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let v: Value = serde_json::from_slice(&o.stdout).unwrap();
        v["name"].as_str().unwrap().to_string()
    };
    assert_eq!(guest_name(), "old1");

    // A failing script: everything stays under the old name.
    std::fs::write(out.join("fail"), "").unwrap();
    lab.cli(&["instance", "rename", "old1", "new1"])
        .fails_with(&[
            "rename of old1 failed",
            "the trusted rename script exited with 4",
        ]);
    assert_eq!(state(&lab, "old1")["name"], "old1");
    assert_eq!(state(&lab, "old1")["state"], "registered");
    lab.cli(&["instance", "show", "new1"]).failure();
    assert_eq!(guest_name(), "old1");

    std::fs::remove_file(out.join("fail")).unwrap();
    let r = lab.cli(&["instance", "rename", "old1", "new1"]).success();
    assert!(
        r.stderr.contains("rename of old1 succeeded"),
        "{}",
        r.stderr
    );
    let renamed = std::fs::read_to_string(out.join("renamed")).unwrap();
    assert_eq!(renamed, "old1 -> new1\nold1 -> new1\n");
    let v = state(&lab, "new1");
    assert_eq!(
        (&v["name"], &v["state"]),
        (&Value::from("new1"), &Value::from("registered"))
    );
    lab.cli(&["instance", "show", "old1"]).failure();
    assert_eq!(guest_name(), "new1");
    let events = lab.cli(&["instance", "events", "new1"]).success();
    assert!(events.stdout.contains("rename job"), "{}", events.stdout);

    // A name that is taken, or not a name: refused before any script runs.
    lab.cli(&["instance", "rename", "new1", "p1"])
        .fails_with(&["named \"p1\" already"]);
    lab.cli(&["instance", "rename", "new1", " spaced"])
        .fails_with(&["name"]);
    assert_eq!(
        std::fs::read_to_string(out.join("renamed"))
            .unwrap()
            .lines()
            .count(),
        2
    );
    // An untrusted rename fixes what the OS wrote into the guest, in the
    // appliance with the disks read-write.
    let u = lab.os_dir("urenos");
    write(&u.join("create"), "#!/bin/sh\n", 0o755);
    write(
        &u.join("untrusted/rename"),
        "#!/bin/sh\necho \"rename: $OLD_INSTANCE_NAME -> $INSTANCE_NAME ($DISK_0_ACCESS)\"\n\
         mount -t ext4 \"$DISK_0_PATH\" /mnt || exit 5\n\
         echo \"$INSTANCE_NAME\" > /mnt/etc/hostname\numount /mnt\n",
        0o644,
    );
    let img_u = ext4_image(w, "u");
    add(&lab, "u1", "urenos", &img_u, &[]);
    let r = lab.cli(&["instance", "rename", "u1", "u2"]).success();
    assert!(r.stdout.contains("rename: u1 -> u2 (rw)"), "{}", r.stdout);
    assert_eq!(debugfs(&img_u, "cat /etc/hostname"), "u2\n");
    assert_eq!(state(&lab, "u2")["name"], "u2");
    // Without a rename script the registry renames it at once.
    let r = lab.cli(&["instance", "rename", "p1", "p2"]).success();
    assert!(r.stderr.contains("has no rename script"), "{}", r.stderr);
    assert_eq!(state(&lab, "p2")["name"], "p2");
    assert_nothing_left(&lab);
}
