//! Both transports against a real OpenSSH sshd on 127.0.0.1, started by
//! each test (see `cradle_remotefs::testkit`), logging in as a dedicated
//! unprivileged user. What the drivers do is checked on the remote side's
//! filesystem, byte for byte.

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cradle_remotefs::testkit::{Sshd, SshdOptions, wait_until_none_mention};
use cradle_remotefs::{
    CancellationToken, Error, Host, Op, Progress, Remote, RemoteFilesystem, RemotePath, Settings,
    Transport,
};

const BOTH: [Transport; 2] = [Transport::Ssh, Transport::Rsync];

fn settings(sshd: &Sshd, transport: Transport) -> Settings {
    Settings {
        transport,
        user: Some(sshd.user().to_string()),
        port: sshd.port(),
        identity_file: Some(sshd.key()),
        known_hosts: Some(sshd.known_hosts()),
        connect_timeout: Duration::from_secs(5),
        timeout: Duration::from_secs(30),
        copy_timeout: Duration::from_secs(120),
        ..Settings::default()
    }
}

fn driver(sshd: &Sshd, transport: Transport) -> Remote {
    Remote::new(settings(sshd, transport)).unwrap()
}

fn localhost() -> Host {
    Host::parse("127.0.0.1").unwrap()
}

fn rp(p: impl AsRef<OsStr>) -> RemotePath {
    RemotePath::new(p.as_ref()).unwrap()
}

/// Remote path of a local one (the remote host is this machine).
fn remote(p: &Path) -> RemotePath {
    rp(p.as_os_str())
}

/// Names that break naive quoting, globbing or option parsing.
fn nasty() -> Vec<OsString> {
    let mut v: Vec<OsString> = [
        "plain",
        "with space",
        "it's",
        "dq\"x",
        "$(touch PWNED)",
        "`touch PWNED`",
        "semi;colon&amp|pipe",
        "star*",
        "q?mark",
        "[br]",
        "new\nline",
        "-leading-dash",
        "--",
        "~tilde",
        "back\\slash",
        "tab\tx",
        "a:b",
        "glob*[a-z]?",
        " lead and trail ",
        "-rf *",
    ]
    .iter()
    .map(OsString::from)
    .collect();
    v.push(OsStr::from_bytes(b"not-utf8-\xff\xfe\x80").to_os_string());
    v
}

fn random_bytes(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn assert_owned_by_test_user(sshd: &Sshd, p: &Path) {
    let m = std::fs::symlink_metadata(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    assert_eq!(
        m.uid(),
        sshd.uid(),
        "{} was not made by the remote user",
        p.display()
    );
}

/// Every operation, for every nasty name: the result on the remote
/// filesystem is exactly the name given, and nothing the names spell is
/// executed or expanded. The names run concurrently (each op is an ssh
/// login, about a quarter of a second here).
async fn every_operation_with_nasty_names(t: Transport) {
    let sshd = Arc::new(Sshd::start().unwrap());
    let host = localhost();
    let local = Arc::new(tempfile::tempdir().unwrap());
    let fs = Arc::new(driver(&sshd, t));
    let base = sshd.home().join(t.to_string());
    fs.create_dir(&host, &remote(&base), &Op::new())
        .await
        .unwrap();
    let mut set = tokio::task::JoinSet::new();
    for (i, name) in nasty().into_iter().enumerate() {
        let (sshd, local, fs, base, host) = (
            sshd.clone(),
            local.clone(),
            fs.clone(),
            base.clone(),
            host.clone(),
        );
        set.spawn(async move {
            let op = Op::new();
            let ctx = format!("{t} {name:?}");
            let dir = base.join(&name);
            let file = dir.join(&name);
            let copy = dir.join(format!("copy-{i}"));
            // mkdir (twice: an existing directory is fine), and nested.
            fs.create_dir(&host, &remote(&dir), &op).await.expect(&ctx);
            fs.create_dir(&host, &remote(&dir), &op).await.expect(&ctx);
            fs.create_dir(&host, &remote(&dir.join(&name).join("deep")), &op)
                .await
                .expect(&ctx);
            assert!(dir.join(&name).join("deep").is_dir(), "{ctx}");
            assert_owned_by_test_user(&sshd, &dir);
            fs.remove_dir(&host, &remote(&dir.join(&name)), &op)
                .await
                .expect(&ctx);
            assert!(!dir.join(&name).exists(), "{ctx}");

            // touch: creates, then leaves an existing file's content alone.
            fs.create_file(&host, &remote(&file), &op)
                .await
                .expect(&ctx);
            assert_eq!(std::fs::read(&file).expect(&ctx), b"", "{ctx}");
            assert_owned_by_test_user(&sshd, &file);
            std::fs::write(&file, b"kept").unwrap();
            fs.create_file(&host, &remote(&file), &op)
                .await
                .expect(&ctx);
            assert_eq!(std::fs::read(&file).unwrap(), b"kept", "{ctx}");

            // copy to, byte for byte, from a local file with the same name.
            let data = random_bytes(100_000 + i, i as u64);
            let src = local.path().join(&name);
            std::fs::write(&src, &data).unwrap();
            fs.copy_to(&src, &host, &remote(&copy), &op)
                .await
                .expect(&ctx);
            assert_eq!(std::fs::read(&copy).expect(&ctx), data, "{ctx}");
            assert_owned_by_test_user(&sshd, &copy);
            // Over an existing file too.
            fs.copy_to(&src, &host, &remote(&file), &op)
                .await
                .expect(&ctx);
            assert_eq!(std::fs::read(&file).unwrap(), data, "{ctx}");

            // copy from, to a local name as nasty.
            let mut back = OsString::from("back-");
            back.push(&name);
            let back = local.path().join(back);
            fs.copy_from(&host, &remote(&file), &back, &op)
                .await
                .expect(&ctx);
            assert_eq!(std::fs::read(&back).unwrap(), data, "{ctx}");

            // rm, then the directory and what is left in it.
            fs.remove_file(&host, &remote(&file), &op)
                .await
                .expect(&ctx);
            assert!(!file.exists(), "{ctx}");
            assert!(copy.exists(), "rm took a neighbour: {ctx}");
            fs.remove_dir(&host, &remote(&dir), &op).await.expect(&ctx);
            assert!(!dir.exists(), "{ctx}");
        });
    }
    while let Some(r) = set.join_next().await {
        r.unwrap();
    }
    // Every name came and went; nothing else is left, nothing ran.
    let left: Vec<_> = std::fs::read_dir(&base)
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(left.is_empty(), "{t}: left behind {left:?}");
    fs.remove_dir(&host, &remote(&base), &Op::new())
        .await
        .unwrap();
    for p in [
        sshd.home(),
        Path::new("/home/cradletest").into(),
        std::env::current_dir().unwrap(),
    ] {
        assert!(
            !p.join("PWNED").exists(),
            "a name was executed in {}",
            p.display()
        );
    }
    let left: Vec<_> = std::fs::read_dir(sshd.home())
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(left.is_empty(), "left in home: {left:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssh_every_operation_with_nasty_names() {
    every_operation_with_nasty_names(Transport::Ssh).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rsync_every_operation_with_nasty_names() {
    every_operation_with_nasty_names(Transport::Rsync).await;
}

/// Relative paths are relative to the remote user's home directory, and an
/// IPv6 host in brackets works.
#[tokio::test]
async fn relative_paths_and_ipv6() {
    let sshd = Sshd::start().unwrap();
    let home = PathBuf::from("/home").join(sshd.user());
    let v6 = Host::parse("[::1]").unwrap();
    for t in BOTH {
        let fs = driver(&sshd, t);
        let name = format!("cradle-rel-{}-{t}", sshd.port());
        let rel = rp(format!("{name}/-x y"));
        fs.create_dir(&v6, &rel, &Op::new()).await.unwrap();
        assert!(home.join(&name).join("-x y").is_dir(), "{t}");
        fs.remove_dir(&v6, &rp(&name), &Op::new()).await.unwrap();
        assert!(!home.join(&name).exists(), "{t}");
    }
}

/// A missing file, a file where a directory is asked for and the reverse
/// come back as typed errors, and remove_file never takes a directory.
#[tokio::test]
async fn missing_and_wrong_kinds() {
    let sshd = Sshd::start().unwrap();
    let host = localhost();
    let local = tempfile::tempdir().unwrap();
    let home = sshd.home();
    std::fs::create_dir(home.join("adir")).unwrap();
    std::fs::write(home.join("adir/inside"), b"x").unwrap();
    std::fs::write(home.join("afile"), b"x").unwrap();
    std::os::unix::fs::symlink("afile", home.join("alink")).unwrap();
    sshd.give(&home).unwrap();
    for t in BOTH {
        let fs = driver(&sshd, t);
        let op = Op::new();
        let missing = remote(&home.join("missing"));
        let e = fs
            .copy_from(&host, &missing, &local.path().join("x"), &op)
            .await
            .unwrap_err();
        assert!(matches!(e, Error::NotFound { .. }), "{t}: {e}");
        assert!(!local.path().join("x").exists());
        let e = fs.remove_file(&host, &missing, &op).await.unwrap_err();
        assert!(matches!(e, Error::NotFound { .. }), "{t}: {e}");
        let e = fs.remove_dir(&host, &missing, &op).await.unwrap_err();
        assert!(matches!(e, Error::NotFound { .. }), "{t}: {e}");
        let e = fs
            .copy_to(&local.path().join("nope"), &host, &missing, &op)
            .await
            .unwrap_err();
        assert!(matches!(e, Error::Local { .. }), "{t}: {e}");

        let e = fs
            .remove_file(&host, &remote(&home.join("adir")), &op)
            .await
            .unwrap_err();
        assert!(
            home.join("adir/inside").exists(),
            "{t}: remove_file took a directory"
        );
        assert!(
            matches!(e, Error::NotFound { .. } | Error::IsADirectory { .. }),
            "{t}: {e}"
        );
        let e = fs
            .remove_dir(&host, &remote(&home.join("afile")), &op)
            .await
            .unwrap_err();
        assert!(home.join("afile").exists(), "{t}: remove_dir took a file");
        assert!(
            matches!(e, Error::NotFound { .. } | Error::NotADirectory { .. }),
            "{t}: {e}"
        );
        let e = fs
            .copy_from(
                &host,
                &remote(&home.join("adir")),
                &local.path().join("y"),
                &op,
            )
            .await
            .unwrap_err();
        assert!(matches!(e, Error::IsADirectory { .. }), "{t}: {e}");
        // A symlink as a download's source: scp follows it, rsync refuses.
        let z = local.path().join("z");
        let r = fs
            .copy_from(&host, &remote(&home.join("alink")), &z, &op)
            .await;
        match t {
            Transport::Ssh => {
                r.unwrap();
                assert_eq!(std::fs::read(&z).unwrap(), b"x");
            }
            Transport::Rsync => {
                let e = r.unwrap_err();
                assert!(matches!(e, Error::NotAFile { .. }), "{t}: {e}");
            }
        }
    }
}

/// Permission denied, no space, unreachable, wrong and unknown host keys,
/// and a key the server does not accept.
#[tokio::test]
async fn failures_are_typed() {
    let sshd = Sshd::start_with(&SshdOptions {
        full_dir: true,
        ..Default::default()
    })
    .unwrap();
    let host = localhost();
    let local = tempfile::tempdir().unwrap();
    let two_mib = local.path().join("two-mib");
    std::fs::write(&two_mib, random_bytes(2 << 20, 7)).unwrap();
    let small = local.path().join("small");
    std::fs::write(&small, b"small").unwrap();
    for t in BOTH {
        let fs = driver(&sshd, t);
        let op = Op::new();
        let locked = sshd.locked();
        let e = fs
            .create_dir(&host, &remote(&locked.join("d")), &op)
            .await
            .unwrap_err();
        assert!(matches!(e, Error::PermissionDenied { .. }), "{t}: {e}");
        let e = fs
            .copy_to(&small, &host, &remote(&locked.join("f")), &op)
            .await
            .unwrap_err();
        assert!(matches!(e, Error::PermissionDenied { .. }), "{t}: {e}");
        assert!(!locked.join("d").exists() && !locked.join("f").exists());

        // A 1 MiB tmpfs that only sshd's mount namespace sees.
        let e = fs
            .copy_to(
                &two_mib,
                &host,
                &remote(&sshd.full().join(format!("big-{t}"))),
                &op,
            )
            .await
            .unwrap_err();
        assert!(matches!(e, Error::NoSpace { .. }), "{t}: {e}");

        let mut s = settings(&sshd, t);
        s.port = closed_port();
        let e = Remote::new(s)
            .unwrap()
            .create_dir(&host, &rp("/tmp/x"), &op)
            .await
            .unwrap_err();
        assert!(matches!(e, Error::Unreachable { .. }), "{t}: {e}");

        let mut s = settings(&sshd, t);
        s.known_hosts = Some(sshd.wrong_known_hosts());
        let e = Remote::new(s)
            .unwrap()
            .create_dir(&host, &rp("/tmp/x"), &op)
            .await
            .unwrap_err();
        assert!(matches!(e, Error::HostKeyMismatch { .. }), "{t}: {e}");

        let mut s = settings(&sshd, t);
        s.known_hosts = Some(sshd.empty_known_hosts());
        let e = Remote::new(s)
            .unwrap()
            .create_dir(&host, &rp("/tmp/x"), &op)
            .await
            .unwrap_err();
        assert!(matches!(e, Error::HostKeyUnknown { .. }), "{t}: {e}");

        let mut s = settings(&sshd, t);
        s.identity_file = Some(sshd.dir().join("other_host_ed25519"));
        let e = Remote::new(s)
            .unwrap()
            .create_dir(&host, &rp("/tmp/x"), &op)
            .await
            .unwrap_err();
        assert!(matches!(e, Error::AuthenticationFailed { .. }), "{t}: {e}");
    }
}

fn closed_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// Cancelling a 1 GiB copy returns at once and leaves no ssh, scp or rsync
/// running, and no partial file on the remote side; so do dropping the
/// operation and its deadline passing.
#[tokio::test]
async fn cancel_drop_and_timeout_kill_every_process() {
    let sshd = Sshd::start().unwrap();
    let marker = sshd.known_hosts().into_os_string();
    let host = localhost();
    let local = tempfile::tempdir().unwrap();
    let big = local.path().join("one-gib");
    std::fs::File::create(&big)
        .unwrap()
        .set_len(1 << 30)
        .unwrap();
    for t in BOTH {
        for how in ["cancel", "drop", "timeout"] {
            // The deadline case runs at 64 MiB/s, so a slow login on a
            // busy machine still leaves the copy running when it passes.
            let mut settings = settings(&sshd, t);
            if how == "timeout" {
                settings.bwlimit_kib = 64 * 1024;
            }
            let fs = Arc::new(Remote::new(settings).unwrap());
            let dst = remote(&sshd.home().join(format!("big-{t}-{how}")));
            let token = CancellationToken::new();
            let seen = Arc::new(Mutex::new(Progress::default()));
            let seen2 = seen.clone();
            let mut op = Op::new().with_cancel(token.clone()).on_progress(move |p| {
                *seen2.lock().unwrap() = p;
            });
            if how == "timeout" {
                op = op.with_timeout(Duration::from_secs(4));
            }
            let task = {
                let (fs, big, host, dst) = (fs.clone(), big.clone(), host.clone(), dst.clone());
                tokio::spawn(async move { fs.copy_to(&big, &host, &dst, &op).await })
            };
            // Wait until bytes are moving.
            let start = Instant::now();
            while seen.lock().unwrap().done == 0 {
                assert!(
                    start.elapsed() < Duration::from_secs(20),
                    "{t}: no progress"
                );
                assert!(
                    !task.is_finished(),
                    "{t} {how}: copy ended early: {:?}",
                    task.await
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let p = *seen.lock().unwrap();
            assert!(p.done < p.total && p.total == 1 << 30, "{t} {how}: {p:?}");
            let stopped = Instant::now();
            match how {
                "cancel" => {
                    token.cancel();
                    let e = task.await.unwrap().unwrap_err();
                    assert!(matches!(e, Error::Cancelled { .. }), "{t}: {e}");
                }
                "drop" => {
                    task.abort();
                    assert!(task.await.unwrap_err().is_cancelled());
                }
                _ => {
                    let e = task.await.unwrap().unwrap_err();
                    assert!(matches!(e, Error::Timeout { .. }), "{t}: {e}");
                }
            }
            if how != "timeout" {
                assert!(
                    stopped.elapsed() < Duration::from_secs(2),
                    "{t} {how}: took {:?}",
                    stopped.elapsed()
                );
            }
            // SIGKILLed processes vanish (or turn zombie) within moments.
            let left = wait_until_none_mention(&marker, Duration::from_secs(3));
            assert!(left.is_empty(), "{t} {how}: still running: {left:?}");
            // The remote side drops its partial file, and the destination
            // never appears.
            let start = Instant::now();
            loop {
                let left: Vec<_> = std::fs::read_dir(sshd.home())
                    .unwrap()
                    .flatten()
                    .map(|e| e.file_name())
                    .collect();
                if left.is_empty() {
                    break;
                }
                assert!(
                    start.elapsed() < Duration::from_secs(5),
                    "{t} {how}: left {left:?}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Progress of a finished copy ends at the total, in both directions.
#[tokio::test]
async fn progress_reaches_the_total() {
    let sshd = Sshd::start().unwrap();
    let host = localhost();
    let local = tempfile::tempdir().unwrap();
    let src = local.path().join("src");
    let data = random_bytes(3 << 20, 3);
    std::fs::write(&src, &data).unwrap();
    for t in BOTH {
        let fs = driver(&sshd, t);
        let last = Arc::new(Mutex::new(Vec::new()));
        let l2 = last.clone();
        let op = Op::new().on_progress(move |p| l2.lock().unwrap().push(p));
        let dst = sshd.home().join(format!("p-{t}"));
        fs.copy_to(&src, &host, &remote(&dst), &op).await.unwrap();
        fs.copy_from(
            &host,
            &remote(&dst),
            &local.path().join(format!("p-{t}")),
            &op,
        )
        .await
        .unwrap();
        let seen = last.lock().unwrap();
        let totals: Vec<_> = seen.iter().filter(|p| p.done == p.total).collect();
        assert!(
            totals.len() >= 2 && totals.iter().all(|p| p.total == data.len() as u64),
            "{t}: {seen:?}"
        );
        assert!(
            seen.windows(2)
                .all(|w| w[0].done <= w[1].done || w[1].done == 0),
            "{t}: {seen:?}"
        );
    }
}

/// A sparse file stays sparse through the rsync driver.
#[tokio::test]
async fn rsync_keeps_sparse_files_sparse() {
    let sshd = Sshd::start().unwrap();
    let local = tempfile::tempdir().unwrap();
    let src = local.path().join("sparse");
    let f = std::fs::File::create(&src).unwrap();
    f.set_len(64 << 20).unwrap();
    std::os::unix::fs::FileExt::write_at(&f, b"head", 0).unwrap();
    std::os::unix::fs::FileExt::write_at(&f, b"tail", (64 << 20) - 4).unwrap();
    let fs = driver(&sshd, Transport::Rsync);
    let dst = sshd.home().join("sparse");
    fs.copy_to(&src, &localhost(), &remote(&dst), &Op::new())
        .await
        .unwrap();
    let m = std::fs::metadata(&dst).unwrap();
    assert_eq!(m.len(), 64 << 20);
    assert!(
        m.blocks() * 512 < 1 << 20,
        "allocated {} bytes",
        m.blocks() * 512
    );
    assert_eq!(std::fs::read(&dst).unwrap(), std::fs::read(&src).unwrap());
}

/// With the key confined by `command="rrsync DIR"`, the rsync driver does
/// everything inside DIR, and the ssh driver is refused.
#[tokio::test]
async fn rrsync_confines_the_rsync_driver() {
    let sshd = Sshd::start().unwrap();
    let host = localhost();
    let jail = sshd.jail();
    let local = tempfile::tempdir().unwrap();
    let mut s = settings(&sshd, Transport::Rsync);
    s.identity_file = Some(sshd.rrsync_key());
    let fs = Remote::new(s.clone()).unwrap();
    let op = Op::new();
    for (i, name) in nasty().into_iter().enumerate() {
        let ctx = format!("{name:?}");
        // Absolute paths are rooted at rrsync's directory, relative ones too.
        let abs = Path::new("/d").join(&name);
        let rel = Path::new("r").join(&name);
        fs.create_dir(&host, &remote(&abs), &op).await.expect(&ctx);
        fs.create_dir(&host, &remote(&rel), &op).await.expect(&ctx);
        assert!(
            jail.join("d").join(&name).is_dir() && jail.join("r").join(&name).is_dir(),
            "{ctx}"
        );
        fs.create_file(&host, &remote(&abs.join("f")), &op)
            .await
            .expect(&ctx);
        assert!(jail.join("d").join(&name).join("f").is_file(), "{ctx}");
        let data = random_bytes(10_000, i as u64);
        let src = local.path().join(&name);
        std::fs::write(&src, &data).unwrap();
        fs.copy_to(&src, &host, &remote(&rel.join(&name)), &op)
            .await
            .expect(&ctx);
        assert_eq!(
            std::fs::read(jail.join(&rel).join(&name)).unwrap(),
            data,
            "{ctx}"
        );
        let back = local.path().join("back");
        fs.copy_from(&host, &remote(&rel.join(&name)), &back, &op)
            .await
            .expect(&ctx);
        assert_eq!(std::fs::read(&back).unwrap(), data, "{ctx}");
        fs.remove_file(&host, &remote(&rel.join(&name)), &op)
            .await
            .expect(&ctx);
        assert!(!jail.join(&rel).join(&name).exists(), "{ctx}");
        fs.remove_dir(&host, &remote(&abs), &op).await.expect(&ctx);
        fs.remove_dir(&host, &remote(&rel), &op).await.expect(&ctx);
        assert!(!jail.join(abs.strip_prefix("/").unwrap()).exists(), "{ctx}");
    }
    fs.remove_dir(&host, &rp("/d"), &op).await.unwrap();
    fs.remove_dir(&host, &rp("r"), &op).await.unwrap();
    let left: Vec<_> = std::fs::read_dir(&jail)
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(left.is_empty(), "left in the jail: {left:?}");

    s.transport = Transport::Ssh;
    let ssh = Remote::new(s).unwrap();
    let e = ssh.create_dir(&host, &rp("/x"), &op).await.unwrap_err();
    assert!(matches!(e, Error::Refused { .. }), "{e}");
    let e = ssh
        .copy_to(&local.path().join("back"), &host, &rp("/x"), &op)
        .await
        .unwrap_err();
    assert!(
        matches!(e, Error::Refused { .. } | Error::Failed { .. }),
        "{e}"
    );
    assert!(!jail.join("x").exists());
}

/// A copy or touch onto an existing (empty) directory is refused by both
/// transports, and the directory is left as it was.
#[tokio::test]
async fn copy_onto_a_directory_is_refused() {
    let sshd = Sshd::start().unwrap();
    let host = localhost();
    let local = tempfile::tempdir().unwrap();
    let src = local.path().join("src");
    std::fs::write(&src, b"data").unwrap();
    let dir = sshd.home().join("adir");
    std::fs::create_dir(&dir).unwrap();
    sshd.give(&dir).unwrap();
    for t in BOTH {
        let r = driver(&sshd, t)
            .copy_to(&src, &host, &remote(&dir), &Op::new())
            .await;
        let inside: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        let e = r.expect_err(&format!("{t}: copied, now in the directory: {inside:?}"));
        assert!(matches!(e, Error::IsADirectory { .. }), "{t}: {e}");
        let e = driver(&sshd, t)
            .create_file(&host, &remote(&dir), &Op::new())
            .await
            .unwrap_err();
        assert!(matches!(e, Error::IsADirectory { .. }), "{t}: {e}");
        assert!(dir.is_dir(), "{t}: the directory was replaced");
        let inside: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert!(inside.is_empty(), "{t}: {inside:?}");
    }
}

/// `bwlimit` holds a copy to its rate with both transports (ssh feeds the
/// upload through a paced pipe; rsync has --bwlimit).
#[tokio::test]
async fn bandwidth_limit_is_honoured() {
    let sshd = Sshd::start().unwrap();
    let local = tempfile::tempdir().unwrap();
    let src = local.path().join("src");
    let data = random_bytes(4 << 20, 9);
    std::fs::write(&src, &data).unwrap();
    for t in BOTH {
        let mut s = settings(&sshd, t);
        s.bwlimit_kib = 2048;
        let dst = sshd.home().join(format!("limited-{t}"));
        let start = Instant::now();
        Remote::new(s)
            .unwrap()
            .copy_to(&src, &localhost(), &remote(&dst), &Op::new())
            .await
            .unwrap();
        let took = start.elapsed();
        // 4 MiB at 2 MiB/s: about 2 s (rsync lets its first burst through).
        assert!(took > Duration::from_millis(1400), "{t}: {took:?}");
        assert_eq!(std::fs::read(&dst).unwrap(), data, "{t}");
    }
}

/// A key and a known_hosts file whose paths hold spaces and quotes reach
/// ssh intact, directly and through rsync's `-e` (which rsync splits
/// itself).
#[tokio::test]
async fn settings_paths_with_spaces_and_quotes() {
    let sshd = Sshd::start().unwrap();
    let odd = tempfile::tempdir().unwrap();
    let dir = odd.path().join("it's a dir");
    std::fs::create_dir(&dir).unwrap();
    let key = dir.join("my key");
    let kh = dir.join("known hosts");
    std::fs::copy(sshd.key(), &key).unwrap();
    std::fs::copy(sshd.known_hosts(), &kh).unwrap();
    for t in BOTH {
        let mut s = settings(&sshd, t);
        s.identity_file = Some(key.clone());
        s.known_hosts = Some(kh.clone());
        let target = sshd.home().join(format!("odd-{t}"));
        Remote::new(s)
            .unwrap()
            .create_dir(&localhost(), &remote(&target), &Op::new())
            .await
            .unwrap();
        assert!(target.is_dir(), "{t}");
    }
    let mut s = settings(&sshd, Transport::Ssh);
    s.known_hosts = Some(dir.join("a\"b"));
    assert!(matches!(Remote::new(s), Err(Error::Invalid { .. })));
}

/// Polls until `task` has reported progress; panics if it ends first.
async fn until_bytes_move<T: std::fmt::Debug>(
    seen: &Mutex<Progress>,
    task: &mut tokio::task::JoinHandle<T>,
    what: &str,
) {
    let start = Instant::now();
    while seen.lock().unwrap().done == 0 {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "{what}: no progress"
        );
        assert!(!task.is_finished(), "{what}: ended early: {:?}", task.await);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn names_in(dir: &Path) -> Vec<OsString> {
    let mut v: Vec<OsString> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    v.sort();
    v
}

/// sshd's per-connection processes SIGKILLed in the middle of a 1 GiB copy,
/// each way (an upload once the remote side has its temporary file): the
/// error says the connection to the host was lost and which tool saw it;
/// the destination keeps its old content with nothing beside it (the
/// partial file is gone, under any name), and no process is left.
#[tokio::test]
async fn a_connection_cut_mid_copy_is_typed_and_changes_nothing() {
    let sshd = Sshd::start().unwrap();
    let marker = sshd.known_hosts().into_os_string();
    let host = localhost();
    let local = tempfile::tempdir().unwrap();
    let big = local.path().join("one-gib");
    std::fs::File::create(&big)
        .unwrap()
        .set_len(1 << 30)
        .unwrap();
    let remote_big = sshd.home().join("one-gib");
    std::fs::File::create(&remote_big)
        .unwrap()
        .set_len(1 << 30)
        .unwrap();
    sshd.give(&remote_big).unwrap();
    for t in BOTH {
        // 64 MiB/s, so that the copy is still running when the cut comes.
        let mut s = settings(&sshd, t);
        s.bwlimit_kib = 64 * 1024;
        let fs = Arc::new(Remote::new(s).unwrap());
        for upload in [true, false] {
            let what = format!("{t} {}", if upload { "upload" } else { "download" });
            let (remote_dst, local_dst) = (
                sshd.home().join(format!("kept-{t}")),
                local.path().join(format!("kept-{t}")),
            );
            let dst = if upload { &remote_dst } else { &local_dst };
            std::fs::write(dst, b"old\n").unwrap();
            sshd.give(&remote_dst).ok();
            let (remote_before, local_before) = (names_in(&sshd.home()), names_in(local.path()));

            let seen = Arc::new(Mutex::new(Progress::default()));
            let seen2 = seen.clone();
            let op = Op::new().on_progress(move |p| *seen2.lock().unwrap() = p);
            let mut task = {
                let (fs, host) = (fs.clone(), host.clone());
                let (big, remote_big) = (big.clone(), remote(&remote_big));
                let (remote_dst, local_dst) = (remote(&remote_dst), local_dst.clone());
                tokio::spawn(async move {
                    if upload {
                        fs.copy_to(&big, &host, &remote_dst, &op).await
                    } else {
                        fs.copy_from(&host, &remote_big, &local_dst, &op).await
                    }
                })
            };
            until_bytes_move(&seen, &mut task, &what).await;
            if upload {
                // ssh reads its input before the login is done: wait until
                // the remote side writes its temporary file, so that the
                // cut comes mid-copy rather than mid-handshake.
                let start = Instant::now();
                while names_in(&sshd.home()).len() <= remote_before.len() {
                    assert!(
                        start.elapsed() < Duration::from_secs(20),
                        "{what}: no temporary file"
                    );
                    assert!(!task.is_finished(), "{what}: ended early: {:?}", task.await);
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
            let cut = sshd.cut_connections();
            assert!(!cut.is_empty(), "{what}: no sshd connection to cut");
            let e = task.await.unwrap().unwrap_err();
            let Error::ConnectionLost {
                tool,
                host: h,
                place,
                ..
            } = &e
            else {
                panic!("{what}: not ConnectionLost: {e:?}");
            };
            let expected_tool = match (t, upload) {
                (Transport::Ssh, true) => "ssh",
                (Transport::Ssh, false) => "scp",
                (Transport::Rsync, _) => "rsync",
            };
            assert_eq!(tool, expected_tool, "{what}: {e}");
            assert_eq!(h, "127.0.0.1", "{what}: {e}");
            let remote_file = if upload { &remote_dst } else { &remote_big };
            assert_eq!(place, &format!("127.0.0.1:{}", remote_file.display()));
            let msg = e.to_string();
            assert!(
                msg.starts_with(&format!(
                    "{expected_tool}: the connection to 127.0.0.1 was lost before {place} was done: "
                )),
                "{what}: {msg}"
            );

            let left = wait_until_none_mention(&marker, Duration::from_secs(3));
            assert!(left.is_empty(), "{what}: still running: {left:?}");
            // The remote end notices the closed connection and removes its
            // temporary file; give it a moment.
            let start = Instant::now();
            while names_in(&sshd.home()) != remote_before {
                assert!(
                    start.elapsed() < Duration::from_secs(5),
                    "{what}: the remote side has {:?}, had {remote_before:?}",
                    names_in(&sshd.home())
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            assert_eq!(names_in(local.path()), local_before, "{what}");
            assert_eq!(std::fs::read(dst).unwrap(), b"old\n", "{what}");
            // The server itself is still there: a new connection works.
            let small = local.path().join("small");
            std::fs::write(&small, b"small").unwrap();
            fs.copy_to(&small, &host, &remote(&remote_dst), &Op::new())
                .await
                .unwrap_or_else(|e| panic!("{what}: after the cut: {e}"));
            assert_eq!(std::fs::read(&remote_dst).unwrap(), b"small");
            std::fs::remove_file(&small).unwrap();
            std::fs::remove_file(&remote_dst).unwrap();
            std::fs::remove_file(&local_dst).ok();
        }
    }
}
