//! The `ssh` transport: ssh, and scp for downloads.
//!
//! - mkdir, touch, rm and rmdir are one command line for the remote POSIX
//!   shell, with every path as one single-quoted word and after `--`.
//! - Uploads stream the file into ssh's standard input, and a short remote
//!   script writes it to a temporary file beside the destination and renames
//!   it into place only when every byte arrived (see [`upload_script`]). The
//!   destination is exactly the path given: scp would put the file inside a
//!   directory of that name, and its SFTP mode reports a full disk only as
//!   "Failure"; here the remote tools name their errors. Progress is the
//!   file offset ssh has read to, shared with a duplicate descriptor. The
//!   remote end writes with `dd conv=sparse`, so runs of zeros (an empty
//!   disk's) become holes there, as rsync's `--sparse` makes them.
//! - Downloads use scp in its SFTP mode: the original protocol refuses names
//!   it cannot echo back (a newline, a quote), while SFTP carries the path
//!   as bytes. scp globs a download's source, so the path is glob-escaped.
//!   A `stat` over ssh first gives the size for progress and a clean error
//!   for a missing file or a directory; progress is the size of the
//!   temporary file scp writes.
//!
//! The remote side needs a POSIX shell, GNU coreutils (stat -c, mktemp -p,
//! mv -T, dd conv=sparse), scp and the SFTP subsystem.

use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;
use std::path::Path;

use crate::error::{Failure, classify};
use crate::process::{Input, Job, Output, run};
use crate::quote::{glob_literal, shell_word};
use crate::{
    Error, Host, Op, Progress, RemoteFilesystem, RemotePath, Result, Settings, local_destination,
    local_source, ssh_options,
};

pub struct SshFs {
    s: Settings,
}

impl SshFs {
    pub fn new(settings: Settings) -> SshFs {
        SshFs { s: settings }
    }

    fn common(&self, host: &Host) -> Vec<OsString> {
        let mut a = Vec::new();
        for o in ssh_options(&self.s, host) {
            a.push("-o".into());
            a.push(o.into());
        }
        if let Some(k) = &self.s.identity_file {
            a.push("-i".into());
            a.push(k.clone().into_os_string());
        }
        a.push("-o".into());
        a.push(
            format!(
                "Compression={}",
                if self.s.compression { "yes" } else { "no" }
            )
            .into(),
        );
        a
    }

    /// ssh's arguments to run `script` in the remote shell.
    fn remote_command(&self, host: &Host, script: Vec<u8>) -> Vec<OsString> {
        let mut a = self.common(host);
        a.push("-T".into());
        a.push("--".into());
        a.push(host.name().into());
        a.push(OsString::from_vec(script));
        a
    }

    /// Run one command line in the remote shell.
    async fn shell(&self, host: &Host, script: Vec<u8>, what: &str, op: &Op) -> Result<Output> {
        run(
            Job {
                tool: "ssh",
                program: &self.s.ssh,
                args: self.remote_command(host, script),
                what,
                timeout: op.timeout.unwrap_or(self.s.timeout),
                stdin: Input::Null,
            },
            op,
            |_| {},
            |_| {},
        )
        .await
    }

    async fn simple(
        &self,
        host: &Host,
        path: &RemotePath,
        script: Vec<u8>,
        verb: &str,
        op: &Op,
    ) -> Result<()> {
        let what = format!("{verb} {host}:{path}");
        let out = self.shell(host, script, &what, op).await?;
        check(&out, "ssh", host, path)
    }
}

fn check(out: &Output, tool: &str, host: &Host, path: &RemotePath) -> Result<()> {
    if out.status.success() {
        return Ok(());
    }
    Err(classify(Failure {
        tool,
        host: &host.to_string(),
        place: format!("{host}:{path}"),
        status: out.status,
        stderr: &out.stderr,
    }))
}

/// `words` joined by spaces; each path is already a quoted word.
fn script(parts: &[&[u8]]) -> Vec<u8> {
    parts.join(&b' ')
}

impl RemoteFilesystem for SshFs {
    async fn create_dir(&self, host: &Host, path: &RemotePath, op: &Op) -> Result<()> {
        let q = shell_word(&path.for_tool());
        self.simple(host, path, script(&[b"mkdir -p --", &q]), "mkdir", op)
            .await
    }

    async fn create_file(&self, host: &Host, path: &RemotePath, op: &Op) -> Result<()> {
        // Opening for append creates a missing file and leaves an existing
        // one (content and times) as it is.
        let q = shell_word(&path.for_tool());
        self.simple(host, path, script(&[b": >>", &q]), "touch", op)
            .await
    }

    async fn remove_file(&self, host: &Host, path: &RemotePath, op: &Op) -> Result<()> {
        let q = shell_word(&path.for_tool());
        self.simple(host, path, script(&[b"rm --", &q]), "rm", op)
            .await
    }

    async fn remove_dir(&self, host: &Host, path: &RemotePath, op: &Op) -> Result<()> {
        // rm -r would also take a file or a symlink; only a real directory
        // is removed.
        let q = shell_word(&path.for_tool());
        let s = script(&[
            b"if [ -d", &q, b"] && [ ! -L", &q, b"]; then exec rm -r --", &q,
            b"; elif [ -e", &q, b"] || [ -L", &q,
            b"]; then echo 'cradle: Not a directory' >&2; else echo 'cradle: No such file or directory' >&2; fi; exit 1",
        ]);
        self.simple(host, path, s, "rmdir", op).await
    }

    async fn copy_to(&self, src: &Path, host: &Host, dst: &RemotePath, op: &Op) -> Result<()> {
        let (src, total) = local_source(src)?;
        let file = std::fs::File::open(&src).map_err(|source| Error::Local {
            path: src.clone(),
            source,
        })?;
        let mode = file
            .metadata()
            .map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o777)
            .unwrap_or(0o644);
        // Unlimited, ssh reads the file itself, and a duplicate descriptor,
        // sharing its offset, tells how far it got. Limited, the file is fed
        // through a pipe at the configured rate.
        let probe = file.try_clone().map_err(|source| Error::Local {
            path: src.clone(),
            source,
        })?;
        let fed = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let stdin = if self.s.bwlimit_kib > 0 {
            Input::Paced(file, self.s.bwlimit_kib * 1024, fed.clone())
        } else {
            Input::File(file)
        };
        let what = format!("copy {} to {host}:{dst}", src.display());
        let a = self.remote_command(host, upload_script(dst, total, mode));

        op.report(Progress { done: 0, total });
        let out = run(
            Job {
                tool: "ssh",
                program: &self.s.ssh,
                args: a,
                what: &what,
                timeout: op.timeout.unwrap_or(self.s.copy_timeout),
                stdin,
            },
            op,
            |_| {},
            |_| {
                let mut f = &probe;
                let done = if self.s.bwlimit_kib > 0 {
                    Ok(fed.load(std::sync::atomic::Ordering::Relaxed))
                } else {
                    std::io::Seek::stream_position(&mut f)
                };
                if let Ok(done) = done {
                    op.report(Progress {
                        done: done.min(total),
                        total,
                    });
                }
            },
        )
        .await?;
        check(&out, "ssh", host, dst)?;
        op.report(Progress { done: total, total });
        Ok(())
    }

    async fn copy_from(&self, host: &Host, src: &RemotePath, dst: &Path, op: &Op) -> Result<()> {
        let (dir, name) = local_destination(dst)?;
        let q = shell_word(&src.for_tool());
        let what = format!("stat {host}:{src}");
        let out = self
            .shell(
                host,
                script(&[b"LC_ALL=C stat -L -c %F:%s --", &q]),
                &what,
                op,
            )
            .await?;
        check(&out, "ssh", host, src)?;
        let total = parse_stat(&out.stdout, host, src)?;

        let tmp = tempfile::Builder::new()
            .prefix(".cradle-copy-")
            .tempfile_in(&dir)
            .map_err(|source| Error::Local {
                path: dir.clone(),
                source,
            })?;
        let what = format!("copy {host}:{src} to {}", dst.display());
        let mut a = self.common(host);
        a.push("-q".into());
        if self.s.bwlimit_kib > 0 {
            a.push("-l".into());
            a.push((self.s.bwlimit_kib * 8192 / 1000).max(1).to_string().into());
        }
        a.push("--".into());
        let mut spec = format!("{}:", host.for_spec()).into_bytes();
        spec.extend(glob_literal(&src.for_tool()));
        a.push(OsString::from_vec(spec));
        a.push(tmp.path().as_os_str().to_os_string());

        op.report(Progress { done: 0, total });
        let tmp_path = tmp.path().to_path_buf();
        let out = run(
            Job {
                tool: "scp",
                program: &self.s.scp,
                args: a,
                what: &what,
                timeout: op.timeout.unwrap_or(self.s.copy_timeout),
                stdin: Input::Null,
            },
            op,
            |_| {},
            |_| {
                if let Ok(m) = std::fs::metadata(&tmp_path) {
                    op.report(Progress {
                        done: m.len().min(total),
                        total,
                    });
                }
            },
        )
        .await?;
        check(&out, "scp", host, src)?;
        let target = dir.join(&name);
        tmp.persist(&target).map_err(|e| Error::Local {
            path: target.clone(),
            source: e.error,
        })?;
        op.report(Progress { done: total, total });
        Ok(())
    }
}

/// The remote side of an upload: standard input into a temporary file
/// beside the destination, then, only if all `size` bytes arrived, renamed
/// over it (`mv -T`, so a directory there is refused rather than entered).
/// When the connection drops, sshd hangs the shell up (or cat sees end of
/// file early and the size check fails), and the temporary file is removed
/// on the way out: a cancelled upload never replaces the destination. Needs a POSIX shell and GNU coreutils.
fn upload_script(dst: &RemotePath, size: u64, mode: u32) -> Vec<u8> {
    let comps: Vec<&[u8]> = dst.components().collect();
    let parent: Vec<u8> = match (dst.is_absolute(), comps.len()) {
        (true, 1) => b"/".to_vec(),
        (false, 1) => b".".to_vec(),
        (abs, n) => {
            let mut p = if abs { b"/".to_vec() } else { b"./".to_vec() };
            p.extend(comps[..n - 1].join(&b'/'));
            p
        }
    };
    let mut s = b"d=".to_vec();
    s.extend(shell_word(&dst.for_tool()));
    s.extend_from_slice(b"; p=");
    s.extend(shell_word(&parent));
    s.extend_from_slice(
        format!(
            "; if [ -d \"$d\" ]; then echo 'cradle: Is a directory' >&2; exit 1; fi\n\
             t=$(mktemp -p \"$p\" .cradle-upload-XXXXXX) || exit 1\n\
             trap 'rm -f -- \"$t\"' EXIT\n\
             trap 'exit 1' HUP INT TERM PIPE\n\
             dd of=\"$t\" bs=65536 iflag=fullblock conv=sparse status=none || exit 1\n\
             n=$(stat -c %s -- \"$t\") || exit 1\n\
             [ \"$n\" = {size} ] || {{ echo \"cradle: upload cut short at $n of {size} bytes\" >&2; exit 1; }}\n\
             chmod \"$(printf %o $(( 0{mode:o} & ~0$(umask) )))\" -- \"$t\" || exit 1\n\
             mv -f -T -- \"$t\" \"$d\"\n"
        )
        .as_bytes(),
    );
    s
}

/// `stat -c %F:%s` output: the size of a regular file, or why it is not one.
fn parse_stat(out: &[u8], host: &Host, path: &RemotePath) -> Result<u64> {
    let text = String::from_utf8_lossy(out);
    let line = text.trim();
    let (kind, size) = line.rsplit_once(':').ok_or_else(|| Error::Failed {
        tool: "stat".into(),
        status: "0".into(),
        detail: format!("unexpected output {line:?}"),
    })?;
    let place = format!("{host}:{path}");
    match kind {
        "regular file" | "regular empty file" => size.parse().map_err(|_| Error::Failed {
            tool: "stat".into(),
            status: "0".into(),
            detail: format!("unexpected size {size:?}"),
        }),
        "directory" => Err(Error::IsADirectory { place }),
        other => Err(Error::NotAFile {
            place,
            kind: other.to_string(),
        }),
    }
}
