//! Images written by cradle-iso9660, read back by the tools that read them as
//! the Linux kernel does: isoinfo (genisoimage), xorriso (libisofs) and blkid
//! (libblkid). Nothing is mounted. The tools must be installed
//! (`apt-get install genisoimage xorriso util-linux`); a missing one fails
//! the test rather than skipping it.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use cradle_iso9660::{Error, File, MAX_JOLIET_UNITS, Options, SECTOR_SIZE, image_size, write};
use time::macros::datetime;

fn options() -> Options {
    Options {
        volume_id: "config-2".to_owned(),
        publisher: "cradle".to_owned(),
        timestamp: datetime!(2024-05-06 07:08:09 UTC),
    }
}

fn file(path: &str, data: impl Into<Vec<u8>>) -> File {
    File {
        path: path.to_owned(),
        data: data.into(),
    }
}

/// A config drive as Nova writes it, with awkward extras: unicode names, an
/// empty file, a 63-character name, a long multi-byte name (its NM entry
/// goes to a continuation area), names that collide in level-1 form.
fn config_drive() -> Vec<File> {
    let long_unicode = "€".repeat(MAX_JOLIET_UNITS); // 192 bytes of UTF-8
    let mut files = vec![
        file("ec2/2009-04-04/meta-data.json", r#"{"instance-id": "i-1"}"#),
        file("ec2/2009-04-04/user-data", "#cloud-config\n"),
        file("ec2/latest/meta-data.json", r#"{"instance-id": "i-1"}"#),
        file("ec2/latest/user-data", "#cloud-config\n"),
        file("openstack/2012-08-10/meta_data.json", r#"{"uuid": "x"}"#),
        file("openstack/2016-10-06/meta_data.json", r#"{"uuid": "x"}"#),
        file("openstack/2016-10-06/network_data.json", r#"{"links": []}"#),
        file("openstack/2016-10-06/user_data", "#cloud-config\n"),
        file("openstack/2016-10-06/vendor_data.json", "{}"),
        file("openstack/2016-10-06/vendor_data2.json", "{}"),
        file("openstack/latest/meta_data.json", r#"{"uuid": "x"}"#),
        file("openstack/latest/network_data.json", r#"{"links": []}"#),
        file("openstack/latest/user_data", "#cloud-config\n"),
        file("openstack/latest/vendor_data.json", "{}"),
        file("openstack/latest/vendor_data2.json", "{}"),
        file("openstack/latest/password", ""),
        file("openstack/content/0000", vec![0u8, 1, 2, 255]),
        file("openstack/content/ünïcødé.txt", "latin-1 range"),
        file("openstack/content/日本語のファイル.txt", "beyond latin-1"),
        file("openstack/content/Mixed Case.TXT", "case and a space"),
        file("openstack/content/mixed case.txt", "lower"),
        file("openstack/content/a.b.c.d", "multidot"),
        file(
            "openstack/content/sixty-three-characters-long-name-0123456789-abcdefghijklmnopq.x",
            "63",
        ),
    ];
    files.push(file(
        &format!("openstack/content/{long_unicode}"),
        "long name",
    ));
    files
}

fn write_image(dir: &Path, name: &str, options: &Options, files: &[File]) -> PathBuf {
    let mut bytes = Vec::new();
    let n = write(options, files, &mut bytes).expect("write");
    assert_eq!(n, bytes.len() as u64, "write's return value");
    assert_eq!(
        image_size(options, files).expect("image_size"),
        n,
        "image_size"
    );
    assert_eq!(n % SECTOR_SIZE, 0);
    let path = dir.join(name);
    std::fs::write(&path, &bytes).unwrap();
    path
}

fn run(program: &str, args: &[&str]) -> Vec<u8> {
    let args: Vec<&OsStr> = args.iter().map(OsStr::new).collect();
    run_os(program, &args)
}

fn run_os(program: &str, args: &[&OsStr]) -> Vec<u8> {
    let out = Command::new(program)
        .args(args)
        .env("LC_ALL", "C.UTF-8")
        .env("TZ", "UTC")
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run {program} (apt-get install genisoimage xorriso util-linux): {e}")
        });
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

fn run_text(program: &str, args: &[&str]) -> String {
    String::from_utf8(run(program, args)).expect("UTF-8 output")
}

/// isoinfo prints Joliet names in ISO 8859-1, with `_` for characters
/// beyond it.
fn latin1(s: &str) -> Vec<u8> {
    s.chars()
        .map(|c| u8::try_from(u32::from(c)).unwrap_or(b'_'))
        .collect()
}

/// Every path isoinfo lists, as `/a/b` (Joliet: in ISO 8859-1).
fn isoinfo_paths(img: &Path, extension: &str) -> BTreeSet<Vec<u8>> {
    let img = img.to_str().unwrap();
    let mut args = vec![extension, "-f", "-i", img];
    if extension == "-J" {
        args.extend(["-j", "iso8859-1"]);
    }
    run("isoinfo", &args)
        .split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .map(<[u8]>::to_vec)
        .collect()
}

/// The files and the directories they imply, as `/a/b`.
fn expected_paths(files: &[File]) -> BTreeSet<String> {
    let mut all = BTreeSet::new();
    for f in files {
        let mut prefix = String::new();
        for seg in f.path.split('/') {
            prefix.push('/');
            prefix.push_str(seg);
            all.insert(prefix.clone());
        }
    }
    all
}

fn check_isoinfo(img: &Path, files: &[File]) {
    let expected = expected_paths(files);
    let rr: BTreeSet<Vec<u8>> = expected.iter().map(|p| p.as_bytes().to_vec()).collect();
    assert_eq!(isoinfo_paths(img, "-R"), rr, "isoinfo -R listing");
    let joliet: BTreeSet<Vec<u8>> = expected.iter().map(|p| latin1(p)).collect();
    assert_eq!(isoinfo_paths(img, "-J"), joliet, "isoinfo -J listing");
    let img = img.to_str().unwrap();
    for f in files {
        let path = format!("/{}", f.path);
        let got = run("isoinfo", &["-R", "-x", &path, "-i", img]);
        assert!(got == f.data, "isoinfo -R -x {path}: contents differ");
        let latin1_path = OsStr::from_bytes(&latin1(&path)).to_owned();
        let got = run_os(
            "isoinfo",
            &[
                "-J".as_ref(),
                "-j".as_ref(),
                "iso8859-1".as_ref(),
                "-x".as_ref(),
                latin1_path.as_os_str(),
                "-i".as_ref(),
                img.as_ref(),
            ],
        );
        assert!(got == f.data, "isoinfo -J -x {path}: contents differ");
    }
}

/// Extracts with xorriso, from the Rock Ridge tree and from the Joliet tree,
/// and compares the whole tree, bytes and all. Any warning fails.
fn check_xorriso(img: &Path, out: &Path, files: &[File]) {
    let expected: BTreeMap<String, Vec<u8>> = files
        .iter()
        .map(|f| (f.path.clone(), f.data.clone()))
        .collect();
    for (tree, extra) in [
        ("rock-ridge", &[][..]),
        ("joliet", &["-rockridge", "off", "-joliet", "on"][..]),
    ] {
        let dir = out.join(tree);
        let mut args = vec!["-abort_on", "WARNING", "-return_with", "WARNING", "32"];
        args.extend(extra);
        args.extend([
            "-osirrox",
            "on",
            "-indev",
            img.to_str().unwrap(),
            "-extract",
            "/",
            dir.to_str().unwrap(),
        ]);
        run("xorriso", &args);
        let mut found = BTreeMap::new();
        walk(&dir, &dir, &mut found);
        make_writable(&dir);
        assert_eq!(
            found.keys().collect::<Vec<_>>(),
            expected.keys().collect::<Vec<_>>(),
            "xorriso ({tree}) extracted paths"
        );
        for (path, data) in &expected {
            assert!(
                &found[path] == data,
                "xorriso ({tree}): contents of {path} differ"
            );
        }
    }
}

/// isovfy (genisoimage's verifier) finds nothing wrong.
fn check_isovfy(img: &Path) {
    let out = run_text("isovfy", &["-i", img.to_str().unwrap()]);
    assert!(out.contains("No errors found"), "isovfy: {out}");
}

fn walk(root: &Path, dir: &Path, found: &mut BTreeMap<String, Vec<u8>>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        let path = entry.path();
        if entry.file_type().unwrap().is_dir() {
            walk(root, &path, found);
        } else {
            let rel = path
                .strip_prefix(root)
                .unwrap()
                .to_str()
                .unwrap()
                .to_owned();
            found.insert(rel, std::fs::read(&path).unwrap());
        }
    }
}

/// xorriso restores the image's r-x modes; let the tempdir be removed.
fn make_writable(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    for entry in std::fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_dir() {
            make_writable(&entry.path());
        }
    }
}

/// Round-trips `files` through every reader.
fn check_all(name: &str, files: &[File]) {
    let tmp = tempfile::tempdir().unwrap();
    let img = write_image(tmp.path(), &format!("{name}.iso"), &options(), files);
    check_structure(&std::fs::read(&img).unwrap());
    check_isoinfo(&img, files);
    check_xorriso(&img, &tmp.path().join("x"), files);
    check_isovfy(&img);
}

fn le32(b: &[u8]) -> u32 {
    u32::from_le_bytes(b[..4].try_into().unwrap())
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().unwrap())
}

/// Both-endian fields agree; returns the value.
fn both32(b: &[u8]) -> u32 {
    assert_eq!(le32(b), be32(&b[4..]), "both-endian field");
    le32(b)
}

fn both16(b: &[u8]) -> u16 {
    let v = u16::from_le_bytes([b[0], b[1]]);
    assert_eq!(v, u16::from_be_bytes([b[2], b[3]]), "both-endian field");
    v
}

/// What the readers rely on, checked on the raw bytes: descriptor fields,
/// L and M path tables that agree with each other and with the directories,
/// directory records that never straddle a sector, and SP at the start of
/// the root `.` record's System Use.
fn check_structure(img: &[u8]) {
    assert_eq!(img.len() % 2048, 0);
    assert!(img[..16 * 2048].iter().all(|&b| b == 0), "system area");
    let terminator = &img[18 * 2048..19 * 2048];
    assert_eq!(&terminator[..7], b"\xffCD001\x01");
    for (n, kind) in [(16, 1u8), (17, 2)] {
        let vd = &img[n * 2048..(n + 1) * 2048];
        assert_eq!(&vd[..7], &[kind, b'C', b'D', b'0', b'0', b'1', 1]);
        assert_eq!(
            both32(&vd[80..]) as usize,
            img.len() / 2048,
            "volume space size"
        );
        assert_eq!(both16(&vd[120..]), 1);
        assert_eq!(both16(&vd[124..]), 1);
        assert_eq!(both16(&vd[128..]), 2048);
        if kind == 2 {
            assert_eq!(&vd[88..91], b"%/E");
        }
        let pt_size = both32(&vd[132..]) as usize;
        let l_at = le32(&vd[140..]) as usize * 2048;
        let m_at = be32(&vd[148..]) as usize * 2048;
        let (l, m) = (&img[l_at..l_at + pt_size], &img[m_at..m_at + pt_size]);
        // (extent, parent number, identifier) per entry.
        let mut table = Vec::new();
        let mut i = 0;
        while i < pt_size {
            let len = usize::from(l[i]);
            assert_eq!(m[i], l[i]);
            let extent = le32(&l[i + 2..]);
            assert_eq!(be32(&m[i + 2..]), extent, "M path table extent");
            let parent = u16::from_le_bytes([l[i + 6], l[i + 7]]);
            assert_eq!(u16::from_be_bytes([m[i + 6], m[i + 7]]), parent);
            assert_eq!(l[i + 8..i + 8 + len], m[i + 8..i + 8 + len]);
            table.push((extent, parent, l[i + 8..i + 8 + len].to_vec()));
            i += 8 + len + len % 2;
        }
        assert_eq!(i, pt_size);
        for (k, (_, parent, _)) in table.iter().enumerate() {
            assert!(usize::from(*parent) <= k.max(1), "path table order");
        }

        let root = &vd[156..190];
        assert_eq!(root[0], 34);
        let mut queue = vec![(both32(&root[2..]), both32(&root[10..]))];
        let mut seen = BTreeSet::new();
        while let Some((extent, size)) = queue.pop() {
            assert_eq!(size % 2048, 0, "directory size");
            seen.insert(extent);
            let start = extent as usize * 2048;
            let dir = &img[start..start + size as usize];
            let mut off = 0;
            let mut index = 0;
            while off < dir.len() {
                let len = usize::from(dir[off]);
                if len == 0 {
                    off = (off / 2048 + 1) * 2048;
                    continue;
                }
                assert!(off % 2048 + len <= 2048, "record straddles a sector");
                assert_eq!(len % 2, 0, "odd record length");
                let rec = &dir[off..off + len];
                let (child, child_size) = (both32(&rec[2..]), both32(&rec[10..]));
                assert_eq!(both16(&rec[28..]), 1);
                let id_len = usize::from(rec[32]);
                if index == 0 {
                    assert_eq!((id_len, rec[33]), (1, 0), "`.` first");
                    assert_eq!(child, extent, "`.` points at itself");
                    if kind == 1 && start == le32(&root[2..]) as usize * 2048 {
                        assert_eq!(&rec[34..41], b"SP\x07\x01\xbe\xef\x00", "SP");
                    }
                } else if index == 1 {
                    assert_eq!((id_len, rec[33]), (1, 1), "`..` second");
                } else if rec[25] & 2 != 0 {
                    queue.push((child, child_size));
                }
                index += 1;
                off += len;
            }
        }
        let in_table: BTreeSet<u32> = table.iter().map(|t| t.0).collect();
        assert_eq!(seen, in_table, "path table lists every directory");
    }
}

#[test]
fn config_drive_reads_back_through_rock_ridge_and_joliet() {
    check_all("config-drive", &config_drive());
}

/// `isoinfo -l` output as directory -> entry lines, without the extent
/// column (layouts differ) and in a set (record order may differ).
fn listing(img: &Path, extension: &str) -> BTreeMap<String, BTreeSet<String>> {
    let mut args = vec![extension, "-l", "-i", img.to_str().unwrap()];
    if extension == "-J" {
        args.extend(["-j", "iso8859-1"]);
    }
    let text = String::from_utf8_lossy(&run("isoinfo", &args)).into_owned();
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut dir = String::new();
    for line in text.lines().filter(|l| !l.is_empty()) {
        if let Some(d) = line.strip_prefix("Directory listing of ") {
            dir = d.to_owned();
            continue;
        }
        let (a, b) = (line.find('[').unwrap(), line.find(']').unwrap());
        let entry = format!("{}{}", &line[..a], line[b + 1..].trim_end());
        out.entry(dir.clone()).or_default().insert(entry);
    }
    out
}

/// The same tree through genisoimage as Nova runs it: the Rock Ridge and
/// Joliet listings (names, modes, links, owners, sizes, dates) are the same,
/// extents aside.
#[test]
fn listings_match_genisoimage() {
    let tmp = tempfile::tempdir().unwrap();
    let files = config_drive();
    let src = tmp.path().join("src");
    for f in &files {
        let path = src.join(&f.path);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, &f.data).unwrap();
    }
    let stamp = format!("@{}", options().timestamp.unix_timestamp());
    let src_s = src.to_str().unwrap();
    run(
        "find",
        &[src_s, "-exec", "touch", "-h", "-d", &stamp, "{}", "+"],
    );
    let theirs = tmp.path().join("genisoimage.iso");
    run(
        "genisoimage",
        &[
            "-quiet",
            "-o",
            theirs.to_str().unwrap(),
            "-ldots",
            "-allow-lowercase",
            "-allow-multidot",
            "-l",
            "-publisher",
            "cradle",
            "-J",
            "-r",
            "-V",
            "config-2",
            src_s,
        ],
    );
    let ours = write_image(tmp.path(), "ours.iso", &options(), &files);
    let rr = listing(&ours, "-R");
    assert_eq!(rr.len(), 9, "{rr:#?}");
    assert!(
        rr["/openstack/latest/"].iter().any(|e| {
            e.starts_with("-r--r--r--   1    0    0               2 May  6 2024 ")
                && e.ends_with(" vendor_data2.json")
        }),
        "{rr:#?}"
    );
    for extension in ["-R", "-J"] {
        assert_eq!(
            listing(&ours, extension),
            listing(&theirs, extension),
            "isoinfo {extension} -l"
        );
    }
}

#[test]
fn isoinfo_reports_volume_id_rock_ridge_and_joliet() {
    let tmp = tempfile::tempdir().unwrap();
    let files = config_drive();
    let img = write_image(tmp.path(), "d.iso", &options(), &files);
    let d = run_text("isoinfo", &["-d", "-i", img.to_str().unwrap()]);
    assert!(d.contains("Volume id: config-2\n"), "{d}");
    assert!(d.contains("Publisher id: cradle\n"), "{d}");
    assert!(d.contains("Logical block size is: 2048\n"), "{d}");
    assert!(d.contains("Joliet with UCS level 3 found"), "{d}");
    assert!(d.contains("Rock Ridge signatures version 1 found"), "{d}");
    let len = std::fs::metadata(&img).unwrap().len();
    assert!(
        d.contains(&format!("Volume size is: {}\n", len / SECTOR_SIZE)),
        "{d}"
    );
}

#[test]
fn rock_ridge_modes_are_read_only() {
    let tmp = tempfile::tempdir().unwrap();
    let files = vec![file("openstack/latest/meta_data.json", "{}")];
    let img = write_image(tmp.path(), "m.iso", &options(), &files);
    let l = run_text("isoinfo", &["-R", "-l", "-i", img.to_str().unwrap()]);
    assert!(
        l.lines()
            .any(|x| x.starts_with("-r--r--r--") && x.contains(" meta_data.json")),
        "{l}"
    );
    assert!(
        l.lines()
            .any(|x| x.starts_with("dr-xr-xr-x") && x.contains(" latest")),
        "{l}"
    );
    assert!(l.contains("May  6 2024"), "{l}");
}

#[test]
fn blkid_sees_label_and_type() {
    let tmp = tempfile::tempdir().unwrap();
    let img = write_image(tmp.path(), "b.iso", &options(), &config_drive());
    let img = img.to_str().unwrap();
    let blkid = |tag: &str| run_text("blkid", &["-p", "-o", "value", "-s", tag, img]);
    assert_eq!(blkid("LABEL"), "config-2\n");
    assert_eq!(blkid("TYPE"), "iso9660\n");
}

#[test]
fn empty_image() {
    check_all("empty", &[]);
}

#[test]
fn empty_file() {
    check_all(
        "empty-file",
        &[
            file("empty", ""),
            file("dir/also-empty", ""),
            file("one", "1"),
        ],
    );
}

#[test]
fn large_file() {
    let data: Vec<u8> = (0..5 * 1024 * 1024 + 123)
        .map(|i: u32| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    check_all(
        "large",
        &[file("big/blob.bin", data), file("small.txt", "after")],
    );
}

#[test]
fn multi_sector_directory() {
    let mut files: Vec<File> = (0..150)
        .map(|i| {
            file(
                &format!("many/a-rather-long-file-name-number-{i:04}.json"),
                format!("{i}"),
            )
        })
        .collect();
    files.push(file("many/sub/x", "x"));
    // The same level-1 base for all of them: numeric suffixes must make
    // them unique.
    let tmp = tempfile::tempdir().unwrap();
    let img = write_image(tmp.path(), "many.iso", &options(), &files);
    let l = run_text("isoinfo", &["-l", "-i", img.to_str().unwrap()]);
    let many = l
        .split("Directory listing of ")
        .find(|s| s.starts_with("/MANY/\n"))
        .expect("primary listing of /MANY/");
    let names: BTreeSet<&str> = many
        .lines()
        .skip(1)
        .filter_map(|x| x.split_whitespace().last())
        .collect();
    assert_eq!(names.len(), 151 + 2, "unique level-1 names plus . and ..");
    // The directory spans several sectors in both hierarchies.
    let rr = run_text("isoinfo", &["-R", "-l", "-i", img.to_str().unwrap()]);
    let sizes: Vec<u64> = rr
        .lines()
        .filter(|x| x.starts_with('d') && x.trim_end().ends_with(" many"))
        .map(|x| x.split_whitespace().nth(4).unwrap().parse().unwrap())
        .collect();
    assert!(sizes.iter().all(|&s| s >= 3 * SECTOR_SIZE), "{sizes:?}");
    check_all("many", &files);
}

#[test]
fn deep_nesting() {
    let files = vec![
        file("1/2/3/4/5/6/7/8/deep.txt", "deep"),
        file("1/2/3/4/5/6/7/8/9/deeper.txt", "deeper"),
        file("1/top.txt", "top"),
    ];
    check_all("deep", &files);
}

#[test]
fn deterministic() {
    let files = config_drive();
    let mut a = Vec::new();
    write(&options(), &files, &mut a).unwrap();
    let mut b = Vec::new();
    write(&options(), &files, &mut b).unwrap();
    assert!(a == b, "same inputs, different bytes");

    let mut shuffled = files.clone();
    shuffled.reverse();
    shuffled.rotate_left(7);
    shuffled.swap(0, 3);
    let mut c = Vec::new();
    write(&options(), &shuffled, &mut c).unwrap();
    assert!(a == c, "file order changed the bytes");

    let later = Options {
        timestamp: datetime!(2024-05-06 07:08:10 UTC),
        ..options()
    };
    let mut d = Vec::new();
    write(&later, &files, &mut d).unwrap();
    assert_eq!(a.len(), d.len());
    assert!(a != d, "a different timestamp gave the same bytes");

    // The same instant in another offset is the same image.
    let offset = Options {
        timestamp: datetime!(2024-05-06 09:08:09 +02:00),
        ..options()
    };
    let mut e = Vec::new();
    write(&offset, &files, &mut e).unwrap();
    assert!(a == e, "the timestamp's offset changed the bytes");
}

#[test]
fn volume_id_case_is_kept() {
    let tmp = tempfile::tempdir().unwrap();
    let opts = Options {
        volume_id: "Config-2 Mixed".to_owned(),
        ..options()
    };
    let img = write_image(tmp.path(), "v.iso", &opts, &[file("a", "a")]);
    let d = run_text("isoinfo", &["-d", "-i", img.to_str().unwrap()]);
    assert!(d.contains("Volume id: Config-2 Mixed\n"), "{d}");
}

fn expect_err(files: &[File], path: &str, what: &str) {
    let err = write(&options(), files, &mut Vec::new()).expect_err(what);
    let msg = err.to_string();
    assert!(msg.contains(&format!("{path:?}")), "{what}: {msg}");
    assert!(
        image_size(&options(), files).is_err(),
        "{what}: image_size accepted it"
    );
    assert!(
        matches!(err, Error::InvalidPath { .. } | Error::NameTooLong { .. }),
        "{what}: {err:?}"
    );
}

#[test]
fn bad_paths_are_refused() {
    let ok = file("openstack/latest/meta_data.json", "{}");
    for bad in [
        "openstack/../etc/passwd",
        "openstack/./x",
        "..",
        "/abs/path",
        "trailing/",
        "double//slash",
        "",
        "nul\0byte",
        "control\nchar",
    ] {
        expect_err(&[ok.clone(), file(bad, "x")], bad, bad);
    }
    expect_err(
        &[ok.clone(), file(&"n".repeat(254), "x")],
        &"n".repeat(254),
        "254-byte name",
    );
    let joliet_long = format!("dir/{}", "j".repeat(MAX_JOLIET_UNITS + 1));
    expect_err(
        &[ok.clone(), file(&joliet_long, "x")],
        &joliet_long,
        "65 units",
    );
    expect_err(&[ok.clone(), ok.clone()], &ok.path, "duplicate path");
    expect_err(
        &[file("a/b", "x"), file("a", "y")],
        "a/b",
        "file where a directory is",
    );
    expect_err(
        &[file("a:b", "x"), file("a?b", "y")],
        "a?b",
        "Joliet-equal names",
    );
}

#[test]
fn exactly_sixty_four_units_is_allowed() {
    let name = "x".repeat(MAX_JOLIET_UNITS);
    check_all("sixty-four", &[file(&name, "64")]);
}

#[test]
fn bad_options_are_refused() {
    let files = [file("a", "a")];
    let long = Options {
        volume_id: "x".repeat(33),
        ..options()
    };
    assert!(matches!(
        image_size(&long, &files),
        Err(Error::InvalidOption {
            field: "volume_id",
            ..
        })
    ));
    let non_ascii = Options {
        publisher: "é".to_owned(),
        ..options()
    };
    assert!(matches!(
        write(&non_ascii, &files, &mut Vec::new()),
        Err(Error::InvalidOption {
            field: "publisher",
            ..
        })
    ));
    let ancient = Options {
        timestamp: datetime!(1850-01-01 00:00 UTC),
        ..options()
    };
    assert!(matches!(
        write(&ancient, &files, &mut Vec::new()),
        Err(Error::InvalidOption {
            field: "timestamp",
            ..
        })
    ));
}

#[test]
fn write_errors_are_reported() {
    struct Full;
    impl std::io::Write for Full {
        fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
            Err(std::io::Error::other("disk full"))
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    assert!(matches!(
        write(&options(), &config_drive(), &mut Full),
        Err(Error::Io(_))
    ));
}

#[test]
fn many_small_images() {
    // A sanity check of speed (no timing assertion): 200 config drives.
    let files = config_drive();
    let mut buf = Vec::new();
    let mut total = 0;
    for i in 0..200u32 {
        let mut files = files.clone();
        files[0].data = format!(r#"{{"instance-id": "i-{i}"}}"#).into_bytes();
        buf.clear();
        total += write(&options(), &files, &mut buf).unwrap();
    }
    assert!(total > 0);
}
