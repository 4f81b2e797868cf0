//! Operator actions: the host names one (`{"agent": "run", "id", "action"}`
//! on the channel) and the agent runs it only when its baked configuration
//! names it, as the argument vector given there (no shell, standard input
//! closed, in a process group of its own killed at `action_timeout`).
//!
//! Each id runs at most once, across restarts too: the id is written (and
//! synced) to `state_dir/actions.done` before the program starts, so an
//! agent that dies mid-action never starts it again. The answer carries the
//! exit code (128 + the signal when one ended it) and the last
//! [`MAX_ACTION_OUTPUT`] bytes of standard output and error, together.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::io::{Read, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cradle_model::agent::{FromAgent, MAX_ACTION_OUTPUT};
use uuid::Uuid;

/// The ids kept in `actions.done` (older ones are forgotten: the host
/// never sends an id twice).
const KEPT_IDS: usize = 1000;

/// The ids already run.
pub struct Done {
    path: PathBuf,
    ids: VecDeque<Uuid>,
    set: HashSet<Uuid>,
}

impl Done {
    /// The record under `state_dir` (made if missing).
    pub fn open(state_dir: &Path) -> Result<Done, String> {
        std::fs::create_dir_all(state_dir)
            .map_err(|e| format!("cannot make {}: {e}", state_dir.display()))?;
        let path = state_dir.join("actions.done");
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
        };
        let ids: VecDeque<Uuid> = text.lines().filter_map(|l| l.trim().parse().ok()).collect();
        let set = ids.iter().copied().collect();
        Ok(Done { path, ids, set })
    }

    pub fn contains(&self, id: Uuid) -> bool {
        self.set.contains(&id)
    }

    /// Note `id` as run, on disk first.
    pub fn record(&mut self, id: Uuid) -> Result<(), String> {
        self.ids.push_back(id);
        self.set.insert(id);
        let io = |e: std::io::Error| {
            format!("cannot record action {id} in {}: {e}", self.path.display())
        };
        if self.ids.len() > 2 * KEPT_IDS {
            while self.ids.len() > KEPT_IDS {
                if let Some(old) = self.ids.pop_front() {
                    self.set.remove(&old);
                }
            }
            let text: String = self.ids.iter().map(|i| format!("{i}\n")).collect();
            super::apply::write_if_changed(&self.path, text.as_bytes(), 0o600, None)?;
            return Ok(());
        }
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .map_err(io)?;
        f.write_all(format!("{id}\n").as_bytes()).map_err(io)?;
        f.sync_all().map_err(io)
    }
}

/// The answer to action `name` (`id`): run when `allowed` names it and
/// `done` has not seen it. `None`: already run (nothing is sent again).
pub fn handle(
    id: Uuid,
    name: &str,
    allowed: &BTreeMap<String, Vec<String>>,
    timeout: Duration,
    done: &mut Done,
) -> Option<FromAgent> {
    if done.contains(id) {
        return None;
    }
    let Some(argv) = allowed.get(name) else {
        if let Err(e) = done.record(id) {
            super::log(&e);
        }
        return Some(FromAgent::ActionRefused {
            id,
            action: cut(name, 64),
            reason: "the agent's configuration does not allow this action".into(),
        });
    };
    if let Err(e) = done.record(id) {
        // Without the record it could run twice: it does not run.
        return Some(FromAgent::ActionResult {
            id,
            action: name.to_string(),
            exit_code: 1,
            output: format!("cradle-agent: not run: {e}\n"),
            truncated: false,
        });
    }
    let (exit_code, output, truncated) = match run(argv, timeout) {
        Ok(r) => r,
        Err(e) => (127, format!("cradle-agent: {e}\n"), false),
    };
    Some(FromAgent::ActionResult {
        id,
        action: name.to_string(),
        exit_code,
        output,
        truncated,
    })
}

fn cut(s: &str, max: usize) -> String {
    s.chars().take(max).collect()
}

/// Run `argv` to its end or `timeout`: its exit code, the tail of its
/// output, and whether the output was cut.
pub fn run(argv: &[String], timeout: Duration) -> Result<(i32, String, bool), String> {
    let (mut reader, writer) = std::io::pipe().map_err(|e| format!("cannot make a pipe: {e}"))?;
    let mut cmd = Command::new(&argv[0]);
    cmd.args(&argv[1..])
        .stdin(Stdio::null())
        .stdout(
            writer
                .try_clone()
                .map_err(|e| format!("cannot make a pipe: {e}"))?,
        )
        .stderr(writer)
        .env_clear()
        .env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        )
        .current_dir("/")
        .process_group(0);
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot run {}: {e}", argv[0]))?;
    // The parent's copies of the pipe's write end go with the command.
    drop(cmd);
    let reading = std::thread::spawn(move || {
        let mut tail: VecDeque<u8> = VecDeque::new();
        let (mut buf, mut cut) = ([0u8; 8192], false);
        while let Ok(n) = reader.read(&mut buf) {
            if n == 0 {
                break;
            }
            tail.extend(&buf[..n]);
            while tail.len() > MAX_ACTION_OUTPUT {
                tail.pop_front();
                cut = true;
            }
        }
        (Vec::from(tail), cut)
    });
    let until = Instant::now() + timeout;
    let mut timed_out = false;
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break s,
            Ok(None) if Instant::now() >= until => {
                timed_out = true;
                // SAFETY: kill(2) on the child's own process group.
                unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
                break child
                    .wait()
                    .map_err(|e| format!("cannot wait for {}: {e}", argv[0]))?;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => return Err(format!("cannot wait for {}: {e}", argv[0])),
        }
    };
    // A grandchild that keeps the pipe open would keep the reader going:
    // its group was killed at the timeout; otherwise the output ends with
    // the program.
    let (bytes, mut truncated) = reading.join().unwrap_or_default();
    let mut output = String::from_utf8_lossy(&bytes).into_owned();
    while output.len() > MAX_ACTION_OUTPUT {
        output.remove(0);
        truncated = true;
    }
    if timed_out {
        let note = format!("\ncradle-agent: killed after {} s\n", timeout.as_secs());
        while output.len() + note.len() > MAX_ACTION_OUTPUT {
            output.remove(0);
            truncated = true;
        }
        output.push_str(&note);
    }
    let code = status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(0));
    Ok((code, output, truncated))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allowed() -> BTreeMap<String, Vec<String>> {
        BTreeMap::from([
            (
                "hello".to_string(),
                vec![
                    "/bin/sh".into(),
                    "-c".into(),
                    "echo out; echo err >&2; exit 3".into(),
                ],
            ),
            (
                "loud".to_string(),
                vec![
                    "/bin/sh".into(),
                    "-c".into(),
                    "head -c 100000 /dev/zero | tr '\\0' x".into(),
                ],
            ),
            ("slow".to_string(), vec!["/bin/sleep".into(), "30".into()]),
        ])
    }

    #[test]
    fn an_allowed_action_runs_once_and_answers() {
        let dir = tempfile::tempdir().unwrap();
        let mut done = Done::open(dir.path()).unwrap();
        let id = Uuid::new_v4();
        let a = handle(id, "hello", &allowed(), Duration::from_secs(10), &mut done).unwrap();
        let FromAgent::ActionResult {
            exit_code,
            output,
            truncated,
            ..
        } = a
        else {
            panic!("{a:?}")
        };
        assert_eq!(exit_code, 3);
        assert_eq!(output, "out\nerr\n");
        assert!(!truncated);
        assert!(handle(id, "hello", &allowed(), Duration::from_secs(10), &mut done).is_none());
        // A restarted agent remembers.
        let mut again = Done::open(dir.path()).unwrap();
        assert!(handle(id, "hello", &allowed(), Duration::from_secs(10), &mut again).is_none());
    }

    #[test]
    fn an_action_not_allowed_is_refused_and_never_run() {
        let dir = tempfile::tempdir().unwrap();
        let mut done = Done::open(dir.path()).unwrap();
        let a = handle(
            Uuid::new_v4(),
            "rm-rf",
            &allowed(),
            Duration::from_secs(1),
            &mut done,
        );
        assert!(matches!(a, Some(FromAgent::ActionRefused { .. })), "{a:?}");
    }

    #[test]
    fn output_is_bounded_and_slow_actions_are_killed() {
        let (code, out, cut) = run(&allowed()["loud"], Duration::from_secs(10)).unwrap();
        assert_eq!(code, 0);
        assert!(cut);
        assert_eq!(out.len(), MAX_ACTION_OUTPUT);
        let t = Instant::now();
        let (code, out, _) = run(&allowed()["slow"], Duration::from_millis(300)).unwrap();
        assert!(t.elapsed() < Duration::from_secs(5));
        assert_eq!(code, 128 + libc::SIGKILL);
        assert!(out.contains("killed after"), "{out}");
        let e = run(&["/nonexistent".to_string()], Duration::from_secs(1)).unwrap_err();
        assert!(e.contains("cannot run /nonexistent"), "{e}");
    }
}
