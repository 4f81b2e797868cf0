//! A real OpenSSH server on 127.0.0.1 for tests and benchmarks.
//!
//! [`Sshd::start`] runs the system's `/usr/sbin/sshd` in the foreground on a
//! free local port, with a configuration, host key and user keys generated
//! into a fresh temporary directory. The server is killed when the [`Sshd`]
//! value is dropped, and the directory is removed with it. The fixture needs
//! root (it creates a user, changes owners and may mount a tmpfs) and the
//! `openssh-server` and `rsync` packages (for `rrsync`).
//!
//! Choices made, and why:
//!
//! - **A dedicated user.** Remote operations run as the unprivileged user
//!   [`TEST_USER`] (`cradletest`), so permission errors behave as they would
//!   on a real host. The user is created on first use with `useradd`, with the
//!   password field set to `*`: that keeps the account unlocked for
//!   public-key login (sshd runs with `UsePAM no`) while no password can ever
//!   match. Several test processes may start fixtures at the same time, so the
//!   check-then-create step is serialized with an exclusive lock on
//!   `/tmp/cradle-testkit-user.lock`.
//! - **Keys.** Every fixture generates its own ed25519 keys with `ssh-keygen`:
//!   the host key, a second host key that sshd never sees (for
//!   "wrong host key" tests), an unrestricted user key, and a key restricted
//!   in `authorized_keys` to `rrsync <jail>` (for rsync-only hosts). Private
//!   keys stay owned by root with mode 0600, because the client under test
//!   runs as root. Three known-hosts files are written: the right host key,
//!   the other host key under the same `[127.0.0.1]:port` name, and an empty
//!   one.
//! - **Configuration.** `StrictModes no` because the fixture directory lives
//!   in the system temporary directory, whose permissions StrictModes
//!   rejects; `PidFile none` so fixtures never fight over a pid file; only
//!   public-key authentication; only the test user may log in; the internal
//!   SFTP server; `LogLevel VERBOSE` with `-e` so that everything sshd says
//!   lands in `sshd.log` in the fixture directory, which [`Sshd::log`] returns
//!   for assertion messages. The configuration is checked with `sshd -t`
//!   before the server is started, so a bad configuration is reported with
//!   sshd's own words.
//! - **Port.** A free port is found by binding `127.0.0.1:0` and releasing it.
//!   Another process may grab the port in between, so the server counts as
//!   started only once its log says it listens on that port and a TCP
//!   connection succeeds; if sshd exits instead, the whole start is retried
//!   with a new port, up to five times.
//! - **A full disk.** With [`SshdOptions::full_dir`], sshd is started in its
//!   own mount namespace (set up between `fork` and `exec`) in which a 1 MiB
//!   tmpfs owned by the test user is mounted on [`Sshd::full`]. Writing more
//!   than that through ssh fails with "No space left on device", while the
//!   rest of the machine, including the test itself, never sees the mount and
//!   nothing has to be unmounted afterwards: the namespace disappears with
//!   the last sshd process.
//! - **Directories.** [`Sshd::home`] and [`Sshd::jail`] belong to the test
//!   user; [`Sshd::locked`] belongs to root, so the test user cannot write in
//!   it. Tests that prepare files there as root hand them over with
//!   [`Sshd::give`].
//!
//! [`processes_mentioning`] lets tests prove that no ssh, scp or rsync child
//! outlived an operation, by looking for processes whose command line
//! contains a string unique to the fixture, such as its known-hosts path.

use std::ffi::{CString, OsStr};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The unprivileged user that logs in to the fixture's sshd.
pub const TEST_USER: &str = "cradletest";

const SSHD: &str = "/usr/sbin/sshd";
const USERADD: &str = "/usr/sbin/useradd";
const RRSYNC: &str = "/usr/bin/rrsync";
const USER_LOCK: &str = "/tmp/cradle-testkit-user.lock";
const START_ATTEMPTS: usize = 5;
const START_TIMEOUT: Duration = Duration::from_secs(10);
const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// How to start an [`Sshd`].
#[derive(Debug, Clone, Default)]
pub struct SshdOptions {
    /// Mount a 1 MiB tmpfs at `full()` inside sshd's own mount namespace.
    pub full_dir: bool,
    /// Also listen on this address (which must exist, e.g. a bridge that
    /// hosts in other network namespaces reach), and name it in
    /// `known_hosts`.
    pub also_listen: Option<Ipv4Addr>,
}

/// A running sshd on 127.0.0.1 with its keys and directories; killed on drop.
#[derive(Debug)]
pub struct Sshd {
    child: Child,
    port: u16,
    uid: u32,
    gid: u32,
    // Declared last so it is removed after the server is gone.
    dir: tempfile::TempDir,
}

impl Sshd {
    /// Starts a server with default options.
    pub fn start() -> io::Result<Sshd> {
        Self::start_with(&SshdOptions::default())
    }

    /// Starts a server with the given options.
    pub fn start_with(opts: &SshdOptions) -> io::Result<Sshd> {
        let (uid, gid) = ensure_test_user()?;

        let dir = tempfile::Builder::new()
            .prefix("cradle-sshd-")
            .tempdir()
            .map_err(|e| io::Error::other(format!("creating the fixture directory failed: {e}")))?;
        let root = dir.path().to_path_buf();
        set_mode(&root, 0o755)?;

        for name in [
            "host_ed25519",
            "other_host_ed25519",
            "user_ed25519",
            "rrsync_ed25519",
        ] {
            keygen(&root.join(name), &format!("cradle-testkit-{name}"))?;
        }

        for (name, owner) in [
            ("home", Some((uid, gid))),
            ("jail", Some((uid, gid))),
            ("locked", None),
            ("full", Some((uid, gid))),
        ] {
            let path = root.join(name);
            fs::DirBuilder::new()
                .mode(0o755)
                .create(&path)
                .map_err(|e| {
                    io::Error::other(format!("creating {} failed: {e}", path.display()))
                })?;
            set_mode(&path, 0o755)?;
            if let Some((u, g)) = owner {
                std::os::unix::fs::chown(&path, Some(u), Some(g)).map_err(|e| {
                    io::Error::other(format!("chown {} failed: {e}", path.display()))
                })?;
            }
        }

        let jail = root.join("jail");
        let jail_str = jail
            .to_str()
            .filter(|s| !s.chars().any(|c| c.is_whitespace() || "\"'\\".contains(c)))
            .ok_or_else(|| {
                io::Error::other(format!(
                    "the jail path {} cannot be used in authorized_keys (spaces, quotes or non-UTF-8)",
                    jail.display()
                ))
            })?;
        let user_pub = read_pub(&root.join("user_ed25519.pub"))?;
        let rrsync_pub = read_pub(&root.join("rrsync_ed25519.pub"))?;
        write_file(
            &root.join("authorized_keys"),
            &format!("{user_pub}\ncommand=\"{RRSYNC} {jail_str}\",restrict {rrsync_pub}\n"),
        )?;
        write_file(&root.join("empty_known_hosts"), "")?;

        ensure_run_sshd()?;

        let log_path = root.join("sshd.log");
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .read(true)
            .open(&log_path)
            .map_err(|e| {
                io::Error::other(format!("creating {} failed: {e}", log_path.display()))
            })?;

        let mount = if opts.full_dir {
            let target = CString::new(root.join("full").as_os_str().as_bytes())
                .map_err(|e| io::Error::other(format!("bad full directory path: {e}")))?;
            let data = CString::new(format!("size=1m,uid={uid},gid={gid},mode=0755"))
                .map_err(|e| io::Error::other(format!("bad tmpfs options: {e}")))?;
            Some((target, data))
        } else {
            None
        };

        let mut failures = String::new();
        for attempt in 1..=START_ATTEMPTS {
            let port = free_port()?;
            write_port_files(&root, port, opts.also_listen)?;
            let config = root.join("sshd_config");
            check_config(&config)?;

            let offset = log.seek(SeekFrom::End(0)).map_err(|e| {
                io::Error::other(format!("reading {} failed: {e}", log_path.display()))
            })?;
            let mut child = spawn_sshd(&config, &log, mount.clone())?;
            match wait_ready(&mut child, port, &mut log, offset) {
                Ok(()) => {
                    return Ok(Sshd {
                        child,
                        port,
                        uid,
                        gid,
                        dir,
                    });
                }
                Err(reason) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    let mut text = Vec::new();
                    let _ = log.seek(SeekFrom::Start(offset));
                    let _ = log.read_to_end(&mut text);
                    failures.push_str(&format!(
                        "attempt {attempt} (port {port}): {reason}\n{}\n",
                        String::from_utf8_lossy(&text).trim_end()
                    ));
                }
            }
        }
        Err(io::Error::other(format!(
            "sshd did not start after {START_ATTEMPTS} attempts:\n{failures}"
        )))
    }

    /// The TCP port sshd listens on (on 127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The user to log in as: [`TEST_USER`].
    pub fn user(&self) -> &str {
        TEST_USER
    }

    /// The test user's uid.
    pub fn uid(&self) -> u32 {
        self.uid
    }

    /// The test user's primary gid.
    pub fn gid(&self) -> u32 {
        self.gid
    }

    /// The fixture directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The private key that logs in without restriction.
    pub fn key(&self) -> PathBuf {
        self.dir().join("user_ed25519")
    }

    /// The private key restricted to `rrsync <jail>`.
    pub fn rrsync_key(&self) -> PathBuf {
        self.dir().join("rrsync_ed25519")
    }

    /// A known-hosts file holding the server's host key.
    pub fn known_hosts(&self) -> PathBuf {
        self.dir().join("known_hosts")
    }

    /// A known-hosts file holding another key under the server's name.
    pub fn wrong_known_hosts(&self) -> PathBuf {
        self.dir().join("wrong_known_hosts")
    }

    /// An empty known-hosts file.
    pub fn empty_known_hosts(&self) -> PathBuf {
        self.dir().join("empty_known_hosts")
    }

    /// A directory owned by the test user, for remote operations.
    pub fn home(&self) -> PathBuf {
        self.dir().join("home")
    }

    /// The directory rrsync confines the restricted key to (owned by the test user).
    pub fn jail(&self) -> PathBuf {
        self.dir().join("jail")
    }

    /// A directory owned by root in which the test user cannot write.
    pub fn locked(&self) -> PathBuf {
        self.dir().join("locked")
    }

    /// The directory that is a 1 MiB tmpfs for sshd when `full_dir` was asked.
    pub fn full(&self) -> PathBuf {
        self.dir().join("full")
    }

    /// What sshd has logged so far (lossily decoded), for assertion messages.
    pub fn log(&self) -> String {
        fs::read(self.dir().join("sshd.log"))
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// Make `path` (a file or dir the test created as root under home()/jail()) owned by the test user, recursively.
    pub fn give(&self, path: &Path) -> io::Result<()> {
        chown_tree(path, self.uid, self.gid)
    }
}

impl Sshd {
    /// Cuts every connection this server has open, as a crashed or killed
    /// sshd would: SIGKILL to each per-connection sshd process (every sshd
    /// below the listener, privileged monitor and unprivileged child alike),
    /// so nothing is closed cleanly. The listener keeps running. Returns the
    /// pids killed.
    pub fn cut_connections(&self) -> Vec<u32> {
        let listener = self.child.id();
        let mut killed = Vec::new();
        for (pid, ppid, comm) in process_table() {
            if comm == "sshd" && descends_from(pid, ppid, listener) {
                // SAFETY: kill(2) with a pid just read below our own sshd.
                if unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) } == 0 {
                    killed.push(pid);
                }
            }
        }
        killed
    }
}

/// Every process: (pid, parent pid, command name), from /proc/*/stat.
fn process_table() -> Vec<(u32, u32, String)> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for entry in entries.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse().ok()) else {
            continue;
        };
        let Ok(stat) = fs::read(entry.path().join("stat")) else {
            continue;
        };
        // "pid (comm) state ppid ...": comm may itself contain ')'.
        let (Some(open), Some(close)) = (
            stat.iter().position(|&b| b == b'('),
            stat.iter().rposition(|&b| b == b')'),
        ) else {
            continue;
        };
        let comm = String::from_utf8_lossy(&stat[open + 1..close]).into_owned();
        let rest = String::from_utf8_lossy(&stat[close + 1..]).into_owned();
        let Some(ppid) = rest.split_whitespace().nth(1).and_then(|p| p.parse().ok()) else {
            continue;
        };
        out.push((pid, ppid, comm));
    }
    out
}

/// Whether `pid` (whose parent is `ppid`) is below `ancestor`.
fn descends_from(pid: u32, ppid: u32, ancestor: u32) -> bool {
    let parents: std::collections::HashMap<u32, u32> = process_table()
        .into_iter()
        .map(|(p, pp, _)| (p, pp))
        .collect();
    let (mut at, mut up) = (pid, ppid);
    for _ in 0..64 {
        if up == ancestor {
            return true;
        }
        if up <= 1 || up == at {
            return false;
        }
        at = up;
        match parents.get(&at) {
            Some(&p) => up = p,
            None => return false,
        }
    }
    false
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits up to `within` for every process mentioning `marker` to end
/// (SIGKILLed processes take a moment to go); returns those still running
/// then, so an empty list means none outlived the operation.
pub fn wait_until_none_mention(marker: &OsStr, within: std::time::Duration) -> Vec<(u32, String)> {
    let start = std::time::Instant::now();
    loop {
        let left = processes_mentioning(marker);
        if left.is_empty() || start.elapsed() > within {
            return left;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// Processes still running (state not Z) whose command line contains `marker` (bytes), excluding the calling process: (pid, command line with NULs shown as spaces). Reads /proc/*/cmdline and /proc/*/stat. Tests use the fixture's unique known_hosts path as the marker to prove no ssh/scp/rsync child outlived an operation.
pub fn processes_mentioning(marker: &OsStr) -> Vec<(u32, String)> {
    let marker = marker.as_bytes();
    let me = std::process::id();
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == me {
            continue;
        }
        // Processes may vanish at any moment: skip whatever cannot be read.
        let Ok(cmdline) = fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        if !contains(&cmdline, marker) {
            continue;
        }
        let Ok(stat) = fs::read(entry.path().join("stat")) else {
            continue;
        };
        // The state is the first field after the command name, which is in
        // parentheses and may itself contain ')'.
        let state = stat.iter().rposition(|&b| b == b')').and_then(|i| {
            stat[i + 1..]
                .iter()
                .find(|b| !b.is_ascii_whitespace())
                .copied()
        });
        if matches!(state, None | Some(b'Z')) {
            continue;
        }
        let shown: Vec<u8> = cmdline
            .iter()
            .map(|&b| if b == 0 { b' ' } else { b })
            .collect();
        found.push((pid, String::from_utf8_lossy(&shown).trim_end().to_string()));
    }
    found.sort();
    found
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    needle.is_empty() || haystack.windows(needle.len()).any(|w| w == needle)
}

/// Creates the test user if needed and returns its uid and gid.
fn ensure_test_user() -> io::Result<(u32, u32)> {
    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(USER_LOCK)
        .map_err(|e| io::Error::other(format!("opening {USER_LOCK} failed: {e}")))?;
    lock.lock()
        .map_err(|e| io::Error::other(format!("locking {USER_LOCK} failed: {e}")))?;

    if let Some(ids) = lookup_user(TEST_USER)? {
        return Ok(ids);
    }
    let out = Command::new(USERADD)
        .args(["--create-home", "--shell", "/bin/sh", "-p", "*", TEST_USER])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| io::Error::other(format!("running {USERADD} failed: {e}")))?;
    // Another process that does not take the lock may have won the race;
    // whatever useradd said, the account either exists now or it does not.
    match lookup_user(TEST_USER)? {
        Some(ids) => Ok(ids),
        None => Err(io::Error::other(format!(
            "useradd {TEST_USER} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))),
    }
    // `lock` is released when dropped here.
}

/// The uid and gid of `user` according to /etc/passwd.
fn lookup_user(user: &str) -> io::Result<Option<(u32, u32)>> {
    let passwd = fs::read_to_string("/etc/passwd")
        .map_err(|e| io::Error::other(format!("reading /etc/passwd failed: {e}")))?;
    for line in passwd.lines() {
        let fields: Vec<&str> = line.split(':').collect();
        if fields.len() >= 4 && fields[0] == user {
            let uid = fields[2].parse().ok();
            let gid = fields[3].parse().ok();
            return match (uid, gid) {
                (Some(u), Some(g)) => Ok(Some((u, g))),
                _ => Err(io::Error::other(format!("bad /etc/passwd entry: {line}"))),
            };
        }
    }
    Ok(None)
}

fn keygen(path: &Path, comment: &str) -> io::Result<()> {
    let out = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", comment, "-f"])
        .arg(path)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| io::Error::other(format!("running ssh-keygen failed: {e}")))?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "ssh-keygen failed for {} ({}): {}",
            path.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    set_mode(path, 0o600)
}

fn read_pub(path: &Path) -> io::Result<String> {
    let text = fs::read_to_string(path)
        .map_err(|e| io::Error::other(format!("reading {} failed: {e}", path.display())))?;
    Ok(text.trim().to_string())
}

fn write_file(path: &Path, contents: &str) -> io::Result<()> {
    fs::write(path, contents)
        .map_err(|e| io::Error::other(format!("writing {} failed: {e}", path.display())))
}

fn set_mode(path: &Path, mode: u32) -> io::Result<()> {
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .map_err(|e| io::Error::other(format!("chmod {mode:o} {} failed: {e}", path.display())))
}

fn chown_tree(path: &Path, uid: u32, gid: u32) -> io::Result<()> {
    // lchown: never follow a symbolic link out of the tree.
    std::os::unix::fs::lchown(path, Some(uid), Some(gid))
        .map_err(|e| io::Error::other(format!("chown {} failed: {e}", path.display())))?;
    let meta = fs::symlink_metadata(path)
        .map_err(|e| io::Error::other(format!("stat {} failed: {e}", path.display())))?;
    if meta.is_dir() {
        let entries = fs::read_dir(path)
            .map_err(|e| io::Error::other(format!("listing {} failed: {e}", path.display())))?;
        for entry in entries {
            let entry = entry
                .map_err(|e| io::Error::other(format!("listing {} failed: {e}", path.display())))?;
            chown_tree(&entry.path(), uid, gid)?;
        }
    }
    Ok(())
}

/// sshd refuses to start without its privilege-separation directory.
fn ensure_run_sshd() -> io::Result<()> {
    match fs::DirBuilder::new().mode(0o755).create("/run/sshd") {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(io::Error::other(format!("creating /run/sshd failed: {e}"))),
    }
}

fn free_port() -> io::Result<u16> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .map_err(|e| io::Error::other(format!("finding a free port failed: {e}")))?;
    let port = listener
        .local_addr()
        .map_err(|e| io::Error::other(format!("finding a free port failed: {e}")))?
        .port();
    Ok(port)
}

/// Writes the files that name the port: sshd_config and the known-hosts files.
fn write_port_files(root: &Path, port: u16, also: Option<Ipv4Addr>) -> io::Result<()> {
    let d = root.display();
    let (listen, name) = match also {
        Some(ip) => (format!("ListenAddress {ip}\n"), format!(",[{ip}]:{port}")),
        None => (String::new(), String::new()),
    };
    write_file(
        &root.join("sshd_config"),
        &format!(
            "Port {port}\n\
             ListenAddress 127.0.0.1\n\
             ListenAddress ::1\n\
             {listen}\
             HostKey {d}/host_ed25519\n\
             AuthorizedKeysFile {d}/authorized_keys\n\
             PidFile none\n\
             UsePAM no\n\
             # The fixture directory lives under the temporary directory, which StrictModes rejects.\n\
             StrictModes no\n\
             PasswordAuthentication no\n\
             KbdInteractiveAuthentication no\n\
             AllowUsers {TEST_USER}\n\
             Subsystem sftp internal-sftp\n\
             # Tests run many logins at once; the default (10:30:100) drops some.\n\
             MaxStartups 200\n\
             LogLevel VERBOSE\n"
        ),
    )?;
    let host = read_pub(&root.join("host_ed25519.pub"))?;
    let other = read_pub(&root.join("other_host_ed25519.pub"))?;
    write_file(
        &root.join("known_hosts"),
        &format!("[127.0.0.1]:{port},[::1]:{port}{name} {host}\n"),
    )?;
    write_file(
        &root.join("wrong_known_hosts"),
        &format!("[127.0.0.1]:{port},[::1]:{port}{name} {other}\n"),
    )?;
    Ok(())
}

fn check_config(config: &Path) -> io::Result<()> {
    let out = Command::new(SSHD)
        .arg("-t")
        .arg("-f")
        .arg(config)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| io::Error::other(format!("running {SSHD} -t failed: {e}")))?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "sshd rejected {} ({}): {}",
            config.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

fn spawn_sshd(config: &Path, log: &File, mount: Option<(CString, CString)>) -> io::Result<Child> {
    let stdout = log
        .try_clone()
        .map_err(|e| io::Error::other(format!("duplicating the sshd log handle failed: {e}")))?;
    let stderr = log
        .try_clone()
        .map_err(|e| io::Error::other(format!("duplicating the sshd log handle failed: {e}")))?;
    let mut cmd = Command::new(SSHD);
    cmd.arg("-D")
        .arg("-e")
        .arg("-f")
        .arg(config)
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr);
    let namespaced = mount.is_some();
    if let Some((target, data)) = mount {
        // SAFETY: the closure runs in the child between fork and exec, where
        // only async-signal-safe operations are allowed. It calls nothing but
        // unshare(2) and mount(2) (raw system calls) on C strings that were
        // allocated before the fork and moved in, and reads errno through
        // `io::Error::last_os_error`, which does not allocate. It allocates
        // nothing, takes no lock and touches no shared state.
        unsafe {
            cmd.pre_exec(move || {
                if libc::unshare(libc::CLONE_NEWNS) != 0 {
                    return Err(io::Error::last_os_error());
                }
                // Stop mounts from propagating back to the rest of the machine.
                if libc::mount(
                    std::ptr::null(),
                    c"/".as_ptr(),
                    std::ptr::null(),
                    libc::MS_REC | libc::MS_PRIVATE,
                    std::ptr::null(),
                ) != 0
                {
                    return Err(io::Error::last_os_error());
                }
                if libc::mount(
                    c"tmpfs".as_ptr(),
                    target.as_ptr(),
                    c"tmpfs".as_ptr(),
                    0,
                    data.as_ptr().cast(),
                ) != 0
                {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    cmd.spawn().map_err(|e| {
        if namespaced {
            io::Error::other(format!(
                "starting {SSHD} in its own mount namespace with a tmpfs failed: {e}"
            ))
        } else {
            io::Error::other(format!("starting {SSHD} failed: {e}"))
        }
    })
}

/// Waits until this sshd has said it listens on `port` and accepts a TCP
/// connection there. Fails if sshd exits or the timeout passes.
fn wait_ready(child: &mut Child, port: u16, log: &mut File, offset: u64) -> Result<(), String> {
    let listening = format!("Server listening on 127.0.0.1 port {port}.");
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let deadline = Instant::now() + START_TIMEOUT;
    let mut said_listening = false;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Err(format!("sshd exited ({status})")),
            Ok(None) => {}
            Err(e) => return Err(format!("waiting for sshd failed: {e}")),
        }
        if !said_listening {
            // The log line proves that this sshd, and not some other process
            // that took the port meanwhile, owns the listening socket.
            let mut text = Vec::new();
            if log.seek(SeekFrom::Start(offset)).is_ok() && log.read_to_end(&mut text).is_ok() {
                said_listening = contains(&text, listening.as_bytes());
            }
        }
        if said_listening && TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "sshd was not accepting connections after {} s",
                START_TIMEOUT.as_secs()
            ));
        }
        std::thread::sleep(POLL_INTERVAL);
    }
}
