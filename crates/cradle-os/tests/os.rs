//! OS definitions made on disk by the tests, with real `/bin/sh` scripts.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cradle_model::{OsParams, Secret};
use cradle_os::{
    Disk, Environment, Error, Operation, Runner, User, find, list, run_trusted, search_path,
    split_name,
};

/// A temporary search path every user can read (scripts run as nobody).
fn root() -> tempfile::TempDir {
    let t = tempfile::tempdir().unwrap();
    std::fs::set_permissions(t.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    t
}

fn write(p: &Path, text: &str, mode: u32) {
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, text).unwrap();
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// A complete OS: every trusted script, variants, parameters, and an
/// untrusted create.
fn good_os(root: &Path, name: &str, verify: &str) -> PathBuf {
    let d = root.join(name);
    std::fs::create_dir(&d).unwrap();
    std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).unwrap();
    write(&d.join("ganeti_api_version"), "10\n20\n15\n", 0o644);
    write(&d.join("variants.list"), "default\nminimal\n", 0o644);
    write(
        &d.join("parameters.list"),
        "suite The Debian suite\ntoken An API token\nroot_password The root password\n",
        0o644,
    );
    for op in ["create", "export", "import", "rename"] {
        write(&d.join(op), "#!/bin/sh\nexit 0\n", 0o755);
    }
    write(&d.join("verify"), verify, 0o755);
    write(
        &d.join("untrusted/create"),
        "#!/bin/sh\necho inside\n",
        0o644,
    );
    d
}

#[test]
fn definitions_are_found_checked_and_refused_with_reasons() {
    let a = root();
    let b = root();
    good_os(a.path(), "debian", "#!/bin/sh\nexit 0\n");
    // The same name later in the path is hidden.
    let hidden = good_os(b.path(), "debian", "#!/bin/sh\nexit 0\n");
    std::fs::remove_file(hidden.join("ganeti_api_version")).unwrap();

    let bad = |name: &str, change: &dyn Fn(&Path), reason: &str| {
        let d = good_os(b.path(), name, "#!/bin/sh\nexit 0\n");
        change(&d);
        let e = find(&[b.path().to_path_buf()], name).unwrap_err();
        assert!(
            matches!(&e, Error::Invalid { .. }) && e.to_string().contains(reason),
            "{name}: {e}"
        );
    };
    bad(
        "noapi",
        &|d| std::fs::remove_file(d.join("ganeti_api_version")).unwrap(),
        "has no ganeti_api_version file",
    );
    bad(
        "oldapi",
        &|d| write(&d.join("ganeti_api_version"), "10\n", 0o644),
        "speaks OS API [10]; cradle speaks [20, 15]",
    );
    bad(
        "nocreate",
        &|d| {
            std::fs::remove_file(d.join("create")).unwrap();
            std::fs::remove_file(d.join("untrusted/create")).unwrap();
        },
        "has no create script",
    );
    bad(
        "noexec",
        &|d| {
            std::fs::set_permissions(d.join("rename"), std::fs::Permissions::from_mode(0o644))
                .unwrap()
        },
        "rename is not executable",
    );
    bad(
        "groupwrite",
        &|d| {
            std::fs::set_permissions(d.join("export"), std::fs::Permissions::from_mode(0o775))
                .unwrap()
        },
        "export is writable by group or others",
    );
    bad(
        "openDir",
        &|d| std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o777)).unwrap(),
        "the directory is writable by group or others",
    );
    bad(
        "ulink",
        &|d| std::os::unix::fs::symlink("/etc/shadow", d.join("untrusted/shadow")).unwrap(),
        "untrusted/shadow is not a regular file",
    );
    bad(
        "udir",
        &|d| std::fs::create_dir(d.join("untrusted/sub")).unwrap(),
        "untrusted/sub is not a regular file",
    );
    bad(
        "ubig",
        &|d| write(&d.join("untrusted/big"), &"x".repeat((1 << 20) + 1), 0o644),
        "untrusted/big is 1048577 bytes; at most 1048576",
    );
    bad(
        "badparam",
        &|d| write(&d.join("parameters.list"), "bad-name what\n", 0o644),
        "parameters.list: \"bad-name\" is not a parameter name",
    );
    bad(
        "twovariants",
        &|d| write(&d.join("variants.list"), "a\na\n", 0o644),
        "variants.list: \"a\" is listed twice",
    );

    // Only untrusted scripts: fine; create runs in the appliance.
    let d = good_os(b.path(), "appliance-only", "#!/bin/sh\n");
    for op in ["create", "export", "import", "rename", "verify"] {
        std::fs::remove_file(d.join(op)).unwrap();
    }
    let os = find(&[b.path().to_path_buf()], "appliance-only").unwrap();
    assert!(os.trusted.is_empty());
    assert!(os.untrusted_script(Operation::Create).is_some());

    let search = vec![a.path().to_path_buf(), b.path().to_path_buf()];
    let os = find(&search, "debian").unwrap();
    assert_eq!(os.dir, a.path().join("debian"));
    assert_eq!(os.api_version, 20);
    assert_eq!(os.variants, ["default", "minimal"]);
    assert_eq!(os.parameters.len(), 3);
    assert_eq!(os.trusted.len(), 5);
    assert_eq!(os.untrusted.keys().collect::<Vec<_>>(), ["create"]);
    let listed = list(&search);
    let names: Vec<(&str, bool)> = listed
        .iter()
        .map(|l| (l.name.as_str(), l.definition.is_ok()))
        .collect();
    assert!(names.contains(&("debian", true)), "{names:?}");
    assert!(names.contains(&("noapi", false)), "{names:?}");
    assert_eq!(names.iter().filter(|(n, _)| *n == "debian").count(), 1);

    let e = find(&search, "nosuch").unwrap_err();
    assert!(e.to_string().contains("no OS definition \"nosuch\""), "{e}");
    assert_eq!(split_name("debian+minimal"), ("debian", Some("minimal")));
    assert_eq!(search_path("/a::/b"), [PathBuf::from("/a"), "/b".into()]);

    // Variants and parameters.
    os.check_variant(Some("minimal")).unwrap();
    let e = os.check_variant(None).unwrap_err();
    assert!(
        e.to_string()
            .contains("a variant is required: default, minimal"),
        "{e}"
    );
    let e = os.check_variant(Some("full")).unwrap_err();
    assert!(e.to_string().contains("\"full\" is not a variant"), "{e}");
    os.check_parameters(["SUITE", "token"]).unwrap();
    let e = os.check_parameters(["dhcp"]).unwrap_err();
    assert!(
        e.to_string().contains("does not take parameter \"dhcp\""),
        "{e}"
    );
}

/// What a script sees, as it reports it: uid, argv, environment, secrets
/// pipe, and its own /proc command line.
const REPORT: &str = r#"#!/bin/sh
echo "uid=$(id -u) gid=$(id -g) groups=$(id -G)"
echo "argv=$*"
echo "cmdline=$(tr '\0' ' ' < /proc/$$/cmdline)"
env | sort | sed 's/^/env:/'
printf 'secrets=%s\n' "$(cat <&3)"
"#;

fn params() -> OsParams {
    let mut p = OsParams::default();
    p.public.insert("suite".into(), "bookworm".into());
    p.private
        .insert("token".into(), Secret::new("PRIVATE-tok".into()));
    p.secret.insert(
        "root_password".into(),
        Secret::new("SECRETCANARY \"quoted\"\nline".into()),
    );
    p
}

#[test]
fn a_trusted_script_runs_unprivileged_with_the_documented_environment() {
    let r = root();
    let os = good_os(r.path(), "debian", REPORT);
    let os = cradle_os::load("debian", &os).unwrap();
    let p = params();
    let env = Environment::for_os(&os, Some("minimal"))
        .instance("web1", "kvm")
        .disks(&[
            Disk {
                path: "/dev/vdb".into(),
                writable: true,
            },
            Disk {
                path: "/srv/web1/data.img".into(),
                writable: false,
            },
        ])
        .params(&p);
    let nobody = User::lookup("nobody").unwrap();
    let runner = Runner {
        user: Some(nobody.clone()),
        timeout: Duration::from_secs(30),
    };
    let done = run_trusted(
        &os.trusted[&Operation::Verify],
        &["parameters"],
        &env,
        &p.secret,
        &runner,
    )
    .unwrap();
    assert!(done.status.success(), "{}", done.tail(10));
    let out = String::from_utf8(done.stdout).unwrap();
    assert!(
        out.contains(&format!(
            "uid={} gid={} groups={}",
            nobody.uid, nobody.gid, nobody.gid
        )),
        "not run as nobody with nobody's group only: {out}"
    );
    assert!(out.contains("argv=parameters\n"), "{out}");
    let env: BTreeMap<&str, &str> = out
        .lines()
        .filter_map(|l| l.strip_prefix("env:"))
        .filter_map(|l| l.split_once('='))
        .collect();
    let want = [
        ("OS_API_VERSION", "20"),
        ("OS_NAME", "debian"),
        ("OS_VARIANT", "minimal"),
        ("INSTANCE_OS", "debian+minimal"),
        ("INSTANCE_NAME", "web1"),
        ("HYPERVISOR", "kvm"),
        ("DISK_COUNT", "2"),
        ("DISK_0_PATH", "/dev/vdb"),
        ("DISK_0_ACCESS", "rw"),
        ("DISK_1_PATH", "/srv/web1/data.img"),
        ("DISK_1_ACCESS", "ro"),
        ("OSP_SUITE", "bookworm"),
        ("OSP_TOKEN", "PRIVATE-tok"),
        ("CRADLE_SECRETS_FD", "3"),
        ("DEBUG_LEVEL", "0"),
        ("PATH", cradle_os::env::PATH),
    ];
    for (k, v) in want {
        assert_eq!(env.get(k), Some(&v), "{k} in {env:?}");
    }
    // Nothing else: not cradle's own environment (sh adds PWD).
    let extra: Vec<&&str> = env
        .keys()
        .filter(|k| !want.iter().any(|(w, _)| w == *k) && **k != "PWD")
        .collect();
    assert!(extra.is_empty(), "unexpected variables {extra:?}");
    // The secret: on the pipe, as JSON, and nowhere else.
    assert!(
        out.contains(r#"secrets={"root_password":"SECRETCANARY \"quoted\"\nline"}"#),
        "{out}"
    );
    let not_secret: String = out.lines().filter(|l| !l.starts_with("secrets=")).collect();
    assert!(!not_secret.contains("SECRETCANARY"), "{out}");
    let cmdline = out.lines().find(|l| l.starts_with("cmdline=")).unwrap();
    assert!(cmdline.ends_with("/debian/verify parameters "), "{cmdline}");
}

#[test]
fn refusals_timeouts_and_failures() {
    let r = root();
    let d = good_os(
        r.path(),
        "debian",
        "#!/bin/sh\necho 'suite \"sid\" is not supported' >&2\nexit 3\n",
    );
    let os = cradle_os::load("debian", &d).unwrap();
    let env = Environment::for_os(&os, Some("default"));
    let no_secrets = BTreeMap::new();
    let runner = Runner {
        user: Some(User::lookup("nobody").unwrap()),
        timeout: Duration::from_secs(30),
    };
    let done = run_trusted(
        &os.trusted[&Operation::Verify],
        &["parameters"],
        &env,
        &no_secrets,
        &runner,
    )
    .unwrap();
    assert_eq!(done.status.code(), Some(3));
    assert_eq!(done.tail(1), "suite \"sid\" is not supported");

    // As root, never root.
    let root_user = Runner {
        user: Some(User::lookup("root").unwrap()),
        timeout: Duration::from_secs(30),
    };
    let e = run_trusted(&d.join("create"), &[], &env, &no_secrets, &root_user).unwrap_err();
    assert!(e.to_string().contains("unprivileged"), "{e}");
    let e = User::lookup("no-such-user-here").unwrap_err();
    assert!(e.to_string().contains("no such user"), "{e}");

    // A script that hangs, with a child of its own: both killed at the deadline.
    write(
        &d.join("rename"),
        "#!/bin/sh\nsleep 987 &\nsleep 986\n",
        0o755,
    );
    let quick = Runner {
        timeout: Duration::from_secs(1),
        ..runner
    };
    let started = Instant::now();
    let e = run_trusted(&d.join("rename"), &[], &env, &no_secrets, &quick).unwrap_err();
    assert!(matches!(e, Error::Timeout { .. }), "{e}");
    assert!(e.to_string().contains("ran past its 1s deadline"), "{e}");
    assert!(started.elapsed() < Duration::from_secs(5));
    std::thread::sleep(Duration::from_millis(200));
    for marker in ["sleep\u{0}987", "sleep\u{0}986"] {
        assert!(!running(marker), "{marker} is still running");
    }
}

/// Whether any process's command line holds `needle` (NULs between words).
fn running(needle: &str) -> bool {
    std::fs::read_dir("/proc").unwrap().flatten().any(|e| {
        std::fs::read(e.path().join("cmdline"))
            .map(|c| String::from_utf8_lossy(&c).contains(needle))
            .unwrap_or(false)
    })
}
