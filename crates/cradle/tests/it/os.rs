//! `cradle os list|show|verify` on definitions the test lays out, with a
//! real `/bin/sh` verify script run as `nobody`.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use crate::harness::{Run, cradle_command};

fn write(p: &Path, text: &str, mode: u32) {
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, text).unwrap();
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// Accepts suites bookworm and trixie, and wants the root password among
/// the secrets on descriptor 3 (never in its environment).
const VERIFY: &str = r#"#!/bin/sh
case "$OSP_SUITE" in
  bookworm|trixie) ;;
  *) echo "suite '$OSP_SUITE' is not one of bookworm, trixie" >&2; exit 1 ;;
esac
env | grep -q CANARY && { echo "a secret is in the environment" >&2; exit 2; }
secrets=$(cat <&"$CRADLE_SECRETS_FD")
case "$secrets" in
  *'"root_password":"'*) ;;
  *) echo "root_password missing from the secrets" >&2; exit 3 ;;
esac
test "$OS_VARIANT" = minimal || { echo "variant is '$OS_VARIANT'" >&2; exit 4; }
"#;

#[test]
fn list_show_and_verify_definitions() {
    let root = tempfile::tempdir().unwrap();
    std::fs::set_permissions(root.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let d = root.path().join("debian");
    write(&d.join("ganeti_api_version"), "20\n", 0o644);
    write(&d.join("variants.list"), "default\nminimal\n", 0o644);
    write(
        &d.join("parameters.list"),
        "suite The Debian suite\nroot_password The root password\n",
        0o644,
    );
    write(&d.join("verify"), VERIFY, 0o755);
    write(&d.join("untrusted/create"), "#!/bin/sh\n", 0o644);
    write(&d.join("untrusted/functions.sh"), "\n", 0o644);
    std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).unwrap();
    let broken = root.path().join("broken");
    write(&broken.join("create"), "#!/bin/sh\n", 0o755);
    let search = root.path().to_str().unwrap();
    let canary = format!("OSCANARY-{}", std::process::id());
    let pw_file = root.path().join("pw");
    std::fs::write(&pw_file, format!("{canary}\n")).unwrap();
    let secret = format!("root_password=@{}", pw_file.display());
    let mut outputs = Vec::new();
    let mut run = |args: &[&str]| {
        let r = Run::of(
            cradle_command()
                .args(["os"])
                .args(args)
                .env("CRADLE_OS_SEARCH_PATH", search),
        );
        outputs.push(format!("{}{}", r.stdout, r.stderr));
        r
    };

    let listed = run(&["list"]).success();
    let lines: Vec<&str> = listed.stdout.lines().collect();
    assert!(lines[0].starts_with("NAME"), "{}", listed.stdout);
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("broken")
                && l.contains("invalid: has no ganeti_api_version file")),
        "{}",
        listed.stdout
    );
    assert!(
        lines.iter().any(|l| l.starts_with("debian")
            && l.contains("default,minimal")
            && l.contains("create(appliance),verify")
            && l.ends_with("ok")),
        "{}",
        listed.stdout
    );
    let json = run(&["list", "-o", "json"]).success().json();
    assert_eq!(json[1]["definition"]["api_version"], 20, "{json}");

    let shown = run(&["show", "debian+minimal"]).success();
    for want in [
        "api version  20",
        "create       untrusted (appliance)",
        "verify       trusted (host)",
        "suite",
        "untrusted files: functions.sh",
    ] {
        assert!(shown.stdout.contains(want), "{want}: {}", shown.stdout);
    }
    run(&["show", "broken"]).fails_with(&["has no ganeti_api_version file"]);
    run(&["show", "nosuch"]).fails_with(&["no OS definition \"nosuch\""]);

    // The script accepts, then refuses with its own words.
    let ok = run(&[
        "verify",
        "debian+minimal",
        "--param",
        "suite=bookworm",
        "--secret-param",
        &secret,
    ])
    .success();
    assert!(ok.stdout.contains("are valid"), "{}", ok.stdout);
    run(&[
        "verify",
        "debian+minimal",
        "--param",
        "suite=sid",
        "--secret-param",
        &secret,
    ])
    .fails_with(&[
        "refused the parameters",
        "suite 'sid' is not one of bookworm, trixie",
    ]);
    run(&["verify", "debian+minimal", "--param", "suite=bookworm"])
        .fails_with(&["root_password missing from the secrets"]);
    // Checked before any script runs.
    run(&["verify", "debian", "--param", "suite=bookworm"])
        .fails_with(&["a variant is required: default, minimal"]);
    run(&["verify", "debian+minimal", "--param", "dhcp=yes"])
        .fails_with(&["does not take parameter \"dhcp\""]);
    // --search-path wins over the environment.
    run(&["list", "--search-path", "/nonexistent"])
        .success()
        .stderr
        .contains("no OS definitions in /nonexistent")
        .then_some(())
        .expect("an empty search path is said so");

    for out in &outputs {
        assert!(!out.contains(&canary), "the secret was printed: {out}");
    }
}
