//! The `rsync` transport: rsync alone (it starts ssh itself), usable with an
//! account confined by `command="rrsync DIR"`.
//!
//! The remote side of every command line is only the transfer root: `/` for
//! an absolute path, `.` for a relative one (the home directory, or rrsync's
//! directory). Names travel inside the protocol:
//!
//! - pushes (mkdir, touch, copy) send a local temporary tree that mirrors the
//!   remote path, as `TMP/./a/b/name` with `--relative`; a copy's leaf is a
//!   symlink to the source, followed with `--copy-links` (a sender-side
//!   option, so rrsync never sees it);
//! - removals sync an empty tree with `--delete`, and anchored, escaped
//!   filter rules admit the target alone (`+ /a/`, `+ /a/b/`, `+ /a/b/name`,
//!   `- *`); `--existing` keeps the ancestors from being created, and
//!   `--info=del1` says whether anything was removed;
//! - downloads pull the root through the same kind of rules into a
//!   temporary directory beside the destination, after a `--list-only` of
//!   the same rules has given the size and the kind of file.
//!
//! rsync creates missing parents of what it pushes (even with
//! `--no-implied-dirs`), so `create_file` and `copy_to` do too; the ssh
//! transport reports a missing parent instead. Files are written with
//! `--sparse`, so runs of zeros become holes on the receiver.

use std::ffi::OsString;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

use crate::error::{Failure, classify};
use crate::process::{Input, Job, Output, run};
use crate::quote::{filter_pattern, rsync_rsh_word};
use crate::{
    Error, Host, Op, Progress, RemoteFilesystem, RemotePath, Result, Settings, local_destination,
    local_source, ssh_options,
};

pub struct RsyncFs {
    s: Settings,
}

/// What a pull's listing found at the path.
enum Listed {
    Missing,
    File(u64),
    Other(char),
}

impl RsyncFs {
    pub fn new(settings: Settings) -> RsyncFs {
        RsyncFs { s: settings }
    }

    /// rsync, its ssh command, and the options every run shares.
    fn base(&self, host: &Host) -> Vec<OsString> {
        let mut rsh: Vec<Vec<u8>> = vec![self.s.ssh.as_os_str().as_bytes().to_vec()];
        for o in ssh_options(&self.s, host) {
            rsh.push(b"-o".to_vec());
            rsh.push(o.into_bytes());
        }
        rsh.push(b"-oCompression=no".to_vec());
        if let Some(k) = &self.s.identity_file {
            rsh.push(b"-i".to_vec());
            rsh.push(k.as_os_str().as_bytes().to_vec());
        }
        let rsh: Vec<Vec<u8>> = rsh.iter().map(|w| rsync_rsh_word(w)).collect();
        vec![
            "--no-human-readable".into(),
            // The remote side's errors travel in the protocol stream, which
            // the client reads to the end, rather than on the remote's
            // stderr, which was lost about half the time when the remote
            // failed at the end of a transfer (a full disk, say).
            "--stderr=client".into(),
            "-e".into(),
            OsString::from_vec(rsh.join(&b' ')),
        ]
    }

    /// What every copy adds: holes for runs of zeros, progress on stdout,
    /// and the configured compression and bandwidth limit.
    fn copy_options(&self) -> Vec<OsString> {
        let mut v = os(&["--sparse", "--info=progress2"]);
        if self.s.compression {
            v.push("--compress".into());
        }
        if self.s.bwlimit_kib > 0 {
            v.push(format!("--bwlimit={}", self.s.bwlimit_kib).into());
        }
        v
    }

    /// `host:/` or `host:.`: the transfer root on the remote side.
    fn root(&self, host: &Host, path: &RemotePath, trailing_slash: bool) -> OsString {
        let mut s = format!(
            "{}:{}",
            host.for_spec(),
            if path.is_absolute() { "/" } else { "." }
        );
        if trailing_slash && !path.is_absolute() {
            s.push('/');
        }
        s.into()
    }

    async fn rsync(
        &self,
        args: Vec<OsString>,
        what: &str,
        copy: bool,
        op: &Op,
        on_stdout: impl FnMut(&[u8]),
    ) -> Result<Output> {
        let t = op.timeout.unwrap_or(if copy {
            self.s.copy_timeout
        } else {
            self.s.timeout
        });
        let job = Job {
            tool: "rsync",
            program: &self.s.rsync,
            args,
            what,
            timeout: t,
            stdin: Input::Null,
        };
        run(job, op, on_stdout, |_| {}).await
    }

    fn fail(out: &Output, host: &Host, path: &RemotePath) -> Error {
        classify(Failure {
            tool: "rsync",
            host: &host.to_string(),
            place: format!("{host}:{path}"),
            status: out.status,
            stderr: &out.stderr,
        })
    }

    /// Push the local tree `tmp/./<rel>` with `extra` options. Returns
    /// whether a file was sent (it needs `--itemize-changes` in `extra`).
    async fn push(
        &self,
        (host, path): (&Host, &RemotePath),
        tmp: &Path,
        extra: &[OsString],
        verb: &str,
        op: &Op,
        total: Option<u64>,
    ) -> Result<bool> {
        let mut a = self.base(host);
        a.extend_from_slice(extra);
        a.push("--relative".into());
        a.push("--".into());
        let mut src = tmp.as_os_str().as_bytes().to_vec();
        src.extend_from_slice(b"/./");
        src.extend(rel(path));
        a.push(OsString::from_vec(src));
        a.push(self.root(host, path, false));
        let what = format!("{verb} {host}:{path}");
        let out = match total {
            None => self.rsync(a, &what, false, op, |_| {}).await?,
            Some(total) => self.rsync(a, &what, true, op, reporter(op, total)).await?,
        };
        if !out.status.success() {
            return Err(Self::fail(&out, host, path));
        }
        // With --itemize-changes, a file sent is a line `<f…`.
        let sent = out
            .stdout
            .split(|&b| b == b'\n' || b == b'\r')
            .any(|l| l.starts_with(b"<f"));
        if sent && let Some(total) = total {
            op.report(Progress { done: total, total });
        }
        Ok(sent)
    }

    /// Delete what `leaf_rules` admit in `path`'s parent, syncing an empty
    /// tree. Returns whether rsync deleted anything.
    async fn delete(
        &self,
        host: &Host,
        path: &RemotePath,
        leaf_rules: Vec<Vec<u8>>,
        verb: &str,
        op: &Op,
    ) -> Result<bool> {
        let tmp = temp_dir()?;
        let comps: Vec<&[u8]> = path.components().collect();
        let parents = &comps[..comps.len() - 1];
        let mut dir = tmp.path().to_path_buf();
        for c in parents {
            dir.push(std::ffi::OsStr::from_bytes(c));
        }
        make_dirs(&dir)?;
        let mut a = self.base(host);
        for s in [
            "--recursive",
            "--delete",
            "--existing",
            "--info=del1",
            "--relative",
        ] {
            a.push(s.into());
        }
        for i in 1..=parents.len() {
            a.push(rule(
                "--include=",
                &filter_pattern(parents[..i].iter().copied(), "/"),
            ));
        }
        for r in leaf_rules {
            a.push(OsString::from_vec(r));
        }
        a.push("--exclude=*".into());
        a.push("--".into());
        let mut src = tmp.path().as_os_str().as_bytes().to_vec();
        src.extend_from_slice(b"/./");
        src.extend(parents.join(&b'/'));
        if !parents.is_empty() {
            src.push(b'/');
        }
        a.push(OsString::from_vec(src));
        a.push(self.root(host, path, false));
        let out = self
            .rsync(a, &format!("{verb} {host}:{path}"), false, op, |_| {})
            .await?;
        if !out.status.success() {
            return Err(Self::fail(&out, host, path));
        }
        Ok(out
            .stdout
            .split(|&b| b == b'\n')
            .any(|l| l.starts_with(b"deleting ")))
    }

    /// The include rules that admit exactly `path` (and its ancestors) from
    /// the transfer root, then exclude everything else.
    fn path_rules(path: &RemotePath) -> Vec<OsString> {
        let comps: Vec<&[u8]> = path.components().collect();
        let mut v = Vec::new();
        for i in 1..comps.len() {
            v.push(rule(
                "--include=",
                &filter_pattern(comps[..i].iter().copied(), "/"),
            ));
        }
        v.push(rule(
            "--include=",
            &filter_pattern(comps.iter().copied(), ""),
        ));
        v.push("--exclude=*".into());
        v
    }

    /// `IsADirectory` when `path` is one. rsync's receiver removes an empty
    /// directory to make way for a file of the same name; a file operation
    /// must not.
    async fn refuse_directory(&self, host: &Host, path: &RemotePath, op: &Op) -> Result<()> {
        match self.list(host, path, op).await? {
            Listed::Other('d') => Err(Error::IsADirectory {
                place: format!("{host}:{path}"),
            }),
            _ => Ok(()),
        }
    }

    async fn list(&self, host: &Host, path: &RemotePath, op: &Op) -> Result<Listed> {
        let mut a = self.base(host);
        a.push("--recursive".into());
        a.push("--list-only".into());
        a.extend(Self::path_rules(path));
        a.push("--".into());
        a.push(self.root(host, path, true));
        let out = self
            .rsync(a, &format!("list {host}:{path}"), false, op, |_| {})
            .await?;
        if !out.status.success() {
            return Err(Self::fail(&out, host, path));
        }
        // One line for the root, one per ancestor, then the path itself.
        let lines: Vec<&[u8]> = out
            .stdout
            .split(|&b| b == b'\n')
            .filter(|l| !l.is_empty())
            .collect();
        let depth = path.components().count();
        if lines.len() < depth + 1 {
            return Ok(Listed::Missing);
        }
        let last = String::from_utf8_lossy(lines[lines.len() - 1]);
        let mut fields = last.split_whitespace();
        let mode = fields.next().unwrap_or("");
        let size = fields.next().unwrap_or("");
        match mode.chars().next() {
            Some('-') => size.parse().map(Listed::File).map_err(|_| Error::Failed {
                tool: "rsync".into(),
                status: "0".into(),
                detail: format!("unexpected listing line {last:?}"),
            }),
            Some(c) => Ok(Listed::Other(c)),
            None => Ok(Listed::Missing),
        }
    }
}

/// Arguments from string literals.
fn os(args: &[&str]) -> Vec<OsString> {
    args.iter().map(OsString::from).collect()
}

/// Reports progress of a copy of `total` bytes from rsync's
/// `--info=progress2` output; starts by reporting 0.
fn reporter(op: &Op, total: u64) -> impl FnMut(&[u8]) + '_ {
    op.report(Progress { done: 0, total });
    let mut parser = ProgressParser::default();
    move |chunk| {
        if let Some(done) = parser.feed(chunk) {
            op.report(Progress {
                done: done.min(total),
                total,
            });
        }
    }
}

/// `prefix` and a filter pattern as one argument.
fn rule(prefix: &str, pattern: &[u8]) -> OsString {
    let mut v = prefix.as_bytes().to_vec();
    v.extend_from_slice(pattern);
    OsString::from_vec(v)
}

/// The path without its leading `/`.
fn rel(path: &RemotePath) -> Vec<u8> {
    path.components().collect::<Vec<_>>().join(&b'/')
}

fn temp_dir() -> Result<tempfile::TempDir> {
    tempfile::Builder::new()
        .prefix("cradle-rsync-")
        .tempdir()
        .map_err(|source| Error::Local {
            path: std::env::temp_dir(),
            source,
        })
}

/// Directories made for a push get mode 0755 whatever the umask: rsync
/// gives new remote directories the source's mode (less the remote umask).
fn make_dirs(p: &Path) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(p)
        .map_err(|source| Error::Local {
            path: p.to_path_buf(),
            source,
        })
}

/// The temporary tree `TMP/<parents of path>` and the leaf's local path.
fn mirror(tmp: &Path, path: &RemotePath) -> Result<PathBuf> {
    let mut leaf = tmp.to_path_buf();
    for c in path.components() {
        leaf.push(std::ffi::OsStr::from_bytes(c));
    }
    make_dirs(leaf.parent().expect("under tmp"))?;
    Ok(leaf)
}

impl RemoteFilesystem for RsyncFs {
    async fn create_dir(&self, host: &Host, path: &RemotePath, op: &Op) -> Result<()> {
        let tmp = temp_dir()?;
        let leaf = mirror(tmp.path(), path)?;
        make_dirs(&leaf)?;
        self.push(
            (host, path),
            tmp.path(),
            &os(&["--recursive"]),
            "mkdir",
            op,
            None,
        )
        .await
        .map(drop)
    }

    async fn create_file(&self, host: &Host, path: &RemotePath, op: &Op) -> Result<()> {
        let tmp = temp_dir()?;
        let leaf = mirror(tmp.path(), path)?;
        std::fs::File::create(&leaf).map_err(|source| Error::Local {
            path: leaf.clone(),
            source,
        })?;
        let extra = os(&[
            "--ignore-existing",
            "--itemize-changes",
            "--no-implied-dirs",
        ]);
        if self
            .push((host, path), tmp.path(), &extra, "touch", op, None)
            .await?
        {
            return Ok(());
        }
        // Something was there: fine if it is not a directory.
        self.refuse_directory(host, path, op).await
    }

    async fn remove_file(&self, host: &Host, path: &RemotePath, op: &Op) -> Result<()> {
        let name = [path.file_name()];
        let parents: Vec<&[u8]> = path.components().collect();
        let parents = &parents[..parents.len() - 1];
        let full: Vec<&[u8]> = parents.iter().copied().chain(name).collect();
        // A directory of that name is protected; only a file or symlink goes.
        let rules = vec![
            rule("--exclude=", &filter_pattern(full.iter().copied(), "/")).into_vec(),
            rule("--include=", &filter_pattern(full.iter().copied(), "")).into_vec(),
        ];
        if self.delete(host, path, rules, "rm", op).await? {
            Ok(())
        } else {
            Err(Error::NotFound {
                place: format!("{host}:{path}"),
                detail: "no such file (a directory is removed with remove_dir)".into(),
            })
        }
    }

    async fn remove_dir(&self, host: &Host, path: &RemotePath, op: &Op) -> Result<()> {
        let full: Vec<&[u8]> = path.components().collect();
        let rules =
            vec![rule("--include=", &filter_pattern(full.iter().copied(), "/***")).into_vec()];
        if self.delete(host, path, rules, "rmdir", op).await? {
            Ok(())
        } else {
            Err(Error::NotFound {
                place: format!("{host}:{path}"),
                detail: "no such directory".into(),
            })
        }
    }

    async fn copy_to(&self, src: &Path, host: &Host, dst: &RemotePath, op: &Op) -> Result<()> {
        let (src, total) = local_source(src)?;
        let tmp = temp_dir()?;
        let leaf = mirror(tmp.path(), dst)?;
        std::os::unix::fs::symlink(&src, &leaf).map_err(|source| Error::Local {
            path: leaf.clone(),
            source,
        })?;
        let mut extra = os(&["--copy-links", "--no-implied-dirs", "--itemize-changes"]);
        extra.extend(self.copy_options());
        // rsync's receiver removes an empty directory to make way for a
        // file, and no filter or option stops it. So the first pass skips
        // anything already there (one connection for a new file); only if
        // it skipped is the destination looked at, and a file overwritten.
        extra.push("--ignore-existing".into());
        let path = (host, dst);
        if self
            .push(path, tmp.path(), &extra, "copy to", op, Some(total))
            .await?
        {
            return Ok(());
        }
        self.refuse_directory(host, dst, op).await?;
        extra.pop();
        self.push(path, tmp.path(), &extra, "copy to", op, Some(total))
            .await?;
        Ok(())
    }

    async fn copy_from(&self, host: &Host, src: &RemotePath, dst: &Path, op: &Op) -> Result<()> {
        let (dir, name) = local_destination(dst)?;
        let place = format!("{host}:{src}");
        let total = match self.list(host, src, op).await? {
            Listed::File(n) => n,
            Listed::Missing => {
                return Err(Error::NotFound {
                    place,
                    detail: "not listed by rsync".into(),
                });
            }
            Listed::Other('d') => return Err(Error::IsADirectory { place }),
            Listed::Other(c) => {
                return Err(Error::NotAFile {
                    place,
                    kind: match c {
                        'l' => "a symlink".into(),
                        c => format!("file type '{c}'"),
                    },
                });
            }
        };
        let tmp = tempfile::Builder::new()
            .prefix(".cradle-copy-")
            .tempdir_in(&dir)
            .map_err(|source| Error::Local {
                path: dir.clone(),
                source,
            })?;
        let mut a = self.base(host);
        a.push("--recursive".into());
        a.extend(self.copy_options());
        a.extend(Self::path_rules(src));
        a.push("--".into());
        a.push(self.root(host, src, true));
        let mut to = tmp.path().as_os_str().as_bytes().to_vec();
        to.push(b'/');
        a.push(OsString::from_vec(to));
        let what = format!("copy {place} to {}", dst.display());
        let out = self.rsync(a, &what, true, op, reporter(op, total)).await?;
        if !out.status.success() {
            return Err(Self::fail(&out, host, src));
        }
        let got = mirror(tmp.path(), src)?;
        let target = dir.join(&name);
        std::fs::rename(&got, &target).map_err(|source| Error::Local {
            path: target.clone(),
            source,
        })?;
        op.report(Progress { done: total, total });
        Ok(())
    }
}

/// Reads `--info=progress2` lines ("  123456  12%  1.00MB/s  0:00:10"),
/// which rsync ends with `\r` while a transfer runs.
#[derive(Default)]
struct ProgressParser {
    partial: Vec<u8>,
}

impl ProgressParser {
    fn feed(&mut self, chunk: &[u8]) -> Option<u64> {
        let mut last = None;
        for &b in chunk {
            if b == b'\r' || b == b'\n' {
                let line = std::mem::take(&mut self.partial);
                let s = String::from_utf8_lossy(&line);
                let mut f = s.split_whitespace();
                if let (Some(n), Some(p)) = (f.next(), f.next())
                    && p.ends_with('%')
                    && let Ok(n) = n.parse::<u64>()
                {
                    last = Some(n);
                }
            } else if self.partial.len() < 4096 {
                self.partial.push(b);
            }
        }
        last
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_lines() {
        let mut p = ProgressParser::default();
        assert_eq!(
            p.feed(b"              0   0%    0.00kB/s    0:00:00\r"),
            Some(0)
        );
        assert_eq!(p.feed(b"    5000"), None);
        assert_eq!(
            p.feed(b"0000  10%  1.00MB/s  0:00:01\r  x\n"),
            Some(50000000)
        );
        assert_eq!(p.feed(b"deleting a/b\n"), None);
    }
}
