//! Start `cradle serve` for a test and talk to it as the operator (through
//! the typed client, `cradle-client`, as the CLI does) or as a guest.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use cradle_client::Target;
pub use cradle_client::{Presented, Request, route};
use serde_json::Value;

pub const BIN: &str = env!("CARGO_BIN_EXE_cradle");

/// A running `cradle serve`, stopped (SIGTERM) when dropped.
pub struct Server {
    child: Option<Child>,
    pub admin_url: String,
    pub metadata: SocketAddr,
    pub data_dir: PathBuf,
    pub log_path: PathBuf,
    pub token: String,
    /// The network namespace it runs in, if any.
    pub netns: Option<String>,
    _tmp: Option<tempfile::TempDir>,
}

/// Options for starting a server.
#[derive(Default)]
pub struct Opts<'a> {
    pub data_dir: Option<&'a Path>,
    pub args: &'a [&'a str],
    pub env: &'a [(&'a str, &'a str)],
    /// The RUST_LOG filter; default "info".
    pub log: Option<&'a str>,
    /// Run inside this network namespace (`ip netns exec`); the CLI of
    /// [`Server::cli`] then runs there too.
    pub netns: Option<&'a str>,
    /// Instead of 127.0.0.1:0.
    pub admin_listen: Option<&'a str>,
    /// Instead of 127.0.0.1:0.
    pub metadata_listen: Option<&'a str>,
    /// A command that runs the server (`nsenter -t PID -m --`, say).
    pub prefix: &'a [&'a str],
}

impl Server {
    pub fn start() -> Server {
        Server::start_with(Opts::default())
    }

    pub fn start_with(opts: Opts<'_>) -> Server {
        let (tmp, data_dir) = match opts.data_dir {
            Some(d) => (None, d.to_path_buf()),
            None => {
                let t = tempfile::tempdir().expect("temp dir");
                let d = t.path().join("data");
                (Some(t), d)
            }
        };
        let log_dir = tmp
            .as_ref()
            .map(|t| t.path().to_path_buf())
            .unwrap_or_else(|| data_dir.parent().unwrap().to_path_buf());
        let log_path = log_dir.join(format!(
            "serve-{}.log",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        let log = std::fs::File::create(&log_path).expect("log file");
        let mut cmd = match (opts.netns, opts.prefix) {
            (Some(ns), _) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, BIN]);
                c
            }
            (None, [program, args @ ..]) => {
                let mut c = Command::new(program);
                c.args(args).arg(BIN);
                c
            }
            (None, []) => Command::new(BIN),
        };
        cmd.arg("serve")
            .arg("--data-dir")
            .arg(&data_dir)
            .args([
                "--admin-listen",
                opts.admin_listen.unwrap_or("127.0.0.1:0"),
                "--metadata-listen",
                opts.metadata_listen.unwrap_or("127.0.0.1:0"),
            ])
            .args(opts.args)
            .env("RUST_LOG", opts.log.unwrap_or("info"))
            // Tests run as root in the machine's own namespace: the firewall
            // stays off unless a test turns it on inside a namespace it made.
            .env("CRADLE_FIREWALL_ENABLED", "false")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log));
        for (k, v) in opts.env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn cradle serve");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let Some(listening) = cradle_client::announce::wait(&rx, Duration::from_secs(30)) else {
            let _ = child.kill();
            panic!(
                "cradle serve did not start; log:\n{}",
                std::fs::read_to_string(&log_path).unwrap_or_default()
            );
        };
        // Keep draining stdout so the server never blocks on a full pipe.
        std::thread::spawn(move || for _ in rx {});
        let token = std::fs::read_to_string(data_dir.join("admin.token"))
            .ok()
            .or_else(|| {
                opts.env
                    .iter()
                    .find(|(k, _)| *k == "CRADLE_ADMIN_TOKEN")
                    .map(|(_, v)| v.to_string())
            })
            .expect("admin token")
            .trim()
            .to_string();
        Server {
            child: Some(child),
            admin_url: listening.admin_url(),
            metadata: listening.metadata,
            data_dir,
            log_path,
            token,
            netns: opts.netns.map(str::to_string),
            _tmp: tmp,
        }
    }

    /// A server whose named tokens are `tokens`, read from a file beside
    /// its data directory.
    pub fn with_tokens(tokens: &[Named<'_>]) -> Server {
        let tmp = tempfile::tempdir().expect("temp dir");
        let file = tmp.path().join("tokens.toml");
        std::fs::write(&file, tokens_toml(tokens)).unwrap();
        let file = file.to_str().unwrap().to_string();
        let mut s = Server::start_with(Opts {
            data_dir: Some(&tmp.path().join("data")),
            env: &[("CRADLE_ADMIN_TOKENS_FILE", &file)],
            ..Default::default()
        });
        s._tmp = Some(tmp);
        s
    }

    /// Stop with SIGTERM and wait for the exit; returns the exit status.
    pub fn stop(&mut self) -> Option<std::process::ExitStatus> {
        let mut child = self.child.take()?;
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        for _ in 0..100 {
            if let Ok(Some(s)) = child.try_wait() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        child.wait().ok()
    }

    /// Kill with SIGKILL (a crash: nothing is cleaned up) and wait.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("server running").id()
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// The admin API through the typed client, with the main token.
    pub fn admin(&self) -> Admin {
        Admin::new(
            Target::new(&self.admin_url, self.token.clone())
                .no_proxy()
                .timeout(Duration::from_secs(30)),
        )
    }

    /// `cradle <args> --url … --token-file …` against this server, run from
    /// beside its data dir; add environment, then run it.
    pub fn cli<I, S>(&self, args: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        let mut cmd = match &self.netns {
            Some(ns) => {
                let inner = cradle_command();
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns])
                    .arg(inner.get_program())
                    .args(inner.get_args());
                for (k, v) in inner.get_envs() {
                    match v {
                        Some(v) => c.env(k, v),
                        None => c.env_remove(k),
                    };
                }
                c
            }
            None => cradle_command(),
        };
        cmd.current_dir(self.data_dir.parent().unwrap())
            .args(args)
            .arg("--url")
            .arg(&self.admin_url)
            .arg("--token-file")
            .arg(self.data_dir.join("admin.token"));
        cmd
    }

    /// A guest whose connections come from `source` (e.g. "127.0.0.2"),
    /// sending `Metadata-Flavor: cradle` on every request as cradle's own
    /// agent does.
    pub fn guest(&self, source: &str) -> Guest {
        Guest {
            base: format!("http://{}", self.metadata),
            http: client(Some(source.parse().unwrap()), true),
        }
    }

    /// A guest at `source` that sends no header of its own: a client of
    /// another cloud, or an SSRF that can only choose the URL.
    pub fn bare_guest(&self, source: &str) -> Guest {
        Guest {
            base: format!("http://{}", self.metadata),
            http: client(Some(source.parse().unwrap()), false),
        }
    }

    pub fn metadata_url(&self) -> String {
        format!("http://{}", self.metadata)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

fn client(source: Option<IpAddr>, flavor: bool) -> reqwest::blocking::Client {
    let mut b = reqwest::blocking::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(10));
    if flavor {
        let mut headers = reqwest::header::HeaderMap::new();
        headers.insert(
            cradle_model::answers::METADATA_FLAVOR_HEADER,
            reqwest::header::HeaderValue::from_static(cradle_model::answers::METADATA_FLAVOR),
        );
        b = b.default_headers(headers);
    }
    if let Some(ip) = source {
        b = b.local_address(ip);
    }
    b.build().unwrap()
}

/// An HTTP answer.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: Vec<u8>,
}

impl Answer {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }
}

fn answer(r: reqwest::blocking::Response) -> Answer {
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    let body = r.bytes().unwrap().to_vec();
    Answer {
        status,
        headers,
        body,
    }
}

/// The operator's side: every call is a route of `cradle_client::route`.
pub struct Admin {
    api: cradle_client::blocking::Client,
}

fn answered(r: Result<cradle_client::Reply, cradle_client::Error>) -> Answer {
    let r = r.unwrap_or_else(|e| panic!("the admin API did not answer: {e}"));
    Answer {
        status: r.status,
        headers: r.headers,
        body: r.body.to_vec(),
    }
}

impl Admin {
    fn new(target: Target) -> Admin {
        Admin {
            api: cradle_client::blocking::Client::new(target).expect("an HTTP client"),
        }
    }

    /// Send `req`; its whole answer, whatever the status.
    pub fn fetch<T>(&self, req: Request<T>) -> Answer {
        answered(self.api.fetch(&req))
    }

    /// Send `req` with `body` (JSON text) instead of its own: for bodies
    /// the typed request cannot say (malformed, unknown fields, wrong types).
    pub fn fetch_raw<T>(&self, req: Request<T>, body: &str) -> Answer {
        answered(self.api.fetch(&req.with_body(body)))
    }

    /// Send `req`; its answer as the route's view.
    #[track_caller]
    pub fn send<T>(&self, req: Request<T>) -> T {
        match self.api.send(req) {
            Ok(v) => v,
            Err(e) => panic!("the admin API refused: {e}"),
        }
    }

    /// The same API as the caller of `token`.
    pub fn with_token(&self, token: &str) -> Admin {
        Admin::new(self.api.target().with_token(token))
    }

    /// The same API, the token presented as `presented` says.
    pub fn presented(&self, presented: Presented) -> Admin {
        Admin::new(self.api.target().presented(presented))
    }

    /// Register an instance from a JSON spec, through the typed request (so
    /// the client's own body, private and secret values included, is what
    /// reaches the server). The view, as JSON.
    #[track_caller]
    pub fn create(&self, spec: &Value) -> Value {
        let spec: cradle_model::api::InstanceSpec = serde_json::from_value(spec.clone())
            .unwrap_or_else(|e| {
                panic!("not an InstanceSpec ({e}); send a raw body with fetch_raw: {spec}")
            });
        let view = self.send(route::create_instance(&spec));
        serde_json::to_value(view).unwrap()
    }
}

pub struct Guest {
    pub base: String,
    pub http: reqwest::blocking::Client,
}

impl Guest {
    pub fn get(&self, path: &str) -> Answer {
        answer(
            self.http
                .get(format!("{}{}", self.base, path))
                .send()
                .unwrap(),
        )
    }

    pub fn request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<Vec<u8>>,
    ) -> Answer {
        let mut req = self
            .http
            .request(method.parse().unwrap(), format!("{}{}", self.base, path));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        if let Some(b) = body {
            req = req.body(b);
        }
        answer(req.send().unwrap())
    }

    /// An IMDSv2 session token.
    /// That each of `methods` on `path` is 405 with `Allow: allow`.
    #[track_caller]
    pub fn refuses_methods(&self, path: &str, methods: &[&str], allow: &str) {
        for method in methods {
            let a = self.request(method, path, &[], None);
            assert_eq!(a.status, 405, "{method}");
            assert_eq!(a.headers.get("allow").unwrap(), allow, "{method}");
        }
    }

    pub fn token(&self, ttl: u32) -> String {
        let a = self.request(
            "PUT",
            "/latest/api/token",
            &[("X-aws-ec2-metadata-token-ttl-seconds", &ttl.to_string())],
            None,
        );
        assert_eq!(a.status, 200, "token: {}", a.text());
        a.text()
    }
}

/// A well-formed OpenSSH ed25519 public key line built from `seed`.
pub fn ssh_key(seed: u8, comment: &str) -> String {
    use base64::Engine;
    let mut blob = Vec::new();
    blob.extend_from_slice(&11u32.to_be_bytes());
    blob.extend_from_slice(b"ssh-ed25519");
    blob.extend_from_slice(&32u32.to_be_bytes());
    blob.extend_from_slice(&[seed; 32]);
    format!(
        "ssh-ed25519 {} {comment}",
        base64::engine::general_purpose::STANDARD.encode(blob)
    )
}

pub fn b64(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// Debian's Python, which sees Debian's cloud-init and botocore packages.
pub const DEBIAN_PYTHON: &str = "/usr/bin/python3";

/// Run a Python script with Debian's interpreter; returns stdout, panics with
/// stderr on failure.
pub fn python(script: &str, args: &[&str]) -> String {
    let out = Command::new(DEBIAN_PYTHON)
        .arg("-c")
        .arg(script)
        .args(args)
        .env_remove("PYTHONPATH")
        .env("NO_PROXY", "*")
        .output()
        .expect("Debian's /usr/bin/python3 must be installed (cargo xtask ci installs it)");
    assert!(
        out.status.success(),
        "python failed ({}):\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The binary, with nothing from the caller's environment that would change
/// where it connects or which token it uses.
pub fn cradle_command() -> Command {
    command_of(Path::new(BIN))
}

/// [`cradle_command`] for another build of the binary (the release one).
pub fn command_of(bin: &Path) -> Command {
    let mut cmd = Command::new(bin);
    cmd.stdin(Stdio::null())
        .env("NO_PROXY", "*")
        .env("no_proxy", "*");
    for (k, _) in std::env::vars() {
        if k.starts_with("CRADLE_") || k == "RUST_LOG" {
            cmd.env_remove(k);
        }
    }
    // A `serve` started from here runs in the machine's own namespace: the
    // firewall stays off there (tests that enforce make a namespace).
    cmd.env("CRADLE_FIREWALL_ENABLED", "false");
    cmd
}

/// A named token of the admin tokens file (`admin.tokens_file`).
pub struct Named<'a> {
    pub name: &'a str,
    pub roles: &'a [&'a str],
    pub projects: &'a [&'a str],
    /// The token itself; the file holds only its SHA-256.
    pub token: &'a str,
}

/// The tokens file's TOML for `tokens`, as an operator writes it.
pub fn tokens_toml(tokens: &[Named<'_>]) -> String {
    let list = |v: &[&str]| serde_json::to_string(v).unwrap();
    tokens
        .iter()
        .map(|t| {
            format!(
                "[[token]]\nname = \"{}\"\nroles = {}\nprojects = {}\nsha256 = \"{}\"\n",
                t.name,
                list(t.roles),
                list(t.projects),
                sha256_hex(t.token)
            )
        })
        .collect()
}

/// SHA-256 of `text` in lower-case hex, from coreutils' `sha256sum` (what an
/// operator runs to fill the admin tokens file).
pub fn sha256_hex(text: &str) -> String {
    use std::io::Write;
    let mut child = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("sha256sum (coreutils)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    first_word(child.wait_with_output().unwrap())
}

/// SHA-256 of the file at `path`, from `sha256sum`.
pub fn sha256_file(path: &Path) -> String {
    first_word(Command::new("sha256sum").arg(path).output().unwrap())
}

fn first_word(out: std::process::Output) -> String {
    assert!(out.status.success(), "sha256sum failed");
    String::from_utf8(out.stdout)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

/// What a CLI run gave: exit status and both outputs.
pub struct Run {
    pub ok: bool,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn from(o: std::process::Output) -> Run {
        Run {
            ok: o.status.success(),
            stdout: String::from_utf8(o.stdout).unwrap(),
            stderr: String::from_utf8(o.stderr).unwrap(),
        }
    }
    #[track_caller]
    pub fn success(self) -> Run {
        assert!(
            self.ok,
            "failed:\nstdout:\n{}\nstderr:\n{}",
            self.stdout, self.stderr
        );
        self
    }
    #[track_caller]
    pub fn failure(self) -> Run {
        assert!(
            !self.ok,
            "succeeded but should not have:\nstdout:\n{}",
            self.stdout
        );
        self
    }
    /// Exit non-zero with every one of `needles` on standard error.
    #[track_caller]
    pub fn fails_with(self, needles: &[&str]) -> Run {
        let run = self.failure();
        for n in needles {
            assert!(
                run.stderr.contains(n),
                "stderr lacks {n:?}:\n{}",
                run.stderr
            );
        }
        run
    }
    #[track_caller]
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.stdout))
    }
}

/// A tenant's security group (by group or instance id) as the native API
/// holds it.
#[track_caller]
pub fn sg_group(s: &Server, tenant: &str, key: &str) -> Value {
    let a = s.admin().fetch(route::security_group(tenant, key));
    assert_eq!(a.status, 200, "{}", a.text());
    a.json()["security_group"].clone()
}

/// The ids of a group's rules, oldest first.
pub fn rule_ids(group: &Value) -> Vec<String> {
    group["rules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_str().unwrap().to_string())
        .collect()
}

impl Run {
    /// Run `cmd` to completion.
    pub fn of(cmd: &mut Command) -> Run {
        Run::from(cmd.output().expect("run cradle"))
    }
}

/// Run `cradle serve <args>` in `cwd` on port 0, expecting it to refuse to
/// start within 30 s; returns its standard error, which starts `error: `.
pub fn serve_refuses<S: AsRef<std::ffi::OsStr>>(
    cwd: &Path,
    args: &[S],
    env: &[(&str, &str)],
) -> String {
    let mut cmd = cradle_command();
    cmd.current_dir(cwd)
        .args([
            "serve",
            "--admin-listen",
            "127.0.0.1:0",
            "--metadata-listen",
            "127.0.0.1:0",
        ])
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("serve {env:?} kept running");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(stderr.starts_with("error: "), "{stderr}");
    stderr
}

/// Every file under `dir`, recursively, with its bytes.
pub fn files_under(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let path = e.path();
            if e.file_type().unwrap().is_dir() {
                todo.push(path);
            } else {
                // A file may vanish between listing and reading (SQLite's
                // -shm and -wal on close); what is gone holds nothing.
                if let Ok(bytes) = std::fs::read(&path) {
                    out.push((path, bytes));
                }
            }
        }
    }
    out
}

pub fn contains(hay: &[u8], needle: &str) -> bool {
    hay.windows(needle.len()).any(|w| w == needle.as_bytes())
}

/// `what` in the CI cache (`$XDG_CACHE_HOME/cradle-ci`, else
/// `~/.cache/cradle-ci`), where `cargo xtask ci` builds the peers and trees
/// tests use; missing, the test says which xtask makes it.
#[track_caller]
pub fn ci_cache(what: &str, made_by: &str) -> PathBuf {
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap()).join(".cache"));
    let p = cache.join("cradle-ci").join(what);
    assert!(
        p.exists(),
        "{} is missing: run `cargo xtask {made_by}` (cargo xtask ci does)",
        p.display()
    );
    p
}

// ---- raw HTTP/1.1, for tests of what the listeners do with connections ----

/// One HTTP/1.1 GET on a keep-alive connection: the status and the body.
pub fn raw_get(conn: &mut TcpStream, path: &str) -> std::io::Result<(u16, Vec<u8>)> {
    conn.write_all(format!("GET {path} HTTP/1.1\r\nHost: m\r\n\r\n").as_bytes())?;
    read_response(conn)
}

pub fn read_response(conn: &mut TcpStream) -> std::io::Result<(u16, Vec<u8>)> {
    read_response_head(conn).map(|(status, _, body)| (status, body))
}

/// One HTTP/1.1 answer: its status, its head (status line and headers, as
/// text) and its body.
pub fn read_response_head(conn: &mut TcpStream) -> std::io::Result<(u16, String, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break p + 4;
        }
        let n = conn.read(&mut chunk)?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let status: u16 = head[9..12].parse().unwrap();
    let len: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().unwrap())
        })
        .unwrap_or(0);
    while buf.len() < head_end + len {
        let n = conn.read(&mut chunk)?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    Ok((status, head, buf[head_end..head_end + len].to_vec()))
}

/// The value of header `name` in a response head from [`read_response_head`].
pub fn header_of<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

pub fn connect_from(source: &str, target: SocketAddr) -> std::io::Result<TcpStream> {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    let src: SocketAddr = (source.parse::<IpAddr>().unwrap(), 0).into();
    sock.bind(&src.into())?;
    sock.connect_timeout(&target.into(), Duration::from_secs(2))?;
    let s: TcpStream = sock.into();
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.set_nodelay(true)?;
    Ok(s)
}

/// The value of one series in a Prometheus exposition, 0 when absent.
pub fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(series)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or(0.0)
}

/// Let this process hold `need` open files (a socket per guest, say):
/// the soft limit raised to the hard one, and checked.
pub fn raise_open_files(need: u64) {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let l = getrlimit(Resource::Nofile);
    let _ = setrlimit(
        Resource::Nofile,
        Rlimit {
            current: l.maximum,
            maximum: l.maximum,
        },
    );
    let now = getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX);
    assert!(
        now >= need,
        "this test holds {need} open files; the open-file limit is {now}"
    );
}
