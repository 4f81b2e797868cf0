//! Host-to-host file operations (Nova's `RemoteFilesystem`, seed 001):
//! make and remove directories and files on another host, and copy files to
//! and from it, through one of two transports.
//!
//! - [`SshFs`] uses only `ssh` and `scp`. Small operations and uploads are
//!   one POSIX shell command over ssh, every path quoted for that shell
//!   (uploads stream into a temporary file renamed into place when
//!   complete); downloads use scp's SFTP mode with the path escaped for its
//!   glob.
//! - [`RsyncFs`] uses only `rsync` (over ssh), so the remote account can be
//!   confined with `command="rrsync DIR"`. mkdir, touch and rm are emulated
//!   as Nova does, by syncing empty temporary trees with `--relative`,
//!   `--delete` and include/exclude rules. No remote name ever appears on a
//!   command line: the command line names only the transfer root (`/` or
//!   `.`), and every name travels inside rsync's protocol, in the file list
//!   or in anchored, escaped filter rules. That is why it does not need
//!   `--secluded-args` (which rrsync refuses): there is nothing left for a
//!   remote shell or rrsync's argument parser to reinterpret.
//!
//! Every operation has a deadline, can be cancelled through [`Op::cancel`],
//! reports progress for copies, and kills its processes (the whole process
//! group, so the ssh under scp or rsync too) when it is cancelled, times
//! out or is dropped. No local shell is ever used. Failures come back as
//! typed [`Error`]s read from the tools' stderr.

pub mod error;
mod process;
mod quote;
pub mod rsync;
pub mod ssh;
pub mod target;
#[cfg(feature = "testkit")]
pub mod testkit;

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

pub use error::{Error, Result};
pub use rsync::RsyncFs;
pub use ssh::SshFs;
pub use target::{Host, RemotePath, parse_remote_operand};
pub use tokio_util::sync::CancellationToken;

/// Which tools carry the operations (`[remote] transport`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// ssh for small operations and uploads, scp for downloads.
    #[default]
    Ssh,
    /// rsync alone (over ssh): works with accounts confined by rrsync.
    Rsync,
}

impl std::str::FromStr for Transport {
    type Err = Error;
    fn from_str(s: &str) -> Result<Transport> {
        match s {
            "ssh" => Ok(Transport::Ssh),
            "rsync" => Ok(Transport::Rsync),
            _ => Err(Error::Invalid {
                what: "transport".into(),
                reason: format!("{s:?}: expected \"ssh\" or \"rsync\""),
            }),
        }
    }
}

impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Transport::Ssh => "ssh",
            Transport::Rsync => "rsync",
        })
    }
}

/// How to reach other hosts (the `[remote]` section of the configuration).
#[derive(Clone, Debug, PartialEq)]
pub struct Settings {
    pub transport: Transport,
    /// Login user; `None` leaves it to ssh (the local user, or ssh_config).
    pub user: Option<String>,
    pub port: u16,
    /// Private key; when set, only this key is offered.
    pub identity_file: Option<PathBuf>,
    /// known_hosts file; `None` leaves ssh's default.
    pub known_hosts: Option<PathBuf>,
    /// Refuse hosts whose key is not in known_hosts. Off, a new host's key
    /// is accepted and recorded; a changed key is still refused.
    pub strict_host_key_checking: bool,
    pub connect_timeout: Duration,
    /// Compress in transit (ssh's for the ssh transport, rsync's for rsync).
    /// Off by default: disk images, qcow2 above all, gain little and cost
    /// CPU, as Nova found.
    pub compression: bool,
    /// Bandwidth limit for copies in KiB/s; 0 is none.
    pub bwlimit_kib: u64,
    /// Deadline of mkdir, touch, rm and rmdir.
    pub timeout: Duration,
    /// Deadline of a copy.
    pub copy_timeout: Duration,
    pub ssh: PathBuf,
    pub scp: PathBuf,
    pub rsync: PathBuf,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            transport: Transport::Ssh,
            user: None,
            port: 22,
            identity_file: None,
            known_hosts: None,
            strict_host_key_checking: true,
            connect_timeout: Duration::from_secs(10),
            compression: false,
            bwlimit_kib: 0,
            timeout: Duration::from_secs(60),
            copy_timeout: Duration::from_secs(6 * 3600),
            ssh: PathBuf::from("ssh"),
            scp: PathBuf::from("scp"),
            rsync: PathBuf::from("rsync"),
        }
    }
}

impl Settings {
    /// Check what ssh's option parser would misread, before any run.
    pub fn validate(&self) -> Result<()> {
        if let Some(u) = &self.user {
            target::check_user(u)?;
        }
        if let Some(k) = &self.known_hosts {
            let b = k.as_os_str().as_encoded_bytes();
            if b.contains(&b'"') || b.iter().any(|c| c.is_ascii_control()) {
                return Err(Error::Invalid {
                    what: "known_hosts".into(),
                    reason: format!(
                        "{}: a path with '\"' or control characters cannot be given to ssh -o",
                        k.display()
                    ),
                });
            }
        }
        if self.port == 0 {
            return Err(Error::Invalid {
                what: "port".into(),
                reason: "0 is not a port".into(),
            });
        }
        Ok(())
    }
}

/// Bytes copied so far, of how many.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Progress {
    pub done: u64,
    pub total: u64,
}

pub type ProgressFn = Arc<dyn Fn(Progress) + Send + Sync>;

/// Per-call controls: a deadline (the driver's configured one when `None`),
/// a cancellation token and a progress callback for copies.
#[derive(Clone, Default)]
pub struct Op {
    pub timeout: Option<Duration>,
    pub cancel: CancellationToken,
    pub progress: Option<ProgressFn>,
}

impl Op {
    pub fn new() -> Op {
        Op::default()
    }

    pub fn with_timeout(mut self, t: Duration) -> Op {
        self.timeout = Some(t);
        self
    }

    pub fn with_cancel(mut self, token: CancellationToken) -> Op {
        self.cancel = token;
        self
    }

    pub fn on_progress(mut self, f: impl Fn(Progress) + Send + Sync + 'static) -> Op {
        self.progress = Some(Arc::new(f));
        self
    }

    pub(crate) fn report(&self, p: Progress) {
        if let Some(f) = &self.progress {
            f(p);
        }
    }
}

/// File operations on another host. Paths on it are [`RemotePath`]s; local
/// paths are ordinary ones.
///
/// - `create_dir` makes the directory and any missing parents; an existing
///   directory is fine.
/// - `create_file` makes an empty file; an existing file is left as it is.
/// - `remove_file` removes a file (or symlink), never a directory.
/// - `remove_dir` removes a directory and everything in it.
/// - `copy_to` copies a local regular file to exactly `dst`; `copy_from`
///   copies a remote regular file to exactly the local `dst`, through a
///   temporary file beside it that is renamed into place when complete.
pub trait RemoteFilesystem: Send + Sync {
    fn create_dir(
        &self,
        host: &Host,
        path: &RemotePath,
        op: &Op,
    ) -> impl Future<Output = Result<()>> + Send;
    fn create_file(
        &self,
        host: &Host,
        path: &RemotePath,
        op: &Op,
    ) -> impl Future<Output = Result<()>> + Send;
    fn remove_file(
        &self,
        host: &Host,
        path: &RemotePath,
        op: &Op,
    ) -> impl Future<Output = Result<()>> + Send;
    fn remove_dir(
        &self,
        host: &Host,
        path: &RemotePath,
        op: &Op,
    ) -> impl Future<Output = Result<()>> + Send;
    fn copy_to(
        &self,
        src: &Path,
        host: &Host,
        dst: &RemotePath,
        op: &Op,
    ) -> impl Future<Output = Result<()>> + Send;
    fn copy_from(
        &self,
        host: &Host,
        src: &RemotePath,
        dst: &Path,
        op: &Op,
    ) -> impl Future<Output = Result<()>> + Send;
}

/// The driver the settings choose.
pub enum Remote {
    Ssh(SshFs),
    Rsync(RsyncFs),
}

impl Remote {
    pub fn new(settings: Settings) -> Result<Remote> {
        settings.validate()?;
        Ok(match settings.transport {
            Transport::Ssh => Remote::Ssh(SshFs::new(settings)),
            Transport::Rsync => Remote::Rsync(RsyncFs::new(settings)),
        })
    }
}

macro_rules! dispatch {
    ($self:ident, $d:ident => $e:expr) => {
        match $self {
            Remote::Ssh($d) => $e.await,
            Remote::Rsync($d) => $e.await,
        }
    };
}

impl RemoteFilesystem for Remote {
    async fn create_dir(&self, host: &Host, path: &RemotePath, op: &Op) -> Result<()> {
        dispatch!(self, d => d.create_dir(host, path, op))
    }
    async fn create_file(&self, host: &Host, path: &RemotePath, op: &Op) -> Result<()> {
        dispatch!(self, d => d.create_file(host, path, op))
    }
    async fn remove_file(&self, host: &Host, path: &RemotePath, op: &Op) -> Result<()> {
        dispatch!(self, d => d.remove_file(host, path, op))
    }
    async fn remove_dir(&self, host: &Host, path: &RemotePath, op: &Op) -> Result<()> {
        dispatch!(self, d => d.remove_dir(host, path, op))
    }
    async fn copy_to(&self, src: &Path, host: &Host, dst: &RemotePath, op: &Op) -> Result<()> {
        dispatch!(self, d => d.copy_to(src, host, dst, op))
    }
    async fn copy_from(&self, host: &Host, src: &RemotePath, dst: &Path, op: &Op) -> Result<()> {
        dispatch!(self, d => d.copy_from(host, src, dst, op))
    }
}

/// The ssh options both transports share, as `-o` arguments.
pub(crate) fn ssh_options(s: &Settings, host: &Host) -> Vec<String> {
    let mut o = vec![
        "BatchMode=yes".to_string(),
        format!(
            "StrictHostKeyChecking={}",
            if s.strict_host_key_checking {
                "yes"
            } else {
                "accept-new"
            }
        ),
        format!("ConnectTimeout={}", s.connect_timeout.as_secs().max(1)),
        "ServerAliveInterval=15".into(),
        "ServerAliveCountMax=4".into(),
        format!("Port={}", s.port),
        // Keep "Warning: Permanently added ..." out of stderr; refusals and
        // failures are printed at error level.
        "LogLevel=ERROR".into(),
    ];
    if let Some(k) = &s.known_hosts {
        o.push(format!("UserKnownHostsFile=\"{}\"", k.display()));
    }
    if s.identity_file.is_some() {
        o.push("IdentitiesOnly=yes".into());
    }
    if let Some(u) = host.user().or(s.user.as_deref()) {
        o.push(format!("User={u}"));
    }
    o
}

/// A local regular file's size, or the error that says why it cannot be
/// copied.
pub(crate) fn local_source(src: &Path) -> Result<(PathBuf, u64)> {
    let local = |source| Error::Local {
        path: src.to_path_buf(),
        source,
    };
    let abs = std::fs::canonicalize(src).map_err(local)?;
    let meta = std::fs::metadata(&abs).map_err(local)?;
    if meta.is_dir() {
        return Err(Error::IsADirectory {
            place: src.display().to_string(),
        });
    }
    if !meta.is_file() {
        return Err(Error::NotAFile {
            place: src.display().to_string(),
            kind: "not a regular file".into(),
        });
    }
    // Fail early if we cannot read it.
    std::fs::File::open(&abs).map_err(local)?;
    Ok((abs, meta.len()))
}

/// The local destination of a download: its directory (canonical, so the
/// temporary file beside it is on the same filesystem) and its file name.
pub(crate) fn local_destination(dst: &Path) -> Result<(PathBuf, std::ffi::OsString)> {
    let local = |source| Error::Local {
        path: dst.to_path_buf(),
        source,
    };
    let name = dst.file_name().ok_or_else(|| Error::Invalid {
        what: "local destination".into(),
        reason: format!("{}: names no file", dst.display()),
    })?;
    if dst.is_dir() {
        return Err(Error::IsADirectory {
            place: dst.display().to_string(),
        });
    }
    let parent = match dst.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let dir = std::fs::canonicalize(parent).map_err(local)?;
    Ok((dir, name.to_os_string()))
}
