//! Overlaying onto ext4 disk images made by mke2fs (whole disk, and in an
//! MBR and a GPT partition made by sfdisk), read back with debugfs and
//! checked with `e2fsck -fn`; the same package on a directory gives the
//! same tree.

use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use cradle_personalize::{Limits, apply_to_dir, apply_to_image, filesystem_offset};

fn run(cmd: &mut Command) -> String {
    let out = cmd.stdin(Stdio::null()).output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A 64 MiB image: ext4 made from `seed` (a tree), whole or at 1 MiB in an
/// MBR or GPT partition.
fn image(dir: &Path, seed: &Path, table: Option<&str>) -> (PathBuf, String) {
    let img = dir.join(format!("disk-{}.img", table.unwrap_or("whole")));
    std::fs::File::create(&img)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let dev = match table {
        None => {
            run(Command::new("mke2fs")
                .args(["-q", "-t", "ext4", "-d"])
                .arg(seed)
                .arg(&img));
            img.display().to_string()
        }
        Some(label) => {
            let mut c = Command::new("sfdisk")
                .arg("-q")
                .arg(&img)
                .stdin(Stdio::piped())
                .spawn()
                .unwrap();
            write!(
                c.stdin.take().unwrap(),
                "label: {label}\nstart=2048, size=100000\n"
            )
            .unwrap();
            assert!(c.wait().unwrap().success());
            run(Command::new("mke2fs")
                .args(["-q", "-t", "ext4", "-E", "offset=1048576", "-d"])
                .arg(seed)
                .arg(&img)
                .arg("48M"));
            format!("{}?offset=1048576", img.display())
        }
    };
    (img, dev)
}

fn debugfs(dev: &str, request: &str) -> String {
    run(Command::new("debugfs").arg("-R").arg(request).arg(dev))
}

fn package(dir: &Path) -> PathBuf {
    let src = dir.join("pkg");
    std::fs::create_dir_all(src.join("etc/ssh")).unwrap();
    std::fs::create_dir_all(src.join("root")).unwrap();
    std::fs::write(src.join("etc/hostname"), b"web1\n").unwrap();
    std::fs::write(src.join("etc/ssh/host key"), b"secret \"key\"\n").unwrap();
    std::fs::set_permissions(
        src.join("etc/ssh/host key"),
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    std::os::unix::fs::symlink("hostname", src.join("etc/name")).unwrap();
    std::fs::hard_link(src.join("etc/hostname"), src.join("etc/hostname.link")).unwrap();
    // 3 MiB that gzip cannot shrink much (a run of one byte would pass the
    // default ratio cap, 100, and be refused as a bomb).
    let mut x = 0x2545F4914F6CDD1Du64;
    let big: Vec<u8> = (0..3 << 20)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    std::fs::write(src.join("root/big"), big).unwrap();
    let pkg = dir.join("p.tar.gz");
    run(Command::new("tar")
        .args(["--owner=1234", "--group=5678", "-czf"])
        .arg(&pkg)
        .arg("-C")
        .arg(&src)
        .arg("."));
    pkg
}

fn seed(dir: &Path) -> PathBuf {
    let s = dir.join("seed");
    std::fs::create_dir_all(s.join("etc")).unwrap();
    std::fs::write(s.join("etc/hostname"), b"old\n").unwrap();
    std::fs::write(s.join("etc/fstab"), b"# fstab\n").unwrap();
    std::os::unix::fs::symlink("/tmp", s.join("escape")).unwrap();
    s
}

#[test]
fn whole_disk_mbr_and_gpt_images_take_the_package() {
    let work = tempfile::tempdir().unwrap();
    let pkg = package(work.path());
    let seed = seed(work.path());
    for table in [None, Some("dos"), Some("gpt")] {
        let (img, dev) = image(work.path(), &seed, table);
        let part = table.map(|_| 1);
        assert_eq!(
            filesystem_offset(&img, part).unwrap(),
            if part.is_some() { 1 << 20 } else { 0 }
        );
        apply_to_image(&pkg, &img, part, &Limits::default()).unwrap();
        assert_eq!(debugfs(&dev, "cat /etc/hostname"), "web1\n", "{table:?}");
        assert_eq!(
            debugfs(&dev, "cat \"/etc/ssh/host key\""),
            "secret \"key\"\n"
        );
        assert_eq!(
            debugfs(&dev, "cat /etc/fstab"),
            "# fstab\n",
            "{table:?}: untouched"
        );
        let ls = debugfs(&dev, "ls -p /etc/ssh");
        assert!(
            ls.contains("/100600/1234/5678/host key/13/"),
            "{table:?}: {ls}"
        );
        let ls = debugfs(&dev, "ls -p /etc");
        assert!(ls.contains("/120777/1234/5678/name/8/"), "{ls}");
        let stat = debugfs(&dev, "stat /etc/hostname");
        assert!(stat.contains("Links: 2"), "{stat}");
        assert_eq!(debugfs(&dev, "cat /etc/hostname.link"), "web1\n");
        let big = Command::new("debugfs")
            .arg("-R")
            .arg("cat /root/big")
            .arg(&dev)
            .output()
            .unwrap();
        assert_eq!(
            big.stdout,
            std::fs::read(work.path().join("pkg/root/big")).unwrap()
        );
        // e2fsck, read-only, forced: clean.
        let out = Command::new("e2fsck")
            .args(["-fn"])
            .arg(&dev)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{table:?}: e2fsck: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn the_same_package_on_a_directory_and_an_image_gives_the_same_tree() {
    let work = tempfile::tempdir().unwrap();
    let pkg = package(work.path());
    let seed = seed(work.path());
    let (img, dev) = image(work.path(), &seed, None);
    apply_to_image(&pkg, &img, None, &Limits::default()).unwrap();
    let tree = work.path().join("tree");
    run(Command::new("cp").arg("-a").arg(&seed).arg(&tree));
    apply_to_dir(&pkg, &tree, &Limits::default()).unwrap();
    let dumped = work.path().join("dumped");
    std::fs::create_dir(&dumped).unwrap();
    debugfs(&dev, &format!("rdump / {}", dumped.display()));
    for p in [
        "etc/hostname",
        "etc/ssh/host key",
        "etc/hostname.link",
        "root/big",
        "etc/fstab",
    ] {
        let a = std::fs::symlink_metadata(tree.join(p)).unwrap();
        let b = std::fs::symlink_metadata(dumped.join(p)).unwrap();
        assert_eq!(
            std::fs::read(tree.join(p)).unwrap(),
            std::fs::read(dumped.join(p)).unwrap(),
            "{p}"
        );
        assert_eq!(a.mode(), b.mode(), "{p}");
        assert_eq!((a.uid(), a.gid()), (b.uid(), b.gid()), "{p}");
    }
    assert_eq!(
        std::fs::read_link(tree.join("etc/name")).unwrap(),
        std::fs::read_link(dumped.join("etc/name")).unwrap()
    );
}

#[test]
fn refused_packages_leave_the_image_byte_identical() {
    let work = tempfile::tempdir().unwrap();
    let seed = seed(work.path());
    let (img, _) = image(work.path(), &seed, Some("dos"));
    let before = std::fs::read(&img).unwrap();
    // Through the image's own symlink.
    let src = work.path().join("bad");
    std::fs::create_dir_all(src.join("escape")).unwrap();
    std::fs::write(src.join("escape/owned"), b"x").unwrap();
    let pkg = work.path().join("bad.tar.gz");
    // Only the file, not its directory: the image's symlink is in its way.
    run(Command::new("tar")
        .arg("-czf")
        .arg(&pkg)
        .arg("-C")
        .arg(&src)
        .arg("escape/owned"));
    let e = apply_to_image(&pkg, &img, Some(1), &Limits::default()).unwrap_err();
    assert!(
        e.to_string()
            .contains("/escape in the image is a symlink; the package would write through it"),
        "{e}"
    );
    // Not an ext filesystem where asked.
    let e = apply_to_image(&pkg, &img, None, &Limits::default()).unwrap_err();
    assert!(e.to_string().contains("no ext2/3/4 filesystem"), "{e}");
    let e = apply_to_image(&pkg, &img, Some(3), &Limits::default()).unwrap_err();
    assert!(e.to_string().contains("partition 3 is unused"), "{e}");
    assert!(std::fs::read(&img).unwrap() == before, "the image changed");
    assert!(std::fs::metadata(&img).unwrap().len() == 64 << 20);
}
