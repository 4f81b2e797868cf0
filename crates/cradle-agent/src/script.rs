//! Running the OS script, with the contract of the host's trusted runner
//! (`cradle_os::run_trusted`):
//!
//! - no shell: the script is executed directly (its `#!` line names its
//!   interpreter, usually busybox's `/bin/sh`), with no arguments;
//! - exactly the job's environment, nothing inherited;
//! - secret parameters only as one JSON object on an inherited pipe,
//!   descriptor 3, named by `CRADLE_SECRETS_FD=3`; never in argv or the
//!   environment;
//! - stdin `/dev/null` (an import's dump instead, [`crate::stream`]), the
//!   working directory the scripts' own;
//! - its own process group, killed whole once the script has exited, so
//!   nothing it started lives on.
//!
//! There is no deadline here: the host owns the job's and kills the VM.
//! An export's stdout is its dump, uploaded as it comes ([`crate::stream`]);
//! otherwise its stdout and stderr are read on two threads, split into lines
//! ([`crate::lines::Splitter`]) and sent to the host in batches while it
//! runs; the last lines are kept for the status.

use std::collections::BTreeMap;
use std::io::Read;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use cradle_model::Secret;
pub use cradle_os::SECRETS_FD;
use cradle_os::SecretsHandoff;

use crate::job::Secrets;
use crate::lines::{Batcher, Splitter, Tail};
use crate::report::Reporter;
use crate::stream::Data;
use crate::system::say;
use cradle_model::job::StreamDigest;

/// How long output may still arrive once the script has exited (from what
/// it started outside its process group, holding its stdout open).
const DRAIN: Duration = Duration::from_secs(2);
/// How often the script is checked on while it prints nothing.
const TICK: Duration = Duration::from_millis(50);

/// The exit code to report: the script's, or 128 + the signal that
/// killed it.
pub fn exit_code(status: ExitStatus) -> i32 {
    status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(0))
}

/// Why a script that did not succeed failed, e.g. `the create script
/// exited 3`.
pub fn describe(name: &str, status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("the {name} script exited {c}"),
        (None, Some(s)) => format!("the {name} script was killed by signal {s}"),
        (None, None) => format!("the {name} script ended with {status}"),
    }
}

/// How a script ended, and its dump's stream when it had one: what was
/// sent or fed, or why that failed.
pub struct Ran {
    pub status: ExitStatus,
    pub stream: Option<Result<StreamDigest, String>>,
}

/// Run `script` as the module says, sending its output through `reporter`
/// and keeping its last lines in `tail`; `data` says where an export's or
/// import's dump goes.
pub fn run(
    script: &Path,
    env: &BTreeMap<String, String>,
    secrets: &Secrets,
    reporter: &Reporter,
    tail: &mut Tail,
    data: Data<'_>,
) -> Result<Ran, String> {
    let cannot = |e: std::io::Error| format!("cannot run {}: {e}", script.display());
    // An import's dump is opened first: without it nothing runs.
    let download = match data {
        Data::In { client, path } => Some(crate::stream::open_download(client, path)?),
        _ => None,
    };
    let mut cmd = Command::new(script);
    cmd.env_clear()
        .envs(env)
        .current_dir(script.parent().unwrap_or(Path::new("/")))
        .stdin(if download.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let handoff = if secrets.is_empty() {
        None
    } else {
        Some(SecretsHandoff::prepare(&mut cmd).map_err(cannot)?)
    };
    let mut child = cmd.spawn().map_err(cannot)?;
    let group = child.id() as i32;
    let writer = handoff.map(|h| h.send(Secret::new(secrets.expose().to_string())));

    // Lines from both streams, in the order they are read; bounded, so a
    // host slow to take them slows the script rather than filling memory.
    let (tx, rx) = mpsc::sync_channel::<String>(1024);
    let stdout = child.stdout.take().expect("piped");
    let mut streams = vec![Box::new(child.stderr.take().expect("piped")) as Box<dyn Read + Send>];
    let pump = match (data, download) {
        (Data::Out { client, path }, _) => {
            crate::stream::widen_pipe(&stdout);
            Some(crate::stream::upload(client, path, stdout))
        }
        (_, Some(d)) => {
            streams.push(Box::new(stdout));
            let stdin = child.stdin.take().expect("piped");
            crate::stream::widen_pipe(&stdin);
            Some(crate::stream::feed(d, stdin))
        }
        _ => {
            streams.push(Box::new(stdout));
            None
        }
    };
    for stream in streams {
        let tx = tx.clone();
        std::thread::spawn(move || read_lines(stream, &tx));
    }
    drop(tx);

    let mut batcher = Batcher::default();
    let mut status = None;
    let mut exited_at = None;
    loop {
        match rx.recv_timeout(TICK) {
            Ok(line) => {
                tail.push(&line);
                if let Some(batch) = batcher.push(&line, Instant::now()) {
                    reporter.log(&batch);
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            // Both streams ended.
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
        if batcher.due(Instant::now())
            && let Some(batch) = batcher.take()
        {
            reporter.log(&batch);
        }
        if status.is_none()
            && let Some(s) = child.try_wait().map_err(cannot)?
        {
            status = Some(s);
            exited_at = Some(Instant::now());
            kill_group(group);
        }
        if exited_at.is_some_and(|t| t.elapsed() >= DRAIN) {
            say(
                "the script's output is still held open by something it started; not waiting for it",
            );
            break;
        }
    }
    let status = match status {
        Some(s) => s,
        None => child.wait().map_err(cannot)?,
    };
    // Anything the script left running in its group goes too.
    kill_group(group);
    if let Some(batch) = batcher.take() {
        reporter.log(&batch);
    }
    if let Some(w) = writer {
        let _ = w.join();
    }
    // The script and its group are gone, so the dump's pipe has ended.
    let stream = pump.map(|p| {
        p.join()
            .unwrap_or_else(|_| Err("the dump's stream thread panicked".into()))
    });
    Ok(Ran { status, stream })
}

/// Read `stream` to its end, sending its lines.
fn read_lines(mut stream: impl Read, tx: &mpsc::SyncSender<String>) {
    let mut splitter = Splitter::default();
    let mut buf = [0u8; 8192];
    loop {
        let n = match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        for line in splitter.push(&buf[..n]) {
            if tx.send(line).is_err() {
                return;
            }
        }
    }
    if let Some(line) = splitter.finish() {
        let _ = tx.send(line);
    }
}

/// SIGKILL the script's process group.
fn kill_group(group: i32) {
    // SAFETY: kill(2) takes no pointers. The group is the script's own
    // (process_group(0)); before the leader is reaped its id cannot be
    // reused, and after, only by a new group leader with the same pid:
    // ESRCH at worst.
    unsafe { libc::kill(-group, libc::SIGKILL) };
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::Client;
    use std::io::{BufRead, BufReader, Write};
    use std::net::{SocketAddrV4, TcpListener};
    use std::os::unix::fs::PermissionsExt;
    use std::sync::{Arc, Mutex};

    /// A write channel on 127.0.0.1 that keeps every body posted to it.
    fn channel() -> (SocketAddrV4, Arc<Mutex<Vec<String>>>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let std::net::SocketAddr::V4(addr) = listener.local_addr().unwrap() else {
            unreachable!()
        };
        let bodies = Arc::new(Mutex::new(Vec::new()));
        let kept = bodies.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let mut conn = conn.unwrap();
                let kept = kept.clone();
                std::thread::spawn(move || {
                    let mut r = BufReader::new(conn.try_clone().unwrap());
                    loop {
                        let mut len = 0;
                        let mut line = String::new();
                        if r.read_line(&mut line).unwrap_or(0) == 0 {
                            return;
                        }
                        assert_eq!(line.trim_end(), "POST /cradle/latest/write HTTP/1.1");
                        loop {
                            line.clear();
                            r.read_line(&mut line).unwrap();
                            if line == "\r\n" {
                                break;
                            }
                            if let Some(v) =
                                line.to_ascii_lowercase().strip_prefix("content-length:")
                            {
                                len = v.trim().parse().unwrap();
                            }
                        }
                        let mut body = vec![0; len];
                        r.read_exact(&mut body).unwrap();
                        kept.lock().unwrap().push(String::from_utf8(body).unwrap());
                        conn.write_all(b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n")
                            .unwrap();
                    }
                });
            }
        });
        (addr, bodies)
    }

    /// The tests that write a script and run it take turns: a file still
    /// open for writing in a child another test forks meanwhile would make
    /// exec fail with ETXTBSY.
    static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

    fn script(dir: &Path, text: &str) -> std::path::PathBuf {
        let path = dir.join("create");
        std::fs::write(&path, text).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path
    }

    #[test]
    fn a_script_gets_exactly_its_environment_and_secrets_on_fd_3() {
        let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
        let dir = tempfile::tempdir().unwrap();
        let path = script(
            dir.path(),
            "#!/bin/sh\necho \"out $FOO\"\necho err >&2\necho \"secrets=$(cat <&3)\"\n\
             echo \"fd=$CRADLE_SECRETS_FD\"\nenv | sed 's/=.*//' | sort | tr '\\n' ' '; echo\n\
             i=0; while [ $i -lt 500 ]; do echo \"line $i\"; i=$((i+1)); done\nprintf tail\nexit 4\n",
        );
        let (addr, bodies) = channel();
        let client = Client::new(addr);
        let env = BTreeMap::from([
            ("FOO".to_string(), "bar".to_string()),
            ("PATH".to_string(), "/usr/bin:/bin".to_string()),
        ]);
        let secrets =
            crate::job::secrets(br#"{"pw": ["s3\"cret", "secret"], "x": ["y", "public"]}"#)
                .unwrap();
        let mut tail = Tail::default();
        let status = run(
            &path,
            &env,
            &secrets,
            &Reporter::new(&client),
            &mut tail,
            Data::None,
        )
        .unwrap()
        .status;
        assert_eq!(exit_code(status), 4);

        let mut sent = Vec::new();
        for body in bodies.lock().unwrap().iter() {
            assert!(body.len() <= crate::lines::MAX_BODY);
            let v: serde_json::Value = serde_json::from_str(body).unwrap();
            assert_eq!(v["agent"], "log");
            for l in v["lines"].as_array().unwrap() {
                sent.push(l.as_str().unwrap().to_string());
            }
        }
        assert!(sent.contains(&"out bar".to_string()), "{sent:?}");
        assert!(sent.contains(&"err".to_string()), "{sent:?}");
        assert!(
            sent.contains(&r#"secrets={"pw":"s3\"cret"}"#.to_string()),
            "{sent:?}"
        );
        assert!(sent.contains(&"fd=3".to_string()), "{sent:?}");
        // Nothing of this process's environment, only the job's and what
        // the shell sets itself.
        let names = sent.iter().find(|l| l.contains("FOO ")).unwrap();
        for name in names.split_whitespace() {
            assert!(
                [
                    "CRADLE_SECRETS_FD",
                    "FOO",
                    "PATH",
                    "PWD",
                    "SHLVL",
                    "_",
                    "OLDPWD"
                ]
                .contains(&name),
                "{names}"
            );
        }
        assert_eq!(sent.last().unwrap(), "tail");
        assert_eq!(sent.len(), 506);
        let text = tail.text(usize::MAX);
        assert!(
            text.starts_with("line 461\n") && text.ends_with("line 499\ntail"),
            "{text}"
        );
    }

    #[test]
    fn without_secrets_there_is_no_descriptor_3() {
        let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
        let dir = tempfile::tempdir().unwrap();
        let path = script(
            dir.path(),
            "#!/bin/sh\necho \"fd=${CRADLE_SECRETS_FD-unset}\"\n[ -e /proc/self/fd/3 ] && echo open\nkill -9 $$\n",
        );
        let (addr, bodies) = channel();
        let client = Client::new(addr);
        let secrets = crate::job::secrets(br#"{"x": ["y", "public"]}"#).unwrap();
        let mut tail = Tail::default();
        let status = run(
            &path,
            &BTreeMap::new(),
            &secrets,
            &Reporter::new(&client),
            &mut tail,
            Data::None,
        )
        .unwrap()
        .status;
        assert_eq!(exit_code(status), 128 + 9);
        assert_eq!(tail.text(usize::MAX), "fd=unset");
        assert_eq!(bodies.lock().unwrap().len(), 1);
    }

    #[test]
    fn exit_codes_and_reasons() {
        let exited = ExitStatus::from_raw(3 << 8);
        assert_eq!(exit_code(exited), 3);
        assert_eq!(describe("create", exited), "the create script exited 3");
        let killed = ExitStatus::from_raw(libc::SIGKILL);
        assert_eq!(exit_code(killed), 128 + 9);
        assert_eq!(
            describe("create", killed),
            "the create script was killed by signal 9"
        );
        assert_eq!(exit_code(ExitStatus::from_raw(0)), 0);
    }
}
