//! `cradle personalize`: verify a personalization package, and overlay it
//! onto a directory tree or an ext2/3/4 disk image (cradle-personalize).
//! The package is a local file, a URL, or an instance's own package fetched
//! through the admin API (which holds its secret download credentials).

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use cradle_model::api::InstanceView;
use cradle_personalize::{
    Control, Credentials, Fetched, Kind, Limits, Manifest, Phase, apply_to_dir_with,
    apply_to_image_with, check_sha256, fetch_with_progress, receive, verify_with,
};

use crate::ApiArgs;
use cradle_client::route;

#[derive(Args, Debug)]
pub struct PersonalizeArgs {
    #[command(flatten, next_help_heading = "Admin API (for --instance)")]
    api: ApiArgs,
    #[command(subcommand)]
    command: PersonalizeCommand,
}

#[derive(Subcommand, Debug)]
enum PersonalizeCommand {
    /// Read a package to the end and list what it would write, or say why it is refused.
    #[command(
        after_help = "A package is a .tar.gz (or .tgz) of regular files, directories, \
symlinks and hardlinks to earlier files of the same package. Refused: absolute paths, '..', a \
path through a symlink, device nodes, FIFOs and sockets, names that are not UTF-8 or hold control \
characters, setuid and setgid bits (unless --allow-setid), and packages over the size, entry or \
compression-ratio caps. Owners are kept as numbers; modes and times are kept."
    )]
    Check {
        #[command(flatten)]
        source: Source,
        /// Allow setuid and setgid bits.
        #[arg(long)]
        allow_setid: bool,
    },
    /// Verify a package, then overlay it onto a directory tree or an ext2/3/4 disk image.
    #[command(
        after_help = "Nothing is written unless the whole package passes, and the \
target is checked first too: a symlink already on the target in an entry's way, a file where a \
directory must go, or a directory where a file must go refuses the package. Files replace \
existing ones through a temporary name renamed into place.\n\n\
Progress shows per phase (downloading, verifying, staging, writing). Ctrl-C or SIGTERM before the \
writing phase stops with the target unchanged; once writing has begun it is finished, so a \
filesystem is never left half-written."
    )]
    Apply {
        #[command(flatten)]
        source: Source,
        /// A directory (a root filesystem), or a raw disk image with an ext2/3/4 filesystem.
        #[arg(long = "to", value_name = "DIR|IMAGE")]
        to: PathBuf,
        /// The image's partition holding the filesystem (1-based, MBR or GPT); the whole image if not given.
        #[arg(long, value_name = "N")]
        partition: Option<u32>,
        /// Allow setuid and setgid bits.
        #[arg(long)]
        allow_setid: bool,
    },
}

/// Where a package comes from: a local file, a URL fetched first, or an
/// instance's package.
#[derive(Args, Debug)]
struct Source {
    /// A .tar.gz/.tgz file, or an http, https or file URL.
    #[arg(required_unless_present = "instance")]
    package: Option<String>,
    /// Use this instance's personalization package (its personalization_url,
    /// fetched by the server with the instance's secret download credentials,
    /// and checked against its personalization_sha256).
    #[arg(
        long,
        value_name = "NAME|ID",
        conflicts_with_all = ["package", "sha256", "http_user", "password_file", "bearer_token_file"]
    )]
    instance: Option<String>,
    /// Pin the package's content to this SHA-256 (hex).
    #[arg(long, value_name = "HEX")]
    sha256: Option<String>,
    /// HTTP basic-auth user for the download (password from --password-file).
    #[arg(long, value_name = "USER", requires = "password_file")]
    http_user: Option<String>,
    /// File holding the basic-auth password (never given on the command line).
    #[arg(long, value_name = "FILE")]
    password_file: Option<PathBuf>,
    /// File holding a bearer token for the download.
    #[arg(long, value_name = "FILE", conflicts_with = "http_user")]
    bearer_token_file: Option<PathBuf>,
}

/// A package ready to read: a local file, or a download (an anonymous
/// temporary file with no name on disk, gone when this is dropped or the
/// process dies).
struct Package {
    path: PathBuf,
    _download: Option<Fetched>,
}

impl From<Fetched> for Package {
    fn from(f: Fetched) -> Package {
        Package {
            path: f.path().to_path_buf(),
            _download: Some(f),
        }
    }
}

fn obtain(src: &Source, api: &ApiArgs, bar: &Bar) -> Result<Package> {
    if let Some(instance) = &src.instance {
        return from_instance(instance, api, bar);
    }
    let p = src
        .package
        .as_deref()
        .expect("clap requires PACKAGE or --instance");
    if p.starts_with("http://") || p.starts_with("https://") || p.starts_with("file://") {
        let secret = |f: &PathBuf| -> Result<String> {
            let s = std::fs::read_to_string(f)
                .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", f.display()))?;
            Ok(s.trim_end_matches(['\n', '\r']).to_string())
        };
        let creds = match (&src.http_user, &src.password_file, &src.bearer_token_file) {
            (Some(u), Some(pf), _) => Credentials::Basic {
                user: u.clone(),
                password: secret(pf)?,
            },
            (_, _, Some(tf)) => Credentials::Bearer(secret(tf)?),
            _ => Credentials::None,
        };
        bar.download();
        let f = fetch_with_progress(
            p,
            &creds,
            Limits::default().max_compressed,
            src.sha256.as_deref(),
            &mut |done, total| bar.bytes(done, total),
        )?;
        return Ok(f.into());
    }
    let path = PathBuf::from(p);
    check_extension(&path)?;
    if let Some(want) = &src.sha256 {
        check_sha256(&path, want)?;
    }
    Ok(Package {
        path,
        _download: None,
    })
}

/// Fetch an instance's package through the admin API into an anonymous
/// file, and check it against the pin the instance carries and the hash the
/// server computed.
fn from_instance(key: &str, args: &ApiArgs, bar: &Bar) -> Result<Package> {
    let api = crate::client::connect(args)?;
    let view: InstanceView = api.send(route::instance(key))?;
    let Some(url) = &view.personalization_url else {
        bail!("instance {} has no personalization_url", view.name);
    };
    bar.download();
    let mut resp = api
        .open(route::personalization_package(&view.id.to_string()))
        .with_context(|| format!("cannot fetch the personalization package of {}", view.name))?;
    let served = resp
        .headers()
        .get(cradle_client::SHA256_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let total = resp.content_length();
    // Hashed as it arrives: the instance's pin is checked by receive, the
    // hash the server computed here, without reading the file again.
    let fetched = receive(
        &mut resp,
        total,
        url,
        Limits::default().max_compressed,
        view.personalization_sha256.as_deref(),
        &mut |done, total| bar.bytes(done, total),
    )?;
    if let Some(served) = served
        && !served.eq_ignore_ascii_case(&fetched.sha256)
    {
        bail!(
            "the package from {url}: its sha256 is {}, not the {served} the server sent",
            fetched.sha256
        );
    }
    Ok(fetched.into())
}

fn limits(allow_setid: bool) -> Limits {
    Limits {
        allow_setid,
        ..Limits::default()
    }
}

fn check_extension(p: &std::path::Path) -> Result<()> {
    if !cradle_model::personalization::has_package_extension(&p.to_string_lossy()) {
        bail!(
            "{}: a personalization package is a .tar.gz or .tgz (the extension decides the format)",
            p.display()
        );
    }
    Ok(())
}

pub fn run(args: PersonalizeArgs) -> Result<()> {
    let bar = Bar::new();
    let stop = Stop::install(bar.clone())?;
    let control = Control {
        progress: Some(&|phase, done, total| {
            stop.enter(phase);
            bar.phase(phase, done, total);
        }),
        cancel: Some(&stop.cancel),
    };
    match args.command {
        PersonalizeCommand::Check {
            source,
            allow_setid,
        } => {
            let package = obtain(&source, &args.api, &bar)?;
            let m = verify_with(&package.path, &limits(allow_setid), &control);
            bar.finish();
            print_manifest(&m?);
        }
        PersonalizeCommand::Apply {
            source,
            to,
            partition,
            allow_setid,
        } => {
            let package = obtain(&source, &args.api, &bar)?;
            let limits = limits(allow_setid);
            let m = if to.is_dir() {
                if partition.is_some() {
                    bail!(
                        "--partition is for disk images; {} is a directory",
                        to.display()
                    );
                }
                apply_to_dir_with(&package.path, &to, &limits, &control)
            } else {
                apply_to_image_with(&package.path, &to, partition, &limits, &control)
            };
            bar.finish();
            let m = m?;
            eprintln!(
                "wrote {} entries ({} bytes) to {}",
                m.entries.len(),
                file_bytes(&m),
                to.display()
            );
        }
    }
    Ok(())
}

/// One progress bar on stderr (hidden when it is not a terminal), restyled
/// per phase: bytes while downloading, a percentage after.
#[derive(Clone)]
struct Bar(indicatif::ProgressBar);

impl Bar {
    fn new() -> Bar {
        Bar(indicatif::ProgressBar::with_draw_target(
            None,
            indicatif::ProgressDrawTarget::stderr(),
        ))
    }

    fn style(&self, template: &str) {
        self.0.set_style(
            indicatif::ProgressStyle::with_template(template).expect("a valid template"),
        );
    }

    fn download(&self) {
        self.style(
            "downloading {bar:40} {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec}",
        );
        self.0.reset();
    }

    fn bytes(&self, done: u64, total: Option<u64>) {
        if let Some(t) = total {
            self.0.set_length(t);
        }
        self.0.set_position(done);
    }

    fn phase(&self, phase: Phase, done: u64, total: u64) {
        if self.0.message() != phase.as_str() {
            self.style("{msg:>10} {bar:40} {percent:>3}% {elapsed}");
            self.0.reset();
            self.0.set_message(phase.as_str());
            // Without a terminal there is no bar: say each phase once.
            if self.0.is_hidden() {
                eprintln!("{}", phase.as_str());
            }
        }
        self.0.set_length(total);
        self.0.set_position(done);
    }

    fn finish(&self) {
        self.0.finish_and_clear();
    }
}

/// Ctrl-C and SIGTERM. Before anything is written, they stop the command
/// (the fetched package has no name on disk; an image's staging directory
/// is removed as the apply returns). Once writing has begun they are noted
/// and the write runs to its end, so a filesystem is never left half-made.
struct Stop {
    cancel: Arc<AtomicBool>,
    /// `None` while downloading.
    phase: Arc<Mutex<Option<Phase>>>,
}

impl Stop {
    fn install(bar: Bar) -> Result<Stop> {
        let cancel = Arc::new(AtomicBool::new(false));
        let phase = Arc::new(Mutex::new(None));
        let (c, p) = (cancel.clone(), phase.clone());
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        // Register the handlers now, before any work, on a thread of their own.
        let mut term = rt.block_on(async {
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        })?;
        let mut int = rt.block_on(async {
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
        })?;
        std::thread::spawn(move || {
            rt.block_on(async move {
                loop {
                    tokio::select! {
                        _ = int.recv() => {}
                        _ = term.recv() => {}
                    }
                    c.store(true, Ordering::Relaxed);
                    let phase = *p.lock().unwrap_or_else(|e| e.into_inner());
                    match phase {
                        None | Some(Phase::Verify) => {
                            bar.finish();
                            eprintln!("error: cancelled; nothing was written");
                            std::process::exit(130);
                        }
                        Some(Phase::Write) => bar.0.suspend(|| {
                            eprintln!(
                                "writing has begun: finishing it, so the target is not left half-written"
                            )
                        }),
                        // The apply sees the flag between entries and stops.
                        Some(Phase::Stage) => {}
                    }
                }
            })
        });
        Ok(Stop { cancel, phase })
    }

    fn enter(&self, phase: Phase) {
        *self.phase.lock().unwrap_or_else(|e| e.into_inner()) = Some(phase);
    }
}

fn file_bytes(m: &Manifest) -> u64 {
    m.entries
        .iter()
        .map(|e| match e.kind {
            Kind::File { size } => size,
            _ => 0,
        })
        .sum()
}

fn print_manifest(m: &Manifest) {
    for e in &m.entries {
        let (t, extra) = match &e.kind {
            Kind::Dir => ("d", String::new()),
            Kind::File { size } => ("f", format!(" ({size} bytes)")),
            Kind::Symlink { target } => ("l", format!(" -> {target}")),
            Kind::Hardlink { target } => ("h", format!(" => {target}")),
        };
        println!("{t} {:04o} {}:{} {}{extra}", e.mode, e.uid, e.gid, e.path);
    }
    eprintln!(
        "{} entries, {} bytes of files; {} bytes compressed, {} decompressed",
        m.entries.len(),
        file_bytes(m),
        m.compressed_bytes,
        m.uncompressed_bytes
    );
}
