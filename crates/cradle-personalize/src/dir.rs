//! Overlaying a verified package onto a directory tree (a root filesystem
//! staged on the host, or mounted inside the install appliance).
//!
//! Three passes: verify the package; check the target for every entry
//! (nothing written yet); write. Files, symlinks and hardlinks are made
//! under a temporary name in their directory and renamed over the old one,
//! so a reader sees the old file or the new one. Directory times are set
//! last, deepest first, since writing into a directory changes its mtime.
//!
//! The target check and the writes are separate steps: the tree must not be
//! changed by anyone else meanwhile (it is a guest's disk being prepared,
//! not a live system).

use std::ffi::CString;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::package::walk;
use crate::{Control, Entry, Error, Kind, Limits, Manifest, Phase};

/// Verify `package`, check `root` can take it, then overlay it. Returns the
/// manifest of what was written.
pub fn apply_to_dir(package: &Path, root: &Path, limits: &Limits) -> Result<Manifest, Error> {
    apply_to_dir_with(package, root, limits, &Control::default())
}

/// [`apply_to_dir`], reporting progress and honouring cancellation until
/// the first write.
pub fn apply_to_dir_with(
    package: &Path,
    root: &Path,
    limits: &Limits,
    control: &Control,
) -> Result<Manifest, Error> {
    let manifest = crate::verify_with(package, limits, control)?;
    check_target(&manifest, root)?;
    control.check()?;
    let mut dirs = Vec::new();
    walk(package, limits, Phase::Write, control, |e, data| {
        let dst = root.join(&e.path);
        // Parents the package does not list are made as tar makes them.
        let parent = dst.parent().expect("under root");
        if !parent.is_dir() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o755)
                .create(parent)
                .map_err(io(parent, "cannot create directory"))?;
        }
        match &e.kind {
            Kind::Dir => {
                if !dst.is_dir() {
                    std::fs::DirBuilder::new()
                        .mode(e.mode & 0o7777)
                        .create(&dst)
                        .map_err(io(&dst, "cannot create directory"))?;
                }
                std::fs::set_permissions(&dst, std::fs::Permissions::from_mode(e.mode))
                    .map_err(io(&dst, "cannot set mode"))?;
                std::os::unix::fs::lchown(&dst, Some(e.uid as u32), Some(e.gid as u32))
                    .map_err(io(&dst, "cannot set owner"))?;
                dirs.push(e.clone());
            }
            Kind::File { .. } => write_file(e, &dst, data)?,
            Kind::Symlink { target } => {
                let tmp = temp_name(&dst);
                std::os::unix::fs::symlink(target, &tmp)
                    .map_err(io(&tmp, "cannot create symlink"))?;
                finish(e, &tmp, &dst)?;
            }
            Kind::Hardlink { target } => {
                let tmp = temp_name(&dst);
                std::fs::hard_link(root.join(target), &tmp).map_err(io(&tmp, "cannot link"))?;
                std::fs::rename(&tmp, &dst).map_err(io(&dst, "cannot rename into place"))?;
            }
        }
        Ok(())
    })?;
    dirs.sort_by_key(|d| std::cmp::Reverse(d.path.matches('/').count()));
    for d in dirs {
        set_mtime(&root.join(&d.path), d.mtime)?;
    }
    Ok(manifest)
}

/// Every entry against what is already at `root`: no existing component on
/// its way may be a symlink (the package would write through it), a
/// directory entry may not land on a non-directory, and nothing else may
/// land on a directory.
fn check_target(manifest: &Manifest, root: &Path) -> Result<(), Error> {
    let meta = std::fs::metadata(root).map_err(io(root, "cannot read the target"))?;
    if !meta.is_dir() {
        return Err(Error::Target {
            entry: String::new(),
            reason: format!("{} is not a directory", root.display()),
        });
    }
    for e in &manifest.entries {
        let refuse = |reason: String| Error::Target {
            entry: e.path.clone(),
            reason,
        };
        let mut at = root.to_path_buf();
        let comps: Vec<&str> = e.path.split('/').collect();
        for (i, c) in comps.iter().enumerate() {
            at.push(c);
            let last = i + 1 == comps.len();
            let m = match std::fs::symlink_metadata(&at) {
                Ok(m) => m,
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => break,
                Err(err) => return Err(refuse(format!("cannot read {}: {err}", at.display()))),
            };
            let ft = m.file_type();
            if !last {
                if ft.is_symlink() {
                    return Err(refuse(format!(
                        "{} on the target is a symlink; the package would write through it",
                        at.display()
                    )));
                }
                if !ft.is_dir() {
                    return Err(refuse(format!(
                        "{} on the target is not a directory",
                        at.display()
                    )));
                }
            } else {
                match (&e.kind, ft.is_dir()) {
                    (Kind::Dir, false) => {
                        return Err(refuse(format!(
                            "{} on the target is not a directory",
                            at.display()
                        )));
                    }
                    (Kind::Dir, true) => {}
                    (_, true) => {
                        return Err(refuse(format!(
                            "{} on the target is a directory",
                            at.display()
                        )));
                    }
                    (_, false) => {}
                }
            }
        }
    }
    Ok(())
}

fn write_file(e: &Entry, dst: &Path, data: &mut dyn Read) -> Result<(), Error> {
    let dir = dst.parent().expect("an entry has a parent");
    let mut tmp = tempfile::Builder::new()
        .prefix(".cradle-personalize-")
        .tempfile_in(dir)
        .map_err(io(dir, "cannot create a temporary file"))?;
    std::io::copy(data, tmp.as_file_mut()).map_err(io(dst, "cannot write"))?;
    let f = tmp.as_file();
    f.set_permissions(std::fs::Permissions::from_mode(e.mode))
        .map_err(io(dst, "cannot set mode"))?;
    std::os::unix::fs::fchown(f, Some(e.uid as u32), Some(e.gid as u32))
        .map_err(io(dst, "cannot set owner"))?;
    // chown clears setuid and setgid: set the mode again.
    f.set_permissions(std::fs::Permissions::from_mode(e.mode))
        .map_err(io(dst, "cannot set mode"))?;
    set_mtime(tmp.path(), e.mtime)?;
    tmp.persist(dst).map_err(|err| Error::Io {
        what: format!("cannot rename into {}", dst.display()),
        source: err.error,
    })?;
    Ok(())
}

/// Owner and time of a symlink at `tmp`, then rename it to `dst`.
fn finish(e: &Entry, tmp: &Path, dst: &Path) -> Result<(), Error> {
    std::os::unix::fs::lchown(tmp, Some(e.uid as u32), Some(e.gid as u32))
        .map_err(io(tmp, "cannot set owner"))?;
    set_mtime(tmp, e.mtime)?;
    std::fs::rename(tmp, dst).map_err(io(dst, "cannot rename into place"))
}

fn temp_name(dst: &Path) -> PathBuf {
    let name = dst
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let n: u64 = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let short: String = name.chars().take(40).collect();
    dst.with_file_name(format!(
        ".cradle-personalize-{short}-{}-{n:x}",
        std::process::id()
    ))
}

/// Set access and modification time without following a symlink.
fn set_mtime(p: &Path, mtime: u64) -> Result<(), Error> {
    let c = CString::new(p.as_os_str().as_bytes()).map_err(|_| Error::Io {
        what: format!("{}: NUL in path", p.display()),
        source: std::io::Error::other("NUL"),
    })?;
    let t = libc::timespec {
        tv_sec: mtime as libc::time_t,
        tv_nsec: 0,
    };
    let times = [t, t];
    // SAFETY: a valid NUL-terminated path and a two-element timespec array,
    // as utimensat(2) takes.
    let r = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c.as_ptr(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if r != 0 {
        return Err(Error::Io {
            what: format!("cannot set the time of {}", p.display()),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

fn io<'a>(p: &'a Path, what: &'a str) -> impl Fn(std::io::Error) -> Error + 'a {
    move |source| Error::Io {
        what: format!("{what}: {}", p.display()),
        source,
    }
}
