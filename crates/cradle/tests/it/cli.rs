//! The command line: `cradle instance …` against a running server, `--help`,
//! and `cradle serve` started the way a first-time user starts it.

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use cradle_client::announce;
use serde_json::{Value, json};

use crate::harness::*;

/// The binary, with nothing from the caller's environment that would change
/// where it connects or which token it uses.
fn cradle(cwd: &Path) -> Command {
    let mut cmd = cradle_command();
    cmd.current_dir(cwd);
    cmd
}

/// `cradle instance <args> --url … --token-file …` against `s`.
fn instance(s: &Server, args: &[&str]) -> Run {
    Run::of(&mut s.cli(std::iter::once("instance").chain(args.iter().copied())))
}

#[test]
fn instance_verbs_drive_the_admin_api() {
    let s = Server::start();
    let dir = s.data_dir.parent().unwrap().to_path_buf();
    let file = |name: &str, body: &[u8]| {
        let p = dir.join(name);
        std::fs::write(&p, body).unwrap();
        p.display().to_string()
    };
    let private = file("q.txt", b"private-q-value\n");
    let secret = file("s.txt", b"secret-s-value\n");
    let user_data = b"#cloud-config\nhostname: web1\n";
    let ud = file("user-data.yaml", user_data);
    let key = ssh_key(3, "alice@example");
    let guest = s.guest("127.0.0.5");

    // add
    let add = instance(
        &s,
        &[
            "add",
            "web1",
            "--metadata-address",
            "127.0.0.5",
            "--hostname",
            "web1",
            "--meta",
            "role=web",
            "--key",
            &format!("alice={key}"),
            "--param",
            "p=1",
            "--private-param",
            &format!("q=@{private}"),
            "--secret-param",
            &format!("s=@{secret}"),
            "--user-data",
            &ud,
            "-o",
            "json",
        ],
    )
    .success();
    assert!(!add.stdout.contains("private-q-value") && !add.stdout.contains("secret-s-value"));
    let v = add.json();
    let id = v["id"].as_str().unwrap().to_string();
    crate::admin::assert_uuid_v4(&id);
    assert_eq!(v["name"], "web1");
    assert_eq!(v["hostname"], "web1");
    assert_eq!(v["metadata_address"], "127.0.0.5");
    assert_eq!(v["metadata"], json!({"role": "web"}));
    assert_eq!(v["public_keys"], json!({"alice": key}));
    assert_eq!(v["user_data"], b64(user_data));
    assert_eq!(
        v["os_params"],
        json!({"public": {"p": "1"}, "private": ["q"], "secret": ["s"]})
    );
    // @FILE values arrive without the editor's trailing newline.
    let params = guest.get("/cradle/latest/os/parameters.json");
    assert_eq!(
        params.json(),
        json!({
            "p": ["1", "public"],
            "q": ["private-q-value", "private"],
            "s": ["secret-s-value", "secret"]
        })
    );
    assert_eq!(guest.get("/latest/user-data").body, user_data);

    // list, as a table and as JSON
    let list = instance(&s, &["list"]).success();
    let mut lines = list.stdout.lines();
    let header: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    assert_eq!(
        header,
        [
            "ID", "NAME", "STATE", "METADATA", "ADDRESS", "HOSTNAME", "PROJECT"
        ]
    );
    let row: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    assert_eq!(
        row,
        [
            id.as_str(),
            "web1",
            "registered",
            "127.0.0.5",
            "web1",
            "default"
        ]
    );
    assert_eq!(lines.next(), None);
    let list = instance(&s, &["list", "-o", "json"]).success().json();
    assert_eq!(list.as_array().unwrap().len(), 1);
    assert_eq!(list[0]["id"], id.as_str());

    // show, by name and by id
    let show = instance(&s, &["show", "web1"]).success();
    let field = |out: &str, name: &str| -> String {
        out.lines()
            .find_map(|l| {
                l.strip_prefix(name)
                    .filter(|rest| rest.starts_with("  "))
                    .map(|rest| rest.trim().to_string())
            })
            .unwrap_or_else(|| panic!("no {name:?} line in:\n{out}"))
    };
    assert_eq!(field(&show.stdout, "id"), id);
    assert_eq!(field(&show.stdout, "name"), "web1");
    assert_eq!(field(&show.stdout, "metadata address"), "127.0.0.5");
    assert_eq!(field(&show.stdout, "metadata"), "role=web");
    assert_eq!(field(&show.stdout, "public params"), "p=1");
    assert_eq!(field(&show.stdout, "private params"), "q");
    assert_eq!(field(&show.stdout, "secret params"), "s");
    assert_eq!(
        field(&show.stdout, "user data"),
        format!("{} bytes", user_data.len())
    );
    assert!(!show.stdout.contains("private-q-value") && !show.stdout.contains("secret-s-value"));
    let by_id = instance(&s, &["show", &id, "-o", "json"]).success().json();
    assert_eq!(by_id, v);

    // modify
    let modified = instance(
        &s,
        &[
            "modify",
            "web1",
            "--meta",
            "tier=2",
            "--unset-meta",
            "role",
            "-o",
            "json",
        ],
    )
    .success()
    .json();
    assert_eq!(modified["metadata"], json!({"tier": "2"}));
    assert_eq!(modified["os_params"], v["os_params"]);
    let md = guest.get("/openstack/latest/meta_data.json");
    assert_eq!(md.json()["meta"], json!({"tier": "2"}));
    // Parameters change through modify too: values (not placeholders) reach
    // the guest, a parameter moves visibility, one is removed.
    let secret2 = file("s2.txt", b"secret-s2-value");
    let modified = instance(
        &s,
        &[
            "modify",
            "web1",
            "--secret-param",
            &format!("s2=@{secret2}"),
            "--secret-param",
            "q=q-is-secret-now",
            "--private-param",
            "r=private-r-value",
            "--unset-param",
            "p",
            "-o",
            "json",
        ],
    )
    .success()
    .json();
    assert_eq!(
        modified["os_params"],
        json!({"public": {}, "private": ["r"], "secret": ["q", "s", "s2"]})
    );
    let params = guest.get("/cradle/latest/os/parameters.json");
    assert_eq!(
        params.json(),
        json!({
            "q": ["q-is-secret-now", "secret"],
            "r": ["private-r-value", "private"],
            "s": ["secret-s-value", "secret"],
            "s2": ["secret-s2-value", "secret"]
        })
    );

    // send → the guest reads it, once
    let sent = instance(&s, &["send", "web1", "hello"]).success();
    assert!(
        sent.stdout.starts_with("queued message "),
        "{}",
        sent.stdout
    );
    let read = guest.get("/cradle/latest/read");
    assert_eq!(read.status, 200);
    assert_eq!(read.text(), "hello");
    assert_eq!(guest.get("/cradle/latest/read").status, 204);

    // the guest writes → receive prints it, once
    let w = guest.request(
        "POST",
        "/cradle/latest/write",
        &[],
        Some(b"from the guest".to_vec()),
    );
    assert_eq!(w.status, 201, "{}", w.text());
    let got = instance(&s, &["receive", "web1"]).success();
    assert_eq!(got.stdout, "from the guest\n");
    let got = instance(&s, &["receive", "web1"]).success();
    assert_eq!(got.stdout, "");

    // remove
    let removed = instance(&s, &["remove", "web1"]).success();
    assert_eq!(removed.stdout.trim(), "removed web1");
    let gone = instance(&s, &["show", "web1"]).failure();
    assert!(gone.stderr.contains("404"), "{}", gone.stderr);
    assert_eq!(guest.get("/openstack/latest/meta_data.json").status, 404);
    let list = instance(&s, &["list", "-o", "json"]).success().json();
    assert_eq!(list, json!([]));
}

#[test]
fn instance_errors_are_reported_on_stderr() {
    let s = Server::start();
    let nope = instance(&s, &["show", "nope"]).failure();
    assert!(nope.stdout.is_empty(), "{}", nope.stdout);
    assert!(
        nope.stderr.contains("nope") && nope.stderr.contains("404"),
        "{}",
        nope.stderr
    );

    // A refusal from the server comes back with its reason.
    let bad = instance(&s, &["add", "x", "--metadata-address", "999.1.1.1"]).failure();
    assert!(
        bad.stderr.contains("metadata_address") && bad.stderr.contains("422"),
        "{}",
        bad.stderr
    );
    let missing_file = instance(
        &s,
        &[
            "add",
            "x",
            "--metadata-address",
            "127.0.0.6",
            "--secret-param",
            "s=@/no/such/file",
        ],
    )
    .failure();
    assert!(
        missing_file.stderr.contains("/no/such/file"),
        "{}",
        missing_file.stderr
    );
    // None of that registered anything.
    let list = instance(&s, &["list", "-o", "json"]).success().json();
    assert_eq!(list, json!([]));

    // Without an address, each instance gets the next free link-local one,
    // and a guest is known by it.
    let a = instance(&s, &["add", "ll-a", "-o", "json"])
        .success()
        .json();
    let b = instance(&s, &["add", "ll-b", "-o", "json"])
        .success()
        .json();
    assert_eq!(a["metadata_address"], "169.254.1.1", "{a}");
    assert_eq!(b["metadata_address"], "169.254.1.2", "{b}");
    instance(&s, &["remove", "ll-a"]).success();
    let c = instance(&s, &["add", "ll-c", "-o", "json"])
        .success()
        .json();
    assert_eq!(
        c["metadata_address"], "169.254.1.1",
        "freed, then reused: {c}"
    );
    let taken = instance(&s, &["add", "ll-d", "--metadata-address", "169.254.1.2"]).failure();
    assert!(taken.stderr.contains("409"), "{}", taken.stderr);

    // The wrong token, and an unreachable server, are named as such.
    let wrong = cradle(s.data_dir.parent().unwrap())
        .args([
            "instance",
            "list",
            "--url",
            &s.admin_url,
            "--token",
            "wrong",
        ])
        .output()
        .unwrap();
    let wrong = Run::from(wrong).failure();
    assert!(wrong.stderr.contains("401"), "{}", wrong.stderr);
    // Port 1 on loopback: nothing listens there.
    let unreachable = cradle(s.data_dir.parent().unwrap())
        .args([
            "instance",
            "list",
            "--url",
            "http://127.0.0.1:1",
            "--token",
            "t",
        ])
        .output()
        .unwrap();
    let unreachable = Run::from(unreachable).failure();
    assert!(
        unreachable
            .stderr
            .contains("cannot reach the admin API at http://127.0.0.1:1"),
        "{}",
        unreachable.stderr
    );
}

#[test]
fn the_token_is_read_from_the_data_dir() {
    let s = Server::start();
    s.admin()
        .create(&json!({"name": "dd", "metadata_address": "127.0.0.7"}));
    // The harness keeps the data in <tmp>/data, so from <tmp> the default
    // (./cradle-data) finds nothing …
    let cwd = s.data_dir.parent().unwrap();
    let run = |extra: &[&str]| {
        Run::from(
            cradle(cwd)
                .args(["instance", "list", "-o", "json", "--url", &s.admin_url])
                .args(extra)
                .output()
                .unwrap(),
        )
    };
    let default = run(&[]).failure();
    assert!(
        default.stderr.contains("no admin token")
            && default.stderr.contains("cradle-data/admin.token"),
        "{}",
        default.stderr
    );
    // … and --data-dir (or its variable) points at the token.
    let explicit = run(&["--data-dir", "data"]).success().json();
    assert_eq!(explicit[0]["name"], "dd");
    let by_env = Run::from(
        cradle(cwd)
            .args([
                "instance",
                "show",
                "dd",
                "-o",
                "json",
                "--url",
                &s.admin_url,
            ])
            .env("CRADLE_SERVER_DATA_DIR", &s.data_dir)
            .output()
            .unwrap(),
    )
    .success()
    .json();
    assert_eq!(by_env["name"], "dd");
}

#[test]
fn whoami_shows_the_tokens_roles_and_projects() {
    let s = Server::with_tokens(&[
        Named {
            name: "acme-ops",
            roles: &["provisioner"],
            projects: &["acme", "beta"],
            token: "acme-token",
        },
        Named {
            name: "idle",
            roles: &[],
            projects: &[],
            token: "idle-token",
        },
    ]);
    let main = Run::of(&mut s.cli(["whoami"])).success();
    assert_eq!(
        main.stdout,
        "name      admin\nroles     admin\nprojects  (all)\n"
    );
    let acme = Run::of(&mut s.cli(["whoami", "-o", "json", "--token", "acme-token"])).success();
    assert_eq!(
        acme.json(),
        json!({"name": "acme-ops", "roles": ["provisioner"], "all_projects": false,
               "projects": ["acme", "beta"]})
    );
    // A token of no project may ask who it is, and nothing else.
    let idle = Run::of(&mut s.cli(["whoami", "--token", "idle-token"])).success();
    assert!(
        idle.stdout.ends_with("projects  (none)\n"),
        "{}",
        idle.stdout
    );
    Run::of(&mut s.cli(["instance", "list", "--token", "idle-token"]))
        .fails_with(&["acts for no project"]);
    Run::of(&mut s.cli(["whoami", "--token", "wrong"])).fails_with(&["401"]);
}

#[test]
fn help_names_the_verbs_and_key_flags() {
    let cwd = std::env::temp_dir();
    let help = |args: &[&str]| Run::from(cradle(&cwd).args(args).output().unwrap()).success();
    let top = help(&["--help"]);
    for word in ["serve", "instance"] {
        assert!(top.stdout.contains(word), "{word}: {}", top.stdout);
    }
    let serve = help(&["serve", "--help"]);
    for flag in [
        "--config",
        "--data-dir",
        "--admin-listen",
        "--metadata-listen",
        "--log-format",
        "./cradle-data",
    ] {
        assert!(serve.stdout.contains(flag), "{flag}: {}", serve.stdout);
    }
    let add = help(&["instance", "add", "--help"]);
    for flag in [
        "--metadata-address",
        "--hostname",
        "--meta",
        "--key",
        "--user-data",
        "--param",
        "--private-param",
        "--secret-param",
        "--url",
        "--token-file",
        "@FILE",
    ] {
        assert!(add.stdout.contains(flag), "{flag}: {}", add.stdout);
    }
    let instance = help(&["instance", "--help"]);
    for verb in ["add", "list", "show", "modify", "remove", "send", "receive"] {
        assert!(
            instance.stdout.contains(verb),
            "{verb}: {}",
            instance.stdout
        );
    }
    // Without a verb, `instance` explains itself and fails.
    let bare = Run::from(cradle(&cwd).arg("instance").output().unwrap()).failure();
    assert!(bare.stderr.contains("Usage"), "{}", bare.stderr);
}

/// A `cradle serve` started with only the two listen flags.
struct Bare {
    child: Child,
    admin_url: String,
    stderr: PathBuf,
}

impl Drop for Bare {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn_bare(cwd: &Path) -> Bare {
    let stderr = cwd.join("serve.log");
    let mut child = cradle(cwd)
        .args([
            "serve",
            "--admin-listen",
            "127.0.0.1:0",
            "--metadata-listen",
            "127.0.0.1:0",
        ])
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&stderr).unwrap())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut bare = Bare {
        child,
        admin_url: String::new(),
        stderr,
    };
    let Some(listening) = announce::wait(&rx, Duration::from_secs(30)) else {
        panic!(
            "serve did not start: {}",
            std::fs::read_to_string(&bare.stderr).unwrap_or_default()
        );
    };
    bare.admin_url = listening.admin_url();
    std::thread::spawn(move || for _ in rx {});
    bare
}

#[test]
fn serve_with_no_config_makes_a_private_data_dir_in_the_current_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let bare = spawn_bare(tmp.path());
    let data = tmp.path().join("cradle-data");
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&data), 0o700, "data dir mode");
    assert!(data.join("cradle.db").is_file());
    assert_eq!(mode(&data.join("admin.token")), 0o600, "token mode");
    let token = std::fs::read_to_string(data.join("admin.token")).unwrap();
    assert_eq!(token.trim().len(), 64, "{token:?}");
    assert!(token.trim().bytes().all(|b| b.is_ascii_hexdigit()));
    assert!(
        !std::fs::read_to_string(&bare.stderr)
            .unwrap()
            .contains(token.trim()),
        "the token is not logged"
    );

    // The CLI, run from the same directory, finds the token by default.
    let add = Run::from(
        cradle(tmp.path())
            .args([
                "instance",
                "add",
                "bare",
                "--metadata-address",
                "127.0.0.8",
                "--url",
                &bare.admin_url,
            ])
            .output()
            .unwrap(),
    )
    .success();
    assert!(add.stdout.contains("bare"), "{}", add.stdout);
}

#[test]
fn serve_refuses_bad_configuration_and_names_it() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("cradle.toml");
    std::fs::write(&cfg, "[metadata]\nhop_limt = 3\n").unwrap();
    let e = serve_refuses(tmp.path(), &["--config", cfg.to_str().unwrap()], &[]);
    assert!(e.contains("hop_limt") && e.contains("cradle.toml"), "{e}");

    std::fs::write(&cfg, "[metadata]\nhop_limit = 1\n[bogus]\nx = 1\n").unwrap();
    let e = serve_refuses(tmp.path(), &["--config", cfg.to_str().unwrap()], &[]);
    assert!(e.contains("bogus"), "{e}");

    let e = serve_refuses::<&str>(tmp.path(), &[], &[("CRADLE_METADATA_HOP_LIMIT", "abc")]);
    assert!(e.contains("CRADLE_METADATA_HOP_LIMIT"), "{e}");
    // A vfat size no drive could have is refused at start, not per request.
    let e = serve_refuses::<&str>(tmp.path(), &[], &[("CRADLE_DRIVE_VFAT_BYTES", "1000")]);
    assert!(e.contains("drive.vfat_bytes") && e.contains("1000"), "{e}");

    let e = serve_refuses(tmp.path(), &["--config", "/no/such/cradle.toml"], &[]);
    assert!(e.contains("/no/such/cradle.toml"), "{e}");

    // None of these got as far as creating the data directory.
    assert!(!tmp.path().join("cradle-data").exists());
}

#[test]
fn json_logs_record_each_metadata_request_with_instance_path_status_and_latency() {
    let mut s = Server::start_with(Opts {
        args: &["--log-format", "json"],
        ..Default::default()
    });
    let created = s
        .admin()
        .create(&json!({"name": "logged", "metadata_address": "127.0.0.2"}));
    let g = s.guest("127.0.0.2");
    assert_eq!(g.get("/latest/meta-data/hostname").status, 200);
    assert_eq!(g.get("/openstack/latest/nope").status, 404);
    s.stop();
    let log = s.log();
    let lines: Vec<Value> = log
        .lines()
        .map(|l| {
            serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON log line ({e}): {l}"))
        })
        .collect();
    let requests: Vec<&Value> = lines
        .iter()
        .filter(|l| l["fields"]["message"] == "metadata request")
        .collect();
    assert_eq!(requests.len(), 2, "{log}");
    for (r, (path, status)) in requests.iter().zip([
        ("/latest/meta-data/hostname", 200),
        ("/openstack/latest/nope", 404),
    ]) {
        assert_eq!(r["fields"]["instance"], created["id"]);
        assert_eq!(r["fields"]["path"], path);
        assert_eq!(r["fields"]["status"], status);
        assert!(r["fields"]["latency_us"].is_u64(), "{r}");
        assert_eq!(r["level"], "INFO");
    }
}
