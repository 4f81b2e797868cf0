//! Random trees through the vfat writer (`cradle_drive::vfat_image`, what
//! `build` writes a drive with): long and short names, names that share
//! their first characters (so 8.3 aliases need `~N`), unicode, empty and
//! multi-cluster files, deep paths, directories of many clusters, on FAT12,
//! FAT16 and FAT32 sizes. `fsck.vfat -n` must find nothing, and `mcopy -s`
//! must copy out exactly the files, byte for byte. A tree that does not fit
//! must be refused as full, nothing else. The tools must be installed
//! (`apt-get install mtools dosfstools`); a missing one fails the test.
//!
//! Cases per property: `CRADLE_FUZZ_CASES` (`cargo xtask fuzz` sets it and
//! `PROPTEST_RNG_SEED`); the default keeps `cargo test` quick.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use cradle_drive::{DriveError, vfat_image};
use proptest::prelude::*;

const MIB: u64 = 1024 * 1024;

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

fn run(program: &str, args: &[&std::ffi::OsStr]) -> Result<(), TestCaseError> {
    let out = Command::new(program)
        .args(args)
        .env("MTOOLS_SKIP_CHECK", "1")
        .env("LC_ALL", "C.UTF-8")
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run {program}: install it (apt-get install mtools dosfstools): {e}")
        });
    prop_assert!(
        out.status.success(),
        "{} {:?} failed ({}):\nstdout:\n{}\nstderr:\n{}",
        program,
        args,
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// A long file name FAT can hold: no `"*/:<>?\|`, no control
/// characters, and neither a leading nor a trailing space or dot (which
/// Windows and mtools drop).
fn name() -> impl Strategy<Value = String> {
    let ch = prop_oneof![
        8 => prop::sample::select(
            "abcdefghijXYZ0123456789 .-_~+,;=[]()!@#$%^&'{}".chars().collect::<Vec<_>>()
        ),
        1 => prop::sample::select("éüßÆ€日本語".chars().collect::<Vec<_>>()),
    ];
    prop_oneof![
        // Short names, and long ones sharing a prefix (8.3 aliases collide).
        4 => prop::collection::vec(ch.clone(), 1..12),
        2 => (0usize..3, prop::collection::vec(ch.clone(), 0..8)).prop_map(|(p, tail)| {
            let mut v: Vec<char> = ["longname", "LongName", "config-drive"][p].chars().collect();
            v.extend(tail);
            v
        }),
        1 => prop::collection::vec(ch, 30..80),
    ]
    .prop_map(|cs| {
        let s: String = cs.into_iter().collect();
        let s = s.trim_matches([' ', '.']);
        if s.is_empty() {
            "x".to_string()
        } else {
            s.to_string()
        }
    })
}

fn data() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        2 => Just(Vec::new()),
        4 => prop::collection::vec(any::<u8>(), 1..600),
        1 => prop::sample::select(vec![511usize, 512, 513, 2048, 4096, 4097])
            .prop_flat_map(|n| prop::collection::vec(any::<u8>(), n)),
        1 => (1usize..24).prop_map(|k| (0..k * 4096 + 5).map(|i| (i % 253) as u8).collect()),
    ]
}

/// Files at paths of 1-6 segments over a few directory names per tree.
/// FAT compares names without case, so names alike but for case are
/// dropped: they are one file there.
fn tree() -> impl Strategy<Value = Vec<(String, Vec<u8>)>> {
    let dirs = prop::collection::vec(name(), 1..5);
    let files = prop::collection::vec(
        (
            prop::collection::vec(any::<prop::sample::Index>(), 1..6),
            name(),
            data(),
        ),
        1..48,
    );
    (dirs, files).prop_map(|(dirs, files)| {
        let mut out: BTreeMap<String, Vec<u8>> = BTreeMap::new();
        // Every path taken (files and directories), by its upper case.
        let mut taken: BTreeMap<String, String> = BTreeMap::new();
        for (path, leaf, data) in files {
            let mut segs: Vec<&str> = path[..path.len() - 1]
                .iter()
                .map(|i| dirs[i.index(dirs.len())].as_str())
                .collect();
            segs.push(&leaf);
            let path = segs.join("/");
            let parents: Vec<String> = (1..segs.len()).map(|i| segs[..i].join("/")).collect();
            // Not under a file, not where a path is already (a file or a
            // directory), and nothing alike but for case to a path taken.
            let clash = parents.iter().any(|p| out.contains_key(p))
                || taken.contains_key(&path.to_uppercase())
                || parents
                    .iter()
                    .any(|p| taken.get(&p.to_uppercase()).is_some_and(|t| t != p));
            if clash {
                continue;
            }
            for p in parents.iter().chain([&path]) {
                taken.insert(p.to_uppercase(), p.clone());
            }
            out.insert(path, data);
        }
        out.into_iter().collect()
    })
}

/// Every regular file under `dir`, by relative `/`-separated path.
fn read_tree(root: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut todo = vec![root.to_path_buf()];
    while let Some(dir) = todo.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let path = e.unwrap().path();
            if std::fs::symlink_metadata(&path).unwrap().is_dir() {
                todo.push(path);
            } else {
                let rel = path
                    .strip_prefix(root)
                    .unwrap()
                    .to_str()
                    .unwrap()
                    .to_string();
                out.insert(rel, std::fs::read(&path).unwrap());
            }
        }
    }
    out
}

fn check(files: &[(String, Vec<u8>)], size: u64) -> Result<(), TestCaseError> {
    let time = time::macros::datetime!(2026-03-04 05:06:08 UTC);
    let image = match vfat_image(files, size, 0x1234_5678, time) {
        Ok(image) => image,
        Err(DriveError::VfatFull { size: s }) => {
            prop_assert_eq!(s, size);
            return Ok(());
        }
        Err(e) => return Err(TestCaseError::fail(format!("refused: {e}"))),
    };
    prop_assert_eq!(image.len() as u64, size);
    let tmp = tempfile::tempdir().unwrap();
    let img = tmp.path().join("drive.vfat");
    std::fs::write(&img, &image).unwrap();
    run("fsck.vfat", &["-n".as_ref(), img.as_os_str()])?;
    let out = tmp.path().join("out");
    std::fs::create_dir(&out).unwrap();
    run(
        "mcopy",
        &[
            "-s".as_ref(),
            "-n".as_ref(),
            "-i".as_ref(),
            img.as_os_str(),
            "::/*".as_ref(),
            out.as_os_str(),
        ],
    )?;
    let got = read_tree(&out);
    let want: BTreeMap<&String, &Vec<u8>> = files.iter().map(|(p, d)| (p, d)).collect();
    prop_assert_eq!(
        got.keys().collect::<Vec<_>>(),
        want.keys().copied().collect::<Vec<_>>(),
        "mcopy's paths"
    );
    for (path, bytes) in &want {
        prop_assert!(got[*path] == **bytes, "{} differs", path);
    }
    Ok(())
}

mod fuzz {
    use super::*;

    proptest! {
        #![proptest_config(cases(16))]

        #[test]
        fn random_trees_pass_fsck_and_copy_out_identically(
            files in tree(),
            // FAT12, FAT16 and (from 512 MiB) FAT32.
            mib in prop_oneof![4 => prop::sample::select(vec![1u64, 3, 16, 64]), 1 => Just(512u64)],
        ) {
            check(&files, mib * MIB)?;
        }
    }
}
