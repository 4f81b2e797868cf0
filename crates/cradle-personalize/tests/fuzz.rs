//! Generated and damaged packages (tar.gz with `..`, absolute paths,
//! symlinks and hardlinks pointing out, device nodes, sizes past the data,
//! truncated or flipped gzip): `verify` never panics and never accepts an
//! entry that escapes, and `apply_to_dir` never writes outside its target,
//! which is checked by looking at the filesystem around the target
//! afterwards (a sibling directory that a symlink in the target points at,
//! and the directory holding both). A package that verified is also
//! written with `apply_to_image` into partition 1 of an MBR image holding
//! the same tree: nothing outside the partition changes, `e2fsck -fn` is
//! clean, and the image's tree (`debugfs rdump`) is the directory's. The
//! image needs e2fsprogs and fdisk (`apt-get install e2fsprogs fdisk`).
//!
//! Cases per property: `CRADLE_FUZZ_CASES` (`cargo xtask fuzz` sets it and
//! `PROPTEST_RNG_SEED`); the default keeps `cargo test` quick.

use std::collections::{BTreeMap, HashSet};
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use cradle_personalize::{Error, Kind, Limits, Manifest, apply_to_dir, apply_to_image, verify};
use proptest::prelude::*;

fn cases(default: u32) -> ProptestConfig {
    let cases = std::env::var("CRADLE_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default);
    ProptestConfig {
        cases,
        ..ProptestConfig::default()
    }
}

/// One archive member, written with raw header fields so that the
/// packages can hold what `tar::Builder` itself refuses to write.
#[derive(Debug, Clone)]
struct Member {
    name: Vec<u8>,
    kind: u8,
    link: Vec<u8>,
    data: Vec<u8>,
    /// A size field other than the data's length.
    size: Option<u64>,
    mode: u32,
}

fn name() -> impl Strategy<Value = Vec<u8>> {
    let part = prop::sample::select(vec![
        "a", "b", "etc", "..", ".", "", "escape", "x", "a b", "é",
    ]);
    prop_oneof![
        8 => (
            prop::sample::select(vec!["", "", "", "", "./", "./", "/", "../", "//"]),
            prop::collection::vec(part, 1..4),
            prop::sample::select(vec!["", "", "/"]),
        )
            .prop_map(|(lead, parts, tail)| format!("{lead}{}{tail}", parts.join("/")).into_bytes()),
        1 => prop::collection::vec(any::<u8>(), 1..20),
        1 => Just(b"a\nb".to_vec()),
    ]
}

fn link_target() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::sample::select(vec![
            "..",
            "../outside",
            "../outside/canary",
            "/",
            "/etc/passwd",
            "a",
            "a/b",
            "x",
            "escape",
            "escape/canary",
            "./a",
            "a/../..",
            "",
        ])
        .prop_map(|s| s.as_bytes().to_vec()),
        prop::collection::vec(any::<u8>(), 0..12),
    ]
}

fn member() -> impl Strategy<Value = Member> {
    let kind = prop_oneof![
        4 => Just(b'0'),
        3 => Just(b'5'),
        2 => Just(b'2'),
        2 => Just(b'1'),
        // NUL (old regular file), char and block devices, FIFO, contiguous,
        // sparse, global and per-file pax, GNU long names, a volume label.
        1 => prop::sample::select(vec![0u8, b'3', b'4', b'6', b'7', b'S', b'g', b'x', b'L', b'K', b'V']),
        1 => any::<u8>(),
    ];
    let mode = prop_oneof![
        4 => Just(0o644u32),
        2 => Just(0o755),
        1 => Just(0o4755),
        1 => Just(0o1777),
        1 => Just(0),
        1 => any::<u32>().prop_map(|m| m & 0o7777),
    ];
    (
        name(),
        kind,
        link_target(),
        prop::collection::vec(any::<u8>(), 0..600),
        prop::option::weighted(
            0.15,
            prop_oneof![Just(u64::MAX >> 4), any::<u64>(), 0u64..2048],
        ),
        mode,
    )
        .prop_map(|(name, kind, link, data, size, mode)| Member {
            name,
            kind,
            link,
            data,
            size,
            mode,
        })
}

/// A member a real package could hold: a file, directory, symlink (which
/// may point anywhere) or hardlink, over a few names so that paths meet
/// (through each other's symlinks, twice, under files).
fn plain_member() -> impl Strategy<Value = Member> {
    // Names debugfs's command language must quote, too.
    let part = prop::sample::select(vec![
        "a",
        "b",
        "etc",
        "x",
        "é",
        "sp ace",
        "q\"uote",
        "back\\slash",
        "'",
        "#h",
        "-d",
        "$x",
    ]);
    (
        prop::sample::select(vec!["", "./"]),
        prop::collection::vec(part, 1..4),
        prop::sample::select(b"0000000555221".to_vec()),
        link_target(),
        prop::collection::vec(any::<u8>(), 0..600),
    )
        .prop_map(|(lead, parts, kind, link, data)| Member {
            name: format!("{lead}{}", parts.join("/")).into_bytes(),
            kind,
            link,
            data: if matches!(kind, b'0') {
                data
            } else {
                Vec::new()
            },
            size: None,
            mode: if kind == b'5' { 0o755 } else { 0o644 },
        })
}

/// Plain members with a few hostile ones among them.
fn members() -> impl Strategy<Value = Vec<Member>> {
    (
        prop::collection::vec(plain_member(), 0..8),
        prop::collection::vec((any::<usize>(), member()), 0..2),
    )
        .prop_map(|(mut plain, hostile)| {
            for (at, m) in hostile {
                plain.insert(at % (plain.len() + 1), m);
            }
            plain
        })
}

fn tar_bytes(members: &[Member]) -> Vec<u8> {
    let mut out = Vec::new();
    for m in members {
        let mut h = tar::Header::new_gnu();
        {
            let g = h.as_gnu_mut().unwrap();
            let n = m.name.len().min(g.name.len());
            g.name[..n].copy_from_slice(&m.name[..n]);
            let l = m.link.len().min(g.linkname.len());
            g.linkname[..l].copy_from_slice(&m.link[..l]);
        }
        h.set_entry_type(tar::EntryType::new(m.kind));
        h.set_size(m.size.unwrap_or(m.data.len() as u64));
        h.set_mode(m.mode);
        h.set_uid(1234);
        h.set_gid(5678);
        h.set_mtime(1_700_000_000);
        h.set_cksum();
        out.extend_from_slice(h.as_bytes());
        out.extend_from_slice(&m.data);
        out.resize(out.len().div_ceil(512) * 512, 0);
    }
    out.resize(out.len() + 1024, 0);
    out
}

fn gz(bytes: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

/// Damage to the tar stream or to the gzip around it.
#[derive(Debug, Clone)]
enum Damage {
    None,
    FlipTar(Vec<(usize, u8)>),
    FlipGzip(Vec<(usize, u8)>),
    TruncateGzip(usize),
    NotGzip,
}

fn damage() -> impl Strategy<Value = Damage> {
    let flips = prop::collection::vec((any::<usize>(), any::<u8>()), 1..8);
    prop_oneof![
        12 => Just(Damage::None),
        2 => flips.clone().prop_map(Damage::FlipTar),
        2 => flips.prop_map(Damage::FlipGzip),
        1 => any::<usize>().prop_map(Damage::TruncateGzip),
        1 => Just(Damage::NotGzip),
    ]
}

fn flip(bytes: &mut [u8], flips: &[(usize, u8)]) {
    if bytes.is_empty() {
        return;
    }
    let n = bytes.len();
    for (i, b) in flips {
        bytes[i % n] ^= (*b).max(1);
    }
}

fn package_bytes(members: &[Member], damage: &Damage) -> Vec<u8> {
    let mut tar = tar_bytes(members);
    if let Damage::FlipTar(f) = damage {
        flip(&mut tar, f);
    }
    let mut out = match damage {
        Damage::NotGzip => tar,
        _ => gz(&tar),
    };
    match damage {
        Damage::FlipGzip(f) => flip(&mut out, f),
        Damage::TruncateGzip(n) => out.truncate(n % (out.len() + 1)),
        _ => {}
    }
    out
}

/// A normal relative path: components joined by `/`, none empty, `.` or
/// `..`, nothing absolute, no control characters.
fn is_normal(p: &str) -> bool {
    !p.is_empty()
        && !p.starts_with('/')
        && !p.chars().any(char::is_control)
        && p.split('/').all(|c| !c.is_empty() && c != "." && c != "..")
}

/// What `verify` promises of a package it accepts.
fn check_manifest(m: &Manifest) -> Result<(), TestCaseError> {
    let mut seen: BTreeMap<&str, &Kind> = BTreeMap::new();
    let mut parents: HashSet<String> = HashSet::new();
    for e in &m.entries {
        prop_assert!(is_normal(&e.path), "accepted path {:?}", e.path);
        prop_assert!(e.mode & 0o6000 == 0, "setid accepted: {:?}", e);
        // No earlier symlink or file on its way.
        let comps: Vec<&str> = e.path.split('/').collect();
        for i in 1..comps.len() {
            let prefix = comps[..i].join("/");
            if let Some(k) = seen.get(prefix.as_str()) {
                prop_assert!(
                    **k == Kind::Dir,
                    "{:?} goes through {:?} ({:?})",
                    e.path,
                    prefix,
                    k
                );
            }
        }
        match &e.kind {
            Kind::Hardlink { target } => prop_assert!(
                matches!(seen.get(target.as_str()), Some(Kind::File { .. })),
                "{:?} links to {:?}, not an earlier file",
                e.path,
                target
            ),
            Kind::Symlink { target } => prop_assert!(!target.is_empty()),
            _ => {}
        }
        if let Some(k) = seen.get(e.path.as_str()) {
            prop_assert!(
                **k == Kind::Dir && e.kind == Kind::Dir,
                "{:?} twice",
                e.path
            );
        }
        // Nothing but a directory where an earlier entry has its parent.
        prop_assert!(
            e.kind == Kind::Dir || !parents.contains(e.path.as_str()),
            "{:?} lands on the parent of an earlier entry",
            e.path
        );
        for i in 1..comps.len() {
            parents.insert(comps[..i].join("/"));
        }
        seen.insert(&e.path, &e.kind);
    }
    Ok(())
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

/// `sandbox/target` with a file and two symlinks out of it (relative and
/// absolute) to `sandbox/outside`, which holds a canary.
fn sandbox() -> (tempfile::TempDir, PathBuf, PathBuf) {
    let sandbox = tempfile::tempdir().unwrap();
    let target = sandbox.path().join("target");
    let outside = sandbox.path().join("outside");
    std::fs::create_dir_all(target.join("etc")).unwrap();
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::write(target.join("etc/hostname"), b"old\n").unwrap();
    std::fs::write(outside.join("canary"), b"canary\n").unwrap();
    std::os::unix::fs::symlink("../outside", target.join("escape")).unwrap();
    std::os::unix::fs::symlink(&outside, target.join("a")).unwrap();
    (sandbox, target, outside)
}

fn run(program: &str, args: &[&std::ffi::OsStr], stdin: &[u8]) -> Result<Vec<u8>, TestCaseError> {
    let mut child = std::process::Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("cannot run {program}: install it (apt-get install e2fsprogs fdisk): {e}")
        });
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    let out = child.wait_with_output().unwrap();
    prop_assert!(
        out.status.success(),
        "{} {:?}: {}\n{}",
        program,
        args,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(out.stdout)
}

/// Where the partition is in the image, in bytes.
const PART_START: usize = 1 << 20;
const PART_LEN: usize = 8 << 20;

/// A 16 MiB MBR image whose partition 1 (1 MiB to 9 MiB) is ext4 made from
/// the sandbox's target tree; made once, copied for each case.
fn image_template() -> &'static [u8] {
    static IMAGE: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    IMAGE.get_or_init(|| {
        let (sandbox, target, _) = sandbox();
        let img = sandbox.path().join("template.img");
        std::fs::File::create(&img)
            .unwrap()
            .set_len(16 << 20)
            .unwrap();
        let table = format!("label: dos\nstart=2048, size={}\n", PART_LEN / 512);
        run(
            "sfdisk",
            &["-q".as_ref(), img.as_os_str()],
            table.as_bytes(),
        )
        .unwrap();
        let offset = format!("offset={PART_START}");
        run(
            "mke2fs",
            &[
                "-q".as_ref(),
                "-t".as_ref(),
                "ext4".as_ref(),
                "-E".as_ref(),
                offset.as_ref(),
                "-d".as_ref(),
                target.as_os_str(),
                img.as_os_str(),
                "8M".as_ref(),
            ],
            b"",
        )
        .unwrap();
        let mut bytes = std::fs::read(&img).unwrap();
        // Something to notice outside the partition, should it be written.
        for b in bytes[PART_START + PART_LEN..].iter_mut().step_by(4096) {
            *b = 0xa5;
        }
        bytes
    })
}

/// Write a verified package into a copy of the template image; compare
/// with what the directory overlay made of the same package.
fn check_image(
    package: &Path,
    limits: &Limits,
    dir_result: &Result<Manifest, Error>,
    dir: &Path,
) -> Result<(), TestCaseError> {
    let template = image_template();
    let work = tempfile::tempdir().unwrap();
    let img = work.path().join("disk.img");
    std::fs::write(&img, template).unwrap();
    let applied = apply_to_image(package, &img, Some(1), limits);
    let after = std::fs::read(&img).unwrap();
    prop_assert_eq!(after.len(), template.len());
    prop_assert!(
        after[..PART_START] == template[..PART_START],
        "written before the partition"
    );
    prop_assert!(
        after[PART_START + PART_LEN..] == template[PART_START + PART_LEN..],
        "written after the partition"
    );
    let Ok(manifest) = applied else {
        prop_assert!(
            after == template,
            "a refused package changed the image: {:?}",
            applied
        );
        // The directory overlay refused it too (the image has the same
        // tree, so the same conflicts).
        prop_assert!(
            dir_result.is_err(),
            "applied to the directory, not to the image: {:?}",
            applied
        );
        return Ok(());
    };
    prop_assert!(
        dir_result.is_ok(),
        "applied to the image, not to the directory"
    );
    let dev = format!("{}?offset={PART_START}", img.display());
    // e2fsck takes no offset: it checks a copy of the partition.
    let part = work.path().join("part.img");
    std::fs::write(&part, &after[PART_START..PART_START + PART_LEN]).unwrap();
    run("e2fsck", &["-fn".as_ref(), part.as_os_str()], b"")?;
    let dumped = work.path().join("dumped");
    std::fs::create_dir(&dumped).unwrap();
    let rdump = format!("rdump / {}", dumped.display());
    run(
        "debugfs",
        &["-R".as_ref(), rdump.as_ref(), dev.as_ref()],
        b"",
    )?;
    let mut got = snapshot_kinds(&dumped);
    got.remove(Path::new("lost+found"));
    let want = snapshot_kinds(dir);
    prop_assert_eq!(
        got,
        want,
        "the image's tree is not the directory's ({} entries)",
        manifest.entries.len()
    );
    Ok(())
}

/// Each path's kind and content (a file's bytes, a link's target; the
/// target's own absolute link `a` is left out, the image's points
/// elsewhere).
fn snapshot_kinds(root: &Path) -> BTreeMap<PathBuf, String> {
    snapshot(root)
        .into_iter()
        .filter(|(p, _)| p != Path::new("a"))
        .map(|(p, what)| {
            let kind = what.split(" mode ").next().unwrap_or_default().to_string();
            (p, kind)
        })
        .collect()
}

fn check_package(bytes: &[u8]) -> Result<(), TestCaseError> {
    let (sandbox, target, outside) = sandbox();
    let package = sandbox.path().join("package.tar.gz");
    std::fs::write(&package, bytes).unwrap();
    let limits = Limits {
        max_entries: 16,
        ..Limits::default()
    };
    let verified = verify(&package, &limits);
    if let Ok(m) = &verified {
        check_manifest(m)?;
    }

    let around = || {
        let mut names: Vec<String> = std::fs::read_dir(sandbox.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    };
    let (before, before_outside, before_around) = (snapshot(&target), snapshot(&outside), around());
    let applied = apply_to_dir(&package, &target, &limits);
    prop_assert_eq!(
        snapshot(&outside),
        before_outside,
        "written outside the target"
    );
    prop_assert_eq!(around(), before_around, "written beside the target");
    if verified.is_ok() {
        check_image(&package, &limits, &applied, &target)?;
    }
    match (&verified, &applied) {
        (Ok(m), Ok(a)) => {
            prop_assert_eq!(m, a);
            // Everything now in the target was there before or is the
            // package's (or a parent the package implies).
            let mut listed: HashSet<PathBuf> = HashSet::new();
            for e in &m.entries {
                let mut p = PathBuf::new();
                for c in e.path.split('/') {
                    p.push(c);
                    listed.insert(p.clone());
                }
            }
            for p in snapshot(&target).keys() {
                prop_assert!(
                    before.contains_key(p) || listed.contains(p),
                    "{} appeared in the target",
                    p.display()
                );
            }
        }
        (Ok(_), Err(Error::Target { .. })) => {
            prop_assert_eq!(snapshot(&target), before, "a refused target was changed");
        }
        (Ok(_), Err(e)) => prop_assert!(false, "verified, then failed to apply: {e}"),
        (Err(_), Ok(_)) => prop_assert!(false, "refused, then applied"),
        (Err(_), Err(_)) => {
            prop_assert_eq!(
                snapshot(&target),
                before,
                "a refused package changed the target"
            );
        }
    }
    Ok(())
}

mod fuzz {
    use super::*;

    proptest! {
        #![proptest_config(cases(64))]

        #[test]
        fn packages_never_escape_the_target(
            members in members(),
            damage in damage(),
        ) {
            check_package(&package_bytes(&members, &damage))?;
        }

        #[test]
        fn random_bytes_are_refused_without_a_panic(
            bytes in prop::collection::vec(any::<u8>(), 0..2048),
            gzip in any::<bool>(),
        ) {
            let bytes = if gzip { gz(&bytes) } else { bytes };
            check_package(&bytes)?;
        }
    }
}

/// Found by the fuzzer: a file where an earlier entry had implied a
/// directory (`a/b`, then `a`) passed verification, and the overlay then
/// failed halfway, with `a/b` written, renaming the file over `a/`.
#[test]
fn an_entry_on_an_earlier_entrys_parent_is_refused_before_anything_is_written() {
    for kind in [b'0', b'2'] {
        let members = [
            Member {
                name: b"etc/a".to_vec(),
                kind: b'0',
                link: Vec::new(),
                data: b"x".to_vec(),
                size: None,
                mode: 0o644,
            },
            Member {
                name: b"etc".to_vec(),
                kind,
                link: b"x".to_vec(),
                data: Vec::new(),
                size: None,
                mode: 0o644,
            },
        ];
        let bytes = package_bytes(&members, &Damage::None);
        let (sandbox, target, _) = sandbox();
        let package = sandbox.path().join("package.tar.gz");
        std::fs::write(&package, &bytes).unwrap();
        let e = verify(&package, &Limits::default()).unwrap_err();
        assert!(
            matches!(e, Error::Refused { ref entry, .. } if entry == "etc"),
            "{e}"
        );
        let before = snapshot(&target);
        assert!(apply_to_dir(&package, &target, &Limits::default()).is_err());
        assert_eq!(snapshot(&target), before);
        check_package(&bytes).unwrap();
    }
}

/// Found by the fuzzer: a directory entry for a directory the image has,
/// with nothing of the package in it, made debugfs `mkdir` it again, which
/// failed after the writes before it were done (the directory overlay
/// leaves an existing directory be).
#[test]
fn a_directory_the_image_has_already_is_taken_over_not_made_again() {
    let members = [Member {
        name: b"etc/".to_vec(),
        kind: b'5',
        link: Vec::new(),
        data: Vec::new(),
        size: None,
        mode: 0o700,
    }];
    let work = tempfile::tempdir().unwrap();
    let package = work.path().join("package.tar.gz");
    std::fs::write(&package, package_bytes(&members, &Damage::None)).unwrap();
    let img = work.path().join("disk.img");
    std::fs::write(&img, image_template()).unwrap();
    apply_to_image(&package, &img, Some(1), &Limits::default()).unwrap();
    check_package(&package_bytes(&members, &Damage::None)).unwrap();
}
