//! `cradle bake` and the diskimage-builder element, against real ext4
//! images (mke2fs, debugfs) and a real Debian root tree (the one `cargo
//! xtask guest-image` builds): images it cannot handle are refused and
//! left byte for byte, and the element's phase scripts, run the way
//! diskimage-builder runs them, leave exactly what `cradle bake` writes.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::agent::sha256;
use crate::appliance::agent;
use crate::harness::*;
use crate::install::mke2fs;

fn element() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../contrib/diskimage-builder/elements/cradle-agent")
}

fn bake(img: &Path, args: &[&str]) -> Run {
    Run::of(
        cradle_command()
            .arg("bake")
            .arg(img)
            .arg("--agent")
            .arg(agent())
            .args(args),
    )
}

#[test]
fn images_and_inputs_bake_cannot_take_are_refused_and_left_as_they_were() {
    let w = tempfile::tempdir().unwrap();
    let seed = w.path().join("seed");
    std::fs::create_dir_all(seed.join("etc")).unwrap();
    let img = w.path().join("small.img");
    mke2fs(&seed, &img, "64M");
    let before = sha256(&img);

    // Not an ext filesystem.
    let junk = w.path().join("junk.img");
    std::fs::write(&junk, vec![0x5a; 4 << 20]).unwrap();
    bake(&junk, &[]).fails_with(&["has no ext2/3/4 filesystem"]);
    assert_eq!(std::fs::read(&junk).unwrap(), vec![0x5a; 4 << 20]);
    // No partition table where one is asked for.
    bake(&img, &["--partition", "1"]).fails_with(&["no MBR or GPT partition table"]);
    // A configuration the agent refuses, named by the agent.
    let bad = w.path().join("bad.toml");
    std::fs::write(&bad, "heartbeat = 0\n").unwrap();
    bake(&img, &["--config", bad.to_str().unwrap()]).fails_with(&[
        "the agent refuses the configuration",
        "heartbeat = 0: must be 1 to 3600 seconds",
    ]);
    // A dynamically linked agent.
    Run::of(
        cradle_command()
            .arg("bake")
            .arg(&img)
            .args(["--agent", "/usr/bin/env"]),
    )
    .fails_with(&["dynamically linked"]);
    bake(&w.path().join("missing.img"), &[]).fails_with(&["no such image file"]);
    assert_eq!(
        sha256(&img),
        before,
        "every refusal left the image untouched"
    );

    // The default configuration allows no action.
    bake(&img, &[]).success();
    let out = Command::new("debugfs")
        .args(["-R", "cat /etc/cradle/agent.toml"])
        .arg(&img)
        .output()
        .unwrap();
    assert_eq!(
        out.stdout,
        std::fs::read(element().join("agent.toml")).unwrap()
    );
    let link = Command::new("debugfs")
        .args([
            "-R",
            "stat /etc/systemd/system/multi-user.target.wants/cradle-agent.service",
        ])
        .arg(&img)
        .output()
        .unwrap();
    let link = String::from_utf8_lossy(&link.stdout);
    assert!(
        link.contains("Fast link dest: \"/etc/systemd/system/cradle-agent.service\""),
        "{link}"
    );
}

/// The element's phase scripts, run as diskimage-builder runs them:
/// `extra-data.d` outside the chroot with `TMP_HOOKS_PATH` (and the
/// element's variables), then `install.d` inside the chroot of the root
/// tree, where the hooks directory is `/tmp/in_target.d`. An image of the
/// tree is then what `cradle bake` would make: baking it writes nothing.
#[test]
fn the_diskimage_builder_element_installs_exactly_what_bake_writes() {
    let tree = crate::agent::guest_tree();
    let w = tempfile::tempdir().unwrap();
    let target = w.path().join("target");
    // A copy of the Debian tree without its kernel modules (unused here).
    let copy = Command::new("rsync")
        .args(["-a", "--exclude=/usr/lib/modules/", "--exclude=/boot/"])
        .arg(format!("{}/", tree.join("tree").display()))
        .arg(&target)
        .output()
        .unwrap();
    assert!(
        copy.status.success(),
        "{}",
        String::from_utf8_lossy(&copy.stderr)
    );
    let hooks = w.path().join("hooks");
    std::fs::create_dir_all(&hooks).unwrap();
    let config = w.path().join("agent.toml");
    std::fs::write(
        &config,
        "poll = 3\n[actions]\nuptime = [\"/usr/bin/uptime\"]\n",
    )
    .unwrap();

    // Off without its variable.
    let off = Command::new(element().join("extra-data.d/50-cradle-agent"))
        .env("TMP_HOOKS_PATH", &hooks)
        .env_remove("DIB_CRADLE_AGENT_BIN")
        .output()
        .unwrap();
    assert!(off.status.success());
    assert!(String::from_utf8_lossy(&off.stdout).contains("DIB_CRADLE_AGENT_BIN is not set"));
    assert!(!hooks.join("cradle-agent").exists());
    // A configuration the agent refuses stops the build.
    let bad = w.path().join("bad.toml");
    std::fs::write(&bad, "poll = 0\n").unwrap();
    let refused = Command::new(element().join("extra-data.d/50-cradle-agent"))
        .env("TMP_HOOKS_PATH", &hooks)
        .env("DIB_CRADLE_AGENT_BIN", agent())
        .env("DIB_CRADLE_AGENT_CONF", &bad)
        .output()
        .unwrap();
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("poll = 0"));

    let staged = Command::new(element().join("extra-data.d/50-cradle-agent"))
        .env("TMP_HOOKS_PATH", &hooks)
        .env("DIB_CRADLE_AGENT_BIN", agent())
        .env("DIB_CRADLE_AGENT_CONF", &config)
        .output()
        .unwrap();
    assert!(
        staged.status.success(),
        "{}",
        String::from_utf8_lossy(&staged.stderr)
    );
    // diskimage-builder copies every element's hooks into the hooks
    // directory and binds it into the chroot as /tmp/in_target.d.
    let in_target = target.join("tmp/in_target.d");
    std::fs::create_dir_all(in_target.join("install.d")).unwrap();
    let cp = Command::new("cp")
        .arg("-a")
        .arg(hooks.join("cradle-agent"))
        .arg(&in_target)
        .status()
        .unwrap();
    assert!(cp.success());
    let script = in_target.join("install.d/50-cradle-agent");
    std::fs::copy(element().join("install.d/50-cradle-agent"), &script).unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let installed = Command::new("chroot")
        .arg(&target)
        .arg("/tmp/in_target.d/install.d/50-cradle-agent")
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .output()
        .unwrap();
    assert!(
        installed.status.success(),
        "{}",
        String::from_utf8_lossy(&installed.stderr)
    );
    std::fs::remove_dir_all(target.join("tmp/in_target.d")).unwrap();

    let img = w.path().join("element.img");
    assert_already_baked(&target, &img, "1G", &config);
    // And with another configuration, bake sees the difference.
    let other = bake(&img, &[]).success();
    assert!(
        other.stdout.contains("/etc/cradle/agent.toml"),
        "{}",
        other.stdout
    );
    assert!(
        !other.stdout.contains("/usr/local/bin/cradle-agent"),
        "{}",
        other.stdout
    );
}

/// Where `cargo xtask dib` puts diskimage-builder (xtask/src/dib.rs).
fn dib_venv() -> PathBuf {
    ci_cache("venv-diskimage-builder-3.43.0/bin/disk-image-create", "dib");
    ci_cache("venv-diskimage-builder-3.43.0", "dib")
}

/// The real `disk-image-create` builds Debian with the element (a tar
/// image: partitioned ones need device-mapper, which these machines lack).
/// The tree it made, as an ext4 image, holds exactly what `cradle bake`
/// writes: baking it writes nothing.
#[test]
fn disk_image_create_with_the_element_builds_an_image_bake_finds_already_baked() {
    let venv = dib_venv();
    let w = tempfile::tempdir().unwrap();
    let config = w.path().join("agent.toml");
    std::fs::write(
        &config,
        "user = \"root\"\n[actions]\nuptime = [\"/usr/bin/uptime\"]\n",
    )
    .unwrap();
    let out = w.path().join("debian-agent");
    let path = format!(
        "{}:/usr/sbin:/usr/bin:/sbin:/bin",
        venv.join("bin").display()
    );
    let built = Command::new(venv.join("bin/disk-image-create"))
        .args(["-t", "tar", "-o"])
        .arg(&out)
        .args(["debian-minimal", "cradle-agent"])
        .env("PATH", path)
        .env("ELEMENTS_PATH", element().parent().unwrap())
        .env("DIB_RELEASE", "bookworm")
        .env(
            "DIB_DEBIAN_SECURITY_MIRROR",
            "http://deb.debian.org/debian-security",
        )
        .env("DIB_CRADLE_AGENT_BIN", agent())
        .env("DIB_CRADLE_AGENT_CONF", &config)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&built.stdout).into_owned()
        + &String::from_utf8_lossy(&built.stderr);
    assert!(
        built.status.success(),
        "disk-image-create failed:\n{}",
        tail(&log, 60)
    );
    assert!(
        log.contains("cradle-agent"),
        "the element's phases did not run:\n{}",
        tail(&log, 60)
    );
    let tree = w.path().join("tree");
    std::fs::create_dir(&tree).unwrap();
    let untar = Command::new("tar")
        .arg("-xf")
        .arg(out.with_extension("tar"))
        .arg("-C")
        .arg(&tree)
        .arg("--same-owner")
        .output()
        .unwrap();
    assert!(
        untar.status.success(),
        "{}",
        String::from_utf8_lossy(&untar.stderr)
    );
    assert_already_baked(&tree, &w.path().join("dib.img"), "2G", &config);
}

/// `tree` as an ext4 image `img` holds exactly what `cradle bake` writes
/// with `config`: baking it writes nothing, and the image's bytes stay.
#[track_caller]
fn assert_already_baked(tree: &Path, img: &Path, size: &str, config: &Path) {
    mke2fs(tree, img, size);
    let before = sha256(img);
    let again = bake(img, &["--config", config.to_str().unwrap()]).success();
    assert!(
        again.stdout.contains("already baked; nothing written"),
        "{}",
        again.stdout
    );
    assert_eq!(sha256(img), before);
}

fn tail(s: &str, lines: usize) -> String {
    let all: Vec<&str> = s.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
