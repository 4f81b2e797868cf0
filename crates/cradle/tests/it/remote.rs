//! `cradle remote` against a real sshd the test starts (see
//! `cradle_remotefs::testkit`), with both transports.

use std::ffi::OsString;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cradle_remotefs::testkit::{Sshd, wait_until_none_mention};

use crate::harness::{Run, cradle_command};

/// `cradle remote --transport T` with the fixture's port, user, key and
/// known_hosts as flags.
fn remote(sshd: &Sshd, transport: &str) -> Command {
    let mut c = cradle_command();
    c.arg("remote")
        .args(["--transport", transport, "--user", sshd.user()])
        .args(["--port", &sshd.port().to_string()])
        .arg("-i")
        .arg(sshd.key())
        .arg("--known-hosts")
        .arg(sshd.known_hosts());
    c
}

fn operand(p: &Path) -> OsString {
    let mut s = OsString::from("127.0.0.1:");
    s.push(p);
    s
}

#[test]
fn every_verb_with_both_transports() {
    let sshd = Sshd::start().unwrap();
    let local = tempfile::tempdir().unwrap();
    for t in ["ssh", "rsync"] {
        // A name no shell, glob or option parser may touch, not UTF-8 either.
        let mut name = OsString::from(format!("{t} $(id) *;\n-x '"));
        name.push(std::ffi::OsStr::from_bytes(b"\xff"));
        let dir = sshd.home().join(&name);
        Run::of(remote(&sshd, t).arg("mkdir").arg(operand(&dir.join("sub")))).success();
        assert!(dir.join("sub").is_dir(), "{t}");
        Run::of(
            remote(&sshd, t)
                .arg("touch")
                .arg(operand(&dir.join("empty"))),
        )
        .success();
        assert_eq!(std::fs::read(dir.join("empty")).unwrap(), b"", "{t}");

        let src = local.path().join(&name);
        std::fs::write(&src, format!("payload over {t}")).unwrap();
        Run::of(
            remote(&sshd, t)
                .arg("copy")
                .arg(&src)
                .arg(operand(&dir.join(&name))),
        )
        .success();
        assert_eq!(
            std::fs::read(dir.join(&name)).unwrap(),
            std::fs::read(&src).unwrap()
        );
        let back = local.path().join(format!("back-{t}"));
        Run::of(
            remote(&sshd, t)
                .arg("copy")
                .arg(operand(&dir.join(&name)))
                .arg(&back),
        )
        .success();
        assert_eq!(std::fs::read(&back).unwrap(), std::fs::read(&src).unwrap());

        Run::of(remote(&sshd, t).arg("rm").arg(operand(&dir.join(&name)))).success();
        assert!(!dir.join(&name).exists(), "{t}");
        Run::of(remote(&sshd, t).arg("rm").arg(operand(&dir.join(&name))))
            .fails_with(&["no such file"]);
        Run::of(remote(&sshd, t).arg("rmdir").arg(operand(&dir))).success();
        assert!(!dir.exists(), "{t}");
    }
}

/// The [remote] section of a config file and CRADLE_REMOTE_* variables
/// configure it, and a flag beats both.
#[test]
fn config_file_and_environment() {
    let sshd = Sshd::start().unwrap();
    let cfg = sshd.dir().join("cradle.toml");
    std::fs::write(
        &cfg,
        format!(
            "[remote]\ntransport = \"rsync\"\nuser = \"{}\"\nport = {}\nidentity_file = \"{}\"\n",
            sshd.user(),
            sshd.port(),
            sshd.key().display()
        ),
    )
    .unwrap();
    let target = sshd.home().join("from-config");
    Run::of(
        cradle_command()
            .env("CRADLE_REMOTE_KNOWN_HOSTS", sshd.known_hosts())
            .args(["remote", "--config"])
            .arg(&cfg)
            .arg("mkdir")
            .arg(operand(&target)),
    )
    .success();
    assert!(target.is_dir());
    // The wrong known_hosts from the environment is refused by name; the
    // flag's right one wins over it.
    Run::of(
        cradle_command()
            .env("CRADLE_REMOTE_KNOWN_HOSTS", sshd.wrong_known_hosts())
            .args(["remote", "--config"])
            .arg(&cfg)
            .arg("rmdir")
            .arg(operand(&target)),
    )
    .fails_with(&["does not match known_hosts"]);
    Run::of(
        cradle_command()
            .env("CRADLE_REMOTE_KNOWN_HOSTS", sshd.wrong_known_hosts())
            .args(["remote", "--config"])
            .arg(&cfg)
            .arg("--known-hosts")
            .arg(sshd.known_hosts())
            .arg("rmdir")
            .arg(operand(&target)),
    )
    .success();
    assert!(!target.exists());
    Run::of(
        cradle_command()
            .env("CRADLE_REMOTE_TRANSPORT", "ftp")
            .args(["remote", "mkdir", "h:/x"]),
    )
    .fails_with(&["ftp"]);
}

#[test]
fn bad_operands_are_refused_before_connecting() {
    let sshd = Sshd::start().unwrap();
    for (args, needle) in [
        (
            vec!["mkdir", "--", "-oProxyCommand=x:/tmp/x"],
            "invalid host",
        ),
        (vec!["mkdir", "/not/remote"], "not a HOST:PATH operand"),
        (vec!["mkdir", "h:/a/../b"], "'..'"),
        (vec!["rm", "h:"], "empty"),
        (vec!["copy", "a", "b"], "neither operand is remote"),
        (vec!["copy", "h:/a", "g:/b"], "both operands are remote"),
    ] {
        Run::of(remote(&sshd, "ssh").args(&args)).fails_with(&[needle]);
    }
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    Run::of(
        cradle_command()
            .args([
                "remote",
                "--transport",
                "rsync",
                "--port",
                &closed.to_string(),
            ])
            .args(["mkdir", "127.0.0.1:/tmp/x"]),
    )
    .fails_with(&["cannot reach 127.0.0.1"]);
}

/// Ctrl-C during a copy stops cradle at once, and every ssh, scp and
/// rsync it started with it (they run in process groups of their own, so
/// the terminal's signal would not reach them).
#[test]
fn interrupt_stops_the_copy_and_its_processes() {
    let sshd = Sshd::start().unwrap();
    let local = tempfile::tempdir().unwrap();
    // Dense: rsync writes zeros as holes, so a sparse file would show no
    // data on the remote side until the end.
    let big = local.path().join("big");
    let mut x = 0x9e3779b97f4a7c15u64;
    let data: Vec<u8> = (0..64 << 20)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    std::fs::write(&big, data).unwrap();
    let marker = sshd.known_hosts().into_os_string();
    for t in ["ssh", "rsync"] {
        let dst = sshd.home().join(format!("big-{t}"));
        // 64 MiB at 4 MiB/s: the copy is surely running when the signal
        // comes, however busy the machine is.
        let mut child = remote(&sshd, t)
            .args(["--bwlimit", "4096"])
            .arg("copy")
            .arg(&big)
            .arg(operand(&dst))
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Wait until data is arriving on the remote side (in a temporary
        // file: the destination appears only when complete).
        let start = Instant::now();
        while arrived(&sshd.home()) == 0 {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "{t}: nothing arrived"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        if child.try_wait().unwrap().is_some() {
            let out = child.wait_with_output().unwrap();
            panic!(
                "{t}: copy ended early ({}) after {:?} with {} arrived: {}",
                out.status,
                start.elapsed(),
                arrived(&sshd.home()),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        // SAFETY: kill(2) on our own child's pid.
        assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGINT) }, 0);
        let stopped = Instant::now();
        let out = child.wait_with_output().unwrap();
        assert!(
            stopped.elapsed() < Duration::from_secs(3),
            "{t}: {:?}",
            stopped.elapsed()
        );
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("cancelled"), "{t}: {stderr}");
        let left = wait_until_none_mention(&marker, Duration::from_secs(3));
        assert!(left.is_empty(), "{t}: still running: {left:?}");
        // The remote side drops its partial file; nothing replaced dst.
        let start = Instant::now();
        while arrived(&sshd.home()) > 0 {
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "{t}: partial upload left behind"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(!dst.exists(), "{t}");
    }
}

/// Bytes in the files of `dir`.
fn arrived(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .filter_map(|e| e.metadata().ok())
        .filter(|m| m.is_file())
        .map(|m| m.len())
        .sum()
}
