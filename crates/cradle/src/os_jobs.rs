//! `cradle instance export`, `import` and `rename`: the OS definition's
//! other operations, run as jobs on the server and followed like installs.
//!
//! An export's dump comes back as the answer's body while the job runs.
//! With a FILE it is written to a temporary name beside FILE, hashed as
//! it comes, and renamed to FILE (with `FILE.sha256` beside it, in
//! `sha256sum`'s format) only when the job succeeded and the host counted
//! the same length and SHA-256: a dump cut short never has FILE's name.
//! An import sends FILE as the body with the SHA-256 from `FILE.sha256`
//! (or `--sha256`); the server checks it before the script sees a byte.

use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use cradle_client::route;
use cradle_model::answers::JOB_HEADER;
use cradle_model::job::{JobView, StreamCounter};

use crate::Output;
use crate::client::Api;

pub const EXPORT_ABOUT: &str = "\
The instance must not be running. Its OS definition's export runs: the trusted script on \
the host, or untrusted/export in a throwaway appliance VM with the instance's disks \
attached read-only (both at once when both exist; then the untrusted one's output is the \
dump). What the script prints on standard output is the dump; its standard error is the \
job's log (instance install-status).

With FILE the dump goes to a temporary file beside FILE, renamed to FILE once the job \
succeeded and both ends counted the same bytes; FILE.sha256 is written beside it (the \
format of sha256sum, which `instance import` reads). Without FILE, or with -, it goes to \
standard output (not a terminal). The dump is at most [install] stream_max_bytes; the job \
ends at [install] timeout.

Example:\n  cradle instance export web1 web1.dump";

pub const IMPORT_ABOUT: &str = "\
The instance must not be running. FILE is sent to the server, which spools it and checks its \
SHA-256 (from FILE.sha256, as `instance export` wrote it, or --sha256) before the OS's \
import runs: a corrupted or truncated dump is refused and the disk is not touched. The \
script (trusted on the host, or untrusted/import in the appliance with the disks \
read-write) reads the dump on its standard input. Exits 0 when the import succeeded; when \
the script failed after it began reading, the instance is install_failed (its disk holds \
part of the dump): import again or reinstall.

Example:\n  cradle instance import web2 web1.dump";

pub const RENAME_ABOUT: &str = "\
When the instance's OS definition has a rename script, it runs first (trusted on the host, \
or untrusted/rename in the appliance with the disks read-write) with OLD_INSTANCE_NAME and \
INSTANCE_NAME (the new name); the registry takes the new name only when it succeeded, so a \
failed script leaves everything under the old name. Without a rename script the instance \
is renamed at once. The instance must not be running.

Example:\n  cradle instance rename web1 web-frontend";

/// How long each follow request waits for news.
const WAIT: Duration = Duration::from_secs(30);

/// A progress bar in bytes on standard error, when it is a terminal.
fn bytes_bar(output: Output, len: Option<u64>, what: &str) -> Option<indicatif::ProgressBar> {
    if output != Output::Table || !std::io::stderr().is_terminal() {
        return None;
    }
    let b = match len {
        Some(n) => indicatif::ProgressBar::new(n),
        None => indicatif::ProgressBar::new_spinner(),
    };
    let template = match len {
        Some(_) => "{msg} {bar:30} {bytes}/{total_bytes} {binary_bytes_per_sec} {eta}",
        None => "{spinner} {msg} {bytes} {binary_bytes_per_sec} {elapsed}",
    };
    b.set_style(indicatif::ProgressStyle::with_template(template).expect("the template is valid"));
    b.set_message(what.to_string());
    b.enable_steady_tick(Duration::from_millis(200));
    Some(b)
}

/// The job, once it has ended.
fn ended(api: &Api, instance: &str, mut job: JobView) -> Result<JobView> {
    while job.state == "running" {
        job = api.send(route::install_job(instance, job.next, WAIT))?;
    }
    Ok(job)
}

/// Where the dump goes.
enum Out {
    Stdout(std::io::Stdout),
    File {
        tmp: tempfile::NamedTempFile,
        dest: PathBuf,
    },
}

pub fn export(
    api: &Api,
    instance: &str,
    disk: usize,
    out: Option<&Path>,
    output: Output,
) -> Result<()> {
    let dest = out.filter(|p| *p != Path::new("-"));
    let mut sink = match dest {
        None => {
            let stdout = std::io::stdout();
            if stdout.is_terminal() {
                bail!("the dump is binary: give a FILE, or send standard output to a file or pipe");
            }
            Out::Stdout(stdout)
        }
        Some(dest) => {
            let dir = match dest.parent() {
                Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
                _ => PathBuf::from("."),
            };
            let name = dest
                .file_name()
                .with_context(|| format!("{}: not a file name", dest.display()))?;
            let tmp = tempfile::Builder::new()
                .prefix(&format!(".{}.", name.to_string_lossy()))
                .suffix(".partial")
                .tempfile_in(&dir)
                .with_context(|| format!("cannot create a file in {}", dir.display()))?;
            Out::File {
                tmp,
                dest: dest.to_path_buf(),
            }
        }
    };
    let started = Instant::now();
    let mut resp = api.open_stream(route::export(instance, disk))?;
    let job_id = resp
        .headers()
        .get(JOB_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .unwrap_or_default();
    let bar = bytes_bar(output, None, &format!("exporting {instance}"));
    let mut counted = StreamCounter::default();
    let mut buf = vec![0u8; 1 << 20];
    let copied: Result<()> = loop {
        let n = match resp.read(&mut buf) {
            Ok(0) => break Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                break Err(anyhow::anyhow!(
                    "the dump's stream broke after {} bytes: {e}",
                    counted.bytes()
                ));
            }
        };
        counted.update(&buf[..n]);
        let written = match &mut sink {
            Out::Stdout(s) => s.write_all(&buf[..n]),
            Out::File { tmp, .. } => tmp.write_all(&buf[..n]),
        };
        if let Err(e) = written {
            // Dropping the answer tells the server nobody reads: its job fails.
            break Err(anyhow::anyhow!("cannot write the dump: {e}"));
        }
        if let Some(b) = &bar {
            b.set_position(counted.bytes());
        }
    };
    drop(resp);
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    let ours = counted.finish();
    // Whatever the body did, the job says whether it was the whole dump.
    let job = api.send(route::install_job(instance, 0, Duration::ZERO))?;
    if !job_id.is_empty() && job.id.to_string() != job_id {
        bail!("the export job {job_id} was replaced by another job before it could be read");
    }
    let job = ended(api, instance, job)?;
    if job.state != "succeeded" {
        bail!(
            "export of {instance} failed: {}{}",
            job.reason.as_deref().unwrap_or("no reason given"),
            if dest.is_some() {
                " (no file was written)"
            } else {
                ""
            }
        );
    }
    copied?;
    match &job.stream {
        Some(host) if *host == ours => {}
        Some(host) => bail!(
            "the dump arrived as {} bytes with SHA-256 {}, but the server sent {} bytes with \
             SHA-256 {}",
            ours.bytes,
            ours.sha256,
            host.bytes,
            host.sha256
        ),
        None => bail!("the server reported no stream for the export"),
    }
    let secs = started.elapsed().as_secs_f64();
    match sink {
        Out::Stdout(mut s) => s.flush()?,
        Out::File { tmp, dest } => {
            tmp.as_file().sync_all()?;
            tmp.persist(&dest)
                .with_context(|| format!("cannot rename the dump to {}", dest.display()))?;
            write_sha256_file(&dest, &ours.sha256)?;
            eprintln!(
                "exported {instance} disk {disk}: {} bytes to {} in {secs:.1}s ({:.1} MiB/s), \
                 SHA-256 {} (in {})",
                ours.bytes,
                dest.display(),
                ours.bytes as f64 / (1 << 20) as f64 / secs.max(1e-3),
                ours.sha256,
                sha256_path(&dest).display()
            );
            return Ok(());
        }
    }
    eprintln!(
        "exported {instance} disk {disk}: {} bytes in {secs:.1}s, SHA-256 {}",
        ours.bytes, ours.sha256
    );
    Ok(())
}

/// `FILE.sha256`.
fn sha256_path(dest: &Path) -> PathBuf {
    let mut p = dest.as_os_str().to_owned();
    p.push(".sha256");
    PathBuf::from(p)
}

/// `FILE.sha256` as sha256sum writes it, through a temporary name.
fn write_sha256_file(dest: &Path, sha256: &str) -> Result<()> {
    let path = sha256_path(dest);
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = dest.file_name().map(|n| n.to_string_lossy().into_owned());
    let mut tmp = tempfile::NamedTempFile::new_in(&dir)?;
    writeln!(tmp, "{sha256}  {}", name.unwrap_or_default())?;
    tmp.persist(&path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

/// The SHA-256 in `FILE.sha256` (its first word).
fn read_sha256_file(file: &Path) -> Result<String> {
    let path = sha256_path(file);
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "cannot read {} (the dump's SHA-256, as `instance export` writes it): give \
             --sha256 HEX instead",
            path.display()
        )
    })?;
    text.split_whitespace()
        .next()
        .map(str::to_string)
        .with_context(|| format!("{} is empty", path.display()))
}

/// Counts what is read, for the progress bar.
struct Counting<R> {
    inner: R,
    bar: Option<indicatif::ProgressBar>,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        if let Some(b) = &self.bar {
            b.inc(n as u64);
        }
        Ok(n)
    }
}

pub fn import(
    api: &Api,
    instance: &str,
    file: &Path,
    disk: usize,
    sha256: Option<&str>,
    output: Output,
) -> Result<()> {
    let sha256 = match sha256 {
        Some(s) => s.to_string(),
        None => read_sha256_file(file)?,
    };
    let f = std::fs::File::open(file).with_context(|| format!("cannot open {}", file.display()))?;
    let len = f.metadata()?.len();
    let bar = bytes_bar(output, Some(len), &format!("sending {}", file.display()));
    let body = Counting {
        inner: f,
        bar: bar.clone(),
    };
    let sent = api.upload(route::import(instance, disk, &sha256), body, len);
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    let job = sent?;
    eprintln!("{len} bytes sent and checked (SHA-256 {sha256}); the import runs");
    crate::install::follow(api, instance, job, output)
}

pub fn rename(api: &Api, instance: &str, to: &str, output: Output) -> Result<()> {
    let renamed = api.send(route::rename(instance, to))?;
    match renamed.job {
        None => {
            eprintln!("renamed {instance} to {to} (its OS has no rename script)");
            Ok(())
        }
        Some(job) => crate::install::follow(api, &job.instance.to_string(), job, output),
    }
}
