//! `cradle appliance build`: the install appliance's kernel and initramfs
//! (cradle-appliance).

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};

#[derive(Args, Debug)]
pub struct ApplianceArgs {
    #[command(subcommand)]
    command: ApplianceCommand,
}

#[derive(Subcommand, Debug)]
enum ApplianceCommand {
    /// Make vmlinuz and initrd.img from Debian's kernel and busybox packages and the static cradle-agent.
    #[command(
        after_help = "The packages are unpacked with dpkg-deb, never installed on this host; \
without --kernel-deb, the package linux-image-amd64 points at is fetched with `apt-get \
download`, and without --busybox-deb, busybox-static. The initramfs holds the agent as /init, \
busybox as /bin/busybox with a symlink in /bin for each of its applets (so OS scripts can be \
#!/bin/sh), the virtio, ext4 and vfat modules with their dependencies (from depmod on the \
unpacked tree), and the order to load them in. The agent and busybox must be static: build \
the agent with `cargo xtask agent`, which puts it beside the release cradle binary (the default \
--agent)."
    )]
    Build {
        /// The kernel package (.deb) to take the kernel and modules from.
        #[arg(long, value_name = "DEB")]
        kernel_deb: Option<PathBuf>,
        /// The busybox-static package (.deb) to take /bin/busybox from.
        #[arg(long, value_name = "DEB")]
        busybox_deb: Option<PathBuf>,
        /// The static agent [default: cradle-agent beside this binary].
        #[arg(long, value_name = "PATH")]
        agent: Option<PathBuf>,
        /// Where to write vmlinuz and initrd.img.
        #[arg(
            long,
            short = 'o',
            value_name = "DIR",
            default_value = "./cradle-data/appliance"
        )]
        out: PathBuf,
    },
}

pub fn run(args: ApplianceArgs) -> Result<()> {
    match args.command {
        ApplianceCommand::Build {
            kernel_deb,
            busybox_deb,
            agent,
            out,
        } => {
            let agent = match agent {
                Some(a) => a,
                None => std::env::current_exe()
                    .context("cannot find this binary")?
                    .with_file_name("cradle-agent"),
            };
            // Refuse a dynamic agent before downloading anything.
            cradle_appliance::check_agent(&agent)?;
            let download = tempfile::tempdir()?;
            let kernel_deb = match kernel_deb {
                Some(d) => d,
                None => {
                    eprintln!("downloading the kernel package (apt-get download)");
                    cradle_appliance::download_kernel(download.path())?
                }
            };
            let busybox_deb = match busybox_deb {
                Some(d) => d,
                None => {
                    eprintln!("downloading busybox-static (apt-get download)");
                    cradle_appliance::download_busybox(download.path())?
                }
            };
            let built = cradle_appliance::build(&kernel_deb, &busybox_deb, &agent, &out)?;
            println!("agent   {}", agent.display());
            println!("kernel  {} ({})", built.kernel.display(), built.release);
            println!("initrd  {}", built.initrd.display());
            println!("modules {}", built.modules.join(" "));
            println!("busybox {} applets in /bin", built.applets.len());
        }
    }
    Ok(())
}
