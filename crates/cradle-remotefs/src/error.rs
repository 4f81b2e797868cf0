//! Typed errors, read from the tools' exit codes and stderr.
//!
//! ssh, scp and rsync report failures as text; the classification below
//! looks for the phrases OpenSSH and rsync print (with `LC_ALL=C`, which the
//! drivers set) and keeps the relevant lines as the detail.

use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid {what}: {reason}")]
    Invalid { what: String, reason: String },
    #[error("cannot reach {host}: {detail}")]
    Unreachable { host: String, detail: String },
    #[error("authentication to {host} failed: {detail}")]
    AuthenticationFailed { host: String, detail: String },
    #[error(
        "the host key of {host} is not in known_hosts and strict host-key checking is on: {detail}"
    )]
    HostKeyUnknown { host: String, detail: String },
    #[error(
        "the host key of {host} does not match known_hosts (a changed host, or someone in between): {detail}"
    )]
    HostKeyMismatch { host: String, detail: String },
    #[error("{host}: refused by the remote account's restricted command: {detail}")]
    Refused { host: String, detail: String },
    #[error("{place}: no such file or directory: {detail}")]
    NotFound { place: String, detail: String },
    #[error("{place}: permission denied: {detail}")]
    PermissionDenied { place: String, detail: String },
    #[error("{place}: no space left: {detail}")]
    NoSpace { place: String, detail: String },
    #[error("{place}: is a directory")]
    IsADirectory { place: String },
    #[error("{place}: not a directory: {detail}")]
    NotADirectory { place: String, detail: String },
    #[error("{place}: not a regular file ({kind})")]
    NotAFile { place: String, kind: String },
    #[error("{place}: already exists: {detail}")]
    AlreadyExists { place: String, detail: String },
    #[error("{place}: directory not empty: {detail}")]
    DirectoryNotEmpty { place: String, detail: String },
    /// The connection went away in the middle of the operation (sshd
    /// killed or restarted, the network cut): `tool`'s words in `detail`.
    /// The remote side keeps the destination as it was: uploads are
    /// written to a temporary name and renamed only when complete.
    #[error("{tool}: the connection to {host} was lost before {place} was done: {detail}")]
    ConnectionLost {
        tool: String,
        host: String,
        place: String,
        detail: String,
    },
    #[error("{op} timed out after {}s", after.as_secs_f64())]
    Timeout { op: String, after: Duration },
    #[error("{op} cancelled")]
    Cancelled { op: String },
    #[error("cannot run {tool}: {source}")]
    Spawn {
        tool: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: {source}", path.display())]
    Local {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{tool} failed ({status}): {detail}")]
    Failed {
        tool: String,
        status: String,
        detail: String,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What failed, for [`classify`]: the tool, the host, and the place an
/// error about a file should name (`host:path`).
pub(crate) struct Failure<'a> {
    pub tool: &'a str,
    pub host: &'a str,
    pub place: String,
    pub status: std::process::ExitStatus,
    pub stderr: &'a [u8],
}

/// Turn a failed run into a typed error. Connection-level failures are
/// checked first: an ssh that never logged in says so, whatever the
/// operation was.
pub(crate) fn classify(f: Failure<'_>) -> Error {
    let text = String::from_utf8_lossy(f.stderr);
    let lines: Vec<&str> = text
        .lines()
        .map(|l| l.trim_end_matches('\r').trim())
        .filter(|l| !l.is_empty())
        .collect();
    let find = |needle: &str| {
        lines
            .iter()
            .find(|l| l.contains(needle))
            .map(|l| l.to_string())
    };
    let host = f.host.to_string();

    if let Some(l) = find("REMOTE HOST IDENTIFICATION HAS CHANGED")
        .or_else(|| find("Host key for").filter(|l| l.contains("has changed")))
    {
        return Error::HostKeyMismatch { host, detail: l };
    }
    if let Some(l) = find("host key is known for").or_else(|| find("Host key verification failed"))
    {
        return Error::HostKeyUnknown { host, detail: l };
    }
    // "Permission denied (publickey)." is ssh's authentication failure;
    // rsync's "Permission denied (13)" is a file's.
    if let Some(l) = lines
        .iter()
        .find(|l| {
            l.split_once("Permission denied (")
                .is_some_and(|(_, rest)| rest.starts_with(|c: char| c.is_ascii_alphabetic()))
        })
        .map(|l| l.to_string())
        .or_else(|| find("Too many authentication failures"))
        .or_else(|| find("Load key"))
    {
        return Error::AuthenticationFailed { host, detail: l };
    }
    for needle in [
        "Connection refused",
        "No route to host",
        "Network is unreachable",
        "Could not resolve hostname",
        "Name or service not known",
        "Connection timed out",
        "Operation timed out",
        "kex_exchange_identification",
    ] {
        if let Some(l) = find(needle) {
            return Error::Unreachable { host, detail: l };
        }
    }
    for needle in [
        "rrsync error",
        "has been disabled on this server",
        "does not run rsync",
        "unsafe arg",
    ] {
        if let Some(l) = find(needle) {
            return Error::Refused { host, detail: l };
        }
    }
    let place = f.place;
    if let Some(l) = find("No space left on device").or_else(|| find("Disk quota exceeded")) {
        return Error::NoSpace { place, detail: l };
    }
    if let Some(l) = find("Permission denied").or_else(|| find("Operation not permitted")) {
        return Error::PermissionDenied { place, detail: l };
    }
    if let Some(l) = find("No such file or directory") {
        return Error::NotFound { place, detail: l };
    }
    if let Some(l) = find("Not a directory") {
        return Error::NotADirectory { place, detail: l };
    }
    if find("Is a directory").is_some() {
        return Error::IsADirectory { place };
    }
    if let Some(l) = find("File exists") {
        return Error::AlreadyExists { place, detail: l };
    }
    if let Some(l) = find("Directory not empty") {
        return Error::DirectoryNotEmpty { place, detail: l };
    }
    // A connection that went away. Checked last: a receiver that failed
    // for a reason named above (a full disk) also makes its sender see the
    // connection close.
    for needle in [
        "closed by remote host",
        "connection unexpectedly closed",
        "Connection closed",
        // Reset before the login is the kex line above (unreachable);
        // after it, it is a connection lost ("Read packet: ...").
        "Connection reset by peer",
        // scp's own, when its ssh went away.
        "lost connection",
        "Broken pipe",
    ] {
        if find(needle).is_some() {
            return Error::ConnectionLost {
                tool: f.tool.to_string(),
                host,
                place,
                detail: tail(&lines),
            };
        }
    }
    Error::Failed {
        tool: f.tool.to_string(),
        status: f.status.to_string(),
        detail: tail(&lines),
    }
}

/// The last few lines of stderr, for an error nothing else explains.
fn tail(lines: &[&str]) -> String {
    let start = lines.len().saturating_sub(4);
    let s = lines[start..].join(" | ");
    if s.is_empty() { "no message".into() } else { s }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt;

    fn c(stderr: &str) -> Error {
        classify(Failure {
            tool: "ssh",
            host: "h",
            place: "h:/p".into(),
            status: std::process::ExitStatus::from_raw(255 << 8),
            stderr: stderr.as_bytes(),
        })
    }

    /// The messages are the ones OpenSSH 9.2 and rsync 3.5 print.
    #[test]
    fn real_messages() {
        assert!(matches!(
            c("cradletest@127.0.0.1: Permission denied (publickey).\r\n"),
            Error::AuthenticationFailed { .. }
        ));
        assert!(matches!(
            c("ssh: connect to host 127.0.0.1 port 1: Connection refused\r\n"),
            Error::Unreachable { .. }
        ));
        assert!(matches!(
            c(
                "No ED25519 host key is known for [127.0.0.1]:2299 and you have requested strict checking.\r\nHost key verification failed.\r\n"
            ),
            Error::HostKeyUnknown { .. }
        ));
        assert!(matches!(
            c(
                "@@@@@\r\n@    WARNING: REMOTE HOST IDENTIFICATION HAS CHANGED!     @\r\nHost key verification failed.\r\n"
            ),
            Error::HostKeyMismatch { .. }
        ));
        assert!(matches!(
            c("rsync: [Receiver] mkdir \"/root/x\" failed: Permission denied (13)\n"),
            Error::PermissionDenied { .. }
        ));
        assert!(matches!(
            c(
                "rsync: [receiver] write failed on \"/f/big\": No space left on device (28)\nrsync: [sender] write error: Broken pipe (32)\n"
            ),
            Error::NoSpace { .. }
        ));
        assert!(matches!(
            c("/usr/bin/rrsync error: SSH_ORIGINAL_COMMAND does not run rsync\n"),
            Error::Refused { .. }
        ));
        assert!(matches!(
            c("rm: cannot remove '/x': No such file or directory\n"),
            Error::NotFound { .. }
        ));
        assert!(matches!(
            c("Connection to 127.0.0.1 closed by remote host.\r\n"),
            Error::ConnectionLost { .. }
        ));
        assert!(matches!(
            c(
                "rsync: connection unexpectedly closed (32768 bytes received so far) [sender]\nrsync error: error in rsync protocol data stream (code 12) at io.c(232) [sender=3.2.7]\n"
            ),
            Error::ConnectionLost { .. }
        ));
        assert!(matches!(
            c("lost connection\n"),
            Error::ConnectionLost { .. }
        ));
        assert!(matches!(
            c("scp: Read packet: Connection reset by peer\r\n"),
            Error::ConnectionLost { .. }
        ));
        assert!(matches!(
            c("kex_exchange_identification: read: Connection reset by peer\r\n"),
            Error::Unreachable { .. }
        ));
        assert!(matches!(c("something odd\n"), Error::Failed { .. }));
    }
}
