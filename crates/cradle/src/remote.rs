//! `cradle remote`: make, remove and copy files on another host with the
//! configured transport (cradle-remotefs), from the command line.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand, ValueEnum};
use cradle_config::Config;
use cradle_remotefs::{
    CancellationToken, Host, Op, Remote, RemoteFilesystem, RemotePath, Settings, Transport,
    parse_remote_operand,
};

#[derive(Args, Debug)]
#[command(
    after_help = "Operands are HOST:PATH as with scp: HOST is a name, an IPv4 address or \
an IPv6 address in brackets, optionally with user@ in front; PATH is absolute, or relative to the \
remote user's home directory (under rrsync, to its directory). Every path reaches the remote host \
exactly as given: spaces, quotes, $(), newlines, a leading '-' and bytes that are not UTF-8 \
included. A local path with a ':' before any '/' needs a './' in front.\n\n\
Settings come from the [remote] section of --config FILE and from CRADLE_REMOTE_* environment \
variables (see docs/configuration.md); these flags override both.\n\n\
Examples:\n  cradle remote mkdir node2:/var/lib/cradle/instances/web1\n  cradle remote copy \
disk.img node2:/var/lib/cradle/instances/web1/disk\n  cradle remote --transport rsync copy \
node2:/srv/images/debian.qcow2 ./debian.qcow2"
)]
pub struct RemoteArgs {
    /// TOML configuration file (its [remote] section).
    #[arg(long, value_name = "FILE", global = true)]
    config: Option<PathBuf>,
    /// Which tools carry the operation [default: ssh, or [remote] transport].
    #[arg(long, value_enum, global = true)]
    transport: Option<TransportArg>,
    /// Login user on the remote host (user@ in the operand wins).
    #[arg(long, global = true)]
    user: Option<String>,
    /// sshd's port on the remote host [default: 22].
    #[arg(long, global = true)]
    port: Option<u16>,
    /// Private key to log in with; only this key is offered.
    #[arg(short = 'i', long = "identity", value_name = "FILE", global = true)]
    identity_file: Option<PathBuf>,
    /// known_hosts file to check the host key against.
    #[arg(long, value_name = "FILE", global = true)]
    known_hosts: Option<PathBuf>,
    /// Accept and record the key of a host not yet in known_hosts (a changed key is still refused).
    #[arg(long, global = true)]
    accept_new_host_keys: bool,
    /// Seconds to wait for the connection [default: 10].
    #[arg(long, value_name = "SECS", global = true)]
    connect_timeout: Option<u64>,
    /// Seconds the whole operation may take [default: 60, copies 21600].
    #[arg(long, value_name = "SECS", global = true)]
    timeout: Option<u64>,
    /// Compress in transit (off by default: disk images gain little).
    #[arg(long, global = true)]
    compress: bool,
    /// Bandwidth limit for copies, in KiB/s.
    #[arg(long, value_name = "KIB", global = true)]
    bwlimit: Option<u64>,
    #[command(subcommand)]
    command: RemoteCommand,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum TransportArg {
    /// ssh for small operations, scp for copies.
    Ssh,
    /// rsync alone: works with accounts confined by rrsync.
    Rsync,
}

#[derive(Subcommand, Debug)]
enum RemoteCommand {
    /// Make a directory and any missing parents (an existing one is fine).
    Mkdir {
        #[arg(value_name = "HOST:PATH", value_parser = clap::value_parser!(OsString))]
        target: OsString,
    },
    /// Make an empty file; an existing file is left as it is.
    Touch {
        #[arg(value_name = "HOST:PATH", value_parser = clap::value_parser!(OsString))]
        target: OsString,
    },
    /// Remove a file or symlink (never a directory).
    Rm {
        #[arg(value_name = "HOST:PATH", value_parser = clap::value_parser!(OsString))]
        target: OsString,
    },
    /// Remove a directory and everything in it.
    Rmdir {
        #[arg(value_name = "HOST:PATH", value_parser = clap::value_parser!(OsString))]
        target: OsString,
    },
    /// Copy one regular file to a host (LOCAL HOST:PATH) or from one (HOST:PATH LOCAL).
    #[command(
        after_help = "The destination is exactly the path given (give the file's name, not a \
directory). A download is written to a temporary file beside the destination and renamed into \
place when complete. A progress bar is shown on a terminal. Ctrl-C stops the copy and every \
process it started."
    )]
    Copy {
        #[arg(value_name = "SRC", value_parser = clap::value_parser!(OsString))]
        src: OsString,
        #[arg(value_name = "DST", value_parser = clap::value_parser!(OsString))]
        dst: OsString,
    },
}

/// The `[remote]` settings, overridden by the flags.
/// The drivers' settings from `[remote]`.
pub(crate) fn from_config(c: cradle_config::Remote) -> Settings {
    Settings {
        transport: c.transport,
        user: (!c.user.is_empty()).then_some(c.user),
        port: c.port,
        identity_file: c.identity_file,
        known_hosts: c.known_hosts,
        strict_host_key_checking: c.strict_host_key_checking,
        connect_timeout: Duration::from_secs(c.connect_timeout),
        compression: c.compression,
        bwlimit_kib: c.bwlimit,
        timeout: Duration::from_secs(c.timeout),
        copy_timeout: Duration::from_secs(c.copy_timeout),
        ..Settings::default()
    }
}

fn settings(args: &RemoteArgs) -> Result<Settings> {
    let mut s = from_config(Config::load(args.config.as_deref(), std::env::vars())?.remote);
    if let Some(t) = args.transport {
        s.transport = match t {
            TransportArg::Ssh => Transport::Ssh,
            TransportArg::Rsync => Transport::Rsync,
        };
    }
    if let Some(u) = &args.user {
        s.user = Some(u.clone());
    }
    if let Some(p) = args.port {
        s.port = p;
    }
    if let Some(k) = &args.identity_file {
        s.identity_file = Some(k.clone());
    }
    if let Some(k) = &args.known_hosts {
        s.known_hosts = Some(k.clone());
    }
    if args.accept_new_host_keys {
        s.strict_host_key_checking = false;
    }
    if let Some(t) = args.connect_timeout {
        s.connect_timeout = Duration::from_secs(t);
    }
    if let Some(t) = args.timeout {
        s.timeout = Duration::from_secs(t);
        s.copy_timeout = Duration::from_secs(t);
    }
    if args.compress {
        s.compression = true;
    }
    if let Some(b) = args.bwlimit {
        s.bwlimit_kib = b;
    }
    Ok(s)
}

fn remote_operand(s: &OsString) -> Result<(Host, RemotePath)> {
    match parse_remote_operand(s) {
        Some(r) => Ok(r?),
        None => bail!(
            "{:?} is not a HOST:PATH operand (a host, a ':' and a path, as with scp)",
            s
        ),
    }
}

pub fn run(args: RemoteArgs) -> Result<()> {
    let settings = settings(&args)?;
    let fs = Remote::new(settings)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let cancel = CancellationToken::new();
        let op = Op::new().with_cancel(cancel.clone());
        // The tools run in process groups of their own, so the terminal's
        // Ctrl-C does not reach them: stop them through the token.
        let watcher = tokio::spawn({
            let cancel = cancel.clone();
            async move {
                let mut term =
                    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                        .expect("SIGTERM handler");
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
                cancel.cancel();
            }
        });
        let r = execute(&fs, args.command, op).await;
        watcher.abort();
        r
    })
}

async fn execute(fs: &Remote, command: RemoteCommand, op: Op) -> Result<()> {
    match command {
        RemoteCommand::Mkdir { target } => {
            let (h, p) = remote_operand(&target)?;
            fs.create_dir(&h, &p, &op).await?;
        }
        RemoteCommand::Touch { target } => {
            let (h, p) = remote_operand(&target)?;
            fs.create_file(&h, &p, &op).await?;
        }
        RemoteCommand::Rm { target } => {
            let (h, p) = remote_operand(&target)?;
            fs.remove_file(&h, &p, &op).await?;
        }
        RemoteCommand::Rmdir { target } => {
            let (h, p) = remote_operand(&target)?;
            fs.remove_dir(&h, &p, &op).await?;
        }
        RemoteCommand::Copy { src, dst } => {
            let from = parse_remote_operand(&src).transpose()?;
            let to = parse_remote_operand(&dst).transpose()?;
            let bar = progress_bar();
            let op = {
                let bar = bar.clone();
                op.on_progress(move |p| {
                    bar.set_length(p.total);
                    bar.set_position(p.done);
                })
            };
            let r = match (from, to) {
                (None, Some((h, p))) => fs.copy_to(Path::new(&src), &h, &p, &op).await,
                (Some((h, p)), None) => fs.copy_from(&h, &p, Path::new(&dst), &op).await,
                (Some(_), Some(_)) => {
                    bar.finish_and_clear();
                    bail!("both operands are remote; copy goes between this host and one other")
                }
                (None, None) => {
                    bar.finish_and_clear();
                    bail!(
                        "neither operand is remote; one of SRC and DST must be HOST:PATH \
                         (write ./NAME for a local file whose name has a ':')"
                    )
                }
            };
            match &r {
                Ok(()) => bar.finish(),
                Err(_) => bar.abandon(),
            }
            r.context("copy failed")?;
        }
    }
    Ok(())
}

fn progress_bar() -> indicatif::ProgressBar {
    // Drawn on stderr when it is a terminal, hidden otherwise.
    let bar =
        indicatif::ProgressBar::with_draw_target(None, indicatif::ProgressDrawTarget::stderr());
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:40} {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} eta {eta}",
        )
        .expect("a valid template"),
    );
    bar
}
