//! Running one tool: argument vector, `LC_ALL=C`, its own process group,
//! a deadline, cancellation, and the whole group killed when the operation
//! is abandoned.
//!
//! scp and rsync each start an ssh of their own; killing only the direct
//! child would leave that ssh (and the transfer) running. Each tool is
//! therefore the leader of a new process group, and cancel, timeout and drop
//! send SIGKILL to the group. The group id cannot be reused while the leader
//! is unreaped, so the group is only signalled before the leader is waited
//! for.

use std::ffi::OsString;
use std::path::Path;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::process::{Child, Command};

use crate::{Error, Op};

/// How often copies poll for progress.
const TICK: Duration = Duration::from_millis(200);
/// Most of stdout and stderr kept (the end is what explains a failure).
const KEEP: usize = 256 * 1024;

pub(crate) struct Output {
    pub status: ExitStatus,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

/// A tool as one process group, killed as a whole unless it was reaped.
struct Group {
    child: Child,
    pid: i32,
    reaped: bool,
}

impl Group {
    fn kill(&self) {
        if !self.reaped {
            // SAFETY: kill(2) with a negative pid signals the group whose
            // leader we spawned and have not reaped; no memory is involved.
            unsafe {
                libc::kill(-self.pid, libc::SIGKILL);
            }
        }
    }

    async fn kill_and_reap(&mut self) {
        self.kill();
        let _ = self.child.wait().await;
        self.reaped = true;
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        // The future was dropped mid-operation: kill the group now; tokio's
        // kill_on_drop reaps the leader in the background.
        self.kill();
    }
}

/// Run `program args`, feeding stdout to `on_stdout` as it arrives and
/// calling `tick(pid)` every 200 ms (copies use it to poll progress).
/// A non-zero exit is returned as `Ok` for the caller to classify; timeout,
/// cancellation and a failure to start are errors.
/// One run of a tool: which, with what arguments, described as `what` in
/// errors, with a deadline.
pub(crate) struct Job<'a> {
    pub tool: &'a str,
    pub program: &'a Path,
    pub args: Vec<OsString>,
    pub what: &'a str,
    pub timeout: Duration,
    pub stdin: Input,
}

/// What a tool reads on its standard input.
pub(crate) enum Input {
    Null,
    /// The file itself: the tool reads it directly.
    File(std::fs::File),
    /// The file fed through a pipe at most this many bytes a second; the
    /// count of bytes fed so far goes to the `AtomicU64`.
    Paced(
        std::fs::File,
        u64,
        std::sync::Arc<std::sync::atomic::AtomicU64>,
    ),
}

/// Copy `file` into `to` at no more than `rate` bytes a second, counting
/// into `fed`; `to` is closed at the end, which the tool reads as EOF.
async fn feed(
    file: std::fs::File,
    mut to: tokio::process::ChildStdin,
    rate: u64,
    fed: std::sync::Arc<std::sync::atomic::AtomicU64>,
) {
    use tokio::io::AsyncWriteExt;
    let mut file = tokio::fs::File::from_std(file);
    let mut buf = vec![0u8; 64 * 1024];
    let start = tokio::time::Instant::now();
    let mut sent = 0u64;
    loop {
        let n = match file.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
        sent += n as u64;
        fed.store(sent, std::sync::atomic::Ordering::Relaxed);
        let due = start + Duration::from_secs_f64(sent as f64 / rate.max(1) as f64);
        tokio::time::sleep_until(due).await;
    }
}

pub(crate) async fn run(
    job: Job<'_>,
    op: &Op,
    mut on_stdout: impl FnMut(&[u8]),
    mut tick: impl FnMut(u32),
) -> Result<Output, Error> {
    let Job {
        tool,
        program,
        args,
        what,
        timeout,
        stdin,
    } = job;
    let (stdin, paced) = match stdin {
        Input::Null => (Stdio::null(), None),
        Input::File(f) => (Stdio::from(f), None),
        Input::Paced(f, rate, fed) => (Stdio::piped(), Some((f, rate, fed))),
    };
    tracing::debug!(tool, what, "running");
    let mut cmd = Command::new(program);
    cmd.args(&args)
        .env("LC_ALL", "C")
        .stdin(stdin)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let child = cmd.spawn().map_err(|source| Error::Spawn {
        tool: format!("{tool} ({})", program.display()),
        source,
    })?;
    let pid = child.id().expect("a child just spawned has a pid");
    let mut g = Group {
        child,
        pid: pid as i32,
        reaped: false,
    };
    let child_stdin = g.child.stdin.take();
    let mut feeder = std::pin::pin!(async move {
        match (paced, child_stdin) {
            (Some((f, rate, fed)), Some(to)) => feed(f, to, rate, fed).await,
            _ => std::future::pending().await,
        }
    });
    let mut feeding = true;
    let mut out = g.child.stdout.take().expect("piped");
    let mut err = g.child.stderr.take().expect("piped");
    let (mut out_open, mut err_open) = (true, true);
    let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
    let (mut obuf, mut ebuf) = (vec![0u8; 16 * 1024], vec![0u8; 4096]);
    let deadline = tokio::time::Instant::now() + timeout;
    let mut ticker = tokio::time::interval(TICK);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            _ = op.cancel.cancelled() => {
                g.kill_and_reap().await;
                return Err(Error::Cancelled { op: what.to_string() });
            }
            _ = tokio::time::sleep_until(deadline) => {
                g.kill_and_reap().await;
                return Err(Error::Timeout { op: what.to_string(), after: timeout });
            }
            r = out.read(&mut obuf), if out_open => match r {
                Ok(0) | Err(_) => out_open = false,
                Ok(n) => {
                    on_stdout(&obuf[..n]);
                    keep(&mut stdout, &obuf[..n]);
                }
            },
            r = err.read(&mut ebuf), if err_open => match r {
                Ok(0) | Err(_) => err_open = false,
                Ok(n) => keep(&mut stderr, &ebuf[..n]),
            },
            _ = &mut feeder, if feeding => feeding = false,
            _ = ticker.tick() => tick(pid),
            status = g.child.wait(), if !out_open && !err_open => {
                g.reaped = true;
                let status = status.map_err(|source| Error::Spawn { tool: tool.to_string(), source })?;
                tracing::debug!(tool, what, %status, "finished");
                return Ok(Output { status, stdout, stderr });
            }
        }
    }
}

/// Append, keeping only the last `KEEP` bytes.
fn keep(buf: &mut Vec<u8>, more: &[u8]) {
    buf.extend_from_slice(more);
    if buf.len() > KEEP {
        buf.drain(..buf.len() - KEEP);
    }
}
