//! `cradle drive build`: fetch an instance's config drive from the admin API
//! and write it to a file, atomically.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand, ValueEnum};

use cradle_client::route;

use crate::ApiArgs;

#[derive(Args, Debug)]
pub struct DriveArgs {
    #[command(flatten)]
    api: ApiArgs,
    #[command(subcommand)]
    command: DriveCommand,
}

#[derive(Subcommand, Debug)]
enum DriveCommand {
    /// Build an instance's config drive (label config-2) into a file.
    #[command(
        after_help = "The drive holds the instance's OpenStack and EC2 metadata exactly as \
the metadata service serves it, laid out as Nova writes config drives. Private and secret OS \
parameters are never put on a drive. The file appears only when complete (written to a temporary \
file beside it, then renamed).\n\nExample:\n  cradle drive build web1 --format iso9660 -o web1-config.iso"
    )]
    Build {
        /// Instance id or name.
        instance: String,
        /// Image format.
        #[arg(long, value_enum, default_value_t = DriveFormat::Iso9660)]
        format: DriveFormat,
        /// Where to write the image.
        #[arg(short = 'o', long = "output", value_name = "PATH")]
        out: PathBuf,
    },
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum DriveFormat {
    Iso9660,
    Vfat,
}

pub fn run(args: DriveArgs) -> Result<()> {
    let api = crate::client::connect(&args.api)?;
    match args.command {
        DriveCommand::Build {
            instance,
            format,
            out,
        } => {
            let format = match format {
                DriveFormat::Iso9660 => "iso9660",
                DriveFormat::Vfat => "vfat",
            };
            let dir = match out.parent() {
                Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
                _ => PathBuf::from("."),
            };
            if out.is_dir() {
                bail!(
                    "{} is a directory; give the image's file name",
                    out.display()
                );
            }
            let mut tmp = tempfile::NamedTempFile::new_in(&dir)
                .with_context(|| format!("cannot create a temporary file in {}", dir.display()))?;
            let written = api.download(
                route::config_drive(&instance, Some(format)),
                tmp.as_file_mut(),
            )?;
            tmp.as_file_mut().flush()?;
            tmp.as_file().sync_all()?;
            tmp.persist(&out)
                .with_context(|| format!("cannot write {}", out.display()))?;
            eprintln!("wrote {} ({written} bytes, {format})", out.display());
            Ok(())
        }
    }
}
