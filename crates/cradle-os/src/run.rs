//! Running a trusted OS script on the host.
//!
//! - No shell: the script is executed directly with an argument vector.
//! - An unprivileged user: when cradle runs as root, the script runs as the
//!   configured script user (never root; supplementary groups dropped).
//! - A clean environment: only what [`Environment`] holds.
//! - Secret parameters never reach argv or the environment. When there are
//!   any, they are written as one JSON object (`{"name": "value"}`) to a
//!   pipe the script inherits as descriptor 3, named by `CRADLE_SECRETS_FD`,
//!   and the pipe is closed after it.
//! - Its own process group, killed whole at the deadline.
//! - Optionally ([`Streams`]): its output lines handed over as they come,
//!   and messages fed to its standard input, one line each (how a trusted
//!   script talks with the untrusted one in the appliance over the
//!   channel). Otherwise its standard input is empty. An export's or
//!   import's data instead: standard output handed over raw, in chunks, to
//!   a [`DataSink`] (a sink that refuses a chunk, past its cap or with no
//!   reader, ends the script's process group at once); standard input
//!   read from a file (the spooled dump).
//!
//! This is the one module of the crate with `unsafe`: `dup2` in the child
//! between fork and exec, `getpwnam_r`, and `kill` of a process group.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use cradle_model::Secret;

use crate::{Environment, Error};

/// The descriptor the secrets pipe has in the script.
pub const SECRETS_FD: i32 = 3;
/// How much of each output stream is kept (the end of it).
pub const OUTPUT_TAIL: usize = 64 * 1024;

/// A user trusted scripts run as.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct User {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
}

impl User {
    /// Look `name` up in the user database (files, LDAP: whatever NSS has).
    pub fn lookup(name: &str) -> Result<User, Error> {
        let bad = |reason: String| Error::User {
            name: name.to_string(),
            reason,
        };
        let cname = std::ffi::CString::new(name).map_err(|_| bad("holds a NUL byte".into()))?;
        let mut buf = vec![0 as libc::c_char; 16 * 1024];
        // SAFETY: passwd is plain data; getpwnam_r writes it and the
        // strings it points to into buf, both of which outlive the call.
        let mut pw: libc::passwd = unsafe { std::mem::zeroed() };
        let mut result: *mut libc::passwd = std::ptr::null_mut();
        // SAFETY: every pointer is valid for the sizes given.
        let rc = unsafe {
            libc::getpwnam_r(
                cname.as_ptr(),
                &mut pw,
                buf.as_mut_ptr(),
                buf.len(),
                &mut result,
            )
        };
        if rc != 0 {
            return Err(bad(std::io::Error::from_raw_os_error(rc).to_string()));
        }
        if result.is_null() {
            return Err(bad("no such user".into()));
        }
        Ok(User {
            name: name.to_string(),
            uid: pw.pw_uid,
            gid: pw.pw_gid,
        })
    }
}

/// How trusted scripts are run.
#[derive(Clone, Debug)]
pub struct Runner {
    /// The user to become when cradle runs as root. Scripts never run as
    /// root: as root without a user, nothing runs.
    pub user: Option<User>,
    pub timeout: Duration,
}

/// How a script ended, with the tail of what it printed.
#[derive(Debug)]
pub struct Finished {
    pub status: ExitStatus,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    /// Why the [`Streams::stdout_data`] sink stopped the script, if it did.
    pub data_error: Option<String>,
}

impl Finished {
    /// The last non-empty lines of stderr (else stdout), for a message.
    pub fn tail(&self, lines: usize) -> String {
        let text = if self.stderr.iter().any(|b| !b.is_ascii_whitespace()) {
            &self.stderr
        } else {
            &self.stdout
        };
        let text = String::from_utf8_lossy(text);
        let all: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

/// Called with `"stdout"` or `"stderr"` and each line (without its end).
pub type LineSink = Box<dyn Fn(&'static str, &str) + Send + Sync>;

/// The secrets pipe of one script: prepared on its `Command` before the
/// spawn (descriptor [`SECRETS_FD`] in the child, named by
/// `CRADLE_SECRETS_FD`), fed once after it. Shared by the host's trusted
/// runner and the appliance's agent, so the one piece of `pre_exec` code
/// that hands secrets to a script exists once.
pub struct SecretsHandoff {
    reader: std::io::PipeReader,
    writer: std::io::PipeWriter,
}

impl SecretsHandoff {
    /// Give `cmd` the pipe's read end as descriptor 3, and say so in its
    /// environment.
    pub fn prepare(cmd: &mut Command) -> std::io::Result<SecretsHandoff> {
        let (reader, writer) = std::io::pipe()?;
        let fd = reader.as_raw_fd();
        cmd.env("CRADLE_SECRETS_FD", SECRETS_FD.to_string());
        // SAFETY: between fork and exec only dup2 or fcntl runs, both
        // async-signal-safe; dup2 clears close-on-exec on the copy.
        unsafe {
            cmd.pre_exec(move || {
                // dup2 onto itself would leave close-on-exec set.
                let ok = if fd == SECRETS_FD {
                    libc::fcntl(fd, libc::F_SETFD, 0) >= 0
                } else {
                    libc::dup2(fd, SECRETS_FD) >= 0
                };
                if !ok {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        Ok(SecretsHandoff { reader, writer })
    }

    /// After the spawn: close our copy of the read end and write `body` on
    /// a thread (a script that reads late must not block the caller). A
    /// script that never reads gets its pipe closed: EPIPE, not an error.
    pub fn send(self, body: Secret<String>) -> std::thread::JoinHandle<()> {
        drop(self.reader);
        let mut w = self.writer;
        std::thread::spawn(move || {
            let _ = w.write_all(body.expose().as_bytes());
        })
    }
}

/// Whether this process runs as root (scripts then need a script user).
pub fn running_as_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Takes a script's standard output as it comes, raw; an error stops the
/// script.
pub type DataSink = Box<dyn FnMut(&[u8]) -> Result<(), String> + Send>;

/// The size of the chunks a [`DataSink`] is handed.
pub const DATA_CHUNK: usize = 1 << 20;

/// What a running script's output lines go to, and what feeds its input.
#[derive(Default)]
pub struct Streams {
    pub on_line: Option<LineSink>,
    /// Each message becomes one line of the script's standard input, until
    /// the sender is dropped (then the script reads end of file).
    pub stdin: Option<std::sync::mpsc::Receiver<Vec<u8>>>,
    /// Standard input read from this file instead (an import's dump).
    pub stdin_file: Option<std::fs::File>,
    /// Standard output, raw, to this sink instead of as lines (an
    /// export's dump); `on_line` then sees only standard error.
    pub stdout_data: Option<DataSink>,
}

/// Run `script` with `args`, `env` and `secrets`, as [`Runner`] says.
pub fn run_trusted(
    script: &Path,
    args: &[&str],
    env: &Environment,
    secrets: &BTreeMap<String, Secret<String>>,
    runner: &Runner,
) -> Result<Finished, Error> {
    run_trusted_with(script, args, env, secrets, runner, Streams::default())
}

/// [`run_trusted`], with its output lines and its input through `streams`.
pub fn run_trusted_with(
    script: &Path,
    args: &[&str],
    env: &Environment,
    secrets: &BTreeMap<String, Secret<String>>,
    runner: &Runner,
    streams: Streams,
) -> Result<Finished, Error> {
    let what = || script.display().to_string();
    let io = |source: std::io::Error| Error::Io {
        what: format!("cannot run {}", what()),
        source,
    };
    let mut cmd = Command::new(script);
    cmd.args(args)
        .env_clear()
        .envs(env.vars())
        .current_dir(script.parent().unwrap_or(Path::new("/")))
        .stdin(match (&streams.stdin_file, &streams.stdin) {
            (Some(f), _) => Stdio::from(f.try_clone().map_err(io)?),
            (None, Some(_)) => Stdio::piped(),
            (None, None) => Stdio::null(),
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    if running_as_root() {
        let Some(user) = &runner.user else {
            return Err(Error::User {
                name: "root".into(),
                reason: "trusted OS scripts never run as root; configure [os] script_user".into(),
            });
        };
        if user.uid == 0 {
            return Err(Error::User {
                name: user.name.clone(),
                reason: "is root; trusted OS scripts run as an unprivileged user".into(),
            });
        }
        // std drops the supplementary groups when it changes the uid from root.
        cmd.uid(user.uid).gid(user.gid);
    }
    let handoff = if secrets.is_empty() {
        None
    } else {
        Some(SecretsHandoff::prepare(&mut cmd).map_err(io)?)
    };
    let mut child = cmd.spawn().map_err(io)?;
    let writer = handoff.map(|h| h.send(secrets_json(secrets)));
    drop(streams.stdin_file);
    let on_line = streams.on_line.map(std::sync::Arc::from);
    let stopped = std::sync::Arc::new(std::sync::Mutex::new(None::<String>));
    let stdout = child.stdout.take().expect("piped");
    let out = match streams.stdout_data {
        Some(sink) => data_reader(stdout, sink, stopped.clone()),
        None => tail_reader(stdout, "stdout", on_line.clone()),
    };
    let err = tail_reader(child.stderr.take().expect("piped"), "stderr", on_line);
    let data_error = || stopped.lock().unwrap_or_else(|e| e.into_inner()).clone();
    if let (Some(rx), Some(mut input)) = (streams.stdin, child.stdin.take()) {
        std::thread::spawn(move || {
            for mut msg in rx {
                msg.push(b'\n');
                // A script that stopped reading: nothing more to feed.
                if input.write_all(&msg).and_then(|()| input.flush()).is_err() {
                    break;
                }
            }
        });
    }
    let deadline = Instant::now() + runner.timeout;
    let status = loop {
        if let Some(s) = child.try_wait().map_err(io)? {
            break s;
        }
        if data_error().is_some() {
            // SAFETY: as at the deadline below.
            unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
            break child.wait().map_err(io)?;
        }
        if Instant::now() >= deadline {
            // SAFETY: the group is the child's own (process_group(0)) and the
            // child is not yet reaped, so its id cannot have been reused.
            unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
            let _ = child.wait();
            return Err(Error::Timeout {
                script: what(),
                after: runner.timeout,
            });
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    // Anything the script left running in its group goes too.
    // SAFETY: as above; after the leader is reaped the group id could only be
    // reused by a new group leader with the same pid, which needs the pid
    // itself to be reused first: ESRCH at worst.
    unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
    if let Some(w) = writer {
        let _ = w.join();
    }
    let (stdout, stderr) = (
        out.join().unwrap_or_default(),
        err.join().unwrap_or_default(),
    );
    Ok(Finished {
        status,
        stdout,
        stderr,
        data_error: data_error(),
    })
}

/// Read into `buf` until it is full or `r` ends: the bytes read. (A data
/// stream's chunks are filled so, here and in the appliance's agent.)
pub fn read_full(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Read a script's standard output to its end on a thread, handing it to
/// `sink` in chunks of up to [`DATA_CHUNK`]; a refused chunk is noted in
/// `stopped` and ends the reading (the script is then killed). Keeps
/// nothing.
fn data_reader(
    mut r: impl Read + Send + 'static,
    mut sink: DataSink,
    stopped: std::sync::Arc<std::sync::Mutex<Option<String>>>,
) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut buf = vec![0u8; DATA_CHUNK];
        loop {
            // Fill the chunk as far as the pipe gives, so the sink sees few
            // large chunks rather than many of a pipe's 64 KiB.
            let n = match read_full(&mut r, &mut buf) {
                Ok(n) => n,
                Err(e) => {
                    *stopped.lock().unwrap_or_else(|p| p.into_inner()) =
                        Some(format!("reading its standard output: {e}"));
                    return Vec::new();
                }
            };
            if n == 0 {
                return Vec::new();
            }
            if let Err(e) = sink(&buf[..n]) {
                *stopped.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
                return Vec::new();
            }
        }
    })
}

/// The secrets as one JSON object, itself a secret.
fn secrets_json(secrets: &BTreeMap<String, Secret<String>>) -> Secret<String> {
    let exposed: BTreeMap<&str, &str> = secrets
        .iter()
        .map(|(k, v)| (k.as_str(), v.expose().as_str()))
        .collect();
    Secret::new(serde_json::to_string(&exposed).expect("strings serialize"))
}

type OnLine = std::sync::Arc<dyn Fn(&'static str, &str) + Send + Sync>;

/// Read a stream to its end on a thread, keeping its last [`OUTPUT_TAIL`]
/// bytes and handing each line to `on_line`.
fn tail_reader(
    r: impl Read + Send + 'static,
    stream: &'static str,
    on_line: Option<OnLine>,
) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        use std::io::BufRead;
        let mut r = std::io::BufReader::new(r);
        let mut kept = Vec::new();
        let mut line = Vec::new();
        // A line is cut at OUTPUT_TAIL bytes: a script that never ends one
        // cannot make this grow without bound.
        while let Ok(n) = (&mut r)
            .take(OUTPUT_TAIL as u64)
            .read_until(b'\n', &mut line)
        {
            if n == 0 {
                break;
            }
            if let Some(f) = &on_line {
                let text = String::from_utf8_lossy(&line);
                f(stream, text.trim_end_matches(['\n', '\r']));
            }
            kept.extend_from_slice(&line);
            line.clear();
            if kept.len() > 2 * OUTPUT_TAIL {
                kept.drain(..kept.len() - OUTPUT_TAIL);
            }
        }
        if kept.len() > OUTPUT_TAIL {
            kept.drain(..kept.len() - OUTPUT_TAIL);
        }
        kept
    })
}
