//! `cradle-agent`: the install appliance's `/init`, PID 1 of a throwaway VM,
//! and, as `cradle-agent guest`, the agent of a running guest ([`guest`]).
//!
//! Built static (`cargo rustc -p cradle-agent --release -- -C
//! target-feature=+crt-static`), so the initramfs needs no C library. In
//! order:
//!
//! 1. mount proc, sysfs and devtmpfs, and tmpfs on `/tmp` and `/run`; load
//!    the modules `cradle appliance build` put in `/lib/modules`, in the
//!    order of `/lib/modules/load.order`; say on the console which disks
//!    it sees;
//! 2. read `cradle.address` and `cradle.metadata` from the kernel command
//!    line ([`cmdline`]); without an address there is nothing to install;
//! 3. give the NIC that address ([`net`]) and ask the metadata service for
//!    the install job (`/cradle/latest/install.json`, [`job`]); a 404 means
//!    there is none;
//! 4. fetch the OS scripts into `/run/cradle/os`, and run the job's script
//!    with exactly the job's environment and the secret parameters on
//!    descriptor 3 ([`script`]), sending its output to the host as it
//!    comes ([`lines`], [`report`]);
//! 5. when it succeeded, overlay the personalization package onto the
//!    target disk ([`overlay`]);
//! 6. report the status (exit code, error, last lines of output), sync and
//!    power the VM off.
//!
//! Every step and every error is said on the console (`cradle-agent: …`,
//! never a secret) and, once the network is up, sent to the host through
//! the write channel. As PID 1 the agent must never exit (the kernel would
//! panic): errors end the job, not the process, and a panic is said on the
//! console, reported as a failed status when the service is known, and
//! followed by power-off.

mod cmdline;
#[cfg(test)]
mod fuzz;
mod guest;
mod http;
mod job;
mod lines;
mod net;
mod overlay;
mod report;
mod script;
mod stream;
mod system;

use std::io::Write;
use std::net::SocketAddrV4;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use http::Client;
use job::Job;
use lines::Tail;
use report::Reporter;
use system::{mount, say};

const JOB_PATH: &str = "/cradle/latest/install.json";
const PARAMETERS_PATH: &str = "/cradle/latest/os/parameters.json";
const SCRIPTS_PATH: &str = "/cradle/latest/os/scripts/";
/// Where the OS scripts are written, and run from.
const OS_DIR: &str = "/run/cradle/os";
/// The largest install.json or parameters.json taken.
const MAX_DOCUMENT: u64 = 1 << 20;
/// The largest script taken (an OS definition's untrusted files are at
/// most 1 MiB each).
const MAX_SCRIPT: u64 = 1 << 20;
/// How long the first request is tried: the link may take a moment.
const FIRST_REQUEST_RETRY: Duration = Duration::from_secs(30);

/// The metadata service, once the network is up: the panic hook reports
/// through it.
static SERVICE: OnceLock<SocketAddrV4> = OnceLock::new();
/// Whether the status has been sent (or is being sent): at most once.
static STATUS_SENT: AtomicBool = AtomicBool::new(false);

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).is_some_and(|a| a == "guest") {
        std::process::exit(guest::main(&args[2..]));
    }
    if std::process::id() != 1 {
        // The appliance's role powers the machine off: only as PID 1.
        eprintln!(
            "cradle-agent runs as the install appliance's /init (PID 1) or as\n\
             `cradle-agent guest` in a running guest.\n\n{}",
            guest::USAGE
        );
        std::process::exit(2);
    }
    std::panic::set_hook(Box::new(|info| {
        say(&format!("panic: {info}"));
        if let Some(service) = SERVICE.get()
            && !STATUS_SENT.swap(true, Ordering::SeqCst)
        {
            let body = report::status_body(
                1,
                Some(&format!("the agent panicked: {info}")),
                &Tail::default(),
            );
            let _ = Client::new(*service).write_retrying(&body, Duration::from_secs(5));
        }
        say("powering off");
        system::power_off();
    }));
    say(&format!("started ({})", env!("CARGO_PKG_VERSION")));
    boot();
    install();
    say("powering off");
    system::power_off();
}

/// Mount the kernel's filesystems, load the modules, wait for the disks.
fn boot() {
    for (source, target, fstype, data) in [
        ("proc", "/proc", "proc", ""),
        ("sysfs", "/sys", "sysfs", ""),
        ("devtmpfs", "/dev", "devtmpfs", ""),
        ("tmpfs", "/tmp", "tmpfs", "mode=1777"),
        ("tmpfs", "/run", "tmpfs", "mode=0755"),
    ] {
        if let Err(e) = mount(source, target, fstype, data) {
            say(&format!("cannot mount {target}: {e}"));
        }
    }
    let order = std::fs::read_to_string("/lib/modules/load.order").unwrap_or_default();
    let mut loaded = Vec::new();
    for name in order.lines().map(str::trim).filter(|l| !l.is_empty()) {
        match system::load_module(&format!("/lib/modules/{name}.ko")) {
            Ok(()) => loaded.push(name.to_string()),
            Err(e) => say(&format!("cannot load module {name}: {e}")),
        }
    }
    say(&format!("modules loaded: {}", loaded.join(" ")));
    // Block devices show up as their drivers probe; give them a moment.
    let mut disks = Vec::new();
    for _ in 0..50 {
        disks = system::block_devices();
        if !disks.is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    say(&format!("disks: {}", disks.join(" ")));
}

/// Find the job and run it; report its status when there is a service to
/// report to.
fn install() {
    let cmdline = match std::fs::read_to_string("/proc/cmdline") {
        Ok(c) => c,
        Err(e) => return say(&format!("cannot read /proc/cmdline: {e}")),
    };
    let boot = match cmdline::parse(&cmdline) {
        Ok(b) => b,
        Err(e) => return say(&format!("bad kernel command line: {e}")),
    };
    let Some(address) = boot.address else {
        return say("no cradle.address on the kernel command line: nothing to install");
    };
    let nic = match net::configure(address) {
        Ok(n) => n,
        Err(e) => return say(&e),
    };
    say(&format!("network: {nic} {address}/{}", net::PREFIX));
    let _ = SERVICE.set(boot.metadata);
    let client = Client::new(boot.metadata);
    let reporter = Reporter::new(&client);
    say(&format!(
        "asking {} for the install job",
        client.url(JOB_PATH)
    ));
    let job = match client.get_bytes_retrying(JOB_PATH, MAX_DOCUMENT, FIRST_REQUEST_RETRY) {
        Ok(None) => {
            return say("no install job for this instance (404): nothing to do");
        }
        Ok(Some(body)) => job::parse_job(&body),
        Err(e) => Err(e.message),
    };
    let mut tail = Tail::default();
    let mut streamed = None;
    let outcome = job.map_err(agent_failure).and_then(|job| {
        say(&format!(
            "job {:?}: {:?} of {:?}",
            job.job, job.operation, job.instance
        ));
        run_job(&client, &reporter, &job, &mut tail, &mut streamed)
    });
    if STATUS_SENT.swap(true, Ordering::SeqCst) {
        return;
    }
    match outcome {
        Ok(()) => reporter.status(0, None, &tail, streamed.as_ref()),
        Err(f) => reporter.status(f.exit_code, Some(&f.error), &tail, streamed.as_ref()),
    }
}

/// A job that did not succeed: the exit code to report and why.
struct Failed {
    exit_code: i32,
    error: String,
}

/// A failure of the agent's own (not the script's): exit code 1.
fn agent_failure(error: String) -> Failed {
    Failed {
        exit_code: 1,
        error,
    }
}

fn run_job(
    client: &Client,
    reporter: &Reporter,
    job: &Job,
    tail: &mut Tail,
    streamed: &mut Option<cradle_model::job::StreamDigest>,
) -> Result<(), Failed> {
    if !job.scripts.is_empty() {
        let n = job.scripts.len();
        reporter.progress(&format!(
            "fetching {n} script{}",
            if n == 1 { "" } else { "s" }
        ));
        fetch_scripts(client, &job.scripts).map_err(agent_failure)?;
    }
    if let Some(run) = &job.run {
        let secrets = match client.get_bytes(PARAMETERS_PATH, MAX_DOCUMENT) {
            Ok(Some(body)) => job::secrets(&body).map_err(agent_failure)?,
            Ok(None) => {
                return Err(agent_failure(format!(
                    "GET {}: 404 Not Found",
                    client.url(PARAMETERS_PATH)
                )));
            }
            Err(e) => return Err(agent_failure(e.message)),
        };
        reporter.progress(&format!("running {run}"));
        if !secrets.is_empty() {
            say(&format!(
                "{} secret parameter(s) on descriptor {}",
                secrets.len(),
                script::SECRETS_FD
            ));
        }
        let path = Path::new(OS_DIR).join(run);
        let data = match &job.stream {
            None => stream::Data::None,
            Some(s) if s.direction == job::Direction::Out => stream::Data::Out {
                client,
                path: &s.path,
            },
            Some(s) => stream::Data::In {
                client,
                path: &s.path,
            },
        };
        let ran =
            script::run(&path, &job.env, &secrets, reporter, tail, data).map_err(agent_failure)?;
        let status = ran.status;
        if !status.success() {
            return Err(Failed {
                exit_code: script::exit_code(status),
                error: script::describe(run, status),
            });
        }
        match ran.stream {
            None => {}
            Some(Ok(d)) => {
                say(&format!("dump: {} bytes, SHA-256 {}", d.bytes, d.sha256));
                *streamed = Some(d);
            }
            Some(Err(e)) => return Err(agent_failure(e)),
        }
        say(&format!("{run} succeeded"));
    }
    if let Some(p) = &job.personalization {
        reporter.progress(&format!("personalizing disk {}", p.disk));
        let done = overlay::apply(client, p).map_err(agent_failure)?;
        reporter.progress(&format!("personalized: {done}"));
    }
    reporter.progress("done");
    Ok(())
}

/// Fetch every script into [`OS_DIR`], mode 0755.
fn fetch_scripts(client: &Client, names: &[String]) -> Result<(), String> {
    std::fs::create_dir_all(OS_DIR).map_err(|e| format!("cannot create {OS_DIR}: {e}"))?;
    for name in names {
        job::check_script_name(name)?;
        let path = format!("{SCRIPTS_PATH}{name}");
        let body = client
            .get_bytes(&path, MAX_SCRIPT)?
            .ok_or_else(|| format!("GET {}: 404 Not Found", client.url(&path)))?;
        let dest = Path::new(OS_DIR).join(name);
        let write = || -> std::io::Result<()> {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o755)
                .open(&dest)?;
            f.write_all(&body)?;
            f.set_permissions(std::fs::Permissions::from_mode(0o755))
        };
        write().map_err(|e| format!("cannot write {}: {e}", dest.display()))?;
    }
    Ok(())
}
