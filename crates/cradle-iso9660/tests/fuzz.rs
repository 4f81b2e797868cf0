//! Random trees (unicode and awkward names, up to the limits; empty,
//! sector-sized and multi-sector files; deep paths; directories of many
//! sectors) written by cradle-iso9660 and read back by isoinfo (names, in
//! the Rock Ridge and the Joliet tree) and by xorriso (the whole Rock Ridge
//! tree extracted, bytes compared, any warning fails). A tree the writer
//! refuses must break a documented limit. The tools must be installed
//! (`apt-get install genisoimage xorriso`); a missing one fails the test.
//!
//! Cases per property: `CRADLE_FUZZ_CASES` (`cargo xtask fuzz` sets it and
//! `PROPTEST_RNG_SEED`); the default keeps `cargo test` quick.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;

use cradle_iso9660::{File, MAX_JOLIET_UNITS, MAX_NAME_BYTES, Options, SECTOR_SIZE};
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

fn run(program: &str, args: &[&str]) -> Result<Vec<u8>, TestCaseError> {
    let out = Command::new(program)
        .args(args)
        .env("LC_ALL", "C.UTF-8")
        .env("TZ", "UTC")
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run {program}: install it (apt-get install genisoimage xorriso): {e}")
        });
    prop_assert!(
        out.status.success(),
        "{} {:?} failed: {}\n{}",
        program,
        args,
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(out.stdout)
}

/// A name: mostly short and plain, sometimes long, unicode (including
/// beyond the BMP, two UTF-16 units each), or made of the characters that
/// level-1 names and Joliet cannot hold.
fn name() -> impl Strategy<Value = String> {
    let ch = prop_oneof![
        6 => prop::sample::select(
            "abcXYZ019 ._-~+,=;[]{}()!@#$%^&'".chars().collect::<Vec<_>>()
        ),
        2 => prop::sample::select("éüß€日本語ファイル名".chars().collect::<Vec<_>>()),
        1 => prop::sample::select("🚀😀𝄞".chars().collect::<Vec<_>>()),
        1 => prop::sample::select("*:;?\\\"<>|".chars().collect::<Vec<_>>()),
        1 => any::<char>().prop_filter("no control or slash", |c| !c.is_control() && *c != '/'),
    ];
    prop_oneof![
        8 => prop::collection::vec(ch.clone(), 1..12),
        2 => prop::collection::vec(ch, 30..62),
    ]
    .prop_map(|cs| {
        let s: String = cs.into_iter().collect();
        if s == "." || s == ".." {
            format!("{s}x")
        } else {
            s
        }
    })
}

fn data() -> impl Strategy<Value = Vec<u8>> {
    let s = SECTOR_SIZE as usize;
    prop_oneof![
        2 => Just(Vec::new()),
        4 => prop::collection::vec(any::<u8>(), 1..300),
        2 => prop::sample::select(vec![s - 1, s, s + 1, 2 * s, 3 * s + 7])
            .prop_flat_map(|n| prop::collection::vec(any::<u8>(), n)),
        1 => (1usize..40).prop_map(|k| (0..k * 2048 + 3).map(|i| (i % 251) as u8).collect()),
    ]
}

/// Files at paths of 1-8 segments, drawn from a small set of names per
/// level so that directories are shared and some hold many entries.
fn tree() -> impl Strategy<Value = Vec<File>> {
    let names = prop::collection::vec(name(), 1..6);
    (
        names,
        prop::collection::vec(
            (
                prop::collection::vec(any::<prop::sample::Index>(), 1..8),
                name(),
                data(),
            ),
            1..40,
        ),
    )
        .prop_map(|(dirs, files)| {
            let mut out: BTreeMap<String, Vec<u8>> = BTreeMap::new();
            for (path, leaf, data) in files {
                let mut segs: Vec<&str> = path[..path.len() - 1]
                    .iter()
                    .map(|i| dirs[i.index(dirs.len())].as_str())
                    .collect();
                segs.push(&leaf);
                out.insert(segs.join("/"), data);
            }
            out.into_iter()
                .map(|(path, data)| File { path, data })
                .collect()
        })
}

/// Whether the writer's documented limits allow the tree: every name at
/// most `MAX_JOLIET_UNITS` UTF-16 units and `MAX_NAME_BYTES` bytes, no file
/// where another file's directory is, and no two names of a directory the
/// same in Joliet (where `* : ; ? \\` are `_`).
fn allowed(files: &[File]) -> bool {
    let dirs: BTreeSet<&str> = files
        .iter()
        .flat_map(|f| f.path.match_indices('/').map(|(i, _)| &f.path[..i]))
        .collect();
    // Every entry, by its directory and its Joliet name.
    let mut joliet: BTreeMap<(&str, String), BTreeSet<&str>> = BTreeMap::new();
    for p in files
        .iter()
        .map(|f| f.path.as_str())
        .chain(dirs.iter().copied())
    {
        let (dir, name) = p.rsplit_once('/').unwrap_or(("", p));
        let mapped = name.replace(['*', ':', ';', '?', '\\'], "_");
        joliet.entry((dir, mapped)).or_default().insert(name);
    }
    if joliet.values().any(|names| names.len() > 1) {
        return false;
    }
    files.iter().all(|f| {
        !dirs.contains(f.path.as_str())
            && f.path
                .split('/')
                .all(|n| n.encode_utf16().count() <= MAX_JOLIET_UNITS && n.len() <= MAX_NAME_BYTES)
    })
}

/// The files and the directories they imply, as `/a/b`.
fn expected_paths(files: &[File], name: impl Fn(&str) -> Vec<u8>) -> BTreeSet<Vec<u8>> {
    let mut all = BTreeSet::new();
    for f in files {
        let mut prefix = Vec::new();
        for seg in f.path.split('/') {
            prefix.push(b'/');
            prefix.extend(name(seg));
            all.insert(prefix.clone());
        }
    }
    all
}

/// How isoinfo prints a Joliet name with `-j iso8859-1`: the characters
/// Joliet forbids written as `_` (as the writer does), then each UTF-16
/// unit beyond ISO 8859-1 as `_` (two for a character past the BMP).
fn joliet_latin1(name: &str) -> Vec<u8> {
    name.encode_utf16()
        .map(|u| match char::from_u32(u32::from(u)) {
            Some('*' | ':' | ';' | '?' | '\\') => b'_',
            _ => u8::try_from(u).unwrap_or(b'_'),
        })
        .collect()
}

fn isoinfo_paths(img: &Path, extension: &str) -> Result<BTreeSet<Vec<u8>>, TestCaseError> {
    let img = img.to_str().unwrap();
    let mut args = vec![extension, "-f", "-i", img];
    if extension == "-J" {
        args.extend(["-j", "iso8859-1"]);
    }
    Ok(run("isoinfo", &args)?
        .split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .map(<[u8]>::to_vec)
        .collect())
}

/// Every regular file under `dir`, by relative `/`-separated path.
fn read_tree(root: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut todo = vec![root.to_path_buf()];
    while let Some(dir) = todo.pop() {
        // Read-only as the ISO has it; writable so the temp dir goes.
        std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
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

fn check(files: &[File]) -> Result<(), TestCaseError> {
    let options = Options {
        volume_id: "config-2".into(),
        publisher: "cradle".into(),
        timestamp: time::macros::datetime!(2026-01-01 00:00 UTC),
    };
    let mut image = Vec::new();
    let written = match cradle_iso9660::write(&options, files, &mut image) {
        Ok(n) => n,
        Err(e) => {
            prop_assert!(!allowed(files), "a tree within the limits was refused: {e}");
            return Ok(());
        }
    };
    prop_assert!(allowed(files), "a tree past the limits was written");
    prop_assert_eq!(written, image.len() as u64);
    prop_assert_eq!(written % SECTOR_SIZE, 0);
    prop_assert_eq!(
        cradle_iso9660::image_size(&options, files).unwrap(),
        written
    );

    let tmp = tempfile::tempdir().unwrap();
    let img = tmp.path().join("drive.iso");
    std::fs::write(&img, &image).unwrap();
    let rr = expected_paths(files, |s| s.as_bytes().to_vec());
    prop_assert_eq!(isoinfo_paths(&img, "-R")?, rr, "isoinfo -R listing");
    let joliet = expected_paths(files, joliet_latin1);
    prop_assert_eq!(isoinfo_paths(&img, "-J")?, joliet, "isoinfo -J listing");

    let out = tmp.path().join("out");
    run(
        "xorriso",
        &[
            "-abort_on",
            "WARNING",
            "-return_with",
            "WARNING",
            "32",
            "-osirrox",
            "on",
            "-indev",
            img.to_str().unwrap(),
            "-extract",
            "/",
            out.to_str().unwrap(),
        ],
    )?;
    let got = read_tree(&out);
    let want: BTreeMap<String, Vec<u8>> = files
        .iter()
        .map(|f| (f.path.clone(), f.data.clone()))
        .collect();
    prop_assert_eq!(
        got.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>(),
        "xorriso's paths"
    );
    for (path, bytes) in &want {
        prop_assert!(got[path] == *bytes, "{} differs", path);
    }
    Ok(())
}

mod fuzz {
    use super::*;

    proptest! {
        #![proptest_config(cases(16))]

        #[test]
        fn random_trees_read_back_identically_with_isoinfo_and_xorriso(files in tree()) {
            check(&files)?;
        }
    }
}
