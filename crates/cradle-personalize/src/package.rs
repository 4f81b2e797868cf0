//! Reading and verifying a personalization package (`.tar.gz`) completely,
//! before anything is written anywhere.
//!
//! The archive is read through two counters, one on the compressed bytes and
//! one on what gzip hands to tar, so the caps on compressed size,
//! uncompressed size and their ratio hold while the stream is read, not after
//! a bomb has gone off. Every entry is checked on its own (kind, path, mode)
//! and against the entries before it (a path through an earlier symlink, a
//! hardlink to something that is not an earlier file of the package, the
//! same path twice).

use std::collections::{HashMap, HashSet};
use std::io::{self, Read};
use std::path::Path;

use crate::{Control, Error, Phase};

/// Caps on what a package may hold.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Largest package as downloaded (gzip), in bytes.
    pub max_compressed: u64,
    /// Largest tar stream once decompressed, in bytes.
    pub max_uncompressed: u64,
    pub max_entries: u64,
    /// Largest ratio of decompressed to compressed bytes, checked once the
    /// stream is past 1 MiB.
    pub max_ratio: u64,
    /// Allow setuid and setgid bits.
    pub allow_setid: bool,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_compressed: 256 << 20,
            max_uncompressed: 4 << 30,
            max_entries: 100_000,
            max_ratio: 100,
            allow_setid: false,
        }
    }
}

/// What an entry makes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Kind {
    Dir,
    File {
        size: u64,
    },
    Symlink {
        target: String,
    },
    /// A hard link to an earlier regular file of the package.
    Hardlink {
        target: String,
    },
}

/// One verified entry. `path` is relative and normal: components joined by
/// `/`, none empty, `.` or `..`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub path: String,
    pub kind: Kind,
    /// Permission bits, including setuid, setgid and sticky.
    pub mode: u32,
    pub uid: u64,
    pub gid: u64,
    pub mtime: u64,
}

/// A package that passed every check: its entries in archive order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Manifest {
    pub entries: Vec<Entry>,
    pub compressed_bytes: u64,
    pub uncompressed_bytes: u64,
}

/// Counts bytes through a reader and stops at a cap.
struct Counted<R> {
    inner: R,
    count: u64,
    cap: u64,
    what: &'static str,
}

impl<R: Read> Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count += n as u64;
        if self.count > self.cap {
            return Err(io::Error::other(LimitHit(self.what, self.cap)));
        }
        Ok(n)
    }
}

#[derive(Debug)]
struct LimitHit(&'static str, u64);

impl std::fmt::Display for LimitHit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} over {} bytes", self.0, self.1)
    }
}

impl std::error::Error for LimitHit {}

/// Read `package` (a `.tar.gz` file) to the end and check every entry.
/// Nothing is written. The same function drives [`crate::apply`], which
/// hands `visit` each entry's reader after the whole package has passed.
pub fn verify(package: &Path, limits: &Limits) -> Result<Manifest, Error> {
    verify_with(package, limits, &Control::default())
}

/// [`verify`], reporting progress and honouring cancellation.
pub fn verify_with(package: &Path, limits: &Limits, control: &Control) -> Result<Manifest, Error> {
    walk(package, limits, Phase::Verify, control, |_, _| Ok(()))
}

/// Read the package, checking as [`verify`] does, and call `visit` with
/// each entry and its data. Progress is reported as package bytes read, in
/// `phase`; cancellation is checked between entries unless `phase` is
/// [`Phase::Write`].
pub(crate) fn walk(
    package: &Path,
    limits: &Limits,
    phase: Phase,
    control: &Control,
    mut visit: impl FnMut(&Entry, &mut dyn Read) -> Result<(), Error>,
) -> Result<Manifest, Error> {
    let file = std::fs::File::open(package).map_err(|source| Error::Io {
        what: format!("cannot open {}", package.display()),
        source,
    })?;
    let total = file.metadata().map(|m| m.len()).unwrap_or(0);
    let tick = |compressed: &std::rc::Rc<std::cell::RefCell<Counted<std::fs::File>>>| {
        control.report(phase, compressed.borrow().count.min(total), total);
        if phase == Phase::Write {
            Ok(())
        } else {
            control.check()
        }
    };
    let compressed = Counted {
        inner: file,
        count: 0,
        cap: limits.max_compressed,
        what: "the compressed package",
    };
    // Share the compressed count with the ratio check below.
    let compressed = std::rc::Rc::new(std::cell::RefCell::new(compressed));
    let reader = SharedReader(compressed.clone());
    let gz = flate2::read::GzDecoder::new(reader);
    let mut ratio_guard = RatioGuard {
        inner: gz,
        count: 0,
        cap: limits.max_uncompressed,
        ratio: limits.max_ratio,
        compressed: compressed.clone(),
    };
    // Reject something that is not gzip at all with that name.
    let mut archive = tar::Archive::new(&mut ratio_guard);
    let mut manifest = Manifest::default();
    let mut seen: HashMap<String, Kind> = HashMap::new();
    let mut symlinks: HashSet<String> = HashSet::new();
    let entries = archive.entries().map_err(stream_error)?;
    for entry in entries {
        tick(&compressed)?;
        let mut entry = entry.map_err(stream_error)?;
        if manifest.entries.len() as u64 >= limits.max_entries {
            return Err(Error::Limit(format!(
                "more than {} entries",
                limits.max_entries
            )));
        }
        let Some(e) = check_entry(&entry, limits, &seen, &symlinks)? else {
            // The root directory itself (`./`, which `tar -C dir .` writes):
            // the target's own root is left as it is.
            io::copy(&mut entry, &mut io::sink()).map_err(stream_error)?;
            continue;
        };
        if let Kind::Symlink { .. } = e.kind {
            symlinks.insert(e.path.clone());
        }
        visit(&e, &mut entry)?;
        // Drain what visit did not read, through the counters.
        io::copy(&mut entry, &mut io::sink()).map_err(stream_error)?;
        // Its parents are directories from here on, listed or not: a
        // later file, symlink or hardlink there could only be written by
        // replacing the directory, after what is in it had been written.
        let mut at = 0;
        while let Some(i) = e.path[at..].find('/') {
            at += i;
            seen.entry(e.path[..at].to_string()).or_insert(Kind::Dir);
            at += 1;
        }
        seen.insert(e.path.clone(), e.kind.clone());
        manifest.entries.push(e);
    }
    // The gzip trailer (its CRC and length) is checked only at the end:
    // read to it, so a truncated or corrupt stream is refused.
    io::copy(&mut ratio_guard, &mut io::sink()).map_err(stream_error)?;
    manifest.uncompressed_bytes = ratio_guard.count;
    manifest.compressed_bytes = compressed.borrow().count;
    control.report(phase, total, total);
    Ok(manifest)
}

struct SharedReader<R>(std::rc::Rc<std::cell::RefCell<Counted<R>>>);

impl<R: Read> Read for SharedReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.borrow_mut().read(buf)
    }
}

/// Counts decompressed bytes; stops at the cap and at the ratio.
struct RatioGuard<R, C> {
    inner: R,
    count: u64,
    cap: u64,
    ratio: u64,
    compressed: std::rc::Rc<std::cell::RefCell<Counted<C>>>,
}

impl<R: Read, C> Read for RatioGuard<R, C> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count += n as u64;
        if self.count > self.cap {
            return Err(io::Error::other(LimitHit(
                "the decompressed package",
                self.cap,
            )));
        }
        let c = self.compressed.borrow().count.max(1);
        if self.count > 1 << 20 && self.count / c > self.ratio {
            return Err(io::Error::other(RatioHit(self.ratio)));
        }
        Ok(n)
    }
}

#[derive(Debug)]
struct RatioHit(u64);

impl std::fmt::Display for RatioHit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "decompresses to more than {} times its size (a gzip bomb?)",
            self.0
        )
    }
}

impl std::error::Error for RatioHit {}

/// Turn a read error into the error that says what was wrong with the
/// stream: a cap, not gzip, truncated, or not tar.
fn stream_error(e: io::Error) -> Error {
    if let Some(inner) = e.get_ref() {
        if let Some(l) = inner.downcast_ref::<LimitHit>() {
            return Error::Limit(l.to_string());
        }
        if let Some(r) = inner.downcast_ref::<RatioHit>() {
            return Error::Limit(r.to_string());
        }
    }
    let msg = e.to_string();
    if msg.contains("invalid gzip header") {
        Error::Format("not a gzip stream".into())
    } else if e.kind() == io::ErrorKind::UnexpectedEof || msg.contains("unexpected end") {
        Error::Format(format!("truncated: {msg}"))
    } else if msg.contains("corrupt deflate") || msg.contains("invalid") {
        Error::Format(format!("corrupt gzip stream: {msg}"))
    } else {
        Error::Format(format!("not a readable tar stream: {msg}"))
    }
}

/// One entry's checks: kind, path, mode, and its relation to the entries
/// before it.
fn check_entry<R: Read>(
    entry: &tar::Entry<'_, R>,
    limits: &Limits,
    seen: &HashMap<String, Kind>,
    symlinks: &HashSet<String>,
) -> Result<Option<Entry>, Error> {
    let raw = entry.path_bytes();
    let shown = String::from_utf8_lossy(&raw).escape_debug().to_string();
    let refuse = |reason: String| Error::Refused {
        entry: shown.clone(),
        reason,
    };
    let header = entry.header();
    if header.entry_type() == tar::EntryType::Directory && is_root(&raw) {
        return Ok(None);
    }
    let path = normal_path(&raw).map_err(|r| refuse(r.into()))?;
    let mode = header
        .mode()
        .map_err(|e| refuse(format!("bad mode: {e}")))?
        & 0o7777;
    if mode & 0o6000 != 0 && !limits.allow_setid {
        return Err(refuse(format!(
            "setuid or setgid bit (mode {mode:04o}); allowed only with allow_setid"
        )));
    }
    // No component of the path may be a symlink from earlier in the package.
    let mut prefix = String::new();
    for c in path.split('/') {
        if !prefix.is_empty() && symlinks.contains(&prefix) {
            return Err(refuse(format!(
                "its path goes through {prefix:?}, a symlink earlier in the package"
            )));
        }
        if !prefix.is_empty() && matches!(seen.get(&prefix), Some(k) if *k != Kind::Dir) {
            return Err(refuse(format!(
                "its path goes through {prefix:?}, which is not a directory in the package"
            )));
        }
        if !prefix.is_empty() {
            prefix.push('/');
        }
        prefix.push_str(c);
    }
    let et = header.entry_type();
    let kind = match et {
        tar::EntryType::Directory => Kind::Dir,
        tar::EntryType::Regular | tar::EntryType::Continuous => Kind::File {
            size: header
                .size()
                .map_err(|e| refuse(format!("bad size: {e}")))?,
        },
        tar::EntryType::Symlink => {
            let t = entry
                .link_name_bytes()
                .ok_or_else(|| refuse("a symlink without a target".into()))?;
            let t = std::str::from_utf8(&t)
                .map_err(|_| refuse("its symlink target is not UTF-8".into()))?;
            if t.is_empty() || t.contains('\0') || t.chars().any(char::is_control) {
                return Err(refuse(
                    "its symlink target is empty or has control characters".into(),
                ));
            }
            Kind::Symlink {
                target: t.to_string(),
            }
        }
        tar::EntryType::Link => {
            let t = entry
                .link_name_bytes()
                .ok_or_else(|| refuse("a hardlink without a target".into()))?;
            let t = normal_path(&t).map_err(|r| refuse(format!("its hardlink target: {r}")))?;
            match seen.get(&t) {
                Some(Kind::File { .. }) => Kind::Hardlink { target: t },
                _ => {
                    return Err(refuse(format!(
                        "a hardlink to {t:?}, which is not an earlier regular file of the package"
                    )));
                }
            }
        }
        tar::EntryType::Char | tar::EntryType::Block => {
            return Err(refuse("a device node".into()));
        }
        tar::EntryType::Fifo => return Err(refuse("a FIFO".into())),
        other => return Err(refuse(format!("an entry of type {other:?}"))),
    };
    match (seen.get(&path), &kind) {
        (None, _) | (Some(Kind::Dir), Kind::Dir) => {}
        (Some(Kind::Dir), _) => {
            return Err(refuse(
                "a directory earlier in the package (listed, or the parent of an earlier entry)"
                    .into(),
            ));
        }
        (Some(_), _) => return Err(refuse("the same path twice in the package".into())),
    }
    Ok(Some(Entry {
        path,
        kind,
        mode,
        uid: header.uid().map_err(|e| refuse(format!("bad uid: {e}")))?,
        gid: header.gid().map_err(|e| refuse(format!("bad gid: {e}")))?,
        mtime: header.mtime().unwrap_or(0),
    }))
}

/// `.`, `./` and the like: the archive's root directory.
fn is_root(raw: &[u8]) -> bool {
    !raw.is_empty()
        && !raw.starts_with(b"/")
        && raw.split(|&b| b == b'/').all(|c| c.is_empty() || c == b".")
}

/// A package path as the relative, normal path it names, or why not.
/// `./` prefixes and a trailing `/` are accepted (tar writes them).
fn normal_path(raw: &[u8]) -> Result<String, &'static str> {
    let s = std::str::from_utf8(raw).map_err(|_| "its name is not UTF-8")?;
    if s.starts_with('/') {
        return Err("an absolute path");
    }
    if s.chars().any(char::is_control) {
        return Err("a control character (such as a newline) in its name");
    }
    let mut parts = Vec::new();
    for c in s.split('/') {
        match c {
            "" | "." => {}
            ".." => return Err("a '..' component"),
            c => parts.push(c),
        }
    }
    if parts.is_empty() {
        return Err("an empty path");
    }
    Ok(parts.join("/"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths() {
        assert_eq!(normal_path(b"./etc/motd"), Ok("etc/motd".into()));
        assert_eq!(normal_path(b"etc/"), Ok("etc".into()));
        assert!(normal_path(b"/etc").is_err());
        assert!(normal_path(b"a/../../b").is_err());
        assert!(normal_path(b"./").is_err());
        assert!(normal_path(b"a\nb").is_err());
        assert!(normal_path(b"\xff").is_err());
    }
}
