//! Overlaying onto ext4 disk images made by mke2fs (whole disk, and in an
//! MBR and a GPT partition made by sfdisk), read back with debugfs and
//! checked with `e2fsck -fn`; the same package on a directory gives the
//! same tree.

use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use cradle_personalize::{
    Control, Error, Limits, Phase, apply_to_dir, apply_to_image, apply_to_image_with,
    filesystem_offset, read_back,
};

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

/// The permission bits of `p` in the image, from `debugfs stat`.
fn image_mode(dev: &str, p: &str) -> u32 {
    let stat = debugfs(dev, &format!("stat \"/{p}\""));
    let mode = stat
        .split("Mode:")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .unwrap_or_else(|| panic!("no mode for {p}: {stat}"));
    u32::from_str_radix(mode, 8).unwrap()
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
    // A second package, owned by root, over the first: directories that
    // exist (owned by 1234) change owner, a file without owner-read and a
    // setuid file keep their modes.
    let src = work.path().join("pkg2");
    std::fs::create_dir_all(src.join("etc")).unwrap();
    std::fs::create_dir_all(src.join("usr/bin")).unwrap();
    std::fs::write(src.join("etc/write-only"), b"w\n").unwrap();
    std::fs::write(src.join("usr/bin/tool"), b"#!/bin/true\n").unwrap();
    for (p, mode) in [("etc/write-only", 0o200), ("usr/bin/tool", 0o4755)] {
        std::fs::set_permissions(src.join(p), std::fs::Permissions::from_mode(mode)).unwrap();
    }
    let pkg2 = work.path().join("p2.tgz");
    run(Command::new("tar")
        .args(["--owner=0", "--group=0", "--mtime=@1600000000", "-czf"])
        .arg(&pkg2)
        .arg("-C")
        .arg(&src)
        .arg("."));
    let setid = Limits {
        allow_setid: true,
        ..Limits::default()
    };
    apply_to_image(&pkg2, &img, None, &setid).unwrap();
    apply_to_dir(&pkg2, &tree, &setid).unwrap();
    let dumped = work.path().join("dumped");
    std::fs::create_dir(&dumped).unwrap();
    debugfs(&dev, &format!("rdump / {}", dumped.display()));
    for p in [
        "etc",
        "etc/hostname",
        "etc/ssh/host key",
        "etc/hostname.link",
        "root/big",
        "etc/fstab",
        "etc/write-only",
        "usr/bin/tool",
    ] {
        let a = std::fs::symlink_metadata(tree.join(p)).unwrap();
        let b = std::fs::symlink_metadata(dumped.join(p)).unwrap();
        if a.is_file() {
            assert_eq!(
                std::fs::read(tree.join(p)).unwrap(),
                std::fs::read(dumped.join(p)).unwrap(),
                "{p}"
            );
        }
        assert_eq!(a.file_type(), b.file_type(), "{p}");
        // From the inode itself: rdump's chown after chmod drops setuid.
        assert_eq!(a.mode() & 0o7777, image_mode(&dev, p), "{p}");
        assert_eq!((a.uid(), a.gid()), (b.uid(), b.gid()), "{p}");
        assert_eq!(a.mtime(), b.mtime(), "{p}");
    }
    let etc = std::fs::metadata(dumped.join("etc")).unwrap();
    assert_eq!((etc.uid(), etc.mtime()), (0, 1_600_000_000));
    assert_eq!(image_mode(&dev, "usr/bin/tool"), 0o4755);
    assert_eq!(image_mode(&dev, "etc/write-only"), 0o200);
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

/// A package of `n` files of 8 KiB each that gzip cannot shrink much: enough
/// debugfs commands (a `write` and a `sif` each) to kill debugfs among them.
fn many_files(dir: &Path, n: usize) -> PathBuf {
    let src = dir.join("many");
    let mut x = 0x9E3779B97F4A7C15u64;
    for i in 0..n {
        let d = src.join(format!("srv/d{}", i / 100));
        std::fs::create_dir_all(&d).unwrap();
        let data: Vec<u8> = (0..8192)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        std::fs::write(d.join(format!("f{i}")), data).unwrap();
    }
    let pkg = dir.join("many.tar.gz");
    run(Command::new("tar")
        .args(["--owner=0", "--group=0", "-czf"])
        .arg(&pkg)
        .arg("-C")
        .arg(&src)
        .arg("."));
    pkg
}

/// The pids of `debugfs -w` processes with an argument under `dir`.
fn debugfs_writers(dir: &Path) -> Vec<u32> {
    let dir = dir.display().to_string();
    let mut pids = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<String> = cmdline
            .split(|&b| b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        if args.first().is_some_and(|a| a.ends_with("debugfs"))
            && args.iter().any(|a| a == "-w")
            && args.iter().any(|a| a.starts_with(&dir))
        {
            pids.push(pid);
        }
    }
    pids
}

#[test]
fn debugfs_killed_halfway_leaves_the_image_as_it_was() {
    let work = tempfile::tempdir().unwrap();
    let seed = seed(work.path());
    let (img, dev) = image(work.path(), &seed, Some("gpt"));
    let pkg = many_files(work.path(), 1500);
    let before = work.path().join("before.img");
    run(Command::new("cp")
        .arg("--sparse=always")
        .arg(&img)
        .arg(&before));
    let files_before: Vec<_> = std::fs::read_dir(work.path()).unwrap().collect();

    // When debugfs has echoed a third of its commands, SIGKILL it: from
    // the progress callback, which runs while debugfs writes.
    let killed = std::sync::Mutex::new(None::<u32>);
    let progress = |phase: Phase, done: u64, total: u64| {
        let mut k = killed.lock().unwrap();
        if phase == Phase::Write && k.is_none() && done * 3 >= total && done > 0 {
            let pids = debugfs_writers(work.path());
            assert_eq!(pids.len(), 1, "one debugfs -w on this image: {pids:?}");
            run(Command::new("kill").arg("-KILL").arg(pids[0].to_string()));
            *k = Some(pids[0]);
        }
    };
    let control = Control {
        progress: Some(&progress),
        cancel: None,
    };
    let err = apply_to_image_with(&pkg, &img, Some(1), &Limits::default(), &control).unwrap_err();
    assert!(killed.lock().unwrap().is_some(), "debugfs finished first");
    let Error::Debugfs {
        image,
        reason,
        unchanged,
    } = &err
    else {
        panic!("not Error::Debugfs: {err:?}");
    };
    assert_eq!(image, &img);
    assert!(unchanged);
    assert_eq!(reason, "debugfs was killed (signal: 9 (SIGKILL))");
    assert_eq!(
        err.to_string(),
        format!(
            "debugfs was killed (signal: 9 (SIGKILL)) while writing {}; the image is unchanged",
            img.display()
        )
    );

    // The image is byte for byte what it was, and its copy is gone.
    run(Command::new("cmp").arg(&before).arg(&img));
    let files_after: Vec<_> = std::fs::read_dir(work.path()).unwrap().collect();
    assert_eq!(files_after.len(), files_before.len(), "a copy was left");
    let fsck = |what: &str| {
        let out = Command::new("e2fsck")
            .arg("-fn")
            .arg(&dev)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{what}: e2fsck: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    };
    fsck("after debugfs was killed");
    assert_eq!(read_back(&img, Some(1), "srv/d0/f0").unwrap(), None);

    // Applied again, undisturbed: all of it is there, and the image keeps
    // its mode.
    let mode = std::fs::metadata(&img).unwrap().permissions().mode();
    apply_to_image(&pkg, &img, Some(1), &Limits::default()).unwrap();
    fsck("after a whole apply");
    let last = read_back(&img, Some(1), "srv/d14/f1499").unwrap().unwrap();
    assert_eq!(last.content.len(), 8192);
    assert_eq!(std::fs::metadata(&img).unwrap().permissions().mode(), mode);
    let files_after: Vec<_> = std::fs::read_dir(work.path()).unwrap().collect();
    assert_eq!(files_after.len(), files_before.len(), "a copy was left");
}
