//! Any valid instance's drive, in either format, reads back with real tools
//! (xorriso for ISO 9660; mtools and fsck.vfat for vfat) as exactly the
//! files `cradle_drive::tree` lists: the same paths, the same bytes.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};

use cradle_drive::{DriveError, Format, Limits, build, tree};
use cradle_model::api::{InstanceSpec, OsParamsSpec};
use cradle_model::{Instance, MAX_USER_DATA, RANDOM_SEED_LEN};
use cradle_render::Context;
use proptest::prelude::*;
use time::OffsetDateTime;
use uuid::Uuid;

const MIB: u64 = 1024 * 1024;

fn b64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = |i: usize| u32::from(chunk.get(i).copied().unwrap_or(0));
        let n = (b(0) << 16) | (b(1) << 8) | b(2);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// A well-formed OpenSSH ed25519 public key line.
fn ssh_key(blob: [u8; 32], comment: &str) -> String {
    let mut raw = Vec::new();
    raw.extend_from_slice(&11u32.to_be_bytes());
    raw.extend_from_slice(b"ssh-ed25519");
    raw.extend_from_slice(&32u32.to_be_bytes());
    raw.extend_from_slice(&blob);
    format!("ssh-ed25519 {} {comment}", b64(&raw))
        .trim_end()
        .to_string()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Run a tool that must succeed.
fn tool(program: &str, args: &[&std::ffi::OsStr]) {
    let out = Command::new(program)
        .args(args)
        .env("MTOOLS_SKIP_CHECK", "1")
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{program} must be installed: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed ({}):\nstdout:\n{}\nstderr:\n{}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
}

/// Every regular file under `dir`, by relative `/`-separated path.
fn read_tree(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, Vec<u8>>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let path = e.unwrap().path();
            let kind = std::fs::symlink_metadata(&path).unwrap().file_type();
            if kind.is_dir() {
                // Read-only as the ISO has it; writable so the temp dir goes.
                std::fs::set_permissions(
                    &path,
                    std::os::unix::fs::PermissionsExt::from_mode(0o755),
                )
                .unwrap();
                walk(root, &path, out);
            } else {
                assert!(kind.is_file(), "{} is not a file", path.display());
                let rel = path.strip_prefix(root).unwrap();
                let rel: Vec<&str> = rel.iter().map(|c| c.to_str().unwrap()).collect();
                out.insert(rel.join("/"), std::fs::read(&path).unwrap());
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

/// The files of an ISO image, as `xorriso -osirrox on -extract` restores them.
fn extract_iso(image: &Path, dir: &Path) -> BTreeMap<String, Vec<u8>> {
    tool(
        "xorriso",
        &[
            "-osirrox".as_ref(),
            "on".as_ref(),
            "-indev".as_ref(),
            image.as_os_str(),
            "-extract".as_ref(),
            "/".as_ref(),
            dir.as_os_str(),
        ],
    );
    read_tree(dir)
}

/// The files of a vfat image, as `mcopy -s` copies them out, after
/// `fsck.vfat -n` has found nothing wrong.
fn extract_vfat(image: &Path, dir: &Path) -> BTreeMap<String, Vec<u8>> {
    tool("fsck.vfat", &["-n".as_ref(), image.as_os_str()]);
    std::fs::create_dir(dir).unwrap();
    tool(
        "mcopy",
        &[
            "-s".as_ref(),
            "-i".as_ref(),
            image.as_os_str(),
            "::/*".as_ref(),
            dir.as_os_str(),
        ],
    );
    read_tree(dir)
}

fn with_ctx<R>(f: impl FnOnce(&Context<'_>) -> R) -> R {
    let vendor_data = serde_json::json!({});
    f(&Context::new("2026-01-01", &vendor_data))
}

/// Build `inst`'s drive in `format`, read it back with the tools, and check
/// it against `tree`. Returns the image.
fn roundtrip(inst: &Instance, format: Format, limits: Limits) -> Result<Vec<u8>, TestCaseError> {
    with_ctx(|ctx| {
        let files = tree(inst, ctx);
        let want: BTreeMap<String, Vec<u8>> = files.iter().cloned().collect();
        prop_assert_eq!(want.len(), files.len(), "tree() lists a path twice");
        let mut image = Vec::new();
        let written = build(inst, ctx, format, limits, &mut image)
            .map_err(|e| TestCaseError::fail(format!("{format:?}: {e}")))?;
        prop_assert_eq!(written, image.len() as u64);
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("drive");
        std::fs::write(&path, &image).unwrap();
        let got = match format {
            Format::Iso9660 => extract_iso(&path, &tmp.path().join("out")),
            Format::Vfat => {
                prop_assert_eq!(image.len() as u64, limits.vfat_bytes);
                extract_vfat(&path, &tmp.path().join("out"))
            }
        };
        let (got_paths, want_paths): (Vec<_>, Vec<_>) =
            (got.keys().collect(), want.keys().collect());
        prop_assert_eq!(got_paths, want_paths, "{:?}: paths", format);
        for (path, bytes) in &want {
            prop_assert!(got[path] == *bytes, "{:?}: {} differs", format, path);
        }
        Ok(image)
    })
}

/// Text the model takes for names and keys: no control characters, none
/// of `forbidden`, not empty, no whitespace at either end.
fn text_strategy(max: usize, forbidden: &'static [char]) -> impl Strategy<Value = String> {
    let ch = any::<char>().prop_filter("allowed", move |c| {
        !c.is_control() && !forbidden.contains(c)
    });
    prop::collection::vec(ch, 1..=max).prop_map(|cs| {
        let s: String = cs.into_iter().collect();
        match s.trim() {
            "" => "x".to_string(),
            t => t.to_string(),
        }
    })
}

fn user_data_strategy() -> impl Strategy<Value = Option<Vec<u8>>> {
    prop_oneof![
        1 => Just(None),
        1 => Just(Some(Vec::new())),
        2 => prop::collection::vec(any::<u8>(), 1..=4096).prop_map(Some),
        1 => prop::collection::vec(any::<u8>(), MAX_USER_DATA).prop_map(Some),
    ]
}

/// Absolute guest paths of 1-3 unicode segments.
fn file_path_strategy() -> impl Strategy<Value = String> {
    prop::collection::vec(text_strategy(16, &['/']), 1..=3).prop_map(|segs| {
        let segs: Vec<String> = segs
            .into_iter()
            .map(|s| {
                if s == "." || s == ".." {
                    format!("{s}x")
                } else {
                    s
                }
            })
            .collect();
        format!("/{}", segs.join("/"))
    })
}

prop_compose! {
    fn spec_strategy()(
        name in text_strategy(64, &['/']),
        metadata in prop::collection::btree_map(
            text_strategy(32, &[]),
            prop::collection::vec(any::<char>(), 0..=64).prop_map(String::from_iter),
            0..=8,
        ),
        key_blobs in prop::collection::btree_map(
            text_strategy(24, &['/', '=']),
            (any::<[u8; 32]>(), "[a-z0-9@.ü-]{0,20}"),
            0..=32,
        ),
        files in prop::collection::btree_map(
            file_path_strategy(),
            prop::collection::vec(any::<u8>(), 0..=2048),
            0..=16,
        ),
        user_data in user_data_strategy(),
        launch_index in any::<u32>(),
        addr in (any::<[u8; 3]>(), prop::option::of(0u8..=32)),
        public in prop::option::of(any::<[u8; 4]>()),
    ) -> (InstanceSpec, BTreeMap<String, Vec<u8>>, Option<Vec<u8>>) {
        let [a, b, c] = addr.0;
        let spec = InstanceSpec {
            name,
            launch_index: Some(launch_index),
            user_data: user_data.as_deref().map(b64),
            metadata,
            public_keys: key_blobs
                .into_iter()
                .map(|(name, (blob, comment))| (name, ssh_key(blob, &comment)))
                .collect(),
            files: files.iter().map(|(p, c)| (p.clone(), b64(c))).collect(),
            metadata_address: Some(format!("10.{a}.{b}.{}", c.max(1))),
            local_ipv6: None,
            link_local_ipv6: None,
            interface: None,
            local_ipv4: Some(match addr.1 {
                Some(prefix) => format!("10.{a}.{b}.{}/{prefix}", c.max(1)),
                None => format!("10.{a}.{b}.{}", c.max(1)),
            }),
            public_ipv4: public.map(|p| std::net::Ipv4Addr::from(p).to_string()),
            dns_nameservers: vec!["192.0.2.53".to_string()],
            os_params: OsParamsSpec::default(),
            ..InstanceSpec::default()
        };
        (spec, files, user_data)
    }
}

prop_compose! {
    /// A valid instance, or `None` where the model refuses what was drawn.
    fn instance_strategy()(
        (spec, files, user_data) in spec_strategy(),
        id in any::<u128>(),
        // 1970 to 2150: inside the ISO's years, across FAT's 1980-2107.
        seconds in 0i64..5_680_000_000,
        seed in prop::collection::vec(any::<u8>(), RANDOM_SEED_LEN),
    ) -> Option<Instance> {
        let now = OffsetDateTime::from_unix_timestamp(seconds).unwrap();
        let inst = spec.into_instance(Uuid::from_u128(id), now, seed).ok()?;
        // The model decoded what was drawn (and so the encoder is right).
        assert_eq!(inst.files, files);
        assert_eq!(inst.user_data, user_data);
        Some(inst)
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 32,
        max_global_rejects: 64,
        ..ProptestConfig::default()
    })]

    #[test]
    fn any_instance_reads_back_from_iso_and_vfat_as_its_tree(
        inst in instance_strategy(),
        // FAT12 (3 MiB), FAT16 (16 MiB) and Nova's 64 MiB.
        vfat_mib in prop::sample::select(vec![3u64, 16, 64]),
    ) {
        let Some(inst) = inst else {
            return Err(TestCaseError::reject("the model refuses the instance"));
        };
        let limits = Limits { vfat_bytes: vfat_mib * MIB, ..Limits::default() };
        roundtrip(&inst, Format::Iso9660, limits)?;
        roundtrip(&inst, Format::Vfat, limits)?;
    }
}

/// A fixed instance with everything set: the largest user-data, the most
/// keys and injected files the model takes.
fn full_instance() -> Instance {
    let spec = InstanceSpec {
        name: "Gäste-Rechner 名前 🚀".to_string(),
        user_data: Some(b64(&vec![0xa5; MAX_USER_DATA])),
        metadata: BTreeMap::from([("rôle".to_string(), "wéb 🚀".to_string())]),
        public_keys: (0..32u8)
            .map(|i| (format!("key-{i}"), ssh_key([i; 32], "someone@host")))
            .collect(),
        files: (0..16u8)
            .map(|i| (format!("/etc/ü/file-{i}"), b64(&vec![i; 64 * 1024])))
            .collect(),
        metadata_address: Some("10.0.0.5".to_string()),
        ..InstanceSpec::default()
    };
    let now = OffsetDateTime::from_unix_timestamp(1_767_225_600).unwrap();
    spec.into_instance(Uuid::from_u128(7), now, vec![7; RANDOM_SEED_LEN])
        .expect("a valid instance")
}

#[test]
fn a_fat32_sized_vfat_drive_reads_back_and_passes_fsck() {
    // fatfs formats 512 MiB and more as FAT32, where the root directory is
    // a cluster chain and `..` of a first-level directory must say 0.
    let limits = Limits {
        vfat_bytes: 512 * MIB,
        max_bytes: 512 * MIB,
    };
    roundtrip(&full_instance(), Format::Vfat, limits).unwrap();
}

#[test]
fn the_largest_instance_reads_back_from_both_formats() {
    let inst = full_instance();
    roundtrip(&inst, Format::Iso9660, Limits::default()).unwrap();
    // FAT12 with the most content the model allows, and the default size.
    for mib in [3, 64] {
        let limits = Limits {
            vfat_bytes: mib * MIB,
            ..Limits::default()
        };
        roundtrip(&inst, Format::Vfat, limits).unwrap();
    }
}

#[test]
fn limits_are_checked_before_anything_is_written() {
    let inst = full_instance();
    with_ctx(|ctx| {
        let content: u64 = tree(&inst, ctx).iter().map(|(_, b)| b.len() as u64).sum();
        for format in [Format::Iso9660, Format::Vfat] {
            let mut out = Vec::new();
            let limits = Limits {
                max_bytes: content - 1,
                ..Limits::default()
            };
            match build(&inst, ctx, format, limits, &mut out) {
                Err(DriveError::TooLarge { content: c, max }) => {
                    assert_eq!((c, max), (content, content - 1));
                }
                other => panic!("{format:?}: {other:?}"),
            }
            assert!(out.is_empty(), "{format:?}: bytes written");
        }
        // The content fits; a 1 MiB vfat image does not hold it.
        let mut out = Vec::new();
        let limits = Limits {
            vfat_bytes: MIB,
            ..Limits::default()
        };
        match build(&inst, ctx, Format::Vfat, limits, &mut out) {
            Err(DriveError::VfatFull { size }) => assert_eq!(size, MIB),
            other => panic!("{other:?}"),
        }
        assert!(out.is_empty(), "bytes written");
    });
}
