//! Child processes that are stopped when dropped, and what /proc tells about
//! processes (memory, CPU time).

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

/// A child process stopped on drop (on success, error and panic alike): first
/// with `signal` (sent by `kill`, so no libc is needed), then with SIGKILL
/// if it has not exited after a few seconds.
pub struct Guarded {
    name: &'static str,
    signal: &'static str,
    child: Option<Child>,
}

impl Guarded {
    pub fn new(name: &'static str, signal: &'static str, child: Child) -> Guarded {
        Guarded {
            name,
            signal,
            child: Some(child),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    pub fn child_mut(&mut self) -> &mut Child {
        self.child.as_mut().expect("the process is running")
    }

    /// `Some(status)` once the process has exited.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        let _ = Command::new("kill")
            .args([format!("-{}", self.signal), child.id().to_string()])
            .stderr(Stdio::null())
            .status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        eprintln!(
            "    {} did not stop on SIG{}; killing it",
            self.name, self.signal
        );
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for Guarded {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A field of /proc/<pid>/status in KiB (e.g. "VmRSS", "VmHWM").
pub fn status_kib(pid: u32, field: &str) -> Result<u64> {
    let path = format!("/proc/{pid}/status");
    let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
    text.lines()
        .find_map(|l| {
            let rest = l.strip_prefix(field)?.strip_prefix(':')?;
            rest.split_whitespace().next()?.parse().ok()
        })
        .with_context(|| format!("{path} has no {field}"))
}

/// Clock ticks per second of /proc's CPU times (`getconf CLK_TCK`; 100 on
/// every Linux we run on).
pub fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

/// (parent pid, user + system CPU ticks) of a process, from /proc/<pid>/stat.
fn stat(pid: &str) -> Option<(u32, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may hold spaces: fields count
    // from after the last ')'.
    let rest = &text[text.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After the name: state(0) ppid(1) ... utime(11) stime(12).
    let ppid = f.get(1)?.parse().ok()?;
    let ticks = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    Some((ppid, ticks))
}

/// CPU ticks used so far by `pid` and its direct children (nginx's workers).
pub fn cpu_ticks_with_children(pid: u32) -> u64 {
    let mut total = stat(&pid.to_string()).map(|s| s.1).unwrap_or(0);
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for e in dir.flatten() {
            let name = e.file_name();
            let Some(name) = name.to_str() else { continue };
            if !name.bytes().all(|b| b.is_ascii_digit()) {
                continue;
            }
            if let Some((ppid, ticks)) = stat(name)
                && ppid == pid
            {
                total += ticks;
            }
        }
    }
    total
}

/// CPU ticks used so far by this process (all threads).
pub fn own_cpu_ticks() -> u64 {
    stat("self").map(|s| s.1).unwrap_or(0)
}
