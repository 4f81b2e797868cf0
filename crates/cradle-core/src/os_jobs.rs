//! The OS definition's other operations: export, import and rename, as
//! jobs of the one job model (`cradle-install`'s `os_job.rs` runs them),
//! and the two ends of their data stream.
//!
//! - An export's dump leaves through the operation's answer: the front end
//!   streams the [`Export`]'s source while the job runs.
//! - An import's dump arrives as the request's body. It is spooled to
//!   `<data_dir>/spool` (0600, never held in memory), counted against the
//!   cap and hashed; only when its SHA-256 is the one the operator gave
//!   (from the `.sha256` file the export wrote beside the dump) does the
//!   job start, so a corrupted or truncated dump never reaches a script.
//! - The appliance's side: [`Core::stream_upload`] takes an export's dump
//!   from the agent, [`Core::stream_download`] hands it an import's; only
//!   the instance's own running job of the right kind may use them.

use std::sync::Arc;

use bytes::Bytes;
use cradle_install::OsJob;
use cradle_model::answers::RenameView;
use cradle_model::api::{InstancePatch, InstanceView};
use cradle_model::job::{JobOperation, JobView, StreamCounter, StreamDigest};
use cradle_model::{Instance, State};
use cradle_registry::jobs::InstallJob;
use cradle_registry::stream::{Sink, SinkError, Source};
use http_body_util::BodyExt;
use tokio::io::AsyncWriteExt;

use crate::install::start_error;
use crate::{Caller, Core, Error, Guest, Kind};

/// An export that started: its job, and the dump as it comes.
pub struct Export {
    pub job: JobView,
    pub source: Source,
    /// The running job, which the answer watches: when it ends, the answer
    /// ends.
    pub running: Arc<InstallJob>,
}

/// A SHA-256 as the operator gives it: 64 hex digits, any case.
fn parse_sha256(v: &str) -> Result<String, Error> {
    cradle_model::personalization::parse_sha256(v.trim())
        .map_err(|e| Error::refused(Kind::Invalid, "invalid", format!("sha256: {e}")))
}

impl Core {
    /// The instance, if `caller` may change it and a job may run on it
    /// now: served here, its VM not running, no job running.
    fn for_job(&self, caller: &Caller, key: &str, what: &str) -> Result<Arc<Instance>, Error> {
        let inst = self.changeable(caller, key)?;
        if !self.registry.is_local(&inst) {
            return Err(Error::refused(
                Kind::Conflict,
                "wrong_host",
                format!(
                    "instance {} is served by host {}: {what} it there",
                    inst.name, inst.host
                ),
            ));
        }
        if inst.state.is_busy() {
            return Err(Error::refused(
                Kind::Conflict,
                "busy",
                format!("instance {} is {}", inst.name, inst.state.busy_with()),
            ));
        }
        if inst.state == State::Running {
            return Err(Error::refused(
                Kind::Conflict,
                "running",
                format!(
                    "instance {} is running: stop it (cradle instance stop) before you {what} it, \
                     so that its disks do not change under the script",
                    inst.name
                ),
            ));
        }
        Ok(inst)
    }

    /// Start an export of disk `disk`: its OS's `export` runs (trusted on
    /// the host, untrusted in the appliance with the disks read-only) and
    /// what it prints is the answer.
    pub async fn start_export(
        &self,
        caller: &Caller,
        key: &str,
        disk: usize,
    ) -> Result<Export, Error> {
        let inst = self.for_job(caller, key, "export")?;
        let cap = self.installer.settings().stream_max_bytes;
        let (job, source) = self
            .installer
            .start_job(inst, OsJob::Export { disk, cap })
            .await
            .map_err(start_error)?;
        let source = source.ok_or_else(|| Error::Internal("an export without a stream".into()))?;
        Ok(Export {
            job: job.view(0),
            source,
            running: job,
        })
    }

    /// Start an import of `body` onto disk `disk`, once all of it is
    /// spooled and its SHA-256 is `sha256`. Everything that can be checked
    /// is checked before a byte is read.
    pub async fn start_import<B>(
        &self,
        caller: &Caller,
        key: &str,
        disk: usize,
        sha256: &str,
        length: Option<u64>,
        body: B,
    ) -> Result<JobView, Error>
    where
        B: http_body::Body<Data = Bytes> + Unpin,
        B::Error: std::fmt::Display,
    {
        let want = parse_sha256(sha256)?;
        let inst = self.for_job(caller, key, "import")?;
        let settings = self.installer.settings();
        let cap = settings.stream_max_bytes;
        if let Some(n) = length.filter(|n| *n > cap) {
            return Err(Error::refused(
                Kind::TooLarge,
                "too_large",
                format!(
                    "the dump is {n} bytes, past the cap of {cap} ([install] stream_max_bytes)"
                ),
            ));
        }
        let dir = settings.spool_dir.clone();
        let spool = dir.join(format!("import-{}.dump", uuid::Uuid::new_v4()));
        {
            let (installer, probe, check) = (self.installer.clone(), inst.clone(), spool.clone());
            let dir = dir.clone();
            crate::blocking(move || {
                Ok(installer
                    .check_job(
                        &probe,
                        OsJob::Import {
                            disk,
                            spool: check,
                            digest: StreamDigest {
                                bytes: 0,
                                sha256: String::new(),
                            },
                        },
                    )
                    .and_then(|()| {
                        std::fs::create_dir_all(&dir).map_err(|e| {
                            cradle_install::StartError::Unavailable(format!(
                                "cannot create the spool directory {}: {e}",
                                dir.display()
                            ))
                        })
                    }))
            })
            .await?
            .map_err(start_error)?;
        }
        let spooled = spool_body(&spool, cap, body).await;
        let digest = match spooled {
            Ok(d) => d,
            Err(e) => {
                let _ = tokio::fs::remove_file(&spool).await;
                return Err(e);
            }
        };
        if digest.sha256 != want {
            let _ = tokio::fs::remove_file(&spool).await;
            return Err(Error::refused(
                Kind::Invalid,
                "checksum",
                format!(
                    "the dump's SHA-256 is {} ({} bytes), not {want} as given: it is corrupted \
                     or truncated; nothing was started and the disk is unchanged",
                    digest.sha256, digest.bytes
                ),
            ));
        }
        // Looked up again: it may have changed while the dump came in.
        let inst = match self.for_job(caller, key, "import") {
            Ok(i) => i,
            Err(e) => {
                let _ = tokio::fs::remove_file(&spool).await;
                return Err(e);
            }
        };
        let request = OsJob::Import {
            disk,
            spool: spool.clone(),
            digest,
        };
        match self.installer.start_job(inst, request).await {
            Ok((job, _)) => Ok(job.view(0)),
            Err(e) => {
                let _ = tokio::fs::remove_file(&spool).await;
                Err(start_error(e))
            }
        }
    }

    /// Rename the instance to `to`: its OS's `rename` runs first when it
    /// has one (the new name is taken only when it succeeded); otherwise
    /// the registry renames it at once.
    pub async fn rename(&self, caller: &Caller, key: &str, to: &str) -> Result<RenameView, Error> {
        let inst = self.for_job(caller, key, "rename")?;
        // The name must be one the registry would take, and free.
        let patch = InstancePatch {
            name: Some(to.to_string()),
            ..Default::default()
        };
        patch
            .clone()
            .apply(&inst, time::OffsetDateTime::now_utc())
            .map_err(|e| Error::Registry(cradle_registry::RegistryError::Invalid(e)))?;
        if to != inst.name && self.registry.get(to).is_ok() {
            return Err(Error::refused(
                Kind::Conflict,
                "conflict",
                format!("an instance is named {to:?} already"),
            ));
        }
        let started = self
            .installer
            .start_job(inst.clone(), OsJob::Rename { to: to.to_string() })
            .await;
        let job = match started {
            Ok((job, _)) => job,
            // No rename script (or no OS at all): the registry alone.
            Err(cradle_install::StartError::NoScript(_)) => {
                let registry = self.registry.clone();
                let id = inst.id.to_string();
                let renamed =
                    crate::blocking(move || registry.modify(&id, patch).map_err(Error::from))
                        .await?;
                return Ok(RenameView {
                    instance: InstanceView::from(&*renamed),
                    job: None,
                });
            }
            Err(e) => return Err(start_error(e)),
        };
        let now = self.registry.get(&inst.id.to_string())?;
        Ok(RenameView {
            instance: InstanceView::from(&*now),
            job: Some(job.view(0)),
        })
    }

    /// The appliance uploads its export's dump: only the instance's own
    /// running export, once. Each chunk is counted, hashed and capped,
    /// then queued for the operator's answer (waiting while it is full).
    pub async fn stream_upload<B>(&self, guest: &Guest, mut body: B) -> Result<StreamDigest, Error>
    where
        B: http_body::Body<Data = Bytes> + Unpin,
        B::Error: std::fmt::Display,
    {
        let (job, mut sink) = self.export_sink(guest)?;
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| {
                Error::refused(
                    Kind::BadRequest,
                    "bad_request",
                    format!("the upload broke: {e}"),
                )
            })?;
            let Ok(chunk) = frame.into_data() else {
                continue;
            };
            if let Err(e) = sink.send(chunk).await {
                let why = format!("the appliance's export: {e}");
                // The job ends on it now, not when the appliance gives up.
                if let Some(s) = job.stream() {
                    s.fail(why.clone());
                }
                job.note(cradle_registry::jobs::EventKind::Job, &why);
                return Err(match e {
                    SinkError::Cap(_) => Error::refused(Kind::TooLarge, "too_large", why),
                    SinkError::Gone => Error::refused(Kind::Conflict, "gone", why),
                });
            }
        }
        Ok(sink.finish())
    }

    fn export_sink(&self, guest: &Guest) -> Result<(Arc<InstallJob>, Sink), Error> {
        let none = || Error::not_found("no_stream", "no export of this instance is running");
        let job = self
            .registry
            .running_install(guest.id())
            .filter(|j| j.operation == JobOperation::Export)
            .ok_or_else(none)?;
        let stream = job.stream().ok_or_else(none)?;
        let sink = stream
            .take_export()
            .map_err(|e| Error::refused(Kind::Conflict, "stream_taken", e))?;
        Ok((job, sink))
    }

    /// The appliance reads its import's dump: only the instance's own
    /// running import, once; the file and what it holds.
    pub fn stream_download(&self, guest: &Guest) -> Result<(std::fs::File, StreamDigest), Error> {
        let none = || Error::not_found("no_stream", "no import of this instance is running");
        let job = self
            .registry
            .running_install(guest.id())
            .filter(|j| j.operation == JobOperation::Import)
            .ok_or_else(none)?;
        job.stream()
            .ok_or_else(none)?
            .open_import()
            .map_err(|e| Error::refused(Kind::Conflict, "stream_taken", e))
    }
}

/// Write `body` to `path` (created 0600, new), counting and hashing it,
/// refused past `cap`.
async fn spool_body<B>(path: &std::path::Path, cap: u64, mut body: B) -> Result<StreamDigest, Error>
where
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    let io = |e: std::io::Error| {
        Error::unavailable(
            "spool",
            format!("cannot spool the dump to {}: {e}", path.display()),
        )
    };
    let mut f = tokio::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .await
        .map_err(io)?;
    let mut counted = StreamCounter::default();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| {
            Error::refused(
                Kind::BadRequest,
                "bad_request",
                format!(
                    "the dump's upload broke after {} bytes: {e}; nothing was started",
                    counted.bytes()
                ),
            )
        })?;
        let Ok(chunk) = frame.into_data() else {
            continue;
        };
        if counted.bytes() + chunk.len() as u64 > cap {
            return Err(Error::refused(
                Kind::TooLarge,
                "too_large",
                format!("the dump passed the cap of {cap} bytes ([install] stream_max_bytes)"),
            ));
        }
        counted.update(&chunk);
        f.write_all(&chunk).await.map_err(io)?;
    }
    f.flush().await.map_err(io)?;
    Ok(counted.finish())
}
