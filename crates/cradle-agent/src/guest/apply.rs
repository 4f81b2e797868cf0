//! What the agent applies from the instance's metadata
//! (`/cradle/latest/meta_data.json`): the hostname, and the instance's SSH
//! keys as the configured user's `~/.ssh/authorized_keys`. Each is written
//! only when it differs, to a temporary name renamed into place, so a
//! crash leaves the old file or the new, never half of one.
//!
//! The agent owns the whole authorized_keys file of that user: keys the
//! operator removes from the instance are removed from the guest.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// The part of `meta_data.json` the agent reads.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct Meta {
    #[serde(default)]
    pub hostname: String,
    #[serde(default)]
    pub public_keys: BTreeMap<String, String>,
}

/// The first line of every authorized_keys the agent writes.
pub const HEADER: &str =
    "# Written by cradle-agent from the instance's metadata; changes here are replaced.\n";

/// The authorized_keys file for `keys`: the header, then one key a line,
/// in the order of their names.
pub fn authorized_keys(keys: &BTreeMap<String, String>) -> String {
    let mut s = String::from(HEADER);
    for key in keys.values() {
        let key = key.trim();
        if key.is_empty() || key.contains('\n') {
            continue;
        }
        s.push_str(key);
        s.push('\n');
    }
    s
}

/// A user of `/etc/passwd`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub uid: u32,
    pub gid: u32,
    pub home: PathBuf,
}

/// `name`'s entry in the passwd file `text`.
pub fn find_user(text: &str, name: &str) -> Option<User> {
    text.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.len() >= 7 && f[0] == name).then(|| {
            Some(User {
                uid: f[2].parse().ok()?,
                gid: f[3].parse().ok()?,
                home: PathBuf::from(f[5]),
            })
        })?
    })
}

/// Write `content` to `path` (mode `mode`, owned by `owner`) through a
/// temporary name in the same directory, unless it already holds exactly
/// that. Returns whether it wrote.
pub fn write_if_changed(
    path: &Path,
    content: &[u8],
    mode: u32,
    owner: Option<(u32, u32)>,
) -> Result<bool, String> {
    if std::fs::read(path).is_ok_and(|old| old == content) {
        return Ok(false);
    }
    let dir = path.parent().unwrap_or(Path::new("/"));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.cradle-agent.tmp"));
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(content)?;
        f.set_permissions(std::fs::Permissions::from_mode(mode))?;
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::fchown(&f, Some(uid), Some(gid))?;
        }
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        format!("cannot write {}: {e}", path.display())
    })?;
    Ok(true)
}

/// Make `user`'s `~/.ssh/authorized_keys` hold `keys`. Returns whether it
/// changed.
pub fn apply_keys(
    passwd: &Path,
    user: &str,
    keys: &BTreeMap<String, String>,
) -> Result<bool, String> {
    let text = std::fs::read_to_string(passwd)
        .map_err(|e| format!("cannot read {}: {e}", passwd.display()))?;
    let u = find_user(&text, user)
        .ok_or_else(|| format!("no user {user:?} in {}", passwd.display()))?;
    let ssh = u.home.join(".ssh");
    if !ssh.is_dir() {
        std::fs::create_dir_all(&ssh).map_err(|e| format!("cannot make {}: {e}", ssh.display()))?;
        std::fs::set_permissions(&ssh, std::fs::Permissions::from_mode(0o700))
            .and_then(|()| std::os::unix::fs::chown(&ssh, Some(u.uid), Some(u.gid)))
            .map_err(|e| format!("cannot give {} to {user}: {e}", ssh.display()))?;
    }
    write_if_changed(
        &ssh.join("authorized_keys"),
        authorized_keys(keys).as_bytes(),
        0o600,
        Some((u.uid, u.gid)),
    )
}

/// Set the hostname (the kernel's, and `/etc/hostname` under `root`).
/// Returns whether it changed.
pub fn apply_hostname(root: &Path, name: &str) -> Result<bool, String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
    if !ok {
        return Err(format!("{name:?} is not a hostname"));
    }
    let wrote = write_if_changed(
        &root.join("etc/hostname"),
        format!("{name}\n").as_bytes(),
        0o644,
        None,
    )?;
    let current = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    if root == Path::new("/") && current.trim() != name {
        // SAFETY: a pointer and length of a live byte string.
        let rc = unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) };
        if rc != 0 {
            return Err(format!(
                "cannot set the hostname to {name}: {}",
                std::io::Error::last_os_error()
            ));
        }
        return Ok(true);
    }
    Ok(wrote)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_written_in_name_order_under_the_header() {
        let keys = BTreeMap::from([
            ("bob".to_string(), "ssh-ed25519 BBBB bob\n".to_string()),
            ("alice".to_string(), "ssh-ed25519 AAAA alice".to_string()),
            ("evil".to_string(), "ssh-ed25519 X\nssh-rsa Y".to_string()),
        ]);
        assert_eq!(
            authorized_keys(&keys),
            format!("{HEADER}ssh-ed25519 AAAA alice\nssh-ed25519 BBBB bob\n")
        );
    }

    #[test]
    fn users_are_found_in_passwd() {
        let p = "root:x:0:0:root:/root:/bin/bash\ndebian:x:1000:1000:,,,:/home/debian:/bin/sh\n";
        assert_eq!(
            find_user(p, "debian"),
            Some(User {
                uid: 1000,
                gid: 1000,
                home: PathBuf::from("/home/debian")
            })
        );
        assert_eq!(find_user(p, "deb"), None);
        assert_eq!(find_user("x:x:notanumber:0::/:/bin/sh", "x"), None);
    }

    #[test]
    fn files_are_written_once_and_replaced_whole() {
        let dir = tempfile::tempdir().unwrap();
        let home = dir.path().join("home/me");
        std::fs::create_dir_all(&home).unwrap();
        let passwd = dir.path().join("passwd");
        let (uid, gid) = (unsafe { libc::getuid() }, unsafe { libc::getgid() });
        std::fs::write(
            &passwd,
            format!("me:x:{uid}:{gid}::{}:/bin/sh\n", home.display()),
        )
        .unwrap();
        let keys = BTreeMap::from([("a".to_string(), "ssh-ed25519 AAAA a".to_string())]);
        assert!(apply_keys(&passwd, "me", &keys).unwrap());
        assert!(
            !apply_keys(&passwd, "me", &keys).unwrap(),
            "unchanged: not written"
        );
        let f = home.join(".ssh/authorized_keys");
        let meta = std::fs::metadata(&f).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        let dmode = std::fs::metadata(home.join(".ssh"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(dmode & 0o777, 0o700);
        assert!(apply_keys(&passwd, "me", &BTreeMap::new()).unwrap());
        assert_eq!(std::fs::read_to_string(&f).unwrap(), HEADER);
        let leftovers: Vec<_> = std::fs::read_dir(home.join(".ssh")).unwrap().collect();
        assert_eq!(leftovers.len(), 1, "no temporary file is left");
        let e = apply_keys(&passwd, "nobody", &keys).unwrap_err();
        assert!(e.contains("no user \"nobody\""), "{e}");
    }

    #[test]
    fn hostnames_are_checked_and_written_under_a_root() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("etc")).unwrap();
        assert!(apply_hostname(dir.path(), "web1").unwrap());
        assert!(!apply_hostname(dir.path(), "web1").unwrap());
        assert_eq!(
            std::fs::read_to_string(dir.path().join("etc/hostname")).unwrap(),
            "web1\n"
        );
        assert!(
            apply_hostname(dir.path(), "a b")
                .unwrap_err()
                .contains("not a hostname")
        );
    }
}
