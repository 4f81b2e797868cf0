//! Where an operation goes: a [`Host`] (with an optional user) and a
//! [`RemotePath`] on it, both validated before any process starts.

use std::ffi::{OsStr, OsString};
use std::fmt;
use std::net::{IpAddr, Ipv6Addr};
use std::os::unix::ffi::{OsStrExt, OsStringExt};

use crate::Error;

/// A remote host: a DNS name, an IPv4 address or an IPv6 address (given bare
/// or in brackets), with an optional login user that overrides the
/// configured one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Host {
    name: String,
    user: Option<String>,
}

impl Host {
    /// Parse `[user@]name`. Names that could be read as an option (a leading
    /// `-`) or that hold anything but letters, digits, `-`, `.` and (for
    /// IPv6) `:` are refused.
    pub fn parse(s: &str) -> Result<Host, Error> {
        let (user, name) = match s.rsplit_once('@') {
            Some((u, n)) => (Some(u), n),
            None => (None, s),
        };
        if let Some(u) = user {
            check_user(u)?;
        }
        let name = match name.strip_prefix('[') {
            Some(rest) => {
                let inner = rest
                    .strip_suffix(']')
                    .ok_or_else(|| bad_host(s, "unclosed ["))?;
                inner
                    .parse::<Ipv6Addr>()
                    .map_err(|_| bad_host(s, "only an IPv6 address goes in brackets"))?;
                inner
            }
            None => name,
        };
        if name.is_empty() {
            return Err(bad_host(s, "empty host name"));
        }
        if name.parse::<IpAddr>().is_err() {
            let ok = name.len() <= 253
                && name.split('.').all(|label| {
                    !label.is_empty()
                        && label.len() <= 63
                        && !label.starts_with('-')
                        && !label.ends_with('-')
                        && label
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                });
            if !ok {
                return Err(bad_host(
                    s,
                    "expected a DNS name (letters, digits, '-' and '.'), an IPv4 address or an IPv6 address",
                ));
            }
        }
        Ok(Host {
            name: name.to_string(),
            user: user.map(str::to_string),
        })
    }

    /// The name as ssh takes it (IPv6 without brackets).
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn user(&self) -> Option<&str> {
        self.user.as_deref()
    }

    pub fn is_ipv6(&self) -> bool {
        self.name.parse::<Ipv6Addr>().is_ok()
    }

    /// The host as it goes before `:path` in scp and rsync arguments:
    /// IPv6 addresses in brackets, so their colons are not read as the
    /// separator.
    pub(crate) fn for_spec(&self) -> String {
        if self.is_ipv6() {
            format!("[{}]", self.name)
        } else {
            self.name.clone()
        }
    }
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(u) = &self.user {
            write!(f, "{u}@")?;
        }
        f.write_str(&self.for_spec())
    }
}

impl std::str::FromStr for Host {
    type Err = Error;
    fn from_str(s: &str) -> Result<Host, Error> {
        Host::parse(s)
    }
}

/// A login name: what `useradd` accepts, and never an option.
pub(crate) fn check_user(u: &str) -> Result<(), Error> {
    let ok = !u.is_empty()
        && u.len() <= 32
        && !u.starts_with('-')
        && u.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(Error::Invalid {
            what: "user".into(),
            reason: format!(
                "{u:?}: expected letters, digits, '_', '-' and '.', not starting with '-'"
            ),
        })
    }
}

fn bad_host(s: &str, reason: &str) -> Error {
    Error::Invalid {
        what: "host".into(),
        reason: format!("{s:?}: {reason}"),
    }
}

/// A path on the remote host, as bytes: any name the remote filesystem can
/// hold (spaces, quotes, `$()`, newlines, a leading `-`, bytes that are not
/// UTF-8) arrives there exactly.
///
/// It must be normal: not empty, no NUL, no empty, `.` or `..` component,
/// no trailing `/`, and not `/` itself. A relative path is relative to the
/// remote user's home directory (under rrsync, to its directory).
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct RemotePath(Vec<u8>);

impl RemotePath {
    pub fn new(p: impl Into<OsString>) -> Result<RemotePath, Error> {
        let bytes = p.into().into_vec();
        let bad = |reason: &str| Error::Invalid {
            what: "remote path".into(),
            reason: format!(
                "{}: {reason}",
                String::from_utf8_lossy(&bytes).escape_debug()
            ),
        };
        if bytes.is_empty() {
            return Err(bad("empty"));
        }
        if bytes.contains(&0) {
            return Err(bad("contains a NUL byte"));
        }
        if bytes == b"/" {
            return Err(bad("the root directory is not an operand"));
        }
        let rel = bytes.strip_prefix(b"/").unwrap_or(&bytes);
        for c in rel.split(|&b| b == b'/') {
            match c {
                b"" => return Err(bad("empty component (// or a trailing /)")),
                b"." | b".." => {
                    return Err(bad(
                        "'.' and '..' components are not allowed; give a normal path",
                    ));
                }
                _ => {}
            }
        }
        Ok(RemotePath(bytes))
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    pub fn as_os_str(&self) -> &OsStr {
        OsStr::from_bytes(&self.0)
    }

    pub fn is_absolute(&self) -> bool {
        self.0.starts_with(b"/")
    }

    /// The components, without the leading `/`.
    pub fn components(&self) -> impl Iterator<Item = &[u8]> {
        let rel = self.0.strip_prefix(b"/").unwrap_or(&self.0);
        rel.split(|&b| b == b'/')
    }

    /// The last component.
    pub fn file_name(&self) -> &[u8] {
        self.components()
            .last()
            .expect("a normal path has a component")
    }

    /// The path as a remote tool should see it: relative paths start with
    /// `./`, so that none can be read as an option (`-x`), a home directory
    /// (`~x`) or a host (`a:b`).
    pub(crate) fn for_tool(&self) -> Vec<u8> {
        if self.is_absolute() {
            self.0.clone()
        } else {
            [b"./".as_slice(), &self.0].concat()
        }
    }
}

impl fmt::Debug for RemotePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", String::from_utf8_lossy(&self.0))
    }
}

impl fmt::Display for RemotePath {
    /// Lossy and escaped (a newline shows as `\n`): for messages only.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", String::from_utf8_lossy(&self.0).escape_debug())
    }
}

/// A `[user@]host:path` operand, as on scp's command line. The host part is
/// what [`Host::parse`] takes (IPv6 in brackets); the path is any bytes.
/// Returns `None` when the operand is local: it has no `:` before its first
/// `/` (write `./a:b` for a local file named `a:b`).
pub fn parse_remote_operand(s: &OsStr) -> Option<Result<(Host, RemotePath), Error>> {
    let b = s.as_bytes();
    if b.starts_with(b"/") || b.starts_with(b"./") || b.starts_with(b"../") {
        return None;
    }
    // The separator is the first ':' outside brackets, before any '/'.
    let mut depth = 0;
    let mut sep = None;
    for (i, &c) in b.iter().enumerate() {
        match c {
            b'[' => depth += 1,
            b']' if depth > 0 => depth -= 1,
            b'/' if depth == 0 => return None,
            b':' if depth == 0 => {
                sep = Some(i);
                break;
            }
            _ => {}
        }
    }
    let sep = sep?;
    let host = match std::str::from_utf8(&b[..sep]) {
        Ok(h) => h,
        Err(_) => {
            return Some(Err(Error::Invalid {
                what: "host".into(),
                reason: "not UTF-8".into(),
            }));
        }
    };
    Some(
        Host::parse(host)
            .and_then(|h| RemotePath::new(OsStr::from_bytes(&b[sep + 1..])).map(|p| (h, p))),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts() {
        for ok in [
            "a",
            "a.b-c.example",
            "10.0.0.1",
            "::1",
            "[fe80::1]",
            "u@h",
            "u.x_y@[::1]",
        ] {
            Host::parse(ok).unwrap();
        }
        for bad in [
            "",
            "-oProxyCommand=x",
            "a b",
            "a;b",
            "[10.0.0.1]",
            "[::1",
            "-u@h",
            "a..b",
            "h:",
        ] {
            assert!(Host::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(Host::parse("[::1]").unwrap().for_spec(), "[::1]");
        assert_eq!(Host::parse("::1").unwrap().name(), "::1");
    }

    #[test]
    fn paths() {
        for ok in ["/a", "a", "-x", "/a b/$(x)/`y`;*", "~q", "/a\nb"] {
            RemotePath::new(ok).unwrap();
        }
        RemotePath::new(OsStr::from_bytes(b"/\xff\xfe")).unwrap();
        for bad in [
            "", "/", "a/", "//a", "a//b", "a/./b", "../a", "/a/..", "a\0b",
        ] {
            assert!(RemotePath::new(bad).is_err(), "{bad:?}");
        }
        assert_eq!(RemotePath::new("-x").unwrap().for_tool(), b"./-x");
        assert_eq!(RemotePath::new("/a/b").unwrap().file_name(), b"b");
    }

    #[test]
    fn operands() {
        let r = |s: &str| parse_remote_operand(OsStr::new(s));
        assert!(r("/local/a:b").is_none());
        assert!(r("./a:b").is_none());
        assert!(r("dir/a:b").is_none());
        assert!(r("file").is_none());
        let (h, p) = r("u@[::1]:/x:y").unwrap().unwrap();
        assert_eq!(
            (h.name(), h.user(), p.as_bytes()),
            ("::1", Some("u"), b"/x:y".as_slice())
        );
        let (h, p) = r("host:rel path").unwrap().unwrap();
        assert_eq!((h.name(), p.as_bytes()), ("host", b"rel path".as_slice()));
        assert!(r("bad host:/x").unwrap().is_err());
    }
}
