//! Packages built by the tests (a malicious corpus and good ones), verified
//! and overlaid onto directory trees; a refused package must leave the
//! target byte-identical.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use cradle_personalize::{Error, Limits, apply_to_dir, verify};

/// One archive member, written with raw header fields so that the corpus
/// can hold what `tar::Builder` itself refuses to write.
struct Member<'a> {
    name: &'a [u8],
    kind: tar::EntryType,
    data: &'a [u8],
    link: &'a [u8],
    mode: u32,
}

fn member<'a>(name: &'a [u8], kind: tar::EntryType, data: &'a [u8]) -> Member<'a> {
    Member {
        name,
        kind,
        data,
        link: b"",
        mode: if kind == tar::EntryType::Directory {
            0o755
        } else {
            0o644
        },
    }
}

fn link<'a>(name: &'a [u8], kind: tar::EntryType, target: &'a [u8]) -> Member<'a> {
    Member {
        name,
        kind,
        data: b"",
        link: target,
        mode: 0o777,
    }
}

fn tar_bytes(members: &[Member<'_>]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for m in members {
        let mut h = tar::Header::new_gnu();
        {
            let g = h.as_gnu_mut().unwrap();
            g.name[..m.name.len()].copy_from_slice(m.name);
            g.linkname[..m.link.len()].copy_from_slice(m.link);
        }
        h.set_entry_type(m.kind);
        h.set_size(m.data.len() as u64);
        h.set_mode(m.mode);
        h.set_uid(1234);
        h.set_gid(5678);
        h.set_mtime(1_700_000_000);
        h.set_cksum();
        b.append(&h, m.data).unwrap();
    }
    b.into_inner().unwrap()
}

fn gz(bytes: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

fn package(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

/// Everything about a tree that an overlay could change.
fn snapshot(root: &Path) -> BTreeMap<PathBuf, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            let m = std::fs::symlink_metadata(&p).unwrap();
            let what = if m.file_type().is_symlink() {
                format!("link {:?}", std::fs::read_link(&p).unwrap())
            } else if m.is_dir() {
                stack.push(p.clone());
                "dir".into()
            } else {
                format!("file {:?}", std::fs::read(&p).unwrap())
            };
            out.insert(
                p.strip_prefix(root).unwrap().to_path_buf(),
                format!(
                    "{what} mode {:o} uid {} mtime {}",
                    m.mode(),
                    m.uid(),
                    m.mtime()
                ),
            );
        }
    }
    out
}

/// A target with a few files, and a symlink pointing out of it.
fn target(outside: &Path) -> tempfile::TempDir {
    let t = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(t.path().join("etc")).unwrap();
    std::fs::write(t.path().join("etc/hostname"), b"old\n").unwrap();
    std::os::unix::fs::symlink(outside, t.path().join("escape")).unwrap();
    t
}

#[test]
fn malicious_packages_are_refused_and_change_nothing() {
    use tar::EntryType::*;
    let work = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    let tight = Limits {
        max_entries: 100,
        max_ratio: 100,
        ..Limits::default()
    };
    let many: Vec<(String, Vec<u8>)> = (0..101).map(|i| (format!("f{i}"), vec![b'x'])).collect();
    let many_members: Vec<Member<'_>> = many
        .iter()
        .map(|(n, d)| member(n.as_bytes(), Regular, d))
        .collect();
    let zeros = vec![0u8; 20 << 20];
    let good = gz(&tar_bytes(&[member(b"etc/motd", Regular, b"hi")]));

    let corpus: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "traversal",
            gz(&tar_bytes(&[member(b"etc/../../x", Regular, b"x")])),
            "'..'",
        ),
        (
            "absolute",
            gz(&tar_bytes(&[member(b"/etc/passwd", Regular, b"x")])),
            "absolute",
        ),
        (
            "symlink escape",
            gz(&tar_bytes(&[
                link(b"l", Symlink, outside.path().as_os_str().as_bytes()),
                member(b"l/owned", Regular, b"x"),
            ])),
            "a symlink earlier in the package",
        ),
        (
            "write through an earlier relative symlink",
            gz(&tar_bytes(&[
                member(b"d", Directory, b""),
                link(b"d/up", Symlink, b"../.."),
                member(b"d/up/owned", Regular, b"x"),
            ])),
            "a symlink earlier in the package",
        ),
        (
            "symlink already on the target",
            gz(&tar_bytes(&[member(b"escape/owned", Regular, b"x")])),
            "is a symlink; the package would write through it",
        ),
        (
            "hardlink escape",
            gz(&tar_bytes(&[link(b"h", Link, b"/etc/shadow")])),
            "absolute",
        ),
        (
            "hardlink to a later entry",
            gz(&tar_bytes(&[
                link(b"h", Link, b"f"),
                member(b"f", Regular, b"x"),
            ])),
            "not an earlier regular file",
        ),
        (
            "device node",
            gz(&tar_bytes(&[member(b"dev/sda", Block, b"")])),
            "a device node",
        ),
        (
            "char device",
            gz(&tar_bytes(&[member(b"dev/null", Char, b"")])),
            "a device node",
        ),
        ("fifo", gz(&tar_bytes(&[member(b"p", Fifo, b"")])), "a FIFO"),
        (
            "gzip bomb",
            gz(&tar_bytes(&[member(b"zeros", Regular, &zeros)])),
            "gzip bomb",
        ),
        (
            "truncated gzip",
            good[..good.len() - 12].to_vec(),
            "truncated",
        ),
        (
            "not gzip",
            tar_bytes(&[member(b"etc/motd", Regular, b"hi")]),
            "not a gzip stream",
        ),
        (
            "too many entries",
            gz(&tar_bytes(&many_members)),
            "more than 100 entries",
        ),
        (
            "non-UTF-8 name",
            gz(&tar_bytes(&[member(b"etc/\xff\xfe", Regular, b"x")])),
            "not UTF-8",
        ),
        (
            "newline in a name",
            gz(&tar_bytes(&[member(b"etc/a\nb", Regular, b"x")])),
            "control character",
        ),
        (
            "setuid",
            gz(&tar_bytes(&[Member {
                mode: 0o4755,
                ..member(b"bin/su", Regular, b"x")
            }])),
            "setuid or setgid",
        ),
        (
            "a file over a directory on the target",
            gz(&tar_bytes(&[member(b"etc", Regular, b"x")])),
            "is a directory",
        ),
        (
            "a path through an earlier file",
            gz(&tar_bytes(&[
                member(b"f", Regular, b"1"),
                member(b"f/g", Regular, b"2"),
            ])),
            "not a directory in the package",
        ),
        (
            "the same path twice",
            gz(&tar_bytes(&[
                member(b"a", Regular, b"1"),
                member(b"a", Regular, b"2"),
            ])),
            "the same path twice",
        ),
    ];
    for (name, bytes, needle) in corpus {
        let t = target(outside.path());
        let before = snapshot(t.path());
        let pkg = package(work.path(), "p.tar.gz", &bytes);
        let e = apply_to_dir(&pkg, t.path(), &tight).expect_err(name);
        assert!(e.to_string().contains(needle), "{name}: {e}");
        if !matches!(e, Error::Target { .. }) {
            let v = verify(&pkg, &tight).expect_err(name);
            assert_eq!(v.to_string(), e.to_string(), "{name}");
        }
        assert_eq!(snapshot(t.path()), before, "{name}: the target changed");
        assert_eq!(
            std::fs::read_dir(outside.path()).unwrap().count(),
            0,
            "{name}: wrote outside"
        );
    }
}

#[test]
fn a_good_package_is_overlaid_with_modes_owners_links_and_times() {
    use tar::EntryType::*;
    let work = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    let t = target(outside.path());
    // A symlink where the package puts a file: the link is replaced, not followed.
    std::os::unix::fs::symlink(outside.path().join("x"), t.path().join("etc/issue")).unwrap();
    let pkg = package(
        work.path(),
        "p.tgz",
        &gz(&tar_bytes(&[
            Member {
                mode: 0o750,
                ..member(b"./root/", Directory, b"")
            },
            Member {
                mode: 0o600,
                ..member(
                    b"root/.ssh/authorized_keys",
                    Regular,
                    b"ssh-ed25519 AAAA key\n",
                )
            },
            member(b"etc/hostname", Regular, b"web1\n"),
            member(b"etc/issue", Regular, b"welcome\n"),
            link(b"etc/localtime", Symlink, b"/usr/share/zoneinfo/UTC"),
            link(b"etc/hostname.bak", Link, b"etc/hostname"),
            Member {
                mode: 0o4755,
                ..member(b"usr/bin/tool", Regular, b"#!/bin/sh\n")
            },
        ])),
    );
    let refused = apply_to_dir(&pkg, t.path(), &Limits::default()).unwrap_err();
    assert!(refused.to_string().contains("setuid"), "{refused}");
    let m = apply_to_dir(
        &pkg,
        t.path(),
        &Limits {
            allow_setid: true,
            ..Limits::default()
        },
    )
    .unwrap();
    assert_eq!(m.entries.len(), 7);
    let r = t.path();
    assert_eq!(std::fs::read(r.join("etc/hostname")).unwrap(), b"web1\n");
    assert_eq!(
        std::fs::read(r.join("root/.ssh/authorized_keys")).unwrap(),
        b"ssh-ed25519 AAAA key\n"
    );
    let meta = |p: &str| std::fs::symlink_metadata(r.join(p)).unwrap();
    assert_eq!(meta("root").mode() & 0o7777, 0o750);
    assert_eq!(meta("root/.ssh/authorized_keys").mode() & 0o7777, 0o600);
    assert_eq!(meta("usr/bin/tool").mode() & 0o7777, 0o4755);
    assert_eq!(
        (meta("etc/hostname").uid(), meta("etc/hostname").gid()),
        (1234, 5678)
    );
    assert_eq!(meta("etc/hostname").mtime(), 1_700_000_000);
    assert_eq!(meta("root").mtime(), 1_700_000_000);
    assert!(meta("etc/issue").is_file());
    assert!(!outside.path().join("x").exists());
    assert_eq!(
        std::fs::read_link(r.join("etc/localtime")).unwrap(),
        Path::new("/usr/share/zoneinfo/UTC")
    );
    assert_eq!(meta("etc/localtime").uid(), 1234);
    assert_eq!(meta("etc/hostname.bak").ino(), meta("etc/hostname").ino());
    // Parents the package did not list are made too (mode 0755 less umask).
    assert!(meta("usr/bin").is_dir());
    // Nothing temporary is left.
    let left: Vec<_> = snapshot(r)
        .into_keys()
        .filter(|p| p.to_string_lossy().contains(".cradle-personalize"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
    assert_eq!(std::fs::Permissions::from_mode(0o755).mode(), 0o755);
}
