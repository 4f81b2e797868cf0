//! `cradle personalize` on packages made by GNU tar from real trees.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;

use crate::harness::{Run, cradle_command};

fn tar_czf(out: &Path, dir: &Path) {
    let st = Command::new("tar")
        .arg("-czf")
        .arg(out)
        .arg("-C")
        .arg(dir)
        .arg(".")
        .status()
        .unwrap();
    assert!(st.success());
}

#[test]
fn check_and_apply_a_package_made_by_tar() {
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    std::fs::create_dir_all(src.join("etc/ssh")).unwrap();
    std::fs::write(src.join("etc/hostname"), b"web1\n").unwrap();
    std::fs::write(src.join("etc/ssh/key"), b"secret-key\n").unwrap();
    std::fs::set_permissions(
        src.join("etc/ssh/key"),
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    std::os::unix::fs::symlink("hostname", src.join("etc/name")).unwrap();
    let pkg = work.path().join("web1.tar.gz");
    tar_czf(&pkg, &src);

    let out = Run::of(cradle_command().args(["personalize", "check"]).arg(&pkg)).success();
    assert!(
        out.stdout.contains("f 0600 0:0 etc/ssh/key (11 bytes)"),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout.contains("l 0777 0:0 etc/name -> hostname"),
        "{}",
        out.stdout
    );

    let root = work.path().join("root");
    std::fs::create_dir_all(root.join("etc")).unwrap();
    std::fs::write(root.join("etc/hostname"), b"old\n").unwrap();
    Run::of(
        cradle_command()
            .args(["personalize", "apply"])
            .arg(&pkg)
            .arg("--to")
            .arg(&root),
    )
    .success();
    assert_eq!(std::fs::read(root.join("etc/hostname")).unwrap(), b"web1\n");
    assert_eq!(
        std::fs::read(root.join("etc/ssh/key")).unwrap(),
        b"secret-key\n"
    );
    assert_eq!(
        std::fs::metadata(root.join("etc/ssh/key")).unwrap().mode() & 0o777,
        0o600
    );
    assert_eq!(
        std::fs::read_link(root.join("etc/name")).unwrap(),
        Path::new("hostname")
    );
}

#[test]
fn refused_packages_name_the_entry_and_write_nothing() {
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("a"), b"x").unwrap();
    let st = Command::new("mkfifo")
        .arg(src.join("pipe"))
        .status()
        .unwrap();
    assert!(st.success());
    let pkg = work.path().join("bad.tgz");
    tar_czf(&pkg, &src);
    Run::of(cradle_command().args(["personalize", "check"]).arg(&pkg))
        .fails_with(&["\"./pipe\"", "a FIFO"]);
    let root = work.path().join("root");
    std::fs::create_dir(&root).unwrap();
    Run::of(
        cradle_command()
            .args(["personalize", "apply"])
            .arg(&pkg)
            .arg("--to")
            .arg(&root),
    )
    .fails_with(&["a FIFO"]);
    assert_eq!(std::fs::read_dir(&root).unwrap().count(), 0);

    let zip = work.path().join("pkg.zip");
    std::fs::copy(&pkg, &zip).unwrap();
    Run::of(cradle_command().args(["personalize", "check"]).arg(&zip))
        .fails_with(&[".tar.gz or .tgz"]);
}

#[test]
fn apply_writes_into_an_ext4_image() {
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    std::fs::create_dir_all(src.join("etc")).unwrap();
    std::fs::write(src.join("etc/motd"), b"hello from cradle\n").unwrap();
    let pkg = work.path().join("p.tgz");
    tar_czf(&pkg, &src);
    let img = work.path().join("disk.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(32 << 20)
        .unwrap();
    let st = Command::new("mke2fs")
        .args(["-q", "-t", "ext4"])
        .arg(&img)
        .status()
        .unwrap();
    assert!(st.success());
    Run::of(
        cradle_command()
            .args(["personalize", "apply"])
            .arg(&pkg)
            .arg("--to")
            .arg(&img),
    )
    .success();
    let out = Command::new("debugfs")
        .args(["-R", "cat /etc/motd"])
        .arg(&img)
        .output()
        .unwrap();
    assert_eq!(out.stdout, b"hello from cradle\n");
    Run::of(
        cradle_command()
            .args(["personalize", "apply"])
            .arg(&pkg)
            .arg("--to")
            .arg(&img)
            .args(["--partition", "1"]),
    )
    .fails_with(&["no MBR or GPT partition table"]);
    Run::of(
        cradle_command()
            .args(["personalize", "apply"])
            .arg(&pkg)
            .arg("--to")
            .arg(work.path())
            .args(["--partition", "1"]),
    )
    .fails_with(&["--partition is for disk images"]);
}

#[test]
fn check_a_url_with_a_pinned_sha256() {
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    std::fs::create_dir_all(src.join("etc")).unwrap();
    std::fs::write(src.join("etc/motd"), b"hi\n").unwrap();
    let pkg = work.path().join("p.tar.gz");
    tar_czf(&pkg, &src);
    let out = Command::new("sha256sum").arg(&pkg).output().unwrap();
    let sum = String::from_utf8(out.stdout).unwrap();
    let sum = sum.split_whitespace().next().unwrap();
    let url = format!("file://{}", pkg.display());
    let ok =
        Run::of(cradle_command().args(["personalize", "check", &url, "--sha256", sum])).success();
    assert!(ok.stdout.contains("etc/motd"), "{}", ok.stdout);
    let wrong = "0".repeat(64);
    Run::of(cradle_command().args(["personalize", "check", &url, "--sha256", &wrong]))
        .fails_with(&["not the pinned"]);
    Run::of(
        cradle_command()
            .args(["personalize", "check", "--sha256", &wrong])
            .arg(&pkg),
    )
    .fails_with(&["not the pinned"]);
}
