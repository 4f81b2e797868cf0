//! The OS definition's four operations as jobs (seed 003): `create` (an
//! install), `export`, `import` and `rename`, each trusted on the host,
//! untrusted in the appliance, or both at once talking through the
//! channel.
//!
//! What differs between them is only what the scripts get:
//!
//! - `create` and `rename`: the disks read-write; `rename` also
//!   `OLD_INSTANCE_NAME` (the current name) with `INSTANCE_NAME` the new
//!   one, and the registry takes the new name only once the scripts
//!   succeeded;
//! - `export`: the disks read-only (`DISK_<n>_ACCESS=ro`, and read-only
//!   virtio disks in the appliance), `EXPORT_DEVICE` and `EXPORT_INDEX`
//!   for the disk asked for; what the script prints on standard output is
//!   the dump, sent through the job's [`DataStream`]: from the appliance
//!   by its agent's upload to `/cradle/latest/os/stream`, from a trusted
//!   script straight from its pipe. When both scripts exist, the
//!   untrusted one's output is the dump and the trusted one's goes to the
//!   appliance over the channel, as for `create`;
//! - `import`: `IMPORT_DEVICE` and `IMPORT_INDEX`; the spooled dump on
//!   standard input: in the appliance from `GET /cradle/latest/os/stream`,
//!   on the host from the spool file itself (again the untrusted script's,
//!   when both exist).
//!
//! Secret parameters reach every script on descriptor 3, as for `create`.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use cradle_model::Instance;
use cradle_model::job::{JobOperation, StreamDigest};
use cradle_os::{Environment, Operation, OsDefinition, Placement};
use cradle_registry::jobs::{AgentStatus, Artifacts, EventKind, InstallJob};
use cradle_registry::stream::{DataStream, Source};
use cradle_registry::{Registry, RegistryError};
use tracing::warn;

use crate::{Installer, StartError, fetch_package};

/// What a job is asked to do.
#[derive(Clone, Debug)]
pub enum OsJob {
    /// An install.
    Create,
    /// Dump disk `disk`, at most `cap` bytes.
    Export { disk: usize, cap: u64 },
    /// Write the spooled dump at `spool` (of `digest`) onto disk `disk`.
    Import {
        disk: usize,
        spool: PathBuf,
        digest: StreamDigest,
    },
    /// Give the instance the name `to`.
    Rename { to: String },
}

impl OsJob {
    pub fn operation(&self) -> JobOperation {
        match self {
            OsJob::Create => JobOperation::Create,
            OsJob::Export { .. } => JobOperation::Export,
            OsJob::Import { .. } => JobOperation::Import,
            OsJob::Rename { .. } => JobOperation::Rename,
        }
    }

    fn os_operation(&self) -> Operation {
        match self {
            OsJob::Create => Operation::Create,
            OsJob::Export { .. } => Operation::Export,
            OsJob::Import { .. } => Operation::Import,
            OsJob::Rename { .. } => Operation::Rename,
        }
    }

    fn disk(&self) -> Option<usize> {
        match self {
            OsJob::Export { disk, .. } | OsJob::Import { disk, .. } => Some(*disk),
            _ => None,
        }
    }
}

/// An OS job, checked.
pub(crate) struct Plan {
    pub(crate) os: OsDefinition,
    pub(crate) variant: Option<String>,
    pub(crate) job: OsJob,
    pub(crate) placement: Placement,
    /// Whether the appliance boots (an untrusted script, or a package).
    pub(crate) appliance: bool,
    pub(crate) guest: Ipv4Addr,
    pub(crate) runner_user: Option<cradle_os::User>,
}

impl Plan {
    pub(crate) fn op(&self) -> &'static str {
        self.job.os_operation().as_str()
    }

    /// Whether the appliance's disks are read-only (an export).
    pub(crate) fn read_only(&self) -> bool {
        matches!(self.job, OsJob::Export { .. })
    }

    /// Whether the trusted script carries the data stream: it does when
    /// no untrusted script runs.
    fn trusted_streams(&self) -> bool {
        self.placement == Placement::Host
    }
}

/// The environment of `op` for `inst`, with the disks at `paths`.
fn environment(
    plan_os: &OsDefinition,
    variant: Option<&str>,
    inst: &Instance,
    job: &OsJob,
    paths: &[PathBuf],
) -> Environment {
    let writable = !matches!(job, OsJob::Export { .. });
    let disks: Vec<cradle_os::Disk> = paths
        .iter()
        .map(|p| cradle_os::Disk {
            path: p.clone(),
            writable,
        })
        .collect();
    let name = match job {
        OsJob::Rename { to } => to.as_str(),
        _ => inst.name.as_str(),
    };
    let mut env = Environment::for_os(plan_os, variant)
        .instance(name, "kvm")
        .disks(&disks)
        .params(&inst.os_params);
    match job {
        OsJob::Export { disk, .. } => {
            env = env
                .set("EXPORT_DEVICE", &paths[*disk].display().to_string())
                .set("EXPORT_INDEX", &disk.to_string());
        }
        OsJob::Import { disk, .. } => {
            env = env
                .set("IMPORT_DEVICE", &paths[*disk].display().to_string())
                .set("IMPORT_INDEX", &disk.to_string());
        }
        OsJob::Rename { .. } => env = env.set("OLD_INSTANCE_NAME", &inst.name),
        OsJob::Create => {}
    }
    env
}

impl Installer {
    /// An OS definition's job: everything checked before it exists.
    pub(crate) fn prepare_os_job(
        &self,
        inst: &Instance,
        full: &str,
        request: OsJob,
    ) -> Result<(InstallJob, Plan, Option<Source>), StartError> {
        let bad = |m: String| Err(StartError::Invalid(m));
        let (name, variant) = cradle_os::split_name(full);
        let os = cradle_os::find(&self.settings.os_search, name)
            .map_err(|e| StartError::Invalid(e.to_string()))?;
        let op = request.os_operation();
        let Some(placement) = os.placement(op) else {
            return Err(StartError::NoScript(format!(
                "OS {name} has no {} script, trusted or untrusted",
                op.as_str()
            )));
        };
        os.check_variant(variant)
            .map_err(|e| StartError::Invalid(e.to_string()))?;
        // Every parameter must be one the OS takes, as Ganeti checks; the
        // personalization credentials are cradle's own.
        let p = &inst.os_params;
        os.check_parameters(
            p.public
                .keys()
                .chain(p.private.keys())
                .chain(p.secret.keys())
                .map(String::as_str)
                .filter(|n| !cradle_model::personalization::CREDENTIAL_PARAMS.contains(n)),
        )
        .map_err(|e| StartError::Invalid(e.to_string()))?;
        let guest = Self::check_machine(inst)?;
        if let Some(disk) = request.disk()
            && disk >= inst.disks.len()
        {
            return bad(format!(
                "instance {} has {} disk(s): there is no disk {disk}",
                inst.name,
                inst.disks.len()
            ));
        }
        // Only an install overlays the personalization package.
        let with_package = matches!(request, OsJob::Create) && inst.personalization_url.is_some();
        let appliance = placement != Placement::Host || with_package;
        if appliance {
            for f in [self.kernel(), self.initrd()] {
                if !f.is_file() {
                    return Err(StartError::Unavailable(format!(
                        "no install appliance: {} is missing (build it with `cradle appliance \
                         build -o {}`, or set [install] appliance)",
                        f.display(),
                        self.settings.appliance.display()
                    )));
                }
            }
        }
        let runner_user = if placement == Placement::Appliance {
            None
        } else if cradle_os::running_as_root() {
            Some(
                cradle_os::User::lookup(&self.settings.script_user)
                    .map_err(|e| StartError::Unavailable(e.to_string()))?,
            )
        } else {
            None
        };
        let mut scripts = BTreeMap::new();
        for (fname, f) in &os.untrusted {
            let bytes = std::fs::read(&f.path).map_err(|e| {
                StartError::Invalid(format!("cannot read {}: {e}", f.path.display()))
            })?;
            scripts.insert(fname.clone(), bytes.into());
        }
        let package = if with_package {
            inst.personalization_url
                .as_deref()
                .map(|url| fetch_package(inst, url))
                .transpose()?
        } else {
            None
        };
        // The environment inside the appliance: the disks are virtio.
        let vdisks: Vec<PathBuf> = (0..inst.disks.len())
            .map(|n| PathBuf::from(format!("/dev/vd{}", (b'a' + n as u8) as char)))
            .collect();
        let env = environment(&os, variant, inst, &request, &vdisks).set("PATH", "/bin");
        let streams = matches!(request, OsJob::Export { .. } | OsJob::Import { .. });
        let manifest = serde_json::json!({
            "operation": op.as_str(),
            "instance": inst.name,
            "env": env.vars(),
            "scripts": scripts.keys().collect::<Vec<_>>(),
            "run": os.untrusted_script(op).map(|_| op.as_str()),
            "stream": (streams && placement != Placement::Host).then(|| serde_json::json!({
                "path": "/cradle/latest/os/stream",
                "direction": if matches!(request, OsJob::Export { .. }) { "out" } else { "in" },
            })),
            "personalization": package.as_ref().map(|_| serde_json::json!({
                "path": "/cradle/latest/os/package",
                "disk": 0,
                "partition": null,
            })),
        });
        let manifest = serde_json::to_vec(&manifest).expect("JSON values serialize");
        let (stream, source) = match &request {
            OsJob::Export { cap, .. } => {
                let (s, rx) = DataStream::export(*cap);
                (Some(s), Some(rx))
            }
            OsJob::Import { spool, digest, .. } => (
                Some(DataStream::import(spool.clone(), digest.clone())),
                None,
            ),
            _ => (None, None),
        };
        let job = InstallJob::for_operation(
            inst,
            request.operation(),
            stream,
            Artifacts {
                manifest: manifest.into(),
                scripts,
                package,
            },
        );
        Ok((
            job,
            Plan {
                os,
                variant: variant.map(str::to_string),
                job: request,
                placement,
                appliance,
                guest,
                runner_user,
            },
            source,
        ))
    }

    /// The trusted script on the host, on a blocking thread; its output
    /// becomes the job's `trusted` events (and, when it carries the
    /// export, the dump). Yields its exit code.
    pub(crate) fn spawn_trusted(
        &self,
        job: &Arc<InstallJob>,
        inst: &Arc<Instance>,
        plan: &Plan,
    ) -> tokio::task::JoinHandle<Result<i32, String>> {
        let op = plan.job.os_operation();
        let script = plan.os.trusted.get(&op).cloned();
        let paths: Vec<PathBuf> = inst.disks.iter().map(|d| PathBuf::from(&d.path)).collect();
        let env = environment(&plan.os, plan.variant.as_deref(), inst, &plan.job, &paths);
        let secrets = inst.os_params.secret.clone();
        let runner = cradle_os::Runner {
            user: plan.runner_user.clone(),
            timeout: self.settings.timeout,
        };
        let carries = plan
            .trusted_streams()
            .then(|| job.stream().cloned())
            .flatten();
        let job = job.clone();
        let (registry, id) = (self.registry.clone(), inst.id);
        let op = op.as_str();
        tokio::task::spawn_blocking(move || {
            let Some(script) = script else {
                return Ok(0);
            };
            job.note(
                EventKind::Job,
                &format!("trusted {op} running on the host: {}", script.display()),
            );
            let mut streams = cradle_os::Streams::default();
            let mut sink = None;
            match carries {
                Some(s) if s.is_export() => {
                    let taken = Arc::new(Mutex::new(Some(s.take_export()?)));
                    let chunks = taken.clone();
                    streams.stdout_data = Some(Box::new(move |chunk: &[u8]| {
                        let mut held = chunks.lock().unwrap_or_else(|e| e.into_inner());
                        match held.as_mut() {
                            Some(sink) => sink
                                .blocking_send(Bytes::copy_from_slice(chunk))
                                .map_err(|e| e.to_string()),
                            None => Err("the export's stream is closed".into()),
                        }
                    }));
                    sink = Some(taken);
                }
                Some(s) => streams.stdin_file = Some(s.open_import()?.0),
                None => {
                    // Its standard output goes to the appliance too (read
                    // from /cradle/latest/read); what the appliance writes
                    // on the channel comes in on its standard input,
                    // through a bounded queue.
                    streams.stdin = Some(job.forward_to_script());
                }
            }
            let lines = job.clone();
            let to_guest = streams.stdin.is_some();
            streams.on_line = Some(Box::new(move |stream, line| {
                lines.note(EventKind::Trusted, &format!("{stream}: {line}"));
                if stream == "stdout" && to_guest {
                    to_appliance(&registry, &lines, id, line);
                }
            }));
            let done = cradle_os::run_trusted_with(&script, &[], &env, &secrets, &runner, streams);
            job.stop_forwarding();
            let done = done.map_err(|e| format!("the trusted {op} script: {e}"))?;
            if let Some(e) = &done.data_error {
                return Err(format!("the trusted {op} script's dump: {e}"));
            }
            let code = crate::exit_code(&done.status);
            let held = sink.and_then(|s| s.lock().unwrap_or_else(|e| e.into_inner()).take());
            if let Some(sink) = held
                && code == 0
            {
                // All of it was printed: the stream's end, and its digest.
                sink.finish();
            }
            Ok(code)
        })
    }
}

/// After the scripts succeeded: the data stream's two ends agree (the
/// appliance's count with the host's, when `untrusted` scripts carried
/// it), and a rename's new name is taken. A note for the job's end.
pub(crate) fn conclude(
    registry: &Registry,
    job: &InstallJob,
    request: &OsJob,
    untrusted: bool,
    agent: Option<&AgentStatus>,
) -> Result<Option<String>, String> {
    let op = request.os_operation().as_str();
    if let OsJob::Rename { to } = request {
        let patch = cradle_model::api::InstancePatch {
            name: Some(to.clone()),
            ..Default::default()
        };
        registry
            .modify(&job.instance.to_string(), patch)
            .map_err(|e| {
                format!("the rename script succeeded, but the registry refused {to:?}: {e}")
            })?;
        return Ok(Some(format!("renamed to {to}")));
    }
    let Some(stream) = job.stream() else {
        return Ok(None);
    };
    let Some(host) = stream.complete() else {
        return Err(format!(
            "the {op} script ended before its whole dump was sent"
        ));
    };
    if let Some(agent) = agent.filter(|_| untrusted) {
        match &agent.stream {
            None => {
                return Err(format!(
                    "the appliance reported no stream for the {op}: the dump was not {}",
                    if stream.is_export() { "sent" } else { "read" }
                ));
            }
            Some(a) if *a != host => {
                return Err(format!(
                    "the dump's ends disagree: the appliance counted {} bytes with SHA-256 \
                         {}, the host {} bytes with SHA-256 {}",
                    a.bytes, a.sha256, host.bytes, host.sha256
                ));
            }
            Some(_) => {}
        }
    }
    Ok(Some(format!(
        "{} bytes, SHA-256 {}",
        host.bytes, host.sha256
    )))
}

/// Queue a line of the trusted script's output for the appliance. The
/// queue is bounded (`[channel] queue_len`): while it is full the script's
/// reader waits here, so the script itself is slowed by its full pipe; the
/// line is dropped only when the job ends first.
pub(crate) fn to_appliance(registry: &Registry, job: &InstallJob, id: uuid::Uuid, line: &str) {
    let mut pause = Duration::from_millis(5);
    loop {
        match registry.push_message(
            id,
            cradle_registry::ChannelDirection::ToGuest,
            line.as_bytes(),
        ) {
            Ok(_) => return,
            Err(RegistryError::QueueFull(_)) if job.is_running() => {
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(200));
            }
            Err(e) => {
                warn!(instance = %id, error = %e, "cannot queue the trusted script's line for the appliance");
                return;
            }
        }
    }
}
#[cfg(test)]
mod tests {
    use super::*;
    use cradle_registry::ChannelDirection;

    fn registry(queue_len: usize) -> (Arc<Registry>, tempfile::TempDir) {
        let tmp = tempfile::tempdir().unwrap();
        let store = cradle_store::SqliteStore::open(&tmp.path().join("db")).unwrap();
        let limits = cradle_registry::ChannelLimits {
            queue_len,
            message_bytes: 1024,
        };
        (
            Arc::new(Registry::open(Arc::new(store), limits, "node1").unwrap()),
            tmp,
        )
    }

    fn running_job(registry: &Registry) -> (Arc<InstallJob>, uuid::Uuid) {
        let spec = cradle_model::api::InstanceSpec {
            name: "web".into(),
            metadata_address: Some("169.254.7.7".into()),
            ..Default::default()
        };
        let inst = registry.create(spec, Vec::new()).unwrap();
        let artifacts = Artifacts {
            manifest: bytes::Bytes::from_static(b"{}"),
            scripts: BTreeMap::new(),
            package: None,
        };
        let job = registry
            .begin_install(InstallJob::new(&inst, artifacts))
            .unwrap();
        (job, inst.id)
    }

    #[test]
    fn a_trusted_scripts_lines_wait_for_room_and_none_is_dropped() {
        let (registry, _tmp) = registry(2);
        let (job, id) = running_job(&registry);
        let (r, j) = (registry.clone(), job.clone());
        let writer = std::thread::spawn(move || {
            for n in 0..6 {
                to_appliance(&r, &j, id, &format!("line {n}"));
            }
        });
        let mut read = Vec::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while read.len() < 6 && std::time::Instant::now() < deadline {
            match registry.pop_message(id, ChannelDirection::ToGuest).unwrap() {
                Some(m) => read.push(String::from_utf8(m.body).unwrap()),
                None => std::thread::sleep(Duration::from_millis(20)),
            }
        }
        writer.join().unwrap();
        let want: Vec<String> = (0..6).map(|n| format!("line {n}")).collect();
        assert_eq!(read, want);
    }

    #[test]
    fn a_full_queue_holds_the_script_only_while_the_job_runs() {
        let (registry, _tmp) = registry(1);
        let (job, id) = running_job(&registry);
        to_appliance(&registry, &job, id, "fills the queue");
        registry.end_install(&job, false, None).unwrap();
        let started = std::time::Instant::now();
        to_appliance(&registry, &job, id, "nobody will read this");
        assert!(started.elapsed() < Duration::from_secs(5));
    }
}
