//! `cradle personalize` on packages made by GNU tar from real trees.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;

use crate::harness::{Opts, Run, Server, contains, cradle_command, files_under, sha256_file};

fn tar_czf(out: &Path, dir: &Path) {
    let st = Command::new("tar")
        .arg("-czf")
        .arg(out)
        .arg("-C")
        .arg(dir)
        .arg(".")
        .status()
        .unwrap();
    assert!(st.success());
}

/// A raw disk image of `mib` MiB holding a whole-disk ext4, made by mke2fs.
fn ext4_image(img: &Path, mib: u64, mke2fs_args: &[&str]) {
    std::fs::File::create(img)
        .unwrap()
        .set_len(mib << 20)
        .unwrap();
    let st = Command::new("mke2fs")
        .args(["-q", "-t", "ext4"])
        .args(mke2fs_args)
        .arg(img)
        .status()
        .unwrap();
    assert!(st.success());
}

/// `cradle personalize apply PKG --to TO`.
fn apply(pkg: &Path, to: &Path) -> Command {
    let mut c = cradle_command();
    c.args(["personalize", "apply"])
        .arg(pkg)
        .arg("--to")
        .arg(to);
    c
}

#[test]
fn check_and_apply_a_package_made_by_tar() {
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    std::fs::create_dir_all(src.join("etc/ssh")).unwrap();
    std::fs::write(src.join("etc/hostname"), b"web1\n").unwrap();
    std::fs::write(src.join("etc/ssh/key"), b"secret-key\n").unwrap();
    std::fs::set_permissions(
        src.join("etc/ssh/key"),
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    std::os::unix::fs::symlink("hostname", src.join("etc/name")).unwrap();
    let pkg = work.path().join("web1.tar.gz");
    tar_czf(&pkg, &src);

    let out = Run::of(cradle_command().args(["personalize", "check"]).arg(&pkg)).success();
    assert!(
        out.stdout.contains("f 0600 0:0 etc/ssh/key (11 bytes)"),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout.contains("l 0777 0:0 etc/name -> hostname"),
        "{}",
        out.stdout
    );

    let root = work.path().join("root");
    std::fs::create_dir_all(root.join("etc")).unwrap();
    std::fs::write(root.join("etc/hostname"), b"old\n").unwrap();
    Run::of(&mut apply(&pkg, &root)).success();
    assert_eq!(std::fs::read(root.join("etc/hostname")).unwrap(), b"web1\n");
    assert_eq!(
        std::fs::read(root.join("etc/ssh/key")).unwrap(),
        b"secret-key\n"
    );
    assert_eq!(
        std::fs::metadata(root.join("etc/ssh/key")).unwrap().mode() & 0o777,
        0o600
    );
    assert_eq!(
        std::fs::read_link(root.join("etc/name")).unwrap(),
        Path::new("hostname")
    );
}

#[test]
fn refused_packages_name_the_entry_and_write_nothing() {
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("a"), b"x").unwrap();
    let st = Command::new("mkfifo")
        .arg(src.join("pipe"))
        .status()
        .unwrap();
    assert!(st.success());
    let pkg = work.path().join("bad.tgz");
    tar_czf(&pkg, &src);
    Run::of(cradle_command().args(["personalize", "check"]).arg(&pkg))
        .fails_with(&["\"./pipe\"", "a FIFO"]);
    let root = work.path().join("root");
    std::fs::create_dir(&root).unwrap();
    Run::of(&mut apply(&pkg, &root)).fails_with(&["a FIFO"]);
    assert_eq!(std::fs::read_dir(&root).unwrap().count(), 0);

    let zip = work.path().join("pkg.zip");
    std::fs::copy(&pkg, &zip).unwrap();
    Run::of(cradle_command().args(["personalize", "check"]).arg(&zip))
        .fails_with(&[".tar.gz or .tgz"]);
}

#[test]
fn apply_writes_into_an_ext4_image() {
    let work = tempfile::tempdir().unwrap();
    let pkg = work.path().join("p.tgz");
    package_of(&work.path().join("src"), &pkg, "hello from cradle\n");
    let img = work.path().join("disk.img");
    ext4_image(&img, 32, &[]);
    Run::of(&mut apply(&pkg, &img)).success();
    let out = Command::new("debugfs")
        .args(["-R", "cat /etc/motd"])
        .arg(&img)
        .output()
        .unwrap();
    assert_eq!(out.stdout, b"hello from cradle\n");
    Run::of(apply(&pkg, &img).args(["--partition", "1"]))
        .fails_with(&["no MBR or GPT partition table"]);
    Run::of(apply(&pkg, work.path()).args(["--partition", "1"]))
        .fails_with(&["--partition is for disk images"]);
}

#[test]
fn check_a_url_with_a_pinned_sha256() {
    let work = tempfile::tempdir().unwrap();
    let pkg = work.path().join("p.tar.gz");
    package_of(&work.path().join("src"), &pkg, "hi\n");
    let sum = sha256_file(&pkg);
    let sum = sum.as_str();
    let url = format!("file://{}", pkg.display());
    let ok =
        Run::of(cradle_command().args(["personalize", "check", &url, "--sha256", sum])).success();
    assert!(ok.stdout.contains("etc/motd"), "{}", ok.stdout);
    let wrong = "0".repeat(64);
    Run::of(cradle_command().args(["personalize", "check", &url, "--sha256", &wrong]))
        .fails_with(&["not the pinned"]);
    Run::of(
        cradle_command()
            .args(["personalize", "check", "--sha256", &wrong])
            .arg(&pkg),
    )
    .fails_with(&["not the pinned"]);
}

/// A package server that wants HTTP basic auth: Python's http.server
/// serving `dir`, the expected `user:password` given in its environment.
struct PackageServer {
    child: std::process::Child,
    base: String,
    log: std::path::PathBuf,
}

impl PackageServer {
    fn start(dir: &Path, user_password: &str, log: std::path::PathBuf) -> PackageServer {
        use std::io::BufRead;
        const SCRIPT: &str = r#"
import base64, functools, http.server, os, sys
want = "Basic " + base64.b64encode(os.environ.pop("AUTH").encode()).decode()
class H(http.server.SimpleHTTPRequestHandler):
    def do_GET(self):
        if self.headers.get("Authorization") != want:
            self.send_response(401)
            self.send_header("WWW-Authenticate", 'Basic realm="packages"')
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        super().do_GET()
srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(H, directory=sys.argv[1]))
print(srv.server_address[1], flush=True)
srv.serve_forever()
"#;
        let mut child = Command::new(crate::harness::DEBIAN_PYTHON)
            .arg("-c")
            .arg(SCRIPT)
            .arg(dir)
            .env("AUTH", user_password)
            .stdout(std::process::Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("python3");
        let mut port = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut port)
            .unwrap();
        PackageServer {
            child,
            base: format!("http://127.0.0.1:{}", port.trim()),
            log,
        }
    }
}

impl Drop for PackageServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn package_of(dir: &Path, out: &Path, motd: &str) {
    std::fs::create_dir_all(dir.join("etc")).unwrap();
    std::fs::write(dir.join("etc/motd"), motd).unwrap();
    // Through a temporary name: the server never serves half a package.
    let tmp = out.with_extension("part");
    tar_czf(&tmp, dir);
    std::fs::rename(&tmp, out).unwrap();
}

/// An instance's package: its URL stored, its basic-auth credentials held
/// as secret parameters and used by the server for each download, the
/// content fetched fresh every time, the pin enforced, and the password in
/// no log, no file and no output.
#[test]
fn an_instance_package_is_fetched_with_its_secret_credentials() {
    let canary = format!("PKGCANARY-{}", std::process::id());
    let url_canary = format!("URLCANARY-{}", std::process::id());
    let work = tempfile::tempdir().unwrap();
    let served = work.path().join("served");
    std::fs::create_dir(&served).unwrap();
    let pkg = served.join("web1.tar.gz");
    package_of(&work.path().join("v1"), &pkg, "first\n");
    let http = PackageServer::start(
        &served,
        &format!("deploy:{canary}"),
        work.path().join("http.log"),
    );
    let data = work.path().join("data");
    let opts = || Opts {
        data_dir: Some(&data),
        log: Some("trace"),
        ..Opts::default()
    };
    let mut s = Server::start_with(opts());
    let mut outputs = Outputs::default();
    let url = format!("{}/web1.tar.gz", http.base);

    // Refused at create: the extension decides the format; credentials in
    // the URL or outside the secret visibility would be stored.
    let add = |extra: &[&str]| {
        let mut c = s.cli([
            "instance",
            "add",
            "web1",
            "--metadata-address",
            "127.0.0.61",
        ]);
        c.args(extra);
        c
    };
    let zip = format!("{}/web1.zip", http.base);
    let with_creds = format!("http://deploy:{url_canary}@127.0.0.1:1/web1.tgz");
    let private = format!("personalization_password={url_canary}");
    let secret = format!("personalization_password={canary}");
    let zeros = "0".repeat(64);
    outputs
        .run(&mut add(&["--personalization-url", &zip]))
        .fails_with(&["personalization_url", ".tar.gz or .tgz"]);
    outputs
        .run(&mut add(&["--personalization-url", &with_creds]))
        .fails_with(&["personalization_url", "must not carry credentials"]);
    outputs
        .run(&mut add(&[
            "--personalization-url",
            &url,
            "--private-param",
            &private,
        ]))
        .fails_with(&["personalization_password", "must be secret, not private"]);
    outputs
        .run(&mut add(&["--personalization-sha256", &zeros]))
        .fails_with(&["personalization_sha256", "no personalization_url"]);
    outputs
        .run(&mut add(&[
            "--personalization-url",
            &url,
            "--secret-param",
            "personalization_user=deploy",
            "--secret-param",
            &secret,
        ]))
        .success();
    let shown = outputs
        .run(&mut s.cli(["instance", "show", "web1"]))
        .success();
    assert!(shown.stdout.contains(&url), "{}", shown.stdout);

    let root = work.path().join("root");
    std::fs::create_dir(&root).unwrap();
    let apply = |o: &mut Outputs, s: &Server| {
        let to = root.to_str().unwrap();
        o.run(&mut s.cli(["personalize", "apply", "--instance", "web1", "--to", to]))
    };
    apply(&mut outputs, &s).success();
    assert_eq!(std::fs::read(root.join("etc/motd")).unwrap(), b"first\n");

    // The package changes upstream: the next install gets the new one.
    package_of(&work.path().join("v2"), &pkg, "second\n");
    apply(&mut outputs, &s).success();
    assert_eq!(std::fs::read(root.join("etc/motd")).unwrap(), b"second\n");

    // Pinned to the second package, which passes; a third is refused and
    // leaves the target as it was.
    let pin = sha256_file(&pkg);
    outputs
        .run(&mut s.cli([
            "instance",
            "modify",
            "web1",
            "--personalization-sha256",
            &pin,
        ]))
        .success();
    apply(&mut outputs, &s).success();
    package_of(&work.path().join("v3"), &pkg, "third\n");
    apply(&mut outputs, &s).fails_with(&["not the pinned", &pin]);
    assert_eq!(std::fs::read(root.join("etc/motd")).unwrap(), b"second\n");
    outputs
        .run(&mut s.cli(["personalize", "check", "--instance", "web1"]))
        .fails_with(&["not the pinned"]);

    // A new URL drops the old pin; a wrong extension is refused on modify.
    let rar = format!("{}/web1.rar", http.base);
    outputs
        .run(&mut s.cli(["instance", "modify", "web1", "--personalization-url", &rar]))
        .fails_with(&["personalization_url", ".tar.gz or .tgz"]);
    let v = outputs
        .run(&mut s.cli([
            "instance",
            "modify",
            "web1",
            "-o",
            "json",
            "--personalization-url",
            &url,
        ]))
        .success()
        .json();
    assert_eq!(v["personalization_url"], url.as_str());
    assert!(v["personalization_sha256"].is_null(), "{v}");
    let listed = outputs
        .run(&mut s.cli(["personalize", "check", "--instance", "web1"]))
        .success();
    assert!(
        listed.stdout.contains("etc/motd (6 bytes)"),
        "{}",
        listed.stdout
    );

    // Without its credentials (a restart forgets secrets) the server is refused.
    s.stop();
    let first_log = s.log();
    assert!(
        first_log.contains("personalization package served"),
        "{first_log}"
    );
    let mut s = Server::start_with(opts());
    let v = outputs
        .run(&mut s.cli(["instance", "show", "web1", "-o", "json"]))
        .success()
        .json();
    assert_eq!(v["personalization_url"], url.as_str());
    apply(&mut outputs, &s).fails_with(&["personalization_fetch_failed", "401"]);
    assert_eq!(std::fs::read(root.join("etc/motd")).unwrap(), b"second\n");

    // No instance package: said so.
    outputs
        .run(&mut s.cli(["instance", "modify", "web1", "--clear-personalization"]))
        .success();
    apply(&mut outputs, &s).fails_with(&["has no personalization_url"]);

    s.stop();
    let http_log = std::fs::read(&http.log).unwrap();
    let log = first_log + &s.log();
    assert!(
        log.contains("personalization_fetch_failed") || log.contains("fetch failed"),
        "{log}"
    );
    for c in [&canary, &url_canary] {
        assert!(!log.contains(c.as_str()), "the server log holds {c}");
        assert!(
            !contains(&http_log, c),
            "the package server's log holds {c}"
        );
        for out in &outputs.0 {
            assert!(!out.contains(c.as_str()), "a CLI output holds {c}: {out}");
        }
        for (path, bytes) in files_under(&data) {
            assert!(!contains(&bytes, c), "{} holds {c}", path.display());
        }
    }
}

/// Every CLI output of a test, kept to search for canaries at the end.
#[derive(Default)]
struct Outputs(Vec<String>);

impl Outputs {
    fn run(&mut self, cmd: &mut Command) -> Run {
        let r = Run::of(cmd);
        self.0.push(format!("{}\n{}", r.stdout, r.stderr));
        r
    }
}

/// Ctrl-C before the write leaves the image byte-identical and no staging
/// files behind; Ctrl-C once debugfs writes lets the write finish, and the
/// filesystem is clean.
#[test]
fn ctrl_c_stops_before_the_write_and_never_during_it() {
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    for i in 0..20_000 {
        let d = src.join(format!("d{}", i % 100));
        if i < 100 {
            std::fs::create_dir_all(&d).unwrap();
        }
        std::fs::write(d.join(format!("f{i}")), i.to_string()).unwrap();
    }
    let pkg = work.path().join("many.tar.gz");
    tar_czf(&pkg, &src);
    let img = work.path().join("disk.img");
    ext4_image(&img, 256, &["-N", "40000"]);
    let tmp = work.path().join("tmp");
    std::fs::create_dir(&tmp).unwrap();
    let before = sha256_file(&img);

    let (ok, stderr) = interrupt_at(&pkg, &img, &tmp, "staging");
    assert!(!ok, "{stderr}");
    assert!(
        stderr.contains("cancelled before anything was written"),
        "{stderr}"
    );
    assert_eq!(sha256_file(&img), before, "the image changed");
    assert_eq!(std::fs::read_dir(&tmp).unwrap().count(), 0, "staging left");

    let (ok, stderr) = interrupt_at(&pkg, &img, &tmp, "writing");
    assert!(ok, "{stderr}");
    assert!(stderr.contains("writing has begun"), "{stderr}");
    assert!(stderr.contains("wrote 20100 entries"), "{stderr}");
    assert_eq!(std::fs::read_dir(&tmp).unwrap().count(), 0, "staging left");
    let fsck = Command::new("e2fsck")
        .arg("-fn")
        .arg(&img)
        .output()
        .unwrap();
    assert!(
        fsck.status.success(),
        "{}",
        String::from_utf8_lossy(&fsck.stdout)
    );
    let out = Command::new("debugfs")
        .args(["-R", "cat /d99/f19999"])
        .arg(&img)
        .output()
        .unwrap();
    assert_eq!(out.stdout, b"19999");
}

/// Run `personalize apply`, send SIGINT to its process group when it
/// announces `phase`, and
/// return how it ended and all it wrote on stderr.
fn interrupt_at(pkg: &Path, img: &Path, tmp: &Path, phase: &str) -> (bool, String) {
    use std::io::{BufRead, Read};
    use std::os::unix::process::CommandExt;
    let mut child = apply(pkg, img)
        .env("TMPDIR", tmp)
        .stderr(std::process::Stdio::piped())
        // A group of its own, signalled whole, as a terminal's Ctrl-C is.
        .process_group(0)
        .spawn()
        .unwrap();
    let mut err = std::io::BufReader::new(child.stderr.take().unwrap());
    let mut seen = String::new();
    loop {
        let mut line = String::new();
        if err.read_line(&mut line).unwrap() == 0 {
            panic!("no {phase:?} phase announced:\n{seen}");
        }
        seen.push_str(&line);
        if line.trim_end() == phase {
            break;
        }
    }
    // SAFETY: kill(2) on our own child's process group.
    assert_eq!(unsafe { libc::kill(-(child.id() as i32), libc::SIGINT) }, 0);
    err.read_to_string(&mut seen).unwrap();
    (child.wait().unwrap().success(), seen)
}
