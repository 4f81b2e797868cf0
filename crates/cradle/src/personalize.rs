//! `cradle personalize`: verify a personalization package, and overlay it
//! onto a directory tree (cradle-personalize).

use std::path::PathBuf;

use anyhow::{Result, bail};
use clap::{Args, Subcommand};
use cradle_personalize::{
    Credentials, Kind, Limits, Manifest, apply_to_dir, apply_to_image, check_sha256, fetch, verify,
};

#[derive(Args, Debug)]
pub struct PersonalizeArgs {
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
existing ones through a temporary name renamed into place."
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

/// Where a package comes from: a local file, or a URL fetched first.
#[derive(Args, Debug)]
struct Source {
    /// A .tar.gz/.tgz file, or an http, https or file URL.
    package: String,
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

/// The package as a local file: fetched into a temporary file (removed when
/// the returned value is dropped) when it is a URL.
fn obtain(src: &Source) -> Result<(PathBuf, Option<cradle_personalize::Fetched>)> {
    let p = &src.package;
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
        let f = fetch(
            p,
            &creds,
            Limits::default().max_compressed,
            src.sha256.as_deref(),
        )?;
        return Ok((f.path().to_path_buf(), Some(f)));
    }
    let path = PathBuf::from(p);
    check_extension(&path)?;
    if let Some(want) = &src.sha256 {
        check_sha256(&path, want)?;
    }
    Ok((path, None))
}

fn limits(allow_setid: bool) -> Limits {
    Limits {
        allow_setid,
        ..Limits::default()
    }
}

fn check_extension(p: &std::path::Path) -> Result<()> {
    let name = p.to_string_lossy();
    if !(name.ends_with(".tar.gz") || name.ends_with(".tgz")) {
        bail!(
            "{}: a personalization package is a .tar.gz or .tgz (the extension decides the format)",
            p.display()
        );
    }
    Ok(())
}

pub fn run(args: PersonalizeArgs) -> Result<()> {
    match args.command {
        PersonalizeCommand::Check {
            source,
            allow_setid,
        } => {
            let (package, _fetched) = obtain(&source)?;
            let m = verify(&package, &limits(allow_setid))?;
            print_manifest(&m);
        }
        PersonalizeCommand::Apply {
            source,
            to,
            partition,
            allow_setid,
        } => {
            let (package, _fetched) = obtain(&source)?;
            let m = if to.is_dir() {
                if partition.is_some() {
                    bail!(
                        "--partition is for disk images; {} is a directory",
                        to.display()
                    );
                }
                apply_to_dir(&package, &to, &limits(allow_setid))?
            } else {
                apply_to_image(&package, &to, partition, &limits(allow_setid))?
            };
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
