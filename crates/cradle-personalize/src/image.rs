//! Overlaying a verified package onto an ext2/3/4 filesystem in a raw disk
//! image, in user space: no mount, no root, no kernel filesystem code on
//! untrusted metadata. e2fsprogs' `debugfs -w` does the writing, driven by
//! a command file; the filesystem is the whole image or a partition found
//! in its MBR or GPT.
//!
//! Only ext2, ext3 and ext4 are supported here (checked by the superblock's
//! magic); other filesystems go through the install appliance.
//!
//! The order is the directory overlay's: verify the package, look up every
//! entry's path in the image (`ls -p` of each directory involved) and refuse
//! a symlink in the way or a kind conflict, then write. File data is
//! unpacked to a private temporary directory on the host for `debugfs
//! write` and removed when done, whatever happens. debugfs exits 0 even
//! when a command fails; any message on its standard error (after its
//! version banner) is an error.
//!
//! debugfs changes a filesystem one block at a time, with no journal: if it
//! stops halfway (killed, out of memory, a command it refuses after others
//! took) the filesystem is inconsistent yet still marked clean, and a guest
//! would mount it. So an image that is a regular file is never written in
//! place: debugfs writes a copy beside it (`cp --sparse=always
//! --reflink=auto`: holes stay holes, and on btrfs or XFS no block is
//! copied at all), which is flushed and renamed over the image only when
//! debugfs took every command. Any failure leaves the image byte for byte
//! as it was and removes the copy ([`Error::Debugfs`] says `unchanged`).
//! The cost is room for a second copy of the image's data while writing,
//! and a new inode (hard links to the image keep the old content). A block
//! device cannot be copied and renamed; it is written in place, and after a
//! failure it must be made again from its source.

use std::collections::{BTreeSet, HashMap};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::package::walk;
use crate::{Control, Error, Kind, Limits, Manifest, Phase};

/// Where the filesystem starts in the image: partition `n` (1-based) of its
/// MBR or GPT, or the whole image.
pub fn filesystem_offset(image: &Path, partition: Option<u32>) -> Result<u64, Error> {
    let mut f = std::fs::File::open(image).map_err(|source| Error::Io {
        what: format!("cannot open {}", image.display()),
        source,
    })?;
    let Some(n) = partition else { return Ok(0) };
    let bad = |reason: String| Error::Target {
        entry: String::new(),
        reason: format!("{}: {reason}", image.display()),
    };
    if n == 0 {
        return Err(bad("partitions are numbered from 1".into()));
    }
    let mut mbr = [0u8; 512];
    read_at(&mut f, 0, &mut mbr).map_err(|_| bad("too small for a partition table".into()))?;
    if mbr[510..512] != [0x55, 0xAA] {
        return Err(bad("no MBR or GPT partition table".into()));
    }
    let entry = |i: usize| &mbr[446 + 16 * i..446 + 16 * (i + 1)];
    if entry(0)[4] == 0xEE {
        let mut hdr = [0u8; 92];
        read_at(&mut f, 512, &mut hdr).map_err(|_| bad("truncated GPT header".into()))?;
        if &hdr[0..8] != b"EFI PART" {
            return Err(bad("protective MBR without a GPT header".into()));
        }
        let lba = u64::from_le_bytes(hdr[72..80].try_into().unwrap());
        let count = u32::from_le_bytes(hdr[80..84].try_into().unwrap());
        let size = u32::from_le_bytes(hdr[84..88].try_into().unwrap()) as u64;
        if n > count || size < 128 {
            return Err(bad(format!("no partition {n} in its GPT")));
        }
        let mut e = vec![0u8; size as usize];
        read_at(&mut f, lba * 512 + (n as u64 - 1) * size, &mut e)
            .map_err(|_| bad("truncated GPT entries".into()))?;
        if e[0..16].iter().all(|&b| b == 0) {
            return Err(bad(format!("GPT partition {n} is unused")));
        }
        return Ok(u64::from_le_bytes(e[32..40].try_into().unwrap()) * 512);
    }
    if n > 4 {
        return Err(bad(format!(
            "no partition {n} (only MBR primary partitions 1-4)"
        )));
    }
    let e = entry(n as usize - 1);
    let start = u32::from_le_bytes(e[8..12].try_into().unwrap()) as u64;
    if e[4] == 0 || start == 0 {
        return Err(bad(format!("MBR partition {n} is unused")));
    }
    Ok(start * 512)
}

fn read_at(f: &mut std::fs::File, at: u64, buf: &mut [u8]) -> std::io::Result<()> {
    f.seek(SeekFrom::Start(at))?;
    f.read_exact(buf)
}

/// debugfs's name for the ext2/3/4 filesystem at partition `partition` of
/// `image` (`IMAGE?offset=N`), refused when there is none.
fn ext_device(image: &Path, partition: Option<u32>) -> Result<String, Error> {
    let offset = filesystem_offset(image, partition)?;
    let mut magic = [0u8; 2];
    let mut f = std::fs::File::open(image).map_err(|source| Error::Io {
        what: format!("cannot open {}", image.display()),
        source,
    })?;
    if read_at(&mut f, offset + 1024 + 56, &mut magic).is_err() || magic != [0x53, 0xEF] {
        return Err(Error::Target {
            entry: String::new(),
            reason: format!(
                "{} has no ext2/3/4 filesystem at byte {offset}; other filesystems are \
                 personalized inside the install appliance",
                image.display()
            ),
        });
    }
    Ok(format!("{}?offset={offset}", image.display()))
}

/// What an image holds at a path, read back with debugfs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    /// The whole `st_mode`: type and permission bits.
    pub mode: u32,
    pub uid: u64,
    pub gid: u64,
    /// A file's bytes, or a symlink's target.
    pub content: Vec<u8>,
}

/// The regular file or symlink at `path` (relative, `/`-separated) of the
/// ext filesystem at partition `partition` of `image`; `None` when there
/// is nothing there. Nothing is written.
pub fn read_back(image: &Path, partition: Option<u32>, path: &str) -> Result<Option<Found>, Error> {
    let dev = ext_device(image, partition)?;
    let run = |request: String| -> Result<(Vec<u8>, String), Error> {
        let out = debugfs()
            .arg("-R")
            .arg(request)
            .arg(&dev)
            .stdin(Stdio::null())
            .output()
            .map_err(spawn_error)?;
        Ok((
            out.stdout,
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ))
    };
    let (stat, err) = run(format!("stat {}", q(path)))?;
    if err.contains("File not found") {
        return Ok(None);
    }
    let stat = String::from_utf8_lossy(&stat).into_owned();
    let field = |name: &str| -> Option<&str> {
        let at = stat.find(name)? + name.len();
        stat[at..].split_whitespace().next()
    };
    let bad = || Error::Io {
        what: format!("debugfs cannot stat /{path}"),
        source: std::io::Error::other(err.trim().to_string()),
    };
    let perm = field("Mode:")
        .and_then(|m| u32::from_str_radix(m, 8).ok())
        .ok_or_else(bad)?;
    let kind = match field("Type:") {
        Some("regular") => 0o100000,
        Some("symlink") => 0o120000,
        Some("directory") => 0o040000,
        _ => 0,
    };
    let uid = field("User:")
        .and_then(|v| v.parse().ok())
        .ok_or_else(bad)?;
    let gid = field("Group:")
        .and_then(|v| v.parse().ok())
        .ok_or_else(bad)?;
    let content = match stat.find("Fast link dest: ") {
        Some(at) => {
            let rest = &stat[at + "Fast link dest: ".len()..];
            let line = rest.lines().next().unwrap_or("");
            line.trim().trim_matches('"').as_bytes().to_vec()
        }
        None if kind == 0o040000 => Vec::new(),
        None => run(format!("cat {}", q(path)))?.0,
    };
    Ok(Some(Found {
        mode: kind | perm,
        uid,
        gid,
        content,
    }))
}

/// Verify `package`, check the ext filesystem at partition `partition` of
/// `image` can take it, then write it there with debugfs.
///
/// An image that is a regular file is written on a copy beside it (in its
/// directory, sparse, reflinked where the filesystem can), renamed over it
/// only when debugfs took every command: whatever fails, even debugfs
/// killed halfway, the image is left as it was ([`Error::Debugfs`] with
/// `unchanged`). A block device is written in place.
pub fn apply_to_image(
    package: &Path,
    image: &Path,
    partition: Option<u32>,
    limits: &Limits,
) -> Result<Manifest, Error> {
    apply_to_image_with(package, image, partition, limits, &Control::default())
}

/// [`apply_to_image`], reporting progress and honouring cancellation until
/// debugfs starts writing.
pub fn apply_to_image_with(
    package: &Path,
    image: &Path,
    partition: Option<u32>,
    limits: &Limits,
    control: &Control,
) -> Result<Manifest, Error> {
    let manifest = crate::verify_with(package, limits, control)?;
    let dev = ext_device(image, partition)?;

    // What the image holds in every directory an entry lives in.
    let mut dirs: BTreeSet<String> = BTreeSet::new();
    for e in &manifest.entries {
        let mut p = String::new();
        for c in e.path.split('/') {
            dirs.insert(p.clone());
            if !p.is_empty() {
                p.push('/');
            }
            p.push_str(c);
        }
    }
    const S_IFMT: u32 = 0o170000;
    const S_IFDIR: u32 = 0o040000;
    const S_IFLNK: u32 = 0o120000;
    // Every directory is listed in one debugfs run. Parents sort before
    // their children, and a listing counts only when the parent's listing
    // shows a real directory, so nothing is read through a symlink.
    let dirs: Vec<String> = dirs.into_iter().collect();
    let (mut listed, stderr) = list_dirs(&dev, &dirs)?;
    let mut listing: HashMap<String, Option<Listing>> = HashMap::new();
    for (d, l) in dirs.iter().zip(listed.iter_mut()) {
        let is_dir = d.is_empty() || {
            let (parent, name) = d.rsplit_once('/').unwrap_or(("", d));
            listing
                .get(parent)
                .and_then(|l| l.as_ref())
                .and_then(|l| l.get(name))
                .is_some_and(|m| m & S_IFMT == S_IFDIR)
        };
        if is_dir && l.is_none() {
            return Err(Error::Io {
                what: format!("debugfs cannot list /{d}"),
                source: std::io::Error::other(stderr.trim().to_string()),
            });
        }
        listing.insert(d.clone(), if is_dir { l.take() } else { None });
    }
    let mode_of = |path: &str| -> Option<u32> {
        let (parent, name) = path.rsplit_once('/').unwrap_or(("", path));
        listing.get(parent)?.as_ref()?.get(name).copied()
    };
    let mut exists: HashMap<String, u32> = HashMap::new();
    for e in &manifest.entries {
        let refuse = |reason: String| Error::Target {
            entry: e.path.clone(),
            reason,
        };
        let comps: Vec<&str> = e.path.split('/').collect();
        let mut p = String::new();
        for (i, c) in comps.iter().enumerate() {
            if !p.is_empty() {
                p.push('/');
            }
            p.push_str(c);
            let Some(mode) = mode_of(&p) else { break };
            let last = i + 1 == comps.len();
            let kind = mode & S_IFMT;
            if !last && kind == S_IFLNK {
                return Err(refuse(format!(
                    "/{p} in the image is a symlink; the package would write through it"
                )));
            }
            if !last && kind != S_IFDIR {
                return Err(refuse(format!("/{p} in the image is not a directory")));
            }
            if last {
                match (&e.kind, kind == S_IFDIR) {
                    (Kind::Dir, false) => {
                        return Err(refuse(format!("/{p} in the image is not a directory")));
                    }
                    (Kind::Dir, true) => {}
                    (_, true) => return Err(refuse(format!("/{p} in the image is a directory"))),
                    (_, false) => {
                        exists.insert(p.clone(), kind);
                    }
                }
            }
        }
    }

    // Unpack file data for debugfs, and write the command file.
    let tmp = tempfile::Builder::new()
        .prefix("cradle-personalize-")
        .tempdir()
        .map_err(|source| Error::Io {
            what: "cannot create a temporary directory".into(),
            source,
        })?;
    let mut cmds = String::new();
    let mut made: BTreeSet<String> = dirs
        .iter()
        .filter(|d| d.is_empty() || mode_of(d).is_some())
        .cloned()
        .collect();
    // A directory entry the image has already is not made again, though
    // no entry of the package lives in it (`dirs` holds parents only):
    // debugfs's mkdir would fail on it, halfway through the writes.
    made.extend(
        manifest
            .entries
            .iter()
            .filter(|e| e.kind == Kind::Dir)
            .filter(|e| mode_of(&e.path).is_some_and(|m| m & S_IFMT == S_IFDIR))
            .map(|e| e.path.clone()),
    );
    let mut links: HashMap<String, u32> = HashMap::new();
    let mut n = 0u64;
    walk(package, limits, Phase::Stage, control, |e, data| {
        // Parents the package does not list.
        let mut p = String::new();
        let comps: Vec<&str> = e.path.split('/').collect();
        for c in &comps[..comps.len() - 1] {
            if !p.is_empty() {
                p.push('/');
            }
            p.push_str(c);
            if made.insert(p.clone()) {
                cmds.push_str(&format!("mkdir {}\n", q(&p)));
            }
        }
        let path = q(&e.path);
        // Only what differs from what debugfs made: a new inode is owned by
        // 0:0, and `write` takes the mode of the staged file. Every `sif`
        // is a path lookup and an inode write, and they are most of the
        // command file.
        let meta = |cmds: &mut String, kind: u32, set_mode: bool, new: bool| {
            if set_mode {
                cmds.push_str(&format!("sif {path} mode 0{:o}\n", kind | e.mode));
            }
            if !new || e.uid != 0 {
                cmds.push_str(&format!("sif {path} uid {}\n", e.uid));
            }
            if !new || e.gid != 0 {
                cmds.push_str(&format!("sif {path} gid {}\n", e.gid));
            }
            // `@`: seconds since the epoch. Without it debugfs first tries
            // the digits as YYYYMMDDHHMMSS and can make a date of them.
            cmds.push_str(&format!("sif {path} mtime @{}\n", e.mtime));
        };
        if !matches!(e.kind, Kind::Dir) && exists.remove(&e.path).is_some() {
            cmds.push_str(&format!("rm {path}\n"));
        }
        match &e.kind {
            Kind::Dir => {
                let new = made.insert(e.path.clone());
                if new {
                    cmds.push_str(&format!("mkdir {path}\n"));
                }
                meta(&mut cmds, S_IFDIR, true, new);
            }
            Kind::File { .. } => {
                n += 1;
                let local: PathBuf = tmp.path().join(n.to_string());
                let mut out = std::fs::File::create(&local).map_err(|source| Error::Io {
                    what: format!("cannot write {}", local.display()),
                    source,
                })?;
                std::io::copy(data, &mut out).map_err(|source| Error::Io {
                    what: format!("cannot write {}", local.display()),
                    source,
                })?;
                // debugfs reads the staged file, so it stays readable by us;
                // a mode without owner-read is set afterwards.
                out.set_permissions(std::fs::Permissions::from_mode(e.mode | 0o400))
                    .map_err(|source| Error::Io {
                        what: format!("cannot set the mode of {}", local.display()),
                        source,
                    })?;
                cmds.push_str(&format!("write {} {path}\n", q_local(&local)));
                meta(&mut cmds, 0o100000, e.mode & 0o400 == 0, true);
                links.insert(e.path.clone(), 1);
            }
            Kind::Symlink { target } => {
                cmds.push_str(&format!("symlink {path} {}\n", q_raw(target)));
                meta(&mut cmds, S_IFLNK, false, true);
            }
            Kind::Hardlink { target } => {
                cmds.push_str(&format!("ln {} {path}\n", q(target)));
                *links.entry(target.clone()).or_insert(1) += 1;
            }
        }
        Ok(())
    })?;
    // debugfs's ln does not count links; set the counts.
    for (p, count) in &links {
        if *count > 1 {
            cmds.push_str(&format!("sif {} links_count {count}\n", q(p)));
        }
    }
    let cmdfile = tmp.path().join("commands");
    std::fs::write(&cmdfile, &cmds).map_err(|source| Error::Io {
        what: "cannot write the debugfs command file".into(),
        source,
    })?;
    control.check()?;
    let total = cmds.lines().count() as u64;
    let offset = filesystem_offset(image, partition)?;
    let refused = |reason: String, unchanged: bool| Error::Debugfs {
        image: image.to_path_buf(),
        reason,
        unchanged,
    };
    if !is_regular_file(image) {
        // A block device cannot be copied and renamed; it is written in
        // place, and a write that fails leaves it to be made again.
        write_with_debugfs(&cmdfile, total, &dev, control).map_err(|r| refused(r, false))?;
        return Ok(manifest);
    }
    // debugfs writes a copy, renamed over the image only once it took every
    // command: debugfs killed halfway (or refusing a command after writing
    // others) leaves the image as it was rather than a filesystem that
    // looks clean and is not.
    let copy = copy_beside(image)?;
    let copy_dev = format!("{}?offset={offset}", copy.display());
    write_with_debugfs(&cmdfile, total, &copy_dev, control).map_err(|r| refused(r, true))?;
    settle(copy, image)?;
    Ok(manifest)
}

fn is_regular_file(p: &Path) -> bool {
    std::fs::metadata(p).is_ok_and(|m| m.is_file())
}

/// A copy of `image` in its own directory (so that the rename is atomic),
/// removed when dropped unless renamed. `cp` keeps holes
/// (`--sparse=always`), shares the blocks where the filesystem can
/// (`--reflink=auto`: btrfs, XFS), and keeps mode and owner.
fn copy_beside(image: &Path) -> Result<tempfile::TempPath, Error> {
    let dir = match image.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = image
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let io = |what: String| move |source| Error::Io { what, source };
    let copy = tempfile::Builder::new()
        .prefix(&format!(".{name}."))
        .suffix(".cradle-write")
        .tempfile_in(dir)
        .map_err(io(format!(
            "cannot make a copy of {} in {}",
            name,
            dir.display()
        )))?
        .into_temp_path();
    let out = Command::new("cp")
        .args([
            "--sparse=always",
            "--reflink=auto",
            "--preserve=mode,ownership",
            "--",
        ])
        .arg(image)
        .arg(&copy)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .map_err(io("cannot run cp (coreutils)".into()))?;
    if !out.status.success() {
        return Err(Error::Io {
            what: format!("cannot copy {} to write it", image.display()),
            source: std::io::Error::other(format!(
                "cp ended with {}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )),
        });
    }
    Ok(copy)
}

/// Put the written copy in the image's place, durably: its data first, then
/// the rename, then the directory entry.
fn settle(copy: tempfile::TempPath, image: &Path) -> Result<(), Error> {
    let io = |what: String| move |source| Error::Io { what, source };
    std::fs::File::open(&copy)
        .and_then(|f| f.sync_all())
        .map_err(io(format!("cannot flush {}", copy.display())))?;
    copy.persist(image).map_err(|e| Error::Io {
        what: format!("cannot rename the written copy over {}", image.display()),
        source: e.error,
    })?;
    if let Some(dir) = image.parent().filter(|d| !d.as_os_str().is_empty()) {
        // The rename is done; a directory that cannot be flushed only
        // means it may not survive a power cut, which the caller cannot
        // act on.
        let _ = std::fs::File::open(dir).and_then(|d| d.sync_all());
    }
    Ok(())
}

/// Run the command file with `debugfs -w`, counting the commands it echoes
/// on stdout for progress. Any message on stderr after its banner is a
/// failure: debugfs exits 0 even when a command fails. The error is why, as
/// a sentence's tail for [`Error::Debugfs`].
fn write_with_debugfs(
    cmdfile: &Path,
    total: u64,
    dev: &str,
    control: &Control,
) -> Result<(), String> {
    let cannot_run = |e: std::io::Error| format!("cannot run debugfs (e2fsprogs): {e}");
    use std::io::BufRead;
    let mut child = debugfs()
        .arg("-w")
        .arg("-f")
        .arg(cmdfile)
        .arg(dev)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(cannot_run)?;
    let mut stderr = child.stderr.take().expect("piped");
    let errors = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = stderr.read_to_end(&mut buf);
        buf
    });
    let mut done = 0u64;
    control.report(Phase::Write, 0, total);
    let stdout = std::io::BufReader::new(child.stdout.take().expect("piped"));
    for line in stdout.split(b'\n') {
        let Ok(line) = line else { break };
        if line.starts_with(b"debugfs: ") {
            done += 1;
            control.report(Phase::Write, done.min(total), total);
        }
    }
    let status = child.wait().map_err(cannot_run)?;
    let err = errors.join().unwrap_or_default();
    check_debugfs(status, &err)
}

/// One directory of the image: name → mode.
type Listing = HashMap<String, u32>;

/// `ls -p` of every one of `dirs` in the image, in one debugfs run: for
/// each, name → mode, or `None` when it could not be listed (not there, or
/// not a directory); and what debugfs said on stderr.
fn list_dirs(dev: &str, dirs: &[String]) -> Result<(Vec<Option<Listing>>, String), Error> {
    let mut child = debugfs()
        .arg("-f")
        .arg("-")
        .arg(dev)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(spawn_error)?;
    let commands: String = dirs.iter().map(|d| format!("ls -p {}\n", q(d))).collect();
    let mut stdin = child.stdin.take().expect("piped");
    let writer = std::thread::spawn(move || stdin.write_all(commands.as_bytes()));
    let out = child.wait_with_output().map_err(spawn_error)?;
    let _ = writer.join();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    if !out.status.success() {
        return Err(Error::Io {
            what: "debugfs cannot list the image".into(),
            source: std::io::Error::other(stderr.trim().to_string()),
        });
    }
    // Each command is echoed ("debugfs: ls -p …") before its listing; a
    // directory that is there lists its own "." entry.
    let mut listed: Vec<Option<Listing>> = Vec::with_capacity(dirs.len());
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        if line.starts_with("debugfs: ") {
            listed.push(None);
            continue;
        }
        // /inode/mode/uid/gid/name/size/
        let f: Vec<&str> = line.split('/').collect();
        let (Some(current), true) = (listed.last_mut(), f.len() >= 7) else {
            continue;
        };
        let Ok(mode) = u32::from_str_radix(f[2], 8) else {
            continue;
        };
        let map = current.get_or_insert_with(HashMap::new);
        if !matches!(f[5], "" | "." | "..") {
            map.insert(f[5].to_string(), mode);
        }
    }
    listed.resize(dirs.len(), None);
    Ok((listed, stderr))
}

/// debugfs failed if it was killed, exited non-zero or said anything after
/// its banner; why, in words.
fn check_debugfs(status: std::process::ExitStatus, stderr: &[u8]) -> Result<(), String> {
    use std::os::unix::process::ExitStatusExt;
    let err = String::from_utf8_lossy(stderr);
    let msgs: Vec<&str> = err
        .lines()
        .filter(|l| !l.starts_with("debugfs ") && !l.trim().is_empty())
        .collect();
    if status.success() && msgs.is_empty() {
        return Ok(());
    }
    let mut why = match status.signal() {
        Some(_) => format!("debugfs was killed ({status})"),
        None if !status.success() => format!("debugfs ended with {status}"),
        None => "debugfs refused a command".to_string(),
    };
    if !msgs.is_empty() {
        why.push_str(": ");
        why.push_str(&msgs.join(" | "));
    }
    Err(why)
}

/// A path in the image as one debugfs word: absolute, double-quoted, with
/// `"` doubled (names with control characters never get here).
fn q(p: &str) -> String {
    format!("\"/{}\"", p.replace('"', "\"\""))
}

/// Any string (a symlink's target) as one debugfs word.
fn q_raw(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// A host path as one debugfs word.
fn q_local(p: &Path) -> String {
    format!("\"{}\"", p.display().to_string().replace('"', "\"\""))
}

/// debugfs, in a process group of its own: a Ctrl-C at the terminal must
/// not stop it halfway through an image; the caller decides.
fn debugfs() -> Command {
    let mut c = Command::new("debugfs");
    c.process_group(0);
    c
}

fn spawn_error(source: std::io::Error) -> Error {
    Error::Io {
        what: "cannot run debugfs (e2fsprogs)".into(),
        source,
    }
}
