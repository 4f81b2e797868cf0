//! Config drives: the images the admin API and `cradle drive build` write,
//! read back with the tools a guest or an operator has (isoinfo, xorriso,
//! mtools, fsck.vfat, blkid, Debian's cloud-init) and compared byte for byte
//! with what the metadata service serves the same instance.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsStr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use serde_json::{Value, json};

use crate::admin::typed;
use crate::harness::*;

/// The source address of the test instance's guest.
const GUEST: &str = "127.0.0.2";
const NAME: &str = "Gäste-Rechner 名前 🚀";
const HOSTNAME: &str = "drive-guest";
const MAC: &str = "fa:16:3e:00:00:42";
/// In the instance's metadata: must be on the drive.
const META_CANARY: &str = "meta-canary-4b1d07";
/// OS parameters live in the native tree only, which never goes on a drive.
const PUBLIC_CANARY: &str = "public-param-canary-90ce";
const PRIVATE_CANARY: &str = "private-param-canary-5e27";
const SECRET_CANARY: &str = "secret-param-canary-c3f8";
const VFAT_BYTES: usize = 64 * 1024 * 1024;

/// Every OpenStack version Nova defines; all are dated before today.
const OPENSTACK_VERSIONS: &[&str] = &[
    "2012-08-10",
    "2013-04-04",
    "2013-10-17",
    "2015-10-15",
    "2016-06-30",
    "2016-10-06",
    "2017-02-22",
    "2018-08-27",
    "2020-10-14",
    "2025-04-04",
];

/// OpenStack files and the version that introduced each. `password` (from
/// 2013-04-04) is served but never written to a drive.
const OPENSTACK_FILES: &[(&str, &str)] = &[
    ("meta_data.json", "2012-08-10"),
    ("user_data", "2012-08-10"),
    ("vendor_data.json", "2013-10-17"),
    ("network_data.json", "2015-10-15"),
    ("vendor_data2.json", "2016-10-06"),
];

fn user_data() -> Vec<u8> {
    b"#cloud-config\nhostname: drive-guest\nruncmd:\n  - [echo, \"gr\xc3\xbc\xc3\x9fe\"]\n\x00\xff\xfe binary tail\n"
        .to_vec()
}

/// Injected files: guest path to contents. In path order, so the first is
/// `openstack/content/0000`.
fn injected() -> BTreeMap<&'static str, Vec<u8>> {
    BTreeMap::from([
        ("/etc/motd", "Willkommen, Gäste! 🚀\n".as_bytes().to_vec()),
        (
            "/var/lib/cradle/blob.bin",
            (0..=255u8).cycle().take(5000).collect(),
        ),
    ])
}

fn keys() -> (String, String) {
    (ssh_key(1, "alice@laptop"), ssh_key(2, "bob@desk"))
}

/// An instance with every field a drive carries set, and parameters in all
/// three visibilities.
fn spec() -> Value {
    let (alice, bob) = keys();
    let files: BTreeMap<&str, String> = injected().iter().map(|(p, c)| (*p, b64(c))).collect();
    json!({
        "name": NAME,
        "hostname": HOSTNAME,
        "project_id": "proj-7",
        "availability_zone": "eu-central-1a",
        "instance_type": "m1.small",
        "launch_index": 3,
        "metadata": {"rôle": "wéb 🚀", "canary": META_CANARY},
        "public_keys": {"alice": alice, "bob": bob},
        "user_data": b64(&user_data()),
        "files": files,
        "metadata_address": GUEST,
        "mac": MAC,
        "local_ipv4": "10.0.0.5/24",
        "gateway_ipv4": "10.0.0.1",
        "dns_nameservers": ["10.0.0.2"],
        "public_ipv4": "203.0.113.42",
        "os_params": {
            "public": {"locale": PUBLIC_CANARY},
            "private": {"db_url": PRIVATE_CANARY},
            "secret": {"root_pw": SECRET_CANARY},
        },
    })
}

fn create(s: &Server, spec: &Value) -> String {
    s.admin().create(spec)["id"]
        .as_str()
        .expect("create returns an id")
        .to_string()
}

/// `GET` the drive of `key` in `format` through the admin API.
fn drive(admin: &Admin, key: &str, format: &str) -> Answer {
    admin.fetch(route::config_drive(key, Some(format)))
}

/// Download a drive through the admin API; it must succeed.
fn download(s: &Server, key: &str, format: &str) -> Vec<u8> {
    let a = drive(&s.admin(), key, format);
    assert_eq!(a.status, 200, "GET config-drive {format}: {}", a.text());
    let content_type = a.headers["content-type"].to_str().unwrap();
    let extension = match format {
        "iso9660" => {
            assert_eq!(content_type, "application/x-iso9660-image");
            "iso"
        }
        _ => {
            assert_eq!(content_type, "application/octet-stream");
            "img"
        }
    };
    let disposition = a.headers["content-disposition"].to_str().unwrap();
    assert!(
        disposition.starts_with("attachment; filename=\"config-drive-")
            && disposition.ends_with(&format!(".{extension}\"")),
        "{disposition}"
    );
    a.body
}

/// `cradle drive <args> --url … --token-file …` against `s`.
fn cli(s: &Server, args: &[&OsStr]) -> Output {
    s.cli(std::iter::once(OsStr::new("drive")).chain(args.iter().copied()))
        .output()
        .expect("run cradle")
}

/// `cradle drive build KEY --format FORMAT -o OUT`.
fn cli_build(s: &Server, key: &str, format: &str, out: &Path) -> Output {
    cli(
        s,
        &[
            "build".as_ref(),
            key.as_ref(),
            "--format".as_ref(),
            format.as_ref(),
            "-o".as_ref(),
            out.as_os_str(),
        ],
    )
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Run a tool and return its output, whatever its exit status.
fn run(program: &str, args: &[&OsStr]) -> Output {
    Command::new(program)
        .args(args)
        .env("MTOOLS_SKIP_CHECK", "1")
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{program} must be installed: {e}"))
}

/// Run a tool that must succeed; returns its stdout.
#[track_caller]
fn tool(program: &str, args: &[&OsStr]) -> Vec<u8> {
    let out = run(program, args);
    assert!(
        out.status.success(),
        "{program} {args:?} failed ({}):\nstdout:\n{}\nstderr:\n{}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
    out.stdout
}

/// Every file a drive of [`spec`] must hold, and nothing else.
fn expected_layout() -> BTreeSet<String> {
    let mut want = BTreeSet::new();
    for version in OPENSTACK_VERSIONS.iter().chain(&["latest"]) {
        for (name, since) in OPENSTACK_FILES {
            if *version == "latest" || version >= since {
                want.insert(format!("openstack/{version}/{name}"));
            }
        }
    }
    for n in 0..injected().len() {
        want.insert(format!("openstack/content/{n:04}"));
    }
    for version in ["2009-04-04", "latest"] {
        want.insert(format!("ec2/{version}/meta-data.json"));
        want.insert(format!("ec2/{version}/user-data"));
    }
    want
}

/// `paths` (files, `/`-separated, relative) and every directory above them.
fn with_parents(paths: &BTreeSet<String>) -> BTreeSet<String> {
    let mut out = paths.clone();
    for p in paths {
        let mut parent = p.as_str();
        while let Some((dir, _)) = parent.rsplit_once('/') {
            out.insert(dir.to_string());
            parent = dir;
        }
    }
    out
}

/// Every regular file under `dir`, by relative `/`-separated path. Panics on
/// anything but files and non-empty directories.
fn read_tree(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, Vec<u8>>) {
        let entries: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(Result::unwrap)
            .collect();
        assert!(!entries.is_empty(), "empty directory {}", dir.display());
        for e in entries {
            let path = e.path();
            let kind = std::fs::symlink_metadata(&path).unwrap().file_type();
            if kind.is_dir() {
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

/// xorriso restores the image's read-only modes; make the tree removable.
fn make_writable(dir: &Path) {
    for e in std::fs::read_dir(dir).unwrap() {
        let path = e.unwrap().path();
        if path.is_dir() {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
            make_writable(&path);
        } else {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        }
    }
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
    make_writable(dir);
    read_tree(dir)
}

/// The files of a vfat image, as `mcopy -s` copies them out.
fn extract_vfat(image: &Path, dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::create_dir(dir).unwrap();
    tool(
        "mcopy",
        &[
            "-s".as_ref(),
            "-i".as_ref(),
            image.as_os_str(),
            "::/".as_ref(),
            dir.as_os_str(),
        ],
    );
    read_tree(dir)
}

fn blkid(image: &Path, tag: &str) -> String {
    let out = tool(
        "blkid",
        &[
            "-p".as_ref(),
            "-o".as_ref(),
            "value".as_ref(),
            "-s".as_ref(),
            tag.as_ref(),
            image.as_os_str(),
        ],
    );
    text(&out).trim().to_string()
}

fn contains(hay: &[u8], needle: &str) -> bool {
    hay.windows(needle.len()).any(|w| w == needle.as_bytes())
}

/// The canaries of [`spec`]: metadata is on the drive, OS parameters are not.
#[track_caller]
fn assert_canaries(image: &[u8]) {
    assert!(contains(image, META_CANARY), "the metadata is on the drive");
    assert!(contains(image, NAME), "the name is on the drive, as UTF-8");
    for canary in [PRIVATE_CANARY, SECRET_CANARY, PUBLIC_CANARY] {
        assert!(!contains(image, canary), "{canary} is on the drive");
    }
}

/// The guest's GET of `path`, which must succeed.
fn served(g: &Guest, path: &str) -> Vec<u8> {
    let a = g.get(path);
    assert_eq!(a.status, 200, "GET {path}: {}", a.text());
    a.body
}

/// An EC2 `meta-data.json` object against the service's `meta-data/` tree
/// at `base`: the same entries (listing labels kept as `_name`, as Nova
/// writes them), and every value the bytes the service serves.
fn assert_meta_data_json_is_served(g: &Guest, base: &str, obj: &Value) {
    let listing = text(&served(g, base));
    let listed: BTreeSet<String> = listing
        .lines()
        .map(|l| {
            let l = l.trim_end_matches('/');
            l.split_once('=').map_or(l, |(index, _)| index).to_string()
        })
        .collect();
    let obj = obj.as_object().expect("a directory is an object");
    let keys: BTreeSet<String> = obj.keys().filter(|k| *k != "_name").cloned().collect();
    assert_eq!(keys, listed, "entries of {base}");
    for (k, v) in obj.iter().filter(|(k, _)| *k != "_name") {
        let path = format!("{base}/{k}");
        match v {
            Value::String(s) => assert_eq!(text(&served(g, &path)), *s, "{path}"),
            Value::Object(inner) => {
                if let Some(label) = inner.get("_name") {
                    let label = label.as_str().unwrap();
                    assert!(
                        listing.lines().any(|l| l == label),
                        "{base} lists {label:?}: {listing}"
                    );
                }
                assert_meta_data_json_is_served(g, &path, v);
            }
            other => panic!("{path}: unexpected JSON {other}"),
        }
    }
}

/// Every file of a drive has what the metadata service serves the guest
/// for the same path.
fn assert_files_are_served(g: &Guest, files: &BTreeMap<String, Vec<u8>>) {
    for (path, bytes) in files {
        let parts: Vec<&str> = path.split('/').collect();
        match parts.as_slice() {
            ["openstack", ..] => {
                assert_eq!(served(g, &format!("/{path}")), *bytes, "{path}");
            }
            ["ec2", version, "user-data"] => {
                assert_eq!(
                    served(g, &format!("/{version}/user-data")),
                    *bytes,
                    "{path}"
                );
            }
            ["ec2", version, "meta-data.json"] => {
                let md: Value = serde_json::from_slice(bytes)
                    .unwrap_or_else(|e| panic!("{path} is not JSON ({e}): {}", text(bytes)));
                let get = |key: &str| text(&served(g, &format!("/{version}/meta-data/{key}")));
                assert_eq!(md["instance-id"], get("instance-id"), "{path}");
                assert_eq!(md["hostname"], get("hostname"), "{path}");
                assert_eq!(md["hostname"], HOSTNAME);
                assert_meta_data_json_is_served(g, &format!("/{version}/meta-data"), &md);
            }
            _ => panic!("unexpected file {path} on the drive"),
        }
    }
}

// ---------------------------------------------------------------------------

#[test]
fn iso_drive_files_equal_what_the_metadata_service_serves() {
    let s = Server::start();
    let id = create(&s, &spec());
    let g = s.guest(GUEST);
    let tmp = tempfile::tempdir().unwrap();

    // The admin API and the CLI (by the instance's name) give the same bytes.
    let image = download(&s, &id, "iso9660");
    let iso = tmp.path().join("cli.iso");
    let out = cli_build(&s, NAME, "iso9660", &iso);
    assert!(out.status.success(), "drive build: {}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains(&format!("({} bytes, iso9660)", image.len())),
        "{}",
        text(&out.stderr)
    );
    assert!(
        std::fs::read(&iso).unwrap() == image,
        "the CLI's image differs from the admin API's"
    );
    let names: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["cli.iso"], "nothing but the image is left");
    assert_eq!(image.len() % 2048, 0);

    assert_eq!(blkid(&iso, "LABEL"), "config-2");
    assert_eq!(blkid(&iso, "TYPE"), "iso9660");

    // Listings: Rock Ridge and Joliet with isoinfo, and xorriso.
    let want = expected_layout();
    let want_all = with_parents(&want);
    for extension in ["-R", "-J"] {
        let listing = tool(
            "isoinfo",
            &[
                extension.as_ref(),
                "-f".as_ref(),
                "-i".as_ref(),
                iso.as_os_str(),
            ],
        );
        let listed: BTreeSet<String> = text(&listing)
            .lines()
            .map(|l| l.strip_prefix('/').expect("absolute path").to_string())
            .collect();
        assert_eq!(listed, want_all, "isoinfo {extension} -f");
    }
    let found = tool(
        "xorriso",
        &[
            "-indev".as_ref(),
            iso.as_os_str(),
            "-find".as_ref(),
            "/".as_ref(),
            "-type".as_ref(),
            "f".as_ref(),
        ],
    );
    let found: BTreeSet<String> = text(&found)
        .lines()
        .map(|l| {
            l.strip_prefix("'/")
                .and_then(|l| l.strip_suffix('\''))
                .unwrap_or_else(|| panic!("xorriso -find line {l:?}"))
                .to_string()
        })
        .collect();
    assert_eq!(found, want, "xorriso -find / -type f");

    // Contents: every file through isoinfo, and the tree through xorriso.
    let by_xorriso = extract_iso(&iso, &tmp.path().join("xorriso"));
    assert_eq!(by_xorriso.keys().cloned().collect::<BTreeSet<_>>(), want);
    for (path, bytes) in &by_xorriso {
        let by_isoinfo = tool(
            "isoinfo",
            &[
                "-R".as_ref(),
                "-x".as_ref(),
                format!("/{path}").as_ref(),
                "-i".as_ref(),
                iso.as_os_str(),
            ],
        );
        assert!(by_isoinfo == *bytes, "isoinfo and xorriso differ on {path}");
    }

    // Each file is what the guest is served.
    assert_files_are_served(&g, &by_xorriso);
    let content = |n: usize| &by_xorriso[&format!("openstack/content/{n:04}")];
    for (n, (_, data)) in injected().iter().enumerate() {
        assert_eq!(content(n), data, "injected file {n}");
    }
    assert_eq!(by_xorriso["ec2/latest/user-data"], user_data());
    assert_eq!(by_xorriso["openstack/2012-08-10/user_data"], user_data());
    // The guest is served a password file that the drive leaves out.
    assert_eq!(g.get("/openstack/latest/password").status, 200);

    // Parameters are served to the guest, and are not on the drive.
    let params = text(&served(&g, "/cradle/latest/os/parameters.json"));
    for canary in [PRIVATE_CANARY, SECRET_CANARY, PUBLIC_CANARY] {
        assert!(params.contains(canary), "{canary} is served: {params}");
    }
    assert_canaries(&image);
}

#[test]
fn vfat_drive_reads_back_with_mtools_and_passes_fsck() {
    let s = Server::start();
    let id = create(&s, &spec());
    let g = s.guest(GUEST);
    let tmp = tempfile::tempdir().unwrap();

    let image = download(&s, &id, "vfat");
    assert_eq!(image.len(), VFAT_BYTES);
    let img = tmp.path().join("drive.img");
    let out = cli_build(&s, &id, "vfat", &img);
    assert!(out.status.success(), "drive build: {}", text(&out.stderr));
    assert!(
        std::fs::read(&img).unwrap() == image,
        "the CLI's image differs from the admin API's"
    );

    let fsck = run("fsck.vfat", &["-n".as_ref(), img.as_os_str()]);
    assert!(
        fsck.status.success(),
        "fsck.vfat -n ({}):\n{}{}",
        fsck.status,
        text(&fsck.stdout),
        text(&fsck.stderr)
    );
    assert_eq!(blkid(&img, "LABEL"), "config-2");
    assert_eq!(blkid(&img, "TYPE"), "vfat");

    // mdir lists the layout, with the long names.
    let want = expected_layout();
    let listing = tool(
        "mdir",
        &[
            "-/".as_ref(),
            "-b".as_ref(),
            "-i".as_ref(),
            img.as_os_str(),
            "::/".as_ref(),
        ],
    );
    let (mut dirs, mut files) = (BTreeSet::new(), BTreeSet::new());
    for line in text(&listing).lines() {
        let path = line
            .strip_prefix("::/")
            .unwrap_or_else(|| panic!("mdir -b line {line:?}"));
        match path.strip_suffix('/') {
            Some(dir) => dirs.insert(dir.to_string()),
            None => files.insert(path.to_string()),
        };
    }
    assert_eq!(files, want, "mdir files");
    let want_dirs: BTreeSet<String> = with_parents(&want).difference(&want).cloned().collect();
    assert_eq!(dirs, want_dirs, "mdir directories");

    // mcopy gives back the ISO's files, which are what the guest is served.
    let by_mcopy = extract_vfat(&img, &tmp.path().join("mcopy"));
    assert_eq!(by_mcopy.keys().cloned().collect::<BTreeSet<_>>(), want);
    let iso = tmp.path().join("drive.iso");
    std::fs::write(&iso, download(&s, &id, "iso9660")).unwrap();
    let by_xorriso = extract_iso(&iso, &tmp.path().join("xorriso"));
    assert!(by_mcopy == by_xorriso, "the vfat and ISO drives differ");
    assert_files_are_served(&g, &by_mcopy);
    for (n, (_, data)) in injected().iter().enumerate() {
        assert_eq!(&by_mcopy[&format!("openstack/content/{n:04}")], data);
    }

    assert_canaries(&image);
}

/// What Debian's cloud-init makes of a config drive extracted to `dir`:
/// `ConfigDriveReader(dir).read_v2()`, bytes as `{"b64": ...}`.
fn cloud_init_reads(dir: &Path) -> Value {
    let out = python(
        r#"
import base64, json, sys
from cloudinit import sources
from cloudinit.sources.helpers import openstack

def enc(o):
    if isinstance(o, (bytes, bytearray)):
        return {"b64": base64.b64encode(bytes(o)).decode()}
    raise TypeError(repr(o))

res = openstack.ConfigDriveReader(sys.argv[1]).read_v2()
keys = sorted(sources.normalize_pubkey_data(res["metadata"]["public_keys"]))
print("RESULT " + json.dumps({"read": res, "ssh_keys": keys}, default=enc, sort_keys=True))
"#,
        &[dir.to_str().unwrap()],
    );
    let line = out
        .lines()
        .find_map(|l| l.strip_prefix("RESULT "))
        .unwrap_or_else(|| panic!("no result:\n{out}"));
    serde_json::from_str(line).unwrap()
}

#[test]
fn cloud_init_config_drive_reader_reads_the_drive() {
    let s = Server::start();
    let id = create(&s, &spec());
    let g = s.guest(GUEST);
    let tmp = tempfile::tempdir().unwrap();
    let (alice, bob) = keys();
    let served_md: Value = serde_json::from_slice(&served(&g, "/openstack/latest/meta_data.json"))
        .expect("meta_data.json is JSON");
    let ec2_id = text(&served(&g, "/latest/meta-data/instance-id"));
    assert!(ec2_id.starts_with("i-"), "{ec2_id}");

    let iso = tmp.path().join("drive.iso");
    std::fs::write(&iso, download(&s, &id, "iso9660")).unwrap();
    let img = tmp.path().join("drive.img");
    std::fs::write(&img, download(&s, &id, "vfat")).unwrap();
    let iso_dir = tmp.path().join("iso");
    extract_iso(&iso, &iso_dir);
    let vfat_dir = tmp.path().join("vfat");
    extract_vfat(&img, &vfat_dir);

    let mut reads = Vec::new();
    for dir in [&iso_dir, &vfat_dir] {
        let out = cloud_init_reads(dir);
        let read = &out["read"];
        let md = &read["metadata"];
        let at = dir.display();
        assert_eq!(read["version"], 2, "{at}");
        assert_eq!(md["uuid"], id, "{at}");
        assert_eq!(md["instance-id"], id, "{at}: cloud-init's instance-id");
        assert_eq!(md["name"], NAME, "{at}");
        assert_eq!(md["hostname"], HOSTNAME, "{at}");
        assert_eq!(md["local-hostname"], HOSTNAME, "{at}");
        assert_eq!(md["launch_index"], 3, "{at}");
        assert_eq!(
            md["meta"],
            json!({"rôle": "wéb 🚀", "canary": META_CANARY}),
            "{at}"
        );
        assert_eq!(
            md["public_keys"],
            json!({"alice": alice, "bob": bob}),
            "{at}"
        );
        let mut want_keys = vec![alice.clone(), bob.clone()];
        want_keys.sort();
        assert_eq!(out["ssh_keys"], json!(want_keys), "{at}");
        assert_eq!(read["userdata"], json!({"b64": b64(&user_data())}), "{at}");
        let want_files: BTreeMap<&str, Value> = injected()
            .iter()
            .map(|(p, c)| (*p, json!({"b64": b64(c)})))
            .collect();
        assert_eq!(read["files"], json!(want_files), "{at}: injected files");
        assert_eq!(
            md["random_seed"],
            json!({"b64": served_md["random_seed"]}),
            "{at}: the service's seed"
        );
        assert_eq!(read["vendordata"], json!({}), "{at}");
        assert_eq!(read["vendordata2"], json!({"static": {}}), "{at}");
        assert_eq!(
            read["networkdata"]["links"][0]["ethernet_mac_address"], MAC,
            "{at}"
        );
        assert_eq!(
            read["networkdata"]["networks"][0]["ip_address"], "10.0.0.5",
            "{at}"
        );
        assert_eq!(read["ec2-metadata"]["instance-id"], ec2_id, "{at}");
        assert_eq!(read["ec2-metadata"]["hostname"], HOSTNAME, "{at}");
        reads.push(out);
    }
    assert_eq!(reads[0], reads[1], "cloud-init reads both formats alike");
}

#[test]
fn drives_are_deterministic() {
    let s = Server::start();
    let id = create(&s, &spec());
    let first_iso = download(&s, &id, "iso9660");
    let first_vfat = download(&s, &id, "vfat");
    // Let the clock move on: nothing on a drive may depend on it.
    std::thread::sleep(Duration::from_millis(1100));
    let second_iso = download(&s, &id, "iso9660");
    let second_vfat = download(&s, &id, "vfat");
    assert!(first_iso == second_iso, "two ISO downloads differ");
    assert!(first_vfat == second_vfat, "two vfat downloads differ");
    assert_eq!(first_vfat.len(), VFAT_BYTES);

    let changed = "changed-metadata-value-81f2";
    let a = s.admin().fetch(route::modify_instance(
        &id,
        &typed(&json!({"metadata": {"canary": changed}})),
    ));
    assert_eq!(a.status, 200, "PATCH: {}", a.text());
    let patched_iso = download(&s, &id, "iso9660");
    let patched_vfat = download(&s, &id, "vfat");
    assert!(patched_iso != first_iso, "the ISO did not change");
    assert!(patched_vfat != first_vfat, "the vfat image did not change");
    for image in [&patched_iso, &patched_vfat] {
        assert!(contains(image, changed) && !contains(image, META_CANARY));
    }
    assert!(patched_iso == download(&s, &id, "iso9660"));
}

/// `count` distinct files of `size` bytes, as the `files` of a spec.
fn big_files(count: usize, size: usize) -> BTreeMap<String, String> {
    let mut x: u32 = 0x1234_5678;
    (0..count)
        .map(|i| {
            let data: Vec<u8> = (0..size)
                .map(|_| {
                    x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                    (x >> 24) as u8
                })
                .collect();
            (format!("/srv/data/file-{i:02}.bin"), b64(&data))
        })
        .collect()
}

/// Create `spec` with `files` added afterwards, a few per PATCH: all of
/// them at once would be more than the admin API takes in one request.
fn create_with_files(s: &Server, spec: &Value, files: BTreeMap<String, String>) -> String {
    let id = create(s, spec);
    let files: Vec<_> = files.into_iter().collect();
    for batch in files.chunks(4) {
        let batch: BTreeMap<_, _> = batch.iter().cloned().collect();
        let a = s.admin().fetch(route::modify_instance(
            &id,
            &typed(&json!({ "files": batch })),
        ));
        assert_eq!(a.status, 200, "PATCH files: {}", a.text());
    }
    id
}

/// The `error` of a refused drive: 422 `drive_too_large`; returns the message.
#[track_caller]
fn refused(s: &Server, key: &str, format: &str) -> String {
    let a = drive(&s.admin(), key, format);
    assert_eq!(a.status, 422, "{format}: {}", a.text());
    let body = a.json();
    assert_eq!(body["error"]["code"], "drive_too_large", "{body}");
    body["error"]["message"].as_str().unwrap().to_string()
}

/// `cradle drive build` into an empty directory must fail, say why, and
/// leave the directory empty.
#[track_caller]
fn cli_refuses(s: &Server, key: &str, format: &str, dir: &Path, why: &str) {
    std::fs::create_dir(dir).unwrap();
    let out = cli_build(s, key, format, &dir.join("out.img"));
    let stderr = text(&out.stderr);
    assert!(!out.status.success(), "drive build succeeded: {stderr}");
    assert!(
        stderr.starts_with("error: ") && stderr.contains("drive_too_large") && stderr.contains(why),
        "{stderr}"
    );
    let left: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(
        left.is_empty(),
        "left behind in {}: {left:?}",
        dir.display()
    );
}

#[test]
fn a_drive_over_the_limit_is_refused_and_nothing_is_left_behind() {
    let tmp = tempfile::tempdir().unwrap();

    // drive.max_bytes: 64 KiB, far less than 16 files of 60 KiB.
    let s = Server::start_with(Opts {
        env: &[("CRADLE_DRIVE_MAX_BYTES", "65536")],
        ..Opts::default()
    });
    let mut big = spec();
    big["name"] = json!("big");
    big.as_object_mut().unwrap().remove("files");
    let id = create_with_files(&s, &big, big_files(16, 60 * 1024));
    for format in ["iso9660", "vfat"] {
        let message = refused(&s, &id, format);
        let content: u64 = message
            .strip_prefix("the drive needs ")
            .and_then(|m| m.split_once(" bytes"))
            .and_then(|(n, _)| n.parse().ok())
            .unwrap_or_else(|| panic!("no size in {message:?}"));
        assert!(content > 16 * 60 * 1024, "{message}");
        assert!(
            message.contains("the limit is 65536 (drive.max_bytes)"),
            "{message}"
        );
    }
    cli_refuses(&s, "big", "iso9660", &tmp.path().join("iso"), "65536");
    cli_refuses(&s, &id, "vfat", &tmp.path().join("vfat"), "65536");
    // A small instance's vfat drive fits: the limit is on the content...
    let small = create(
        &s,
        &json!({"name": "small", "metadata_address": "127.0.0.3"}),
    );
    assert_eq!(download(&s, &small, "vfat").len(), VFAT_BYTES);
    // ...and on the whole ISO image, which is more than 64 KiB even then.
    let message = refused(&s, &small, "iso9660");
    assert!(message.contains("the limit is 65536"), "{message}");
    drop(s);

    // drive.vfat_bytes: 1 MiB, less than the files; the ISO is within max_bytes.
    let s = Server::start_with(Opts {
        env: &[("CRADLE_DRIVE_VFAT_BYTES", "1048576")],
        ..Opts::default()
    });
    let mut big = spec();
    big["name"] = json!("big");
    big.as_object_mut().unwrap().remove("files");
    big["user_data"] = json!(b64(&[b'#'; 20 * 1024]));
    let id = create_with_files(&s, &big, big_files(16, 60 * 1024));
    let message = refused(&s, &id, "vfat");
    assert_eq!(
        message,
        "the files do not fit a 1048576-byte vfat image (drive.vfat_bytes)"
    );
    let iso = download(&s, &id, "iso9660");
    assert!(iso.len() > 1_200_000, "{}", iso.len());
    cli_refuses(
        &s,
        "big",
        "vfat",
        &tmp.path().join("vfat-size"),
        "do not fit",
    );
    // A small instance fits the 1 MiB image, which fsck accepts.
    let small = create(
        &s,
        &json!({"name": "small", "metadata_address": "127.0.0.3"}),
    );
    let img = tmp.path().join("small.img");
    std::fs::write(&img, download(&s, &small, "vfat")).unwrap();
    assert_eq!(std::fs::metadata(&img).unwrap().len(), 1024 * 1024);
    let fsck = run("fsck.vfat", &["-n".as_ref(), img.as_os_str()]);
    assert!(fsck.status.success(), "{}", text(&fsck.stdout));

    // A bad format is a 400, an unknown instance a 404.
    let admin = s.admin();
    for format in ["iso", "ISO9660", "", "fat32"] {
        let a = drive(&admin, &id, format);
        assert_eq!(a.status, 400, "format {format:?}: {}", a.text());
        let body = a.json();
        assert_eq!(body["error"]["code"], "bad_request");
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("use iso9660 or vfat"),
            "{body}"
        );
    }
    for key in ["nonesuch", "6f1c2a3b-4d5e-4f60-8a7b-9c0d1e2f3a4b"] {
        let a = drive(&admin, key, "iso9660");
        assert_eq!(a.status, 404, "{key}: {}", a.text());
        assert_eq!(a.json()["error"]["code"], "not_found");
    }
    let dir = tmp.path().join("unknown");
    std::fs::create_dir(&dir).unwrap();
    let out = cli_build(&s, "nonesuch", "iso9660", &dir.join("out.iso"));
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("not_found"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
}
